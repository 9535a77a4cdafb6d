//! Accept loops and what bounds them: the session counts (local MMSC
//! apart), the per-address limits, the guard that gives a session's place
//! back however its thread ends, and the running [`Listener`].

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use log::{debug, error, info, warn};
use parking_lot::{Condvar, Mutex};

use crate::route::access::ClientClass;
use crate::sys::owned::Owned;

use super::session::{SessionState, serve};
use super::throttle::{RateLimitedWarning, address_key};
use super::{Inbound, InboundStats, Tables};

/// A live session as the listener sees it, so a stop can reach it.
struct Slot {
    stream: TcpStream,
    /// A message is under way (see `Session::in_message`): a stop lets it
    /// finish within `shutdown_timeout`.
    in_message: Arc<AtomicBool>,
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

pub(super) struct Sessions {
    /// Set at stop: sessions close after the transaction in progress.
    pub(super) stopping: AtomicBool,
    /// Dropped at stop, so waits on [`Sessions::stopped`] end at once.
    stop_signal: Mutex<Option<Sender<()>>>,
    pub(super) stopped: Receiver<()>,
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
            if !slot.in_message.load(Ordering::Acquire) {
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

/// Takes a session's place for a client at `ip`, or says why not (status
/// and text of the 421). Classified first: the local MMSC's hosts have
/// room of their own, which no partner or stranger can take, and
/// strangers may take only part of the partners' room. Places are taken,
/// not checked then taken: accept threads of several listen addresses
/// share the counts.
fn take_place(
    sessions: &Arc<Sessions>,
    ip: IpAddr,
    tables: &Tables,
    limits: &Limits,
) -> Result<SessionGuard, (&'static str, &'static str)> {
    let class = tables.access.classify(ip);
    let (local, stranger) = (class == ClientClass::Local, class == ClientClass::Unknown);
    let (open, max) = if local {
        (&sessions.open_local, limits.max_local_sessions)
    } else {
        (&sessions.open_other, limits.max_sessions)
    };
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
        return Err(("4.3.2", "too many sessions"));
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
            open.fetch_sub(1, Ordering::AcqRel);
            if stranger && limits.max_stranger_sessions > 0 {
                sessions.open_strangers.fetch_sub(1, Ordering::AcqRel);
            }
            return Err(("4.7.0", why));
        }
    }
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
    Ok(SessionGuard {
        sessions: sessions.clone(),
        id: sessions.next.fetch_add(1, Ordering::Relaxed),
        ip,
        local,
        stranger,
    })
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
        let guard = match take_place(sessions, ip, &inbound.tables(), &limits) {
            Ok(guard) => guard,
            Err((status, why)) => {
                refuse(stream, status, why);
                continue;
            }
        };
        let id = guard.id;
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
        let in_message = Arc::new(AtomicBool::new(false));
        let tls = Arc::new(AtomicBool::new(b.implicit_tls));
        sessions.live.lock().insert(
            id,
            Slot {
                stream: clone,
                in_message: in_message.clone(),
                tls: tls.clone(),
            },
        );
        let inbound = inbound.clone();
        let implicit_tls = b.implicit_tls;
        let state = SessionState {
            in_message,
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
