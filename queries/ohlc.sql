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

-- A one-minute candle per symbol: the first, highest, lowest and last price
-- of the minute in event time (open, high, low, close) and the shares traded,
-- each candle emitted once, when the watermark closes its minute.
CREATE EXTERNAL TABLE candles STORED AS CONSOLE LOCATION 'stdout'
    OPTIONS ('outputMode' 'append');
INSERT INTO candles
SELECT window.start AS minute, symbol,
       first_value(price ORDER BY time, order_id) AS open,
       max(price) AS high,
       min(price) AS low,
       last_value(price ORDER BY time, order_id) AS close,
       sum(amount) AS volume
FROM orders
GROUP BY window(time, '1 minute'), symbol;
