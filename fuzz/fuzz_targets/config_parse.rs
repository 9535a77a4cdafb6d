//! Config parsing and validation of arbitrary text: an error or a config,
//! never a panic. Keys that name files are left out, so the fuzzer does
//! not read /dev/zero or the like.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use mm4relay::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let names_a_file = ["tls_", "users_file"].iter().any(|k| text.contains(k));
    if names_a_file {
        return;
    }
    if let Ok(c) = Config::parse(text, Path::new("fuzz.ini")) {
        let _ = c.router();
        let _ = c.describe();
    }
});
