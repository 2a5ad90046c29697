"""nginx, Prometheus and Grafana files against the compose file and the service: the balancer and
the scrape config reach exactly the service replicas on the port they listen on, nginx's limits
match the service's, the dashboard JSON is the generator's output and queries only metrics the
service exports (``DASHBOARD_METRICS``; checked against service/metrics.py once it exists)."""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import sys
from urllib.parse import urlsplit

import pytest
import yaml

from service.settings import Settings
from tests.deploy.readers import (
    DEPLOY,
    ROOT,
    env_of,
    healthcheck_cmd,
    nginx_size,
    promql_metric_names,
    service_replicas,
)

#: Every metric the Grafana dashboard queries, as exposed on /metrics (counters with ``_total``;
#: histograms by family name, their _bucket/_sum/_count series follow). The one list to align with
#: service/metrics.py; ``test_dashboard_metrics_are_the_ones_the_service_defines`` does that
#: automatically when the module exists.
DASHBOARD_METRICS = {
    "mtrank_rank_requests_total": "counter",       # {variant, model, status}
    "mtrank_rank_duration_seconds": "histogram",   # {status}
    "mtrank_rank_stage_seconds": "histogram",      # {stage}
    "mtrank_rank_candidates": "histogram",
    "mtrank_rank_inflight": "gauge",
    "mtrank_rank_degraded_total": "counter",       # {reason}
    "mtrank_rank_shed_total": "counter",
    "mtrank_missing_features_total": "counter",    # {entity}
    "mtrank_corrupt_features_total": "counter",    # {entity}
    "mtrank_item_cache_hits_total": "counter",
    "mtrank_item_cache_misses_total": "counter",
    "mtrank_model_loads_total": "counter",         # {model, result}
    "mtrank_redis_breaker_state": "gauge",         # 0 closed, 1 half-open, 2 open
    "mtrank_predlog_written_total": "counter",
    "mtrank_predlog_dropped_total": "counter",     # {reason}
    "mtrank_model_info": "gauge",                  # {variant, model, version, precision}
}
#: labels the dashboard groups or filters by, per metric
DASHBOARD_LABELS = {
    "mtrank_rank_requests_total": {"variant", "model", "status"},
    "mtrank_model_info": {"variant", "model", "version"},
    "mtrank_rank_duration_seconds": {"status"},
    "mtrank_rank_stage_seconds": {"stage"},
    "mtrank_rank_degraded_total": {"reason"},
    "mtrank_missing_features_total": {"entity"},
    "mtrank_corrupt_features_total": {"entity"},
    "mtrank_model_loads_total": {"model", "result"},
    "mtrank_predlog_dropped_total": {"reason"},
}
#: Prometheus' own series the dashboard may use
PROMETHEUS_BUILTINS = {"up"}
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "mtrank.json"


def replica_port(compose) -> int:
    ports = {int(env_of(compose["services"][n]).get("MTRANK_PORT", Settings.model_fields["port"].default))
             for n in service_replicas(compose)}
    assert len(ports) == 1
    return ports.pop()


# -- nginx ----------------------------------------------------------------------------------------
def _server(nginx):
    return nginx.one("http")[2].one("server")[2]


def _locations(server) -> dict[str, object]:
    return {" ".join(args): body for stmt, args, body in server if stmt == "location"}


def _inherited(server, loc, name: str):
    """nginx's inheritance of array directives (proxy_set_header, add_header): the location's own
    list if it has one, else the server's."""
    return loc.all(name) or server.all(name)


def test_nginx_reaches_the_service_replicas_through_dns(compose, nginx):
    """No `upstream ... resolve` (nginx >= 1.27.3): proxy_pass takes the compose service name from
    a variable, so nginx resolves it through Docker's DNS per request (cached for `valid`), and a
    new or recreated replica is reached without a reload, on Debian's nginx 1.22 as well."""
    http = nginx.one("http")[2]
    server = _server(nginx)
    assert not http.all("upstream"), "an upstream block resolves its names once, at start-up"
    assert not [a for stmt, a, _ in nginx.walk() if stmt == "server" and "resolve" in a]
    resolver = http.one("resolver")[1]
    assert resolver[0] == "127.0.0.11", "Docker's embedded DNS"
    valid = next(a for a in resolver if a.startswith("valid="))
    assert 1 <= int(valid.removeprefix("valid=").rstrip("s")) <= 10, valid
    var, target = server.one("set")[1]
    host, _, port = target.partition(":")
    assert {host} == set(service_replicas(compose)) and int(port) == replica_port(compose)
    passes = [(args, body) for stmt, args, body in nginx.walk() if stmt == "location" and body is not None
              and body.all("proxy_pass")]
    assert passes
    for _, loc in passes:
        assert loc.one("proxy_pass")[1] == [f"http://{var}"]
        assert (loc.all("proxy_http_version") or server.all("proxy_http_version"))[0][1] == ["1.1"]
        headers = {args[0].lower(): args[1] for _, args, _ in _inherited(server, loc, "proxy_set_header")}
        assert headers["connection"] == ""
        assert headers["x-request-id"].startswith("$")
    assert "nginx" in compose["services"]["nginx"]["image"]


def test_nginx_retries_dead_replicas_and_never_counts_shedding(nginx):
    """A killed replica (refused, reset, or silent) costs no 5xx: `error timeout` retried once on
    another replica, POST included (/rank has no side effects), with a next-upstream budget that
    outlasts one read timeout (otherwise a stuck request ends in 504). A shed answer (429, or 503
    from older services) is passed to the client, not retried and never counted as a failure (a
    listed http_503 is one, and used to eject healthy replicas under overload). No max_fails:
    nothing is ejected."""
    server = _server(nginx)
    nxt = set(server.one("proxy_next_upstream")[1])
    assert {"error", "timeout", "non_idempotent"} <= nxt
    assert not nxt & {"http_503", "http_429", "http_500", "off"}, nxt
    assert int(server.one("proxy_next_upstream_tries")[1][0]) == 2

    def secs(name: str) -> float:
        return float(server.one(name)[1][0].rstrip("s"))

    assert secs("proxy_next_upstream_timeout") > secs("proxy_read_timeout") + secs("proxy_connect_timeout") - 1e-9
    assert secs("proxy_read_timeout") <= 5 and secs("proxy_connect_timeout") <= 2
    assert not [a for stmt, a, _ in nginx.walk() if any(x.startswith("max_fails") for x in a)]


def test_nginx_exposes_only_rank_and_health(nginx):
    """Public: POST /rank, POST /events, GET /healthz and /readyz. Internal endpoints are 404 (or 403 for a
    wrong method); Prometheus scrapes replicas directly."""
    server = _server(nginx)
    locs = _locations(server)
    proxied = {k for k, body in locs.items() if body.all("proxy_pass")}
    assert proxied == {"= /rank", "= /events", "= /healthz", "= /readyz"}, proxied
    methods = {k: locs[k].one("limit_except")[1] for k in proxied}
    assert methods == {"= /rank": ["POST"], "= /events": ["POST"], "= /healthz": ["GET"], "= /readyz": ["GET"]}
    for k in proxied:
        assert locs[k].one("limit_except")[2].one("deny")[1] == ["all"]
    assert locs["/"].one("return")[1][0] == "404", "everything else: 404"
    assert locs["= /metrics"].one("return")[1][0] == "404"


def test_nginx_sets_x_request_id_from_the_client_or_request_id(nginx):
    http = nginx.one("http")[2]
    server = _server(nginx)
    maps = {args[1]: (args[0], body) for _, args, body in http.all("map")}
    loc = _locations(server)["= /rank"]
    var = {args[0].lower(): args[1] for _, args, _ in _inherited(server, loc, "proxy_set_header")}["x-request-id"]
    source, body = maps[var]
    assert source == "$http_x_request_id"
    entries = {stmt: args[0] for stmt, args, _ in body}
    assert entries["default"] == "$request_id"
    assert "$http_x_request_id" in entries.values()
    pattern = next(k for k, v in entries.items() if v == "$http_x_request_id")
    rx = re.compile(pattern.lstrip("~"))
    assert rx.search("b3c0771ef61f40a0a6d56cbcb61d39f3") and not rx.search("x" * 129)
    assert not rx.search('a"b') and not rx.search("a\nb")
    adds = {args[0]: args[1:] for _, args, _ in _inherited(server, loc, "add_header")}
    assert adds["X-Request-Id"] == [var, "always"]


def test_nginx_body_limit_matches_the_service(compose, nginx):
    server = nginx.one("http")[2].one("server")[2]
    limit = nginx_size(server.one("client_max_body_size")[1][0])
    for n in service_replicas(compose):
        env = env_of(compose["services"][n])
        want = int(env.get("MTRANK_MAX_BODY_BYTES", Settings.model_fields["max_body_bytes"].default))
        assert limit == want, f"nginx client_max_body_size {limit} != MTRANK_MAX_BODY_BYTES {want}"


def test_nginx_health_check_and_ports(compose, nginx):
    server = nginx.one("http")[2].one("server")[2]
    listen = int(server.one("listen")[1][0])
    svc = compose["services"]["nginx"]
    assert all(p.split(":")[-1] == str(listen) for p in svc["ports"])
    locations = {args[-1] for stmt, args, _ in server if stmt == "location"}
    path = re.search(r"http://127\.0\.0\.1(?::(\d+))?(/\S*)", healthcheck_cmd(svc))
    assert int(path[1] or 80) == listen and path[2] in locations
    assert "./deploy/nginx.conf:/etc/nginx/nginx.conf:ro" in svc["volumes"]
    metrics = next(body for stmt, args, body in server if stmt == "location" and args[-1] == "/metrics")
    assert metrics.one("return")[1][0] == "404", "per-replica metrics are not served through the balancer"


# -- Prometheus -----------------------------------------------------------------------------------
def test_prometheus_scrapes_every_replica(compose):
    conf = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in conf["scrape_configs"]}
    job = jobs["mtrank"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = set()
    for sd in job.get("dns_sd_configs", []):
        assert sd.get("type", "SRV") == "A", "Docker's DNS answers A records"
        targets |= {(n, sd["port"]) for n in sd["names"]}
    for sc in job.get("static_configs", []):
        for t in sc["targets"]:
            host, _, port = t.partition(":")
            targets.add((host, int(port)))
    assert targets == {(n, replica_port(compose)) for n in service_replicas(compose)}
    vols = compose["services"]["prometheus"]["volumes"]
    assert "./deploy/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in vols
    assert "--config.file=/etc/prometheus/prometheus.yml" in compose["services"]["prometheus"]["command"]


# -- Grafana --------------------------------------------------------------------------------------
def test_grafana_provisioning_points_at_prometheus_and_the_dashboard(compose):
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"]
    (prom,) = [d for d in ds if d["type"] == "prometheus"]
    url = urlsplit(prom["url"])
    assert url.hostname in compose["services"] and url.hostname == "prometheus"
    assert any(p.endswith(f":{url.port}") for p in compose["services"]["prometheus"]["ports"])
    prov = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/mtrank.yml").read_text())["providers"]
    g = compose["services"]["grafana"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in g["volumes"]}
    assert mounts["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    assert mounts[prov[0]["options"]["path"]] == "./deploy/grafana/dashboards"
    home = g["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{prov[0]['options']['path']}/{DASHBOARD.name}"
    env = g["environment"]
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer", "anonymous users may only view"
    dash = json.loads(DASHBOARD.read_text())
    for panel in dash["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == prom["uid"]
            assert all(t["datasource"]["uid"] == prom["uid"] for t in panel["targets"])


def _dashboard_module():
    spec = importlib.util.spec_from_file_location("mtrank_dashboard", DEPLOY / "grafana" / "dashboard.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _exprs(dash: dict) -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]


def test_dashboard_json_is_the_generators_output():
    mod = _dashboard_module()
    assert DASHBOARD.read_text() == mod.render(), "run: python deploy/grafana/dashboard.py"
    assert set(mod.METRICS.values()) == set(DASHBOARD_METRICS), "generator and test list drifted"


def test_dashboard_panels_and_layout():
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24 and g["w"] > 0 and g["h"] > 0, p["title"]
        if p["type"] != "row":
            assert p["targets"] and all(t["expr"] for t in p["targets"]), p["title"]
            refs = [t["refId"] for t in p["targets"]]
            assert len(refs) == len(set(refs))
    exprs = [e for _, e in _exprs(dash)]

    def has(pattern: str) -> bool:
        return any(re.search(pattern, e) for e in exprs)

    assert has(r"^sum\(rate\(mtrank_rank_requests_total\[")                                 # request rate
    for q in ("0.5", "0.99"):                                                              # p50/p99 by stage
        assert has(rf"histogram_quantile\({q}, sum by \(le, stage\) \(rate\(mtrank_rank_stage_seconds_bucket")
        assert has(rf"histogram_quantile\({q}, sum by \(le\) \(rate\(mtrank_rank_duration_seconds_bucket\b")
    assert has(r'mtrank_rank_requests_total\{status=~"5\.\."\}')                          # 5xx
    assert has(r"mtrank_rank_degraded_total") and has(r"mtrank_rank_shed_total")
    assert has(r"sum by \(variant\) \(rate\(mtrank_rank_requests_total")                  # traffic split
    assert has(r"mtrank_item_cache_hits_total.*mtrank_item_cache_misses_total")           # cache hit rate


def test_dashboard_queries_only_listed_metrics_and_labels():
    dash = json.loads(DASHBOARD.read_text())
    used = set()
    for title, expr in _exprs(dash):
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), title
        families = set()
        for name in promql_metric_names(expr):
            family = name
            if name not in DASHBOARD_METRICS and name not in PROMETHEUS_BUILTINS:
                family = re.sub(r"_(bucket|sum|count)$", "", name)
                assert DASHBOARD_METRICS.get(family) == "histogram", f"panel {title!r} queries unknown {name}"
            families.add(family)
        used |= families
        # labels selected or grouped by must be ones the expression's metrics carry
        labels = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", " ".join(re.findall(r"\{([^}]*)\}", expr))))
        labels |= {x.strip() for g in re.findall(r"\bby \(([^)]*)\)", expr) for x in g.split(",")}
        known = {"le", "instance", "job"}.union(*(DASHBOARD_LABELS.get(f, set()) for f in families))
        assert labels <= known, f"panel {title!r}: no metric in it has label(s) {labels - known}"
    assert used >= set(DASHBOARD_METRICS), f"listed but unused: {set(DASHBOARD_METRICS) - used}"


def test_promql_metric_name_extraction():
    expr = 'sum by (le, stage) (rate(a_b_bucket{x="y{"}[$__rate_interval])) / 1e-9'
    assert promql_metric_names(expr) == {"a_b_bucket"}
    assert promql_metric_names("(sum(rate(x_total[5m])) or vector(0)) / clamp_min(sum(y), 1)") == {"x_total", "y"}
    assert promql_metric_names('up{job="mtrank"} and on (instance) z') == {"up", "z"}


# -- the service's own metric names ---------------------------------------------------------------
def _service_metric_families() -> dict[str, tuple[str, set[str] | None]]:
    """Metric families service/metrics.py defines: name as exposed -> (type, label names). Module-level
    collectors (also inside dicts/lists) when it imports; else the ``"mtrank_..."`` string literals in
    it (type and labels then unknown)."""
    out: dict[str, tuple[str, set[str] | None]] = {}
    try:
        from prometheus_client.metrics import MetricWrapperBase
        from prometheus_client.registry import Collector

        mod = sys.modules.get("service.metrics") or importlib.import_module("service.metrics")
        objs = []
        for v in vars(mod).values():
            objs += list(v.values()) if isinstance(v, dict) else list(v) if isinstance(v, (list, tuple)) else [v]
        for obj in objs:
            if isinstance(obj, MetricWrapperBase):
                labels = set(getattr(obj, "_labelnames", ()) or ())
                for m in obj.describe():
                    out[m.name + ("_total" if m.type == "counter" else "")] = (m.type, labels)
            elif isinstance(obj, Collector) and hasattr(obj, "describe"):  # a collector computed at scrape time
                for m in obj.describe():
                    out[m.name] = (m.type, set(getattr(obj, "LABELS", ()) or ()))
    except Exception:  # noqa: BLE001 - fall back to reading the source
        out = {}
    if not out:
        text = (ROOT / "service" / "metrics.py").read_text()
        for name in re.findall(r"[\"'](mtrank_[a-z0-9_]+)[\"']", text):
            out[name] = ("unknown", None)
    return out


@pytest.mark.skipif(not (ROOT / "service" / "metrics.py").exists(), reason="service/metrics.py not written yet")
def test_dashboard_metrics_are_the_ones_the_service_defines():
    defined = _service_metric_families()
    assert defined, "found no metric names in service/metrics.py"

    def base(n: str) -> str:
        return n.removesuffix("_total")

    by_base = {base(n): v for n, v in defined.items()}
    missing = sorted(n for n in DASHBOARD_METRICS if base(n) not in by_base)
    assert not missing, f"the dashboard queries metrics service/metrics.py does not define: {missing}"
    for n, kind in DASHBOARD_METRICS.items():
        have, labels = by_base[base(n)]
        assert have in (kind, "unknown"), f"{n}: the dashboard expects a {kind}, service/metrics.py has a {have}"
        if labels is not None:
            extra = DASHBOARD_LABELS.get(n, set()) - labels
            assert not extra, f"{n}: the dashboard uses label(s) {extra}; service/metrics.py has {labels or 'none'}"
