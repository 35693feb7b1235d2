//! The JSON API behind the pages: queries, their progress, memory tables, a
//! stop button, and a server-sent event per completed batch.

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::json::ArrayWriter;
use datafusion::catalog::TableProvider;
use futures::Stream;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::watch;

use crate::engine::Engine;
use crate::progress::{Monitored, QueryInfo, QueryProgress};
use crate::sink::memory::last_rows;

#[derive(Clone)]
struct Api {
    engine: Arc<Engine>,
    token: Option<Arc<str>>,
    /// Turns true when the server stops, ending the event streams.
    stopping: watch::Receiver<bool>,
}

pub(super) fn router(
    engine: Arc<Engine>,
    token: Option<String>,
    stopping: watch::Receiver<bool>,
) -> Router {
    let api = Api {
        engine,
        token: token.map(Arc::from),
        stopping,
    };
    Router::new()
        .route("/api/queries", get(list_queries))
        .route("/api/queries/{id}", get(query))
        .route("/api/queries/{id}/progress", get(progress))
        .route("/api/queries/{id}/stop", post(stop))
        .route("/api/tables", get(list_tables))
        .route("/api/tables/{name}", get(table))
        .route("/api/events", get(events))
        .route_layer(middleware::from_fn_with_state(api.clone(), require_token))
        .with_state(api)
}

/// An error as the API returns it: `{"error": "...", "status": 404}`.
#[derive(Debug)]
pub(super) struct ApiError {
    status: StatusCode,
    error: String,
}

impl ApiError {
    pub(super) fn new(status: StatusCode, error: impl Into<String>) -> Self {
        Self {
            status,
            error: error.into(),
        }
    }

    /// The answer to a request refused for who sent it: its connection is
    /// closed after it rather than kept open for more of the same.
    pub(super) fn closing(self) -> Response {
        let mut response = self.into_response();
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        response
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": self.error, "status": self.status.as_u16()});
        (self.status, Json(body)).into_response()
    }
}

/// A path segment that is not UTF-8 (`%FF`) gets a JSON error like any other.
fn segment(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    path.map(|Path(s)| s)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))
}

type ApiResult<T> = Result<Json<T>, ApiError>;

/// The token comes as `Authorization: Bearer T` or, for the browser's event
/// stream, which cannot set headers, as `?token=T`.
async fn require_token(State(api): State<Api>, request: Request, next: Next) -> Response {
    let Some(token) = &api.token else {
        return next.run(request).await;
    };
    let bearer = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let in_query = request.uri().query().and_then(|q| {
        url::form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "token")
            .map(|(_, v)| v.into_owned())
    });
    if bearer == Some(token) || in_query.as_deref() == Some(token) {
        next.run(request).await
    } else {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "this UI needs its token: 'Authorization: Bearer <token>' or '?token=<token>'",
        )
        .closing()
    }
}

impl Api {
    fn query(
        &self,
        id: Result<Path<String>, PathRejection>,
    ) -> Result<Arc<dyn Monitored>, ApiError> {
        let id = segment(id)?;
        self.engine.find_monitored(&id).ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!("no query with id or name '{id}'"),
            )
        })
    }
}

async fn list_queries(State(api): State<Api>) -> Json<Vec<QueryInfo>> {
    Json(api.engine.monitored().iter().map(|q| q.info()).collect())
}

async fn query(
    State(api): State<Api>,
    id: Result<Path<String>, PathRejection>,
) -> ApiResult<QueryInfo> {
    Ok(Json(api.query(id)?.info()))
}

#[derive(Deserialize)]
struct Limit {
    /// Only the last `limit` records or rows.
    limit: Option<usize>,
}

fn limit(params: Result<Query<Limit>, QueryRejection>) -> Result<usize, ApiError> {
    match params {
        Ok(Query(Limit { limit })) => Ok(limit.unwrap_or(usize::MAX)),
        Err(e) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("{}; 'limit' takes a whole number", e.body_text()),
        )),
    }
}

async fn progress(
    State(api): State<Api>,
    id: Result<Path<String>, PathRejection>,
    params: Result<Query<Limit>, QueryRejection>,
) -> ApiResult<Vec<QueryProgress>> {
    let limit = limit(params)?;
    let records = api.query(id)?.recent_progress();
    let skip = records.len().saturating_sub(limit);
    Ok(Json(records.into_iter().skip(skip).collect()))
}

async fn stop(
    State(api): State<Api>,
    id: Result<Path<String>, PathRejection>,
) -> ApiResult<QueryInfo> {
    let query = api.query(id)?;
    // A query that had failed reports its error in the returned `exception`.
    let _ = query.stop().await;
    Ok(Json(query.info()))
}

#[derive(Serialize)]
struct TableSummary {
    name: String,
    num_rows: usize,
}

async fn list_tables(State(api): State<Api>) -> ApiResult<Vec<TableSummary>> {
    let mut tables = vec![];
    for (name, sink) in api.engine.memory_tables() {
        let rows = sink.rows().map_err(internal)?;
        tables.push(TableSummary {
            name,
            num_rows: rows.iter().map(RecordBatch::num_rows).sum(),
        });
    }
    Ok(Json(tables))
}

#[derive(Serialize)]
struct TableRows {
    name: String,
    columns: Vec<Column>,
    /// Rows in the table; `rows` holds the last `limit` of them.
    num_rows: usize,
    rows: Value,
}

#[derive(Serialize)]
struct Column {
    name: String,
    data_type: String,
}

async fn table(
    State(api): State<Api>,
    name: Result<Path<String>, PathRejection>,
    params: Result<Query<Limit>, QueryRejection>,
) -> ApiResult<TableRows> {
    let name = segment(name)?;
    let limit = limit(params)?;
    let sink = api.engine.memory_table(&name).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "no memory table '{name}' (memory tables: {})",
                api.engine
                    .memory_tables()
                    .into_iter()
                    .map(|(name, _)| name)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
    })?;
    let batches = sink.rows().map_err(internal)?;
    let num_rows = batches.iter().map(RecordBatch::num_rows).sum();
    let columns = sink
        .schema()
        .fields()
        .iter()
        .map(|f| Column {
            name: f.name().clone(),
            data_type: f.data_type().to_string(),
        })
        .collect();
    Ok(Json(TableRows {
        name,
        columns,
        num_rows,
        rows: rows_json(&last_rows(&batches, limit))?,
    }))
}

fn rows_json(batches: &[RecordBatch]) -> Result<Value, ApiError> {
    let mut writer = ArrayWriter::new(Vec::new());
    writer
        .write_batches(&batches.iter().collect::<Vec<_>>())
        .and_then(|()| writer.finish())
        .map_err(internal)?;
    let bytes = writer.into_inner();
    if bytes.is_empty() {
        return Ok(json!([]));
    }
    serde_json::from_slice(&bytes).map_err(internal)
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

/// One `progress` event per completed batch of any query, data being the
/// progress record; `lagged` says how many records a slow reader missed.
async fn events(State(api): State<Api>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let receiver = api.engine.subscribe_progress();
    let stream = futures::stream::unfold(
        (receiver, api.stopping),
        |(mut receiver, mut stopping)| async move {
            let received = tokio::select! {
                r = receiver.recv() => r,
                _ = stopping.wait_for(|s| *s) => return None,
            };
            let event = match received {
                Ok(progress) => Event::default()
                    .event("progress")
                    .json_data(&progress)
                    .unwrap_or_else(|e| Event::default().event("error").data(e.to_string())),
                Err(RecvError::Lagged(missed)) => {
                    Event::default().event("lagged").data(missed.to_string())
                }
                Err(RecvError::Closed) => return None,
            };
            Some((Ok(event), (receiver, stopping)))
        },
    );
    Sse::new(stream).keep_alive(KeepAlive::default())
}
