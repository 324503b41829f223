//! Holds placed and released while a capture runs: `pgtrail hold` cannot open a log the
//! capture holds, so it leaves a request in the archive's `requests/` directory and waits for
//! the capture, which carries requests out between its compactions and retention runs (one
//! thread: a retention purge never runs between a hold's placement and the next purge's plan)
//! and answers in a file beside it.
//!
//! A request is `requests/NAME.json`. Who takes it first wins, by renaming or removing it (one
//! of the two succeeds): the capture renames it `NAME.taken` before carrying it out; the
//! client, when its wait is over, removes it, and a removal that succeeds means the request was
//! not taken and never will be. A taken request is carried out in the commit that also records
//! its name as answered (the `evidence_hold_requests` table), so a capture that crashes after
//! taking one carries it out once at its next start (or answers it from that record), never
//! twice. The answer (`NAME.answer`) is written atomically before the taken request is removed.
//! The directory is the archive's (mode 0700): only who may open the archive may ask.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use super::{ANSWERED, Hold, HoldError, place_for, release_for};
use crate::atomic_file::{create_private_dir, fsync_dir, write_atomically};
use crate::error::{LogError, SegmentError};
use crate::evidence::bundle::Scope;
use crate::log::{LogReader, SharedLog, table_if_made};

/// The directory of requests inside the archive.
pub const REQUESTS_DIR: &str = "requests";

/// What a request asks.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    Place { scope: Scope, reason: String },
    Release { id: u64, reason: String },
}

/// What the capture answered.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Answer {
    /// The hold as placed or released.
    Done(Hold),
    /// Why it was not carried out (no such hold, released already, a request it could not read).
    Refused(String),
}

#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("cannot {what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the running capture did not take the request in {0} s, so nothing was done: a capture run with --no-compact takes no requests (stop it and run this again), and one busy with a retention run takes them when it is done (run this again with a longer --wait-secs)"
    )]
    NotTaken(u64),
    #[error(
        "the running capture took the request but did not answer in {0} s: `pgtrail hold --list` shows whether it was carried out (a capture that stopped meanwhile carries it out when it starts again)"
    )]
    NoAnswer(u64),
    #[error("the capture's answer {0} cannot be read: {1}")]
    BadAnswer(PathBuf, String),
    #[error("cannot write the request")]
    Write(#[from] SegmentError),
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> RequestError {
    let path = path.to_path_buf();
    move |source| RequestError::Io { what, path, source }
}

/// Leave `request` for the capture running on `archive` and wait up to `wait` for its answer
/// (twice that once the capture has taken it). `waiting` is called once, when the request is
/// left.
pub fn submit(
    archive: &Path,
    request: &Request,
    wait: Duration,
    waiting: impl FnOnce(),
) -> Result<Answer, RequestError> {
    let dir = archive.join(REQUESTS_DIR);
    create_private_dir(&dir)?;
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let name = format!("hold-{nanos:020}-{}", std::process::id());
    let (asked, answer) = (
        dir.join(format!("{name}.json")),
        dir.join(format!("{name}.answer")),
    );
    let bytes = serde_json::to_vec(request).expect("a request is plain data");
    write_atomically(&asked, &bytes)?;
    waiting();
    if let Some(a) = await_answer(&answer, wait)? {
        return Ok(a);
    }
    // Withdraw it. A removal that succeeds means the capture had not taken it (it takes a
    // request by renaming it, and only one of the two can succeed); one that finds nothing
    // means it was taken, and its answer will come.
    match fs::remove_file(&asked) {
        Ok(()) => Err(RequestError::NotTaken(wait.as_secs())),
        Err(e) if e.kind() == ErrorKind::NotFound => {
            await_answer(&answer, wait)?.ok_or(RequestError::NoAnswer(2 * wait.as_secs()))
        }
        Err(e) => Err(io("withdraw", &asked)(e)),
    }
}

/// The answer at `path` once it is there (read, then removed), or None after `wait`.
fn await_answer(path: &Path, wait: Duration) -> Result<Option<Answer>, RequestError> {
    let deadline = Instant::now() + wait;
    loop {
        match fs::read(path) {
            Ok(bytes) => {
                let answer = serde_json::from_slice(&bytes)
                    .map_err(|e| RequestError::BadAnswer(path.to_path_buf(), e.to_string()))?;
                // Read is enough: a removal that fails leaves a file the capture removes later.
                let _ = fs::remove_file(path);
                return Ok(Some(answer));
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(io("read", path)(e)),
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Answers nobody read (a client that gave up, crashed) are removed after this.
const STALE_ANSWER: Duration = Duration::from_secs(3600);

/// Carry out every request left in `archive` (the capture's, whose log `log` is), oldest first,
/// and answer each; returns how many were answered. A storage error stops it with the request
/// still taken, to be carried out at the next call (or the next start).
pub fn serve(log: &SharedLog, archive: &Path) -> Result<usize, LogError> {
    let dir = archive.join(REQUESTS_DIR);
    let listing = match fs::read_dir(&dir) {
        Ok(listing) => listing,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(dir_error(&dir, e)),
    };
    let mut taken: Vec<String> = Vec::new();
    let mut asked: Vec<String> = Vec::new();
    for entry in listing {
        let entry = entry.map_err(|e| dir_error(&dir, e))?;
        let file = entry.file_name().to_string_lossy().into_owned();
        if let Some(name) = file.strip_suffix(".taken") {
            taken.push(name.to_string());
        } else if let Some(name) = file.strip_suffix(".json") {
            asked.push(name.to_string());
        } else if file.ends_with(".answer")
            && entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|at| at.elapsed().is_ok_and(|age| age > STALE_ANSWER))
        {
            let _ = fs::remove_file(entry.path());
        }
    }
    asked.sort();
    // Taken before a crash first (they are older), then the new ones, each taken by renaming:
    // a client that withdrew its request first leaves nothing to rename.
    taken.sort();
    for name in asked {
        let from = dir.join(format!("{name}.json"));
        match fs::rename(&from, dir.join(format!("{name}.taken"))) {
            Ok(()) => taken.push(name),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(dir_error(&from, e)),
        }
    }
    for name in &taken {
        let path = dir.join(format!("{name}.taken"));
        let answer = carry_out(log, name, &path)?;
        let bytes = serde_json::to_vec(&answer).expect("an answer is plain data");
        // The answer is whole before the taken request goes: a crash between the two answers
        // it again at the next call, from the record of what was carried out.
        write_atomically(&dir.join(format!("{name}.answer")), &bytes)
            .map_err(|e| dir_error(&dir, std::io::Error::other(e)))?;
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(dir_error(&path, e)),
        }
        fsync_dir(&dir).map_err(|e| dir_error(&dir, std::io::Error::other(e)))?;
        tracing::info!(request = %name, answer = %String::from_utf8_lossy(&bytes), "hold request answered");
    }
    Ok(taken.len())
}

/// The answer to the taken request `name` at `path`: the recorded one if it was carried out
/// before (a crash came before its answer), else what carrying it out now gives.
fn carry_out(log: &SharedLog, name: &str, path: &Path) -> Result<Answer, LogError> {
    let reader = LogReader::of_shared(log)?;
    if let Some(done) = table_if_made(reader.read_transaction(), ANSWERED)?
        && let Some(hold) = done.get(name)?
    {
        return Ok(Answer::Done(super::decode(hold.value())?));
    }
    drop(reader);
    let request: Request = match fs::read(path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(r) => r,
        Err(e) => return Ok(Answer::Refused(format!("the request cannot be read: {e}"))),
    };
    let done = match request {
        Request::Place { scope, reason } => place_for(log, scope, &reason, Some(name)),
        Request::Release { id, reason } => release_for(log, id, &reason, Some(name)),
    };
    match done {
        Ok(hold) => Ok(Answer::Done(hold)),
        Err(HoldError::Log(e)) => Err(e),
        Err(e) => Ok(Answer::Refused(e.to_string())),
    }
}

fn dir_error(path: &Path, source: std::io::Error) -> LogError {
    LogError::Directory {
        path: path.to_path_buf(),
        source,
    }
}
