//! The server side of one SMTP session as a state machine: bytes in,
//! replies out, no sockets.
//!
//! ```text
//!  greeting ─► Commands (no HELO yet) ─EHLO/HELO─► Commands (greeted)
//!    ─MAIL─► Commands + envelope ─RCPT─► Commands + envelope(+rcpts)
//!    ─DATA (354)─► Data ─end of data: 250/5xx─► Commands (no envelope)
//!  AUTH: Commands ─► Auth ─► Commands; an over-long line: Discarding;
//!  QUIT, a limit or a timeout: Closed
//! ```
//!
//! Decisions that need the rest of the relay (routing and relay control at
//! RCPT, the MM4 check and queueing at the end of DATA) are asked of a
//! [`Handler`], so the protocol can be tested with byte strings alone.
//! Commands may be pipelined (RFC 2920): [`Session::feed`] answers every
//! complete command in its input and the caller sends the replies when it
//! has no more input to give.

use super::codec::{DataDecoder, DataFault};
use super::command::{Command, MailParams};
use super::reply::Reply;

/// Longest command line we read, CRLF included (RFC 5321 says 512; leave
/// room for long addresses and parameters).
pub const MAX_COMMAND_LINE: usize = 1024;

/// The envelope of one transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope<R> {
    /// The name the client gave in EHLO/HELO.
    pub helo: String,
    /// How it came, as `Received: ... with` says it (RFC 3848): `SMTP`
    /// after HELO; after EHLO `ESMTP`, `ESMTPS` over TLS, `ESMTPA` with
    /// AUTH, `ESMTPSA` with both.
    pub protocol: &'static str,
    /// The reverse path (`""` for the null sender).
    pub from: String,
    /// The MAIL FROM parameters.
    pub params: MailParams,
    /// Accepted recipients with what the handler said of each.
    pub rcpts: Vec<(String, R)>,
}

/// The relay's side of the decisions a session needs.
pub trait Handler {
    /// What the handler remembers of an accepted recipient (its route).
    type Route;
    /// Decides on one RCPT: a route, or the reply that refuses it.
    fn rcpt(&mut self, from: &str, rcpt: &str) -> Result<Self::Route, Reply>;
    /// Is lent a complete message and answers the end of DATA. A handler
    /// that keeps `data` takes it (`std::mem::take`); what it leaves, the
    /// session reuses for its next message.
    fn message(&mut self, envelope: Envelope<Self::Route>, data: &mut Vec<u8>) -> Reply;
    /// Checks AUTH credentials; true if they are good.
    fn auth(&mut self, user: &str, password: &str) -> bool;
}

/// Limits and names a session works with.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// Our host name, in the greeting and EHLO reply.
    pub hostname: String,
    /// Largest message in octets, advertised with SIZE.
    pub max_message_size: usize,
    /// Most recipients in one transaction.
    pub max_recipients: usize,
    /// Offer STARTTLS (the listener has a certificate).
    pub starttls: bool,
    /// Offer AUTH PLAIN and LOGIN (there are users to check against).
    pub auth: bool,
    /// Offer AUTH before TLS too.
    pub auth_plaintext: bool,
    /// After this many bad commands: 421 and close (0: no limit).
    pub max_bad_commands: usize,
    /// After this many recipients refused with 5xx since the last message
    /// accepted: 421 and close (0: no limit). Bounds what a client may
    /// probe, and log, per session.
    pub max_refused_recipients: usize,
}

/// Replies that count as a bad command towards `max_bad_commands`.
fn is_bad_command(code: u16) -> bool {
    matches!(code, 500..=504 | 530 | 535 | 538 | 555)
}

/// How much of the input [`Session::feed`] used and whether to hang up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    /// Octets of the input that were used; the rest is an incomplete line.
    pub consumed: usize,
    /// The session is over: send the replies, then close.
    pub close: bool,
    /// STARTTLS was accepted: send the replies, then start TLS. Input after
    /// the command was consumed and must be dropped (RFC 3207 §6).
    pub starttls: bool,
    /// At least one line ended (a command, an AUTH response, the end of an
    /// over-long line or of the data): what restarts the command deadline.
    /// Octets of a line still open do not.
    pub line_ended: bool,
    /// A DATA command was answered 354, or a BDAT chunk began, in this
    /// input: message data started (the last may have ended just before).
    pub data_started: bool,
}

/// Where an AUTH exchange stands, between 334 challenges.
enum AuthStep {
    /// AUTH PLAIN without an initial response: waiting for it.
    Plain,
    /// AUTH LOGIN: waiting for the user name.
    LoginUser,
    /// AUTH LOGIN: waiting for the password of this user.
    LoginPassword(String),
}

enum Phase {
    Commands,
    /// Skipping the rest of an over-long command line.
    Discarding,
    Data(Box<DataDecoder>),
    /// Inside a BDAT chunk of `size` octets, `left` of them still to come;
    /// with the reply it gets instead of being taken, if it is refused
    /// (its octets are read and dropped).
    Chunk {
        size: u64,
        left: u64,
        last: bool,
        refusal: Option<Reply>,
    },
    /// Inside an AUTH exchange: the next line is a base64 response.
    Auth(AuthStep),
    Closed,
}

/// One SMTP server session.
pub struct Session<R> {
    cfg: SessionConfig,
    phase: Phase,
    helo: Option<String>,
    /// The client greeted with EHLO, not HELO.
    ehlo: bool,
    envelope: Option<Envelope<R>>,
    /// The message of this transaction so far, once BDAT started it.
    chunks: Option<Box<DataDecoder>>,
    tls: bool,
    tls_required: bool,
    user: Option<String>,
    bad_commands: usize,
    refused_recipients: usize,
    /// Sent after the reply being answered, then the session closes.
    close_with: Option<Reply>,
    /// The last message's buffer, emptied, for the next one: of at most
    /// [`KEPT_BUFFER`] octets' capacity, so that one large message does
    /// not hold its memory for the rest of the session.
    spare: Vec<u8>,
}

/// The largest message buffer a session keeps for its next message.
const KEPT_BUFFER: usize = 128 * 1024;

impl<R> Session<R> {
    /// A new session, before the greeting.
    pub fn new(cfg: SessionConfig) -> Session<R> {
        Session {
            cfg,
            phase: Phase::Commands,
            helo: None,
            ehlo: false,
            envelope: None,
            chunks: None,
            tls: false,
            tls_required: false,
            user: None,
            bad_commands: 0,
            refused_recipients: 0,
            close_with: None,
            spare: Vec::new(),
        }
    }

    /// This client must start TLS before MAIL (530 5.7.0 otherwise).
    pub fn require_tls(&mut self, required: bool) {
        self.tls_required = required;
    }

    /// TLS is now running: the client must greet again (RFC 3207 §4.2).
    pub fn tls_started(&mut self) {
        self.tls = true;
        self.helo = None;
        self.reset();
    }

    /// The user this session authenticated as, if it did.
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    fn auth_offered(&self) -> bool {
        self.cfg.auth && (self.tls || self.cfg.auth_plaintext)
    }

    /// The 220 greeting to send when the client connects.
    pub fn greeting(&self) -> Reply {
        Reply::new(220, format!("{} ESMTP mm4relay", self.cfg.hostname))
    }

    /// True while message data is being received (DATA, or a BDAT chunk).
    pub fn in_data(&self) -> bool {
        matches!(self.phase, Phase::Data(_) | Phase::Chunk { .. })
    }

    /// True while a message is under way: data being received, or BDAT
    /// chunks taken and the last still to come.
    pub fn in_message(&self) -> bool {
        self.in_data() || self.chunks.is_some()
    }

    /// Ends the transaction, if one is open.
    fn reset(&mut self) {
        self.envelope = None;
        self.chunks = None;
    }

    /// Processes every complete command or data line in `input`, appending
    /// replies to `out`.
    pub fn feed<H: Handler<Route = R>>(
        &mut self,
        input: &[u8],
        handler: &mut H,
        out: &mut Vec<u8>,
    ) -> Progress {
        let mut pos = 0;
        let mut line_ended = false;
        let mut data_started = false;
        let more = |consumed, line_ended, data_started| Progress {
            consumed,
            close: false,
            starttls: false,
            line_ended,
            data_started,
        };
        loop {
            let rest = &input[pos..];
            match &mut self.phase {
                Phase::Closed => {
                    return Progress {
                        consumed: input.len(),
                        close: true,
                        starttls: false,
                        line_ended,
                        data_started,
                    };
                }
                Phase::Data(decoder) => match decoder.feed(rest) {
                    None => {
                        return more(input.len(), line_ended, data_started);
                    }
                    Some(n) => {
                        pos += n;
                        line_ended = true;
                        let Phase::Data(decoder) =
                            std::mem::replace(&mut self.phase, Phase::Commands)
                        else {
                            unreachable!("matched Data above")
                        };
                        let reply = self.end_of_data(decoder.finish(), handler);
                        reply.write_to(out);
                    }
                },
                Phase::Chunk { left, .. } => {
                    let take = (*left).min(rest.len() as u64) as usize;
                    *left -= take as u64;
                    let done = *left == 0;
                    if let (Some(d), Phase::Chunk { refusal: None, .. }) =
                        (self.chunks.as_mut(), &self.phase)
                    {
                        d.feed(&rest[..take]);
                    }
                    pos += take;
                    if !done {
                        return more(input.len(), line_ended, data_started);
                    }
                    line_ended = true;
                    let Phase::Chunk {
                        size,
                        last,
                        refusal,
                        ..
                    } = std::mem::replace(&mut self.phase, Phase::Commands)
                    else {
                        unreachable!("matched Chunk above")
                    };
                    let reply = self.end_of_chunk(size, last, refusal, handler);
                    self.answer(reply, out);
                }
                Phase::Discarding => match rest.iter().position(|&b| b == b'\n') {
                    None => {
                        return more(input.len(), line_ended, data_started);
                    }
                    Some(n) => {
                        pos += n + 1;
                        line_ended = true;
                        self.phase = Phase::Commands;
                    }
                },
                Phase::Commands => {
                    let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
                        if rest.len() >= MAX_COMMAND_LINE {
                            // Counted as a bad command wherever TCP cut it.
                            self.phase = Phase::Discarding;
                            self.close_if_bdat(rest);
                            self.answer(Reply::new(500, "5.5.2 line too long"), out);
                            continue;
                        }
                        return more(pos, line_ended, data_started);
                    };
                    pos += nl + 1;
                    line_ended = true;
                    let mut starttls = false;
                    let reply = if nl + 1 > MAX_COMMAND_LINE {
                        Reply::new(500, "5.5.2 line too long")
                    } else if nl == 0 || rest[nl - 1] != b'\r' {
                        Reply::new(500, "5.5.2 lines must end with CRLF")
                    } else {
                        match Command::parse(&rest[..nl - 1]) {
                            Ok(Command::StartTls) => {
                                let reply = self.starttls();
                                starttls = reply.code == 220;
                                reply
                            }
                            Ok(Command::Bdat { size, last }) => match self.bdat(size, last) {
                                // The reply comes after the chunk.
                                None => {
                                    data_started = true;
                                    continue;
                                }
                                Some(reply) => reply,
                            },
                            Ok(cmd) => self.command(cmd, handler),
                            Err(e) => e.reply(),
                        }
                    };
                    // A BDAT line answered now is one we could not take:
                    // its chunk's octets must not be read as commands.
                    self.close_if_bdat(&rest[..=nl]);
                    data_started |= reply.code == 354;
                    self.answer(reply, out);
                    if starttls {
                        return Progress {
                            consumed: input.len(),
                            close: false,
                            starttls: true,
                            line_ended,
                            data_started,
                        };
                    }
                }
                Phase::Auth(_) => {
                    let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
                        if rest.len() >= MAX_COMMAND_LINE {
                            self.phase = Phase::Discarding;
                            self.answer(Reply::new(500, "5.5.2 line too long"), out);
                            continue;
                        }
                        return more(pos, line_ended, data_started);
                    };
                    pos += nl + 1;
                    line_ended = true;
                    let line = &rest[..nl];
                    let line = line.strip_suffix(b"\r").unwrap_or(line);
                    let Phase::Auth(step) = std::mem::replace(&mut self.phase, Phase::Commands)
                    else {
                        unreachable!("matched Auth above")
                    };
                    let reply = self.auth_step(step, line, handler);
                    self.answer(reply, out);
                }
            }
        }
    }

    /// After a reply to a line that began as a BDAT command but could not
    /// be taken (bad syntax, a control character, bare LF, too long):
    /// where its chunk ends is unknown, so the session closes.
    fn close_if_bdat(&mut self, line: &[u8]) {
        let bdat = line.len() > 4
            && line[..4].eq_ignore_ascii_case(b"BDAT")
            && matches!(line[4], b' ' | b'\t' | b'\r' | b'\n');
        if bdat && self.close_with.is_none() {
            self.close_with = Some(Reply::new(421, "4.5.0 BDAT not understood, closing"));
        }
    }

    /// Writes a reply; counts bad commands and closes after too many.
    fn answer(&mut self, reply: Reply, out: &mut Vec<u8>) {
        reply.write_to(out);
        if let Some(bye) = self.close_with.take() {
            bye.write_to(out);
            self.phase = Phase::Closed;
            return;
        }
        if is_bad_command(reply.code) {
            self.bad_commands += 1;
            let max = self.cfg.max_bad_commands;
            if max > 0 && self.bad_commands >= max {
                Reply::new(421, "4.7.0 too many bad commands, closing").write_to(out);
                self.phase = Phase::Closed;
            }
        }
    }

    /// Counts a recipient the handler refused: after too many, the reply
    /// is followed by a 421 and the session closes.
    fn refused(&mut self, reply: Reply) -> Reply {
        if reply.code >= 500 {
            self.refused_recipients += 1;
            let max = self.cfg.max_refused_recipients;
            if max > 0 && self.refused_recipients >= max {
                self.close_with = Some(Reply::new(
                    421,
                    "4.7.0 too many refused recipients, closing",
                ));
            }
        }
        reply
    }

    fn starttls(&mut self) -> Reply {
        if !self.cfg.starttls {
            Reply::new(502, "5.5.1 STARTTLS not offered")
        } else if self.tls {
            Reply::new(503, "5.5.1 TLS already active")
        } else if self.envelope.is_some() {
            Reply::new(503, "5.5.1 STARTTLS inside a transaction")
        } else {
            Reply::new(220, "2.0.0 ready to start TLS")
        }
    }

    fn auth_start<H: Handler<Route = R>>(
        &mut self,
        mechanism: &str,
        initial: Option<String>,
        handler: &mut H,
    ) -> Reply {
        if !self.cfg.auth {
            return Reply::new(502, "5.5.1 AUTH not offered");
        }
        if !self.auth_offered() {
            return Reply::new(538, "5.7.11 encryption required for authentication");
        }
        if self.helo.is_none() {
            return Reply::new(503, "5.5.1 send EHLO first");
        }
        if self.user.is_some() {
            return Reply::new(503, "5.5.1 already authenticated");
        }
        if self.envelope.is_some() {
            return Reply::new(503, "5.5.1 AUTH inside a transaction");
        }
        match (mechanism, initial) {
            ("PLAIN", Some(response)) => {
                self.auth_step(AuthStep::Plain, response.as_bytes(), handler)
            }
            ("PLAIN", None) => {
                self.phase = Phase::Auth(AuthStep::Plain);
                Reply::new(334, "")
            }
            ("LOGIN", Some(response)) => {
                self.auth_step(AuthStep::LoginUser, response.as_bytes(), handler)
            }
            ("LOGIN", None) => {
                self.phase = Phase::Auth(AuthStep::LoginUser);
                Reply::new(334, "VXNlcm5hbWU6")
            }
            _ => Reply::new(504, "5.5.4 mechanism not supported; PLAIN or LOGIN"),
        }
    }

    /// One base64 response of an AUTH exchange.
    fn auth_step<H: Handler<Route = R>>(
        &mut self,
        step: AuthStep,
        line: &[u8],
        handler: &mut H,
    ) -> Reply {
        use base64::Engine as _;
        if line == b"*" {
            return Reply::new(501, "5.7.0 authentication cancelled");
        }
        let decoded = if line == b"=" {
            Ok(Vec::new())
        } else {
            base64::engine::general_purpose::STANDARD.decode(line)
        };
        let Ok(decoded) = decoded else {
            return Reply::new(501, "5.5.2 cannot decode the response");
        };
        let (user, password) = match step {
            AuthStep::Plain => {
                let mut parts = decoded.split(|&b| b == 0);
                let (Some(authz), Some(user), Some(password), None) =
                    (parts.next(), parts.next(), parts.next(), parts.next())
                else {
                    return Reply::new(501, "5.5.2 malformed PLAIN response");
                };
                if !authz.is_empty() && authz != user {
                    return Reply::new(535, "5.7.8 authentication credentials invalid");
                }
                (user.to_vec(), password.to_vec())
            }
            AuthStep::LoginUser => {
                let Ok(user) = String::from_utf8(decoded) else {
                    return Reply::new(501, "5.5.2 user name is not UTF-8");
                };
                self.phase = Phase::Auth(AuthStep::LoginPassword(user));
                return Reply::new(334, "UGFzc3dvcmQ6");
            }
            AuthStep::LoginPassword(user) => (user.into_bytes(), decoded),
        };
        let (Ok(user), Ok(password)) = (String::from_utf8(user), String::from_utf8(password))
        else {
            return Reply::new(535, "5.7.8 authentication credentials invalid");
        };
        if handler.auth(&user, &password) {
            self.user = Some(user);
            Reply::new(235, "2.7.0 authentication successful")
        } else {
            Reply::new(535, "5.7.8 authentication credentials invalid")
        }
    }

    fn command<H: Handler<Route = R>>(&mut self, cmd: Command, handler: &mut H) -> Reply {
        match cmd {
            Command::Ehlo(domain) => {
                self.helo = Some(domain);
                self.ehlo = true;
                self.reset();
                let mut lines = vec![
                    self.cfg.hostname.clone(),
                    "PIPELINING".into(),
                    format!("SIZE {}", self.cfg.max_message_size),
                    "8BITMIME".into(),
                    "ENHANCEDSTATUSCODES".into(),
                    "CHUNKING".into(),
                ];
                if self.cfg.starttls && !self.tls {
                    lines.push("STARTTLS".into());
                }
                if self.auth_offered() && self.user.is_none() {
                    lines.push("AUTH PLAIN LOGIN".into());
                }
                Reply { code: 250, lines }
            }
            Command::Helo(domain) => {
                self.helo = Some(domain);
                self.ehlo = false;
                self.reset();
                Reply::new(250, self.cfg.hostname.clone())
            }
            Command::Mail { from, params } => {
                let Some(helo) = &self.helo else {
                    return Reply::new(503, "5.5.1 send EHLO first");
                };
                if self.envelope.is_some() {
                    return Reply::new(503, "5.5.1 nested MAIL command");
                }
                if self.tls_required && !self.tls {
                    return Reply::new(530, "5.7.0 must issue a STARTTLS command first");
                }
                if params
                    .size
                    .is_some_and(|s| s > self.cfg.max_message_size as u64)
                {
                    return Reply::new(552, "5.3.4 message size exceeds fixed limit");
                }
                let protocol = match (self.ehlo, self.tls, self.user.is_some()) {
                    (false, _, _) => "SMTP",
                    (true, false, false) => "ESMTP",
                    (true, true, false) => "ESMTPS",
                    (true, false, true) => "ESMTPA",
                    (true, true, true) => "ESMTPSA",
                };
                self.envelope = Some(Envelope {
                    helo: helo.clone(),
                    protocol,
                    from,
                    params,
                    rcpts: Vec::new(),
                });
                Reply::new(250, "2.1.0 sender ok")
            }
            Command::Rcpt(to) => {
                let Some(env) = &mut self.envelope else {
                    return Reply::new(503, "5.5.1 need MAIL before RCPT");
                };
                if self.chunks.is_some() {
                    // Part of the message is in: its recipients are fixed.
                    return Reply::new(503, "5.5.1 RCPT after BDAT");
                }
                if env.rcpts.len() >= self.cfg.max_recipients {
                    return Reply::new(452, "4.5.3 too many recipients");
                }
                match handler.rcpt(&env.from, &to) {
                    Ok(route) => {
                        env.rcpts.push((to, route));
                        Reply::new(250, "2.1.5 recipient ok")
                    }
                    Err(reply) => self.refused(reply),
                }
            }
            Command::Data => match &self.envelope {
                None => Reply::new(503, "5.5.1 need MAIL before DATA"),
                // RFC 3030 §3: not both in one transaction.
                Some(_) if self.chunks.is_some() => {
                    self.reset();
                    Reply::new(503, "5.5.1 DATA after BDAT")
                }
                Some(env) if env.rcpts.is_empty() => {
                    self.envelope = None;
                    Reply::new(554, "5.5.1 no valid recipients")
                }
                Some(_) => {
                    let (max, buf) = (self.cfg.max_message_size, std::mem::take(&mut self.spare));
                    self.phase = Phase::Data(Box::new(DataDecoder::reusing(max, buf)));
                    Reply::new(354, "end data with <CR><LF>.<CR><LF>")
                }
            },
            Command::Rset => {
                self.reset();
                Reply::new(250, "2.0.0 reset")
            }
            // `feed` takes BDAT itself: its reply comes after its octets.
            Command::Bdat { .. } => Reply::new(503, "5.5.1 BDAT out of place"),
            Command::Noop => Reply::new(250, "2.0.0 ok"),
            Command::Vrfy => Reply::new(252, "2.5.0 cannot VRFY user, but will accept message"),
            Command::Help => Reply::new(214, "2.0.0 see RFC 5321"),
            Command::StartTls => self.starttls(),
            Command::Auth { mechanism, initial } => self.auth_start(&mechanism, initial, handler),
            Command::Quit => {
                self.phase = Phase::Closed;
                self.reset();
                Reply::new(
                    221,
                    format!("2.0.0 {} closing connection", self.cfg.hostname),
                )
            }
        }
    }

    /// A BDAT line: the chunk that follows is read (`None`), into the
    /// message or to be dropped with the reply it will get; or it cannot
    /// be read at all (larger than any message may be), and the reply
    /// closes the session.
    fn bdat(&mut self, size: u64, last: bool) -> Option<Reply> {
        if size > self.cfg.max_message_size as u64 {
            // Not worth reading, and nothing after it can be trusted to
            // be a command.
            self.close_with = Some(Reply::new(421, "4.3.4 closing after an oversized chunk"));
            return Some(Reply::new(552, "5.3.4 message size exceeds fixed limit"));
        }
        let refusal = match &self.envelope {
            None => Some(Reply::new(503, "5.5.1 need MAIL before BDAT")),
            Some(env) if env.rcpts.is_empty() => {
                self.reset();
                Some(Reply::new(554, "5.5.1 no valid recipients"))
            }
            Some(_) => {
                let max = self.cfg.max_message_size;
                if self.chunks.is_none() {
                    let buf = std::mem::take(&mut self.spare);
                    self.chunks = Some(Box::new(DataDecoder::chunks_reusing(max, buf)));
                }
                None
            }
        };
        self.phase = Phase::Chunk {
            size,
            left: size,
            last,
            refusal,
        };
        None
    }

    /// The reply to a chunk once all its octets are in: 250 for one of
    /// several, the message's answer for the last.
    fn end_of_chunk<H: Handler<Route = R>>(
        &mut self,
        size: u64,
        last: bool,
        refusal: Option<Reply>,
        handler: &mut H,
    ) -> Reply {
        if let Some(reply) = refusal {
            return reply;
        }
        if let Some(fault) = self.chunks.as_ref().and_then(|d| d.fault()) {
            // Said at once, not after the last chunk: the client need not
            // send the rest of a message that cannot be taken.
            self.reset();
            return fault_reply(fault);
        }
        if !last {
            return Reply::new(250, format!("2.0.0 {size} octets received"));
        }
        match (self.chunks.take(), &self.envelope) {
            (Some(d), Some(_)) => self.end_of_data(d.finish(), handler),
            _ => Reply::new(503, "5.5.1 need MAIL before BDAT"),
        }
    }

    fn end_of_data<H: Handler<Route = R>>(
        &mut self,
        data: Result<Vec<u8>, DataFault>,
        handler: &mut H,
    ) -> Reply {
        let env = self.envelope.take().expect("DATA phase has an envelope");
        match data {
            Ok(mut data) => {
                let reply = handler.message(env, &mut data);
                if data.capacity() <= KEPT_BUFFER {
                    data.clear();
                    self.spare = data;
                }
                if reply.code == 250 {
                    // Postfix's rule: errors count until mail is delivered.
                    self.refused_recipients = 0;
                }
                reply
            }
            Err(fault) => fault_reply(fault),
        }
    }
}

/// The reply to a message that cannot be taken for `fault`.
fn fault_reply(fault: DataFault) -> Reply {
    match fault {
        DataFault::TooBig => Reply::new(552, "5.3.4 message size exceeds fixed limit"),
        fault => Reply::new(554, format!("5.6.0 {fault}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Routes `*@ok` to 1, refuses everything else; keeps what it got
    /// (a copy when `copy`, leaving the session its buffer).
    #[derive(Default)]
    struct Recorder {
        messages: Vec<(Envelope<u8>, Vec<u8>)>,
        copy: bool,
    }

    impl Handler for Recorder {
        type Route = u8;
        fn rcpt(&mut self, _from: &str, rcpt: &str) -> Result<u8, Reply> {
            if rcpt.ends_with("@ok") {
                Ok(1)
            } else {
                Err(Reply::new(550, "5.1.2 unroutable"))
            }
        }
        fn message(&mut self, envelope: Envelope<u8>, data: &mut Vec<u8>) -> Reply {
            let data = if self.copy {
                data.clone()
            } else {
                std::mem::take(data)
            };
            self.messages.push((envelope, data));
            Reply::new(250, "2.0.0 queued")
        }
        fn auth(&mut self, user: &str, password: &str) -> bool {
            user == "bob" && password == "secret"
        }
    }

    fn session() -> Session<u8> {
        session_of(100)
    }

    fn session_of(max_message_size: usize) -> Session<u8> {
        Session::new(SessionConfig {
            hostname: "relay.test".into(),
            max_message_size,
            max_recipients: 2,
            starttls: false,
            auth: false,
            auth_plaintext: false,
            max_bad_commands: 0,
            max_refused_recipients: 0,
        })
    }

    /// Feeds `input` in two pieces cut at `cut`, as a listener would.
    fn run(input: &[u8], cut: usize) -> (String, Recorder, bool) {
        let mut s = session();
        let mut h = Recorder::default();
        let mut out = Vec::new();
        let mut buf = input[..cut].to_vec();
        let p = s.feed(&buf, &mut h, &mut out);
        buf.drain(..p.consumed);
        buf.extend_from_slice(&input[cut..]);
        let p = s.feed(&buf, &mut h, &mut out);
        (String::from_utf8(out).unwrap(), h, p.close)
    }

    fn codes(replies: &str) -> Vec<&str> {
        replies
            .lines()
            .filter(|l| l.as_bytes().get(3) == Some(&b' '))
            .map(|l| &l[..3])
            .collect()
    }

    /// A buffer the handler leaves is the next message's, emptied: DATA
    /// after DATA, BDAT after DATA and DATA after BDAT each hold only
    /// their own octets. One over KEPT_BUFFER is not kept.
    #[test]
    fn a_message_buffer_the_handler_leaves_is_reused_empty() {
        let mut s = session_of(1 << 20);
        let mut h = Recorder {
            copy: true,
            ..Recorder::default()
        };
        let mut out = Vec::new();
        let long = "x".repeat(900) + "\r\n";
        let big = long.repeat(KEPT_BUFFER / long.len() + 1);
        let input = format!(
            "EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@ok>\r\nDATA\r\n{long}.\r\n\
             MAIL FROM:<a@b>\r\nRCPT TO:<x@ok>\r\nBDAT 3 LAST\r\nz\r\n\
             MAIL FROM:<a@b>\r\nRCPT TO:<x@ok>\r\nDATA\r\ny\r\n.\r\n"
        );
        s.feed(input.as_bytes(), &mut h, &mut out);
        let got: Vec<&[u8]> = h.messages.iter().map(|(_, d)| &d[..]).collect();
        assert_eq!(got, [long.as_bytes(), b"z\r\n", b"y\r\n"]);
        // Kept, empty, and the very buffer the next message is read into.
        assert!(s.spare.is_empty() && s.spare.capacity() >= 16 * 1024);
        let kept = s.spare.as_ptr();
        let input = b"MAIL FROM:<a@b>\r\nRCPT TO:<x@ok>\r\nDATA\r\nw\r\n.\r\n";
        s.feed(input, &mut h, &mut out);
        assert_eq!(h.messages[3].1, b"w\r\n");
        assert_eq!(s.spare.as_ptr(), kept, "the same buffer again");
        let input = format!("MAIL FROM:<a@b>\r\nRCPT TO:<x@ok>\r\nDATA\r\n{big}.\r\n");
        s.feed(input.as_bytes(), &mut h, &mut out);
        assert_eq!(h.messages.len(), 5);
        assert_eq!(h.messages[4].1, big.as_bytes());
        assert_eq!(s.spare.capacity(), 0, "too large to keep");
    }

    #[test]
    fn bdat_chunks_make_one_message_at_every_cut() {
        // Two chunks, the second one LAST, then a second message in one
        // LAST chunk; dots and a command-like line are only data.
        let input = b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@ok>\r\nBDAT 7\r\nhi\r\n.\r\nBDAT 11 LAST\r\nQUIT\r\n..x\r\n\
                      MAIL FROM:<c@d>\r\nRCPT TO:<y@ok>\r\nBDAT 5 LAST\r\nz\r\n\r\nQUIT\r\n";
        for cut in 0..=input.len() {
            let (out, h, close) = run(input, cut);
            assert_eq!(
                codes(&out),
                [
                    "250", "250", "250", "250", "250", "250", "250", "250", "221"
                ],
                "cut {cut}: {out}"
            );
            assert!(out.contains("250 2.0.0 7 octets received"), "{out}");
            assert!(out.contains("CHUNKING"), "{out}");
            assert!(close);
            assert_eq!(h.messages.len(), 2, "cut {cut}");
            assert_eq!(h.messages[0].1, b"hi\r\n.\r\nQUIT\r\n..x\r\n");
            assert_eq!(h.messages[1].0.from, "c@d");
            assert_eq!(h.messages[1].1, b"z\r\n\r\n");
        }
    }

    #[test]
    fn bdat_refused_chunks_are_read_and_dropped() {
        // No MAIL; no valid recipient; DATA after BDAT; a bare LF; too big
        // in all (the limit is 100). Each chunk's octets are skipped, and
        // the session goes on.
        let big = "x".repeat(60);
        let input = format!(
            "EHLO c\r\nBDAT 4 LAST\r\nNOOPMAIL FROM:<a@b>\r\nRCPT TO:<x@no>\r\nBDAT 4 LAST\r\nNOOP\
             MAIL FROM:<a@b>\r\nRCPT TO:<x@ok>\r\nBDAT 2\r\nabDATA\r\n\
             MAIL FROM:<a@b>\r\nRCPT TO:<x@ok>\r\nBDAT 3 LAST\r\na\nb\
             MAIL FROM:<a@b>\r\nRCPT TO:<x@ok>\r\nBDAT 60\r\n{big}BDAT 60 LAST\r\n{big}NOOP\r\n"
        );
        let (out, h, close) = run(input.as_bytes(), 0);
        assert_eq!(
            codes(&out),
            [
                "250", "503", "250", "550", "554", "250", "250", "250", "503", "250", "250", "554",
                "250", "250", "250", "552", "250"
            ],
            "{out}"
        );
        assert!(out.contains("503 5.5.1 DATA after BDAT"), "{out}");
        assert!(out.contains("554 5.6.0 bare LF"), "{out}");
        assert!(h.messages.is_empty());
        assert!(!close);
    }

    #[test]
    fn bdat_fixes_the_recipients_and_stops_a_failed_message_at_once() {
        // RCPT after a chunk: 503. A bare LF in a chunk: that chunk is
        // answered 554 and the transaction is over (the LAST chunk after
        // it needs MAIL again).
        let input =
            b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@ok>\r\nBDAT 3\r\nabcRCPT TO:<y@ok>\r\n\
                      BDAT 2\r\nc\nBDAT 2 LAST\r\nde";
        let (out, h, close) = run(input, 0);
        assert_eq!(
            codes(&out),
            ["250", "250", "250", "250", "503", "554", "503"],
            "{out}"
        );
        assert!(out.contains("503 5.5.1 RCPT after BDAT"), "{out}");
        assert!(h.messages.is_empty() && !close);
    }

    #[test]
    fn a_long_line_that_starts_as_bdat_closes_the_session() {
        let mut input = b"EHLO c\r\nBDAT 1".to_vec();
        input.extend(std::iter::repeat_n(b'0', MAX_COMMAND_LINE));
        input.extend_from_slice(b"\r\nNOOP\r\n");
        let (out, _, close) = run(&input, 0);
        assert_eq!(codes(&out), ["250", "500", "421"], "{out}");
        assert!(close);
    }

    #[test]
    fn bdat_that_cannot_be_read_closes_the_session() {
        for (line, code) in [
            ("BDAT x LAST\r\n", "501"),
            ("BDAT 99999999999999999999\r\n", "501"),
            ("BDAT 101 LAST\r\n", "552"),
            // Not a command we can take, whatever the reason: bare LF,
            // a control character, a tab.
            ("BDAT 4 LAST\n", "500"),
            ("BDAT 4 LAST\x01\r\n", "501"),
            ("bdat\t4\r\n", "501"),
        ] {
            let input = format!("EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@ok>\r\n{line}NOOP\r\n");
            let (out, h, close) = run(input.as_bytes(), 0);
            assert!(close, "{line}: {out}");
            assert_eq!(codes(&out)[3..], [code, "421"][..], "{line}: {out}");
            assert!(!out.contains("NOOP") && h.messages.is_empty());
        }
    }

    #[test]
    fn pipelined_transaction_at_every_cut() {
        let input = b"EHLO c\r\nMAIL FROM:<a@b> SIZE=20\r\nRCPT TO:<x@ok>\r\nRCPT TO:<y@no>\r\nDATA\r\nhi\r\n..dot\r\n.\r\nQUIT\r\n";
        for cut in 0..=input.len() {
            let (out, h, close) = run(input, cut);
            assert_eq!(
                codes(&out),
                ["250", "250", "250", "550", "354", "250", "221"],
                "cut {cut}"
            );
            assert!(close);
            assert_eq!(h.messages.len(), 1);
            let (env, data) = &h.messages[0];
            assert_eq!(env.rcpts, vec![("x@ok".to_string(), 1)]);
            assert_eq!(data, b"hi\r\n.dot\r\n");
        }
    }

    #[test]
    fn sequence_errors() {
        let (out, h, _) = run(b"MAIL FROM:<a@b>\r\nHELO c\r\nRCPT TO:<x@ok>\r\nDATA\r\nMAIL FROM:<a@b>\r\nMAIL FROM:<a@b>\r\nDATA\r\n", 0);
        assert_eq!(
            codes(&out),
            ["503", "250", "503", "503", "250", "503", "554"]
        );
        assert!(h.messages.is_empty());
    }

    #[test]
    fn size_and_recipient_limits() {
        let (out, _, _) = run(
            b"EHLO c\r\nMAIL FROM:<a@b> SIZE=101\r\nRCPT TO:<x@ok>\r\n",
            0,
        );
        assert_eq!(codes(&out), ["250", "552", "503"]);
        let (out, _, _) = run(
            b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@ok>\r\nRCPT TO:<y@ok>\r\nRCPT TO:<z@ok>\r\n",
            0,
        );
        assert_eq!(codes(&out), ["250", "250", "250", "250", "452"]);
        let mut big = b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@ok>\r\nDATA\r\n".to_vec();
        big.extend_from_slice(&[b'x'; 150]);
        big.extend_from_slice(b"\r\n.\r\nNOOP\r\n");
        let (out, h, _) = run(&big, 0);
        assert_eq!(codes(&out), ["250", "250", "250", "354", "552", "250"]);
        assert!(h.messages.is_empty());
    }

    #[test]
    fn bare_lf_and_long_lines() {
        let (out, _, _) = run(b"EHLO c\nNOOP\r\n", 0);
        assert_eq!(codes(&out), ["500", "250"]);
        let mut long = vec![b'N'; MAX_COMMAND_LINE + 10];
        long.extend_from_slice(b"\r\nNOOP\r\n");
        for cut in [0, 10, MAX_COMMAND_LINE, long.len()] {
            let (out, _, _) = run(&long, cut);
            assert_eq!(codes(&out), ["500", "250"], "cut {cut}");
        }
        let (out, h, _) =
            run(b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@ok>\r\nDATA\r\nx\n.\nMAIL FROM:<e@f>\r\n.\r\n", 0);
        assert_eq!(codes(&out), ["250", "250", "250", "354", "554"]);
        assert!(out.contains("bare LF"));
        assert!(h.messages.is_empty());
    }

    fn secure_session(plaintext: bool, max_bad: usize) -> Session<u8> {
        Session::new(SessionConfig {
            starttls: true,
            auth: true,
            auth_plaintext: plaintext,
            max_bad_commands: max_bad,
            ..session().cfg
        })
    }

    fn feed_all(s: &mut Session<u8>, h: &mut Recorder, input: &[u8]) -> (String, Progress) {
        let mut out = Vec::new();
        let p = s.feed(input, h, &mut out);
        (String::from_utf8(out).unwrap(), p)
    }

    #[test]
    fn starttls_drops_pipelined_input_and_resets() {
        let mut s = secure_session(false, 0);
        s.require_tls(true);
        let mut h = Recorder::default();
        let (out, p) = feed_all(&mut s, &mut h, b"EHLO c\r\nMAIL FROM:<a@b>\r\n");
        assert!(out.contains("STARTTLS") && !out.contains("AUTH"), "{out}");
        assert_eq!(codes(&out), ["250", "530"]);
        assert!(!p.starttls);
        // Commands after STARTTLS in the same packet must not be obeyed.
        let input = b"STARTTLS\r\nMAIL FROM:<evil@x>\r\n";
        let (out, p) = feed_all(&mut s, &mut h, input);
        assert_eq!(codes(&out), ["220"]);
        assert!(p.starttls && !p.close);
        assert_eq!(p.consumed, input.len());
        s.tls_started();
        let (out, _) = feed_all(
            &mut s,
            &mut h,
            b"MAIL FROM:<a@b>\r\nEHLO c\r\nSTARTTLS\r\nMAIL FROM:<a@b>\r\n",
        );
        assert_eq!(codes(&out), ["503", "250", "503", "250"]);
        assert!(
            !out.contains("STARTTLS\r\n") && out.contains("AUTH PLAIN LOGIN"),
            "{out}"
        );
    }

    #[test]
    fn auth_plain_and_login() {
        let mut s = secure_session(true, 0);
        let mut h = Recorder::default();
        // \0bob\0secret, then the LOGIN exchange after a failure.
        let (out, _) = feed_all(
            &mut s,
            &mut h,
            b"EHLO c\r\nAUTH PLAIN AGJvYgB3cm9uZw==\r\nAUTH CRAM-MD5\r\nAUTH LOGIN\r\nYm9i\r\nc2VjcmV0\r\nAUTH PLAIN\r\n",
        );
        assert_eq!(
            codes(&out),
            ["250", "535", "504", "334", "334", "235", "503"]
        );
        assert_eq!(s.user(), Some("bob"));
        let mut s = secure_session(true, 0);
        let (out, _) = feed_all(
            &mut s,
            &mut h,
            b"EHLO c\r\nAUTH PLAIN\r\nAGJvYgBzZWNyZXQ=\r\n",
        );
        assert_eq!(codes(&out), ["250", "334", "235"]);
        let mut s = secure_session(true, 0);
        let (out, _) = feed_all(
            &mut s,
            &mut h,
            b"EHLO c\r\nAUTH LOGIN\r\n*\r\nAUTH PLAIN !!!\r\n",
        );
        assert_eq!(codes(&out), ["250", "334", "501", "501"]);
        assert_eq!(s.user(), None);
        // Not before TLS unless allowed.
        let mut s = secure_session(false, 0);
        let (out, _) = feed_all(&mut s, &mut h, b"EHLO c\r\nAUTH PLAIN AGJvYgBzZWNyZXQ=\r\n");
        assert_eq!(codes(&out), ["250", "538"]);
    }

    #[test]
    fn too_many_bad_commands_close_with_421() {
        let mut s = secure_session(false, 3);
        let mut h = Recorder::default();
        let (out, p) = feed_all(
            &mut s,
            &mut h,
            b"EHLO c\r\nFOO\r\nRCPT TO:<x@ok>\r\nNOOP\r\nBAR\r\nNOOP\r\n",
        );
        assert_eq!(codes(&out), ["250", "500", "503", "250", "500", "421"]);
        assert!(p.close);
    }

    #[test]
    fn refused_recipients_close_the_session_until_mail_is_accepted() {
        let mut s = Session::new(SessionConfig {
            max_refused_recipients: 3,
            max_recipients: 10,
            ..session().cfg
        });
        let mut h = Recorder::default();
        let (out, p) = feed_all(
            &mut s,
            &mut h,
            b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<1@no>\r\nRCPT TO:<2@no>\r\nRCPT TO:<x@ok>\r\nDATA\r\nhi\r\n.\r\n",
        );
        assert_eq!(
            codes(&out),
            ["250", "250", "550", "550", "250", "354", "250"]
        );
        assert!(!p.close);
        // The accepted message cleared the count: three more to close.
        let (out, p) = feed_all(
            &mut s,
            &mut h,
            b"MAIL FROM:<a@b>\r\nRCPT TO:<3@no>\r\nRCPT TO:<4@no>\r\nRCPT TO:<5@no>\r\nRCPT TO:<x@ok>\r\n",
        );
        assert_eq!(codes(&out), ["250", "550", "550", "550", "421"]);
        assert!(p.close);
    }

    #[test]
    fn only_an_ended_line_restarts_the_command_clock() {
        let mut s = session();
        let mut h = Recorder::default();
        let mut out = Vec::new();
        let p = s.feed(b"NOO", &mut h, &mut out);
        assert!(!p.line_ended && p.consumed == 0);
        let p = s.feed(b"NOOP\r\n", &mut h, &mut out);
        assert!(p.line_ended);
        // An over-long line is consumed as it comes, but it has not ended.
        let long = vec![b'x'; MAX_COMMAND_LINE + 1];
        let p = s.feed(&long, &mut h, &mut out);
        assert!(p.consumed == long.len() && !p.line_ended);
        assert!(String::from_utf8_lossy(&out).contains("500 5.5.2 line too long"));
        let p = s.feed(b"xxxx", &mut h, &mut out);
        assert!(p.consumed == 4 && !p.line_ended);
        let p = s.feed(b"x\r\n", &mut h, &mut out);
        assert!(p.line_ended);
    }

    #[test]
    fn a_message_started_behind_the_last_one_is_reported() {
        let mut s = session();
        let mut h = Recorder::default();
        let (_, p) = feed_all(
            &mut s,
            &mut h,
            b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@ok>\r\n",
        );
        assert!(!p.data_started);
        let (_, p) = feed_all(&mut s, &mut h, b"DATA\r\nhi\r\n");
        assert!(p.data_started && s.in_data());
        let (out, p) = feed_all(
            &mut s,
            &mut h,
            b".\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@ok>\r\nDATA\r\nmore",
        );
        assert_eq!(codes(&out), ["250", "250", "250", "354"]);
        assert!(p.data_started && s.in_data(), "the second message started");
    }

    #[test]
    fn an_over_long_line_is_a_bad_command_wherever_it_is_cut() {
        for with_lf in [false, true] {
            let mut s = secure_session(false, 2);
            let mut h = Recorder::default();
            let mut input = vec![b'x'; MAX_COMMAND_LINE + 5];
            if with_lf {
                input.extend_from_slice(b"\r\n");
            }
            let (out, _) = feed_all(&mut s, &mut h, &input);
            assert_eq!(codes(&out), ["500"], "with LF: {with_lf}");
            let (out, p) = feed_all(&mut s, &mut h, b"\r\nFOO\r\n");
            assert!(codes(&out).ends_with(&["421"]), "with LF: {with_lf}: {out}");
            assert!(p.close);
        }
    }

    #[test]
    fn advertises_extensions() {
        let (out, _, _) = run(b"EHLO c\r\nVRFY x\r\nRSET\r\nNOOP\r\n", 0);
        for ext in ["PIPELINING", "SIZE 100", "8BITMIME", "ENHANCEDSTATUSCODES"] {
            assert!(out.contains(ext), "{ext} missing in {out}");
        }
        assert_eq!(codes(&out), ["250", "252", "250", "250"]);
    }

    #[test]
    fn the_envelope_names_the_protocol_as_rfc_3848_does() {
        let mail = b"MAIL FROM:<a@b>\r\nRCPT TO:<x@ok>\r\nDATA\r\nhi\r\n.\r\n";
        let auth = b"AUTH PLAIN AGJvYgBzZWNyZXQ=\r\n";
        for (tls, greet, user, want) in [
            (false, "HELO", false, "SMTP"),
            (true, "HELO", false, "SMTP"),
            (false, "EHLO", false, "ESMTP"),
            (true, "EHLO", false, "ESMTPS"),
            (false, "EHLO", true, "ESMTPA"),
            (true, "EHLO", true, "ESMTPSA"),
        ] {
            let mut s = Session::<u8>::new(SessionConfig {
                auth: true,
                auth_plaintext: true,
                ..session().cfg
            });
            if tls {
                s.tls_started();
            }
            let mut h = Recorder::default();
            let mut input = format!("{greet} c\r\n").into_bytes();
            if user {
                input.extend_from_slice(auth);
            }
            input.extend_from_slice(mail);
            let (out, _) = feed_all(&mut s, &mut h, &input);
            assert_eq!(h.messages.len(), 1, "{greet} tls={tls} auth={user}: {out}");
            assert_eq!(
                h.messages[0].0.protocol, want,
                "{greet} tls={tls} auth={user}"
            );
        }
    }

    #[test]
    fn unimplemented_commands_get_502_and_the_session_goes_on() {
        let (out, _, close) = run(b"EHLO c\r\nEXPN staff\r\nTURN\r\nNOOP\r\n", 0);
        assert_eq!(codes(&out), ["250", "502", "502", "250"]);
        assert!(out.contains("502 5.5.1 EXPN not implemented"), "{out}");
        assert!(!close);
    }
}
