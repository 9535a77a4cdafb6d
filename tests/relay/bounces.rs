//! Permanent failures: a 5xx is not retried, the message is kept in the
//! failed area, and its sender gets a delivery status notification.

use mm4relay::sim::{Fault, forward_req};

use crate::support::*;

#[test]
fn a_permanent_failure_is_not_retried() {
    let mut h = Harness::start();
    h.sims[1].set_fault(Fault::PermFail);
    let mut c = h.client(LOCAL);
    for i in 0..3 {
        send_forward(&mut c, i, TO_B, 500);
    }
    wait_until("3 failures at B", || h.peer(1).failed == 3);
    // The sender, at the local MMSC, hears of each: three DSNs to A.
    assert!(h.sims[0].wait_for_recipients(3, DEADLINE));
    assert_eq!(h.peer(1).deferred, 0, "a 5xx was retried");
    assert_eq!(h.sims[1].recipients(), 0);
    assert_eq!(h.stop_relay().undelivered, 0);
}

#[test]
fn a_failed_message_is_kept_and_its_sender_notified() {
    use mail_parser::{MessageParser, MimeHeaders};
    let mut h = Harness::start();
    h.sims[1].set_fault(Fault::PermFail);
    let mut c = h.client(LOCAL);
    send_forward(&mut c, 7, TO_B, 600);
    // The sender is a local subscriber: the notification goes to A.
    assert!(h.sims[0].wait_for_recipients(1, DEADLINE));
    let dsn = h.sims[0].received().remove(0);
    assert_eq!(dsn.from, "", "a notification has the null sender");
    assert_eq!(dsn.rcpts, [FROM]);
    let parsed = MessageParser::default()
        .parse(&dsn.data[..])
        .expect("DSN parses");
    let ct = parsed.content_type().unwrap();
    assert_eq!((ct.ctype(), ct.subtype()), ("multipart", Some("report")));
    assert_eq!(ct.attribute("report-type"), Some("delivery-status"));
    let status = parsed
        .parts
        .iter()
        .find(|p| {
            p.content_type()
                .is_some_and(|c| c.subtype() == Some("delivery-status"))
        })
        .expect("a message/delivery-status part");
    let text =
        String::from_utf8_lossy(&dsn.data[status.offset_body as usize..status.offset_end as usize])
            .into_owned();
    assert!(
        text.contains(&format!("Final-Recipient: rfc822; {TO_B}")),
        "{text}"
    );
    assert!(
        text.contains("Action: failed") && text.contains("Status: 5.0.0"),
        "{text}"
    );
    // The host that gave the 5xx, not the peer's name (B).
    assert!(text.contains("Remote-MTA: dns; 127.0.0.1\r\n"), "{text}");
    assert!(parsed.parts.iter().any(|p| {
        p.content_type()
            .is_some_and(|c| c.subtype() == Some("rfc822-headers"))
    }));

    // No notification about a notification: a null sender's failure is only kept.
    assert_eq!(
        send_message(&mut c, "", &[TO_B], &forward_req(8, TO_B, 600)).code,
        250
    );
    wait_until("both failures at B", || h.peer(1).failed == 2);
    let stop = h.stop_relay();
    assert_eq!(
        h.sims[0].recipients() + stop.undelivered as u64,
        1,
        "one notification in all"
    );
    let failed: Vec<String> = std::fs::read_dir(h.spool.path().join("failed"))
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect();
    assert_eq!(failed.len(), 2);
    assert!(
        failed
            .iter()
            .all(|f| f.contains("X-Mm4relay-Peer: B") && f.contains("X-Mms-Message-Type"))
    );
}
