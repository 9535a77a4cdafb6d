//! The CDR files: one per rotation period, written as
//! `mm4relay-<period start>-<first cdr sequence>.csv.open` and renamed to
//! `….csv` once flushed and closed, so a collector of `*.csv` never reads
//! a half-written file. At start a leftover `.open` file (a crash) is cut
//! back to its last whole line and closed.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use log::{info, warn};

use super::row::Row;

/// A row's `cdr_id`: (journal record, row within it).
pub type RowId = (u64, u32);

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
            fs::create_dir_all(dir)?;
            fs::set_permissions(dir, fs::Permissions::from_mode(0o750))
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
            closed: 0,
        };
        Ok((files, names, last))
    }

    /// Queues `row`, written at `now`, to the file open, or to a new one
    /// for `now`'s period named after `first`. Only [`Files::close`]
    /// ends a file (the ledger saves its checkpoint first), so a row may
    /// go to the last period's file until the ledger's next tick.
    pub fn push(&mut self, row: &Row, now: SystemTime, first: u64) -> io::Result<()> {
        if self.current.is_none() {
            self.current = Some(self.create(period_of(now, self.rotate), first)?);
        }
        row.write_to(&mut self.pending);
        Ok(())
    }

    fn create(&mut self, period: SystemTime, first: u64) -> io::Result<Current> {
        let name = format!(
            "mm4relay-{}-{first:020}.csv{OPEN_SUFFIX}",
            crate::mm4::date::compact(period)
        );
        let path = self.dir.join(name);
        let mut file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .mode(0o640)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)?;
        file.set_permissions(fs::Permissions::from_mode(0o640))?;
        let header = Row::header();
        file.write_all(&header)?;
        File::open(&self.dir)?.sync_all()?;
        Ok(Current {
            file,
            path,
            period,
            len: header.len() as u64,
        })
    }

    /// Writes the queued rows to the file (to the system, not yet to the
    /// disk). On failure they stay queued and the file is cut back.
    pub fn write(&mut self) -> io::Result<()> {
        let Some(c) = self.current.as_mut() else {
            return Ok(());
        };
        if self.pending.is_empty() {
            return Ok(());
        }
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

    /// Writes and flushes to the disk.
    pub fn sync(&mut self) -> io::Result<()> {
        self.write()?;
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

    /// Flushes, closes and renames the open file to `*.csv`.
    pub fn close(&mut self) -> io::Result<()> {
        self.sync()?;
        let Some(c) = self.current.take() else {
            return Ok(());
        };
        drop(c.file);
        let done = closed_name(&c.path);
        fs::rename(&c.path, &done)?;
        File::open(&self.dir)?.sync_all()?;
        self.closed += 1;
        info!("cdr: closed {}", done.display());
        Ok(())
    }
}

fn closed_name(open: &Path) -> PathBuf {
    let s = open.to_string_lossy();
    PathBuf::from(s.strip_suffix(OPEN_SUFFIX).unwrap_or(&s).to_string())
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
        } else {
            let done = closed_name(path);
            fs::rename(path, &done)?;
            info!("cdr: closed {} left open by the last run", done.display());
        }
        if let Some(dir) = path.parent() {
            File::open(dir)?.sync_all()?;
        }
    }
    Ok(())
}
