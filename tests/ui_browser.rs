//! The web dashboard in a real browser: `brook demo` is started as a user
//! starts it, and headless Chromium, driven by Playwright, checks what its pages
//! show (tests/ui/e2e.cjs). Chromium comes from Debian's packages and
//! playwright-core from npm, both installed on first use; screenshots are kept
//! in target/ui-artifacts.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const CHROMIUM: &str = "/usr/bin/chromium";
const PLAYWRIGHT_VERSION: &str = "1.65.1";

fn run(what: &str, command: &mut Command) {
    let status = command.status().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(status.success(), "{what} failed: {status}");
}

/// Debian's chromium, installed when missing (the probe of this machine kind ran it as root).
fn chromium() {
    if Path::new(CHROMIUM).exists() {
        return;
    }
    eprintln!("installing Debian's chromium for the browser test (once)");
    // As root, as CI runs; otherwise through sudo, which must not ask for a password.
    let apt = |args: &[&str]| {
        let mut command = if unsafe { libc::geteuid() } == 0 {
            Command::new("apt-get")
        } else {
            let mut sudo = Command::new("sudo");
            sudo.args(["-n", "apt-get"]);
            sudo
        };
        command
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success())
    };
    if !apt(&["install", "-y", "chromium"]) {
        assert!(apt(&["update"]), "apt-get update failed");
        assert!(
            apt(&["install", "-y", "chromium"]),
            "apt-get install chromium failed"
        );
    }
}

/// playwright-core from npm under target/tools (it drives the system's Chromium;
/// it downloads no browser of its own).
fn playwright() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/tools/playwright");
    let modules = root.join("node_modules");
    if !modules.join("playwright-core/package.json").exists() {
        std::fs::create_dir_all(&root).unwrap();
        run(
            "npm install playwright-core",
            Command::new("npm")
                .args([
                    "install",
                    "--no-save",
                    "--no-audit",
                    "--no-fund",
                    "--prefix",
                ])
                .arg(&root)
                .arg(format!("playwright-core@{PLAYWRIGHT_VERSION}")),
        );
    }
    modules
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
    chromium();
    let modules = playwright();
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
            .env("NODE_PATH", &modules),
    );
    for shot in ["dashboard.png", "monitor.png"] {
        let png = std::fs::read(artifacts.join(shot)).unwrap();
        assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "{shot}");
    }
    assert!(demo.0.try_wait().unwrap().is_none(), "the demo died");
}
