//! `pgtrail-bench`: pgtrail measured side by side with what users would run instead, on a
//! throwaway PostgreSQL with fixed, printed settings.
//!
//! Suites (more follow in issue 5):
//! - `decode`: drain the same backlog of changes from two slots created before it existed:
//!   pgtrail (durably into its redb log) and `pg_recvlogical` (pgoutput, into a file). The
//!   server's decoder is the limit both share; the ratio says what pgtrail costs on top.
//!
//! - `storage`: the same changes kept three ways: pgtrail's Parquet segments (after compaction),
//!   a generic JSONB audit-trigger table (the supa_audit / audit-trigger shape: heap, TOAST and
//!   its indexes) and a Bemi-style `changes` table (uuid key, JSONB images and context, Bemi's
//!   indexes) loaded from it; plus DuckDB's zstd rewrite of pgtrail's rows, when the duckdb
//!   Python package is installed. Bytes per change; ratios trigger / pgtrail, Bemi-style /
//!   pgtrail, pgtrail / rewrite.
//!
//! Output: one JSON line per measurement (`suite, contestant, workload, rep, metric, value,
//! unit`) to `--out`, and a Markdown table of medians (min-max) and ratios on stdout.
//! `--quick` runs tiny workloads so CI keeps the harness working; it checks that every
//! contestant produced a number, never how fast.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use pgtrail_capture::cluster::{Cluster, ClusterOptions};
use pgtrail_capture::{CaptureConfig, SourceConfig};
use pgtrail_store::Lsn;

#[derive(Parser)]
#[command(name = "pgtrail-bench", about = "Benchmarks of pgtrail against the alternatives, with ratios")]
struct Args {
    /// Which suite: decode, storage, or all.
    #[arg(default_value = "all", value_parser = ["decode", "storage", "all"])]
    suite: String,
    /// Tiny workloads (for CI: proves the harness runs, measures nothing meaningful).
    #[arg(long)]
    quick: bool,
    /// Repetitions per contestant (the median is reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Where to write the JSON lines.
    #[arg(long, default_value = "bench-results.jsonl")]
    out: PathBuf,
}

/// The fixed server settings every suite runs with (printed with the results).
const SETTINGS: &[(&str, &str)] = &[
    ("fsync", "on"),
    ("synchronous_commit", "on"),
    ("shared_buffers", "256MB"),
    ("max_wal_size", "8GB"),
    ("checkpoint_timeout", "1h"),
    ("logical_decoding_work_mem", "64MB"),
];

struct Measurement {
    suite: &'static str,
    contestant: &'static str,
    workload: String,
    rep: usize,
    metric: &'static str,
    value: f64,
    unit: &'static str,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let settings = SETTINGS.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let cluster = Cluster::start(ClusterOptions { settings }).context("starting the benchmark PostgreSQL")?;
    let version = cluster.psql("postgres", "SHOW server_version")?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let mut results: Vec<Measurement> = Vec::new();
    if matches!(args.suite.as_str(), "decode" | "all") {
        decode_suite(&cluster, &rt, &args, &mut results)?;
    }
    if matches!(args.suite.as_str(), "storage" | "all") {
        storage_suite(&cluster, &rt, &args, &mut results)?;
    }
    let mut out = std::fs::File::create(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    for m in &results {
        writeln!(
            out,
            "{}",
            serde_json::json!({"suite": m.suite, "contestant": m.contestant, "workload": m.workload, "rep": m.rep,
                "metric": m.metric, "value": m.value, "unit": m.unit})
        )?;
    }
    print_report(&results, &version, &args)?;
    // Every contestant of every suite run must have produced a number.
    let mut expected: Vec<(&str, &str)> = vec![
        ("decode", "pgtrail"),
        ("decode", "pg_recvlogical"),
        ("storage", "pgtrail"),
        ("storage", "trigger"),
        ("storage", "bemi-style"),
    ];
    if has_duckdb() {
        expected.push(("storage", "duckdb-rewrite"));
    }
    for (suite, contestant) in &expected {
        let ran = matches!(args.suite.as_str(), "all") || args.suite == *suite;
        if ran && !results.iter().any(|m| m.suite == *suite && m.contestant == *contestant && m.value.is_finite() && m.value > 0.0) {
            bail!("{suite}: {contestant} produced no measurement");
        }
    }
    Ok(())
}

/// pgtrail capturing `public.bench` of `db` into `archive` (no compaction, no stop LSN).
fn bench_capture(cluster: &Cluster, db: &str, archive: &std::path::Path) -> anyhow::Result<CaptureConfig> {
    Ok(CaptureConfig {
        source: SourceConfig::parse(&cluster.url(db))?,
        archive: archive.to_path_buf(),
        slot: "pgtrail".into(),
        publication: "pgtrail".into(),
        tables: vec!["public.bench".into()],
        resnapshot: false,
        progress_interval: Duration::from_secs(5),
        stream_timeout: pgtrail_capture::DEFAULT_STREAM_TIMEOUT,
        stop_at: None,
        compaction: None,
    })
}

/// A backlog of `rows` 200-byte-row changes: inserts, then updates and deletes of a share.
fn backlog_sql(rows: u64) -> Vec<String> {
    let batch = 10_000u64;
    let mut sql = Vec::new();
    let mut start = 1;
    while start <= rows {
        let end = (start + batch - 1).min(rows);
        sql.push(format!(
            "INSERT INTO bench SELECT g, repeat(md5(g::text), 6), g FROM generate_series({start}, {end}) g"
        ));
        start = end + 1;
    }
    sql.push(format!("UPDATE bench SET n = n + 1 WHERE id % 4 = 0 AND id <= {rows}"));
    sql.push(format!("DELETE FROM bench WHERE id % 8 = 1 AND id <= {rows}"));
    sql
}

fn decode_suite(cluster: &Cluster, rt: &tokio::runtime::Runtime, args: &Args, results: &mut Vec<Measurement>) -> anyhow::Result<()> {
    let rows: u64 = if args.quick { 20_000 } else { 1_000_000 };
    let changes = rows + rows / 4 + rows / 8;
    let workload = format!("{changes} changes (200-byte rows: insert, update 1/4, delete 1/8)");
    for rep in 0..args.reps.max(1) {
        let db = cluster.fresh_database("bench_decode")?;
        cluster.psql(&db, "CREATE TABLE bench (id bigint PRIMARY KEY, payload text, n bigint); CREATE PUBLICATION recv FOR TABLE bench")?;
        let dir = tempfile::tempdir()?;
        let archive = dir.path().join("archive");
        let config = bench_capture(cluster, &db, &archive)?;
        // Both slots exist before the backlog: the first capture creates pgtrail's slot and
        // its (empty) snapshot and stops.
        let mut first = config.clone();
        first.stop_at = Some(cluster.psql(&db, "SELECT pg_current_wal_insert_lsn()")?.parse::<Lsn>()?);
        rt.block_on(pgtrail_capture::run(first, std::future::pending(), |_| {}))?;
        cluster.psql(&db, "SELECT pg_create_logical_replication_slot('recv', 'pgoutput')")?;
        for statement in backlog_sql(rows) {
            cluster.psql(&db, &statement)?;
        }
        let end: Lsn = cluster.psql(&db, "SELECT pg_current_wal_insert_lsn()")?.parse()?;
        // Alternate which contestant goes first.
        let order: [&str; 2] = if rep % 2 == 0 { ["pgtrail", "pg_recvlogical"] } else { ["pg_recvlogical", "pgtrail"] };
        for contestant in order {
            let started = Instant::now();
            match contestant {
                "pgtrail" => {
                    let mut c = config.clone();
                    c.stop_at = Some(end);
                    let summary = rt.block_on(pgtrail_capture::run(c, std::future::pending(), |_| {}))?;
                    if summary.changes < changes {
                        bail!("pgtrail stored {} changes, expected {changes}", summary.changes);
                    }
                }
                _ => {
                    let file = dir.path().join("recv.out");
                    let status = std::process::Command::new(cluster.bin_dir().join("pg_recvlogical"))
                        .args(["-d", &cluster.url(&db), "-S", "recv", "--start", "--no-loop"])
                        .args(["-o", "proto_version=1", "-o", "publication_names=recv"])
                        .args(["--endpos", &end.to_string(), "-f"])
                        .arg(&file)
                        .stderr(std::process::Stdio::null())
                        .status()
                        .context("running pg_recvlogical")?;
                    if !status.success() {
                        bail!("pg_recvlogical failed: {status}");
                    }
                }
            }
            let secs = started.elapsed().as_secs_f64();
            eprintln!("decode rep {rep}: {contestant} drained {changes} changes in {secs:.2} s ({:.0} changes/s)", changes as f64 / secs);
            results.push(Measurement {
                suite: "decode",
                contestant: if contestant == "pgtrail" { "pgtrail" } else { "pg_recvlogical" },
                workload: workload.clone(),
                rep,
                metric: "changes_per_second",
                value: changes as f64 / secs,
                unit: "changes/s",
            });
        }
        cluster.psql(&db, "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = current_database()")?;
    }
    Ok(())
}

fn has_duckdb() -> bool {
    std::process::Command::new("python3").args(["-c", "import duckdb"]).status().is_ok_and(|s| s.success())
}

/// A generic row-level audit trigger, as supa_audit and the classic audit-trigger install it:
/// every change as JSONB in one table, indexed by time and table.
const AUDIT_TRIGGER_SQL: &str = "
CREATE TABLE audit_log (id bigserial PRIMARY KEY, table_oid oid NOT NULL, table_name text NOT NULL, op text NOT NULL,
  ts timestamptz NOT NULL DEFAULT clock_timestamp(), txid bigint NOT NULL DEFAULT txid_current(), record jsonb, old_record jsonb);
CREATE INDEX audit_log_ts ON audit_log USING brin (ts);
CREATE INDEX audit_log_table_oid ON audit_log (table_oid);
CREATE FUNCTION audit_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO audit_log (table_oid, table_name, op, record, old_record)
  VALUES (TG_RELID, TG_TABLE_NAME, TG_OP,
          CASE WHEN TG_OP <> 'DELETE' THEN to_jsonb(NEW) END,
          CASE WHEN TG_OP <> 'INSERT' THEN to_jsonb(OLD) END);
  RETURN NULL;
END $$;
CREATE TRIGGER audit AFTER INSERT OR UPDATE OR DELETE ON bench FOR EACH ROW EXECUTE FUNCTION audit_row();";

/// A Bemi-style changes table (its columns and indexes), loaded from the audit rows.
const BEMI_SQL: &str = "
CREATE TABLE bemi_changes (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), primary_key text, \"table\" text NOT NULL,
  \"schema\" text NOT NULL, \"database\" text NOT NULL, operation text NOT NULL, before jsonb NOT NULL DEFAULT '{}',
  after jsonb NOT NULL DEFAULT '{}', context jsonb NOT NULL DEFAULT '{}', committed_at timestamptz NOT NULL,
  queued_at timestamptz NOT NULL, created_at timestamptz NOT NULL DEFAULT now(), transaction_id bigint NOT NULL, position bigint NOT NULL);
CREATE INDEX bemi_changes_table_pk ON bemi_changes (\"table\", primary_key);
CREATE INDEX bemi_changes_committed_at ON bemi_changes (committed_at);
CREATE INDEX bemi_changes_operation ON bemi_changes (operation);
CREATE INDEX bemi_changes_context ON bemi_changes USING gin (context jsonb_path_ops);
INSERT INTO bemi_changes (primary_key, \"table\", \"schema\", \"database\", operation, before, after, context, committed_at, queued_at, transaction_id, position)
SELECT coalesce(record, old_record)->>'id', table_name, 'public', current_database(),
       CASE op WHEN 'INSERT' THEN 'CREATE' ELSE op END, coalesce(old_record, '{}'), coalesce(record, '{}'), '{}',
       ts, ts, txid, id FROM audit_log;";

/// The same changes stored by pgtrail (compacted), the audit trigger, a Bemi-style table and
/// DuckDB's rewrite of pgtrail's rows.
fn storage_suite(cluster: &Cluster, rt: &tokio::runtime::Runtime, args: &Args, results: &mut Vec<Measurement>) -> anyhow::Result<()> {
    let rows: u64 = if args.quick { 20_000 } else { 1_000_000 };
    let changes = rows + rows / 4 + rows / 8;
    let workload = format!("{changes} changes (200-byte rows: insert, update 1/4, delete 1/8)");
    // Sizes are deterministic up to page fill: one repetition is the measurement.
    let db = cluster.fresh_database("bench_storage")?;
    cluster.psql(&db, "CREATE TABLE bench (id bigint PRIMARY KEY, payload text, n bigint)")?;
    cluster.psql(&db, AUDIT_TRIGGER_SQL)?;
    let dir = tempfile::tempdir()?;
    let archive = dir.path().join("archive");
    let mut config = bench_capture(cluster, &db, &archive)?;
    config.stop_at = Some(cluster.psql(&db, "SELECT pg_current_wal_insert_lsn()")?.parse::<Lsn>()?);
    rt.block_on(pgtrail_capture::run(config.clone(), std::future::pending(), |_| {}))?;
    for statement in backlog_sql(rows) {
        cluster.psql(&db, &statement)?;
    }
    let mut c = config;
    c.stop_at = Some(cluster.psql(&db, "SELECT pg_current_wal_insert_lsn()")?.parse::<Lsn>()?);
    let summary = rt.block_on(pgtrail_capture::run(c, std::future::pending(), |_| {}))?;
    if summary.changes < changes {
        bail!("pgtrail stored {} changes, expected {changes}", summary.changes);
    }
    let log = pgtrail_store::ChangeLog::open(&archive)?;
    pgtrail_store::Compactor::new(log.database(), &archive, pgtrail_store::CompactOptions::default()).run()?;
    drop(log);
    let (_db, reader) = pgtrail_store::LogReader::open(&archive)?;
    let manifest = reader.manifest()?;
    let segment_bytes: u64 = manifest.segments.iter().map(|s| s.bytes).sum();
    let audited: u64 = cluster.psql(&db, "SELECT count(*) FROM audit_log")?.parse()?;
    if audited != changes {
        bail!("the audit trigger recorded {audited} changes, expected {changes}");
    }
    let trigger_bytes: u64 = cluster.psql(&db, "SELECT pg_total_relation_size('audit_log')")?.parse()?;
    cluster.psql(&db, BEMI_SQL)?;
    cluster.psql(&db, "VACUUM ANALYZE bemi_changes")?;
    let bemi_bytes: u64 = cluster.psql(&db, "SELECT pg_total_relation_size('bemi_changes')")?.parse()?;
    let mut sizes: Vec<(&'static str, u64)> = vec![("pgtrail", segment_bytes), ("trigger", trigger_bytes), ("bemi-style", bemi_bytes)];
    if has_duckdb() {
        let rewrite = dir.path().join("rewrite.parquet");
        let script = "import sys, duckdb; duckdb.sql(\"COPY (SELECT * FROM read_parquet('%s/*.parquet') ORDER BY lsn, seq) TO '%s' (FORMAT parquet, COMPRESSION zstd)\" % (sys.argv[1], sys.argv[2]))";
        let status = std::process::Command::new("python3")
            .args(["-c", script])
            .arg(archive.join(pgtrail_store::SEGMENTS_DIR))
            .arg(&rewrite)
            .status()?;
        if !status.success() {
            bail!("the DuckDB rewrite failed");
        }
        sizes.push(("duckdb-rewrite", std::fs::metadata(&rewrite)?.len()));
    }
    for (contestant, bytes) in sizes {
        eprintln!("storage: {contestant} keeps {changes} changes in {bytes} bytes ({:.1} bytes/change)", bytes as f64 / changes as f64);
        results.push(Measurement {
            suite: "storage",
            contestant,
            workload: workload.clone(),
            rep: 0,
            metric: "bytes_per_change",
            value: bytes as f64 / changes as f64,
            unit: "bytes/change",
        });
    }
    cluster.psql(&db, "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = current_database()")?;
    if std::env::var_os("PGTRAIL_BENCH_KEEP").is_some() {
        eprintln!("storage: files kept in {}", dir.keep().display());
    }
    Ok(())
}

fn median_min_max(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn print_report(results: &[Measurement], version: &str, args: &Args) -> anyhow::Result<()> {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().next().and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse::<u64>().ok()))
        .unwrap_or(0);
    println!("## pgtrail-bench{}", if args.quick { " (--quick: tiny data, not a measurement)" } else { "" });
    println!();
    println!("Machine: {cores} cores, {} GiB memory; PostgreSQL {version}; {} repetitions, median (min-max).", mem_kib >> 20, args.reps);
    println!("Server settings: {}", SETTINGS.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(", "));
    println!();
    println!("| suite | workload | contestant | metric | median | min-max |");
    println!("|---|---|---|---|---|---|");
    let mut keys: Vec<(&str, &str, &str)> = Vec::new();
    for m in results {
        if !keys.contains(&(m.suite, m.contestant, m.metric)) {
            keys.push((m.suite, m.contestant, m.metric));
        }
    }
    let mut medians = std::collections::BTreeMap::new();
    for (suite, contestant, metric) in keys {
        let values: Vec<f64> = results
            .iter()
            .filter(|m| m.suite == suite && m.contestant == contestant && m.metric == metric)
            .map(|m| m.value)
            .collect();
        let workload = &results.iter().find(|m| m.suite == suite).map(|m| m.workload.clone()).unwrap_or_default();
        let (med, lo, hi) = median_min_max(values);
        medians.insert((suite, contestant), med);

        println!("| {suite} | {workload} | {contestant} | {metric} | {med:.1} | {lo:.1}-{hi:.1} |");
    }
    println!();
    if let (Some(p), Some(r)) = (medians.get(&("decode", "pgtrail")), medians.get(&("decode", "pg_recvlogical"))) {
        println!("Ratio decode: pgtrail changes/s (durable in redb) / pg_recvlogical changes/s (to a file) = **{:.2}**", p / r);
    }
    if let Some(p) = medians.get(&("storage", "pgtrail")) {
        if let Some(t) = medians.get(&("storage", "trigger")) {
            println!("Ratio storage: trigger table bytes / pgtrail Parquet bytes = **{:.1}** (goal >= 5)", t / p);
        }
        if let Some(b) = medians.get(&("storage", "bemi-style")) {
            println!("Ratio storage: Bemi-style table bytes / pgtrail Parquet bytes = **{:.1}** (goal >= 8)", b / p);
        }
        if let Some(d) = medians.get(&("storage", "duckdb-rewrite")) {
            println!("Ratio storage: pgtrail Parquet bytes / DuckDB zstd rewrite bytes = **{:.2}** (goal <= 1.10)", p / d);
        }
    }
    Ok(())
}
