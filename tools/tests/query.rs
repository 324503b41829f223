//! Point-in-time reconstruction against PostgreSQL itself: during a workload (with capture
//! compacting in the background, so moments fall in segments, across the segment/tail
//! boundary and in the tail), the test records what PostgreSQL returns for the table at
//! several moments; then, with PostgreSQL stopped, the archive rebuilds the table at each
//! moment by time and by LSN, and PostgreSQL (started again) confirms every value.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use pgtrail_capture::cluster::{Cluster, ClusterOptions};
use pgtrail_query::{ArchiveSnapshot, Moment, state_at};
use pgtrail_store::{Cell, Lsn};

use crate::{pgtrail, pgtrail_sql_parquet, terminate, wait_slot_active};

/// Every column type of the capture round-trip table (and a few more).
const TABLE: &str = "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TABLE acct (id int PRIMARY KEY, owner text, balance numeric(12,2), ratio float8,
  tags text[], meta jsonb, opened date, seen timestamptz, span interval, active bool, ref uuid, blob bytea, n numeric,
  i2 int2, i8 int8, f4 float4, vc varchar(10), tm time, ts timestamp, j json, arr int[], e mood);
CREATE TABLE plain (id int PRIMARY KEY, note text, amount numeric(12,2), at timestamptz, arr int[], span interval);
CREATE TABLE pair (region text, n int, v text, PRIMARY KEY (region, n));";

fn round_sql(round: u32) -> String {
    let a = round * 7;
    format!(
        "INSERT INTO acct SELECT g, 'owner ' || g, g * 10.25, g / 3.0, ARRAY['t' || g, NULL], jsonb_build_object('r', {round}, 'g', g),
           DATE '2026-01-01' + g, TIMESTAMPTZ '2026-11-20 12:00:00+00' + g * INTERVAL '1 hour', g * INTERVAL '1 day 2 min',
           g % 2 = 0, md5(g::text)::uuid, decode(md5(g::text), 'hex'), CASE WHEN g % 5 = 0 THEN 'NaN' ELSE g::numeric / 7 END,
           (g % 32000)::int2, g::int8 * 1000000007, g / 7.0, 'vc' || g, CASE WHEN g % 6 = 0 THEN '24:00:00' ELSE TIME '00:00:01' * g END,
           CASE WHEN g % 8 = 0 THEN 'infinity' ELSE TIMESTAMP '0044-03-15 BC' + g * INTERVAL '1 day' END, json_build_object('g', g),
           CASE WHEN g % 3 = 0 THEN ARRAY[[g, NULL], [1, 2]] ELSE ARRAY[g, NULL] END, (ARRAY['sad','ok','happy'])[g % 3 + 1]::mood
         FROM generate_series({a}, {b}) g ON CONFLICT (id) DO NOTHING;
       UPDATE acct SET balance = balance + {round}, owner = owner || '*', ratio = 'Infinity' WHERE id % 4 = {m};
       DELETE FROM acct WHERE id % 9 = {m} AND id < {a};
       {truncate}
       INSERT INTO plain SELECT g, 'p' || g, g * 1.5, TIMESTAMPTZ '2026-11-20 12:00:00+00' + g * INTERVAL '1 min', ARRAY[g, NULL, g + 1],
           g * INTERVAL '1 day 3 sec' FROM generate_series({a}, {b}) g ON CONFLICT (id) DO NOTHING;
       UPDATE plain SET note = note || '+', amount = amount + 1 WHERE id % 3 = {m3};
       UPDATE plain SET note = note WHERE id % 5 = 0;
       UPDATE plain SET id = id + 100000 WHERE id = {a};
       DELETE FROM plain WHERE id % 7 = {m} AND id < {a};
       {truncate_plain}
       INSERT INTO pair SELECT 'r' || (g % 3), g, 'v' || g FROM generate_series({a}, {b}) g ON CONFLICT DO NOTHING;
       UPDATE pair SET v = v || '+' WHERE n % 3 = {m3};
       UPDATE pair SET region = 'moved', n = n + 100000 WHERE n = {a} + 1;
       DELETE FROM pair WHERE n % 5 = {m} AND n < {a};",
        b = a + 9,
        m = round % 4,
        m3 = round % 3,
        truncate = if round == 5 { "TRUNCATE acct;" } else { "" },
        truncate_plain = if round == 6 { "TRUNCATE plain;" } else { "" }
    )
}

fn cell_sql(cell: &Cell, ty: &str) -> String {
    match cell {
        Cell::Null => format!("NULL::{ty}"),
        Cell::Text(t) => format!("$v${t}$v$::{ty}"),
        Cell::Unknown => panic!("an unknown value in a fully captured table"),
    }
}

#[test]
fn as_of_reconstructs_what_postgres_returned_at_each_moment_offline() {
    let cluster = Cluster::start(ClusterOptions::default()).unwrap();
    cluster.psql("postgres", "CREATE DATABASE pit").unwrap();
    cluster.psql("pit", TABLE).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("archive");
    let mut child = pgtrail()
        .args([
            "capture",
            "--slot",
            "pit",
            "--publication",
            "pit",
            "--tables",
            "public.acct,public.plain,public.pair",
        ])
        .args(["--compact-after-changes", "25", "--progress-secs", "1"])
        // Keyframes at most compactions: every as_of below after the first starts from one.
        .args(["--keyframe-changes", "20", "--keyframe-rows-factor", "1"])
        .env("PGTRAIL_SOURCE", cluster.url("pit"))
        .env("PGTRAIL_ARCHIVE", &archive)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_slot_active(&cluster, "pit", "pit", &mut child);

    // (time, lsn, snapshot table) after each round.
    let mut moments: Vec<(String, String, String)> = Vec::new();
    for round in 0..9 {
        cluster.psql("pit", &round_sql(round)).unwrap();
        let at = cluster
            .psql("pit", "SELECT clock_timestamp()::text")
            .unwrap();
        let lsn = cluster
            .psql("pit", "SELECT pg_current_wal_lsn()::text")
            .unwrap();
        let snap = format!("snap_{round}");
        cluster.psql("pit", &format!("CREATE TABLE {snap} AS SELECT * FROM acct; CREATE TABLE p{snap} AS SELECT * FROM plain")).unwrap();
        moments.push((at, lsn, snap));
        // Give the background compactor a chance between rounds.
        std::thread::sleep(Duration::from_millis(400));
    }
    let end = cluster
        .psql("pit", "SELECT pg_current_wal_insert_lsn()::text")
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while cluster
        .psql("pit", &format!("SELECT confirmed_flush_lsn >= '{end}' FROM pg_replication_slots WHERE slot_name = 'pit'"))
        .unwrap()
        != "t"
    {
        assert!(Instant::now() < deadline, "capture did not catch up");
        std::thread::sleep(Duration::from_millis(100));
    }
    terminate(&mut child);
    let columns_json = cluster
        .psql(
            "pit",
            "SELECT json_agg(json_build_array(attname, format_type(atttypid, atttypmod)) ORDER BY attnum) \
             FROM pg_attribute WHERE attrelid = 'acct'::regclass AND attnum > 0 AND NOT attisdropped",
        )
        .unwrap();
    let columns: Vec<(String, String)> = serde_json::from_str(&columns_json).unwrap();

    // PostgreSQL is stopped: everything below reads the archive alone.
    cluster.stop("fast").unwrap();
    let snapshot = ArchiveSnapshot::open(&archive).unwrap();
    let table = snapshot.table("public.acct").unwrap();
    assert!(
        !table.segments.is_empty(),
        "the background compactor wrote segments"
    );
    let mut rebuilt: BTreeMap<String, Vec<Vec<Cell>>> = BTreeMap::new();
    for (at, lsn, snap) in &moments {
        let by_lsn = state_at(&snapshot, table, Moment::Lsn(lsn.parse::<Lsn>().unwrap())).unwrap();
        let rows: Vec<Vec<Cell>> = by_lsn
            .rows
            .values()
            .flat_map(|l| l.iter().map(|(_, r)| r.clone()))
            .collect();
        let at_us = parse_pg_timestamp(at);
        let by_time = state_at(&snapshot, table, Moment::Time(at_us)).unwrap();
        let rows_by_time: Vec<Vec<Cell>> = by_time
            .rows
            .values()
            .flat_map(|l| l.iter().map(|(_, r)| r.clone()))
            .collect();
        assert_eq!(rows, rows_by_time, "{snap}: as_of by time and by LSN agree");
        rebuilt.insert(snap.clone(), rows);
    }
    assert!(
        rebuilt.values().filter(|r| r.len() >= 20).count() >= 3,
        "the moments hold real tables"
    );
    // The columnar reconstruction (what as_of and diff use where it applies) gives exactly the
    // row replay's table; for `plain` (a key, one schema version, every value typed) it must
    // apply; for `acct` (values kept as exact text) either path must give the same.
    let plain = snapshot.table("public.plain").unwrap();
    let pair = snapshot.table("public.pair").unwrap();
    assert!(
        plain.keyframes.len() >= 2 && pair.keyframes.len() >= 2,
        "the capture's compactions wrote keyframes ({} of plain, {} of pair)",
        plain.keyframes.len(),
        pair.keyframes.len()
    );
    let (mut pair_rows, mut pair_diffs) = (0, 0);
    let mut plain_rows: BTreeMap<String, usize> = BTreeMap::new();
    // The previous moment of each kind (by LSN, by time), for diffs between consecutive ones.
    let mut previous: [Option<Moment>; 2] = [None, None];
    let mut diffs = 0;
    for (at, lsn, snap) in &moments {
        for (kind, moment) in [
            Moment::Lsn(lsn.parse::<Lsn>().unwrap()),
            Moment::Time(parse_pg_timestamp(at)),
        ]
        .into_iter()
        .enumerate()
        {
            let fast = pgtrail_query::columnar::as_of_batch(&snapshot, plain, moment)
                .unwrap()
                .expect("the columnar path applies to plain");
            let slow = pgtrail_query::row_replay_as_of_batch(&snapshot, plain, moment).unwrap();
            assert_eq!(fast.schema(), slow.schema(), "{snap} {moment}");
            assert_eq!(
                rows_text(&fast),
                rows_text(&slow),
                "{snap} {moment}: columnar as_of differs from the row replay"
            );
            plain_rows.insert(snap.clone(), fast.num_rows());
            // A composite key (text, int): the replay keys its map by the key's bytes.
            let fast = pgtrail_query::columnar::as_of_batch(&snapshot, pair, moment)
                .unwrap()
                .expect("the columnar path applies to pair");
            let slow = pgtrail_query::row_replay_as_of_batch(&snapshot, pair, moment).unwrap();
            assert_eq!(
                rows_text(&fast),
                rows_text(&slow),
                "{snap} {moment}: columnar as_of of pair differs from the row replay"
            );
            pair_rows += fast.num_rows();
            let acct_fast = pgtrail_query::as_of_batch(&snapshot, table, moment).unwrap();
            let acct_slow =
                pgtrail_query::row_replay_as_of_batch(&snapshot, table, moment).unwrap();
            assert_eq!(
                rows_text(&acct_fast),
                rows_text(&acct_slow),
                "{snap} {moment}: acct"
            );
            if let Some(from) = previous[kind] {
                let fast = pgtrail_query::columnar::diff_batch(&snapshot, plain, from, moment)
                    .unwrap()
                    .expect("columnar diff applies");
                let slow =
                    pgtrail_query::row_replay_diff_batch(&snapshot, plain, from, moment).unwrap();
                assert_eq!(fast.schema(), slow.schema(), "diff to {snap}");
                assert_eq!(
                    rows_text(&fast),
                    rows_text(&slow),
                    "diff {from} -> {moment}: columnar differs from the row replay"
                );
                diffs += fast.num_rows();
                let fast = pgtrail_query::columnar::diff_batch(&snapshot, pair, from, moment)
                    .unwrap()
                    .expect("columnar diff applies to pair");
                let slow =
                    pgtrail_query::row_replay_diff_batch(&snapshot, pair, from, moment).unwrap();
                assert_eq!(
                    rows_text(&fast),
                    rows_text(&slow),
                    "diff of pair {from} -> {moment}: columnar differs from the row replay"
                );
                pair_diffs += fast.num_rows();
            }
            previous[kind] = Some(moment);
        }
    }
    assert_eq!(
        plain_rows["snap_6"], 0,
        "the truncate of round 6 empties plain"
    );
    assert!(
        diffs >= 50,
        "the diffs between moments found changed rows ({diffs})"
    );
    assert!(
        pair_rows >= 100 && pair_diffs >= 30,
        "pair's moments and diffs hold rows ({pair_rows}, {pair_diffs})"
    );
    // The `changes` view without its JSON columns is built from the segments' columns; with
    // one of them (primary_key) it takes the row path. Both must list the same changes.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (ctx, _) = pgtrail_query::open_session(&archive).unwrap();
    let run = |sql: &str| sql_rows(&rt, &ctx, sql);
    let view_columns = "\"table\", \"schema\", operation, context, committed_at, transaction_id, lsn, seq, position";
    let columnar = run(&format!("SELECT {view_columns} FROM changes"));
    let row_path = run(&format!(
        "SELECT {view_columns} FROM (SELECT primary_key, {view_columns} FROM changes) WHERE primary_key IS NULL OR primary_key IS NOT NULL"
    ));
    let (mut columnar, mut row_path) = (columnar, row_path);
    columnar.sort();
    row_path.sort();
    assert!(
        columnar.len() > 200,
        "the changes view lists the changes ({})",
        columnar.len()
    );
    assert_eq!(
        columnar, row_path,
        "the columnar changes view differs from the row path"
    );
    assert_eq!(
        run("SELECT count(*) FROM changes"),
        vec![columnar.len().to_string()]
    );
    // Newest (or oldest) N: the scan reads row groups newest first and skips those the sort's
    // dynamic filter rules out; the answer is the head of the whole sorted list.
    // (`run` sorts each batch's rows as text, so the expected head is computed here from every
    // row: the leading columns are the order, numbers compared as numbers.)
    for (order, columns, descending) in [
        ("lsn DESC, seq DESC", "lsn, seq, op", true),
        (
            "committed_at DESC, lsn DESC, seq DESC",
            "committed_at, lsn, seq, after.id",
            true,
        ),
        ("lsn, seq", "lsn, seq, before.id", false),
    ] {
        let keys = order.split(',').count();
        let sort_key = |row: &String| -> Vec<String> {
            row.split(" | ")
                .take(keys)
                .map(|v| match v.parse::<u64>() {
                    Ok(n) => format!("{n:020}"),
                    Err(_) => v.to_string(),
                })
                .collect()
        };
        for table in ["public.plain", "public.acct"] {
            let mut all = run(&format!("SELECT {columns} FROM {table}"));
            assert!(all.len() > 20, "{table} has changes");
            all.sort_by_key(sort_key);
            if descending {
                all.reverse();
            }
            let mut expected = all[..7].to_vec();
            expected.sort();
            let mut head = run(&format!(
                "SELECT {columns} FROM {table} ORDER BY {order} LIMIT 7"
            ));
            head.sort();
            assert_eq!(head, expected, "{table} ORDER BY {order} LIMIT 7");
        }
    }
    // A `WHERE` on the table is applied by the scan itself (so a `LIMIT` sees matches as they
    // are read), reading what only the filter uses as extra columns: the same rows.
    let mut matching =
        run("SELECT lsn, seq, after.id FROM public.plain WHERE after.note LIKE '%+%'");
    assert!(matching.len() > 10, "updates appended '+' to notes");
    assert_eq!(
        run("SELECT count(*) FROM public.plain WHERE after.note LIKE '%+%'"),
        vec![matching.len().to_string()]
    );
    matching.sort_by_key(|row| {
        row.split(" | ")
            .take(2)
            .map(|v| v.parse::<u64>().unwrap())
            .collect::<Vec<_>>()
    });
    matching.reverse();
    let mut expected = matching[..5].to_vec();
    expected.sort();
    let newest = "SELECT lsn, seq, after.id FROM public.plain WHERE after.note LIKE '%+%' ORDER BY lsn DESC, seq DESC LIMIT 5";
    let mut head = run(newest);
    head.sort();
    assert_eq!(head, expected, "the newest 5 matches");
    let plan = run(&format!("EXPLAIN {newest}"));
    assert!(
        plan.iter()
            .any(|line| line.contains("HistoryScanExec") && line.contains("LIKE"))
            && !plan.iter().any(|line| line.contains("FilterExec")),
        "the scan applies the filter: {plan:?}"
    );
    let plan = run("EXPLAIN SELECT lsn, seq FROM public.plain ORDER BY lsn DESC, seq DESC LIMIT 7");
    assert!(
        plan.iter()
            .any(|line| line.contains("newest row groups first")),
        "the scan takes the sort's dynamic filter: {plan:?}"
    );
    // An ascending order reaches the scan through DataFusion's sort pushdown: oldest first.
    for oldest in [
        "SELECT lsn, seq FROM public.plain ORDER BY lsn, seq LIMIT 7",
        "SELECT committed_at, after.id FROM public.plain ORDER BY committed_at LIMIT 7",
    ] {
        let plan = run(&format!("EXPLAIN {oldest}"));
        assert!(
            plan.iter()
                .any(|line| line.contains("oldest row groups first")),
            "{oldest}: {plan:?}"
        );
    }
    // row_history through the key index (or the view over the stored key columns), and by the
    // text scan: the same changes, for an integer key and a text-and-integer key (including
    // rows whose key changed), with the key indexes, without them, and with one damaged.
    //
    // Compaction is settled first, and what follows reads the settled archive: the background
    // compactor may have left a tail in the log and runs of small segments, and the hand
    // compaction below would then merge away the very segments whose indexes it removes,
    // leaving no index to write again.
    let settle = pgtrail()
        .args(["compact", "--archive"])
        .arg(&archive)
        .output()
        .unwrap();
    assert!(settle.status.success(), "{settle:?}");
    let (ctx, snapshot) = pgtrail_query::open_session(&archive).unwrap();
    let run = |sql: &str| sql_rows(&rt, &ctx, sql);
    let plain = snapshot.table("public.plain").unwrap();
    let pair = snapshot.table("public.pair").unwrap();
    let histories = |run: &dyn Fn(&str) -> Vec<String>| -> Vec<Vec<String>> {
        let keys: [(&pgtrail_query::TableHistory, &str, Vec<&str>); 7] = [
            (plain, "public.plain", vec!["3"]),
            (plain, "public.plain", vec!["100007"]),
            (plain, "public.plain", vec!["7"]),
            (plain, "public.plain", vec!["0"]),
            (plain, "public.plain", vec!["6"]),
            (pair, "public.pair", vec!["r1", "7"]),
            (pair, "public.pair", vec!["moved", "100015"]),
        ];
        let mut all = Vec::new();
        for (table, name, key) in keys {
            let args: Vec<String> = key.iter().map(|k| format!("'{k}'")).collect();
            let mut view = run(&format!(
                "SELECT * FROM row_history('{name}', {})",
                args.join(", ")
            ));
            let key: Vec<String> = key.iter().map(|k| k.to_string()).collect();
            let mut scanned: Vec<String> =
                pgtrail_query::row_replay_row_history(&snapshot, table, &key)
                    .unwrap()
                    .iter()
                    .flat_map(rows_text)
                    .collect();
            view.sort();
            scanned.sort();
            assert!(!view.is_empty(), "{name} {key:?} has a history");
            assert_eq!(view, scanned, "row_history of {name} {key:?}");
            // In change order when asked (row_history declares its order when it has checked
            // it, and the sort is then left out): each change once, strictly rising.
            let ordered = rt.block_on(async {
                pgtrail_query::read_only_query(
                    &ctx,
                    &format!(
                        "SELECT lsn, seq FROM row_history('{name}', {}) ORDER BY lsn, seq",
                        args.join(", ")
                    ),
                )
                .await
                .unwrap()
                .collect()
                .await
                .unwrap()
            });
            let positions: Vec<(u64, u32)> = ordered
                .iter()
                .flat_map(|b| {
                    use datafusion::arrow::array::AsArray;
                    use datafusion::arrow::datatypes::{UInt32Type, UInt64Type};
                    let lsn = b.column(0).as_primitive::<UInt64Type>().clone();
                    let seq = b.column(1).as_primitive::<UInt32Type>().clone();
                    (0..b.num_rows()).map(move |i| (lsn.value(i), seq.value(i)))
                })
                .collect();
            assert_eq!(positions.len(), view.len(), "{name} {key:?}");
            assert!(
                positions.windows(2).all(|w| w[0] < w[1]),
                "row_history of {name} {key:?} in change order: {positions:?}"
            );
            all.push(view);
        }
        all
    };
    // The key index of every listed segment of the keyed tables (a merge's retired inputs
    // keep theirs until they are removed).
    let indexes = || -> Vec<std::path::PathBuf> {
        let snapshot = ArchiveSnapshot::open(&archive).unwrap();
        ["public.acct", "public.plain", "public.pair"]
            .iter()
            .flat_map(|t| snapshot.table(t).unwrap().segments.clone())
            .map(|s| {
                archive
                    .join("segments")
                    .join(format!("{}.keys", s.file_name))
            })
            .collect()
    };
    let indexed = indexes();
    assert!(indexed.len() >= 3);
    for index in &indexed {
        assert!(index.exists(), "the compactor wrote {}", index.display());
    }
    let with_index = histories(&run);
    for entry in std::fs::read_dir(archive.join("segments")).unwrap() {
        let path = entry.unwrap().path();
        if path.to_string_lossy().ends_with(".keys") {
            std::fs::remove_file(path).unwrap();
        }
    }
    assert_eq!(histories(&run), with_index, "without key indexes");
    let compact = pgtrail()
        .args(["compact", "--archive"])
        .arg(&archive)
        .output()
        .unwrap();
    assert!(compact.status.success(), "{compact:?}");
    assert!(
        String::from_utf8_lossy(&compact.stderr).contains("wrote the key index of"),
        "{compact:?}"
    );
    let indexed = indexes();
    for index in &indexed {
        assert!(
            index.exists(),
            "pgtrail compact wrote {} again",
            index.display()
        );
    }
    for index in &indexed {
        let mut bytes = std::fs::read(index).unwrap();
        let middle = 56 + (bytes.len() - 56) / 4;
        bytes[middle] ^= 0x40;
        std::fs::write(index, bytes).unwrap();
    }
    assert_eq!(histories(&run), with_index, "with damaged key indexes");
    assert!(
        plain_rows.values().filter(|n| **n >= 10).count() >= 3,
        "plain holds real tables"
    );
    assert!(
        rebuilt["snap_5"].is_empty(),
        "the truncate of round 5 empties the table"
    );
    // The same through SQL, offline, as a user runs it.
    let (first_at, first_lsn, first_snap) = &moments[2];
    for sql in [
        format!("SELECT count(*) AS n FROM as_of_lsn('public.acct', '{first_lsn}')"),
        format!("SELECT count(*) AS n FROM as_of('public.acct', TIMESTAMP '{first_at}')"),
    ] {
        let out = pgtrail()
            .args(["sql", "--format", "json", "--archive"])
            .arg(&archive)
            .arg(&sql)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            v["n"].as_u64(),
            Some(rebuilt[first_snap].len() as u64),
            "{sql}"
        );
    }
    // Parquet for programs: written whole under --output, readable by the parquet crate alone.
    let export = dir.path().join("as_of.parquet");
    let reader = pgtrail_sql_parquet(
        &archive,
        &format!("SELECT * FROM as_of_lsn('public.acct', '{first_lsn}')"),
        &export,
    )
    .build()
    .unwrap();
    let rows: usize = reader.map(|b| b.unwrap().num_rows()).sum();
    assert_eq!(rows, rebuilt[first_snap].len());
    assert!(!export.with_extension("pgtrail-tmp").exists());
    let before = pgtrail()
        .args(["sql", "--archive"])
        .arg(&archive)
        .arg("SELECT * FROM as_of('public.acct', TIMESTAMP '2000-01-01 00:00:00+00')")
        .output()
        .unwrap();
    assert!(!before.status.success());
    assert!(
        String::from_utf8_lossy(&before.stderr).contains("before the archive's history begins")
    );

    // PostgreSQL again, as the judge: every archived value read back as its column type equals
    // the snapshot PostgreSQL took at that moment.
    cluster.start_again().unwrap();
    for (snap, n) in &plain_rows {
        let expected: usize = cluster
            .psql("pit", &format!("SELECT count(*) FROM p{snap}"))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(*n, expected, "p{snap}: rows of plain");
    }
    for (snap, rows) in &rebuilt {
        let settings = pgtrail_capture::source::session_settings_sql();
        let exprs: Vec<String> = rows
            .iter()
            .map(|row| {
                let cells: Vec<String> = row
                    .iter()
                    .zip(&columns)
                    .map(|(c, (_, ty))| format!("({})::text", cell_sql(c, ty)))
                    .collect();
                format!("json_build_array({})", cells.join(", "))
            })
            .collect();
        let archived = if exprs.is_empty() {
            "[]".to_string()
        } else {
            cluster.psql("pit", &format!("{settings} SELECT json_agg(x ORDER BY (x->>0)::int) FROM (VALUES ({})) v(x)", exprs.join("), ("))).unwrap()
        };
        let cols: Vec<String> = columns.iter().map(|(n, _)| format!("{n}::text")).collect();
        let expected = cluster
            .psql(
                "pit",
                &format!("{settings} SELECT coalesce(json_agg(json_build_array({}) ORDER BY id), '[]') FROM {snap}", cols.join(", ")),
            )
            .unwrap();
        let archived: serde_json::Value = serde_json::from_str(&archived).unwrap();
        let expected: serde_json::Value = serde_json::from_str(&expected).unwrap();
        assert_eq!(
            archived, expected,
            "{snap}: the archive's table differs from PostgreSQL's"
        );
    }
}

/// Every row of `batch` as text, sorted (the two reconstructions may order rows differently).
fn rows_text(batch: &datafusion::arrow::record_batch::RecordBatch) -> Vec<String> {
    use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
    let options = FormatOptions::default().with_null("NULL");
    let formatters: Vec<ArrayFormatter> = batch
        .columns()
        .iter()
        .map(|c| ArrayFormatter::try_new(c.as_ref(), &options).unwrap())
        .collect();
    let mut rows: Vec<String> = (0..batch.num_rows())
        .map(|i| {
            formatters
                .iter()
                .map(|f| f.value(i).to_string())
                .collect::<Vec<_>>()
                .join(" | ")
        })
        .collect();
    rows.sort();
    rows
}

/// `2026-11-26 21:20:23.602946+00` (what `clock_timestamp()::text` prints in UTC) to µs.
pub(crate) fn parse_pg_timestamp(text: &str) -> i64 {
    let (date, rest) = text.split_once(' ').unwrap();
    let mut d = date.split('-').map(|p| p.parse::<i64>().unwrap());
    let (y, m, day) = (d.next().unwrap(), d.next().unwrap(), d.next().unwrap());
    let (time, offset) = rest.split_at(rest.rfind(['+', '-']).unwrap());
    assert_eq!(offset, "+00", "the test cluster runs in UTC");
    let mut t = time.split(':');
    let (h, mi) = (
        t.next().unwrap().parse::<i64>().unwrap(),
        t.next().unwrap().parse::<i64>().unwrap(),
    );
    let s: f64 = t.next().unwrap().parse().unwrap();
    let days = pgtrail_store::segment::days_from_civil(y, m as u32, day as u32);
    days * 86_400_000_000 + h * 3_600_000_000 + mi * 60_000_000 + (s * 1e6).round() as i64
}

#[test]
fn sql_and_status_read_a_live_archive_while_capture_runs() {
    let cluster = Cluster::shared();
    let db = cluster.fresh_database("live").unwrap();
    cluster
        .psql(&db, "CREATE TABLE t (id int PRIMARY KEY, v text)")
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("archive");
    let mut child = crate::spawn_capture(&cluster.url(&db), &archive, &db, None);
    wait_slot_active(cluster, &db, &db, &mut child);
    for round in 0..3 {
        cluster
            .psql(
                &db,
                &format!(
                    "INSERT INTO t SELECT g, 'r{round}' FROM generate_series({a}, {b}) g",
                    a = round * 10,
                    b = round * 10 + 9
                ),
            )
            .unwrap();
        let end = crate::insert_lsn(cluster, &db);
        let deadline = Instant::now() + Duration::from_secs(60);
        while cluster
            .psql(&db, &format!("SELECT confirmed_flush_lsn >= '{end}' FROM pg_replication_slots WHERE slot_name = '{db}'"))
            .unwrap()
            != "t"
        {
            assert!(Instant::now() < deadline, "capture did not catch up");
            std::thread::sleep(Duration::from_millis(50));
        }
        // The capture holds the log as its one writer; readers follow its commits.
        let out = pgtrail()
            .args(["sql", "--format", "json", "--archive"])
            .arg(&archive)
            .arg("SELECT count(*) AS n FROM public.t")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            v["n"].as_u64(),
            Some((round as u64 + 1) * 10),
            "the live tail is visible"
        );
        let status = pgtrail()
            .args(["status", "--format", "json", "--archive"])
            .arg(&archive)
            .output()
            .unwrap();
        assert!(
            status.status.success(),
            "{}",
            String::from_utf8_lossy(&status.stderr)
        );
        let s: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
        assert_eq!(s["changes"].as_u64(), Some((round as u64 + 1) * 10));
        // Compaction by hand is refused while capture compacts in the background.
        let compact = pgtrail()
            .args(["compact", "--archive"])
            .arg(&archive)
            .output()
            .unwrap();
        assert!(!compact.status.success());
        assert!(String::from_utf8_lossy(&compact.stderr).contains("running `pgtrail capture`"));
    }
    // The interactive prompt: a statement over two lines, \d, and a history file.
    let mut prompt = pgtrail()
        .args(["sql", "--archive"])
        .arg(&archive)
        .env("HOME", dir.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = prompt.stdin.take().unwrap();
        stdin
            .write_all(b"\\d\nSELECT max(after.id) AS highest\n  FROM public.t;\n\\q\n")
            .unwrap();
    }
    let out = prompt.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("| 29      |"), "{stdout}");
    assert!(stdout.contains("| public       | t "), "{stdout}");
    assert!(
        std::fs::read_to_string(dir.path().join(".pgtrail_history"))
            .unwrap()
            .contains("FROM public.t;")
    );
    terminate(&mut child);
}

/// The rows of `public.t` as `id|v|n` lines in key order, as PostgreSQL returns them.
fn t_rows_in_postgres(cluster: &Cluster) -> String {
    cluster
        .psql("kf", "SELECT id, v, n FROM t ORDER BY id")
        .unwrap()
}

/// The same lines from the archive's `as_of_lsn` (`pgtrail sql`, CSV without its header).
fn t_rows_as_of(archive: &std::path::Path, lsn: &str) -> String {
    let csv = crate::pgtrail_sql(
        archive,
        "csv",
        &format!("SELECT id, v, n FROM as_of_lsn('public.t', '{lsn}') ORDER BY id"),
    );
    csv.lines()
        .skip(1)
        .map(|l| l.replace(',', "|"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The latest keyframe of `public.t` the archive lists.
fn latest_keyframe_of_t(archive: &std::path::Path) -> pgtrail_store::KeyframeEntry {
    let snapshot = ArchiveSnapshot::open(archive).unwrap();
    let table = snapshot.table("public.t").unwrap();
    table.keyframes.last().unwrap().clone()
}

/// A keyframe's rows as its file holds them, read by the parquet crate.
fn keyframe_batch(
    archive: &std::path::Path,
    keyframe: &pgtrail_store::keyframe::KeyframeEntry,
) -> datafusion::arrow::array::RecordBatch {
    let path = pgtrail_store::keyframe::keyframe_path(archive, keyframe);
    let batches: Vec<datafusion::arrow::array::RecordBatch> =
        datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
            std::fs::File::open(&path).unwrap(),
        )
        .unwrap()
        .build()
        .unwrap()
        .map(Result::unwrap)
        .collect();
    datafusion::arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap()
}

/// Keyframes written by `pgtrail compact` hold what the replay gives at their points:
/// `as_of` starting from them answers what PostgreSQL held at moments across inserts,
/// updates, key changes, deletes and a TRUNCATE, and `pgtrail verify` checks each one. A
/// keyframe forged with its checksum recomputed (a row dropped) changes what `as_of`
/// answers, so verify must name it; `pgtrail keyframes --rebuild` writes true ones again.
#[test]
fn keyframes_equal_the_replay_and_verify_names_a_forged_one() {
    let cluster = Cluster::start(ClusterOptions::default()).unwrap();
    cluster.psql("postgres", "CREATE DATABASE kf").unwrap();
    cluster
        .psql(
            "kf",
            "CREATE TABLE t (id int PRIMARY KEY, v text NOT NULL, n int NOT NULL)",
        )
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("archive");
    crate::capture_until_now(&cluster, "kf", &archive);
    // (LSN after the round, PostgreSQL's rows then).
    let mut moments: Vec<(String, String)> = Vec::new();
    for round in 0..8 {
        let a = round * 20;
        cluster
            .psql(
                "kf",
                &format!(
                    "INSERT INTO t SELECT g, 'v' || g, {round} FROM generate_series({a}, {a} + 29) g ON CONFLICT (id) DO NOTHING;
                     UPDATE t SET v = v || '+', n = n + 1 WHERE id % 3 = {m};
                     UPDATE t SET id = id + 1000 WHERE id = {a};
                     DELETE FROM t WHERE id % 7 = {m} AND id < {a};
                     {truncate}",
                    m = round % 3,
                    truncate = if round == 4 { "TRUNCATE t;" } else { "" },
                ),
            )
            .unwrap();
        let lsn = cluster
            .psql("kf", "SELECT pg_current_wal_lsn()::text")
            .unwrap();
        moments.push((lsn, t_rows_in_postgres(&cluster)));
    }
    crate::capture_until_now(&cluster, "kf", &archive);
    crate::pgtrail_ok(
        &archive,
        &[
            "compact",
            "--keyframe-changes",
            "25",
            "--keyframe-rows-factor",
            "1",
        ],
    );
    let listed = crate::pgtrail_ok(&archive, &["keyframes", "--json"]);
    let keyframes: Vec<serde_json::Value> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        keyframes.len() >= 3,
        "keyframes were written along the history: {keyframes:?}"
    );
    let check_moments = |what: &str| {
        for (lsn, rows) in &moments {
            assert!(rows.lines().count() >= 10 || rows.is_empty());
            assert_eq!(
                &t_rows_as_of(&archive, lsn),
                rows,
                "{what}: as_of_lsn {lsn}"
            );
        }
    };
    check_moments("with keyframes");
    let verify = |archive: &std::path::Path| {
        crate::pgtrail()
            .args(["verify", "--archive"])
            .arg(archive)
            .output()
            .unwrap()
    };
    let out = verify(&archive);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains(&format!("keyframes: {} checked", keyframes.len())),
        "{stdout}"
    );

    // Forge the latest keyframe: its rows less one, listed with a checksum of its own.
    let latest = latest_keyframe_of_t(&archive);
    let at_keyframe = t_rows_as_of(&archive, &latest.at.to_string());
    let rows = keyframe_batch(&archive, &latest);
    assert!(rows.num_rows() >= 10);
    // A keyframe at `like`'s point and of its version, listed with a checksum of its own.
    let publish = |like: &pgtrail_store::KeyframeEntry,
                   rows: datafusion::arrow::array::RecordBatch,
                   includes_until_us: i64,
                   changes: u64| {
        let log = pgtrail_store::ChangeLog::open(&archive).unwrap();
        pgtrail_store::keyframe::publish_keyframe(
            &log.shared(),
            &archive,
            pgtrail_store::keyframe::NewKeyframe {
                version: like.version.clone(),
                at: like.at,
                includes_until_us,
                changes,
                rows,
            },
        )
        .unwrap()
    };
    let forged = publish(
        &latest,
        rows.slice(1, rows.num_rows() - 1),
        latest.includes_until_us,
        latest.changes,
    );
    assert_eq!(
        t_rows_as_of(&archive, &latest.at.to_string())
            .lines()
            .count()
            + 1,
        at_keyframe.lines().count(),
        "as_of at the keyframe's point starts from the forged keyframe"
    );
    // Verify must fail naming the forged keyframe and saying `said`; `--rebuild` mends it.
    let named_then_rebuilt = |what: &str, forged: &pgtrail_store::KeyframeEntry, said: &str| {
        let out = verify(&archive);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(!out.status.success(), "{what}: verify passed it: {stdout}");
        assert!(
            stdout.contains(&format!("PROBLEM: keyframe {}", forged.file_name))
                && stdout.contains(said),
            "{what}: {stdout}"
        );
        crate::pgtrail_ok(
            &archive,
            &[
                "keyframes",
                "--rebuild",
                "--keyframe-changes",
                "25",
                "--keyframe-rows-factor",
                "1",
            ],
        );
        assert!(verify(&archive).status.success(), "{what}: after --rebuild");
    };
    named_then_rebuilt("a row dropped", &forged, "rows; the replay gives");
    check_moments("after --rebuild");

    // The other forgeries of a keyframe that leave its row count: a value edited, the
    // latest commit time it claims made earlier (an `as_of` by time would then start from it
    // before all it holds had committed), its change count. Each is named; `--rebuild`
    // mends each.
    let latest = latest_keyframe_of_t(&archive);
    let true_rows = keyframe_batch(&archive, &latest);
    let xid = true_rows.column_by_name("xid").unwrap();
    let mut edited_xid: Vec<u32> = xid
        .as_any()
        .downcast_ref::<datafusion::arrow::array::UInt32Array>()
        .expect("xid is u32")
        .values()
        .to_vec();
    edited_xid[0] += 1;
    let mut columns = true_rows.columns().to_vec();
    columns[true_rows.schema().index_of("xid").unwrap()] =
        std::sync::Arc::new(datafusion::arrow::array::UInt32Array::from(edited_xid));
    let edited =
        datafusion::arrow::array::RecordBatch::try_new(true_rows.schema(), columns).unwrap();
    let forgeries = [
        (
            "an xid edited",
            edited,
            latest.includes_until_us,
            latest.changes,
            "its column xid differs",
        ),
        (
            "an earlier commit time",
            true_rows.clone(),
            latest.includes_until_us - 1_000_000,
            latest.changes,
            "its latest commit time is",
        ),
        (
            "a change count",
            true_rows,
            latest.includes_until_us,
            latest.changes + 1,
            "changes of the table are at or before its point",
        ),
    ];
    for (what, rows, includes_until_us, changes, said) in forgeries {
        let forged = publish(&latest, rows, includes_until_us, changes);
        named_then_rebuilt(what, &forged, said);
    }
    check_moments("after the last --rebuild");
}

/// The rows of a read-only query in `ctx`, each as text.
fn sql_rows(
    rt: &tokio::runtime::Runtime,
    ctx: &datafusion::prelude::SessionContext,
    sql: &str,
) -> Vec<String> {
    let batches = rt.block_on(async {
        pgtrail_query::read_only_query(ctx, sql)
            .await
            .unwrap()
            .collect()
            .await
            .unwrap()
    });
    batches.iter().flat_map(rows_text).collect()
}
