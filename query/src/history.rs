//! Per-table history tables: segments (read on blocking threads, checked against their
//! SHA-256) plus the log tail, adapted to one merged schema, with filters on `lsn` and
//! `committed_at` pruning segments through the manifest before any file is opened.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::ScalarValue;
use datafusion::datasource::TableType;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::TaskContext;
use datafusion::logical_expr::{BinaryExpr, Expr, Operator, TableProviderFilterPushDown};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::PartitionStream;
use datafusion::physical_plan::{ExecutionPlan, SendableRecordBatchStream};
use pgtrail_store::segment::{SegmentContent, SegmentReader, records_to_batch};
use pgtrail_store::{ChangeKey, ChangeRecord, SegmentEntry};

use crate::archive::{ArchiveSnapshot, TableHistory};
use crate::merge::{adapt, history_schema};
use crate::scan::{HistoryScanExec, HistorySource, SegmentSource};

/// Bounds on `lsn` (commit LSN) and `committed_at` (µs) implied by a query's filters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bounds {
    pub lsn: (u64, u64),
    pub time: (i64, i64),
}

impl Default for Bounds {
    fn default() -> Self {
        Bounds {
            lsn: (0, u64::MAX),
            time: (i64::MIN, i64::MAX),
        }
    }
}

impl Bounds {
    pub fn from_filters(filters: &[Expr]) -> Bounds {
        let mut b = Bounds::default();
        for f in filters {
            b.narrow(f);
        }
        b
    }

    fn narrow(&mut self, e: &Expr) {
        match e {
            Expr::BinaryExpr(BinaryExpr {
                left,
                op: Operator::And,
                right,
            }) => {
                self.narrow(left);
                self.narrow(right);
            }
            Expr::BinaryExpr(BinaryExpr { left, op, right }) => {
                let (column, op, value) = match (column_name(left), column_name(right)) {
                    (Some(c), None) => (c, *op, constant(right)),
                    (None, Some(c)) => match op.swap() {
                        Some(op) => (c, op, constant(left)),
                        None => return,
                    },
                    _ => return,
                };
                let Some(value) = value else { return };
                match column.as_str() {
                    "lsn" => {
                        if let Some(v) = as_u64(&value) {
                            let (lo, hi) =
                                narrow_range((self.lsn.0.into(), self.lsn.1.into()), op, v.into());
                            self.lsn = (
                                lo.clamp(0, u64::MAX.into()) as u64,
                                hi.clamp(0, u64::MAX.into()) as u64,
                            );
                        }
                    }
                    "committed_at" => {
                        if let Some(v) = as_micros(&value) {
                            let (lo, hi) = narrow_range(
                                (self.time.0.into(), self.time.1.into()),
                                op,
                                v.into(),
                            );
                            let clamp = |x: i128| x.clamp(i64::MIN.into(), i64::MAX.into()) as i64;
                            self.time = (clamp(lo), clamp(hi));
                        }
                    }
                    _ => {}
                }
            }
            Expr::Between(between) if !between.negated => {
                for (op, bound) in [
                    (Operator::GtEq, &between.low),
                    (Operator::LtEq, &between.high),
                ] {
                    self.narrow(&Expr::BinaryExpr(BinaryExpr::new(
                        between.expr.clone(),
                        op,
                        bound.clone(),
                    )));
                }
            }
            _ => {}
        }
    }

    pub fn overlaps(&self, seg: &SegmentEntry) -> bool {
        seg.max_key.commit_lsn.0 >= self.lsn.0
            && seg.min_key.commit_lsn.0 <= self.lsn.1
            && seg.max_committed_at_us >= self.time.0
            && seg.min_committed_at_us <= self.time.1
    }

    pub fn contains(&self, key: ChangeKey, committed_at_us: i64) -> bool {
        (self.lsn.0..=self.lsn.1).contains(&key.commit_lsn.0)
            && (self.time.0..=self.time.1).contains(&committed_at_us)
    }
}

/// Narrow an inclusive range by `column op v`; i128 holds both u64 LSNs and i64 times.
fn narrow_range(range: (i128, i128), op: Operator, v: i128) -> (i128, i128) {
    match op {
        Operator::Eq => (range.0.max(v), range.1.min(v)),
        Operator::Gt => (range.0.max(v + 1), range.1),
        Operator::GtEq => (range.0.max(v), range.1),
        Operator::Lt => (range.0, range.1.min(v - 1)),
        Operator::LtEq => (range.0, range.1.min(v)),
        _ => range,
    }
}

fn column_name(e: &Expr) -> Option<String> {
    match e {
        Expr::Column(c) => Some(c.name.clone()),
        Expr::Cast(c) => column_name(&c.expr),
        _ => None,
    }
}

/// The value of a constant expression (a literal, possibly cast).
pub fn constant(e: &Expr) -> Option<ScalarValue> {
    match e {
        Expr::Literal(v, _) => Some(v.clone()),
        Expr::Cast(c) => constant(&c.expr)?.cast_to(c.field.data_type()).ok(),
        Expr::TryCast(c) => constant(&c.expr)?.cast_to(c.field.data_type()).ok(),
        _ => None,
    }
}

fn as_u64(v: &ScalarValue) -> Option<u64> {
    match v {
        ScalarValue::UInt64(Some(v)) => Some(*v),
        ScalarValue::Int64(Some(v)) => u64::try_from(*v).ok(),
        ScalarValue::UInt32(Some(v)) => Some(u64::from(*v)),
        ScalarValue::Int32(Some(v)) => u64::try_from(*v).ok(),
        _ => None,
    }
}

/// Microseconds since the Unix epoch of a timestamp value.
pub fn as_micros(v: &ScalarValue) -> Option<i64> {
    match v {
        ScalarValue::TimestampMicrosecond(Some(v), _) => Some(*v),
        ScalarValue::TimestampNanosecond(Some(v), _) => Some(v.div_euclid(1000)),
        ScalarValue::TimestampMillisecond(Some(v), _) => v.checked_mul(1000),
        ScalarValue::TimestampSecond(Some(v), _) => v.checked_mul(1_000_000),
        _ => None,
    }
}

/// One table's history as a DataFusion table.
pub struct HistoryTable {
    archive: Arc<ArchiveSnapshot>,
    table: String,
    schema: SchemaRef,
}

impl fmt::Debug for HistoryTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HistoryTable({})", self.table)
    }
}

impl HistoryTable {
    pub fn new(archive: Arc<ArchiveSnapshot>, table: &TableHistory) -> HistoryTable {
        HistoryTable {
            schema: history_schema(&table.versions),
            table: table.qualified_name(),
            archive,
        }
    }

    fn history(&self) -> Result<&TableHistory> {
        self.archive
            .tables
            .get(&self.table)
            .ok_or_else(|| DataFusionError::Internal(format!("table {} vanished", self.table)))
    }
}

#[async_trait]
impl TableProvider for HistoryTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        // Filters are used to skip whole segments; DataFusion still applies them to the rows.
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let history = self.history()?;
        let bounds = Bounds::from_filters(filters);
        let schema = match projection {
            Some(p) => Arc::new(self.schema.project(p)?),
            None => self.schema.clone(),
        };
        // Only the columns the query uses are read from the files; the scan narrows them
        // further to single fields of a row image when the query uses no more than those.
        let segments: Vec<SegmentSource> = history
            .segments
            .iter()
            .filter(|s| bounds.overlaps(s))
            .filter_map(|seg| match &seg.content {
                SegmentContent::Table(version) => Some(SegmentSource {
                    path: self.archive.segment_path(seg),
                    sha256: seg.sha256.clone(),
                    version: version.clone(),
                }),
                SegmentContent::Messages => None,
            })
            .collect();
        let tail: Vec<(ChangeKey, ChangeRecord)> = history
            .tail
            .iter()
            .filter(|(k, r)| bounds.contains(*k, r.committed_at_us))
            .cloned()
            .collect();
        let tail = tail_batches(history, &tail, &self.schema)?;
        let source = HistorySource {
            history: self.schema.clone(),
            segments,
            bounds,
            tail,
            limit,
        };
        Ok(Arc::new(HistoryScanExec::new(Arc::new(source), schema)))
    }
}

/// Log-tail records as batches of the history schema, one per schema version in key order.
pub fn tail_batches(
    table: &TableHistory,
    tail: &[(ChangeKey, ChangeRecord)],
    schema: &SchemaRef,
) -> Result<Vec<RecordBatch>> {
    let mut batches = Vec::new();
    for run in tail.chunk_by(|(_, a), (_, b)| {
        a.relation_id == b.relation_id && a.schema_version == b.schema_version
    }) {
        let first = &run[0].1;
        let version = table.version(first.relation_id, first.schema_version)?;
        let content = SegmentContent::Table(version.clone());
        let batch =
            records_to_batch(&content, run).map_err(|e| DataFusionError::External(Box::new(e)))?;
        batches.push(adapt(&batch, version, schema)?);
    }
    Ok(batches)
}

/// Batches a segment's decoder thread may hold ready ahead of the pass consuming them.
pub(crate) const READ_AHEAD_BATCHES: usize = 4;

/// Segments per table already verified against the manifest in this process.
fn verified() -> &'static std::sync::Mutex<BTreeMap<std::path::PathBuf, String>> {
    static VERIFIED: std::sync::OnceLock<std::sync::Mutex<BTreeMap<std::path::PathBuf, String>>> =
        std::sync::OnceLock::new();
    VERIFIED.get_or_init(Default::default)
}

/// Open a segment, checking its SHA-256 the first time this process reads it.
pub fn open_segment(
    path: &std::path::Path,
    sha256: &str,
    batch_rows: usize,
) -> Result<SegmentReader> {
    open_segment_pruned(path, sha256, batch_rows, Bounds::default())
}

/// [`open_segment`], reading only row groups whose statistics overlap `bounds`.
pub fn open_segment_pruned(
    path: &std::path::Path,
    sha256: &str,
    batch_rows: usize,
    bounds: Bounds,
) -> Result<SegmentReader> {
    open_segment_projected(path, sha256, batch_rows, bounds, None)
}

/// [`open_segment_pruned`], decoding only the columns under `columns` (see
/// [`SegmentReader::open_selected`]).
pub fn open_segment_projected(
    path: &std::path::Path,
    sha256: &str,
    batch_rows: usize,
    bounds: Bounds,
    columns: Option<&[Vec<String>]>,
) -> Result<SegmentReader> {
    open_segment_selected(path, sha256, batch_rows, bounds, columns, None)
}

/// [`open_segment_projected`], decoding only the rows at `rows` (see
/// [`SegmentReader::open_selected`]).
pub fn open_segment_selected(
    path: &std::path::Path,
    sha256: &str,
    batch_rows: usize,
    bounds: Bounds,
    columns: Option<&[Vec<String>]>,
    rows: Option<&[usize]>,
) -> Result<SegmentReader> {
    let known = verified()
        .lock()
        .ok()
        .and_then(|m| m.get(path).cloned())
        .is_some_and(|s| s == sha256);
    let reader = SegmentReader::open_selected(
        path,
        (!known).then_some(sha256),
        batch_rows,
        bounds.lsn,
        bounds.time,
        columns,
        rows,
    )
    .map_err(|e| DataFusionError::External(Box::new(e)))?;
    if !known && let Ok(mut m) = verified().lock() {
        m.insert(path.to_path_buf(), sha256.to_string());
    }
    Ok(reader)
}

/// Batches already in memory (a table's log tail) as a partition.
#[derive(Debug)]
pub(crate) struct TailPartition {
    pub(crate) batches: Vec<RecordBatch>,
    pub(crate) schema: SchemaRef,
}

impl PartitionStream for TailPartition {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let batches: Vec<Result<RecordBatch>> = self.batches.iter().cloned().map(Ok).collect();
        Box::pin(RecordBatchStreamAdapter::new(
            self.schema.clone(),
            futures_util::stream::iter(batches),
        ))
    }
}
