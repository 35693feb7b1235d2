//! Kill -9 at many points: the dashboard queries, a `SELECT DISTINCT`, a
//! deduplication joined with a static table under a windowed aggregation (two
//! stateful operators), a join of two streams bounded in event time, and counts
//! into a partitioned Parquet sink and a Delta table, run by `brook run`
//! with a checkpoint over 100,000 generated orders, are killed with SIGKILL again and
//! again (inside source reads, state writes, sink writes and commits, and at
//! random instants) and restarted each time. The final sink files and state
//! must equal those of a run that was never interrupted, and the top clients'
//! last snapshot a recount of the input.
//!
//! The seed is `BROOK_CRASH_SEED` (default 7); a failure prints it.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use brook::datafusion::arrow::array::RecordBatch;
use brook::datafusion::arrow::ipc::reader::FileReader;
use brook::datafusion::arrow::util::display::array_value_to_string;
use brook::datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use brook::orders::{GeneratorConfig, OrderGenerator, TIME_FORMAT};
use brook::sink::file::MANIFEST_DIR;
use brook::testing::faults;
use chrono::NaiveDateTime;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const ORDERS: usize = 100_000;
const FILES: usize = 100;
/// Orders per second of event time: 100,000 orders span about 2.8 hours,
/// so hour-long windows close while the stream runs.
const RATE: usize = 10;
/// The dashboard's three queries, a deduplication (`SELECT DISTINCT`, whose
/// seen keys are state like an aggregation's), a windowed aggregation over
/// a deduplication joined with the static symbols table, and a join of the
/// orders with a second source over the same files (each side's rows are state).
/// Then a count per symbol and 10 seconds into a Parquet sink partitioned by
/// symbol, and a count per symbol and minute into a Delta table.
const QUERIES: [&str; 8] = [
    "buy_sell_per_second",
    "top_clients",
    "top_stocks",
    "client_symbols",
    "sector_minutes",
    "follow_ups",
    "symbol_seconds",
    "delta_minutes",
];
const FILE_SINKS: [&str; 6] = [
    "buy_sell_per_second",
    "top_stocks",
    "client_symbols",
    "sector_minutes",
    "follow_ups",
    "symbol_seconds",
];
/// The append-mode query writing a Delta table.
const DELTA_SINK: &str = "delta_minutes";
/// The complete-mode query, whose Parquet sink holds snapshots.
const SNAPSHOT_SINK: &str = "top_clients";
const KILL_ATTEMPTS: usize = 30;
const MIN_KILLS: usize = 20;

/// Writes the orders into `dir`; returns the top 5 clients by traded amount
/// (amount x price) over the well-formed lines, as the dashboard ranks them.
fn write_orders(dir: &Path) -> Vec<(i64, f64)> {
    std::fs::create_dir_all(dir).unwrap();
    let mut traded: BTreeMap<i64, f64> = BTreeMap::new();
    let mut generator = OrderGenerator::new(GeneratorConfig {
        malformed: 0.01,
        ..GeneratorConfig::default()
    });
    let start = NaiveDateTime::parse_from_str("2016-03-22 20:25:28", TIME_FORMAT).unwrap();
    let per_file = ORDERS / FILES;
    for f in 0..FILES {
        let mut text = String::new();
        for i in f * per_file..(f + 1) * per_file {
            let time = start + chrono::Duration::milliseconds((i * 1000 / RATE) as i64);
            let (line, order) = generator.next_order(time);
            if order.is_some() {
                let fields: Vec<&str> = line.split(',').collect();
                let amount: f64 = fields[4].parse().unwrap();
                let price: f64 = fields[5].parse().unwrap();
                *traded.entry(fields[2].parse().unwrap()).or_default() += amount * price;
            }
            text.push_str(&line);
            text.push('\n');
        }
        brook::source::write_atomically(dir, &format!("orders-{f:03}.csv"), text.as_bytes())
            .unwrap();
    }
    let mut top: Vec<(i64, f64)> = traded.into_iter().collect();
    top.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    top.truncate(5);
    top
}

/// `queries/dashboard_parquet.sql` reading `input` four files per batch, its
/// Parquet sinks under `out`.
fn dashboard_sql(input: &Path, out: &Path) -> String {
    let sql = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/queries/dashboard_parquet.sql"
    ))
    .unwrap();
    let source = "LOCATION 'data/orders' OPTIONS ('mode' 'DROPMALFORMED')";
    assert!(sql.contains(source));
    let sinks = "STORED AS PARQUET LOCATION 'out/";
    assert_eq!(sql.matches(sinks).count(), 3);
    let symbols = concat!(env!("CARGO_MANIFEST_DIR"), "/queries/symbols.csv");
    let sql = format!(
        "{sql}\nCREATE EXTERNAL TABLE client_symbols STORED AS PARQUET LOCATION 'out/client_symbols';\n\
         INSERT INTO client_symbols SELECT DISTINCT client_id, symbol FROM orders;\n\
         CREATE EXTERNAL TABLE symbols (symbol VARCHAR, sector VARCHAR, name VARCHAR) \
         STORED AS CSV LOCATION '{symbols}';\n\
         CREATE EXTERNAL TABLE sector_minutes STORED AS PARQUET LOCATION 'out/sector_minutes' OPTIONS ('outputMode' 'append');\n\
         INSERT INTO sector_minutes SELECT window.start AS minute, \
         coalesce(s.sector, 'Unlisted') AS sector, count(*) AS orders, sum(o.amount) AS shares \
         FROM (SELECT DISTINCT order_id, time, symbol, amount FROM orders) o \
         LEFT JOIN symbols s ON o.symbol = s.symbol \
         GROUP BY window(o.time, '1 minute'), coalesce(s.sector, 'Unlisted');\n\
         CREATE UNBOUNDED EXTERNAL TABLE orders_again (time TIMESTAMP NOT NULL, order_id BIGINT NOT NULL, \
         client_id BIGINT NOT NULL, symbol VARCHAR NOT NULL, amount INT NOT NULL, price DOUBLE NOT NULL, \
         buy_sell VARCHAR NOT NULL, WATERMARK FOR time AS time - INTERVAL '5' SECOND) \
         STORED AS CSV {source};\n\
         CREATE EXTERNAL TABLE follow_ups STORED AS PARQUET LOCATION 'out/follow_ups';\n\
         INSERT INTO follow_ups SELECT o.order_id, n.order_id AS next_id, o.client_id \
         FROM orders o JOIN orders_again n ON o.client_id = n.client_id \
         AND n.time > o.time AND n.time <= o.time + INTERVAL '2' SECOND;\n\
         CREATE EXTERNAL TABLE symbol_seconds STORED AS PARQUET PARTITIONED BY (symbol) \
         LOCATION '{out}/symbol_seconds' OPTIONS ('outputMode' 'append');\n\
         INSERT INTO symbol_seconds SELECT window.start AS second, symbol, count(*) AS orders \
         FROM orders GROUP BY window(time, '10 seconds'), symbol;\n\
         CREATE EXTERNAL TABLE delta_minutes STORED AS DELTA LOCATION '{out}/delta_minutes' \
         OPTIONS ('outputMode' 'append');\n\
         INSERT INTO delta_minutes SELECT window.start AS minute, symbol, count(*) AS orders, \
         sum(amount) AS shares FROM orders GROUP BY window(time, '1 minute'), symbol;\n",
        out = out.display()
    );
    sql.replace(
        source,
        &format!(
            "LOCATION '{}' OPTIONS ('mode' 'DROPMALFORMED', 'maxFilesPerTrigger' '4')",
            input.display()
        ),
    )
    .replace(
        sinks,
        &format!("STORED AS PARQUET LOCATION '{}/", out.display()),
    )
}

/// When to kill a run: when it reports reaching one of `points` (`point:batch`,
/// comma-separated), or `after` this long, whichever comes first. A run with a
/// `victim` point is not killed at another point (a backstop) until the victim
/// has had `grace` to reach its own: the queries run side by side, and
/// another's backstop would otherwise often come first.
#[derive(Debug, Clone)]
struct Kill {
    points: String,
    victim: Option<String>,
    after: Option<Duration>,
    grace: Duration,
}

const VICTIM_GRACE: Duration = Duration::from_millis(500);

/// Runs `brook run` to completion, or until `kill` says, then SIGKILLs it.
/// Returns where it was killed (`query/point:batch`, or `after <time>`).
fn run(sql: &Path, checkpoint: &Path, log: &Path, kill: Option<&Kill>) -> Option<String> {
    let mut command = Command::new(env!("CARGO_BIN_EXE_brook"));
    command
        .args(["run", sql.to_str().unwrap(), "--trigger", "available-now"])
        .args(["--checkpoint", checkpoint.to_str().unwrap()])
        .stdout(Stdio::from(std::fs::File::create(log).unwrap()))
        .stderr(Stdio::piped());
    if let Some(kill) = kill {
        command.env(faults::ENV, &kill.points);
    }
    let mut child = command.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (paused_tx, paused) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(at) = line.strip_prefix("brook: paused at ") {
                let _ = paused_tx.send(at.to_string());
            }
            text.push_str(&line);
            text.push('\n');
        }
        text
    });
    let started = Instant::now();
    let victim = kill.and_then(|k| k.victim.clone());
    let mut backstop: Option<(String, Instant)> = None;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let stderr = reader.join().unwrap();
            assert!(status.success(), "brook run failed: {stderr}");
            break None;
        }
        let due = match (paused.try_recv(), kill.and_then(|k| k.after)) {
            (Ok(at), _) if victim.is_none() || victim.as_ref() == Some(&at) => Some(at),
            (Ok(at), _) => {
                backstop.get_or_insert((at, Instant::now()));
                None
            }
            (_, Some(after)) if started.elapsed() >= after => Some(format!("after {after:?}")),
            _ => None,
        };
        let due = due.or_else(|| {
            backstop
                .as_ref()
                .filter(|(_, since)| kill.is_some_and(|k| since.elapsed() >= k.grace))
                .map(|(at, _)| at.clone())
        });
        if due.is_some() {
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            break due;
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "brook run hangs"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn cell_rows(batches: &[RecordBatch]) -> Vec<String> {
    let mut out = vec![];
    for b in batches {
        for r in 0..b.num_rows() {
            let cells: Vec<String> = b
                .columns()
                .iter()
                .map(|c| array_value_to_string(c, r).unwrap())
                .collect();
            out.push(cells.join("|"));
        }
    }
    out.sort();
    out
}

/// The rows of the part files a file sink's manifest lists, checking that every
/// batch has one entry and no part file is left outside the manifest.
fn sink_rows(dir: &Path) -> Vec<String> {
    let manifest_dir = dir.join("_brook_manifest");
    let mut batches = BTreeSet::new();
    let mut listed = BTreeSet::new();
    for entry in std::fs::read_dir(&manifest_dir).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().unwrap().to_string_lossy().starts_with('.') {
            continue; // a write the kill interrupted: hidden, as readers expect
        }
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert!(
            batches.insert(manifest["batch_id"].as_u64().unwrap()),
            "batch listed twice: {}",
            path.display()
        );
        for f in manifest["files"].as_array().unwrap() {
            listed.insert(f["path"].as_str().unwrap().to_string());
        }
    }
    let last = batches.last().copied().unwrap_or(0);
    assert_eq!(batches, (0..=last).collect(), "{}", dir.display());
    let parts = part_files(dir, "");
    assert_eq!(parts, listed, "part files outside the manifest");
    let mut rows = vec![];
    for part in listed {
        let file = std::fs::File::open(dir.join(&part)).unwrap();
        let reader = ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .build()
            .unwrap();
        // A partitioned sink's values are in its directories (`symbol=AAPL/`).
        let partition: String = Path::new(&part)
            .parent()
            .into_iter()
            .flat_map(|p| p.iter())
            .map(|c| format!("|{}", c.to_string_lossy()))
            .collect();
        rows.extend(
            cell_rows(&reader.map(|b| b.unwrap()).collect::<Vec<_>>())
                .into_iter()
                .map(|r| r + &partition),
        );
    }
    rows.sort();
    rows
}

/// The part files below `dir` (in partition directories too), as paths
/// relative to the sink's directory, `prefix` being `dir`'s.
fn part_files(dir: &Path, prefix: &str) -> BTreeSet<String> {
    let mut parts = BTreeSet::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        let rel = format!("{prefix}{name}");
        if name.contains('=') && entry.file_type().unwrap().is_dir() {
            parts.extend(part_files(&entry.path(), &format!("{rel}/")));
        } else if name.starts_with("part-") {
            parts.insert(rel);
        }
    }
    parts
}

/// The rows of the Delta table in `dir` as delta-rs and DataFusion read its
/// current version, checking that its commits carry the batch ids 0, 1, ...
/// each once (one commit a batch), up to `last`.
fn delta_rows(dir: &Path, last: u64) -> Vec<String> {
    let mut versions = vec![];
    let mut logs: Vec<_> = std::fs::read_dir(dir.join("_delta_log"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    logs.sort();
    for log in logs {
        for line in std::fs::read_to_string(&log).unwrap().lines() {
            let action: serde_json::Value = serde_json::from_str(line).unwrap();
            if let Some(v) = action["txn"]["version"].as_u64() {
                versions.push(v);
            }
        }
    }
    assert_eq!(
        versions,
        (0..=last).collect::<Vec<_>>(),
        "{}",
        dir.display()
    );
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let batches = runtime.block_on(async {
        let url = url::Url::from_directory_path(dir).unwrap();
        let table = deltalake::DeltaTableBuilder::from_url(url)
            .unwrap()
            .load()
            .await
            .unwrap();
        let ctx = brook::datafusion::prelude::SessionContext::new();
        table.update_datafusion_session(&ctx.state()).unwrap();
        ctx.register_table("t", table.table_provider().await.unwrap())
            .unwrap();
        ctx.sql("SELECT * FROM t")
            .await
            .unwrap()
            .collect()
            .await
            .unwrap()
    });
    cell_rows(&batches)
}

/// The batch id `_latest` of a complete-mode file sink names, and the rows of
/// its snapshot, checking the snapshot holds as many rows as `_latest` says.
fn snapshot_rows(dir: &Path) -> (u64, Vec<String>) {
    let latest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("_latest")).unwrap()).unwrap();
    let mut rows = vec![];
    for f in latest["files"].as_array().unwrap() {
        let file = std::fs::File::open(dir.join(f["path"].as_str().unwrap())).unwrap();
        let reader = ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .build()
            .unwrap();
        rows.extend(cell_rows(&reader.map(|b| b.unwrap()).collect::<Vec<_>>()));
    }
    assert_eq!(latest["rows"].as_u64().unwrap(), rows.len() as u64);
    (latest["batch_id"].as_u64().unwrap(), rows)
}

/// The body of a checkpoint JSON file (after its `v1 crc32=...` line).
fn checkpoint_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap();
    serde_json::from_str(text.split_once('\n').unwrap().1).unwrap()
}

/// The last committed batch of a query's checkpoint.
fn committed(checkpoint: &Path) -> Option<u64> {
    std::fs::read_dir(checkpoint.join("commits"))
        .ok()?
        .filter_map(|e| e.unwrap().file_name().to_string_lossy().parse::<u64>().ok())
        .max()
}

/// The last committed batch of a query's checkpoint, and its state rows: each
/// operator's snapshot with the changes written since replayed over it, the
/// last change of a group (the leading `k<N>` columns; a join's rows, their
/// `__id`) winning.
fn final_state(checkpoint: &Path) -> (u64, Vec<String>) {
    let last = committed(checkpoint).unwrap();
    let commit = checkpoint_json(&checkpoint.join(format!("commits/{last}")));
    let read = |file: &serde_json::Value| {
        let bytes = std::fs::read(checkpoint.join(file["file"].as_str().unwrap())).unwrap();
        let reader = FileReader::try_new(std::io::Cursor::new(bytes), None).unwrap();
        let keys = reader
            .schema()
            .fields()
            .iter()
            .filter(|f| f.name().starts_with('k') || f.name() == "__id")
            .count();
        let rows = reader.map(|b| b.unwrap()).collect::<Vec<_>>();
        (keys, cell_rows(&rows))
    };
    // Every stateful operator's (sector_minutes has two: its deduplication
    // first; a join one a side).
    let mut rows = vec![];
    for (operator, snapshot) in commit["state"].as_object().unwrap() {
        let (keys, snapshot) = read(snapshot);
        let key = |row: &str| row.split('|').take(keys).collect::<Vec<_>>().join("|");
        let mut state: BTreeMap<String, String> =
            snapshot.into_iter().map(|r| (key(&r), r)).collect();
        let changes = commit["state_deltas"][operator].as_array().cloned();
        for change in changes.unwrap_or_default() {
            for row in read(&change).1 {
                let (cells, deleted) = row.rsplit_once('|').unwrap();
                match deleted {
                    "true" => state.remove(&key(cells)),
                    _ => state.insert(key(cells), cells.to_string()),
                };
            }
        }
        rows.extend(state.into_values().map(|r| format!("{operator}|{r}")));
    }
    (last, rows)
}

struct Outcome {
    sinks: BTreeMap<&'static str, Vec<String>>,
    delta: Vec<String>,
    snapshot: (u64, Vec<String>),
    states: BTreeMap<&'static str, (u64, Vec<String>)>,
}

fn outcome(root: &Path) -> Outcome {
    let last = committed(&root.join("checkpoint").join(DELTA_SINK)).unwrap();
    Outcome {
        delta: delta_rows(&root.join("out").join(DELTA_SINK), last),
        sinks: FILE_SINKS
            .iter()
            .map(|s| (*s, sink_rows(&root.join("out").join(s))))
            .collect(),
        snapshot: snapshot_rows(&root.join("out").join(SNAPSHOT_SINK)),
        states: QUERIES
            .iter()
            .map(|q| (*q, final_state(&root.join("checkpoint").join(q))))
            .collect(),
    }
}

fn prepare(root: &Path, input: &Path) -> PathBuf {
    std::fs::create_dir_all(root).unwrap();
    let sql = root.join("dashboard.sql");
    std::fs::write(&sql, dashboard_sql(input, &root.join("out"))).unwrap();
    sql
}

#[test]
fn killed_and_restarted_dashboard_equals_an_uninterrupted_run() {
    let seed: u64 = std::env::var("BROOK_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7);
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("orders");
    let top_clients = write_orders(&input);

    let reference = tmp.path().join("reference");
    let sql = prepare(&reference, &input);
    assert!(
        run(
            &sql,
            &reference.join("checkpoint"),
            &reference.join("stdout"),
            None
        )
        .is_none()
    );
    let expected = outcome(&reference);
    assert!(expected.delta.len() > 100, "{DELTA_SINK} wrote too little");
    for sink in FILE_SINKS {
        assert!(
            expected.sinks[sink].len() > 100,
            "{sink} wrote too little to be a test: {}",
            expected.sinks[sink].len()
        );
    }
    // The last snapshot is the last committed batch's, and is a recount's ranking.
    assert_eq!(expected.snapshot.0, expected.states[SNAPSHOT_SINK].0);
    let mut ranked: Vec<(i64, f64)> = expected
        .snapshot
        .1
        .iter()
        .map(|row| {
            let (client, traded) = row.split_once('|').unwrap();
            (client.parse().unwrap(), traded.parse().unwrap())
        })
        .collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    assert_eq!(ranked.len(), top_clients.len());
    for (got, want) in ranked.iter().zip(&top_clients) {
        assert!(
            got.0 == want.0 && (got.1 - want.1).abs() <= want.1.abs() * 1e-9,
            "top clients {ranked:?}, recounted {top_clients:?}"
        );
    }

    let crashed = tmp.path().join("crashed");
    let sql = prepare(&crashed, &input);
    // Every query gets a target batch in each run, spread over its batches (and
    // never behind what it has committed), with the commit of the batch after as a
    // backstop, so no query runs ahead. One query, in turn, also gets a kill point
    // in its target batch; the point cycles through all of them. Every fifth run
    // is killed at a random instant instead (or at a backstop, if that comes first).
    let mut rng = SmallRng::seed_from_u64(seed);
    // First, the new checkpoints' metadata write is held up, which the first
    // batch does not wait for, and the run is killed 3 s later, when every
    // query has read that batch and waits for its offsets: nothing may be
    // logged, sunk or committed before the metadata is on disk.
    let first = Kill {
        points: "metadata-tmp:0".into(),
        victim: Some("never".into()),
        after: Some(Duration::from_secs(3)),
        grace: Duration::from_secs(120),
    };
    let how = run(
        &sql,
        &crashed.join("checkpoint"),
        &crashed.join("stdout-first"),
        Some(&first),
    );
    assert_eq!(how.as_deref(), Some("after 3s"));
    for query in QUERIES {
        let checkpoint = crashed.join("checkpoint").join(query);
        assert!(!checkpoint.join("metadata").exists());
        assert!(
            !checkpoint.join("offsets/0").exists() && !checkpoint.join("sources/0").exists(),
            "{query} logged its input without metadata"
        );
        assert_eq!(
            committed(&checkpoint),
            None,
            "{query} committed without metadata"
        );
    }
    let names = |dir: PathBuf| {
        std::fs::read_dir(dir)
            .map(|d| d.map(|e| e.unwrap().file_name()).collect::<Vec<_>>())
            .unwrap_or_default()
    };
    for sink in FILE_SINKS.iter().chain(&[SNAPSHOT_SINK, DELTA_SINK]) {
        let out = crashed.join("out").join(sink);
        let files: Vec<_> = names(out.clone())
            .into_iter()
            .filter(|f| f != MANIFEST_DIR)
            .chain(names(out.join(MANIFEST_DIR)))
            .collect();
        assert!(
            files.is_empty(),
            "{sink} took a batch without metadata: {files:?}"
        );
    }
    let mut kills: Vec<String> = vec![];
    for attempt in 0..KILL_ATTEMPTS {
        let timed = attempt % 5 == 2;
        let point = faults::POINTS[attempt % faults::POINTS.len()];
        let victim = QUERIES[attempt % QUERIES.len()];
        let mut points = vec![];
        let mut victim_point = None;
        for query in QUERIES {
            let last = expected.states[query].0;
            let next = committed(&crashed.join("checkpoint").join(query)).map_or(0, |c| c + 1);
            let target = (attempt as u64 * last / KILL_ATTEMPTS as u64).max(next);
            points.push(format!("{query}/commits:{}", target + 1));
            if query == victim && !timed {
                let at = format!("{query}/{point}:{target}");
                points.push(at.clone());
                victim_point = Some(at);
            }
        }
        let kill = Kill {
            points: points.join(","),
            victim: victim_point,
            after: timed.then(|| Duration::from_millis(rng.random_range(50..800))),
            grace: VICTIM_GRACE,
        };
        let log = crashed.join(format!("stdout-{attempt}"));
        if let Some(how) = run(&sql, &crashed.join("checkpoint"), &log, Some(&kill)) {
            kills.push(how);
        }
    }
    let killed_at = |prefixes: &[&str]| {
        kills.iter().any(|k| {
            prefixes
                .iter()
                .any(|p| k.split('/').nth(1).is_some_and(|at| at.starts_with(p)))
        })
    };
    for phase in [
        &["read"][..],
        &["state-tmp", "state:"],
        &["sink-part", "sink:"],
        &["commits-tmp", "commits:"],
    ] {
        assert!(
            killed_at(phase),
            "seed {seed}: no kill at {phase:?}: {kills:?}"
        );
    }
    assert!(
        kills.len() >= MIN_KILLS,
        "seed {seed}: only {} of {KILL_ATTEMPTS} runs were killed: {kills:?}",
        kills.len()
    );
    assert!(
        run(
            &sql,
            &crashed.join("checkpoint"),
            &crashed.join("stdout-final"),
            None
        )
        .is_none()
    );
    eprintln!("seed {seed}: {} kills: {kills:?}", kills.len());
    let actual = outcome(&crashed);
    assert!(
        actual.snapshot == expected.snapshot,
        "seed {seed}: the top clients' last snapshot differs after kills {kills:?}: {:?}, \
         expected {:?}",
        actual.snapshot,
        expected.snapshot
    );
    assert!(
        actual.delta == expected.delta,
        "seed {seed}: {DELTA_SINK} differs after kills {kills:?}: {} rows, expected {}",
        actual.delta.len(),
        expected.delta.len()
    );
    for sink in FILE_SINKS {
        assert!(
            actual.sinks[sink] == expected.sinks[sink],
            "seed {seed}: {sink} differs after kills {kills:?}: {} rows, expected {}",
            actual.sinks[sink].len(),
            expected.sinks[sink].len()
        );
    }
    for query in QUERIES {
        assert!(
            actual.states[query] == expected.states[query],
            "seed {seed}: state of {query} differs after kills {kills:?}: batch {} with {} rows, \
             expected batch {} with {} rows",
            actual.states[query].0,
            actual.states[query].1.len(),
            expected.states[query].0,
            expected.states[query].1.len()
        );
    }
}

/// Runs `brook run` to its end, which must be a failure; returns its standard error.
fn run_refused(sql: &Path, checkpoint: &Path) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_brook"))
        .args(["run", sql.to_str().unwrap(), "--trigger", "available-now"])
        .args(["--checkpoint", checkpoint.to_str().unwrap()])
        .stdout(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!output.status.success(), "brook run went on: {stderr}");
    stderr
}

/// Every file below `dir` with its bytes.
fn contents(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(contents(&path));
        } else {
            out.insert(path.clone(), std::fs::read(&path).unwrap());
        }
    }
    out
}

/// Valid older log files copied under later batch numbers (a restored backup
/// mixed in, a careless copy) are refused at start, naming the file, before
/// anything is written; put right, the run ends as one never interrupted.
#[test]
fn stale_log_files_copied_under_later_numbers_are_refused_and_no_row_is_lost_or_doubled() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("orders");
    write_orders(&input);
    let reference = tmp.path().join("reference");
    let sql = prepare(&reference, &input);
    let checkpoints = reference.join("checkpoint");
    assert!(run(&sql, &checkpoints, &reference.join("stdout"), None).is_none());
    let expected = outcome(&reference);

    let crashed = tmp.path().join("crashed");
    let sql = prepare(&crashed, &input);
    let checkpoints = crashed.join("checkpoint");
    let at = "top_stocks/commits:14".to_string();
    let kill = Kill {
        points: at.clone(),
        victim: Some(at.clone()),
        after: None,
        grace: VICTIM_GRACE,
    };
    let how = run(&sql, &checkpoints, &crashed.join("stdout-0"), Some(&kill));
    assert_eq!(how, Some(at));
    let checkpoint = checkpoints.join("top_stocks");
    assert_eq!(committed(&checkpoint), Some(14));
    let sink = crashed.join("out/top_stocks");

    // (stale file, copied from): an older commit as the last one, older
    // offsets as the batch to re-run, and an older source snapshot as the latest.
    for (stale, from, what) in [
        (
            "commits/14",
            "commits/12",
            "holds batch 12's commit, not batch 14's",
        ),
        (
            "offsets/15",
            "offsets/13",
            "holds batch 13's offsets, not batch 15's",
        ),
        (
            "sources/14",
            "sources/10",
            "holds the source's progress before batch 10, not before batch 14",
        ),
    ] {
        let path = checkpoint.join(stale);
        let original = std::fs::read(&path).ok();
        std::fs::copy(checkpoint.join(from), &path).unwrap();
        let before = contents(&sink);
        let stderr = run_refused(&sql, &checkpoints);
        assert!(
            stderr.contains(&path.display().to_string()) && stderr.contains(what),
            "{stale}: {stderr}"
        );
        assert!(
            contents(&sink) == before,
            "{stale}: the sink was written to"
        );
        match original {
            Some(bytes) => std::fs::write(&path, bytes).unwrap(),
            None => std::fs::remove_file(&path).unwrap(),
        }
    }

    assert!(run(&sql, &checkpoints, &crashed.join("stdout-final"), None).is_none());
    let actual = outcome(&crashed);
    for sink in FILE_SINKS {
        assert!(
            actual.sinks[sink] == expected.sinks[sink],
            "{sink}: {} rows, expected {}",
            actual.sinks[sink].len(),
            expected.sinks[sink].len()
        );
    }
    for query in QUERIES {
        assert!(
            actual.states[query] == expected.states[query],
            "state of {query} differs"
        );
    }
}
