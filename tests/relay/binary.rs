//! The real `mm4relay` binary: configuration errors, `check`, signals,
//! the control socket, the init script, privileges and syslog.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;

use mm4relay::sim::{SimPeer, forward_req};

use crate::support::*;

pub(crate) fn write_config(dir: &tempfile::TempDir, text: &str) -> std::path::PathBuf {
    let path = dir.path().join("mm4relay.ini");
    std::fs::write(&path, text).unwrap();
    path
}

/// Three simulated MMSCs and a directory holding the corpus profile's
/// configuration (`relay_extra` added to `[relay]`) and the spool.
pub(crate) struct Setup {
    pub sims: [SimPeer; 3],
    pub dir: tempfile::TempDir,
    pub spool: PathBuf,
    pub ini: String,
    pub path: PathBuf,
}

pub(crate) fn setup(keep: bool, relay_extra: &str) -> Setup {
    let sims = [0, 1, 2].map(|_| SimPeer::start(keep).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let ini = Profile::default()
        .ini([sims[0].addr(), sims[1].addr(), sims[2].addr()], &spool)
        .replace("[relay]\n", &format!("[relay]\n{relay_extra}"));
    let path = write_config(&dir, &ini);
    Setup {
        sims,
        dir,
        spool,
        ini,
        path,
    }
}

/// Sends one MM4_forward.REQ to `rcpt` through the relay at `addr`.
fn send_one(addr: SocketAddr, rcpt: &str, seq: usize) -> Client {
    let mut c = Client::connect(LOCAL, addr);
    send_forward(&mut c, seq, rcpt, 500);
    c
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

/// An unknown `[relay] user` is a configuration error, found at load:
/// exit 2 naming file, section, key and value, for `check` and `run`.
#[test]
fn an_unknown_relay_user_is_a_configuration_error() {
    let dir = tempfile::tempdir().unwrap();
    let ini = Profile::default()
        .ini(["127.0.0.1:1".parse().unwrap(); 3], dir.path())
        .replace("[relay]\n", "[relay]\nuser = no-such-user-mm4\n");
    let path = write_config(&dir, &ini);
    for cmd in ["check", "run"] {
        let out = Command::new(BIN)
            .args([cmd, "-c"])
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{cmd}: {err}");
        assert!(
            err.contains(&format!(
                "{}: [relay] user = \"no-such-user-mm4\": no such user on this system",
                path.display()
            )),
            "{cmd}: {err}"
        );
    }
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
fn usage_errors_exit_2_and_name_what_is_wrong() {
    let run = |args: &[&str]| {
        let out = Command::new(BIN).args(args).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, _, err) = run(&["frobnicate"]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("unrecognized subcommand 'frobnicate'"),
        "{err}"
    );
    let (code, _, err) = run(&["queue", "list", "--frob"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("'--frob'"), "the option is named: {err}");
    let (code, _, err) = run(&["status", "--watch", "0"]);
    assert_eq!(code, Some(2), "{err}");
    let (code, _, _) = run(&[]);
    assert_eq!(code, Some(2), "no command");
    // Each command has its own help, and says what it does now.
    for (args, says) in [
        (&["--help"][..], "queue"),
        (&["run", "--help"], "SIGHUP re-reads FILE"),
        (&["queue", "-h"], "hold"),
        (&["queue", "delete", "--help"], "<ID>"),
        (&["status", "--help"], "--watch"),
        (&["trace", "--help"], "--since"),
    ] {
        let (code, out, err) = run(args);
        assert_eq!(code, Some(0), "{args:?}: {err}");
        assert!(out.contains(says), "{args:?}: {out}");
    }
    let (_, queue_help, _) = run(&["queue", "--help"]);
    assert!(!queue_help.contains("--pidfile"), "only its own options");
    let (_, out, _) = run(&["--version"]);
    assert!(out.starts_with(concat!("mm4relay ", env!("CARGO_PKG_VERSION"))));
}

/// The man pages and completions come from the same command tree.
#[test]
fn man_pages_and_completions_cover_every_command() {
    let dir = tempfile::tempdir().unwrap();
    // A link left where a page goes is replaced, not written through.
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "keep").unwrap();
    std::os::unix::fs::symlink(&victim, dir.path().join("mm4relay-status.8")).unwrap();
    let out = Command::new(BIN)
        .arg("man")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
    assert!(
        std::fs::symlink_metadata(dir.path().join("mm4relay-status.8"))
            .unwrap()
            .is_file()
    );
    let page = |name: &str| {
        std::fs::read_to_string(dir.path().join(format!("{name}.8")))
            .unwrap_or_else(|e| panic!("{name}.8: {e}"))
    };
    let top = page("mm4relay");
    assert!(top.starts_with(".ie \\n(.g .ds Aq"), "roff: {}", &top[..40]);
    assert!(top.contains(".TH mm4relay 8"), "section 8");
    assert!(top.contains("EXIT STATUS") && top.contains("SIGHUP"));
    for name in [
        "run", "check", "status", "route", "reload", "queue", "trace", "demo",
    ] {
        assert!(
            page(&format!("mm4relay-{name}")).contains(".SH SYNOPSIS"),
            "{name}"
        );
    }
    assert!(page("mm4relay-queue-delete").contains("REASON"));
    if Command::new("man").arg("--version").output().is_ok() {
        let shown = Command::new("man")
            .arg("-l")
            .arg(dir.path().join("mm4relay-status.8"))
            .env("MANWIDTH", "80")
            .output()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&shown.stdout).contains("--watch"),
            "man renders it"
        );
    } else {
        eprintln!("SKIPPED: man is not installed; the pages were not rendered");
    }
    for (shell, says) in [
        ("bash", "complete -F _mm4relay"),
        ("zsh", "#compdef mm4relay"),
    ] {
        let out = Command::new(BIN)
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "{shell}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(says) && text.contains("delete"), "{shell}");
    }
}

#[test]
fn sigterm_stops_cleanly_after_delivering() {
    let s = setup(true, "");
    let mut child = Running::start(&s.path, &[], true);
    let (addr, _, rest) = child.listening();
    let mut c = send_one(addr, TO_B, 7);
    assert!(s.sims[1].wait_for_recipients(1, DEADLINE));

    child.signal("-TERM");
    // The open session is told the relay is going away, then closed.
    assert_eq!(c.reply().code, 421);
    assert!(c.closed());
    let exit = child.terminate();
    assert!(exit.success(), "exit status {exit}");
    let rest = rest.join().unwrap();
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
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("mm4relay.log");
    let s = setup(false, &format!("log_file = {}\n", log.display()));
    let pidfile = s.dir.path().join("mm4relay.pid");
    let mut child = Running::start(&s.path, &["--pidfile".as_ref(), pidfile.as_os_str()], false);
    let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap_or_default();
    wait_until("the relay to listen", || {
        read(&log).contains("listening on")
    });
    assert_eq!(read(&pidfile).trim(), child.0.id().to_string());
    let addr: SocketAddr = read(&log)
        .lines()
        .find_map(|l| l.split("listening on ").nth(1))
        .unwrap()
        .trim()
        .parse()
        .unwrap();

    // logrotate moves the file away, then sends SIGHUP.
    let rotated = logs.path().join("mm4relay.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    child.signal("-HUP");
    wait_until("a new log file", || log.exists());
    send_one(addr, TO_B, 5);
    wait_until("the new file to get the new lines", || {
        read(&log).contains("status=sent")
    });
    assert!(
        read(&rotated).contains("SIGHUP"),
        "the old file ends with the reopen notice"
    );

    // Nothing in the spool or the log is readable by other users.
    use std::os::unix::fs::PermissionsExt as _;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&log), 0o640, "log file");
    assert_eq!(mode(&s.spool), 0o700, "spool directory");
    assert_eq!(mode(&s.spool.join("failed")), 0o700, "failed area");
    let files: Vec<_> = std::fs::read_dir(&s.spool)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    assert!(!files.is_empty());
    for f in files {
        assert_eq!(mode(&f) & 0o077, 0, "{} is readable by others", f.display());
    }

    assert!(child.terminate().success());
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
fn status_and_queue_over_the_control_socket() {
    let s = setup(false, "");
    s.sims[2].set_fault(mm4relay::sim::Fault::TempFail);
    let socket = s.spool.join("control.sock");
    let status = |args: &[&str]| Command::new(BIN).arg("status").args(args).output().unwrap();

    let down = status(&["--socket", socket.to_str().unwrap()]);
    assert_eq!(down.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&down.stderr).contains("mm4relay is not running"));

    let mut child = Running::start(&s.path, &[], true);
    let (addr, _, rest) = child.listening();
    send_one(addr, TO_C, 1);

    let text =
        || String::from_utf8_lossy(&status(&["-c", s.path.to_str().unwrap()]).stdout).into_owned();
    wait_until("C's deferral in the status", || {
        text()
            .lines()
            .any(|l| l.starts_with("C ") && l.split_whitespace().nth(9).is_some_and(|d| d != "0"))
    });
    let table = text();
    assert!(table.starts_with("peer"), "{table}");
    // C's row: its message is queued, so it has an oldest age.
    let c_row = table.lines().find(|l| l.starts_with("C ")).unwrap();
    assert!(
        c_row
            .split_whitespace()
            .nth(7)
            .is_some_and(|a| a.ends_with('s')),
        "{table}"
    );
    assert!(table.contains("listener: sessions_open="), "{table}");
    assert!(
        table.lines().any(|l| l.starts_with("A ")) && table.contains("spool: "),
        "{table}"
    );
    let json =
        String::from_utf8_lossy(&status(&["--socket", socket.to_str().unwrap(), "--json"]).stdout)
            .into_owned();
    assert!(json.starts_with("{\"peers\":[{\"name\":\"A\""), "{json}");

    let queue = |args: &[&str]| {
        let out = Command::new(BIN)
            .arg("queue")
            .args(args)
            .args(["--socket", socket.to_str().unwrap()])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // The deferral reaches the counters a moment before the queue listing.
    wait_until("C's deferral in the queue listing", || {
        queue(&["list", "C"]).1.contains("last_reply=\"451")
    });
    let (code, list, _) = queue(&["list", "C"]);
    assert_eq!(code, Some(0));
    let entry = list.lines().next().unwrap_or_default();
    assert!(
        entry.contains("peer=C") && entry.contains(&format!("to=<{TO_C}>")),
        "{list}"
    );
    assert!(!entry.contains("attempts=0"), "{list}");
    assert!(
        entry.contains(" size=") && entry.contains(" next="),
        "{list}"
    );
    let id = entry.split_whitespace().next().unwrap();
    let (code, show, _) = queue(&["show", id]);
    assert_eq!(code, Some(0));
    assert!(show.contains("attempt failed at"), "history: {show}");
    assert!(
        show.contains("X-Mms-Message-Type: MM4_forward.REQ"),
        "headers: {show}"
    );
    let (_, all, _) = queue(&["list"]);
    assert_eq!(all.lines().count(), 1, "only C has anything queued: {all}");
    let (code, age, _) = queue(&["age"]);
    assert_eq!(code, Some(0));
    let c_row: Vec<&str> = age
        .lines()
        .find(|l| l.starts_with("C "))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(
        (c_row[1], c_row[2]),
        ("1", "1"),
        "C: one message, younger than 5 minutes: {age}"
    );
    let (code, _, err) = queue(&["list", "Z"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("no peer named"), "{err}");

    // status --watch: the table again each second, until interrupted.
    let mut watch = Command::new(BIN)
        .args(["status", "--watch", "1", "--socket"])
        .arg(&socket)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(watch.stdout.take().unwrap()));
    let (mut frames, mut c_rows) = (0, 0);
    while frames < 3 {
        let Some(Ok(line)) = lines.next() else {
            break;
        };
        frames += usize::from(line.starts_with("mm4relay status, every 1s"));
        c_rows += usize::from(line.starts_with("C "));
    }
    watch.kill().unwrap();
    watch.wait().unwrap();
    assert_eq!(frames, 3, "three frames before it was stopped");
    assert!(c_rows >= 2, "each frame holds the table");

    assert!(child.terminate().success());
    rest.join().unwrap();
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
#[ignore = "needs root"]
fn root_is_dropped_before_the_spool_is_touched() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    assert_eq!(my_uid(), Some(0), "needs root to drop privileges");
    let s = setup(false, "user = nobody\n");
    std::fs::set_permissions(s.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut child = Running::start(&s.path, &[], true);
    let (addr, early, rest) = child.listening();
    send_one(addr, TO_B, 3);
    assert!(s.sims[1].wait_for_recipients(1, DEADLINE));
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.0.id())).unwrap();
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .unwrap()
        .to_string();
    assert!(
        uid.split_whitespace().all(|u| u == "65534"),
        "still root: Uid:{uid}"
    );
    assert_eq!(std::fs::metadata(&s.spool).unwrap().uid(), 65534);
    for e in std::fs::read_dir(&s.spool).unwrap() {
        assert_eq!(
            e.unwrap().metadata().unwrap().uid(),
            65534,
            "a spool file not owned by the relay user"
        );
    }
    assert!(child.terminate().success());
    rest.join().unwrap();
    assert!(
        early.iter().any(|l| l.contains("running as user nobody")),
        "{early:?}"
    );
}

#[test]
fn logging_to_syslog() {
    let logs = tempfile::tempdir().unwrap();
    let socket = logs.path().join("log.sock");
    let syslogd = std::os::unix::net::UnixDatagram::bind(&socket).unwrap();
    syslogd.set_read_timeout(Some(DEADLINE)).unwrap();
    let s = setup(
        false,
        &format!(
            "log_target = syslog\nsyslog_facility = mail\nsyslog_socket = {}\n",
            socket.display()
        ),
    );
    let mut child = Running::start(&s.path, &[], false);
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
            child.0.id()
        )),
        "{listening}"
    );
    assert!(
        !listening.contains("[INFO]"),
        "simplelog's own level and time are not repeated: {listening}"
    );
    assert!(child.terminate().success());
}

#[test]
fn reload_refuses_a_broken_file_and_applies_a_good_one() {
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("mm4relay.log");
    let s = setup(false, &format!("log_file = {}\n", log.display()));
    let mut child = Running::start(&s.path, &[], false);
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_until("the relay to listen", || read().contains("listening on"));
    std::fs::write(
        &s.path,
        s.ini
            .replace("max_connections = 4", "max_connections = lots"),
    )
    .unwrap();
    // reload -c would read the socket path from the broken file: name it.
    let out = Command::new(BIN)
        .args(["reload", "--socket"])
        .arg(s.spool.join("control.sock"))
        .output()
        .unwrap();
    // Refused, and said so: to the operator, not only in the log.
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("reload refused") && err.contains("[peer.A] max_connections = \"lots\""),
        "{err}"
    );
    wait_until("the refusal in the log", || {
        read().contains("reload refused")
    });
    std::fs::write(
        &s.path,
        s.ini.replace("mm4_check = strict", "mm4_check = lenient"),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["reload", "-c"])
        .arg(&s.path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("configuration reloaded"));
    wait_until("the good file to apply", || {
        read().contains("configuration reloaded")
    });
    assert!(child.terminate().success());
}

#[test]
fn make_install_lays_out_a_host() {
    if Command::new("make").arg("--version").output().is_err() {
        eprintln!("SKIPPED: make is not installed; make install was not tested");
        return;
    }
    use std::os::unix::fs::PermissionsExt as _;
    let root = tempfile::tempdir().unwrap();
    let install = || {
        let out = Command::new("make")
            .arg("-s")
            .arg("-C")
            .arg(env!("CARGO_MANIFEST_DIR"))
            .arg("install")
            .arg(format!("DESTDIR={}", root.path().display()))
            .arg(format!("BIN={BIN}"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    install();
    let mode = |p: &str| {
        std::fs::metadata(root.path().join(p))
            .unwrap_or_else(|e| panic!("{p}: {e}"))
            .permissions()
            .mode()
            & 0o777
    };
    for (path, want) in [
        ("usr/local/sbin/mm4relay", 0o755),
        ("etc/mm4relay/mm4relay.ini", 0o640),
        ("etc/init.d/mm4relay", 0o755),
        ("etc/systemd/system/mm4relay.service", 0o644),
        ("etc/logrotate.d/mm4relay", 0o644),
        ("var/spool/mm4relay", 0o700),
        ("var/log/mm4relay", 0o750),
    ] {
        assert_eq!(mode(path), want, "{path}");
    }
    // A second install keeps the operator's configuration.
    let ini = root.path().join("etc/mm4relay/mm4relay.ini");
    std::fs::write(&ini, "# mine\n").unwrap();
    install();
    assert_eq!(std::fs::read_to_string(&ini).unwrap(), "# mine\n");
    let out = Command::new(root.path().join("usr/local/sbin/mm4relay"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("TLS: native-tls on OpenSSL"));
}

#[test]
fn a_failed_spool_write_gets_451_and_the_relay_goes_on() {
    use std::os::unix::process::CommandExt;
    let s = setup(true, "spool_segment_size = 1048576\n");
    // B defers: what was accepted stays live in the spool meanwhile.
    s.sims[1].set_fault(mm4relay::sim::Fault::TempFail);
    let mut cmd = Command::new(BIN);
    cmd.args(["run", "-c"])
        .arg(&s.path)
        .stderr(std::process::Stdio::piped());
    // No file of the relay may grow past 128 KiB (ulimit -f): a write to
    // the first segment fails with EFBIG long before it would roll over.
    // SAFETY: setrlimit is async-signal-safe; nothing else runs here.
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 128 << 10,
                rlim_max: 128 << 10,
            };
            match libc::setrlimit(libc::RLIMIT_FSIZE, &limit) {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            }
        });
    }
    let mut relay = Running(cmd.spawn().unwrap());
    let (addr, _, log) = relay.listening();
    let mut c = Client::connect(LOCAL, addr);
    let mut acked = Vec::new();
    let mut refused = None;
    for seq in 0..200 {
        let r = send_message(&mut c, FROM, &[TO_B], &forward_req(seq, TO_B, 2048));
        if r.code == 250 {
            acked.push(seq);
            continue;
        }
        assert_eq!((r.code, &r.text()[..5]), (451, "4.3.0"), "{r}");
        refused = Some(seq);
        break;
    }
    let refused = refused.expect("the file size limit was never reached");
    // The next message goes to a new segment.
    let next = refused + 1;
    send_forward(&mut c, next, TO_B, 2048);
    acked.push(next);
    s.sims[1].set_fault(mm4relay::sim::Fault::None);
    mm4relay::ops::control::request(&s.spool.join("control.sock"), "queue retry B").unwrap();
    assert!(s.sims[1].wait_for_recipients(acked.len() as u64, DEADLINE));
    assert!(relay.terminate().success(), "the relay survived the limit");
    let log = log.join().unwrap();
    assert!(
        log.iter().any(|l| l.contains("new records go to segment")),
        "{log:?}"
    );
    let mut got: Vec<String> = s.sims[1]
        .received()
        .iter()
        .map(|r| tid_of(&r.data))
        .collect();
    got.sort();
    let want: Vec<String> = acked.iter().map(|i| format!("T{i:08}")).collect();
    assert_eq!(got, want, "every 250 arrived once; the 451 never did");
}
