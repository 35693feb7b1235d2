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

-- Trading sessions per client: a client's orders at most 5 minutes apart
-- are one session, from its first order to 5 minutes after its last. Each
-- session is printed once, when the watermark has passed its end.
CREATE EXTERNAL TABLE client_sessions STORED AS CONSOLE LOCATION 'stdout'
    OPTIONS ('outputMode' 'append');
INSERT INTO client_sessions
SELECT client_id, session_window.start AS session_start, session_window.end AS session_end,
       count(*) AS orders, sum(amount) AS shares
FROM orders
GROUP BY session_window(time, '5 minutes'), client_id;
