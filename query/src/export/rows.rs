//! Typed rows for the lake layouts: a table's columns flattened (merged across schema
//! versions), then the layout's metadata columns.
//!
//! A value that does not fit its column's Arrow type stays exact: the column is null and the
//! value is in `_exact_text` (column -> PostgreSQL's text). A value the archive never received
//! (an unchanged TOASTed column with no earlier version) is null and named in
//! `_unknown_columns`, so it is never mistaken for NULL.

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, BooleanBuilder, Int64Builder, ListBuilder, MapBuilder, RecordBatch,
    StringBuilder, TimestampMicrosecondBuilder,
};
use datafusion::arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef, TimeUnit};
use pgtrail_store::segment::{PgKind, ValueBuilder};
use pgtrail_store::{Cell, RelationVersion, Row};

use super::ExportError;

/// The type of one metadata column.
#[derive(Clone, Copy)]
pub enum MetaType {
    Text,
    Int64,
    Timestamp,
    Bool,
}

/// One metadata value of a row.
#[derive(Clone, Copy)]
pub enum MetaValue<'a> {
    Text(Option<&'a str>),
    Int64(Option<i64>),
    Timestamp(Option<i64>),
    Bool(bool),
}

enum MetaBuilder {
    Text(StringBuilder),
    Int64(Int64Builder),
    Timestamp(TimestampMicrosecondBuilder),
    Bool(BooleanBuilder),
}

/// The Arrow type of a timestamp column (µs, UTC), as the segments use.
pub fn timestamp_type() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

/// The schema of a lake layout's files.
pub fn lake_schema(columns: &Fields, meta: &[(&str, MetaType)]) -> SchemaRef {
    let mut fields: Vec<Field> = columns.iter().map(|f| f.as_ref().clone()).collect();
    for (name, ty) in meta {
        let (data_type, nullable) = match ty {
            MetaType::Text => (DataType::Utf8, true),
            MetaType::Int64 => (DataType::Int64, true),
            MetaType::Timestamp => (timestamp_type(), true),
            MetaType::Bool => (DataType::Boolean, false),
        };
        fields.push(Field::new(*name, data_type, nullable));
    }
    fields.push(Field::new(
        "_unknown_columns",
        DataType::List(Arc::new(Field::new_list_field(DataType::Utf8, true))),
        true,
    ));
    let map = MapBuilder::new(None, StringBuilder::new(), StringBuilder::new()).finish();
    fields.push(Field::new("_exact_text", map.data_type().clone(), true));
    Arc::new(Schema::new(fields))
}

/// Builds batches of one lake layout for one table.
pub struct LakeRows {
    schema: SchemaRef,
    columns: Fields,
    values: Vec<ValueBuilder>,
    meta: Vec<MetaBuilder>,
    unknown: ListBuilder<StringBuilder>,
    exact: MapBuilder<StringBuilder, StringBuilder>,
    /// Per schema version (by address): the version's column index of each output column.
    positions: HashMap<usize, Vec<Option<usize>>>,
    rows: usize,
}

impl LakeRows {
    /// `columns` are the merged columns of `versions` (which must include every version a
    /// pushed row belongs to).
    pub fn new(
        columns: &Fields,
        versions: &[RelationVersion],
        meta: &[(&str, MetaType)],
    ) -> LakeRows {
        let kinds: Vec<PgKind> = columns
            .iter()
            .map(|f| {
                let latest = versions
                    .iter()
                    .rev()
                    .find_map(|v| v.columns.iter().find(|c| &c.name == f.name()));
                match latest.map(|c| PgKind::of(c.type_oid, c.type_modifier)) {
                    // A column whose type changed across versions is PostgreSQL's text.
                    Some(kind) if &kind.arrow_type() == f.data_type() => kind,
                    _ => PgKind::Text,
                }
            })
            .collect();
        let values = kinds.iter().map(ValueBuilder::new).collect();
        let meta_builders = meta
            .iter()
            .map(|(_, ty)| match ty {
                MetaType::Text => MetaBuilder::Text(StringBuilder::new()),
                MetaType::Int64 => MetaBuilder::Int64(Int64Builder::new()),
                MetaType::Timestamp => {
                    MetaBuilder::Timestamp(TimestampMicrosecondBuilder::new().with_timezone("UTC"))
                }
                MetaType::Bool => MetaBuilder::Bool(BooleanBuilder::new()),
            })
            .collect();
        LakeRows {
            schema: lake_schema(columns, meta),
            columns: columns.clone(),
            values,
            meta: meta_builders,
            unknown: ListBuilder::new(StringBuilder::new()),
            exact: MapBuilder::new(None, StringBuilder::new(), StringBuilder::new()),
            positions: HashMap::new(),
            rows: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.rows
    }

    /// Append one row image of `version` (or an all-null row for `None`) with its metadata.
    pub fn push(
        &mut self,
        image: Option<(&RelationVersion, &Row)>,
        meta: &[MetaValue],
    ) -> Result<(), ExportError> {
        let mut unknown: Vec<&str> = Vec::new();
        let mut exact: Vec<(&str, &str)> = Vec::new();
        let positions: Option<&Vec<Option<usize>>> = match image {
            Some((version, _)) => {
                let address = std::ptr::from_ref(version) as usize;
                let columns = &self.columns;
                Some(self.positions.entry(address).or_insert_with(|| {
                    columns
                        .iter()
                        .map(|f| version.columns.iter().position(|c| &c.name == f.name()))
                        .collect()
                }))
            }
            None => None,
        };
        for (i, builder) in self.values.iter_mut().enumerate() {
            let cell = match (image, positions) {
                (Some((_, row)), Some(p)) => p[i].and_then(|j| row.get(j)),
                _ => None,
            };
            let name = self.columns[i].name().as_str();
            match cell {
                Some(Cell::Text(text)) => {
                    if builder.append_text(text).is_err() {
                        builder.append_null();
                        exact.push((name, text));
                    }
                }
                Some(Cell::Unknown) => {
                    builder.append_null();
                    unknown.push(name);
                }
                Some(Cell::Null) | None => builder.append_null(),
            }
        }
        if meta.len() != self.meta.len() {
            return Err(ExportError::Internal(format!(
                "{} metadata values for {} columns",
                meta.len(),
                self.meta.len()
            )));
        }
        for (builder, value) in self.meta.iter_mut().zip(meta) {
            match (builder, value) {
                (MetaBuilder::Text(b), MetaValue::Text(v)) => b.append_option(*v),
                (MetaBuilder::Int64(b), MetaValue::Int64(v)) => b.append_option(*v),
                (MetaBuilder::Timestamp(b), MetaValue::Timestamp(v)) => b.append_option(*v),
                (MetaBuilder::Bool(b), MetaValue::Bool(v)) => b.append_value(*v),
                _ => {
                    return Err(ExportError::Internal(
                        "metadata value of the wrong type".into(),
                    ));
                }
            }
        }
        if unknown.is_empty() {
            self.unknown.append_null();
        } else {
            for name in unknown {
                self.unknown.values().append_value(name);
            }
            self.unknown.append(true);
        }
        if exact.is_empty() {
            self.exact.append(false)?;
        } else {
            for (name, text) in exact {
                self.exact.keys().append_value(name);
                self.exact.values().append_value(text);
            }
            self.exact.append(true)?;
        }
        self.rows += 1;
        Ok(())
    }

    /// The rows appended since the last call, as a batch.
    pub fn finish(&mut self) -> Result<RecordBatch, ExportError> {
        let mut arrays: Vec<ArrayRef> = self.values.iter_mut().map(ValueBuilder::finish).collect();
        for builder in &mut self.meta {
            arrays.push(match builder {
                MetaBuilder::Text(b) => Arc::new(b.finish()),
                MetaBuilder::Int64(b) => Arc::new(b.finish()),
                MetaBuilder::Timestamp(b) => Arc::new(b.finish()),
                MetaBuilder::Bool(b) => Arc::new(b.finish()),
            });
        }
        arrays.push(Arc::new(self.unknown.finish()));
        arrays.push(Arc::new(self.exact.finish()));
        self.rows = 0;
        Ok(RecordBatch::try_new(self.schema.clone(), arrays)?)
    }
}
