//! Duplicate detection: a message sent again is acknowledged and not
//! delivered twice, across a restart and after the spool has drained.

use mm4relay::sim::{Fault, forward_req};

use crate::support::*;

/// Another subscriber at B, a recipient the resent PDUs never had.
const OTHER_B: &str = "+12025550199/TYPE=PLMN@mms.mnc020.mcc001.gprs";

#[test]
fn a_resent_message_is_acknowledged_but_not_delivered_twice() {
    let mut h = Harness::start();
    let body = forward_req(42, TO_B, 600);
    let mut c = h.client(LOCAL);
    assert!(
        send_message(&mut c, FROM, &[TO_B], &body)
            .text()
            .contains("queued as")
    );
    let again = send_message(&mut c, FROM, &[TO_B], &body);
    assert_eq!(again.code, 250);
    assert!(again.text().contains("duplicate"), "{again}");
    // A new recipient of the same PDU is not a duplicate.
    assert!(
        send_message(&mut c, FROM, &[TO_B, OTHER_B], &body)
            .text()
            .contains("queued as")
    );
    assert!(h.sims[1].wait_for_recipients(2, DEADLINE));
    assert_eq!(h.stop_relay().undelivered, 0);
    assert_eq!(h.sims[1].recipients(), 2);
}

/// The likeliest moment to lose our 250 is a crash or restart: the
/// duplicate window survives it. The message was delivered before the
/// restart, yet its records are still in the spool (another message keeps
/// the segment), and the resent copy is answered 250 and not delivered.
#[test]
fn a_message_resent_after_a_restart_is_still_a_duplicate() {
    let mut h = Harness::start();
    // C stays down, so the segment with B's message is not cleaned away.
    h.sims[2].set_fault(Fault::TempFail);
    let body = forward_req(43, TO_B, 600);
    let mut c = h.client(LOCAL);
    send_forward(&mut c, 44, TO_C, 600);
    assert!(
        send_message(&mut c, FROM, &[TO_B], &body)
            .text()
            .contains("queued as")
    );
    assert!(h.sims[1].wait_for_recipients(1, DEADLINE));
    drop(c);
    h.restart();
    let mut c = h.client(LOCAL);
    let again = send_message(&mut c, FROM, &[TO_B], &body);
    assert_eq!(again.code, 250);
    assert!(again.text().contains("duplicate"), "{again}");
    // Not a duplicate: the same PDU for a recipient it never had.
    assert!(
        send_message(&mut c, FROM, &[OTHER_B], &body)
            .text()
            .contains("queued as")
    );
    assert!(h.sims[1].wait_for_recipients(2, DEADLINE));
    h.sims[2].set_fault(Fault::None);
    h.control("queue retry C");
    assert!(h.sims[2].wait_for_recipients(1, DEADLINE));
    assert_eq!(h.stop_relay().undelivered, 0);
    assert_eq!(
        h.sims[1].recipients(),
        2,
        "B got the PDU once per recipient"
    );
}

#[test]
fn a_message_resent_after_a_clean_restart_is_a_duplicate_even_once_drained() {
    let mut h = Harness::start();
    let body = forward_req(45, TO_B, 600);
    let mut c = h.client(LOCAL);
    assert!(
        send_message(&mut c, FROM, &[TO_B], &body)
            .text()
            .contains("queued as")
    );
    assert!(h.sims[1].wait_for_recipients(1, DEADLINE));
    // Delivered and cleaned away: the journal no longer knows the message.
    wait_until("the spool to drain", || h.spool_bytes() == 0);
    drop(c);
    h.restart();
    let mut c = h.client(LOCAL);
    let again = send_message(&mut c, FROM, &[TO_B], &body);
    assert!(again.text().contains("duplicate"), "{again}");
    assert_eq!(h.stop_relay().undelivered, 0);
    assert_eq!(h.sims[1].recipients(), 1, "B got the PDU twice");
}
