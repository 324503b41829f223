//! Restore: a table's rows at a moment as PostgreSQL `COPY … FROM STDIN` text, and the
//! `CREATE TABLE` of the schema in force then. Pure; `pgtrail restore` sends them.

use pgtrail_store::{Cell, RelationVersion, Row, TypeNames, always_quoted, format_type};

use crate::archive::{ArchiveSnapshot, TableHistory};
use crate::pit::state_at;
use crate::replay::Moment;

/// A table's rows at a moment, in the column order of the schema in force then.
pub struct RestoredTable {
    pub version: RelationVersion,
    /// Each row's cells in `version`'s column order; a column the row's own (older) schema
    /// version lacks is NULL, as `as_of` answers it.
    pub rows: Vec<Row>,
}

/// Why a table cannot be restored exactly.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RestoreError {
    #[error(
        "{table}: column {column} of {rows} row(s) is not known at {moment} (an unchanged TOASTed value the source never sent, with no earlier version of the row in the archive); the table cannot be restored exactly"
    )]
    UnknownValue {
        table: String,
        column: String,
        rows: usize,
        moment: String,
    },
    #[error(transparent)]
    DataFusion(#[from] datafusion::error::DataFusionError),
}

/// `table` at `moment`.
pub fn rows_at(
    archive: &ArchiveSnapshot,
    table: &TableHistory,
    moment: Moment,
) -> Result<RestoredTable, RestoreError> {
    let state = state_at(archive, table, moment)?;
    let version = state.version.clone();
    let mut rows = Vec::new();
    let mut unknown: Option<(usize, usize)> = None;
    for (row_version, row) in state.rows.into_values().flatten() {
        let cells: Row = version
            .columns
            .iter()
            .map(|c| {
                row_version
                    .columns
                    .iter()
                    .position(|rc| rc.name == c.name)
                    .and_then(|i| row.get(i).cloned())
                    .unwrap_or(Cell::Null)
            })
            .collect();
        if let Some(i) = cells.iter().position(|c| matches!(c, Cell::Unknown)) {
            let (_, n) = unknown.get_or_insert((i, 0));
            *n += 1;
        }
        rows.push(cells);
    }
    if let Some((column, n)) = unknown {
        return Err(RestoreError::UnknownValue {
            table: table.qualified_name(),
            column: version.columns[column].name.clone(),
            rows: n,
            moment: moment.to_string(),
        });
    }
    Ok(RestoredTable { version, rows })
}

/// One row as a line of COPY's text format (tab-separated, `\N` for NULL, backslash escapes),
/// the cells at `columns` only.
pub fn copy_line(row: &Row, columns: &[usize], out: &mut Vec<u8>) {
    for (n, &i) in columns.iter().enumerate() {
        if n > 0 {
            out.push(b'\t');
        }
        match &row[i] {
            Cell::Text(t) => {
                for b in t.bytes() {
                    match b {
                        b'\\' => out.extend_from_slice(b"\\\\"),
                        b'\t' => out.extend_from_slice(b"\\t"),
                        b'\n' => out.extend_from_slice(b"\\n"),
                        b'\r' => out.extend_from_slice(b"\\r"),
                        b => out.push(b),
                    }
                }
            }
            Cell::Null | Cell::Unknown => out.extend_from_slice(b"\\N"),
        }
    }
    out.push(b'\n');
}

/// `CREATE TABLE schema.name (…)` with the columns, types and primary key of `version`.
pub fn create_table(
    version: &RelationVersion,
    schema: &str,
    name: &str,
    types: &TypeNames,
) -> String {
    let mut parts: Vec<String> = version
        .columns
        .iter()
        .map(|c| {
            format!(
                "{} {}",
                always_quoted(&c.name),
                format_type(c.type_oid, c.type_modifier, types)
            )
        })
        .collect();
    if !version.primary_key.is_empty() {
        parts.push(format!(
            "PRIMARY KEY ({})",
            version
                .primary_key
                .iter()
                .map(|k| always_quoted(k))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    format!(
        "CREATE TABLE {}.{} ({})",
        always_quoted(schema),
        always_quoted(name),
        parts.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_lines_escape_what_the_text_format_reads_specially() {
        let row = vec![
            Cell::Text("a\tb\nc\\d\re".into()),
            Cell::Null,
            Cell::Text(String::new()),
            Cell::Text("\\N".into()),
        ];
        let mut out = Vec::new();
        copy_line(&row, &[0, 1, 2, 3], &mut out);
        assert_eq!(out, b"a\\tb\\nc\\\\d\\re\t\\N\t\t\\\\N\n");
        out.clear();
        copy_line(&row, &[2], &mut out);
        assert_eq!(out, b"\n");
    }
}
