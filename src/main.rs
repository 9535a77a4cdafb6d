//! The `mm4relay` command: parse arguments, load the configuration, set up
//! logging, and hand over to `relay` (or `demo`). Exit codes: 0 success,
//! 1 runtime failure, 2 usage or configuration error.

use std::fs::OpenOptions;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use log::LevelFilter;
use mm4relay::config::Config;
use mm4relay::demo::{self, DemoOptions};
use mm4relay::{logging, privilege, relay};

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
    Status { socket: PathBuf, json: bool },
    Ask { socket: PathBuf, command: String },
    Demo(DemoOptions),
    Help,
    Version,
}

fn parse_args(args: &[String]) -> Result<Cmd, String> {
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
        "status" | "queue" | "reload" => {
            let mut socket = PathBuf::from("/run/mm4relay.sock");
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
                        socket = config.relay.control_socket.ok_or_else(|| {
                            format!("{}: [relay] control_socket is off", file.display())
                        })?;
                    }
                    word if cmd == "queue" && !word.starts_with('-') => {
                        words.push(word.to_string())
                    }
                    other => return Err(format!("unknown {cmd} option {other}")),
                }
            }
            if cmd == "status" {
                return Ok(Cmd::Status { socket, json });
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

/// Sends a command to the running relay and prints its answer; exit 3
/// (LSB: not running) when nothing answers, 1 when the relay says error.
fn ask(socket: &std::path::Path, command: &str) -> ExitCode {
    match mm4relay::control::request(socket, command) {
        Ok(answer) if answer.starts_with("error:") => {
            eprint!("mm4relay: {answer}");
            ExitCode::FAILURE
        }
        Ok(answer) => {
            print!("{answer}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mm4relay: {e}");
            ExitCode::from(3)
        }
    }
}

/// The pid file: written at start, removed at exit.
struct Pidfile(PathBuf);

impl Pidfile {
    /// Writes our pid to `path`, which may be owned by us or `relay_uid`;
    /// root writes it, so it is checked first (no symbolic or hard link).
    fn create(path: PathBuf, relay_uid: Option<u32>) -> Result<Pidfile, String> {
        let mut options = OpenOptions::new();
        options.write(true).create(true).mode(0o644);
        let mut file = privilege::open_unfollowed(&path, "pid file", &options, relay_uid)
            .map_err(|e| e.to_string())?;
        // Emptied only now, after the checks.
        file.set_len(0)
            .and_then(|()| file.write_all(format!("{}\n", std::process::id()).as_bytes()))
            .map_err(|e| format!("cannot write pid file {}: {e}", path.display()))?;
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
    let cmd = match parse_args(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mm4relay: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match cmd {
        Cmd::Help => {
            print!("{USAGE}");
            ExitCode::SUCCESS
        }
        Cmd::Version => {
            println!(
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
            );
            ExitCode::SUCCESS
        }
        Cmd::Status { socket, json } => {
            let command = if json { "status json" } else { "status" };
            ask(&socket, command)
        }
        Cmd::Ask { socket, command } => ask(&socket, &command),
        Cmd::Check(path) => match Config::load(&path) {
            Ok(c) => {
                print!("{}", c.describe());
                for w in &c.warnings {
                    println!("warning: {w}");
                }
                println!("{}: OK", path.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("mm4relay: {e}");
                ExitCode::from(2)
            }
        },
        Cmd::Run(path, pidfile) => {
            let config = match Config::load(&path) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("mm4relay: {e}");
                    return ExitCode::from(2);
                }
            };
            // Root opens the log and pid files; the relay user may own them.
            let relay_uid = match config
                .relay
                .user
                .as_deref()
                .map(privilege::uid_of)
                .transpose()
            {
                Ok(uid) => uid,
                Err(e) => {
                    eprintln!("mm4relay: {e}");
                    return ExitCode::from(2);
                }
            };
            let log_guard =
                match logging::init(config.relay.log_level, &config.relay.log_target, relay_uid) {
                    Ok(guard) => guard,
                    Err(e) => {
                        eprintln!("mm4relay: {e}");
                        return ExitCode::from(2);
                    }
                };
            for w in &config.warnings {
                log::warn!("{w}");
            }
            let _pid = match pidfile.map(|p| Pidfile::create(p, relay_uid)).transpose() {
                Ok(p) => p,
                Err(e) => {
                    log::error!("{e}");
                    eprintln!("mm4relay: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match relay::run(&config, || log_guard.reopen()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    log::error!("{e}");
                    eprintln!("mm4relay: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Demo(opts) => {
            let _log = logging::init(LevelFilter::Warn, &logging::Target::Stderr, None)
                .map_err(|e| eprintln!("mm4relay: {e}"));
            match demo::run(&opts) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("mm4relay demo: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
