//! The web UI: a live dashboard of the memory tables, a monitor per query (as
//! Spark's Structured Streaming tab) and the JSON API behind both, served by the
//! engine itself.

mod api;
mod assets;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use axum::Router;
use axum::http::StatusCode;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::engine::Engine;
use crate::error::{BrookError, Result};
use api::ApiError;

/// The environment variable that gives the token when `--ui-token` does not.
pub const TOKEN_ENV: &str = "BROOK_UI_TOKEN";

/// Ports tried after a busy one, as Spark does for its UI (4040, 4041, ...).
const PORT_RETRIES: u16 = 16;

#[derive(Debug, Clone)]
pub struct UiOptions {
    pub bind: IpAddr,
    /// 0 picks a free port.
    pub port: u16,
    /// Required of API calls when given; required to bind beyond loopback.
    pub token: Option<String>,
}

impl Default for UiOptions {
    fn default() -> Self {
        Self {
            bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: 4040,
            token: None,
        }
    }
}

/// A running UI server; stops when dropped.
pub struct UiServer {
    addr: SocketAddr,
    token: Option<String>,
    task: JoinHandle<()>,
}

impl UiServer {
    /// Binds the first free port from `options.port` on and serves `engine`.
    pub async fn start(engine: Arc<Engine>, options: UiOptions) -> Result<Self> {
        let token = options.token.filter(|t| !t.is_empty());
        if !options.bind.is_loopback() && token.is_none() {
            return Err(BrookError::option(
                "--ui-bind",
                format!(
                    "{} is reachable from other machines, and the UI can stop queries: \
                     give a token with --ui-token or {TOKEN_ENV}",
                    options.bind
                ),
            ));
        }
        let listener = bind(options.bind, options.port).await?;
        let addr = listener
            .local_addr()
            .map_err(|e| BrookError::io(options.bind.to_string(), e))?;
        let app: Router = api::router(engine, token.clone())
            .merge(assets::router())
            .fallback(|| async {
                ApiError::new(StatusCode::NOT_FOUND, "no such page or API route")
            })
            .method_not_allowed_fallback(|| async {
                ApiError::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method not allowed on this route",
                )
            });
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!("web UI stopped: {e}");
            }
        });
        Ok(Self { addr, token, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The dashboard's address, with the token when there is one.
    pub fn url(&self) -> String {
        let host = match self.addr.ip() {
            ip if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            ip => ip,
        };
        let base = format!("http://{}/", SocketAddr::new(host, self.addr.port()));
        match &self.token {
            Some(t) => format!("{base}?token={t}"),
            None => base,
        }
    }
}

impl Drop for UiServer {
    fn drop(&mut self) {
        // Event streams never end by themselves, so a graceful shutdown would wait forever.
        self.task.abort();
    }
}

async fn bind(ip: IpAddr, port: u16) -> Result<TcpListener> {
    let last = if port == 0 {
        0
    } else {
        port.saturating_add(PORT_RETRIES)
    };
    let mut error = None;
    for port in port..=last {
        match TcpListener::bind((ip, port)).await {
            Ok(listener) => return Ok(listener),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => error = Some(e),
            Err(e) => return Err(BrookError::io(SocketAddr::new(ip, port).to_string(), e)),
        }
    }
    let e = error.unwrap_or_else(|| std::io::Error::other("no port to try"));
    Err(BrookError::io(format!("{ip} ports {port}-{last}"), e))
}
