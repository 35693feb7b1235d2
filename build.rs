//! Links the `brook` binary for a fast start on Linux, when asked to: both
//! tricks are opt-in because they trade generality for a few milliseconds a
//! start (docs/performance.md measures what a default build loses).
//!
//! - `BROOK_FIXED_ADDRESS=1`: at a fixed address (`-no-pie`). A
//!   position-independent executable has its 250,000 relative relocations
//!   applied by the loader at every start, writing 4 MB of pages. Libraries,
//!   heap and stack are still placed at random.
//! - `BROOK_HOT_FUNCTIONS=<file>`: with the functions a dashboard run executes
//!   placed together, as listed by `link/hot-functions.sh` (which writes
//!   `target/hot-functions.txt` from a profile of the bench profile's build).
//!   Left where the compiler puts them, the code a run executes lies spread
//!   over most of the binary, and the kernel maps 64 KB around every page
//!   touched. The list's names carry hashes of the build's settings, the
//!   toolchain and every crate's version, so it is made for one build and
//!   goes stale with any change; names missing from the binary are skipped.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=BROOK_FIXED_ADDRESS");
    println!("cargo::rerun-if-env-changed=BROOK_HOT_FUNCTIONS");
    let var = |name: &str| std::env::var(name).unwrap_or_default();
    if var("CARGO_CFG_TARGET_OS") != "linux" || var("CARGO_CFG_TARGET_ENV") != "gnu" {
        return;
    }
    if var("BROOK_FIXED_ADDRESS") == "1" {
        println!("cargo::rustc-link-arg-bins=-no-pie");
    }
    let list = var("BROOK_HOT_FUNCTIONS");
    if list.is_empty() {
        return;
    }
    let list = Path::new(&var("CARGO_MANIFEST_DIR")).join(list);
    let Some(list_arg) = list.to_str().filter(|_| list.exists()) else {
        println!(
            "cargo::warning=BROOK_HOT_FUNCTIONS names {}, which does not exist: linking without it",
            list.display()
        );
        return;
    };
    println!("cargo::rerun-if-changed={list_arg}");
    let Some(lld) = rust_lld_dir(&var) else {
        println!(
            "cargo::warning=BROOK_HOT_FUNCTIONS needs rustc's rust-lld on native x86_64 Linux and no other linker chosen: linking without it"
        );
        return;
    };
    let b = format!("-B{}", lld.display());
    let order = format!("--symbol-ordering-file={list_arg}");
    // `-Xlinker` passes each argument whole, commas in the path included.
    for arg in [
        &b,
        "-fuse-ld=lld",
        "-Xlinker",
        &order,
        "-Xlinker",
        "--no-warn-symbol-ordering",
    ] {
        println!("cargo::rustc-link-arg-bins={arg}");
    }
}

/// The directory of the `ld.lld` that rustc ships and, on x86_64 Linux since
/// 1.90, links with by default, when the C compiler that drives the link takes
/// it: GNU ld knows no symbol ordering file, and rustc quietly falls back to it
/// when `cc` does not know `-fuse-ld=lld` (gcc before 9). None as well when the
/// build is not native x86_64 Linux, or a linker was chosen in the config or
/// `RUSTFLAGS` (a `-B` there may name mold).
fn rust_lld_dir(var: &impl Fn(&str) -> String) -> Option<PathBuf> {
    let host = var("HOST");
    let flags = var("CARGO_ENCODED_RUSTFLAGS");
    let chosen = ["linker", "fuse-ld", "link-self-contained", "-B"]
        .iter()
        .any(|f| flags.contains(f));
    if host != "x86_64-unknown-linux-gnu"
        || var("TARGET") != host
        || chosen
        || !var("RUSTC_LINKER").is_empty()
    {
        return None;
    }
    let sysroot = output(Command::new(var("RUSTC")).args(["--print", "sysroot"]))?;
    let dir = Path::new(sysroot.trim())
        .join("lib/rustlib")
        .join(&host)
        .join("bin/gcc-ld");
    let mut b = OsString::from("-B");
    b.push(&dir);
    let version = output(
        Command::new("cc")
            .arg(b)
            .args(["-fuse-ld=lld", "-Wl,--version"]),
    )?;
    version.starts_with("LLD").then_some(dir)
}

/// What a command printed, if it ran and succeeded.
fn output(command: &mut Command) -> Option<String> {
    let out = command.output().ok()?;
    out.status.success().then_some(())?;
    String::from_utf8(out.stdout).ok()
}
