//! SMTP commands (RFC 5321 §4.1): parsed from one line on the server side,
//! formatted on the client side. Extensions honoured: SIZE (RFC 1870),
//! 8BITMIME (RFC 6152) and CHUNKING's BDAT (RFC 3030); PIPELINING needs
//! nothing at this level.

use std::fmt;

use super::reply::Reply;

/// The body type declared with `MAIL FROM: ... BODY=`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BodyType {
    /// No BODY parameter or `BODY=7BIT`.
    #[default]
    SevenBit,
    /// `BODY=8BITMIME`.
    EightBitMime,
}

/// ESMTP parameters of MAIL FROM that we support.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MailParams {
    /// The size the client declares with `SIZE=`.
    pub size: Option<u64>,
    /// The body type declared with `BODY=`.
    pub body: BodyType,
}

/// One command a client may send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// `EHLO domain`.
    Ehlo(String),
    /// `HELO domain`.
    Helo(String),
    /// `MAIL FROM:<path> params`; the path without brackets, `""` for `<>`.
    Mail {
        /// Reverse path, without angle brackets.
        from: String,
        /// Parameters after the path.
        params: MailParams,
    },
    /// `RCPT TO:<path>`; the path without brackets.
    Rcpt(String),
    /// `DATA`.
    Data,
    /// `BDAT size [LAST]` (RFC 3030): `size` octets of message data follow
    /// the line, as they are (no dot-stuffing, no end marker).
    Bdat {
        /// Octets in this chunk.
        size: u64,
        /// The message's last chunk.
        last: bool,
    },
    /// `RSET`.
    Rset,
    /// `NOOP`.
    Noop,
    /// `QUIT`.
    Quit,
    /// `VRFY`: we never verify (252).
    Vrfy,
    /// `HELP`.
    Help,
    /// `STARTTLS` (RFC 3207).
    StartTls,
    /// `AUTH mechanism [initial-response]` (RFC 4954); the mechanism in
    /// upper case.
    Auth {
        /// `PLAIN`, `LOGIN` or whatever the client named.
        mechanism: String,
        /// The base64 initial response, if given (`=` is an empty one).
        initial: Option<String>,
    },
}

/// Why a line is not a command we accept; each maps to one reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommandError {
    /// Unknown verb (500 5.5.2).
    Unrecognized,
    /// A verb of SMTP or one of its extensions that we do not implement
    /// (502 5.5.1), in upper case.
    NotImplemented(String),
    /// Known verb with bad arguments (501 5.5.4), and what is wrong.
    Syntax(&'static str),
    /// An ESMTP parameter we do not offer (555 5.5.4).
    UnsupportedParameter(String),
    /// A control character (below 0x20, or DEL) in the line (501 5.5.2):
    /// it would reach `Received:`, the logs and operators' terminals.
    ControlCharacter,
    /// BDAT without a chunk size we can read (501 5.5.4): where the chunk
    /// ends is unknown, so the session must close.
    ChunkSize,
}

impl CommandError {
    /// The reply the server sends for this error.
    pub fn reply(&self) -> Reply {
        match self {
            CommandError::Unrecognized => Reply::new(500, "5.5.2 command not recognized"),
            CommandError::NotImplemented(verb) => {
                Reply::new(502, format!("5.5.1 {verb} not implemented"))
            }
            CommandError::Syntax(what) => Reply::new(501, format!("5.5.4 syntax error: {what}")),
            CommandError::UnsupportedParameter(p) => {
                Reply::new(555, format!("5.5.4 unsupported parameter {p}"))
            }
            CommandError::ControlCharacter => {
                Reply::new(501, "5.5.2 control characters are not allowed in commands")
            }
            CommandError::ChunkSize => {
                Reply::new(501, "5.5.4 syntax error: expected BDAT <size> [LAST]")
            }
        }
    }
}

impl fmt::Display for CommandError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.reply())
    }
}

impl std::error::Error for CommandError {}

/// Verbs of RFC 5321, its predecessors and extensions that we know and do
/// not implement: they get 502, not the 500 of a verb nobody defined.
const NOT_IMPLEMENTED: &[&str] = &["EXPN", "TURN", "ETRN", "ATRN", "SEND", "SOML", "SAML"];

/// Longest EHLO/HELO domain (RFC 1035's limit on a name; an address
/// literal is shorter still).
pub const MAX_DOMAIN: usize = 255;

impl Command {
    /// Parses one command line, without its CRLF.
    pub fn parse(line: &[u8]) -> Result<Command, CommandError> {
        let line =
            std::str::from_utf8(line).map_err(|_| CommandError::Syntax("non-ASCII octets"))?;
        if !line.is_ascii() {
            return Err(CommandError::Syntax("non-ASCII octets"));
        }
        if line.bytes().any(|b| b < 0x20 || b == 0x7f) {
            return Err(CommandError::ControlCharacter);
        }
        let (verb, rest) = match line.find(' ') {
            Some(i) => (&line[..i], &line[i + 1..]),
            None => (line, ""),
        };
        let verb = verb.to_ascii_uppercase();
        let no_args = |cmd: Command| {
            if rest.trim().is_empty() {
                Ok(cmd)
            } else {
                Err(CommandError::Syntax("no arguments expected"))
            }
        };
        match verb.as_str() {
            "EHLO" | "HELO" => {
                let domain = rest.trim();
                if domain.is_empty() || domain.contains(' ') {
                    return Err(CommandError::Syntax("EHLO/HELO needs one domain"));
                }
                // It is copied into the Received: line of every message.
                if domain.len() > MAX_DOMAIN {
                    return Err(CommandError::Syntax("EHLO/HELO domain over 255 octets"));
                }
                Ok(if verb == "EHLO" {
                    Command::Ehlo(domain.to_string())
                } else {
                    Command::Helo(domain.to_string())
                })
            }
            "MAIL" => {
                let args = strip_prefix_ci(rest, "FROM:")
                    .ok_or(CommandError::Syntax("expected MAIL FROM:<address>"))?;
                let (from, params) = split_path(args)?;
                Ok(Command::Mail {
                    from,
                    params: parse_mail_params(params)?,
                })
            }
            "RCPT" => {
                let args = strip_prefix_ci(rest, "TO:")
                    .ok_or(CommandError::Syntax("expected RCPT TO:<address>"))?;
                let (to, params) = split_path(args)?;
                if let Some(p) = params.split_whitespace().next() {
                    return Err(CommandError::UnsupportedParameter(p.to_string()));
                }
                if to.is_empty() {
                    return Err(CommandError::Syntax("empty recipient"));
                }
                Ok(Command::Rcpt(to))
            }
            "DATA" => no_args(Command::Data),
            "BDAT" => {
                let mut words = rest.split(' ');
                // Digits only, and few enough for a u64: no sign, no space.
                let size = words
                    .next()
                    .filter(|w| !w.is_empty() && w.len() <= 20)
                    .filter(|w| w.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|w| w.parse().ok())
                    .ok_or(CommandError::ChunkSize)?;
                let last = match words.next() {
                    None => false,
                    Some(w) if w.eq_ignore_ascii_case("LAST") => true,
                    Some(_) => return Err(CommandError::ChunkSize),
                };
                if words.next().is_some() {
                    return Err(CommandError::ChunkSize);
                }
                Ok(Command::Bdat { size, last })
            }
            "RSET" => no_args(Command::Rset),
            "QUIT" => no_args(Command::Quit),
            // NOOP and HELP may carry an argument, which is ignored.
            "NOOP" => Ok(Command::Noop),
            "HELP" => Ok(Command::Help),
            "VRFY" => Ok(Command::Vrfy),
            "STARTTLS" => no_args(Command::StartTls),
            "AUTH" => {
                let mut words = rest.split_whitespace();
                let mechanism = words
                    .next()
                    .ok_or(CommandError::Syntax("AUTH needs a mechanism"))?
                    .to_ascii_uppercase();
                let initial = words.next().map(str::to_string);
                if words.next().is_some() {
                    return Err(CommandError::Syntax(
                        "AUTH takes a mechanism and one response",
                    ));
                }
                Ok(Command::Auth { mechanism, initial })
            }
            _ if NOT_IMPLEMENTED.contains(&verb.as_str()) => {
                Err(CommandError::NotImplemented(verb))
            }
            _ => Err(CommandError::Unrecognized),
        }
    }
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

/// Splits `<path> params` into the address inside the brackets and the rest.
/// A source route (`<@a,@b:user@d>`) is dropped as RFC 5321 §4.1.1.3 allows.
fn split_path(args: &str) -> Result<(String, &str), CommandError> {
    // Some clients put a space after the colon; tolerate that one deviation.
    let args = args.trim_start();
    let body = args
        .strip_prefix('<')
        .ok_or(CommandError::Syntax("address must be in <>"))?;
    // Find the closing bracket outside any quoted local part.
    let mut quoted = false;
    let mut escaped = false;
    let mut end = None;
    for (i, c) in body.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '>' if !quoted => {
                end = Some(i);
                break;
            }
            _ => {}
        }
    }
    let end = end.ok_or(CommandError::Syntax("unterminated <address>"))?;
    let mut path = &body[..end];
    if path.starts_with('@') {
        path = path
            .split_once(':')
            .ok_or(CommandError::Syntax("bad source route"))?
            .1;
    }
    let rest = &body[end + 1..];
    if !rest.is_empty() && !rest.starts_with(' ') {
        return Err(CommandError::Syntax("garbage after address"));
    }
    Ok((path.to_string(), rest))
}

fn parse_mail_params(params: &str) -> Result<MailParams, CommandError> {
    let mut out = MailParams::default();
    for p in params.split_whitespace() {
        let (key, value) = p.split_once('=').unwrap_or((p, ""));
        if key.eq_ignore_ascii_case("SIZE") {
            let size = value
                .parse()
                .map_err(|_| CommandError::Syntax("SIZE needs a number"))?;
            out.size = Some(size);
        } else if key.eq_ignore_ascii_case("BODY") {
            out.body = if value.eq_ignore_ascii_case("8BITMIME") {
                BodyType::EightBitMime
            } else if value.eq_ignore_ascii_case("7BIT") {
                BodyType::SevenBit
            } else {
                return Err(CommandError::UnsupportedParameter(p.to_string()));
            };
        } else {
            return Err(CommandError::UnsupportedParameter(p.to_string()));
        }
    }
    Ok(out)
}

/// Client side: the MAIL FROM line with the parameters the peer offered.
pub fn format_mail(from: &str, size: Option<u64>, body: BodyType) -> String {
    let mut s = format!("MAIL FROM:<{from}>");
    if let Some(n) = size {
        s.push_str(&format!(" SIZE={n}"));
    }
    if body == BodyType::EightBitMime {
        s.push_str(" BODY=8BITMIME");
    }
    s.push_str("\r\n");
    s
}

/// Client side: the RCPT TO line.
pub fn format_rcpt(to: &str) -> String {
    format!("RCPT TO:<{to}>\r\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mail_with_params() {
        let c = Command::parse(
            b"mail from:<+447700900123/TYPE=PLMN@mms.mnc010.mcc001.gprs> SIZE=2048 BODY=8BITMIME",
        )
        .unwrap();
        assert_eq!(
            c,
            Command::Mail {
                from: "+447700900123/TYPE=PLMN@mms.mnc010.mcc001.gprs".into(),
                params: MailParams {
                    size: Some(2048),
                    body: BodyType::EightBitMime
                }
            }
        );
        assert_eq!(
            Command::parse(b"MAIL FROM:<>").unwrap(),
            Command::Mail {
                from: String::new(),
                params: MailParams::default()
            }
        );
        assert_eq!(
            Command::parse(b"MAIL FROM: <a@b>").unwrap(),
            Command::Mail {
                from: "a@b".into(),
                params: MailParams::default()
            }
        );
    }

    #[test]
    fn parses_rcpt_quoted_and_routed() {
        assert_eq!(
            Command::parse(b"RCPT TO:<\"a>b\"@x>").unwrap(),
            Command::Rcpt("\"a>b\"@x".into())
        );
        assert_eq!(
            Command::parse(b"RCPT TO:<@relay.example:u@d>").unwrap(),
            Command::Rcpt("u@d".into())
        );
    }

    #[test]
    fn known_but_unimplemented_verbs_get_502() {
        for line in [
            "EXPN staff",
            "TURN",
            "ETRN example.com",
            "ATRN",
            "SEND FROM:<a@b>",
            "soml FROM:<a@b>",
            "SAML FROM:<a@b>",
        ] {
            let verb = line.split(' ').next().unwrap().to_ascii_uppercase();
            let e = Command::parse(line.as_bytes()).unwrap_err();
            assert_eq!(e, CommandError::NotImplemented(verb.clone()), "{line}");
            let reply = e.reply();
            assert_eq!(reply.code, 502, "{line}");
            assert_eq!(reply.lines[0], format!("5.5.1 {verb} not implemented"));
        }
        // VRFY keeps its own answer, and a verb nobody defined stays 500.
        assert_eq!(Command::parse(b"VRFY x"), Ok(Command::Vrfy));
        assert_eq!(Command::parse(b"XYZZY").unwrap_err().reply().code, 500);
    }

    #[test]
    fn bdat_takes_a_size_and_last_and_nothing_else() {
        let bdat = |size, last| Ok(Command::Bdat { size, last });
        assert_eq!(Command::parse(b"BDAT 10 LAST"), bdat(10, true));
        assert_eq!(Command::parse(b"bdat 0 last"), bdat(0, true));
        assert_eq!(Command::parse(b"BDAT 4096"), bdat(4096, false));
        let max = format!("BDAT {}", u64::MAX);
        assert_eq!(Command::parse(max.as_bytes()), bdat(u64::MAX, false));
        for bad in [
            "BDAT",
            "BDAT LAST",
            "BDAT -1",
            "BDAT +1",
            "BDAT 1x",
            "BDAT 1  LAST",
            "BDAT 1 LAST x",
            "BDAT 1 FIRST",
            "BDAT 18446744073709551616",
        ] {
            let e = Command::parse(bad.as_bytes()).unwrap_err();
            assert_eq!(e, CommandError::ChunkSize, "{bad}");
            assert_eq!(e.reply().code, 501, "{bad}");
        }
    }

    #[test]
    fn rejects_bad_lines() {
        assert_eq!(Command::parse(b"FOO"), Err(CommandError::Unrecognized));
        assert!(matches!(
            Command::parse(b"MAIL TO:<a@b>"),
            Err(CommandError::Syntax(_))
        ));
        assert!(matches!(
            Command::parse(b"RCPT TO:a@b"),
            Err(CommandError::Syntax(_))
        ));
        assert!(matches!(
            Command::parse(b"RCPT TO:<a@b"),
            Err(CommandError::Syntax(_))
        ));
        assert!(matches!(
            Command::parse(b"RCPT TO:<>"),
            Err(CommandError::Syntax(_))
        ));
        assert!(matches!(
            Command::parse(b"DATA now"),
            Err(CommandError::Syntax(_))
        ));
        assert!(matches!(
            Command::parse(b"MAIL FROM:<a@b> SIZE=x"),
            Err(CommandError::Syntax(_))
        ));
        assert!(matches!(
            Command::parse("EHLO é".as_bytes()),
            Err(CommandError::Syntax(_))
        ));
        assert_eq!(
            Command::parse(b"MAIL FROM:<a@b> SMTPUTF8"),
            Err(CommandError::UnsupportedParameter("SMTPUTF8".into()))
        );
        assert_eq!(Command::parse(b"EHLO").unwrap_err().reply().code, 501);
    }

    #[test]
    fn refuses_control_characters_and_long_helo_names() {
        for line in [
            &b"EHLO a\rb"[..],
            b"HELO a\x1b[2Jb",
            b"MAIL FROM:<a\x00@b>",
            b"MAIL FROM:<a@b>\tSIZE=1",
            b"RCPT TO:<x@y\rBcc: z@w>",
            b"RCPT TO:<x@y\x7f>",
            b"NOOP \x07",
        ] {
            let err = Command::parse(line).unwrap_err();
            assert_eq!(err, CommandError::ControlCharacter, "{line:?}");
            assert_eq!(
                err.reply().to_string(),
                "501 5.5.2 control characters are not allowed in commands"
            );
        }
        let long = format!("EHLO {}", "a".repeat(MAX_DOMAIN + 1));
        assert_eq!(
            Command::parse(long.as_bytes()).unwrap_err().reply().code,
            501
        );
        let ok = format!("EHLO {}", "a".repeat(MAX_DOMAIN));
        assert!(Command::parse(ok.as_bytes()).is_ok());
    }

    #[test]
    fn formats_client_commands() {
        assert_eq!(
            format_mail("a@b", Some(10), BodyType::EightBitMime),
            "MAIL FROM:<a@b> SIZE=10 BODY=8BITMIME\r\n"
        );
        assert_eq!(
            format_mail("", None, BodyType::SevenBit),
            "MAIL FROM:<>\r\n"
        );
        assert_eq!(format_rcpt("x@y"), "RCPT TO:<x@y>\r\n");
    }
}
