//! Per-table history tables: segments (read on blocking threads, checked against their
//! SHA-256) plus the log tail, adapted to one merged schema, with filters on `lsn` and
//! `committed_at` pruning segments through the manifest before any file is opened.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::{Session, TableProvider};
use datafusion::datasource::TableType;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::TaskContext;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::PartitionStream;
use datafusion::physical_plan::{ExecutionPlan, SendableRecordBatchStream};
use pgtrail_store::segment::SegmentContent;
use pgtrail_store::{ChangeKey, ChangeRecord};

use crate::archive::{ArchiveSnapshot, TableHistory};
use crate::json::JsonColumns;
use crate::merge::history_schema;
use crate::read::{Bounds, tail_batches};
use crate::scan::{HistoryScanExec, HistorySource, SegmentSource};

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
            // JSON columns marked: the adaptation of every batch to this schema carries the
            // mark into the row images.
            schema: JsonColumns::of(&table.versions).schema(&history_schema(&table.versions), true),
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
        state: &dyn Session,
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
            readers: state.config().target_partitions(),
        };
        Ok(Arc::new(HistoryScanExec::new(Arc::new(source), schema)))
    }
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
