//! The installer of the tests' tools (tests/common/tools.rs), on throwaway tools
//! installed under target/tools.

#[path = "common/tools.rs"]
#[allow(dead_code)]
mod tools;

use std::path::Path;

use tools::Tool;

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

fn tool(name: &'static str, installed: String, install: Vec<String>) -> Tool {
    Tool {
        name,
        on_path: None,
        installed: leak(installed),
        as_root: false,
        install: Box::leak(install.into_iter().map(leak).collect()),
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
    let pid = std::process::id();
    let missing = tool(
        "a tool nobody can install",
        format!("target/tools/never-{pid}"),
        // Spaces as typed: any run of them separates words.
        vec!["true".into(), format!("ls  -d\ttarget/tools/never-{pid}")],
    );
    let message = panic_message(|| {
        missing.get();
    });
    assert_eq!(
        message,
        format!(
            "could not install a tool nobody can install: `ls -d target/tools/never-{pid}` \
             failed (exit status: 2; its output is above).\n\
             Install it by hand, from {repo}:\n    \
             true && ls -d target/tools/never-{pid}\n\
             The install puts it at {repo}/target/tools/never-{pid}."
        )
    );

    let unknown = tool(
        "a tool installed by a missing program",
        format!("target/tools/never-{pid}"),
        vec![format!("no-such-installer-{pid} --yes")],
    );
    let message = panic_message(|| {
        unknown.get();
    });
    assert!(
        message.starts_with(&format!(
            "could not install a tool installed by a missing program: \
             `no-such-installer-{pid} --yes` could not start: No such file or directory"
        )),
        "{message}"
    );

    let misplaced = tool(
        "a tool installed elsewhere",
        format!("target/tools/never-{pid}"),
        vec!["true".into()],
    );
    let message = panic_message(|| {
        misplaced.get();
    });
    assert!(
        message.starts_with(&format!(
            "could not install a tool installed elsewhere: the install finished but left no \
             {repo}/target/tools/never-{pid}.\nInstall it by hand"
        )),
        "{message}"
    );
}

#[test]
fn concurrent_users_install_once_and_later_ones_install_nothing() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = format!("target/tools/once-{}", std::process::id());
    std::fs::create_dir_all(repo.join(&dir)).unwrap();
    // Slow enough that the other threads ask while it installs.
    std::fs::write(
        repo.join(&dir).join("install.sh"),
        format!("echo run >> {dir}/runs && sleep 0.5 && touch {dir}/bin\n"),
    )
    .unwrap();
    let counted = tool(
        "a tool installed once",
        format!("{dir}/bin"),
        vec![format!("sh {dir}/install.sh")],
    );
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
