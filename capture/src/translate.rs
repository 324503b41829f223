//! Translating the replication stream's events into the log's operations ([`LogOp`]).
//!
//! Pure but for one question asked of the source (a relation's primary key, through
//! [`PrimaryKeys`]), so the rules (what an idle stream may acknowledge, where application
//! context goes) are tested without a server.

use pgtrail_store::{
    ChangeKey, Column, IncomingCell, IncomingChange, LogOp, LogicalMessage, Lsn, OldImage, Op,
    RelationVersion, TableScope, now_us,
};

use crate::error::CaptureError;
use crate::pgoutput::{self, Message, OldTuple, TupleCell};
use crate::setup::{CREATED_PREFIX, DDL_PREFIX, parse_created, parse_ddl};
use crate::source::replication::StreamEvent;
use crate::table_sync::FENCE_PREFIX;

/// The logical message prefix that carries application context (Bemi-compatible).
pub const CONTEXT_PREFIX: &str = "_bemi";

/// Where a relation's primary key comes from (the source's catalog; a map in tests).
pub(crate) trait PrimaryKeys {
    async fn primary_key(&mut self, relation_id: u32) -> Result<Vec<String>, CaptureError>;
}

/// What the stream has shown so far that later events depend on.
#[derive(Debug, Default)]
pub(crate) struct Translator {
    in_txn: bool,
    /// The server's WAL end, as far as the stream has told it.
    pub wal_end: Lsn,
    /// The end of the last commit received.
    pub last_commit_end: Lsn,
    last_advance: Lsn,
    /// The commit time of the oldest transaction received but perhaps not yet durable.
    pub oldest_pending_commit_us: Option<i64>,
    /// The transaction being received, and its commit LSN and time.
    xid: u32,
    txn_point: (Lsn, i64),
    /// What `pgtrail setup`'s trigger told the stream since the stream loop last took it.
    setup_notes: SetupNotes,
    /// Recent TRUNCATEs (transaction, relation), newest last, at most [`TRUNCATES_KEPT`]: the
    /// catalog watch tells a TRUNCATE's new file node from a rewrite's by them.
    truncates: std::collections::VecDeque<(u32, u32)>,
    /// The stream named a type that is not built in since the stream loop last asked.
    types_named: bool,
}

/// What `pgtrail setup`'s trigger told the stream (see [`Translator::take_setup_notes`]).
#[derive(Debug, Default)]
pub(crate) struct SetupNotes {
    /// DDL: (relation, or 0 for any table; its transaction's commit LSN and time).
    pub ddl: Vec<(u32, (Lsn, i64))>,
    /// The tables whose schema after an `ALTER TABLE` a note carried (and the stream recorded
    /// as a version at the note's place), with that transaction's commit LSN.
    pub shaped: Vec<(u32, Lsn)>,
    /// Tables published as they were created: the creating transaction's commit point, and
    /// the table's scope (empty, with its storage layout) from there.
    pub created: Vec<((Lsn, i64), TableScope)>,
}

/// How many recent TRUNCATEs the translator remembers.
const TRUNCATES_KEPT: usize = 4096;

impl Translator {
    /// Whether the stream named a type that is not built in (a Type message, sent before a
    /// relation that uses one) since the last call: the catalog watch looks for an enum under it.
    pub fn take_types_named(&mut self) -> bool {
        std::mem::take(&mut self.types_named)
    }

    /// What `pgtrail setup`'s trigger told the stream, for the catalog watch: a table created
    /// is given at once (a look at the catalog in the middle of its creating transaction
    /// must not read it whole), DDL points once their transaction has been received whole (a
    /// look in the middle of it would find the stream not past it anyway). `None` when there
    /// is nothing to give (almost every event).
    pub fn take_setup_notes(&mut self) -> Option<SetupNotes> {
        let notes = &mut self.setup_notes;
        if notes.created.is_empty() && (self.in_txn || notes.ddl.is_empty()) {
            return None;
        }
        let whole = !self.in_txn;
        Some(SetupNotes {
            created: std::mem::take(&mut notes.created),
            ddl: if whole {
                std::mem::take(&mut notes.ddl)
            } else {
                Vec::new()
            },
            shaped: if whole {
                std::mem::take(&mut notes.shaped)
            } else {
                Vec::new()
            },
        })
    }

    /// The transactions in which the stream brought a TRUNCATE of `relation_id` (the last
    /// ones kept), for a log line when a new file has no TRUNCATE to explain it.
    pub fn truncates_of(&self, relation_id: u32) -> Vec<u32> {
        self.truncates
            .iter()
            .filter(|(_, r)| *r == relation_id)
            .map(|(x, _)| *x)
            .collect()
    }

    /// Whether the stream brought a TRUNCATE of `relation_id` in transaction `xid` (among the
    /// recent ones).
    pub fn truncated_in(&self, xid: u32, relation_id: u32) -> bool {
        self.truncates.contains(&(xid, relation_id))
    }

    /// The log's operations for `event`, in order (none for an event the log does not keep).
    pub async fn translate(
        &mut self,
        event: StreamEvent,
        keys: &mut impl PrimaryKeys,
    ) -> Result<Vec<LogOp>, CaptureError> {
        Ok(match event {
            StreamEvent::Begin {
                final_lsn,
                xid,
                committed_at_us,
            } => {
                self.in_txn = true;
                self.xid = xid;
                self.txn_point = (final_lsn, committed_at_us);
                self.oldest_pending_commit_us.get_or_insert(committed_at_us);
                vec![LogOp::Begin {
                    final_lsn,
                    xid,
                    committed_at_us,
                }]
            }
            StreamEvent::Commit { end_lsn } => {
                self.in_txn = false;
                self.last_commit_end = end_lsn;
                self.wal_end = self.wal_end.max(end_lsn);
                vec![LogOp::Commit { end_lsn }]
            }
            StreamEvent::Message {
                transactional,
                lsn,
                prefix,
                content,
            } => {
                if transactional && prefix == CONTEXT_PREFIX {
                    vec![LogOp::Context(context_json(&content))]
                } else if transactional && prefix == DDL_PREFIX {
                    // `pgtrail setup`'s note of DDL at this transaction's commit: for the
                    // catalog watch (see `setup`), not stored as a message.
                    match parse_ddl(&content) {
                        Some(ddl) => {
                            self.setup_notes.ddl.push((ddl.relation_id, self.txn_point));
                            if ddl.relation.is_some() {
                                self.setup_notes
                                    .shaped
                                    .push((ddl.relation_id, self.txn_point.0));
                            }
                            // A table of the publication's schema after the command, at its
                            // place in the transaction: a new name or column is known from
                            // here, not from the watch's next look (the writer keeps it only
                            // if the shape is new; pgoutput's Relation message before the
                            // table's next change is then the same).
                            ddl.relation.map(LogOp::Relation).into_iter().collect()
                        }
                        // Unread: the point is not known, so nothing is dated by it.
                        None => {
                            tracing::warn!(
                                "a {DDL_PREFIX} message this pgtrail does not read (run `pgtrail setup` again)"
                            );
                            Vec::new()
                        }
                    }
                } else if transactional
                    && prefix == CREATED_PREFIX
                    && let Some(created) = parse_created(&content)
                {
                    // A table `pgtrail setup`'s trigger published as it was created: held from
                    // here, empty (see `setup`). Not stored as a message.
                    let scope = TableScope {
                        layout: Some(created.layout),
                        ..TableScope::whole(created.relation.relation_id)
                    };
                    self.setup_notes
                        .created
                        .push((self.txn_point, scope.clone()));
                    vec![LogOp::Relation(created.relation), LogOp::SnapshotOf(scope)]
                } else if !transactional && prefix == FENCE_PREFIX {
                    // pgtrail's own fence (see `table_sync`): not stored; decoded after every
                    // transaction that committed before it, so its LSN may be acknowledged.
                    if !self.in_txn && lsn > self.last_advance {
                        self.last_advance = lsn;
                        vec![LogOp::Advance(lsn)]
                    } else {
                        Vec::new()
                    }
                } else {
                    let message = LogicalMessage {
                        transactional,
                        prefix,
                        content: content.to_vec(),
                    };
                    if transactional {
                        vec![LogOp::Message(message)]
                    } else {
                        vec![LogOp::NonTransactionalMessage {
                            lsn,
                            at_us: now_us(),
                            message,
                        }]
                    }
                }
            }
            StreamEvent::KeepAlive { wal_end } => {
                self.wal_end = self.wal_end.max(wal_end);
                // Between transactions every transaction of the captured tables that commits
                // before the server's WAL end has been received (they are sent in commit
                // order), so once the writer has stored what was queued before this op, the
                // WAL end may be acknowledged: this keeps the slot moving when the captured
                // tables are idle.
                if !self.in_txn && wal_end > self.last_advance {
                    self.last_advance = wal_end;
                    vec![LogOp::Advance(wal_end)]
                } else {
                    Vec::new()
                }
            }
            StreamEvent::Data { wal_start, data } => {
                let message = pgoutput::decode(&data).map_err(|source| CaptureError::Decode {
                    lsn: wal_start,
                    source,
                })?;
                self.types_named |= matches!(message, Message::Type { .. });
                if let Message::Truncate { relation_ids, .. } = &message {
                    for &relation_id in relation_ids {
                        if self.truncates.len() == TRUNCATES_KEPT {
                            self.truncates.pop_front();
                        }
                        self.truncates.push_back((self.xid, relation_id));
                    }
                }
                change_ops(message, keys).await?
            }
        })
    }
}

async fn change_ops(
    message: Message,
    keys: &mut impl PrimaryKeys,
) -> Result<Vec<LogOp>, CaptureError> {
    Ok(match message {
        Message::Relation(r) => {
            let primary_key = keys.primary_key(r.id).await?;
            vec![LogOp::Relation(RelationVersion {
                relation_id: r.id,
                valid_from: ChangeKey::default(),
                schema: r.schema,
                name: r.name,
                replica_identity: r.replica_identity,
                columns: r
                    .columns
                    .into_iter()
                    .map(|c| Column {
                        name: c.name,
                        type_oid: c.type_oid,
                        type_modifier: c.type_modifier,
                        is_key: c.is_key,
                    })
                    .collect(),
                primary_key,
            })]
        }
        Message::Type { oid, schema, name } => vec![LogOp::Type { oid, schema, name }],
        Message::Insert { relation_id, new } => vec![LogOp::Change(IncomingChange {
            relation_id,
            op: Op::Insert,
            old: None,
            new: Some(cells(new)),
        })],
        Message::Update {
            relation_id,
            old,
            new,
        } => vec![LogOp::Change(IncomingChange {
            relation_id,
            op: Op::Update,
            old: old.map(old_image),
            new: Some(cells(new)),
        })],
        Message::Delete { relation_id, old } => vec![LogOp::Change(IncomingChange {
            relation_id,
            op: Op::Delete,
            old: Some(old_image(old)),
            new: None,
        })],
        Message::Truncate { relation_ids, .. } => relation_ids
            .into_iter()
            .map(|relation_id| {
                LogOp::Change(IncomingChange {
                    relation_id,
                    op: Op::Truncate,
                    old: None,
                    new: None,
                })
            })
            .collect(),
        Message::Origin { .. } => Vec::new(),
        // Begin, Commit and Message arrive as their own events from the replication client.
        Message::Begin { .. } | Message::Commit { .. } | Message::Message { .. } => Vec::new(),
    })
}

fn cells(tuple: Vec<TupleCell>) -> Vec<IncomingCell> {
    tuple
        .into_iter()
        .map(|c| match c {
            TupleCell::Null => IncomingCell::Null,
            TupleCell::UnchangedToast => IncomingCell::UnchangedToast,
            TupleCell::Text(s) => IncomingCell::Text(s),
            // Binary mode is never requested; keep the bytes as hex text rather than lose them.
            TupleCell::Binary(b) => {
                IncomingCell::Text(b.iter().map(|x| format!("{x:02x}")).collect())
            }
        })
        .collect()
}

fn old_image(old: OldTuple) -> OldImage {
    match old {
        OldTuple::Key(t) => OldImage::Key(cells(t)),
        OldTuple::Full(t) => OldImage::Full(cells(t)),
    }
}

/// Normalise a context payload to JSON text: valid JSON is kept as sent, anything else is
/// kept as a JSON string so that nothing is lost and queries can still parse it.
fn context_json(content: &[u8]) -> String {
    let text = String::from_utf8_lossy(content);
    if serde_json::from_str::<serde_json::Value>(&text).is_ok() {
        text.into_owned()
    } else {
        serde_json::Value::String(text.into_owned()).to_string()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use bytes::Bytes;

    use super::*;
    use crate::pgoutput::{Relation, RelationColumn};

    struct Known(HashMap<u32, Vec<String>>);

    impl PrimaryKeys for Known {
        async fn primary_key(&mut self, relation_id: u32) -> Result<Vec<String>, CaptureError> {
            Ok(self.0.get(&relation_id).cloned().unwrap_or_default())
        }
    }

    fn message(transactional: bool, prefix: &str, content: &str) -> StreamEvent {
        StreamEvent::Message {
            transactional,
            lsn: Lsn(0x100),
            prefix: prefix.into(),
            content: Bytes::from(content.to_string()),
        }
    }

    fn data(message: &Message) -> StreamEvent {
        StreamEvent::Data {
            wal_start: Lsn(0x200),
            data: Bytes::from(pgoutput::encode(message)),
        }
    }

    #[tokio::test]
    async fn events_become_log_operations_in_order() {
        let mut keys = Known(HashMap::from([(16384, vec!["id".to_string()])]));
        let mut t = Translator::default();

        // An idle stream's keepalive may be acknowledged once, and only between transactions.
        let idle = StreamEvent::KeepAlive { wal_end: Lsn(50) };
        let ops = t.translate(idle.clone(), &mut keys).await.unwrap();
        assert!(matches!(ops[..], [LogOp::Advance(Lsn(50))]));
        assert!(t.translate(idle, &mut keys).await.unwrap().is_empty());

        let begin = StreamEvent::Begin {
            final_lsn: Lsn(90),
            xid: 7,
            committed_at_us: 1_000,
        };
        t.translate(begin, &mut keys).await.unwrap();
        assert_eq!(t.oldest_pending_commit_us, Some(1_000));
        let inside = StreamEvent::KeepAlive { wal_end: Lsn(80) };
        assert!(t.translate(inside, &mut keys).await.unwrap().is_empty());
        assert_eq!(t.wal_end, Lsn(80));

        // Application context: JSON kept as sent; anything else kept as a JSON string.
        let ops = t
            .translate(
                message(true, CONTEXT_PREFIX, r#"{"user":"ann"}"#),
                &mut keys,
            )
            .await
            .unwrap();
        assert!(matches!(&ops[..], [LogOp::Context(c)] if c == r#"{"user":"ann"}"#));
        let ops = t
            .translate(message(true, CONTEXT_PREFIX, "not json"), &mut keys)
            .await
            .unwrap();
        assert!(matches!(&ops[..], [LogOp::Context(c)] if c == r#""not json""#));
        // Another prefix is an ordinary message; outside a transaction it keeps its LSN.
        let ops = t
            .translate(message(true, "app", "x"), &mut keys)
            .await
            .unwrap();
        assert!(matches!(&ops[..], [LogOp::Message(m)] if m.prefix == "app"));
        let ops = t
            .translate(message(false, CONTEXT_PREFIX, "{}"), &mut keys)
            .await
            .unwrap();
        assert!(matches!(
            &ops[..],
            [LogOp::NonTransactionalMessage {
                lsn: Lsn(0x100),
                ..
            }]
        ));

        // A relation takes its primary key from the source.
        let relation = Message::Relation(Relation {
            id: 16384,
            schema: "public".into(),
            name: "t".into(),
            replica_identity: b'd',
            columns: vec![RelationColumn {
                is_key: true,
                name: "id".into(),
                type_oid: 23,
                type_modifier: -1,
            }],
        });
        let ops = t.translate(data(&relation), &mut keys).await.unwrap();
        assert!(
            matches!(&ops[..], [LogOp::Relation(r)] if r.primary_key == ["id"] && r.name == "t")
        );
        let truncate = Message::Truncate {
            options: 0,
            relation_ids: vec![1, 2],
        };
        let ops = t.translate(data(&truncate), &mut keys).await.unwrap();
        assert_eq!(ops.len(), 2, "a TRUNCATE of two tables is two changes");
        assert!(t.truncated_in(7, 1) && t.truncated_in(7, 2) && !t.truncated_in(8, 1));

        let ops = t
            .translate(StreamEvent::Commit { end_lsn: Lsn(100) }, &mut keys)
            .await
            .unwrap();
        assert!(matches!(ops[..], [LogOp::Commit { end_lsn: Lsn(100) }]));
        assert_eq!((t.last_commit_end, t.wal_end), (Lsn(100), Lsn(100)));

        // Bytes that are not pgoutput: an error naming where, never a panic.
        let garbage = StreamEvent::Data {
            wal_start: Lsn(0x300),
            data: Bytes::from_static(b"\xff\x00"),
        };
        let err = t.translate(garbage, &mut keys).await.unwrap_err();
        assert!(matches!(
            err,
            CaptureError::Decode {
                lsn: Lsn(0x300),
                ..
            }
        ));
    }
}
