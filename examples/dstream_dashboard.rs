//! The order dashboard of *Spark in Action*, chapter 6, ported line for line
//! to brook's DStream API.
//!
//! ```sh
//! cargo run --example dstream_dashboard -- data/orders out/dashboard [checkpoint] [--ui]
//! cargo run -- gen-orders --count 50000 --malformed 0.01 > orders.txt
//! cargo run -- send --input orders.txt --to data/orders --lines-per-file 5000 --interval 2s
//! ```
//!
//! Every 5 seconds the orders in new files under the input directory are
//! counted by side, clients' traded amounts are added to their totals, and the
//! shares per stock over the last hour are summed; the three results go into
//! `out/dashboard-<time ms>.txt/part-00000` as the book's
//! `(BUYS,List(5074))`, `(TOP5CLIENTS,List(34, 69, 92, 36, 64))` lines.
//! With `--ui`, the web UI (port 4040 or the next free one; the token from
//! `BROOK_UI_TOKEN`, if set) shows each batch in its monitor page.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use brook::Engine;
use brook::datafusion::prelude::SessionContext;
use brook::dstream::{DStream, State, StateSpec, StreamingContext};
use brook::ui::{TOKEN_ENV, UiOptions, UiServer};
use chrono::NaiveDateTime;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Order {
    pub time: NaiveDateTime,
    pub order_id: i64,
    pub client_id: i64,
    pub symbol: String,
    pub amount: i64,
    pub price: f64,
    pub buy: bool,
}

/// One order line, or `None` for a line that is not one.
pub fn parse(line: &str) -> Option<Order> {
    let s: Vec<&str> = line.split(',').collect();
    if s.len() != 7 || !(s[6] == "B" || s[6] == "S") {
        return None;
    }
    Some(Order {
        time: NaiveDateTime::parse_from_str(s[0], brook::orders::TIME_FORMAT).ok()?,
        order_id: s[1].parse().ok()?,
        client_id: s[2].parse().ok()?,
        symbol: s[3].to_string(),
        amount: s[4].parse().ok()?,
        price: s[5].parse().ok()?,
        buy: s[6] == "B",
    })
}

/// The first five keys by value, largest first (ties by key, for stable output).
fn top5<K: Clone + Ord, V: PartialOrd>(rows: &[(K, V)]) -> Vec<K> {
    let mut sorted: Vec<&(K, V)> = rows.iter().collect();
    sorted.sort_by(|a, b| {
        b.1.partial_cmp(&a.1)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.0.cmp(&b.0))
    });
    sorted.into_iter().take(5).map(|(k, _)| k.clone()).collect()
}

/// The dashboard's stream of `(metric, values)` lines, batches `batch` apart;
/// malformed lines are dropped and counted in `dropped`.
pub fn dashboard(
    lines: &DStream<String>,
    batch: Duration,
    totals: Totals,
    dropped: Arc<AtomicU64>,
) -> DStream<(String, Vec<String>)> {
    let orders = lines.flat_map(move |line| {
        let order = parse(line);
        if order.is_none() && dropped.fetch_add(1, Ordering::Relaxed) < 5 {
            eprintln!("Wrong line format: {line}");
        }
        order
    });
    let num_per_type = orders
        .map(|o| (o.buy, 1_i64))
        .reduce_by_key(|c1, c2| c1 + c2);
    let amount_per_client = orders.map(|o| (o.client_id, o.amount as f64 * o.price));
    let amount_state = match totals {
        Totals::UpdateStateByKey => {
            amount_per_client.update_state_by_key(|vals: &[f64], total: Option<f64>| {
                Some(total.unwrap_or(0.0) + vals.iter().sum::<f64>())
            })
        }
        Totals::MapWithState => amount_per_client
            .map_with_state(StateSpec::function(
                |_client: &i64, amount: Option<&f64>, state: &mut State<f64>| {
                    let total =
                        state.get().copied().unwrap_or(0.0) + amount.copied().unwrap_or(0.0);
                    state.update(total);
                },
            ))
            .state_snapshots()
            .clone(),
    };
    let top5clients = amount_state.transform(|rdd, _| top5(rdd));
    let buy_sell_list = num_per_type.map(|(buy, n)| {
        let side = if *buy { "BUYS" } else { "SELLS" };
        (side.to_string(), vec![n.to_string()])
    });
    let top5cl_list = top5clients
        .repartition(1)
        .map(|c| c.to_string())
        .map_partitions(|clients| vec![("TOP5CLIENTS".to_string(), clients.to_vec())]);
    let stocks_per_window = orders
        .map(|o| (o.symbol.clone(), o.amount))
        .reduce_by_key_and_window_inv(
            |a1, a2| a1 + a2,
            |a1, a2| a1 - a2,
            Duration::from_secs(3600),
            batch,
            Some(Arc::new(|(_, shares): &(String, i64)| *shares != 0)),
        );
    let top_stocks = stocks_per_window
        .transform(|rdd, _| top5(rdd))
        .repartition(1)
        .map_partitions(|stocks| vec![("TOP5STOCKS".to_string(), stocks.to_vec())]);
    buy_sell_list.union(&top5cl_list).union(&top_stocks)
}

pub const BATCH: Duration = Duration::from_secs(5);

/// How clients' totals are kept: the book's `updateStateByKey`, or `mapWithState`.
#[derive(Debug, Clone, Copy)]
pub enum Totals {
    UpdateStateByKey,
    MapWithState,
}

#[tokio::main]
async fn main() -> brook::Result<()> {
    run(std::env::args().skip(1).collect()).await
}

/// The program, given its command-line arguments.
pub async fn run(args: Vec<String>) -> brook::Result<()> {
    let ui = args.iter().any(|a| a == "--ui");
    let args: Vec<String> = args.into_iter().filter(|a| a != "--ui").collect();
    let (Some(input), Some(output)) = (args.first(), args.get(1)) else {
        eprintln!(
            "usage: dstream_dashboard INPUT_DIR OUTPUT_PREFIX [CHECKPOINT_DIR [BATCH_MS [map-with-state]]] [--ui]"
        );
        std::process::exit(2);
    };
    let batch = match args.get(3).map(|ms| ms.parse::<u64>()) {
        Some(Ok(ms)) => Duration::from_millis(ms),
        Some(Err(e)) => {
            eprintln!("BATCH_MS: {e}");
            std::process::exit(2);
        }
        None => BATCH,
    };
    let totals = match args.get(4).map(String::as_str) {
        Some("map-with-state") => Totals::MapWithState,
        _ => Totals::UpdateStateByKey,
    };
    let build = || StreamingContext::new(&SessionContext::new(), batch);
    let ssc = match args.get(2) {
        Some(dir) => StreamingContext::get_or_create(dir, build),
        None => build(),
    };
    ssc.set_name("dstream_dashboard");
    // The web UI serves an engine: the program is listed among its queries.
    let _ui = match ui {
        true => {
            let engine = Arc::new(Engine::new());
            ssc.monitor_in(&engine)?;
            let options = UiOptions {
                token: std::env::var(TOKEN_ENV).ok(),
                ..UiOptions::default()
            };
            let server = UiServer::start(engine, options).await?;
            eprintln!("brook: web UI at {}", server.url());
            Some(server)
        }
        false => None,
    };
    let dropped = Arc::new(AtomicU64::new(0));
    let final_stream = dashboard(
        &ssc.text_file_stream(input)?,
        batch,
        totals,
        dropped.clone(),
    );
    final_stream.save_as_text_files(output, "txt");
    final_stream.print(10);
    ssc.start()?;
    tokio::select! {
        r = ssc.await_termination() => r?,
        _ = tokio::signal::ctrl_c() => ssc.stop(false).await?,
    }
    eprintln!(
        "malformed lines dropped: {}",
        dropped.load(Ordering::Relaxed)
    );
    Ok(())
}
