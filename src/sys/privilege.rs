//! Dropping root: started as root to bind ports below 1024, the relay
//! becomes `[relay] user` (and `group`) before it touches the spool, which
//! it first creates or hands over to that user (0700).
//!
//! Before the drop, root also opens the pid file and the log file, which
//! live in directories the relay user may write. [`open_unfollowed`] is
//! how: it neither follows a symbolic link nor accepts a hard link the
//! user planted there to make root write somewhere else.
//!
//! std has no API for users and groups, hence libc: getpwnam_r,
//! getgrnam_r, geteuid, fcntl, setgroups/initgroups, setgid, setuid.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::Path;

fn err(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, what)
}

/// Looks up `name`: its uid, primary gid and name as a C string.
fn user(name: &str) -> io::Result<(libc::uid_t, libc::gid_t, CString)> {
    let cname = CString::new(name).map_err(|_| err(format!("user {name:?} has a NUL")))?;
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; buf outlives the use of pwd.
    let rc = unsafe {
        libc::getpwnam_r(
            cname.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut out,
        )
    };
    if rc != 0 || out.is_null() {
        return Err(err(format!("[relay] user = {name:?}: no such user")));
    }
    Ok((pwd.pw_uid, pwd.pw_gid, cname))
}

/// The uid of `name`, the `[relay] user`.
pub fn uid_of(name: &str) -> io::Result<libc::uid_t> {
    user(name).map(|(uid, _, _)| uid)
}

/// The gid of `name`, the `[relay] group`.
pub fn gid_of(name: &str) -> io::Result<libc::gid_t> {
    group(name)
}

fn group(name: &str) -> io::Result<libc::gid_t> {
    let cname = CString::new(name).map_err(|_| err(format!("group {name:?} has a NUL")))?;
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut out: *mut libc::group = std::ptr::null_mut();
    // SAFETY: as in `user`.
    let rc = unsafe {
        libc::getgrnam_r(
            cname.as_ptr(),
            &mut grp,
            buf.as_mut_ptr(),
            buf.len(),
            &mut out,
        )
    };
    if rc != 0 || out.is_null() {
        return Err(err(format!("[relay] group = {name:?}: no such group")));
    }
    Ok(grp.gr_gid)
}

/// Becomes `user` (and `group`), after giving `dirs` (each named by its
/// key, for errors) to them.
pub fn drop_to(
    user_name: &str,
    group_name: Option<&str>,
    dirs: &[(&str, &Path)],
) -> io::Result<()> {
    let (uid, user_gid, cname) = user(user_name)?;
    let gid = match group_name {
        Some(g) => group(g)?,
        None => user_gid,
    };
    // SAFETY: plain system calls without pointers.
    let current = unsafe { libc::geteuid() };
    if current == uid {
        return Ok(());
    }
    if current != 0 {
        return Err(err(format!(
            "[relay] user = {user_name:?} needs the relay to be started as root"
        )));
    }
    for (what, path) in dirs {
        hand_over(what, path, user_name, uid, gid)?;
    }
    // Supplementary groups first (needs root), then the group, then the user.
    // SAFETY: cname is a valid C string; the rest are plain values.
    unsafe {
        if libc::initgroups(cname.as_ptr(), gid as _) != 0
            || libc::setgid(gid) != 0
            || libc::setuid(uid) != 0
        {
            return Err(io::Error::last_os_error());
        }
        // Root must be gone for good.
        if libc::setuid(0) == 0 {
            return Err(err("could not drop root".into()));
        }
    }
    log::info!("running as user {user_name} (uid {uid}, gid {gid})");
    Ok(())
}

/// Creates directory `path` if missing and gives it to the user; refuses
/// a symbolic link there.
fn hand_over(
    what: &str,
    path: &Path,
    user_name: &str,
    uid: libc::uid_t,
    gid: libc::gid_t,
) -> io::Result<()> {
    std::fs::create_dir_all(path)?;
    // chown(2) on the path would follow a symbolic link planted there and
    // hand its target to the user: change the directory we opened instead.
    let dir = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| {
            if path
                .symlink_metadata()
                .is_ok_and(|m| m.file_type().is_symlink())
            {
                err(format!(
                    "{what} {} is a symbolic link: refusing to hand it to user {user_name}",
                    path.display()
                ))
            } else {
                io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
            }
        })?;
    std::os::unix::fs::fchown(&dir, Some(uid), Some(gid))
}

/// Opens `path` for writing as root may on the relay user's behalf (the
/// pid file, the log file), so that the user cannot point it elsewhere.
///
/// `options` says how (create, append or write, mode); it must not
/// truncate, since the file may only be changed once it passed the checks.
/// The last component of `path` is not followed if it is a symbolic link
/// (O_NOFOLLOW). Then the opened file itself must be a regular file with
/// one hard link (another name of a file elsewhere is refused), owned by
/// this process's effective uid or by `relay_uid`. Each refusal names
/// `what`, the path and the reason. The directories on the way are
/// trusted: none of them may be writable by anyone but root, except the
/// one holding the file.
pub fn open_unfollowed(
    path: &Path,
    what: &str,
    options: &OpenOptions,
    relay_uid: Option<libc::uid_t>,
) -> io::Result<File> {
    let refuse = |why: String| {
        err(format!(
            "{what} {} {why}: refusing to write it",
            path.display()
        ))
    };
    let mut options = options.clone();
    // O_NONBLOCK: a FIFO planted there must not block the open for good;
    // O_NOCTTY: nor may a terminal become the relay's controlling one.
    options.custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY);
    let file = options
        .open(path)
        .map_err(|e| match path.symlink_metadata() {
            Ok(m) if m.file_type().is_symlink() => refuse("is a symbolic link".into()),
            Ok(m) if !m.file_type().is_file() => refuse("is not a regular file".into()),
            _ => io::Error::new(
                e.kind(),
                format!("cannot open {what} {}: {e}", path.display()),
            ),
        })?;
    // From here on, what was opened, whatever the path names by now.
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(refuse("is not a regular file".into()));
    }
    if meta.nlink() != 1 {
        return Err(refuse(format!("has {} hard links", meta.nlink())));
    }
    // SAFETY: a plain system call without pointers.
    let euid = unsafe { libc::geteuid() };
    if meta.uid() != euid && Some(meta.uid()) != relay_uid {
        let us = if euid == 0 {
            "root".to_string()
        } else {
            format!("uid {euid}")
        };
        let allowed = match relay_uid {
            Some(u) if u != euid => format!("{us} or the relay user (uid {u})"),
            _ => us,
        };
        return Err(refuse(format!(
            "is owned by uid {}, not by {allowed}",
            meta.uid()
        )));
    }
    // A regular file: writes block as usual again.
    let fd = file.as_raw_fd();
    // SAFETY: fd is open for as long as `file` lives; no pointers.
    let cleared = unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) == 0
    };
    if !cleared {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}
