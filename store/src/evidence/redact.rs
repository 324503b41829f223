//! `pgtrail redact`: erase values of archived changes (a data subject's right to erasure)
//! without breaking the evidence.
//!
//! A change's leaf commits to salted digests of its parts (context, before image, after image,
//! `changed`), not to the values. Erasing a part keeps its digest in the archive's redaction
//! record (`evidence_redactions`), rewrites the segment holding the change with the part's
//! values gone (every non-key column of an image unknown, the context null), and the change's
//! leaf stays what it was: `verify` takes the erased part's digest from the record. The salt
//! keeps that digest from revealing the value (a small value cannot be found by trying every
//! one). Each redaction's receipt (the change, the parts and their digests, the reason, when)
//! becomes a leaf of the tree at the next compaction, so an erasure is itself on the record.
//!
//! Key columns stay: they are the row's identity, which the history needs to stay a history
//! (an archive that must forget a key too must drop the table's history, which is not built).
//!
//! `pgtrail purge` ([`plan_purge`]) is a redaction planned from a table's history: every change
//! before a position, but the last change of each row that exists there keeps its after image
//! (the row's value at the position), so the state from the position on stays exact. One
//! receipt records the whole purge.

use std::collections::BTreeMap;
use std::path::Path;

use super::merkle::Hash;
use super::verify::{VerifyOptions, verify_and_collect};
use crate::error::{LogError, SegmentError};
use crate::log::{LogReader, SharedLog};
use crate::lsn::{ChangeKey, Lsn};
use crate::manifest::SegmentEntry;
use crate::segment::{SegmentContent, SegmentReader, hex};

/// The parts `redact` erases: 0 the context, 1 the before image, 2 the after image. A logical
/// message has one part, its content, which is part 0 (`content` names it too).
pub const PART_NAMES: [&str; 3] = ["context", "before", "after"];

/// The part number a name given to `redact --parts` stands for.
pub fn part_number(name: &str) -> Option<u8> {
    match name.trim() {
        "content" => Some(0),
        name => PART_NAMES.iter().position(|p| *p == name).map(|k| k as u8),
    }
}

/// What a redaction is to do to one segment: its entry as verified, and the parts to erase
/// (0 context, 1 before, 2 after) of each of its changes to redact. The parts' digests and the
/// segment's leaves are computed when it is rewritten (one segment in memory at a time).
#[derive(Debug, Clone)]
pub struct SegmentPlan {
    pub entry: SegmentEntry,
    pub changes: BTreeMap<ChangeKey, Vec<u8>>,
}

#[derive(Debug, thiserror::Error)]
pub enum RedactError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Segment(#[from] SegmentError),
    #[error(
        "the archive does not verify ({0}); redact nothing from it until `pgtrail verify` passes"
    )]
    Unverified(String),
    #[error(
        "change {0} is not in the evidence tree: it is still in the log (run `pgtrail compact` first), was compacted before the archive kept evidence, or does not exist"
    )]
    NotInTree(ChangeKey),
    #[error(
        "change {0} is a logical message: its one part is its content (part 0); give --parts content"
    )]
    Message(ChangeKey),
    #[error(
        "segment {0} changed since it was verified (a compaction or merge ran meanwhile): run redact again"
    )]
    Changed(String),
    #[error(
        "the rewritten segment's leaves differ from the verified ones at {0} (a value did not survive rewriting); nothing was redacted (a pgtrail bug: please report it)"
    )]
    LeavesDiffer(ChangeKey),
    #[error("no parts to erase: give --parts with any of context, before, after")]
    NoParts,
    #[error(
        "change {change} of {table} is under legal hold {hold} ({reason}): nothing was erased; release the hold first (`pgtrail hold --release {hold}`) if the erasure is lawful"
    )]
    Held {
        change: ChangeKey,
        table: String,
        hold: u64,
        reason: String,
    },
    #[error(
        "changes committed before {before} may not all be in segments yet (the archive is compacted through {compacted}, and has received every transaction committed before {received}): run `pgtrail compact` first, or purge before an earlier position"
    )]
    NotCompacted {
        before: Lsn,
        compacted: Lsn,
        received: Lsn,
    },
    #[error(
        "{0} has no key (no primary key or replica identity index), so a purge cannot tell which rows still exist at the position to keep their values; redact its changes by --change instead"
    )]
    NoKey(String),
    #[error("no table to purge: give --tables")]
    NoTables,
    #[error(
        "the archive's segments hold no table {0} (tables are named schema.table, as they were named at their changes; `pgtrail sql \"SHOW TABLES\"` lists them)"
    )]
    UnknownTable(String),
}

/// How a plan's erasures are put on the record.
#[derive(Debug, Clone)]
pub enum Receipt {
    /// One receipt leaf per redacted change (kind 5).
    EachChange,
    /// One receipt leaf for the whole purge (kind 8), with this payload; the changes'
    /// redaction records are covered by it and get no leaf of their own.
    Purge(String),
}

/// What a redaction is to do: the segments to rewrite, and the keys of every change of each
/// epoch a redacted change belongs to (the epoch is sealed: its seed erased, its changes'
/// salts recorded one by one, so an erased part's salt cannot be derived again).
#[derive(Debug, Clone)]
pub struct RedactPlan {
    pub segments: Vec<SegmentPlan>,
    pub epochs: BTreeMap<ChangeKey, Vec<ChangeKey>>,
    pub receipt: Receipt,
}

/// What a redaction by change did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RedactCounts {
    /// Changes of which some asked part was erased now.
    pub redacted: u64,
    /// Changes whose every asked part an earlier redaction or purge had erased: left as they
    /// are, with no second receipt.
    pub erased_already: u64,
}

/// Verify the archive in `dir` (its log read through `log` when this process holds it) and
/// find, for each change of `keys`, its segment, to erase those of `parts` not erased already;
/// also returns how many changes had every part erased already. Read-only: the archive may be
/// held by nobody else only when the plan is carried out (see [`crate::Compactor::redact`]).
pub fn plan(
    dir: &Path,
    log: Option<&SharedLog>,
    keys: &[ChangeKey],
    parts: &[u8],
) -> Result<(RedactPlan, u64), RedactError> {
    if parts.is_empty() {
        return Err(RedactError::NoParts);
    }
    let collected = verified(dir, log)?;
    let asked = keys.iter().map(|key| (*key, parts.to_vec())).collect();
    let mut wanted = BTreeMap::new();
    let mut erased_already = 0;
    for (key, (segment, parts)) in locate(&collected, asked)? {
        // A logical message's one part is its content (part 0): asked, it is erased; a
        // message asked for no part it has is refused rather than left as it is.
        let is_message = matches!(
            collected.segments[segment as usize].content,
            SegmentContent::Messages
        );
        let parts = match is_message {
            true if parts.contains(&0) => vec![0],
            true => return Err(RedactError::Message(key)),
            false => parts,
        };
        // A redaction asked again (twice by mistake, or carried out again after a crash cut
        // its answer short) erases only what is left, and puts only that on the record.
        let erased = collected.erased.get(&key);
        let left: Vec<u8> = parts
            .into_iter()
            .filter(|&p| erased.is_none_or(|e| e[p as usize].is_none()))
            .collect();
        match left.is_empty() {
            true => erased_already += 1,
            false => {
                wanted.insert(key, (segment, left));
            }
        }
    }
    Ok((
        plan_changes(&collected, wanted, Receipt::EachChange)?,
        erased_already,
    ))
}

/// What [`plan_purge`] plans: the changes erased whole, and the changes of which only the
/// context and the before image are erased because their after image is a row's value at
/// the position.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PurgeCounts {
    pub erased: u64,
    pub kept_state: u64,
    /// Changes left whole because a legal hold covers them (a scheduled purge only).
    pub held: u64,
}

/// Who asked for a purge, which decides what it does with what it may not erase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PurgeMode {
    /// `pgtrail purge`: a table the archive does not hold is an error, and so is a change
    /// under a legal hold (the redaction refuses the purge, naming the hold).
    Requested,
    /// A retention policy applied on a schedule (`pgtrail capture --retain`): changes under a
    /// legal hold are left whole (the hold suspends the policy for them until it is released),
    /// and a table with no compacted change yet has nothing to purge.
    Scheduled,
}

/// Plan a retention purge: every change of `tables` (as `schema.table`, the name each bore at
/// its changes) committed before `before` loses its values, except what the table held at
/// `before`: of each row that exists there, the last change before it keeps its after image
/// (its context and before image go). So `as_of` at `before` or later answers exactly as
/// before the purge, and the history before it keeps only each change's place, operation
/// and key. One receipt leaf (kind 8) records the purge; `reason` goes into it.
pub fn plan_purge(
    dir: &Path,
    log: Option<&SharedLog>,
    tables: &[String],
    before: Lsn,
    reason: &str,
    mode: PurgeMode,
) -> Result<(RedactPlan, PurgeCounts), RedactError> {
    use crate::change::{Cell, Op};
    if tables.is_empty() {
        return Err(RedactError::NoTables);
    }
    let reader = match log {
        Some(log) => LogReader::of_shared(log)?,
        None => LogReader::open(dir)?,
    };
    // Every change before `before` must be in a segment: one in the log would be left as it is.
    if !reader.compacted_before(before)? {
        return Err(RedactError::NotCompacted {
            before,
            compacted: reader.manifest()?.compacted_through,
            received: reader.position()?,
        });
    }
    // Read now, for a scheduled purge to leave the changes they cover whole. A hold placed
    // after this read cannot come before the erasure: placing one needs the archive's log
    // for writing, which the purging process holds (see `Compactor::redact`, which checks
    // again in the same process).
    let holds = super::hold::list(reader.read_transaction())?;
    drop(reader);
    tracing::info!("purge: verifying the archive before erasing anything");
    let collected = verified(dir, log)?;
    tracing::info!(
        changes = collected.report.tree_size,
        "purge: the archive verifies; reading the tables' history before {before}"
    );
    // Each selected change: its relation, operation and the keys of its images.
    type RowKey = Vec<Option<String>>;
    struct Selected {
        key: ChangeKey,
        /// Its table's place in `tables`.
        table: usize,
        relation: u32,
        op: Op,
        before: Option<RowKey>,
        after: Option<RowKey>,
    }
    let named: std::collections::BTreeSet<String> = collected
        .segments
        .iter()
        .filter_map(|e| e.content.scope_name())
        .collect();
    let tables: Vec<String> = match mode {
        PurgeMode::Requested => {
            if let Some(unknown) = tables.iter().find(|t| !named.contains(*t)) {
                return Err(RedactError::UnknownTable(unknown.clone()));
            }
            tables.to_vec()
        }
        // A table named by the policy whose changes are all still in the log (or that has
        // none yet) has nothing compacted to purge.
        PurgeMode::Scheduled => tables
            .iter()
            .filter(|t| named.contains(*t))
            .cloned()
            .collect(),
    };
    let mut selected: Vec<Selected> = Vec::new();
    for entry in &collected.segments {
        let SegmentContent::Table(rel) = &entry.content else {
            continue;
        };
        let name = entry.content.scope_name().unwrap_or_default();
        let Some(table) = tables.iter().position(|t| *t == name) else {
            continue;
        };
        if entry.min_key >= ChangeKey::new(before, 0) {
            continue;
        }
        let positions = rel.key_positions();
        if positions.is_empty() {
            return Err(RedactError::NoKey(name));
        }
        // Only the key columns are read and rendered, and only the row groups with changes
        // before the position: which rows exist there needs nothing else.
        let row_key = |row: Option<crate::change::Row>| -> Option<RowKey> {
            row.map(|cells| {
                cells
                    .into_iter()
                    .map(|cell| match cell {
                        Cell::Text(text) => Some(text),
                        Cell::Null | Cell::Unknown => None,
                    })
                    .collect()
            })
        };
        let mut columns: Vec<Vec<String>> = [
            "lsn",
            "seq",
            "op",
            "before_unknown",
            "after_unknown",
            "before_text",
            "after_text",
        ]
        .iter()
        .map(|c| vec![c.to_string()])
        .collect();
        for image in ["before", "after"] {
            for &p in &positions {
                columns.push(vec![image.to_string(), rel.columns[p].name.clone()]);
            }
        }
        let path = dir.join(crate::SEGMENTS_DIR).join(&entry.file_name);
        let reader = SegmentReader::open_selected(
            &path,
            Some(&entry.sha256),
            8192,
            (0, before.0.saturating_sub(1)),
            (i64::MIN, i64::MAX),
            Some(&columns),
            None,
        )?;
        for batch in reader {
            for (key, op, b, a) in crate::segment::read_row_keys(rel, &batch?)? {
                if key.commit_lsn >= before {
                    continue;
                }
                selected.push(Selected {
                    key,
                    table,
                    relation: rel.relation_id,
                    op,
                    before: row_key(b),
                    after: row_key(a),
                });
            }
        }
    }
    selected.sort_by_key(|s| s.key);
    // Replay the rows' existence up to `before`: which change last wrote each row that is
    // still there.
    let mut live: std::collections::HashMap<(u32, RowKey), ChangeKey> = Default::default();
    for s in &selected {
        match s.op {
            Op::Truncate => live.retain(|(relation, _), _| *relation != s.relation),
            Op::Delete => {
                if let Some(k) = &s.before {
                    live.remove(&(s.relation, k.clone()));
                }
            }
            Op::Insert | Op::Update | Op::Snapshot => {
                if let (Some(old), Some(new)) = (&s.before, &s.after)
                    && old != new
                {
                    live.remove(&(s.relation, old.clone()));
                }
                if let Some(k) = &s.after {
                    live.insert((s.relation, k.clone()), s.key);
                }
            }
            Op::Message => {}
        }
    }
    let state: std::collections::BTreeSet<ChangeKey> = live.into_values().collect();
    let mut counts = PurgeCounts::default();
    // A change whose parts an earlier purge (or redaction) erased already is left as it is:
    // a purge repeated every night rewrites only the segments with something left to erase.
    let erased_already = |key: &ChangeKey, parts: &[u8]| {
        let erased = collected.erased.get(key);
        parts
            .iter()
            .all(|&p| erased.is_some_and(|e| e[p as usize].is_some()))
    };
    // A legal hold suspends a scheduled purge for the changes it covers: they stay whole, and
    // the first run after its release erases them. A requested purge keeps them in the plan,
    // and the redaction refuses it, naming the hold.
    let held = |s: &Selected| {
        mode == PurgeMode::Scheduled && holds.iter().any(|h| h.covers(s.key, &tables[s.table]))
    };
    let mut wanted: BTreeMap<ChangeKey, Vec<u8>> = BTreeMap::new();
    for s in &selected {
        if held(s) {
            counts.held += 1;
            continue;
        }
        let parts = match state.contains(&s.key) {
            true => vec![0, 1],
            false => vec![0, 1, 2],
        };
        if erased_already(&s.key, &parts) {
            continue;
        }
        match parts.len() {
            2 => counts.kept_state += 1,
            _ => counts.erased += 1,
        }
        wanted.insert(s.key, parts);
    }
    let payload = serde_json::json!({
        "tables": tables,
        "before": before.to_string(),
        "changes": wanted.len(),
        "kept_state": counts.kept_state,
        "held": counts.held,
        "first": wanted.keys().next().map(ChangeKey::to_string),
        "last": wanted.keys().next_back().map(ChangeKey::to_string),
        "reason": reason,
        "at_us": crate::now_us(),
    })
    .to_string();
    let plan = plan_changes(
        &collected,
        locate(&collected, wanted)?,
        Receipt::Purge(payload),
    )?;
    tracing::info!(
        erased = counts.erased,
        kept_state = counts.kept_state,
        segments = plan.segments.len(),
        "purge: planned"
    );
    Ok((plan, counts))
}

/// The archive verified, with what the plan needs of it (its log read through `log` when this
/// process holds it).
fn verified(dir: &Path, log: Option<&SharedLog>) -> Result<super::verify::Collected, RedactError> {
    let options = VerifyOptions {
        log: log.cloned(),
        ..VerifyOptions::default()
    };
    let collected = verify_and_collect(dir, &options, |_, _| {})?;
    if let Some(p) = collected.report.problems.first() {
        return Err(RedactError::Unverified(format!("{}: {}", p.place, p.what)));
    }
    Ok(collected)
}

/// `wanted` (each change's parts) with the segment of the verified archive holding each
/// change (one sequential read of the scratch change file when they lie close together).
fn locate(
    collected: &super::verify::Collected,
    wanted: BTreeMap<ChangeKey, Vec<u8>>,
) -> Result<BTreeMap<ChangeKey, (u32, Vec<u8>)>, RedactError> {
    let keys: Vec<ChangeKey> = wanted.keys().copied().collect();
    let places = collected.changes.find_sorted(&keys)?;
    wanted
        .into_iter()
        .zip(places)
        .map(|((key, parts), place)| match place {
            Some(place) => Ok((key, (place.segment, parts))),
            None => Err(RedactError::NotInTree(key)),
        })
        .collect()
}

/// Plan the erasure of `wanted` (each change's segment, as [`locate`] finds it, and parts) in
/// the verified archive.
fn plan_changes(
    collected: &super::verify::Collected,
    wanted: BTreeMap<ChangeKey, (u32, Vec<u8>)>,
    receipt: Receipt,
) -> Result<RedactPlan, RedactError> {
    let keys: Vec<ChangeKey> = wanted.keys().copied().collect();
    let mut by_segment: BTreeMap<u32, BTreeMap<ChangeKey, Vec<u8>>> = BTreeMap::new();
    for (key, (segment, parts)) in wanted {
        by_segment.entry(segment).or_default().insert(key, parts);
    }
    let mut plans = Vec::new();
    for (segment, changes) in by_segment {
        let entry = collected.segments[segment as usize].clone();
        if matches!(entry.content, SegmentContent::Messages)
            && let Some((key, _)) = changes.iter().find(|(_, parts)| parts.as_slice() != [0])
        {
            return Err(RedactError::Message(*key));
        }
        plans.push(SegmentPlan { entry, changes });
    }
    let mut epochs = BTreeMap::new();
    let starts = collected.epochs.starts();
    for key in &keys {
        let Some((start, _)) = collected.epochs.epoch_of(*key) else {
            return Err(RedactError::NotInTree(*key));
        };
        if epochs.contains_key(&start) {
            continue;
        }
        let end = starts.iter().map(|(k, _)| *k).find(|k| *k > start);
        // The changes are in key order: the epoch's are one run of them.
        let changes = &collected.changes;
        let first = changes.partition_point(|p| p.leaf.key < start)?;
        let last = match end {
            Some(e) => changes.partition_point(|p| p.leaf.key < e)?,
            None => changes.len(),
        };
        let mut members: Vec<ChangeKey> = Vec::with_capacity((last - first) as usize);
        changes.for_each(first, last, |p| {
            members.push(p.leaf.key);
            Ok(())
        })?;
        epochs.insert(start, members);
    }
    Ok(RedactPlan {
        segments: plans,
        epochs,
        receipt,
    })
}

/// The record of a redaction of `parts` of a change whose parts' digests are `digests`, merged
/// with an earlier redaction of it (`earlier`).
pub(crate) fn record(
    key: ChangeKey,
    digests: &[Hash; 4],
    parts: &[u8],
    reason: &str,
    earlier: Option<super::state::Redaction>,
) -> super::state::Redaction {
    let mut erased = earlier.map(|r| r.parts).unwrap_or_default();
    for &k in parts {
        erased.insert(k, hex(&digests[k as usize]));
    }
    super::state::Redaction {
        change: key.to_string(),
        parts: erased,
        reason: reason.to_string(),
        at_us: crate::now_us(),
    }
}
