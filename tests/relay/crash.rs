//! Crash safety of the real binary: under load it is killed with SIGKILL
//! at random moments and restarted on the same spool, then left to drain.
//! Every message that got 250 must arrive; a message that did not get 250
//! may arrive only if it was in flight at a kill (committed, reply lost);
//! duplicates are counted and bounded by what was in flight at the kills.
//! One peer defers everything until the last run, with small segments, so
//! compaction copies its messages forward between and across the kills.
//! CDRs are on: every delivered recipient has exactly one final row, and
//! a second row only where the peer got the message twice.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mm4relay::peer::{Connection, Delivery, Security, Timeouts};
use mm4relay::sim::{Fault, Outgoing, SimPeer, forward_req};
use parking_lot::{Condvar, Mutex};

use crate::support::*;

const SENDERS: usize = 8;
const KILLS: usize = 3;

/// Where the relay listens now; `None` while it is down.
type Current = (Mutex<Option<SocketAddr>>, Condvar);

/// True once the sinks have anything new since this was first asked.
fn relay_took_some(sims: &[SimPeer; 3]) -> bool {
    static BASE: Mutex<Option<u64>> = Mutex::new(None);
    let now: u64 = sims.iter().map(SimPeer::recipients).sum();
    let base = *BASE.lock().get_or_insert(now);
    now > base + 100
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
    // C defers everything until the last run, so its messages stay in
    // segments whose other messages are done: with small segments the
    // spool compacts (copies them forward) all through the kills.
    sims[2].set_fault(Fault::TempFail);
    let ini = Profile {
        extra_relay: "spool_segment_size = 16384".into(),
        extra_sections: "[cdr]\ndir = {spool}/cdr\n".into(),
        ..Profile::default()
    }
    .ini(
        [sims[0].addr(), sims[1].addr(), sims[2].addr()],
        &dir.path().join("spool"),
    );
    std::fs::write(&config, ini).unwrap();

    let rcpts = [TO_A, TO_B, TO_C];
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
                        from: FROM.into(),
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
                        conn = Connection::open(
                            &addr.to_string(),
                            "crash.test",
                            &timeouts,
                            &Security::plain(),
                        )
                        .ok();
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
    let mut kills: Vec<Instant> = Vec::new();
    let mut compactions = 0;
    for _ in 0..KILLS {
        let mut relay = Running::start(&config, &[], true);
        let (addr, _, log) = relay.listening();
        *current.0.lock() = Some(addr);
        current.1.notify_all();
        rng = rng
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let run_for = Duration::from_millis(100 + (rng >> 33) % 400);
        // Not synchronisation: this picks the moment of the kill.
        thread::sleep(run_for);
        *current.0.lock() = None;
        drop(relay); // SIGKILL, and waits for the process to be gone
        kills.push(Instant::now());
        let log = log.join().unwrap();
        compactions += log.iter().filter(|l| l.contains("compacting")).count();
    }
    let mut relay = Running::start(&config, &[], true);
    let (addr, _, log) = relay.listening();
    *current.0.lock() = Some(addr);
    current.1.notify_all();
    // Some load on the last run too, then no more.
    wait_until("traffic after the last restart", || relay_took_some(&sims));
    sims[2].set_fault(Fault::None);
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
    let clean = relay.terminate().success();
    let log = log.join().unwrap();
    assert!(clean, "relay did not exit 0: {log:?}");
    assert!(compactions > 0, "the killed runs never compacted");

    let mut arrivals: HashMap<String, usize> = HashMap::new();
    let mut times: HashMap<String, Vec<Instant>> = HashMap::new();
    for r in sims.iter().flat_map(|s| s.received()) {
        let tid = tid_of(&r.data);
        *arrivals.entry(tid.clone()).or_default() += 1;
        times.entry(tid).or_default().push(r.at);
    }
    // A second delivery needs a kill between the two: without a crash,
    // nothing is sent twice.
    for (tid, mut at) in times {
        at.sort();
        for pair in at.windows(2) {
            assert!(
                kills.iter().any(|k| pair[0] <= *k && *k <= pair[1]),
                "{tid} arrived twice with no kill in between"
            );
        }
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

    // The CDRs: exactly one final row per delivered recipient, a second
    // only for a second delivery, none for what never arrived.
    let rows = crate::cdr::rows_in(&dir.path().join("spool/cdr"), ".csv");
    assert!(
        crate::cdr::rows_in(&dir.path().join("spool/cdr"), ".csv.open").is_empty(),
        "a clean stop leaves no open file"
    );
    let ids: HashSet<&str> = rows.iter().map(|r| r["cdr_id"].as_str()).collect();
    assert_eq!(ids.len(), rows.len(), "a row written twice");
    let mut finals: HashMap<String, usize> = HashMap::new();
    for r in rows
        .iter()
        .filter(|r| r["event"] == "sent" || r["event"] == "failed")
    {
        assert_eq!(r["event"], "sent", "nothing fails here: {r:?}");
        *finals.entry(r["transaction_id"].clone()).or_default() += 1;
    }
    let lost: Vec<&String> = arrivals
        .keys()
        .filter(|t| !finals.contains_key(*t))
        .collect();
    let invented: Vec<&String> = finals
        .keys()
        .filter(|t| !arrivals.contains_key(*t))
        .collect();
    let extra_rows: usize = finals.values().map(|n| n - 1).sum();
    for (tid, n) in &finals {
        let got = arrivals.get(tid).copied().unwrap_or(0);
        assert!(*n <= got, "{tid}: {n} sent rows for {got} deliveries");
    }
    eprintln!(
        "crash test CDRs: {KILLS} kills, {} rows ({} final), {} lost, {} invented, \
         {extra_rows} second sent rows for {duplicates} duplicate deliveries",
        rows.len(),
        finals.values().sum::<usize>(),
        lost.len(),
        invented.len()
    );
    assert!(lost.is_empty(), "delivered without a row: {lost:?}");
    assert!(
        invented.is_empty(),
        "a row for what never arrived: {invented:?}"
    );
    assert!(want.iter().all(|t| finals.contains_key(t)));
}
