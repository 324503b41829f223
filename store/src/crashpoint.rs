//! Crash points for the reliability tests: with the `crashpoints` feature, a process whose
//! `PGTRAIL_CRASH_AT` names a point aborts there (like a `kill -9`, with no cleanup and no
//! destructors). Without the feature every point compiles to nothing.

/// Abort the process here when `PGTRAIL_CRASH_AT` names `point` (feature `crashpoints`).
#[cfg(feature = "crashpoints")]
pub fn hit(point: &str) {
    // Read once: some points sit on the log's commit path.
    static AT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    if AT
        .get_or_init(|| std::env::var("PGTRAIL_CRASH_AT").ok())
        .as_deref()
        == Some(point)
    {
        eprintln!("pgtrail: crash point {point} reached, aborting");
        std::process::abort();
    }
}

#[cfg(not(feature = "crashpoints"))]
#[inline(always)]
pub fn hit(_point: &str) {}
