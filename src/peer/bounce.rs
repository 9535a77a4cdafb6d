//! Failures are not silent. When recipients fail (5xx, or the queue
//! lifetime ran out), the message is kept in the failed area
//! (`spool_dir/failed`, 0600 files, pruned after `failed_retention`) for an
//! operator to inspect, and its envelope sender gets a delivery status
//! notification (RFC 3464 multipart/report, null envelope sender) through
//! the local MMSC, when the sender routes to a local peer. A message with a
//! null sender (itself a notification) never gets one.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use log::{info, warn};
use parking_lot::Mutex;

use crate::cdr::account::Facts;
use crate::config::Config;
use crate::message::{IdSource, Job, Message};
use crate::queue::Queue;
use crate::route::{Address, Router};
use crate::smtp::Reply;
use crate::smtp::command::BodyType;
use crate::spool::{NewMessage, Spool};
use crate::sys::printable::Printable;

/// How often the failed area is pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// The failed area and the notifier.
pub struct Bounce {
    hostname: String,
    failed_dir: PathBuf,
    retention: Duration,
    notify: bool,
    queue_lifetime: Duration,
    router: Router,
    peers: Vec<(String, bool)>,
    ids: Arc<IdSource>,
    spool: Arc<Spool>,
    queue: Arc<Queue>,
    last_prune: Mutex<Option<Instant>>,
}

impl Bounce {
    /// Sets up the failed area (created 0700) for this configuration.
    pub fn new(
        config: &Config,
        ids: Arc<IdSource>,
        spool: Arc<Spool>,
        queue: Arc<Queue>,
    ) -> io::Result<Bounce> {
        let failed_dir = config.relay.spool_dir.join("failed");
        fs::create_dir_all(&failed_dir)?;
        fs::set_permissions(
            &failed_dir,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )?;
        Ok(Bounce {
            hostname: config.relay.hostname.clone(),
            failed_dir,
            retention: config.relay.failed_retention,
            notify: config.relay.notify_failures,
            queue_lifetime: config.relay.queue_lifetime,
            router: config.router(),
            peers: config
                .peers
                .iter()
                .map(|p| (p.name.clone(), p.local))
                .collect(),
            ids,
            spool,
            queue,
            last_prune: Mutex::new(None),
        })
    }

    /// Records that `rcpts` of `job` failed at `peer` with `reply`, which
    /// came from the host `remote` (`None`: we decided it ourselves).
    pub fn failed(
        &self,
        job: &Job,
        peer: &str,
        remote: Option<&str>,
        rcpts: &[String],
        reply: &Reply,
    ) {
        let m = &job.message;
        let data = match &job.data {
            Some(d) => d.clone(),
            None => match self.spool.read(&m.id, &m.location) {
                Ok(d) => d.into(),
                Err(e) => {
                    warn!("{}: cannot read the failed message back: {e}", m.id);
                    return;
                }
            },
        };
        if let Err(e) = self.keep(m, peer, rcpts, reply, &data) {
            warn!(
                "{}: cannot write to the failed area {}: {e}",
                m.id,
                self.failed_dir.display()
            );
        }
        self.prune();
        if self.notify && !m.from.is_empty() {
            self.notify_sender(m, peer, remote, rcpts, reply, &data);
        }
    }

    fn keep(
        &self,
        m: &Message,
        peer: &str,
        rcpts: &[String],
        reply: &Reply,
        data: &[u8],
    ) -> io::Result<()> {
        let stamp = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let path = self.failed_dir.join(format!("{}.{peer}.{stamp}", m.id));
        let mut f = OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(0o600)
            .open(path)?;
        let to: Vec<String> = rcpts
            .iter()
            .map(|r| format!("<{}>", Printable(r)))
            .collect();
        write!(
            f,
            "X-Mm4relay-Queue-ID: {}\r\nX-Mm4relay-Peer: {peer}\r\nX-Mm4relay-Envelope-From: <{}>\r\n\
             X-Mm4relay-Envelope-To: {}\r\nX-Mm4relay-Reply: {}\r\n",
            m.id,
            Printable(&m.from),
            to.join(", "),
            Printable(&reply.to_string())
        )?;
        f.write_all(data)
    }

    fn prune(&self) {
        {
            let mut last = self.last_prune.lock();
            if last.is_some_and(|t| t.elapsed() < PRUNE_EVERY) {
                return;
            }
            *last = Some(Instant::now());
        }
        let Ok(entries) = fs::read_dir(&self.failed_dir) else {
            return;
        };
        for e in entries.flatten() {
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > self.retention));
            if old {
                let _ = fs::remove_file(e.path());
            }
        }
    }

    fn notify_sender(
        &self,
        m: &Message,
        peer: &str,
        remote: Option<&str>,
        rcpts: &[String],
        reply: &Reply,
        data: &[u8],
    ) {
        let Ok(sender) = Address::parse_envelope(&m.from) else {
            return;
        };
        let Some(local) = self.router.route(&sender).filter(|&p| self.peers[p].1) else {
            return;
        };
        let id = self.ids.next_id();
        let now = self.queue.now();
        let dsn: Arc<[u8]> = report(
            &self.hostname,
            &id,
            m,
            peer,
            remote,
            rcpts,
            reply,
            data,
            now,
        )
        .into_bytes()
        .into();
        let record = NewMessage {
            id: id.clone(),
            from: String::new(),
            body_type: BodyType::SevenBit,
            message_id: None,
            transaction_id: None,
            accepted: now,
            expires: now + self.queue_lifetime,
            data: dsn.clone(),
            jobs: vec![(self.peers[local].0.clone(), vec![m.from.clone()])],
            dedup_key: None,
            // The relay's own: no PDU, from no client.
            account: Facts {
                origin: "relay".into(),
                ..Facts::default()
            }
            .encode(),
        };
        let location = match self.spool.commit(record) {
            Ok(l) => l,
            Err(e) => {
                warn!("{}: no notification to <{}>: {e}", m.id, m.from);
                return;
            }
        };
        info!(
            "{id} notification of {} failure to <{}> via {}",
            m.id, m.from, self.peers[local].0
        );
        let message = Arc::new(Message {
            id,
            from: String::new(),
            body_type: BodyType::SevenBit,
            info: Default::default(),
            accepted: now,
            expires: now + self.queue_lifetime,
            location,
        });
        self.queue.submit(Job {
            message,
            peer: local,
            rcpts: vec![m.from.clone()],
            attempts: 0,
            data: Some(dsn),
        });
    }
}

/// An RFC 3464 delivery status notification for `rcpts` of `m`; its
/// `Remote-MTA` is `remote`, the host that gave `reply`, if one did.
#[allow(clippy::too_many_arguments)]
fn report(
    host: &str,
    id: &str,
    m: &Message,
    peer: &str,
    remote: Option<&str>,
    rcpts: &[String],
    reply: &Reply,
    data: &[u8],
    now: SystemTime,
) -> String {
    let boundary = format!("{id}/{host}");
    let status = reply
        .lines
        .first()
        .and_then(|l| l.split_whitespace().next())
        .filter(|s| s.split('.').count() == 3 && s.starts_with(['4', '5']))
        .map_or_else(|| format!("{}.0.0", reply.code / 100), str::to_string);
    let headers_end = data
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(data.len(), |p| p + 2);
    let headers = String::from_utf8_lossy(&data[..headers_end]);
    let mut out = format!(
        "From: Mail Delivery System <MAILER-DAEMON@{host}>\r\n\
         To: <{}>\r\n\
         Subject: Undelivered MM4 message {}\r\n\
         Date: {}\r\n\
         Message-ID: <{id}.dsn@{host}>\r\n\
         Auto-Submitted: auto-replied\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"{boundary}\"\r\n\
         \r\n\
         --{boundary}\r\n\
         Content-Type: text/plain; charset=us-ascii\r\n\
         \r\n\
         This is mm4relay at {host}. Message {} could not be delivered\r\n\
         to {} recipient(s) at {peer}:\r\n\r\n",
        Printable(&m.from),
        m.id,
        crate::mm4::date::format(now),
        m.id,
        rcpts.len(),
    );
    // Header values and report fields from the network are printable
    // ASCII here: a CR LF in them would add header fields of its own.
    let diagnostic = Printable(&reply.to_string()).to_string();
    for r in rcpts {
        out.push_str(&format!("  <{}>: {diagnostic}\r\n", Printable(r)));
    }
    out.push_str(&format!(
        "\r\n--{boundary}\r\nContent-Type: message/delivery-status\r\n\r\n\
         Reporting-MTA: dns; {host}\r\nX-Mm4relay-Queue-ID: {}\r\nArrival-Date: {}\r\n",
        m.id,
        crate::mm4::date::format(m.accepted)
    ));
    let remote_mta = remote.map_or_else(String::new, |h| {
        format!("Remote-MTA: dns; {}\r\n", Printable(h))
    });
    for r in rcpts {
        out.push_str(&format!(
            "\r\nFinal-Recipient: rfc822; {}\r\nAction: failed\r\nStatus: {}\r\n{remote_mta}\
             Diagnostic-Code: smtp; {diagnostic}\r\n",
            Printable(r),
            Printable(&status),
        ));
    }
    out.push_str(&format!(
        "\r\n--{boundary}\r\nContent-Type: text/rfc822-headers\r\n\r\n"
    ));
    out.push_str(&headers);
    out.push_str(&format!("\r\n--{boundary}--\r\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Location;
    use std::time::UNIX_EPOCH;

    /// A spooled message from `from`, for `report`.
    fn message(id: &str, from: &str) -> Message {
        Message {
            id: id.into(),
            from: from.into(),
            body_type: BodyType::SevenBit,
            info: Default::default(),
            accepted: UNIX_EPOCH,
            expires: UNIX_EPOCH,
            location: Location {
                segment: 0,
                offset: 0,
                len: 0,
                crc: 0,
            },
        }
    }

    #[test]
    fn what_came_from_the_network_cannot_add_header_fields() {
        // Spooled before commands refused control characters, say.
        let m = message("Q1", "a\r\nBcc: victim@x.test");
        let reply = Reply::new(550, "5.1.1 no\x1b[2J such\r\nBcc: y@x.test user");
        let rcpts = ["r\x00@y.test".to_string()];
        let dsn = report(
            "relay.test",
            "Q2",
            &m,
            "B",
            Some("mmsc-b2.test"),
            &rcpts,
            &reply,
            b"H: v\r\n\r\n",
            UNIX_EPOCH,
        );
        let lines: Vec<&str> = dsn.split("\r\n").collect();
        assert!(!lines.iter().any(|l| l.starts_with("Bcc:")), "{dsn}");
        assert!(!dsn.bytes().any(|b| b == 0x1b || b == 0), "{dsn:?}");
        assert!(
            lines.contains(&"To: <a\\x0d\\x0aBcc: victim@x.test>"),
            "{dsn}"
        );
        assert!(
            dsn.contains("Final-Recipient: rfc822; r\\x00@y.test"),
            "{dsn}"
        );
        assert!(
            dsn.contains("Diagnostic-Code: smtp; 550 5.1.1 no\\x1b[2J such\\x0d\\x0aBcc"),
            "{dsn}"
        );
        assert!(
            dsn.contains("\r\nRemote-MTA: dns; mmsc-b2.test\r\n"),
            "{dsn}"
        );
        assert!(!dsn.contains("dns; B"), "{dsn}");
    }

    #[test]
    fn a_failure_we_decided_names_no_remote_mta() {
        let m = message("Q3", "a@x.test");
        let reply = Reply::new(554, "5.4.7 delivery time expired");
        let rcpts = ["r@y.test".to_string()];
        let dsn = report(
            "relay.test",
            "Q4",
            &m,
            "B",
            None,
            &rcpts,
            &reply,
            b"H: v\r\n\r\n",
            UNIX_EPOCH,
        );
        assert!(!dsn.contains("Remote-MTA"), "{dsn}");
        assert!(dsn.contains("Status: 5.4.7\r\n"), "{dsn}");
    }
}
