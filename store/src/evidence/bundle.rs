//! `pgtrail bundle` and `pgtrail verify --bundle`: the changes of some tables over an LSN range,
//! with what proves them complete for that scope and unaltered, checkable without the archive.
//!
//! A bundle holds a contiguous range of the tree's leaves, from the change just before the
//! scope to the change just after it (or the tree's start or end). Each leaf of the range is
//! either *in scope* (its row, copied into the bundle's Parquet files in the segment format,
//! with the change's four salts, so its leaf is recomputed from the value) or given as its
//! `leaf_data` (a change of another table, a message, an event). A range proof ties the range
//! to the root a signed checkpoint pins. The verifier then knows:
//! - every leaf of the range, so no change of a table in scope inside the LSN range can be
//!   left out (it would be a leaf of the range, and a leaf given only as `leaf_data` names
//!   its table and LSN in the clear: a withheld change is seen);
//! - the range's first change is before the scope and its last after it (or the range reaches
//!   the tree's start or end), and leaves are in key order, so no change of the scope is
//!   outside the range;
//! - the rows in the bundle are the changes the signer attested, value for value.
//!
//! It reveals of other tables' changes in the range their table, key, transaction, commit
//! time, operation and salted digests, never their values; the epoch seeds never leave the
//! archive (each in-scope change carries its own salts only).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use datafusion::arrow::array::{BooleanArray, RecordBatch};
use datafusion::arrow::compute::filter_record_batch;
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use datafusion::parquet::basic::{Compression, ZstdLevel};
use datafusion::parquet::file::metadata::KeyValue;
use datafusion::parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};

use super::leaf::{
    KIND_CHANGE, KIND_GAP, KIND_MESSAGE, LEAF_DOMAIN, LeafInputs, Salts, for_each_leaf,
};
use super::merkle::{Hash, leaf_hash, range_proof_in, root_from_range};
use super::note::{Checkpoint, VerifierKey};
use super::verify::{VerifyOptions, open_checkpoint, verify_and_collect};
use crate::error::{LogError, SegmentError};
use crate::lsn::{ChangeKey, Lsn};
use crate::segment::{SEGMENT_METADATA_KEY, SegmentReader, hex, sha256_file};

/// The `format` of a bundle's `bundle.json`.
pub const BUNDLE_FORMAT: &str = "pgtrail-bundle/v1";
const DESCRIPTION_FILE: &str = "bundle.json";
const LEAVES_FILE: &str = "leaves.jsonl";
const CHECKPOINT_FILE: &str = "checkpoint";

/// Which changes a bundle is for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scope {
    /// Tables as `schema.table` (the name the table bore at each change); empty: every table
    /// and the messages.
    pub tables: Vec<String>,
    /// Commit LSNs from and through (inclusive); `None`: from the tree's start, through its
    /// end.
    #[serde(with = "lsn_text::optional")]
    pub from: Option<Lsn>,
    #[serde(with = "lsn_text::optional")]
    pub to: Option<Lsn>,
}

impl Scope {
    fn in_range(&self, lsn: Lsn) -> bool {
        self.from.is_none_or(|f| lsn >= f) && self.to.is_none_or(|t| lsn <= t)
    }

    /// Whether a change of `table` (the name it bore at the change) is in the scope.
    pub fn takes_change(&self, key: ChangeKey, table: &str) -> bool {
        self.takes(KIND_CHANGE, key, Some(table))
    }

    /// Whether a logical message is in the scope (one over every table takes the messages).
    pub fn takes_message(&self, key: ChangeKey) -> bool {
        self.takes(KIND_MESSAGE, key, None)
    }

    /// Whether a leaf (kind, key, table) is one the bundle must hold in full.
    fn takes(&self, kind: u8, key: ChangeKey, table: Option<&str>) -> bool {
        if !self.in_range(key.commit_lsn) {
            return false;
        }
        match kind {
            KIND_CHANGE => {
                self.tables.is_empty() || table.is_some_and(|t| self.tables.iter().any(|s| s == t))
            }
            KIND_MESSAGE => self.tables.is_empty(),
            _ => false,
        }
    }
}

/// `bundle.json`.
#[derive(Debug, Serialize, Deserialize)]
struct Description {
    format: String,
    scope: Scope,
    /// The tree size the checkpoint attests, and the range of its leaves the bundle holds.
    tree_size: u64,
    first: u64,
    count: u64,
    /// Base64 hashes (see `merkle::range_proof`).
    range_proof: Vec<String>,
    files: Vec<BundleFile>,
    pgtrail: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct BundleFile {
    file: String,
    sha256: String,
    rows: u64,
}

/// One line of `leaves.jsonl`: a leaf of the range, in tree order.
#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
enum Entry {
    /// In scope: the row (of `files[file]`) and its salts (hex, 64 bytes).
    Row {
        file: usize,
        row: u64,
        #[serde(with = "lsn_text")]
        lsn: Lsn,
        seq: u32,
        salts: String,
        /// Parts redacted (`pgtrail redact`): part number (as text: JSON keys are strings) →
        /// its digest, hex.
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        erased: BTreeMap<String, String>,
    },
    /// Anything else: its `leaf_data`, base64.
    Leaf { leaf_data: String },
}

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Segment(#[from] SegmentError),
    #[error("the archive does not verify ({0}); run `pgtrail verify` and bundle nothing from it")]
    Unverified(String),
    #[error(
        "the archive has no signed checkpoint: sign one with `pgtrail checkpoint --signing-key FILE`, then bundle"
    )]
    NoCheckpoint,
    #[error("the archive's checkpoint does not match its tree ({0}); run `pgtrail verify`")]
    Checkpoint(String),
    #[error("{0} (a pgtrail bug: please report it)")]
    Bug(String),
    #[error("{0}")]
    Key(String),
    #[error(transparent)]
    Sign(#[from] super::note::NoteError),
    #[error("no change of the tree the checkpoint attests is in the scope: nothing to bundle")]
    Empty,
    #[error("{path} exists: give --out a directory that does not exist yet")]
    OutExists { path: PathBuf },
    #[error("cannot read {path}: is it a bundle `pgtrail bundle` wrote?")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the bundle at {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("change {key}: {why}")]
    Leaf { key: ChangeKey, why: String },
}

/// What `bundle` wrote.
#[derive(Debug, Clone, Serialize)]
pub struct Bundled {
    pub changes: u64,
    pub files: usize,
    pub tree_size: u64,
    pub first: u64,
    pub count: u64,
}

/// Write the bundle of `scope` from the archive in `dir` to `out` (which must not exist),
/// against the archive's latest signed checkpoint. The archive is verified first.
pub fn bundle(dir: &Path, scope: &Scope, out: &Path) -> Result<Bundled, BundleError> {
    let note = std::fs::read_to_string(dir.join(super::state::EVIDENCE_DIR).join(CHECKPOINT_FILE))
        .map_err(|_| BundleError::NoCheckpoint)?;
    bundle_against(dir, scope, out, &note)
}

/// [`bundle`] against the checkpoint `note` (one the archive signed), not the latest.
pub fn bundle_against(
    dir: &Path,
    scope: &Scope,
    out: &Path,
    note: &str,
) -> Result<Bundled, BundleError> {
    let note = note.to_string();
    if out.exists() {
        return Err(BundleError::OutExists {
            path: out.to_path_buf(),
        });
    }
    let checkpoint = Checkpoint::in_note_unverified(&note)
        .map_err(|e| BundleError::Checkpoint(e.to_string()))?;
    let collected = verify_and_collect(dir, &VerifyOptions::default(), |_, _| {})?;
    if let Some(p) = collected.report.problems.first() {
        return Err(BundleError::Unverified(format!("{}: {}", p.place, p.what)));
    }
    let size = checkpoint.size;
    if size == 0 || size > collected.tree.len() {
        return Err(BundleError::Checkpoint(format!(
            "it attests {size} leaves, the tree holds {}",
            collected.tree.len()
        )));
    }
    if collected.tree.root(size)? != checkpoint.root {
        return Err(BundleError::Checkpoint("its root differs".into()));
    }
    // The change leaves the checkpoint attests are the first `attested` changes, in key (=
    // tree) order.
    let changes = &collected.changes;
    let attested = changes.partition_point(|p| p.index < size)?;
    let start = changes
        .partition_point(|p| scope.from.is_some_and(|f| p.leaf.key.commit_lsn < f))?
        .min(attested);
    let end = changes
        .partition_point(|p| scope.to.is_none_or(|t| p.leaf.key.commit_lsn <= t))?
        .min(attested);
    if start >= end {
        return Err(BundleError::Empty);
    }
    // From the change before the scope (or the tree's start) to the change after it (or
    // the tree's end): both boundaries are leaves of the range, seen by the verifier.
    let first = if start == 0 {
        0
    } else {
        changes.get(start - 1)?.index
    };
    let last = if end == attested {
        size - 1
    } else {
        changes.get(end)?.index
    };
    let count = last - first + 1;

    // The changes among the range's leaves (held in memory: the range is the bundle's).
    let lo = changes.partition_point(|p| p.index < first)?;
    let hi = changes.partition_point(|p| p.index <= last)?;
    let mut range = Vec::with_capacity((hi - lo) as usize);
    changes.for_each(lo, hi, |p| {
        range.push(p);
        Ok(())
    })?;
    // What each leaf of the range is: a change (its place in `range`) or an event.
    let mut entries: BTreeMap<u64, Entry> = BTreeMap::new();
    let mut events_before = first - lo;
    let mut next_change = 0;
    for tree_index in first..=last {
        if range
            .get(next_change)
            .is_some_and(|p| p.index == tree_index)
        {
            next_change += 1;
            continue;
        }
        let e = &collected.events[events_before as usize];
        events_before += 1;
        let data = super::leaf::event_leaf_data(e.kind, e.epoch, e.n, &e.payload);
        entries.insert(
            tree_index,
            Entry::Leaf {
                leaf_data: BASE64.encode(data),
            },
        );
    }
    // The changes, read from their segments: in scope as rows, the others as leaf data.
    let tmp = out.with_file_name(format!(
        ".{}.tmp-{}",
        out.file_name().and_then(|n| n.to_str()).unwrap_or("bundle"),
        std::process::id()
    ));
    let write_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| BundleError::Write { path, source }
    };
    let _ = std::fs::remove_dir_all(&tmp);
    crate::atomic_file::create_private_dir(&tmp)?;
    crate::atomic_file::create_private_dir(&tmp.join("changes"))?;
    let in_range: HashMap<ChangeKey, u64> = range.iter().map(|p| (p.leaf.key, p.index)).collect();
    let by_segment: BTreeSet<u32> = range.iter().map(|p| p.segment).collect();
    let mut files: Vec<BundleFile> = Vec::new();
    let mut changes = 0u64;
    for &segment in &by_segment {
        let entry = &collected.segments[segment as usize];
        let path = dir.join(crate::SEGMENTS_DIR).join(&entry.file_name);
        let description = segment_description(&path)?;
        let reader = SegmentReader::open(&path, Some(&entry.sha256), 8192)?;
        let content = reader.content().clone();
        let schema = reader.schema().clone();
        let file_no = files.len();
        let name = format!("changes/{:08}.parquet", file_no + 1);
        let file_path = tmp.join(&name);
        let mut writer: Option<ArrowWriter<File>> = None;
        let mut rows_written = 0u64;
        for batch in reader {
            let batch = batch?;
            let mut keep = vec![false; batch.num_rows()];
            // Rows are visited in order: the next kept row's place in the bundle's file.
            let mut next_row = rows_written;
            let mut failed = None;
            let epochs = &collected.epochs;
            let erased = &collected.erased;
            let inputs_of = |key: ChangeKey| {
                in_range
                    .contains_key(&key)
                    .then(|| {
                        epochs.salts_for(key).map(|salts| LeafInputs {
                            salts,
                            erased: erased.get(&key).copied().unwrap_or([None; 4]),
                        })
                    })
                    .flatten()
            };
            let table = content.scope_name();
            for_each_leaf(&content, &batch, inputs_of, |key, row, data, _| {
                let tree_index = in_range[&key];
                let kind = if table.is_some() {
                    KIND_CHANGE
                } else {
                    KIND_MESSAGE
                };
                if scope.takes(kind, key, table.as_deref()) {
                    let Some(salts) = epochs.salts_for(key) else {
                        failed = Some((key, "no epoch".to_string()));
                        return;
                    };
                    keep[row] = true;
                    next_row += 1;
                    let row = next_row - 1;
                    entries.insert(
                        tree_index,
                        Entry::Row {
                            file: file_no,
                            row,
                            lsn: key.commit_lsn,
                            seq: key.seq,
                            salts: hex(salts.as_flattened()),
                            erased: erased
                                .get(&key)
                                .map(|parts| {
                                    parts
                                        .iter()
                                        .enumerate()
                                        .filter_map(|(k, d)| d.map(|d| (k.to_string(), hex(&d))))
                                        .collect()
                                })
                                .unwrap_or_default(),
                        },
                    );
                } else {
                    entries.insert(
                        tree_index,
                        Entry::Leaf {
                            leaf_data: BASE64.encode(data),
                        },
                    );
                }
            })
            .map_err(|e| BundleError::Leaf {
                key: e.key,
                why: e.reason,
            })?;
            if let Some((key, why)) = failed {
                return Err(BundleError::Leaf { key, why });
            }
            let kept = keep.iter().filter(|k| **k).count();
            if kept == 0 {
                continue;
            }
            let filtered = filter_record_batch(&batch, &BooleanArray::from(keep))
                .map_err(SegmentError::Arrow)?;
            if writer.is_none() {
                writer = Some(new_writer(&file_path, schema.clone(), &description)?);
            }
            write_batch(writer.as_mut().expect("set above"), &filtered, &file_path)?;
            rows_written += kept as u64;
        }
        if let Some(writer) = writer {
            let file = writer
                .into_inner()
                .map_err(|source| SegmentError::Parquet {
                    path: file_path.clone(),
                    source,
                })?;
            file.sync_all().map_err(write_err(&file_path))?;
            files.push(BundleFile {
                file: name,
                sha256: sha256_file(&file_path)?,
                rows: rows_written,
            });
            changes += rows_written;
        }
    }
    if entries.len() as u64 != count {
        return Err(BundleError::Bug(format!(
            "{} of the range's {count} leaves were found in the segments",
            entries.len()
        )));
    }
    let proof = range_proof_in(&collected.tree, size, first, count)?
        .ok_or_else(|| BundleError::Bug("no range proof for a range inside the tree".into()))?;
    let description = Description {
        format: BUNDLE_FORMAT.into(),
        scope: scope.clone(),
        tree_size: size,
        first,
        count,
        range_proof: proof.iter().map(|h| BASE64.encode(h)).collect(),
        files,
        pgtrail: env!("CARGO_PKG_VERSION").into(),
    };
    let mut lines = String::new();
    for entry in entries.values() {
        lines.push_str(&serde_json::to_string(entry).expect("plain data"));
        lines.push('\n');
    }
    let json = serde_json::to_string_pretty(&description).expect("plain data");
    for (name, bytes) in [
        (DESCRIPTION_FILE, json.as_bytes()),
        (LEAVES_FILE, lines.as_bytes()),
        (CHECKPOINT_FILE, note.as_bytes()),
        ("README.md", auditor_readme(scope, &checkpoint).as_bytes()),
    ] {
        crate::atomic_file::write_atomically(&tmp.join(name), bytes)?;
    }
    // A bundle appears whole or not at all: it is built beside `out` and renamed.
    std::fs::rename(&tmp, out).map_err(write_err(out))?;
    if let Some(parent) = out.parent() {
        let _ = crate::atomic_file::fsync_dir(parent);
    }
    // Checked before it is handed over, as `prove` does with a proof.
    let report = verify_bundle(out, &[])?;
    if let Some(p) = report.problems.first() {
        return Err(BundleError::Bug(format!(
            "the bundle written does not verify ({}: {})",
            p.place, p.what
        )));
    }
    Ok(Bundled {
        changes,
        files: description.files.len(),
        tree_size: size,
        first,
        count,
    })
}

/// A segment's `pgtrail.segment` metadata, as written (the bundle's files carry it as is).
fn segment_description(path: &Path) -> Result<String, SegmentError> {
    let file = File::open(path).map_err(|source| SegmentError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let builder =
        ParquetRecordBatchReaderBuilder::try_new(file).map_err(|source| SegmentError::Parquet {
            path: path.to_path_buf(),
            source,
        })?;
    builder
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .and_then(|kv| kv.iter().find(|kv| kv.key == SEGMENT_METADATA_KEY))
        .and_then(|kv| kv.value.clone())
        .ok_or_else(|| SegmentError::Corrupt {
            path: path.to_path_buf(),
            reason: format!("no {SEGMENT_METADATA_KEY} metadata"),
        })
}

fn new_writer(
    path: &Path,
    schema: datafusion::arrow::datatypes::SchemaRef,
    description: &str,
) -> Result<ArrowWriter<File>, SegmentError> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| SegmentError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .set_key_value_metadata(Some(vec![KeyValue::new(
            SEGMENT_METADATA_KEY.to_string(),
            description.to_string(),
        )]))
        .build();
    ArrowWriter::try_new(file, Arc::clone(&schema), Some(props)).map_err(|source| {
        SegmentError::Parquet {
            path: path.to_path_buf(),
            source,
        }
    })
}

fn write_batch(
    writer: &mut ArrowWriter<File>,
    batch: &RecordBatch,
    path: &Path,
) -> Result<(), SegmentError> {
    writer.write(batch).map_err(|source| SegmentError::Parquet {
        path: path.to_path_buf(),
        source,
    })
}

/// The bundle's README for the auditor.
fn auditor_readme(scope: &Scope, checkpoint: &Checkpoint) -> String {
    format!(
        "# pgtrail audit bundle\n\n\
         Scope: {tables}, commit LSNs {from} through {to}.\n\
         Attested by the checkpoint in `checkpoint` (origin `{origin}`, tree size {size}).\n\n\
         - `changes/*.parquet`: the changes in scope, in pgtrail's segment format (columns\n\
           `lsn`, `seq`, `xid`, `committed_at`, `op`, `context`, `before`, `after`, ...).\n\
         - `leaves.jsonl`: every leaf of the tree's range that holds the scope, in order: a row\n\
           of `changes/` with its salts, or the leaf's bytes (`leaf_data`) for anything else.\n\
         - `bundle.json`: the scope, the range and the proof that ties it to the checkpoint.\n\n\
         Check it with the archive owner's verifier key (never one taken from this bundle):\n\n\
         ```sh\n\
         pgtrail verify --bundle THIS_DIRECTORY --key 'VERIFIER_KEY'\n\
         ```\n\n\
         Without pgtrail: the format is described in pgtrail's README (Evidence, Auditor\n\
         bundles): recompute each leaf, the root of the range with its proof, and check the\n\
         checkpoint's Ed25519 signature (a C2SP signed note).\n",
        tables = if scope.tables.is_empty() {
            "every table and message".to_string()
        } else {
            scope.tables.join(", ")
        },
        from = scope
            .from
            .map_or("from the archive's start".into(), |l| l.to_string()),
        to = scope
            .to
            .map_or("the checkpoint's end".into(), |l| l.to_string()),
        origin = checkpoint.origin,
        size = checkpoint.size,
    )
}

/// What `verify --bundle` found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct BundleReport {
    pub ok: bool,
    pub problems: Vec<super::verify::Problem>,
    pub warnings: Vec<String>,
    pub scope: Scope,
    /// The changes in scope the bundle holds and proves complete.
    pub changes: u64,
    pub origin: String,
    pub tree_size: u64,
    /// The checkpoint's root, base64.
    pub root: String,
    pub signature_verified: bool,
    /// The scope is proven complete through this LSN: the scope's `to`, or the last change
    /// the checkpoint attests when the range reaches the tree's end.
    #[serde(with = "lsn_text::optional")]
    pub complete_through: Option<Lsn>,
    /// Gaps the capture recorded inside the range (their payloads).
    pub gaps: Vec<String>,
}

impl BundleReport {
    fn problem(&mut self, place: impl Into<String>, what: impl Into<String>) {
        self.problems.push(super::verify::Problem {
            place: place.into(),
            what: what.into(),
        });
    }
}

/// What a leaf's bytes say in the clear.
struct LeafHead {
    kind: u8,
    /// A change's or message's key; an event's epoch.
    key: ChangeKey,
    table: Option<String>,
    /// An event's payload.
    payload: Option<String>,
}

fn read_head(data: &[u8]) -> Option<LeafHead> {
    let rest = data.strip_prefix(LEAF_DOMAIN.as_slice())?;
    let (&kind, rest) = rest.split_first()?;
    let lsn = u64::from_be_bytes(rest.get(..8)?.try_into().ok()?);
    let seq = u32::from_be_bytes(rest.get(8..12)?.try_into().ok()?);
    let key = ChangeKey::new(Lsn(lsn), seq);
    let str_at = |b: &[u8]| -> Option<(String, usize)> {
        let n = u32::from_be_bytes(b.get(..4)?.try_into().ok()?) as usize;
        let s = std::str::from_utf8(b.get(4..4 + n)?).ok()?;
        Some((s.to_string(), 4 + n))
    };
    match kind {
        KIND_CHANGE => {
            // xid, committed_at, then schema and table.
            let b = rest.get(12 + 4 + 8..)?;
            let (schema, used) = str_at(b)?;
            let (table, _) = str_at(&b[used..])?;
            Some(LeafHead {
                kind,
                key,
                table: Some(format!("{schema}.{table}")),
                payload: None,
            })
        }
        KIND_MESSAGE => Some(LeafHead {
            kind,
            key,
            table: None,
            payload: None,
        }),
        _ => {
            // An event: its place among the epoch's events, then the payload.
            let (payload, _) = str_at(rest.get(12 + 4..)?)?;
            Some(LeafHead {
                kind,
                key,
                table: None,
                payload: Some(payload),
            })
        }
    }
}

/// Check the bundle in `dir` with `keys` (none: the signature is not checked, which is said).
/// Errors are for a bundle that cannot be read at all; anything wrong in one is a problem.
pub fn verify_bundle(dir: &Path, keys: &[VerifierKey]) -> Result<BundleReport, BundleError> {
    let mut report = BundleReport::default();
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name)).map_err(|source| BundleError::Read {
            path: dir.join(name),
            source,
        })
    };
    let description: Description = match serde_json::from_str(&read(DESCRIPTION_FILE)?) {
        Ok(d) => d,
        Err(e) => {
            report.problem(DESCRIPTION_FILE, format!("unreadable: {e}"));
            return Ok(report);
        }
    };
    if description.format != BUNDLE_FORMAT {
        report.problem(
            DESCRIPTION_FILE,
            format!(
                "format {:?}, this pgtrail reads {BUNDLE_FORMAT:?}",
                description.format
            ),
        );
        return Ok(report);
    }
    report.scope = description.scope.clone();
    report.tree_size = description.tree_size;
    let note = read(CHECKPOINT_FILE)?;
    let checkpoint = match open_checkpoint(&note, keys) {
        Ok((checkpoint, verified)) => {
            report.signature_verified = verified;
            checkpoint
        }
        Err(why) => {
            report.problem(CHECKPOINT_FILE, why);
            return Ok(report);
        }
    };
    report.origin = checkpoint.origin.clone();
    report.root = BASE64.encode(checkpoint.root);
    if keys.is_empty() {
        report.warnings.push(
            "no --key given: the checkpoint's signature was not checked, so nothing proves who attested these changes".into(),
        );
    }
    if checkpoint.size != description.tree_size {
        report.problem(
            CHECKPOINT_FILE,
            format!(
                "attests {} leaves, the bundle's range proof is for {}",
                checkpoint.size, description.tree_size
            ),
        );
        return Ok(report);
    }

    // The leaves of the range, in order.
    let lines = read(LEAVES_FILE)?;
    let mut entries = Vec::new();
    for (i, line) in lines.lines().enumerate() {
        match serde_json::from_str::<Entry>(line) {
            Ok(e) => entries.push(e),
            Err(e) => {
                report.problem(format!("{LEAVES_FILE} line {}", i + 1), e.to_string());
                return Ok(report);
            }
        }
    }
    // The rows each file must hold, by key: (entry, salts).
    let mut wanted: Vec<HashMap<ChangeKey, (usize, u64, LeafInputs)>> =
        description.files.iter().map(|_| HashMap::new()).collect();
    let mut hashes: Vec<Option<Hash>> = vec![None; entries.len()];
    let mut heads: Vec<Option<LeafHead>> = Vec::with_capacity(entries.len());
    for (i, entry) in entries.iter().enumerate() {
        let place = format!("leaf {} of the tree", description.first + i as u64);
        match entry {
            Entry::Leaf { leaf_data } => {
                let Ok(data) = BASE64.decode(leaf_data) else {
                    report.problem(place, "leaf_data is not base64");
                    heads.push(None);
                    continue;
                };
                hashes[i] = Some(leaf_hash(&data));
                let head = read_head(&data);
                if head.is_none() {
                    report.problem(place, "leaf_data is not a pgtrail leaf");
                }
                heads.push(head);
            }
            Entry::Row {
                file,
                row,
                lsn,
                seq,
                salts,
                erased,
            } => {
                let key = ChangeKey::new(*lsn, *seq);
                let salts = decode_salts(salts).and_then(|salts| {
                    let mut parts = [None; 4];
                    for (k, digest) in erased {
                        let bytes = decode_hex(digest)?;
                        *parts.get_mut(k.parse::<usize>().ok()?)? = Some(bytes.try_into().ok()?);
                    }
                    Some(LeafInputs {
                        salts,
                        erased: parts,
                    })
                });
                match (wanted.get_mut(*file), salts) {
                    (Some(w), Some(salts)) => {
                        w.insert(key, (i, *row, salts));
                    }
                    (None, _) => report.problem(
                        place,
                        format!("names file {file}, which the bundle does not list"),
                    ),
                    (_, None) => report.problem(
                        place,
                        "its salts are not 64 bytes of hex, or an erased digest is not 32",
                    ),
                }
                heads.push(None);
            }
        }
    }
    // Each file's rows, recomputed: exactly the rows the entries name, no other.
    for (file_no, file) in description.files.iter().enumerate() {
        let path = dir.join(&file.file);
        let reader = match SegmentReader::open(&path, Some(&file.sha256), 8192) {
            Ok(r) => r,
            Err(e) => {
                report.problem(&file.file, e.to_string());
                continue;
            }
        };
        let content = reader.content().clone();
        let table = content.scope_name();
        let want = &wanted[file_no];
        let mut row_base = 0u64;
        let mut seen = 0u64;
        for batch in reader {
            let batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    report.problem(&file.file, e.to_string());
                    break;
                }
            };
            let rows = batch.num_rows() as u64;
            let mut found: Vec<(usize, u64, ChangeKey, Hash)> = Vec::new();
            let result = for_each_leaf(
                &content,
                &batch,
                |key| want.get(&key).map(|(_, _, s)| *s),
                |key, row, data, _| {
                    let (entry, _, _) = want[&key];
                    found.push((entry, row_base + row as u64, key, leaf_hash(data)));
                },
            );
            if let Err(e) = result {
                report.problem(format!("{} change {}", file.file, e.key), e.reason);
            }
            if (found.len() as u64) < rows {
                report.problem(
                    &file.file,
                    format!(
                        "{} of its rows are named by no leaf of the range",
                        rows - found.len() as u64
                    ),
                );
            }
            for (entry, row, key, hash) in found {
                if want[&key].1 != row {
                    report.problem(
                        format!("{} change {key}", file.file),
                        format!("is row {row}, its leaf names row {}", want[&key].1),
                    );
                }
                if hashes[entry].replace(hash).is_some() {
                    report.problem(format!("{} change {key}", file.file), "held twice");
                }
                heads[entry] = Some(LeafHead {
                    kind: if table.is_some() {
                        KIND_CHANGE
                    } else {
                        KIND_MESSAGE
                    },
                    key,
                    table: table.clone(),
                    payload: None,
                });
                seen += 1;
            }
            row_base += rows;
        }
        if seen != file.rows {
            report.problem(
                &file.file,
                format!(
                    "holds {seen} rows of the range, the bundle lists {}",
                    file.rows
                ),
            );
        }
    }
    for (i, hash) in hashes.iter().enumerate() {
        if hash.is_none() {
            report.problem(
                format!("leaf {} of the tree", description.first + i as u64),
                "its row is missing from the bundle's files",
            );
        }
    }
    if !report.problems.is_empty() {
        return Ok(report);
    }
    let hashes: Vec<Hash> = hashes.into_iter().flatten().collect();

    // The scope: every change in it is held as a row, and the range reaches past it.
    let scope = &description.scope;
    let mut last_key: Option<ChangeKey> = None;
    let mut changes_seen: Vec<ChangeKey> = Vec::new();
    for (i, (head, entry)) in heads.iter().zip(&entries).enumerate() {
        let Some(head) = head else { continue };
        let place = format!("leaf {} of the tree", description.first + i as u64);
        if head.kind == KIND_GAP
            && let Some(payload) = &head.payload
        {
            report.gaps.push(payload.clone());
        }
        if head.kind != KIND_CHANGE && head.kind != KIND_MESSAGE {
            continue;
        }
        if last_key.is_some_and(|k| k >= head.key) {
            report.problem(&place, "changes out of key order");
        }
        last_key = Some(head.key);
        changes_seen.push(head.key);
        let held = matches!(entry, Entry::Row { .. });
        let due = scope.takes(head.kind, head.key, head.table.as_deref());
        if due && !held {
            report.problem(
                &place,
                format!(
                    "change {} of {} is in the scope but the bundle withholds its row",
                    head.key,
                    head.table.as_deref().unwrap_or("the messages")
                ),
            );
        }
        if due && held {
            report.changes += 1;
        }
    }
    let at_start = description.first == 0;
    let at_end = description.first + description.count == description.tree_size;
    match (changes_seen.first(), scope.from) {
        (Some(k), Some(from)) if k.commit_lsn >= from && !at_start => report.problem(
            "the range's start",
            "its first change is inside the scope: changes of the scope before it may be left out",
        ),
        _ => {}
    }
    match (changes_seen.last(), scope.to) {
        (Some(k), Some(to)) if k.commit_lsn <= to && !at_end => report.problem(
            "the range's end",
            "its last change is inside the scope: changes of the scope after it may be left out",
        ),
        _ => {}
    }
    report.complete_through = match scope.to {
        Some(to) if !at_end || changes_seen.last().is_some_and(|k| k.commit_lsn > to) => Some(to),
        _ => changes_seen.last().map(|k| k.commit_lsn),
    };
    if at_end && report.complete_through != scope.to {
        report.warnings.push(format!(
            "the checkpoint attests changes through {} only: later changes of the scope are not in it",
            report
                .complete_through
                .map_or("none".to_string(), |l| l.to_string())
        ));
    }
    let proof: Vec<Hash> = match description
        .range_proof
        .iter()
        .map(|h| BASE64.decode(h).ok().and_then(|b| b.try_into().ok()))
        .collect::<Option<Vec<Hash>>>()
    {
        Some(p) => p,
        None => {
            report.problem(
                DESCRIPTION_FILE,
                "a range proof hash is not 32 bytes of base64",
            );
            return Ok(report);
        }
    };
    match root_from_range(description.tree_size, description.first, &hashes, &proof) {
        Some(r) if r == checkpoint.root => {}
        _ => report.problem(
            "the range",
            "its leaves and proof do not give the checkpoint's root: a change was altered, added, removed or moved, or the range is not the checkpoint's",
        ),
    }
    report.ok = report.problems.is_empty();
    Ok(report)
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len() / 2)
        .map(|i| u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok())
        .collect()
}

fn decode_salts(text: &str) -> Option<Salts> {
    let bytes = decode_hex(text).filter(|b| b.len() == 64)?;
    let mut salts = [[0u8; 16]; 4];
    for (k, chunk) in bytes.chunks_exact(16).enumerate() {
        salts[k].copy_from_slice(chunk);
    }
    Some(salts)
}

/// LSNs in the bundle's JSON as PostgreSQL writes them (`0/1A2B3C4`), for people and programs.
mod lsn_text {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::lsn::Lsn;

    pub fn serialize<S: Serializer>(lsn: &Lsn, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(lsn)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Lsn, D::Error> {
        let text = String::deserialize(d)?;
        text.parse()
            .map_err(|_| serde::de::Error::custom(format!("{text:?} is not an LSN")))
    }

    pub mod optional {
        use serde::{Deserialize, Deserializer, Serializer};

        use crate::lsn::Lsn;

        pub fn serialize<S: Serializer>(lsn: &Option<Lsn>, s: S) -> Result<S::Ok, S::Error> {
            match lsn {
                Some(lsn) => s.collect_str(lsn),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Lsn>, D::Error> {
            Option::<String>::deserialize(d)?
                .map(|text| {
                    text.parse()
                        .map_err(|_| serde::de::Error::custom(format!("{text:?} is not an LSN")))
                })
                .transpose()
        }
    }
}
