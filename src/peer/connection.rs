//! One blocking SMTP client connection: connect (implicit TLS if so
//! configured), the greeting, EHLO (HELO if refused), STARTTLS and AUTH,
//! then any number of transactions, kept open between them, with a
//! timeout per phase. A transaction's commands and replies are
//! `smtp::client`'s state machine; what a failure means is `policy`'s:
//! every error here says at which stage it came ([`ConnError`]).
//!
//! A connection that saw an I/O error, a timeout, a malformed reply or a
//! 421 is never reused: the caller drops it and opens another.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use log::warn;
use native_tls::TlsConnector;

use crate::config::{PeerConfig, Secret, TlsMode};
use crate::message::Job;
use crate::smtp::Reply;
use crate::smtp::client::{Capabilities, Expect, Refusal, Step, Transaction};
use crate::smtp::codec::dot_stuff;
use crate::smtp::command::BodyType;
use crate::sys::printable::Printable;
use crate::tls::{self, Stream, TlsError};

use super::policy::{self, Next, Stage, Trouble};

/// Timeouts per SMTP phase, after Postfix's `smtp_*_timeout` names.
#[derive(Clone, Debug)]
pub struct Timeouts {
    /// TCP connect.
    pub connect: Duration,
    /// Greeting and EHLO/HELO reply; also RSET, NOOP and QUIT.
    pub helo: Duration,
    /// MAIL reply.
    pub mail: Duration,
    /// Each RCPT reply.
    pub rcpt: Duration,
    /// DATA reply and each write of the message.
    pub data: Duration,
    /// Reply to the final dot.
    pub data_done: Duration,
}

impl Timeouts {
    /// The timeouts a peer's configuration names.
    pub fn of(p: &PeerConfig) -> Timeouts {
        Timeouts {
            connect: p.connect_timeout,
            helo: p.helo_timeout,
            mail: p.mail_timeout,
            rcpt: p.rcpt_timeout,
            data: p.data_timeout,
            data_done: p.data_done_timeout,
        }
    }
}

/// A peer's TLS client side, built on first use: building one reads the
/// system's CA store, which takes tens of milliseconds, and a reload
/// should not pay that for every peer.
struct LazyConnector {
    cfg: PeerConfig,
    built: OnceLock<Result<TlsConnector, String>>,
}

/// TLS and AUTH towards one peer.
#[derive(Clone)]
pub struct Security {
    /// Whether to STARTTLS.
    pub mode: TlsMode,
    /// The client side, unless `mode` is off.
    connector: Option<Arc<LazyConnector>>,
    /// The name to check the certificate against, if not the host's.
    pub server_name: Option<String>,
    /// AUTH user and password.
    pub auth: Option<(String, Secret)>,
    /// Allow AUTH without TLS.
    pub auth_plaintext: bool,
}

impl Security {
    /// No TLS, no AUTH.
    pub fn plain() -> Security {
        Security {
            mode: TlsMode::Off,
            connector: None,
            server_name: None,
            auth: None,
            auth_plaintext: false,
        }
    }

    /// What a peer's configuration asks for. The certificates and keys
    /// were checked when the configuration was parsed.
    pub fn of(p: &PeerConfig) -> Security {
        Security {
            mode: p.tls,
            connector: (p.tls != TlsMode::Off).then(|| {
                Arc::new(LazyConnector {
                    cfg: p.clone(),
                    built: OnceLock::new(),
                })
            }),
            server_name: p.tls_server_name.clone(),
            auth: p.auth.clone(),
            auth_plaintext: p.auth_plaintext,
        }
    }

    /// The TLS client side, built the first time it is needed.
    fn connector(&self) -> Result<&TlsConnector, ConnError> {
        let lazy = self
            .connector
            .as_ref()
            .ok_or_else(|| tls_error("no TLS client for this peer".into()))?;
        lazy.built
            .get_or_init(|| {
                let c = &lazy.cfg;
                let roots = c.tls_ca.as_ref().map_or(&[][..], |r| &r.0[..]);
                tls::connector(c.tls_verify, roots, c.tls_client_identity.as_ref())
                    .map_err(|e: TlsError| e.to_string())
            })
            .as_ref()
            .map_err(|e| tls_error(format!("cannot set up the TLS client: {e}")))
    }
}

fn tls_error(e: String) -> ConnError {
    ConnError::new(Stage::Tls, Trouble::Tls(e))
}

/// A failed handshake: the network's trouble if it ended it (a timeout,
/// a reset, the peer closing), else TLS's.
fn handshake_failed(e: &TlsError, what: &str) -> ConnError {
    let trouble = match e.network() {
        Some(kind) => match io_trouble(&io::Error::from(kind)) {
            Trouble::Io(_) => Trouble::Io(format!("{e} ({what})")),
            t => t,
        },
        None => Trouble::Tls(format!("{e} ({what})")),
    };
    ConnError::new(Stage::Tls, trouble)
}

/// The host part of `host:port`, without IPv6 brackets.
pub(super) fn host_name(host: &str) -> &str {
    let name = host.rsplit_once(':').map_or(host, |(h, _)| h);
    name.trim_start_matches('[').trim_end_matches(']')
}

/// TLS from the first octet (`tls = implicit`), checking the certificate
/// as for STARTTLS. The whole handshake ends by the helo timeout: a peer
/// that never answers it holds the worker no longer than a greeting would.
fn implicit_tls(
    tcp: TcpStream,
    host: &str,
    timeouts: &Timeouts,
    security: &Security,
) -> Result<Stream, ConnError> {
    let connector = security.connector()?;
    let name = security.server_name.as_deref().unwrap_or(host_name(host));
    let mut plain = Stream::from(tcp);
    plain.set_deadline(Some(Instant::now() + timeouts.helo));
    let mut stream = plain.connect(connector, name).map_err(|e| {
        handshake_failed(
            &e,
            &format!("implicit TLS; certificate name checked: {name}"),
        )
    })?;
    // From here the per-phase timeouts apply, as on any connection.
    stream.set_deadline(None);
    Ok(stream)
}

/// Why a connection failed, and where: every one of these closes it.
/// What it means is `policy`'s to say.
#[derive(Debug)]
pub struct ConnError {
    /// Where in the session.
    pub stage: Stage,
    /// What went wrong.
    pub trouble: Trouble,
}

impl ConnError {
    fn new(stage: Stage, trouble: Trouble) -> ConnError {
        ConnError { stage, trouble }
    }
}

impl fmt::Display for ConnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = &self.trouble;
        match (self.stage, t) {
            (Stage::Connect, _) => write!(f, "connect failed: {t}"),
            (Stage::Greeting, Trouble::Reply(r)) => write!(f, "refused at greeting: {r}"),
            (Stage::Tls, Trouble::Reply(r)) => write!(f, "TLS: STARTTLS refused: {r}"),
            (Stage::Tls, Trouble::Tls(e)) => write!(f, "TLS: {e}"),
            (Stage::Tls, _) => write!(f, "TLS: {t}"),
            (Stage::Auth, Trouble::Reply(r)) => write!(f, "AUTH: refused: {r}"),
            (Stage::Auth, _) => write!(f, "AUTH: {t}"),
            // The peer answered the end of the message: it did not take it.
            (Stage::Final, Trouble::Reply(_)) => write!(f, "{t} (at end of data)"),
            (Stage::Final, _) => write!(
                f,
                "{t} after the final dot, before the reply: possible duplicate"
            ),
            (stage, _) => write!(f, "{t} (at {stage})"),
        }
    }
}

impl std::error::Error for ConnError {}

/// The trouble an I/O error is.
fn io_trouble(e: &io::Error) -> Trouble {
    match e.kind() {
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => Trouble::TimedOut,
        io::ErrorKind::UnexpectedEof => Trouble::Closed,
        _ => Trouble::Io(e.to_string()),
    }
}

/// A message whose outcome a broken connection left unknown.
#[derive(Debug)]
pub struct Unknown<T> {
    /// The message.
    pub item: T,
    /// How far its transaction got.
    pub stage: Stage,
    /// Transactions begun on the connection before it.
    pub earlier: u32,
}

/// A connection that broke during a chain of deliveries.
#[derive(Debug)]
pub struct Broken<T> {
    /// What broke it.
    pub error: ConnError,
    /// The messages it left unknown, the first one's at `error.stage`,
    /// a chained successor's with nothing of it accepted.
    pub unknown: Vec<Unknown<T>>,
}

/// A message as a connection sends it.
pub trait Outbound {
    /// Envelope sender.
    fn from(&self) -> &str;
    /// Envelope recipients.
    fn rcpts(&self) -> &[String];
    /// The message data, not yet dot-stuffed.
    fn data(&self) -> &[u8];
    /// The body type to declare.
    fn body_type(&self) -> BodyType;
}

impl Outbound for Job {
    fn from(&self) -> &str {
        &self.message.from
    }
    fn rcpts(&self) -> &[String] {
        &self.rcpts
    }
    fn data(&self) -> &[u8] {
        // Jobs enter a pool only with their data (see `queue`).
        self.data
            .as_deref()
            .expect("a job in a pool carries its data")
    }
    fn body_type(&self) -> BodyType {
        self.message.body_type
    }
}

/// What one delivery attempt over a live connection gave.
#[derive(Debug)]
pub enum Delivery {
    /// The reply that decided each recipient, in order.
    Replies(Vec<Reply>),
    /// The message cannot go to this peer at all (too big, needs 8BITMIME).
    Refused(Refusal),
}

/// An open SMTP client connection.
pub struct Connection {
    stream: Stream,
    /// The `name:port` it was opened to.
    host: String,
    caps: Capabilities,
    timeouts: Timeouts,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    /// The read timeout set on the socket, so it is set only on change.
    read_timeout: Duration,
    /// Transactions begun on it.
    begun: u32,
    /// Use CHUNKING when the peer offers it with PIPELINING.
    chunking: bool,
}

/// Most transactions written together with CHUNKING, and the octets
/// after which no more are added (a larger message still goes alone).
const BATCH_MESSAGES: usize = 32;
const BATCH_OCTETS: usize = 1 << 20;
/// How long replies are waited for after a write to the peer failed.
const AFTER_FAILED_WRITE: Duration = Duration::from_secs(2);

/// A transaction under way: the message, its state, and how many were
/// begun on the connection before it.
type InFlight<T> = (T, Transaction, u32);

impl Connection {
    /// Connects to `host` (`name:port`; each address it resolves to in
    /// turn), reads the greeting, sends EHLO (HELO if EHLO is refused),
    /// then STARTTLS and AUTH as `security` says. Opportunistic TLS whose
    /// handshake fails is logged and the connection opened again in plain
    /// text; required TLS never falls back. Implicit TLS runs the handshake
    /// before the greeting, within the helo timeout, and never falls back
    /// either. A peer that refuses us with a reply gets QUIT.
    pub fn open(
        host: &str,
        helo_name: &str,
        timeouts: &Timeouts,
        security: &Security,
    ) -> Result<Connection, ConnError> {
        Connection::open_to(host, None, helo_name, timeouts, security)
    }

    /// As [`Connection::open`], to `addrs` when DNS found them (`host`
    /// then only names the peer, for TLS and the log).
    pub fn open_to(
        host: &str,
        addrs: Option<&[SocketAddr]>,
        helo_name: &str,
        timeouts: &Timeouts,
        security: &Security,
    ) -> Result<Connection, ConnError> {
        match Connection::open_once(host, addrs, helo_name, timeouts, security) {
            Err(ConnError {
                stage: Stage::Tls,
                trouble: Trouble::Tls(e),
            }) if security.mode == TlsMode::Opportunistic => {
                warn!(
                    "host={host} {}: opportunistic TLS, falling back to plain text",
                    Printable(&e)
                );
                let plain = Security {
                    mode: TlsMode::Off,
                    ..security.clone()
                };
                Connection::open_once(host, addrs, helo_name, timeouts, &plain)
            }
            other => other,
        }
    }

    fn open_once(
        host: &str,
        addrs: Option<&[SocketAddr]>,
        helo_name: &str,
        timeouts: &Timeouts,
        security: &Security,
    ) -> Result<Connection, ConnError> {
        let connect = |e: String| ConnError::new(Stage::Connect, Trouble::Io(e));
        let addrs: Vec<SocketAddr> = match addrs {
            Some(a) => a.to_vec(),
            None => host
                .to_socket_addrs()
                .map_err(|e| connect(format!("{host}: {e}")))?
                .collect(),
        };
        let mut errors = Vec::new();
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, timeouts.connect) {
                Ok(tcp) => {
                    let stream = if security.mode == TlsMode::Implicit {
                        implicit_tls(tcp, host, timeouts, security)?
                    } else {
                        Stream::from(tcp)
                    };
                    let mut c = Connection::greet(stream, host, helo_name, timeouts.clone())?;
                    if let Err(e) = c.secure(helo_name, security) {
                        if matches!(e.trouble, Trouble::Reply(_) | Trouble::Unsupported(_)) {
                            // It listens: say goodbye.
                            c.quit();
                        }
                        return Err(e);
                    }
                    return Ok(c);
                }
                Err(e) => errors.push(format!("{addr}: {e}")),
            }
        }
        Err(connect(errors.join("; ")))
    }

    /// STARTTLS and AUTH on a greeted connection.
    fn secure(&mut self, helo_name: &str, security: &Security) -> Result<(), ConnError> {
        let host = self.host.clone();
        if matches!(security.mode, TlsMode::Opportunistic | TlsMode::Required) {
            if self.caps.starttls {
                // Built only now: a peer that never offers STARTTLS never
                // costs a TLS client (it reads the CA store).
                let connector = security.connector()?;
                let reply = self.exchange(Stage::Tls, b"STARTTLS\r\n")?;
                if reply.code == 220 {
                    self.start_tls(
                        connector,
                        security.server_name.as_deref().unwrap_or(host_name(&host)),
                    )?;
                    self.ehlo(helo_name)?;
                } else if security.mode == TlsMode::Required {
                    return Err(ConnError::new(Stage::Tls, Trouble::Reply(reply)));
                } else {
                    warn!(
                        "host={host} STARTTLS refused ({}): opportunistic TLS, plain text",
                        Printable(&reply.to_string())
                    );
                }
            } else if security.mode == TlsMode::Required {
                return Err(ConnError::new(
                    Stage::Tls,
                    Trouble::Unsupported("the peer does not offer STARTTLS".into()),
                ));
            }
        }
        if let Some((user, password)) = &security.auth {
            if !self.stream.is_tls() && !security.auth_plaintext {
                return Err(ConnError::new(
                    Stage::Auth,
                    Trouble::Unsupported(
                        "no TLS on this connection, and auth_plaintext is no".into(),
                    ),
                ));
            }
            self.authenticate(user, password.expose())?;
        }
        Ok(())
    }

    fn start_tls(&mut self, connector: &TlsConnector, name: &str) -> Result<(), ConnError> {
        if !self.rbuf.is_empty() {
            // Octets after the 220 would be injected into the TLS session.
            return Err(ConnError::new(
                Stage::Tls,
                Trouble::Protocol("data after the STARTTLS reply".into()),
            ));
        }
        let io = |e: io::Error| ConnError::new(Stage::Tls, io_trouble(&e));
        let placeholder = Stream::from(self.stream.tcp().try_clone().map_err(io)?);
        let stream = std::mem::replace(&mut self.stream, placeholder);
        self.stream
            .tcp()
            .set_read_timeout(Some(self.timeouts.helo.max(Duration::from_millis(1))))
            .map_err(io)?;
        self.read_timeout = Duration::ZERO;
        self.stream = stream
            .connect(connector, name)
            .map_err(|e| handshake_failed(&e, &format!("certificate name checked: {name}")))?;
        Ok(())
    }

    /// AUTH PLAIN if offered, else AUTH LOGIN. The credentials are never
    /// logged, nor put in an error.
    fn authenticate(&mut self, user: &str, password: &str) -> Result<(), ConnError> {
        let b64 = |s: &[u8]| base64::engine::general_purpose::STANDARD.encode(s);
        let offered = |m: &str| self.caps.auth.iter().any(|a| a == m);
        let reply = if offered("PLAIN") {
            let token = b64(format!("\0{user}\0{password}").as_bytes());
            self.exchange(Stage::Auth, format!("AUTH PLAIN {token}\r\n").as_bytes())?
        } else if offered("LOGIN") {
            let mut reply = self.exchange(Stage::Auth, b"AUTH LOGIN\r\n")?;
            for answer in [user, password] {
                if reply.code != 334 {
                    break;
                }
                reply = self.exchange(
                    Stage::Auth,
                    format!("{}\r\n", b64(answer.as_bytes())).as_bytes(),
                )?;
            }
            reply
        } else {
            return Err(ConnError::new(
                Stage::Auth,
                Trouble::Unsupported(format!(
                    "the peer offers no AUTH PLAIN or LOGIN (offers: {})",
                    self.caps.auth.join(" ")
                )),
            ));
        };
        if reply.code == 235 {
            Ok(())
        } else {
            Err(ConnError::new(Stage::Auth, Trouble::Reply(reply)))
        }
    }

    /// Sends one command at `stage` and reads its reply, whatever it is.
    fn exchange(&mut self, stage: Stage, line: &[u8]) -> Result<Reply, ConnError> {
        let at = |t| ConnError::new(stage, t);
        self.write(line).map_err(at)?;
        self.read_reply(self.timeouts.helo).map_err(at)
    }

    fn ehlo(&mut self, helo_name: &str) -> Result<(), ConnError> {
        let ehlo = self.exchange(Stage::Helo, format!("EHLO {helo_name}\r\n").as_bytes())?;
        if !ehlo.is_positive() {
            return Err(ConnError::new(Stage::Helo, Trouble::Reply(ehlo)));
        }
        self.caps = Capabilities::from_ehlo(&ehlo);
        Ok(())
    }

    fn greet(
        stream: Stream,
        host: &str,
        helo_name: &str,
        timeouts: Timeouts,
    ) -> Result<Connection, ConnError> {
        let io = |e: io::Error| ConnError::new(Stage::Greeting, io_trouble(&e));
        stream.tcp().set_nodelay(true).map_err(io)?;
        stream
            .tcp()
            .set_write_timeout(Some(timeouts.data))
            .map_err(io)?;
        let mut c = Connection {
            stream,
            host: host.to_string(),
            caps: Capabilities::default(),
            timeouts,
            rbuf: Vec::with_capacity(4096),
            wbuf: Vec::with_capacity(8192),
            read_timeout: Duration::ZERO,
            begun: 0,
            chunking: true,
        };
        let greeting = c
            .read_reply(c.timeouts.helo)
            .map_err(|t| ConnError::new(Stage::Greeting, t))?;
        if greeting.code != 220 {
            // RFC 5321 §3.1: a client refused at the greeting sends QUIT.
            if greeting.code != 421 {
                c.quit();
            }
            return Err(ConnError::new(Stage::Greeting, Trouble::Reply(greeting)));
        }
        let ehlo = c.exchange(Stage::Helo, format!("EHLO {helo_name}\r\n").as_bytes())?;
        if ehlo.is_positive() {
            c.caps = Capabilities::from_ehlo(&ehlo);
            return Ok(c);
        }
        if ehlo.code == 421 {
            return Err(ConnError::new(Stage::Helo, Trouble::Reply(ehlo)));
        }
        let helo = c.exchange(Stage::Helo, format!("HELO {helo_name}\r\n").as_bytes())?;
        if !helo.is_positive() {
            if helo.code != 421 {
                c.quit();
            }
            return Err(ConnError::new(Stage::Helo, Trouble::Reply(helo)));
        }
        Ok(c)
    }

    /// The `name:port` this connection was opened to.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Sends with DATA even to a peer that offers CHUNKING (`false`).
    pub fn set_chunking(&mut self, on: bool) {
        self.chunking = on;
    }

    /// True if transactions go out as BDAT chunks, several per write.
    pub fn chunked(&self) -> bool {
        self.chunking && self.caps.chunking && self.caps.pipelining
    }

    /// A handle on the socket, so a stop can cut a stuck connection.
    pub fn try_clone_stream(&self) -> io::Result<TcpStream> {
        self.stream.tcp().try_clone()
    }

    /// Runs one transaction. An `Err` means the connection is unusable and
    /// nothing is known about the recipients (they must be retried).
    pub fn deliver<T: Outbound>(&mut self, item: T) -> Result<Delivery, ConnError> {
        let mut outcome = None;
        self.deliver_chain(item, || None, |_, d| outcome = Some(d))
            .map_err(|b| b.error)?;
        Ok(outcome.expect("a chain of one finishes its item"))
    }

    /// Delivers `first`, then whatever `next` yields, back to back. With
    /// PIPELINING, the next transaction's MAIL, RCPTs and DATA go out in the
    /// same write as the previous message's content and final dot (RFC 2920
    /// lets content start a command group), so each message costs one round
    /// trip instead of two. `finished` gets every item whose outcome is
    /// known. On `Err` the connection is unusable, and the error comes with
    /// the items whose outcome is not known, each with how far it got.
    ///
    /// With CHUNKING as well (see [`Connection::chunked`]), whole
    /// transactions go out together instead: see `deliver_batches`.
    pub fn deliver_chain<T: Outbound>(
        &mut self,
        first: T,
        mut next: impl FnMut() -> Option<T>,
        mut finished: impl FnMut(T, Delivery),
    ) -> Result<(), Broken<T>> {
        if self.chunked() {
            return self.deliver_batches(first, next, finished);
        }
        let mut queued = Some(first);
        let mut in_flight: Option<InFlight<T>> = None;
        loop {
            let (item, mut t, earlier) = match in_flight.take() {
                Some(x) => x,
                None => {
                    let Some(item) = queued.take().or_else(&mut next) else {
                        return Ok(());
                    };
                    match self.begin(&item) {
                        Ok((t, commands, earlier)) => match self.write(&commands) {
                            Ok(()) => (item, t, earlier),
                            Err(trouble) => {
                                return Err(broken(Stage::Mail, trouble, (item, earlier), None));
                            }
                        },
                        Err(refusal) => {
                            finished(item, Delivery::Refused(refusal));
                            continue;
                        }
                    }
                }
            };
            let mut chained: Option<InFlight<T>> = None;
            loop {
                let stage = stage_of(t.expecting());
                let reply = match self.read_reply(self.timeout_for(&t)) {
                    Ok(r) if policy::ends_session(stage, &r, earlier) => {
                        let trouble = Trouble::Reply(r);
                        return Err(broken(stage, trouble, (item, earlier), chained));
                    }
                    Ok(r) => r,
                    Err(trouble) => return Err(broken(stage, trouble, (item, earlier), chained)),
                };
                let sent = match t.on_reply(reply) {
                    Step::Send(bytes) => self.write(&bytes),
                    Step::Read => Ok(()),
                    Step::SendBody => {
                        let mut buf = std::mem::take(&mut self.wbuf);
                        buf.clear();
                        dot_stuff(item.data(), &mut buf);
                        if self.caps.pipelining {
                            if let Some(n) = next() {
                                match self.begin(&n) {
                                    Ok((t2, commands, e2)) => {
                                        buf.extend_from_slice(&commands);
                                        chained = Some((n, t2, e2));
                                    }
                                    Err(refusal) => finished(n, Delivery::Refused(refusal)),
                                }
                            }
                        }
                        let r = self.write(&buf);
                        self.wbuf = buf;
                        r
                    }
                    Step::Done => break,
                };
                if let Err(trouble) = sent {
                    let stage = match t.expecting() {
                        Expect::Final => Stage::Content,
                        e => stage_of(e),
                    };
                    return Err(broken(stage, trouble, (item, earlier), chained));
                }
            }
            // Content was sent only if the transaction completed, so a
            // transaction that needs RSET never has a chained successor.
            let reset = match policy::after(!t.needs_reset()) {
                Next::Reset => self.command(Stage::Reset, "RSET\r\n"),
                _ => Ok(()),
            };
            finished(item, Delivery::Replies(replies(&t)));
            if let Err(error) = reset {
                return Err(Broken {
                    error,
                    unknown: chained
                        .map(|(item, _, earlier)| Unknown {
                            item,
                            stage: Stage::Mail,
                            earlier,
                        })
                        .into_iter()
                        .collect(),
                });
            }
            in_flight = chained;
        }
    }

    /// Delivers `first` and whatever `next` yields in batches: every
    /// transaction waiting (up to [`BATCH_MESSAGES`] and [`BATCH_OCTETS`])
    /// is written at once as `[RSET] MAIL RCPT… BDAT n LAST` and its
    /// message, then the replies are read in order. One round trip carries
    /// a batch, where DATA needs one per message at best.
    ///
    /// If the connection breaks, what each message left unknown can have
    /// got depends on where: a message whose chunk was written may have
    /// been taken (the peer's reply lost), so it is unknown at
    /// [`Stage::Final`] (a possible duplicate), unless a reply that ends
    /// the session (421, a session limit) came before it: the peer then
    /// took nothing after that reply.
    fn deliver_batches<T: Outbound>(
        &mut self,
        first: T,
        mut next: impl FnMut() -> Option<T>,
        mut finished: impl FnMut(T, Delivery),
    ) -> Result<(), Broken<T>> {
        let mut queued = Some(first);
        loop {
            let mut buf = std::mem::take(&mut self.wbuf);
            buf.clear();
            // Each with where its octets end in `buf`.
            let mut batch: Vec<(InFlight<T>, usize)> = Vec::new();
            while batch.len() < BATCH_MESSAGES && buf.len() < BATCH_OCTETS {
                let Some(item) = queued.take().or_else(&mut next) else {
                    break;
                };
                let reset = self.begun > 0;
                match Transaction::start_chunked(
                    &self.caps,
                    item.from(),
                    item.rcpts(),
                    item.data(),
                    item.body_type(),
                    reset,
                    &mut buf,
                ) {
                    Ok(t) => {
                        let earlier = self.begun;
                        self.begun += 1;
                        batch.push(((item, t, earlier), buf.len()));
                    }
                    Err(refusal) => finished(item, Delivery::Refused(refusal)),
                }
            }
            if batch.is_empty() {
                self.wbuf = buf;
                return Ok(());
            }
            if !self.rbuf.is_empty() {
                // A reply nobody asked for would be taken for the first of
                // this batch's: nothing more goes on this connection.
                self.wbuf = buf;
                return Err(Broken {
                    error: ConnError::new(
                        Stage::Mail,
                        Trouble::Protocol("data after the last reply".into()),
                    ),
                    unknown: batch
                        .into_iter()
                        .map(|((item, _, earlier), _)| Unknown {
                            item,
                            stage: Stage::Mail,
                            earlier,
                        })
                        .collect(),
                });
            }
            let written = self.write_counted(&buf);
            self.wbuf = buf;
            // After a failed write the peer may still have answered what
            // it got (a session limit's 421 after N messages): those
            // replies are read, briefly, and settle what they settle.
            let (sent, write_failed) = match written {
                Ok(()) => (usize::MAX, false),
                Err((_, sent)) => (sent, true),
            };
            // Messages the peer took nothing of although the connection
            // lives on (a session limit at MAIL, a refused RSET), and the
            // first such reply.
            let mut untried: Vec<Unknown<T>> = Vec::new();
            let mut refusal: Option<ConnError> = None;
            let mut batch = batch.into_iter();
            while let Some(((item, mut t, earlier), end)) = batch.next() {
                let mut refused = None;
                let cut = loop {
                    let expect = t.expecting();
                    let stage = stage_of(expect);
                    let timeout = if write_failed {
                        AFTER_FAILED_WRITE
                    } else {
                        self.timeout_for(&t)
                    };
                    let r = match self.read_reply(timeout) {
                        Ok(r) => r,
                        Err(trouble) => break Some((false, stage, trouble)),
                    };
                    if r.code == 421 {
                        break Some((true, stage, Trouble::Reply(r)));
                    }
                    if expect == Expect::Chunk && t.awaits_data() && (500..=504).contains(&r.code) {
                        // BDAT not understood although offered: the peer
                        // may read the message as commands, and nothing
                        // after it on this stream can be trusted.
                        self.chunking = false;
                        let why = format!("CHUNKING offered but BDAT refused: {r}");
                        break Some((true, Stage::Mail, Trouble::Protocol(why)));
                    }
                    let refuses = match expect {
                        Expect::Reset => (!r.is_positive()).then_some(Stage::Reset),
                        // 503: the peer saw a transaction open, so our RSET
                        // did not take; it is not this message's fault.
                        Expect::Mail
                            if (r.code == 503 && earlier > 0)
                                || policy::ends_session(stage, &r, earlier) =>
                        {
                            Some(Stage::Mail)
                        }
                        _ => None,
                    };
                    if let (Some(at), None) = (refuses, &refused) {
                        refused = Some(ConnError::new(at, Trouble::Reply(r.clone())));
                    }
                    if t.on_reply(r) == Step::Done {
                        break None;
                    }
                };
                let Some((said, stage, trouble)) = cut else {
                    match refused {
                        None => finished(item, Delivery::Replies(replies(&t))),
                        Some(e) => {
                            refusal.get_or_insert(e);
                            untried.push(Unknown {
                                item,
                                stage: Stage::Mail,
                                earlier,
                            });
                        }
                    }
                    continue;
                };
                // The peer's own word (421, BDAT refused) ends the session:
                // it took nothing after it. Otherwise every chunk written
                // whole may have been taken.
                let taken = |end: usize| {
                    if !said && end <= sent {
                        Stage::Final
                    } else {
                        Stage::Mail
                    }
                };
                let this = match (said, &refused) {
                    (_, Some(_)) => Stage::Mail,
                    (true, None) => stage,
                    (false, None) => taken(end),
                };
                let error = refusal.take().unwrap_or_else(|| {
                    let at = match (said, t.expecting()) {
                        (true, Expect::Reset) => Stage::Reset,
                        (true, _) => stage,
                        (false, _) => this,
                    };
                    ConnError::new(at, trouble)
                });
                untried.push(Unknown {
                    item,
                    stage: this,
                    earlier,
                });
                untried.extend(batch.map(|((item, _, earlier), end)| Unknown {
                    item,
                    stage: taken(end),
                    earlier,
                }));
                return Err(Broken {
                    error,
                    unknown: untried,
                });
            }
            if let Some(error) = refusal {
                // Answered to the end, but the peer said it is done with
                // this session (or its state is in doubt): a new one.
                return Err(Broken {
                    error,
                    unknown: untried,
                });
            }
        }
    }

    /// Plans the next transaction: its state, its first commands, and how
    /// many were begun before it.
    fn begin<T: Outbound>(&mut self, item: &T) -> Result<(Transaction, Vec<u8>, u32), Refusal> {
        let (t, commands) = Transaction::start(
            &self.caps,
            item.from(),
            item.rcpts(),
            item.data().len() as u64,
            item.body_type(),
        )?;
        let earlier = self.begun;
        self.begun += 1;
        Ok((t, commands, earlier))
    }

    fn timeout_for(&self, t: &Transaction) -> Duration {
        match t.expecting() {
            Expect::Reset => self.timeouts.helo,
            Expect::Mail => self.timeouts.mail,
            Expect::Rcpt(_) => self.timeouts.rcpt,
            Expect::Data | Expect::EmptyData => self.timeouts.data,
            Expect::Final | Expect::Chunk | Expect::Done => self.timeouts.data_done,
        }
    }

    /// Sends NOOP to keep an idle connection open and prove it is alive.
    pub fn noop(&mut self) -> Result<(), ConnError> {
        self.command(Stage::Idle, "NOOP\r\n")
    }

    /// Looks, without waiting, at an idle connection before reusing it:
    /// the peer has closed it, or said something unasked (a 421 before
    /// its idle timeout closes it), or it is fine (`None`).
    pub fn gone(&self) -> Option<ConnError> {
        let mut buf = [0u8; 64];
        let idle = |t| Some(ConnError::new(Stage::Idle, t));
        if !self.rbuf.is_empty() {
            return idle(Trouble::Protocol("data after the last reply".into()));
        }
        // SAFETY: a valid socket and buffer; MSG_PEEK leaves what is there.
        let n = unsafe {
            libc::recv(
                self.stream.tcp().as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        match n {
            0 => idle(Trouble::Closed),
            n if n > 0 => {
                let seen = &buf[..n as usize];
                match Reply::parse(seen) {
                    // Most often the 421 of an idle timeout, before the close.
                    Ok(Some((reply, _))) if !self.stream.is_tls() => idle(Trouble::Reply(reply)),
                    _ => idle(Trouble::Protocol("data while idle".into())),
                }
            }
            _ => {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => None,
                    _ => idle(io_trouble(&e)),
                }
            }
        }
    }

    /// Sends QUIT, waits briefly for the reply, and closes.
    pub fn quit(mut self) {
        let _ = self
            .stream
            .tcp()
            .set_read_timeout(Some(Duration::from_secs(2)));
        if self.stream.write_all(b"QUIT\r\n").is_ok() {
            let mut buf = [0u8; 512];
            let _ = self.stream.read(&mut buf);
        }
        let _ = self.stream.tcp().shutdown(Shutdown::Both);
    }

    fn command(&mut self, stage: Stage, line: &str) -> Result<(), ConnError> {
        let reply = self.exchange(stage, line.as_bytes())?;
        if reply.is_positive() {
            Ok(())
        } else {
            Err(ConnError::new(stage, Trouble::Reply(reply)))
        }
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), Trouble> {
        self.stream.write_all(bytes).map_err(|e| io_trouble(&e))
    }

    /// Like `write`; on failure also says how many octets went out first.
    fn write_counted(&mut self, bytes: &[u8]) -> Result<(), (Trouble, usize)> {
        let mut sent = 0;
        while sent < bytes.len() {
            match self.stream.write(&bytes[sent..]) {
                Ok(0) => return Err((Trouble::Closed, sent)),
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err((io_trouble(&e), sent)),
            }
        }
        Ok(())
    }

    fn read_reply(&mut self, timeout: Duration) -> Result<Reply, Trouble> {
        let timeout = timeout.max(Duration::from_millis(1));
        loop {
            if let Some((reply, used)) =
                Reply::parse(&self.rbuf).map_err(|e| Trouble::Protocol(e.to_string()))?
            {
                self.rbuf.drain(..used);
                return Ok(reply);
            }
            // Set only before a read that waits: a batch's replies mostly
            // come together, and each stage has its own timeout.
            if timeout != self.read_timeout {
                self.stream
                    .tcp()
                    .set_read_timeout(Some(timeout))
                    .map_err(|e| io_trouble(&e))?;
                self.read_timeout = timeout;
            }
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).map_err(|e| io_trouble(&e))?;
            if n == 0 {
                return Err(Trouble::Closed);
            }
            self.rbuf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// The reply that decided each recipient of a finished transaction.
fn replies(t: &Transaction) -> Vec<Reply> {
    t.outcomes()
        .iter()
        .map(|o| o.clone().expect("transaction done"))
        .collect()
}

/// The stage a transaction waiting for `e` is at.
fn stage_of(e: Expect) -> Stage {
    match e {
        // Nothing of the transaction is taken before its MAIL.
        Expect::Reset | Expect::Mail => Stage::Mail,
        Expect::Rcpt(_) => Stage::Rcpt,
        Expect::Data | Expect::EmptyData => Stage::Data,
        Expect::Final | Expect::Chunk | Expect::Done => Stage::Final,
    }
}

/// The error of a connection that broke on `first` at `stage`, with a
/// chained successor of which nothing was accepted.
fn broken<T>(
    stage: Stage,
    trouble: Trouble,
    (item, earlier): (T, u32),
    chained: Option<InFlight<T>>,
) -> Broken<T> {
    let mut unknown = vec![Unknown {
        item,
        stage,
        earlier,
    }];
    unknown.extend(chained.map(|(item, _, earlier)| Unknown {
        item,
        stage: Stage::Mail,
        earlier,
    }));
    Broken {
        error: ConnError::new(stage, trouble),
        unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::thread;

    /// A message for the tests: sender, one recipient, data.
    struct Item(Vec<String>, Vec<u8>);

    impl Outbound for &Item {
        fn from(&self) -> &str {
            "a@x"
        }
        fn rcpts(&self) -> &[String] {
            &self.0
        }
        fn data(&self) -> &[u8] {
            &self.1
        }
        fn body_type(&self) -> BodyType {
            BodyType::SevenBit
        }
    }

    fn items() -> Vec<Item> {
        (1..=3)
            .map(|i| Item(vec![format!("r{i}@y")], format!("m{i}\r\n").into_bytes()))
            .collect()
    }

    /// A peer that offers PIPELINING and CHUNKING, reads until it has
    /// `until` (everything the client writes before any reply), then
    /// sends `replies` and closes. Returns its address and what it read.
    fn peer(
        until: &'static [u8],
        replies: &'static str,
    ) -> (SocketAddr, thread::JoinHandle<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let t = thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.write_all(b"220 peer\r\n").unwrap();
            let mut got = Vec::new();
            read_until(&mut s, &mut got, b"\r\n");
            s.write_all(b"250-peer\r\n250-PIPELINING\r\n250 CHUNKING\r\n")
                .unwrap();
            got.clear();
            read_until(&mut s, &mut got, until);
            s.write_all(replies.as_bytes()).unwrap();
            got
        });
        (addr, t)
    }

    /// Reads from `s` onto `got` until `got` holds `end`.
    fn read_until(s: &mut TcpStream, got: &mut Vec<u8>, end: &[u8]) {
        let mut chunk = [0u8; 4096];
        while !got.windows(end.len()).any(|w| w == end) {
            let n = s.read(&mut chunk).unwrap();
            assert!(
                n > 0,
                "client closed early: {}",
                String::from_utf8_lossy(got)
            );
            got.extend_from_slice(&chunk[..n]);
        }
    }

    fn connect(addr: SocketAddr) -> Connection {
        let d = Duration::from_secs(10);
        let timeouts = Timeouts {
            connect: d,
            helo: d,
            mail: d,
            rcpt: d,
            data: d,
            data_done: d,
        };
        Connection::open(
            &addr.to_string(),
            "relay.test",
            &timeouts,
            &Security::plain(),
        )
        .unwrap()
    }

    /// Where a chain broke, and the stage of each message it left unknown.
    type Cut = (Stage, Vec<Stage>);

    /// Delivers the three items as one chain: what `finished` got, and
    /// the error with the stages of what was left unknown.
    fn deliver(c: &mut Connection, items: &[Item]) -> (Vec<Vec<u16>>, Option<Cut>) {
        let mut rest = items[1..].iter();
        let mut done = Vec::new();
        let r = c.deliver_chain(
            &items[0],
            || rest.next(),
            |_, d| match d {
                Delivery::Replies(r) => done.push(r.iter().map(|r| r.code).collect()),
                Delivery::Refused(_) => done.push(vec![0]),
            },
        );
        let broken = r.err().map(|b| {
            let stages = b.unknown.iter().map(|u| u.stage).collect();
            (b.error.stage, stages)
        });
        (done, broken)
    }

    #[test]
    fn chunking_sends_every_waiting_message_in_one_write() {
        let replies = "250 mail\r\n250 rcpt\r\n250 1\r\n\
                       250 reset\r\n250 mail\r\n550 no such user\r\n554 no valid recipients\r\n\
                       250 reset\r\n250 mail\r\n250 rcpt\r\n250 3\r\n";
        let (addr, server) = peer(b"m3\r\n", replies);
        let mut c = connect(addr);
        assert!(c.chunked());
        let (done, broken) = deliver(&mut c, &items());
        assert_eq!(broken, None);
        assert_eq!(done, [vec![250], vec![550], vec![250]]);
        let wire = String::from_utf8(server.join().unwrap()).unwrap();
        // All three before any reply, the first without RSET.
        assert_eq!(
            wire,
            "MAIL FROM:<a@x>\r\nRCPT TO:<r1@y>\r\nBDAT 4 LAST\r\nm1\r\n\
             RSET\r\nMAIL FROM:<a@x>\r\nRCPT TO:<r2@y>\r\nBDAT 4 LAST\r\nm2\r\n\
             RSET\r\nMAIL FROM:<a@x>\r\nRCPT TO:<r3@y>\r\nBDAT 4 LAST\r\nm3\r\n"
        );
    }

    #[test]
    fn a_batch_cut_off_leaves_its_written_chunks_possible_duplicates() {
        // The peer took everything and closed without a word.
        let (addr, server) = peer(b"m3\r\n", "");
        let mut c = connect(addr);
        let (done, broken) = deliver(&mut c, &items());
        server.join().unwrap();
        assert!(done.is_empty());
        let (_, stages) = broken.unwrap();
        assert_eq!(stages, [Stage::Final, Stage::Final, Stage::Final]);
    }

    #[test]
    fn a_421_in_a_batch_leaves_what_follows_untaken() {
        // The first goes; the second's RSET is answered 421.
        let (addr, server) = peer(
            b"m3\r\n",
            "250 mail\r\n250 rcpt\r\n250 1\r\n421 closing\r\n",
        );
        let mut c = connect(addr);
        let (done, broken) = deliver(&mut c, &items());
        server.join().unwrap();
        assert_eq!(done, [vec![250]]);
        let (at, stages) = broken.unwrap();
        assert_eq!(at, Stage::Reset);
        assert_eq!(stages, [Stage::Mail, Stage::Mail]);
    }

    #[test]
    fn a_421_answering_a_chunk_is_no_possible_duplicate() {
        let (addr, server) = peer(b"m3\r\n", "250 mail\r\n250 rcpt\r\n421 4.3.2 closing\r\n");
        let mut c = connect(addr);
        let items = items();
        let mut rest = items[1..].iter();
        let r = c.deliver_chain(&items[0], || rest.next(), |_, _| {});
        server.join().unwrap();
        let e = r.err().unwrap().error;
        assert_eq!(e.stage, Stage::Final);
        let said = e.to_string();
        assert!(said.contains("421 4.3.2 closing"), "{said}");
        assert!(!said.contains("possible duplicate"), "{said}");
        // Without a word, it is one.
        let cut = ConnError::new(Stage::Final, Trouble::Closed).to_string();
        assert!(cut.contains("possible duplicate"), "{cut}");
    }

    #[test]
    fn a_session_limit_at_mail_in_a_batch_keeps_reading_the_rest() {
        // The second's MAIL is refused for the session (its message is
        // untried), yet the peer goes on and takes the third: the third
        // is done, not sent again.
        let replies = "250 mail\r\n250 rcpt\r\n250 1\r\n\
                       250 reset\r\n452 4.5.3 too many messages\r\n503 rcpt\r\n503 bdat\r\n\
                       250 reset\r\n250 mail\r\n250 rcpt\r\n250 3\r\n";
        let (addr, server) = peer(b"m3\r\n", replies);
        let mut c = connect(addr);
        let (done, broken) = deliver(&mut c, &items());
        server.join().unwrap();
        assert_eq!(done, [vec![250], vec![250]]);
        assert_eq!(broken, Some((Stage::Mail, vec![Stage::Mail])));
    }

    #[test]
    fn bdat_not_understood_turns_chunking_off() {
        let replies = "250 mail\r\n250 rcpt\r\n502 5.5.1 BDAT not implemented\r\n";
        let (addr, server) = peer(b"m3\r\n", replies);
        let mut c = connect(addr);
        let (done, broken) = deliver(&mut c, &items());
        server.join().unwrap();
        assert!(done.is_empty(), "nobody fails for it: {done:?}");
        let (_, stages) = broken.unwrap();
        assert_eq!(stages, [Stage::Mail, Stage::Mail, Stage::Mail]);
        assert!(!c.chunked());
    }

    #[test]
    fn a_reply_nobody_asked_for_stops_the_next_batch() {
        // One too many after the first batch: the second is not sent.
        let (addr, server) = peer(b"m1\r\n", "250 mail\r\n250 rcpt\r\n250 1\r\n250 extra\r\n");
        let mut c = connect(addr);
        let items = items();
        let mut later = items[1..].iter();
        let mut calls = 0;
        let mut done = Vec::new();
        let r = c.deliver_chain(
            &items[0],
            || {
                calls += 1;
                // Nothing waits at the first batch; the rest come after.
                (calls > 1).then(|| later.next()).flatten()
            },
            |_, d| done.push(d),
        );
        server.join().unwrap();
        assert_eq!(done.len(), 1);
        let b = r.err().unwrap();
        assert!(
            matches!(b.error.trouble, Trouble::Protocol(_)),
            "{}",
            b.error
        );
        let stages: Vec<Stage> = b.unknown.iter().map(|u| u.stage).collect();
        assert_eq!(stages, [Stage::Mail, Stage::Mail]);
    }

    #[test]
    fn without_chunking_it_is_data() {
        let (addr, server) = peer(b"DATA\r\n", "250 mail\r\n250 rcpt\r\n554 no\r\n");
        let mut c = connect(addr);
        c.set_chunking(false);
        assert!(!c.chunked());
        let items = items();
        let mut done = Vec::new();
        // The RSET after the refused DATA finds the peer gone: that is
        // the chain's error, after the message was decided.
        let _ = c.deliver_chain(&items[0], || None, |_, d| done.push(d));
        assert!(matches!(&done[..], [Delivery::Replies(r)] if r[0].code == 554));
        let wire = String::from_utf8(server.join().unwrap()).unwrap();
        assert_eq!(wire, "MAIL FROM:<a@x>\r\nRCPT TO:<r1@y>\r\nDATA\r\n");
    }
}
