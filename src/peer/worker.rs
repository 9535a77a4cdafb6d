//! One worker of a peer's sub-pool: takes jobs from the peer's pool and
//! delivers them over its own connection, which it keeps open between
//! messages (NOOP while idle), reopens with backoff when it breaks, and
//! closes with QUIT at the stop.
//!
//! Outcome policy per recipient: 2xx sent; 5xx failed; 4xx, or any
//! connection trouble before the final reply, deferred and retried later.
//! A message in flight when a connection breaks is never dropped.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, TryRecvError, select};
use log::{info, warn};

use super::connection::{ConnError, Connection, Delivery};
use super::{Change, Settings, Shared, WorkerContext};
use crate::message::Job;
use crate::printable::{Brief, Printable};
use crate::smtp::Reply;
use crate::smtp::client::Refusal;

/// First wait after a failed connect; doubles up to the maximum.
const CONNECT_BACKOFF_MIN: Duration = Duration::from_millis(200);
const CONNECT_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How often a worker holding a job looks for a free budget slot.
const BUDGET_POLL: Duration = Duration::from_millis(20);
/// How often an idle or parked worker looks at its allowance and keepalive.
const IDLE_TICK: Duration = Duration::from_millis(200);

pub(super) struct Worker {
    index: usize,
    peer: Arc<Shared>,
    jobs: Receiver<Job>,
    ctx: WorkerContext,
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

impl Worker {
    pub(super) fn new(
        index: usize,
        peer: Arc<Shared>,
        jobs: Receiver<Job>,
        ctx: WorkerContext,
    ) -> Worker {
        Worker {
            index,
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
                warn!(
                    "peer={} worker={} initial connect failed: {e}",
                    self.peer.name, self.index
                );
            }
        }
        loop {
            let control = &self.peer.control;
            if self.index >= control.allowance() {
                // Above the allowance: give the connection back and wait.
                if let Some(c) = self.conn.take() {
                    c.quit();
                    self.closed();
                }
                if self.pause(IDLE_TICK) {
                    break;
                }
                continue;
            }
            // An isolated peer: nothing is taken until the next probe.
            let probe = control.probe_wait();
            if !probe.is_zero() {
                if self.pause(probe.min(IDLE_TICK)) {
                    break;
                }
                continue;
            }
            select! {
                recv(self.ctx.stop) -> _ => break,
                recv(self.jobs) -> job => match job {
                    // The allowance may have dropped while this worker waited.
                    Ok(job) if self.index >= self.peer.control.allowance() => self.ctx.queue.put_back(job),
                    Ok(job) => self.handle(job),
                    Err(_) => break,
                },
                default(IDLE_TICK) => self.keepalive(),
            }
        }
        if let Some(c) = self.conn.take() {
            c.quit();
            self.closed();
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
        if let Some(c) = self.conn.as_mut() {
            if let Err(e) = c.noop() {
                info!(
                    "peer={} worker={} idle connection lost: {e}",
                    self.peer.name, self.index
                );
                self.drop_connection();
            }
        }
    }

    /// Opens a connection; the caller holds a budget slot, which this
    /// releases on failure.
    fn connect(&mut self) -> Result<(), ConnError> {
        let p = self.peer.clone();
        let settings = p.settings();
        let hosts = &settings.hosts;
        let mut last = None;
        for i in hosts.order() {
            let host = hosts.name(i);
            match Connection::open(host, &p.helo_name, &settings.timeouts, &settings.security) {
                Ok(c) => {
                    hosts.up(i);
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
                    info!(
                        "peer={} host={host} failed: {}",
                        p.name,
                        Printable(&e.to_string())
                    );
                    hosts.failed(i);
                    last = Some(e);
                }
            }
        }
        let e = last.unwrap_or_else(|| ConnError::Connect("no hosts".into()));
        self.ctx.budget.release();
        *p.stats.last_error.lock() = e.to_string();
        self.report(p.control.connection_failed(), &e.to_string());
        Err(e)
    }

    /// Logs a change of the peer's health.
    fn report(&self, change: Change, why: &str) {
        let name = &self.peer.name;
        match change {
            Change::Failed => warn!(
                "peer={name} unhealthy after \"{}\": one probing connection, the rest stays queued",
                Printable(why)
            ),
            Change::Recovered => info!("peer={name} recovered: connections grow back from one"),
            Change::None => {}
        }
    }

    /// True if the open connection reached max_messages_per_connection or
    /// max_connection_age, or was made before a reload.
    fn worn_out(&self) -> bool {
        let settings = self.peer.settings();
        let cfg = &settings.cfg;
        let reloaded = self
            .conn_settings
            .as_ref()
            .is_some_and(|s| !Arc::ptr_eq(s, &settings));
        self.conn.is_some()
            && (reloaded
                || (cfg.max_messages_per_connection > 0
                    && self.conn_messages >= cfg.max_messages_per_connection)
                || (!cfg.max_connection_age.is_zero()
                    && self.conn_since.elapsed() >= cfg.max_connection_age))
    }

    fn drop_connection(&mut self) {
        if self.conn.take().is_some() {
            self.closed();
        }
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

    fn attempt(&mut self, mut job: Job) {
        if self.ctx.queue.is_deleted(&job.message.id) {
            return;
        }
        if self.ctx.queue.is_held(&job.message.id) {
            // Held since it entered the pool: it waits with the manager.
            self.ctx.queue.put_back(job);
            return;
        }
        job.attempts += 1;
        // Expiry bounds the retries: the first attempt is always made (the
        // receiving MMSC enforces X-Mms-Expiry towards its subscriber).
        if job.attempts > 1 && self.ctx.queue.now() >= job.message.expires {
            let reply = Reply::new(554, "5.4.7 delivery time expired");
            let replies = vec![reply; job.rcpts.len()];
            self.dispose(job, replies, None);
            return;
        }
        if self.worn_out() {
            // max_messages_per_connection, max_connection_age or a
            // reload (new hosts, TLS, AUTH): start afresh.
            if let Some(c) = self.conn.take() {
                c.quit();
                self.closed();
            }
        }
        if self.conn.is_none() {
            while !self.ctx.budget.try_acquire() {
                if self.pause(BUDGET_POLL) {
                    self.defer(job, "relay stopping before a connection slot was free");
                    return;
                }
            }
            if let Err(e) = self.connect() {
                warn!(
                    "peer={} worker={} connect failed: {}",
                    self.peer.name,
                    self.index,
                    Printable(&e.to_string())
                );
                self.defer(job, &e.to_string());
                self.pause(self.backoff);
                self.backoff = (self.backoff * 2).min(CONNECT_BACKOFF_MAX);
                return;
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
        // Chain further jobs from the pool onto this connection while they
        // are waiting, unless the relay is stopping, the peer is
        // rate-limited (each message waits for its token), or the
        // connection has carried its share.
        let mut conn = self.conn.take().expect("connected above");
        let (jobs, stop, queue) = (
            self.jobs.clone(),
            self.ctx.stop.clone(),
            self.ctx.queue.clone(),
        );
        let limit = settings.cfg.max_messages_per_connection;
        let chain = settings.rate.is_none();
        let taken = std::cell::Cell::new(self.conn_messages + 1);
        let next = || {
            let full = limit > 0 && taken.get() >= limit;
            if !chain || full || matches!(stop.try_recv(), Err(TryRecvError::Disconnected)) {
                return None;
            }
            // What needs more than a delivery (deleted, held, expired)
            // is left to `attempt`: the chain stops there.
            loop {
                let mut j = jobs.try_recv().ok()?;
                if queue.is_deleted(&j.message.id) {
                    continue;
                }
                if queue.is_held(&j.message.id)
                    || (j.attempts > 0 && queue.now() >= j.message.expires)
                {
                    queue.put_back(j);
                    return None;
                }
                taken.set(taken.get() + 1);
                j.attempts += 1;
                return Some(j);
            }
        };
        let host = conn.host().to_string();
        let result = conn.deliver_chain(job, next, |job, d| self.finish(job, d, &host));
        self.conn_messages = taken.get();
        match result {
            Ok(()) => self.conn = Some(conn),
            Err((e, unknown)) => {
                *self.peer.stats.last_error.lock() = e.to_string();
                drop(conn);
                self.closed();
                self.report(self.peer.control.connection_failed(), &e.to_string());
                let reason = match e {
                    ConnError::ServiceClosing(r) => r.to_string(),
                    other => other.to_string(),
                };
                for job in unknown {
                    self.defer(job, &reason);
                }
            }
        }
    }

    /// `host` is the one the connection talks to.
    fn finish(&mut self, job: Job, delivery: Delivery, host: &str) {
        self.last_used = Instant::now();
        let (replies, remote) = match delivery {
            Delivery::Replies(r) => {
                let control = &self.peer.control;
                let change = if r.iter().all(Reply::is_transient) {
                    control.transient()
                } else {
                    control.answered()
                };
                self.report(change, &r[0].to_string());
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
                (vec![reply; job.rcpts.len()], None)
            }
        };
        self.dispose(job, replies, remote);
    }

    /// Splits recipients by the class of their reply: logs each group,
    /// counts them, and queues the deferred ones again. `remote` is the
    /// host that gave the replies (`None`: we made them up).
    fn dispose(&mut self, job: Job, replies: Vec<Reply>, remote: Option<&str>) {
        let mut deferred = Vec::new();
        let mut groups: Vec<(&'static str, &Reply, Vec<String>)> = Vec::new();
        for (rcpt, reply) in job.rcpts.iter().zip(&replies) {
            let status = if reply.is_positive() {
                "sent"
            } else if reply.is_transient() {
                deferred.push(rcpt.clone());
                continue;
            } else {
                "failed"
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
        for (status, reply, rcpts) in &groups {
            let counter = if *status == "sent" {
                &stats.sent
            } else {
                &stats.failed
            };
            counter.fetch_add(rcpts.len() as u64, Ordering::Relaxed);
            if *status == "sent" {
                let delay = self
                    .ctx
                    .queue
                    .now()
                    .duration_since(job.message.accepted)
                    .unwrap_or_default();
                stats.delay.observe(delay, rcpts.len() as u64);
            }
            self.ctx.spool.done(&job.message.id, &self.peer.name, rcpts);
            self.ctx.queue.done(job.peer, &job.message.id, rcpts);
            if *status == "failed" {
                self.ctx
                    .bounce
                    .failed(&job, &self.peer.name, remote, rcpts, reply);
            }
            log_disposition(
                &job,
                &self.peer.name,
                rcpts,
                status,
                &reply.to_string(),
                None,
                self.ctx.queue.now(),
            );
        }
        if !deferred.is_empty() {
            let reply = job
                .rcpts
                .iter()
                .zip(&replies)
                .find(|(_, r)| r.is_transient())
                .map(|(_, r)| r.to_string())
                .unwrap_or_default();
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
        let at = self.ctx.queue.now() + delay;
        let name = &self.peer.name;
        self.ctx
            .spool
            .retry(&job.message.id, name, &job.rcpts, job.attempts, at);
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
