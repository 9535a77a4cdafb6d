//! End-to-end load bench: the real `mm4relay` binary between a load
//! generator (16 inbound sessions) and three simulated MMSCs on loopback.
//!
//! Each round first sends the load straight to the simulated peers (the
//! baseline: what the generator and sinks can do on this machine now), then
//! through the relay, and reports the relay's throughput as a ratio of the
//! baseline measured in the same round. Also reported: TCP connections the
//! relay opened per peer, the relay's peak RSS (VmHWM), and its context
//! switches and CPU time per message (the whole process, from start to
//! stop, as wait4 reports them).
//!
//! `cargo bench --bench e2e`; `E2E_MESSAGES` (default 20000), `E2E_ROUNDS`
//! (default 3), `E2E_SESSIONS` (default 16), `E2E_SIZE` (default 2048) and
//! `E2E_LOG_LEVEL` (default info: one log line per disposition, as in
//! production), `E2E_SPOOL_SYNC` (default yes; no measures the cost of
//! flushing). `E2E_TLS=1` adds a run per round with STARTTLS (TLS 1.2+,
//! verified certificates from a CA the bench makes) to every peer, and
//! reports its throughput as a ratio of the plain run of the same round.
//! `E2E_CDR=1` adds a run per round with `[cdr]` on (and checks one `sent`
//! row per message), reported as a ratio of the run without of the same
//! round (the CDR run first in even rounds, second in odd ones). `E2E_DOWN=1` instead runs the load with peer C down and prints
//! `mm4relay status` and `mm4relay queue age` meanwhile. `E2E_DNS=1` puts
//! the three peers on 127.0.1.1-3 sharing one port and adds two runs per
//! round, each reported as a ratio of the static-hosts run of the same
//! round: every peer as `hosts = mx:DOMAIN`, and B and C as dynamic peers
//! (only A configured), their MX served by a DNS server on loopback.
//! `E2E_HALF=1` adds a run per round at half the load the relay just
//! carried (the generator's sessions paced, open loop), for its latency;
//! with `E2E_PROBE=1` too, a bare flush is timed beside that run and, for
//! as long, alone before it (see [`FlushProbe`]): the flush's own latency
//! under the load and without it, a floor the relay's half-load p99 is
//! not expected to go below.
//! `E2E_BEFORE=PATH` adds a run per round of another `mm4relay` binary
//! (an earlier build: copy `target/release/mm4relay` aside before the
//! change), and reports this build's throughput as a ratio of that one's,
//! so a change is judged against what it changes in the same run (the
//! earlier build first in even rounds).

use std::fs::OpenOptions;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use hickory_proto::rr::RecordType;
use mm4relay::dns::server::{DnsServer, Reply, a, mx};
use mm4relay::sim::{
    LoadReport, Outgoing, SimPeer, SimSecurity, forward_req, send_load, send_load_at,
};

#[path = "../tests/relay/pki.rs"]
#[allow(dead_code)]
mod pki;

const PEERS: [(&str, &str, &str, bool); 3] = [
    ("A", "mms.mnc010.mcc001.gprs", "+447700900", true),
    ("B", "mms.mnc020.mcc001.gprs", "+1202555", false),
    ("C", "mms.mnc456.mcc999.gprs", "+61491570", false),
];
const MAX_CONNECTIONS: usize = 4;
/// The relay binary cargo built with this bench.
const THIS_BUILD: &str = env!("CARGO_BIN_EXE_mm4relay");

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn messages(n: usize, size: usize) -> Vec<Vec<Outgoing>> {
    let mut per_peer = vec![Vec::new(), Vec::new(), Vec::new()];
    for i in 0..n {
        let (_, domain, prefix, _) = PEERS[i % 3];
        let rcpt = format!("{prefix}{:04}/TYPE=PLMN@{domain}", i % 10_000);
        per_peer[i % 3].push(Outgoing {
            from: "+447700900001/TYPE=PLMN@mms.mnc010.mcc001.gprs".into(),
            data: forward_req(i, &rcpt, size),
            rcpts: vec![rcpt],
        });
    }
    per_peer
}

fn wait_delivered(sims: &[SimPeer; 3], want: [u64; 3], limit: Duration) -> bool {
    let end = Instant::now() + limit;
    sims.iter()
        .zip(want)
        .all(|(s, w)| s.wait_for_recipients(w, end.saturating_duration_since(Instant::now())))
}

/// Sends straight to the sinks: sessions split over the three peers.
fn baseline(sims: &[SimPeer; 3], per_peer: &[Vec<Outgoing>], sessions: usize) -> Duration {
    let start = Instant::now();
    let handles: Vec<_> = sims
        .iter()
        .zip(per_peer)
        .enumerate()
        .map(|(i, (sim, msgs))| {
            let share = sessions / 3 + usize::from(i < sessions % 3);
            let (addr, msgs) = (sim.addr(), Arc::new(msgs.clone()));
            thread::spawn(move || send_load(addr, share, msgs))
        })
        .collect();
    for h in handles {
        let r = h.join().unwrap();
        assert_eq!(r.refused, 0, "baseline refused messages");
    }
    start.elapsed()
}

/// How the relay finds the peers' hosts.
#[derive(Clone, Copy)]
enum Hosts {
    /// `hosts = ADDR`.
    Static,
    /// `hosts = mx:DOMAIN`, through this DNS server; hosts on this port.
    Mx(SocketAddr, u16),
    /// Only A configured; B and C made at RCPT time from their MX.
    Dynamic(SocketAddr, u16),
}

fn config(
    sims: &[SimPeer; 3],
    dir: &Path,
    listen: SocketAddr,
    log_level: &str,
    sync: &str,
    (tls, hosts, cdr): (Option<&pki::Pki>, Hosts, bool),
) -> String {
    let mut ini = format!(
        "[relay]\nhostname = relay.bench.test\nmax_connections = 64\nlog_level = {log_level}\nlog_file = {}\n\
         spool_dir = {}\ncontrol_socket = {}\nspool_sync = {sync}\n\n\
         [listener]\nlisten = {listen}\nrelay_from = 127.0.0.1/32\nmax_sessions = 64\n\n",
        dir.join("mm4relay.log").display(),
        dir.join("spool").display(),
        dir.join("control.sock").display(),
    );
    if cdr {
        ini.push_str(&format!("[cdr]\ndir = {}\n\n", dir.join("cdr").display()));
    }
    let settings = format!(
        "min_connections = 2\nmax_connections = {MAX_CONNECTIONS}\npool_size = 1000\nhelo_timeout = 3s\n"
    );
    match hosts {
        Hosts::Static => {}
        Hosts::Mx(dns, port) | Hosts::Dynamic(dns, port) => {
            ini.push_str(&format!("[dns]\nservers = {dns}\nsmtp_port = {port}\n\n"));
        }
    }
    if let Hosts::Dynamic(..) = hosts {
        ini.push_str(&format!(
            "[routes]\ndynamic = yes\n\n[peer_defaults]\n{settings}tls = off\n\n"
        ));
    }
    for ((name, domain, prefix, local), sim) in PEERS.iter().zip(sims) {
        let (host, prefix) = match hosts {
            Hosts::Static => (sim.addr().to_string(), *prefix),
            Hosts::Mx(..) => (format!("mx:{domain}"), *prefix),
            Hosts::Dynamic(..) if *local => (sim.addr().to_string(), ""),
            Hosts::Dynamic(..) => continue,
        };
        let prefixes = if prefix.is_empty() {
            String::new()
        } else {
            format!("prefixes = {prefix}\n")
        };
        ini.push_str(&format!(
            "[peer.{name}]\nhosts = {host}\ndomains = {domain}\n{prefixes}local = {}\n{settings}{}\n",
            if *local { "yes" } else { "no" },
            tls.map_or("tls = off\n".to_string(), |p| format!(
                "tls = required\ntls_ca_file = {}\ntls_server_name = localhost\n",
                p.ca.display()
            )),
        ));
    }
    ini
}

/// How a run through the relay differs from the plain one.
#[derive(Clone, Copy)]
struct Variant<'a> {
    /// STARTTLS to every peer, with certificates from this PKI.
    tls: Option<&'a pki::Pki>,
    hosts: Hosts,
    /// `[cdr]` on.
    cdr: bool,
    /// The relay binary.
    bin: &'a Path,
    /// The offered load, messages per second (`None`: as fast as the
    /// sessions go).
    rate: Option<f64>,
}

impl<'a> Variant<'a> {
    fn plain(bin: &'a Path) -> Variant<'a> {
        Variant {
            tls: None,
            hosts: Hosts::Static,
            cdr: false,
            bin,
            rate: None,
        }
    }

    fn cdr(self, cdr: bool) -> Variant<'a> {
        Variant { cdr, ..self }
    }
}

/// What one run through the relay gave.
struct Run {
    elapsed: Duration,
    report: LoadReport,
    conns: String,
    rss: u64,
    spool: String,
    /// Context switches and CPU per message, start to stop.
    cost: String,
}

impl Run {
    /// Relayed messages per second, of `n`.
    fn rate(&self, n: usize) -> f64 {
        n as f64 / self.elapsed.as_secs_f64()
    }

    /// Prints its row of the table (`direct` and `ratio` where the row has
    /// them, `note` after), then its cost per message.
    fn print(&self, n: usize, label: &str, direct: Option<f64>, ratio: Option<f64>, note: &str) {
        println!(
            "{label:>5} {:>12} {:>12.0} {:>12.0} {:>8} {:>22} {:>9} KiB {:>16}{note}",
            direct.map_or(String::new(), |d| format!("{d:.0}")),
            n as f64 / self.report.elapsed.as_secs_f64(),
            self.rate(n),
            ratio.map_or(String::new(), |r| format!("{r:.2}")),
            self.conns,
            self.rss,
            percentiles(&self.report.latencies),
        );
        println!("      {}", self.cost);
    }
}

/// The median of `v`, and `v` in the order given.
fn median(v: &[f64]) -> (f64, String) {
    let mut sorted = v.to_vec();
    sorted.sort_by(f64::total_cmp);
    (sorted[sorted.len() / 2], format!("{v:.2?}"))
}

/// Starts the relay in front of `sims`, sends `all`, waits for every
/// message at its peer, and stops the relay.
fn relay_run(
    sims: &[SimPeer; 3],
    all: &Arc<Vec<Outgoing>>,
    want: &[u64],
    sessions: usize,
    log_level: &str,
    sync: &str,
    v: Variant,
) -> Run {
    let Variant {
        tls,
        hosts,
        cdr,
        bin,
        rate,
    } = v;
    let n = all.len();
    let base: Vec<u64> = sims.iter().map(SimPeer::recipients).collect();
    let conns_before: Vec<u64> = sims.iter().map(SimPeer::connections).collect();
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("mm4relay.ini");
    let addr = free_addr();
    std::fs::write(
        &config_path,
        config(sims, dir.path(), addr, log_level, sync, (tls, hosts, cdr)),
    )
    .unwrap();
    let relay = RelayProcess::start(bin, &config_path, addr);
    let start = Instant::now();
    let report = send_load_at(addr, sessions, all.clone(), rate);
    let targets = [base[0] + want[0], base[1] + want[1], base[2] + want[2]];
    let delivered = wait_delivered(sims, targets, Duration::from_secs(300));
    let relay_time = start.elapsed();
    let rss = relay.peak_rss_kib();
    let (exited_0, usage) = relay.stop();
    assert!(exited_0, "relay did not exit 0 on SIGTERM");
    assert_eq!(
        report.accepted, n,
        "relay refused {} messages",
        report.refused
    );
    assert!(delivered, "relay did not deliver everything");
    if cdr {
        let mut sent = 0;
        for e in std::fs::read_dir(dir.path().join("cdr")).unwrap() {
            let text = std::fs::read_to_string(e.unwrap().path()).unwrap();
            sent += text.lines().filter(|l| l.starts_with("sent,")).count();
        }
        assert_eq!(sent, n, "one sent row per message");
    }

    let conns: Vec<u64> = sims
        .iter()
        .zip(&conns_before)
        .map(|(s, b)| s.connections() - b)
        .collect();
    Run {
        elapsed: relay_time,
        report,
        conns: format!(
            "{}/{}/{} (max {MAX_CONNECTIONS})",
            conns[0], conns[1], conns[2]
        ),
        rss,
        cost: Usage::per_message(usage, n),
        spool: {
            let spool = dir.path().join("spool");
            let (segments, other) = dir_bytes(&spool);
            format!(
                "spool after the drain: {segments} bytes of segments (used: {}); \
                 {other} bytes of other files (the dedup keys saved at the stop)",
                last_segment(&spool)
            )
        },
    }
}

/// The relay as a child process; killed if the bench fails half-way.
struct RelayProcess(Child);

impl RelayProcess {
    fn start(bin: &Path, config_path: &Path, addr: SocketAddr) -> RelayProcess {
        let child = Command::new(bin)
            .args(["run", "-c"])
            .arg(config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mm4relay");
        let relay = RelayProcess(child);
        let end = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(addr).is_err() {
            assert!(
                Instant::now() < end,
                "relay did not start listening on {addr}"
            );
            thread::sleep(Duration::from_millis(10));
        }
        relay
    }

    /// Peak resident set size (VmHWM) so far.
    fn peak_rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.0.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    /// SIGTERM, then wait for the drain; returns whether it exited 0, and
    /// what the whole process (every thread, gone ones too) used.
    fn stop(self) -> (bool, Option<Usage>) {
        let pid = self.0.id() as libc::pid_t;
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let mut status = 0;
            // SAFETY: an all-zero rusage is a valid value to overwrite.
            let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
            // SAFETY: pid is our child; status and ru outlive the call.
            // Reaped here, so the Drop's try_wait finds nothing to do.
            let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut ru) };
            if r == pid {
                let exited_0 = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
                return (exited_0, Some(Usage::of(&ru)));
            }
            if r < 0 || Instant::now() > end {
                return (false, None);
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

/// What a relay process used in a run.
#[derive(Clone, Copy)]
struct Usage {
    /// Context switches, voluntary and not.
    switches: (u64, u64),
    /// User and system CPU time.
    cpu: Duration,
}

impl Usage {
    fn of(ru: &libc::rusage) -> Usage {
        let tv = |t: libc::timeval| {
            Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
        };
        Usage {
            switches: (ru.ru_nvcsw as u64, ru.ru_nivcsw as u64),
            cpu: tv(ru.ru_utime) + tv(ru.ru_stime),
        }
    }

    /// Per relayed message, as the table prints it.
    fn per_message(u: Option<Usage>, n: usize) -> String {
        match u {
            Some(u) => {
                let n = n.max(1) as f64;
                format!(
                    "relay per message: {:.1} context switches ({:.1} voluntary), {:.0} µs CPU",
                    (u.switches.0 + u.switches.1) as f64 / n,
                    u.switches.0 as f64 / n,
                    u.cpu.as_secs_f64() * 1e6 / n
                )
            }
            None => "relay usage unknown".into(),
        }
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// p50/p99 of the inbound transaction time (MAIL to the 250 after the
/// final dot), an upper bound on the end-of-DATA-to-250 latency.
fn percentiles(l: &[Duration]) -> String {
    if l.is_empty() {
        return "-".into();
    }
    let mut l = l.to_vec();
    l.sort();
    format!("{:.2}/{:.2}", quantile_ms(&l, 0.5), quantile_ms(&l, 0.99))
}

/// The `q` quantile of `sorted` (not empty), in milliseconds.
fn quantile_ms(sorted: &[Duration], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q) as usize].as_secs_f64() * 1000.0
}

/// A bare flush: 4 KiB appended to a file of its own on the spool's file
/// system and `fdatasync`ed, every [`PROBE_EVERY`], by a thread at
/// real-time priority where it may have it, so that the thread itself does
/// not wait for a CPU: what it sees is the flush's latency under whatever
/// load runs beside it (the kernel's block-layer work for it, at normal
/// priority, may still wait). Beside a run it adds a flush of its own to
/// the disk every 5 ms, and its window takes in the relay's start and
/// drain too: a run with the probe is compared with runs with it.
struct FlushProbe {
    stop: Arc<AtomicBool>,
    handle: thread::JoinHandle<(Vec<Duration>, bool)>,
}

/// How often the probe flushes: a tenth or less of the relay's flushes.
const PROBE_EVERY: Duration = Duration::from_millis(5);

impl FlushProbe {
    fn start() -> FlushProbe {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let handle = thread::spawn(move || {
            let param = libc::sched_param { sched_priority: 1 };
            // SAFETY: sets the calling thread's own policy (pid 0); the
            // parameter outlives the call.
            let fifo = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } == 0;
            let dir = tempfile::tempdir().unwrap();
            let mut file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.path().join("probe"))
                .unwrap();
            let block = [0x55u8; 4096];
            let mut flushes = Vec::new();
            let mut next = Instant::now();
            while !stopped.load(Ordering::Acquire) {
                let t = Instant::now();
                file.write_all(&block).unwrap();
                file.sync_data().unwrap();
                flushes.push(t.elapsed());
                // A slow flush is not made up for by a burst of flushes:
                // the next comes a whole interval after it at the soonest.
                let now = Instant::now();
                next += PROBE_EVERY;
                if next < now {
                    next = now + PROBE_EVERY;
                }
                thread::sleep(next.saturating_duration_since(now));
            }
            (flushes, fifo)
        });
        FlushProbe { stop, handle }
    }

    /// Stops the probe; what it saw, as a line.
    fn stop(self) -> String {
        self.stop.store(true, Ordering::Release);
        let (mut l, fifo) = self.handle.join().unwrap();
        if l.is_empty() {
            return "no flush recorded".into();
        }
        l.sort();
        let p = |q: f64| quantile_ms(&l, q);
        format!(
            "{} flushes of 4 KiB, p50/p99/max {:.2}/{:.2}/{:.2} ms, {:.1}% over 2 ms{}",
            l.len(),
            p(0.5),
            p(0.99),
            p(1.0),
            100.0 * l.iter().filter(|d| **d > Duration::from_millis(2)).count() as f64
                / l.len() as f64,
            if fifo {
                ""
            } else {
                " (no real-time priority here: the CPU may have delayed it)"
            },
        )
    }
}

/// Bytes of the segment files, and of the other files, in the spool directory.
fn dir_bytes(dir: &Path) -> (u64, u64) {
    let mut sizes = (0, 0);
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(m) = e.metadata() else { continue };
        if !m.is_file() {
            continue;
        }
        if e.path().extension().is_some_and(|x| x == "log") {
            sizes.0 += m.len();
        } else {
            sizes.1 += m.len();
        }
    }
    sizes
}

/// The number of the newest spool segment: how many were used.
fn last_segment(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| {
                e.ok()?
                    .file_name()
                    .into_string()
                    .ok()?
                    .strip_suffix(".log")?
                    .parse()
                    .ok()
            })
            .max()
            .unwrap_or(0)
        })
        .unwrap_or(0)
}

/// A loopback address with a port that was free a moment ago.
fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// `E2E_DOWN=1`: the same load with peer C never greeting; prints what
/// `mm4relay status` and `mm4relay queue age` say once A and B are done.
fn down_run(n: usize, sessions: usize, size: usize) {
    let sims = [0, 1, 2].map(|_| SimPeer::start(false).unwrap());
    sims[2].set_fault(mm4relay::sim::Fault::NoGreeting);
    let per_peer = messages(n, size);
    let all: Arc<Vec<Outgoing>> =
        Arc::new((0..n).map(|i| per_peer[i % 3][i / 3].clone()).collect());
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("mm4relay.ini");
    let addr = free_addr();
    std::fs::write(
        &config_path,
        config(
            &sims,
            dir.path(),
            addr,
            "info",
            "yes",
            (None, Hosts::Static, false),
        ),
    )
    .unwrap();
    let relay = RelayProcess::start(Path::new(THIS_BUILD), &config_path, addr);
    let socket = dir.path().join("control.sock");
    let ask = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_mm4relay"))
            .args(args)
            .arg("--socket")
            .arg(&socket)
            .output()
            .unwrap();
        println!(
            "$ mm4relay {}\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout)
        );
    };
    let load = thread::spawn(move || send_load(addr, sessions, all));
    // Once a second while the load runs (the balancer's rates need a
    // tick or two), then once A and B are done.
    let mut looked = 0;
    while !load.is_finished() {
        thread::sleep(Duration::from_secs(1));
        if looked < 2 && !load.is_finished() {
            println!("-- during the load");
            ask(&["status"]);
            looked += 1;
        }
    }
    let report = load.join().unwrap();
    let targets = [per_peer[0].len() as u64, per_peer[1].len() as u64];
    for (sim, want) in sims.iter().zip(targets) {
        assert!(sim.wait_for_recipients(want, Duration::from_secs(300)));
    }
    // Let C fail its connects and be isolated before looking.
    thread::sleep(Duration::from_secs(8));
    println!("-- A and B done");
    ask(&["status"]);
    ask(&["queue", "age"]);
    println!("accepted {} of {n}; A and B done, C down", report.accepted);
    assert!(relay.stop().0, "relay did not exit 0 on SIGTERM");
}

/// Three sinks on 127.0.1.1, .2 and .3 sharing one port, as hosts found
/// through DNS are (one `smtp_port`).
fn shared_port_sims() -> [SimPeer; 3] {
    let at = |i: u8, port: u16| {
        let addr = SocketAddr::from(([127, 0, 1, i], port));
        SimPeer::start_at(addr, false, None, SimSecurity::default())
    };
    let first = at(1, 0).unwrap();
    let port = first.addr().port();
    [first, at(2, port).unwrap(), at(3, port).unwrap()]
}

/// A DNS server whose zone gives each peer's domain one MX on 127.0.1.x.
fn dns_zone() -> DnsServer {
    let server = DnsServer::start().unwrap();
    for (i, (_, domain, _, _)) in PEERS.iter().enumerate() {
        let exchange = format!("mx.{domain}");
        server.set(
            domain,
            RecordType::MX,
            Reply::Records(vec![mx(10, &exchange)], 300),
        );
        let ip = std::net::Ipv4Addr::new(127, 0, 1, i as u8 + 1);
        server.set(&exchange, RecordType::A, Reply::Records(vec![a(ip)], 300));
        server.set(&exchange, RecordType::AAAA, Reply::Records(vec![], 300));
    }
    server
}

fn main() {
    // `cargo test --benches` runs benches with --bench absent: stay quick.
    if !std::env::args().any(|a| a == "--bench") {
        println!("e2e: run with `cargo bench --bench e2e`");
        return;
    }
    if std::env::var_os("E2E_DOWN").is_some() {
        down_run(
            env_or("E2E_MESSAGES", 20_000),
            env_or("E2E_SESSIONS", 16),
            env_or("E2E_SIZE", 2048),
        );
        return;
    }
    let n = env_or("E2E_MESSAGES", 20_000);
    let rounds = env_or("E2E_ROUNDS", 3);
    let sessions = env_or("E2E_SESSIONS", 16);
    let size = env_or("E2E_SIZE", 2048);
    let log_level = std::env::var("E2E_LOG_LEVEL").unwrap_or_else(|_| "info".into());
    let sync = std::env::var("E2E_SPOOL_SYNC").unwrap_or_else(|_| "yes".into());
    let per_peer = messages(n, size);
    let all: Arc<Vec<Outgoing>> =
        Arc::new((0..n).map(|i| per_peer[i % 3][i / 3].clone()).collect());
    let want: Vec<u64> = per_peer.iter().map(|m| m.len() as u64).collect();
    println!(
        "e2e: {n} MM4_forward.REQ of {size} octets, {sessions} inbound sessions, 3 peers, {rounds} rounds, log {log_level}"
    );
    println!(
        "{:>5} {:>12} {:>12} {:>12} {:>8} {:>22} {:>12}",
        "round",
        "direct msg/s",
        "accept msg/s",
        "relay msg/s",
        "ratio",
        "connections A/B/C",
        "peak RSS"
    );
    let mut ratios = Vec::new();
    let mut tls_ratios = Vec::new();
    let mut dns_ratios = [Vec::new(), Vec::new()];
    let pki = std::env::var_os("E2E_TLS").map(|_| pki::Pki::new());
    let dns = std::env::var_os("E2E_DNS").map(|_| dns_zone());
    let cdr = std::env::var_os("E2E_CDR").is_some();
    let mut cdr_ratios = Vec::new();
    let this = Path::new(THIS_BUILD);
    let before = std::env::var_os("E2E_BEFORE").map(PathBuf::from);
    let half = std::env::var_os("E2E_HALF").is_some();
    let probe = std::env::var_os("E2E_PROBE").is_some();
    if probe && !half {
        println!("E2E_PROBE=1 times flushes beside the E2E_HALF=1 run: without it, no probe");
    }
    let mut before_ratios = Vec::new();
    // A run through the relay in front of `sims`, with this bench's load.
    let go = |sims: &[SimPeer; 3], v: Variant| {
        relay_run(sims, &all, &want, sessions, &log_level, &sync, v)
    };
    for round in 1..=rounds {
        let sims = match &dns {
            None => [
                SimPeer::start(false).unwrap(),
                SimPeer::start(false).unwrap(),
                SimPeer::start(false).unwrap(),
            ],
            Some(_) => shared_port_sims(),
        };
        let direct = baseline(&sims, &per_peer, sessions);

        let static_run = |cdr| go(&sims, Variant::plain(this).cdr(cdr));
        let (plain, with_cdr) = (|| static_run(false), || static_run(true));
        let earlier = |bin: &Path| go(&sims, Variant::plain(bin));
        // The earlier build goes first in even rounds.
        let before_first = match &before {
            Some(bin) if round % 2 == 0 => Some(earlier(bin)),
            _ => None,
        };
        // The CDR run goes first in even rounds: neither run gains from
        // its place (a warm page cache, a spool disk still writing back).
        let (run, cdr_run) = match (cdr, round % 2 == 0) {
            (false, _) => (plain(), None),
            (true, false) => {
                let run = plain();
                (run, Some(with_cdr()))
            }
            (true, true) => {
                let r = with_cdr();
                (plain(), Some(r))
            }
        };
        let before_run = match &before {
            Some(bin) if before_first.is_none() => Some(earlier(bin)),
            _ => before_first,
        };
        let direct_rate = n as f64 / direct.as_secs_f64();
        let relay_rate = run.rate(n);
        let ratio = relay_rate / direct_rate;
        ratios.push(ratio);
        run.print(n, &round.to_string(), Some(direct_rate), Some(ratio), "");
        println!("      {}", run.spool);
        if half {
            // The disk alone first, for about as long as the run takes.
            let alone = probe.then(|| {
                let p = FlushProbe::start();
                thread::sleep(run.elapsed * 2);
                p.stop()
            });
            let beside = probe.then(FlushProbe::start);
            let r = go(
                &sims,
                Variant {
                    rate: Some(relay_rate / 2.0),
                    ..Variant::plain(this)
                },
            );
            let note = format!("   (offered: {:.0} msg/s)", relay_rate / 2.0);
            r.print(n, "1/2", None, None, &note);
            if let (Some(alone), Some(beside)) = (alone, beside) {
                println!("      bare flush beside the run: {}", beside.stop());
                println!("      bare flush alone, before:  {alone}");
            }
        }
        if let Some(r) = before_run {
            let rate = r.rate(n);
            before_ratios.push(relay_rate / rate);
            let note = format!("   (E2E_BEFORE; this build / it: {:.2})", relay_rate / rate);
            r.print(n, "was", Some(direct_rate), Some(rate / direct_rate), &note);
        }
        if let Some(r) = cdr_run {
            let ratio = r.rate(n) / relay_rate;
            cdr_ratios.push(ratio);
            r.print(n, "CDR", None, Some(ratio), "   (ratio: CDRs on / off)");
        }
        if let Some(server) = &dns {
            let port = sims[0].addr().port();
            let modes = [
                ("mx:", Hosts::Mx(server.addr(), port)),
                ("dyn", Hosts::Dynamic(server.addr(), port)),
            ];
            for (i, (label, mode)) in modes.into_iter().enumerate() {
                let r = go(
                    &sims,
                    Variant {
                        hosts: mode,
                        ..Variant::plain(this)
                    },
                );
                let ratio = r.rate(n) / relay_rate;
                dns_ratios[i].push(ratio);
                r.print(n, label, None, Some(ratio), "   (ratio: / static hosts)");
            }
        }
        for s in sims {
            s.stop();
        }
        if let Some(p) = &pki {
            let sims = [0, 1, 2].map(|_| {
                let sec = SimSecurity {
                    tls: Some(p.server.acceptor()),
                    auth: None,
                };
                SimPeer::start_with(false, None, sec).unwrap()
            });
            let tls = go(
                &sims,
                Variant {
                    tls: Some(p),
                    ..Variant::plain(this)
                },
            );
            let ratio = tls.rate(n) / relay_rate;
            tls_ratios.push(ratio);
            tls.print(n, "TLS", None, Some(ratio), "   (ratio: TLS / plain relay)");
            for s in sims {
                assert!(
                    s.received().iter().all(|m| m.tls) && s.messages() > 0,
                    "a TLS-run message came in plain text"
                );
                s.stop();
            }
        }
    }
    let [mx_ratios, dynamic_ratios] = dns_ratios;
    let medians = [
        ("relay/direct", ratios),
        ("this build / E2E_BEFORE", before_ratios),
        ("CDRs on / off", cdr_ratios),
        ("mx: peers / static hosts", mx_ratios),
        ("dynamic peers / static hosts", dynamic_ratios),
        ("TLS relay / plain relay", tls_ratios),
    ];
    for (label, r) in medians {
        if !r.is_empty() {
            let (m, rounds) = median(&r);
            println!("median ratio {label}: {m:.2} (rounds: {rounds})");
        }
    }
}
