"""Spark's answer for late rows in a backlog, which tests/late_rows.rs expects
of brook on the same files in the same batches.

    /path/to/venv/bin/python benches/spark/late_rows.py

Six CSV files (`time,sym,value`, a 5-second watermark on `time`) are read two
per batch (`maxFilesPerTrigger` 2, the available-now trigger) by four queries:
10-second tumbling windows in append and update mode, 10-second windows
sliding by 5 seconds in append mode, and the distinct (sym, time) pairs.
Spark (3.4 and later) judges a batch's rows late by the watermark the previous
batch ran under and closes state by the current one, so rows that the current
watermark has passed are still counted when the previous one has not.

Prints, per query, each batch's output rows (sorted) and its rows dropped as
late (`numRowsDroppedByWatermark` summed over the state operators).
"""

import json
import os
import tempfile

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

# The same files tests/late_rows.rs writes, in the order they are read.
FILES = [
    ["2026-01-01 00:00:01,a,1", "2026-01-01 00:00:12,a,2"],
    ["2026-01-01 00:00:31,b,3"],
    ["2026-01-01 00:00:18,a,4", "2026-01-01 00:00:24,b,5", "2026-01-01 00:00:12,a,2"],
    ["2026-01-01 00:00:40,a,6"],
    ["2026-01-01 00:00:27,c,7", "2026-01-01 00:00:08,a,8", "2026-01-01 00:00:09,a,9"],
    ["2026-01-01 00:00:50,b,10"],
]


def write_files(directory):
    for i, lines in enumerate(FILES):
        path = os.path.join(directory, f"file-{i + 1:04}.csv")
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        # The source orders files by modification time, then name.
        os.utime(path, (1_700_000_000 + i, 1_700_000_000 + i))


def fmt(value):
    if hasattr(value, "strftime"):
        return value.strftime("%H:%M:%S")
    return value


def run(spark, name, frame, mode, work):
    batches = {}

    def keep(df, batch_id):
        rows = [[fmt(v) for v in r] for r in df.collect()]
        batches[batch_id] = sorted(rows, key=lambda r: [str(v) for v in r])

    query = (frame.writeStream.outputMode(mode).foreachBatch(keep)
             .option("checkpointLocation", os.path.join(work, name))
             .trigger(availableNow=True).start())
    query.awaitTermination()
    late = {}
    for p in query.recentProgress:
        late[p["batchId"]] = sum(op.get("numRowsDroppedByWatermark", 0)
                                 for op in p.get("stateOperators", []))
    return {
        "batches": [{"batch": b, "rows": batches.get(b, []), "late": late.get(b, 0)}
                    for b in sorted(set(batches) | set(late))],
    }


def main():
    spark = (SparkSession.builder.master("local[2]").appName("brook-late-rows")
             .config("spark.sql.shuffle.partitions", "2")
             .config("spark.ui.enabled", "false")
             .config("spark.sql.session.timeZone", "UTC")
             .config("spark.ui.showConsoleProgress", "false")
             .getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    with tempfile.TemporaryDirectory() as work:
        source = os.path.join(work, "in")
        os.mkdir(source)
        write_files(source)

        def rows():
            return (spark.readStream.schema("time TIMESTAMP, sym STRING, value INT")
                    .option("maxFilesPerTrigger", 2).csv(source)
                    .withWatermark("time", "5 seconds"))

        def windowed(*spec):
            return (rows().groupBy(F.window("time", *spec), "sym")
                    .agg(F.count("*").alias("n"), F.sum("value").alias("total"))
                    .select("window.start", "window.end", "sym", "n", "total"))

        out = {
            "tumbling_append": run(spark, "ta", windowed("10 seconds"), "append", work),
            "tumbling_update": run(spark, "tu", windowed("10 seconds"), "update", work),
            "sliding_append": run(spark, "sa", windowed("10 seconds", "5 seconds"), "append",
                                  work),
            "distinct": run(spark, "d", rows().select("sym", "time").dropDuplicates(), "append",
                            work),
        }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
