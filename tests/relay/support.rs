//! Test support: the corpus profile relay with three simulated peers, a
//! scripted SMTP client that can connect from any 127.0.0.x address, the
//! one helper that finds the shared MM4 corpus, and polling with deadlines.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use mm4relay::config::Config;
use mm4relay::peer::PeerSnapshot;
use mm4relay::relay::{Relay, StopReport};
use mm4relay::sys::clock::SharedClock;
use std::sync::Arc;

use mm4relay::sim::{Gauge, Outgoing, SimPeer, SimSecurity, forward_req};
use mm4relay::smtp::Reply;
use mm4relay::smtp::codec::dot_stuff;
use mm4relay::tls::Stream;

/// How long any wait in a test may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// Client addresses of the corpus profile.
pub const LOCAL: &str = "127.0.0.1";
pub const PARTNER_B: &str = "127.0.0.2";
pub const PARTNER_C: &str = "127.0.0.3";
pub const UNKNOWN: &str = "127.0.0.9";

/// A subscriber of the local MMSC (peer A), the usual sender.
pub const FROM: &str = "+447700900001/TYPE=PLMN@mms.mnc010.mcc001.gprs";
/// Recipients routed to A (local), B and C by the corpus profile.
pub const TO_A: &str = "+447700900123/TYPE=PLMN@mms.mnc010.mcc001.gprs";
pub const TO_B: &str = "+12025550142/TYPE=PLMN@mms.mnc020.mcc001.gprs";
pub const TO_C: &str = "+61491570156/TYPE=PLMN@mms.mnc456.mcc999.gprs";

/// The shared corpus (`../shared/mm4-corpus` or `$MM4_CORPUS`), if present.
pub fn corpus_dir() -> Option<PathBuf> {
    let dir = match std::env::var_os("MM4_CORPUS") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/mm4-corpus"),
    };
    dir.join("README.md").is_file().then_some(dir)
}

/// Our own fixtures under `tests/data`.
pub fn fixture(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Polls `cond` until it holds or [`DEADLINE`] passes.
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + DEADLINE;
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(5));
    }
}

/// The routing profile of the corpus README, with tunable peer settings.
pub struct Profile {
    /// `[relay] max_connections`, the global budget.
    pub budget: usize,
    /// `[relay] retry_min` (and four times it for retry_max).
    pub retry_min_ms: u64,
    pub max_connections: [usize; 3],
    pub min_connections: [usize; 3],
    pub extra_relay: String,
    pub extra_listener: String,
    /// More lines for the sections of A, B and C.
    pub extra_peer: [&'static str; 3],
    /// Put the spool on a tmpfs of this many KiB (needs root).
    pub spool_tmpfs_kib: Option<u64>,
    /// What the simulated A, B and C offer: STARTTLS, AUTH.
    pub sim_security: [SimSecurity; 3],
    /// Where A, B or C is instead of its simulated MMSC (which still runs).
    pub peer_addr: [Option<SocketAddr>; 3],
    /// Whole sections appended (`[cdr]` ...); `{spool}` becomes the spool
    /// directory.
    pub extra_sections: String,
}

impl Default for Profile {
    fn default() -> Self {
        Profile {
            budget: 32,
            retry_min_ms: 100,
            max_connections: [4, 4, 4],
            min_connections: [1, 1, 1],
            extra_relay: String::new(),
            extra_listener: String::new(),
            extra_peer: [""; 3],
            spool_tmpfs_kib: None,
            sim_security: Default::default(),
            peer_addr: [None; 3],
            extra_sections: String::new(),
        }
    }
}

impl Profile {
    /// The INI text for peers at `addrs` (A, B, C), spooling in `spool`.
    pub fn ini(&self, addrs: [SocketAddr; 3], spool: &Path) -> String {
        use std::fmt::Write as _;

        let Profile {
            budget,
            retry_min_ms,
            extra_relay,
            extra_listener,
            ..
        } = self;
        let retry_max_ms = retry_min_ms * 4;
        let spool = spool.display();
        let [addr_a, addr_b, addr_c] = addrs;
        let [min_a, min_b, min_c] = self.min_connections;
        let [max_a, max_b, max_c] = self.max_connections;
        let [extra_a, extra_b, extra_c] = self.extra_peer;
        let mut ini = String::new();

        writeln!(
            ini,
            "[relay]\n\
             hostname = relay.test\n\
             max_connections = {budget}\n\
             retry_min = {retry_min_ms}ms\n\
             retry_max = {retry_max_ms}ms\n\
             shutdown_timeout = 5s\n\
             balance_interval = 50ms\n\
             spool_dir = {spool}\n\
             control_socket = {spool}/control.sock\n\
             {extra_relay}"
        )
        .unwrap();

        writeln!(
            ini,
            "[listener]\n\
             listen = 127.0.0.1:0\n\
             relay_from = {LOCAL}/32\n\
             max_message_size = 2097152\n\
             max_recipients = 100\n\
             mm4_check = strict\n\
             {extra_listener}"
        )
        .unwrap();

        // A: the local MMSC.
        writeln!(
            ini,
            "[peer.A]\n\
             hosts = {addr_a}\n\
             domains = mms.mnc010.mcc001.gprs\n\
             prefixes = +447700900\n\
             local = yes\n\
             min_connections = {min_a}\n\
             max_connections = {max_a}\n\
             keepalive = 5s\n\
             probe_min = 100ms\n\
             probe_max = 400ms\n\
             {extra_a}\n"
        )
        .unwrap();

        // B and C: partners, each sending from its own address.
        let partners = [
            (
                "B",
                addr_b,
                "mms.mnc020.mcc001.gprs",
                "+1202555",
                PARTNER_B,
                min_b,
                max_b,
                "2s",
                extra_b,
            ),
            (
                "C",
                addr_c,
                "mms.mnc456.mcc999.gprs",
                "+61491570",
                PARTNER_C,
                min_c,
                max_c,
                "1s",
                extra_c,
            ),
        ];
        for (name, addr, domain, prefix, from, min, max, helo, extra) in partners {
            writeln!(
                ini,
                "[peer.{name}]\n\
                 hosts = {addr}\n\
                 domains = {domain}\n\
                 prefixes = {prefix}\n\
                 accept_from = {from}\n\
                 min_connections = {min}\n\
                 max_connections = {max}\n\
                 connect_timeout = 2s\n\
                 helo_timeout = {helo}\n\
                 probe_min = 100ms\n\
                 probe_max = 400ms\n\
                 {extra}\n"
            )
            .unwrap();
        }

        // A number of B's that was ported to C.
        ini.push_str("[ported]\n+12025550177 = C\n");
        ini.push_str(&self.extra_sections.replace("{spool}", &spool.to_string()));
        ini
    }
}

/// A relay with peers A (local), B and C as simulated MMSCs.
pub struct Harness {
    pub relay: Option<Relay>,
    pub sims: [SimPeer; 3],
    pub addr: SocketAddr,
    /// A tmpfs mounted on the spool directory, unmounted before it goes.
    _mount: Option<Tmpfs>,
    /// The spool directory, kept for restarts and removed at the end.
    pub spool: tempfile::TempDir,
    /// Connections open at once across the three peers.
    pub gauge: Arc<Gauge>,
    config: Config,
    clock: SharedClock,
}

impl Harness {
    pub fn start() -> Harness {
        Harness::with(Profile::default())
    }

    /// The default profile with `lines` added to `[listener]`.
    pub fn with_listener(lines: impl Into<String>) -> Harness {
        Harness::with(Profile {
            extra_listener: lines.into(),
            ..Profile::default()
        })
    }

    pub fn with(profile: Profile) -> Harness {
        Harness::with_clock(profile, mm4relay::sys::clock::system())
    }

    /// A harness whose relay reads `clock` for acceptance, retry and
    /// expiry times.
    pub fn with_clock(profile: Profile, clock: SharedClock) -> Harness {
        let gauge = Arc::new(Gauge::default());
        let sims = profile
            .sim_security
            .clone()
            .map(|sec| SimPeer::start_with(true, Some(gauge.clone()), sec).unwrap());
        let spool = tempfile::tempdir().unwrap();
        let mount = profile
            .spool_tmpfs_kib
            .map(|kib| Tmpfs::mount(spool.path(), kib).expect("mount a tmpfs"));
        let addrs = std::array::from_fn(|i| profile.peer_addr[i].unwrap_or(sims[i].addr()));
        let ini = profile.ini(addrs, spool.path());
        std::fs::write(spool.path().join("test.ini"), &ini).unwrap();
        let config = Config::parse(&ini, Path::new("test.ini")).unwrap();
        let relay = Relay::start_with_clock(&config, clock.clone()).unwrap();
        let addr = relay.local_addrs()[0];
        Harness {
            clock,
            relay: Some(relay),
            sims,
            addr,
            _mount: mount,
            spool,
            gauge,
            config,
        }
    }

    /// The configuration text the relay started with.
    pub fn ini(&self) -> String {
        std::fs::read_to_string(self.spool.path().join("test.ini")).unwrap()
    }

    /// Reloads the running relay with `ini`.
    pub fn reload(&mut self, ini: &str) -> Result<(), String> {
        let config = Config::parse(ini, Path::new("test.ini")).map_err(|e| e.to_string())?;
        self.relay
            .as_mut()
            .unwrap()
            .reload(&config)
            .map_err(|e| e.to_string())
    }

    /// Stops the relay and starts a new one on the same spool.
    pub fn restart(&mut self) -> StopReport {
        let report = self.stop_relay();
        let relay = Relay::start_with_clock(&self.config, self.clock.clone()).unwrap();
        self.addr = relay.local_addrs()[0];
        self.relay = Some(relay);
        report
    }

    /// Stops the relay and starts a new one on the same spool with `ini`.
    pub fn restart_with(&mut self, ini: &str) -> StopReport {
        self.config = Config::parse(ini, Path::new("test.ini")).unwrap();
        self.restart()
    }

    /// Asks the relay's control socket.
    pub fn control(&self, command: &str) -> String {
        mm4relay::ops::control::request(&self.spool.path().join("control.sock"), command).unwrap()
    }

    /// Bytes of the spool's segment files now (the failed area apart).
    pub fn spool_bytes(&self) -> u64 {
        std::fs::read_dir(self.spool.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .map(|p| std::fs::metadata(p).unwrap().len())
            .sum()
    }

    pub fn peer(&self, i: usize) -> PeerSnapshot {
        self.relay.as_ref().unwrap().peer_snapshots()[i].clone()
    }

    /// Stops the relay (joining all its threads) and reports leftovers.
    pub fn stop_relay(&mut self) -> StopReport {
        self.relay.take().map(Relay::shutdown).unwrap_or_default()
    }

    pub fn client(&self, from_ip: &str) -> Client {
        Client::connect(from_ip, self.addr)
    }

    /// Stops the relay in a thread of its own, and returns once an idle
    /// session has had the stop's 421: the stop has then passed the
    /// sessions, and a message under way may finish. The thread gives the
    /// stop's report.
    pub fn stop_past_an_idle_session(&mut self) -> JoinHandle<StopReport> {
        let mut idle = self.client(LOCAL);
        assert_eq!(idle.cmd("EHLO t").code, 250);
        let relay = self.relay.take().expect("the relay runs");
        let stopped = thread::spawn(move || relay.shutdown());
        let mut idle = idle.into_tcp();
        idle.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut said = Vec::new();
        let _ = idle.read_to_end(&mut said);
        assert!(
            said.starts_with(b"421 "),
            "{:?}",
            String::from_utf8_lossy(&said)
        );
        stopped
    }
}

/// A tmpfs mounted for a test; unmounted on drop.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `kib` KiB on `dir`, if this process may.
    pub fn mount(dir: &Path, kib: u64) -> Option<Tmpfs> {
        let ok = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={kib}k,mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(dir.to_path_buf()))
    }

    /// True if a tmpfs can be mounted here (root with mount(8)).
    pub fn available() -> bool {
        let probe = tempfile::tempdir().unwrap();
        Tmpfs::mount(probe.path(), 64).is_some()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// The real binary.
pub const BIN: &str = env!("CARGO_BIN_EXE_mm4relay");

/// The relay as a child process, killed if the test fails half-way.
pub struct Running(pub std::process::Child);

impl Running {
    /// Starts `mm4relay run -c path` plus `args`; stderr is piped when the
    /// test reads the log from it.
    pub fn start(path: &std::path::Path, args: &[&std::ffi::OsStr], pipe_stderr: bool) -> Running {
        let mut cmd = Command::new(BIN);
        cmd.args(["run", "-c"]).arg(path).args(args);
        if pipe_stderr {
            cmd.stderr(Stdio::piped());
        }
        Running(cmd.spawn().unwrap())
    }

    /// Reads the piped log up to "listening on": the address, the lines
    /// before it, and a thread collecting the rest until the relay exits.
    pub fn listening(&mut self) -> (SocketAddr, Vec<String>, JoinHandle<Vec<String>>) {
        let mut log = BufReader::new(self.0.stderr.take().unwrap());
        let mut early = Vec::new();
        let mut line = String::new();
        let addr = loop {
            line.clear();
            assert!(
                log.read_line(&mut line).unwrap() > 0,
                "relay exited before listening"
            );
            if let Some(rest) = line.split("listening on ").nth(1) {
                break rest.trim().parse().unwrap();
            }
            early.push(line.clone());
        };
        let rest = std::thread::spawn(move || log.lines().map_while(Result::ok).collect());
        (addr, early, rest)
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([sig, &self.0.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// SIGTERM, then waits (within the test deadline) for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal("-TERM");
        let end = Instant::now() + DEADLINE;
        loop {
            if let Some(s) = self.0.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < end, "relay did not stop after SIGTERM");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A scripted SMTP client, one command at a time.
pub struct Client {
    stream: Stream,
    buf: Vec<u8>,
}

/// A TCP connection to `target` from the loopback address `from_ip`.
pub fn tcp_from(from_ip: &str, target: SocketAddr) -> TcpStream {
    let ip: IpAddr = from_ip.parse().unwrap();
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.bind(&SocketAddr::new(ip, 0).into()).unwrap();
    socket.connect(&target.into()).unwrap();
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    stream
}

impl Client {
    /// Connects to `target` from the loopback address `from_ip`.
    pub fn connect(from_ip: &str, target: SocketAddr) -> Client {
        Client::greeted(Stream::from(tcp_from(from_ip, target)))
    }

    /// Connects to an implicit-TLS listener, checking the name `localhost`.
    pub fn connect_tls(
        from_ip: &str,
        target: SocketAddr,
        connector: &native_tls::TlsConnector,
    ) -> Client {
        let stream = Stream::from(tcp_from(from_ip, target))
            .connect(connector, "localhost")
            .unwrap();
        Client::greeted(stream)
    }

    fn greeted(stream: Stream) -> Client {
        let mut c = Client {
            stream,
            buf: Vec::new(),
        };
        let greeting = c.reply();
        assert_eq!(greeting.code, 220, "{greeting}");
        c
    }

    /// STARTTLS (after EHLO) and the handshake, checking `localhost`.
    pub fn starttls(&mut self, connector: &native_tls::TlsConnector) {
        let reply = self.cmd("STARTTLS");
        assert_eq!(reply.code, 220, "{reply}");
        assert!(self.buf.is_empty());
        let placeholder = Stream::from(self.stream.tcp().try_clone().unwrap());
        let plain = std::mem::replace(&mut self.stream, placeholder);
        self.stream = plain.connect(connector, "localhost").unwrap();
    }

    /// Reads one reply.
    pub fn reply(&mut self) -> Reply {
        loop {
            if let Some((r, n)) = Reply::parse(&self.buf).unwrap() {
                self.buf.drain(..n);
                return r;
            }
            let mut chunk = [0u8; 4096];
            // A signal (a child's SIGCHLD, the relay's own handlers in this
            // process) may interrupt the wait: that is no answer yet.
            let n = match self.stream.read(&mut chunk) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => r.expect("reply from relay"),
            };
            assert!(n > 0, "relay closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// A reply if one is already there or arrives within 10 ms.
    pub fn try_reply(&mut self) -> Option<Reply> {
        let tcp = self.stream.tcp();
        tcp.set_read_timeout(Some(Duration::from_millis(10)))
            .unwrap();
        let mut chunk = [0u8; 4096];
        let got = match Reply::parse(&self.buf).unwrap() {
            Some(_) => true,
            None => match self.stream.read(&mut chunk) {
                Ok(n) if n > 0 => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    true
                }
                _ => false,
            },
        };
        self.stream.tcp().set_read_timeout(Some(DEADLINE)).unwrap();
        got.then(|| self.reply())
    }

    /// Sends one line (CRLF added) and reads the reply.
    pub fn cmd(&mut self, line: &str) -> Reply {
        self.send(format!("{line}\r\n").as_bytes());
        self.reply()
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// Sends message data dot-stuffed with the end marker; reads the reply.
    pub fn data(&mut self, body: &[u8]) -> Reply {
        let mut wire = Vec::new();
        dot_stuff(body, &mut wire);
        self.send(&wire);
        self.reply()
    }

    /// The TCP connection under a plain-text client.
    pub fn into_tcp(self) -> TcpStream {
        assert!(!self.stream.is_tls(), "the client runs TLS");
        self.stream.tcp().try_clone().unwrap()
    }

    /// True if the relay closed the connection (after a 421, say).
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 64];
        matches!(self.stream.read(&mut b), Ok(0) | Err(_))
    }
}

/// Reads until the relay closes `s` (or its read timeout); what came.
pub fn read_to_close(s: &mut TcpStream) -> String {
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        all.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&all).into_owned()
}

/// A whole transaction: EHLO, MAIL, RCPTs, DATA, body. Panics unless
/// everything is accepted; returns the final reply.
pub fn send_message(client: &mut Client, from: &str, rcpts: &[&str], body: &[u8]) -> Reply {
    assert_eq!(client.cmd("EHLO client.test").code, 250);
    assert_eq!(client.cmd(&format!("MAIL FROM:<{from}>")).code, 250);
    for r in rcpts {
        let reply = client.cmd(&format!("RCPT TO:<{r}>"));
        assert_eq!(reply.code, 250, "RCPT {r}: {reply}");
    }
    assert_eq!(client.cmd("DATA").code, 354);
    client.data(body)
}

/// Sends one MM4_forward.REQ (`forward_req(seq, rcpt, size)`) from
/// [`FROM`] to `rcpt` in a whole transaction; panics unless it gets 250.
pub fn send_forward(client: &mut Client, seq: usize, rcpt: &str, size: usize) -> Reply {
    let reply = send_message(client, FROM, &[rcpt], &forward_req(seq, rcpt, size));
    assert_eq!(reply.code, 250, "{reply}");
    reply
}

/// The queue ID in a "250 ... queued as ID" reply.
pub fn queued_as(reply: &Reply) -> String {
    reply.text().rsplit(' ').next().unwrap().to_string()
}

/// `n` MM4_forward.REQ of 2 KiB from [`FROM`] for [`send_load`], one
/// recipient each, taken from `rcpts` in turn.
///
/// [`send_load`]: mm4relay::sim::send_load
pub fn load(rcpts: &[&str], n: usize) -> Arc<Vec<Outgoing>> {
    Arc::new(
        (0..n)
            .map(|i| {
                let rcpt = rcpts[i % rcpts.len()].to_string();
                Outgoing {
                    from: FROM.into(),
                    data: forward_req(i, &rcpt, 2048),
                    rcpts: vec![rcpt],
                }
            })
            .collect(),
    )
}

/// The data a peer received, without the `Received:` line the relay added.
pub fn strip_trace(data: &[u8]) -> &[u8] {
    assert!(data.starts_with(b"Received: "), "no trace header first");
    let mut pos = 0;
    loop {
        let end = data[pos..].iter().position(|&b| b == b'\n').unwrap() + pos + 1;
        pos = end;
        if !matches!(data.get(pos), Some(b' ' | b'\t')) {
            return &data[pos..];
        }
    }
}

/// The X-Mms-Transaction-ID of a received message.
pub fn tid_of(data: &[u8]) -> String {
    let text = String::from_utf8_lossy(data);
    let line = text
        .lines()
        .find(|l| l.starts_with("X-Mms-Transaction-ID:"))
        .unwrap();
    line["X-Mms-Transaction-ID:".len()..].trim().to_string()
}

/// A TCP forwarder on loopback in front of `target` that keeps what
/// clients write, one entry per read, so a test can look at the wire.
/// Dropping it cuts every connection and joins its threads.
pub struct Tap {
    addr: SocketAddr,
    reads: Arc<parking_lot::Mutex<Vec<Vec<u8>>>>,
    conns: Arc<parking_lot::Mutex<Vec<TcpStream>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    threads: Arc<parking_lot::Mutex<Vec<JoinHandle<()>>>>,
    accept: Option<JoinHandle<()>>,
}

impl Tap {
    pub fn start(target: SocketAddr) -> Tap {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let reads: Arc<parking_lot::Mutex<Vec<Vec<u8>>>> = Arc::default();
        let conns: Arc<parking_lot::Mutex<Vec<TcpStream>>> = Arc::default();
        let stop: Arc<std::sync::atomic::AtomicBool> = Arc::default();
        let threads: Arc<parking_lot::Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (r, c, s, t) = (reads.clone(), conns.clone(), stop.clone(), threads.clone());
        let accept = thread::spawn(move || {
            for client in listener.incoming() {
                if s.load(Ordering::Acquire) {
                    return;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                let mut list = c.lock();
                list.push(client.try_clone().unwrap());
                list.push(server.try_clone().unwrap());
                drop(list);
                let (mut from_client, mut to_server) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (mut from_server, mut to_client) = (server, client);
                let r = r.clone();
                let up = thread::spawn(move || {
                    let mut buf = vec![0u8; 1 << 16];
                    while let Ok(n) = from_client.read(&mut buf) {
                        if n == 0 || to_server.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        r.lock().push(buf[..n].to_vec());
                    }
                    let _ = to_server.shutdown(std::net::Shutdown::Write);
                });
                let down = thread::spawn(move || {
                    let _ = std::io::copy(&mut from_server, &mut to_client);
                    let _ = to_client.shutdown(std::net::Shutdown::Write);
                });
                t.lock().extend([up, down]);
            }
        });
        Tap {
            addr,
            reads,
            conns,
            stop,
            threads,
            accept: Some(accept),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What clients wrote, one entry per read.
    pub fn reads(&self) -> Vec<Vec<u8>> {
        self.reads.lock().clone()
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        // Wakes the accept loop, which then sees `stop`.
        let _ = TcpStream::connect(self.addr);
        if let Some(a) = self.accept.take() {
            let _ = a.join();
        }
        for c in self.conns.lock().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        for t in std::mem::take(&mut *self.threads.lock()) {
            let _ = t.join();
        }
    }
}
