//! `pgtrail export`: hand the archive's history to a data lake (a directory or S3) in the
//! `changes`, `cdf`, `scd2` or `snapshot` layout, incrementally and exactly once.

use std::path::PathBuf;

use anyhow::Context as _;
use datafusion::arrow::datatypes::{DataType, TimeUnit};
use datafusion::common::ScalarValue;
use pgtrail_query::Moment;
use pgtrail_query::export::{ExportRequest, Layout, TableFormat};
use pgtrail_store::Lsn;

#[derive(clap::Args)]
pub struct ExportArgs {
    /// Archive directory.
    #[arg(long, env = "PGTRAIL_ARCHIVE")]
    archive: PathBuf,
    /// A directory, or s3://bucket/prefix (credentials from AWS_ACCESS_KEY_ID,
    /// AWS_SECRET_ACCESS_KEY, AWS_REGION; AWS_ENDPOINT_URL for an S3-compatible store).
    #[arg(long)]
    to: String,
    /// changes (the change log), cdf (change data feed), scd2 (row versions with validity),
    /// snapshot (the tables as of --until); bemi (Bemi's `changes` table, with --to a
    /// PostgreSQL connection string).
    #[arg(long, value_parser = ["changes", "cdf", "scd2", "snapshot", "bemi"])]
    layout: String,
    /// With --layout bemi: the table to keep (created with Bemi's columns and indexes if
    /// missing; its export state goes beside it in _pgtrail_export_state).
    #[arg(long, default_value = "public.changes")]
    bemi_table: String,
    /// Tables to export (as PostgreSQL writes them, comma-separated); default every table.
    #[arg(long)]
    tables: Option<String>,
    /// The first export starts at this commit time or LSN (later runs continue where the
    /// last one stopped).
    #[arg(long)]
    since: Option<String>,
    /// Export up to this commit time or LSN (default: everything archived).
    #[arg(long)]
    until: Option<String>,
    /// plain (hive-partitioned Parquet files) or delta (the same files, each source table a
    /// Delta Lake table with its own transaction log).
    #[arg(long, value_parser = ["plain", "delta"], default_value = "plain")]
    table_format: String,
    /// Start a new file after this many rows.
    #[arg(long, default_value_t = 1_000_000)]
    max_rows_per_file: usize,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    json: bool,
}

/// `0/1A2B3C4` is an LSN; anything else a timestamp (`2026-11-26 12:00:00+00`; without a zone, UTC).
pub(crate) fn moment(text: &str, flag: &str) -> anyhow::Result<Moment> {
    if text.contains('/') {
        return text
            .parse::<Lsn>()
            .map(Moment::Lsn)
            .with_context(|| format!("{flag} {text:?} is not an LSN such as 0/1A2B3C4"));
    }
    let ts = ScalarValue::Utf8(Some(text.to_string()))
        .cast_to(&DataType::Timestamp(
            TimeUnit::Microsecond,
            Some("UTC".into()),
        ))
        .ok()
        .and_then(|v| match v {
            ScalarValue::TimestampMicrosecond(Some(us), _) => Some(us),
            _ => None,
        });
    ts.map(Moment::Time).with_context(|| {
        format!(
            "{flag} {text:?} is neither an LSN (0/1A2B3C4) nor a timestamp (2026-11-26 12:00:00+00)"
        )
    })
}

/// A PostgreSQL connection string (URL or `key=value` conninfo) rather than a directory or S3.
fn is_postgresql(to: &str) -> bool {
    to.starts_with("postgresql://")
        || to.starts_with("postgres://")
        || ["host=", "hostaddr=", "dbname=", "user=", "service="]
            .iter()
            .any(|k| to.split_whitespace().any(|w| w.starts_with(k)))
}

/// A range whose end comes before its start would export nothing and say so quietly; it is
/// refused instead (both as LSNs, or both as times).
fn check_range(since: Option<&Moment>, until: Option<&Moment>) -> anyhow::Result<()> {
    let after = match (since, until) {
        (Some(Moment::Lsn(a)), Some(Moment::Lsn(b))) => a > b,
        (Some(Moment::Time(a)), Some(Moment::Time(b))) => a > b,
        _ => false,
    };
    if after {
        anyhow::bail!("--since is after --until: nothing would be exported; swap them");
    }
    Ok(())
}

pub async fn run(args: ExportArgs) -> anyhow::Result<()> {
    match (is_postgresql(&args.to), args.layout == "bemi") {
        (true, true) => return run_bemi(args).await,
        (true, false) => anyhow::bail!(
            "--to is a PostgreSQL connection string: the layout that goes into PostgreSQL is --layout bemi (Bemi's changes table); the {} layout goes to a directory or s3://bucket/prefix",
            args.layout
        ),
        (false, true) => anyhow::bail!(
            "--layout bemi keeps a table in PostgreSQL: give --to as a connection string (postgresql://user@host/db)"
        ),
        (false, false) => {}
    }
    let request = ExportRequest {
        archive: args.archive,
        destination: args.to,
        layout: Layout::parse(&args.layout).context("--layout")?,
        tables: args
            .tables
            .as_deref()
            .map(pgtrail_store::split_table_list)
            .unwrap_or_default(),
        since: args
            .since
            .as_deref()
            .map(|s| moment(s, "--since"))
            .transpose()?,
        until: args
            .until
            .as_deref()
            .map(|s| moment(s, "--until"))
            .transpose()?,
        max_rows_per_file: args.max_rows_per_file.max(1),
        table_format: TableFormat::parse(&args.table_format).context("--table-format")?,
    };
    check_range(request.since.as_ref(), request.until.as_ref())?;
    let handle = tokio::runtime::Handle::current();
    // Reading segments and writing Parquet is blocking work; the destination's requests run
    // on this runtime through `handle`.
    let report = tokio::task::spawn_blocking(move || {
        pgtrail_query::export::export(&request, &handle, &mut |line| eprintln!("export: {line}"))
    })
    .await
    .context("the export thread failed")??;
    let rows: u64 = report.tables.iter().map(|t| t.rows).sum();
    let bytes: u64 = report.tables.iter().map(|t| t.bytes).sum();
    let files: usize = report.tables.iter().map(|t| t.files.len()).sum();
    eprintln!(
        "export: {} layout to {}: {} tables, {rows} rows, {files} files, {bytes} bytes in {:.1} s ({:.0} rows/s){}",
        report.layout,
        report.destination,
        report.tables.len(),
        report.seconds,
        rows as f64 / report.seconds.max(1e-6),
        if report.resumed {
            ", after finishing an interrupted export"
        } else {
            ""
        }
    );
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(())
}

async fn run_bemi(args: ExportArgs) -> anyhow::Result<()> {
    if args.tables.is_some() {
        anyhow::bail!(
            "--tables does not apply to --layout bemi: Bemi's changes table holds every table's changes"
        );
    }
    if args.table_format != "plain" {
        anyhow::bail!("--table-format does not apply to --layout bemi (a PostgreSQL table)");
    }
    let since = args
        .since
        .as_deref()
        .map(|s| moment(s, "--since"))
        .transpose()?;
    let until = args
        .until
        .as_deref()
        .map(|s| moment(s, "--until"))
        .transpose()?;
    check_range(since.as_ref(), until.as_ref())?;
    let target = crate::export_bemi::BemiTarget {
        url: args.to,
        table: args.bemi_table,
    };
    let report = crate::export_bemi::run(&args.archive, &target, since, until).await?;
    eprintln!(
        "export: bemi layout to {}: {} changes after LSN {} through {} in {:.1} s",
        target.table, report.rows, report.from, report.through, report.seconds
    );
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "layout": "bemi",
                "table": target.table,
                "rows": report.rows,
                "from_lsn": report.from.to_string(),
                "until_lsn": report.through.to_string(),
                "seconds": report.seconds,
            })
        );
    }
    Ok(())
}
