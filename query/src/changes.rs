//! The Bemi-compatible `changes` view: one row per change of every table, with row images and
//! context as JSON, so audit questions across tables are one query.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, RecordBatch, RecordBatchOptions, StringArray, StringBuilder,
    TimestampMicrosecondBuilder, UInt32Builder, UInt64Builder,
};
use datafusion::arrow::datatypes::{
    DataType, Field, Int8Type, Schema, SchemaRef, TimeUnit, UInt64Type,
};
use datafusion::catalog::{Session, TableProvider};
use datafusion::datasource::TableType;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::TaskContext;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use datafusion::physical_plan::stream::RecordBatchReceiverStreamBuilder;
use datafusion::physical_plan::streaming::{PartitionStream, StreamingTableExec};
use datafusion::physical_plan::{ExecutionPlan, SendableRecordBatchStream};
use pgtrail_store::segment::{PgKind, SegmentContent, parse_array};
use pgtrail_store::{Cell, ChangeRecord, Op, RelationVersion, Row};
use serde_json::Value;

use crate::archive::ArchiveSnapshot;
use crate::history::TailPartition;
use crate::json::{is_json_text, json_field};
use crate::read::{Bounds, for_each_change_where, open_segment_projected};

/// The view's schema.
pub fn changes_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("primary_key", DataType::Utf8, true),
        Field::new("table", DataType::Utf8, false),
        Field::new("schema", DataType::Utf8, false),
        Field::new("operation", DataType::Utf8, false),
        // JSON text, marked so that JSON answers embed them (see `crate::json`).
        json_field(Field::new("before", DataType::Utf8, true)),
        json_field(Field::new("after", DataType::Utf8, true)),
        json_field(Field::new("context", DataType::Utf8, true)),
        Field::new(
            "committed_at",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
        Field::new("transaction_id", DataType::UInt32, false),
        // Named like the history tables' columns so that the same filters prune segments.
        Field::new("lsn", DataType::UInt64, false),
        Field::new("seq", DataType::UInt32, false),
        Field::new("position", DataType::Utf8, false),
    ]))
}

/// A row image as the text of a JSON object, columns in the table's order: numbers and
/// booleans as JSON numbers and booleans, json and jsonb embedded as their exact text (key
/// order, duplicate keys and number spelling kept), everything else as PostgreSQL's text.
/// Unknown values (never sent by PostgreSQL, never seen before) are left out rather than
/// shown as null.
pub fn row_json(version: &RelationVersion, row: &Row) -> String {
    let mut object = String::from("{");
    for (column, cell) in version.columns.iter().zip(row) {
        let value = match cell {
            Cell::Unknown => continue,
            Cell::Null => "null".to_string(),
            Cell::Text(t) => match PgKind::of(column.type_oid, column.type_modifier) {
                PgKind::Int2 | PgKind::Int4 | PgKind::Int8 => t
                    .parse::<i64>()
                    .map(|i| i.to_string())
                    .unwrap_or_else(|_| Value::from(t.as_str()).to_string()),
                PgKind::Float4 | PgKind::Float8 => match t.parse::<f64>() {
                    Ok(f) if f.is_finite() => Value::from(f).to_string(),
                    _ => Value::from(t.as_str()).to_string(),
                },
                PgKind::Bool => (t == "t").to_string(),
                // PostgreSQL checked it is JSON; a text that is not stays a string.
                PgKind::Json if is_json_text(t) => t.clone(),
                // An array of json or jsonb: a JSON array of the values, like the typed answers.
                PgKind::Array(e) if *e == PgKind::Json => match parse_array(t) {
                    Ok(elements) if elements.iter().flatten().all(|e| is_json_text(e)) => {
                        let elements: Vec<&str> = elements
                            .iter()
                            .map(|e| e.as_deref().unwrap_or("null"))
                            .collect();
                        format!("[{}]", elements.join(","))
                    }
                    _ => Value::from(t.as_str()).to_string(),
                },
                _ => Value::from(t.as_str()).to_string(),
            },
        };
        if object.len() > 1 {
            object.push(',');
        }
        object.push_str(&Value::from(column.name.as_str()).to_string());
        object.push(':');
        object.push_str(&value);
    }
    object.push('}');
    object
}

fn operation(op: Op) -> &'static str {
    match op {
        Op::Insert => "CREATE",
        Op::Update => "UPDATE",
        Op::Delete => "DELETE",
        Op::Truncate => "TRUNCATE",
        Op::Snapshot => "SNAPSHOT",
        Op::Message => "MESSAGE",
    }
}

struct Builders {
    pk: StringBuilder,
    table: StringBuilder,
    schema: StringBuilder,
    op: StringBuilder,
    before: StringBuilder,
    after: StringBuilder,
    context: StringBuilder,
    at: TimestampMicrosecondBuilder,
    xid: UInt32Builder,
    lsn: UInt64Builder,
    seq: UInt32Builder,
    position: StringBuilder,
    rows: usize,
}

impl Builders {
    fn new() -> Builders {
        Builders {
            pk: StringBuilder::new(),
            table: StringBuilder::new(),
            schema: StringBuilder::new(),
            op: StringBuilder::new(),
            before: StringBuilder::new(),
            after: StringBuilder::new(),
            context: StringBuilder::new(),
            at: TimestampMicrosecondBuilder::new().with_timezone("UTC"),
            xid: UInt32Builder::new(),
            lsn: UInt64Builder::new(),
            seq: UInt32Builder::new(),
            position: StringBuilder::new(),
            rows: 0,
        }
    }

    fn push(
        &mut self,
        version: &RelationVersion,
        key: pgtrail_store::ChangeKey,
        rec: &ChangeRecord,
    ) {
        let pk = rec.key.as_ref().map(|k| {
            if k.len() == 1 {
                k[0].clone().unwrap_or_default()
            } else {
                Value::from(
                    k.iter()
                        .map(|v| v.clone().map_or(Value::Null, Value::from))
                        .collect::<Vec<_>>(),
                )
                .to_string()
            }
        });
        self.pk.append_option(pk);
        self.table.append_value(&version.name);
        self.schema.append_value(&version.schema);
        self.op.append_value(operation(rec.op));
        self.before
            .append_option(rec.before.as_ref().map(|r| row_json(version, r)));
        self.after
            .append_option(rec.after.as_ref().map(|r| row_json(version, r)));
        self.context.append_option(rec.context.as_deref());
        self.at.append_value(rec.committed_at_us);
        self.xid.append_value(rec.xid);
        self.lsn.append_value(key.commit_lsn.0);
        self.seq.append_value(key.seq);
        self.position.append_value(key.commit_lsn.to_string());
        self.rows += 1;
    }

    fn finish(&mut self, schema: &SchemaRef) -> Result<RecordBatch> {
        self.rows = 0;
        Ok(RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(self.pk.finish()),
                Arc::new(self.table.finish()),
                Arc::new(self.schema.finish()),
                Arc::new(self.op.finish()),
                Arc::new(self.before.finish()),
                Arc::new(self.after.finish()),
                Arc::new(self.context.finish()),
                Arc::new(self.at.finish()),
                Arc::new(self.xid.finish()),
                Arc::new(self.lsn.finish()),
                Arc::new(self.seq.finish()),
                Arc::new(self.position.finish()),
            ],
        )?)
    }
}

/// The `changes` view.
pub struct ChangesTable {
    pub archive: Arc<ArchiveSnapshot>,
    schema: SchemaRef,
}

impl ChangesTable {
    pub fn new(archive: Arc<ArchiveSnapshot>) -> ChangesTable {
        ChangesTable {
            archive,
            schema: changes_schema(),
        }
    }
}

impl fmt::Debug for ChangesTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ChangesTable")
    }
}

#[async_trait]
impl TableProvider for ChangesTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::View
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let bounds = Bounds::from_filters(filters);
        // Tables no row of which can meet the filters (`"table" = 'x'`, `schema = 's'`, as
        // the API and the stream filter) are not read at all.
        let wanted = |history: &crate::archive::TableHistory| {
            history
                .versions
                .iter()
                .any(|v| filters.iter().all(|f| may_name(f, &v.schema, &v.name)))
        };
        // Without the JSON columns (primary_key, before, after) the view is the segments'
        // own columns relabelled: read those columnar, per segment, in parallel.
        if let Some(p) = projection
            && !p.iter().any(|&i| {
                matches!(
                    self.schema.field(i).name().as_str(),
                    "primary_key" | "before" | "after"
                )
            })
        {
            let schema = Arc::new(self.schema.project(p)?);
            let mut partitions: Vec<Arc<dyn PartitionStream>> = Vec::new();
            for history in self.archive.tables.values().filter(|h| wanted(h)) {
                for seg in history.segments.iter().filter(|s| bounds.overlaps(s)) {
                    let SegmentContent::Table(version) = &seg.content else {
                        continue;
                    };
                    partitions.push(Arc::new(SegmentChanges {
                        path: self.archive.segment_path(seg),
                        sha256: seg.sha256.clone(),
                        table: version.name.clone(),
                        schema_name: version.schema.clone(),
                        bounds,
                        schema: schema.clone(),
                    }));
                }
                let mut b = Builders::new();
                for (key, rec) in history
                    .tail
                    .iter()
                    .filter(|(k, r)| bounds.contains(*k, r.committed_at_us))
                {
                    b.push(
                        history.version(rec.relation_id, rec.schema_version)?,
                        *key,
                        rec,
                    );
                }
                let batch = b.finish(&self.schema)?.project(p)?;
                // The view's rows of the log tail (few: the tail is compacted away).
                partitions.push(Arc::new(TailPartition {
                    batches: vec![batch],
                    schema: schema.clone(),
                }));
            }
            if partitions.is_empty() {
                let empty = datafusion::catalog::MemTable::try_new(schema.clone(), vec![vec![]])?;
                return empty.scan(_state, None, filters, limit).await;
            }
            return Ok(Arc::new(StreamingTableExec::try_new(
                schema,
                partitions,
                None,
                [],
                false,
                limit,
            )?));
        }
        let partitions: Vec<Arc<dyn PartitionStream>> = self
            .archive
            .tables
            .iter()
            .filter(|(_, h)| wanted(h))
            .map(|(t, _)| {
                Arc::new(TablePartition {
                    archive: self.archive.clone(),
                    table: t.clone(),
                    bounds,
                    schema: self.schema.clone(),
                }) as Arc<dyn PartitionStream>
            })
            .collect();
        if partitions.is_empty() {
            let empty = datafusion::catalog::MemTable::try_new(self.schema.clone(), vec![vec![]])?;
            return empty.scan(_state, projection, filters, limit).await;
        }
        Ok(Arc::new(StreamingTableExec::try_new(
            self.schema.clone(),
            partitions,
            projection,
            [],
            false,
            limit,
        )?))
    }
}

/// The view's non-JSON columns of one segment, built from its columns as stored.
#[derive(Clone, Debug)]
struct SegmentChanges {
    path: std::path::PathBuf,
    sha256: String,
    table: String,
    schema_name: String,
    bounds: Bounds,
    /// The projected view schema.
    schema: SchemaRef,
}

impl SegmentChanges {
    fn batch(&self, stored: &RecordBatch) -> Result<RecordBatch> {
        let n = stored.num_rows();
        let column = |name: &str| {
            stored
                .column_by_name(name)
                .cloned()
                .ok_or_else(|| DataFusionError::Internal(format!("segment without {name}")))
        };
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(self.schema.fields().len());
        for field in self.schema.fields() {
            columns.push(match field.name().as_str() {
                "table" => Arc::new(StringArray::from_iter_values(std::iter::repeat_n(
                    &self.table,
                    n,
                ))),
                "schema" => Arc::new(StringArray::from_iter_values(std::iter::repeat_n(
                    &self.schema_name,
                    n,
                ))),
                "operation" => {
                    let op = column("op")?;
                    let op = op
                        .as_dictionary_opt::<Int8Type>()
                        .ok_or_else(|| DataFusionError::Internal("op type".into()))?;
                    let values = op
                        .values()
                        .as_string_opt::<i32>()
                        .ok_or_else(|| DataFusionError::Internal("op values".into()))?;
                    let names: Vec<&str> = (0..values.len())
                        .map(|i| match values.value(i) {
                            "insert" => "CREATE",
                            "update" => "UPDATE",
                            "delete" => "DELETE",
                            "truncate" => "TRUNCATE",
                            "snapshot" => "SNAPSHOT",
                            _ => "MESSAGE",
                        })
                        .collect();
                    Arc::new(StringArray::from_iter_values(
                        op.keys()
                            .iter()
                            .map(|k| names[k.unwrap_or_default() as usize]),
                    ))
                }
                "context" => column("context")?,
                "committed_at" => column("committed_at")?,
                "transaction_id" => column("xid")?,
                "lsn" => column("lsn")?,
                "seq" => column("seq")?,
                "position" => {
                    let lsn = column("lsn")?;
                    let lsn = lsn
                        .as_primitive_opt::<UInt64Type>()
                        .ok_or_else(|| DataFusionError::Internal("lsn type".into()))?;
                    Arc::new(StringArray::from_iter_values(
                        lsn.values()
                            .iter()
                            .map(|v| pgtrail_store::Lsn(*v).to_string()),
                    ))
                }
                other => {
                    return Err(DataFusionError::Internal(format!(
                        "changes column {other} is not built columnar"
                    )));
                }
            });
        }
        let options = RecordBatchOptions::new().with_row_count(Some(n));
        Ok(RecordBatch::try_new_with_options(
            self.schema.clone(),
            columns,
            &options,
        )?)
    }
}

impl PartitionStream for SegmentChanges {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let mut builder = RecordBatchReceiverStreamBuilder::new(self.schema.clone(), 2);
        let tx = builder.tx();
        let me = self.clone();
        builder.spawn_blocking(move || {
            let mut read: Vec<Vec<String>> = Vec::new();
            for field in me.schema.fields() {
                let stored = match field.name().as_str() {
                    "operation" => "op",
                    "transaction_id" => "xid",
                    "position" => "lsn",
                    "table" | "schema" => continue,
                    other => other,
                };
                read.push(vec![stored.to_string()]);
            }
            if read.is_empty() {
                // `count(*)`: the smallest column, for the row counts.
                read.push(vec!["seq".to_string()]);
            }
            for batch in open_segment_projected(&me.path, &me.sha256, 8192, me.bounds, Some(&read))?
            {
                let batch = batch.map_err(|e| DataFusionError::External(Box::new(e)))?;
                if tx.blocking_send(me.batch(&batch)).is_err() {
                    break;
                }
            }
            Ok(())
        });
        builder.build()
    }
}

#[derive(Debug)]
struct TablePartition {
    archive: Arc<ArchiveSnapshot>,
    table: String,
    bounds: Bounds,
    schema: SchemaRef,
}

impl PartitionStream for TablePartition {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let mut builder = RecordBatchReceiverStreamBuilder::new(self.schema.clone(), 2);
        let tx = builder.tx();
        let (archive, table, bounds, schema) = (
            self.archive.clone(),
            self.table.clone(),
            self.bounds,
            self.schema.clone(),
        );
        builder.spawn_blocking(move || {
            let Some(history) = archive.tables.get(&table) else {
                return Ok(());
            };
            let mut b = Builders::new();
            for_each_change_where(
                &archive,
                history,
                bounds,
                |seg| bounds.overlaps(seg),
                |key, rec| bounds.contains(key, rec.committed_at_us),
                |version, key, rec| {
                    b.push(version, key, rec);
                    if b.rows >= 8192 {
                        let batch = b.finish(&schema)?;
                        if tx.blocking_send(Ok(batch)).is_err() {
                            return Err(datafusion::error::DataFusionError::Execution(
                                "query cancelled".into(),
                            ));
                        }
                    }
                    Ok(())
                },
            )?;
            if b.rows > 0 {
                let _ = tx.blocking_send(b.finish(&schema));
            }
            Ok(())
        });
        builder.build()
    }
}

/// Whether a row of the table named `schema`.`name` may meet `filter`: false only when the
/// filter's conditions on the `schema` and `table` columns rule that name out (equalities,
/// `IN` lists, `AND`, `OR`); anything else may match.
fn may_name(filter: &Expr, schema: &str, name: &str) -> bool {
    use datafusion::logical_expr::{BinaryExpr, Operator, expr::InList};
    let text = |e: &Expr| match e {
        Expr::Literal(datafusion::scalar::ScalarValue::Utf8(Some(v)), _) => Some(v.clone()),
        _ => None,
    };
    let column = |e: &Expr| match e {
        Expr::Column(c) if c.name == "schema" => Some(schema),
        Expr::Column(c) if c.name == "table" => Some(name),
        _ => None,
    };
    match filter {
        Expr::BinaryExpr(BinaryExpr { left, op, right }) => match op {
            Operator::And => may_name(left, schema, name) && may_name(right, schema, name),
            Operator::Or => may_name(left, schema, name) || may_name(right, schema, name),
            Operator::Eq => match (column(left), text(right), column(right), text(left)) {
                (Some(actual), Some(wanted), _, _) | (_, _, Some(actual), Some(wanted)) => {
                    actual == wanted
                }
                _ => true,
            },
            _ => true,
        },
        Expr::InList(InList {
            expr,
            list,
            negated: false,
        }) => match column(expr) {
            Some(actual) => list.iter().any(|e| text(e).is_none_or(|v| v == actual)),
            None => true,
        },
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use datafusion::prelude::{col, lit};

    use super::may_name;

    #[test]
    fn only_names_the_filter_rules_out_are_pruned() {
        let orders = col("schema")
            .eq(lit("public"))
            .and(col("table").eq(lit("orders")));
        assert!(may_name(&orders, "public", "orders"));
        assert!(!may_name(&orders, "public", "customers"));
        assert!(!may_name(&orders, "billing", "orders"));
        let either = orders.clone().or(col("table").eq(lit("old_orders")));
        assert!(may_name(&either, "archive", "old_orders"));
        assert!(!may_name(&either, "public", "items"));
        let reversed = lit("orders").eq(col("table"));
        assert!(!may_name(&reversed, "public", "items"));
        let listed = col("table").in_list(vec![lit("a"), lit("b")], false);
        assert!(may_name(&listed, "s", "b") && !may_name(&listed, "s", "c"));
        // Anything else may match: negations, other columns, other operators.
        assert!(may_name(
            &col("table").in_list(vec![lit("a")], true),
            "s",
            "a"
        ));
        assert!(may_name(&col("table").not_eq(lit("a")), "s", "a"));
        assert!(may_name(&col("operation").eq(lit("UPDATE")), "s", "a"));
        assert!(may_name(&orders.or(col("lsn").gt(lit(5u64))), "s", "x"));
    }
}
