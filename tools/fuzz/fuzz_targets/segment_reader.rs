//! The segment reader on arbitrary file contents (as if the manifest's checksum were not
//! there to catch them): open, read every batch and turn it back into change records. Any
//! outcome is fine except a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgtrail_store::segment::{SegmentReader, read_records};

fuzz_target!(|data: &[u8]| {
    // The reader contains panics of the Parquet and Arrow code it calls (turning them into
    // errors); libFuzzer's hook would abort at any panic, even a contained one. A panic that
    // escapes the reader still aborts: the harness catches it and reports a crash.
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| std::panic::set_hook(Box::new(|_| {})));
    // One scratch file per fuzzing process, in memory where the machine has /dev/shm.
    let dir = if std::path::Path::new("/dev/shm").is_dir() {
        std::path::PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let path = dir.join(format!(
        "pgtrail-fuzz-segment-{}.parquet",
        std::process::id()
    ));
    if std::fs::write(&path, data).is_err() {
        return;
    }
    if let Ok(reader) = SegmentReader::open(&path, None, 64) {
        let content = reader.content().clone();
        for batch in reader {
            match batch {
                Ok(batch) => {
                    let _ = read_records(&content, &batch);
                }
                Err(_) => break,
            }
        }
    }
});
