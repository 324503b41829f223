//! Segments: immutable, typed, zstd-compressed Parquet files holding the changes of one table
//! (one schema version) or the archive's logical messages, sorted by `(lsn, seq)`.
//!
//! # Table segment columns
//!
//! | column           | Arrow type                          | meaning |
//! |------------------|-------------------------------------|---------|
//! | `lsn`            | UInt64                              | commit LSN of the source transaction |
//! | `seq`            | UInt32                              | position of the change in its transaction |
//! | `xid`            | UInt32                              | source transaction id |
//! | `committed_at`   | Timestamp(µs, UTC)                  | commit time of the source transaction |
//! | `op`             | Dictionary(Int8, Utf8)              | `insert`, `update`, `delete`, `truncate`, `snapshot` |
//! | `context`        | Utf8, nullable                      | application context (JSON text) |
//! | `changed`        | List(Utf8), nullable                | updates: the columns whose value changed (or whose old value is unknown) |
//! | `before`         | Struct of the table's columns       | the row before the change (updates, deletes) |
//! | `after`          | Struct of the table's columns       | the row after the change (inserts, snapshot rows, updates) |
//! | `before_unknown` | List(Utf8), nullable                | columns of `before` whose value PostgreSQL did not send and the archive could not fill (they read as null in `before`) |
//! | `after_unknown`  | List(Utf8), nullable                | the same for `after` (unchanged TOAST with no earlier version) |
//! | `before_text`    | Map(Utf8 → Utf8), nullable          | PostgreSQL's exact text of values that do not fit their Arrow type (the typed field is null) |
//! | `after_text`     | Map(Utf8 → Utf8), nullable          | the same for `after` |
//!
//! Struct field types follow [`PgKind`]. A zero-column table has no `before`/`after` columns.
//!
//! # Message segment columns
//!
//! `lsn`, `seq`, `xid`, `committed_at` as above, then `transactional` (Boolean), `prefix`
//! (Utf8), `content` (Binary) and `content_text` (Utf8, null when the content is not UTF-8).
//!
//! # File metadata
//!
//! The Parquet key-value metadata `pgtrail.segment` holds JSON with the format version, the
//! relation version (schema, name, columns with PostgreSQL type OID and modifier, primary key)
//! and the key range, so a segment explains itself to any reader. Columns of an enum type (or
//! an array of one, or a domain over either) are named in `enums`, with the enum's qualified
//! name and its labels in sort order as the capture last found them before the segment was
//! written; the values are text, which Parquet stores dictionary-encoded.

pub mod key_copy;
pub mod key_index;
mod reader;
mod types;
mod writer;

use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef, TimeUnit};

use crate::relation::RelationVersion;

pub use reader::{
    RowGroupRange, RowKeys, RowSpan, SegmentReader, erase_message_contents, message_content_erased,
    read_records, read_row_keys, row_group_ranges, row_group_spans, sha256_file,
};
pub use types::{
    DoesNotFit, PgKind, ValueBuilder, civil_from_days, days_from_civil, format_utc_micros,
    parse_array, render,
};
pub(crate) use writer::hex;
pub use writer::{SegmentOptions, SegmentWriter, WrittenSegment, records_to_batch};

/// The version of the segment layout described above.
pub const SEGMENT_FORMAT_VERSION: u32 = 1;
/// The Parquet key-value metadata key of a segment's self-description.
pub const SEGMENT_METADATA_KEY: &str = "pgtrail.segment";

/// What a segment holds.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SegmentContent {
    /// Changes of one relation version.
    Table(RelationVersion),
    /// Logical decoding messages that are not application context.
    Messages,
}

impl SegmentContent {
    /// The name queries use: `schema.table` (quoted as PostgreSQL would), or `pgtrail.messages`.
    pub fn table_name(&self) -> String {
        match self {
            SegmentContent::Table(rel) => rel.qualified_name(),
            SegmentContent::Messages => "pgtrail.messages".into(),
        }
    }

    /// The name the evidence's scopes use (bundles, certificates, holds, purges): `schema.table`
    /// unquoted, as the leaf holds it; `None` for messages.
    pub fn scope_name(&self) -> Option<String> {
        match self {
            SegmentContent::Table(rel) => Some(format!("{}.{}", rel.schema, rel.name)),
            SegmentContent::Messages => None,
        }
    }
}

fn metadata_fields() -> Vec<Field> {
    vec![
        Field::new("lsn", DataType::UInt64, false),
        Field::new("seq", DataType::UInt32, false),
        Field::new("xid", DataType::UInt32, false),
        Field::new(
            "committed_at",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
    ]
}

fn names_list() -> DataType {
    DataType::List(Arc::new(Field::new("item", DataType::Utf8, true)))
}

fn text_map() -> DataType {
    let entries = Field::new(
        "entries",
        DataType::Struct(Fields::from(vec![
            Field::new("keys", DataType::Utf8, false),
            Field::new("values", DataType::Utf8, true),
        ])),
        false,
    );
    DataType::Map(Arc::new(entries), false)
}

/// The struct type of a row image of `rel`.
pub fn row_struct_fields(rel: &RelationVersion) -> Fields {
    rel.columns
        .iter()
        .map(|c| {
            Field::new(
                &c.name,
                PgKind::of(c.type_oid, c.type_modifier).arrow_type(),
                true,
            )
        })
        .collect()
}

/// The Arrow schema of a segment holding `content`.
pub fn segment_schema(content: &SegmentContent) -> SchemaRef {
    let mut fields = metadata_fields();
    match content {
        SegmentContent::Table(rel) => {
            fields.push(Field::new(
                "op",
                DataType::Dictionary(Box::new(DataType::Int8), Box::new(DataType::Utf8)),
                false,
            ));
            fields.push(Field::new("context", DataType::Utf8, true));
            fields.push(Field::new("changed", names_list(), true));
            if !rel.columns.is_empty() {
                let row = DataType::Struct(row_struct_fields(rel));
                fields.push(Field::new("before", row.clone(), true));
                fields.push(Field::new("after", row, true));
            }
            fields.push(Field::new("before_unknown", names_list(), true));
            fields.push(Field::new("after_unknown", names_list(), true));
            fields.push(Field::new("before_text", text_map(), true));
            fields.push(Field::new("after_text", text_map(), true));
        }
        SegmentContent::Messages => {
            fields.push(Field::new("transactional", DataType::Boolean, false));
            fields.push(Field::new("prefix", DataType::Utf8, false));
            fields.push(Field::new("content", DataType::Binary, false));
            fields.push(Field::new("content_text", DataType::Utf8, true));
        }
    }
    Arc::new(Schema::new(fields))
}
