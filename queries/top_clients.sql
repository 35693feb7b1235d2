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

-- The top 5 clients by traded amount (amount x price) over all time.
CREATE EXTERNAL TABLE top_clients STORED AS CONSOLE LOCATION 'stdout'
    OPTIONS ('outputMode' 'complete');
INSERT INTO top_clients
SELECT client_id, sum(amount * price) AS traded
FROM orders
GROUP BY client_id
ORDER BY traded DESC, client_id
LIMIT 5;
