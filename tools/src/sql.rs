//! `pgtrail sql`: SQL over an archive, offline, for people (aligned tables, an interactive
//! prompt) and for programs (CSV, JSON lines, Parquet).

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context as _;
use datafusion::arrow::array::RecordBatch;
use datafusion::prelude::SessionContext;

#[derive(clap::Args)]
pub struct SqlArgs {
    /// Archive directory.
    #[arg(long, env = "PGTRAIL_ARCHIVE")]
    pub archive: PathBuf,
    /// Output format: table (for people), csv, json (one object per line) or parquet.
    #[arg(long, default_value = "table", value_parser = ["table", "csv", "json", "parquet"])]
    pub format: String,
    /// Write the result here instead of stdout (required for parquet).
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// The SQL to run; without it, an interactive prompt opens.
    pub sql: Option<String>,
}

pub async fn run(args: SqlArgs) -> anyhow::Result<()> {
    let dir = args.archive.clone();
    let (ctx, _archive) = tokio::task::spawn_blocking(move || pgtrail_query::open_session(&dir))
        .await?
        .map_err(|e| match e {
            pgtrail_query::QueryError::Open { source: pgtrail_store::LogError::InUse, .. } => anyhow::anyhow!(
                "the archive is held by a process that does not share it (an older pgtrail, or one opening it for writing); stop it and retry"
            ),
            e => anyhow::Error::new(e),
        })?;
    match args.sql {
        Some(sql) => {
            let batches = execute(&ctx, &sql).await?;
            write_result(&batches, &args.format, args.output.as_ref())
        }
        None => prompt(&ctx).await,
    }
}

async fn execute(ctx: &SessionContext, sql: &str) -> anyhow::Result<Vec<RecordBatch>> {
    let frame = pgtrail_query::read_only_query(ctx, sql)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    frame.collect().await.map_err(|e| anyhow::anyhow!("{e}"))
}

fn write_result(
    batches: &[RecordBatch],
    format: &str,
    output: Option<&PathBuf>,
) -> anyhow::Result<()> {
    let Some(path) = output else {
        anyhow::ensure!(format != "parquet", "--format parquet needs --output FILE");
        write_to(std::io::stdout(), batches, format)?;
        return Ok(());
    };
    // The file appears whole or not at all: temp file, fsync, rename, fsync of the directory.
    let tmp = path.with_extension("pgtrail-tmp");
    let file =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let file = write_to(file, batches, format)?;
    file.sync_all()
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    pgtrail_store::fsync_dir(dir)?;
    Ok(())
}

/// Write the result to `sink` in `format` and hand the sink back (to be synced).
fn write_to<W: Write + Send>(
    mut sink: W,
    batches: &[RecordBatch],
    format: &str,
) -> anyhow::Result<W> {
    match format {
        "table" => {
            let text = datafusion::arrow::util::pretty::pretty_format_batches(batches)?;
            writeln!(sink, "{text}")?;
            let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
            eprintln!("({rows} row{})", if rows == 1 { "" } else { "s" });
            Ok(sink)
        }
        "csv" => Ok(pgtrail_query::output::write_csv(sink, batches)?),
        "json" => Ok(pgtrail_query::json::write_json_lines(sink, batches)?),
        "parquet" => {
            let schema = batches
                .first()
                .map(|b| b.schema())
                .context("the query returned no schema")?;
            Ok(pgtrail_query::output::write_parquet(sink, schema, batches)?)
        }
        other => anyhow::bail!("unknown format {other}"),
    }
}

/// The interactive prompt: line editing and a history file (`~/.pgtrail_history`), statements
/// ending with `;` over several lines, and `\d` commands.
async fn prompt(ctx: &SessionContext) -> anyhow::Result<()> {
    use rustyline::error::ReadlineError;
    eprintln!(
        "pgtrail sql: end statements with ';'. \\d lists tables, \\d NAME describes one, \\q quits."
    );
    let mut editor = rustyline::DefaultEditor::new().context("starting the prompt")?;
    let history = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".pgtrail_history"));
    if let Some(h) = &history {
        let _ = editor.load_history(h);
    }
    let mut statement = String::new();
    loop {
        let prompt = if statement.is_empty() {
            "pgtrail> "
        } else {
            "     ... "
        };
        // Reading a line blocks; keep it off the async workers.
        let line = match tokio::task::block_in_place(|| editor.readline(prompt)) {
            Ok(line) => line,
            Err(ReadlineError::Interrupted) => {
                statement.clear();
                continue;
            }
            Err(ReadlineError::Eof) => break,
            Err(e) => return Err(e).context("reading the prompt"),
        };
        let trimmed = line.trim();
        if trimmed.is_empty() {
            continue;
        }
        let _ = editor.add_history_entry(trimmed);
        if statement.is_empty() && trimmed.starts_with('\\') {
            let mut words = trimmed.split_whitespace();
            match (words.next(), words.next()) {
                (Some("\\q"), _) => break,
                (Some("\\d"), None) => run_and_print(ctx, "SELECT table_schema, table_name, table_type FROM information_schema.tables WHERE table_schema NOT IN ('information_schema') ORDER BY 1, 2").await,
                (Some("\\d"), Some(name)) => {
                    let (schema, table) = pgtrail_store::parse_qualified(name).map(|(s, t)| (s.unwrap_or_else(|| "public".into()), t)).unwrap_or_default();
                    run_and_print(
                        ctx,
                        &format!(
                            "SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = '{}' AND table_name = '{}' ORDER BY ordinal_position",
                            schema.replace('\'', "''"),
                            table.replace('\'', "''")
                        ),
                    )
                    .await
                }
                _ => eprintln!("unknown command {trimmed}; try \\d, \\d NAME or \\q"),
            }
            continue;
        }
        statement.push_str(&line);
        statement.push('\n');
        if trimmed.ends_with(';') {
            let sql = std::mem::take(&mut statement);
            run_and_print(ctx, sql.trim().trim_end_matches(';')).await;
        }
    }
    if let Some(h) = &history {
        let _ = editor.save_history(h);
    }
    Ok(())
}

async fn run_and_print(ctx: &SessionContext, sql: &str) {
    match execute(ctx, sql).await {
        Ok(batches) => {
            if let Err(e) = write_result(&batches, "table", None) {
                eprintln!("error: {e:#}");
            }
        }
        Err(e) => eprintln!("error: {e:#}"),
    }
}
