//! Lifetimes at a dead peer (issue 18): N messages (100, then 10,000) for
//! peer B, whose one host accepts each connection and closes it at once
//! (a dead MMSC behind a load balancer; this listener counts the
//! attempts). Relay defaults otherwise, but `queue_lifetime` short
//! (`EXPIRY_LIFETIME` seconds, default 15). Reported per N:
//!
//! - connection attempts per minute at B while the messages wait out
//!   their lifetime;
//! - the time from the end of the last message's lifetime to the last DSN
//!   at the local MMSC A (given up after `EXPIRY_WAIT` seconds, default
//!   60: then how many had come).
//!
//! `cargo bench --bench expiry`

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use mm4relay::config::Config;
use mm4relay::relay::Relay;
use mm4relay::sim::{Outgoing, SimPeer, forward_req, send_load};

const FROM: &str = "+447700900001/TYPE=PLMN@mms.mnc010.mcc001.gprs";
const TO_B: &str = "+12025550142/TYPE=PLMN@mms.mnc020.mcc001.gprs";

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A host that accepts every connection and closes it at once, counting.
struct Dead {
    addr: SocketAddr,
    accepted: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Dead {
    fn start() -> Dead {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, s) = (accepted.clone(), stop.clone());
        let thread = thread::spawn(move || {
            while !s.load(Ordering::Acquire) {
                match l.accept() {
                    Ok((c, _)) => {
                        a.fetch_add(1, Ordering::Relaxed);
                        drop(c);
                    }
                    Err(_) => thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Dead {
            addr,
            accepted,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Dead {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(n: usize, lifetime: Duration, wait: Duration) {
    let a = SimPeer::start(false).unwrap();
    let c = SimPeer::start(false).unwrap();
    let b = Dead::start();
    let dir = tempfile::tempdir().unwrap();
    let ini = format!(
        "[relay]\nhostname = relay.bench\nlog_level = warn\nqueue_lifetime = {}s\n\
         spool_dir = {}\ncontrol_socket =\n\n[listener]\nlisten = 127.0.0.1:0\n\n\
         [peer.A]\nhosts = {}\ndomains = mms.mnc010.mcc001.gprs\nprefixes = +447700900\nlocal = yes\n\n\
         [peer.B]\nhosts = {}\ndomains = mms.mnc020.mcc001.gprs\nprefixes = +1202555\n\n\
         [peer.C]\nhosts = {}\ndomains = mms.mnc456.mcc999.gprs\nprefixes = +61491570\n",
        lifetime.as_secs(),
        dir.path().join("spool").display(),
        a.addr(),
        b.addr,
        c.addr(),
    );
    let config = Config::parse(&ini, Path::new("expiry.ini")).unwrap();
    let relay = Relay::start(&config).unwrap();
    let target = relay.local_addrs()[0];
    let msgs: Vec<Outgoing> = (0..n)
        .map(|i| Outgoing {
            from: FROM.into(),
            rcpts: vec![TO_B.into()],
            data: forward_req(i, TO_B, 2048),
        })
        .collect();
    let start = Instant::now();
    let report = send_load(target, 8, Arc::new(msgs));
    assert_eq!(report.accepted, n, "{report:?}");
    let lifetime_end = Instant::now() + lifetime;
    // Attempts while the messages wait out their lifetime.
    thread::sleep(lifetime_end.saturating_duration_since(Instant::now()));
    let window = start.elapsed();
    let attempts = b.accepted.load(Ordering::Relaxed);
    let per_minute = attempts as f64 * 60.0 / window.as_secs_f64();
    let give_up = lifetime_end + wait;
    let dsns = loop {
        let got = a.recipients();
        if got >= n as u64 || Instant::now() > give_up {
            break got;
        }
        thread::sleep(Duration::from_millis(5));
    };
    let last_dsn = if dsns >= n as u64 {
        format!(
            "{:>8.3} s",
            Instant::now().duration_since(lifetime_end).as_secs_f64()
        )
    } else {
        format!("none in {} s ({dsns} of {n})", wait.as_secs())
    };
    let failed = relay.peer_snapshots()[1].failed;
    println!(
        "{n:>6} queued  {attempts:>5} attempts in {:>5.1} s = {per_minute:>7.1}/min   lifetime end to last DSN: {last_dsn}   B failed {failed}",
        window.as_secs_f64()
    );
    relay.shutdown();
    a.stop();
    c.stop();
}

fn main() {
    let lifetime = Duration::from_secs(env_or("EXPIRY_LIFETIME", 15));
    let wait = Duration::from_secs(env_or("EXPIRY_WAIT", 60));
    println!(
        "expiry: peer B accepts and closes every connection; queue_lifetime {} s, relay defaults otherwise",
        lifetime.as_secs()
    );
    for n in [100, 10_000] {
        run(n, lifetime, wait);
    }
}
