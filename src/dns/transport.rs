//! One DNS exchange with one server: the query over UDP, again over TCP
//! when the answer comes back truncated (RFC 1035 §4.2, RFC 7766).
//! Everything here ends by its deadline.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType};

use super::DnsError;

/// Largest answer read over UDP: a datagram's most (no EDNS is sent, so
/// a server keeps to 512 octets, but a larger one is still read whole).
const UDP_MAX: usize = 65_535;

/// Sends `query` to `server` and returns its answer, by `deadline`.
pub(super) fn exchange(
    server: SocketAddr,
    query: &Message,
    deadline: Instant,
) -> Result<(Message, bool), DnsError> {
    let wire = query
        .to_vec()
        .map_err(|e| DnsError::Malformed(e.to_string()))?;
    let answer = udp(server, &wire, query, deadline)?;
    if !answer.metadata.truncation {
        return Ok((answer, false));
    }
    Ok((tcp(server, &wire, query, deadline)?, true))
}

fn remaining(deadline: Instant) -> Result<Duration, DnsError> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
        .ok_or(DnsError::Timeout)
}

fn io_error(server: SocketAddr, e: io::Error) -> DnsError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => DnsError::Timeout,
        _ => DnsError::Io(format!("{server}: {e}")),
    }
}

/// True if `answer` answers `query`: same ID, a response, same question.
/// Anything else (a late answer to an earlier query, a forgery) is dropped.
fn answers(answer: &Message, query: &Message) -> bool {
    answer.metadata.id == query.metadata.id
        && answer.metadata.message_type == MessageType::Response
        && answer.queries.len() == 1
        && answer.queries[0].query_type == query.queries[0].query_type
        && answer.queries[0].name.to_lowercase() == query.queries[0].name.to_lowercase()
}

fn udp(
    server: SocketAddr,
    wire: &[u8],
    query: &Message,
    deadline: Instant,
) -> Result<Message, DnsError> {
    let local: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    let socket = UdpSocket::bind(local).map_err(|e| io_error(server, e))?;
    socket.connect(server).map_err(|e| io_error(server, e))?;
    socket.send(wire).map_err(|e| io_error(server, e))?;
    let mut buf = vec![0u8; UDP_MAX];
    loop {
        socket
            .set_read_timeout(Some(remaining(deadline)?))
            .map_err(|e| io_error(server, e))?;
        let n = match socket.recv(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_error(server, e)),
        };
        if let Ok(answer) = Message::from_vec(&buf[..n])
            && answers(&answer, query)
        {
            return Ok(answer);
        }
    }
}

fn tcp(
    server: SocketAddr,
    wire: &[u8],
    query: &Message,
    deadline: Instant,
) -> Result<Message, DnsError> {
    let mut stream = TcpStream::connect_timeout(&server, remaining(deadline)?)
        .map_err(|e| io_error(server, e))?;
    let len =
        u16::try_from(wire.len()).map_err(|_| DnsError::Malformed("query too long".into()))?;
    let mut out = len.to_be_bytes().to_vec();
    out.extend_from_slice(wire);
    stream
        .set_write_timeout(Some(remaining(deadline)?))
        .map_err(|e| io_error(server, e))?;
    stream.write_all(&out).map_err(|e| io_error(server, e))?;
    let mut read = |buf: &mut [u8]| -> Result<(), DnsError> {
        let mut got = 0;
        while got < buf.len() {
            stream
                .set_read_timeout(Some(remaining(deadline)?))
                .map_err(|e| io_error(server, e))?;
            match stream.read(&mut buf[got..]) {
                Ok(0) => return Err(DnsError::Io(format!("{server}: closed over TCP"))),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_error(server, e)),
            }
        }
        Ok(())
    };
    let mut len = [0u8; 2];
    read(&mut len)?;
    let mut body = vec![0u8; usize::from(u16::from_be_bytes(len))];
    read(&mut body)?;
    let answer = Message::from_vec(&body).map_err(|e| DnsError::Malformed(e.to_string()))?;
    if !answers(&answer, query) {
        return Err(DnsError::Malformed(format!(
            "{server}: a TCP answer to another query"
        )));
    }
    Ok(answer)
}
