//! `brook demo`: the chapter-6 dashboard on generated orders, needing nothing installed.
//!
//! Orders are generated in real time into a directory, one file per second, and
//! the fills of most of them into another; the dashboard's three queries and
//! the volume per sector (joined with the symbols table of `queries/`) run over
//! the orders into memory tables, and a terminal view shows their results and
//! the engine's throughput every second.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use datafusion::arrow::util::pretty::pretty_format_batches;

use super::StopSignals;
use super::send::run_prefix;
use crate::config::Trigger;
use crate::engine::{Engine, Overrides};
use crate::error::{BrookError, Result};
use crate::exec::StreamingQuery;
use crate::orders::{FillConfig, FillGenerator, GeneratorConfig, OrderGenerator, SYMBOLS_CSV};
use crate::source::location::write_atomically;
use crate::ui::{UiOptions, UiServer};

/// The demo's queries, as shipped in `queries/`: the dashboard's three, then the volume per sector.
pub const QUERIES: [(&str, &str); 4] = [
    (
        "buy_sell_per_second",
        include_str!("../../queries/buy_sell_per_second.sql"),
    ),
    ("top_clients", include_str!("../../queries/top_clients.sql")),
    ("top_stocks", include_str!("../../queries/top_stocks.sql")),
    (
        "volume_per_sector",
        include_str!("../../queries/volume_per_sector.sql"),
    ),
];

pub(crate) struct DemoOptions {
    /// Where orders (`orders/`), fills (`fills/`) and the symbols table are
    /// written; a fresh temporary directory when not given.
    pub dir: Option<PathBuf>,
    /// Orders generated per second.
    pub rate: usize,
    pub malformed: f64,
    /// Stop by itself after this long (Ctrl-C stops it in any case).
    pub duration: Option<Duration>,
    /// Redraw in place (ANSI clear screen) rather than printing view after view.
    pub clear: bool,
    /// Where to serve the web dashboard; `None` serves none.
    pub ui: Option<UiOptions>,
    /// Bytes the queries may hold together (default: half the machine's memory).
    pub memory_limit: Option<usize>,
}

/// Rewrites a query of `queries/` to read orders from the directory `orders` and
/// the symbols table from the file `symbols`, and to write into a memory table `name`.
pub fn demo_sql(sql: &str, orders: &str, symbols: &str, name: &str) -> String {
    sql.replace("LOCATION 'data/orders'", &format!("LOCATION '{orders}'"))
        .replace(
            "LOCATION 'queries/symbols.csv'",
            &format!("LOCATION '{symbols}'"),
        )
        .replace(
            "STORED AS CONSOLE LOCATION 'stdout'",
            &format!("STORED AS MEMORY LOCATION '{name}'"),
        )
}

/// Prints the demo's text; false once standard output is closed (`brook demo | head`).
fn show(text: &str) -> bool {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}").and_then(|_| out.flush()).is_ok()
}

pub(crate) async fn run_demo(options: DemoOptions) -> Result<()> {
    let mut signals = StopSignals::listen()?;
    let malformed = Arc::new(AtomicU64::new(0));
    let counted = malformed.clone();
    let engine = Arc::new(Engine::with_overrides(Overrides {
        trigger: Some(Trigger::ProcessingTime(Duration::from_secs(1))),
        listeners: vec![Arc::new(move |p| {
            if p.name == QUERIES[0].0 {
                counted.fetch_add(p.num_malformed_rows, Ordering::Relaxed);
            }
        })],
        memory_limit: options.memory_limit,
        ..Overrides::default()
    }));
    // The UI first: a port it cannot take stops the demo before it writes anything.
    let ui = UiServer::start_if(&engine, options.ui).await?;
    let url = ui.as_ref().map(UiServer::url);
    if let Some(url) = &url {
        show(&format!("brook demo: the dashboard is at {url}"));
    }
    let (dir, created) = match &options.dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!("brook-demo-{}", std::process::id())),
            true,
        ),
    };
    let (orders, fills) = (dir.join("orders"), dir.join("fills"));
    for d in [&orders, &fills] {
        std::fs::create_dir_all(d).map_err(|e| BrookError::io(d, e))?;
    }
    write_atomically(&dir, "symbols.csv", SYMBOLS_CSV.as_bytes())?;
    let dir_text = dir.display().to_string();
    let orders_text = orders.display().to_string();
    let symbols_text = dir.join("symbols.csv").display().to_string();
    let mut queries = vec![];
    for (name, sql) in QUERIES {
        let sql = demo_sql(sql, &orders_text, &symbols_text, name);
        queries.extend(engine.execute(&sql).await?);
    }

    let generator = tokio::spawn(generate(orders, fills, options.rate, options.malformed));
    let started = Instant::now();
    let result = loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = signals.recv() => break Ok(()),
        }
        // A query stopped from the web UI is not an error; one that failed is.
        if let Some(q) = queries.iter().find(|q| q.exception().is_some()) {
            break q.await_termination().await;
        }
        let view = render(
            &engine,
            &queries,
            &dir_text,
            url.as_deref(),
            malformed.load(Ordering::Relaxed),
            started,
        )
        .await?;
        let clear = if options.clear { "\x1b[2J\x1b[H" } else { "" };
        // Nobody sees the dashboard any more: the demo is over.
        if !show(&format!("{clear}{view}")) {
            break Ok(());
        }
        if options.duration.is_some_and(|d| started.elapsed() >= d) {
            break Ok(());
        }
    };
    generator.abort();
    signals.stop(&engine).await?;
    if created {
        let _ = std::fs::remove_dir_all(&dir);
    }
    show(&format!("demo stopped after {:.0?}", started.elapsed()));
    result
}

/// Writes one file of `rate` orders per second into `dir`, stamped with the
/// current time, and one of the fills that fell due into `fills_dir`.
async fn generate(dir: PathBuf, fills_dir: PathBuf, rate: usize, malformed: f64) -> Result<()> {
    let seed = Utc::now().timestamp() as u64;
    let mut orders = OrderGenerator::new(GeneratorConfig {
        malformed,
        seed,
        ..GeneratorConfig::default()
    });
    let mut fills = FillGenerator::new(FillConfig {
        seed,
        ..FillConfig::default()
    });
    // A demo run on a --dir an earlier one wrote into must add files, not
    // replace ones a checkpointed query has read.
    let prefix = run_prefix();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    for n in 0u64.. {
        tick.tick().await;
        let now = Utc::now().naive_utc();
        let mut text = String::with_capacity(rate * 48);
        for _ in 0..rate {
            let (line, order) = orders.next_order(now);
            text.push_str(&line);
            text.push('\n');
            if let Some(order) = order {
                fills.add(&order);
            }
        }
        write_atomically(
            &dir,
            &format!("orders-{prefix}-{n:06}.csv"),
            text.as_bytes(),
        )?;
        let due = fills.due(now);
        if !due.is_empty() {
            let text = due.join("\n") + "\n";
            write_atomically(
                &fills_dir,
                &format!("fills-{prefix}-{n:06}.csv"),
                text.as_bytes(),
            )?;
        }
    }
    Ok(())
}

async fn render(
    engine: &Engine,
    queries: &[Arc<StreamingQuery>],
    dir: &str,
    url: Option<&str>,
    malformed: u64,
    started: Instant,
) -> Result<String> {
    let table = |rows| pretty_format_batches(rows).map(|t| t.to_string());
    let mut out = String::new();
    let _ = writeln!(
        out,
        "brook demo: orders and fills into {dir}  ({:.0?} running, {malformed} malformed lines dropped; Ctrl-C stops)",
        started.elapsed()
    );
    match url {
        Some(url) => {
            let _ = writeln!(out, "web dashboard and monitor: {url}\n");
        }
        None => out.push('\n'),
    }
    let per_second = engine
        .sql("SELECT second, buys, sells FROM buy_sell_per_second ORDER BY second DESC LIMIT 10")
        .await?;
    if per_second.iter().all(|b| b.num_rows() == 0) {
        let _ = writeln!(
            out,
            "Buy and sell orders per second: waiting for the first second to close (about 6 s)\n"
        );
    } else {
        let _ = writeln!(
            out,
            "Buy and sell orders per second (latest closed seconds)\n{}\n",
            table(&per_second)?
        );
    }
    let clients = engine
        .sql("SELECT client_id, round(traded, 2) AS traded FROM top_clients ORDER BY traded DESC, client_id")
        .await?;
    let _ = writeln!(
        out,
        "Top 5 clients by traded amount (all time)\n{}\n",
        table(&clients)?
    );
    let stocks = engine
        .sql(
            "SELECT window_end, symbol, shares FROM top_stocks \
             WHERE window_end = (SELECT max(window_end) FROM top_stocks) ORDER BY rank",
        )
        .await?;
    if stocks.iter().all(|b| b.num_rows() == 0) {
        let _ = writeln!(
            out,
            "Top 5 stocks by shares, last hour: waiting for the first window to close (about 15 s)\n"
        );
    } else {
        let _ = writeln!(
            out,
            "Top 5 stocks by shares traded in the last hour\n{}\n",
            table(&stocks)?
        );
    }
    // Update mode adds a minute's counts again each batch, growing: the largest are the latest.
    let sectors = engine
        .sql(
            "SELECT sector, max(orders) AS orders, max(shares) AS shares \
             FROM volume_per_sector WHERE minute = (SELECT max(minute) FROM volume_per_sector) \
             GROUP BY sector ORDER BY shares DESC, sector",
        )
        .await?;
    if sectors.iter().any(|b| b.num_rows() > 0) {
        let _ = writeln!(
            out,
            "Orders and shares per sector, this minute so far\n{}\n",
            table(&sectors)?
        );
    }
    let _ = writeln!(
        out,
        "{:<22} {:>7} {:>12} {:>14} {:>10} {:>12}",
        "query", "batch", "input rows", "rows/s", "batch ms", "state rows"
    );
    for q in queries {
        if let Some(p) = q.last_progress() {
            let state: u64 = p.state_operators.iter().map(|s| s.num_rows_total).sum();
            let _ = writeln!(
                out,
                "{:<22} {:>7} {:>12} {:>14.0} {:>10.1} {:>12}",
                q.name(),
                p.batch_id,
                p.num_input_rows,
                p.processed_rows_per_second,
                p.duration_ms.get("total").copied().unwrap_or_default(),
                state
            );
        }
    }
    Ok(out)
}
