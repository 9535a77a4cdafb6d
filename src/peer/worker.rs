//! One worker of a peer's sub-pool: takes jobs from the peer's pool and
//! delivers them over its own connection, which it keeps open between
//! messages (NOOP while idle), reopens with backoff when it breaks, and
//! closes with QUIT at the stop.
//!
//! What each reply and each failure means (sent, deferred, failed, tried
//! again at once on a new connection; the connection kept or closed; the
//! peer's health) is `policy`'s decision: this file carries it out. A
//! message in flight when a connection breaks is never dropped.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, TryRecvError, select};
use log::{debug, info, warn};

use super::connection::{ConnError, Connection, Delivery, host_name};
use super::policy::{self, Attempt, Fate, Health, Next, Reason, Stage, Trouble};
use super::{Change, PeerStats, Settings, Shared, WorkerContext};
use crate::message::Job;
use crate::peer::bounce::Bounce;
use crate::queue::{Admission, Queue};
use crate::smtp::Reply;
use crate::smtp::client::Refusal;
use crate::spool::{Outcome, OutcomeKind, Spool};
use crate::sys::printable::{Brief, Printable};

/// First wait after a failed connect; doubles up to the maximum.
const CONNECT_BACKOFF_MIN: Duration = Duration::from_millis(200);
const CONNECT_BACKOFF_MAX: Duration = Duration::from_secs(30);

pub(super) struct Worker {
    index: usize,
    peer: Arc<Shared>,
    jobs: Receiver<Job>,
    ctx: WorkerContext,
    /// Told when the peer's allowance changes.
    wake: Receiver<()>,
    conn: Option<Connection>,
    /// The settings the open connection was made with: a reload replaces
    /// them, and the connection is then reopened before its next message.
    conn_settings: Option<Arc<Settings>>,
    /// When the open connection was made, and how many messages it took.
    conn_since: Instant,
    conn_messages: u32,
    /// Last traffic on the connection, for keepalive.
    last_used: Instant,
    backoff: Duration,
}

/// Why no connection could be had for a message.
struct NoConnection {
    error: ConnError,
    /// Every host refused us with a 5xx: the recipients fail.
    refused: bool,
    /// The host the error came from.
    host: String,
}

impl Worker {
    pub(super) fn new(
        index: usize,
        peer: Arc<Shared>,
        jobs: Receiver<Job>,
        ctx: WorkerContext,
    ) -> Worker {
        Worker {
            index,
            wake: peer.control.waker(),
            peer,
            jobs,
            ctx,
            conn: None,
            conn_settings: None,
            conn_since: Instant::now(),
            conn_messages: 0,
            last_used: Instant::now(),
            backoff: CONNECT_BACKOFF_MIN,
        }
    }

    pub(super) fn run(mut self) {
        if self.index < self.peer.control.allowance() && self.ctx.budget.try_acquire() {
            if let Err(e) = self.connect() {
                debug!(
                    "peer={} worker={} initial connect failed: {}",
                    self.peer.name,
                    self.index,
                    Printable(&e.error.to_string())
                );
            }
        }
        loop {
            let control = &self.peer.control;
            if self.index >= control.allowance() {
                // Above the allowance: give the connection back and wait
                // for it to change.
                self.quit(Reason::Allowance);
                if self.wait_for(None) {
                    break;
                }
                continue;
            }
            // An isolated peer: nothing is taken until the next probe.
            let probe = control.probe_wait();
            if !probe.is_zero() {
                if self.wait_for(Some(probe)) {
                    break;
                }
                continue;
            }
            // Idle: a job, a change of allowance, or the keepalive's time.
            let keepalive = self.conn.as_ref().map(|_| {
                let due = self.last_used + self.peer.settings().cfg.keepalive;
                crossbeam_channel::at(due)
            });
            let keepalive = keepalive.unwrap_or_else(crossbeam_channel::never);
            select! {
                recv(self.ctx.stop) -> _ => break,
                recv(self.wake) -> _ => {}
                recv(self.jobs) -> job => match job {
                    // The allowance may have dropped while this worker waited.
                    Ok(job) if self.index >= self.peer.control.allowance() => self.ctx.queue.put_back(job),
                    Ok(job) => self.handle(job),
                    Err(_) => break,
                },
                recv(keepalive) -> _ => self.keepalive(),
            }
        }
        self.quit(Reason::Stop);
    }

    /// Waits until the allowance changes or `d` passes (`None`: no limit),
    /// unless the relay stops first; true if it stopped.
    fn wait_for(&self, d: Option<Duration>) -> bool {
        let timer = d.map_or_else(crossbeam_channel::never, crossbeam_channel::after);
        select! {
            recv(self.ctx.stop) -> _ => true,
            recv(self.wake) -> _ => false,
            recv(timer) -> _ => false,
        }
    }

    /// Waits `d` unless the relay stops first; true if it stopped.
    fn pause(&self, d: Duration) -> bool {
        select! {
            recv(self.ctx.stop) -> _ => true,
            default(d) => false,
        }
    }

    fn keepalive(&mut self) {
        if self.last_used.elapsed() < self.peer.settings().cfg.keepalive {
            return;
        }
        self.last_used = Instant::now();
        let Some(c) = self.conn.as_mut() else {
            return;
        };
        if let Some(e) = c.gone().map_or_else(|| c.noop().err(), Some) {
            let v = policy::trouble(e.stage, &e.trouble, Attempt::default());
            self.broke(&e, v.next);
        }
    }

    /// Opens a connection; the caller holds a budget slot, which this
    /// releases on failure. Hosts are tried in turn; one that refuses us
    /// got QUIT.
    fn connect(&mut self) -> Result<(), NoConnection> {
        let p = self.peer.clone();
        let settings = p.settings();
        let hosts = &settings.hosts;
        let mut last = None;
        let mut refused = true;
        let order = hosts.order().unwrap_or_else(|e| {
            last = Some((
                ConnError {
                    stage: Stage::Connect,
                    trouble: Trouble::Io(e),
                },
                Health::ConnectionFailed,
                hosts.describe(),
            ));
            Vec::new()
        });
        for target in order {
            let host = target.name.as_str();
            let opened = Connection::open_to(
                host,
                target.addrs.as_deref(),
                &p.helo_name,
                &settings.timeouts,
                &settings.security,
            );
            match opened {
                Ok(mut c) => {
                    c.set_chunking(settings.chunking());
                    hosts.up(host);
                    if p.control.set_misconfigured(false) {
                        info!("peer={} TLS and AUTH work again", p.name);
                    }
                    p.stats.connections_opened.fetch_add(1, Ordering::Relaxed);
                    p.stats.connections_open.fetch_add(1, Ordering::Relaxed);
                    p.streams.lock()[self.index] = c.try_clone_stream().ok();
                    self.conn = Some(c);
                    self.conn_settings = Some(settings.clone());
                    self.conn_since = Instant::now();
                    self.last_used = Instant::now();
                    self.conn_messages = 0;
                    self.backoff = CONNECT_BACKOFF_MIN;
                    return Ok(());
                }
                Err(e) => {
                    let v = policy::trouble(e.stage, &e.trouble, Attempt::default());
                    refused &= v.fate == Fate::Failed;
                    let said = Printable(&e.to_string()).to_string();
                    if v.health == Health::Misconfigured {
                        // Said once, when the peer's state changes.
                        debug!("peer={} host={host} failed: {said}", p.name);
                    } else {
                        info!("peer={} host={host} failed: {said}", p.name);
                    }
                    hosts.failed(host);
                    p.stats.connections_failed.fetch_add(1, Ordering::Relaxed);
                    // One host our settings do not fit makes the peer
                    // misconfigured, whatever the others did: its error is
                    // the one kept.
                    if !matches!(last, Some((_, Health::Misconfigured, _))) {
                        last = Some((e, v.health, host.to_string()));
                    }
                }
            }
        }
        self.ctx.budget.release();
        let (error, health, host) = last.unwrap_or_else(|| {
            let e = ConnError {
                stage: Stage::Connect,
                trouble: Trouble::Io("no hosts".into()),
            };
            (e, Health::ConnectionFailed, String::new())
        });
        *p.stats.last_error.lock() = error.to_string();
        self.health(health, &error.to_string());
        Err(NoConnection {
            error,
            refused,
            host,
        })
    }

    /// Reports an outcome to the peer's health, and logs what changed.
    fn health(&self, health: Health, why: &str) {
        let control = &self.peer.control;
        let name = &self.peer.name;
        let change = match health {
            Health::None => Change::None,
            Health::Answered => control.answered(),
            Health::Transient => control.transient(),
            Health::ConnectionFailed => control.connection_failed(),
            Health::Misconfigured => {
                if control.set_misconfigured(true) {
                    warn!(
                        "peer={name} misconfigured: \"{}\": messages stay queued until the TLS or AUTH settings and the peer's agree",
                        Printable(why)
                    );
                }
                control.connection_failed()
            }
        };
        match change {
            Change::Failed => warn!(
                "peer={name} unhealthy after \"{}\": one probing connection, the rest stays queued",
                Printable(why)
            ),
            Change::Recovered => info!("peer={name} recovered: connections grow back from one"),
            Change::None => {}
        }
    }

    /// Why the open connection should not take another message:
    /// max_messages_per_connection (configured or learnt),
    /// max_connection_age, or made before a reload.
    fn worn_out(&self) -> Option<Reason> {
        let settings = self.peer.settings();
        let limit = settings.message_limit();
        if self
            .conn_settings
            .as_ref()
            .is_some_and(|s| !Arc::ptr_eq(s, &settings))
        {
            Some(Reason::Reload)
        } else if limit > 0 && self.conn_messages >= limit {
            Some(Reason::MessageLimit)
        } else if !settings.cfg.max_connection_age.is_zero()
            && self.conn_since.elapsed() >= settings.cfg.max_connection_age
        {
            Some(Reason::Age)
        } else {
            None
        }
    }

    /// Closes the open connection with QUIT, for `reason`.
    fn quit(&mut self, reason: Reason) {
        if let Some(c) = self.conn.take() {
            info!(
                "peer={} worker={} host={} closing the connection: {reason}",
                self.peer.name,
                self.index,
                c.host()
            );
            c.quit();
            self.closed();
        }
    }

    /// Carries out `next` for the open connection after `e`.
    fn broke(&mut self, e: &ConnError, next: Next) {
        let Some(c) = self.conn.take() else {
            return;
        };
        let reason = match next {
            Next::Close(r) => r,
            Next::Keep | Next::Reset => Reason::Lost,
        };
        info!(
            "peer={} worker={} host={} closing the connection: {reason} ({})",
            self.peer.name,
            self.index,
            c.host(),
            Printable(&e.to_string())
        );
        if reason == Reason::SessionLimit || reason == Reason::ResetRefused {
            // The peer still listens: say goodbye.
            c.quit();
        }
        self.closed();
    }

    fn closed(&mut self) {
        self.peer.streams.lock()[self.index] = None;
        self.peer
            .stats
            .connections_open
            .fetch_sub(1, Ordering::Relaxed);
        self.ctx.budget.release();
    }

    fn handle(&mut self, job: Job) {
        let stats = &self.peer.stats;
        stats.busy.fetch_add(1, Ordering::Relaxed);
        self.attempt(job);
        self.peer.stats.busy.fetch_sub(1, Ordering::Relaxed);
    }

    fn expired(&self, job: &Job) -> bool {
        job.expired(self.ctx.queue.now())
    }

    fn attempt(&mut self, mut job: Job) {
        match self.ctx.queue.admission(&job) {
            Admission::Deleted => return,
            // Held since it entered the pool: it waits with the manager.
            Admission::Held => return self.ctx.queue.put_back(job),
            Admission::Expired => return self.expire(job, ""),
            Admission::Deliver => job.attempts += 1,
        }
        let mut retried = false;
        loop {
            if let Some(reason) = self.worn_out() {
                self.quit(reason);
            }
            if let Some(e) = self.conn.as_ref().and_then(Connection::gone) {
                let v = policy::trouble(e.stage, &e.trouble, Attempt::default());
                self.broke(&e, v.next);
            }
            if self.conn.is_none() {
                if !self.ctx.budget.acquire(&self.ctx.stop) {
                    self.defer(job, "relay stopping before a connection slot was free");
                    return;
                }
                if let Err(no) = self.connect() {
                    return self.unconnected(job, no);
                }
            }
            let settings = self.peer.settings();
            if let Some(bucket) = &settings.rate {
                let wait = bucket.reserve();
                if !wait.is_zero() && self.pause(wait) {
                    self.defer(job, "relay stopping while rate-limited");
                    return;
                }
            }
            match self.chain(job, retried, &settings) {
                Some(again) => {
                    job = again;
                    retried = true;
                }
                None => return,
            }
        }
    }

    /// A message for which no connection could be had.
    fn unconnected(&mut self, job: Job, no: NoConnection) {
        let e = no.error;
        let v = policy::trouble(
            e.stage,
            &e.trouble,
            Attempt {
                expired: self.expired(&job),
                ..Attempt::default()
            },
        );
        match (&e.trouble, v.fate) {
            (Trouble::Reply(r), Fate::Failed) if no.refused => {
                let replies = vec![r.clone(); job.rcpts.len()];
                self.dispose(job, replies, Some(&no.host));
            }
            (_, Fate::Expired) => self.expire(job, &e.to_string()),
            _ => {
                if v.health != Health::Misconfigured {
                    warn!(
                        "peer={} worker={} connect failed: {}",
                        self.peer.name,
                        self.index,
                        Printable(&e.to_string())
                    );
                }
                self.defer(job, &e.to_string());
                self.pause(self.backoff);
                self.backoff = (self.backoff * 2).min(CONNECT_BACKOFF_MAX);
            }
        }
    }

    /// Delivers `job`, then further jobs from the pool while they are
    /// waiting, over the open connection. Returns a job to try again at
    /// once on a new connection (`retried`: `job` already was).
    fn chain(&mut self, job: Job, retried: bool, settings: &Settings) -> Option<Job> {
        // Chain further jobs unless the relay is stopping, the peer is
        // rate-limited (each message waits for its token), or the
        // connection has carried its share.
        let mut conn = self.conn.take().expect("connected by the caller");
        let (jobs, stop, queue) = (
            self.jobs.clone(),
            self.ctx.stop.clone(),
            self.ctx.queue.clone(),
        );
        let limit = settings.message_limit();
        let chain = settings.rate.is_none();
        let taken = std::cell::Cell::new(self.conn_messages + 1);
        let next = || {
            let full = limit > 0 && taken.get() >= limit;
            if !chain || full || matches!(stop.try_recv(), Err(TryRecvError::Disconnected)) {
                return None;
            }
            // What needs more than a delivery (held, expired) is left to
            // `attempt`: the chain stops there.
            loop {
                let mut j = jobs.try_recv().ok()?;
                match queue.admission(&j) {
                    Admission::Deleted => continue,
                    Admission::Held | Admission::Expired => {
                        queue.put_back(j);
                        return None;
                    }
                    Admission::Deliver => {}
                }
                taken.set(taken.get() + 1);
                j.attempts += 1;
                return Some(j);
            }
        };
        let retried_id = retried.then(|| job.message.id.clone());
        let host = conn.host().to_string();
        let chunked = conn.chunked();
        let result =
            conn.deliver_chain(job, next, |job, delivery| self.finish(job, delivery, &host));
        if chunked && !conn.chunked() && settings.learn_no_chunking() {
            warn!(
                "peer={} host={host} offers CHUNKING but refused BDAT: DATA until the next reload (set chunking = no)",
                self.peer.name
            );
        }
        self.conn_messages = taken.get();
        self.conn = Some(conn);
        let broken = match result {
            Ok(()) => return None,
            Err(b) => b,
        };
        let e = broken.error;
        *self.peer.stats.last_error.lock() = e.to_string();
        let mut again = None;
        let mut first = None;
        for (i, u) in broken.unknown.into_iter().enumerate() {
            let a = Attempt {
                earlier: u.earlier,
                retried: retried_id.as_ref() == Some(&u.item.message.id),
                expired: self.expired(&u.item),
            };
            let v = policy::trouble(u.stage, &e.trouble, a);
            if i == 0 {
                first = Some(v);
            }
            let stopping = matches!(self.ctx.stop.try_recv(), Err(TryRecvError::Disconnected));
            match v.fate {
                // Not while stopping: the stop cuts connections, and a new
                // one would outlive it.
                Fate::RetryNow if again.is_none() && !stopping => {
                    info!(
                        "{} peer={} worker={} trying again at once on a new connection: {}",
                        u.item.message.id,
                        self.peer.name,
                        self.index,
                        Printable(&e.to_string())
                    );
                    again = Some(u.item);
                }
                // The rest of a batch the peer took nothing of (it ended
                // the session at an earlier message): back in line,
                // untried, for the next connection.
                Fate::RetryNow if !stopping && u.stage == Stage::Mail => {
                    let mut job = u.item;
                    info!(
                        "{} peer={} worker={} back in line, untried: {}",
                        job.message.id,
                        self.peer.name,
                        self.index,
                        Printable(&e.to_string())
                    );
                    job.attempts = job.attempts.saturating_sub(1);
                    self.ctx.queue.put_back(job);
                }
                Fate::Expired => self.expire(u.item, &e.to_string()),
                _ => self.defer(u.item, &e.to_string()),
            }
            // Only the message the trouble came at can tell a limit.
            if let Some(n) = v.limit.filter(|_| i == 0) {
                if settings.learn_limit(n) {
                    info!(
                        "peer={} ends sessions after {n} messages (\"{}\"): max_messages_per_connection = {n} until the next reload",
                        self.peer.name,
                        Printable(&e.trouble.to_string())
                    );
                }
            }
        }
        // None unknown: RSET failed after the last message was decided.
        let v = first.unwrap_or_else(|| policy::trouble(e.stage, &e.trouble, Attempt::default()));
        self.broke(&e, v.next);
        self.health(v.health, &e.to_string());
        again
    }

    fn finish(&mut self, job: Job, delivery: Delivery, host: &str) {
        self.last_used = Instant::now();
        let (replies, remote) = match delivery {
            Delivery::Replies(r) => {
                self.health(policy::answered(&r), &r[0].to_string());
                (r, Some(host))
            }
            Delivery::Refused(refusal) => {
                let reply = match refusal {
                    Refusal::TooBig { size, limit } => Reply::new(
                        552,
                        format!("5.3.4 message of {size} octets over the peer's SIZE {limit}"),
                    ),
                    Refusal::No8BitMime => Reply::new(554, "5.6.3 peer does not offer 8BITMIME"),
                };
                // Ours, not the host's.
                (vec![reply; job.rcpts.len()], None)
            }
        };
        self.dispose(job, replies, remote);
    }

    /// Fails every recipient of `job`: its time is up (`last`: why the
    /// last attempt did not deliver, if one was just made).
    fn expire(&mut self, job: Job, last: &str) {
        let text = if last.is_empty() {
            "5.4.7 delivery time expired".to_string()
        } else {
            format!("5.4.7 delivery time expired; last attempt: {last}")
        };
        let replies = vec![Reply::new(554, text); job.rcpts.len()];
        self.dispose(job, replies, None);
    }

    /// Splits recipients by the fate of their reply: logs each group,
    /// counts them, and queues the deferred ones again. `remote`: the host
    /// the replies came from, if they came from one.
    fn dispose(&mut self, job: Job, replies: Vec<Reply>, remote: Option<&str>) {
        let expired = self.expired(&job);
        let mut deferred = Vec::new();
        let mut last = None;
        let mut groups: Vec<(&'static str, Reply, Vec<String>)> = Vec::new();
        for (rcpt, reply) in job.rcpts.iter().zip(&replies) {
            let (status, reply) = match policy::recipient(reply, expired) {
                Fate::Sent => ("sent", reply.clone()),
                Fate::Failed => ("failed", reply.clone()),
                Fate::Expired => (
                    "failed",
                    Reply::new(
                        554,
                        format!("5.4.7 delivery time expired; last attempt: {reply}"),
                    ),
                ),
                Fate::Deferred | Fate::RetryNow => {
                    deferred.push(rcpt.clone());
                    last.get_or_insert(reply);
                    continue;
                }
            };
            match groups
                .iter_mut()
                .find(|(s, r, _)| *s == status && *r == reply)
            {
                Some(g) => g.2.push(rcpt.clone()),
                None => groups.push((status, reply, vec![rcpt.clone()])),
            }
        }
        let stats = &self.peer.stats;
        let records = Records {
            spool: &self.ctx.spool,
            queue: &self.ctx.queue,
            bounce: &self.ctx.bounce,
        };
        for (status, reply, rcpts) in &groups {
            if *status == "failed" {
                let remote = remote.map(host_name);
                records.failed(stats, &self.peer.name, &job, rcpts, reply, remote);
                continue;
            }
            stats.sent.fetch_add(rcpts.len() as u64, Ordering::Relaxed);
            let now = self.ctx.queue.now();
            let delay = now.duration_since(job.message.accepted).unwrap_or_default();
            stats.delay.observe(delay, rcpts.len() as u64);
            let outcome = Outcome {
                kind: OutcomeKind::Sent,
                code: reply.code,
                reply: reply.text(),
                attempts: job.attempts,
                at: now,
            };
            self.ctx
                .spool
                .done(&job.message.id, &self.peer.name, rcpts, outcome);
            self.ctx.queue.done(job.peer, &job.message.id, rcpts);
            log_disposition(
                &job,
                &self.peer.name,
                rcpts,
                status,
                &reply.to_string(),
                None,
                now,
            );
        }
        if !deferred.is_empty() {
            let reply = last.map(Reply::to_string).unwrap_or_default();
            let retry = Job {
                rcpts: deferred,
                ..job
            };
            self.defer(retry, &reply);
        }
    }

    fn defer(&self, job: Job, reason: &str) {
        self.peer
            .stats
            .deferred
            .fetch_add(job.rcpts.len() as u64, Ordering::Relaxed);
        let delay = self.ctx.queue.retry_delay(job.attempts);
        let now = self.ctx.queue.now();
        let at = now + delay;
        let name = &self.peer.name;
        // The reason starts with the reply's code when a peer gave one.
        let code = reason
            .get(..3)
            .and_then(|c| c.parse().ok())
            .filter(|c| (400..600).contains(c))
            .unwrap_or(0);
        let outcome = Outcome {
            kind: OutcomeKind::Deferred,
            code,
            reply: reason
                .get(4..)
                .filter(|_| code > 0)
                .unwrap_or(reason)
                .to_string(),
            attempts: job.attempts,
            at: now,
        };
        self.ctx
            .spool
            .retry(&job.message.id, name, &job.rcpts, at, outcome);
        log_disposition(
            &job,
            name,
            &job.rcpts,
            "deferred",
            reason,
            Some(delay),
            at - delay,
        );
        self.ctx.queue.defer(job, reason, at);
    }
}

/// Where outcomes are recorded: the spool, the queue, the failed area.
#[derive(Clone, Copy)]
pub(super) struct Records<'a> {
    pub(super) spool: &'a Spool,
    pub(super) queue: &'a Queue,
    pub(super) bounce: &'a Bounce,
}

impl Records<'_> {
    /// Records that `rcpts` of `job` failed at `peer` with `reply` (from
    /// the host `remote`, if a host said it): counted, kept in the failed
    /// area with a DSN to the sender, done in the spool and the queue, and
    /// logged. A crash between the DSN and the spool's record fails the
    /// message again at the next start: a second DSN, never none.
    pub(super) fn failed(
        self,
        stats: &PeerStats,
        peer: &str,
        job: &Job,
        rcpts: &[String],
        reply: &Reply,
        remote: Option<&str>,
    ) {
        stats
            .failed
            .fetch_add(rcpts.len() as u64, Ordering::Relaxed);
        // Before the spool lets the message go: a job without its data
        // (one the queue manager expired) reads it back from there.
        self.bounce.failed(job, peer, remote, rcpts, reply);
        let now = self.queue.now();
        let outcome = Outcome {
            kind: OutcomeKind::Failed,
            code: reply.code,
            reply: reply.text(),
            attempts: job.attempts,
            at: now,
        };
        self.spool.done(&job.message.id, peer, rcpts, outcome);
        self.queue.done(job.peer, &job.message.id, rcpts);
        log_disposition(job, peer, rcpts, "failed", &reply.to_string(), None, now);
    }
}

/// The one log line per outcome, in `key=value` form for grep.
fn log_disposition(
    job: &Job,
    peer: &str,
    rcpts: &[String],
    status: &str,
    reply: &str,
    retry: Option<Duration>,
    now: SystemTime,
) {
    let m = &job.message;
    let to: Vec<String> = rcpts
        .iter()
        .map(|r| format!("<{}>", Printable(r)))
        .collect();
    let retry = retry
        .map(|d| format!(" retry_in={}s", d.as_secs_f64()))
        .unwrap_or_default();
    info!(
        "{} peer={} from=<{}> to={} mid={} tid={} status={} attempts={} delay={:.3}s{} reply=\"{}\"",
        m.id,
        peer,
        Printable(&m.from),
        to.join(","),
        Brief(m.info.message_id.as_deref().unwrap_or("-")),
        Brief(m.info.transaction_id.as_deref().unwrap_or("-")),
        status,
        job.attempts,
        now.duration_since(m.accepted)
            .unwrap_or_default()
            .as_secs_f64(),
        retry,
        Printable(&reply.replace('"', "'")),
    );
}
