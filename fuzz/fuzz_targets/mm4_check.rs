//! MM4 recognition and checks in every mode, with small limits so deep
//! and wide inputs reach them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mm4relay::config::Mm4Check;
use mm4relay::mm4::{self, Limits};

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        max_header_fields: 64,
        max_header_size: 8192,
        max_mime_depth: 6,
    };
    let rcpts = ["+447700900123/TYPE=PLMN@mms.mnc010.mcc001.gprs", "x@y"];
    for mode in [Mm4Check::Strict, Mm4Check::Lenient, Mm4Check::Off] {
        let _ = mm4::check(data, &rcpts, mode, &limits);
    }
    let _ = mm4::parse_header(data);
});
