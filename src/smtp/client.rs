//! The client side of one SMTP mail transaction as a state machine: it
//! says what to send, takes each reply, and ends with an outcome per
//! recipient. No sockets: the peer worker does the I/O.
//!
//! ```text
//!  with PIPELINING:     send MAIL+RCPT…+DATA ─► read MAIL, each RCPT, DATA
//!  without:             MAIL ─► read ─► RCPT ─► read … ─► DATA ─► read
//!  then, on 354:        send body + "." ─► read final reply ─► Done
//!  with CHUNKING too:   send [RSET+]MAIL+RCPT…+BDAT n LAST+body ─► read
//!                       [RSET,] MAIL, each RCPT, BDAT ─► Done
//! ```
//!
//! With CHUNKING (RFC 3030) nothing waits for a 354, so whole transactions
//! can follow each other in one write; each but a connection's first
//! starts with RSET, so that however the one before it ended at the peer,
//! its MAIL meets no open transaction.
//!
//! A recipient's outcome is the reply that decided it: the MAIL reply if
//! MAIL failed, its RCPT reply if that failed, the DATA reply if DATA
//! failed, or the reply to the final dot (with BDAT: to `BDAT n LAST`).

use super::command::{BodyType, format_mail, format_rcpt};
use super::reply::Reply;

/// What a peer offered in its EHLO reply.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// PIPELINING (RFC 2920).
    pub pipelining: bool,
    /// SIZE (RFC 1870), with the limit if one was given (0 = none).
    pub size: Option<u64>,
    /// 8BITMIME (RFC 6152).
    pub eight_bit_mime: bool,
    /// STARTTLS (RFC 3207).
    pub starttls: bool,
    /// AUTH mechanisms offered (RFC 4954), upper case.
    pub auth: Vec<String>,
    /// CHUNKING (RFC 3030): BDAT.
    pub chunking: bool,
}

impl Capabilities {
    /// Reads the keywords of an EHLO reply (the first line is the greeting).
    pub fn from_ehlo(reply: &Reply) -> Capabilities {
        let mut caps = Capabilities::default();
        for line in reply.lines.iter().skip(1) {
            let mut words = line.split_whitespace();
            let keyword = words.next().unwrap_or("").to_ascii_uppercase();
            match keyword.as_str() {
                "PIPELINING" => caps.pipelining = true,
                "8BITMIME" => caps.eight_bit_mime = true,
                "SIZE" => caps.size = Some(words.next().and_then(|n| n.parse().ok()).unwrap_or(0)),
                "STARTTLS" => caps.starttls = true,
                "CHUNKING" => caps.chunking = true,
                "AUTH" => caps.auth = words.map(str::to_ascii_uppercase).collect(),
                _ => {}
            }
        }
        caps
    }
}

/// What the caller must do next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Write these octets, then read the next reply.
    Send(Vec<u8>),
    /// Read the next reply (more pipelined replies are due).
    Read,
    /// Write the message, dot-stuffed and ended with `.`, then read.
    SendBody,
    /// The transaction is over.
    Done,
}

/// Why a transaction cannot be started on this connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The message is larger than the peer's SIZE limit (a permanent fault).
    TooBig {
        /// Our message size.
        size: u64,
        /// The peer's limit.
        limit: u64,
    },
    /// The message needs 8BITMIME and the peer does not offer it.
    No8BitMime,
}

/// Which reply the transaction waits for (the caller picks its timeout).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// The reply to the RSET a chunked transaction starts with: anything
    /// but 2xx leaves the peer's state unknown.
    Reset,
    /// The MAIL reply.
    Mail,
    /// The reply to the RCPT of this recipient index.
    Rcpt(usize),
    /// The DATA reply (354 hoped for).
    Data,
    /// The reply to a lone "." sent after an unwanted 354.
    EmptyData,
    /// The reply to the final dot.
    Final,
    /// The reply to `BDAT n LAST`, which carried the whole message.
    Chunk,
    /// Nothing: the transaction is over.
    Done,
}

/// One mail transaction from MAIL to the reply to the final dot.
#[derive(Debug)]
pub struct Transaction {
    pipelining: bool,
    rcpts: Vec<String>,
    expect: Expect,
    mail_failed: Option<Reply>,
    outcomes: Vec<Option<Reply>>,
    completed: bool,
    /// Sent with BDAT: the RCPT replies are followed by BDAT's.
    chunked: bool,
}

impl Transaction {
    /// Plans a transaction and returns it with the first octets to send.
    pub fn start(
        caps: &Capabilities,
        from: &str,
        rcpts: &[String],
        size: u64,
        body: BodyType,
    ) -> Result<(Transaction, Vec<u8>), Refusal> {
        if let Some(limit) = caps.size.filter(|&l| l > 0 && size > l) {
            return Err(Refusal::TooBig { size, limit });
        }
        if body == BodyType::EightBitMime && !caps.eight_bit_mime {
            return Err(Refusal::No8BitMime);
        }
        let size = caps.size.map(|_| size);
        let mut first = format_mail(from, size, body).into_bytes();
        if caps.pipelining {
            for r in rcpts {
                first.extend_from_slice(format_rcpt(r).as_bytes());
            }
            first.extend_from_slice(b"DATA\r\n");
        }
        let t = Transaction {
            pipelining: caps.pipelining,
            rcpts: rcpts.to_vec(),
            expect: Expect::Mail,
            mail_failed: None,
            outcomes: vec![None; rcpts.len()],
            completed: false,
            chunked: false,
        };
        Ok((t, first))
    }

    /// Plans a transaction that sends everything at once: MAIL, the RCPTs
    /// and the message as one `BDAT LAST` chunk, appended to `out` (after
    /// RSET when `reset`). For a peer that offers PIPELINING and CHUNKING.
    pub fn start_chunked(
        caps: &Capabilities,
        from: &str,
        rcpts: &[String],
        data: &[u8],
        body: BodyType,
        reset: bool,
        out: &mut Vec<u8>,
    ) -> Result<Transaction, Refusal> {
        debug_assert!(caps.pipelining && caps.chunking, "BDAT batches need both");
        let (mut t, first) = Transaction::start(caps, from, rcpts, data.len() as u64, body)?;
        if reset {
            out.extend_from_slice(b"RSET\r\n");
            t.expect = Expect::Reset;
        }
        // `first` ends with DATA when pipelining: BDAT takes its place.
        let commands = first.strip_suffix(b"DATA\r\n").unwrap_or(&first);
        out.extend_from_slice(commands);
        out.extend_from_slice(format!("BDAT {} LAST\r\n", data.len()).as_bytes());
        out.extend_from_slice(data);
        t.chunked = true;
        Ok(t)
    }

    /// Takes the next reply and says what to do.
    pub fn on_reply(&mut self, reply: Reply) -> Step {
        match self.expect {
            Expect::Reset => {
                // The caller ends the connection on anything but 2xx.
                self.expect = Expect::Mail;
                Step::Read
            }
            Expect::Mail => {
                if !reply.is_positive() {
                    self.mail_failed = Some(reply);
                    if !self.pipelining {
                        return self.finish();
                    }
                }
                self.expect = Expect::Rcpt(0);
                if self.pipelining {
                    Step::Read
                } else {
                    Step::Send(format_rcpt(&self.rcpts[0]).into_bytes())
                }
            }
            Expect::Rcpt(i) => {
                if !reply.is_positive() {
                    self.outcomes[i] = Some(reply);
                }
                if i + 1 < self.rcpts.len() {
                    self.expect = Expect::Rcpt(i + 1);
                    if self.pipelining {
                        Step::Read
                    } else {
                        Step::Send(format_rcpt(&self.rcpts[i + 1]).into_bytes())
                    }
                } else {
                    self.expect = if self.chunked {
                        Expect::Chunk
                    } else {
                        Expect::Data
                    };
                    if self.pipelining {
                        Step::Read
                    } else if self.accepted() == 0 {
                        self.finish()
                    } else {
                        Step::Send(b"DATA\r\n".to_vec())
                    }
                }
            }
            Expect::Data => {
                if reply.is_intermediate() {
                    if self.mail_failed.is_some() || self.accepted() == 0 {
                        // Pipelined DATA was accepted although nobody will
                        // get the message: send no content (RFC 2920 §3.1).
                        self.expect = Expect::EmptyData;
                        return Step::Send(b".\r\n".to_vec());
                    }
                    self.expect = Expect::Final;
                    Step::SendBody
                } else {
                    self.decide_accepted(reply);
                    self.finish()
                }
            }
            Expect::EmptyData => self.finish(),
            Expect::Chunk => {
                // Whatever the reply, the chunk ended the transaction at
                // the peer, and the next one starts with RSET anyway.
                self.completed = true;
                self.decide_accepted(reply);
                self.finish()
            }
            Expect::Final => {
                self.completed = true;
                self.decide_accepted(reply);
                self.finish()
            }
            Expect::Done => Step::Done,
        }
    }

    /// True while the message still has somewhere to go: MAIL was not
    /// refused and some recipient was not (or is not decided yet).
    pub fn awaits_data(&self) -> bool {
        self.mail_failed.is_none() && self.accepted() > 0
    }

    /// The reply the transaction is waiting for.
    pub fn expecting(&self) -> Expect {
        self.expect
    }

    /// The reply that decided each recipient, in the order given; `None`
    /// only for a transaction that is not over.
    pub fn outcomes(&self) -> &[Option<Reply>] {
        &self.outcomes
    }

    /// True if the transaction may still be open at the peer, so RSET must
    /// come before the next one.
    pub fn needs_reset(&self) -> bool {
        !self.completed
    }

    fn accepted(&self) -> usize {
        self.outcomes.iter().filter(|o| o.is_none()).count()
    }

    fn decide_accepted(&mut self, reply: Reply) {
        for o in self.outcomes.iter_mut().filter(|o| o.is_none()) {
            *o = Some(reply.clone());
        }
    }

    fn finish(&mut self) -> Step {
        if let Some(mail) = self.mail_failed.take() {
            self.outcomes
                .iter_mut()
                .for_each(|o| *o = Some(mail.clone()));
        }
        self.expect = Expect::Done;
        Step::Done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(pipelining: bool) -> Capabilities {
        Capabilities {
            pipelining,
            size: Some(1000),
            eight_bit_mime: true,
            ..Capabilities::default()
        }
    }

    fn r(code: u16) -> Reply {
        Reply::new(code, "x")
    }

    fn rcpts() -> Vec<String> {
        vec!["a@x".into(), "b@x".into()]
    }

    fn codes(t: &Transaction) -> Vec<u16> {
        t.outcomes()
            .iter()
            .map(|o| o.as_ref().unwrap().code)
            .collect()
    }

    #[test]
    fn reads_ehlo_keywords() {
        let reply = Reply {
            code: 250,
            lines: vec![
                "mx".into(),
                "pipelining".into(),
                "SIZE 2048".into(),
                "8BITMIME".into(),
                "STARTTLS".into(),
                "AUTH login Plain".into(),
                "Chunking".into(),
            ],
        };
        assert_eq!(
            Capabilities::from_ehlo(&reply),
            Capabilities {
                pipelining: true,
                size: Some(2048),
                eight_bit_mime: true,
                starttls: true,
                auth: vec!["LOGIN".into(), "PLAIN".into()],
                chunking: true,
            }
        );
    }

    #[test]
    fn chunked_sends_all_at_once_and_the_bdat_reply_decides() {
        let caps = Capabilities {
            chunking: true,
            ..caps(true)
        };
        let mut out = Vec::new();
        let mut t = Transaction::start_chunked(
            &caps,
            "s@y",
            &rcpts(),
            b"hi\r\n",
            BodyType::SevenBit,
            true,
            &mut out,
        )
        .unwrap();
        assert_eq!(
            out,
            b"RSET\r\nMAIL FROM:<s@y> SIZE=4\r\nRCPT TO:<a@x>\r\nRCPT TO:<b@x>\r\nBDAT 4 LAST\r\nhi\r\n"
        );
        assert_eq!(t.expecting(), Expect::Reset);
        assert_eq!(t.on_reply(r(250)), Step::Read);
        assert_eq!(t.on_reply(r(250)), Step::Read);
        assert_eq!(t.on_reply(r(550)), Step::Read);
        assert_eq!(t.on_reply(r(250)), Step::Read);
        assert_eq!(t.expecting(), Expect::Chunk);
        assert_eq!(t.on_reply(r(451)), Step::Done);
        assert_eq!(codes(&t), [550, 451]);
        // Done at the peer whatever BDAT got: no RSET round trip after it.
        assert!(!t.needs_reset());
        // A refused MAIL decides everyone, whatever BDAT got.
        let mut t = Transaction::start_chunked(
            &caps,
            "s@y",
            &rcpts(),
            b"",
            BodyType::SevenBit,
            false,
            &mut Vec::new(),
        )
        .unwrap();
        for code in [553, 503, 503, 503] {
            t.on_reply(r(code));
        }
        assert_eq!(codes(&t), [553, 553]);
    }

    #[test]
    fn pipelined_success_and_partial_rcpt() {
        let (mut t, first) =
            Transaction::start(&caps(true), "s@y", &rcpts(), 10, BodyType::SevenBit).unwrap();
        assert_eq!(
            first,
            b"MAIL FROM:<s@y> SIZE=10\r\nRCPT TO:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n"
        );
        assert_eq!(t.on_reply(r(250)), Step::Read);
        assert_eq!(t.on_reply(r(250)), Step::Read);
        assert_eq!(t.on_reply(r(450)), Step::Read);
        assert_eq!(t.on_reply(r(354)), Step::SendBody);
        assert_eq!(t.on_reply(r(250)), Step::Done);
        assert_eq!(codes(&t), [250, 450]);
        assert!(!t.needs_reset());
    }

    #[test]
    fn pipelined_all_rcpts_refused_but_354() {
        let (mut t, _) =
            Transaction::start(&caps(true), "s@y", &rcpts(), 10, BodyType::SevenBit).unwrap();
        for reply in [250, 550, 550] {
            assert_eq!(t.on_reply(r(reply)), Step::Read);
        }
        assert_eq!(t.on_reply(r(354)), Step::Send(b".\r\n".to_vec()));
        assert_eq!(t.on_reply(r(554)), Step::Done);
        assert_eq!(codes(&t), [550, 550]);
        assert!(t.needs_reset());
    }

    #[test]
    fn pipelined_mail_refused() {
        let (mut t, _) =
            Transaction::start(&caps(true), "s@y", &rcpts(), 10, BodyType::SevenBit).unwrap();
        for reply in [451, 503, 503] {
            assert_eq!(t.on_reply(r(reply)), Step::Read);
        }
        assert_eq!(t.on_reply(r(503)), Step::Done);
        assert_eq!(codes(&t), [451, 451]);
    }

    #[test]
    fn lockstep_without_pipelining() {
        let (mut t, first) =
            Transaction::start(&caps(false), "s@y", &rcpts(), 10, BodyType::EightBitMime).unwrap();
        assert_eq!(first, b"MAIL FROM:<s@y> SIZE=10 BODY=8BITMIME\r\n");
        assert_eq!(
            t.on_reply(r(250)),
            Step::Send(b"RCPT TO:<a@x>\r\n".to_vec())
        );
        assert_eq!(
            t.on_reply(r(250)),
            Step::Send(b"RCPT TO:<b@x>\r\n".to_vec())
        );
        assert_eq!(t.on_reply(r(250)), Step::Send(b"DATA\r\n".to_vec()));
        assert_eq!(t.on_reply(r(451)), Step::Done);
        assert_eq!(codes(&t), [451, 451]);
        assert!(t.needs_reset());

        let (mut t, _) =
            Transaction::start(&caps(false), "s@y", &rcpts(), 10, BodyType::SevenBit).unwrap();
        assert_eq!(t.on_reply(r(550)), Step::Done);
        assert_eq!(codes(&t), [550, 550]);
    }

    #[test]
    fn refuses_what_the_peer_cannot_take() {
        let no8 = Capabilities {
            eight_bit_mime: false,
            ..caps(true)
        };
        assert_eq!(
            Transaction::start(&no8, "", &rcpts(), 10, BodyType::EightBitMime).unwrap_err(),
            Refusal::No8BitMime
        );
        assert_eq!(
            Transaction::start(&caps(true), "", &rcpts(), 5000, BodyType::SevenBit).unwrap_err(),
            Refusal::TooBig {
                size: 5000,
                limit: 1000
            }
        );
    }
}
