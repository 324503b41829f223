//! `pgtrail revert`: undo the changes a selection names (a transaction, a request's context, a
//! time range) in the source, after checking that nothing has changed those rows since.
//!
//! The plan (which steps, newest first) comes from the archive alone
//! ([`pgtrail_query::revert`]). Here it meets the source, in one transaction: the tables'
//! columns now (a column the change had that is gone or retyped refuses the revert), the rows
//! the selection touched, locked with `SELECT … FOR UPDATE` and compared with what the
//! selected changes left (a conflict stops the revert or, with `--on-conflict skip`, leaves
//! that row out), then the statements, each of which must change exactly one row. Nothing is
//! written unless every check passed, and a failure at any point rolls the whole transaction
//! back: the source holds either the whole revert or none of it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use pgtrail_query::revert::sql::{SourceColumn, SourceTable, lock_query, script, statement};
use pgtrail_query::revert::{RevertPlan, Selection, describe_key, plan};
use pgtrail_query::{ArchiveSnapshot, Moment};
use pgtrail_store::Cell;

#[derive(clap::Args)]
pub struct RevertArgs {
    /// Archive directory.
    #[arg(long, env = "PGTRAIL_ARCHIVE")]
    pub archive: PathBuf,
    /// The source database to revert in, as for `capture` (a role that may write the tables).
    #[arg(long, env = "PGTRAIL_SOURCE", hide_env_values = true)]
    pub source: Option<String>,
    /// Only the changes of this source transaction (its ID, `transaction_id` in `changes`).
    #[arg(long)]
    pub transaction: Option<u32>,
    /// Only changes whose context has this field with this value (`request_id=abc`; `a.b=1`
    /// reaches into nested objects). Repeat to require several.
    #[arg(long, value_name = "KEY=VALUE")]
    pub context: Vec<String>,
    /// Only changes committed at or after this time or LSN.
    #[arg(long)]
    pub from: Option<String>,
    /// Only changes committed at or before this time or LSN.
    #[arg(long)]
    pub to: Option<String>,
    /// Only these tables, comma-separated (public.orders,public."Odd Name").
    #[arg(long)]
    pub tables: Option<String>,
    /// Undo a TRUNCATE in the selection by inserting back the rows the table held just before.
    #[arg(long)]
    pub include_truncate: bool,
    /// Print the plan (statements, rows per table, conflicts) and write nothing. The default
    /// unless --apply is given.
    #[arg(long, conflicts_with = "apply")]
    pub dry_run: bool,
    /// Write the SQL to this file for review (one transaction for psql; each statement checks
    /// that it changes exactly one row).
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Run the revert in the source, in one transaction carrying the context
    /// {"pgtrail":"revert",…} (so the revert itself is archived, labelled).
    #[arg(long)]
    pub apply: bool,
    /// A row changed since the selected changes: `stop` (nothing is applied; every such row is
    /// listed) or `skip` (those rows are left as they are and listed; the rest is reverted).
    #[arg(long, default_value = "stop", value_parser = ["stop", "skip"])]
    pub on_conflict: String,
}

/// The revert found rows changed since the selection and applied nothing (exit status 1).
#[derive(Debug)]
pub struct Conflicts(pub usize);

impl std::fmt::Display for Conflicts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} row(s) changed since the selected changes (listed above); nothing was applied. \
             Review them, then revert with --on-conflict skip to leave them as they are",
            self.0
        )
    }
}

impl std::error::Error for Conflicts {}

/// A row the revert may not touch, and why.
struct Conflict {
    table: String,
    key: String,
    why: String,
}

fn selection(args: &RevertArgs) -> anyhow::Result<Selection> {
    let moment = |flag: &str, text: &Option<String>| -> anyhow::Result<Option<Moment>> {
        text.as_deref()
            .map(|t| {
                t.parse::<Moment>()
                    .map_err(|e| anyhow::anyhow!("--{flag}: {e}"))
            })
            .transpose()
    };
    let context = args
        .context
        .iter()
        .map(|c| match c.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => bail!("--context {c:?}: write it as KEY=VALUE, e.g. --context request_id=abc"),
        })
        .collect::<anyhow::Result<_>>()?;
    let tables = match &args.tables {
        Some(list) => pgtrail_store::split_table_list(list),
        None => Vec::new(),
    };
    let selection = Selection {
        transaction: args.transaction,
        context,
        from: moment("from", &args.from)?,
        to: moment("to", &args.to)?,
        tables,
        include_truncate: args.include_truncate,
    };
    if let (Some(from), Some(to)) = (selection.from, selection.to) {
        let backwards = match (from, to) {
            (Moment::Lsn(a), Moment::Lsn(b)) => a > b,
            (Moment::Time(a), Moment::Time(b)) => a > b,
            _ => false,
        };
        if backwards {
            bail!("--from {from} is after --to {to}: the range is empty");
        }
    }
    Ok(selection)
}

pub async fn run(args: RevertArgs) -> anyhow::Result<()> {
    let selection = selection(&args)?;
    let skip = args.on_conflict == "skip";
    let url = args.source.clone().context(
        "give the source database with --source (or PGTRAIL_SOURCE): the revert checks the rows there",
    )?;
    let source = pgtrail_capture::SourceConfig::parse(&url)?;
    let dir = args.archive.clone();
    let planned = {
        let selection = selection.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<RevertPlan> {
            let archive = ArchiveSnapshot::open(&dir)?;
            Ok(plan(&archive, &selection)?)
        })
        .await??
    };
    eprintln!(
        "revert: {} change(s) selected, {} to {} ({} statement(s), {} row(s))",
        planned.changes,
        planned.first,
        planned.last,
        planned.steps.len(),
        planned.rows.len()
    );

    let mut client = source.connect_sql().await?;
    let tx = client
        .transaction()
        .await
        .context("cannot begin a transaction in the source")?;
    // Under search_path = pg_catalog, format_type names every user type with its schema, and
    // the statements (every name qualified) mean the same in any session.
    tx.batch_execute(
        "SET LOCAL search_path = pg_catalog; SET LOCAL standard_conforming_strings = on",
    )
    .await?;
    let mut tables: BTreeMap<(String, String), SourceTable> = BTreeMap::new();
    let names: BTreeSet<(String, String)> = planned
        .rows
        .iter()
        .map(|r| (r.schema.clone(), r.table.clone()))
        .collect();
    for (schema, name) in names {
        let table = describe(&tx, &schema, &name).await?;
        tables.insert((schema, name), table);
    }

    // Every row the selection touched, locked, against the state the selection left it in.
    let mut conflicts: Vec<Conflict> = Vec::new();
    let mut conflicting: BTreeSet<(String, String, Vec<Cell>)> = BTreeSet::new();
    for moved in &planned.interleaved {
        let row = planned
            .rows
            .iter()
            .find(|r| r.schema == moved.schema && r.table == moved.table);
        conflicts.push(Conflict {
            table: qualified(&moved.schema, &moved.table),
            key: row.map_or_else(String::new, |r| {
                describe_key(&r.version, &r.key, &moved.key_values)
            }),
            why: format!(
                "another transaction changed it between the selected changes (before the one at {})",
                moved.at
            ),
        });
        conflicting.insert((
            moved.schema.clone(),
            moved.table.clone(),
            moved.key_values.clone(),
        ));
    }
    let total = planned.rows.len();
    for (done, row) in planned.rows.iter().enumerate() {
        if done > 0 && done % 10_000 == 0 {
            eprintln!("revert: checked {done} of {total} rows");
        }
        let source_table = &tables[&(row.schema.clone(), row.table.clone())];
        let query = lock_query(row, source_table)?;
        let found = tx
            .query(&query, &[])
            .await
            .with_context(|| format!("cannot lock a row of {}", source_table_name(source_table)))?;
        let current: Vec<Vec<Option<String>>> = found.iter().map(|r| r.get(0)).collect();
        let expected: Option<Vec<Option<String>>> = found.first().and_then(|r| r.get(1));
        let why = match (&row.expected, current.as_slice()) {
            (None, []) => None,
            (None, [now, ..]) => Some(format!(
                "it was deleted by the selected changes and exists now: {}",
                show_row(&row.version, now)
            )),
            (Some(_), []) => Some("it was left by the selected changes and is gone now".into()),
            (Some(_), [_, _, ..]) => Some(format!(
                "{} identical rows match it (a table without a key): which one to change is not known",
                current.len()
            )),
            (Some(_), [now]) => {
                let expected = expected.unwrap_or_default();
                let differ: Vec<String> = row
                    .version
                    .columns
                    .iter()
                    .enumerate()
                    .filter(|&(i, _)| {
                        !matches!(
                            row.expected.as_ref().and_then(|e| e.get(i)),
                            Some(Cell::Unknown)
                        ) && now.get(i) != expected.get(i)
                    })
                    .map(|(i, c)| {
                        format!(
                            "{} is {} (the selected changes left {})",
                            c.name,
                            show(now.get(i)),
                            show(expected.get(i))
                        )
                    })
                    .collect();
                (!differ.is_empty()).then(|| format!("changed since: {}", differ.join("; ")))
            }
        };
        if let Some(why) = why {
            conflicts.push(Conflict {
                table: qualified(&row.schema, &row.table),
                key: describe_key(&row.version, &row.key, &row.key_values),
                why,
            });
            conflicting.insert((
                row.schema.clone(),
                row.table.clone(),
                row.key_values.clone(),
            ));
        }
    }

    // The statements, newest change first; with `skip`, none for a conflicting row.
    let mut statements: Vec<(String, String)> = Vec::new();
    let mut per_table: BTreeMap<String, BTreeMap<&'static str, usize>> = BTreeMap::new();
    let mut skipped = 0usize;
    for step in &planned.steps {
        let touched = step.rows();
        if touched
            .iter()
            .any(|k| conflicting.contains(&(step.schema.clone(), step.table.clone(), k.clone())))
        {
            skipped += 1;
            continue;
        }
        let source_table = &tables[&(step.schema.clone(), step.table.clone())];
        let sql = statement(step, source_table)?;
        let what = format!(
            "the {} undoing the {} at {} of {} ({})",
            step.action.verb(),
            step.op.as_str(),
            step.change,
            qualified(&step.schema, &step.table),
            describe_key(&step.version, &step.key, &touched[touched.len() - 1])
        );
        *per_table
            .entry(qualified(&step.schema, &step.table))
            .or_default()
            .entry(step.action.verb())
            .or_default() += 1;
        statements.push((what, sql));
    }

    // The report: rows per table, conflicts, and the statements when not applying.
    let mut report = String::new();
    let _ = writeln!(
        report,
        "revert of {} change(s) ({} to {}): {} statement(s)",
        planned.changes,
        planned.first,
        planned.last,
        statements.len()
    );
    for (table, verbs) in &per_table {
        let counts: Vec<String> = verbs.iter().map(|(v, n)| format!("{n} {v}")).collect();
        let _ = writeln!(report, "  {table}: {}", counts.join(", "));
    }
    if !conflicts.is_empty() {
        let _ = writeln!(
            report,
            "{} conflict(s){}:",
            conflicts.len(),
            if skip { ", left as they are" } else { "" }
        );
        for c in &conflicts {
            let _ = writeln!(report, "  {} {}: {}", c.table, c.key, c.why);
        }
        if skip {
            let _ = writeln!(report, "  ({skipped} statement(s) left out for them)");
        }
    }
    let context = serde_json::json!({
        "pgtrail": "revert",
        "selection": selection.to_json(),
    })
    .to_string();
    if let Some(path) = &args.output {
        let header = format!(
            "{report}made by pgtrail revert from {} against the source as it was then;\n\
             each statement stops the script if its row has changed since",
            args.archive.display()
        );
        let text = script(&header, &context, &statements);
        pgtrail_store::write_atomically(path, text.as_bytes())
            .with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("revert: wrote the SQL to {}", path.display());
    }
    print!("{report}");
    if !args.apply {
        if args.output.is_none() {
            println!("statements (newest change first):");
            for (_, sql) in &statements {
                println!("  {sql};");
            }
        }
        println!("dry run: nothing was written (add --apply to revert)");
        tx.rollback().await?;
        return Ok(());
    }
    if !conflicts.is_empty() && !skip {
        tx.rollback().await?;
        return Err(Conflicts(conflicts.len()).into());
    }
    if statements.is_empty() {
        tx.rollback().await?;
        bail!("nothing to revert: every row the selection touched is in conflict");
    }
    // The context first: it labels every change of the transaction.
    tx.execute(
        "SELECT pg_logical_emit_message(true, '_bemi', $1::text)",
        &[&context],
    )
    .await?;
    for (i, (what, sql)) in statements.iter().enumerate() {
        if i > 0 && i % 10_000 == 0 {
            eprintln!("revert: {i} of {} statements", statements.len());
        }
        let changed = tx
            .execute(sql.as_str(), &[])
            .await
            .with_context(|| format!("{what} failed; nothing was applied"))?;
        if changed != 1 {
            // Dropping the transaction rolls it back.
            bail!(
                "{what} changed {changed} rows instead of 1: the row is no longer as the archive left it; nothing was applied"
            );
        }
    }
    // A crash here (the torture suite's `revert:before_commit`) leaves the transaction
    // uncommitted: the server rolls it back when the connection goes, nothing is applied.
    pgtrail_store::crashpoint::hit("revert:before_commit");
    tx.commit()
        .await
        .context("the source refused to commit the revert; nothing was applied")?;
    println!(
        "applied: {} statement(s) in one transaction",
        statements.len()
    );
    Ok(())
}

/// The source's columns of a table now; an error naming it when the table is gone.
async fn describe(
    tx: &tokio_postgres::Transaction<'_>,
    schema: &str,
    name: &str,
) -> anyhow::Result<SourceTable> {
    let rows = tx
        .query(
            "SELECT a.attname::text, a.atttypid::int8, format_type(a.atttypid, a.atttypmod), \
                    a.attgenerated <> '' \
             FROM pg_attribute a \
             WHERE a.attrelid = to_regclass(quote_ident($1) || '.' || quote_ident($2)) \
               AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            &[&schema, &name],
        )
        .await?;
    if rows.is_empty() {
        bail!(
            "{} does not exist in the source (dropped or renamed since the archive saw it); its changes cannot be undone there. Leave it out with --tables",
            qualified(schema, name)
        );
    }
    Ok(SourceTable {
        schema: schema.to_string(),
        name: name.to_string(),
        columns: rows
            .iter()
            .map(|r| SourceColumn {
                name: r.get(0),
                type_oid: r.get::<_, i64>(1) as u32,
                type_name: r.get(2),
                generated: r.get(3),
            })
            .collect(),
    })
}

fn qualified(schema: &str, name: &str) -> String {
    format!(
        "{}.{}",
        pgtrail_store::quote_ident(schema),
        pgtrail_store::quote_ident(name)
    )
}

fn source_table_name(t: &SourceTable) -> String {
    qualified(&t.schema, &t.name)
}

fn show(v: Option<&Option<String>>) -> String {
    match v {
        Some(Some(t)) => format!("{t:?}"),
        Some(None) => "NULL".into(),
        None => "(absent)".into(),
    }
}

fn show_row(version: &pgtrail_store::RelationVersion, row: &[Option<String>]) -> String {
    version
        .columns
        .iter()
        .zip(row)
        .map(|(c, v)| format!("{}={}", c.name, show(Some(v))))
        .collect::<Vec<_>>()
        .join(", ")
}
