//! The `mm4relay` command: parse arguments, load the configuration, set up
//! logging, and hand over to `relay` (or `demo`). Exit codes, chosen in
//! one place ([`Failure::code`]): 0 success, 1 runtime failure, 2 usage
//! or configuration error, 3 (LSB) the relay is not running.

use std::fs::OpenOptions;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use log::LevelFilter;
use mm4relay::config::{Config, ConfigError};
use mm4relay::relay::demo::{self, DemoOptions};
use mm4relay::relay::{self, RelayError};
use mm4relay::sys::{logging, privilege};

mod cli;

use clap::Parser as _;
use cli::{Cli, Command};

/// The configuration a control command reads when neither `-c` nor
/// `--socket` is given, if it is there (where the packages install it).
const DEFAULT_CONFIG: &str = "/etc/mm4relay/mm4relay.ini";
/// The control socket when no configuration names one.
const DEFAULT_SOCKET: &str = "/run/mm4relay.sock";

/// Why a command failed; its kind says how the process exits.
enum Failure {
    /// A configuration that cannot be used: fix the file.
    Config(String),
    /// Nothing answers on the control socket.
    NotRunning(std::io::Error),
    /// Anything else: the system refused, or the relay said no.
    Runtime(String),
}

impl Failure {
    /// The exit code of each kind, as the README documents them.
    fn code(&self) -> u8 {
        match self {
            Failure::Config(_) => 2,
            Failure::NotRunning(_) => 3,
            Failure::Runtime(_) => 1,
        }
    }
}

impl From<ConfigError> for Failure {
    fn from(e: ConfigError) -> Failure {
        Failure::Config(e.to_string())
    }
}

impl From<RelayError> for Failure {
    fn from(e: RelayError) -> Failure {
        if e.is_config() {
            Failure::Config(e.to_string())
        } else {
            Failure::Runtime(e.to_string())
        }
    }
}

impl From<logging::LogError> for Failure {
    fn from(e: logging::LogError) -> Failure {
        Failure::Runtime(e.to_string())
    }
}

/// The socket a control command asks, and the configuration it was
/// read from when `-c` named one.
fn control(to: &cli::Control) -> Result<(PathBuf, Option<Box<Config>>), Failure> {
    match (&to.config, &to.socket) {
        (Some(file), _) => {
            let config = Config::load(file)?;
            let socket = config.relay.control_socket.clone().ok_or_else(|| {
                Failure::Config(format!("{}: [relay] control_socket is off", file.display()))
            })?;
            Ok((socket, Some(Box::new(config))))
        }
        (None, Some(socket)) => Ok((socket.clone(), None)),
        // The packaged relay's, whose socket is in its spool; else, or if
        // that file does not load (not configured yet, half edited), the
        // default socket.
        (None, None) if Path::new(DEFAULT_CONFIG).exists() => {
            match control(&cli::Control {
                config: Some(PathBuf::from(DEFAULT_CONFIG)),
                socket: None,
            }) {
                Ok(found) => Ok(found),
                Err(Failure::Config(e)) => {
                    eprintln!("mm4relay: {e}; asking {DEFAULT_SOCKET}");
                    Ok((PathBuf::from(DEFAULT_SOCKET), None))
                }
                Err(f) => Err(f),
            }
        }
        (None, None) => Ok((PathBuf::from(DEFAULT_SOCKET), None)),
    }
}

/// Sends a command to the running relay and prints its answer: not
/// running when nothing answers, a runtime failure when the relay says
/// error.
fn ask(socket: &std::path::Path, command: &str) -> Result<(), Failure> {
    let answer = mm4relay::ops::control::request(socket, command).map_err(Failure::NotRunning)?;
    match answer.strip_prefix("error:") {
        Some(why) => Err(Failure::Runtime(why.trim().to_string())),
        None => {
            print!("{}", for_terminal(&answer));
            Ok(())
        }
    }
}

/// `text` with every control character but newline and tab (and the bidi
/// overrides) shown as `?`: whoever answers on the control socket (its
/// directory is the relay user's) cannot drive the operator's terminal.
fn for_terminal(text: &str) -> std::borrow::Cow<'_, str> {
    let bad = |c: char| {
        (c.is_control() && c != '\n' && c != '\t')
            || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if text.chars().any(bad) {
        text.chars()
            .map(|c| if bad(c) { '?' } else { c })
            .collect::<String>()
            .into()
    } else {
        text.into()
    }
}

/// The pid file: written at start, removed at exit.
struct Pidfile(PathBuf);

impl Pidfile {
    /// Writes our pid to `path`, which may be owned by us or `relay_uid`;
    /// root writes it, so it is checked first (no symbolic or hard link).
    fn create(path: PathBuf, relay_uid: Option<u32>) -> Result<Pidfile, Failure> {
        let mut options = OpenOptions::new();
        options.write(true).create(true).mode(0o644);
        let mut file = privilege::open_unfollowed(&path, "pid file", &options, relay_uid)
            .map_err(|e| Failure::Runtime(e.to_string()))?;
        // Emptied only now, after the checks.
        file.set_len(0)
            .and_then(|()| file.write_all(format!("{}\n", std::process::id()).as_bytes()))
            .map_err(|e| {
                Failure::Runtime(format!("cannot write pid file {}: {e}", path.display()))
            })?;
        Ok(Pidfile(path))
    }
}

impl Drop for Pidfile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // Help and usage errors, said by clap: 0 for help, 2 for errors.
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(e.exit_code().clamp(0, 255) as u8);
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            match &f {
                Failure::Config(e) | Failure::Runtime(e) => eprintln!("mm4relay: {e}"),
                Failure::NotRunning(e) => eprintln!("mm4relay: {e}"),
            }
            ExitCode::from(f.code())
        }
    }
}

fn version() {
    println!(
        "mm4relay {} ({} {})\n\
         TLS: native-tls on {} ({}), TLS 1.2 and newer\n\
         features: durable spool with group commit, per-peer pools and balancer, \
         STARTTLS and implicit TLS in, STARTTLS out, AUTH PLAIN/LOGIN both ways, \
         control socket, Prometheus metrics, syslog, CDRs",
        env!("CARGO_PKG_VERSION"),
        std::env::consts::OS,
        std::env::consts::ARCH,
        openssl::version::version(),
        if cfg!(feature = "vendored-openssl") {
            "built in, linked statically"
        } else {
            "the system library, linked dynamically"
        },
    );
}

fn run(cli: Cli) -> Result<(), Failure> {
    let command = match (cli.version, cli.command) {
        (true, _) | (false, None) => {
            version();
            return Ok(());
        }
        (false, Some(c)) => c,
    };
    match command {
        Command::Status { to, json, watch } => {
            let (socket, _) = control(&to)?;
            match watch {
                Some(secs) => watch_status(&socket, Duration::from_secs(secs))?,
                None => ask(&socket, if json { "status json" } else { "status" })?,
            }
        }
        Command::Reload { to } => ask(&control(&to)?.0, "reload")?,
        Command::Queue { action, to } => ask(&control(&to)?.0, &action.request())?,
        Command::Route { rcpt, to } => {
            let (socket, config) = control(&to)?;
            match (ask(&socket, &format!("route {rcpt}")), config) {
                // Not running: the file's tables, said to be the file's.
                (Err(Failure::NotRunning(_)), Some(config)) => {
                    let names: Vec<String> = config.peers.iter().map(|p| p.name.clone()).collect();
                    let resolver = mm4relay::dns::Resolver::new(config.dns.clone());
                    let answer = config.router().explain_text(&rcpt, &names, |n| {
                        let suffix = config.enum_domain.as_deref()?;
                        resolver.enum_domain(n, suffix).ok().flatten()
                    });
                    match answer.strip_prefix("error:") {
                        Some(why) => return Err(Failure::Runtime(why.trim().to_string())),
                        None => println!(
                            "{answer}(by {}: the relay is not running)",
                            config.path.display()
                        ),
                    }
                }
                (outcome, _) => outcome?,
            }
        }
        Command::Check { config: path } => {
            let c = Config::load(&path)?;
            print!("{}", c.describe());
            for w in &c.warnings {
                println!("warning: {w}");
            }
            println!("{}: OK", path.display());
        }
        Command::Run { config, pidfile } => serve(&config, pidfile)?,
        Command::Trace {
            what,
            since,
            config,
        } => trace(&Config::load(&config)?, &what, since)?,
        Command::Demo {
            messages,
            sessions,
            slow_ms,
        } => {
            let opts = DemoOptions {
                messages,
                sessions: sessions as usize,
                slow_delay: Duration::from_millis(slow_ms),
            };
            let _log = logging::init(LevelFilter::Warn, &logging::Target::Stderr, None)
                .map_err(|e| eprintln!("mm4relay: {e}"));
            demo::run(&opts).map_err(|e| Failure::Runtime(format!("demo: {e}")))?;
        }
        Command::Man { dir } => {
            let pages = cli::write_man(&dir)
                .map_err(|e| Failure::Runtime(format!("{}: {e}", dir.display())))?;
            for p in pages {
                println!("{}", p.display());
            }
        }
        Command::Completions { shell } => {
            let mut out = std::io::stdout().lock();
            out.write_all(&cli::completions(shell))
                .and_then(|()| out.flush())
                .map_err(|e| Failure::Runtime(format!("stdout: {e}")))?;
        }
    }
    Ok(())
}

/// `status --watch`: the table redrawn in place every `every` until
/// interrupted; a relay that stops (a restart) is waited for, not an end.
fn watch_status(socket: &std::path::Path, every: Duration) -> Result<(), Failure> {
    // SAFETY: isatty only reads the descriptor's state.
    let tty = unsafe { libc::isatty(1) } == 1;
    let mut out = std::io::stdout().lock();
    if tty {
        // Clear once; later frames go home and overwrite.
        let _ = write!(out, "\x1b[2J");
    }
    loop {
        let now = mm4relay::mm4::date::rfc3339(std::time::SystemTime::now());
        let body = match mm4relay::ops::control::request(socket, "status") {
            Ok(answer) => answer,
            Err(e) => format!("{e}\n"),
        };
        let mut frame = String::new();
        if tty {
            frame.push_str("\x1b[H");
        }
        frame.push_str(&format!(
            "mm4relay status, every {}s, {now} (Ctrl-C to stop)\n\n",
            every.as_secs()
        ));
        for line in for_terminal(&body).lines() {
            frame.push_str(line);
            if tty {
                // Clear what a longer line of the last frame left.
                frame.push_str("\x1b[K");
            }
            frame.push('\n');
        }
        if tty {
            frame.push_str("\x1b[J");
        } else {
            frame.push('\n');
        }
        out.write_all(frame.as_bytes())
            .and_then(|()| out.flush())
            .map_err(|e| Failure::Runtime(format!("stdout: {e}")))?;
        // Pacing for the eye, not synchronisation.
        std::thread::sleep(every);
    }
}

/// Most queued messages `trace` asks the running relay about.
const TRACE_QUEUED: usize = 20;

/// `mm4relay trace`: the CDR rows naming `what`, then what the running
/// relay still has queued of the messages they name.
fn trace(config: &Config, what: &str, since: Option<Duration>) -> Result<(), Failure> {
    use mm4relay::cdr::{row, trace};
    let cdr = config.cdr.as_ref().ok_or_else(|| {
        Failure::Config(format!("{}: [cdr] dir is not set", config.path.display()))
    })?;
    let query = trace::Query {
        what: what.to_string(),
        since: since.map(|d| std::time::SystemTime::now() - d),
    };
    let found = trace::search(&cdr.dir, &query)
        .map_err(|e| Failure::Runtime(format!("[cdr] dir {}: {e}", cdr.dir.display())))?;
    let mut out = std::io::stdout().lock();
    trace::print(&found.rows, &mut out).map_err(|e| Failure::Runtime(e.to_string()))?;
    let _ = writeln!(
        out,
        "({} rows, from {} files, {} octets)",
        found.rows.len(),
        found.files,
        found.bytes
    );
    // What is still queued: the queue IDs the rows name, or WHAT itself.
    let mut ids: Vec<&str> = vec![what];
    for r in &found.rows {
        let id = r.0[row::col::QUEUE_ID].as_str();
        if !id.is_empty() && !ids.contains(&id) {
            ids.push(id);
        }
    }
    if let Some(socket) = &config.relay.control_socket {
        for id in ids.into_iter().take(TRACE_QUEUED) {
            match mm4relay::ops::control::request(socket, &format!("queue show {id}")) {
                Ok(answer) if !answer.starts_with("error") => {
                    let _ = write!(out, "queued now:\n{answer}");
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// `mm4relay run`: the relay in the foreground until a stop signal.
fn serve(path: &std::path::Path, pidfile: Option<PathBuf>) -> Result<(), Failure> {
    let config = Config::load(path)?;
    // Root opens the log and pid files; the relay user may own them
    // (Config::load made sure the user exists).
    let relay_uid = config
        .relay
        .user
        .as_deref()
        .map(privilege::uid_of)
        .transpose()
        .map_err(|e| Failure::Config(e.to_string()))?;
    let log_guard = logging::init(config.relay.log_level, &config.relay.log_target, relay_uid)?;
    for w in &config.warnings {
        log::warn!("{w}");
    }
    let logged = |f: Failure| {
        if let Failure::Runtime(e) | Failure::Config(e) = &f {
            log::error!("{e}");
        }
        f
    };
    let _pid = pidfile
        .map(|p| Pidfile::create(p, relay_uid))
        .transpose()
        .map_err(logged)?;
    relay::run(&config, || log_guard.reopen()).map_err(|e| logged(e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_the_socket_says_cannot_drive_the_terminal() {
        assert_eq!(for_terminal("peer A\tok\n"), "peer A\tok\n");
        assert_eq!(
            for_terminal("\u{1b}]52;c;AAAA\u{7}\u{9b}2J\u{202e}x\n"),
            "?]52;c;AAAA??2J?x\n"
        );
    }
}
