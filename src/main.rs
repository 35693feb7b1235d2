//! The `brook` command. It lives in the library (`brook::cli`), beside the
//! subcommands it runs.

fn main() -> std::process::ExitCode {
    brook::cli::main()
}
