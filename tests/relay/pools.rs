//! Connection pools and balancing: few persistent connections for many
//! messages, recycling after max_messages_per_connection, max_rate, the
//! allowance growing with the backlog, and the global connection budget.

use std::time::Duration;

use mm4relay::sim::{Fault, send_load};

use crate::support::*;

#[test]
fn many_messages_use_few_persistent_connections() {
    let mut h = Harness::with(Profile {
        max_connections: [2, 3, 2],
        ..Profile::default()
    });
    let n = 600;
    let report = send_load(h.addr, 6, load(&[TO_B], n));
    assert_eq!(report.accepted, n);
    assert!(h.sims[1].wait_for_recipients(n as u64, DEADLINE));
    // The sink counts before it answers: wait for the relay to hear the 250s.
    wait_until("B's sent counter", || h.peer(1).sent == n as u64);
    h.stop_relay();
    let b = &h.sims[1];
    assert!(
        b.connections() <= 3,
        "{} connections to B for {n} messages",
        b.connections()
    );
    assert!(b.max_open() <= 3);
    // The idle peers hold exactly their pre-established min_connections.
    assert_eq!(h.sims[0].connections(), 1);
    assert_eq!(h.sims[2].connections(), 1);
}

#[test]
fn a_connection_is_recycled_after_max_messages() {
    let mut h = Harness::with(Profile {
        min_connections: [1, 1, 1],
        max_connections: [4, 1, 4],
        extra_peer: ["", "max_messages_per_connection = 10", ""],
        ..Profile::default()
    });
    let n = 50;
    assert_eq!(send_load(h.addr, 2, load(&[TO_B], n)).accepted, n);
    assert!(h.sims[1].wait_for_recipients(n as u64, DEADLINE));
    h.stop_relay();
    // One worker, ten messages a connection: five connections, all used up.
    assert_eq!(
        h.sims[1].connections(),
        5,
        "{} connections",
        h.sims[1].connections()
    );
    assert_eq!(h.sims[1].max_open(), 1);
}

#[test]
fn max_rate_caps_the_delivery_rate() {
    let mut h = Harness::with(Profile {
        max_connections: [4, 4, 4],
        extra_peer: ["", "max_rate = 40", ""],
        ..Profile::default()
    });
    let n = 120;
    assert_eq!(send_load(h.addr, 4, load(&[TO_B], n)).accepted, n);
    assert!(h.sims[1].wait_for_recipients(n as u64, DEADLINE));
    h.stop_relay();
    let got = h.sims[1].received();
    let span = got
        .last()
        .unwrap()
        .at
        .duration_since(got[0].at)
        .as_secs_f64();
    // A burst of 40, then 40 a second: the other 80 need two seconds at least.
    let rate = (n - 40) as f64 / span;
    eprintln!("max_rate = 40: {n} messages over {span:.2}s, {rate:.1}/s after the burst");
    assert!(rate <= 40.0 * 1.1, "{rate:.1} msgs/s over max_rate 40");
}

#[test]
fn allowance_grows_with_backlog_and_falls_back_when_idle() {
    let mut h = Harness::with(Profile {
        extra_peer: ["", "idle_timeout = 300ms", ""],
        ..Profile::default()
    });
    h.sims[1].set_fault(Fault::Delay(Duration::from_millis(20)));
    assert_eq!(h.peer(1).allowance, 1, "starts at min_connections");
    let n = 120;
    assert_eq!(send_load(h.addr, 8, load(&[TO_B], n)).accepted, n);
    wait_until("B to reach its max under backlog", || {
        h.peer(1).allowance == 4
    });
    assert!(h.sims[1].wait_for_recipients(n as u64, DEADLINE));
    wait_until("B to fall back to its min when idle", || {
        h.peer(1).allowance == 1
    });
    h.stop_relay();
    assert!(h.sims[1].max_open() <= 4);
    assert!(h.sims[1].max_open() >= 3, "the extra connections were used");
}

#[test]
fn the_budget_caps_connections_across_all_peers() {
    let mut h = Harness::with(Profile {
        budget: 5,
        ..Profile::default()
    });
    for sim in &h.sims {
        sim.set_fault(Fault::Delay(Duration::from_millis(5)));
    }
    let n = 240;
    assert_eq!(
        send_load(h.addr, 8, load(&[TO_A, TO_B, TO_C], n)).accepted,
        n
    );
    for sim in &h.sims {
        assert!(sim.wait_for_recipients(n as u64 / 3, DEADLINE));
    }
    h.stop_relay();
    assert!(
        h.gauge.max() <= 5,
        "{} connections open at once over a budget of 5",
        h.gauge.max()
    );
    assert!(h.gauge.max() >= 4, "the budget above the mins was used");
}
