//! The packages of `make deb` and `make rpm`. The .deb is installed into
//! the real system (CI runs as root): dpkg -i, the shipped configuration
//! refused, a configuration whose one peer is a simulated MMSC, the init
//! script's start and status, a message through the relay, a log rotation,
//! a reinstall over the running relay, stop, dpkg -r (the configuration
//! kept) and dpkg -P. The .rpm's metadata, files and scripts are read with
//! rpm -qp. The packages come from MM4RELAY_DEB and MM4RELAY_RPM (.ci/run
//! builds them and sets both); without them the tests say SKIPPED.

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::mta::free_port;
use crate::support::{Client, DEADLINE, LOCAL, TO_A, send_forward, tid_of, wait_until};
use mm4relay::sim::SimPeer;

const INI: &str = "/etc/mm4relay/mm4relay.ini";
const INIT: &str = "/etc/init.d/mm4relay";
const PIDFILE: &str = "/run/mm4relay.pid";
const LOG: &str = "/var/log/mm4relay/mm4relay.log";

/// The package file named by `var`, or None after saying loudly why not.
fn package(var: &str, make: &str) -> Option<PathBuf> {
    match std::env::var_os(var) {
        Some(p) => {
            let p = PathBuf::from(p);
            assert!(p.is_file(), "{var}={}: no such file", p.display());
            Some(std::fs::canonicalize(p).unwrap())
        }
        None => {
            eprintln!(
                "SKIPPED: {var} is not set (make {make}, then {var}=dist/...); \
                 the package was not tested"
            );
            None
        }
    }
}

/// Runs `program args` with the clean environment of an init system.
fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("LANG", "C")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"))
}

/// What `program args` printed, which must succeed.
fn ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The init script's exit code for `action`, and what it said.
fn init(action: &str) -> (Option<i32>, String) {
    let out = run(INIT, &[action]);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), said)
}

/// The relay's pid from its pid file.
fn pid() -> Option<u32> {
    std::fs::read_to_string(PIDFILE).ok()?.trim().parse().ok()
}

/// True if process `pid` exists and is no zombie.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit(") ").next().is_some_and(|f| !f.starts_with('Z')))
}

/// The uid of `user`, if it exists.
fn uid_of(user: &str) -> Option<u32> {
    let out = run("id", &["-u", user]);
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().parse().unwrap())
}

/// (mode, uid, gid) of `path`.
fn stat(path: &str) -> (u32, u32, u32) {
    let m = std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    (m.permissions().mode() & 0o7777, m.uid(), m.gid())
}

/// Purges the package when dropped, the relay stopped first: nothing the
/// test started outlives it, even when it fails half-way.
struct Installed {
    purged: bool,
}

impl Drop for Installed {
    fn drop(&mut self) {
        if self.purged {
            return;
        }
        if Path::new(INIT).exists() {
            let _ = run(INIT, &["stop"]);
        }
        if let Some(pid) = pid() {
            let _ = run("kill", &["-KILL", &pid.to_string()]);
        }
        let _ = run("dpkg", &["--purge", "mm4relay"]);
    }
}

/// The one configuration the test runs: the packaged layout and user, a
/// listener on `port`, peer A (local) at the simulated MMSC `sim`.
fn config(port: u16, sim: std::net::SocketAddr) -> String {
    format!(
        "[relay]\n\
         hostname = relay.test\n\
         user = mm4relay\n\
         group = mm4relay\n\
         spool_dir = /var/spool/mm4relay\n\
         log_file = {LOG}\n\
         control_socket = /var/spool/mm4relay/control.sock\n\
         shutdown_timeout = 5s\n\
         [listener]\n\
         listen = 127.0.0.1:{port}\n\
         relay_from = {LOCAL}/32\n\
         [peer.A]\n\
         hosts = {sim}\n\
         domains = mms.mnc010.mcc001.gprs\n\
         prefixes = +447700900\n\
         local = yes\n"
    )
}

/// Sends MM4_forward.REQ number `seq` to A through the relay and waits
/// for the simulated MMSC to have `total` recipients.
fn deliver(port: u16, sim: &SimPeer, seq: usize, total: u64) {
    let mut c = Client::connect(LOCAL, ([127, 0, 0, 1], port).into());
    send_forward(&mut c, seq, TO_A, 2048);
    assert!(
        sim.wait_for_recipients(total, DEADLINE),
        "the simulated MMSC did not get message {seq}; log:\n{}",
        std::fs::read_to_string(LOG).unwrap_or_default()
    );
    let got = sim.received();
    assert_eq!(tid_of(&got.last().unwrap().data), format!("T{seq:08}"));
}

fn log_has(needle: &str) -> bool {
    std::fs::read_to_string(LOG).is_ok_and(|l| l.contains(needle))
}

#[test]
#[ignore = "needs root"]
fn the_deb_installs_runs_a_message_and_removes() {
    let Some(deb) = package("MM4RELAY_DEB", "deb") else {
        return;
    };
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "dpkg -i needs root");
    let status = run("dpkg-query", &["-W", "-f=${Status}", "mm4relay"]);
    assert!(
        String::from_utf8_lossy(&status.stdout)
            .split_whitespace()
            .last()
            != Some("installed"),
        "mm4relay is already installed on this host; this test installs and \
         purges it: dpkg -P mm4relay first"
    );
    assert!(pid().is_none(), "{PIDFILE} exists: is a relay running?");

    // Install: the user, the files, nothing started.
    let mut installed = Installed { purged: false };
    let said = ok("dpkg", &["-i", deb.to_str().unwrap()]);
    eprintln!("dpkg -i: {}", said.trim());
    let uid = uid_of("mm4relay").expect("the mm4relay user");
    let passwd = ok("getent", &["passwd", "mm4relay"]);
    assert!(passwd.contains(":/var/spool/mm4relay:"), "{passwd}");
    assert!(uid < 1000, "not a system user: {passwd}");
    let gid = ok("getent", &["group", "mm4relay"])
        .split(':')
        .nth(2)
        .unwrap()
        .trim()
        .parse::<u32>()
        .unwrap();
    for (path, want) in [
        ("/usr/sbin/mm4relay", (0o755, 0, 0)),
        (INI, (0o640, 0, gid)),
        (INIT, (0o755, 0, 0)),
        ("/lib/systemd/system/mm4relay.service", (0o644, 0, 0)),
        ("/etc/logrotate.d/mm4relay", (0o644, 0, 0)),
        ("/var/spool/mm4relay", (0o700, uid, gid)),
        ("/var/log/mm4relay", (0o750, uid, gid)),
        ("/usr/share/man/man8/mm4relay.8.gz", (0o644, 0, 0)),
        (
            "/usr/share/bash-completion/completions/mm4relay",
            (0o644, 0, 0),
        ),
        ("/usr/share/zsh/vendor-completions/_mm4relay", (0o644, 0, 0)),
    ] {
        assert_eq!(stat(path), want, "{path}: (mode, uid, gid)");
    }
    let conffiles = ok("dpkg-query", &["-W", "-f=${Conffiles}", "mm4relay"]);
    for f in [INI, INIT, "/etc/logrotate.d/mm4relay"] {
        assert!(conffiles.contains(f), "{f} is no conffile: {conffiles}");
    }
    let script = std::fs::read_to_string(INIT).unwrap();
    assert!(script.contains("DAEMON=${DAEMON:-/usr/sbin/mm4relay}"));
    let unit = std::fs::read_to_string("/lib/systemd/system/mm4relay.service").unwrap();
    assert!(unit.contains("ExecStart=/usr/sbin/mm4relay run -c /etc/mm4relay/mm4relay.ini"));
    assert!(!unit.contains("/usr/local"), "{unit}");
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok()
    {
        ok(
            "systemd-analyze",
            &["verify", "/lib/systemd/system/mm4relay.service"],
        );
    }
    let version = ok("/usr/sbin/mm4relay", &["--version"]);
    assert!(version.contains(env!("CARGO_PKG_VERSION")), "{version}");

    // As shipped, the configuration names no real peer: not running, and
    // the init script refuses to start it (LSB 6: not configured).
    assert_eq!(init("status").0, Some(3), "the install started the relay");
    let (code, said) = init("start");
    assert_eq!(code, Some(6), "{said}");
    assert!(said.contains("CHANGE-ME"), "{said}");
    eprintln!("start with the shipped file: exit 6, {}", said.trim());
    assert_eq!(init("status").0, Some(3));
    // ... and nothing else is wrong with it: real hosts make it valid.
    let shipped = std::fs::read_to_string(INI).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let configured = dir.path().join("configured.ini");
    std::fs::write(&configured, shipped.replace("CHANGE-ME", "127.0.0.1:25")).unwrap();
    ok(
        "/usr/sbin/mm4relay",
        &["check", "-c", configured.to_str().unwrap()],
    );

    // Configured: one peer, the simulated MMSC. Written in place, so the
    // file keeps its owner and mode.
    let sim = SimPeer::start(true).unwrap();
    let port = free_port();
    std::fs::write(INI, config(port, sim.addr())).unwrap();
    assert_eq!(stat(INI), (0o640, 0, gid));
    let (code, said) = init("start");
    assert_eq!(code, Some(0), "start: {said}");
    let (code, said) = init("status");
    assert_eq!(code, Some(0), "status: {said}");
    eprintln!("start, then status: {}", said.trim());
    wait_until("the relay to listen", || log_has("listening on"));
    let relay = pid().expect("a pid file");
    let proc_status = std::fs::read_to_string(format!("/proc/{relay}/status")).unwrap();
    let uids = proc_status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .unwrap();
    assert!(
        uids.split_whitespace().all(|u| u == uid.to_string()),
        "the relay is not running as mm4relay: Uid:{uids}"
    );
    deliver(port, &sim, 1, 1);
    wait_until("the disposition in the log", || log_has("status=sent"));
    let peers = ok("/usr/sbin/mm4relay", &["status", "-c", INI]);
    assert!(
        peers
            .lines()
            .any(|l| l.starts_with("A ") && l.contains(" ok ")),
        "{peers}"
    );
    eprintln!("mm4relay status -c {INI}:\n{}", peers.trim_end());
    // Without -c the control commands read the packaged configuration.
    assert_eq!(
        ok("/usr/sbin/mm4relay", &["status"]).lines().next(),
        peers.lines().next()
    );
    // The man page installed renders.
    if Command::new("man").arg("--version").output().is_ok() {
        let page = ok("man", &["-P", "cat", "8", "mm4relay-queue"]);
        assert!(page.contains("hold"), "{page}");
    }
    // Made by the relay at start (root makes nothing in the relay user's
    // directory) and given to that user.
    assert_eq!(stat(LOG), (0o640, uid, gid), "{LOG}");
    eprintln!("delivered: message T00000001 reached the simulated MMSC");

    // The packaged logrotate file: the relay makes the new log itself.
    if Command::new("logrotate").arg("--version").output().is_ok() {
        let state = dir.path().join("logrotate.state");
        ok(
            "logrotate",
            &[
                "--force",
                "--state",
                state.to_str().unwrap(),
                "/etc/logrotate.d/mm4relay",
            ],
        );
        assert!(Path::new(&format!("{LOG}.1")).exists(), "not rotated");
        // logrotate makes no new file (nocreate): the relay does, at the
        // SIGHUP of postrotate.
        wait_until("the relay to reopen its log", || Path::new(LOG).exists());
        deliver(port, &sim, 2, 2);
        wait_until("a new log with the next disposition", || {
            log_has("T00000002")
        });
        let (mode, owner, _) = stat(LOG);
        assert_eq!((mode, owner), (0o640, uid), "the new log");
        eprintln!("logrotate: the relay reopened {LOG} as mm4relay");
    } else {
        eprintln!("SKIPPED: logrotate is not installed; the packaged rotation was not tested");
        deliver(port, &sim, 2, 2);
    }

    // A reinstall over the running relay keeps the operator's file and
    // restarts the relay on the new binary.
    let ours = std::fs::read_to_string(INI).unwrap();
    let starts = || {
        std::fs::read_to_string(LOG)
            .unwrap_or_default()
            .matches("listening on")
            .count()
    };
    let before = starts();
    ok("dpkg", &["-i", deb.to_str().unwrap()]);
    assert_eq!(std::fs::read_to_string(INI).unwrap(), ours);
    assert_eq!(stat(INI), (0o640, 0, gid));
    assert_eq!(init("status").0, Some(0), "not running after the reinstall");
    let restarted = pid().expect("a pid file");
    assert_ne!(restarted, relay, "the reinstall did not restart the relay");
    eprintln!("reinstalled: the file kept, the relay restarted (pid {relay} -> {restarted})");
    wait_until("the restarted relay to listen", || starts() > before);
    deliver(port, &sim, 3, 3);

    let (code, said) = init("stop");
    assert_eq!(code, Some(0), "stop: {said}");
    assert_eq!(init("status").0, Some(3), "still running after stop");
    assert!(pid().is_none(), "the pid file outlived the relay");
    assert!(!alive(restarted), "the relay outlived stop");
    eprintln!("stopped");

    // Removed: the binary goes, the configuration (a conffile) stays, and
    // the init script left with it says the relay is not installed.
    ok("dpkg", &["-r", "mm4relay"]);
    assert!(!Path::new("/usr/sbin/mm4relay").exists());
    assert_eq!(std::fs::read_to_string(INI).unwrap(), ours);
    let state = ok("dpkg-query", &["-W", "-f=${Status}", "mm4relay"]);
    assert_eq!(state, "deinstall ok config-files");
    assert_eq!(init("start").0, Some(5), "LSB 5: not installed");
    // Purged: the configuration, the log and the spool go; the user stays.
    ok("dpkg", &["-P", "mm4relay"]);
    installed.purged = true;
    for gone in [
        INI,
        "/etc/mm4relay",
        INIT,
        "/etc/logrotate.d/mm4relay",
        "/var/log/mm4relay",
        "/var/spool/mm4relay",
    ] {
        assert!(!Path::new(gone).exists(), "{gone} outlived the purge");
    }
    assert_eq!(uid_of("mm4relay"), Some(uid), "the user went");
    eprintln!("removed (configuration kept), then purged; user mm4relay kept");
    sim.stop();
}

#[test]
#[ignore = "needs the package: make rpm, then MM4RELAY_RPM"]
fn the_rpm_has_its_metadata_files_and_scripts() {
    let Some(rpm) = package("MM4RELAY_RPM", "rpm") else {
        return;
    };
    let rpm = rpm.to_str().unwrap();
    let info = ok("rpm", &["-qip", rpm]);
    eprintln!("rpm -qip:\n{info}");
    let field = |name: &str| {
        info.lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == name).then(|| v.trim().to_string())
            })
            .unwrap_or_else(|| panic!("no {name} in:\n{info}"))
    };
    assert_eq!(field("Name"), "mm4relay");
    assert_eq!(field("Version"), env!("CARGO_PKG_VERSION"));
    assert_eq!(field("Release"), "1");
    assert_eq!(field("Architecture"), "x86_64");
    assert_eq!(field("License"), env!("CARGO_PKG_LICENSE"));

    let files = ok("rpm", &["-qlp", rpm]);
    let files: Vec<&str> = files.lines().collect();
    for want in [
        "/usr/sbin/mm4relay",
        "/etc/mm4relay/mm4relay.ini",
        "/etc/rc.d/init.d/mm4relay",
        "/usr/lib/systemd/system/mm4relay.service",
        "/etc/logrotate.d/mm4relay",
        "/usr/share/man/man8/mm4relay.8",
        "/usr/share/bash-completion/completions/mm4relay",
        "/usr/share/zsh/site-functions/_mm4relay",
    ] {
        assert!(files.contains(&want), "{want} not in {files:?}");
    }
    assert!(
        files.iter().all(|f| !f.starts_with("/usr/local")),
        "{files:?}"
    );

    let config = ok("rpm", &["-qcp", rpm]);
    let mut config: Vec<&str> = config.lines().collect();
    config.sort();
    assert_eq!(config, ["/etc/logrotate.d/mm4relay", INI]);
    // Flags (c: config, n: noreplace), owners and modes of each file.
    let table = ok(
        "rpm",
        &[
            "-qp",
            "--queryformat",
            "[%{FILENAMES} %{FILEFLAGS:fflags} %{FILEUSERNAME}:%{FILEGROUPNAME} %{FILEMODES:perms}\n]",
            rpm,
        ],
    );
    let row = |path: &str| {
        table
            .lines()
            .find(|l| l.split(' ').next() == Some(path))
            .unwrap_or_else(|| panic!("{path} not in:\n{table}"))
            .split(' ')
            .skip(1)
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(row(INI), "cn root:mm4relay -rw-r-----");
    assert_eq!(row("/usr/sbin/mm4relay"), " root:root -rwxr-xr-x");

    // The scripts: the user before the files, a stop before an erase.
    let scripts = ok("rpm", &["-qp", "--scripts", rpm]);
    let scriptlet = |name: &str| {
        scripts
            .split(&format!("{name} scriptlet"))
            .nth(1)
            .unwrap_or_else(|| panic!("no {name} scriptlet:\n{scripts}"))
            .split(" scriptlet (")
            .next()
            .unwrap()
            .to_string()
    };
    assert!(scriptlet("preinstall").contains("useradd -r"), "{scripts}");
    let post = scriptlet("postinstall");
    for dir in ["-m 0700 /var/spool/mm4relay", "-m 0750 /var/log/mm4relay"] {
        assert!(post.contains(dir), "{post}");
    }
    assert!(
        scriptlet("preuninstall").contains("mm4relay stop"),
        "{scripts}"
    );
    let requires = ok("rpm", &["-qRp", rpm]);
    eprintln!("rpm -qRp:\n{requires}");
    assert!(requires.contains("/bin/sh"), "{requires}");
}
