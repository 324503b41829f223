//! Time SQL over an archive in one process, as a server or the bench would ask it: the
//! session is opened once, then the queries run in turn, `--reps` times, each timed from the
//! SQL text to its last batch. The first round pays for checking each file's SHA-256 and
//! is left out of the median.
//!
//! ```sh
//! cargo build --profile bench-light -p pgtrail-harness --example query-timing
//! target/bench-light/examples/query-timing ARCHIVE \
//!     "SELECT * FROM row_history('public.accounts', 7) ORDER BY lsn, seq" --reps 20
//! # the same with the key index and key-ordered copies out of the page cache before each run
//! target/bench-light/examples/query-timing ARCHIVE "..." --evict 'ARCHIVE/segments/*.key*'
//! ```
//!
//! `PGTRAIL_BENCH_KEEP=1 pgtrail-bench queries` keeps the queries suite's archive for it.

use std::time::Instant;

use anyhow::Context;
use clap::Parser;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    archive: std::path::PathBuf,
    /// The queries, run in this order each round.
    #[arg(required = true)]
    sql: Vec<String>,
    #[arg(long, default_value_t = 10)]
    reps: usize,
    /// Files (glob patterns) dropped from the page cache before each run of the last query
    /// (`posix_fadvise(DONTNEED)`, through python3).
    #[arg(long)]
    evict: Vec<String>,
}

const EVICT: &str = "import glob, os, sys
for pattern in sys.argv[1:]:
    for path in glob.glob(pattern):
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)";

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Runtime::new()?;
    let (ctx, _snapshot) = pgtrail_query::open_session(&args.archive)?;
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); args.sql.len()];
    for round in 0..=args.reps {
        for (i, sql) in args.sql.iter().enumerate() {
            if !args.evict.is_empty() && i + 1 == args.sql.len() {
                let evicted = std::process::Command::new("python3")
                    .args(["-c", EVICT])
                    .args(&args.evict)
                    .status()
                    .context("running python3 to evict files from the page cache")?;
                anyhow::ensure!(evicted.success(), "evicting {:?} failed", args.evict);
            }
            let started = Instant::now();
            let batches = rt.block_on(async {
                pgtrail_query::read_only_query(&ctx, sql)
                    .await?
                    .collect()
                    .await
                    .map_err(anyhow::Error::from)
            })?;
            let ms = started.elapsed().as_secs_f64() * 1e3;
            let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
            eprintln!("round {round}: query {}: {ms:.2} ms, {rows} rows", i + 1);
            if round > 0 {
                times[i].push(ms);
            }
        }
    }
    println!("query,median_ms,min_ms,max_ms,runs");
    for (i, mut t) in times.into_iter().enumerate() {
        t.sort_by(f64::total_cmp);
        if let (Some(min), Some(max)) = (t.first(), t.last()) {
            println!(
                "{},{:.2},{min:.2},{max:.2},{}",
                i + 1,
                t[t.len() / 2],
                t.len()
            );
        }
    }
    Ok(())
}
