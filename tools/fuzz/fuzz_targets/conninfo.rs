//! Connection strings (libpq's URL and key=value forms) and password-file lines: never a
//! panic; settings said back as key=value, and password-file fields written back escaped,
//! read back the same.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        pgtrail_capture::source::conninfo::fuzzing::conninfo(text);
        pgtrail_capture::source::conninfo::fuzzing::pgpass(text);
    }
});
