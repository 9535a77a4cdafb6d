//! The command line: one tree of commands (clap), from which the help of
//! every command, the man pages and the shell completions all come.

use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, CommandFactory, Parser, Subcommand};

/// `mm4relay`.
#[derive(Parser, Debug)]
#[command(
    name = "mm4relay",
    about = "MM4 relay: one message pool and one persistent SMTP sub-pool per destination MMSC",
    long_about = "mm4relay is the MM4 interface of an MMS centre: it takes MM4 messages \
        (3GPP TS 23.140 PDUs carried as mail over SMTP) from the local MMSC and from \
        partner operators, makes each durable in its spool before it answers 250, and \
        delivers it to its destination MMSC over persistent SMTP connections, each \
        destination with its own queue and its own connections.",
    after_help = "The configuration keys and their defaults are documented in the sample \
        configuration (conf/mm4relay.ini; /etc/mm4relay/mm4relay.ini where packaged).",
    disable_version_flag = true,
    disable_help_subcommand = true,
    arg_required_else_help = true
)]
pub struct Cli {
    /// Print the version, the TLS library and the features built in
    #[arg(short = 'V', long)]
    pub version: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// The commands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the relay in the foreground until SIGTERM or SIGINT
    #[command(
        long_about = "Runs the relay in the foreground until SIGTERM or SIGINT. \
        SIGHUP re-reads FILE (peers, routes, limits, partners; a change that needs a \
        restart is logged as such) and reopens the log file, for logrotate. SIGTERM and \
        SIGINT stop it gracefully: the listener closes, open sessions are told 421, \
        deliveries in flight finish within [relay] shutdown_timeout, and everything \
        still queued stays in the spool for the next start."
    )]
    Run {
        /// The configuration file
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        /// Write the process ID to PATH at start, remove it at exit
        #[arg(long, value_name = "PATH")]
        pidfile: Option<PathBuf>,
    },
    /// Validate a configuration file; print its peers and routing table
    Check {
        /// The configuration file
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Per-peer health, allowance, connections, queues and totals of the
    /// running relay
    Status {
        #[command(flatten)]
        to: Control,
        /// The same figures as one JSON object
        #[arg(long, conflicts_with = "watch")]
        json: bool,
        /// Redraw the table in place every SECONDS (default 2) until
        /// interrupted
        #[arg(
            long,
            value_name = "SECONDS",
            num_args = 0..=1,
            default_missing_value = "2",
            value_parser = clap::value_parser!(u64).range(1..=3600)
        )]
        watch: Option<u64>,
    },
    /// The peer a recipient goes to and the rule that chose it
    #[command(
        long_about = "The peer a recipient goes to and the rule that chose it \
        (ported exact or block, prefix, domain, ENUM, default), by the running relay's \
        tables, or by FILE's when the relay is not running."
    )]
    Route {
        /// An envelope recipient: +NUMBER/TYPE=PLMN@domain, a number, or
        /// user@domain
        #[arg(value_name = "ADDRESS")]
        rcpt: String,
        #[command(flatten)]
        to: Control,
    },
    /// Re-read the configuration and say whether it was taken (exit 1 and
    /// why, if refused)
    Reload {
        #[command(flatten)]
        to: Control,
    },
    /// Look at the queued messages and act on them
    #[command(disable_help_subcommand = true)]
    Queue {
        #[command(subcommand)]
        action: Queue,
        #[command(flatten)]
        to: Control,
    },
    /// A message's history from the CDR files and the running relay's
    /// queue, in time order
    Trace {
        /// A queue ID, transaction ID, message ID or number
        what: String,
        /// Only rows of the last DURATION (30m, 12h, 2d)
        #[arg(long, value_name = "DURATION", value_parser = duration)]
        since: Option<Duration>,
        /// The configuration file (its [cdr] dir and control socket)
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Run against three simulated MMSCs on loopback and report
    Demo {
        /// Messages to send
        #[arg(long, value_name = "N", default_value_t = 3000)]
        messages: usize,
        /// Parallel inbound SMTP sessions
        #[arg(long, value_name = "N", default_value_t = 8,
              value_parser = clap::value_parser!(u64).range(1..=10_000))]
        sessions: u64,
        /// Delay of the slow peer per message, in milliseconds
        #[arg(long = "slow-ms", value_name = "N", default_value_t = 20)]
        slow_ms: u64,
    },
    /// Write the man pages (mm4relay.8 and one per command) into DIR
    Man {
        /// Where the pages go (made if missing)
        dir: PathBuf,
    },
    /// Print a shell completion script
    Completions {
        /// The shell
        shell: clap_complete::Shell,
    },
}

/// Which running relay a control command asks.
#[derive(Args, Debug, Clone)]
pub struct Control {
    /// Ask the relay of this configuration (its [relay] control_socket)
    /// [default: /etc/mm4relay/mm4relay.ini, if there]
    #[arg(short, long, value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,
    /// Ask the relay on this control socket [default, with no
    /// configuration: /run/mm4relay.sock]
    #[arg(long, value_name = "PATH", global = true, conflicts_with = "config")]
    pub socket: Option<PathBuf>,
}

/// The `queue` commands.
#[derive(Subcommand, Debug)]
pub enum Queue {
    /// Queued messages per peer by age (like qshape)
    Age,
    /// Queued messages, oldest first: id, age, attempts, sender,
    /// recipients, last reply
    List {
        /// Only this peer's
        peer: Option<String>,
    },
    /// Envelope, state per peer and headers of a message
    Show {
        /// Its queue ID
        id: String,
    },
    /// Try deferred messages now
    Retry {
        /// A queue ID, a peer, or all
        #[arg(value_name = "ID|PEER|all")]
        what: String,
    },
    /// Hold a peer (it keeps its queue and sends nothing) or a message (it
    /// stays queued, unattempted, until released or the next restart)
    Hold {
        /// A peer or a queue ID
        #[arg(value_name = "PEER|ID")]
        what: String,
    },
    /// Release what `queue hold` held
    Release {
        /// A peer or a queue ID
        #[arg(value_name = "PEER|ID")]
        what: String,
    },
    /// Remove a message for good (logged with the reason)
    Delete {
        /// Its queue ID
        id: String,
        /// Why, for the log and the CDR
        reason: Vec<String>,
    },
}

impl Queue {
    /// As the control socket takes it.
    pub fn request(&self) -> String {
        match self {
            Queue::Age => "queue age".into(),
            Queue::List { peer: None } => "queue list".into(),
            Queue::List { peer: Some(p) } => format!("queue list {p}"),
            Queue::Show { id } => format!("queue show {id}"),
            Queue::Retry { what } => format!("queue retry {what}"),
            Queue::Hold { what } => format!("queue hold {what}"),
            Queue::Release { what } => format!("queue release {what}"),
            Queue::Delete { id, reason } => {
                let mut s = format!("queue delete {id}");
                for w in reason {
                    let _ = write!(s, " {w}");
                }
                s
            }
        }
    }
}

fn duration(s: &str) -> Result<Duration, String> {
    mm4relay::config::parse_duration(s).map_err(|e| e.to_string())
}

/// What the man page of `mm4relay` says beyond its options.
const MORE: &str = r#".SH "EXIT STATUS"
.TP
0
success
.TP
1
a runtime failure, or the relay refused what it was asked
.TP
2
a usage or configuration error
.TP
3
the relay is not running (nothing answers on its control socket)
.SH SIGNALS
.TP
SIGHUP
re-read the configuration and reopen the log file
.TP
SIGTERM, SIGINT
stop gracefully; what is queued stays in the spool
.SH FILES
.TP
/etc/mm4relay/mm4relay.ini
the configuration (every key and its default is documented there)
.TP
/var/spool/mm4relay
the spool: accepted messages, durable before the relay answers 250
.TP
/var/log/mm4relay
the log, when [relay] log_target is a file
.SH "SEE ALSO"
The README of the source distribution: the design, the CDR columns, the
metrics.
"#;

/// Writes `mm4relay.8` and `mm4relay-COMMAND[-SUBCOMMAND].8` into `dir`.
pub fn write_man(dir: &Path) -> io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut cmd = Cli::command();
    cmd.build();
    let mut written = Vec::new();
    let mut top = Vec::new();
    man_of(cmd.clone()).render(&mut top)?;
    top.extend_from_slice(MORE.as_bytes());
    let path = dir.join("mm4relay.8");
    write_new(&path, &top)?;
    written.push(path);
    let mut todo: Vec<(String, clap::Command)> = cmd
        .get_subcommands()
        .map(|c| (format!("mm4relay-{}", c.get_name()), c.clone()))
        .collect();
    while let Some((name, sub)) = todo.pop() {
        for s in sub.get_subcommands() {
            todo.push((format!("{name}-{}", s.get_name()), s.clone()));
        }
        let mut page = Vec::new();
        man_of(sub.name(name.clone())).render(&mut page)?;
        let path = dir.join(format!("{name}.8"));
        write_new(&path, &page)?;
        written.push(path);
    }
    written.sort();
    Ok(written)
}

/// Writes `data` to a new file at `path`, replacing what is there by
/// unlinking it first: never through a link someone left there (`man` may
/// run as root in a shared directory).
fn write_new(path: &Path, data: &[u8]) -> io::Result<()> {
    use std::io::Write as _;
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)?
        .write_all(data)
}

fn man_of(cmd: clap::Command) -> clap_mangen::Man {
    clap_mangen::Man::new(cmd)
        .section("8")
        .manual("mm4relay")
        .source(concat!("mm4relay ", env!("CARGO_PKG_VERSION")))
}

/// The completion script for `shell`.
pub fn completions(shell: clap_complete::Shell) -> Vec<u8> {
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "mm4relay", &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_tree_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn control_options_go_before_or_after_the_queue_command() {
        for args in [
            &["mm4relay", "queue", "list", "B", "-c", "x.ini"][..],
            &["mm4relay", "queue", "-c", "x.ini", "list", "B"],
        ] {
            let cli = Cli::try_parse_from(args).unwrap();
            let Some(Command::Queue { action, to }) = cli.command else {
                panic!("{args:?}");
            };
            assert_eq!(action.request(), "queue list B");
            assert_eq!(to.config.as_deref(), Some(Path::new("x.ini")));
        }
        let cli =
            Cli::try_parse_from(["mm4relay", "queue", "delete", "Q1", "bad", "peer"]).unwrap();
        let Some(Command::Queue { action, .. }) = cli.command else {
            panic!("not a queue command");
        };
        assert_eq!(action.request(), "queue delete Q1 bad peer");
    }

    #[test]
    fn watch_takes_an_optional_interval_within_bounds() {
        let watch = |args: &[&str]| match Cli::try_parse_from(args).map(|c| c.command) {
            Ok(Some(Command::Status { watch, .. })) => Ok(watch),
            Ok(other) => panic!("{other:?}"),
            Err(e) => Err(e.kind()),
        };
        assert_eq!(watch(&["mm4relay", "status", "--watch"]), Ok(Some(2)));
        assert_eq!(watch(&["mm4relay", "status", "--watch", "5"]), Ok(Some(5)));
        assert_eq!(watch(&["mm4relay", "status"]), Ok(None));
        assert!(watch(&["mm4relay", "status", "--watch", "0"]).is_err());
        assert!(watch(&["mm4relay", "status", "--watch", "--json"]).is_err());
    }
}
