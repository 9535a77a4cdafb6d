//! The owner of everything that runs. The whole flow, in start order:
//!
//! 0. the **spool** (`spool`) is opened and replayed: what was accepted and
//!    not yet delivered before the last stop or crash is queued again;
//! 1. one bounded channel per peer: the peer's **message pool**;
//! 2. the **queue manager** (`queue`): overflow and deferred jobs;
//! 3. per peer, its **sub-pool** of workers (`peer`), each with one
//!    long-lived SMTP connection, taking jobs from that peer's pool only,
//!    as many at once as the peer's allowance says;
//! 4. the **balancer** (`peer::balancer`): moves connection allowance between
//!    peers as their traffic changes, within the global budget;
//! 5. the **listener** (`inbound`): sessions route and check each message, make it
//!    durable in the spool, answer 250, and submit one job per peer.
//!
//! Stop runs the other way: the listener first (no new messages), then the
//! workers (each finishes the message in flight, bounded by
//! `shutdown_timeout`, then QUITs), then the queue manager, then the spool.
//! Whatever was not delivered stays in the spool for the next start.
//!
//! Files: `error.rs` (why a start or reload failed), `descriptors.rs` (the
//! open-file budget the configuration needs), `demo.rs`. This part is the
//! top of the one-way graph: it uses every part, and no part uses it.

pub mod demo;
pub mod descriptors;
mod error;

pub use error::RelayError;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use log::{info, warn};

use crate::cdr::{self, Ledger};
use crate::config::{Config, PeerConfig};
use crate::dns::Resolver;
use crate::inbound::NewPeerRequest;
use crate::inbound::{self, Bound, Inbound, Listener, Prepared};
use crate::message::{IdSource, Job, Message};
use crate::mm4::Mm4Info;
use crate::ops::control::{ControlSocket, Sources};
use crate::ops::metrics::MetricsServer;
use crate::peer::balancer::Balancer;
use crate::peer::bounce::Bounce;
use crate::peer::{Budget, Dns, Expirer, Peer, PeerSnapshot, PeerViews, WorkerContext};
use crate::queue::{Queue, QueueManager, RetryPolicy};
use crate::spool::{Entry, Holds, Recovered, Spool, SpoolOptions};
use crate::sys::clock::{self, SharedClock};
use crate::sys::owned::Owned;
use crate::sys::privilege;

/// A running relay.
pub struct Relay {
    listener: Option<Listener>,
    inbound: Option<Arc<Inbound>>,
    /// Recovered jobs waiting for their peer to be configured.
    orphans: Vec<Orphan>,
    budget: Option<Arc<Budget>>,
    control: Option<ControlSocket>,
    metrics: Option<MetricsServer>,
    balancer: Option<Balancer>,
    peers: Vec<Peer>,
    /// The peers' views, shared with the balancer, control and metrics.
    views: PeerViews,
    /// What a peer that a reload adds is started with.
    ctx: Option<WorkerContext>,
    qmgr: Option<QueueManager>,
    /// Fails what the queue manager finds expired.
    expirer: Option<Expirer>,
    queue: Arc<Queue>,
    stop: Option<Sender<()>>,
    done: Receiver<()>,
    /// Reload requests from the control socket, each with where to answer;
    /// [`run`] serves them.
    reloads: (Sender<Sender<String>>, Receiver<Sender<String>>),
    /// Sessions' requests for dynamic peers; [`run`] serves them.
    new_peers: (Sender<NewPeerRequest>, Receiver<NewPeerRequest>),
    /// Each running dynamic peer's own stop channel, by id.
    dynamic_stops: HashMap<usize, Sender<()>>,
    /// Per idle dynamic peer: its activity count when last seen idle.
    idle_marks: HashMap<usize, u64>,
    /// The workers of retired dynamic peers, still ending.
    retiring: Vec<Owned<()>>,
    shutdown_timeout: Duration,
    /// The configuration in force (reload compares against it).
    config: Config,
    spool: Option<Arc<Spool>>,
    /// The CDR ledger, closed after the spool.
    ledger: Option<Ledger>,
    /// The resolver peers (`mx:` hosts) and sessions (ENUM, dynamic
    /// peers) share.
    dns: Dns,
}

/// Sends a panic's message, with the name of its thread, to the log as
/// well as to stderr (where a daemon's goes unread). Installed once.
fn log_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let thread = std::thread::current();
            log::error!(
                "thread '{}' panicked: {info}",
                thread.name().unwrap_or("unnamed")
            );
            default(info);
        }));
    });
}

/// What a stop left behind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StopReport {
    /// Jobs not yet delivered (they stay in the spool).
    pub undelivered: usize,
}

impl Relay {
    /// Builds and starts everything the configuration describes.
    pub fn start(config: &Config) -> Result<Relay, RelayError> {
        Relay::start_with_clock(config, clock::system())
    }

    /// As [`Relay::start`], with `clock` for acceptance, retry and expiry
    /// times (tests pass a clock they move by hand).
    pub fn start_with_clock(config: &Config, clock: SharedClock) -> Result<Relay, RelayError> {
        log_panics();
        crate::relay::descriptors::raise_limit(config);
        let (senders, receivers): (Vec<_>, Vec<_>) = config
            .peers
            .iter()
            .map(|p| crossbeam_channel::bounded(p.pool_size))
            .unzip();
        let retry = RetryPolicy {
            min: config.relay.retry_min,
            max: config.relay.retry_max,
        };
        let (tables, listeners, spool, recovered, ledger) = open(config, &clock)?;
        let spool = Arc::new(spool);
        let ledger = match ledger {
            Some((opened, entries)) => Some(
                Ledger::start(opened, entries, spool.appender(), spool.reader())
                    .map_err(|e| RelayError::system("starting the CDR ledger", e))?,
            ),
            None => None,
        };
        let pools = senders.into_iter().zip(receivers.iter().cloned()).collect();
        let (expired_tx, expired_rx) = crossbeam_channel::unbounded();
        let (qmgr, queue) = QueueManager::start(pools, retry, spool.clone(), clock, expired_tx)?;
        let (stop_tx, stop_rx) = crossbeam_channel::bounded(0);
        let (done_tx, done_rx) = crossbeam_channel::bounded(0);
        let mut relay = Relay {
            listener: None,
            inbound: None,
            orphans: Vec::new(),
            budget: None,
            control: None,
            metrics: None,
            balancer: None,
            peers: Vec::new(),
            views: PeerViews::default(),
            ctx: None,
            qmgr: Some(qmgr),
            expirer: None,
            queue: queue.clone(),
            stop: Some(stop_tx),
            done: done_rx,
            reloads: crossbeam_channel::unbounded(),
            new_peers: crossbeam_channel::unbounded(),
            dynamic_stops: HashMap::new(),
            idle_marks: HashMap::new(),
            retiring: Vec::new(),
            shutdown_timeout: config.relay.shutdown_timeout,
            config: config.clone(),
            spool: Some(spool.clone()),
            ledger,
            dns: Dns {
                resolver: Arc::new(Resolver::new(config.dns.clone())),
                smtp_port: Arc::new(config.smtp_port.into()),
            },
        };
        relay.orphans = requeue(config, &queue, recovered);
        let holds = restore_holds(&spool, &queue);
        // Never an ID the spool still holds, even after a restart within
        // the same second.
        let ids = Arc::new(IdSource::after(spool.highest_id(), queue.now()));
        let bounce = Arc::new(Bounce::new(
            config,
            ids.clone(),
            spool.clone(),
            queue.clone(),
        )?);
        let budget = Arc::new(Budget::new(config.relay.max_connections));
        relay.budget = Some(budget.clone());
        let ctx = WorkerContext {
            dns: relay.dns.clone(),
            bounce,
            helo_name: config.relay.hostname.clone(),
            queue: queue.clone(),
            spool: spool.clone(),
            budget: budget.clone(),
            stop: stop_rx,
            done: done_tx,
        };
        if let Err(e) = relay.start_peers(config, receivers, &ctx, &holds) {
            drop(ctx);
            relay.shutdown();
            return Err(e);
        }
        // Once every peer's view is there: jobs recovered past their
        // deadline are already waiting for it.
        relay.expirer = Some(Expirer::start(
            expired_rx,
            queue.clone(),
            spool.clone(),
            ctx.bounce.clone(),
            relay.views.clone(),
        )?);
        relay.ctx = Some(ctx);
        relay.balancer = Some(Balancer::start(
            relay.views.clone(),
            queue.clone(),
            budget,
            config.relay.balance_interval,
            config.relay.stats_interval,
        )?);
        let inbound = Arc::new(Inbound::new(
            tables,
            config,
            ids,
            queue.clone(),
            spool.clone(),
            relay.dns.resolver.clone(),
            relay.new_peers.0.clone(),
        ));
        relay.inbound = Some(inbound.clone());
        relay.start_ops(config, queue, spool, &inbound)?;
        let limits = inbound::Limits {
            max_sessions: config.listener.max_sessions,
            max_local_sessions: config.listener.max_local_sessions,
            max_stranger_sessions: config.listener.max_stranger_sessions,
            shutdown_timeout: config.relay.shutdown_timeout,
        };
        match Listener::start(listeners, limits, inbound) {
            Ok(l) => relay.listener = Some(l),
            Err(e) => {
                relay.shutdown();
                return Err(RelayError::system("starting the listener", e));
            }
        }
        relay.remake_dynamic();
        info!(
            "mm4relay {} started: {} peers, budget {} connections",
            env!("CARGO_PKG_VERSION"),
            relay.peers.len(),
            config.relay.max_connections
        );
        Ok(relay)
    }

    /// Starts every configured peer's workers, held as before a restart
    /// where the operator held them.
    fn start_peers(
        &mut self,
        config: &Config,
        receivers: Vec<Receiver<Job>>,
        ctx: &WorkerContext,
        holds: &Holds,
    ) -> Result<(), RelayError> {
        for (id, (cfg, jobs)) in config.peers.iter().zip(receivers).enumerate() {
            let held = holds.peers.contains(&cfg.name);
            if held {
                info!("peer={} held, as before the restart", cfg.name);
            }
            let p = Peer::start(id, cfg.clone(), jobs, ctx, held)
                .map_err(|e| RelayError::system(format!("starting peer {}", cfg.name), e))?;
            self.views.push(p.view().clone());
            self.peers.push(p);
        }
        Ok(())
    }

    /// Starts the control socket and the metrics server, if configured.
    fn start_ops(
        &mut self,
        config: &Config,
        queue: Arc<Queue>,
        spool: Arc<Spool>,
        inbound: &Arc<Inbound>,
    ) -> Result<(), RelayError> {
        let sources = Sources {
            peers: self.views.clone(),
            queue,
            spool,
            inbound: inbound.stats(),
            intake: inbound.clone(),
            reload: self.reloads.0.clone(),
            cdr: self.ledger.as_ref().map(Ledger::stats),
        };
        if let Some(path) = &config.relay.control_socket {
            self.control = Some(ControlSocket::start(path, sources.clone())?);
        }
        if let Some(addr) = config.relay.metrics_listen {
            self.metrics = Some(MetricsServer::start(addr, sources)?);
        }
        Ok(())
    }

    /// The addresses the listener is bound to.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listener
            .as_ref()
            .map_or_else(Vec::new, |l| l.local_addrs().to_vec())
    }

    /// Applies a new configuration to the running relay: routes, relay
    /// control, the MM4 check, TLS, AUTH users, timeouts and limits.
    /// Peers new in `new` start; peers missing from it stop taking new
    /// messages and keep their queue (status shows them `removed`) until a
    /// reload brings them back. What needs a restart (other listen
    /// addresses, more workers or another pool size for a running peer) is
    /// refused, and then nothing changes.
    pub fn reload(&mut self, new: &Config) -> Result<(), RelayError> {
        if new.listener.listen != self.config.listener.listen
            || new.listener.listen_tls != self.config.listener.listen_tls
        {
            return Err(RelayError::NeedsRestart(
                "other listen addresses need a restart".into(),
            ));
        }
        let (effective, removed, added) = self.arrange(new);
        let tables = Inbound::prepare(&effective)?;
        for (id, p) in self.peers.iter().enumerate() {
            if !removed.contains(&id) {
                p.view()
                    .check_reload(&effective.peers[id])
                    .map_err(RelayError::NeedsRestart)?;
            }
        }
        // Peers first, so the new routes only ever name running peers.
        for cfg in added {
            self.add_peer(cfg)
                .map_err(|e| RelayError::system("starting a peer", e))?;
        }
        for (id, p) in self.peers.iter().enumerate() {
            let view = p.view();
            let was_removed = view.control().removed();
            view.reload(effective.peers[id].clone());
            // A retired dynamic peer stays out of the balancer's plan.
            view.control()
                .set_removed(removed.contains(&id) || view.retired());
            match (was_removed, removed.contains(&id)) {
                (false, true) => warn!(
                    "reload: peer {} removed: it takes no new messages; its {} queued stay in the spool",
                    view.name(),
                    self.queue.queued_len(id)
                ),
                (true, false) => info!("reload: peer {} is back", view.name()),
                _ => {}
            }
        }
        if let Some(inbound) = &self.inbound {
            inbound.reload(tables);
        }
        self.dns.resolver.set_settings(new.dns.clone());
        self.dns
            .smtp_port
            .store(new.smtp_port, std::sync::atomic::Ordering::Relaxed);
        if let Some(b) = &self.budget {
            b.set_max(new.relay.max_connections);
        }
        self.queue.set_retry(RetryPolicy {
            min: new.relay.retry_min,
            max: new.relay.retry_max,
        });
        let (old, r) = (&self.config.relay, &new.relay);
        let restart_only = [
            ("spool_dir", old.spool_dir != r.spool_dir),
            ("spool_sync", old.spool_sync != r.spool_sync),
            ("control_socket", old.control_socket != r.control_socket),
            ("metrics_listen", old.metrics_listen != r.metrics_listen),
            ("log_target", old.log_target != r.log_target),
            ("user/group", old.user != r.user || old.group != r.group),
            (
                "balance_interval",
                old.balance_interval != r.balance_interval,
            ),
            ("stats_interval", old.stats_interval != r.stats_interval),
            ("dedup_window", old.dedup_window != r.dedup_window),
            ("[cdr] section", self.config.cdr != new.cdr),
            (
                "max_sessions",
                self.config.listener.max_sessions != new.listener.max_sessions,
            ),
            (
                "max_local_sessions",
                self.config.listener.max_local_sessions != new.listener.max_local_sessions,
            ),
            (
                "max_stranger_sessions",
                self.config.listener.max_stranger_sessions != new.listener.max_stranger_sessions,
            ),
        ];
        for (key, changed) in restart_only {
            if changed {
                warn!("reload: the new {key} applies at the next restart");
            }
        }
        self.config = effective;
        Ok(())
    }

    /// `new` with its peers in the running order (peer ids never change):
    /// running peers first, a removed one keeping its old section without
    /// routes or partner hosts, a dynamic one (while dynamic peers stay on)
    /// with the new `[peer_defaults]`, then the peers `new` adds. Returns it with
    /// the removed ids and the added sections.
    fn arrange(&self, new: &Config) -> (Config, Vec<usize>, Vec<PeerConfig>) {
        let mut peers = Vec::new();
        let mut removed = Vec::new();
        for (id, p) in self.peers.iter().enumerate() {
            let old = &self.config.peers[id];
            match new.peers.iter().find(|c| c.name == p.view().name()) {
                Some(c) => peers.push(c.clone()),
                // Dynamic peers are not in the file: they stay while
                // dynamic peers are on, with the new defaults.
                None if old.dynamic && new.dynamic.is_some() => {
                    let defaults = new.dynamic.as_ref().map(|d| d.defaults.clone());
                    let mut cfg = defaults.unwrap_or_else(|| old.clone());
                    cfg.name = old.name.clone();
                    cfg.mx = old.mx.clone();
                    // Routed while it runs; a retired one is made again
                    // by the next RCPT, with the new defaults whole.
                    let retired = p.view().retired();
                    cfg.domains = if retired {
                        Vec::new()
                    } else {
                        vec![old.name.clone()]
                    };
                    // Its workers and pool were made with the old ones.
                    cfg.max_connections = old.max_connections;
                    cfg.pool_size = old.pool_size;
                    cfg.dynamic = true;
                    peers.push(cfg);
                }
                None => {
                    let mut old = self.config.peers[id].clone();
                    old.domains.clear();
                    old.prefixes.clear();
                    old.accept_from.clear();
                    peers.push(old);
                    removed.push(id);
                }
            }
        }
        let added: Vec<PeerConfig> = new
            .peers
            .iter()
            .filter(|c| !peers.iter().any(|p| p.name == c.name))
            .cloned()
            .collect();
        peers.extend(added.iter().cloned());
        let id_of = |i: usize| {
            let name = &new.peers[i].name;
            peers
                .iter()
                .position(|p| &p.name == name)
                .expect("every peer of new is in peers")
        };
        let mut effective = new.clone();
        effective.default_peer = new.default_peer.map(id_of);
        effective.ported = new
            .ported
            .iter()
            .map(|(n, i)| (n.clone(), id_of(*i)))
            .collect();
        if (0..new.peers.len()).any(|i| id_of(i) != i) {
            effective.np = Arc::new(new.np.remap(id_of));
        }
        for u in &mut effective.auth_users {
            u.peer = id_of(u.peer);
        }
        effective.peers = peers;
        (effective, removed, added)
    }

    /// Makes again the dynamic peers the spool holds messages for.
    fn remake_dynamic(&mut self) {
        if self.config.dynamic.is_none() {
            return;
        }
        let mut names: Vec<String> = self
            .orphans
            .iter()
            .map(|o| o.peer.clone())
            .filter(|n| n.contains('.') && crate::route::valid_domain(n))
            .collect();
        names.sort();
        names.dedup();
        for name in names {
            if let Err(e) = self.make_dynamic(&name) {
                warn!("peer {name}: its queued messages wait: {e}");
            }
        }
    }

    /// The dynamic peer for `domain`: the one made before, or a new one
    /// with `[peer_defaults]`, its hosts `domain`'s MX, within
    /// `max_dynamic_peers`.
    pub fn make_dynamic(&mut self, domain: &str) -> Result<usize, String> {
        let Some(dynamic) = self.config.dynamic.clone() else {
            return Err("dynamic peers are off".into());
        };
        let existing = self.config.peers.iter().position(|p| p.name == domain);
        if let Some(id) = existing
            && self.dynamic_stops.contains_key(&id)
        {
            return Ok(id);
        }
        let made = self.dynamic_stops.len();
        if made >= dynamic.max_peers {
            warn!("no dynamic peer for {domain}: {made} made, as many as max_dynamic_peers allows");
            return Err("too many destinations now, try again later".into());
        }
        let mut cfg = dynamic.defaults;
        cfg.name = domain.to_string();
        cfg.mx = Some(domain.to_string());
        cfg.domains = vec![domain.to_string()];
        cfg.dynamic = true;
        // Its own slot if it had one, else a retired peer's with nothing
        // queued: retired peers never pile up past the cap.
        let slot = existing.or_else(|| {
            (0..self.peers.len()).find(|&id| {
                self.config.peers[id].dynamic
                    && !self.dynamic_stops.contains_key(&id)
                    && self.queue.queued_len(id) == 0
            })
        });
        // The tables first: if they cannot be built, nothing has started.
        let mut next = self.config.clone();
        match slot {
            Some(id) => next.peers[id] = cfg.clone(),
            None => next.peers.push(cfg.clone()),
        }
        let tables = Inbound::prepare(&next).map_err(|e| e.to_string())?;
        let id = match slot {
            Some(id) => {
                self.revive(id, cfg)
                    .map_err(|e| format!("cannot start a peer: {e}"))?;
                id
            }
            None => {
                self.add_peer(cfg)
                    .map_err(|e| format!("cannot start a peer: {e}"))?;
                self.peers.len() - 1
            }
        };
        self.config = next;
        if let Some(inbound) = &self.inbound {
            inbound.reload(tables);
        }
        info!(
            "peer {domain} made (dynamic, {} of at most {})",
            made + 1,
            dynamic.max_peers
        );
        Ok(id)
    }

    /// Starts dynamic peer `cfg` in retired peer `id`'s place, on the pool
    /// it kept (its own domain again, or another).
    fn revive(&mut self, id: usize, cfg: PeerConfig) -> io::Result<()> {
        let mut ctx = self
            .ctx
            .clone()
            .ok_or_else(|| io::Error::other("relay stopping"))?;
        let (stop_tx, stop_rx) = crossbeam_channel::bounded(0);
        ctx.stop = stop_rx;
        let jobs = self.peers[id].view().pool();
        let peer = Peer::start(id, cfg, jobs, &ctx, false)?;
        self.dynamic_stops.insert(id, stop_tx);
        self.views.replace(id, peer.view().clone());
        self.peers[id] = peer;
        self.idle_marks.remove(&id);
        Ok(())
    }

    /// Retires the dynamic peers that did nothing since the last call and
    /// have nothing queued: their workers end (closing their connections),
    /// their domain routes nowhere until a RCPT makes them again; a retired
    /// one that a message is queued for starts again. Called every
    /// `[peer_defaults] idle_timeout`.
    pub fn retire_idle(&mut self) {
        let (ended, going): (Vec<_>, Vec<_>) = std::mem::take(&mut self.retiring)
            .into_iter()
            .partition(Owned::is_finished);
        ended.into_iter().for_each(|w| {
            w.join();
        });
        self.retiring = going;
        // Spooled messages whose dynamic peer could not be made at start
        // (the cap was full): it may be made now.
        self.remake_dynamic();
        // A message a session routed just before its peer retired: the
        // peer starts again for it.
        let waiting: Vec<String> = (0..self.peers.len())
            .filter(|&id| {
                self.config.peers[id].dynamic
                    && !self.dynamic_stops.contains_key(&id)
                    && self.queue.queued_len(id) > 0
            })
            .map(|id| self.config.peers[id].name.clone())
            .collect();
        for name in waiting {
            match self.make_dynamic(&name) {
                Ok(_) => info!("peer {name} made again: a message is queued for it"),
                Err(e) => warn!("peer {name}: its queued messages wait: {e}"),
            }
        }
        let ids: Vec<usize> = self.dynamic_stops.keys().copied().collect();
        let mut retired = false;
        for id in ids {
            let s = self.peers[id].view().snapshot(&self.queue);
            let activity = s.sent + s.deferred + s.failed + s.connections_opened;
            let idle = self.queue.queued_len(id) == 0 && s.busy == 0;
            if !idle {
                self.idle_marks.remove(&id);
                continue;
            }
            if self.idle_marks.insert(id, activity) != Some(activity) {
                continue;
            }
            self.dynamic_stops.remove(&id);
            // Its workers end on their own (a QUIT may take a while): they
            // are joined at a later check, not waited for here.
            let workers = self.peers[id].retire();
            self.retiring.extend(workers);
            self.peers[id].view().control().set_removed(true);
            self.config.peers[id].domains.clear();
            self.idle_marks.remove(&id);
            info!("peer {} retired: idle, nothing queued", s.name);
            retired = true;
        }
        if retired {
            match Inbound::prepare(&self.config) {
                Ok(tables) => {
                    if let Some(inbound) = &self.inbound {
                        inbound.reload(tables);
                    }
                }
                Err(e) => warn!("retiring dynamic peers: {e}"),
            }
        }
    }

    /// How often idle dynamic peers are looked for (`None`: they are off).
    fn retire_interval(&self) -> Option<Duration> {
        let d = self.config.dynamic.as_ref()?;
        Some(d.defaults.idle_timeout.max(Duration::from_millis(100)))
    }

    /// Starts a peer a reload added, with the next id.
    fn add_peer(&mut self, cfg: PeerConfig) -> io::Result<()> {
        let ctx = self
            .ctx
            .as_ref()
            .ok_or_else(|| io::Error::other("relay stopping"))?;
        let id = self.peers.len();
        let (tx, rx) = crossbeam_channel::bounded(cfg.pool_size);
        let name = cfg.name.clone();
        let mut ctx = ctx.clone();
        // A dynamic peer's own stop, closed when it retires or the relay
        // stops; kept only once its workers have started.
        let own_stop = cfg.dynamic.then(|| {
            let (stop_tx, stop_rx) = crossbeam_channel::bounded(0);
            ctx.stop = stop_rx;
            stop_tx
        });
        let peer = Peer::start(id, cfg, rx.clone(), &ctx, false)?;
        if let Some(stop_tx) = own_stop {
            self.dynamic_stops.insert(id, stop_tx);
        }
        let queue_id = self.queue.add_peer((tx, rx));
        debug_assert_eq!(queue_id, id, "queue and peers out of step");
        self.views.push(peer.view().clone());
        self.peers.push(peer);
        info!("peer {name} added");
        let (mine, rest) = std::mem::take(&mut self.orphans)
            .into_iter()
            .partition::<Vec<_>, _>(|o| o.peer == name);
        self.orphans = rest;
        if !mine.is_empty() {
            info!(
                "{} jobs for {name} found in the spool at start are queued",
                mine.len()
            );
        }
        for o in mine {
            let job = Job {
                message: o.message,
                peer: id,
                rcpts: o.rcpts,
                attempts: o.attempts,
                data: None,
            };
            self.queue.recover(job, o.next);
        }
        Ok(())
    }

    /// The queue: what is queued, and its clock.
    pub fn queue(&self) -> &Arc<Queue> {
        &self.queue
    }

    /// Where the metrics are served, when they are.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(MetricsServer::local_addr)
    }

    /// Counters of every peer, in configuration order.
    pub fn peer_snapshots(&self) -> Vec<PeerSnapshot> {
        self.peers
            .iter()
            .map(|p| p.view().snapshot(&self.queue))
            .collect()
    }

    /// Stops everything in order and joins every thread.
    pub fn shutdown(mut self) -> StopReport {
        self.stop_all()
    }

    fn stop_all(&mut self) -> StopReport {
        if let Some(c) = self.control.take() {
            c.stop();
        }
        if let Some(m) = self.metrics.take() {
            m.stop();
        }
        if let Some(l) = self.listener.take() {
            l.stop();
        }
        if let Some(i) = self.inbound.take() {
            i.save_recent();
        }
        if let Some(b) = self.balancer.take() {
            b.stop();
        }
        // Closing the stop channel tells every worker; each drops its `done`
        // sender when it ends, so the channel disconnects when all have.
        self.stop.take();
        self.dynamic_stops.clear();
        self.ctx.take();
        let timeout = self.shutdown_timeout;
        if let Err(RecvTimeoutError::Timeout) = self.done.recv_timeout(timeout) {
            warn!("workers still busy after {timeout:?}: cutting their connections");
            self.peers.iter().for_each(|p| p.view().cut_connections());
        }
        let mut undelivered: usize = self.peers.drain(..).map(Peer::join).sum();
        self.retiring.drain(..).for_each(|w| {
            w.join();
        });
        undelivered += self.qmgr.take().map_or(0, QueueManager::stop);
        undelivered += self.expirer.take().map_or(0, Expirer::stop);
        if let Some(spool) = self.spool.take() {
            match Arc::try_unwrap(spool) {
                Ok(s) => s.close(),
                Err(_) => warn!("spool still in use at stop; it closes when released"),
            }
        }
        if let Some(l) = self.ledger.take() {
            l.close();
        }
        if undelivered > 0 {
            info!("stopped; {undelivered} jobs left in the spool for the next start");
        } else {
            info!("stopped; nothing left to deliver");
        }
        StopReport { undelivered }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if self.stop.is_some() || self.listener.is_some() {
            self.stop_all();
        }
    }
}

/// A recovered job whose peer is not in the configuration: it stays in
/// the spool, and is queued when a reload adds its peer.
struct Orphan {
    peer: String,
    message: Arc<Message>,
    rcpts: Vec<String>,
    attempts: u32,
    next: SystemTime,
}

/// Queues again what the spool recovered, each job at its next-attempt
/// time; returns the jobs for peers not configured.
fn requeue(config: &Config, queue: &Queue, recovered: Vec<Recovered>) -> Vec<Orphan> {
    let mut orphans = Vec::new();
    for r in recovered {
        let m = r.message;
        let message = Arc::new(Message {
            id: m.id,
            from: m.from,
            body_type: m.body_type,
            info: Mm4Info {
                message_id: m.message_id,
                transaction_id: m.transaction_id,
                ..Mm4Info::default()
            },
            accepted: m.accepted,
            expires: m.expires,
            location: r.location,
        });
        for j in r.jobs {
            let Some(peer) = config.peers.iter().position(|p| p.name == j.peer) else {
                warn!(
                    "{}: peer {} is not configured; its {} recipients stay in the spool until a reload adds it",
                    message.id,
                    j.peer,
                    j.rcpts.len()
                );
                orphans.push(Orphan {
                    peer: j.peer,
                    message: message.clone(),
                    rcpts: j.rcpts,
                    attempts: j.attempts,
                    next: j.next,
                });
                continue;
            };
            let job = Job {
                message: message.clone(),
                peer,
                rcpts: j.rcpts,
                attempts: j.attempts,
                data: None,
            };
            queue.recover(job, j.next);
        }
    }
    orphans
}

/// Ports first, as root if need be; then the configured user, before
/// anything touches the spool; then the spool, recovered. The inbound
/// tables are prepared first of all, so that a certificate the TLS
/// library refuses stops the start before anything is bound.
/// What [`open`] makes ready: the inbound tables, the bound listeners, the
/// spool and what it recovered, and the CDR ledger with its entries.
type Opening = (
    Prepared,
    Vec<Bound>,
    Spool,
    Vec<Recovered>,
    Option<(cdr::Opened, Vec<Entry>)>,
);

fn open(config: &Config, clock: &SharedClock) -> Result<Opening, RelayError> {
    let tables = Inbound::prepare(config)?;
    let listeners = Listener::bind(&config.listener.listen, &config.listener.listen_tls)?;
    if let Some(user) = &config.relay.user {
        let mut dirs: Vec<(&str, &Path)> = vec![("spool_dir", &config.relay.spool_dir)];
        if let Some(c) = &config.cdr {
            dirs.push(("[cdr] dir", &c.dir));
        }
        // Its errors say which user and which path.
        privilege::drop_to(user, config.relay.group.as_deref(), &dirs)?;
    }
    let ledger = match &config.cdr {
        Some(c) => Some(
            cdr::open(c, &config.relay.spool_dir, clock.clone())
                .map_err(|e| RelayError::system(format!("[cdr] dir {}", c.dir.display()), e))?,
        ),
        None => None,
    };
    let journal = ledger.as_ref().map(cdr::Opened::journal);
    let (spool, recovered, entries) = Spool::open_with(
        &SpoolOptions {
            dir: config.relay.spool_dir.clone(),
            sync: config.relay.spool_sync,
            max_bytes: config.relay.spool_max_bytes,
            segment_size: config.relay.spool_segment_size,
            dedup_window: config.relay.dedup_window,
        },
        journal,
    )
    .map_err(|e| RelayError::system(format!("spool {}", config.relay.spool_dir.display()), e))?;
    Ok((
        tables,
        listeners,
        spool,
        recovered,
        ledger.map(|l| (l, entries)),
    ))
}

/// What an operator held before the stop stays held: messages at once,
/// before any worker can take them; the peers are returned, to be held
/// as they start.
fn restore_holds(spool: &Spool, queue: &Queue) -> Holds {
    let holds = spool.holds();
    for id in &holds.messages {
        if queue.hold(id) {
            info!("message {id} held, as before the restart");
        }
    }
    holds
}

/// Runs the relay in the foreground until SIGTERM or SIGINT. SIGHUP
/// calls `on_hup` (main reopens the log file there) and reloads the
/// configuration file; a file that does not validate, or a change that
/// needs a restart, is refused and the old configuration stays.
pub fn run(config: &Config, on_hup: impl Fn()) -> Result<(), RelayError> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    let signals_handle = signals.handle();
    let (sig_tx, sig_rx) = crossbeam_channel::unbounded();
    let signal_thread = Owned::spawn("signals", move || {
        for sig in signals.forever() {
            if sig_tx.send(sig).is_err() {
                break;
            }
        }
    })?;
    // A file-size limit (ulimit -f) must fail a write, which the spool
    // answers with 451 and leaves behind, not kill the relay.
    // SAFETY: setting a signal's disposition to SIG_IGN has no handler to
    // race with.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    let mut relay = match Relay::start(config) {
        Ok(r) => r,
        Err(e) => {
            signals_handle.close();
            signal_thread.join();
            return Err(e);
        }
    };
    let requests = relay.reloads.1.clone();
    let new_peers = relay.new_peers.1.clone();
    let ticker = |relay: &Relay| {
        relay
            .retire_interval()
            .map_or_else(crossbeam_channel::never, crossbeam_channel::tick)
    };
    let mut ticks = ticker(&relay);
    loop {
        crossbeam_channel::select! {
            recv(ticks) -> _ => relay.retire_idle(),
            recv(sig_rx) -> sig => match sig {
                Ok(SIGHUP) => {
                    info!(
                        "SIGHUP: reopening the log file and reloading {}",
                        config.path.display()
                    );
                    on_hup();
                    reload_from(&mut relay, &config.path);
                    ticks = ticker(&relay);
                }
                Ok(sig) => {
                    info!("signal {sig} received: stopping");
                    break;
                }
                Err(_) => break,
            },
            recv(new_peers) -> request => {
                if let Ok((domain, answer)) = request {
                    let _ = answer.send(relay.make_dynamic(&domain));
                }
            }
            recv(requests) -> answer => {
                if let Ok(answer) = answer {
                    info!("reload asked on the control socket: reloading {}", config.path.display());
                    let _ = answer.send(reload_from(&mut relay, &config.path));
                    ticks = ticker(&relay);
                }
            }
        }
    }
    signals_handle.close();
    signal_thread.join();
    relay.shutdown();
    Ok(())
}

/// Reloads the configuration file at `path`; the outcome, logged, and in
/// words for the control socket (`error:` first when refused).
fn reload_from(relay: &mut Relay, path: &std::path::Path) -> String {
    match Config::load(path)
        .map_err(RelayError::from)
        .and_then(|new| {
            relay.reload(&new)?;
            Ok(new)
        }) {
        Ok(new) => {
            info!("configuration reloaded");
            let mut answer = String::from("configuration reloaded\n");
            for w in &new.warnings {
                warn!("{w}");
                answer.push_str(&format!("warning: {w}\n"));
            }
            answer
        }
        Err(e) => {
            log::error!("reload refused, the old configuration stays: {e}");
            format!("error: reload refused, the old configuration stays: {e}\n")
        }
    }
}
