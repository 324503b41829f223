//! `pgtrail`: capture PostgreSQL row changes into a local archive, compact it into Parquet, and query it offline with SQL.

mod capture_metrics;
mod compact;
mod demo;
mod evidence;
mod export;
mod export_bemi;
mod keygen;
mod restore;
mod retention;
mod revert;
mod serve;
mod sql;
mod status;
mod tail;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use pgtrail_capture::{CaptureConfig, CaptureError, Progress, SourceConfig};
use pgtrail_store::Lsn;
use pgtrail_store::evidence::retention::RetentionPolicy;

#[derive(Parser)]
#[command(
    name = "pgtrail",
    version,
    about = "A verifiable, queryable history of every row change of a PostgreSQL database"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Stream every committed row change from PostgreSQL into an archive directory.
    Capture(CaptureArgs),
    /// Summarise an archive: changes per table, LSN and time range, segments, size, gaps, slot lag.
    Status(StatusArgs),
    /// Move the log's finished transactions into Parquet segments now, and merge small segments.
    Compact(compact::CompactArgs),
    /// List the keyframes (tables' rows at a point, where as_of starts), or write them again.
    Keyframes(compact::KeyframesArgs),
    /// Run SQL over an archive, offline (history tables, `changes`, as_of, diff, row_history).
    Sql(sql::SqlArgs),
    /// Print every change after a cursor as JSON lines, in commit order; with --follow, go on
    /// with each change as capture makes it durable (resumable from any line's cursor).
    Tail(tail::TailArgs),
    /// Serve the history over HTTP: a web page, a JSON API, a live stream (SSE) and metrics,
    /// read-only, beside a running capture.
    Serve(serve::ServeArgs),
    /// Export the history to a directory or S3 as Parquet (changes, cdf, scd2 or snapshot layout), incrementally.
    Export(export::ExportArgs),
    /// Start a throwaway PostgreSQL, run a small shop workload, capture it and show the status.
    Demo(DemoArgs),
    /// Install in the source an event trigger that publishes each new table with a primary key
    /// in the transaction that creates it: capture then holds it from its first row (needs a
    /// superuser).
    Setup(SetupArgs),
    /// Make a key to sign the archive's checkpoints with: the signing key goes to a file only
    /// its owner can read, the verifier key (for auditors) to standard output.
    Keygen(keygen::KeygenArgs),
    /// Compact the log now and sign a checkpoint of the archive's evidence tree.
    Checkpoint(evidence::CheckpointArgs),
    /// Prove the archive complete and unaltered: recompute every leaf, the tree and its root
    /// from the segments and check them against signed checkpoints (exit 1 when anything is wrong).
    Verify(evidence::VerifyArgs),
    /// Print the proof (C2SP tlog-proof) that one change is in the tree a signed checkpoint pins.
    Prove(evidence::ProveArgs),
    /// Write an auditor bundle: the changes of some tables over an LSN range, with the proof
    /// that they are complete for that scope and included in a signed checkpoint.
    Bundle(evidence::BundleArgs),
    /// Print a signed coverage certificate: that the archive holds every change of some tables
    /// over an LSN range (or which gaps it knows of there), bound to the latest checkpoint.
    Certify(evidence::CertifyArgs),
    /// For auditors and witnesses: verify the archive against a checkpoint and print the
    /// checkpoint cosigned (C2SP cosignature/v1) with your key.
    Cosign(evidence::CosignArgs),
    /// Erase values of archived changes (the context, before and after images but their key
    /// columns), keeping the evidence whole: each change's leaf keeps the erased parts' digests.
    Redact(evidence::RedactArgs),
    /// Erase the history of some tables before a position (a retention policy), keeping what
    /// each table held there: of each row that exists at the position, its last change keeps
    /// its after image. One receipt leaf records the purge.
    Purge(retention::PurgeArgs),
    /// Place a legal hold over some tables and an LSN range (redact and purge refuse what it
    /// covers), release one, or list them. Each is a leaf of the tree.
    Hold(retention::HoldArgs),
    /// Undo the changes of a transaction, a request (its context) or a time range in the
    /// source, newest first, after checking under lock that nothing changed those rows since
    /// (dry run unless --apply).
    Revert(revert::RevertArgs),
    /// Load tables as they were at one moment into PostgreSQL (new tables, replaced ones, or
    /// existing ones emptied and refilled), with COPY, in one transaction.
    Restore(restore::RestoreArgs),
}

#[derive(clap::Args)]
struct SetupArgs {
    /// Source database, as for `capture` (a superuser: CREATE EVENT TRIGGER needs one).
    #[arg(long, env = "PGTRAIL_SOURCE", hide_env_values = true)]
    source: Option<String>,
    /// The publication the capture uses (pgtrail's own, created by its first run).
    #[arg(long, default_value = "pgtrail")]
    publication: String,
    /// The capture's --tables (names, patterns, !exclusions, comma-separated): the trigger
    /// publishes only the new tables they take in. Default: every new table with a primary
    /// key. A capture whose --tables differ refuses to run (it would archive tables it
    /// leaves out).
    #[arg(long)]
    tables: Option<String>,
    /// Take the trigger out instead.
    #[arg(long)]
    remove: bool,
    /// Print the SQL instead of running it (for a DBA to review and run as a superuser).
    #[arg(long)]
    print_sql: bool,
}

#[derive(clap::Args)]
struct CaptureArgs {
    /// Source database, as libpq takes it: a URL (postgresql://user@host:5432/db?sslmode=verify-full)
    /// or key=value settings ("host=h dbname=db"). Omitted: the PG* variables, service file and
    /// ~/.pgpass alone, as for psql.
    #[arg(long, env = "PGTRAIL_SOURCE", hide_env_values = true)]
    source: Option<String>,
    /// Archive directory (created 0700 if missing).
    #[arg(long, env = "PGTRAIL_ARCHIVE")]
    archive: PathBuf,
    /// Replication slot name (lower case letters, digits and `_`, as PostgreSQL allows).
    #[arg(long, default_value = "pgtrail", value_parser = slot_name)]
    slot: String,
    /// Publication name.
    #[arg(long, default_value = "pgtrail")]
    publication: String,
    /// Tables to capture, comma-separated: names as PostgreSQL parses them
    /// (public.orders,public."Odd Name"), patterns (public.*, billing.invoice_*), and
    /// exclusions (!public.audit_*). Default: every table with a primary key or REPLICA
    /// IDENTITY FULL / USING INDEX, including tables created later.
    #[arg(long)]
    tables: Option<String>,
    /// Seconds between looks at the catalog for tables created (or given a key) while
    /// capture runs; each is copied in step with the stream and captured from then on.
    #[arg(long, default_value_t = 5)]
    catalog_secs: u64,
    /// After a gap was detected: record it, create a new slot and take a new snapshot.
    #[arg(long)]
    resnapshot: bool,
    /// Stop cleanly once everything up to this LSN is durable (e.g. 0/1A2B3C4).
    #[arg(long)]
    stop_at: Option<String>,
    /// Seconds between progress lines on stderr.
    #[arg(long, default_value_t = 5)]
    progress_secs: u64,
    /// Seconds the replication stream may stay silent before the source is asked whether the
    /// connection still works; a dead one (network black hole) is replaced. Also the limit for
    /// connecting.
    #[arg(long, default_value_t = 30)]
    stream_timeout_secs: u64,
    /// Compact in the background once the log holds this many changes ...
    #[arg(long, default_value_t = 200_000)]
    compact_after_changes: u64,
    /// ... or once its oldest change is this many seconds old.
    #[arg(long, default_value_t = 300)]
    compact_after_secs: u64,
    /// Never compact while capturing (run `pgtrail compact` yourself).
    #[arg(long)]
    no_compact: bool,
    /// Retention while capturing: TABLES=AGE (tables comma-separated, an age such as 90d,
    /// 12h, 2w; repeat for other ages) purges those tables' history older than the age, as
    /// `pgtrail purge` does, keeping what each row held at the cut. Changes under a legal hold
    /// stay whole.
    #[arg(long = "retain", value_name = "TABLES=AGE")]
    retain: Vec<pgtrail_store::evidence::retention::RetentionRule>,
    /// Seconds between retention runs (the first comes at start); each verifies the archive.
    #[arg(long, default_value_t = 3600)]
    retain_every_secs: u64,
    /// Why the history goes (each purge's receipt keeps it, with the rule).
    #[arg(long, default_value = "retention policy")]
    retain_reason: String,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9187): counts, the
    /// durable LSN, lag, whether the slot is streaming, compactions, the archive's sizes.
    /// They hold numbers only, no table data.
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
    #[command(flatten)]
    segments: compact::SegmentArgs,
}

#[derive(clap::Args)]
struct StatusArgs {
    /// Archive directory.
    #[arg(long, env = "PGTRAIL_ARCHIVE")]
    archive: PathBuf,
    /// Source URL, to report the slot's lag (optional).
    #[arg(long, env = "PGTRAIL_SOURCE", hide_env_values = true)]
    source: Option<String>,
    /// Output format: table (for people) or json (for programs).
    #[arg(long, default_value = "table", value_parser = ["table", "json"])]
    format: String,
}

#[derive(clap::Args)]
struct DemoArgs {
    /// Where to write the demo archive (replaced if it is an earlier demo archive).
    #[arg(long, default_value = "pgtrail-demo")]
    archive: PathBuf,
}

/// mimalloc instead of glibc's malloc: the capture allocates each change on the stream task and
/// frees it on the log-writer thread, and glibc's arenas spent a fifth of pgtrail's CPU on
/// that (perf, decode suite).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PGTRAIL_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Capture(args) => capture(args).await,
            Command::Status(args) => status::run(args.archive, args.source, &args.format).await,
            Command::Compact(args) => compact::run(args).await,
            Command::Keyframes(args) => compact::keyframes(args).await,
            Command::Sql(args) => sql::run(args).await,
            Command::Tail(args) => tail::run(args).await,
            Command::Serve(args) => serve::run(args).await,
            Command::Export(args) => export::run(args).await,
            Command::Demo(args) => demo::run(args.archive).await,
            Command::Setup(args) => setup(args).await,
            Command::Keygen(args) => keygen::run(args),
            Command::Checkpoint(args) => evidence::checkpoint(args).await,
            Command::Verify(args) => evidence::verify(args).await,
            Command::Prove(args) => evidence::prove(args).await,
            Command::Bundle(args) => evidence::bundle(args).await,
            Command::Certify(args) => evidence::certify(args).await,
            Command::Cosign(args) => evidence::cosign(args).await,
            Command::Redact(args) => evidence::redact(args).await,
            Command::Purge(args) => retention::purge(args).await,
            Command::Hold(args) => retention::hold(args).await,
            Command::Revert(args) => revert::run(args).await,
            Command::Restore(args) => restore::run(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e)
            if e.downcast_ref::<evidence::VerificationFailed>().is_some()
                || e.downcast_ref::<revert::Conflicts>().is_some() =>
        {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
        Err(e) => {
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) {
                return ExitCode::SUCCESS;
            }
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Resolves when SIGINT or SIGTERM arrives.
async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("stopping: finishing the batch in hand");
}

pub(crate) fn progress_line(p: &Progress) {
    eprintln!(
        "capture: {} changes ({:.0}/s), {} transactions ({:.0}/s), durable {}, lag {} bytes / {:.1} s, {} compacted{}{} ({})",
        p.changes,
        p.changes_per_sec,
        p.transactions,
        p.transactions_per_sec,
        p.durable,
        p.lag_bytes,
        p.lag_seconds,
        p.compacted,
        match (p.purged, p.retention_failures) {
            (0, 0) => String::new(),
            (n, 0) => format!(", {n} purged by retention"),
            (n, f) => format!(", {n} purged by retention ({f} retention runs failed: see the log)"),
        },
        if p.reconnects > 0 {
            format!(", {} reconnects", p.reconnects)
        } else {
            String::new()
        },
        p.security
    );
}

async fn setup(args: SetupArgs) -> anyhow::Result<()> {
    use pgtrail_capture::setup;
    let tables = args
        .tables
        .as_deref()
        .map(pgtrail_store::split_table_list)
        .unwrap_or_default();
    if args.print_sql {
        if args.remove {
            println!("{}", setup::REMOVE_SQL);
        } else {
            print!("{}", setup::install_sql(&args.publication, &tables));
        }
        return Ok(());
    }
    let source = SourceConfig::parse(args.source.as_deref().unwrap_or_default())?;
    let sql = source.connect_sql().await?;
    setup::run(&sql, &args.publication, &tables, args.remove).await?;
    if args.remove {
        eprintln!(
            "setup: the event trigger pgtrail_publish_new_tables is removed; new tables are found by capture's catalog watch"
        );
    } else {
        eprintln!(
            "setup: event trigger pgtrail_publish_new_tables installed in {}: each new table with a primary key{} joins publication {:?} as it is created",
            source.display(),
            if tables.is_empty() {
                String::new()
            } else {
                format!(" that --tables {} takes in", tables.join(","))
            },
            args.publication
        );
    }
    Ok(())
}

/// A replication slot name PostgreSQL accepts, checked before anything connects.
fn slot_name(name: &str) -> Result<String, String> {
    if name.is_empty()
        || name.len() > 63
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(format!(
            "{name:?} is not a replication slot name: PostgreSQL allows 1 to 63 lower case letters, digits and underscores"
        ));
    }
    Ok(name.to_string())
}

async fn capture(args: CaptureArgs) -> anyhow::Result<()> {
    let source = SourceConfig::parse(args.source.as_deref().unwrap_or_default())?;
    let tables = args
        .tables
        .as_deref()
        .map(pgtrail_store::split_table_list)
        .unwrap_or_default();
    let stop_at = args
        .stop_at
        .as_deref()
        .map(|s| s.parse::<Lsn>())
        .transpose()
        .context("--stop-at")?;
    let mut config = CaptureConfig {
        source,
        archive: args.archive,
        slot: args.slot,
        publication: args.publication,
        tables,
        resnapshot: args.resnapshot,
        progress_interval: Duration::from_secs(args.progress_secs.max(1)),
        stream_timeout: Duration::from_secs(args.stream_timeout_secs.max(2)),
        durable_observer: None,
        stop_at,
        catalog_interval: Duration::from_secs(args.catalog_secs.max(1)),
        compaction: match args.no_compact {
            true => None,
            false => Some(pgtrail_capture::CompactionPolicy {
                options: args.segments.options()?,
                min_changes: args.compact_after_changes.max(1),
                max_age: Duration::from_secs(args.compact_after_secs),
                retention: (!args.retain.is_empty()).then(|| RetentionPolicy {
                    rules: args.retain.clone(),
                    reason: args.retain_reason.clone(),
                    every: Duration::from_secs(args.retain_every_secs.max(1)),
                }),
                ..Default::default()
            }),
        },
    };
    if args.no_compact && !args.retain.is_empty() {
        bail!(
            "--retain purges what is compacted, and --no-compact compacts nothing while capturing: drop one of them (or run `pgtrail purge` after `pgtrail compact`)"
        );
    }
    if args.retain_reason.trim().is_empty() {
        bail!("--retain-reason must say why (each purge's receipt keeps it)");
    }
    if args.no_compact && args.segments.signer.is_set() {
        tracing::warn!(
            "--signing-key with --no-compact: nothing is signed while capturing; run `pgtrail checkpoint` to compact and sign"
        );
    }
    let (protection, warn) = config.source.protection();
    tracing::info!(source = %config.source.display(), archive = %config.archive.display(), %protection, "capture starting");
    if warn {
        tracing::warn!(
            "the connection to {} is not verified: {protection}",
            config.source.display()
        );
    }
    // With metrics on, progress is taken every second (the metrics stay fresh) and printed
    // every --progress-secs as before.
    let metrics = match args.metrics_listen {
        Some(listen) => Some(
            capture_metrics::start(listen, config.archive.clone(), std::future::pending()).await?,
        ),
        None => None,
    };
    let print_every = config.progress_interval;
    if metrics.is_some() {
        config.progress_interval = Duration::from_secs(1);
    }
    let mut printed = std::time::Instant::now();
    let on_progress = move |p: &Progress| {
        if let Some(latest) = &metrics {
            latest.update(p);
        }
        // A session that ended is reported at once (streaming false); lines keep their pace.
        if p.streaming && printed.elapsed() + Duration::from_millis(100) >= print_every {
            printed = std::time::Instant::now();
            progress_line(p);
        }
    };
    match pgtrail_capture::run(config, shutdown_signal(), on_progress).await {
        Ok(summary) => {
            eprintln!(
                "capture stopped: {} changes in {} transactions stored, {} replayed transactions skipped, durable through {}, {} changes compacted",
                summary.changes,
                summary.transactions,
                summary.duplicates_skipped,
                summary.durable,
                summary.compacted
            );
            Ok(())
        }
        Err(e) => Err(explain(e)),
    }
}

fn explain(e: CaptureError) -> anyhow::Error {
    let kind = e.kind();
    anyhow::Error::new(e).context(match kind {
        pgtrail_capture::ErrorKind::Setup => "capture cannot start with this configuration",
        pgtrail_capture::ErrorKind::Fatal => "capture stopped to protect the archive",
        pgtrail_capture::ErrorKind::Transient => "capture could not reach the source (check the URL and that PostgreSQL runs there; once connected, capture reconnects by itself)",
    })
}

#[cfg(test)]
mod tests {
    /// Clap checks a command line's definition only when it is parsed: two arguments of one
    /// command with the same name panic at the first run of that command, not at build time.
    #[test]
    fn every_command_line_is_well_formed() {
        use clap::CommandFactory as _;
        super::Cli::command().debug_assert();
    }
}
