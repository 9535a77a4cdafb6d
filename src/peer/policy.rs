//! Delivery policy: what a reply, or an error at a stage of a client
//! session, means for the message's recipients, for the connection and
//! for the peer's health. No I/O and no state: the worker and the
//! connection ask, and do what it says (after Postfix's `smtp_trouble.c`).
//!
//! ```text
//!  a finished transaction     2xx sent · 5xx failed · else deferred
//!                             (expired when the message's time is up)
//!  nothing accepted yet       the connection is closed and the message
//!   (first write, MAIL reply,  tried once more at once on a new one;
//!    421, session used up)     only a failure there defers it (BDAT:
//!                              a chunk written whole counts as sent)
//!  after MAIL was accepted    closed; the undecided recipients deferred
//!  after the final dot        closed; deferred (the peer may have it)
//!  5xx greeting or HELO       QUIT, next host; every host so: failed
//!  TLS or AUTH impossible     deferred; the peer is misconfigured
//! ```

use std::fmt;

use crate::smtp::Reply;

/// Where in a client session something happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// TCP connect to every address of a host.
    Connect,
    /// Waiting for the greeting.
    Greeting,
    /// EHLO, and HELO after a refused EHLO.
    Helo,
    /// STARTTLS, or the handshake of implicit TLS.
    Tls,
    /// AUTH.
    Auth,
    /// Writing a transaction's first commands or reading the MAIL reply:
    /// the peer has accepted no part of the transaction.
    Mail,
    /// Reading a RCPT reply.
    Rcpt,
    /// Reading the DATA reply.
    Data,
    /// Writing the message content, before the final dot.
    Content,
    /// Reading the reply to the final dot.
    Final,
    /// RSET after a transaction that did not complete.
    Reset,
    /// A connection between transactions: NOOP, or the check before reuse.
    Idle,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::Connect => "connect",
            Stage::Greeting => "greeting",
            Stage::Helo => "EHLO/HELO",
            Stage::Tls => "TLS",
            Stage::Auth => "AUTH",
            Stage::Mail => "MAIL",
            Stage::Rcpt => "RCPT",
            Stage::Data => "DATA",
            Stage::Content => "message content",
            Stage::Final => "end of data",
            Stage::Reset => "RSET",
            Stage::Idle => "idle",
        })
    }
}

/// What went wrong at a stage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Trouble {
    /// The peer replied, not as the stage needs.
    Reply(Reply),
    /// The peer closed the connection.
    Closed,
    /// The peer did not answer in time.
    TimedOut,
    /// A system call failed, or no address would connect.
    Io(String),
    /// The peer sent something that is not a reply, or data unasked.
    Protocol(String),
    /// The TLS handshake or the certificate check failed.
    Tls(String),
    /// The peer lacks what our configuration needs of it (STARTTLS, an
    /// AUTH mechanism, TLS before AUTH).
    Unsupported(String),
}

impl fmt::Display for Trouble {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Trouble::Reply(r) => write!(f, "{r}"),
            Trouble::Closed => f.write_str("connection closed by peer"),
            Trouble::TimedOut => f.write_str("timed out waiting for the peer"),
            Trouble::Io(e) => write!(f, "{e}"),
            Trouble::Protocol(e) => write!(f, "protocol error: {e}"),
            Trouble::Tls(e) => write!(f, "TLS: {e}"),
            Trouble::Unsupported(e) => f.write_str(e),
        }
    }
}

/// What the worker knows about the attempt when trouble comes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Attempt {
    /// Transactions begun on this connection before this one.
    pub earlier: u32,
    /// The message already had its one immediate retry on a new
    /// connection.
    pub retried: bool,
    /// The message's expiry has passed.
    pub expired: bool,
}

/// What becomes of a recipient.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    /// Delivered.
    Sent,
    /// Try again later.
    Deferred,
    /// Failed for good: a DSN goes back.
    Failed,
    /// Would be deferred, but its time is up: failed as expired.
    Expired,
    /// Nothing was accepted: try at once on a new connection.
    RetryNow,
}

/// What becomes of the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Ready for the next transaction.
    Keep,
    /// RSET first: the transaction may still be open at the peer.
    Reset,
    /// Close it (QUIT when the peer still listens), for this reason.
    Close(Reason),
}

/// Why a connection is closed; every close is logged with one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// The peer said 421.
    PeerClosing,
    /// The peer takes no more messages on this session.
    SessionLimit,
    /// The peer closed it, or a read or write failed or timed out.
    Lost,
    /// The peer broke the protocol.
    Protocol,
    /// The peer refused us at the greeting or at EHLO/HELO.
    Refused,
    /// TLS as configured could not be had.
    Tls,
    /// AUTH as configured could not be done.
    Auth,
    /// RSET was not accepted.
    ResetRefused,
    /// It carried `max_messages_per_connection` (configured or learnt).
    MessageLimit,
    /// It reached `max_connection_age`.
    Age,
    /// It was made before a reload.
    Reload,
    /// The peer's allowance shrank below this worker.
    Allowance,
    /// The relay is stopping.
    Stop,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Reason::PeerClosing => "peer-closing",
            Reason::SessionLimit => "session-limit",
            Reason::Lost => "lost",
            Reason::Protocol => "protocol-error",
            Reason::Refused => "refused",
            Reason::Tls => "tls",
            Reason::Auth => "auth",
            Reason::ResetRefused => "rset-refused",
            Reason::MessageLimit => "message-limit",
            Reason::Age => "max-age",
            Reason::Reload => "reload",
            Reason::Allowance => "allowance",
            Reason::Stop => "stop",
        })
    }
}

/// What an outcome tells about the peer's health.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// Nothing.
    None,
    /// It answered a transaction (2xx or 5xx): it works.
    Answered,
    /// It answered with transient replies only.
    Transient,
    /// A connection-level failure.
    ConnectionFailed,
    /// Our configuration and the peer do not agree (TLS, AUTH): a
    /// connection-level failure an operator must look at.
    Misconfigured,
}

/// The decision on trouble: for the message, the connection, the peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// For every recipient not decided by a reply.
    pub fate: Fate,
    /// For the connection.
    pub next: Next,
    /// For the peer's health.
    pub health: Health,
    /// The peer ends sessions after this many transactions: use it as
    /// the peer's message limit per connection.
    pub limit: Option<u32>,
}

/// What a recipient's deciding reply means.
pub fn recipient(reply: &Reply, expired: bool) -> Fate {
    if reply.is_positive() {
        Fate::Sent
    } else if reply.is_permanent() {
        Fate::Failed
    } else if expired {
        // 4xx, or a code that means nothing here: not final.
        Fate::Expired
    } else {
        Fate::Deferred
    }
}

/// What a finished transaction's replies tell about the peer.
pub fn answered(replies: &[Reply]) -> Health {
    if replies.iter().any(|r| r.is_positive() || r.is_permanent()) {
        Health::Answered
    } else {
        Health::Transient
    }
}

/// After a transaction that ended with a reply for every recipient:
/// whether the peer may still hold it open.
pub fn after(completed: bool) -> Next {
    if completed { Next::Keep } else { Next::Reset }
}

/// True if `reply`, at `stage`, ends the session rather than the
/// transaction: a 421 anywhere, or a 4xx to MAIL saying too many (452,
/// or x.5.3) on a connection that already carried a message (OpenSMTPD's
/// "452 4.5.3 Too many messages sent").
pub fn ends_session(stage: Stage, reply: &Reply, earlier: u32) -> bool {
    reply.code == 421
        || (stage == Stage::Mail
            && earlier > 0
            && reply.is_transient()
            && (reply.code == 452 || enhanced(reply).is_some_and(|e| e.ends_with(".5.3"))))
}

/// True if a reply that ends a session says it ends it for the number of
/// messages (x.5.3, or "too many"), not for load or storage, which pass:
/// only such a reply teaches a per-connection limit.
fn says_too_many(reply: &Reply) -> bool {
    enhanced(reply).is_some_and(|e| e.ends_with(".5.3"))
        || reply.text().to_ascii_lowercase().contains("too many")
}

/// The enhanced status code (RFC 3463) at the start of a reply, if any.
fn enhanced(reply: &Reply) -> Option<&str> {
    let first = reply.lines.first()?.split_whitespace().next()?;
    let mut parts = first.split('.');
    let ok = parts.next().is_some_and(|c| c.len() == 1)
        && parts.clone().count() == 2
        && parts.all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()));
    ok.then_some(first)
}

/// The decision on `trouble` at `stage`.
pub fn trouble(stage: Stage, trouble: &Trouble, a: Attempt) -> Verdict {
    let lost = |t: &Trouble| match t {
        Trouble::Reply(r) if r.code == 421 => Reason::PeerClosing,
        Trouble::Reply(_) if stage == Stage::Mail => Reason::SessionLimit,
        Trouble::Reply(_) => Reason::Refused,
        Trouble::Protocol(_) => Reason::Protocol,
        _ => Reason::Lost,
    };
    let defer = if a.expired {
        Fate::Expired
    } else {
        Fate::Deferred
    };
    let verdict = |fate, reason, health| Verdict {
        fate,
        next: Next::Close(reason),
        health,
        limit: None,
    };
    match (stage, trouble) {
        // Refused by the site: QUIT, the next host, and failed if every
        // host says so.
        (Stage::Greeting | Stage::Helo, Trouble::Reply(r)) if r.is_permanent() => {
            verdict(Fate::Failed, Reason::Refused, Health::ConnectionFailed)
        }
        (Stage::Greeting | Stage::Helo, Trouble::Reply(r)) if r.code != 421 => {
            verdict(defer, Reason::Refused, Health::ConnectionFailed)
        }
        // Our configuration and the peer disagree: nothing a retry cures.
        (Stage::Tls, Trouble::Reply(_) | Trouble::Tls(_) | Trouble::Unsupported(_)) => {
            verdict(defer, Reason::Tls, Health::Misconfigured)
        }
        (Stage::Auth, Trouble::Reply(r)) if !r.is_transient() => {
            verdict(defer, Reason::Auth, Health::Misconfigured)
        }
        (Stage::Auth, Trouble::Unsupported(_)) => {
            verdict(defer, Reason::Auth, Health::Misconfigured)
        }
        (Stage::Auth, Trouble::Reply(_)) => verdict(defer, Reason::Auth, Health::ConnectionFailed),
        // Nothing of the transaction accepted: the connection was stale,
        // used up or closing. Once more at once on a new one (not after a
        // timeout: that would make the message wait twice).
        (Stage::Mail, t) if !a.retried && *t != Trouble::TimedOut => Verdict {
            limit: match t {
                Trouble::Reply(r) if a.earlier > 0 && says_too_many(r) => Some(a.earlier),
                _ => None,
            },
            ..verdict(Fate::RetryNow, lost(t), Health::None)
        },
        // Between transactions: nothing is at stake.
        (Stage::Reset, Trouble::Reply(r)) if r.code != 421 => {
            verdict(defer, Reason::ResetRefused, Health::None)
        }
        (Stage::Reset | Stage::Idle, t) => verdict(defer, lost(t), Health::None),
        (_, t) => verdict(defer, lost(t), Health::ConnectionFailed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(code: u16, text: &str) -> Trouble {
        Trouble::Reply(Reply::new(code, text))
    }

    const FIRST: Attempt = Attempt {
        earlier: 0,
        retried: false,
        expired: false,
    };
    const REUSED: Attempt = Attempt {
        earlier: 7,
        ..FIRST
    };
    const RETRIED: Attempt = Attempt {
        retried: true,
        ..FIRST
    };
    const EXPIRED: Attempt = Attempt {
        expired: true,
        ..FIRST
    };

    fn close(fate: Fate, reason: Reason, health: Health) -> Verdict {
        Verdict {
            fate,
            next: Next::Close(reason),
            health,
            limit: None,
        }
    }

    #[test]
    #[rustfmt::skip]
    fn the_table() {
        use Fate::*;
        use Health::{ConnectionFailed, Misconfigured};
        use Reason::*;
        let io = || Trouble::Io("connection reset by peer".into());
        let cases: Vec<(Stage, Trouble, Attempt, Verdict)> = vec![
            // Connect and greeting.
            (Stage::Connect, io(), FIRST, close(Deferred, Lost, ConnectionFailed)),
            (Stage::Connect, io(), EXPIRED, close(Expired, Lost, ConnectionFailed)),
            (Stage::Greeting, r(554, "5.7.1 go away"), FIRST, close(Failed, Refused, ConnectionFailed)),
            (Stage::Greeting, r(450, "busy"), FIRST, close(Deferred, Refused, ConnectionFailed)),
            (Stage::Greeting, r(421, "4.3.2 busy"), FIRST, close(Deferred, PeerClosing, ConnectionFailed)),
            (Stage::Greeting, Trouble::TimedOut, FIRST, close(Deferred, Lost, ConnectionFailed)),
            (Stage::Greeting, Trouble::Closed, FIRST, close(Deferred, Lost, ConnectionFailed)),
            (Stage::Helo, r(550, "no"), FIRST, close(Failed, Refused, ConnectionFailed)),
            (Stage::Helo, r(451, "later"), FIRST, close(Deferred, Refused, ConnectionFailed)),
            (Stage::Helo, r(421, "closing"), FIRST, close(Deferred, PeerClosing, ConnectionFailed)),
            // TLS and AUTH: our settings and the peer's disagree, unless
            // the network ended the handshake.
            (Stage::Tls, Trouble::Unsupported("no STARTTLS".into()), FIRST, close(Deferred, Tls, Misconfigured)),
            (Stage::Tls, r(454, "4.7.0 TLS not available"), FIRST, close(Deferred, Tls, Misconfigured)),
            (Stage::Tls, Trouble::Tls("certificate verify failed".into()), FIRST, close(Deferred, Tls, Misconfigured)),
            (Stage::Tls, Trouble::Closed, FIRST, close(Deferred, Lost, ConnectionFailed)),
            (Stage::Tls, Trouble::TimedOut, FIRST, close(Deferred, Lost, ConnectionFailed)),
            (Stage::Auth, r(535, "5.7.8 bad credentials"), FIRST, close(Deferred, Auth, Misconfigured)),
            (Stage::Auth, Trouble::Unsupported("no AUTH PLAIN or LOGIN".into()), FIRST, close(Deferred, Auth, Misconfigured)),
            (Stage::Auth, r(454, "4.7.0 try later"), FIRST, close(Deferred, Auth, ConnectionFailed)),
            // Nothing accepted yet: once more on a new connection.
            (Stage::Mail, Trouble::Closed, REUSED, close(RetryNow, Lost, Health::None)),
            (Stage::Mail, io(), FIRST, close(RetryNow, Lost, Health::None)),
            (Stage::Mail, r(421, "4.7.0 idle"), FIRST, close(RetryNow, PeerClosing, Health::None)),
            (Stage::Mail, Trouble::Protocol("garbage".into()), FIRST, close(RetryNow, Protocol, Health::None)),
            // ... but not after a timeout, nor twice.
            (Stage::Mail, Trouble::TimedOut, FIRST, close(Deferred, Lost, ConnectionFailed)),
            (Stage::Mail, Trouble::Closed, RETRIED, close(Deferred, Lost, ConnectionFailed)),
            (Stage::Mail, r(421, "bye"), RETRIED, close(Deferred, PeerClosing, ConnectionFailed)),
            // After MAIL was accepted: deferred.
            (Stage::Rcpt, r(421, "4.4.2 timeout"), FIRST, close(Deferred, PeerClosing, ConnectionFailed)),
            (Stage::Rcpt, Trouble::Closed, FIRST, close(Deferred, Lost, ConnectionFailed)),
            (Stage::Data, r(421, "bye"), FIRST, close(Deferred, PeerClosing, ConnectionFailed)),
            (Stage::Data, Trouble::TimedOut, FIRST, close(Deferred, Lost, ConnectionFailed)),
            (Stage::Content, io(), FIRST, close(Deferred, Lost, ConnectionFailed)),
            // After the final dot: the peer may have it; deferred, never
            // retried at once.
            (Stage::Final, Trouble::Closed, FIRST, close(Deferred, Lost, ConnectionFailed)),
            (Stage::Final, Trouble::TimedOut, FIRST, close(Deferred, Lost, ConnectionFailed)),
            (Stage::Final, r(421, "bye"), FIRST, close(Deferred, PeerClosing, ConnectionFailed)),
            (Stage::Final, Trouble::Closed, EXPIRED, close(Expired, Lost, ConnectionFailed)),
            // Between transactions: nothing at stake, no health event.
            (Stage::Reset, r(500, "what?"), FIRST, close(Deferred, ResetRefused, Health::None)),
            (Stage::Reset, r(421, "4.7.0 too many errors"), FIRST, close(Deferred, PeerClosing, Health::None)),
            (Stage::Reset, Trouble::Closed, FIRST, close(Deferred, Lost, Health::None)),
            (Stage::Idle, r(421, "4.4.2 timeout"), FIRST, close(Deferred, PeerClosing, Health::None)),
            (Stage::Idle, Trouble::Closed, FIRST, close(Deferred, Lost, Health::None)),
            (Stage::Idle, r(500, "NOOP?"), FIRST, close(Deferred, Refused, Health::None)),
        ];
        for (stage, t, a, want) in cases {
            assert_eq!(trouble(stage, &t, a), want, "{t} at {stage}, {a:?}");
        }
    }

    #[test]
    fn a_session_used_up_at_mail_teaches_the_limit() {
        let opensmtpd = r(452, "4.5.3 Too many messages sent");
        let exim = r(421, "4.7.0 too many messages for this connection");
        for (t, reason) in [
            (opensmtpd, Reason::SessionLimit),
            (exim, Reason::PeerClosing),
        ] {
            let v = trouble(Stage::Mail, &t, REUSED);
            assert_eq!(
                v,
                Verdict {
                    limit: Some(7),
                    ..close(Fate::RetryNow, reason, Health::None)
                },
                "{t}"
            );
            // On the new connection it is no limit: deferred.
            let v = trouble(
                Stage::Mail,
                &t,
                Attempt {
                    retried: true,
                    ..REUSED
                },
            );
            assert_eq!((v.fate, v.limit), (Fate::Deferred, None), "{t}");
        }
        // Load or storage, not the count: a fresh session, nothing learnt.
        for t in [
            r(421, "4.3.2 System not accepting network messages"),
            r(452, "4.3.1 Insufficient system storage"),
        ] {
            let v = trouble(Stage::Mail, &t, REUSED);
            assert_eq!((v.fate, v.limit), (Fate::RetryNow, None), "{t}");
        }
        // The first message of a session: no limit to learn.
        assert_eq!(trouble(Stage::Mail, &r(421, "bye"), FIRST).limit, None);
        // An EOF teaches nothing.
        assert_eq!(trouble(Stage::Mail, &Trouble::Closed, REUSED).limit, None);
    }

    #[test]
    fn what_ends_a_session() {
        let used_up = Reply::new(452, "4.5.3 Too many messages sent");
        assert!(ends_session(Stage::Mail, &used_up, 1));
        assert!(
            !ends_session(Stage::Mail, &used_up, 0),
            "a fresh session's 452 is the message's"
        );
        assert!(
            !ends_session(Stage::Rcpt, &used_up, 3),
            "452 at RCPT: too many recipients"
        );
        assert!(ends_session(
            Stage::Mail,
            &Reply::new(451, "4.5.3 too many"),
            2
        ));
        assert!(!ends_session(
            Stage::Mail,
            &Reply::new(451, "4.7.1 greylisted"),
            2
        ));
        assert!(!ends_session(
            Stage::Mail,
            &Reply::new(451, "try 4.5.3 later"),
            2
        ));
        assert!(!ends_session(
            Stage::Mail,
            &Reply::new(552, "5.5.3 too many"),
            2
        ));
        for stage in [
            Stage::Mail,
            Stage::Rcpt,
            Stage::Data,
            Stage::Final,
            Stage::Reset,
        ] {
            assert!(ends_session(stage, &Reply::new(421, "bye"), 0), "{stage}");
        }
    }

    #[test]
    fn recipients_by_their_reply() {
        let cases = [
            (250, false, Fate::Sent),
            (250, true, Fate::Sent),
            (550, false, Fate::Failed),
            (552, true, Fate::Failed),
            (450, false, Fate::Deferred),
            (452, true, Fate::Expired),
            // Not a reply that decides anything: not final either.
            (354, false, Fate::Deferred),
            (199, false, Fate::Deferred),
        ];
        for (code, expired, want) in cases {
            assert_eq!(
                recipient(&Reply::new(code, "x"), expired),
                want,
                "{code} {expired}"
            );
        }
    }

    #[test]
    fn transactions_and_health() {
        let ok = Reply::new(250, "ok");
        let no = Reply::new(550, "no");
        let later = Reply::new(451, "later");
        assert_eq!(answered(&[later.clone(), ok]), Health::Answered);
        assert_eq!(answered(&[later.clone(), no]), Health::Answered);
        assert_eq!(answered(&[later.clone(), later]), Health::Transient);
        assert_eq!(after(true), Next::Keep);
        assert_eq!(after(false), Next::Reset);
    }
}
