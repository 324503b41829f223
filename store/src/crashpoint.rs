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

/// Wait here while `PGTRAIL_PAUSE_AT` names `point` and the file `PGTRAIL_PAUSE_UNTIL` names
/// does not exist yet, or the file `PGTRAIL_PAUSE_WHILE` names exists (feature
/// `crashpoints`): a test holds the process at a moment it could not otherwise reach in time
/// (a window of a few round trips), acts, then lets it go on. `PGTRAIL_PAUSE_WHILE` lets a
/// process run up to a moment the test chooses (it creates the file then), for a point passed
/// often, such as the log's commit.
/// It blocks its thread; the points sit where nothing else of the process must run meanwhile.
#[cfg(feature = "crashpoints")]
pub fn pause(point: &str) {
    // Read once: one point sits on the log's commit path.
    static AT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    if AT
        .get_or_init(|| std::env::var("PGTRAIL_PAUSE_AT").ok())
        .as_deref()
        != Some(point)
    {
        return;
    }
    let wait = |reason: &str, go_on: &dyn Fn() -> bool| {
        if !go_on() {
            eprintln!("pgtrail: pause point {point} reached, waiting {reason}");
            while !go_on() {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    };
    if let Some(until) = std::env::var_os("PGTRAIL_PAUSE_UNTIL") {
        let until = std::path::PathBuf::from(until);
        wait(&format!("for {until:?}"), &|| until.exists());
    }
    if let Some(while_) = std::env::var_os("PGTRAIL_PAUSE_WHILE") {
        let while_ = std::path::PathBuf::from(while_);
        wait(&format!("while {while_:?} exists"), &|| !while_.exists());
    }
}

#[cfg(not(feature = "crashpoints"))]
#[inline(always)]
pub fn pause(_point: &str) {}
