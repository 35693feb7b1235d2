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
    let stream = example::dashboard(
        &ssc.text_file_stream(input.to_str().unwrap()).unwrap(),
        interval,
        dropped.clone(),
    );
    let batches: Arc<Mutex<Vec<Lines>>> = Arc::default();
    let sink = batches.clone();
    stream.foreach_rdd(move |rows, _| {
        if rows
            .iter()
            .any(|(metric, _)| metric == "BUYS" || metric == "SELLS")
        {
            sink.lock().unwrap().push(rows.to_vec());
        }
        Ok(())
    });
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
