//! Links the `brook` binary at a fixed address on Linux. A position-independent
//! executable has its 250,000 relative relocations applied by the loader at
//! every start, writing 4 MB of pages: 7 of the 10 ms that `brook --version`
//! took. Libraries, heap and stack are still placed at random.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if os == "linux" && env == "gnu" {
        println!("cargo::rustc-link-arg-bins=-no-pie");
    }
}
