//! The JSON API. Each request opens one consistent cut of the archive (a session over one
//! redb read transaction) and answers from it alone; answers are the same rows `pgtrail sql
//! --format json` gives for the same question, so anything seen here can be checked there.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use datafusion::arrow::array::RecordBatch;
use datafusion::common::TableReference;
use datafusion::prelude::{DataFrame, Expr, SessionContext, col};
use futures_util::StreamExt as _;
use pgtrail_query::ArchiveSnapshot;
use pgtrail_query::feed::{self, Cursor, TableFilter};
use pgtrail_store::Lsn;

use crate::AppState;
use crate::error::ApiError;

/// A request's query parameters, in order, repeated names kept (`key=a&key=1`).
pub type Params = Query<Vec<(String, String)>>;

/// The parameters one endpoint takes: any other is refused, naming those it knows.
pub(crate) struct Known<'p> {
    params: &'p [(String, String)],
}

impl<'p> Known<'p> {
    pub(crate) fn check(
        params: &'p [(String, String)],
        known: &[&str],
    ) -> Result<Known<'p>, ApiError> {
        for (name, value) in params {
            let base = name.split_once('.').map_or(name.as_str(), |(b, _)| b);
            if !known.contains(&name.as_str()) && !known.contains(&format!("{base}.*").as_str()) {
                return Err(ApiError::bad_request(format!(
                    "unknown parameter {:?}; this endpoint takes {}",
                    truncate(name),
                    known.join(", ")
                )));
            }
            if value.len() > MAX_PARAM || value.contains('\0') {
                return Err(ApiError::bad_request(format!(
                    "parameter {:?} is longer than {MAX_PARAM} bytes or holds a NUL",
                    truncate(name)
                )));
            }
        }
        Ok(Known { params })
    }

    pub(crate) fn one(&self, name: &str) -> Result<Option<&'p str>, ApiError> {
        let mut found = self.all(name);
        let first = found.next();
        if found.next().is_some() {
            return Err(ApiError::bad_request(format!(
                "parameter {name:?} is given twice; give it once"
            )));
        }
        Ok(first)
    }

    fn all<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'p str> + 's {
        self.params
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn number<T: std::str::FromStr>(&self, name: &str, default: T) -> Result<T, ApiError> {
        match self.one(name)? {
            None => Ok(default),
            Some(v) => v.parse().map_err(|_| {
                ApiError::bad_request(format!(
                    "parameter {name}={:?} is not a whole number in range",
                    truncate(v)
                ))
            }),
        }
    }
}

/// The longest parameter value taken (SQL included).
const MAX_PARAM: usize = 32 * 1024;

fn truncate(s: &str) -> String {
    s.chars().take(100).collect()
}

/// `text` as a SQL string literal (DataFusion's SQL has no backslash escapes: doubling the
/// quote is the whole escape).
fn sql_text(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// A moment as the SQL functions take it: an LSN (`0/1A2B3C4`) as text, anything else as a
/// timestamp (`2026-11-24T12:00:00Z`; DataFusion says what it cannot read).
fn moment(text: &str) -> String {
    if text.parse::<Lsn>().is_ok() {
        sql_text(text)
    } else {
        format!("TIMESTAMP {}", sql_text(text))
    }
}

/// The archive with every commit durable when the request came, as one consistent cut.
async fn snapshot(state: &AppState) -> Result<Arc<ArchiveSnapshot>, ApiError> {
    Ok(state.watch.current().await?)
}

/// One consistent cut of the archive holding every commit durable when the request came
/// (shared with the streams and other requests while the log has not moved), and a SQL
/// session over it (which reads the logical messages, hence off the runtime), bounded by the
/// request's memory limit.
async fn cut(state: &AppState) -> Result<(SessionContext, Arc<ArchiveSnapshot>), ApiError> {
    let archive = snapshot(state).await?;
    let memory = state.config.request_memory;
    off_runtime(move || {
        let ctx = pgtrail_query::bounded_session(archive.clone(), memory)?;
        Ok::<_, pgtrail_query::QueryError>((ctx, archive))
    })
    .await
}

/// Run `read` (file I/O) on a blocking thread.
pub(crate) async fn off_runtime<T: Send + 'static, E: Into<ApiError> + Send + 'static>(
    read: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(read)
        .await
        .map_err(|e| ApiError::unavailable(format!("reading the archive failed: {e}")))?
        .map_err(Into::into)
}

/// Rows of a query, at most `max_rows` (then `truncated`), within the request's time limit.
struct Answer {
    batches: Vec<RecordBatch>,
    schema: datafusion::arrow::datatypes::SchemaRef,
    truncated: bool,
}

/// `sql` (read-only) answered within the request's limits (see [`run`]).
async fn query(
    state: &AppState,
    ctx: &SessionContext,
    sql: &str,
    max_rows: usize,
) -> Result<Answer, ApiError> {
    run(state, plan_off_runtime(ctx, sql), max_rows).await
}

/// `sql` (read-only) planned on a blocking thread. A table function (`row_history`, `as_of`,
/// `diff`) reads its segments while it is planned, synchronously: on a runtime worker that
/// read would stall every other request and stream the worker serves. The query's execution
/// is off the runtime already (its scans read on blocking threads). When the request's time
/// limit ends first, the planning finishes on its thread and its result is dropped.
async fn plan_off_runtime(ctx: &SessionContext, sql: &str) -> Result<DataFrame, ApiError> {
    let (ctx, sql) = (ctx.clone(), sql.to_owned());
    let runtime = tokio::runtime::Handle::current();
    off_runtime(move || runtime.block_on(pgtrail_query::read_only_query(&ctx, &sql))).await
}

/// Plan and run a query: at most `max_rows` rows (then `truncated`), within the request's
/// time limit (planning included: a table function may do its work there).
async fn run(
    state: &AppState,
    plan: impl Future<Output = Result<DataFrame, ApiError>>,
    max_rows: usize,
) -> Result<Answer, ApiError> {
    let limit = state.config.request_timeout;
    let run = async {
        let mut stream = plan.await?.execute_stream().await?;
        let schema = stream.schema();
        let (mut batches, mut rows, mut truncated) = (Vec::new(), 0usize, false);
        while let Some(batch) = stream.next().await {
            let batch = batch?;
            if rows + batch.num_rows() > max_rows {
                batches.push(batch.slice(0, max_rows - rows));
                truncated = true;
                break;
            }
            rows += batch.num_rows();
            batches.push(batch);
        }
        Ok::<_, ApiError>(Answer {
            batches,
            schema,
            truncated,
        })
    };
    // Dropping the query's stream cancels it: a runaway query ends here, not the server.
    tokio::time::timeout(limit, run).await.map_err(|_| {
        ApiError::unavailable(format!(
            "the query ran longer than this server allows ({} s) and was cancelled; narrow it (a WHERE on lsn or committed_at, a LIMIT) or run it with `pgtrail sql`",
            limit.as_secs_f64()
        ))
    })?
}

/// `batches` as a JSON array of row objects.
fn rows_json(batches: &[RecordBatch]) -> Result<String, ApiError> {
    let lines = pgtrail_query::json::write_json_lines(Vec::new(), batches)?;
    let lines = String::from_utf8(lines)
        .map_err(|e| ApiError::bad_request(format!("an answer was not UTF-8: {e}")))?;
    Ok(format!("[{}]", lines.trim_end().replace('\n', ",")))
}

fn json_response(body: String) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// `GET /api/tables`: every table with its change count, time and LSN range and schema
/// versions.
pub async fn tables(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let archive = snapshot(&state).await?;
    let mut out = Vec::new();
    for t in archive.tables.values() {
        let mut changes: u64 = t.segments.iter().map(|s| s.rows).sum();
        changes += t.tail.len() as u64;
        let times = t
            .segments
            .iter()
            .flat_map(|s| [s.min_committed_at_us, s.max_committed_at_us])
            .chain(t.tail.iter().map(|(_, r)| r.committed_at_us));
        let (first_at, last_at) = (times.clone().min(), times.max());
        let keys = t
            .segments
            .iter()
            .flat_map(|s| [s.min_key, s.max_key])
            .chain(t.tail.iter().map(|(k, _)| *k));
        let (first, last) = (keys.clone().min(), keys.max());
        let latest = t.latest();
        out.push(serde_json::json!({
            "table": t.qualified_name(),
            "schema": t.schema,
            "name": t.name,
            "changes": changes,
            "first_change_at": first_at.map(micros_to_rfc3339),
            "last_change_at": last_at.map(micros_to_rfc3339),
            "first_cursor": first.map(|k| Cursor(k).to_string()),
            "last_cursor": last.map(|k| Cursor(k).to_string()),
            "schema_versions": t.versions.len(),
            "columns": latest.columns.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
            "primary_key": latest.primary_key,
        }));
    }
    let body = serde_json::json!({
        "position": archive.position.to_string(),
        "tables": out,
    });
    Ok(json_response(body.to_string()))
}

fn micros_to_rfc3339(us: i64) -> String {
    datafusion::arrow::temporal_conversions::timestamp_us_to_datetime(us)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string())
        .unwrap_or_else(|| us.to_string())
}

/// `GET /api/tables/{table}/history?key=42` (one `key` per key column, in order): every
/// change of the row, oldest first, each with `changed` (the fields that differ from the
/// version before) and its context; exactly `row_history`.
pub async fn history(
    State(state): State<Arc<AppState>>,
    Path(table): Path<String>,
    Query(params): Params,
) -> Result<Response, ApiError> {
    let p = Known::check(&params, &["key"])?;
    let keys: Vec<&str> = p.all("key").collect();
    if keys.is_empty() {
        return Err(ApiError::bad_request(
            "give the row's key: ?key=42 (one key= per key column, in the key's order)",
        ));
    }
    let (ctx, archive) = cut(&state).await?;
    let t = archive.table(&table)?;
    let key_columns = t.latest().primary_key.len().max(1);
    if keys.len() != key_columns {
        return Err(ApiError::bad_request(format!(
            "{} has {key_columns} key column{} ({}); give one key= for each",
            t.qualified_name(),
            if key_columns == 1 { "" } else { "s" },
            t.latest().primary_key.join(", ")
        )));
    }
    let args: Vec<String> = keys.iter().map(|k| sql_text(k)).collect();
    let sql = format!(
        "SELECT * FROM row_history({}, {}) ORDER BY lsn, seq",
        sql_text(&table),
        args.join(", ")
    );
    let answer = query(&state, &ctx, &sql, state.config.max_rows).await?;
    let body = format!(
        r#"{{"table":{},"key":{},"truncated":{},"versions":{}}}"#,
        serde_json::Value::from(t.qualified_name()),
        serde_json::json!(keys),
        answer.truncated,
        rows_json(&answer.batches)?
    );
    Ok(json_response(body))
}

/// What `/api/changes` was asked, read from its parameters before the archive is opened.
pub(crate) struct ChangesParams {
    limit: usize,
    /// Newest first.
    desc: bool,
    /// Conditions on the parameters' values, as SQL with their values as literals.
    filters: Vec<String>,
    after: Option<Cursor>,
    tables: Vec<String>,
}

impl ChangesParams {
    pub(crate) fn read(params: &[(String, String)]) -> Result<ChangesParams, ApiError> {
        let p = Known::check(
            params,
            &[
                "table",
                "op",
                "since",
                "until",
                "since_lsn",
                "until_lsn",
                "xid",
                "context.*",
                "order",
                "limit",
                "after",
            ],
        )?;
        let limit: usize = p.number("limit", 100)?;
        if !(1..=10_000).contains(&limit) {
            return Err(ApiError::bad_request("limit must be between 1 and 10000"));
        }
        let desc = match p.one("order")?.unwrap_or("desc") {
            "desc" | "newest" => true,
            "asc" | "oldest" => false,
            other => {
                return Err(ApiError::bad_request(format!(
                    "order={:?}: use asc (oldest first) or desc (newest first)",
                    truncate(other)
                )));
            }
        };
        let mut filters = Vec::new();
        let ops: Vec<String> = p
            .all("op")
            .map(|op| match op.to_ascii_lowercase().as_str() {
                "insert" | "create" => Ok("CREATE"),
                "update" => Ok("UPDATE"),
                "delete" => Ok("DELETE"),
                "truncate" => Ok("TRUNCATE"),
                "snapshot" => Ok("SNAPSHOT"),
                _ => Err(ApiError::bad_request(format!(
                    "op={:?}: use insert, update, delete, truncate or snapshot",
                    truncate(op)
                ))),
            })
            .map(|op| op.map(sql_text))
            .collect::<Result<_, _>>()?;
        if !ops.is_empty() {
            filters.push(format!("operation IN ({})", ops.join(", ")));
        }
        if let Some(t) = p.one("since")? {
            filters.push(format!("committed_at >= {}", moment_time(t)?));
        }
        if let Some(t) = p.one("until")? {
            filters.push(format!("committed_at <= {}", moment_time(t)?));
        }
        for (name, cmp) in [("since_lsn", ">="), ("until_lsn", "<=")] {
            if let Some(l) = p.one(name)? {
                let lsn: Lsn = l
                    .parse()
                    .map_err(|e| ApiError::bad_request(format!("{name}: {e}")))?;
                filters.push(format!("lsn {cmp} {}", lsn.0));
            }
        }
        if p.one("xid")?.is_some() {
            filters.push(format!("transaction_id = {}", p.number::<u32>("xid", 0)?));
        }
        for (name, value) in params {
            if let Some(field) = name.strip_prefix("context.") {
                filters.push(format!(
                    "json_get(context, {}) = {}",
                    sql_text(field),
                    sql_text(value)
                ));
            }
        }
        let after = match p.one("after")? {
            Some(a) => Some(
                a.parse::<Cursor>()
                    .map_err(|e| ApiError::bad_request(format!("after: {e}")))?,
            ),
            None => None,
        };
        Ok(ChangesParams {
            limit,
            desc,
            filters,
            after,
            tables: p.all("table").map(str::to_string).collect(),
        })
    }
}

/// `GET /api/changes?table=&op=&since=&until=&since_lsn=&until_lsn=&xid=&context.user_id=7
/// &order=desc&limit=100&after=CURSOR`: changes of the `changes` view, newest first by
/// default, a page at a time (`next` is the cursor to pass as `after` for the next page).
pub async fn changes(
    State(state): State<Arc<AppState>>,
    Query(params): Params,
) -> Result<Response, ApiError> {
    let ChangesParams {
        limit,
        desc,
        filters,
        after,
        tables: names,
    } = ChangesParams::read(&params)?;
    let (ctx, archive) = cut(&state).await?;
    // The tables (under each name they bore) and the page's start, as the stream finds them.
    let mut conditions: Vec<Expr> = TableFilter::named(&archive, &names)?
        .predicate()
        .into_iter()
        .collect();
    if !desc {
        conditions.extend(after.map(|c| feed::keys_after(c.0)));
    }
    // Oldest first is one query (the view skips segments by their keys). Newest first reads
    // windows of row groups and segments from the newest down and stops once it has `limit`
    // changes: a plain ORDER BY … DESC LIMIT would sort the keys of every segment first.
    let windows = match desc {
        true => {
            let archive = archive.clone();
            off_runtime(move || {
                Ok::<_, ApiError>(feed::newest_first_windows(&archive, after.map(|c| c.0)))
            })
            .await?
        }
        false => vec![None],
    };
    // First the keys of the page (the view reads only its columnar parts for them), then the
    // rows between the first and the last key: the JSON images of the page's rows alone are
    // built, not those of every change a window looks at.
    let mut upper = after.map(|c| c.0);
    let mut keys: Vec<pgtrail_store::ChangeKey> = Vec::new();
    for lower in windows {
        let mut window = conditions.clone();
        if desc {
            window.extend(upper.map(feed::keys_before));
            window.extend(lower.map(feed::keys_from));
        }
        let want = limit - keys.len();
        let answer = changes_query(&state, &ctx, window, &filters, desc, want, true).await?;
        for batch in &answer.batches {
            keys.extend(
                (0..batch.num_rows())
                    .map(|i| feed::key_at(batch, i))
                    .collect::<Result<Vec<_>, _>>()?,
            );
        }
        if keys.len() >= limit {
            break;
        }
        upper = lower;
    }
    let mut batches: Vec<RecordBatch> = Vec::new();
    if let (Some(&first), Some(&last)) = (keys.iter().min(), keys.iter().max()) {
        let mut range = conditions;
        range.push(feed::keys_from(first));
        range.push(feed::keys_through(last));
        let answer = changes_query(&state, &ctx, range, &filters, desc, keys.len(), false).await?;
        for batch in answer.batches.iter().filter(|b| b.num_rows() > 0) {
            batches.push(pgtrail_query::feed::with_cursor(batch)?);
        }
    }
    let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
    let next = match rows == limit {
        true => batches
            .last()
            .and_then(|b| pgtrail_query::feed::cursor_at(b, b.num_rows() - 1).ok()),
        false => None,
    };
    let body = format!(
        r#"{{"changes":{},"next":{}}}"#,
        rows_json(&batches)?,
        serde_json::json!(next.map(|c| c.to_string()))
    );
    Ok(json_response(body))
}

/// The `changes` view's rows meeting `conditions` and the parameters' `filters` (SQL text),
/// in key order (`desc`: newest first), `want` at most; with `keys_only` just `lsn` and `seq`.
async fn changes_query(
    state: &AppState,
    ctx: &SessionContext,
    mut conditions: Vec<Expr>,
    filters: &[String],
    desc: bool,
    want: usize,
    keys_only: bool,
) -> Result<Answer, ApiError> {
    let plan = async move {
        let mut frame = ctx
            .table(TableReference::partial("pgtrail", "changes"))
            .await?;
        for f in filters {
            conditions.push(frame.parse_sql_expr(f)?);
        }
        if let Some(all) = conditions.into_iter().reduce(Expr::and) {
            frame = frame.filter(all)?;
        }
        let mut frame = frame
            .sort(vec![
                col("lsn").sort(!desc, false),
                col("seq").sort(!desc, false),
            ])?
            .limit(0, Some(want))?;
        if keys_only {
            frame = frame.select_columns(&["lsn", "seq"])?;
        }
        Ok(frame)
    };
    run(state, plan, want).await
}

/// A time parameter as a timestamp literal; an LSN here is a mistake worth naming.
fn moment_time(text: &str) -> Result<String, ApiError> {
    if text.parse::<Lsn>().is_ok() {
        return Err(ApiError::bad_request(format!(
            "{text:?} is an LSN: use since_lsn/until_lsn for LSNs, since/until for times"
        )));
    }
    Ok(format!("TIMESTAMP {}", sql_text(text)))
}

/// `GET /api/tables/{table}/as_of?at=2026-11-24T12:00:00Z` (or `at=0/1A2B3C4`, an LSN)
/// `&limit=&offset=`: the table's rows at that moment, in the order `as_of` gives them.
pub async fn as_of(
    State(state): State<Arc<AppState>>,
    Path(table): Path<String>,
    Query(params): Params,
) -> Result<Response, ApiError> {
    let p = Known::check(&params, &["at", "limit", "offset"])?;
    let at = p.one("at")?.ok_or_else(|| {
        ApiError::bad_request("give the moment: ?at=2026-11-24T12:00:00Z or ?at=0/1A2B3C4 (an LSN)")
    })?;
    let function = match at.parse::<Lsn>() {
        Ok(_) => format!("as_of_lsn({}, {})", sql_text(&table), sql_text(at)),
        Err(_) => format!("as_of({}, {})", sql_text(&table), moment(at)),
    };
    paged(&state, &p, &function, "rows").await
}

/// `GET /api/tables/{table}/diff?from=…&to=…` (times or LSNs) `&limit=&offset=`: the rows
/// inserted, deleted and updated between the two moments.
pub async fn diff(
    State(state): State<Arc<AppState>>,
    Path(table): Path<String>,
    Query(params): Params,
) -> Result<Response, ApiError> {
    let p = Known::check(&params, &["from", "to", "limit", "offset"])?;
    let (Some(from), Some(to)) = (p.one("from")?, p.one("to")?) else {
        return Err(ApiError::bad_request(
            "give both moments: ?from=…&to=… (times like 2026-11-24T12:00:00Z or LSNs like 0/1A2B3C4)",
        ));
    };
    let function = format!(
        "diff({}, {}, {})",
        sql_text(&table),
        moment(from),
        moment(to)
    );
    paged(&state, &p, &function, "changes").await
}

/// A table function's rows, `limit` from `offset` (`next_offset` when there are more).
async fn paged(
    state: &AppState,
    p: &Known<'_>,
    function: &str,
    what: &str,
) -> Result<Response, ApiError> {
    let limit: usize = p.number("limit", 1000)?;
    let offset: usize = p.number("offset", 0)?;
    if !(1..=state.config.max_rows).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "limit must be between 1 and {}",
            state.config.max_rows
        )));
    }
    let (ctx, _) = cut(state).await?;
    let sql = format!("SELECT * FROM {function} LIMIT {limit} OFFSET {offset}");
    let answer = query(state, &ctx, &sql, limit).await?;
    let rows: usize = answer.batches.iter().map(RecordBatch::num_rows).sum();
    let body = format!(
        r#"{{"{what}":{},"next_offset":{}}}"#,
        rows_json(&answer.batches)?,
        serde_json::json!((rows == limit).then_some(offset + limit))
    );
    Ok(json_response(body))
}

/// `GET /api/sql?q=SELECT…&format=json|csv|parquet`: read-only SQL (queries only: no DDL, no
/// file writes), at most the server's row limit (JSON says `truncated`; downloads end there
/// and carry `X-Pgtrail-Truncated: true`).
pub async fn sql(
    State(state): State<Arc<AppState>>,
    Query(params): Params,
) -> Result<Response, ApiError> {
    let p = Known::check(&params, &["q", "format"])?;
    let sql = p
        .one("q")?
        .ok_or_else(|| ApiError::bad_request("give the query: ?q=SELECT …"))?;
    let format = p.one("format")?.unwrap_or("json");
    if !["json", "csv", "parquet"].contains(&format) {
        return Err(ApiError::bad_request(format!(
            "format={:?}: use json, csv or parquet",
            truncate(format)
        )));
    }
    let (ctx, _) = cut(&state).await?;
    let answer = query(&state, &ctx, sql, state.config.max_rows).await?;
    let truncated = answer.truncated.to_string();
    let (kind, body) = match format {
        "csv" => (
            "text/csv; charset=utf-8",
            pgtrail_query::output::write_csv(Vec::new(), &answer.batches)?,
        ),
        "parquet" => (
            "application/vnd.apache.parquet",
            pgtrail_query::output::write_parquet(Vec::new(), answer.schema, &answer.batches)?,
        ),
        _ => {
            let columns: Vec<&str> = answer
                .schema
                .fields()
                .iter()
                .map(|f| f.name().as_str())
                .collect();
            let body = format!(
                r#"{{"columns":{},"rows":{},"truncated":{truncated}}}"#,
                serde_json::json!(columns),
                rows_json(&answer.batches)?
            );
            return Ok(json_response(body));
        }
    };
    let file = format!("attachment; filename=\"pgtrail-query.{format}\"");
    Ok((
        [
            (header::CONTENT_TYPE, kind.to_string()),
            (header::CONTENT_DISPOSITION, file),
            (
                header::HeaderName::from_static("x-pgtrail-truncated"),
                truncated,
            ),
        ],
        Body::from(body),
    )
        .into_response())
}

/// Every endpoint is read-only: GET (and HEAD) only.
pub async fn method_not_allowed() -> ApiError {
    ApiError {
        status: axum::http::StatusCode::METHOD_NOT_ALLOWED,
        message: "only GET is served: the server is read-only".into(),
    }
}

/// Any other path: a JSON 404 that names the endpoints.
pub async fn not_found() -> ApiError {
    ApiError::not_found(
        "no such endpoint; the API has /api/tables, /api/tables/{table}/history, /api/tables/{table}/as_of, /api/tables/{table}/diff, /api/changes, /api/sql, /api/stream and /metrics",
    )
}

/// Entry points for the fuzz targets (`tools/fuzz`): not part of the API.
#[doc(hidden)]
pub mod fuzzing {
    use axum::extract::Query;
    use axum::http::Uri;
    use datafusion::sql::sqlparser::ast::{Expr, Value};
    use datafusion::sql::sqlparser::dialect::GenericDialect;
    use datafusion::sql::sqlparser::parser::Parser;
    use datafusion::sql::sqlparser::tokenizer::Token;

    use super::{ChangesParams, MAX_PARAM, Params, moment, sql_text};

    /// `sql` as one whole expression, as DataFusion's parser (its default dialect) reads it.
    fn expression(sql: &str) -> Expr {
        let dialect = GenericDialect {};
        Parser::new(&dialect)
            .try_with_sql(sql)
            .and_then(|mut p| {
                let e = p.parse_expr()?;
                p.expect_token(&Token::EOF)?;
                Ok(e)
            })
            .unwrap_or_else(|e| panic!("{sql:?} is not one expression: {e}"))
    }

    fn text_of(e: &Expr) -> Option<&str> {
        match e {
            Expr::Value(v) => match &v.value {
                Value::SingleQuotedString(s) => Some(s),
                _ => None,
            },
            Expr::TypedString(t) => match &t.value.value {
                Value::SingleQuotedString(s) => Some(s),
                _ => None,
            },
            _ => None,
        }
    }

    /// `query` as a request's query string: never a panic; every value a parameter may carry
    /// reaches SQL as one literal holding exactly that value (nothing a value holds can end
    /// the literal and add SQL of its own), and every condition `/api/changes` builds is one
    /// comparison of a column with literals.
    pub fn query_string(query: &str) {
        let Ok(uri) = format!("/api/changes?{query}").parse::<Uri>() else {
            return;
        };
        let Ok(Query(params)) = Params::try_from_uri(&uri) else {
            return;
        };
        // The values the server takes at all (`Known::check` refuses the others).
        for (_, value) in params
            .iter()
            .filter(|(_, v)| v.len() <= MAX_PARAM && !v.contains('\0'))
        {
            assert_eq!(text_of(&expression(&sql_text(value))), Some(value.as_str()));
            assert_eq!(text_of(&expression(&moment(value))), Some(value.as_str()));
        }
        if let Ok(asked) = ChangesParams::read(&params) {
            for filter in &asked.filters {
                match expression(filter) {
                    Expr::BinaryOp { left, right, .. } => {
                        assert!(
                            matches!(*left, Expr::Identifier(_) | Expr::Function(_)),
                            "{filter:?}"
                        );
                        assert!(
                            matches!(*right, Expr::Value(_) | Expr::TypedString(_)),
                            "{filter:?}"
                        );
                    }
                    Expr::InList { list, .. } => {
                        assert!(list.iter().all(|e| text_of(e).is_some()), "{filter:?}")
                    }
                    other => panic!("{filter:?} reads as {other:?}"),
                }
            }
        }
    }
}
