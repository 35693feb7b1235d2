//! The installer of the tests' tools (tests/common/tools.rs), on throwaway tools
//! whose install commands are shell one-liners under target/tools.

#[path = "common/tools.rs"]
#[allow(dead_code)]
mod tools;

use std::path::Path;

use tools::Tool;

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// A tool whose install runs `script` in sh.
fn tool(name: &'static str, installed: &'static str, script: &'static str) -> Tool {
    let command: &'static [&'static str] = Box::leak(Box::new(["sh", "-c", script]));
    Tool {
        name,
        on_path: None,
        installed,
        as_root: false,
        install: Box::leak(Box::new([command])),
    }
}

fn panic_message(f: impl FnOnce() + std::panic::UnwindSafe) -> String {
    let payload = std::panic::catch_unwind(f).expect_err("the install did not fail");
    payload
        .downcast_ref::<String>()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn a_failed_install_says_what_failed_what_to_run_and_where_it_installs() {
    let repo = env!("CARGO_MANIFEST_DIR");
    let missing = tool(
        "a tool nobody can install",
        leak(format!("target/tools/never-{}", std::process::id())),
        "echo no such package >&2; exit 3",
    );
    let message = panic_message(|| {
        missing.get();
    });
    assert_eq!(
        message,
        format!(
            "could not install a tool nobody can install: `sh -c 'echo no such package >&2; exit 3'` \
             failed (exit status: 3; its output is above).\n\
             Install it by hand, from {repo}:\n    \
             sh -c 'echo no such package >&2; exit 3'\n\
             The install puts it at {repo}/target/tools/never-{}.",
            std::process::id()
        )
    );

    // An install that succeeds but leaves nothing where the tests look.
    let misplaced = tool(
        "a tool installed elsewhere",
        leak(format!("target/tools/never-{}", std::process::id())),
        "true",
    );
    let message = panic_message(|| {
        misplaced.get();
    });
    assert!(
        message.starts_with(&format!(
            "could not install a tool installed elsewhere: the install finished but left no \
             {repo}/target/tools/never-{}.\nInstall it by hand",
            std::process::id()
        )),
        "{message}"
    );
}

#[test]
fn concurrent_users_install_once_and_later_ones_install_nothing() {
    let dir = format!("target/tools/once-{}", std::process::id());
    let counted = tool(
        "a tool installed once",
        leak(format!("{dir}/bin")),
        // Slow enough that the other threads ask while it installs.
        leak(format!(
            "mkdir -p {dir} && echo run >> {dir}/runs && sleep 0.5 && touch {dir}/bin"
        )),
    );
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let paths: Vec<_> = std::thread::scope(|s| {
        let threads: Vec<_> = (0..4).map(|_| s.spawn(|| counted.get())).collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    assert_eq!(paths, vec![repo.join(&dir).join("bin"); 4]);
    assert_eq!(counted.get(), repo.join(&dir).join("bin"));
    let runs = std::fs::read_to_string(repo.join(&dir).join("runs")).unwrap();
    std::fs::remove_dir_all(repo.join(&dir)).unwrap();
    assert_eq!(runs, "run\n");
}
