-- The dashboard exported as Parquet for BI tools: the per-second counts and
-- the hourly top stocks are appended to Parquet directories under out/ (one
-- part file per batch, listed in out/<table>/_brook_manifest); the all-time
-- top clients, rewritten every batch, are a snapshot per batch under
-- out/top_clients/snapshots, the newest named by out/top_clients/_latest.
-- Run with a checkpoint so that a restart neither loses nor repeats output:
--   brook run queries/dashboard_parquet.sql --checkpoint ckpt

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

-- Buy and sell orders per second of event time, each second emitted once
-- when the watermark (max event time - 5 s) has passed it.
CREATE EXTERNAL TABLE buy_sell_per_second STORED AS PARQUET LOCATION 'out/buy_sell_per_second'
    OPTIONS ('outputMode' 'append');
INSERT INTO buy_sell_per_second
SELECT window.start AS second,
       count(*) FILTER (WHERE buy_sell = 'B') AS buys,
       count(*) FILTER (WHERE buy_sell = 'S') AS sells
FROM orders
GROUP BY window(time, '1 second');

-- The top 5 clients by traded amount (amount x price) over all time.
CREATE EXTERNAL TABLE top_clients STORED AS PARQUET LOCATION 'out/top_clients'
    OPTIONS ('outputMode' 'complete');
INSERT INTO top_clients
SELECT client_id, sum(amount * price) AS traded
FROM orders
GROUP BY client_id
ORDER BY traded DESC, client_id
LIMIT 5;

-- The top 5 stocks by shares traded in the last hour: sliding one-hour windows
-- every 10 seconds; each window is ranked once, when the watermark closes it.
CREATE EXTERNAL TABLE top_stocks STORED AS PARQUET LOCATION 'out/top_stocks'
    OPTIONS ('outputMode' 'append');
INSERT INTO top_stocks
SELECT window_end, symbol, shares, rank
FROM (
    SELECT window.end AS window_end, symbol, sum(amount) AS shares,
           row_number() OVER (PARTITION BY window.end ORDER BY sum(amount) DESC, symbol) AS rank
    FROM orders
    GROUP BY window(time, '1 hour', '10 seconds'), symbol
)
WHERE rank <= 5;
