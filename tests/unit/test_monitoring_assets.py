"""The monitoring assets (alert rules, their promtool tests, prometheus.yml, the Grafana dashboard) parse,
pass promtool, and name only metrics the exporter really exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from monitoring.exporter import PrometheusSink

MONITORING = Path(__file__).resolve().parents[2] / "monitoring"
ALERTS = MONITORING / "alerts.yml"
ALERTS_TEST = MONITORING / "alerts_test.yml"
PROMETHEUS_YML = MONITORING / "prometheus.yml"
DASHBOARD = MONITORING / "grafana" / "trainer.json"

# A metric name in PromQL; the look-behind keeps it from matching inside a longer identifier.
METRIC_NAME = re.compile(r"(?<![A-Za-z0-9_:])trainer_[a-z0-9_]+")
# The series names each metric type exposes besides its family name (``_created`` left out: it can be
# switched off with PROMETHEUS_DISABLE_CREATED_SERIES, so nothing may depend on it).
SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
    "info": ("_info",),
    "stateset": ("",),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
}
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not on PATH: scripts/test.sh installs Debian's prometheus package, which provides it",
)


@pytest.fixture(scope="module")
def exported_names() -> Iterator[set[str]]:
    """Every series name a real exporter serves, from its registry (no label set needs to exist yet)."""
    sink = PrometheusSink(port=0)
    try:
        names: set[str] = set()
        for family in sink.registry.collect():
            names.update(family.name + suffix for suffix in SUFFIXES[family.type])
            names.update(s.name for s in family.samples if not s.name.endswith("_created"))
        yield names
    finally:
        sink.close()


def _alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # collapsed rows hold their panels


def _dashboard_exprs(dashboard: dict[str, Any]) -> dict[str, str]:
    """Every PromQL expression of the dashboard, keyed by where it is: panel targets, annotations, variables."""
    exprs = {
        f"panel {panel['title']!r} target {target['refId']}": target["expr"]
        for panel in _panels(dashboard["panels"])
        for target in panel.get("targets", [])
    }
    for annotation in dashboard["annotations"]["list"]:
        if "expr" in annotation:
            exprs[f"annotation {annotation['name']!r}"] = annotation["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            exprs[f"variable {variable['name']!r}"] = query["query"] if isinstance(query, dict) else query
    return exprs


def _unknown_names(exprs: dict[str, str], known: set[str]) -> list[str]:
    return [
        f"{where}: {name}"
        for where, expr in exprs.items()
        for name in sorted(set(METRIC_NAME.findall(expr)))
        if name not in known
    ]


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], cwd=MONITORING.parent, capture_output=True, text=True, timeout=60, check=False
    )


# --- (a) the files parse and hold what they should ------------------------------------------------------
def test_alert_rules_parse_and_each_has_severity_summary_and_description() -> None:
    rules = _alert_rules()
    assert len(rules) >= 8
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)), f"duplicate alert names: {names}"
    for rule in rules:
        assert rule["expr"].strip(), rule["alert"]
        assert rule["labels"]["severity"] in ("info", "warning", "critical"), rule["alert"]
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]


def test_every_alert_has_promtool_cases_that_fire_and_that_do_not() -> None:
    cases = [
        case for test in yaml.safe_load(ALERTS_TEST.read_text())["tests"] for case in test["alert_rule_test"]
    ]
    fires = {case["alertname"] for case in cases if case.get("exp_alerts")}
    quiet = {case["alertname"] for case in cases if not case.get("exp_alerts")}
    names = {rule["alert"] for rule in _alert_rules()}
    assert names - fires == set(), "alerts without a test input that fires them"
    assert names - quiet == set(), "alerts without a test input that must not fire them"


def test_dashboard_is_a_grafana_model_with_a_prometheus_datasource_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    panels = [p for p in _panels(dashboard["panels"]) if p["type"] != "row"]
    ids = [p["id"] for p in _panels(dashboard["panels"])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, panel["title"]
        assert panel["targets"], panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
    exprs = " ".join(_dashboard_exprs(dashboard).values())
    for needed in (
        "trainer_loss",
        "trainer_samples_per_second",
        "trainer_tokens_per_second",
        "trainer_rank_step_duration_seconds",
        "trainer_rank_heartbeat_age_seconds",
        "trainer_probe_busbw_bytes_per_second",
        "trainer_probe_baseline_busbw_bytes_per_second",
        "trainer_probe_link_bandwidth_bytes_per_second",
        "trainer_goodput_ratio",
        "trainer_badput_seconds",
        "trainer_recoveries_total",
        "trainer_handovers_total",
        "trainer_checkpoint_duration_seconds_bucket",
        "trainer_last_checkpoint_timestamp_seconds",
    ):
        assert needed in exprs, f"no panel shows {needed}"
    marks = [a.get("expr", "") for a in dashboard["annotations"]["list"]]
    assert any("trainer_handovers_total" in m for m in marks) and any("trainer_run_info" in m for m in marks)


# --- (b) only exported metrics are referenced ------------------------------------------------------------
def test_exported_names_include_counter_and_histogram_series(exported_names: set[str]) -> None:
    assert {"trainer_step", "trainer_steps_total", "trainer_handovers_total"} <= exported_names
    assert {"trainer_step_duration_seconds_bucket", "trainer_step_duration_seconds_count"} <= exported_names
    assert "trainer_steps" not in exported_names  # a counter's bare family name is not a series


def test_alert_exprs_use_only_exported_metrics(exported_names: set[str]) -> None:
    exprs = {f"alert {rule['alert']}": rule["expr"] for rule in _alert_rules()}
    assert _unknown_names(exprs, exported_names) == []


def test_dashboard_exprs_use_only_exported_metrics(exported_names: set[str]) -> None:
    exprs = _dashboard_exprs(json.loads(DASHBOARD.read_text()))
    assert len(exprs) > 20
    assert _unknown_names(exprs, exported_names) == []


def test_unknown_metric_names_are_reported(exported_names: set[str]) -> None:
    # The check itself: a misspelt name and a counter without ``_total`` are caught.
    exprs = {"x": "rate(trainer_steps[5m]) + trainer_stepp", "y": "foo_trainer_step"}
    assert _unknown_names(exprs, exported_names) == ["x: trainer_stepp", "x: trainer_steps"]


# --- (c, d) promtool -------------------------------------------------------------------------------------
@needs_promtool
def test_promtool_checks_the_rules() -> None:
    result = _promtool("check", "rules", str(ALERTS.relative_to(MONITORING.parent)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_alert_rules())} rules found" in result.stdout


@needs_promtool
def test_promtool_unit_tests_of_the_rules_pass() -> None:
    result = _promtool("test", "rules", str(ALERTS_TEST.relative_to(MONITORING.parent)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_promtool
def test_promtool_checks_the_prometheus_config() -> None:
    result = _promtool("check", "config", str(PROMETHEUS_YML.relative_to(MONITORING.parent)))
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    [job] = config["scrape_configs"]
    assert job["job_name"] == "trainer"
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:9400"]
    assert config["rule_files"] == ["alerts.yml"]


def test_a_tasks_own_metrics_are_served_by_name() -> None:
    sink = PrometheusSink(port=0)
    try:
        sink.task_metrics({"accuracy": 0.75, "curriculum_level": 3.0})
        with urllib.request.urlopen(f"http://127.0.0.1:{sink.port}/metrics", timeout=5) as resp:
            served = resp.read().decode()
    finally:
        sink.close()
    assert 'trainer_task_metric{name="accuracy"} 0.75' in served
    assert 'trainer_task_metric{name="curriculum_level"} 3.0' in served
