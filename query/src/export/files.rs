//! Parquet files of an export, partitioned and rolled at a row limit.
//!
//! Each file is written to a local spool file first and handed to the destination whole once
//! its footer is written. File names are a function of the partition, the run's LSN range and
//! the part number only, and rows arrive in a deterministic order, so repeating an interrupted
//! run rewrites exactly the same objects: nothing is duplicated.

use std::fs::File;
use std::path::{Path, PathBuf};

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::parquet::basic::{Compression, ZstdLevel};
use datafusion::parquet::file::properties::WriterProperties;
use pgtrail_store::parallel_parquet::ParallelWriter;

use super::ExportError;
use super::destination::Destination;

/// Partitions with a file open at once; older ones are closed (their next rows start a new
/// part). Rows arrive in commit order, so only the newest date or two are ever active.
const MAX_OPEN: usize = 4;

/// One file handed to the destination.
#[derive(Clone, Debug, serde::Serialize)]
pub struct WrittenFile {
    pub path: String,
    pub rows: u64,
    pub bytes: u64,
}

struct OpenFile {
    /// `partition/stem`, the part counter's key.
    key: String,
    object: String,
    spool: PathBuf,
    writer: ParallelWriter<File>,
    rows: usize,
}

/// Rows per row group of an exported file.
const ROW_GROUP_ROWS: usize = 64 * 1024;

pub struct PartitionedFiles<'d> {
    dest: &'d Destination,
    spool_dir: &'d Path,
    schema: SchemaRef,
    max_rows: usize,
    open: Vec<OpenFile>,
    parts: std::collections::BTreeMap<String, usize>,
    pub written: Vec<WrittenFile>,
    /// Called after each file reaches the destination.
    on_file: &'d mut dyn FnMut(&WrittenFile),
}

fn properties() -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::ZSTD(
            ZstdLevel::try_new(3).expect("zstd level 3 exists"),
        ))
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
        // Lists and maps under the names the Parquet specification gives them (`list.element`,
        // `key_value.key`/`.value`), not Arrow's (`item`, `entries.keys`/`.values`): readers
        // that map columns by their Parquet path (pyiceberg's add_files, DuckDB's Delta
        // reader) need them. No type here is one the coercion would narrow.
        .set_coerce_types(true)
        .build()
}

impl<'d> PartitionedFiles<'d> {
    pub fn new(
        dest: &'d Destination,
        spool_dir: &'d Path,
        schema: SchemaRef,
        max_rows: usize,
        on_file: &'d mut dyn FnMut(&WrittenFile),
    ) -> PartitionedFiles<'d> {
        PartitionedFiles {
            dest,
            spool_dir,
            schema,
            max_rows: max_rows.max(1),
            open: Vec::new(),
            parts: Default::default(),
            written: Vec::new(),
            on_file,
        }
    }

    /// Append `batch` to the files `partition/stem-NNNNN.parquet`.
    pub fn write(
        &mut self,
        partition: &str,
        stem: &str,
        batch: &RecordBatch,
    ) -> Result<(), ExportError> {
        // A Delta export's files have Delta's types (`time` and `uuid` as text): rows arrive in
        // the layout's own types and are converted here, once.
        let conformed;
        let batch = if batch.schema().fields() == self.schema.fields() {
            batch
        } else {
            conformed = super::delta::conform(batch, &self.schema)?;
            &conformed
        };
        let key = format!("{partition}/{stem}");
        let mut offset = 0;
        while offset < batch.num_rows() {
            let index = self.file_for(&key)?;
            let room = self.max_rows - self.open[index].rows;
            let take = room.min(batch.num_rows() - offset);
            let file = &mut self.open[index];
            file.writer.write(&batch.slice(offset, take))?;
            file.rows += take;
            offset += take;
            if file.rows >= self.max_rows {
                let full = self.open.remove(index);
                self.close(full)?;
            }
        }
        Ok(())
    }

    /// The index of the open file for `key`, opening a new part if needed; the open file used
    /// last is moved to the end (least recently used first).
    fn file_for(&mut self, key: &str) -> Result<usize, ExportError> {
        if let Some(i) = self.open.iter().position(|f| f.key == key) {
            let f = self.open.remove(i);
            self.open.push(f);
            return Ok(self.open.len() - 1);
        }
        if self.open.len() >= MAX_OPEN {
            let oldest = self.open.remove(0);
            self.close(oldest)?;
        }
        let part = self.parts.entry(key.to_string()).or_insert(0);
        let object = format!("{key}-{part:05}.parquet");
        *part += 1;
        let spool = self
            .spool_dir
            .join(format!("{}.parquet", self.written.len() + self.open.len()));
        let file = File::create(&spool).map_err(|source| ExportError::Io {
            path: spool.clone(),
            source,
        })?;
        let writer = ParallelWriter::try_new(file, self.schema.clone(), properties())?;
        self.open.push(OpenFile {
            key: key.to_string(),
            object,
            spool,
            writer,
            rows: 0,
        });
        Ok(self.open.len() - 1)
    }

    fn close(&mut self, file: OpenFile) -> Result<(), ExportError> {
        let OpenFile {
            object,
            spool,
            writer,
            rows,
            ..
        } = file;
        let f = writer.into_inner()?;
        f.sync_all().map_err(|source| ExportError::Io {
            path: spool.clone(),
            source,
        })?;
        drop(f);
        let bytes = self.dest.put_file(&object, &spool)?;
        let _ = std::fs::remove_file(&spool);
        let written = WrittenFile {
            path: object,
            rows: rows as u64,
            bytes,
        };
        (self.on_file)(&written);
        self.written.push(written);
        pgtrail_store::crashpoint::hit("export:after_file");
        Ok(())
    }

    /// Close every open file; returns every file written.
    pub fn finish(mut self) -> Result<Vec<WrittenFile>, ExportError> {
        while !self.open.is_empty() {
            let f = self.open.remove(0);
            self.close(f)?;
        }
        Ok(self.written)
    }
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::{ArrayRef, Int64Array, StringArray, StructArray};
    use datafusion::arrow::datatypes::{DataType, Field, Fields, Schema};
    use datafusion::parquet::arrow::ArrowWriter;
    use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    use std::sync::Arc;

    use super::*;

    /// Batches of uneven sizes (so row groups straddle them) with a nested, nullable image.
    fn batches(schema: &SchemaRef) -> Vec<RecordBatch> {
        let sizes = [1, 70_000, 3, 65_533, 40_000, 0, 9_999];
        let mut start = 0i64;
        sizes
            .iter()
            .map(|&n| {
                let ids: Vec<i64> = (start..start + n as i64).collect();
                start += n as i64;
                let id = Int64Array::from_iter_values(ids.iter().copied());
                let note = StringArray::from_iter(
                    ids.iter()
                        .map(|i| (i % 7 != 0).then(|| format!("note {}", i % 1000))),
                );
                let Some(DataType::Struct(fields)) =
                    schema.fields().get(1).map(|f| f.data_type().clone())
                else {
                    unreachable!()
                };
                let image = StructArray::new(
                    fields,
                    vec![
                        Arc::new(Int64Array::from_iter_values(ids.iter().map(|i| i * 3)))
                            as ArrayRef,
                        Arc::new(note),
                    ],
                    Some(ids.iter().map(|i| i % 11 != 0).collect()),
                );
                RecordBatch::try_new(schema.clone(), vec![Arc::new(id), Arc::new(image)])
                    .expect("batch")
            })
            .collect()
    }

    fn read(path: &Path) -> (Vec<RecordBatch>, Vec<i64>, Option<String>) {
        let builder = ParquetRecordBatchReaderBuilder::try_new(File::open(path).expect("open"))
            .expect("reader");
        let groups = builder
            .metadata()
            .row_groups()
            .iter()
            .map(|g| g.num_rows())
            .collect();
        let arrow_schema = builder
            .metadata()
            .file_metadata()
            .key_value_metadata()
            .and_then(|kv| {
                kv.iter()
                    .find(|kv| kv.key == "ARROW:schema")
                    .and_then(|kv| kv.value.clone())
            });
        let rows = builder
            .build()
            .expect("build")
            .collect::<Result<Vec<_>, _>>()
            .expect("rows");
        (rows, groups, arrow_schema)
    }

    #[test]
    fn the_parallel_writer_writes_the_file_arrow_writer_writes() {
        let image = Fields::from(vec![
            Field::new("id", DataType::Int64, true),
            Field::new("note", DataType::Utf8, true),
        ]);
        let schema = Arc::new(Schema::new(vec![
            Field::new("lsn", DataType::Int64, false),
            Field::new("after", DataType::Struct(image), true),
        ]));
        let dir = tempfile::tempdir().expect("tempdir");
        let (serial, parallel) = (
            dir.path().join("serial.parquet"),
            dir.path().join("parallel.parquet"),
        );
        let mut writer = ArrowWriter::try_new(
            File::create(&serial).expect("create"),
            schema.clone(),
            Some(properties()),
        )
        .expect("writer");
        let mut ours = ParallelWriter::try_new(
            File::create(&parallel).expect("create"),
            schema.clone(),
            properties(),
        )
        .expect("writer");
        for batch in batches(&schema) {
            writer.write(&batch).expect("write");
            ours.write(&batch).expect("write");
        }
        writer.close().expect("close");
        ours.into_inner().expect("close");
        let (expected, expected_groups, expected_schema) = read(&serial);
        let (got, groups, arrow_schema) = read(&parallel);
        assert_eq!(groups, expected_groups, "row groups");
        assert_eq!(groups.iter().sum::<i64>(), 185_536);
        assert!(groups.len() > 2, "several row groups: {groups:?}");
        assert_eq!(arrow_schema, expected_schema, "embedded Arrow schema");
        let concat = |b: &[RecordBatch]| {
            datafusion::arrow::compute::concat_batches(&schema, b).expect("concat")
        };
        assert_eq!(concat(&got), concat(&expected));
    }
}
