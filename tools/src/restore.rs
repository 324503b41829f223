//! `pgtrail restore`: load tables as they were at one moment into a PostgreSQL database (the
//! source or another), with COPY, in one transaction.
//!
//! Every table is rebuilt from the archive at the same moment (one read of the archive), and
//! the target sees all of them or none: the DDL, the TRUNCATE and the COPYs are one
//! transaction, and a failure anywhere rolls it back. A dry run does all of it and rolls back.

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use futures_util::SinkExt as _;
use pgtrail_query::restore::{TableAt, create_table, table_at};
use pgtrail_query::{ArchiveSnapshot, Moment, is_not_held_at_moment};
use pgtrail_store::always_quoted;

#[derive(clap::Args)]
pub struct RestoreArgs {
    /// Archive directory.
    #[arg(long, env = "PGTRAIL_ARCHIVE")]
    pub archive: PathBuf,
    /// A table to restore, by the name it bore at the moment (repeatable; comma lists too).
    #[arg(long = "table", required_unless_present = "all_tables")]
    pub tables: Vec<String>,
    /// Every table the archive holds that existed at the moment.
    #[arg(long, conflicts_with = "tables")]
    pub all_tables: bool,
    /// The moment: a time (2026-11-24T10:00:00Z; without a zone, UTC): every transaction
    /// committed at or before it.
    #[arg(
        long,
        required_unless_present = "as_of_lsn",
        conflicts_with = "as_of_lsn"
    )]
    pub as_of: Option<String>,
    /// The moment as a commit LSN: every transaction committed at or before it.
    #[arg(long)]
    pub as_of_lsn: Option<String>,
    /// The database to load into, as libpq takes it (the source or another one).
    #[arg(long, env = "PGTRAIL_RESTORE_INTO", hide_env_values = true)]
    pub into: String,
    /// The schema to put the tables in (created if missing). Default: each table's own.
    #[arg(long)]
    pub target_schema: Option<String>,
    /// `create`: new tables with the schema in force at the moment (refused if one exists);
    /// `replace`: drop the existing table and create it anew; `truncate-and-load`: keep the
    /// existing tables (their columns must be the archived ones) and replace their rows.
    #[arg(long, default_value = "create", value_parser = ["create", "replace", "truncate-and-load"])]
    pub mode: String,
    /// Do everything in a transaction and roll it back: checks the target and the data, keeps
    /// nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// Bytes of COPY text sent at a time.
const COPY_CHUNK: usize = 1 << 20;

pub async fn run(args: RestoreArgs) -> anyhow::Result<()> {
    let moment = match (&args.as_of, &args.as_of_lsn) {
        (Some(t), _) => {
            let m: Moment = t.parse().map_err(|e| anyhow::anyhow!("--as-of: {e}"))?;
            if matches!(m, Moment::Lsn(_)) {
                bail!("--as-of {t}: that is an LSN; give it with --as-of-lsn");
            }
            m
        }
        (None, Some(l)) => Moment::Lsn(l.parse().map_err(|e| anyhow::anyhow!("--as-of-lsn: {e}"))?),
        (None, None) => bail!("give the moment with --as-of TIME or --as-of-lsn LSN"),
    };
    let target = pgtrail_capture::SourceConfig::parse(&args.into)?;
    let names: Vec<String> = args
        .tables
        .iter()
        .flat_map(|t| pgtrail_store::split_table_list(t))
        .collect();
    let dir = args.archive.clone();
    let all = args.all_tables;
    // The archive side runs on a blocking thread: it reads segments.
    let (tables, types) = tokio::task::spawn_blocking(
        move || -> anyhow::Result<(Vec<TableAt>, pgtrail_store::TypeNames)> {
            let archive = ArchiveSnapshot::open(&dir)?;
            let chosen: Vec<&pgtrail_query::TableHistory> = if all {
                archive.tables.values().collect()
            } else {
                names
                    .iter()
                    .map(|n| archive.table_at(n, moment))
                    .collect::<Result<_, _>>()?
            };
            let mut out = Vec::new();
            for table in chosen {
                match table_at(&archive, table, moment) {
                    Ok(t) => {
                        eprintln!(
                            "restore: {} at {moment}: {} row(s)",
                            t.version.qualified_name(),
                            t.len()
                        );
                        out.push(t);
                    }
                    // With --all-tables, a table the archive does not hold at the moment
                    // (dropped before it, or held only from later on) is not restored; the
                    // reason is said.
                    Err(pgtrail_query::restore::RestoreError::DataFusion(e))
                        if all && is_not_held_at_moment(&e) =>
                    {
                        eprintln!("restore: {} skipped: {e}", table.qualified_name());
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Ok((out, archive.types.clone()))
        },
    )
    .await??;
    if tables.is_empty() {
        bail!("no table existed at {moment}: nothing to restore");
    }

    let mut client = target.connect_sql().await?;
    let tx = client
        .transaction()
        .await
        .context("cannot begin a transaction in the target")?;
    let place = |t: &TableAt| {
        let schema = args.target_schema.as_deref().unwrap_or(&t.version.schema);
        (schema.to_string(), t.version.name.clone())
    };
    // Every table's columns to load, checked before anything is written.
    let mut plans: Vec<(String, Vec<usize>)> = Vec::new();
    for t in &tables {
        let (schema, name) = place(t);
        let qualified = format!("{}.{}", always_quoted(&schema), always_quoted(&name));
        let exists: bool = tx
            .query_one(
                "SELECT to_regclass(quote_ident($1) || '.' || quote_ident($2)) IS NOT NULL",
                &[&schema, &name],
            )
            .await?
            .get(0);
        let all_columns: Vec<usize> = (0..t.version.columns.len()).collect();
        match args.mode.as_str() {
            "create" | "replace" => {
                if exists && args.mode == "create" {
                    bail!(
                        "{qualified} exists in the target: restore into another --target-schema, or use --mode replace (drops it) or --mode truncate-and-load (keeps its definition)"
                    );
                }
                let ddl = create_table(&t.version, &schema, &name, &types);
                if ddl.contains("unknown type (oid") {
                    bail!(
                        "{qualified}: a column's type is not known by name to the archive, so the table cannot be created; create it yourself and use --mode truncate-and-load"
                    );
                }
                tx.batch_execute(&format!(
                    "CREATE SCHEMA IF NOT EXISTS {}",
                    always_quoted(&schema)
                ))
                .await?;
                if exists {
                    tx.batch_execute(&format!("DROP TABLE {qualified}"))
                        .await
                        .with_context(|| format!("cannot drop {qualified} to replace it"))?;
                }
                tx.batch_execute(&ddl)
                    .await
                    .with_context(|| format!("cannot create {qualified}: {ddl}"))?;
                plans.push((qualified, all_columns));
            }
            _ => {
                if !exists {
                    bail!(
                        "{qualified} does not exist in the target: --mode truncate-and-load keeps an existing table; use --mode create"
                    );
                }
                let rows = tx
                    .query(
                        "SELECT attname::text, attgenerated <> '' FROM pg_attribute \
                         WHERE attrelid = to_regclass(quote_ident($1) || '.' || quote_ident($2)) \
                           AND attnum > 0 AND NOT attisdropped",
                        &[&schema, &name],
                    )
                    .await?;
                let target_columns: Vec<(String, bool)> =
                    rows.iter().map(|r| (r.get(0), r.get(1))).collect();
                let archived: Vec<&str> =
                    t.version.columns.iter().map(|c| c.name.as_str()).collect();
                let missing: Vec<&str> = archived
                    .iter()
                    .copied()
                    .filter(|a| !target_columns.iter().any(|(n, _)| n == a))
                    .collect();
                let extra: Vec<&str> = target_columns
                    .iter()
                    .filter(|(n, generated)| !generated && !archived.contains(&n.as_str()))
                    .map(|(n, _)| n.as_str())
                    .collect();
                if !missing.is_empty() || !extra.is_empty() {
                    bail!(
                        "{qualified}'s columns are not the archived ones at {moment} (missing in the target: {}; only in the target: {}); use --mode replace or create",
                        list(&missing),
                        list(&extra)
                    );
                }
                let written: Vec<usize> = all_columns
                    .into_iter()
                    .filter(|&i| {
                        !target_columns
                            .iter()
                            .any(|(n, g)| *g && *n == t.version.columns[i].name)
                    })
                    .collect();
                plans.push((qualified, written));
            }
        }
    }
    if args.mode == "truncate-and-load" {
        // One TRUNCATE of them all: foreign keys among them do not stop it.
        let all: Vec<&str> = plans.iter().map(|(q, _)| q.as_str()).collect();
        tx.batch_execute(&format!("TRUNCATE {}", all.join(", ")))
            .await
            .context("cannot empty the tables to load")?;
    }
    for (t, (qualified, columns)) in tables.iter().zip(&plans) {
        let list: Vec<String> = columns
            .iter()
            .map(|&i| always_quoted(&t.version.columns[i].name))
            .collect();
        let sink = tx
            .copy_in(&format!(
                "COPY {qualified} ({}) FROM STDIN",
                list.join(", ")
            ))
            .await
            .with_context(|| format!("cannot COPY into {qualified}"))?;
        futures_util::pin_mut!(sink);
        for chunk in t.copy_chunks(columns, COPY_CHUNK) {
            sink.send(Bytes::from(chunk)).await?;
        }
        let loaded = sink
            .finish()
            .await
            .with_context(|| format!("the target refused the rows of {qualified}"))?;
        eprintln!("restore: loaded {loaded} row(s) into {qualified}");
    }
    if args.dry_run {
        tx.rollback().await?;
        println!(
            "dry run: {} table(s) at {moment} loaded and rolled back; nothing was kept",
            tables.len()
        );
        return Ok(());
    }
    tx.commit()
        .await
        .context("the target refused to commit; nothing was restored")?;
    for (t, (qualified, _)) in tables.iter().zip(&plans) {
        println!("{qualified}: {} row(s) as of {moment}", t.len());
    }
    Ok(())
}

fn list(names: &[&str]) -> String {
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}
