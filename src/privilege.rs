//! Dropping root: started as root to bind ports below 1024, the relay
//! becomes `[relay] user` (and `group`) before it touches the spool, which
//! it first creates or hands over to that user (0700).
//!
//! std has no API for users and groups, hence libc: getpwnam_r,
//! getgrnam_r, chown, setgroups/initgroups, setgid, setuid.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
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

/// Becomes `user` (and `group`), after giving `spool_dir` to them.
pub fn drop_to(user_name: &str, group_name: Option<&str>, spool_dir: &Path) -> io::Result<()> {
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
    std::fs::create_dir_all(spool_dir)?;
    let path = CString::new(spool_dir.as_os_str().as_bytes())
        .map_err(|_| err("spool_dir has a NUL".into()))?;
    // SAFETY: path is a valid C string.
    if unsafe { libc::chown(path.as_ptr(), uid, gid) } != 0 {
        return Err(io::Error::last_os_error());
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
