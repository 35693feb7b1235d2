//! The dashboard's top clients computed on a Ballista cluster, from Rust: an
//! engine built with a cluster reads and aggregates each batch's files on its
//! executors, and keeps the result in a memory table here.
//!
//! ```sh
//! cargo run -- scheduler &
//! cargo run -- executor --scheduler 127.0.0.1:50050 --port 50051 &
//! cargo run -- executor --scheduler 127.0.0.1:50050 --port 50061 &
//! mkdir -p data/orders
//! cargo run -- gen-orders --count 50000 | split -l 5000 - data/orders/part-
//! cargo run --example cluster -- df://127.0.0.1:50050 data/orders
//! ```

use brook::Engine;
use brook::datafusion::arrow::util::pretty::pretty_format_batches;

#[tokio::main]
async fn main() -> brook::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(cluster), Some(orders)) = (args.next(), args.next()) else {
        eprintln!("usage: cluster df://HOST:PORT ORDERS_DIR");
        std::process::exit(2);
    };
    let engine = Engine::builder().cluster(&cluster).build();
    let script = format!(
        "CREATE UNBOUNDED EXTERNAL TABLE orders (
             time TIMESTAMP NOT NULL, order_id BIGINT NOT NULL, client_id BIGINT NOT NULL,
             symbol VARCHAR NOT NULL, amount INT NOT NULL, price DOUBLE NOT NULL,
             buy_sell VARCHAR NOT NULL)
         STORED AS CSV LOCATION '{orders}'
         OPTIONS ('mode' 'DROPMALFORMED', 'maxFilesPerTrigger' '2');
         CREATE EXTERNAL TABLE top_clients STORED AS MEMORY LOCATION ''
             OPTIONS ('outputMode' 'complete');
         INSERT INTO top_clients
         SELECT client_id, sum(amount * price) AS traded, count(*) AS orders
         FROM orders GROUP BY client_id ORDER BY traded DESC, client_id LIMIT 5;"
    );
    // Every file there now, two a batch, each batch a job on the cluster.
    for query in engine.execute(&script).await? {
        query.process_all_available().await?;
        for progress in query.recent_progress() {
            println!(
                "batch {}: {} orders, read on the cluster in {:.1} ms",
                progress.batch_id,
                progress.num_input_rows,
                progress.duration_ms.get("read").copied().unwrap_or(0.0)
            );
        }
    }
    let top = engine.sql("SELECT * FROM top_clients").await?;
    println!("{}", pretty_format_batches(&top)?);
    engine.stop_all().await
}
