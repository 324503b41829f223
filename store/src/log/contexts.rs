//! The `contexts` table read in step with the changes: both are keyed `(commit_lsn, seq)`, so
//! one pass over each labels every change with the context of its run (see
//! [`ContextRun`](super::ContextRun)).

use redb::ReadTransaction;

use super::ContextRun;
use super::codec::decode;
use super::schema::CONTEXTS;
use crate::change::{ChangeRecord, Op};
use crate::error::LogError;

type Key = (u64, u32);

pub(crate) struct ContextCursor {
    /// `None` for a log without the table (written before version 6: contexts are inline).
    entries: Option<redb::Range<'static, Key, &'static [u8]>>,
    next: Option<(Key, ContextRun)>,
    current: Option<(Key, ContextRun)>,
}

impl ContextCursor {
    /// Over the runs of `rtx`'s log, from the first.
    pub(crate) fn new(rtx: &ReadTransaction) -> Result<ContextCursor, LogError> {
        let table = super::table_if_made(rtx, CONTEXTS)?;
        let mut cursor = ContextCursor {
            entries: table.map(|t| t.range::<Key>(..)).transpose()?,
            next: None,
            current: None,
        };
        cursor.next = cursor.pull()?;
        Ok(cursor)
    }

    fn pull(&mut self) -> Result<Option<(Key, ContextRun)>, LogError> {
        let Some(entries) = self.entries.as_mut() else {
            return Ok(None);
        };
        match entries.next() {
            Some(e) => {
                let (k, v) = e?;
                Ok(Some((k.value(), decode(v.value(), "contexts")?)))
            }
            None => Ok(None),
        }
    }

    /// Give `record` (the change at `key`; keys must come in order) its context: its own when
    /// it carries one inline (written before version 6), else its run's.
    pub(crate) fn label(&mut self, key: Key, record: &mut ChangeRecord) -> Result<(), LogError> {
        if record.context.is_some() {
            return Ok(());
        }
        while self.next.as_ref().is_some_and(|(k, _)| *k <= key) {
            self.current = self.next.take();
            self.next = self.pull()?;
        }
        if let Some(((lsn, _), run)) = &self.current
            && *lsn == key.0
            && !(record.op == Op::Message && key.1 < run.declared_at)
        {
            record.context = Some(run.json.clone());
        }
        Ok(())
    }
}
