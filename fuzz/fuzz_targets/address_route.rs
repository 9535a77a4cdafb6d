//! Address parsing (header and envelope forms) and routing of whatever
//! parses, against a table with ported numbers, prefixes and domains.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mm4relay::route::{Address, Router};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let mut r = Router::new();
    r.add_ported("+12025550177", 2);
    r.add_prefix("+1202555", 1);
    r.add_prefix("+447700900", 0);
    r.add_domain("mms.mnc010.mcc001.gprs", 0);
    r.add_domain("*.example.org", 1);
    for parsed in [Address::parse(s), Address::parse_envelope(s)] {
        if let Ok(a) = parsed {
            let _ = r.route(&a);
            let _ = a.same_recipient(&a);
        }
    }
});
