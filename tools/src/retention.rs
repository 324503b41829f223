//! `pgtrail purge` and `pgtrail hold` (issue 20): erase a table's history before a position
//! while keeping what the table held there, and legal holds that nothing may erase.

use std::path::PathBuf;

use anyhow::bail;
use pgtrail_store::evidence::hold::{self, Hold};
use pgtrail_store::evidence::redact::PurgeMode;
use pgtrail_store::evidence::requests::{self, Answer, Request, Waiting};
use pgtrail_store::{Compactor, Lsn};

use crate::evidence::{ScopeArgs, try_open_alone};

#[derive(clap::Args)]
pub struct PurgeArgs {
    /// Archive directory (a capture running on it carries the purge out).
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
    /// With a capture running on the archive: how long to wait for it to take the purge (it
    /// does between its compactions); once taken, the command waits until it is done.
    #[arg(long, default_value_t = 300)]
    pub wait_secs: u64,
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
    let wait = std::time::Duration::from_secs(args.wait_secs);
    let (counts, resumed) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let request = Request::Purge {
            tables: tables.clone(),
            before,
            reason: reason.clone(),
        };
        erase(
            &archive,
            "purge",
            wait,
            |compactor| {
                Ok(compactor
                    .purge(&tables, before, &reason, PurgeMode::Requested)?
                    .1)
            },
            request,
            |answer| match answer {
                Answer::Purged { counts, resumed } => Ok((counts, resumed)),
                other => Err(crate::retention::unexpected(other)),
            },
        )
    })
    .await??;
    if resumed {
        eprintln!(
            "purge: the capture had begun this purge and stopped before it was done; it finished it when it started again, and what follows is what was left then (its receipt is a second one)"
        );
    }
    if counts.erased + counts.kept_state == 0 {
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
    /// Archive directory (a capture running on it carries the request out).
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
    /// With a capture running on the archive: how long to wait for it to take the request (it
    /// does between its compactions and retention runs); after that nothing is done.
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
    let scope = match args.release {
        Some(_) => None,
        None => Some(args.scope.scope(&args.archive).await?),
    };
    let (release, wait) = (args.release, std::time::Duration::from_secs(args.wait_secs));
    let placed = tokio::task::spawn_blocking(move || -> anyhow::Result<Hold> {
        match (try_open_alone(&archive)?, scope) {
            (Some(log), Some(scope)) => Ok(hold::place(&log.shared(), scope, &reason)?),
            (Some(log), None) => Ok(hold::release(
                &log.shared(),
                release.unwrap_or_default(),
                &reason,
            )?),
            // A capture holds the archive: it carries the request out between its compactions.
            (None, scope) => {
                let request = match scope {
                    Some(scope) => Request::Place { scope, reason },
                    None => Request::Release {
                        id: release.unwrap_or_default(),
                        reason,
                    },
                };
                match through_capture(&archive, "hold", &request, wait)? {
                    Answer::Done(hold) => Ok(hold),
                    other => Err(unexpected(other)),
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

/// Leave `request` for the capture that holds `archive` and wait for its answer, telling on
/// stderr how the wait goes; a refusal is the command's error.
pub fn through_capture(
    archive: &std::path::Path,
    command: &str,
    request: &Request,
    wait: std::time::Duration,
) -> anyhow::Result<Answer> {
    let told = |waiting: Waiting| match waiting {
        Waiting::Left => eprintln!(
            "{command}: a capture is running on the archive; waiting up to {} s for it to take the request (it does between its compactions)",
            wait.as_secs()
        ),
        Waiting::Taken => eprintln!(
            "{command}: the capture took the request and is carrying it out (its log says how far it is)"
        ),
        Waiting::Working(since) => eprintln!(
            "{command}: the capture is still carrying the request out ({} s so far)",
            since.as_secs()
        ),
    };
    match requests::submit(archive, request, wait, told)? {
        Answer::Refused(why) => bail!("the capture refused the request: {why}"),
        answer => Ok(answer),
    }
}

/// An answer of another kind than the request's: a capture of another version.
pub fn unexpected(answer: Answer) -> anyhow::Error {
    anyhow::anyhow!(
        "the capture answered the request with {answer:?}, which does not answer it: is the capture a pgtrail of another version?"
    )
}

/// Carry out an erasure (`redact`, `purge`): by this process when no capture holds the archive
/// (held from before the plan, so no hold can be placed meanwhile), else by the running
/// capture, through `request`. Returns what `alone` or the capture's answer (taken by
/// `answered`) says was done, and whether a capture that stopped while carrying it out had
/// begun it.
pub fn erase<T>(
    archive: &std::path::Path,
    command: &str,
    wait: std::time::Duration,
    alone: impl FnOnce(&Compactor) -> anyhow::Result<T>,
    request: Request,
    answered: impl FnOnce(Answer) -> anyhow::Result<(T, bool)>,
) -> anyhow::Result<(T, bool)> {
    match try_open_alone(archive)? {
        Some(log) => {
            let compactor = Compactor::for_log(&log, pgtrail_store::CompactOptions::default());
            Ok((alone(&compactor)?, false))
        }
        None => answered(through_capture(archive, command, &request, wait)?),
    }
}
