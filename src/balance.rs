//! Choosing servers: the order in which a new connection tries a route's
//! servers. Pure functions over a snapshot, so every mode is unit-tested.

use crate::config::Balance;

/// A server that may be tried now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// Index in the route's server list.
    pub index: usize,
    /// Configured weight, at least 1.
    pub weight: u32,
    /// Pairs currently open to it.
    pub active: usize,
}

/// Mutable balancing state of one route.
#[derive(Debug, Clone)]
pub struct BalanceState {
    /// Smooth weighted round-robin "current weight" per server index.
    current: Vec<i64>,
    /// xorshift64* state for weighted random.
    rng: u64,
}

impl BalanceState {
    /// State for `servers` servers; `seed` must be non-zero for random to be random.
    pub fn new(servers: usize, seed: u64) -> BalanceState {
        BalanceState {
            current: vec![0; servers],
            rng: seed | 1,
        }
    }

    fn next_random(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// The indices of `candidates` (given in list order) in the order to try them:
/// the balance mode's pick first, then the others as fallbacks.
pub fn order(mode: Balance, candidates: &[Candidate], state: &mut BalanceState) -> Vec<usize> {
    if candidates.is_empty() {
        return Vec::new();
    }
    match mode {
        Balance::First => candidates.iter().map(|c| c.index).collect(),
        Balance::RoundRobin => {
            let pick = smooth_weighted(candidates, state);
            rotate_after(candidates, pick)
        }
        Balance::Random => {
            let total: u64 = candidates.iter().map(|c| u64::from(c.weight)).sum();
            let mut r = state.next_random() % total;
            let mut pick = candidates[0].index;
            for c in candidates {
                if r < u64::from(c.weight) {
                    pick = c.index;
                    break;
                }
                r -= u64::from(c.weight);
            }
            rotate_after(candidates, pick)
        }
        Balance::LeastConnections => {
            // Compare active/weight without division: a.active * b.weight vs b.active * a.weight.
            let load = |c: &Candidate| (c.active as u128, u128::from(c.weight));
            let least = candidates
                .iter()
                .min_by(|a, b| {
                    let ((aa, aw), (ba, bw)) = (load(a), load(b));
                    (aa * bw).cmp(&(ba * aw))
                })
                .copied()
                .unwrap_or(candidates[0]);
            let ties: Vec<Candidate> = candidates
                .iter()
                .filter(|c| {
                    let ((ca, cw), (la, lw)) = (load(c), load(&least));
                    ca * lw == la * cw
                })
                .copied()
                .collect();
            // Among equally loaded servers, spread by weight instead of always the first.
            let pick = smooth_weighted(&ties, state);
            let mut rest: Vec<Candidate> = candidates
                .iter()
                .filter(|c| c.index != pick)
                .copied()
                .collect();
            rest.sort_by(|a, b| {
                let ((aa, aw), (ba, bw)) = (load(a), load(b));
                (aa * bw).cmp(&(ba * aw))
            });
            std::iter::once(pick)
                .chain(rest.iter().map(|c| c.index))
                .collect()
        }
    }
}

/// nginx's smooth weighted round-robin: every candidate gains its weight, the
/// largest is picked and pays back the total. Weights 5,1,1 give a,a,b,a,c,a,a.
fn smooth_weighted(candidates: &[Candidate], state: &mut BalanceState) -> usize {
    let total: i64 = candidates.iter().map(|c| i64::from(c.weight)).sum();
    let mut best = candidates[0].index;
    let mut best_value = i64::MIN;
    for c in candidates {
        if c.index >= state.current.len() {
            state.current.resize(c.index + 1, 0);
        }
        state.current[c.index] += i64::from(c.weight);
        if state.current[c.index] > best_value {
            best_value = state.current[c.index];
            best = c.index;
        }
    }
    state.current[best] -= total;
    best
}

/// `pick` first, then the other candidates in list order starting after it.
fn rotate_after(candidates: &[Candidate], pick: usize) -> Vec<usize> {
    let pos = candidates.iter().position(|c| c.index == pick).unwrap_or(0);
    candidates[pos..]
        .iter()
        .chain(&candidates[..pos])
        .map(|c| c.index)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cands(weights: &[u32]) -> Vec<Candidate> {
        weights
            .iter()
            .enumerate()
            .map(|(index, &weight)| Candidate {
                index,
                weight,
                active: 0,
            })
            .collect()
    }

    fn firsts(mode: Balance, c: &[Candidate], n: usize) -> Vec<usize> {
        let mut st = BalanceState::new(c.len(), 42);
        (0..n).map(|_| order(mode, c, &mut st)[0]).collect()
    }

    #[test]
    fn round_robin_is_even_and_weighted_smoothly() {
        assert_eq!(
            firsts(Balance::RoundRobin, &cands(&[1, 1, 1]), 6),
            vec![0, 1, 2, 0, 1, 2]
        );
        assert_eq!(
            firsts(Balance::RoundRobin, &cands(&[5, 1, 1]), 7),
            vec![0, 0, 1, 0, 2, 0, 0]
        );
        let picks = firsts(Balance::RoundRobin, &cands(&[1, 3]), 400);
        assert_eq!(picks.iter().filter(|&&i| i == 1).count(), 300);
    }

    #[test]
    fn every_order_tries_each_candidate_once() {
        let c = cands(&[1, 2, 3, 1]);
        for mode in [
            Balance::RoundRobin,
            Balance::LeastConnections,
            Balance::Random,
            Balance::First,
        ] {
            let mut st = BalanceState::new(4, 7);
            for _ in 0..20 {
                let mut o = order(mode, &c, &mut st);
                o.sort_unstable();
                assert_eq!(o, vec![0, 1, 2, 3], "{mode:?}");
            }
        }
    }

    #[test]
    fn first_always_prefers_list_order() {
        let c = vec![
            Candidate {
                index: 2,
                weight: 1,
                active: 9,
            },
            Candidate {
                index: 5,
                weight: 1,
                active: 0,
            },
        ];
        assert_eq!(firsts(Balance::First, &c, 3), vec![2, 2, 2]);
        assert_eq!(
            order(Balance::First, &c, &mut BalanceState::new(6, 1)),
            vec![2, 5]
        );
    }

    #[test]
    fn least_connections_uses_load_per_weight() {
        let c = vec![
            Candidate {
                index: 0,
                weight: 1,
                active: 3,
            },
            Candidate {
                index: 1,
                weight: 4,
                active: 8,
            },
            Candidate {
                index: 2,
                weight: 1,
                active: 1,
            },
        ];
        // Loads 3, 2, 1: the least loaded first, then by load.
        assert_eq!(
            order(Balance::LeastConnections, &c, &mut BalanceState::new(3, 1)),
            vec![2, 1, 0]
        );
        // Ties are spread rather than always going to the first.
        let even = cands(&[1, 1]);
        assert_eq!(
            firsts(Balance::LeastConnections, &even, 4),
            vec![0, 1, 0, 1]
        );
    }

    #[test]
    fn random_follows_weights() {
        let picks = firsts(Balance::Random, &cands(&[1, 9]), 10_000);
        let heavy = picks.iter().filter(|&&i| i == 1).count();
        assert!(
            (8_700..=9_300).contains(&heavy),
            "weight 9 of 10 got {heavy} of 10000"
        );
    }
}
