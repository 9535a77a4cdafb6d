//! Number portability at scale (issue 14): a ported file routes numbers
//! and blocks ahead of the peers' prefixes, a reload swaps in a new table
//! under traffic with nothing refused or lost, a bad file is refused with
//! its line while the table in force stays, and `mm4relay route` says
//! which rule routed a recipient.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use mm4relay::sim::send_load;

use crate::support::*;

/// Entries that route nothing the tests send: the table's bulk.
const FILLER: usize = 200_000;

/// A ported file of `FILLER` entries and then `lines`.
fn ported_file(dir: &Path, name: &str, lines: &str) -> PathBuf {
    let mut text = String::with_capacity(FILLER * 20 + lines.len());
    text.push_str("# filler: numbers no test sends to\n");
    for i in 0..FILLER {
        let _ = writeln!(text, "+3361{i:07} C");
    }
    text.push_str(lines);
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// `ini` with `[routes] ported_file = path`.
fn with_ported(ini: &str, path: &Path) -> String {
    format!("{ini}\n[routes]\nported_file = {}\n", path.display())
}

#[test]
fn a_ported_file_routes_ahead_of_prefixes_and_reloads_under_traffic() {
    let mut h = Harness::start();
    let dir = tempfile::tempdir().unwrap();
    let ini = h.ini();
    // B's number ported to C, exactly; then B's whole prefix to A, as a block.
    let exact = ported_file(dir.path(), "exact.txt", "12025550142;C\n");
    let block = ported_file(dir.path(), "block.txt", "+1202555*\tA  # a block\n");
    h.reload(&with_ported(&ini, &exact)).unwrap();
    // The profile's [ported] entry and the file's, in status.
    let status = h.control("status");
    let routes = format!(
        "\nroutes: {} ported entries from {}, loaded in ",
        FILLER + 2,
        exact.display()
    );
    assert!(status.contains(&routes), "{status}");
    let route = h.control(&format!("route {TO_B}"));
    assert_eq!(route, format!("{TO_B} -> C by ported (exact number)\n"));
    let mut c = h.client(LOCAL);
    // A sequence number the load below does not use: not a duplicate.
    send_forward(&mut c, 1_000_000, TO_B, 500);
    assert!(h.sims[2].wait_for_recipients(1, DEADLINE));
    drop(c);

    // Reloads of the large table while messages keep coming: every one is
    // accepted, and every one arrives exactly once, at A or at C.
    let n = 400;
    let addr = h.addr;
    let traffic = std::thread::spawn(move || send_load(addr, 4, load(&[TO_B], n)));
    let mut reloads = 0;
    while !traffic.is_finished() && reloads < 20 {
        let file = if reloads % 2 == 0 { &block } else { &exact };
        h.reload(&with_ported(&ini, file)).unwrap();
        reloads += 1;
    }
    let report = traffic.join().unwrap();
    assert_eq!(report.accepted, n, "refused during the reloads: {report:?}");
    // The last table in force: the block, so B's number goes to A.
    h.reload(&with_ported(&ini, &block)).unwrap();
    let route = h.control(&format!("route {TO_B}"));
    assert_eq!(
        route,
        format!("{TO_B} -> A by ported (block of 7 digits)\n")
    );
    let total = n as u64 + 1;
    wait_until("every message at A or C", || {
        h.sims[0].recipients() + h.sims[2].recipients() == total
    });
    assert_eq!(h.sims[1].recipients(), 0, "B's number went to B");
    assert_eq!(h.stop_relay().undelivered, 0);
    assert_eq!(h.sims[0].recipients() + h.sims[2].recipients(), total);
    eprintln!(
        "{reloads} reloads of a {FILLER}-entry ported file under traffic: {n} accepted, \
         A got {}, C got {}",
        h.sims[0].recipients(),
        h.sims[2].recipients()
    );
    assert!(reloads > 0);
}

#[test]
fn a_bad_ported_file_is_refused_with_its_line_and_the_table_in_force_stays() {
    let mut h = Harness::start();
    let dir = tempfile::tempdir().unwrap();
    let ini = h.ini();
    let good = dir.path().join("good.txt");
    std::fs::write(&good, "12025550142 C\n").unwrap();
    h.reload(&with_ported(&ini, &good)).unwrap();
    for (text, problem) in [
        (
            "# ok\n12025550142 C\n+1202555* Z\n",
            "line 3: no peer named \"Z\"",
        ),
        (
            "12025550142 C\n12025550143\n",
            "line 2: expected NUMBER PEER",
        ),
        (
            "12025550142 C\n120255501x A\n",
            "line 2: \"120255501x\" is not a number",
        ),
        (
            "12025550142 C\n+12025550142 A\n",
            "line 2: this number is already given on line 1",
        ),
    ] {
        let bad = dir.path().join("bad.txt");
        std::fs::write(&bad, text).unwrap();
        let err = h.reload(&with_ported(&ini, &bad)).unwrap_err();
        assert!(
            err.starts_with(&format!("{}: {problem}", bad.display())),
            "{text:?}: {err}"
        );
        let route = h.control(&format!("route {TO_B}"));
        assert_eq!(route, format!("{TO_B} -> C by ported (exact number)\n"));
    }
    // Not a regular file: refused without waiting (a FIFO) or reading
    // forever (a device).
    for special in ["/dev/zero", "fifo"] {
        let path = dir.path().join(special.trim_start_matches("/dev/"));
        if special == "fifo" {
            assert!(
                Command::new("mkfifo")
                    .arg(&path)
                    .status()
                    .unwrap()
                    .success()
            );
        } else {
            std::os::unix::fs::symlink(special, &path).unwrap();
        }
        let err = h.reload(&with_ported(&ini, &path)).unwrap_err();
        assert!(err.contains("cannot read: not a regular file"), "{err}");
    }
    // A file that cannot be read is refused the same way.
    let err = h
        .reload(&with_ported(&ini, &dir.path().join("missing.txt")))
        .unwrap_err();
    assert!(err.contains("missing.txt: cannot read"), "{err}");

    // `check` validates the file as the relay would, and exits 2.
    let bad = dir.path().join("bad.txt");
    std::fs::write(&bad, "\n\n+1202555* Z\n").unwrap();
    let config = dir.path().join("relay.ini");
    std::fs::write(&config, with_ported(&ini, &bad)).unwrap();
    let out = Command::new(BIN)
        .args(["check", "-c"])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("{}: line 3: no peer named \"Z\"", bad.display())),
        "{stderr}"
    );
    assert_eq!(h.stop_relay().undelivered, 0);
}

#[test]
fn route_says_which_rule_from_the_running_relay_or_else_from_the_file() {
    let mut h = Harness::start();
    let dir = tempfile::tempdir().unwrap();
    let ported = dir.path().join("ported.txt");
    std::fs::write(&ported, "61491570* A\n").unwrap();
    let ini = with_ported(&h.ini(), &ported);
    let config = dir.path().join("relay.ini");
    std::fs::write(&config, &ini).unwrap();
    let route = |args: &[&str]| {
        let out = Command::new(BIN).arg("route").args(args).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let socket = h.spool.path().join("control.sock");
    let socket = socket.to_str().unwrap();
    // The running relay's tables: no ported file yet.
    let (code, out, err) = route(&[TO_C, "--socket", socket]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, format!("{TO_C} -> C by prefix +61491570\n"));
    let (_, out, _) = route(&["ops@mms.mnc020.mcc001.gprs", "--socket", socket]);
    assert_eq!(
        out,
        "ops@mms.mnc020.mcc001.gprs -> B by domain mms.mnc020.mcc001.gprs\n"
    );
    let (_, out, _) = route(&["ops@example.org", "--socket", socket]);
    assert_eq!(out, "ops@example.org -> no peer: 550 5.1.2 at RCPT\n");
    let (code, _, err) = route(&["not an address", "--socket", socket]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("is not an address"), "{err}");
    h.reload(&ini).unwrap();
    let (_, out, _) = route(&[TO_C, "--socket", socket]);
    assert_eq!(out, format!("{TO_C} -> A by ported (block of 8 digits)\n"));
    // Not running: the file's tables, and said so.
    assert_eq!(h.stop_relay().undelivered, 0);
    let (code, out, err) = route(&[TO_C, "-c", config.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        out,
        format!(
            "{TO_C} -> A by ported (block of 8 digits)\n(by {}: the relay is not running)\n",
            config.display()
        )
    );
    // Not running and no file to fall back on: exit 3.
    let (code, _, _) = route(&[TO_C, "--socket", socket]);
    assert_eq!(code, Some(3));
}
