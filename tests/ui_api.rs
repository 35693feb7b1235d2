//! The web UI's HTTP API, over real HTTP against the dashboard's queries on
//! generated orders.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use brook::cli::demo::{QUERIES, demo_sql};
use brook::orders::{GeneratorConfig, OrderGenerator};
use brook::ui::{UiOptions, UiServer};
use brook::{Engine, StreamingQuery};
use chrono::NaiveDateTime;
use serde_json::Value;

struct Setup {
    _dir: tempfile::TempDir,
    input: std::path::PathBuf,
    engine: Arc<Engine>,
    queries: Vec<Arc<StreamingQuery>>,
    ui: UiServer,
    http: reqwest::Client,
}

/// Lines in the first file.
const LINES: u64 = 3000;

/// Writes `count` orders (1% malformed) 10 ms apart from `start`.
fn write_orders(dir: &Path, name: &str, start: &str, count: i64, seed: u64) {
    let mut orders = OrderGenerator::new(GeneratorConfig {
        malformed: 0.01,
        seed,
        ..GeneratorConfig::default()
    });
    let start = NaiveDateTime::parse_from_str(start, "%Y-%m-%d %H:%M:%S").unwrap();
    let lines: Vec<String> = (0..count)
        .map(|i| orders.line(start + chrono::Duration::milliseconds(i * 10)))
        .collect();
    common::put(dir, name, &lines);
}

async fn setup(token: Option<&str>) -> Setup {
    setup_with(UiOptions {
        token: token.map(String::from),
        ..UiOptions::default()
    })
    .await
}

/// The demo's queries on a first file, and a UI on any free port.
async fn setup_with(options: UiOptions) -> Setup {
    let (dir, input) = common::tmp_source();
    write_orders(&input, "a.csv", "2016-03-22 20:00:00", LINES as i64, 1);
    let engine = Arc::new(Engine::new());
    let mut queries = vec![];
    for (name, sql) in QUERIES {
        let symbols = concat!(env!("CARGO_MANIFEST_DIR"), "/queries/symbols.csv");
        let sql = demo_sql(sql, &input.display().to_string(), symbols, name);
        queries.extend(engine.execute(&sql).await.unwrap());
    }
    for q in &queries {
        q.process_all_available().await.unwrap();
    }
    let ui = UiServer::start(engine.clone(), UiOptions { port: 0, ..options })
        .await
        .unwrap();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    Setup {
        _dir: dir,
        input,
        engine,
        queries,
        ui,
        http,
    }
}

impl Setup {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.ui.addr())
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let response = self.http.get(self.url(path)).send().await.unwrap();
        json(response).await
    }

    async fn post(&self, path: &str) -> (u16, Value) {
        let response = self.http.post(self.url(path)).send().await.unwrap();
        json(response).await
    }
}

/// The next piece of an event stream, within 30 s.
async fn next_events(events: &mut reqwest::Response) -> String {
    let chunk = tokio::time::timeout(Duration::from_secs(30), events.chunk())
        .await
        .expect("no event within 30 s")
        .unwrap()
        .expect("the event stream ended");
    String::from_utf8_lossy(&chunk).into_owned()
}

async fn json(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    (status, body)
}

/// Asserts a JSON error: the status in the response and in the body, and what the message names.
fn assert_error(reply: (u16, Value), status: u16, names: &str) {
    assert_eq!(reply.0, status, "{}", reply.1);
    assert_eq!(reply.1["status"], status, "{}", reply.1);
    let message = reply.1["error"].as_str().unwrap();
    assert!(message.contains(names), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_and_their_progress() {
    let s = setup(None).await;
    let (status, list) = s.get("/api/queries").await;
    assert_eq!(status, 200);
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "buy_sell_per_second",
            "top_clients",
            "top_stocks",
            "volume_per_sector"
        ]
    );
    let clients = &list[1];
    assert_eq!(clients["active"], true);
    assert_eq!(clients["output_mode"], "complete");
    assert_eq!(clients["memory_table"], "top_clients");
    assert_eq!(clients["sink"], "MemorySink[top_clients]");
    assert!(
        clients["sql"]
            .as_str()
            .unwrap()
            .contains("GROUP BY client_id")
    );
    assert!(clients["source"].as_str().unwrap().contains("FileSource"));
    assert_eq!(clients["trigger"], "processing-time 0ns");
    assert_eq!(clients["checkpoint"], Value::Null);

    let id = clients["id"].as_str().unwrap();
    let (status, by_id) = s.get(&format!("/api/queries/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(by_id["name"], "top_clients");
    let (_, by_name) = s.get("/api/queries/top_clients").await;
    assert_eq!(by_name["id"], id);
    assert_error(
        s.get("/api/queries/no-such-query").await,
        404,
        "no-such-query",
    );

    let (status, progress) = s.get(&format!("/api/queries/{id}/progress")).await;
    assert_eq!(status, 200);
    let records = progress.as_array().unwrap();
    assert!(!records.is_empty());
    let sum = |field: &str| -> u64 { records.iter().map(|p| p[field].as_u64().unwrap()).sum() };
    // Every line written is either an input row or a counted malformed one.
    assert!(sum("num_malformed_rows") > 0);
    assert_eq!(sum("num_input_rows") + sum("num_malformed_rows"), LINES);
    let last = records.last().unwrap();
    for field in [
        "batch_id",
        "duration_ms",
        "state_operators",
        "sources",
        "sink",
        "event_time",
    ] {
        assert!(last.get(field).is_some(), "{field} missing from {last}");
    }
    let read = records.iter().find(|p| p["num_input_rows"] != 0).unwrap();
    let offset = read["sources"][0]["offset"].to_string();
    assert!(offset.contains("a.csv"), "{offset}");

    let (_, one) = s.get("/api/queries/top_clients/progress?limit=1").await;
    assert_eq!(one.as_array().unwrap().len(), 1);
    assert_eq!(one[0]["batch_id"], last["batch_id"]);
    assert_error(
        s.get("/api/queries/top_clients/progress?limit=many").await,
        400,
        "limit",
    );
    assert_error(s.get("/api/queries/nope/progress").await, 404, "nope");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_tables_as_json() {
    let s = setup(None).await;
    let (status, tables) = s.get("/api/tables").await;
    assert_eq!(status, 200);
    assert_eq!(tables[1]["name"], "top_clients");
    assert_eq!(tables[1]["num_rows"], 5);

    let (status, clients) = s.get("/api/tables/top_clients").await;
    assert_eq!(status, 200);
    assert_eq!(clients["columns"][0]["name"], "client_id");
    assert_eq!(clients["columns"][1]["data_type"], "Float64");
    let expected = s
        .engine
        .sql("SELECT client_id, traded FROM top_clients")
        .await
        .unwrap();
    let expected = common::table(&expected);
    let got: Vec<Vec<String>> = clients["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| vec![r["client_id"].to_string(), r["traded"].to_string()])
        .collect();
    assert_eq!(got.len(), 5);
    for (g, e) in got.iter().zip(&expected) {
        assert_eq!(g[0], e[0]);
        let (g, e): (f64, f64) = (g[1].parse().unwrap(), e[1].parse().unwrap());
        assert!((g - e).abs() < 1e-6 * e.abs(), "{g} vs {e}");
    }

    let (_, seconds) = s.get("/api/tables/buy_sell_per_second").await;
    let all = seconds["rows"].as_array().unwrap().clone();
    assert!(all.len() > 2);
    assert_eq!(seconds["num_rows"], all.len());
    let (_, last_two) = s.get("/api/tables/buy_sell_per_second?limit=2").await;
    assert_eq!(last_two["num_rows"], all.len());
    assert_eq!(last_two["rows"].as_array().unwrap(), &all[all.len() - 2..]);
    assert!(
        all[0]["second"]
            .as_str()
            .unwrap()
            .starts_with("2016-03-22T20:00:0")
    );

    // The volume per sector after one batch: a row per sector of the one minute
    // the orders span, adding up to the orders read.
    let (_, sectors) = s.get("/api/tables/volume_per_sector").await;
    let columns: Vec<&str> = sectors["columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(columns, ["minute", "sector", "orders", "shares"]);
    let rows = sectors["rows"].as_array().unwrap();
    assert!(rows.len() > 5, "{sectors}");
    assert!(
        rows.iter().all(|r| r["minute"] == "2016-03-22T20:00:00"),
        "{sectors}"
    );
    let orders: u64 = rows.iter().map(|r| r["orders"].as_u64().unwrap()).sum();
    let read: u64 = s.queries[3]
        .recent_progress()
        .iter()
        .map(|p| p.num_input_rows)
        .sum();
    assert_eq!(orders, read);

    assert_error(s.get("/api/tables/nope").await, 404, "top_clients");
    assert_error(
        s.get("/api/tables/top_clients?limit=-1").await,
        400,
        "limit",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_bad_methods_and_unknown_routes() {
    let s = setup(None).await;
    assert_error(s.get("/api/queries/top_clients/stop").await, 405, "method");
    assert_error(s.post("/api/queries").await, 405, "method");
    assert_error(s.post("/api/queries/nope/stop").await, 404, "nope");
    assert_error(s.get("/api/nothing/here").await, 404, "no such");

    let (status, stopped) = s.post("/api/queries/top_clients/stop").await;
    assert_eq!(status, 200);
    assert_eq!(stopped["active"], false);
    assert_eq!(stopped["exception"], Value::Null);
    assert!(!s.queries[1].is_active());
    assert!(s.queries[0].is_active(), "only the named query stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_per_completed_batch() {
    let s = setup(None).await;
    let mut events = s.http.get(s.url("/api/events")).send().await.unwrap();
    assert_eq!(events.status(), 200);
    assert_eq!(events.headers()["content-type"], "text/event-stream");
    write_orders(&s.input, "b.csv", "2016-03-22 20:01:00", 500, 2);
    let mut text = String::new();
    let mut seen = vec![];
    while seen.len() < 4 {
        text.push_str(&next_events(&mut events).await);
        while let Some(end) = text.find("\n\n") {
            let event: String = text.drain(..end + 2).collect();
            if let Some(data) = event.strip_prefix("event: progress\ndata: ") {
                let p: Value = serde_json::from_str(data.trim()).unwrap();
                if p["num_input_rows"].as_u64() > Some(0) {
                    seen.push(p["name"].as_str().unwrap().to_string());
                }
            }
        }
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            "buy_sell_per_second",
            "top_clients",
            "top_stocks",
            "volume_per_sector"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_and_bundled_assets() {
    let s = setup(None).await;
    for (path, kind, holds) in [
        ("/", "text/html", "buy-sell-chart"),
        ("/monitor", "text/html", "chart-durations"),
        ("/assets/uPlot.js", "text/javascript", "uPlot"),
        ("/assets/dashboard.js", "text/javascript", "top_stocks"),
        ("/", "text/html", "sectors-minute"),
        (
            "/assets/dashboard.js",
            "text/javascript",
            "volume_per_sector",
        ),
        ("/assets/brook.css", "text/css", "body"),
    ] {
        let response = s.http.get(s.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
        let content_type = response.headers()["content-type"]
            .to_str()
            .unwrap()
            .to_string();
        assert!(content_type.starts_with(kind), "{path}: {content_type}");
        assert!(response.text().await.unwrap().contains(holds), "{path}");
    }
    assert_error(s.get("/assets/nope.js").await, 404, "nope.js");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_guards_the_api() {
    let s = setup(Some("s3cret")).await;
    assert!(s.ui.url().ends_with("/?token=s3cret"), "{}", s.ui.url());
    assert_error(s.get("/api/queries").await, 401, "token");
    assert_error(s.get("/api/queries?token=wrong").await, 401, "token");
    let (status, _) = s.get("/api/queries?token=s3cret").await;
    assert_eq!(status, 200);
    let response = s
        .http
        .get(s.url("/api/tables/top_clients"))
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let events = s
        .http
        .get(s.url("/api/events?token=s3cret"))
        .send()
        .await
        .unwrap();
    assert_eq!(events.status(), 200);
    assert_error(s.post("/api/queries/top_clients/stop").await, 401, "token");
    assert!(s.queries[1].is_active());
    let stopped = s
        .http
        .post(s.url("/api/queries/top_clients/stop"))
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(json(stopped).await.1["active"], false);
    // The pages themselves hold no data; they pass the token on from their address.
    let page = s.http.get(s.url("/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_only_its_own_pages_may_call_it() {
    let s = setup(None).await;
    let with = |method: reqwest::Method, path: &str, header: &str, value: &str| {
        s.http
            .request(method, s.url(path))
            .header(header, value)
            .send()
    };
    // Another site's form or fetch (its Origin), and DNS rebinding (a foreign Host).
    let forged = with(
        reqwest::Method::POST,
        "/api/queries/top_clients/stop",
        "origin",
        "http://evil.example",
    );
    assert_error(json(forged.await.unwrap()).await, 403, "own pages");
    let rebound = with(
        reqwest::Method::GET,
        "/api/tables/top_clients",
        "host",
        "evil.example:4040",
    );
    assert_error(json(rebound.await.unwrap()).await, 403, "own pages");
    assert!(s.queries[1].is_active());
    let own = format!("http://{}", s.ui.addr());
    let page = with(
        reqwest::Method::POST,
        "/api/queries/top_clients/stop",
        "origin",
        &own,
    );
    assert_eq!(json(page.await.unwrap()).await.1["active"], false);
    let local = format!("localhost:{}", s.ui.addr().port());
    let by_name = with(reqwest::Method::GET, "/api/tables", "host", &local);
    assert_eq!(by_name.await.unwrap().status(), 200);
    assert_error(s.get("/api/queries/%FF").await, 400, "UTF-8");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binding_beyond_loopback_needs_a_token_and_busy_ports_are_skipped() {
    let engine = Arc::new(Engine::new());
    let open = UiOptions {
        bind: "0.0.0.0".parse().unwrap(),
        port: 0,
        ..UiOptions::default()
    };
    let Err(e) = UiServer::start(engine.clone(), open.clone()).await else {
        panic!("bound 0.0.0.0 without a token");
    };
    assert!(e.to_string().contains("--ui-token"), "{e}");
    let guarded = UiOptions {
        token: Some("t".into()),
        ..open
    };
    let server = UiServer::start(engine.clone(), guarded).await.unwrap();
    assert!(
        server.url().starts_with("http://127.0.0.1:"),
        "{}",
        server.url()
    );

    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let next = UiServer::start(
        engine,
        UiOptions {
            port,
            ..UiOptions::default()
        },
    )
    .await
    .unwrap();
    assert!(next.addr().port() > port && next.addr().port() <= port + 16);
}

/// `brook run FILE --ui` as a user runs it: the dashboard's console-sink queries
/// are served as tables too, and the UI outlives the available-now queries.
#[test]
fn run_with_ui_serves_console_queries() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data/orders");
    std::fs::create_dir_all(&data).unwrap();
    write_orders(&data, "a.csv", "2016-03-22 20:00:00", LINES as i64, 3);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("queries/dashboard.sql");
    let mut child = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_brook"))
            .args([
                "run",
                "--ui",
                "--ui-port",
                "0",
                "--trigger",
                "available-now",
            ])
            .arg(&script)
            .current_dir(dir.path())
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut stderr = BufReader::new(child.0.stderr.take().unwrap()).lines();
    let mut url = None;
    for line in stderr.by_ref().map_while(Result::ok) {
        if let Some(u) = line.strip_prefix("brook: web UI at ") {
            url = Some(u.to_string());
        }
        if line.contains("stays up until Ctrl-C") {
            break;
        }
    }
    let url = url.expect("brook run printed no UI address");
    let get = |path: &str| -> Value {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let http = reqwest::Client::builder().no_proxy().build().unwrap();
            let text = http
                .get(format!("{}{path}", url.trim_end_matches('/')))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            serde_json::from_str(&text).unwrap()
        })
    };
    let queries = get("/api/queries");
    assert_eq!(queries[1]["name"], "top_clients");
    assert!(
        queries[1]["sink"].as_str().unwrap().starts_with("Console"),
        "{queries}"
    );
    assert_eq!(queries[1]["memory_table"], "top_clients");
    assert_eq!(queries[1]["active"], false);
    let clients = get("/api/tables/top_clients");
    assert_eq!(clients["num_rows"], 5, "{clients}");
    let seconds = get("/api/tables/buy_sell_per_second");
    let rows = seconds["rows"].as_array().unwrap();
    let total: u64 = rows
        .iter()
        .map(|r| r["buys"].as_u64().unwrap() + r["sells"].as_u64().unwrap())
        .sum();
    let malformed: u64 = get("/api/queries/buy_sell_per_second/progress")
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["num_malformed_rows"].as_u64().unwrap())
        .sum();
    // 30 s of orders, 100 a second: every second closes but the last five or so
    // (the watermark's delay), each holding its 100 orders less the malformed.
    assert!((24..=26).contains(&rows.len()), "{seconds}");
    assert!(total + malformed <= LINES, "{total} + {malformed}");
    assert!(total >= rows.len() as u64 * 100 - malformed, "{total}");

    unsafe { libc::kill(child.0.id() as i32, libc::SIGINT) };
    assert!(child.0.wait().unwrap().success());
}

/// Kills the child if a failed assertion leaves it running.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_server_ends_its_event_streams() {
    let s = setup(None).await;
    let mut events = s.http.get(s.url("/api/events")).send().await.unwrap();
    let url = s.url("/api/queries");
    drop(s.ui);
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(Some(_)) = events.chunk().await {}
    });
    assert!(ended.await.is_ok(), "the event stream outlived the server");
    // The server stops on its own task, which may end the event streams just
    // before it stops taking connections.
    let stopped = tokio::time::timeout(Duration::from_secs(10), async {
        while s.http.get(&url).send().await.is_ok() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    assert!(stopped.await.is_ok(), "the server still answers");
}

/// Reads `brook`'s standard error a line at a time on a thread of its own, so
/// that a test can wait for a line with a deadline.
fn stderr_lines(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<String> {
    use std::io::{BufRead, BufReader};
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let (send, receive) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            if send.send(line).is_err() {
                break;
            }
        }
    });
    receive
}

/// The next line of `lines` that `wanted` accepts, within 60 s.
fn wait_for_line(
    lines: &std::sync::mpsc::Receiver<String>,
    what: &str,
    mut wanted: impl FnMut(&str) -> bool,
) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut seen = vec![];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if wanted(&line) => return line,
            Ok(line) => seen.push(line),
            Err(e) => panic!("no {what} ({e}); brook wrote:\n{}", seen.join("\n")),
        }
    }
}

/// Connections that send nothing, or half a request, must not take the file
/// descriptors the queries need: 300 of them under `ulimit -n 256` made every
/// read of a new file fail with "Too many open files".
#[test]
fn idle_connections_leave_the_queries_their_file_descriptors() {
    use std::io::Write;
    use std::net::{SocketAddr, TcpStream};
    use std::process::{Command, Stdio};

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data/orders");
    std::fs::create_dir_all(&data).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("queries/top_clients.sql");
    let mut child = KillOnDrop(
        Command::new("sh")
            .arg("-c")
            .arg(r#"ulimit -n 256 && exec "$0" "$@""#)
            .arg(env!("CARGO_BIN_EXE_brook"))
            .args(["run", "--ui", "--ui-port", "0", "--trigger", "200ms"])
            .args(["--progress", "json"])
            .arg(&script)
            .current_dir(dir.path())
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let lines = stderr_lines(&mut child.0);
    let url = wait_for_line(&lines, "UI address", |l| l.starts_with("brook: web UI at "));
    let addr: SocketAddr = url["brook: web UI at http://".len()..]
        .trim_end_matches('/')
        .parse()
        .unwrap();
    let idle: Vec<TcpStream> = (0..300)
        .map(|i| {
            let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).unwrap();
            if i % 2 == 1 {
                c.write_all(b"GET /api/queries HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                    .unwrap();
            }
            c
        })
        .collect();
    // The server takes what it will of them before the orders arrive.
    std::thread::sleep(Duration::from_secs(1));
    write_orders(&data, "a.csv", "2016-03-22 20:00:00", 50, 4);
    let mut lines_read = 0;
    wait_for_line(&lines, "batch reading the 50 new lines", |l| {
        assert!(!l.contains("Too many open files"), "{l}");
        if let Ok(p) = serde_json::from_str::<Value>(l) {
            lines_read +=
                p["num_input_rows"].as_u64().unwrap() + p["num_malformed_rows"].as_u64().unwrap();
        }
        lines_read == 50
    });
    drop(idle);
    unsafe { libc::kill(child.0.id() as i32, libc::SIGINT) };
    assert!(child.0.wait().unwrap().success());
}

/// `--ui-bind 127.0.0.2`: the pages arrive with the address they were served
/// from as their Host and Origin, and every loopback name is this machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_loopback_address_serves_its_own_pages() {
    let engine = Arc::new(Engine::new());
    let ui = UiServer::start(
        engine,
        UiOptions {
            bind: "127.0.0.2".parse().unwrap(),
            port: 0,
            ..UiOptions::default()
        },
    )
    .await
    .unwrap();
    assert!(ui.url().starts_with("http://127.0.0.2:"), "{}", ui.url());
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let url = format!("{}api/queries", ui.url());
    let port = ui.addr().port();
    let own = format!("http://127.0.0.2:{port}");
    let page = http.get(&url).header("origin", &own).send().await.unwrap();
    assert_eq!(json(page).await, (200, serde_json::json!([])));
    for host in [
        format!("localhost:{port}"),
        format!("127.0.0.1:{port}"),
        format!("127.255.0.9:{port}"),
        format!("[::1]:{port}"),
        "127.0.0.2".to_string(),
    ] {
        let response = http.get(&url).header("host", &host).send().await.unwrap();
        assert_eq!(response.status(), 200, "{host}");
    }
    for host in [
        format!("127.0.0.2.evil.example:{port}"),
        format!("10.0.0.1:{port}"),
        format!("[::]:{port}"),
    ] {
        let response = http.get(&url).header("host", &host).send().await.unwrap();
        assert_error(json(response).await, 403, "own pages");
    }
}

/// The pages load only their own scripts and styles, and nothing is taken for
/// another type than the one it is sent as, whatever the route or its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_response_carries_a_content_security_policy_and_nosniff() {
    let open = setup(None).await;
    let guarded = setup(Some("s3cret")).await;
    let mut responses = vec![];
    for path in [
        "/",
        "/monitor",
        "/assets/uPlot.js",
        "/assets/brook.css",
        "/assets/nope.js",
        "/api/queries",
        "/api/tables/nope",
        "/no/such/page",
    ] {
        responses.push(open.http.get(open.url(path)).send().await.unwrap());
    }
    let foreign = open
        .http
        .get(open.url("/api/queries"))
        .header("host", "evil.example");
    responses.push(foreign.send().await.unwrap());
    let wrong_method = open.http.post(open.url("/api/queries"));
    responses.push(wrong_method.send().await.unwrap());
    responses.push(
        guarded
            .http
            .get(guarded.url("/api/queries"))
            .send()
            .await
            .unwrap(),
    );
    responses.push(guarded.http.get(guarded.url("/")).send().await.unwrap());
    let statuses: Vec<u16> = responses.iter().map(|r| r.status().as_u16()).collect();
    assert_eq!(
        statuses,
        [200, 200, 200, 200, 404, 200, 404, 404, 403, 405, 401, 200]
    );
    for r in &responses {
        let csp = r.headers()["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("default-src 'none'"), "{}: {csp}", r.url());
        assert!(csp.contains("script-src 'self';"), "{}: {csp}", r.url());
        assert!(csp.contains("style-src 'self';"), "{}: {csp}", r.url());
        assert!(csp.contains("connect-src 'self';"), "{}: {csp}", r.url());
        assert_eq!(
            r.headers()["x-content-type-options"],
            "nosniff",
            "{}",
            r.url()
        );
    }
    // What the policy forbids, the pages must not need: no inline script or style.
    for page in [
        include_str!("../src/ui/assets/dashboard.html"),
        include_str!("../src/ui/assets/monitor.html"),
    ] {
        assert!(!page.contains("<style") && !page.contains("style="));
        for script in page.split("<script").skip(1) {
            assert!(script.starts_with(" src=\"/assets/"), "{script}");
        }
        let handler = page.split(" on").skip(1).find(|rest| {
            rest.trim_start_matches(|c: char| c.is_ascii_lowercase())
                .starts_with('=')
        });
        assert_eq!(handler, None, "an inline event handler");
    }
}

/// `--ui-token-file`: the token stays out of `ps`, and a file that cannot give
/// one is named in the error.
#[test]
fn the_token_can_come_from_a_file() {
    use std::process::{Command, Stdio};

    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("data/orders")).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("queries/top_clients.sql");
    let brook = |token_file: &str| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_brook"));
        c.args([
            "run",
            "--ui",
            "--ui-port",
            "0",
            "--trigger",
            "available-now",
        ])
        .args(["--ui-token-file", token_file])
        .arg(&script)
        .current_dir(dir.path())
        .env_remove("BROOK_UI_TOKEN")
        .env("RUST_LOG", "error")
        .stdout(Stdio::null());
        c
    };
    let missing = brook("missing-token").output().unwrap();
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(!missing.status.success());
    assert!(stderr.contains("missing-token"), "{stderr}");
    std::fs::write(dir.path().join("empty-token"), "\n").unwrap();
    let empty = brook("empty-token").output().unwrap();
    let stderr = String::from_utf8_lossy(&empty.stderr);
    assert!(!empty.status.success());
    assert!(
        stderr.contains("empty-token") && stderr.contains("empty"),
        "{stderr}"
    );

    std::fs::write(dir.path().join("token"), "s3cret\n").unwrap();
    let mut child = KillOnDrop(brook("token").stderr(Stdio::piped()).spawn().unwrap());
    let lines = stderr_lines(&mut child.0);
    let url = wait_for_line(&lines, "UI address", |l| l.starts_with("brook: web UI at "));
    let url = url.strip_prefix("brook: web UI at ").unwrap();
    assert!(url.ends_with("/?token=s3cret"), "{url}");
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", child.0.id())).unwrap();
    assert!(!String::from_utf8_lossy(&cmdline).contains("s3cret"));
    let api = url.replace("?token=s3cret", "api/queries");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        assert_error(
            json(http.get(&api).send().await.unwrap()).await,
            401,
            "token",
        );
        let with_token = http.get(&api).bearer_auth("s3cret").send().await.unwrap();
        assert_eq!(with_token.status(), 200);
    });

    let help = Command::new(env!("CARGO_BIN_EXE_brook"))
        .args(["run", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("--ui-token-file"), "{help}");
    assert!(help.contains("`ps`"), "{help}");
}

/// Opens a connection to `addr` that sends `sent` and then waits.
async fn connect(addr: std::net::SocketAddr, sent: &[u8]) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    c.write_all(sent).await.unwrap();
    c
}

/// Everything the server sends on `c` until it closes it, within 30 s.
async fn until_closed(c: &mut tokio::net::TcpStream, what: &str) -> String {
    use tokio::io::AsyncReadExt;
    let mut received = vec![];
    let closed = tokio::time::timeout(Duration::from_secs(30), c.read_to_end(&mut received));
    match closed.await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{what}"),
        Err(_) => panic!("the server kept {what} open"),
    }
    String::from_utf8_lossy(&received).into_owned()
}

/// Connections that send nothing, half a request's headers, or nothing more
/// after a response: the server closes each after its header timeout, serves
/// no more than its bound at once, and answers a new client once they are
/// gone, while the queries read on; an event stream, busy answering, stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_half_sent_connections_are_bounded_and_time_out() {
    let s = setup_with(UiOptions {
        max_connections: Some(4),
        header_timeout: Duration::from_secs(1),
        ..UiOptions::default()
    })
    .await;
    let addr = s.ui.addr();
    let mut events = s.http.get(s.url("/api/events")).send().await.unwrap();
    let mut idle = vec![];
    for i in 0..12 {
        let sent: &[u8] = match i % 3 {
            0 => b"",
            1 => b"GET /api/queries HTTP/1.1\r\nHost: 127.0.0.1\r\n",
            _ => b"GET /api/tables HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        };
        idle.push((i, connect(addr, sent).await));
    }
    write_orders(&s.input, "b.csv", "2016-03-22 20:01:00", 500, 2);
    for q in &s.queries {
        q.process_all_available().await.unwrap();
    }
    let read: u64 = s.queries[1]
        .recent_progress()
        .iter()
        .map(|p| p.num_input_rows + p.num_malformed_rows)
        .sum();
    assert_eq!(read, LINES + 500);
    let fresh = tokio::time::timeout(Duration::from_secs(30), s.get("/api/tables"));
    let (status, tables) = fresh.await.expect("no answer to a new client within 30 s");
    assert_eq!(status, 200);
    assert_eq!(tables[1]["num_rows"], 5);
    for (i, c) in &mut idle {
        let received = until_closed(c, &format!("connection {i}")).await;
        match *i % 3 {
            2 => assert!(received.starts_with("HTTP/1.1 200 OK"), "{received}"),
            _ => assert!(!received.contains("200 OK"), "{received}"),
        }
    }
    write_orders(&s.input, "c.csv", "2016-03-22 20:02:00", 500, 3);
    let mut text = String::new();
    while !text.contains("c.csv") {
        text.push_str(&next_events(&mut events).await);
    }
}

/// A request refused for its token or its origin ends its connection: a client
/// without the token holds no connection once answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_requests_end_their_connection() {
    let guarded = setup_with(UiOptions {
        token: Some("s3cret".into()),
        header_timeout: Duration::from_secs(600),
        ..UiOptions::default()
    })
    .await;
    let open = setup_with(UiOptions {
        header_timeout: Duration::from_secs(600),
        ..UiOptions::default()
    })
    .await;
    let request = b"GET /api/queries HTTP/1.1\r\nHost: evil.example\r\n\r\n";
    for (s, status) in [(&guarded, "401"), (&open, "403")] {
        let mut c = connect(s.ui.addr(), request).await;
        let received = until_closed(&mut c, "a refused request's connection").await;
        assert!(
            received.starts_with(&format!("HTTP/1.1 {status}")),
            "{received}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dstream_program_is_listed_with_its_progress_and_events() {
    use brook::dstream::StreamingContext;
    let engine = Arc::new(Engine::new());
    let ssc = StreamingContext::new(engine.context(), Duration::from_millis(100));
    ssc.set_name("words");
    let lines = ssc.queue_stream(
        vec![vec!["a b".to_string(), "c".into()], vec!["d".to_string()]],
        true,
    );
    lines
        .flat_map(|l| l.split(' ').map(str::to_string).collect::<Vec<_>>())
        .print(5);
    ssc.monitor_in(&engine).unwrap();
    let ui = UiServer::start(
        engine.clone(),
        UiOptions {
            port: 0,
            ..UiOptions::default()
        },
    )
    .await
    .unwrap();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let get = |path: &str| http.get(format!("http://{}{path}", ui.addr())).send();
    let mut events = get("/api/events").await.unwrap();
    ssc.start().unwrap();
    ssc.await_batches(3).await.unwrap();

    let (status, list) = json(get("/api/queries").await.unwrap()).await;
    assert_eq!(status, 200);
    let program = &list[0];
    assert_eq!(program["name"], "words", "{list}");
    assert_eq!(program["id"], ssc.id().as_str());
    assert_eq!(program["active"], true);
    assert_eq!(program["source"], "queue");
    assert_eq!(program["trigger"], "processing-time 100ms");
    assert_eq!(
        program["sql"],
        "a DStream program: 1 input stream, 1 output operation, 0 stateful operators"
    );

    let (status, progress) = json(get("/api/queries/words/progress").await.unwrap()).await;
    assert_eq!(status, 200);
    let records = progress.as_array().unwrap();
    let rows: Vec<(u64, u64, u64)> = records
        .iter()
        .take(3)
        .map(|p| {
            (
                p["batch_id"].as_u64().unwrap(),
                p["num_input_rows"].as_u64().unwrap(),
                p["sink"]["num_output_rows"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(rows, [(0, 2, 3), (1, 1, 1), (2, 0, 0)]);

    // The monitor page follows the event stream, which carries its batches.
    let mut text = String::new();
    while !text.contains("\"name\":\"words\"") {
        text.push_str(&next_events(&mut events).await);
    }
    assert!(text.contains("event: progress"), "{text}");

    let (status, stopped) = json(
        http.post(format!("http://{}/api/queries/words/stop", ui.addr()))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(stopped["active"], false);
    ssc.await_termination().await.unwrap();
}
