//! SQL over an archive built through the store's own API (no server needed): the history
//! tables, the `changes` view, diff, row_history, errors, and a consistent cut while a
//! compactor moves the log into segments.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::datatypes::{Int64Type, TimestampMicrosecondType, UInt64Type};
use pgtrail_query::{ArchiveSnapshot, session};
use pgtrail_store::{
    ChangeKey, ChangeLog, Column, CompactOptions, Compactor, IncomingCell, IncomingChange, LogOp,
    Lsn, Op, RelationVersion, TableScope,
};

fn rel() -> RelationVersion {
    let col = |name: &str, type_oid, is_key| Column {
        name: name.into(),
        type_oid,
        type_modifier: -1,
        is_key,
    };
    RelationVersion {
        relation_id: 7,
        valid_from: ChangeKey::default(),
        schema: "public".into(),
        name: "Odd Name".into(),
        replica_identity: b'd',
        columns: vec![col("id", 23, true), col("v", 25, false)],
        primary_key: vec!["id".into()],
    }
}

fn t(s: &str) -> IncomingCell {
    IncomingCell::Text(s.into())
}

/// Transaction n (commit LSN 100·n, committed at n seconds): insert row n, update row n-1,
/// delete row n-2, with context {"user_id": n % 3}.
fn txn(n: u64) -> Vec<LogOp> {
    let mut ops = vec![LogOp::Begin {
        final_lsn: Lsn(100 * n),
        xid: n as u32,
        committed_at_us: 1_000_000 * n as i64,
    }];
    if n == 1 {
        ops.push(LogOp::Relation(rel()));
    }
    ops.push(LogOp::Context(format!("{{\"user_id\": {}}}", n % 3)));
    ops.push(LogOp::Change(IncomingChange {
        relation_id: 7,
        op: Op::Insert,
        old: None,
        new: Some(vec![t(&n.to_string()), t("new")]),
    }));
    if n >= 2 {
        let id = (n - 1).to_string();
        ops.push(LogOp::Change(IncomingChange {
            relation_id: 7,
            op: Op::Update,
            old: None,
            new: Some(vec![t(&id), t(&format!("v{n}"))]),
        }));
    }
    if n >= 3 {
        let id = (n - 2).to_string();
        ops.push(LogOp::Change(IncomingChange {
            relation_id: 7,
            op: Op::Delete,
            old: Some(pgtrail_store::OldImage::Key(vec![
                t(&id),
                IncomingCell::Null,
            ])),
            new: None,
        }));
    }
    ops.push(LogOp::Commit {
        end_lsn: Lsn(100 * n + 8),
    });
    ops
}

fn build(dir: &Path, txns: u64, compact_every: u64) -> ChangeLog {
    let mut log = ChangeLog::open(dir).unwrap();
    let compactor = Compactor::new(log.shared(), dir, CompactOptions::default());
    for n in 1..=txns {
        log.apply(txn(n)).unwrap();
        // The index stored, as the capture does when idle: compaction may cut past this.
        log.complete_all().unwrap();
        if compact_every > 0 && n % compact_every == 0 {
            compactor.run().unwrap();
        }
    }
    log
}

async fn query(dir: &Path, log: &ChangeLog, sql: &str) -> Vec<RecordBatch> {
    let archive = ArchiveSnapshot::from_reader(dir, &log.reader().unwrap()).unwrap();
    let ctx = session(Arc::new(archive)).unwrap();
    ctx.sql(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .collect()
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

fn column_i64(batches: &[RecordBatch], i: usize) -> Vec<i64> {
    batches
        .iter()
        .flat_map(|b| {
            b.column(i)
                .as_primitive::<Int64Type>()
                .iter()
                .map(|v| v.unwrap())
                .collect::<Vec<_>>()
        })
        .collect()
}

fn column_text(batches: &[RecordBatch], i: usize) -> Vec<String> {
    batches
        .iter()
        .flat_map(|b| {
            let c = datafusion::arrow::compute::cast(
                b.column(i),
                &datafusion::arrow::datatypes::DataType::Utf8,
            )
            .unwrap();
            (0..c.len())
                .map(|r| {
                    if c.is_null(r) {
                        "NULL".into()
                    } else {
                        c.as_string::<i32>().value(r).to_string()
                    }
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn history_changes_diff_and_row_history_agree_across_segments_and_tail() {
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("a");
    // 10 transactions, compacted every 4: segments hold 1-8, the tail 9-10.
    let log = build(&archive, 10, 4);
    let counts = query(
        &archive,
        &log,
        "SELECT op, count(*) AS n FROM public.\"Odd Name\" GROUP BY op ORDER BY op",
    )
    .await;
    assert_eq!(column_text(&counts, 0), ["delete", "insert", "update"]);
    assert_eq!(column_i64(&counts, 1), [8, 10, 9]);

    // The changes view: audit by context across segments and tail.
    let by_user = query(
        &archive,
        &log,
        "SELECT count(*) AS n FROM changes WHERE context LIKE '%\"user_id\": 1}%' AND operation = 'CREATE'",
    )
    .await;
    assert_eq!(column_i64(&by_user, 0), [4], "transactions 1, 4, 7, 10");
    let json = query(
        &archive,
        &log,
        "SELECT after FROM changes WHERE position = '0/3E8' AND operation = 'CREATE'",
    )
    .await;
    assert_eq!(column_text(&json, 0), [r#"{"id":10,"v":"new"}"#]);

    let users = query(
        &archive,
        &log,
        "SELECT json_get(context, 'user_id') AS u, count(*) AS n FROM changes GROUP BY 1 ORDER BY 1",
    )
    .await;
    assert_eq!(column_text(&users, 0), ["0", "1", "2"]);
    assert_eq!(
        column_i64(&users, 1),
        [9, 10, 8],
        "user n % 3: transactions 3,6,9 / 1,4,7,10 / 2,5,8"
    );
    let lsns = query(
        &archive,
        &log,
        "SELECT pg_lsn(max(lsn)), lsn('0/3E8') FROM public.\"Odd Name\"",
    )
    .await;
    assert_eq!(column_text(&lsns, 0), ["0/3E8"]);
    assert_eq!(column_text(&lsns, 1), ["1000"]);

    // Pruning by lsn still returns exactly the rows in range (here: only the tail).
    let tail_only = query(
        &archive,
        &log,
        "SELECT count(*) FROM public.\"Odd Name\" WHERE lsn > 850",
    )
    .await;
    assert_eq!(column_i64(&tail_only, 0), [6]);

    // as_of by LSN at transaction 5: rows 4 (updated by 5) and 5; 1-3 deleted.
    let state = query(
        &archive,
        &log,
        "SELECT id, v FROM as_of_lsn('public.\"Odd Name\"', '0/1F4') ORDER BY id",
    )
    .await;
    assert_eq!(column_text(&state, 0), ["4", "5"]);
    assert_eq!(column_text(&state, 1), ["v5", "new"]);

    let diff = query(
        &archive,
        &log,
        "SELECT change, key, before.v AS was, after.v AS now FROM diff('public.\"Odd Name\"', '0/1F4', '0/3E8') ORDER BY key",
    )
    .await;
    // At 0/3E8 rows 9 (updated by 10) and 10 exist: 4 and 5 went, 9 and 10 came.
    assert_eq!(
        column_text(&diff, 0),
        ["insert", "delete", "delete", "insert"]
    );
    assert_eq!(column_text(&diff, 1), ["10", "4", "5", "9"]);
    assert_eq!(column_text(&diff, 2), ["NULL", "v5", "new", "NULL"]);
    assert_eq!(column_text(&diff, 3), ["new", "NULL", "NULL", "v10"]);

    let history = query(
        &archive,
        &log,
        "SELECT op, after.v AS v, context FROM row_history('public.\"Odd Name\"', 6) ORDER BY lsn",
    )
    .await;
    assert_eq!(column_text(&history, 0), ["insert", "update", "delete"]);
    assert_eq!(column_text(&history, 1), ["new", "v7", "NULL"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_names_early_moments_and_malformed_sql_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("a");
    let log = build(&archive, 3, 0);
    let snapshot =
        Arc::new(ArchiveSnapshot::from_reader(&archive, &log.reader().unwrap()).unwrap());
    let ctx = session(snapshot).unwrap();
    for (sql, expected) in [
        (
            "SELECT * FROM as_of_lsn('public.nope', '0/64')",
            "has no table public.nope",
        ),
        (
            "SELECT * FROM as_of_lsn('public.\"Odd Name', '0/64')",
            "is not a table name",
        ),
        (
            "SELECT * FROM as_of_lsn('public.\"Odd Name\"', '0/10')",
            "before the archive's history begins",
        ),
        (
            "SELECT * FROM as_of('public.\"Odd Name\"', TIMESTAMP '1970-01-01 00:00:00')",
            "before the archive's history begins",
        ),
        (
            "SELECT * FROM as_of_lsn('public.\"Odd Name\"', 'zz')",
            "invalid LSN",
        ),
        ("SELEC 1", "Expected: an SQL statement"),
    ] {
        let result = match ctx.sql(sql).await {
            Ok(frame) => frame.collect().await.map(|_| ()),
            Err(e) => Err(e),
        };
        let err = result
            .err()
            .unwrap_or_else(|| panic!("{sql} must fail"))
            .to_string();
        assert!(err.contains(expected), "{sql}: {err}");
    }
    // The SQL surface is read-only: nothing that writes, or reads a file outside the archive.
    let outside = dir.path().join("outside.csv");
    std::fs::write(&outside, "a\n1\n").unwrap();
    for sql in [
        format!(
            "COPY (SELECT 1 AS a) TO '{}'",
            dir.path().join("written.csv").display()
        ),
        format!(
            "CREATE EXTERNAL TABLE x STORED AS CSV LOCATION '{}'",
            outside.display()
        ),
        "CREATE TABLE t AS SELECT 1 AS a".to_string(),
        "CREATE VIEW v AS SELECT 1 AS a".to_string(),
        "INSERT INTO public.changes SELECT * FROM public.changes".to_string(),
        "DROP TABLE public.changes".to_string(),
        "SET datafusion.execution.batch_size = 1".to_string(),
    ] {
        let err = pgtrail_query::read_only_query(&ctx, &sql)
            .await
            .err()
            .unwrap_or_else(|| panic!("{sql} must be refused"));
        assert!(
            err.to_string().contains("the archive is read-only"),
            "{sql}: {err}"
        );
    }
    assert!(
        !dir.path().join("written.csv").exists(),
        "COPY wrote nothing"
    );
    let rows = pgtrail_query::read_only_query(&ctx, "SELECT count(*) FROM public.changes")
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(column_i64(&rows, 0).len(), 1, "queries still run");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_read_is_a_consistent_cut_while_compaction_runs() {
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("a");
    let mut log = build(&archive, 1, 0);
    let compactor = Compactor::new(
        log.shared(),
        &archive,
        CompactOptions {
            merge_min_segments: 3,
            ..CompactOptions::default()
        },
    );
    let stop = Arc::new(AtomicBool::new(false));
    let compacting = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                compactor.run().unwrap();
            }
        })
    };
    for n in 2..=40u64 {
        log.apply(txn(n)).unwrap();
        // The index stored, as the capture does when idle: compaction may cut past this.
        log.complete_all().unwrap();
        let expected = (n + (n - 1) + n.saturating_sub(2)) as i64;
        let count = query(&archive, &log, "SELECT count(*) FROM public.\"Odd Name\"").await;
        assert_eq!(
            column_i64(&count, 0),
            [expected],
            "after transaction {n}: no change missing or twice"
        );
    }
    stop.store(true, Ordering::Relaxed);
    compacting.join().unwrap();
}

/// Pruning is real: with the segment of transactions 5-8 damaged, queries that prune it away
/// (an earlier `as_of`, an `lsn` filter past it) still answer, and a query that needs it fails
/// on its checksum rather than returning wrong rows.
#[tokio::test(flavor = "multi_thread")]
async fn pruned_segments_are_never_opened() {
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("a");
    let log = build(&archive, 10, 4);
    let manifest = log.reader().unwrap().manifest().unwrap();
    let later = manifest
        .segments
        .iter()
        .find(|s| s.min_key.commit_lsn == Lsn(500))
        .expect("a segment of 5-8");
    let path = archive
        .join(pgtrail_store::SEGMENTS_DIR)
        .join(&later.file_name);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[20] ^= 0xFF;
    std::fs::write(&path, bytes).unwrap();

    let state = query(
        &archive,
        &log,
        "SELECT id FROM as_of_lsn('public.\"Odd Name\"', '0/190') ORDER BY id",
    )
    .await;
    assert_eq!(column_text(&state, 0), ["3", "4"]);
    let tail = query(
        &archive,
        &log,
        "SELECT count(*) FROM public.\"Odd Name\" WHERE lsn > 850",
    )
    .await;
    assert_eq!(column_i64(&tail, 0), [6]);

    let snapshot =
        Arc::new(ArchiveSnapshot::from_reader(&archive, &log.reader().unwrap()).unwrap());
    let ctx = session(snapshot).unwrap();
    let err = ctx
        .sql("SELECT count(*) FROM public.\"Odd Name\"")
        .await
        .unwrap()
        .collect()
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("does not match the manifest"), "{err}");
}

/// A table whose schema changed: `n` went from int4 to int8 (so the history has it as text)
/// and `w` was added. Transactions 1-4 are in version 1, 5-8 in version 2.
fn versioned_txn(n: u64) -> Vec<LogOp> {
    let col = |name: &str, type_oid, is_key| Column {
        name: name.into(),
        type_oid,
        type_modifier: -1,
        is_key,
    };
    let v2 = n >= 5;
    let mut columns = vec![
        col("id", 23, true),
        col("v", 25, false),
        col("n", if v2 { 20 } else { 23 }, false),
    ];
    if v2 {
        columns.push(col("w", 25, false));
    }
    let width = columns.len();
    let mut ops = vec![LogOp::Begin {
        final_lsn: Lsn(100 * n),
        xid: n as u32,
        committed_at_us: 1_000_000 * n as i64,
    }];
    if n == 1 || n == 5 {
        ops.push(LogOp::Relation(RelationVersion {
            relation_id: 9,
            valid_from: ChangeKey::default(),
            schema: "public".into(),
            name: "versioned".into(),
            replica_identity: b'd',
            columns,
            primary_key: vec!["id".into()],
        }));
    }
    let row = |id: u64, tag: &str| {
        let mut cells = vec![
            t(&id.to_string()),
            t(&format!("{tag}{n}")),
            t(&(id * 1000 + n).to_string()),
        ];
        if width == 4 {
            // Null in every other row: a null field of a present image stays null.
            cells.push(if id.is_multiple_of(2) {
                IncomingCell::Null
            } else {
                t(&format!("w{id}"))
            });
        }
        cells
    };
    ops.push(LogOp::Change(IncomingChange {
        relation_id: 9,
        op: Op::Insert,
        old: None,
        new: Some(row(n, "new")),
    }));
    if n >= 2 {
        ops.push(LogOp::Change(IncomingChange {
            relation_id: 9,
            op: Op::Update,
            old: None,
            new: Some(row(n - 1, "upd")),
        }));
    }
    if n >= 3 {
        let mut key = vec![t(&(n - 2).to_string())];
        key.resize(width, IncomingCell::Null);
        ops.push(LogOp::Change(IncomingChange {
            relation_id: 9,
            op: Op::Delete,
            old: Some(pgtrail_store::OldImage::Key(key)),
            new: None,
        }));
    }
    ops.push(LogOp::Commit {
        end_lsn: Lsn(100 * n + 8),
    });
    ops
}

/// `after.x` in a query decodes only that field (the scan takes the projection in), and gives
/// exactly what reading the whole image and taking its field gives: across schema versions (a
/// retyped column as text, a column missing from the older version as null), segments and
/// the log tail, absent images (null) and null fields.
#[tokio::test(flavor = "multi_thread")]
async fn row_image_fields_read_alone_equal_the_fields_of_whole_images() {
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("a");
    let mut log = ChangeLog::open(&archive).unwrap();
    let compactor = Compactor::new(log.shared(), &archive, CompactOptions::default());
    for n in 1..=8 {
        log.apply(versioned_txn(n)).unwrap();
        log.complete_all().unwrap();
        if n == 3 || n == 6 {
            compactor.run().unwrap();
        }
    }
    let fields = "SELECT lsn, seq, after.id, after.v, after.n, after.w, before.id, before.v, before.w FROM public.versioned ORDER BY lsn, seq";
    let plan = query(&archive, &log, &format!("EXPLAIN {fields}")).await;
    let plan = column_text(&plan, 1).join("\n");
    assert!(
        plan.contains("HistoryScanExec: segments=3, columns=[lsn, seq, after.id, after.v, after.n, after.w, before.id, before.v, before.w]"),
        "the scan decodes the fields alone:\n{plan}"
    );
    let narrow = query(&archive, &log, fields).await;
    let whole = query(
        &archive,
        &log,
        "SELECT lsn, seq, after, before FROM public.versioned ORDER BY lsn, seq",
    )
    .await;
    let field_of = |image: usize, name: &str| -> Vec<String> {
        whole
            .iter()
            .flat_map(|b| {
                let image = b.column(image).as_struct();
                let values = datafusion::arrow::compute::cast(
                    image.column_by_name(name).unwrap(),
                    &datafusion::arrow::datatypes::DataType::Utf8,
                )
                .unwrap();
                let values = values.as_string::<i32>();
                (0..image.len())
                    .map(|r| {
                        if image.is_null(r) || values.is_null(r) {
                            "NULL".to_string()
                        } else {
                            values.value(r).to_string()
                        }
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    assert_eq!(column_text(&narrow, 0), column_text(&whole, 0));
    assert_eq!(column_text(&narrow, 1), column_text(&whole, 1));
    for (i, (image, name)) in [
        (2, "id"),
        (2, "v"),
        (2, "n"),
        (2, "w"),
        (3, "id"),
        (3, "v"),
        (3, "w"),
    ]
    .into_iter()
    .enumerate()
    {
        assert_eq!(
            column_text(&narrow, i + 2),
            field_of(image, name),
            "{} {name}",
            if image == 2 { "after" } else { "before" }
        );
    }
    // What the comparison covers: both versions, absent images, null fields, the retyped column.
    let after_n = column_text(&narrow, 4);
    assert!(
        after_n.contains(&"1001".to_string()) && after_n.contains(&"8008".to_string()),
        "{after_n:?}"
    );
    let after_w = column_text(&narrow, 5);
    assert!(
        after_w.contains(&"w5".to_string()) && after_w.iter().filter(|w| *w == "NULL").count() > 4,
        "{after_w:?}"
    );
    assert!(
        column_text(&narrow, 6).contains(&"NULL".to_string())
            && column_text(&narrow, 6).contains(&"6".to_string())
    );
    assert_eq!(column_text(&narrow, 0).len(), 8 + 7 + 6);
}

/// An archive of transactions 1-30 (see [`txn`]): 1-20 compacted into one segment of 57
/// changes in row groups of 4 (15 row groups), 21-30 in the log tail. The archive is a
/// directory of its own inside the temporary one (whose mode an archive refuses).
fn archive_of_small_row_groups() -> (tempfile::TempDir, std::path::PathBuf, ChangeLog) {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("a");
    let mut log = ChangeLog::open(&dir).unwrap();
    let options = CompactOptions {
        segment: pgtrail_store::segment::SegmentOptions {
            row_group_rows: 4,
            batch_rows: 4,
            ..Default::default()
        },
        ..CompactOptions::default()
    };
    let compactor = Compactor::new(log.shared(), &dir, options);
    for n in 1..=30 {
        log.apply(txn(n)).unwrap();
        // The index stored, as the capture does when idle: compaction may cut past this.
        log.complete_all().unwrap();
        if n == 20 {
            compactor.run().unwrap();
        }
    }
    (temp, dir, log)
}

/// Newest first by windows, as the server pages `/api/changes`: the row groups of the newest
/// segment cut the windows finer than its whole (a table's newest segment may hold most of
/// its history), and the windows' changes, each window newest first, are every change of the
/// archive exactly once, in order, also below a cursor.
#[tokio::test(flavor = "multi_thread")]
async fn newest_first_windows_cut_the_newest_segment_at_its_row_groups_and_cover_every_change() {
    use pgtrail_query::feed;
    let (_temp, dir, log) = archive_of_small_row_groups();
    let archive = ArchiveSnapshot::from_reader(&dir, &log.reader().unwrap()).unwrap();
    let segments: Vec<_> = archive
        .tables
        .values()
        .flat_map(|t| t.segments.clone())
        .collect();
    assert_eq!(segments.len(), 1);
    let all: Vec<ChangeKey> = keys(
        &query(
            &dir,
            &log,
            "SELECT lsn, seq FROM changes ORDER BY lsn DESC, seq DESC",
        )
        .await,
    );
    assert_eq!(all.len(), 57 + 30);
    let ctx = session(Arc::new(archive.clone())).unwrap();
    for before in [None, Some(all[40]), Some(all[70])] {
        let windows = feed::newest_first_windows(&archive, before);
        // One segment alone gives two windows (the segment and up, and below it).
        if before.is_none() {
            assert!(windows.len() >= 4, "{windows:?}");
        }
        assert!(
            windows
                .iter()
                .flatten()
                .all(|b| before.is_none_or(|k| *b < k)),
            "{windows:?}"
        );
        let mut read: Vec<ChangeKey> = Vec::new();
        let mut upper = before;
        for lower in windows {
            let conditions: Vec<_> = upper
                .map(feed::keys_before)
                .into_iter()
                .chain(lower.map(feed::keys_from))
                .collect();
            let mut frame = ctx.table("changes").await.unwrap();
            if let Some(all) = conditions
                .into_iter()
                .reduce(datafusion::prelude::Expr::and)
            {
                frame = frame.filter(all).unwrap();
            }
            let batches = frame
                .sort(vec![
                    datafusion::prelude::col("lsn").sort(false, false),
                    datafusion::prelude::col("seq").sort(false, false),
                ])
                .unwrap()
                .select_columns(&["lsn", "seq"])
                .unwrap()
                .collect()
                .await
                .unwrap();
            read.extend(keys(&batches));
            upper = lower;
        }
        let expected: Vec<ChangeKey> = all
            .iter()
            .copied()
            .filter(|k| before.is_none_or(|b| *k < b))
            .collect();
        assert_eq!(read, expected, "below {before:?}");
    }
}

fn keys(batches: &[RecordBatch]) -> Vec<ChangeKey> {
    batches
        .iter()
        .flat_map(|b| (0..b.num_rows()).map(|i| pgtrail_query::feed::key_at(b, i).unwrap()))
        .collect()
}

/// A bound on `lsn` or `committed_at` that cuts row groups keeps exactly the changes inside it,
/// every column of the `changes` view alike: its JSON columns come from rows selected inside
/// the row groups by those two columns, so a row numbered wrongly would show here.
#[tokio::test(flavor = "multi_thread")]
async fn bounds_that_cut_row_groups_keep_exactly_the_changes_inside_them() {
    use datafusion::arrow::util::display::array_value_to_string;
    let (_temp, dir, log) = archive_of_small_row_groups();
    let columns = "lsn, seq, operation, primary_key, before, after, context, committed_at";
    type Row = ((u64, u32, i64), String);
    let rows = |batches: &[RecordBatch]| -> Vec<Row> {
        batches
            .iter()
            .flat_map(|b| {
                (0..b.num_rows()).map(move |i| {
                    let text: Vec<String> = b
                        .columns()
                        .iter()
                        .map(|c| array_value_to_string(c, i).unwrap())
                        .collect();
                    let time = b
                        .column(7)
                        .as_any()
                        .downcast_ref::<datafusion::arrow::array::TimestampMicrosecondArray>()
                        .unwrap()
                        .value(i);
                    let place = (text[0].parse().unwrap(), text[1].parse().unwrap(), time);
                    (place, text.join(" | "))
                })
            })
            .collect()
    };
    let all = rows(
        &query(
            &dir,
            &log,
            &format!("SELECT {columns} FROM changes ORDER BY lsn, seq"),
        )
        .await,
    );
    assert_eq!(all.len(), 57 + 30);
    // Cuts inside row groups, at both ends, across the segment and the tail, and empty; then
    // ranges of keys (a page starting and ending inside a transaction, as the feeds ask), and
    // the same conditions where they bound no `seq` (the LSN range reaches past their LSN).
    type Inside = Box<dyn Fn(u64, u32, i64) -> bool>;
    let cases: [(&str, Inside); 12] = [
        (
            "lsn BETWEEN 550 AND 1250",
            Box::new(|l, _, _| (550..=1250).contains(&l)),
        ),
        ("lsn = 700", Box::new(|l, _, _| l == 700)),
        ("lsn > 1900", Box::new(|l, _, _| l > 1900)),
        ("lsn < 300", Box::new(|l, _, _| l < 300)),
        ("lsn > 650 AND lsn < 660", Box::new(|_, _, _| false)),
        (
            "committed_at >= to_timestamp_micros(4000000) AND committed_at < to_timestamp_micros(9000000)",
            Box::new(|_, _, t| (4_000_000..9_000_000).contains(&t)),
        ),
        (
            "lsn >= 700 AND (lsn > 700 OR seq >= 1) AND lsn <= 1200 AND (lsn < 1200 OR seq <= 1)",
            Box::new(|l, s, _| (700, 1) <= (l, s) && (l, s) <= (1200, 1)),
        ),
        (
            "lsn >= 2000 AND (lsn > 2000 OR seq > 0) AND lsn <= 2000 AND (lsn < 2000 OR seq < 2)",
            Box::new(|l, s, _| l == 2000 && s == 1),
        ),
        (
            "lsn >= 500 AND (lsn > 700 OR seq >= 1) AND lsn <= 800",
            Box::new(|l, s, _| (500..=800).contains(&l) && (l > 700 || s >= 1)),
        ),
        (
            "(lsn < 700 OR seq <= 0) AND lsn <= 900",
            Box::new(|l, s, _| l <= 900 && (l < 700 || s == 0)),
        ),
        (
            "lsn >= 800 AND (lsn > 700 OR seq >= 1)",
            Box::new(|l, _, _| l >= 800),
        ),
        (
            "lsn <= 800 AND (lsn < 900 OR seq <= 0)",
            Box::new(|l, _, _| l <= 800),
        ),
    ];
    for (filter, inside) in cases {
        let sql = format!("SELECT {columns} FROM changes WHERE {filter} ORDER BY lsn, seq");
        let got: Vec<String> = rows(&query(&dir, &log, &sql).await)
            .into_iter()
            .map(|r| r.1)
            .collect();
        let expected: Vec<String> = all
            .iter()
            .filter(|((l, s, t), _)| inside(*l, *s, *t))
            .map(|r| r.1.clone())
            .collect();
        assert!(!expected.is_empty() || filter.contains("660"), "{filter}");
        assert_eq!(got, expected, "{filter}");
    }
}

/// `row_history` of every key reads the key-ordered copy the compactor wrote beside each
/// segment, and answers the same without it (no copy yet, a damaged copy: the segment is read),
/// keys that moved included. A copy that the index names but whose rows are not the index's
/// changes the answer, so the intact case did read the copy.
#[tokio::test(flavor = "multi_thread")]
async fn row_history_reads_the_key_ordered_copy_and_answers_the_same_without_it() {
    use pgtrail_store::OldImage;
    use pgtrail_store::segment::key_copy::{key_copy_name, write_key_copy};
    use pgtrail_store::segment::key_index;
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("a");
    let mut log = ChangeLog::open(&archive).unwrap();
    let compactor = Compactor::new(log.shared(), &archive, CompactOptions::default());
    let change = |op, old: Option<&str>, new: Option<(&str, &str)>| {
        LogOp::Change(IncomingChange {
            relation_id: 7,
            op,
            old: old.map(|k| OldImage::Key(vec![t(k), IncomingCell::Null])),
            new: new.map(|(id, v)| vec![t(id), t(v)]),
        })
    };
    for n in 1..=60u64 {
        let mut ops = vec![LogOp::Begin {
            final_lsn: Lsn(100 * n),
            xid: n as u32,
            committed_at_us: 1_000_000 * n as i64,
        }];
        if n == 1 {
            ops.push(LogOp::Relation(rel()));
        }
        let id = |k: u64| (k % 12).to_string();
        // Rows 0-11 are inserted, updated, deleted and inserted again; every seventh
        // transaction moves a row to a key of its own (and the next one moves it back).
        let v = format!("v{n}");
        ops.push(match n {
            _ if n <= 12 => change(Op::Insert, None, Some((&id(n), &v))),
            _ if n % 7 == 0 => change(
                Op::Update,
                Some(&id(n)),
                Some((&format!("{}", 100 + n), &v)),
            ),
            _ if n % 7 == 1 => change(
                Op::Update,
                Some(&format!("{}", 100 + n - 1)),
                Some((&id(n - 1), &v)),
            ),
            _ if n % 5 == 0 => change(Op::Delete, Some(&id(n)), None),
            _ => change(Op::Update, None, Some((&id(n), &v))),
        });
        if n % 5 == 0 && n > 12 {
            ops.push(change(Op::Insert, None, Some((&id(n), "again"))));
        }
        ops.push(LogOp::Commit {
            end_lsn: Lsn(100 * n + 8),
        });
        log.apply(ops).unwrap();
        log.complete_all().unwrap();
        if n % 20 == 0 {
            compactor.run().unwrap();
        }
    }
    let keys: Vec<String> = (0..12)
        .map(|k| k.to_string())
        .chain((2..=8).map(|i| (100 + 7 * i).to_string()))
        .collect();
    let histories = |log: &ChangeLog| {
        let (archive, keys) = (archive.clone(), keys.clone());
        let snapshot = ArchiveSnapshot::from_reader(&archive, &log.reader().unwrap()).unwrap();
        async move {
            let ctx = session(Arc::new(snapshot)).unwrap();
            let mut out = Vec::new();
            for key in &keys {
                let sql = format!(
                    "SELECT lsn, seq, op, before.id, before.v, after.id, after.v FROM row_history('public.\"Odd Name\"', '{key}') ORDER BY lsn, seq"
                );
                let batches = ctx.sql(&sql).await.unwrap().collect().await.unwrap();
                let rows: Vec<String> =
                    (0..7).map(|c| column_text(&batches, c).join(",")).collect();
                out.push((key.clone(), rows));
            }
            out
        }
    };
    let segments = archive.join("segments");
    let manifest = log.reader().unwrap().manifest().unwrap();
    let listed: Vec<_> = manifest
        .segments
        .iter()
        .filter(|s| s.table_name().contains("Odd Name"))
        .collect();
    assert_eq!(listed.len(), 3);
    for s in &listed {
        let copy = key_index::check(&segments.join(&s.file_name), &s.sha256).unwrap();
        assert!(copy.is_some(), "{} has its key-ordered copy", s.file_name);
    }
    let with_copies = histories(&log).await;
    // Every key has a history; a moved key's holds the update that moved it, under both keys.
    assert!(with_copies.iter().all(|(_, rows)| !rows[0].is_empty()));
    let moved = &with_copies.iter().find(|(k, _)| k == "114").unwrap().1;
    assert_eq!(moved[2], "update,update", "moved to 107 and back");

    // Damaged copies: each is refused (its SHA-256) and the segment read.
    let copies: Vec<_> = listed
        .iter()
        .map(|s| segments.join(key_copy_name(&s.file_name)))
        .collect();
    let saved: Vec<Vec<u8>> = copies.iter().map(|c| std::fs::read(c).unwrap()).collect();
    for c in &copies {
        let mut bytes = std::fs::read(c).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x40;
        std::fs::write(c, bytes).unwrap();
    }
    assert_eq!(histories(&log).await, with_copies, "damaged copies");
    // No copies (the index as a segment writer leaves it): the segment is read.
    for c in &copies {
        std::fs::remove_file(c).unwrap();
    }
    assert_eq!(histories(&log).await, with_copies, "no copies");

    // A copy whose rows are not in the index's order, named by the index: the answer
    // changes, so the answers above came from the copy when there was one.
    let s = listed[0];
    let path = segments.join(&s.file_name);
    let entries = key_index::entries(&path, &s.sha256).unwrap();
    let reversed: Vec<(u32, u32)> = entries.iter().rev().copied().collect();
    let wrong = write_key_copy(&segments, &s.file_name, &s.sha256, &reversed, 3, usize::MAX)
        .unwrap()
        .sha256;
    key_index::write_index(&segments, &s.file_name, &s.sha256, &entries, Some(&wrong)).unwrap();
    assert_ne!(histories(&log).await, with_copies, "a copy out of order");
    for (c, bytes) in copies.iter().zip(&saved) {
        std::fs::write(c, bytes).unwrap();
    }
    let right = pgtrail_store::segment::sha256_file(&copies[0]).unwrap();
    key_index::write_index(&segments, &s.file_name, &s.sha256, &entries, Some(&right)).unwrap();
    assert_eq!(histories(&log).await, with_copies, "copies restored");
}

/// Relation `oid` named `public.name`, columns `id` (key) and `v`.
fn rel_named(oid: u32, name: &str) -> RelationVersion {
    RelationVersion {
        relation_id: oid,
        name: name.into(),
        ..rel()
    }
}

/// A transaction committed at `lsn` (at `lsn` seconds): `ops` between its begin and commit;
/// `xid` 0 makes it a snapshot transaction, as the capture writes a table's read.
fn committed(lsn: u64, xid: u32, ops: Vec<LogOp>) -> Vec<LogOp> {
    let mut all = vec![LogOp::Begin {
        final_lsn: Lsn(lsn),
        xid,
        committed_at_us: 1_000_000 * lsn as i64,
    }];
    all.extend(ops);
    all.push(LogOp::Commit {
        end_lsn: Lsn(lsn + 8),
    });
    all
}

/// Row 1 of relation `oid` written with `v` (a snapshot row, an insert or an update).
fn row_one(oid: u32, op: Op, v: &str) -> LogOp {
    LogOp::Change(IncomingChange {
        relation_id: oid,
        op,
        old: None,
        new: Some(vec![t("1"), t(v)]),
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_moment_is_refused_when_a_later_read_than_the_first_after_it_made_it_unknown() {
    // t (relation 7) is read at 100 and written at 200; DDL rewrites it after 220, it is
    // renamed away at 260, and another relation (8) is created under its name, read at 300
    // (a new table: no span) and dropped. 7 is renamed back, and its read at 500 says its
    // rows were unknown from 220. Both relations' latest name is t, so one history holds
    // both; at 250 the first read after the moment is 8's, which says nothing of 7: the
    // later read's span must still refuse the moment, not answer 7's rows from before the
    // rewrite.
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("a");
    let mut log = ChangeLog::open(&archive).unwrap();
    let read = |oid: u32, name: &str, v: &str, unknown_from: Option<u64>| {
        vec![
            LogOp::Relation(rel_named(oid, name)),
            LogOp::SnapshotOf(TableScope {
                unknown_from: unknown_from.map(|l| (Lsn(l), 1_000_000 * l as i64)),
                ..TableScope::whole(oid)
            }),
            row_one(oid, Op::Snapshot, v),
        ]
    };
    let dropped = TableScope {
        unknown_from: Some((Lsn(350), 350_000_000)),
        dropped: true,
        ..TableScope::whole(8)
    };
    for txn in [
        committed(100, 0, read(7, "t", "read", None)),
        committed(200, 1, vec![row_one(7, Op::Update, "written")]),
        committed(
            260,
            2,
            vec![
                LogOp::Relation(rel_named(7, "t_old")),
                row_one(7, Op::Update, "renamed away"),
            ],
        ),
        committed(300, 0, read(8, "t", "other", None)),
        committed(400, 0, vec![LogOp::SnapshotOf(dropped)]),
        committed(
            450,
            3,
            vec![
                LogOp::Relation(rel_named(7, "t")),
                row_one(7, Op::Update, "renamed back"),
            ],
        ),
        committed(500, 0, read(7, "t", "read again", Some(220))),
    ] {
        log.apply(txn).unwrap();
    }
    let snapshot =
        Arc::new(ArchiveSnapshot::from_reader(&archive, &log.reader().unwrap()).unwrap());
    let ctx = session(snapshot).unwrap();
    let as_of = |lsn: u64| {
        let ctx = ctx.clone();
        async move {
            let sql = format!("SELECT v FROM as_of_lsn('public.t', '{}')", Lsn(lsn));
            let frame = ctx.sql(&sql).await?;
            frame.collect().await
        }
    };
    assert_eq!(column_text(&as_of(210).await.unwrap(), 0), ["written"]);
    let err = as_of(250).await.unwrap_err();
    assert!(pgtrail_query::is_unknown_moment(&err), "at 250: {err}");
    assert!(
        err.to_string().contains("0/DC"),
        "names the span's start: {err}"
    );
    assert_eq!(column_text(&as_of(550).await.unwrap(), 0), ["read again"]);
}

/// One transaction of `rows` inserts into relation 7 from id `first` (commit LSN 1000·n, at n
/// seconds), `v` of each row from `note`.
fn bulk_txn(n: u64, first: u64, rows: u64, note: impl Fn(u64) -> String) -> Vec<LogOp> {
    let mut ops = vec![LogOp::Begin {
        final_lsn: Lsn(1000 * n),
        xid: n as u32,
        committed_at_us: 1_000_000 * n as i64,
    }];
    if n == 1 {
        ops.push(LogOp::Relation(rel()));
    }
    ops.extend((first..first + rows).map(|id| {
        LogOp::Change(IncomingChange {
            relation_id: 7,
            op: Op::Insert,
            old: None,
            new: Some(vec![t(&id.to_string()), t(&note(id))]),
        })
    }));
    ops.push(LogOp::Commit {
        end_lsn: Lsn(1000 * n + 8),
    });
    ops
}

/// The newest (and oldest) few matches of a filter read a row group a span of pages at a
/// time, each span checked against the sort's filter: one row group of 120,000 changes (six
/// spans of its `lsn` pages) whose newest 25,000 rows hold no match, so the newest span gives
/// nothing and the answer comes from the spans before it. The answers are the matches'
/// head, newest and oldest first, and the spans ruled out are counted.
#[tokio::test(flavor = "multi_thread")]
async fn the_newest_matches_read_a_row_group_a_span_of_pages_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("a");
    let mut log = ChangeLog::open(&archive).unwrap();
    let (txns, per_txn) = (12u64, 10_000u64);
    let last_match = per_txn * txns - 25_000;
    let matches = |id: u64| id % 1000 == 7 && id <= last_match;
    let note = |id: u64| {
        if matches(id) {
            format!("refund {id}")
        } else {
            format!("note {id}")
        }
    };
    for n in 1..=txns {
        log.apply(bulk_txn(n, 1 + (n - 1) * per_txn, per_txn, note))
            .unwrap();
    }
    log.complete_all().unwrap();
    Compactor::new(log.shared(), &archive, CompactOptions::default())
        .run()
        .unwrap();
    let snapshot = ArchiveSnapshot::from_reader(&archive, &log.reader().unwrap()).unwrap();
    let segments = &snapshot.table("public.\"Odd Name\"").unwrap().segments;
    assert_eq!(segments.len(), 1, "one segment: {segments:?}");
    let path = snapshot.segment_path(&segments[0]);
    let groups = pgtrail_store::segment::row_group_ranges(&path).unwrap();
    assert_eq!(groups.len(), 1, "one row group: {groups:?}");
    let spans = pgtrail_store::segment::row_group_spans(&path, 0).unwrap();
    assert!(spans.len() >= 5, "the row group's lsn pages: {spans:?}");
    // The spans tile the row group, and each one's ranges hold its rows' values.
    let mut next = 0;
    for span in &spans {
        assert_eq!(span.rows.start, next, "{spans:?}");
        next = span.rows.end;
        let columns = [vec!["lsn".to_string()], vec!["committed_at".to_string()]];
        let reader = pgtrail_store::segment::SegmentReader::open_row_group_rows(
            &path,
            None,
            4096,
            0,
            span.rows.clone(),
            Some(&columns),
        )
        .unwrap();
        let (lsn, time) = (span.range.lsn.unwrap(), span.range.committed_at.unwrap());
        let mut rows = 0;
        for batch in reader {
            let batch = batch.unwrap();
            rows += batch.num_rows();
            let lsns = batch.column(0).as_primitive::<UInt64Type>();
            let times = batch.column(1).as_primitive::<TimestampMicrosecondType>();
            for r in 0..batch.num_rows() {
                assert!((lsn.0..=lsn.1).contains(&lsns.value(r)), "{span:?}");
                assert!((time.0..=time.1).contains(&times.value(r)), "{span:?}");
            }
        }
        assert_eq!(rows, span.rows.len(), "{span:?}");
    }
    assert_eq!(next, groups[0].rows);

    let every: Vec<i64> = (1..=per_txn * txns)
        .filter(|&id| matches(id))
        .map(|id| id as i64)
        .collect();
    let newest = "SELECT after.id FROM public.\"Odd Name\" WHERE after.v LIKE '%refund%' \
                  ORDER BY committed_at DESC, lsn DESC, seq DESC LIMIT 3";
    let ids = |batches: &[RecordBatch]| -> Vec<i64> {
        column_text(batches, 0)
            .iter()
            .map(|v| v.parse().unwrap())
            .collect()
    };
    let found = ids(&query(&archive, &log, newest).await);
    let expected: Vec<i64> = every.iter().rev().take(3).copied().collect();
    assert_eq!(found, expected, "{newest}");
    let oldest = "SELECT after.id FROM public.\"Odd Name\" WHERE after.v LIKE '%refund%' \
                  ORDER BY lsn, seq LIMIT 4";
    let found = ids(&query(&archive, &log, oldest).await);
    assert_eq!(found, every[..4].to_vec(), "{oldest}");

    // The spans the scan read and ruled out, from the plan's metrics: the newest span (no
    // match) and the one with the answer are read; the four older ones are ruled out once
    // the sort holds its three rows (all of them unless the sort fell behind the reading).
    let plan = column_text(
        &query(&archive, &log, &format!("EXPLAIN ANALYZE {newest}")).await,
        1,
    );
    let metric = |name: &str| -> usize {
        plan.iter()
            .filter_map(|line| line.split(&format!("{name}=")).nth(1))
            .map(|rest| {
                rest.chars()
                    .take_while(char::is_ascii_digit)
                    .collect::<String>()
                    .parse::<usize>()
                    .unwrap()
            })
            .sum()
    };
    let (read, skipped) = (metric("spans_read"), metric("spans_skipped"));
    assert_eq!(
        read + skipped,
        spans.len(),
        "every span read or ruled out: {plan:?}"
    );
    assert!(
        read >= 2 && skipped >= 1,
        "read {read}, ruled out {skipped}: {plan:?}"
    );
}

/// A table's segments are dealt out to the session's target partitions: the scan has one
/// partition per target (at most one per segment) plus the log tail's, and whatever the
/// number, every change is read exactly once and the newest come first under a limit.
#[tokio::test(flavor = "multi_thread")]
async fn segments_dealt_out_to_any_number_of_partitions_are_each_read_once() {
    use datafusion::physical_plan::ExecutionPlan;
    fn scan_partitions(plan: &Arc<dyn ExecutionPlan>) -> Vec<usize> {
        let mut found: Vec<usize> = plan
            .children()
            .into_iter()
            .flat_map(scan_partitions)
            .collect();
        if plan.name() == "HistoryScanExec" {
            found.push(plan.properties().output_partitioning().partition_count());
        }
        found
    }
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("a");
    let log = build(&dir, 13, 2);
    let archive = ArchiveSnapshot::from_reader(&dir, &log.reader().unwrap()).unwrap();
    let segments = archive.table("public.\"Odd Name\"").unwrap().segments.len();
    // Several segments (compaction merges small ones), so that with one or two partitions a
    // partition reads more than one.
    assert!(segments >= 3, "{segments} segments");
    let all = "SELECT lsn, seq FROM public.\"Odd Name\" ORDER BY lsn, seq";
    let newest = "SELECT lsn, seq FROM public.\"Odd Name\" ORDER BY lsn DESC, seq DESC LIMIT 5";
    let count = "SELECT count(*) FROM public.\"Odd Name\"";
    let expected = keys(&query(&dir, &log, all).await);
    assert!(expected.windows(2).all(|w| w[0] < w[1]), "{expected:?}");
    for readers in [1, 2, 3, 16] {
        let ctx = session(Arc::new(archive.clone())).unwrap();
        ctx.sql(&format!(
            "SET datafusion.execution.target_partitions = {readers}"
        ))
        .await
        .unwrap();
        let run = |sql: &'static str| {
            let ctx = ctx.clone();
            async move { ctx.sql(sql).await.unwrap().collect().await.unwrap() }
        };
        let plan = ctx
            .sql(count)
            .await
            .unwrap()
            .create_physical_plan()
            .await
            .unwrap();
        assert_eq!(
            scan_partitions(&plan),
            vec![readers.min(segments) + 1],
            "{readers} target partitions"
        );
        let mut found = keys(&run(all).await);
        found.sort();
        assert_eq!(
            found, expected,
            "{readers} target partitions: every change once"
        );
        let newest_found = keys(&run(newest).await);
        let newest_expected: Vec<_> = expected.iter().rev().take(5).copied().collect();
        assert_eq!(newest_found, newest_expected, "{readers} target partitions");
        assert_eq!(
            column_i64(&run(count).await, 0),
            vec![expected.len() as i64],
            "{readers} target partitions"
        );
    }
}
