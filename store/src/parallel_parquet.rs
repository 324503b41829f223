//! Parquet written with each row group's column chunks encoded on several threads (the
//! export's files and the key-ordered copies of segments).

use std::io::Write;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::arrow::arrow_writer::{
    ArrowColumnChunk, ArrowColumnWriter, ArrowLeafColumn, ArrowRowGroupWriterFactory,
    compute_leaves,
};
use datafusion::parquet::errors::ParquetError;
use datafusion::parquet::file::properties::WriterProperties;
use datafusion::parquet::file::writer::SerializedFileWriter;

/// Rows per row group when the properties set no row count (Parquet's own default).
const DEFAULT_ROW_GROUP_ROWS: usize = 1024 * 1024;

/// One column chunk to encode: its place in the row group, its encoder and its values.
type ColumnJob = (usize, ArrowColumnWriter, Vec<ArrowLeafColumn>);
/// An encoded column chunk, by its place in the row group.
type ColumnDone = (usize, Result<ArrowColumnChunk, ParquetError>);

/// Threads that encode column chunks, as long as one writer lives.
///
/// They are kept for the file's life rather than started per row group: threads started per
/// group each grew fresh memory, and the kernel zeroing it was a tenth of an export's samples.
struct EncoderPool {
    jobs: Option<Sender<ColumnJob>>,
    done: Receiver<ColumnDone>,
    threads: Vec<JoinHandle<()>>,
}

impl EncoderPool {
    fn new() -> EncoderPool {
        let width = std::thread::available_parallelism().map_or(1, |n| n.get());
        let (jobs, queue) = channel::<ColumnJob>();
        let (finished, done) = channel::<ColumnDone>();
        let queue = Arc::new(Mutex::new(queue));
        let threads = (0..width)
            .map(|_| {
                let (queue, finished) = (queue.clone(), finished.clone());
                // Each thread takes the next column not yet taken: columns differ in cost (a
                // text column against a delta-encoded integer), so there is no fixed split.
                std::thread::spawn(move || {
                    loop {
                        let job = queue.lock().ok().and_then(|q| q.recv().ok());
                        let Some((i, mut writer, leaves)) = job else {
                            return;
                        };
                        let chunk = leaves
                            .iter()
                            .try_for_each(|l| writer.write(l))
                            .and_then(|()| writer.close());
                        if finished.send((i, chunk)).is_err() {
                            return;
                        }
                    }
                })
            })
            .collect();
        EncoderPool {
            jobs: Some(jobs),
            done,
            threads,
        }
    }

    /// Encode each writer's values; the chunks in the writers' order.
    fn encode(
        &self,
        columns: Vec<(ArrowColumnWriter, Vec<ArrowLeafColumn>)>,
    ) -> Result<Vec<ArrowColumnChunk>, ParquetError> {
        let stopped = || ParquetError::General("a column encoder thread stopped".into());
        let n = columns.len();
        let jobs = self.jobs.as_ref().ok_or_else(stopped)?;
        for (i, (writer, leaves)) in columns.into_iter().enumerate() {
            jobs.send((i, writer, leaves)).map_err(|_| stopped())?;
        }
        let mut chunks: Vec<Option<ArrowColumnChunk>> = (0..n).map(|_| None).collect();
        // Every job is received even after an error, so none is left for the next group.
        let mut failed = None;
        for _ in 0..n {
            let (i, chunk) = self.done.recv().map_err(|_| stopped())?;
            match chunk {
                Ok(c) => chunks[i] = Some(c),
                Err(e) => failed = failed.or(Some(e)),
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
        chunks.into_iter().map(|c| c.ok_or_else(stopped)).collect()
    }
}

impl Drop for EncoderPool {
    fn drop(&mut self) {
        // Closing the queue ends each thread at its next receive.
        self.jobs = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A Parquet writer that encodes each row group's columns on several threads at once.
///
/// Encoding (dictionaries and zstd) is most of the work of writing Parquet, and `ArrowWriter`
/// does it on the one thread that calls it: an export of 2.5M changes kept one core busy
/// while the other idled. Here a row group's rows are buffered as Arrow batches, and when a
/// group is full its column chunks are encoded on as many threads as there are cores, then
/// appended to the file in schema order. The file is the one `ArrowWriter` writes from the
/// same batches and properties (same schema metadata, row groups of the properties' row
/// count, pages and encodings); the properties must bound row groups by rows alone.
pub struct ParallelWriter<W: Write + Send> {
    file: SerializedFileWriter<W>,
    columns: ArrowRowGroupWriterFactory,
    schema: SchemaRef,
    row_group_rows: usize,
    pending: Vec<RecordBatch>,
    pending_rows: usize,
    row_groups: usize,
    pool: EncoderPool,
}

impl<W: Write + Send> ParallelWriter<W> {
    pub fn try_new(
        sink: W,
        schema: SchemaRef,
        properties: WriterProperties,
    ) -> Result<ParallelWriter<W>, ParquetError> {
        let row_group_rows = properties
            .max_row_group_row_count()
            .unwrap_or(DEFAULT_ROW_GROUP_ROWS)
            .max(1);
        // ArrowWriter builds the Parquet schema and embeds the Arrow one in the footer.
        let (file, columns) = ArrowWriter::try_new(sink, schema.clone(), Some(properties))?
            .into_serialized_writer()?;
        Ok(ParallelWriter {
            file,
            columns,
            schema,
            row_group_rows,
            pending: Vec::new(),
            pending_rows: 0,
            row_groups: 0,
            pool: EncoderPool::new(),
        })
    }

    pub fn write(&mut self, batch: &RecordBatch) -> Result<(), ParquetError> {
        self.pending.push(batch.clone());
        self.pending_rows += batch.num_rows();
        while self.pending_rows >= self.row_group_rows {
            // The first `row_group_rows` rows form the group; the rest stay pending.
            let mut group = Vec::new();
            let mut rows = 0;
            let mut rest = Vec::new();
            for b in self.pending.drain(..) {
                let take = (self.row_group_rows - rows).min(b.num_rows());
                if take > 0 {
                    group.push(b.slice(0, take));
                    rows += take;
                }
                if take < b.num_rows() {
                    rest.push(b.slice(take, b.num_rows() - take));
                }
            }
            self.pending = rest;
            self.pending_rows -= rows;
            self.encode(&group)?;
        }
        Ok(())
    }

    /// Encode `batches` as one row group.
    fn encode(&mut self, batches: &[RecordBatch]) -> Result<(), ParquetError> {
        if batches.iter().all(|b| b.num_rows() == 0) {
            return Ok(());
        }
        let writers = self.columns.create_column_writers(self.row_groups)?;
        let mut leaves: Vec<Vec<ArrowLeafColumn>> = writers.iter().map(|_| Vec::new()).collect();
        for batch in batches {
            let mut leaf = 0;
            for (field, column) in self.schema.fields().iter().zip(batch.columns()) {
                for l in compute_leaves(field, column)? {
                    leaves
                        .get_mut(leaf)
                        .ok_or_else(|| {
                            ParquetError::General("more leaves than column writers".into())
                        })?
                        .push(l);
                    leaf += 1;
                }
            }
        }
        let chunks = self
            .pool
            .encode(writers.into_iter().zip(leaves).collect())?;
        let mut group = self.file.next_row_group()?;
        for chunk in chunks {
            chunk.append_to_row_group(&mut group)?;
        }
        group.close()?;
        self.row_groups += 1;
        Ok(())
    }

    /// Write the rows still pending and the footer; the sink, not yet synced.
    pub fn into_inner(mut self) -> Result<W, ParquetError> {
        let pending = std::mem::take(&mut self.pending);
        self.encode(&pending)?;
        self.file.into_inner()
    }
}
