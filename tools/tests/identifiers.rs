//! Every identifier pgtrail writes into SQL, tried with PostgreSQL's own keyword list: each
//! word of `pg_get_keywords()` as a table name and as a column name, a reserved word as a
//! schema and as a primary-key column, and names with capitals, quotes, spaces, non-ASCII
//! letters and `$`, through the initial snapshot, the stream and `as_of`, compared with what
//! PostgreSQL held at each moment. Unquoted, `SELECT user, current_date FROM t` reads as the
//! connecting role and today's date: the comparison catches that as well as a syntax error.

use std::collections::BTreeMap;

use pgtrail_capture::cluster::Cluster;
use pgtrail_query::{ArchiveSnapshot, Moment, state_at};
use pgtrail_store::{Cell, Lsn, quote_ident};

use crate::{capture_until_now, pgtrail_sql};

/// Names that are not keywords but need quoting (or look as if they might).
const ODD_NAMES: [&str; 7] = [
    "Mixed Case",
    "q\"x",
    "naïve",
    "with space",
    "a$b",
    "1st",
    "_ok",
];

/// A row as column name -> text (None for NULL).
pub(crate) type Row = BTreeMap<String, Option<String>>;

#[test]
fn every_keyword_as_a_table_and_a_column_name_is_captured_exactly() {
    let cluster = Cluster::shared();
    let db = cluster.fresh_database("keywords").unwrap();
    let psql = |sql: &str| {
        cluster
            .psql(&db, sql)
            .unwrap_or_else(|e| panic!("{e}: {sql:.200}"))
    };
    let keywords: Vec<String> = psql("SELECT word FROM pg_get_keywords() ORDER BY word")
        .lines()
        .map(str::to_string)
        .collect();
    assert!(keywords.len() > 400, "{} keywords", keywords.len());
    let names: Vec<String> = keywords
        .iter()
        .cloned()
        .chain(ODD_NAMES.iter().map(|s| s.to_string()))
        .collect();

    // The names pgtrail prints are quoted exactly as PostgreSQL's quote_ident quotes them.
    let literals = names
        .iter()
        .map(|n| format!("$q${n}$q$"))
        .collect::<Vec<_>>()
        .join(", ");
    let pg_quoted = psql(&format!(
        "SELECT quote_ident(n) FROM unnest(ARRAY[{literals}]) WITH ORDINALITY AS u(n, i) ORDER BY i"
    ));
    for (name, theirs) in names.iter().zip(pg_quoted.lines()) {
        assert_eq!(quote_ident(name), theirs, "quote_ident({name:?})");
    }

    // One table per name, one table with a column per name, a reserved word as schema and as
    // the key column.
    let mut tables: Vec<(String, String)> = names
        .iter()
        .map(|n| ("public".to_string(), n.clone()))
        .collect();
    tables.push(("public".into(), "kw_columns".into()));
    tables.push(("public".into(), "keyed".into()));
    tables.push(("user".into(), "table".into()));
    let mut setup = String::new();
    for name in &names {
        let t = format!("public.{}", quoted(name));
        setup.push_str(&format!(
            "CREATE TABLE {t} (id int PRIMARY KEY, v text); INSERT INTO {t} VALUES (1, $q$a {name}$q$);\n"
        ));
    }
    let columns: Vec<String> = names.iter().map(|n| quoted(n)).collect();
    setup.push_str(&format!(
        "CREATE TABLE kw_columns (id int PRIMARY KEY, {});\n",
        columns
            .iter()
            .map(|c| format!("{c} text"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    for id in 1..=3 {
        let values = (0..columns.len())
            .map(|i| format!("'r{id} c{i}'"))
            .collect::<Vec<_>>()
            .join(", ");
        setup.push_str(&format!(
            "INSERT INTO kw_columns VALUES ({id}, {values});\n"
        ));
    }
    setup.push_str(
        "CREATE TABLE keyed (\"order\" int PRIMARY KEY, \"user\" text, \"current_date\" text);
         INSERT INTO keyed VALUES (1, 'u1', 'd1'), (2, 'u2', 'd2');
         CREATE SCHEMA \"user\";
         CREATE TABLE \"user\".\"table\" (\"select\" int PRIMARY KEY, \"from\" text);
         INSERT INTO \"user\".\"table\" VALUES (1, 'f1');",
    );
    psql(&setup);

    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("archive");
    // Moment A: the initial snapshot.
    capture_until_now(cluster, &db, &archive);
    let at_snapshot: Lsn = psql("SELECT pg_current_wal_lsn()").parse().unwrap();
    let held_at_snapshot = contents(&psql, &tables);

    // Moment B: inserts, updates (a key change among them) and deletes through the stream.
    let mut writes = String::new();
    for name in &names {
        let t = format!("public.{}", quoted(name));
        writes.push_str(&format!(
            "INSERT INTO {t} VALUES (2, 'b'); UPDATE {t} SET v = v || '!' WHERE id = 1;\n"
        ));
    }
    let sets = columns
        .iter()
        .step_by(7)
        .map(|c| format!("{c} = {c} || '+'"))
        .collect::<Vec<_>>()
        .join(", ");
    writes.push_str(&format!(
        "UPDATE kw_columns SET {sets} WHERE id = 2; DELETE FROM kw_columns WHERE id = 3;
         INSERT INTO kw_columns (id, \"user\", \"current_date\") VALUES (4, 'u4', 'd4');
         UPDATE keyed SET \"user\" = 'u1*' WHERE \"order\" = 1;
         UPDATE keyed SET \"order\" = 20 WHERE \"order\" = 2;
         INSERT INTO \"user\".\"table\" VALUES (2, NULL);"
    ));
    psql(&writes);
    capture_until_now(cluster, &db, &archive);
    let at_stream: Lsn = psql("SELECT pg_current_wal_lsn()").parse().unwrap();
    let held_at_stream = contents(&psql, &tables);

    // Offline: as_of at each moment equals what PostgreSQL held.
    let snapshot = ArchiveSnapshot::open(&archive).unwrap();
    for (moment, held) in [
        (at_snapshot, &held_at_snapshot),
        (at_stream, &held_at_stream),
    ] {
        let mut wrong = Vec::new();
        for ((schema, name), expected) in tables.iter().zip(held) {
            // Looked up by the name pgtrail prints for it.
            let printed = format!("{}.{}", quote_ident(schema), quote_ident(name));
            let table = snapshot
                .table(&printed)
                .unwrap_or_else(|e| panic!("{printed}: {e}"));
            let rows = archive_rows(&snapshot, table, Moment::Lsn(moment)).unwrap();
            if &rows != expected {
                wrong.push(printed);
            }
        }
        assert!(
            wrong.is_empty(),
            "at {moment}, {} of {} tables differ from PostgreSQL: {}",
            wrong.len(),
            tables.len(),
            wrong.join(", ")
        );
    }

    // The same through `pgtrail sql`, as a user types the names.
    let sql = |query: String| pgtrail_sql(&archive, "csv", &query);
    let row = sql(format!(
        "SELECT \"user\", \"current_date\" FROM as_of_lsn('public.kw_columns', '{at_stream}') WHERE id = 4"
    ));
    assert_eq!(row.lines().nth(1), Some("u4,d4"), "{row}");
    let count = sql(format!(
        "SELECT count(*) AS n FROM as_of_lsn('public.\"order\"', '{at_stream}')"
    ));
    assert_eq!(count.lines().nth(1), Some("2"), "{count}");
}

/// `table`'s rows at `moment` as the archive answers (the row replay), sorted, in the shape
/// [`contents`] gives PostgreSQL's.
pub(crate) fn archive_rows(
    snapshot: &ArchiveSnapshot,
    table: &pgtrail_query::TableHistory,
    moment: Moment,
) -> datafusion::error::Result<Vec<Row>> {
    let state = state_at(snapshot, table, moment)?;
    let mut rows: Vec<Row> = state
        .rows
        .values()
        .flat_map(|versions| versions.iter())
        .map(|(version, cells)| {
            version
                .columns
                .iter()
                .zip(cells)
                .map(|(c, cell)| {
                    let text = match cell {
                        Cell::Text(t) => Some(t.clone()),
                        Cell::Null => None,
                        Cell::Unknown => Some("<unknown>".into()),
                    };
                    (c.name.clone(), text)
                })
                .collect()
        })
        .collect();
    rows.sort();
    Ok(rows)
}

/// Each table's rows as PostgreSQL holds them now, sorted, in one statement.
pub(crate) fn contents(
    psql: &dyn Fn(&str) -> String,
    tables: &[(String, String)],
) -> Vec<Vec<Row>> {
    let query = tables
        .iter()
        .enumerate()
        .map(|(i, (schema, name))| {
            format!(
                "SELECT {i}, coalesce((SELECT json_agg(row_to_json(x)) FROM {}.{} x), '[]')::text",
                quoted(schema),
                quoted(name)
            )
        })
        .collect::<Vec<_>>()
        .join(" UNION ALL ");
    let mut out = vec![Vec::new(); tables.len()];
    for line in psql(&format!(
        "{} {query}",
        pgtrail_capture::source::session_settings_sql()
    ))
    .lines()
    {
        let (i, json) = line.split_once('|').unwrap();
        out[i.parse::<usize>().unwrap()] = json_rows(json);
    }
    out
}

/// Rows from PostgreSQL's `json_agg(row_to_json(…))`, each value as its text, sorted.
pub(crate) fn json_rows(json: &str) -> Vec<Row> {
    let rows: Vec<serde_json::Map<String, serde_json::Value>> = serde_json::from_str(json).unwrap();
    let mut rows: Vec<Row> = rows
        .into_iter()
        .map(|r| {
            r.into_iter()
                .map(|(k, v)| {
                    let text = match v {
                        serde_json::Value::Null => None,
                        serde_json::Value::String(s) => Some(s),
                        other => Some(other.to_string()),
                    };
                    (k, text)
                })
                .collect()
        })
        .collect();
    rows.sort();
    rows
}

/// The test's own quoting for the SQL it runs itself (independent of the code under test).
pub(crate) fn quoted(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
