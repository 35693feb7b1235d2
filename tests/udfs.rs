//! Functions registered on the engine from Rust, in streaming queries: their
//! answers checked against DataFusion's batch answer with the same functions,
//! and a checkpoint that records them.

mod common;

use std::sync::Arc;

use brook::OutputMode;
use brook::datafusion::arrow::array::{
    ArrayRef, AsArray, Float64Array, Int32Array, IntervalMonthDayNanoArray, RecordBatch,
};
use brook::datafusion::arrow::datatypes::{
    DataType, Field, FieldRef, Float64Type, Int32Type, Int64Type, IntervalMonthDayNano,
    IntervalUnit, UInt64Type,
};
use brook::datafusion::common::ScalarValue;
use brook::datafusion::error::{DataFusionError, Result as DFResult};
use brook::datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use brook::datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, ColumnarValue, Signature, Volatility, create_udf,
};
use brook::datafusion::prelude::SessionContext;
use brook::{Engine, StreamingQuery};
use common::{put, sorted, table};

#[path = "../examples/udf.rs"]
#[allow(dead_code)]
mod udf;

const COLUMNS: &str = "time TIMESTAMP NOT NULL, order_id BIGINT, client_id BIGINT, symbol VARCHAR, \
                       amount INT, price DOUBLE, buy_sell VARCHAR";

/// DataFusion's batch answer to `sql` over the orders files under `dir`, with
/// the example's functions and `extra` registered.
async fn batch(dir: &std::path::Path, sql: &str, extra: Option<AggregateUDF>) -> Vec<Vec<String>> {
    let ctx = SessionContext::new();
    ctx.register_udf(udf::notional());
    ctx.register_udf(udf::size_class());
    if let Some(f) = extra {
        ctx.register_udaf(f);
    }
    ctx.sql(&format!(
        "CREATE EXTERNAL TABLE orders ({COLUMNS}) STORED AS CSV LOCATION '{}' \
         OPTIONS ('format.has_header' 'false')",
        dir.join("orders").display()
    ))
    .await
    .unwrap();
    let batches: Vec<RecordBatch> = ctx.sql(sql).await.unwrap().collect().await.unwrap();
    sorted(table(&batches))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scalar_functions_in_where_select_and_group_by_match_datafusion_batch() {
    let dir = tempfile::tempdir().unwrap();
    udf::write_orders(&dir.path().join("orders")).unwrap();
    let engine = udf::engine(dir.path()).unwrap();
    let query = engine
        .query(udf::TRADED)
        .output_mode(OutputMode::Complete)
        .memory_sink("traded")
        .start()
        .await
        .unwrap();
    query.process_all_available().await.unwrap();
    assert_eq!(query.recent_progress().len(), 3, "a batch per file");
    // Rounded: the sums add in another order.
    let got = engine
        .sql("SELECT minute, size, orders, round(traded, 2) FROM traded")
        .await
        .unwrap();
    let expected = batch(
        dir.path(),
        "SELECT date_bin(INTERVAL '1 minute', time) AS minute, size_class(amount) AS size, \
           count(*) AS orders, round(sum(notional(amount, price)), 2) AS traded \
         FROM orders WHERE notional(amount, price) > 500 GROUP BY 1, 2",
        None,
    )
    .await;
    assert!(expected.len() >= 8, "{expected:?}");
    assert_eq!(sorted(table(&got)), expected);
    // Batch queries on the engine see them too.
    let classes = engine
        .sql(
            "SELECT size_class(CAST(99 AS INT)), size_class(CAST(100 AS INT)), \
             notional(CAST(3 AS INT), 1.5)",
        )
        .await
        .unwrap();
    assert_eq!(
        table(&classes),
        vec![vec!["small".to_string(), "large".into(), "4.5".into()]]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_prints_each_minutes_traded_orders() {
    let dir = tempfile::tempdir().unwrap();
    let rows = udf::run(dir.path()).await.unwrap();
    let rows = table(&rows);
    // Five minutes of orders, ten a second, in two size classes.
    assert!(rows.len() >= 8, "{rows:?}");
    assert!(rows.iter().all(|r| r[1] == "small" || r[1] == "large"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_without_a_function_the_checkpoint_records_names_it() {
    let dir = tempfile::tempdir().unwrap();
    udf::run(dir.path()).await.unwrap();
    let checkpoint = dir.path().join("checkpoint").display().to_string();
    let start = |engine: Engine| {
        let checkpoint = checkpoint.clone();
        async move {
            let started = engine
                .query(udf::TRADED)
                .output_mode(OutputMode::Complete)
                .checkpoint(&checkpoint)
                .memory_sink("traded")
                .start()
                .await;
            (engine, started)
        }
    };

    // Without size_class the query does not plan; the checkpoint says why.
    let engine = Engine::new();
    engine.register_udf(udf::notional()).unwrap();
    udf::declare_orders(&engine, dir.path()).unwrap();
    let err = start(engine).await.1.unwrap_err().to_string();
    assert!(
        err.contains(
            "the checkpoint's query uses function 'size_class', which is not registered on \
             this engine"
        ),
        "{err}"
    );

    // With both, it resumes: the files were read, the state holds the answer.
    let (engine, started) = start(udf::engine(dir.path()).unwrap()).await;
    let query = started.unwrap();
    query.process_all_available().await.unwrap();
    assert!(
        query
            .recent_progress()
            .iter()
            .all(|p| p.num_input_rows == 0)
    );
    let rows = engine.sql("SELECT * FROM traded").await.unwrap();
    assert!(table(&rows).len() >= 8);
}

/// A function called only in a session's per-row gap is recorded too: it is
/// planned apart from the rest of the query.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_in_a_session_gap_is_needed_on_restart() {
    let dir = tempfile::tempdir().unwrap();
    udf::write_orders(&dir.path().join("orders")).unwrap();
    let checkpoint = dir.path().join("checkpoint").display().to_string();
    let gap = create_udf(
        "gap_for",
        vec![DataType::Utf8],
        DataType::Interval(IntervalUnit::MonthDayNano),
        Volatility::Immutable,
        Arc::new(|args: &[ColumnarValue]| {
            let arrays = ColumnarValue::values_to_arrays(args)?;
            let minute = IntervalMonthDayNano::new(0, 0, 60_000_000_000);
            let gaps: IntervalMonthDayNanoArray =
                std::iter::repeat_n(Some(minute), arrays[0].len()).collect();
            Ok(ColumnarValue::Array(Arc::new(gaps)))
        }),
    );
    async fn start(engine: &Engine, checkpoint: &str) -> brook::Result<Arc<StreamingQuery>> {
        engine
            .query(
                "SELECT client_id, count(*) AS n FROM orders \
                 GROUP BY session_window(time, gap_for(symbol)), client_id",
            )
            .output_mode(OutputMode::Update)
            .checkpoint(checkpoint)
            .memory_sink("sessions")
            .start()
            .await
    }
    let engine = Engine::new();
    engine.register_udf(gap).unwrap();
    udf::declare_orders(&engine, dir.path()).unwrap();
    let query = start(&engine, &checkpoint).await.unwrap();
    query.process_all_available().await.unwrap();
    query.stop().await.unwrap();
    let rows = engine.sql("SELECT sum(n) FROM sessions").await.unwrap();
    assert_ne!(table(&rows), vec![vec!["NULL".to_string()]]);

    let engine = Engine::new();
    udf::declare_orders(&engine, dir.path()).unwrap();
    let err = start(&engine, &checkpoint).await.unwrap_err().to_string();
    assert!(
        err.contains("the checkpoint's query uses function 'gap_for', which is not registered"),
        "{err}"
    );
}

/// A function registered under a built-in function's name: without it, the
/// query would plan with the built-in one and answer otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_shadowing_a_built_in_one_is_needed_on_restart() {
    let dir = tempfile::tempdir().unwrap();
    udf::write_orders(&dir.path().join("orders")).unwrap();
    let checkpoint = dir.path().join("checkpoint").display().to_string();
    let tenfold = create_udf(
        "abs",
        vec![DataType::Int32],
        DataType::Int32,
        Volatility::Immutable,
        Arc::new(|args: &[ColumnarValue]| {
            let arrays = ColumnarValue::values_to_arrays(args)?;
            let tens: Int32Array = arrays[0]
                .as_primitive::<Int32Type>()
                .iter()
                .map(|a| a.map(|a| a * 10))
                .collect();
            Ok(ColumnarValue::Array(Arc::new(tens)))
        }),
    );
    async fn start(engine: &Engine, checkpoint: &str) -> brook::Result<Arc<StreamingQuery>> {
        engine
            .query("SELECT order_id, abs(amount) AS amount FROM orders")
            .checkpoint(checkpoint)
            .memory_sink("amounts")
            .start()
            .await
    }
    let engine = Engine::new();
    engine.register_udf(tenfold).unwrap();
    udf::declare_orders(&engine, dir.path()).unwrap();
    let query = start(&engine, &checkpoint).await.unwrap();
    query.process_all_available().await.unwrap();
    query.stop().await.unwrap();
    let tens = engine
        .sql("SELECT count(*) FROM amounts WHERE amount % 10 <> 0")
        .await
        .unwrap();
    assert_eq!(table(&tens), vec![vec!["0".to_string()]]);

    let engine = Engine::new();
    udf::declare_orders(&engine, dir.path()).unwrap();
    let err = start(&engine, &checkpoint).await.unwrap_err().to_string();
    assert!(
        err.contains("the checkpoint's query uses function 'abs', which is not registered"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scalar_function_in_a_join_condition_of_a_script() {
    let dir = tempfile::tempdir().unwrap();
    udf::write_orders(&dir.path().join("orders")).unwrap();
    let sectors = dir.path().join("classes");
    std::fs::create_dir(&sectors).unwrap();
    put(
        &sectors,
        "classes.csv",
        &[
            "class,label".into(),
            "small,retail".into(),
            "large,block".into(),
        ],
    );
    let engine = Engine::new();
    engine.register_udf(udf::size_class()).unwrap();
    let d = dir.path().display();
    let queries = engine
        .execute(&format!(
            "CREATE UNBOUNDED EXTERNAL TABLE orders ({COLUMNS}) STORED AS CSV \
               LOCATION '{d}/orders';
             CREATE EXTERNAL TABLE classes (class VARCHAR, label VARCHAR) STORED AS CSV \
               LOCATION '{d}/classes';
             CREATE EXTERNAL TABLE labelled STORED AS MEMORY LOCATION 'labelled';
             INSERT INTO labelled SELECT o.order_id, c.label \
               FROM orders o JOIN classes c ON size_class(o.amount) = c.class;"
        ))
        .await
        .unwrap();
    queries[0].process_all_available().await.unwrap();
    let got = engine
        .sql("SELECT label, count(*) FROM labelled GROUP BY label")
        .await
        .unwrap();
    let expected = batch(
        dir.path(),
        "SELECT CASE size_class(amount) WHEN 'small' THEN 'retail' ELSE 'block' END, count(*) \
         FROM orders GROUP BY 1",
        None,
    )
    .await;
    assert_eq!(expected.len(), 2, "{expected:?}");
    assert_eq!(sorted(table(&got)), expected);
}

/// The sum of its argument's squares: its state is that sum, and states merge by adding.
#[derive(Debug, PartialEq, Eq, Hash)]
struct SqSum {
    signature: Signature,
}

impl SqSum {
    fn udaf() -> AggregateUDF {
        AggregateUDF::from(Self {
            signature: Signature::exact(vec![DataType::Float64], Volatility::Immutable),
        })
    }
}

impl AggregateUDFImpl for SqSum {
    fn name(&self) -> &str {
        "sq_sum"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _: &[DataType]) -> DFResult<DataType> {
        Ok(DataType::Float64)
    }
    fn state_fields(&self, args: StateFieldsArgs) -> DFResult<Vec<FieldRef>> {
        Ok(vec![Arc::new(Field::new(
            format!("{}[sq_sum]", args.name),
            DataType::Float64,
            true,
        ))])
    }
    fn accumulator(&self, _: AccumulatorArgs) -> DFResult<Box<dyn Accumulator>> {
        Ok(Box::new(SqSumAcc(0.0)))
    }
}

#[derive(Debug)]
struct SqSumAcc(f64);

impl SqSumAcc {
    fn add(&mut self, values: &ArrayRef, square: bool) {
        let values: &Float64Array = values.as_primitive::<Float64Type>();
        for v in values.iter().flatten() {
            self.0 += if square { v * v } else { v };
        }
    }
}

impl Accumulator for SqSumAcc {
    fn update_batch(&mut self, values: &[ArrayRef]) -> DFResult<()> {
        self.add(&values[0], true);
        Ok(())
    }
    fn merge_batch(&mut self, states: &[ArrayRef]) -> DFResult<()> {
        self.add(&states[0], false);
        Ok(())
    }
    fn state(&mut self) -> DFResult<Vec<ScalarValue>> {
        Ok(vec![ScalarValue::Float64(Some(self.0))])
    }
    fn evaluate(&mut self) -> DFResult<ScalarValue> {
        Ok(ScalarValue::Float64(Some(self.0)))
    }
    fn size(&self) -> usize {
        size_of_val(self)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mergeable_aggregate_function_in_a_streaming_group_by_matches_datafusion_batch() {
    let dir = tempfile::tempdir().unwrap();
    udf::write_orders(&dir.path().join("orders")).unwrap();
    let engine = udf::engine(dir.path()).unwrap();
    engine.register_udaf(SqSum::udaf()).unwrap();
    let query = engine
        .query(
            "SELECT window.start AS minute, size_class(amount) AS size, \
               sq_sum(price) AS sq FROM orders \
             GROUP BY window(time, '1 minute'), size_class(amount)",
        )
        .output_mode(OutputMode::Complete)
        .checkpoint(&dir.path().join("checkpoint").display().to_string())
        .memory_sink("squares")
        .start()
        .await
        .unwrap();
    query.process_all_available().await.unwrap();
    let got = engine
        .sql("SELECT minute, size, round(sq, 2) FROM squares")
        .await
        .unwrap();
    let expected = batch(
        dir.path(),
        "SELECT date_bin(INTERVAL '1 minute', time), size_class(amount), \
           round(sq_sum(price), 2) FROM orders GROUP BY 1, 2",
        Some(SqSum::udaf()),
    )
    .await;
    assert!(expected.len() >= 8, "{expected:?}");
    assert_eq!(sorted(table(&got)), expected);
}

/// A user's function that takes the built-in `sum`'s name: the sum of its
/// argument's absolute values, kept unsigned, which negating does not undo.
#[derive(Debug, PartialEq, Eq, Hash)]
struct AbsSum {
    signature: Signature,
}

impl AbsSum {
    fn udaf() -> AggregateUDF {
        AggregateUDF::from(Self {
            signature: Signature::exact(vec![DataType::Int64], Volatility::Immutable),
        })
    }
}

impl AggregateUDFImpl for AbsSum {
    fn name(&self) -> &str {
        "sum"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _: &[DataType]) -> DFResult<DataType> {
        Ok(DataType::UInt64)
    }
    fn state_fields(&self, args: StateFieldsArgs) -> DFResult<Vec<FieldRef>> {
        Ok(vec![Arc::new(Field::new(
            format!("{}[abs_sum]", args.name),
            DataType::UInt64,
            true,
        ))])
    }
    fn accumulator(&self, _: AccumulatorArgs) -> DFResult<Box<dyn Accumulator>> {
        Ok(Box::new(AbsSumAcc(0)))
    }
}

#[derive(Debug)]
struct AbsSumAcc(u64);

impl AbsSumAcc {
    fn add(&mut self, v: u64) -> DFResult<()> {
        self.0 = self
            .0
            .checked_add(v)
            .ok_or_else(|| DataFusionError::Execution("abs sum overflowed".into()))?;
        Ok(())
    }
}

impl Accumulator for AbsSumAcc {
    fn update_batch(&mut self, values: &[ArrayRef]) -> DFResult<()> {
        for v in values[0].as_primitive::<Int64Type>().iter().flatten() {
            self.add(v.unsigned_abs())?;
        }
        Ok(())
    }
    fn merge_batch(&mut self, states: &[ArrayRef]) -> DFResult<()> {
        for v in states[0].as_primitive::<UInt64Type>().iter().flatten() {
            self.add(v)?;
        }
        Ok(())
    }
    fn state(&mut self) -> DFResult<Vec<ScalarValue>> {
        Ok(vec![ScalarValue::UInt64(Some(self.0))])
    }
    fn evaluate(&mut self) -> DFResult<ScalarValue> {
        Ok(ScalarValue::UInt64(Some(self.0)))
    }
    fn size(&self) -> usize {
        size_of_val(self)
    }
}

/// Sliding windows in append mode carry a window's sum to the next by
/// negating the pane that leaves it, for the built-in `sum` only: a user's
/// `sum` in its place is summed from its panes, as DataFusion's batch answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_named_sum_over_sliding_windows_matches_datafusion_batch() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("values");
    std::fs::create_dir(&input).unwrap();
    let mut max_second = 0;
    for file in 0..6 {
        let lines: Vec<String> = (0..3)
            .map(|k| {
                let second = 10 * file + 3 * k + 1;
                max_second = max_second.max(second);
                let v = (file * 3 + k + 1) * if k % 2 == 0 { 1 } else { -1 };
                format!("2026-01-01 00:00:{second:02},{v}")
            })
            .collect();
        put(&input, &format!("{file}.csv"), &lines);
    }
    let engine = Engine::new();
    engine.register_udaf(AbsSum::udaf()).unwrap();
    engine
        .execute(&format!(
            "CREATE UNBOUNDED EXTERNAL TABLE t (time TIMESTAMP NOT NULL, v BIGINT NOT NULL, \
             WATERMARK FOR time AS time - INTERVAL '5' SECOND) STORED AS CSV LOCATION '{}' \
             OPTIONS ('maxFilesPerTrigger' '1');",
            input.display()
        ))
        .await
        .unwrap();
    let query = engine
        .query(
            "SELECT window.start AS ws, sum(v) AS total FROM t \
             GROUP BY window(time, '10 seconds', '5 seconds')",
        )
        .output_mode(OutputMode::Append)
        .memory_sink("totals")
        .start()
        .await
        .unwrap();
    query.process_all_available().await.unwrap();
    let got = engine.sql("SELECT ws, total FROM totals").await.unwrap();

    let ctx = SessionContext::new();
    ctx.register_udaf(AbsSum::udaf());
    ctx.sql(&format!(
        "CREATE EXTERNAL TABLE t (time TIMESTAMP NOT NULL, v BIGINT NOT NULL) STORED AS CSV \
         LOCATION '{}' OPTIONS ('format.has_header' 'false')",
        input.display()
    ))
    .await
    .unwrap();
    // The windows the final watermark has closed, each pane's rows in the two
    // windows that cover it.
    let watermark = max_second - 5;
    let expected: Vec<RecordBatch> = ctx
        .sql(&format!(
            "SELECT ws, sum(v) FROM ( \
               SELECT date_bin(INTERVAL '5 seconds', time) AS ws, v FROM t UNION ALL \
               SELECT date_bin(INTERVAL '5 seconds', time) - INTERVAL '5 seconds', v FROM t) \
             WHERE ws + INTERVAL '10 seconds' <= TIMESTAMP '2026-01-01 00:00:{watermark:02}' \
             GROUP BY ws"
        ))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let expected = sorted(table(&expected));
    assert!(expected.len() >= 8, "{expected:?}");
    assert_eq!(sorted(table(&got)), expected);
}

/// A user's function whose accumulator returns two state values where it
/// declares one state field.
#[derive(Debug, PartialEq, Eq, Hash)]
struct TwoStates(SqSum);

impl AggregateUDFImpl for TwoStates {
    fn name(&self) -> &str {
        "two_states"
    }
    fn signature(&self) -> &Signature {
        self.0.signature()
    }
    fn return_type(&self, args: &[DataType]) -> DFResult<DataType> {
        self.0.return_type(args)
    }
    fn state_fields(&self, args: StateFieldsArgs) -> DFResult<Vec<FieldRef>> {
        self.0.state_fields(args)
    }
    fn accumulator(&self, _: AccumulatorArgs) -> DFResult<Box<dyn Accumulator>> {
        Ok(Box::new(TwoStatesAcc(SqSumAcc(0.0))))
    }
}

#[derive(Debug)]
struct TwoStatesAcc(SqSumAcc);

impl Accumulator for TwoStatesAcc {
    fn update_batch(&mut self, values: &[ArrayRef]) -> DFResult<()> {
        self.0.update_batch(values)
    }
    fn merge_batch(&mut self, states: &[ArrayRef]) -> DFResult<()> {
        self.0.merge_batch(states)
    }
    fn state(&mut self) -> DFResult<Vec<ScalarValue>> {
        let mut state = self.0.state()?;
        state.push(ScalarValue::Float64(Some(0.0)));
        Ok(state)
    }
    fn evaluate(&mut self) -> DFResult<ScalarValue> {
        self.0.evaluate()
    }
    fn size(&self) -> usize {
        size_of_val(self)
    }
}

/// An aggregate function whose state is not what it declares fails the
/// query with an error naming the function, not one that reads as brook's bug.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_whose_state_differs_from_its_declaration_is_named() {
    let dir = tempfile::tempdir().unwrap();
    udf::write_orders(&dir.path().join("orders")).unwrap();
    let engine = udf::engine(dir.path()).unwrap();
    engine
        .register_udaf(AggregateUDF::from(TwoStates(SqSum {
            signature: Signature::exact(vec![DataType::Float64], Volatility::Immutable),
        })))
        .unwrap();
    let query = engine
        .query("SELECT symbol, two_states(price) AS s FROM orders GROUP BY symbol")
        .output_mode(OutputMode::Complete)
        .memory_sink("states")
        .start()
        .await
        .unwrap();
    let err = query.process_all_available().await.unwrap_err().to_string();
    assert!(
        err.contains("aggregate 'two_states' returned 2 state arrays but declares 1 state fields"),
        "{err}"
    );
    assert!(!err.contains("internal error"), "{err}");
}
