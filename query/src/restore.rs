//! Restore: a table's rows at a moment as PostgreSQL `COPY … FROM STDIN` text, and the
//! `CREATE TABLE` of the schema in force then. Pure; `pgtrail restore` sends them.

use datafusion::arrow::array::{Array, StructArray};
use pgtrail_store::segment::{PgKind, render};
use pgtrail_store::{Cell, RelationVersion, Row, TypeNames, always_quoted, format_type};

use crate::archive::{ArchiveSnapshot, TableHistory};
use crate::columnar::stored_images_at;
use crate::pit::state_at;
use crate::replay::{Moment, check_begins};

/// A table's rows at a moment, in the column order of the schema in force then.
pub struct TableAt {
    pub version: RelationVersion,
    rows: Rows,
}

/// The rows, as the columnar engine finds them (typed images as stored: a few bytes a value)
/// or, where it does not apply, as the row replay's text rows.
enum Rows {
    Stored {
        images: StructArray,
        kinds: Vec<PgKind>,
    },
    Text(Vec<Row>),
}

impl TableAt {
    pub fn len(&self) -> usize {
        match &self.rows {
            Rows::Stored { images, .. } => images.len(),
            Rows::Text(rows) => rows.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The rows as COPY text (the cells at `columns`), in chunks of about `chunk` bytes:
    /// rendered a chunk at a time, so the text of the whole table is never held at once.
    pub fn copy_chunks<'a>(
        &'a self,
        columns: &'a [usize],
        chunk: usize,
    ) -> impl Iterator<Item = Vec<u8>> + 'a {
        let mut next = 0;
        std::iter::from_fn(move || {
            if next >= self.len() {
                return None;
            }
            let mut out = Vec::with_capacity(chunk + 4096);
            while next < self.len() && out.len() < chunk {
                match &self.rows {
                    Rows::Text(rows) => copy_line(&rows[next], columns, &mut out),
                    Rows::Stored { images, kinds } => {
                        for (n, &c) in columns.iter().enumerate() {
                            if n > 0 {
                                out.push(b'\t');
                            }
                            let value = render(&kinds[c], images.column(c).as_ref(), next);
                            copy_value(value.as_deref(), &mut out);
                        }
                        out.push(b'\n');
                    }
                }
                next += 1;
            }
            Some(out)
        })
    }
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

/// `table` at `moment`: the columnar engine's stored images where it applies (the values are
/// rendered to PostgreSQL's text exactly as the segment reader renders them), else the row
/// replay, which refuses a value it does not know.
pub fn table_at(
    archive: &ArchiveSnapshot,
    table: &TableHistory,
    moment: Moment,
) -> Result<TableAt, RestoreError> {
    check_begins(archive, table, moment)?;
    if let Some((version, images)) = stored_images_at(archive, table, moment)? {
        let kinds = version
            .columns
            .iter()
            .map(|c| PgKind::of(c.type_oid, c.type_modifier))
            .collect();
        return Ok(TableAt {
            version: version.clone(),
            rows: Rows::Stored { images, kinds },
        });
    }
    let state = state_at(archive, table, moment)?;
    let version = state.version.clone();
    let mut rows = Vec::new();
    let mut unknown: Option<(usize, usize)> = None;
    for (row_version, row) in state.rows.into_values().flatten() {
        // Most rows were written in the schema in force: kept as they are, not copied.
        let cells: Row = if row_version.columns == version.columns {
            row
        } else {
            version
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
                .collect()
        };
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
    Ok(TableAt {
        version,
        rows: Rows::Text(rows),
    })
}

/// One row as a line of COPY's text format (tab-separated, `\N` for NULL, backslash escapes),
/// the cells at `columns` only.
pub fn copy_line(row: &Row, columns: &[usize], out: &mut Vec<u8>) {
    for (n, &i) in columns.iter().enumerate() {
        if n > 0 {
            out.push(b'\t');
        }
        copy_value(row[i].as_text(), out);
    }
    out.push(b'\n');
}

/// One value in COPY's text format: `\N` for NULL, backslash escapes for what it reads
/// specially.
pub fn copy_value(value: Option<&str>, out: &mut Vec<u8>) {
    let Some(text) = value else {
        out.extend_from_slice(b"\\N");
        return;
    };
    for b in text.bytes() {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b => out.push(b),
        }
    }
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
