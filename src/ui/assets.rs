//! The pages and their scripts, compiled into the binary so that the UI needs
//! nothing beyond 127.0.0.1.

use axum::Router;
use axum::extract::Path;
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;

use super::api::ApiError;

const FILES: &[(&str, &str, &str)] = &[
    ("brook.css", "text/css", include_str!("assets/brook.css")),
    (
        "common.js",
        "text/javascript",
        include_str!("assets/common.js"),
    ),
    (
        "dashboard.js",
        "text/javascript",
        include_str!("assets/dashboard.js"),
    ),
    (
        "monitor.js",
        "text/javascript",
        include_str!("assets/monitor.js"),
    ),
    (
        "uPlot.js",
        "text/javascript",
        include_str!("assets/vendor/uPlot.iife.min.js"),
    ),
    (
        "uPlot.css",
        "text/css",
        include_str!("assets/vendor/uPlot.min.css"),
    ),
];

pub(super) fn router() -> Router {
    Router::new()
        .route(
            "/",
            get(|| async { Html(include_str!("assets/dashboard.html")) }),
        )
        .route(
            "/monitor",
            get(|| async { Html(include_str!("assets/monitor.html")) }),
        )
        .route("/assets/{file}", get(asset))
}

async fn asset(Path(file): Path<String>) -> Response {
    match FILES.iter().find(|(name, _, _)| *name == file) {
        Some((_, content_type, body)) => {
            ([(header::CONTENT_TYPE, *content_type)], *body).into_response()
        }
        None => ApiError::new(StatusCode::NOT_FOUND, format!("no asset '{file}'")).into_response(),
    }
}
