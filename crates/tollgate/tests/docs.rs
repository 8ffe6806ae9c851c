//! What the README and the guides name can be imported as they show it.
//!
//! Every type of this crate that a document names by itself (in backticks, without a path)
//! must be importable from the crate root, or the same document must show where it lives (a
//! path ending in it, or a `use tollgate::...` line naming it). The code blocks of these
//! documents are doctests too; this catches the prose around them.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Every `pub struct`, `pub enum` and `pub trait` of the crate's sources.
fn public_types() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut dirs = vec![root().join("crates/tollgate/src")];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                for line in fs::read_to_string(&path).unwrap().lines() {
                    let line = line.trim_start();
                    for kind in ["pub struct ", "pub enum ", "pub trait "] {
                        if let Some(rest) = line.strip_prefix(kind) {
                            let name: String = rest
                                .chars()
                                .take_while(char::is_ascii_alphanumeric)
                                .collect();
                            names.insert(name);
                        }
                    }
                }
            }
        }
    }
    names
}

/// The names `lib.rs` re-exports at the crate root.
fn root_exports() -> BTreeSet<String> {
    let lib = fs::read_to_string(root().join("crates/tollgate/src/lib.rs")).unwrap();
    let mut names = BTreeSet::new();
    for line in lib.lines().filter(|l| l.starts_with("pub use ")) {
        let list = line
            .split_once('{')
            .map_or_else(|| line.rsplit("::").next().unwrap_or(""), |(_, rest)| rest);
        for name in list.split([',', '}', ';']) {
            let name = name.trim();
            if !name.is_empty() {
                names.insert(name.to_owned());
            }
        }
    }
    names
}

fn documents() -> Vec<PathBuf> {
    let root = root();
    let mut docs = vec![
        root.join("README.md"),
        root.join("crates/tollgate/README.md"),
        root.join("crates/tollgate-redis/README.md"),
        root.join("examples/demo/README.md"),
    ];
    for entry in fs::read_dir(root.join("docs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            docs.push(path);
        }
    }
    docs
}

/// The backticked words of `text` that are a bare identifier (`Foo`, not `a::Foo` or `Foo::x`).
fn bare_names(text: &str) -> BTreeSet<&str> {
    text.split('`')
        .skip(1)
        .step_by(2)
        .filter(|w| !w.is_empty() && w.chars().all(|c| c.is_ascii_alphanumeric()))
        .filter(|w| w.starts_with(|c: char| c.is_ascii_uppercase()))
        .collect()
}

/// Whether `text` shows where `name` lives: `...::Name` or a `use tollgate::` line naming it.
fn shows_path(text: &str, name: &str) -> bool {
    let is_word = |hay: &str| {
        hay.match_indices(name).any(|(i, _)| {
            let before = hay[..i].chars().next_back();
            let after = hay[i + name.len()..].chars().next();
            !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
                && !after.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        })
    };
    text.match_indices(&format!("::{name}"))
        .any(|(i, _)| is_word(&text[i + 2..]))
        || text
            .lines()
            .filter(|l| l.trim_start().starts_with("use tollgate"))
            .any(is_word)
}

#[test]
fn every_type_the_docs_name_can_be_found() {
    let types = public_types();
    let exported = root_exports();
    assert!(exported.contains("ConcurrencyLimitLayer"), "{exported:?}");
    let mut missing = Vec::new();
    for doc in documents() {
        let text = fs::read_to_string(&doc).unwrap();
        for name in bare_names(&text) {
            if types.contains(name) && !exported.contains(name) && !shows_path(&text, name) {
                missing.push(format!("{}: `{name}`", doc.display()));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "named without a path, and not at the crate root:\n{}",
        missing.join("\n")
    );
}

/// The types the README's first page names, imported as a user writes them.
#[test]
fn the_readmes_names_import_from_the_root() {
    #[allow(unused_imports)]
    use tollgate::{
        ConcurrencyLimitLayer, ConcurrencyPolicy, FailureMode, Identity, KeyExtractor,
        MemoryConcurrencyStore, MemoryStore, Policy, Quota, RateLimitLayer,
    };
    let _ = ConcurrencyLimitLayer::new(MemoryConcurrencyStore::new())
        .policy(ConcurrencyPolicy::new("c", 1));
}

#[test]
fn the_checks_see_what_they_look_for() {
    assert_eq!(
        bare_names("a `Foo` and `x::Bar` and `Baz::new` and `lower`"),
        BTreeSet::from(["Foo"])
    );
    assert!(shows_path(
        "use tollgate::clock::{Clock, ManualClock};",
        "ManualClock"
    ));
    assert!(shows_path(
        "see `tollgate::clock::ManualClock`",
        "ManualClock"
    ));
    assert!(!shows_path(
        "see `ManualClockish` and `ManualClock`",
        "ManualClock"
    ));
    assert!(!shows_path(
        "use tollgate::clock::ManualClockX;",
        "ManualClock"
    ));
    assert!(public_types().contains("ManualClock"));
    assert!(root_exports().contains("RateLimitLayer"));
}

/// docs/benchmarks.md's measured figures are what scripts/bench-report derives from the raw
/// outputs kept in docs/bench/: a figure typed or changed by hand fails this.
#[test]
fn the_benchmark_figures_are_derived_by_the_script() {
    let out = std::process::Command::new("python3")
        .arg(root().join("scripts/bench-report"))
        .arg(root().join("docs/bench"))
        .arg("--check")
        .current_dir(root())
        .output()
        .expect("python3 runs scripts/bench-report (install python3)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// docs/operations.md lists every value the `decision` label takes, as a table row.
#[test]
fn the_runbook_lists_every_decision() {
    let runbook = fs::read_to_string(root().join("docs/operations.md")).unwrap();
    for decision in tollgate::metrics::DECISIONS {
        assert!(
            runbook.contains(&format!("| `{decision}` |")),
            "docs/operations.md does not list the decision `{decision}`"
        );
    }
}
