//! The physical scan of one table's history: one partition per segment (decoded on a blocking
//! thread) and one for the log tail, producing exactly the columns a query uses.
//!
//! A query that uses a field of a row image (`after.id`, `before.note`) reaches the scan as a
//! projection of `get_field(after, 'id')` right above it. The scan takes that projection in
//! ([`ExecutionPlan::try_swapping_with_projection`]) and decodes only that field's Parquet
//! leaf, instead of every column of the row image: what a columnar engine reading the same
//! files does. The field comes out exactly as `get_field` would give it: the history's type
//! for the column, null where the image is absent.

use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, RecordBatch, RecordBatchOptions, make_array, new_null_array,
};
use datafusion::arrow::array::{BooleanArray, TimestampMicrosecondArray, UInt64Array};
use datafusion::arrow::buffer::NullBuffer;
use datafusion::arrow::compute::{cast, filter_record_batch};
use datafusion::arrow::datatypes::{DataType, Field, FieldRef, Schema, SchemaRef};
use datafusion::common::ScalarValue;
use datafusion::common::config::ConfigOptions;
use datafusion::common::pruning::PruningStatistics;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::TaskContext;
use datafusion::physical_expr::expressions::{Column, Literal};
use datafusion::physical_expr::{
    EquivalenceProperties, Partitioning, PhysicalExpr, PhysicalSortExpr, ScalarFunctionExpr,
};
use datafusion::physical_expr_common::physical_expr::snapshot_generation;
use datafusion::physical_optimizer::pruning::{PruningPredicate, PruningPredicateBuilder};
use datafusion::physical_plan::execution_plan::{
    Boundedness, ChildrenPropertiesMode, EmissionType, ReplaceChildrenOptions,
};
use datafusion::physical_plan::filter_pushdown::{
    ChildPushdownResult, FilterPushdownPhase, FilterPushdownPropagation, PushedDown,
};
use datafusion::physical_plan::metrics::{ExecutionPlanMetricsSet, MetricBuilder, MetricsSet};
use datafusion::physical_plan::projection::{ProjectionExec, ProjectionExpr};
use datafusion::physical_plan::stream::{
    RecordBatchReceiverStreamBuilder, RecordBatchStreamAdapter,
};
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties, SendableRecordBatchStream,
    SortOrderPushdownResult,
};
use pgtrail_store::RelationVersion;
use pgtrail_store::segment::{RowGroupRange, SegmentReader};

use crate::merge::{adapt_column, adapt_image_column};
use crate::read::{
    Bounds, open_segment_projected, open_segment_row_span, segment_row_groups, segment_row_spans,
};

/// One output column of a history scan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum ScanColumn {
    /// A column of the history schema as it is (`lsn`, `op`, a whole `after` image, ...).
    Stored(String),
    /// One column of a row image (`after.id`): only its leaf of each segment is decoded.
    ImageField { image: String, field: String },
}

impl ScanColumn {
    /// The column's path in a segment file, as [`open_segment_projected`] takes it.
    fn path(&self) -> Vec<String> {
        match self {
            ScanColumn::Stored(name) => vec![name.clone()],
            ScanColumn::ImageField { image, field } => vec![image.clone(), field.clone()],
        }
    }
}

impl fmt::Display for ScanColumn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScanColumn::Stored(name) => f.write_str(name),
            ScanColumn::ImageField { image, field } => write!(f, "{image}.{field}"),
        }
    }
}

/// A segment of the table, with the schema version its rows were written under.
#[derive(Clone, Debug)]
pub(crate) struct SegmentSource {
    pub path: PathBuf,
    pub sha256: String,
    pub version: RelationVersion,
}

/// What a history scan reads, whichever columns it produces.
#[derive(Debug)]
pub(crate) struct HistorySource {
    /// The table's whole history schema (every type a column can come out in).
    pub history: SchemaRef,
    pub segments: Vec<SegmentSource>,
    pub bounds: Bounds,
    /// The log tail's changes in the query's cut, in the history schema.
    pub tail: Vec<RecordBatch>,
    /// At most this many rows per partition (a hint: the plan above still applies its limit).
    pub limit: Option<usize>,
    /// How many partitions read the segments (the session's target partitions, usually the
    /// machine's cores), each a share of them in turn.
    pub readers: usize,
}

impl HistorySource {
    /// How many partitions read segments (the tail's is one more, after them).
    fn segment_partitions(&self) -> usize {
        self.segments.len().min(self.readers.max(1))
    }
}

/// The order a scan with a `ORDER BY ... LIMIT` above it (a dynamic filter among `prune_by`)
/// reads each segment's row groups in, so that the limit's first rows come from the first
/// row groups read and its filter rules out the rest. Row groups are in `(lsn, seq)` order,
/// and commit times follow it closely.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum ReadOrder {
    /// Newest first: the questions asked most (the latest changes, the latest matches), and
    /// what a limit whose order the scan was not told gets.
    #[default]
    NewestFirst,
    /// Oldest first: an ascending `ORDER BY lsn` (or `committed_at`) the sort pushed down.
    OldestFirst,
}

/// Scan of one table's history: segments, then the log tail, as partitions.
#[derive(Clone, Debug)]
pub(crate) struct HistoryScanExec {
    source: Arc<HistorySource>,
    /// The columns read: the output's, then any only the taken-over filters use.
    columns: Vec<ScanColumn>,
    /// `columns`, named as the plan above expects (the filters' own after the output's).
    schema: SchemaRef,
    /// How many of `columns` leave the scan.
    outputs: usize,
    properties: Arc<PlanProperties>,
    /// Filters of the plan above on this scan's output (a `ORDER BY ... LIMIT`'s dynamic
    /// filter among them), used only to skip row groups whose `lsn` and `committed_at`
    /// statistics rule them out; the plan above still applies them to every row.
    prune_by: Vec<Arc<dyn PhysicalExpr>>,
    /// Filters taken over from the plan above (a `WHERE` on the table): only rows they accept
    /// leave the scan, so a `LIMIT` above sees matches as soon as they are read.
    filters: Vec<Arc<dyn PhysicalExpr>>,
    /// The order row groups are read in while `prune_by` holds a filter.
    order: ReadOrder,
    /// Which segments, in that order, have had their first row group read (see [`ReadTurns`]).
    turns: Arc<ReadTurns>,
    metrics: ExecutionPlanMetricsSet,
}

impl HistoryScanExec {
    /// A scan producing the history's columns in `schema` (a projection of the history's).
    pub(crate) fn new(source: Arc<HistorySource>, schema: SchemaRef) -> HistoryScanExec {
        let columns = schema
            .fields()
            .iter()
            .map(|f| ScanColumn::Stored(f.name().clone()))
            .collect();
        HistoryScanExec::with_columns(source, columns, schema)
    }

    fn with_columns(
        source: Arc<HistorySource>,
        columns: Vec<ScanColumn>,
        schema: SchemaRef,
    ) -> HistoryScanExec {
        let outputs = columns.len();
        HistoryScanExec::with_read_columns(source, columns, schema, outputs)
    }

    /// A scan reading `columns` (as `schema` names them) of which the first `outputs` leave it.
    fn with_read_columns(
        source: Arc<HistorySource>,
        columns: Vec<ScanColumn>,
        schema: SchemaRef,
        outputs: usize,
    ) -> HistoryScanExec {
        let output = Arc::new(Schema::new_with_metadata(
            schema.fields()[..outputs].to_vec(),
            schema.metadata().clone(),
        ));
        let properties = PlanProperties::new(
            EquivalenceProperties::new(output),
            Partitioning::UnknownPartitioning(source.segment_partitions() + 1),
            EmissionType::Incremental,
            Boundedness::Bounded,
        );
        let turns = Arc::new(ReadTurns::new(source.segments.len()));
        HistoryScanExec {
            source,
            columns,
            schema,
            outputs,
            properties: Arc::new(properties),
            prune_by: Vec::new(),
            filters: Vec::new(),
            order: ReadOrder::default(),
            turns,
            metrics: ExecutionPlanMetricsSet::new(),
        }
    }

    /// This scan with `prune_by` and `filters` as given.
    fn with_filters(
        &self,
        prune_by: Vec<Arc<dyn PhysicalExpr>>,
        filters: Vec<Arc<dyn PhysicalExpr>>,
    ) -> HistoryScanExec {
        let mut scan = HistoryScanExec::with_read_columns(
            self.source.clone(),
            self.columns.clone(),
            self.schema.clone(),
            self.outputs,
        );
        scan.prune_by = prune_by;
        scan.filters = filters;
        scan.order = self.order;
        scan
    }

    /// This scan reading row groups in `order` (a new plan node: metrics of its own).
    fn with_order(&self, order: ReadOrder) -> HistoryScanExec {
        let mut scan = self.with_filters(self.prune_by.clone(), self.filters.clone());
        scan.order = order;
        scan
    }

    /// The type `column` comes out in (`None` if the history has no such column).
    fn column_type(&self, column: &ScanColumn) -> Option<DataType> {
        match column {
            ScanColumn::Stored(name) => self
                .source
                .history
                .field_with_name(name)
                .ok()
                .map(|f| f.data_type().clone()),
            ScanColumn::ImageField { image, field } => {
                match self.source.history.field_with_name(image).ok()?.data_type() {
                    DataType::Struct(fields) => {
                        fields.find(field).map(|(_, f)| f.data_type().clone())
                    }
                    _ => None,
                }
            }
        }
    }

    /// `get_field(image, 'name')` over one of this scan's whole row images, as a scan column.
    fn field_access(&self, expr: &Arc<dyn PhysicalExpr>) -> Option<ScanColumn> {
        let function = expr.downcast_ref::<ScalarFunctionExpr>()?;
        let [base, name] = function.args() else {
            return None;
        };
        if function.name() != "get_field" {
            return None;
        }
        let ScanColumn::Stored(image) = self.columns.get(base.downcast_ref::<Column>()?.index())?
        else {
            return None;
        };
        if image != "before" && image != "after" {
            return None;
        }
        let field = match name.downcast_ref::<Literal>()?.value() {
            ScalarValue::Utf8(Some(s))
            | ScalarValue::LargeUtf8(Some(s))
            | ScalarValue::Utf8View(Some(s)) => s.clone(),
            _ => return None,
        };
        Some(ScanColumn::ImageField {
            image: image.clone(),
            field,
        })
    }
}

impl DisplayAs for HistoryScanExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let columns: Vec<String> = self.columns.iter().map(ToString::to_string).collect();
        write!(
            f,
            "HistoryScanExec: segments={}, columns=[{}]",
            self.source.segments.len(),
            columns.join(", ")
        )?;
        if let Some(limit) = self.source.limit {
            write!(f, ", limit={limit}")?;
        }
        if !self.filters.is_empty() {
            let filters: Vec<String> = self.filters.iter().map(|f| f.to_string()).collect();
            write!(f, ", filters=[{}]", filters.join(", "))?;
        }
        if !self.prune_by.is_empty() {
            let first = match self.order {
                ReadOrder::NewestFirst => "newest",
                ReadOrder::OldestFirst => "oldest",
            };
            write!(
                f,
                ", {first} row groups first, skipping by {} filters",
                self.prune_by.len()
            )?;
        }
        Ok(())
    }
}

impl ExecutionPlan for HistoryScanExec {
    fn name(&self) -> &str {
        "HistoryScanExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        Vec::new()
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn replace_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
        _: ReplaceChildrenOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        if children.is_empty() {
            Ok(self)
        } else {
            Err(DataFusionError::Internal(
                "a history scan has no children".into(),
            ))
        }
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        self.replace_children(
            children,
            ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute),
        )
    }

    fn fetch(&self) -> Option<usize> {
        self.source.limit
    }

    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }

    /// Take over the filters of the plan above while it is planned (a `WHERE` on the table:
    /// the scan applies them), and keep those pushed after the plan is otherwise final (a
    /// `ORDER BY ... LIMIT`'s dynamic filter) to skip row groups with, leaving them above.
    fn handle_child_pushdown_result(
        &self,
        phase: FilterPushdownPhase,
        child_pushdown_result: ChildPushdownResult,
        _config: &ConfigOptions,
    ) -> Result<FilterPushdownPropagation<Arc<dyn ExecutionPlan>>> {
        let filters: Vec<Arc<dyn PhysicalExpr>> = child_pushdown_result
            .parent_filters
            .iter()
            .map(|f| f.filter.clone())
            .collect();
        if filters.is_empty() {
            return Ok(FilterPushdownPropagation {
                filters: Vec::new(),
                updated_node: None,
            });
        }
        if phase == FilterPushdownPhase::Pre {
            let taken = vec![PushedDown::Yes; filters.len()];
            let mut all = self.filters.clone();
            all.extend(filters);
            return Ok(FilterPushdownPropagation {
                filters: taken,
                updated_node: Some(Arc::new(self.with_filters(self.prune_by.clone(), all))),
            });
        }
        let none_taken = vec![PushedDown::No; filters.len()];
        Ok(FilterPushdownPropagation {
            filters: none_taken,
            updated_node: Some(Arc::new(self.with_filters(filters, self.filters.clone()))),
        })
    }

    /// Take in a projection of this scan's columns and of fields of its row images, so that
    /// only the Parquet leaves the query uses are decoded. Anything else stays above.
    fn try_swapping_with_projection(
        &self,
        projection: &ProjectionExec,
    ) -> Result<Option<Arc<dyn ExecutionPlan>>> {
        let schema = projection.schema();
        let mut columns = Vec::with_capacity(projection.expr().len());
        for (i, e) in projection.expr().iter().enumerate() {
            let column = match e.expr.downcast_ref::<Column>() {
                Some(c) => self.columns.get(c.index()).cloned(),
                None => self.field_access(&e.expr),
            };
            // The scan gives the column in the type the projection promises, or not at all.
            match column {
                Some(c) if self.column_type(&c).as_ref() == Some(schema.field(i).data_type()) => {
                    columns.push(c)
                }
                _ => return Ok(None),
            }
        }
        // Filters taken over are rewritten onto the new columns; what they use that the
        // projection does not keep is read as extra columns, dropped after filtering.
        let outputs = columns.len();
        let mut fields: Vec<FieldRef> = schema.fields().iter().cloned().collect();
        let mut filters = Vec::with_capacity(self.filters.len());
        for filter in &self.filters {
            match self.through_projection(filter, projection.expr(), &mut columns, &mut fields) {
                Some(f) => filters.push(f),
                None => return Ok(None),
            }
        }
        let schema = Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone()));
        let mut scan =
            HistoryScanExec::with_read_columns(self.source.clone(), columns, schema, outputs);
        scan.filters = filters;
        scan.order = self.order;
        if !self.prune_by.is_empty() {
            // Pushed against the old columns; the pushdown after planning passes them again.
            return Ok(None);
        }
        Ok(Some(Arc::new(scan)))
    }

    /// Read row groups in the order a sort above asks for when it sorts by `lsn` or
    /// `committed_at` first: `Inexact`, as the sort above still orders every row (segments
    /// are read side by side), but a `LIMIT` with it stops after the first row groups.
    fn try_pushdown_sort(
        &self,
        order: &[PhysicalSortExpr],
    ) -> Result<SortOrderPushdownResult<Arc<dyn ExecutionPlan>>> {
        let by_position = order.first().and_then(|first| {
            let column = first.expr.downcast_ref::<Column>()?;
            let stored = self.columns[..self.outputs].get(column.index())?;
            matches!(stored, ScanColumn::Stored(name) if name == "lsn" || name == "committed_at")
                .then_some(first.options.descending)
        });
        let Some(descending) = by_position else {
            return Ok(SortOrderPushdownResult::Unsupported);
        };
        let order = if descending {
            ReadOrder::NewestFirst
        } else {
            ReadOrder::OldestFirst
        };
        Ok(SortOrderPushdownResult::Inexact {
            inner: Arc::new(self.with_order(order)),
        })
    }

    fn execute(
        &self,
        partition: usize,
        _context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let mut left = self.source.limit.unwrap_or(usize::MAX);
        let readers = self.source.segment_partitions();
        if partition > readers {
            return Err(DataFusionError::Internal(format!(
                "history scan has no partition {partition}"
            )));
        }
        if partition == readers {
            let mut batches = Vec::new();
            for batch in &self.source.tail {
                if left == 0 {
                    break;
                }
                batches.extend(self.output(batch, None, &mut left));
            }
            return Ok(Box::pin(RecordBatchStreamAdapter::new(
                ExecutionPlan::schema(self),
                futures_util::stream::iter(batches),
            )));
        }
        if !self.prune_by.is_empty() {
            let segments = self.segments_of(partition, self.order);
            return self.execute_ordered(segments, left, partition);
        }
        let segments = self.segments_of(partition, ReadOrder::OldestFirst);
        let mut builder = RecordBatchReceiverStreamBuilder::new(ExecutionPlan::schema(self), 2);
        let tx = builder.tx();
        let scan = self.clone();
        // Parquet decoding is blocking work: keep it off the async workers.
        builder.spawn_blocking(move || {
            let paths = scan.leaf_paths();
            let bounds = scan.source.bounds;
            for (_, segment) in segments {
                let (path, sha256) = (&segment.path, &segment.sha256);
                let reader = open_segment_projected(path, sha256, 8192, bounds, Some(&paths))?;
                if !scan.send_rows(reader, &segment.version, &mut left, &tx)? {
                    break;
                }
            }
            Ok(())
        });
        Ok(builder.build())
    }
}

impl HistoryScanExec {
    /// The segments partition `partition` reads, in the order it reads them: the table's
    /// segments in `order`, dealt out in turn to the partitions. With an `ORDER BY ... LIMIT`
    /// above, each partition starts at the newest segment not yet dealt out (when reading
    /// newest first), so the first row groups read across the partitions are the newest of
    /// all, and the limit's filter tightens before the older segments are opened. One
    /// partition per segment instead read every segment's newest row group at once, before
    /// the filter could rule any out (8 spans read where 2 held the answer, measured on the
    /// queries suite's archive).
    /// Each segment comes with its turn: its place in `order`, from 0.
    fn segments_of(&self, partition: usize, order: ReadOrder) -> Vec<(usize, SegmentSource)> {
        let (segments, readers) = (self.source.segments.len(), self.source.segment_partitions());
        dealt(segments, readers, partition, order)
            .into_iter()
            .map(|i| (order.turn_of(i, segments), self.source.segments[i].clone()))
            .collect()
    }

    /// Send what leaves the scan of `reader`'s batches (read under `version`) to `tx`, at most
    /// `left` rows (counted down). `false` when the scan is done: `left` reached 0, or the
    /// plan above stopped listening.
    fn send_rows(
        &self,
        reader: SegmentReader,
        version: &RelationVersion,
        left: &mut usize,
        tx: &tokio::sync::mpsc::Sender<Result<RecordBatch>>,
    ) -> Result<bool> {
        for batch in reader {
            if *left == 0 {
                return Ok(false);
            }
            let batch = batch.map_err(|e| DataFusionError::External(Box::new(e)))?;
            if let Some(out) = self.output(&batch, Some(version), left)
                && tx.blocking_send(out).is_err()
            {
                return Ok(false);
            }
        }
        Ok(*left > 0)
    }

    /// The Parquet paths of the columns read; with no column at all (`count(*)`), the
    /// smallest one, for the row counts.
    fn leaf_paths(&self) -> Vec<Vec<String>> {
        let mut paths: Vec<Vec<String>> = self.columns.iter().map(ScanColumn::path).collect();
        if paths.is_empty() {
            paths.push(vec!["seq".into()]);
        }
        paths
    }

    /// What leaves the scan of `batch` (read under `version`; `None`: a tail batch): its
    /// columns' rows that the filters accept, at most `left` (counted down), or `None` when
    /// no row does.
    fn output(
        &self,
        batch: &RecordBatch,
        version: Option<&RelationVersion>,
        left: &mut usize,
    ) -> Option<Result<RecordBatch>> {
        match project(
            batch,
            version,
            &self.source.history,
            &self.columns,
            &self.schema,
        )
        .and_then(|b| keep(b, &self.filters, left, self.outputs))
        {
            Ok(b) if b.num_rows() == 0 => None,
            out => Some(out),
        }
    }

    /// `filter`, written against this scan's columns, rewritten onto the scan that takes in
    /// `projection`: a part that is one of the projection's expressions becomes its column; a
    /// column of this scan, or a field of one of its row images, becomes a column of
    /// `columns` (added, with its field, when not there yet). `None` if a part cannot be.
    fn through_projection(
        &self,
        filter: &Arc<dyn PhysicalExpr>,
        projection: &[ProjectionExpr],
        columns: &mut Vec<ScanColumn>,
        fields: &mut Vec<FieldRef>,
    ) -> Option<Arc<dyn PhysicalExpr>> {
        let mut complete = true;
        let rewritten = filter
            .clone()
            .transform_down(|e| {
                if let Some(i) = projection
                    .iter()
                    .position(|p| p.expr.as_ref() == e.as_ref())
                {
                    let column: Arc<dyn PhysicalExpr> =
                        Arc::new(Column::new(&projection[i].alias, i));
                    return Ok(Transformed::new(column, true, TreeNodeRecursion::Jump));
                }
                let wanted = match e.downcast_ref::<Column>() {
                    Some(c) => self.columns.get(c.index()).cloned(),
                    None => self.field_access(&e),
                };
                let Some(wanted) = wanted else {
                    return Ok(Transformed::no(e));
                };
                let Some(data_type) = self.column_type(&wanted) else {
                    complete = false;
                    return Ok(Transformed::no(e));
                };
                let at = match columns.iter().position(|c| *c == wanted) {
                    Some(at) if fields[at].data_type() == &data_type => at,
                    _ => {
                        columns.push(wanted);
                        let name = format!("__pgtrail_filter_{}", columns.len() - 1);
                        fields.push(Arc::new(Field::new(name, data_type, true)));
                        columns.len() - 1
                    }
                };
                let column: Arc<dyn PhysicalExpr> = Arc::new(Column::new(fields[at].name(), at));
                Ok(Transformed::new(column, true, TreeNodeRecursion::Jump))
            })
            .ok()?
            .data;
        complete.then_some(rewritten)
    }

    /// `segments`' row groups in `self.order`, each read only if the filters above may accept
    /// a row of it: once a `ORDER BY committed_at DESC ... LIMIT n` holds n rows, its dynamic
    /// filter rules out every older row group, and the scan stops reading (an ascending order
    /// reads oldest first and rules out the newer ones). A row group is read a span of pages
    /// at a time in the same order, each span checked the same way by its pages' statistics:
    /// the newest few matches of a filter cost a span or two (20,000 rows each), not a whole
    /// row group (128 Ki rows) decoded for them.
    ///
    /// Under a `LIMIT` (a dynamic filter in `prune_by`), a partition also waits before reading
    /// each segment until the segments before it in that order have had their first row group
    /// read (at most [`TURN_PATIENCE`], see [`ReadTurns`]): otherwise the second partition
    /// reads the second-newest segment's newest spans while the first reads the newest
    /// segment's, before the sort above could take in a row and rule them out (2 row groups
    /// and 3-6 spans read where 1 row group and 2 spans held the answer, measured on the
    /// queries suite's archive; README, Performance).
    fn execute_ordered(
        &self,
        segments: Vec<(usize, SegmentSource)>,
        mut left: usize,
        partition: usize,
    ) -> Result<SendableRecordBatchStream> {
        let mut builder = RecordBatchReceiverStreamBuilder::new(ExecutionPlan::schema(self), 2);
        let tx = builder.tx();
        let counter = |name| MetricBuilder::new(&self.metrics).counter(name, partition);
        let (skipped, read) = (counter("row_groups_skipped"), counter("row_groups_read"));
        let (spans_skipped, spans_read) = (counter("spans_skipped"), counter("spans_read"));
        // The metrics set is shared by the clone.
        let scan = self.clone();
        let limited = self.prune_by.iter().any(|f| snapshot_generation(f) != 0);
        builder.spawn_blocking(move || {
            let paths = scan.leaf_paths();
            let bounds = scan.source.bounds;
            // However this partition ends (its rows sent, the plan above gone, an error), the
            // partitions waiting for its turns go on.
            let _turns = TurnsPassedOnDrop {
                turns: &scan.turns,
                mine: segments.iter().map(|(turn, _)| *turn).collect(),
            };
            let mut predicates = Predicates::new(&scan);
            let mut excluded = |range: &RowGroupRange| -> Result<bool> {
                let outside = range
                    .lsn
                    .is_some_and(|(lo, hi)| hi < bounds.lsn.0 || lo > bounds.lsn.1)
                    || range
                        .committed_at
                        .is_some_and(|(lo, hi)| hi < bounds.time.0 || lo > bounds.time.1);
                Ok(outside || !predicates.may_match(range)?)
            };
            for (turn, segment) in &segments {
                let (path, sha256) = (&segment.path, &segment.sha256);
                // Opened before the wait: a process's first look at a segment checks its
                // SHA-256, which the partitions do side by side.
                let ranges = segment_row_groups(path, sha256)?;
                if limited {
                    // Out of patience, the read goes on as it would have without the wait.
                    let _ = scan.turns.wait_before(*turn, TURN_PATIENCE);
                }
                for i in scan.order.arrange(0..ranges.len()) {
                    if excluded(&ranges[i])? {
                        skipped.add(1);
                        continue;
                    }
                    read.add(1);
                    let spans = segment_row_spans(path, sha256, i)?;
                    for span in scan.order.arrange(spans.into_iter()) {
                        // Checked again at each span: the filter tightens as the sort above
                        // takes in the rows of the spans before.
                        if excluded(&span.range)? {
                            spans_skipped.add(1);
                            continue;
                        }
                        spans_read.add(1);
                        let reader =
                            open_segment_row_span(path, sha256, 8192, i, span.rows, Some(&paths))?;
                        if !scan.send_rows(reader, &segment.version, &mut left, &tx)? {
                            return Ok(());
                        }
                    }
                    // The segment's first row group read is done (its spans sent above or
                    // ruled out): the next segment's turn.
                    scan.turns.pass(*turn);
                }
                scan.turns.pass(*turn);
            }
            Ok(())
        });
        Ok(builder.build())
    }
}

/// The pruning predicates of a scan's filters (`prune_by`, then `filters`), each built again
/// only when a dynamic filter inside it has moved: building one is an analysis of the
/// expression, and the scan asks at every row group and span (7 % of a warm `newest 20`
/// query's samples when each was built at every ask). A predicate built from a filter that
/// has tightened since is only ever looser than the filter, so it never rules out a row the
/// filter accepts.
struct Predicates<'a> {
    scan: &'a HistoryScanExec,
    /// Per filter: the generation it was built at, and the predicate (`None`: the filter
    /// cannot rule anything out by these statistics).
    built: Vec<(u64, Option<Arc<PruningPredicate>>)>,
}

impl<'a> Predicates<'a> {
    fn new(scan: &'a HistoryScanExec) -> Predicates<'a> {
        let built = scan
            .prune_by
            .iter()
            .chain(&scan.filters)
            .map(|filter| build_predicate(scan, filter))
            .collect();
        Predicates { scan, built }
    }

    /// Whether row group (or span) `range` may hold a row every filter accepts.
    fn may_match(&mut self, range: &RowGroupRange) -> Result<bool> {
        let scan = self.scan;
        let stats = RowGroupStatistics {
            range,
            columns: &scan.columns,
            schema: &scan.schema,
        };
        for (filter, built) in scan
            .prune_by
            .iter()
            .chain(&scan.filters)
            .zip(&mut self.built)
        {
            if built.0 != snapshot_generation(filter) {
                *built = build_predicate(scan, filter);
            }
            if let Some(predicate) = &built.1
                && predicate.prune(&stats)?.first() == Some(&false)
            {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// `filter`'s pruning predicate over `scan`'s columns, with the generation it was built at
/// (read before the build: a filter moving during it is built again at the next ask).
fn build_predicate(
    scan: &HistoryScanExec,
    filter: &Arc<dyn PhysicalExpr>,
) -> (u64, Option<Arc<PruningPredicate>>) {
    let generation = snapshot_generation(filter);
    let predicate = PruningPredicateBuilder::new()
        .with_file_schema(scan.schema.clone())
        .build(filter.clone());
    (generation, predicate)
}

/// The longest a partition waits for the turns before its next segment: a row group's spans
/// are read in milliseconds, so this is reached only where something else holds a turn (a
/// partition the plan above polls late, a slow disk), and then the read goes on without it.
const TURN_PATIENCE: Duration = Duration::from_millis(100);

/// The turns of an ordered read (see [`HistoryScanExec::execute_ordered`]): a segment's turn
/// is its place in the read order, and it passes once the first row group it reads is done
/// (its spans sent above or ruled out), or when its partition is done with the segment. A
/// wait never changes the answer: after it, the filters decide what is read, as without it;
/// it only gives them the chance to have tightened. A plan executed again finds every turn
/// passed and reads without waiting.
#[derive(Debug)]
struct ReadTurns {
    passed: Mutex<Vec<bool>>,
    moved: Condvar,
}

impl ReadTurns {
    fn new(turns: usize) -> ReadTurns {
        ReadTurns {
            passed: Mutex::new(vec![false; turns]),
            moved: Condvar::new(),
        }
    }

    /// Wait until every turn before `turn` has passed (`true`), or `patience` has (`false`).
    fn wait_before(&self, turn: usize, patience: Duration) -> bool {
        let deadline = Instant::now() + patience;
        let mut passed = self.passed.lock().unwrap_or_else(PoisonError::into_inner);
        while passed.iter().take(turn).any(|p| !p) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            passed = self
                .moved
                .wait_timeout(passed, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }

    fn pass(&self, turn: usize) {
        let mut passed = self.passed.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(p) = passed.get_mut(turn)
            && !*p
        {
            *p = true;
            self.moved.notify_all();
        }
    }
}

/// Passes a partition's turns when it is dropped.
struct TurnsPassedOnDrop<'a> {
    turns: &'a ReadTurns,
    mine: Vec<usize>,
}

impl Drop for TurnsPassedOnDrop<'_> {
    fn drop(&mut self) {
        for &turn in &self.mine {
            self.turns.pass(turn);
        }
    }
}

/// The segments (numbered in file order, `0..segments`) that partition `partition` of
/// `readers` reads, in the order it reads them: all of them in `order`, dealt out in turn.
fn dealt(segments: usize, readers: usize, partition: usize, order: ReadOrder) -> Vec<usize> {
    let readers = readers.max(1);
    order
        .arrange(0..segments)
        .enumerate()
        .filter(|(turn, _)| turn % readers == partition)
        .map(|(_, segment)| segment)
        .collect()
}

impl ReadOrder {
    /// The place of segment `segment` (of `segments`, in file order) in this order.
    fn turn_of(self, segment: usize, segments: usize) -> usize {
        match self {
            ReadOrder::NewestFirst => segments - 1 - segment,
            ReadOrder::OldestFirst => segment,
        }
    }

    /// `items` (in file order) in this order.
    fn arrange<T>(
        self,
        items: impl DoubleEndedIterator<Item = T> + 'static,
    ) -> Box<dyn Iterator<Item = T>> {
        match self {
            ReadOrder::NewestFirst => Box::new(items.rev()),
            ReadOrder::OldestFirst => Box::new(items),
        }
    }
}

/// The rows of `batch` that every filter accepts (a null is no), at most `left` of them
/// (which it counts down), with its first `outputs` columns (those after are the filters').
fn keep(
    batch: RecordBatch,
    filters: &[Arc<dyn PhysicalExpr>],
    left: &mut usize,
    outputs: usize,
) -> Result<RecordBatch> {
    let mut batch = batch;
    for filter in filters {
        if batch.num_rows() == 0 {
            break;
        }
        let verdict = filter.evaluate(&batch)?.into_array(batch.num_rows())?;
        let verdict = verdict.as_boolean_opt().ok_or_else(|| {
            DataFusionError::Internal(format!("filter {filter} is not a boolean"))
        })?;
        batch = filter_record_batch(&batch, verdict)?;
    }
    let batch = batch.slice(0, batch.num_rows().min(*left));
    *left -= batch.num_rows();
    if batch.num_columns() == outputs {
        return Ok(batch);
    }
    Ok(batch.project(&(0..outputs).collect::<Vec<_>>())?)
}

/// A row group's statistics as DataFusion's pruning asks for them: the ranges of `lsn` and
/// `committed_at`, for the scan's output columns that are those stored columns (and nothing
/// for any other column, whatever its name).
struct RowGroupStatistics<'a> {
    range: &'a RowGroupRange,
    columns: &'a [ScanColumn],
    schema: &'a SchemaRef,
}

impl RowGroupStatistics<'_> {
    fn bound(&self, column: &datafusion::common::Column, max: bool) -> Option<ArrayRef> {
        let mut matches = self
            .schema
            .fields()
            .iter()
            .zip(self.columns)
            .filter(|(f, _)| f.name() == &column.name);
        let (field, stored) = matches.next()?;
        if matches.next().is_some() {
            return None;
        }
        let array: ArrayRef = match stored {
            ScanColumn::Stored(name) if name == "lsn" => {
                let (lo, hi) = self.range.lsn?;
                Arc::new(UInt64Array::from(vec![if max { hi } else { lo }]))
            }
            ScanColumn::Stored(name) if name == "committed_at" => {
                let (lo, hi) = self.range.committed_at?;
                Arc::new(TimestampMicrosecondArray::from(vec![if max {
                    hi
                } else {
                    lo
                }]))
            }
            _ => return None,
        };
        cast(&array, field.data_type()).ok()
    }
}

impl PruningStatistics for RowGroupStatistics<'_> {
    fn min_values(&self, column: &datafusion::common::Column) -> Option<ArrayRef> {
        self.bound(column, false)
    }

    fn max_values(&self, column: &datafusion::common::Column) -> Option<ArrayRef> {
        self.bound(column, true)
    }

    fn num_containers(&self) -> usize {
        1
    }

    fn null_counts(&self, column: &datafusion::common::Column) -> Option<ArrayRef> {
        // `lsn` and `committed_at` are never null.
        self.bound(column, false)
            .map(|_| Arc::new(UInt64Array::from(vec![0u64])) as ArrayRef)
    }

    fn row_counts(&self) -> Option<ArrayRef> {
        Some(Arc::new(UInt64Array::from(vec![self.range.rows as u64])))
    }

    fn contained(
        &self,
        _column: &datafusion::common::Column,
        _values: &std::collections::HashSet<ScalarValue>,
    ) -> Option<BooleanArray> {
        None
    }
}

/// The scan's `columns` from a batch read from a segment written under `version`, or from a
/// tail batch (`version` `None`: already in the history schema).
fn project(
    batch: &RecordBatch,
    version: Option<&RelationVersion>,
    history: &SchemaRef,
    columns: &[ScanColumn],
    schema: &SchemaRef,
) -> Result<RecordBatch> {
    let rows = batch.num_rows();
    let mut arrays = Vec::with_capacity(columns.len());
    for (column, field) in columns.iter().zip(schema.fields()) {
        let array = match column {
            ScanColumn::Stored(name) => match version {
                Some(version) => adapt_column(batch, version, history.field_with_name(name)?)?,
                None => batch
                    .column_by_name(name)
                    .cloned()
                    .unwrap_or_else(|| new_null_array(field.data_type(), rows)),
            },
            ScanColumn::ImageField { image, field: name } => {
                image_field(batch, version, image, name, field.data_type())?
            }
        };
        arrays.push(array);
    }
    // The row count is explicit: a projection may ask for no column at all (`count(*)`).
    let options = RecordBatchOptions::new().with_row_count(Some(rows));
    Ok(RecordBatch::try_new_with_options(
        schema.clone(),
        arrays,
        &options,
    )?)
}

/// Column `name` of row image `image` in the history's type `target`, null where the image is.
pub(crate) fn image_field(
    batch: &RecordBatch,
    version: Option<&RelationVersion>,
    image: &str,
    name: &str,
    target: &DataType,
) -> Result<ArrayRef> {
    let rows = batch.num_rows();
    let Some(image) = batch.column_by_name(image) else {
        return Ok(new_null_array(target, rows));
    };
    let image = image
        .as_struct_opt()
        .ok_or_else(|| DataFusionError::Internal("row image is not a struct".into()))?;
    let Some(values) = image.column_by_name(name) else {
        return Ok(new_null_array(target, rows));
    };
    let values = match version {
        // A segment's values are as its schema version stored them.
        Some(version) => match version.columns.iter().find(|c| c.name == name) {
            Some(column) => adapt_image_column(values, column, target)?,
            None => new_null_array(target, rows),
        },
        None => values.clone(),
    };
    // A field of an absent image is absent.
    let Some(image_nulls) = image.nulls() else {
        return Ok(values);
    };
    let nulls = NullBuffer::union(Some(image_nulls), values.nulls());
    Ok(make_array(
        values.to_data().into_builder().nulls(nulls).build()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_turn_waits_for_the_turns_before_it_and_never_for_ever() {
        let turns = Arc::new(ReadTurns::new(3));
        let waiter = {
            let turns = turns.clone();
            std::thread::spawn(move || {
                // Woken by the passing, not by the patience running out (a passing that did
                // not wake the waiter would fail here, after the patience).
                let woken = turns.wait_before(2, Duration::from_secs(600));
                // Turn 2 may start only once 0 and 1 have passed.
                (woken, turns.passed.lock().unwrap().clone())
            })
        };
        turns.pass(1);
        std::thread::sleep(Duration::from_millis(20));
        assert!(
            !waiter.is_finished(),
            "turn 2 went on with turn 0 not passed"
        );
        turns.pass(0);
        assert_eq!(waiter.join().unwrap(), (true, vec![true, true, false]));
        // Turn 0 never waits; a turn nobody passes holds the next back only for the patience.
        let idle = ReadTurns::new(2);
        assert!(idle.wait_before(0, Duration::from_secs(600)));
        assert!(!idle.wait_before(1, Duration::from_millis(1)));
        assert_eq!(*idle.passed.lock().unwrap(), vec![false, false]);
        // Past the last turn, or passed twice: no panic, nothing else passed.
        idle.pass(5);
        idle.pass(1);
        idle.pass(1);
        assert_eq!(*idle.passed.lock().unwrap(), vec![false, true]);
    }

    #[test]
    fn turns_are_places_in_the_read_order() {
        assert_eq!(ReadOrder::NewestFirst.turn_of(4, 5), 0);
        assert_eq!(ReadOrder::NewestFirst.turn_of(0, 5), 4);
        assert_eq!(ReadOrder::OldestFirst.turn_of(3, 5), 3);
    }

    #[test]
    fn segments_are_dealt_out_newest_first_each_once() {
        // Five segments, two readers, newest first: the first two read are the two newest.
        let newest = ReadOrder::NewestFirst;
        assert_eq!(dealt(5, 2, 0, newest), vec![4, 2, 0]);
        assert_eq!(dealt(5, 2, 1, newest), vec![3, 1]);
        assert_eq!(dealt(5, 2, 0, ReadOrder::OldestFirst), vec![0, 2, 4]);
        assert_eq!(dealt(5, 2, 1, ReadOrder::OldestFirst), vec![1, 3]);
        // More readers than segments, no segments, no readers: each segment read once.
        for (segments, readers) in [(3, 8), (0, 2), (4, 0), (7, 3), (1, 1)] {
            for order in [ReadOrder::NewestFirst, ReadOrder::OldestFirst] {
                let mut all: Vec<usize> = (0..readers.max(1))
                    .flat_map(|p| dealt(segments, readers, p, order))
                    .collect();
                all.sort_unstable();
                assert_eq!(
                    all,
                    (0..segments).collect::<Vec<_>>(),
                    "{segments} {readers}"
                );
            }
        }
    }
}
