//! The Kafka source against a real broker (tansu, started here on a free port).

mod common;
use common::broker::Broker;
use common::*;

use brook::Engine;
use brook::orders::{GeneratorConfig, OrderGenerator, TIME_FORMAT};
use chrono::{NaiveDateTime, TimeDelta};

fn orders(count: i64) -> Vec<String> {
    generated(count, 0.01)
}

/// `count` order lines, a `malformed` share of them malformed.
fn generated(count: i64, malformed: f64) -> Vec<String> {
    let mut generator = OrderGenerator::new(GeneratorConfig {
        clients: 120,
        symbols: 60,
        malformed,
        seed: 11,
    });
    let start = NaiveDateTime::parse_from_str("2016-03-22 20:25:28", TIME_FORMAT).unwrap();
    (0..count)
        .map(|i| generator.line(start + TimeDelta::milliseconds(i * 100)))
        .collect()
}

/// The dashboard's results in `engine`'s memory tables, sorted.
async fn dashboard(engine: &Engine) -> Vec<Vec<Vec<String>>> {
    let mut out = vec![];
    for name in ["buy_sell_per_second", "top_clients", "top_stocks"] {
        let rows = engine.sql(&format!("SELECT * FROM {name}")).await.unwrap();
        out.push(sorted(table(&rows)));
    }
    out
}

/// Runs a dashboard script to the end of its input (available-now) into memory tables.
async fn run_dashboard(sql: &str) -> (Engine, u64) {
    let engine = Engine::with_overrides(brook::Overrides {
        trigger: Some(brook::Trigger::AvailableNow),
        ..Default::default()
    });
    let sql = sql.replace(
        "STORED AS CONSOLE LOCATION 'stdout'",
        "STORED AS MEMORY LOCATION ''",
    );
    let queries = engine.execute(&sql).await.unwrap();
    assert_eq!(queries.len(), 3);
    for q in &queries {
        q.await_termination().await.unwrap();
    }
    let malformed = queries[0]
        .recent_progress()
        .iter()
        .map(|p| p.num_malformed_rows)
        .sum();
    (engine, malformed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_from_a_four_partition_topic_equals_the_dashboard_from_files() {
    let broker = Broker::start();
    broker.create_topic("orders", 4).await;
    let lines = orders(6_000);
    broker.produce("orders", 4, &lines);

    let kafka_sql = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/queries/dashboard_kafka.sql"
    ))
    .unwrap()
    .replace(
        "LOCATION '127.0.0.1:9092'",
        &format!("LOCATION '{}'", broker.servers()),
    );
    let (from_kafka, kafka_malformed) = run_dashboard(&kafka_sql).await;

    let (tmp, input) = tmp_source();
    put(&input, "orders.csv", &lines);
    let file_sql = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/queries/dashboard.sql"
    ))
    .unwrap()
    .replace(
        "LOCATION 'data/orders'",
        &format!("LOCATION '{}'", input.display()),
    );
    let (from_files, file_malformed) = run_dashboard(&file_sql).await;
    drop(tmp);

    assert!(file_malformed > 30, "{file_malformed}");
    assert_eq!(kafka_malformed, file_malformed);
    let (k, f) = (dashboard(&from_kafka).await, dashboard(&from_files).await);
    assert!(k[0].len() > 500 && k[1].len() == 5 && k[2].len() > 100);
    assert_eq!(k[0], f[0], "buy_sell_per_second");
    assert_eq!(k[2], f[2], "top_stocks");
    // Sums of doubles differ in the last digits with the order rows are added in.
    let clients = |t: &[Vec<String>]| -> Vec<(String, f64)> {
        t.iter()
            .map(|r| (r[0].clone(), r[1].parse().unwrap()))
            .collect()
    };
    for ((kc, kv), (fc, fv)) in clients(&k[1]).into_iter().zip(clients(&f[1])) {
        assert_eq!(kc, fc, "top_clients");
        assert!(
            (kv - fv).abs() <= 1e-9 * fv.abs(),
            "client {kc}: {kv} vs {fv}"
        );
    }
}

/// A raw Kafka table: each record's partition and offset, into a JSON file sink.
fn offsets_sql(servers: &str, topic: &str, output: &std::path::Path, extra: &str) -> String {
    format!(
        "CREATE UNBOUNDED EXTERNAL TABLE records STORED AS KAFKA LOCATION '{servers}'
           OPTIONS ('subscribe' '{topic}' {extra});
         CREATE EXTERNAL TABLE out STORED AS JSON LOCATION '{}' OPTIONS ('queryName' 'offsets');
         INSERT INTO out SELECT \"partition\", \"offset\", CAST(value AS VARCHAR) AS v FROM records;",
        output.display()
    )
}

fn json_rows(output: &std::path::Path) -> Vec<(i64, i64, String)> {
    let mut rows = vec![];
    for entry in std::fs::read_dir(output).unwrap() {
        let path = entry.unwrap().path();
        if !path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("part-")
        {
            continue;
        }
        for line in std::fs::read_to_string(&path).unwrap().lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            rows.push((
                v["partition"].as_i64().unwrap(),
                v["offset"].as_i64().unwrap(),
                v["v"].as_str().unwrap().to_string(),
            ));
        }
    }
    rows.sort();
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_from_a_checkpoint_read_every_record_once_and_batches_are_bounded() {
    let broker = Broker::start();
    broker.create_topic("events", 3).await;
    let values: Vec<String> = (0..3_000).map(|i| format!("event {i}")).collect();
    broker.produce("events", 3, &values[..2_000]);
    let (tmp, _) = tmp_source();
    let output = tmp.path().join("out");
    let checkpoint = tmp.path().join("checkpoint");
    let sql = offsets_sql(
        &broker.servers(),
        "events",
        &output,
        ", 'maxOffsetsPerTrigger' '700'",
    );
    let run = |trigger: brook::Trigger| {
        let sql = sql.clone();
        let checkpoint = checkpoint.display().to_string();
        async move {
            let engine = Engine::with_overrides(brook::Overrides {
                trigger: Some(trigger),
                checkpoint_root: Some(checkpoint),
                ..Default::default()
            });
            let q = engine.execute(&sql).await.unwrap().remove(0);
            q.await_termination().await.unwrap();
            q.recent_progress()
                .iter()
                .map(|p| (p.batch_id, p.num_input_rows))
                .collect::<Vec<_>>()
        }
    };
    // Each run is a new engine on the same checkpoint: a restart.
    let mut batches = run(brook::Trigger::Once).await;
    batches.extend(run(brook::Trigger::Once).await);
    broker.produce("events", 3, &values[2_000..]);
    batches.extend(run(brook::Trigger::AvailableNow).await);
    let ids: Vec<u64> = batches.iter().map(|b| b.0).collect();
    assert_eq!(ids, (0..ids.len() as u64).collect::<Vec<_>>());
    assert!(batches.iter().all(|(_, n)| *n <= 700), "{batches:?}");
    assert_eq!(batches.iter().map(|(_, n)| n).sum::<u64>(), 3_000);

    let rows = json_rows(&output);
    assert_eq!(rows.len(), 3_000, "every record exactly once");
    for p in 0..3 {
        // Each partition's offsets, every one once: 0, 1, 2, ... with no gap.
        let offsets: Vec<i64> = rows.iter().filter(|r| r.0 == p).map(|r| r.1).collect();
        assert!(offsets.len() > 900, "partition {p}: {}", offsets.len());
        assert!(
            offsets.iter().enumerate().all(|(i, o)| *o == i as i64),
            "partition {p}"
        );
    }
    let mut seen: Vec<String> = rows.into_iter().map(|r| r.2).collect();
    seen.sort();
    let mut sent = values.clone();
    sent.sort();
    assert_eq!(seen, sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_number_of_readers_reads_every_record_once() {
    let broker = Broker::start();
    broker.create_topic("events", 3).await;
    let values: Vec<String> = (0..900).map(|i| format!("event {i}")).collect();
    broker.produce("events", 3, &values);
    let (tmp, _) = tmp_source();
    // Sent round-robin, one record per producer batch: partition, offset and value.
    let mut expected: Vec<(i64, i64, String)> = (0..900)
        .map(|i| (i % 3, i / 3, values[i as usize].clone()))
        .collect();
    expected.sort();
    // Fewer clients than partitions, as many, and more; and clients given a
    // consumer group of the user's (which brook's reads do not use).
    let group = ", 'kafka.group.id' 'dashboards'";
    for (run, (readers, group)) in [(1, ""), (2, ""), (3, ""), (5, ""), (2, group)]
        .into_iter()
        .enumerate()
    {
        let output = tmp.path().join(format!("out-{run}"));
        // Several batches, so that clients are reused on other shares.
        let extra = format!(", 'readers' '{readers}', 'maxOffsetsPerTrigger' '200'{group}");
        let engine = Engine::with_overrides(brook::Overrides {
            trigger: Some(brook::Trigger::AvailableNow),
            ..Default::default()
        });
        let sql = offsets_sql(&broker.servers(), "events", &output, &extra);
        let q = engine.execute(&sql).await.unwrap().remove(0);
        q.await_termination().await.unwrap();
        assert_eq!(json_rows(&output), expected, "{readers} readers{group}");
    }
    let sql = offsets_sql(&broker.servers(), "events", tmp.path(), ", 'readers' '0'");
    let err = Engine::new().execute(&sql).await.unwrap_err().to_string();
    assert!(
        err.contains("readers") && err.contains("at least 1"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_and_per_partition_starting_offsets() {
    let broker = Broker::start();
    broker.create_topic("events", 2).await;
    let values: Vec<String> = (0..20).map(|i| format!("e{i}")).collect();
    broker.produce("events", 2, &values[..10]);
    let (tmp, _) = tmp_source();

    let latest = tmp.path().join("latest");
    let engine = Engine::new();
    let q = engine
        .execute(&offsets_sql(
            &broker.servers(),
            "events",
            &latest,
            ", 'startingOffsets' 'latest'",
        ))
        .await
        .unwrap()
        .remove(0);
    q.process_all_available().await.unwrap();
    broker.produce("events", 2, &values[10..]);
    q.process_all_available().await.unwrap();
    q.stop().await.unwrap();
    let offsets: Vec<(i64, i64)> = json_rows(&latest).iter().map(|r| (r.0, r.1)).collect();
    assert_eq!(
        offsets,
        [
            (0, 5),
            (0, 6),
            (0, 7),
            (0, 8),
            (0, 9),
            (1, 5),
            (1, 6),
            (1, 7),
            (1, 8),
            (1, 9)
        ]
    );

    let given = tmp.path().join("given");
    let engine = Engine::with_overrides(brook::Overrides {
        trigger: Some(brook::Trigger::AvailableNow),
        ..Default::default()
    });
    let q = engine
        .execute(&offsets_sql(
            &broker.servers(),
            "events",
            &given,
            r#", 'startingOffsets' '{"events":{"0":8,"1":-1}}'"#,
        ))
        .await
        .unwrap()
        .remove(0);
    q.await_termination().await.unwrap();
    let offsets: Vec<(i64, i64)> = json_rows(&given).iter().map(|r| (r.0, r.1)).collect();
    assert_eq!(offsets, [(0, 8), (0, 9)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_that_does_not_exist_is_a_clear_error() {
    let broker = Broker::start();
    let (tmp, _) = tmp_source();
    let engine = Engine::new();
    let q = engine
        .execute(&offsets_sql(
            &broker.servers(),
            "nowhere",
            &tmp.path().join("out"),
            "",
        ))
        .await
        .unwrap()
        .remove(0);
    let err = q.await_termination().await.unwrap_err().to_string();
    assert!(err.contains("topic 'nowhere' does not exist"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brook_send_puts_each_line_of_a_file_on_a_topic() {
    let broker = Broker::start();
    broker.create_topic("orders", 1).await;
    let (tmp, _) = tmp_source();
    let input = tmp.path().join("orders.txt");
    let lines = orders(500);
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let sent = std::process::Command::new(env!("CARGO_BIN_EXE_brook"))
        .args(["send", "--input", input.to_str().unwrap()])
        .args([
            "--kafka",
            &broker.servers(),
            "--topic",
            "orders",
            "--rate",
            "2000",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&sent.stderr);
    assert!(sent.status.success(), "{stderr}");
    assert!(stderr.contains("sent 500 records"), "{stderr}");

    let output = tmp.path().join("out");
    let engine = Engine::with_overrides(brook::Overrides {
        trigger: Some(brook::Trigger::AvailableNow),
        ..Default::default()
    });
    let q = engine
        .execute(&offsets_sql(&broker.servers(), "orders", &output, ""))
        .await
        .unwrap()
        .remove(0);
    q.await_termination().await.unwrap();
    let received: Vec<String> = json_rows(&output).into_iter().map(|r| r.2).collect();
    assert_eq!(received, lines, "in order, one record per line");
}

/// The key and value of every record on `topic`, in offset order (one partition).
async fn read_back(broker: &Broker, topic: &str) -> Vec<(String, String)> {
    let engine = Engine::with_overrides(brook::Overrides {
        trigger: Some(brook::Trigger::AvailableNow),
        ..Default::default()
    });
    let q = engine
        .execute(&format!(
            "CREATE UNBOUNDED EXTERNAL TABLE back STORED AS KAFKA LOCATION '{}'
               OPTIONS ('subscribe' '{topic}');
             CREATE EXTERNAL TABLE seen STORED AS MEMORY LOCATION '';
             INSERT INTO seen SELECT \"offset\", CAST(key AS VARCHAR) AS k,
               CAST(value AS VARCHAR) AS v FROM back;",
            broker.servers()
        ))
        .await
        .unwrap()
        .remove(0);
    q.await_termination().await.unwrap();
    let rows = engine
        .sql("SELECT k, v FROM seen ORDER BY \"offset\"")
        .await
        .unwrap();
    table(&rows)
        .into_iter()
        .map(|r| (r[0].clone(), r[1].clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kafka_sink_publishes_rows_as_json_or_as_key_and_value() {
    let broker = Broker::start();
    broker.create_topic("metrics", 1).await;
    broker.create_topic("symbols", 1).await;
    let (tmp, input) = tmp_source();
    put(
        &input,
        "a.csv",
        &[
            order("20:00:01", 1, "AAPL", 10, 2.0, "B"),
            order("20:00:02", 2, "MSFT", 5, 1.0, "S"),
            order("20:00:03", 3, "AAPL", 1, 4.0, "B"),
        ],
    );
    let script = format!(
        "{} CREATE EXTERNAL TABLE metrics STORED AS KAFKA LOCATION '{servers}'
           OPTIONS ('topic' 'metrics', 'key' 'TOP5CLIENTS', 'outputMode' 'complete', 'trigger' 'available-now');
         INSERT INTO metrics SELECT client_id, sum(amount * price) AS traded FROM orders
           GROUP BY client_id ORDER BY traded DESC, client_id LIMIT 2;
         CREATE EXTERNAL TABLE symbols STORED AS KAFKA LOCATION '{servers}'
           OPTIONS ('topic' 'symbols', 'trigger' 'available-now');
         INSERT INTO symbols SELECT CAST(order_id AS VARCHAR) AS key, symbol AS value FROM orders;",
        source_ddl(&input, false),
        servers = broker.servers()
    );
    let engine = Engine::new();
    for q in engine.execute(&script).await.unwrap() {
        q.await_termination().await.unwrap();
    }
    drop(tmp);
    assert_eq!(
        read_back(&broker, "metrics").await,
        [
            (
                "TOP5CLIENTS".to_string(),
                r#"{"client_id":101,"traded":20.0}"#.to_string()
            ),
            (
                "TOP5CLIENTS".to_string(),
                r#"{"client_id":102,"traded":5.0}"#.to_string()
            ),
        ]
    );
    assert_eq!(
        read_back(&broker, "symbols").await,
        [
            ("1".to_string(), "AAPL".to_string()),
            ("2".to_string(), "MSFT".to_string()),
            ("3".to_string(), "AAPL".to_string()),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_sink_without_a_topic_is_refused() {
    let (_tmp, input) = tmp_source();
    let err = Engine::new()
        .execute(&format!(
            "{} CREATE EXTERNAL TABLE out STORED AS KAFKA LOCATION '127.0.0.1:1';
             INSERT INTO out SELECT symbol FROM orders;",
            source_ddl(&input, false)
        ))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("no topic"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brook_run_publishes_the_dashboard_from_orders_to_metrics() {
    let broker = Broker::start();
    broker.create_topic("orders", 4).await;
    broker.create_topic("metrics", 1).await;
    let lines = orders(3_000);
    broker.produce("orders", 4, &lines);
    let (tmp, _) = tmp_source();
    let sql = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/queries/dashboard_kafka_metrics.sql"
    ))
    .unwrap()
    .replace("'127.0.0.1:9092'", &format!("'{}'", broker.servers()));
    let file = tmp.path().join("dashboard.sql");
    std::fs::write(&file, sql).unwrap();
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_brook"))
        .args(["run", file.to_str().unwrap(), "--trigger", "available-now"])
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );

    let metrics = read_back(&broker, "metrics").await;
    let keyed = |key: &str| -> Vec<serde_json::Value> {
        metrics
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| serde_json::from_str(v).unwrap())
            .collect()
    };
    let top_clients = keyed("TOP5CLIENTS");
    assert_eq!(top_clients.len(), 5, "one complete-mode batch: the top 5");
    assert!(
        top_clients
            .iter()
            .all(|v| v["client_id"].is_i64() && v["traded"].is_f64())
    );
    let seconds = keyed("BUYS_SELLS");
    assert!(seconds.len() > 250, "{}", seconds.len());
    let counted: i64 = seconds
        .iter()
        .map(|v| v["buys"].as_i64().unwrap() + v["sells"].as_i64().unwrap())
        .sum();
    assert!(counted > 2_500 && counted < 3_000, "{counted}");
    let stocks = keyed("TOP5STOCKS");
    assert!(!stocks.is_empty());
    assert!(stocks.iter().all(|v| v["rank"].as_i64().unwrap() <= 5));
    assert_eq!(
        metrics.len(),
        top_clients.len() + seconds.len() + stocks.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_value_is_counted_or_named_by_partition_and_offset() {
    let broker = Broker::start();
    broker.create_topic("orders", 1).await;
    let mut lines = generated(20, 0.0);
    lines[13] = "2016-03-22 20:25:30,14,7,AAPL,many,1.0,B".to_string();
    broker.produce("orders", 1, &lines);
    let source = |mode: &str| {
        format!(
            "CREATE UNBOUNDED EXTERNAL TABLE orders (time TIMESTAMP NOT NULL, order_id BIGINT, \
             client_id BIGINT, symbol VARCHAR, amount INT, price DOUBLE, buy_sell VARCHAR) \
             STORED AS KAFKA LOCATION '{}' OPTIONS ('subscribe' 'orders', 'format' 'csv', \
             'mode' '{mode}');
             CREATE EXTERNAL TABLE ids STORED AS MEMORY LOCATION '' OPTIONS ('trigger' 'available-now');
             INSERT INTO ids SELECT order_id FROM orders;",
            broker.servers()
        )
    };
    let engine = Engine::new();
    let q = engine
        .execute(&source("DROPMALFORMED"))
        .await
        .unwrap()
        .remove(0);
    q.await_termination().await.unwrap();
    let p = q.last_progress().unwrap();
    assert_eq!((p.num_input_rows, p.num_malformed_rows), (19, 1));
    assert_eq!(p.malformed_samples[0].file, "orders-0 offset 13");

    // Two queries share the read, and both fail on the bad record.
    let engine = Engine::new();
    let second = "CREATE EXTERNAL TABLE clients STORED AS MEMORY LOCATION '' \
                  OPTIONS ('trigger' 'available-now');
                  INSERT INTO clients SELECT client_id FROM orders;";
    let queries = engine
        .execute(&format!("{}\n{second}", source("FAILFAST")))
        .await
        .unwrap();
    assert_eq!(queries.len(), 2);
    for q in queries {
        let err = q.await_termination().await.unwrap_err().to_string();
        assert!(
            err.contains("orders-0 offset 13") && err.contains("amount"),
            "{err}"
        );
    }
}

/// Each value is one record: a JSON value written over several lines is read
/// whole, and a bad value (a trailing comma, a stray quote) is named by its
/// own offset, not by a line of the text the values were joined into.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_over_several_lines_or_with_a_stray_quote_keep_their_offsets() {
    let broker = Broker::start();
    broker.create_topic("events", 1).await;
    let values = [
        "{\n  \"id\": 1,\n  \"name\": \"a\"\n}",
        r#"{"id": 2, "name": "b",}"#,
        r#"{"id": 3, "name": "c"}"#,
    ];
    broker.produce("events", 1, &values.map(String::from));
    broker.create_topic("rows", 1).await;
    broker.produce("rows", 1, &["1,\"a".to_string(), "2,b".to_string()]);
    let run = |format: &str, topic: &str| {
        format!(
            "CREATE UNBOUNDED EXTERNAL TABLE t (id BIGINT, name VARCHAR) STORED AS KAFKA \
             LOCATION '{}' OPTIONS ('subscribe' '{topic}', 'format' '{format}', \
             'mode' 'DROPMALFORMED');
             CREATE EXTERNAL TABLE out STORED AS MEMORY LOCATION '' \
             OPTIONS ('trigger' 'available-now');
             INSERT INTO out SELECT id, name FROM t;",
            broker.servers()
        )
    };
    for (format, topic, kept, bad) in [
        (
            "json",
            "events",
            rows(&[&["1", "a"], &["3", "c"]]),
            "events-0 offset 1",
        ),
        ("csv", "rows", rows(&[&["2", "b"]]), "rows-0 offset 0"),
    ] {
        let engine = Engine::new();
        let q = engine.execute(&run(format, topic)).await.unwrap().remove(0);
        q.await_termination().await.unwrap();
        let got = engine.sql("SELECT * FROM out").await.unwrap();
        assert_eq!(sorted(table(&got)), kept, "{format}");
        let p = q.last_progress().unwrap();
        assert_eq!(p.num_malformed_rows, 1, "{format}");
        assert_eq!(p.malformed_samples[0].file, bad, "{format}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pattern_picks_up_new_topics_from_their_start() {
    let broker = Broker::start();
    broker.create_topic("events-a", 1).await;
    broker.create_topic("other", 1).await;
    broker.produce("events-a", 1, &["a0".to_string(), "a1".to_string()]);
    broker.produce("other", 1, &["x".to_string()]);
    let (tmp, _) = tmp_source();
    let output = tmp.path().join("out");
    let engine = Engine::new();
    let q = engine
        .execute(
            &offsets_sql(&broker.servers(), "", &output, "")
                .replace("'subscribe' ''", "'subscribePattern' 'events-.*'"),
        )
        .await
        .unwrap()
        .remove(0);
    q.process_all_available().await.unwrap();
    broker.create_topic("events-b", 1).await;
    broker.produce("events-b", 1, &["b0".to_string()]);
    broker.produce("events-a", 1, &["a2".to_string()]);
    q.process_all_available().await.unwrap();
    q.stop().await.unwrap();
    let mut values: Vec<String> = json_rows(&output).into_iter().map(|r| r.2).collect();
    values.sort();
    assert_eq!(values, ["a0", "a1", "a2", "b0"]);
}

/// Starts the offsets query (`offsets_sql`) on `topic` and runs it through what is there.
async fn start_offsets_query(
    broker: &Broker,
    topic: &str,
    output: &std::path::Path,
    extra: &str,
) -> std::sync::Arc<brook::StreamingQuery> {
    let q = Engine::new()
        .execute(&offsets_sql(&broker.servers(), topic, output, extra))
        .await
        .unwrap()
        .remove(0);
    q.process_all_available().await.unwrap();
    q
}

/// Waits (up to a minute) until the running query has written `n` rows.
async fn await_rows(q: &brook::StreamingQuery, output: &std::path::Path, n: usize) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while json_rows(output).len() < n {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?}",
            json_rows(output)
        );
        assert!(q.is_active(), "{:?}", q.exception());
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// Runs `recreated_topic_process` in a process of its own. librdkafka 2.x
/// sometimes crashes (SIGSEGV in `rd_kafka_metadata_cache_find`, reached from
/// `rd_kafka_metadata_update_op`; confluentinc/librdkafka#5280, open) when a
/// topic it had cached disappears and comes back with a new id, as it does
/// here. That crash would take every Kafka test down with it. So this scenario
/// runs apart and is tried again when librdkafka crashes, and only then. A
/// failed assertion fails at once.
#[test]
fn a_query_waits_for_a_stopped_broker_and_notices_the_topic_was_recreated() {
    use std::os::unix::process::ExitStatusExt;
    for attempt in 1..=3 {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "recreated_topic_process",
                "--nocapture",
            ])
            .output()
            .unwrap();
        if out.status.success() {
            return;
        }
        let crashed = out.status.signal() == Some(libc::SIGSEGV);
        assert!(
            crashed && attempt < 3,
            "attempt {attempt}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("attempt {attempt}: librdkafka crashed (SIGSEGV); trying again");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by a_query_waits_for_a_stopped_broker_and_notices_the_topic_was_recreated"]
async fn recreated_topic_process() {
    let mut broker = Broker::start();
    broker.create_topic("events", 1).await;
    let first: Vec<String> = (0..10).map(|i| format!("first {i}")).collect();
    broker.produce("events", 1, &first);
    let (tmp, _) = tmp_source();
    let output = tmp.path().join("out");
    let q = start_offsets_query(
        &broker,
        "events",
        &output,
        ", 'failOnDataLoss' 'false', 'pollTimeout' '2 minutes'",
    )
    .await;

    // The broker goes away: the query keeps running, waiting for it.
    broker.stop();
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert!(q.is_active(), "{:?}", q.exception());

    // It comes back empty (in-memory storage): the topic is recreated with fewer
    // records than were read, which the query reports and reads from the start.
    broker.restart();
    broker.create_topic("events", 1).await;
    let second: Vec<String> = (0..3).map(|i| format!("second {i}")).collect();
    broker.produce("events", 1, &second);
    await_rows(&q, &output, 13).await;
    q.stop().await.unwrap();
    let mut values: Vec<String> = json_rows(&output).into_iter().map(|r| r.2).collect();
    values.sort();
    let mut expected = [first, second].concat();
    expected.sort();
    assert_eq!(values, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_waits_through_a_broker_restart_and_loses_nothing() {
    let storage = tempfile::tempdir().unwrap();
    let mut broker = Broker::start_persistent(storage.path());
    broker.create_topic("events", 2).await;
    let first: Vec<String> = (0..20).map(|i| format!("first {i}")).collect();
    broker.produce("events", 2, &first);
    let (tmp, _) = tmp_source();
    let output = tmp.path().join("out");
    let q = start_offsets_query(&broker, "events", &output, ", 'pollTimeout' '2 minutes'").await;
    assert_eq!(json_rows(&output).len(), 20);

    broker.stop();
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert!(q.is_active(), "{:?}", q.exception());

    // Back with its data: the query goes on from where it was, failOnDataLoss on.
    broker.restart();
    let second: Vec<String> = (0..10).map(|i| format!("second {i}")).collect();
    broker.produce("events", 2, &second);
    await_rows(&q, &output, 30).await;
    q.stop().await.unwrap();
    let rows = json_rows(&output);
    let mut values: Vec<String> = rows.iter().map(|r| r.2.clone()).collect();
    values.sort();
    let mut expected = [first, second].concat();
    expected.sort();
    assert_eq!(values, expected, "every record once");
    for p in 0..2 {
        let offsets: Vec<i64> = rows.iter().filter(|r| r.0 == p).map(|r| r.1).collect();
        assert_eq!(offsets, (0..15).collect::<Vec<i64>>(), "partition {p}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_are_read_with_include_headers_and_written_by_the_sink() {
    let broker = Broker::start();
    broker.create_topic("in", 1).await;
    broker.create_topic("copy", 1).await;
    broker.produce_with_headers(
        "in",
        1,
        &[("a", &[("trace", "t1"), ("source", "desk 4")]), ("b", &[])],
    );
    let engine = Engine::with_overrides(brook::Overrides {
        trigger: Some(brook::Trigger::AvailableNow),
        ..Default::default()
    });
    let servers = broker.servers();
    for q in engine
        .execute(&format!(
            "CREATE UNBOUNDED EXTERNAL TABLE src STORED AS KAFKA LOCATION '{servers}'
               OPTIONS ('subscribe' 'in', 'includeHeaders' 'true');
             CREATE EXTERNAL TABLE copy STORED AS KAFKA LOCATION '{servers}'
               OPTIONS ('topic' 'copy');
             INSERT INTO copy SELECT key, value, headers FROM src;"
        ))
        .await
        .unwrap()
    {
        q.await_termination().await.unwrap();
    }
    let q = engine
        .execute(&format!(
            "CREATE UNBOUNDED EXTERNAL TABLE back STORED AS KAFKA LOCATION '{servers}'
               OPTIONS ('subscribe' 'copy', 'includeHeaders' 'true');
             CREATE EXTERNAL TABLE seen STORED AS MEMORY LOCATION '';
             INSERT INTO seen SELECT CAST(value AS VARCHAR) AS v,
               array_length(headers) AS n,
               headers[1]['key'] AS k1, CAST(headers[1]['value'] AS VARCHAR) AS v1,
               headers[2]['key'] AS k2, CAST(headers[2]['value'] AS VARCHAR) AS v2
             FROM back;"
        ))
        .await
        .unwrap()
        .remove(0);
    q.await_termination().await.unwrap();
    let seen = engine.sql("SELECT * FROM seen ORDER BY v").await.unwrap();
    assert_eq!(
        table(&seen),
        rows(&[
            &["a", "2", "trace", "t1", "source", "desk 4"],
            &["b", "NULL", "NULL", "NULL", "NULL", "NULL"],
        ])
    );
}

/// Runs `brook run sql --checkpoint ckpt` to the end of its input; with `pause`,
/// SIGKILLs it where `BROOK_PAUSE_AT` stops it instead.
fn run_brook(sql: &std::path::Path, checkpoint: &std::path::Path, pause: Option<&str>) {
    use std::io::BufRead;
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_brook"));
    command
        .args(["run", sql.to_str().unwrap(), "--trigger", "available-now"])
        .args(["--checkpoint", checkpoint.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    if let Some(at) = pause {
        command.env("BROOK_PAUSE_AT", at);
    }
    let mut child = command.spawn().unwrap();
    let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut text = String::new();
    for line in stderr.lines().map_while(Result::ok) {
        if line.starts_with("brook: paused at ") {
            child.kill().unwrap();
            child.wait().unwrap();
            return;
        }
        text.push_str(&line);
        text.push('\n');
    }
    let status = child.wait().unwrap();
    assert!(pause.is_none(), "never paused at {pause:?}: {text}");
    assert!(status.success(), "{text}");
}

/// Order ids the sink published to `topic` after `brook run` was killed once
/// between sending batch 1 and committing it, then restarted.
async fn published_after_a_crash(broker: &Broker, topic: &str) -> Vec<i64> {
    broker.create_topic(topic, 1).await;
    let (tmp, input) = tmp_source();
    for f in 0..3 {
        let lines: Vec<String> = (0..5)
            .map(|i| order("20:00:01", f * 5 + i, "AAPL", 1, 1.0, "B"))
            .collect();
        put(&input, &format!("{f}.csv"), &lines);
    }
    let sql = tmp.path().join("publish.sql");
    std::fs::write(
        &sql,
        format!(
            "{} CREATE EXTERNAL TABLE out STORED AS KAFKA LOCATION '{}'
               OPTIONS ('topic' '{topic}', 'queryName' 'publish');
             INSERT INTO out SELECT CAST(order_id AS VARCHAR) AS value FROM orders;",
            source_ddl(&input, false),
            broker.servers()
        ),
    )
    .unwrap();
    let checkpoint = tmp.path().join("ckpt");
    // Batch 1 is in the topic, not committed in the checkpoint.
    run_brook(&sql, &checkpoint, Some("publish/sink:1"));
    run_brook(&sql, &checkpoint, None);
    let mut ids: Vec<i64> = read_back(broker, topic)
        .await
        .into_iter()
        .map(|(_, v)| v.parse().unwrap())
        .collect();
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_least_once_a_batch_rerun_after_a_crash_is_sent_again() {
    let broker = Broker::start();
    let mut expected: Vec<i64> = (0..15).chain(5..10).collect();
    expected.sort();
    assert_eq!(published_after_a_crash(&broker, "at_least").await, expected);
}

/// tansu 0.6 does not handle EndTxn: exactly once is refused before any batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_on_a_broker_without_transactions_is_refused_at_start() {
    let broker = Broker::start();
    broker.create_topic("exactly", 1).await;
    let (_tmp, input) = tmp_source();
    put(
        &input,
        "a.csv",
        &[order("20:00:01", 1, "AAPL", 1, 1.0, "B")],
    );
    let err = Engine::new()
        .execute(&format!(
            "{} CREATE EXTERNAL TABLE out STORED AS KAFKA LOCATION '{}'
               OPTIONS ('topic' 'exactly', 'deliveryGuarantee' 'exactly-once');
             INSERT INTO out SELECT symbol AS value FROM orders;",
            source_ddl(&input, false),
            broker.servers()
        ))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("exactly-once delivery needs Kafka transactions")
            && err.contains("cannot complete a transaction")
            && err.contains("'at-least-once'"),
        "{err}"
    );
    assert!(read_back(&broker, "exactly").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_that_lost_records_under_a_running_query_is_data_loss() {
    let mut broker = Broker::start();
    broker.create_topic("events", 1).await;
    let first: Vec<String> = (0..10).map(|i| format!("first {i}")).collect();
    broker.produce("events", 1, &first);
    let (tmp, _) = tmp_source();
    let output = tmp.path().join("out");
    let q = start_offsets_query(&broker, "events", &output, "").await;
    broker.restart();
    broker.create_topic("events", 1).await;
    broker.produce("events", 1, &["second 0".to_string()]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while q.is_active() {
        assert!(std::time::Instant::now() < deadline, "still running");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let err = q.exception().unwrap();
    assert!(
        err.contains("data loss") && err.contains("failOnDataLoss"),
        "{err}"
    );
    assert_eq!(
        json_rows(&output).len(),
        10,
        "nothing after the loss is written"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dstream_program_reads_a_topic_with_the_direct_stream() {
    use brook::dstream::StreamingContext;
    use brook::source::kafka::StartingOffsets;
    let broker = Broker::start();
    broker.create_topic("words", 2).await;
    let words: Vec<String> = ["a", "b", "a", "c", "a", "b"].map(String::from).to_vec();
    broker.produce("words", 2, &words);
    let ssc = StreamingContext::new(
        &brook::datafusion::prelude::SessionContext::new(),
        std::time::Duration::from_millis(100),
    );
    let counts = ssc
        .kafka_direct_stream(&broker.servers(), &["words"], StartingOffsets::Earliest)
        .unwrap()
        .map(|(_, value)| (value.clone(), 1_i64))
        .update_state_by_key(|new: &[i64], total: Option<i64>| {
            Some(total.unwrap_or(0) + new.iter().sum::<i64>())
        });
    let seen = std::sync::Arc::new(std::sync::Mutex::new(vec![]));
    let sink = seen.clone();
    counts.foreach_rdd(move |rows, _| {
        *sink.lock().unwrap() = rows.to_vec();
        Ok(())
    });
    ssc.start().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let mut totals = seen.lock().unwrap().clone();
        totals.sort();
        if totals == [("a".to_string(), 3), ("b".into(), 2), ("c".into(), 1)] {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{totals:?}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    ssc.stop(false).await.unwrap();
}

/// Records of two partitions, as (partition, key, value, timestamp in ms):
/// CSV values, one malformed and one over two lines.
const KEYED: &[(i32, Option<&str>, &str, i64)] = &[
    (0, Some("k1"), "1,a", 1_700_000_000_001),
    (1, Some("k2"), "2,b", 1_700_000_000_002),
    (0, None, "3,c", 1_700_000_000_003),
    (1, Some("k4"), "x,bad", 1_700_000_000_004),
    (0, Some("k5"), "5,e\n6,f", 1_700_000_000_005),
    (1, Some("k6"), "7,g", 1_700_000_000_006),
];

/// The rows a table with metadata columns should read from `records`: per
/// line of each value with a numeric id, the id, name, key, partition, offset
/// (the record's place in its partition), timestamp, then `more` of the value.
fn expected_metadata_rows(
    records: &[(i32, Option<&str>, &str, i64)],
    more: impl Fn(&str) -> Vec<String>,
) -> Vec<Vec<String>> {
    let mut next = std::collections::HashMap::new();
    let mut out = vec![];
    for (partition, key, value, ts) in records {
        let offset = next.entry(*partition).or_insert(0);
        for line in value.lines() {
            let (id, name) = line.split_once(',').unwrap();
            if id.parse::<i64>().is_ok() {
                let mut row = vec![
                    id.to_string(),
                    name.to_string(),
                    key.unwrap_or("NULL").to_string(),
                    partition.to_string(),
                    offset.to_string(),
                    ts.to_string(),
                ];
                row.extend(more(value));
                out.push(row);
            }
        }
        *offset += 1;
    }
    sorted(out)
}

/// Runs `script` (a source table `src` and a query into memory table `seen`)
/// to the end of its topics and returns `seen`'s rows, sorted.
async fn read_to_end(script: &str) -> Vec<Vec<String>> {
    let engine = Engine::with_overrides(brook::Overrides {
        trigger: Some(brook::Trigger::AvailableNow),
        ..Default::default()
    });
    for q in engine.execute(script).await.unwrap() {
        q.await_termination().await.unwrap();
    }
    let seen = engine.sql("SELECT * FROM seen").await.unwrap();
    sorted(table(&seen))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_columns_beside_csv_and_json_values_hold_what_was_produced() {
    let broker = Broker::start();
    let servers = broker.servers();
    broker.create_topic("keyed_csv", 2).await;
    broker.produce_records("keyed_csv", KEYED);
    // A malformed value is dropped, a value over two lines is two rows of one record.
    let got = read_to_end(&format!(
        "CREATE UNBOUNDED EXTERNAL TABLE src (id BIGINT, name VARCHAR, _key VARCHAR, \
           _partition INT, _offset BIGINT, _timestamp TIMESTAMP, _topic VARCHAR, \
           _timestampType INT) \
         STORED AS KAFKA LOCATION '{servers}' \
         OPTIONS ('subscribe' 'keyed_csv', 'format' 'csv', 'mode' 'DROPMALFORMED');
         CREATE EXTERNAL TABLE seen STORED AS MEMORY LOCATION '';
         INSERT INTO seen SELECT id, name, _key, _partition, _offset, \
           CAST(_timestamp AS BIGINT) / 1000000, _topic, _timestampType \
         FROM src;"
    ))
    .await;
    // Timestamps the producer set are create times (type 0).
    let expected = expected_metadata_rows(KEYED, |_| vec!["keyed_csv".into(), "0".into()]);
    assert_eq!(got.len(), 6, "{got:?}");
    assert_eq!(got, expected);

    // JSON values, the key as bytes, the headers as Spark's array of structs.
    let clean: Vec<(i32, Option<&str>, &str, i64)> = KEYED
        .iter()
        .filter(|(_, _, v, _)| !v.contains('\n') && !v.starts_with('x'))
        .copied()
        .collect();
    let as_json = |csv: &str| {
        let (id, name) = csv.split_once(',').unwrap();
        format!(r#"{{"id": {id}, "name": "{name}"}}"#)
    };
    let values: Vec<String> = clean.iter().map(|(_, _, v, _)| as_json(v)).collect();
    let json: Vec<(i32, Option<&str>, &str, i64)> = clean
        .iter()
        .zip(&values)
        .map(|((p, k, _, ts), v)| (*p, *k, v.as_str(), *ts))
        .collect();
    broker.create_topic("keyed_json", 2).await;
    broker.produce_records("keyed_json", &json);
    let got = read_to_end(&format!(
        "CREATE UNBOUNDED EXTERNAL TABLE src (_headers STRUCT<key VARCHAR, value BYTEA>[], \
           _key BYTEA, id BIGINT, _offset BIGINT, _timestamp TIMESTAMP, name VARCHAR, \
           _partition INT) \
         STORED AS KAFKA LOCATION '{servers}' \
         OPTIONS ('subscribe' 'keyed_json', 'format' 'json', 'includeHeaders' 'true');
         CREATE EXTERNAL TABLE seen STORED AS MEMORY LOCATION '';
         INSERT INTO seen SELECT id, name, CAST(_key AS VARCHAR), _partition, _offset, \
           CAST(_timestamp AS BIGINT) / 1000000, \
           CAST(_headers[1]['value'] AS VARCHAR) \
         FROM src WHERE _headers[1]['key'] = 'n';"
    ))
    .await;
    let expected = expected_metadata_rows(&clean, |v| vec![as_json(v).len().to_string()]);
    assert_eq!(got.len(), 4, "{got:?}");
    assert_eq!(got, expected);
}
