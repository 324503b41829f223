//! Legal holds: a scope of the history (tables, a range of commit LSNs) that nothing may erase
//! until the hold is released. `redact` and `purge` refuse any change a hold in force covers,
//! naming the hold.
//!
//! A hold placed and a hold released are each a leaf of the tree (kinds 6 and 7, the hold as
//! JSON) at the next compaction that adds changes, so an auditor sees in the signed record
//! when each hold was in force, and that every redaction and purge receipt came outside one.

use redb::{ReadableTable, TableDefinition};

use super::bundle::Scope;
use super::leaf::{KIND_HOLD, KIND_RELEASE};
use super::state::PENDING_EVENTS;
use crate::error::LogError;
use crate::log::{SharedLog, table_if_made};
use crate::lsn::ChangeKey;

/// The holds ever placed: number → [`Hold`] (JSON). A released hold stays, with its release.
pub(crate) const HOLDS: TableDefinition<u64, &[u8]> = TableDefinition::new("evidence_holds");

/// The hold requests a running capture carried out: request name → the hold it placed or
/// released (JSON), committed with it, so a request is carried out once whatever crashes.
pub(super) const ANSWERED: TableDefinition<&str, &[u8]> =
    TableDefinition::new("evidence_hold_requests");

/// A legal hold.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Hold {
    /// Its number, from 1, in the order holds were placed.
    pub id: u64,
    pub scope: Scope,
    pub reason: String,
    pub placed_at_us: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub released: Option<Release>,
}

/// Why and when a hold was released.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Release {
    pub reason: String,
    pub at_us: i64,
}

impl Hold {
    /// Whether the hold is in force over a change of `table` (the name it bore at the change).
    pub fn covers(&self, key: ChangeKey, table: &str) -> bool {
        self.released.is_none() && self.scope.takes_change(key, table)
    }

    /// Whether the hold is in force over the logical message at `key`.
    pub fn covers_message(&self, key: ChangeKey) -> bool {
        self.released.is_none() && self.scope.takes_message(key)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HoldError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("no hold number {0}: `pgtrail hold --list` shows the holds")]
    NoSuchHold(u64),
    #[error("hold {0} was released already")]
    Released(u64),
    #[error("--reason must say why (it is kept in the hold's leaf)")]
    NoReason,
}

fn encode(hold: &Hold) -> Vec<u8> {
    serde_json::to_vec(hold).expect("a hold is plain data")
}

pub(super) fn decode(bytes: &[u8]) -> Result<Hold, LogError> {
    serde_json::from_slice(bytes).map_err(|e| LogError::Corrupt {
        what: "evidence hold".into(),
        source: e.to_string().into(),
    })
}

/// Queue `kind ‖ payload` to become a leaf at the next compaction, after every event queued
/// before it.
pub(crate) fn queue_event(
    wtx: &redb::WriteTransaction,
    kind: u8,
    payload: &str,
) -> Result<(), LogError> {
    let mut pending = wtx.open_table(PENDING_EVENTS)?;
    let next = pending.last()?.map_or(0, |(k, _)| k.value() + 1);
    let mut bytes = Vec::with_capacity(1 + payload.len());
    bytes.push(kind);
    bytes.extend_from_slice(payload.as_bytes());
    pending.insert(next, bytes.as_slice())?;
    Ok(())
}

/// Place a hold over `scope`. The hold and its pending leaf are one commit.
pub fn place(log: &SharedLog, scope: Scope, reason: &str) -> Result<Hold, HoldError> {
    place_for(log, scope, reason, None)
}

/// [`place`], for `request` when one names it.
pub(super) fn place_for(
    log: &SharedLog,
    scope: Scope,
    reason: &str,
    request: Option<&str>,
) -> Result<Hold, HoldError> {
    change_holds(log, reason, KIND_HOLD, request, |holds| {
        let id = holds
            .last()
            .map_err(LogError::from)?
            .map_or(1, |(k, _)| k.value() + 1);
        Ok(Hold {
            id,
            scope,
            reason: reason.to_string(),
            placed_at_us: crate::now_us(),
            released: None,
        })
    })
}

/// Release hold `id`. The release and its pending leaf are one commit.
pub fn release(log: &SharedLog, id: u64, reason: &str) -> Result<Hold, HoldError> {
    release_for(log, id, reason, None)
}

/// [`release`], for `request` when one names it.
pub(super) fn release_for(
    log: &SharedLog,
    id: u64,
    reason: &str,
    request: Option<&str>,
) -> Result<Hold, HoldError> {
    change_holds(log, reason, KIND_RELEASE, request, |holds| {
        let mut hold = match holds.get(id).map_err(LogError::from)? {
            Some(v) => decode(v.value())?,
            None => return Err(HoldError::NoSuchHold(id)),
        };
        if hold.released.is_some() {
            return Err(HoldError::Released(id));
        }
        hold.released = Some(Release {
            reason: reason.to_string(),
            at_us: crate::now_us(),
        });
        Ok(hold)
    })
}

/// One commit that stores the hold `change` makes (a new one, or one released), queues its
/// leaf of `kind` and, for a request a running capture serves (see [`super::requests`]), records it
/// as answered: a crash keeps all of them or none.
fn change_holds(
    log: &SharedLog,
    reason: &str,
    kind: u8,
    request: Option<&str>,
    change: impl FnOnce(&redb::Table<u64, &[u8]>) -> Result<Hold, HoldError>,
) -> Result<Hold, HoldError> {
    if reason.trim().is_empty() {
        return Err(HoldError::NoReason);
    }
    let db = &log.0;
    let mut wtx = db.begin_write().map_err(LogError::from)?;
    wtx.set_two_phase_commit(true);
    let hold = {
        let mut holds = wtx.open_table(HOLDS).map_err(LogError::from)?;
        let hold = change(&holds)?;
        holds
            .insert(hold.id, encode(&hold).as_slice())
            .map_err(LogError::from)?;
        hold
    };
    let payload = String::from_utf8(encode(&hold)).expect("serde_json writes UTF-8");
    queue_event(&wtx, kind, &payload)?;
    if let Some(name) = request {
        let mut answered = wtx.open_table(ANSWERED).map_err(LogError::from)?;
        answered
            .insert(name, encode(&hold).as_slice())
            .map_err(LogError::from)?;
    }
    wtx.commit().map_err(LogError::from)?;
    Ok(hold)
}

/// Every hold ever placed, in number order (released ones with their release).
pub fn list(rtx: &redb::ReadTransaction) -> Result<Vec<Hold>, LogError> {
    let Some(holds) = table_if_made(rtx, HOLDS)? else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for entry in holds.iter()? {
        out.push(decode(entry?.1.value())?);
    }
    Ok(out)
}

/// Every hold of the archive in `dir`, read beside a running capture.
pub fn list_in(dir: &std::path::Path) -> Result<Vec<Hold>, LogError> {
    list(crate::LogReader::open(dir)?.read_transaction())
}
