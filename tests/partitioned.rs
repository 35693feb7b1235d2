//! Partitioned file sinks (`PARTITIONED BY`, Hive-style directories as Spark
//! writes them) and the Parquet writer options, through `brook run` as users
//! run them, read back by DataFusion, pyarrow, polars and the parquet crate.

mod common;
use common::*;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use brook::datafusion::arrow::datatypes::DataType;
use brook::datafusion::datasource::file_format::parquet::ParquetFormat;
use brook::datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use brook::datafusion::parquet::basic::{Compression, LogicalType, TimeUnit, ZstdLevel};
use brook::datafusion::parquet::file::reader::{FileReader, SerializedFileReader};
use brook::datafusion::prelude::SessionContext;

const SOURCE: &str = "CREATE UNBOUNDED EXTERNAL TABLE orders (time TIMESTAMP NOT NULL, \
    order_id BIGINT, client_id BIGINT, symbol VARCHAR, amount INT, price DOUBLE, buy_sell VARCHAR) \
    STORED AS CSV LOCATION 'in' OPTIONS ('maxFilesPerTrigger' '1');";

const SELECT: &str =
    "SELECT CAST(time AS DATE) AS trade_date, symbol, order_id, amount, time FROM orders";

/// A temp dir holding `in/` with the first two files of orders (two batches),
/// symbols needing escaping and a null symbol among them.
fn orders_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    std::fs::create_dir(&input).unwrap();
    put(
        &input,
        "a.csv",
        &[
            "2016-03-22 20:00:01,1,101,AAPL,10,1.5,B".into(),
            "2016-03-22 20:00:02,2,102,A/B,5,2.0,S".into(),
            "2016-03-22 20:00:03,3,103,,2,3.0,B".into(),
        ],
    );
    put(
        &input,
        "b.csv",
        &[
            "2016-03-23 09:30:00,4,104,x=y,2,3.0,B".into(),
            "2016-03-23 09:30:01,5,105,AAPL,7,3.5,S".into(),
        ],
    );
    dir
}

fn third_file(dir: &Path) {
    put(
        &dir.join("in"),
        "c.csv",
        &["2016-03-23 10:00:00,6,106,A/B,1,1.0,B".into()],
    );
}

/// Every row the test's orders give, as `trade_date|symbol|order_id|amount|time`.
fn expected(with_third: bool) -> Vec<String> {
    let mut rows = vec![
        "2016-03-22|AAPL|1|10|2016-03-22T20:00:01",
        "2016-03-22|A/B|2|5|2016-03-22T20:00:02",
        "2016-03-22|NULL|3|2|2016-03-22T20:00:03",
        "2016-03-23|x=y|4|2|2016-03-23T09:30:00",
        "2016-03-23|AAPL|5|7|2016-03-23T09:30:01",
    ];
    if with_third {
        rows.push("2016-03-23|A/B|6|1|2016-03-23T10:00:00");
    }
    let mut rows: Vec<String> = rows.into_iter().map(String::from).collect();
    rows.sort();
    rows
}

fn write_script(dir: &Path, sink: &str) {
    std::fs::write(
        dir.join("s.sql"),
        format!("{SOURCE}\n{sink}\nINSERT INTO out {SELECT};\n"),
    )
    .unwrap();
}

const PARQUET_SINK: &str = "CREATE EXTERNAL TABLE out STORED AS PARQUET PARTITIONED BY (trade_date, symbol) LOCATION 'out';";

/// Every file below `dir`, relative, sorted; part names without their query tag.
fn tree(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let path = e.unwrap().path();
            if path.is_dir() {
                walk(base, &path, out);
            } else {
                let rel = path
                    .strip_prefix(base)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                out.push(untag(&rel));
            }
        }
    }
    let mut out = vec![];
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// `part-00001-1a2b3c4d.parquet` as `part-00001.parquet`, anywhere in a path.
fn untag(rel: &str) -> String {
    let (head, name) = rel.rsplit_once('/').unwrap_or(("", rel));
    let name = match name.split_once('.') {
        Some((stem, ext)) if stem.starts_with("part-") || head.ends_with("_brook_manifest") => {
            match stem.rsplit_once('-') {
                Some((base, tag)) if tag.len() == 8 => format!("{base}.{ext}"),
                _ => name.to_string(),
            }
        }
        _ => name.to_string(),
    };
    if head.is_empty() {
        name
    } else {
        format!("{head}/{name}")
    }
}

/// The rows of the partitioned Parquet table at `out`, as DataFusion's
/// ListingTable reads it with Hive partitioning.
async fn datafusion_rows(out: &Path) -> Vec<String> {
    let ctx = SessionContext::new();
    let url = ListingTableUrl::parse(format!("{}/", out.display())).unwrap();
    let options = ListingOptions::new(Arc::new(ParquetFormat::default()))
        .with_file_extension(".parquet")
        .with_table_partition_cols(vec![
            ("trade_date".into(), DataType::Date32),
            ("symbol".into(), DataType::Utf8),
        ]);
    let schema = options.infer_schema(&ctx.state(), &url).await.unwrap();
    let config = ListingTableConfig::new(url)
        .with_listing_options(options)
        .with_schema(schema);
    ctx.register_table("t", Arc::new(ListingTable::try_new(config).unwrap()))
        .unwrap();
    // DataFusion reads Spark's null partition as its name.
    let batches = ctx
        .sql(
            "SELECT trade_date, NULLIF(symbol, '__HIVE_DEFAULT_PARTITION__'), order_id, amount, \
             time FROM t",
        )
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let mut rows: Vec<String> = table(&batches).into_iter().map(|r| r.join("|")).collect();
    rows.sort();
    rows
}

/// The rows pyarrow's and polars' Hive-partitioned readers see at `out`.
fn python_rows(out: &Path) -> (Vec<String>, Vec<String>) {
    let script = r#"
import sys, pyarrow.dataset as ds, polars as pl
path = sys.argv[1]
def show(v):
    if v is None: return "NULL"
    return v.isoformat() if hasattr(v, "isoformat") else str(v)
t = ds.dataset(path, format="parquet", partitioning="hive", exclude_invalid_files=True).to_table()
for r in t.to_pylist():
    print("pyarrow " + "|".join(show(r[c]) for c in ["trade_date", "symbol", "order_id", "amount", "time"]))
df = pl.scan_parquet(path + "/**/*.parquet", hive_partitioning=True).collect()
for r in df.iter_rows(named=True):
    print("polars " + "|".join(show(r[c]) for c in ["trade_date", "symbol", "order_id", "amount", "time"]))
"#;
    let out = Command::new(tools::python_readers())
        .args(["-c", script])
        .arg(out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let text = String::from_utf8_lossy(&out.stdout);
    let pick = |who: &str| {
        let mut rows: Vec<String> = text
            .lines()
            .filter_map(|l| l.strip_prefix(who))
            .map(String::from)
            .collect();
        rows.sort();
        rows
    };
    (pick("pyarrow "), pick("polars "))
}

fn manifest(out: &Path, batch: u64) -> serde_json::Value {
    let dir = out.join("_brook_manifest");
    let path = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(&format!("{batch:020}-"))
        })
        .unwrap();
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_parquet_sink_writes_hive_directories_every_reader_reads() {
    let dir = orders_dir();
    write_script(dir.path(), PARQUET_SINK);
    let progress = run_checkpointed(dir.path(), "s.sql");
    assert_eq!(progress.len(), 2, "{progress:?}");
    let out = dir.path().join("out");
    assert_eq!(
        tree(&out),
        [
            "_brook_manifest/00000000000000000000.json",
            "_brook_manifest/00000000000000000001.json",
            "trade_date=2016-03-22/symbol=A%2FB/part-00000.parquet",
            "trade_date=2016-03-22/symbol=AAPL/part-00000.parquet",
            "trade_date=2016-03-22/symbol=__HIVE_DEFAULT_PARTITION__/part-00000.parquet",
            "trade_date=2016-03-23/symbol=AAPL/part-00001.parquet",
            "trade_date=2016-03-23/symbol=x%3Dy/part-00001.parquet",
        ]
    );
    // The manifest lists each file by its path in the table, with its rows and bytes.
    let entry = manifest(&out, 1);
    let files = entry["files"].as_array().unwrap();
    assert_eq!(files.len(), 2, "{entry}");
    for f in files {
        let path = out.join(f["path"].as_str().unwrap());
        assert_eq!(
            f["bytes"],
            std::fs::metadata(&path).unwrap().len(),
            "{entry}"
        );
        assert_eq!(f["rows"], 1, "{entry}");
    }
    // The partition columns are in the directory names only.
    let file = std::fs::read_dir(out.join("trade_date=2016-03-22/symbol=AAPL"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let reader = SerializedFileReader::new(std::fs::File::open(file).unwrap()).unwrap();
    let columns: Vec<String> = reader
        .metadata()
        .file_metadata()
        .schema_descr()
        .columns()
        .iter()
        .map(|c| c.name().to_string())
        .collect();
    assert_eq!(columns, ["order_id", "amount", "time"]);

    // A restart from the checkpoint adds a batch beside the others.
    third_file(dir.path());
    let progress = run_checkpointed(dir.path(), "s.sql");
    assert_eq!(progress.len(), 1, "{progress:?}");
    assert!(tree(&out).contains(&"trade_date=2016-03-23/symbol=A%2FB/part-00002.parquet".into()));
    assert_eq!(datafusion_rows(&out).await, expected(true));

    // An uninterrupted run over the same input reads the same.
    let again = orders_dir();
    third_file(again.path());
    write_script(again.path(), PARQUET_SINK);
    run_checkpointed(again.path(), "s.sql");
    assert_eq!(
        datafusion_rows(&again.path().join("out")).await,
        expected(true)
    );

    let (pyarrow, polars) = python_rows(&out);
    assert_eq!(pyarrow, expected(true));
    assert_eq!(polars, expected(true));
}

/// `brook run` stopped at `point` of batch 1 (a crash point), then killed.
fn run_until_killed(dir: &Path, point: &str) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_brook"))
        .args([
            "run",
            "s.sql",
            "--checkpoint",
            "checkpoint",
            "--trigger",
            "available-now",
        ])
        .env(brook::testing::faults::ENV, format!("out/{point}:1"))
        .current_dir(dir)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let mut seen = vec![];
    for line in stderr.lines() {
        let line = line.unwrap();
        if line.contains("brook: paused at") {
            break;
        }
        seen.push(line);
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success(), "not paused: {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_rerun_after_a_crash_leaves_no_duplicate_in_any_partition() {
    for point in ["sink-part", "sink-manifest-tmp"] {
        let dir = orders_dir();
        write_script(dir.path(), PARQUET_SINK);
        run_until_killed(dir.path(), point);
        run_checkpointed(dir.path(), "s.sql");
        let out = dir.path().join("out");
        assert_eq!(datafusion_rows(&out).await, expected(false), "{point}");
        let parts = tree(&out)
            .into_iter()
            .filter(|p| p.ends_with(".parquet"))
            .count();
        assert_eq!(parts, 5, "{point}: {:?}", tree(&out));
    }
}

#[test]
fn csv_and_json_sinks_are_partitioned_too() {
    for (format, ext) in [("CSV", "csv"), ("JSON", "json")] {
        let dir = orders_dir();
        write_script(
            dir.path(),
            &format!(
                "CREATE EXTERNAL TABLE out STORED AS {format} PARTITIONED BY (symbol) LOCATION 'out';"
            ),
        );
        run_checkpointed(dir.path(), "s.sql");
        let out = dir.path().join("out");
        let files: Vec<String> = tree(&out)
            .into_iter()
            .filter(|p| !p.starts_with("_brook"))
            .collect();
        assert_eq!(
            files,
            [
                format!("symbol=A%2FB/part-00000.{ext}"),
                format!("symbol=AAPL/part-00000.{ext}"),
                format!("symbol=AAPL/part-00001.{ext}"),
                format!("symbol=__HIVE_DEFAULT_PARTITION__/part-00000.{ext}"),
                format!("symbol=x%3Dy/part-00001.{ext}"),
            ]
        );
        let aapl = std::fs::read_dir(out.join("symbol=AAPL"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .min()
            .unwrap();
        let text = std::fs::read_to_string(aapl).unwrap();
        let expected = match format {
            "CSV" => "trade_date,order_id,amount,time\n2016-03-22,1,10,2016-03-22T20:00:01\n",
            _ => {
                "{\"trade_date\":\"2016-03-22\",\"order_id\":1,\"amount\":10,\"time\":\"2016-03-22T20:00:01\"}\n"
            }
        };
        assert_eq!(text, expected, "{format}");
    }
}

/// The Parquet file of batch 0 a sink with `options` writes (one partition).
fn parquet_written_with(options: &str) -> SerializedFileReader<std::fs::File> {
    let dir = orders_dir();
    write_script(
        dir.path(),
        &format!("CREATE EXTERNAL TABLE out STORED AS PARQUET LOCATION 'out' OPTIONS ({options});"),
    );
    run_checkpointed(dir.path(), "s.sql");
    let file = std::fs::read_dir(dir.path().join("out"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
        .min()
        .unwrap();
    SerializedFileReader::new(std::fs::File::open(file).unwrap()).unwrap()
}

/// The unit of the Parquet logical type of column `time`, which Spark reads.
fn time_unit(reader: &SerializedFileReader<std::fs::File>) -> Option<TimeUnit> {
    let schema = reader.metadata().file_metadata().schema_descr();
    let time = schema
        .columns()
        .iter()
        .find(|c| c.name() == "time")
        .unwrap();
    match time.logical_type_ref() {
        Some(LogicalType::Timestamp(t)) => Some(t.unit),
        _ => None,
    }
}

#[test]
fn parquet_writer_options_take_effect() {
    // Without options: zstd, dictionaries, page statistics, microsecond timestamps
    // (Spark 4 refuses nanoseconds).
    let plain = parquet_written_with("'outputMode' 'append'");
    let chunk = plain.metadata().row_group(0).column(0);
    assert_eq!(chunk.compression(), Compression::ZSTD(ZstdLevel::default()));
    assert!(chunk.dictionary_page_offset().is_some());
    assert!(chunk.statistics().is_some());
    assert!(chunk.bloom_filter_offset().is_none());
    assert_eq!(time_unit(&plain), Some(TimeUnit::MICROS));

    let tuned = parquet_written_with(
        "'compression' 'gzip(9)', 'rowGroupSize' '2', 'dictionary' 'false', \
         'statistics' 'none', 'bloomFilterColumns' 'symbol', 'bloomFilterFpp' '0.01', \
         'outputTimestampType' 'TIMESTAMP_NANOS'",
    );
    let meta = tuned.metadata();
    let rows: Vec<i64> = meta.row_groups().iter().map(|g| g.num_rows()).collect();
    assert_eq!(rows, [2, 1]);
    let columns = meta.row_group(0).columns();
    for c in columns {
        assert!(
            matches!(c.compression(), Compression::GZIP(_)),
            "{}",
            c.column_path()
        );
        assert!(c.dictionary_page_offset().is_none(), "{}", c.column_path());
        assert!(c.statistics().is_none(), "{}", c.column_path());
        let bloom = c.column_path().string() == "symbol";
        assert_eq!(
            c.bloom_filter_offset().is_some(),
            bloom,
            "{}",
            c.column_path()
        );
    }
    assert_eq!(time_unit(&tuned), Some(TimeUnit::NANOS));

    let snappy =
        parquet_written_with("'compression' 'snappy', 'outputTimestampType' 'TIMESTAMP_MILLIS'");
    assert_eq!(
        snappy.metadata().row_group(0).column(0).compression(),
        Compression::SNAPPY
    );
    assert_eq!(time_unit(&snappy), Some(TimeUnit::MILLIS));
}

#[test]
fn bad_sink_options_and_partitions_are_refused_with_their_reason() {
    let cases = [
        (
            "CREATE EXTERNAL TABLE out STORED AS PARQUET LOCATION 'out' OPTIONS ('compression' 'zip');",
            "option 'compression': unknown codec; expected one of zstd, zstd(1..22), snappy, gzip, \
             gzip(0..10), lz4 (lz4_raw), brotli, brotli(0..11), none or uncompressed, found 'zip'",
        ),
        (
            "CREATE EXTERNAL TABLE out STORED AS PARQUET LOCATION 'out' OPTIONS ('compression' 'zstd(30)');",
            "option 'compression': level 30 is out of range for zstd",
        ),
        (
            "CREATE EXTERNAL TABLE out STORED AS PARQUET LOCATION 'out' OPTIONS ('rowGroupSize' 'many');",
            "option 'rowGroupSize': expected a positive count, found 'many'",
        ),
        (
            "CREATE EXTERNAL TABLE out STORED AS PARQUET LOCATION 'out' OPTIONS ('statistics' 'all');",
            "option 'statistics': expected none, chunk or page, found 'all'",
        ),
        (
            "CREATE EXTERNAL TABLE out STORED AS PARQUET LOCATION 'out' OPTIONS ('outputTimestampType' 'INT96');",
            "option 'outputTimestampType': expected TIMESTAMP_MICROS, TIMESTAMP_MILLIS or \
             TIMESTAMP_NANOS, found 'INT96'",
        ),
        (
            "CREATE EXTERNAL TABLE out STORED AS PARQUET LOCATION 'out' OPTIONS ('bloomFilterColumns' 'nosuch');",
            "option 'bloomFilterColumns': 'nosuch' is not a column of the files written; their \
             columns: trade_date, symbol, order_id, amount, time",
        ),
        (
            "CREATE EXTERNAL TABLE out STORED AS CSV LOCATION 'out' OPTIONS ('compression' 'zstd');",
            "option 'compression': a Parquet writer option, but sink table 'out' is STORED AS CSV",
        ),
        (
            "CREATE EXTERNAL TABLE out STORED AS JSON LOCATION 'out' OPTIONS ('rowGroupSize' '10');",
            "option 'rowGroupSize': a Parquet writer option, but sink table 'out' is STORED AS JSON",
        ),
        (
            "CREATE EXTERNAL TABLE out STORED AS PARQUET PARTITIONED BY (day) LOCATION 'out';",
            "PARTITIONED BY column 'day' is not an output column of the query; its columns: \
             trade_date, symbol, order_id, amount, time",
        ),
    ];
    for (sink, message) in cases {
        let dir = orders_dir();
        write_script(dir.path(), sink);
        let out = Command::new(env!("CARGO_BIN_EXE_brook"))
            .args(["run", "s.sql", "--trigger", "once"])
            .current_dir(dir.path())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{sink}: {stderr}");
        assert!(stderr.contains(message), "{sink}:\n{stderr}");
    }
    // Partitioning by every column leaves the files nothing to hold.
    let dir = orders_dir();
    std::fs::write(
        dir.path().join("s.sql"),
        format!(
            "{SOURCE}\nCREATE EXTERNAL TABLE out STORED AS PARQUET PARTITIONED BY (symbol, order_id) \
             LOCATION 'out';\nINSERT INTO out SELECT symbol, order_id FROM orders;\n"
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_brook"))
        .args(["run", "s.sql", "--trigger", "once"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "PARTITIONED BY names every output column (symbol, order_id): the files would hold \
             no column; leave at least one out"
        ),
        "{stderr}"
    );
}

#[test]
fn timestamp_and_boolean_partitions_are_named_as_spark_names_them() {
    let dir = orders_dir();
    std::fs::write(
        dir.path().join("s.sql"),
        format!(
            "{SOURCE}\nCREATE EXTERNAL TABLE out STORED AS CSV PARTITIONED BY (t, big) LOCATION 'out';\n\
             INSERT INTO out SELECT time + INTERVAL '500' MILLISECOND AS t, amount > 5 AS big, order_id \
             FROM orders WHERE order_id <= 2;\n"
        ),
    )
    .unwrap();
    run_checkpointed(dir.path(), "s.sql");
    let files: Vec<String> = tree(&dir.path().join("out"))
        .into_iter()
        .filter(|p| !p.starts_with("_brook"))
        .collect();
    assert_eq!(
        files,
        [
            "t=2016-03-22 20%3A00%3A01.5/big=true/part-00000.csv",
            "t=2016-03-22 20%3A00%3A02.5/big=false/part-00000.csv",
        ]
    );
}
