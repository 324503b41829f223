//! Revert planning: which archived changes a selection names, and the steps that undo them,
//! newest first. Pure and offline: it reads the archive, never the source. Rendering the steps
//! as SQL for the source's tables is [`sql`]'s; checking and applying them is the `pgtrail
//! revert` command's (it holds the source connection).
//!
//! What a step undoes: an insert by deleting the row it made, a delete by inserting the row's
//! before image, an update by setting the columns it changed back to their before values, and
//! (only when asked) a TRUNCATE by inserting the rows the table held just before it. Every
//! step that touches an existing row is guarded by the image the undone change left, so a row
//! changed since by anything else is never overwritten: the guard fails instead.

pub mod sql;

use std::collections::BTreeMap;

use pgtrail_store::{Cell, ChangeKey, ChangeRecord, Lsn, Op, RelationVersion, Row};

use crate::archive::{ArchiveSnapshot, TableHistory};
use crate::functions::json_field;
use crate::pit::state_at;
use crate::replay::{Moment, for_each_change, row_key};

/// What to revert: the changes that match every given condition.
#[derive(Clone, Debug, Default)]
pub struct Selection {
    /// The source transaction's ID.
    pub transaction: Option<u32>,
    /// Context fields that must all match (`request_id` = `abc`; a path `a.b` reaches into
    /// nested objects), as the `changes` view's `json_get` reads them.
    pub context: Vec<(String, String)>,
    /// Changes committed at or after this moment.
    pub from: Option<Moment>,
    /// Changes committed at or before this moment.
    pub to: Option<Moment>,
    /// Only these tables (names as PostgreSQL parses them); empty: every table.
    pub tables: Vec<String>,
    /// Undo TRUNCATEs by inserting the rows the table held just before (refused otherwise).
    pub include_truncate: bool,
}

impl Selection {
    fn matches(&self, key: ChangeKey, rec: &ChangeRecord) -> bool {
        let after_from = |m: &Moment| match m {
            Moment::Lsn(l) => key.commit_lsn >= *l,
            Moment::Time(t) => rec.committed_at_us >= *t,
        };
        self.transaction.is_none_or(|x| rec.xid == x)
            && self.from.as_ref().is_none_or(after_from)
            && self.to.is_none_or(|m| m.includes(key, rec.committed_at_us))
            && self.context.iter().all(|(field, value)| {
                rec.context
                    .as_deref()
                    .and_then(|doc| json_field(doc, field))
                    .is_some_and(|v| &v == value)
            })
    }

    /// The selection as JSON, for the context the revert's own transaction carries.
    pub fn to_json(&self) -> serde_json::Value {
        let moment = |m: &Option<Moment>| m.map(|m| m.to_string());
        serde_json::json!({
            "transaction": self.transaction,
            "context": self.context.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
            "from": moment(&self.from),
            "to": moment(&self.to),
            "tables": self.tables,
        })
    }
}

/// Why a selection cannot be reverted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RevertError {
    #[error(
        "give a selection: --transaction XID, --context KEY=VALUE, or --from/--to (--tables alone would undo the tables' whole history)"
    )]
    NoSelection,
    #[error(
        "the selection matches no change in the archive (check the values with `pgtrail sql`, e.g. SELECT * FROM changes WHERE json_get(context, 'request_id') = '…')"
    )]
    NothingSelected,
    #[error(
        "the selection crosses a gap of the archive ({from} to {to}: {reason}); the changes made there are not known, so what undoing the selection means is not either. Narrow it with --from/--to to one side of the gap"
    )]
    CrossesGap { from: Lsn, to: Lsn, reason: String },
    #[error(
        "{table} has no key and its changes do not carry whole rows (REPLICA IDENTITY FULL), so a change cannot be tied to one row; give the table a primary key, or leave it out with --tables"
    )]
    NoKey { table: String },
    #[error(
        "the selection holds a TRUNCATE of {table} at {at}; undoing it re-inserts every row the table held just before: add --include-truncate to do that, or leave the table out with --tables"
    )]
    Truncate { table: String, at: ChangeKey },
    #[error(
        "the TRUNCATE of {table} at {at} follows other changes of that table in the same transaction; the rows it removed are not known separately. Revert that transaction's other changes first, or leave the table out"
    )]
    TruncateMidTransaction { table: String, at: ChangeKey },
    #[error(
        "column {column} of {table} at {at} is not known (an unchanged TOASTed value the source never sent, with no earlier version of the row in the archive), so the row cannot be put back exactly"
    )]
    UnknownValue {
        table: String,
        column: String,
        at: ChangeKey,
    },
    #[error(transparent)]
    Query(#[from] crate::QueryError),
    #[error(transparent)]
    DataFusion(#[from] datafusion::error::DataFusionError),
}

/// What one step does to one row.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Undo an insert: delete the row, which must still be `row` (the insert's after image).
    Delete { row: Row },
    /// Undo a delete (or one row of a TRUNCATE): insert `row` back.
    Insert { row: Row },
    /// Undo an update: set `columns` (positions in the version) back to their values in
    /// `before`, on the row that must still be `after`.
    Update {
        before: Row,
        after: Row,
        columns: Vec<usize>,
    },
}

impl Action {
    pub fn verb(&self) -> &'static str {
        match self {
            Action::Delete { .. } => "delete",
            Action::Insert { .. } => "insert",
            Action::Update { .. } => "update",
        }
    }
}

/// One statement of the revert, undoing one change (or one row of a TRUNCATE).
#[derive(Clone, Debug)]
pub struct Step {
    /// The archive's name for the table (its latest name), schema and table.
    pub schema: String,
    pub table: String,
    /// The change this step undoes.
    pub change: ChangeKey,
    pub xid: u32,
    pub op: Op,
    /// The schema version the images follow.
    pub version: RelationVersion,
    /// Positions of the columns that identify a row in `version` (every column for a table
    /// without a key under REPLICA IDENTITY FULL).
    pub key: Vec<usize>,
    /// Whether `key` is a real key (unique in the table) rather than the whole row.
    pub unique_key: bool,
    pub action: Action,
}

impl Step {
    /// The rows this step touches, by their key values (an update that changed its row's key
    /// touches the row under both keys).
    pub fn rows(&self) -> Vec<Vec<Cell>> {
        let key_of = |row: &Row| row_key(&self.key, row);
        match &self.action {
            Action::Delete { row } | Action::Insert { row } => vec![key_of(row)],
            Action::Update { before, after, .. } => {
                let (old, new) = (key_of(before), key_of(after));
                if old == new {
                    vec![new]
                } else {
                    vec![old, new]
                }
            }
        }
    }
}

/// A row's key for people: `id=3`, `(a, b)=(1, x)`; a row without a key by its columns.
pub fn describe_key(version: &RelationVersion, key: &[usize], values: &[Cell]) -> String {
    let names: Vec<&str> = key
        .iter()
        .map(|&i| version.columns.get(i).map_or("?", |c| c.name.as_str()))
        .collect();
    let values: Vec<String> = values
        .iter()
        .map(|v| match v {
            Cell::Text(t) => t.clone(),
            Cell::Null => "NULL".into(),
            Cell::Unknown => "(unknown)".into(),
        })
        .collect();
    if names.len() == 1 {
        format!("{}={}", names[0], values[0])
    } else {
        format!("({})=({})", names.join(", "), values.join(", "))
    }
}

/// A row the selection touches, and the state the selected changes left it in: the state it
/// must be in now for the revert to apply (`None`: absent).
#[derive(Clone, Debug)]
pub struct RowExpectation {
    pub schema: String,
    pub table: String,
    pub version: RelationVersion,
    pub key: Vec<usize>,
    pub unique_key: bool,
    /// The key values (or the whole row, for a table without a key).
    pub key_values: Vec<Cell>,
    pub expected: Option<Row>,
    /// The last selected change of the row.
    pub last_change: ChangeKey,
}

/// A row that another transaction changed between two selected changes of it: undoing the
/// selected changes would undo that transaction's too, so the row is a conflict.
#[derive(Clone, Debug)]
pub struct Interleaved {
    pub schema: String,
    pub table: String,
    pub key_values: Vec<Cell>,
    /// The selected change whose before image is not what the previous selected one left.
    pub at: ChangeKey,
}

/// The steps that undo a selection, newest first, and what the rows must hold now.
#[derive(Clone, Debug)]
pub struct RevertPlan {
    pub steps: Vec<Step>,
    pub rows: Vec<RowExpectation>,
    pub interleaved: Vec<Interleaved>,
    /// Selected changes (a TRUNCATE counts once, however many rows it puts back).
    pub changes: usize,
    pub first: ChangeKey,
    pub last: ChangeKey,
}

/// A selected change, before it becomes steps.
struct Selected<'t> {
    table: &'t TableHistory,
    version: &'t RelationVersion,
    key: ChangeKey,
    rec: ChangeRecord,
}

/// Plan the revert of `selection` in `archive`.
pub fn plan(archive: &ArchiveSnapshot, selection: &Selection) -> Result<RevertPlan, RevertError> {
    if selection.transaction.is_none()
        && selection.context.is_empty()
        && selection.from.is_none()
        && selection.to.is_none()
    {
        return Err(RevertError::NoSelection);
    }
    let tables: Vec<&TableHistory> = if selection.tables.is_empty() {
        archive.tables.values().collect()
    } else {
        selection
            .tables
            .iter()
            .map(|name| archive.table(name))
            .collect::<Result<_, _>>()?
    };
    let mut selected: Vec<Selected> = Vec::new();
    for table in tables {
        // The key of the table's previous change, to tell a TRUNCATE that follows other
        // changes of its table in the same transaction.
        let mut previous: Option<ChangeKey> = None;
        for_each_change(archive, table, selection.to, |version, key, rec| {
            let earlier = previous.replace(key);
            if matches!(rec.op, Op::Snapshot | Op::Message) || !selection.matches(key, rec) {
                return Ok(());
            }
            if rec.op == Op::Truncate
                && earlier.is_some_and(|e| e.commit_lsn == key.commit_lsn)
                && selection.include_truncate
            {
                return Err(datafusion::error::DataFusionError::External(Box::new(
                    RevertError::TruncateMidTransaction {
                        table: table.qualified_name(),
                        at: key,
                    },
                )));
            }
            selected.push(Selected {
                table,
                version,
                key,
                rec: rec.clone(),
            });
            Ok(())
        })
        .map_err(unwrap_revert_error)?;
    }
    selected.sort_by_key(|s| s.key);
    let (Some(first), Some(last)) = (selected.first(), selected.last()) else {
        return Err(RevertError::NothingSelected);
    };
    let (first, last) = (first.key, last.key);
    // A gap anywhere between the first and the last selected change hides changes that may
    // belong to the selection or stand between its changes of a row.
    let from = match selection.from {
        Some(Moment::Lsn(l)) => l.min(first.commit_lsn),
        _ => first.commit_lsn,
    };
    let to = match selection.to {
        Some(Moment::Lsn(l)) => l.max(last.commit_lsn),
        _ => last.commit_lsn,
    };
    if let Some(gap) = archive.gaps.iter().find(|g| g.from <= to && g.to >= from) {
        return Err(RevertError::CrossesGap {
            from: gap.from,
            to: gap.to,
            reason: gap.reason.clone(),
        });
    }

    let mut steps = Vec::new();
    // Per row, oldest first: the state the selected changes left it in.
    let mut rows: BTreeMap<(String, Vec<Cell>), RowExpectation> = BTreeMap::new();
    let mut interleaved = Vec::new();
    for s in &selected {
        let table = s.table;
        let positions = table.key_positions(s.version).to_vec();
        let (key, unique_key) = if !positions.is_empty() {
            (positions, true)
        } else if s.version.replica_identity == b'f' {
            ((0..s.version.columns.len()).collect(), false)
        } else {
            return Err(RevertError::NoKey {
                table: table.qualified_name(),
            });
        };
        let name = table.qualified_name();
        // `key` is never empty here (a table without one uses every column), so this is the
        // replay's own row identity.
        let key_of = |row: &Row| row_key(&key, row);
        let step = |action: Action| Step {
            schema: table.schema.clone(),
            table: table.name.clone(),
            change: s.key,
            xid: s.rec.xid,
            op: s.rec.op,
            version: s.version.clone(),
            key: key.clone(),
            unique_key,
            action,
        };
        // (the row, the state it needed before the change, the state it is left in)
        let mut touches: Vec<(Vec<Cell>, Option<Row>, Option<Row>)> = Vec::new();
        match (s.rec.op, &s.rec.before, &s.rec.after) {
            (Op::Insert, _, Some(after)) => {
                steps.push(step(Action::Delete { row: after.clone() }));
                touches.push((key_of(after), None, Some(after.clone())));
            }
            (Op::Delete, Some(before), _) => {
                known(before, s, &name)?;
                steps.push(step(Action::Insert {
                    row: before.clone(),
                }));
                touches.push((key_of(before), Some(before.clone()), None));
            }
            (Op::Update, Some(before), Some(after)) => {
                let mut columns = Vec::new();
                for (i, (b, a)) in before.iter().zip(after).enumerate() {
                    match (b, a) {
                        (Cell::Unknown, Cell::Unknown) => {}
                        (Cell::Unknown, _) => {
                            return Err(unknown(s, &name, i));
                        }
                        (_, Cell::Unknown) => {}
                        (b, a) if b != a => columns.push(i),
                        _ => {}
                    }
                }
                let (old_key, new_key) = (key_of(before), key_of(after));
                if old_key != new_key {
                    touches.push((old_key, Some(before.clone()), None));
                    touches.push((new_key, None, Some(after.clone())));
                } else {
                    touches.push((new_key, Some(before.clone()), Some(after.clone())));
                }
                if !columns.is_empty() {
                    steps.push(step(Action::Update {
                        before: before.clone(),
                        after: after.clone(),
                        columns,
                    }));
                }
            }
            (Op::Truncate, _, _) => {
                if !selection.include_truncate {
                    return Err(RevertError::Truncate {
                        table: name,
                        at: s.key,
                    });
                }
                // The table just before the TRUNCATE: every transaction committed before
                // its own (earlier changes of the same transaction were refused above).
                let just_before = Moment::Lsn(Lsn(s.key.commit_lsn.0.saturating_sub(1)));
                let state = state_at(archive, table, just_before)?;
                for (_, versions) in state.rows {
                    for (version, row) in versions {
                        if version.relation_id != s.rec.relation_id {
                            continue;
                        }
                        known(&row, s, &name)?;
                        touches.push((key_of(&row), Some(row.clone()), None));
                        steps.push(step(Action::Insert { row }));
                    }
                }
            }
            _ => {}
        }
        for (key_values, needed, left) in touches {
            let id = (name.clone(), key_values.clone());
            if let Some(prior) = rows.get(&id)
                && !same_state(prior.expected.as_ref(), needed.as_ref())
            {
                interleaved.push(Interleaved {
                    schema: table.schema.clone(),
                    table: table.name.clone(),
                    key_values: key_values.clone(),
                    at: s.key,
                });
            }
            rows.insert(
                id,
                RowExpectation {
                    schema: table.schema.clone(),
                    table: table.name.clone(),
                    version: s.version.clone(),
                    key: key.clone(),
                    unique_key,
                    key_values,
                    expected: left,
                    last_change: s.key,
                },
            );
        }
    }
    steps.reverse();
    Ok(RevertPlan {
        steps,
        rows: rows.into_values().collect(),
        interleaved,
        changes: selected.len(),
        first,
        last,
    })
}

/// Whether two row states agree where both are known.
fn same_state(a: Option<&Row>, b: Option<&Row>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => {
            a.len() == b.len()
                && a.iter().zip(b).all(|(x, y)| {
                    matches!(x, Cell::Unknown) || matches!(y, Cell::Unknown) || x == y
                })
        }
        _ => false,
    }
}

fn known(row: &Row, s: &Selected, table: &str) -> Result<(), RevertError> {
    match row.iter().position(|c| matches!(c, Cell::Unknown)) {
        Some(i) => Err(unknown(s, table, i)),
        None => Ok(()),
    }
}

fn unknown(s: &Selected, table: &str, column: usize) -> RevertError {
    RevertError::UnknownValue {
        table: table.to_string(),
        column: s
            .version
            .columns
            .get(column)
            .map_or_else(|| format!("#{column}"), |c| c.name.clone()),
        at: s.key,
    }
}

/// A refusal raised inside a replay callback comes back as an external DataFusion error.
fn unwrap_revert_error(e: datafusion::error::DataFusionError) -> RevertError {
    match e {
        datafusion::error::DataFusionError::External(inner) => {
            match inner.downcast::<RevertError>() {
                Ok(r) => *r,
                Err(other) => {
                    RevertError::DataFusion(datafusion::error::DataFusionError::External(other))
                }
            }
        }
        other => RevertError::DataFusion(other),
    }
}
