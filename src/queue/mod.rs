//! The way into the peers' pools, and the queue manager thread that holds
//! every job that cannot be in a pool right now:
//!
//! - **overflow**: the peer's pool was full. Jobs wait here in arrival
//!   order and enter the pool as room appears; while a peer has overflow,
//!   new jobs for it queue behind, so order is kept.
//! - **deferred**: a delivery attempt failed temporarily. The job waits
//!   until its retry time (exponential backoff between `retry_min` and
//!   `retry_max`), then enters the pool again.
//!
//! The spool is the durable record of all of them; what is held here is
//! the schedule. A parked job drops its copy of the message data, and gets
//! it back from the spool when it enters a pool, so memory is bounded by
//! the pools, not by the length of the queue.
//!
//! It knows the spool (to fetch data back) and nothing of SMTP, sessions
//! or peers' connections: the peers take jobs from the pools it feeds.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;
use std::time::SystemTime;

use crossbeam_channel::{Receiver, SendTimeoutError, Sender};
use manager::millis;

use crate::message::{Job, Message};
use crate::sys::clock::SharedClock;

mod manager;

pub use manager::QueueManager;

/// How long a session waits for room in a pool before handing the job to
/// the queue manager; a little backpressure on clients faster than the peer.
const SUBMIT_WAIT: Duration = Duration::from_millis(50);
/// Longest sleep of the manager when nothing is due sooner: a wall clock
/// that steps is noticed within this.
const CLOCK_STEP: Duration = Duration::from_secs(60);

/// Exponential backoff for deferred jobs.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    /// Delay after the first failed attempt.
    pub min: Duration,
    /// Longest delay.
    pub max: Duration,
}

impl RetryPolicy {
    /// Delay before the next try after `attempts` failed attempts.
    pub fn delay(&self, attempts: u32) -> Duration {
        let factor = 1u32
            .checked_shl(attempts.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.min.saturating_mul(factor).min(self.max)
    }
}

enum Event {
    Overflow(Job),
    Defer(Job, SystemTime),
    /// Make deferred jobs due now: of one peer, or one message, or all.
    RetryNow(Option<usize>, Option<String>),
    /// An operator released this held message.
    Release(String),
    /// Answer once everything due by the clock has been moved on.
    Sync(Sender<()>),
    /// A deadline sooner than the manager meant to look.
    Wake,
}

/// What may become of a job taken from a pool (see [`Queue::admission`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Try it.
    Deliver,
    /// Its message was deleted: drop it.
    Deleted,
    /// Its message is held: back to the queue manager.
    Held,
    /// Its time is up: fail it.
    Expired,
}

/// One queued message at one peer, for `mm4relay queue`.
#[derive(Clone, Debug)]
pub struct Queued {
    /// The message (ID, sender, acceptance time, where its data is).
    pub message: Arc<Message>,
    /// Recipients at this peer still to do.
    pub rcpts: Vec<String>,
    /// Attempts made.
    pub attempts: u32,
    /// The last reply or error, if any attempt was made.
    pub last_reply: String,
    /// When the next attempt is due, while it waits for one.
    pub next_attempt: Option<SystemTime>,
    /// The failed attempts so far, oldest first (the last
    /// [`HISTORY_LEN`]): when, and the reply or error.
    pub history: Vec<(SystemTime, String)>,
}

/// Attempts kept in a queued message's history.
pub const HISTORY_LEN: usize = 10;

/// What is queued for one peer, and when each message's time is up.
#[derive(Default)]
struct Tracked {
    /// By queue ID.
    queued: BTreeMap<String, Queued>,
    /// (timer, queue ID) of each queued message, soonest first (see
    /// `timer`).
    deadlines: BTreeSet<(SystemTime, String)>,
}

impl Tracked {
    fn remove(&mut self, id: &str) -> Option<Queued> {
        let q = self.queued.remove(id)?;
        self.deadlines.remove(&(timer(&q.message), id.to_string()));
        Some(q)
    }
}

/// When the manager fails a message: its deadline, rounded up to the
/// second, so that deadlines a client spreads out cost at most one pass
/// of the manager a second.
fn timer(m: &Message) -> SystemTime {
    let d = m.deadline();
    let since = d.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let up = Duration::from_secs(since.as_secs() + u64::from(since.subsec_nanos() > 0));
    SystemTime::UNIX_EPOCH + up
}

/// One peer's part of the queue.
struct PeerQueue {
    tracked: parking_lot::Mutex<Tracked>,
    pool: Sender<Job>,
    /// The pool's other end, to take expired jobs out of it.
    pool_out: Receiver<Job>,
    /// Jobs waiting in the manager's overflow.
    overflow: AtomicUsize,
    /// Jobs waiting for their retry time.
    deferred: AtomicUsize,
}

impl PeerQueue {
    fn new((pool, pool_out): (Sender<Job>, Receiver<Job>)) -> Arc<PeerQueue> {
        Arc::new(PeerQueue {
            tracked: Default::default(),
            pool,
            pool_out,
            overflow: AtomicUsize::new(0),
            deferred: AtomicUsize::new(0),
        })
    }
}

/// Lists a job as queued at its peer (new, or found in the spool);
/// returns the message's deadline if it is new here.
fn track(p: &PeerQueue, job: &Job, next_attempt: Option<SystemTime>) -> Option<SystemTime> {
    let m = &job.message;
    let mut tracked = p.tracked.lock();
    let mut new = None;
    if !tracked.queued.contains_key(&m.id) {
        let t = timer(m);
        tracked.deadlines.insert((t, m.id.clone()));
        new = Some(t);
    }
    let q = tracked
        .queued
        .entry(m.id.clone())
        .or_insert_with(|| Queued {
            message: m.clone(),
            rcpts: Vec::new(),
            attempts: job.attempts,
            last_reply: String::new(),
            next_attempt: None,
            history: Vec::new(),
        });
    q.rcpts.extend(job.rcpts.iter().cloned());
    if next_attempt.is_some() {
        q.next_attempt = next_attempt;
    }
    new
}

/// The shared entrance to the pools, used by sessions and workers.
pub struct Queue {
    /// Messages deleted by an operator, whose jobs are dropped on sight.
    deleted: parking_lot::Mutex<std::collections::HashSet<String>>,
    /// Messages held by an operator: their jobs wait with the manager.
    held: parking_lot::Mutex<std::collections::HashSet<String>>,
    /// Per peer id; peers added by a reload are appended.
    peers: parking_lot::RwLock<Vec<Arc<PeerQueue>>>,
    events: Sender<Event>,
    retry: parking_lot::Mutex<RetryPolicy>,
    clock: SharedClock,
    /// When the manager will look next, in milliseconds since the epoch
    /// by `clock`: a deadline sooner than that wakes it.
    next_look: AtomicU64,
}

impl Queue {
    /// The relay's wall-clock time (acceptance, retry and expiry times).
    pub fn now(&self) -> SystemTime {
        self.clock.now()
    }

    /// Returns once the manager has moved on every job due by the clock
    /// now (for tests that move a manual clock); false if it did not
    /// answer within `timeout`.
    pub fn sync(&self, timeout: Duration) -> bool {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.events.send(Event::Sync(tx)).is_ok() && rx.recv_timeout(timeout).is_ok()
    }

    /// Peer `peer`'s part. Peer ids come from the router and the spool
    /// recovery, which only know peers that were added here.
    fn peer(&self, peer: usize) -> Arc<PeerQueue> {
        self.peers.read()[peer].clone()
    }

    /// Adds a peer (a reload added it) with both ends of its pool;
    /// returns its id.
    pub fn add_peer(&self, pool: (Sender<Job>, Receiver<Job>)) -> usize {
        let mut peers = self.peers.write();
        peers.push(PeerQueue::new(pool));
        peers.len() - 1
    }

    /// Puts a new job in its peer's pool, or behind the peer's overflow.
    pub fn submit(&self, job: Job) {
        let q = self.peer(job.peer);
        self.track(&q, &job, None);
        let job = if q.overflow.load(Ordering::Acquire) == 0 {
            match q.pool.send_timeout(job, SUBMIT_WAIT) {
                Ok(()) => return,
                Err(SendTimeoutError::Timeout(job) | SendTimeoutError::Disconnected(job)) => job,
            }
        } else {
            job
        };
        self.overflow(job);
    }

    /// Tracks `job`, and wakes the manager if its deadline comes before
    /// the manager would look.
    fn track(&self, q: &PeerQueue, job: &Job, next_attempt: Option<SystemTime>) {
        if let Some(d) = track(q, job, next_attempt) {
            if millis(d) < self.next_look.load(Ordering::Acquire) {
                let _ = self.events.send(Event::Wake);
            }
        }
    }

    /// Hands back a job a worker took but may not send (its peer was held
    /// meanwhile): it waits with the overflow.
    pub fn put_back(&self, job: Job) {
        self.overflow(job);
    }

    fn overflow(&self, job: Job) {
        self.peer(job.peer).overflow.fetch_add(1, Ordering::AcqRel);
        // The manager outlives every session and worker, so this cannot fail.
        let _ = self.events.send(Event::Overflow(job));
    }

    /// The delay before the next attempt of a job that failed temporarily.
    pub fn retry_delay(&self, attempts: u32) -> Duration {
        self.retry.lock().delay(attempts)
    }

    /// Changes the retry schedule (a reload) for deferrals from now on.
    pub fn set_retry(&self, retry: RetryPolicy) {
        *self.retry.lock() = retry;
    }

    /// Queues a job found in the spool at start, due at `at`.
    pub fn recover(&self, job: Job, at: SystemTime) {
        self.track(&self.peer(job.peer), &job, Some(at));
        self.schedule(job, at);
    }

    /// Parks a job whose attempt failed with `reply` until `at`.
    pub fn defer(&self, job: Job, reply: &str, at: SystemTime) {
        if let Some(q) = self
            .peer(job.peer)
            .tracked
            .lock()
            .queued
            .get_mut(&job.message.id)
        {
            q.attempts = job.attempts;
            q.last_reply = reply.to_string();
            q.next_attempt = Some(at);
            if q.history.len() == HISTORY_LEN {
                q.history.remove(0);
            }
            q.history.push((self.now(), reply.to_string()));
        }
        self.schedule(job, at);
    }

    /// Makes deferred jobs due now: those of `peer`, or of message `id`,
    /// or all when both are `None`.
    pub fn retry_now(&self, peer: Option<usize>, id: Option<&str>) {
        let _ = self
            .events
            .send(Event::RetryNow(peer, id.map(str::to_string)));
    }

    /// Forgets recipients that are done (sent, failed or expired).
    pub fn done(&self, peer: usize, id: &str, rcpts: &[String]) {
        let p = self.peer(peer);
        let mut tracked = p.tracked.lock();
        let Some(q) = tracked.queued.get_mut(id) else {
            return;
        };
        q.rcpts.retain(|r| !rcpts.contains(r));
        if !q.rcpts.is_empty() {
            return;
        }
        tracked.remove(id);
        drop(tracked);
        // A held message that is gone everywhere (it expired) is held no
        // more.
        if !self.held.lock().is_empty()
            && !self
                .peers
                .read()
                .iter()
                .any(|p| p.tracked.lock().queued.contains_key(id))
        {
            self.held.lock().remove(id);
        }
    }

    /// Deletes a message from the queue (an operator's `queue delete`):
    /// returns, per peer, the recipients it still had. Jobs of it still in
    /// a pool are dropped when a worker or the manager meets them.
    pub fn delete(&self, id: &str) -> Vec<(usize, Vec<String>)> {
        let removed: Vec<(usize, Vec<String>)> = self
            .peers
            .read()
            .iter()
            .enumerate()
            .filter_map(|(peer, p)| p.tracked.lock().remove(id).map(|q| (peer, q.rcpts)))
            .collect();
        if !removed.is_empty() {
            self.deleted.lock().insert(id.to_string());
        }
        removed
    }

    /// Holds a queued message (`queue hold ID`): none of its jobs is
    /// attempted until it is released. False if no such message is queued.
    /// The relay keeps holds in the spool across restarts.
    pub fn hold(&self, id: &str) -> bool {
        let known = self
            .peers
            .read()
            .iter()
            .any(|p| p.tracked.lock().queued.contains_key(id));
        if known {
            self.held.lock().insert(id.to_string());
        }
        known
    }

    /// Releases a held message; false if it was not held.
    pub fn release(&self, id: &str) -> bool {
        let was = self.held.lock().remove(id);
        if was {
            let _ = self.events.send(Event::Release(id.to_string()));
        }
        was
    }

    /// The messages an operator holds.
    pub fn held_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.held.lock().iter().cloned().collect();
        ids.sort();
        ids
    }

    /// True if an operator holds this message.
    fn is_held(&self, id: &str) -> bool {
        let held = self.held.lock();
        !held.is_empty() && held.contains(id)
    }

    /// True if an operator deleted this message.
    fn is_deleted(&self, id: &str) -> bool {
        self.deleted.lock().contains(id)
    }

    /// Whether `job` may be tried now. An operator may have deleted or
    /// held its message since it was queued, or its time may be up (see
    /// [`Job::expired`]).
    pub fn admission(&self, job: &Job) -> Admission {
        if self.is_deleted(&job.message.id) {
            Admission::Deleted
        } else if self.is_held(&job.message.id) {
            Admission::Held
        } else if job.expired(self.now()) {
            Admission::Expired
        } else {
            Admission::Deliver
        }
    }

    /// The last reply or error an attempt of message `id` at `peer` had.
    pub fn last_reply(&self, peer: usize, id: &str) -> Option<String> {
        let p = self.peer(peer);
        let tracked = p.tracked.lock();
        tracked.queued.get(id).map(|q| q.last_reply.clone())
    }

    /// How many messages are queued for `peer`.
    pub fn queued_len(&self, peer: usize) -> usize {
        self.peer(peer).tracked.lock().queued.len()
    }

    /// When the oldest message queued for `peer` was accepted.
    pub fn oldest(&self, peer: usize) -> Option<SystemTime> {
        let p = self.peer(peer);
        let tracked = p.tracked.lock();
        tracked.queued.values().map(|q| q.message.accepted).min()
    }

    /// What is queued for `peer`, oldest first.
    pub fn list(&self, peer: usize) -> Vec<Queued> {
        self.peer(peer)
            .tracked
            .lock()
            .queued
            .values()
            .cloned()
            .collect()
    }

    /// How many messages queued for `peer` are younger than each of
    /// `limits`, as counts per bucket (the last bucket: older than all).
    pub fn ages(&self, peer: usize, limits: &[Duration]) -> Vec<usize> {
        let mut counts = vec![0; limits.len() + 1];
        let now = self.now();
        for q in self.peer(peer).tracked.lock().queued.values() {
            let age = now.duration_since(q.message.accepted).unwrap_or_default();
            let bucket = limits.iter().position(|l| age < *l).unwrap_or(limits.len());
            counts[bucket] += 1;
        }
        counts
    }

    /// Parks a job until `at` (wall clock), then puts it in its pool.
    fn schedule(&self, mut job: Job, at: SystemTime) {
        job.data = None;
        self.peer(job.peer).deferred.fetch_add(1, Ordering::AcqRel);
        let _ = self.events.send(Event::Defer(job, at));
    }

    /// Jobs waiting in overflow for `peer`.
    pub fn overflow_len(&self, peer: usize) -> usize {
        self.peer(peer).overflow.load(Ordering::Acquire)
    }

    /// Jobs for `peer` waiting for their retry time.
    pub fn deferred_len(&self, peer: usize) -> usize {
        self.peer(peer).deferred.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let p = RetryPolicy {
            min: Duration::from_secs(60),
            max: Duration::from_secs(3600),
        };
        assert_eq!(p.delay(1), Duration::from_secs(60));
        assert_eq!(p.delay(2), Duration::from_secs(120));
        assert_eq!(p.delay(6), Duration::from_secs(1920));
        assert_eq!(p.delay(7), Duration::from_secs(3600));
        assert_eq!(p.delay(200), Duration::from_secs(3600));
    }
}
