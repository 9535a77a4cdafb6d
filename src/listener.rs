//! Inbound SMTP: accept loops, one thread per session (at most
//! `max_sessions`), timeouts, and the relay's answers to RCPT and to the
//! end of DATA.
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
//! session receiving DATA finishes that message, then gets 421.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime};

use log::{debug, error, info, warn};
use parking_lot::{Mutex, RwLock};

use native_tls::TlsAcceptor;

use crate::access::{AccessControl, Cidr, ClientClass};
use crate::config::{AuthUser, Config, Mm4Check};
use crate::message::{IdSource, Job, Message, received_header};
use crate::mm4;
use crate::queue::Queue;
use crate::route::{Address, PeerId, Router};
use crate::smtp::Reply;
use crate::smtp::session::{Envelope, Handler, Session, SessionConfig};
use crate::spool::{NewMessage, RecentKey, Spool, SpoolError};
use crate::tls::{self, Stream};

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
    tls: Option<TlsAcceptor>,
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
        recent.sort_by_key(|(_, _, at)| *at);
        let (now, clock_now) = (Instant::now(), queue.now());
        for (key, rcpts, accepted) in &recent {
            let age = clock_now.duration_since(*accepted).unwrap_or_default();
            let at = now.checked_sub(age).unwrap_or(now);
            dedup.record_at(Some(key), rcpts, at);
        }
        Inbound {
            tables: RwLock::new(Arc::new(tables.0)),
            ids,
            queue,
            spool,
            dedup,
            stats: Arc::default(),
        }
    }

    /// Saves the duplicate-suppression keys of the window in the spool,
    /// so that a restart still knows them (a clean stop calls this once no
    /// session is left).
    pub fn save_recent(&self) {
        if self.dedup.window.is_zero() {
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

/// The handler one session asks: relay control, MM4 check, queueing.
struct RelayHandler {
    inbound: Arc<Inbound>,
    client_ip: IpAddr,
    class: ClientClass,
}

impl Handler for RelayHandler {
    type Route = PeerId;

    fn rcpt(&mut self, _from: &str, rcpt: &str) -> Result<PeerId, Reply> {
        let stats = &self.inbound.stats;
        if self.class == ClientClass::Unknown {
            // Say nothing about routes to a stranger.
            stats.rcpt_relay_denied.fetch_add(1, Ordering::Relaxed);
            info!(
                "relay denied: client=[{}] is not a known MMSC, to=<{rcpt}>",
                self.client_ip
            );
            return Err(Reply::new(550, format!("5.7.1 <{rcpt}>: relaying denied")));
        }
        let addr = Address::parse_envelope(rcpt).map_err(|e| {
            stats.rcpt_bad_address.fetch_add(1, Ordering::Relaxed);
            Reply::new(553, format!("5.1.3 <{rcpt}>: {e}"))
        })?;
        let tables = self.inbound.tables();
        let peer = tables.router.route(&addr).ok_or_else(|| {
            stats.rcpt_unroutable.fetch_add(1, Ordering::Relaxed);
            Reply::new(550, format!("5.1.2 <{rcpt}>: no route to this recipient"))
        })?;
        if !tables.access.may_send(self.class, peer) {
            stats.rcpt_relay_denied.fetch_add(1, Ordering::Relaxed);
            info!(
                "relay denied: client=[{}] class={:?} to=<{rcpt}> peer={}",
                self.client_ip, self.class, tables.peer_names[peer]
            );
            return Err(Reply::new(550, format!("5.7.1 <{rcpt}>: relaying denied")));
        }
        Ok(peer)
    }

    fn auth(&mut self, user: &str, password: &str) -> bool {
        let tables = self.inbound.tables();
        let found = tables
            .auth_users
            .iter()
            .find(|u| u.name == user && u.password.matches(password));
        match found {
            Some(u) => {
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
                self.inbound
                    .stats
                    .auth_failures
                    .fetch_add(1, Ordering::Relaxed);
                warn!("auth failed: client=[{}] user={user:?}", self.client_ip);
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
                info!(
                    "rejected: client=[{}] from=<{}> rcpts={} reason=\"{}\"",
                    self.client_ip,
                    env.from,
                    rcpts.len(),
                    e.reason
                );
                inbound
                    .stats
                    .rejected_content
                    .fetch_add(1, Ordering::Relaxed);
                return Reply::new(554, e.to_string());
            }
        };
        // Reports carry the Message-ID of the MM they report on, so the
        // Message-ID alone does not name a PDU: type and transaction too.
        let dedup_key = info.message_id.as_ref().map(|mid| {
            let pdu = info.pdu.map_or("-", |p| p.name());
            format!(
                "{pdu} {mid} {}",
                info.transaction_id.as_deref().unwrap_or("-")
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
                env.from,
                dups.iter()
                    .map(|(r, _)| format!("<{r}>"))
                    .collect::<Vec<_>>()
                    .join(","),
                info.message_id.as_deref().unwrap_or("-"),
                info.transaction_id.as_deref().unwrap_or("-"),
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
        let mut expires = accepted + tables.queue_lifetime;
        if let Some(e) = info.expiry {
            expires = expires.min(e.at(accepted));
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
            from,
            data.len(),
            info.pdu.map_or("-", |p| p.name()),
            info.message_id.as_deref().unwrap_or("-"),
            info.transaction_id.as_deref().unwrap_or("-"),
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

/// When each (PDU key, recipient) was accepted, and the same in time order
/// for pruning.
type Seen = (
    HashMap<(String, String), Instant>,
    VecDeque<(Instant, String, String)>,
);

/// Recently accepted (PDU, recipient) pairs, the PDU named by its type,
/// X-Mms-Message-ID and X-Mms-Transaction-ID, so a sender that retries
/// after losing our 250 does not make the peer receive it twice.
struct Dedup {
    window: Duration,
    seen: Mutex<Seen>,
}

impl Dedup {
    fn new(window: Duration) -> Dedup {
        Dedup {
            window,
            seen: Mutex::new((HashMap::new(), VecDeque::new())),
        }
    }

    /// True if the PDU `key` was accepted for `rcpt` within the window.
    fn seen(&self, key: Option<&str>, rcpt: &str) -> bool {
        let Some(mid) = key.filter(|_| !self.window.is_zero()) else {
            return false;
        };
        let mut guard = self.seen.lock();
        let (map, order) = &mut *guard;
        let now = Instant::now();
        while let Some((t, m, r)) = order.front() {
            if now.duration_since(*t) < self.window {
                break;
            }
            if map.get(&(m.clone(), r.clone())) == Some(t) {
                map.remove(&(m.clone(), r.clone()));
            }
            order.pop_front();
        }
        map.contains_key(&(mid.to_string(), rcpt.to_string()))
    }

    fn record(&self, key: Option<&str>, rcpts: &[String]) {
        self.record_at(key, rcpts, Instant::now());
    }

    /// Every (key, recipient) still within the window, with when it was
    /// accepted by the wall clock that reads `now` at this instant.
    fn export(&self, now: SystemTime) -> Vec<RecentKey> {
        let (map, _) = &*self.seen.lock();
        let instant = Instant::now();
        map.iter()
            .filter(|(_, t)| instant.duration_since(**t) < self.window)
            .map(|((key, rcpt), t)| {
                let at = now.checked_sub(instant.duration_since(*t)).unwrap_or(now);
                (key.clone(), vec![rcpt.clone()], at)
            })
            .collect()
    }

    /// Records a PDU accepted at `at`; calls come in time order.
    fn record_at(&self, key: Option<&str>, rcpts: &[String], now: Instant) {
        let Some(mid) = key.filter(|_| !self.window.is_zero()) else {
            return;
        };
        let mut guard = self.seen.lock();
        let (map, order) = &mut *guard;
        for r in rcpts {
            map.insert((mid.to_string(), r.clone()), now);
            order.push_back((now, mid.to_string(), r.clone()));
        }
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

struct Sessions {
    /// Set at stop: sessions close after the transaction in progress.
    stopping: AtomicBool,
    live: Mutex<HashMap<u64, Slot>>,
    handles: Mutex<Vec<JoinHandle<()>>>,
    /// Sessions and connection rate per client address (local MMSC
    /// hosts are not counted).
    per_ip: Mutex<HashMap<IpAddr, PerIp>>,
    /// The inbound counters (sessions open is the limit's count).
    stats: Arc<InboundStats>,
    next: AtomicU64,
}

impl Sessions {
    /// Counts a new connection from `ip` against its limits; the reason
    /// when it is over one.
    fn admit(&self, ip: IpAddr, max_open: usize, rate: u32) -> Result<(), &'static str> {
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
        if let Some(e) = self.per_ip.lock().get_mut(&ip) {
            e.open = e.open.saturating_sub(1);
        }
    }
}

/// The running listener: accept threads and the sessions they started.
pub struct Listener {
    addrs: Vec<SocketAddr>,
    accept_threads: Vec<JoinHandle<()>>,
    sessions: Arc<Sessions>,
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
    pub fn start(
        bound: Vec<Bound>,
        max_sessions: usize,
        inbound: Arc<Inbound>,
    ) -> io::Result<Listener> {
        let sessions = Arc::new(Sessions {
            stopping: AtomicBool::new(false),
            live: Mutex::new(HashMap::new()),
            handles: Mutex::new(Vec::new()),
            per_ip: Mutex::new(HashMap::new()),
            stats: inbound.stats(),
            next: AtomicU64::new(0),
        });
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
            accept_threads.push(
                thread::Builder::new()
                    .name(format!("accept-{local}"))
                    .spawn(move || accept_loop(&b, &sessions, &inbound, max_sessions))?,
            );
        }
        Ok(Listener {
            addrs,
            accept_threads,
            sessions,
        })
    }

    /// The bound addresses (with the real port when 0 was asked for),
    /// plain ones first, then implicit-TLS ones.
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Stops accepting, closes idle sessions, waits for busy ones.
    pub fn stop(self) {
        self.sessions.stopping.store(true, Ordering::Release);
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
            let _ = t.join();
        }
        for slot in self.sessions.live.lock().values() {
            if !slot.in_data.load(Ordering::Acquire) {
                if !slot.tls.load(Ordering::Acquire) {
                    let _ = (&slot.stream).write_all(b"421 4.3.2 shutting down\r\n");
                }
                let _ = slot.stream.shutdown(Shutdown::Both);
            }
        }
        let handles = std::mem::take(&mut *self.sessions.handles.lock());
        for h in handles {
            let _ = h.join();
        }
    }
}

/// Answers a connection over a limit with 421 and closes it.
fn refuse(mut stream: TcpStream, status: &str, why: &str) {
    let _ = stream.write_all(format!("421 {status} {why}, try again later\r\n").as_bytes());
    let _ = stream.shutdown(Shutdown::Both);
}

fn accept_loop(b: &Bound, sessions: &Arc<Sessions>, inbound: &Arc<Inbound>, max_sessions: usize) {
    for conn in b.listener.incoming() {
        if sessions.stopping.load(Ordering::Acquire) {
            break;
        }
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                warn!("accept failed: {e}");
                // Out of descriptors or similar: do not spin.
                thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        sessions.handles.lock().retain(|h| !h.is_finished());
        let Ok(peer) = stream.peer_addr() else {
            continue;
        };
        let ip = peer.ip().to_canonical();
        if sessions.stats.sessions_open.load(Ordering::Acquire) >= max_sessions {
            warn!("session limit {max_sessions} reached: refusing [{ip}]");
            refuse(stream, "4.3.2", "too many sessions");
            continue;
        }
        let tables = inbound.tables();
        let counted = tables.access.classify(ip) != ClientClass::Local;
        if counted {
            if let Err(why) = sessions.admit(
                ip,
                tables.max_sessions_per_ip,
                tables.connection_rate_per_ip,
            ) {
                sessions
                    .stats
                    .refused_per_ip
                    .fetch_add(1, Ordering::Relaxed);
                warn!("refusing [{ip}]: {why}");
                refuse(stream, "4.7.0", why);
                continue;
            }
        }
        let Ok(clone) = stream.try_clone() else {
            if counted {
                sessions.release(ip);
            }
            continue;
        };
        let id = sessions.next.fetch_add(1, Ordering::Relaxed);
        let in_data = Arc::new(AtomicBool::new(false));
        let tls = Arc::new(AtomicBool::new(b.implicit_tls));
        sessions.stats.sessions_open.fetch_add(1, Ordering::AcqRel);
        sessions
            .stats
            .sessions_total
            .fetch_add(1, Ordering::Relaxed);
        sessions.live.lock().insert(
            id,
            Slot {
                stream: clone,
                in_data: in_data.clone(),
                tls: tls.clone(),
            },
        );
        let (sessions2, inbound2) = (sessions.clone(), inbound.clone());
        let implicit_tls = b.implicit_tls;
        let ended = move || {
            sessions2.live.lock().remove(&id);
            if counted {
                sessions2.release(ip);
            }
            sessions2.stats.sessions_open.fetch_sub(1, Ordering::AcqRel);
        };
        let state = SessionState {
            in_data,
            tls,
            stopping: sessions.clone(),
        };
        let spawned = thread::Builder::new()
            .name(format!("session-{id}"))
            .spawn(move || {
                if let Err(e) = serve(stream, peer, &inbound2, implicit_tls, &state) {
                    debug!("session [{}] ended: {e}", peer.ip());
                }
                ended();
            });
        match spawned {
            Ok(h) => sessions.handles.lock().push(h),
            Err(e) => {
                warn!("cannot start a session thread: {e}");
                sessions.live.lock().remove(&id);
                if counted {
                    sessions.release(ip);
                }
                sessions.stats.sessions_open.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }
}

/// What a session shares with the listener.
struct SessionState {
    in_data: Arc<AtomicBool>,
    tls: Arc<AtomicBool>,
    stopping: Arc<Sessions>,
}

/// Drives one session over its socket until QUIT, a timeout, EOF or stop.
///
/// Deadlines, against slow clients: a command line must be complete within
/// `command_timeout` of the previous one, the whole DATA phase within
/// `data_timeout`, and the session within `session_timeout` (checked
/// between transactions). Each ends the session with a 421.
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
    };
    let mut session: Session<PeerId> = Session::new(tables.session.clone());
    session.require_tls(tables.tls_required_from.iter().any(|c| c.contains(ip)));
    let started = Instant::now();
    let mut stream = Stream::Plain(tcp);
    if implicit_tls {
        stream = start_tls(stream, &tables, ip)?;
        inbound.stats.tls_sessions.fetch_add(1, Ordering::Relaxed);
        session.tls_started();
    }
    let mut out = Vec::with_capacity(1024);
    session.greeting().write_to(&mut out);
    stream.write_all(&out)?;
    let mut buf: Vec<u8> = Vec::with_capacity(16 * 1024);
    let mut chunk = vec![0u8; 64 * 1024];
    let mut deadline = started + tables.command_timeout;
    let session_deadline =
        (!tables.session_timeout.is_zero()).then(|| started + tables.session_timeout);
    let mut read_timeout = Duration::ZERO;
    loop {
        let receiving = session.in_data();
        let now = Instant::now();
        if !receiving && session_deadline.is_some_and(|d| now >= d) {
            stream.write_all(b"421 4.4.2 session time limit reached, closing\r\n")?;
            return Ok(());
        }
        let left = deadline.saturating_duration_since(now);
        if left.is_zero() {
            let why: &[u8] = if receiving {
                b"421 4.4.2 timeout receiving DATA, closing\r\n"
            } else {
                b"421 4.4.2 timeout waiting for a command, closing\r\n"
            };
            stream.write_all(why)?;
            return Ok(());
        }
        let left = match session_deadline {
            Some(d) if !receiving => left.min(d.saturating_duration_since(now)),
            _ => left,
        };
        // A setsockopt per read would cost as much as the read: set on
        // change, in whole seconds while more than one is left.
        let timeout = if left > Duration::from_secs(1) {
            Duration::from_secs(left.as_secs())
        } else {
            left.max(Duration::from_millis(1))
        };
        if timeout != read_timeout {
            stream.tcp().set_read_timeout(Some(timeout))?;
            read_timeout = timeout;
        }
        let n = match stream.read(&mut chunk) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            // The deadlines above decide what a timeout means.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
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
            stream.write_all(&out)?;
        }
        if progress.close {
            return Ok(());
        }
        if progress.starttls {
            // Anything pipelined after STARTTLS was dropped by the session.
            buf.clear();
            stream = start_tls(stream, &tables, ip)?;
            state.tls.store(true, Ordering::Release);
            inbound.stats.tls_sessions.fetch_add(1, Ordering::Relaxed);
            session.tls_started();
        }
        let now_receiving = session.in_data();
        state.in_data.store(now_receiving, Ordering::Release);
        if now_receiving && !receiving {
            deadline = Instant::now() + tables.data_timeout;
        } else if !now_receiving && (receiving || progress.consumed > 0) {
            deadline = Instant::now() + tables.command_timeout;
        }
        if state.stopping.stopping.load(Ordering::Acquire) && !now_receiving {
            stream.write_all(b"421 4.3.2 shutting down\r\n")?;
            return Ok(());
        }
    }
}

/// The server TLS handshake, bounded by the command timeout.
fn start_tls(stream: Stream, tables: &Tables, ip: IpAddr) -> io::Result<Stream> {
    let acceptor = tables
        .tls
        .as_ref()
        .ok_or_else(|| io::Error::other("TLS asked for without a certificate"))?;
    stream
        .tcp()
        .set_read_timeout(Some(tables.command_timeout.max(Duration::from_millis(1))))?;
    let stream = stream.accept(acceptor).map_err(|e| {
        info!("TLS failed: client=[{ip}] {e}");
        io::Error::other(e.to_string())
    })?;
    debug!("TLS started: client=[{ip}]");
    Ok(stream)
}
