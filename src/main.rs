//! The `mm4relay` command: parse arguments, load the configuration, set up
//! logging, and hand over to `relay` (or `demo`). Exit codes, chosen in
//! one place ([`Failure::code`]): 0 success, 1 runtime failure, 2 usage
//! or configuration error, 3 (LSB) the relay is not running.

use std::fs::OpenOptions;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use log::LevelFilter;
use mm4relay::config::{Config, ConfigError};
use mm4relay::relay::demo::{self, DemoOptions};
use mm4relay::relay::{self, RelayError};
use mm4relay::sys::{logging, privilege};

const USAGE: &str = "\
mm4relay — MM4 relay: one message pool and one persistent SMTP sub-pool per destination MMSC

USAGE:
    mm4relay run -c FILE [--pidfile PATH]
                                run in the foreground until SIGTERM/SIGINT;
                                SIGHUP reopens the log file and reloads FILE
    mm4relay check -c FILE      validate FILE, print the peers and the routing table
    mm4relay status [-c FILE | --socket PATH] [--json]
                                per-peer health, allowance, connections, queues and
                                totals of the running relay (socket from FILE's
                                [relay] control_socket, default /run/mm4relay.sock)
    mm4relay route ADDRESS [-c FILE | --socket PATH]
                                the peer a recipient goes to and the rule that chose it
                                (ported exact or block, prefix, domain, default), by the
                                running relay's tables, else by FILE's
    mm4relay reload [-c FILE | --socket PATH]
                                re-read the configuration and say whether it was
                                taken (exit 1 and why, if refused)
    mm4relay queue age [-c FILE | --socket PATH]
                                queued messages per peer by age (like qshape)
    mm4relay queue list [PEER] [-c FILE | --socket PATH]
                                queued messages, oldest first: id, age, attempts,
                                sender, recipients, last reply
    mm4relay queue retry ID|PEER|all [-c FILE | --socket PATH]
                                try deferred messages now
    mm4relay queue hold PEER|ID | release PEER|ID [-c FILE | --socket PATH]
                                a held peer keeps its queue and sends nothing; a
                                held message stays queued, unattempted, until
                                released (or the next restart)
    mm4relay queue show ID [-c FILE | --socket PATH]
                                envelope, state per peer and headers of a message
    mm4relay queue delete ID [REASON...] [-c FILE | --socket PATH]
                                remove a message for good (logged with the reason)
    mm4relay trace WHAT [--since DURATION] -c FILE
                                a message's history from the CDR files ([cdr] dir)
                                and the running relay's queue, in time order: WHAT
                                is a queue ID, transaction ID, message ID or number
    mm4relay demo [OPTIONS]     run against three simulated MMSCs on loopback
    mm4relay --version | --help

DEMO OPTIONS:
    --messages N    messages to send (default 3000)
    --sessions N    parallel inbound SMTP sessions (default 8)
    --slow-ms N     delay of the slow peer per message, ms (default 20)

The configuration keys and their defaults are documented in conf/mm4relay.ini.
";

enum Cmd {
    Run(PathBuf, Option<PathBuf>),
    Check(PathBuf),
    Status {
        socket: PathBuf,
        json: bool,
    },
    Ask {
        socket: PathBuf,
        command: String,
    },
    /// `route ADDRESS`: asked of the running relay, else answered from
    /// the configuration given with `-c`.
    Route {
        socket: PathBuf,
        rcpt: String,
        config: Option<Box<Config>>,
    },
    /// `trace WHAT`: the CDR rows naming it, and what is queued of it.
    Trace {
        config: Box<Config>,
        what: String,
        since: Option<Duration>,
    },
    Demo(DemoOptions),
    Help,
    Version,
}

/// Why a command failed; its kind says how the process exits.
enum Failure {
    /// Bad arguments: said with the usage text.
    Usage(String),
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
            Failure::Usage(_) | Failure::Config(_) => 2,
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

fn parse_args(args: &[String]) -> Result<Cmd, Failure> {
    parse_words(args).map_err(Failure::Usage)
}

/// The command line as a command; `-c FILE` of the control commands is
/// loaded here for its socket path.
fn parse_words(args: &[String]) -> Result<Cmd, String> {
    let Some(cmd) = args.first() else {
        return Err("no command given".into());
    };
    let rest = &args[1..];
    if rest.iter().any(|a| a == "--help" || a == "-h") {
        return Ok(Cmd::Help);
    }
    let config_path = |rest: &[String]| -> Result<PathBuf, String> {
        match rest {
            [flag, path] if flag == "-c" || flag == "--config" => Ok(PathBuf::from(path)),
            _ => Err(format!("{cmd} needs -c FILE")),
        }
    };
    match cmd.as_str() {
        "run" => match rest {
            [c, file, p, pid] if p == "--pidfile" => Ok(Cmd::Run(
                config_path(&[c.clone(), file.clone()])?,
                Some(PathBuf::from(pid)),
            )),
            _ => Ok(Cmd::Run(config_path(rest)?, None)),
        },
        "check" => config_path(rest).map(Cmd::Check),
        "status" | "queue" | "reload" | "route" => {
            let mut socket = PathBuf::from("/run/mm4relay.sock");
            let mut loaded = None;
            let mut json = false;
            let mut words = Vec::new();
            let mut it = rest.iter();
            while let Some(arg) = it.next() {
                match arg.as_str() {
                    "--json" if cmd == "status" => json = true,
                    "--socket" => socket = PathBuf::from(it.next().ok_or("--socket needs a path")?),
                    "-c" | "--config" => {
                        let file = PathBuf::from(it.next().ok_or("-c needs a file")?);
                        let config = Config::load(&file).map_err(|e| e.to_string())?;
                        socket = config.relay.control_socket.clone().ok_or_else(|| {
                            format!("{}: [relay] control_socket is off", file.display())
                        })?;
                        loaded = Some(Box::new(config));
                    }
                    word if matches!(cmd.as_str(), "queue" | "route") && !word.starts_with('-') => {
                        words.push(word.to_string())
                    }
                    other => return Err(format!("unknown {cmd} option {other}")),
                }
            }
            if cmd == "status" {
                return Ok(Cmd::Status { socket, json });
            }
            if cmd == "route" {
                let [rcpt] = &words[..] else {
                    return Err("route needs one ADDRESS".into());
                };
                return Ok(Cmd::Route {
                    socket,
                    rcpt: rcpt.clone(),
                    config: loaded,
                });
            }
            if cmd == "reload" {
                return Ok(Cmd::Ask {
                    socket,
                    command: "reload".into(),
                });
            }
            match (words.first().map(String::as_str), words.len()) {
                (Some("age"), 1) | (Some("list"), 1 | 2) => {}
                (Some("retry" | "hold" | "release" | "show"), 2) => {}
                (Some("delete"), n) if n >= 2 => {}
                _ => {
                    return Err(
                        "queue needs age, list [PEER], show ID, retry ID|PEER|all, hold PEER|ID, \
                         release PEER|ID or delete ID [REASON]"
                            .into(),
                    );
                }
            }
            Ok(Cmd::Ask {
                socket,
                command: format!("queue {}", words.join(" ")),
            })
        }
        "trace" => {
            let (mut config, mut what, mut since) = (None, None, None);
            let mut it = rest.iter();
            while let Some(arg) = it.next() {
                match arg.as_str() {
                    "-c" | "--config" => {
                        let file = PathBuf::from(it.next().ok_or("-c needs a file")?);
                        config = Some(Box::new(Config::load(&file).map_err(|e| e.to_string())?));
                    }
                    "--since" => {
                        let v = it.next().ok_or("--since needs a duration")?;
                        since = Some(
                            mm4relay::config::parse_duration(v)
                                .map_err(|e| format!("--since {v:?}: {e}"))?,
                        );
                    }
                    w if !w.starts_with('-') && what.is_none() => what = Some(w.to_string()),
                    other => return Err(format!("unknown trace option {other}")),
                }
            }
            Ok(Cmd::Trace {
                config: config.ok_or("trace needs -c FILE")?,
                what: what
                    .ok_or("trace needs WHAT: a queue ID, transaction ID, message ID or number")?,
                since,
            })
        }
        "demo" => {
            let mut opts = DemoOptions::default();
            let mut it = rest.iter();
            while let Some(flag) = it.next() {
                let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
                let n: u64 = value
                    .parse()
                    .map_err(|_| format!("{flag} needs a number, not {value:?}"))?;
                match flag.as_str() {
                    "--messages" => opts.messages = n as usize,
                    "--sessions" => opts.sessions = (n as usize).max(1),
                    "--slow-ms" => opts.slow_delay = Duration::from_millis(n),
                    _ => return Err(format!("unknown demo option {flag}")),
                }
            }
            Ok(Cmd::Demo(opts))
        }
        "-h" | "--help" | "help" => Ok(Cmd::Help),
        "-V" | "--version" => Ok(Cmd::Version),
        other => Err(format!("unknown command {other:?}")),
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
            print!("{answer}");
            Ok(())
        }
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
    let args: Vec<String> = std::env::args().skip(1).collect();
    match parse_args(&args).and_then(run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            match &f {
                Failure::Usage(e) => eprintln!("mm4relay: {e}\n\n{USAGE}"),
                Failure::Config(e) | Failure::Runtime(e) => eprintln!("mm4relay: {e}"),
                Failure::NotRunning(e) => eprintln!("mm4relay: {e}"),
            }
            ExitCode::from(f.code())
        }
    }
}

fn run(cmd: Cmd) -> Result<(), Failure> {
    match cmd {
        Cmd::Help => print!("{USAGE}"),
        Cmd::Version => println!(
            "mm4relay {} ({} {})\n\
             TLS: native-tls on {} ({}), TLS 1.2 and newer\n\
             features: durable spool with group commit, per-peer pools and balancer, \
             STARTTLS and implicit TLS in, STARTTLS out, AUTH PLAIN/LOGIN both ways, \
             control socket, Prometheus metrics, syslog",
            env!("CARGO_PKG_VERSION"),
            std::env::consts::OS,
            std::env::consts::ARCH,
            openssl::version::version(),
            if cfg!(feature = "vendored-openssl") {
                "built in, linked statically"
            } else {
                "the system library, linked dynamically"
            },
        ),
        Cmd::Status { socket, json } => {
            ask(&socket, if json { "status json" } else { "status" })?;
        }
        Cmd::Ask { socket, command } => ask(&socket, &command)?,
        Cmd::Route {
            socket,
            rcpt,
            config,
        } => match (ask(&socket, &format!("route {rcpt}")), config) {
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
        },
        Cmd::Check(path) => {
            let c = Config::load(&path)?;
            print!("{}", c.describe());
            for w in &c.warnings {
                println!("warning: {w}");
            }
            println!("{}: OK", path.display());
        }
        Cmd::Run(path, pidfile) => serve(&path, pidfile)?,
        Cmd::Trace {
            config,
            what,
            since,
        } => trace(&config, &what, since)?,
        Cmd::Demo(opts) => {
            let _log = logging::init(LevelFilter::Warn, &logging::Target::Stderr, None)
                .map_err(|e| eprintln!("mm4relay: {e}"));
            demo::run(&opts).map_err(|e| Failure::Runtime(format!("demo: {e}")))?;
        }
    }
    Ok(())
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
