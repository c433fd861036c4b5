//! `path_idle_limit`: the idle timeout of the network path one side crosses (a
//! NAT gateway, a firewall, a cloud load balancer), and the rule that keeps a
//! side's keepalive safely below it. `kaproxy probe` measures the limit and
//! recommends settings with the same rule that `check` and start-up enforce.

use std::time::Duration;

use super::keepalive::Problem;
use super::{fmt_duration, KeepaliveSpec};

/// An idle limit, as a duration or as the preset it was named by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathIdleLimit {
    /// Flows idle longer than this are dropped by the path.
    pub limit: Duration,
    /// The preset name when one was used, e.g. `aws-nlb`.
    pub preset: Option<&'static str>,
}

impl std::fmt::Display for PathIdleLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.preset {
            Some(p) => write!(f, "{} ({p})", fmt_duration(self.limit)),
            None => f.write_str(&fmt_duration(self.limit)),
        }
    }
}

/// Well-known middlebox idle timeouts (their documented defaults; the README
/// table gives the source of each).
pub const PRESETS: &[(&str, Duration)] = &[
    ("aws-nlb", Duration::from_secs(350)),
    ("azure-lb", Duration::from_secs(240)),
    ("gcp-vpc", Duration::from_secs(600)),
    ("gcp-cloud-nat", Duration::from_secs(1200)),
];

/// Share of the limit, in percent, that `idle + interval` may take. The first
/// probe goes out after `idle`; if that one packet is lost, the next follows
/// `interval` later, and the flow must still be inside the limit then. The
/// remaining tenth absorbs timer slack and the probe's own round trip.
pub const SAFE_PERCENT: u32 = 90;

/// Shortest limit any keepalive fits below: idle 1 s + interval 1 s = 2 s is
/// at most 90 % of it.
const SHORTEST_LIMIT: Duration = Duration::from_millis(2223);

/// Probes in the recommended settings: one lost answer is not death.
const RECOMMENDED_PROBES: u32 = 3;

/// Longest interval the recommendation uses: a dead peer is found within
/// `idle + 3 × 10 s` at most past the idle time.
const MAX_RECOMMENDED_INTERVAL: Duration = Duration::from_secs(10);

/// Parses `"350s"`, `"5m"` or a preset name.
pub fn parse_path_idle_limit(s: &str) -> Result<PathIdleLimit, Problem> {
    let v = s.trim();
    if let Some(&(name, limit)) = PRESETS.iter().find(|(n, _)| *n == v) {
        return Ok(PathIdleLimit {
            limit,
            preset: Some(name),
        });
    }
    let names: Vec<String> = PRESETS
        .iter()
        .map(|(n, d)| format!("\"{n}\" ({})", fmt_duration(*d)))
        .collect();
    let hint = || {
        format!(
            "write the path's idle timeout as a duration such as \"300s\", or a preset: {}; `kaproxy probe HOST:PORT` measures it",
            names.join(", ")
        )
    };
    let d = humantime::parse_duration(v).map_err(|e| {
        (
            format!("{v:?} is neither a duration ({e}) nor a known preset"),
            hint(),
        )
    })?;
    if d < SHORTEST_LIMIT {
        return Err((
            format!(
                "{} is too short for any keepalive: even idle 1s + interval 1s is more than {SAFE_PERCENT}% of it",
                fmt_duration(d)
            ),
            format!("the shortest usable limit is 3s; {}", hint()),
        ));
    }
    if d > super::source::MAX_DURATION {
        return Err((
            format!("{v:?} is longer than the longest supported duration, 365 days"),
            hint(),
        ));
    }
    Ok(PathIdleLimit {
        limit: d,
        preset: None,
    })
}

/// Longest `idle + interval` that is safely below `limit`.
pub fn safe_budget(limit: Duration) -> Duration {
    limit * SAFE_PERCENT / 100
}

/// Checks one side's keepalive against its path's limit. Ok carries how far
/// `idle + interval` stays below the limit. `side` names the keepalive table
/// in hints, e.g. `client.keepalive`.
pub fn check_against_limit(
    spec: &KeepaliveSpec,
    limit: &PathIdleLimit,
    side: &str,
) -> Result<Duration, Problem> {
    let budget = safe_budget(limit.limit);
    if !spec.enabled {
        return Err((
            format!(
                "keepalive is off, so the path drops every flow idle for longer than path_idle_limit {limit}"
            ),
            format!(
                "turn {side} on with idle + interval at most {} ({SAFE_PERCENT}% of the limit){}, or remove path_idle_limit",
                fmt_duration(budget),
                example(limit.limit)
            ),
        ));
    }
    let used = spec.idle + spec.interval;
    if used <= budget {
        return Ok(limit.limit - used);
    }
    let max_idle = budget
        .checked_sub(spec.interval)
        .filter(|d| d.as_secs() >= 1)
        .map(|d| Duration::from_secs(d.as_secs()));
    let fix = match max_idle {
        Some(idle) => format!(
            "set {side}.idle to at most {} with interval {}{}",
            fmt_duration(idle),
            fmt_duration(spec.interval),
            example(limit.limit)
        ),
        None => format!(
            "interval {} alone leaves no room for an idle time: shorten the interval{}",
            fmt_duration(spec.interval),
            example(limit.limit)
        ),
    };
    Err((
        format!(
            "keepalive idle {} + interval {} = {} is not safely below path_idle_limit {limit}: it must be at most {} ({SAFE_PERCENT}% of the limit), so that a flow whose first probe is lost is probed again before the path drops it",
            fmt_duration(spec.idle),
            fmt_duration(spec.interval),
            fmt_duration(used),
            fmt_duration(budget),
        ),
        format!("{fix}, or correct path_idle_limit if the path allows longer"),
    ))
}

fn example(limit: Duration) -> String {
    match recommend(limit) {
        Some(r) => format!(
            ", e.g. keepalive = {{ idle = \"{}s\", interval = \"{}s\", probes = {} }}",
            r.idle.as_secs(),
            r.interval.as_secs(),
            r.probes
        ),
        None => String::new(),
    }
}

/// Keepalive settings for a path with this limit: the longest idle the rule
/// allows (fewest probe packets) with a short interval, so that a dead peer is
/// still found soon after the idle time. `None` when the limit is too short
/// for any keepalive.
pub fn recommend(limit: Duration) -> Option<KeepaliveSpec> {
    let budget = safe_budget(limit).as_secs();
    if budget < 2 {
        return None;
    }
    let interval = (budget / 10).clamp(1, MAX_RECOMMENDED_INTERVAL.as_secs());
    let idle = (budget - interval).min(super::keepalive::MAX_KEEPALIVE_SECS);
    Some(KeepaliveSpec {
        enabled: true,
        idle: Duration::from_secs(idle),
        interval: Duration::from_secs(interval),
        probes: RECOMMENDED_PROBES,
        ..KeepaliveSpec::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ka(idle: u64, interval: u64) -> KeepaliveSpec {
        KeepaliveSpec {
            idle: Duration::from_secs(idle),
            interval: Duration::from_secs(interval),
            ..KeepaliveSpec::default()
        }
    }

    #[test]
    fn presets_and_durations_parse() {
        let l = parse_path_idle_limit("aws-nlb").unwrap();
        assert_eq!(l.limit, Duration::from_secs(350));
        assert_eq!(l.to_string(), "5m 50s (aws-nlb)");
        assert_eq!(
            parse_path_idle_limit(" gcp-cloud-nat ").unwrap().limit,
            Duration::from_secs(1200)
        );
        assert_eq!(
            parse_path_idle_limit("4m").unwrap(),
            PathIdleLimit {
                limit: Duration::from_secs(240),
                preset: None
            }
        );
        let (problem, hint) = parse_path_idle_limit("aws-alb").unwrap_err();
        assert!(
            problem.contains("\"aws-alb\" is neither a duration"),
            "{problem}"
        );
        assert!(hint.contains("\"azure-lb\" (4m)"), "{hint}");
        assert!(parse_path_idle_limit("2s")
            .unwrap_err()
            .0
            .contains("too short"));
        assert!(parse_path_idle_limit("3s").is_ok());
        assert!(parse_path_idle_limit("400d").is_err());
    }

    #[test]
    fn idle_plus_interval_must_fit_ninety_percent() {
        let nlb = parse_path_idle_limit("aws-nlb").unwrap();
        // 305 + 10 = 315 = 90 % of 350: allowed, 35 s below the limit.
        assert_eq!(
            check_against_limit(&ka(305, 10), &nlb, "client.keepalive"),
            Ok(Duration::from_secs(35))
        );
        let (problem, hint) =
            check_against_limit(&ka(306, 10), &nlb, "client.keepalive").unwrap_err();
        assert!(
            problem.contains("idle 5m 6s + interval 10s = 5m 16s is not safely below path_idle_limit 5m 50s (aws-nlb)"),
            "{problem}"
        );
        assert!(problem.contains("at most 5m 15s"), "{problem}");
        assert!(
            hint.starts_with("set client.keepalive.idle to at most 5m 5s with interval 10s"),
            "{hint}"
        );
        let off = KeepaliveSpec {
            enabled: false,
            ..KeepaliveSpec::default()
        };
        assert!(check_against_limit(&off, &nlb, "upstream.keepalive")
            .unwrap_err()
            .0
            .contains("keepalive is off"));
        let short = parse_path_idle_limit("8s").unwrap();
        let (_, hint) = check_against_limit(&ka(1, 10), &short, "client.keepalive").unwrap_err();
        assert!(hint.contains("shorten the interval"), "{hint}");
    }

    #[test]
    fn recommendations_obey_the_rule() {
        for secs in [3u64, 7, 8, 60, 240, 295, 350, 600, 1200, 100_000] {
            let limit = PathIdleLimit {
                limit: Duration::from_secs(secs),
                preset: None,
            };
            let r = recommend(limit.limit).expect("a recommendation");
            assert!(
                check_against_limit(&r, &limit, "k").is_ok(),
                "{secs}s: {r:?}"
            );
            assert!(r.idle >= Duration::from_secs(1) && r.probes == 3);
        }
        let r = recommend(Duration::from_secs(295)).unwrap();
        assert_eq!((r.idle.as_secs(), r.interval.as_secs()), (255, 10));
        let r = recommend(Duration::from_secs(7)).unwrap();
        assert_eq!((r.idle.as_secs(), r.interval.as_secs()), (5, 1));
        assert!(recommend(Duration::from_secs(2)).is_none());
    }
}
