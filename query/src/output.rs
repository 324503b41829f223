//! Query answers as files for programs: CSV (nested values as JSON text) and Parquet, shared by
//! `pgtrail sql` and the server's downloads (JSON lines are [`crate::json`]).

use std::io::Write;
use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, RecordBatch};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::error::{DataFusionError, Result};

/// `batches` as CSV with a header line; nested values (row images, lists) as JSON text.
pub fn write_csv<W: Write>(sink: W, batches: &[RecordBatch]) -> Result<W> {
    let mut w = datafusion::arrow::csv::WriterBuilder::new()
        .with_header(true)
        .build(sink);
    for b in batches {
        w.write(&flatten_nested(b)?)?;
    }
    Ok(w.into_inner())
}

/// `batches` as one zstd Parquet file of `schema`.
pub fn write_parquet<W: Write + Send>(
    sink: W,
    schema: SchemaRef,
    batches: &[RecordBatch],
) -> Result<W> {
    let props = datafusion::parquet::file::properties::WriterProperties::builder()
        .set_compression(datafusion::parquet::basic::Compression::ZSTD(
            Default::default(),
        ))
        .build();
    let mut w = datafusion::parquet::arrow::ArrowWriter::try_new(sink, schema, Some(props))?;
    for b in batches {
        w.write(b)?;
    }
    Ok(w.into_inner()?)
}

/// Nested columns (structs, lists, maps) as JSON text, for formats that hold only scalars.
fn flatten_nested(batch: &RecordBatch) -> Result<RecordBatch> {
    let mut fields = Vec::new();
    let mut columns: Vec<ArrayRef> = Vec::new();
    for (field, column) in batch.schema().fields().iter().zip(batch.columns()) {
        if matches!(
            field.data_type(),
            DataType::Struct(_) | DataType::List(_) | DataType::Map(_, _) | DataType::LargeList(_)
        ) {
            let one = RecordBatch::try_new(
                Arc::new(Schema::new(vec![field.as_ref().clone()])),
                vec![column.clone()],
            )?;
            // JSON values inside (a row image's json columns) as JSON, like `--format json`.
            let out = crate::json::write_json_lines(Vec::new(), &[one])?;
            // Each line is `{"<name>":<value>}`: the value's text is kept as written (fields in
            // order, json values as their exact text), not parsed and written again.
            let prefix = format!("{{{}:", serde_json::Value::from(field.name().as_str()));
            let mut b = datafusion::arrow::array::StringBuilder::new();
            for (i, line) in String::from_utf8(out)
                .map_err(|e| DataFusionError::External(Box::new(e)))?
                .lines()
                .enumerate()
            {
                let value = line.strip_prefix(&prefix).and_then(|l| l.strip_suffix('}'));
                match value {
                    Some(value) if column.is_valid(i) => b.append_value(value),
                    _ => b.append_null(),
                }
            }
            fields.push(Field::new(field.name(), DataType::Utf8, true));
            columns.push(Arc::new(b.finish()));
        } else if matches!(field.data_type(), DataType::Dictionary(_, _)) {
            fields.push(Field::new(
                field.name(),
                DataType::Utf8,
                field.is_nullable(),
            ));
            columns.push(cast(column, &DataType::Utf8)?);
        } else {
            fields.push(field.as_ref().clone());
            columns.push(column.clone());
        }
    }
    Ok(RecordBatch::try_new(
        Arc::new(Schema::new(fields)),
        columns,
    )?)
}
