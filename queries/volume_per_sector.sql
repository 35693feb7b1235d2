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


-- The symbols table shipped beside this file: symbol, sector, name. A bounded
-- table that queries read is a static (lookup) table, read again when its file changes.
CREATE EXTERNAL TABLE symbols (symbol VARCHAR, sector VARCHAR, name VARCHAR)
    STORED AS CSV LOCATION 'queries/symbols.csv';

-- Orders and shares traded per sector per minute of event time: each batch
-- updates the minutes its orders fell in (a minute is dropped from state once
-- the watermark passes it); orders of symbols the table lacks count under 'Unlisted'.
CREATE EXTERNAL TABLE volume_per_sector STORED AS CONSOLE LOCATION 'stdout'
    OPTIONS ('outputMode' 'update');
INSERT INTO volume_per_sector
SELECT window.start AS minute,
       coalesce(s.sector, 'Unlisted') AS sector,
       count(*) AS orders,
       sum(o.amount) AS shares
FROM orders o LEFT JOIN symbols s ON o.symbol = s.symbol
GROUP BY window(o.time, '1 minute'), coalesce(s.sector, 'Unlisted');
