"""deploy/monitoring/ reads only what the service exposes: every alert and every dashboard query, checked
against the /metrics of a running `python -m worker run` that has ingested jobs of both kinds.

PromQL is parsed with a real parser (promql-parser), so a metric name inside a function, a binary
operation or a subquery is found, and label names or function names are never mistaken for metrics.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import promql_parser
import yaml
from prometheus_client.parser import text_string_to_metric_families
from test_service_process import get, start_worker  # noqa: F401 - start_worker is a fixture
from test_service_support import Queues, enveloped, send, unique_id

from worker.local import synth

REPO = Path(__file__).resolve().parents[1]
MONITORING = REPO / "deploy" / "monitoring"
SCOPE = ("namespace", "job")
# Grafana fills these in before Prometheus sees a query; a fixed stand-in lets the PromQL parser read it.
_GRAFANA_VARIABLES = {"$__rate_interval": "1m", "${namespace}": "rekognition", "$namespace": "rekognition",
                      "${job}": "rekognition-worker-metrics", "$job": "rekognition-worker-metrics"}


def as_promql(grafana_expr: str) -> str:
    for variable, value in _GRAFANA_VARIABLES.items():
        grafana_expr = grafana_expr.replace(variable, value)
    return grafana_expr


def metric_names(expr: str) -> set[str]:
    """Every metric name a PromQL expression selects."""
    names: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            names.add(node.name)
            return
        for attr in ("lhs", "rhs", "expr", "args", "param", "vector_selector"):
            child = getattr(node, attr, None)
            for item in child if isinstance(child, list) else [child]:
                if item is not None and hasattr(item, "prettify"):
                    walk(item)

    walk(promql_parser.parse(as_promql(expr)))
    return names


def _children(node: Any) -> list[Any]:
    children = []
    for attr in ("lhs", "rhs", "expr", "args", "vector_selector"):
        child = getattr(node, attr, None)
        children += [item for item in (child if isinstance(child, list) else [child]) if hasattr(item, "prettify")]
    return children


def unscoped(expr: str) -> list[str]:
    """The parts of an alert expression whose result drops the namespace or job label, so two deployments in
    one Prometheus would be merged into one alert. `x or absent(...)` is allowed: absent() can only name the
    labels of its own selector, and fires only when no deployment is scraped at all."""
    problems: list[str] = []

    def keeps(node: Any) -> bool:
        if isinstance(node, promql_parser.AggregateExpr):
            labels = set(node.modifier.labels) if node.modifier else set()
            by = node.modifier is not None and node.modifier.type == promql_parser.AggModifierType.By
            if (by and not set(SCOPE) <= labels) or (not by and (node.modifier is None or labels & set(SCOPE))):
                problems.append(node.prettify())
                return False
            return keeps(node.expr)
        if isinstance(node, promql_parser.BinaryExpr):
            matching = node.modifier.matching if node.modifier else None
            if matching is not None:
                on = matching.type == promql_parser.LabelModifierType.Include
                if (on and not set(SCOPE) <= set(matching.labels)) or (not on and set(SCOPE) & set(matching.labels)):
                    problems.append(node.prettify())
            if str(node.op) == "or" and isinstance(node.rhs, promql_parser.Call) and node.rhs.func.name == "absent":
                return keeps(node.lhs)
            return all([keeps(child) for child in (node.lhs, node.rhs)])
        if isinstance(node, promql_parser.Call) and node.func.name in ("absent", "absent_over_time"):
            problems.append(node.prettify())
            return False
        return all([keeps(child) for child in _children(node)])

    keeps(promql_parser.parse(expr))
    return problems


def alert_rules() -> list[dict[str, Any]]:
    rule = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text(encoding="utf-8"))
    return [r for group in rule["spec"]["groups"] for r in group["rules"] if "alert" in r]


def alert_expressions() -> dict[str, str]:
    return {r["alert"]: r["expr"] for r in alert_rules()}


def dashboard() -> dict[str, Any]:
    return json.loads((MONITORING / "grafana-dashboard.json").read_text(encoding="utf-8"))


def panel_expressions() -> dict[str, str]:
    return {f"{p['title']} [{t['refId']}]": t["expr"] for p in dashboard()["panels"] for t in p["targets"]}


def selectors(expr: str) -> list[Any]:
    found: list[Any] = []

    def walk(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            found.append(node)
        for child in _children(node):
            walk(child)

    walk(promql_parser.parse(expr))
    return found


def exposed_samples(metrics_text: str) -> set[str]:
    """Names of the samples on a /metrics page (histograms expose _bucket, _sum and _count)."""
    return {sample.name for family in text_string_to_metric_families(metrics_text) for sample in family.samples}


def unexposed(expressions: dict[str, str], exposed: set[str]) -> dict[str, set[str]]:
    return {where: missing for where, expr in expressions.items() if (missing := metric_names(expr) - exposed)}


def test_metric_names_are_found_wherever_promql_puts_them() -> None:
    expr = ('histogram_quantile(0.9, sum by (le, operation) (rate(worker_a_bucket{operation="x"}[5m]))) '
            '/ on() group_left clamp_min(-worker_b offset 5m, 1) and max_over_time(worker_c[1h:1m]) or absent(d)')
    assert metric_names(expr) == {"worker_a_bucket", "worker_b", "worker_c", "d"}
    assert unexposed({"x": "sum(rate(rekognition_worker_nope_total[5m]))"}, {"rekognition_worker_jobs_total"}) == {
        "x": {"rekognition_worker_nope_total"}}


def test_shipped_monitoring_has_the_alerts_and_panels_operators_need() -> None:
    alerts = alert_expressions()
    assert len(alerts) >= 4
    for needed in ("DeadLetterQueueNotEmpty", "JobsNearExpiry", "Throttled", "JobsFailing", "NoProgress",
                   "CredentialsFailing", "NotReady"):
        assert any(needed in name for name in alerts), needed
    panels = " ".join(panel_expressions().values())
    for needed in ("queue_messages", "oldest_message_age_seconds", "jobs_in_flight", "jobs_total",
                   "pages_fetched_total", "rows_written_total", "rekognition_rate_ceiling_per_second",
                   "rekognition_call_duration_seconds_bucket", "db_write_duration_seconds_bucket",
                   "rate_limiter_wait_seconds_bucket"):
        assert f"rekognition_worker_{needed}" in panels, needed


def test_an_aggregation_that_drops_the_namespace_is_found() -> None:
    assert unscoped("max by (namespace, job) (a) > 0 and on (namespace, job) sum by (namespace, job) (b)") == []
    assert unscoped("rekognition_worker_ready == 0") == []
    assert unscoped("(group by (namespace, job) (a) unless group by (namespace, job) (b)) or absent(a)") == []
    assert unscoped("max(a) > 0") == ["max(a)"]
    assert unscoped("sum by (job) (rate(a[5m])) > 0") == ["sum by (job) (rate(a[5m]))"]
    assert len(unscoped("max by (namespace, job) (a) > 0 and on () max by (namespace, job) (b)")) == 1
    assert unscoped("absent(a)") == ["absent(a)"]


def test_every_alert_is_scoped_by_namespace_and_job_and_has_an_absolute_runbook_url() -> None:
    runbook = (REPO / "docs" / "runbook.md").read_text(encoding="utf-8")
    anchors = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
               for h in re.findall(r"^#{1,6} (.+)$", runbook, flags=re.M)}
    kustomization = yaml.safe_load((MONITORING / "kustomization.yaml").read_text(encoding="utf-8"))
    (base_url,) = [g["literals"][0].removeprefix("url=") for g in kustomization["configMapGenerator"]
                   if g["name"] == "rekognition-worker-runbook"]
    rules = alert_rules()
    assert len(rules) >= 10
    for rule in rules:
        annotations = rule["annotations"]
        assert "runbook" not in annotations, rule["alert"]  # the old relative annotation
        url, _, anchor = annotations["runbook_url"].partition("#")
        assert url == base_url and url.startswith("https://"), rule["alert"]
        assert anchor in anchors, (rule["alert"], anchor)
        assert unscoped(rule["expr"]) == [], rule["alert"]


def test_the_dashboard_is_scoped_by_namespace_and_job_variables() -> None:
    board = dashboard()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert {"datasource", "namespace", "job"} <= set(variables)
    assert variables["namespace"]["type"] == variables["job"]["type"] == "query"
    assert "label_values(rekognition_worker_build_info, namespace)" in json.dumps(variables["namespace"])
    assert 'namespace=\\"$namespace\\"' in json.dumps(variables["job"])  # jobs of the chosen namespace
    expressions = panel_expressions()
    assert len(expressions) >= 20
    for where, expr in expressions.items():
        assert not re.search(r"\[\d+[smhdw]\]", expr), f"{where}: a fixed range instead of $__rate_interval"
        if re.search(r"\b(rate|increase)\(", expr):
            assert "[$__rate_interval]" in expr, where
        for selector in selectors(as_promql(expr.replace('"$namespace"', '"NS"').replace('"$job"', '"JOB"'))):
            matchers = {(m.name, m.value) for m in selector.matchers.matchers}
            assert {("namespace", "NS"), ("job", "JOB")} <= matchers, f"{where}: {selector.prettify()}"


def test_promtool_accepts_the_rules_and_their_unit_tests_pass(tmp_path: Path) -> None:
    """The same check as scripts/lint-deploy.sh, so `make test` runs it wherever promtool is installed."""
    import shutil
    import subprocess

    import pytest

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install prometheus); scripts/lint-deploy.sh requires it")
    rule = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text(encoding="utf-8"))
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}), encoding="utf-8")
    shutil.copy(MONITORING / "alerts-test.yaml", tmp_path / "alerts-test.yaml")
    for command in (["check", "rules", "rules.yaml"], ["test", "rules", "alerts-test.yaml"]):
        done = subprocess.run([promtool, *command], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                              check=False)
        assert done.returncode == 0, done.stdout + done.stderr


def test_every_metric_carries_the_prefix_and_no_created_series_is_exposed() -> None:
    from prometheus_client import REGISTRY, generate_latest
    from prometheus_client.metrics import MetricWrapperBase

    from worker import metrics

    names = [m._name for m in vars(metrics).values() if isinstance(m, MetricWrapperBase)]
    assert len(names) >= 25
    assert [name for name in names if not name.startswith(metrics.PREFIX)] == []
    assert metrics.PREFIX == "rekognition_worker_"
    metrics.JOBS.labels("FACE_SEARCH", "ingested").inc(0)
    exposition = generate_latest(REGISTRY).decode()
    assert "rekognition_worker_jobs_total{" in exposition
    assert [line for line in exposition.splitlines() if "_created" in line] == []


async def test_every_alert_and_panel_reads_a_metric_the_running_service_exposes(
        start_worker: Any, queues: Queues, sqs: Any, emu: Any) -> None:  # noqa: F811
    detection = synth.with_future_values(synth.detection_job(unique_id("mon-det"), faces=60, attributes="ALL"))
    search = synth.search_job(unique_id("mon-search"), persons_elements=40, persons=4)
    emu.add_jobs([detection, search])
    await send(sqs, queues.url, enveloped(detection), enveloped(search))
    worker = start_worker(QUEUE_DEPTH_INTERVAL_S="1")
    port = worker.health_port()
    worker.wait_for("both jobs ingested",
                    lambda _: len([e for e in worker.events("job finished") if e.get("outcome") == "ingested"]) >= 2,
                    timeout_s=60)
    assert get(port, "/readyz")[0] == 200
    deadline = time.monotonic() + 20
    while True:  # the queue-depth reader runs every second
        status, text = get(port, "/metrics")
        exposed = exposed_samples(text)
        if (status == 200 and "rekognition_worker_queue_messages" in exposed) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    needed = ("build_info", "ready", "queue_messages", "dead_letter_queue_messages", "unknown_enum_values_total")
    assert {f"rekognition_worker_{name}" for name in needed} <= exposed
    assert unexposed(alert_expressions(), exposed) == {}
    assert unexposed(panel_expressions(), exposed) == {}
    # The template variables list the namespaces and jobs from a metric every replica exposes.
    variables = {v["name"]: v["query"] for v in dashboard()["templating"]["list"] if v["type"] == "query"}
    assert {re.match(r"label_values\((\w+)", query).group(1)  # type: ignore[union-attr]
            for query in variables.values()} <= exposed
