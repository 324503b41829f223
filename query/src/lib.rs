//! pgtrail-query will own offline SQL over an archive (DataFusion over Parquet segments plus
//! the redb tail: per-table history, the `changes` view, `as_of`, `diff`, `row_history`).
//!
//! It depends only on `pgtrail-store`, never on the source database. Nothing is implemented
//! here yet (issue 4); until then an archive is read through `pgtrail_store::LogReader`.
