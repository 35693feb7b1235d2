"""queries/ohlc.sql in Spark Structured Streaming, for comparison on the same
files and machine (see benches/README.md).

    python3 benches/spark/ohlc.py target/bench-data/gen-500000 [--runs 3]

A one-minute candle per symbol (open and close as the price of the minute's
first and last order in event time: Spark's min_by / max_by, brook's
first_value / last_value ORDER BY time; high, low, shares), 5-second
watermark, append mode into Parquet, every CSV file in one batch with the
available-now trigger, local[2]. Each run's high, low and shares per candle
are checked against a recount of the files in plain Python (open and close
are not: orders of the same second tie, and either engine may take either).
"""

import argparse
import datetime
import os
import statistics
import tempfile
import time

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

# The order schema and CSV reading of the join comparison, on the same files.
from joins import ORDERS, TIME_FORMAT, csv_lines


def recount(source):
    """(minute, symbol) -> (high, low, shares) of the minutes the final
    watermark (latest time less 5 s) closed, as append mode emits them."""
    candles = {}
    latest = None
    for f in csv_lines(source):
        try:
            # A malformed line, which DROPMALFORMED drops.
            if len(f) != 7 or f[6] not in ("B", "S"):
                raise ValueError(f)
            at = datetime.datetime.strptime(f[0], TIME_FORMAT)
            price, amount, _, _ = float(f[5]), int(f[4]), int(f[1]), int(f[2])
        except ValueError:
            continue
        latest = at if latest is None or at > latest else latest
        key = (at.replace(second=0), f[3])
        high, low, shares = candles.get(key, (price, price, 0))
        candles[key] = (max(high, price), min(low, price), shares + amount)
    watermark = latest - datetime.timedelta(seconds=5)
    minute = datetime.timedelta(minutes=1)
    return {k: v for k, v in candles.items() if k[0] + minute <= watermark}


def run(spark, source, work):
    orders = (spark.readStream.schema(ORDERS).option("mode", "DROPMALFORMED").csv(source)
              .withWatermark("time", "5 seconds"))
    candles = (orders.groupBy(F.window("time", "1 minute"), "symbol")
               .agg(F.min_by("price", "time").alias("open"), F.max("price").alias("high"),
                    F.min("price").alias("low"), F.max_by("price", "time").alias("close"),
                    F.sum("amount").alias("volume"))
               .select(F.col("window.start").alias("minute"), "symbol", "open", "high",
                       "low", "close", "volume"))
    out = os.path.join(work, "out/candles")
    query = (candles.writeStream.format("parquet").outputMode("append")
             .option("path", out)
             .option("checkpointLocation", os.path.join(work, "ckpt"))
             .trigger(availableNow=True).start())
    query.awaitTermination()
    return out


def main():
    # Event times are read and windowed in UTC, by Spark and by the recount alike.
    os.environ["TZ"] = "UTC"
    time.tzset()
    parser = argparse.ArgumentParser()
    parser.add_argument("source")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    source = os.path.abspath(args.source)
    expected = recount(source)
    rows = sum(1 for _ in csv_lines(source))
    spark = (SparkSession.builder.master("local[2]").appName("brook-comparison")
             .config("spark.sql.shuffle.partitions", "2")
             .config("spark.driver.memory", "4g")
             .config("spark.ui.enabled", "false")
             .config("spark.sql.session.timeZone", "UTC")
             # Parsing only the columns the query reads, Spark would keep lines whose
             # other columns are malformed (an extra field, a bad client id), which
             # DROPMALFORMED drops when the whole line is parsed, as brook does.
             .config("spark.sql.csv.parser.columnPruning.enabled", "false")
             .config("spark.ui.showConsoleProgress", "false")
             .getOrCreate())
    spark.sparkContext.setLogLevel("WARN")
    times = []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory() as work:
            started = time.perf_counter()
            out = run(spark, source, work)
            elapsed = time.perf_counter() - started
            got = {(r.minute, r.symbol): (r.high, r.low, r.volume)
                   for r in spark.read.parquet(out).collect()}
        if got != expected:
            differ = sorted(k for k in set(got) | set(expected) if got.get(k) != expected.get(k))
            raise SystemExit(f"run {i + 1}: {len(differ)} of {len(got)} candles differ from the "
                             f"recount's {len(expected)}, e.g. "
                             f"{[(k, got.get(k), expected.get(k)) for k in differ[:3]]}")
        times.append(elapsed)
        print(f"run {i + 1}: {elapsed:.2f} s, {rows / elapsed:,.0f} orders/s, "
              f"{len(got)} candles (as recounted)")
    best = statistics.median(times)
    print(f"median: {best:.2f} s, {rows / best:,.0f} orders/s")
    spark.stop()


if __name__ == "__main__":
    main()
