//! The keepalive tables (`client.keepalive`, `upstream.keepalive`) and the
//! `forward` shorthand: each field checked against what the kernel (or, for
//! `user_timeout` and `stall_timeout`, kaproxy's watchdog) can take, and the
//! layers merged field by field.

use std::time::Duration;

use super::raw::{RawKeepalive, SStr};
use super::source::{off_or_duration, parse_duration, Ctx, MAX_DURATION};
use super::{ConfigError, KeepaliveSpec, UserTimeout, MAX_USER_TIMEOUT};

/// Largest TCP_KEEPIDLE / TCP_KEEPINTVL Linux accepts (MAX_TCP_KEEPIDLE, MAX_TCP_KEEPINTVL).
pub(super) const MAX_KEEPALIVE_SECS: u64 = 32767;

/// Largest TCP_KEEPCNT Linux accepts (MAX_TCP_KEEPCNT).
pub(super) const MAX_KEEPALIVE_PROBES: i64 = 127;

/// Keepalive fields as found at one level, each already valid on its own.
#[derive(Default, Clone, Copy)]
pub(super) struct KeepaliveLayer {
    enabled: Option<bool>,
    idle: Option<Duration>,
    interval: Option<Duration>,
    probes: Option<u32>,
    user_timeout: Option<UserTimeout>,
    stall_timeout: Option<Option<Duration>>,
}

impl KeepaliveLayer {
    /// Field-by-field: `self` wins over `lower`.
    pub(super) fn over(self, lower: KeepaliveLayer) -> KeepaliveLayer {
        KeepaliveLayer {
            enabled: self.enabled.or(lower.enabled),
            idle: self.idle.or(lower.idle),
            interval: self.interval.or(lower.interval),
            probes: self.probes.or(lower.probes),
            user_timeout: self.user_timeout.or(lower.user_timeout),
            stall_timeout: self.stall_timeout.or(lower.stall_timeout),
        }
    }

    pub(super) fn finish(self) -> KeepaliveSpec {
        let d = KeepaliveSpec::default();
        KeepaliveSpec {
            enabled: self.enabled.unwrap_or(d.enabled),
            idle: self.idle.unwrap_or(d.idle),
            interval: self.interval.unwrap_or(d.interval),
            probes: self.probes.unwrap_or(d.probes),
            user_timeout: self.user_timeout.unwrap_or(d.user_timeout),
            stall_timeout: self.stall_timeout.unwrap_or(d.stall_timeout),
        }
    }
}

pub(super) fn keepalive_layer(
    ctx: &Ctx<'_>,
    raw: Option<&RawKeepalive>,
    field: &str,
) -> Result<KeepaliveLayer, ConfigError> {
    let Some(raw) = raw else {
        return Ok(KeepaliveLayer::default());
    };
    let secs = |s: &Option<SStr>, name: &str, opt: &str| -> Result<Option<Duration>, ConfigError> {
        let Some(s) = s else { return Ok(None) };
        let f = format!("{field}.{name}");
        let d = parse_duration(ctx, s, &f)?;
        match check_keepalive_secs(d, opt) {
            Ok(()) => Ok(Some(d)),
            Err((problem, hint)) => ctx.err(s.span(), &f, problem, hint),
        }
    };
    let idle = secs(&raw.idle, "idle", "TCP_KEEPIDLE")?;
    let interval = secs(&raw.interval, "interval", "TCP_KEEPINTVL")?;
    let probes = match &raw.probes {
        Some(p) => match check_probes(*p.get_ref()) {
            Ok(n) => Some(n),
            Err((problem, hint)) => {
                return ctx.err(p.span(), &format!("{field}.probes"), problem, hint)
            }
        },
        None => None,
    };
    let user_timeout = match &raw.user_timeout {
        Some(s) => match parse_user_timeout(s.get_ref()) {
            Ok(u) => Some(u),
            Err((problem, hint)) => {
                return ctx.err(s.span(), &format!("{field}.user_timeout"), problem, hint)
            }
        },
        None => None,
    };
    let stall_timeout = match &raw.stall_timeout {
        Some(s) => {
            let f = format!("{field}.stall_timeout");
            let d = off_or_duration(ctx, s, &f)?;
            if let Some(d) = d.filter(|d| d.subsec_nanos() % 1_000_000 != 0) {
                return ctx.err(
                    s.span(),
                    &f,
                    format!("{} is finer than a millisecond", super::fmt_duration(d)),
                    "write \"off\" or a duration in whole milliseconds, e.g. \"5m\" or \"2500ms\"",
                );
            }
            Some(d)
        }
        None => None,
    };
    Ok(KeepaliveLayer {
        enabled: raw.enabled.as_ref().map(|b| *b.get_ref()),
        idle,
        interval,
        probes,
        user_timeout,
        stall_timeout,
    })
}

pub(super) type Problem = (String, String);

/// TCP_KEEPIDLE and TCP_KEEPINTVL take whole seconds 1..=32767; anything else
/// would be rounded or refused by the kernel, so it is refused here with a reason.
pub(super) fn check_keepalive_secs(d: Duration, opt: &str) -> Result<(), Problem> {
    let hint =
        || format!("{opt} takes whole seconds from 1s to {MAX_KEEPALIVE_SECS}s, e.g. \"30s\"");
    if d.subsec_nanos() != 0 {
        return Err((
            format!(
                "{} is not a whole number of seconds",
                super::fmt_duration(d)
            ),
            hint(),
        ));
    }
    if d.as_secs() == 0 || d.as_secs() > MAX_KEEPALIVE_SECS {
        return Err((
            format!("{} is out of range", super::fmt_duration(d)),
            hint(),
        ));
    }
    Ok(())
}

pub(super) fn check_probes(n: i64) -> Result<u32, Problem> {
    if (1..=MAX_KEEPALIVE_PROBES).contains(&n) {
        Ok(n as u32)
    } else {
        Err((
            format!("{n} probes is out of range"),
            format!("TCP_KEEPCNT takes 1 to {MAX_KEEPALIVE_PROBES} probes, e.g. 3"),
        ))
    }
}

pub(super) fn user_timeout_range_hint() -> String {
    format!(
        "user_timeout takes at most {}ms (about 24.8 days), the range of TCP_USER_TIMEOUT",
        MAX_USER_TIMEOUT.as_millis()
    )
}

/// `auto` is computed after inheritance, so its range is checked on the finished spec.
pub(super) fn check_auto_user_timeout(spec: &KeepaliveSpec) -> Result<(), Problem> {
    match (spec.user_timeout, spec.effective_user_timeout()) {
        (UserTimeout::Auto, Some(d)) if d > MAX_USER_TIMEOUT => Err((
            format!(
                "user_timeout auto = idle + interval × probes = {}s (about {:.1} days) is out of range",
                d.as_secs(),
                d.as_secs_f64() / 86400.0
            ),
            format!(
                "{}; shorten idle, interval or probes, or set user_timeout explicitly",
                user_timeout_range_hint()
            ),
        )),
        _ => Ok(()),
    }
}

pub(super) fn parse_user_timeout(s: &str) -> Result<UserTimeout, Problem> {
    let hint = || {
        "use \"auto\" (idle + interval × probes), \"off\", or a duration in whole milliseconds such as \"30s\" or \"2500ms\"".to_string()
    };
    match s.trim() {
        "auto" => return Ok(UserTimeout::Auto),
        "off" => return Ok(UserTimeout::Off),
        _ => {}
    }
    let d = humantime::parse_duration(s.trim()).map_err(|e| {
        (
            format!("{s:?} is neither auto, off nor a duration ({e})"),
            hint(),
        )
    })?;
    if d.is_zero() {
        return Err((
            "0 would mean off".to_string(),
            "write \"off\" to turn TCP_USER_TIMEOUT off, or a duration of at least 1ms".to_string(),
        ));
    }
    if d.subsec_nanos() % 1_000_000 != 0 {
        return Err((
            format!("{} is finer than a millisecond", super::fmt_duration(d)),
            hint(),
        ));
    }
    if d > MAX_USER_TIMEOUT {
        return Err((
            format!("{} is out of range", super::fmt_duration(d)),
            user_timeout_range_hint(),
        ));
    }
    Ok(UserTimeout::Fixed(d))
}

/// Parses the command-line keepalive shorthand `IDLE/INTERVAL/PROBES[/USER_TIMEOUT[/STALL_TIMEOUT]]`
/// (e.g. `60s/10s/3`, `30s/5s/3/off`, `30s/5s/3/auto/5m`) or `off`, with the same checks as the file.
pub fn parse_keepalive_shorthand(s: &str) -> Result<KeepaliveSpec, String> {
    let s = s.trim();
    if s == "off" {
        return Ok(KeepaliveSpec {
            enabled: false,
            ..KeepaliveSpec::default()
        });
    }
    let parts: Vec<&str> = s.split('/').collect();
    if !(3..=5).contains(&parts.len()) {
        return Err(format!("{s:?} is not IDLE/INTERVAL/PROBES[/USER_TIMEOUT[/STALL_TIMEOUT]], e.g. 60s/10s/3, 30s/5s/3/auto or 30s/5s/3/auto/5m, or off"));
    }
    let dur = |v: &str, name: &str, opt: &str| -> Result<Duration, String> {
        let d = humantime::parse_duration(v)
            .map_err(|e| format!("{name} {v:?} is not a duration ({e})"))?;
        check_keepalive_secs(d, opt).map_err(|(p, h)| format!("{name} {p}; {h}"))?;
        Ok(d)
    };
    let idle = dur(parts[0], "idle", "TCP_KEEPIDLE")?;
    let interval = dur(parts[1], "interval", "TCP_KEEPINTVL")?;
    let probes: i64 = parts[2]
        .parse()
        .map_err(|_| format!("probes {:?} is not a whole number", parts[2]))?;
    let probes = check_probes(probes).map_err(|(p, h)| format!("{p}; {h}"))?;
    let user_timeout = match parts.get(3) {
        Some(u) => parse_user_timeout(u).map_err(|(p, h)| format!("user_timeout {p}; {h}"))?,
        None => UserTimeout::Auto,
    };
    let stall_timeout = match parts.get(4).map(|v| v.trim()) {
        None | Some("off") => None,
        Some(v) => {
            let d = humantime::parse_duration(v)
                .map_err(|e| format!("stall_timeout {v:?} is not a duration ({e})"))?;
            if d > MAX_DURATION {
                return Err(format!("stall_timeout {v:?} is longer than 365 days"));
            }
            if d.subsec_nanos() % 1_000_000 != 0 {
                return Err(format!(
                    "stall_timeout {v:?} is finer than a millisecond; use whole milliseconds"
                ));
            }
            (!d.is_zero()).then_some(d)
        }
    };
    let spec = KeepaliveSpec {
        enabled: true,
        idle,
        interval,
        probes,
        user_timeout,
        stall_timeout,
    };
    check_auto_user_timeout(&spec).map_err(|(p, h)| format!("{p}; {h}"))?;
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_timeout_forms() {
        assert_eq!(parse_user_timeout("auto").unwrap(), UserTimeout::Auto);
        assert_eq!(parse_user_timeout("off").unwrap(), UserTimeout::Off);
        assert_eq!(
            parse_user_timeout("2500ms").unwrap(),
            UserTimeout::Fixed(Duration::from_millis(2500))
        );
        assert!(parse_user_timeout("0s").is_err());
        assert!(parse_user_timeout("1500us").is_err());
        assert!(parse_user_timeout("60d").is_err());
    }

    #[test]
    fn keepalive_seconds_edges() {
        assert!(check_keepalive_secs(Duration::from_secs(1), "X").is_ok());
        assert!(check_keepalive_secs(Duration::from_secs(32767), "X").is_ok());
        assert!(check_keepalive_secs(Duration::from_secs(32768), "X").is_err());
        assert!(check_keepalive_secs(Duration::from_millis(999), "X").is_err());
        assert!(check_probes(127).is_ok());
        assert!(check_probes(-1).is_err());
    }

    #[test]
    fn shorthand_matches_file_rules() {
        let ka = parse_keepalive_shorthand("30s/5s/3/off").unwrap();
        assert_eq!(
            (ka.idle.as_secs(), ka.interval.as_secs(), ka.probes),
            (30, 5, 3)
        );
        assert_eq!(ka.user_timeout, UserTimeout::Off);
        assert!(!parse_keepalive_shorthand("off").unwrap().enabled);
        assert!(parse_keepalive_shorthand("30s/5s").is_err());
        assert!(parse_keepalive_shorthand("30s/5s/200").is_err());
    }
}
