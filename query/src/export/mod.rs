//! Exports of an archive to a data lake (a directory or S3) in layouts lake engines read with
//! no adapter: `changes` (the change log with typed images), `cdf` (Delta/Iceberg change data
//! feed), `scd2` (one row per row version with validity) and `snapshot` (a table as of a
//! moment). Exports are incremental and exactly once: see [`export`].

mod delta;
mod destination;
mod files;
mod rows;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::sync_channel;
use std::time::Instant;

use datafusion::arrow::array::{Array, AsArray, BooleanArray, RecordBatch};
use datafusion::arrow::compute::{cast, filter_record_batch};
use datafusion::arrow::datatypes::{
    DataType, Field, Fields, Schema, SchemaRef, TimestampMicrosecondType, UInt64Type,
};
use pgtrail_store::segment::{SegmentContent, civil_from_days};
use pgtrail_store::{ChangeKey, ChangeRecord, Lsn, Op, RelationVersion, Row};

use serde::{Deserialize, Serialize};
use tokio::runtime::Handle;

use delta::DeltaTable;
pub use destination::Destination;
pub use files::WrittenFile;

use crate::archive::{ArchiveSnapshot, TableHistory};
use crate::error::QueryError;
use crate::merge::{adapt, history_schema, merged_row_fields};
use crate::read::{
    Bounds, READ_AHEAD_BATCHES, for_each_key_and_time, open_segment_pruned, tail_batches,
};
use crate::replay::{
    ApplyChange, Moment, OpenRows, OpenVersion, RowChange, RowSet, SnapshotPoint, replay_rows,
    unknown_span, unknown_values,
};
use files::PartitionedFiles;
use rows::{LakeRows, MetaType, MetaValue};

/// An export failed. Nothing a reader could see is half-written; rerunning the same command
/// finishes the interrupted run first.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExportError {
    #[error("cannot export to {destination:?}: {why}")]
    BadDestination { destination: String, why: String },
    #[error(
        "no S3 credentials for {destination}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_REGION, and AWS_ENDPOINT_URL for an S3-compatible store)"
    )]
    MissingCredentials { destination: String },
    /// The store's answer is kept as text, said once: `object_store`'s error repeats each
    /// cause inside the next (an S3 refusal printed its XML body four times).
    #[error("cannot {action} {path} at {destination}: {said}; {hint}")]
    Destination {
        destination: String,
        action: &'static str,
        path: String,
        said: String,
        hint: &'static str,
    },
    // The cause follows in the error's chain (`{:#}`): "<path>: <why>".
    #[error("{}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the export state {path} at {destination} is unreadable ({why}); it is not pgtrail's, or it was damaged"
    )]
    BadState {
        destination: String,
        path: String,
        why: String,
    },
    #[error(
        "{destination} holds a {layout} export of another archive (source {found}, this archive is {expected}); export to another prefix"
    )]
    OtherArchive {
        destination: String,
        layout: &'static str,
        found: String,
        expected: String,
    },
    #[error(
        "--since does not apply to the snapshot layout (a snapshot is the whole table as of --until)"
    )]
    SinceWithSnapshot,
    #[error(
        "{destination} holds a {found} {layout} export; this run asks for {wanted}: continue it with --table-format {found}, or export to another prefix"
    )]
    OtherTableFormat {
        destination: String,
        layout: &'static str,
        found: &'static str,
        wanted: &'static str,
    },
    #[error("cannot export {table} as a Delta table: {why}")]
    DeltaSchema { table: String, why: String },
    #[error(
        "the Delta table {table} at {destination} kept changing under this export (another writer commits to it): run the export again"
    )]
    DeltaContention { destination: String, table: String },
    #[error(transparent)]
    Query(#[from] QueryError),
    #[error(transparent)]
    Arrow(#[from] datafusion::arrow::error::ArrowError),
    #[error(transparent)]
    Parquet(#[from] datafusion::parquet::errors::ParquetError),
    #[error(transparent)]
    DataFusion(#[from] datafusion::error::DataFusionError),
    #[error("internal error: {0}")]
    Internal(String),
}

/// The shape of the exported files.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    Changes,
    Cdf,
    Scd2,
    Snapshot,
}

impl Layout {
    pub fn name(self) -> &'static str {
        match self {
            Layout::Changes => "changes",
            Layout::Cdf => "cdf",
            Layout::Scd2 => "scd2",
            Layout::Snapshot => "snapshot",
        }
    }

    pub fn parse(s: &str) -> Option<Layout> {
        [Layout::Changes, Layout::Cdf, Layout::Scd2, Layout::Snapshot]
            .into_iter()
            .find(|l| l.name() == s)
    }
}

/// How the files of a layout are presented to readers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TableFormat {
    /// Hive-partitioned Parquet files: the layouts as described.
    #[default]
    Plain,
    /// The same files, each source table a Delta Lake table with its own `_delta_log`.
    Delta,
}

impl TableFormat {
    pub fn name(self) -> &'static str {
        match self {
            TableFormat::Plain => "plain",
            TableFormat::Delta => "delta",
        }
    }

    pub fn parse(s: &str) -> Option<TableFormat> {
        [TableFormat::Plain, TableFormat::Delta]
            .into_iter()
            .find(|f| f.name() == s)
    }

    fn is_plain(&self) -> bool {
        *self == TableFormat::Plain
    }
}

/// What to export.
#[derive(Clone, Debug)]
pub struct ExportRequest {
    pub archive: PathBuf,
    pub destination: String,
    pub layout: Layout,
    /// Table names as PostgreSQL writes them; empty for every table.
    pub tables: Vec<String>,
    /// Only changes committed at or after this moment (the first export; later ones continue
    /// from where the last one stopped).
    pub since: Option<Moment>,
    /// Only changes committed at or before this moment (default: everything archived).
    pub until: Option<Moment>,
    pub max_rows_per_file: usize,
    pub table_format: TableFormat,
}

/// What one table's export wrote.
#[derive(Clone, Debug, Serialize)]
pub struct TableExport {
    pub table: String,
    /// Changes after `from_lsn` up to and including `until_lsn`.
    pub from_lsn: String,
    pub until_lsn: String,
    pub rows: u64,
    pub bytes: u64,
    pub files: Vec<String>,
}

/// The outcome of [`export`].
#[derive(Clone, Debug, Serialize)]
pub struct ExportReport {
    pub destination: String,
    pub layout: &'static str,
    /// An interrupted earlier run was finished first.
    pub resumed: bool,
    pub tables: Vec<TableExport>,
    pub seconds: f64,
}

/// One run: a fixed LSN range per table. It is recorded in the state before any file is
/// written, so an interrupted run is repeated exactly.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Run {
    until_lsn: String,
    max_rows_per_file: usize,
    /// Table -> the LSN its changes start after.
    tables: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct TableProgress {
    /// Every change up to this commit LSN is exported.
    through_lsn: String,
    /// scd2: the files holding the current versions (replaced by each run).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    current_files: Vec<String>,
    /// scd2: the directory of those files.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    current_dir: String,
    /// Delta: the table's newest commit this export made, and the schema it recorded (the log
    /// is read only after that version).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    delta: Option<DeltaProgress>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct DeltaProgress {
    version: u64,
    schema: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct ExportState {
    format: u32,
    layout: Layout,
    /// The archive's source (system identifier, database, slot).
    source: String,
    tables: BTreeMap<String, TableProgress>,
    pending: Option<Run>,
    #[serde(default, skip_serializing_if = "TableFormat::is_plain")]
    table_format: TableFormat,
}

const STATE_DIR: &str = "_pgtrail_export";
/// The newest format of the export state this code writes; it reads every version up to it.
/// A plain export's state is version 1; a Delta export's is version 2, so that a pgtrail
/// that knows no Delta refuses to continue it (and to leave its tables' logs behind).
const EXPORT_STATE_FORMAT: u32 = 2;

fn state_format(table_format: TableFormat) -> u32 {
    match table_format {
        TableFormat::Plain => 1,
        TableFormat::Delta => 2,
    }
}

fn state_path(layout: Layout) -> String {
    format!("{STATE_DIR}/{}.json", layout.name())
}

fn parse_lsn(s: &str, dest: &Destination, layout: Layout) -> Result<Lsn, ExportError> {
    s.parse().map_err(|_| ExportError::BadState {
        destination: dest.display().to_string(),
        path: state_path(layout),
        why: format!("bad LSN {s:?}"),
    })
}

impl ExportState {
    fn load(dest: &Destination, layout: Layout) -> Result<Option<ExportState>, ExportError> {
        let path = state_path(layout);
        let Some(bytes) = dest.get(&path)? else {
            return Ok(None);
        };
        let state: ExportState =
            serde_json::from_slice(&bytes).map_err(|e| ExportError::BadState {
                destination: dest.display().to_string(),
                path: path.clone(),
                why: e.to_string(),
            })?;
        if state.format > EXPORT_STATE_FORMAT {
            return Err(ExportError::BadState {
                destination: dest.display().to_string(),
                path,
                why: format!(
                    "its format version is {}, written by a newer pgtrail; this pgtrail reads versions up to {EXPORT_STATE_FORMAT}: upgrade pgtrail to continue this export",
                    state.format
                ),
            });
        }
        if state.layout != layout {
            return Err(ExportError::BadState {
                destination: dest.display().to_string(),
                path,
                why: format!(
                    "it records a {} export, not {}",
                    state.layout.name(),
                    layout.name()
                ),
            });
        }
        Ok(Some(state))
    }

    /// Replace the state object whole (one PUT, or rename + fsync on a directory).
    fn save(&self, dest: &Destination) -> Result<(), ExportError> {
        let bytes =
            serde_json::to_vec_pretty(self).map_err(|e| ExportError::Internal(e.to_string()))?;
        dest.put_bytes(&state_path(self.layout), bytes)
    }
}

fn source_name(archive: &ArchiveSnapshot) -> String {
    match &archive.source {
        Some(s) => format!(
            "system {} database {} slot {}",
            s.system_id, s.database, s.slot
        ),
        None => "unknown".into(),
    }
}

/// An LSN in file names: fixed-width hex, so names sort as LSNs do.
fn lsn_name(lsn: Lsn) -> String {
    format!("{:016X}", lsn.0)
}

/// An LSN as a partition value: fixed width and sortable like [`lsn_name`], and never read
/// as a number by engines that infer partition types.
fn lsn_partition(lsn: Lsn) -> String {
    format!("{:08X}-{:08X}", lsn.0 >> 32, lsn.0 & 0xFFFF_FFFF)
}

/// `table=<schema>.<table>`, the Hive partition value encoded like segment file names.
fn table_partition(table: &TableHistory) -> String {
    format!(
        "table={}",
        pgtrail_store::file_safe(&format!("{}.{}", table.schema, table.name))
    )
}

const DAY_US: i64 = 86_400_000_000;

fn date_of(us: i64) -> String {
    let (y, m, d) = civil_from_days(us.div_euclid(DAY_US));
    format!("{y:04}-{m:02}-{d:02}")
}

/// The commit LSN of the last change committed at or before `t` (0 when none).
pub fn lsn_at_time(archive: &ArchiveSnapshot, t: i64) -> Result<Lsn, ExportError> {
    Ok(commit_lsns_between(archive, (i64::MIN, t))?.map_or(Lsn(0), |(_, last)| last))
}

/// The lowest and the highest commit LSN of the changes committed within `times` (µs,
/// inclusive), over every table; `None` when none was. Every change committed within the times
/// lies between the two, whatever the order of commit times (a change committed later may
/// have a lower LSN), so the range holds the window, and perhaps a few changes beside it.
pub fn commit_lsns_between(
    archive: &ArchiveSnapshot,
    times: (i64, i64),
) -> Result<Option<(Lsn, Lsn)>, ExportError> {
    let mut range: Option<(Lsn, Lsn)> = None;
    let mut take = |lsn: Lsn| {
        range = Some(range.map_or((lsn, lsn), |(a, b)| (a.min(lsn), b.max(lsn))));
    };
    let inside = |t: i64| (times.0..=times.1).contains(&t);
    for table in archive.tables.values() {
        // Segments wholly inside the times answer from the manifest; only those straddling
        // an end (and the tail) are read, pruned to the row groups inside.
        for seg in &table.segments {
            if inside(seg.min_committed_at_us) && inside(seg.max_committed_at_us) {
                take(seg.min_key.commit_lsn);
                take(seg.max_key.commit_lsn);
            }
        }
        // Of the segments straddling an end, only the key and time columns are read.
        for seg in table.segments.iter().filter(|s| {
            s.min_committed_at_us <= times.1
                && s.max_committed_at_us >= times.0
                && !(inside(s.min_committed_at_us) && inside(s.max_committed_at_us))
        }) {
            let bounds = Bounds {
                time: times,
                ..Bounds::default()
            };
            for_each_key_and_time(&archive.segment_path(seg), seg, bounds, |key, at| {
                if inside(at) {
                    take(key.commit_lsn);
                }
            })?;
        }
        for (key, rec) in &table.tail {
            if inside(rec.committed_at_us) {
                take(key.commit_lsn);
            }
        }
    }
    Ok(range)
}

fn has_changes(table: &TableHistory, from: Lsn, until: Lsn) -> bool {
    table
        .segments
        .iter()
        .any(|s| s.max_key.commit_lsn > from && s.min_key.commit_lsn <= until)
        || table
            .tail
            .iter()
            .any(|(k, _)| k.commit_lsn > from && k.commit_lsn <= until)
}

/// Export `request`. Blocking: call it off the async runtime; `handle` runs the destination's
/// I/O. `progress` receives one line per file and per table for people to read.
///
/// Exactly once: (1) the run (each table's LSN range) is written into the destination's state
/// object before any data file; (2) data files have names fixed by the run and appear whole;
/// (3) the state then records the range as exported and clears the run. A crash before (1)
/// wrote nothing; between (1) and (3) the next export repeats the recorded run first, rewriting
/// the same objects with the same rows; after (3) the next run starts where this one ended.
pub fn export(
    request: &ExportRequest,
    handle: &Handle,
    progress: &mut dyn FnMut(&str),
) -> Result<ExportReport, ExportError> {
    let started = Instant::now();
    // The destination's multipart uploads spawn tasks on the runtime: enter it, so a caller
    // on a plain thread (not one of the runtime's blocking threads) works too.
    let _runtime = handle.enter();
    let dest = Destination::open(&request.destination, handle.clone())?;
    let layout = request.layout;
    if layout == Layout::Snapshot && request.since.is_some() {
        return Err(ExportError::SinceWithSnapshot);
    }
    let archive = ArchiveSnapshot::open(&request.archive)?;
    let source = source_name(&archive);
    let mut state = match ExportState::load(&dest, layout)? {
        Some(s) if s.source != source => {
            return Err(ExportError::OtherArchive {
                destination: dest.display().to_string(),
                layout: layout.name(),
                found: s.source,
                expected: source,
            });
        }
        Some(s) if s.table_format != request.table_format => {
            return Err(ExportError::OtherTableFormat {
                destination: dest.display().to_string(),
                layout: layout.name(),
                found: s.table_format.name(),
                wanted: request.table_format.name(),
            });
        }
        Some(s) => s,
        None => ExportState {
            format: state_format(request.table_format),
            layout,
            source,
            tables: BTreeMap::new(),
            pending: None,
            table_format: request.table_format,
        },
    };
    let spool = tempfile::Builder::new()
        .prefix("pgtrail-export-")
        .tempdir()
        .map_err(|source| ExportError::Io {
            path: std::env::temp_dir(),
            source,
        })?;
    let mut report = ExportReport {
        destination: dest.display().to_string(),
        layout: layout.name(),
        resumed: false,
        tables: Vec::new(),
        seconds: 0.0,
    };

    if let Some(run) = state.pending.clone() {
        progress(&format!(
            "finishing the interrupted export up to LSN {}",
            run.until_lsn
        ));
        report.resumed = true;
        report.tables.extend(execute(
            &archive,
            &dest,
            spool.path(),
            layout,
            &run,
            &mut state,
            progress,
        )?);
    }
    // Leftovers of a run interrupted after its state was saved (scd2's replaced current files).
    remove_stale_current(&dest, &state)?;

    let run = plan(&archive, &dest, &state, request)?;
    if run.tables.is_empty() {
        progress(&format!(
            "nothing new to export to {} ({} layout)",
            dest.display(),
            layout.name()
        ));
    } else {
        // Step (1): the intent, before any file.
        state.pending = Some(run.clone());
        state.save(&dest)?;
        report.tables.extend(execute(
            &archive,
            &dest,
            spool.path(),
            layout,
            &run,
            &mut state,
            progress,
        )?);
        remove_stale_current(&dest, &state)?;
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// The commit LSN of the last change this read of the archive shows. Exports stop there, not
/// at the log's stream position: a transaction still being written (a large one streams in
/// over several log commits) is hidden from readers, and a range recorded as exported must
/// never cover a commit LSN whose changes were not visible yet.
pub fn visible_until(archive: &ArchiveSnapshot) -> Lsn {
    let mut until = Lsn(0);
    for table in archive.tables.values() {
        for seg in &table.segments {
            until = until.max(seg.max_key.commit_lsn);
        }
        if let Some((key, _)) = table.tail.last() {
            until = until.max(key.commit_lsn);
        }
    }
    for seg in &archive.message_segments {
        until = until.max(seg.max_key.commit_lsn);
    }
    if let Some((key, _)) = archive.message_tail.last() {
        until = until.max(key.commit_lsn);
    }
    until
}

/// Decide each table's LSN range.
fn plan(
    archive: &ArchiveSnapshot,
    dest: &Destination,
    state: &ExportState,
    request: &ExportRequest,
) -> Result<Run, ExportError> {
    let visible = visible_until(archive);
    let until = match request.until {
        None => visible,
        Some(Moment::Lsn(l)) => l.min(visible),
        Some(Moment::Time(t)) => lsn_at_time(archive, t)?.min(visible),
    };
    let since_after = match request.since {
        None => Lsn(0),
        // "since X" includes X: changes after the LSN just below it.
        Some(Moment::Lsn(l)) => Lsn(l.0.saturating_sub(1)),
        Some(Moment::Time(t)) => lsn_at_time(archive, t.saturating_sub(1))?,
    };
    let names: Vec<String> = if request.tables.is_empty() {
        archive.tables.keys().cloned().collect()
    } else {
        request
            .tables
            .iter()
            .map(|n| archive.table(n).map(|t| t.qualified_name()))
            .collect::<Result<_, _>>()?
    };
    let mut tables = BTreeMap::new();
    for name in names {
        let table = &archive.tables[&name];
        let done = match state.tables.get(&name) {
            Some(p) => parse_lsn(&p.through_lsn, dest, request.layout)?,
            None => Lsn(0),
        };
        let from = done.max(since_after);
        if from < until && has_changes(table, from, until) {
            tables.insert(name, from.to_string());
        }
    }
    Ok(Run {
        until_lsn: until.to_string(),
        max_rows_per_file: request.max_rows_per_file,
        tables,
    })
}

/// Steps (2) and (3) of [`export`] for one run.
fn execute(
    archive: &ArchiveSnapshot,
    dest: &Destination,
    spool: &std::path::Path,
    layout: Layout,
    run: &Run,
    state: &mut ExportState,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<TableExport>, ExportError> {
    let until = parse_lsn(&run.until_lsn, dest, layout)?;
    let mut done = Vec::new();
    for (name, from) in &run.tables {
        let from = parse_lsn(from, dest, layout)?;
        let Some(table) = archive.tables.get(name) else {
            return Err(ExportError::Internal(format!(
                "the recorded export names table {name}, which the archive does not hold"
            )));
        };
        let started = Instant::now();
        let mut on_file = |f: &WrittenFile| {
            progress(&format!(
                "  {} ({} rows, {} bytes)",
                f.path, f.rows, f.bytes
            ))
        };
        let delta = (state.table_format == TableFormat::Delta).then(|| {
            DeltaTable::new(
                dest,
                table_partition(table),
                delta::app_id(&state.source, layout, name),
            )
        });
        let known = state.tables.get(name).and_then(|p| p.delta.clone());
        let log = delta
            .as_ref()
            .map(|d| d.read(known.as_ref().map(|k| k.version)))
            .transpose()?;
        let (written, delta_progress) = match log {
            // The table's commit of this run was made before an interruption (it carries the
            // run's txn): its files are in the log as they are, so they are not written again
            // (a rewrite could change bytes the log's sizes describe); the state below is
            // taken from that commit.
            Some(delta::LogRead {
                txn: Some((through, adds)),
                latest,
                schema,
            }) if through >= until.0 as i64 => {
                let version = latest.unwrap_or_default();
                progress(&format!(
                    "{name}: this run was committed to its Delta table (version {version}) before the interruption"
                ));
                let schema = schema.or(known.map(|k| k.schema)).unwrap_or_default();
                (adds, Some(DeltaProgress { version, schema }))
            }
            log => {
                let schema = output_schema(table, until, layout);
                let file_schema = match &delta {
                    Some(_) => delta::file_schema(&schema),
                    None => schema.clone(),
                };
                let mut files = PartitionedFiles::new(
                    dest,
                    spool,
                    file_schema.clone(),
                    run.max_rows_per_file,
                    &mut on_file,
                );
                match layout {
                    Layout::Changes => {
                        export_changes(archive, table, from, until, &schema, &mut files)?
                    }
                    Layout::Cdf | Layout::Scd2 | Layout::Snapshot => {
                        replay(archive, table, from, until, layout, &mut files)?
                    }
                }
                let written = files.finish()?;
                let mut delta_progress = None;
                if let (Some(d), Some(read)) = (&delta, log) {
                    let removed = match layout {
                        Layout::Scd2 => state
                            .tables
                            .get(name)
                            .map(|p| p.current_files.clone())
                            .unwrap_or_default(),
                        _ => Vec::new(),
                    };
                    let wanted = delta::schema_string(&file_schema, layout, name)?;
                    let version = commit_delta(
                        d,
                        DeltaCommit {
                            layout,
                            table: name,
                            wanted: &wanted,
                            current: read.schema.or(known.map(|k| k.schema)),
                            next: read.latest.map_or(0, |v| v + 1),
                            files: &written,
                            removed: &removed,
                            range: (from, until),
                        },
                        dest,
                    )?;
                    progress(&format!("{name}: Delta table version {version} committed"));
                    delta_progress = Some(DeltaProgress {
                        version,
                        schema: wanted,
                    });
                }
                (written, delta_progress)
            }
        };
        let rows: u64 = written.iter().map(|f| f.rows).sum();
        let bytes: u64 = written.iter().map(|f| f.bytes).sum();
        let seconds = started.elapsed().as_secs_f64().max(1e-6);
        progress(&format!(
            "{name}: {rows} rows in {} files, {bytes} bytes, {:.0} rows/s (LSN {from} .. {until})",
            written.len(),
            rows as f64 / seconds
        ));
        let entry = state.tables.entry(name.clone()).or_default();
        entry.through_lsn = until.to_string();
        if delta_progress.is_some() {
            entry.delta = delta_progress;
        }
        if layout == Layout::Scd2 {
            entry.current_dir = format!("{}/state=current", table_partition(table));
            let stem = current_stem(table, until);
            entry.current_files = written
                .iter()
                .filter(|f| f.path.starts_with(&stem))
                .map(|f| f.path.clone())
                .collect();
        }
        done.push(TableExport {
            table: name.clone(),
            from_lsn: from.to_string(),
            until_lsn: until.to_string(),
            rows,
            bytes,
            files: written.into_iter().map(|f| f.path).collect(),
        });
    }
    // Step (3): the range is exported. A crash before this line repeats the run; after it, the
    // next run starts at `until`.
    state.pending = None;
    state.save(dest)?;
    Ok(done)
}

/// One table's Delta commit of a run.
struct DeltaCommit<'a> {
    layout: Layout,
    table: &'a str,
    /// The schema of the run's files, and the table's as its log last recorded it.
    wanted: &'a str,
    current: Option<String>,
    /// The version to take (the log's newest plus one).
    next: u64,
    files: &'a [WrittenFile],
    /// scd2: the current-state files this run replaces.
    removed: &'a [String],
    range: (Lsn, Lsn),
}

/// Commit a run's files to the table's Delta log; returns the version taken. Safe at any
/// line: before the commit object exists the files are in no version (a rerun rewrites them
/// and commits); once it exists the run's txn is in the log, and a rerun that finds it
/// commits nothing again (see [`execute`]).
fn commit_delta(
    table: &DeltaTable<'_>,
    mut commit: DeltaCommit<'_>,
    dest: &Destination,
) -> Result<u64, ExportError> {
    let (from, until) = commit.range;
    let (after, through) = (from.to_string(), until.to_string());
    for _ in 0..8 {
        let record =
            delta::schema_to_record(commit.current.as_deref(), commit.wanted, commit.table)?;
        pgtrail_store::crashpoint::hit("delta:before_commit");
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        if table.commit(
            commit.next,
            commit.layout,
            record,
            commit.files,
            commit.removed,
            until.0 as i64,
            (&after, &through),
            now_ms,
        )? {
            pgtrail_store::crashpoint::hit("delta:after_commit");
            return Ok(commit.next);
        }
        // Another writer took the version (a Delta tool's VACUUM or OPTIMIZE, or a second
        // export of this run): read what it committed, then take the next one.
        let read = table.read(commit.next.checked_sub(1))?;
        if read.txn.as_ref().is_some_and(|(v, _)| *v >= until.0 as i64) {
            return Ok(read.latest.unwrap_or(commit.next));
        }
        if read.schema.is_some() {
            commit.current = read.schema;
        }
        commit.next = read.latest.map_or(commit.next + 1, |v| v + 1);
    }
    Err(ExportError::DeltaContention {
        destination: dest.display().to_string(),
        table: commit.table.to_string(),
    })
}

fn current_stem(table: &TableHistory, until: Lsn) -> String {
    format!(
        "{}/state=current/scd2-{}",
        table_partition(table),
        lsn_name(until)
    )
}

/// Delete scd2 current-version files the state no longer lists. Safe at any point: the state
/// (saved before this runs) lists the files that hold the current versions; any other file
/// under `state=current` belongs to a replaced run.
fn remove_stale_current(dest: &Destination, state: &ExportState) -> Result<(), ExportError> {
    // A Delta table keeps replaced files: its older versions (time travel) still name them.
    // A Delta tool's VACUUM deletes them once they are older than its retention period.
    if state.layout != Layout::Scd2
        || state.pending.is_some()
        || state.table_format == TableFormat::Delta
    {
        return Ok(());
    }
    for progress in state.tables.values().filter(|p| !p.current_dir.is_empty()) {
        for object in dest.list(&progress.current_dir)? {
            if !progress.current_files.contains(&object) {
                dest.delete(&object)?;
            }
        }
    }
    Ok(())
}

/// The schema versions in force up to `until` (at least the first): a run's columns depend on
/// them only, so a repeated run writes the same columns.
fn versions_until(table: &TableHistory, until: Lsn) -> &[RelationVersion] {
    let n = table
        .versions
        .iter()
        .take_while(|v| v.valid_from.commit_lsn <= until)
        .count();
    &table.versions[..n.max(1)]
}

/// The table columns of the lake layouts.
fn lake_columns(known: &[RelationVersion], layout: Layout) -> Fields {
    match layout {
        // A snapshot has the columns of the schema in force at its moment.
        Layout::Snapshot => {
            pgtrail_store::segment::row_struct_fields(known.last().expect("a table has a version"))
        }
        _ => merged_row_fields(known),
    }
}

fn layout_meta(layout: Layout) -> &'static [(&'static str, MetaType)] {
    match layout {
        Layout::Cdf => CDF_META,
        Layout::Scd2 => SCD2_META,
        _ => SNAPSHOT_META,
    }
}

/// The schema of a run's files for `table`.
fn output_schema(table: &TableHistory, until: Lsn, layout: Layout) -> SchemaRef {
    let known = versions_until(table, until);
    match layout {
        // The history schema with unsigned metadata as Int64, for engines without unsigned types.
        Layout::Changes => Arc::new(Schema::new(
            history_schema(known)
                .fields()
                .iter()
                .map(|f| match f.name().as_str() {
                    "lsn" | "seq" | "xid" => Field::new(f.name(), DataType::Int64, false),
                    _ => f.as_ref().clone(),
                })
                .collect::<Vec<_>>(),
        )),
        _ => rows::lake_schema(&lake_columns(known, layout), layout_meta(layout)),
    }
}

/// The `changes` layout: the table's history rows (typed `before`/`after`), unsigned
/// metadata as Int64 for engines without unsigned types, partitioned by commit date.
fn export_changes(
    archive: &ArchiveSnapshot,
    table: &TableHistory,
    from: Lsn,
    until: Lsn,
    out_schema: &SchemaRef,
    files: &mut PartitionedFiles,
) -> Result<(), ExportError> {
    let history = history_schema(versions_until(table, until));
    let out_schema = out_schema.clone();
    let partition = table_partition(table);
    let stem = format!("changes-{}-{}", lsn_name(from), lsn_name(until));
    let mut emit = |batch: RecordBatch| -> Result<(), ExportError> {
        let lsn = batch
            .column_by_name("lsn")
            .and_then(|c| c.as_primitive_opt::<UInt64Type>())
            .ok_or_else(|| ExportError::Internal("lsn column".into()))?;
        let keep: BooleanArray = lsn
            .iter()
            .map(|l| l.map(|l| l > from.0 && l <= until.0))
            .collect();
        let batch = filter_record_batch(&batch, &keep)?;
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let columns = batch
            .columns()
            .iter()
            .zip(out_schema.fields())
            .map(|(c, f)| {
                if c.data_type() == f.data_type() {
                    Ok(c.clone())
                } else {
                    cast(c, f.data_type())
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let batch = RecordBatch::try_new(out_schema.clone(), columns)?;
        let at = batch
            .column_by_name("committed_at")
            .and_then(|c| c.as_primitive_opt::<TimestampMicrosecondType>())
            .ok_or_else(|| ExportError::Internal("committed_at column".into()))?
            .clone();
        // Split into runs of one commit date (rows are in commit order).
        let mut start = 0;
        for i in 1..=batch.num_rows() {
            if i == batch.num_rows()
                || at.value(i).div_euclid(DAY_US) != at.value(start).div_euclid(DAY_US)
            {
                let dir = format!("{partition}/date={}", date_of(at.value(start)));
                files.write(&dir, &stem, &batch.slice(start, i - start))?;
                start = i;
            }
        }
        Ok(())
    };
    let bounds = Bounds {
        lsn: (from.0.saturating_add(1), until.0),
        ..Bounds::default()
    };
    // Segments are decoded on a thread of their own, a few batches ahead of the files' encoding
    // here: the two halves of the work then run on two cores.
    std::thread::scope(|scope| -> Result<(), ExportError> {
        let (tx, rx) = sync_channel::<Result<RecordBatch, ExportError>>(READ_AHEAD_BATCHES);
        let history = &history;
        scope.spawn(move || {
            for seg in &table.segments {
                if !(seg.max_key.commit_lsn > from && seg.min_key.commit_lsn <= until) {
                    continue;
                }
                let SegmentContent::Table(version) = &seg.content else {
                    continue;
                };
                let reader = match open_segment_pruned(
                    &archive.segment_path(seg),
                    &seg.sha256,
                    8192,
                    bounds,
                ) {
                    Ok(reader) => reader,
                    Err(e) => {
                        let _ = tx.send(Err(e.into()));
                        return;
                    }
                };
                for batch in reader {
                    let batch = batch
                        .map_err(|e| ExportError::Query(QueryError::Segment(e)))
                        .and_then(|batch| Ok(adapt(&batch, version, history)?));
                    // A failed send: the export stopped on an error of its own; so do we.
                    if tx.send(batch).is_err() {
                        return;
                    }
                }
            }
        });
        // Returning early drops the receiver, which stops the decoder at its next send.
        for batch in rx {
            emit(batch?)?;
        }
        Ok(())
    })?;
    let tail: Vec<(ChangeKey, ChangeRecord)> = table
        .tail
        .iter()
        .filter(|(k, _)| k.commit_lsn > from && k.commit_lsn <= until)
        .cloned()
        .collect();
    for batch in tail_batches(table, &tail, &history)? {
        emit(batch)?;
    }
    Ok(())
}

const BATCH_ROWS: usize = 8192;

/// Per-partition row buffers flushed to the files every [`BATCH_ROWS`] rows.
struct Buffers<'a> {
    columns: Fields,
    versions: &'a [RelationVersion],
    meta: &'static [(&'static str, MetaType)],
    /// (partition, stem, rows): a handful at most, found without allocating per row.
    open: Vec<(String, String, LakeRows)>,
}

impl Buffers<'_> {
    fn push(
        &mut self,
        files: &mut PartitionedFiles,
        partition: &str,
        stem: &str,
        image: Option<(&RelationVersion, &Row)>,
        meta: &[MetaValue],
    ) -> Result<(), ExportError> {
        let i = match self
            .open
            .iter()
            .position(|(p, s, _)| p == partition && s == stem)
        {
            Some(i) => i,
            None => {
                self.open.push((
                    partition.to_string(),
                    stem.to_string(),
                    LakeRows::new(&self.columns, self.versions, self.meta),
                ));
                self.open.len() - 1
            }
        };
        let (partition, stem, rows) = &mut self.open[i];
        rows.push(image, meta)?;
        if rows.len() >= BATCH_ROWS {
            let batch = rows.finish()?;
            files.write(partition, stem, &batch)?;
        }
        Ok(())
    }

    fn flush(&mut self, files: &mut PartitionedFiles) -> Result<(), ExportError> {
        for (partition, stem, rows) in &mut self.open {
            if rows.len() > 0 {
                let batch = rows.finish()?;
                files.write(partition, stem, &batch)?;
            }
        }
        Ok(())
    }
}

const CDF_META: &[(&str, MetaType)] = &[
    ("_change_type", MetaType::Text),
    ("_commit_lsn", MetaType::Int64),
    ("_commit_seq", MetaType::Int64),
    ("_commit_timestamp", MetaType::Timestamp),
    ("_xid", MetaType::Int64),
    ("_context", MetaType::Text),
];

const SCD2_META: &[(&str, MetaType)] = &[
    ("_valid_from", MetaType::Timestamp),
    ("_valid_to", MetaType::Timestamp),
    ("_valid_from_lsn", MetaType::Int64),
    ("_valid_to_lsn", MetaType::Int64),
    ("_is_current", MetaType::Bool),
    ("_op", MetaType::Text),
    ("_context", MetaType::Text),
];

const SNAPSHOT_META: &[(&str, MetaType)] = &[];

/// scd2's `_op` of a version whose values the archive does not know (a span between DDL
/// that rewrote the table and its read again).
const UNKNOWN_OP: &str = "unknown";

/// An export layout's rows as the replay moves through a table: `cdf` writes each change's
/// images, `scd2` each row version as it closes (and the versions open at the end as the
/// current state), `snapshot` the versions open at the end. Only what happens after `from`
/// (the previous run's position) is written; before it, the replay only builds the state.
struct LayoutRows<'t, 'f, 'd> {
    open: OpenRows<'t>,
    layout: Layout,
    from: Lsn,
    partition: String,
    cdf_stem: String,
    closed_stem: String,
    closed_dir: String,
    /// The cdf partition of the latest commit day, formatted once per day.
    cdf_dir: (i64, String),
    buffers: Buffers<'t>,
    files: &'f mut PartitionedFiles<'d>,
}

impl LayoutRows<'_, '_, '_> {
    /// Write a cdf row of a change committed at `at_us` (its commit day's partition).
    fn cdf(
        &mut self,
        at_us: i64,
        image: (&RelationVersion, &Row),
        meta: &[MetaValue],
    ) -> Result<(), ExportError> {
        let day = at_us.div_euclid(DAY_US);
        if day != self.cdf_dir.0 {
            self.cdf_dir = (day, format!("{}/date={}", self.partition, date_of(at_us)));
        }
        self.buffers.push(
            self.files,
            &self.cdf_dir.1,
            &self.cdf_stem,
            Some(image),
            meta,
        )
    }

    /// Write scd2's closed version `old`, ended by the change at `to` committed at `to_us`.
    fn close(&mut self, old: &OpenVersion, to: Lsn, to_us: i64) -> Result<(), ExportError> {
        if self.layout != Layout::Scd2 || to <= self.from {
            return Ok(());
        }
        let meta = [
            MetaValue::Timestamp(Some(old.from_us)),
            MetaValue::Timestamp(Some(to_us)),
            MetaValue::Int64(Some(old.from.commit_lsn.0 as i64)),
            MetaValue::Int64(Some(to.0 as i64)),
            MetaValue::Bool(false),
            MetaValue::Text(Some(old.op.as_str())),
            MetaValue::Text(old.context.as_deref()),
        ];
        self.buffers.push(
            self.files,
            &self.closed_dir,
            &self.closed_stem,
            Some((old.version, &old.row)),
            &meta,
        )
    }

    /// Write scd2's version of unknown values for `old`'s row over the span `from` .. `to`
    /// the archive cannot answer (see `restart`).
    fn close_unknown(
        &mut self,
        old: &OpenVersion,
        from: (Lsn, i64),
        to: (Lsn, i64),
    ) -> Result<(), ExportError> {
        if self.layout != Layout::Scd2 || to.0 <= self.from {
            return Ok(());
        }
        let row = unknown_values(old.version, &old.row);
        let meta = [
            MetaValue::Timestamp(Some(from.1)),
            MetaValue::Timestamp(Some(to.1)),
            MetaValue::Int64(Some(from.0.0 as i64)),
            MetaValue::Int64(Some(to.0.0 as i64)),
            MetaValue::Bool(false),
            MetaValue::Text(Some(UNKNOWN_OP)),
            MetaValue::Text(None),
        ];
        self.buffers.push(
            self.files,
            &self.closed_dir,
            &self.closed_stem,
            Some((old.version, &row)),
            &meta,
        )
    }

    /// End scd2's version `old` where the span from `unknown_from` the archive cannot answer
    /// begins (or where `old` began, if later): its values are known up to there only.
    /// Returns where the span begins for it.
    fn close_before_span(
        &mut self,
        old: &OpenVersion,
        unknown_from: (Lsn, i64),
    ) -> Result<(Lsn, i64), ExportError> {
        if old.from.commit_lsn >= unknown_from.0 {
            // Written inside the span: not known to hold for any time (the DDL may have come
            // after it); no version of zero length is written.
            return Ok((old.from.commit_lsn, old.from_us));
        }
        self.close(old, unknown_from.0, unknown_from.1)?;
        Ok(unknown_from)
    }

    /// Whether cdf writes the change at `key` (a cdf export, and after the previous run).
    fn cdf_writes(&self, key: ChangeKey) -> bool {
        self.layout == Layout::Cdf && key.commit_lsn > self.from
    }
}

fn cdf_meta<'m>(
    change_type: &'static str,
    key: ChangeKey,
    rec: &'m ChangeRecord,
) -> [MetaValue<'m>; 6] {
    [
        MetaValue::Text(Some(change_type)),
        MetaValue::Int64(Some(key.commit_lsn.0 as i64)),
        MetaValue::Int64(Some(i64::from(key.seq))),
        MetaValue::Timestamp(Some(rec.committed_at_us)),
        MetaValue::Int64(Some(i64::from(rec.xid))),
        MetaValue::Text(rec.context.as_deref()),
    ]
}

impl RowSet for LayoutRows<'_, '_, '_> {
    type Error = ExportError;

    /// A snapshot holds the whole state (after a gap, rows it lacks were deleted unseen):
    /// every version open before it ends at it, as deletes (cdf) or closings (scd2). A read
    /// of the table again after DDL rewrote it says from when its rows were not known: scd2
    /// ends each version there and covers the span with a version of unknown values (the key
    /// kept, every other column in `_unknown_columns`, `_op` = `unknown`), rather than
    /// stretching the old values over a time they may not have held.
    fn restart(&mut self, at: SnapshotPoint) -> Result<(), ExportError> {
        for old in self.open.take_all() {
            if let Some(unknown_from) = at.unknown_from
                && self.layout == Layout::Scd2
            {
                let span = self.close_before_span(&old, unknown_from)?;
                self.close_unknown(&old, span, (at.lsn, at.committed_at_us))?;
                continue;
            }
            if self.layout == Layout::Cdf && at.lsn > self.from {
                let meta = [
                    MetaValue::Text(Some("delete")),
                    MetaValue::Int64(Some(at.lsn.0 as i64)),
                    MetaValue::Int64(Some(0)),
                    MetaValue::Timestamp(Some(at.committed_at_us)),
                    MetaValue::Int64(Some(0)),
                    MetaValue::Text(None),
                ];
                self.cdf(at.committed_at_us, (old.version, &old.row), &meta)?;
            }
            self.close(&old, at.lsn, at.committed_at_us)?;
        }
        Ok(())
    }
}

impl<'t, 'r> ApplyChange<&'r Row, RowChange<'t, 'r>> for LayoutRows<'t, '_, '_> {
    fn begin(&mut self, after: &'r Row, c: &RowChange<'t, 'r>) -> Result<(), ExportError> {
        for old in self.open.put(c.key_positions(), c.open(after)) {
            self.close(&old, c.key.commit_lsn, c.rec.committed_at_us)?;
        }
        if self.cdf_writes(c.key) {
            let change_type = if c.rec.op == Op::Update {
                "update_postimage"
            } else {
                "insert"
            };
            let meta = cdf_meta(change_type, c.key, c.rec);
            self.cdf(c.rec.committed_at_us, (c.version, after), &meta)?;
        }
        Ok(())
    }

    fn end(&mut self, before: &'r Row, c: &RowChange<'t, 'r>) -> Result<(), ExportError> {
        let old = self.open.take(c.key_positions(), before);
        if self.cdf_writes(c.key) {
            let change_type = if c.rec.op == Op::Update {
                "update_preimage"
            } else {
                "delete"
            };
            // The image of the version it ends where the replay holds it (a key-only old
            // image shows less).
            let image = old
                .as_ref()
                .map_or((c.version, before), |o| (o.version, &o.row));
            let meta = cdf_meta(change_type, c.key, c.rec);
            self.cdf(c.rec.committed_at_us, image, &meta)?;
        }
        if let Some(old) = old {
            self.close(&old, c.key.commit_lsn, c.rec.committed_at_us)?;
        }
        Ok(())
    }

    /// A TRUNCATE deletes every row of the relation: each gets its delete image (cdf) or its
    /// closing (scd2).
    fn truncate(&mut self, relation_id: u32, c: &RowChange<'t, 'r>) -> Result<(), ExportError> {
        for old in self.open.take_relation(relation_id) {
            if self.cdf_writes(c.key) {
                let meta = cdf_meta("delete", c.key, c.rec);
                self.cdf(c.rec.committed_at_us, (old.version, &old.row), &meta)?;
            }
            self.close(&old, c.key.commit_lsn, c.rec.committed_at_us)?;
        }
        Ok(())
    }
}

impl From<ExportError> for datafusion::error::DataFusionError {
    fn from(e: ExportError) -> Self {
        match e {
            ExportError::DataFusion(e) => e,
            e => datafusion::error::DataFusionError::External(Box::new(e)),
        }
    }
}

/// Replay the table's history up to `until` (the replay rules are `crate::replay`'s), and
/// write the `cdf`, `scd2` or `snapshot` rows of the changes after `from`.
fn replay(
    archive: &ArchiveSnapshot,
    table: &TableHistory,
    from: Lsn,
    until: Lsn,
    layout: Layout,
    files: &mut PartitionedFiles,
) -> Result<(), ExportError> {
    let partition = table_partition(table);
    let range = format!("{}-{}", lsn_name(from), lsn_name(until));
    let mut rows = LayoutRows {
        open: OpenRows::default(),
        layout,
        from,
        cdf_stem: format!("cdf-{range}"),
        closed_stem: format!("scd2-{range}"),
        closed_dir: format!("{partition}/state=closed"),
        cdf_dir: (i64::MIN, String::new()),
        buffers: Buffers {
            columns: lake_columns(versions_until(table, until), layout),
            // The versions up to `until` only: a column's type is the one they agree on (a
            // later `ALTER ... TYPE` would make it text here, unlike the run's schema).
            versions: versions_until(table, until),
            meta: layout_meta(layout),
            open: Vec::new(),
        },
        partition,
        files,
    };
    replay_rows(archive, table, Moment::Lsn(until), &mut rows).map_err(ExportError::DataFusion)?;

    // `until` inside a span the archive cannot answer (the table was rewritten and is not
    // read again yet): what the open rows hold at `until` is unknown. scd2 ends each version
    // where the span begins; its current version, and the snapshot's row, has unknown values.
    let span = unknown_span(archive, table, Moment::Lsn(until)).map(|span| span.from);
    match layout {
        Layout::Scd2 => {
            let dir = format!("{}/state=current", rows.partition);
            let stem = format!("scd2-{}", lsn_name(until));
            for v in rows.open.take_all() {
                let (row, from, op, context) = match span {
                    Some(unknown_from) => (
                        Cow::Owned(unknown_values(v.version, &v.row)),
                        rows.close_before_span(&v, unknown_from)?,
                        UNKNOWN_OP,
                        None,
                    ),
                    None => (
                        Cow::Borrowed(&v.row),
                        (v.from.commit_lsn, v.from_us),
                        v.op.as_str(),
                        v.context.as_deref(),
                    ),
                };
                let meta = [
                    MetaValue::Timestamp(Some(from.1)),
                    MetaValue::Timestamp(None),
                    MetaValue::Int64(Some(from.0.0 as i64)),
                    MetaValue::Int64(None),
                    MetaValue::Bool(true),
                    MetaValue::Text(Some(op)),
                    MetaValue::Text(context),
                ];
                rows.buffers
                    .push(rows.files, &dir, &stem, Some((v.version, &row)), &meta)?;
            }
        }
        Layout::Snapshot => {
            let dir = format!("{}/snapshot_lsn={}", rows.partition, lsn_partition(until));
            for v in rows.open.versions() {
                let row = match span {
                    Some(_) => Cow::Owned(unknown_values(v.version, &v.row)),
                    None => Cow::Borrowed(&v.row),
                };
                rows.buffers
                    .push(rows.files, &dir, "snapshot", Some((v.version, &row)), &[])?;
            }
        }
        _ => {}
    }
    rows.buffers.flush(rows.files)
}
