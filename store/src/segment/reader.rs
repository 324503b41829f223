//! Reading a segment back: check its SHA-256 against the manifest, then stream its batches.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use sha2::{Digest, Sha256};

use super::writer::hex;
use super::{SEGMENT_FORMAT_VERSION, SEGMENT_METADATA_KEY, SegmentContent};
use crate::error::SegmentError;

/// The SHA-256 (hex) of a file, read in a streaming fashion.
pub fn sha256_file(path: &Path) -> Result<String, SegmentError> {
    let io = |source| SegmentError::Io { path: path.to_path_buf(), source };
    let mut file = File::open(path).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

/// An opened, verified segment.
pub struct SegmentReader {
    path: PathBuf,
    content: SegmentContent,
    schema: SchemaRef,
    reader: ParquetRecordBatchReader,
}

#[derive(serde::Deserialize)]
struct Description {
    format_version: u32,
    content: SegmentContent,
}

impl SegmentReader {
    /// Open `path`; with `expected_sha256`, refuse a file whose bytes differ from what the
    /// manifest recorded (a flipped bit, a truncated copy, a swapped file).
    pub fn open(path: &Path, expected_sha256: Option<&str>, batch_rows: usize) -> Result<SegmentReader, SegmentError> {
        if let Some(expected) = expected_sha256 {
            let found = sha256_file(path)?;
            if found != expected {
                return Err(SegmentError::Checksum { path: path.to_path_buf(), expected: expected.into(), found });
            }
        }
        let file = File::open(path).map_err(|source| SegmentError::Io { path: path.to_path_buf(), source })?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(file)
            .map_err(|source| SegmentError::Parquet { path: path.to_path_buf(), source })?;
        let description = builder
            .metadata()
            .file_metadata()
            .key_value_metadata()
            .and_then(|kv| kv.iter().find(|kv| kv.key == SEGMENT_METADATA_KEY))
            .and_then(|kv| kv.value.as_deref())
            .ok_or_else(|| SegmentError::Corrupt {
                path: path.to_path_buf(),
                reason: format!("no {SEGMENT_METADATA_KEY} metadata: not a pgtrail segment"),
            })?;
        let description: Description = serde_json::from_str(description).map_err(|e| SegmentError::Corrupt {
            path: path.to_path_buf(),
            reason: format!("unreadable {SEGMENT_METADATA_KEY} metadata: {e}"),
        })?;
        if description.format_version != SEGMENT_FORMAT_VERSION {
            return Err(SegmentError::Corrupt {
                path: path.to_path_buf(),
                reason: format!(
                    "segment format version {} is not supported (this pgtrail reads {SEGMENT_FORMAT_VERSION})",
                    description.format_version
                ),
            });
        }
        let schema = builder.schema().clone();
        let reader = builder
            .with_batch_size(batch_rows.max(1))
            .build()
            .map_err(|source| SegmentError::Parquet { path: path.to_path_buf(), source })?;
        Ok(SegmentReader { path: path.to_path_buf(), content: description.content, schema, reader })
    }

    pub fn content(&self) -> &SegmentContent {
        &self.content
    }

    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }
}

impl Iterator for SegmentReader {
    type Item = Result<RecordBatch, SegmentError>;

    fn next(&mut self) -> Option<Self::Item> {
        let path = &self.path;
        self.reader.next().map(|r| r.map_err(|source| SegmentError::Read { path: path.clone(), source }))
    }
}
