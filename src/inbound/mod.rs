//! Inbound SMTP: accept loops, one thread per session (at most
//! `max_sessions` from partners and strangers, and `max_local_sessions`
//! from the local MMSC's hosts, counted apart), read and write deadlines,
//! and the relay's answers to RCPT and to the end of DATA.
//!
//! - RCPT: parse the address (553 5.1.3), route it (550 5.1.2), apply
//!   relay control (550 5.7.1).
//! - End of DATA: the MM4 check (554); recipients this message ID was
//!   already accepted for are dropped as duplicates; the message gets its
//!   queue ID and `Received:` line, is made durable in the spool (452/451
//!   if that fails), and only then answered 250 and split into one job per
//!   destination peer.
//!
//! Stop: the accept loops end; idle sessions get 421 and are closed; a
//! session receiving DATA finishes that message, then gets 421, unless
//! `shutdown_timeout` passes first: then it is cut.
//!
//! What a client repeats is bounded: refusals are logged once per reason
//! per session (`Refusals`), refusals at accept at most once a second,
//! and failed AUTH attempts slow the next ones (`throttle`).
//!
//! Files: `accept.rs` (accept loops, session places, the guard), `session.rs`
//! (the driver and its deadlines), `intake.rs` (what RCPT, AUTH and DATA
//! are answered), `throttle.rs`. This part hands accepted messages to the
//! `spool` and the `queue`; it never talks to a peer, and nothing below it
//! knows it exists (`ops` reads its counters).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;

use log::{debug, warn};
use parking_lot::RwLock;

use crate::config::{AuthUser, Config, ConfigError, Mm4Check, PortedLoad};
use crate::dns::{MxError, Resolver};
use crate::message::IdSource;
use crate::mm4;
use crate::mm4::dedup::Dedup;
use crate::queue::Queue;
use crate::route::access::{AccessControl, Cidr};
use crate::route::{PeerId, Router};
use crate::smtp::session::SessionConfig;
use crate::spool::{Appender, Spool};
use crate::tls;

mod accept;
mod intake;
mod session;
mod throttle;

pub use accept::{Bound, Limits, Listener};

use throttle::AuthThrottle;

/// Inbound counters, for the metrics.
#[derive(Debug, Default)]
pub struct InboundStats {
    /// Sessions open now.
    pub sessions_open: AtomicUsize,
    /// Sessions accepted since start.
    pub sessions_total: AtomicU64,
    /// Messages answered 250 and queued.
    pub accepted: AtomicU64,
    /// Messages answered 250 as duplicates, not queued again.
    pub duplicates: AtomicU64,
    /// Messages refused by the MM4 check or SMTP data rules.
    pub rejected_content: AtomicU64,
    /// Messages refused because the spool was full or failed.
    pub rejected_spool: AtomicU64,
    /// Recipients refused: bad address syntax.
    pub rcpt_bad_address: AtomicU64,
    /// Recipients refused: no route.
    pub rcpt_unroutable: AtomicU64,
    /// Recipients refused: relaying denied.
    pub rcpt_relay_denied: AtomicU64,
    /// Connections refused by the per-address session or rate limits.
    pub refused_per_ip: AtomicU64,
    /// Sessions that started TLS (STARTTLS or implicit).
    pub tls_sessions: AtomicU64,
    /// AUTH attempts that failed.
    pub auth_failures: AtomicU64,
    /// AUTH attempts answered only after a delay, for recent failures
    /// from the same address or for the same account.
    pub auth_delayed: AtomicU64,
}

/// What sessions decide with; replaced whole by a configuration reload.
struct Tables {
    session: SessionConfig,
    router: Router,
    access: AccessControl,
    peer_names: Vec<String>,
    /// Per peer: recipients' numbers go out as `+` and digits.
    rcpt_international: Vec<bool>,
    mm4_check: Mm4Check,
    command_timeout: Duration,
    data_timeout: Duration,
    session_timeout: Duration,
    queue_lifetime: Duration,
    limits: mm4::Limits,
    tls: Option<tls::Acceptor>,
    tls_required_from: Vec<Cidr>,
    auth_users: Vec<AuthUser>,
    max_sessions_per_ip: usize,
    connection_rate_per_ip: u32,
    ported_load: PortedLoad,
    /// `[enum] domain`.
    enum_domain: Option<String>,
    /// `[dns] smtp_port`.
    smtp_port: u16,
    /// As many dynamic peers run as `max_dynamic_peers` allows: a new
    /// domain is refused before any DNS query.
    dynamic_full: bool,
}

impl Tables {
    fn new(config: &Config) -> Result<Tables, ConfigError> {
        let l = &config.listener;
        // The TLS library may still refuse what the load step read.
        let tls = l
            .tls_identity
            .as_ref()
            .map(tls::Acceptor::new)
            .transpose()
            .map_err(|e| {
                ConfigError::at(
                    config.path.display(),
                    "listener",
                    "",
                    "",
                    format!("TLS: {e}"),
                )
            })?;
        Ok(Tables {
            session: SessionConfig {
                hostname: config.relay.hostname.clone(),
                max_message_size: l.max_message_size,
                max_recipients: l.max_recipients,
                starttls: tls.is_some(),
                auth: !config.auth_users.is_empty(),
                auth_plaintext: l.auth_plaintext,
                max_bad_commands: l.max_bad_commands,
                max_refused_recipients: l.max_refused_recipients,
            },
            router: config.router(),
            access: config.access_control(),
            peer_names: config.peers.iter().map(|p| p.name.clone()).collect(),
            rcpt_international: config.peers.iter().map(|p| p.rcpt_international).collect(),
            mm4_check: l.mm4_check,
            command_timeout: l.command_timeout,
            data_timeout: l.data_timeout,
            session_timeout: l.session_timeout,
            queue_lifetime: config.relay.queue_lifetime,
            limits: mm4::Limits {
                max_header_fields: l.max_header_fields,
                max_header_size: l.max_header_size,
                max_mime_depth: l.max_mime_depth,
            },
            tls,
            tls_required_from: l.tls_required_from.clone(),
            auth_users: config.auth_users.clone(),
            max_sessions_per_ip: l.max_sessions_per_ip,
            connection_rate_per_ip: l.connection_rate_per_ip,
            ported_load: config.ported_load.clone(),
            enum_domain: config.enum_domain.clone(),
            smtp_port: config.smtp_port,
            dynamic_full: config.dynamic.as_ref().is_some_and(|d| {
                let running = config
                    .peers
                    .iter()
                    .filter(|p| p.dynamic && !p.domains.is_empty());
                running.count() >= d.max_peers
            }),
        })
    }
}

/// Tables built from a configuration by [`Inbound::prepare`], not yet in
/// force.
pub struct Prepared(Tables);

/// What every session shares: the tables it decides with and the queue.
pub struct Inbound {
    tables: RwLock<Arc<Tables>>,
    ids: Arc<IdSource>,
    queue: Arc<Queue>,
    spool: Arc<Spool>,
    dedup: Dedup,
    auth_throttle: AuthThrottle,
    stats: Arc<InboundStats>,
    /// The resolver ENUM asks.
    resolver: Arc<Resolver>,
    /// Where sessions ask the relay for a dynamic peer.
    new_peers: Sender<NewPeerRequest>,
    /// Where duplicates are journaled for the CDR, when CDRs are on.
    journal: Option<Appender>,
}

/// A session's request for a dynamic peer: the domain, and where the relay
/// answers with the new peer's id or why there is none.
pub type NewPeerRequest = (String, Sender<Result<PeerId, String>>);

/// Longest a session waits for the relay to make a dynamic peer.
const NEW_PEER_WAIT: Duration = Duration::from_secs(10);

/// Why a recipient's domain got no dynamic peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NewPeerError {
    /// NXDOMAIN, a null MX, or no exchange with an address.
    NoSuchDomain,
    /// DNS did not answer: try later.
    Dns(String),
    /// The relay would not make one (the cap, a stop).
    Refused(String),
}

impl Inbound {
    /// The inbound counters.
    pub fn stats(&self) -> Arc<InboundStats> {
        self.stats.clone()
    }

    /// Builds what sessions decide with (the TLS server side among it)
    /// without applying it, so a start or reload can fail before it
    /// changes anything.
    pub fn prepare(config: &Config) -> Result<Prepared, ConfigError> {
        Tables::new(config).map(Prepared)
    }

    /// Builds the shared part from prepared tables and the configuration.
    pub fn new(
        tables: Prepared,
        config: &Config,
        ids: Arc<IdSource>,
        queue: Arc<Queue>,
        spool: Arc<Spool>,
        resolver: Arc<Resolver>,
        new_peers: Sender<NewPeerRequest>,
    ) -> Inbound {
        // What was accepted within the window before the last stop, or
        // crash, still counts: a sender retrying after losing our 250 at
        // a crash is the case this is for.
        let dedup = Dedup::new(config.relay.dedup_window);
        let mut recent = spool.take_recent();
        recent.sort_by_key(|(_, at)| *at);
        let (now, clock_now) = (Instant::now(), queue.now());
        for (digest, accepted) in &recent {
            let age = clock_now.duration_since(*accepted).unwrap_or_default();
            let at = now.checked_sub(age).unwrap_or(now);
            dedup.record_digests(&[*digest], at);
        }
        let journal = config.cdr.as_ref().map(|_| spool.appender());
        Inbound {
            tables: RwLock::new(Arc::new(tables.0)),
            ids,
            queue,
            spool,
            dedup,
            auth_throttle: AuthThrottle::default(),
            stats: Arc::default(),
            journal,
            resolver,
            new_peers,
        }
    }

    /// Saves the duplicate-suppression keys of the window in the spool,
    /// so that a restart still knows them (a clean stop calls this once no
    /// session is left).
    pub fn save_recent(&self) {
        if self.dedup.is_off() {
            return;
        }
        let keys = self.dedup.export(self.queue.now());
        match self.spool.save_recent(&keys) {
            Ok(()) => debug!("saved {} duplicate-suppression keys", keys.len()),
            Err(e) => warn!("cannot save the duplicate-suppression keys: {e}"),
        }
    }

    /// Applies reloaded tables: routes, relay control, the MM4 check,
    /// timeouts, limits, the certificate, the AUTH users and the queue
    /// lifetime at once; session limits for sessions that start from now on.
    pub fn reload(&self, tables: Prepared) {
        *self.tables.write() = Arc::new(tables.0);
    }

    /// How the number-portability table in force was loaded.
    pub fn ported_load(&self) -> PortedLoad {
        self.tables().ported_load.clone()
    }

    /// `mm4relay route`: how the tables in force route `rcpt`.
    pub fn explain_route(&self, rcpt: &str) -> String {
        let t = self.tables();
        t.router
            .explain_text(rcpt, &t.peer_names, |n| self.enum_domain(&t, n))
    }

    /// The domain ENUM gives `number`, when `[enum]` is on and DNS answers.
    fn enum_domain(&self, tables: &Tables, number: &str) -> Option<String> {
        let suffix = tables.enum_domain.as_deref()?;
        self.resolver.enum_domain(number, suffix).ok().flatten()
    }

    /// The peer for `domain`, made by the relay once DNS says the domain
    /// takes mail.
    fn new_peer(&self, domain: &str) -> Result<PeerId, NewPeerError> {
        let refused = |why: &str| NewPeerError::Refused(why.to_string());
        let tables = self.tables();
        if tables.dynamic_full {
            return Err(refused("too many destinations now, try again later"));
        }
        let port = tables.smtp_port;
        match self.resolver.mx_targets(domain, port) {
            Ok(_) => {}
            Err(MxError::NotFound) => return Err(NewPeerError::NoSuchDomain),
            Err(MxError::Failed(e)) => return Err(NewPeerError::Dns(e.to_string())),
        }
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.new_peers
            .send((domain.to_string(), tx))
            .map_err(|_| refused("the relay is stopping"))?;
        match rx.recv_timeout(NEW_PEER_WAIT) {
            Ok(answer) => answer.map_err(NewPeerError::Refused),
            Err(_) => Err(refused("the relay did not make the peer in time")),
        }
    }

    /// The resolver's counters.
    pub fn resolver(&self) -> &Arc<Resolver> {
        &self.resolver
    }

    fn tables(&self) -> Arc<Tables> {
        self.tables.read().clone()
    }
}
