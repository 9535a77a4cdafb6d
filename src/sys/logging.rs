//! Logging: log + simplelog for formatting, and a writer thread for the I/O.
//!
//! The relay logs one line per disposition, so at 10,000 messages/s logging
//! is on the hot path. simplelog formats a record in pieces while holding
//! its lock; if those pieces went to the file directly, every session and
//! worker thread would queue behind write(2) calls. Here they go to a small
//! per-logger buffer, each complete line is handed to a channel, and one
//! thread writes whatever has piled up, 20 ms after the first line, in one
//! buffered write; with nothing to log it sleeps.
//!
//! Lines reach the file within a moment; [`LogGuard`] flushes everything
//! and joins the writer thread when the program ends.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use log::LevelFilter;
use simplelog::{ConfigBuilder, WriteLogger};

use crate::sys::privilege;

enum Msg {
    Line(Vec<u8>),
    /// Write everything so far, then answer on the enclosed channel.
    Flush(Sender<()>),
}

/// The `Write` simplelog formats into: collects one line, then sends it.
struct LineSender {
    line: Vec<u8>,
    tx: Sender<Msg>,
}

impl Write for LineSender {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.line.extend_from_slice(buf);
        if self.line.ends_with(b"\n") {
            let line = std::mem::replace(&mut self.line, Vec::with_capacity(256));
            self.tx
                .send(Msg::Line(line))
                .map_err(|_| io::ErrorKind::BrokenPipe)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let (ack_tx, ack_rx) = crossbeam_channel::bounded(1);
        if self.tx.send(Msg::Flush(ack_tx)).is_ok() {
            let _ = ack_rx.recv();
        }
        Ok(())
    }
}

/// Keeps the writer thread; dropping it flushes the log and joins the thread.
pub struct LogGuard {
    stop: Option<Sender<()>>,
    reopen: Sender<()>,
    /// Not an `Owned`: that logs a panic through the logger, and this
    /// thread is the logger's output. A panic here is said on stderr.
    handle: Option<JoinHandle<()>>,
}

impl LogGuard {
    /// Reopens the log file (after logrotate moved it); no-op on stderr.
    pub fn reopen(&self) {
        let _ = self.reopen.try_send(());
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        // The logger is global and lives on, so its sender never drops:
        // flush explicitly, then tell the thread to end.
        log::logger().flush();
        self.stop.take();
        if let Some(h) = self.handle.take() {
            if h.join().is_err() {
                eprintln!("mm4relay: the log writer thread ended in a panic");
            }
        }
    }
}

/// Where log lines go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// Standard error.
    Stderr,
    /// A file, appended, reopened on SIGHUP.
    File(PathBuf),
    /// The local syslog daemon.
    Syslog {
        /// Facility name (mail, daemon, local0…).
        facility: String,
        /// Its socket, normally /dev/log.
        socket: PathBuf,
    },
}

/// Sends each line to syslog as one message, at the severity simplelog
/// wrote into it, without simplelog's own time stamp.
struct SyslogWriter(syslog::Logger<syslog::LoggerBackend, syslog::Formatter3164>);

impl Write for SyslogWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for line in String::from_utf8_lossy(buf)
            .lines()
            .filter(|l| !l.is_empty())
        {
            let text = line.split_once("] ").map_or(line, |(_, t)| t).to_string();
            let sent = if line.contains("[ERROR]") {
                self.0.err(text)
            } else if line.contains("[WARN]") {
                self.0.warning(text)
            } else {
                self.0.info(text)
            };
            sent.map_err(|e| io::Error::other(e.to_string()))?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Why logging could not start as configured: what it was doing, and
/// what the system or the logging crates said.
#[derive(Debug)]
pub struct LogError {
    context: String,
    source: Box<dyn std::error::Error + Send + Sync>,
}

impl LogError {
    fn new(
        context: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> LogError {
        LogError {
            context: context.into(),
            source: source.into(),
        }
    }
}

impl std::fmt::Display for LogError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.context.is_empty() {
            write!(f, "{}", self.source)
        } else {
            write!(f, "{}: {}", self.context, self.source)
        }
    }
}

impl std::error::Error for LogError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}

/// Whether `facility` names a syslog facility (the configuration checks
/// it, so that [`init`] fails only for reasons of the system).
pub fn is_facility(facility: &str) -> bool {
    facility.parse::<syslog::Facility>().is_ok()
}

fn syslog_writer(facility: &str, socket: &Path) -> Result<SyslogWriter, LogError> {
    let facility: syslog::Facility = facility
        .parse()
        .map_err(|_| LogError::new("", format!("unknown syslog facility {facility:?}")))?;
    let formatter = syslog::Formatter3164 {
        facility,
        hostname: None,
        process: "mm4relay".into(),
        pid: std::process::id(),
    };
    syslog::unix_custom(formatter, socket)
        .map(SyslogWriter)
        .map_err(|e| {
            LogError::new(
                format!("cannot reach syslog at {}", socket.display()),
                e.to_string(),
            )
        })
}

/// Installs the global logger at `level`, writing to `target`. A log file
/// is opened, at start and at every reopen, with
/// [`privilege::open_unfollowed`]: not through a symbolic or hard link,
/// and owned by this process or by `relay_uid` (the `[relay] user`).
pub fn init(
    level: LevelFilter,
    target: &Target,
    relay_uid: Option<libc::uid_t>,
) -> Result<LogGuard, LogError> {
    let (out, file): (Box<dyn Write + Send>, Option<&Path>) = match target {
        Target::File(path) => (Box::new(open(path, relay_uid)?), Some(path)),
        Target::Stderr => (Box::new(io::stderr()), None),
        Target::Syslog { facility, socket } => (Box::new(syslog_writer(facility, socket)?), None),
    };
    let (tx, rx) = crossbeam_channel::unbounded();
    let (stop_tx, stop_rx) = crossbeam_channel::bounded(0);
    let (reopen_tx, reopen_rx) = crossbeam_channel::bounded(1);
    let path = file.map(Path::to_path_buf);
    let handle = thread::Builder::new()
        .name("log-writer".into())
        .spawn(move || {
            let reopen = path.as_deref().map(|p| (p, relay_uid));
            write_lines(out, reopen, &rx, &stop_rx, &reopen_rx)
        })
        .map_err(|e| LogError::new("cannot start the log writer", e))?;
    let config = ConfigBuilder::new()
        .set_time_format_rfc3339()
        .set_thread_level(LevelFilter::Off)
        .set_target_level(LevelFilter::Off)
        .build();
    let writer = LineSender {
        line: Vec::with_capacity(256),
        tx,
    };
    WriteLogger::init(level, config, writer).map_err(|e| LogError::new("", e))?;
    Ok(LogGuard {
        stop: Some(stop_tx),
        reopen: reopen_tx,
        handle: Some(handle),
    })
}

fn open(path: &Path, relay_uid: Option<libc::uid_t>) -> Result<File, LogError> {
    let mut options = OpenOptions::new();
    // Owner and group (the adm group of logrotate) only.
    options.create(true).append(true).mode(0o640);
    let file = privilege::open_unfollowed(path, "log file", &options, relay_uid)
        .map_err(|e| LogError::new("", e))?;
    // Root opens it before the relay becomes its user: a file root owns
    // (made just now) is given to that user, with its directory's group,
    // by the descriptor, so that SIGHUP can reopen it. Nothing else has to
    // make it beforehand.
    if let Some(uid) = relay_uid {
        use std::os::unix::fs::MetadataExt;
        let owner = file.metadata().map_err(|e| LogError::new("", e))?.uid();
        let group = path
            .parent()
            .and_then(|d| std::fs::metadata(d).ok())
            .map(|m| m.gid());
        // SAFETY: a plain system call without pointers.
        if owner == 0 && unsafe { libc::geteuid() } == 0 && uid != 0 {
            std::os::unix::fs::fchown(&file, Some(uid), group).map_err(|e| {
                LogError::new(
                    "",
                    std::io::Error::other(format!(
                        "cannot give log file {} to the relay user: {e}",
                        path.display()
                    )),
                )
            })?;
        }
    }
    Ok(file)
}

/// How long lines may wait before they are written. Waking the writer per
/// line would cost a context switch per line; this costs one per tick.
const WRITE_INTERVAL: Duration = Duration::from_millis(20);

/// `file`: the log file to reopen on request, and who else may own it.
fn write_lines(
    out: Box<dyn Write + Send>,
    file: Option<(&Path, Option<libc::uid_t>)>,
    rx: &Receiver<Msg>,
    stop: &Receiver<()>,
    reopen: &Receiver<()>,
) {
    let mut out = BufWriter::with_capacity(64 * 1024, out);
    loop {
        // Idle, sleep until a line, a reopen or the stop.
        let mut first = None;
        let mut stopping = false;
        let mut reopening = false;
        crossbeam_channel::select! {
            recv(stop) -> _ => stopping = true,
            // Err: the guard is going, and its stop came first.
            recv(reopen) -> r => reopening = r.is_ok(),
            recv(rx) -> m => match m {
                Ok(m) => first = Some(m),
                Err(_) => stopping = true,
            },
        }
        if let (true, Some((path, relay_uid))) = (reopening, file) {
            let _ = out.flush();
            match open(path, relay_uid) {
                Ok(f) => out = BufWriter::with_capacity(64 * 1024, Box::new(f)),
                Err(e) => {
                    let _ = writeln!(out, "{e}; still writing to the old file");
                }
            }
        }
        if first.is_some() && !stopping {
            // Let more lines pile up: one write per tick, not per line.
            stopping = !matches!(
                stop.recv_timeout(WRITE_INTERVAL),
                Err(RecvTimeoutError::Timeout)
            );
        }
        for m in first.into_iter().chain(rx.try_iter()) {
            match m {
                Msg::Line(l) => {
                    let _ = out.write_all(&l);
                }
                Msg::Flush(ack) => {
                    let _ = out.flush();
                    let _ = ack.send(());
                }
            }
        }
        let _ = out.flush();
        if stopping {
            return;
        }
    }
}
