//! The Grafana dashboard and the Prometheus alert rules under conf/ ask
//! only for metrics, and labels, that the relay's /metrics has; promtool
//! (Prometheus's own checker, unpacked by .ci/third-party) accepts the
//! rules.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cdr;
use crate::support::*;

/// Labels Prometheus adds at the scrape, not the relay.
const SCRAPE_LABELS: [&str; 3] = ["instance", "job", "le"];

/// Every metric of one scrape, with the label names of its samples; a
/// histogram's series (`_bucket`, `_sum`, `_count`) each count as one.
fn scraped() -> HashMap<String, HashSet<String>> {
    let mut h = Harness::with(Profile {
        extra_relay: "metrics_listen = 127.0.0.1:0".into(),
        extra_sections: "[cdr]\ndir = {spool}/cdr\n".into(),
        ..Profile::default()
    });
    // A forward.REQ that asks for a RES, and its RES: every family has
    // samples, so their labels can be checked too.
    let mut c = h.client(LOCAL);
    send_message(&mut c, FROM, &[TO_B], &cdr::acked_req(1, TO_B));
    assert!(h.sims[1].wait_for_recipients(1, DEADLINE));
    let mut p = h.client(PARTNER_B);
    send_message(&mut p, cdr::RES_FROM, &[cdr::RES_TO], &cdr::res(1, "Ok"));
    wait_until("the RES matched", || {
        h.control("status").contains("acks B: 1 asked, 1 Ok")
    });
    let addr = h.relay.as_ref().unwrap().metrics_addr().unwrap();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: relay\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    h.stop_relay();
    let mut names: HashMap<String, HashSet<String>> = HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut w = rest.split_whitespace();
            let (Some(name), Some(kind)) = (w.next(), w.next()) else {
                continue;
            };
            names.entry(name.to_string()).or_default();
            if kind == "histogram" {
                for s in ["_bucket", "_sum", "_count"] {
                    names.entry(format!("{name}{s}")).or_default();
                }
            }
        } else if line.starts_with("mm4relay_") {
            let name_end = line.find(['{', ' ']).unwrap_or(line.len());
            let labels = line[name_end..]
                .strip_prefix('{')
                .and_then(|l| l.split_once('}'))
                .map_or("", |(l, _)| l);
            let set = names.entry(line[..name_end].to_string()).or_default();
            for pair in labels.split(',').filter(|p| !p.is_empty()) {
                if let Some((k, _)) = pair.split_once('=') {
                    set.insert(k.to_string());
                }
            }
        }
    }
    names
}

/// Each `mm4relay_…` metric `text` names, with the label names of its
/// selector if it has one (`name{a="x",b=~"y"}`).
fn asked(text: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    let b = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("mm4relay_") {
        let start = i + at;
        let end = start
            + text[start..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(text.len() - start);
        let name = text[start..end].to_string();
        let mut labels = Vec::new();
        if b.get(end) == Some(&b'{') {
            let close = text[end..].find('}').map_or(text.len(), |c| end + c);
            for pair in text[end + 1..close].split(',') {
                let key = pair
                    .split(['=', '!'])
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_string();
                if !key.is_empty() {
                    labels.push(key);
                }
            }
        }
        // `mm4relay_…` inside a word (a file name, an ID) is not a metric.
        let inside = start > 0 && (b[start - 1].is_ascii_alphanumeric() || b[start - 1] == b'_');
        if !inside {
            out.push((name, labels));
        }
        i = end;
    }
    out
}

fn conf(path: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("conf")
        .join(path);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn the_dashboard_and_the_alert_rules_ask_only_for_what_metrics_has() {
    let have = scraped();
    assert!(have.contains_key("mm4relay_res_total"), "CDRs on: {have:?}");
    let dashboard = conf("grafana/mm4relay.json");
    let rules = conf("prometheus/mm4relay-rules.yml");
    // The dashboard is JSON Grafana can import: checked by Python's
    // reader, not ours.
    let check = Command::new("python3")
        .args([
            "-c",
            "import json,sys; d=json.load(sys.stdin); print(len(d['panels']))",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn();
    match check {
        Ok(mut child) => {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(dashboard.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success(), "not JSON");
            let panels: usize = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
            assert!(panels >= 10, "{panels} panels");
        }
        Err(_) => eprintln!("SKIPPED: no python3 to read the dashboard as JSON"),
    }
    for (what, text) in [("dashboard", &dashboard), ("rules", &rules)] {
        let wanted = asked(text);
        assert!(wanted.len() >= 8, "{what}: {wanted:?}");
        for (name, labels) in wanted {
            let Some(has) = have.get(&name) else {
                panic!("{what} asks for {name}, which /metrics does not have");
            };
            for l in labels {
                assert!(
                    SCRAPE_LABELS.contains(&l.as_str()) || has.contains(&l),
                    "{what}: {name} has no label {l} (it has {has:?})"
                );
            }
        }
    }
    // What the issue asks the dashboard to show, and the rules to watch.
    for name in [
        "mm4relay_recipients_total",
        "mm4relay_delivery_delay_seconds_bucket",
        "mm4relay_queued_messages",
        "mm4relay_oldest_queued_seconds",
        "mm4relay_connections_open",
        "mm4relay_allowance",
        "mm4relay_spool_bytes",
        "mm4relay_messages_rejected_total",
    ] {
        assert!(dashboard.contains(name), "the dashboard shows {name}");
    }
    for alert in [
        "MM4RelayPeerProbing",
        "MM4RelayQueueOld",
        "MM4RelaySpoolNearlyFull",
        "MM4RelayRefusalsRising",
    ] {
        assert!(rules.contains(&format!("alert: {alert}")), "{alert}");
    }
}

/// promtool from PATH, or as .ci/third-party unpacks it.
fn promtool() -> Option<PathBuf> {
    let unpacked = std::env::var_os("MM4_THIRD_PARTY")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/third-party"))
        .join("prometheus/usr/bin/promtool");
    if unpacked.exists() {
        return Some(unpacked);
    }
    Command::new("promtool")
        .arg("--version")
        .output()
        .ok()
        .map(|_| PathBuf::from("promtool"))
}

#[test]
fn promtool_accepts_the_alert_rules() {
    let Some(promtool) = promtool() else {
        eprintln!("SKIPPED: promtool is not installed (.ci/third-party unpacks it)");
        return;
    };
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/prometheus/mm4relay-rules.yml");
    let out = Command::new(&promtool)
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("SUCCESS: 8 rules found"), "{text}");
}
