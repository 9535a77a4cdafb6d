//! The intake policy: the relay's answers to RCPT, AUTH and the end of
//! DATA (`RelayHandler`), and refusals logged once per reason.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use crossbeam_channel::Receiver;
use log::{error, info, warn};

use crate::cdr::account::{Event, Facts};
use crate::message::{Job, Location, Message, received_header};
use crate::mm4;
use crate::mm4::dedup;
use crate::route::access::ClientClass;
use crate::route::{Address, AddressKind, Numbering, PeerId, Routed};
use crate::smtp::Reply;
use crate::smtp::session::{Envelope, Handler};
use crate::spool::{NewMessage, SpoolError};
use crate::sys::printable::Brief;

use super::{Inbound, NewPeerError, Tables};

/// What one session was refused, logged once per reason: the first time
/// with its details, and at the end of the session how often in all. A
/// client that pipelines a million refused RCPTs writes a few lines, not a
/// million.
pub(super) struct Refusals {
    pub(super) client_ip: IpAddr,
    pub(super) counts: Vec<(&'static str, u64)>,
}

impl Refusals {
    /// Counts one refusal; logs `detail` if it is the first of its reason.
    fn note(&mut self, reason: &'static str, detail: impl FnOnce() -> String) {
        match self.counts.iter_mut().find(|(r, _)| *r == reason) {
            Some((_, n)) => *n += 1,
            None => {
                self.counts.push((reason, 1));
                info!("{reason}: client=[{}] {}", self.client_ip, detail());
            }
        }
    }
}

impl Drop for Refusals {
    fn drop(&mut self) {
        if self.counts.iter().any(|(_, n)| *n > 1) {
            let counts: Vec<String> = self
                .counts
                .iter()
                .map(|(r, n)| format!("{}={n}", r.replace(' ', "_")))
                .collect();
            info!(
                "session from [{}] ended; refused in all: {}",
                self.client_ip,
                counts.join(" ")
            );
        }
    }
}

/// Recipients for a log line: the first five, and how many more.
fn listed<'a>(rcpts: impl ExactSizeIterator<Item = &'a str>) -> String {
    let n = rcpts.len();
    let mut out: Vec<String> = rcpts.take(5).map(|r| format!("<{}>", Brief(r))).collect();
    if n > 5 {
        out.push(format!("+{} more", n - 5));
    }
    out.join(",")
}

/// The handler one session asks: relay control, MM4 check, queueing.
pub(super) struct RelayHandler {
    pub(super) inbound: Arc<Inbound>,
    pub(super) client_ip: IpAddr,
    pub(super) class: ClientClass,
    pub(super) refusals: Refusals,
    /// Disconnected when the listener stops: ends an AUTH delay early.
    pub(super) stopping: Receiver<()>,
    /// When the session must end: no AUTH delay runs past it.
    pub(super) session_deadline: Option<Instant>,
}

impl RelayHandler {
    /// A recipient in a domain no peer claims, with `[routes] dynamic`:
    /// only the local MMSC may send there; the domain must exist in DNS
    /// (else 550), DNS must answer (else 451), and the relay must have
    /// room for another dynamic peer (else 451).
    fn new_peer(&mut self, rcpt: &str, domain: &str) -> Result<PeerId, Reply> {
        let stats = &self.inbound.stats;
        if self.class != ClientClass::Local {
            stats.rcpt_relay_denied.fetch_add(1, Ordering::Relaxed);
            self.refusals.note("relay denied", || {
                format!("class={:?} to=<{}> (dynamic)", self.class, Brief(rcpt))
            });
            return Err(Reply::new(550, format!("5.7.1 <{rcpt}>: relaying denied")));
        }
        match self.inbound.new_peer(domain) {
            Ok(peer) => Ok(peer),
            Err(NewPeerError::NoSuchDomain) => {
                stats.rcpt_unroutable.fetch_add(1, Ordering::Relaxed);
                self.refusals
                    .note("no such domain", || format!("to=<{}>", Brief(rcpt)));
                Err(Reply::new(
                    550,
                    format!("5.1.2 <{rcpt}>: no mail exchanger for this domain"),
                ))
            }
            Err(NewPeerError::Dns(e)) => {
                self.refusals
                    .note("DNS failed", || format!("to=<{}>: {e}", Brief(rcpt)));
                Err(Reply::new(
                    451,
                    format!("4.4.3 <{rcpt}>: cannot look the domain up now, try again later"),
                ))
            }
            Err(NewPeerError::Refused(why)) => {
                self.refusals
                    .note("no dynamic peer", || format!("to=<{}>: {why}", Brief(rcpt)));
                Err(Reply::new(451, format!("4.4.5 <{rcpt}>: {why}")))
            }
        }
    }
}

impl Handler for RelayHandler {
    type Route = PeerId;

    fn rcpt(&mut self, _from: &str, rcpt: &str) -> Result<PeerId, Reply> {
        let stats = &self.inbound.stats;
        if self.class == ClientClass::Unknown {
            // Say nothing about routes to a stranger.
            stats.rcpt_relay_denied.fetch_add(1, Ordering::Relaxed);
            self.refusals.note("relay denied", || {
                format!("is not a known MMSC, to=<{}>", Brief(rcpt))
            });
            return Err(Reply::new(550, format!("5.7.1 <{rcpt}>: relaying denied")));
        }
        let tables = self.inbound.tables();
        let addr = match Address::parse_envelope_in(rcpt, tables.router.numbering()) {
            Ok(a) => a,
            Err(e) => {
                stats.rcpt_bad_address.fetch_add(1, Ordering::Relaxed);
                self.refusals
                    .note("bad address", || format!("to=<{}>: {e}", Brief(rcpt)));
                return Err(Reply::new(553, format!("5.1.3 <{rcpt}>: {e}")));
            }
        };
        let routed = tables
            .router
            .explain_with(&addr, |n| self.inbound.enum_domain(&tables, n));
        let peer = match routed {
            Some(Routed::Peer(p, _)) => p,
            Some(Routed::NewPeer(domain)) => return self.new_peer(rcpt, &domain),
            None => {
                stats.rcpt_unroutable.fetch_add(1, Ordering::Relaxed);
                self.refusals
                    .note("no route", || format!("to=<{}>", Brief(rcpt)));
                return Err(Reply::new(
                    550,
                    format!("5.1.2 <{rcpt}>: no route to this recipient"),
                ));
            }
        };
        if !tables.access.may_send(self.class, peer) {
            stats.rcpt_relay_denied.fetch_add(1, Ordering::Relaxed);
            self.refusals.note("relay denied", || {
                format!(
                    "class={:?} to=<{}> peer={}",
                    self.class,
                    Brief(rcpt),
                    tables.peer_names[peer]
                )
            });
            return Err(Reply::new(550, format!("5.7.1 <{rcpt}>: relaying denied")));
        }
        Ok(peer)
    }

    fn auth(&mut self, user: &str, password: &str) -> bool {
        let tables = self.inbound.tables();
        // Only configured accounts are tracked by name: a guesser's
        // invented names cannot fill the table.
        let account = tables
            .auth_users
            .iter()
            .any(|u| u.name == user)
            .then_some(user);
        let throttle = &self.inbound.auth_throttle;
        let delay = throttle.delay(self.client_ip, account);
        if !delay.is_zero() {
            self.inbound
                .stats
                .auth_delayed
                .fetch_add(1, Ordering::Relaxed);
            // Whatever the verdict: a guesser learns nothing by hanging up
            // early. A stop ends the wait, and so does the session's end:
            // AUTH lines pipelined in one packet must not stretch the
            // session past it, and are not checked once it has passed.
            let until = Instant::now() + delay;
            let until = self.session_deadline.map_or(until, |d| until.min(d));
            let _ = self.stopping.recv_deadline(until);
            if self.session_deadline.is_some_and(|d| Instant::now() >= d) {
                return false;
            }
        }
        let found = tables
            .auth_users
            .iter()
            .find(|u| u.name == user && u.password.matches(password));
        match found {
            Some(u) => {
                throttle.succeeded(self.client_ip, account);
                info!(
                    "auth ok: client=[{}] user={user} peer={}",
                    self.client_ip, tables.peer_names[u.peer]
                );
                if self.class != ClientClass::Local {
                    self.class = ClientClass::Partner(u.peer);
                }
                true
            }
            None => {
                throttle.failed(self.client_ip, account);
                self.inbound
                    .stats
                    .auth_failures
                    .fetch_add(1, Ordering::Relaxed);
                self.refusals
                    .note("auth failed", || format!("user=\"{}\"", Brief(user)));
                false
            }
        }
    }

    fn message(&mut self, mut env: Envelope<PeerId>, data: &mut Vec<u8>) -> Reply {
        let inbound = self.inbound.clone();
        let tables = inbound.tables();
        // Numbers in national forms go out as `+` and digits to the peers
        // that ask for it; the check reads them, and the To header, by the
        // same plan.
        let numbering = tables.router.numbering();
        let as_received: Vec<String> = env.rcpts.iter().map(|(r, _)| r.clone()).collect();
        for (r, peer) in env.rcpts.iter_mut() {
            if tables.rcpt_international[*peer] {
                *r = international(r, numbering);
            }
        }
        let info = match self.check(&env, &as_received, data, &tables) {
            Ok(info) => info,
            Err(reply) => return reply,
        };
        let dedup_key = self.dedup_key(&info, &tables);
        let (fresh, dups): (Vec<_>, Vec<_>) = env
            .rcpts
            .into_iter()
            .partition(|(r, _)| !inbound.dedup.seen(dedup_key.as_deref(), r));
        let facts = Facts::of(&info, &self.origin(&tables), &self.client_ip.to_string());
        if let Some(journal) = &inbound.journal {
            let at = inbound.queue.now();
            for (to, peer) in &dups {
                journal.event(
                    Event::Duplicate {
                        at,
                        from: env.from.clone(),
                        to: to.clone(),
                        peer: tables.peer_names[*peer].clone(),
                        transaction_id: info.transaction_id.clone().unwrap_or_default(),
                        message_id: info.message_id.clone().unwrap_or_default(),
                        size: data.len() as u64,
                        facts: Box::new(facts.clone()),
                    }
                    .encode(),
                );
            }
        }
        if fresh.is_empty() {
            info!(
                "- status=duplicate client=[{}] from=<{}> to={} mid={} tid={}",
                self.client_ip,
                Brief(&env.from),
                listed(dups.iter().map(|(r, _)| r.as_str())),
                Brief(info.message_id.as_deref().unwrap_or("-")),
                Brief(info.transaction_id.as_deref().unwrap_or("-")),
            );
            inbound.stats.duplicates.fetch_add(1, Ordering::Relaxed);
            return Reply::new(250, "2.0.0 duplicate of a message already queued");
        }
        let id = inbound.ids.next_id();
        let accepted = inbound.queue.now();
        let trace = received_header(
            &env.helo,
            &self.client_ip.to_string(),
            &tables.session.hostname,
            env.protocol,
            &id,
            accepted,
        );
        let data = with_trace(trace.as_bytes(), data);
        let by_peer = by_peer(fresh);
        // queue_lifetime is bounded by the configuration; the sender's
        // expiry may be anything, and only ever shortens the lifetime.
        let mut expires = accepted + tables.queue_lifetime;
        if let Some(at) = info.expiry.and_then(|e| e.at(accepted)) {
            expires = expires.min(at);
        }
        let record = NewMessage {
            id: id.clone(),
            from: env.from,
            body_type: env.params.body,
            message_id: info.message_id.clone(),
            transaction_id: info.transaction_id.clone(),
            accepted,
            expires,
            data: data.clone(),
            jobs: by_peer
                .iter()
                .map(|(p, r)| (tables.peer_names[*p].clone(), r.clone()))
                .collect(),
            dedup_key: dedup_key.clone(),
            account: facts.encode(),
        };
        let from = record.from.clone();
        let location = match self.commit(record) {
            Ok(loc) => loc,
            Err(reply) => return reply,
        };
        for (_, rcpts) in &by_peer {
            inbound.dedup.record(dedup_key.as_deref(), rcpts);
        }
        let split: Vec<String> = by_peer
            .iter()
            .map(|(p, r)| format!("{}({})", tables.peer_names[*p], r.len()))
            .collect();
        info!(
            "{id} accepted client=[{}] from=<{}> size={} pdu={} mid={} tid={} peers={}{}",
            self.client_ip,
            Brief(&from),
            data.len(),
            info.pdu.map_or("-", |p| p.name()),
            Brief(info.message_id.as_deref().unwrap_or("-")),
            Brief(info.transaction_id.as_deref().unwrap_or("-")),
            split.join("+"),
            if dups.is_empty() {
                String::new()
            } else {
                format!(" duplicates={}", dups.len())
            },
        );
        let message = Arc::new(Message {
            id: id.clone(),
            from,
            body_type: env.params.body,
            info,
            accepted,
            expires,
            location,
        });
        for (peer, rcpts) in by_peer {
            inbound.queue.submit(Job {
                message: message.clone(),
                peer,
                rcpts,
                attempts: 0,
                data: Some(data.clone()),
            });
        }
        inbound.stats.accepted.fetch_add(1, Ordering::Relaxed);
        Reply::new(250, format!("2.0.0 queued as {id}"))
    }
}

impl RelayHandler {
    /// The MM4 check of the content: what it found, or the 554.
    fn check(
        &mut self,
        env: &Envelope<PeerId>,
        rcpts: &[String],
        data: &[u8],
        tables: &Tables,
    ) -> Result<mm4::Mm4Info, Reply> {
        let rcpts: Vec<&str> = rcpts.iter().map(String::as_str).collect();
        let numbering = tables.router.numbering();
        mm4::check_in(data, &rcpts, tables.mm4_check, &tables.limits, numbering).map_err(|e| {
            let n = rcpts.len();
            self.refusals.note("rejected", || {
                format!(
                    "from=<{}> rcpts={n} reason=\"{}\"",
                    Brief(&env.from),
                    Brief(&e.reason)
                )
            });
            self.inbound
                .stats
                .rejected_content
                .fetch_add(1, Ordering::Relaxed);
            Reply::new(554, e.to_string())
        })
    }

    /// The duplicate-suppression key of a PDU, if it has a Message-ID.
    ///
    /// Reports carry the Message-ID of the MM they report on, so the
    /// Message-ID alone does not name a PDU: type and transaction too.
    /// The IDs are the sender's text, up to the header limit: the spool
    /// and the window keep a digest of them. And the sender: a partner
    /// that knows another's IDs must not be able to make that partner's
    /// message a duplicate.
    fn dedup_key(&self, info: &mm4::Mm4Info, tables: &Tables) -> Option<String> {
        let origin = match self.class {
            ClientClass::Partner(p) => format!("partner {}", tables.peer_names[p]),
            ClientClass::Local | ClientClass::Unknown => "local".to_string(),
        };
        info.message_id.as_ref().map(|mid| {
            dedup::pdu_key(
                &origin,
                info.pdu.map_or("-", |p| p.name()),
                mid,
                info.transaction_id.as_deref().unwrap_or("-"),
            )
        })
    }

    /// Where the client comes from, as the CDR says: `local`, `partner
    /// NAME` or `unknown`.
    fn origin(&self, tables: &Tables) -> String {
        match self.class {
            ClientClass::Partner(p) => format!("partner {}", tables.peer_names[p]),
            ClientClass::Local => "local".to_string(),
            ClientClass::Unknown => "unknown".to_string(),
        }
    }

    /// Makes the message durable: where it is, or the 452 or 451.
    fn commit(&self, record: NewMessage) -> Result<Location, Reply> {
        let inbound = &self.inbound;
        inbound.spool.commit(record).map_err(|e| {
            inbound.stats.rejected_spool.fetch_add(1, Ordering::Relaxed);
            match e {
                SpoolError::Full => {
                    warn!("spool full: refusing a message from [{}]", self.client_ip);
                    Reply::new(452, "4.3.1 insufficient system storage, try again later")
                }
                e => {
                    error!("{e}: refusing a message from [{}]", self.client_ip);
                    Reply::new(451, "4.3.0 local error in processing, try again later")
                }
            }
        })
    }
}

/// `rcpt` with its number as `+` and digits, if it is a `/TYPE=PLMN`
/// address; else as it is.
fn international(rcpt: &str, numbering: &Numbering) -> String {
    match Address::parse_envelope_in(rcpt, numbering) {
        Ok(Address {
            kind: AddressKind::Plmn(number),
            domain,
            ..
        }) => format!("{number}/TYPE=PLMN@{domain}"),
        _ => rcpt.to_string(),
    }
}

/// `trace` then `data`, copied once into the buffer the queue and the
/// spool share (a `Vec` made into an `Arc` would be copied again).
fn with_trace(trace: &[u8], data: &[u8]) -> Arc<[u8]> {
    let mut full = Arc::<[u8]>::new_uninit_slice(trace.len() + data.len());
    let slots = Arc::get_mut(&mut full).expect("a new Arc has no other owner");
    let at = slots.as_mut_ptr().cast::<u8>();
    // SAFETY: `slots` is `trace.len() + data.len()` octets, ours alone and
    // apart from both sources; after the two copies every octet of it is
    // written, so it is initialised.
    unsafe {
        std::ptr::copy_nonoverlapping(trace.as_ptr(), at, trace.len());
        std::ptr::copy_nonoverlapping(data.as_ptr(), at.add(trace.len()), data.len());
        full.assume_init()
    }
}

/// Recipients grouped by destination peer, in the order first seen.
fn by_peer(rcpts: Vec<(String, PeerId)>) -> Vec<(PeerId, Vec<String>)> {
    let mut by_peer: Vec<(PeerId, Vec<String>)> = Vec::new();
    for (rcpt, peer) in rcpts {
        match by_peer.iter_mut().find(|(p, _)| *p == peer) {
            Some((_, list)) => list.push(rcpt),
            None => by_peer.push((peer, vec![rcpt])),
        }
    }
    by_peer
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_trace_goes_before_the_data_whatever_either_is() {
        let data = vec![7u8; 70_000];
        let full = with_trace(b"Received: x\r\n", &data);
        assert_eq!(&full[..13], b"Received: x\r\n");
        assert_eq!(&full[13..], &data[..]);
        assert_eq!(&*with_trace(b"", b""), b"");
        assert_eq!(&*with_trace(b"", b"ab"), b"ab");
        assert_eq!(&*with_trace(b"ab", b""), b"ab");
    }
}
