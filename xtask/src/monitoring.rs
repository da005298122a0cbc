//! The alert rules, their tests, the runbooks and the dashboard agree with each other and with
//! the metrics Keel exports.
//!
//! promtool itself (`promtool check rules`, `promtool test rules`, and a parse of every panel
//! query) runs in `.ci/run`; these tests check what promtool cannot: that every failure mode has
//! an alert, every alert a runbook section and a firing and a non-firing test case, that the
//! PrometheusRule is the rules file, and that no query names a metric Keel does not export.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use prometheus_client::registry::Registry;
use serde_json::Value;

/// The failure modes that must page or warn someone, by alert name.
const REQUIRED_ALERTS: &[(&str, &str)] = &[
    ("KeelPropagationUnexpectedSkips", "unexpected skips rising"),
    ("KeelPropagationDeadLettered", "any dead letter"),
    (
        "KeelPropagationUnsupportedDeadLettered",
        "any dead letter no runner could run",
    ),
    (
        "KeelProvisionPersistenceFailed",
        "provision.persistence_failed",
    ),
    ("KeelProvisionTeardownFailed", "teardown failures"),
    ("KeelProvisionUncompensated", "uncompensated reservations"),
    ("KeelOrphanBacklog", "orphan backlog > 0 for 1h"),
    ("KeelOrphanBacklogHigh", "orphan backlog > 25"),
    ("KeelOrphanSweepFailing", "sweep tick failures"),
    ("KeelOrphanSweepStalled", "enabled sweep completes no tick"),
    ("KeelRaterAttention", "rater exit 2"),
    ("KeelRaterFailed", "rater failed"),
    ("KeelRaterNotRun", "rater not run for 2h"),
    ("KeelRunnerNotReady", "runner not ready"),
    ("KeelProvisionApiNotReady", "API not ready"),
];

/// Families exported by binaries this workspace does not register in a test: the rater pushes
/// its run's facts to a Pushgateway, and `keel_ready` exists only beside a readiness check.
/// `up` is Prometheus's own.
const PUSHED_OR_CONDITIONAL: &[&str] = &[
    "instant_rater_last_success_timestamp_seconds",
    "instant_rater_last_run_timestamp_seconds",
    "instant_rater_last_exit_code",
    "instant_rater_runs_total",
    "instant_rater_rated_rows_total",
    "instant_rater_late_events_total",
    "keel_ready",
    "up",
];

fn yaml(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn alerts(rules: &Value) -> Vec<&Value> {
    rules["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|group| group["rules"].as_array().unwrap())
        .filter(|rule| rule.get("alert").is_some())
        .collect()
}

/// The series names Keel's registries expose, as Prometheus stores them.
fn exported_series() -> BTreeSet<String> {
    let mut registry = Registry::default();
    keel_propagation::Metrics::register(&mut registry);
    keel_provision::ProvisionMetrics::register(&mut registry);
    keel_orphan_sweep::SweepMetrics::register(&mut registry);
    keel_audit::notify_metrics::NotifyMetrics::register(&mut registry);
    let text =
        keel_service::http::encode(&registry, keel_service::http::Format::PrometheusText).unwrap();
    let mut names = BTreeSet::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let name = line.split(['{', ' ']).next().unwrap().to_owned();
        names.insert(name);
    }
    names.extend(PUSHED_OR_CONDITIONAL.iter().map(|n| (*n).to_owned()));
    names
}

/// Metric names a PromQL expression selects: identifiers that are followed by `{`, `[`, `)`,
/// whitespace or the end, and are not functions, keywords or label names.
fn metric_names(expr: &str) -> BTreeSet<String> {
    const WORDS: &[&str] = &[
        "sum",
        "max",
        "min",
        "by",
        "without",
        "rate",
        "increase",
        "absent",
        "time",
        "and",
        "or",
        "unless",
        "histogram_quantile",
        "le",
        "on",
        "ignoring",
        "offset",
        "bool",
    ];
    // Drop quoted strings and label matchers' contents, then the grouping lists.
    let mut cleaned = String::new();
    let mut depth_braces = 0;
    let mut in_quote = false;
    for c in expr.chars() {
        match c {
            '"' => in_quote = !in_quote,
            _ if in_quote => {}
            '{' => depth_braces += 1,
            '}' => depth_braces -= 1,
            _ if depth_braces > 0 => {}
            _ => cleaned.push(c),
        }
    }
    let mut names = BTreeSet::new();
    let mut rest = cleaned.as_str();
    // Grouping clauses `by (a, b)` name labels, not metrics.
    let mut without_groupings = String::new();
    while let Some(at) = rest.find(" by (") {
        without_groupings.push_str(&rest[..at]);
        let close = rest[at..].find(')').map_or(rest.len(), |c| at + c + 1);
        rest = &rest[close..];
    }
    without_groupings.push_str(rest);
    for word in without_groupings
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|w| !w.is_empty())
    {
        if word.chars().next().is_some_and(|c| c.is_ascii_digit()) || WORDS.contains(&word) {
            continue;
        }
        // Durations like 5m, 1h were skipped as digits; anything else is a metric.
        names.insert(word.to_owned());
    }
    names
}

#[test]
fn every_failure_mode_has_an_alert_with_a_runbook_and_tests_that_fire_and_do_not() {
    let root = super::workspace_root();
    let rules = yaml(&root.join("deploy/prometheus/rules.yaml"));
    let tests = yaml(&root.join("deploy/prometheus/rules.test.yaml"));
    let runbooks = std::fs::read_to_string(root.join("docs/runbooks.md")).unwrap();
    let sections: BTreeSet<String> = runbooks
        .lines()
        .filter_map(|l| l.strip_prefix("## "))
        .map(|heading| heading.trim().to_lowercase())
        .collect();

    let alerts = alerts(&rules);
    let names: BTreeSet<&str> = alerts
        .iter()
        .map(|a| a["alert"].as_str().unwrap())
        .collect();
    for (name, mode) in REQUIRED_ALERTS {
        assert!(names.contains(name), "no alert {name} for {mode}");
    }

    // alertname -> (cases that expect it to fire, cases that expect silence)
    let mut cases: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for test in tests["tests"].as_array().unwrap() {
        for case in test["alert_rule_test"].as_array().into_iter().flatten() {
            let name = case["alertname"].as_str().unwrap().to_owned();
            let fires = case["exp_alerts"].as_array().is_some_and(|a| !a.is_empty());
            let entry = cases.entry(name).or_default();
            if fires {
                entry.0 += 1;
            } else {
                entry.1 += 1;
            }
        }
    }

    for alert in alerts {
        let name = alert["alert"].as_str().unwrap();
        let severity = alert["labels"]["severity"].as_str().unwrap_or_default();
        assert!(
            ["critical", "warning"].contains(&severity),
            "{name}: severity {severity:?}"
        );
        let summary = alert["annotations"]["summary"].as_str().unwrap_or_default();
        assert!(!summary.is_empty(), "{name}: no summary");
        let url = alert["annotations"]["runbook_url"]
            .as_str()
            .unwrap_or_default();
        let anchor = url
            .strip_prefix("docs/runbooks.md#")
            .unwrap_or_else(|| panic!("{name}: runbook_url {url:?} is not docs/runbooks.md#…"));
        assert!(
            sections.contains(anchor),
            "{name}: no runbook section {anchor}"
        );
        let (fire, silent) = cases.get(name).copied().unwrap_or_default();
        assert!(fire > 0, "{name}: no test case where it fires");
        assert!(silent > 0, "{name}: no test case where it stays silent");
    }
    for name in cases.keys() {
        assert!(
            names.contains(name.as_str()),
            "a test for unknown alert {name}"
        );
    }
}

#[test]
fn the_prometheus_rule_object_is_the_rules_file() {
    let root = super::workspace_root();
    let rules = yaml(&root.join("deploy/prometheus/rules.yaml"));
    let object = yaml(&root.join("deploy/monitoring/prometheusrule.yaml"));
    assert_eq!(object["kind"], "PrometheusRule");
    assert_eq!(
        object["spec"]["groups"], rules["groups"],
        "deploy/monitoring/prometheusrule.yaml differs from deploy/prometheus/rules.yaml"
    );
}

#[test]
fn rules_and_dashboard_query_only_metrics_keel_exports() {
    let root = super::workspace_root();
    let exported = exported_series();
    let rules = yaml(&root.join("deploy/prometheus/rules.yaml"));
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("deploy/grafana/keel.json")).unwrap(),
    )
    .unwrap();

    let mut queries: Vec<(String, String)> = alerts(&rules)
        .into_iter()
        .map(|a| {
            (
                a["alert"].as_str().unwrap().to_owned(),
                a["expr"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let mut rows = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        if panel["type"] == "row" {
            rows += 1;
            continue;
        }
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel {} has no query", panel["title"]);
        for target in targets {
            queries.push((
                panel["title"].as_str().unwrap().to_owned(),
                target["expr"].as_str().unwrap().to_owned(),
            ));
        }
    }
    assert!(rows >= 5, "one row per concern and one for service health");

    let mut used = BTreeSet::new();
    for (what, expr) in &queries {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{what}: no metric found in {expr}");
        for name in names {
            assert!(
                exported.contains(&name),
                "{what}: {name} is not exported by Keel ({expr})"
            );
            used.insert(name);
        }
    }
    // The seed metrics are on the dashboard.
    for seed in [
        "instant_propagation_unexpected_skip_total",
        "instant_orphan_db_sweep_candidates_total",
        "instant_orphan_db_sweep_candidates_current",
    ] {
        assert!(used.contains(seed), "{seed} is on no panel or alert");
    }
}

#[test]
fn metric_names_are_read_from_promql() {
    let check = |expr: &str, expected: &[&str]| {
        let got = metric_names(expr);
        let expected: BTreeSet<String> = expected.iter().map(|s| (*s).to_owned()).collect();
        assert_eq!(got, expected, "{expr}");
    };
    check(
        r#"sum by (kind, skip_reason) (increase(instant_propagation_unexpected_skip_total{kind="x"}[15m])) > 0"#,
        &["instant_propagation_unexpected_skip_total"],
    );
    check(
        "histogram_quantile(0.95, sum by (le, kind) (rate(instant_propagation_apply_duration_seconds_bucket[5m])))",
        &["instant_propagation_apply_duration_seconds_bucket"],
    );
    check(
        r#"(min by (job, instance) (keel_ready{job="a"}) == 0) or absent(up{job="a"})"#,
        &["keel_ready", "up"],
    );
    check(
        "time() - max by (job) (instant_rater_last_success_timestamp_seconds) > 7200",
        &["instant_rater_last_success_timestamp_seconds"],
    );
}
