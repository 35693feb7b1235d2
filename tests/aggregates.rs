//! DataFusion's aggregates on a stream give what DataFusion gives over the same
//! rows at once: random rows with nulls (seeded), several files read one per
//! batch by the CLI, which stops and restarts on its checkpoint midway; and the
//! OHLC candles of `queries/ohlc.sql` against a recount of the orders.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use brook::Engine;
use brook::cli::demo::demo_sql;
use brook::datafusion::arrow::array::{
    Array, ArrayRef, BooleanArray, Float64Array, Int64Array, RecordBatch, StringArray,
    TimestampNanosecondArray,
};
use brook::datafusion::arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use brook::datafusion::arrow::util::display::array_value_to_string;
use brook::datafusion::datasource::MemTable;
use brook::datafusion::prelude::{ParquetReadOptions, SessionContext};
use brook::orders::{GeneratorConfig, OrderGenerator, TIME_FORMAT};
use brook::source::write_atomically;
use chrono::{NaiveDateTime, TimeDelta};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// How a streamed value is compared with the batch one.
#[derive(Clone, Copy)]
enum Cmp {
    Exact,
    /// Floats summed in another order.
    Float,
    /// A t-digest merged from partial digests rather than built at once.
    Loose,
}

const AGGREGATES: &[(&str, Cmp)] = &[
    ("count(*)", Cmp::Exact),
    ("count(x)", Cmp::Exact),
    ("sum(x)", Cmp::Exact),
    ("min(x)", Cmp::Exact),
    ("max(s)", Cmp::Exact),
    ("avg(x)", Cmp::Float),
    ("avg(y)", Cmp::Float),
    ("sum(y)", Cmp::Float),
    ("count(DISTINCT x)", Cmp::Exact),
    ("sum(DISTINCT x)", Cmp::Exact),
    ("first_value(y ORDER BY time)", Cmp::Exact),
    ("last_value(s ORDER BY time)", Cmp::Exact),
    ("first_value(x ORDER BY time DESC)", Cmp::Exact),
    ("approx_distinct(x)", Cmp::Exact),
    ("approx_percentile_cont(y, 0.5)", Cmp::Loose),
    ("stddev(y)", Cmp::Float),
    ("stddev_pop(y)", Cmp::Float),
    ("var_samp(y)", Cmp::Float),
    ("var_pop(y)", Cmp::Float),
    ("corr(x, y)", Cmp::Float),
    ("bool_and(b)", Cmp::Exact),
    ("bool_or(b)", Cmp::Exact),
    ("array_agg(x ORDER BY time)", Cmp::Exact),
    ("string_agg(s, ',' ORDER BY time)", Cmp::Exact),
    ("count(*) FILTER (WHERE b)", Cmp::Exact),
    ("sum(y) FILTER (WHERE x > 5)", Cmp::Float),
    ("max(x) FILTER (WHERE s = 'c')", Cmp::Exact),
    ("median(y)", Cmp::Float),
    (
        "approx_percentile_cont(0.9) WITHIN GROUP (ORDER BY y)",
        Cmp::Loose,
    ),
    ("last_value(y ORDER BY time) IGNORE NULLS", Cmp::Exact),
];

const FILES: usize = 8;
const ROWS_PER_FILE: usize = 60;

struct Row {
    time_ms: i64,
    k: Option<&'static str>,
    x: Option<i64>,
    y: Option<f64>,
    b: Option<bool>,
    s: Option<&'static str>,
}

/// Rows in strictly increasing time (ORDER BY time has no ties), 150 ms apart
/// give or take, none late for a 5 s watermark.
fn random_rows(seed: u64) -> Vec<Row> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let pick = |rng: &mut SmallRng, from: &[&'static str]| from[rng.random_range(0..from.len())];
    (0..FILES * ROWS_PER_FILE)
        .map(|i| {
            let null = |rng: &mut SmallRng| rng.random_bool(0.15);
            Row {
                time_ms: i as i64 * 150 + rng.random_range(0..100),
                k: (!rng.random_bool(0.1)).then(|| pick(&mut rng, &["a", "b", "c", "d"])),
                x: (!null(&mut rng)).then(|| rng.random_range(0..10)),
                y: (!null(&mut rng)).then(|| rng.random_range(0..10_000) as f64 / 100.0),
                b: (!null(&mut rng)).then(|| rng.random_bool(0.7)),
                s: (!null(&mut rng)).then(|| pick(&mut rng, &["a", "b", "c", "dd", "e"])),
            }
        })
        .collect()
}

const START: &str = "2016-03-22 20:00:00";

fn start() -> NaiveDateTime {
    NaiveDateTime::parse_from_str(START, TIME_FORMAT).unwrap()
}

fn csv_line(r: &Row) -> String {
    let time = start() + TimeDelta::milliseconds(r.time_ms);
    let text = |v: Option<String>| v.unwrap_or_default();
    format!(
        "{},{},{},{},{},{}",
        time.format("%Y-%m-%d %H:%M:%S%.3f"),
        text(r.k.map(String::from)),
        text(r.x.map(|x| x.to_string())),
        text(r.y.map(|y| y.to_string())),
        text(r.b.map(|b| b.to_string())),
        text(r.s.map(String::from)),
    )
}

/// The rows as one table for DataFusion's batch queries.
fn batch_table(rows: &[Row]) -> Arc<MemTable> {
    let start_ns = start().and_utc().timestamp_nanos_opt().unwrap();
    let schema = Arc::new(Schema::new(vec![
        Field::new(
            "time",
            DataType::Timestamp(TimeUnit::Nanosecond, None),
            false,
        ),
        Field::new("k", DataType::Utf8, true),
        Field::new("x", DataType::Int64, true),
        Field::new("y", DataType::Float64, true),
        Field::new("b", DataType::Boolean, true),
        Field::new("s", DataType::Utf8, true),
    ]));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(TimestampNanosecondArray::from_iter_values(
            rows.iter().map(|r| start_ns + r.time_ms * 1_000_000),
        )),
        Arc::new(StringArray::from_iter(rows.iter().map(|r| r.k))),
        Arc::new(Int64Array::from_iter(rows.iter().map(|r| r.x))),
        Arc::new(Float64Array::from_iter(rows.iter().map(|r| r.y))),
        Arc::new(BooleanArray::from_iter(rows.iter().map(|r| r.b))),
        Arc::new(StringArray::from_iter(rows.iter().map(|r| r.s))),
    ];
    let batch = RecordBatch::try_new(schema.clone(), columns).unwrap();
    Arc::new(MemTable::try_new(schema, vec![vec![batch]]).unwrap())
}

fn select_list() -> String {
    AGGREGATES
        .iter()
        .enumerate()
        .map(|(i, (agg, _))| format!("{agg} AS a{i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

const SOURCE: &str = "CREATE UNBOUNDED EXTERNAL TABLE trades (time TIMESTAMP NOT NULL, \
    k VARCHAR, x BIGINT, y DOUBLE, b BOOLEAN, s VARCHAR, \
    WATERMARK FOR time AS time - INTERVAL '5' SECOND) \
    STORED AS CSV LOCATION '{in}' OPTIONS ('maxFilesPerTrigger' '1');";

/// The CLI's script: every aggregate per key and tumbling (10 s) or sliding
/// (20 s every 10 s) window in append mode, into Parquet files under `out/`.
fn windows_script() -> String {
    let aggs = select_list();
    format!(
        "{source}
         CREATE EXTERNAL TABLE tumbling STORED AS PARQUET LOCATION 'out/tumbling' \
           OPTIONS ('outputMode' 'append');
         INSERT INTO tumbling SELECT window.start AS ws, k, {aggs} FROM trades \
           GROUP BY window(time, '10 seconds'), k;
         CREATE EXTERNAL TABLE sliding STORED AS PARQUET LOCATION 'out/sliding' \
           OPTIONS ('outputMode' 'append');
         INSERT INTO sliding SELECT window.start AS ws, k, {aggs} FROM trades \
           GROUP BY window(time, '20 seconds', '10 seconds'), k;",
        source = SOURCE.replace("{in}", "in")
    )
}

/// Every aggregate per key in update mode into a memory table (file sinks
/// only append), checkpointed in `dir`.
fn update_script(dir: &Path) -> String {
    format!(
        "{source}
         CREATE EXTERNAL TABLE updated STORED AS MEMORY LOCATION 'updated' OPTIONS \
           ('outputMode' 'update', 'checkpointLocation' '{checkpoint}');
         INSERT INTO updated SELECT k, max(time) AS last_time, {aggs} FROM trades GROUP BY k;",
        source = SOURCE.replace("{in}", &dir.join("in").display().to_string()),
        checkpoint = dir.join("update-checkpoint").display(),
        aggs = select_list(),
    )
}

/// The update query run until its input is used up, in an engine of its own,
/// and the rows it emitted.
async fn run_update(dir: &Path) -> Vec<RecordBatch> {
    let engine = Engine::new();
    for q in engine.execute(&update_script(dir)).await.unwrap() {
        q.process_all_available().await.unwrap();
    }
    let rows = engine.sql("SELECT * FROM updated").await.unwrap();
    engine.stop_all().await.unwrap();
    rows
}

/// Every row of a query's answer as display strings, by its leading key columns.
type Answer = BTreeMap<Vec<String>, Vec<String>>;

fn text(c: &ArrayRef, row: usize) -> String {
    if c.is_null(row) {
        "NULL".into()
    } else {
        array_value_to_string(c, row).unwrap()
    }
}

fn answer(batches: &[RecordBatch], keys: usize) -> Answer {
    let mut out = Answer::new();
    for b in batches {
        for r in 0..b.num_rows() {
            let row: Vec<String> = b.columns().iter().map(|c| text(c, r)).collect();
            let previous = out.insert(row[..keys].to_vec(), row[keys..].to_vec());
            assert!(previous.is_none(), "{:?} emitted twice", &row[..keys]);
        }
    }
    out
}

async fn read_parquet(ctx: &SessionContext, dir: &Path, sql: &str) -> Vec<RecordBatch> {
    ctx.register_parquet("out", dir.to_str().unwrap(), ParquetReadOptions::default())
        .await
        .unwrap();
    let rows = ctx.sql(sql).await.unwrap().collect().await.unwrap();
    ctx.deregister_table("out").unwrap();
    rows
}

fn same(what: &str, cmp: Cmp, streamed: &str, batch: &str) {
    let close = match (cmp, streamed.parse::<f64>(), batch.parse::<f64>()) {
        (Cmp::Exact, _, _) | (_, Err(_), _) | (_, _, Err(_)) => streamed == batch,
        (Cmp::Float, Ok(s), Ok(b)) => (s - b).abs() <= 1e-9 * s.abs().max(b.abs()).max(1.0),
        // Values are 0..100: within a tenth of their range.
        (Cmp::Loose, Ok(s), Ok(b)) => (s - b).abs() <= 10.0,
    };
    assert!(close, "{what}: streamed {streamed}, DataFusion {batch}");
}

fn compare(query: &str, streamed: &Answer, batch: &Answer, groups: usize) {
    assert!(batch.len() >= groups, "{query}: {} groups", batch.len());
    assert_eq!(
        streamed.keys().collect::<Vec<_>>(),
        batch.keys().collect::<Vec<_>>(),
        "{query}: the groups"
    );
    for (key, want) in batch {
        let got = &streamed[key];
        for (i, (agg, cmp)) in AGGREGATES.iter().enumerate() {
            same(&format!("{query} {key:?} {agg}"), *cmp, &got[i], &want[i]);
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_mergeable_aggregate_streams_as_datafusion_computes_it_at_once() {
    let rows = random_rows(20161203);
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    std::fs::create_dir(&input).unwrap();
    std::fs::write(dir.path().join("aggs.sql"), windows_script()).unwrap();
    let mut files = rows
        .chunks(ROWS_PER_FILE)
        .map(|c| c.iter().map(csv_line).collect::<Vec<_>>());
    // Half the files, a stop, then the rest and a row an hour later that
    // closes every window before it.
    for (n, lines) in files.by_ref().take(FILES / 2).enumerate() {
        common::put(&input, &format!("part-{n:02}.csv"), &lines);
    }
    let first = common::run_checkpointed(dir.path(), "aggs.sql");
    let mut updated = run_update(dir.path()).await;
    for (n, lines) in files.enumerate() {
        common::put(&input, &format!("part-{:02}.csv", n + FILES / 2), &lines);
    }
    let closing = Row {
        time_ms: 3_600_000,
        k: Some("zz"),
        x: None,
        y: None,
        b: None,
        s: None,
    };
    common::put(&input, "part-99.csv", &[csv_line(&closing)]);
    let second = common::run_checkpointed(dir.path(), "aggs.sql");
    let batches = |run: &[serde_json::Value]| -> Vec<u64> {
        run.iter().filter_map(|p| p["batch_id"].as_u64()).collect()
    };
    let (first, second) = (batches(&first), batches(&second));
    assert!(
        second.iter().min() > first.iter().max(),
        "the second run resumes after the first one's batches: {first:?}, {second:?}"
    );
    updated.extend(run_update(dir.path()).await);

    let ctx = SessionContext::new();
    ctx.register_table("trades", batch_table(&rows)).unwrap();
    let aggs = select_list();
    let batch = |sql: String| {
        let ctx = &ctx;
        async move { ctx.sql(&sql).await.unwrap().collect().await.unwrap() }
    };
    let out = ctx.clone();

    // Update mode: each key's last emitted row, the one with its latest time.
    let mut latest: HashMap<String, (String, Vec<String>)> = HashMap::new();
    for (key, row) in answer(&updated, 2) {
        let (k, time) = (key[0].clone(), key[1].clone());
        if k == "zz" {
            continue;
        }
        if latest.get(&k).is_none_or(|(t, _)| *t < time) {
            latest.insert(k, (time, row));
        }
    }
    let streamed: Answer = latest
        .into_iter()
        .map(|(k, (_, row))| (vec![k], row))
        .collect();
    let want = answer(
        &batch(format!("SELECT k, {aggs} FROM trades GROUP BY k")).await,
        1,
    );
    compare("update", &streamed, &want, 5);

    let bin = "date_bin(INTERVAL '10 seconds', time, TIMESTAMP '1970-01-01 00:00:00')";
    let streamed = read_parquet(&out, &dir.path().join("out/tumbling"), "SELECT * FROM out").await;
    let want = batch(format!(
        "SELECT {bin} AS ws, k, {aggs} FROM trades GROUP BY 1, k"
    ))
    .await;
    compare("tumbling", &answer(&streamed, 2), &answer(&want, 2), 30);

    let streamed = read_parquet(&out, &dir.path().join("out/sliding"), "SELECT * FROM out").await;
    let want = batch(format!(
        "SELECT ws, k, {aggs} FROM (
           SELECT {bin} AS ws, * FROM trades
           UNION ALL SELECT {bin} - INTERVAL '10 seconds' AS ws, * FROM trades)
         GROUP BY ws, k"
    ))
    .await;
    compare("sliding", &answer(&streamed, 2), &answer(&want, 2), 40);
}

/// `time,order_id,client_id,symbol,amount,price,buy_sell`: (time, symbol, amount, price).
fn order(line: &str) -> (NaiveDateTime, String, i64, f64) {
    let f: Vec<&str> = line.split(',').collect();
    let time = NaiveDateTime::parse_from_str(f[0], TIME_FORMAT).unwrap();
    (
        time,
        f[3].to_string(),
        f[4].parse().unwrap(),
        f[5].parse().unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn ohlc_candles_match_a_recount_of_the_orders() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("orders");
    std::fs::create_dir(&input).unwrap();
    let mut generator = OrderGenerator::new(GeneratorConfig {
        clients: 50,
        symbols: 5,
        malformed: 0.0,
        seed: 3,
    });
    // One order a second (the format's precision, so that no two tie on time)
    // for an hour, in six files.
    let lines: Vec<String> = (0..3_600)
        .map(|i| generator.line(start() + TimeDelta::seconds(i)))
        .collect();
    let sql =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/queries/ohlc.sql")).unwrap();
    let engine = Engine::new();
    let queries = engine
        .execute(&demo_sql(&sql, &input.display().to_string(), "", "candles"))
        .await
        .unwrap();
    for (n, chunk) in lines.chunks(600).enumerate() {
        write_atomically(
            &input,
            &format!("orders-{n}.csv"),
            (chunk.join("\n") + "\n").as_bytes(),
        )
        .unwrap();
        queries[0].process_all_available().await.unwrap();
    }

    // (open, high, low, close, volume) per minute and symbol, for the minutes
    // the watermark (the last order's time less 5 s) closed.
    let orders: Vec<_> = lines.iter().map(|l| order(l)).collect();
    let watermark = orders.iter().map(|o| o.0).max().unwrap() - TimeDelta::seconds(5);
    type Candle = (f64, f64, f64, f64, i64);
    let mut want: BTreeMap<(String, String), Candle> = BTreeMap::new();
    for (time, symbol, amount, price) in &orders {
        let minute = time.format("%Y-%m-%dT%H:%M:00").to_string();
        let end = NaiveDateTime::parse_from_str(&minute, "%Y-%m-%dT%H:%M:%S").unwrap()
            + TimeDelta::minutes(1);
        if end > watermark {
            continue;
        }
        // Orders come in time order: the first seen opens, the last closes.
        let c = want
            .entry((minute, symbol.clone()))
            .or_insert((*price, *price, *price, *price, 0));
        c.1 = c.1.max(*price);
        c.2 = c.2.min(*price);
        c.3 = *price;
        c.4 += amount;
    }
    let got = engine
        .sql("SELECT minute, symbol, open, high, low, close, volume FROM candles")
        .await
        .unwrap();
    let mut candles = BTreeMap::new();
    for b in &got {
        for r in 0..b.num_rows() {
            let t = |c: usize| text(b.column(c), r);
            let f = |c: usize| t(c).parse::<f64>().unwrap();
            let candle = (f(2), f(3), f(4), f(5), t(6).parse::<i64>().unwrap());
            assert!(
                candles.insert((t(0), t(1)), candle).is_none(),
                "a candle emitted twice"
            );
        }
    }
    assert_eq!(candles.len(), 59 * 5, "every closed minute of every symbol");
    assert_eq!(candles, want);
}
