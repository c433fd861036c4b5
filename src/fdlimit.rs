//! The process's descriptor limit (RLIMIT_NOFILE) against what the routes'
//! `max_connections` may need: two descriptors per pair, the listeners, and
//! a margin for everything else.
//!
//! As nginx and HAProxy do, `kaproxy run` raises the soft limit towards the
//! hard limit when the routes need more (the soft limit is often 1,024 while
//! the hard one is far higher), and warns when even the hard limit is short.

use nix::sys::resource::{getrlimit, setrlimit, Resource, RLIM_INFINITY};

use crate::config::Config;

/// Descriptors besides pairs and route listeners: stdio, each worker's epoll
/// and eventfd, the admin endpoint's listener and its connections (at most
/// 64 at once), health-check sockets, the log file, the resolver.
const BASE_MARGIN: u64 = 128;

/// What the configuration needs, and what the process has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Budget {
    /// Descriptors the routes may use at their limits; `None` when a route is unlimited.
    pub needed: Option<u64>,
    /// Routes without a limit.
    pub unlimited: Vec<String>,
    /// The soft limit now.
    pub soft: u64,
    /// The hard limit (the kernel's fs.nr_open when unlimited).
    pub hard: u64,
}

/// Descriptors `config` needs with `workers` listeners per route.
pub fn budget(config: &Config, workers: usize) -> std::io::Result<Budget> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let hard = if hard == RLIM_INFINITY {
        nr_open()
    } else {
        hard
    };
    let workers = workers as u64;
    let mut pairs = 0u64;
    let mut unlimited = Vec::new();
    let mut servers = 0u64;
    for route in &config.routes {
        match route.max_connections {
            Some(n) => pairs += u64::from(n),
            None => unlimited.push(route.name.clone()),
        }
        if route.upstream.health_check.is_some() {
            servers += route.upstream.servers.len() as u64;
        }
    }
    let listeners = config.routes.len() as u64 * workers;
    let needed = unlimited
        .is_empty()
        .then(|| 2 * pairs + listeners + BASE_MARGIN + 2 * workers + servers);
    Ok(Budget {
        needed,
        unlimited,
        soft: soft.min(hard),
        hard,
    })
}

fn nr_open() -> u64 {
    std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1 << 20)
}

impl Budget {
    /// The soft limit `kaproxy run` sets: what the routes need, at most the
    /// hard limit, never lower than now; the hard limit when a route is unlimited.
    pub fn target(&self) -> u64 {
        match self.needed {
            Some(n) => n.clamp(self.soft, self.hard),
            None => self.hard,
        }
    }

    /// The warning to give, if the hard limit cannot hold every route at its limit.
    pub fn warning(&self) -> Option<String> {
        let needed = self.needed?;
        (self.hard < needed).then(|| {
            format!(
                "the descriptor limit (RLIMIT_NOFILE, hard {}) cannot hold every route at its max_connections: that takes {needed} descriptors (2 per pair, the listeners and a margin); past the limit accepts fail with EMFILE on every route. Raise the limit to at least {needed}: `ulimit -n {needed}` in the shell that starts kaproxy, LimitNOFILE={needed} in its systemd unit, `docker run --ulimit nofile={needed}:{needed}` (or compose `ulimits: nofile: {needed}`); or lower max_connections",
                self.hard
            )
        })
    }

    /// One line for `kaproxy check`.
    pub fn describe(&self) -> String {
        let need = match self.needed {
            Some(n) => format!("{n} needed at max_connections"),
            None => format!(
                "no bound (max_connections = 0 on {})",
                self.unlimited.join(", ")
            ),
        };
        let action = if self.target() > self.soft {
            format!("; kaproxy run raises the soft limit to {}", self.target())
        } else {
            String::new()
        };
        format!(
            "descriptors        = {need}; limit soft {} hard {}{action}",
            self.soft, self.hard
        )
    }
}

/// Raises the soft limit to [`Budget::target`]; returns the limit now in force.
pub fn raise(budget: &Budget) -> std::io::Result<u64> {
    let target = budget.target();
    if target <= budget.soft {
        return Ok(budget.soft);
    }
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    setrlimit(Resource::RLIMIT_NOFILE, target, hard)?;
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget_of(needed: Option<u64>, soft: u64, hard: u64) -> Budget {
        Budget {
            needed,
            unlimited: if needed.is_none() {
                vec!["r".to_string()]
            } else {
                vec![]
            },
            soft,
            hard,
        }
    }

    #[test]
    fn the_soft_limit_is_raised_to_what_is_needed_up_to_the_hard_limit() {
        assert_eq!(budget_of(Some(5_000), 1_024, 524_288).target(), 5_000);
        assert_eq!(budget_of(Some(5_000), 8_000, 524_288).target(), 8_000);
        assert_eq!(budget_of(Some(900_000), 1_024, 524_288).target(), 524_288);
        assert_eq!(budget_of(None, 1_024, 524_288).target(), 524_288);
    }

    #[test]
    fn a_short_hard_limit_is_warned_about_with_the_number_to_set() {
        assert_eq!(budget_of(Some(5_000), 1_024, 524_288).warning(), None);
        assert_eq!(budget_of(None, 1_024, 2_048).warning(), None);
        let w = budget_of(Some(20_186), 1_024, 20_000).warning().unwrap();
        for part in [
            "hard 20000",
            "ulimit -n 20186",
            "LimitNOFILE=20186",
            "--ulimit nofile=20186:20186",
        ] {
            assert!(w.contains(part), "{part}: {w}");
        }
    }

    #[test]
    fn the_budget_counts_two_per_pair_listeners_and_margin() {
        let cfg = Config::from_toml(
            "t",
            "[[route]]\nname = \"a\"\nlisten = \"127.0.0.1:0\"\nmax_connections = 100\n[route.upstream]\nservers = [\"x:1\"]\n[[route]]\nname = \"b\"\nlisten = \"127.0.0.1:0\"\nmax_connections = 50\n[route.upstream]\nservers = [\"x:1\"]\n",
        )
        .unwrap();
        let b = budget(&cfg, 4).unwrap();
        assert_eq!(b.needed, Some(2 * 150 + 2 * 4 + BASE_MARGIN + 2 * 4));
        assert!(b.describe().contains("needed at max_connections"));
    }
}
