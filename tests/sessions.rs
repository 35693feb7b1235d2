//! Session windows run by `brook run` over real files, several batches and a
//! restart from the checkpoint midway: the sessions emitted in append and in
//! update mode are those a plain recount finds (each client's orders sorted by
//! time, cut where an order comes more than the gap after the session's reach),
//! including a late order, read after the restart, that bridges two sessions
//! of a client emitted before it.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::{put, run_checkpointed_printing};

/// The session gap, in seconds.
const GAP: i64 = 300;
const FILES: i64 = 8;
/// The client whose two sessions a later order bridges.
const BRIDGED: i64 = 7;
/// The client of the order far in the future that closes every other session.
const LAST: i64 = 99;
const LAST_TIME: i64 = 13_000;

/// (client, session start, session end) -> (orders, shares).
type Sessions = BTreeMap<(i64, String, String), (i64, i64)>;

/// An order: (seconds after 20:00:00, id, client, amount).
type Order = (i64, i64, i64, i64);

fn clock(t: i64) -> String {
    format!("{:02}:{:02}:{:02}", 20 + t / 3600, t / 60 % 60, t % 60)
}

/// File `f`'s orders: pseudo-random clients 1..=6, at times reaching 15
/// minutes back into the previous files' (so that sessions span batches and
/// merge across them), and the bridged client's orders.
fn file_orders(f: i64) -> Vec<Order> {
    let mut seed = 0x2545_f491_4f6c_dd1d_u64.wrapping_mul(f as u64 + 1);
    let mut next = |n: i64| {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((seed >> 33) % n as u64) as i64
    };
    let mut orders: Vec<Order> = (0..30)
        .map(|i| {
            let t = (f * 600 + next(1500) - 900).max(0);
            (t, f * 100 + i, 1 + next(6), 1 + next(100))
        })
        .collect();
    match f {
        // Two sessions, [100, 400) and [500, 800) ...
        0 => orders.extend([(100, 90, BRIDGED, 1000), (500, 91, BRIDGED, 2000)]),
        // ... that an order read after the restart joins: [380, 680) overlaps both.
        5 => orders.push((380, 592, BRIDGED, 4000)),
        _ => {}
    }
    orders
}

fn put_file(input: &Path, f: i64) {
    let lines: Vec<String> = file_orders(f)
        .into_iter()
        .map(|(t, id, client, amount)| {
            format!("2016-03-22 {},{id},{client},AAPL,{amount},1.0,B", clock(t))
        })
        .collect();
    put(input, &format!("orders-{f:02}.csv"), &lines);
}

fn put_last(input: &Path) {
    let line = format!("2016-03-22 {},9999,{LAST},AAPL,1,1.0,B", clock(LAST_TIME));
    put(input, "orders-99.csv", &[line]);
}

fn script(input: &Path, output: &Path, mode: &str, sink: &str) -> String {
    format!(
        "CREATE UNBOUNDED EXTERNAL TABLE orders (time TIMESTAMP NOT NULL, order_id BIGINT, \
         client_id BIGINT, symbol VARCHAR, amount INT, price DOUBLE, buy_sell VARCHAR, \
         WATERMARK FOR time AS time - INTERVAL '1' HOUR) \
         STORED AS CSV LOCATION '{}' OPTIONS ('maxFilesPerTrigger' '1');
         CREATE EXTERNAL TABLE sessions STORED AS {sink} LOCATION '{}' OPTIONS ('outputMode' '{mode}');
         INSERT INTO sessions SELECT client_id, session_window.start AS s, session_window.end AS e,
           count(*) AS n, sum(amount) AS shares
         FROM orders GROUP BY session_window(time, '{GAP} seconds'), client_id;",
        input.display(),
        if sink == "JSON" { output.display().to_string() } else { "stdout".into() }
    )
}

/// A session emitted: (client, start, end), (orders, shares).
type Row = ((i64, String, String), (i64, i64));

/// Every row a file sink wrote, in the order of its batches.
fn sink_rows(output: &Path) -> Vec<Row> {
    let mut parts: Vec<_> = std::fs::read_dir(output)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("part-")
        })
        .collect();
    parts.sort();
    let mut rows = vec![];
    for path in parts {
        for l in std::fs::read_to_string(&path).unwrap().lines() {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let text = |k: &str| v[k].as_str().unwrap().to_string();
            let number = |k: &str| v[k].as_i64().unwrap();
            rows.push((
                (number("client_id"), text("s"), text("e")),
                (number("n"), number("shares")),
            ));
        }
    }
    rows
}

/// The sessions of `orders`, as a recount finds them.
fn recount(orders: &[Order]) -> Sessions {
    let mut by_client: BTreeMap<i64, Vec<(i64, i64)>> = BTreeMap::new();
    for &(t, _, client, amount) in orders {
        by_client.entry(client).or_default().push((t, amount));
    }
    let stamp = |t: i64| format!("2016-03-22T{}", clock(t));
    let mut sessions = Sessions::new();
    for (client, mut rows) in by_client {
        rows.sort();
        let mut i = 0;
        while i < rows.len() {
            let (start, mut reach) = (rows[i].0, rows[i].0 + GAP);
            let (mut n, mut shares) = (0, 0);
            while i < rows.len() && rows[i].0 <= reach {
                reach = reach.max(rows[i].0 + GAP);
                n += 1;
                shares += rows[i].1;
                i += 1;
            }
            sessions.insert((client, stamp(start), stamp(reach)), (n, shares));
        }
    }
    sessions
}

/// Runs `mode` over the files into `sink` (a JSON file sink, or the console),
/// stopped after half of them and restarted from its checkpoint; the sink's
/// rows and the progress of the second run.
fn run_with_restart(mode: &str, sink: &str) -> (Vec<Row>, Vec<serde_json::Value>) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let input = dir.join("orders");
    std::fs::create_dir(&input).unwrap();
    let output = dir.join("out");
    std::fs::write(dir.join("q.sql"), script(&input, &output, mode, sink)).unwrap();
    (0..FILES / 2).for_each(|f| put_file(&input, f));
    let (mut rows, _) = run(dir, sink);
    (FILES / 2..FILES).for_each(|f| put_file(&input, f));
    put_last(&input);
    let (more, progress) = run(dir, sink);
    rows.extend(more);
    if sink == "JSON" {
        rows = sink_rows(&output);
    }
    (rows, progress)
}

/// `brook run` of the script in `dir` until its input is used up: the rows
/// it printed (none for a file sink) and its progress.
fn run(dir: &Path, sink: &str) -> (Vec<Row>, Vec<serde_json::Value>) {
    let (stdout, progress) = run_checkpointed_printing(dir, "q.sql");
    if sink == "JSON" {
        return (vec![], progress);
    }
    let rows = printed(&stdout)
        .into_iter()
        .map(|r| {
            let number = |i: usize| r[i].parse::<i64>().unwrap();
            (
                (number(0), r[1].clone(), r[2].clone()),
                (number(3), number(4)),
            )
        })
        .collect();
    (rows, progress)
}

/// The rows of the tables a console sink printed, in order.
fn printed(stdout: &str) -> Vec<Vec<String>> {
    stdout
        .lines()
        .filter(|l| l.starts_with("| ") && !l.contains("client_id"))
        .map(|l| {
            l.split('|')
                .map(|c| c.trim().to_string())
                .filter(|c| !c.is_empty())
                .collect()
        })
        .collect()
}

fn all_orders() -> Vec<Order> {
    (0..FILES).flat_map(file_orders).collect()
}

#[test]
fn append_mode_emits_each_session_once_as_a_recount_finds_across_a_restart() {
    let (rows, progress) = run_with_restart("append", "JSON");
    // Every session but the last order's has closed, each emitted once.
    let expected = recount(&all_orders());
    assert!(expected.len() > 20, "{expected:?}");
    let mut got = Sessions::new();
    for (key, value) in rows {
        assert!(
            got.insert(key.clone(), value).is_none(),
            "{key:?} emitted twice"
        );
    }
    assert_eq!(got, expected);
    // The bridged client's orders are one session, of all three.
    let bridged: Vec<_> = got.iter().filter(|(k, _)| k.0 == BRIDGED).collect();
    assert_eq!(bridged.len(), 1, "{bridged:?}");
    assert_eq!(*bridged[0].1, (3, 7000));
    // The state left holds the last order's session only.
    let last = progress.last().unwrap();
    assert_eq!(last["state_operators"][0]["num_rows_total"], 1, "{last}");
}

#[test]
fn update_mode_emits_sessions_as_they_change_ending_as_a_recount_finds_across_a_restart() {
    let (rows, _) = run_with_restart("update", "CONSOLE");
    let mut orders = all_orders();
    orders.push((LAST_TIME, 9999, LAST, 1));
    let expected = recount(&orders);
    // A session's last emitted row holds its final aggregates.
    let mut last = Sessions::new();
    for (key, value) in &rows {
        last.insert(key.clone(), *value);
    }
    for (key, value) in &expected {
        assert_eq!(last.get(key), Some(value), "{key:?}");
    }
    // Every other row is of a session that later grew or merged into one of them.
    for ((client, start, end), _) in &rows {
        if expected.contains_key(&(*client, start.clone(), end.clone())) {
            continue;
        }
        assert!(
            expected
                .keys()
                .any(|(c, s, e)| c == client && s <= start && end <= e),
            "{client} {start} {end} is within no final session"
        );
    }
    // Before the bridging order, the bridged client's two sessions were emitted.
    let bridged: Vec<_> = rows.iter().filter(|(k, _)| k.0 == BRIDGED).collect();
    let at = |s: i64, e: i64| {
        (
            BRIDGED,
            format!("2016-03-22T{}", clock(s)),
            format!("2016-03-22T{}", clock(e)),
        )
    };
    let mut bridged: Vec<_> = bridged.iter().map(|(k, v)| (k.clone(), *v)).collect();
    // The two sessions come in one batch, in no set order.
    let first_two = bridged.len().min(2);
    bridged[..first_two].sort();
    assert_eq!(
        bridged,
        vec![
            (at(100, 400), (1, 1000)),
            (at(500, 800), (1, 2000)),
            (at(100, 800), (3, 7000)),
        ]
    );
}

/// queries/sessions.sql, run by `brook run` over orders in data/orders,
/// prints each client's trading sessions once they have closed.
#[test]
fn the_example_query_prints_trading_sessions() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("data/orders");
    std::fs::create_dir_all(&input).unwrap();
    let orders: [Order; 5] = [
        (0, 1, 11, 5),
        (200, 2, 11, 7),
        (400, 3, 11, 1),
        (900, 4, 11, 2),
        (100, 5, 12, 4),
    ];
    let mut lines: Vec<String> = orders
        .iter()
        .map(|(t, id, client, amount)| {
            format!(
                "2016-03-22 {},{id},{client},AAPL,{amount},10.0,B",
                clock(*t)
            )
        })
        .collect();
    // Far enough ahead for the watermark to close every session above.
    lines.push(format!("2016-03-22 {},6,13,AAPL,1,10.0,B", clock(3600)));
    put(&input, "orders-0.csv", &lines);
    let query = concat!(env!("CARGO_MANIFEST_DIR"), "/queries/sessions.sql");
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_brook"))
        .args(["run", query, "--trigger", "available-now"])
        .current_dir(tmp.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let printed = printed(&stdout);
    let mut expected = vec![];
    for ((client, start, end), (n, shares)) in recount(&orders) {
        expected.push(vec![
            client.to_string(),
            start,
            end,
            n.to_string(),
            shares.to_string(),
        ]);
    }
    let mut printed = printed;
    printed.sort();
    expected.sort();
    assert_eq!(printed, expected, "{stdout}");
}
