//! The evidence's texts (checkpoints, signed notes, signing/verifier/cosigner keys, coverage
//! statements): never a panic; a checkpoint reads back byte for byte; what pgtrail signs opens.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        pgtrail_store::evidence::fuzzing::evidence_texts(text);
    }
});
