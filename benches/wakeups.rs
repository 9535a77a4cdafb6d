//! Context switches of an idle relay (issue 13: waits are signals). The
//! real binary runs against three simulated MMSCs; its threads' context
//! switches (`voluntary_ctxt_switches` + `nonvoluntary_ctxt_switches` of
//! every `/proc/PID/task/*/status`) are summed over `WAKEUPS_SECS`
//! seconds (default 10) in two states:
//!
//! 1. **quiet**: three healthy peers, no traffic;
//! 2. **partner down**: B's host refuses connections and 500 messages
//!    wait for it, 400 of them outside its pool (`pool_size = 100`).
//!
//! `cargo bench --bench wakeups`

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use mm4relay::sim::{Outgoing, SimPeer, forward_req, send_load};

const BIN: &str = env!("CARGO_BIN_EXE_mm4relay");
const FROM: &str = "+447700900001/TYPE=PLMN@mms.mnc010.mcc001.gprs";
const TO_B: &str = "+12025550142/TYPE=PLMN@mms.mnc020.mcc001.gprs";

/// Context switches so far of each of `pid`'s threads, by thread id, with
/// the thread's name.
fn switches(pid: u32) -> BTreeMap<String, (String, u64)> {
    let mut all = BTreeMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let mut n = 0;
        let mut name = String::new();
        for line in status.lines() {
            if let Some(v) = line.strip_prefix("Name:") {
                name = v.trim().to_string();
            }
            if let Some(v) = line
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                n += v.trim().parse::<u64>().unwrap_or(0);
            }
        }
        all.insert(task.file_name().to_string_lossy().into_owned(), (name, n));
    }
    all
}

/// The relay binary on `ini`; its SMTP address once it listens.
fn start(dir: &std::path::Path, ini: &str) -> (Child, std::net::SocketAddr) {
    let path = dir.join("relay.ini");
    std::fs::write(&path, ini).unwrap();
    let child = Command::new(BIN)
        .arg("run")
        .arg("-c")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let port: u16 = ini
        .lines()
        .find_map(|l| l.strip_prefix("listen = 127.0.0.1:"))
        .unwrap()
        .parse()
        .unwrap();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let end = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < end, "the relay did not listen");
        thread::sleep(Duration::from_millis(20));
    }
    (child, addr)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Context switches per second over `secs`, in all and for the busiest
/// kinds of thread (by name, numbers stripped).
fn measure(child: &Child, secs: u64) -> (f64, String) {
    // Let start-up and the first balancer ticks pass.
    thread::sleep(Duration::from_secs(3));
    let before = switches(child.id());
    let t = Instant::now();
    thread::sleep(Duration::from_secs(secs));
    let after = switches(child.id());
    let elapsed = t.elapsed().as_secs_f64();
    let mut by_kind: BTreeMap<String, u64> = BTreeMap::new();
    let mut total = 0;
    for (tid, (name, n)) in &after {
        let d = n - before.get(tid).map_or(0, |b| b.1);
        total += d;
        let kind = name.trim_end_matches(|c: char| c.is_ascii_digit() || c == '-');
        *by_kind.entry(kind.to_string()).or_default() += d;
    }
    let mut kinds: Vec<(String, u64)> = by_kind.into_iter().collect();
    kinds.sort_by_key(|k| std::cmp::Reverse(k.1));
    let top: Vec<String> = kinds
        .iter()
        .take(4)
        .map(|(k, n)| format!("{k} {:.1}", *n as f64 / elapsed))
        .collect();
    (total as f64 / elapsed, top.join(", "))
}

fn run(name: &str, down: bool, secs: u64) {
    let sims = [0, 1, 2].map(|_| SimPeer::start(false).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let b_host = if down {
        format!("127.0.0.1:{}", free_port())
    } else {
        sims[1].addr().to_string()
    };
    let ini = format!(
        "[relay]\nhostname = relay.bench\nlog_level = warn\nspool_dir = {d}/spool\ncontrol_socket = {d}/control.sock\n\n\
         [listener]\nlisten = 127.0.0.1:{port}\n\n\
         [peer.A]\nhosts = {a}\ndomains = mms.mnc010.mcc001.gprs\nprefixes = +447700900\nlocal = yes\n\n\
         [peer.B]\nhosts = {b_host}\ndomains = mms.mnc020.mcc001.gprs\nprefixes = +1202555\npool_size = 100\n\n\
         [peer.C]\nhosts = {c}\ndomains = mms.mnc456.mcc999.gprs\nprefixes = +61491570\n",
        d = dir.path().display(),
        port = free_port(),
        a = sims[0].addr(),
        c = sims[2].addr(),
    );
    let (mut child, addr) = start(dir.path(), &ini);
    if down {
        let msgs: Vec<Outgoing> = (0..500)
            .map(|i| Outgoing {
                from: FROM.into(),
                rcpts: vec![TO_B.into()],
                data: forward_req(i, TO_B, 2048),
            })
            .collect();
        let report = send_load(addr, 4, Arc::new(msgs));
        assert_eq!(report.accepted, 500, "{report:?}");
    }
    let (rate, top) = measure(&child, secs);
    let threads = std::fs::read_dir(format!("/proc/{}/task", child.id()))
        .unwrap()
        .count();
    println!("{name:<14} {rate:>8.1} context switches/s   ({threads} threads; busiest: {top})");
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let _ = child.wait();
    for s in sims {
        s.stop();
    }
}

fn main() {
    let secs = std::env::var("WAKEUPS_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    println!("wakeups: the relay binary, idle, over {secs} s");
    run("quiet", false, secs);
    run("partner down", true, secs);
}
