#!/usr/bin/env python3
"""Checks the Kubernetes manifests without a cluster (run by `make test`).

1. Every document validates against the Kubernetes OpenAPI schema of
   KUBERNETES_VERSION, strictly (unknown fields are errors).
2. kustomization.yaml lists every manifest here, and only those.
3. Every Sluice container's configuration, as the pod would see it (the
   ConfigMap's sluice.toml, its env, the example Secret's values), is
   accepted by `sluice config`, which refuses unknown keys and bad values.
4. What the manifests assume about that configuration holds: probes and
   scrape annotations point at the port the process listens on, volumes are
   mounted where the configuration looks (models, lake), required settings
   are present for the role, and the grace period covers the drain.
5. Autoscaling (autoscaling/): the KEDA ScaledObject and the HPA fallback
   target the worker Deployment, scale on the lag of the worker group on
   each served model's topic, keep lagThreshold >= worker.max_in_flight and
   maxReplicaCount <= kafka.partitions.
6. The GPU overlay (gpu/): the worker with gpu/worker.patch.yaml applied
   passes 1, 3 and 4, asks for GPUs, and its configuration runs the CUDA
   provider without CPU fallback, one inference thread per GPU.

Usage: check.py --sluice PATH/TO/sluice
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import kubernetes_validate
import yaml

KUBERNETES_VERSION = "1.30.0"
HERE = Path(__file__).resolve().parent
ROLES = {"gateway", "worker", "sink", "notifier"}
CHECK_TIMEOUT_S = 2

failures = []


def fail(where, message):
    failures.append(f"{where}: {message}")


def documents(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def port_of(address):
    return int(address.rsplit(":", 1)[1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sluice", required=True, help="the sluice binary")
    args = parser.parse_args()

    manifests = sorted(p for p in HERE.glob("*.yaml") if p.name != "kustomization.yaml")
    docs = {p.name: documents(p) for p in manifests}

    # 1. Schemas.
    for name, ds in docs.items():
        for d in ds:
            where = f"{name} {d.get('kind')}/{d.get('metadata', {}).get('name')}"
            try:
                kubernetes_validate.validate(d, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as e:
                fail(where, f"schema: {e.message} at {'/'.join(map(str, e.path))}")
            except Exception as e:  # unknown kind or version
                fail(where, f"schema: {e}")

    # 2. The kustomization names every manifest but the example secret.
    kustomization = documents(HERE / "kustomization.yaml")[0]
    listed = set(kustomization["resources"])
    expected = {p.name for p in manifests} - {"secret.example.yaml"}
    if listed != expected:
        fail("kustomization.yaml", f"resources {sorted(listed)}, files {sorted(expected)}")

    config_map = next(d for ds in docs.values() for d in ds if d["kind"] == "ConfigMap")
    secret = next(d for d in docs["secret.example.yaml"] if d["kind"] == "Secret")
    toml_text = config_map["data"]["sluice.toml"]

    # 3 and 4. Each Deployment's Sluice container.
    deployments = [(n, d) for n, ds in docs.items() for d in ds if d["kind"] == "Deployment"]
    roles_seen = set()
    with tempfile.TemporaryDirectory() as tmp:
        for name, d in deployments:
            pod = d["spec"]["template"]["spec"]
            for c in pod["containers"]:
                where = f"{name} {d['metadata']['name']}/{c['name']}"
                role = (c.get("args") or [None])[0]
                if role not in ROLES:
                    fail(where, f"args {c.get('args')}: expected one of {sorted(ROLES)}")
                    continue
                roles_seen.add(role)
                cfg = effective_config(where, c, pod, toml_text, secret, args.sluice, tmp)
                if cfg is not None:
                    check_container(where, role, c, pod, d, cfg)
    if roles_seen != ROLES:
        fail("manifests", f"roles deployed {sorted(roles_seen)}, expected {sorted(ROLES)}")

    worker = next(d for _, d in deployments if d["metadata"]["name"] == "sluice-worker")
    with tempfile.TemporaryDirectory() as tmp:
        pod = worker["spec"]["template"]["spec"]
        worker_cfg = effective_config("worker.yaml", pod["containers"][0], pod, toml_text, secret, args.sluice, tmp)
        check_autoscaling(worker, worker_cfg)
        check_gpu(worker, toml_text, secret, args.sluice, tmp)

    if failures:
        print("deploy/k8s: FAILED", file=sys.stderr)
        for f in failures:
            print(f"  {f}", file=sys.stderr)
        sys.exit(1)
    n = sum(len(ds) for ds in docs.values())
    print(f"deploy/k8s: {n} documents valid for Kubernetes {KUBERNETES_VERSION}; "
          f"{len(deployments)} Sluice deployments agree with their configuration")


def check_kustomization(directory, expected):
    k = documents(directory / "kustomization.yaml")[0]
    listed = set(k.get("resources", [])) | {p["path"] for p in k.get("patches", [])}
    if listed != expected:
        fail(f"{directory.name}/kustomization.yaml", f"lists {sorted(listed)}, expected {sorted(expected)}")
    for r in listed:
        if not (directory / r).exists():
            fail(f"{directory.name}/kustomization.yaml", f"{r} does not exist")


def check_autoscaling(worker, cfg):
    """KEDA's ScaledObject and the HPA fallback against the workers' configuration."""
    d = HERE / "autoscaling"
    check_kustomization(d, {"../", "keda.yaml"})
    if cfg is None:
        return
    name = worker["metadata"]["name"]
    partitions, in_flight = cfg["kafka"]["partitions"], cfg["worker"]["max_in_flight"]
    prefix, models = cfg["kafka"]["topic_prefix"], cfg["models"]["serve"]

    so = documents(d / "keda.yaml")[0]
    where = "autoscaling/keda.yaml"
    if (so.get("apiVersion"), so.get("kind")) != ("keda.sh/v1alpha1", "ScaledObject"):
        fail(where, f"{so.get('apiVersion')} {so.get('kind')}: expected keda.sh/v1alpha1 ScaledObject")
    spec = so.get("spec", {})
    known = {"scaleTargetRef", "minReplicaCount", "maxReplicaCount", "pollingInterval", "cooldownPeriod",
             "idleReplicaCount", "advanced", "triggers", "fallback"}
    if set(spec) - known:
        fail(where, f"unknown spec fields {sorted(set(spec) - known)}")
    ref = spec.get("scaleTargetRef", {})
    if (ref.get("kind", "Deployment"), ref.get("name")) != ("Deployment", name):
        fail(where, f"scaleTargetRef {ref} is not the Deployment {name}")
    lo, hi = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
    if not 1 <= lo <= hi <= partitions:
        fail(where, f"replicas {lo}..{hi}: need 1 <= min <= max <= kafka.partitions ({partitions})")
    triggers = [t for t in spec.get("triggers", []) if t.get("type") == "kafka"]
    topics = {t["metadata"].get("topic") for t in triggers}
    if topics != {f"{prefix}.jobs.{m}" for m in models}:
        fail(where, f"kafka triggers on {sorted(topics)}, but the workers serve {models}")
    for t in triggers:
        m = t["metadata"]
        model = m.get("topic", "").removeprefix(f"{prefix}.jobs.")
        if m.get("consumerGroup") != f"{prefix}.workers.{model}":
            fail(where, f"consumerGroup {m.get('consumerGroup')}: the workers' group is {prefix}.workers.{model}")
        if m.get("bootstrapServers") != cfg["kafka"]["brokers"]:
            fail(where, f"bootstrapServers {m.get('bootstrapServers')} is not kafka.brokers")
        if int(m.get("lagThreshold", 0)) < in_flight:
            fail(where, f"lagThreshold {m.get('lagThreshold')} < worker.max_in_flight {in_flight}: "
                        "one busy worker would look like a backlog")
        if m.get("allowIdleConsumers", "false") != "false":
            fail(where, "allowIdleConsumers: replicas beyond the partitions only idle")

    hpa = documents(d / "hpa.yaml")[0]
    where = "autoscaling/hpa.yaml"
    try:
        kubernetes_validate.validate(hpa, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        fail(where, f"schema: {e.message} at {'/'.join(map(str, e.path))}")
    hs = hpa["spec"]
    if hs["scaleTargetRef"]["name"] != name or not 1 <= hs.get("minReplicas", 1) <= hs["maxReplicas"] <= partitions:
        fail(where, f"target {hs['scaleTargetRef']['name']}, replicas up to {hs['maxReplicas']} (partitions {partitions})")
    for metric in hs["metrics"]:
        ext = metric.get("external", {})
        if ext.get("metric", {}).get("name") != "sluice_consumer_lag":
            fail(where, f"scales on {ext.get('metric')}, not sluice_consumer_lag")
        if int(ext.get("target", {}).get("averageValue", 0)) < in_flight:
            fail(where, f"averageValue {ext.get('target')} < worker.max_in_flight {in_flight}")


def strategic_merge(base, patch):
    """Kubernetes' strategic merge, as far as the overlays here use it: maps
    merge, lists of named items merge by name, other values are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        return {**base, **{k: strategic_merge(base[k], v) if k in base else v for k, v in patch.items()}}
    named = lambda xs: all(isinstance(x, dict) and "name" in x for x in xs)  # noqa: E731
    if isinstance(base, list) and isinstance(patch, list) and named(base) and named(patch):
        out = list(base)
        for p in patch:
            i = next((j for j, x in enumerate(out) if x["name"] == p["name"]), None)
            out = out + [p] if i is None else out[:i] + [strategic_merge(out[i], p)] + out[i + 1:]
        return out
    return patch


def check_gpu(worker, toml_text, secret, sluice, tmp):
    d = HERE / "gpu"
    check_kustomization(d, {"../autoscaling", "worker.patch.yaml"})
    gpu = strategic_merge(worker, documents(d / "worker.patch.yaml")[0])
    where = "gpu/worker.patch.yaml on worker.yaml"
    try:
        kubernetes_validate.validate(gpu, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        fail(where, f"schema: {e.message} at {'/'.join(map(str, e.path))}")
    pod = gpu["spec"]["template"]["spec"]
    c = pod["containers"][0]
    cfg = effective_config(where, c, pod, toml_text, secret, sluice, tmp)
    if cfg is None:
        return
    check_container(where, "worker", c, pod, gpu, cfg)
    gpus = int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
    if gpus < 1:
        fail(where, "no nvidia.com/gpu limit")
    engine = cfg["engine"]
    if (engine["provider"], engine["cuda_fallback"]) != ("cuda", "fail"):
        fail(where, f"provider {engine['provider']}, fallback {engine['cuda_fallback']}: want cuda without fallback")
    if engine["inference_threads"] != gpus:
        fail(where, f"inference_threads {engine['inference_threads']} for {gpus} GPU(s): one session per GPU")


def effective_config(where, container, pod, toml_text, secret, sluice, tmp):
    """The configuration `sluice` resolves inside this container, or None."""
    mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}
    config_volume = next((v["name"] for v in pod.get("volumes", [])
                          if v.get("configMap", {}).get("name") == "sluice-config"), None)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
            continue
        ref = e["valueFrom"]["secretKeyRef"]
        if ref["name"] != secret["metadata"]["name"]:
            fail(where, f"env {e['name']}: secret {ref['name']} is not the documented one")
        elif ref["key"] in secret["stringData"]:
            env[e["name"]] = secret["stringData"][ref["key"]]
        elif not ref.get("optional"):
            fail(where, f"env {e['name']}: key {ref['key']} is not in secret.example.yaml")
    config_path = env.pop("SLUICE_CONFIG", None)
    if config_path is None or config_volume is None or mounts.get(config_volume) is None:
        fail(where, "SLUICE_CONFIG and the sluice-config volume must both be set")
        return None
    if Path(config_path).parent != Path(mounts[config_volume]):
        fail(where, f"SLUICE_CONFIG {config_path} is not in the config mount {mounts[config_volume]}")
    local = Path(tmp) / "sluice.toml"
    local.write_text(toml_text)
    run = subprocess.run([sluice, "config", "--config", str(local)], env=env, capture_output=True, text=True)
    if run.returncode != 0:
        fail(where, f"`sluice config` refuses the pod's configuration: {run.stderr.strip()}")
        return None
    return json.loads(run.stdout)


def check_container(where, role, c, pod, d, cfg):
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    listen = cfg["gateway"]["listen"] if role == "gateway" else cfg["ops"]["listen"]
    port_name = "http" if role == "gateway" else "ops"
    if not listen:
        fail(where, f"{role} has no HTTP listener configured")
        return
    if not listen.startswith("0.0.0.0:"):
        fail(where, f"listens on {listen}: probes from the kubelet need 0.0.0.0")
    if ports.get(port_name) != port_of(listen):
        fail(where, f"containerPort {port_name}={ports.get(port_name)} but the process listens on {listen}")
    for probe, path in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")]:
        get = c.get(probe, {}).get("httpGet")
        if not get or get.get("path") != path or get.get("port") not in (port_name, port_of(listen)):
            fail(where, f"{probe} should GET {path} on port {port_name}: {get}")
    # /readyz gives each dependency CHECK_TIMEOUT (pipeline/src/ops.rs) before
    # it answers 503 naming it; a shorter probe timeout loses that answer.
    if c.get("readinessProbe", {}).get("timeoutSeconds", 1) <= CHECK_TIMEOUT_S:
        fail(where, f"readinessProbe.timeoutSeconds must exceed the {CHECK_TIMEOUT_S} s dependency checks")
    annotations = d["spec"]["template"]["metadata"].get("annotations", {})
    if annotations.get("prometheus.io/port") != str(port_of(listen)):
        fail(where, f"prometheus.io/port {annotations.get('prometheus.io/port')} is not {port_of(listen)}")
    if not cfg["kafka"]["brokers"]:
        fail(where, "kafka.brokers is empty")
    mounts = [m["mountPath"] for m in c.get("volumeMounts", [])]

    def mounted(path):
        return any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts)

    grace = pod.get("terminationGracePeriodSeconds", 30)
    if role in ("gateway", "worker", "notifier") and not cfg["store"]["redis"]:
        fail(where, "store.redis is empty")
    if role == "worker":
        if not mounted(cfg["models"]["repository"]):
            fail(where, f"models.repository {cfg['models']['repository']} is not on a mounted volume")
        if grace * 1000 <= cfg["worker"]["drain_timeout_ms"]:
            fail(where, f"grace period {grace} s does not cover worker.drain_timeout_ms")
        if d["spec"].get("replicas", 1) > cfg["kafka"]["partitions"]:
            fail(where, "more worker replicas than partitions: the extra ones would idle")
    if role == "gateway" and grace <= cfg["gateway"]["max_wait_secs"]:
        fail(where, f"grace period {grace} s does not cover gateway.max_wait_secs long-polls")
    if role == "sink":
        if not cfg["sinks"]["lake"] and not cfg["sinks"]["shards"]:
            fail(where, "a sink with neither sinks.lake nor sinks.shards")
        if d["spec"].get("replicas", 1) != 1 or d["spec"].get("strategy", {}).get("type") != "Recreate":
            fail(where, "the lake sink must run as one replica replaced with Recreate (no fencing)")
    if role == "notifier":
        if not cfg["callbacks"]["signing_key"]:
            fail(where, "a notifier without callbacks.signing_key does not start")
        if grace * 1000 <= cfg["callbacks"]["timeout_ms"]:
            fail(where, f"grace period {grace} s does not cover callbacks.timeout_ms (attempts in flight)")
    if role in ("gateway", "sink") and cfg["sinks"]["lake"] and not mounted(cfg["sinks"]["lake"]):
        fail(where, f"sinks.lake {cfg['sinks']['lake']} is not on a mounted volume")


if __name__ == "__main__":
    main()
