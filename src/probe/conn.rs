//! One probe connection: stay idle until its planned time, then arm one
//! keepalive probe and judge from TCP_INFO and the socket's error whether the
//! path still carries the flow. No application data is ever sent.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::{sleep_until, Instant};

use super::plan::{DropSign, Verdict, MIN_IDLE};
use crate::net::sockopt;

/// Gap between the repeats of an unanswered probe.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// Probes sent before the flow counts as dropped: the first, and two repeats
/// a second apart only while it goes unanswered, so one lost packet is not
/// taken for a drop. An answer to any of them proves the flow survived the
/// planned idle time, since it was at least that idle when the first went out.
pub const PROBE_COUNT: u32 = 3;

/// How long a verdict can take after the probe is armed: the kernel reports
/// ETIMEDOUT after `PROBE_COUNT` unanswered probes; the rest is slack for a
/// loaded machine before silence is concluded without it.
pub const VERDICT_WAIT: Duration = Duration::from_secs(PROBE_COUNT as u64 + 2);

/// How often TCP_INFO is read while waiting for the answer.
const POLL: Duration = Duration::from_millis(50);

/// An answer restarts the peer's ACK age from about zero, while silence lets
/// it go on growing from the idle time (a second at least, `MIN_IDLE`). Any
/// drop of the age by more than this against silence is an answer; timer
/// granularity (a few ms) stays far below it.
const ANSWER_MARGIN: Duration = Duration::from_millis(250);

/// Bound on one connect.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a connection could not give a verdict.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// The server sent data this long before the planned idle time was up,
    /// less than [`MIN_IDLE`], so the flow was never idle long enough.
    #[error(
        "the server sent data {0:?} before the probe was due, so its connections do not stay idle"
    )]
    ServerTalks(Duration),
    /// A socket call failed in a way that says nothing about the path.
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Connects within [`CONNECT_TIMEOUT`].
pub async fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer within {CONNECT_TIMEOUT:?}"),
        )),
    }
}

/// Leaves `stream` idle until `target` after `opened`, then probes it.
pub async fn watch(
    mut stream: TcpStream,
    opened: Instant,
    target: Duration,
) -> Result<Verdict, ConnError> {
    // Banners (SSH, SMTP, databases) arrive at once and are thrown away; the
    // idle time that counts is measured by the kernel when the probe is armed.
    let mut buf = [0u8; 4096];
    let mut last_heard = opened;
    let due = opened + target;
    loop {
        tokio::select! {
            // A FIN that is already there wins over a timer due at the same moment.
            biased;
            r = stream.read(&mut buf) => match r {
                Ok(0) => return Ok(Verdict::ServerClosed { idle: last_heard.elapsed() }),
                Ok(_) => last_heard = Instant::now(),
                Err(e) if is_reset(&e) => {
                    return Ok(Verdict::Dropped {
                        idle: last_heard.elapsed(),
                        sign: DropSign::ResetWhileIdle,
                    })
                }
                Err(e) => return Err(e.into()),
            },
            _ = sleep_until(due) => break,
        }
    }

    let before = sockopt::peer_activity(&stream)?;
    // The server's FIN may have come just before the probe was due, after the
    // read above last looked: its own timeout, not talk that spoils the flow.
    if before.peer_closed {
        return Ok(Verdict::ServerClosed {
            idle: last_heard.elapsed().saturating_sub(before.since_last_ack),
        });
    }
    let idle = before.idle();
    if idle < MIN_IDLE {
        return Err(ConnError::ServerTalks(idle));
    }
    sockopt::arm_keepalive_probe(&stream, PROBE_INTERVAL, PROBE_COUNT)?;
    let armed = Instant::now();
    let deadline = armed + VERDICT_WAIT;
    let mut poll = tokio::time::interval(POLL);
    loop {
        tokio::select! {
            r = stream.read(&mut buf) => match r {
                // Whatever came, it came through the path: the flow is alive.
                // A FIN now is still the server's own timeout, not the path's.
                Ok(0) => return Ok(Verdict::ServerClosed { idle }),
                Ok(_) => return Ok(Verdict::Alive { idle }),
                Err(e) if is_reset(&e) => {
                    return Ok(Verdict::Dropped { idle, sign: DropSign::Reset })
                }
                Err(e) if is_silence(&e) => {
                    return Ok(Verdict::Dropped { idle, sign: DropSign::Silence })
                }
                Err(e) => return Err(e.into()),
            },
            _ = poll.tick() => {
                let now = sockopt::peer_activity(&stream)?;
                let if_silent = before.since_last_ack + armed.elapsed();
                if now.since_last_ack + ANSWER_MARGIN < if_silent {
                    return Ok(Verdict::Alive { idle });
                }
                if Instant::now() >= deadline {
                    return Ok(Verdict::Dropped { idle, sign: DropSign::Silence });
                }
            }
        }
    }
}

fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted
    )
}

/// Keepalive gave up (ETIMEDOUT), or a router said the peer cannot be reached.
fn is_silence(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::TimedOut
            | io::ErrorKind::HostUnreachable
            | io::ErrorKind::NetworkUnreachable
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    #[tokio::test]
    async fn a_live_peer_answers_the_probe_at_the_planned_idle_time() {
        let (c, _server) = pair().await;
        let t0 = Instant::now();
        let v = watch(c, t0, Duration::from_millis(1200)).await.unwrap();
        let Verdict::Alive { idle } = v else {
            panic!("{v:?}")
        };
        // The kernel's idle time: since the handshake, a moment before t0.
        assert!(
            idle >= Duration::from_millis(1150) && idle < Duration::from_millis(1400),
            "{idle:?}"
        );
        // An answer on loopback comes at once, long before silence is concluded.
        assert!(
            t0.elapsed() < Duration::from_millis(1200) + PROBE_INTERVAL,
            "{:?}",
            t0.elapsed()
        );
    }

    #[tokio::test]
    async fn a_fin_before_the_time_is_the_servers_own_timeout() {
        let (c, server) = pair().await;
        let t0 = Instant::now();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            drop(server);
        });
        let v = watch(c, t0, Duration::from_secs(5)).await.unwrap();
        let Verdict::ServerClosed { idle } = v else {
            panic!("{v:?}")
        };
        assert!(
            idle >= Duration::from_millis(300) && idle < Duration::from_secs(2),
            "{idle:?}"
        );
    }

    #[tokio::test]
    async fn a_reset_while_idle_is_a_drop() {
        let (c, server) = pair().await;
        let t0 = Instant::now();
        sockopt::reset_on_close(&server).unwrap();
        drop(server);
        let v = watch(c, t0, Duration::from_secs(5)).await.unwrap();
        assert!(
            matches!(
                v,
                Verdict::Dropped {
                    sign: DropSign::ResetWhileIdle,
                    ..
                }
            ),
            "{v:?}"
        );
    }

    #[tokio::test]
    async fn a_server_that_keeps_sending_cannot_be_probed() {
        let (c, mut server) = pair().await;
        let t0 = Instant::now();
        tokio::spawn(async move {
            for _ in 0..20 {
                if server.write_all(b"heartbeat").await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        let e = watch(c, t0, Duration::from_secs(1)).await.unwrap_err();
        assert!(
            matches!(e, ConnError::ServerTalks(d) if d < MIN_IDLE),
            "{e:?}"
        );
    }
}
