#!/usr/bin/env python3
"""Writes the Grafana dashboards of moe-cluster (dashboards/*.json) from the panel list below.

    /usr/bin/python3 deploy/grafana/make_dashboards.py          # rewrite the JSON files
    /usr/bin/python3 deploy/grafana/make_dashboards.py --check  # fail if they are out of date

The panels are kept here, as data, so that the JSON stays consistent (ids, grid positions,
data source); tests/deploy/live_check.py runs every panel's PromQL against a live Prometheus.
"""
import json
import os
import sys

DS = {"type": "prometheus", "uid": "prometheus"}
RI = "$__rate_interval"


def target(expr, legend="", ref="A"):
    return {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref}


def panel(title, targets, kind="timeseries", unit="short", desc="", width=12):
    refs = "ABCDEFGH"
    return {
        "title": title,
        "description": desc,
        "type": kind,
        "datasource": DS,
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}} if kind == "timeseries"
        else {"reduceOptions": {"calcs": ["lastNotNull"]}},
        "targets": [target(e, l, refs[i]) for i, (e, l) in enumerate(targets)],
        "_width": width,
    }


def quantiles(metric, by="", match=""):
    extra = f", {by}" if by else ""
    return [(f"histogram_quantile({q}, sum by (le{extra}) (rate({metric}_bucket{match}[{RI}])))",
             f"p{int(q * 100)}" + (f" {{{{{by}}}}}" if by else "")) for q in (0.5, 0.95, 0.99)]


SERVING = [
    panel("Shards up", [("sum(moe_shard_up)", "in rotation"), ("count(moe_shard_up)", "known"),
                        ("sum(moe_shard_draining)", "draining")],
          kind="stat", desc="Shards in the router's rotation, of those it knows, and those that "
                            "drain (out of rotation on purpose)", width=6),
    panel("Placement version", [("max(moe_router_placement_version)", "version")], kind="stat",
          desc="Bumped by every applied placement (Rebalance or dynamic)", width=6),
    panel("Load imbalance", [("max(moe_router_load_imbalance)", "max/mean - 1")], kind="stat",
          unit="percentunit", desc="Expected shard load under the current placement", width=6),
    panel("Tokens/s", [(f"sum(rate(moe_router_tokens_total[{RI}]))", "tokens/s")], kind="stat",
          width=6),
    panel("Request rate by method", [(f"sum by (method) (rate(moe_router_requests_total[{RI}]))",
                                      "{{method}}")], unit="reqps"),
    panel("Error rate by code",
          [(f'sum by (code) (rate(moe_router_requests_total{{code!="OK"}}[{RI}]))', "{{code}}")],
          unit="reqps", desc="Requests that ended with a gRPC status other than OK"),
    panel("Request latency p50/p95/p99",
          quantiles("moe_router_request_seconds", match='{method=~"Infer|InferStream"}'), unit="s",
          desc="Infer and InferStream requests (training steps and saves take seconds)"),
    panel("Stage latency p99 (gate, dispatch, combine)",
          [(f"histogram_quantile(0.99, sum by (le, stage) (rate(moe_router_stage_seconds_bucket[{RI}])))",
            "{{stage}}")], unit="s"),
    panel("Per-expert load (assignments/s)",
          [(f"sum by (expert) (rate(moe_expert_tokens_total[{RI}]))", "expert {{expert}}")]),
    panel("Shards in rotation", [('moe_shard_up{shard=~"$shard"}', "{{shard}}")],
          desc="1 while the router uses the shard"),
    panel("Failovers", [(f"sum(rate(moe_router_failovers_total[{RI}]))", "failovers/s")],
          unit="ops", desc="Work re-sent to another replica after a shard failed"),
    panel("Dropped and spilled assignments",
          [(f"sum by (outcome) (rate(moe_router_assignments_total[{RI}]))", "{{outcome}}")],
          unit="ops", desc="Assignments past an expert's capacity (--capacity-factor)"),
    # A shard's own series carry shard="ADDRESS", as the router's moe_shard_up names it: $shard
    # picks the same shards in every panel.
    panel("Shard compute time p99",
          [("histogram_quantile(0.99, sum by (le, shard) "
            f"(rate(moe_shard_compute_seconds_bucket{{shard=~\"$shard\"}}[{RI}])))", "{{shard}}")],
          unit="s", desc="One coalesced expert matmul"),
    panel("Shard queue depth (rows)",
          [('moe_shard_queue_depth{unit="rows", shard=~"$shard"}', "{{shard}}")]),
    panel("Shard rejections by reason",
          [("sum by (reason) "
            f"(rate(moe_shard_rejected_batches_total{{shard=~\"$shard\"}}[{RI}]))", "{{reason}}")],
          unit="ops"),
    panel("Shard traffic",
          [(f"sum by (shard, direction) (rate(moe_shard_bytes_total{{shard=~\"$shard\"}}[{RI}]))",
            "{{shard}} {{direction}}")], unit="Bps"),
    # Added last, so that links to the panels above (viewPanel=ID) keep working.
    panel("Placement changes",
          [(f"sum(increase(moe_router_rebalances_total[{RI}]))", "applied"),
           (f"sum by (reason) (increase(moe_router_rebalances_skipped_total[{RI}]))",
            "dynamic skipped: {{reason}}")],
          desc="Applied placements, and dynamic rebalances not applied: refused (trained "
               "experts whose holders are all out of rotation: bring them back) or failed; "
               "each is tried again after the cooldown"),
]

TRAINING = [
    panel("Members", [("max(moe_coordinator_members)", "shards with a lease")], kind="stat",
          width=6),
    # Over the dashboard's time range: the counters restart at 0 with the coordinator.
    panel("Steps committed in range",
          [("sum(increase(moe_coordinator_steps_total{outcome=\"commit\"}[$__range]))", "commits")],
          kind="stat", width=6),
    panel("Steps aborted in range",
          [("sum(increase(moe_coordinator_steps_total{outcome=\"abort\"}[$__range]))", "aborts")],
          kind="stat", width=6),
    panel("Bus bandwidth", [("max(moe_coordinator_allreduce_bus_bandwidth_bytes_per_second)",
                             "last all-reduce")], kind="stat", unit="Bps", width=6),
    panel("Steps by outcome",
          [(f"sum by (outcome) (rate(moe_coordinator_steps_total[{RI}]))", "{{outcome}}")],
          unit="ops"),
    panel("All-reduce time p50/p95/p99", quantiles("moe_coordinator_allreduce_seconds"), unit="s"),
    panel("All-reduce bytes/s",
          [(f"sum(rate(moe_coordinator_allreduce_bytes_total[{RI}]))", "gradient bytes/s")],
          unit="Bps"),
    panel("All-reduce failures by code",
          [(f"sum by (code) (increase(moe_coordinator_allreduce_failures_total[{RI}]))", "{{code}}")],
          desc="Each failure aborts its step: no replica changes a weight"),
    panel("Replicas copied again (behind their expert's training step)",
          [(f"sum(increase(moe_router_stale_replicas_total[{RI}]))", "replicas")],
          desc="A replica at an older training step than its expert's others (a shard restarted "
               "with the checkpoint's weights) is copied again from an up-to-date one"),
    panel("Experts that lost their training",
          [("sum(moe_router_experts_lost_training_total)", "experts")], kind="stat", width=6,
          desc="Every replica of the expert fell back below a step it had reached (its only "
               "trained replica restarted): it serves and trains from the checkpoint's weights"),
]


def dashboard(uid, title, panels, variables):
    out, x, y, row_h = [], 0, 0, 0
    for i, p in enumerate(panels, start=1):
        p = dict(p)
        w = p.pop("_width")
        h = 4 if p["type"] == "stat" else 8
        if x + w > 24:
            x, y = 0, y + row_h
            row_h = 0
        p["id"] = i
        p["gridPos"] = {"h": h, "w": w, "x": x, "y": y}
        x += w
        row_h = max(row_h, h)
        out.append(p)
    return {
        "uid": uid,
        "title": title,
        "tags": ["moe-cluster"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "5s",
        "time": {"from": "now-15m", "to": "now"},
        "editable": False,
        "templating": {"list": variables},
        "panels": out,
    }


SHARD_VAR = {
    "name": "shard",
    "label": "shard",
    "type": "query",
    "datasource": DS,
    "query": {"query": "label_values(moe_shard_up, shard)", "refId": "shard"},
    "definition": "label_values(moe_shard_up, shard)",
    "includeAll": True,
    "multi": True,
    "allValue": ".*",
    "current": {"text": "All", "value": "$__all"},
    "refresh": 2,
}

DASHBOARDS = {
    "moe-serving.json": dashboard("moe-serving", "moe-cluster / Serving", SERVING, [SHARD_VAR]),
    "moe-training.json": dashboard("moe-training", "moe-cluster / Training", TRAINING, []),
}


def main():
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dashboards")
    stale = []
    for name, dash in DASHBOARDS.items():
        text = json.dumps(dash, indent=2, sort_keys=True) + "\n"
        path = os.path.join(here, name)
        if "--check" in sys.argv:
            if not os.path.exists(path) or open(path).read() != text:
                stale.append(name)
        else:
            with open(path, "w") as f:
                f.write(text)
            print(f"wrote {path} ({len(dash['panels'])} panels)")
    if stale:
        print(f"out of date: {', '.join(stale)}; run /usr/bin/python3 deploy/grafana/make_dashboards.py",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
