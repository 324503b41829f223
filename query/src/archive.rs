//! One consistent read of an archive: the manifest, the log tail and the schema versions, taken
//! in a single redb read transaction, grouped per table.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use pgtrail_store::segment::SegmentContent;
use pgtrail_store::{
    ChangeKey, ChangeRecord, Gap, KeyframeEntry, LogReader, Lsn, Op, RelationVersion, SegmentEntry,
    SnapshotRecord, SourceIdentity, TableScope, parse_qualified,
};

use crate::error::QueryError;
use crate::replay::Moment;

/// Everything known of one table (by its latest schema-qualified name).
#[derive(Clone, Debug)]
pub struct TableHistory {
    pub schema: String,
    pub name: String,
    /// Every schema version, in the order they took effect.
    pub versions: Vec<RelationVersion>,
    /// Segments in key order.
    pub segments: Vec<SegmentEntry>,
    /// Changes still in the log, in key order.
    pub tail: Vec<(ChangeKey, ChangeRecord)>,
    /// The table's keyframes (its rows at a point), in point order.
    pub keyframes: Vec<KeyframeEntry>,
    /// `versions[i].key_positions()`, computed once rather than for every change.
    key_positions: Vec<Vec<usize>>,
}

impl TableHistory {
    pub fn qualified_name(&self) -> String {
        format!(
            "{}.{}",
            pgtrail_store::quote_ident(&self.schema),
            pgtrail_store::quote_ident(&self.name)
        )
    }

    /// The latest keyframe whose whole state `moment` includes (its point before `before`,
    /// when given), with the schema version of its rows.
    pub(crate) fn keyframe_within(
        &self,
        moment: Moment,
        before: Option<Lsn>,
    ) -> Option<(&KeyframeEntry, &RelationVersion)> {
        self.keyframes.iter().rev().find_map(|k| {
            let within = match moment {
                Moment::Lsn(l) => k.at <= l,
                Moment::Time(t) => k.includes_until_us <= t,
            };
            if !within || before.is_some_and(|b| k.at >= b) {
                return None;
            }
            let v = self
                .version(k.version.relation_id, k.version.valid_from)
                .ok()?;
            // A keyframe whose version the log no longer describes as it did is not used.
            (v == &k.version).then_some((k, v))
        })
    }

    /// The schema version a change names (its relation OID and the key it took effect at).
    pub fn version(
        &self,
        relation_id: u32,
        valid_from: ChangeKey,
    ) -> Result<&RelationVersion, QueryError> {
        self.versions
            .iter()
            .find(|v| v.relation_id == relation_id && v.valid_from == valid_from)
            .ok_or(QueryError::NoSuchVersion {
                relation_id,
                valid_from,
            })
    }

    /// The key positions of one of this table's versions (see
    /// [`RelationVersion::key_positions`]); `version` must be one of `self.versions`.
    pub fn key_positions(&self, version: &RelationVersion) -> &[usize] {
        let i = self
            .versions
            .iter()
            .position(|v| std::ptr::eq(v, version))
            .unwrap_or(0);
        self.key_positions.get(i).map_or(&[], Vec::as_slice)
    }

    /// The relations (OIDs) this table's history holds, each once.
    pub fn relation_ids(&self) -> impl Iterator<Item = u32> + '_ {
        let mut seen = Vec::new();
        self.versions
            .iter()
            .map(|v| v.relation_id)
            .filter(move |oid| {
                let new = !seen.contains(oid);
                if new {
                    seen.push(*oid);
                }
                new
            })
    }

    /// The latest schema version.
    pub fn latest(&self) -> &RelationVersion {
        self.versions
            .last()
            .expect("a table has at least one version")
    }
}

/// The archive as one read saw it.
#[derive(Clone, Debug)]
pub struct ArchiveSnapshot {
    pub dir: PathBuf,
    pub source: Option<SourceIdentity>,
    pub position: Lsn,
    pub gaps: Vec<Gap>,
    /// Snapshot transactions in LSN order: the initial snapshot, each re-snapshot after a gap,
    /// and each table synchronised while capture ran. Each holds the whole state of the
    /// tables it names at that point.
    pub snapshots: Vec<SnapshotRecord>,
    /// Table reads the capture decided on (a rewrite or a drop found) and had not stored when
    /// it stopped: each table's rows are unknown from the scope's point on.
    pub pending_reads: Vec<pgtrail_store::TableScope>,
    pub tables: BTreeMap<String, TableHistory>,
    /// Names of the types that are not built in (see [`pgtrail_store::format_type`]).
    pub types: pgtrail_store::TypeNames,
    /// Logical messages (segments and tail).
    pub message_segments: Vec<SegmentEntry>,
    pub message_tail: Vec<(ChangeKey, ChangeRecord)>,
    /// Where the archive begins by time: the date of its first snapshot (or, in an archive
    /// that does not begin with one, the commit time of its earliest change).
    pub first_commit_us: Option<i64>,
    /// Where the archive begins by LSN: its first snapshot's key (or its earliest change's).
    pub first_key: Option<ChangeKey>,
}

impl ArchiveSnapshot {
    /// Read the archive in `dir`. The log tail is held in memory (it is bounded by the
    /// compaction thresholds); segments are read lazily by queries.
    pub fn open(dir: &Path) -> Result<ArchiveSnapshot, QueryError> {
        let reader = LogReader::open(dir).map_err(|source| QueryError::Open {
            path: dir.to_path_buf(),
            source,
        })?;
        Self::from_reader(dir, &reader)
    }

    /// Build from an open reader (a capture process may pass its own).
    pub fn from_reader(dir: &Path, reader: &LogReader) -> Result<ArchiveSnapshot, QueryError> {
        let manifest = reader.manifest()?;
        let relations = reader.relations()?;
        let mut tail: Vec<(ChangeKey, ChangeRecord)> = Vec::new();
        for entry in reader.changes()? {
            tail.push(entry?);
        }
        // Group relation OIDs under their latest name; a table recreated under the same name
        // continues that name's history.
        let mut latest_name: BTreeMap<u32, (String, String)> = BTreeMap::new();
        for r in &relations {
            latest_name.insert(r.relation_id, (r.schema.clone(), r.name.clone()));
        }
        let mut tables: BTreeMap<String, TableHistory> = BTreeMap::new();
        let mut by_oid: BTreeMap<u32, String> = BTreeMap::new();
        for (oid, (schema, name)) in &latest_name {
            let key = format!(
                "{}.{}",
                pgtrail_store::quote_ident(schema),
                pgtrail_store::quote_ident(name)
            );
            by_oid.insert(*oid, key.clone());
            tables.entry(key).or_insert_with(|| TableHistory {
                schema: schema.clone(),
                name: name.clone(),
                versions: Vec::new(),
                segments: Vec::new(),
                tail: Vec::new(),
                keyframes: Vec::new(),
                key_positions: Vec::new(),
            });
        }
        for r in relations {
            if let Some(t) = by_oid.get(&r.relation_id).and_then(|k| tables.get_mut(k)) {
                t.versions.push(r);
            }
        }
        let mut message_segments = Vec::new();
        let (mut first_commit_us, mut first_key) = (None::<i64>, None::<ChangeKey>);
        let mut see = |key: ChangeKey, at: i64| {
            if first_key.is_none_or(|k| key < k) {
                first_key = Some(key);
                first_commit_us = Some(at);
            }
        };
        for seg in manifest.segments {
            see(seg.min_key, seg.min_committed_at_us);
            match &seg.content {
                SegmentContent::Messages => message_segments.push(seg),
                SegmentContent::Table(rel) => {
                    if let Some(t) = by_oid.get(&rel.relation_id).and_then(|k| tables.get_mut(k)) {
                        t.segments.push(seg);
                    }
                }
            }
        }
        for k in reader.keyframes()? {
            if let Some(t) = by_oid
                .get(&k.version.relation_id)
                .and_then(|name| tables.get_mut(name))
            {
                t.keyframes.push(k);
            }
        }
        let mut message_tail = Vec::new();
        for (key, rec) in tail {
            see(key, rec.committed_at_us);
            if rec.op == Op::Message {
                message_tail.push((key, rec));
            } else if let Some(t) = by_oid.get(&rec.relation_id).and_then(|k| tables.get_mut(k)) {
                t.tail.push((key, rec));
            }
        }
        for t in tables.values_mut() {
            t.versions.sort_by_key(|v| v.valid_from);
            t.key_positions = t
                .versions
                .iter()
                .map(RelationVersion::key_positions)
                .collect();
            t.segments.sort_by_key(|s| s.min_key);
            t.keyframes.sort_by_key(|k| (k.at, k.id));
        }
        tables.retain(|_, t| !t.versions.is_empty());
        message_segments.sort_by_key(|s| s.min_key);
        let snapshots = reader.snapshots()?;
        // The archive begins with its first snapshot, at that snapshot's date: even one that
        // read no row (the tables were empty then, which is known), and not at the least
        // commit time of the segment holding it: a transaction committed between the
        // snapshot's point and its dating is streamed after it with an earlier time, and a
        // moment before the date would be answered with that change and without the snapshot.
        if let Some(s) = snapshots.first()
            && first_key.is_none_or(|k| s.lsn <= k.commit_lsn)
        {
            first_key = Some(ChangeKey::new(s.lsn, 0));
            first_commit_us = Some(s.committed_at_us);
        }
        Ok(ArchiveSnapshot {
            dir: dir.to_path_buf(),
            source: reader.source_identity()?,
            position: reader.position()?,
            gaps: reader.gaps()?,
            snapshots,
            pending_reads: reader.pending_reads()?,
            types: reader.types()?,
            tables,
            message_segments,
            message_tail,
            first_commit_us,
            first_key,
        })
    }

    /// The snapshot points (commit LSN, commit time) that hold `table`'s whole state, in LSN
    /// order: where a replay of it starts afresh.
    pub fn snapshot_points(&self, table: &TableHistory) -> Vec<(Lsn, i64)> {
        self.table_snapshots(table)
            .map(|(s, _)| (s.lsn, s.committed_at_us))
            .collect()
    }

    /// The snapshots that hold `table`'s whole state, in LSN order, each with what it says
    /// of the table. A snapshot that names several of its relations (a table dropped and
    /// created again under its name between two looks at the catalog) holds the table unless
    /// every one of them was dropped, and its rows are unknown from the earliest point any of
    /// them gives.
    ///
    /// A drop marked after another relation of the name was read (the new table is held from
    /// its creation under `pgtrail setup`'s trigger, or one look read it and put off the old
    /// one's drop until the log caught up) is taken as part of that read, as if one snapshot
    /// had named both: the name's rows are the new table's from its read on (not "dropped"),
    /// and the old table's span, up to that read, is unknown.
    pub fn table_snapshots<'a>(
        &'a self,
        table: &'a TableHistory,
    ) -> impl Iterator<Item = (&'a SnapshotRecord, TableScope)> + 'a {
        // Each kept snapshot with the relations of the name it holds (not dropped).
        let mut kept: Vec<(&SnapshotRecord, TableScope, Vec<u32>)> = Vec::new();
        for s in &self.snapshots {
            let mut scopes = table
                .relation_ids()
                .filter_map(|oid| s.scope_of(oid))
                .collect::<Vec<_>>();
            let dropped = scopes.iter().all(|t| t.dropped);
            let unknown_from = scopes.iter().filter_map(|t| t.unknown_from).min();
            let holds: Vec<u32> = scopes
                .iter()
                .filter(|t| !t.dropped)
                .map(|t| t.relation_id)
                .collect();
            if dropped
                && let Some((read, scope, read_holds)) = kept.last_mut()
                && !scope.dropped
                && !scopes.iter().any(|t| read_holds.contains(&t.relation_id))
            {
                if let Some(from) = unknown_from.filter(|(lsn, _)| *lsn < read.lsn) {
                    scope.unknown_from = Some(scope.unknown_from.map_or(from, |u| u.min(from)));
                }
                continue;
            }
            scopes.sort_by_key(|t| t.dropped);
            let Some(mut scope) = scopes.into_iter().next() else {
                continue;
            };
            scope.dropped = dropped;
            scope.unknown_from = unknown_from;
            kept.push((s, scope, holds));
        }
        kept.into_iter().map(|(s, scope, _)| (s, scope))
    }

    pub fn segment_path(&self, seg: &SegmentEntry) -> PathBuf {
        self.dir
            .join(pgtrail_store::SEGMENTS_DIR)
            .join(&seg.file_name)
    }

    /// Find the table that bore `name` at `moment` (the name in force then: a table renamed
    /// since is found under its old name for moments before the rename, and not under its new
    /// one). A table's name is known from its schema versions, which record a rename at the
    /// capture's next look at the catalog or with the table's next write. A name no table
    /// bore at that moment is an error that says what the archive knows of it.
    pub fn table_at(
        &self,
        name: &str,
        moment: crate::Moment,
    ) -> datafusion::error::Result<&TableHistory> {
        let (schema, table) =
            parse_qualified(name).ok_or_else(|| QueryError::BadTableName(name.to_string()))?;
        let bears = |v: &RelationVersion| {
            v.name == table && schema.as_deref().is_none_or(|s| s == v.schema)
        };
        // A table whose name at the moment was `name` wins; then one that bore it first and
        // had not begun yet (its own beginning decides what that moment gets).
        let (mut not_begun, mut renamed) = (None, None);
        for t in self.tables.values() {
            if !t.versions.iter().any(bears) {
                continue;
            }
            match self.version_in_force(t, moment)? {
                Some(v) if bears(v) => return Ok(t),
                Some(v) => renamed = Some((t, v)),
                None if bears(&t.versions[0]) => not_begun = not_begun.or(Some(t)),
                None => {}
            }
        }
        if let Some(t) = not_begun {
            return Ok(t);
        }
        match renamed {
            Some((t, then)) => Err(QueryError::NameNotInForce {
                name: name.to_string(),
                moment: moment.to_string(),
                then: then.qualified_name(),
                now: t.qualified_name(),
            }
            .into()),
            None => Ok(self.table(name)?),
        }
    }

    /// The latest of `table`'s versions that took effect at or before `moment`.
    fn version_in_force<'t>(
        &self,
        table: &'t TableHistory,
        moment: crate::Moment,
    ) -> datafusion::error::Result<Option<&'t RelationVersion>> {
        let mut found = None;
        for v in &table.versions {
            let took_effect = match moment {
                crate::Moment::Lsn(l) => v.valid_from.commit_lsn <= l,
                crate::Moment::Time(t) => {
                    crate::schema_versions::version_time(self, table, v.valid_from)?
                        .is_some_and(|at| at <= t)
                }
            };
            if !took_effect {
                break;
            }
            found = Some(v);
        }
        Ok(found)
    }

    /// Find a table by a name written as PostgreSQL would parse it: `orders`, `public.orders`,
    /// `public."Odd Name"`.
    pub fn table(&self, name: &str) -> Result<&TableHistory, QueryError> {
        let (schema, table) =
            parse_qualified(name).ok_or_else(|| QueryError::BadTableName(name.to_string()))?;
        let found = self
            .tables
            .values()
            .find(|t| t.name == table && schema.as_deref().is_none_or(|s| s == t.schema));
        found.ok_or_else(|| QueryError::NoSuchTable {
            name: name.to_string(),
            known: self.tables.keys().cloned().collect::<Vec<_>>().join(", "),
        })
    }
}
