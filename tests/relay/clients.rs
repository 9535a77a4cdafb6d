//! The listener against clients we did not write: Python's smtplib and
//! ssl modules, and `openssl s_client`. Each test says loudly when the
//! program is missing and skips.

use std::io::Write;
use std::process::{Command, Stdio};

use crate::pki::Pki;
use crate::support::*;

/// True if `program` runs here; says so on stderr when it does not.
fn have(program: &str, version_arg: &str) -> bool {
    let ok = Command::new(program)
        .arg(version_arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("SKIPPED: {program} is not installed; this test needs it");
    }
    ok
}

/// `python3` to run `script` with `args`.
fn python_command(script: &str, args: &[String]) -> Command {
    let mut c = Command::new("python3");
    c.arg("-c").arg(script).args(args);
    c
}

/// Runs a Python script with `args`; its stdout, and whether it succeeded.
fn python(script: &str, args: &[String]) -> (bool, String) {
    let out = python_command(script, args).output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// smtplib sends an MM4_forward.REQ over STARTTLS (TLS verified against
/// the test CA), and sees 501 for a control character in EHLO and a HELO
/// name over 255 octets.
#[test]
fn smtplib_over_starttls_and_the_command_checks() {
    if !have("python3", "--version") {
        return;
    }
    let pki = Pki::new();
    let h = Harness::with_listener(pki.listener_lines());
    let script = r#"
import smtplib, ssl, sys
port, ca, rcpt, msg = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
s = smtplib.SMTP("127.0.0.1", port, timeout=20)
print("esc", s.docmd("EHLO", "a\x1bb.test")[0])
print("long", s.docmd("EHLO", "h" * 300)[0])
s.ehlo("python.test")
s.starttls(context=ssl.create_default_context(cafile=ca))
s.ehlo("python.test")
print("tls", s.sock.version())
s.sendmail("+447700900001/TYPE=PLMN@mms.mnc010.mcc001.gprs", [rcpt], open(msg, "rb").read())
print("sent")
s.quit()
"#;
    let msg = h.spool.path().join("msg.eml");
    std::fs::write(&msg, mm4relay::sim::forward_req(1, TO_A, 600)).unwrap();
    let (ok, out) = python(
        script,
        &[
            h.addr.port().to_string(),
            pki.ca.display().to_string(),
            TO_A.into(),
            msg.display().to_string(),
        ],
    );
    assert!(ok, "{out}");
    assert!(out.contains("esc 501") && out.contains("long 501"), "{out}");
    assert!(out.contains("tls TLSv1."), "{out}");
    assert!(out.contains("sent"), "{out}");
    assert!(h.sims[0].wait_for_recipients(1, DEADLINE));
}

/// smtplib sends three messages in one session: a long one, a short one,
/// then one in a BDAT chunk by hand. Each reaches the peer as it was sent,
/// behind only the relay's Received: line, though the session reads each
/// into the buffer the one before left it.
#[test]
fn smtplib_sends_three_messages_in_one_session() {
    if !have("python3", "--version") {
        return;
    }
    let h = Harness::start();
    let script = r#"
import smtplib, sys
sys.stderr = sys.stdout
port, rcpt, files = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
long, short, chunked = [open(f, "rb").read() for f in files]
s = smtplib.SMTP("127.0.0.1", port, timeout=20)
s.ehlo("python.test")
frm = "+447700900001/TYPE=PLMN@mms.mnc010.mcc001.gprs"
print("long", s.sendmail(frm, [rcpt], long))
print("short", s.sendmail(frm, [rcpt], short))
s.send(b"MAIL FROM:<" + frm.encode() + b">\r\nRCPT TO:<" + rcpt.encode() + b">\r\n"
       + b"BDAT %d LAST\r\n" % len(chunked) + chunked)
print("bdat", [s.getreply()[0] for _ in range(3)])
s.quit()
"#;
    let bodies: Vec<Vec<u8>> = [(21, 40_000), (22, 600), (23, 1500)]
        .iter()
        .map(|&(seq, size)| mm4relay::sim::forward_req(seq, TO_A, size))
        .collect();
    let mut args = vec![h.addr.port().to_string(), TO_A.into()];
    for (i, body) in bodies.iter().enumerate() {
        let path = h.spool.path().join(format!("msg{i}.eml"));
        std::fs::write(&path, body).unwrap();
        args.push(path.display().to_string());
    }
    let (ok, out) = python(script, &args);
    assert!(ok, "{out}");
    assert!(out.contains("long {}") && out.contains("short {}"), "{out}");
    assert!(out.contains("bdat [250, 250, 250]"), "{out}");
    assert!(h.sims[0].wait_for_recipients(3, DEADLINE));
    let got = h.sims[0].received();
    for body in &bodies {
        let same: Vec<_> = got.iter().filter(|m| m.data.ends_with(body)).collect();
        assert_eq!(same.len(), 1, "{out}");
        // Only the relay's Received: line comes before it.
        let trace = &same[0].data[..same[0].data.len() - body.len()];
        assert!(trace.starts_with(b"Received: ") && trace.len() < 1000);
    }
}

/// openssl s_client completes the handshake on the implicit-TLS listener
/// and runs a session; a second one that connects and never says hello is
/// cut at the command deadline.
#[test]
fn openssl_s_client_on_the_implicit_tls_listener() {
    if !have("openssl", "version") {
        return;
    }
    let pki = Pki::new();
    let h = Harness::with_listener(format!(
        "{}listen_tls = 127.0.0.1:0\ncommand_timeout = 2s\n",
        pki.listener_lines()
    ));
    let tls_addr = h.relay.as_ref().unwrap().local_addrs()[1];
    let mut client = Command::new("openssl")
        .args(["s_client", "-quiet", "-crlf", "-verify_return_error"])
        .arg("-connect")
        .arg(tls_addr.to_string())
        .arg("-servername")
        .arg("localhost")
        .arg("-CAfile")
        .arg(&pki.ca)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // -crlf turns each LF into CR LF.
    client
        .stdin
        .take()
        .unwrap()
        .write_all(b"EHLO openssl.test\nQUIT\n")
        .unwrap();
    let out = client.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("220 relay.test"), "{text}");
    assert!(
        text.contains("250-relay.test") && text.contains("221 2.0.0"),
        "{text}"
    );
    // A TCP connection to the TLS port that never sends its hello.
    let mut silent = tcp_from(UNKNOWN, tls_addr);
    let mut buf = [0u8; 64];
    // EOF, not the test's read timeout.
    assert_eq!(
        std::io::Read::read(&mut silent, &mut buf).unwrap(),
        0,
        "closed, with nothing said"
    );
}

/// One `openssl s_client` session at `version` (`-tls1_3`, `-tls1_2`) to
/// `addr`, with STARTTLS first if `starttls`, verifying the test CA's
/// certificate; it sends `EHLO` and `QUIT`. Everything it printed.
fn s_client(pki: &Pki, addr: std::net::SocketAddr, version: &str, starttls: bool) -> String {
    let mut cmd = Command::new("openssl");
    cmd.args([
        "s_client",
        "-brief",
        "-ign_eof",
        "-crlf",
        "-verify_return_error",
    ])
    .arg(version)
    .arg("-connect")
    .arg(addr.to_string())
    .arg("-servername")
    .arg("localhost")
    .arg("-CAfile")
    .arg(&pki.ca);
    if starttls {
        cmd.args(["-starttls", "smtp"]);
    }
    let mut client = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // -crlf turns each LF into CR LF.
    client
        .stdin
        .take()
        .unwrap()
        .write_all(b"EHLO openssl.test\nQUIT\n")
        .unwrap();
    let out = client.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// The listener's TLS speaks TLS 1.3 and TLS 1.2, over STARTTLS and on the
/// implicit-TLS listener: `openssl s_client` limited to each version
/// negotiates it (its `-brief` summary says which) and then runs EHLO and
/// QUIT inside the TLS session.
#[test]
fn openssl_s_client_negotiates_tls_1_3_and_1_2_both_ways_in() {
    if !have("openssl", "version") {
        return;
    }
    let pki = Pki::new();
    let h = Harness::with_listener(format!(
        "{}listen_tls = 127.0.0.1:0\n",
        pki.listener_lines()
    ));
    let addrs = h.relay.as_ref().unwrap().local_addrs();
    for (version, name) in [("-tls1_3", "TLSv1.3"), ("-tls1_2", "TLSv1.2")] {
        for (addr, starttls) in [(addrs[0], true), (addrs[1], false)] {
            let text = s_client(&pki, addr, version, starttls);
            let what = format!("{version} starttls={starttls}");
            assert!(
                text.contains(&format!("Protocol version: {name}\n")),
                "{what}: {text}"
            );
            // The EHLO reply came through TLS: STARTTLS is no longer offered.
            assert!(
                text.contains("250-relay.test") && text.contains("221 2.0.0"),
                "{what}: {text}"
            );
            assert!(!text.contains("250-STARTTLS"), "{what}: {text}");
        }
    }
}

/// smtplib with an ssl context that allows TLS 1.3 only sends a message
/// over STARTTLS and over the implicit-TLS listener (`SMTP_SSL`).
#[test]
fn smtplib_with_tls_1_3_only_over_starttls_and_implicit_tls() {
    if !have("python3", "--version") {
        return;
    }
    let pki = Pki::new();
    let h = Harness::with_listener(format!(
        "{}listen_tls = 127.0.0.1:0\n",
        pki.listener_lines()
    ));
    let addrs = h.relay.as_ref().unwrap().local_addrs();
    let script = r#"
import smtplib, ssl, sys
port, tls_port, ca, rcpt = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
ctx = ssl.create_default_context(cafile=ca)
ctx.minimum_version = ssl.TLSVersion.TLSv1_3
s = smtplib.SMTP("localhost", port, timeout=20)
s.starttls(context=ctx)
s.ehlo("python.test")
print("starttls", s.sock.version())
s.sendmail("+447700900001/TYPE=PLMN@mms.mnc010.mcc001.gprs", [rcpt], open(sys.argv[5], "rb").read())
s.quit()
s = smtplib.SMTP_SSL("localhost", tls_port, timeout=20, context=ctx)
s.ehlo("python.test")
print("implicit", s.sock.version())
s.sendmail("+447700900001/TYPE=PLMN@mms.mnc010.mcc001.gprs", [rcpt], open(sys.argv[6], "rb").read())
s.quit()
print("sent")
"#;
    // Two PDUs: the same one twice would be a duplicate.
    let msgs = [1, 2].map(|seq| {
        let path = h.spool.path().join(format!("msg{seq}.eml"));
        std::fs::write(&path, mm4relay::sim::forward_req(seq, TO_A, 600)).unwrap();
        path.display().to_string()
    });
    let (ok, out) = python(
        script,
        &[
            addrs[0].port().to_string(),
            addrs[1].port().to_string(),
            pki.ca.display().to_string(),
            TO_A.into(),
            msgs[0].clone(),
            msgs[1].clone(),
        ],
    );
    assert!(ok, "{out}");
    assert!(out.contains("starttls TLSv1.3"), "{out}");
    assert!(out.contains("implicit TLSv1.3"), "{out}");
    assert!(out.contains("sent"), "{out}");
    assert!(h.sims[0].wait_for_recipients(2, DEADLINE));
}

/// The start of the smtplib scripts that speak BDAT by hand: arguments
/// port, recipient and message file; the message read and halved, and
/// the session greeted. Tracebacks go to stdout, which the asserts show.
const BDAT_HEAD: &str = r#"
import smtplib, sys
sys.stderr = sys.stdout
port, rcpt, msg = int(sys.argv[1]), sys.argv[2], sys.argv[3]
data = open(msg, "rb").read()
half = len(data) // 2
s = smtplib.SMTP("127.0.0.1", port, timeout=20)
s.ehlo("python.test")
"#;

/// smtplib, speaking BDAT by hand (it has no CHUNKING of its own): a
/// message in two pipelined chunks reaches the peer as it was sent, and a
/// chunk over the size limit is answered 552 and the session closed.
#[test]
fn smtplib_sends_bdat_chunks() {
    if !have("python3", "--version") {
        return;
    }
    let h = Harness::start();
    let script = [BDAT_HEAD, r#"
print("chunking", s.has_extn("chunking"))
s.send(b"MAIL FROM:<+447700900001/TYPE=PLMN@mms.mnc010.mcc001.gprs>\r\nRCPT TO:<" + rcpt.encode() + b">\r\n"
       + b"BDAT %d\r\n" % half + data[:half] + b"BDAT %d LAST\r\n" % (len(data) - half) + data[half:])
for what in ["mail", "rcpt", "chunk", "last"]:
    print(what, *s.getreply())
s.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<" + rcpt.encode() + b">\r\nBDAT 3000000 LAST\r\n")
for what in ["mail2", "rcpt2", "huge", "bye"]:
    print(what, s.getreply()[0])
try:
    print("after", s.noop()[0])
except smtplib.SMTPServerDisconnected:
    print("closed")
"#]
    .concat();
    let msg = h.spool.path().join("msg.eml");
    let body = mm4relay::sim::forward_req(7, TO_A, 1500);
    std::fs::write(&msg, &body).unwrap();
    let (ok, out) = python(
        &script,
        &[
            h.addr.port().to_string(),
            TO_A.into(),
            msg.display().to_string(),
        ],
    );
    assert!(ok, "{out}");
    assert!(out.contains("chunking True"), "{out}");
    assert!(out.contains("chunk 250"), "{out}");
    assert!(out.contains("last 250 b'2.0.0 queued as"), "{out}");
    assert!(out.contains("huge 552") && out.contains("bye 421"), "{out}");
    assert!(out.contains("closed"), "{out}");
    assert!(h.sims[0].wait_for_recipients(1, DEADLINE));
    let got = &h.sims[0].received()[0].data;
    // The peer gets it as sent, after the relay's one Received: line.
    assert!(
        got.starts_with(b"Received: "),
        "{}",
        String::from_utf8_lossy(got)
    );
    assert!(got.ends_with(&body), "{}", String::from_utf8_lossy(got));
}

/// smtplib, speaking BDAT by hand, is between two chunks when the relay
/// is stopped: it is not idle, so it may send its last chunk, gets the 250
/// and then the stop's 421, while an idle session is cut at once.
#[test]
fn smtplib_between_bdat_chunks_at_a_stop_gets_its_message_in() {
    if !have("python3", "--version") {
        return;
    }
    let mut h = Harness::start();
    let script = [BDAT_HEAD, r#"
s.send(b"MAIL FROM:<+447700900001/TYPE=PLMN@mms.mnc010.mcc001.gprs>\r\nRCPT TO:<" + rcpt.encode() + b">\r\n"
       + b"BDAT %d\r\n" % half + data[:half])
for what in ["mail", "rcpt", "chunk"]:
    print(what, s.getreply()[0])
print("ready", flush=True)
sys.stdin.readline()
s.send(b"BDAT %d LAST\r\n" % (len(data) - half) + data[half:])
print("last", s.getreply()[0])
print("then", s.getreply()[0], flush=True)
"#]
    .concat();
    let msg = h.spool.path().join("msg.eml");
    let body = mm4relay::sim::forward_req(8, TO_A, 1500);
    std::fs::write(&msg, &body).unwrap();
    let child = python_command(
        &script,
        &[
            h.addr.port().to_string(),
            TO_A.into(),
            msg.display().to_string(),
        ],
    )
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .spawn()
    .unwrap();
    // Killed, and waited for, however the test ends.
    struct Python(std::process::Child);
    impl Drop for Python {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut py = Python(child);
    let mut said = std::io::BufReader::new(py.0.stdout.take().unwrap());
    let mut out = String::new();
    while !out.ends_with("ready\n") {
        let before = out.len();
        std::io::BufRead::read_line(&mut said, &mut out).unwrap();
        assert!(out.len() > before, "python ended early: {out}");
    }
    assert!(out.contains("chunk 250"), "{out}");
    let stopped = h.stop_past_an_idle_session();
    // The stop has passed the idle sessions: the rest of the message.
    py.0.stdin.take().unwrap().write_all(b"go\n").unwrap();
    std::io::Read::read_to_string(&mut said, &mut out).unwrap();
    assert!(py.0.wait().unwrap().success(), "{out}");
    assert!(out.contains("last 250"), "{out}");
    assert!(out.contains("then 421"), "{out}");
    assert_eq!(stopped.join().unwrap().undelivered, 0);
    assert!(h.sims[0].wait_for_recipients(1, DEADLINE));
    assert!(h.sims[0].received()[0].data.ends_with(&body));
}
