//! TLS, TLS 1.2 or newer only: the server side for STARTTLS and
//! implicit-TLS listeners (the openssl crate's acceptor, TLS 1.3 and 1.2),
//! the client side for peers (native-tls, OpenSSL on Linux), and one
//! stream type that is plain or TLS so the socket code above does not care
//! which. Under both is a [`Socket`] that can carry a deadline: every read
//! and write system call, those OpenSSL makes inside one TLS record
//! included, ends by it.
//!
//! The server side is not native-tls's: its acceptor is OpenSSL's Mozilla
//! "intermediate" profile of version 4, which sets `NO_TLSV1_3`, and
//! native-tls has no way to clear it, so a client that allows only TLS 1.3
//! could not connect. Ours is the version 5 profile (TLS 1.2 and 1.3).

use std::fmt;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use native_tls::{HandshakeError, Protocol, TlsConnector, TlsStream};
use openssl::pkcs12::Pkcs12;
use openssl::pkey::{PKey, Private};
use openssl::ssl::{self, SslAcceptor, SslMethod, SslStream, SslVersion};
use openssl::x509::X509;

/// A TLS set-up or handshake failure.
#[derive(Debug)]
pub struct TlsError {
    text: String,
    /// Set when the network ended the handshake (a timeout, a reset, the
    /// peer closing), not TLS itself.
    network: Option<io::ErrorKind>,
}

impl TlsError {
    fn new(text: impl Into<String>) -> TlsError {
        TlsError {
            text: text.into(),
            network: None,
        }
    }

    /// The kind of I/O error that ended the handshake, if the network
    /// did rather than TLS (a certificate, a protocol version).
    pub fn network(&self) -> Option<io::ErrorKind> {
        self.network
    }
}

/// The I/O error somewhere under `e`, if any.
fn io_kind(e: &(dyn std::error::Error + 'static)) -> Option<io::ErrorKind> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            return Some(io.kind());
        }
        cur = err.source();
    }
    // OpenSSL 3 says so without an I/O error.
    e.to_string()
        .to_ascii_lowercase()
        .contains("unexpected eof")
        .then_some(io::ErrorKind::UnexpectedEof)
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::error::Error for TlsError {}

impl From<native_tls::Error> for TlsError {
    fn from(e: native_tls::Error) -> Self {
        TlsError::new(e.to_string())
    }
}

impl From<openssl::error::ErrorStack> for TlsError {
    fn from(e: openssl::error::ErrorStack) -> Self {
        TlsError::new(e.to_string())
    }
}

impl From<HandshakeError<Socket>> for TlsError {
    fn from(e: HandshakeError<Socket>) -> Self {
        match e {
            HandshakeError::Failure(e) => TlsError {
                network: io_kind(&e),
                text: format!("TLS handshake failed: {e}"),
            },
            HandshakeError::WouldBlock(_) => TlsError {
                text: "TLS handshake timed out".into(),
                network: Some(io::ErrorKind::TimedOut),
            },
        }
    }
}

/// A certificate with its private key (and the chain above it), for
/// either side: in the form native-tls takes for the client side, and in
/// the openssl crate's for the server side.
#[derive(Clone)]
pub struct Identity {
    native: native_tls::Identity,
    key: PKey<Private>,
    cert: X509,
    chain: Vec<X509>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Identity")
    }
}

impl Identity {
    /// From a PEM certificate (the leaf, then its chain) and a PEM
    /// PKCS#8 private key.
    pub fn from_pem(cert: &[u8], key: &[u8]) -> Result<Identity, TlsError> {
        let native = native_tls::Identity::from_pkcs8(cert, key)?;
        let mut certs = X509::stack_from_pem(cert)?.into_iter();
        let leaf = certs
            .next()
            .ok_or_else(|| TlsError::new("no certificate in the PEM data"))?;
        Ok(Identity {
            native,
            key: PKey::private_key_from_pem(key)?,
            cert: leaf,
            chain: certs.collect(),
        })
    }

    /// From a PKCS#12 archive and its password.
    pub fn from_pkcs12(der: &[u8], password: &str) -> Result<Identity, TlsError> {
        if password.contains('\0') {
            return Err(TlsError::new("a password with a NUL octet"));
        }
        let native = native_tls::Identity::from_pkcs12(der, password)?;
        let parsed = Pkcs12::from_der(der)?.parse2(password)?;
        let (Some(key), Some(cert)) = (parsed.pkey, parsed.cert) else {
            return Err(TlsError::new("no certificate and key in the PKCS#12 file"));
        };
        Ok(Identity {
            native,
            key,
            cert,
            chain: parsed.ca.map_or_else(Vec::new, |s| s.into_iter().collect()),
        })
    }
}

/// The server side: TLS 1.3 and 1.2, with the listener's certificate.
#[derive(Clone)]
pub struct Acceptor(SslAcceptor);

impl Acceptor {
    /// A server side with `identity`, on Mozilla's intermediate profile
    /// (version 5): TLS 1.2 and 1.3, forward-secret AEAD ciphers only.
    pub fn new(identity: &Identity) -> Result<Acceptor, TlsError> {
        let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server())?;
        b.set_min_proto_version(Some(SslVersion::TLS1_2))?;
        b.set_private_key(&identity.key)?;
        b.set_certificate(&identity.cert)?;
        for c in &identity.chain {
            b.add_extra_chain_cert(c.clone())?;
        }
        b.check_private_key()?;
        Ok(Acceptor(b.build()))
    }
}

/// The client side: TLS 1.2 or newer, the peer's certificate and name
/// checked unless `verify` is off, `roots` trusted besides the system's,
/// and `identity` shown when the peer asks for a client certificate.
pub fn connector(
    verify: bool,
    roots: &[native_tls::Certificate],
    identity: Option<&Identity>,
) -> Result<TlsConnector, TlsError> {
    let mut b = TlsConnector::builder();
    b.min_protocol_version(Some(Protocol::Tlsv12));
    if !verify {
        b.danger_accept_invalid_certs(true)
            .danger_accept_invalid_hostnames(true);
    }
    for ca in roots {
        b.add_root_certificate(ca.clone());
    }
    if let Some(id) = identity {
        b.identity(id.native.clone());
    }
    Ok(b.build()?)
}

/// A TCP socket with an optional deadline. Without one it is the socket
/// as it is (its own timeouts apply). With one, every read and write
/// waits at most until the deadline and then fails as a timeout does
/// (`WouldBlock`): a per-call timeout alone starts again at every octet,
/// and one TLS record read is many calls.
#[derive(Debug)]
pub struct Socket {
    tcp: TcpStream,
    deadline: Option<Instant>,
    /// The read and write timeouts last set, to set them only on change.
    timeout: Option<Duration>,
}

impl Socket {
    /// Arms the socket's timeouts for a call that must end by the deadline:
    /// when the call started and the timeout armed, or `None` without a
    /// deadline. A setsockopt per call would cost as much as the call, so
    /// the timeout changes only as [`rearm`] says: a session's command and
    /// DATA deadlines take turns without one, and near a deadline it
    /// changes about once a second.
    fn arm(&mut self) -> io::Result<Option<(Instant, Duration)>> {
        let Some(deadline) = self.deadline else {
            return Ok(None);
        };
        let now = Instant::now();
        let left = deadline.saturating_duration_since(now);
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::WouldBlock, "deadline passed"));
        }
        let Some(timeout) = rearm(self.timeout, left) else {
            return Ok(self.timeout.map(|t| (now, t)));
        };
        self.tcp.set_read_timeout(Some(timeout))?;
        self.tcp.set_write_timeout(Some(timeout))?;
        self.timeout = Some(timeout);
        Ok(Some((now, timeout)))
    }

    /// Sets the deadline. From none, the timeouts are armed afresh at the
    /// next call: meanwhile they may have been set on the TCP socket
    /// itself (see [`Stream::tcp`]), and one kept as it is could wait
    /// past the deadline.
    fn set_deadline(&mut self, deadline: Option<Instant>) {
        if self.deadline.is_none() {
            self.timeout = None;
        }
        self.deadline = deadline;
    }

    /// Runs `call` by the deadline: a timeout armed shorter than the
    /// deadline that runs out is tried again (a call on a non-blocking
    /// socket, which returns at once, is not).
    fn by_deadline<T>(
        &mut self,
        mut call: impl FnMut(&mut TcpStream) -> io::Result<T>,
    ) -> io::Result<T> {
        loop {
            let armed = self.arm()?;
            match call(&mut self.tcp) {
                // A timeout is EAGAIN; ETIMEDOUT is a connection TCP gave up.
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        && armed.is_some_and(|(at, t)| at.elapsed() >= t / 2) =>
                {
                    continue;
                }
                r => return r,
            }
        }
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.by_deadline(|tcp| tcp.read(buf))
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.by_deadline(|tcp| tcp.write(buf))
    }

    fn flush(&mut self) -> io::Result<()> {
        self.tcp.flush()
    }
}

/// The timeout to arm with `left` until the deadline, or `None` to keep
/// `armed`: kept while it cannot pass the deadline and is at least a
/// quarter of what is left; else whole seconds of what is left while more
/// than one is, then what is left (at least 1 ms).
fn rearm(armed: Option<Duration>, left: Duration) -> Option<Duration> {
    if armed.is_some_and(|t| t <= left && t * 4 >= left) {
        return None;
    }
    Some(if left > Duration::from_secs(1) {
        Duration::from_secs(left.as_secs())
    } else {
        left.max(Duration::from_millis(1))
    })
}

/// A connection that is plain TCP or TLS over TCP.
pub enum Stream {
    /// Plain text.
    Plain(Socket),
    /// TLS, our client side (native-tls); boxed, it is large.
    Client(Box<TlsStream<Socket>>),
    /// TLS, our server side (the openssl crate); boxed, it is large.
    Server(Box<SslStream<Socket>>),
}

impl From<TcpStream> for Stream {
    fn from(tcp: TcpStream) -> Stream {
        Stream::Plain(Socket {
            tcp,
            deadline: None,
            timeout: None,
        })
    }
}

impl Stream {
    /// The TCP socket underneath, for timeouts and shutdown.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => &s.tcp,
            Stream::Client(s) => &s.get_ref().tcp,
            Stream::Server(s) => &s.get_ref().tcp,
        }
    }

    /// Every read and write from now on ends by `deadline` (`None`: the
    /// socket's own timeouts apply again, as last set).
    pub fn set_deadline(&mut self, deadline: Option<Instant>) {
        let socket = match self {
            Stream::Plain(s) => s,
            Stream::Client(s) => s.get_mut(),
            Stream::Server(s) => s.get_mut(),
        };
        socket.set_deadline(deadline);
    }

    /// True once TLS runs.
    pub fn is_tls(&self) -> bool {
        !matches!(self, Stream::Plain(_))
    }

    /// The TLS version the server side negotiated (`TLSv1.3`, `TLSv1.2`);
    /// `None` in plain text and on the client side.
    pub fn tls_version(&self) -> Option<&'static str> {
        match self {
            Stream::Server(s) => Some(s.ssl().version_str()),
            _ => None,
        }
    }

    /// Runs the server handshake over a plain stream, all of it by
    /// `deadline`: a client that sends its hello an octet at a time is cut
    /// there, however often each octet comes (a read timeout alone would
    /// start again at every one).
    pub fn accept_by(self, acceptor: &Acceptor, deadline: Instant) -> Result<Stream, TlsError> {
        let Stream::Plain(mut s) = self else {
            return Err(TlsError::new("TLS already active"));
        };
        let io_err = |e: io::Error| TlsError::new(format!("TLS handshake: {e}"));
        s.tcp.set_nonblocking(true).map_err(io_err)?;
        let kept = s.deadline.replace(deadline);
        let mut step = acceptor.0.accept(s);
        // Waits that returned at once, in a row: the step waits to write
        // while input is already there (or the client half-closed), and
        // a read wait cannot tell. Past two, a short sleep instead, so a
        // client that never reads cannot make this loop spin.
        let mut quick = 0;
        loop {
            match step {
                Ok(mut tls) => {
                    let s = tls.get_mut();
                    s.tcp.set_nonblocking(false).map_err(io_err)?;
                    s.deadline = kept;
                    return Ok(Stream::Server(Box::new(tls)));
                }
                Err(ssl::HandshakeError::SetupFailure(e)) => {
                    return Err(TlsError::new(format!("TLS set-up failed: {e}")));
                }
                Err(ssl::HandshakeError::Failure(mid)) => {
                    return Err(TlsError::new(format!(
                        "TLS handshake failed: {}",
                        mid.error()
                    )));
                }
                Err(ssl::HandshakeError::WouldBlock(mid)) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(TlsError::new("TLS handshake timed out"));
                    }
                    let waited = Instant::now();
                    if quick >= 2 {
                        std::thread::sleep(left.min(HANDSHAKE_BACKOFF));
                        quick = 0;
                    } else {
                        wait_readable(&mid.get_ref().tcp, left.min(HANDSHAKE_POLL));
                        quick = if waited.elapsed() < Duration::from_millis(1) {
                            quick + 1
                        } else {
                            0
                        };
                    }
                    step = mid.handshake();
                }
            }
        }
    }

    /// Runs the client handshake over a plain stream, checking `name`.
    pub fn connect(self, connector: &TlsConnector, name: &str) -> Result<Stream, TlsError> {
        match self {
            Stream::Plain(s) => Ok(Stream::Client(Box::new(connector.connect(name, s)?))),
            _ => Err(TlsError::new("TLS already active")),
        }
    }
}

/// Longest wait for the client between two tries of a handshake step. The
/// step may wait to write, not to read (our first flight filling a send
/// buffer the client does not empty); a read wait notices that this late.
const HANDSHAKE_POLL: Duration = Duration::from_millis(250);
/// The sleep between tries when waits for input return at once.
const HANDSHAKE_BACKOFF: Duration = Duration::from_millis(10);

/// Waits until `s` has something to read, or `timeout` passes.
fn wait_readable(s: &TcpStream, timeout: Duration) {
    let mut fd = libc::pollfd {
        fd: s.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
    // SAFETY: one valid pollfd for the duration of the call. An error or
    // a signal only means the next handshake step comes sooner.
    unsafe { libc::poll(&mut fd, 1, ms) };
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Client(s) => s.read(buf),
            Stream::Server(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Client(s) => s.write(buf),
            Stream::Server(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Client(s) => s.flush(),
            Stream::Server(s) => s.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn a_timeout_that_fits_is_kept_and_one_that_does_not_is_rearmed() {
        // The command deadline's timeout serves the DATA deadline after it.
        assert_eq!(rearm(Some(S(299)), Duration::from_millis(599_900)), None);
        // The DATA deadline's would pass the command deadline.
        assert_eq!(
            rearm(Some(S(599)), Duration::from_millis(299_900)),
            Some(S(299))
        );
        // Far shorter than what is left: a wake-up a second for nothing.
        assert_eq!(
            rearm(Some(S(1)), Duration::from_millis(300_500)),
            Some(S(300))
        );
        assert_eq!(rearm(None, Duration::from_millis(2_500)), Some(S(2)));
        // Near the deadline: what is left, never less than a millisecond.
        let left = Duration::from_millis(400);
        assert_eq!(rearm(Some(S(1)), left), Some(left));
        assert_eq!(
            rearm(None, Duration::from_micros(10)),
            Some(Duration::from_millis(1))
        );
    }

    /// A connected pair on loopback: ours as a `Socket`, and the other end.
    fn pair() -> (Socket, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let tcp = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (other, _) = listener.accept().unwrap();
        let socket = Socket {
            tcp,
            deadline: None,
            timeout: None,
        };
        (socket, other)
    }

    #[test]
    fn a_read_waits_until_the_deadline_past_a_shorter_timeout() {
        let (mut socket, _other) = pair();
        let started = Instant::now();
        socket.deadline = Some(started + Duration::from_millis(1_500));
        let mut buf = [0u8; 16];
        let err = socket.read(&mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock, "{err}");
        // Armed with 1 s first: that running out is not the deadline.
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(1_450),
            "returned after {waited:?}"
        );
    }

    #[test]
    fn timeouts_set_on_the_socket_itself_do_not_outlast_a_new_deadline() {
        let (mut socket, mut other) = pair();
        other.write_all(b"x").unwrap();
        // Arms (and keeps) 1 s.
        socket.set_deadline(Some(Instant::now() + Duration::from_millis(1_500)));
        let mut buf = [0u8; 16];
        assert_eq!(socket.read(&mut buf).unwrap(), 1);
        socket.set_deadline(None);
        socket.tcp.set_read_timeout(Some(S(30))).unwrap();
        // 1 s would fit this deadline; the socket's real timeout is 30 s.
        let started = Instant::now();
        socket.set_deadline(Some(started + Duration::from_millis(1_900)));
        let err = socket.read(&mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock, "{err}");
        let waited = started.elapsed();
        assert!(
            waited < S(5),
            "returned after {waited:?}, past the deadline"
        );
    }

    #[test]
    fn a_non_blocking_read_returns_at_once() {
        let (mut socket, _other) = pair();
        socket.tcp.set_nonblocking(true).unwrap();
        let started = Instant::now();
        socket.deadline = Some(started + S(30));
        let mut buf = [0u8; 16];
        let err = socket.read(&mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock, "{err}");
        assert!(started.elapsed() < S(5), "a non-blocking read was retried");
    }
}
