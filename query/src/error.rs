//! Errors of opening and querying an archive.

use std::path::PathBuf;

/// An error opening or querying an archive.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QueryError {
    #[error("cannot open the archive {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: pgtrail_store::LogError,
    },
    #[error(transparent)]
    Log(#[from] pgtrail_store::LogError),
    #[error(transparent)]
    Segment(#[from] pgtrail_store::SegmentError),
    #[error(
        "{0:?} is not a table name (write it as PostgreSQL would: orders, public.orders, public.\"Odd Name\")"
    )]
    BadTableName(String),
    #[error("the archive has no table {name} (it has: {known})")]
    NoSuchTable { name: String, known: String },
    #[error(
        "{moment} is before the archive's history begins ({begins}); nothing is known of the table then"
    )]
    BeforeArchive { moment: String, begins: String },
    #[error(
        "{moment} is before the archive holds {table} ({begins}: it was created, or became capturable, while capture ran, and was read whole then); what it held before is not known"
    )]
    BeforeTable {
        table: String,
        moment: String,
        begins: String,
    },
    #[error(
        "{moment} is while {table} was {what} and not yet read again: that happened between {from} and {to}, and its rows are not known in between"
    )]
    TableUnknown {
        table: String,
        moment: String,
        from: String,
        to: String,
        what: &'static str,
    },
    #[error(
        "no table was named {name} at {moment}: the table now named {now} was named {then} then (a table is found by the name it bore at the moment)"
    )]
    NameNotInForce {
        name: String,
        moment: String,
        then: String,
        now: String,
    },
    #[error(
        "{table} is not captured at {moment}: it left the publication (known by {by}), so its changes no longer reach the archive; add it back to capture it again (it is then read whole)"
    )]
    TableNotCaptured {
        table: String,
        moment: String,
        by: String,
    },
    #[error("{table} did not exist at {moment}: it was dropped (known by {by})")]
    TableDropped {
        table: String,
        moment: String,
        by: String,
    },
    #[error(
        "the archive names schema version {valid_from} of relation {relation_id} but does not hold it; the archive is inconsistent"
    )]
    NoSuchVersion {
        relation_id: u32,
        valid_from: pgtrail_store::ChangeKey,
    },
    #[error(
        "the archive is read-only: SQL here runs queries only (SELECT, WITH, VALUES, EXPLAIN); {0} is refused"
    )]
    ReadOnly(String),
    #[error(transparent)]
    DataFusion(#[from] datafusion::error::DataFusionError),
}

/// Whether `e` is the archive saying it does not know a table's rows at a moment (DDL
/// rewrote it between two looks at the catalog, or it was not read whole yet): an honest
/// refusal, not a wrong answer.
pub fn is_unknown_moment(e: &datafusion::error::DataFusionError) -> bool {
    query_error(e).is_some_and(|q| {
        matches!(
            q,
            QueryError::TableUnknown { .. } | QueryError::BeforeTable { .. }
        )
    })
}

/// Whether `e` says the table had no rows the archive holds at the moment: it was dropped
/// before it, or the archive holds it only from later on (created, or made capturable, after).
pub fn is_not_held_at_moment(e: &datafusion::error::DataFusionError) -> bool {
    query_error(e).is_some_and(|q| {
        matches!(
            q,
            QueryError::TableDropped { .. } | QueryError::BeforeTable { .. }
        )
    })
}

/// The archive's own error inside a DataFusion error, if that is what it is.
fn query_error(e: &datafusion::error::DataFusionError) -> Option<&QueryError> {
    match e {
        datafusion::error::DataFusionError::External(inner) => inner.downcast_ref::<QueryError>(),
        datafusion::error::DataFusionError::Context(_, inner) => query_error(inner),
        _ => None,
    }
}

impl From<QueryError> for datafusion::error::DataFusionError {
    fn from(e: QueryError) -> Self {
        match e {
            QueryError::DataFusion(e) => e,
            e => datafusion::error::DataFusionError::External(Box::new(e)),
        }
    }
}
