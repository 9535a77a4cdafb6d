//! `trace` over a day of CDRs: `TRACE_ROWS` rows (default 43,200,000) in
//! 24 hourly files (the last one still `.open`) are written to a temporary
//! directory, a few rows of one message placed in three of them, then,
//! three rounds each, medians of:
//!
//! 1. the baseline: every octet of the files read with plain 16 MiB
//!    `read()` calls, in the same run, the page cache warm from writing
//!    (one thread, and two as `search` uses);
//! 2. `search` by transaction ID;
//! 3. `search` by number;
//! 4. `search` by number since the last two hours of the day.
//!
//! The match counts are checked. The set needs as much free space (and, to
//! stay in the page cache, memory) as its size; with less free space it is
//! scaled down and says so.
//!
//! `cargo bench --bench trace`

use std::ffi::CString;
use std::fs::File;
use std::hint::black_box;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant, UNIX_EPOCH};

use mm4relay::cdr::row::Row;
use mm4relay::cdr::trace::{Found, Query, search};
use mm4relay::mm4::date;

const FILES: usize = 24;
const ROUNDS: usize = 3;
const BUF: usize = 16 << 20;
/// 2026-12-02T00:00:00Z.
const DAY: u64 = 1_796_169_600;
/// The traced message: its transaction ID and its sender's number.
const TID: &str = "T9000000001";
const NUMBER: &str = "+33699999999";
/// Files with the traced message's two rows (the last in the last 2 hours).
const WITH_TID: [usize; 3] = [3, 12, 23];
/// Files with a row to the traced number (another message).
const WITH_TO: [usize; 2] = [12, 23];
/// Files with a row whose reply holds the number (not a match).
const WITH_DECOY: [usize; 2] = [3, 23];

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Free octets for an unprivileged user on the file system of `path`.
fn free_space(path: &Path) -> Option<u64> {
    let c = CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut s = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: c is a valid C string; s is only read once statvfs filled it.
    if unsafe { libc::statvfs(c.as_ptr(), s.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: statvfs succeeded, so s is initialised.
    let s = unsafe { s.assume_init() };
    Some(s.f_bavail.saturating_mul(s.f_frsize))
}

/// A /proc/meminfo figure, in octets.
fn meminfo(key: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

fn digits(out: &mut Vec<u8>, mut n: u64, width: usize) {
    let start = out.len();
    for _ in 0..width {
        out.push(b'0' + (n % 10) as u8);
        n /= 10;
    }
    out[start..].reverse();
}

fn hex(out: &mut Vec<u8>, n: u64) {
    for i in (0..16).rev() {
        out.push(b"0123456789ABCDEF"[(n >> (i * 4) & 15) as usize]);
    }
}

/// `2026-12-02THH:MM:SS.mmmZ` of a millisecond of the day.
fn time(out: &mut Vec<u8>, ms: u64) {
    out.extend_from_slice(b"2026-12-02T");
    digits(out, ms / 3_600_000, 2);
    out.push(b':');
    digits(out, ms / 60_000 % 60, 2);
    out.push(b':');
    digits(out, ms / 1000 % 60, 2);
    out.push(b'.');
    digits(out, ms % 1000, 3);
    out.push(b'Z');
}

/// A `+336…/TYPE=PLMN@mms.a.net` address, never the traced number.
fn address(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(b"+336");
    digits(out, 10_000_000 + n % 80_000_000, 8);
    out.extend_from_slice(b"/TYPE=PLMN@mms.a.net");
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Plain,
    /// The traced message, with this event.
    Traced(&'static str),
    /// Another message to the traced number.
    ToNumber,
    /// A reply holding the traced number.
    Decoy,
}

/// Row `i` (0-based over the day), at `ms` into the day.
fn row(out: &mut Vec<u8>, i: u64, ms: u64, kind: Kind) {
    let traced = matches!(kind, Kind::Traced(_));
    out.extend_from_slice(match kind {
        Kind::Traced(event) => event.as_bytes(),
        _ => b"sent",
    });
    out.push(b',');
    time(out, ms);
    out.push(b',');
    hex(
        out,
        if traced {
            0x19A_FFFF_FFFF
        } else {
            0x19A_0000_0000 + i
        },
    );
    out.extend_from_slice(b"-000001,,");
    if traced {
        out.extend_from_slice(TID.as_bytes());
        out.extend_from_slice(b",M9000000001@mms.a.net,");
        out.extend_from_slice(NUMBER.as_bytes());
        out.extend_from_slice(b"/TYPE=PLMN@mms.a.net,");
    } else {
        out.push(b'T');
        digits(out, i, 10);
        out.extend_from_slice(b",M");
        digits(out, i, 10);
        out.extend_from_slice(b"@mms.a.net,");
        address(out, i.wrapping_mul(2_654_435_761));
        out.push(b',');
    }
    if kind == Kind::ToNumber {
        out.extend_from_slice(NUMBER.as_bytes());
        out.extend_from_slice(b"/TYPE=PLMN@mms.a.net");
    } else if traced {
        address(out, 12_345);
    } else {
        address(out, i.wrapping_mul(40_503) + 12_345);
    }
    out.extend_from_slice(b",partner_b,");
    digits(out, 10_000 + i % 90_000, 5);
    if kind == Kind::Decoy {
        out.extend_from_slice(b",550,550 5.1.1 <");
        out.extend_from_slice(NUMBER.as_bytes());
        out.extend_from_slice(b"> unknown,1,");
    } else {
        out.extend_from_slice(b",250,250 2.0.0 Ok: queued as ABC123,1,");
    }
    let seq = i + 1;
    digits(out, seq, seq.checked_ilog10().unwrap_or(0) as usize + 1);
    out.extend_from_slice(b".0,MMO4FRq,");
    time(out, ms.saturating_sub(250));
    out.extend_from_slice(b",local,10.0.0.1,,Hello,text/plain:12 image/jpeg:34567\n");
}

/// The first row of file `h` of `rows`.
fn first(h: usize, rows: usize) -> u64 {
    (h * rows / FILES) as u64
}

/// Writes file `h`: its path and octets.
fn write_file(dir: &Path, h: usize, rows: usize) -> (PathBuf, u64) {
    let (from, to) = (first(h, rows), first(h + 1, rows));
    let n = to - from;
    let start = UNIX_EPOCH + Duration::from_secs(DAY + h as u64 * 3600);
    let mut name = format!("mm4relay-{}-{:020}.csv", date::compact(start), from + 1);
    if h == FILES - 1 {
        name.push_str(".open");
    }
    let path = dir.join(name);
    let mut file = File::create(&path).unwrap();
    let mut buf = Row::header();
    let mut size = 0;
    for j in 0..n {
        let mid = n / 2;
        let kind = match j {
            _ if j == mid && WITH_TID.contains(&h) => Kind::Traced("received"),
            _ if j == mid + 1 && WITH_TID.contains(&h) => Kind::Traced("sent"),
            _ if j == mid + 2 && WITH_TO.contains(&h) => Kind::ToNumber,
            _ if j == mid + 3 && WITH_DECOY.contains(&h) => Kind::Decoy,
            _ => Kind::Plain,
        };
        row(
            &mut buf,
            from + j,
            h as u64 * 3_600_000 + j * 3_600_000 / n,
            kind,
        );
        if buf.len() >= BUF - 1024 {
            file.write_all(&buf).unwrap();
            size += buf.len() as u64;
            buf.clear();
        }
    }
    file.write_all(&buf).unwrap();
    size += buf.len() as u64;
    (path, size)
}

/// Reads every file through with 16 MiB `read()` calls on `threads`
/// threads: the octets read.
fn read_all(paths: &[PathBuf], threads: usize) -> u64 {
    let next = AtomicUsize::new(0);
    thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut buf = vec![0u8; BUF];
                    let mut total = 0;
                    while let Some(p) = paths.get(next.fetch_add(1, Ordering::Relaxed)) {
                        let mut f = File::open(p).unwrap();
                        loop {
                            let n = f.read(&mut buf).unwrap();
                            if n == 0 {
                                break;
                            }
                            total += n as u64;
                            black_box(&buf[..n]);
                        }
                    }
                    total
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).sum()
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Three rounds of `f`: the median in seconds and the last result.
fn rounds<T>(mut f: impl FnMut() -> T) -> (f64, T) {
    let mut times = Vec::new();
    let mut last = None;
    for _ in 0..ROUNDS {
        let t = Instant::now();
        last = Some(black_box(f()));
        times.push(t.elapsed().as_secs_f64());
    }
    (median(times), last.unwrap())
}

fn main() {
    let tmp = std::env::temp_dir();
    let mut rows = env_or("TRACE_ROWS", 43_200_000).max(FILES * 16);
    // A row as written here, to size the set before writing it.
    let mut sample = Vec::new();
    row(&mut sample, 12_345_678, 45_296_789, Kind::Plain);
    let row_len = sample.len() as u64;
    let free = free_space(&tmp).unwrap_or(0);
    let margin = 2 << 30;
    let mut scaled = String::new();
    if free < rows as u64 * row_len + margin {
        let fit = (free.saturating_sub(margin) / row_len) as usize;
        scaled = format!(
            " (SCALED DOWN from {rows} rows: {:.1} GB free in {})",
            free as f64 / 1e9,
            tmp.display()
        );
        rows = fit.max(FILES * 16);
    }
    let dir = tempfile::tempdir_in(&tmp).unwrap();
    let (available, cached) = (meminfo("MemAvailable"), meminfo("Cached"));

    let t = Instant::now();
    let next = AtomicUsize::new(0);
    let mut files: Vec<(usize, PathBuf, u64)> = thread::scope(|s| {
        let workers: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let h = next.fetch_add(1, Ordering::Relaxed);
                        if h >= FILES {
                            return done;
                        }
                        let (p, size) = write_file(dir.path(), h, rows);
                        done.push((h, p, size));
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    files.sort_by_key(|f| f.0);
    let written = t.elapsed().as_secs_f64();
    let total: u64 = files.iter().map(|f| f.2).sum();
    let paths: Vec<PathBuf> = files.iter().map(|f| f.1.clone()).collect();
    let grew = meminfo("Cached").saturating_sub(cached);
    println!(
        "trace: {rows} rows of ~{row_len} octets in {FILES} files, {:.2} GB, written in {written:.1}s \
         to {}{scaled}",
        total as f64 / 1e9,
        dir.path().display()
    );
    println!(
        "page cache: warm from writing, nothing dropped (MemAvailable before writing {:.1} GB; \
         the page cache grew by {:.2} GB while writing){}",
        available as f64 / 1e9,
        grew as f64 / 1e9,
        if available > total && grew >= total / 10 * 9 {
            ""
        } else {
            ": NOT ALL CACHED, parts may be read from disk"
        }
    );

    let gb = |bytes: u64, s: f64| bytes as f64 / 1e9 / s;
    let (base, read) = rounds(|| read_all(&paths, 1));
    assert_eq!(read, total);
    println!(
        "baseline read(), 1 thread:  median {base:.3}s, {:.1} M rows/s, {:.2} GB/s",
        rows as f64 / base / 1e6,
        gb(total, base)
    );
    let (base2, read) = rounds(|| read_all(&paths, 2));
    assert_eq!(read, total);
    println!(
        "baseline read(), 2 threads: median {base2:.3}s, {:.1} M rows/s, {:.2} GB/s, ratio {:.2}",
        rows as f64 / base2 / 1e6,
        gb(total, base2),
        base2 / base
    );

    let since = UNIX_EPOCH + Duration::from_secs(DAY + 22 * 3600);
    let cases: [(&str, Query, usize); 3] = [
        (
            "transaction id",
            Query {
                what: TID.into(),
                since: None,
            },
            2 * WITH_TID.len(),
        ),
        (
            "number",
            Query {
                what: NUMBER.into(),
                since: None,
            },
            2 * WITH_TID.len() + WITH_TO.len(),
        ),
        (
            "number, since last 2 h",
            Query {
                what: NUMBER.into(),
                since: Some(since),
            },
            3,
        ),
    ];
    for (label, q, expected) in cases {
        let (s, found): (f64, Found) = rounds(|| search(dir.path(), &q).unwrap());
        assert_eq!(found.rows.len(), expected, "{label}");
        assert!(found.rows.windows(2).all(|w| w[0].0[1] <= w[1].0[1]));
        // The rows of the files read: the last `files` ones.
        let scanned = rows as u64 - first(FILES - found.files, rows);
        println!(
            "search {label} ({}): median {s:.3}s, ratio {:.2} to the 1-thread baseline; \
             {} rows found, {} files / {:.2} GB read, {:.1} M rows/s, {:.2} GB/s",
            q.what,
            s / base,
            found.rows.len(),
            found.files,
            found.bytes as f64 / 1e9,
            scanned as f64 / s / 1e6,
            gb(found.bytes, s)
        );
    }
    let q = Query {
        what: TID.into(),
        since: None,
    };
    let mut out = Vec::new();
    mm4relay::cdr::trace::print(&search(dir.path(), &q).unwrap().rows, &mut out).unwrap();
    print!("{}", String::from_utf8_lossy(&out));
    dir.close().unwrap();
}
