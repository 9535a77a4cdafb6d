//! CDR files: a row for every event, read back by the `csv` crate (an RFC
//! 4180 reader we did not write); RES tracking across a restart with the
//! injected clock; rotation and the file a crash left open.

use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use mm4relay::sim::{Fault, forward_req};
use mm4relay::sys::clock::ManualClock;

use crate::support::*;

/// The required columns (the contract).
pub const REQUIRED: [&str; 13] = [
    "event",
    "time",
    "queue_id",
    "pdu",
    "transaction_id",
    "message_id",
    "from",
    "to",
    "peer",
    "size",
    "status",
    "reply",
    "attempts",
];

/// One row, by column name.
pub type CsvRow = std::collections::HashMap<String, String>;

/// Every row of the files in `dir` whose names end in `suffix`, in file
/// order, checked against the header and the required columns.
pub fn rows_in(dir: &Path, suffix: &str) -> Vec<CsvRow> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let mut r = csv::ReaderBuilder::new()
            .has_headers(true)
            .from_path(&f)
            .unwrap();
        let headers: Vec<String> = r.headers().unwrap().iter().map(str::to_string).collect();
        for c in REQUIRED {
            assert!(
                headers.iter().any(|h| h == c),
                "{}: no column {c}",
                f.display()
            );
        }
        for rec in r.records() {
            let rec = rec.unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            assert_eq!(rec.len(), headers.len());
            out.push(
                headers
                    .iter()
                    .cloned()
                    .zip(rec.iter().map(str::to_string))
                    .collect(),
            );
        }
    }
    out
}

/// Rows of the closed files and of the one being written.
pub fn all_rows(dir: &Path) -> Vec<CsvRow> {
    let mut rows = rows_in(dir, ".csv");
    rows.extend(rows_in(dir, ".csv.open"));
    rows
}

fn cdr_profile(extra: &str) -> Profile {
    Profile {
        extra_sections: format!("[cdr]\ndir = {{spool}}/cdr\n{extra}\n"),
        ..Profile::default()
    }
}

fn events<'a>(rows: &'a [CsvRow], event: &str) -> Vec<&'a CsvRow> {
    rows.iter().filter(|r| r["event"] == event).collect()
}

/// A forward.REQ that asks for an MM4_forward.RES.
pub fn acked_req(seq: usize, rcpt: &str) -> Vec<u8> {
    let m = String::from_utf8(forward_req(seq, rcpt, 1024)).unwrap();
    m.replacen(
        "X-Mms-Message-Type: MM4_forward.REQ\r\n",
        "X-Mms-Message-Type: MM4_forward.REQ\r\n\
         X-Mms-Ack-Request: Yes\r\n\
         X-Mms-Originator-System: system-user@mms.mnc010.mcc001.gprs\r\n",
        1,
    )
    .into_bytes()
}

/// The MM4_forward.RES partner B sends for transaction `seq`.
pub fn res(seq: usize, status: &str) -> Vec<u8> {
    format!(
        "X-Mms-3GPP-MMS-Version: 6.8.0\r\n\
         X-Mms-Message-Type: MM4_forward.RES\r\n\
         X-Mms-Transaction-ID: T{seq:08}\r\n\
         X-Mms-Message-ID: M{seq:08}@mms.mnc010.mcc001.gprs\r\n\
         X-Mms-Request-Status-Code: {status}\r\n\
         X-Mms-Status-Text: Accepted for delivery\r\n\
         Sender: mm4@mms.mnc020.mcc001.gprs\r\n\
         To: system-user@mms.mnc010.mcc001.gprs\r\n\
         Date: Tue, 18 Mar 2025 09:15:04 +0000\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=us-ascii\r\n\
         \r\n"
    )
    .into_bytes()
}

pub const RES_FROM: &str = "mm4@mms.mnc020.mcc001.gprs";
pub const RES_TO: &str = "system-user@mms.mnc010.mcc001.gprs";

#[test]
fn every_event_is_a_row_that_reads_back_as_csv() {
    let mut h = Harness::with(cdr_profile(""));
    let dir = h.spool.path().join("cdr");
    let mut c = h.client(LOCAL);
    // Sent, to two peers at once.
    let body = forward_req(1, TO_B, 1024);
    let sent = queued_as(&send_message(&mut c, FROM, &[TO_A, TO_B], &body));
    // A duplicate of it, not queued.
    let mut d = h.client(LOCAL);
    let reply = send_message(&mut d, FROM, &[TO_B], &body);
    assert!(reply.text().contains("duplicate"), "{reply}");
    // Failed: C refuses.
    h.sims[2].set_fault(Fault::PermFail);
    let mut f = h.client(LOCAL);
    let failed = queued_as(&send_forward(&mut f, 2, TO_C, 1024));
    wait_until("C's failure", || h.peer(2).failed == 1);
    // Deferred, then deleted by an operator.
    h.sims[2].set_fault(Fault::TempFail);
    let mut g = h.client(LOCAL);
    let deleted = queued_as(&send_forward(&mut g, 3, TO_C, 1024));
    wait_until("C's deferral", || h.peer(2).deferred >= 1);
    let answer = h.control(&format!("queue delete {deleted} billing test"));
    assert!(!answer.starts_with("error"), "{answer}");
    // A also gets the failure's notification to the sender.
    wait_until("the first delivered to both", || {
        h.sims[0].recipients() >= 1 && h.sims[1].recipients() == 1
    });
    h.stop_relay();

    assert!(
        !std::fs::read_dir(&dir).unwrap().any(|e| e
            .unwrap()
            .path()
            .to_string_lossy()
            .ends_with(".open")),
        "a clean stop closes the file"
    );
    for e in std::fs::read_dir(&dir).unwrap() {
        let mode = e.unwrap().metadata().unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
    }
    let rows = rows_in(&dir, ".csv");
    let ids: HashSet<&str> = rows.iter().map(|r| r["cdr_id"].as_str()).collect();
    assert_eq!(ids.len(), rows.len(), "every cdr_id once");

    let mut sent_rows: Vec<_> = events(&rows, "sent")
        .into_iter()
        .filter(|r| r["queue_id"] == sent)
        .collect();
    sent_rows.sort_by_key(|r| r["peer"].clone());
    assert_eq!(sent_rows.len(), 2, "{rows:?}");
    for (r, (peer, to)) in sent_rows.iter().zip([("A", TO_A), ("B", TO_B)]) {
        assert_eq!(r["queue_id"], sent);
        assert_eq!((r["peer"].as_str(), r["to"].as_str()), (peer, to));
        assert_eq!(r["status"], "250");
        assert_eq!(r["attempts"], "1");
        assert_eq!(r["pdu"], "MM4_forward.REQ");
        assert_eq!(r["transaction_id"], "T00000001");
        assert_eq!(r["message_id"], "M00000001@mms.mnc010.mcc001.gprs");
        assert_eq!(r["from"], FROM);
        assert_eq!(r["origin"], "local");
        assert_eq!(r["record_type"], "MMO4FRq");
        assert!(r["size"].parse::<usize>().unwrap() > 1024);
        assert!(r["parts"].starts_with("text/plain:"), "{}", r["parts"]);
        assert!(r["time"].ends_with('Z') && r["time"] >= r["accepted"]);
    }
    let dup = events(&rows, "duplicate");
    assert_eq!(dup.len(), 1, "{rows:?}");
    assert_eq!(
        (dup[0]["to"].as_str(), dup[0]["peer"].as_str()),
        (TO_B, "B")
    );
    assert_eq!(dup[0]["queue_id"], "");
    assert_eq!(dup[0]["transaction_id"], "T00000001");
    let fail = events(&rows, "failed");
    assert_eq!(fail.len(), 1);
    assert_eq!(
        (fail[0]["queue_id"].as_str(), fail[0]["status"].as_str()),
        (failed.as_str(), "554")
    );
    let deferred = events(&rows, "deferred");
    assert!(
        deferred
            .iter()
            .any(|r| r["queue_id"] == deleted && r["status"] == "451")
    );
    let del = events(&rows, "deleted");
    assert_eq!(del.len(), 1);
    assert_eq!(
        (del[0]["queue_id"].as_str(), del[0]["peer"].as_str()),
        (deleted.as_str(), "C")
    );
    assert!(del[0]["reply"].contains("billing test"), "{:?}", del[0]);
}

/// Waits for a row with `event` and `tid` in the files of `dir`.
fn wait_row(dir: &Path, event: &str, tid: &str) -> CsvRow {
    let mut found = None;
    wait_until(&format!("a {event} row for {tid}"), || {
        found = all_rows(dir)
            .into_iter()
            .find(|r| r["event"] == event && r["transaction_id"] == tid);
        found.is_some()
    });
    found.unwrap()
}

#[test]
fn a_res_is_matched_and_a_missing_one_is_counted_across_a_restart() {
    let start = SystemTime::now();
    let clock = Arc::new(ManualClock::new(start));
    let mut h = Harness::with_clock(cdr_profile("ack_timeout = 10m"), clock.clone());
    let dir = h.spool.path().join("cdr");
    let mut c = h.client(LOCAL);
    let req = queued_as(&send_message(&mut c, FROM, &[TO_B], &acked_req(10, TO_B)));
    wait_until("B has the REQ", || h.sims[1].recipients() == 1);
    // The partner answers from its own address; the RES goes to A.
    let mut p = h.client(PARTNER_B);
    send_message(&mut p, RES_FROM, &[RES_TO], &res(10, "Ok"));
    let row = wait_row(&dir, "res", "T00000010");
    assert_eq!(row["queue_id"], req, "the REQ's queue ID");
    assert_eq!((row["peer"].as_str(), row["to"].as_str()), ("B", TO_B));
    assert_eq!(row["status"], "Ok");
    assert_eq!(row["pdu"], "MM4_forward.RES");
    assert_eq!(row["record_type"], "MMO4FRs");
    // A RES from another partner for B's transaction matches nothing.
    let status = h.control("status");
    assert!(
        status.contains("acks B: 1 asked, 1 Ok (100.0%)"),
        "{status}"
    );

    // Another one the partner never answers; the wait survives a restart.
    let mut c = h.client(LOCAL);
    send_message(&mut c, FROM, &[TO_B], &acked_req(11, TO_B));
    wait_until("B has the second REQ", || h.sims[1].recipients() == 2);
    wait_until("its wait is checkpointed", || {
        std::fs::read_to_string(h.spool.path().join("cdr-state"))
            .is_ok_and(|s| s.contains("T00000011"))
    });
    h.restart();
    clock.advance(Duration::from_secs(9 * 60));
    // Not yet due: give the ledger a few ticks to prove it waits.
    let status = h.control("status");
    assert!(status.contains("1 waiting for a RES"), "{status}");
    clock.advance(Duration::from_secs(2 * 60));
    let row = wait_row(&dir, "res_missing", "T00000011");
    assert_eq!((row["peer"].as_str(), row["to"].as_str()), ("B", TO_B));
    assert!(row["reply"].contains("600s"), "{row:?}");
    h.stop_relay();
    let rows = all_rows(&dir);
    assert_eq!(events(&rows, "res_missing").len(), 1, "once: {rows:?}");
    assert_eq!(events(&rows, "res").len(), 1);
}

#[test]
fn files_close_at_their_time_and_a_leftover_is_closed_at_start() {
    let clock = Arc::new(ManualClock::new(SystemTime::now()));
    // What a crash left: a header, one whole row, half of another.
    let header = mm4relay::cdr::row::COLUMNS.join(",");
    let mut whole = vec![String::new(); mm4relay::cdr::row::COLUMNS.len()];
    whole[0] = "sent".into();
    whole[13] = "1.0".into();
    let mut h = Harness::with_clock(cdr_profile("rotate = 1h"), clock.clone());
    let dir = h.spool.path().join("cdr");
    // Left in the CDR directory by the last run.
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("mm4relay-20260101T000000Z-00000000000000000001.csv.open"),
        format!("{header}\n{}\nsent,2026-01-0", whole.join(",")),
    )
    .unwrap();
    h.restart();
    let closed = dir.join("mm4relay-20260101T000000Z-00000000000000000001.csv");
    let text = std::fs::read_to_string(&closed).expect("the leftover is closed at start");
    assert!(
        text.ends_with('\n') && text.lines().count() == 2,
        "{text:?}"
    );

    let mut c = h.client(LOCAL);
    let first = queued_as(&send_forward(&mut c, 1, TO_B, 512));
    let open_files = || {
        std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().ends_with(".open"))
            .count()
    };
    wait_until("the row in the open file", || {
        rows_in(&dir, ".csv.open")
            .iter()
            .any(|r| r["event"] == "sent")
    });
    assert_eq!(
        rows_in(&dir, ".csv").len(),
        1,
        "only the leftover's row is closed"
    );
    clock.advance(Duration::from_secs(3600));
    wait_until("the file closed at the hour", || open_files() == 0);
    let rows = rows_in(&dir, ".csv");
    assert_eq!(events(&rows, "sent").len(), 2);
    let mut c = h.client(LOCAL);
    let second = queued_as(&send_forward(&mut c, 2, TO_B, 512));
    wait_until("a new file for the new hour", || open_files() == 1);
    h.stop_relay();
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 3, "{names:?}");
    assert!(names.iter().all(|n| n.ends_with(".csv")), "{names:?}");
    let ids: Vec<String> = rows_in(&dir, ".csv")
        .iter()
        .map(|r| r["cdr_id"].clone())
        .collect();
    assert_eq!(ids.len(), 3);
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 3, "{ids:?}");

    // trace finds both messages of the number across the rotated files,
    // in time order, and one message by its transaction ID.
    let trace = |what: &str| {
        let out = std::process::Command::new(BIN)
            .arg("trace")
            .arg(what)
            .arg("-c")
            .arg(h.spool.path().join("test.ini"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let out = trace("+12025550142");
    let lines: Vec<&str> = out.lines().filter(|l| l.contains(" sent ")).collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(
        lines[0].contains(&first) && lines[1].contains(&second),
        "{out}"
    );
    assert!(out.contains("from 3 files"), "the leftover too: {out}");
    let out = trace("T00000002");
    let lines: Vec<&str> = out.lines().filter(|l| l.contains(" sent ")).collect();
    assert_eq!(lines.len(), 1, "{out}");
    assert!(
        lines[0].contains(&second) && lines[0].contains("status=250"),
        "{out}"
    );
}

#[test]
fn a_checkpoint_that_cannot_be_saved_keeps_its_file_open_and_no_row_comes_twice() {
    let mut h = Harness::with(cdr_profile(""));
    let dir = h.spool.path().join("cdr");
    // The checkpoint is written beside it first: a directory in its way
    // makes every save fail, as a full or broken disk would.
    let blocker = h.spool.path().join("cdr-state.tmp");
    std::fs::create_dir(&blocker).unwrap();
    let mut c = h.client(LOCAL);
    for seq in 1..=3 {
        send_forward(&mut c, seq, TO_B, 512);
    }
    wait_until("three rows written", || {
        events(&rows_in(&dir, ".csv.open"), "sent").len() == 3
    });
    h.stop_relay();
    assert!(
        rows_in(&dir, ".csv").is_empty(),
        "a file whose rows the checkpoint does not cover is not closed"
    );
    std::fs::remove_dir(&blocker).unwrap();
    h.restart();
    h.stop_relay();
    assert!(rows_in(&dir, ".csv.open").is_empty(), "closed at start");
    let rows = rows_in(&dir, ".csv");
    assert_eq!(events(&rows, "sent").len(), 3, "each row once: {rows:?}");
    let ids: HashSet<&String> = rows.iter().map(|r| &r["cdr_id"]).collect();
    assert_eq!(ids.len(), rows.len());
}

#[test]
fn a_res_that_came_before_its_req_was_delivered_is_matched_across_a_restart() {
    let clock = Arc::new(ManualClock::new(SystemTime::now()));
    let mut h = Harness::with_clock(cdr_profile("ack_timeout = 10m"), clock.clone());
    let dir = h.spool.path().join("cdr");
    h.sims[1].set_fault(Fault::TempFail);
    let mut c = h.client(LOCAL);
    let req = queued_as(&send_message(&mut c, FROM, &[TO_B], &acked_req(12, TO_B)));
    wait_row(&dir, "deferred", "T00000012");
    // A fast partner: its RES comes while the REQ waits for its retry.
    let mut p = h.client(PARTNER_B);
    send_message(&mut p, RES_FROM, &[RES_TO], &res(12, "Ok"));
    wait_until("the early RES is checkpointed", || {
        std::fs::read_to_string(h.spool.path().join("cdr-state"))
            .is_ok_and(|s| s.lines().any(|l| l.starts_with("e,T00000012,")))
    });
    h.sims[1].set_fault(Fault::None);
    h.restart();
    clock.advance(Duration::from_secs(1));
    wait_until("B has the REQ", || h.sims[1].recipients() == 1);
    let row = wait_row(&dir, "res", "T00000012");
    assert_eq!(row["queue_id"], req);
    assert_eq!(row["status"], "Ok");
    h.stop_relay();
    let rows = all_rows(&dir);
    assert!(events(&rows, "res_missing").is_empty(), "{rows:?}");
}

/// The local MMSC's RES to partner B answers B's forward.REQ, not one that
/// partner C sent first with the same transaction ID.
#[test]
fn a_local_res_answers_the_partner_it_goes_to() {
    let mut h = Harness::with(cdr_profile(""));
    let dir = h.spool.path().join("cdr");
    let from_c = "+61491570156/TYPE=PLMN@mms.mnc456.mcc999.gprs";
    let from_b = "+12025550142/TYPE=PLMN@mms.mnc020.mcc001.gprs";
    let mut c = h.client(PARTNER_C);
    let theirs = queued_as(&send_message(&mut c, from_c, &[TO_A], &acked_req(20, TO_A)));
    let mut b = h.client(PARTNER_B);
    let ours = queued_as(&send_message(&mut b, from_b, &[TO_A], &acked_req(20, TO_A)));
    wait_until("A has both REQs", || h.sims[0].recipients() == 2);
    wait_until("both wait", || {
        std::fs::read_to_string(h.spool.path().join("cdr-state"))
            .is_ok_and(|s| s.lines().filter(|l| l.starts_with("w,T00000020,")).count() == 2)
    });
    let mut local = h.client(LOCAL);
    // The RES the other way: from the local MMSC's system address to B's.
    let back = String::from_utf8(res(20, "Ok"))
        .unwrap()
        .replace(&format!("Sender: {RES_FROM}"), "Sender: X")
        .replace(&format!("To: {RES_TO}"), &format!("To: {RES_FROM}"))
        .replace("Sender: X", &format!("Sender: {RES_TO}"));
    let reply = send_message(&mut local, RES_TO, &[RES_FROM], back.as_bytes());
    assert_eq!(reply.code, 250, "{reply}");
    let row = wait_row(&dir, "res", "T00000020");
    assert_eq!(row["queue_id"], ours, "B's REQ, not C's ({theirs})");
    assert_eq!(row["peer"], "A");
    h.stop_relay();
    assert_eq!(events(&all_rows(&dir), "res").len(), 1);
}
