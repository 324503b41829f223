//! Values as earlier format versions encoded them, for reading those logs (a reader reads
//! every version up to its own) and for the writer's upgrade, which re-encodes them in the
//! current shape (see "Format versions" in the parent module's doc).

use serde::Deserialize;
use serde::de::DeserializeOwned;

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
            enum_labels: Vec::new(),
            partitions: Vec::new(),
        }
    }
}

/// [`StorageLayout`] as version 3 wrote it: without the enum labels.
#[derive(Deserialize)]
struct StorageLayoutV3 {
    file_node: u32,
    missing_values: Vec<i16>,
    column_versions: Vec<u32>,
    table_version: u32,
    column_names: Vec<String>,
}

impl From<StorageLayoutV3> for StorageLayout {
    fn from(v3: StorageLayoutV3) -> StorageLayout {
        StorageLayout {
            file_node: v3.file_node,
            missing_values: v3.missing_values,
            column_versions: v3.column_versions,
            table_version: v3.table_version,
            column_names: v3.column_names,
            // Not recorded: a label renamed is told from an earlier layout only once one with
            // the labels was recorded (the capture's next look records it).
            enum_labels: Vec::new(),
            partitions: Vec::new(),
        }
    }
}

/// [`StorageLayout`] as version 4 wrote it: without the partitions.
#[derive(Deserialize)]
struct StorageLayoutV4 {
    file_node: u32,
    missing_values: Vec<i16>,
    column_versions: Vec<u32>,
    table_version: u32,
    column_names: Vec<String>,
    enum_labels: Vec<(u32, String)>,
}

impl From<StorageLayoutV4> for StorageLayout {
    fn from(v4: StorageLayoutV4) -> StorageLayout {
        StorageLayout {
            file_node: v4.file_node,
            missing_values: v4.missing_values,
            column_versions: v4.column_versions,
            table_version: v4.table_version,
            column_names: v4.column_names,
            enum_labels: v4.enum_labels,
            // Not recorded: a partition change is told from an earlier layout only once one
            // with the partitions was recorded (the capture's next look records it).
            partitions: Vec::new(),
        }
    }
}

/// [`TableScope`] as versions 2 to 4 wrote it, with the layout of that version.
#[derive(Deserialize)]
struct TableScopeOf<L> {
    relation_id: u32,
    layout: Option<L>,
    unknown_from: Option<(Lsn, i64)>,
    dropped: bool,
    unpublished: bool,
}

fn scope_of<L: DeserializeOwned + Into<StorageLayout>>(
    bytes: &[u8],
    what: &str,
) -> Result<TableScope, LogError> {
    let old: TableScopeOf<L> = decode(bytes, what)?;
    Ok(TableScope {
        relation_id: old.relation_id,
        layout: old.layout.map(Into::into),
        unknown_from: old.unknown_from,
        dropped: old.dropped,
        unpublished: old.unpublished,
    })
}

fn layouts_of<L: DeserializeOwned + Into<StorageLayout>>(
    bytes: &[u8],
    what: &str,
) -> Result<HeldLayouts, LogError> {
    let old: Vec<(u32, (Lsn, L))> = decode(bytes, what)?;
    Ok(old
        .into_iter()
        .map(|(oid, (seen, layout))| (oid, (seen, layout.into())))
        .collect())
}

/// A `snapshot_scope` value of a log of format version `format`.
pub(crate) fn decode_scope(bytes: &[u8], format: u32) -> Result<TableScope, LogError> {
    match format {
        ..=2 => scope_of::<StorageLayoutV2>(bytes, "snapshot_scope (version 2)"),
        3 => scope_of::<StorageLayoutV3>(bytes, "snapshot_scope (version 3)"),
        4 => scope_of::<StorageLayoutV4>(bytes, "snapshot_scope (version 4)"),
        _ => decode(bytes, "snapshot_scope"),
    }
}

/// The `meta` entry `layouts` of a log of format version `format`.
pub(crate) fn decode_layouts(bytes: &[u8], format: u32) -> Result<HeldLayouts, LogError> {
    match format {
        ..=2 => layouts_of::<StorageLayoutV2>(bytes, "meta layouts (version 2)"),
        3 => layouts_of::<StorageLayoutV3>(bytes, "meta layouts (version 3)"),
        4 => layouts_of::<StorageLayoutV4>(bytes, "meta layouts (version 4)"),
        _ => decode(bytes, "meta layouts"),
    }
}
