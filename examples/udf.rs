//! Functions of your own in streaming SQL: `notional(amount, price)` and
//! `size_class(amount)`, scalar functions registered on the engine, used in a
//! windowed query's WHERE, SELECT and GROUP BY as any built-in function.
//!
//! ```sh
//! cargo run --example udf
//! ```
//!
//! Generated orders are written into a temporary directory, three files of a
//! thousand; the query runs over them with a checkpoint, which records the
//! functions it calls: a restart on that checkpoint needs them registered.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use brook::datafusion::arrow::array::{
    Array, ArrayRef, AsArray, Float64Array, RecordBatch, StringArray,
};
use brook::datafusion::arrow::datatypes::{
    DataType, Field, Float64Type, Int32Type, Schema, TimeUnit,
};
use brook::datafusion::arrow::util::pretty::pretty_format_batches;
use brook::datafusion::logical_expr::{ColumnarValue, ScalarUDF, Volatility, create_udf};
use brook::orders::{GeneratorConfig, OrderGenerator, TIME_FORMAT};
use brook::source::write_atomically;
use brook::{BrookError, Engine, OutputMode};
use chrono::{NaiveDateTime, TimeDelta};

/// Each minute's orders worth more than 500 by size, with what they traded.
pub const TRADED: &str = "
    SELECT window.start AS minute, size_class(amount) AS size,
           count(*) AS orders, sum(notional(amount, price)) AS traded
    FROM orders
    WHERE notional(amount, price) > 500
    GROUP BY window(time, '1 minute'), size_class(amount)";

/// `amount * price`, rounded to cents.
pub fn notional() -> ScalarUDF {
    create_udf(
        "notional",
        vec![DataType::Int32, DataType::Float64],
        DataType::Float64,
        Volatility::Immutable,
        Arc::new(|args: &[ColumnarValue]| {
            let arrays = ColumnarValue::values_to_arrays(args)?;
            let (amount, price) = (
                arrays[0].as_primitive::<Int32Type>(),
                arrays[1].as_primitive::<Float64Type>(),
            );
            let values: Float64Array = amount
                .iter()
                .zip(price.iter())
                .map(|(a, p)| Some((f64::from(a?) * p? * 100.0).round() / 100.0))
                .collect();
            Ok(ColumnarValue::Array(Arc::new(values) as ArrayRef))
        }),
    )
}

/// 'small' below 100 shares, 'large' from 100 on.
pub fn size_class() -> ScalarUDF {
    create_udf(
        "size_class",
        vec![DataType::Int32],
        DataType::Utf8,
        Volatility::Immutable,
        Arc::new(|args: &[ColumnarValue]| {
            let arrays = ColumnarValue::values_to_arrays(args)?;
            let amount = arrays[0].as_primitive::<Int32Type>();
            let classes: StringArray = (0..amount.len())
                .map(|i| {
                    let a = (!amount.is_null(i)).then(|| amount.value(i))?;
                    Some(if a < 100 { "small" } else { "large" })
                })
                .collect();
            Ok(ColumnarValue::Array(Arc::new(classes) as ArrayRef))
        }),
    )
}

pub fn orders_schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new(
            "time",
            DataType::Timestamp(TimeUnit::Nanosecond, None),
            false,
        ),
        Field::new("order_id", DataType::Int64, false),
        Field::new("client_id", DataType::Int64, false),
        Field::new("symbol", DataType::Utf8, false),
        Field::new("amount", DataType::Int32, false),
        Field::new("price", DataType::Float64, false),
        Field::new("buy_sell", DataType::Utf8, false),
    ]))
}

/// Three files of generated orders under `dir`, ten a second.
pub fn write_orders(dir: &Path) -> brook::Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| BrookError::io(dir, e))?;
    let mut generator = OrderGenerator::new(GeneratorConfig::default());
    let start = NaiveDateTime::parse_from_str("2016-03-22 20:25:28", TIME_FORMAT)
        .map_err(|e| BrookError::sql(e.to_string()))?;
    for file in 0..3 {
        let lines: Vec<String> = (0..1000)
            .map(|i| generator.line(start + TimeDelta::milliseconds((file * 1000 + i) * 100)))
            .collect();
        let text = lines.join("\n") + "\n";
        write_atomically(dir, &format!("orders-{file}.csv"), text.as_bytes())?;
    }
    Ok(())
}

/// Declares the orders under `dir` as a stream, a file per batch.
pub fn declare_orders(engine: &Engine, dir: &Path) -> brook::Result<()> {
    engine
        .read_stream("orders")
        .schema(orders_schema())
        .watermark("time", Duration::from_secs(10))
        .max_files_per_trigger(1)
        .load(&dir.join("orders").display().to_string())
}

/// An engine with the functions registered and the orders under `dir` as a stream.
pub fn engine(dir: &Path) -> brook::Result<Engine> {
    let engine = Engine::new();
    engine.register_udf(notional())?;
    engine.register_udf(size_class())?;
    declare_orders(&engine, dir)?;
    Ok(engine)
}

/// Runs [`TRADED`] over orders written under `dir`, checkpointed there, and
/// returns what its memory table holds once the files are read.
pub async fn run(dir: &Path) -> brook::Result<Vec<RecordBatch>> {
    write_orders(&dir.join("orders"))?;
    let engine = engine(dir)?;
    let query = engine
        .query(TRADED)
        .name("traded")
        .output_mode(OutputMode::Complete)
        .checkpoint(&dir.join("checkpoint").display().to_string())
        .memory_sink("traded")
        .start()
        .await?;
    query.process_all_available().await?;
    query.stop().await?;
    engine
        .sql("SELECT minute, size, orders, round(traded, 2) AS traded FROM traded ORDER BY 1, 2")
        .await
}

#[tokio::main]
async fn main() -> brook::Result<()> {
    let dir = tempfile::tempdir().map_err(|e| BrookError::io("a temporary directory", e))?;
    let rows = run(dir.path()).await?;
    match pretty_format_batches(&rows) {
        Ok(table) => println!("{table}"),
        Err(e) => println!("{e}"),
    }
    Ok(())
}
