//! pgtrail-query owns offline SQL over an archive: DataFusion over the Parquet segments plus
//! the redb log tail, read as one consistent cut.
//!
//! It registers each captured table's history under its schema-qualified name (typed
//! `before`/`after` structs merged across schema versions), the Bemi-style `changes` view over
//! all tables, the `pgtrail.messages` table, and the table functions `as_of`, `as_of_lsn`,
//! `diff` and `row_history` that reconstruct a table at a moment, and [`export`]s the history
//! to a directory or S3 in the layouts lake engines read (changes, cdf, scd2, snapshot), and reads
//! the archive as a replayable stream after a cursor ([`feed`]). It depends only on
//! `pgtrail-store`, never on the source database; segment reads run on blocking threads.

mod archive;
mod changes;
#[doc(hidden)]
pub mod columnar;
mod error;
pub mod export;
pub mod feed;
mod functions;
mod history;
pub mod json;
pub mod keyframes;
mod merge;
pub mod output;
mod pit;
mod read;
mod replay;
pub mod restore;
pub mod revert;
mod scan;
mod schema_versions;
mod session;
mod unknown_spans;
mod view;

pub use archive::{ArchiveSnapshot, TableHistory};
pub use changes::{changes_schema, row_json};
pub use error::{QueryError, is_not_held_at_moment, is_unknown_moment};
pub use history::HistoryTable;
pub use merge::{history_schema, merged_row_fields};
pub use pit::{
    TableState, as_of_batch, diff_batch, row_replay_as_of_batch, row_replay_diff_batch,
    row_replay_row_history, state_at,
};
pub use replay::{Moment, for_each_change};
pub use session::{bounded_session, open_session, read_only_query, session};
