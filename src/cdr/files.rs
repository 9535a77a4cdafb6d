//! The CDR files: one per rotation period, written as
//! `mm4relay-<period start>-<first cdr sequence>.csv.open` and renamed to
//! `….csv` once flushed and closed, so a collector of `*.csv` never reads
//! a half-written file. At start a leftover `.open` file (a crash) is cut
//! back to its last whole line and closed.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use log::{info, warn};

use super::row::Row;

/// A row's `cdr_id`: (journal record, row within it).
pub type RowId = (u64, u32);

/// Octets copied at a time when a removed file is written again.
const COPY_PIECE: usize = 1 << 20;

/// Suffix of the file being written.
pub const OPEN_SUFFIX: &str = ".open";

/// The file being written.
struct Current {
    file: File,
    path: PathBuf,
    /// Its period's start.
    period: SystemTime,
    /// Octets in the file that are whole rows.
    len: u64,
}

/// The CDR directory and its file being written.
pub struct Files {
    dir: PathBuf,
    rotate: Duration,
    current: Option<Current>,
    /// Rows not yet written to the file (kept over a failed write).
    pending: Vec<u8>,
    /// The period and first row of the file to create for `pending` when
    /// none is open.
    next: Option<(SystemTime, u64)>,
    /// Files closed since start.
    pub closed: u64,
}

/// The start of the rotation period holding `t`, periods being aligned on
/// the epoch (an hour starts on the hour).
fn period_of(t: SystemTime, rotate: Duration) -> SystemTime {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let r = rotate.as_secs().max(1);
    UNIX_EPOCH + Duration::from_secs(secs - secs % r)
}

/// Refuses a directory that is a symbolic link; creates it (0750) if
/// missing.
fn prepare_dir(dir: &Path) -> io::Result<()> {
    match fs::symlink_metadata(dir) {
        Ok(m) if m.file_type().is_symlink() => Err(io::Error::other(format!(
            "{} is a symbolic link: refusing to write CDRs there",
            dir.display()
        ))),
        Ok(m) if !m.is_dir() => Err(io::Error::other(format!(
            "{} is not a directory",
            dir.display()
        ))),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            DirBuilder::new().recursive(true).mode(0o750).create(dir)
        }
        Err(e) => Err(e),
    }
}

impl Files {
    /// Opens the directory and cuts what a crash left open back to its
    /// last whole row; returns those files and the last row found in them
    /// (by `cdr_id`). The caller records that row, then closes them
    /// ([`close_leftovers`]): a closed leftover's rows must never be
    /// written again, even if it is collected before the next start.
    pub fn open(dir: &Path, rotate: Duration) -> io::Result<(Files, Vec<PathBuf>, Option<RowId>)> {
        prepare_dir(dir)?;
        let mut last = None;
        let mut names: Vec<PathBuf> = fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("mm4relay-") && n.ends_with(".csv.open"))
            })
            .collect();
        names.sort();
        for path in &names {
            if let Some(id) = cut_leftover(path)? {
                last = last.max(Some(id));
            }
        }
        let files = Files {
            dir: dir.to_path_buf(),
            rotate,
            current: None,
            pending: Vec::new(),
            next: None,
            closed: 0,
        };
        Ok((files, names, last))
    }

    /// Queues `row`, written at `now`, for the file open, or for a new one
    /// for `now`'s period named after `first` (made by the next
    /// [`Files::write`]). Only [`Files::close`] ends a file (the ledger
    /// saves its checkpoint first), so a row may go to the last period's
    /// file until the ledger's next tick.
    pub fn push(&mut self, row: &Row, now: SystemTime, first: u64) {
        if self.current.is_none() && self.next.is_none() {
            self.next = Some((period_of(now, self.rotate), first));
        }
        row.write_to(&mut self.pending);
    }

    fn create(&mut self, period: SystemTime, first: u64) -> io::Result<Current> {
        let name = format!(
            "mm4relay-{}-{first:020}.csv{OPEN_SUFFIX}",
            crate::mm4::date::compact(period)
        );
        let path = self.dir.join(name);
        let header = Row::header();
        let file = new_file(&path, &header)?;
        Ok(Current {
            file,
            path,
            period,
            len: header.len() as u64,
        })
    }

    /// Pending octets: rows not yet written to a file.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Forgets the pending rows (the open file stays as it is).
    pub fn drop_pending(&mut self) {
        self.pending = Vec::new();
    }

    /// Makes sure the open file is still in the directory under its name:
    /// if it was removed (or the directory with it), its rows so far are
    /// written again to a new file of that name. Until then nothing is
    /// flushed, so the checkpoint waits.
    fn still_there(&mut self) -> io::Result<()> {
        let Some(c) = self.current.as_mut() else {
            return Ok(());
        };
        let ours = c.file.metadata()?;
        if same_file(&c.path, &ours) && ours.nlink() > 0 {
            return Ok(());
        }
        prepare_dir(&self.dir)?;
        let file = new_file(&c.path, &[])?;
        // Copied a piece at a time: an hour's file may be large.
        let mut piece = vec![0; COPY_PIECE];
        let mut at = 0;
        let copied = loop {
            if at >= c.len {
                break file.sync_data();
            }
            let n = COPY_PIECE.min((c.len - at) as usize);
            if let Err(e) = c
                .file
                .read_exact_at(&mut piece[..n], at)
                .and_then(|()| (&file).write_all(&piece[..n]))
            {
                break Err(e);
            }
            at += n as u64;
        };
        if let Err(e) = copied {
            let _ = fs::remove_file(&c.path);
            return Err(e);
        }
        warn!(
            "cdr: {} was removed while open: its {} octets written again",
            c.path.display(),
            c.len
        );
        c.file = file;
        Ok(())
    }

    /// Writes the queued rows to the file, creating it first if none is
    /// open (to the system, not yet to the disk). On failure they stay
    /// queued and the file is cut back.
    pub fn write(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        if self.current.is_none() {
            let Some((period, first)) = self.next else {
                return Ok(());
            };
            self.current = Some(self.create(period, first)?);
            self.next = None;
        }
        let Some(c) = self.current.as_mut() else {
            return Ok(());
        };
        match c.file.write_all(&self.pending) {
            Ok(()) => {
                c.len += self.pending.len() as u64;
                self.pending.clear();
                Ok(())
            }
            Err(e) => {
                let _ = c.file.set_len(c.len);
                Err(e)
            }
        }
    }

    /// Writes and flushes to the disk (the file checked to be still there).
    pub fn sync(&mut self) -> io::Result<()> {
        self.write()?;
        self.still_there()?;
        match &self.current {
            Some(c) => c.file.sync_data(),
            None => Ok(()),
        }
    }

    /// True when the file open belongs to a period before `now`'s.
    pub fn due(&self, now: SystemTime) -> bool {
        self.current
            .as_ref()
            .is_some_and(|c| c.period != period_of(now, self.rotate))
    }

    /// Flushes, closes and renames the open file to `*.csv`. On failure
    /// the file stays open, to be closed by a later call (or, after a
    /// stop, by the next start).
    pub fn close(&mut self) -> io::Result<()> {
        self.sync()?;
        let Some(c) = self.current.as_ref() else {
            return Ok(());
        };
        let done = publish(&c.path)?;
        self.current = None;
        self.closed += 1;
        info!("cdr: closed {}", done.display());
        Ok(())
    }
}

/// `….csv.open` as `….csv`, or `…-N.csv` for the `n`th other name.
fn closed_name(open: &Path, n: u32) -> PathBuf {
    let s = open.to_string_lossy();
    let base = s.strip_suffix(OPEN_SUFFIX).unwrap_or(&s);
    if n == 0 {
        return PathBuf::from(base);
    }
    let stem = base.strip_suffix(".csv").unwrap_or(base);
    PathBuf::from(format!("{stem}-{n}.csv"))
}

/// Most other names tried for a closed file whose name is taken.
const MAX_NAMES: u32 = 1000;

/// Makes the file at `path` (0640, never over another) holding `head`,
/// flushed with its directory entry; on failure nothing is left there.
fn new_file(path: &Path, head: &[u8]) -> io::Result<File> {
    let file = OpenOptions::new()
        .create_new(true)
        .read(true)
        .append(true)
        .mode(0o640)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let done = file
        .set_permissions(fs::Permissions::from_mode(0o640))
        .and_then(|()| (&file).write_all(head))
        .and_then(|()| file.sync_data())
        .and_then(|()| File::open(dir)?.sync_all());
    match done {
        Ok(()) => Ok(file),
        Err(e) => {
            // A disk full after the inode was made: the next try makes
            // the same name again.
            let _ = fs::remove_file(path);
            Err(e)
        }
    }
}

/// Gives the open file at `open` its closed name, never over a file
/// already there (a spool started afresh numbers its rows from 1 again):
/// the first free one of `….csv`, `…-1.csv`… It is renamed with
/// RENAME_NOREPLACE, atomically; where the kernel or file system lacks it,
/// linked under the new name then unlinked (a crash between the two leaves
/// both names on one file: the next start finds it closed already and only
/// unlinks the open name). Once the file has its closed name this returns
/// it, even if the directory could not be flushed after.
fn publish(open: &Path) -> io::Result<PathBuf> {
    let ours = fs::symlink_metadata(open)?;
    for n in 0..MAX_NAMES {
        let done = closed_name(open, n);
        match rename_noreplace(open, &done) {
            Ok(()) => {
                sync_dir(open);
                return Ok(done);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                if same_file(&done, &ours) {
                    // Linked there by a run without RENAME_NOREPLACE.
                    return publish_linked(open, n, &ours);
                }
            }
            Err(e) if unsupported(&e) => return publish_linked(open, n, &ours),
            Err(e) => return Err(e),
        }
    }
    Err(names_taken(open))
}

/// The error when every closed name of `open` is taken.
fn names_taken(open: &Path) -> io::Error {
    io::Error::other(format!(
        "{}: {MAX_NAMES} closed names taken",
        open.display()
    ))
}

/// True when `path` is the file `ours` describes.
fn same_file(path: &Path, ours: &fs::Metadata) -> bool {
    fs::symlink_metadata(path).is_ok_and(|m| m.dev() == ours.dev() && m.ino() == ours.ino())
}

/// [`publish`] by link and unlink, from the `from`th name on.
fn publish_linked(open: &Path, from: u32, ours: &fs::Metadata) -> io::Result<PathBuf> {
    for n in from..MAX_NAMES {
        let done = closed_name(open, n);
        match fs::hard_link(open, &done) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                if !same_file(&done, ours) {
                    continue;
                }
            }
            Err(e) => return Err(e),
        }
        if let Err(e) = fs::remove_file(open) {
            warn!(
                "cdr: {} closed as {}, but {e}",
                open.display(),
                done.display()
            );
        }
        sync_dir(open);
        return Ok(done);
    }
    Err(names_taken(open))
}

/// True for the errors of a kernel (before 3.15) or file system without
/// RENAME_NOREPLACE.
fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOSYS | libc::EINVAL | libc::ENOTSUP)
    )
}

/// rename(2) that fails with EEXIST rather than replace `to`. Through the
/// system call itself: glibc has a wrapper only since 2.28, and the
/// release binary runs on 2.17.
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(io::Error::other);
    let (from, to) = (c(from)?, c(to)?);
    // SAFETY: both paths are NUL-terminated and outlive the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Flushes the directory holding `path`; a failure is logged (the rename
/// is done, and will reach the disk with the next flush).
fn sync_dir(path: &Path) {
    let dir = path.parent().unwrap_or(Path::new("."));
    if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
        warn!("cdr: cannot flush {}: {e}", dir.display());
    }
}

/// Cuts a leftover file back to its last whole row and flushes it.
/// Returns its last row's `cdr_id`.
fn cut_leftover(path: &Path) -> io::Result<Option<(u64, u32)>> {
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    let mut data = Vec::new();
    f.read_to_end(&mut data)?;
    let whole = data.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    if whole < data.len() {
        warn!(
            "cdr: {}: cutting {} octets of a torn last row",
            path.display(),
            data.len() - whole
        );
        f.set_len(whole as u64)?;
    }
    let body = &data[..whole];
    let last = body
        .split(|&b| b == b'\n')
        .rev()
        .filter(|l| !l.is_empty())
        .find_map(|l| Row::parse(l).and_then(|r| r.cdr_id()));
    f.sync_all()?;
    Ok(last)
}

/// Closes the files a crash left open (see [`Files::open`]): renamed to
/// `*.csv`, or removed when they hold no row.
pub fn close_leftovers(paths: &[PathBuf]) -> io::Result<()> {
    for path in paths {
        let data = fs::read(path)?;
        let rows = data
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .count();
        if rows <= 1 {
            fs::remove_file(path)?;
            if let Some(dir) = path.parent() {
                File::open(dir)?.sync_all()?;
            }
        } else {
            let done = publish(path)?;
            info!("cdr: closed {} left open by the last run", done.display());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(event: &str) -> Row {
        let mut r = Row::default();
        r.0[0] = event.into();
        r
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// The name of the one file in `dir`, and the first field of each of
    /// its lines (the header's first).
    fn the_one_file(dir: &Path) -> (String, Vec<String>) {
        let [name] = &names(dir)[..] else {
            panic!("one file: {:?}", names(dir));
        };
        let data = fs::read_to_string(dir.join(name)).unwrap();
        let firsts = data
            .lines()
            .map(|l| l[..l.find(',').unwrap()].to_string())
            .collect();
        (name.clone(), firsts)
    }

    #[test]
    fn rows_wait_for_a_file_that_cannot_be_made_yet() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("cdr");
        let (mut files, _, _) = Files::open(&dir, Duration::from_secs(3600)).unwrap();
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o750
        );
        fs::remove_dir(&dir).unwrap();
        let t = UNIX_EPOCH + Duration::from_secs(7200);
        files.push(&row("sent"), t, 5);
        assert!(files.sync().is_err(), "no directory to write in");
        fs::create_dir(&dir).unwrap();
        files.push(&row("failed"), t, 6);
        files.sync().unwrap();
        files.close().unwrap();
        let (name, events) = the_one_file(&dir);
        assert!(name.ends_with("-00000000000000000005.csv"), "{name}");
        assert_eq!(events[1..], ["sent", "failed"], "kept, in order, once");
    }

    #[test]
    fn a_file_removed_while_open_is_written_again_before_a_flush() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("cdr");
        let t = UNIX_EPOCH + Duration::from_secs(7200);
        let (mut files, _, _) = Files::open(&dir, Duration::from_secs(3600)).unwrap();
        files.push(&row("sent"), t, 1);
        files.sync().unwrap();
        // An operator's rm -rf of the directory, which comes back later.
        fs::remove_dir_all(&dir).unwrap();
        files.push(&row("failed"), t, 2);
        files.sync().unwrap();
        files.close().unwrap();
        let (name, events) = the_one_file(&dir);
        assert_eq!(events, ["event", "sent", "failed"], "{name}");
    }

    #[test]
    fn a_closed_name_taken_is_never_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let t = UNIX_EPOCH + Duration::from_secs(7200);
        let (mut files, _, _) = Files::open(dir, Duration::from_secs(3600)).unwrap();
        files.push(&row("sent"), t, 1);
        files.close().unwrap();
        // A spool started afresh numbers its rows from 1 again.
        files.push(&row("deleted"), t, 1);
        files.close().unwrap();
        let got = names(dir);
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got[0].ends_with("-00000000000000000001-1.csv"), "{got:?}");
        assert!(got[1].ends_with("-00000000000000000001.csv"), "{got:?}");
        let first = fs::read_to_string(dir.join(&got[1])).unwrap();
        assert!(first.lines().nth(1).unwrap().starts_with("sent,"));
    }

    #[test]
    fn a_leftover_closed_already_is_not_closed_twice() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let open = dir.join("mm4relay-19700101T020000Z-00000000000000000001.csv.open");
        let mut data = Row::header();
        let mut r = row("sent");
        r.0[13] = "1.0".into();
        r.write_to(&mut data);
        fs::write(&open, &data).unwrap();
        // A crash between the link and the unlink of the open name.
        fs::hard_link(&open, closed_name(&open, 0)).unwrap();
        let (_, leftovers, last) = Files::open(dir, Duration::from_secs(3600)).unwrap();
        assert_eq!(last, Some((1, 0)));
        close_leftovers(&leftovers).unwrap();
        assert_eq!(
            names(dir),
            ["mm4relay-19700101T020000Z-00000000000000000001.csv"]
        );
    }
}
