//! A log's format version and `meta` values as any bytes: opening it to read or to write
//! never panics; a newer format is refused as such; an older one is upgraded to this one.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    pgtrail_store::fuzzing::open_log_with_meta(data);
});
