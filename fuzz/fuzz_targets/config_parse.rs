//! Config parsing and validation of arbitrary text: an error or a draft,
//! never a panic. Parsing reads no file and resolves no name (the load
//! step does), so every key is fair game, those naming files included.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use mm4relay::config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(draft) = config::parse(text, Path::new("fuzz.ini")) {
        let _ = draft.config().router();
        let _ = draft.config().describe();
    }
});
