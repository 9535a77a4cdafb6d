//! The metrics endpoint's HTTP server: `GET /metrics` over HTTP/1.0 and
//! 1.1, one request per connection, and nothing else.
//!
//! In scope: reading one bounded request head (parsed by httparse),
//! answering 200 with the text the caller renders, 404 for other paths,
//! 405 for other methods, 400 or 431 for heads that do not parse or do not
//! fit; every answer closes the connection. Out of scope: bodies, keep-alive,
//! TLS, authentication (the endpoint belongs on loopback or behind a
//! firewall).
//!
//! Policy, so that no client can make it a lever against the relay's
//! descriptors (issue 11, item 7):
//!
//! - one accept thread hands each connection to [`WORKERS`] worker threads
//!   through a channel of [`QUEUE`]; when both are full, the connection is
//!   answered 503 at once (a short write, with a short timeout) and closed.
//!   So the server holds at most [`MAX_CONNECTIONS`] connections, however
//!   many clients connect and stay silent;
//! - the request head must arrive within the head deadline, counted from
//!   the accept (waiting in the channel counts), in at most `max_head`
//!   octets; the answer must be written within the write timeout, after
//!   which the client has [`LINGER`] to close its end;
//! - a failing accept (EMFILE, ENFILE, ...) does not end the loop: it backs
//!   off briefly and goes on, and says so at most once per
//!   [`LOG_INTERVAL`], with how many failures there were;
//! - stop wakes the accept thread by connecting to it, cuts the connections
//!   being served, and joins every thread it started.

use std::io::{self, Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use log::{debug, warn};
use parking_lot::Mutex;

use crate::sys::owned::Owned;

/// Worker threads: connections served at once.
const WORKERS: usize = 4;
/// Accepted connections waiting for a worker.
const QUEUE: usize = 4;
/// Connections held at most, served or waiting.
pub const MAX_CONNECTIONS: usize = WORKERS + QUEUE;
/// At most one warning per this long about failing accepts, and one about
/// connections refused because all workers were busy.
const LOG_INTERVAL: Duration = Duration::from_secs(10);
/// The pause after a failed accept: out of descriptors, retrying at once
/// would only spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// How long a 503 may take to write; it fits in any socket buffer.
const REFUSE_WRITE_TIMEOUT: Duration = Duration::from_millis(100);
/// How long a connection stays open after its answer, for the client to
/// close it first.
const LINGER: Duration = Duration::from_secs(1);
/// Header lines a request may have (Prometheus sends about five).
const MAX_HEADERS: usize = 32;

/// What a connection may take.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Worker threads.
    pub workers: usize,
    /// Accepted connections waiting for a worker.
    pub queue: usize,
    /// From the accept to the end of the request head.
    pub head_deadline: Duration,
    /// For writing the whole answer.
    pub write_timeout: Duration,
    /// Octets of the request head, header lines included.
    pub max_head: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            workers: WORKERS,
            queue: QUEUE,
            head_deadline: Duration::from_secs(5),
            write_timeout: Duration::from_secs(5),
            max_head: 8 * 1024,
        }
    }
}

/// The running server: its accept thread and workers.
pub struct Server {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<Owned<()>>,
    workers: Vec<Owned<()>>,
}

/// What the threads share with [`Server`].
struct Shared {
    stopping: AtomicBool,
    /// Per worker, the connection it is serving, so that stop can cut it.
    serving: Vec<Mutex<Option<Arc<TcpStream>>>>,
}

/// An accepted connection and when it was accepted.
type Job = (TcpStream, Instant);

impl Server {
    /// Listens on `addr` and answers `GET /metrics` with what `render`
    /// returns.
    pub fn start(
        addr: SocketAddr,
        limits: Limits,
        render: impl Fn() -> String + Send + Sync + 'static,
    ) -> io::Result<Server> {
        let listener = TcpListener::bind(addr)?;
        let mut server = Server {
            addr: listener.local_addr()?,
            shared: Arc::new(Shared {
                stopping: AtomicBool::new(false),
                serving: (0..limits.workers).map(|_| Mutex::new(None)).collect(),
            }),
            accept: None,
            workers: Vec::new(),
        };
        // Declared after `server`, so dropped before it on an early
        // return: the workers see the channel close and end.
        let (jobs_tx, jobs_rx) = crossbeam_channel::bounded::<Job>(limits.queue);
        let render = Arc::new(render);
        for i in 0..limits.workers {
            let (jobs, shared, render) = (jobs_rx.clone(), server.shared.clone(), render.clone());
            server
                .workers
                .push(Owned::spawn(format!("metrics-{}", i + 1), move || {
                    work(i, &jobs, &shared, &*render, &limits)
                })?);
        }
        let shared = server.shared.clone();
        server.accept = Some(Owned::spawn("metrics", move || {
            let cap = limits.workers + limits.queue;
            accept_loop(&listener, &jobs_tx, &shared, cap)
        })?);
        Ok(server)
    }

    /// Where it listens (with the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops serving and joins every thread.
    pub fn stop(mut self) {
        self.shut();
    }

    fn shut(&mut self) {
        self.shared.stopping.store(true, Ordering::Release);
        if let Some(accept) = self.accept.take() {
            // Wake the blocked accept() with a connection to ourselves.
            let target = match self.addr.ip() {
                IpAddr::V4(ip) if ip.is_unspecified() => {
                    SocketAddr::new(Ipv4Addr::LOCALHOST.into(), self.addr.port())
                }
                IpAddr::V6(ip) if ip.is_unspecified() => {
                    SocketAddr::new(Ipv6Addr::LOCALHOST.into(), self.addr.port())
                }
                _ => self.addr,
            };
            let _ = TcpStream::connect_timeout(&target, Duration::from_secs(1));
            accept.join();
        }
        // The accept thread is gone with its sender: workers end once they
        // are done with what they hold, which is cut here.
        for slot in &self.shared.serving {
            if let Some(stream) = &*slot.lock() {
                let _ = stream.shutdown(Shutdown::Both);
            }
        }
        for worker in self.workers.drain(..) {
            worker.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shut();
    }
}

/// Counts events and says when to log them: the first at once, then at
/// most one line per [`LOG_INTERVAL`], with the count since the last line.
#[derive(Default)]
struct Throttle {
    last: Option<Instant>,
    count: u64,
}

impl Throttle {
    /// Notes one event at `now`; `Some(n)` when a line is due, `n` events
    /// since the last one.
    fn note(&mut self, now: Instant) -> Option<u64> {
        self.count += 1;
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < LOG_INTERVAL)
        {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.count))
    }
}

/// Accepts until stop; `cap`: the connections workers and channel hold.
fn accept_loop(listener: &TcpListener, jobs: &Sender<Job>, shared: &Shared, cap: usize) {
    let mut failures = Throttle::default();
    let mut refusals = Throttle::default();
    loop {
        let accepted = listener.accept();
        if shared.stopping.load(Ordering::Acquire) {
            return;
        }
        match accepted {
            Ok((stream, _)) => match jobs.try_send((stream, Instant::now())) {
                Ok(()) => {}
                Err(TrySendError::Full((stream, _)) | TrySendError::Disconnected((stream, _))) => {
                    if let Some(n) = refusals.note(Instant::now()) {
                        warn!(
                            "metrics: no room for more than {cap} connections, answering 503 \
                             (refused since the last warning: {n})"
                        );
                    }
                    refuse(&stream);
                }
            },
            Err(e) => {
                if let Some(n) = failures.note(Instant::now()) {
                    warn!(
                        "metrics: accept failed: {e} (failures since the last warning: {n}); \
                         going on"
                    );
                }
                thread::sleep(ACCEPT_BACKOFF);
            }
        }
    }
}

/// Answers 503 without reading anything, then closes.
fn refuse(stream: &TcpStream) {
    let _ = write_within(
        stream,
        &response(503, ""),
        Instant::now() + REFUSE_WRITE_TIMEOUT,
    );
}

fn work(
    id: usize,
    jobs: &Receiver<Job>,
    shared: &Shared,
    render: &dyn Fn() -> String,
    limits: &Limits,
) {
    for (stream, accepted) in jobs {
        let stream = Arc::new(stream);
        *shared.serving[id].lock() = Some(stream.clone());
        // Checked after taking the slot: a stop that looked at the slot
        // before has set the flag already.
        if !shared.stopping.load(Ordering::Acquire) {
            if let Err(e) = serve(&stream, accepted, render, limits) {
                debug!("metrics: connection ended: {e}");
            }
        }
        *shared.serving[id].lock() = None;
    }
}

/// Reads one request head and answers it.
fn serve(
    stream: &TcpStream,
    accepted: Instant,
    render: &dyn Fn() -> String,
    limits: &Limits,
) -> io::Result<()> {
    let deadline = accepted + limits.head_deadline;
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let answer = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no complete request head in time",
            ));
        }
        stream.set_read_timeout(Some(left))?;
        let room = (limits.max_head - head.len()).min(chunk.len());
        match (&*stream).read(&mut chunk[..room]) {
            Ok(0) => return Ok(()),
            Ok(n) => head.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        if let Some(answer) = answer(&head, limits.max_head) {
            break answer;
        }
    };
    let bytes = match answer {
        Answer::Metrics => response(200, &render()),
        Answer::Status(status) => response(status, ""),
    };
    write_within(stream, &bytes, Instant::now() + limits.write_timeout)?;
    linger(stream);
    Ok(())
}

/// After the answer, reads what the client still sends (the rest of an
/// oversized head, say) until it closes, for [`LINGER`] at most: closing
/// with unread input would reset the connection, and the client might
/// lose the answer.
fn linger(stream: &TcpStream) {
    let end = Instant::now() + LINGER;
    let mut sink = [0u8; 1024];
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match (&*stream).read(&mut sink) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// What to answer to a complete (or too large) request head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    /// 200 with the metrics.
    Metrics,
    /// Any other status, without a body of note.
    Status(u16),
}

/// The answer to `head`, the octets received so far (at most `max_head`),
/// or `None` while it is incomplete and may still grow.
fn answer(head: &[u8], max_head: usize) -> Option<Answer> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let answer = match request.parse(head) {
        Ok(httparse::Status::Partial) if head.len() >= max_head => Answer::Status(431),
        Ok(httparse::Status::Partial) => return None,
        Ok(httparse::Status::Complete(_)) => match (request.method, request.path) {
            (Some("GET"), Some(path)) if path.split('?').next() == Some("/metrics") => {
                Answer::Metrics
            }
            (Some("GET"), _) => Answer::Status(404),
            _ => Answer::Status(405),
        },
        Err(httparse::Error::TooManyHeaders) => Answer::Status(431),
        Err(_) => Answer::Status(400),
    };
    Some(answer)
}

/// The whole response: status line, headers and body, which is `metrics`
/// for a 200 and a line naming the status otherwise.
fn response(status: u16, metrics: &str) -> Vec<u8> {
    let (reason, extra) = match status {
        200 => ("OK", ""),
        400 => ("Bad Request", ""),
        404 => ("Not Found", ""),
        405 => ("Method Not Allowed", "Allow: GET\r\n"),
        431 => ("Request Header Fields Too Large", ""),
        _ => ("Service Unavailable", "Retry-After: 1\r\n"),
    };
    let error_line;
    let (content_type, body) = if status == 200 {
        ("text/plain; version=0.0.4", metrics)
    } else {
        error_line = format!("{status} {reason}\n");
        ("text/plain", error_line.as_str())
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n\
         Content-Length: {}\r\nConnection: close\r\n{extra}\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

/// Writes `bytes`, all of them before `deadline`, then ends the
/// connection.
fn write_within(stream: &TcpStream, bytes: &[u8], deadline: Instant) -> io::Result<()> {
    let mut rest = bytes;
    while !rest.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "answer not taken in time",
            ));
        }
        stream.set_write_timeout(Some(left))?;
        match (&*stream).write(rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => rest = &rest[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    stream.shutdown(Shutdown::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GET: &[u8] = b"GET /metrics HTTP/1.1\r\nHost: relay\r\nAccept: text/plain\r\n\r\n";

    #[test]
    fn a_request_head_needs_more_at_every_cut_then_gets_its_answer() {
        for cut in 0..GET.len() {
            assert_eq!(answer(&GET[..cut], 8192), None, "cut at {cut}");
        }
        assert_eq!(answer(GET, 8192), Some(Answer::Metrics));
        let cases: [(&[u8], Answer); 7] = [
            (b"GET /metrics HTTP/1.0\r\n\r\n", Answer::Metrics),
            (b"GET /metrics?x=1 HTTP/1.1\r\n\r\n", Answer::Metrics),
            (b"GET / HTTP/1.1\r\n\r\n", Answer::Status(404)),
            (b"GET /metricsx HTTP/1.1\r\n\r\n", Answer::Status(404)),
            (b"POST /metrics HTTP/1.1\r\n\r\n", Answer::Status(405)),
            (b"HEAD /metrics HTTP/1.1\r\n\r\n", Answer::Status(405)),
            (b"GET /metrics SMTP/1.1\r\n\r\n", Answer::Status(400)),
        ];
        for (head, expected) in cases {
            assert_eq!(
                answer(head, 8192),
                Some(expected),
                "{}",
                String::from_utf8_lossy(head)
            );
        }
    }

    #[test]
    fn a_head_too_large_or_with_too_many_lines_gets_431() {
        let mut long = b"GET /metrics HTTP/1.1\r\nX-Pad: ".to_vec();
        long.resize(100, b'a');
        assert_eq!(answer(&long[..99], 100), None);
        assert_eq!(answer(&long, 100), Some(Answer::Status(431)));
        let mut many = b"GET /metrics HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(answer(&many, 8192), Some(Answer::Status(431)));
    }

    #[test]
    fn responses_say_their_length_and_close() {
        let ok = String::from_utf8(response(200, "a 1\n")).unwrap();
        assert_eq!(
            ok,
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n\
             Content-Length: 4\r\nConnection: close\r\n\r\na 1\n"
        );
        let not_allowed = String::from_utf8(response(405, "")).unwrap();
        assert!(
            not_allowed.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{not_allowed}"
        );
        assert!(not_allowed.contains("\r\nAllow: GET\r\n"), "{not_allowed}");
        assert!(not_allowed.ends_with("\r\n\r\n405 Method Not Allowed\n"));
    }

    #[test]
    fn failures_are_logged_once_per_interval_with_their_count() {
        let t0 = Instant::now();
        let mut t = Throttle::default();
        assert_eq!(t.note(t0), Some(1));
        assert_eq!(t.note(t0 + Duration::from_secs(1)), None);
        assert_eq!(t.note(t0 + Duration::from_secs(9)), None);
        assert_eq!(t.note(t0 + LOG_INTERVAL), Some(3));
        assert_eq!(t.note(t0 + LOG_INTERVAL + Duration::from_secs(1)), None);
    }

    /// A server on a free loopback port answering `x 1`.
    fn server(limits: Limits) -> Server {
        Server::start("127.0.0.1:0".parse().unwrap(), limits, || "x 1\n".into()).unwrap()
    }

    /// What the server sends for `request`, until it closes.
    fn exchange(addr: SocketAddr, request: &[u8]) -> String {
        let mut c = TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(request).unwrap();
        let mut text = String::new();
        c.read_to_string(&mut text).unwrap();
        text
    }

    /// Reads until the server closes `c`; false if it did not before its
    /// read timeout.
    fn closed(c: &mut TcpStream) -> bool {
        let mut buf = [0u8; 256];
        loop {
            match c.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return false;
                }
                Err(_) => return true,
            }
        }
    }

    #[test]
    fn serves_metrics_over_http_1_0_and_1_1_and_closes() {
        let s = server(Limits::default());
        let ok = exchange(s.local_addr(), GET);
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.ends_with("\r\n\r\nx 1\n"), "{ok}");
        let old = exchange(s.local_addr(), b"GET /metrics HTTP/1.0\r\n\r\n");
        assert!(old.starts_with("HTTP/1.1 200 OK\r\n"), "{old}");
        let other = exchange(s.local_addr(), b"GET /other HTTP/1.1\r\n\r\n");
        assert!(other.starts_with("HTTP/1.1 404 "), "{other}");
        let post = exchange(s.local_addr(), b"POST /metrics HTTP/1.1\r\n\r\n");
        assert!(post.starts_with("HTTP/1.1 405 "), "{post}");
        s.stop();
    }

    #[test]
    fn an_oversized_head_is_answered_431_in_full() {
        let s = server(Limits::default());
        let mut big = b"GET /metrics HTTP/1.1\r\nX-Pad: ".to_vec();
        big.resize(20 * 1024, b'a');
        let text = exchange(s.local_addr(), &big);
        assert!(
            text.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
            "{text}"
        );
        s.stop();
    }

    #[test]
    fn a_slow_or_silent_client_is_cut_at_the_head_deadline() {
        let deadline = Duration::from_millis(300);
        let s = server(Limits {
            head_deadline: deadline,
            ..Limits::default()
        });
        let start = Instant::now();
        let mut slow = TcpStream::connect(s.local_addr()).unwrap();
        let mut silent = TcpStream::connect(s.local_addr()).unwrap();
        slow.write_all(b"G").unwrap();
        for c in [&mut slow, &mut silent] {
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            assert!(closed(c), "not cut");
        }
        let took = start.elapsed();
        assert!(took >= deadline, "cut after {took:?}, before the deadline");
        assert!(took < Duration::from_secs(3), "cut only after {took:?}");
        s.stop();
    }

    #[test]
    fn over_the_cap_connections_get_503_and_stop_cuts_the_rest() {
        let s = server(Limits {
            workers: 1,
            queue: 1,
            head_deadline: Duration::from_secs(30),
            ..Limits::default()
        });
        // One served, one waiting; the head deadline frees neither within
        // the test, so the others are refused.
        let mut idle: Vec<TcpStream> = (0..6)
            .map(|_| TcpStream::connect(s.local_addr()).unwrap())
            .collect();
        let mut answered = vec![String::new(); idle.len()];
        let end = Instant::now() + Duration::from_secs(10);
        while answered.iter().filter(|a| a.contains("\r\n\r\n")).count() < 4 {
            assert!(Instant::now() < end, "no 503s: {answered:?}");
            for (c, text) in idle.iter_mut().zip(&mut answered) {
                c.set_read_timeout(Some(Duration::from_millis(10))).unwrap();
                let mut buf = [0u8; 512];
                if let Ok(n) = c.read(&mut buf) {
                    text.push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            }
        }
        for text in answered.iter().filter(|a| !a.is_empty()) {
            assert!(
                text.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
                "{text}"
            );
        }
        let held: Vec<usize> = (0..idle.len())
            .filter(|&i| answered[i].is_empty())
            .collect();
        // Two at most; one when the worker took its first only after the
        // queue had turned the second away.
        assert!((1..=2).contains(&held.len()), "{answered:?}");
        let start = Instant::now();
        s.stop();
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "stop waited for the deadline"
        );
        for i in held {
            idle[i]
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            assert!(closed(&mut idle[i]), "a held connection outlived the stop");
        }
    }
}
