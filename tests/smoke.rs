use std::time::Duration;

use brook::Engine;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smoke() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    std::fs::create_dir(&input).unwrap();
    std::fs::write(
        input.join("a.csv"),
        "2016-03-22 20:25:28,1,80,EPE,710,51.00,B\n2016-03-22 20:25:28,2,70,NFLX,1520,143.00,S\nbad line\n2016-03-22 20:25:29,3,80,EPE,10,52.00,B\n",
    )
    .unwrap();
    let engine = Engine::new();
    let script = format!(
        "CREATE UNBOUNDED EXTERNAL TABLE orders (time TIMESTAMP NOT NULL, order_id BIGINT, client_id BIGINT, symbol VARCHAR, amount INT, price DOUBLE, buy_sell VARCHAR,
           WATERMARK FOR time AS time - INTERVAL '1' SECOND)
         STORED AS CSV LOCATION '{}' OPTIONS ('mode' 'DROPMALFORMED');
         CREATE EXTERNAL TABLE per_sec STORED AS MEMORY LOCATION 'per_sec' OPTIONS ('outputMode' 'complete');
         INSERT INTO per_sec SELECT window.start AS second, buy_sell, count(*) AS n, sum(amount * price) AS traded, avg(price) AS p
           FROM orders GROUP BY window(time, '1 second'), buy_sell ORDER BY second, buy_sell;",
        input.display()
    );
    let queries = engine.execute(&script).await.unwrap();
    let q = &queries[0];
    q.process_all_available().await.unwrap();
    let rows = engine.sql("SELECT * FROM per_sec").await.unwrap();
    println!("{}", datafusion::arrow::util::pretty::pretty_format_batches(&rows).unwrap());
    println!("{}", q.last_progress().unwrap().to_json());
    q.stop().await.unwrap();
    let _ = Duration::ZERO;
}
