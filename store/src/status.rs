//! What an archive holds, as one typed report: the source it was captured from, its changes,
//! transactions, segments, log tail, gaps and per-table counts. `pgtrail status` prints it
//! (for people, or as JSON: the field names below are that JSON's contract), and anything
//! else that shows an archive's state builds on it.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use crate::change::Op;
use crate::error::LogError;
use crate::log::{LOG_FILE, LogReader};
use crate::lsn::Lsn;
use crate::segment::format_utc_micros;

/// An archive's state at one read of its log and manifest.
#[derive(Clone, Debug, Serialize)]
pub struct ArchiveStatus {
    pub archive: String,
    pub source: Option<SourceStatus>,
    /// Everything up to here is durable (and may be acknowledged to the source).
    pub position: String,
    pub changes: u64,
    pub transactions: u64,
    pub segments: SegmentsStatus,
    pub log: LogTailStatus,
    pub evidence: EvidenceStatus,
    /// The first and last commit LSN held.
    pub lsn_range: [Option<String>; 2],
    /// The first and last commit time held.
    pub time_range: [Option<String>; 2],
    /// The commit time (µs since the Unix epoch) of the last transaction in the log.
    pub last_commit_us: Option<i64>,
    /// Bytes of the whole archive directory.
    pub bytes: u64,
    pub schema_versions: usize,
    pub gaps: Vec<GapStatus>,
    pub tables: Vec<TableStatus>,
    /// Tables the capture leaves out because they cannot be captured safely, as its latest
    /// look at the catalog found them.
    pub not_captured: Vec<NotCapturedStatus>,
}

#[derive(Clone, Debug, Serialize)]
pub struct NotCapturedStatus {
    pub table: String,
    pub reason: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct SourceStatus {
    pub system_id: String,
    pub database: String,
    pub slot: String,
    pub publication: String,
    pub consistent_point: String,
    pub snapshot_complete: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct SegmentsStatus {
    pub files: usize,
    pub bytes: u64,
    /// Bytes of the change records they hold (before compression).
    pub raw_bytes: u64,
    pub compression_ratio: f64,
    pub changes: u64,
    pub compacted_through: String,
    /// Keyframes (tables' rows at a point, where `as_of` starts): files and bytes.
    pub keyframes: usize,
    pub keyframe_bytes: u64,
}

/// The archive's evidence tree (see `pgtrail verify`).
#[derive(Clone, Debug, Serialize)]
pub struct EvidenceStatus {
    /// Leaves in the tree: changes compacted since the archive keeps evidence.
    pub tree_size: u64,
    /// The root, base64.
    pub root: String,
    /// The size the latest checkpoint in the archive attests (0 when none is signed), its
    /// origin, and the changes not attested by it (the log tail included).
    pub latest_checkpoint: u64,
    pub origin: Option<String>,
    pub unattested: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct LogTailStatus {
    pub changes: u64,
    pub transactions: usize,
    pub file_bytes: u64,
    /// Changes whose row images the capture has not completed in the log yet (it does when
    /// it has nothing to acknowledge); readers show them completed, compaction waits for them.
    pub not_completed: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct GapStatus {
    pub from: String,
    pub to: String,
    pub reason: String,
    pub recorded_at: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct TableStatus {
    pub table: String,
    pub changes: u64,
    pub by_op: BTreeMap<String, u64>,
    /// Changes still in the log (not yet in a segment).
    pub in_log: u64,
    pub segments: u64,
    pub segment_bytes: u64,
    pub raw_bytes: u64,
    pub first_lsn: Option<String>,
    pub last_lsn: Option<String>,
    pub first_at: Option<String>,
    pub last_at: Option<String>,
}

/// First and last (commit LSN, commit time) seen, over segments and log.
#[derive(Clone, Copy, Default)]
struct Span {
    first: Option<(Lsn, i64)>,
    last: Option<(Lsn, i64)>,
}

impl Span {
    fn see(&mut self, first: (Lsn, i64), last: (Lsn, i64)) {
        if self.first.is_none_or(|f| first.0 < f.0) {
            self.first = Some(first);
        }
        if self.last.is_none_or(|l| last.0 > l.0) {
            self.last = Some(last);
        }
    }
}

#[derive(Default)]
struct TableCounts {
    by_op: BTreeMap<String, u64>,
    total: u64,
    span: Span,
    in_log: u64,
    segments: u64,
    segment_bytes: u64,
    raw_bytes: u64,
}

/// The bytes of the files under `dir`, recursively (0 for what cannot be read).
pub fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

impl ArchiveStatus {
    /// Read the archive in `dir` (beside a running capture, like any [`LogReader`]).
    pub fn collect(dir: &Path) -> Result<ArchiveStatus, LogError> {
        let reader = LogReader::open(dir)?;
        let identity = reader.source_identity()?;
        let relations = reader.relations()?;
        let names: BTreeMap<u32, String> = relations
            .iter()
            .map(|r| (r.relation_id, r.qualified_name()))
            .collect();
        let mut tables: BTreeMap<String, TableCounts> = BTreeMap::new();
        let mut lsn_span = Span::default();
        let mut time_span = (None::<i64>, None::<i64>);
        let mut see_time = |first: i64, last: i64| {
            time_span.0 = Some(time_span.0.map_or(first, |m| m.min(first)));
            time_span.1 = Some(time_span.1.map_or(last, |m| m.max(last)));
        };
        let mut total = 0u64;
        let manifest = reader.manifest()?;
        let keyframes = reader.keyframes()?;
        let (mut seg_bytes, mut seg_raw) = (0u64, 0u64);
        for seg in &manifest.segments {
            let t = tables.entry(seg.table_name()).or_default();
            for (op, n) in &seg.op_counts {
                *t.by_op.entry(op.clone()).or_default() += n;
            }
            t.total += seg.rows;
            t.segments += 1;
            t.segment_bytes += seg.bytes;
            t.raw_bytes += seg.raw_bytes;
            let (first, last) = (
                (seg.min_key.commit_lsn, seg.min_committed_at_us),
                (seg.max_key.commit_lsn, seg.max_committed_at_us),
            );
            t.span.see(first, last);
            lsn_span.see(first, last);
            see_time(seg.min_committed_at_us, seg.max_committed_at_us);
            total += seg.rows;
            seg_bytes += seg.bytes;
            seg_raw += seg.raw_bytes;
        }
        let mut in_log = 0u64;
        let completed_through = reader.completed_through()?;
        let mut not_completed = 0u64;
        for entry in reader.changes()? {
            let (key, rec) = entry?;
            total += 1;
            in_log += 1;
            not_completed += u64::from(key > completed_through);
            let name = if rec.op == Op::Message {
                "pgtrail.messages".to_string()
            } else {
                names
                    .get(&rec.relation_id)
                    .cloned()
                    .unwrap_or_else(|| format!("(relation {})", rec.relation_id))
            };
            let t = tables.entry(name).or_default();
            *t.by_op.entry(rec.op.as_str().to_string()).or_default() += 1;
            t.total += 1;
            t.in_log += 1;
            let at = (key.commit_lsn, rec.committed_at_us);
            t.span.see(at, at);
            lsn_span.see(at, at);
            see_time(rec.committed_at_us, rec.committed_at_us);
        }
        let transactions = reader.transactions()?;
        let gaps = reader.gaps()?;
        let lsn_text = |p: Option<(Lsn, i64)>| p.map(|(l, _)| l.to_string());
        let time_text = |p: Option<(Lsn, i64)>| p.map(|(_, t)| format_utc_micros(t));
        Ok(ArchiveStatus {
            archive: dir.display().to_string(),
            source: identity.map(|i| SourceStatus {
                system_id: i.system_id,
                database: i.database,
                slot: i.slot,
                publication: i.publication,
                consistent_point: i.consistent_point.to_string(),
                snapshot_complete: i.snapshot_complete,
            }),
            position: reader.position()?.to_string(),
            changes: total,
            transactions: transactions.len() as u64 + manifest.compacted_transactions,
            segments: SegmentsStatus {
                files: manifest.segments.len(),
                bytes: seg_bytes,
                raw_bytes: seg_raw,
                compression_ratio: if seg_bytes > 0 {
                    seg_raw as f64 / seg_bytes as f64
                } else {
                    0.0
                },
                changes: manifest.compacted_changes,
                compacted_through: manifest.compacted_through.to_string(),
                keyframes: keyframes.len(),
                keyframe_bytes: keyframes.iter().map(|k| k.bytes).sum(),
            },
            evidence: {
                let frontier = crate::evidence::state::frontier(reader.read_transaction())?;
                let latest = std::fs::read_to_string(
                    dir.join(crate::evidence::state::EVIDENCE_DIR)
                        .join("checkpoint"),
                )
                .unwrap_or_default();
                let latest = crate::evidence::note::Checkpoint::in_note_unverified(&latest).ok();
                let origin = latest.as_ref().map(|c| c.origin.clone());
                let latest_checkpoint = latest.map_or(0, |c| c.size);
                EvidenceStatus {
                    tree_size: frontier.size(),
                    root: base64::Engine::encode(
                        &base64::engine::general_purpose::STANDARD,
                        frontier.root(),
                    ),
                    latest_checkpoint,
                    origin,
                    unattested: frontier.size().saturating_sub(latest_checkpoint) + in_log,
                }
            },
            log: LogTailStatus {
                changes: in_log,
                transactions: transactions.len(),
                file_bytes: std::fs::metadata(dir.join(LOG_FILE))
                    .map(|m| m.len())
                    .unwrap_or(0),
                not_completed,
            },
            lsn_range: [lsn_text(lsn_span.first), lsn_text(lsn_span.last)],
            time_range: [
                time_span.0.map(format_utc_micros),
                time_span.1.map(format_utc_micros),
            ],
            last_commit_us: transactions.last().map(|(_, t)| t.committed_at_us),
            bytes: dir_size(dir),
            schema_versions: relations.len(),
            gaps: gaps
                .iter()
                .map(|g| GapStatus {
                    from: g.from.to_string(),
                    to: g.to.to_string(),
                    reason: g.reason.clone(),
                    recorded_at: format_utc_micros(g.recorded_at_us),
                })
                .collect(),
            tables: tables
                .into_iter()
                .map(|(table, t)| TableStatus {
                    table,
                    changes: t.total,
                    by_op: t.by_op,
                    in_log: t.in_log,
                    segments: t.segments,
                    segment_bytes: t.segment_bytes,
                    raw_bytes: t.raw_bytes,
                    first_lsn: lsn_text(t.span.first),
                    last_lsn: lsn_text(t.span.last),
                    first_at: time_text(t.span.first),
                    last_at: time_text(t.span.last),
                })
                .collect(),
            not_captured: reader
                .left_out()?
                .into_iter()
                .map(|(table, reason)| NotCapturedStatus { table, reason })
                .collect(),
        })
    }
}
