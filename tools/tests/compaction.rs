//! Compaction killed at each of its steps (a real `pgtrail compact` process aborted at a
//! crash point) leaves an archive holding every change exactly once, before and after the
//! rerun; and the segments it writes open in readers that share no code with pgtrail.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use datafusion::arrow::datatypes::{DataType, TimeUnit};
use datafusion::parquet::arrow::arrow_reader::{
    ArrowReaderOptions, ParquetRecordBatchReaderBuilder,
};
use datafusion::parquet::file::metadata::PageIndexPolicy;
use pgtrail_capture::cluster::Cluster;
use pgtrail_store::segment::key_copy::key_copy_name;
use pgtrail_store::segment::key_index::{self, KeyIndexBuilder};
use pgtrail_store::segment::sha256_file;
use pgtrail_store::{ChangeKey, ChangeRecord, LogReader, SEGMENTS_DIR};

use crate::{insert_lsn, pgtrail, wait_exit};

/// Every step of a compaction run where a crash could leave a half-done state.
const CRASH_POINTS: &[&str] = &[
    "segment:before_footer",
    "segment:before_fsync",
    "segment:before_rename",
    "segment:before_dir_fsync",
    "segment:before_key_index",
    "compact:before_manifest",
    "compact:after_commit",
    "merge:before_manifest",
    "merge:after_commit",
    "compact:before_key_copy_index",
];

fn capture_until(url: &str, archive: &Path, slot: &str, lsn: &str) {
    let mut child = pgtrail()
        .args([
            "capture",
            "--slot",
            slot,
            "--publication",
            slot,
            "--no-compact",
            "--stop-at",
            lsn,
        ])
        .env("PGTRAIL_SOURCE", url)
        .env("PGTRAIL_ARCHIVE", archive)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(wait_exit(&mut child, Duration::from_secs(120)).success());
}

fn compact(archive: &Path, crash_at: Option<&str>) -> std::process::Output {
    let mut cmd = pgtrail();
    cmd.args(["compact", "--archive"]).arg(archive);
    if let Some(point) = crash_at {
        cmd.env("PGTRAIL_CRASH_AT", point);
    }
    cmd.output().unwrap()
}

fn everything(archive: &Path) -> Vec<(ChangeKey, ChangeRecord)> {
    let reader = LogReader::open(archive).unwrap();
    reader.all_changes(archive).unwrap()
}

/// `cp -a from to`: a copy of an archive as it is on disk (modes and all).
pub(crate) fn copy_archive(from: &Path, to: &Path) {
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn compaction_killed_at_any_step_keeps_every_change_exactly_once() {
    let cluster = Cluster::shared();
    let db = cluster.fresh_database("crashcompact").unwrap();
    let url = cluster.url(&db);
    cluster
        .psql(&db, "CREATE TABLE t (id int PRIMARY KEY, v text, n numeric(10,2)); CREATE TABLE u (id int PRIMARY KEY, w text)")
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    // Four rounds: the first three compacted one by one (three small segments per table),
    // the fourth left in the log, so the next run compacts it and then merges four segments.
    for round in 0..4 {
        cluster
            .psql(
                &db,
                &format!(
                    "INSERT INTO t SELECT g, 'v' || g, g * 1.25 FROM generate_series({a}, {b}) g;
                     UPDATE t SET v = v || '!' WHERE id % 7 = {round};
                     DELETE FROM t WHERE id % 11 = {round};
                     INSERT INTO u VALUES ({round}, 'round {round}');
                     SELECT pg_logical_emit_message(true, 'oracle', 'round {round}');",
                    a = round * 100,
                    b = round * 100 + 99
                ),
            )
            .unwrap();
        capture_until(&url, &base, &db, &insert_lsn(cluster, &db));
        if round < 3 {
            let out = compact(&base, None);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let expected = everything(&base);
    assert!(expected.len() > 400);

    for point in CRASH_POINTS {
        let archive = dir.path().join(point.replace(':', "_"));
        copy_archive(&base, &archive);
        let crashed = compact(&archive, Some(point));
        assert!(
            crashed.status.code().is_none(),
            "compact must abort at {point} (built with the crashpoints feature), got {}: {}",
            crashed.status,
            String::from_utf8_lossy(&crashed.stderr)
        );
        // Right after the crash: every change is in exactly one place.
        assert_eq!(everything(&archive), expected, "after a crash at {point}");
        let rerun = compact(&archive, None);
        assert!(
            rerun.status.success(),
            "rerun after {point}: {}",
            String::from_utf8_lossy(&rerun.stderr)
        );
        assert_eq!(
            everything(&archive),
            expected,
            "after a crash at {point} and a rerun"
        );
        let reader = LogReader::open(&archive).unwrap();
        assert_eq!(
            reader.change_count().unwrap(),
            0,
            "the rerun compacted the whole log"
        );
        let listed: Vec<String> = reader
            .manifest()
            .unwrap()
            .segments
            .iter()
            .map(|s| s.file_name.clone())
            .collect();
        let on_disk: Vec<String> = std::fs::read_dir(archive.join(SEGMENTS_DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !listed.contains(n))
            .collect();
        // Only inputs of a merge may remain unlisted, retired for their grace period, with
        // their key indexes and key-ordered copies.
        assert!(
            on_disk.iter().all(|n| n.ends_with(".parquet")
                || n.strip_suffix(".keys")
                    .or_else(|| n.strip_suffix(".keyrows"))
                    .is_some_and(|segment| {
                        segment.ends_with(".parquet")
                            && (on_disk.iter().any(|o| o == segment)
                                || listed.iter().any(|l| l == segment))
                    })),
            "after {point}: stray files {on_disk:?}"
        );
        // Every listed segment of a keyed table has its key index, whole, naming its
        // key-ordered copy, whole.
        for s in reader.manifest().unwrap().segments {
            if KeyIndexBuilder::for_content(&s.content).is_some() {
                let path = archive.join(SEGMENTS_DIR).join(&s.file_name);
                let copy = match key_index::check(&path, &s.sha256) {
                    Ok(Some(copy)) => copy,
                    Ok(None) => panic!("after {point}: {} names no key-ordered copy", s.file_name),
                    Err(problem) => panic!("after {point}: {problem}"),
                };
                let copy_path = archive.join(SEGMENTS_DIR).join(key_copy_name(&s.file_name));
                assert_eq!(
                    sha256_file(&copy_path).unwrap(),
                    copy,
                    "after {point}: the key-ordered copy of {}",
                    s.file_name
                );
            }
        }
    }
    independent_readers_see_the_documented_schema(&base);
}

/// Open a segment with the `parquet` crate alone (no pgtrail code), and with pyarrow when it
/// is installed (CI installs it and sets `PGTRAIL_REQUIRE_PYARROW=1`).
fn independent_readers_see_the_documented_schema(archive: &Path) {
    let out = compact(archive, None);
    assert!(out.status.success());
    let reader = LogReader::open(archive).unwrap();
    let manifest = reader.manifest().unwrap();
    let seg = manifest
        .segments
        .iter()
        .find(|s| s.table_name() == "public.t")
        .unwrap();
    let path = archive.join(SEGMENTS_DIR).join(&seg.file_name);

    let options = ArrowReaderOptions::new().with_page_index_policy(PageIndexPolicy::Required);
    let builder = ParquetRecordBatchReaderBuilder::try_new_with_options(
        std::fs::File::open(&path).unwrap(),
        options,
    )
    .unwrap();
    let schema = builder.schema().clone();
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    assert_eq!(
        names,
        [
            "lsn",
            "seq",
            "xid",
            "committed_at",
            "op",
            "context",
            "changed",
            "before",
            "after",
            "before_unknown",
            "after_unknown",
            "before_text",
            "after_text"
        ]
    );
    assert_eq!(
        schema.field_with_name("lsn").unwrap().data_type(),
        &DataType::UInt64
    );
    assert_eq!(
        schema.field_with_name("committed_at").unwrap().data_type(),
        &DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
    );
    let DataType::Struct(after) = schema.field_with_name("after").unwrap().data_type() else {
        panic!("after is a struct")
    };
    let after: Vec<(String, DataType)> = after
        .iter()
        .map(|f| (f.name().clone(), f.data_type().clone()))
        .collect();
    assert_eq!(
        after,
        vec![
            ("id".into(), DataType::Int32),
            ("v".into(), DataType::Utf8),
            ("n".into(), DataType::Decimal128(10, 2))
        ]
    );
    let meta = builder.metadata().clone();
    assert!(
        meta.row_group(0).column(0).statistics().is_some(),
        "lsn statistics for pruning"
    );
    assert!(
        meta.column_index().is_some() && meta.offset_index().is_some(),
        "page index written"
    );
    let rows: usize = builder
        .build()
        .unwrap()
        .map(|b| b.unwrap().num_rows())
        .sum();
    assert_eq!(rows as u64, seg.rows);

    let has_pyarrow = std::process::Command::new("python3")
        .args(["-c", "import pyarrow"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_pyarrow {
        assert!(
            std::env::var_os("PGTRAIL_REQUIRE_PYARROW").is_none(),
            "pyarrow is required here: pip install pyarrow"
        );
        eprintln!("note: pyarrow is not installed; the pyarrow check of segments was skipped");
        return;
    }
    let script = "import sys, json, pyarrow.parquet as pq\n\
                  t = pq.read_table(sys.argv[1])\n\
                  print(json.dumps({'rows': t.num_rows, 'fields': [f.name for f in t.schema], \
                  'after': str(t.schema.field('after').type), 'codec': pq.ParquetFile(sys.argv[1]).metadata.row_group(0).column(0).compression}))";
    let out = std::process::Command::new("python3")
        .args(["-c", script])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pyarrow failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["rows"].as_u64(), Some(seg.rows));
    assert_eq!(v["fields"].as_array().unwrap().len(), 13);
    assert_eq!(
        v["after"],
        "struct<id: int32, v: string, n: decimal128(10, 2)>"
    );
    assert_eq!(v["codec"], "ZSTD");
}
