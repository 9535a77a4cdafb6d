//! Crash safety of the real binary: under load it is killed with SIGKILL
//! at random moments and restarted on the same spool, then left to drain.
//! Every message that got 250 must arrive; a message that did not get 250
//! may arrive only if it was in flight at a kill (committed, reply lost);
//! duplicates are counted and bounded by what was in flight at the kills.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mm4relay::peer::{Connection, Delivery, Timeouts};
use mm4relay::sim::{Outgoing, SimPeer, forward_req};
use parking_lot::{Condvar, Mutex};

use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_mm4relay");
const SENDERS: usize = 8;
const KILLS: usize = 3;

/// The relay as a child process, its log drained by a thread.
struct Proc {
    child: Child,
    addr: SocketAddr,
    log: Option<JoinHandle<Vec<String>>>,
}

impl Proc {
    fn start(config: &std::path::Path) -> Proc {
        let mut child = Command::new(BIN)
            .args(["run", "-c"])
            .arg(config)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let addr = loop {
            let line = lines
                .next()
                .expect("relay exited before listening")
                .unwrap();
            if let Some(rest) = line.split("listening on ").nth(1) {
                break rest.trim().parse().unwrap();
            }
        };
        let log = thread::spawn(move || lines.map_while(Result::ok).collect());
        Proc {
            child,
            addr,
            log: Some(log),
        }
    }

    fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.log.take().unwrap().join().unwrap();
    }

    fn term(mut self) -> (bool, Vec<String>) {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        let end = Instant::now() + DEADLINE;
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < end, "relay did not stop on SIGTERM");
            thread::sleep(Duration::from_millis(10));
        };
        (status.success(), self.log.take().unwrap().join().unwrap())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where the relay listens now; `None` while it is down.
type Current = (Mutex<Option<SocketAddr>>, Condvar);

/// True once the sinks have anything new since this was first asked.
fn relay_took_some(sims: &[SimPeer; 3]) -> bool {
    static BASE: Mutex<Option<u64>> = Mutex::new(None);
    let now: u64 = sims.iter().map(SimPeer::recipients).sum();
    let base = *BASE.lock().get_or_insert(now);
    now > base + 100
}

fn tid_of(data: &[u8]) -> String {
    let text = String::from_utf8_lossy(data);
    let line = text
        .lines()
        .find(|l| l.starts_with("X-Mms-Transaction-ID:"))
        .unwrap();
    line["X-Mms-Transaction-ID:".len()..].trim().to_string()
}

#[test]
fn kill_9_under_load_loses_nothing_that_got_250() {
    let sims = [
        SimPeer::start(true).unwrap(),
        SimPeer::start(true).unwrap(),
        SimPeer::start(true).unwrap(),
    ];
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("mm4relay.ini");
    let ini = Profile::default().ini(
        [sims[0].addr(), sims[1].addr(), sims[2].addr()],
        &dir.path().join("spool"),
    );
    std::fs::write(&config, ini).unwrap();

    let rcpts = [
        "+447700900123/TYPE=PLMN@mms.mnc010.mcc001.gprs",
        "+12025550142/TYPE=PLMN@mms.mnc020.mcc001.gprs",
        "+61491570156/TYPE=PLMN@mms.mnc456.mcc999.gprs",
    ];
    let acked: Arc<Mutex<HashSet<usize>>> = Arc::new(Mutex::new(HashSet::new()));
    let next = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let current: Arc<Current> = Arc::new((Mutex::new(None), Condvar::new()));

    let senders: Vec<_> = (0..SENDERS)
        .map(|_| {
            let (acked, next, current, stop) =
                (acked.clone(), next.clone(), current.clone(), stop.clone());
            thread::spawn(move || {
                let timeouts = Timeouts {
                    connect: Duration::from_secs(2),
                    helo: Duration::from_secs(5),
                    mail: Duration::from_secs(5),
                    rcpt: Duration::from_secs(5),
                    data: Duration::from_secs(5),
                    data_done: Duration::from_secs(5),
                };
                let mut conn: Option<Connection> = None;
                while !stop.load(Ordering::Acquire) {
                    let i = next.fetch_add(1, Ordering::AcqRel);
                    let rcpt = rcpts[i % 3];
                    let message = Outgoing {
                        from: "+447700900001/TYPE=PLMN@mms.mnc010.mcc001.gprs".into(),
                        rcpts: vec![rcpt.to_string()],
                        data: forward_req(i, rcpt, 1024),
                    };
                    if conn.is_none() {
                        let addr = {
                            let mut guard = current.0.lock();
                            let end = Instant::now() + DEADLINE;
                            while guard.is_none() {
                                assert!(
                                    !current.1.wait_until(&mut guard, end).timed_out(),
                                    "relay never came back"
                                );
                            }
                            guard.unwrap()
                        };
                        conn = Connection::open(&addr.to_string(), "crash.test", &timeouts).ok();
                    }
                    let Some(c) = conn.as_mut() else { continue };
                    match c.deliver(&message) {
                        Ok(Delivery::Replies(r)) if r.iter().all(|r| r.code == 250) => {
                            acked.lock().insert(i);
                        }
                        Ok(_) => {}
                        Err(_) => conn = None,
                    }
                }
            })
        })
        .collect();

    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    let mut rng = seed;
    eprintln!("crash test seed {seed}");
    for _ in 0..KILLS {
        let relay = Proc::start(&config);
        *current.0.lock() = Some(relay.addr);
        current.1.notify_all();
        rng = rng
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let run_for = Duration::from_millis(100 + (rng >> 33) % 400);
        // Not synchronisation: this picks the moment of the kill.
        thread::sleep(run_for);
        *current.0.lock() = None;
        relay.kill9();
    }
    let relay = Proc::start(&config);
    *current.0.lock() = Some(relay.addr);
    current.1.notify_all();
    // Some load on the last run too, then no more.
    wait_until("traffic after the last restart", || relay_took_some(&sims));
    stop.store(true, Ordering::Release);
    for s in senders {
        s.join().unwrap();
    }
    let total = next.load(Ordering::Acquire);
    let acked: Vec<usize> = acked.lock().iter().copied().collect();
    let want: HashSet<String> = acked.iter().map(|i| format!("T{i:08}")).collect();
    assert!(acked.iter().all(|&i| i < total));
    wait_until("every acknowledged message to arrive", || {
        let got: HashSet<String> = sims
            .iter()
            .flat_map(|s| s.received())
            .map(|r| tid_of(&r.data))
            .collect();
        want.is_subset(&got)
    });
    let (clean, log) = relay.term();
    assert!(clean, "relay did not exit 0: {log:?}");

    let mut arrivals: HashMap<String, usize> = HashMap::new();
    for r in sims.iter().flat_map(|s| s.received()) {
        *arrivals.entry(tid_of(&r.data)).or_default() += 1;
    }
    let unacked_arrived = arrivals.keys().filter(|t| !want.contains(*t)).count();
    let duplicates: usize = arrivals.values().map(|n| n - 1).sum();
    eprintln!(
        "crash test: {total} offered, {} got 250, {} arrived, {unacked_arrived} arrived without 250 \
         (committed, reply lost at a kill), {duplicates} duplicate deliveries (in flight at a kill)",
        acked.len(),
        arrivals.len()
    );
    assert!(
        acked.len() > total / 2,
        "too few messages got through to mean anything"
    );
    assert!(
        unacked_arrived <= SENDERS * KILLS,
        "{unacked_arrived} messages arrived that were never in flight"
    );
    // In flight at a kill: at most every connection of every peer, each with a chained successor.
    assert!(duplicates <= KILLS * 3 * 4 * 2, "{duplicates} duplicates");
}
