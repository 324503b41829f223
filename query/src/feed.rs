//! The archive as a replayable stream: every change after a cursor, in `(commit LSN, seq)`
//! order, a page at a time, from one consistent cut. `pgtrail tail` and the server's
//! `/api/stream` both read through it.
//!
//! Why a cursor is enough to deliver every durable change exactly once: the capture stores
//! changes in key order. Each transaction is stored whole in one log commit with keys above
//! every key stored before it (the stream delivers transactions in commit order, and a
//! transaction at or below the acknowledged position is skipped on reconnect), and the
//! snapshots (the initial one, a re-snapshot after a gap, a table read while capture runs)
//! are stored when the stream reaches their point, keyed just before it. Compaction moves
//! changes from the log into segments without changing their keys. So a change a reader has
//! not seen yet always has a key above the last key it saw, and "every key above the cursor"
//! read from a later cut holds exactly the changes that became durable since.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use datafusion::arrow::array::{AsArray, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema, UInt32Type, UInt64Type};
use datafusion::common::TableReference;
use datafusion::prelude::{Expr, SessionContext, col, lit};
use pgtrail_store::{ChangeKey, Lsn};

use crate::archive::ArchiveSnapshot;
use crate::error::QueryError;

/// A position in the stream: the key of the last change a consumer has seen. Written
/// `LSN:seq` (`0/19353A7:5`), as PostgreSQL writes an LSN.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cursor(pub ChangeKey);

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.0.commit_lsn, self.0.seq)
    }
}

/// The text was not a cursor.
#[derive(Debug, thiserror::Error)]
#[error(
    "invalid cursor {0:?}: expected LSN:seq as the stream writes it (like 0/19353A7:5), taken from a change's \"cursor\" field"
)]
pub struct ParseCursorError(String);

impl FromStr for Cursor {
    type Err = ParseCursorError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseCursorError(s.chars().take(80).collect());
        let (lsn, seq) = s.trim().split_once(':').ok_or_else(err)?;
        let lsn: Lsn = lsn.parse().map_err(|_| err())?;
        let seq: u32 = seq.parse().map_err(|_| err())?;
        Ok(Cursor(ChangeKey::new(lsn, seq)))
    }
}

/// One page of the stream.
pub struct FeedPage {
    /// The `changes` view's columns and `cursor`, in key order.
    pub batches: Vec<RecordBatch>,
    /// Where the next page starts: the last change in `batches`, or past changes of tables
    /// not followed. `None` only while nothing has been read at all.
    pub next: Option<Cursor>,
    /// Whether changes after this page were already durable in the cut it was read from: read
    /// the next page at once rather than waiting for new commits.
    pub more: bool,
    /// A gap the archive recorded right after this page's changes: changes between its `from`
    /// and `to` were never captured (see `pgtrail capture --resnapshot`). Pages end at a gap,
    /// so a consumer learns of it between the last change before it and the first after.
    pub gap: Option<GapEvent>,
}

/// A recorded gap as the stream reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GapEvent {
    /// Its place in the stream: after every change committed at or before `from`.
    pub cursor: Cursor,
    pub gap: pgtrail_store::Gap,
}

impl GapEvent {
    fn of(gap: &pgtrail_store::Gap) -> GapEvent {
        GapEvent {
            cursor: Cursor(ChangeKey::new(gap.from, u32::MAX)),
            gap: gap.clone(),
        }
    }

    /// `{"cursor", "gap": {"from", "to", "reason", "recorded_at"}}`: what `pgtrail tail`
    /// prints and `/api/stream` sends as a `gap` event.
    pub fn to_json(&self) -> serde_json::Value {
        let recorded = utc_text(self.gap.recorded_at_us);
        serde_json::json!({
            "cursor": self.cursor.to_string(),
            "gap": {
                "from": self.gap.from.to_string(),
                "to": self.gap.to.to_string(),
                "reason": self.gap.reason,
                "recorded_at": recorded,
            }
        })
    }
}

/// Microseconds since the Unix epoch as RFC 3339 UTC text, through Arrow's own conversion.
fn utc_text(us: i64) -> String {
    datafusion::arrow::temporal_conversions::timestamp_us_to_datetime(us)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string())
        .unwrap_or_else(|| us.to_string())
}

/// Which tables a stream follows: all, or those named (as `pgtrail sql` names them; a table
/// renamed since is followed under each of its names).
#[derive(Clone, Debug, Default)]
pub struct TableFilter(Vec<(String, String)>);

impl TableFilter {
    /// Resolve `names` in `archive` (none: every table); an unknown name is an error that
    /// lists the known ones.
    /// A name that is not in this cut yet (a table not captured yet) cannot be followed.
    pub fn named(archive: &ArchiveSnapshot, names: &[String]) -> Result<TableFilter, QueryError> {
        let mut pairs = Vec::new();
        for name in names {
            let table = archive.table(name)?;
            for v in &table.versions {
                let pair = (v.schema.clone(), v.name.clone());
                if !pairs.contains(&pair) {
                    pairs.push(pair);
                }
            }
        }
        Ok(TableFilter(pairs))
    }

    /// The condition on the `changes` view; `None` when every table is followed.
    pub fn predicate(&self) -> Option<Expr> {
        self.0
            .iter()
            .map(|(schema, name)| {
                col("schema")
                    .eq(lit(schema.as_str()))
                    .and(col("table").eq(lit(name.as_str())))
            })
            .reduce(Expr::or)
    }
}

/// The most changes one page holds: a page is sorted in memory, and a server holds one page
/// per stream.
pub const PAGE_ROWS: usize = 10_000;

/// The changes after `after` (from the first when `None`) that `ctx` (a session over
/// `archive`) holds, in key order: up to about one segment's worth per table and at most
/// [`PAGE_ROWS`], so that a consumer far behind catches up a page at a time in bounded
/// memory.
pub async fn changes_after(
    ctx: &SessionContext,
    archive: &ArchiveSnapshot,
    after: Option<Cursor>,
    tables: &TableFilter,
) -> Result<FeedPage, QueryError> {
    let from = after.map(|c| c.0);
    // The page ends where the first segment still holding unseen changes ends: every other
    // segment overlapping the page is read only for its changes in that range, so a page
    // holds at most about one segment per table. Without such a segment every unseen change
    // is in the log tail, which compaction keeps small.
    let segment_end = archive
        .tables
        .values()
        .flat_map(|t| &t.segments)
        .map(|s| s.max_key)
        .filter(|max| from.is_none_or(|f| *max > f))
        .min();
    // A recorded gap ends a page where it begins.
    let next_gap = archive
        .gaps
        .iter()
        .map(GapEvent::of)
        .filter(|g| from.is_none_or(|f| g.cursor.0 > f))
        .min_by_key(|g| g.cursor);
    let upto = match (segment_end, &next_gap) {
        (Some(s), Some(g)) => Some(s.min(g.cursor.0)),
        (s, g) => s.or(g.as_ref().map(|g| g.cursor.0)),
    };
    let mut filter: Vec<Expr> = from.map(keys_after).into_iter().collect();
    filter.extend(tables.predicate());
    let changes = || async {
        let frame = ctx
            .table(TableReference::partial("pgtrail", "changes"))
            .await?;
        Ok::<_, QueryError>(frame)
    };
    let filtered = |frame: datafusion::dataframe::DataFrame, through: Option<ChangeKey>| {
        let mut all = filter.clone();
        all.extend(through.map(keys_through));
        match all.into_iter().reduce(Expr::and) {
            Some(f) => frame.filter(f),
            None => Ok(frame),
        }
    };
    let in_order = |frame: datafusion::dataframe::DataFrame| {
        frame.sort(vec![
            col("lsn").sort(true, false),
            col("seq").sort(true, false),
        ])
    };
    // The page's last key first, from the keys alone (the view's columnar path): a full page
    // then builds the row images of its own changes only, not of every change up to `upto`,
    // which would make catching up through a large segment quadratic.
    let keys = in_order(filtered(changes().await?, upto)?)?
        .limit(PAGE_ROWS - 1, Some(1))?
        .select_columns(&["lsn", "seq"])?
        .collect()
        .await?;
    let full_page_ends = match keys.iter().find(|b| b.num_rows() > 0) {
        Some(b) => Some(key_at(b, 0)?),
        None => None,
    };
    let frame = in_order(filtered(changes().await?, full_page_ends.or(upto))?)?;
    let mut batches = Vec::new();
    let mut rows = 0;
    for batch in frame.collect().await? {
        if batch.num_rows() > 0 {
            rows += batch.num_rows();
            batches.push(with_cursor(&batch)?);
        }
    }
    debug_assert!(rows <= PAGE_ROWS);
    let last_read = match batches.last() {
        Some(b) => Some(key_at(b, b.num_rows() - 1)?),
        None => from,
    };
    // A full page ends at its last change (more may follow it at once). Otherwise a bounded
    // page covers every change up to its bound, also those of tables not followed.
    let (last, more) = match (rows == PAGE_ROWS, upto) {
        (true, _) => (last_read, true),
        (false, Some(u)) => (Some(u), true),
        (false, None) => (last_read, false),
    };
    // The page reached the gap: it is reported after the page's changes.
    let gap = next_gap.filter(|g| rows < PAGE_ROWS && upto == Some(g.cursor.0));
    Ok(FeedPage {
        batches,
        next: last.map(Cursor),
        more,
        gap,
    })
}

/// Where to cut the changes below `before` (all when `None`) into windows for reading them
/// newest first: each bound is the lowest key of a segment or of a row group, the windows
/// `[bound, previous bound)` partition the keys, and the last window (bound `None`) holds
/// everything below. A query that stops as soon as it has its rows then reads the newest row
/// groups only, instead of sorting every segment's keys to find the top. Each window spans
/// twice as many bounds as the one before it, so a selective filter takes at most about
/// log2(bounds) windows.
///
/// The segments the newest window overlaps are cut at their row groups: a table's newest
/// segment may hold most of its history (one segment of up to 128 MiB per compaction run and
/// table), and without these bounds the first window read all of it. Their footers are read
/// here (and each file checked against its SHA-256 once per process, as for reading it), so
/// this does file I/O: call it off an async runtime.
pub fn newest_first_windows(
    archive: &ArchiveSnapshot,
    before: Option<ChangeKey>,
) -> Vec<Option<ChangeKey>> {
    let below = |k: &ChangeKey| before.is_none_or(|b| *k < b);
    let segments: Vec<_> = archive
        .tables
        .values()
        .flat_map(|t| &t.segments)
        .filter(|s| below(&s.min_key))
        .collect();
    let mut lowest: Vec<ChangeKey> = segments.iter().map(|s| s.min_key).collect();
    let newest = lowest.iter().max().copied();
    if let Some(newest) = newest {
        for seg in segments.iter().filter(|s| s.max_key >= newest) {
            // A footer that cannot be read leaves its segment whole here: reading its rows
            // reports what is wrong with it.
            let Ok(groups) =
                crate::read::segment_row_groups(&archive.segment_path(seg), &seg.sha256)
            else {
                continue;
            };
            // A row group's first change has its lowest LSN, so `(lsn, 0)` is at or below it.
            lowest.extend(
                groups
                    .iter()
                    .filter_map(|g| g.lsn)
                    .map(|(min, _)| ChangeKey::new(Lsn(min), 0))
                    .filter(|k| below(k) && *k > seg.min_key),
            );
        }
    }
    lowest.sort_unstable_by(|a, b| b.cmp(a));
    lowest.dedup();
    let mut bounds = Vec::new();
    let mut i = 0;
    let mut span = 1;
    while i < lowest.len() {
        bounds.push(Some(lowest[i]));
        i += span;
        span *= 2;
    }
    bounds.push(None);
    bounds
}

/// The `changes` view's rows whose key is `k` or above it (see [`keys_after`]).
pub fn keys_from(k: ChangeKey) -> Expr {
    let lsn = k.commit_lsn.0;
    col("lsn")
        .gt_eq(lit(lsn))
        .and(col("lsn").gt(lit(lsn)).or(col("seq").gt_eq(lit(k.seq))))
}

/// The `changes` view's rows whose key is above `k`. The plain `lsn >= …` conjunct lets the
/// view skip segments and row groups by their LSN range.
pub fn keys_after(k: ChangeKey) -> Expr {
    let lsn = k.commit_lsn.0;
    col("lsn")
        .gt_eq(lit(lsn))
        .and(col("lsn").gt(lit(lsn)).or(col("seq").gt(lit(k.seq))))
}

/// The `changes` view's rows whose key is below `k` (see [`keys_after`]).
pub fn keys_before(k: ChangeKey) -> Expr {
    let lsn = k.commit_lsn.0;
    col("lsn")
        .lt_eq(lit(lsn))
        .and(col("lsn").lt(lit(lsn)).or(col("seq").lt(lit(k.seq))))
}

/// The `changes` view's rows whose key is `k` or below it (see [`keys_after`]).
pub fn keys_through(k: ChangeKey) -> Expr {
    let lsn = k.commit_lsn.0;
    col("lsn")
        .lt_eq(lit(lsn))
        .and(col("lsn").lt(lit(lsn)).or(col("seq").lt_eq(lit(k.seq))))
}

/// Where a stream starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Since {
    /// From the first change the archive holds.
    Beginning,
    /// After the last change durable when the stream starts: only what comes next.
    End,
    /// After this change.
    After(Cursor),
}

impl FromStr for Since {
    type Err = ParseCursorError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "beginning" | "start" => Ok(Since::Beginning),
            "end" | "now" => Ok(Since::End),
            cursor => cursor.parse().map(Since::After),
        }
    }
}

/// One watcher of an archive for any number of followers: one look at the log's mark every
/// `poll` however many follow (none while nobody waits), and the latest cut read once and
/// shared. A cut holds the log tail in memory, so followers that each read their own would
/// hold one copy of it apiece; here the followers of one moment share one.
#[derive(Clone)]
pub struct ArchiveWatch(Arc<WatchShared>);

struct WatchShared {
    dir: PathBuf,
    /// The newest mark seen by the poller or by a cut.
    mark: tokio::sync::watch::Sender<Polled>,
    /// The latest cut and the mark read with it, built by the first follower that needs it.
    latest: tokio::sync::Mutex<Option<(LogMark, Arc<ArchiveSnapshot>)>>,
    /// Pages being read at once: decoding segments is what takes memory, so a crowd of
    /// followers reads a few pages at a time (each waits its turn) rather than all at once.
    reading: tokio::sync::Semaphore,
}

/// What the last look at the log found.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Polled {
    NotYet,
    Mark(LogMark),
    /// The log could not be read (the archive was removed, a disk error): followers stop.
    Failed(String),
}

impl ArchiveWatch {
    /// Watch `dir`, looking at its log every `poll` while someone waits. Needs a tokio
    /// runtime; the poller ends when the last handle is dropped.
    pub fn new(dir: &Path, poll: Duration) -> ArchiveWatch {
        let (mark, _) = tokio::sync::watch::channel(Polled::NotYet);
        let shared = Arc::new(WatchShared {
            dir: dir.to_path_buf(),
            mark,
            latest: tokio::sync::Mutex::new(None),
            reading: tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(2, |n| n.get()) * 2,
            ),
        });
        tokio::spawn(poll_marks(Arc::downgrade(&shared), poll));
        ArchiveWatch(shared)
    }

    /// The latest cut of the archive and the mark it was read at: the shared one while the
    /// log has not moved since it was read, else a new one (read once for everyone). The
    /// poller's mark may be one poll old; `fresh` looks at the log first (for `since=end`,
    /// which must not start before what is durable now).
    async fn cut(&self, fresh: bool) -> Result<(Arc<ArchiveSnapshot>, LogMark), QueryError> {
        if fresh {
            let mark = read_mark(self.0.dir.clone()).await?;
            publish(&self.0.mark, Polled::Mark(mark));
        }
        let mut latest = self.0.latest.lock().await;
        if let (Some((mark, archive)), Polled::Mark(now)) = (&*latest, &*self.0.mark.borrow())
            && mark == now
        {
            return Ok((archive.clone(), *mark));
        }
        let dir = self.0.dir.clone();
        let (archive, mark) = tokio::task::spawn_blocking(move || {
            let reader =
                pgtrail_store::LogReader::open(&dir).map_err(|source| QueryError::Open {
                    path: dir.clone(),
                    source,
                })?;
            let mark = LogMark::of(&reader)?;
            Ok::<_, QueryError>((ArchiveSnapshot::from_reader(&dir, &reader)?, mark))
        })
        .await
        .map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))??;
        let archive = Arc::new(archive);
        *latest = Some((mark, archive.clone()));
        // A mark read with a cut is the newest known: followers waiting on an older one wake.
        publish(&self.0.mark, Polled::Mark(mark));
        Ok((archive, mark))
    }

    /// A cut that holds everything durable now: the shared one while the log has not moved
    /// since it was read (a look at the log's mark costs far less than reading its tail), else
    /// a new one. For a request that must see every commit made before it.
    pub async fn current(&self) -> Result<Arc<ArchiveSnapshot>, QueryError> {
        Ok(self.cut(true).await?.0)
    }

    /// Wait until the log's mark differs from `seen`: something new may be durable.
    async fn changed_since(&self, seen: LogMark) -> Result<(), QueryError> {
        let mut marks = self.0.mark.subscribe();
        let polled = marks
            .wait_for(|polled| !matches!(polled, Polled::NotYet) && *polled != Polled::Mark(seen))
            .await
            .map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))?;
        match &*polled {
            Polled::Failed(why) => Err(datafusion::error::DataFusionError::Execution(format!(
                "following the archive: {why}"
            ))
            .into()),
            _ => Ok(()),
        }
    }
}

/// The poller: one look at the log every `poll` while someone waits for a change.
async fn poll_marks(shared: std::sync::Weak<WatchShared>, poll: Duration) {
    loop {
        tokio::time::sleep(poll).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if shared.mark.receiver_count() == 0 {
            continue;
        }
        let polled = match read_mark(shared.dir.clone()).await {
            Ok(mark) => Polled::Mark(mark),
            Err(e) => Polled::Failed(e.to_string()),
        };
        publish(&shared.mark, polled);
    }
}

/// The log's mark now, read off the async workers.
async fn read_mark(dir: PathBuf) -> Result<LogMark, QueryError> {
    tokio::task::spawn_blocking(move || {
        let reader = pgtrail_store::LogReader::open(&dir)
            .map_err(|source| QueryError::Open { path: dir, source })?;
        Ok(LogMark::of(&reader)?)
    })
    .await
    .map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))?
}

/// Tell the followers what the log looks like now, waking them only when it changed.
fn publish(marks: &tokio::sync::watch::Sender<Polled>, now: Polled) {
    marks.send_if_modified(|old| {
        let changed = *old != now;
        if changed {
            *old = now;
        }
        changed
    });
}

/// Reads an archive's stream page by page, each page from a consistent cut, and (following)
/// waits for the capture's next durable commit once it has caught up. A fresh cut is taken
/// after each one is read to its end, so a consumer sees each change once whether it was in
/// the log tail or compacted into a segment meanwhile.
pub struct Follower {
    watch: ArchiveWatch,
    tables: Vec<String>,
    cursor: Option<Cursor>,
    since_end: bool,
    cut: Option<Cut>,
    /// What the last cut read to its end saw of the log: nothing new is durable while a
    /// fresh look sees the same.
    seen: Option<LogMark>,
}

struct Cut {
    ctx: SessionContext,
    archive: Arc<ArchiveSnapshot>,
    filter: TableFilter,
}

/// The capture's durable position and the log's change count: one of them moves with every
/// durable commit of changes (compaction lowers the count without adding a change).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct LogMark(Lsn, u64);

impl LogMark {
    fn of(reader: &pgtrail_store::LogReader) -> Result<LogMark, pgtrail_store::LogError> {
        Ok(LogMark(reader.position()?, reader.change_count()?))
    }
}

impl Follower {
    /// A stream of `dir`'s changes of `tables` (all when empty), looking for new commits every
    /// `poll` while following, with a watch of its own.
    pub fn new(dir: &Path, since: Since, tables: Vec<String>, poll: Duration) -> Follower {
        Follower::sharing(ArchiveWatch::new(dir, poll), since, tables)
    }

    /// A stream of the watched archive's changes of `tables` (all when empty), sharing the
    /// watch (its polling and its cuts) with other followers.
    pub fn sharing(watch: ArchiveWatch, since: Since, tables: Vec<String>) -> Follower {
        Follower {
            watch,
            tables,
            cursor: match since {
                Since::After(c) => Some(c),
                _ => None,
            },
            since_end: since == Since::End,
            cut: None,
            seen: None,
        }
    }

    /// The next page of changes. Caught up: `None` when not following, else it waits for
    /// the next durable commit (a capture that never commits again keeps it waiting: wrap
    /// the call in a timeout or a select to stop it).
    pub async fn next_page(&mut self, follow: bool) -> Result<Option<FeedPage>, QueryError> {
        loop {
            if self.cut.is_none() {
                let (archive, mark) = self.watch.cut(self.since_end).await?;
                if std::mem::take(&mut self.since_end) {
                    self.cursor = last_key(&archive).map(Cursor);
                }
                let filter = TableFilter::named(&archive, &self.tables)?;
                let ctx = crate::session(archive.clone())?;
                self.cut = Some(Cut {
                    ctx,
                    archive,
                    filter,
                });
                self.seen = Some(mark);
            }
            let cut = self.cut.as_ref().expect("a cut was just taken");
            let page =
                {
                    let _turn =
                        self.watch.0.reading.acquire().await.map_err(|e| {
                            datafusion::error::DataFusionError::External(Box::new(e))
                        })?;
                    changes_after(&cut.ctx, &cut.archive, self.cursor, &cut.filter).await?
                };
            self.cursor = page.next.or(self.cursor);
            if !page.more {
                self.cut = None;
            }
            if !page.batches.is_empty() || page.gap.is_some() {
                return Ok(Some(page));
            }
            if page.more {
                continue;
            }
            if !follow {
                return Ok(None);
            }
            let seen = self.seen.expect("a cut was read");
            self.watch.changed_since(seen).await?;
        }
    }

    /// The cursor after the last change delivered (or passed over): where to resume.
    pub fn cursor(&self) -> Option<Cursor> {
        self.cursor
    }
}

/// The key of the last change `archive` holds.
fn last_key(archive: &ArchiveSnapshot) -> Option<ChangeKey> {
    archive
        .tables
        .values()
        .flat_map(|t| {
            let segments = t.segments.iter().map(|s| s.max_key);
            segments.chain(t.tail.last().map(|(k, _)| *k))
        })
        .max()
}

/// The cursor of row `i` of a batch of the `changes` view.
pub fn cursor_at(batch: &RecordBatch, i: usize) -> Result<Cursor, QueryError> {
    key_at(batch, i).map(Cursor)
}

/// The key of row `i` of a batch of the `changes` view.
/// The key of row `i` of a batch with the view's `lsn` and `seq` columns.
pub fn key_at(batch: &RecordBatch, i: usize) -> Result<ChangeKey, QueryError> {
    let (lsn, seq) = key_columns(batch)?;
    Ok(ChangeKey::new(Lsn(lsn.value(i)), seq.value(i)))
}

type KeyColumns<'b> = (
    &'b datafusion::arrow::array::UInt64Array,
    &'b datafusion::arrow::array::UInt32Array,
);

fn key_columns(batch: &RecordBatch) -> Result<KeyColumns<'_>, QueryError> {
    let column = |name| {
        batch.column_by_name(name).ok_or_else(|| {
            datafusion::common::internal_datafusion_err!("the changes view lost its {name} column")
        })
    };
    Ok((
        column("lsn")?.as_primitive::<UInt64Type>(),
        column("seq")?.as_primitive::<UInt32Type>(),
    ))
}

/// `batch` (rows of the `changes` view) with a first column `cursor` (see [`Cursor`]).
pub fn with_cursor(batch: &RecordBatch) -> Result<RecordBatch, QueryError> {
    let (lsn, seq) = key_columns(batch)?;
    let cursors: StringArray = lsn
        .values()
        .iter()
        .zip(seq.values())
        .map(|(l, s)| Some(Cursor(ChangeKey::new(Lsn(*l), *s)).to_string()))
        .collect();
    let mut fields = vec![Field::new("cursor", DataType::Utf8, false)];
    fields.extend(batch.schema().fields().iter().map(|f| f.as_ref().clone()));
    let mut columns = vec![std::sync::Arc::new(cursors) as _];
    columns.extend(batch.columns().iter().cloned());
    let batch = RecordBatch::try_new(std::sync::Arc::new(Schema::new(fields)), columns);
    Ok(batch.map_err(datafusion::error::DataFusionError::from)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_read_back_as_written_and_order_by_key() {
        let c = Cursor(ChangeKey::new(Lsn(0x1_0193_53A7), 5));
        assert_eq!(c.to_string(), "1/19353A7:5");
        assert_eq!("1/19353A7:5".parse::<Cursor>().unwrap(), c);
        assert!("1/19353A7:4".parse::<Cursor>().unwrap() < c);
        assert!("1/19353A8:0".parse::<Cursor>().unwrap() > c);
        for bad in [
            "",
            "1/19353A7",
            "1/19353A7:",
            "x:1",
            "1/2:-1",
            "1/2:99999999999",
        ] {
            let e = bad.parse::<Cursor>().unwrap_err().to_string();
            assert!(e.contains("LSN:seq"), "{bad}: {e}");
        }
    }
}
