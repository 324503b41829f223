//! `pgtrail purge` and `pgtrail hold` (issue 20): erase a table's history before a position
//! while keeping what the table held there, and legal holds that nothing may erase.

use std::path::PathBuf;

use anyhow::bail;
use pgtrail_store::evidence::hold::requests::{self, Answer, Request};
use pgtrail_store::evidence::hold::{self, Hold};
use pgtrail_store::evidence::redact::PurgeMode;
use pgtrail_store::{Compactor, Lsn};

use crate::evidence::{ScopeArgs, open_alone, try_open_alone};

#[derive(clap::Args)]
pub struct PurgeArgs {
    /// Archive directory (not held by a running capture: stop it first).
    #[arg(long, env = "PGTRAIL_ARCHIVE")]
    pub archive: PathBuf,
    /// The tables whose history to purge, as `schema.table` (a name without a schema is in
    /// `public`), comma-separated, by the name each bore at its changes.
    #[arg(long, value_delimiter = ',', required = true)]
    pub tables: Vec<String>,
    /// Purge the changes committed before this commit LSN (0/1A2B3C4), or before this time
    /// (2025-01-01 00:00:00+00: before the first change committed at or after it).
    #[arg(long)]
    pub before: String,
    /// Why (kept in the purge's receipt, a leaf of the tree): the retention policy, a ticket.
    #[arg(long)]
    pub reason: String,
}

/// Erase the history of some tables before a position, keeping each row's value there.
pub async fn purge(args: PurgeArgs) -> anyhow::Result<()> {
    if args.reason.trim().is_empty() {
        bail!("--reason must say why (it is kept in the purge's receipt)");
    }
    let tables: Vec<String> = args
        .tables
        .iter()
        .map(|t| t.trim())
        .filter(|t| !t.is_empty())
        .map(|t| match t.contains('.') {
            true => t.to_string(),
            false => format!("public.{t}"),
        })
        .collect();
    let before = before_lsn(&args.archive, &args.before).await?;
    let (archive, reason) = (args.archive.clone(), args.reason.clone());
    let (redacted, counts) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        // The archive is this process's before the plan: a capture holding it is named at
        // once, not after the verification, and no hold can be placed meanwhile.
        let log = open_alone(&archive, "purge")?;
        let compactor = Compactor::for_log(&log, pgtrail_store::CompactOptions::default());
        Ok(compactor.purge(&tables, before, &reason, PurgeMode::Requested)?)
    })
    .await??;
    if redacted == 0 {
        eprintln!(
            "purge: no change of {} before {before}",
            args.tables.join(", ")
        );
        return Ok(());
    }
    eprintln!(
        "purge: erased {} changes before {before} whole and the context and before image of {} more \
         (each the last change of a row that exists at {before}, whose after image is the row's value there); \
         the receipt becomes a leaf at the next compaction. The old segment files are deleted after \
         the retire grace period (run `pgtrail compact`); backups still hold the values",
        counts.erased, counts.kept_state
    );
    Ok(())
}

/// `--before` as a commit LSN: an LSN as given, a time as the first change committed at or
/// after it (told on stderr).
async fn before_lsn(archive: &std::path::Path, text: &str) -> anyhow::Result<Lsn> {
    use pgtrail_query::Moment;
    let t = match crate::export::moment(text, "--before")? {
        Moment::Lsn(lsn) => return Ok(lsn),
        Moment::Time(t) => t,
    };
    let dir = archive.to_path_buf();
    let text = text.to_string();
    tokio::task::spawn_blocking(move || -> anyhow::Result<Lsn> {
        let snapshot = pgtrail_query::ArchiveSnapshot::open(&dir)?;
        let Some((first, _)) =
            pgtrail_query::export::commit_lsns_between(&snapshot, (t, i64::MAX))?
        else {
            bail!(
                "--before {text}: the archive holds no change committed at or after it, so no position in it stands for that time; give an LSN instead"
            );
        };
        eprintln!("purge: --before {text} is commit LSN {first}, the first change committed at or after it");
        Ok(first)
    })
    .await?
}

#[derive(clap::Args)]
pub struct HoldArgs {
    /// Archive directory (not held by a running capture: stop it first).
    #[arg(long, env = "PGTRAIL_ARCHIVE")]
    pub archive: PathBuf,
    /// What the hold covers (default: every table, the whole history).
    #[command(flatten)]
    pub scope: ScopeArgs,
    /// Why (kept in the hold's leaf): the matter, the counsel's reference.
    #[arg(long, required_unless_present = "list")]
    pub reason: Option<String>,
    /// Release this hold (its number, as `--list` shows it) instead of placing one.
    #[arg(long, conflicts_with = "list")]
    pub release: Option<u64>,
    /// List the holds (JSON, one a line), released ones with their release.
    #[arg(long)]
    pub list: bool,
    /// With a capture running on the archive: how long to wait for it to carry the hold out
    /// (it does between its compactions and retention runs); after that nothing is done.
    #[arg(long, default_value_t = 300)]
    pub wait_secs: u64,
}

/// Place, release or list legal holds.
pub async fn hold(args: HoldArgs) -> anyhow::Result<()> {
    let archive = args.archive.clone();
    if args.list {
        let holds = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<Hold>> {
            Ok(hold::list_in(&archive)?)
        })
        .await??;
        for h in holds {
            println!("{}", serde_json::to_string(&h)?);
        }
        return Ok(());
    }
    let reason = args.reason.clone().unwrap_or_default();
    let request = match args.release {
        Some(id) => Request::Release { id, reason },
        None => Request::Place {
            scope: args.scope.scope(&args.archive).await?,
            reason,
        },
    };
    let wait = std::time::Duration::from_secs(args.wait_secs);
    let placed = tokio::task::spawn_blocking(move || -> anyhow::Result<Hold> {
        match try_open_alone(&archive)? {
            Some(log) => {
                let log = log.shared();
                Ok(match request {
                    Request::Place { scope, reason } => hold::place(&log, scope, &reason)?,
                    Request::Release { id, reason } => hold::release(&log, id, &reason)?,
                })
            }
            // A capture holds the archive: it carries the request out between its compactions.
            None => {
                let waiting = || {
                    eprintln!(
                        "hold: a capture is running on the archive; waiting up to {} s for it to carry the request out",
                        wait.as_secs()
                    )
                };
                match requests::submit(&archive, &request, wait, waiting)? {
                    Answer::Done(hold) => Ok(hold),
                    Answer::Refused(why) => {
                        Err(anyhow::anyhow!("the capture refused the request: {why}"))
                    }
                }
            }
        }
    })
    .await??;
    match &placed.released {
        Some(_) => eprintln!(
            "hold: released hold {} ({}); the release becomes a leaf at the next compaction",
            placed.id, placed.reason
        ),
        None => eprintln!(
            "hold: placed hold {}: redact, purge and retention leave the changes it covers whole until it is released; \
             the hold becomes a leaf at the next compaction",
            placed.id
        ),
    }
    println!("{}", serde_json::to_string(&placed)?);
    Ok(())
}
