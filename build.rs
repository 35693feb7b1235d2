//! Links the `brook` binary for a fast start on Linux.
//!
//! - At a fixed address: a position-independent executable has its 250,000
//!   relative relocations applied by the loader at every start, writing 4 MB of
//!   pages: 7 of the 10 ms that `brook --version` took. Libraries, heap and
//!   stack are still placed at random.
//! - With the functions a dashboard run executes placed together
//!   (`link/hot-functions.txt`, made by `link/hot-functions.sh`). Left where the
//!   compiler puts them, the 7 MB of code a run needs lie spread over 57 MB of
//!   the binary, and the kernel maps 64 KB around every page touched: a page
//!   fault per window on the way in, and all of it to unmap at exit. Names
//!   missing from the binary (another toolchain, dependency versions or
//!   profile) are skipped, so a stale list costs speed, never a build.

use std::path::{Path, PathBuf};
use std::process::Command;

const HOT_FUNCTIONS: &str = "link/hot-functions.txt";

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed={HOT_FUNCTIONS}");
    let var = |name: &str| std::env::var(name).unwrap_or_default();
    if var("CARGO_CFG_TARGET_OS") != "linux" || var("CARGO_CFG_TARGET_ENV") != "gnu" {
        return;
    }
    println!("cargo::rustc-link-arg-bins=-no-pie");
    if var("PROFILE") != "release" {
        return;
    }
    let list = Path::new(&var("CARGO_MANIFEST_DIR")).join(HOT_FUNCTIONS);
    if let Some(lld) = rust_lld_dir(&var).filter(|_| list.exists()) {
        for arg in [
            format!("-B{}", lld.display()),
            "-fuse-ld=lld".to_owned(),
            format!("-Wl,--symbol-ordering-file={}", list.display()),
            "-Wl,--no-warn-symbol-ordering".to_owned(),
        ] {
            println!("cargo::rustc-link-arg-bins={arg}");
        }
    }
}

/// The directory of the `ld.lld` that rustc ships, and links with by default on
/// x86_64 Linux since 1.90: GNU ld knows no symbol ordering file, so it is
/// named explicitly for toolchains that default to another linker. None when
/// the toolchain has no lld, or a linker was chosen in the config or `RUSTFLAGS`.
fn rust_lld_dir(var: &impl Fn(&str) -> String) -> Option<PathBuf> {
    let flags = var("CARGO_ENCODED_RUSTFLAGS");
    let chosen = ["linker", "fuse-ld", "link-self-contained"]
        .iter()
        .any(|f| flags.contains(f));
    if chosen || !var("RUSTC_LINKER").is_empty() {
        return None;
    }
    let sysroot = Command::new(var("RUSTC"))
        .args(["--print", "sysroot"])
        .output()
        .ok()?
        .stdout;
    let dir = Path::new(String::from_utf8(sysroot).ok()?.trim())
        .join("lib/rustlib")
        .join(var("HOST"))
        .join("bin/gcc-ld");
    dir.join("ld.lld").exists().then_some(dir)
}
