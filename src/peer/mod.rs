//! One destination MMSC: its message pool (a bounded channel), its sub-pool
//! of worker threads (each owning at most one long-lived SMTP connection
//! to this peer and nobody else), and its counters.
//!
//! All `max_connections` workers exist from the start. The peer's allowance
//! (set by the balancer, see `control`) says how many may hold a
//! connection now: those connect at start (`min_connections`) or when work
//! arrives, the others park. Every open connection also holds one slot of
//! the relay's global budget, a hard cap while allowances move.
//!
//! Files: `worker.rs` (one worker's loop), `connection.rs` (the socket and
//! its dialog), `policy.rs` (what every reply and failure means, as a
//! table), `control.rs` (allowance, health, wakers), `balancer.rs` (moves
//! allowance between peers), `bounce.rs` (the failed area and DSNs),
//! `expire.rs` (lifetimes). Peers take jobs from the `queue` and mark the
//! `spool`; they never reach into `inbound` or `relay`.

pub mod balancer;
pub mod bounce;
mod connection;
mod control;
mod expire;
pub mod hosts;
pub mod policy;
mod worker;

pub use connection::{ConnError, Connection, Delivery, Outbound, Security, Timeouts};
pub use control::{Change, Control};
pub use expire::Expirer;
pub use hosts::{Dns, Host, Hosts};

use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use parking_lot::{Mutex, RwLock};

use crate::config::PeerConfig;
use crate::message::Job;
use crate::peer::bounce::Bounce;
use crate::queue::Queue;
use crate::spool::Spool;
use crate::sys::owned::Owned;

/// The global budget of outbound connections (`[relay] max_connections`):
/// a semaphore a worker with a message blocks on.
#[derive(Debug)]
pub struct Budget {
    max: AtomicUsize,
    used: AtomicUsize,
    /// A slot may be free: one waiter wakes, takes it, and passes the
    /// word on while slots remain.
    freed: (Sender<()>, Receiver<()>),
}

impl Budget {
    /// A budget of `max` connections.
    pub fn new(max: usize) -> Budget {
        Budget {
            max: AtomicUsize::new(max),
            used: AtomicUsize::new(0),
            freed: crossbeam_channel::bounded(1),
        }
    }

    /// Takes one slot, waiting for one to be given back; false if `stop`
    /// came first.
    pub fn acquire(&self, stop: &Receiver<()>) -> bool {
        loop {
            if self.try_acquire() {
                if self.used.load(Ordering::Acquire) < self.max() {
                    // Another waiter may take the next one.
                    let _ = self.freed.0.try_send(());
                }
                return true;
            }
            crossbeam_channel::select! {
                recv(self.freed.1) -> _ => {}
                recv(stop) -> _ => return false,
            }
        }
    }

    /// Takes one slot if any is free.
    pub fn try_acquire(&self) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                (u < self.max()).then_some(u + 1)
            })
            .is_ok()
    }

    /// The budget now.
    pub fn max(&self) -> usize {
        self.max.load(Ordering::Acquire)
    }

    /// Changes the budget (a reload); connections over it close as their
    /// workers finish.
    pub fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Release);
        let _ = self.freed.0.try_send(());
    }

    /// Gives a slot back.
    pub fn release(&self) {
        self.used.fetch_sub(1, Ordering::AcqRel);
        let _ = self.freed.0.try_send(());
    }
}

/// Upper bounds, in seconds, of the delivery-delay histogram buckets.
pub const DELAY_BUCKETS: [f64; 8] = [0.01, 0.1, 1.0, 10.0, 60.0, 600.0, 3600.0, 86400.0];

/// Delivery delay (acceptance to the peer's 250) of delivered recipients.
#[derive(Debug, Default)]
pub struct DelayHistogram {
    /// Cumulative counts per bucket of [`DELAY_BUCKETS`], then +Inf.
    buckets: [AtomicU64; 9],
    sum_micros: AtomicU64,
}

impl DelayHistogram {
    /// Records `n` recipients delivered after `delay`.
    pub fn observe(&self, delay: Duration, n: u64) {
        let secs = delay.as_secs_f64();
        for (i, bound) in DELAY_BUCKETS.iter().enumerate() {
            if secs <= *bound {
                self.buckets[i].fetch_add(n, Ordering::Relaxed);
            }
        }
        self.buckets[8].fetch_add(n, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(n * delay.as_micros() as u64, Ordering::Relaxed);
    }

    /// Cumulative bucket counts (the last is the total) and the sum in seconds.
    pub fn read(&self) -> ([u64; 9], f64) {
        let counts = std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed));
        (counts, self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6)
    }
}

/// Counters of one peer; recipients are counted, not messages.
#[derive(Debug, Default)]
pub struct PeerStats {
    /// Recipients delivered (2xx).
    pub sent: AtomicU64,
    /// Recipient attempts deferred (4xx or connection trouble).
    pub deferred: AtomicU64,
    /// Recipients failed (5xx).
    pub failed: AtomicU64,
    /// TCP connections opened since start.
    pub connections_opened: AtomicU64,
    /// Attempts to open one that failed (per host tried).
    pub connections_failed: AtomicU64,
    /// Connections open now.
    pub connections_open: AtomicUsize,
    /// Workers busy with a message now.
    pub busy: AtomicUsize,
    /// The last error seen, for status output.
    pub last_error: Mutex<String>,
    /// Delivery delays of delivered recipients.
    pub delay: DelayHistogram,
    /// Recipients delivered per second lately, times 1000 (the balancer
    /// measures it every tick).
    pub rate_milli: AtomicU64,
}

/// A point-in-time copy of a peer's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerSnapshot {
    /// Peer name.
    pub name: String,
    /// Recipients delivered.
    pub sent: u64,
    /// Recipient attempts deferred.
    pub deferred: u64,
    /// Recipients failed.
    pub failed: u64,
    /// Connections opened since start.
    pub connections_opened: u64,
    /// Attempts to open one that failed.
    pub connections_failed: u64,
    /// Connections open now.
    pub connections_open: usize,
    /// Workers busy now.
    pub busy: usize,
    /// Jobs in the pool now.
    pub pool_depth: usize,
    /// Jobs waiting for room in the pool.
    pub overflow: usize,
    /// Jobs waiting for their retry time.
    pub waiting_retry: usize,
    /// Workers that may hold a connection now.
    pub allowance: usize,
    /// False while the peer is isolated and probed.
    pub healthy: bool,
    /// The last error seen.
    pub last_error: String,
    /// Held by an operator (`queue hold`).
    pub held: bool,
    /// Removed from the configuration by a reload: takes no new messages,
    /// keeps its queue.
    pub removed: bool,
    /// Our TLS or AUTH settings and the peer's do not agree.
    pub misconfigured: bool,
    /// Made at run time for a domain no peer claims.
    pub dynamic: bool,
    /// A dynamic peer retired when idle: no workers until its domain
    /// comes back.
    pub retired: bool,
    /// Age in seconds of the oldest message queued for it.
    pub oldest_secs: Option<u64>,
    /// Recipients delivered per second lately, times 1000.
    pub rate_milli: u64,
}

impl PeerSnapshot {
    /// One word for the status table: retired, removed, held,
    /// misconfigured, probing, dynamic (a healthy dynamic peer) or ok.
    pub fn state(&self) -> &'static str {
        if self.retired {
            "retired"
        } else if self.removed {
            "removed"
        } else if self.held {
            "held"
        } else if self.misconfigured {
            "misconfigured"
        } else if !self.healthy {
            "probing"
        } else if self.dynamic {
            "dynamic"
        } else {
            "ok"
        }
    }
}

/// Every peer's view, shared by the balancer, the control socket and the
/// metrics; a reload that adds peers appends to it.
#[derive(Clone, Default)]
pub struct PeerViews(Arc<RwLock<Vec<PeerView>>>);

impl PeerViews {
    /// The peers now, in id order.
    pub fn list(&self) -> Vec<PeerView> {
        self.0.read().clone()
    }

    /// Appends a peer; its id must be the next.
    pub fn push(&self, view: PeerView) {
        self.0.write().push(view);
    }

    /// Puts `view` in place of peer `id`'s (a dynamic peer started again).
    pub fn replace(&self, id: usize, view: PeerView) {
        self.0.write()[id] = view;
    }
}

/// A token bucket shared by a peer's workers (`max_rate`). Tokens may go
/// negative: a worker reserves its token and waits out the debt, so the
/// rate holds however many workers ask at once.
#[derive(Debug)]
struct TokenBucket {
    rate: f64,
    /// Tokens now, and when that was computed.
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    fn new(rate: u32) -> TokenBucket {
        TokenBucket {
            rate: f64::from(rate),
            // A one-second burst at most.
            state: Mutex::new((f64::from(rate), Instant::now())),
        }
    }

    /// Takes a token; returns how long to wait before using it.
    fn reserve(&self) -> Duration {
        let mut s = self.state.lock();
        let now = Instant::now();
        let refill = now.duration_since(s.1).as_secs_f64() * self.rate;
        s.0 = (s.0 + refill).min(self.rate.max(1.0)) - 1.0;
        s.1 = now;
        if s.0 >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-s.0 / self.rate)
        }
    }
}

/// A peer's settings as the configuration gives them; replaced whole by a
/// reload.
pub struct Settings {
    /// The `[peer.NAME]` section.
    pub cfg: PeerConfig,
    timeouts: Timeouts,
    /// `max_rate`, when set.
    rate: Option<TokenBucket>,
    /// The peer's hosts, each with its own failure mark.
    hosts: Arc<Hosts>,
    /// TLS and AUTH.
    security: Security,
    /// Messages per connection the peer was seen to allow (0: none seen),
    /// kept until the next reload replaces these settings.
    learned_limit: AtomicU32,
    /// The peer offered CHUNKING and then did not understand BDAT: DATA
    /// until the next reload.
    no_chunking: AtomicBool,
}

impl Settings {
    fn new(cfg: PeerConfig, hosts: Option<Arc<Hosts>>, dns: &Dns) -> Settings {
        Settings {
            security: Security::of(&cfg),
            timeouts: Timeouts::of(&cfg),
            rate: (cfg.max_rate > 0).then(|| TokenBucket::new(cfg.max_rate)),
            hosts: hosts.unwrap_or_else(|| {
                Arc::new(match &cfg.mx {
                    Some(domain) => {
                        Hosts::mx(domain.clone(), dns.clone(), cfg.probe_min, cfg.probe_max)
                    }
                    None => Hosts::new(cfg.hosts.clone(), cfg.probe_min, cfg.probe_max),
                })
            }),
            cfg,
            learned_limit: AtomicU32::new(0),
            no_chunking: AtomicBool::new(false),
        }
    }

    /// Messages a connection may carry: `max_messages_per_connection`, or
    /// less if the peer was seen to end sessions sooner; 0 means no limit.
    pub fn message_limit(&self) -> u32 {
        let learned = self.learned_limit.load(Ordering::Acquire);
        match (self.cfg.max_messages_per_connection, learned) {
            (0, l) | (l, 0) => l,
            (c, l) => c.min(l),
        }
    }

    /// BDAT to this peer when it offers CHUNKING: configured, and not seen
    /// to fail.
    pub fn chunking(&self) -> bool {
        self.cfg.chunking && !self.no_chunking.load(Ordering::Acquire)
    }

    /// Turns CHUNKING off until the next reload; true if it was on.
    fn learn_no_chunking(&self) -> bool {
        !self.no_chunking.swap(true, Ordering::AcqRel)
    }

    /// Takes `n` as the peer's limit if it is lower than the one in force;
    /// true if it was.
    fn learn_limit(&self, n: u32) -> bool {
        n > 0
            && (self.message_limit() == 0 || n < self.message_limit())
            && self
                .learned_limit
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |l| {
                    (l == 0 || n < l).then_some(n)
                })
                .is_ok()
    }
}

/// What the workers of one peer share.
struct Shared {
    id: usize,
    name: String,
    /// How many worker threads exist (`max_connections` at start).
    workers: usize,
    settings: RwLock<Arc<Settings>>,
    helo_name: String,
    /// The resolver, for `mx:` hosts.
    dns: Dns,
    /// Its workers were stopped: a retired dynamic peer.
    retired: AtomicBool,
    stats: PeerStats,
    /// Health and allowance.
    control: Control,
    /// Each worker's socket, so a stop can cut stuck I/O.
    streams: Mutex<Vec<Option<TcpStream>>>,
}

impl Shared {
    fn settings(&self) -> Arc<Settings> {
        self.settings.read().clone()
    }
}

/// One destination and its running workers.
pub struct Peer {
    view: PeerView,
    workers: Vec<Owned<()>>,
}

/// A handle on a peer's state for the balancer and status: counters,
/// health, allowance, pool depth. Cheap to clone.
#[derive(Clone)]
pub struct PeerView {
    shared: Arc<Shared>,
    jobs: Receiver<Job>,
}

/// What every worker of every peer needs from the relay.
#[derive(Clone)]
pub struct WorkerContext {
    /// Our name for EHLO.
    pub helo_name: String,
    /// Where deferred jobs go.
    pub queue: Arc<Queue>,
    /// Where outcomes are recorded.
    pub spool: Arc<Spool>,
    /// Where failures are reported.
    pub bounce: Arc<Bounce>,
    /// The global connection budget.
    pub budget: Arc<Budget>,
    /// Closed when the relay stops.
    pub stop: Receiver<()>,
    /// Dropped by each worker when it ends, so the relay can wait for all.
    pub done: Sender<()>,
    /// How hosts are found through DNS.
    pub dns: Dns,
}

impl Peer {
    /// Starts the workers of peer `id`, taking jobs from `jobs`; `held`:
    /// an operator holds it (kept from before a restart).
    pub fn start(
        id: usize,
        cfg: PeerConfig,
        jobs: Receiver<Job>,
        ctx: &WorkerContext,
        held: bool,
    ) -> std::io::Result<Peer> {
        let shared = Arc::new(Shared {
            id,
            name: cfg.name.clone(),
            workers: cfg.max_connections,
            helo_name: ctx.helo_name.clone(),
            streams: Mutex::new((0..cfg.max_connections).map(|_| None).collect()),
            stats: PeerStats::default(),
            control: Control::new(cfg.min_connections, cfg.probe_min, cfg.probe_max),
            settings: RwLock::new(Arc::new(Settings::new(cfg, None, &ctx.dns))),
            dns: ctx.dns.clone(),
            retired: AtomicBool::new(false),
        });
        // Before any worker runs, so that a held peer sends nothing.
        shared.control.set_held(held);
        let mut workers = Vec::new();
        for index in 0..shared.workers {
            let w = worker::Worker::new(index, shared.clone(), jobs.clone(), ctx.clone());
            let handle = Owned::spawn(format!("peer-{}-{index}", shared.name), move || w.run())?;
            workers.push(handle);
        }
        Ok(Peer {
            view: PeerView { shared, jobs },
            workers,
        })
    }

    /// A handle on this peer's state.
    pub fn view(&self) -> &PeerView {
        &self.view
    }

    /// Marks a peer whose own stop channel closed retired; its workers,
    /// ending, for the caller to join.
    pub fn retire(&mut self) -> Vec<Owned<()>> {
        self.view.shared.retired.store(true, Ordering::Release);
        std::mem::take(&mut self.workers)
    }

    /// Waits for the workers (after the stop channel closed); returns how
    /// many jobs were left in the pool.
    pub fn join(self) -> usize {
        for w in self.workers {
            w.join();
        }
        self.view.jobs.len()
    }
}

impl PeerView {
    /// A dynamic peer retired while idle: its workers are gone.
    pub fn retired(&self) -> bool {
        self.shared.retired.load(Ordering::Acquire)
    }

    /// The peer's message pool.
    pub fn pool(&self) -> Receiver<Job> {
        self.jobs.clone()
    }

    /// The peer's counters now.
    pub fn snapshot(&self, queue: &Queue) -> PeerSnapshot {
        let s = &self.shared.stats;
        PeerSnapshot {
            name: self.shared.name.clone(),
            sent: s.sent.load(Ordering::Relaxed),
            deferred: s.deferred.load(Ordering::Relaxed),
            failed: s.failed.load(Ordering::Relaxed),
            connections_opened: s.connections_opened.load(Ordering::Relaxed),
            connections_failed: s.connections_failed.load(Ordering::Relaxed),
            connections_open: s.connections_open.load(Ordering::Relaxed),
            busy: s.busy.load(Ordering::Relaxed),
            pool_depth: self.jobs.len(),
            overflow: queue.overflow_len(self.shared.id),
            waiting_retry: queue.deferred_len(self.shared.id),
            allowance: self.shared.control.allowance(),
            healthy: self.shared.control.healthy(),
            last_error: s.last_error.lock().clone(),
            held: self.shared.control.held(),
            removed: self.shared.control.removed(),
            misconfigured: self.shared.control.misconfigured(),
            dynamic: self.shared.settings().cfg.dynamic,
            retired: self.shared.retired.load(Ordering::Acquire),
            oldest_secs: queue
                .oldest(self.shared.id)
                .map(|t| queue.now().duration_since(t).unwrap_or_default().as_secs()),
            rate_milli: s.rate_milli.load(Ordering::Relaxed),
        }
    }

    /// The peer's settings now.
    pub fn settings(&self) -> Arc<Settings> {
        self.shared.settings()
    }

    /// The peer's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Checks that `cfg` can replace this peer's settings without a
    /// restart.
    pub fn check_reload(&self, cfg: &PeerConfig) -> Result<(), String> {
        if cfg.max_connections > self.shared.workers {
            return Err(format!(
                "peer {}: max_connections {} over the {} workers started: needs a restart",
                self.shared.name, cfg.max_connections, self.shared.workers
            ));
        }
        if cfg.pool_size != self.shared.settings().cfg.pool_size {
            return Err(format!(
                "peer {}: a new pool_size needs a restart",
                self.shared.name
            ));
        }
        Ok(())
    }

    /// Replaces this peer's settings (after [`PeerView::check_reload`]).
    /// Host failure marks are kept when the host list did not change.
    pub fn reload(&self, cfg: PeerConfig) {
        let old = self.shared.settings();
        let same = old.cfg.hosts == cfg.hosts && old.cfg.mx == cfg.mx;
        let hosts = same.then(|| old.hosts.clone());
        *self.shared.settings.write() = Arc::new(Settings::new(cfg, hosts, &self.shared.dns));
    }

    /// The peer's health and allowance.
    pub fn control(&self) -> &Control {
        &self.shared.control
    }

    /// The peer's counters themselves (for the metrics' histogram).
    pub fn stats(&self) -> &PeerStats {
        &self.shared.stats
    }

    /// Cuts every open connection, so workers stuck in I/O give up now.
    pub fn cut_connections(&self) {
        for s in self.shared.streams.lock().iter().flatten() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    #[test]
    fn a_full_budget_blocks_until_a_slot_is_given_back_or_the_stop() {
        let budget = Arc::new(Budget::new(2));
        let (stop_tx, stop) = crossbeam_channel::bounded::<()>(0);
        assert!(budget.acquire(&stop) && budget.acquire(&stop));
        let waiters: Vec<_> = (0..2)
            .map(|_| {
                let (b, s) = (budget.clone(), stop.clone());
                thread::spawn(move || b.acquire(&s))
            })
            .collect();
        // Both give back: both waiters get a slot, whichever release woke.
        budget.release();
        budget.release();
        for w in waiters {
            assert!(w.join().unwrap());
        }
        // Full again: a waiter gives up at the stop.
        let (b, s) = (budget.clone(), stop.clone());
        let last = thread::spawn(move || b.acquire(&s));
        drop(stop_tx);
        assert!(!last.join().unwrap());
    }

    #[test]
    fn the_bucket_spaces_tokens_at_the_rate() {
        let b = TokenBucket::new(10);
        // The burst: ten tokens at once, then one every 100 ms.
        for _ in 0..10 {
            assert_eq!(b.reserve(), Duration::ZERO);
        }
        let waits: Vec<u128> = (0..3).map(|_| b.reserve().as_millis()).collect();
        for (w, want) in waits.iter().zip([100, 200, 300]) {
            assert!((want - 5..=want).contains(w), "{waits:?}");
        }
    }
}
