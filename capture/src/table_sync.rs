//! Tables that join capture while it runs: created, given a primary key or a replica
//! identity, or added to the publication by a DBA after the initial snapshot.
//!
//! # Mechanism, and why
//!
//! The catalog is watched from the capture's SQL connection ([`TableWatch::due`], every
//! `--catalog-secs` and at each session start). A table that the selection takes in and
//! the publication lacks is added to it (`ALTER PUBLICATION … ADD TABLE`); every published
//! table whose whole state the archive does not hold yet is then *synchronised*, the way
//! PostgreSQL's own subscribers synchronise a table ([`sync`]):
//!
//! 1. a temporary logical slot is created on a second replication connection; it exports a
//!    snapshot that sees exactly the transactions committed before its consistent point `L`;
//! 2. the tables are copied inside that snapshot, into a spool file beside the log (bounded
//!    memory whatever their size);
//! 3. when the main stream reaches `L` (the first transaction committing at or after it, a
//!    keepalive past it, or pgtrail's own fence message emitted after the copy), the copy is
//!    stored as a snapshot transaction keyed just before `L` that names its tables
//!    ([`LogOp::SnapshotOf`]): a replay of such a table starts afresh there, exactly as at the
//!    initial snapshot, so its changes the stream sent before `L` (already in the copy) are
//!    superseded, and those after `L` apply on top.
//!
//! The alternative, an event trigger that adds each new table to the publication inside the
//! transaction that creates it, gives a table's history from its first row with no copy at
//! all, but it needs a superuser to install and changes the source database: it is optional
//! (`pgtrail setup`, see `crate::setup`), and polling, which needs neither, stays the default
//! (its synchronisation is also what a table rewritten by DDL needs). What polling cannot know
//! is what a table held between its creation and `L`: `as_of` before a table's first snapshot
//! says so instead of answering (see the README's Limits).
//!
//! # Why a crash at any line loses nothing
//!
//! Nothing here acknowledges: the sync's snapshot reaches the log as an ordinary transaction,
//! and the stream's position cannot pass `L` before it is stored (it is inserted before the
//! first operation at or past `L`). If the process dies before that, the spool (an unlinked
//! temporary file) vanishes, the temporary slot is dropped by the server, and the next session
//! finds the table published but not held by any snapshot, and synchronises it again.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::AtomicU64;

use pgtrail_store::{
    IncomingCell, IncomingChange, LogOp, LogReader, Lsn, Op, SharedLog, StorageLayout, TableScope,
    always_quoted,
};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt, BufReader, BufWriter};

use crate::error::{CaptureError, within};
use crate::liveness;
use crate::run::CaptureConfig;
use crate::shown_names::ShownNames;
use crate::slot::{self, CapturedTable};
use crate::snapshot::{self, SnapshotSink};
use crate::source::replication::ReplicationStream;
use crate::translate::{SetupNotes, Translator};
use crate::writer::WriterHandle;

/// The prefix of the non-transactional message pgtrail emits after a sync's copy: its arrival
/// says the stream has passed the sync's point. Never stored.
pub(crate) const FENCE_PREFIX: &str = "pgtrail.fence";

/// What the watch knows between its looks at the catalog.
#[derive(Debug, Default)]
pub(crate) struct TableWatch {
    /// Relations whose whole state the archive holds: the point of their latest snapshot and
    /// their storage layout as last known (`None`: not known yet).
    held: BTreeMap<u32, Held>,
    /// The point (LSN, server time) read just before the previous look at the catalog: DDL
    /// that look did not see committed after it.
    last_look: Option<(Lsn, i64)>,
    /// Tables already reported as not capturable, with the reason, so each is said once.
    reported: BTreeMap<u32, String>,
    /// Tables whose addition to the publication was refused (said once).
    refused: BTreeSet<u32>,
    /// The tables left out as last recorded in the archive.
    left_out: Option<Vec<(String, String)>>,
    /// A held layout changed since the layouts were last recorded.
    layouts_changed: bool,
    /// DDL points `pgtrail setup`'s trigger noted in the stream (relation, or 0 for any; the
    /// commit point of its transaction), in stream order; kept while a look may date by them.
    ddl_points: Vec<(u32, (Lsn, i64))>,
    /// Tables whose schema a trigger note carried, recorded by the stream at the note's commit
    /// (see `SetupNotes::shaped`), kept like `ddl_points`.
    shaped_points: Vec<(u32, Lsn)>,
    /// The enum types under the tables' column types, as the archive records them.
    enum_types: pgtrail_store::EnumTypes,
    /// The enum types are to be looked up at the next look: the session is new, a layout
    /// changed (a column added, labels added or renamed), or the stream named a type.
    enums_due: bool,
    /// Reads decided on (a rewrite or a drop found) and not stored yet, each with the point
    /// the table's rows are unknown from: recorded before the copy (see `META_PENDING_READS`
    /// in the store), dropped from the list when the read is stored.
    pending_reads: Vec<TableScope>,
    /// `pending_reads` changed since it was last recorded.
    pending_changed: bool,
    /// Whether the server publishes schemas (PostgreSQL 15 and later), asked at the session's
    /// first look (see `slot::publication_memberships`).
    schema_publications: Option<bool>,
    /// What made each published table a member at the latest look of this session (none
    /// before its first): a table read whole after that look takes its membership from it.
    memberships_seen: Option<BTreeMap<u32, (u32, u32)>>,
    /// The held tables' memberships as the archive records them (see `META_MEMBERSHIPS` in
    /// the store): a look that finds them otherwise records them again.
    memberships_recorded: BTreeMap<u32, (u32, u32)>,
}

/// The membership a table read while it was out of the publication is held with: no
/// publication has OID 0, so whatever makes it a member later differs, and the table is read
/// again (its changes between the read and then never reached the stream).
const NOT_A_MEMBER: (u32, u32) = (0, 0);

#[derive(Debug)]
struct Held {
    since: (Lsn, i64),
    layout: Option<StorageLayout>,
    /// A new file node with every column as it was: a TRUNCATE if the stream brings one in
    /// the transaction that wrote the table's catalog row, else a rewrite. Decided once the
    /// stream has passed the look that saw it: (that transaction, the point after that look,
    /// the point the rows may be unknown from).
    undecided: Option<(u32, Lsn, (Lsn, i64))>,
    /// The column names the catalog showed for the table, at its snapshot and at each look
    /// since, with when, and the point from which the archive's schema versions are checked
    /// against them: a version with a name the catalog did not hold around its point had a
    /// column that came and went between two looks (a column renamed and renamed back, with
    /// writes in between): rows written before it cannot be told apart from rows of another
    /// column.
    catalog_names: ShownNames,
    names_from: Lsn,
    /// A rewrite or drop a look saw before the stream had passed it, with the trigger
    /// installed, or before the log held every transaction before the point the rows may be
    /// unknown from: that point, kept until a later look dates it or can check every schema
    /// version before it.
    deferred: Option<(Lsn, i64)>,
    /// A read decided on and not stored yet that a later look must carry out, whatever it
    /// sees then: one put off by a look that put the table back in the publication (the only
    /// look to see it was out, see `deferred`), or one an earlier session recorded as pending
    /// (a reconnect or a restart came between the decision and the read; the condition that
    /// decided it, such as a table out of the publication, may not show again).
    read_due: bool,
    /// What made the table a member of the publication at the previous look (see
    /// `slot::publication_memberships`): another one now means it left the publication and
    /// came back between two looks (by hand, or another capture on the same publication put
    /// it back first), its changes in between never sent. For a table just read whole, the
    /// look that decided the read (which came before the read's snapshot); after a restart,
    /// what the archive recorded. Unknown (`None`) only for a table the archive recorded none
    /// for (its first look, an archive of an older pgtrail) or one held from its creation.
    membership: Option<(u32, u32)>,
}

impl Held {
    fn new(since: (Lsn, i64), layout: Option<StorageLayout>) -> Held {
        let mut held = Held {
            since,
            layout: None,
            undecided: None,
            catalog_names: ShownNames::default(),
            names_from: since.0,
            deferred: None,
            read_due: false,
            membership: None,
        };
        if let Some(layout) = layout {
            held.accept(layout);
        }
        held
    }

    /// Take `layout` as the table's known one, with its names: one not shown already is taken
    /// as held since the point versions are checked from (the look that found it, if any, has
    /// noted it from an earlier point already; see [`ShownNames::look`]).
    fn accept(&mut self, layout: StorageLayout) {
        self.catalog_names
            .show(&layout.column_names, self.names_from);
        self.layout = Some(layout);
    }

    /// The point of the first of the archive's schema versions of `oid` since the checked
    /// point that names a column the catalog did not hold around the version's point (see
    /// `catalog_names`).
    fn name_never_shown(
        &self,
        reader: &LogReader,
        oid: u32,
    ) -> Result<Option<(Lsn, i64)>, CaptureError> {
        // Names not recorded (a layout of format 2): nothing to check against yet.
        if self.catalog_names.is_empty() {
            return Ok(None);
        }
        // The version's commit time, or (its transaction's record compacted away) the
        // table's snapshot time, which is earlier: the span refused starts no later.
        Ok(reader
            .versions_of(oid, self.names_from)?
            .into_iter()
            .find(|(version, _)| {
                let at = version.valid_from.commit_lsn;
                version
                    .columns
                    .iter()
                    .any(|c| !self.catalog_names.held_at(&c.name, at))
            })
            .map(|(version, at_us)| (version.valid_from.commit_lsn, at_us.unwrap_or(self.since.1))))
    }
}

/// What a look at the catalog found to do.
#[derive(Debug, Default)]
pub(crate) struct SyncPlan {
    /// Tables to read whole: new ones, and rewritten ones (their scope says since when their
    /// rows are not known).
    pub copy: Vec<(CapturedTable, TableScope)>,
    /// Held tables that no longer exist.
    pub dropped: Vec<TableScope>,
    /// Held tables whose name, columns or replica identity changed in the catalog with no
    /// stored value changed: their schema as the catalog says is recorded (a rename or a new
    /// column is then known without waiting for the table's next write).
    pub reshaped: Vec<u32>,
    /// The point read before the look, when every held table's layout was as recorded: to
    /// keep in the archive, so that a later session knows from when a rewrite it finds
    /// happened.
    pub layouts_seen: Option<(Lsn, i64)>,
    /// The tables left out (cannot be captured safely), when that list changed: to record.
    pub left_out: Option<Vec<(String, String)>>,
    /// The held tables' layouts, when one changed: to record.
    pub layouts: Option<pgtrail_store::HeldLayouts>,
    /// Every enum type the archive knows under a column type, when the look found one new or
    /// changed: to record.
    pub enum_types: Option<pgtrail_store::EnumTypes>,
    /// Every read decided on and not stored yet, when that list changed: to record, durably,
    /// before any copy starts.
    pub pending_reads: Option<Vec<TableScope>>,
    /// What made each held table a member of the publication, when that changed: to record
    /// with (never before) `pending_reads`.
    pub memberships: Option<Vec<(u32, (u32, u32))>>,
}

impl SyncPlan {
    pub(crate) fn is_empty(&self) -> bool {
        self.copy.is_empty() && self.dropped.is_empty() && self.reshaped.is_empty()
    }

    /// What the look found that the archive keeps beside its transactions (the point where
    /// every layout was as recorded, the tables left out, the accepted layouts), to be
    /// written with the log's next commit.
    pub(crate) fn records(&mut self) -> Vec<LogOp> {
        let mut ops = Vec::new();
        if let Some((lsn, at_us)) = self.layouts_seen.take() {
            ops.push(LogOp::CatalogSeen(lsn, at_us));
        }
        if let Some(left_out) = self.left_out.take() {
            ops.push(LogOp::LeftOut(left_out));
        }
        if let Some(layouts) = self.layouts.take() {
            ops.push(LogOp::Layouts(layouts));
        }
        if let Some(types) = self.enum_types.take() {
            ops.push(LogOp::EnumTypes(types));
        }
        if let Some(pending) = self.pending_reads.take() {
            ops.push(LogOp::PendingReads(pending));
        }
        if let Some(memberships) = self.memberships.take() {
            ops.push(LogOp::Memberships(memberships));
        }
        ops
    }
}

impl TableWatch {
    /// The watch of an archive: every relation some stored snapshot holds (and has not
    /// dropped since).
    pub(crate) fn of_archive(writer: &WriterHandle) -> Result<TableWatch, CaptureError> {
        let reader = LogReader::of_shared(&writer.shared_log())?;
        let mut watch = TableWatch {
            last_look: reader.catalog_seen()?,
            enum_types: reader.enum_types()?,
            enums_due: true,
            ..TableWatch::default()
        };
        let relations = reader.relations()?;
        for s in reader.snapshots()? {
            let since = (s.lsn, s.committed_at_us);
            match s.tables {
                // A snapshot that names no table (written before snapshots named them) held
                // every table the archive knew then: all of them, as far as can be told.
                None => {
                    for r in &relations {
                        watch.held.insert(r.relation_id, Held::new(since, None));
                    }
                }
                Some(tables) => watch.hold(since, tables),
            }
        }
        // Layouts accepted later than a table's snapshot (after a TRUNCATE, or DDL that
        // changed no stored value) win over the snapshot's.
        for (oid, (seen, layout)) in reader.layouts()? {
            if let Some(held) = watch.held.get_mut(&oid)
                && seen >= held.since.0
            {
                // Versions stay checked from the table's snapshot on, against the names of
                // both layouts: a version with a passing name that reached the archive after
                // the previous session's last look, with a commit LSN before it, is found
                // (torture found one a crash left so). A column added and dropped since the
                // snapshot may cost one needless read after a restart; never a missed one.
                held.accept(layout);
            }
        }
        watch.layouts_changed = false;
        // A table taken out of the publication and put back while no capture ran (or by a look
        // that a crash cut short before recording what it found) has another membership now.
        watch.memberships_recorded = reader.memberships()?;
        for (oid, held) in &mut watch.held {
            held.membership = watch.memberships_recorded.get(oid).copied();
        }
        // Recorded again at the first look, without the reads a snapshot has stored since.
        watch.pending_reads = reader.pending_reads()?;
        watch.pending_changed = true;
        // Each is carried out by the first look that can check the table's schema versions
        // before its point: what decided it (a table out of the publication and back, say)
        // may not show again, and the archive refuses the table's moments from the point
        // until a read is stored.
        for pending in &watch.pending_reads {
            if let (Some(from), false) = (pending.unknown_from, pending.dropped)
                && let Some(held) = watch.held.get_mut(&pending.relation_id)
            {
                held.read_due = true;
                held.deferred = Some(held.deferred.map_or(from, |d| d.min(from)));
            }
        }
        Ok(watch)
    }

    /// Take what `pgtrail setup`'s trigger told the stream: tables published as they were
    /// created are held from their creating transaction (not read whole), DDL points are
    /// kept for dating (see [`due`](Self::due)). Whether DDL was noted.
    pub(crate) fn note_setup(&mut self, notes: SetupNotes) -> bool {
        for (point, scope) in notes.created {
            tracing::info!(relation_id = scope.relation_id, at = %point.0, "new table published as it was created: captured from its first row");
            self.hold(point, vec![scope]);
        }
        let noted = !notes.ddl.is_empty();
        self.ddl_points.extend(notes.ddl);
        self.shaped_points.extend(notes.shaped);
        noted
    }

    /// The stream named a type that is not built in (it does before a relation that uses one):
    /// the next look finds whether an enum is under it.
    pub(crate) fn note_types(&mut self) {
        self.enums_due = true;
    }

    /// Note what a stored snapshot at `since` says of its tables.
    pub(crate) fn hold(&mut self, since: (Lsn, i64), tables: Vec<TableScope>) {
        self.layouts_changed = true;
        let pending = self.pending_reads.len();
        self.pending_reads.retain(|p| {
            !tables.iter().any(|t| t.relation_id == p.relation_id)
                || p.unknown_from.is_some_and(|(from, _)| from >= since.0)
        });
        self.pending_changed |= self.pending_reads.len() != pending;
        for t in tables {
            if t.dropped {
                self.held.remove(&t.relation_id);
            } else {
                self.held.insert(t.relation_id, Held::new(since, t.layout));
            }
        }
    }

    /// Note a stored copy at `since` of `tables` (see [`hold`](Self::hold)), read whole after
    /// this session's latest look: each table read is held with the membership that look
    /// found (see `Held::membership`), so that the table taken out of the publication and put
    /// back before the next look is found.
    pub(crate) fn hold_read(&mut self, since: (Lsn, i64), tables: Vec<TableScope>) {
        let read: Vec<u32> = tables
            .iter()
            .filter(|t| !t.dropped)
            .map(|t| t.relation_id)
            .collect();
        self.hold(since, tables);
        for oid in read {
            if let (Some(held), Some(seen)) = (self.held.get_mut(&oid), &self.memberships_seen) {
                held.membership = Some(seen.get(&oid).copied().unwrap_or(NOT_A_MEMBER));
            }
        }
    }

    /// Look at the catalog: add what the selection takes in to the publication, and say
    /// which tables to read whole (published and not held yet, or rewritten by DDL) and which
    /// held tables were dropped.
    pub(crate) async fn due(
        &mut self,
        sql: &tokio_postgres::Client,
        config: &CaptureConfig,
        stream: &Translator,
        archive: &SharedLog,
    ) -> Result<SyncPlan, CaptureError> {
        let look = server_point(sql).await?;
        let trigger = crate::setup::installed(sql).await?;
        if let Some(installed) = &trigger {
            // A trigger taking in other new tables than this capture would publish tables it
            // leaves out: stop rather than archive them.
            crate::setup::check_selection(installed, &config.publication, &config.tables)?;
        }
        let exact_points = trigger.is_some();
        let mut plan = SyncPlan::default();
        let publication = config.publication.as_str();
        let mut published = slot::publication_tables(sql, publication).await?;
        let published_before: BTreeSet<u32> = published.iter().map(|t| t.oid).collect();
        // An exact --tables list is fixed when the session starts; patterns and the default
        // (every safe table) take in tables that appear later.
        if !slot::is_exact_list(&config.tables) {
            self.take_in_new_tables(sql, config, &mut plan, &mut published)
                .await?;
        }
        let oids: Vec<u32> = published
            .iter()
            .map(|t| t.oid)
            .chain(self.held.keys().copied())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let layouts = slot::storage_layouts(sql, &oids).await?;
        let schemas = match self.schema_publications {
            Some(known) => known,
            None => *self
                .schema_publications
                .insert(slot::has_schema_publications(sql).await?),
        };
        let memberships_now = slot::publication_memberships(sql, publication, schemas).await?;
        let after = server_point(sql).await?.0;
        let by_oid: BTreeMap<u32, &CapturedTable> = published.iter().map(|t| (t.oid, t)).collect();
        let mut rewritten = Vec::new();
        let mut undecided = false;
        let reader = LogReader::of_shared(archive)?;
        // Every transaction committed before this point is in the log, with its schema
        // versions: `name_never_shown` has checked the versions before it, and a later look
        // checks the rest. A decision that ends a table's checks (dropped, out of the
        // publication, read again) from a point the log has not reached waits for a later
        // look: a column renamed and renamed back before that point, with writes under the
        // passing name, streamed after this look, would never be checked, and the span
        // before the point would answer those rows under a column the table never had at
        // that moment. (The torture suite found it: a look while the stream lagged saw the
        // name back, the next found the table dropped.)
        let checked_through = reader.position()?;
        // Reads decided on and put off until the log catches up (recorded as pending below).
        let mut put_off = Vec::new();
        for (oid, held) in &mut self.held {
            // Rows changed without a change in the stream after the later of the table's
            // last snapshot and the previous look (which saw the old layout), or after the
            // point an earlier look kept for it.
            let unknown_from = held
                .deferred
                .unwrap_or_else(|| self.last_look.map_or(held.since, |l| l.max(held.since)));
            // With `pgtrail setup`'s trigger, DDL is noted in the stream at its own commit:
            // the earliest note for this table (or for any table) after that point dates the
            // DDL the look found. Every DDL that can rewrite a table is noted (ALTER TABLE on
            // it or an ancestor names it, any other command names none), so the earliest
            // note is never after it. Until the stream has passed this look, a note may
            // still be on its way: the decision waits for a later look.
            let noted = self
                .ddl_points
                .iter()
                .filter(|(r, p)| (*r == *oid || *r == 0) && p.0 >= unknown_from.0)
                .map(|(_, p)| *p)
                .min();
            let waiting = exact_points && noted.is_none() && stream.wal_end < after;
            let dated = noted.unwrap_or(unknown_from);
            // Dropped, or (still there but) out of the publication: either way its changes stop
            // reaching the archive, which must not go on showing its last rows as current.
            let now = layouts.get(oid);
            if now.is_none() || !by_oid.contains_key(oid) {
                let from = held.undecided.map_or(dated, |u| u.2);
                if (waiting && now.is_none()) || checked_through < from.0 {
                    held.deferred = Some(unknown_from);
                    undecided = true;
                    continue;
                }
                // The table's last look is behind: a version before the point with a name no
                // look showed moves the point back to it.
                let renamed = held.name_never_shown(&reader, *oid)?;
                plan.dropped.push(TableScope {
                    unknown_from: Some(renamed.map_or(from, |r| r.min(from))),
                    dropped: true,
                    unpublished: now.is_some(),
                    ..TableScope::whole(*oid)
                });
                continue;
            }
            let now = now.expect("checked");
            // Taken out of the publication since the previous look (by hand) and put back by
            // this one, or out and back in between the two (its membership's catalog row is
            // new): its changes in between never reached the stream. Read again, the span
            // refused, rather than go on from rows that may be stale.
            let membership = memberships_now.get(oid).copied();
            let republished = !published_before.contains(oid)
                || held
                    .membership
                    .is_some_and(|before| Some(before) != membership);
            held.membership = membership;
            // The names this look shows: held since the previous look (which did not show a
            // new one), and the others no longer after this look.
            if !held.catalog_names.is_empty() {
                let previous = self.last_look.map_or(held.since.0, |l| l.0);
                held.catalog_names
                    .look(&now.layout.column_names, previous, after);
            }
            // First, as for a drop: a version with a name the catalog did not hold at its
            // point (the log holds every version before the one found, so the read from there
            // covers all the rest).
            if let Some(point) = held.name_never_shown(&reader, *oid)? {
                rewritten.push((*oid, point.min(unknown_from), "a column name came and went between two looks at the catalog (a column renamed and renamed back?)"));
                continue;
            }
            if republished || held.read_due {
                if checked_through < unknown_from.0 {
                    held.read_due = true;
                    held.deferred = Some(unknown_from);
                    undecided = true;
                    // Recorded now, with the membership this look found (see below): a
                    // restart before the read finds the read pending, not the table as a
                    // member all along.
                    put_off.push(TableScope {
                        unknown_from: Some(unknown_from),
                        ..TableScope::whole(*oid)
                    });
                    continue;
                }
                rewritten.push((*oid, unknown_from, match republished {
                    true => "it was out of the publication (its changes meanwhile were not sent) and is back in it",
                    false => "a read decided on earlier was not stored (a reconnect or a restart came first)",
                }));
                continue;
            }
            let Some(known) = &held.layout else {
                held.names_from = look.0;
                held.accept(now.layout.clone());
                continue;
            };
            let names_unrecorded = known.column_names.is_empty();
            match partitioned_layout_change(known, now) {
                // A layout recorded before layouts held the columns' names (format 2) takes
                // them from the first look that finds nothing else changed; versions are
                // checked against them from this look on. Labels are recorded the same way.
                LayoutChange::Filled => {
                    if names_unrecorded && !now.layout.column_names.is_empty() {
                        held.names_from = look.0;
                    }
                    held.accept(now.layout.clone());
                    self.layouts_changed = true;
                }
                LayoutChange::None => {}
                // DDL without new storage (a table renamed, a column added without a default
                // or dropped, SET SCHEMA): no stored value changed, the schema did.
                //
                // With `pgtrail setup`'s trigger, the stream records the schema after each
                // ALTER TABLE at its own commit (the note carries it); a shape read from the
                // catalog here and recorded at a later fence could be older than one the
                // stream records in between (DDL committing during this look), and would then
                // override it. So once the stream has passed this look, a table the trigger
                // noted a schema for since the previous look is left to those versions; one it
                // did not note (its function failed, or an older trigger) is recorded here.
                LayoutChange::Schema => {
                    let shaped = self
                        .shaped_points
                        .iter()
                        .any(|(r, p)| *r == *oid && *p >= unknown_from.0);
                    if exact_points && !shaped && stream.wal_end < after {
                        undecided = true;
                    } else {
                        held.accept(now.layout.clone());
                        self.layouts_changed = true;
                        if !shaped {
                            plan.reshaped.push(*oid);
                        }
                    }
                }
                LayoutChange::Rewrite if waiting || checked_through < dated.0 => {
                    held.deferred = Some(unknown_from);
                    undecided = true;
                }
                LayoutChange::Rewrite => rewritten.push((
                    *oid,
                    dated,
                    "rewritten by DDL (new storage, a column default existing rows take, a column renamed, or an enum label renamed)",
                )),
                LayoutChange::NewFile { xid } => {
                    let (xid, passed, from) =
                        *held.undecided.get_or_insert((xid, after, unknown_from));
                    if stream.truncated_in(xid, *oid) {
                        // A TRUNCATE, which the stream replays exactly.
                        held.accept(now.layout.clone());
                        held.undecided = None;
                        self.layouts_changed = true;
                    } else if stream.wal_end >= passed && checked_through >= from.0 {
                        // The stream is past the look and brought no TRUNCATE: VACUUM FULL,
                        // CLUSTER, or a rewrite that kept every column's type.
                        tracing::info!(relation_id = *oid, xid, passed = %passed, wal_end = %stream.wal_end, truncated_in = ?stream.truncates_of(*oid), "new storage with no TRUNCATE in its transaction");
                        rewritten.push((*oid, from, "rewritten (new storage: VACUUM FULL, CLUSTER, or DDL that kept the columns' types)"));
                    } else {
                        undecided = true;
                    }
                }
            }
        }
        for (oid, from, why) in rewritten {
            if let Some(table) = by_oid.get(&oid) {
                tracing::info!(table = %table.qualified(), "{why}; reading the table again");
                plan.copy.push((
                    (*table).clone(),
                    TableScope {
                        unknown_from: Some(from),
                        ..TableScope::whole(oid)
                    },
                ));
            }
        }
        let settled = plan.copy.is_empty() && plan.dropped.is_empty() && !undecided;
        for t in published {
            if !self.held.contains_key(&t.oid) {
                plan.copy.push((t.clone(), TableScope::whole(t.oid)));
            }
        }
        // Each read decided on is recorded before its copy starts: a crash before the copy is
        // stored leaves an archive that refuses the table's moments from the point, not one
        // that answers its old rows there until the next run decides again.
        for scope in plan
            .copy
            .iter()
            .map(|(_, s)| s)
            .chain(&plan.dropped)
            .chain(&put_off)
        {
            if scope.unknown_from.is_some() && !self.pending_reads.contains(scope) {
                self.pending_reads.push(scope.clone());
                self.pending_changed = true;
            }
        }
        if std::mem::take(&mut self.pending_changed) {
            plan.pending_reads = Some(self.pending_reads.clone());
        }
        // Recorded in the same commit as the reads decided on (`records` puts them first), so
        // an archive never holds a membership whose change it has not acted on: a table found
        // out and back is read again, or its read is pending, before the new membership is
        // what a restart compares with.
        plan.memberships = self.memberships_to_record();
        self.memberships_seen = Some(memberships_now);
        self.last_look = Some(look);
        plan.layouts_seen = settled.then_some(look);
        // A later look dates from this look's point, or from a point kept for a table.
        let oldest_needed = self
            .held
            .values()
            .filter_map(|h| h.deferred.map(|d| d.0))
            .fold(look.0, Lsn::min);
        self.ddl_points.retain(|(_, p)| p.0 >= oldest_needed);
        self.shaped_points.retain(|(_, p)| *p >= oldest_needed);
        if std::mem::take(&mut self.enums_due) || self.layouts_changed {
            let found = slot::enum_types(sql, &oids).await;
            // Looked up again at the next look if this one failed (then the error ends it).
            self.enums_due = found.is_err();
            let mut known = self.enum_types.clone();
            known.extend(found?);
            if known != self.enum_types {
                self.enum_types = known;
                plan.enum_types = Some(self.enum_types.clone());
            }
        }
        if std::mem::take(&mut self.layouts_changed) {
            plan.layouts = Some(
                self.held
                    .iter()
                    .filter_map(|(oid, h)| h.layout.clone().map(|l| (*oid, (look.0, l))))
                    .collect(),
            );
        }
        Ok(plan)
    }

    /// The held tables' memberships, when they differ from what the archive records: to
    /// record (as [`LogOp::Memberships`]); then taken as recorded.
    pub(crate) fn memberships_to_record(&mut self) -> Option<Vec<(u32, (u32, u32))>> {
        let memberships: BTreeMap<u32, (u32, u32)> = self
            .held
            .iter()
            .filter_map(|(oid, h)| h.membership.map(|m| (*oid, m)))
            .collect();
        if memberships == self.memberships_recorded {
            return None;
        }
        let record = memberships.iter().map(|(o, m)| (*o, *m)).collect();
        self.memberships_recorded = memberships;
        Some(record)
    }

    /// Add the tables the selection takes in and the publication lacks to it (when this role
    /// may change it), reporting those left out; `published` is then the publication's tables.
    async fn take_in_new_tables(
        &mut self,
        sql: &tokio_postgres::Client,
        config: &CaptureConfig,
        plan: &mut SyncPlan,
        published: &mut Vec<CapturedTable>,
    ) -> Result<(), CaptureError> {
        let publication = config.publication.as_str();
        let (eligible, excluded) = slot::choose_tables(sql, &config.tables).await?;
        let left_out: Vec<(String, String)> = excluded
            .iter()
            .map(|t| (t.qualified.clone(), t.reason.clone()))
            .collect();
        if self.left_out.as_ref() != Some(&left_out) {
            plan.left_out = Some(left_out.clone());
            self.left_out = Some(left_out);
        }
        for t in excluded {
            if self.reported.get(&t.oid) != Some(&t.reason) {
                tracing::warn!(table = %t.qualified, reason = %t.reason, "table not captured");
                self.reported.insert(t.oid, t.reason);
            }
        }
        let publishes: BTreeSet<u32> = published.iter().map(|t| t.oid).collect();
        let missing: Vec<CapturedTable> = eligible
            .into_iter()
            .filter(|t| !publishes.contains(&t.oid) && !self.refused.contains(&t.oid))
            .collect();
        let owner = if missing.is_empty() {
            None
        } else {
            slot::publication_owner(sql, publication).await?
        };
        if let Some((owner, false)) = &owner {
            // A publication a DBA made is used as it is, never changed (least privilege):
            // say once per table what would capture it.
            for t in missing.iter().filter(|t| self.refused.insert(t.oid)) {
                tracing::warn!(
                    table = %t.qualified(),
                    "table not captured: publication {publication:?} belongs to {owner:?}, and pgtrail does not change it; to capture the table, have its owner run: ALTER PUBLICATION {} ADD TABLE {};",
                    always_quoted(publication),
                    t.sql_name()
                );
            }
        } else if !missing.is_empty() {
            match slot::add_to_publication(sql, publication, &missing).await {
                Ok(()) => {
                    for t in &missing {
                        self.reported.remove(&t.oid);
                        tracing::info!(table = %t.qualified(), "new table added to the publication");
                    }
                    *published = slot::publication_tables(sql, publication).await?;
                }
                Err(e @ CaptureError::Setup { .. }) => {
                    // Capture goes on with what it may publish; the DBA's fix is logged.
                    tracing::warn!(error = %e, "new tables left out");
                    self.refused.extend(missing.iter().map(|t| t.oid));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// How a held table's storage layout changed since it was last seen.
#[derive(Debug, PartialEq, Eq)]
enum LayoutChange {
    None,
    /// What the archive had not recorded (the column names of a version-2 layout) filled in,
    /// or enum labels added: nothing stored and no schema changed.
    Filled,
    /// Only catalog rows (names, columns, replica identity): no stored value changed.
    Schema,
    /// Stored values changed without a change in the stream: a column gained a value existing
    /// rows take from the catalog, or new storage came with column DDL (ALTER … TYPE, a column
    /// added with a volatile default).
    Rewrite,
    /// New storage and every column as it was: a TRUNCATE (replayed by the stream) if the
    /// stream brought one of the table in `xid` (the transaction that wrote the new storage's
    /// catalog row), else VACUUM FULL, CLUSTER, or a rewrite that kept the columns' types.
    NewFile {
        xid: u32,
    },
}

/// [`layout_change`], with a partitioned table's leaf partitions: rows came or went without a
/// change in the stream when the parent's column DDL rewrote the leaves (`ALTER COLUMN …
/// TYPE`), a leaf left (detached or dropped), or a leaf that holds pages joined (attached with
/// rows). A leaf that joined empty (`CREATE TABLE … PARTITION OF`, not written yet) brought no
/// row: the layout takes it in without a read. Leaves given new files by one transaction with
/// the columns unchanged are a new file of the parent's ([`LayoutChange::NewFile`]): a
/// TRUNCATE of the parent, which the stream replays as the parent's, costs no read; a leaf
/// truncated by itself, which pgoutput does not send when publishing through the root, VACUUM
/// FULL or CLUSTER is read again. A layout that did not record its leaves (versions 2 to 4)
/// finds every non-empty leaf new: one read after the upgrade.
fn partitioned_layout_change(known: &StorageLayout, now: &slot::LayoutNow) -> LayoutChange {
    if known.partitions == now.layout.partitions {
        return layout_change(known, &now.layout);
    }
    let before: BTreeMap<u32, u32> = known.partitions.iter().copied().collect();
    let after: BTreeMap<u32, u32> = now.layout.partitions.iter().copied().collect();
    let left = before.keys().any(|leaf| !after.contains_key(leaf));
    let joined_with_rows = after
        .keys()
        .any(|leaf| !before.contains_key(leaf) && !now.empty_partitions.contains(leaf));
    // The transactions that gave leaves new files (a leaf's columns cannot be altered apart
    // from its parent's, so with the parent's columns unchanged none changed a value's type).
    let renewed_by: BTreeSet<u32> = now
        .layout
        .partitions
        .iter()
        .zip(&now.partition_versions)
        .filter(|((leaf, file), _)| before.get(leaf).is_some_and(|f| f != file))
        .map(|(_, xid)| *xid)
        .collect();
    let columns_changed = known.column_versions != now.layout.column_versions;
    if left || joined_with_rows || (columns_changed && !renewed_by.is_empty()) {
        return LayoutChange::Rewrite;
    }
    let same_leaves = StorageLayout {
        partitions: known.partitions.clone(),
        ..now.layout.clone()
    };
    match (layout_change(known, &same_leaves), renewed_by.len()) {
        (LayoutChange::None, 0) => LayoutChange::Filled,
        (LayoutChange::None | LayoutChange::Filled | LayoutChange::Schema, 1) => {
            LayoutChange::NewFile {
                xid: *renewed_by.first().expect("one"),
            }
        }
        // New files from several transactions (each would have to be a TRUNCATE of the
        // parent): read the table again rather than tell them apart.
        (_, 2..) => LayoutChange::Rewrite,
        (other, _) => other,
    }
}

fn layout_change(known: &StorageLayout, now: &StorageLayout) -> LayoutChange {
    if known == now {
        return LayoutChange::None;
    }
    let label_renamed = label_renamed(known, now);
    // What a look fills in that changes nothing stored: the names a version-2 layout did not
    // record, and enum labels added (or not recorded before version 4).
    let filled = StorageLayout {
        column_names: if known.column_names.is_empty() {
            Vec::new()
        } else {
            now.column_names.clone()
        },
        enum_labels: known.enum_labels.clone(),
        ..now.clone()
    };
    if *known == filled && !label_renamed {
        LayoutChange::Filled
    } else if known.missing_values != now.missing_values
        || column_renamed(known, now)
        || label_renamed
    {
        // A renamed column is read again too: pgoutput shows a rename as one column gone and
        // another come, and rows written before it would read the new name as NULL (they
        // are matched to the newer schema version by name); the re-read holds every row
        // under the new name from its point on. A renamed enum label changes how every
        // stored value of it reads, and the stream says nothing.
        LayoutChange::Rewrite
    } else if known.file_node == now.file_node {
        LayoutChange::Schema
    } else if known.column_versions != now.column_versions {
        LayoutChange::Rewrite
    } else {
        LayoutChange::NewFile {
            xid: now.table_version,
        }
    }
}

/// Whether an enum label both layouts know (by its OID) reads differently now (`ALTER TYPE …
/// RENAME VALUE`); never when the earlier layout did not record labels (versions 2 and 3).
fn label_renamed(known: &StorageLayout, now: &StorageLayout) -> bool {
    let now: BTreeMap<u32, &str> = now
        .enum_labels
        .iter()
        .map(|(oid, label)| (*oid, label.as_str()))
        .collect();
    known
        .enum_labels
        .iter()
        .any(|(oid, label)| now.get(oid).is_some_and(|l| l != label))
}

/// Whether an attribute present in both layouts bears another name now (`RENAME COLUMN`);
/// never when the earlier layout did not record names (version 2).
fn column_renamed(known: &StorageLayout, now: &StorageLayout) -> bool {
    known
        .column_names
        .iter()
        .zip(&now.column_names)
        .any(|(before, after)| !before.is_empty() && !after.is_empty() && before != after)
}

/// The server's WAL insert position and clock (µs since the Unix epoch), read together.
pub(crate) async fn server_point(sql: &tokio_postgres::Client) -> Result<(Lsn, i64), CaptureError> {
    lsn_with_clock(
        sql,
        "pg_current_wal_insert_lsn()",
        &[],
        "reading the server's WAL position and clock",
    )
    .await
}

/// `SELECT {lsn_sql}` and the server's clock (µs since the Unix epoch), in one statement.
async fn lsn_with_clock(
    sql: &tokio_postgres::Client,
    lsn_sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    doing: &str,
) -> Result<(Lsn, i64), CaptureError> {
    let row = sql
        .query_one(
            &format!(
                "SELECT ({lsn_sql})::text, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint"
            ),
            params,
        )
        .await
        .map_err(|e| CaptureError::sql(doing, e))?;
    let lsn: String = row.get(0);
    let lsn = lsn
        .parse()
        .map_err(|_| CaptureError::Protocol(format!("the server sent a bad LSN {lsn:?}")))?;
    Ok((lsn, row.get(1)))
}

/// A synchronised copy waiting for the stream to reach its point.
pub(crate) struct PendingSync {
    /// The temporary slot's consistent point: the copy holds exactly the transactions
    /// committed before it.
    pub point: Lsn,
    /// The server's clock at `point` or just after.
    committed_at_us: i64,
    spool: Spool,
}

impl PendingSync {
    /// Whether the copy must be stored before `ops` (the operations of one stream event):
    /// they are the first at or past its point.
    pub(crate) fn due_before(&self, ops: &[LogOp]) -> bool {
        ops.first().is_some_and(|op| match op {
            // A commit record cannot start at `point - 1` (records are aligned): a transaction
            // keyed at or after it committed after the consistent point.
            LogOp::Begin { final_lsn, .. } => final_lsn.0 >= self.point.0.saturating_sub(1),
            LogOp::Advance(lsn) | LogOp::NonTransactionalMessage { lsn, .. } => *lsn >= self.point,
            _ => false,
        })
    }

    /// The copy in `pending` if it must be stored before `ops` (see [`Self::due_before`]),
    /// taken out and dated by them (see [`Self::settle_time`]): its key and its time are then
    /// final for both [`Self::since`] and [`Self::store`].
    pub(crate) fn take_due(
        pending: &mut Option<PendingSync>,
        ops: &[LogOp],
    ) -> Option<PendingSync> {
        let mut sync = pending.take_if(|p| p.due_before(ops))?;
        sync.settle_time(ops);
        Some(sync)
    }

    /// Date the copy no later than `next` (the operations it is stored before), when they
    /// begin a transaction committed earlier than the clock read just after the point. The
    /// copy holds the tables as they were from the last transaction before its point until
    /// the first after it: any time in between answers `as_of` exactly, but one after a
    /// later transaction's commit would leave that transaction in an `as_of` of a moment
    /// the copy is not (a transaction can commit between the point and the clock read).
    fn settle_time(&mut self, next: &[LogOp]) {
        if let Some(LogOp::Begin {
            committed_at_us, ..
        }) = next.first()
        {
            self.committed_at_us = self.committed_at_us.min(*committed_at_us);
        }
    }

    /// Where the stored copy is keyed (just before its point) and its commit time.
    pub(crate) fn since(&self) -> (Lsn, i64) {
        (Lsn(self.point.0 - 1), self.committed_at_us)
    }

    /// What the copy says of each table it holds (its scope marks, in order).
    pub(crate) fn tables(&self) -> Vec<TableScope> {
        self.spool
            .marks
            .iter()
            .filter_map(|(_, op)| match op {
                LogOp::SnapshotOf(scope) => Some(scope.clone()),
                _ => None,
            })
            .collect()
    }

    /// Store the copy as one snapshot transaction keyed just before its point. Returns the
    /// number of rows stored.
    pub(crate) async fn store(self, writer: &WriterHandle) -> Result<u64, CaptureError> {
        writer
            .send(vec![LogOp::Begin {
                final_lsn: self.since().0,
                xid: 0,
                committed_at_us: self.committed_at_us,
            }])
            .await?;
        let rows = self.spool.replay(writer).await?;
        writer
            .send(vec![LogOp::Commit {
                end_lsn: self.point,
            }])
            .await?;
        Ok(rows)
    }
}

/// Carry out a look's plan: copy the tables to read inside a temporary slot's snapshot into
/// a spool (with the dropped tables' marks), and emit the fence that tells the stream when it
/// has passed the snapshot's point.
pub(crate) async fn sync(
    config: &CaptureConfig,
    sql: &tokio_postgres::Client,
    plan: SyncPlan,
) -> Result<PendingSync, CaptureError> {
    let mut spool = Spool::new(&config.archive)?;
    for oid in plan.reshaped {
        // Recorded at the point below, after the look that saw it; the writer keeps it only
        // if the stream did not bring the same shape first.
        let relation = within(
            config.stream_timeout,
            "reading a table's schema from the catalog",
            slot::relation_from_catalog(sql, oid),
        )
        .await?;
        tracing::info!(table = %relation.qualified_name(), "schema changed in the catalog; recorded");
        spool.send(vec![LogOp::Relation(relation)]).await?;
    }
    for scope in plan.dropped {
        tracing::info!(
            relation_id = scope.relation_id,
            "a captured table was dropped"
        );
        spool.send(vec![LogOp::SnapshotOf(scope)]).await?;
    }
    let (point, committed_at_us) = if plan.copy.is_empty() {
        // No copy (dropped tables, schema changes): the mark's point is the end of the fence
        // record (see `fence_point`).
        match within(
            config.stream_timeout,
            "emitting pgtrail's fence message",
            emit_fence(sql),
        )
        .await
        {
            Ok((fence_end, at_us)) => (fence_point(fence_end), at_us),
            Err(e) => {
                tracing::debug!(error = %e, "no fence message; marking the drop at a temporary slot's point");
                copy_in_step(config, sql, &[], &mut spool).await?
            }
        }
    } else {
        let point = copy_in_step(config, sql, &plan.copy, &mut spool).await?;
        // Tell the stream it has passed the point even if nothing else is written: the
        // message is decoded after every transaction that committed before it.
        if let Err(e) = within(
            config.stream_timeout,
            "emitting pgtrail's fence message",
            emit_fence(sql),
        )
        .await
        {
            tracing::debug!(error = %e, "no fence message; the copy is stored with the next transaction or keepalive past its point");
        }
        point
    };
    spool.finish().await?;
    Ok(PendingSync {
        point,
        committed_at_us,
        spool,
    })
}

/// The server sessions of table copies this process left unfinished: a session that ended
/// mid-copy (its connections cut by a network black hole, say) closes its side, but the server
/// may not notice for as long as TCP takes to give up, and meanwhile keeps the copy's
/// transaction open: its locks block DDL, and the next copy's temporary slot then waits for
/// that DDL's transaction to end, behind the first copy, for good (found by the torture soak:
/// a black hole during a copy, an ALTER TABLE in progress, the next copy stuck). Each copy
/// ends those of earlier ones before it starts.
///
/// Safe to end: an unfinished copy's rows were never stored (a copy reaches the log only
/// whole, see the module doc), and the table is copied again. Each is named by its slot (a
/// temporary slot lives only while its walsender does) and by its SQL session's process ID
/// *and* start time, so that a process ID the server reused is never ended; and each belongs
/// to the capture of one slot (held by one capture at a time), so that a copy never ends
/// another capture's in the same process.
#[derive(Default)]
struct Unfinished {
    /// (capture's slot, copy's temporary slot)
    slots: Vec<(String, String)>,
    /// (capture's slot, process ID, `backend_start` as text)
    sessions: Vec<(String, i32, String)>,
}

static UNFINISHED: std::sync::Mutex<Unfinished> = std::sync::Mutex::new(Unfinished {
    slots: Vec::new(),
    sessions: Vec::new(),
});

fn unfinished() -> std::sync::MutexGuard<'static, Unfinished> {
    UNFINISHED.lock().unwrap_or_else(|p| p.into_inner())
}

/// A copy's SQL session began (see [`Unfinished`]); it counts as unfinished until its copy
/// completes.
pub(crate) fn copy_session_started(capture_slot: &str, pid: i32, backend_start: String) {
    unfinished()
        .sessions
        .push((capture_slot.to_string(), pid, backend_start));
}

/// Marks one copy's temporary slot as unfinished until [`CopyGuard::finished`].
struct CopyGuard {
    capture_slot: String,
    slot: String,
}

impl CopyGuard {
    fn start(capture_slot: &str, slot: &str) -> CopyGuard {
        let entry = (capture_slot.to_string(), slot.to_string());
        unfinished().slots.push(entry.clone());
        CopyGuard {
            capture_slot: entry.0,
            slot: entry.1,
        }
    }

    /// The copy completed and closed its sessions itself (its SQL session `copy`): forget them.
    fn finished(self, copy: i32) {
        let mut u = unfinished();
        u.slots
            .retain(|(c, s)| !(*c == self.capture_slot && *s == self.slot));
        u.sessions
            .retain(|(c, p, _)| !(*c == self.capture_slot && *p == copy));
    }
}

/// End the server sessions of this process's unfinished copies (see [`Unfinished`]). A
/// failure is only logged: the copy then waits as before, and says what it waits for.
async fn end_unfinished_copies(
    sql: &tokio_postgres::Client,
    capture_slot: &str,
    limit: std::time::Duration,
) {
    let (slots, pids, starts): (Vec<String>, Vec<i32>, Vec<String>) = {
        let u = unfinished();
        let sessions: Vec<_> = u
            .sessions
            .iter()
            .filter(|(c, _, _)| c == capture_slot)
            .collect();
        let slots: Vec<String> = u
            .slots
            .iter()
            .filter(|(c, _)| c == capture_slot)
            .map(|(_, s)| s.clone())
            .collect();
        if slots.is_empty() && sessions.is_empty() {
            return;
        }
        (
            slots,
            sessions.iter().map(|(_, p, _)| *p).collect(),
            sessions.iter().map(|(_, _, s)| s.clone()).collect(),
        )
    };
    let ended = within(limit, "ending unfinished table copies", async {
        sql.query_one(
            "SELECT (SELECT count(pg_terminate_backend(active_pid)) FROM pg_replication_slots \
                     WHERE temporary AND slot_name = ANY($1) AND active_pid IS NOT NULL) \
                  + (SELECT count(pg_terminate_backend(a.pid)) FROM pg_stat_activity a \
                     JOIN unnest($2::int[], $3::text[]) AS u(pid, started) \
                       ON a.pid = u.pid AND a.backend_start::text = u.started)",
            &[&slots, &pids, &starts],
        )
        .await
        .map_err(|e| CaptureError::sql("ending unfinished table copies", e))
    })
    .await;
    match ended {
        Ok(row) => {
            let n: i64 = row.get(0);
            if n > 0 {
                tracing::warn!(
                    sessions = n,
                    "ended the server sessions of table copies an earlier session left unfinished (their connections were cut); their tables are copied again"
                );
            }
            // Ended now, or gone already: either way nothing of them is left to end.
            let mut u = unfinished();
            u.slots
                .retain(|(c, s)| !(c == capture_slot && slots.contains(s)));
            u.sessions.retain(|(c, p, st)| {
                !(c == capture_slot && pids.iter().zip(&starts).any(|(q, t)| q == p && t == st))
            });
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot end the sessions of unfinished table copies; a copy may wait for them")
        }
    }
}

/// Copy `copy` inside a temporary slot's exported snapshot; returns the slot's consistent
/// point and the server's clock just after it. `sql` is the capture's own connection, which
/// the steps' watchdog asks about the copy's.
async fn copy_in_step(
    config: &CaptureConfig,
    sql: &tokio_postgres::Client,
    copy: &[(CapturedTable, TableScope)],
    spool: &mut Spool,
) -> Result<(Lsn, i64), CaptureError> {
    let names = copy
        .iter()
        .map(|(t, _)| t.qualified())
        .collect::<Vec<_>>()
        .join(", ");
    tracing::info!(tables = %names, "reading tables whole, in step with the stream");
    let limit = config.stream_timeout;
    // Unique on the server while it lives; dropped by the server when this connection ends.
    let slot_name = format!(
        "pgtrail_sync_{}_{}",
        std::process::id(),
        pgtrail_store::now_us()
    );
    end_unfinished_copies(sql, &config.slot, limit).await;
    let guard = CopyGuard::start(&config.slot, &slot_name);
    let mut slot_conn = within(limit, "connecting for a table copy", async {
        ReplicationStream::connect(&config.source, &slot_name, &config.publication, None, limit)
            .await
    })
    .await?;
    // Each step below may rightly wait (the slot's creation for every transaction running
    // now to end, the lock for DDL in progress, the COPY for a large table), so none has a
    // fixed bound; each is watched instead, and a connection shown dead is a reconnect.
    let slot_holder = liveness::CopyBackend::SlotHolder(&slot_name);
    let (point, snapshot_name) = liveness::watched(
        sql,
        limit,
        slot_holder,
        "creating a table copy's temporary slot",
        None,
        slot_conn.create_slot_exporting_snapshot(&slot_name, true),
    )
    .await
    .map_err(|e| match &e {
        CaptureError::Replication(r) if r.sqlstate() == Some("53400") => CaptureError::setup(
            format!("cannot create a temporary replication slot to copy {names}: {r}"),
            "a table that joins capture (or that DDL rewrote) is read through a temporary slot: raise max_replication_slots by one (ALTER SYSTEM SET max_replication_slots = ...; then restart PostgreSQL)",
        ),
        _ => e,
    })?;
    let (copy_sql, copier) = liveness::copy_connection(&config.source, &config.slot, limit).await?;
    let locked: Vec<CapturedTable> = copy.iter().map(|(t, _)| t.clone()).collect();
    let committed_at_us = liveness::watched(
        sql,
        limit,
        copier,
        "entering a table copy's snapshot",
        None,
        snapshot::enter_snapshot(&copy_sql, &snapshot_name, &locked, "table-copy-entered"),
    )
    .await?;
    let progress = AtomicU64::new(0);
    let mut rows = 0;
    for (table, scope) in copy {
        let mut sink = snapshot::Counted {
            inner: &mut *spool,
            rows: &progress,
        };
        rows += liveness::watched(
            sql,
            limit,
            copier,
            "a table copy",
            Some(&progress),
            snapshot::copy_table(&copy_sql, table, scope.clone(), &mut sink),
        )
        .await?;
    }
    liveness::watched(
        sql,
        limit,
        copier,
        "ending a table copy's snapshot",
        None,
        snapshot::leave_snapshot(&copy_sql),
    )
    .await?;
    drop(slot_conn);
    drop(copy_sql);
    if let liveness::CopyBackend::Pid(pid) = copier {
        guard.finished(pid);
    }
    tracing::info!(tables = %names, rows, %point, "tables read; stored when the stream reaches the copy's point");
    Ok((point, committed_at_us))
}

/// The point a mark with no copy is stored at: the end of pgtrail's fence record (what
/// `pg_logical_emit_message` returns), as a temporary slot's consistent point is the end of
/// a record. The mark is keyed one before it, inside the fence record, where no transaction
/// can commit; no commit ends past that key before the fence (the record ending at the point
/// is the fence itself); and a transaction whose commit record starts right at the point
/// arrives after the mark is stored. (Keyed at the returned LSN itself, the mark took the key
/// of such a transaction, which the log then skipped as a replay: a lost transaction, found
/// by pgtrail-torture.)
fn fence_point(fence_end: Lsn) -> Lsn {
    fence_end
}

/// Emit pgtrail's fence message (not stored; see [`FENCE_PREFIX`]); returns the end of its
/// record and the server's clock.
async fn emit_fence(sql: &tokio_postgres::Client) -> Result<(Lsn, i64), CaptureError> {
    lsn_with_clock(
        sql,
        "pg_logical_emit_message(false, $1, '')",
        &[&FENCE_PREFIX],
        "emitting pgtrail's fence message",
    )
    .await
}

/// A snapshot's operations on disk until the stream reaches its point: the rows in an
/// unlinked temporary file in the archive directory, the few other operations (each table's
/// schema version and scope mark) in memory with the row count they come before.
struct Spool {
    file: BufWriter<tokio::fs::File>,
    marks: Vec<(u64, LogOp)>,
    rows: u64,
}

impl Spool {
    fn new(archive: &Path) -> Result<Spool, CaptureError> {
        let file = tempfile::tempfile_in(archive).map_err(|e| {
            CaptureError::setup(
                format!(
                    "cannot create a spool file in {} for a table copy: {e}",
                    archive.display()
                ),
                "check that the archive directory is writable and has free space",
            )
        })?;
        Ok(Spool {
            file: BufWriter::new(tokio::fs::File::from_std(file)),
            marks: Vec::new(),
            rows: 0,
        })
    }

    async fn finish(&mut self) -> Result<(), CaptureError> {
        self.file.flush().await.map_err(spool_error)
    }

    /// Send everything to the writer in the order it was spooled; returns the row count.
    async fn replay(self, writer: &WriterHandle) -> Result<u64, CaptureError> {
        let mut file = self.file.into_inner();
        file.seek(std::io::SeekFrom::Start(0))
            .await
            .map_err(spool_error)?;
        let mut input = BufReader::new(file);
        let mut marks = self.marks.into_iter().peekable();
        let mut batch = Vec::with_capacity(snapshot::ROWS_PER_BATCH);
        for row in 0..=self.rows {
            while let Some((_, op)) = marks.next_if(|(at, _)| *at == row) {
                batch.push(op);
            }
            if row == self.rows {
                break;
            }
            batch.push(LogOp::Change(read_row(&mut input).await?));
            if batch.len() >= snapshot::ROWS_PER_BATCH {
                writer.send(std::mem::take(&mut batch)).await?;
            }
        }
        if !batch.is_empty() {
            writer.send(batch).await?;
        }
        Ok(self.rows)
    }
}

impl SnapshotSink for Spool {
    async fn send(&mut self, ops: Vec<LogOp>) -> Result<(), CaptureError> {
        for op in ops {
            match op {
                LogOp::Change(change) => {
                    write_row(&mut self.file, &change).await?;
                    self.rows += 1;
                }
                other => self.marks.push((self.rows, other)),
            }
        }
        Ok(())
    }
}

fn spool_error(e: std::io::Error) -> CaptureError {
    CaptureError::setup(
        format!("the spool file of a table copy failed: {e}"),
        "check the archive directory's free space",
    )
}

// A spooled row: relation id, cell count, then each cell as a tag (0 NULL, 1 text) and, for
// text, its length and bytes. Snapshot rows carry no other kind of cell.
async fn write_row(
    out: &mut BufWriter<tokio::fs::File>,
    change: &IncomingChange,
) -> Result<(), CaptureError> {
    let cells = change.new.as_deref().unwrap_or_default();
    out.write_u32(change.relation_id)
        .await
        .map_err(spool_error)?;
    out.write_u32(cells.len() as u32)
        .await
        .map_err(spool_error)?;
    for cell in cells {
        match cell {
            IncomingCell::Text(s) => {
                out.write_u8(1).await.map_err(spool_error)?;
                out.write_u32(s.len() as u32).await.map_err(spool_error)?;
                out.write_all(s.as_bytes()).await.map_err(spool_error)?;
            }
            IncomingCell::Null | IncomingCell::UnchangedToast => {
                out.write_u8(0).await.map_err(spool_error)?;
            }
        }
    }
    Ok(())
}

async fn read_row(input: &mut BufReader<tokio::fs::File>) -> Result<IncomingChange, CaptureError> {
    let relation_id = input.read_u32().await.map_err(spool_error)?;
    let width = input.read_u32().await.map_err(spool_error)? as usize;
    let mut cells = Vec::with_capacity(width);
    for _ in 0..width {
        cells.push(match input.read_u8().await.map_err(spool_error)? {
            1 => {
                let len = input.read_u32().await.map_err(spool_error)? as usize;
                let mut bytes = vec![0; len];
                input.read_exact(&mut bytes).await.map_err(spool_error)?;
                IncomingCell::Text(String::from_utf8(bytes).map_err(|_| {
                    CaptureError::Protocol("the spool file of a table copy is damaged".into())
                })?)
            }
            _ => IncomingCell::Null,
        });
    }
    Ok(IncomingChange {
        relation_id,
        op: Op::Snapshot,
        old: None,
        new: Some(cells),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A copy's session a cut connection left holding a lock (here: a session that locked
    /// the table and went idle in its transaction) blocks DDL, behind which the next copy's
    /// slot would wait for good: the next copy of the same capture ends it, and nothing else
    /// (another capture's, or one whose process ID the server gave to a new session).
    #[tokio::test]
    async fn a_copy_ends_the_sessions_its_capture_left_unfinished_and_no_others() {
        let cluster = crate::cluster::Cluster::shared();
        let db = cluster.fresh_database("unfinished").unwrap();
        cluster
            .psql(&db, "CREATE TABLE t (id int PRIMARY KEY)")
            .unwrap();
        let source = crate::SourceConfig::parse(&cluster.url(&db)).unwrap();
        let sql = source.connect_sql().await.unwrap();
        let mut held = Vec::new();
        for _ in 0..3 {
            let c = source.connect_sql().await.unwrap();
            c.batch_execute("BEGIN; LOCK TABLE t IN ACCESS SHARE MODE")
                .await
                .unwrap();
            let row = c
                .query_one(
                    "SELECT pg_backend_pid(), backend_start::text FROM pg_stat_activity WHERE pid = pg_backend_pid()",
                    &[],
                )
                .await
                .unwrap();
            held.push((c, row.get::<_, i32>(0), row.get::<_, String>(1)));
        }
        // Ours; another capture's; ours by process ID but not by start time.
        copy_session_started("mine", held[0].1, held[0].2.clone());
        copy_session_started("theirs", held[1].1, held[1].2.clone());
        copy_session_started("mine", held[2].1, "2000-01-01 00:00:00+00".into());
        end_unfinished_copies(&sql, "mine", std::time::Duration::from_secs(10)).await;
        let alive = |pid: i32| {
            cluster
                .psql(
                    &db,
                    &format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}"),
                )
                .unwrap()
                == "1"
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while alive(held[0].1) && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert!(
            !alive(held[0].1),
            "the capture's own unfinished copy was not ended"
        );
        assert!(alive(held[1].1), "another capture's copy was ended");
        assert!(
            alive(held[2].1),
            "a session with the same process ID but another start was ended"
        );
        assert!(held[0].0.is_closed() || held[0].0.simple_query("SELECT 1").await.is_err());
        // Nothing of "mine" is left to end; "theirs" still is.
        let u = unfinished();
        assert!(u.sessions.iter().all(|(c, _, _)| c != "mine"));
        assert!(u.sessions.iter().any(|(c, _, _)| c == "theirs"));
    }

    fn pending(point: u64) -> PendingSync {
        PendingSync {
            point: Lsn(point),
            committed_at_us: 0,
            spool: Spool::new(&std::env::temp_dir()).unwrap(),
        }
    }

    #[tokio::test]
    async fn a_sync_is_stored_before_the_first_operation_at_or_past_its_point() {
        let p = pending(1000);
        let begin = |l| {
            vec![LogOp::Begin {
                final_lsn: Lsn(l),
                xid: 1,
                committed_at_us: 0,
            }]
        };
        assert!(!p.due_before(&begin(990)));
        assert!(p.due_before(&begin(999)));
        assert!(p.due_before(&begin(1500)));
        assert!(!p.due_before(&[LogOp::Advance(Lsn(999))]));
        assert!(p.due_before(&[LogOp::Advance(Lsn(1000))]));
        // Inside a transaction nothing is due: only Begin, Advance and messages decide.
        assert!(!p.due_before(&[LogOp::Commit { end_lsn: Lsn(2000) }]));
        assert!(!p.due_before(&[]));
    }

    #[test]
    fn a_sync_is_dated_no_later_than_the_transaction_it_is_stored_before() {
        let begin = |at| {
            vec![LogOp::Begin {
                final_lsn: Lsn(1500),
                xid: 1,
                committed_at_us: at,
            }]
        };
        let mut p = pending(1000);
        p.committed_at_us = 5_000;
        // Committed after the point but before the clock was read: the copy takes its time.
        p.settle_time(&begin(4_000));
        assert_eq!(p.since(), (Lsn(999), 4_000));
        // A later transaction, or no transaction at all, leaves the time as it is.
        p.settle_time(&begin(9_000));
        p.settle_time(&[LogOp::Advance(Lsn(2000))]);
        assert_eq!(p.since(), (Lsn(999), 4_000));
        // Taken out only when due, and then already dated.
        let mut slot = Some(pending(1000));
        slot.as_mut().unwrap().committed_at_us = 5_000;
        let early = vec![LogOp::Begin {
            final_lsn: Lsn(900),
            xid: 1,
            committed_at_us: 3_000,
        }];
        assert!(PendingSync::take_due(&mut slot, &early).is_none());
        let taken = PendingSync::take_due(&mut slot, &begin(4_500)).unwrap();
        assert_eq!(taken.since(), (Lsn(999), 4_500));
        assert!(slot.is_none());
    }

    #[test]
    fn a_layout_change_says_whether_stored_values_may_have_changed() {
        let layout = |file_node, missing: &[i16], versions: &[u32]| StorageLayout {
            file_node,
            missing_values: missing.to_vec(),
            column_versions: versions.to_vec(),
            table_version: file_node + versions.iter().sum::<u32>(),
            column_names: ["id", "v", "w"][..versions.len()]
                .iter()
                .map(|n| n.to_string())
                .collect(),
            enum_labels: Vec::new(),
            partitions: Vec::new(),
        };
        let known = layout(10, &[], &[5, 5]);
        assert_eq!(layout_change(&known, &known.clone()), LayoutChange::None);
        // ADD COLUMN … DEFAULT 5: no new storage, existing rows take the value.
        assert_eq!(
            layout_change(&known, &layout(10, &[3], &[5, 5, 9])),
            LayoutChange::Rewrite
        );
        // ADD COLUMN without a default, RENAME COLUMN, RENAME TO: catalog only.
        assert_eq!(
            layout_change(&known, &layout(10, &[], &[5, 9])),
            LayoutChange::Schema
        );
        let renamed = StorageLayout {
            table_version: 77,
            ..known.clone()
        };
        assert_eq!(layout_change(&known, &renamed), LayoutChange::Schema);
        // RENAME COLUMN: the attribute's catalog row, and its name.
        let mut column_renamed = layout(10, &[], &[5, 9]);
        column_renamed.column_names[1] = "label".into();
        assert_eq!(
            layout_change(&known, &column_renamed),
            LayoutChange::Rewrite
        );
        // DROP COLUMN: the attribute stays, nameless; no stored value changed.
        let mut dropped = layout(10, &[], &[5, 9]);
        dropped.column_names[1] = String::new();
        assert_eq!(layout_change(&known, &dropped), LayoutChange::Schema);
        // A layout recorded without names (format 2) cannot tell a rename, and is the same
        // layout as one with names otherwise equal.
        let unnamed = StorageLayout {
            column_names: Vec::new(),
            ..known.clone()
        };
        assert_eq!(layout_change(&unnamed, &known), LayoutChange::Filled);
        assert_eq!(
            layout_change(&unnamed, &column_renamed),
            LayoutChange::Schema
        );
        // ALTER … TYPE: new storage and a column's catalog row.
        assert_eq!(
            layout_change(&known, &layout(11, &[], &[5, 9])),
            LayoutChange::Rewrite
        );
        // TRUNCATE (or VACUUM FULL): new storage, columns untouched, in the transaction that
        // wrote the table's catalog row.
        assert_eq!(
            layout_change(&known, &layout(11, &[], &[5, 5])),
            LayoutChange::NewFile { xid: 21 }
        );
        // Enum labels: recorded when first seen, an added label changes nothing stored, a
        // renamed one (same OID, another text) every value of it.
        let labels = |l: &[(u32, &str)]| StorageLayout {
            enum_labels: l.iter().map(|(o, t)| (*o, t.to_string())).collect(),
            ..known.clone()
        };
        let moods = labels(&[(16390, "sad"), (16392, "ok")]);
        assert_eq!(layout_change(&known, &moods), LayoutChange::Filled);
        assert_eq!(
            layout_change(
                &moods,
                &labels(&[(16390, "sad"), (16392, "ok"), (16400, "happy")])
            ),
            LayoutChange::Filled
        );
        assert_eq!(
            layout_change(&moods, &labels(&[(16390, "sad"), (16392, "fine")])),
            LayoutChange::Rewrite
        );

        // A partitioned table (no storage of its own) and its leaves.
        // Leaves as (OID, file node, transaction that last wrote its catalog row).
        let parent =
            |leaves: &[(u32, u32, u32)], empty: &[u32], versions: &[u32]| slot::LayoutNow {
                layout: StorageLayout {
                    partitions: leaves.iter().map(|(l, f, _)| (*l, *f)).collect(),
                    ..layout(0, &[], versions)
                },
                file_node_in_snapshot: 0,
                empty_partitions: empty.to_vec(),
                partition_versions: leaves.iter().map(|(_, _, x)| *x).collect(),
            };
        let two = parent(&[(100, 1000, 7), (200, 2000, 7)], &[], &[5, 5]);
        let change = |now: &slot::LayoutNow| partitioned_layout_change(&two.layout, now);
        assert_eq!(change(&two), LayoutChange::None);
        // CREATE TABLE … PARTITION OF, not written yet: no row came.
        assert_eq!(
            change(&parent(
                &[(100, 1000, 7), (200, 2000, 7), (300, 3000, 8)],
                &[300],
                &[5, 5]
            )),
            LayoutChange::Filled
        );
        // ATTACH PARTITION of a table with rows; DETACH or DROP of one; the parent's ALTER …
        // TYPE (every leaf rewritten); leaves given new files by two transactions: read again.
        for now in [
            parent(
                &[(100, 1000, 7), (200, 2000, 7), (300, 3000, 8)],
                &[],
                &[5, 5],
            ),
            parent(&[(100, 1000, 7)], &[], &[5, 5]),
            parent(&[(100, 1001, 9), (200, 2001, 9)], &[], &[5, 9]),
            parent(&[(100, 1001, 9), (200, 2001, 10)], &[], &[5, 5]),
        ] {
            assert_eq!(change(&now), LayoutChange::Rewrite, "{:?}", now.layout);
        }
        // New files from one transaction, columns unchanged: a TRUNCATE of the parent if the
        // stream brought one in it, else (a leaf truncated alone, VACUUM FULL) read again.
        assert_eq!(
            change(&parent(&[(100, 1001, 9), (200, 2001, 9)], &[], &[5, 5])),
            LayoutChange::NewFile { xid: 9 }
        );
        assert_eq!(
            change(&parent(&[(100, 1000, 7), (200, 2001, 9)], &[], &[5, 5])),
            LayoutChange::NewFile { xid: 9 }
        );
        // The parent's ADD COLUMN … DEFAULT: the leaves have the missing value, which the
        // layout gives the parent's column.
        let mut defaulted = parent(&[(100, 1000, 7), (200, 2000, 7)], &[], &[5, 5, 9]);
        defaulted.layout.missing_values = vec![3];
        assert_eq!(change(&defaulted), LayoutChange::Rewrite);
        // A layout that did not record its leaves (before version 5): non-empty leaves are new.
        let unrecorded = StorageLayout {
            partitions: Vec::new(),
            ..two.layout.clone()
        };
        assert_eq!(
            partitioned_layout_change(&unrecorded, &two),
            LayoutChange::Rewrite
        );
    }

    /// A transaction whose commit record starts right after the fence record (its key is the
    /// LSN `pg_logical_emit_message` returned) is stored after a mark with no copy, never
    /// skipped as a replay; and so is the mark.
    #[test]
    fn a_transaction_committing_right_after_the_fence_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = pgtrail_store::ChangeLog::open(&dir.path().join("a")).unwrap();
        let (fence_start, fence_end) = (Lsn(0x1000), Lsn(0x1038));
        let mark = PendingSync {
            point: fence_point(fence_end),
            committed_at_us: 1,
            spool: Spool::new(dir.path()).unwrap(),
        };
        // What the stream brings: the fence (an Advance to its start), then the transaction.
        let begin = vec![LogOp::Begin {
            final_lsn: fence_end,
            xid: 9,
            committed_at_us: 2,
        }];
        assert!(!mark.due_before(&[LogOp::Advance(fence_start)]));
        log.apply([LogOp::Advance(fence_start)]).unwrap();
        assert!(
            mark.due_before(&begin),
            "the mark is stored before the transaction"
        );
        let applied = log
            .apply([
                LogOp::Begin {
                    final_lsn: mark.since().0,
                    xid: 0,
                    committed_at_us: 1,
                },
                LogOp::Commit {
                    end_lsn: mark.point,
                },
            ])
            .unwrap();
        assert_eq!(applied.transactions, 1, "the mark");
        let mut tx = begin;
        tx.push(LogOp::Commit {
            end_lsn: Lsn(fence_end.0 + 0x40),
        });
        let applied = log.apply(tx).unwrap();
        assert_eq!(
            (applied.transactions, applied.duplicates_skipped),
            (1, 0),
            "the transaction after the fence"
        );
    }

    #[tokio::test]
    async fn the_spool_gives_back_rows_and_marks_in_order() {
        let mut spool = Spool::new(&std::env::temp_dir()).unwrap();
        let row = |id: u32, cells: Vec<IncomingCell>| {
            LogOp::Change(IncomingChange {
                relation_id: id,
                op: Op::Snapshot,
                old: None,
                new: Some(cells),
            })
        };
        let text = |s: &str| IncomingCell::Text(s.into());
        spool
            .send(vec![
                LogOp::SnapshotOf(TableScope::whole(1)),
                row(1, vec![text("a"), IncomingCell::Null]),
            ])
            .await
            .unwrap();
        spool
            .send(vec![
                row(1, vec![text("é\t"), text("")]),
                LogOp::SnapshotOf(TableScope::whole(2)),
            ])
            .await
            .unwrap();
        spool.finish().await.unwrap();
        let mut file = spool.file.into_inner();
        file.seek(std::io::SeekFrom::Start(0)).await.unwrap();
        let mut input = BufReader::new(file);
        let first = read_row(&mut input).await.unwrap();
        assert_eq!(first.new.unwrap(), vec![text("a"), IncomingCell::Null]);
        let second = read_row(&mut input).await.unwrap();
        assert_eq!(second.new.unwrap(), vec![text("é\t"), text("")]);
        assert!(read_row(&mut input).await.is_err(), "two rows were spooled");
        assert_eq!(
            spool
                .marks
                .iter()
                .map(|(at, op)| (*at, op.clone()))
                .collect::<Vec<_>>(),
            vec![
                (0, LogOp::SnapshotOf(TableScope::whole(1))),
                (2, LogOp::SnapshotOf(TableScope::whole(2)))
            ]
        );
    }
}
