//! Keyframes (see [`pgtrail_store::keyframe`]): which points of a table's history get one,
//! computing and publishing them, and checking the published ones against the replay.
//!
//! A keyframe is `as_of_lsn` of its table at its point, computed by the same columnar
//! engine (from the table's previous keyframe, so a run costs the changes since it, not the
//! whole history). `as_of` then starts from the latest keyframe its moment includes. A
//! keyframe is due when the table's changes since its previous one reach
//! `max(min_changes, rows_factor × the rows that one held)`, and kept only when its own rows
//! are at most `1 / rows_factor` of those changes: a table mostly inserted into (a log, an
//! events table) gets none, since its keyframe would be a second copy of its history.

use std::path::Path;

use datafusion::arrow::array::{Array, ArrayRef};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::DataType;
use datafusion::error::{DataFusionError, Result};
use pgtrail_store::keyframe::{NewKeyframe, keyframe_path, publish_keyframe};
use pgtrail_store::{KeyframeEntry, LogReader, Lsn, SharedLog};

use crate::archive::{ArchiveSnapshot, TableHistory};
use crate::columnar::{Keyframes, keyframe_rows};
use crate::read::{Bounds, for_each_key_and_time, open_segment_selected};
use crate::replay::{Moment, check_begins};

/// When a table gets a keyframe.
#[derive(Clone, Debug)]
pub struct KeyframePolicy {
    /// Never before this many changes since the table's previous keyframe ...
    pub min_changes: u64,
    /// ... nor before this many times the rows that keyframe held.
    pub rows_factor: u64,
}

impl Default for KeyframePolicy {
    fn default() -> Self {
        KeyframePolicy {
            min_changes: 100_000,
            rows_factor: 4,
        }
    }
}

/// What a keyframe run did.
#[derive(Debug, Default)]
pub struct KeyframeRun {
    pub written: Vec<KeyframeEntry>,
    /// Tables that were due and got none, with why.
    pub skipped: Vec<(String, String)>,
}

/// A point of a table's history where a keyframe may go: the end of a transaction.
#[derive(Clone, Copy, Debug)]
struct Point {
    at: Lsn,
    /// The table's changes at or before `at`.
    changes: u64,
    /// The latest commit time of those changes.
    latest_us: i64,
}

/// Call `f(lsn, committed_at)` for each change of `table` with a commit LSN above `after`, in
/// the segments' order (key order), reading those two columns alone.
fn for_each_commit(
    archive: &ArchiveSnapshot,
    table: &TableHistory,
    after: Lsn,
    mut f: impl FnMut(u64, i64),
) -> Result<()> {
    let bounds = Bounds {
        lsn: (after.0.saturating_add(1), u64::MAX),
        ..Bounds::default()
    };
    for seg in table
        .segments
        .iter()
        .filter(|s| s.max_key.commit_lsn > after)
    {
        // Row groups are kept by their statistics; rows at or before `after` in a kept one
        // are skipped here.
        for_each_key_and_time(&archive.segment_path(seg), seg, bounds, |key, at| {
            if key.commit_lsn > after {
                f(key.commit_lsn.0, at);
            }
        })?;
    }
    Ok(())
}

/// The latest commit time of `table`'s snapshot points at or before `at`.
fn snapshots_until(archive: &ArchiveSnapshot, table: &TableHistory, at: Lsn) -> i64 {
    archive
        .table_snapshots(table)
        .filter(|(s, _)| s.lsn <= at)
        .map(|(s, _)| s.committed_at_us)
        .max()
        .unwrap_or(i64::MIN)
}

/// Whether `table` may have a keyframe due, from the manifest alone (every compaction asks
/// this of every table, so it reads no segment): it has a key, and its changes since `last`
/// are at least `min_changes` and `rows_factor` times the rows it holds, estimated from the
/// segments' operation counts (rows inserted or read by a snapshot, less rows deleted). A
/// table mostly inserted into never passes: without this, every compaction would compute its
/// whole state to throw it away.
fn worth_trying(
    table: &TableHistory,
    last: Option<&KeyframeEntry>,
    policy: &KeyframePolicy,
) -> bool {
    if table
        .versions
        .last()
        .is_none_or(|v| table.key_positions(v).is_empty())
    {
        return false;
    }
    let (mut total, mut written, mut deleted) = (0u64, 0u64, 0u64);
    for seg in &table.segments {
        for (op, n) in &seg.op_counts {
            total += n;
            match op.as_str() {
                "insert" | "snapshot" => written += n,
                "delete" => deleted += n,
                _ => {}
            }
        }
    }
    let since = total.saturating_sub(last.map_or(0, |k| k.changes));
    let rows = written.saturating_sub(deleted);
    since >= policy.min_changes && rows.saturating_mul(policy.rows_factor) <= since
}

/// Write every keyframe that is due in the archive `dir` whose log `log` this process holds
/// (the compactor's thread: see the crash safety of [`pgtrail_store::keyframe`]).
/// `progress` is told of each keyframe written.
pub fn write_due_keyframes(
    log: &SharedLog,
    dir: &Path,
    policy: &KeyframePolicy,
    mut progress: impl FnMut(&KeyframeEntry),
) -> Result<KeyframeRun> {
    let external = |e: pgtrail_store::LogError| DataFusionError::External(Box::new(e));
    let reader = LogReader::of_shared(log).map_err(external)?;
    let compacted = reader.manifest().map_err(external)?.compacted_through;
    let mut archive = ArchiveSnapshot::from_reader(dir, &reader)
        .map_err(|e| DataFusionError::External(Box::new(e)))?;
    drop(reader);
    let mut run = KeyframeRun::default();
    let names: Vec<String> = archive.tables.keys().cloned().collect();
    for name in names {
        let table = &archive.tables[&name];
        let last = table.keyframes.last();
        if !worth_trying(table, last, policy) {
            continue;
        }
        let (after, mut changes, mut latest_us, mut rows) = last
            .map_or((Lsn(0), 0, i64::MIN, 0), |k| {
                (k.at, k.changes, k.includes_until_us, k.rows)
            });
        // Transaction ends, at most one per `step` changes (bounded memory on a table of
        // one-change transactions), from which the due points are taken.
        let step = (policy.min_changes / 64).max(1);
        let mut ends: Vec<Point> = Vec::new();
        let mut since_end = 0u64;
        let mut previous: Option<u64> = None;
        for_each_commit(&archive, table, after, |lsn, at| {
            if let Some(p) = previous
                && p != lsn
                && since_end >= step
            {
                ends.push(Point {
                    at: Lsn(p),
                    changes,
                    latest_us,
                });
                since_end = 0;
            }
            previous = Some(lsn);
            changes += 1;
            since_end += 1;
            latest_us = latest_us.max(at);
        })?;
        // The last transaction ends within the compacted changes: it is whole.
        if let Some(p) = previous
            && Lsn(p) <= compacted
        {
            ends.push(Point {
                at: Lsn(p),
                changes,
                latest_us,
            });
        }
        let mut from = last.map_or(0, |k| k.changes);
        for point in ends {
            let due = policy
                .min_changes
                .max(policy.rows_factor.saturating_mul(rows));
            if point.changes - from < due {
                continue;
            }
            let table = &archive.tables[&name];
            // A point the archive cannot answer for (before the table's history, inside an
            // unknown span) gets no keyframe; a later one may.
            if check_begins(&archive, table, Moment::Lsn(point.at)).is_err() {
                continue;
            }
            let Some((version, batch)) = keyframe_rows(&archive, table, point.at, Keyframes::Any)?
            else {
                run.skipped.push((
                    name.clone(),
                    "as_of of this table is answered by the row replay (no primary key, several schema versions, or values kept as text)".into(),
                ));
                break;
            };
            // A keyframe pays only where the table holds far fewer rows than the changes it
            // stands for: a table mostly inserted into (a log, events) would get a copy of its
            // history and save no replay. Not kept; the next try waits for as many more
            // changes as these rows make due.
            let held = batch.num_rows() as u64;
            if held.saturating_mul(policy.rows_factor) > point.changes - from {
                rows = held;
                continue;
            }
            let entry = publish_keyframe(
                log,
                dir,
                NewKeyframe {
                    version: version.clone(),
                    at: point.at,
                    includes_until_us: point
                        .latest_us
                        .max(snapshots_until(&archive, table, point.at)),
                    changes: point.changes,
                    rows: batch,
                },
            )
            .map_err(|e| DataFusionError::External(Box::new(e)))?;
            progress(&entry);
            from = point.changes;
            rows = entry.rows;
            // The next point starts from this one.
            if let Some(t) = archive.tables.get_mut(&name) {
                t.keyframes.push(entry.clone());
            }
            run.written.push(entry);
        }
    }
    Ok(run)
}

/// A keyframe that does not hold what the replay gives at its point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyframeProblem {
    pub file_name: String,
    pub table: String,
    pub at: Lsn,
    pub reason: String,
}

/// Check every keyframe of `archive` against the replay: its rows (computed again from the
/// table's previous keyframe, itself checked first, or from the table's first change), its
/// schema version, its change count and its latest commit time (which decides which moments
/// given as times may start from it). `progress(done, total)` after each.
pub fn check_keyframes(
    archive: &ArchiveSnapshot,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<KeyframeProblem>> {
    let total: usize = archive.tables.values().map(|t| t.keyframes.len()).sum();
    let mut done = 0;
    let mut problems = Vec::new();
    for table in archive.tables.values() {
        // Each point's change count and latest commit time, from one pass over the table.
        let mut facts: Vec<(u64, i64)> = Vec::with_capacity(table.keyframes.len());
        let (mut changes, mut latest_us, mut next) = (0u64, i64::MIN, 0usize);
        let points: Vec<Lsn> = table.keyframes.iter().map(|k| k.at).collect();
        for_each_commit(archive, table, Lsn(0), |lsn, at| {
            while next < points.len() && points[next].0 < lsn {
                facts.push((changes, latest_us));
                next += 1;
            }
            changes += 1;
            latest_us = latest_us.max(at);
        })?;
        while facts.len() < points.len() {
            facts.push((changes, latest_us));
        }
        for (k, (changes, latest_us)) in table.keyframes.iter().zip(facts) {
            let problem = |reason: String| KeyframeProblem {
                file_name: k.file_name.clone(),
                table: table.qualified_name(),
                at: k.at,
                reason,
            };
            let includes_until_us = latest_us.max(snapshots_until(archive, table, k.at));
            let found = check_one(archive, table, k, changes, includes_until_us)?;
            problems.extend(found.map(problem));
            done += 1;
            progress(done, total);
        }
    }
    Ok(problems)
}

/// What is wrong with keyframe `k`, if anything.
fn check_one(
    archive: &ArchiveSnapshot,
    table: &TableHistory,
    k: &KeyframeEntry,
    changes: u64,
    includes_until_us: i64,
) -> Result<Option<String>> {
    if k.changes != changes {
        return Ok(Some(format!(
            "it says {} changes of the table are at or before its point; the segments hold {changes}",
            k.changes
        )));
    }
    if k.includes_until_us != includes_until_us {
        return Ok(Some(format!(
            "its latest commit time is {} µs; the segments say {includes_until_us} µs",
            k.includes_until_us
        )));
    }
    let expected = keyframe_rows(archive, table, k.at, Keyframes::Before(k.at))?;
    let Some((version, expected)) = expected else {
        return Ok(Some(
            "the replay cannot compute this table's rows at its point column by column".into(),
        ));
    };
    if version != &k.version {
        return Ok(Some(
            "its schema version is not the one in force there".into(),
        ));
    }
    let reader = match open_segment_selected(
        &keyframe_path(&archive.dir, k),
        &k.sha256,
        65_536,
        Bounds::default(),
        None,
        None,
    ) {
        Ok(r) => r,
        Err(e) => return Ok(Some(format!("cannot be read: {e}"))),
    };
    let mut stored = Vec::new();
    for batch in reader {
        match batch {
            Ok(b) => stored.push(b),
            Err(e) => return Ok(Some(format!("cannot be read: {e}"))),
        }
    }
    let stored = match datafusion::arrow::compute::concat_batches(&expected.schema(), &stored) {
        Ok(b) => b,
        Err(e) => return Ok(Some(format!("does not have its version's columns: {e}"))),
    };
    if stored.num_rows() != expected.num_rows() {
        return Ok(Some(format!(
            "it holds {} rows; the replay gives {}",
            stored.num_rows(),
            expected.num_rows()
        )));
    }
    for (field, (a, b)) in expected
        .schema()
        .fields()
        .iter()
        .zip(expected.columns().iter().zip(stored.columns()))
    {
        if plain(a)? != plain(b)? {
            return Ok(Some(format!(
                "its column {} differs from what the replay gives",
                field.name()
            )));
        }
    }
    Ok(None)
}

/// A column with its dictionaries decoded, so that equal values compare equal whatever
/// dictionary a writer chose.
fn plain(a: &ArrayRef) -> Result<ArrayRef> {
    Ok(match a.data_type() {
        DataType::Dictionary(_, value) => cast(a, value)?,
        _ => a.clone(),
    })
}

/// The compactor's keyframe writer (see [`pgtrail_store::keyframe::KeyframeWriter`]): every
/// keyframe `policy` makes due, after each compaction.
#[derive(Debug, Default)]
pub struct DueKeyframes(pub KeyframePolicy);

impl pgtrail_store::keyframe::KeyframeWriter for DueKeyframes {
    fn write_due(&self, log: &SharedLog, archive_dir: &Path) -> std::result::Result<u64, String> {
        write_due_keyframes(log, archive_dir, &self.0, |k| {
            tracing::info!(table = %k.table_name(), at = %k.at, rows = k.rows, bytes = k.bytes, "keyframe written");
        })
        .map(|run| run.written.len() as u64)
        .map_err(|e| e.to_string())
    }
}
