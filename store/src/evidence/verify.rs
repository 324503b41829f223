//! `pgtrail verify`: recompute every leaf from the segments, the tree and its root, and check
//! them against what the log records and what signed checkpoints say, trusting no file of the
//! archive (only recomputation and signatures by keys the caller gives).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

use datafusion::arrow::array::RecordBatch;

use super::leaf::{Leaf, batch_leaves};
use super::merkle::{Frontier, Hash};
use super::note::{Checkpoint, VerifierKey, WitnessKey};
use super::state::EVIDENCE_DIR;
use crate::error::{LogError, SegmentError};
use crate::log::LogReader;
use crate::lsn::ChangeKey;
use crate::manifest::SEGMENTS_DIR;
use crate::segment::SegmentReader;

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
/// Errors are only for an archive that cannot be read at all (no log); everything wrong inside
/// an archive is a [`Problem`] in the report.
pub fn verify_archive(
    dir: &Path,
    options: &VerifyOptions,
    progress: impl FnMut(u64, u64),
) -> Result<VerifyReport, LogError> {
    Ok(verify_and_collect(dir, options, progress)?.report)
}

/// What [`verify_and_collect`] read besides its report.
pub(crate) struct Collected {
    pub report: VerifyReport,
    /// Every change's leaf in key order, with the index (in `segments`) of the segment
    /// holding it, and its index in the tree.
    pub leaves: Vec<(Leaf, u32)>,
    pub change_index: Vec<u64>,
    /// The tree's leaf hashes in order (changes and events).
    pub tree: Vec<Hash>,
    pub segments: Vec<crate::SegmentEntry>,
    pub epochs: super::leaf::Epochs,
    /// The erased parts' digests of redacted changes.
    pub erased: super::leaf::Redactions,
    /// The tree's events, in tree order.
    pub events: Vec<super::state::Event>,
}

pub(crate) fn verify_and_collect(
    dir: &Path,
    options: &VerifyOptions,
    mut progress: impl FnMut(u64, u64),
) -> Result<Collected, LogError> {
    let reader = LogReader::open(dir)?;
    let manifest = reader.manifest()?;
    let state = super::state::read(reader.read_transaction())?;
    let erased = state.erased()?;
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
    let segments_dir = dir.join(SEGMENTS_DIR);
    let mut segments = manifest.segments.clone();
    segments.sort_by_key(|s| (s.min_key, s.id));
    let total = segments.len() as u64;
    // (key, leaf hash, index of the segment holding it)
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
                        done.push((
                            i,
                            check_segment(&segments_dir, entry, &state.epochs, &erased),
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
    // Sized from the leaves computed, not from the manifest's row counts: the manifest is
    // what is being checked, and a forged count must not decide an allocation.
    let mut leaves: Vec<(Leaf, u32)> =
        Vec::with_capacity(checked.iter().map(|(_, s)| s.leaves.len()).sum());
    for (i, segment) in checked {
        report.segments += 1;
        report.rows += segment.rows;
        report.rows_before_evidence += segment.rows_before_evidence;
        report.problems.extend(segment.problems);
        leaves.extend(segment.leaves.into_iter().map(|l| (l, i as u32)));
    }
    progress(total, total);
    unlisted_files(&segments_dir, &segments, &mut report);

    leaves.sort_unstable_by_key(|(l, _)| l.key);
    for pair in leaves.windows(2) {
        if pair[0].0.key == pair[1].0.key {
            let (a, b) = (pair[0].1 as usize, pair[1].1 as usize);
            report.problem(
                format!("change {}", pair[0].0.key),
                format!(
                    "held twice, by segments {} and {}",
                    segments[a].file_name, segments[b].file_name
                ),
            );
        }
    }

    // The tree: each epoch's changes, then its events (gaps, the watermark).
    let (tree, change_index) =
        match super::state::tree_order(&leaves, |(l, _)| l, &state.epochs, &state.events) {
            Ok(t) => t,
            Err(why) => {
                report.problem("the log's evidence events", why);
                (leaves.iter().map(|(l, _)| l.hash).collect(), Vec::new())
            }
        };
    report.events = state.events.len() as u64;
    check_events(&state.events, &mut report);

    // Checkpoints: in the archive (every one signed so far) and those the caller trusts.
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
                Err(e) => report.problem(path.display().to_string(), format!("unreadable: {e}")),
            }
        }
    }
    for (path, text) in &options.trusted {
        notes.push((path.display().to_string(), text.clone(), true));
    }
    let mut wanted: Vec<(usize, Checkpoint)> = Vec::new();
    for (i, (file, text, trusted)) in notes.iter().enumerate() {
        let (checkpoint, verified) = match open_checkpoint(text, &options.keys) {
            Ok(c) => c,
            Err(why) => {
                report.problem(file, why);
                continue;
            }
        };
        if *trusted && !verified {
            report.problem(
                file,
                "a trusted checkpoint must be signed by a key given with --key (none verifies it)",
            );
            continue;
        }
        if checkpoint.size > tree.len() as u64 {
            report.problem(
                file,
                format!(
                    "attests {} changes but the archive's tree holds {}: the archive was rolled back, truncated or restored from an older copy",
                    checkpoint.size,
                    tree.len()
                ),
            );
        }
        let mut cosigned_by = Vec::new();
        for witness in &options.witnesses {
            match witness.cosigned(text) {
                Ok(Some(time)) => cosigned_by.push(Cosignature {
                    witness: witness.name().to_string(),
                    time,
                }),
                Ok(None) => {}
                Err(e) => report.problem(
                    file,
                    format!("{e}: a cosignature line of a given --witness-key does not verify (edited, or copied from another checkpoint)"),
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
        wanted.push((i, checkpoint));
    }

    // Fold the tree once, taking the root at every size a checkpoint names.
    let mut roots_at: Vec<(u64, Hash)> = Vec::new();
    let mut sizes: Vec<u64> = wanted.iter().map(|(_, c)| c.size).collect();
    sizes.sort_unstable();
    sizes.dedup();
    let mut next = sizes.iter().peekable();
    let mut frontier = Frontier::new();
    while next.peek().is_some_and(|&&s| s == 0) {
        roots_at.push((0, frontier.root()));
        next.next();
    }
    for hash in &tree {
        frontier.push(*hash);
        while next.peek().is_some_and(|&&s| s == frontier.size()) {
            roots_at.push((frontier.size(), frontier.root()));
            next.next();
        }
    }
    report.tree_size = frontier.size();
    report.root = BASE64.encode(frontier.root());
    for ((_, checkpoint), checked) in wanted.iter().zip(report.checkpoints.iter_mut()) {
        checked.matches_tree = roots_at
            .iter()
            .any(|(size, root)| *size == checkpoint.size && *root == checkpoint.root);
    }
    let mismatched: Vec<(String, u64)> = report
        .checkpoints
        .iter()
        .filter(|c| !c.matches_tree && c.size <= report.tree_size)
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
        let first = change_index.partition_point(|&i| i < from);
        let last = change_index.partition_point(|&i| i < size);
        let changes = match (
            leaves.get(first),
            last.checked_sub(1).and_then(|l| leaves.get(l)),
        ) {
            (Some((a, _)), Some((b, _))) if first < last => {
                format!(
                    " (changes {} to {} as the archive holds them now)",
                    a.key, b.key
                )
            }
            _ => String::new(),
        };
        report.problem(
            file,
            format!(
                "its root differs from the root of the archive's first {size} changes: history it attests was altered, removed, reordered or added to, among leaves {from}..{size}{changes}"
            ),
        );
    }
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
        report.problem(
            "the log's record of the tree",
            format!(
                "the segments give {} leaves with root {}, the log records {} with root {}",
                report.tree_size, report.root, report.recorded_size, report.recorded_root
            ),
        );
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
    Ok(Collected {
        report,
        leaves,
        change_index,
        tree,
        segments,
        epochs: state.epochs,
        erased,
        events: {
            let mut events = state.events;
            events.sort_by_key(|e| (e.epoch, e.n));
            events
        },
    })
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
fn check_events(events: &[super::state::Event], report: &mut VerifyReport) {
    let mut system: Option<String> = None;
    for e in events {
        let place = format!("evidence event {} of epoch {}", e.n, e.epoch);
        let Ok(payload) = serde_json::from_str::<serde_json::Value>(&e.payload) else {
            report.problem(place, "its payload is not JSON");
            continue;
        };
        match e.kind {
            super::leaf::KIND_GAP => report.attested_gaps.push(e.payload.clone()),
            super::leaf::KIND_REDACTION => report.redactions.push(e.payload.clone()),
            super::leaf::KIND_WATERMARK => {
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
}

/// What one segment holds, as [`check_segment`] found it.
#[derive(Default)]
struct CheckedSegment {
    rows: u64,
    rows_before_evidence: u64,
    leaves: Vec<Leaf>,
    problems: Vec<Problem>,
}

/// Read one segment the manifest lists: its SHA-256, its description, its rows' order and key
/// range, its row count, and every row's leaf.
fn check_segment(
    segments_dir: &Path,
    entry: &crate::SegmentEntry,
    epochs: &super::leaf::Epochs,
    erased: &super::leaf::Redactions,
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
    // This thread decodes the batches and checks their keys; a second one hashes their
    // leaves a few batches behind (a segment's decoding and hashing then use two cores, where
    // each took turns on one and a large segment read last left the other core idle). The
    // problem reported is the one of the earliest batch, leaves before keys within a batch,
    // as when both ran in turn on one thread: the report does not depend on timing.
    let (hashed, checked) = std::thread::scope(|scope| {
        let (batches, to_hash) = std::sync::mpsc::sync_channel::<RecordBatch>(2);
        let content = &content;
        // Sized once (growing it copied every leaf again at each doubling), from the manifest's
        // row count, which is being checked: bounded by the file's size, so that a forged
        // count cannot ask for more memory than a real one could.
        let file_bytes = std::fs::metadata(&path).map_or(0, |m| m.len());
        let rows = usize::try_from(entry.rows.min(file_bytes)).unwrap_or(0);
        let hashing = scope.spawn(move || {
            let mut hashed = Hashed {
                leaves: Vec::with_capacity(rows),
                ..Hashed::default()
            };
            for batch in to_hash {
                match batch_leaves(content, &batch, epochs, erased) {
                    Ok(leaves) => {
                        hashed.per_batch.push((batch.num_rows(), leaves.len()));
                        hashed.leaves.extend(leaves);
                    }
                    Err(e) => {
                        hashed.failed = Some(e);
                        break;
                    }
                }
            }
            hashed
        });
        let checked = check_batches(reader, entry, &place, batches);
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
    let mut leaves = hashed.leaves;
    leaves.truncate(good_leaves);
    let (rows, before_evidence) = (checked.rows, good_rows - good_leaves as u64);
    if !bad && rows != entry.rows {
        problem(
            place,
            format!("holds {rows} rows, the manifest lists {}", entry.rows),
        );
    }
    out.rows = rows;
    out.rows_before_evidence = before_evidence;
    out.leaves = leaves;
    out
}

/// What the hashing thread of [`check_segment`] computed: the leaves of the batches before the
/// first it could not hash, and per batch its rows and leaves.
#[derive(Default)]
struct Hashed {
    leaves: Vec<Leaf>,
    per_batch: Vec<(usize, usize)>,
    failed: Option<super::leaf::LeafError>,
}

/// What [`check_batches`] found: the rows read, and the first problem (batch index, place,
/// what).
struct CheckedBatches {
    rows: u64,
    problem: Option<(usize, String, String)>,
}

/// Decode the batches of a segment, send each to `to_hash`, and check their keys: sorted,
/// inside the manifest's range. Stops at the first problem (or when the hashing stopped).
fn check_batches(
    reader: SegmentReader,
    entry: &crate::SegmentEntry,
    place: &str,
    to_hash: std::sync::mpsc::SyncSender<RecordBatch>,
) -> CheckedBatches {
    let mut out = CheckedBatches {
        rows: 0,
        problem: None,
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
    let mut s = e.to_string();
    let mut cur = std::error::Error::source(e);
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
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
