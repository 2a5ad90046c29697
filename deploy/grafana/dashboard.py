"""Generates deploy/grafana/dashboards/mtrank.json, the provisioned Grafana dashboard.

Every metric name the dashboard queries is in ``METRICS`` below, the one place to change when the
service's metric names change (service/metrics.py). After an edit:

    python deploy/grafana/dashboard.py          # rewrites the JSON

tests/deploy checks that the committed JSON equals this script's output and that every metric
the queries use is one the service exports.
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dashboards" / "mtrank.json"

#: metric families as the service exposes them (counters with their ``_total``)
METRICS = {
    "requests": "mtrank_rank_requests_total",      # counter {variant, model, status}
    "duration": "mtrank_rank_duration_seconds",    # histogram {status}, whole /rank in the process
    "stage": "mtrank_rank_stage_seconds",          # histogram {stage=fetch|assemble|inference|fusion|serialise|total}
    "candidates": "mtrank_rank_candidates",        # histogram, items per ranked request
    "inflight": "mtrank_rank_inflight",            # gauge (livesum over the workers)
    "degraded": "mtrank_rank_degraded_total",      # counter {reason}
    "shed": "mtrank_rank_shed_total",              # counter, 503 + Retry-After
    "missing": "mtrank_missing_features_total",    # counter {entity}
    "corrupt": "mtrank_corrupt_features_total",    # counter {entity}
    "cache_hits": "mtrank_item_cache_hits_total",  # counter
    "cache_misses": "mtrank_item_cache_misses_total",  # counter
    "model_loads": "mtrank_model_loads_total",     # counter {model, result}
    "breaker": "mtrank_redis_breaker_state",       # gauge: 0 closed, 1 half-open, 2 open (livemax)
    "predlog_written": "mtrank_predlog_written_total",  # counter
    "predlog_dropped": "mtrank_predlog_dropped_total",  # counter {reason}
    "model_info": "mtrank_model_info",             # gauge {variant, model, version, precision} = 1 (at scrape)
}
#: label values the queries rely on
STATUS_5XX = 'status=~"5.."'  # `status` holds the HTTP status code
STATUS_OK = 'status="200"'    # latency of answered ranks (a shed 503 is fast and would hide the tail)
JOB = 'job="mtrank"'

DS = {"type": "prometheus", "uid": "prometheus"}
W = "$__rate_interval"


def _m(key: str, selector: str = "") -> str:
    return METRICS[key] + (f"{{{selector}}}" if selector else "")


def _rate(key: str, suffix: str = "", selector: str = "") -> str:
    return f"rate({METRICS[key]}{suffix}{{{selector}}}[{W}])" if selector else f"rate({METRICS[key]}{suffix}[{W}])"


def _quantile(q: float, key: str, by: str = "", selector: str = "") -> str:
    labels = f"le, {by}" if by else "le"
    return f"histogram_quantile({q}, sum by ({labels}) ({_rate(key, '_bucket', selector)}))"


# -- the queries: (expr, legend) per panel --------------------------------------------------------
REQUESTS = f"sum({_rate('requests')})"
QUERIES: dict[str, list[tuple[str, str]]] = {
    "rate": [(REQUESTS, "requests/s")],
    # `or vector(0)`: a counter with no samples yet (no 5xx so far) reads 0, not "No data"
    "error_ratio": [(f"(sum({_rate('requests', selector=STATUS_5XX)}) or vector(0)) / clamp_min({REQUESTS}, 1e-9)",
                     "5xx")],
    "degraded_ratio": [(f"(sum({_rate('degraded')}) or vector(0)) / clamp_min({REQUESTS}, 1e-9)", "degraded")],
    "shed_rate": [(f"sum({_rate('shed')}) or vector(0)", "shed/s")],
    "p99_total": [(_quantile(0.99, "duration", selector=STATUS_OK), "p99")],
    "requests_by_status": [(f"sum by (status) ({_rate('requests')})", "{{status}}")],
    "latency_total": [(_quantile(0.5, "duration", selector=STATUS_OK), "p50"),
                      (_quantile(0.99, "duration", selector=STATUS_OK), "p99")],
    "stage_p50": [(_quantile(0.5, "stage", "stage"), "{{stage}}")],
    "stage_p99": [(_quantile(0.99, "stage", "stage"), "{{stage}}")],
    "errors": [(f"sum by (status) ({_rate('requests', selector=STATUS_5XX)})", "{{status}}"),
               (f"sum({_rate('shed')})", "shed")],
    "degraded": [(f"sum by (reason) ({_rate('degraded')})", "{{reason}}")],
    "variant_split": [(f"sum by (variant) ({_rate('requests')})", "{{variant}}")],
    # the version is not a label of the counter (it would grow with every release): joined from the
    # info metric of what serves each variant on each replica
    "variant_version": [(f"sum by (variant, model, version) ({_rate('requests')} * on (instance, variant, model) "
                         f"group_left (version) {_m('model_info')})", "{{variant}} {{model}} v{{version}}")],
    "cache_hit_ratio": [(f"sum({_rate('cache_hits')}) / clamp_min((sum({_rate('cache_hits')}) or vector(0)) + "
                         f"(sum({_rate('cache_misses')}) or vector(0)), 1e-9)", "hit ratio")],
    "missing": [(f"sum by (entity) ({_rate('missing')})", "missing {{entity}}"),
                (f"sum by (entity) ({_rate('corrupt')})", "corrupt {{entity}}")],
    "candidates": [(_quantile(0.5, "candidates"), "p50"), (_quantile(0.99, "candidates"), "p99"),
                   (f"sum({_rate('candidates', '_sum')}) / clamp_min(sum({_rate('candidates', '_count')}), 1e-9)",
                    "mean")],
    "model_loads": [(f"sum by (model, result) (increase({METRICS['model_loads']}[5m]))", "{{model}} {{result}}")],
    "breaker": [(f"max by (instance) ({_m('breaker')})", "{{instance}}")],
    "inflight": [(f"sum by (instance) ({_m('inflight')})", "{{instance}}")],
    "predlog": [(f"sum({_rate('predlog_written')})", "written"),
                (f"sum by (reason) ({_rate('predlog_dropped')})", "dropped {{reason}}")],
    "replicas_up": [(f"up{{{JOB}}}", "{{instance}}")],
    "rate_by_replica": [(f"sum by (instance) ({_rate('requests')})", "{{instance}}")],
}


def _targets(key: str) -> list[dict]:
    return [{"datasource": DS, "expr": e, "legendFormat": lg, "refId": chr(ord("A") + i)}
            for i, (e, lg) in enumerate(QUERIES[key])]


def _panel(pid: int, key: str, title: str, kind: str, unit: str, grid: tuple[int, int, int, int],
           description: str = "", stacked: str | None = None, max_: float | None = None,
           mappings: dict[int, str] | None = None) -> dict:
    x, y, w, h = grid
    defaults: dict = {"unit": unit}
    if mappings:
        defaults["mappings"] = [{"type": "value", "options": {str(v): {"text": t, "index": i}
                                                              for i, (v, t) in enumerate(mappings.items())}}]
    if max_ is not None:
        defaults["min"], defaults["max"] = 0, max_
    if kind == "timeseries":
        defaults["custom"] = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10 if not stacked else 60,
                              "showPoints": "never", "stacking": {"mode": stacked or "none", "group": "A"}}
    panel = {
        "id": pid, "type": kind, "title": title, "description": description, "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "targets": _targets(key),
    }
    if kind == "timeseries":
        panel["options"] = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                            "tooltip": {"mode": "multi", "sort": "desc"}}
    else:
        panel["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                            "colorMode": "value", "graphMode": "area", "textMode": "auto"}
    return panel


def _row(pid: int, title: str, y: int) -> dict:
    return {"id": pid, "type": "row", "title": title, "collapsed": False, "panels": [],
            "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}}


def dashboard() -> dict:
    p = []
    p += [_row(1, "Overview", 0),
          _panel(2, "rate", "Requests/s", "stat", "reqps", (0, 1, 5, 4)),
          _panel(3, "p99_total", "p99 latency (200)", "stat", "s", (5, 1, 5, 4)),
          _panel(4, "error_ratio", "5xx ratio", "stat", "percentunit", (10, 1, 5, 4)),
          _panel(5, "degraded_ratio", "Degraded ratio", "stat", "percentunit", (15, 1, 5, 4),
                 "Share of answers served with default/cached features (Redis slow or down)."),
          _panel(6, "shed_rate", "Shed/s", "stat", "reqps", (20, 1, 4, 4),
                 "Requests refused with 503 + Retry-After because a worker was at its in-flight bound.")]
    p += [_row(10, "Traffic", 5),
          _panel(11, "requests_by_status", "Requests/s by status", "timeseries", "reqps", (0, 6, 12, 8)),
          _panel(12, "variant_split", "Traffic split by variant", "timeseries", "percentunit", (12, 6, 12, 8),
                 "Share of /rank requests per A/B variant.", stacked="percent"),
          _panel(13, "variant_version", "Requests/s by variant and model version", "timeseries", "reqps",
                 (0, 14, 12, 8)),
          _panel(14, "rate_by_replica", "Requests/s by replica", "timeseries", "reqps", (12, 14, 12, 8))]
    p += [_row(20, "Latency", 22),
          _panel(21, "latency_total", "/rank latency p50 / p99 (200)", "timeseries", "s", (0, 23, 8, 8),
                 "Wall time inside the service process of answered (200) requests."),
          _panel(22, "stage_p50", "p50 by stage", "timeseries", "s", (8, 23, 8, 8),
                 "fetch = Redis reads, assemble = input tensors, inference = onnxruntime, fusion, "
                 "serialise = response JSON."),
          _panel(23, "stage_p99", "p99 by stage", "timeseries", "s", (16, 23, 8, 8)),
          _panel(24, "candidates", "Candidates per request", "timeseries", "short", (0, 31, 12, 8))]
    p += [_row(30, "Errors and degradation", 39),
          _panel(31, "errors", "5xx and shed/s", "timeseries", "reqps", (0, 40, 8, 8)),
          _panel(32, "degraded", "Degraded/s by reason", "timeseries", "reqps", (8, 40, 8, 8)),
          _panel(33, "breaker", "Redis circuit breaker", "timeseries", "short", (16, 40, 8, 8),
                 "Worst state over a replica's workers: 0 closed, 1 half-open (probing), 2 open (Redis "
                 "not called; answers degraded).", max_=2, mappings={0: "closed", 1: "half-open", 2: "open"})]
    p += [_row(40, "Features, cache, models", 48),
          _panel(41, "cache_hit_ratio", "Item cache hit ratio", "timeseries", "percentunit", (0, 49, 8, 8),
                 max_=1),
          _panel(42, "missing", "Missing / corrupt features/s by entity", "timeseries", "short", (8, 49, 8, 8),
                 "Entities scored with the schema's default features."),
          _panel(43, "model_loads", "Model loads (5 min) by model and result", "timeseries", "short",
                 (16, 49, 8, 8), "loaded or refused (a broken bundle never replaces a working one)."),
          _panel(44, "predlog", "Prediction log records/s", "timeseries", "short", (0, 57, 8, 8),
                 "Records appended to the Redis Stream, and records dropped (never slows /rank)."),
          _panel(45, "inflight", "/rank in flight by replica", "timeseries", "short", (8, 57, 8, 8)),
          _panel(46, "replicas_up", "Replicas up (scrape)", "timeseries", "short", (16, 57, 8, 8), max_=1)]
    return {
        "uid": "mtrank", "title": "mtrank ranking service", "tags": ["mtrank"],
        "schemaVersion": 39, "version": 1, "editable": False, "graphTooltip": 1,
        "time": {"from": "now-1h", "to": "now"}, "refresh": "10s", "timezone": "",
        "templating": {"list": []}, "annotations": {"list": []}, "links": [],
        "panels": p,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, sort_keys=False) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")
