//! The pgoutput decoder on arbitrary bytes: never a panic, and a message that decodes
//! re-encodes to bytes that decode to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgtrail_capture::pgoutput::{decode, encode};

fuzz_target!(|data: &[u8]| {
    if let Ok(message) = decode(data) {
        let again =
            decode(&encode(&message)).expect("a decoded message re-encodes to a decodable one");
        assert_eq!(again, message);
    }
});
