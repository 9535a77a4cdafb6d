//! The SMTP command parser and the server session state machine: any
//! octets, fed in pieces cut where the first octet says, with STARTTLS
//! and AUTH on. Nothing may panic; every reply must be well formed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mm4relay::smtp::Reply;
use mm4relay::smtp::command::Command;
use mm4relay::smtp::session::{Envelope, Handler, Session, SessionConfig};

struct Accept;

impl Handler for Accept {
    type Route = ();
    fn rcpt(&mut self, _: &str, rcpt: &str) -> Result<(), Reply> {
        if rcpt.len() % 2 == 0 {
            Ok(())
        } else {
            Err(Reply::new(550, "5.1.2 no"))
        }
    }
    fn message(&mut self, _: Envelope<()>, data: &mut Vec<u8>) -> Reply {
        assert!(data.len() <= 4096);
        Reply::new(250, "2.0.0 ok")
    }
    fn auth(&mut self, user: &str, password: &str) -> bool {
        user == "u" && password == "p"
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((&cut, input)) = input.split_first() else {
        return;
    };
    for line in input.split(|&b| b == b'\n') {
        let _ = Command::parse(line);
    }
    let mut session: Session<()> = Session::new(SessionConfig {
        hostname: "fuzz.test".into(),
        max_message_size: 4096,
        max_recipients: 5,
        starttls: true,
        auth: true,
        auth_plaintext: true,
        max_bad_commands: 20,
        max_refused_recipients: 20,
    });
    let mut out = Vec::new();
    let mut buf = Vec::new();
    let step = usize::from(cut).max(1);
    for piece in input.chunks(step) {
        buf.extend_from_slice(piece);
        let p = session.feed(&buf, &mut Accept, &mut out);
        assert!(p.consumed <= buf.len());
        buf.drain(..p.consumed);
        if p.starttls {
            buf.clear();
            session.tls_started();
        }
        if p.close {
            break;
        }
    }
    // What the session wrote parses back as replies, all of it.
    let mut rest = &out[..];
    while !rest.is_empty() {
        match Reply::parse(rest) {
            Ok(Some((_, n))) => rest = &rest[n..],
            other => panic!(
                "bad reply output {other:?}: {:?}",
                String::from_utf8_lossy(rest)
            ),
        }
    }
});
