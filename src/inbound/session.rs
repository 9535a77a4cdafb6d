//! The session driver: one SMTP session over its socket, with its read,
//! write and session deadlines, and STARTTLS.

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use log::{debug, info};

use crate::route::PeerId;
use crate::smtp::session::Session;
use crate::tls::Stream;

use super::accept::Sessions;
use super::intake::{Refusals, RelayHandler};
use super::{Inbound, Tables};

/// What a session shares with the listener.
pub(super) struct SessionState {
    pub(super) in_message: Arc<AtomicBool>,
    pub(super) tls: Arc<AtomicBool>,
    pub(super) sessions: Arc<Sessions>,
}

/// How long the 421 that ends a session may take to write, once the
/// deadline it tells of has passed.
const LAST_WORD: Duration = Duration::from_secs(1);

/// Drives one session over its socket until QUIT, a timeout, EOF or stop.
///
/// Deadlines, against slow clients: a command line must be complete within
/// `command_timeout` of the end of the previous one (octets of an
/// over-long line do not restart it), the whole DATA phase (each BDAT
/// chunk) within `data_timeout`, and the session within `session_timeout` (checked
/// between transactions). A TLS handshake must end by the command
/// deadline. Each ends the session with a 421. Every read and write
/// system call ends by the deadline in force (see `tls::Socket`): a
/// client that does not read its replies, reads them slowly, or trickles
/// a TLS record an octet at a time is cut when it passes.
pub(super) fn serve(
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
    let mut deadlines = Deadlines::new(
        started,
        tables.command_timeout,
        tables.data_timeout,
        tables.session_timeout,
    );
    handler.session_deadline = deadlines.session;
    let mut stream = Stream::from(tcp);
    if implicit_tls {
        stream = start_tls(stream, &tables, ip, deadlines.handshake(started))?;
        inbound.stats.tls_sessions.fetch_add(1, Ordering::Relaxed);
        session.tls_started();
    }
    let mut out = Vec::with_capacity(1024);
    session.greeting().write_to(&mut out);
    stream.set_deadline(Some(deadlines.current));
    stream.write_all(&out)?;
    let mut buf: Vec<u8> = Vec::with_capacity(16 * 1024);
    let mut chunk = vec![0u8; 64 * 1024];
    let last_word = |stream: &mut Stream, why: &[u8]| {
        stream.set_deadline(Some(Instant::now() + LAST_WORD));
        stream.write_all(why)
    };
    loop {
        let receiving = session.in_data();
        if let Some(due) = deadlines.due(Instant::now(), receiving) {
            return last_word(&mut stream, due.reply());
        }
        // Reads, and the writes of their replies, end by the deadline.
        let limit = deadlines.read_limit(receiving);
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
        out.clear();
        // What is left of the last read comes first; else the read is fed
        // as it is, not copied.
        let progress = if buf.is_empty() {
            let progress = session.feed(&chunk[..n], &mut handler, &mut out);
            buf.extend_from_slice(&chunk[progress.consumed..n]);
            progress
        } else {
            buf.extend_from_slice(&chunk[..n]);
            let progress = session.feed(&buf, &mut handler, &mut out);
            buf.drain(..progress.consumed);
            progress
        };
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
            stream = start_tls(stream, &tables, ip, deadlines.handshake(Instant::now()))?;
            state.tls.store(true, Ordering::Release);
            inbound.stats.tls_sessions.fetch_add(1, Ordering::Relaxed);
            session.tls_started();
        }
        let now_receiving = session.in_data();
        // A stop lets a message under way finish, BDAT chunks too.
        let in_message = session.in_message();
        state.in_message.store(in_message, Ordering::Release);
        if now_receiving && progress.data_started {
            if let Err(due) = deadlines.data_started(Instant::now()) {
                return last_word(&mut stream, due.reply());
            }
        } else if !now_receiving && (receiving || progress.line_ended) {
            deadlines.command_started(Instant::now());
        }
        if state.sessions.stopping.load(Ordering::Acquire) && !in_message {
            return last_word(&mut stream, b"421 4.3.2 shutting down\r\n");
        }
    }
}

/// A deadline that ended a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Due {
    /// `session_timeout`, checked between transactions.
    Session,
    /// `command_timeout`: no complete command line in time.
    Command,
    /// `data_timeout`: the message did not arrive in time.
    Data,
}

impl Due {
    /// The 421 the client gets.
    fn reply(self) -> &'static [u8] {
        match self {
            Due::Session => b"421 4.4.2 session time limit reached, closing\r\n",
            Due::Command => b"421 4.4.2 timeout waiting for a command, closing\r\n",
            Due::Data => b"421 4.4.2 timeout receiving DATA, closing\r\n",
        }
    }
}

/// A session's deadlines, as arithmetic on instants it is given: no
/// clock, no socket.
#[derive(Clone, Copy, Debug)]
struct Deadlines {
    command_timeout: Duration,
    data_timeout: Duration,
    /// The end of the session, if it has one.
    session: Option<Instant>,
    /// The deadline of what is being received: a command line or DATA.
    current: Instant,
}

impl Deadlines {
    /// A session that started at `started`; zero `session_timeout`: no
    /// session limit.
    fn new(
        started: Instant,
        command_timeout: Duration,
        data_timeout: Duration,
        session_timeout: Duration,
    ) -> Deadlines {
        let session = (!session_timeout.is_zero()).then(|| started + session_timeout);
        let mut d = Deadlines {
            command_timeout,
            data_timeout,
            session,
            current: started,
        };
        d.current = d.handshake(started);
        d
    }

    /// Where a TLS handshake that starts at `now` must end: the command
    /// deadline, within the session's.
    fn handshake(&self, now: Instant) -> Instant {
        let d = now + self.command_timeout;
        self.session.map_or(d, |s| d.min(s))
    }

    /// What has ended by `now`, if anything; `receiving`: in DATA, where
    /// the session limit waits for the end of the message.
    fn due(&self, now: Instant, receiving: bool) -> Option<Due> {
        if !receiving && self.session.is_some_and(|d| now >= d) {
            Some(Due::Session)
        } else if now >= self.current {
            Some(if receiving { Due::Data } else { Due::Command })
        } else {
            None
        }
    }

    /// Where the next read, and the writes of its replies, must end.
    fn read_limit(&self, receiving: bool) -> Instant {
        match self.session {
            Some(d) if !receiving => self.current.min(d),
            _ => self.current,
        }
    }

    /// A message started at `now`, perhaps right behind the end of the
    /// last one: that ends a transaction, so the session limit counts
    /// here, and the message gets `data_timeout`.
    fn data_started(&mut self, now: Instant) -> Result<(), Due> {
        if self.session.is_some_and(|d| now >= d) {
            return Err(Due::Session);
        }
        self.current = now + self.data_timeout;
        Ok(())
    }

    /// A command line, or a message, ended at `now`: the next line gets
    /// `command_timeout`.
    fn command_started(&mut self, now: Instant) {
        self.current = now + self.command_timeout;
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

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn deadlines_follow_the_phase_and_the_session_limit() {
        let t0 = Instant::now();
        let mut d = Deadlines::new(t0, 10 * S, 60 * S, 100 * S);
        // The greeting's command deadline, and a handshake's.
        assert_eq!(d.current, t0 + 10 * S);
        assert_eq!(d.handshake(t0 + 95 * S), t0 + 100 * S);
        assert_eq!(d.due(t0 + 9 * S, false), None);
        assert_eq!(d.due(t0 + 10 * S, false), Some(Due::Command));
        // A line restarts the command deadline; DATA gets its own.
        d.command_started(t0 + 5 * S);
        assert_eq!(d.read_limit(false), t0 + 15 * S);
        assert_eq!(d.data_started(t0 + 6 * S), Ok(()));
        assert_eq!(d.read_limit(true), t0 + 66 * S);
        assert_eq!(d.due(t0 + 66 * S, true), Some(Due::Data));
        // In DATA the session limit waits for the end of the message…
        d.command_started(t0 + 90 * S);
        assert_eq!(d.data_started(t0 + 95 * S), Ok(()));
        assert_eq!(d.due(t0 + 120 * S, true), None);
        assert_eq!(d.read_limit(true), t0 + 155 * S);
        // …and then ends the session, before a command or a next message.
        d.command_started(t0 + 130 * S);
        assert_eq!(d.read_limit(false), t0 + 100 * S);
        assert_eq!(d.due(t0 + 130 * S, false), Some(Due::Session));
        assert_eq!(d.data_started(t0 + 130 * S), Err(Due::Session));
    }

    #[test]
    fn no_session_limit_when_zero() {
        let t0 = Instant::now();
        let d = Deadlines::new(t0, 10 * S, 60 * S, Duration::ZERO);
        assert_eq!(d.session, None);
        assert_eq!(d.handshake(t0 + 1000 * S), t0 + 1010 * S);
        assert_eq!(d.due(t0 + 9 * S, false), None);
    }
}
