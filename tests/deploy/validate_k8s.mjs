// Validates rendered Kubernetes manifests (kubectl kustomize output on stdin or in a file):
// every object against the Kubernetes schemas (npm's kubernetes-models), then the checks that
// tie objects together: selectors, ports, probes, config references and the addresses the
// services give each other. Prints one line per problem and exits 1 if there is any.
//
//   kubectl kustomize deploy/k8s/overlays/dev | node tests/deploy/validate_k8s.mjs dev
import fs from "node:fs";
import yaml from "js-yaml";
import * as core from "kubernetes-models/v1";
import * as apps from "kubernetes-models/apps/v1";
import * as policy from "kubernetes-models/policy/v1";
import * as monitoring from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";

const GROUPS = { v1: core, "apps/v1": apps, "policy/v1": policy, "monitoring.coreos.com/v1": monitoring };
const name = process.argv[2] || "manifests";
const text = fs.readFileSync(process.argv[3] || 0, "utf8");
const objects = yaml.loadAll(text).filter((o) => o);
const problems = [];
const id = (o) => `${o.kind}/${o.metadata?.name}`;
const fail = (o, msg) => problems.push(`${id(o)}: ${msg}`);

// 1. Schemas.
for (const o of objects) {
  const Model = GROUPS[o.apiVersion]?.[o.kind];
  if (!Model) { fail(o, `no schema known for ${o.apiVersion} ${o.kind}`); continue; }
  try { new Model(o).validate(); } catch (e) { fail(o, `schema: ${e.message}`); }
}

const ofKind = (k) => objects.filter((o) => o.kind === k);
const workloads = [...ofKind("Deployment"), ...ofKind("StatefulSet")];
const services = ofKind("Service");
const matches = (selector, labels) =>
  Object.entries(selector || {}).every(([k, v]) => labels?.[k] === v);
const podLabels = (w) => w.spec.template.metadata.labels;
const containers = (w) => [...(w.spec.template.spec.initContainers || []), ...w.spec.template.spec.containers];
const ports = (w) => w.spec.template.spec.containers.flatMap((c) => c.ports || []);

// 2. Every object in one namespace, every namespaced object's namespace exists.
const namespaces = new Set(ofKind("Namespace").map((n) => n.metadata.name));
for (const o of objects) {
  if (o.kind === "Namespace") continue;
  if (!namespaces.has(o.metadata.namespace)) fail(o, `namespace '${o.metadata.namespace}' is not among the objects`);
}

// 3. Workloads: the selector picks the pod template; probes and env refer to what exists.
const configMaps = new Map(ofKind("ConfigMap").map((c) => [c.metadata.name, c]));
for (const w of workloads) {
  if (!matches(w.spec.selector.matchLabels, podLabels(w))) fail(w, "spec.selector does not match the pod template's labels");
  const portNumbers = new Set(ports(w).map((p) => p.containerPort));
  for (const c of w.spec.template.spec.containers) {
    for (const probe of ["startupProbe", "readinessProbe", "livenessProbe"]) {
      const p = c[probe];
      if (!p) { if (probe !== "startupProbe") fail(w, `container ${c.name} has no ${probe}`); continue; }
      const tls = (c.args || []).includes("--tls-cert");
      if (p.grpc) {
        if (tls) fail(w, `container ${c.name} serves TLS, which its native gRPC ${probe} cannot speak`);
        if (!portNumbers.has(p.grpc.port)) fail(w, `${probe} port ${p.grpc.port} is not a container port`);
      } else if (p.exec && tls) {
        // With TLS: `moe-client health --addr localhost:PORT` with the cluster's client certificate.
        const cmd = p.exec.command || [];
        const addr = cmd[cmd.indexOf("--addr") + 1] || "";
        if (cmd[0] !== "moe-client" || cmd[1] !== "health") fail(w, `${probe} is not moe-client health`);
        if (!portNumbers.has(Number(addr.split(":")[1]))) fail(w, `${probe} checks ${addr}, not a container port`);
        for (const flag of ["--tls-ca", "--tls-cert", "--tls-key"]) {
          const file = cmd[cmd.indexOf(flag) + 1];
          if (!cmd.includes(flag)) fail(w, `${probe} lacks ${flag}`);
          else if (!(c.volumeMounts || []).some((m) => file.startsWith(m.mountPath + "/"))) fail(w, `${probe}'s ${flag} ${file} is not on a mounted volume`);
        }
      } else {
        fail(w, `container ${c.name}'s ${probe} is neither a native gRPC probe nor (with TLS) moe-client health`);
      }
    }
    const hook = c.lifecycle?.preStop?.exec?.command;
    if (hook && hook[0] === "moe-client") {
      const addr = hook[hook.indexOf("--addr") + 1] || "";
      if (!portNumbers.has(Number(addr.split(":")[1]))) fail(w, `preStop reaches ${addr}, not a container port`);
      if ((c.args || []).includes("--tls-cert") && !["--tls-ca", "--tls-cert", "--tls-key"].every((f) => hook.includes(f))) {
        fail(w, `container ${c.name} serves TLS but its preStop hook connects without the client certificate`);
      }
    }
    if (!c.resources?.requests || !c.resources?.limits) fail(w, `container ${c.name} lacks resource requests or limits`);
    const grpcPort = (c.ports || []).find((p) => p.name === "grpc");
    const args = c.args || [];
    const port = args[args.indexOf("--port") + 1];
    if (grpcPort && String(grpcPort.containerPort) !== port) fail(w, `--port ${port} is not the grpc container port ${grpcPort.containerPort}`);
    const mport = (c.ports || []).find((p) => p.name === "metrics");
    const margs = args[args.indexOf("--metrics-port") + 1];
    if (mport && String(mport.containerPort) !== margs) fail(w, `--metrics-port ${margs} is not the metrics container port`);
  }
  for (const c of containers(w)) {
    // Every $(VAR) in command and args comes from the container's env or its ConfigMaps.
    const known = new Set((c.env || []).map((e) => e.name));
    for (const ref of c.envFrom || []) {
      const cm = ref.configMapRef && configMaps.get(ref.configMapRef.name);
      if (ref.configMapRef && !cm) fail(w, `container ${c.name} reads missing ConfigMap ${ref.configMapRef.name}`);
      for (const k of Object.keys(cm?.data || {})) known.add(k);
    }
    for (const a of [...(c.args || []), ...(c.command || [])]) {
      for (const m of String(a).matchAll(/\$\(([A-Z0-9_]+)\)/g)) {
        if (!known.has(m[1])) fail(w, `container ${c.name} uses $(${m[1]}), which no env or ConfigMap defines`);
      }
    }
    for (const v of c.volumeMounts || []) {
      if (!(w.spec.template.spec.volumes || []).some((vol) => vol.name === v.name)) fail(w, `volume ${v.name} is mounted but not defined`);
    }
  }
  if (w.spec.template.spec.securityContext?.runAsNonRoot !== true) fail(w, "pods must run as non-root");
}

// 4. Services: select pods of some workload, and their target ports are named container ports.
for (const s of services) {
  const backing = workloads.filter((w) => matches(s.spec.selector, podLabels(w)));
  if (backing.length !== 1) { fail(s, `selector matches ${backing.length} workloads (want 1)`); continue; }
  const names = new Set(ports(backing[0]).map((p) => p.name));
  for (const p of s.spec.ports) {
    if (typeof p.targetPort === "string" && !names.has(p.targetPort)) fail(s, `targetPort '${p.targetPort}' is not a port of ${id(backing[0])}`);
  }
}

// 5. StatefulSets have their headless Service; PodDisruptionBudgets cover a workload.
for (const st of ofKind("StatefulSet")) {
  const svc = services.find((s) => s.metadata.name === st.spec.serviceName);
  if (!svc) fail(st, `serviceName '${st.spec.serviceName}' has no Service`);
  else if (svc.spec.clusterIP !== "None") fail(st, `Service ${st.spec.serviceName} is not headless`);
}
for (const pdb of ofKind("PodDisruptionBudget")) {
  if (!workloads.some((w) => matches(pdb.spec.selector.matchLabels, podLabels(w)))) fail(pdb, "selector matches no workload");
}

// 6. The ServiceMonitor selects exactly the Services with a `metrics` port; each workload that
//    opens a metrics port is behind exactly one of them (scraped once), which publishes its pods
//    while they are not ready (scraped while starting).
for (const sm of ofKind("ServiceMonitor")) {
  const picked = services.filter((s) => matches(sm.spec.selector.matchLabels, s.metadata.labels));
  const withMetrics = services.filter((s) => s.spec.ports.some((p) => p.name === "metrics"));
  for (const s of withMetrics) if (!picked.includes(s)) fail(sm, `does not select ${id(s)}, which has a metrics port`);
  for (const ep of sm.spec.endpoints) {
    for (const s of picked) if (!s.spec.ports.some((p) => p.name === ep.port)) fail(sm, `${id(s)} has no port '${ep.port}'`);
  }
  for (const w of workloads.filter((w) => ports(w).some((p) => p.name === "metrics"))) {
    const behind = picked.filter((s) => matches(s.spec.selector, podLabels(w)));
    if (behind.length !== 1) fail(w, `its metrics port is behind ${behind.length} scraped Services, not 1`);
    for (const s of behind) if (!s.spec.publishNotReadyAddresses) fail(s, "does not publish pods that are not ready: a starting pod is not scraped");
  }
}

// 7. Addresses the services give each other: --coordinator HOST:PORT names a Service port, and
//    a shard's --advertise is its pod name under its headless Service, on its grpc port.
for (const w of workloads) {
  for (const c of w.spec.template.spec.containers) {
    const args = c.args || [];
    const i = args.indexOf("--coordinator");
    if (i >= 0) {
      const [host, port] = args[i + 1].split(":");
      const svc = services.find((s) => s.metadata.name === host);
      if (!svc || !svc.spec.ports.some((p) => String(p.port) === port)) fail(w, `--coordinator ${args[i + 1]} is not a Service port`);
    }
    const j = args.indexOf("--advertise");
    if (j >= 0) {
      const want = `$(POD_NAME).${w.spec.serviceName}:${args[args.indexOf("--port") + 1]}`;
      if (args[j + 1] !== want) fail(w, `--advertise ${args[j + 1]} should be ${want}`);
      if (!(c.env || []).some((e) => e.name === "POD_NAME" && e.valueFrom?.fieldRef?.fieldPath === "metadata.name")) fail(w, "POD_NAME is not the pod's name");
    }
  }
}

// 8. What the deployment must have.
for (const [kind, n] of [["StatefulSet", "moe-shard"], ["Deployment", "moe-router"], ["Deployment", "moe-coordinator"],
                         ["PodDisruptionBudget", "moe-shard"], ["ServiceMonitor", "moe-cluster"], ["PrometheusRule", "moe-cluster"],
                         ["ConfigMap", "moe-config"]]) {
  if (!objects.some((o) => o.kind === kind && o.metadata.name === n)) problems.push(`${kind}/${n}: missing`);
}

if (problems.length) {
  for (const p of problems) console.log(`FAIL ${name}: ${p}`);
  process.exit(1);
}
console.log(`ok ${name}: ${objects.length} objects valid (${[...new Set(objects.map((o) => o.kind))].join(", ")})`);
