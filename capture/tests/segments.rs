//! Segments against a real PostgreSQL: what compaction writes reads back as exactly what
//! PostgreSQL held, whatever the type, with or without a capture running.

use std::time::Duration;

use pgtrail_capture::CompactionPolicy;
use pgtrail_store::segment::{PgKind, SegmentContent};
use pgtrail_store::{ChangeLog, CompactOptions, Compactor, LogReader, Op};

use crate::harness::{TestDb, json_text, read_archive, reconstruct, select_state};
use crate::scenarios::{TYPED_CHANGES, TYPED_TABLE};

const MORE_TYPES: &str = "
CREATE TABLE more (id int PRIMARY KEY, small numeric(5,2), tz timetz, ch \"char\", nm name, o oid, r int4range,
  fa float4[], da date[], ua uuid[], na numeric(5,2)[], big numeric(38,0), neg numeric(10,4));
INSERT INTO more VALUES
 (1, 'NaN', '12:34:56.789+05:30', 'x', 'a name', 4294967295, '[1,5)', '{1.5,NaN,-Infinity}', '{2000-01-01,infinity}',
  '{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}', '{1.25,NULL}', '99999999999999999999999999999999999999', '-0.0001'),
 (2, 999.99, NULL, NULL, NULL, 0, 'empty', '{}', '{}', '{}', '{}', '-99999999999999999999999999999999999999', '123456.7890');
";

/// A PostgreSQL literal of `text` cast to `ty`, or NULL.
fn literal(text: Option<&str>, ty: &str) -> String {
    match text {
        None => format!("NULL::{ty}"),
        Some(t) => {
            assert!(
                !t.contains("$v$"),
                "test value contains the quote delimiter"
            );
            format!("$v${t}$v$::{ty}")
        }
    }
}

/// Ask PostgreSQL to read each archived value back as its column type and print it, and
/// compare with what it prints for the table itself: the archive's values are the same values.
fn assert_same_values_as_postgres(db: &TestDb, table: &str) {
    let columns_json = db.sql(&format!(
        "SELECT json_agg(json_build_array(attname, format_type(atttypid, atttypmod)) ORDER BY attnum) \
         FROM pg_attribute WHERE attrelid = '{table}'::regclass AND attnum > 0 AND NOT attisdropped"
    ));
    let columns: Vec<(String, String)> = serde_json::from_str(&columns_json).unwrap();
    let names: Vec<&str> = columns.iter().map(|(n, _)| n.as_str()).collect();
    let expected = select_state(db, table, &["id"], &names);
    let archived = reconstruct(&db.archive_dir(), table);
    assert_eq!(
        archived.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>()
    );
    let settings = pgtrail_capture::source::session_settings_sql();
    for (key, row) in &archived {
        let exprs: Vec<String> = row
            .iter()
            .zip(&columns)
            .map(|(v, (_, ty))| {
                assert_ne!(
                    v, "<UNKNOWN>",
                    "row {key}: an unknown value in a fully captured table"
                );
                let text = (v != "<NULL>").then_some(v.as_str());
                format!("({})::text", literal(text, ty))
            })
            .collect();
        let json = db.sql(&format!(
            "{settings} SELECT json_build_array({})",
            exprs.join(", ")
        ));
        let read_back: Vec<serde_json::Value> =
            serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}"));
        let read_back: Vec<String> = read_back.into_iter().map(json_text).collect();
        for (i, (name, _)) in columns.iter().enumerate() {
            assert_eq!(
                read_back[i], expected[key][i],
                "{table} row {key} column {name}: archived as {:?}",
                row[i]
            );
        }
    }
}

fn compact(db: &TestDb) {
    let log = ChangeLog::open(&db.archive_dir()).unwrap();
    let report = Compactor::new(log.shared(), &db.archive_dir(), CompactOptions::default())
        .run()
        .unwrap();
    assert!(report.changes > 0);
    assert_eq!(
        log.reader().unwrap().change_count().unwrap(),
        0,
        "the log is trimmed after compaction"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn every_type_reads_back_from_segments_as_the_value_postgres_holds() {
    let db = TestDb::new("segtypes");
    db.sql(TYPED_TABLE);
    db.sql(MORE_TYPES);
    db.capture_until_now(db.config()).await.unwrap();
    db.sql(
        &format!(
            "{TYPED_CHANGES}
         INSERT INTO more SELECT id + 10, small, tz, ch, nm, o, r, fa, da, ua, na, big, neg FROM more;
         UPDATE more SET small = -1.5 WHERE id = 1;"
        ),
    );
    db.capture_until_now(db.config()).await.unwrap();
    compact(&db);

    // The typed columns really are typed in the segment, not text.
    let reader = LogReader::open(&db.archive_dir()).unwrap();
    let manifest = reader.manifest().unwrap();
    let typed = manifest
        .segments
        .iter()
        .find_map(|s| match &s.content {
            SegmentContent::Table(rel) if rel.name == "typed" => Some(rel.clone()),
            _ => None,
        })
        .expect("a segment of typed");
    let kind = |name: &str| {
        let c = typed.columns.iter().find(|c| c.name == name).unwrap();
        PgKind::of(c.type_oid, c.type_modifier)
    };
    assert_eq!(
        kind("n2"),
        PgKind::Decimal {
            precision: 12,
            scale: 3
        }
    );
    assert_eq!(kind("tstz"), PgKind::TimestampTz);
    assert_eq!(kind("arr"), PgKind::Array(Box::new(PgKind::Int4)));
    drop(reader);

    assert_same_values_as_postgres(&db, "typed");
    assert_same_values_as_postgres(&db, "more");
}

#[tokio::test(flavor = "multi_thread")]
async fn background_compaction_during_capture_keeps_every_change_exactly_once() {
    let db = TestDb::new("bgcompact");
    db.sql("CREATE TABLE ledger (seq int PRIMARY KEY, note text); CREATE TABLE acct (id int PRIMARY KEY, balance int8)");
    db.sql("INSERT INTO acct SELECT g, 0 FROM generate_series(1, 20) g");
    let mut config = db.config();
    config.compaction = Some(CompactionPolicy {
        options: CompactOptions {
            merge_min_segments: 3,
            retire_grace: Duration::ZERO,
            ..CompactOptions::default()
        },
        min_changes: 40,
        max_age: Duration::from_secs(3600),
        check_every: Duration::from_millis(50),
        retention: None,
    });
    // The slot and the initial snapshot first, so that every round below is streamed.
    db.capture_until_now(config.clone()).await.unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let live = tokio::spawn(pgtrail_capture::run(
        config.clone(),
        async move {
            let _ = stop_rx.await;
        },
        |_| {},
    ));
    let (cluster, name) = (db.cluster, db.name.clone());
    tokio::task::spawn_blocking(move || {
        for round in 0..60 {
            let sql = format!(
                "INSERT INTO ledger SELECT g, 'r{round}' FROM generate_series({a}, {b}) g; \
                 UPDATE acct SET balance = balance + {round} WHERE id % 3 = {m}; \
                 SELECT pg_logical_emit_message(true, 'oracle', 'round {round}');",
                a = round * 10,
                b = round * 10 + 9,
                m = round % 3
            );
            cluster.psql(&name, &sql).unwrap();
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .await
    .unwrap();
    // Let the live capture and its compactor work a little, then stop it and catch up.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = stop_tx.send(());
    let summary = live.await.unwrap().unwrap();
    assert!(
        summary.compacted > 0,
        "the background compactor ran during capture: {summary:?}"
    );
    db.capture_until_now(config).await.unwrap();

    let (changes, rels) = read_archive(&db.archive_dir());
    let ledger_ids: Vec<u32> = rels
        .iter()
        .filter(|r| r.name == "ledger")
        .map(|r| r.relation_id)
        .collect();
    let reader = LogReader::open(&db.archive_dir()).unwrap();
    let manifest = reader.manifest().unwrap();
    assert!(
        manifest.segments.len() >= 2,
        "the background compactor wrote segments: {manifest:?}"
    );
    drop(reader);
    let mut keys: Vec<_> = changes.iter().map(|(k, _)| *k).collect();
    let n = keys.len();
    keys.dedup();
    assert_eq!(keys.len(), n, "no change twice across segments and log");
    let ledger: Vec<i64> = changes
        .iter()
        .filter(|(_, c)| {
            matches!(c.op, Op::Insert | Op::Snapshot) && ledger_ids.contains(&c.relation_id)
        })
        .filter_map(|(_, c)| c.key.as_ref()?.first()?.as_ref()?.parse().ok())
        .collect();
    let mut sorted = ledger.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        (0..600).collect::<Vec<i64>>(),
        "every ledger row exactly once"
    );
    let messages = changes.iter().filter(|(_, c)| c.op == Op::Message).count();
    assert_eq!(messages, 60);
    let expected = select_state(&db, "acct", &["id"], &["id", "balance"]);
    assert_eq!(reconstruct(&db.archive_dir(), "acct"), expected);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_schema_change_mid_stream_gives_one_segment_per_schema_version() {
    let db = TestDb::new("segschema");
    db.sql("CREATE TABLE s (id int PRIMARY KEY, a text)");
    db.capture_until_now(db.config()).await.unwrap();
    db.sql(
        "INSERT INTO s VALUES (1, 'one');
         ALTER TABLE s ADD COLUMN b int8;
         INSERT INTO s VALUES (2, 'two', 2);
         UPDATE s SET b = 1 WHERE id = 1;",
    );
    db.capture_until_now(db.config()).await.unwrap();
    compact(&db);
    let reader = LogReader::open(&db.archive_dir()).unwrap();
    let versions: Vec<Vec<String>> = reader
        .manifest()
        .unwrap()
        .segments
        .iter()
        .filter_map(|s| match &s.content {
            SegmentContent::Table(rel) if rel.name == "s" => {
                Some(rel.columns.iter().map(|c| c.name.clone()).collect())
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        versions,
        vec![
            vec!["id".to_string(), "a".into()],
            vec!["id".into(), "a".into(), "b".into()]
        ]
    );
    drop(reader);
    let expected = select_state(&db, "s", &["id"], &["id", "a", "b"]);
    let got = reconstruct(&db.archive_dir(), "s");
    assert_eq!(got, expected);
}
