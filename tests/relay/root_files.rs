//! Files that root opens before it drops to `[relay] user` (issue 11,
//! item 6): the pid file, the log file and the spool directory live where
//! that user may write, so a symbolic or hard link planted there must not
//! make root write, append to or hand over anything else.

use std::os::unix::fs::MetadataExt as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use crate::binary::{Setup, setup};
use crate::support::*;

const PRECIOUS: &str = "precious, not to be touched\n";

/// Runs `mm4relay run -c CONFIG` plus `args`, which must fail before it
/// listens: the exit code and what it printed on stderr.
fn refused(s: &Setup, args: &[&std::ffi::OsStr]) -> (Option<i32>, String) {
    let mut child = Command::new(BIN)
        .args(["run", "-c"])
        .arg(&s.path)
        .args(args)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let end = Instant::now() + DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the relay started instead of refusing");
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    (status.code(), err)
}

/// A file outside the relay's reach that an attack would aim at.
fn victim(s: &Setup) -> std::path::PathBuf {
    let path = s.dir.path().join("victim");
    std::fs::write(&path, PRECIOUS).unwrap();
    path
}

/// Rewrites the configuration with `[relay] log_file = log`.
fn set_log_file(s: &Setup, log: &Path) {
    let ini = s.ini.replace(
        "[relay]\n",
        &format!("[relay]\nlog_file = {}\n", log.display()),
    );
    std::fs::write(&s.path, ini).unwrap();
}

fn assert_untouched(victim: &Path) {
    assert_eq!(std::fs::read_to_string(victim).unwrap(), PRECIOUS);
}

#[test]
fn a_pid_file_that_is_a_symlink_is_refused() {
    let s = setup(false, "");
    let victim = victim(&s);
    let pidfile = s.dir.path().join("mm4relay.pid");
    std::os::unix::fs::symlink(&victim, &pidfile).unwrap();
    let (code, err) = refused(&s, &["--pidfile".as_ref(), pidfile.as_os_str()]);
    assert_ne!(code, Some(0), "{err}");
    assert!(
        err.contains(&format!(
            "mm4relay: pid file {} is a symbolic link: refusing to write it",
            pidfile.display()
        )),
        "{err}"
    );
    assert_untouched(&victim);
    assert!(pidfile.symlink_metadata().unwrap().is_symlink());
}

#[test]
fn a_pid_file_that_is_a_fifo_is_refused_without_blocking() {
    let s = setup(false, "");
    let pidfile = s.dir.path().join("mm4relay.pid");
    assert!(
        Command::new("mkfifo")
            .arg(&pidfile)
            .status()
            .unwrap()
            .success()
    );
    let (code, err) = refused(&s, &["--pidfile".as_ref(), pidfile.as_os_str()]);
    assert_ne!(code, Some(0), "{err}");
    assert!(
        err.contains(&format!(
            "pid file {} is not a regular file: refusing to write it",
            pidfile.display()
        )),
        "{err}"
    );
}

#[test]
fn a_log_file_that_is_a_symlink_is_refused() {
    let s = setup(false, "");
    let victim = victim(&s);
    let log = s.dir.path().join("mm4relay.log");
    std::os::unix::fs::symlink(&victim, &log).unwrap();
    set_log_file(&s, &log);
    let (code, err) = refused(&s, &[]);
    assert_ne!(code, Some(0), "{err}");
    assert!(
        err.contains(&format!(
            "mm4relay: log file {} is a symbolic link: refusing to write it",
            log.display()
        )),
        "{err}"
    );
    assert_untouched(&victim);
}

#[test]
fn a_hard_linked_log_file_is_refused() {
    let s = setup(false, "");
    let victim = victim(&s);
    let log = s.dir.path().join("mm4relay.log");
    std::fs::hard_link(&victim, &log).unwrap();
    set_log_file(&s, &log);
    let (code, err) = refused(&s, &[]);
    assert_ne!(code, Some(0), "{err}");
    assert!(
        err.contains(&format!(
            "mm4relay: log file {} has 2 hard links: refusing to write it",
            log.display()
        )),
        "{err}"
    );
    assert_untouched(&victim);
}

#[test]
#[ignore = "needs root"]
fn a_log_file_owned_by_another_user_is_refused() {
    let s = setup(false, "user = nobody\n");
    let log = s.dir.path().join("mm4relay.log");
    std::fs::write(&log, PRECIOUS).unwrap();
    std::os::unix::fs::chown(&log, Some(4242), None).unwrap();
    set_log_file(&s, &log);
    let (code, err) = refused(&s, &[]);
    assert_ne!(code, Some(0), "{err}");
    assert!(
        err.contains(&format!(
            "mm4relay: log file {} is owned by uid 4242, not by root or the relay user \
             (uid 65534): refusing to write it",
            log.display()
        )),
        "{err}"
    );
    assert_untouched(&log);
}

#[test]
#[ignore = "needs root"]
fn a_symlinked_spool_dir_is_not_handed_to_the_relay_user() {
    let s = setup(false, "user = nobody\n");
    let victim = s.dir.path().join("victim");
    std::fs::create_dir(&victim).unwrap();
    std::os::unix::fs::symlink(&victim, &s.spool).unwrap();
    let (code, err) = refused(&s, &[]);
    assert_ne!(code, Some(0), "{err}");
    assert!(
        err.contains(&format!(
            "mm4relay: spool_dir {} is a symbolic link: refusing to hand it to user nobody",
            s.spool.display()
        )),
        "{err}"
    );
    let meta = std::fs::metadata(&victim).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (0, 0), "the target changed hands");
    assert_eq!(std::fs::read_dir(&victim).unwrap().count(), 0);
}
