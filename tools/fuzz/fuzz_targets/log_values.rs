//! The change log's value decoding (a one-byte encoding tag, optional zstd, postcard) on
//! arbitrary bytes, as each kind of value the log stores: never a panic, never an allocation
//! sized by a damaged header.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    pgtrail_store::fuzzing::decode_log_values(data);
});
