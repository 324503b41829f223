//! Values as earlier format versions encoded them, for reading those logs (a reader reads
//! every version up to its own) and for the writer's upgrade, which re-encodes them in the
//! current shape (see "Format versions" in the parent module's doc).

use serde::Deserialize;

use super::codec::decode;
use super::{HeldLayouts, StorageLayout, TableScope};
use crate::error::LogError;
use crate::lsn::Lsn;

/// [`StorageLayout`] as version 2 wrote it: without the columns' names.
#[derive(Deserialize)]
struct StorageLayoutV2 {
    file_node: u32,
    missing_values: Vec<i16>,
    column_versions: Vec<u32>,
    table_version: u32,
}

impl From<StorageLayoutV2> for StorageLayout {
    fn from(v2: StorageLayoutV2) -> StorageLayout {
        StorageLayout {
            file_node: v2.file_node,
            missing_values: v2.missing_values,
            column_versions: v2.column_versions,
            table_version: v2.table_version,
            // Not recorded: a rename is told from an earlier layout only once one with the
            // names was recorded (the capture's next look records it).
            column_names: Vec::new(),
        }
    }
}

/// [`TableScope`] as version 2 wrote it.
#[derive(Deserialize)]
struct TableScopeV2 {
    relation_id: u32,
    layout: Option<StorageLayoutV2>,
    unknown_from: Option<(Lsn, i64)>,
    dropped: bool,
    unpublished: bool,
}

/// A `snapshot_scope` value of a log of format version `format`.
pub(crate) fn decode_scope(bytes: &[u8], format: u32) -> Result<TableScope, LogError> {
    if format >= 3 {
        return decode(bytes, "snapshot_scope");
    }
    let v2: TableScopeV2 = decode(bytes, "snapshot_scope (version 2)")?;
    Ok(TableScope {
        relation_id: v2.relation_id,
        layout: v2.layout.map(StorageLayout::from),
        unknown_from: v2.unknown_from,
        dropped: v2.dropped,
        unpublished: v2.unpublished,
    })
}

/// The `meta` entry `layouts` of a log of format version `format`.
pub(crate) fn decode_layouts(bytes: &[u8], format: u32) -> Result<HeldLayouts, LogError> {
    if format >= 3 {
        return decode(bytes, "meta layouts");
    }
    let v2: Vec<(u32, (Lsn, StorageLayoutV2))> = decode(bytes, "meta layouts (version 2)")?;
    Ok(v2
        .into_iter()
        .map(|(oid, (seen, layout))| (oid, (seen, layout.into())))
        .collect())
}
