"""The brokerage dashboard's three queries in Spark Structured Streaming, for
comparison with brook on the same files and machine (see benches/README.md).

    pip install pyspark==4.0.1          # needs Java 17 or later
    python3 benches/spark/dashboard.py target/bench-data/book [--files-per-trigger N] [--runs 3]

Reads every CSV file in the directory with the available-now trigger,
checkpointing into a fresh directory, the per-second counts and the hourly
top stocks appended to Parquet, the top clients to the memory sink; prints
the wall time of each run and the median, in orders per second.
"""

import argparse
import os
import statistics
import tempfile
import time

from pyspark.sql import SparkSession
from pyspark.sql import functions as F
from pyspark.sql.window import Window

SCHEMA = ("time TIMESTAMP, order_id LONG, client_id LONG, symbol STRING, "
          "amount INT, price DOUBLE, buy_sell STRING")


def top_stocks_batch(out):
    """Ranks each closed one-hour window's stocks in foreachBatch, since Spark
    rejects row_number() over a stream (brook runs it in the query itself)."""
    def write(df, _batch_id):
        rank = Window.partitionBy("window_end").orderBy(F.desc("shares"), "symbol")
        (df.withColumn("rank", F.row_number().over(rank))
           .where("rank <= 5")
           .write.mode("append").parquet(out))
    return write


def run(spark, source, files_per_trigger, work):
    reader = spark.readStream.schema(SCHEMA).option("mode", "DROPMALFORMED")
    if files_per_trigger:
        reader = reader.option("maxFilesPerTrigger", files_per_trigger)
    orders = (reader.csv(source)
              .withWatermark("time", "5 seconds"))

    per_second = (orders.groupBy(F.window("time", "1 second"))
                  .agg(F.count(F.when(F.col("buy_sell") == "B", 1)).alias("buys"),
                       F.count(F.when(F.col("buy_sell") == "S", 1)).alias("sells"))
                  .select(F.col("window.start").alias("second"), "buys", "sells"))
    clients = (orders.groupBy("client_id")
               .agg(F.sum(F.col("amount") * F.col("price")).alias("traded")))
    stocks = (orders.groupBy(F.window("time", "1 hour", "10 seconds"), "symbol")
              .agg(F.sum("amount").alias("shares"))
              .select(F.col("window.end").alias("window_end"), "symbol", "shares"))

    queries = [
        per_second.writeStream.format("parquet").outputMode("append")
        .option("path", os.path.join(work, "out/buy_sell_per_second"))
        .option("checkpointLocation", os.path.join(work, "ckpt/buy_sell_per_second"))
        .trigger(availableNow=True).start(),
        clients.writeStream.format("memory").queryName("top_clients").outputMode("complete")
        .option("checkpointLocation", os.path.join(work, "ckpt/top_clients"))
        .trigger(availableNow=True).start(),
        stocks.writeStream.outputMode("append")
        .foreachBatch(top_stocks_batch(os.path.join(work, "out/top_stocks")))
        .option("checkpointLocation", os.path.join(work, "ckpt/top_stocks"))
        .trigger(availableNow=True).start(),
    ]
    for q in queries:
        q.awaitTermination()
    rows = spark.sql("SELECT count(*) FROM top_clients").first()[0]
    spark.catalog.dropTempView("top_clients")
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("source")
    parser.add_argument("--files-per-trigger", type=int, default=0)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    orders = sum(1 for name in os.listdir(args.source) if name.endswith(".csv")
                 for _ in open(os.path.join(args.source, name)))
    spark = (SparkSession.builder.master("local[2]").appName("brook-comparison")
             .config("spark.sql.shuffle.partitions", "2")
             .config("spark.ui.enabled", "false")
             .getOrCreate())
    spark.sparkContext.setLogLevel("WARN")
    times = []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory() as work:
            started = time.perf_counter()
            clients = run(spark, os.path.abspath(args.source), args.files_per_trigger, work)
            elapsed = time.perf_counter() - started
        times.append(elapsed)
        print(f"run {i + 1}: {elapsed:.2f} s, {orders / elapsed:,.0f} orders/s ({clients} clients)")
    best = statistics.median(times)
    print(f"median: {best:.2f} s, {orders / best:,.0f} orders/s")
    spark.stop()


if __name__ == "__main__":
    main()
