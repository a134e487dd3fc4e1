//! Load balancing: round robin, and power of two choices over a peak-EWMA latency estimate.
//!
//! Peak-EWMA is linkerd2-proxy's algorithm (via tower's `PeakEwma`): each endpoint keeps an
//! exponentially weighted moving average of its response latency that jumps up at once to any
//! slower observation (the "peak") and decays slowly otherwise, also towards zero while the
//! endpoint sees no traffic so a once-slow endpoint is probed again. The cost of an endpoint is
//! `estimate × (pending + 1)`; P2C draws two distinct healthy endpoints at random and takes the
//! cheaper one, which avoids the herd behaviour of always picking the global minimum.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;

use crate::config::BalanceAlgorithm;

/// Latency and in-flight load of one endpoint.
#[derive(Debug)]
pub struct Load {
    pending: AtomicUsize,
    ewma: Mutex<Ewma>,
    decay_ns: f64,
}

/// A duration in nanoseconds, as a float: from its two parts (`as_nanos() as f64` went through
/// a 128-bit integer, ~45 instructions to convert).
fn nanos(d: Duration) -> f64 {
    d.as_secs() as f64 * 1e9 + f64::from(d.subsec_nanos())
}

#[derive(Debug)]
struct Ewma {
    rtt_ns: f64,
    updated: Instant,
}

impl Ewma {
    /// Folds one observation in. A slower observation replaces the estimate (the peak);
    /// a faster one is blended in with a weight that grows with the time since the last update.
    fn update(&mut self, now: Instant, rtt_ns: f64, decay_ns: f64) -> f64 {
        if rtt_ns > self.rtt_ns {
            self.rtt_ns = rtt_ns;
        } else {
            let elapsed = nanos(now.saturating_duration_since(self.updated));
            let decay = (-elapsed / decay_ns).exp();
            self.rtt_ns = self.rtt_ns * decay + rtt_ns * (1.0 - decay);
        }
        self.updated = now;
        self.rtt_ns
    }
}

impl Load {
    /// A fresh endpoint, assumed to answer in `default_rtt`.
    pub fn new(default_rtt: Duration, decay: Duration) -> Load {
        Load {
            pending: AtomicUsize::new(0),
            ewma: Mutex::new(Ewma {
                rtt_ns: default_rtt.as_nanos() as f64,
                updated: Instant::now(),
            }),
            decay_ns: decay.as_nanos().max(1) as f64,
        }
    }

    /// The P2C cost: decayed estimate × (pending + 1).
    pub fn cost(&self, now: Instant) -> f64 {
        let pending = self.pending.load(Ordering::Relaxed) as f64;
        // Observing 0 at `now` decays the estimate towards zero over idle time (tower's
        // `RttEstimate::decay`): a slow endpoint that got no traffic is tried again eventually.
        let est = self
            .ewma
            .lock()
            .expect("ewma lock")
            .update(now, 0.0, self.decay_ns);
        est * (pending + 1.0)
    }

    /// Records a response latency.
    pub fn observe(&self, rtt: Duration) {
        self.observe_at(Instant::now(), rtt);
    }

    /// Records a response latency measured up to `now` (a clock read the caller has).
    pub fn observe_at(&self, now: Instant, rtt: Duration) {
        self.ewma
            .lock()
            .expect("ewma lock")
            .update(now, nanos(rtt), self.decay_ns);
    }

    /// Marks a request in flight until the returned guard drops.
    pub fn start(self: &Arc<Self>) -> PendingGuard {
        self.pending.fetch_add(1, Ordering::Relaxed);
        PendingGuard(self.clone())
    }

    /// The latency estimate at `now` (decayed over the time since the last observation),
    /// without folding anything in: what the admin API shows.
    pub fn estimate(&self, now: Instant) -> Duration {
        let e = self.ewma.lock().expect("ewma lock");
        let elapsed = nanos(now.saturating_duration_since(e.updated));
        Duration::from_nanos((e.rtt_ns * (-elapsed / self.decay_ns).exp()) as u64)
    }

    /// Requests in flight now.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }
}

/// Keeps a request counted as pending on its endpoint until dropped.
#[derive(Debug)]
pub struct PendingGuard(Arc<Load>);

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A cluster's balancer.
#[derive(Debug)]
pub enum Balancer {
    /// Each candidate in turn.
    RoundRobin(AtomicUsize),
    /// P2C over peak-EWMA cost.
    PeakEwma,
}

impl Balancer {
    /// The balancer for an algorithm.
    pub fn new(alg: BalanceAlgorithm) -> Balancer {
        match alg {
            BalanceAlgorithm::RoundRobin => Balancer::RoundRobin(AtomicUsize::new(0)),
            BalanceAlgorithm::PeakEwma => Balancer::PeakEwma,
        }
    }

    /// Picks among `n` candidates, of which `usable(i)` says which may be chosen;
    /// `load(i)` gives a candidate's load. Returns the chosen index.
    pub fn pick<'a>(
        &self,
        n: usize,
        usable: impl Fn(usize) -> bool,
        load: impl Fn(usize) -> &'a Load,
    ) -> Option<usize> {
        match self {
            Balancer::RoundRobin(next) => {
                let start = next.fetch_add(1, Ordering::Relaxed);
                (0..n).map(|k| (start + k) % n).find(|&i| usable(i))
            }
            Balancer::PeakEwma => {
                // The usable candidates, asked once each (on the stack for up to 16): asked
                // again, an endpoint another request ejected meanwhile left a drawn position
                // empty, and the request got 503 with healthy endpoints left.
                if n == 1 {
                    return usable(0).then_some(0);
                }
                let usable: smallvec::SmallVec<[usize; 16]> = (0..n).filter(|&i| usable(i)).collect();
                match usable.len() {
                    0 => None,
                    1 => Some(usable[0]),
                    count => {
                        let mut rng = rand::thread_rng();
                        let a = rng.gen_range(0..count);
                        let mut b = rng.gen_range(0..count - 1);
                        if b >= a {
                            b += 1;
                        }
                        let (a, b) = (usable[a], usable[b]);
                        let now = Instant::now();
                        if load(a).cost(now) <= load(b).cost(now) {
                            Some(a)
                        } else {
                            Some(b)
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loads(rtts_ms: &[u64]) -> Vec<Arc<Load>> {
        rtts_ms
            .iter()
            .map(|&ms| {
                let l = Arc::new(Load::new(Duration::from_millis(1), Duration::from_secs(10)));
                l.observe(Duration::from_millis(ms));
                l
            })
            .collect()
    }

    #[test]
    fn peak_ewma_asks_each_endpoint_once_so_an_ejection_meanwhile_cannot_void_the_pick() {
        // Another request ejects endpoints while this one picks: each later question about
        // an endpoint says "not usable".
        let loads = loads(&[5, 5, 5]);
        let b = Balancer::PeakEwma;
        for _ in 0..50 {
            let asked = std::cell::Cell::new(0);
            let usable = |_: usize| {
                asked.set(asked.get() + 1);
                asked.get() <= 3
            };
            assert!(b.pick(3, usable, |i| &loads[i]).is_some());
            assert_eq!(asked.get(), 3);
        }
    }

    #[test]
    fn round_robin_cycles_and_skips_unusable() {
        let l = loads(&[1, 1, 1]);
        let b = Balancer::new(BalanceAlgorithm::RoundRobin);
        let picks: Vec<_> = (0..6)
            .map(|_| b.pick(3, |i| i != 1, |i| &l[i]).unwrap())
            .collect();
        assert!(!picks.contains(&1));
        assert!(picks.contains(&0) && picks.contains(&2));
    }

    #[test]
    fn peak_ewma_avoids_the_slow_endpoint() {
        let l = loads(&[1, 1, 50]);
        let b = Balancer::new(BalanceAlgorithm::PeakEwma);
        let slow = (0..1000)
            .filter(|_| b.pick(3, |_| true, |i| &l[i]) == Some(2))
            .count();
        assert_eq!(slow, 0, "the slow endpoint is never the cheaper of a pair");
    }

    #[test]
    fn pending_requests_raise_the_cost() {
        let l = loads(&[10, 10]);
        let _g: Vec<_> = (0..5).map(|_| l[0].start()).collect();
        let b = Balancer::new(BalanceAlgorithm::PeakEwma);
        assert_eq!(b.pick(2, |_| true, |i| &l[i]), Some(1));
    }

    #[test]
    fn peak_jumps_up_and_decays_down() {
        let mut e = Ewma {
            rtt_ns: 1e6,
            updated: Instant::now(),
        };
        let t = e.updated;
        assert_eq!(e.update(t, 5e6, 1e9), 5e6);
        let later = t + Duration::from_secs(5);
        let v = e.update(later, 1e6, 1e9);
        assert!(v < 1.1e6, "after 5 decay constants the spike is forgotten: {v}");
    }

    #[test]
    fn nothing_usable_is_none() {
        let l = loads(&[1]);
        for alg in [BalanceAlgorithm::RoundRobin, BalanceAlgorithm::PeakEwma] {
            assert_eq!(Balancer::new(alg).pick(1, |_| false, |i| &l[i]), None);
        }
    }
}
