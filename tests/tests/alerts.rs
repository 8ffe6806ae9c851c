//! The alert rules operators install (docs/alerts/tollgate.rules.yml) are valid Prometheus
//! rules, each fires on a series that should trigger it and stays quiet beside it
//! (docs/alerts/tollgate.rules.test.yml, run by promtool), they name only series tollgate
//! exports, and docs/operations.md shows exactly that file.

use std::path::{Path, PathBuf};

use tollgate_tests::{promtool, series_named};

fn alerts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/alerts")
}

#[test]
fn the_rules_are_valid() {
    promtool(&["check", "rules", "tollgate.rules.yml"], &alerts());
}

#[test]
fn each_alert_fires_when_it_should_and_only_then() {
    promtool(&["test", "rules", "tollgate.rules.test.yml"], &alerts());
    // Every alert of the rules file has a test.
    let rules = std::fs::read_to_string(alerts().join("tollgate.rules.yml")).unwrap();
    let tests = std::fs::read_to_string(alerts().join("tollgate.rules.test.yml")).unwrap();
    let names: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert!(names.len() >= 6, "{names:?}");
    for name in names {
        assert!(
            tests.contains(&format!("alertname: {name}\n")),
            "{name} has no test in tollgate.rules.test.yml"
        );
    }
}

#[test]
fn the_rules_name_only_series_tollgate_exports() {
    let rules = std::fs::read_to_string(alerts().join("tollgate.rules.yml")).unwrap();
    let named = series_named(&rules);
    assert!(named.len() >= 6, "{named:?}");
    for name in named {
        assert!(
            tollgate::metrics::NAMES.contains(&name.as_str()),
            "{name} is not a series tollgate exports"
        );
    }
}

#[test]
fn the_runbook_shows_the_rules_file() {
    let rules = std::fs::read_to_string(alerts().join("tollgate.rules.yml")).unwrap();
    let runbook = std::fs::read_to_string(alerts().join("../operations.md")).unwrap();
    assert!(
        runbook.contains(&format!("```yaml\n{rules}```")),
        "docs/operations.md's alert rules differ from docs/alerts/tollgate.rules.yml"
    );
}
