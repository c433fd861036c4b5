//! `kaproxy probe HOST:PORT`: measures after how much idle time the network
//! path to a server drops a TCP flow, and says what keepalive to set.
//!
//! - [`plan`]: the bisection, pure: which idle times each round tests and what
//!   the verdicts mean.
//! - [`conn`]: one connection: idle until its time, one keepalive probe, a
//!   verdict from TCP_INFO and the socket's error.
//! - [`report`]: progress while waiting, the result for people and as JSON.
//!
//! This module runs the rounds: it opens a round's connections at once, waits
//! for their verdicts and closes the ones that have nothing left to tell.

pub mod conn;
pub mod plan;
pub mod report;

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::config::ServerAddr;
use conn::{ConnError, CONNECT_TIMEOUT, VERDICT_WAIT};
use plan::{round_finished, Knowledge, Outcome, Settings, Verdict, MAX_ROUNDS};
use report::{Progress, Report, Round};

/// Most connections a round may open: enough to finish most paths in two or
/// three rounds, few enough for servers that limit connections per client.
pub const MAX_CONNECTIONS: usize = 256;

/// Why the probe could not measure anything.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// HOST did not resolve.
    #[error("cannot resolve {target}: {source}")]
    Resolve {
        /// HOST:PORT as given.
        target: String,
        /// The resolver's answer.
        source: io::Error,
    },
    /// The first connect failed.
    #[error("cannot connect to {target}{}: {source}; {hint}", via(target, address))]
    Connect {
        /// HOST:PORT as given.
        target: String,
        /// The address tried.
        address: SocketAddr,
        /// What happened.
        source: io::Error,
        /// What to check.
        hint: &'static str,
    },
    /// A later connect of a round failed.
    #[error("connection {index} of {count} to {target}{} failed: {source}; the server may limit connections per client: try a smaller --connections", via(target, address))]
    TooMany {
        /// HOST:PORT as given.
        target: String,
        /// The address tried.
        address: SocketAddr,
        /// 1-based index within the round.
        index: usize,
        /// Connections of the round.
        count: usize,
        /// What happened.
        source: io::Error,
    },
    /// The server closes idle connections before the first idle time tested.
    #[error("{target} closed idle connections itself after about {}, before the shortest idle time that could be tested; it does not keep idle connections open long enough to measure the path: probe another service reached over the same path, or one with a longer idle timeout", report::secs(*after))]
    ServerClosesFirst {
        /// HOST:PORT as given.
        target: String,
        /// Idle time when the first FIN came.
        after: Duration,
    },
    /// A connection failed in a way that says nothing about the path.
    #[error("a probe connection to {target} failed: {source}")]
    Conn {
        /// HOST:PORT as given.
        target: String,
        /// What happened.
        source: ConnError,
    },
}

/// " (ADDRESS)" when HOST was a name.
fn via(target: &str, address: &SocketAddr) -> String {
    if address.to_string() == target {
        String::new()
    } else {
        format!(" ({address})")
    }
}

/// Resolves `server` and measures the path to its first address.
pub async fn run(
    server: &ServerAddr,
    settings: Settings,
    progress: &mut dyn Progress,
) -> Result<Report, ProbeError> {
    let target = server.to_string();
    let address = resolve(server, &target).await?;
    let started = Instant::now();
    let mut knowledge = Knowledge::default();
    let mut rounds = Vec::new();
    let mut complete = true;
    while let Some(targets) = knowledge.next_targets(&settings) {
        if rounds.len() == MAX_ROUNDS {
            complete = false;
            break;
        }
        let number = rounds.len() + 1;
        let round = run_round(
            &target,
            address,
            number,
            &targets,
            &settings,
            &mut knowledge,
            progress,
        )
        .await?;
        progress.round_finished(&round, &knowledge);
        rounds.push(round);
    }
    let outcome = knowledge.final_outcome();
    if let Outcome::Unmeasurable { after } = outcome {
        return Err(ProbeError::ServerClosesFirst { target, after });
    }
    Ok(Report {
        target,
        address,
        settings,
        rounds,
        knowledge,
        outcome,
        complete,
        took: started.elapsed(),
    })
}

async fn resolve(server: &ServerAddr, target: &str) -> Result<SocketAddr, ProbeError> {
    let lookup = tokio::net::lookup_host((server.host.as_str(), server.port));
    let found = match tokio::time::timeout(CONNECT_TIMEOUT, lookup).await {
        Ok(r) => r.map(|mut addrs| addrs.next()),
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer within {CONNECT_TIMEOUT:?}"),
        )),
    };
    match found {
        Ok(Some(a)) => Ok(a),
        Ok(None) => Err(ProbeError::Resolve {
            target: target.to_string(),
            source: io::Error::new(io::ErrorKind::NotFound, "no address"),
        }),
        Err(source) => Err(ProbeError::Resolve {
            target: target.to_string(),
            source,
        }),
    }
}

async fn run_round(
    target: &str,
    address: SocketAddr,
    number: usize,
    targets: &[Duration],
    settings: &Settings,
    knowledge: &mut Knowledge,
    progress: &mut dyn Progress,
) -> Result<Round, ProbeError> {
    // All at once, so that every connection's idle time starts together and
    // the round lasts as long as its longest idle time, not their sum.
    let connects: Vec<_> = targets
        .iter()
        .map(|_| tokio::spawn(conn::connect(address)))
        .collect();
    let mut streams = Vec::with_capacity(connects.len());
    for (i, handle) in connects.into_iter().enumerate() {
        let r = handle
            .await
            .unwrap_or_else(|e| Err(io::Error::other(e.to_string())));
        match r {
            Ok(s) => streams.push(s),
            Err(source) if number == 1 && i == 0 => {
                let hint = match source.kind() {
                    io::ErrorKind::ConnectionRefused => {
                        "nothing listens there, or a firewall rejects the connection"
                    }
                    io::ErrorKind::TimedOut => {
                        "the SYN went unanswered: a firewall may drop it, or the host is down"
                    }
                    _ => "check the address and the route to it",
                };
                return Err(ProbeError::Connect {
                    target: target.to_string(),
                    address,
                    source,
                    hint,
                });
            }
            Err(source) => {
                return Err(ProbeError::TooMany {
                    target: target.to_string(),
                    address,
                    index: i + 1,
                    count: targets.len(),
                    source,
                })
            }
        }
    }
    let opened = Instant::now();
    let longest = targets.last().copied().unwrap_or_default() + VERDICT_WAIT;
    progress.round_started(number, targets, longest);

    let mut set = JoinSet::new();
    for (stream, &t) in streams.into_iter().zip(targets) {
        set.spawn(async move { (t, conn::watch(stream, opened, t).await) });
    }
    let mut pending: Vec<Duration> = targets.to_vec();
    let mut round = Round {
        number,
        verdicts: Vec::new(),
        closed_early: Vec::new(),
        took: Duration::ZERO,
    };
    let (mut alive, mut dropped) = (0, 0);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    // Every connection ends by itself within its idle time plus VERDICT_WAIT;
    // this is the bound on the round should the kernel never report.
    let deadline = opened + longest + Duration::from_secs(5);
    while !round_finished(knowledge, settings, &pending) {
        tokio::select! {
            joined = set.join_next() => {
                let Some(joined) = joined else { break };
                let (t, verdict) = match joined {
                    Ok(v) => v,
                    Err(e) => return Err(ProbeError::Conn {
                        target: target.to_string(),
                        source: ConnError::Io(io::Error::other(e.to_string())),
                    }),
                };
                let verdict = verdict.map_err(|source| ProbeError::Conn {
                    target: target.to_string(),
                    source,
                })?;
                if let Some(i) = pending.iter().position(|p| *p == t) {
                    pending.swap_remove(i);
                }
                match verdict {
                    Verdict::Alive { .. } => alive += 1,
                    Verdict::Dropped { .. } => dropped += 1,
                    Verdict::ServerClosed { .. } => {}
                }
                knowledge.record(settings, t, verdict);
                round.verdicts.push((t, verdict));
            }
            _ = tick.tick() => progress.tick(opened.elapsed(), longest, alive, dropped),
            _ = tokio::time::sleep_until(deadline) => break,
        }
    }
    // Whatever is left was planned past a known drop: dropping the tasks
    // closes their sockets.
    set.abort_all();
    pending.sort();
    round.closed_early = pending;
    round.verdicts.sort_by_key(|(t, _)| *t);
    round.took = opened.elapsed();
    Ok(round)
}
