//! TLS through native-tls (OpenSSL on Linux), TLS 1.2 or newer only: the
//! server side for STARTTLS and implicit-TLS listeners, the client side
//! for STARTTLS to peers, and one stream type that is plain or TLS so the
//! socket code above does not care which.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::TcpStream;

use native_tls::{HandshakeError, Protocol, TlsAcceptor, TlsConnector, TlsStream};

use crate::config::{ListenerConfig, PeerConfig};

/// A TLS set-up or handshake failure.
#[derive(Debug)]
pub struct TlsError(String);

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TlsError {}

impl From<native_tls::Error> for TlsError {
    fn from(e: native_tls::Error) -> Self {
        TlsError(e.to_string())
    }
}

impl From<HandshakeError<TcpStream>> for TlsError {
    fn from(e: HandshakeError<TcpStream>) -> Self {
        match e {
            HandshakeError::Failure(e) => TlsError(format!("TLS handshake failed: {e}")),
            HandshakeError::WouldBlock(_) => TlsError("TLS handshake timed out".into()),
        }
    }
}

/// The server side, when the listener has a certificate.
pub fn acceptor(l: &ListenerConfig) -> Result<Option<TlsAcceptor>, TlsError> {
    let Some(identity) = &l.tls_identity else {
        return Ok(None);
    };
    let acceptor = TlsAcceptor::builder(identity.0.clone())
        .min_protocol_version(Some(Protocol::Tlsv12))
        .build()?;
    Ok(Some(acceptor))
}

/// The client side for one peer.
pub fn connector(p: &PeerConfig) -> Result<TlsConnector, TlsError> {
    let mut b = TlsConnector::builder();
    b.min_protocol_version(Some(Protocol::Tlsv12));
    if !p.tls_verify {
        b.danger_accept_invalid_certs(true)
            .danger_accept_invalid_hostnames(true);
    }
    for ca in p.tls_ca.iter().flat_map(|r| r.0.iter()) {
        b.add_root_certificate(ca.clone());
    }
    if let Some(id) = &p.tls_client_identity {
        b.identity(id.0.clone());
    }
    Ok(b.build()?)
}

/// A connection that is plain TCP or TLS over TCP.
pub enum Stream {
    /// Plain text.
    Plain(TcpStream),
    /// TLS; boxed, it is large.
    Tls(Box<TlsStream<TcpStream>>),
}

impl Stream {
    /// The TCP socket underneath, for timeouts and shutdown.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => s.get_ref(),
        }
    }

    /// True once TLS runs.
    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }

    /// Runs the server handshake over a plain stream.
    pub fn accept(self, acceptor: &TlsAcceptor) -> Result<Stream, TlsError> {
        match self {
            Stream::Plain(s) => Ok(Stream::Tls(Box::new(acceptor.accept(s)?))),
            Stream::Tls(_) => Err(TlsError("TLS already active".into())),
        }
    }

    /// Runs the client handshake over a plain stream, checking `name`.
    pub fn connect(self, connector: &TlsConnector, name: &str) -> Result<Stream, TlsError> {
        match self {
            Stream::Plain(s) => Ok(Stream::Tls(Box::new(connector.connect(name, s)?))),
            Stream::Tls(_) => Err(TlsError("TLS already active".into())),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}
