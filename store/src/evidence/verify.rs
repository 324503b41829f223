//! `pgtrail verify`: recompute every leaf from the segments, the tree and its root, and check
//! them against what the log records and what signed checkpoints say, trusting no file of the
//! archive (only recomputation and signatures by keys the caller gives).

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

use datafusion::arrow::array::RecordBatch;

use super::leaf::{Leaf, batch_leaves, batch_leaves_and_row_digests};
use super::merkle::{Frontier, Hash};
use super::note::{Checkpoint, VerifierKey, WitnessKey};
use super::scratch::{ChangeFile, ChangePlace, TreeFile};
use super::spill::{LeafSpill, LeafStream};
use super::state::EVIDENCE_DIR;
use crate::error::{LogError, SegmentError};
use crate::log::LogReader;
use crate::lsn::{ChangeKey, Lsn};
use crate::manifest::SEGMENTS_DIR;
use crate::segment::key_index::{self, KeyIndexBuilder, KeyIndexProblem};
use crate::segment::{SegmentReader, key_copy};

/// What to check the archive against.
#[derive(Clone, Debug, Default)]
pub struct VerifyOptions {
    /// Keys whose signatures count (pinned by the auditor, never read from the archive).
    pub keys: Vec<VerifierKey>,
    /// Checkpoints kept outside the archive (path, signed note): the archive must extend
    /// each of them.
    pub trusted: Vec<(PathBuf, String)>,
    /// Cosigners (witnesses, auditors) whose `cosignature/v1` lines on checkpoints count.
    pub witnesses: Vec<WitnessKey>,
    /// Also check the derived files `row_history` reads beside each segment, its key index
    /// and key-ordered copy, against the segment (`pgtrail verify`; the proofs built on a
    /// verified tree need only the evidence).
    pub derived: bool,
    /// Read the log through this handle, which this process holds (a capture applying its
    /// retention policy verifies its own archive), rather than opening it read-only.
    pub log: Option<crate::SharedLog>,
}

/// One thing found wrong, naming where.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Problem {
    /// The file, change or checkpoint it is about.
    pub place: String,
    pub what: String,
}

/// A checkpoint checked against the recomputed tree.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CheckedCheckpoint {
    pub file: String,
    pub origin: String,
    pub size: u64,
    /// Signed by one of the given keys (false when no key was given).
    pub signature_verified: bool,
    /// Kept outside the archive (`--trusted-checkpoint`).
    pub trusted: bool,
    pub matches_tree: bool,
    /// The given cosigners whose cosignature on it verifies, with the time each states.
    pub cosigned_by: Vec<Cosignature>,
}

/// A cosigner's verified cosignature of a checkpoint.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Cosignature {
    pub witness: String,
    /// Seconds since 1970, as the cosigner stated it.
    pub time: u64,
}

/// What `verify` found.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct VerifyReport {
    /// True when nothing is wrong.
    pub ok: bool,
    pub problems: Vec<Problem>,
    pub warnings: Vec<String>,
    pub segments: u64,
    pub rows: u64,
    /// Rows compacted before the archive kept evidence (no leaf covers them).
    pub rows_before_evidence: u64,
    /// Leaves recomputed from the segments, and their tree's root (base64).
    pub tree_size: u64,
    pub root: String,
    /// What the log records of the tree (a mismatch is a problem).
    pub recorded_size: u64,
    pub recorded_root: String,
    /// Changes in the log not compacted yet: not in the tree, so not attested by any
    /// checkpoint until the next compaction.
    pub log_tail_changes: u64,
    pub checkpoints: Vec<CheckedCheckpoint>,
    /// The largest tree size a verified signature attests (0 when none).
    pub attested_size: u64,
    /// The largest tree size a given cosigner cosigned, on a checkpoint that matches the tree
    /// and whose signature verifies (0 when none).
    pub witnessed_size: u64,
    /// Gaps the capture recorded (changes the archive knows it does not hold).
    pub gaps: Vec<String>,
    /// The archive's own events in the tree (gaps and compaction watermarks).
    pub events: u64,
    /// Gaps the tree holds (their payloads): a gap recorded since the last compaction is in
    /// `gaps` but not here yet.
    pub attested_gaps: Vec<String>,
    /// Receipts of redactions the tree holds (their payloads: the change, the parts erased and
    /// their digests, why, when).
    pub redactions: Vec<String>,
    /// Receipts of retention purges the tree holds (tables, before which position, how many
    /// changes, how many kept their after image as the state at the position, why, when).
    pub purges: Vec<String>,
    /// Legal holds placed, and released, as the tree holds them (each hold as JSON).
    pub holds: Vec<String>,
    pub releases: Vec<String>,
    /// Key indexes found equal to their segment's keys, and key-ordered copies whose every
    /// row equals the segment row it copies (with [`VerifyOptions::derived`]).
    pub key_indexes_checked: u64,
    pub key_copies_checked: u64,
}

impl VerifyReport {
    fn problem(&mut self, place: impl Into<String>, what: impl Into<String>) {
        self.problems.push(Problem {
            place: place.into(),
            what: what.into(),
        });
    }
}

/// Verify the archive in `dir`. `progress` is told `(segments done, segments)`.
///
/// Errors are only for an archive that cannot be read at all (no log), or a temporary file
/// that cannot be written; everything wrong inside an archive is a [`Problem`] in the report.
/// Memory does not grow with the archive: each segment's leaves go to an unlinked temporary
/// file (44 bytes a change, in `TMPDIR`) and are merged from there into the tree's order.
pub fn verify_archive(
    dir: &Path,
    options: &VerifyOptions,
    progress: impl FnMut(u64, u64),
) -> Result<VerifyReport, LogError> {
    Ok(walk(dir, options, progress, |_, _| {})?.report)
}

/// What [`verify_and_collect`] read besides its report.
pub(crate) struct Collected {
    pub report: VerifyReport,
    /// Every change in key (= tree) order: its leaf, the index (in `segments`) of the segment
    /// holding it, and its index in the tree.
    pub changes: ChangeFile,
    /// The tree's leaf hashes in order (changes and events).
    pub tree: TreeFile,
    pub segments: Vec<crate::SegmentEntry>,
    pub epochs: super::leaf::Epochs,
    /// The erased parts' digests of redacted changes.
    pub erased: super::leaf::Redactions,
    /// The tree's events, in tree order.
    pub events: Vec<super::state::Event>,
}

/// [`verify_archive`], keeping every leaf of the tree, in temporary files (88 bytes a change
/// besides verify's 44; see `scratch`), for the proofs that need them (`prove`, `bundle`,
/// `certify`, `redact`).
pub(crate) fn verify_and_collect(
    dir: &Path,
    options: &VerifyOptions,
    progress: impl FnMut(u64, u64),
) -> Result<Collected, LogError> {
    let (mut changes, mut tree) = (ChangeFile::create()?, TreeFile::create()?);
    // The sink cannot fail the walk: its first error is kept and returned after it.
    let mut failed = None;
    let walked = walk(dir, options, progress, |hash, change| {
        if failed.is_some() {
            return;
        }
        let kept = match change {
            Some((leaf, segment)) => changes.push(&ChangePlace {
                leaf,
                segment,
                index: tree.len(),
            }),
            None => Ok(()),
        }
        .and_then(|()| tree.push(&hash));
        failed = kept.err();
    })?;
    if let Some(e) = failed {
        return Err(e);
    }
    changes.finish()?;
    tree.finish()?;
    let Walked {
        report,
        segments,
        epochs,
        erased,
        mut events,
    } = walked;
    events.sort_by_key(|e| (e.epoch, e.n));
    Ok(Collected {
        report,
        changes,
        tree,
        segments,
        epochs,
        erased,
        events,
    })
}

/// What [`walk`] read besides the leaves it gave its sink.
struct Walked {
    report: VerifyReport,
    segments: Vec<crate::SegmentEntry>,
    epochs: super::leaf::Epochs,
    erased: super::leaf::Redactions,
    events: Vec<super::state::Event>,
}

/// Verify the archive, giving `tree_leaf` every leaf of the tree in order: its hash, and for a
/// change its leaf and the index (in the segments sorted by key) of the segment holding it.
fn walk(
    dir: &Path,
    options: &VerifyOptions,
    mut progress: impl FnMut(u64, u64),
    mut tree_leaf: impl FnMut(Hash, Option<(Leaf, u32)>),
) -> Result<Walked, LogError> {
    let reader = match &options.log {
        Some(log) => LogReader::of_shared(log)?,
        None => LogReader::open_for_one_pass(dir)?,
    };
    let manifest = reader.manifest()?;
    let (state, erased, erased_at) = super::state::read_erasures(reader.read_transaction())?;
    let (log_tail, _) = reader.log_backlog()?;
    let gaps = reader.gaps()?;
    drop(reader);
    let mut report = VerifyReport {
        recorded_size: state.frontier.size(),
        recorded_root: BASE64.encode(state.frontier.root()),
        log_tail_changes: log_tail,
        gaps: gaps
            .iter()
            .map(|g| serde_json::to_string(g).unwrap_or_default())
            .collect(),
        ..VerifyReport::default()
    };
    // Checkpoints first (in the archive, every one signed so far, and those the caller
    // trusts), so that the tree's fold below can take the root at each size they name.
    let (wanted, checkpoint_problems) = read_checkpoints(dir, options, &mut report);

    let segments_dir = dir.join(SEGMENTS_DIR);
    let mut segments = manifest.segments.clone();
    segments.sort_by_key(|s| (s.min_key, s.id));
    let total = segments.len() as u64;
    let scratch = |source| LogError::VerifyScratch { source };
    // One stream per segment, numbered as the segments are: the merge names the segment of
    // each leaf by its stream.
    let spill = LeafSpill::create_temp().map_err(scratch)?;
    let streams: Vec<LeafStream> = segments.iter().map(|_| spill.stream()).collect();
    // Segments are read and their leaves recomputed on as many threads as there are cores;
    // the results are taken in segment order, so the report is the same on any machine.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    use std::sync::atomic::{AtomicUsize, Ordering};
    let (next, finished) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let mut checked: Vec<(usize, CheckedSegment)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(entry) = segments.get(i) else { break };
                        let leaves = &streams[i];
                        done.push((
                            i,
                            check_segment(
                                &segments_dir,
                                entry,
                                &state.epochs,
                                &erased,
                                leaves,
                                options.derived,
                            ),
                        ));
                        finished.fetch_add(1, Ordering::Relaxed);
                    }
                    done
                })
            })
            .collect();
        while !workers.iter().all(|w| w.is_finished()) {
            progress(finished.load(Ordering::Relaxed) as u64, total);
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        // A worker that panicked leaves its segments out: they are counted as missing below.
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap_or_default())
            .collect()
    });
    checked.sort_by_key(|(i, _)| *i);
    if checked.len() != segments.len() {
        report.problem(
            "pgtrail verify",
            "a segment could not be checked (a reader thread failed): run verify again",
        );
    }
    let mut spilled = vec![false; segments.len()];
    for (i, segment) in checked {
        if let Some(e) = segment.scratch {
            return Err(scratch(e));
        }
        report.segments += 1;
        report.rows += segment.rows;
        report.rows_before_evidence += segment.rows_before_evidence;
        report.key_indexes_checked += u64::from(segment.key_index_checked);
        report.key_copies_checked += u64::from(segment.key_copy_checked);
        report.problems.extend(segment.problems);
        report.warnings.extend(segment.warnings);
        spilled[i] = true;
    }
    // A segment whose worker failed contributes no leaf, whatever it wrote.
    for (stream, spilled) in streams.iter().zip(spilled) {
        if !spilled {
            stream.keep_first(0);
        }
    }
    progress(total, total);
    unlisted_files(&segments_dir, &segments, &mut report);

    // The tree, in one pass over the merged leaves: each epoch's changes, then its events
    // (gaps, the watermark), folded as they come, taking the root at every size a checkpoint
    // names and the changes around it (to say where a root differs).
    let mut sizes: Vec<u64> = wanted.iter().map(|c| c.size).collect();
    sizes.push(0);
    sizes.sort_unstable();
    sizes.dedup();
    let mut fold = Fold::new(&sizes);
    let mut order = match super::state::TreeOrder::new(&state.epochs, &state.events) {
        Ok(order) => Some(order),
        Err(why) => {
            report.problem("the log's evidence events", why);
            None
        }
    };
    let mut emit = |hash: Hash, change: Option<(Leaf, u32)>| {
        fold.push(hash, change.map(|(l, _)| l.key));
        tree_leaf(hash, change);
    };
    let mut merged = spill.merged().map_err(scratch)?;
    let mut previous: Option<(Leaf, u32)> = None;
    // The segment holding each redacted change (its table says which purge may cover it).
    let mut redacted_in: BTreeMap<ChangeKey, usize> = BTreeMap::new();
    while let Some(next) = merged.next_with_stream() {
        let (leaf, stream) = next.map_err(scratch)?;
        if !erased.is_empty() && erased.contains_key(&leaf.key) {
            redacted_in.insert(leaf.key, stream);
        }
        let change = (leaf, stream as u32);
        if let Some((p, ps)) = previous
            && p.key == leaf.key
        {
            report.problem(
                format!("change {}", leaf.key),
                format!(
                    "held twice, by segments {} and {}",
                    segments[ps as usize].file_name, segments[stream].file_name
                ),
            );
        }
        previous = Some(change);
        if let Some(Err(why)) = order
            .as_mut()
            .map(|o| o.change(leaf.key, &mut |h| emit(h, None)))
        {
            // The tree has no place for it: the events are left out from here on and every
            // change goes in as it comes, so that the report still has a root.
            report.problem("the log's evidence events", why);
            order = None;
        }
        emit(leaf.hash, Some(change));
    }
    if let Some(order) = order {
        order.finish(&mut |h| emit(h, None));
    }
    report.events = state.events.len() as u64;
    let receipts = check_events(&state.events, &mut report);
    check_receipts(receipts, &erased_at, &segments, &redacted_in, &mut report);
    report.problems.extend(checkpoint_problems);
    compare_checkpoints(&wanted, &fold, &mut report);
    finish_report(&mut report, options);
    Ok(Walked {
        report,
        segments,
        epochs: state.epochs,
        erased,
        events: state.events,
    })
}
/// The checkpoints to check the tree against: every one in the archive, then the trusted
/// ones, each opened with the given keys and entered in `report.checkpoints` (in the same
/// order as the result). Problems with the notes themselves come back apart, for the report
/// to list them after the segments' (a bad segment is the cause, a root that then differs
/// the consequence).
fn read_checkpoints(
    dir: &Path,
    options: &VerifyOptions,
    report: &mut VerifyReport,
) -> (Vec<Checkpoint>, Vec<Problem>) {
    let mut problems = Vec::new();
    let mut problem = |place: &str, what: String| {
        problems.push(Problem {
            place: place.to_string(),
            what,
        })
    };
    let mut notes: Vec<(String, String, bool)> = Vec::new();
    let checkpoints_dir = dir.join(EVIDENCE_DIR).join("checkpoints");
    if let Ok(entries) = std::fs::read_dir(&checkpoints_dir) {
        let mut files: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        files.sort();
        for path in files {
            if path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.'))
            {
                continue;
            }
            match std::fs::read_to_string(&path) {
                Ok(text) => notes.push((path.display().to_string(), text, false)),
                Err(e) => problem(&path.display().to_string(), format!("unreadable: {e}")),
            }
        }
    }
    for (path, text) in &options.trusted {
        notes.push((path.display().to_string(), text.clone(), true));
    }
    let mut wanted = Vec::new();
    for (file, text, trusted) in &notes {
        let (checkpoint, verified) = match open_checkpoint(text, &options.keys) {
            Ok(c) => c,
            Err(why) => {
                problem(file, why);
                continue;
            }
        };
        if *trusted && !verified {
            problem(
                file,
                "a trusted checkpoint must be signed by a key given with --key (none verifies it)"
                    .into(),
            );
            continue;
        }
        let mut cosigned_by = Vec::new();
        for witness in &options.witnesses {
            match witness.cosigned(text) {
                Ok(Some(time)) => cosigned_by.push(Cosignature {
                    witness: witness.name().to_string(),
                    time,
                }),
                Ok(None) => {}
                Err(e) => problem(
                    file,
                    format!(
                        "{e}: a cosignature line of a given --witness-key does not verify (edited, or copied from another checkpoint)"
                    ),
                ),
            }
        }
        report.checkpoints.push(CheckedCheckpoint {
            file: file.clone(),
            origin: checkpoint.origin.clone(),
            size: checkpoint.size,
            signature_verified: verified,
            trusted: *trusted,
            matches_tree: false,
            cosigned_by,
        });
        wanted.push(checkpoint);
    }
    (wanted, problems)
}

/// The tree folded one leaf at a time, remembering what the checkpoints are compared with: at
/// each of `sizes`, the root and the changes on either side.
struct Fold<'s> {
    frontier: Frontier,
    /// Ascending; one mark each. `next` is the first size not reached yet.
    sizes: &'s [u64],
    marks: Vec<Mark>,
    next: usize,
    last_change: Option<ChangeKey>,
}

/// What the fold saw when the tree reached one size.
#[derive(Clone, Copy, Default)]
struct Mark {
    root: Option<Hash>,
    /// The last change before the size, and the first at or after it (set by the next change
    /// that comes).
    before: Option<ChangeKey>,
    after: Option<ChangeKey>,
}

impl<'s> Fold<'s> {
    fn new(sizes: &'s [u64]) -> Fold<'s> {
        let mut fold = Fold {
            frontier: Frontier::new(),
            sizes,
            marks: vec![Mark::default(); sizes.len()],
            next: 0,
            last_change: None,
        };
        fold.mark_reached();
        fold
    }

    /// The next leaf of the tree; `change` is its change's key, if it is one.
    fn push(&mut self, hash: Hash, change: Option<ChangeKey>) {
        if let Some(key) = change {
            // The first change at or after every size reached since the last change.
            for mark in self.marks[..self.next].iter_mut().rev() {
                if mark.after.is_some() {
                    break;
                }
                mark.after = Some(key);
            }
            self.last_change = Some(key);
        }
        self.frontier.push(hash);
        self.mark_reached();
    }

    /// Mark every size the tree has just reached.
    fn mark_reached(&mut self) {
        while self
            .sizes
            .get(self.next)
            .is_some_and(|&s| s == self.frontier.size())
        {
            self.marks[self.next] = Mark {
                root: Some(self.frontier.root()),
                before: self.last_change,
                after: None,
            };
            self.next += 1;
        }
    }

    fn size(&self) -> u64 {
        self.frontier.size()
    }

    fn mark(&self, size: u64) -> Option<&Mark> {
        let at = self.sizes.binary_search(&size).ok()?;
        Some(&self.marks[at])
    }

    /// The first change at or after tree index `from` and the last before `to`, when some
    /// change lies between (both sizes must be among the fold's).
    fn changes_between(&self, from: u64, to: u64) -> Option<(ChangeKey, ChangeKey)> {
        let first = self.mark(from)?.after?;
        let last = self.mark(to)?.before?;
        (first <= last).then_some((first, last))
    }
}

/// Each checkpoint against the tree: not larger than it, and with the root of the tree's
/// prefix of its size; where a root differs, the leaves that must hold the alteration.
fn compare_checkpoints(wanted: &[Checkpoint], fold: &Fold<'_>, report: &mut VerifyReport) {
    let tree_size = fold.size();
    let mut too_large = Vec::new();
    for (checkpoint, checked) in wanted.iter().zip(report.checkpoints.iter_mut()) {
        checked.matches_tree =
            fold.mark(checkpoint.size).and_then(|m| m.root) == Some(checkpoint.root);
        if checkpoint.size > tree_size {
            too_large.push(Problem {
                place: checked.file.clone(),
                what: format!(
                    "attests {} changes but the archive's tree holds {tree_size}: the archive was rolled back, truncated or restored from an older copy",
                    checkpoint.size,
                ),
            });
        }
    }
    report.problems.extend(too_large);
    report.tree_size = tree_size;
    report.root = BASE64.encode(fold.frontier.root());
    let mismatched: Vec<(String, u64)> = report
        .checkpoints
        .iter()
        .filter(|c| !c.matches_tree && c.size <= tree_size)
        .map(|c| (c.file.clone(), c.size))
        .collect();
    for (file, size) in mismatched {
        // Where: after the largest smaller checkpoint whose signature verifies and whose root
        // matches, the history is as it attests; the change is among the leaves after it.
        let from = report
            .checkpoints
            .iter()
            .filter(|c| c.matches_tree && c.signature_verified && c.size < size)
            .map(|c| c.size)
            .max()
            .unwrap_or(0);
        let changes = match fold.changes_between(from, size) {
            Some((a, b)) => format!(" (changes {a} to {b} as the archive holds them now)"),
            None => String::new(),
        };
        report.problem(
            file,
            format!(
                "its root differs from the root of the archive's first {size} changes: history it attests was altered, removed, reordered or added to, among leaves {from}..{size}{changes}"
            ),
        );
    }
}

/// What the checked tree and checkpoints attest, the comparison with the log's own record of
/// the tree, the warnings, and the verdict.
fn finish_report(report: &mut VerifyReport, options: &VerifyOptions) {
    report.attested_size = report
        .checkpoints
        .iter()
        .filter(|c| c.signature_verified && c.matches_tree)
        .map(|c| c.size)
        .max()
        .unwrap_or(0);
    report.witnessed_size = report
        .checkpoints
        .iter()
        .filter(|c| c.signature_verified && c.matches_tree && !c.cosigned_by.is_empty())
        .map(|c| c.size)
        .max()
        .unwrap_or(0);
    if !options.witnesses.is_empty() && report.witnessed_size == 0 {
        report.warnings.push(
            "no checkpoint that matches the tree carries a cosignature of a given --witness-key"
                .into(),
        );
    }
    if (report.tree_size, report.root.as_str())
        != (report.recorded_size, report.recorded_root.as_str())
    {
        let what = format!(
            "the segments give {} leaves with root {}, the log records {} with root {}",
            report.tree_size, report.root, report.recorded_size, report.recorded_root
        );
        report.problem("the log's record of the tree", what);
    }
    if options.keys.is_empty() {
        report.warnings.push(
            "no --key given: signatures were not checked, so nothing proves who made this archive"
                .into(),
        );
    } else if report.attested_size < report.tree_size {
        report.warnings.push(format!(
            "changes {}..{} of the tree are not covered by a verified checkpoint yet",
            report.attested_size, report.tree_size
        ));
    }
    if report.log_tail_changes > 0 {
        report.warnings.push(format!(
            "{} changes in the log are not compacted yet: no leaf or checkpoint covers them (run `pgtrail checkpoint`)",
            report.log_tail_changes
        ));
    }
    if report.rows_before_evidence > 0 {
        report.warnings.push(format!(
            "{} changes were compacted before this archive kept evidence: no leaf covers them",
            report.rows_before_evidence
        ));
    }
    report.ok = report.problems.is_empty();
}

/// A checkpoint note's checkpoint and whether one of `keys` signed it.
pub(crate) fn open_checkpoint(
    text: &str,
    keys: &[VerifierKey],
) -> Result<(Checkpoint, bool), String> {
    for key in keys {
        if let Ok(body) = key.open(text) {
            let checkpoint = Checkpoint::parse(body).map_err(|e| e.to_string())?;
            if checkpoint.origin != key.name() {
                return Err(format!(
                    "its origin {:?} is not the name of the key that signed it ({:?})",
                    checkpoint.origin,
                    key.name()
                ));
            }
            return Ok((checkpoint, true));
        }
    }
    if !keys.is_empty() {
        return Err(
            "no given --key verifies its signature (edited, or signed by another key)".into(),
        );
    }
    let checkpoint = Checkpoint::in_note_unverified(text).map_err(|e| e.to_string())?;
    Ok((checkpoint, false))
}

/// The events' payloads read as what they claim: every watermark names the same source system
/// as the first (another system's archive spliced in would not), and the gaps are listed.
/// Returns what the tree records of erasures and holds, for [`check_receipts`].
fn check_events(events: &[super::state::Event], report: &mut VerifyReport) -> Receipts {
    let mut system: Option<String> = None;
    let mut receipts = Receipts {
        last_run_us: i64::MIN,
        holds: vec![Vec::new()],
        ..Receipts::default()
    };
    for e in events {
        let place = format!("evidence event {} of epoch {}", e.n, e.epoch);
        let Ok(payload) = serde_json::from_str::<serde_json::Value>(&e.payload) else {
            report.problem(place, "its payload is not JSON");
            continue;
        };
        let in_force = receipts.holds.len() - 1;
        match e.kind {
            super::leaf::KIND_GAP => report.attested_gaps.push(e.payload.clone()),
            super::leaf::KIND_REDACTION => {
                // A receipt naming no change (`lsn#seq`) accounts for none.
                if let Some(Ok(change)) = payload["change"].as_str().map(str::parse::<ChangeKey>) {
                    let at_us = payload["at_us"].as_i64().unwrap_or(i64::MIN);
                    receipts
                        .changes
                        .entry(change)
                        .or_default()
                        .push(Erasure { at_us, in_force });
                }
                report.redactions.push(e.payload.clone());
            }
            super::leaf::KIND_PURGE => {
                let tables = payload["tables"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|t| t.as_str().map(str::to_string))
                    .collect();
                if let Some(Ok(before)) = payload["before"].as_str().map(str::parse::<Lsn>) {
                    let at_us = payload["at_us"].as_i64().unwrap_or(i64::MIN);
                    receipts
                        .purges
                        .push((tables, before, Erasure { at_us, in_force }));
                }
                report.purges.push(e.payload.clone());
            }
            kind @ (super::leaf::KIND_HOLD | super::leaf::KIND_RELEASE) => {
                match serde_json::from_value::<super::hold::Hold>(payload) {
                    Ok(hold) => {
                        if let Some(release) = &hold.released {
                            receipts.released.insert(hold.id, release.at_us);
                        }
                        let mut holds = receipts.holds[in_force].clone();
                        holds.retain(|h| h.id != hold.id);
                        if kind == super::leaf::KIND_HOLD {
                            holds.push(hold);
                        }
                        receipts.holds.push(holds);
                    }
                    Err(why) => report.problem(place, format!("not a hold: {why}")),
                }
                match kind {
                    super::leaf::KIND_HOLD => report.holds.push(e.payload.clone()),
                    _ => report.releases.push(e.payload.clone()),
                }
            }
            super::leaf::KIND_WATERMARK => {
                let at_us = payload["at_us"].as_i64().unwrap_or(i64::MIN);
                receipts.last_run_us = receipts.last_run_us.max(at_us);
                let id = payload["system_id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                match &system {
                    Some(first) if *first != id => report.problem(
                        place,
                        format!("its source system {id} differs from the archive's earlier watermarks ({first})"),
                    ),
                    _ => system = Some(id),
                }
            }
            other => report.problem(place, format!("unknown event kind {other}")),
        }
    }
    receipts
}

/// An erasure the tree records: when (its receipt's time), and which holds were in force at
/// its receipt's place in the tree (an index into [`Receipts::holds`]).
#[derive(Clone, Copy)]
struct Erasure {
    at_us: i64,
    in_force: usize,
}

/// What the tree records of erasures: each change's receipts of its own, each
/// purge's tables and position, the holds in force after each hold placed or released, and
/// the latest compaction's time.
#[derive(Default)]
struct Receipts {
    changes: std::collections::HashMap<ChangeKey, Vec<Erasure>>,
    purges: Vec<(Vec<String>, Lsn, Erasure)>,
    holds: Vec<Vec<super::hold::Hold>>,
    /// When each hold released was released, by its number.
    released: std::collections::HashMap<u64, i64>,
    last_run_us: i64,
}

impl Receipts {
    /// The hold in force at `erasure` that covers the change `key` of `table`, if any. In
    /// force twice over: by the receipt's place among the hold leaves, and by the erasure's
    /// time between the hold's placing and its release (receipts of redactions an older
    /// pgtrail made became leaves before the run's holds, out of their order: so the time of
    /// a release later in the tree counts too).
    fn held_at(&self, erasure: Erasure, key: ChangeKey, table: &str) -> Option<&super::hold::Hold> {
        self.holds[erasure.in_force].iter().find(|h| {
            h.scope.takes_change(key, table)
                && h.placed_at_us <= erasure.at_us
                && self
                    .released
                    .get(&h.id)
                    .is_none_or(|&at_us| erasure.at_us < at_us)
        })
    }
}

/// Every erasure must be on the signed record, outside every legal hold over it: each
/// redacted change's latest erasure has a receipt leaf of its own (kind 5) or is covered by a
/// purge's receipt (kind 8: its table, before its position), and no receipt of it came while
/// a hold covering it was in force. A redaction without one is pending when no compaction ran
/// since it (its receipt becomes a leaf at the next one): a warning. Once a later
/// compaction's watermark is in the tree, a missing receipt means the erasure was kept off
/// the record: a problem naming the change.
fn check_receipts(
    receipts: Receipts,
    erased_at: &BTreeMap<ChangeKey, i64>,
    segments: &[crate::SegmentEntry],
    redacted_in: &BTreeMap<ChangeKey, usize>,
    report: &mut VerifyReport,
) {
    let mut pending: Vec<ChangeKey> = Vec::new();
    for (key, &at_us) in erased_at {
        let table = redacted_in
            .get(key)
            .and_then(|i| segments.get(*i))
            .map(|s| s.content.scope_name().unwrap_or_default());
        let Some(table) = table else {
            // No segment holds it: the changes' own checks speak of that.
            continue;
        };
        let place = || match table.as_str() {
            "" => format!("message {key}"),
            table => format!("change {key} of {table}"),
        };
        let own = receipts.changes.get(key);
        for erasure in own.into_iter().flatten() {
            if let Some(hold) = receipts.held_at(*erasure, *key, &table) {
                report.problem(
                    place(),
                    format!(
                        "erased while legal hold {} ({}) was in force over it",
                        hold.id, hold.reason
                    ),
                );
            }
        }
        // Its latest erasure: by a redaction of its own (the receipt and the record bear the
        // same time), or by the latest purge over it planned before.
        if own.is_some_and(|own| own.iter().any(|e| e.at_us == at_us)) {
            continue;
        }
        let purge = receipts
            .purges
            .iter()
            .rfind(|(tables, before, e)| {
                key.commit_lsn < *before && tables.contains(&table) && e.at_us <= at_us
            })
            .or_else(|| {
                receipts
                    .purges
                    .iter()
                    .find(|(tables, before, _)| key.commit_lsn < *before && tables.contains(&table))
            });
        if let Some((_, _, erasure)) = purge {
            let erased = Erasure { at_us, ..*erasure };
            if let Some(hold) = receipts.held_at(erased, *key, &table) {
                report.problem(
                    place(),
                    format!(
                        "purged while legal hold {} ({}) was in force over it",
                        hold.id, hold.reason
                    ),
                );
            }
            continue;
        }
        if at_us < receipts.last_run_us {
            report.problem(
                place(),
                match own {
                    Some(_) => "erased again with no receipt of that erasure in the tree (a later compaction ran): an erasure kept off the signed record",
                    None => "its values were erased but no receipt in the tree records it (a later compaction ran): an erasure kept off the signed record",
                },
            );
        } else {
            pending.push(*key);
        }
    }
    // One warning for them all: a purge erases a million changes at once.
    match pending.as_slice() {
        [] => {}
        [one] => report.warnings.push(format!(
            "change {one}: erased since the last compaction; its receipt becomes a leaf at the next one"
        )),
        [first, .., last] => report.warnings.push(format!(
            "{} changes ({first} to {last}): erased since the last compaction; their receipts become leaves at the next one",
            pending.len()
        )),
    }
}

/// What one segment holds, as [`check_segment`] found it.
#[derive(Default)]
struct CheckedSegment {
    rows: u64,
    rows_before_evidence: u64,
    problems: Vec<Problem>,
    /// Derived files found damaged or stale, which readers detect and do without.
    warnings: Vec<String>,
    key_index_checked: bool,
    key_copy_checked: bool,
    /// The temporary file of leaves could not be written: the archive was not verified.
    scratch: Option<SegmentError>,
}

/// Read one segment the manifest lists: its SHA-256, its description, its rows' order and key
/// range, its row count, and every row's leaf, written to `leaves` (which keeps only those of
/// the batches before the first problem). With `derived`, also its key index and key-ordered
/// copy (see [`check_key_files`]).
fn check_segment(
    segments_dir: &Path,
    entry: &crate::SegmentEntry,
    epochs: &super::leaf::Epochs,
    erased: &super::leaf::Redactions,
    leaves: &LeafStream,
    derived: bool,
) -> CheckedSegment {
    let mut out = CheckedSegment::default();
    let mut problem = |place: String, what: String| out.problems.push(Problem { place, what });
    let path = segments_dir.join(&entry.file_name);
    let place = format!("segment {}", entry.file_name);
    if !path.exists() {
        problem(place, "listed in the manifest but missing".into());
        return out;
    }
    let reader = match SegmentReader::open(&path, Some(&entry.sha256), 8192) {
        Ok(r) => r,
        Err(e) => {
            problem(place, segment_problem(&e));
            return out;
        }
    };
    if reader.content() != &entry.content {
        problem(place, "its description differs from the manifest's".into());
        return out;
    }
    let content = reader.content().clone();
    // The key index to compare with the segment's keys (a missing one is no finding: readers
    // scan without it), and the SHA-256 of the copy it names.
    let mut key_files = None;
    if derived && let Some(builder) = KeyIndexBuilder::for_content(&content) {
        match key_index::check(&path, &entry.sha256) {
            Ok(copy_sha256) => key_files = Some((builder, copy_sha256)),
            Err(KeyIndexProblem::Missing { .. }) => {}
            Err(e) => out.warnings.push(format!(
                "{e}: row_history scans the segment instead (`pgtrail compact` writes the index again)"
            )),
        }
    }
    let want_digests = key_files.is_some();
    let mut problem = |place: String, what: String| out.problems.push(Problem { place, what });
    // This thread decodes the batches and checks their keys; `leaf_hashers()` others hash
    // their leaves a few batches behind (a segment's decoding and hashing then use the cores
    // where each took turns on one, and a large segment read last left the others idle). The
    // hashers' results are taken in batch order and the first problem stops them, so the
    // problem reported is the one of the earliest batch, leaves before keys within a batch, as
    // when both ran in turn on one thread: the report does not depend on timing.
    let (hashed, checked) = std::thread::scope(|scope| {
        let (batches, to_hash) = std::sync::mpsc::sync_channel::<RecordBatch>(2);
        let content = &content;
        let hashing = scope.spawn(move || {
            let mut hashed = Hashed::default();
            let hash_batch = |batch: RecordBatch| {
                let rows = batch.num_rows();
                let computed = if want_digests {
                    batch_leaves_and_row_digests(content, &batch, epochs, erased)
                        .map(|(leaves, digests)| (leaves, Some(digests)))
                } else {
                    batch_leaves(content, &batch, epochs, erased).map(|leaves| (leaves, None))
                };
                (rows, computed)
            };
            map_in_order(
                to_hash,
                leaf_hashers(),
                hash_batch,
                |(rows, computed)| match computed {
                    Ok((batch_leaves, digests)) => {
                        if let Err(e) = leaves.write(&batch_leaves) {
                            hashed.scratch = Some(e);
                            return false;
                        }
                        hashed.row_digests.extend(digests.into_iter().flatten());
                        hashed.per_batch.push((rows, batch_leaves.len()));
                        true
                    }
                    Err(e) => {
                        hashed.failed = Some(e);
                        false
                    }
                },
            );
            hashed
        });
        let builder = key_files.as_mut().map(|(builder, _)| builder);
        let checked = check_batches(reader, entry, &place, batches, builder);
        (hashing.join(), checked)
    });
    let hashed = hashed.unwrap_or_else(|_| Hashed {
        failed: Some(super::leaf::LeafError {
            key: entry.min_key,
            reason: "the thread computing its leaves panicked (a pgtrail bug: please report it)"
                .into(),
        }),
        ..Hashed::default()
    });
    // The batches before the first problem count; the first problem is reported.
    let leaf_problem = hashed.failed.map(|e| {
        let at = hashed.per_batch.len();
        (at, format!("{place}, change {}", e.key), e.reason)
    });
    let first = match (leaf_problem, checked.problem) {
        (Some(l), Some(k)) => Some(if l.0 <= k.0 { l } else { k }),
        (l, k) => l.or(k),
    };
    let good = first.as_ref().map_or(hashed.per_batch.len(), |p| p.0);
    let bad = first.is_some();
    if let Some((_, place, what)) = first {
        problem(place, what);
    }
    let (good_rows, good_leaves) = hashed.per_batch[..good.min(hashed.per_batch.len())]
        .iter()
        .fold((0u64, 0usize), |(r, l), (rows, leaves)| {
            (r + *rows as u64, l + leaves)
        });
    leaves.keep_first(good_leaves as u64);
    let (rows, before_evidence) = (checked.rows, good_rows - good_leaves as u64);
    if !bad && rows != entry.rows {
        problem(
            place,
            format!("holds {rows} rows, the manifest lists {}", entry.rows),
        );
    }
    out.rows = rows;
    out.rows_before_evidence = before_evidence;
    out.scratch = hashed.scratch;
    if let Some((builder, copy_sha256)) = key_files
        && !bad
    {
        match checked.key_error {
            Some(why) => out.problems.push(Problem {
                place: format!("segment {}", entry.file_name),
                what: format!("its key index cannot be computed again: {why}"),
            }),
            None => check_key_files(
                &path,
                entry,
                &content,
                builder.into_entries(),
                copy_sha256,
                &hashed.row_digests,
                (epochs, erased),
                &mut out,
            ),
        }
    }
    out
}

/// Compare the key index of the segment at `path` with `built`, the entries its rows give, and
/// each row of the key-ordered copy the index names (SHA-256 `copy_sha256`) with the segment
/// row it copies, by their digests (`row_digests`, every segment row's, in order).
///
/// Both files are derived data that `row_history` believes once their own checksums hold, so
/// one rewritten consistently with its checksums is a problem (the answers would show what
/// the segment does not hold); one whose checksums fail is a warning, as readers notice it
/// and read the segment instead.
#[allow(clippy::too_many_arguments)]
fn check_key_files(
    path: &Path,
    entry: &crate::SegmentEntry,
    content: &crate::segment::SegmentContent,
    built: Vec<(u32, u32)>,
    copy_sha256: Option<String>,
    row_digests: &[Hash],
    (epochs, erased): (&super::leaf::Epochs, &super::leaf::Redactions),
    out: &mut CheckedSegment,
) {
    let rebuild = "remove it and run `pgtrail compact`, which writes it again from the segment";
    let index_place = format!("key index {}", key_index::key_index_name(&entry.file_name));
    let stored = match key_index::entries(path, &entry.sha256) {
        Ok(stored) => stored,
        Err(e) => {
            out.warnings.push(format!(
                "{e}: row_history scans the segment instead (`pgtrail compact` writes the index again)"
            ));
            return;
        }
    };
    if stored != built {
        let at = stored
            .iter()
            .zip(&built)
            .position(|(a, b)| a != b)
            .unwrap_or(stored.len().min(built.len()));
        out.problems.push(Problem {
            place: index_place,
            what: format!(
                "its entries differ from the segment's keys from entry {at} on ({} entries where the segment's rows give {}): row_history would miss or misplace changes; {rebuild}",
                stored.len(),
                built.len()
            ),
        });
        return;
    }
    out.key_index_checked = true;
    let Some(copy_sha256) = copy_sha256 else {
        return;
    };
    let copy_name = key_copy::key_copy_name(&entry.file_name);
    let mut copy_path = path.as_os_str().to_owned();
    copy_path.push(key_copy::KEY_COPY_SUFFIX);
    let copy_place = format!("key-ordered copy {copy_name}");
    let reader = match SegmentReader::open(Path::new(&copy_path), Some(&copy_sha256), 8192) {
        Ok(reader) => reader,
        Err(e) => {
            out.warnings.push(format!(
                "{copy_place}: {}: row_history reads the segment instead (`pgtrail compact` writes the copy again)",
                segment_problem(&e)
            ));
            return;
        }
    };
    if reader.content() != content {
        out.problems.push(Problem {
            place: copy_place,
            what: format!("its description differs from its segment's; {rebuild}"),
        });
        return;
    }
    let mut problem = |place: String, what: String| out.problems.push(Problem { place, what });
    // Every row of the copy is hashed as the segment's were: this thread decodes the batches,
    // `leaf_hashers()` others hash them, and a comparer takes their digests in row order and
    // stops at the first that differs (the problem reported does not depend on timing).
    let compared = std::thread::scope(|scope| {
        let (batches, to_hash) =
            std::sync::mpsc::sync_channel::<Result<RecordBatch, SegmentError>>(2);
        let (copy_place, built) = (&copy_place, &built);
        let comparing = scope.spawn(move || {
            let mut i = 0usize;
            let mut found: Option<(String, String)> = None;
            let digest_batch = |batch: Result<RecordBatch, SegmentError>| {
                batch.map(|batch| {
                    let digests = batch_leaves_and_row_digests(content, &batch, epochs, erased)
                        .map(|(_, digests)| digests);
                    (batch, digests)
                })
            };
            map_in_order(to_hash, leaf_hashers(), digest_batch, |result| {
                let (batch, digests) = match result {
                    Ok((batch, Ok(digests))) => (batch, digests),
                    Ok((_, Err(e))) => {
                        found = Some((format!("{copy_place}, change {}", e.key), e.reason));
                        return false;
                    }
                    Err(e) => {
                        found = Some((copy_place.clone(), segment_problem(&e)));
                        return false;
                    }
                };
                for (r, digest) in digests.iter().enumerate() {
                    let Some(&(_, row)) = built.get(i) else {
                        found = Some((
                            copy_place.clone(),
                            format!(
                                "holds more rows than its index's {} entries; {rebuild}",
                                built.len()
                            ),
                        ));
                        return false;
                    };
                    if row_digests.get(row as usize) != Some(digest) {
                        let key =
                            row_key(&batch, r).map_or(String::new(), |k| format!(" (change {k})"));
                        found = Some((
                            format!("{copy_place}, row {i}{key}"),
                            format!(
                                "differs from segment row {row}, which it copies: row_history would show what the segment does not hold; {rebuild}"
                            ),
                        ));
                        return false;
                    }
                    i += 1;
                }
                true
            });
            (i, found)
        });
        for batch in reader {
            let failed = batch.is_err();
            // A failed send: the comparer stopped at a problem.
            if batches.send(batch).is_err() || failed {
                break;
            }
        }
        drop(batches);
        comparing.join()
    });
    let i = match compared {
        Ok((_, Some((place, what)))) => return problem(place, what),
        Ok((i, None)) => i,
        Err(_) => {
            return problem(
                copy_place,
                "the thread comparing it with its segment panicked (a pgtrail bug: please report it)"
                    .into(),
            );
        }
    };
    if i != built.len() {
        return problem(
            copy_place,
            format!(
                "holds {i} rows where its index has {} entries; {rebuild}",
                built.len()
            ),
        );
    }
    out.key_copy_checked = true;
}

/// The change key of row `row` of a segment batch (lsn and seq are its first two columns).
fn row_key(batch: &RecordBatch, row: usize) -> Option<ChangeKey> {
    use datafusion::arrow::array::AsArray;
    use datafusion::arrow::datatypes::{UInt32Type, UInt64Type};
    let lsn = batch.column(0).as_primitive_opt::<UInt64Type>()?;
    let seq = batch.column(1).as_primitive_opt::<UInt32Type>()?;
    Some(ChangeKey::new(crate::Lsn(lsn.value(row)), seq.value(row)))
}

/// How many threads hash one segment's leaves beside the thread decoding it. With one, verify
/// used 1.25 cores of 2 on an archive of 2.9 million changes whose work was mostly one segment
/// (README, Performance), so the hashing was the slower side; two made it 1.45 times faster
/// there. More were not tried: several segments are already checked side by side.
fn leaf_hashers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(2))
}

/// Apply `f` to each item `input` yields on `workers` threads, and hand the results to `sink`
/// in the input's order, until the input ends or `sink` returns `false`. Then the workers stop
/// after the item each has in hand, and `input` is dropped, so that its sender sees the end. A
/// worker takes an item at most `2 × workers` ahead of the next one `sink` is waiting for, so
/// a slow item holds back at most that many results in memory.
fn map_in_order<T: Send, R: Send>(
    input: std::sync::mpsc::Receiver<T>,
    workers: usize,
    f: impl Fn(T) -> R + Sync,
    mut sink: impl FnMut(R) -> bool,
) {
    struct Taking<T> {
        input: std::sync::mpsc::Receiver<T>,
        /// Items taken, and handed to `sink`.
        taken: usize,
        handed: usize,
        stopped: bool,
    }
    let workers = workers.max(1);
    let ahead = 2 * workers;
    let taking = std::sync::Mutex::new(Taking {
        input,
        taken: 0,
        handed: 0,
        stopped: false,
    });
    let moved = std::sync::Condvar::new();
    let lock = || taking.lock().unwrap_or_else(|e| e.into_inner());
    std::thread::scope(|scope| {
        let (results, done) = std::sync::mpsc::sync_channel::<(usize, R)>(workers);
        for _ in 0..workers {
            let (f, results, moved) = (&f, results.clone(), &moved);
            scope.spawn(move || {
                loop {
                    let next = {
                        let mut t = lock();
                        // The item `sink` waits for is taken (it is below `taken`), so its
                        // worker will hand it in and move `handed` on: this wait ends.
                        while !t.stopped && t.taken >= t.handed + ahead {
                            t = moved.wait(t).unwrap_or_else(|e| e.into_inner());
                        }
                        if t.stopped {
                            break;
                        }
                        let Ok(item) = t.input.recv() else { break };
                        t.taken += 1;
                        (t.taken - 1, item)
                    };
                    // A panic (a bug) stops the others too, which would otherwise wait for the
                    // result it never sends; the scope then passes the panic on.
                    let result =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(next.1)))
                            .unwrap_or_else(|panic| {
                                lock().stopped = true;
                                moved.notify_all();
                                std::panic::resume_unwind(panic)
                            });
                    // The sink stopped: its receiver is gone.
                    if results.send((next.0, result)).is_err() {
                        break;
                    }
                }
            });
        }
        drop(results);
        let mut waiting = BTreeMap::new();
        let mut next = 0usize;
        let mut going = true;
        for (at, result) in done.iter() {
            waiting.insert(at, result);
            while let Some(result) = waiting.remove(&next) {
                next += 1;
                going = sink(result);
                if !going {
                    break;
                }
            }
            let mut t = lock();
            t.handed = next;
            // Never set back: a worker's panic may have stopped it.
            t.stopped |= !going;
            moved.notify_all();
            drop(t);
            if !going {
                break;
            }
        }
        // Dropping the receiver ends the workers' sends; dropping the input's receiver (with
        // `taking`, once the workers are done) ends its sender's.
        drop(done);
    });
}

/// What the hashing thread of [`check_segment`] did: per batch hashed, its rows and leaves
/// (written to the segment's stream of leaves), and why it stopped early, if it did.
#[derive(Default)]
struct Hashed {
    per_batch: Vec<(usize, usize)>,
    /// Every row's digest (see `batch_leaves_and_row_digests`), when a key-ordered copy is to
    /// be compared with the segment.
    row_digests: Vec<Hash>,
    failed: Option<super::leaf::LeafError>,
    scratch: Option<SegmentError>,
}

/// What [`check_batches`] found: the rows read, and the first problem (batch index, place,
/// what).
struct CheckedBatches {
    rows: u64,
    problem: Option<(usize, String, String)>,
    /// Why the key index entries of the rows could not be computed.
    key_error: Option<String>,
}

/// Decode the batches of a segment, send each to `to_hash`, and check their keys: sorted,
/// inside the manifest's range. Stops at the first problem (or when the hashing stopped).
/// Adds each batch to `key_index`, if given.
fn check_batches(
    reader: SegmentReader,
    entry: &crate::SegmentEntry,
    place: &str,
    to_hash: std::sync::mpsc::SyncSender<RecordBatch>,
    mut key_index: Option<&mut KeyIndexBuilder>,
) -> CheckedBatches {
    let mut out = CheckedBatches {
        rows: 0,
        problem: None,
        key_error: None,
    };
    let mut last: Option<ChangeKey> = None;
    for (i, batch) in reader.enumerate() {
        let batch = match batch {
            Ok(b) => b,
            Err(e) => {
                out.problem = Some((i, place.to_string(), segment_problem(&e)));
                break;
            }
        };
        out.rows += batch.num_rows() as u64;
        // Hashed before its keys are checked, so that a batch with both kinds of problem
        // reports its leaf's (as verify always did).
        if to_hash.send(batch.clone()).is_err() {
            // The hashing stopped at a problem of its own, in this batch or an earlier one.
            break;
        }
        if let Some(builder) = key_index.as_deref_mut()
            && out.key_error.is_none()
            && let Err(why) = builder.add(&batch)
        {
            out.key_error = Some(why);
        }
        // Row keys, in file order: sorted, inside the manifest's range.
        let lsn = batch
            .column(0)
            .as_any()
            .downcast_ref::<datafusion::arrow::array::UInt64Array>();
        let seq = batch
            .column(1)
            .as_any()
            .downcast_ref::<datafusion::arrow::array::UInt32Array>();
        let (Some(lsn), Some(seq)) = (lsn, seq) else {
            out.problem = Some((
                i,
                place.to_string(),
                "its lsn and seq columns are not u64 and u32".into(),
            ));
            break;
        };
        for row in 0..batch.num_rows() {
            let key = ChangeKey::new(crate::Lsn(lsn.value(row)), seq.value(row));
            if last.is_some_and(|l| l >= key) {
                out.problem = Some((
                    i,
                    format!("{place}, change {key}"),
                    "rows out of (lsn, seq) order or repeated".into(),
                ));
                return out;
            }
            if key < entry.min_key || key > entry.max_key {
                out.problem = Some((
                    i,
                    format!("{place}, change {key}"),
                    format!(
                        "outside the key range the manifest lists ({} to {})",
                        entry.min_key, entry.max_key
                    ),
                ));
                return out;
            }
            last = Some(key);
        }
    }
    out
}

fn segment_problem(e: &SegmentError) -> String {
    crate::error_chain(e)
}

fn unlisted_files(dir: &Path, listed: &[crate::SegmentEntry], report: &mut VerifyReport) {
    let listed: HashSet<&str> = listed.iter().map(|s| s.file_name.as_str()).collect();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".parquet") && !listed.contains(name.as_str()) {
            report.warnings.push(format!(
                "segment file {name} is listed by no manifest (a merge's retired input, or a file put there): its rows were not read"
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Lsn;

    /// Results come out in the input's order however long each item takes, and a sink that
    /// stops ends the workers and lets the input's sender see the end instead of blocking.
    #[test]
    fn items_mapped_on_several_threads_come_out_in_order_and_a_stop_ends_them() {
        let (tx, rx) = std::sync::mpsc::sync_channel::<u64>(2);
        let feeder = std::thread::spawn(move || (0..200u64).map(|i| tx.send(i)).all(|r| r.is_ok()));
        let mut seen = Vec::new();
        let slow_on_evens = |i: u64| {
            if i.is_multiple_of(2) {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            i * 10
        };
        map_in_order(rx, 3, slow_on_evens, |r| {
            seen.push(r);
            true
        });
        assert_eq!(seen, (0..200u64).map(|i| i * 10).collect::<Vec<_>>());
        assert!(feeder.join().unwrap(), "every item was taken");

        // A slow first item: until `sink` has it, no worker starts an item 2 × workers ahead.
        let (tx, rx) = std::sync::mpsc::sync_channel::<usize>(2);
        let feeder = std::thread::spawn(move || (0..100).all(|i| tx.send(i).is_ok()));
        let started = std::sync::atomic::AtomicUsize::new(0);
        let mut furthest_before_first = None;
        map_in_order(
            rx,
            3,
            |i: usize| {
                started.fetch_max(i, std::sync::atomic::Ordering::SeqCst);
                if i == 0 {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                i
            },
            |i| {
                if i == 0 {
                    furthest_before_first = Some(started.load(std::sync::atomic::Ordering::SeqCst));
                }
                true
            },
        );
        assert!(feeder.join().unwrap());
        let furthest = furthest_before_first.unwrap();
        assert!(
            furthest < 6,
            "item {furthest} started before item 0 was handed on"
        );

        // A panic on one item ends the call with that panic, not with the others waiting for
        // it for ever.
        let (tx, rx) = std::sync::mpsc::sync_channel::<usize>(2);
        let feeder =
            std::thread::spawn(move || (0..).map(|i| tx.send(i)).take_while(Result::is_ok).count());
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            map_in_order(
                rx,
                3,
                |i: usize| {
                    assert!(i != 3, "item 3 panics");
                    i
                },
                |_| true,
            )
        }));
        assert!(outcome.is_err(), "the panic was passed on");
        // Its input was dropped: the endless feeder ended.
        feeder.join().unwrap();

        let (tx, rx) = std::sync::mpsc::sync_channel::<u64>(2);
        let feeder =
            std::thread::spawn(move || (0..).map(|i| tx.send(i)).take_while(Result::is_ok).count());
        let mut seen = Vec::new();
        map_in_order(
            rx,
            3,
            |i: u64| i,
            |r| {
                seen.push(r);
                r < 9
            },
        );
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
        // The sender's sends fail once the workers are gone: an endless input ends, having
        // given at most the 10 items handed on, the 2 × 3 taken ahead of them, and the 2 its
        // channel holds.
        let sent = feeder.join().unwrap();
        assert!(sent <= 10 + 2 * 3 + 2, "{sent} items sent");
    }

    /// The fold takes the root at each size a checkpoint names, as a fold of the whole tree
    /// would, and the changes on either side of each size, events in between left out.
    #[test]
    fn the_fold_marks_each_size_with_its_root_and_the_changes_around_it() {
        let key = |n: u64| ChangeKey::new(Lsn(n), 0);
        // Leaves 0-5: changes 1 and 2, an event, changes 3 and 4, an event.
        let leaves: Vec<(Hash, Option<ChangeKey>)> =
            [Some(1), Some(2), None, Some(3), Some(4), None]
                .iter()
                .enumerate()
                .map(|(i, c)| ([i as u8; 32], c.map(key)))
                .collect();
        let sizes = [0, 2, 3, 6];
        let mut fold = Fold::new(&sizes);
        for (hash, change) in &leaves {
            fold.push(*hash, *change);
        }
        for &size in &sizes {
            let mut whole = Frontier::new();
            for (hash, _) in &leaves[..size as usize] {
                whole.push(*hash);
            }
            assert_eq!(
                fold.mark(size).unwrap().root,
                Some(whole.root()),
                "size {size}"
            );
        }
        assert!(fold.mark(4).is_none());
        assert_eq!(fold.changes_between(0, 2), Some((key(1), key(2))));
        // Leaves 2..3 hold the event alone; 3..6 changes 3 and 4.
        assert_eq!(fold.changes_between(2, 3), None);
        assert_eq!(fold.changes_between(3, 6), Some((key(3), key(4))));
        assert_eq!(fold.changes_between(0, 6), Some((key(1), key(4))));
    }
}
