//! Feeds arbitrary UTF-8 to the Dockerfile parser, expansion and `.dockerignore` matcher:
//! they must return errors, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strata_dockerfile::{Dockerfile, EmptyEnv, IgnoreMatcher, dump::dump};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Dockerfile::parse("Dockerfile", text) {
        Ok(df) => {
            let _ = dump(&df, &EmptyEnv);
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
    if let Ok(m) = IgnoreMatcher::parse("fuzz", text) {
        let _ = m.is_excluded("a/b/c.txt", false);
        let _ = m.is_excluded("a/b", true);
    }
});
