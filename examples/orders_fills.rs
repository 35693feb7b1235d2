//! Orders and their fills as two streams, joined on the order id within an
//! interval of event time: which fills came within a minute of their order
//! (inner join), and which orders were still unfilled a minute after they were
//! placed (left outer join).
//!
//! ```sh
//! cargo run --example orders_fills            # 20,000 orders, 100 a second
//! cargo run --example orders_fills -- 100000
//! ```
//!
//! Orders and fills are generated as `brook gen-orders --fills` makes them
//! (80% of orders filled, most within seconds, 5% of fills more than a minute
//! late) into a temporary directory, a file of 20 seconds of each at a time.
//! Both sources have a watermark 10 seconds behind their latest event time:
//! the join keeps an order until the watermark passes its minute, then lets it
//! go, and the outer join emits it then if no fill came in time. After each
//! file the queries run; the counts are checked against the generated files.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use brook::datafusion::arrow::array::AsArray;
use brook::datafusion::arrow::datatypes::{DataType, Field, Int64Type, Schema, TimeUnit};
use brook::datafusion::arrow::util::pretty::pretty_format_batches;
use brook::orders::{
    FILL_BOUND, FillConfig, FillGenerator, GeneratorConfig, OrderGenerator, TIME_FORMAT,
};
use brook::source::ParseMode;
use brook::source::write_atomically;
use brook::{Engine, OutputMode};
use chrono::{NaiveDateTime, TimeDelta};

/// Orders per second of event time, and per file.
const RATE: i64 = 100;
const PER_FILE: usize = 2_000;

const FILLED_IN_TIME: &str = "
    SELECT o.order_id, o.symbol, o.time AS ordered, f.time AS filled, f.quantity, f.price
    FROM orders o JOIN fills f
      ON o.order_id = f.order_id
     AND f.time BETWEEN o.time AND o.time + INTERVAL '1' MINUTE";

const ORDERS_WITH_FILLS: &str = "
    SELECT o.order_id, o.symbol, o.time AS ordered, f.fill_id, f.time AS filled
    FROM orders o LEFT JOIN fills f
      ON o.order_id = f.order_id
     AND f.time BETWEEN o.time AND o.time + INTERVAL '1' MINUTE";

fn timestamp(name: &str) -> Field {
    Field::new(name, DataType::Timestamp(TimeUnit::Nanosecond, None), false)
}

fn orders_schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        timestamp("time"),
        Field::new("order_id", DataType::Int64, false),
        Field::new("client_id", DataType::Int64, false),
        Field::new("symbol", DataType::Utf8, false),
        Field::new("amount", DataType::Int32, false),
        Field::new("price", DataType::Float64, false),
        Field::new("buy_sell", DataType::Utf8, false),
    ]))
}

fn fills_schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        timestamp("time"),
        Field::new("fill_id", DataType::Int64, false),
        Field::new("order_id", DataType::Int64, false),
        Field::new("quantity", DataType::Int32, false),
        Field::new("price", DataType::Float64, false),
    ]))
}

/// The generated data, as the files hold it: each order's time, and each fill's order and time.
#[derive(Default)]
struct Written {
    orders: HashMap<String, NaiveDateTime>,
    fills: Vec<(String, NaiveDateTime)>,
}

impl Written {
    fn time(field: &str) -> brook::Result<NaiveDateTime> {
        NaiveDateTime::parse_from_str(field, TIME_FORMAT)
            .map_err(|e| brook::BrookError::sql(format!("a generated time {field:?}: {e}")))
    }

    /// The time (first field) and the order id (field `id_at`) of a line.
    fn fields(line: &str, id_at: usize) -> brook::Result<(String, NaiveDateTime)> {
        let f: Vec<&str> = line.split(',').collect();
        match (f.first(), f.get(id_at)) {
            (Some(time), Some(id)) => Ok((id.to_string(), Self::time(time)?)),
            _ => Err(brook::BrookError::sql(format!(
                "a generated line {line:?} is short"
            ))),
        }
    }

    fn order(&mut self, line: &str) -> brook::Result<()> {
        let (id, time) = Self::fields(line, 1)?;
        self.orders.insert(id, time);
        Ok(())
    }

    fn fill(&mut self, line: &str) -> brook::Result<()> {
        self.fills.push(Self::fields(line, 2)?);
        Ok(())
    }

    /// The orders with a fill at most a minute after them.
    fn filled_in_time(&self) -> HashMap<&str, usize> {
        let mut filled = HashMap::new();
        for (order, at) in &self.fills {
            let Some(&ordered) = self.orders.get(order) else {
                continue;
            };
            if ordered <= *at && *at <= ordered + FILL_BOUND {
                *filled.entry(order.as_str()).or_default() += 1;
            }
        }
        filled
    }
}

fn write_lines(dir: &Path, name: &str, lines: &[String]) -> brook::Result<()> {
    write_atomically(dir, name, (lines.join("\n") + "\n").as_bytes())
}

#[tokio::main]
async fn main() -> brook::Result<()> {
    let count: usize = match std::env::args().nth(1) {
        Some(n) => n
            .parse()
            .map_err(|e| brook::BrookError::option("ORDERS", format!("{n:?}: {e}")))?,
        None => 20_000,
    };
    run(count).await.map(|_| ())
}

/// What the joins gave, beside the recount of the generated files.
pub struct Counts {
    pub fills_in_time: i64,
    pub recounted_in_time: i64,
    pub outer_matched: i64,
    pub unfilled_emitted: i64,
}

/// Generates `count` orders and their fills, runs both joins over them and
/// prints what they found; fails if the inner join's pairs are not those the
/// files hold.
pub async fn run(count: usize) -> brook::Result<Counts> {
    let dir = tempfile::tempdir().map_err(|e| brook::BrookError::io("a temporary directory", e))?;
    let (orders_dir, fills_dir) = (dir.path().join("orders"), dir.path().join("fills"));
    for d in [&orders_dir, &fills_dir] {
        std::fs::create_dir(d).map_err(|e| brook::BrookError::io(d, e))?;
    }

    let engine = Engine::new();
    let watermark = Duration::from_secs(10);
    engine
        .read_stream("orders")
        .schema(orders_schema())
        .mode(ParseMode::DropMalformed)
        .watermark("time", watermark)
        .load(&orders_dir.display().to_string())?;
    engine
        .read_stream("fills")
        .schema(fills_schema())
        .mode(ParseMode::DropMalformed)
        .watermark("time", watermark)
        .load(&fills_dir.display().to_string())?;
    let inner = engine
        .query(FILLED_IN_TIME)
        .name("filled_in_time")
        .output_mode(OutputMode::Append)
        .memory_sink("filled_in_time")
        .start()
        .await?;
    let outer = engine
        .query(ORDERS_WITH_FILLS)
        .name("orders_with_fills")
        .output_mode(OutputMode::Append)
        .memory_sink("orders_with_fills")
        .start()
        .await?;

    let mut orders = OrderGenerator::new(GeneratorConfig::default());
    let mut fills = FillGenerator::new(FillConfig::default());
    let start = NaiveDateTime::parse_from_str("2016-03-22 20:25:28", TIME_FORMAT)
        .map_err(|e| brook::BrookError::sql(e.to_string()))?;
    let mut written = Written::default();
    let mut n = 0;
    while n * PER_FILE < count {
        let mut lines = vec![];
        let mut last = start;
        for i in n * PER_FILE..((n + 1) * PER_FILE).min(count) {
            last = start + TimeDelta::milliseconds(i as i64 * 1000 / RATE);
            let (line, order) = orders.next_order(last);
            if let Some(order) = order {
                fills.add(&order);
            }
            written.order(&line)?;
            lines.push(line);
        }
        write_lines(&orders_dir, &format!("orders-{n:05}.csv"), &lines)?;
        let due = fills.due(last);
        for line in &due {
            written.fill(line)?;
        }
        if !due.is_empty() {
            write_lines(&fills_dir, &format!("fills-{n:05}.csv"), &due)?;
        }
        inner.process_all_available().await?;
        outer.process_all_available().await?;
        n += 1;
    }

    let show = |title: &str, batches: &[brook::datafusion::arrow::array::RecordBatch]| {
        match pretty_format_batches(batches) {
            Ok(table) => println!("{title}\n{table}\n"),
            Err(e) => println!("{title}: {e}\n"),
        }
    };
    let expected = written.filled_in_time();
    show(
        "Fills within a minute of their order (the first five)",
        &engine
            .sql("SELECT * FROM filled_in_time ORDER BY order_id LIMIT 5")
            .await?,
    );
    show(
        "Orders still unfilled a minute after they were placed (the first five)",
        &engine
            .sql(
                "SELECT order_id, symbol, ordered FROM orders_with_fills \
                 WHERE fill_id IS NULL ORDER BY order_id LIMIT 5",
            )
            .await?,
    );
    let totals = engine
        .sql(
            "SELECT (SELECT count(*) FROM filled_in_time) AS fills_in_time, \
             (SELECT count(*) FROM orders_with_fills WHERE fill_id IS NOT NULL) AS outer_matched, \
             (SELECT count(*) FROM orders_with_fills WHERE fill_id IS NULL) AS unfilled_emitted",
        )
        .await?;
    show("Counts", &totals);
    let total = |column: &str| {
        totals
            .first()
            .and_then(|b| b.column_by_name(column))
            .and_then(|c| c.as_primitive_opt::<Int64Type>())
            .map_or(0, |c| c.value(0))
    };
    let counts = Counts {
        fills_in_time: total("fills_in_time"),
        recounted_in_time: expected.values().sum::<usize>() as i64,
        outer_matched: total("outer_matched"),
        unfilled_emitted: total("unfilled_emitted"),
    };
    println!(
        "From the files: {} orders, {} fills, {} of them within a minute of their order; \
         {} orders unfilled after a minute (those of the last minute or so are still in \
         the join's state, waiting for the watermark to pass them).",
        written.orders.len(),
        written.fills.len(),
        expected.values().sum::<usize>(),
        written.orders.len() - expected.len(),
    );
    let state = |q: &brook::StreamingQuery| {
        q.last_progress()
            .map(|p| {
                p.state_operators
                    .iter()
                    .map(|s| s.num_rows_total)
                    .sum::<u64>()
            })
            .unwrap_or_default()
    };
    println!(
        "Rows in state after the last batch: inner join {}, outer join {}.",
        state(&inner),
        state(&outer)
    );
    inner.stop().await?;
    outer.stop().await?;
    if counts.fills_in_time != counts.recounted_in_time {
        return Err(brook::BrookError::sql(format!(
            "the join found {} fills within a minute of their order, the files hold {}",
            counts.fills_in_time, counts.recounted_in_time
        )));
    }
    Ok(counts)
}
