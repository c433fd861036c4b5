//! What the probe shows: progress while it waits, the result for people
//! (with the settings to paste), and the same as JSON for scripts.

use std::fmt::Write as _;
use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{json, Value};

use super::plan::{Knowledge, Outcome, Settings, Verdict};
use crate::config::{
    fmt_duration, recommend, safe_budget, KeepaliveSpec, PathIdleLimit, SAFE_PERCENT,
};

/// One round as it happened.
#[derive(Debug, Clone)]
pub struct Round {
    /// 1-based.
    pub number: usize,
    /// Planned idle time and verdict of each connection that gave one;
    /// connections closed early (planned past a known drop) are not listed.
    pub verdicts: Vec<(Duration, Verdict)>,
    /// Planned idle times of the connections closed early.
    pub closed_early: Vec<Duration>,
    /// Wall time of the round.
    pub took: Duration,
}

/// The finished measurement.
#[derive(Debug, Clone)]
pub struct Report {
    /// HOST:PORT as given.
    pub target: String,
    /// The address probed.
    pub address: SocketAddr,
    /// What was asked for.
    pub settings: Settings,
    /// Every round.
    pub rounds: Vec<Round>,
    /// Everything learnt.
    pub knowledge: Knowledge,
    /// The answer.
    pub outcome: Outcome,
    /// Whether the bound is as narrow as asked (false only when the probe ran
    /// out of rounds).
    pub complete: bool,
    /// Wall time of the whole probe.
    pub took: Duration,
}

/// Told about the probe's progress while it waits.
pub trait Progress {
    /// A round opened its connections; `longest` is when it ends at the latest.
    fn round_started(&mut self, number: usize, targets: &[Duration], longest: Duration);
    /// Once a second during a round.
    fn tick(&mut self, elapsed: Duration, longest: Duration, alive: usize, dropped: usize);
    /// A round ended.
    fn round_finished(&mut self, round: &Round, knowledge: &Knowledge);
}

/// Progress on stderr. On a terminal a bar is redrawn in place every second;
/// elsewhere (a pipe, a log file) only a line per round start and end, and
/// nothing at all with `quiet` (for --json).
pub struct StderrProgress {
    terminal: bool,
    quiet: bool,
    bar_shown: bool,
}

impl StderrProgress {
    /// Progress for this process's stderr.
    pub fn new(quiet: bool) -> StderrProgress {
        use std::io::IsTerminal;
        StderrProgress {
            terminal: std::io::stderr().is_terminal(),
            quiet,
            bar_shown: false,
        }
    }

    fn line(&mut self, text: &str) {
        if self.quiet && !self.terminal {
            return;
        }
        let mut err = std::io::stderr().lock();
        if self.bar_shown {
            // Wipe the bar so the line replaces it.
            let _ = write!(err, "\r\x1b[2K");
            self.bar_shown = false;
        }
        let _ = writeln!(err, "{text}");
    }
}

impl Progress for StderrProgress {
    fn round_started(&mut self, number: usize, targets: &[Duration], longest: Duration) {
        let (first, last) = (targets[0], targets[targets.len() - 1]);
        self.line(&format!(
            "round {number}: {} connection{} idle {} to {}, done in {} at most",
            targets.len(),
            if targets.len() == 1 { "" } else { "s" },
            secs(first),
            secs(last),
            secs(longest),
        ));
    }

    fn tick(&mut self, elapsed: Duration, longest: Duration, alive: usize, dropped: usize) {
        if !self.terminal {
            return;
        }
        const WIDTH: usize = 30;
        let total = longest.as_secs_f64().max(0.001);
        let filled = ((elapsed.as_secs_f64() / total) * WIDTH as f64).min(WIDTH as f64) as usize;
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r\x1b[2K  [{}{}] {:>6} / {}  answered {alive}, dropped {dropped}",
            "#".repeat(filled),
            ".".repeat(WIDTH - filled),
            secs(elapsed),
            secs(longest),
        );
        let _ = err.flush();
        self.bar_shown = true;
    }

    fn round_finished(&mut self, round: &Round, knowledge: &Knowledge) {
        let survived = knowledge.survived();
        let mut text = format!(
            "round {}: {} after {}; ",
            round.number,
            summary(round),
            secs(round.took)
        );
        match (knowledge.dropped, knowledge.server_closes) {
            (Some((d, _)), s) if s.is_none_or(|s| d <= s) => {
                let _ = write!(
                    text,
                    "the path's limit is above {} and at most {}",
                    secs(survived),
                    secs(d)
                );
            }
            (_, Some(s)) => {
                let _ = write!(
                    text,
                    "no drop up to {}; the server closes idle connections itself after {}",
                    secs(survived),
                    secs(s)
                );
            }
            _ => {
                let _ = write!(text, "no drop up to {}", secs(survived));
            }
        }
        self.line(&text);
    }
}

fn summary(round: &Round) -> String {
    let mut alive = 0;
    let mut dropped = 0;
    let mut closed = 0;
    for (_, v) in &round.verdicts {
        match v {
            Verdict::Alive { .. } => alive += 1,
            Verdict::Dropped { .. } => dropped += 1,
            Verdict::ServerClosed { .. } => closed += 1,
        }
    }
    let mut s = format!("{alive} answered, {dropped} dropped");
    if closed > 0 {
        let _ = write!(s, ", {closed} closed by the server");
    }
    if !round.closed_early.is_empty() {
        let _ = write!(s, ", {} not needed", round.closed_early.len());
    }
    s
}

/// Seconds for people: tenths below a minute, whole seconds above.
pub fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 60.0 {
        format!("{s:.0} s")
    } else {
        format!("{s:.1} s")
    }
}

/// The limit to write in the config: the longest idle time the path was seen
/// to carry, in whole seconds, rounded down. The real limit is somewhere
/// above it (below the shortest drop), so this errs on the safe side.
pub fn measured_limit(report: &Report) -> Option<Duration> {
    let survived = match report.outcome {
        Outcome::Dropped { survived, .. }
        | Outcome::NoDrop { survived }
        | Outcome::ServerCloses { survived, .. } => survived,
        Outcome::Unmeasurable { .. } => return None,
    };
    let whole = Duration::from_secs(survived.as_secs());
    crate::config::parse_path_idle_limit(&format!("{}s", whole.as_secs()))
        .ok()
        .map(|l: PathIdleLimit| l.limit)
}

/// Keepalive choices below `limit`: the longest safe idle (fewest probe
/// packets) and, when it fits and differs, kaproxy's default (faster
/// detection of a dead peer).
pub fn recommendations(limit: Duration) -> Vec<(KeepaliveSpec, &'static str)> {
    let mut out = Vec::new();
    if let Some(r) = recommend(limit) {
        out.push((r, "longest safe idle: fewest probe packets"));
    }
    let d = KeepaliveSpec::default();
    if d.idle + d.interval <= safe_budget(limit) && out.first().is_none_or(|(r, _)| *r != d) {
        out.push((d, "kaproxy's default: a dead peer is found sooner"));
    }
    out
}

fn ka_toml(k: &KeepaliveSpec) -> String {
    format!(
        "keepalive = {{ idle = \"{}s\", interval = \"{}s\", probes = {} }}",
        k.idle.as_secs(),
        k.interval.as_secs(),
        k.probes
    )
}

/// The result for people.
pub fn human(report: &Report) -> String {
    let mut out = String::new();
    let target = &report.target;
    let via = if report.address.to_string() == *target {
        String::new()
    } else {
        format!(" ({})", report.address)
    };
    let _ = writeln!(
        out,
        "probed {target}{via}: {} round{}, up to {} connections at once, {}",
        report.rounds.len(),
        if report.rounds.len() == 1 { "" } else { "s" },
        report.settings.connections,
        secs(report.took)
    );
    let _ = writeln!(out);
    match report.outcome {
        Outcome::Dropped {
            survived,
            dropped,
            sign,
        } => {
            let _ = writeln!(
                out,
                "idle flows to {target} are dropped after more than {} and at most {}",
                secs(survived),
                secs(dropped)
            );
            let how = match sign {
                super::plan::DropSign::Silence => "its keepalive probes went unanswered",
                super::plan::DropSign::Reset => "its keepalive probe was answered with a reset",
                super::plan::DropSign::ResetWhileIdle => "a reset arrived while it was idle",
            };
            let _ = writeln!(out, "(the flow idle {} was gone: {how})", secs(dropped));
        }
        Outcome::NoDrop { survived } => {
            let _ = writeln!(
                out,
                "no drop within --max {}: idle flows to {target} were still carried after {}",
                fmt_duration(report.settings.max),
                secs(survived)
            );
        }
        Outcome::ServerCloses { survived, after } => {
            let _ = writeln!(
                out,
                "{target} closes idle connections itself after about {} (a FIN from the server: its own idle timeout, not the path's)",
                secs(after)
            );
            let _ = writeln!(
                out,
                "the path carried idle flows for {} without a drop; beyond the server's timeout it cannot be measured against this server",
                secs(survived)
            );
        }
        Outcome::Unmeasurable { after } => {
            let _ = writeln!(
                out,
                "{target} closes idle connections itself after about {}, before any idle time could be tested",
                secs(after)
            );
        }
    }
    if let (Some(after), Outcome::Dropped { .. }) = (report.knowledge.server_closes, report.outcome)
    {
        let _ = writeln!(
            out,
            "note: {target} also closes idle connections itself after about {}",
            secs(after)
        );
    }
    for c in report.knowledge.contradictions() {
        let _ = writeln!(
            out,
            "warning: a flow idle {} was still answered although a shorter idle time was dropped: the path may not have a fixed idle limit (or a probe was lost); the shorter bound is used",
            secs(c)
        );
    }
    if !report.complete {
        let _ = writeln!(
            out,
            "warning: stopped after {} rounds before the bound was as narrow as --resolution",
            report.rounds.len()
        );
    }

    let _ = writeln!(out);
    let recs = measured_limit(report).map(|l| (l, recommendations(l)));
    let Some((limit, recs)) = recs.filter(|(_, r)| !r.is_empty()) else {
        if !matches!(report.outcome, Outcome::Unmeasurable { .. }) {
            let _ = writeln!(
                out,
                "no keepalive fits below so short a limit: idle 1 s + interval 1 s must be at most {SAFE_PERCENT}% of it, so the limit must be 3 s at least"
            );
        }
        return out;
    };
    let why = match report.outcome {
        Outcome::NoDrop { .. } => "no drop seen up to --max; the real limit, if any, is longer",
        Outcome::ServerCloses { .. } => "the path carried this much; the server closes first",
        _ => "the longest idle time the path carried, rounded down",
    };
    let _ = writeln!(
        out,
        "recommended keepalive for the side of kaproxy whose peers are across this path\n(idle + interval at most {SAFE_PERCENT}% of the limit, {}):",
        fmt_duration(safe_budget(limit))
    );
    let _ = writeln!(
        out,
        "  {:<8} {:<9} {:<7} {:<22} ",
        "idle", "interval", "probes", "dead peer found within"
    );
    for (k, note) in &recs {
        let _ = writeln!(
            out,
            "  {:<8} {:<9} {:<7} {:<22} {note}",
            fmt_duration(k.idle),
            fmt_duration(k.interval),
            k.probes,
            fmt_duration(k.detection_bound().unwrap_or_default()),
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "paste into [route.client] (clients reach kaproxy over this path) or [route.upstream]\n(kaproxy reaches the servers over it):"
    );
    let _ = writeln!(
        out,
        "  path_idle_limit = \"{}s\"   # {why}",
        limit.as_secs()
    );
    let _ = writeln!(out, "  {}", ka_toml(&recs[0].0));
    out
}

fn verdict_json(target: Duration, v: &Verdict) -> Value {
    let (verdict, idle, sign) = match v {
        Verdict::Alive { idle } => ("answered", idle, None),
        Verdict::Dropped { idle, sign } => ("dropped", idle, Some(sign.as_str())),
        Verdict::ServerClosed { idle } => ("server_closed", idle, None),
    };
    json!({
        "planned_idle_s": target.as_secs_f64(),
        "idle_s": ms3(*idle),
        "verdict": verdict,
        "sign": sign,
    })
}

fn ms3(d: Duration) -> f64 {
    d.as_millis() as f64 / 1000.0
}

/// The same for scripts.
pub fn json(report: &Report) -> Value {
    let (result, survived, dropped, sign) = match report.outcome {
        Outcome::Dropped {
            survived,
            dropped,
            sign,
        } => (
            "dropped",
            Some(survived),
            Some(ms3(dropped)),
            Some(sign.as_str()),
        ),
        Outcome::NoDrop { survived } => ("no_drop", Some(survived), None, None),
        Outcome::ServerCloses { survived, .. } => ("server_closes", Some(survived), None, None),
        Outcome::Unmeasurable { .. } => ("unmeasurable", None, None, None),
    };
    let limit = measured_limit(report);
    let recommended: Vec<Value> = limit
        .map(recommendations)
        .unwrap_or_default()
        .iter()
        .map(|(k, note)| {
            json!({
                "idle_s": k.idle.as_secs(),
                "interval_s": k.interval.as_secs(),
                "probes": k.probes,
                "detection_s": k.detection_bound().unwrap_or_default().as_secs(),
                "note": note,
            })
        })
        .collect();
    let rounds: Vec<Value> = report
        .rounds
        .iter()
        .map(|r| {
            json!({
                "round": r.number,
                "took_s": ms3(r.took),
                "connections": r.verdicts.iter().map(|(t, v)| verdict_json(*t, v)).collect::<Vec<_>>(),
                "closed_early_planned_idle_s": r.closed_early.iter().map(|t| t.as_secs_f64()).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({
        "target": report.target,
        "address": report.address.to_string(),
        "max_s": report.settings.max.as_secs_f64(),
        "resolution_s": report.settings.resolution.as_secs_f64(),
        "connections": report.settings.connections,
        "took_s": ms3(report.took),
        "complete": report.complete,
        "result": result,
        "survived_s": survived.map(ms3),
        "dropped_s": dropped,
        "drop_sign": sign,
        "server_closes_after_s": report.knowledge.server_closes.map(ms3),
        "contradictions_s": report.knowledge.contradictions().into_iter().map(ms3).collect::<Vec<_>>(),
        "path_idle_limit": limit.map(|l| format!("{}s", l.as_secs())),
        "recommended": recommended,
        "rounds": rounds,
    })
}

#[cfg(test)]
mod tests {
    use super::super::plan::DropSign;
    use super::*;

    fn report(outcome: Outcome) -> Report {
        Report {
            target: "db:5432".into(),
            address: "192.0.2.7:5432".parse().unwrap(),
            settings: Settings {
                max: Duration::from_secs(1800),
                resolution: Duration::from_secs(5),
                connections: 16,
            },
            rounds: vec![Round {
                number: 1,
                verdicts: vec![
                    (
                        Duration::from_secs(295),
                        Verdict::Alive {
                            idle: Duration::from_millis(294_990),
                        },
                    ),
                    (
                        Duration::from_secs(300),
                        Verdict::Dropped {
                            idle: Duration::from_millis(299_990),
                            sign: DropSign::Silence,
                        },
                    ),
                ],
                closed_early: vec![Duration::from_secs(400)],
                took: Duration::from_secs(304),
            }],
            knowledge: Knowledge::default(),
            outcome,
            complete: true,
            took: Duration::from_secs(900),
        }
    }

    #[test]
    fn a_drop_reads_as_a_bound_with_settings_to_paste() {
        let r = report(Outcome::Dropped {
            survived: Duration::from_millis(295_400),
            dropped: Duration::from_millis(300_100),
            sign: DropSign::Silence,
        });
        let text = human(&r);
        assert!(
            text.contains(
                "idle flows to db:5432 are dropped after more than 295 s and at most 300 s"
            ),
            "{text}"
        );
        assert!(text.contains("path_idle_limit = \"295s\""), "{text}");
        // 90 % of 295 s = 265.5 s: interval 10 s, idle 255 s, found within 285 s.
        assert!(
            text.contains("keepalive = { idle = \"255s\", interval = \"10s\", probes = 3 }"),
            "{text}"
        );
        assert!(text.contains("4m 15s   10s       3       4m 45s"), "{text}");
        assert!(text.contains("kaproxy's default"), "{text}");
        let j = json(&r);
        assert_eq!(j["result"], "dropped");
        assert_eq!(j["survived_s"], 295.4);
        assert_eq!(j["dropped_s"], 300.1);
        assert_eq!(j["path_idle_limit"], "295s");
        assert_eq!(j["recommended"][0]["idle_s"], 255);
        assert_eq!(j["rounds"][0]["connections"][1]["verdict"], "dropped");
        assert_eq!(j["rounds"][0]["connections"][1]["sign"], "silence");
    }

    #[test]
    fn no_drop_and_server_timeouts_say_so() {
        let text = human(&report(Outcome::NoDrop {
            survived: Duration::from_secs(1800),
        }));
        assert!(
            text.contains(
                "no drop within --max 30m: idle flows to db:5432 were still carried after 1800 s"
            ),
            "{text}"
        );
        assert!(
            text.contains("path_idle_limit = \"1800s\"   # no drop seen"),
            "{text}"
        );
        let r = report(Outcome::ServerCloses {
            survived: Duration::from_millis(4_900),
            after: Duration::from_secs(5),
        });
        let text = human(&r);
        assert!(
            text.contains("db:5432 closes idle connections itself after about 5.0 s"),
            "{text}"
        );
        assert!(text.contains("path_idle_limit = \"4s\""), "{text}");
        assert_eq!(json(&r)["result"], "server_closes");
        let tiny = report(Outcome::Dropped {
            survived: Duration::from_millis(2500),
            dropped: Duration::from_secs(3),
            sign: DropSign::Reset,
        });
        let text = human(&tiny);
        assert!(text.contains("answered with a reset"), "{text}");
        assert!(!text.contains("path_idle_limit ="), "{text}");
    }
}
