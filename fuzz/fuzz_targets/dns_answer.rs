//! A DNS answer as a hostile server (or a forger on the path) might send
//! it: the octets are read as a message, then as the answer to an MX, an
//! A and a NAPTR query, and a NAPTR answer's records are put through
//! ENUM's choice and regexp for a number.
#![no_main]

use hickory_proto::op::Message;
use hickory_proto::rr::RecordType;
use libfuzzer_sys::fuzz_target;

use mm4relay::dns::naptr::{best_domain, naptrs};
use mm4relay::dns::{Answer, read_answer};

fuzz_target!(|data: &[u8]| {
    let Ok(m) = Message::from_vec(data) else {
        return;
    };
    let Some(name) = m.queries.first().map(|q| q.name.clone()) else {
        return;
    };
    for rtype in [RecordType::MX, RecordType::A, RecordType::NAPTR] {
        if let Ok((Answer::Records(rs), _)) = read_answer(&m, &name, rtype) {
            let _ = best_domain(&naptrs(&rs), "+447700900123");
        }
    }
});
