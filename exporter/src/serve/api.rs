//! The JSON API (`/api/v1/…`), the OpenAPI document, server-sent events and `/metrics`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::BroadcastStream;

use super::App;
use super::jobs::{ALL_STATES, Refused};
use super::request;

/// Browsers following live updates at once, at most.
pub const MAX_SSE_CLIENTS: usize = 64;

pub const OPENAPI: &str = include_str!("openapi.json");

/// A JSON error: `{"error": "...", "field": "..."}`.
pub fn error(status: StatusCode, field: Option<&str>, message: impl Into<String>) -> Response {
    let mut body = serde_json::json!({"error": message.into()});
    if let Some(f) = field {
        body["field"] = serde_json::Value::String(f.to_string());
    }
    (status, Json(body)).into_response()
}

fn refused(r: Refused) -> Response {
    match r {
        Refused::NotFound => error(StatusCode::NOT_FOUND, None, "no such job"),
        Refused::Conflict(m) => error(StatusCode::CONFLICT, None, m),
        Refused::Internal(m) => error(StatusCode::INTERNAL_SERVER_ERROR, None, m),
    }
}

pub async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

pub async fn health(State(app): State<Arc<App>>) -> Response {
    Json(serde_json::json!({"status": "ok", "version": env!("CARGO_PKG_VERSION"), "max_concurrent": app.mgr.max_concurrent}))
        .into_response()
}

pub async fn submit(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Response {
    let json_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(';').next().is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json")));
    if !json_type {
        return error(StatusCode::UNSUPPORTED_MEDIA_TYPE, None, "send the export request as application/json");
    }
    // A client that may send the same submission twice (a retry after a lost answer) names it.
    let key = match headers.get("idempotency-key").map(|v| v.to_str().map(str::to_string)) {
        None => None,
        Some(Ok(k)) if (1..=128).contains(&k.len()) && k.chars().all(|c| c.is_ascii_graphic()) => Some(k),
        Some(_) => {
            return error(StatusCode::BAD_REQUEST, Some("Idempotency-Key"), "give 1 to 128 visible ASCII characters");
        }
    };
    let hash = blake3::hash(&body).to_hex().to_string();
    let reqs = match tokio::task::spawn_blocking(move || request::parse_submission(&body)).await {
        Ok(Ok(r)) => r,
        Ok(Err(inv)) => {
            return error(
                StatusCode::from_u16(inv.status).unwrap_or(StatusCode::UNPROCESSABLE_ENTITY),
                inv.field.as_deref(),
                inv.message,
            );
        }
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, None, e.to_string()),
    };
    use super::jobs::Submitted;
    match app.mgr.submit_once(reqs, key.as_deref().map(|k| (k, hash.as_str()))) {
        Ok(Submitted::New(rows)) => (StatusCode::CREATED, Json(serde_json::json!({"jobs": rows}))).into_response(),
        Ok(Submitted::Earlier(rows)) => (StatusCode::OK, Json(serde_json::json!({"jobs": rows}))).into_response(),
        Ok(Submitted::KeyReused) => error(
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("Idempotency-Key"),
            "this key was used before for another submission; use a new key for a new submission",
        ),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, None, e),
    }
}

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    state: Option<String>,
    limit: Option<i64>,
    offset: Option<i64>,
}

pub async fn list(
    State(app): State<Arc<App>>,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(q)) = q else {
        return error(
            StatusCode::BAD_REQUEST,
            Some("query"),
            "bad query: state (a job state), limit (1-500), offset (0 or more)",
        );
    };
    if let Some(s) = &q.state
        && !ALL_STATES.contains(&s.as_str())
    {
        return error(
            StatusCode::BAD_REQUEST,
            Some("state"),
            format!("not a job state; one of {}", ALL_STATES.join(", ")),
        );
    }
    let limit = q.limit.unwrap_or(100);
    if !(1..=500).contains(&limit) {
        return error(StatusCode::BAD_REQUEST, Some("limit"), "give 1 to 500");
    }
    let offset = q.offset.unwrap_or(0);
    if offset < 0 {
        return error(StatusCode::BAD_REQUEST, Some("offset"), "give 0 or more");
    }
    match app.mgr.db.list(q.state.as_deref(), limit, offset) {
        Ok((jobs, total)) => Json(serde_json::json!({"jobs": jobs, "total": total})).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, None, e.to_string()),
    }
}

pub async fn get(State(app): State<Arc<App>>, Path(id): Path<String>) -> Response {
    match app.mgr.db.get(&id) {
        Ok(Some(j)) => Json(j).into_response(),
        Ok(None) => refused(Refused::NotFound),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, None, e.to_string()),
    }
}

pub async fn cancel(State(app): State<Arc<App>>, Path(id): Path<String>) -> Response {
    match app.mgr.cancel(&id).await {
        Ok(j) => (StatusCode::ACCEPTED, Json(j)).into_response(),
        Err(r) => refused(r),
    }
}

pub async fn retry(State(app): State<Arc<App>>, Path(id): Path<String>) -> Response {
    match app.mgr.retry(&id) {
        Ok(j) => (StatusCode::ACCEPTED, Json(j)).into_response(),
        Err(r) => refused(r),
    }
}

#[derive(Debug, Deserialize)]
pub struct LogQuery {
    lines: Option<i64>,
}

pub async fn log(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    q: Result<Query<LogQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(q)) = q else {
        return error(StatusCode::BAD_REQUEST, Some("lines"), "give lines as a number, 1 to 1000");
    };
    let n = q.lines.unwrap_or(100);
    if !(1..=super::db::LOG_LINES_KEPT).contains(&n) {
        return error(StatusCode::BAD_REQUEST, Some("lines"), "give 1 to 1000");
    }
    match app.mgr.db.get(&id) {
        Ok(Some(_)) => {}
        Ok(None) => return refused(Refused::NotFound),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, None, e.to_string()),
    }
    match app.mgr.db.log_tail(&id, n) {
        Ok(lines) => Json(serde_json::json!({
            "job_id": id,
            "lines": lines.into_iter().map(|(ts, l)| serde_json::json!({"ts_ms": ts, "line": l})).collect::<Vec<_>>(),
        }))
        .into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, None, e.to_string()),
    }
}

/// Holds one of the event-stream slots (and counts the client) while a stream lives.
struct SseGuard(Arc<App>, #[allow(dead_code)] tokio::sync::OwnedSemaphorePermit);

impl Drop for SseGuard {
    fn drop(&mut self) {
        self.0.mgr.metrics.sse_clients.dec();
    }
}

fn sse(app: Arc<App>, only: Option<String>) -> Response {
    let Ok(permit) = app.sse_slots.clone().try_acquire_owned() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            None,
            format!("{MAX_SSE_CLIENTS} clients already follow live updates; poll /api/v1/jobs instead"),
        );
    };
    app.mgr.metrics.sse_clients.inc();
    let guard = SseGuard(app.clone(), permit);
    let rx = app.mgr.events.subscribe();
    let stream = BroadcastStream::new(rx).filter_map(move |m| {
        let _keep = &guard;
        match m {
            Ok(text) => {
                if let Some(id) = &only
                    && !text.contains(&format!("\"id\":\"{id}\""))
                {
                    return None;
                }
                Some(Ok::<Event, Infallible>(Event::default().event("job").data(&*text)))
            }
            // Too slow a reader missed updates: tell it to reload.
            Err(_) => Some(Ok(Event::default().event("lagged").data("{}"))),
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response()
}

pub async fn events(State(app): State<Arc<App>>) -> Response {
    sse(app, None)
}

pub async fn job_events(State(app): State<Arc<App>>, Path(id): Path<String>) -> Response {
    match app.mgr.db.get(&id) {
        Ok(Some(_)) => sse(app, Some(id)),
        Ok(None) => refused(Refused::NotFound),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, None, e.to_string()),
    }
}

pub async fn agents(State(app): State<Arc<App>>) -> Response {
    let a = app.clone();
    match tokio::task::spawn_blocking(move || a.agents()).await {
        Ok(Ok(v)) => Json(serde_json::json!({"queue": app.watch_dir, "agents": v})).into_response(),
        Ok(Err(e)) => error(StatusCode::SERVICE_UNAVAILABLE, None, e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, None, e.to_string()),
    }
}

pub async fn queue(State(app): State<Arc<App>>) -> Response {
    let a = app.clone();
    match tokio::task::spawn_blocking(move || a.queue_health()).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, None, e.to_string()),
    }
}

pub async fn metrics(State(app): State<Arc<App>>) -> Response {
    let a = app.clone();
    let storage = tokio::task::spawn_blocking(move || a.storage_ok()).await.unwrap_or_default();
    let refs: Vec<(&str, bool)> = storage.iter().map(|(d, ok)| (d.as_str(), *ok)).collect();
    let text = app.mgr.metrics.render(&app.mgr.db, &refs);
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text).into_response()
}

pub async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, None, "no such resource; the API is described at /openapi.json")
}
