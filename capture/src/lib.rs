//! pgtrail-capture owns everything that speaks to the source PostgreSQL.
//!
//! - [`source`]: the connection settings, parsed once, and the two connections they open; its
//!   `replication` module is the only code that knows the replication library.
//! - [`preflight`] checks, the publication and slot ([`slot`]), the initial snapshot read with
//!   COPY inside the slot's exported snapshot ([`snapshot`]).
//! - [`run`]: the loop of sessions and its backoff; a session decides where the archive
//!   continues and checks the slot (`session`), then streams and acknowledges only what is
//!   durable (`stream`), watching a silent connection (`liveness`) and translating events into
//!   the log's operations (`translate`, pure but for a primary-key lookup); tables that join
//!   while it runs are found in the catalog and copied in step with the stream (`table_sync`).
//! - [`pgoutput`]: the decoder, pure and fuzzable; [`writer`]: the thread that owns the
//!   archive's redb log; [`compaction`]: the background compactor thread.
//! - [`cluster`]: the throwaway-PostgreSQL harness used by tests, benchmarks and the demo.
//!
//! It does not read archives back: that is `pgtrail-query`.

pub mod cluster;
pub mod compaction;
pub mod error;
mod liveness;
pub mod pgoutput;
pub mod preflight;
pub mod run;
mod session;
pub mod setup;
mod shown_names;
pub mod slot;
pub mod snapshot;
pub mod source;
mod stream;
mod table_sync;
mod translate;
pub mod writer;

pub use compaction::CompactionPolicy;
pub use error::{CaptureError, ErrorKind, ReplicationError};
pub use run::{
    CaptureConfig, CaptureSummary, DEFAULT_CATALOG_INTERVAL, DEFAULT_STREAM_TIMEOUT,
    DurableObserver, Progress, run,
};
pub use source::SourceConfig;
pub use translate::CONTEXT_PREFIX;
