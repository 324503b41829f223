//! JSON values in answers: a `json` or `jsonb` column (and an array of them) comes out of
//! SQL with Arrow's canonical `arrow.json` extension type on its field, so that JSON output
//! embeds the values as JSON rather than as strings of JSON text, and tools reading a Parquet
//! answer know the text is JSON.
//!
//! Segments do not carry the mark (their format stays as written): it is added where an
//! answer leaves the query layer (`as_of`, `diff`, `row_history`, the history tables and the
//! `changes` view). A column is marked only when every schema version that has it holds JSON:
//! a column retyped from `text` to `jsonb` keeps older values that are not JSON, so it stays
//! text.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, ListArray, RecordBatch, StructArray};
use datafusion::arrow::datatypes::{DataType, Field, FieldRef, Fields, Schema};
use datafusion::arrow::error::ArrowError;
use datafusion::arrow::json::writer::{EncoderFactory, EncoderOptions, NullableEncoder};
use datafusion::arrow::json::{Encoder, LineDelimitedWriter, WriterBuilder};
use datafusion::error::Result;
use pgtrail_store::RelationVersion;
use pgtrail_store::segment::PgKind;

/// What a column holds, for marking.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Holds {
    Json,
    JsonArray,
    Other,
}

fn holds(kind: &PgKind) -> Holds {
    match kind {
        PgKind::Json => Holds::Json,
        PgKind::Array(e) if **e == PgKind::Json => Holds::JsonArray,
        _ => Holds::Other,
    }
}

/// The columns of a table's history that hold JSON in every version that has them.
#[derive(Clone, Debug, Default)]
pub struct JsonColumns(BTreeMap<String, Holds>);

impl JsonColumns {
    pub fn of<'v>(versions: impl IntoIterator<Item = &'v RelationVersion>) -> JsonColumns {
        let mut seen: BTreeMap<String, Holds> = BTreeMap::new();
        for version in versions {
            for c in &version.columns {
                let h = holds(&PgKind::of(c.type_oid, c.type_modifier));
                seen.entry(c.name.clone())
                    .and_modify(|before| {
                        if *before != h {
                            *before = Holds::Other;
                        }
                    })
                    .or_insert(h);
            }
        }
        seen.retain(|_, h| *h != Holds::Other);
        JsonColumns(seen)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `field` (a column of the table, by name) marked if it holds JSON and is stored as text.
    fn column(&self, field: &Field) -> Field {
        match (self.0.get(field.name()), field.data_type()) {
            (Some(Holds::Json), DataType::Utf8) => json_field(field.clone()),
            (Some(Holds::JsonArray), DataType::List(element))
                if element.data_type() == &DataType::Utf8 =>
            {
                // The element field carries the canonical mark; arrow's JSON writer encodes a
                // list's values under the list's own field, so that field says it too (in a
                // key of pgtrail's: the canonical type's storage is text, never a list).
                let element = json_field(element.as_ref().clone());
                let mut metadata = field.metadata().clone();
                metadata.insert(JSON_ELEMENTS_KEY.into(), "true".into());
                field
                    .clone()
                    .with_data_type(DataType::List(Arc::new(element)))
                    .with_metadata(metadata)
            }
            _ => field.clone(),
        }
    }

    /// A field of an answer: a column of the table (`images` false), or a row image
    /// (`before`, `after`) whose fields are columns.
    fn answer_field(&self, field: &Field, images: bool) -> Field {
        if !images {
            return self.column(field);
        }
        match field.data_type() {
            DataType::Struct(children) if is_image(field.name()) => {
                let children: Fields = children.iter().map(|c| self.column(c)).collect();
                field.clone().with_data_type(DataType::Struct(children))
            }
            _ => field.clone(),
        }
    }

    /// The schema of an answer with JSON columns marked: `images` says whether its columns
    /// are row images (`diff`, `row_history`, history tables) or the table's own (`as_of`).
    pub fn schema(&self, schema: &Schema, images: bool) -> Arc<Schema> {
        let fields: Vec<Field> = schema
            .fields()
            .iter()
            .map(|f| self.answer_field(f, images))
            .collect();
        Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone()))
    }

    /// `batch` with its JSON columns marked (the values are shared, not copied).
    pub fn batch(&self, batch: &RecordBatch, images: bool) -> Result<RecordBatch> {
        if self.is_empty() {
            return Ok(batch.clone());
        }
        let schema = self.schema(&batch.schema(), images);
        relabel_batch(batch, schema)
    }
}

fn is_image(name: &str) -> bool {
    name == "before" || name == "after"
}

/// Arrow's field metadata keys for an extension type (`arrow_schema::extension`, which the
/// `arrow` crate does not re-export), and the canonical JSON type's name.
const EXTENSION_NAME_KEY: &str = "ARROW:extension:name";
const EXTENSION_METADATA_KEY: &str = "ARROW:extension:metadata";
const JSON_EXTENSION: &str = "arrow.json";
/// On a list field: its elements are JSON text.
const JSON_ELEMENTS_KEY: &str = "pgtrail:json_elements";

/// `field` marked as holding JSON text.
pub fn json_field(field: Field) -> Field {
    let mut metadata = field.metadata().clone();
    metadata.insert(EXTENSION_NAME_KEY.into(), JSON_EXTENSION.into());
    // The canonical JSON type's metadata is empty.
    metadata.insert(EXTENSION_METADATA_KEY.into(), String::new());
    field.with_metadata(metadata)
}

/// Whether `field` is marked as holding JSON text.
pub fn is_json(field: &Field) -> bool {
    field.extension_type_name() == Some(JSON_EXTENSION)
}

/// `batch`'s columns under `schema`, whose types differ from theirs at most in the metadata
/// of nested fields.
pub fn relabel_batch(batch: &RecordBatch, schema: Arc<Schema>) -> Result<RecordBatch> {
    let columns = batch
        .columns()
        .iter()
        .zip(schema.fields())
        .map(|(c, f)| relabel(c, f.data_type()))
        .collect::<Result<Vec<_>>>()?;
    let options =
        datafusion::arrow::array::RecordBatchOptions::new().with_row_count(Some(batch.num_rows()));
    Ok(RecordBatch::try_new_with_options(
        schema, columns, &options,
    )?)
}

/// `array` as `target`, a type equal to its own but for nested fields' metadata.
pub fn relabel(array: &ArrayRef, target: &DataType) -> Result<ArrayRef> {
    if array.data_type() == target {
        return Ok(array.clone());
    }
    Ok(match target {
        DataType::List(element) => {
            let list = array.as_list::<i32>();
            Arc::new(ListArray::try_new(
                element.clone(),
                list.offsets().clone(),
                relabel(list.values(), element.data_type())?,
                list.nulls().cloned(),
            )?)
        }
        DataType::Struct(fields) => {
            let s = array.as_struct();
            if fields.is_empty() {
                Arc::new(StructArray::new_empty_fields(s.len(), s.nulls().cloned()))
            } else {
                let columns = s
                    .columns()
                    .iter()
                    .zip(fields)
                    .map(|(c, f)| relabel(c, f.data_type()))
                    .collect::<Result<Vec<_>>>()?;
                Arc::new(StructArray::try_new(
                    fields.clone(),
                    columns,
                    s.nulls().cloned(),
                )?)
            }
        }
        _ => array.clone(),
    })
}

/// Writes the text of a JSON-marked string column as it is (JSON inside the output's JSON),
/// with line breaks (whitespace outside strings in valid JSON) as spaces so that a line stays
/// one record. A text that does not parse as JSON is written as a string: never invalid output.
struct EmbeddedJson<'a> {
    array: &'a datafusion::arrow::array::StringArray,
}

impl Encoder for EmbeddedJson<'_> {
    fn encode(&mut self, idx: usize, out: &mut Vec<u8>) {
        let text = self.array.value(idx);
        if is_json_text(text) {
            out.extend(text.bytes().map(|b| match b {
                b'\n' | b'\r' => b' ',
                b => b,
            }));
        } else {
            // `to_writer` on a `&str` cannot fail writing into a Vec.
            let _ = serde_json::to_writer(&mut *out, text);
        }
    }
}

#[derive(Debug)]
struct EmbedJson;

impl EncoderFactory for EmbedJson {
    fn make_default_encoder<'a>(
        &self,
        field: &'a FieldRef,
        array: &'a dyn Array,
        _options: &'a EncoderOptions,
    ) -> std::result::Result<Option<NullableEncoder<'a>>, ArrowError> {
        // A list's values come here under the list's own field.
        let marked = is_json(field) || field.metadata().contains_key(JSON_ELEMENTS_KEY);
        if !marked || array.data_type() != &DataType::Utf8 {
            return Ok(None);
        }
        let array = array.as_string::<i32>();
        Ok(Some(NullableEncoder::new(
            Box::new(EmbeddedJson { array }),
            array.nulls().cloned(),
        )))
    }
}

/// Whether `text` is one JSON value.
pub fn is_json_text(text: &str) -> bool {
    serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok()
}

/// `batches` as JSON lines (one object per row), JSON-marked columns embedded as JSON. A SQL
/// NULL is written as `null`, not left out: every line has every column.
pub fn write_json_lines<W: Write>(sink: W, batches: &[RecordBatch]) -> Result<W> {
    let mut w: LineDelimitedWriter<W> = WriterBuilder::new()
        .with_explicit_nulls(true)
        .with_encoder_factory(Arc::new(EmbedJson))
        .build(sink);
    for b in batches {
        w.write(b)?;
    }
    w.finish()?;
    Ok(w.into_inner())
}
