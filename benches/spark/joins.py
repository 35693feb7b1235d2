"""brook's join benchmarks in Spark Structured Streaming, for comparison on the
same files and machine (see benches/README.md).

    python3 benches/spark/joins.py sector target/bench-data/book [--runs 3]
    python3 benches/spark/joins.py interval target/bench-data/fills-bench \
        [--files-per-trigger 1] [--runs 3]

sector: the orders joined with queries/symbols.csv (a static table), orders
and shares per sector per minute in update mode, as queries/volume_per_sector.sql.

interval: orders joined with their fills (DIR/orders, DIR/fills, as `brook
gen-orders --fills` makes them), a fill within a minute of its order, both
streams with a 10-second watermark, appended to Parquet; prints the output
rows, input rows per second and the rows in state after the last batch (after
each batch too with --files-per-trigger).

Both read every CSV file with the available-now trigger, checkpointing into a
fresh directory, in local[2]; each run's answer is checked against a recount
of the files in plain Python.
"""

import argparse
import collections
import datetime
import os
import statistics
import tempfile
import time

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

ORDERS = ("time TIMESTAMP, order_id LONG, client_id LONG, symbol STRING, "
          "amount INT, price DOUBLE, buy_sell STRING")
FILLS = "time TIMESTAMP, fill_id LONG, order_id LONG, quantity INT, price DOUBLE"
SYMBOLS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../queries/symbols.csv")
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"


def csv_lines(directory):
    """The split fields of every line of the CSV files in `directory`."""
    for name in sorted(os.listdir(directory)):
        if name.endswith(".csv"):
            with open(os.path.join(directory, name)) as f:
                for line in f:
                    yield line.rstrip("\n").split(",")


def parse_time(text):
    return datetime.datetime.strptime(text, TIME_FORMAT)


def stream(spark, schema, source, files_per_trigger, watermark):
    reader = spark.readStream.schema(schema).option("mode", "DROPMALFORMED")
    if files_per_trigger:
        reader = reader.option("maxFilesPerTrigger", files_per_trigger)
    return reader.csv(source).withWatermark("time", watermark)


def sector_recount(source):
    """(minute, sector) -> (orders, shares), as the query computes them."""
    sectors = {}
    with open(SYMBOLS) as f:
        next(f)
        for line in f:
            symbol, sector = line.split(",")[:2]
            sectors[symbol] = sector
    counts = collections.defaultdict(lambda: [0, 0])
    for f in csv_lines(source):
        try:
            minute, amount = parse_time(f[0]).replace(second=0), int(f[4])
        except (ValueError, IndexError):
            continue  # a malformed line, which DROPMALFORMED drops
        key = (minute, sectors.get(f[3], "Unlisted"))
        counts[key][0] += 1
        counts[key][1] += amount
    return {k: tuple(v) for k, v in counts.items()}


def run_sector(spark, source, files_per_trigger, work):
    orders = stream(spark, ORDERS, source, files_per_trigger, "5 seconds")
    symbols = spark.read.option("header", True).schema(
        "symbol STRING, sector STRING, name STRING").csv(SYMBOLS)
    volume = (orders.join(symbols, "symbol", "left")
              .groupBy(F.window("time", "1 minute"),
                       F.coalesce("sector", F.lit("Unlisted")).alias("sector"))
              .agg(F.count(F.lit(1)).alias("orders"), F.sum("amount").alias("shares"))
              .select(F.col("window.start").alias("minute"), "sector", "orders", "shares"))
    latest = {}

    def keep(df, _batch_id):
        # Update mode: each batch gives the new counts of the minutes it touched.
        for r in df.collect():
            latest[(r.minute, r.sector)] = (r.orders, r.shares)

    query = (volume.writeStream.outputMode("update").foreachBatch(keep)
             .option("checkpointLocation", os.path.join(work, "ckpt"))
             .trigger(availableNow=True).start())
    query.awaitTermination()
    return latest, query


def interval_recount(source):
    """The fills at most a minute after their order: the inner join's rows."""
    ordered = {f[1]: parse_time(f[0]) for f in csv_lines(os.path.join(source, "orders"))
               if len(f) == 7}
    minute = datetime.timedelta(minutes=1)
    in_time = 0
    for f in csv_lines(os.path.join(source, "fills")):
        at = ordered.get(f[2]) if len(f) == 5 else None
        if at is not None and at <= parse_time(f[0]) <= at + minute:
            in_time += 1
    return in_time


def run_interval(spark, source, files_per_trigger, work):
    orders = stream(spark, ORDERS, os.path.join(source, "orders"), files_per_trigger,
                    "10 seconds").alias("o")
    fills = stream(spark, FILLS, os.path.join(source, "fills"), files_per_trigger,
                   "10 seconds").alias("f")
    joined = (orders.join(fills, F.expr(
        "o.order_id = f.order_id AND f.time BETWEEN o.time AND o.time + INTERVAL 1 MINUTE"))
        .select("o.order_id", "o.symbol", F.col("o.time").alias("ordered"),
                F.col("f.time").alias("filled"), "f.quantity", "f.price"))
    out = os.path.join(work, "out/filled")
    query = (joined.writeStream.format("parquet").outputMode("append")
             .option("path", out)
             .option("checkpointLocation", os.path.join(work, "ckpt"))
             .trigger(availableNow=True).start())
    query.awaitTermination()
    return out, query


def state_rows(progress):
    return sum(op["numRowsTotal"] for op in progress["stateOperators"])


def main():
    # Event times are read and windowed in UTC, by Spark and by the recount alike.
    os.environ["TZ"] = "UTC"
    time.tzset()
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=["sector", "interval"])
    parser.add_argument("source")
    parser.add_argument("--files-per-trigger", type=int, default=0)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    source = os.path.abspath(args.source)
    if args.scenario == "sector":
        expected = sector_recount(source)
        rows = sum(1 for _ in csv_lines(source))
    else:
        expected = interval_recount(source)
        rows = sum(1 for _ in csv_lines(os.path.join(source, "orders"))) \
            + sum(1 for _ in csv_lines(os.path.join(source, "fills")))
    spark = (SparkSession.builder.master("local[2]").appName("brook-comparison")
             .config("spark.sql.shuffle.partitions", "2")
             # The default 1 GB heap ran out on the third interval run of one session.
             .config("spark.driver.memory", "4g")
             .config("spark.ui.enabled", "false")
             .config("spark.sql.session.timeZone", "UTC")
             .config("spark.ui.showConsoleProgress", "false")
             .getOrCreate())
    spark.sparkContext.setLogLevel("WARN")
    times = []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory() as work:
            started = time.perf_counter()
            if args.scenario == "sector":
                latest, query = run_sector(spark, source, args.files_per_trigger, work)
                elapsed = time.perf_counter() - started
                answer = f"{len(latest)} (minute, sector) rows"
                if latest != expected:
                    raise SystemExit(f"run {i + 1}: the sector counts differ from the recount: "
                                     f"{sorted(latest.items())[:5]} against "
                                     f"{sorted(expected.items())[:5]}")
            else:
                out, query = run_interval(spark, source, args.files_per_trigger, work)
                elapsed = time.perf_counter() - started
                output = spark.read.parquet(out).count()
                answer = f"{output} fills in time"
                if output != expected:
                    raise SystemExit(f"run {i + 1}: {output} joined rows, the recount "
                                     f"says {expected}")
            progress = query.recentProgress
            read = sum(p["numInputRows"] for p in progress)
            states = [state_rows(p) for p in progress]
        times.append(elapsed)
        print(f"run {i + 1}: {elapsed:.2f} s, {rows / elapsed:,.0f} input rows/s, {answer} "
              f"(as recounted), {read} rows read in {len(progress)} batches, "
              f"{states[-1] if states else 0} rows in state at the end")
        if args.files_per_trigger:
            print(f"  rows in state after each batch: {states}")
    best = statistics.median(times)
    print(f"median: {best:.2f} s, {rows / best:,.0f} input rows/s")
    spark.stop()


if __name__ == "__main__":
    main()
