//! `pgtrail export --to postgresql://… --layout bemi`: keep a PostgreSQL table with Bemi's
//! `changes` schema up to date from the archive, so that the read helpers of Bemi's ORM
//! packages work unchanged against it.
//!
//! Exactly once: a run's rows and the run's end (`through_lsn`, in a state table beside the
//! changes table) are written in one PostgreSQL transaction, which first locks the state row.
//! A crash or an error anywhere before COMMIT rolls both back; after it both are durable, and
//! the next run starts after `through_lsn`. Two exports into one table wait for each other.

use std::path::Path;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::datatypes::{TimestampMicrosecondType, UInt32Type, UInt64Type};
use futures_util::{SinkExt as _, StreamExt as _};
use pgtrail_query::Moment;
use pgtrail_query::restore::copy_value;
use pgtrail_store::segment::format_utc_micros;
use pgtrail_store::{Lsn, always_quoted};

/// The columns written, in COPY order (`id` takes its default).
const COLUMNS: &str = r#""created_at", "primary_key", "before", "after", "context", "database", "schema", "table", "operation", "committed_at", "queued_at", "transaction_id", "position", "pgtrail_seq""#;

/// Bytes of COPY text sent at a time.
const COPY_CHUNK: usize = 1 << 20;

/// Where the changes go: `schema.table` as given (default `public.changes`).
pub struct BemiTarget {
    pub url: String,
    pub table: String,
}

fn split_table(name: &str) -> anyhow::Result<(String, String)> {
    match pgtrail_store::parse_qualified(name) {
        Some((schema, table)) => Ok((schema.unwrap_or_else(|| "public".into()), table)),
        None => bail!("--bemi-table {name:?}: write schema.table, e.g. public.changes"),
    }
}

/// Bemi's `changes` table (BemiHQ/bemi core migrations through 20240409135627: columns,
/// types, defaults and indexes), with the differences the README lists: `primary_key` is
/// text, `queued_at` may be NULL, `operation` may also be `SNAPSHOT`, and `pgtrail_seq` with
/// the unique (position, pgtrail_seq) replaces the unique (position, table, schema, database,
/// operation).
fn create_sql(schema: &str, table: &str) -> String {
    let t = format!("{}.{}", always_quoted(schema), always_quoted(table));
    let name = |suffix: &str| always_quoted(&format!("{table}_{suffix}"));
    format!(
        "CREATE SCHEMA IF NOT EXISTS {s};
CREATE TABLE IF NOT EXISTS {t} (
  \"id\" uuid NOT NULL DEFAULT gen_random_uuid(),
  \"created_at\" timestamptz NOT NULL,
  \"primary_key\" text NULL,
  \"after\" jsonb NOT NULL DEFAULT '{{}}',
  \"context\" jsonb NOT NULL DEFAULT '{{}}',
  \"database\" varchar(255) NOT NULL,
  \"schema\" varchar(255) NOT NULL,
  \"table\" varchar(255) NOT NULL,
  \"operation\" text NOT NULL CHECK (\"operation\" IN ('CREATE', 'UPDATE', 'DELETE', 'TRUNCATE', 'MESSAGE', 'SNAPSHOT')),
  \"committed_at\" timestamptz NOT NULL,
  \"queued_at\" timestamptz NULL,
  \"transaction_id\" bigint NOT NULL,
  \"position\" bigint NOT NULL,
  \"before\" jsonb NOT NULL DEFAULT '{{}}',
  \"pgtrail_seq\" bigint NOT NULL,
  CONSTRAINT {pkey} PRIMARY KEY (\"id\"),
  CONSTRAINT {unique} UNIQUE (\"position\", \"pgtrail_seq\"));
CREATE INDEX IF NOT EXISTS {committed} ON {t} (\"committed_at\");
CREATE INDEX IF NOT EXISTS {pk} ON {t} (\"primary_key\");
CREATE INDEX IF NOT EXISTS {before} ON {t} USING GIN (\"before\" jsonb_path_ops);
CREATE INDEX IF NOT EXISTS {after} ON {t} USING GIN (\"after\" jsonb_path_ops);
CREATE INDEX IF NOT EXISTS {context} ON {t} USING GIN (\"context\" jsonb_path_ops);
CREATE INDEX IF NOT EXISTS {tbl} ON {t} (\"table\");
CREATE INDEX IF NOT EXISTS {op} ON {t} (\"operation\");
CREATE TABLE IF NOT EXISTS {state} (
  \"target_table\" text PRIMARY KEY,
  \"source\" text NOT NULL,
  \"through_lsn\" pg_lsn NOT NULL,
  \"exported_at\" timestamptz NOT NULL);",
        s = always_quoted(schema),
        pkey = name("pkey"),
        unique = name("position_pgtrail_seq_unique"),
        committed = name("committed_at_index"),
        pk = name("primary_key_index"),
        before = name("before_index"),
        after = name("after_index"),
        context = name("context_index"),
        tbl = name("table_index"),
        op = name("operation_index"),
        state = state_table(schema),
    )
}

/// The export state beside the changes table: one row per changes table it keeps.
fn state_table(schema: &str) -> String {
    format!(
        "{}.{}",
        always_quoted(schema),
        always_quoted("_pgtrail_export_state")
    )
}

/// One batch of the `changes` view as COPY text lines.
fn copy_batch(
    batch: &RecordBatch,
    database: &str,
    created_at: &str,
    out: &mut Vec<u8>,
) -> anyhow::Result<()> {
    let text = |name: &str| {
        batch
            .column_by_name(name)
            .and_then(|c| c.as_string_opt::<i32>())
            .with_context(|| format!("the changes view has no text column {name}"))
    };
    let (pk, table, schema, op) = (
        text("primary_key")?,
        text("table")?,
        text("schema")?,
        text("operation")?,
    );
    let (before, after, context) = (text("before")?, text("after")?, text("context")?);
    let committed = batch
        .column_by_name("committed_at")
        .and_then(|c| c.as_primitive_opt::<TimestampMicrosecondType>())
        .context("committed_at")?;
    let xid = batch
        .column_by_name("transaction_id")
        .and_then(|c| c.as_primitive_opt::<UInt32Type>())
        .context("transaction_id")?;
    let lsn = batch
        .column_by_name("lsn")
        .and_then(|c| c.as_primitive_opt::<UInt64Type>())
        .context("lsn")?;
    let seq = batch
        .column_by_name("seq")
        .and_then(|c| c.as_primitive_opt::<UInt32Type>())
        .context("seq")?;
    // Bemi's images and context are `{}` where there is none.
    fn json(a: &datafusion::arrow::array::StringArray, i: usize) -> &str {
        if a.is_null(i) { "{}" } else { a.value(i) }
    }
    for i in 0..batch.num_rows() {
        let position = i64::try_from(lsn.value(i))
            .with_context(|| format!("LSN {} does not fit a bigint", Lsn(lsn.value(i))))?;
        // Numbers and times are formatted once per row; the texts are borrowed from the batch.
        let (committed_at, xid, position, seq) = (
            format_utc_micros(committed.value(i)),
            xid.value(i).to_string(),
            position.to_string(),
            seq.value(i).to_string(),
        );
        let fields: [Option<&str>; 14] = [
            Some(created_at),
            (!pk.is_null(i)).then(|| pk.value(i)),
            Some(json(before, i)),
            Some(json(after, i)),
            Some(json(context, i)),
            Some(database),
            Some(schema.value(i)),
            Some(table.value(i)),
            Some(op.value(i)),
            Some(&committed_at),
            // When the change was received is not recorded by the archive: unknown.
            None,
            Some(&xid),
            Some(&position),
            Some(&seq),
        ];
        for (n, f) in fields.into_iter().enumerate() {
            if n > 0 {
                out.push(b'\t');
            }
            copy_value(f, out);
        }
        out.push(b'\n');
    }
    Ok(())
}

/// What one run did.
pub struct BemiReport {
    pub rows: u64,
    pub from: Lsn,
    pub through: Lsn,
    pub seconds: f64,
}

pub async fn run(
    archive_dir: &Path,
    target: &BemiTarget,
    since: Option<Moment>,
    until: Option<Moment>,
) -> anyhow::Result<BemiReport> {
    let started = std::time::Instant::now();
    let (schema, table) = split_table(&target.table)?;
    let qualified = format!("{}.{}", always_quoted(&schema), always_quoted(&table));
    let config = pgtrail_capture::SourceConfig::parse(&target.url)?;
    let dir = archive_dir.to_path_buf();
    let (ctx, snapshot) = tokio::task::spawn_blocking(move || pgtrail_query::open_session(&dir))
        .await
        .context("the archive thread failed")??;
    let Some(source) = snapshot.source.clone() else {
        bail!(
            "{} has no source yet (nothing was captured into it): run pgtrail capture first",
            archive_dir.display()
        );
    };
    let source_name = format!(
        "system {} database {} slot {}",
        source.system_id, source.database, source.slot
    );
    let visible = pgtrail_query::export::visible_until(&snapshot);
    let resolve = |m: Moment| -> anyhow::Result<Lsn> {
        Ok(match m {
            Moment::Lsn(l) => l,
            Moment::Time(t) => pgtrail_query::export::lsn_at_time(&snapshot, t)?,
        })
    };
    let until = match until {
        Some(m) => resolve(m)?.min(visible),
        None => visible,
    };

    let mut client = config
        .connect_sql()
        .await
        .with_context(|| format!("cannot reach the database that keeps {qualified}"))?;
    client
        .batch_execute(&create_sql(&schema, &table))
        .await
        .with_context(|| {
            format!("cannot create {qualified} (and its export state) in the target database")
        })?;
    let missing: Vec<String> = client
        .query(
            "SELECT c FROM unnest(ARRAY['created_at', 'primary_key', 'before', 'after', 'context', \
             'database', 'schema', 'table', 'operation', 'committed_at', 'queued_at', \
             'transaction_id', 'position', 'pgtrail_seq']) c \
             WHERE NOT EXISTS (SELECT FROM pg_attribute WHERE attrelid = to_regclass($1) \
               AND attname = c AND attnum > 0 AND NOT attisdropped)",
            &[&qualified],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if !missing.is_empty() {
        bail!(
            "{qualified} exists without the column(s) {}: it is not a table pgtrail keeps (a Bemi worker's own table lacks pgtrail_seq); export into another --bemi-table",
            missing.join(", ")
        );
    }

    let tx = client
        .transaction()
        .await
        .context("cannot begin a transaction in the target")?;
    let state = state_table(&schema);
    // The state row is locked for the run: a second export into this table waits here.
    let row = tx
        .query_opt(
            &format!(
                "SELECT source, through_lsn::text FROM {state} WHERE target_table = $1 FOR UPDATE"
            ),
            &[&qualified],
        )
        .await?;
    let from = match &row {
        Some(r) => {
            let found: String = r.get(0);
            if found != source_name {
                bail!(
                    "{qualified} holds the changes of another archive (source {found}; this archive is {source_name}): export into another --bemi-table"
                );
            }
            let through: String = r.get(1);
            through
                .parse::<Lsn>()
                .map_err(|e| anyhow::anyhow!("the export state's LSN {through:?}: {e}"))?
        }
        None => match since {
            // "since X" includes X.
            Some(Moment::Lsn(l)) => Lsn(l.0.saturating_sub(1)),
            Some(Moment::Time(t)) => {
                pgtrail_query::export::lsn_at_time(&snapshot, t.saturating_sub(1))?
            }
            None => Lsn(0),
        },
    };
    if from >= until {
        tx.rollback().await?;
        return Ok(BemiReport {
            rows: 0,
            from,
            through: from,
            seconds: started.elapsed().as_secs_f64(),
        });
    }
    let created_at: String = tx.query_one("SELECT now()::text", &[]).await?.get(0);
    let sql = format!(
        "SELECT primary_key, \"table\", \"schema\", operation, before, after, context, \
         committed_at, transaction_id, lsn, seq FROM changes WHERE lsn > {} AND lsn <= {}",
        from.0, until.0
    );
    let mut stream = ctx
        .sql(&sql)
        .await
        .context("reading the changes view")?
        .execute_stream()
        .await?;
    let sink = tx
        .copy_in::<_, Bytes>(&format!("COPY {qualified} ({COLUMNS}) FROM STDIN"))
        .await
        .with_context(|| format!("cannot COPY into {qualified}"))?;
    futures_util::pin_mut!(sink);
    let mut rows = 0u64;
    let mut buffer = Vec::with_capacity(COPY_CHUNK + 4096);
    while let Some(batch) = stream.next().await {
        let batch = batch?;
        rows += batch.num_rows() as u64;
        copy_batch(&batch, &source.database, &created_at, &mut buffer)?;
        if buffer.len() >= COPY_CHUNK {
            sink.send(Bytes::from(std::mem::take(&mut buffer))).await?;
        }
        if rows % 100_000 < batch.num_rows() as u64 {
            eprintln!("export: {rows} changes sent to {qualified}");
        }
    }
    if !buffer.is_empty() {
        sink.send(Bytes::from(buffer)).await?;
    }
    sink.finish()
        .await
        .with_context(|| format!("COPY into {qualified} failed"))?;
    let through = until.to_string();
    tx.execute(
        &format!(
            "INSERT INTO {state} (target_table, source, through_lsn, exported_at) \
             VALUES ($1, $2, $3::text::pg_lsn, now()) \
             ON CONFLICT (target_table) DO UPDATE SET through_lsn = EXCLUDED.through_lsn, exported_at = now()"
        ),
        &[&qualified, &source_name, &through],
    )
    .await?;
    pgtrail_store::crashpoint::hit("bemi:before_commit");
    // The rows and the state commit together: before this line neither is visible, after it
    // both are.
    tx.commit()
        .await
        .with_context(|| format!("cannot commit the export into {qualified}"))?;
    Ok(BemiReport {
        rows,
        from,
        through: until,
        seconds: started.elapsed().as_secs_f64(),
    })
}
