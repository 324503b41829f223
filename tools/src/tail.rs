//! `pgtrail tail`: the archive as a replayable stream for pipes, one change per JSON line,
//! each with the cursor to resume after it.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use pgtrail_query::feed::{Follower, Since};

#[derive(clap::Args)]
pub struct TailArgs {
    /// Archive directory.
    #[arg(long, env = "PGTRAIL_ARCHIVE")]
    pub archive: PathBuf,
    /// Where to start: `beginning` (every change archived), `end` (only changes made durable
    /// from now on) or a cursor (`0/19353A7:5`, a line's "cursor"): the changes after it.
    #[arg(long, default_value = "beginning")]
    pub since: String,
    /// Keep running and print each change as capture makes it durable.
    #[arg(long)]
    pub follow: bool,
    /// Only these tables, comma-separated (public.orders,public."Odd Name").
    #[arg(long)]
    pub tables: Option<String>,
    /// Output format: jsonl (one change per line: the `changes` view's columns and "cursor").
    #[arg(long, default_value = "jsonl", value_parser = ["jsonl"])]
    pub format: String,
    /// Milliseconds between looks for new durable commits while following.
    #[arg(long, default_value_t = 200)]
    pub poll_ms: u64,
}

pub async fn run(args: TailArgs) -> anyhow::Result<()> {
    let since: Since = args.since.parse().context("--since")?;
    let tables = args
        .tables
        .as_deref()
        .map(pgtrail_store::split_table_list)
        .unwrap_or_default();
    let mut follower = Follower::new(
        &args.archive,
        since,
        tables,
        Duration::from_millis(args.poll_ms.max(10)),
    );
    loop {
        let page = tokio::select! {
            page = follower.next_page(args.follow) => page?,
            _ = crate::shutdown_signal() => break,
        };
        let Some(page) = page else { break };
        // Each page goes out whole and flushed: a consumer that stops reading mid-page resumes
        // from the last line it got (a closed pipe ends the command quietly).
        let mut lines = pgtrail_query::json::write_json_lines(Vec::new(), &page.batches)?;
        // A recorded gap is a line of its own, `{"cursor", "gap": {...}}`, in its place:
        // changes between its ends were never captured.
        if let Some(gap) = &page.gap {
            tracing::warn!(
                from = %gap.gap.from,
                to = %gap.gap.to,
                reason = %gap.gap.reason,
                "the archive has a gap here: changes between these positions were never captured"
            );
            lines.extend_from_slice(gap.to_json().to_string().as_bytes());
            lines.push(b'\n');
        }
        let mut out = std::io::stdout().lock();
        out.write_all(&lines)?;
        out.flush()?;
    }
    if let Some(cursor) = follower.cursor() {
        tracing::debug!(%cursor, "tail stopped");
    }
    Ok(())
}
