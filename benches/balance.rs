//! The balancer under three scenarios, relay in-process with three
//! simulated MMSCs on loopback:
//!
//! 1. **Isolation**: traffic spread evenly over A, B and C; C healthy, then
//!    never greeting, then answering every DATA after 2 s. Reported: the
//!    combined rate to A and B as a ratio of the all-healthy run.
//! 2. **Adaptation**: traffic moves from A to B. Reported: balancer ticks
//!    until B's allowance reaches its max, and the most connections open
//!    at once across all peers against the budget.
//! 3. **Fairness**: A has a backlog of `FAIR_BACKLOG` (default 100,000)
//!    messages while B gets 50 messages/s. Reported: B's p50/p99 delivery
//!    latency (from the start of its SMTP transaction to the relay, to its
//!    arrival at B).
//!
//! `cargo bench --bench balance`

mod common;

use std::path::Path;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::{PEERS, env_or};
use mm4relay::config::Config;
use mm4relay::relay::Relay;
use mm4relay::sim::{Fault, Gauge, Outgoing, SimPeer, forward_req, send_load};

const RCPT: [&str; 3] = [
    "+447700900123/TYPE=PLMN@mms.mnc010.mcc001.gprs",
    "+12025550142/TYPE=PLMN@mms.mnc020.mcc001.gprs",
    "+61491570156/TYPE=PLMN@mms.mnc456.mcc999.gprs",
];
const INTERVAL: Duration = Duration::from_millis(500);

struct Setup {
    relay: Relay,
    sims: [SimPeer; 3],
    gauge: Arc<Gauge>,
    _dir: tempfile::TempDir,
}

fn setup(budget: usize, min: usize, max: usize, keep: [bool; 3]) -> Setup {
    let gauge = Arc::new(Gauge::default());
    let sims = keep.map(|k| SimPeer::start_in(k, Some(gauge.clone())).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let mut ini = format!(
        "[relay]\nhostname = relay.bench\nmax_connections = {budget}\nlog_level = warn\nretry_min = 1s\n\
         spool_dir = {}\ncontrol_socket =\nbalance_interval = {}ms\n\n[listener]\nlisten = 127.0.0.1:0\nmax_sessions = 64\n\n",
        dir.path().join("spool").display(),
        INTERVAL.as_millis()
    );
    for (i, (name, domain, prefix)) in PEERS.into_iter().enumerate() {
        ini.push_str(&format!(
            "[peer.{name}]\nhosts = {}\ndomains = {domain}\nprefixes = {prefix}\nmin_connections = {min}\n\
             max_connections = {max}\npool_size = 1000\nconnect_timeout = 2s\nhelo_timeout = 3s\n\
             data_done_timeout = 10s\nidle_timeout = 2s\n\n",
            sims[i].addr()
        ));
    }
    let config = Config::parse(&ini, Path::new("bench.ini")).unwrap();
    let relay = Relay::start(&config).unwrap();
    Setup {
        relay,
        sims,
        gauge,
        _dir: dir,
    }
}

fn messages(n: usize, peers: &[usize]) -> Arc<Vec<Outgoing>> {
    Arc::new(
        (0..n)
            .map(|i| {
                let rcpt = RCPT[peers[i % peers.len()]];
                Outgoing {
                    from: "+447700900001/TYPE=PLMN@mms.mnc010.mcc001.gprs".into(),
                    rcpts: vec![rcpt.to_string()],
                    data: forward_req(i, rcpt, 2048),
                }
            })
            .collect(),
    )
}

/// Rate to A and B together, with C behaving as `fault`.
fn isolation_run(fault: Fault, n: usize) -> f64 {
    let s = setup(24, 1, 8, [false; 3]);
    s.sims[2].set_fault(fault);
    let addr = s.relay.local_addrs()[0];
    let start = Instant::now();
    let load = thread::spawn(move || send_load(addr, 16, messages(n, &[0, 1, 2])));
    let each = (n / 3) as u64;
    assert!(s.sims[0].wait_for_recipients(each, Duration::from_secs(300)));
    assert!(s.sims[1].wait_for_recipients(each, Duration::from_secs(300)));
    let rate = (2 * each) as f64 / start.elapsed().as_secs_f64();
    load.join().unwrap();
    s.relay.shutdown();
    rate
}

fn isolation() {
    let n = env_or("ISOLATION_MESSAGES", 9000);
    let healthy = isolation_run(Fault::None, n);
    println!("isolation: A+B {healthy:.0} msg/s with C healthy (baseline)");
    for (name, fault) in [
        ("never greets", Fault::NoGreeting),
        (
            "answers DATA after 2 s",
            Fault::Delay(Duration::from_secs(2)),
        ),
    ] {
        let rate = isolation_run(fault, n);
        println!(
            "isolation: A+B {rate:.0} msg/s with C that {name}: ratio {:.2}",
            rate / healthy
        );
    }
}

fn adaptation() {
    let (budget, max) = (8, 6);
    let s = setup(budget, 1, max, [false; 3]);
    for sim in &s.sims {
        sim.set_fault(Fault::Delay(Duration::from_millis(5)));
    }
    let addr = s.relay.local_addrs()[0];
    let a = send_load(addr, 16, messages(2000, &[0]));
    assert_eq!(a.accepted, 2000);
    let start = Instant::now();
    let load = thread::spawn(move || send_load(addr, 16, messages(8000, &[1])));
    let mut reached = None;
    let mut most = 0;
    while start.elapsed() < Duration::from_secs(60) {
        let snaps = s.relay.peer_snapshots();
        most = most.max(snaps.iter().map(|p| p.allowance).sum::<usize>());
        if snaps[1].allowance == max && reached.is_none() {
            reached = Some(start.elapsed());
        }
        if reached.is_some() && s.sims[1].recipients() >= 8000 {
            break;
        }
        thread::sleep(Duration::from_millis(10));
    }
    load.join().unwrap();
    let ticks = reached.map_or(f64::NAN, |d| d.as_secs_f64() / INTERVAL.as_secs_f64());
    println!(
        "adaptation: B reached its max of {max} after {ticks:.1} ticks of {}ms; \
         allowances summed to at most {most}, connections open at once at most {} (budget {budget})",
        INTERVAL.as_millis(),
        s.gauge.max()
    );
    s.relay.shutdown();
}

fn fairness() {
    let backlog = env_or("FAIR_BACKLOG", 100_000);
    let s = setup(16, 1, 8, [false, true, false]);
    s.sims[0].set_fault(Fault::Delay(Duration::from_millis(5)));
    let addr = s.relay.local_addrs()[0];
    let filled = Instant::now();
    let fill = send_load(addr, 16, messages(backlog, &[0]));
    println!(
        "fairness: {} messages for A accepted in {:.1}s; A has received {} so far",
        fill.accepted,
        filled.elapsed().as_secs_f64(),
        s.sims[0].recipients()
    );
    // B: 50 messages a second for 10 seconds, each timed from its 250.
    let b = messages(500, &[1]);
    let mut sent_at = Vec::new();
    let start = Instant::now();
    for (i, m) in b.iter().enumerate() {
        let due = start + Duration::from_millis(20 * i as u64);
        thread::sleep(due.saturating_duration_since(Instant::now()));
        let one = Arc::new(vec![m.clone()]);
        sent_at.push(Instant::now());
        let r = send_load(addr, 1, one);
        assert_eq!(r.accepted, 1);
    }
    assert!(s.sims[1].wait_for_recipients(500, Duration::from_secs(60)));
    // Latency per message: its sending began to its arrival at B.
    let mut lat: Vec<f64> = s.sims[1]
        .received()
        .iter()
        .map(|r| {
            let text = String::from_utf8_lossy(&r.data);
            let tid = text.split("X-Mms-Transaction-ID: T").nth(1).unwrap();
            let i: usize = tid[..8].parse().unwrap();
            r.at.saturating_duration_since(sent_at[i]).as_secs_f64() * 1000.0
        })
        .collect();
    lat.sort_by(f64::total_cmp);
    println!(
        "fairness: B at 50 msg/s while A works off its backlog: delivery latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; \
         A still had {} to go",
        lat[lat.len() / 2],
        lat[lat.len() * 99 / 100],
        lat[lat.len() - 1],
        backlog as u64 - s.sims[0].recipients()
    );
    s.relay.shutdown();
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("balance: run with `cargo bench --bench balance`");
        return;
    }
    isolation();
    adaptation();
    fairness();
}
