//! Routing through DNS (issue 14): a peer whose hosts are a domain's MX
//! exchanges, ENUM ahead of prefixes, and dynamic peers, against the small
//! DNS server of `mm4relay::dns::server` on a loopback UDP and TCP port,
//! with SMTP peers on several 127.0.1.x addresses sharing one port.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use hickory_proto::rr::RecordType;
use mm4relay::dns::naptr::enum_name;
use mm4relay::dns::server::{DnsServer, Reply, a, mms_naptr, mx};
use mm4relay::sim::{SimPeer, SimSecurity};

use crate::support::*;

/// A sink on `ip` at `port`, keeping what it receives.
fn sim_at(ip: [u8; 4], port: u16) -> SimPeer {
    let addr = SocketAddr::from((Ipv4Addr::from(ip), port));
    SimPeer::start_at(addr, true, None, SimSecurity::default()).expect("bind a 127.0.1.x address")
}

/// `name` has address `ip` and no IPv6 address.
fn host(dns: &DnsServer, name: &str, ip: [u8; 4], ttl: u32) {
    dns.set(
        name,
        RecordType::A,
        Reply::Records(vec![a(Ipv4Addr::from(ip))], ttl),
    );
    dns.set(name, RecordType::AAAA, Reply::Records(vec![], ttl));
}

/// The harness's INI with C's hosts replaced by `mx:c.test`, one message
/// per connection (so every message looks its hosts up), and `[dns]`.
fn with_mx(ini: &str, dns: &DnsServer, port: u16, c_addr: SocketAddr) -> String {
    let ini = ini.replace(
        &format!("hosts = {c_addr}\n"),
        "hosts = mx:c.test\nmax_messages_per_connection = 1\n",
    );
    assert!(ini.contains("mx:c.test"), "C's hosts line not found");
    format!(
        "{ini}\n[dns]\nservers = {}\ntimeout = 500ms\nattempts = 1\nsmtp_port = {port}\n",
        dns.addr()
    )
}

#[test]
fn mx_hosts_in_preference_order_fail_over_and_follow_a_changed_answer() {
    let mut h = Harness::start();
    let dns = DnsServer::start().unwrap();
    let first = SimPeer::start(true).unwrap();
    let port = first.addr().port();
    let second = sim_at([127, 0, 1, 2], port);
    let third = sim_at([127, 0, 1, 3], port);
    dns.set(
        "c.test",
        RecordType::MX,
        Reply::Records(vec![mx(20, "mx2.c.test"), mx(10, "mx1.c.test")], 1),
    );
    host(&dns, "mx1.c.test", [127, 0, 0, 1], 300);
    host(&dns, "mx2.c.test", [127, 0, 1, 2], 300);
    host(&dns, "mx3.c.test", [127, 0, 1, 3], 300);
    let ini = with_mx(&h.ini(), &dns, port, h.sims[2].addr());
    h.reload(&ini).unwrap();
    let mut c = h.client(LOCAL);
    // The lower preference first.
    send_forward(&mut c, 1, TO_C, 300);
    assert!(
        first.wait_for_recipients(1, DEADLINE),
        "{}",
        h.control("status")
    );
    assert_eq!(second.received().len(), 0);
    // The first exchange gone: the next one takes the mail.
    first.stop();
    send_forward(&mut c, 2, TO_C, 300);
    assert!(second.wait_for_recipients(1, DEADLINE));
    // A new answer once the TTL (1s) has run out: mail goes to mx3.
    dns.set(
        "c.test",
        RecordType::MX,
        Reply::Records(vec![mx(10, "mx3.c.test")], 1),
    );
    let mut seq = 3;
    wait_until("mail at the changed MX", || {
        send_forward(&mut c, seq, TO_C, 300);
        seq += 1;
        !third.received().is_empty()
    });
    let status = h.control("status");
    assert!(status.contains("\ndns: queries="), "{status}");
    drop(c);
    h.stop_relay();
}

#[test]
fn enum_routes_ahead_of_prefixes_and_a_silent_server_costs_only_its_timeout() {
    let mut h = Harness::start();
    let dns = DnsServer::start().unwrap();
    // An A number (by prefix) that ENUM says is now C's.
    let moved = "+447700900555/TYPE=PLMN@mms.mnc010.mcc001.gprs";
    dns.set(
        &enum_name("+447700900555", "e164.test"),
        RecordType::NAPTR,
        Reply::Records(vec![mms_naptr(10, 10, "mms.mnc456.mcc999.gprs")], 60),
    );
    let quiet = "+447700900777/TYPE=PLMN@mms.mnc010.mcc001.gprs";
    dns.set(
        &enum_name("+447700900777", "e164.test"),
        RecordType::NAPTR,
        Reply::Silent,
    );
    let ini = format!(
        "{}\n[dns]\nservers = {}\ntimeout = 300ms\nattempts = 2\n[enum]\ndomain = e164.test\n",
        h.ini(),
        dns.addr()
    );
    h.reload(&ini).unwrap();
    assert_eq!(
        h.control(&format!("route {moved}")),
        format!("{moved} -> C by ENUM answer mms.mnc456.mcc999.gprs\n")
    );
    assert_eq!(
        h.control(&format!("route {TO_A}")),
        format!("{TO_A} -> A by prefix +447700900\n")
    );
    let mut c = h.client(LOCAL);
    send_forward(&mut c, 1, moved, 300);
    assert!(h.sims[2].wait_for_recipients(1, DEADLINE));
    // No answer at all: the RCPT reply still comes, by the static rules,
    // within timeout x attempts (600ms) and a margin for a loaded machine.
    let asked = Instant::now();
    send_forward(&mut c, 2, quiet, 300);
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "{:?}",
        asked.elapsed()
    );
    assert!(h.sims[0].wait_for_recipients(1, DEADLINE));
    let status = h.control("status json");
    // Answered twice: for `route` and for the RCPT.
    assert!(status.contains("\"enum_answers\":2,"), "{status}");
    assert!(status.contains("\"enum_failures\":1,"), "{status}");
    drop(c);
    h.stop_relay();
}

/// The relay binary with dynamic peers on, its DNS at `dns`, its peers'
/// hosts on `port`: the local MMSC A and partner B as fixed peers; one
/// dynamic peer at most, retired after `idle` with nothing to do; a
/// budget of two connections, one of them A's.
fn dynamic_ini(
    dir: &std::path::Path,
    dns: &DnsServer,
    port: u16,
    a: SocketAddr,
    idle: &str,
) -> String {
    format!(
        "[relay]\nhostname = relay.test\nspool_dir = {d}\ncontrol_socket = {d}/control.sock\n\
         max_connections = 2\n\
         retry_min = 100ms\nretry_max = 400ms\nshutdown_timeout = 5s\n\
         [listener]\nlisten = 127.0.0.1:0\nrelay_from = {LOCAL}/32\n\
         [peer.A]\nhosts = {a}\ndomains = mms.mnc010.mcc001.gprs\nlocal = yes\n\
         [peer.B]\nhosts = 127.0.0.1:1\ndomains = mms.mnc020.mcc001.gprs\naccept_from = {PARTNER_B}/32\n\
         min_connections = 0\n\
         [routes]\ndynamic = yes\nmax_dynamic_peers = 1\n\
         [peer_defaults]\nmax_connections = 2\nprobe_min = 100ms\nprobe_max = 400ms\n\
         idle_timeout = {idle}\n\
         [dns]\nservers = {}\ntimeout = 300ms\nattempts = 1\nsmtp_port = {port}\n",
        dns.addr(),
        d = dir.display(),
    )
}

#[test]
fn dynamic_peers_are_made_for_the_local_mmsc_within_the_cap_retire_and_outlive_a_restart() {
    let dns = DnsServer::start().unwrap();
    let sink = SimPeer::start(true).unwrap();
    let port = sink.addr().port();
    let local = SimPeer::start(true).unwrap();
    dns.set(
        "d1.test",
        RecordType::MX,
        Reply::Records(vec![mx(10, "mx.d1.test")], 60),
    );
    host(&dns, "mx.d1.test", [127, 0, 0, 1], 60);
    dns.set(
        "d2.test",
        RecordType::MX,
        Reply::Records(vec![mx(10, "mx.d1.test")], 60),
    );
    dns.set("fail.test", RecordType::MX, Reply::ServFail);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.ini");
    std::fs::write(
        &path,
        dynamic_ini(dir.path(), &dns, port, local.addr(), "1h"),
    )
    .unwrap();
    let mut relay = Running::start(&path, &[], true);
    let (addr, _, _log) = relay.listening();

    let to_d1 = "+33612345678/TYPE=PLMN@d1.test";
    let rcpt = |c: &mut Client, to: &str| c.cmd(&format!("RCPT TO:<{to}>"));
    // Domains DNS does not know, or cannot look up now: no peer is made.
    let mut c = Client::connect(LOCAL, addr);
    assert_eq!(c.cmd("EHLO client.test").code, 250);
    assert_eq!(c.cmd(&format!("MAIL FROM:<{FROM}>")).code, 250);
    assert_eq!(rcpt(&mut c, "x@gone.test").code, 550);
    let r = rcpt(&mut c, "x@fail.test");
    assert!(r.code == 451 && r.text().contains("4.4.3"), "{r}");
    drop(c);
    let mut c = Client::connect(LOCAL, addr);
    send_forward(&mut c, 100_001, to_d1, 300);
    assert!(sink.wait_for_recipients(1, DEADLINE));
    drop(c);
    // A burst: d1.test may have two connections, but the budget leaves it
    // one beside A's.
    let report = mm4relay::sim::send_load(addr, 4, load(&[to_d1], 30));
    assert_eq!(report.accepted, 30, "{report:?}");
    assert!(sink.wait_for_recipients(31, DEADLINE));
    assert_eq!(sink.max_open(), 1, "within the global budget");
    let status = ask(dir.path(), "status");
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("d1.test") && l.contains("dynamic")),
        "{status}"
    );
    let mut c = Client::connect(LOCAL, addr);
    assert_eq!(c.cmd("EHLO client.test").code, 250);
    assert_eq!(c.cmd(&format!("MAIL FROM:<{FROM}>")).code, 250);
    // The cap (1) is taken by d1.test: refused before any DNS query.
    let asked = dns.queries();
    let r = rcpt(&mut c, "x@d2.test");
    assert_eq!(dns.queries(), asked);
    assert!(r.code == 451 && r.text().contains("4.4.5"), "{r}");
    assert_eq!(rcpt(&mut c, "y@d1.test").code, 250);
    drop(c);
    // A partner may not send to a dynamic peer.
    let mut p = Client::connect(PARTNER_B, addr);
    assert_eq!(p.cmd("EHLO partner.test").code, 250);
    assert_eq!(p.cmd(&format!("MAIL FROM:<{FROM}>")).code, 250);
    assert_eq!(rcpt(&mut p, to_d1).code, 550);
    drop(p);

    // Idle with nothing queued, d1.test retires and frees its place under
    // the cap: d2.test may be made; d1.test is made again once d2.test
    // retires in turn.
    std::fs::write(
        &path,
        dynamic_ini(dir.path(), &dns, port, local.addr(), "200ms"),
    )
    .unwrap();
    relay.signal("-HUP");
    let state = |name: &str| {
        let status = ask(dir.path(), "status");
        let row = status
            .lines()
            .find(|l| l.starts_with(name))
            .map(str::to_string);
        row.and_then(|r| r.split_whitespace().nth(1).map(str::to_string))
    };
    wait_until("d1.test retired", || {
        state("d1.test").as_deref() == Some("retired")
    });
    let to_d2 = "+33612345679/TYPE=PLMN@d2.test";
    let mut c = Client::connect(LOCAL, addr);
    send_forward(&mut c, 100_003, to_d2, 300);
    assert!(sink.wait_for_recipients(32, DEADLINE));
    drop(c);
    // d2.test took retired d1.test's place: retired peers do not pile up.
    let status = ask(dir.path(), "status");
    assert!(
        !status.lines().any(|l| l.starts_with("d1.test")),
        "{status}"
    );
    wait_until("d2.test retired", || {
        state("d2.test").as_deref() == Some("retired")
    });
    let mut c = Client::connect(LOCAL, addr);
    send_forward(&mut c, 100_004, to_d1, 300);
    assert!(sink.wait_for_recipients(33, DEADLINE));
    drop(c);
    std::fs::write(
        &path,
        dynamic_ini(dir.path(), &dns, port, local.addr(), "1h"),
    )
    .unwrap();
    relay.signal("-HUP");

    // A message queued for d1.test while it refuses, then a restart: the
    // peer is made again from the spool and delivers it.
    sink.set_fault(mm4relay::sim::Fault::TempFail);
    let mut c = Client::connect(LOCAL, addr);
    send_forward(&mut c, 100_005, to_d1, 300);
    drop(c);
    wait_until("a deferral at d1.test", || {
        let status = ask(dir.path(), "status");
        let row = status.lines().find(|l| l.starts_with("d1.test"));
        // name health allow open/busy pool overflow waiting oldest sent deferred
        row.and_then(|r| r.split_whitespace().nth(9))
            .is_some_and(|d| d != "0")
    });
    assert!(relay.terminate().success());
    sink.set_fault(mm4relay::sim::Fault::None);
    let mut relay = Running::start(&path, &[], true);
    let (_addr, _, _log) = relay.listening();
    assert!(sink.wait_for_recipients(34, DEADLINE));
    assert!(relay.terminate().success());
}

/// `mm4relay status` (`status json`: with `--json`) of the relay whose
/// spool is `dir`.
fn ask(dir: &std::path::Path, command: &str) -> String {
    let mut cmd = std::process::Command::new(BIN);
    cmd.args(["status", "--socket"])
        .arg(dir.join("control.sock"));
    if command == "status json" {
        cmd.arg("--json");
    }
    let out = cmd.output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}
