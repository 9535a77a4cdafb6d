//! RCPT latency with ENUM (issue 14): one session sends RCPT after RCPT to
//! an in-process relay, and the median and 99th percentile of the reply
//! time are reported for ENUM off (the baseline), ENUM on with every
//! answer in the cache (one number over and over), and ENUM on with every
//! look-up a miss (a new number each time, each with its NAPTR record on a
//! DNS server on loopback). Ratios are against the baseline of the same run.
//!
//! The three modes run in turn, `ENUM_ROUNDS` times (default 3), so that
//! the machine's noise falls on all of them alike.
//!
//! `cargo bench --bench enum`; `ENUM_RCPTS` (default 5000) per mode.

mod common;

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{PEERS, env_or};
use hickory_proto::rr::RecordType;
use mm4relay::config::Config;
use mm4relay::dns::naptr::enum_name;
use mm4relay::dns::server::{DnsServer, Reply, mms_naptr};
use mm4relay::relay::Relay;
use mm4relay::sim::SimPeer;

const SUFFIX: &str = "e164.bench";

/// The `i`th number of A's prefix.
fn number(i: usize) -> String {
    format!("+447700{:06}", 100_000 + i)
}

/// Sends `numbers` as RCPTs over one session; the reply times, sorted.
fn rcpt_times(relay: &Relay, numbers: &[String]) -> Vec<Duration> {
    let s = TcpStream::connect(relay.local_addrs()[0]).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    let mut reply = |r: &mut BufReader<TcpStream>| loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        if line.as_bytes().get(3) != Some(&b'-') {
            return line[..3].to_string();
        }
    };
    reply(&mut r);
    let mut cmd = |w: &mut TcpStream, r: &mut BufReader<TcpStream>, c: &str| {
        w.write_all(c.as_bytes()).unwrap();
        reply(r)
    };
    cmd(&mut w, &mut r, "EHLO bench.test\r\n");
    let from = "MAIL FROM:<+447700900001/TYPE=PLMN@mms.mnc010.mcc001.gprs>\r\n";
    cmd(&mut w, &mut r, from);
    let mut times = Vec::with_capacity(numbers.len());
    for (i, n) in numbers.iter().enumerate() {
        if i > 0 && i % 100 == 0 {
            cmd(&mut w, &mut r, "RSET\r\n");
            cmd(&mut w, &mut r, from);
        }
        let line = format!("RCPT TO:<{n}/TYPE=PLMN@mms.mnc010.mcc001.gprs>\r\n");
        let t = Instant::now();
        let code = cmd(&mut w, &mut r, &line);
        times.push(t.elapsed());
        assert_eq!(code, "250", "RCPT {n}");
    }
    cmd(&mut w, &mut r, "QUIT\r\n");
    times.sort();
    times
}

fn main() {
    let n = env_or("ENUM_RCPTS", 5000);
    let dns = DnsServer::start().unwrap();
    let cold: Vec<String> = (0..n).map(number).collect();
    for num in &cold {
        dns.set(
            &enum_name(num, SUFFIX),
            RecordType::NAPTR,
            Reply::Records(vec![mms_naptr(10, 10, PEERS[2].1)], 3600),
        );
    }
    let hot = vec![number(0); n];
    let sims = [0, 1, 2].map(|_| SimPeer::start(false).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let mut base = format!(
        "[relay]\nhostname = relay.bench\nlog_level = warn\nspool_dir = {}\ncontrol_socket =\n\n\
         [listener]\nlisten = 127.0.0.1:0\n\n",
        dir.path().join("spool").display()
    );
    for (i, (name, domain, prefix)) in PEERS.into_iter().enumerate() {
        let _ = write!(
            base,
            "[peer.{name}]\nhosts = {}\ndomains = {domain}\nprefixes = {prefix}\n\n",
            sims[i].addr()
        );
    }
    let with_enum = format!(
        "{base}[dns]\nservers = {}\n\n[enum]\ndomain = {SUFFIX}\n",
        dns.addr()
    );
    let rounds = env_or("ENUM_ROUNDS", 3);
    println!("enum: {n} RCPTs per mode over one session, {rounds} rounds");
    let modes = [
        ("ENUM off", &base, &hot),
        ("ENUM on, cache hits", &with_enum, &hot),
        ("ENUM on, cache misses", &with_enum, &cold),
    ];
    let mut ratios = [Vec::new(), Vec::new()];
    for round in 1..=rounds {
        let mut off = None;
        for (m, (label, ini, numbers)) in modes.iter().enumerate() {
            // A new relay each time: a new resolver, its cache empty.
            let config = Config::parse(ini, std::path::Path::new("enum-bench.ini")).unwrap();
            let relay = Relay::start(&config).unwrap();
            let times = rcpt_times(&relay, numbers);
            relay.shutdown();
            let median = times[times.len() / 2];
            let p99 = times[times.len() * 99 / 100];
            let ratio = match off {
                None => {
                    off = Some(median);
                    String::new()
                }
                Some(b) => {
                    let r = median.as_secs_f64() / Duration::as_secs_f64(&b);
                    ratios[m - 1].push(r);
                    format!(", ratio to ENUM off {r:.2}")
                }
            };
            println!(
                "{round:>2} {label:<22} median {:>6.1} us, p99 {:>6.1} us{ratio}",
                median.as_secs_f64() * 1e6,
                p99.as_secs_f64() * 1e6
            );
        }
    }
    for (label, mut r) in ["cache hits", "cache misses"].into_iter().zip(ratios) {
        r.sort_by(f64::total_cmp);
        println!(
            "median ratio ENUM on, {label} / ENUM off: {:.2}",
            r[r.len() / 2]
        );
    }
    println!("DNS queries answered by the test server: {}", dns.queries());
}
