//! Schema versions of captured relations.

use serde::{Deserialize, Serialize};

use crate::lsn::ChangeKey;

/// One column of a relation version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Column {
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
    /// Flagged as part of the replica identity in the Relation message (every column under
    /// REPLICA IDENTITY FULL).
    pub is_key: bool,
}

/// The shape of a relation from a given change on: PostgreSQL sends a Relation message before
/// the first change of a relation in each session and after every schema change, and the
/// archive keeps every distinct version with the key from which it applies.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelationVersion {
    pub relation_id: u32,
    pub valid_from: ChangeKey,
    pub schema: String,
    pub name: String,
    /// `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    pub columns: Vec<Column>,
    /// Primary key column names from the catalog (empty when the table has none). Under
    /// REPLICA IDENTITY FULL every column is flagged as key, so the real key comes from here.
    pub primary_key: Vec<String>,
}

impl RelationVersion {
    /// Whether two versions describe the same shape (a Relation message re-sent after a
    /// reconnect is not a new schema version).
    pub fn same_shape(&self, other: &RelationVersion) -> bool {
        self.schema == other.schema
            && self.name == other.name
            && self.replica_identity == other.replica_identity
            && self.columns == other.columns
            && self.primary_key == other.primary_key
    }

    /// Positions of the columns that identify a row: the replica identity columns, or under
    /// REPLICA IDENTITY FULL the primary key (empty when the table has none).
    pub fn key_positions(&self) -> Vec<usize> {
        if self.replica_identity == b'f' {
            self.primary_key
                .iter()
                .filter_map(|k| self.columns.iter().position(|c| &c.name == k))
                .collect()
        } else {
            self.columns
                .iter()
                .enumerate()
                .filter(|(_, c)| c.is_key)
                .map(|(i, _)| i)
                .collect()
        }
    }

    /// `schema.name` with each part quoted only when PostgreSQL would need it.
    pub fn qualified_name(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

/// Quote an identifier the way `quote_ident` does: only when it is not a plain lowercase name.
pub fn quote_ident(name: &str) -> String {
    let plain = !name.is_empty()
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '$');
    if plain {
        name.to_string()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}
