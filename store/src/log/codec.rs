//! How the log's values are encoded: postcard, with a one-byte prefix (`0` plain, `1`
//! zstd-compressed above [`COMPRESS_ABOVE`] bytes), and the `meta` integers.

use super::*;

pub(crate) fn get_u64(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    name: &str,
) -> Result<Option<u64>, LogError> {
    match table.get(name)? {
        Some(v) => {
            let bytes: [u8; 8] = v.value().try_into().map_err(|_| LogError::Corrupt {
                what: format!("meta {name}"),
                source: "not 8 bytes".into(),
            })?;
            Ok(Some(u64::from_le_bytes(bytes)))
        }
        None => Ok(None),
    }
}

pub(crate) fn encode_plain<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    // Serializing these plain data types into a Vec cannot fail.
    postcard::to_allocvec(value).unwrap_or_default()
}

/// Encode a stored value: postcard, zstd-compressed when large (see the module doc).
pub(crate) fn encode<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    let mut out = Vec::new();
    encode_into(&mut out, value);
    out
}

/// [`encode`] into `buf`, replacing its contents. The log writer reuses one buffer for every
/// value it stores: growing a fresh `Vec` per value was a tenth of its time (perf, decode suite).
pub(crate) fn encode_into<T: Serialize + ?Sized>(buf: &mut Vec<u8>, value: &T) {
    buf.clear();
    buf.push(0);
    // Serializing these plain data types into a Vec cannot fail.
    *buf = postcard::to_extend(value, std::mem::take(buf)).unwrap_or_else(|_| vec![0]);
    let plain = &buf[1..];
    if plain.len() > COMPRESS_ABOVE
        && let Ok(compressed) = zstd::bulk::compress(plain, 1)
        && compressed.len() + 4 < plain.len()
    {
        let len = u32::try_from(plain.len()).unwrap_or(u32::MAX);
        buf.clear();
        buf.push(1);
        buf.extend_from_slice(&len.to_le_bytes());
        buf.extend_from_slice(&compressed);
    }
}

/// The uncompressed size of a stored value (its record encoding), without decoding it.
pub(crate) fn raw_len(bytes: &[u8]) -> u64 {
    match bytes.split_first() {
        Some((1, rest)) if rest.len() >= 4 => {
            u64::from(u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]))
        }
        _ => bytes.len().saturating_sub(1) as u64,
    }
}

/// Decode a stored value written by [`encode`]; `what` names the table for the error.
pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, LogError> {
    let corrupt = |source: Box<dyn std::error::Error + Send + Sync>| LogError::Corrupt {
        what: what.to_string(),
        source,
    };
    match bytes.split_first() {
        Some((0, rest)) => postcard::from_bytes(rest).map_err(|e| corrupt(Box::new(e))),
        Some((1, rest)) => {
            let (len, data) = rest
                .split_at_checked(4)
                .ok_or_else(|| corrupt("short compressed value".into()))?;
            let len = u32::from_le_bytes(len.try_into().map_err(|_| corrupt("bad length".into()))?)
                as usize;
            // Streamed, not `bulk::decompress(data, len)`: that reserves `len` bytes up front,
            // and a damaged length (up to 4 GiB) would then exhaust memory before any check.
            let mut plain = Vec::new();
            let decoder =
                zstd::stream::read::Decoder::with_buffer(data).map_err(|e| corrupt(Box::new(e)))?;
            std::io::Read::read_to_end(
                &mut std::io::Read::take(decoder, len as u64 + 1),
                &mut plain,
            )
            .map_err(|e| corrupt(Box::new(e)))?;
            if plain.len() != len {
                return Err(corrupt(
                    format!(
                        "compressed value holds {} bytes, its header says {len}",
                        plain.len()
                    )
                    .into(),
                ));
            }
            postcard::from_bytes(&plain).map_err(|e| corrupt(Box::new(e)))
        }
        Some((tag, _)) => Err(corrupt(format!("unknown value encoding {tag}").into())),
        None => Err(corrupt("empty value".into())),
    }
}

/// Entry points for the fuzz targets (`tools/fuzz`): not part of the API.
#[doc(hidden)]
pub mod fuzzing {
    use super::*;

    /// Decode `bytes` as each kind of value the log stores; any outcome but a panic is fine.
    pub fn decode_log_values(bytes: &[u8]) {
        let _ = decode::<ChangeRecord>(bytes, "changes");
        let _ = decode::<TxnRecord>(bytes, "transactions");
        let _ = decode::<RelationVersion>(bytes, "relations");
        let _ = decode::<Gap>(bytes, "gaps");
        let _ = decode::<SourceIdentity>(bytes, "meta source");
        let _ = decode::<Option<Row>>(bytes, "current_undo");
        let _ = decode::<Row>(bytes, "current_rows");
        let _ = decode::<crate::SegmentEntry>(bytes, "segments");
    }

    /// The `meta` keys a fuzzed log carries, in the order [`open_log_with_meta`] fills them.
    const FUZZED_META: [&str; 11] = [
        META_FORMAT,
        META_LAYOUTS,
        META_PENDING_READS,
        META_POSITION,
        META_LAST_COMMIT,
        META_SOURCE,
        META_CATALOG_SEEN,
        META_LEFT_OUT,
        META_ENUM_TYPES,
        META_MEMBERSHIPS,
        META_COMPLETED_THROUGH,
    ];

    /// `bytes`, cut at each 0xFF, as the values of a log's `meta` keys (its format version
    /// first, then its layouts, pending reads, position, …) and one snapshot-scope entry, in an
    /// in-memory redb: opening that log to read it and to write it never panics. A format
    /// version newer than this code's is refused by both, naming the version; an older one
    /// opened for writing leaves the log at this code's version, its layouts readable.
    pub fn open_log_with_meta(bytes: &[u8]) {
        use redb::{Database, backends::InMemoryBackend};

        use crate::log::{ChangeLog, LogReader};

        let mut parts = bytes.split(|b| *b == 0xFF);
        let Ok(db) = Database::builder()
            .set_cache_size(1 << 20)
            .create_with_backend(InMemoryBackend::new())
        else {
            return;
        };
        let mut version = None;
        {
            let wtx = db.begin_write().expect("an in-memory write");
            {
                let mut meta = wtx.open_table(META).expect("meta");
                for key in FUZZED_META {
                    if let Some(value) = parts.next() {
                        meta.insert(key, value).expect("in memory");
                        if key == META_FORMAT {
                            version = <[u8; 8]>::try_from(value).ok().map(u64::from_le_bytes);
                        }
                    }
                }
                if let Some(value) = parts.next() {
                    let mut scope = wtx.open_table(SNAPSHOT_SCOPE).expect("scope");
                    scope.insert((1, 1), value).expect("in memory");
                }
            }
            wtx.commit().expect("an in-memory commit");
        }
        let newer = version.is_some_and(|v| v > u64::from(FORMAT_VERSION));
        match LogReader::from_db(&db) {
            Ok(reader) => {
                assert!(!newer, "a log of format {version:?} was read");
                let _ = reader.position();
                let _ = reader.layouts();
                let _ = reader.pending_reads();
                let _ = reader.source_identity();
                let _ = reader.catalog_seen();
                let _ = reader.left_out();
                let _ = reader.enum_types();
                let _ = reader.memberships();
                let _ = reader.completed_through();
                let _ = reader.changes().map(|changes| changes.count());
            }
            Err(e) => assert!(
                !newer || matches!(e, LogError::FormatVersion { .. }),
                "a newer log refused for another reason: {e}"
            ),
        }
        match ChangeLog::with_database(db, std::path::Path::new("/nonexistent/fuzz")) {
            Ok(log) => {
                assert!(!newer, "a log of format {version:?} was opened for writing");
                let reader = LogReader::from_db(&*log.db).expect("the log it opened");
                assert_eq!(reader.format_version().ok(), Some(Some(FORMAT_VERSION)));
                if version.is_some_and(|v| v < u64::from(FORMAT_VERSION)) {
                    reader.layouts().expect("layouts it rewrote");
                }
            }
            Err(e) => assert!(
                !newer || matches!(e, LogError::FormatVersion { .. }),
                "a newer log refused for another reason: {e}"
            ),
        }
    }
}
