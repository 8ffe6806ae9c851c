//! The Grafana dashboard operators import (docs/dashboards/tollgate.json): every query is valid
//! PromQL (checked by promtool), names only series tollgate exports, and together the panels
//! show every series tollgate exports. `tests/tests/prometheus.rs` runs the same queries
//! against a real Prometheus scraping the demo.

use std::path::{Path, PathBuf};

use tollgate_tests::{
    as_prometheus_sees_it, dashboard_path, dashboard_queries, promtool, series_named,
};

#[test]
fn every_query_names_only_series_tollgate_exports_and_every_series_is_shown() {
    let queries = dashboard_queries();
    let mut shown = std::collections::BTreeSet::new();
    for q in &queries {
        let named = series_named(q);
        assert!(!named.is_empty(), "{q} names no tollgate series");
        for name in named {
            assert!(
                tollgate::metrics::NAMES.contains(&name.as_str()),
                "{name} (in {q}) is not a series tollgate exports"
            );
            shown.insert(name);
        }
    }
    let missing: Vec<&str> = tollgate::metrics::NAMES
        .iter()
        .copied()
        .filter(|n| !shown.contains(*n))
        .collect();
    assert!(missing.is_empty(), "no panel shows {missing:?}");
}

#[test]
fn every_query_is_valid_promql() {
    // promtool checks expressions in rules files: one recording rule per query.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, q) in dashboard_queries().iter().enumerate() {
        let expr = as_prometheus_sees_it(q).replace('\'', "''");
        rules.push_str(&format!(
            "      - record: dashboard:query_{i}\n        expr: '{expr}'\n"
        ));
    }
    let file = tollgate_tests::config_file(&rules);
    let dir = file.path().parent().expect("a temp dir").to_owned();
    let name = file.path().file_name().expect("a file name").to_owned();
    promtool(
        &[std::ffi::OsStr::new("check"), "rules".as_ref(), &name],
        &dir,
    );
}

#[test]
fn the_variables_read_series_tollgate_exports() {
    let text = std::fs::read_to_string(dashboard_path()).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let vars = dashboard["templating"]["list"].as_array().unwrap();
    let names: Vec<&str> = vars.iter().filter_map(|v| v["name"].as_str()).collect();
    assert_eq!(names, ["datasource", "job", "policy"]);
    for v in vars.iter().filter(|v| v["type"] == "query") {
        let query = v["query"]["query"].as_str().unwrap();
        for name in series_named(query) {
            assert!(tollgate::metrics::NAMES.contains(&name.as_str()), "{query}");
        }
    }
}

/// The list the tests check against is every series the crates emit: a new metric must be
/// added to `tollgate::metrics::NAMES` (and so to the dashboard).
#[test]
fn names_lists_every_series_the_code_emits() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut emitted = std::collections::BTreeSet::new();
    for dir in ["crates/tollgate/src", "crates/tollgate-redis/src"] {
        for entry in walk(&root.join(dir)) {
            let text = std::fs::read_to_string(&entry).unwrap();
            let mut rest = text.as_str();
            while let Some(at) = rest.find("\"ratelimit_") {
                let name: String = rest[at + 1..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                rest = &rest[at + 1 + name.len()..];
                emitted.insert(name);
            }
        }
    }
    let listed: std::collections::BTreeSet<String> = tollgate::metrics::NAMES
        .iter()
        .map(|n| (*n).to_owned())
        .collect();
    assert_eq!(emitted, listed);
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}
