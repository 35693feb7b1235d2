//! The module structure: no import circles, and no module importing from a
//! layer above its own. The layers are listed once, in docs/architecture.md
//! ("Layers"), and read from there, so the documentation and the code cannot
//! drift apart.
//!
//! The graph is built from the `crate::` and `super::` paths in src/. Its nodes
//! are the top-level modules, and the sub-modules of the modules in
//! [`SUBDIVIDED`], so that a circle between two sub-modules of one module is
//! found too. A sub-module may use its parent (the parent's `mod.rs` is its
//! interface), and a module anything inside itself.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Modules whose sub-modules are nodes of their own.
const SUBDIVIDED: &[&str] = &["exec", "dstream", "source", "sink", "state"];

const ARCHITECTURE: &str = "docs/architecture.md";

/// One import: where it is and what it names.
#[derive(Debug, Clone)]
struct Import {
    file: String,
    line: usize,
    path: String,
    from: String,
    to: String,
}

impl std::fmt::Display for Import {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}: `{}` ({} -> {})",
            self.file, self.line, self.path, self.from, self.to
        )
    }
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The layers, top first: each a set of top-level modules, read from the first
/// table under the "## Layers" heading of docs/architecture.md, a row a layer,
/// the modules in backticks in its first cell.
fn layers() -> Vec<Vec<String>> {
    let doc = std::fs::read_to_string(root().join(ARCHITECTURE)).unwrap();
    let section = doc
        .split("\n## ")
        .find(|s| s.starts_with("Layers\n"))
        .unwrap_or_else(|| panic!("{ARCHITECTURE} has no '## Layers' section"));
    let rows: Vec<Vec<String>> = section
        .lines()
        .filter(|l| l.starts_with('|'))
        .skip(2) // the header and its rule
        .map(|row| {
            let first = row.trim_start_matches('|').split('|').next().unwrap_or("");
            first
                .split('`')
                .skip(1)
                .step_by(2)
                .map(str::to_string)
                .collect()
        })
        .collect();
    assert!(
        !rows.is_empty() && rows.iter().all(|r| !r.is_empty()),
        "the Layers table of {ARCHITECTURE} must name the modules of each layer in backticks in its first column: {rows:?}"
    );
    rows
}

/// Every `.rs` file under `dir`, sorted.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out.sort();
}

/// The module path of a file below src/: `src/source/kafka/mod.rs` is `source::kafka`.
fn module_of(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts
}

/// The graph node a module path belongs to.
fn node(path: &[String], src: &Path) -> String {
    let top = &path[0];
    match path.get(1) {
        Some(sub)
            if SUBDIVIDED.contains(&top.as_str())
                && (src.join(top).join(format!("{sub}.rs")).exists()
                    || src.join(top).join(sub).join("mod.rs").exists()) =>
        {
            format!("{top}::{sub}")
        }
        _ => top.clone(),
    }
}

/// The file's text with comments blanked (lengths kept, so offsets still give lines).
fn code(text: &str) -> String {
    text.lines()
        .map(|line| {
            let mut in_string = false;
            let bytes = line.as_bytes();
            for i in 0..bytes.len() {
                match bytes[i] {
                    b'"' if i == 0 || bytes[i - 1] != b'\\' => in_string = !in_string,
                    b'/' if !in_string && bytes.get(i + 1) == Some(&b'/') => {
                        return format!("{}{}", &line[..i], " ".repeat(line.len() - i));
                    }
                    _ => {}
                }
            }
            line.to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// The path segments following `at` (`a::b::c`), and, for a group (`a::{b, c::d}`),
/// the first segment of each member after the common prefix.
fn paths_at(code: &str, at: usize) -> Vec<Vec<String>> {
    let bytes = code.as_bytes();
    let mut i = at;
    let mut prefix = Vec::new();
    loop {
        let start = i;
        while i < bytes.len() && is_ident(bytes[i]) {
            i += 1;
        }
        if i > start {
            prefix.push(code[start..i].to_string());
        }
        if code[i..].starts_with("::{") {
            let end = code[i..].find('}').map_or(code.len(), |e| i + e);
            return code[i + 3..end]
                .split(',')
                .map(|member| {
                    let mut path = prefix.clone();
                    path.extend(
                        member
                            .split("::")
                            .map(str::trim)
                            .filter(|s| !s.is_empty() && s.bytes().all(is_ident))
                            .map(str::to_string),
                    );
                    path
                })
                .collect();
        }
        if code[i..].starts_with("::") && i > start {
            i += 2;
        } else {
            return vec![prefix];
        }
    }
}

/// Every import of every file under src/ that crosses nodes.
fn imports() -> Vec<Import> {
    let src = root().join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut found = Vec::new();
    for file in files {
        let rel = file.strip_prefix(&src).unwrap().to_path_buf();
        // The crate root declares every module; the binary is above them all.
        if rel == Path::new("lib.rs") || rel.starts_with("bin") || rel == Path::new("main.rs") {
            continue;
        }
        let module = module_of(&rel);
        let from = node(&module, &src);
        let text = std::fs::read_to_string(&file).unwrap();
        let code = code(&text);
        // `super` in a file's test module (always at its end) starts one level deeper.
        let tests_start = code.find("#[cfg(test)]\nmod tests").unwrap_or(code.len());
        let tests_start = code
            .find("#[cfg(test)]\npub(crate) mod tests")
            .unwrap_or(tests_start);
        let mut hits: Vec<(usize, Vec<String>)> = Vec::new();
        for (at, _) in code.match_indices("crate::") {
            if at > 0 && is_ident(code.as_bytes()[at - 1]) {
                continue;
            }
            for path in paths_at(&code, at + "crate::".len()) {
                hits.push((at, path));
            }
        }
        for (at, _) in code.match_indices("super::") {
            let before = &code[..at];
            if before.ends_with("super::") || before.bytes().last().is_some_and(is_ident) {
                continue;
            }
            let mut base = module.clone();
            if at > tests_start {
                base.push("tests".into());
            }
            let mut rest = at;
            while code[rest..].starts_with("super::") {
                base.pop();
                rest += "super::".len();
            }
            for path in paths_at(&code, rest) {
                let mut full = base.clone();
                full.extend(path);
                hits.push((at, full));
            }
        }
        let mut seen = BTreeSet::new();
        for (at, path) in hits {
            if path.is_empty() {
                continue;
            }
            let to = node(&path, &src);
            let (f, t) = (format!("{from}::"), format!("{to}::"));
            if to == from || f.starts_with(&t) || t.starts_with(&f) {
                continue;
            }
            let line = code[..at].matches('\n').count() + 1;
            if !seen.insert((line, to.clone())) {
                continue; // one line's group naming two items of one module
            }
            found.push(Import {
                file: format!("src/{}", rel.display()),
                line,
                path: text.lines().nth(line - 1).unwrap_or("").trim().to_string(),
                from: from.clone(),
                to,
            });
        }
    }
    found
}

fn top(node: &str) -> &str {
    node.split("::").next().unwrap_or(node)
}

#[test]
fn every_module_is_in_one_layer_and_imports_only_its_own_or_lower_layers() {
    let layers = layers();
    let mut layer_of = BTreeMap::new();
    for (i, layer) in layers.iter().enumerate() {
        for module in layer {
            assert!(
                layer_of.insert(module.clone(), i).is_none(),
                "{ARCHITECTURE} lists `{module}` in two layers"
            );
        }
    }
    let src = root().join("src");
    let mut modules = BTreeSet::new();
    let mut files = Vec::new();
    sources(&src, &mut files);
    for file in &files {
        let rel = file.strip_prefix(&src).unwrap();
        if rel != Path::new("lib.rs") && rel != Path::new("main.rs") && !rel.starts_with("bin") {
            modules.insert(module_of(rel)[0].clone());
        }
    }
    let mut problems = String::new();
    for module in modules.iter().filter(|m| !layer_of.contains_key(*m)) {
        writeln!(problems, "  `{module}` is in no layer").unwrap();
    }
    for module in layer_of.keys().filter(|m| !modules.contains(*m)) {
        writeln!(
            problems,
            "  `{module}` is listed but src/ has no such module"
        )
        .unwrap();
    }
    for import in imports() {
        if !modules.contains(top(&import.to)) {
            writeln!(
                problems,
                "  {import}: names an item the crate root re-exports; name its module instead"
            )
            .unwrap();
            continue;
        }
        let (Some(from), Some(to)) = (
            layer_of.get(top(&import.from)),
            layer_of.get(top(&import.to)),
        ) else {
            continue;
        };
        if to < from {
            writeln!(
                problems,
                "  {import}: `{}` is in a higher layer than `{}`",
                top(&import.to),
                top(&import.from)
            )
            .unwrap();
        }
    }
    assert!(
        problems.is_empty(),
        "the modules do not follow the layers of {ARCHITECTURE}:\n{problems}"
    );
}

#[test]
fn no_import_circles() {
    let imports = imports();
    let mut graph: BTreeMap<&str, BTreeMap<&str, &Import>> = BTreeMap::new();
    for import in &imports {
        graph
            .entry(&import.from)
            .or_default()
            .entry(&import.to)
            .or_insert(import);
    }
    // A depth-first search; a node met again on the current path closes a circle.
    fn visit<'a>(
        node: &'a str,
        graph: &BTreeMap<&'a str, BTreeMap<&'a str, &'a Import>>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
        circles: &mut Vec<Vec<&'a Import>>,
    ) {
        if let Some(at) = path.iter().position(|n| *n == node) {
            let mut ring: Vec<&str> = path[at..].to_vec();
            ring.push(node);
            circles.push(ring.windows(2).map(|w| graph[w[0]][w[1]]).collect());
            return;
        }
        if !done.insert(node) {
            return;
        }
        path.push(node);
        for next in graph.get(node).into_iter().flat_map(|n| n.keys()) {
            visit(next, graph, path, done, circles);
        }
        path.pop();
    }
    let mut circles = Vec::new();
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        visit(node, &graph, &mut Vec::new(), &mut done, &mut circles);
    }
    let mut report = String::new();
    for circle in &circles {
        let names: Vec<&str> = circle.iter().map(|i| i.from.as_str()).collect();
        writeln!(report, "{} -> {}:", names.join(" -> "), names[0]).unwrap();
        for import in circle {
            writeln!(report, "  {import}").unwrap();
        }
    }
    assert!(circles.is_empty(), "import circles:\n{report}");
}
