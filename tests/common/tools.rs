//! Every program the tests need beyond Rust crates, and how it is installed:
//! the one place where tests install anything. Each tool is installed on first
//! use, once: concurrent tests and test processes take the lock
//! `target/tools/.install.lock` (one installs, the others wait), and nothing
//! is run when the tool is already there. A failed install says which command
//! failed and how to run it by hand. A new tool is a `Tool` in the table below
//! and a function returning what the tests use of it.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A program the tests use.
pub struct Tool {
    /// What it is and which tests need it, for messages.
    pub name: &'static str,
    /// A program of this name on PATH counts as installed.
    pub on_path: Option<&'static str>,
    /// The file that is there once installed: what the tests use, and where
    /// the install puts it (relative paths are from the repository root).
    pub installed: &'static str,
    /// Installs system-wide: run as root, through `sudo -n` for other users.
    pub as_root: bool,
    /// The commands that install it, in order, run from the repository root:
    /// words separated by spaces, exactly as a user types them.
    pub install: &'static [&'static str],
}

const TANSU: Tool = Tool {
    name: "tansu 0.6.0, the Kafka-protocol broker of the Kafka tests and benchmark",
    on_path: Some("tansu"),
    installed: "target/tools/bin/tansu",
    as_root: false,
    install: &[
        "cargo install tansu --version 0.6.0 --locked --features dynostore,libsql \
         --root target/tools",
    ],
};

/// Debian's package: Playwright's own browser downloads are not reachable everywhere.
const CHROMIUM: Tool = Tool {
    name: "Chromium, the browser of tests/ui_browser.rs",
    on_path: None,
    installed: "/usr/bin/chromium",
    as_root: true,
    install: &["apt-get update", "apt-get install -y chromium"],
};

/// Only the driver: it downloads no browser and drives `chromium()`.
const PLAYWRIGHT: Tool = Tool {
    name: "playwright-core 1.65.1, the browser driver of tests/ui_browser.rs",
    on_path: None,
    installed: "target/tools/playwright/node_modules/playwright-core/package.json",
    as_root: false,
    install: &[
        "npm install --no-save --no-audit --no-fund --prefix target/tools/playwright \
         playwright-core@1.65.1",
    ],
};

/// An S3-protocol server over a local directory, for the object-store tests.
const S3S_FS: Tool = Tool {
    name: "s3s-fs 0.14.1, the S3-protocol server of the object-store tests",
    on_path: None,
    installed: "target/tools/bin/s3s-fs",
    as_root: false,
    install: &[
        "cargo install s3s-fs --version 0.14.1 --locked --features binary --root target/tools",
    ],
};

/// The readers BI users open brook's output with: Delta Lake, Polars and PyArrow.
const PYTHON_READERS: Tool = Tool {
    name: "Python deltalake 1.6.6, polars 2.1.0 and pyarrow 26.0.1, the readers of the sink tests",
    on_path: None,
    installed: "target/tools/python/bin/python",
    as_root: false,
    // Built aside and moved into place last, so that a failed pip leaves no
    // interpreter that looks installed.
    install: &[
        "rm -rf target/tools/python.partial",
        "python3 -m venv target/tools/python.partial",
        "target/tools/python.partial/bin/python -m pip install --quiet \
         --disable-pip-version-check deltalake==1.6.6 polars==2.1.0 pyarrow==26.0.1",
        "mv target/tools/python.partial target/tools/python",
    ],
};

/// The s3s-fs binary.
/// A port on 127.0.0.1 that nothing listens on now, for a server to start on.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn s3s_fs() -> PathBuf {
    S3S_FS.get()
}

/// A Python interpreter that imports deltalake, polars and pyarrow.
pub fn python_readers() -> PathBuf {
    PYTHON_READERS.get()
}

/// The tansu binary.
pub fn tansu() -> PathBuf {
    TANSU.get()
}

/// The Chromium binary.
pub fn chromium() -> PathBuf {
    CHROMIUM.get()
}

/// The `node_modules` directory holding playwright-core, for NODE_PATH.
pub fn playwright() -> PathBuf {
    let package = PLAYWRIGHT.get();
    package.ancestors().nth(2).unwrap().to_path_buf()
}

fn repository() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn is_root() -> bool {
    // SAFETY: geteuid only reads the process's credentials.
    unsafe { libc::geteuid() == 0 }
}

impl Tool {
    /// The installed file, after installing the tool if it is missing.
    pub fn get(&self) -> PathBuf {
        if let Some(found) = self.present() {
            return found;
        }
        let tools = repository().join("target/tools");
        let lock_path = tools.join(".install.lock");
        let lock = std::fs::create_dir_all(&tools)
            .and_then(|()| File::create(&lock_path))
            .and_then(|lock| lock.lock().map(|()| lock))
            .unwrap_or_else(|e| self.fail(&format!("cannot lock {}: {e}", lock_path.display())));
        // Another test may have installed it while this one waited.
        if let Some(found) = self.present() {
            return found;
        }
        eprintln!("installing {} (once): {}", self.name, self.commands());
        for line in self.install {
            let args: Vec<&str> = line.split_whitespace().collect();
            let mut command = if self.as_root && !is_root() {
                let mut sudo = Command::new("sudo");
                sudo.args(["-n", "env", "DEBIAN_FRONTEND=noninteractive"]);
                sudo.arg(args[0]);
                sudo
            } else if args[0] == "cargo" {
                // The cargo running these tests, also when it is not on PATH.
                Command::new(env!("CARGO"))
            } else {
                Command::new(args[0])
            };
            let what = self.typed(line);
            // apt-get must not stop to ask questions.
            let status = command
                .args(&args[1..])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .current_dir(repository())
                .status()
                .unwrap_or_else(|e| self.fail(&format!("`{what}` could not start: {e}")));
            if !status.success() {
                self.fail(&format!("`{what}` failed ({status}; its output is above)"));
            }
        }
        drop(lock);
        self.present().unwrap_or_else(|| {
            self.fail(&format!(
                "the install finished but left no {}",
                self.location().display()
            ))
        })
    }

    fn location(&self) -> PathBuf {
        repository().join(self.installed)
    }

    fn present(&self) -> Option<PathBuf> {
        let on_path = self.on_path.and_then(|name| {
            let path = std::env::var_os("PATH")?;
            std::env::split_paths(&path)
                .map(|dir| dir.join(name))
                .find(|p| p.is_file())
        });
        on_path.or_else(|| Some(self.location()).filter(|p| p.exists()))
    }

    /// One install command as a user types it.
    fn typed(&self, line: &str) -> String {
        let sudo = if self.as_root && !is_root() {
            "sudo "
        } else {
            ""
        };
        let words: Vec<&str> = line.split_whitespace().collect();
        format!("{sudo}{}", words.join(" "))
    }

    /// All the install commands, as one line to type.
    fn commands(&self) -> String {
        let commands: Vec<String> = self.install.iter().map(|line| self.typed(line)).collect();
        commands.join(" && ")
    }

    fn fail(&self, what: &str) -> ! {
        panic!(
            "could not install {}: {what}.\nInstall it by hand, from {}:\n    {}\n\
             The install puts it at {}.",
            self.name,
            repository().display(),
            self.commands(),
            self.location().display(),
        )
    }
}
