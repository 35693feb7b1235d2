//! The web UI: a live dashboard of the memory tables, a monitor per query (as
//! Spark's Structured Streaming tab) and the JSON API behind both, served by the
//! engine itself.

mod api;
mod assets;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::Response;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use url::form_urlencoded;

use crate::engine::Engine;
use crate::error::{BrookError, Result};
use api::ApiError;

/// The environment variable that gives the token when no option does.
pub const TOKEN_ENV: &str = "BROOK_UI_TOKEN";

/// The pages load their own scripts and styles and nothing else (uPlot sets
/// element styles from its script, which style-src does not govern); the
/// favicon is an empty `data:` URL.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

/// Ports tried after a busy one, as Spark does for its UI (4040, 4041, ...).
const PORT_RETRIES: u16 = 16;

#[derive(Debug, Clone)]
pub struct UiOptions {
    pub bind: IpAddr,
    /// 0 picks a free port.
    pub port: u16,
    /// Required of API calls when given; required to bind beyond loopback.
    pub token: Option<String>,
    /// A file holding the token (surrounding whitespace ignored), read at start
    /// instead of `token`, which `ps` would show when it comes from the command line.
    pub token_file: Option<PathBuf>,
    /// Connections served at once (at least 1); further ones wait unaccepted,
    /// holding no file descriptor. `None`: an eighth of the open-file limit, 4
    /// to 256, so that the queries keep the rest.
    pub max_connections: Option<usize>,
    /// How long a connection may take to send a request's headers, counted from
    /// its opening or from its previous response: a connection idle or half-sent
    /// for longer is closed.
    pub header_timeout: Duration,
}

impl Default for UiOptions {
    fn default() -> Self {
        Self {
            bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: 4040,
            token: None,
            token_file: None,
            max_connections: None,
            header_timeout: Duration::from_secs(10),
        }
    }
}

/// A running UI server; stops when dropped.
pub struct UiServer {
    addr: SocketAddr,
    token: Option<String>,
    shutdown: watch::Sender<bool>,
}

impl UiServer {
    /// Starts a server when `options` asks for one.
    pub(crate) async fn start_if(
        engine: &Arc<Engine>,
        options: Option<UiOptions>,
    ) -> Result<Option<Self>> {
        match options {
            Some(options) => Ok(Some(Self::start(engine.clone(), options).await?)),
            None => Ok(None),
        }
    }

    /// Binds the first free port from `options.port` on and serves `engine`.
    pub async fn start(engine: Arc<Engine>, options: UiOptions) -> Result<Self> {
        let token = match (&options.token_file, options.token) {
            (None, token) => token.filter(|t| !t.is_empty()),
            (Some(path), None) => Some(read_token_file(path)?),
            (Some(_), Some(_)) => {
                return Err(BrookError::option(
                    "--ui-token-file",
                    "give the token once: --ui-token-file or --ui-token, not both",
                ));
            }
        };
        if !options.bind.is_loopback() && token.is_none() {
            return Err(BrookError::option(
                "--ui-bind",
                format!(
                    "{} is reachable from other machines, and the UI can stop queries: \
                     give a token with --ui-token-file, {TOKEN_ENV} or --ui-token",
                    options.bind
                ),
            ));
        }
        let listener = bind(options.bind, options.port)?;
        let addr = listener
            .local_addr()
            .map_err(|e| BrookError::io(options.bind.to_string(), e))?;
        let (shutdown, stopping) = watch::channel(false);
        let app: Router = api::router(engine, token.clone(), stopping.clone())
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
        // Without a token, only pages of this server may call it: a Host check stops
        // DNS rebinding, an Origin check stops other sites' forms and fetches.
        let app = match &token {
            Some(_) => app,
            None => app.layer(middleware::from_fn(same_origin)),
        };
        let app = app.layer(middleware::map_response(security_headers));
        let connections = options
            .max_connections
            .unwrap_or_else(default_max_connections);
        tokio::spawn(serve(
            listener,
            app,
            Arc::new(Semaphore::new(connections.max(1))),
            options.header_timeout,
            stopping,
        ));
        Ok(Self {
            addr,
            token,
            shutdown,
        })
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
            Some(t) => format!(
                "{base}?token={}",
                form_urlencoded::byte_serialize(t.as_bytes()).collect::<String>()
            ),
            None => base,
        }
    }
}

impl Drop for UiServer {
    /// Ends the event streams too, which would otherwise keep their connections open.
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

/// Reads a token from `path`, naming it when it gives none.
fn read_token_file(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path).map_err(|e| BrookError::io(path, e))?;
    match text.trim() {
        "" => Err(BrookError::option(
            "--ui-token-file",
            format!("{} is empty: write the token into it", path.display()),
        )),
        token => Ok(token.to_string()),
    }
}

/// An eighth of the open-file limit, 4 to 256.
fn default_max_connections() -> usize {
    usize::try_from(open_file_limit() / 8)
        .unwrap_or(usize::MAX)
        .clamp(4, 256)
}

#[cfg(unix)]
fn open_file_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes into the struct it is given.
    match unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } {
        0 => limit.rlim_cur,
        _ => 1024,
    }
}

/// No per-process limit to share with the queries: the bound's upper end.
#[cfg(not(unix))]
fn open_file_limit() -> u64 {
    2048
}

/// Accepts a connection only when one of `connections` is free, so that
/// clients that connect and wait cannot take the descriptors the queries need.
async fn serve(
    listener: TcpListener,
    app: Router,
    connections: Arc<Semaphore>,
    header_timeout: Duration,
    stopping: watch::Receiver<bool>,
) {
    let mut stopped = stopping.clone();
    let mut stop = pin!(async move {
        let _ = stopped.wait_for(|s| *s).await;
    });
    loop {
        let permit = tokio::select! {
            permit = connections.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
            () = &mut stop => return,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut stop => return,
        };
        match accepted {
            Ok((stream, _)) => {
                tokio::spawn(serve_connection(
                    stream,
                    app.clone(),
                    header_timeout,
                    stopping.clone(),
                    permit,
                ));
            }
            // The client gave up before it was accepted.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionAborted | std::io::ErrorKind::ConnectionReset
                ) => {}
            // Out of descriptors, most likely: the queries come first, so the UI
            // waits rather than retrying at once.
            Err(e) => {
                tracing::warn!("web UI cannot accept a connection: {e}");
                drop(permit);
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    () = &mut stop => return,
                }
            }
        }
    }
}

async fn serve_connection(
    stream: TcpStream,
    app: Router,
    header_timeout: Duration,
    mut stopping: watch::Receiver<bool>,
    _permit: OwnedSemaphorePermit,
) {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let connection = builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app));
    let mut connection = pin!(connection);
    let stop = async move {
        let _ = stopping.wait_for(|s| *s).await;
    };
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = stop => {
            connection.as_mut().graceful_shutdown();
            // A client that does not read its response must not keep the
            // connection beyond the server.
            match tokio::time::timeout(header_timeout, connection).await {
                Ok(result) => result,
                Err(_) => return,
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!("web UI connection ended: {e}");
    }
}

async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

async fn same_origin(request: Request, next: Next) -> Response {
    let headers = request.headers();
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let origin = headers.get(header::ORIGIN).and_then(|h| h.to_str().ok());
    let host_ok = host.is_some_and(is_local);
    let origin_ok = origin.is_none_or(|o| {
        o.strip_prefix("http://")
            .is_some_and(|rest| Some(rest) == host && is_local(rest))
    });
    if host_ok && origin_ok {
        next.run(request).await
    } else {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "without a token the UI answers only its own pages on loopback \
             (127.0.0.0/8, [::1]) or localhost",
        )
        .closing()
    }
}

/// Whether a `host[:port]` names this machine's loopback: `localhost`, an
/// address in 127.0.0.0/8 (any of which the server may be bound on) or `[::1]`.
fn is_local(host: &str) -> bool {
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    if name.eq_ignore_ascii_case("localhost") {
        return true;
    }
    let ip = match name.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().map(IpAddr::V6),
        None => name.parse::<Ipv4Addr>().map(IpAddr::V4),
    };
    ip.is_ok_and(|ip| ip.to_canonical().is_loopback())
}

fn bind(ip: IpAddr, port: u16) -> Result<TcpListener> {
    let last = if port == 0 {
        0
    } else {
        port.saturating_add(PORT_RETRIES)
    };
    let mut error = None;
    for port in port..=last {
        match listen(SocketAddr::new(ip, port)) {
            Ok(listener) => return Ok(listener),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => error = Some(e),
            Err(e) => return Err(BrookError::io(SocketAddr::new(ip, port).to_string(), e)),
        }
    }
    let e = error.unwrap_or_else(|| std::io::Error::other("no port to try"));
    Err(BrookError::io(format!("{ip} ports {port}-{last}"), e))
}

/// Connections beyond the bound wait in the kernel's queue, which holds no
/// descriptor of this process (Linux caps it at `net.core.somaxconn`).
const BACKLOG: u32 = 1024;

fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    // As std does on Unix: a restarted UI gets its port back while the last
    // run's connections linger in TIME_WAIT. (On Windows the option would let
    // it bind a port another process holds.)
    #[cfg(unix)]
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}
