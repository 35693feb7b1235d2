//! The three dashboard queries of `queries/` on generated orders, checked against
//! the same answers computed in plain Rust over the same lines.

use std::collections::{BTreeMap, HashMap};

use brook::Engine;
use brook::cli::demo::{QUERIES, demo_sql};
use brook::datafusion::arrow::array::{Array, AsArray, RecordBatch};
use brook::datafusion::arrow::compute::cast;
use brook::datafusion::arrow::datatypes::{DataType, Float64Type, Int64Type};
use brook::orders::{GeneratorConfig, OrderGenerator, TIME_FORMAT};
use brook::source::write_atomically;
use chrono::{NaiveDateTime, TimeDelta};

struct Order {
    time: i64,
    client: i64,
    symbol: String,
    amount: i64,
    price: f64,
    buy: bool,
}

/// The book's line format, parsed strictly: anything else is malformed.
fn parse(line: &str) -> Option<Order> {
    let f: Vec<&str> = line.split(',').collect();
    if f.len() != 7 || !(f[6] == "B" || f[6] == "S") {
        return None;
    }
    Some(Order {
        time: NaiveDateTime::parse_from_str(f[0], TIME_FORMAT)
            .ok()?
            .and_utc()
            .timestamp(),
        client: f[2].parse().ok()?,
        symbol: f[3].to_string(),
        amount: f[4].parse().ok()?,
        price: f[5].parse().ok()?,
        buy: f[6] == "B",
    })
}

fn ints(batches: &[RecordBatch], col: &str) -> Vec<i64> {
    column(batches, col, DataType::Int64, |a| {
        a.as_primitive::<Int64Type>()
            .iter()
            .map(|v| v.unwrap_or(-1))
            .collect()
    })
}

fn floats(batches: &[RecordBatch], col: &str) -> Vec<f64> {
    column(batches, col, DataType::Float64, |a| {
        a.as_primitive::<Float64Type>()
            .iter()
            .map(|v| v.unwrap_or(f64::NAN))
            .collect()
    })
}

fn strings(batches: &[RecordBatch], col: &str) -> Vec<String> {
    column(batches, col, DataType::Utf8, |a| {
        a.as_string::<i32>()
            .iter()
            .map(|v| v.unwrap_or("").to_string())
            .collect()
    })
}

/// Timestamps as seconds since the epoch.
fn seconds(batches: &[RecordBatch], col: &str) -> Vec<i64> {
    let t = DataType::Timestamp(brook::datafusion::arrow::datatypes::TimeUnit::Second, None);
    column(batches, col, t, |a| {
        let a = cast(a, &DataType::Int64).unwrap();
        a.as_primitive::<Int64Type>().values().to_vec()
    })
}

fn column<T>(
    batches: &[RecordBatch],
    col: &str,
    t: DataType,
    f: impl Fn(&dyn Array) -> Vec<T>,
) -> Vec<T> {
    batches
        .iter()
        .flat_map(|b| {
            let c = cast(b.column_by_name(col).unwrap(), &t).unwrap();
            f(c.as_ref())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_matches_an_independent_computation() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("orders");
    std::fs::create_dir(&input).unwrap();
    let config = GeneratorConfig {
        clients: 120,
        symbols: 60,
        malformed: 0.01,
        seed: 7,
    };
    let mut generator = OrderGenerator::new(config);
    let start = NaiveDateTime::parse_from_str("2016-03-22 20:25:28", TIME_FORMAT).unwrap();
    // 24,000 orders, 40 per second of event time: ten minutes, in six files.
    let lines: Vec<String> = (0..24_000)
        .map(|i| generator.line(start + TimeDelta::milliseconds(i * 25)))
        .collect();

    let engine = Engine::new();
    let mut queries = vec![];
    let symbols = concat!(env!("CARGO_MANIFEST_DIR"), "/queries/symbols.csv");
    for (name, sql) in QUERIES {
        queries.extend(
            engine
                .execute(&demo_sql(sql, &input.display().to_string(), symbols, name))
                .await
                .unwrap(),
        );
    }
    for (n, chunk) in lines.chunks(4_000).enumerate() {
        write_atomically(
            &input,
            &format!("orders-{n}.csv"),
            (chunk.join("\n") + "\n").as_bytes(),
        )
        .unwrap();
        for q in &queries {
            q.process_all_available().await.unwrap();
        }
    }

    let orders: Vec<Order> = lines.iter().filter_map(|l| parse(l)).collect();
    let malformed = lines.len() - orders.len();
    assert!(
        malformed > 150,
        "the generator should damage about 1% of lines, got {malformed}"
    );
    let counted: u64 = queries[0]
        .recent_progress()
        .iter()
        .map(|p| p.num_malformed_rows)
        .sum();
    assert_eq!(
        counted as usize, malformed,
        "every malformed line is dropped and counted"
    );
    let late: u64 = queries
        .iter()
        .flat_map(|q| q.recent_progress())
        .map(|p| p.num_late_rows)
        .sum();
    assert_eq!(late, 0, "orders arrive in time order, none is late");

    let watermark = orders.iter().map(|o| o.time).max().unwrap() - 5;

    // Buy and sell counts for each second the watermark closed.
    let mut per_second: BTreeMap<i64, (i64, i64)> = BTreeMap::new();
    for o in orders.iter().filter(|o| o.time < watermark) {
        let e = per_second.entry(o.time).or_default();
        if o.buy { e.0 += 1 } else { e.1 += 1 }
    }
    let got = engine
        .sql("SELECT second, buys, sells FROM buy_sell_per_second ORDER BY second")
        .await
        .unwrap();
    let got: Vec<(i64, i64, i64)> = seconds(&got, "second")
        .into_iter()
        .zip(ints(&got, "buys"))
        .zip(ints(&got, "sells"))
        .map(|((s, b), x)| (s, b, x))
        .collect();
    let want: Vec<(i64, i64, i64)> = per_second.iter().map(|(s, (b, x))| (*s, *b, *x)).collect();
    assert_eq!(got.len(), want.len());
    assert_eq!(got, want);

    // Top 5 clients by traded amount over all orders.
    let mut traded: HashMap<i64, f64> = HashMap::new();
    for o in &orders {
        *traded.entry(o.client).or_default() += o.amount as f64 * o.price;
    }
    let mut ranking: Vec<(i64, f64)> = traded.into_iter().collect();
    ranking.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let got = engine
        .sql("SELECT client_id, traded FROM top_clients ORDER BY traded DESC")
        .await
        .unwrap();
    assert_eq!(
        ints(&got, "client_id"),
        ranking[..5].iter().map(|r| r.0).collect::<Vec<_>>()
    );
    for (g, w) in floats(&got, "traded").iter().zip(&ranking[..5]) {
        assert!((g - w.1).abs() < 1e-6 * w.1, "traded {g} vs {}", w.1);
    }

    // Top 5 stocks by shares in every closed one-hour window sliding by 10 s.
    let mut windows: BTreeMap<i64, HashMap<&str, i64>> = BTreeMap::new();
    for o in &orders {
        let mut end = o.time - o.time.rem_euclid(10) + 10;
        while end - 3600 <= o.time {
            if end <= watermark {
                *windows
                    .entry(end)
                    .or_default()
                    .entry(&o.symbol)
                    .or_default() += o.amount;
            }
            end += 10;
        }
    }
    let mut want = vec![];
    for (end, shares) in &windows {
        let mut top: Vec<(&str, i64)> = shares.iter().map(|(s, n)| (*s, *n)).collect();
        top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        for (rank, (symbol, n)) in top.iter().take(5).enumerate() {
            want.push((*end, symbol.to_string(), *n, rank as i64 + 1));
        }
    }
    let got = engine
        .sql("SELECT * FROM top_stocks ORDER BY window_end, rank")
        .await
        .unwrap();
    let got: Vec<(i64, String, i64, i64)> = seconds(&got, "window_end")
        .into_iter()
        .zip(strings(&got, "symbol"))
        .zip(ints(&got, "shares"))
        .zip(ints(&got, "rank"))
        .map(|(((e, s), n), r)| (e, s, n, r))
        .collect();
    assert!(
        want.len() > 250,
        "ten minutes close many windows: {}",
        want.len()
    );
    assert_eq!(got.len(), want.len());
    assert_eq!(got, want);

    for q in &queries {
        q.stop().await.unwrap();
    }
}
