//! The queue manager thread: it feeds parked jobs into their pools as room
//! appears and as retry times come, and hands jobs whose lifetime ended to
//! the expirer. It waits on the pools' room and the next due time, never
//! by polling.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use std::time::SystemTime;

use crossbeam_channel::{Receiver, Select, Sender, TryRecvError};
use log::error;

use crate::message::Job;
use crate::spool::Spool;
use crate::sys::clock::SharedClock;
use crate::sys::owned::Owned;

use super::{Admission, CLOCK_STEP, Event, PeerQueue, Queue, RetryPolicy};

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

/// The queue manager thread and its stop switch: dropping it stops and
/// joins it (the switch goes first, fields drop in order).
pub struct QueueManager {
    stop: Sender<()>,
    thread: Owned<usize>,
}

impl QueueManager {
    /// Starts the manager for these pools (both ends of each); returns it
    /// with the shared entrance. Parked jobs get their data back from
    /// `spool`; jobs whose time is up go to `expired`.
    pub fn start(
        pools: Vec<(Sender<Job>, Receiver<Job>)>,
        retry: RetryPolicy,
        spool: Arc<Spool>,
        clock: SharedClock,
        expired: Sender<Job>,
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
            next_look: AtomicU64::new(0),
        });
        let q = queue.clone();
        let thread = Owned::spawn("qmgr", move || {
            let mut m = Manager {
                queue: &q,
                spool: &spool,
                expired,
                overflow: Vec::new(),
                deferred: BinaryHeap::new(),
                parked: Vec::new(),
                seq: 0,
                syncs: Vec::new(),
            };
            m.run(&events_rx, &stop_rx)
        })?;
        Ok((
            QueueManager {
                stop: stop_tx,
                thread,
            },
            queue,
        ))
    }

    /// Stops the manager; returns how many jobs it still held.
    pub fn stop(self) -> usize {
        drop(self.stop);
        self.thread.join().unwrap_or(0)
    }
}

/// Milliseconds since the epoch, for comparing deadlines atomically.
pub(super) fn millis(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The manager's own state: every job not in a pool or in flight.
struct Manager<'a> {
    queue: &'a Queue,
    spool: &'a Spool,
    /// Where jobs whose time is up go to be failed.
    expired: Sender<Job>,
    /// Per peer, in arrival order.
    overflow: Vec<VecDeque<Job>>,
    deferred: BinaryHeap<Reverse<Deferred>>,
    /// Jobs of held messages, counted as waiting (deferred) meanwhile.
    parked: Vec<Job>,
    seq: u64,
    /// Sync requests, answered at the end of this pass.
    syncs: Vec<Sender<()>>,
}

impl Manager<'_> {
    pub(super) fn run(&mut self, events: &Receiver<Event>, stop: &Receiver<()>) -> usize {
        loop {
            let wait = self.wait();
            let peers = self.queue.peers.read().clone();
            // Events, the stop, and room in any pool this holds overflow
            // for: whichever comes first, or the next retry or deadline.
            let mut sel = Select::new();
            sel.recv(events);
            sel.recv(stop);
            for (q, p) in self.overflow.iter().zip(&peers) {
                if !q.is_empty() {
                    sel.send(&p.pool);
                }
            }
            if sel.ready_timeout(wait) == Ok(1) {
                break;
            }
            // Take whatever arrived before doing the work.
            loop {
                match events.try_recv() {
                    Ok(ev) => self.take(ev),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return self.left(events),
                }
            }
            let now = self.queue.now();
            if self.overflow.len() < peers.len() {
                self.overflow.resize_with(peers.len(), VecDeque::new);
            }
            self.expire_due(now, &peers);
            self.due_retries(now, &peers);
            self.feed(&peers);
            for answer in self.syncs.drain(..) {
                let _ = answer.send(());
            }
        }
        self.left(events)
    }

    /// Jobs still held here (or on their way) at the stop.
    fn left(&self, events: &Receiver<Event>) -> usize {
        self.overflow.iter().map(VecDeque::len).sum::<usize>()
            + self.deferred.len()
            + self.parked.len()
            + events.len()
    }

    /// How long to sleep: until the next retry or deadline, however far
    /// (a new, sooner one wakes the manager), but a minute at most, for a
    /// wall clock that steps. Room in a full pool wakes it too (see `run`).
    fn wait(&self) -> Duration {
        // Anything tracked from here on wakes the manager, until it knows
        // when it will look next.
        self.queue.next_look.store(u64::MAX, Ordering::Release);
        let now = self.queue.now();
        let retry = self.deferred.peek().map(|Reverse(d)| d.due);
        let deadline = self
            .queue
            .peers
            .read()
            .iter()
            .filter_map(|p| p.tracked.lock().deadlines.first().map(|(d, _)| *d))
            .min();
        let next = retry.into_iter().chain(deadline).min();
        let wait = next
            .map_or(CLOCK_STEP, |t| t.duration_since(now).unwrap_or_default())
            .min(CLOCK_STEP);
        self.queue
            .next_look
            .store(millis(now + wait), Ordering::Release);
        wait
    }

    pub(super) fn take(&mut self, ev: Event) {
        let now = self.queue.now();
        match ev {
            Event::Release(id) => {
                let (go, stay): (Vec<Job>, Vec<Job>) = std::mem::take(&mut self.parked)
                    .into_iter()
                    .partition(|j| j.message.id == id);
                self.parked = stay;
                for job in go {
                    let p = self.queue.peer(job.peer);
                    p.deferred.fetch_sub(1, Ordering::AcqRel);
                    p.overflow.fetch_add(1, Ordering::AcqRel);
                    self.overflow[job.peer].push_back(job);
                }
            }
            Event::Overflow(mut job) => {
                if job.expired(now) {
                    let p = self.queue.peer(job.peer);
                    p.overflow.fetch_sub(1, Ordering::AcqRel);
                    return self.expire(job);
                }
                job.data = None;
                if self.overflow.len() <= job.peer {
                    self.overflow.resize_with(job.peer + 1, VecDeque::new);
                }
                self.overflow[job.peer].push_back(job);
            }
            Event::RetryNow(peer, id) => {
                let all = std::mem::take(&mut self.deferred).into_vec();
                for Reverse(mut d) in all {
                    let hit = peer.is_none_or(|p| p == d.job.peer)
                        && id.as_ref().is_none_or(|i| *i == d.job.message.id);
                    if hit {
                        d.due = now;
                    }
                    self.deferred.push(Reverse(d));
                }
            }
            Event::Sync(answer) => self.syncs.push(answer),
            Event::Defer(mut job, due) => {
                if job.expired(now) {
                    let p = self.queue.peer(job.peer);
                    p.deferred.fetch_sub(1, Ordering::AcqRel);
                    return self.expire(job);
                }
                job.data = None;
                self.seq += 1;
                self.deferred.push(Reverse(Deferred {
                    due,
                    seq: self.seq,
                    job,
                }));
            }
            Event::Wake => {}
        }
    }

    fn expire(&self, mut job: Job) {
        job.data = None;
        // The expirer outlives the manager: this cannot fail.
        let _ = self.expired.send(job);
    }

    /// Fails what is left of every message whose deadline has passed,
    /// wherever its jobs wait: retries, overflow, held, or a pool (taken
    /// out of it; the others go back in order). A job in flight is its
    /// worker's: it fails it itself (see `Admission::Expired`).
    fn expire_due(&mut self, now: SystemTime, peers: &[Arc<PeerQueue>]) {
        let mut due: Vec<HashSet<String>> = vec![HashSet::new(); peers.len()];
        for (p, ids) in peers.iter().zip(due.iter_mut()) {
            let mut tracked = p.tracked.lock();
            while let Some((d, _)) = tracked.deadlines.first() {
                if *d > now {
                    break;
                }
                let (_, id) = tracked.deadlines.pop_first().expect("looked at above");
                ids.insert(id);
            }
        }
        if due.iter().all(HashSet::is_empty) {
            return;
        }
        let hit = |j: &Job| due[j.peer].contains(&j.message.id);
        let (gone, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.deferred)
            .into_vec()
            .into_iter()
            .partition(|Reverse(d)| hit(&d.job));
        self.deferred = keep.into();
        let (gone_parked, keep): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.parked).into_iter().partition(hit);
        self.parked = keep;
        for job in gone.into_iter().map(|Reverse(d)| d.job).chain(gone_parked) {
            peers[job.peer].deferred.fetch_sub(1, Ordering::AcqRel);
            self.expire(job);
        }
        for (i, p) in peers.iter().enumerate() {
            if due[i].is_empty() {
                continue;
            }
            let (gone, keep): (VecDeque<_>, VecDeque<_>) = std::mem::take(&mut self.overflow[i])
                .into_iter()
                .partition(hit);
            self.overflow[i] = keep;
            p.overflow.fetch_sub(gone.len(), Ordering::AcqRel);
            gone.into_iter().for_each(|j| self.expire(j));
            // The pool, in order: what stays goes back first, with its data.
            let mut stay = Vec::new();
            while let Ok(job) = p.pool_out.try_recv() {
                if hit(&job) {
                    self.expire(job);
                } else {
                    stay.push(job);
                }
            }
            p.overflow.fetch_add(stay.len(), Ordering::AcqRel);
            for job in stay.into_iter().rev() {
                self.overflow[i].push_front(job);
            }
        }
    }

    /// Due retries queue behind the overflow; counted apart from new jobs,
    /// which need not wait behind a retry.
    fn due_retries(&mut self, now: SystemTime, peers: &[Arc<PeerQueue>]) {
        while let Some(Reverse(d)) = self.deferred.pop() {
            if d.due > now {
                self.deferred.push(Reverse(d));
                break;
            }
            let p = &peers[d.job.peer];
            p.deferred.fetch_sub(1, Ordering::AcqRel);
            p.overflow.fetch_add(1, Ordering::AcqRel);
            self.overflow[d.job.peer].push_back(d.job);
        }
    }

    /// Moves overflow into the pools while they have room, in order; held
    /// jobs are parked, deleted ones dropped, expired ones failed.
    fn feed(&mut self, peers: &[Arc<PeerQueue>]) {
        let mut held_now = Vec::new();
        let mut expired_now = Vec::new();
        for (q, p) in self.overflow.iter_mut().zip(peers) {
            while let Some(mut job) = q.pop_front() {
                match self.queue.admission(&job) {
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
                    Admission::Expired => {
                        p.overflow.fetch_sub(1, Ordering::AcqRel);
                        expired_now.push(job);
                        continue;
                    }
                    Admission::Deliver => {}
                }
                if job.data.is_none() {
                    match self.spool.read(&job.message.id, &job.message.location) {
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
        self.parked.append(&mut held_now);
        expired_now.into_iter().for_each(|j| self.expire(j));
    }
}
