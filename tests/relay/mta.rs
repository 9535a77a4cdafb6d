//! Third-party SMTP servers as the relay's peers: a private Postfix
//! instance, Postfix's smtp-sink, Exim and OpenSMTPD, each a child process
//! on a loopback port with its own configuration, queue and log under a
//! temporary directory, stopped (and waited for) when dropped.
//!
//! `.ci/third-party` installs Postfix and unpacks Exim and OpenSMTPD into
//! `target/third-party` (or `$MM4_THIRD_PARTY`). A test whose server is
//! missing says `SKIPPED: ...` on stderr and returns.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::support::DEADLINE;

/// The MM4 domains every server accepts (A's, B's and C's).
pub const DOMAINS: [&str; 3] = [
    "mms.mnc010.mcc001.gprs",
    "mms.mnc020.mcc001.gprs",
    "mms.mnc456.mcc999.gprs",
];

/// Where `.ci/third-party` unpacked Exim and OpenSMTPD.
pub fn third_party_dir() -> PathBuf {
    match std::env::var_os("MM4_THIRD_PARTY") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("target/third-party"),
    }
}

/// Says loudly that a test did not run.
pub fn skipped(server: &str) {
    eprintln!("SKIPPED: {server} not installed (run .ci/third-party); this test did not run");
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A loopback port that was free a moment ago, for a server to bind next.
/// Taken below the kernel's ephemeral range (32768 and up): a port 0 that
/// is bound and released there can go to any other test's listener or
/// outgoing connection before the server binds it (Postfix once lost
/// its port that way). Among these, a counter per process keeps the
/// callers apart, and a bind proves the port free.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    // Tests in other processes start elsewhere in the range.
    let base = 20_000 + (std::process::id() % 500) as u16 * 20;
    loop {
        let port = base + NEXT.fetch_add(1, Ordering::Relaxed) % 12_000;
        let port = if port >= 32_000 { port - 12_000 } else { port };
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// True if something listens on 127.0.0.1:`port` (from /proc/net/tcp,
/// so that polling opens no connection the server would count).
fn listening(port: u16) -> bool {
    let want = format!("0100007F:{port:04X}");
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1] == want && f[3] == "0A"
        })
}

/// True if a connection to 127.0.0.1:`port` is still open at the server's
/// end (a server process still holds it).
fn served(port: u16) -> bool {
    let want = format!("0100007F:{port:04X}");
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1] == want && f[3] == "01"
        })
}

/// Waits until every port in `ports` listens, or the child exits, or the
/// deadline passes; panics with `log` (the server's own words) if not.
fn wait_listening(child: &mut Child, ports: &[u16], what: &str, log: &Path) {
    let end = Instant::now() + DEADLINE;
    while !ports.iter().all(|&p| listening(p)) {
        let status = child.try_wait().unwrap();
        if status.is_some() || Instant::now() > end {
            panic!(
                "{what} did not listen on {ports:?} ({status:?}): {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// Stops `child`: SIGTERM, then SIGKILL if it has not exited within the
/// deadline; always waited for.
fn stop_child(child: &mut Child) {
    if child.try_wait().unwrap().is_none() {
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let end = Instant::now() + DEADLINE;
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > end {
                let _ = child.kill();
                break;
            }
            thread::sleep(Duration::from_millis(5));
        }
    }
    let _ = child.wait();
}

/// Lines of `log` that contain `needle`.
fn count_lines(log: &Path, needle: &str) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

/// Every regular file under `dir` (recursively), oldest name first.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

fn mkdir_owned(path: &Path, user: &str) {
    std::fs::create_dir_all(path).unwrap();
    let ok = Command::new("chown")
        .arg(user)
        .arg(path)
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "chown {user} {}", path.display());
}

fn uid_gid(user: &str) -> Option<(String, String)> {
    let id = |flag: &str| {
        let out = Command::new("id").args([flag, user]).output().ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    Some((id("-u")?, id("-g")?))
}

/// A temporary directory the daemons' unprivileged users can traverse.
fn open_tempdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// What a server does that the tests look at.
pub trait Mta {
    fn name(&self) -> &'static str;
    /// The plain SMTP address.
    fn addr(&self) -> SocketAddr;
    /// TCP connections the server accepted so far (from its log).
    fn connections(&self) -> usize;
    /// Every message delivered so far, as stored.
    fn messages(&self) -> Vec<Vec<u8>>;
    /// The server's log so far.
    fn log(&self) -> String;
}

/// A server run from a private directory on loopback ports: the
/// directory, the ports, and the process while it runs (stopped when this
/// is dropped).
struct Daemon {
    dir: tempfile::TempDir,
    ports: Vec<u16>,
    child: Option<Child>,
}

impl Daemon {
    /// A private directory and `ports` free ports; nothing runs yet.
    fn new(ports: usize) -> Daemon {
        Daemon {
            dir: open_tempdir(),
            ports: (0..ports).map(|_| free_port()).collect(),
            child: None,
        }
    }

    /// `name` in the directory.
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The first port's address.
    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.ports[0]))
    }

    /// Runs `cmd`, its output into `out` in the directory, and waits until
    /// it listens on every port; if it does not, panics with `log`.
    fn run(&mut self, cmd: &mut Command, what: &str, out: &str, log: &Path) {
        let out = std::fs::File::create(self.path(out)).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        // Kept before the wait: a server that does not come up is still
        // stopped when this is dropped.
        let child = self.child.insert(child);
        wait_listening(child, &self.ports, what, log);
    }

    /// Stops the process if it runs.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop_child(&mut c);
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------- Postfix

/// What a private Postfix offers.
#[derive(Default, Clone)]
pub struct PostfixOptions {
    /// `smtpd_timeout` (default Postfix's 300s).
    pub smtpd_timeout: Option<String>,
    /// Certificate and key for STARTTLS (and the wrappermode port).
    pub tls: Option<(PathBuf, PathBuf)>,
    /// A second smtpd with `smtpd_tls_wrappermode = yes` (needs `tls`).
    pub wrappermode: bool,
    /// Relay everything to this address over STARTTLS (`encrypt`),
    /// trusting this CA file, instead of delivering the MM4 domains: a
    /// Postfix client in front of the relay.
    pub relayhost: Option<(SocketAddr, PathBuf)>,
}

/// A private Postfix instance (`postfix -c DIR start-fg`), delivering the
/// MM4 domains into one Maildir with virtual(8).
pub struct Postfix {
    daemon: Daemon,
    /// The wrappermode smtpd's, if any (the daemon's second port).
    tls_port: Option<u16>,
}

impl Postfix {
    pub fn installed() -> bool {
        Path::new("/usr/sbin/postfix").exists()
            && Path::new("/usr/lib/postfix/sbin/master").exists()
            && is_root()
            && uid_gid("postfix").is_some()
    }

    /// A running instance, or `None` (said on stderr) if Postfix is missing.
    pub fn start(opts: PostfixOptions) -> Option<Postfix> {
        if !Postfix::installed() {
            skipped("postfix");
            return None;
        }
        let daemon = Daemon::new(1 + usize::from(opts.wrappermode));
        let d = daemon.dir.path();
        for sub in ["conf", "queue"] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        mkdir_owned(&d.join("data"), "postfix");
        mkdir_owned(&d.join("mail"), "postfix");
        let (uid, gid) = uid_gid("postfix").unwrap();
        let mut main = format!(
            "compatibility_level = 3.6\n\
             queue_directory = {d}/queue\n\
             data_directory = {d}/data\n\
             mail_owner = postfix\n\
             setgid_group = postdrop\n\
             inet_interfaces = 127.0.0.1\n\
             inet_protocols = ipv4\n\
             myhostname = postfix.test\n\
             mydestination =\n\
             mynetworks = 127.0.0.0/8\n\
             maillog_file_prefixes = {d}\n\
             maillog_file = {d}/maillog\n\
             local_header_rewrite_clients =\n\
             virtual_mailbox_domains = {domains}\n\
             virtual_mailbox_base = {d}/mail\n\
             virtual_mailbox_maps = static:inbox/\n\
             virtual_uid_maps = static:{uid}\n\
             virtual_gid_maps = static:{gid}\n\
             smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination\n\
             message_size_limit = 10485760\n\
             smtpd_client_connection_count_limit = 0\n\
             smtpd_client_connection_rate_limit = 0\n\
             smtpd_client_message_rate_limit = 0\n\
             biff = no\n",
            d = d.display(),
            // A client in front of the relay delivers nothing itself.
            domains = if opts.relayhost.is_some() {
                String::new()
            } else {
                DOMAINS.join(", ")
            },
        );
        if let Some(t) = &opts.smtpd_timeout {
            main.push_str(&format!("smtpd_timeout = {t}\n"));
        }
        if let Some((cert, key)) = &opts.tls {
            main.push_str(&format!(
                "smtpd_tls_cert_file = {}\nsmtpd_tls_key_file = {}\nsmtpd_tls_security_level = may\n\
                 smtpd_tls_loglevel = 1\n",
                cert.display(),
                key.display()
            ));
        }
        if let Some((to, ca)) = &opts.relayhost {
            main.push_str(&format!(
                "relayhost = [{}]:{}\nsmtp_tls_security_level = encrypt\n\
                 smtp_tls_CAfile = {}\nsmtp_tls_loglevel = 1\n",
                to.ip(),
                to.port(),
                ca.display()
            ));
        }
        std::fs::write(d.join("conf/main.cf"), main).unwrap();
        let (port, tls_port) = (daemon.ports[0], daemon.ports.get(1).copied());
        let mut master = format!("127.0.0.1:{port} inet n - n - - smtpd\n");
        if let Some(p) = tls_port {
            assert!(opts.tls.is_some(), "wrappermode needs a certificate");
            master.push_str(&format!(
                "127.0.0.1:{p} inet n - n - - smtpd\n  -o smtpd_tls_wrappermode=yes\n  -o smtpd_tls_security_level=encrypt\n"
            ));
        }
        master.push_str(POSTFIX_SERVICES);
        std::fs::write(d.join("conf/master.cf"), master).unwrap();
        let mut pf = Postfix { daemon, tls_port };
        pf.run();
        Some(pf)
    }

    fn conf(&self) -> PathBuf {
        self.daemon.path("conf")
    }

    fn maillog(&self) -> PathBuf {
        self.daemon.path("maillog")
    }

    fn run(&mut self) {
        let (conf, log) = (self.conf(), self.maillog());
        let mut cmd = Command::new("/usr/sbin/postfix");
        cmd.arg("-c").arg(conf).arg("start-fg");
        self.daemon.run(&mut cmd, "postfix", "start.out", &log);
    }

    /// `postfix stop`, and waits for master to exit (it takes its
    /// children with it); then nothing of this instance runs.
    pub fn stop(&mut self) {
        if self.daemon.child.is_some() {
            let _ = Command::new("/usr/sbin/postfix")
                .arg("-c")
                .arg(self.conf())
                .arg("stop")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            self.daemon.stop();
            // Its smtpd processes end at their earliest convenience: the
            // stop is over when none holds a connection any more.
            let end = Instant::now() + DEADLINE;
            while self.daemon.ports.iter().any(|&p| served(p)) {
                assert!(
                    Instant::now() < end,
                    "postfix's smtpd processes outlived it"
                );
                thread::sleep(Duration::from_millis(5));
            }
        }
    }

    /// `postqueue -f`: whatever this instance deferred is tried again now.
    pub fn flush(&self) {
        let _ = Command::new("/usr/sbin/postqueue")
            .arg("-c")
            .arg(self.conf())
            .arg("-f")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    /// Stops and starts again on the same ports and queue.
    pub fn restart(&mut self) {
        self.stop();
        self.run();
    }

    /// The implicit-TLS (wrappermode) address.
    pub fn tls_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.tls_port.expect("wrappermode")))
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Mta for Postfix {
    fn name(&self) -> &'static str {
        "postfix"
    }
    fn addr(&self) -> SocketAddr {
        self.daemon.addr()
    }
    fn connections(&self) -> usize {
        count_lines(&self.maillog(), ": connect from ")
    }
    fn messages(&self) -> Vec<Vec<u8>> {
        read_all(&self.daemon.path("mail/inbox/new"))
    }
    fn log(&self) -> String {
        std::fs::read_to_string(self.maillog()).unwrap_or_default()
    }
}

fn read_all(dir: &Path) -> Vec<Vec<u8>> {
    files_under(dir)
        .iter()
        .filter_map(|p| std::fs::read(p).ok())
        .collect()
}

/// The services of a Postfix that receives and delivers locally; no
/// chroot, so that the temporary paths work as they are.
const POSTFIX_SERVICES: &str = "\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000    0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
";

// ---------------------------------------------------------------- smtp-sink

/// Postfix's smtp-sink with fault flags, dumping each transaction to a
/// file and counting sessions (`-c`).
pub struct SmtpSink {
    daemon: Daemon,
}

impl SmtpSink {
    pub fn installed() -> bool {
        Path::new("/usr/sbin/smtp-sink").exists() && is_root()
    }

    /// A sink with `flags` (e.g. `["-f", "RCPT"]`), or `None` if missing.
    pub fn start(flags: &[&str]) -> Option<SmtpSink> {
        if !SmtpSink::installed() {
            skipped("smtp-sink (postfix)");
            return None;
        }
        let mut sink = SmtpSink {
            daemon: Daemon::new(1),
        };
        sink.run(flags);
        Some(sink)
    }

    /// Stops this sink and starts one with `flags` on the same port.
    pub fn restart(&mut self, flags: &[&str]) {
        self.daemon.stop();
        self.run(flags);
    }

    fn run(&mut self, flags: &[&str]) {
        let d = self.daemon.dir.path();
        let n = files_under(d).len();
        mkdir_owned(&d.join("dump"), "nobody");
        let mut cmd = Command::new("/usr/sbin/smtp-sink");
        cmd.args(["-u", "nobody", "-c", "-h", "sink.test", "-d"])
            .arg(d.join("dump/%M."))
            .args(flags)
            .arg(self.daemon.addr().to_string())
            .arg("64");
        let out = format!("counters.{n}");
        let log = d.join(&out);
        self.daemon.run(&mut cmd, "smtp-sink", &out, &log);
    }
}

impl Mta for SmtpSink {
    fn name(&self) -> &'static str {
        "smtp-sink"
    }
    fn addr(&self) -> SocketAddr {
        self.daemon.addr()
    }
    /// Sessions that ended, summed over every run of the sink (its
    /// counters are written as a session ends).
    fn connections(&self) -> usize {
        files_under(self.daemon.dir.path())
            .iter()
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("counters"))
            })
            .map(|p| {
                let text = std::fs::read_to_string(p).unwrap_or_default();
                text.rsplit('\r')
                    .find_map(|c| c.split_whitespace().next()?.strip_prefix("sess="))
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0)
            })
            .sum()
    }
    fn messages(&self) -> Vec<Vec<u8>> {
        read_all(&self.daemon.path("dump"))
    }
    fn log(&self) -> String {
        self.daemon
            .dir
            .path()
            .read_dir()
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("counters"))
            .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
            .collect()
    }
}

// ---------------------------------------------------------------- Exim

/// Exim from the unpacked package (`exim4 -C CONF -bdf -oX PORT`): the
/// daemon in the foreground with a private spool and log, delivering the
/// MM4 domains into a Maildir (appendfile, CRLF kept). Started by root
/// with -C, Exim gives up root for its deliveries, which run as
/// Debian-exim into a directory that user owns.
pub struct Exim {
    daemon: Daemon,
}

impl Exim {
    fn binary() -> PathBuf {
        third_party_dir().join("exim/usr/sbin/exim4")
    }

    pub fn installed() -> bool {
        Exim::binary().exists() && is_root() && uid_gid("Debian-exim").is_some()
    }

    /// A running Exim, `max_per_connection` its
    /// `smtp_accept_max_per_connection` (0: no limit).
    pub fn start(max_per_connection: u32) -> Option<Exim> {
        if !Exim::installed() {
            skipped("exim (exim4-daemon-light unpacked)");
            return None;
        }
        let mut daemon = Daemon::new(1);
        let d = daemon.dir.path().to_path_buf();
        for sub in ["spool", "log", "mail"] {
            mkdir_owned(&d.join(sub), "Debian-exim");
        }
        let conf = format!(
            "exim_path = {exim}\n\
             primary_hostname = exim.test\n\
             local_interfaces = 127.0.0.1\n\
             tls_advertise_hosts =\n\
             domainlist mm4_domains = {domains}\n\
             spool_directory = {d}/spool\n\
             log_file_path = {d}/log/%slog\n\
             log_selector = +smtp_connection\n\
             exim_user = Debian-exim\n\
             exim_group = Debian-exim\n\
             never_users =\n\
             host_lookup =\n\
             rfc1413_hosts =\n\
             smtp_accept_max = 100\n\
             smtp_accept_max_per_connection = {max_per_connection}\n\
             smtp_accept_queue_per_connection = 0\n\
             message_size_limit = 10M\n\
             acl_smtp_rcpt = acl_check_rcpt\n\
             begin acl\n\
             acl_check_rcpt:\n  accept domains = +mm4_domains\n  deny message = relay not permitted\n\
             begin routers\n\
             mm4:\n  driver = accept\n  domains = +mm4_domains\n  transport = mm4_file\n\
             begin transports\n\
             mm4_file:\n  driver = appendfile\n  directory = {d}/mail\n  maildir_format = true\n\
             \x20 user = Debian-exim\n  group = Debian-exim\n  use_crlf = true\n\
             \x20 envelope_to_add = false\n  return_path_add = false\n  delivery_date_add = false\n\
             begin retry\n*  *  F,1h,1m\n",
            exim = Exim::binary().display(),
            domains = DOMAINS.join(" : "),
            d = d.display(),
        );
        std::fs::write(d.join("exim.conf"), conf).unwrap();
        let mut cmd = Command::new(Exim::binary());
        cmd.arg("-C")
            .arg(d.join("exim.conf"))
            .args(["-bdf", "-oX", &daemon.ports[0].to_string(), "-oP"])
            .arg(d.join("exim.pid"));
        daemon.run(&mut cmd, "exim", "daemon.out", &d.join("log/mainlog"));
        Some(Exim { daemon })
    }
}

impl Mta for Exim {
    fn name(&self) -> &'static str {
        "exim"
    }
    fn addr(&self) -> SocketAddr {
        self.daemon.addr()
    }
    fn connections(&self) -> usize {
        count_lines(&self.daemon.path("log/mainlog"), "(TCP/IP connection count")
    }
    fn messages(&self) -> Vec<Vec<u8>> {
        read_all(&self.daemon.path("mail/new"))
    }
    fn log(&self) -> String {
        std::fs::read_to_string(self.daemon.path("log/mainlog")).unwrap_or_default()
    }
}

// ---------------------------------------------------------------- OpenSMTPD

/// OpenSMTPD from the unpacked package (`smtpd -d -f CONF`). Its spool
/// (/var/spool/smtpd), control socket (/run/smtpd.sock) and helpers
/// (/usr/libexec/opensmtpd) are compiled-in paths: it runs in a mount
/// namespace of its own (`unshare -m`) where a private spool directory, a
/// private /run and the unpacked helpers are mounted over them (the empty
/// mount points are made by `.ci/third-party`). Delivery is an `mda`
/// script that writes each message to a file.
pub struct OpenSmtpd {
    daemon: Daemon,
}

impl OpenSmtpd {
    fn root() -> PathBuf {
        third_party_dir().join("opensmtpd")
    }

    pub fn installed() -> bool {
        OpenSmtpd::root().join("usr/sbin/smtpd").exists()
            && Path::new("/var/spool/smtpd").is_dir()
            && Path::new("/usr/libexec/opensmtpd").is_dir()
            && is_root()
            && uid_gid("opensmtpd").is_some()
            && uid_gid("opensmtpq").is_some()
    }

    /// A running OpenSMTPD whose sessions take at most `max_mails`
    /// messages (its own default is 100).
    pub fn start(max_mails: u32) -> Option<OpenSmtpd> {
        if !OpenSmtpd::installed() {
            skipped("opensmtpd (unpacked)");
            return None;
        }
        let mut daemon = Daemon::new(1);
        let d = daemon.dir.path().to_path_buf();
        std::fs::create_dir_all(d.join("spool")).unwrap();
        std::fs::create_dir_all(d.join("run")).unwrap();
        mkdir_owned(&d.join("mail"), "nobody");
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(d.join("spool"), std::fs::Permissions::from_mode(0o711)).unwrap();
        let deliver = d.join("deliver.sh");
        std::fs::write(
            &deliver,
            format!(
                "#!/bin/sh\nf={}/mail/$(date +%s%N).$$\ncat > \"$f.tmp\" && mv \"$f.tmp\" \"$f.eml\"\n",
                d.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&deliver, std::fs::Permissions::from_mode(0o755)).unwrap();
        let port = daemon.ports[0];
        let domains: Vec<String> = DOMAINS.iter().map(|x| format!("\"{x}\"")).collect();
        let conf = format!(
            "smtp limit max-mails {max_mails}\n\
             listen on 127.0.0.1 port {port} hostname opensmtpd.test\n\
             table mm4 {{ {} }}\n\
             table vusers {{ \"@\" = \"nobody\" }}\n\
             action \"files\" mda \"{}\" virtual <vusers>\n\
             match from any for domain <mm4> action \"files\"\n",
            domains.join(", "),
            deliver.display(),
        );
        std::fs::write(d.join("smtpd.conf"), conf).unwrap();
        let script = format!(
            "mount --bind {d}/spool /var/spool/smtpd && \
             mount --bind {d}/run /run && \
             mount --bind {root}/usr/libexec/opensmtpd /usr/libexec/opensmtpd && \
             exec {root}/usr/sbin/smtpd -d -f {d}/smtpd.conf",
            d = d.display(),
            root = OpenSmtpd::root().display(),
        );
        let mut cmd = Command::new("unshare");
        cmd.args(["-m", "--propagation", "private", "sh", "-c", &script]);
        daemon.run(&mut cmd, "opensmtpd", "smtpd.log", &d.join("smtpd.log"));
        Some(OpenSmtpd { daemon })
    }
}

impl Mta for OpenSmtpd {
    fn name(&self) -> &'static str {
        "opensmtpd"
    }
    fn addr(&self) -> SocketAddr {
        self.daemon.addr()
    }
    fn connections(&self) -> usize {
        count_lines(&self.daemon.path("smtpd.log"), "smtp connected ")
    }
    fn messages(&self) -> Vec<Vec<u8>> {
        files_under(&self.daemon.path("mail"))
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "eml"))
            .filter_map(|p| std::fs::read(p).ok())
            .collect()
    }
    fn log(&self) -> String {
        std::fs::read_to_string(self.daemon.path("smtpd.log")).unwrap_or_default()
    }
}

/// The part of a stored message below the relay's own `Received:` (the
/// one `by relay.test`): what the relay was given, as the server stored it.
pub fn below_our_received(stored: &[u8]) -> Option<&[u8]> {
    let mut pos = 0;
    while pos < stored.len() {
        let end = stored[pos..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(stored.len(), |i| pos + i + 1);
        if stored[pos..].starts_with(b"Received: ") {
            // The field with its continuation lines.
            let mut fend = end;
            while matches!(stored.get(fend), Some(b' ' | b'\t')) {
                fend = stored[fend..]
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(stored.len(), |i| fend + i + 1);
            }
            if stored[pos..fend]
                .windows(b"by relay.test".len())
                .any(|w| w == b"by relay.test")
            {
                return Some(&stored[fend..]);
            }
            pos = fend;
            continue;
        }
        if stored[pos..].starts_with(b"\r\n") || stored[pos..].starts_with(b"\n") {
            return None; // end of the header, not found
        }
        pos = end;
    }
    None
}

/// `data` with each CRLF as LF: how Postfix, OpenSMTPD and smtp-sink store
/// the lines they received.
pub fn lf(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    let mut i = 0;
    while i < data.len() {
        if data[i] == b'\r' && data.get(i + 1) == Some(&b'\n') {
            i += 1;
            continue;
        }
        out.push(data[i]);
        i += 1;
    }
    out
}
