//! The archive's own tables that are computed from its cut when a query scans them
//! (`pgtrail.schema_versions`, `pgtrail.unknown_spans`): small, built whole, scanned from
//! memory.

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::{MemTable, Session, TableProvider};
use datafusion::datasource::TableType;
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::Expr;
use datafusion::physical_plan::ExecutionPlan;

use crate::archive::ArchiveSnapshot;

/// Builds a view's rows from the archive (with the view's schema).
type Rows = fn(&ArchiveSnapshot, SchemaRef) -> Result<RecordBatch>;

pub(crate) struct ArchiveView {
    name: &'static str,
    archive: Arc<ArchiveSnapshot>,
    schema: SchemaRef,
    rows: Rows,
}

impl ArchiveView {
    pub(crate) fn new(
        name: &'static str,
        archive: Arc<ArchiveSnapshot>,
        schema: SchemaRef,
        rows: Rows,
    ) -> ArchiveView {
        ArchiveView {
            name,
            archive,
            schema,
            rows,
        }
    }
}

impl std::fmt::Debug for ArchiveView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ArchiveView({})", self.name)
    }
}

#[async_trait]
impl TableProvider for ArchiveView {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::View
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        // Building the rows may read a segment: off the async runtime.
        let (archive, schema, rows) = (self.archive.clone(), self.schema.clone(), self.rows);
        let batch = tokio::task::spawn_blocking(move || rows(&archive, schema))
            .await
            .map_err(|e| DataFusionError::External(Box::new(e)))??;
        MemTable::try_new(self.schema.clone(), vec![vec![batch]])?
            .scan(state, projection, filters, limit)
            .await
    }
}
