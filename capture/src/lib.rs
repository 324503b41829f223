//! pgtrail-capture owns everything that speaks to the source PostgreSQL.
//!
//! Preflight checks ([`preflight`]), the publication and slot ([`slot`]), the initial snapshot
//! read with COPY inside the slot's exported snapshot ([`snapshot`]), the pgoutput decoder
//! ([`pgoutput`], pure and fuzzable), the replication stream and its acknowledgement
//! ([`run`]), the writer thread that owns the archive's redb log ([`writer`]), and the
//! background compactor thread ([`compaction`]). It also owns
//! the throwaway-PostgreSQL harness ([`cluster`]) used by tests, benchmarks and the demo. The
//! replication connection is `pgwire-replication` (CopyBoth, caller-controlled flush LSN);
//! only [`run`] and [`source`] know that. It does not read archives back: that is
//! `pgtrail-query`.

pub mod cluster;
pub mod compaction;
pub mod error;
pub mod pgoutput;
pub mod preflight;
pub mod run;
pub mod slot;
pub mod snapshot;
pub mod source;
pub mod writer;

pub use compaction::CompactionPolicy;
pub use error::{CaptureError, ErrorKind, ReplicationError};
pub use run::{
    CONTEXT_PREFIX, CaptureConfig, CaptureSummary, DEFAULT_STREAM_TIMEOUT, DurableObserver,
    Progress, run,
};
pub use source::SourceConfig;
