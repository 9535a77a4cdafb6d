//! The real `mm4relay` binary: configuration errors, `check`, and a clean
//! stop on SIGTERM with nothing in flight lost.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mm4relay::sim::{SimPeer, forward_req};

use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_mm4relay");

/// The relay as a child process, killed if the test fails half-way.
struct Running(std::process::Child);

impl std::ops::Deref for Running {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Running {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn write_config(dir: &tempfile::TempDir, text: &str) -> std::path::PathBuf {
    let path = dir.path().join("mm4relay.ini");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn check_names_file_section_key_and_value() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        &dir,
        "[listener]\nlisten = 127.0.0.1:0\n[peer.A]\nhosts = 127.0.0.1:1\nmax_connections = lots\n",
    );
    let out = Command::new(BIN)
        .args(["check", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "{}: [peer.A] max_connections = \"lots\": expected a whole number",
            path.display()
        )),
        "{err}"
    );
}

#[test]
fn check_prints_peers_and_routes() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        &dir,
        &Profile::default().ini(["127.0.0.1:1".parse().unwrap(); 3], dir.path()),
    );
    let out = Command::new(BIN)
        .args(["check", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("ported +12025550177 -> C"), "{text}");
    assert!(text.contains("+1202555"), "{text}");
}

#[test]
fn usage_errors_exit_2() {
    let out = Command::new(BIN).arg("frobnicate").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown command"));
    for args in [
        &["--help"][..],
        &["run", "--help"],
        &["queue", "-h"],
        &["status", "--help"],
    ] {
        let out = Command::new(BIN).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("mm4relay queue list"),
            "{args:?}"
        );
    }
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .starts_with(concat!("mm4relay ", env!("CARGO_PKG_VERSION")))
    );
}

#[test]
fn sigterm_stops_cleanly_after_delivering() {
    let sims = [
        SimPeer::start(true).unwrap(),
        SimPeer::start(true).unwrap(),
        SimPeer::start(true).unwrap(),
    ];
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        &dir,
        &Profile::default().ini(
            [sims[0].addr(), sims[1].addr(), sims[2].addr()],
            &dir.path().join("spool"),
        ),
    );
    let mut child = Running(
        Command::new(BIN)
            .args(["run", "-c"])
            .arg(&path)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut log = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    let addr = loop {
        line.clear();
        assert!(
            log.read_line(&mut line).unwrap() > 0,
            "relay exited before listening"
        );
        if let Some(rest) = line.split("listening on ").nth(1) {
            break rest.trim().parse().unwrap();
        }
    };
    let rcpt = "+12025550142/TYPE=PLMN@mms.mnc020.mcc001.gprs";
    let mut c = Client::connect(LOCAL, addr);
    let reply = send_message(
        &mut c,
        "+447700900001/TYPE=PLMN@mms.mnc010.mcc001.gprs",
        &[rcpt],
        &forward_req(7, rcpt, 800),
    );
    assert_eq!(reply.code, 250);
    assert!(sims[1].wait_for_recipients(1, DEADLINE));

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    // The open session is told the relay is going away, then closed.
    assert_eq!(c.reply().code, 421);
    assert!(c.closed());
    let end = Instant::now() + DEADLINE;
    let exit = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > end {
            child.kill().unwrap();
            panic!("relay did not stop after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(exit.success(), "exit status {exit}");
    let rest: Vec<String> = log.lines().map(Result::unwrap).collect();
    assert!(
        rest.iter()
            .any(|l| l.contains("status=sent") && l.contains("mid=M00000007")),
        "{rest:?}"
    );
    assert!(
        rest.iter().any(|l| l.contains("nothing left to deliver")),
        "{rest:?}"
    );
}

#[test]
fn pidfile_and_sighup_reopening_the_log() {
    let sims = [
        SimPeer::start(false).unwrap(),
        SimPeer::start(false).unwrap(),
        SimPeer::start(false).unwrap(),
    ];
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("mm4relay.log");
    let ini = Profile::default().ini(
        [sims[0].addr(), sims[1].addr(), sims[2].addr()],
        &dir.path().join("spool"),
    );
    let path = write_config(
        &dir,
        &ini.replace(
            "[relay]\n",
            &format!("[relay]\nlog_file = {}\n", log.display()),
        ),
    );
    let pidfile = dir.path().join("mm4relay.pid");
    let mut child = Running(
        Command::new(BIN)
            .args(["run", "-c"])
            .arg(&path)
            .arg("--pidfile")
            .arg(&pidfile)
            .spawn()
            .unwrap(),
    );
    let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap_or_default();
    wait_until("the relay to listen", || {
        read(&log).contains("listening on")
    });
    assert_eq!(read(&pidfile).trim(), child.id().to_string());
    let addr: std::net::SocketAddr = read(&log)
        .lines()
        .find_map(|l| l.split("listening on ").nth(1))
        .unwrap()
        .trim()
        .parse()
        .unwrap();

    // logrotate moves the file away, then sends SIGHUP.
    let rotated = dir.path().join("mm4relay.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    assert!(
        Command::new("kill")
            .args(["-HUP", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    wait_until("a new log file", || log.exists());
    let rcpt = "+12025550142/TYPE=PLMN@mms.mnc020.mcc001.gprs";
    let mut c = Client::connect(LOCAL, addr);
    let from = "+447700900001/TYPE=PLMN@mms.mnc010.mcc001.gprs";
    assert_eq!(
        send_message(&mut c, from, &[rcpt], &forward_req(5, rcpt, 500)).code,
        250
    );
    wait_until("the new file to get the new lines", || {
        read(&log).contains("status=sent")
    });
    assert!(
        read(&rotated).contains("SIGHUP"),
        "the old file ends with the reopen notice"
    );

    assert!(
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let end = Instant::now() + DEADLINE;
    let exit = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < end, "relay did not stop");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(exit.success());
    assert!(!pidfile.exists(), "the pid file is removed at exit");
}

#[test]
fn init_script_start_status_reload_stop() {
    let sims = [
        SimPeer::start(false).unwrap(),
        SimPeer::start(false).unwrap(),
        SimPeer::start(false).unwrap(),
    ];
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("mm4relay.log");
    let ini = Profile::default().ini(
        [sims[0].addr(), sims[1].addr(), sims[2].addr()],
        &dir.path().join("spool"),
    );
    let config = write_config(
        &dir,
        &ini.replace(
            "[relay]\n",
            &format!("[relay]\nlog_file = {}\n", log.display()),
        ),
    );
    let pidfile = dir.path().join("mm4relay.pid");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/init.d/mm4relay");
    let run = |action: &str| {
        Command::new("sh")
            .arg(script)
            .arg(action)
            .env("DAEMON", BIN)
            .env("CONFIG", &config)
            .env("PIDFILE", &pidfile)
            .env("STOP_TIMEOUT", "20")
            .output()
            .unwrap()
            .status
            .code()
    };
    /// Kills the daemon if the test fails before `stop`.
    struct Cleanup(std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            if let Ok(pid) = std::fs::read_to_string(&self.0) {
                let _ = Command::new("kill").args(["-KILL", pid.trim()]).status();
            }
        }
    }
    let _cleanup = Cleanup(pidfile.clone());
    assert_eq!(run("status"), Some(3), "not running yet");
    assert_eq!(run("start"), Some(0));
    assert_eq!(run("status"), Some(0));
    assert_eq!(run("reload"), Some(0));
    wait_until("the reload to reach the daemon", || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("SIGHUP")
    });
    assert_eq!(run("stop"), Some(0));
    assert_eq!(run("status"), Some(3));
    assert!(!pidfile.exists());
    assert!(std::fs::read_to_string(&log).unwrap().contains("stopped"));
}

#[test]
fn status_over_the_control_socket() {
    let sims = [
        SimPeer::start(false).unwrap(),
        SimPeer::start(false).unwrap(),
        SimPeer::start(false).unwrap(),
    ];
    sims[2].set_fault(mm4relay::sim::Fault::TempFail);
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let path = write_config(
        &dir,
        &Profile::default().ini([sims[0].addr(), sims[1].addr(), sims[2].addr()], &spool),
    );
    let socket = spool.join("control.sock");
    let status = |args: &[&str]| Command::new(BIN).arg("status").args(args).output().unwrap();

    let down = status(&["--socket", socket.to_str().unwrap()]);
    assert_eq!(down.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&down.stderr).contains("mm4relay is not running"));

    let mut child = Running(
        Command::new(BIN)
            .args(["run", "-c"])
            .arg(&path)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut log = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    let addr: std::net::SocketAddr = loop {
        line.clear();
        assert!(
            log.read_line(&mut line).unwrap() > 0,
            "relay exited before listening"
        );
        if let Some(rest) = line.split("listening on ").nth(1) {
            break rest.trim().parse().unwrap();
        }
    };
    let drain = std::thread::spawn(move || log.lines().count());
    let rcpt = "+61491570156/TYPE=PLMN@mms.mnc456.mcc999.gprs";
    let mut c = Client::connect(LOCAL, addr);
    let from = "+447700900001/TYPE=PLMN@mms.mnc010.mcc001.gprs";
    assert_eq!(
        send_message(&mut c, from, &[rcpt], &forward_req(1, rcpt, 500)).code,
        250
    );

    let text =
        || String::from_utf8_lossy(&status(&["-c", path.to_str().unwrap()]).stdout).into_owned();
    wait_until("C's deferral in the status", || {
        text()
            .lines()
            .any(|l| l.starts_with("C ") && l.split_whitespace().nth(8).is_some_and(|d| d != "0"))
    });
    let table = text();
    assert!(table.starts_with("peer"), "{table}");
    assert!(
        table.lines().any(|l| l.starts_with("A ")) && table.contains("spool: "),
        "{table}"
    );
    let json =
        String::from_utf8_lossy(&status(&["--socket", socket.to_str().unwrap(), "--json"]).stdout)
            .into_owned();
    assert!(json.starts_with("{\"peers\":[{\"name\":\"A\""), "{json}");

    assert!(
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    assert!(child.wait().unwrap().success());
    drain.join().unwrap();
    assert!(!socket.exists(), "the socket is removed at exit");
}

/// The effective uid of this process, from /proc.
fn my_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[test]
fn root_is_dropped_before_the_spool_is_touched() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    if my_uid() != Some(0) {
        eprintln!("skipped: needs root to drop privileges");
        return;
    }
    let sims = [
        SimPeer::start(false).unwrap(),
        SimPeer::start(false).unwrap(),
        SimPeer::start(false).unwrap(),
    ];
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let spool = dir.path().join("spool");
    let ini = Profile::default().ini([sims[0].addr(), sims[1].addr(), sims[2].addr()], &spool);
    let path = write_config(&dir, &ini.replace("[relay]\n", "[relay]\nuser = nobody\n"));
    let mut child = Running(
        Command::new(BIN)
            .args(["run", "-c"])
            .arg(&path)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut log = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    let mut early = Vec::new();
    let addr: std::net::SocketAddr = loop {
        line.clear();
        assert!(
            log.read_line(&mut line).unwrap() > 0,
            "relay exited before listening"
        );
        if let Some(rest) = line.split("listening on ").nth(1) {
            break rest.trim().parse().unwrap();
        }
        early.push(line.clone());
    };
    let drain = std::thread::spawn(move || log.lines().map_while(Result::ok).collect::<Vec<_>>());
    let rcpt = "+12025550142/TYPE=PLMN@mms.mnc020.mcc001.gprs";
    let mut c = Client::connect(LOCAL, addr);
    let from = "+447700900001/TYPE=PLMN@mms.mnc010.mcc001.gprs";
    assert_eq!(
        send_message(&mut c, from, &[rcpt], &forward_req(3, rcpt, 500)).code,
        250
    );
    assert!(sims[1].wait_for_recipients(1, DEADLINE));
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .unwrap()
        .to_string();
    assert!(
        uid.split_whitespace().all(|u| u == "65534"),
        "still root: Uid:{uid}"
    );
    assert_eq!(std::fs::metadata(&spool).unwrap().uid(), 65534);
    for e in std::fs::read_dir(&spool).unwrap() {
        assert_eq!(
            e.unwrap().metadata().unwrap().uid(),
            65534,
            "a spool file not owned by the relay user"
        );
    }
    assert!(
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    assert!(child.wait().unwrap().success());
    drain.join().unwrap();
    assert!(
        early.iter().any(|l| l.contains("running as user nobody")),
        "{early:?}"
    );
}

#[test]
fn logging_to_syslog() {
    let sims = [
        SimPeer::start(false).unwrap(),
        SimPeer::start(false).unwrap(),
        SimPeer::start(false).unwrap(),
    ];
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("log.sock");
    let syslogd = std::os::unix::net::UnixDatagram::bind(&socket).unwrap();
    syslogd.set_read_timeout(Some(DEADLINE)).unwrap();
    let ini = Profile::default().ini(
        [sims[0].addr(), sims[1].addr(), sims[2].addr()],
        &dir.path().join("spool"),
    );
    let ini = ini.replace(
        "[relay]\n",
        &format!(
            "[relay]\nlog_target = syslog\nsyslog_facility = mail\nsyslog_socket = {}\n",
            socket.display()
        ),
    );
    let path = write_config(&dir, &ini);
    let mut child = Running(
        Command::new(BIN)
            .args(["run", "-c"])
            .arg(&path)
            .spawn()
            .unwrap(),
    );
    let mut buf = [0u8; 4096];
    let listening = loop {
        let n = syslogd.recv(&mut buf).expect("a syslog message");
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        if msg.contains("listening on") {
            break msg;
        }
    };
    // mail (2) * 8 + info (6) = 22, tagged with the program and its pid.
    assert!(listening.starts_with("<22>"), "{listening}");
    assert!(
        listening.contains(&format!(
            "mm4relay[{}]: listening on 127.0.0.1:",
            child.id()
        )),
        "{listening}"
    );
    assert!(
        !listening.contains("[INFO]"),
        "simplelog's own level and time are not repeated: {listening}"
    );
    assert!(
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    assert!(child.wait().unwrap().success());
}

#[test]
fn reload_refuses_a_broken_file_and_applies_a_good_one() {
    let sims = [
        SimPeer::start(false).unwrap(),
        SimPeer::start(false).unwrap(),
        SimPeer::start(false).unwrap(),
    ];
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("mm4relay.log");
    let spool = dir.path().join("spool");
    let ini = Profile::default().ini([sims[0].addr(), sims[1].addr(), sims[2].addr()], &spool);
    let ini = ini.replace(
        "[relay]\n",
        &format!("[relay]\nlog_file = {}\n", log.display()),
    );
    let path = write_config(&dir, &ini);
    let mut child = Running(
        Command::new(BIN)
            .args(["run", "-c"])
            .arg(&path)
            .spawn()
            .unwrap(),
    );
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_until("the relay to listen", || read().contains("listening on"));
    let reload = || {
        let out = Command::new(BIN)
            .args(["reload", "-c"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    std::fs::write(
        &path,
        ini.replace("max_connections = 4", "max_connections = lots"),
    )
    .unwrap();
    // reload -c would read the socket path from the broken file: name it.
    let out = Command::new(BIN)
        .args(["reload", "--socket"])
        .arg(spool.join("control.sock"))
        .output()
        .unwrap();
    assert!(out.status.success());
    wait_until("the broken file to be refused", || {
        read().contains("reload refused")
    });
    assert!(
        read().contains("[peer.A] max_connections = \"lots\""),
        "{}",
        read()
    );
    std::fs::write(
        &path,
        ini.replace("mm4_check = strict", "mm4_check = lenient"),
    )
    .unwrap();
    reload();
    wait_until("the good file to apply", || {
        read().contains("configuration reloaded")
    });
    assert!(
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    assert!(child.wait().unwrap().success());
}
