//! The web dashboard in a real browser: `brook demo` is started as a user
//! starts it, and headless Chromium, driven by Playwright, checks what its pages
//! show (tests/ui/e2e.cjs). Both are installed on first use (tests/common/tools.rs);
//! screenshots are kept in target/ui-artifacts.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

fn run(what: &str, command: &mut Command) {
    let status = command.status().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(status.success(), "{what} failed: {status}");
}

struct Demo(Child);

impl Drop for Demo {
    fn drop(&mut self) {
        // SIGINT, as Ctrl-C: the demo removes its order directory.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGINT) };
        let _ = self.0.wait();
    }
}

#[test]
fn the_dashboard_moves_in_a_browser() {
    let chromium = common::tools::chromium();
    let modules = common::tools::playwright();
    let mut demo = Demo(
        Command::new(env!("CARGO_BIN_EXE_brook"))
            .args(["demo", "--ui-port", "0", "--no-clear", "--duration", "180s"])
            .env("RUST_LOG", "error")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let stdout = demo.0.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(url) = line.strip_prefix("brook demo: the dashboard is at ") {
                let _ = tx.send(url.to_string());
            }
        }
    });
    let url = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the demo printed no dashboard address");
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");

    let artifacts = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/ui-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    for shot in ["dashboard.png", "monitor.png"] {
        let _ = std::fs::remove_file(artifacts.join(shot));
    }
    run(
        "the browser test (tests/ui/e2e.cjs)",
        Command::new("node")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ui/e2e.cjs"))
            .arg(&url)
            .arg(&artifacts)
            .arg(&chromium)
            .env("NODE_PATH", &modules),
    );
    for shot in ["dashboard.png", "monitor.png"] {
        let png = std::fs::read(artifacts.join(shot)).unwrap();
        assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "{shot}");
    }
    assert!(demo.0.try_wait().unwrap().is_none(), "the demo died");
}
