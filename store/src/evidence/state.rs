//! Where the tree lives: its frontier and the epochs' seeds in the log's redb database,
//! updated in the compaction commit that lists the segments holding the leaves (a crash keeps
//! both or neither), and a copy for offline verifiers under `<archive>/evidence/`.
//!
//! | redb               | key            | value |
//! |--------------------|----------------|-------|
//! | `evidence_epochs`  | `(lsn, seq)` of the epoch's first change | its 32-byte seed |
//! | `evidence_events`  | `(epoch lsn, epoch seq, n)` | `u8 kind ‖ payload`: gaps and watermarks |
//! | `evidence_leafed_gaps` | the gap's key in `gaps` | the payload of its leaf |
//! | `evidence_redactions` | the change's key | what was erased of it ([`Redaction`], JSON) |
//! | `evidence_leafed_redactions` | the change's key | (a redaction whose receipt is a leaf, or a purge's) |
//! | `evidence_salts`   | the change's key | its four salts, once its epoch is sealed |
//! | `evidence_pending_events` | a number | `u8 kind ‖ payload`: holds, releases, purge receipts for the next run |
//! | `evidence_holds`   | the hold's number | [`super::hold::Hold`] (JSON) |
//! | `meta`             | `evidence_frontier` | [`Frontier::to_bytes`] |
//!
//! Files (derived; a verifier trusts none of them, only signatures and recomputation):
//! `evidence/tree.json` (size, root, epochs and seeds), `evidence/manifest.json` (the listed
//! segments and their SHA-256), `evidence/checkpoints/<size>` (every signed checkpoint) and
//! `evidence/checkpoint` (the latest).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use super::leaf::{Epochs, Leaf, Redactions, Seed};
use super::merkle::{Frontier, Hash};
use super::note::Checkpoint;
use super::signer::Signer;
use crate::atomic_file::{create_private_dir, write_atomically, write_atomically_with};
use crate::error::{LogError, SegmentError};
use crate::log::{LogReader, META, table_if_made};
use crate::lsn::{ChangeKey, Lsn};
use crate::segment::hex;

pub(crate) const EPOCHS: TableDefinition<(u64, u32), &[u8]> =
    TableDefinition::new("evidence_epochs");
pub(crate) const META_FRONTIER: &str = "evidence_frontier";
/// The archive's events in the tree: `(epoch lsn, epoch seq, n)` → `u8 kind ‖ payload`.
pub(crate) const EVENTS: TableDefinition<(u64, u32, u32), &[u8]> =
    TableDefinition::new("evidence_events");
/// The gaps that are leaves already: the gap's key in `gaps` → the payload its leaf holds (so a
/// compaction looks up each gap, not every event the tree ever took).
pub(crate) const LEAFED_GAPS: TableDefinition<u64, &str> =
    TableDefinition::new("evidence_leafed_gaps");

/// Redacted changes: the change's key → [`Redaction`] (JSON). Verify takes an erased part's
/// digest from here; its receipt becomes a leaf at the next compaction.
pub(crate) const REDACTIONS: TableDefinition<(u64, u32), &[u8]> =
    TableDefinition::new("evidence_redactions");
/// The salts of the changes of sealed epochs (an epoch's seed erased by a redaction): the
/// change's key → its four salts (64 bytes), an erased part's zeroed.
pub(crate) const SALTS: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("evidence_salts");
/// The redactions whose receipt is a leaf already or queued as a pending event (or that a
/// purge's one receipt covers).
pub(crate) const LEAFED_REDACTIONS: TableDefinition<(u64, u32), &[u8]> =
    TableDefinition::new("evidence_leafed_redactions");
/// Events waiting for the next compaction to become leaves, in the order they happened:
/// number → `u8 kind ‖ payload` (holds placed and released, redaction and purge receipts).
pub(crate) const PENDING_EVENTS: TableDefinition<u64, &[u8]> =
    TableDefinition::new("evidence_pending_events");

/// What a redaction erased of one change: the parts (0 context, 1 before, 2 after) and the
/// digest each had, which the change's leaf keeps committing to.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Redaction {
    /// `lsn#seq`.
    pub change: String,
    /// Part number → its digest, hex.
    pub parts: std::collections::BTreeMap<u8, String>,
    pub reason: String,
    pub at_us: i64,
}

impl Redaction {
    /// The erased digests in the form leaves take them.
    pub fn erased(&self) -> Result<[Option<Hash>; 4], LogError> {
        let mut erased = [None; 4];
        for (k, digest) in &self.parts {
            let bytes: Vec<u8> = (0..digest.len() / 2)
                .map(|i| u8::from_str_radix(&digest[2 * i..2 * i + 2], 16))
                .collect::<Result<_, _>>()
                .map_err(|_| corrupt("evidence redaction", "a digest is not hex"))?;
            let slot = erased
                .get_mut(*k as usize)
                .ok_or_else(|| corrupt("evidence redaction", "a part number past 3"))?;
            *slot = Some(
                bytes
                    .try_into()
                    .map_err(|_| corrupt("evidence redaction", "a digest is not 32 bytes"))?,
            );
        }
        Ok(erased)
    }
}

/// The directory of evidence files inside the archive.
pub const EVIDENCE_DIR: &str = "evidence";
/// The format of `evidence/tree.json` and `evidence/manifest.json`. v2: the redaction records
/// are in the file `tree.json`'s `redactions` names (v1 held them inline, rewritten at every
/// compaction).
pub const EVIDENCE_FILES_FORMAT: &str = "pgtrail/evidence/v2";

/// One of the archive's own events in the tree (see [`super::leaf::event_leaf_hash`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub epoch: ChangeKey,
    pub n: u32,
    pub kind: u8,
    /// JSON, kept verbatim.
    pub payload: String,
}

/// The tree as the log records it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EvidenceState {
    pub epochs: Epochs,
    pub frontier: Frontier,
    /// Events in tree order (by epoch, then n).
    pub events: Vec<Event>,
    /// Redacted changes, by key.
    pub redactions: std::collections::BTreeMap<ChangeKey, Redaction>,
}

impl EvidenceState {
    /// The erased digests of every redacted change, for computing leaves.
    pub fn erased(&self) -> Result<super::leaf::Redactions, LogError> {
        self.redactions
            .iter()
            .map(|(k, r)| Ok((*k, r.erased()?)))
            .collect()
    }
}

fn read_events(
    table: &impl ReadableTable<(u64, u32, u32), &'static [u8]>,
) -> Result<Vec<Event>, LogError> {
    let mut events = Vec::new();
    for entry in table.iter()? {
        let (k, v) = entry?;
        let (lsn, seq, n) = k.value();
        let (kind, payload) = v
            .value()
            .split_first()
            .ok_or_else(|| corrupt("evidence event", "empty"))?;
        let payload = std::str::from_utf8(payload)
            .map_err(|_| corrupt("evidence event", "its payload is not UTF-8"))?;
        events.push(Event {
            epoch: ChangeKey::new(Lsn(lsn), seq),
            n,
            kind: *kind,
            payload: payload.to_string(),
        });
    }
    Ok(events)
}

/// The payload of a gap's event.
fn gap_payload(gap: &crate::Gap) -> String {
    serde_json::json!({
        "from": gap.from.to_string(),
        "to": gap.to.to_string(),
        "reason": gap.reason,
        "recorded_at_us": gap.recorded_at_us,
    })
    .to_string()
}

fn corrupt(what: &str, why: &str) -> LogError {
    LogError::Corrupt {
        what: what.into(),
        source: why.to_string().into(),
    }
}

/// The tree's state in the read transaction `rtx`.
pub(crate) fn read(rtx: &redb::ReadTransaction) -> Result<EvidenceState, LogError> {
    read_within(
        rtx,
        Some(ChangeKey::default()..=ChangeKey::new(Lsn(u64::MAX), u32::MAX)),
    )
}

/// [`read`], with the recorded salts and redaction records of the changes in `range` only
/// (none with `None`; every epoch, event and the frontier still): what rewriting one segment
/// needs, in memory that grows with the segment rather than with every change ever erased.
pub(crate) fn read_within(
    rtx: &redb::ReadTransaction,
    range: Option<std::ops::RangeInclusive<ChangeKey>>,
) -> Result<EvidenceState, LogError> {
    read_state(rtx, range, true)
}

/// What `verify` needs of the state: [`read`] without the redaction records, and, taken from
/// each record as it is read, every redacted change's erased digests and erasure time. A
/// record (the change and each digest as text, the reason) is several times what it yields:
/// after a purge of a million changes, holding the records took gigabytes.
pub(crate) fn read_erasures(
    rtx: &redb::ReadTransaction,
) -> Result<(EvidenceState, Redactions, BTreeMap<ChangeKey, i64>), LogError> {
    let all = ChangeKey::default()..=ChangeKey::new(Lsn(u64::MAX), u32::MAX);
    let state = read_state(rtx, Some(all), false)?;
    let (mut erased, mut at) = (Redactions::new(), BTreeMap::new());
    if let Some(t) = table_if_made(rtx, REDACTIONS)? {
        for entry in t.iter()? {
            let (k, v) = entry?;
            let (lsn, seq) = k.value();
            let key = ChangeKey::new(Lsn(lsn), seq);
            let redaction = parse_redaction(v.value())?;
            erased.insert(key, redaction.erased()?);
            at.insert(key, redaction.at_us);
        }
    }
    Ok((state, erased, at))
}

/// The state with the salts of the changes in `range` (none with `None`) and, with
/// `records`, their redaction records.
fn read_state(
    rtx: &redb::ReadTransaction,
    range: Option<std::ops::RangeInclusive<ChangeKey>>,
    records: bool,
) -> Result<EvidenceState, LogError> {
    let keys = range.map(|range| {
        (range.start().commit_lsn.0, range.start().seq)
            ..=(range.end().commit_lsn.0, range.end().seq)
    });
    let mut starts = Vec::new();
    if let Some(t) = table_if_made(rtx, EPOCHS)? {
        for entry in t.iter()? {
            let (k, v) = entry?;
            let (lsn, seq) = k.value();
            // An empty value: the epoch is sealed, its seed erased (see `SALTS`).
            let seed: Option<Seed> = match v.value() {
                [] => None,
                bytes => Some(
                    bytes
                        .try_into()
                        .map_err(|_| corrupt("evidence epoch", "its seed is not 32 bytes"))?,
                ),
            };
            starts.push((ChangeKey::new(Lsn(lsn), seq), seed));
        }
    }
    let mut sealed = std::collections::BTreeMap::new();
    if let (Some(t), Some(keys)) = (table_if_made(rtx, SALTS)?, keys.clone()) {
        for entry in t.range(keys)? {
            let (k, v) = entry?;
            let (lsn, seq) = k.value();
            let bytes = v.value();
            if bytes.len() != 64 {
                return Err(corrupt(
                    "evidence salts",
                    "a change's salts are not 64 bytes",
                ));
            }
            let mut salts = [[0u8; 16]; 4];
            for (j, chunk) in bytes.chunks_exact(16).enumerate() {
                salts[j].copy_from_slice(chunk);
            }
            sealed.insert(ChangeKey::new(Lsn(lsn), seq), salts);
        }
    }
    let events = match table_if_made(rtx, EVENTS)? {
        Some(t) => read_events(&t)?,
        None => Vec::new(),
    };
    let frontier = frontier_in(&rtx.open_table(META)?)?;
    let mut redactions = std::collections::BTreeMap::new();
    if let (Some(t), Some(keys), true) = (table_if_made(rtx, REDACTIONS)?, keys, records) {
        for entry in t.range(keys)? {
            let (k, v) = entry?;
            let (lsn, seq) = k.value();
            let redaction = parse_redaction(v.value())?;
            redactions.insert(ChangeKey::new(Lsn(lsn), seq), redaction);
        }
    }
    Ok(EvidenceState {
        epochs: Epochs::with_sealed(starts, sealed),
        frontier,
        events,
        redactions,
    })
}

/// The tree's frontier alone (its size and root), without the epochs' salts and the
/// redaction records [`read`] loads: after a purge those grow with every change it erased.
pub(crate) fn frontier(rtx: &redb::ReadTransaction) -> Result<Frontier, LogError> {
    frontier_in(&rtx.open_table(META)?)
}

/// How many redaction commits there have been (a `META` counter): each changes the recorded
/// salts and redaction records, so their files are written again when it moves.
pub(crate) const META_ERASURES: &str = "evidence_erasures";

/// The file beside `tree.json` that says which `META_ERASURES` count the salts files and
/// `redactions.jsonl` hold.
const ERASURES_WRITTEN: &str = "erasures.written";

/// The redaction records' file, named by `tree.json`'s `redactions`.
const REDACTIONS_FILE: &str = "redactions.jsonl";

/// Write `redactions.jsonl`: each redaction record (`lsn`, `seq`, `parts`, `at_us`) on a line,
/// streamed from the log's table.
fn write_redactions_file(
    path: &Path,
    redactions: Option<&redb::ReadOnlyTable<(u64, u32), &'static [u8]>>,
) -> Result<(), PublishError> {
    let mut bad_record = None;
    write_atomically_with(path, |w| {
        let Some(table) = redactions else {
            return Ok(());
        };
        let io = |e: redb::StorageError| std::io::Error::other(e.to_string());
        for entry in table.iter().map_err(io)? {
            let (k, v) = entry.map_err(io)?;
            let (lsn, seq) = k.value();
            let r = match parse_redaction(v.value()) {
                Ok(r) => r,
                Err(e) => {
                    bad_record = Some(e);
                    return Err(std::io::Error::other("a redaction record does not parse"));
                }
            };
            serde_json::to_writer(
                &mut *w,
                &serde_json::json!({"lsn": lsn, "seq": seq, "parts": r.parts, "at_us": r.at_us}),
            )?;
            w.write_all(b"\n")?;
        }
        Ok(())
    })
    .map_err(|e| match bad_record.take() {
        Some(corrupt) => corrupt.into(),
        None => e.into(),
    })
}

/// A redaction record as the log stores it (JSON).
fn parse_redaction(bytes: &[u8]) -> Result<Redaction, LogError> {
    serde_json::from_slice(bytes).map_err(|e| corrupt("evidence redaction", &e.to_string()))
}

/// The frontier the log records (none yet: the empty tree).
pub(crate) fn frontier_in(
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<Frontier, LogError> {
    match meta.get(META_FRONTIER)? {
        None => Ok(Frontier::new()),
        Some(v) => Frontier::from_bytes(v.value())
            .ok_or_else(|| corrupt("evidence frontier", "not a frontier")),
    }
}

/// A fresh epoch seed.
pub(crate) fn new_seed() -> Result<Seed, LogError> {
    let mut seed = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed)
        .map_err(|_| corrupt("evidence seed", "the system's random source failed"))?;
    Ok(seed)
}

/// A compaction run's leaves pushed onto the tree as it stood when the run began: the
/// hashing is done before the run takes the log's write lock, and [`append`] takes it only if
/// the tree is still the one it grew from.
pub(crate) struct Grown {
    /// The tree the leaves were pushed onto.
    base: Frontier,
    /// The run's first change (its epoch begins there).
    first: ChangeKey,
    /// `base` with every leaf of the run pushed.
    frontier: Frontier,
    /// The run's changes (one leaf each).
    count: u64,
}

/// Push a compaction run's `count` leaves, in `(lsn, seq)` order, onto `base`. Refuses leaves
/// out of order or repeated (they would not be appended but inserted, and every proof given
/// so far would break), and a count other than the run's.
pub(crate) fn grow<E: From<LogError>>(
    base: Frontier,
    leaves: impl IntoIterator<Item = Result<Leaf, E>>,
    count: u64,
) -> Result<Grown, E> {
    let mut leaves = leaves.into_iter();
    let Some(first) = leaves.next().transpose()? else {
        return Err(corrupt("evidence", "a compaction run with no leaves").into());
    };
    let mut frontier = base.clone();
    frontier.push(first.hash);
    // The leaves come merged from the run's segments; strictly increasing keys mean none is
    // repeated and none is inserted among earlier ones.
    let (mut last, mut pushed) = (first.key, 1u64);
    for leaf in leaves {
        let leaf = leaf?;
        if leaf.key <= last {
            return Err(corrupt(
                "evidence",
                "two leaves for one change, or leaves out of order",
            )
            .into());
        }
        frontier.push(leaf.hash);
        (last, pushed) = (leaf.key, pushed + 1);
    }
    if pushed != count {
        return Err(corrupt("evidence", "the leaves merged are not the run's changes").into());
    }
    Ok(Grown {
        base,
        first: first.key,
        frontier,
        count,
    })
}

/// Append a compaction run's leaves ([`grow`]), in the write transaction that lists their
/// segments: the epoch that begins at the run's first key, then the leaves, then the run's
/// events: every gap recorded since the last run and a watermark (the cut the run compacted
/// through, the source, when). Refuses a run whose first change does not follow the tree's
/// last epoch, and one grown from a tree other than the log's now (only a compaction appends,
/// one at a time, so that is a second compactor on the archive: nothing is committed).
pub(crate) fn append(
    wtx: &redb::WriteTransaction,
    seed: &Seed,
    grown: Grown,
    cut: Lsn,
) -> Result<Frontier, LogError> {
    let mut epochs = wtx.open_table(EPOCHS)?;
    if let Some(last) = epochs.last()? {
        let (lsn, seq) = last.0.value();
        if ChangeKey::new(Lsn(lsn), seq) >= grown.first {
            return Err(corrupt(
                "evidence",
                "a compaction run's changes do not follow the tree's last epoch",
            ));
        }
    }
    if frontier_in(&wtx.open_table(META)?)? != grown.base {
        return Err(corrupt(
            "evidence",
            "the tree grew while a compaction run wrote its segments (a second compactor on this archive?); the run committed nothing",
        ));
    }
    epochs.insert((grown.first.commit_lsn.0, grown.first.seq), seed.as_slice())?;
    append_events(wtx, grown.frontier, grown.first, grown.count, cut)
}

/// The run's events after its leaves: every gap recorded since the last run, and the
/// watermark.
fn append_events(
    wtx: &redb::WriteTransaction,
    mut frontier: Frontier,
    first: ChangeKey,
    count: u64,
    cut: Lsn,
) -> Result<Frontier, LogError> {
    let mut meta = wtx.open_table(META)?;
    // The run's events, read in this transaction (a gap recorded meanwhile is in this run
    // or the next, never in none).
    let mut event_table = wtx.open_table(EVENTS)?;
    let mut leafed = wtx.open_table(LEAFED_GAPS)?;
    let mut events: Vec<(u8, String)> = Vec::new();
    for entry in wtx.open_table(crate::log::GAPS)?.iter()? {
        let (key, value) = entry?;
        let gap: crate::Gap = crate::log::decode(value.value(), "gaps")?;
        let payload = gap_payload(&gap);
        if leafed
            .get(key.value())?
            .is_none_or(|v| v.value() != payload)
        {
            leafed.insert(key.value(), payload.as_str())?;
            events.push((super::leaf::KIND_GAP, payload));
        }
    }
    // The receipts of redactions an older pgtrail made since the last run (a redaction now
    // queues its receipt with the pending events, and marks its record as leafed).
    let mut leafed_redactions = wtx.open_table(LEAFED_REDACTIONS)?;
    for entry in wtx.open_table(REDACTIONS)?.iter()? {
        let (key, value) = entry?;
        if leafed_redactions.get(key.value())?.is_none() {
            leafed_redactions.insert(key.value(), [].as_slice())?;
            let payload = String::from_utf8(value.value().to_vec())
                .map_err(|_| corrupt("evidence redaction", "not UTF-8"))?;
            events.push((super::leaf::KIND_REDACTION, payload));
        }
    }
    // Holds placed and released, and purge receipts, in the order they happened. Taken in
    // the commit that adds their leaves, so each becomes a leaf exactly once.
    let mut pending = wtx.open_table(PENDING_EVENTS)?;
    while let Some((_, value)) = pending.pop_first()? {
        let bytes = value.value();
        let (&kind, payload) = bytes
            .split_first()
            .ok_or_else(|| corrupt("evidence pending event", "empty"))?;
        let payload = String::from_utf8(payload.to_vec())
            .map_err(|_| corrupt("evidence pending event", "not UTF-8"))?;
        events.push((kind, payload));
    }
    drop(pending);
    let source: Option<crate::SourceIdentity> = match meta.get(crate::log::META_SOURCE)? {
        Some(v) => Some(crate::log::decode(v.value(), "meta source")?),
        None => None,
    };
    let source = source.unwrap_or_default();
    events.push((
        super::leaf::KIND_WATERMARK,
        serde_json::json!({
            "compacted_through": cut.to_string(),
            "changes": count,
            "at_us": crate::now_us(),
            "system_id": source.system_id,
            "timeline": source.timeline,
            "database": source.database,
            "slot": source.slot,
            "publication": source.publication,
            "pgtrail": env!("CARGO_PKG_VERSION"),
        })
        .to_string(),
    ));
    for (n, (kind, payload)) in events.into_iter().enumerate() {
        let n = n as u32;
        frontier.push(super::leaf::event_leaf_hash(kind, first, n, &payload));
        let mut value = vec![kind];
        value.extend_from_slice(payload.as_bytes());
        event_table.insert((first.commit_lsn.0, first.seq, n), value.as_slice())?;
    }
    meta.insert(META_FRONTIER, frontier.to_bytes().as_slice())?;
    Ok(frontier)
}

/// The file (under `evidence/`) holding the salts of the sealed epoch beginning at `start`.
pub fn sealed_file(start: ChangeKey) -> String {
    format!("salts/{:016x}-{:08x}.bin", start.commit_lsn.0, start.seq)
}

/// What [`publish`] did.
#[derive(Clone, Debug, Default)]
pub struct Published {
    pub size: u64,
    pub root: Hash,
    /// The checkpoint signed now, if a key was given and the tree grew since the last one.
    pub signed: Option<PathBuf>,
}

/// Why the evidence files could not be written.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    File(#[from] SegmentError),
    #[error(transparent)]
    Note(#[from] super::note::NoteError),
    #[error(
        "refusing to sign tree size {size}: {path} already holds a checkpoint of that size with another root (the archive's history was rewritten, or it was restored from another copy); keep both and run `pgtrail verify`"
    )]
    Fork { size: u64, path: PathBuf },
    #[error(
        "refusing to sign: the checkpoint published at {place}: {why}; run `pgtrail verify --trusted-checkpoint` with it and keep the archive as it is"
    )]
    Published { place: String, why: String },
    #[error(
        "cannot publish the checkpoint to {place}: {why}; the archive keeps it (evidence/checkpoints), and the next compaction publishes again"
    )]
    Publishing { place: String, why: String },
}

/// Where signed checkpoints are published besides the archive: somewhere its host cannot
/// rewrite (another machine's mount, a WORM volume, an S3 bucket with object lock). Each
/// checkpoint goes there as `<size>`, and the latest also as `checkpoint`, whole.
pub trait CheckpointSink: Send + Sync + std::fmt::Debug {
    /// Where, for messages.
    fn describe(&self) -> String;
    /// The latest checkpoint published (`checkpoint`), `None` when none is. An error when it
    /// cannot be read: then nothing is signed (a checkpoint the archive cannot compare with
    /// is not taken for none).
    fn latest(&self) -> Result<Option<String>, String>;
    /// Write `note` as `name`, whole.
    fn put(&self, name: &str, note: &str) -> Result<(), String>;
}

/// A local directory as a [`CheckpointSink`] (files written atomically, mode 0600).
#[derive(Debug, Clone)]
pub struct DirectorySink(pub PathBuf);

impl CheckpointSink for DirectorySink {
    fn describe(&self) -> String {
        self.0.display().to_string()
    }

    fn latest(&self) -> Result<Option<String>, String> {
        match std::fs::read_to_string(self.0.join("checkpoint")) {
            Ok(text) => Ok(Some(text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }

    fn put(&self, name: &str, note: &str) -> Result<(), String> {
        create_private_dir(&self.0).map_err(|e| e.to_string())?;
        write_atomically(&self.0.join(name), note.as_bytes()).map_err(|e| e.to_string())
    }
}

/// Write the evidence files of the archive in `archive_dir` from the log's latest commit, and
/// with `key`, sign a checkpoint of the tree if it grew since the last one.
///
/// Safe after a crash at any line: the files are derived from the committed log and rewritten
/// whole (atomically) by the next call; a checkpoint is a deterministic signature (Ed25519) of
/// a deterministic root, so signing the same size again writes the same note.
///
/// With `publish_to`, every checkpoint signed is also written there (atomically, as
/// `<size>` and `checkpoint`), and before signing the latest one there is read: an archive
/// whose tree is smaller than a checkpoint already published (restored from an older copy)
/// or whose own checkpoint of a published size differs from the published one (a fork) is
/// refused, so pgtrail never signs two histories.
pub fn publish(
    db: &impl ReadableDatabase,
    archive_dir: &Path,
    key: Option<&Signer>,
    publish_to: Option<&dyn CheckpointSink>,
) -> Result<Published, PublishError> {
    let reader = LogReader::from_db(db)?;
    // The epochs, events and frontier; the per-change salts and redaction records (millions
    // after a purge) are streamed from the same read transaction into their files below,
    // never held in memory together.
    let rtx = reader.read_transaction();
    let state = read_within(rtx, None)?;
    let erasures = crate::manifest::meta_u64(
        &rtx.open_table(META).map_err(LogError::from)?,
        META_ERASURES,
    )?;
    let manifest = reader.manifest()?;
    let dir = archive_dir.join(EVIDENCE_DIR);
    create_private_dir(&dir)?;
    let root = state.frontier.root();
    let tree = serde_json::json!({
        "format": EVIDENCE_FILES_FORMAT,
        "size": state.frontier.size(),
        "root": BASE64.encode(root),
        "epochs": state.epochs.starts().iter().map(|(k, seed)| match seed {
            Some(seed) => serde_json::json!({
                "lsn": k.commit_lsn.0,
                "seq": k.seq,
                "seed": hex(seed),
            }),
            None => serde_json::json!({
                "lsn": k.commit_lsn.0,
                "seq": k.seq,
                "seed": null,
                "salts": sealed_file(*k),
            }),
        }).collect::<Vec<_>>(),
        "events": state.events.iter().map(|e| serde_json::json!({
            "lsn": e.epoch.commit_lsn.0,
            "seq": e.epoch.seq,
            "n": e.n,
            "kind": e.kind,
            "payload": e.payload,
        })).collect::<Vec<_>>(),
        "redactions": REDACTIONS_FILE,
    });
    // Each sealed epoch's salts, one file each (`u64 lsn ‖ u32 seq ‖ 64 bytes` a change), and
    // the redaction records, one JSON line each, in `redactions.jsonl`. Both change only in a
    // redaction's commit, which counts itself in `META_ERASURES`, so they are written again
    // only when that count differs from the one written beside them last: a compaction after
    // a purge of millions of changes does not rewrite them. The count is written after the
    // files, so a crash between leaves an old count and they are written again.
    let written = dir.join(ERASURES_WRITTEN);
    let up_to_date = std::fs::read_to_string(&written)
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok())
        == Some(erasures);
    if !up_to_date {
        let salts = table_if_made(rtx, SALTS).map_err(LogError::from)?;
        let starts = state.epochs.starts();
        for (i, (start, seed)) in starts.iter().enumerate() {
            if seed.is_some() {
                continue;
            }
            let from = (start.commit_lsn.0, start.seq);
            let until = starts
                .get(i + 1)
                .map_or((u64::MAX, u32::MAX), |(k, _)| (k.commit_lsn.0, k.seq));
            create_private_dir(&dir.join("salts"))?;
            write_atomically_with(&dir.join(sealed_file(*start)), |w| {
                let Some(salts) = &salts else { return Ok(()) };
                let io = |e: redb::StorageError| std::io::Error::other(e.to_string());
                for entry in salts.range(from..until).map_err(io)? {
                    let (k, v) = entry.map_err(io)?;
                    let (lsn, seq) = k.value();
                    w.write_all(&lsn.to_be_bytes())?;
                    w.write_all(&seq.to_be_bytes())?;
                    w.write_all(v.value())?;
                }
                Ok(())
            })?;
        }
        let redactions = table_if_made(rtx, REDACTIONS).map_err(LogError::from)?;
        write_redactions_file(&dir.join(REDACTIONS_FILE), redactions.as_ref())?;
    }
    write_atomically(&dir.join("tree.json"), format!("{tree:#}\n").as_bytes())?;
    if !up_to_date {
        write_atomically(&written, format!("{erasures}\n").as_bytes())?;
    }
    drop(reader);
    let segments = serde_json::json!({
        "format": EVIDENCE_FILES_FORMAT,
        "segments": manifest.segments.iter().map(|s| serde_json::json!({
            "file": s.file_name,
            "sha256": s.sha256,
            "rows": s.rows,
            "min": [s.min_key.commit_lsn.0, s.min_key.seq],
            "max": [s.max_key.commit_lsn.0, s.max_key.seq],
        })).collect::<Vec<_>>(),
    });
    write_atomically(
        &dir.join("manifest.json"),
        format!("{segments:#}\n").as_bytes(),
    )?;
    let mut published = Published {
        size: state.frontier.size(),
        root,
        signed: None,
    };
    if let Some(key) = key
        && state.frontier.size() > 0
    {
        let checkpoints = dir.join("checkpoints");
        create_private_dir(&checkpoints)?;
        if let Some(outside) = publish_to {
            check_published(outside, &checkpoints, state.frontier.size())?;
        }
        let path = checkpoints.join(state.frontier.size().to_string());
        let checkpoint = Checkpoint {
            origin: key.name().to_string(),
            size: state.frontier.size(),
            root,
        };
        if let Ok(existing) = std::fs::read_to_string(&path)
            && Checkpoint::in_note_unverified(&existing).ok().as_ref() != Some(&checkpoint)
        {
            return Err(PublishError::Fork {
                size: checkpoint.size,
                path,
            });
        }
        crate::crashpoint::hit("checkpoint:before_sign");
        let note = key.sign(&checkpoint.text())?;
        write_atomically(&path, note.as_bytes())?;
        write_atomically(&dir.join("checkpoint"), note.as_bytes())?;
        if let Some(outside) = publish_to {
            crate::crashpoint::hit("checkpoint:before_publish");
            // The numbered copy first: a crash between the two leaves `checkpoint` naming an
            // older size, which the next publication replaces.
            for (i, name) in [checkpoint.size.to_string(), "checkpoint".to_string()]
                .into_iter()
                .enumerate()
            {
                if i == 1 {
                    crate::crashpoint::hit("checkpoint:between_published");
                }
                outside
                    .put(&name, &note)
                    .map_err(|why| PublishError::Publishing {
                        place: outside.describe(),
                        why,
                    })?;
            }
        }
        published.signed = Some(path);
    }
    Ok(published)
}

/// Refuse to sign for an archive behind, or forked from, the latest checkpoint published in
/// `outside` (none published yet is fine; one that cannot be read is not).
fn check_published(
    outside: &dyn CheckpointSink,
    own: &Path,
    size: u64,
) -> Result<(), PublishError> {
    let refuse = |why: String| PublishError::Published {
        place: outside.describe(),
        why,
    };
    let text = match outside.latest() {
        Ok(Some(text)) => text,
        Ok(None) => return Ok(()),
        Err(why) => return Err(refuse(format!("it cannot be read ({why})"))),
    };
    let published_size = Checkpoint::in_note_unverified(&text)
        .map_err(|e| refuse(e.to_string()))?
        .size;
    if published_size > size {
        return Err(refuse(format!(
            "it attests {published_size} changes, this archive's tree holds {size}: the archive was restored from an older copy or truncated"
        )));
    }
    let ours = std::fs::read_to_string(own.join(published_size.to_string())).ok();
    if ours.as_deref().is_some_and(|ours| ours != text) {
        return Err(refuse(format!(
            "this archive's own checkpoint of size {published_size} differs from it: the archive's history forked"
        )));
    }
    Ok(())
}

/// The tree's leaves in order: each epoch's change leaves (`changes`, sorted by key), then its
/// events (by `n`); and for each change its index in the tree. An event of no epoch is an
/// error (it would have no place in the tree).
pub fn tree_order<T>(
    changes: &[T],
    leaf: impl Fn(&T) -> &Leaf,
    epochs: &Epochs,
    events: &[Event],
) -> Result<(Vec<Hash>, Vec<u64>), String> {
    let mut order = TreeOrder::new(epochs, events)?;
    let mut tree = Vec::with_capacity(changes.len() + events.len());
    let mut index = Vec::with_capacity(changes.len());
    for change in changes {
        let leaf = leaf(change);
        index.push(order.change(leaf.key, &mut |h| tree.push(h))?);
        tree.push(leaf.hash);
    }
    order.finish(&mut |h| tree.push(h));
    Ok((tree, index))
}

/// [`tree_order`] one change at a time, for a reader that cannot hold every leaf: each
/// change's key goes in by [`TreeOrder::change`] (sorted by key), which gives out the events
/// due before it (those of the epochs the changes have passed) and the change's index; the
/// caller appends the change's own hash next.
pub struct TreeOrder<'a> {
    starts: &'a [(ChangeKey, Option<Seed>)],
    /// Sorted by `(epoch, n)`.
    events: Vec<&'a Event>,
    /// The epoch the next change can be in (changes come in key order).
    epoch: usize,
    /// The next event to emit.
    event: usize,
    size: u64,
}

impl<'a> TreeOrder<'a> {
    pub fn new(epochs: &'a Epochs, events: &'a [Event]) -> Result<TreeOrder<'a>, String> {
        let starts = epochs.starts();
        for e in events {
            if !starts.iter().any(|(k, _)| *k == e.epoch) {
                return Err(format!(
                    "event {} of epoch {} belongs to no epoch",
                    e.n, e.epoch
                ));
            }
        }
        let mut events: Vec<&Event> = events.iter().collect();
        events.sort_by_key(|e| (e.epoch, e.n));
        Ok(TreeOrder {
            starts,
            events,
            epoch: 0,
            event: 0,
            size: 0,
        })
    }

    /// The next change (in key order): the events of the epochs it has passed go to `emit`,
    /// and its index in the tree comes back; its own hash is the caller's to append right
    /// after. A change before the first epoch is an error: changes compacted before the
    /// archive kept evidence have no leaf.
    pub fn change(&mut self, key: ChangeKey, emit: &mut impl FnMut(Hash)) -> Result<u64, String> {
        if self.starts.first().is_none_or(|(first, _)| key < *first) {
            return Err(format!("change {key} has a leaf but no epoch"));
        }
        while self
            .starts
            .get(self.epoch + 1)
            .is_some_and(|(next, _)| key >= *next)
        {
            self.epoch_events(emit);
            self.epoch += 1;
        }
        self.size += 1;
        Ok(self.size - 1)
    }

    /// The events of the current epoch and of every later one: the tree is complete.
    pub fn finish(mut self, emit: &mut impl FnMut(Hash)) {
        while self.epoch < self.starts.len() {
            self.epoch_events(emit);
            self.epoch += 1;
        }
    }

    fn epoch_events(&mut self, emit: &mut impl FnMut(Hash)) {
        let start = self.starts[self.epoch].0;
        while let Some(e) = self.events.get(self.event).filter(|e| e.epoch == start) {
            emit(super::leaf::event_leaf_hash(
                e.kind, e.epoch, e.n, &e.payload,
            ));
            self.size += 1;
            self.event += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaves(keys: &[(u64, u32)]) -> Vec<Result<Leaf, LogError>> {
        keys.iter()
            .map(|&(lsn, seq)| {
                Ok(Leaf {
                    key: ChangeKey::new(Lsn(lsn), seq),
                    hash: [lsn as u8; 32],
                })
            })
            .collect()
    }

    fn tree(db: &redb::Database) -> Frontier {
        frontier_in(&db.begin_read().unwrap().open_table(META).unwrap()).unwrap()
    }

    /// The leaves are hashed before the write lock, onto the tree read with the cut: a run
    /// grown from a tree the log no longer holds commits nothing, and one grown from the
    /// log's tree appends exactly its leaves.
    #[test]
    fn a_run_grown_from_another_tree_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let log = crate::ChangeLog::open(&dir.path().join("a")).unwrap();
        let db = log.shared().0;
        let stale = grow(tree(&db), leaves(&[(10, 0), (10, 1)]), 2).unwrap();
        // Meanwhile another run appended (as a second compactor would).
        let other = grow(tree(&db), leaves(&[(5, 0)]), 1).unwrap();
        let wtx = db.begin_write().unwrap();
        append(&wtx, &[1; 32], other, Lsn(5)).unwrap();
        wtx.commit().unwrap();
        let before = tree(&db);
        let wtx = db.begin_write().unwrap();
        let refused = append(&wtx, &[2; 32], stale, Lsn(10));
        assert!(
            refused
                .as_ref()
                .is_err_and(|e| format!("{e:?}").contains("the tree grew")),
            "{:?}",
            refused.map(|f| f.size())
        );
        drop(wtx);
        assert_eq!(tree(&db), before, "nothing was committed");
        // Grown again from the log's tree, the same run is appended: its two leaves and the
        // run's watermark event.
        let fresh = grow(tree(&db), leaves(&[(10, 0), (10, 1)]), 2).unwrap();
        let wtx = db.begin_write().unwrap();
        let after = append(&wtx, &[2; 32], fresh, Lsn(10)).unwrap();
        wtx.commit().unwrap();
        assert_eq!(after.size(), before.size() + 3);
        assert_eq!(tree(&db), after);
    }

    #[test]
    fn leaves_out_of_order_or_miscounted_are_refused() {
        let unordered = grow(Frontier::new(), leaves(&[(10, 1), (10, 0)]), 2);
        assert!(unordered.is_err_and(|e| format!("{e:?}").contains("out of order")));
        let miscounted = grow(Frontier::new(), leaves(&[(10, 0)]), 2);
        assert!(miscounted.is_err_and(|e| format!("{e:?}").contains("not the run's changes")));
    }
}
