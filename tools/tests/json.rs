//! JSON answers embed json and jsonb values as JSON (not as strings of JSON text), the same
//! way in every answer that shows them: as_of, diff, row_history, the history tables and the
//! changes view, from segments and from the log tail. PostgreSQL's own text and `to_jsonb` of
//! each value at each moment are the reference.

use std::collections::BTreeMap;

use pgtrail_capture::cluster::{Cluster, ClusterOptions};
use serde_json::Value;

use crate::{capture_until_now, pgtrail, pgtrail_sql, pgtrail_sql_parquet};

const TABLE: &str =
    "CREATE TABLE j (id int PRIMARY KEY, meta jsonb, raw json, metas jsonb[], note text)";

/// Every JSON kind in jsonb, and json texts whose key order, duplicate keys, number spelling
/// and line breaks only the json type keeps.
const ROWS: &str = r#"INSERT INTO j VALUES
 (1, '{"a": [1, 2, {"b": null}], "c": true}', '{"z": 1, "a": 2, "z": 3}', ARRAY['{"x": 1}'::jsonb, 'null', '[2]'], '{"not": "json"}'),
 (2, '[1, "x", false]', '[1.0e+2, -0, 1E5, 0.1000]', ARRAY[]::jsonb[], 'plain'),
 (3, '"a string with \"quotes\", ünïcødé and ✓"', E'{\n  "multi": "line",\n  "n": 1\n}', NULL, NULL),
 (4, '1.5e300', '"s"', ARRAY['1'::jsonb], 'x'),
 (5, '12345678901234567890.12345678901234567890', 'null', ARRAY['"y"'::jsonb], 'x'),
 (6, 'true', NULL, ARRAY['{}'::jsonb], 'x'),
 (7, 'false', '{}', ARRAY['[]'::jsonb], 'x'),
 (8, 'null', '[]', ARRAY['true'::jsonb], 'x'),
 (9, NULL, '-1.25E-7', ARRAY['false'::jsonb], 'x'),
 (10, '{"nested": {"deep": [[], {}]}, "emoji": "😀", "e": -0.5e-3}', '{"i": 10}', NULL, 'x')"#;

/// What PostgreSQL held for one row: the text of `meta` and `raw` (`None`: SQL NULL) and
/// `to_jsonb(metas)`.
#[derive(Debug, Clone)]
struct Held {
    meta: Option<String>,
    raw: Option<String>,
    metas: Value,
}

fn held(cluster: &Cluster) -> BTreeMap<i64, Held> {
    let text = cluster
        .psql(
            "j",
            "SELECT coalesce(json_agg(json_build_array(id, meta::text, raw::text, to_jsonb(metas)) ORDER BY id), '[]') FROM j",
        )
        .unwrap();
    let rows: Vec<Value> = serde_json::from_str(&text).unwrap();
    rows.into_iter()
        .map(|r| {
            let text = |v: &Value| v.as_str().map(str::to_string);
            (
                r[0].as_i64().unwrap(),
                Held {
                    meta: text(&r[1]),
                    raw: text(&r[2]),
                    metas: r[3].clone(),
                },
            )
        })
        .collect()
}

/// A JSON text as it appears embedded in one line of output.
fn one_line(text: &str) -> String {
    text.replace(['\n', '\r'], " ")
}

/// `row` (an object with the table's columns, from `line`) holds what PostgreSQL held: each
/// json and jsonb value embedded as JSON, equal to PostgreSQL's, and written as PostgreSQL's
/// exact text; an SQL NULL as `null`.
fn check_row(what: &str, line: &str, row: &Value, want: &Held) {
    for (column, text) in [("meta", &want.meta), ("raw", &want.raw)] {
        match text {
            None => assert_eq!(row[column], Value::Null, "{what}: {column} in {line}"),
            Some(text) => {
                let expected: Value = serde_json::from_str(text).unwrap();
                assert_eq!(row[column], expected, "{what}: {column} in {line}");
                assert!(
                    line.contains(&format!("\"{column}\":{}", one_line(text))),
                    "{what}: {column} is not PostgreSQL's exact text {text:?} in {line}"
                );
            }
        }
    }
    assert!(
        row.get("meta").is_some() && row.get("raw").is_some(),
        "{what}: an SQL NULL is written as null, not left out: {line}"
    );
    assert_eq!(row["metas"], want.metas, "{what}: metas in {line}");
    // A text column that holds JSON-looking text stays a string.
    if let Some(note) = row.get("note").filter(|n| !n.is_null()) {
        assert!(note.is_string(), "{what}: note is text: {line}");
    }
}

fn lines(out: &str) -> Vec<(String, Value)> {
    out.lines()
        .map(|l| (l.to_string(), serde_json::from_str(l).unwrap()))
        .collect()
}

#[test]
fn json_answers_embed_json_and_jsonb_values_as_json() {
    let cluster = Cluster::start(ClusterOptions::default()).unwrap();
    cluster.psql("postgres", "CREATE DATABASE j").unwrap();
    cluster.psql("j", TABLE).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("archive");
    // Capture first, so the rows arrive through the stream; then into segments.
    capture_until_now(&cluster, "j", &archive);
    cluster.psql("j", ROWS).unwrap();
    let first = held(&cluster);
    let lsn1 = cluster.psql("j", "SELECT pg_current_wal_lsn()").unwrap();
    capture_until_now(&cluster, "j", &archive);
    let out = pgtrail()
        .args(["compact", "--archive"])
        .arg(&archive)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Then changes that stay in the log tail.
    cluster
        .psql(
            "j",
            "UPDATE j SET meta = (SELECT meta FROM j AS o WHERE o.id = j.id % 10 + 1), \
             raw = (SELECT raw FROM j AS o WHERE o.id = (j.id + 4) % 10 + 1), metas = ARRAY[meta]; \
             DELETE FROM j WHERE id = 10",
        )
        .unwrap();
    let second = held(&cluster);
    let lsn2 = cluster.psql("j", "SELECT pg_current_wal_lsn()").unwrap();
    capture_until_now(&cluster, "j", &archive);
    assert_eq!(first.len(), 10);
    assert_eq!(second.len(), 9);

    for (lsn, want) in [(&lsn1, &first), (&lsn2, &second)] {
        let out = pgtrail_sql(
            &archive,
            "json",
            &format!("SELECT * FROM as_of_lsn('public.j', '{lsn}') ORDER BY id"),
        );
        let rows = lines(&out);
        assert_eq!(rows.len(), want.len(), "as_of at {lsn}: {out}");
        for (line, row) in &rows {
            let id = row["id"].as_i64().unwrap();
            check_row(&format!("as_of {lsn} id {id}"), line, row, &want[&id]);
        }
    }

    let out = pgtrail_sql(
        &archive,
        "json",
        &format!("SELECT change, before, after FROM diff('public.j', '{lsn1}', '{lsn2}')"),
    );
    let rows = lines(&out);
    assert_eq!(rows.len(), 10, "every row changed or went: {out}");
    for (line, row) in &rows {
        if let Some(id) = row["before"]["id"].as_i64() {
            check_row(
                &format!("diff before id {id}"),
                line,
                &row["before"],
                &first[&id],
            );
        }
        if let Some(id) = row["after"]["id"].as_i64() {
            check_row(
                &format!("diff after id {id}"),
                line,
                &row["after"],
                &second[&id],
            );
        }
    }

    for id in [1i64, 3, 9] {
        let out = pgtrail_sql(
            &archive,
            "json",
            &format!("SELECT after FROM row_history('public.j', '{id}') ORDER BY lsn, seq"),
        );
        let rows = lines(&out);
        assert_eq!(rows.len(), 2, "row {id}: {out}");
        check_row(
            &format!("row_history {id} insert"),
            &rows[0].0,
            &rows[0].1["after"],
            &first[&id],
        );
        check_row(
            &format!("row_history {id} update"),
            &rows[1].0,
            &rows[1].1["after"],
            &second[&id],
        );
    }

    // The history table (segments, then the tail) and the changes view: the same shape.
    let out = pgtrail_sql(
        &archive,
        "json",
        "SELECT op, after FROM public.j WHERE after IS NOT NULL ORDER BY lsn, seq",
    );
    let rows = lines(&out);
    // Ten inserts, ten updates (row 10's state between its update and its delete was not
    // recorded from PostgreSQL).
    assert_eq!(rows.len(), 20, "{out}");
    for (i, (line, row)) in rows.iter().enumerate() {
        let id = row["after"]["id"].as_i64().unwrap();
        let want = if i < 10 {
            first.get(&id)
        } else {
            second.get(&id)
        };
        if let Some(want) = want {
            check_row(&format!("history {i} id {id}"), line, &row["after"], want);
        }
    }
    // One field of a row image (the scan decodes only it) keeps the mark.
    let out = pgtrail_sql(
        &archive,
        "json",
        "SELECT after.id AS id, after.meta AS meta, after.raw AS raw, after.metas AS metas \
         FROM public.j WHERE op = 'insert' ORDER BY lsn, seq",
    );
    let rows = lines(&out);
    assert_eq!(rows.len(), 10, "{out}");
    for (line, row) in &rows {
        let id = row["id"].as_i64().unwrap();
        check_row(&format!("after.meta id {id}"), line, row, &first[&id]);
    }
    let out = pgtrail_sql(
        &archive,
        "json",
        "SELECT operation, before, after, context FROM changes WHERE \"table\" = 'j' ORDER BY lsn, seq",
    );
    let rows = lines(&out);
    assert_eq!(rows.len(), 21, "{out}");
    for (i, (line, row)) in rows.iter().enumerate() {
        assert!(
            row["context"].is_null() || row["context"].is_object(),
            "{line}"
        );
        if i < 10 {
            let id = row["after"]["id"].as_i64().unwrap();
            check_row(
                &format!("changes {i} id {id}"),
                line,
                &row["after"],
                &first[&id],
            );
        } else {
            let id = row["before"]["id"].as_i64().unwrap();
            if row["operation"] == "UPDATE" {
                check_row(
                    &format!("changes {i} before id {id}"),
                    line,
                    &row["before"],
                    &first[&id],
                );
            }
            if let Some(want) = second.get(&id).filter(|_| !row["after"].is_null()) {
                check_row(&format!("changes {i} id {id}"), line, &row["after"], want);
            }
        }
    }

    // Parquet answers carry the canonical JSON type on json columns, for the tools reading them.
    let reader = pgtrail_sql_parquet(
        &archive,
        &format!("SELECT * FROM as_of_lsn('public.j', '{lsn1}')"),
        &dir.path().join("j.parquet"),
    );
    let schema = reader.schema().clone();
    let extension = |name: &str| {
        schema
            .field_with_name(name)
            .unwrap()
            .metadata()
            .get("ARROW:extension:name")
            .cloned()
    };
    assert_eq!(extension("meta").as_deref(), Some("arrow.json"));
    assert_eq!(extension("raw").as_deref(), Some("arrow.json"));
    assert_eq!(extension("note"), None);

    // CSV keeps the text.
    let out = pgtrail_sql(
        &archive,
        "csv",
        &format!("SELECT raw FROM as_of_lsn('public.j', '{lsn1}') WHERE id = 1"),
    );
    assert_eq!(
        out.lines().nth(1),
        Some("\"{\"\"z\"\": 1, \"\"a\"\": 2, \"\"z\"\": 3}\""),
        "{out}"
    );
}
