//! `pgtrail.schema_versions`: every schema version of every table the archive holds, with the
//! position and time from which it applies.
//!
//! A version applies from the first change written under it (`valid_from`, the key PostgreSQL's
//! Relation message came before). Its time is that change's commit time, read from the log tail,
//! the snapshot list or the segment holding it; when none holds it, the time is NULL, not a
//! neighbour's. Types print as `format_type` prints them (see [`pgtrail_store::format_type`]).

use std::sync::Arc;

use datafusion::arrow::array::{
    ArrayRef, ListBuilder, RecordBatch, StringBuilder, TimestampMicrosecondBuilder, UInt32Builder,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::error::Result;
use pgtrail_store::{ChangeKey, format_type};

use crate::archive::{ArchiveSnapshot, TableHistory};
use crate::read::{Bounds, for_each_change_where};

/// The table's columns.
pub(crate) fn schema() -> SchemaRef {
    let list = || DataType::List(Arc::new(Field::new("item", DataType::Utf8, true)));
    Arc::new(Schema::new(vec![
        Field::new("table_name", DataType::Utf8, false),
        Field::new("relation_id", DataType::UInt32, false),
        Field::new("version", DataType::UInt32, false),
        Field::new("valid_from_lsn", DataType::Utf8, false),
        Field::new("valid_from_seq", DataType::UInt32, false),
        Field::new(
            "valid_from_at",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            true,
        ),
        Field::new("replica_identity", DataType::Utf8, false),
        Field::new("columns", DataType::Utf8, false),
        Field::new("column_names", list(), false),
        Field::new("column_types", list(), false),
        Field::new("primary_key", list(), false),
    ]))
}

/// Its rows (finding a version's time may read a segment: called off the async runtime).
pub(crate) fn batch(archive: &ArchiveSnapshot, schema: SchemaRef) -> Result<RecordBatch> {
    let mut table_name = StringBuilder::new();
    let mut relation_id = UInt32Builder::new();
    let mut version = UInt32Builder::new();
    let mut lsn = StringBuilder::new();
    let mut seq = UInt32Builder::new();
    let mut at = TimestampMicrosecondBuilder::new().with_timezone("UTC");
    let mut identity = StringBuilder::new();
    let mut columns = StringBuilder::new();
    let mut names = ListBuilder::new(StringBuilder::new());
    let mut types = ListBuilder::new(StringBuilder::new());
    let mut primary_key = ListBuilder::new(StringBuilder::new());
    for table in archive.tables.values() {
        for (i, v) in table.versions.iter().enumerate() {
            table_name.append_value(table.qualified_name());
            relation_id.append_value(v.relation_id);
            version.append_value(i as u32 + 1);
            lsn.append_value(v.valid_from.commit_lsn.to_string());
            seq.append_value(v.valid_from.seq);
            at.append_option(version_time(archive, table, v.valid_from)?);
            identity.append_value(match v.replica_identity {
                b'd' => "default",
                b'n' => "nothing",
                b'f' => "full",
                b'i' => "index",
                _ => "unknown",
            });
            let typed: Vec<(String, String)> = v
                .columns
                .iter()
                .map(|c| {
                    let ty = format_type(c.type_oid, c.type_modifier, &archive.types);
                    (c.name.clone(), ty)
                })
                .collect();
            columns.append_value(
                typed
                    .iter()
                    .map(|(n, t)| format!("{} {t}", pgtrail_store::quote_ident(n)))
                    .collect::<Vec<_>>()
                    .join(", "),
            );
            names.append_value(typed.iter().map(|(n, _)| Some(n.as_str())));
            types.append_value(typed.iter().map(|(_, t)| Some(t.as_str())));
            primary_key.append_value(v.primary_key.iter().map(|k| Some(k.as_str())));
        }
    }
    let arrays: Vec<ArrayRef> = vec![
        Arc::new(table_name.finish()),
        Arc::new(relation_id.finish()),
        Arc::new(version.finish()),
        Arc::new(lsn.finish()),
        Arc::new(seq.finish()),
        Arc::new(at.finish()),
        Arc::new(identity.finish()),
        Arc::new(columns.finish()),
        Arc::new(names.finish()),
        Arc::new(types.finish()),
        Arc::new(primary_key.finish()),
    ];
    Ok(RecordBatch::try_new(schema, arrays)?)
}

/// The commit time of the transaction at `from`, if the archive holds any change of it.
pub(crate) fn version_time(
    archive: &ArchiveSnapshot,
    table: &TableHistory,
    from: ChangeKey,
) -> Result<Option<i64>> {
    if let Some(snapshot) = archive.snapshots.iter().find(|s| s.lsn == from.commit_lsn) {
        return Ok(Some(snapshot.committed_at_us));
    }
    let lsn = from.commit_lsn.0;
    let bounds = Bounds {
        lsn: (lsn, lsn),
        ..Bounds::default()
    };
    let mut found = None;
    for_each_change_where(
        archive,
        table,
        bounds,
        |seg| bounds.overlaps(seg),
        |key, _| key.commit_lsn == from.commit_lsn,
        |_, _, rec| {
            found.get_or_insert(rec.committed_at_us);
            Ok(())
        },
    )?;
    Ok(found)
}
