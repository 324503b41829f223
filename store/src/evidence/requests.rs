//! Requests to a running capture: `pgtrail hold`, `redact` and `purge` cannot open a log the
//! capture holds, so they leave a request in the archive's `requests/` directory and wait for
//! the capture, which carries requests out between its compactions and retention runs (one
//! thread: a retention purge never runs between a hold's placement and the next purge's plan,
//! and no compaction runs during an erasure) and answers in a file beside it.
//!
//! A request is `requests/NAME.json`. Who takes it first wins, by renaming or removing it (one
//! of the two succeeds): the capture renames it `NAME.taken` before carrying it out; the
//! client, when its wait is over, removes it, and a removal that succeeds means the request was
//! not taken and never will be. Once taken, the capture touches `NAME.taken` every
//! [`HEARTBEAT`] until it has answered, so the client waits as long as an erasure takes and no
//! longer than a capture that stopped.
//!
//! Carried out once: a hold is placed or released in the commit that also records the
//! request's name as answered (the `evidence_hold_requests` table); an erasure's answer is
//! recorded (the `evidence_erasure_requests` table) in a commit after its last segment's, and a
//! capture that crashes before that commit carries it out again at its next start, which
//! erases only what is left (a redaction skips parts erased already, a purge the changes it
//! erased) and answers with what it did then. A crash after the record answers from it. The
//! answer (`NAME.answer`) is written atomically before the taken request is removed.
//! The directory is the archive's (mode 0700): only who may open the archive may ask.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use redb::TableDefinition;

use super::bundle::Scope;
use super::hold::{ANSWERED, Hold, HoldError, place_for, release_for};
use super::redact::{PurgeCounts, PurgeMode, RedactCounts, RedactError};
use crate::Compactor;
use crate::atomic_file::{create_private_dir, fsync_dir, write_atomically};
use crate::error::{CompactError, LogError, SegmentError};
use crate::log::{LogReader, table_if_made};
use crate::lsn::{ChangeKey, Lsn};

/// The directory of requests inside the archive.
pub const REQUESTS_DIR: &str = "requests";

/// The erasure requests a running capture carried out: request name → its [`Answer`] (JSON).
const ERASURES_ANSWERED: TableDefinition<&str, &[u8]> =
    TableDefinition::new("evidence_erasure_requests");

/// How often the capture touches a request it has taken, until it has answered.
pub const HEARTBEAT: Duration = Duration::from_secs(2);

/// A taken request not touched for this long: the capture that took it stopped.
const STOPPED: Duration = Duration::from_secs(30);

/// What a request asks.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    Place {
        scope: Scope,
        reason: String,
    },
    Release {
        id: u64,
        reason: String,
    },
    /// `pgtrail redact`: erase `parts` (0 context, 1 before, 2 after) of `changes`.
    Redact {
        changes: Vec<ChangeKey>,
        parts: Vec<u8>,
        reason: String,
    },
    /// `pgtrail purge`: erase the history of `tables` before `before`, keeping the state there.
    Purge {
        tables: Vec<String>,
        before: Lsn,
        reason: String,
    },
}

impl Request {
    /// What the request is, for its file's name and the capture's log.
    fn kind(&self) -> &'static str {
        match self {
            Request::Place { .. } | Request::Release { .. } => "hold",
            Request::Redact { .. } => "redact",
            Request::Purge { .. } => "purge",
        }
    }
}

/// What the capture answered.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Answer {
    /// The hold as placed or released.
    Done(Hold),
    /// What a redaction erased. `resumed`: a capture that stopped while carrying it out had
    /// begun it, and this is what was left (the counts do not include what it erased before).
    Redacted { counts: RedactCounts, resumed: bool },
    /// What a purge erased; `resumed` as for a redaction.
    Purged { counts: PurgeCounts, resumed: bool },
    /// Why it was not carried out (no such hold, released already, a change under a hold, a
    /// request it could not read). An erasure refused part way says what it finished.
    Refused(String),
}

/// How a client's wait is going, for it to tell its user.
#[derive(Clone, Copy, Debug)]
pub enum Waiting {
    /// The request is left for the capture.
    Left,
    /// The capture took it and is carrying it out.
    Taken,
    /// Still carrying it out, this long after it was taken.
    Working(Duration),
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
        "the running capture did not take the request in {0} s, so nothing was done: a capture run with --no-compact takes no requests (stop it and run this again), and one busy compacting or purging takes them when it is done (run this again with a longer --wait-secs)"
    )]
    NotTaken(u64),
    #[error(
        "the capture took the request and then stopped before answering it (nothing touched {0} for {1} s): it carries the request out when it starts again; `pgtrail hold --list` shows holds, `pgtrail verify` and `pgtrail sql` what was erased"
    )]
    Stopped(PathBuf, u64),
    #[error(
        "the capture answered, but the answer {0} is gone (another process read it?): see what was done with `pgtrail hold --list` or `pgtrail sql`"
    )]
    AnswerGone(PathBuf),
    #[error("the capture's answer {0} cannot be read: {1}")]
    BadAnswer(PathBuf, String),
    #[error("cannot write the request")]
    Write(#[from] SegmentError),
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> RequestError {
    let path = path.to_path_buf();
    move |source| RequestError::Io { what, path, source }
}

/// Leave `request` for the capture running on `archive`, wait up to `wait` for it to take the
/// request (withdrawn, and nothing done, if it does not), then as long as it is carrying it
/// out, and return its answer. `told` hears how the wait goes.
pub fn submit(
    archive: &Path,
    request: &Request,
    wait: Duration,
    told: impl FnMut(Waiting),
) -> Result<Answer, RequestError> {
    submit_with(archive, request, wait, STOPPED, told)
}

/// [`submit`], taking a request untouched for `stopped` for a capture that stopped.
fn submit_with(
    archive: &Path,
    request: &Request,
    wait: Duration,
    stopped: Duration,
    mut told: impl FnMut(Waiting),
) -> Result<Answer, RequestError> {
    let dir = archive.join(REQUESTS_DIR);
    create_private_dir(&dir)?;
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    // The time first: the capture carries requests out in their names' order.
    let name = format!("{nanos:020}-{}-{}", std::process::id(), request.kind());
    let asked = dir.join(format!("{name}.json"));
    let taken = dir.join(format!("{name}.taken"));
    let answer = dir.join(format!("{name}.answer"));
    let bytes = serde_json::to_vec(request).expect("a request is plain data");
    write_atomically(&asked, &bytes)?;
    told(Waiting::Left);
    let deadline = Instant::now() + wait;
    loop {
        if let Some(a) = read_answer(&answer)? {
            return Ok(a);
        }
        // The capture takes a request by renaming it: gone means taken.
        if !asked.exists() {
            break;
        }
        if Instant::now() >= deadline {
            // Withdraw it. A removal that succeeds means the capture had not taken it (only
            // one of the rename and the removal can succeed); one that finds nothing means it
            // was taken just now, and its answer will come.
            match fs::remove_file(&asked) {
                Ok(()) => return Err(RequestError::NotTaken(wait.as_secs())),
                Err(e) if e.kind() == ErrorKind::NotFound => break,
                Err(e) => return Err(io("withdraw", &asked)(e)),
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    told(Waiting::Taken);
    let (started, mut last_told) = (Instant::now(), Instant::now());
    loop {
        if let Some(a) = read_answer(&answer)? {
            return Ok(a);
        }
        match fs::metadata(&taken).and_then(|m| m.modified()) {
            // Untouched since it was taken or since this wait saw it taken, whichever is
            // later: a rename keeps the request's own time until the capture first touches it.
            Ok(at)
                if at.elapsed().is_ok_and(|age| age > stopped) && started.elapsed() > stopped =>
            {
                return Err(RequestError::Stopped(taken, stopped.as_secs()));
            }
            Ok(_) => {}
            // The answer is written before the taken request is removed: it is there.
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return read_answer(&answer)?.ok_or(RequestError::AnswerGone(answer));
            }
            Err(e) => return Err(io("read", &taken)(e)),
        }
        if last_told.elapsed() >= Duration::from_secs(10) {
            last_told = Instant::now();
            told(Waiting::Working(started.elapsed()));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The answer at `path` if it is there (read, then removed).
fn read_answer(path: &Path) -> Result<Option<Answer>, RequestError> {
    match fs::read(path) {
        Ok(bytes) => {
            let answer = serde_json::from_slice(&bytes)
                .map_err(|e| RequestError::BadAnswer(path.to_path_buf(), e.to_string()))?;
            // Read is enough: a removal that fails leaves a file the capture removes later.
            let _ = fs::remove_file(path);
            Ok(Some(answer))
        }
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io("read", path)(e)),
    }
}

/// Answers nobody read (a client that gave up, crashed) are removed after this.
const STALE_ANSWER: Duration = Duration::from_secs(3600);

/// Carry out every request left in the archive of `compactor` (the capture's), oldest first,
/// and answer each; returns how many were answered. A storage error stops it with the request
/// still taken, to be carried out at the next call (or the next start).
pub fn serve(compactor: &Compactor) -> Result<usize, LogError> {
    let dir = compactor.archive_dir().join(REQUESTS_DIR);
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
    if taken.is_empty() && asked.is_empty() {
        return Ok(0);
    }
    asked.sort();
    // Taken before a crash first (they are older), then the new ones, each taken by renaming:
    // a client that withdrew its request first leaves nothing to rename.
    taken.sort();
    let resumed = taken.len();
    for name in asked {
        let from = dir.join(format!("{name}.json"));
        let to = dir.join(format!("{name}.taken"));
        match fs::rename(&from, &to) {
            Ok(()) => {
                touch(&to);
                taken.push(name);
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(dir_error(&from, e)),
        }
    }
    let answering = AtomicBool::new(true);
    std::thread::scope(|scope| {
        // Every taken request is touched until it is answered (a rename keeps the request's
        // own time, which may be older than the client's patience): its client waits while
        // the ones before it are carried out, and stops waiting once the capture stops.
        let heartbeat = std::thread::Builder::new()
            .name("pgtrail-requests".into())
            .spawn_scoped(scope, || {
                while answering.load(Ordering::Relaxed) {
                    for name in &taken {
                        touch(&dir.join(format!("{name}.taken")));
                    }
                    let since = Instant::now();
                    while since.elapsed() < HEARTBEAT && answering.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            });
        let served = answer_each(compactor, &dir, &taken, resumed);
        answering.store(false, Ordering::Relaxed);
        drop(heartbeat);
        served
    })
}

/// Carry out the taken requests `names` in order, answering each; the first `resumed` were
/// taken before (by a capture that stopped, or a call that failed, before answering them).
fn answer_each(
    compactor: &Compactor,
    dir: &Path,
    names: &[String],
    resumed: usize,
) -> Result<usize, LogError> {
    for (n, name) in names.iter().enumerate() {
        let path = dir.join(format!("{name}.taken"));
        let answer = carry_out(compactor, name, &path, n < resumed)?;
        let bytes = serde_json::to_vec(&answer).expect("an answer is plain data");
        // The answer is whole before the taken request goes: a crash between the two answers
        // it again at the next call, from the record of what was carried out.
        write_atomically(&dir.join(format!("{name}.answer")), &bytes)
            .map_err(|e| dir_error(dir, std::io::Error::other(e)))?;
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(dir_error(&path, e)),
        }
        fsync_dir(dir).map_err(|e| dir_error(dir, std::io::Error::other(e)))?;
        tracing::info!(request = %name, answer = %String::from_utf8_lossy(&bytes), "request answered");
    }
    Ok(names.len())
}

/// Set a file's modification time to now; a file gone (answered meanwhile) is left gone.
fn touch(path: &Path) {
    if let Ok(file) = fs::File::options().write(true).open(path) {
        let _ = file.set_modified(SystemTime::now());
    }
}

/// The answer to the taken request `name` at `path`: the recorded one if it was carried out
/// before (a crash came before its answer), else what carrying it out now gives.
fn carry_out(
    compactor: &Compactor,
    name: &str,
    path: &Path,
    resumed: bool,
) -> Result<Answer, LogError> {
    let log = compactor.log();
    let reader = LogReader::of_shared(&log)?;
    if let Some(done) = table_if_made(reader.read_transaction(), ANSWERED)?
        && let Some(hold) = done.get(name)?
    {
        return Ok(Answer::Done(super::hold::decode(hold.value())?));
    }
    if let Some(done) = table_if_made(reader.read_transaction(), ERASURES_ANSWERED)?
        && let Some(answer) = done.get(name)?
    {
        return serde_json::from_slice(answer.value()).map_err(|e| LogError::Corrupt {
            what: "erasure request answer".into(),
            source: e.to_string().into(),
        });
    }
    drop(reader);
    let request: Request = match fs::read(path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(r) => r,
        Err(e) => return Ok(Answer::Refused(format!("the request cannot be read: {e}"))),
    };
    tracing::info!(request = %name, "carrying out a {} request", request.kind());
    let held = match request {
        Request::Place { scope, reason } => place_for(&log, scope, &reason, Some(name)),
        Request::Release { id, reason } => release_for(&log, id, &reason, Some(name)),
        Request::Redact {
            changes,
            parts,
            reason,
        } => {
            return erase(compactor, name, &reason, |c| {
                c.redact_changes(&changes, &parts, &reason)
                    .map(|counts| Answer::Redacted { counts, resumed })
            });
        }
        Request::Purge {
            tables,
            before,
            reason,
        } => {
            return erase(compactor, name, &reason, |c| {
                c.purge(&tables, before, &reason, PurgeMode::Requested)
                    .map(|(_, counts)| Answer::Purged { counts, resumed })
            });
        }
    };
    match held {
        Ok(hold) => Ok(Answer::Done(hold)),
        Err(HoldError::Log(e)) => Err(e),
        Err(e) => Ok(Answer::Refused(e.to_string())),
    }
}

/// Carry out an erasure and record its answer under the request's `name`. Whatever the erasure
/// itself fails on is the answer (it is not tried again: a failure part way leaves every
/// segment it finished erased, and the user sees why); only recording the answer can fail the
/// request, which then stays taken and is carried out again (erasing only what is left).
fn erase(
    compactor: &Compactor,
    name: &str,
    reason: &str,
    carry_out: impl FnOnce(&Compactor) -> Result<Answer, CompactError>,
) -> Result<Answer, LogError> {
    let answer = match reason.trim().is_empty() {
        true => Answer::Refused("the reason must say why (it is kept in the receipt)".into()),
        false => carry_out(compactor).unwrap_or_else(|e| Answer::Refused(refusal(&e))),
    };
    let db = &compactor.log().0;
    let mut wtx = db.begin_write()?;
    wtx.set_two_phase_commit(true);
    {
        let mut answered = wtx.open_table(ERASURES_ANSWERED)?;
        let bytes = serde_json::to_vec(&answer).expect("an answer is plain data");
        answered.insert(name, bytes.as_slice())?;
    }
    wtx.commit()?;
    Ok(answer)
}

/// What to tell the user an erasure failed on: the error and its causes, with the advice
/// that fits a running capture (which compacts on its own: `pgtrail compact` cannot run).
fn refusal(e: &CompactError) -> String {
    if let CompactError::Redact(e) = e
        && matches!(
            **e,
            RedactError::NotCompacted { .. } | RedactError::NotInTree(_)
        )
    {
        return format!(
            "{e}. With a capture running, wait for its next compaction (it compacts on its own; `pgtrail status` shows what is compacted) and ask again"
        );
    }
    crate::error_chain(e)
}

fn dir_error(path: &Path, source: std::io::Error) -> LogError {
    LogError::Directory {
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The client's side of a request against a "capture" that is this test: it takes the
    /// request as a capture does (a rename), touches it as the heartbeat does for a while,
    /// then stops touching it, as a capture killed while carrying it out would.
    #[test]
    fn a_client_waits_while_the_taken_request_is_touched_and_says_when_the_capture_stopped() {
        let archive = tempfile::tempdir().unwrap();
        let dir = archive.path().join(REQUESTS_DIR);
        let request = Request::Release {
            id: 1,
            reason: "r".into(),
        };
        let capture = std::thread::spawn({
            let dir = dir.clone();
            move || {
                let asked = loop {
                    let found = fs::read_dir(&dir).ok().and_then(|entries| {
                        entries
                            .filter_map(Result::ok)
                            .map(|e| e.path())
                            .find(|p| p.extension().is_some_and(|x| x == "json"))
                    });
                    if let Some(path) = found {
                        break path;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                };
                let taken = asked.with_extension("taken");
                fs::rename(&asked, &taken).unwrap();
                // Three times as long as the client's patience, touched five times a second.
                let working = Instant::now();
                while working.elapsed() < Duration::from_secs(3) {
                    touch(&taken);
                    std::thread::sleep(Duration::from_millis(200));
                }
                (taken, Instant::now())
            }
        });
        let mut heard = Vec::new();
        let said = submit_with(
            archive.path(),
            &request,
            Duration::from_secs(30),
            Duration::from_secs(1),
            |w| heard.push(format!("{w:?}")),
        );
        let gave_up = Instant::now();
        let (taken, last_touch) = capture.join().unwrap();
        match said {
            Err(RequestError::Stopped(path, 1)) => assert_eq!(path, taken),
            other => panic!("expected the capture to be said stopped, got {other:?}"),
        }
        assert!(
            gave_up > last_touch,
            "the client gave up while the request was still being touched"
        );
        assert_eq!(heard.first().map(String::as_str), Some("Left"), "{heard:?}");
        assert!(heard.iter().any(|w| w == "Taken"), "{heard:?}");
        // The taken request stays for the capture to carry out when it starts again.
        assert!(taken.exists());
    }
}
