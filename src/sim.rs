//! Simulated partner MMSCs and an MM4 load generator, on loopback. The demo,
//! the integration tests and the benches use them.
//!
//! A [`SimPeer`] is an SMTP sink (it reuses our server state machine) with
//! the faults of Postfix's `smtp-sink`: 4xx or 5xx at the end of DATA, drop
//! the connection after DATA, 421 at the greeting, a delay before the final
//! reply, or no greeting at all.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::peer::{Connection, Delivery, Outbound, Security, Timeouts};
use crate::smtp::Reply;
use crate::smtp::command::BodyType;
use crate::smtp::session::{Envelope, Handler, Session, SessionConfig};
use crate::tls::{Acceptor, Stream};

/// How a simulated peer misbehaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Accepts everything.
    None,
    /// 451 at the end of DATA.
    TempFail,
    /// 554 at the end of DATA.
    PermFail,
    /// Closes the connection after the final dot, without a reply.
    DropAfterData,
    /// 421 instead of the greeting.
    Busy,
    /// Waits this long before answering the final dot.
    Delay(Duration),
    /// Accepts the connection and never says anything.
    NoGreeting,
}

/// One message as a simulated peer received it.
#[derive(Clone, Debug)]
pub struct Received {
    /// Envelope sender.
    pub from: String,
    /// Envelope recipients.
    pub rcpts: Vec<String>,
    /// The data, unstuffed.
    pub data: Vec<u8>,
    /// True if MAIL FROM said BODY=8BITMIME.
    pub eight_bit: bool,
    /// When it was accepted.
    pub at: Instant,
    /// True if it came over TLS.
    pub tls: bool,
    /// The user the sender authenticated as, if it did.
    pub user: Option<String>,
}

/// What a simulated peer offers beyond plain SMTP.
#[derive(Clone, Default)]
pub struct SimSecurity {
    /// Offer STARTTLS with this server side.
    pub tls: Option<Acceptor>,
    /// Offer AUTH (over TLS only) with this user and password.
    pub auth: Option<(String, String)>,
}

#[derive(Default)]
struct Counters {
    messages: AtomicU64,
    recipients: AtomicU64,
    connections: AtomicU64,
    open: AtomicUsize,
    max_open: AtomicUsize,
}

struct Shared {
    fault: Mutex<Fault>,
    keep: bool,
    received: Mutex<Vec<Received>>,
    arrived: Condvar,
    counters: Counters,
    stopping: AtomicBool,
    conns: Mutex<Vec<(TcpStream, JoinHandle<()>)>>,
    group: Option<Arc<Gauge>>,
    security: SimSecurity,
}

/// A simulated destination MMSC listening on loopback.
pub struct SimPeer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl SimPeer {
    /// Starts a sink on `127.0.0.1` at a free port. With `keep`, every
    /// message is kept for inspection; without, only counted.
    pub fn start(keep: bool) -> io::Result<SimPeer> {
        SimPeer::start_in(keep, None)
    }

    /// Starts a sink whose open connections also count in `group`.
    pub fn start_in(keep: bool, group: Option<Arc<Gauge>>) -> io::Result<SimPeer> {
        SimPeer::start_with(keep, group, SimSecurity::default())
    }

    /// Starts a sink that also offers STARTTLS and AUTH as `security` says.
    pub fn start_with(
        keep: bool,
        group: Option<Arc<Gauge>>,
        security: SimSecurity,
    ) -> io::Result<SimPeer> {
        let addr: SocketAddr = "127.0.0.1:0".parse().expect("literal address");
        SimPeer::start_at(addr, keep, group, security)
    }

    /// As [`SimPeer::start_with`], listening on `addr` (hosts found
    /// through DNS share one port on several loopback addresses).
    pub fn start_at(
        addr: SocketAddr,
        keep: bool,
        group: Option<Arc<Gauge>>,
        security: SimSecurity,
    ) -> io::Result<SimPeer> {
        let l = TcpListener::bind(addr)?;
        let addr = l.local_addr()?;
        let shared = Arc::new(Shared {
            fault: Mutex::new(Fault::None),
            keep,
            received: Mutex::new(Vec::new()),
            arrived: Condvar::new(),
            counters: Counters::default(),
            stopping: AtomicBool::new(false),
            conns: Mutex::new(Vec::new()),
            group,
            security,
        });
        let s = shared.clone();
        let accept = thread::Builder::new()
            .name(format!("sim-{}", addr.port()))
            .spawn(move || sim_accept(&l, &s))?;
        Ok(SimPeer {
            addr,
            shared,
            accept: Some(accept),
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Changes the behaviour for what comes next.
    pub fn set_fault(&self, fault: Fault) {
        *self.shared.fault.lock() = fault;
    }

    /// Messages accepted (250 at the end of DATA).
    pub fn messages(&self) -> u64 {
        self.shared.counters.messages.load(Ordering::Acquire)
    }

    /// Recipients of accepted messages.
    pub fn recipients(&self) -> u64 {
        self.shared.counters.recipients.load(Ordering::Acquire)
    }

    /// TCP connections accepted since start.
    pub fn connections(&self) -> u64 {
        self.shared.counters.connections.load(Ordering::Acquire)
    }

    /// Most connections open at the same time.
    pub fn max_open(&self) -> usize {
        self.shared.counters.max_open.load(Ordering::Acquire)
    }

    /// Copies of the kept messages.
    pub fn received(&self) -> Vec<Received> {
        self.shared.received.lock().clone()
    }

    /// Waits until at least `n` recipients were accepted, or `timeout`
    /// passes; returns whether they were.
    pub fn wait_for_recipients(&self, n: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut guard = self.shared.received.lock();
        while self.recipients() < n {
            if self
                .shared
                .arrived
                .wait_until(&mut guard, deadline)
                .timed_out()
            {
                return self.recipients() >= n;
            }
        }
        true
    }

    /// Stops accepting, closes every connection and joins every thread.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        let Some(accept) = self.accept.take() else {
            return;
        };
        self.shared.stopping.store(true, Ordering::Release);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        let _ = accept.join();
        let conns = std::mem::take(&mut *self.shared.conns.lock());
        for (stream, _) in &conns {
            let _ = stream.shutdown(Shutdown::Both);
        }
        for (_, handle) in conns {
            let _ = handle.join();
        }
    }
}

impl Drop for SimPeer {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

fn sim_accept(l: &TcpListener, shared: &Arc<Shared>) {
    for conn in l.incoming() {
        if shared.stopping.load(Ordering::Acquire) {
            return;
        }
        let Ok(stream) = conn else { continue };
        let Ok(clone) = stream.try_clone() else {
            continue;
        };
        shared.counters.connections.fetch_add(1, Ordering::AcqRel);
        let open = Open::new(shared);
        let s = shared.clone();
        let handle = thread::spawn(move || {
            let _ = sim_serve(stream, &s, open);
        });
        let mut conns = shared.conns.lock();
        conns.retain(|(_, h)| !h.is_finished());
        conns.push((clone, handle));
    }
}

struct SimHandler<'a> {
    shared: &'a Shared,
    drop_now: bool,
    tls: bool,
    user: Option<String>,
}

impl Handler for SimHandler<'_> {
    type Route = ();

    fn rcpt(&mut self, _from: &str, _rcpt: &str) -> Result<(), Reply> {
        Ok(())
    }

    fn auth(&mut self, user: &str, password: &str) -> bool {
        let ok = self
            .shared
            .security
            .auth
            .as_ref()
            .is_some_and(|(u, p)| u == user && p == password);
        if ok {
            self.user = Some(user.to_string());
        }
        ok
    }

    fn message(&mut self, env: Envelope<()>, data: &mut Vec<u8>) -> Reply {
        let fault = *self.shared.fault.lock();
        match fault {
            Fault::TempFail => return Reply::new(451, "4.3.0 simulated temporary failure"),
            Fault::PermFail => return Reply::new(554, "5.0.0 simulated permanent failure"),
            Fault::DropAfterData => {
                self.drop_now = true;
                return Reply::new(451, "4.3.0 (never sent)");
            }
            Fault::Delay(d) => thread::sleep(d),
            Fault::None | Fault::Busy | Fault::NoGreeting => {}
        }
        let c = &self.shared.counters;
        let mut received = self.shared.received.lock();
        if self.shared.keep {
            received.push(Received {
                from: env.from,
                rcpts: env.rcpts.iter().map(|(r, _)| r.clone()).collect(),
                data: std::mem::take(data),
                eight_bit: env.params.body == BodyType::EightBitMime,
                at: Instant::now(),
                tls: self.tls,
                user: self.user.clone(),
            });
        }
        c.messages.fetch_add(1, Ordering::AcqRel);
        c.recipients
            .fetch_add(env.rcpts.len() as u64, Ordering::AcqRel);
        drop(received);
        self.shared.arrived.notify_all();
        Reply::new(250, "2.0.0 ok")
    }
}

/// One open connection, counted at the peer and in its group until it
/// closes; QUIT uncounts it before the 221 goes out, so a client that
/// reopens right after never sees two.
struct Open(Option<Arc<Shared>>);

impl Open {
    fn new(shared: &Arc<Shared>) -> Open {
        let c = &shared.counters;
        let open = c.open.fetch_add(1, Ordering::AcqRel) + 1;
        c.max_open.fetch_max(open, Ordering::AcqRel);
        if let Some(g) = &shared.group {
            let open = g.open.fetch_add(1, Ordering::AcqRel) + 1;
            g.max.fetch_max(open, Ordering::AcqRel);
        }
        Open(Some(shared.clone()))
    }

    fn close(&mut self) {
        if let Some(shared) = self.0.take() {
            shared.counters.open.fetch_sub(1, Ordering::AcqRel);
            if let Some(g) = &shared.group {
                g.open.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.close();
    }
}

/// Open connections counted across several simulated peers.
#[derive(Debug, Default)]
pub struct Gauge {
    open: AtomicUsize,
    max: AtomicUsize,
}

impl Gauge {
    /// The most connections that were open at once across the group.
    pub fn max(&self) -> usize {
        self.max.load(Ordering::Acquire)
    }
}

fn sim_serve(tcp: TcpStream, shared: &Shared, open: Open) -> io::Result<()> {
    let mut open = open;
    tcp.set_nodelay(true)?;
    let mut stream = Stream::from(tcp);
    match *shared.fault.lock() {
        Fault::Busy => {
            stream.write_all(b"421 4.3.2 simulated busy\r\n")?;
            return Ok(());
        }
        Fault::NoGreeting => {
            // Hold the connection silently until the peer or the stop ends it.
            let mut sink = [0u8; 256];
            while stream.read(&mut sink)? > 0 {}
            return Ok(());
        }
        _ => {}
    }
    let mut session: Session<()> = Session::new(SessionConfig {
        hostname: "sim.mmsc.test".into(),
        max_message_size: 64 << 20,
        max_recipients: 1000,
        starttls: shared.security.tls.is_some(),
        auth: shared.security.auth.is_some(),
        auth_plaintext: false,
        max_bad_commands: 0,
        max_refused_recipients: 0,
    });
    let mut handler = SimHandler {
        shared,
        drop_now: false,
        tls: false,
        user: None,
    };
    let mut out = Vec::new();
    session.greeting().write_to(&mut out);
    stream.write_all(&out)?;
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = match stream.read(&mut chunk) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        buf.extend_from_slice(&chunk[..n]);
        out.clear();
        let p = session.feed(&buf, &mut handler, &mut out);
        buf.drain(..p.consumed);
        if handler.drop_now {
            return stream.tcp().shutdown(Shutdown::Both);
        }
        if p.close {
            open.close();
        }
        stream.write_all(&out)?;
        if p.close {
            return Ok(());
        }
        if p.starttls {
            buf.clear();
            let acceptor = shared.security.tls.as_ref().expect("STARTTLS offered");
            let deadline = Instant::now() + Duration::from_secs(10);
            stream = stream
                .accept_by(acceptor, deadline)
                .map_err(io::Error::other)?;
            session.tls_started();
            handler.tls = true;
        }
    }
}

/// An MM4_forward.REQ of about `size` octets from a local subscriber to `rcpt`.
pub fn forward_req(seq: usize, rcpt: &str, size: usize) -> Vec<u8> {
    let mut m = format!(
        "X-Mms-3GPP-MMS-Version: 6.8.0\r\n\
         X-Mms-Message-Type: MM4_forward.REQ\r\n\
         X-Mms-Transaction-ID: T{seq:08}\r\n\
         X-Mms-Message-ID: M{seq:08}@mms.mnc010.mcc001.gprs\r\n\
         From: +447700900001/TYPE=PLMN@mms.mnc010.mcc001.gprs\r\n\
         To: {rcpt}\r\n\
         Date: Tue, 18 Mar 2025 09:00:00 +0000\r\n\
         Sender: +447700900001/TYPE=PLMN@mms.mnc010.mcc001.gprs\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=us-ascii\r\n\
         \r\n"
    );
    let line = "The quick brown fox jumps over the lazy dog, message body filler text.\r\n";
    while m.len() + line.len() <= size {
        m.push_str(line);
    }
    m.push_str(".leading dot line\r\n");
    m.into_bytes()
}

/// One message for the load generator.
#[derive(Clone, Debug)]
pub struct Outgoing {
    /// Envelope sender.
    pub from: String,
    /// Envelope recipients.
    pub rcpts: Vec<String>,
    /// Message data.
    pub data: Vec<u8>,
}

impl Outbound for &Outgoing {
    fn from(&self) -> &str {
        &self.from
    }
    fn rcpts(&self) -> &[String] {
        &self.rcpts
    }
    fn data(&self) -> &[u8] {
        &self.data
    }
    fn body_type(&self) -> BodyType {
        BodyType::SevenBit
    }
}

/// What a load run achieved.
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    /// Messages answered 250 at the end of DATA.
    pub accepted: usize,
    /// Messages refused or lost to connection errors.
    pub refused: usize,
    /// Wall time from the first connect to the last reply.
    pub elapsed: Duration,
    /// Client-side latency from the end of DATA to its reply, per message.
    pub latencies: Vec<Duration>,
}

/// Sends `messages` to `target` over `sessions` parallel SMTP sessions
/// (message `i` goes on session `i % sessions`), each one persistent.
pub fn send_load(target: SocketAddr, sessions: usize, messages: Arc<Vec<Outgoing>>) -> LoadReport {
    send_load_at(target, sessions, messages, None)
}

/// As [`send_load`], at most `rate` messages per second in all when given:
/// each session starts its messages on a fixed schedule (open loop, so a
/// slow reply does not slow the offered load), as an MMSC under a steady
/// load would.
pub fn send_load_at(
    target: SocketAddr,
    sessions: usize,
    messages: Arc<Vec<Outgoing>>,
    rate: Option<f64>,
) -> LoadReport {
    let gap = rate
        .filter(|r| *r > 0.0)
        .map(|r| Duration::from_secs_f64(sessions as f64 / r));
    let timeouts = Timeouts {
        connect: Duration::from_secs(10),
        helo: Duration::from_secs(30),
        mail: Duration::from_secs(30),
        rcpt: Duration::from_secs(30),
        data: Duration::from_secs(30),
        data_done: Duration::from_secs(120),
    };
    let start = Instant::now();
    let handles: Vec<_> = (0..sessions)
        .map(|s| {
            let (messages, timeouts) = (messages.clone(), timeouts.clone());
            thread::spawn(move || {
                let mut report = LoadReport::default();
                let mut conn = None;
                // Sessions start spread over one gap, not all at once.
                let first =
                    start + gap.map_or(Duration::ZERO, |g| g.mul_f64(s as f64 / sessions as f64));
                for (k, m) in messages.iter().skip(s).step_by(sessions).enumerate() {
                    if let Some(g) = gap {
                        let due = first + g * k as u32;
                        thread::sleep(due.saturating_duration_since(Instant::now()));
                    }
                    if conn.is_none() {
                        conn = Connection::open(
                            &target.to_string(),
                            "loadgen.test",
                            &timeouts,
                            &Security::plain(),
                        )
                        .ok();
                        // The load is what an MMSC sends: one message at a
                        // time, with DATA, whatever the target offers.
                        if let Some(c) = conn.as_mut() {
                            c.set_chunking(false);
                        }
                    }
                    let Some(c) = conn.as_mut() else {
                        report.refused += 1;
                        continue;
                    };
                    let t = Instant::now();
                    match c.deliver(m) {
                        Ok(Delivery::Replies(r)) if r.iter().all(Reply::is_positive) => {
                            report.accepted += 1;
                            report.latencies.push(t.elapsed());
                        }
                        Ok(_) => report.refused += 1,
                        Err(_) => {
                            report.refused += 1;
                            conn = None;
                        }
                    }
                }
                if let Some(c) = conn {
                    c.quit();
                }
                report
            })
        })
        .collect();
    let mut total = LoadReport::default();
    for h in handles {
        let r = h.join().unwrap_or_default();
        total.accepted += r.accepted;
        total.refused += r.refused;
        total.latencies.extend(r.latencies);
    }
    total.elapsed = start.elapsed();
    total
}
