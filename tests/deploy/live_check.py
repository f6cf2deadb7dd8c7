#!/usr/bin/env python3
"""The dashboards against live data: a local cluster (moe-cluster: coordinator, 4 shards,
router) and Debian's Prometheus on loopback with deploy/prometheus's scrape config and rules
(hosts replaced by 127.0.0.1, ports shifted to free ones), serving load, a bad request and a few
training steps; then every Grafana panel's PromQL (dashboard variables substituted) and every
recording rule must return data with a finite value. Also `promtool check metrics` on every
service's /metrics and no rule evaluation errors. A panel with no data fails and is named.

usage: live_check.py BUILD_DIR WORK_DIR
"""
import glob
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import yaml

build, work = sys.argv[1], sys.argv[2]
repo = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "../.."))
sys.path.insert(0, os.path.join(repo, "client/python"))
import local_cluster  # noqa: E402
bin_dir = os.path.join(build, "bin")
shutil.rmtree(work, ignore_errors=True)
os.makedirs(work)
COMPOSE_METRICS_BASE = 9400  # prometheus-compose.yml's layout: router 9400, shards 9401-9404, coordinator 9405


def get(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def query(prom, expr):
    body = json.loads(get(f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr})))
    if body.get("status") != "success":
        raise RuntimeError(body.get("error", body))
    return body["data"]["result"]


def finite_values(result):
    vals = []
    for r in result:
        v = float(r["value"][1])
        if math.isfinite(v):
            vals.append(v)
    return vals


def run(args, **kw):
    return subprocess.run(args, capture_output=True, text=True, **kw)


# Seven ports in one run, below Linux's ephemeral range (local_cluster.free_port_run): the
# cluster's six metrics ports and Prometheus's. Picked apart, in 20000-40000, the second could
# fall in the first's run, and either where outgoing connections of tests run beside this one
# take their local ports (32768 and up).
base = local_cluster.free_port_run(7)
prom_port = base + 6
procs = []
failures = []
try:
    ck = os.path.join(work, "model.safetensors")
    run([f"{bin_dir}/moe-client", "init-checkpoint", "--out", ck, "--experts", "8", "--d-model",
         "64", "--d-ff", "128", "--top-k", "2", "--activation", "silu", "--gated", "--seed", "3"],
        check=True)
    cluster, router = local_cluster.start(bin_dir, ck, "--shards", "4", "--placement", "hybrid",
                                          "--metrics-port", str(base))
    procs.append(cluster)
    print(f"cluster ready: router {router}, metrics on {base}..{base + 5}")

    # promtool check metrics on every service's /metrics.
    for i, who in enumerate(["router", "shard 0", "shard 1", "shard 2", "shard 3", "coordinator"]):
        text = get(f"http://127.0.0.1:{base + i}/metrics")
        lint = run(["promtool", "check", "metrics"], input=text)
        if lint.returncode != 0:
            failures.append(f"promtool check metrics on the {who}: {lint.stdout}{lint.stderr}".strip())
        else:
            print(f"promtool check metrics: {who} ok ({len(text.splitlines())} lines)")

    # Prometheus with our scrape config and rules, pointed at this cluster.
    with open(os.path.join(repo, "deploy/prometheus/prometheus-compose.yml")) as f:
        cfg = yaml.safe_load(f)
    cfg["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    cfg["rule_files"] = [os.path.join(repo, "deploy/prometheus/rules/*.yml")]
    for job in cfg["scrape_configs"]:
        for sc in job["static_configs"]:
            sc["targets"] = [f"127.0.0.1:{int(t.split(':')[1]) - COMPOSE_METRICS_BASE + base}"
                             for t in sc["targets"]]
    prom_cfg = os.path.join(work, "prometheus.yml")
    with open(prom_cfg, "w") as f:
        yaml.safe_dump(cfg, f)
    prom_log = open(os.path.join(work, "prometheus.log"), "w")
    prom = subprocess.Popen(["prometheus", f"--config.file={prom_cfg}",
                             f"--storage.tsdb.path={os.path.join(work, 'tsdb')}",
                             f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdout=prom_log, stderr=subprocess.STDOUT)
    procs.append(prom)
    prom_url = f"http://127.0.0.1:{prom_port}"
    deadline = time.time() + 30
    while True:
        try:
            get(f"{prom_url}/-/ready")
            break
        except Exception:
            if time.time() > deadline or prom.poll() is not None:
                sys.exit(f"live_check: Prometheus did not start; see {prom_log.name}")
            time.sleep(0.2)
    # Traffic only once every target has been scraped, so that rates see it start.
    deadline = time.time() + 30
    while not query(prom_url, 'count(up{job=~"moe-.*"} == 1) == 6'):
        if time.time() > deadline:
            sys.exit("live_check: Prometheus could not scrape all 6 services: " +
                     json.dumps(query(prom_url, 'up')))
        time.sleep(0.2)
    print(f"prometheus ready at {prom_url}, scraping all 6 services")

    # Traffic: Zipf load, one bad request, training steps (replicated experts all-reduce).
    load = subprocess.Popen([f"{bin_dir}/moe-client", "load", "--router", router, "--checkpoint",
                             ck, "--zipf", "1.2", "--concurrency", "2", "--batch-size", "32",
                             "--duration", "8"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    bad = os.path.join(work, "bad.safetensors")
    run([f"{bin_dir}/moe-client", "make-tokens", "--out", bad, "--tokens", "4", "--d-model", "63"],
        check=True)
    r = run([f"{bin_dir}/moe-client", "infer", "--router", router, "--input", bad, "--output",
             os.path.join(work, "bad_out.safetensors")])
    if r.returncode == 0:
        failures.append("a request with the wrong d_model succeeded")
    train = run([f"{bin_dir}/moe-client", "train", "--router", router, "--synthetic",
                 "--batch-size", "32", "--steps", "4"])
    if train.returncode != 0:
        failures.append(f"training failed: {train.stderr.strip()}")
    load.wait()
    traffic_end = time.time()

    # Wait until Prometheus has scraped the traffic (and evaluated the rules on it).
    deadline = time.time() + 30
    ready_exprs = ["sum(rate(moe_router_tokens_total[1m])) > 0",
                   'sum(moe_coordinator_steps_total{outcome="commit"}) > 0',
                   'count(up{job=~"moe-.*"} == 1) == 6',
                   "moe:router_tokens:rate1m > 0",
                   # every service scraped again since the traffic ended
                   f'min(timestamp(up{{job=~"moe-.*"}})) > {traffic_end:.3f}']
    while not all(query(prom_url, e) for e in ready_exprs):
        if time.time() > deadline:
            failures.append("Prometheus never saw the traffic: " +
                            ", ".join(e for e in ready_exprs if not query(prom_url, e)))
            break
        time.sleep(0.5)

    # Every panel of every dashboard.
    rows = []
    for path in sorted(glob.glob(os.path.join(repo, "deploy/grafana/dashboards/*.json"))):
        dash = json.load(open(path))
        for p in dash["panels"]:
            for t in p["targets"]:
                expr = t["expr"]
                for var, value in (("$__rate_interval", "1m"), ("$__range", "5m"), ("$shard", ".*")):
                    expr = expr.replace(var, value)
                try:
                    res = query(prom_url, expr)
                except Exception as e:  # a PromQL error is a failure too
                    res, err = [], str(e)
                else:
                    err = ""
                vals = finite_values(res)
                ok = bool(vals)
                rows.append((dash["title"], p["title"], t.get("legendFormat") or t["refId"],
                             len(res), f"{vals[0]:.4g}" if vals else "-", "ok" if ok else "NO DATA"))
                if not ok:
                    failures.append(f"panel '{p['title']}' of '{dash['title']}' ({t['refId']}) "
                                    f"has no data: {expr}" + (f" ({err})" if err else ""))
    # Every recording rule, and no rule evaluation errors.
    groups = json.loads(get(f"{prom_url}/api/v1/rules"))["data"]["groups"]
    for g in groups:
        for rule in g["rules"]:
            if rule.get("health") != "ok":
                failures.append(f"rule {rule.get('name')}: health {rule.get('health')} "
                                f"{rule.get('lastError', '')}")
            if rule["type"] == "recording":
                vals = finite_values(query(prom_url, rule["name"]))
                rows.append(("recording rules", rule["name"], "", len(vals),
                             f"{vals[0]:.4g}" if vals else "-", "ok" if vals else "NO DATA"))
                if not vals:
                    failures.append(f"recording rule {rule['name']} has no data")

    head = ("dashboard", "panel", "series", "results", "value", "")
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    for r in [head] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
finally:
    for p in reversed(procs):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()

if failures:
    print(f"\n{len(failures)} problems:")
    for f in failures:
        print(f"FAIL {f}")
    sys.exit(1)
print(f"\nall {len(rows)} panel queries and recording rules returned data")
