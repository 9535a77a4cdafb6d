//! Number portability at carrier scale (issue 14): a ported file of
//! `PORTED_ENTRIES` lines (default 10,000,000: nine exact numbers to one
//! block) is written, then
//!
//! 1. **load**: read and built into the table, against reading the file
//!    alone (the baseline, in the same run); octets per entry, from the
//!    table and from the process's RSS;
//! 2. **look-up**: a million look-ups (half of them hits), against parsing
//!    a `RCPT TO:` line (the baseline: the least the relay does per
//!    recipient anyway);
//! 3. **reload under traffic**: a relay with the file and three simulated
//!    MMSCs takes 60,000 messages over 8 sessions while the file is
//!    reloaded again and again; reload time against start time, and the
//!    messages refused (there must be none).
//!
//! `cargo bench --bench ported`

mod common;

use std::fmt::Write as _;
use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::{PEERS, env_or};
use mm4relay::config::Config;
use mm4relay::relay::Relay;
use mm4relay::route::np::NpBuilder;
use mm4relay::sim::{Outgoing, SimPeer, forward_req, send_load};
use mm4relay::smtp::command::Command;

const NAMES: [&str; 3] = ["A", "B", "C"];
const TO_B: &str = "+12025550142/TYPE=PLMN@mms.mnc020.mcc001.gprs";

/// A deterministic spread of 11-digit numbers under +44 7.
fn number(i: usize) -> u64 {
    447_000_000_000 + (i as u64).wrapping_mul(2_654_435_761) % 999_999_999
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn write_file(path: &Path, entries: usize) {
    let mut text = String::with_capacity(entries * 17);
    for i in 0..entries {
        let peer = NAMES[i % 3];
        if i % 10 == 9 {
            // A block: the first nine digits.
            let _ = writeln!(text, "{}* {peer}", number(i) / 100);
        } else {
            let _ = writeln!(text, "+{};{peer}", number(i));
        }
    }
    std::fs::write(path, text).unwrap();
}

fn main() {
    let entries = env_or("PORTED_ENTRIES", 10_000_000);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ported.txt");
    let t = Instant::now();
    write_file(&file, entries);
    let size = std::fs::metadata(&file).unwrap().len();
    println!(
        "ported: {entries} entries, {} MiB, written in {:.1}s",
        size >> 20,
        t.elapsed().as_secs_f64()
    );

    // 1. Load, against reading the file alone.
    let t = Instant::now();
    let text = std::fs::read_to_string(&file).unwrap();
    let read = t.elapsed();
    drop(text);
    let before = rss_kib();
    let t = Instant::now();
    let text = std::fs::read_to_string(&file).unwrap();
    let mut b = NpBuilder::new();
    b.add_file(&text, |n| NAMES.iter().position(|p| *p == n))
        .unwrap();
    drop(text);
    let table = b.build().unwrap();
    let load = t.elapsed();
    let after = rss_kib();
    println!(
        "load: {:.2}s (reading the file alone {:.2}s: ratio {:.1}); {} entries, {:.1} octets each \
         in the table, RSS grew by {:.1} octets an entry",
        load.as_secs_f64(),
        read.as_secs_f64(),
        load.as_secs_f64() / read.as_secs_f64(),
        table.len(),
        table.bytes() as f64 / table.len() as f64,
        after.saturating_sub(before) as f64 * 1024.0 / table.len() as f64
    );

    // 2. Look-ups, against parsing an RCPT line.
    let probes: Vec<String> = (0..1_000_000)
        .map(|i| {
            let n = if i % 2 == 0 {
                number(i * 7 % entries)
            } else {
                number(i) + 1
            };
            format!("+{n}")
        })
        .collect();
    let t = Instant::now();
    let mut hits = 0usize;
    for p in &probes {
        hits += usize::from(table.lookup(black_box(p)).is_some());
    }
    let lookup = t.elapsed().as_secs_f64() / probes.len() as f64;
    let lines: Vec<Vec<u8>> = probes
        .iter()
        .map(|p| format!("RCPT TO:<{p}/TYPE=PLMN@mms.mnc010.mcc001.gprs>").into_bytes())
        .collect();
    let t = Instant::now();
    for l in &lines {
        black_box(Command::parse(black_box(l)).is_ok());
    }
    let parse = t.elapsed().as_secs_f64() / lines.len() as f64;
    println!(
        "look-up: {:.0} ns ({hits} hits of {}); parsing the RCPT line {:.0} ns: ratio {:.2}",
        lookup * 1e9,
        probes.len(),
        parse * 1e9,
        lookup / parse
    );
    drop(table);

    // 3. Reloads under traffic.
    let sims = [
        SimPeer::start(false).unwrap(),
        SimPeer::start(false).unwrap(),
        SimPeer::start(false).unwrap(),
    ];
    let mut ini = format!(
        "[relay]\nhostname = relay.bench\nmax_connections = 24\nlog_level = warn\n\
         spool_dir = {}\ncontrol_socket =\n\n[listener]\nlisten = 127.0.0.1:0\nmax_sessions = 64\n\n\
         [routes]\nported_file = {}\n\n",
        dir.path().join("spool").display(),
        file.display()
    );
    for (i, (name, domain, prefix)) in PEERS.into_iter().enumerate() {
        let _ = write!(
            ini,
            "[peer.{name}]\nhosts = {}\ndomains = {domain}\nprefixes = {prefix}\n\
             min_connections = 1\nmax_connections = 8\npool_size = 1000\n\n",
            sims[i].addr()
        );
    }
    let config_path = dir.path().join("relay.ini");
    std::fs::write(&config_path, &ini).unwrap();
    let t = Instant::now();
    let config = Config::load(&config_path).unwrap();
    let mut relay = Relay::start(&config).unwrap();
    let start = t.elapsed();
    let n = env_or("PORTED_MESSAGES", 60_000);
    let messages: Arc<Vec<Outgoing>> = Arc::new(
        (0..n)
            .map(|i| Outgoing {
                from: "+447700900001/TYPE=PLMN@mms.mnc010.mcc001.gprs".into(),
                rcpts: vec![TO_B.to_string()],
                data: forward_req(i, TO_B, 2048),
            })
            .collect(),
    );
    let addr = relay.local_addrs()[0];
    let traffic = thread::spawn(move || send_load(addr, 8, messages));
    let mut reloads = Vec::new();
    while !traffic.is_finished() {
        let t = Instant::now();
        let config = Config::load(&config_path).unwrap();
        relay.reload(&config).unwrap();
        reloads.push(t.elapsed().as_secs_f64());
    }
    let report = traffic.join().unwrap();
    assert!(sims[1].wait_for_recipients(report.accepted as u64, Duration::from_secs(300)));
    relay.shutdown();
    reloads.sort_by(f64::total_cmp);
    let median = reloads.get(reloads.len() / 2).copied().unwrap_or(0.0);
    println!(
        "reload under traffic: {} reloads, median {median:.2}s (the relay's whole start with the \
         file {:.2}s: ratio {:.2}); {} of {n} messages accepted, {} refused, {:.0} msg/s",
        reloads.len(),
        start.as_secs_f64(),
        median / start.as_secs_f64(),
        report.accepted,
        report.refused,
        report.accepted as f64 / report.elapsed.as_secs_f64()
    );
}
