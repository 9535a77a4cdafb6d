//! A peer's health and its allowance: how many of its workers may hold a
//! connection now. Workers report what happens; the balancer sets the
//! allowance of healthy peers.
//!
//! ```text
//!   healthy ── 3 connection failures in a row, or 10 transient replies ──► unhealthy
//!      ▲                                                                    │
//!      └──────────── the first transaction the peer answers ────────────────┘
//! ```
//!
//! An unhealthy peer keeps one probing connection: worker 0 tries again
//! after `probe_min`, doubling to `probe_max` while the probes fail, and
//! everything else stays queued. On recovery the allowance starts at one
//! and the balancer grows it step by step (slow start).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;

/// Consecutive connection-level failures that make a peer unhealthy.
const CONNECTION_FAILURES: u32 = 3;
/// Consecutive transient (4xx) transactions that make a peer unhealthy.
const TRANSIENT_STREAK: u32 = 10;

#[derive(Debug)]
struct Health {
    healthy: bool,
    connection_failures: u32,
    transient_streak: u32,
    probe_backoff: Duration,
    next_probe: Instant,
    recovering: bool,
}

/// Health and allowance of one peer.
#[derive(Debug)]
pub struct Control {
    allowance: AtomicUsize,
    /// An operator's hold: the peer keeps its queue and sends nothing.
    held: std::sync::atomic::AtomicBool,
    /// Removed from the configuration by a reload.
    removed: std::sync::atomic::AtomicBool,
    /// Our TLS or AUTH settings and the peer's do not agree.
    misconfigured: std::sync::atomic::AtomicBool,
    health: Mutex<Health>,
    probe_min: Duration,
    probe_max: Duration,
    /// One per worker: told when the allowance changes, so that parked
    /// and idle workers wait for that instead of polling it.
    wakers: Mutex<Vec<Sender<()>>>,
}

/// What a report changed, for the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// Nothing worth a log line.
    None,
    /// The peer just became unhealthy.
    Failed,
    /// The peer just recovered.
    Recovered,
}

impl Control {
    /// A healthy peer starting with `allowance` workers.
    pub fn new(allowance: usize, probe_min: Duration, probe_max: Duration) -> Control {
        Control {
            allowance: AtomicUsize::new(allowance),
            held: std::sync::atomic::AtomicBool::new(false),
            removed: std::sync::atomic::AtomicBool::new(false),
            misconfigured: std::sync::atomic::AtomicBool::new(false),
            health: Mutex::new(Health {
                healthy: true,
                connection_failures: 0,
                transient_streak: 0,
                probe_backoff: probe_min,
                next_probe: Instant::now(),
                recovering: false,
            }),
            probe_min,
            probe_max,
            wakers: Mutex::new(Vec::new()),
        }
    }

    /// A wake-up for one worker: it gets a message whenever the
    /// allowance changes.
    pub fn waker(&self) -> Receiver<()> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.wakers.lock().push(tx);
        rx
    }

    /// Sets the allowance, and wakes the workers if it changed.
    fn store_allowance(&self, n: usize) {
        if self.allowance.swap(n, Ordering::AcqRel) != n {
            for w in self.wakers.lock().iter() {
                // A wake-up already pending says the same.
                let _ = w.try_send(());
            }
        }
    }

    /// Workers with an index below this may hold a connection.
    pub fn allowance(&self) -> usize {
        self.allowance.load(Ordering::Acquire)
    }

    /// Sets the allowance (the balancer's call).
    pub fn set_allowance(&self, n: usize) {
        self.store_allowance(n);
    }

    /// Holds the peer (`queue hold`): no connections until released.
    pub fn set_held(&self, held: bool) {
        self.held.store(held, Ordering::Release);
        if held {
            self.store_allowance(0);
        }
    }

    /// True while an operator holds the peer.
    pub fn held(&self) -> bool {
        self.held.load(Ordering::Acquire)
    }

    /// Marks the peer removed by a reload (no connections, its queue
    /// kept) or back in the configuration.
    pub fn set_removed(&self, removed: bool) {
        self.removed.store(removed, Ordering::Release);
        if removed {
            self.store_allowance(0);
        }
    }

    /// True while a reload has removed the peer.
    pub fn removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }

    /// Marks the peer's TLS or AUTH as not working with our settings, or
    /// working again; true if that changed.
    pub fn set_misconfigured(&self, yes: bool) -> bool {
        self.misconfigured.swap(yes, Ordering::AcqRel) != yes
    }

    /// True while our TLS or AUTH settings and the peer's do not agree.
    pub fn misconfigured(&self) -> bool {
        self.misconfigured.load(Ordering::Acquire)
    }

    /// True unless the peer is being probed.
    pub fn healthy(&self) -> bool {
        self.health.lock().healthy
    }

    /// True from recovery until the balancer has grown it back once.
    pub fn take_recovering(&self) -> bool {
        std::mem::take(&mut self.health.lock().recovering)
    }

    /// The peer answered a transaction (2xx or 5xx): it works.
    pub fn answered(&self) -> Change {
        let mut h = self.health.lock();
        h.connection_failures = 0;
        h.transient_streak = 0;
        if h.healthy {
            return Change::None;
        }
        h.healthy = true;
        h.recovering = true;
        h.probe_backoff = self.probe_min;
        self.store_allowance(1);
        Change::Recovered
    }

    /// A connect, greeting or transaction failed at the connection level.
    pub fn connection_failed(&self) -> Change {
        let mut h = self.health.lock();
        h.connection_failures += 1;
        let over = h.connection_failures >= CONNECTION_FAILURES;
        self.maybe_fail(&mut h, over)
    }

    /// A transaction got only transient replies.
    pub fn transient(&self) -> Change {
        let mut h = self.health.lock();
        h.transient_streak += 1;
        let over = h.transient_streak >= TRANSIENT_STREAK;
        self.maybe_fail(&mut h, over)
    }

    fn maybe_fail(&self, h: &mut Health, over: bool) -> Change {
        if !h.healthy {
            // A failed probe: wait longer before the next one.
            h.probe_backoff = (h.probe_backoff * 2).min(self.probe_max);
            h.next_probe = Instant::now() + h.probe_backoff;
            return Change::None;
        }
        if !over {
            return Change::None;
        }
        h.healthy = false;
        h.recovering = false;
        h.probe_backoff = self.probe_min;
        h.next_probe = Instant::now() + h.probe_backoff;
        self.store_allowance(1);
        Change::Failed
    }

    /// For an unhealthy peer, how long until the next probe; zero when due
    /// or when the peer is healthy.
    pub fn probe_wait(&self) -> Duration {
        let h = self.health.lock();
        if h.healthy {
            Duration::ZERO
        } else {
            h.next_probe.saturating_duration_since(Instant::now())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn control() -> Control {
        Control::new(4, Duration::from_secs(1), Duration::from_secs(8))
    }

    #[test]
    fn three_connection_failures_isolate_and_an_answer_restores() {
        let c = control();
        assert_eq!(c.connection_failed(), Change::None);
        assert_eq!(c.connection_failed(), Change::None);
        assert_eq!(c.connection_failed(), Change::Failed);
        assert!(!c.healthy());
        assert_eq!(c.allowance(), 1, "one probing connection");
        assert!(c.probe_wait() > Duration::from_millis(900));
        assert_eq!(c.answered(), Change::Recovered);
        assert!(c.healthy() && c.take_recovering() && !c.take_recovering());
        assert_eq!(c.allowance(), 1, "slow start from one");
    }

    #[test]
    fn failed_probes_back_off_up_to_the_maximum() {
        let c = control();
        for _ in 0..3 {
            c.connection_failed();
        }
        let mut waits = Vec::new();
        for _ in 0..5 {
            c.connection_failed();
            waits.push(c.probe_wait().as_secs_f64().round() as u64);
        }
        assert_eq!(waits, [2, 4, 8, 8, 8]);
    }

    #[test]
    fn a_streak_of_transient_replies_isolates_and_answers_reset_it() {
        let c = control();
        for _ in 0..9 {
            assert_eq!(c.transient(), Change::None);
        }
        c.answered();
        for _ in 0..9 {
            assert_eq!(c.transient(), Change::None);
        }
        assert_eq!(c.transient(), Change::Failed);
    }
}
