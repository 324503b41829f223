//! One schema for a table's whole history: segments of different schema versions (and the
//! log tail) are adapted to it batch by batch.
//!
//! A column keeps its type while every version agrees on it; a column whose type changed
//! (`ALTER ... TYPE`) becomes text (PostgreSQL's text form of each value, which is exact), and
//! a column missing from a version (added later, or dropped) is null there.

use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, RecordBatch, StringBuilder, StructArray, new_null_array,
};
use datafusion::arrow::compute::{CastOptions, cast_with_options};
use datafusion::arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef};
use datafusion::error::{DataFusionError, Result};
use pgtrail_store::segment::{PgKind, SegmentContent, render, row_struct_fields, segment_schema};
use pgtrail_store::{Column, RelationVersion};

/// The row fields of a history: the latest version's columns in order, then columns that
/// only older versions had.
pub fn merged_row_fields(versions: &[RelationVersion]) -> Fields {
    let mut fields: Vec<Field> = Vec::new();
    for version in versions.iter().rev() {
        for f in row_struct_fields(version).iter() {
            match fields.iter_mut().find(|g| g.name() == f.name()) {
                Some(existing) if existing.data_type() != f.data_type() => {
                    *existing = Field::new(f.name(), DataType::Utf8, true);
                }
                Some(_) => {}
                None => fields.push(f.as_ref().clone()),
            }
        }
    }
    fields.into()
}

/// The schema of a table's history (the segment layout with merged row structs, and `op` as
/// plain text).
pub fn history_schema(versions: &[RelationVersion]) -> SchemaRef {
    let latest = versions.last().expect("a table has a version");
    let base = segment_schema(&SegmentContent::Table(latest.clone()));
    let row = DataType::Struct(merged_row_fields(versions));
    // A zero-column latest version has no image columns (`segment_schema` leaves them out).
    let fields: Vec<Field> = base
        .fields()
        .iter()
        .map(|f| match f.name().as_str() {
            "op" => Field::new("op", DataType::Utf8, false),
            "before" | "after" => Field::new(f.name(), row.clone(), true),
            _ => f.as_ref().clone(),
        })
        .collect();
    Arc::new(Schema::new(fields))
}

fn strict() -> CastOptions<'static> {
    CastOptions {
        safe: false,
        ..CastOptions::default()
    }
}

/// Adapt a batch written under `version` to the history `target` schema.
pub fn adapt(
    batch: &RecordBatch,
    version: &RelationVersion,
    target: &SchemaRef,
) -> Result<RecordBatch> {
    let rows = batch.num_rows();
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(target.fields().len());
    for field in target.fields() {
        columns.push(adapt_column(batch, version, field)?);
    }
    // The row count is explicit: a projection may ask for no column at all (`count(*)`).
    let options = datafusion::arrow::array::RecordBatchOptions::new().with_row_count(Some(rows));
    Ok(RecordBatch::try_new_with_options(
        target.clone(),
        columns,
        &options,
    )?)
}

/// Column `field` of the history schema from a batch written under `version` (null if the
/// batch does not have it).
pub(crate) fn adapt_column(
    batch: &RecordBatch,
    version: &RelationVersion,
    field: &Field,
) -> Result<ArrayRef> {
    Ok(match batch.column_by_name(field.name()) {
        None => new_null_array(field.data_type(), batch.num_rows()),
        Some(source) if source.data_type() == field.data_type() => source.clone(),
        Some(source) => match (source.data_type(), field.data_type()) {
            (DataType::Struct(_), DataType::Struct(target_fields))
                if matches!(field.name().as_str(), "before" | "after") =>
            {
                adapt_row(source, version, target_fields)?
            }
            _ => cast_with_options(source, field.data_type(), &strict())?,
        },
    })
}

fn adapt_row(
    source: &ArrayRef,
    version: &RelationVersion,
    target_fields: &Fields,
) -> Result<ArrayRef> {
    let source = source
        .as_any()
        .downcast_ref::<StructArray>()
        .ok_or_else(|| DataFusionError::Internal("row image is not a struct".into()))?;
    let rows = source.len();
    let mut columns = Vec::with_capacity(target_fields.len());
    for field in target_fields {
        let position = version.columns.iter().position(|c| &c.name == field.name());
        let column = match position {
            None => new_null_array(field.data_type(), rows),
            Some(i) => {
                adapt_image_column(source.column(i), &version.columns[i], field.data_type())?
            }
        };
        columns.push(column);
    }
    Ok(Arc::new(StructArray::try_new(
        target_fields.clone(),
        columns,
        source.nulls().cloned(),
    )?))
}

/// The values of one row-image column as `column` stored them, in the history's type for it:
/// as stored while every version agrees, else PostgreSQL's text of each value (exact).
pub(crate) fn adapt_image_column(
    values: &ArrayRef,
    column: &Column,
    target: &DataType,
) -> Result<ArrayRef> {
    if values.data_type() == target {
        Ok(values.clone())
    } else if target == &DataType::Utf8 {
        // The column's type changed across versions: PostgreSQL's text, exact.
        let kind = PgKind::of(column.type_oid, column.type_modifier);
        let mut b = StringBuilder::new();
        for r in 0..values.len() {
            b.append_option(render(&kind, values.as_ref(), r));
        }
        Ok(Arc::new(b.finish()))
    } else {
        Ok(cast_with_options(values, target, &strict())?)
    }
}
