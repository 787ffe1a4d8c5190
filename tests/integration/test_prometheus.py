"""The Prometheus exporter in a real 2-worker run on a local Ray: scraped over HTTP while the run trains,
ingested by a real Prometheus server that also evaluates monitoring/alerts.yml, closed at the end; and how the
metrics port is chosen (in use, port_search, monitoring=off)."""

from __future__ import annotations

import json
import math
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from prometheus_client.parser import text_string_to_metric_families

from trainer.config import Config
from trainer.errors import ConfigError, ExitCode
from trainer.job import run
from trainer.testing.configs import make_config

pytestmark = pytest.mark.usefixtures("local_ray")

MONITORING = Path(__file__).resolve().parents[2] / "monitoring"
SMALL = (
    "device=sim_npu",
    "model.n_layer=1",
    "model.n_embd=32",
    "model.seq_len=16",
    "train.global_batch_size=8",
)
STEPS = 300
# ~25 ms per step (a 20 ms collective delay on every all-reduce): ~8 s of training after ~5 s of start-up;
# scraping the exporter and querying a Prometheus server while the run is live takes ~2 s of it.
LIVE = (
    *SMALL,
    "cluster=ray_local",
    f"train.steps={STEPS}",
    "cluster.chunk_steps=10",
    "+faults.families={sim_npu: {collective_delay_s: 0.02}}",
)
METRICS_LINE = re.compile(r"metrics: http://127\.0\.0\.1:(\d+)/metrics")
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    what: str,
    probe: Callable[[], T | None],
    timeout_s: float,
    alive: Callable[[], bool],
    explain: Callable[[], str] = lambda: "",
) -> T:
    """Poll ``probe`` until it returns something other than None; fail after ``timeout_s`` or once
    ``alive()`` is false (the thing being watched has ended), adding ``explain()`` to the message."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = probe()
        except (OSError, ValueError, KeyError) as exc:  # not up yet, or an incomplete answer
            last_error, result = exc, None
        if result is not None:
            return result
        if not alive():
            pytest.fail(f"gave up waiting for {what}: it ended first (last error: {last_error}){explain()}")
        time.sleep(0.2)
    pytest.fail(f"no {what} within {timeout_s:.0f} s (last error: {last_error}){explain()}")


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """One scrape of the exporter: ``{(series name, labels): value}``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
        text = resp.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], series: str, **labels: str) -> float:
    return samples[(series, frozenset(labels.items()))]


class PrometheusServer:
    """The ``prometheus`` binary on 127.0.0.1, scraping one target every second and evaluating the rules."""

    def __init__(self, workdir: Path, target: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = workdir / "prometheus.yml"
        config.write_text(
            json.dumps(  # JSON is YAML
                {
                    "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(MONITORING / "alerts.yml")],
                    "scrape_configs": [{"job_name": "trainer", "static_configs": [{"targets": [target]}]}],
                }
            )
        )
        self.log = workdir / "prometheus.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    "prometheus",
                    f"--config.file={config}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self) -> str:
        return "\nprometheus log:\n" + "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])

    def get(self, path: str, **params: str) -> Any:
        url = f"{self.url}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                body = resp.read().decode()
        except urllib.error.HTTPError as exc:  # a bad query: the body says why
            body = exc.read().decode()
        return json.loads(body) if path.startswith("/api/") else body

    def query(self, promql: str) -> list[dict[str, Any]]:
        answer = self.get("/api/v1/query", query=promql)
        assert answer["status"] == "success", f"{promql}: {answer}"
        return list(answer["data"]["result"])

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


@dataclass
class LiveRun:
    port: int
    thread: threading.Thread
    prometheus: PrometheusServer | None
    outcome: dict[str, Any]

    def alive(self) -> bool:
        return self.thread.is_alive()


@pytest.fixture(scope="module")
def live_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveRun]:
    """A 2-worker run training in a background thread, its exporter on a free port; a Prometheus server
    (when the binary is installed) scraping it. Both are stopped, bounded in time, at the end."""
    home = tmp_path_factory.mktemp("live")
    port = free_port()
    config = make_config(*LIVE, f"monitoring.port={port}")
    prometheus = None
    if shutil.which("prometheus"):
        (home / "prometheus").mkdir()
        prometheus = PrometheusServer(home / "prometheus", f"127.0.0.1:{port}")
    outcome: dict[str, Any] = {}

    def train() -> None:
        try:
            outcome["code"] = run(config, run_dir=home / "run")
        except BaseException as exc:  # reported by test_live_run_finishes_and_closes_the_endpoint
            outcome["error"] = exc

    live = LiveRun(port, threading.Thread(target=train, name="live-run", daemon=True), prometheus, outcome)
    live.thread.start()
    try:
        yield live
    finally:
        live.thread.join(timeout=120)
        if prometheus is not None:
            prometheus.stop()


def test_exporter_serves_the_live_run_over_http(live_run: LiveRun) -> None:
    def stepping() -> dict[tuple[str, frozenset[tuple[str, str]]], float] | None:
        samples = scrape(live_run.port)
        return samples if value(samples, "trainer_step") > 0 else None

    first = wait_for("a scrape with trainer_step > 0", stepping, 60, live_run.alive)
    assert 0 < value(first, "trainer_step") <= value(first, "trainer_total_steps") == STEPS
    assert value(first, "trainer_world_size") == 2
    assert value(first, "trainer_run_info", name="default", family="sim_npu", world_size="2") == 1
    loss = value(first, "trainer_loss")
    assert math.isfinite(loss) and loss > 0
    assert value(first, "trainer_step_duration_seconds_count") > 0
    assert value(first, "trainer_probe_busbw_bytes_per_second", family="sim_npu") > 0
    assert value(first, "trainer_probe_link_bandwidth_bytes_per_second", family="sim_npu", link="0<->1") > 0
    for rank in ("0", "1"):
        assert 0 <= value(first, "trainer_rank_heartbeat_age_seconds", rank=rank) < 15
        assert value(first, "trainer_rank_step_duration_seconds", rank=rank) > 0

    def grown() -> dict[tuple[str, frozenset[tuple[str, str]]], float] | None:
        samples = scrape(live_run.port)
        return (
            samples
            if value(samples, "trainer_samples_total") > value(first, "trainer_samples_total")
            else None
        )

    later = wait_for("trainer_samples_total to grow", grown, 15, live_run.alive)
    assert value(later, "trainer_step") > value(first, "trainer_step")
    assert value(later, "trainer_samples_total") % 8 == 0  # whole global batches


def test_prometheus_server_scrapes_the_run_and_evaluates_the_alerts(live_run: LiveRun) -> None:
    server = live_run.prometheus
    if server is None:
        pytest.skip(
            "the prometheus binary is not on PATH (scripts/test.sh installs Debian's prometheus package)"
        )

    def ready() -> bool | None:
        return "Ready" in server.get("/-/ready") or None

    def both_alive() -> bool:
        return live_run.alive() and server.alive()

    wait_for("Prometheus to be ready", ready, 30, server.alive, server.log_tail)

    def ingested() -> list[dict[str, Any]] | None:
        result = server.query("trainer_step")
        return result if result and float(result[0]["value"][1]) > 0 else None

    [step] = wait_for("trainer_step > 0 through Prometheus' API", ingested, 60, both_alive, server.log_tail)
    assert step["metric"] == {
        "__name__": "trainer_step",
        "job": "trainer",
        "instance": f"127.0.0.1:{live_run.port}",
    }
    [world] = server.query("trainer_world_size")
    assert float(world["value"][1]) == 2

    # Every dashboard query is valid PromQL for this server (Grafana's variables filled in).
    dashboard = json.loads((MONITORING / "grafana" / "trainer.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in dashboard["annotations"]["list"] if "expr" in a]
    for expr in exprs:
        server.query(
            expr.replace("$job", "trainer").replace("$instance", ".*").replace("$__rate_interval", "5s")
        )

    # The alert rules evaluate on the live series without error, nothing fires on a healthy run, and a run
    # this young is below the goodput target (start-up is badput), so that alert is pending.
    def evaluated() -> list[dict[str, Any]] | None:
        rules = [r for g in server.get("/api/v1/rules")["data"]["groups"] for r in g["rules"]]
        return rules if rules and all(r["health"] != "unknown" for r in rules) else None

    rules = wait_for("the alert rules to be evaluated", evaluated, 15, server.alive, server.log_tail)
    assert {r["name"]: r.get("lastError", "") for r in rules if r["health"] != "ok"} == {}

    def goodput_pending() -> list[dict[str, Any]] | None:
        alerts = server.get("/api/v1/alerts")["data"]["alerts"]
        pending = [a for a in alerts if a["labels"]["alertname"] == "TrainerGoodputLow"]
        return alerts if pending and pending[0]["state"] == "pending" else None

    alerts = wait_for("TrainerGoodputLow to be pending", goodput_pending, 15, both_alive, server.log_tail)
    assert [a["labels"]["alertname"] for a in alerts if a["state"] == "firing"] == []


def test_live_run_finishes_and_closes_the_endpoint(live_run: LiveRun) -> None:
    live_run.thread.join(timeout=120)
    assert not live_run.alive(), "the run did not finish within 120 s"
    assert "error" not in live_run.outcome, live_run.outcome.get("error")
    assert live_run.outcome["code"] == ExitCode.FINISHED
    with pytest.raises(OSError):
        scrape(live_run.port)


# --- choosing the port ------------------------------------------------------------------------------------
@pytest.mark.parametrize("cluster", ["local", "ray_local"])
def test_metrics_port_in_use_is_a_config_error_naming_the_setting(cluster: str, tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = make_config(*SMALL, f"cluster={cluster}", "train.steps=2", f"monitoring.port={port}")
        with pytest.raises(ConfigError, match=rf"monitoring\.port={port} .*in use") as err:
            run(config, run_dir=tmp_path / "run")
    assert "monitoring.port_search" in str(err.value)  # says how to fix it


def test_port_search_takes_a_following_free_port(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = make_config(*SMALL, "train.steps=2", f"monitoring.port={port}", "monitoring.port_search=5")
        assert run(config, run_dir=tmp_path / "run") == ExitCode.FINISHED
    [chosen] = [int(p) for p in METRICS_LINE.findall(capsys.readouterr().out)]
    assert port < chosen <= port + 5
    with pytest.raises(OSError):  # closed at the end of the run
        scrape(chosen)


def test_monitoring_off_runs_without_a_server(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from monitoring.exporter import PrometheusSink

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("monitoring=off must not start the exporter")

    monkeypatch.setattr(PrometheusSink, "__init__", refuse)
    config: Config = make_config(*SMALL, "cluster=ray_local", "train.steps=10", "monitoring=off")
    assert config.monitoring["_target_"] == "trainer.metrics.NullSink"
    assert run(config, run_dir=tmp_path / "run") == ExitCode.FINISHED
    assert METRICS_LINE.search(capsys.readouterr().out) is None
