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

-- The top 5 stocks by shares traded in the last hour: sliding one-hour windows
-- every 10 seconds; each window is ranked once, when the watermark closes it.
CREATE EXTERNAL TABLE top_stocks STORED AS CONSOLE LOCATION 'stdout'
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
