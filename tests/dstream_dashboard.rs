//! The chapter-6 DStream program (examples/dstream_dashboard.rs) and the SQL
//! dashboard on the same files, one file per batch: they agree batch by batch.

mod common;

#[path = "../examples/dstream_dashboard.rs"]
#[allow(dead_code)]
mod example;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use brook::Engine;
use brook::dstream::StreamingContext;
use brook::orders::{GeneratorConfig, OrderGenerator, TIME_FORMAT};
use chrono::{NaiveDateTime, TimeDelta};
use common::{put, table};

const FILES: usize = 5;

fn files() -> Vec<Vec<String>> {
    let mut generator = OrderGenerator::new(GeneratorConfig {
        clients: 80,
        symbols: 30,
        malformed: 0.02,
        seed: 6,
    });
    let start = NaiveDateTime::parse_from_str("2016-03-22 20:25:28", TIME_FORMAT).unwrap();
    (0..FILES as i64)
        .map(|f| {
            (0..400)
                .map(|i| generator.line(start + TimeDelta::milliseconds((f * 400 + i) * 250)))
                .collect()
        })
        .collect()
}

type Lines = Vec<(String, Vec<String>)>;

/// The SQL side's cumulative results after each file.
struct Sql {
    buys: i64,
    sells: i64,
    top_clients: Vec<String>,
    top_stocks: Vec<String>,
}

async fn sql_results(engine: &Engine) -> Sql {
    let sides = table(&engine.sql("SELECT * FROM sides").await.unwrap());
    let side = |s: &str| {
        sides
            .iter()
            .find(|r| r[0] == s)
            .map_or(0, |r| r[1].parse().unwrap())
    };
    Sql {
        buys: side("B"),
        sells: side("S"),
        top_clients: first_column(engine, "top_clients").await,
        top_stocks: first_column(engine, "top_stocks").await,
    }
}

async fn first_column(engine: &Engine, name: &str) -> Vec<String> {
    table(&engine.sql(&format!("SELECT * FROM {name}")).await.unwrap())
        .into_iter()
        .map(|r| r[0].clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dstream_dashboard_agrees_with_the_sql_dashboard_batch_by_batch() {
    let (_tmp, input) = common::tmp_source();
    let interval = Duration::from_millis(200);

    let ssc = StreamingContext::new(&brook::datafusion::prelude::SessionContext::new(), interval);
    let dropped = Arc::new(AtomicU64::new(0));
    let lines = ssc.text_file_stream(input.to_str().unwrap()).unwrap();
    let with_orders = |stream: &brook::dstream::DStream<(String, Vec<String>)>| {
        let batches: Arc<Mutex<Vec<Lines>>> = Arc::default();
        let sink = batches.clone();
        stream.foreach_rdd(move |rows, _| {
            if rows.iter().any(|(m, _)| m == "BUYS" || m == "SELLS") {
                sink.lock().unwrap().push(rows.to_vec());
            }
            Ok(())
        });
        batches
    };
    let batches = with_orders(&example::dashboard(
        &lines,
        interval,
        example::Totals::UpdateStateByKey,
        dropped.clone(),
    ));
    // The mapWithState version, on the same lines, gives the same batches.
    let other = with_orders(&example::dashboard(
        &lines,
        interval,
        example::Totals::MapWithState,
        Arc::default(),
    ));
    ssc.start().unwrap();

    let engine = Engine::new();
    let queries = engine
        .execute(&format!(
            "CREATE UNBOUNDED EXTERNAL TABLE orders (time TIMESTAMP NOT NULL, order_id BIGINT NOT NULL,
               client_id BIGINT NOT NULL, symbol VARCHAR NOT NULL, amount INT NOT NULL,
               price DOUBLE NOT NULL, buy_sell VARCHAR NOT NULL)
             STORED AS CSV LOCATION '{}' OPTIONS ('mode' 'DROPMALFORMED', 'maxFilesPerTrigger' '1');
             CREATE EXTERNAL TABLE sides STORED AS MEMORY LOCATION '' OPTIONS ('outputMode' 'complete');
             INSERT INTO sides SELECT buy_sell, count(*) AS n FROM orders GROUP BY buy_sell;
             CREATE EXTERNAL TABLE top_clients STORED AS MEMORY LOCATION '';
             INSERT INTO top_clients SELECT client_id, sum(amount * price) AS traded FROM orders
               GROUP BY client_id ORDER BY traded DESC, client_id LIMIT 5;
             CREATE EXTERNAL TABLE top_stocks STORED AS MEMORY LOCATION '';
             INSERT INTO top_stocks SELECT symbol, sum(amount) AS shares FROM orders
               GROUP BY symbol ORDER BY shares DESC, symbol LIMIT 5;",
            input.display()
        ))
        .await
        .unwrap();

    let (mut buys, mut sells) = (0, 0);
    for (i, lines) in files().iter().enumerate() {
        put(&input, &format!("{i}.csv"), lines);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while batches.lock().unwrap().len() <= i {
            assert!(
                std::time::Instant::now() < deadline,
                "no batch for file {i}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for q in &queries {
            q.process_all_available().await.unwrap();
        }
        let sql = sql_results(&engine).await;
        let batch = batches.lock().unwrap()[i].clone();
        let metric = |name: &str| -> Vec<String> {
            batch
                .iter()
                .find(|(m, _)| m == name)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        let count = |name: &str| -> i64 { metric(name).first().map_or(0, |n| n.parse().unwrap()) };
        assert_eq!(count("BUYS"), sql.buys - buys, "buys in batch {i}");
        assert_eq!(count("SELLS"), sql.sells - sells, "sells in batch {i}");
        (buys, sells) = (sql.buys, sql.sells);
        assert_eq!(
            metric("TOP5CLIENTS"),
            sql.top_clients,
            "top clients after batch {i}"
        );
        assert_eq!(
            metric("TOP5STOCKS"),
            sql.top_stocks,
            "top stocks after batch {i}"
        );
        assert_eq!(metric("TOP5CLIENTS").len(), 5);
    }
    ssc.stop(false).await.unwrap();
    assert_eq!(*other.lock().unwrap(), *batches.lock().unwrap());
    let malformed: u64 = queries[0]
        .recent_progress()
        .iter()
        .map(|p| p.num_malformed_rows)
        .sum();
    assert!(malformed > 0);
    assert_eq!(
        dropped.load(Ordering::Relaxed),
        malformed,
        "the same lines dropped"
    );
    assert_eq!(buys + sells + malformed as i64, (FILES * 400) as i64);
}

/// The example's output directories, oldest first: each batch's lines.
fn outputs(prefix: &std::path::Path) -> Vec<Vec<String>> {
    let dir = prefix.parent().unwrap();
    let mut found: Vec<(i64, Vec<String>)> = vec![];
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let Some(time) = name
            .strip_prefix("dash-")
            .and_then(|n| n.strip_suffix(".txt"))
        else {
            continue;
        };
        if let Ok(text) = std::fs::read_to_string(path.join("part-00000")) {
            found.push((
                time.parse().unwrap(),
                text.lines().map(String::from).collect(),
            ));
        }
    }
    found.sort();
    found.into_iter().map(|(_, lines)| lines).collect()
}

/// Waits for the example to write a batch with buys and sells in it; its lines.
fn await_orders_batch(prefix: &std::path::Path, seen: usize) -> Vec<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let with_orders: Vec<Vec<String>> = outputs(prefix)
            .into_iter()
            .filter(|b| b.iter().any(|l| l.starts_with("(BUYS,")))
            .collect();
        if with_orders.len() > seen {
            return with_orders[seen].clone();
        }
        assert!(std::time::Instant::now() < deadline, "no batch with orders");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The example's lines for `orders`: counts of the batch `batch`, top 5s of all.
fn expected(all: &[example::Order], batch: &[example::Order]) -> Vec<String> {
    let top5 = |totals: std::collections::HashMap<String, f64>| -> String {
        let mut v: Vec<(String, f64)> = totals.into_iter().collect();
        v.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap().then(a.0.cmp(&b.0)));
        let names: Vec<String> = v.into_iter().take(5).map(|(k, _)| k).collect();
        names.join(", ")
    };
    let mut clients = std::collections::HashMap::new();
    let mut stocks = std::collections::HashMap::new();
    for o in all {
        *clients.entry(o.client_id.to_string()).or_insert(0.0) += o.amount as f64 * o.price;
        *stocks.entry(o.symbol.clone()).or_insert(0.0) += o.amount as f64;
    }
    let buys = batch.iter().filter(|o| o.buy).count();
    vec![
        format!("(BUYS,List({buys}))"),
        format!("(SELLS,List({}))", batch.len() - buys),
        format!("(TOP5CLIENTS,List({}))", top5(clients)),
        format!("(TOP5STOCKS,List({}))", top5(stocks)),
    ]
}

/// The example run in a process of its own, which the kill tests start: this
/// test binary again, running only `example_process` (`cargo test --test`
/// does not build examples, so their binaries may be missing or stale).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the kill tests' child process, not a test"]
async fn example_process() {
    let args = std::env::var("DASHBOARD_ARGS").unwrap();
    example::run(args.split('\n').map(String::from).collect())
        .await
        .unwrap();
}

/// The batch numbers of a checkpoint directory's files.
fn checkpoint_ids(dir: &std::path::Path) -> impl Iterator<Item = u64> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.unwrap().file_name().to_str()?.parse().ok())
}

#[test]
fn the_dstream_dashboard_keeps_its_state_across_a_kill() {
    kill_and_restart("update-state-by-key");
}

#[test]
fn the_map_with_state_dashboard_keeps_its_state_across_a_kill() {
    kill_and_restart("map-with-state");
}

fn kill_and_restart(totals: &str) {
    let (tmp, input) = common::tmp_source();
    let prefix = tmp.path().join("out").join("dash");
    std::fs::create_dir_all(prefix.parent().unwrap()).unwrap();
    let checkpoint = tmp.path().join("ckpt");
    let start_paused = |pause: &str| {
        let mut args = [&input, &prefix, &checkpoint]
            .map(|p| p.to_str().unwrap().to_string())
            .to_vec();
        args.extend(["300".to_string(), totals.to_string()]);
        std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--ignored", "--exact", "example_process", "--nocapture"])
            .env("DASHBOARD_ARGS", args.join("\n"))
            .env("BROOK_PAUSE_AT", pause)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let start = || start_paused("");
    let data = files();
    let parsed: Vec<Vec<example::Order>> = data
        .iter()
        .map(|f| f.iter().filter_map(|l| example::parse(l)).collect())
        .collect();

    let mut run = start();
    std::thread::sleep(Duration::from_millis(500));
    put(&input, "0.csv", &data[0]);
    let mut first = await_orders_batch(&prefix, 0);
    run.kill().unwrap(); // SIGKILL
    run.wait().unwrap();

    put(&input, "1.csv", &data[1]);
    let mut run = start();
    let mut second = await_orders_batch(&prefix, 1);
    run.kill().unwrap();
    run.wait().unwrap();

    // Killed after batch K's output was written, before K committed: the
    // restarted program runs K again (same files, same time), not twice.
    put(&input, "2.csv", &data[2]);
    let next = checkpoint_ids(&checkpoint.join("offsets")).max().unwrap() + 1;
    let mut run = start_paused(&format!("sink:{next}"));
    let stderr = std::io::BufReader::new(run.stderr.take().unwrap());
    use std::io::BufRead;
    let paused = stderr
        .lines()
        .map_while(Result::ok)
        .any(|l| l.starts_with("brook: paused at"));
    assert!(paused, "never paused at sink:{next}");
    run.kill().unwrap();
    run.wait().unwrap();
    assert!(!checkpoint.join(format!("commits/{next}")).exists());
    let mut run = start();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !checkpoint.join(format!("commits/{next}")).exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "batch {next} never committed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    put(&input, "3.csv", &data[3]);
    let mut fourth = await_orders_batch(&prefix, 3);
    run.kill().unwrap();
    run.wait().unwrap();
    let mut third = await_orders_batch(&prefix, 2);
    assert_eq!(
        outputs(&prefix)
            .iter()
            .filter(|b| b.iter().any(|l| l.starts_with("(BUYS,")))
            .count(),
        4,
        "one output per file: the re-run batch replaced its own"
    );
    third.sort();
    fourth.sort();
    let mut want_third = expected(&parsed[..3].concat(), &parsed[2]);
    want_third.sort();
    let mut want_fourth = expected(&parsed[..4].concat(), &parsed[3]);
    want_fourth.sort();
    assert_eq!(third, want_third, "the batch re-run after the kill");
    assert_eq!(fourth, want_fourth, "totals counted each file once");

    first.sort();
    second.sort();
    let mut want_first = expected(&parsed[0], &parsed[0]);
    want_first.sort();
    let both: Vec<example::Order> = parsed[..2].concat();
    let mut want_second = expected(&both, &parsed[1]);
    want_second.sort();
    let mut forgetful = expected(&parsed[1], &parsed[1]);
    forgetful.sort();
    assert_ne!(
        want_second, forgetful,
        "the data tells state kept from state lost"
    );
    assert_eq!(first, want_first);
    assert_eq!(
        second, want_second,
        "after the kill: this batch's counts, the totals of both files"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_ui_the_dashboard_shows_its_batches_in_the_monitor() {
    let (tmp, input) = common::tmp_source();
    let prefix = tmp.path().join("out").join("dash");
    std::fs::create_dir_all(prefix.parent().unwrap()).unwrap();
    let args = [&input, &prefix, &tmp.path().join("ckpt")]
        .map(|p| p.to_str().unwrap().to_string())
        .into_iter()
        .chain(["300".to_string(), "--ui".to_string()]);
    let mut run = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "example_process", "--nocapture"])
        .env("DASHBOARD_ARGS", args.collect::<Vec<_>>().join("\n"))
        .env_remove("BROOK_UI_TOKEN")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Read to its end: a child whose standard error is closed fails writing to it.
    let stderr = std::io::BufReader::new(run.stderr.take().unwrap());
    let (tx, announced) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in stderr.lines().map_while(Result::ok) {
            if let Some(url) = line.strip_prefix("brook: web UI at ") {
                let _ = tx.send(url.to_string());
            }
        }
    });
    let url = announced.recv_timeout(Duration::from_secs(60)).ok();
    let Some(url) = url else {
        run.kill().unwrap();
        panic!("the example announced no web UI");
    };
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let get = |path: &str| {
        let http = http.clone();
        let url = format!("{url}{path}");
        async move {
            let reply = http.get(url).send().await.unwrap();
            let status = reply.status().as_u16();
            let text = reply.text().await.unwrap();
            (
                status,
                serde_json::from_str::<serde_json::Value>(&text).unwrap(),
            )
        }
    };
    // Files present when the program starts are not read: the file comes
    // after its first batch.
    let lines = &files()[0];
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let read = loop {
        let (status, progress) = get("api/queries/dstream_dashboard/progress").await;
        assert_eq!(status, 200, "{progress}");
        let records = progress.as_array().unwrap();
        if !records.is_empty() && !input.join("0.csv").exists() {
            put(&input, "0.csv", lines);
        }
        let read = records.iter().find(|p| p["num_input_rows"] != 0).cloned();
        if let Some(read) = read {
            break read;
        }
        if std::time::Instant::now() > deadline {
            run.kill().unwrap();
            panic!("no batch read the file in {} batches", records.len());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (_, list) = get("api/queries").await;
    run.kill().unwrap();
    run.wait().unwrap();
    assert_eq!(
        read["num_input_rows"],
        lines.len(),
        "every line of the file"
    );
    assert!(
        read["sources"][0]["offset"].to_string().contains("0.csv"),
        "{read}"
    );
    assert_eq!(list[0]["name"], "dstream_dashboard");
    assert_eq!(list[0]["id"], read["id"]);
    assert_eq!(list[0]["active"], true);
}
