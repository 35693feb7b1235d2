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
CREATE EXTERNAL TABLE buy_sell_per_second STORED AS CONSOLE LOCATION 'stdout'
    OPTIONS ('outputMode' 'append');
INSERT INTO buy_sell_per_second
SELECT window.start AS second,
       count(*) FILTER (WHERE buy_sell = 'B') AS buys,
       count(*) FILTER (WHERE buy_sell = 'S') AS sells
FROM orders
GROUP BY window(time, '1 second');
