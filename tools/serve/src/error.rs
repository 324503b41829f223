//! Errors of starting the server, and of answering a request (as JSON with an HTTP status).

use std::net::SocketAddr;
use std::path::PathBuf;

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use pgtrail_query::QueryError;

/// The server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(
        "refusing to listen on {0} without --token-file: only loopback addresses may be served without a token (anyone who reaches the port could read the whole history); give a file holding a bearer token, or listen on 127.0.0.1"
    )]
    OpenWithoutToken(SocketAddr),
    #[error("{} is not a pgtrail archive (it has no log.redb); check --archive", .0.display())]
    NotAnArchive(PathBuf),
    #[error("cannot listen on {addr}: {source} (is another process using the port?)")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Tls(String),
    #[error("the server stopped: {0}")]
    Serve(#[source] std::io::Error),
}

/// A request's error: its status and a message that says what to do. Messages never hold
/// the token or anything but what the request and the archive say.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
        }
    }

    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "error": self.message,
            "status": self.status.as_u16(),
        });
        (self.status, Json(body)).into_response()
    }
}

impl From<QueryError> for ApiError {
    fn from(e: QueryError) -> ApiError {
        let status = match &e {
            QueryError::NoSuchTable { .. } => StatusCode::NOT_FOUND,
            QueryError::Open { .. } => StatusCode::SERVICE_UNAVAILABLE,
            QueryError::Log(_) | QueryError::Segment(_) | QueryError::NoSuchVersion { .. } => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            QueryError::DataFusion(e) => return ApiError::from_datafusion(e),
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError {
            status,
            message: e.to_string(),
        }
    }
}

impl From<pgtrail_store::LogError> for ApiError {
    fn from(e: pgtrail_store::LogError) -> ApiError {
        QueryError::Log(e).into()
    }
}

impl From<datafusion::error::DataFusionError> for ApiError {
    fn from(e: datafusion::error::DataFusionError) -> ApiError {
        ApiError::from_datafusion(&e)
    }
}

impl ApiError {
    /// A query's error: the archive's own refusals keep their meaning (an unknown table is
    /// 404, an unknowable moment 422); memory exhausted is 503; a damaged archive 500; the
    /// rest (SQL and planning errors) are the request's, 400.
    fn from_datafusion(e: &datafusion::error::DataFusionError) -> ApiError {
        use datafusion::error::DataFusionError as D;
        let inner = e.find_root();
        let status = match inner {
            D::External(x) => match x.downcast_ref::<QueryError>() {
                Some(QueryError::NoSuchTable { .. }) => StatusCode::NOT_FOUND,
                Some(
                    QueryError::Log(_) | QueryError::Segment(_) | QueryError::NoSuchVersion { .. },
                ) => StatusCode::INTERNAL_SERVER_ERROR,
                Some(_) if pgtrail_query::is_unknown_moment(e) => StatusCode::UNPROCESSABLE_ENTITY,
                Some(_) => StatusCode::BAD_REQUEST,
                None if x.downcast_ref::<pgtrail_store::SegmentError>().is_some() => {
                    StatusCode::INTERNAL_SERVER_ERROR
                }
                None => StatusCode::BAD_REQUEST,
            },
            D::ResourcesExhausted(_) => StatusCode::SERVICE_UNAVAILABLE,
            D::IoError(_) | D::ObjectStore(_) | D::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::BAD_REQUEST,
        };
        let message = match inner {
            D::ResourcesExhausted(m) => format!(
                "the query needs more memory than a request may hold ({m}); narrow it (a WHERE, a LIMIT) or run it with `pgtrail sql`"
            ),
            D::External(x) => x.to_string(),
            other => other.to_string(),
        };
        ApiError { status, message }
    }
}
