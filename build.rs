//! Links the `brook` binary for a fast start on Linux.
//!
//! - At a fixed address: a position-independent executable has its 250,000
//!   relative relocations applied by the loader at every start, writing 4 MB of
//!   pages: 7 of the 10 ms that `brook --version` took. Libraries, heap and
//!   stack are still placed at random.
//! - In the bench profile's build, with the functions a dashboard run executes
//!   placed together (`link/hot-functions.txt`, made by `link/hot-functions.sh`
//!   from that build). Left where the compiler puts them, the 7.5 MB of code a
//!   run executes lie spread over 57 MB of the binary, and the kernel maps 64 KB
//!   around every page touched: a page fault per window on the way in, and all
//!   of it to unmap at exit. The list's names carry hashes of the build's
//!   settings, so other profiles (a release build has no line tables) would
//!   match none of them. Names missing from the binary are skipped.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

const HOT_FUNCTIONS: &str = "link/hot-functions.txt";

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    let var = |name: &str| std::env::var(name).unwrap_or_default();
    if var("CARGO_CFG_TARGET_OS") != "linux" || var("CARGO_CFG_TARGET_ENV") != "gnu" {
        return;
    }
    println!("cargo::rustc-link-arg-bins=-no-pie");
    // `DEBUG` is whether the profile has debug info: the bench profile keeps
    // line tables for profiling, the release profile none.
    if var("PROFILE") != "release" || var("DEBUG") != "true" {
        return;
    }
    let list = Path::new(&var("CARGO_MANIFEST_DIR")).join(HOT_FUNCTIONS);
    let Some(list_arg) = list.to_str().filter(|_| list.exists()) else {
        return;
    };
    println!("cargo::rerun-if-changed={HOT_FUNCTIONS}");
    if let Some(lld) = rust_lld_dir(&var) {
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
