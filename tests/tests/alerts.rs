//! The alert rules operators install (docs/alerts/tollgate.rules.yml) are valid Prometheus
//! rules, each fires on a series that should trigger it and stays quiet beside it
//! (docs/alerts/tollgate.rules.test.yml, run by promtool), they name only series tollgate
//! exports, and docs/operations.md shows exactly that file.

use std::path::{Path, PathBuf};
use std::process::Command;

use tollgate_tests::require_program;

fn alerts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/alerts")
}

fn promtool(args: &[&str]) {
    let promtool = require_program("promtool", "prometheus");
    let out = Command::new(promtool)
        .args(args)
        .current_dir(alerts())
        .output()
        .expect("promtool runs");
    assert!(
        out.status.success(),
        "promtool {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_rules_are_valid() {
    promtool(&["check", "rules", "tollgate.rules.yml"]);
}

#[test]
fn each_alert_fires_when_it_should_and_only_then() {
    promtool(&["test", "rules", "tollgate.rules.test.yml"]);
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
    let exported = [
        tollgate::metrics::REQUESTS_TOTAL,
        tollgate::metrics::FAIL_OPEN_TOTAL,
        tollgate::metrics::FAIL_CLOSED_TOTAL,
        tollgate::metrics::FALLBACK_TOTAL,
        tollgate::metrics::STORE_EVICTIONS_TOTAL,
        tollgate::metrics::STORE_ERRORS_TOTAL,
        tollgate::metrics::STORE_DEGRADED,
        tollgate::metrics::STORE_DURATION_SECONDS,
        tollgate::metrics::DENY_CACHE_HITS_TOTAL,
        tollgate::metrics::CONCURRENCY_REQUESTS_TOTAL,
        tollgate::metrics::CONCURRENCY_FAIL_OPEN_TOTAL,
        tollgate::metrics::CONCURRENCY_FAIL_CLOSED_TOTAL,
    ];
    let mut rest = rules.as_str();
    let mut seen = 0;
    while let Some(at) = rest.find("ratelimit_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        // A histogram is scraped as its _bucket, _sum and _count series.
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(&name);
        assert!(
            exported.contains(&base),
            "{name} is not a series tollgate exports"
        );
        seen += 1;
        rest = &rest[at + name.len()..];
    }
    assert!(seen >= 6);
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
