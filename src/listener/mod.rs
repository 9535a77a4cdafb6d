//! Inbound SMTP: accept loops, one thread per session (at most
//! `max_sessions` from partners and strangers, and `max_local_sessions`
//! from the local MMSC's hosts, counted apart), read and write deadlines,
//! and the relay's answers to RCPT and to the end of DATA.
//!
//! - RCPT: parse the address (553 5.1.3), route it (550 5.1.2), apply
//!   relay control (550 5.7.1).
//! - End of DATA: the MM4 check (554); recipients this message ID was
//!   already accepted for are dropped as duplicates; the message gets its
//!   queue ID and `Received:` line, is made durable in the spool (452/451
//!   if that fails), and only then answered 250 and split into one job per
//!   destination peer.
//!
//! Stop: the accept loops end; idle sessions get 421 and are closed; a
//! session receiving DATA finishes that message, then gets 421, unless
//! `shutdown_timeout` passes first: then it is cut.
//!
//! What a client repeats is bounded: refusals are logged once per reason
//! per session (`Refusals`), refusals at accept at most once a second,
//! and failed AUTH attempts slow the next ones (`throttle`).

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use log::{debug, error, info, warn};
use parking_lot::{Condvar, Mutex, RwLock};

use crate::access::{AccessControl, Cidr, ClientClass};
use crate::config::{AuthUser, Config, Mm4Check};
use crate::dedup::{self, Dedup};
use crate::message::{IdSource, Job, Message, received_header};
use crate::mm4;
use crate::owned::Owned;
use crate::printable::Brief;
use crate::queue::Queue;
use crate::route::{Address, PeerId, Router};
use crate::smtp::Reply;
use crate::smtp::session::{Envelope, Handler, Session, SessionConfig};
use crate::spool::{NewMessage, Spool, SpoolError};
use crate::tls::{self, Stream};

mod throttle;

use throttle::{AuthThrottle, RateLimitedWarning, address_key};

/// Inbound counters, for the metrics.
#[derive(Debug, Default)]
pub struct InboundStats {
    /// Sessions open now.
    pub sessions_open: AtomicUsize,
    /// Sessions accepted since start.
    pub sessions_total: AtomicU64,
    /// Messages answered 250 and queued.
    pub accepted: AtomicU64,
    /// Messages answered 250 as duplicates, not queued again.
    pub duplicates: AtomicU64,
    /// Messages refused by the MM4 check or SMTP data rules.
    pub rejected_content: AtomicU64,
    /// Messages refused because the spool was full or failed.
    pub rejected_spool: AtomicU64,
    /// Recipients refused: bad address syntax.
    pub rcpt_bad_address: AtomicU64,
    /// Recipients refused: no route.
    pub rcpt_unroutable: AtomicU64,
    /// Recipients refused: relaying denied.
    pub rcpt_relay_denied: AtomicU64,
    /// Connections refused by the per-address session or rate limits.
    pub refused_per_ip: AtomicU64,
    /// Sessions that started TLS (STARTTLS or implicit).
    pub tls_sessions: AtomicU64,
    /// AUTH attempts that failed.
    pub auth_failures: AtomicU64,
    /// AUTH attempts answered only after a delay, for recent failures
    /// from the same address or for the same account.
    pub auth_delayed: AtomicU64,
}

/// What sessions decide with; replaced whole by a configuration reload.
struct Tables {
    session: SessionConfig,
    router: Router,
    access: AccessControl,
    peer_names: Vec<String>,
    mm4_check: Mm4Check,
    command_timeout: Duration,
    data_timeout: Duration,
    session_timeout: Duration,
    queue_lifetime: Duration,
    limits: mm4::Limits,
    tls: Option<tls::Acceptor>,
    tls_required_from: Vec<Cidr>,
    auth_users: Vec<AuthUser>,
    max_sessions_per_ip: usize,
    connection_rate_per_ip: u32,
}

impl Tables {
    fn new(config: &Config) -> io::Result<Tables> {
        let l = &config.listener;
        let tls = tls::acceptor(l).map_err(|e| {
            io::Error::other(format!("{}: [listener] TLS: {e}", config.path.display()))
        })?;
        Ok(Tables {
            session: SessionConfig {
                hostname: config.relay.hostname.clone(),
                max_message_size: l.max_message_size,
                max_recipients: l.max_recipients,
                starttls: tls.is_some(),
                auth: !config.auth_users.is_empty(),
                auth_plaintext: l.auth_plaintext,
                max_bad_commands: l.max_bad_commands,
                max_refused_recipients: l.max_refused_recipients,
            },
            router: config.router(),
            access: config.access_control(),
            peer_names: config.peers.iter().map(|p| p.name.clone()).collect(),
            mm4_check: l.mm4_check,
            command_timeout: l.command_timeout,
            data_timeout: l.data_timeout,
            session_timeout: l.session_timeout,
            queue_lifetime: config.relay.queue_lifetime,
            limits: mm4::Limits {
                max_header_fields: l.max_header_fields,
                max_header_size: l.max_header_size,
                max_mime_depth: l.max_mime_depth,
            },
            tls,
            tls_required_from: l.tls_required_from.clone(),
            auth_users: config.auth_users.clone(),
            max_sessions_per_ip: l.max_sessions_per_ip,
            connection_rate_per_ip: l.connection_rate_per_ip,
        })
    }
}

/// Tables built from a configuration by [`Inbound::prepare`], not yet in
/// force.
pub struct Prepared(Tables);

/// What every session shares: the tables it decides with and the queue.
pub struct Inbound {
    tables: RwLock<Arc<Tables>>,
    ids: Arc<IdSource>,
    queue: Arc<Queue>,
    spool: Arc<Spool>,
    dedup: Dedup,
    auth_throttle: AuthThrottle,
    stats: Arc<InboundStats>,
}

impl Inbound {
    /// The inbound counters.
    pub fn stats(&self) -> Arc<InboundStats> {
        self.stats.clone()
    }

    /// Builds what sessions decide with (the TLS server side among it)
    /// without applying it, so a start or reload can fail before it
    /// changes anything.
    pub fn prepare(config: &Config) -> Result<Prepared, String> {
        Tables::new(config).map(Prepared).map_err(|e| e.to_string())
    }

    /// Builds the shared part from prepared tables and the configuration.
    pub fn new(
        tables: Prepared,
        config: &Config,
        ids: Arc<IdSource>,
        queue: Arc<Queue>,
        spool: Arc<Spool>,
    ) -> Inbound {
        // What was accepted within the window before the last stop, or
        // crash, still counts: a sender retrying after losing our 250 at
        // a crash is the case this is for.
        let dedup = Dedup::new(config.relay.dedup_window);
        let mut recent = spool.take_recent();
        recent.sort_by_key(|(_, at)| *at);
        let (now, clock_now) = (Instant::now(), queue.now());
        for (digest, accepted) in &recent {
            let age = clock_now.duration_since(*accepted).unwrap_or_default();
            let at = now.checked_sub(age).unwrap_or(now);
            dedup.record_digests(&[*digest], at);
        }
        Inbound {
            tables: RwLock::new(Arc::new(tables.0)),
            ids,
            queue,
            spool,
            dedup,
            auth_throttle: AuthThrottle::default(),
            stats: Arc::default(),
        }
    }

    /// Saves the duplicate-suppression keys of the window in the spool,
    /// so that a restart still knows them (a clean stop calls this once no
    /// session is left).
    pub fn save_recent(&self) {
        if self.dedup.is_off() {
            return;
        }
        let keys = self.dedup.export(self.queue.now());
        match self.spool.save_recent(&keys) {
            Ok(()) => debug!("saved {} duplicate-suppression keys", keys.len()),
            Err(e) => warn!("cannot save the duplicate-suppression keys: {e}"),
        }
    }

    /// Applies reloaded tables: routes, relay control, the MM4 check,
    /// timeouts, limits, the certificate, the AUTH users and the queue
    /// lifetime at once; session limits for sessions that start from now on.
    pub fn reload(&self, tables: Prepared) {
        *self.tables.write() = Arc::new(tables.0);
    }

    fn tables(&self) -> Arc<Tables> {
        self.tables.read().clone()
    }
}

/// What one session was refused, logged once per reason: the first time
/// with its details, and at the end of the session how often in all. A
/// client that pipelines a million refused RCPTs writes a few lines, not a
/// million.
struct Refusals {
    client_ip: IpAddr,
    counts: Vec<(&'static str, u64)>,
}

impl Refusals {
    /// Counts one refusal; logs `detail` if it is the first of its reason.
    fn note(&mut self, reason: &'static str, detail: impl FnOnce() -> String) {
        match self.counts.iter_mut().find(|(r, _)| *r == reason) {
            Some((_, n)) => *n += 1,
            None => {
                self.counts.push((reason, 1));
                info!("{reason}: client=[{}] {}", self.client_ip, detail());
            }
        }
    }
}

impl Drop for Refusals {
    fn drop(&mut self) {
        if self.counts.iter().any(|(_, n)| *n > 1) {
            let counts: Vec<String> = self
                .counts
                .iter()
                .map(|(r, n)| format!("{}={n}", r.replace(' ', "_")))
                .collect();
            info!(
                "session from [{}] ended; refused in all: {}",
                self.client_ip,
                counts.join(" ")
            );
        }
    }
}

/// Recipients for a log line: the first five, and how many more.
fn listed<'a>(rcpts: impl ExactSizeIterator<Item = &'a str>) -> String {
    let n = rcpts.len();
    let mut out: Vec<String> = rcpts.take(5).map(|r| format!("<{}>", Brief(r))).collect();
    if n > 5 {
        out.push(format!("+{} more", n - 5));
    }
    out.join(",")
}

/// The handler one session asks: relay control, MM4 check, queueing.
struct RelayHandler {
    inbound: Arc<Inbound>,
    client_ip: IpAddr,
    class: ClientClass,
    refusals: Refusals,
    /// Disconnected when the listener stops: ends an AUTH delay early.
    stopping: Receiver<()>,
    /// When the session must end: no AUTH delay runs past it.
    session_deadline: Option<Instant>,
}

impl Handler for RelayHandler {
    type Route = PeerId;

    fn rcpt(&mut self, _from: &str, rcpt: &str) -> Result<PeerId, Reply> {
        let stats = &self.inbound.stats;
        if self.class == ClientClass::Unknown {
            // Say nothing about routes to a stranger.
            stats.rcpt_relay_denied.fetch_add(1, Ordering::Relaxed);
            self.refusals.note("relay denied", || {
                format!("is not a known MMSC, to=<{}>", Brief(rcpt))
            });
            return Err(Reply::new(550, format!("5.7.1 <{rcpt}>: relaying denied")));
        }
        let addr = match Address::parse_envelope(rcpt) {
            Ok(a) => a,
            Err(e) => {
                stats.rcpt_bad_address.fetch_add(1, Ordering::Relaxed);
                self.refusals
                    .note("bad address", || format!("to=<{}>: {e}", Brief(rcpt)));
                return Err(Reply::new(553, format!("5.1.3 <{rcpt}>: {e}")));
            }
        };
        let tables = self.inbound.tables();
        let Some(peer) = tables.router.route(&addr) else {
            stats.rcpt_unroutable.fetch_add(1, Ordering::Relaxed);
            self.refusals
                .note("no route", || format!("to=<{}>", Brief(rcpt)));
            return Err(Reply::new(
                550,
                format!("5.1.2 <{rcpt}>: no route to this recipient"),
            ));
        };
        if !tables.access.may_send(self.class, peer) {
            stats.rcpt_relay_denied.fetch_add(1, Ordering::Relaxed);
            self.refusals.note("relay denied", || {
                format!(
                    "class={:?} to=<{}> peer={}",
                    self.class,
                    Brief(rcpt),
                    tables.peer_names[peer]
                )
            });
            return Err(Reply::new(550, format!("5.7.1 <{rcpt}>: relaying denied")));
        }
        Ok(peer)
    }

    fn auth(&mut self, user: &str, password: &str) -> bool {
        let tables = self.inbound.tables();
        // Only configured accounts are tracked by name: a guesser's
        // invented names cannot fill the table.
        let account = tables
            .auth_users
            .iter()
            .any(|u| u.name == user)
            .then_some(user);
        let throttle = &self.inbound.auth_throttle;
        let delay = throttle.delay(self.client_ip, account);
        if !delay.is_zero() {
            self.inbound
                .stats
                .auth_delayed
                .fetch_add(1, Ordering::Relaxed);
            // Whatever the verdict: a guesser learns nothing by hanging up
            // early. A stop ends the wait, and so does the session's end:
            // AUTH lines pipelined in one packet must not stretch the
            // session past it, and are not checked once it has passed.
            let until = Instant::now() + delay;
            let until = self.session_deadline.map_or(until, |d| until.min(d));
            let _ = self.stopping.recv_deadline(until);
            if self.session_deadline.is_some_and(|d| Instant::now() >= d) {
                return false;
            }
        }
        let found = tables
            .auth_users
            .iter()
            .find(|u| u.name == user && u.password.matches(password));
        match found {
            Some(u) => {
                throttle.succeeded(self.client_ip, account);
                info!(
                    "auth ok: client=[{}] user={user} peer={}",
                    self.client_ip, tables.peer_names[u.peer]
                );
                if self.class != ClientClass::Local {
                    self.class = ClientClass::Partner(u.peer);
                }
                true
            }
            None => {
                throttle.failed(self.client_ip, account);
                self.inbound
                    .stats
                    .auth_failures
                    .fetch_add(1, Ordering::Relaxed);
                self.refusals
                    .note("auth failed", || format!("user=\"{}\"", Brief(user)));
                false
            }
        }
    }

    fn message(&mut self, env: Envelope<PeerId>, data: Vec<u8>) -> Reply {
        let inbound = &self.inbound;
        let rcpts: Vec<&str> = env.rcpts.iter().map(|(r, _)| r.as_str()).collect();
        let tables = inbound.tables();
        let info = match mm4::check(&data, &rcpts, tables.mm4_check, &tables.limits) {
            Ok(info) => info,
            Err(e) => {
                let n = rcpts.len();
                self.refusals.note("rejected", || {
                    format!(
                        "from=<{}> rcpts={n} reason=\"{}\"",
                        Brief(&env.from),
                        Brief(&e.reason)
                    )
                });
                inbound
                    .stats
                    .rejected_content
                    .fetch_add(1, Ordering::Relaxed);
                return Reply::new(554, e.to_string());
            }
        };
        // Reports carry the Message-ID of the MM they report on, so the
        // Message-ID alone does not name a PDU: type and transaction too.
        // The IDs are the sender's text, up to the header limit: the spool
        // and the window keep a digest of them.
        // And the sender: a partner that knows another's IDs must not be
        // able to make that partner's message a duplicate.
        let origin = match self.class {
            ClientClass::Partner(p) => format!("partner {}", tables.peer_names[p]),
            ClientClass::Local | ClientClass::Unknown => "local".to_string(),
        };
        let dedup_key = info.message_id.as_ref().map(|mid| {
            dedup::pdu_key(
                &origin,
                info.pdu.map_or("-", |p| p.name()),
                mid,
                info.transaction_id.as_deref().unwrap_or("-"),
            )
        });
        let (fresh, dups): (Vec<_>, Vec<_>) = env
            .rcpts
            .into_iter()
            .partition(|(r, _)| !inbound.dedup.seen(dedup_key.as_deref(), r));
        if fresh.is_empty() {
            info!(
                "- status=duplicate client=[{}] from=<{}> to={} mid={} tid={}",
                self.client_ip,
                Brief(&env.from),
                listed(dups.iter().map(|(r, _)| r.as_str())),
                Brief(info.message_id.as_deref().unwrap_or("-")),
                Brief(info.transaction_id.as_deref().unwrap_or("-")),
            );
            inbound.stats.duplicates.fetch_add(1, Ordering::Relaxed);
            return Reply::new(250, "2.0.0 duplicate of a message already queued");
        }
        let id = inbound.ids.next_id();
        let accepted = inbound.queue.now();
        let trace = received_header(
            &env.helo,
            &self.client_ip.to_string(),
            &tables.session.hostname,
            env.protocol,
            &id,
            accepted,
        );
        let mut full = Vec::with_capacity(trace.len() + data.len());
        full.extend_from_slice(trace.as_bytes());
        full.extend_from_slice(&data);
        let data: Arc<[u8]> = full.into();
        let mut by_peer: Vec<(PeerId, Vec<String>)> = Vec::new();
        for (rcpt, peer) in fresh {
            match by_peer.iter_mut().find(|(p, _)| *p == peer) {
                Some((_, list)) => list.push(rcpt),
                None => by_peer.push((peer, vec![rcpt])),
            }
        }
        // queue_lifetime is bounded by the configuration; the sender's
        // expiry may be anything, and only ever shortens the lifetime.
        let mut expires = accepted + tables.queue_lifetime;
        if let Some(at) = info.expiry.and_then(|e| e.at(accepted)) {
            expires = expires.min(at);
        }
        let record = NewMessage {
            id: id.clone(),
            from: env.from,
            body_type: env.params.body,
            message_id: info.message_id.clone(),
            transaction_id: info.transaction_id.clone(),
            accepted,
            expires,
            data: data.clone(),
            jobs: by_peer
                .iter()
                .map(|(p, r)| (tables.peer_names[*p].clone(), r.clone()))
                .collect(),
            dedup_key: dedup_key.clone(),
        };
        let from = record.from.clone();
        let location = match inbound.spool.commit(record) {
            Ok(loc) => loc,
            Err(SpoolError::Full) => {
                inbound.stats.rejected_spool.fetch_add(1, Ordering::Relaxed);
                warn!("spool full: refusing a message from [{}]", self.client_ip);
                return Reply::new(452, "4.3.1 insufficient system storage, try again later");
            }
            Err(e) => {
                inbound.stats.rejected_spool.fetch_add(1, Ordering::Relaxed);
                error!("{e}: refusing a message from [{}]", self.client_ip);
                return Reply::new(451, "4.3.0 local error in processing, try again later");
            }
        };
        for (_, rcpts) in &by_peer {
            inbound.dedup.record(dedup_key.as_deref(), rcpts);
        }
        let split: Vec<String> = by_peer
            .iter()
            .map(|(p, r)| format!("{}({})", tables.peer_names[*p], r.len()))
            .collect();
        info!(
            "{id} accepted client=[{}] from=<{}> size={} pdu={} mid={} tid={} peers={}{}",
            self.client_ip,
            Brief(&from),
            data.len(),
            info.pdu.map_or("-", |p| p.name()),
            Brief(info.message_id.as_deref().unwrap_or("-")),
            Brief(info.transaction_id.as_deref().unwrap_or("-")),
            split.join("+"),
            if dups.is_empty() {
                String::new()
            } else {
                format!(" duplicates={}", dups.len())
            },
        );
        let message = Arc::new(Message {
            id: id.clone(),
            from,
            body_type: env.params.body,
            info,
            accepted,
            expires,
            location,
        });
        for (peer, rcpts) in by_peer {
            inbound.queue.submit(Job {
                message: message.clone(),
                peer,
                rcpts,
                attempts: 0,
                data: Some(data.clone()),
            });
        }
        inbound.stats.accepted.fetch_add(1, Ordering::Relaxed);
        Reply::new(250, format!("2.0.0 queued as {id}"))
    }
}

/// A live session as the listener sees it, so a stop can reach it.
struct Slot {
    stream: TcpStream,
    in_data: Arc<AtomicBool>,
    /// A TLS session cannot be told 421 through the raw socket.
    tls: Arc<AtomicBool>,
}

/// What one client address is doing, for the per-address limits.
struct PerIp {
    open: usize,
    /// Connection tokens left (refilled at the configured rate) and when.
    tokens: f64,
    refilled: Instant,
}

/// Session limits fixed at start.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Sessions at once from partners and strangers.
    pub max_sessions: usize,
    /// Sessions at once from the local MMSC's hosts, counted apart.
    pub max_local_sessions: usize,
    /// Of `max_sessions`, most at once from hosts that are no partner's
    /// (partners that AUTH from other addresses among them); 0: no limit
    /// but `max_sessions`.
    pub max_stranger_sessions: usize,
    /// How long a stop waits for sessions receiving a message.
    pub shutdown_timeout: Duration,
}

struct Sessions {
    /// Set at stop: sessions close after the transaction in progress.
    stopping: AtomicBool,
    /// Dropped at stop, so waits on [`Sessions::stopped`] end at once.
    stop_signal: Mutex<Option<Sender<()>>>,
    stopped: Receiver<()>,
    live: Mutex<HashMap<u64, Slot>>,
    /// Notified whenever a session leaves `live`.
    ended: Condvar,
    /// Session threads; finished ones are joined at the next accept.
    handles: Mutex<Vec<Owned<()>>>,
    /// Sessions and connection rate per client address, an IPv6 client by
    /// its /64 (local MMSC hosts are not counted).
    per_ip: Mutex<HashMap<IpAddr, PerIp>>,
    /// Sessions open from the local MMSC's hosts, from everyone else, and
    /// of those from strangers.
    open_local: AtomicUsize,
    open_other: AtomicUsize,
    open_strangers: AtomicUsize,
    /// The inbound counters (sessions open is the sum of both).
    stats: Arc<InboundStats>,
    next: AtomicU64,
    /// Refusals at accept come at the rate of connections: logged at most
    /// once a second each.
    over_limit: RateLimitedWarning,
    over_ip_limit: RateLimitedWarning,
    accept_failed: RateLimitedWarning,
}

impl Sessions {
    fn new(stats: Arc<InboundStats>) -> Sessions {
        let (tx, rx) = crossbeam_channel::bounded(0);
        Sessions {
            stopping: AtomicBool::new(false),
            stop_signal: Mutex::new(Some(tx)),
            stopped: rx,
            live: Mutex::new(HashMap::new()),
            ended: Condvar::new(),
            handles: Mutex::new(Vec::new()),
            per_ip: Mutex::new(HashMap::new()),
            open_local: AtomicUsize::new(0),
            open_other: AtomicUsize::new(0),
            open_strangers: AtomicUsize::new(0),
            stats,
            next: AtomicU64::new(0),
            over_limit: RateLimitedWarning::new(Duration::from_secs(1)),
            over_ip_limit: RateLimitedWarning::new(Duration::from_secs(1)),
            accept_failed: RateLimitedWarning::new(Duration::from_secs(1)),
        }
    }

    /// Counts a new connection from `ip` against its limits; the reason
    /// when it is over one.
    fn admit(&self, ip: IpAddr, max_open: usize, rate: u32) -> Result<(), &'static str> {
        let ip = address_key(ip);
        let mut map = self.per_ip.lock();
        let now = Instant::now();
        if map.len() > 4096 {
            map.retain(|_, e| {
                e.open > 0 || now.duration_since(e.refilled) < Duration::from_secs(10)
            });
        }
        let e = map.entry(ip).or_insert(PerIp {
            open: 0,
            tokens: f64::from(rate),
            refilled: now,
        });
        if rate > 0 {
            let rate = f64::from(rate);
            e.tokens = (e.tokens + now.duration_since(e.refilled).as_secs_f64() * rate).min(rate);
            e.refilled = now;
            if e.tokens < 1.0 {
                return Err("too many connections per second from this address");
            }
            e.tokens -= 1.0;
        }
        if max_open > 0 && e.open >= max_open {
            return Err("too many sessions from this address");
        }
        e.open += 1;
        Ok(())
    }

    fn release(&self, ip: IpAddr) {
        if let Some(e) = self.per_ip.lock().get_mut(&address_key(ip)) {
            e.open = e.open.saturating_sub(1);
        }
    }

    fn open_count(&self, local: bool) -> &AtomicUsize {
        if local {
            &self.open_local
        } else {
            &self.open_other
        }
    }
}

/// One session's place in the counts: taken before its thread starts,
/// given back when the guard drops, however the thread ends (a panic
/// included) or if it never starts.
struct SessionGuard {
    sessions: Arc<Sessions>,
    id: u64,
    ip: IpAddr,
    local: bool,
    stranger: bool,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        let s = &self.sessions;
        if thread::panicking() {
            error!(
                "session {} from [{}] panicked; its slot is given back",
                self.id, self.ip
            );
        }
        if !self.local {
            s.release(self.ip);
        }
        if self.stranger {
            s.open_strangers.fetch_sub(1, Ordering::AcqRel);
        }
        s.open_count(self.local).fetch_sub(1, Ordering::AcqRel);
        s.stats.sessions_open.fetch_sub(1, Ordering::AcqRel);
        s.live.lock().remove(&self.id);
        s.ended.notify_all();
    }
}

/// The running listener: accept threads and the sessions they started.
pub struct Listener {
    addrs: Vec<SocketAddr>,
    accept_threads: Vec<Owned<()>>,
    sessions: Arc<Sessions>,
    shutdown_timeout: Duration,
}

/// A bound socket and whether it speaks TLS from the first octet.
pub struct Bound {
    listener: TcpListener,
    implicit_tls: bool,
}

impl Listener {
    /// Binds every address, plain (`listen`) and implicit TLS
    /// (`listen_tls`), before privileges are dropped, so that ports below
    /// 1024 work.
    pub fn bind(listen: &[SocketAddr], listen_tls: &[SocketAddr]) -> io::Result<Vec<Bound>> {
        let plain = listen.iter().map(|a| (a, false));
        let implicit = listen_tls.iter().map(|a| (a, true));
        plain
            .chain(implicit)
            .map(|(addr, implicit_tls)| {
                let listener = TcpListener::bind(addr).map_err(|e| {
                    io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}"))
                })?;
                Ok(Bound {
                    listener,
                    implicit_tls,
                })
            })
            .collect()
    }

    /// Starts accepting on sockets from [`Listener::bind`].
    pub fn start(bound: Vec<Bound>, limits: Limits, inbound: Arc<Inbound>) -> io::Result<Listener> {
        let sessions = Arc::new(Sessions::new(inbound.stats()));
        let mut addrs = Vec::new();
        let mut accept_threads = Vec::new();
        for b in bound {
            let local = b.listener.local_addr()?;
            info!(
                "listening on {local}{}",
                if b.implicit_tls { " (TLS)" } else { "" }
            );
            addrs.push(local);
            let (sessions, inbound) = (sessions.clone(), inbound.clone());
            accept_threads.push(Owned::spawn(format!("accept-{local}"), move || {
                accept_loop(&b, &sessions, &inbound, limits)
            })?);
        }
        Ok(Listener {
            addrs,
            accept_threads,
            sessions,
            shutdown_timeout: limits.shutdown_timeout,
        })
    }

    /// The bound addresses (with the real port when 0 was asked for),
    /// plain ones first, then implicit-TLS ones.
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Stops accepting and closes idle sessions; sessions receiving a
    /// message may finish it within `shutdown_timeout`, then they are cut
    /// too. Never waits on a client longer than that.
    pub fn stop(self) {
        let sessions = &self.sessions;
        sessions.stopping.store(true, Ordering::Release);
        sessions.stop_signal.lock().take();
        for addr in &self.addrs {
            // Wake the blocked accept() with a connection to ourselves.
            let target = match addr.ip() {
                IpAddr::V4(ip) if ip.is_unspecified() => {
                    SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port())
                }
                IpAddr::V6(ip) if ip.is_unspecified() => {
                    SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port())
                }
                _ => *addr,
            };
            let _ = TcpStream::connect_timeout(&target, Duration::from_secs(1));
        }
        for t in self.accept_threads {
            t.join();
        }
        for slot in sessions.live.lock().values() {
            if !slot.in_data.load(Ordering::Acquire) {
                if !slot.tls.load(Ordering::Acquire) {
                    // A client that does not read must not hold up the stop.
                    send_nowait(&slot.stream, b"421 4.3.2 shutting down\r\n");
                }
                let _ = slot.stream.shutdown(Shutdown::Both);
            }
        }
        let deadline = Instant::now() + self.shutdown_timeout;
        let mut live = sessions.live.lock();
        while !live.is_empty() && !sessions.ended.wait_until(&mut live, deadline).timed_out() {}
        if !live.is_empty() {
            warn!(
                "stop: {} session(s) still receiving after shutdown_timeout; closing them",
                live.len()
            );
            for slot in live.values() {
                let _ = slot.stream.shutdown(Shutdown::Both);
            }
        }
        drop(live);
        let handles = std::mem::take(&mut *sessions.handles.lock());
        for h in handles {
            h.join();
        }
    }
}

/// Takes one place of `max` in `count`; false when none is left.
fn reserve(count: &AtomicUsize, max: usize) -> bool {
    count
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .is_ok()
}

/// Writes what fits into the socket's buffer now, without waiting.
fn send_nowait(stream: &TcpStream, bytes: &[u8]) {
    // SAFETY: a valid socket and buffer for the call; the result only says
    // how much went, and nothing depends on it.
    unsafe {
        libc::send(
            stream.as_raw_fd(),
            bytes.as_ptr().cast(),
            bytes.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        );
    }
}

/// Answers a connection over a limit with 421 and closes it.
fn refuse(stream: TcpStream, status: &str, why: &str) {
    send_nowait(
        &stream,
        format!("421 {status} {why}, try again later\r\n").as_bytes(),
    );
    let _ = stream.shutdown(Shutdown::Both);
}

fn accept_loop(b: &Bound, sessions: &Arc<Sessions>, inbound: &Arc<Inbound>, limits: Limits) {
    for conn in b.listener.incoming() {
        if sessions.stopping.load(Ordering::Acquire) {
            break;
        }
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                sessions
                    .accept_failed
                    .warn(|| format!("accept failed: {e}"));
                // Out of descriptors or similar: do not spin.
                thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        // Dropping a finished one joins it: a panic is logged, not lost.
        sessions.handles.lock().retain(|h| !h.is_finished());
        let Ok(peer) = stream.peer_addr() else {
            continue;
        };
        let ip = peer.ip().to_canonical();
        let tables = inbound.tables();
        // Classify first: the local MMSC's hosts have room of their own,
        // which no partner or stranger can take, and strangers may take
        // only part of the partners' room.
        let class = tables.access.classify(ip);
        let (local, stranger) = (class == ClientClass::Local, class == ClientClass::Unknown);
        let (open, max) = if local {
            (&sessions.open_local, limits.max_local_sessions)
        } else {
            (&sessions.open_other, limits.max_sessions)
        };
        // Places are taken, not checked then taken: accept threads of
        // several listen addresses share the counts.
        let full = if !reserve(open, max) {
            Some(("", max))
        } else if stranger
            && limits.max_stranger_sessions > 0
            && !reserve(&sessions.open_strangers, limits.max_stranger_sessions)
        {
            open.fetch_sub(1, Ordering::AcqRel);
            Some(("stranger ", limits.max_stranger_sessions))
        } else {
            None
        };
        if let Some((whose, max)) = full {
            let whose = if local { "local MMSC " } else { whose };
            sessions
                .over_limit
                .warn(|| format!("{whose}session limit {max} reached: refusing [{ip}]"));
            refuse(stream, "4.3.2", "too many sessions");
            continue;
        }
        if !local {
            if let Err(why) = sessions.admit(
                ip,
                tables.max_sessions_per_ip,
                tables.connection_rate_per_ip,
            ) {
                sessions
                    .stats
                    .refused_per_ip
                    .fetch_add(1, Ordering::Relaxed);
                sessions
                    .over_ip_limit
                    .warn(|| format!("refusing [{ip}]: {why}"));
                refuse(stream, "4.7.0", why);
                open.fetch_sub(1, Ordering::AcqRel);
                if stranger && limits.max_stranger_sessions > 0 {
                    sessions.open_strangers.fetch_sub(1, Ordering::AcqRel);
                }
                continue;
            }
        }
        let id = sessions.next.fetch_add(1, Ordering::Relaxed);
        if stranger && limits.max_stranger_sessions == 0 {
            // Not reserved above: counted all the same.
            sessions.open_strangers.fetch_add(1, Ordering::AcqRel);
        }
        sessions.stats.sessions_open.fetch_add(1, Ordering::AcqRel);
        sessions
            .stats
            .sessions_total
            .fetch_add(1, Ordering::Relaxed);
        // From here the guard gives everything back.
        let guard = SessionGuard {
            sessions: sessions.clone(),
            id,
            ip,
            local,
            stranger,
        };
        let clone = match stream.try_clone() {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors after the accept took the last one:
                // the same failure, said the same way, and no spinning.
                sessions
                    .accept_failed
                    .warn(|| format!("accept failed: {e} (duplicating the connection)"));
                refuse(stream, "4.3.2", "out of resources");
                drop(guard);
                thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let in_data = Arc::new(AtomicBool::new(false));
        let tls = Arc::new(AtomicBool::new(b.implicit_tls));
        sessions.live.lock().insert(
            id,
            Slot {
                stream: clone,
                in_data: in_data.clone(),
                tls: tls.clone(),
            },
        );
        let inbound = inbound.clone();
        let implicit_tls = b.implicit_tls;
        let state = SessionState {
            in_data,
            tls,
            sessions: sessions.clone(),
        };
        let spawned = Owned::spawn(format!("session-{id}"), move || {
            let _guard = guard;
            if let Err(e) = serve(stream, peer, &inbound, implicit_tls, &state) {
                debug!("session [{}] ended: {e}", peer.ip());
            }
        });
        match spawned {
            Ok(h) => sessions.handles.lock().push(h),
            // The closure, and the guard in it, is dropped.
            Err(e) => warn!("cannot start a session thread: {e}"),
        }
    }
}

/// What a session shares with the listener.
struct SessionState {
    in_data: Arc<AtomicBool>,
    tls: Arc<AtomicBool>,
    sessions: Arc<Sessions>,
}

/// How long the 421 that ends a session may take to write, once the
/// deadline it tells of has passed.
const LAST_WORD: Duration = Duration::from_secs(1);

/// Drives one session over its socket until QUIT, a timeout, EOF or stop.
///
/// Deadlines, against slow clients: a command line must be complete within
/// `command_timeout` of the end of the previous one (octets of an
/// over-long line do not restart it), the whole DATA phase within
/// `data_timeout`, and the session within `session_timeout` (checked
/// between transactions). A TLS handshake must end by the command
/// deadline. Each ends the session with a 421. Every read and write
/// system call ends by the deadline in force (see `tls::Socket`): a
/// client that does not read its replies, reads them slowly, or trickles
/// a TLS record an octet at a time is cut when it passes.
fn serve(
    tcp: TcpStream,
    peer: SocketAddr,
    inbound: &Arc<Inbound>,
    implicit_tls: bool,
    state: &SessionState,
) -> io::Result<()> {
    tcp.set_nodelay(true)?;
    let ip = peer.ip().to_canonical();
    let tables = inbound.tables();
    let class = tables.access.classify(ip);
    debug!("session from [{ip}] class={class:?}");
    let mut handler = RelayHandler {
        inbound: inbound.clone(),
        client_ip: ip,
        class,
        refusals: Refusals {
            client_ip: ip,
            counts: Vec::new(),
        },
        stopping: state.sessions.stopped.clone(),
        session_deadline: None,
    };
    let mut session: Session<PeerId> = Session::new(tables.session.clone());
    session.require_tls(tables.tls_required_from.iter().any(|c| c.contains(ip)));
    let started = Instant::now();
    let session_deadline =
        (!tables.session_timeout.is_zero()).then(|| started + tables.session_timeout);
    handler.session_deadline = session_deadline;
    let command_deadline = |from: Instant| {
        let d = from + tables.command_timeout;
        session_deadline.map_or(d, |s| d.min(s))
    };
    let mut stream = Stream::from(tcp);
    if implicit_tls {
        stream = start_tls(stream, &tables, ip, command_deadline(started))?;
        inbound.stats.tls_sessions.fetch_add(1, Ordering::Relaxed);
        session.tls_started();
    }
    let mut out = Vec::with_capacity(1024);
    session.greeting().write_to(&mut out);
    let mut deadline = command_deadline(started);
    stream.set_deadline(Some(deadline));
    stream.write_all(&out)?;
    let mut buf: Vec<u8> = Vec::with_capacity(16 * 1024);
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let receiving = session.in_data();
        let now = Instant::now();
        if !receiving && session_deadline.is_some_and(|d| now >= d) {
            stream.set_deadline(Some(now + LAST_WORD));
            stream.write_all(b"421 4.4.2 session time limit reached, closing\r\n")?;
            return Ok(());
        }
        if now >= deadline {
            let why: &[u8] = if receiving {
                b"421 4.4.2 timeout receiving DATA, closing\r\n"
            } else {
                b"421 4.4.2 timeout waiting for a command, closing\r\n"
            };
            stream.set_deadline(Some(now + LAST_WORD));
            stream.write_all(why)?;
            return Ok(());
        }
        // Reads, and the writes of their replies, end by the deadline.
        let limit = match session_deadline {
            Some(d) if !receiving => deadline.min(d),
            _ => deadline,
        };
        stream.set_deadline(Some(limit));
        let n = match stream.read(&mut chunk) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            // The deadlines above decide what a timeout means; a signal
            // handler without SA_RESTART only interrupts the wait.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                continue;
            }
            Err(e) => return Err(e),
        };
        buf.extend_from_slice(&chunk[..n]);
        out.clear();
        let progress = session.feed(&buf, &mut handler, &mut out);
        buf.drain(..progress.consumed);
        if !out.is_empty() {
            // Answering may have taken past the deadline (an AUTH delay, a
            // spool commit): the replies still get their moment.
            stream.set_deadline(Some(limit.max(Instant::now() + LAST_WORD)));
            stream.write_all(&out)?;
        }
        if progress.close {
            return Ok(());
        }
        if progress.starttls {
            // Anything pipelined after STARTTLS was dropped by the session.
            buf.clear();
            stream = start_tls(stream, &tables, ip, command_deadline(Instant::now()))?;
            state.tls.store(true, Ordering::Release);
            inbound.stats.tls_sessions.fetch_add(1, Ordering::Relaxed);
            session.tls_started();
        }
        let now_receiving = session.in_data();
        state.in_data.store(now_receiving, Ordering::Release);
        if now_receiving && progress.data_started {
            // A message started in this input, perhaps right behind the
            // end of the last one: it ends a transaction, so the session
            // limit counts here, and the new message gets data_timeout.
            if session_deadline.is_some_and(|d| Instant::now() >= d) {
                stream.set_deadline(Some(Instant::now() + LAST_WORD));
                stream.write_all(b"421 4.4.2 session time limit reached, closing\r\n")?;
                return Ok(());
            }
            deadline = Instant::now() + tables.data_timeout;
        } else if !now_receiving && (receiving || progress.line_ended) {
            deadline = Instant::now() + tables.command_timeout;
        }
        if state.sessions.stopping.load(Ordering::Acquire) && !now_receiving {
            stream.set_deadline(Some(Instant::now() + LAST_WORD));
            stream.write_all(b"421 4.3.2 shutting down\r\n")?;
            return Ok(());
        }
    }
}

/// The server TLS handshake, all of it by `deadline`.
fn start_tls(stream: Stream, tables: &Tables, ip: IpAddr, deadline: Instant) -> io::Result<Stream> {
    let acceptor = tables
        .tls
        .as_ref()
        .ok_or_else(|| io::Error::other("TLS asked for without a certificate"))?;
    let stream = stream.accept_by(acceptor, deadline).map_err(|e| {
        info!("TLS failed: client=[{ip}] {e}");
        io::Error::other(e.to_string())
    })?;
    debug!(
        "TLS started: client=[{ip}] version={}",
        stream.tls_version().unwrap_or("-")
    );
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_session_gives_its_slot_back() {
        let stats = Arc::new(InboundStats::default());
        let sessions = Arc::new(Sessions::new(stats.clone()));
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        for _ in 0..3 {
            sessions.admit(ip, 3, 0).unwrap();
            sessions.open_other.fetch_add(1, Ordering::AcqRel);
            stats.sessions_open.fetch_add(1, Ordering::AcqRel);
            let guard = SessionGuard {
                sessions: sessions.clone(),
                id: 1,
                ip,
                local: false,
                stranger: false,
            };
            let t = thread::spawn(move || {
                let _guard = guard;
                panic!("a session that panics");
            });
            assert!(t.join().is_err());
        }
        assert_eq!(stats.sessions_open.load(Ordering::Acquire), 0);
        assert_eq!(sessions.open_other.load(Ordering::Acquire), 0);
        // The per-address count came back each time: room for three more.
        for _ in 0..3 {
            sessions.admit(ip, 3, 0).unwrap();
        }
        assert!(sessions.admit(ip, 3, 0).is_err());
    }
}
