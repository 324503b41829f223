//! The revert's steps as SQL for the source's tables as they are now.
//!
//! Values are the archive's exact text with an explicit cast to the column's type as the
//! source names it (`format_type` under `search_path = pg_catalog`, so every user type is
//! schema-qualified); identifiers are always quoted; strings follow
//! `standard_conforming_strings = on`, which the script sets. A key column is matched with
//! `=` (its index serves it); every other column of a guard is compared as text after a
//! round trip through its type (`col::text IS NOT DISTINCT FROM 'v'::type::text`), which
//! works for types without an equality operator (json, point) and sees `1.50` and `1.5`
//! alike where the type does.

use std::fmt::Write as _;

use pgtrail_store::{Cell, ChangeKey, RelationVersion, Row, always_quoted};

use super::{Action, RowExpectation, Step};

/// A column of a table as the source holds it now.
#[derive(Clone, Debug)]
pub struct SourceColumn {
    pub name: String,
    pub type_oid: u32,
    /// `format_type(atttypid, atttypmod)` under `search_path = pg_catalog`.
    pub type_name: String,
    /// GENERATED ALWAYS AS (…) STORED: computed by the source, never written.
    pub generated: bool,
}

/// A table of the source, as the catalog describes it now.
#[derive(Clone, Debug)]
pub struct SourceTable {
    pub schema: String,
    pub name: String,
    pub columns: Vec<SourceColumn>,
}

/// The step's table no longer has what its change's columns were.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SchemaMismatch {
    #[error(
        "{table}: column {column} of the change at {at} no longer exists in the source (dropped or renamed since); the change cannot be undone as it was made"
    )]
    ColumnGone {
        table: String,
        column: String,
        at: ChangeKey,
    },
    #[error(
        "{table}: column {column} was of type OID {then} when the change at {at} was made and is {now} in the source now; the archived value is not a value of today's column"
    )]
    ColumnRetyped {
        table: String,
        column: String,
        at: ChangeKey,
        then: u32,
        now: String,
    },
}

/// The source's column for each column of `version`, in its order.
fn columns_of<'s>(
    version: &RelationVersion,
    source: &'s SourceTable,
    at: ChangeKey,
) -> Result<Vec<&'s SourceColumn>, SchemaMismatch> {
    let table = format!(
        "{}.{}",
        pgtrail_store::quote_ident(&source.schema),
        pgtrail_store::quote_ident(&source.name)
    );
    version
        .columns
        .iter()
        .map(|c| {
            let now = source
                .columns
                .iter()
                .find(|s| s.name == c.name)
                .ok_or_else(|| SchemaMismatch::ColumnGone {
                    table: table.clone(),
                    column: c.name.clone(),
                    at,
                })?;
            if now.type_oid != c.type_oid {
                return Err(SchemaMismatch::ColumnRetyped {
                    table: table.clone(),
                    column: c.name.clone(),
                    at,
                    then: c.type_oid,
                    now: now.type_name.clone(),
                });
            }
            Ok(now)
        })
        .collect()
}

/// `'text'` with quotes doubled (standard_conforming_strings = on).
pub fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// A cell as a typed SQL value: `'text'::type`, or `NULL::type`.
fn value(cell: &Cell, column: &SourceColumn) -> String {
    match cell {
        Cell::Text(t) => format!("{}::{}", literal(t), column.type_name),
        // Unknown cells never reach here: the plan refuses rows that need them, and guards
        // skip them.
        Cell::Null | Cell::Unknown => format!("NULL::{}", column.type_name),
    }
}

fn table_name(source: &SourceTable) -> String {
    format!(
        "{}.{}",
        always_quoted(&source.schema),
        always_quoted(&source.name)
    )
}

/// The condition that `row` (in `columns`' order) is the row now: the key columns by `=` (or,
/// for a table without a key, every column), the other known columns as text.
fn row_condition(key: &[usize], unique_key: bool, row: &Row, columns: &[&SourceColumn]) -> String {
    let mut parts = Vec::new();
    for (i, (cell, column)) in row.iter().zip(columns).enumerate() {
        let name = always_quoted(&column.name);
        let is_key = unique_key && key.contains(&i);
        match cell {
            Cell::Unknown => {}
            Cell::Null => parts.push(format!("{name} IS NULL")),
            Cell::Text(_) if is_key => parts.push(format!("{name} = {}", value(cell, column))),
            Cell::Text(_) => parts.push(format!(
                "{name}::text IS NOT DISTINCT FROM ({})::text",
                value(cell, column)
            )),
        }
    }
    if parts.is_empty() {
        "true".into()
    } else {
        parts.join(" AND ")
    }
}

/// The key condition alone.
fn key_condition(
    key: &[usize],
    unique_key: bool,
    key_values: &[Cell],
    columns: &[&SourceColumn],
) -> String {
    let mut row: Row = vec![Cell::Unknown; columns.len()];
    for (&i, v) in key.iter().zip(key_values) {
        row[i] = v.clone();
    }
    row_condition(key, unique_key, &row, columns)
}

/// The statement that performs `step` on `source`: it changes exactly one row when the row
/// is as the undone change left it, and none otherwise (the caller checks the count).
pub fn statement(step: &Step, source: &SourceTable) -> Result<String, SchemaMismatch> {
    let columns = columns_of(&step.version, source, step.change)?;
    let table = table_name(source);
    Ok(match &step.action {
        Action::Delete { row } => format!(
            "DELETE FROM {table} WHERE {}",
            row_condition(&step.key, step.unique_key, row, &columns)
        ),
        Action::Insert { row } => {
            let written: Vec<(&Cell, &&SourceColumn)> = row
                .iter()
                .zip(&columns)
                .filter(|(_, c)| !c.generated)
                .collect();
            format!(
                "INSERT INTO {table} ({}) OVERRIDING SYSTEM VALUE VALUES ({})",
                written
                    .iter()
                    .map(|(_, c)| always_quoted(&c.name))
                    .collect::<Vec<_>>()
                    .join(", "),
                written
                    .iter()
                    .map(|(cell, c)| value(cell, c))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
        Action::Update {
            before,
            after,
            columns: changed,
        } => {
            let sets: Vec<String> = changed
                .iter()
                .filter(|&&i| !columns[i].generated)
                .map(|&i| {
                    format!(
                        "{} = {}",
                        always_quoted(&columns[i].name),
                        value(&before[i], columns[i])
                    )
                })
                .collect();
            format!(
                "UPDATE {table} SET {} WHERE {}",
                sets.join(", "),
                row_condition(&step.key, step.unique_key, after, &columns)
            )
        }
    })
}

/// The query that locks a row the revert touches and reads it: one row of
/// `(current text[], expected text[])` per matching row, `expected` being the expectation's
/// image after a round trip through the column types (NULL when the row should be absent).
/// Columns the expectation does not know are read as NULL on both sides.
pub fn lock_query(row: &RowExpectation, source: &SourceTable) -> Result<String, SchemaMismatch> {
    let columns = columns_of(&row.version, source, row.last_change)?;
    let current: Vec<String> = columns
        .iter()
        .map(|c| format!("{}::text", always_quoted(&c.name)))
        .collect();
    let expected = match &row.expected {
        Some(image) => format!(
            "ARRAY[{}]::text[]",
            image
                .iter()
                .zip(&columns)
                .map(|(cell, c)| match cell {
                    Cell::Unknown => "NULL::text".to_string(),
                    cell => format!("({})::text", value(cell, c)),
                })
                .collect::<Vec<_>>()
                .join(", ")
        ),
        None => "NULL::text[]".into(),
    };
    Ok(format!(
        "SELECT ARRAY[{}]::text[], {expected} FROM {} WHERE {} FOR UPDATE",
        current.join(", "),
        table_name(source),
        key_condition(&row.key, row.unique_key, &row.key_values, &columns)
    ))
}

/// The statements as a script to review and run with psql: one transaction, the context
/// message first, each statement checked to change exactly one row (a row changed since the
/// plan was made stops the script, and nothing is applied).
pub fn script(header: &str, context_json: &str, statements: &[(String, String)]) -> String {
    let mut out = String::new();
    for line in header.lines() {
        let _ = writeln!(out, "-- {line}");
    }
    out.push_str("BEGIN;\nSET LOCAL search_path = pg_catalog;\nSET LOCAL standard_conforming_strings = on;\n");
    let _ = writeln!(
        out,
        "SELECT pg_logical_emit_message(true, '_bemi', {});",
        literal(context_json)
    );
    for (what, sql) in statements {
        // `use_column`: a column named `n` in the statement is the column, not the counter.
        let body = format!(
            "#variable_conflict use_column\nDECLARE n bigint;\nBEGIN\n  {sql};\n  GET DIAGNOSTICS n = ROW_COUNT;\n  IF n <> 1 THEN\n    RAISE EXCEPTION 'pgtrail revert: % changed % rows instead of 1: the row is no longer as the archive left it; nothing was applied', {}, n;\n  END IF;\nEND",
            literal(what)
        );
        let _ = writeln!(out, "DO {};", dollar_quoted(&body));
    }
    out.push_str("COMMIT;\n");
    out
}

/// `$tag$body$tag$` with a tag the body does not contain.
fn dollar_quoted(body: &str) -> String {
    let mut tag = "$pgtrail$".to_string();
    let mut n = 0;
    while body.contains(&tag) {
        n += 1;
        tag = format!("$pgtrail{n}$");
    }
    format!("{tag}\n{body}\n{tag}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_double_quotes_and_dollar_quotes_avoid_the_body() {
        assert_eq!(literal("O'Neil"), "'O''Neil'");
        assert_eq!(literal("back\\slash"), "'back\\slash'");
        let quoted = dollar_quoted("x $pgtrail$ y");
        assert!(quoted.starts_with("$pgtrail1$\n"), "{quoted}");
        assert!(quoted.ends_with("\n$pgtrail1$"), "{quoted}");
    }

    #[test]
    fn a_guard_matches_keys_by_equality_and_other_columns_as_text() {
        let int = SourceColumn {
            name: "id".into(),
            type_oid: 23,
            type_name: "integer".into(),
            generated: false,
        };
        let json = SourceColumn {
            name: "user".into(),
            type_oid: 114,
            type_name: "json".into(),
            generated: false,
        };
        let row = vec![Cell::Text("7".into()), Cell::Text("{\"a\": 1}".into())];
        assert_eq!(
            row_condition(&[0], true, &row, &[&int, &json]),
            "\"id\" = '7'::integer AND \"user\"::text IS NOT DISTINCT FROM ('{\"a\": 1}'::json)::text"
        );
        // Without a key every column is compared as text; unknown cells are not compared.
        let row = vec![Cell::Null, Cell::Unknown];
        assert_eq!(
            row_condition(&[0, 1], false, &row, &[&int, &json]),
            "\"id\" IS NULL"
        );
    }
}
