//! One blocking SMTP client connection: connect, greet, EHLO, then any
//! number of transactions, kept open between them. The protocol decisions
//! are `smtp::client`'s; this file only moves octets and applies timeouts.
//!
//! A connection that saw an I/O error, a timeout, a malformed reply or a
//! 421 is never reused: the caller drops it and opens another.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use log::warn;
use native_tls::TlsConnector;

use crate::config::{PeerConfig, Secret, TlsMode};
use crate::message::Job;
use crate::printable::Printable;
use crate::smtp::Reply;
use crate::smtp::client::{Capabilities, Expect, Refusal, Step, Transaction};
use crate::smtp::codec::dot_stuff;
use crate::smtp::command::BodyType;
use crate::smtp::reply::ReplyError;
use crate::tls::{self, Stream, TlsError};

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
    /// Whether to STARTTLS, or to start TLS at once.
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
            .ok_or_else(|| ConnError::Tls("no TLS client for this peer".into()))?;
        lazy.built
            .get_or_init(|| tls::connector(&lazy.cfg).map_err(|e: TlsError| e.to_string()))
            .as_ref()
            .map_err(|e| ConnError::Tls(format!("cannot set up the TLS client: {e}")))
    }
}

/// The host part of `host:port`, without IPv6 brackets.
fn host_name(host: &str) -> &str {
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
        ConnError::Tls(format!(
            "{e} (implicit TLS; certificate name checked: {name})"
        ))
    })?;
    // From here the per-phase timeouts apply, as on any connection.
    stream.set_deadline(None);
    Ok(stream)
}

/// Why a connection failed; every one of these closes it.
#[derive(Debug)]
pub enum ConnError {
    /// No address of any host would connect.
    Connect(String),
    /// The peer greeted with something other than 220, or refused EHLO and HELO.
    Greeting(Reply),
    /// A read or write failed or timed out.
    Io(io::Error),
    /// The peer closed the connection.
    Closed,
    /// The peer sent something that is not a reply.
    Protocol(ReplyError),
    /// The peer said 421: it is closing the channel.
    ServiceClosing(Reply),
    /// The connection failed after the final dot, before its reply: the
    /// peer may have taken the message, so the retry may duplicate it.
    AfterFinalDot(Box<ConnError>),
    /// TLS was required and could not be had (not offered, refused, or
    /// the handshake or certificate check failed).
    Tls(String),
    /// AUTH was configured and failed or could not be attempted.
    Auth(String),
}

impl fmt::Display for ConnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnError::Connect(e) => write!(f, "connect failed: {e}"),
            ConnError::Greeting(r) => write!(f, "refused at greeting: {r}"),
            ConnError::Io(e) if is_timeout(e) => f.write_str("timed out waiting for the peer"),
            ConnError::Io(e) => write!(f, "I/O error: {e}"),
            ConnError::Closed => f.write_str("connection closed by peer"),
            ConnError::Protocol(e) => write!(f, "protocol error: {e}"),
            ConnError::ServiceClosing(r) => write!(f, "peer closing: {r}"),
            ConnError::Tls(e) => write!(f, "TLS: {e}"),
            ConnError::Auth(e) => write!(f, "AUTH: {e}"),
            ConnError::AfterFinalDot(e) => {
                write!(
                    f,
                    "{e} after the final dot, before the reply: possible duplicate"
                )
            }
        }
    }
}

impl std::error::Error for ConnError {}

impl From<io::Error> for ConnError {
    fn from(e: io::Error) -> Self {
        ConnError::Io(e)
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
    )
}

fn unknown_rest<T>(chained: Option<(T, Transaction)>) -> Vec<T> {
    chained.map(|(i, _)| i).into_iter().collect()
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
    /// The host name it was opened to, without the port.
    host: String,
    caps: Capabilities,
    timeouts: Timeouts,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    /// The read timeout set on the socket, so it is set only on change.
    read_timeout: Duration,
}

impl Connection {
    /// Connects to `host` (`name:port`; each address it resolves to in
    /// turn), reads the greeting, sends EHLO (HELO if EHLO is refused),
    /// then STARTTLS and AUTH as `security` says. Opportunistic TLS whose
    /// handshake fails is logged and the connection opened again in plain
    /// text; required TLS never falls back. Implicit TLS runs the handshake
    /// before the greeting, within the helo timeout, and never falls back
    /// either.
    pub fn open(
        host: &str,
        helo_name: &str,
        timeouts: &Timeouts,
        security: &Security,
    ) -> Result<Connection, ConnError> {
        match Connection::open_once(host, helo_name, timeouts, security) {
            Err(ConnError::Tls(e)) if security.mode == TlsMode::Opportunistic => {
                warn!(
                    "host={host} {}: opportunistic TLS, falling back to plain text",
                    Printable(&e)
                );
                let plain = Security {
                    mode: TlsMode::Off,
                    ..security.clone()
                };
                Connection::open_once(host, helo_name, timeouts, &plain)
            }
            other => other,
        }
    }

    fn open_once(
        host: &str,
        helo_name: &str,
        timeouts: &Timeouts,
        security: &Security,
    ) -> Result<Connection, ConnError> {
        let addrs = host
            .to_socket_addrs()
            .map_err(|e| ConnError::Connect(format!("{host}: {e}")))?;
        let mut errors = Vec::new();
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, timeouts.connect) {
                Ok(tcp) => {
                    let stream = if security.mode == TlsMode::Implicit {
                        implicit_tls(tcp, host, timeouts, security)?
                    } else {
                        Stream::from(tcp)
                    };
                    let mut c = Connection::greet(stream, helo_name, timeouts.clone())?;
                    c.host = host_name(host).to_string();
                    c.secure(host, helo_name, security)?;
                    return Ok(c);
                }
                Err(e) => errors.push(format!("{addr}: {e}")),
            }
        }
        Err(ConnError::Connect(errors.join("; ")))
    }

    /// STARTTLS and AUTH on a greeted connection.
    fn secure(
        &mut self,
        host: &str,
        helo_name: &str,
        security: &Security,
    ) -> Result<(), ConnError> {
        if matches!(security.mode, TlsMode::Opportunistic | TlsMode::Required) {
            if self.caps.starttls {
                // Built only now: a peer that never offers STARTTLS never
                // costs a TLS client (it reads the CA store).
                let connector = security.connector()?;
                let reply = self.exchange(b"STARTTLS\r\n")?;
                if reply.code == 220 {
                    self.start_tls(
                        connector,
                        security.server_name.as_deref().unwrap_or(host_name(host)),
                    )?;
                    self.ehlo(helo_name)?;
                } else if security.mode == TlsMode::Required {
                    return Err(ConnError::Tls(format!("STARTTLS refused: {reply}")));
                } else {
                    warn!(
                        "host={host} STARTTLS refused ({}): opportunistic TLS, plain text",
                        Printable(&reply.to_string())
                    );
                }
            } else if security.mode == TlsMode::Required {
                return Err(ConnError::Tls("the peer does not offer STARTTLS".into()));
            }
        }
        if let Some((user, password)) = &security.auth {
            if !self.stream.is_tls() && !security.auth_plaintext {
                return Err(ConnError::Auth(
                    "no TLS on this connection, and auth_plaintext is no".into(),
                ));
            }
            self.authenticate(user, password.expose())?;
        }
        Ok(())
    }

    fn start_tls(&mut self, connector: &TlsConnector, name: &str) -> Result<(), ConnError> {
        if !self.rbuf.is_empty() {
            // Octets after the 220 would be injected into the TLS session.
            return Err(ConnError::Tls("data after the STARTTLS reply".into()));
        }
        let placeholder = Stream::from(self.stream.tcp().try_clone()?);
        let stream = std::mem::replace(&mut self.stream, placeholder);
        self.stream
            .tcp()
            .set_read_timeout(Some(self.timeouts.helo.max(Duration::from_millis(1))))?;
        self.read_timeout = Duration::ZERO;
        self.stream = stream
            .connect(connector, name)
            .map_err(|e| ConnError::Tls(format!("{e} (certificate name checked: {name})")))?;
        Ok(())
    }

    /// AUTH PLAIN if offered, else AUTH LOGIN. The credentials are never
    /// logged, nor put in an error.
    fn authenticate(&mut self, user: &str, password: &str) -> Result<(), ConnError> {
        let b64 = |s: &[u8]| base64::engine::general_purpose::STANDARD.encode(s);
        let offered = |m: &str| self.caps.auth.iter().any(|a| a == m);
        let reply = if offered("PLAIN") {
            let token = b64(format!("\0{user}\0{password}").as_bytes());
            self.exchange(format!("AUTH PLAIN {token}\r\n").as_bytes())?
        } else if offered("LOGIN") {
            let mut reply = self.exchange(b"AUTH LOGIN\r\n")?;
            for answer in [user, password] {
                if reply.code != 334 {
                    break;
                }
                reply = self.exchange(format!("{}\r\n", b64(answer.as_bytes())).as_bytes())?;
            }
            reply
        } else {
            return Err(ConnError::Auth(format!(
                "the peer offers no AUTH PLAIN or LOGIN (offers: {})",
                self.caps.auth.join(" ")
            )));
        };
        if reply.code == 235 {
            Ok(())
        } else {
            Err(ConnError::Auth(format!("refused: {reply}")))
        }
    }

    /// Sends one command and reads its reply, whatever it is.
    fn exchange(&mut self, line: &[u8]) -> Result<Reply, ConnError> {
        self.write(line)?;
        self.read_reply(self.timeouts.helo)
    }

    fn ehlo(&mut self, helo_name: &str) -> Result<(), ConnError> {
        let ehlo = self.exchange(format!("EHLO {helo_name}\r\n").as_bytes())?;
        if !ehlo.is_positive() {
            return Err(ConnError::Greeting(ehlo));
        }
        self.caps = Capabilities::from_ehlo(&ehlo);
        Ok(())
    }

    fn greet(stream: Stream, helo_name: &str, timeouts: Timeouts) -> Result<Connection, ConnError> {
        stream.tcp().set_nodelay(true)?;
        stream.tcp().set_write_timeout(Some(timeouts.data))?;
        let mut c = Connection {
            stream,
            host: String::new(),
            caps: Capabilities::default(),
            timeouts,
            rbuf: Vec::with_capacity(4096),
            wbuf: Vec::with_capacity(8192),
            read_timeout: Duration::ZERO,
        };
        let helo_timeout = c.timeouts.helo;
        let greeting = c.read_reply(helo_timeout)?;
        if greeting.code != 220 {
            return Err(ConnError::Greeting(greeting));
        }
        c.write(format!("EHLO {helo_name}\r\n").as_bytes())?;
        let ehlo = c.read_reply(helo_timeout)?;
        if ehlo.is_positive() {
            c.caps = Capabilities::from_ehlo(&ehlo);
            return Ok(c);
        }
        c.write(format!("HELO {helo_name}\r\n").as_bytes())?;
        let helo = c.read_reply(helo_timeout)?;
        if !helo.is_positive() {
            return Err(ConnError::Greeting(helo));
        }
        Ok(c)
    }

    /// The host this connection talks to (its name, without the port).
    pub fn host(&self) -> &str {
        &self.host
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
            .map_err(|(e, _)| e)?;
        Ok(outcome.expect("a chain of one finishes its item"))
    }

    /// Delivers `first`, then whatever `next` yields, back to back. With
    /// PIPELINING, the next transaction's MAIL, RCPTs and DATA go out in the
    /// same write as the previous message's content and final dot (RFC 2920
    /// lets content start a command group), so each message costs one round
    /// trip instead of two. `finished` gets every item whose outcome is
    /// known. On `Err` the connection is unusable, and the error comes with
    /// the items whose outcome is not known (to be retried).
    pub fn deliver_chain<T: Outbound>(
        &mut self,
        first: T,
        mut next: impl FnMut() -> Option<T>,
        mut finished: impl FnMut(T, Delivery),
    ) -> Result<(), (ConnError, Vec<T>)> {
        let mut queued = Some(first);
        let mut in_flight: Option<(T, Transaction)> = None;
        loop {
            let (item, mut t) = match in_flight.take() {
                Some(x) => x,
                None => {
                    let Some(item) = queued.take().or_else(&mut next) else {
                        return Ok(());
                    };
                    match self.begin(&item) {
                        Ok((t, commands)) => match self.write(&commands) {
                            Ok(()) => (item, t),
                            Err(e) => return Err((e, vec![item])),
                        },
                        Err(refusal) => {
                            finished(item, Delivery::Refused(refusal));
                            continue;
                        }
                    }
                }
            };
            let mut chained: Option<(T, Transaction)> = None;
            let unknown = |item: T, chained: Option<(T, Transaction)>| {
                let mut v = vec![item];
                v.extend(chained.map(|(i, _)| i));
                v
            };
            loop {
                let reply = match self.read_reply(self.timeout_for(&t)) {
                    Ok(r) if r.code == 421 => {
                        return Err((ConnError::ServiceClosing(r), unknown(item, chained)));
                    }
                    Ok(r) => r,
                    Err(e) if t.expecting() == Expect::Final => {
                        return Err((
                            ConnError::AfterFinalDot(Box::new(e)),
                            unknown(item, chained),
                        ));
                    }
                    Err(e) => return Err((e, unknown(item, chained))),
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
                                    Ok((t2, commands)) => {
                                        buf.extend_from_slice(&commands);
                                        chained = Some((n, t2));
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
                if let Err(e) = sent {
                    return Err((e, unknown(item, chained)));
                }
            }
            // Content was sent only if the transaction completed, so a
            // transaction that needs RSET never has a chained successor.
            let reset = if t.needs_reset() {
                self.command("RSET\r\n")
            } else {
                Ok(())
            };
            let replies = t
                .outcomes()
                .iter()
                .map(|o| o.clone().expect("transaction done"))
                .collect();
            finished(item, Delivery::Replies(replies));
            if let Err(e) = reset {
                return Err((e, unknown_rest(chained)));
            }
            in_flight = chained;
        }
    }

    fn begin<T: Outbound>(&self, item: &T) -> Result<(Transaction, Vec<u8>), Refusal> {
        Transaction::start(
            &self.caps,
            item.from(),
            item.rcpts(),
            item.data().len() as u64,
            item.body_type(),
        )
    }

    fn timeout_for(&self, t: &Transaction) -> Duration {
        match t.expecting() {
            Expect::Mail => self.timeouts.mail,
            Expect::Rcpt(_) => self.timeouts.rcpt,
            Expect::Data | Expect::EmptyData => self.timeouts.data,
            Expect::Final | Expect::Done => self.timeouts.data_done,
        }
    }

    /// Sends NOOP to keep an idle connection open and prove it is alive.
    pub fn noop(&mut self) -> Result<(), ConnError> {
        self.command("NOOP\r\n")
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

    fn command(&mut self, line: &str) -> Result<(), ConnError> {
        self.write(line.as_bytes())?;
        let reply = self.read_reply(self.timeouts.helo)?;
        if reply.is_positive() {
            Ok(())
        } else {
            Err(ConnError::ServiceClosing(reply))
        }
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), ConnError> {
        self.stream.write_all(bytes)?;
        Ok(())
    }

    fn read_reply(&mut self, timeout: Duration) -> Result<Reply, ConnError> {
        let timeout = timeout.max(Duration::from_millis(1));
        if timeout != self.read_timeout {
            self.stream.tcp().set_read_timeout(Some(timeout))?;
            self.read_timeout = timeout;
        }
        loop {
            if let Some((reply, used)) = Reply::parse(&self.rbuf).map_err(ConnError::Protocol)? {
                self.rbuf.drain(..used);
                return Ok(reply);
            }
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                return Err(ConnError::Closed);
            }
            self.rbuf.extend_from_slice(&chunk[..n]);
        }
    }
}
