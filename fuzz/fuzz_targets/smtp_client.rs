//! The reply parser and the client transaction state machine: the first
//! reply stands for EHLO, the rest answer one pipelined transaction.
//! Nothing may panic, and a finished transaction has an outcome per
//! recipient.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mm4relay::smtp::Reply;
use mm4relay::smtp::client::{Capabilities, Step, Transaction};
use mm4relay::smtp::command::BodyType;

fuzz_target!(|input: &[u8]| {
    let mut replies = Vec::new();
    let mut rest = input;
    while let Ok(Some((r, n))) = Reply::parse(rest) {
        replies.push(r);
        rest = &rest[n..];
    }
    let mut it = replies.into_iter();
    let Some(ehlo) = it.next() else { return };
    let caps = Capabilities::from_ehlo(&ehlo);
    let rcpts = vec!["a@x".to_string(), "b@x".to_string(), "c@y".to_string()];
    let body = if input.len() % 2 == 0 {
        BodyType::SevenBit
    } else {
        BodyType::EightBitMime
    };
    let Ok((mut t, _commands)) = Transaction::start(&caps, "s@z", &rcpts, 2048, body) else {
        return;
    };
    for r in it {
        if matches!(t.on_reply(r), Step::Done) {
            assert_eq!(t.outcomes().len(), rcpts.len());
            assert!(t.outcomes().iter().all(Option::is_some));
            return;
        }
    }
});
