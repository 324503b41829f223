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
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::basic::{Compression, ZstdLevel};
use datafusion::parquet::file::properties::WriterProperties;

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
    writer: ArrowWriter<File>,
    rows: usize,
}

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
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(3).expect("zstd level 3 exists")))
        .set_max_row_group_row_count(Some(64 * 1024))
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
        PartitionedFiles { dest, spool_dir, schema, max_rows: max_rows.max(1), open: Vec::new(), parts: Default::default(), written: Vec::new(), on_file }
    }

    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    /// Append `batch` to the files `partition/stem-NNNNN.parquet`.
    pub fn write(&mut self, partition: &str, stem: &str, batch: &RecordBatch) -> Result<(), ExportError> {
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
        let spool = self.spool_dir.join(format!("{}.parquet", self.written.len() + self.open.len()));
        let file = File::create(&spool).map_err(|source| ExportError::Io { path: spool.clone(), source })?;
        let writer = ArrowWriter::try_new(file, self.schema.clone(), Some(properties()))?;
        self.open.push(OpenFile { key: key.to_string(), object, spool, writer, rows: 0 });
        Ok(self.open.len() - 1)
    }

    fn close(&mut self, file: OpenFile) -> Result<(), ExportError> {
        let OpenFile { object, spool, writer, rows, .. } = file;
        let f = writer.into_inner()?;
        f.sync_all().map_err(|source| ExportError::Io { path: spool.clone(), source })?;
        drop(f);
        let bytes = self.dest.put_file(&object, &spool)?;
        let _ = std::fs::remove_file(&spool);
        let written = WrittenFile { path: object, rows: rows as u64, bytes };
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
