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

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use std::sync::Arc;
use std::time::SystemTime;

use crossbeam_channel::{Receiver, SendTimeoutError, Sender, select};
use log::error;

use crate::clock::SharedClock;
use crate::message::{Job, Message};
use crate::spool::Spool;

/// How long a session waits for room in a pool before handing the job to
/// the queue manager; a little backpressure on clients faster than the peer.
const SUBMIT_WAIT: Duration = Duration::from_millis(50);
/// How often the manager retries full pools while it holds overflow.
const OVERFLOW_POLL: Duration = Duration::from_millis(5);
/// Longest sleep of the manager when nothing is due.
const IDLE_TICK: Duration = Duration::from_secs(1);

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
    /// A retry past the message's expiry: fail it.
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

/// One peer's part of the queue.
struct PeerQueue {
    /// What is queued, by queue ID.
    tracked: parking_lot::Mutex<std::collections::BTreeMap<String, Queued>>,
    pool: Sender<Job>,
    /// Jobs waiting in the manager's overflow.
    overflow: AtomicUsize,
    /// Jobs waiting for their retry time.
    deferred: AtomicUsize,
}

impl PeerQueue {
    fn new(pool: Sender<Job>) -> Arc<PeerQueue> {
        Arc::new(PeerQueue {
            tracked: Default::default(),
            pool,
            overflow: AtomicUsize::new(0),
            deferred: AtomicUsize::new(0),
        })
    }
}

/// Lists a job as queued at its peer (new, or found in the spool).
fn track(p: &PeerQueue, job: &Job, next_attempt: Option<SystemTime>) {
    let m = &job.message;
    let mut tracked = p.tracked.lock();
    let q = tracked.entry(m.id.clone()).or_insert_with(|| Queued {
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

    /// Adds a peer (a reload added it) with its pool; returns its id.
    pub fn add_peer(&self, pool: Sender<Job>) -> usize {
        let mut peers = self.peers.write();
        peers.push(PeerQueue::new(pool));
        peers.len() - 1
    }

    /// Puts a new job in its peer's pool, or behind the peer's overflow.
    pub fn submit(&self, job: Job) {
        let q = self.peer(job.peer);
        track(&q, &job, None);
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
        track(&self.peer(job.peer), &job, Some(at));
        self.schedule(job, at);
    }

    /// Parks a job whose attempt failed with `reply` until `at`.
    pub fn defer(&self, job: Job, reply: &str, at: SystemTime) {
        if let Some(q) = self.peer(job.peer).tracked.lock().get_mut(&job.message.id) {
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
        if let Some(q) = tracked.get_mut(id) {
            q.rcpts.retain(|r| !rcpts.contains(r));
            if q.rcpts.is_empty() {
                tracked.remove(id);
            }
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
            .any(|p| p.tracked.lock().contains_key(id));
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
    /// held its message since it was queued, and a retry is not made past
    /// its expiry (the first attempt always is: the receiving MMSC
    /// enforces X-Mms-Expiry towards its subscriber).
    pub fn admission(&self, job: &Job) -> Admission {
        if self.is_deleted(&job.message.id) {
            Admission::Deleted
        } else if self.is_held(&job.message.id) {
            Admission::Held
        } else if job.attempts > 0 && self.now() >= job.message.expires {
            Admission::Expired
        } else {
            Admission::Deliver
        }
    }

    /// How many messages are queued for `peer`.
    pub fn queued_len(&self, peer: usize) -> usize {
        self.peer(peer).tracked.lock().len()
    }

    /// When the oldest message queued for `peer` was accepted.
    pub fn oldest(&self, peer: usize) -> Option<SystemTime> {
        let p = self.peer(peer);
        let tracked = p.tracked.lock();
        tracked.values().map(|q| q.message.accepted).min()
    }

    /// What is queued for `peer`, oldest first.
    pub fn list(&self, peer: usize) -> Vec<Queued> {
        self.peer(peer).tracked.lock().values().cloned().collect()
    }

    /// How many messages queued for `peer` are younger than each of
    /// `limits`, as counts per bucket (the last bucket: older than all).
    pub fn ages(&self, peer: usize, limits: &[Duration]) -> Vec<usize> {
        let mut counts = vec![0; limits.len() + 1];
        let now = self.now();
        for q in self.peer(peer).tracked.lock().values() {
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

struct Deferred {
    due: SystemTime,
    seq: u64,
    job: Job,
}

impl PartialEq for Deferred {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.seq) == (other.due, other.seq)
    }
}
impl Eq for Deferred {}
impl PartialOrd for Deferred {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Deferred {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.due, self.seq).cmp(&(other.due, other.seq))
    }
}

/// The queue manager thread and its stop switch.
pub struct QueueManager {
    stop: Option<Sender<()>>,
    handle: Option<JoinHandle<usize>>,
}

impl QueueManager {
    /// Starts the manager for these pools; returns it with the shared
    /// entrance. Parked jobs get their data back from `spool`.
    pub fn start(
        pools: Vec<Sender<Job>>,
        retry: RetryPolicy,
        spool: Arc<Spool>,
        clock: SharedClock,
    ) -> std::io::Result<(QueueManager, Arc<Queue>)> {
        let (events_tx, events_rx) = crossbeam_channel::unbounded();
        let (stop_tx, stop_rx) = crossbeam_channel::bounded(0);
        let queue = Arc::new(Queue {
            deleted: Default::default(),
            held: Default::default(),
            peers: parking_lot::RwLock::new(pools.into_iter().map(PeerQueue::new).collect()),
            events: events_tx,
            retry: parking_lot::Mutex::new(retry),
            clock,
        });
        let q = queue.clone();
        let handle = thread::Builder::new()
            .name("qmgr".into())
            .spawn(move || manage(&q, &spool, &events_rx, &stop_rx))?;
        Ok((
            QueueManager {
                stop: Some(stop_tx),
                handle: Some(handle),
            },
            queue,
        ))
    }

    /// Stops the manager; returns how many jobs it still held.
    pub fn stop(mut self) -> usize {
        self.stop.take();
        self.handle.take().map_or(0, |h| h.join().unwrap_or(0))
    }
}

impl Drop for QueueManager {
    fn drop(&mut self) {
        self.stop.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn manage(queue: &Queue, spool: &Spool, events: &Receiver<Event>, stop: &Receiver<()>) -> usize {
    let mut overflow: Vec<VecDeque<Job>> = Vec::new();
    let mut deferred: BinaryHeap<Reverse<Deferred>> = BinaryHeap::new();
    // Jobs of held messages, counted as waiting (deferred) meanwhile.
    let mut parked: Vec<Job> = Vec::new();
    let mut seq = 0u64;
    // Sync requests, answered at the end of this pass.
    let mut syncs: Vec<Sender<()>> = Vec::new();
    let take = |ev: Event,
                overflow: &mut Vec<VecDeque<Job>>,
                deferred: &mut BinaryHeap<Reverse<Deferred>>,
                parked: &mut Vec<Job>,
                syncs: &mut Vec<Sender<()>>,
                seq: &mut u64| match ev {
        Event::Release(id) => {
            let (go, stay): (Vec<Job>, Vec<Job>) = std::mem::take(parked)
                .into_iter()
                .partition(|j| j.message.id == id);
            *parked = stay;
            for job in go {
                let p = queue.peer(job.peer);
                p.deferred.fetch_sub(1, Ordering::AcqRel);
                p.overflow.fetch_add(1, Ordering::AcqRel);
                overflow[job.peer].push_back(job);
            }
        }
        Event::Overflow(mut job) => {
            job.data = None;
            if overflow.len() <= job.peer {
                overflow.resize_with(job.peer + 1, VecDeque::new);
            }
            overflow[job.peer].push_back(job);
        }
        Event::RetryNow(peer, id) => {
            let now = queue.now();
            let all = std::mem::take(deferred).into_vec();
            for Reverse(mut d) in all {
                let hit = peer.is_none_or(|p| p == d.job.peer)
                    && id.as_ref().is_none_or(|i| *i == d.job.message.id);
                if hit {
                    d.due = now;
                }
                deferred.push(Reverse(d));
            }
        }
        Event::Sync(answer) => syncs.push(answer),
        Event::Defer(mut job, due) => {
            job.data = None;
            *seq += 1;
            deferred.push(Reverse(Deferred {
                due,
                seq: *seq,
                job,
            }));
        }
    };
    loop {
        let now = queue.now();
        let wait = if overflow.iter().any(|o| !o.is_empty()) {
            OVERFLOW_POLL
        } else {
            deferred
                .peek()
                .map_or(IDLE_TICK, |Reverse(d)| {
                    d.due.duration_since(now).unwrap_or_default()
                })
                .min(IDLE_TICK)
        };
        select! {
            recv(events) -> ev => match ev {
                Ok(ev) => take(ev, &mut overflow, &mut deferred, &mut parked, &mut syncs, &mut seq),
                Err(_) => break,
            },
            recv(stop) -> _ => break,
            default(wait) => {}
        }
        // Take whatever else arrived before doing the work.
        while let Ok(ev) = events.try_recv() {
            take(
                ev,
                &mut overflow,
                &mut deferred,
                &mut parked,
                &mut syncs,
                &mut seq,
            );
        }
        let now = queue.now();
        let peers = queue.peers.read().clone();
        if overflow.len() < peers.len() {
            overflow.resize_with(peers.len(), VecDeque::new);
        }
        while let Some(Reverse(d)) = deferred.pop() {
            if d.due > now {
                deferred.push(Reverse(d));
                break;
            }
            let p = &peers[d.job.peer];
            p.deferred.fetch_sub(1, Ordering::AcqRel);
            // Due retries queue behind the overflow; counted apart from new
            // jobs, which need not wait behind a retry.
            p.overflow.fetch_add(1, Ordering::AcqRel);
            overflow[d.job.peer].push_back(d.job);
        }
        let mut held_now = Vec::new();
        for (q, p) in overflow.iter_mut().zip(&peers) {
            while let Some(mut job) = q.pop_front() {
                match queue.admission(&job) {
                    Admission::Deleted => {
                        p.overflow.fetch_sub(1, Ordering::AcqRel);
                        continue;
                    }
                    Admission::Held => {
                        p.overflow.fetch_sub(1, Ordering::AcqRel);
                        p.deferred.fetch_add(1, Ordering::AcqRel);
                        job.data = None;
                        held_now.push(job);
                        continue;
                    }
                    // An expired retry is the worker's to fail.
                    Admission::Expired | Admission::Deliver => {}
                }
                if job.data.is_none() {
                    match spool.read(&job.message.id, &job.message.location) {
                        Ok(d) => job.data = Some(d.into()),
                        Err(e) => {
                            error!(
                                "{} cannot read its data back from the spool: {e}; left in the spool",
                                job.message.id
                            );
                            p.overflow.fetch_sub(1, Ordering::AcqRel);
                            continue;
                        }
                    }
                }
                match p.pool.try_send(job) {
                    Ok(()) => {
                        p.overflow.fetch_sub(1, Ordering::AcqRel);
                    }
                    Err(e) => {
                        // Keep the data: it is the next to go in.
                        q.push_front(e.into_inner());
                        break;
                    }
                }
            }
        }
        parked.append(&mut held_now);
        for answer in syncs.drain(..) {
            let _ = answer.send(());
        }
    }
    overflow.iter().map(VecDeque::len).sum::<usize>() + deferred.len() + parked.len() + events.len()
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
