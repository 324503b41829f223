//! Delta Lake tables over an export's files (`--table-format delta`).
//!
//! Each exported source table becomes one Delta table rooted at its `table=<schema>.<table>`
//! directory: the run's Parquet files, written as for the plain layouts, plus a `_delta_log` of
//! JSON commits that this module writes itself. One commit per run and table holds the run's
//! files (`add`), for scd2 the removal of the replaced current-state file (`remove`), the
//! schema when it is new or grew (`metaData`), and Delta's exactly-once record (`txn`, with the
//! run's through-LSN as its version). A commit is one object created only if absent
//! (`_delta_log/<version>.json`: a hard link on a directory, `If-None-Match: *` on S3), so a
//! commit is whole or absent, and two writers never both take a version.
//!
//! Why not `delta_kernel`: pgtrail keeps its own Parquet writer, file names and destination,
//! and needs from a Delta library only these few actions; the kernel's create-table is
//! internal API, its remove takes scan metadata, its default engine brings a second reqwest,
//! and its API changes every minor release (see the README's Table formats).

use std::collections::BTreeMap;
use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, FixedSizeBinaryArray, ListArray, MapArray, RecordBatch, StringArray,
    StructArray,
};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{
    DataType, Field, FieldRef, Fields, Schema, SchemaRef, Time64MicrosecondType, TimeUnit,
};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::destination::Destination;
use super::{ExportError, Layout, WrittenFile};

const LOG_DIR: &str = "_delta_log";

/// The characters Delta forbids in column names unless column mapping is on.
const FORBIDDEN_IN_NAMES: &[char] = &[' ', ',', ';', '{', '}', '(', ')', '\n', '\t', '='];

/// How a source table's Delta table is partitioned: the column name in the Delta schema, its
/// Delta type, and the directory key the plain layout writes (`date=…`).
pub(super) fn partition_column(layout: Layout) -> (&'static str, &'static str, &'static str) {
    match layout {
        // The changes layout's columns are fixed (no table column can clash with `date`);
        // the others carry the table's own columns, so their partition column takes the `_`
        // prefix of the layouts' other metadata columns.
        Layout::Changes => ("date", "date", "date"),
        Layout::Cdf => ("_commit_date", "date", "date"),
        Layout::Scd2 => ("_state", "string", "state"),
        Layout::Snapshot => ("_snapshot_lsn", "string", "snapshot_lsn"),
    }
}

/// The exactly-once identity of one exported table in Delta's `txn` action.
pub(super) fn app_id(source: &str, layout: Layout, table: &str) -> String {
    format!("pgtrail {source} layout {} table {table}", layout.name())
}

/// A table id in UUID form, a function of the app id: a table created again after a crash
/// before its first commit gets the same id.
fn table_id(app_id: &str) -> String {
    let d = Sha256::digest(app_id.as_bytes());
    let h: String = d[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-8{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[16..20],
        &h[20..32]
    )
}

/// The Arrow schema of a Delta export's files: types Delta has no equivalent of become text
/// (`time` as PostgreSQL writes it, `uuid` in its hyphenated form), unsigned integers become
/// `long`. Every other type is kept.
pub(super) fn file_schema(schema: &Schema) -> SchemaRef {
    Arc::new(Schema::new_with_metadata(
        schema.fields().iter().map(delta_field).collect::<Vec<_>>(),
        schema.metadata().clone(),
    ))
}

fn delta_field(f: &FieldRef) -> Field {
    f.as_ref().clone().with_data_type(delta_type(f.data_type()))
}

fn delta_type(t: &DataType) -> DataType {
    match t {
        DataType::Time64(_) | DataType::Time32(_) | DataType::FixedSizeBinary(_) => DataType::Utf8,
        DataType::UInt8 | DataType::UInt16 | DataType::UInt32 | DataType::UInt64 => DataType::Int64,
        DataType::Struct(fields) => {
            DataType::Struct(fields.iter().map(delta_field).collect::<Fields>())
        }
        DataType::List(item) => DataType::List(Arc::new(delta_field(item))),
        // Parquet's MAP names its entries `key_value` with `key` and `value` (Arrow's builder
        // writes `entries`, `keys`, `values`); DuckDB's Delta reader finds them by name.
        DataType::Map(entries, sorted) => match entries.data_type() {
            DataType::Struct(kv) if kv.len() == 2 => DataType::Map(
                Arc::new(Field::new(
                    "key_value",
                    DataType::Struct(Fields::from(vec![
                        Field::new("key", delta_type(kv[0].data_type()), false),
                        Field::new("value", delta_type(kv[1].data_type()), true),
                    ])),
                    false,
                )),
                *sorted,
            ),
            _ => t.clone(),
        },
        other => other.clone(),
    }
}

/// `batch` in `schema` (the [`file_schema`] of the batch's own schema).
pub(super) fn conform(batch: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch, ExportError> {
    let columns = batch
        .columns()
        .iter()
        .zip(schema.fields())
        .map(|(c, f)| conform_array(c, f.data_type()))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}

fn conform_array(array: &ArrayRef, to: &DataType) -> Result<ArrayRef, ExportError> {
    if array.data_type() == to {
        return Ok(array.clone());
    }
    Ok(match (array.data_type(), to) {
        (DataType::Time64(TimeUnit::Microsecond), DataType::Utf8) => {
            let times = array.as_primitive::<Time64MicrosecondType>();
            Arc::new(
                times
                    .iter()
                    .map(|t| t.map(time_text))
                    .collect::<StringArray>(),
            )
        }
        (DataType::FixedSizeBinary(16), DataType::Utf8) => {
            let uuids: &FixedSizeBinaryArray = array.as_fixed_size_binary();
            Arc::new(
                uuids
                    .iter()
                    .map(|u| u.map(uuid_text))
                    .collect::<StringArray>(),
            )
        }
        (DataType::Struct(_), DataType::Struct(fields)) => {
            let s = array.as_struct();
            let children = s
                .columns()
                .iter()
                .zip(fields.iter())
                .map(|(c, f)| conform_array(c, f.data_type()))
                .collect::<Result<Vec<_>, _>>()?;
            Arc::new(StructArray::try_new(
                fields.clone(),
                children,
                s.nulls().cloned(),
            )?)
        }
        (DataType::List(_), DataType::List(item)) => {
            let l = array.as_list::<i32>();
            let values = conform_array(l.values(), item.data_type())?;
            Arc::new(ListArray::try_new(
                item.clone(),
                l.offsets().clone(),
                values,
                l.nulls().cloned(),
            )?)
        }
        (DataType::Map(_, _), DataType::Map(entries, sorted)) => {
            let m = array.as_map();
            let DataType::Struct(kv) = entries.data_type() else {
                return Err(ExportError::Internal("a map without entries".into()));
            };
            let children = vec![
                conform_array(m.keys(), kv[0].data_type())?,
                conform_array(m.values(), kv[1].data_type())?,
            ];
            let renamed = StructArray::try_new(kv.clone(), children, None)?;
            Arc::new(MapArray::try_new(
                entries.clone(),
                m.offsets().clone(),
                renamed,
                m.nulls().cloned(),
                *sorted,
            )?)
        }
        _ => cast(array, to)?,
    })
}

/// A `time` as PostgreSQL writes it: `HH:MM:SS`, then the fraction without trailing zeros.
fn time_text(us: i64) -> String {
    let (secs, frac) = (us.div_euclid(1_000_000), us.rem_euclid(1_000_000));
    let mut s = format!(
        "{:02}:{:02}:{:02}",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60
    );
    if frac != 0 {
        let digits = format!("{frac:06}");
        s.push('.');
        s.push_str(digits.trim_end_matches('0'));
    }
    s
}

fn uuid_text(b: &[u8]) -> String {
    let h: String = b.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// The Delta type of an Arrow type of [`file_schema`]; `None` for a type Delta has not.
fn type_json(t: &DataType) -> Option<Value> {
    Some(match t {
        DataType::Boolean => json!("boolean"),
        DataType::Int8 => json!("byte"),
        DataType::Int16 => json!("short"),
        DataType::Int32 => json!("integer"),
        DataType::Int64 => json!("long"),
        DataType::Float32 => json!("float"),
        DataType::Float64 => json!("double"),
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => json!("string"),
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView => json!("binary"),
        DataType::Date32 => json!("date"),
        DataType::Timestamp(TimeUnit::Microsecond, Some(_)) => json!("timestamp"),
        DataType::Timestamp(TimeUnit::Microsecond, None) => json!("timestamp_ntz"),
        DataType::Decimal128(p, s) if *p <= 38 && *s >= 0 => json!(format!("decimal({p},{s})")),
        DataType::Struct(fields) => struct_json(fields).ok()?,
        DataType::List(item) => json!({
            "type": "array",
            "elementType": type_json(item.data_type())?,
            "containsNull": true,
        }),
        DataType::Map(entries, _) => {
            let DataType::Struct(kv) = entries.data_type() else {
                return None;
            };
            json!({
                "type": "map",
                "keyType": type_json(kv.first()?.data_type())?,
                "valueType": type_json(kv.get(1)?.data_type())?,
                "valueContainsNull": true,
            })
        }
        _ => return None,
    })
}

/// A Delta struct type. Every field is nullable in Delta's schema: a non-null Parquet column
/// reads as one, and a later file may lack the column (added by a later ALTER TABLE).
fn struct_json(fields: &Fields) -> Result<Value, String> {
    let mut out = Vec::with_capacity(fields.len());
    for f in fields {
        if let Some(c) = f.name().chars().find(|c| FORBIDDEN_IN_NAMES.contains(c)) {
            return Err(format!(
                "column {:?} has {c:?}, which Delta allows in column names only with column mapping (not written by pgtrail yet)",
                f.name()
            ));
        }
        let Some(t) = type_json(f.data_type()) else {
            return Err(format!(
                "column {:?} has the Arrow type {}, which has no Delta type",
                f.name(),
                f.data_type()
            ));
        };
        out.push(json!({"name": f.name(), "type": t, "nullable": true, "metadata": {}}));
    }
    Ok(json!({"type": "struct", "fields": out}))
}

/// The Delta schema (`schemaString`) of a table whose files have `schema`, with the layout's
/// partition column last.
pub(super) fn schema_string(
    schema: &Schema,
    layout: Layout,
    table: &str,
) -> Result<String, ExportError> {
    let (name, kind, _) = partition_column(layout);
    let bad = |why: String| ExportError::DeltaSchema {
        table: table.to_string(),
        why,
    };
    if schema.fields().iter().any(|f| f.name() == name) {
        return Err(bad(format!(
            "it has a column named {name:?}, the Delta table's partition column"
        )));
    }
    let mut value = struct_json(schema.fields()).map_err(bad)?;
    if let Some(fields) = value["fields"].as_array_mut() {
        fields.push(json!({"name": name, "type": kind, "nullable": true, "metadata": {}}));
    }
    Ok(value.to_string())
}

/// Whether the schema `new` keeps every column of `old` with the same type, nested fields
/// included (a column added by ALTER TABLE grows a table, and the changes layout's image
/// structs); `Err` names the first column that does not.
fn widens(old: &Value, new: &Value, path: &str) -> Result<(), String> {
    match (old, new) {
        (Value::String(a), Value::String(b)) if a == b => Ok(()),
        (Value::Object(a), Value::Object(b)) if a.get("type") == b.get("type") => {
            match a.get("type").and_then(Value::as_str) {
                Some("struct") => {
                    let empty = Vec::new();
                    let new_fields = b["fields"].as_array().unwrap_or(&empty);
                    for f in a["fields"].as_array().unwrap_or(&empty) {
                        let name = f["name"].as_str().unwrap_or_default();
                        let at = if path.is_empty() {
                            name.to_string()
                        } else {
                            format!("{path}.{name}")
                        };
                        let Some(g) = new_fields.iter().find(|g| g["name"] == f["name"]) else {
                            return Err(format!("column {at} is gone"));
                        };
                        widens(&f["type"], &g["type"], &at)?;
                    }
                    Ok(())
                }
                Some("array") => widens(&a["elementType"], &b["elementType"], path),
                Some("map") => {
                    widens(&a["keyType"], &b["keyType"], path)?;
                    widens(&a["valueType"], &b["valueType"], path)
                }
                _ => Err(format!("column {path} changed type")),
            }
        }
        _ => Err(format!("column {path} changed type from {old} to {new}")),
    }
}

/// A path in a Delta log: relative to the table root, percent-encoded as a URI.
fn uri_path(relative: &str) -> String {
    let mut out = String::with_capacity(relative.len());
    for b in relative.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/=".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn from_uri_path(uri: &str) -> String {
    let bytes = uri.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(b) = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What a read of a table's log found (the versions after the one pgtrail last committed).
#[derive(Debug, Default)]
pub(super) struct LogRead {
    /// The newest version in the log.
    pub latest: Option<u64>,
    /// The newest schema among the versions read.
    pub schema: Option<String>,
    /// This export's newest `txn` version among the versions read, and the files its commit
    /// added (paths relative to the destination) with their row counts.
    pub txn: Option<(i64, Vec<WrittenFile>)>,
}

/// One source table's Delta table at `root` (`table=<schema>.<table>`) under a destination.
pub(super) struct DeltaTable<'d> {
    dest: &'d Destination,
    root: String,
    app_id: String,
}

impl<'d> DeltaTable<'d> {
    pub fn new(dest: &'d Destination, root: String, app_id: String) -> DeltaTable<'d> {
        DeltaTable { dest, root, app_id }
    }

    fn commit_path(&self, version: u64) -> String {
        format!("{}/{LOG_DIR}/{version:020}.json", self.root)
    }

    fn bad_log(&self, path: &str, why: String) -> ExportError {
        ExportError::BadState {
            destination: self.dest.display().to_string(),
            path: path.to_string(),
            why,
        }
    }

    /// Read the commits after `after` (all of them when `None`), newest first, stopping once
    /// the newest schema and this export's newest `txn` are known.
    pub fn read(&self, after: Option<u64>) -> Result<LogRead, ExportError> {
        let prefix = format!("{}/{LOG_DIR}", self.root);
        let mut versions: Vec<u64> = self
            .dest
            .list(&prefix)?
            .iter()
            .filter_map(|p| p.rsplit('/').next())
            .filter_map(|name| name.strip_suffix(".json"))
            .filter(|stem| stem.len() == 20)
            .filter_map(|stem| stem.parse::<u64>().ok())
            .collect();
        versions.sort_unstable();
        let mut read = LogRead {
            latest: versions.last().copied(),
            ..LogRead::default()
        };
        for &version in versions.iter().rev() {
            if after.is_some_and(|a| version <= a) || (read.schema.is_some() && read.txn.is_some())
            {
                break;
            }
            let path = self.commit_path(version);
            let Some(bytes) = self.dest.get(&path)? else {
                continue;
            };
            let text = String::from_utf8(bytes)
                .map_err(|_| self.bad_log(&path, "it is not UTF-8".into()))?;
            let mut adds = Vec::new();
            let mut txn = None;
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                let action: Value = serde_json::from_str(line)
                    .map_err(|e| self.bad_log(&path, format!("a line is not JSON: {e}")))?;
                if let Some(meta) = action.get("metaData")
                    && read.schema.is_none()
                {
                    read.schema = meta["schemaString"].as_str().map(str::to_string);
                }
                if let Some(t) = action.get("txn")
                    && t["appId"].as_str() == Some(self.app_id.as_str())
                {
                    txn = t["version"].as_i64();
                }
                if let Some(add) = action.get("add") {
                    let rows = add["stats"]
                        .as_str()
                        .and_then(|s| serde_json::from_str::<Value>(s).ok())
                        .and_then(|s| s["numRecords"].as_u64())
                        .unwrap_or(0);
                    let relative = from_uri_path(add["path"].as_str().unwrap_or_default());
                    adds.push(WrittenFile {
                        path: format!("{}/{relative}", self.root),
                        rows,
                        bytes: add["size"].as_u64().unwrap_or(0),
                    });
                }
            }
            if let Some(v) = txn
                && read.txn.is_none()
            {
                read.txn = Some((v, adds));
            }
        }
        Ok(read)
    }

    /// Commit `version`: `files` added, `removed` (scd2's replaced current files) removed,
    /// `schema` when it is new or changed, and this export's `txn` at `through`. `Ok(false)`
    /// when the version exists already (another writer took it; nothing was written).
    #[allow(clippy::too_many_arguments)]
    pub fn commit(
        &self,
        version: u64,
        layout: Layout,
        schema: Option<&str>,
        files: &[WrittenFile],
        removed: &[String],
        through: i64,
        range: (&str, &str),
        now_ms: i64,
    ) -> Result<bool, ExportError> {
        let (partition, _, dir_key) = partition_column(layout);
        let append_only = layout != Layout::Scd2;
        let mut lines: Vec<Value> = vec![json!({"commitInfo": {
            "timestamp": now_ms,
            "operation": "WRITE",
            "operationParameters": {"mode": "Append"},
            "engineInfo": concat!("pgtrail/", env!("CARGO_PKG_VERSION")),
            "isBlindAppend": removed.is_empty(),
            "pgtrail": {"after_lsn": range.0, "through_lsn": range.1},
        }})];
        if version == 0 {
            // Reader 3 / writer 7 with the timestampNtz feature: `timestamp without time zone`
            // columns are timestamp_ntz; appendOnly guards the append-only layouts.
            let mut writer_features = vec!["timestampNtz"];
            if append_only {
                writer_features.push("appendOnly");
            }
            lines.push(json!({"protocol": {
                "minReaderVersion": 3,
                "minWriterVersion": 7,
                "readerFeatures": ["timestampNtz"],
                "writerFeatures": writer_features,
            }}));
        }
        if let Some(schema) = schema {
            let mut configuration = serde_json::Map::new();
            if append_only {
                configuration.insert("delta.appendOnly".into(), json!("true"));
            }
            lines.push(json!({"metaData": {
                "id": table_id(&self.app_id),
                "format": {"provider": "parquet", "options": {}},
                "schemaString": schema,
                "partitionColumns": [partition],
                "configuration": configuration,
                "createdTime": now_ms,
            }}));
        }
        let relative = |path: &str| -> Result<String, ExportError> {
            path.strip_prefix(&format!("{}/", self.root))
                .map(str::to_string)
                .ok_or_else(|| {
                    ExportError::Internal(format!("{path} is outside the table {}", self.root))
                })
        };
        let partition_value = |relative: &str| -> BTreeMap<&'static str, String> {
            let value = relative
                .split('/')
                .find_map(|part| part.strip_prefix(&format!("{dir_key}=")))
                .unwrap_or_default()
                .to_string();
            BTreeMap::from([(partition, value)])
        };
        for f in files {
            let rel = relative(&f.path)?;
            lines.push(json!({"add": {
                "path": uri_path(&rel),
                "partitionValues": partition_value(&rel),
                "size": f.bytes,
                "modificationTime": now_ms,
                "dataChange": true,
                "stats": json!({"numRecords": f.rows}).to_string(),
            }}));
        }
        for path in removed {
            let rel = relative(path)?;
            lines.push(json!({"remove": {
                "path": uri_path(&rel),
                "deletionTimestamp": now_ms,
                "dataChange": true,
                "extendedFileMetadata": false,
                "partitionValues": partition_value(&rel),
            }}));
        }
        lines.push(json!({"txn": {
            "appId": self.app_id,
            "version": through,
            "lastUpdated": now_ms,
        }}));
        let mut body = String::new();
        for line in &lines {
            body.push_str(&line.to_string());
            body.push('\n');
        }
        self.dest
            .put_if_absent(&self.commit_path(version), body.into_bytes())
    }
}

/// The schema a commit must record: `None` when the table's schema `current` already is
/// `wanted`; `wanted` when there is none yet or `wanted` only adds to it.
pub(super) fn schema_to_record<'a>(
    current: Option<&str>,
    wanted: &'a str,
    table: &str,
) -> Result<Option<&'a str>, ExportError> {
    let Some(current) = current else {
        return Ok(Some(wanted));
    };
    if current == wanted {
        return Ok(None);
    }
    let parse = |s: &str| serde_json::from_str::<Value>(s).unwrap_or(Value::Null);
    widens(&parse(current), &parse(wanted), "").map_err(|why| ExportError::DeltaSchema {
        table: table.to_string(),
        why: format!(
            "{why} since the table's earlier Delta exports (a Delta table's columns can be added, not retyped): export it to a new prefix, or use the plain layout, which reads both with union_by_name"
        ),
    })?;
    Ok(Some(wanted))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_uuids_are_written_as_postgresql_writes_them() {
        assert_eq!(time_text(0), "00:00:00");
        assert_eq!(
            time_text(13 * 3_600_000_000 + 5 * 60_000_000 + 7_500_000),
            "13:05:07.5"
        );
        assert_eq!(time_text(86_399_999_999), "23:59:59.999999");
        assert_eq!(
            uuid_text(&[
                0xa0, 0xee, 0xbc, 0x99, 0x9c, 0x0b, 0x4e, 0xf8, 0xbb, 0x6d, 0x6b, 0xb9, 0xbd, 0x38,
                0x0a, 0x11
            ]),
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"
        );
    }

    #[test]
    fn a_schema_may_gain_columns_and_nested_fields_but_not_lose_or_retype_them() {
        let s = |fields: Value| json!({"type": "struct", "fields": fields}).to_string();
        let old = s(json!([
            {"name": "id", "type": "long", "nullable": true, "metadata": {}},
            {"name": "after", "type": {"type": "struct", "fields": [
                {"name": "a", "type": "integer", "nullable": true, "metadata": {}}]},
             "nullable": true, "metadata": {}}
        ]));
        let grown = s(json!([
            {"name": "id", "type": "long", "nullable": true, "metadata": {}},
            {"name": "after", "type": {"type": "struct", "fields": [
                {"name": "a", "type": "integer", "nullable": true, "metadata": {}},
                {"name": "b", "type": "string", "nullable": true, "metadata": {}}]},
             "nullable": true, "metadata": {}},
            {"name": "extra", "type": "date", "nullable": true, "metadata": {}}
        ]));
        let retyped = s(json!([
            {"name": "id", "type": "long", "nullable": true, "metadata": {}},
            {"name": "after", "type": {"type": "struct", "fields": [
                {"name": "a", "type": "string", "nullable": true, "metadata": {}}]},
             "nullable": true, "metadata": {}}
        ]));
        assert_eq!(
            schema_to_record(None, &old, "t").unwrap(),
            Some(old.as_str())
        );
        assert_eq!(schema_to_record(Some(&old), &old, "t").unwrap(), None);
        assert_eq!(
            schema_to_record(Some(&old), &grown, "t").unwrap(),
            Some(grown.as_str())
        );
        let err = schema_to_record(Some(&old), &retyped, "t")
            .unwrap_err()
            .to_string();
        assert!(err.contains("after.a"), "{err}");
        let err = schema_to_record(Some(&grown), &old, "t")
            .unwrap_err()
            .to_string();
        assert!(err.contains("is gone"), "{err}");
    }

    #[test]
    fn paths_are_percent_encoded_uris_and_decode_back() {
        let p = "date=2026-11-26/changes 1%.parquet";
        assert_eq!(uri_path(p), "date=2026-11-26/changes%201%25.parquet");
        assert_eq!(from_uri_path(&uri_path(p)), p);
    }

    #[test]
    fn names_delta_forbids_and_types_it_lacks_are_refused_with_the_column() {
        let schema = Schema::new(vec![Field::new("a b", DataType::Int32, true)]);
        let err = schema_string(&schema, Layout::Cdf, "public.t")
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"a b\""), "{err}");
        let schema = Schema::new(vec![Field::new("_state", DataType::Int32, true)]);
        assert!(schema_string(&schema, Layout::Scd2, "public.t").is_err());
        let schema = file_schema(&Schema::new(vec![
            Field::new("t", DataType::Time64(TimeUnit::Microsecond), true),
            Field::new("u", DataType::FixedSizeBinary(16), true),
        ]));
        let s: Value =
            serde_json::from_str(&schema_string(&schema, Layout::Cdf, "t").unwrap()).unwrap();
        assert_eq!(s["fields"][0]["type"], "string");
        assert_eq!(s["fields"][1]["type"], "string");
        assert_eq!(s["fields"][2]["name"], "_commit_date");
    }
}
