//! What an attacker with write access to an archive (but not the signing key) can do to its
//! log's records, for the tampering corpus of the tests: rewrite the manifest's entries and
//! the tree the log records, with every checksum recomputed. Nothing in pgtrail calls it.

use std::path::Path;

use redb::ReadableTable;

use super::merkle::Frontier;
use crate::error::LogError;
use crate::log::{META, decode, encode};
use crate::manifest::{SEGMENTS, SegmentEntry};

/// Rewrite the manifest: `edit` gets every entry and returns the entries to list instead.
pub fn rewrite_manifest(
    archive: &Path,
    edit: impl FnOnce(Vec<SegmentEntry>) -> Vec<SegmentEntry>,
) -> Result<(), LogError> {
    let log = crate::ChangeLog::open(archive)?;
    let db = log.shared().0;
    let wtx = db.begin_write()?;
    {
        let mut table = wtx.open_table(SEGMENTS)?;
        let mut entries = Vec::new();
        for e in table.iter()? {
            let (_, v) = e?;
            entries.push(decode::<SegmentEntry>(v.value(), "segments")?);
        }
        table.retain(|_, _| false)?;
        for entry in edit(entries) {
            table.insert(entry.id, encode(&entry).as_slice())?;
        }
    }
    wtx.commit()?;
    republish(&db, archive)
}

/// Rewrite the evidence files from the log (unsigned), as the compactor would.
fn republish(db: &redb::Database, archive: &Path) -> Result<(), LogError> {
    super::state::publish(db, archive, None, None).map_err(|e| LogError::Corrupt {
        what: "evidence files".into(),
        source: e.to_string().into(),
    })?;
    Ok(())
}

/// Recompute every leaf from the segments the manifest lists and make the log and the
/// evidence files record that tree: what an attacker who edited segments would do, lacking
/// only the signing key.
pub fn recompute_tree(archive: &Path) -> Result<Frontier, Box<dyn std::error::Error>> {
    let reader = crate::LogReader::open(archive)?;
    let manifest = reader.manifest()?;
    let state = super::state::read(reader.read_transaction())?;
    let epochs = state.epochs.clone();
    let erased = state.erased()?;
    drop(reader);
    let mut leaves = Vec::new();
    for entry in &manifest.segments {
        let path = archive.join(crate::SEGMENTS_DIR).join(&entry.file_name);
        let segment = crate::segment::SegmentReader::open(&path, None, 8192)?;
        let content = segment.content().clone();
        for batch in segment {
            leaves.extend(super::leaf::batch_leaves(
                &content, &batch?, &epochs, &erased,
            )?);
        }
    }
    leaves.sort_by_key(|l| l.key);
    let (tree, _) = super::state::tree_order(&leaves, |l| l, &epochs, &state.events)?;
    let mut frontier = Frontier::new();
    for hash in tree {
        frontier.push(hash);
    }
    rewrite_frontier(archive, &frontier)?;
    Ok(frontier)
}

/// Rewrite the payload of every evidence event of `kind` through `edit` (then recompute the
/// tree with [`recompute_tree`], as an attacker would).
pub fn rewrite_events(
    archive: &Path,
    kind: u8,
    mut edit: impl FnMut(&str) -> String,
) -> Result<(), LogError> {
    let log = crate::ChangeLog::open(archive)?;
    let db = log.shared().0;
    let wtx = db.begin_write()?;
    {
        let mut table = wtx.open_table(super::state::EVENTS)?;
        let mut edited = Vec::new();
        for e in table.iter()? {
            let (k, v) = e?;
            let value = v.value();
            if value.first() == Some(&kind) {
                let payload = String::from_utf8_lossy(&value[1..]).into_owned();
                let mut new = vec![kind];
                new.extend_from_slice(edit(&payload).as_bytes());
                edited.push((k.value(), new));
            }
        }
        for (k, v) in edited {
            table.insert(k, v.as_slice())?;
        }
    }
    wtx.commit()?;
    republish(&db, archive)
}

/// Replace the tree the log records (as an attacker who recomputed it would).
pub fn rewrite_frontier(archive: &Path, frontier: &Frontier) -> Result<(), LogError> {
    let log = crate::ChangeLog::open(archive)?;
    let db = log.shared().0;
    let wtx = db.begin_write()?;
    wtx.open_table(META)?
        .insert(super::state::META_FRONTIER, frontier.to_bytes().as_slice())?;
    wtx.commit()?;
    republish(&db, archive)
}

/// Keep every redaction made since the last compaction off the signed record: drop its
/// queued receipt (and mark a record an older pgtrail left to the compaction's scan as if its
/// receipt were a leaf already), so the next compaction adds none. Returns how many.
pub fn hide_redaction_receipts(archive: &Path) -> Result<usize, LogError> {
    use super::state::{LEAFED_REDACTIONS, PENDING_EVENTS, REDACTIONS};
    let log = crate::ChangeLog::open(archive)?;
    let db = log.shared().0;
    let wtx = db.begin_write()?;
    let mut hidden = 0;
    {
        let records = wtx.open_table(REDACTIONS)?;
        let mut leafed = wtx.open_table(LEAFED_REDACTIONS)?;
        for e in records.iter()? {
            let (key, _) = e?;
            if leafed.get(key.value())?.is_none() {
                leafed.insert(key.value(), [].as_slice())?;
                hidden += 1;
            }
        }
        let mut pending = wtx.open_table(PENDING_EVENTS)?;
        let mut receipts = Vec::new();
        for e in pending.iter()? {
            let (number, event) = e?;
            if event.value().first() == Some(&super::leaf::KIND_REDACTION) {
                receipts.push(number.value());
            }
        }
        for number in receipts {
            pending.remove(number)?;
            hidden += 1;
        }
    }
    wtx.commit()?;
    Ok(hidden)
}

/// Forget every legal hold, as a forger with the host would before erasing under one: the
/// holds' table emptied, their leaves (or pending leaves) left as they are, so `redact` and
/// `purge` no longer see them. Returns how many.
pub fn forget_holds(archive: &Path) -> Result<usize, LogError> {
    use super::hold::HOLDS;
    let log = crate::ChangeLog::open(archive)?;
    let db = log.shared().0;
    let wtx = db.begin_write()?;
    let forgotten = {
        let mut holds = wtx.open_table(HOLDS)?;
        let ids: Vec<u64> = holds
            .iter()?
            .map(|e| e.map(|(k, _)| k.value()))
            .collect::<Result<_, _>>()?;
        for id in &ids {
            holds.remove(id)?;
        }
        ids.len()
    };
    wtx.commit()?;
    Ok(forgotten)
}
