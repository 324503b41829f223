//! `pgtrail serve`'s query strings: never a panic; every parameter value reaches SQL as one
//! literal holding exactly that value, and `/api/changes` builds only column-to-literal
//! conditions.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(query) = std::str::from_utf8(data) {
        pgtrail_serve::fuzzing::query_string(query);
    }
});
