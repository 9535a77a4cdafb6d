//! `trace`: every CDR row about one queue ID, transaction ID, message ID,
//! number or address, read from the CDR directory fast enough for a day
//! of files (~43 million rows, ~10 GB) in seconds.
//!
//! Files are read in large chunks and searched for the needle as a plain
//! substring (`memchr::memmem`); only the lines holding it are parsed and
//! matched field by field. Up to two threads share the work, the files cut
//! into byte ranges: a range owns the lines that start inside it.

use std::cmp::Ordering;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::num::NonZeroUsize;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{self, AtomicUsize};
use std::thread;
use std::time::SystemTime;

use memchr::memmem::Finder;
use memchr::{memchr, memrchr};

use super::row::{Row, col};
use crate::mm4::date;

/// Octets read at a time, per thread.
const CHUNK: usize = 16 << 20;
/// Longest byte range of a file a thread takes at a time.
const RANGE: u64 = 64 << 20;
/// Threads at most (the relay keeps running beside a trace).
const THREADS: usize = 2;
/// Read past a range's end to finish its last line (a row is ~43 KB at most).
const SLACK: usize = 64 << 10;

// Columns `print` shows that `row::col` does not name.
const PEER: usize = 8;
const STATUS: usize = 10;
const REPLY: usize = 11;
const ATTEMPTS: usize = 12;
const LATENCY: usize = 18;

/// What to trace.
#[derive(Clone, Debug)]
pub struct Query {
    /// A queue ID, transaction ID or message ID (exact), a number (`+`
    /// optional, 3 to 20 digits) or a whole `from`/`to` address.
    pub what: String,
    /// Only rows at or after this time; files wholly before it are not read.
    pub since: Option<SystemTime>,
}

/// What [`search`] found.
#[derive(Clone, Debug, Default)]
pub struct Found {
    /// The matching rows, by time (ties by `cdr_id`, then as read).
    pub rows: Vec<Row>,
    /// CDR files read.
    pub files: usize,
    /// Their octets (their sizes when opened).
    pub bytes: u64,
}

/// Finds the rows of the CDR files in `dir` that match `q`. Other files,
/// symbolic links, malformed lines and a partial last line are ignored.
pub fn search(dir: &Path, q: &Query) -> io::Result<Found> {
    search_with(dir, q, CHUNK, RANGE)
}

/// Writes `rows` as a history, one line each: time, event and queue ID,
/// then `peer=`, `to=`, `status=`, `attempts=`, `latency=` (result and
/// report rows only) and `reply=` last as it has spaces, each when set.
pub fn print(rows: &[Row], out: &mut impl Write) -> io::Result<()> {
    for row in rows {
        let f = &row.0;
        write!(
            out,
            "{} {} {}",
            dash(&f[col::TIME]),
            dash(&f[col::EVENT]),
            dash(&f[col::QUEUE_ID])
        )?;
        let latency = matches!(f[col::EVENT].as_str(), "res" | "res_missing" | "report");
        for (key, c, shown) in [
            ("peer", PEER, true),
            ("to", col::TO, true),
            ("status", STATUS, true),
            ("attempts", ATTEMPTS, true),
            ("latency", LATENCY, latency),
            ("reply", REPLY, true),
        ] {
            if shown && !f[c].is_empty() {
                write!(out, " {key}={}", f[c])?;
            }
        }
        writeln!(out)?;
    }
    Ok(())
}

/// `s`, or `-` when it is empty.
fn dash(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}

/// [`search`] with its buffer and range sizes given (the tests use small ones).
fn search_with(dir: &Path, q: &Query, chunk: usize, range: u64) -> io::Result<Found> {
    if q.what.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "trace: nothing to look for",
        ));
    }
    let m = Matcher::new(q);
    let listed = list(dir)?;
    let since = q.since.map(date::compact);
    let mut files = Vec::new();
    for (i, l) in listed.iter().enumerate() {
        // The next file started before `since`: this one's rows are older.
        let old = since
            .as_deref()
            .is_some_and(|s| listed.get(i + 1).is_some_and(|n| n.start.as_str() < s));
        if old {
            continue;
        }
        files.extend(open(&l.path)?);
    }
    let mut units = Vec::new();
    for (file, size) in &files {
        let mut start = 0;
        while start < *size {
            let end = start.saturating_add(range.max(1)).min(*size);
            units.push(Unit { file, start, end });
            start = end;
        }
    }
    let next = AtomicUsize::new(0);
    let threads = thread::available_parallelism()
        .map_or(1, NonZeroUsize::get)
        .min(THREADS)
        .min(units.len())
        .max(1);
    let results: Vec<io::Result<Parts>> = thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| s.spawn(|| work(&units, &next, &m, chunk)))
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| Err(io::Error::other("trace: a reader thread panicked")))
            })
            .collect()
    });
    let mut parts = Vec::new();
    for r in results {
        parts.extend(r?);
    }
    parts.sort_by_key(|(i, _)| *i);
    let mut rows: Vec<Row> = parts.into_iter().flat_map(|(_, rows)| rows).collect();
    rows.sort_by(by_time);
    Ok(Found {
        rows,
        files: files.len(),
        bytes: files.iter().map(|(_, size)| size).sum(),
    })
}

/// Row order: time, then `cdr_id` (a stable sort keeps the rest as read).
fn by_time(a: &Row, b: &Row) -> Ordering {
    a.0[col::TIME]
        .cmp(&b.0[col::TIME])
        .then_with(|| a.cdr_id().cmp(&b.cdr_id()))
}

/// A CDR file of the directory.
struct Listed {
    /// Its start time as its name writes it (compact).
    start: String,
    path: PathBuf,
}

/// The CDR files of `dir` (regular files named as the writer names them),
/// in name order, which is start time order.
fn list(dir: &Path) -> io::Result<Vec<Listed>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        // Not followed: a symbolic link is not a regular file here.
        if !entry.file_type()?.is_file() {
            continue;
        }
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if let Some(start) = start_time(&name).map(str::to_owned) {
            out.push((name, start, entry.path()));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out
        .into_iter()
        .map(|(_, start, path)| Listed { start, path })
        .collect())
}

/// The start time of `mm4relay-<compact time>-<20-digit seq>[-N].csv[.open]`
/// (`-N` when a closed file's name was taken).
fn start_time(name: &str) -> Option<&str> {
    let rest = name.strip_prefix("mm4relay-")?;
    let rest = rest
        .strip_suffix(".csv.open")
        .or_else(|| rest.strip_suffix(".csv"))?;
    let (start, seq) = rest.split_once('-')?;
    let seq = match seq.split_once('-') {
        Some((seq, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => seq,
        Some(_) => return None,
        None => seq,
    };
    let digits = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit());
    let (date, clock) = start.split_once('T')?;
    let clock = clock.strip_suffix('Z')?;
    (digits(date, 8) && digits(clock, 6) && digits(seq, 20)).then_some(start)
}

/// Opens a listed file without following a link: it and its size, or
/// `None` if it is gone or not a regular file. The file being written is
/// renamed when closed: then it is read under its new name.
fn open(path: &Path) -> io::Result<Option<(File, u64)>> {
    let mut options = OpenOptions::new();
    options.read(true).custom_flags(libc::O_NOFOLLOW);
    let file = match options.open(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            match path.to_str().and_then(|p| p.strip_suffix(".open")) {
                Some(closed) => options.open(closed),
                None => Err(e),
            }
        }
        other => other,
    };
    match file {
        Ok(f) => {
            let meta = f.metadata()?;
            Ok(meta.is_file().then_some((f, meta.len())))
        }
        // Gone, or a link put in its place (O_NOFOLLOW).
        Err(e) if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ELOOP) => {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// The lines of `file` that start in `[start, end)`.
struct Unit<'a> {
    file: &'a File,
    start: u64,
    end: u64,
}

/// Rows found, each unit's with the unit's index.
type Parts = Vec<(usize, Vec<Row>)>;

/// A thread's share: units taken in turn until none are left, each
/// unit's rows with its index.
fn work(units: &[Unit], next: &AtomicUsize, m: &Matcher, chunk: usize) -> io::Result<Parts> {
    let mut buf = vec![0; chunk.max(1)];
    let mut out = Vec::new();
    loop {
        let i = next.fetch_add(1, atomic::Ordering::Relaxed);
        let Some(u) = units.get(i) else {
            return Ok(out);
        };
        let mut rows = Vec::new();
        scan(u, &mut buf, m, &mut rows)?;
        if !rows.is_empty() {
            out.push((i, rows));
        }
    }
}

/// The matching rows among the lines of a unit, read through `buf`.
fn scan(u: &Unit, buf: &mut [u8], m: &Matcher, rows: &mut Vec<Row>) -> io::Result<()> {
    // From the octet before `start`: a line starts at `start` if it is `\n`.
    let mut off = u.start.saturating_sub(1); // file offset of buf[0]
    let mut len = 0; // octets of buf read
    let mut skip = u.start > 0; // the first line belongs to the unit before
    loop {
        let ahead = usize::try_from(u.end.saturating_sub(off + len as u64)).unwrap_or(usize::MAX);
        let want = ahead.max(SLACK).min(buf.len() - len);
        let n = fill(u.file, &mut buf[len..len + want], off + len as u64)?;
        len += n;
        let eof = n < want;
        let mut from = 0;
        if skip {
            match memchr(b'\n', &buf[..len]) {
                Some(i) => {
                    from = i + 1;
                    skip = false;
                }
                None if eof => return Ok(()),
                None => {
                    off += len as u64;
                    len = 0;
                    continue;
                }
            }
        }
        let whole = memrchr(b'\n', &buf[from..len]).map_or(from, |i| from + i + 1);
        let owned = usize::try_from(u.end.saturating_sub(off + from as u64)).unwrap_or(usize::MAX);
        lines(&buf[from..whole], owned, m, rows);
        // What follows is a partial last line, or the next unit's.
        if eof || off + whole as u64 >= u.end {
            return Ok(());
        }
        if whole == 0 && len == buf.len() {
            // A line longer than the buffer: no row is; skip it.
            skip = true;
            off += len as u64;
            len = 0;
            continue;
        }
        buf.copy_within(whole..len, 0);
        off += whole as u64;
        len -= whole;
    }
}

/// Reads at `off` until `buf` is full or the file ends; the octets read.
fn fill(file: &File, buf: &mut [u8], mut off: u64) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], off) {
            Ok(0) => break,
            Ok(k) => {
                n += k;
                off += k as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Checks once each line of `data` (whole `\n`-ended lines) that holds
/// the needle and starts before `owned`.
fn lines(data: &[u8], owned: usize, m: &Matcher, rows: &mut Vec<Row>) {
    let mut at = 0;
    while let Some(i) = data.get(at..).and_then(|d| m.finder.find(d)) {
        let hit = at + i;
        let start = memrchr(b'\n', &data[..hit]).map_or(0, |j| j + 1);
        if start >= owned {
            return;
        }
        let end = memchr(b'\n', &data[hit..]).map_or(data.len(), |j| hit + j);
        rows.extend(m.check(&data[start..end]));
        at = end + 1;
    }
}

/// A query made ready: the needle to find, then the exact match.
struct Matcher {
    finder: Finder<'static>,
    what: String,
    /// The digits when `what` is a number.
    number: Option<String>,
    /// `time` at or after this (RFC 3339, compared as text).
    since: Option<String>,
    /// The header line, never a row.
    header: Vec<u8>,
}

impl Matcher {
    fn new(q: &Query) -> Matcher {
        let number = phone(&q.what).map(str::to_owned);
        // As the file has it: a field with a quote is quoted and its
        // quotes doubled.
        let needle = match &number {
            Some(digits) => digits.clone(),
            None => q.what.replace('"', "\"\""),
        };
        let mut header = Row::header();
        header.pop();
        Matcher {
            finder: Finder::new(needle.as_bytes()).into_owned(),
            what: q.what.clone(),
            number,
            since: q.since.map(super::row::time),
            header,
        }
    }

    /// The row on `line` if it matches.
    fn check(&self, line: &[u8]) -> Option<Row> {
        if line == self.header.as_slice() {
            return None;
        }
        let row = Row::parse(line)?;
        let f = &row.0;
        if self.since.as_ref().is_some_and(|s| f[col::TIME] < *s) {
            return None;
        }
        let exact = [
            col::QUEUE_ID,
            col::TRANSACTION_ID,
            col::MESSAGE_ID,
            col::FROM,
            col::TO,
        ]
        .iter()
        .any(|&c| f[c] == self.what);
        let number = self.number.as_deref().is_some_and(|n| {
            [col::FROM, col::TO]
                .iter()
                .any(|&c| address_number(&f[c]) == Some(n))
        });
        (exact || number).then_some(row)
    }
}

/// The digits of `s` if it is a number: `+` optional, 3 to 20 digits.
fn phone(s: &str) -> Option<&str> {
    let d = s.strip_prefix('+').unwrap_or(s);
    ((3..=20).contains(&d.len()) && d.bytes().all(|b| b.is_ascii_digit())).then_some(d)
}

/// The digits of an address's number: `+33612345678/TYPE=PLMN@…` or
/// `33612345678/TYPE=PLMN@…`; `None` for `user@domain`.
fn address_number(a: &str) -> Option<&str> {
    let local = a.split_once('/').map_or(a, |(l, _)| l);
    let d = local.strip_prefix('+').unwrap_or(local);
    (!d.is_empty() && d.bytes().all(|b| b.is_ascii_digit())).then_some(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cdr::row::{COLUMNS, format_id};

    const Q1: &str = "0000019A2B3C4D5E-000001";
    const Q2: &str = "0000019A2B3C4D5E-000002";
    const Q3: &str = "0000019A2B3C4D5E-000003";
    const Q9: &str = "0000019A2B3C4D5E-000009";
    const T1: &str = "T0000000001";
    const M1: &str = "M0000000001@mms.a.net";
    const A: &str = "+33612345678/TYPE=PLMN@mms.a.net";
    const B: &str = "33687654321/TYPE=PLMN@mms.b.net";
    const PLAIN: &str = "user@example.org";
    const DAY: &str = "2026-12-02T";
    const F1: &str = "mm4relay-20261202T200000Z-00000000000000000001.csv";
    const F2: &str = "mm4relay-20261202T210000Z-00000000000000000010.csv";
    const F3: &str = "mm4relay-20261202T220000Z-00000000000000000020.csv.open";

    /// A row of message 1 (from A to B) unless changed after.
    fn row(event: &str, clock: &str, queue: &str, seq: u64) -> Row {
        let mut r = Row::default();
        r.0[col::EVENT] = event.into();
        r.0[col::TIME] = format!("{DAY}{clock}Z");
        r.0[col::QUEUE_ID] = queue.into();
        r.0[col::TRANSACTION_ID] = T1.into();
        r.0[col::MESSAGE_ID] = M1.into();
        r.0[col::FROM] = A.into();
        r.0[col::TO] = B.into();
        r.0[PEER] = "partner_b".into();
        r.0[col::CDR_ID] = format_id(seq, 0);
        r
    }

    fn set(mut r: Row, c: usize, v: &str) -> Row {
        r.0[c] = v.into();
        r
    }

    /// Message 2: from another number to a plain address.
    fn other(event: &str, clock: &str, seq: u64) -> Row {
        let r = row(event, clock, Q2, seq);
        let r = set(r, col::TRANSACTION_ID, "T0000000002");
        let r = set(r, col::MESSAGE_ID, "M0000000002@mms.a.net");
        let r = set(r, col::FROM, "+33611111111/TYPE=PLMN@mms.a.net");
        set(r, col::TO, PLAIN)
    }

    /// Message 3: from a number holding A's digits and one more.
    fn q3() -> Row {
        let r = row("received", "21:06:00.000", Q3, 12);
        let r = set(r, col::TRANSACTION_ID, "T0000000003");
        let r = set(r, col::MESSAGE_ID, "M0000000003@mms.a.net");
        let r = set(r, col::FROM, "+336123456789/TYPE=PLMN@mms.a.net");
        set(r, col::TO, "+33622222222/TYPE=PLMN@mms.b.net")
    }

    fn file(rows: &[Row], tail: &[u8]) -> Vec<u8> {
        let mut out = Row::header();
        for r in rows {
            r.write_to(&mut out);
        }
        out.extend_from_slice(tail);
        out
    }

    /// Three rotated files, and what is not theirs beside them.
    fn fixture() -> (tempfile::TempDir, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let d = dir.path();
        let f1 = file(
            &[
                row("received", "20:10:00.000", Q1, 1),
                other("received", "20:20:00.000", 2),
            ],
            b"",
        );
        // Out of order inside the file; malformed lines with Q1 on them;
        // a longer number holding A's digits.
        let mut torn = Vec::new();
        row("sent", "21:50:00.000", Q1, 99).write_to(&mut torn);
        torn.pop();
        let f2 = file(
            &[
                set(
                    set(
                        set(row("sent", "21:40:00.000", Q1, 11), STATUS, "250"),
                        ATTEMPTS,
                        "2",
                    ),
                    REPLY,
                    "250 2.0.0 Ok: queued as ABC123",
                ),
                set(
                    set(
                        set(row("sent", "21:05:00.000", Q1, 10), STATUS, "451"),
                        ATTEMPTS,
                        "1",
                    ),
                    REPLY,
                    "451 4.3.0 try again",
                ),
                q3(),
            ],
            format!("broken,{Q1},\"unterminated\nonly,three,{Q1}\n{Q1}\n").as_bytes(),
        );
        // A row with a reply holding A's and B's numbers (quoted, with a
        // comma); the result; the delivery report, from B to A under its
        // own queue ID; then a torn last line.
        let f3 = file(
            &[
                set(
                    other("sent", "22:00:30.000", 21),
                    REPLY,
                    "250 ok, for +33612345678 and 33687654321",
                ),
                set(
                    set(row("res", "22:01:00.000", Q1, 20), LATENCY, "1234"),
                    STATUS,
                    "250",
                ),
                set(
                    set(
                        set(
                            row("report", "22:10:00.000", Q9, 22),
                            col::TRANSACTION_ID,
                            "",
                        ),
                        col::FROM,
                        B,
                    ),
                    col::TO,
                    A,
                ),
            ],
            &torn,
        );
        fs::write(d.join(F1), &f1).unwrap();
        fs::write(d.join(F2), &f2).unwrap();
        fs::write(d.join(F3), &f3).unwrap();
        // Not CDR files, though they hold Q1's rows.
        fs::write(d.join("notes.txt"), &f1).unwrap();
        fs::write(d.join("mm4relay-20261202T200000Z-42.csv"), &f1).unwrap();
        fs::write(
            d.join("mm4relay-20261202T230000Z-00000000000000000030.csv.gz"),
            &f1,
        )
        .unwrap();
        let target = outside.path().join("elsewhere.csv");
        fs::write(&target, &f1).unwrap();
        std::os::unix::fs::symlink(
            &target,
            d.join("mm4relay-20261202T233000Z-00000000000000000040.csv"),
        )
        .unwrap();
        fs::create_dir(d.join("mm4relay-20261202T235000Z-00000000000000000050.csv")).unwrap();
        (dir, outside)
    }

    fn query(what: &str) -> Query {
        Query {
            what: what.into(),
            since: None,
        }
    }

    fn at(clock: &str) -> SystemTime {
        // 2026-12-02T00:00:00Z, then hh:mm:ss.
        let (h, rest) = clock.split_once(':').unwrap();
        let (m, s) = rest.split_once(':').unwrap();
        let secs: u64 = h.parse::<u64>().unwrap() * 3600
            + m.parse::<u64>().unwrap() * 60
            + s.parse::<u64>().unwrap();
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_796_169_600 + secs)
    }

    /// (event, time of day, cdr seq) of each row.
    fn seen(found: &Found) -> Vec<(String, String, u64)> {
        found
            .rows
            .iter()
            .map(|r| {
                (
                    r.0[col::EVENT].clone(),
                    r.0[col::TIME][DAY.len()..DAY.len() + 8].to_owned(),
                    r.cdr_id().unwrap().0,
                )
            })
            .collect()
    }

    fn message_1() -> Vec<(String, String, u64)> {
        [
            ("received", "20:10:00", 1),
            ("sent", "21:05:00", 10),
            ("sent", "21:40:00", 11),
            ("res", "22:01:00", 20),
        ]
        .iter()
        .map(|&(e, t, s)| (e.to_owned(), t.to_owned(), s))
        .collect()
    }

    fn with_report() -> Vec<(String, String, u64)> {
        let mut v = message_1();
        v.push(("report".into(), "22:10:00".into(), 22));
        v
    }

    #[test]
    fn columns_are_where_print_expects() {
        assert_eq!(COLUMNS[PEER], "peer");
        assert_eq!(COLUMNS[STATUS], "status");
        assert_eq!(COLUMNS[REPLY], "reply");
        assert_eq!(COLUMNS[ATTEMPTS], "attempts");
        assert_eq!(COLUMNS[LATENCY], "latency");
    }

    #[test]
    fn by_queue_id_in_time_order_across_files() {
        let (dir, _outside) = fixture();
        let found = search(dir.path(), &query(Q1)).unwrap();
        assert_eq!(seen(&found), message_1());
        assert_eq!(found.files, 3);
        let sizes: u64 = [F1, F2, F3]
            .iter()
            .map(|f| fs::metadata(dir.path().join(f)).unwrap().len())
            .sum();
        assert_eq!(found.bytes, sizes);
    }

    #[test]
    fn by_transaction_id_and_message_id() {
        let (dir, _outside) = fixture();
        assert_eq!(seen(&search(dir.path(), &query(T1)).unwrap()), message_1());
        assert_eq!(
            seen(&search(dir.path(), &query(M1)).unwrap()),
            with_report()
        );
        // Exact only: a prefix is not the ID.
        assert!(
            search(dir.path(), &query("T000000000"))
                .unwrap()
                .rows
                .is_empty()
        );
        assert!(
            search(dir.path(), &query("m0000000001@mms.a.net"))
                .unwrap()
                .rows
                .is_empty()
        );
    }

    #[test]
    fn by_number_with_or_without_plus() {
        let (dir, _outside) = fixture();
        for what in ["+33612345678", "33612345678", "+33687654321", "33687654321"] {
            let found = search(dir.path(), &query(what)).unwrap();
            assert_eq!(seen(&found), with_report(), "{what}");
        }
        // Part of a number is not the number.
        assert!(
            search(dir.path(), &query("3361234567"))
                .unwrap()
                .rows
                .is_empty()
        );
        assert!(
            search(dir.path(), &query("12345678"))
                .unwrap()
                .rows
                .is_empty()
        );
    }

    #[test]
    fn by_whole_address() {
        let (dir, _outside) = fixture();
        let found = search(dir.path(), &query(PLAIN)).unwrap();
        let got: Vec<_> = found
            .rows
            .iter()
            .map(|r| r.0[col::QUEUE_ID].as_str())
            .collect();
        assert_eq!(got, [Q2, Q2]);
        let found = search(dir.path(), &query(B)).unwrap();
        assert_eq!(seen(&found), with_report());
        assert!(search(dir.path(), &query("user")).unwrap().rows.is_empty());
    }

    #[test]
    fn a_needle_in_another_field_is_not_a_match() {
        let (dir, _outside) = fixture();
        // Q2's reply holds A's number; Q3's sender holds A's digits and one
        // more: neither is A's.
        let found = search(dir.path(), &query("+33612345678")).unwrap();
        assert!(found.rows.iter().all(|r| r.0[col::QUEUE_ID] != Q2));
        assert!(found.rows.iter().all(|r| r.0[col::QUEUE_ID] != Q3));
        assert!(
            search(dir.path(), &query("ABC123"))
                .unwrap()
                .rows
                .is_empty()
        );
        assert!(
            search(dir.path(), &query("partner_b"))
                .unwrap()
                .rows
                .is_empty()
        );
    }

    #[test]
    fn since_skips_old_files_and_filters_rows() {
        let (dir, _outside) = fixture();
        let q = |clock: &str| Query {
            what: Q1.into(),
            since: Some(at(clock)),
        };
        let found = search(dir.path(), &q("21:30:00")).unwrap();
        assert_eq!(found.files, 2);
        assert_eq!(seen(&found), message_1()[2..]);
        let found = search(dir.path(), &q("22:00:30")).unwrap();
        assert_eq!(found.files, 1);
        assert_eq!(seen(&found), message_1()[3..]);
        // A file's start time is in whole seconds: the one before a file
        // starting at `since` is read.
        let found = search(dir.path(), &q("21:00:00")).unwrap();
        assert_eq!(found.files, 3);
        assert_eq!(seen(&found), message_1()[1..]);
        let found = search(dir.path(), &q("23:00:00")).unwrap();
        assert_eq!(found.files, 1);
        assert!(found.rows.is_empty());
    }

    #[test]
    fn partial_malformed_and_header_lines_are_ignored() {
        let (dir, _outside) = fixture();
        // The torn line (Q1 at 21:50) and the malformed ones with Q1 are
        // in message_1's absence.
        let found = search(dir.path(), &query(Q1)).unwrap();
        assert!(found.rows.iter().all(|r| r.cdr_id() != Some((99, 0))));
        assert_eq!(found.rows.len(), 4);
        assert!(
            search(dir.path(), &query("queue_id"))
                .unwrap()
                .rows
                .is_empty()
        );
        assert!(search(dir.path(), &query("only")).unwrap().rows.is_empty());
        assert!(search(dir.path(), &query("")).is_err());
    }

    #[test]
    fn other_files_links_and_directories_are_ignored() {
        let (dir, outside) = fixture();
        let found = search(dir.path(), &query(Q1)).unwrap();
        assert_eq!(found.files, 3);
        assert_eq!(seen(&found), message_1());
        // The link's target alone, as a CDR file, is found.
        let d = outside.path();
        fs::rename(
            d.join("elsewhere.csv"),
            d.join("mm4relay-20261202T200000Z-00000000000000000001.csv"),
        )
        .unwrap();
        assert_eq!(search(d, &query(Q1)).unwrap().rows.len(), 1);
    }

    #[test]
    fn ranges_and_buffer_sizes_do_not_change_what_is_found() {
        let (dir, _outside) = fixture();
        for what in [Q1, M1, "+33612345678", PLAIN] {
            let whole = search(dir.path(), &query(what)).unwrap();
            for chunk in [700, 1024, 4096] {
                for range in [1, 2, 57, 300, 1000, u64::MAX] {
                    let found = search_with(dir.path(), &query(what), chunk, range).unwrap();
                    assert_eq!(found.rows, whole.rows, "{what} {chunk} {range}");
                    assert_eq!(found.bytes, whole.bytes);
                }
            }
        }
    }

    #[test]
    fn a_line_longer_than_the_buffer_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let long = set(row("sent", "20:00:01.000", Q1, 1), 19, &"x".repeat(3000));
        let rows = [
            row("received", "20:00:00.000", Q1, 0),
            long,
            row("res", "20:00:02.000", Q1, 2),
        ];
        fs::write(dir.path().join(F1), file(&rows, b"")).unwrap();
        let found = search_with(dir.path(), &query(Q1), 1024, u64::MAX).unwrap();
        let got: Vec<_> = found
            .rows
            .iter()
            .map(|r| r.0[col::EVENT].as_str())
            .collect();
        assert_eq!(got, ["received", "res"]);
        assert_eq!(search(dir.path(), &query(Q1)).unwrap().rows.len(), 3);
    }

    #[test]
    fn quoted_ids_are_found() {
        let dir = tempfile::tempdir().unwrap();
        let id = "<\"a,b\"@x>";
        let r = set(row("received", "20:00:00.000", Q1, 0), col::MESSAGE_ID, id);
        fs::write(dir.path().join(F1), file(&[r], b"")).unwrap();
        assert_eq!(search(dir.path(), &query(id)).unwrap().rows.len(), 1);
    }

    #[test]
    fn prints_a_short_history() {
        let (dir, _outside) = fixture();
        let found = search(dir.path(), &query(Q1)).unwrap();
        let mut out = Vec::new();
        print(&found.rows, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 4);
        assert_eq!(
            lines[0],
            format!("2026-12-02T20:10:00.000Z received {Q1} peer=partner_b to={B}")
        );
        assert_eq!(
            lines[1],
            format!(
                "2026-12-02T21:05:00.000Z sent {Q1} peer=partner_b to={B} status=451 \
                 attempts=1 reply=451 4.3.0 try again"
            )
        );
        assert!(lines[3].contains(" res ") && lines[3].contains(" latency=1234"));
        assert!(!lines[2].contains("latency"));
    }
}
