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

use std::collections::BTreeMap;
use std::path::Path;

use super::leaf::{LeafInputs, for_each_leaf};
use super::merkle::Hash;
use super::verify::{VerifyOptions, verify_and_collect};
use crate::error::{LogError, SegmentError};
use crate::lsn::ChangeKey;
use crate::manifest::SegmentEntry;
use crate::segment::{SegmentContent, SegmentReader, hex};

/// The parts `redact` erases: 0 the context, 1 the before image, 2 the after image.
pub const PART_NAMES: [&str; 3] = ["context", "before", "after"];

/// What a redaction is to do to one segment: its entry as verified, and for each change to
/// redact the digests of all four parts as they are now (an erased part's from its record).
#[derive(Debug, Clone)]
pub struct SegmentPlan {
    pub entry: SegmentEntry,
    pub changes: BTreeMap<ChangeKey, [Hash; 4]>,
    /// Every leaf of the segment as verified (the rewrite must give the same).
    pub leaves: BTreeMap<ChangeKey, Hash>,
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
    #[error("change {0} is a logical message: messages cannot be redacted yet")]
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
}

/// What a redaction is to do: the segments to rewrite, and the keys of every change of each
/// epoch a redacted change belongs to (the epoch is sealed: its seed erased, its changes'
/// salts recorded one by one, so an erased part's salt cannot be derived again).
#[derive(Debug, Clone)]
pub struct RedactPlan {
    pub segments: Vec<SegmentPlan>,
    pub epochs: BTreeMap<ChangeKey, Vec<ChangeKey>>,
}

/// Verify the archive in `dir` and find, for each change of `keys`, its segment and its parts'
/// digests now. Read-only: the archive may be held by nobody else only when the plan is carried
/// out (see [`crate::Compactor::redact`]).
pub fn plan(dir: &Path, keys: &[ChangeKey]) -> Result<RedactPlan, RedactError> {
    let collected = verify_and_collect(dir, &VerifyOptions::default(), |_, _| {})?;
    if let Some(p) = collected.report.problems.first() {
        return Err(RedactError::Unverified(format!("{}: {}", p.place, p.what)));
    }
    let mut by_segment: BTreeMap<u32, Vec<ChangeKey>> = BTreeMap::new();
    for key in keys {
        match collected.changes.find(*key)? {
            Some((_, place)) => by_segment.entry(place.segment).or_default().push(*key),
            None => return Err(RedactError::NotInTree(*key)),
        }
    }
    // Every leaf of each segment to rewrite (in memory: a rewrite of a segment needs them
    // all), in one pass over the changes.
    let mut segment_leaves: BTreeMap<u32, BTreeMap<ChangeKey, Hash>> =
        by_segment.keys().map(|s| (*s, BTreeMap::new())).collect();
    collected
        .changes
        .for_each(0, collected.changes.len(), |p| {
            if let Some(leaves) = segment_leaves.get_mut(&p.segment) {
                leaves.insert(p.leaf.key, p.leaf.hash);
            }
            Ok(())
        })?;
    let mut plans = Vec::new();
    for (segment, keys) in by_segment {
        let entry = collected.segments[segment as usize].clone();
        if matches!(entry.content, SegmentContent::Messages) {
            return Err(RedactError::Message(keys[0]));
        }
        let leaves = segment_leaves.remove(&segment).unwrap_or_default();
        let path = dir.join(crate::SEGMENTS_DIR).join(&entry.file_name);
        let reader = SegmentReader::open(&path, Some(&entry.sha256), 8192)?;
        let content = reader.content().clone();
        let mut changes = BTreeMap::new();
        let wanted: std::collections::BTreeSet<ChangeKey> = keys.iter().copied().collect();
        for batch in reader {
            let batch = batch?;
            let inputs_of = |key: ChangeKey| {
                wanted
                    .contains(&key)
                    .then(|| {
                        collected.epochs.salts_for(key).map(|salts| LeafInputs {
                            salts,
                            erased: collected.erased.get(&key).copied().unwrap_or([None; 4]),
                        })
                    })
                    .flatten()
            };
            for_each_leaf(&content, &batch, inputs_of, |key, _, _, parts| {
                changes.insert(key, *parts);
            })
            .map_err(|e| RedactError::Unverified(e.to_string()))?;
        }
        plans.push(SegmentPlan {
            entry,
            changes,
            leaves,
        });
    }
    let mut epochs = BTreeMap::new();
    let starts = collected.epochs.starts();
    for key in keys {
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
