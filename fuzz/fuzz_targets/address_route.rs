//! Address parsing (header and envelope forms) and routing of whatever
//! parses, against a table with ported numbers, prefixes and domains; the
//! same text read as a ported file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::Arc;

use mm4relay::route::np::NpBuilder;
use mm4relay::route::{Address, Router};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    // The text is also a ported file: its lines, where they parse, route.
    let mut np = NpBuilder::new();
    let _ = np.add("+12025550177", 2, 0);
    let _ = np.add_file(s, |name| ["A", "B", "C"].iter().position(|p| *p == name));
    let mut r = Router::new();
    r.set_ported(Arc::new(np.build().unwrap_or_default()));
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
