-- The dashboard exported as Delta Lake tables, the format BI tools (Spark,
-- Databricks, DuckDB, Polars, Power BI, Trino) open directly. Each batch is
-- one Delta commit carrying the query's id and batch number, so a restart
-- neither loses nor repeats a row; the per-second counts are partitioned by
-- day, the all-time top clients are overwritten whole in each commit, small
-- files are compacted every 20 batches (a Delta commit costs more the more
-- files the table has), and files the tables stopped using an hour ago are
-- deleted (VACUUM). Run with a checkpoint:
--   brook run queries/dashboard_delta.sql --checkpoint ckpt
-- and read, e.g. in Python: deltalake.DeltaTable('out/delta/top_clients').to_pandas()

-- The order stream: CSV files dropped into data/orders (see `brook send`).
CREATE UNBOUNDED EXTERNAL TABLE orders (
    time      TIMESTAMP NOT NULL,
    order_id  BIGINT    NOT NULL,
    client_id BIGINT    NOT NULL,
    symbol    VARCHAR   NOT NULL,
    amount    INT       NOT NULL,
    price     DOUBLE    NOT NULL,
    buy_sell  VARCHAR   NOT NULL,
    WATERMARK FOR time AS time - INTERVAL '5' SECOND
) STORED AS CSV LOCATION 'data/orders' OPTIONS ('mode' 'DROPMALFORMED');

-- Buy and sell orders per second of event time, appended once each second
-- has closed, in one directory per trading day.
CREATE EXTERNAL TABLE buy_sell_per_second STORED AS DELTA
    PARTITIONED BY (trade_date)
    LOCATION 'out/delta/buy_sell_per_second'
    OPTIONS ('outputMode' 'append', 'compactEvery' '20', 'vacuumRetention' '1 hour');
INSERT INTO buy_sell_per_second
SELECT CAST(window.start AS DATE) AS trade_date,
       window.start AS second,
       count(*) FILTER (WHERE buy_sell = 'B') AS buys,
       count(*) FILTER (WHERE buy_sell = 'S') AS sells
FROM orders
GROUP BY window(time, '1 second');

-- The top 5 clients by traded amount (amount x price) over all time: each
-- batch overwrites the table in one commit, so readers always see a whole top 5.
CREATE EXTERNAL TABLE top_clients STORED AS DELTA LOCATION 'out/delta/top_clients'
    OPTIONS ('outputMode' 'complete', 'vacuumRetention' '1 hour');
INSERT INTO top_clients
SELECT client_id, sum(amount * price) AS traded
FROM orders
GROUP BY client_id
ORDER BY traded DESC, client_id
LIMIT 5;

-- The top 5 stocks by shares traded in the last hour: sliding one-hour windows
-- every 10 seconds; each window is ranked once, when the watermark closes it.
CREATE EXTERNAL TABLE top_stocks STORED AS DELTA LOCATION 'out/delta/top_stocks'
    OPTIONS ('outputMode' 'append', 'compactEvery' '20', 'vacuumRetention' '1 hour');
INSERT INTO top_stocks
SELECT window_end, symbol, shares, rank
FROM (
    SELECT window.end AS window_end, symbol, sum(amount) AS shares,
           row_number() OVER (PARTITION BY window.end ORDER BY sum(amount) DESC, symbol) AS rank
    FROM orders
    GROUP BY window(time, '1 hour', '10 seconds'), symbol
)
WHERE rank <= 5;
