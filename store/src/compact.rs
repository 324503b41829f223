//! The compactor: the log's finished transactions into segments, small segments merged,
//! the log trimmed in the same redb transaction that lists a segment in the manifest (see
//! `manifest`).
//!
//! # Why every step is crash safe
//!
//! A compaction run reads the log in a read transaction, writes segment files, then commits
//! one write transaction. At each point a crash leaves:
//! 1. while a segment is written (`.<name>.tmp`): a temporary file, removed at the next run;
//!    the log is untouched;
//! 2. after a segment's rename, before the manifest commit: a complete file the manifest does
//!    not list. Its rows are still in the log (trimming happens only in the commit), so the
//!    orphan is deleted at the next run and the rows are compacted again;
//! 3. after the commit: the segment is listed and the log trimmed, atomically. Nothing to redo.
//!
//! Merges follow the same rule: the merged file is an orphan until the commit that lists it
//! and unlists its sources; the sources then become `retired` and are deleted only after a
//! grace period, so a query that listed them a moment earlier can still read them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableDatabase, ReadableTable};

use crate::atomic_file::{create_private_dir, fsync_dir, remove_if_exists};
use crate::change::{ChangeRecord, Op};
use crate::crashpoint;
use crate::error::CompactError;
use crate::evidence;
use crate::evidence::hasher::LeafHasher;
use crate::evidence::leaf::Epochs;
use crate::evidence::signer::Signer;
use crate::evidence::spill::LeafSpill;
use crate::keyframe::{self, KEYFRAMES_DIR};
use crate::log::{
    CHANGES, CONTEXTS, ContextCursor, LogReader, META, META_LAST_COMMIT, RELATIONS, SharedLog,
    TXNS, completed_through, decode, encode, raw_len,
};
use crate::lsn::{ChangeKey, Lsn};
use crate::manifest::{
    META_COMPACTED_CHANGES, META_COMPACTED_THROUGH, META_COMPACTED_TXNS, META_NEXT_SEGMENT,
    RETIRED, SEGMENTS, SEGMENTS_DIR, SegmentEntry, meta_u64,
};
use crate::relation::RelationVersion;
use crate::segment::key_copy::{self, KEY_COPY_SUFFIX, key_copy_name};
use crate::segment::key_index::{self, KEY_INDEX_SUFFIX, KeyIndexBuilder, key_index_name};
use crate::segment::{SegmentContent, SegmentOptions, SegmentReader, SegmentWriter, sha256_file};

/// The wall clock in microseconds since the Unix epoch (0 if the clock is before it): the unit
/// of every time the archive records.
pub fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// How the compactor works.
#[derive(Clone, Debug)]
pub struct CompactOptions {
    pub segment: SegmentOptions,
    /// A segment is closed when it reaches this size, and merging builds segments up to it.
    pub target_segment_bytes: u64,
    /// Merge a run of consecutive small segments of one table once it has this many.
    pub merge_min_segments: usize,
    /// Memory the open segment writers may hold together before row groups are cut early.
    pub memory_budget_bytes: usize,
    /// How long a segment unlisted by a merge stays on disk for readers that listed it before.
    pub retire_grace: Duration,
    /// With a key, a checkpoint of the evidence tree is signed after every run that grew it.
    pub signer: Option<Arc<Signer>>,
    /// With a key: a directory outside the archive where every signed checkpoint is copied
    /// (and which is read before signing, to refuse signing for an archive behind it).
    pub publish_checkpoints: Option<Arc<dyn evidence::state::CheckpointSink>>,
    /// Compute evidence leaves (always, but for `pgtrail-bench`, which compacts a throwaway
    /// copy of a log without them to measure what they cost: an archive compacted without
    /// them holds changes that `verify` finds no leaf for).
    pub evidence: bool,
    /// Writes the keyframes that are due after each run (the query engine's: the store does
    /// not replay); none without it.
    pub keyframes: Option<Arc<dyn keyframe::KeyframeWriter>>,
    /// Rows a key-ordered copy is built from at a time (an estimate of their size in memory;
    /// a larger segment is copied in several passes).
    pub key_copy_budget_bytes: usize,
}

impl Default for CompactOptions {
    fn default() -> Self {
        CompactOptions {
            segment: SegmentOptions::default(),
            target_segment_bytes: 128 << 20,
            merge_min_segments: 4,
            memory_budget_bytes: 64 << 20,
            retire_grace: Duration::from_secs(300),
            signer: None,
            publish_checkpoints: None,
            evidence: true,
            keyframes: None,
            key_copy_budget_bytes: 256 << 20,
        }
    }
}

/// What one [`Compactor::run`] did (`pgtrail compact --json` prints it, with these names).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CompactReport {
    /// Changes moved from the log into new segments.
    pub changes: u64,
    pub transactions: u64,
    pub segments_written: u64,
    pub bytes_written: u64,
    /// Segments merged away, and the segments they became.
    pub merged_inputs: u64,
    pub merged_outputs: u64,
    pub orphans_removed: u64,
    pub retired_removed: u64,
    /// Key indexes written for segments that had none (or a damaged one).
    pub key_indexes_written: u64,
    /// Key-ordered copies written (for new segments, and for any whose copy was missing or
    /// damaged).
    pub key_copies_written: u64,
    #[serde(serialize_with = "crate::lsn::serialize_as_text")]
    pub compacted_through: Lsn,
    /// Leaves in the archive's evidence tree after the run (0 when it compacted nothing).
    pub tree_size: u64,
    /// The checkpoint signed after the run, if a signing key was given.
    pub checkpoint: Option<PathBuf>,
    /// Keyframes written after the run.
    pub keyframes_written: u64,
    /// The longest time one commit of the run that listed new segments and trimmed the log
    /// held the log's write lock, in microseconds: the writer could not make anything durable
    /// (nor acknowledge it) meanwhile. 0 when the run compacted nothing.
    pub lock_us: u64,
    /// Why the keyframes that were due were not written (the run itself succeeded: a
    /// keyframe only speeds `as_of` up, and the next run tries again).
    pub keyframe_error: Option<String>,
}

/// Turns the log into segments and merges small segments. One compactor per archive at a
/// time (the capture runs one on its own thread; `pgtrail compact` holds the log exclusively).
pub struct Compactor {
    db: Arc<Database>,
    segments_dir: PathBuf,
    options: CompactOptions,
    /// Segments whose key index this compactor wrote or checked whole: each is read once per
    /// process, not at every run.
    indexed: std::sync::Mutex<HashSet<String>>,
    /// Complete the log's records before the cut (see "Completion after acknowledgement" in
    /// the log's doc): a command that holds the archive ([`for_log`](Self::for_log)) does, so
    /// that it compacts every finished transaction. Beside a capture, whose writer completes
    /// when it has nothing to acknowledge, compaction takes what is complete.
    complete_first: bool,
    /// The listed segments and keyframes (their ids) after this compactor's keyframe writer
    /// last ran without error: keyframes are derived from the listed segments, so while both
    /// lists stay the same there is nothing new to write them from, and the writer, which
    /// reads the whole log tail, is not run again. (A capture's compactor runs every second
    /// while a backlog waits for completion.)
    keyframes_seen: std::sync::Mutex<Option<ListedIds>>,
}

/// The ids of an archive's listed segments and keyframes.
type ListedIds = (Vec<u64>, Vec<u64>);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Group {
    Table {
        relation_id: u32,
        version: ChangeKey,
    },
    Messages,
}

fn group_of(entry: &SegmentEntry) -> Group {
    match &entry.content {
        SegmentContent::Table(rel) => Group::Table {
            relation_id: rel.relation_id,
            version: rel.valid_from,
        },
        SegmentContent::Messages => Group::Messages,
    }
}

/// A file-name-safe form of a table name: letters, digits, `_`, `-` and `.` stay, every other
/// byte becomes `%XX` (also the Hive partition-value form exports use).
pub fn file_safe(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `<id>_<table>_<first lsn>.<seq>-<last lsn>.<seq>.parquet`: what the file holds, in a name
/// that sorts by id.
fn segment_file_name(id: u64, content: &SegmentContent, min: ChangeKey, max: ChangeKey) -> String {
    format!(
        "{id:08}_{}_{:016X}.{}-{:016X}.{}.parquet",
        file_safe(&content.table_name()),
        min.commit_lsn.0,
        min.seq,
        max.commit_lsn.0,
        max.seq
    )
}

/// Per-operation counts as the manifest stores them.
fn owned(counts: Option<BTreeMap<&'static str, u64>>) -> BTreeMap<String, u64> {
    counts
        .unwrap_or_default()
        .into_iter()
        .map(|(op, n)| (op.to_string(), n))
        .collect()
}

fn finish(
    id: u64,
    content: SegmentContent,
    w: SegmentWriter,
    op_counts: BTreeMap<String, u64>,
) -> Result<SegmentEntry, CompactError> {
    let name_content = content.clone();
    let w = w.finish(|min, max| segment_file_name(id, &name_content, min, max))?;
    Ok(SegmentEntry {
        id,
        file_name: w.file_name,
        content,
        min_key: w.min_key,
        max_key: w.max_key,
        min_committed_at_us: w.min_committed_at_us,
        max_committed_at_us: w.max_committed_at_us,
        rows: w.rows,
        bytes: w.bytes,
        raw_bytes: w.raw_bytes,
        sha256: w.sha256,
        created_at_us: now_us(),
        op_counts,
    })
}

impl Compactor {
    /// A compactor for the archive whose log `log` this process holds.
    pub fn for_log(log: &crate::ChangeLog, options: CompactOptions) -> Compactor {
        Compactor {
            complete_first: true,
            ..Compactor::new(log.shared(), log.dir(), options)
        }
    }

    /// A compactor for the archive in `archive_dir` whose log is `log`.
    pub fn new(log: SharedLog, archive_dir: &Path, options: CompactOptions) -> Compactor {
        Compactor {
            db: log.0,
            segments_dir: archive_dir.join(SEGMENTS_DIR),
            options,
            indexed: std::sync::Mutex::new(HashSet::new()),
            complete_first: false,
            keyframes_seen: std::sync::Mutex::new(None),
        }
    }

    pub fn segments_dir(&self) -> &Path {
        &self.segments_dir
    }

    /// Compact the log, merge small segments and remove files no longer needed.
    pub fn run(&self) -> Result<CompactReport, CompactError> {
        let mut report = CompactReport::default();
        self.ensure_dir()?;
        self.remove_unlisted(&mut report)?;
        self.compact_log(&mut report)?;
        self.merge_small(&mut report)?;
        self.remove_retired(&mut report)?;
        self.index_keys(&mut report)?;
        if let Some(writer) = &self.options.keyframes
            && self.listed_ids()?
                != *self
                    .keyframes_seen
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
        {
            // After everything is committed: keyframes are derived from the segments listed,
            // and their failure costs speed, never a change.
            match writer.write_due(&self.log(), self.archive_dir()) {
                Ok(n) => {
                    report.keyframes_written = n;
                    *self
                        .keyframes_seen
                        .lock()
                        .unwrap_or_else(|p| p.into_inner()) = self.listed_ids()?;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "keyframes were not written; as_of reads more history until the next run writes them");
                    report.keyframe_error = Some(e);
                }
            }
        }
        Ok(report)
    }

    /// The ids of the listed segments and keyframes (see `keyframes_seen`).
    fn listed_ids(&self) -> Result<Option<ListedIds>, CompactError> {
        let reader = LogReader::from_db(self.db.as_ref())?;
        let segments = reader.manifest()?.segments.iter().map(|s| s.id).collect();
        let keyframes = reader.keyframes()?.iter().map(|k| k.id).collect();
        Ok(Some((segments, keyframes)))
    }

    /// Write the key index and the key-ordered copy ([`key_copy`]) of every listed table
    /// segment that lacks a valid pair (an archive written before them, a file removed or
    /// damaged, a segment just listed: its writer wrote the index alone).
    ///
    /// Safe at any point: both are derived from their listed, immutable segment and published
    /// atomically, the copy before the index that names it (a crash leaves a `.tmp` file the
    /// next run removes, a copy no index names yet, or no index, which reads do without);
    /// only this compactor retires segments, so none is removed meanwhile.
    fn index_keys(&self, report: &mut CompactReport) -> Result<(), CompactError> {
        let manifest = LogReader::from_db(self.db.as_ref())?.manifest()?;
        let mut indexed = self
            .indexed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        indexed.retain(|name| manifest.segments.iter().any(|s| &s.file_name == name));
        for seg in &manifest.segments {
            if indexed.contains(&seg.file_name) {
                continue;
            }
            let Some(mut keys) = KeyIndexBuilder::for_content(&seg.content) else {
                continue;
            };
            let path = self.segments_dir.join(&seg.file_name);
            let known = key_index::check(&path, &seg.sha256);
            if let Ok(Some(copy)) = &known {
                // Each copy is hashed once per process, here; readers hash it again before
                // they believe it.
                let copy_path = self.segments_dir.join(key_copy_name(&seg.file_name));
                if sha256_file(&copy_path).is_ok_and(|found| &found == copy) {
                    indexed.insert(seg.file_name.clone());
                    continue;
                }
            }
            let entries = match known {
                Ok(_) => key_index::entries(&path, &seg.sha256).ok(),
                Err(_) => None,
            };
            let entries = match entries {
                Some(entries) => entries,
                None => {
                    let columns: Vec<Vec<String>> = ["before", "after"]
                        .iter()
                        .flat_map(|image| {
                            keys.key()
                                .iter()
                                .map(|k| vec![image.to_string(), k.clone()])
                        })
                        .collect();
                    let reader = SegmentReader::open_selected(
                        &path,
                        Some(&seg.sha256),
                        self.options.segment.batch_rows,
                        (0, u64::MAX),
                        (i64::MIN, i64::MAX),
                        Some(&columns),
                        None,
                    )?;
                    for batch in reader {
                        keys.add(&batch?)
                            .map_err(|reason| crate::SegmentError::Corrupt {
                                path: path.clone(),
                                reason: format!("cannot index its keys: {reason}"),
                            })?;
                    }
                    report.key_indexes_written += 1;
                    keys.into_entries()
                }
            };
            let copy = key_copy::write_key_copy(
                &self.segments_dir,
                &seg.file_name,
                &seg.sha256,
                &entries,
                self.options.segment.zstd_level,
                self.options.key_copy_budget_bytes,
            )?;
            crashpoint::hit("compact:before_key_copy_index");
            key_index::write_index(
                &self.segments_dir,
                &seg.file_name,
                &seg.sha256,
                &entries,
                Some(&copy.sha256),
            )?;
            indexed.insert(seg.file_name.clone());
            report.key_copies_written += 1;
        }
        Ok(())
    }

    /// Rewrite the archive's evidence files from the log and sign a checkpoint if the tree grew
    /// (see [`evidence::state::publish`]); the checkpoint signed, if any.
    pub fn publish_evidence(&self) -> Result<Option<PathBuf>, CompactError> {
        if !self.options.evidence {
            return Ok(None);
        }
        let archive = self.archive_dir();
        let published = evidence::state::publish(
            self.db.as_ref(),
            archive,
            self.options.signer.as_deref(),
            self.options.publish_checkpoints.as_deref(),
        )
        .map_err(|e| CompactError::Evidence(Box::new(e)))?;
        Ok(published.signed)
    }

    /// Remove files an interrupted run left behind (temporary files, segments no manifest
    /// lists) without compacting; the capture calls it at start.
    pub fn remove_orphans(&self) -> Result<u64, CompactError> {
        let mut report = CompactReport::default();
        self.ensure_dir()?;
        self.remove_unlisted(&mut report)?;
        // A crash after a compaction's commit and before its evidence files: write them now.
        self.publish_evidence()?;
        Ok(report.orphans_removed)
    }

    fn ensure_dir(&self) -> Result<(), CompactError> {
        Ok(create_private_dir(&self.segments_dir)?)
    }

    fn listed_files(&self) -> Result<HashSet<String>, CompactError> {
        let reader = LogReader::from_db(self.db.as_ref())?;
        let mut names: HashSet<String> = reader
            .manifest()?
            .segments
            .into_iter()
            .map(|s| s.file_name)
            .collect();
        names.extend(
            retired_files(reader.read_transaction())?
                .into_iter()
                .map(|(name, _)| name),
        );
        // Keyframes by the name `retired` gives theirs, so one set answers for both.
        names.extend(
            reader
                .keyframes()?
                .into_iter()
                .map(|k| format!("{}{}", keyframe::RETIRED_PREFIX, k.file_name)),
        );
        Ok(names)
    }

    /// Remove temporary files and segment files the manifest does not list.
    ///
    /// Safe because the manifest entry and the log trim are one redb transaction: a file that
    /// no committed manifest lists never had its rows trimmed from the log (they are still
    /// there and will be compacted again), and a file a merge unlisted is in `retired` until
    /// its grace period ends. Only one compactor runs at a time, so no file of a run in
    /// progress can be mistaken for an orphan.
    fn remove_unlisted(&self, report: &mut CompactReport) -> Result<(), CompactError> {
        let listed = self.listed_files()?;
        let entries =
            std::fs::read_dir(&self.segments_dir).map_err(|source| crate::SegmentError::Io {
                path: self.segments_dir.clone(),
                source,
            })?;
        let mut removed = 0;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            // A key index and a key-ordered copy go with their segment: unlisted segment,
            // unlisted index and copy.
            let segment = name
                .strip_suffix(KEY_INDEX_SUFFIX)
                .or_else(|| name.strip_suffix(KEY_COPY_SUFFIX))
                .unwrap_or(&name);
            let orphan = name.ends_with(".tmp")
                || ((name.ends_with(".parquet")
                    || name.ends_with(KEY_INDEX_SUFFIX)
                    || name.ends_with(KEY_COPY_SUFFIX))
                    && !listed.contains(segment));
            if orphan {
                tracing::info!(file = %name, "removing a segment file no manifest lists (left by an interrupted compaction)");
                remove_if_exists(&entry.path());
                removed += 1;
            }
        }
        if removed > 0 {
            fsync_dir(&self.segments_dir)?;
        }
        report.orphans_removed += removed;
        self.remove_unlisted_keyframes(&listed, report)?;
        Ok(())
    }

    /// Remove keyframe files no entry lists and none retired: left by a crash between a
    /// keyframe's file and its entry (see [`keyframe`]). Safe for the same reason as for
    /// segments: keyframes are written only on this compactor's thread, never while this runs.
    fn remove_unlisted_keyframes(
        &self,
        listed: &HashSet<String>,
        report: &mut CompactReport,
    ) -> Result<(), CompactError> {
        let dir = self.archive_dir().join(KEYFRAMES_DIR);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Ok(());
        };
        let mut removed = 0;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let kept = listed.contains(&format!("{}{name}", keyframe::RETIRED_PREFIX));
            if name.ends_with(".tmp") || (name.ends_with(".parquet") && !kept) {
                tracing::info!(file = %name, "removing a keyframe file no entry lists (left by an interrupted keyframe run)");
                remove_if_exists(&entry.path());
                removed += 1;
            }
        }
        if removed > 0 {
            fsync_dir(&dir)?;
        }
        report.orphans_removed += removed;
        Ok(())
    }

    /// The archive's directory (the segments directory's parent).
    pub(crate) fn archive_dir(&self) -> &Path {
        self.segments_dir.parent().unwrap_or(Path::new("."))
    }

    /// The archive's log, through this compactor's handle.
    pub(crate) fn log(&self) -> SharedLog {
        SharedLog(self.db.clone())
    }

    /// Move every finished transaction in the log into segments and trim it from the log.
    fn compact_log(&self, report: &mut CompactReport) -> Result<(), CompactError> {
        if self.complete_first {
            crate::log::complete_pending(&self.db)?;
        }
        // One read transaction for the cut and everything read with it (the enum types the
        // segments' descriptions name are those recorded as of the cut).
        let reader = LogReader::from_db(self.db.as_ref())?;
        let rtx = reader.read_transaction();
        let meta = rtx.open_table(META)?;
        // The cut: the last finished source transaction. Keys at or below it never change
        // again (replays are skipped whole and recovery only removes keys above it), so the
        // set read here is exactly the set trimmed below. No further than the last
        // transaction completed whole (`completed_through`): the records after it may still
        // be rewritten by completion, and completion needs the index as of them (see
        // "Completion after acknowledgement" in the log's doc); it only ever moves forward,
        // and completion never rewrites a record at or before it, so the value read here stays
        // a safe bound until the trim commits.
        let last_commit = Lsn(meta_u64(&meta, META_LAST_COMMIT)?);
        let completed = completed_through(&meta)?;
        let cut = if completed.seq == u32::MAX {
            completed.commit_lsn.min(last_commit)
        } else {
            // Part of a transaction is complete: the one before it is the last whole one.
            match rtx
                .open_table(TXNS)?
                .range(..completed.commit_lsn.0)?
                .next_back()
            {
                Some(entry) => Lsn(entry?.0.value()),
                None => Lsn::ZERO,
            }
        };
        let mut next_id = meta_u64(&meta, META_NEXT_SEGMENT)?.max(1);
        // The tree as of the cut: the run's leaves are pushed onto it before the write lock.
        let tree = evidence::state::frontier_in(&meta)?;
        let enums = reader.enum_types()?;
        // This run is a new evidence epoch: a fresh seed for its changes' salts, from its
        // first change on (the epoch's start is known at the first change read). The writers
        // need no earlier epoch: every change the run compacts is in this one.
        let seed = evidence::state::new_seed()?;
        let mut epochs: Option<Epochs> = None;
        // The writers' leaves wait on disk, not in memory, until the commit merges them.
        let spill = LeafSpill::create_in(&self.segments_dir)?;
        let hasher = self.options.evidence.then(LeafHasher::start).transpose()?;
        let changes = rtx.open_table(CHANGES)?;
        let relations = rtx.open_table(RELATIONS)?;
        let mut writers: BTreeMap<Group, (u64, SegmentContent, SegmentWriter)> = BTreeMap::new();
        let mut op_counts: BTreeMap<Group, BTreeMap<&'static str, u64>> = BTreeMap::new();
        let mut entries: Vec<SegmentEntry> = Vec::new();
        let mut rel_cache: HashMap<(u32, ChangeKey), RelationVersion> = HashMap::new();
        let (mut count, mut txns, mut last_lsn) = (0u64, 0u64, None);
        let mut contexts = ContextCursor::new(rtx)?;
        for e in changes.range(..=(cut.0, u32::MAX))? {
            let (k, v) = e?;
            let (lsn, seq) = k.value();
            let key = ChangeKey::new(Lsn(lsn), seq);
            let mut record: ChangeRecord = decode(v.value(), "changes")?;
            contexts.label((lsn, seq), &mut record)?;
            let epochs = epochs.get_or_insert_with(|| Epochs::new(vec![(key, seed)]));
            let group = if record.op == Op::Message {
                Group::Messages
            } else {
                Group::Table {
                    relation_id: record.relation_id,
                    version: record.schema_version,
                }
            };
            let w = match writers.entry(group) {
                std::collections::btree_map::Entry::Occupied(e) => &mut e.into_mut().2,
                std::collections::btree_map::Entry::Vacant(e) => {
                    let content = match *e.key() {
                        Group::Messages => SegmentContent::Messages,
                        Group::Table {
                            relation_id,
                            version,
                        } => {
                            let rel = match rel_cache.get(&(relation_id, version)) {
                                Some(r) => r.clone(),
                                None => {
                                    let v = relations
                                        .get((relation_id, version.commit_lsn.0, version.seq))?
                                        .ok_or_else(|| CompactError::MissingRelation {
                                            key: key.to_string(),
                                            relation_id,
                                            version: version.to_string(),
                                        })?;
                                    let r: RelationVersion = decode(v.value(), "relations")?;
                                    rel_cache.insert((relation_id, version), r.clone());
                                    r
                                }
                            };
                            SegmentContent::Table(rel)
                        }
                    };
                    let id = next_id;
                    next_id += 1;
                    let stem = format!("{id:08}_{}", file_safe(&content.table_name()));
                    let mut w = SegmentWriter::create(
                        &self.segments_dir,
                        &stem,
                        &content,
                        &enums,
                        &self.options.segment,
                    )?;
                    if let Some(hasher) = &hasher {
                        w.compute_leaves(hasher, epochs.clone(), spill.stream());
                    }
                    &mut e.insert((id, content, w)).2
                }
            };
            w.push(key, &record, raw_len(v.value()))?;
            *op_counts
                .entry(group)
                .or_default()
                .entry(record.op.as_str())
                .or_default() += 1;
            count += 1;
            if last_lsn != Some(lsn) {
                txns += 1;
                last_lsn = Some(lsn);
            }
            if w.bytes_written() >= self.options.target_segment_bytes
                && let Some((id, content, w)) = writers.remove(&group)
            {
                entries.push(finish(id, content, w, owned(op_counts.remove(&group)))?);
            }
            if count % 1024 == 0 {
                self.keep_memory_in_budget(&mut writers)?;
            }
        }
        drop((changes, relations, meta));
        drop(reader);
        for (group, (id, content, w)) in std::mem::take(&mut writers) {
            entries.push(finish(id, content, w, owned(op_counts.remove(&group)))?);
        }
        // Every writer has finished, so every batch was sent: wait for the last leaves.
        if let Some(hasher) = hasher {
            hasher.finish()?;
        }
        if count == 0 {
            return Ok(());
        }
        if self.options.evidence && spill.len() != count {
            // Every change of the run is in the new epoch, so each must have a leaf.
            return Err(CompactError::LeavesMissing {
                changes: count,
                leaves: spill.len(),
            });
        }
        // The leaves are hashed into the tree here, before the write lock: the writer waits
        // for that lock, and this is the larger half of what the run would do holding it (at
        // 1.75 million changes, 0.29 s of 0.66). `append` takes the result only if the tree
        // is still the one read with the cut.
        let grown = if self.options.evidence {
            let leaves = spill.merged()?.map(|l| l.map_err(CompactError::from));
            Some(evidence::state::grow(tree, leaves, count)?)
        } else {
            None
        };
        crashpoint::hit("compact:before_manifest");
        let mut wtx = self.db.begin_write()?;
        let locked = Instant::now();
        wtx.set_two_phase_commit(true);
        {
            let mut segments = wtx.open_table(SEGMENTS)?;
            for entry in &entries {
                report.bytes_written += entry.bytes;
                segments.insert(entry.id, encode(&entry).as_slice())?;
            }
            let mut changes = wtx.open_table(CHANGES)?;
            let mut trimmed = 0u64;
            changes.retain_in(..=(cut.0, u32::MAX), |_, _| {
                trimmed += 1;
                false
            })?;
            if trimmed != count {
                // Dropping the transaction without commit leaves the log and manifest as
                // they were; the files just written become orphans.
                return Err(CompactError::LogChanged {
                    expected: count,
                    found: trimmed,
                });
            }
            let mut txn_table = wtx.open_table(TXNS)?;
            txn_table.retain_in(..=cut.0, |_, _| false)?;
            // The context runs of the trimmed transactions go with them (their changes now
            // carry their contexts in the segments just listed, in this same commit).
            let mut contexts = wtx.open_table(CONTEXTS)?;
            contexts.retain_in(..=(cut.0, u32::MAX), |_, _| false)?;
            let mut meta = wtx.open_table(META)?;
            let put = |meta: &mut redb::Table<&str, &[u8]>, name: &str, v: u64| {
                meta.insert(name, v.to_le_bytes().as_slice()).map(|_| ())
            };
            let changes_total = meta_u64(&meta, META_COMPACTED_CHANGES)? + count;
            let txns_total = meta_u64(&meta, META_COMPACTED_TXNS)? + txns;
            put(&mut meta, META_COMPACTED_THROUGH, cut.0)?;
            put(&mut meta, META_NEXT_SEGMENT, next_id)?;
            put(&mut meta, META_COMPACTED_CHANGES, changes_total)?;
            put(&mut meta, META_COMPACTED_TXNS, txns_total)?;
        }
        // The leaves join the tree in the commit that lists their segments: the tree never
        // covers a change the manifest does not list, nor misses one it lists.
        let frontier = match grown {
            Some(grown) => Some(evidence::state::append(&wtx, &seed, grown, cut)?),
            None => None,
        };
        // The one commit that lists the segments and trims the log (two-phase, durable).
        wtx.commit()?;
        // How long the writer could not commit (and so could not acknowledge) for this run.
        let lock_us = locked.elapsed().as_micros() as u64;
        let lock_ms = lock_us / 1000;
        crashpoint::hit("compact:after_commit");
        if let Some(frontier) = frontier {
            report.tree_size = frontier.size();
            report.checkpoint = self.publish_evidence()?;
        }
        report.changes += count;
        report.transactions += txns;
        report.segments_written += entries.len() as u64;
        report.compacted_through = cut;
        report.lock_us = report.lock_us.max(lock_us);
        tracing::info!(changes = count, segments = entries.len(), through = %cut, lock_ms, "compacted the log into segments");
        Ok(())
    }

    /// Cut row groups early in the writers holding the most memory until all fit the budget.
    fn keep_memory_in_budget(
        &self,
        writers: &mut BTreeMap<Group, (u64, SegmentContent, SegmentWriter)>,
    ) -> Result<(), CompactError> {
        loop {
            let total: usize = writers.values().map(|(_, _, w)| w.memory_bytes()).sum();
            if total <= self.options.memory_budget_bytes {
                return Ok(());
            }
            let Some((_, _, largest)) = writers
                .values_mut()
                .max_by_key(|(_, _, w)| w.memory_bytes())
            else {
                return Ok(());
            };
            let before = largest.memory_bytes();
            largest.flush_row_group()?;
            if largest.memory_bytes() >= before {
                return Ok(());
            }
        }
    }

    /// Merge runs of small consecutive segments of one table version into larger ones.
    fn merge_small(&self, report: &mut CompactReport) -> Result<(), CompactError> {
        let reader = LogReader::from_db(self.db.as_ref())?;
        let manifest = reader.manifest()?;
        // Each merged segment's description names its enum columns as the capture last found
        // them (read once for every merge of the run).
        let enums = reader.enum_types()?;
        drop(reader);
        let mut groups: BTreeMap<Group, Vec<SegmentEntry>> = BTreeMap::new();
        for s in manifest.segments {
            groups.entry(group_of(&s)).or_default().push(s);
        }
        let small = self.options.target_segment_bytes / 2;
        for (_, mut segs) in groups {
            segs.sort_by_key(|s| s.min_key);
            let mut run: Vec<SegmentEntry> = Vec::new();
            let mut run_bytes = 0u64;
            for s in segs {
                if s.bytes >= small || run_bytes + s.bytes > self.options.target_segment_bytes {
                    self.merge_run(std::mem::take(&mut run), &enums, report)?;
                    run_bytes = 0;
                }
                if s.bytes < small {
                    run_bytes += s.bytes;
                    run.push(s);
                }
            }
            self.merge_run(run, &enums, report)?;
        }
        Ok(())
    }

    fn merge_run(
        &self,
        run: Vec<SegmentEntry>,
        enums: &crate::EnumTypes,
        report: &mut CompactReport,
    ) -> Result<(), CompactError> {
        if run.len() >= self.options.merge_min_segments.max(2) {
            self.merge(run, enums, report)
        } else {
            Ok(())
        }
    }

    fn merge(
        &self,
        inputs: Vec<SegmentEntry>,
        enums: &crate::EnumTypes,
        report: &mut CompactReport,
    ) -> Result<(), CompactError> {
        let first = &inputs[0];
        let content = first.content.clone();
        let id = {
            let rtx = self.db.begin_read()?;
            meta_u64(&rtx.open_table(META)?, META_NEXT_SEGMENT)?.max(1)
        };
        let stem = format!("{id:08}_{}", file_safe(&content.table_name()));
        let mut w = SegmentWriter::create(
            &self.segments_dir,
            &stem,
            &content,
            enums,
            &self.options.segment,
        )?;
        for input in &inputs {
            let path = self.segments_dir.join(&input.file_name);
            let reader =
                SegmentReader::open(&path, Some(&input.sha256), self.options.segment.batch_rows)?;
            let mut raw = input.raw_bytes;
            for batch in reader {
                w.push_batch(&batch?, std::mem::take(&mut raw))?;
            }
        }
        let mut counts: BTreeMap<String, u64> = BTreeMap::new();
        for (op, n) in inputs.iter().flat_map(|s| s.op_counts.iter()) {
            *counts.entry(op.clone()).or_default() += n;
        }
        // A merge moves rows between files; their leaves stay as they are (not recomputed).
        let entry = finish(id, content, w, counts)?;
        crashpoint::hit("merge:before_manifest");
        let rows_in: u64 = inputs.iter().map(|s| s.rows).sum();
        if entry.rows != rows_in {
            return Err(CompactError::LogChanged {
                expected: rows_in,
                found: entry.rows,
            });
        }
        let mut wtx = self.db.begin_write()?;
        wtx.set_two_phase_commit(true);
        {
            let mut segments = wtx.open_table(SEGMENTS)?;
            let mut retired = wtx.open_table(RETIRED)?;
            let now = now_us();
            for input in &inputs {
                segments.remove(input.id)?;
                retired.insert(input.file_name.as_str(), now)?;
            }
            segments.insert(entry.id, encode(&entry).as_slice())?;
            let mut meta = wtx.open_table(META)?;
            meta.insert(META_NEXT_SEGMENT, (id + 1).to_le_bytes().as_slice())?;
        }
        // One commit swaps the inputs for the merged segment: readers see either all inputs
        // or the merged file, never both and never neither.
        wtx.commit()?;
        crashpoint::hit("merge:after_commit");
        self.publish_evidence()?;
        report.merged_inputs += inputs.len() as u64;
        report.merged_outputs += 1;
        report.bytes_written += entry.bytes;
        tracing::info!(table = %entry.table_name(), inputs = inputs.len(), rows = entry.rows, "merged small segments");
        Ok(())
    }

    /// Purge the history of `tables` before `before` (see [`evidence::redact::plan_purge`]):
    /// plan it on this process's log and carry it out. Returns the changes redacted and what
    /// the plan counted. Crash safety is [`redact`](Self::redact)'s.
    pub fn purge(
        &self,
        tables: &[String],
        before: Lsn,
        reason: &str,
        mode: evidence::redact::PurgeMode,
    ) -> Result<(u64, evidence::redact::PurgeCounts), CompactError> {
        let log = self.log();
        let (plan, counts) = evidence::redact::plan_purge(
            self.archive_dir(),
            Some(&log),
            tables,
            before,
            reason,
            mode,
        )
        .map_err(|e| CompactError::Redact(Box::new(e)))?;
        if plan.segments.is_empty() {
            return Ok((0, counts));
        }
        Ok((self.redact(plan, reason)?, counts))
    }

    /// Erase `parts` (0 context, 1 before, 2 after) of the changes `keys` (`pgtrail redact`):
    /// verify the archive, plan, and carry the plan out. Parts erased already are left as they
    /// are.
    pub fn redact_changes(
        &self,
        keys: &[ChangeKey],
        parts: &[u8],
        reason: &str,
    ) -> Result<evidence::redact::RedactCounts, CompactError> {
        let log = self.log();
        let (plan, erased_already) =
            evidence::redact::plan(self.archive_dir(), Some(&log), keys, parts)
                .map_err(|e| CompactError::Redact(Box::new(e)))?;
        let redacted = match plan.segments.is_empty() {
            true => 0,
            false => self.redact(plan, reason)?,
        };
        Ok(evidence::redact::RedactCounts {
            redacted,
            erased_already,
        })
    }

    /// Carry out a redaction `plan` (see [`evidence::redact`]): erase `parts` (0 context, 1
    /// before, 2 after) of its changes, keeping their digests in the archive's redaction
    /// records; returns the changes redacted.
    ///
    /// Each segment is rewritten whole beside the old one, its leaves recomputed (with the
    /// erased digests) and compared with the verified ones before anything is listed. Crash
    /// safety as for a merge: until the one commit that lists the new file, retires the old and
    /// records the redactions, the new file is an orphan the next run removes; after it, the
    /// old file is retired (deleted after the grace period). The erased values stay readable
    /// in the retired file until then, and in any backup: erasure is complete only when those
    /// are gone too.
    pub fn redact(
        &self,
        plan: evidence::redact::RedactPlan,
        reason: &str,
    ) -> Result<u64, CompactError> {
        use evidence::redact::{Receipt, RedactError};
        let redact_error = |e: RedactError| CompactError::Redact(Box::new(e));
        if plan
            .segments
            .iter()
            .flat_map(|s| s.changes.values())
            .any(|parts| parts.is_empty())
        {
            return Err(redact_error(RedactError::NoParts));
        }
        // No change under a legal hold in force is erased. The archive is this process's alone
        // (redb's lock), so no hold can be placed between this check and the commits below.
        let holds = evidence::hold::list(&self.db.begin_read()?)?;
        for segment in &plan.segments {
            let table = segment.entry.content.scope_name();
            for key in segment.changes.keys() {
                let held = holds.iter().find(|h| match &table {
                    Some(table) => h.covers(*key, table),
                    None => h.covers_message(*key),
                });
                if let Some(hold) = held {
                    return Err(redact_error(RedactError::Held {
                        change: *key,
                        table: table.unwrap_or_else(|| "the logical messages".into()),
                        hold: hold.id,
                        reason: hold.reason.clone(),
                    }));
                }
            }
        }
        self.ensure_dir()?;
        let enums = LogReader::from_db(self.db.as_ref())?.enum_types()?;
        let mut redacted = 0u64;
        // A purge's one receipt goes into the first segment's commit: from the first erasure
        // on, the record says a purge happened (a crash after it leaves fewer changes erased
        // than the receipt counts; running the purge again finishes it and adds a receipt).
        let mut purge_receipt = match &plan.receipt {
            Receipt::EachChange => None,
            Receipt::Purge(payload) => Some(payload.clone()),
        };
        let each_change = purge_receipt.is_none();
        let total = plan.segments.len();
        for (n, segment) in plan.segments.into_iter().enumerate() {
            let old = segment.entry;
            tracing::info!(
                segment = %old.file_name,
                changes = segment.changes.len(),
                "rewriting segment {} of {total}",
                n + 1
            );
            let listed = LogReader::from_db(self.db.as_ref())?
                .manifest()?
                .segments
                .into_iter()
                .any(|s| s.id == old.id && s.sha256 == old.sha256);
            if !listed {
                return Err(redact_error(RedactError::Changed(old.file_name)));
            }
            // The columns of a row image that stay (the key's); a message has no image.
            let keep: Vec<bool> = match &old.content {
                SegmentContent::Table(rel) => rel
                    .columns
                    .iter()
                    .map(|c| c.is_key || rel.primary_key.contains(&c.name))
                    .collect(),
                SegmentContent::Messages => Vec::new(),
            };
            let erase = |row: &mut Option<crate::change::Row>| {
                if let Some(row) = row {
                    for (cell, keep) in row.iter_mut().zip(&keep) {
                        if !keep {
                            *cell = crate::change::Cell::Unknown;
                        }
                    }
                }
            };
            let id = {
                let rtx = self.db.begin_read()?;
                meta_u64(&rtx.open_table(META)?, META_NEXT_SEGMENT)?.max(1)
            };
            let stem = format!("{id:08}_{}", file_safe(&old.content.table_name()));
            let mut w = SegmentWriter::create(
                &self.segments_dir,
                &stem,
                &old.content,
                &enums,
                &self.options.segment,
            )?;
            // The tree's state now: the planned changes' parts and every row's leaf are
            // computed from the old file with it. The plan verified the archive, the file is
            // still listed with the SHA-256 it verified with (checked above and on opening),
            // and nothing else holds the archive, so these are the verified leaves; computing
            // them here, one segment at a time, keeps memory to one segment's leaves.
            // Only this segment's records and salts: a long history of earlier erasures stays
            // on disk.
            let rtx = self.db.begin_read()?;
            let state = evidence::state::read_within(&rtx, Some(old.min_key..=old.max_key))?;
            drop(rtx);
            let mut erased = state.erased()?;
            let mut old_leaves: Vec<evidence::leaf::Leaf> = Vec::with_capacity(old.rows as usize);
            let mut digests: BTreeMap<ChangeKey, [evidence::merkle::Hash; 4]> = BTreeMap::new();
            let path = self.segments_dir.join(&old.file_name);
            let reader =
                SegmentReader::open(&path, Some(&old.sha256), self.options.segment.batch_rows)?;
            for batch in reader {
                let batch = batch?;
                evidence::leaf::for_each_leaf(
                    &old.content,
                    &batch,
                    evidence::leaf::epoch_inputs(&state.epochs, &erased),
                    |key, _, data, parts| {
                        old_leaves.push(evidence::leaf::Leaf {
                            key,
                            hash: evidence::merkle::leaf_hash(data),
                        });
                        if segment.changes.contains_key(&key) {
                            digests.insert(key, *parts);
                        }
                    },
                )
                .map_err(|e| redact_error(RedactError::Unverified(e.to_string())))?;
                if matches!(old.content, SegmentContent::Messages) {
                    let erased = crate::segment::erase_message_contents(&batch, |key| {
                        segment.changes.get(&key).is_some_and(|p| p.contains(&0))
                    })?;
                    w.push_batch(&erased, 0)?;
                    continue;
                }
                for (key, mut record) in crate::segment::read_records(&old.content, &batch)? {
                    if let Some(parts) = segment.changes.get(&key) {
                        if parts.contains(&0) {
                            record.context = None;
                        }
                        if parts.contains(&1) {
                            erase(&mut record.before);
                        }
                        if parts.contains(&2) {
                            erase(&mut record.after);
                        }
                    }
                    w.push(key, &record, 0)?;
                }
            }
            if let Some(missing) = segment.changes.keys().find(|k| !digests.contains_key(k)) {
                return Err(redact_error(RedactError::NotInTree(*missing)));
            }
            let mut entry = finish(id, old.content.clone(), w, old.op_counts.clone())?;
            entry.raw_bytes = old.raw_bytes;
            // An image erased also erases the `changed` list (part 3): the writer derives it
            // from the images, and the row's list then says nothing of the original.
            let parts_of = |parts: &Vec<u8>| -> Vec<u8> {
                if parts.iter().any(|&p| p == 1 || p == 2) {
                    parts.iter().copied().chain([3]).collect()
                } else {
                    parts.clone()
                }
            };
            for (key, parts) in &segment.changes {
                let slot = erased.entry(*key).or_insert([None; 4]);
                for k in parts_of(parts) {
                    slot[k as usize] = Some(digests[key][k as usize]);
                }
            }
            // The new file's leaves, with the erased digests (earlier and these), must be the
            // old file's, one for one: nothing else in the segment may have changed.
            let new_path = self.segments_dir.join(&entry.file_name);
            let check = || -> Result<(), CompactError> {
                let reader = SegmentReader::open(&new_path, Some(&entry.sha256), 8192)?;
                let content = reader.content().clone();
                let mut expected = old_leaves.iter();
                for batch in reader {
                    for leaf in
                        evidence::leaf::batch_leaves(&content, &batch?, &state.epochs, &erased)
                            .map_err(|e| redact_error(RedactError::Unverified(e.to_string())))?
                    {
                        if expected.next() != Some(&leaf) {
                            return Err(redact_error(RedactError::LeavesDiffer(leaf.key)));
                        }
                    }
                }
                if let Some(missing) = expected.next() {
                    return Err(redact_error(RedactError::LeavesDiffer(missing.key)));
                }
                Ok(())
            };
            if let Err(e) = check() {
                remove_if_exists(&new_path);
                return Err(e);
            }
            crashpoint::hit("redact:before_manifest");
            let mut wtx = self.db.begin_write()?;
            wtx.set_two_phase_commit(true);
            {
                let mut segments = wtx.open_table(SEGMENTS)?;
                let mut retired = wtx.open_table(RETIRED)?;
                segments.remove(old.id)?;
                retired.insert(old.file_name.as_str(), now_us())?;
                segments.insert(entry.id, encode(&entry).as_slice())?;
                let mut meta = wtx.open_table(META)?;
                meta.insert(META_NEXT_SEGMENT, (id + 1).to_le_bytes().as_slice())?;
                // Counted, so that publishing writes the salts files again (and only then).
                let erasures = meta_u64(&meta, evidence::state::META_ERASURES)?;
                meta.insert(
                    evidence::state::META_ERASURES,
                    (erasures + 1).to_le_bytes().as_slice(),
                )?;
                let mut records = wtx.open_table(evidence::state::REDACTIONS)?;
                let mut salts_table = wtx.open_table(evidence::state::SALTS)?;
                let mut epochs_table = wtx.open_table(evidence::state::EPOCHS)?;
                // The epochs of these changes are sealed (their seeds erased, every change's
                // salts recorded as the seed gave them), then each redacted part's salt is
                // zeroed: nothing left in the archive derives it. Sealing gives the same salts,
                // so it is safe in any commit; zeroing is safe only in the commit that erases
                // the part's value and records its digest, which is this one.
                // Each epoch once (a purge erases many changes of one epoch), and only while
                // its seed is still there: the state read above predates this commit.
                let sealing: BTreeMap<ChangeKey, evidence::leaf::Seed> = segment
                    .changes
                    .keys()
                    .filter_map(|key| match state.epochs.epoch_of(*key) {
                        Some((start, Some(seed))) => Some((start, *seed)),
                        _ => None,
                    })
                    .collect();
                for (start, seed) in sealing {
                    for member in plan.epochs.get(&start).into_iter().flatten() {
                        let salts = evidence::leaf::salts(&seed, *member);
                        salts_table
                            .insert((member.commit_lsn.0, member.seq), salts.as_flattened())?;
                    }
                    epochs_table.insert((start.commit_lsn.0, start.seq), [].as_slice())?;
                }
                let mut leafed = wtx.open_table(evidence::state::LEAFED_REDACTIONS)?;
                for (key, parts) in &segment.changes {
                    let k = (key.commit_lsn.0, key.seq);
                    let earlier = state.redactions.get(key).cloned();
                    let parts = parts_of(parts);
                    let record =
                        evidence::redact::record(*key, &digests[key], &parts, reason, earlier);
                    let json =
                        serde_json::to_string(&record).expect("a redaction record is plain data");
                    // Each redaction of a change (a second one too) queues its receipt in
                    // this commit, in order with the holds placed and released and the purge
                    // receipts, so that verify can tell whether a hold was in force at it. A
                    // purge's changes are on the record by its one receipt, not each by its
                    // own leaf. Either way the record is marked as leafed: the compaction's
                    // scan of the records is for receipts an older pgtrail left to it.
                    if each_change {
                        evidence::hold::queue_event(&wtx, evidence::leaf::KIND_REDACTION, &json)?;
                    }
                    leafed.insert(k, [].as_slice())?;
                    let mut salts = state.epochs.salts_for(*key).unwrap_or([[0; 16]; 4]);
                    for part in record.parts.keys() {
                        salts[*part as usize] = [0; 16];
                    }
                    salts_table.insert(k, salts.as_flattened())?;
                    records.insert(k, json.as_bytes())?;
                }
            }
            if let Some(payload) = purge_receipt.take() {
                evidence::hold::queue_event(&wtx, evidence::leaf::KIND_PURGE, &payload)?;
            }
            // A keyframe of this table may hold the values erased here: it is unlisted in the
            // same commit (its file retired), and the next keyframe run writes it again from
            // the redacted segments.
            if let SegmentContent::Table(rel) = &old.content {
                let ids = keyframe::ids_of_relation(&wtx, rel.relation_id)?;
                keyframe::unlist_in(&wtx, &ids)?;
            }
            // One commit lists the rewritten segment, retires the old one and records what
            // was erased (and unlists the keyframes): readers see the old file with no
            // record, or the new with it.
            wtx.commit()?;
            crashpoint::hit("redact:after_segment");
            redacted += segment.changes.len() as u64;
            tracing::info!(segment = %entry.file_name, changes = segment.changes.len(), "redacted");
        }
        self.publish_evidence()?;
        Ok(redacted)
    }

    /// Delete files that merges unlisted more than the grace period ago.
    ///
    /// Safe: a retired file is listed by no manifest, its rows live in the merged segment;
    /// the file is removed before its `retired` entry, so a crash in between leaves an entry
    /// whose file is already gone, which the next run simply drops.
    fn remove_retired(&self, report: &mut CompactReport) -> Result<(), CompactError> {
        let cutoff = now_us() - self.options.retire_grace.as_micros() as i64;
        let expired: Vec<String> = retired_files(&self.db.begin_read()?)?
            .into_iter()
            .filter(|(_, at)| *at <= cutoff)
            .map(|(name, _)| name)
            .collect();
        if expired.is_empty() {
            return Ok(());
        }
        let keyframes_dir = self.archive_dir().join(KEYFRAMES_DIR);
        for name in &expired {
            if let Some(file) = name.strip_prefix(keyframe::RETIRED_PREFIX) {
                remove_if_exists(&keyframes_dir.join(file));
                continue;
            }
            // The key index and copy first: a crash between leaves the segment (still retired,
            // removed next run), never an index or copy without a segment that is kept.
            remove_if_exists(&self.segments_dir.join(key_index_name(name)));
            remove_if_exists(&self.segments_dir.join(key_copy_name(name)));
            remove_if_exists(&self.segments_dir.join(name));
        }
        fsync_dir(&self.segments_dir)?;
        if keyframes_dir.exists() {
            fsync_dir(&keyframes_dir)?;
        }
        let wtx = self.db.begin_write()?;
        {
            let mut retired = wtx.open_table(RETIRED)?;
            for name in &expired {
                retired.remove(name.as_str())?;
            }
        }
        wtx.commit()?;
        report.retired_removed += expired.len() as u64;
        Ok(())
    }
}

/// The retired segment files and when each was retired (microseconds since the epoch).
///
/// A log that never retired a file has no table yet; any other error is passed on, never taken
/// for "none retired", since a file missing from this list may be removed as an orphan.
fn retired_files(rtx: &redb::ReadTransaction) -> Result<Vec<(String, i64)>, CompactError> {
    let Some(table) = crate::log::table_if_made(rtx, RETIRED)? else {
        return Ok(Vec::new());
    };
    let mut files = Vec::new();
    for entry in table.iter()? {
        let (name, at) = entry?;
        files.push((name.value().to_string(), at.value()));
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::{Array, AsArray, RecordBatch};
    use datafusion::arrow::datatypes::{UInt32Type, UInt64Type};

    use super::*;
    use crate::change::{IncomingCell, IncomingChange, LogicalMessage};
    use crate::log::{ChangeLog, LogOp};
    use crate::manifest::SegmentManifest;
    use crate::relation::Column;
    use crate::segment::{PgKind, render};

    fn rel() -> RelationVersion {
        let col = |name: &str, type_oid, type_modifier, is_key| Column {
            name: name.into(),
            type_oid,
            type_modifier,
            is_key,
        };
        RelationVersion {
            relation_id: 7,
            valid_from: ChangeKey::default(),
            schema: "public".into(),
            name: "Odd Name".into(),
            replica_identity: b'd',
            columns: vec![
                col("id", 23, -1, true),
                col("v", 25, -1, false),
                col("amount", 1700, (5 << 16 | 2) + 4, false),
            ],
            primary_key: vec!["id".into()],
        }
    }

    fn t(s: &str) -> IncomingCell {
        IncomingCell::Text(s.into())
    }

    /// Transaction `n` at commit LSN 100·n: an insert of row n and an update of it, plus a
    /// logical message in every third transaction.
    fn txn(n: u64) -> Vec<LogOp> {
        let id = n.to_string();
        let mut ops = vec![LogOp::Begin {
            final_lsn: Lsn(100 * n),
            xid: n as u32,
            committed_at_us: 1_000_000 * n as i64,
        }];
        if n == 1 {
            ops.push(LogOp::Relation(rel()));
        }
        ops.push(LogOp::Change(IncomingChange {
            relation_id: 7,
            op: Op::Insert,
            old: None,
            new: Some(vec![t(&id), t("a"), t("NaN")]),
        }));
        ops.push(LogOp::Change(IncomingChange {
            relation_id: 7,
            op: Op::Update,
            old: None,
            new: Some(vec![t(&id), IncomingCell::UnchangedToast, t("-12.50")]),
        }));
        if n.is_multiple_of(3) {
            ops.push(LogOp::Message(LogicalMessage {
                transactional: true,
                prefix: "oracle".into(),
                content: b"hash".to_vec(),
            }));
        }
        ops.push(LogOp::Commit {
            end_lsn: Lsn(100 * n + 8),
        });
        ops
    }

    fn read_all(dir: &Path, manifest: &SegmentManifest) -> Vec<(SegmentEntry, RecordBatch)> {
        let mut out = Vec::new();
        for s in &manifest.segments {
            let reader = SegmentReader::open(
                &dir.join(SEGMENTS_DIR).join(&s.file_name),
                Some(&s.sha256),
                1000,
            )
            .unwrap();
            for b in reader {
                out.push((s.clone(), b.unwrap()));
            }
        }
        out
    }

    fn keys(batches: &[(SegmentEntry, RecordBatch)]) -> Vec<(u64, u32)> {
        let mut keys: Vec<(u64, u32)> = batches
            .iter()
            .flat_map(|(_, b)| {
                let lsn = b.column(0).as_primitive::<UInt64Type>().clone();
                let seq = b.column(1).as_primitive::<UInt32Type>().clone();
                (0..b.num_rows()).map(move |i| (lsn.value(i), seq.value(i)))
            })
            .collect();
        keys.sort();
        keys
    }

    /// Schema versions stay in the log after compaction (their transactions' records do
    /// not): `versions_of` still lists them, without the commit time, and leaves out a
    /// version of a transaction not finished.
    #[test]
    fn versions_of_lists_versions_of_compacted_transactions() {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("a");
        let mut log = ChangeLog::open(&archive).unwrap();
        log.apply(txn(1)).unwrap();
        let mut open = txn(2);
        open.pop();
        open.insert(1, LogOp::Relation(rel()));
        log.apply(open).unwrap();
        let before = log.reader().unwrap().versions_of(7, Lsn(0)).unwrap();
        assert_eq!(
            before.len(),
            1,
            "the unfinished transaction's version is left out"
        );
        assert_eq!(before[0].1, Some(1_000_000));
        log.complete_all().unwrap();
        Compactor::new(log.shared(), &archive, CompactOptions::default())
            .run()
            .unwrap();
        let after = log.reader().unwrap().versions_of(7, Lsn(0)).unwrap();
        assert_eq!(after.len(), 1, "{after:?}");
        assert_eq!(after[0].0, before[0].0);
        assert_eq!(
            after[0].1, None,
            "the transaction's record was compacted away"
        );
    }

    #[test]
    fn compaction_moves_every_finished_change_into_segments_once_and_trims_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("a");
        let mut log = ChangeLog::open(&archive).unwrap();
        for n in 1..=6 {
            log.apply(txn(n)).unwrap();
        }
        // A transaction still streaming in: it must stay in the log.
        let mut open = txn(7);
        open.pop();
        log.apply(open).unwrap();
        let before: Vec<(u64, u32)> = log
            .reader()
            .unwrap()
            .changes()
            .unwrap()
            .map(|e| e.unwrap().0)
            .map(|k| (k.commit_lsn.0, k.seq))
            .collect();

        // Beside a capture compaction takes what its writer has completed (see
        // `compaction_takes_only_completed_records`).
        log.complete_all().unwrap();
        let compactor = Compactor::new(log.shared(), &archive, CompactOptions::default());
        let report = compactor.run().unwrap();
        assert_eq!(report.changes, 14, "12 row changes and 2 messages");
        assert_eq!(report.compacted_through, Lsn(600));

        let reader = log.reader().unwrap();
        let manifest = reader.manifest().unwrap();
        let left: Vec<(u64, u32)> = reader
            .changes()
            .unwrap()
            .map(|e| e.unwrap().0)
            .map(|k| (k.commit_lsn.0, k.seq))
            .collect();
        assert!(
            left.is_empty(),
            "every finished change left the log: {left:?}"
        );
        assert!(reader.transactions().unwrap().is_empty());
        drop(reader);
        // The unfinished transaction was not touched: finishing it shows both its changes.
        log.apply([LogOp::Commit { end_lsn: Lsn(708) }]).unwrap();
        let finished: Vec<(u64, u32)> = log
            .reader()
            .unwrap()
            .changes()
            .unwrap()
            .map(|e| e.unwrap().0)
            .map(|k| (k.commit_lsn.0, k.seq))
            .collect();
        assert_eq!(finished, vec![(700, 0), (700, 1)]);
        assert_eq!(manifest.compacted_changes, 14);
        assert_eq!(manifest.segments.len(), 2);
        let batches = read_all(&archive, &manifest);
        let mut all = keys(&batches);
        all.extend(left);
        all.sort();
        assert_eq!(
            all, before,
            "every change exactly once across segments and log"
        );

        let (entry, batch) = batches
            .iter()
            .find(|(s, _)| matches!(s.content, SegmentContent::Table(_)))
            .unwrap();
        assert!(
            entry.file_name.contains("public.%22Odd%20Name%22"),
            "{}",
            entry.file_name
        );
        assert_eq!(entry.min_key, ChangeKey::new(Lsn(100), 0));
        assert_eq!(entry.min_committed_at_us, 1_000_000);
        let after = batch.column_by_name("after").unwrap().as_struct();
        let amount = after.column_by_name("amount").unwrap();
        let kind = PgKind::of(1700, (5 << 16 | 2) + 4);
        // Row 0 is an insert whose numeric NaN does not fit Decimal(5,2): null plus exact text.
        assert!(amount.is_null(0));
        let text = batch.column_by_name("after_text").unwrap().as_map();
        assert_eq!(text.value(0).column(1).as_string::<i32>().value(0), "NaN");
        assert_eq!(render(&kind, amount.as_ref(), 1).as_deref(), Some("-12.50"));
        // Row 1 is the update: the unchanged TOAST value came from the index, not unknown.
        assert_eq!(
            render(
                &PgKind::Text,
                after.column_by_name("v").unwrap().as_ref(),
                1
            )
            .as_deref(),
            Some("a")
        );
        assert!(batch.column_by_name("after_unknown").unwrap().is_null(1));
        let changed = batch
            .column_by_name("changed")
            .unwrap()
            .as_list::<i32>()
            .value(1);
        assert_eq!(
            changed
                .as_string::<i32>()
                .iter()
                .flatten()
                .collect::<Vec<_>>(),
            vec!["amount"]
        );

        // The next run compacts transaction 7, now finished (and completed); a run after it
        // finds nothing.
        log.complete_all().unwrap();
        assert_eq!(compactor.run().unwrap().changes, 2);
        assert_eq!(compactor.run().unwrap().changes, 0);
        assert_eq!(log.reader().unwrap().manifest().unwrap().segments.len(), 3);
    }

    /// A log in a fresh archive, and compaction options that remove retired files at once.
    fn archive_retiring_at_once() -> (tempfile::TempDir, PathBuf, ChangeLog, CompactOptions) {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("a");
        let log = ChangeLog::open(&archive).unwrap();
        let options = CompactOptions {
            retire_grace: Duration::ZERO,
            ..CompactOptions::default()
        };
        (dir, archive, log, options)
    }

    /// A crash between a keyframe's file and the commit that lists it leaves a file no entry
    /// lists: the orphan removal deletes it (and a temporary file), keeps listed keyframes,
    /// and keeps an unlisted one's retired file until its grace period ends.
    #[test]
    fn keyframe_files_no_entry_lists_go_and_listed_or_retired_ones_stay() {
        use crate::keyframe::{NewKeyframe, keyframe_path, publish_keyframe, unlist_keyframes};
        let (_dir, archive, log, options) = archive_retiring_at_once();
        let shared = log.shared();
        let new = || NewKeyframe {
            version: rel(),
            at: Lsn(0),
            includes_until_us: 0,
            changes: 0,
            rows: RecordBatch::new_empty(crate::segment::segment_schema(&SegmentContent::Table(
                rel(),
            ))),
        };
        let listed = publish_keyframe(&shared, &archive, new()).unwrap();
        let unlisted = publish_keyframe(&shared, &archive, new()).unwrap();
        unlist_keyframes(&shared, &[unlisted.id]).unwrap();
        let beyond = NewKeyframe {
            at: Lsn(1),
            ..new()
        };
        assert!(
            publish_keyframe(&shared, &archive, beyond).is_err(),
            "a keyframe beyond the compacted changes is refused"
        );
        let dir = archive.join(KEYFRAMES_DIR);
        std::fs::write(
            dir.join("public.t-0000000000000000-1.parquet"),
            b"left by a crash",
        )
        .unwrap();
        std::fs::write(
            dir.join(".public.t-0000000000000000-2.parquet.tmp"),
            b"half",
        )
        .unwrap();
        let names = || -> Vec<String> {
            let mut names: Vec<String> = std::fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        };
        assert_eq!(names().len(), 4, "the refused keyframe left no file");
        let keeping = Compactor::new(shared.clone(), &archive, CompactOptions::default());
        keeping.remove_orphans().unwrap();
        let mut expected = vec![listed.file_name.clone(), unlisted.file_name.clone()];
        expected.sort();
        assert_eq!(
            names(),
            expected,
            "the listed and the retired keyframe stay"
        );
        Compactor::new(shared.clone(), &archive, options)
            .run()
            .unwrap();
        assert_eq!(
            names(),
            vec![listed.file_name.clone()],
            "the retired one goes after its grace"
        );
        assert!(keyframe_path(&archive, &listed).exists());
        assert_eq!(log.reader().unwrap().keyframes().unwrap(), vec![listed]);
    }

    #[test]
    fn key_indexes_name_every_row_of_a_key_and_are_written_again_when_lost() {
        use crate::segment::key_index::{KeyIndexProblem, KeyPart, key_hash, rows_with_key_hash};
        let (_dir, archive, mut log, options) = archive_retiring_at_once();
        let compactor = Compactor::new(log.shared(), &archive, options.clone());
        for n in 1..=5 {
            log.apply(txn(n)).unwrap();
            // As the capture does when idle: the index stored, the log open to compaction.
            log.complete_all().unwrap();
            compactor.run().unwrap();
        }
        let segments = archive.join(SEGMENTS_DIR);
        let manifest = log.reader().unwrap().manifest().unwrap();
        let table: Vec<&SegmentEntry> = manifest
            .segments
            .iter()
            .filter(|s| matches!(s.content, SegmentContent::Table(_)))
            .collect();
        // Merged and retired segments took their indexes with them: one per listed segment.
        let mut indexes: Vec<String> = std::fs::read_dir(&segments)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(KEY_INDEX_SUFFIX))
            .collect();
        indexes.sort();
        let mut expected: Vec<String> =
            table.iter().map(|s| key_index_name(&s.file_name)).collect();
        expected.sort();
        assert_eq!(indexes, expected);
        // Each key's rows, as a scan of the segment finds them, are the index's.
        let lookups = |seg: &SegmentEntry| -> Vec<(u64, Result<Vec<u32>, KeyIndexProblem>)> {
            (1..=6)
                .map(|id| {
                    let hash = key_hash(&[KeyPart::Int(id as i64)]);
                    (
                        id,
                        rows_with_key_hash(&segments.join(&seg.file_name), &seg.sha256, hash),
                    )
                })
                .collect()
        };
        let all = read_all(&archive, &manifest);
        for seg in &table {
            let mut scanned: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
            let mut row = 0u32;
            for (_, batch) in all.iter().filter(|(s, _)| s.id == seg.id) {
                let after = batch.column_by_name("after").unwrap().as_struct();
                let ids = after.column_by_name("id").unwrap();
                for i in 0..batch.num_rows() {
                    let id = render(&PgKind::Int4, ids.as_ref(), i).unwrap();
                    scanned.entry(id.parse().unwrap()).or_default().push(row);
                    row += 1;
                }
            }
            for (id, rows) in lookups(seg) {
                assert_eq!(
                    rows.unwrap(),
                    scanned.get(&id).cloned().unwrap_or_default(),
                    "rows of key {id} in {}",
                    seg.file_name
                );
            }
        }
        // A damaged, stale or missing index is refused, never believed; the next run writes it.
        let seg = table[0];
        let index = segments.join(key_index_name(&seg.file_name));
        let good = std::fs::read(&index).unwrap();
        let mut damaged = good.clone();
        damaged[92] ^= 1;
        std::fs::write(&index, &damaged).unwrap();
        let found = rows_with_key_hash(
            &segments.join(&seg.file_name),
            &seg.sha256,
            u32::from_le_bytes(good[88..92].try_into().unwrap()),
        );
        assert!(
            matches!(&found, Err(KeyIndexProblem::Invalid { reason, .. }) if reason.contains("digest")),
            "{found:?}"
        );
        std::fs::write(&index, &good[..good.len() - 1]).unwrap();
        assert!(matches!(
            lookups(seg)[0].1,
            Err(KeyIndexProblem::Invalid { .. })
        ));
        std::fs::write(&index, &good).unwrap();
        let other = "0".repeat(64);
        assert!(matches!(
            rows_with_key_hash(&segments.join(&seg.file_name), &other, 1),
            Err(KeyIndexProblem::Invalid { reason, .. }) if reason.contains("another version")
        ));
        std::fs::write(&index, &damaged).unwrap();
        // A compactor checks each index whole once (this one did); a new one (`pgtrail
        // compact`, a capture's restart) finds the damage.
        assert_eq!(compactor.run().unwrap().key_indexes_written, 0);
        let compactor = Compactor::new(log.shared(), &archive, options.clone());
        assert_eq!(compactor.run().unwrap().key_indexes_written, 1);
        assert_eq!(
            std::fs::read(&index).unwrap(),
            good,
            "written again the same"
        );
        std::fs::remove_file(&index).unwrap();
        assert!(matches!(
            lookups(seg)[0].1,
            Err(KeyIndexProblem::Missing { .. })
        ));
        let compactor = Compactor::new(log.shared(), &archive, options);
        // An index of no listed segment is an orphan.
        let stray = segments.join(key_index_name("00000099_public.x.parquet"));
        std::fs::write(&stray, b"x").unwrap();
        let report = compactor.run().unwrap();
        assert_eq!(report.key_indexes_written, 1);
        assert!(lookups(seg).into_iter().all(|(_, r)| r.is_ok()));
        assert!(!stray.exists(), "an index without its segment is removed");
        assert_eq!(report.orphans_removed, 1);
    }

    /// Row `i` of a segment's key-ordered copy is the segment row of its key index's entry `i`
    /// (so one key's changes are side by side), the index names the copy's SHA-256, and the
    /// copy's bytes do not depend on how many passes its memory budget takes.
    #[test]
    fn key_ordered_copies_put_each_key_s_rows_side_by_side() {
        use crate::segment::key_copy::{MIN_PASS_ROWS, write_key_copy};
        use datafusion::arrow::array::UInt32Array;
        use datafusion::arrow::compute::{concat_batches, take_record_batch};
        let (_dir, archive, mut log, options) = archive_retiring_at_once();
        let compactor = Compactor::new(log.shared(), &archive, options);
        for n in 1..=150 {
            log.apply(txn(n)).unwrap();
        }
        log.complete_all().unwrap();
        let report = compactor.run().unwrap();
        assert_eq!(report.key_copies_written, 1);
        let segments = archive.join(SEGMENTS_DIR);
        let manifest = log.reader().unwrap().manifest().unwrap();
        let seg = manifest
            .segments
            .iter()
            .find(|s| matches!(s.content, SegmentContent::Table(_)))
            .unwrap();
        let path = segments.join(&seg.file_name);
        let copy_sha = key_index::check(&path, &seg.sha256)
            .unwrap()
            .expect("the index names its copy");
        let copy_path = segments.join(key_copy_name(&seg.file_name));
        assert_eq!(sha256_file(&copy_path).unwrap(), copy_sha);
        let entries = key_index::entries(&path, &seg.sha256).unwrap();
        assert_eq!(entries.len(), 300, "one entry per change (no key changed)");
        let whole = |path: &Path, sha: &str| {
            let reader = SegmentReader::open(path, Some(sha), 1000).unwrap();
            let schema = reader.schema().clone();
            let batches: Vec<RecordBatch> = reader.map(|b| b.unwrap()).collect();
            concat_batches(&schema, &batches).unwrap()
        };
        let in_segment = whole(&path, &seg.sha256);
        let in_copy = whole(&copy_path, &copy_sha);
        let order = UInt32Array::from_iter_values(entries.iter().map(|&(_, row)| row));
        // (The schemas differ in their metadata only: the copy says it is one.)
        let expected = take_record_batch(&in_segment, &order).unwrap();
        assert_eq!(in_copy.columns(), expected.columns());
        assert_ne!(
            in_copy.columns(),
            in_segment.columns(),
            "the copy is in another order"
        );
        // 300 entries in one pass, in passes of about 100 (a budget of 100 rows as a pass
        // counts them), in one per 64 (the least a pass takes).
        let row = crate::segment::key_copy::pass_bytes_per_row(&path, 1).unwrap();
        for budget in [usize::MAX, row * 100, 1] {
            let again = write_key_copy(&segments, &seg.file_name, &seg.sha256, &entries, 3, budget)
                .unwrap();
            assert_eq!(again.sha256, copy_sha, "budget {budget}");
            assert_eq!(
                again.passes.iter().map(|p| p.entries).sum::<usize>(),
                entries.len(),
                "the passes cover the entries once (budget {budget})"
            );
            // A pass after the first is sized by the most a row took in the passes before
            // it (measured), unless that leaves less than the least a pass takes.
            let mut measured = 0;
            for (i, pass) in again.passes.iter().enumerate() {
                if i > 0 && pass.entries > MIN_PASS_ROWS {
                    assert!(
                        pass.entries * measured <= budget,
                        "pass {i} of budget {budget}: {} entries at {measured} bytes",
                        pass.entries
                    );
                }
                measured = measured.max(pass.decoded_bytes / pass.rows.max(1));
            }
            if budget == row * 100 {
                // The case the rule is for: rows read through a selection take more than the
                // estimate (here about 190 bytes against 145), so the second pass is smaller.
                assert!(
                    again.passes[1].entries < again.passes[0].entries,
                    "{:?}",
                    again.passes
                );
            }
        }
        // A copy removed is written again by the next compactor; an orphan copy is removed.
        std::fs::remove_file(&copy_path).unwrap();
        let stray = segments.join(key_copy_name("00000099_public.x.parquet"));
        std::fs::write(&stray, b"x").unwrap();
        let compactor = Compactor::new(log.shared(), &archive, CompactOptions::default());
        let report = compactor.run().unwrap();
        assert_eq!(
            (report.key_copies_written, report.key_indexes_written),
            (1, 0)
        );
        assert_eq!(sha256_file(&copy_path).unwrap(), copy_sha);
        assert!(!stray.exists());
    }

    /// A key-ordered copy's passes are sized by what a row takes decoded, not by Parquet's
    /// bytes, which undercount the rows of one large transaction (their LSN, transaction and
    /// time are runs of one value): the copy of a 10M-row transaction's segment, sized by
    /// Parquet's bytes, held 1.3 GB in passes meant for 256 MiB.
    #[test]
    fn a_key_copy_pass_counts_a_row_as_it_is_decoded() {
        use crate::segment::key_copy::pass_bytes_per_row;
        use datafusion::parquet::file::reader::{FileReader, SerializedFileReader};
        let (_dir, archive, mut log, options) = archive_retiring_at_once();
        let compactor = Compactor::new(log.shared(), &archive, options);
        let mut ops = vec![
            LogOp::Begin {
                final_lsn: Lsn(100),
                xid: 1,
                committed_at_us: 1_000_000,
            },
            LogOp::Relation(rel()),
        ];
        ops.extend((1..=30_000).map(|id: u32| {
            LogOp::Change(IncomingChange {
                relation_id: 7,
                op: Op::Insert,
                old: None,
                new: Some(vec![t(&id.to_string()), t("payload"), t("1.00")]),
            })
        }));
        ops.push(LogOp::Commit { end_lsn: Lsn(108) });
        log.apply(ops).unwrap();
        log.complete_all().unwrap();
        compactor.run().unwrap();
        let manifest = log.reader().unwrap().manifest().unwrap();
        let seg = &manifest.segments[0];
        let path = archive.join(SEGMENTS_DIR).join(&seg.file_name);
        let parquet_bytes = {
            let file = SerializedFileReader::new(std::fs::File::open(&path).unwrap()).unwrap();
            let meta = file.metadata();
            let raw: i64 = meta.row_groups().iter().map(|g| g.total_byte_size()).sum();
            raw as usize / meta.file_metadata().num_rows() as usize
        };
        let (mut decoded, mut rows) = (0, 0);
        for batch in SegmentReader::open(&path, Some(&seg.sha256), 8192).unwrap() {
            let batch = batch.unwrap();
            decoded += batch.get_array_memory_size();
            rows += batch.num_rows();
        }
        assert_eq!(rows, 30_000);
        let decoded = decoded / rows;
        assert!(
            parquet_bytes * 2 < decoded,
            "the case this is about: Parquet's bytes ({parquet_bytes} a row, twice as the \
             estimate was) undercount the decoded row ({decoded})"
        );
        let estimate = pass_bytes_per_row(&path, parquet_bytes).unwrap();
        assert!(
            estimate * 10 >= decoded * 9,
            "a pass's estimate of a row ({estimate}) is what it takes decoded ({decoded})"
        );
    }

    /// Compaction beside a capture takes only records the writer has completed: the rest
    /// stay in the log, shown completed to readers, after a crash too; a compaction by a
    /// command that holds the log ([`Compactor::for_log`]) completes them first.
    #[test]
    fn compaction_takes_only_completed_records() {
        let (_dir, archive, mut log, options) = archive_retiring_at_once();
        let compactor = Compactor::new(log.shared(), &archive, options);
        log.apply(txn(1)).unwrap();
        log.complete_all().unwrap();
        log.apply(txn(2)).unwrap();
        assert!(log.completion_behind().is_some());
        assert_eq!(compactor.run().unwrap().changes, 2, "transaction 1 only");
        let in_log = |log: &ChangeLog| {
            let reader = log.reader().unwrap();
            reader
                .changes()
                .unwrap()
                .map(|e| e.unwrap().0.commit_lsn)
                .collect::<Vec<_>>()
        };
        assert_eq!(in_log(&log), vec![Lsn(200), Lsn(200)]);
        drop(compactor);
        // A crash: nothing of the writer's memory is needed.
        drop(log);
        let mut log = ChangeLog::open(&archive).unwrap();
        log.apply([
            LogOp::Begin {
                final_lsn: Lsn(300),
                xid: 3,
                committed_at_us: 0,
            },
            LogOp::Change(IncomingChange {
                relation_id: 7,
                op: Op::Update,
                old: None,
                new: Some(vec![t("2"), t("b"), IncomingCell::UnchangedToast]),
            }),
            LogOp::Commit { end_lsn: Lsn(308) },
        ])
        .unwrap();
        // Row 2's latest version is transaction 2's, itself not completed in the log yet.
        let expected_before = vec![
            crate::change::Cell::Text("2".into()),
            crate::change::Cell::Text("a".into()),
            crate::change::Cell::Text("-12.50".into()),
        ];
        let last_before = |log: &ChangeLog| {
            let reader = log.reader().unwrap();
            let last = reader.changes().unwrap().last().unwrap().unwrap();
            (last.0, last.1.before.unwrap())
        };
        assert_eq!(
            last_before(&log),
            (ChangeKey::new(Lsn(300), 0), expected_before.clone())
        );
        assert_eq!(
            log.reader().unwrap().completed_through().unwrap(),
            ChangeKey::new(Lsn(100), u32::MAX)
        );
        // `pgtrail status` counts them (transactions 2 and 3), from another process.
        drop(log);
        let status = crate::status::ArchiveStatus::collect(&archive).unwrap();
        assert_eq!((status.log.changes, status.log.not_completed), (3, 3));
        let log = ChangeLog::open(&archive).unwrap();
        let beside_capture = Compactor::new(log.shared(), &archive, CompactOptions::default());
        assert_eq!(
            beside_capture.run().unwrap().changes,
            0,
            "nothing more is complete"
        );
        let holding = Compactor::for_log(&log, CompactOptions::default());
        assert_eq!(holding.run().unwrap().changes, 3, "completed first");
        let reader = log.reader().unwrap();
        let compacted = reader.all_changes(&archive).unwrap();
        let (key, record) = compacted.last().unwrap();
        assert_eq!(
            (*key, record.before.clone().unwrap()),
            (ChangeKey::new(Lsn(300), 0), expected_before)
        );
        assert_eq!(compacted.len(), 5);
    }

    #[test]
    fn small_segments_merge_and_orphans_are_removed() {
        let (_dir, archive, mut log, options) = archive_retiring_at_once();
        let compactor = Compactor::new(log.shared(), &archive, options);
        let mut expected = Vec::new();
        for n in 1..=5 {
            log.apply(txn(n)).unwrap();
            log.complete_all().unwrap();
            expected.extend(
                log.reader()
                    .unwrap()
                    .changes()
                    .unwrap()
                    .map(|e| e.unwrap().0)
                    .map(|k| (k.commit_lsn.0, k.seq)),
            );
            compactor.run().unwrap();
        }
        expected.sort();
        let manifest = log.reader().unwrap().manifest().unwrap();
        let tables: Vec<&SegmentEntry> = manifest
            .segments
            .iter()
            .filter(|s| matches!(s.content, SegmentContent::Table(_)))
            .collect();
        assert_eq!(
            tables.len(),
            2,
            "four single-transaction segments merged into one, plus the fifth"
        );
        assert_eq!(tables.iter().map(|s| s.rows).sum::<u64>(), 10);
        assert_eq!(keys(&read_all(&archive, &manifest)), expected);

        // Files no manifest lists are removed; listed ones stay.
        let seg_dir = archive.join(SEGMENTS_DIR);
        std::fs::write(
            seg_dir.join("00000099_public.x_0.0-0.0.parquet"),
            b"half a file",
        )
        .unwrap();
        std::fs::write(seg_dir.join(".00000100_public.x.tmp"), b"").unwrap();
        let report = compactor.run().unwrap();
        assert_eq!(report.orphans_removed, 2);
        let mut on_disk: Vec<String> = std::fs::read_dir(&seg_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        on_disk.sort();
        // Each listed table segment with its key index and key-ordered copy; retired inputs
        // took theirs along.
        let mut listed: Vec<String> = manifest
            .segments
            .iter()
            .flat_map(|s| match s.content {
                SegmentContent::Table(_) => vec![
                    s.file_name.clone(),
                    key_index_name(&s.file_name),
                    key_copy_name(&s.file_name),
                ],
                SegmentContent::Messages => vec![s.file_name.clone()],
            })
            .collect();
        listed.sort();
        assert_eq!(
            on_disk, listed,
            "retired inputs are gone after the (zero) grace period"
        );
    }

    #[test]
    fn row_groups_outside_the_asked_range_are_skipped_unread() {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("a");
        let mut log = ChangeLog::open(&archive).unwrap();
        for n in 1..=6 {
            log.apply(txn(n)).unwrap();
            log.complete_all().unwrap();
        }
        let segment = SegmentOptions {
            row_group_rows: 2,
            batch_rows: 2,
            ..SegmentOptions::default()
        };
        Compactor::new(
            log.shared(),
            &archive,
            CompactOptions {
                segment,
                ..CompactOptions::default()
            },
        )
        .run()
        .unwrap();
        let s = log
            .reader()
            .unwrap()
            .manifest()
            .unwrap()
            .segments
            .into_iter()
            .find(|s| s.rows == 12)
            .unwrap();
        let path = archive.join(SEGMENTS_DIR).join(&s.file_name);
        let read = |lsn: (u64, u64), time: (i64, i64)| -> Vec<(u64, u32)> {
            let batches: Vec<RecordBatch> =
                SegmentReader::open_pruned(&path, Some(&s.sha256), 100, lsn, time)
                    .unwrap()
                    .map(|b| b.unwrap())
                    .collect();
            keys(
                &batches
                    .into_iter()
                    .map(|b| (s.clone(), b))
                    .collect::<Vec<_>>(),
            )
        };
        // Two rows per transaction and two per row group: exactly transaction 3's group.
        assert_eq!(
            read((300, 300), (i64::MIN, i64::MAX)),
            vec![(300, 0), (300, 1)]
        );
        assert_eq!(
            read((0, u64::MAX), (4_000_000, 5_000_000)),
            vec![(400, 0), (400, 1), (500, 0), (500, 1)]
        );
        assert_eq!(read((0, u64::MAX), (i64::MIN, i64::MAX)).len(), 12);
    }

    #[test]
    fn a_damaged_segment_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("a");
        let mut log = ChangeLog::open(&archive).unwrap();
        log.apply(txn(1)).unwrap();
        log.complete_all().unwrap();
        Compactor::new(log.shared(), &archive, CompactOptions::default())
            .run()
            .unwrap();
        let s = log.reader().unwrap().manifest().unwrap().segments.remove(0);
        let path = archive.join(SEGMENTS_DIR).join(&s.file_name);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[10] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        let err = SegmentReader::open(&path, Some(&s.sha256), 10)
            .err()
            .unwrap();
        assert!(matches!(err, crate::SegmentError::Checksum { .. }), "{err}");
    }
}
