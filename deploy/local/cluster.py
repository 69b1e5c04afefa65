#!/usr/bin/env python3
"""A whole Sluice deployment on one machine, from the container image.

  cluster.py up DIR      start it; DIR/cluster.json says where everything is
  cluster.py down DIR    stop what `up DIR` started
  cluster.py test DIR    up, the deployment test below, down; exit 0 if passed

What runs:
  - tansu (Kafka protocol), Redis and two PostgreSQL shards: host processes
    from services.sh, because no image registry is reachable here to pull
    theirs (where one is, run their official images instead);
  - `sluice gateway`, two `sluice worker`s, one `sluice sink` and one
    `sluice notifier`: podman
    containers of localhost/sluice (`make image`), network host, one config
    file mounted like a Kubernetes ConfigMap, the models mounted read-only,
    the lake a shared volume;
  - Prometheus (Debian's package, a host process) with deploy/prometheus's
    rules, scraping every Sluice container through file_sd targets.

The test: two tenants submit jobs through the gateway while one worker
container is SIGKILLed mid-load and another is added; every job must finish
(store), and land exactly once in the lake and in the shards (SQL through the
gateway, per tenant). Jobs with callbacks and a batch with a completion
callback must be delivered to a receiver on the host, each signature
verified with its tenant's secret (schemas/examples/callback/verify.py).
Then Prometheus must have scraped every process, every
metric an alert rule reads must have a series, and every panel query of
deploy/grafana/dashboards/sluice.json must return a series.

Environment: SLUICE_IMAGE (localhost/sluice:latest), SLUICE_MODEL_REPO (the
models to mount), SLUICE_TEST_PYTHON (a Python with confluent-kafka, for one
poison record), JOBS (3000).
"""

import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HERE = os.path.dirname(os.path.abspath(__file__))
DEPLOY = os.path.dirname(HERE)
IMAGE = os.environ.get("SLUICE_IMAGE", "localhost/sluice:latest")
MODELS = os.environ.get("SLUICE_MODEL_REPO", os.path.expanduser("~/.cache/sluice/models"))
PYTHON = os.environ.get("SLUICE_TEST_PYTHON", sys.executable)
MODEL = "all-minilm-l6-v2"
TENANTS = {"acme": "acme-key-1", "globex": "globex-key-1"}
SIGNING_KEY = "deploy-test-signing-key"
# Jobs per tenant with a callback, and lines of the batch with one.
CALLBACK_JOBS, BATCH_LINES = 100, 200
UID = "10001"
PODMAN_ENV = dict(os.environ, CONTAINERS_CONF=os.path.join(DEPLOY, "image", "containers.conf"))


def log(*a):
    print("cluster:", *a, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sh(*args, check=True, capture=False, env=None):
    r = subprocess.run(args, check=False, text=True, env=env,
                       stdout=subprocess.PIPE if capture else None, stderr=subprocess.PIPE if capture else None)
    if check and r.returncode != 0:
        raise SystemExit(f"cluster: {' '.join(args)} failed ({r.returncode}): {r.stderr if capture else ''}")
    return r


def podman(*args, check=True, capture=True):
    return sh("podman", *args, check=check, capture=capture, env=PODMAN_ENV)


def http(method, url, body=None, key=None, timeout=30):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("content-type", "application/json")
    if key:
        req.add_header("x-api-key", key)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            text = r.read()
            try:
                return r.status, json.loads(text or b"null")
            except ValueError:
                return r.status, text.decode(errors="replace")
    except urllib.error.HTTPError as e:
        text = e.read()
        try:
            return e.code, json.loads(text)
        except ValueError:
            return e.code, text.decode(errors="replace")
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
        return 0, str(e)


def wait(what, secs, probe):
    deadline = time.time() + secs
    while time.time() < deadline:
        if probe():
            return
        time.sleep(0.5)
    raise SystemExit(f"cluster: {what} not within {secs}s")


def load_state(d):
    with open(os.path.join(d, "cluster.json")) as f:
        return json.load(f)


def save_state(d, st):
    with open(os.path.join(d, "cluster.json"), "w") as f:
        json.dump(st, f, indent=2)


def services_env(d):
    env = {}
    with open(os.path.join(d, "services", "env")) as f:
        for line in f:
            m = re.match(r"export (\w+)=(.*)", line.strip())
            if m:
                env[m.group(1)] = m.group(2).strip("'\"")
    return env


def write_config(d, env):
    keys = "".join(
        f'[[gateway.api_keys]]\ntenant = "{t}"\nsha256 = "{hashlib.sha256(k.encode()).hexdigest()}"\n'
        f"rate_per_second = 5000\nrate_burst = 5000\n"
        for t, k in TENANTS.items())
    shards = ", ".join(json.dumps(f"{u}/sluice") for u in env["SLUICE_TEST_PG"].split(","))
    text = f"""# The deployment's one configuration file, mounted into every container.
[kafka]
brokers = "{env['SLUICE_TEST_BROKERS']}"
partitions = 4

[store]
redis = "{env['SLUICE_TEST_REDIS']}"

[worker]
# A killed worker's partitions move after 10 s, not Kafka's 45 s.
session_timeout_ms = 10000

[callbacks]
signing_key = "{SIGNING_KEY}"
# The test's receiver listens on the host's loopback.
allow_networks = ["127.0.0.1/32"]

[sinks]
lake = "/var/lib/sluice/lake"
shards = [{shards}]
flush_interval_ms = 1000
session_timeout_ms = 10000

{keys}"""
    path = os.path.join(d, "sluice.toml")
    with open(path, "w") as f:
        f.write(text)
    return path


def write_targets(d, st):
    tdir = os.path.join(d, "prometheus", "targets")
    os.makedirs(tdir, exist_ok=True)
    for role in ("gateway", "worker", "sink", "notifier"):
        targets = [f"127.0.0.1:{c['port']}" for c in st["containers"].values() if c["role"] == role]
        tmp = os.path.join(tdir, f".{role}.json")
        with open(tmp, "w") as f:
            json.dump([{"targets": targets, "labels": {"deployment": "local"}}], f)
        os.replace(tmp, os.path.join(tdir, f"{role}.json"))


def run_container(d, st, name, role):
    port = free_port()
    listen = ["-e", f"SLUICE__GATEWAY__LISTEN=127.0.0.1:{port}"] if role == "gateway" else \
             ["-e", f"SLUICE__OPS__LISTEN=127.0.0.1:{port}"]
    podman("run", "-d", "--name", f"{st['tag']}-{name}", "--network", "host",
           "--user", f"{UID}:{UID}",
           "-v", f"{os.path.join(d, 'sluice.toml')}:/etc/sluice/sluice.toml:ro",
           "-v", f"{MODELS}:/models:ro",
           "-v", f"{os.path.join(d, 'lake')}:/var/lib/sluice/lake",
           "-e", "SLUICE_CONFIG=/etc/sluice/sluice.toml",
           "-e", f"SLUICE__WORKER__ID={name}",
           *listen, IMAGE, role)
    st["containers"][name] = {"role": role, "port": port}
    save_state(d, st)
    write_targets(d, st)
    url = f"http://127.0.0.1:{port}/readyz"
    wait(f"{name} ready", 120, lambda: http("GET", url, timeout=5)[0] == 200)
    log(f"{name} ({role}) ready on 127.0.0.1:{port}")


def up(d):
    """Starts a deployment from empty state: whatever an earlier run left
    in DIR (its lake above all) is stopped and removed first."""
    d = os.path.abspath(d)
    if os.path.exists(os.path.join(d, "cluster.json")):
        down(d)
    if os.path.isdir(os.path.join(d, "services")):
        sh(os.path.join(HERE, "services.sh"), "stop", os.path.join(d, "services"), check=False)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    st = {"tag": f"sluice-{os.getpid()}", "containers": {}}
    save_state(d, st)
    sh(os.path.join(HERE, "services.sh"), "start", os.path.join(d, "services"))
    env = services_env(d)
    for pg in env["SLUICE_TEST_PG"].split(","):
        sh("psql", "-X", "-q", "-d", f"{pg}/postgres", "-c", "CREATE DATABASE sluice")
    write_config(d, env)
    lake = os.path.join(d, "lake")
    os.makedirs(lake, exist_ok=True)
    os.chown(lake, int(UID), int(UID))
    # Prometheus: this deployment's copy of the config and rules.
    pdir = os.path.join(d, "prometheus")
    os.makedirs(os.path.join(pdir, "data"), exist_ok=True)
    for f in ("prometheus.yml", "rules.yml"):
        with open(os.path.join(DEPLOY, "prometheus", f)) as src, open(os.path.join(pdir, f), "w") as dst:
            dst.write(src.read())
    write_targets(d, st)
    st["prometheus_port"] = free_port()
    with open(os.path.join(pdir, "log"), "w") as out:
        p = subprocess.Popen(["prometheus", f"--config.file={pdir}/prometheus.yml",
                              f"--storage.tsdb.path={pdir}/data",
                              f"--web.listen-address=127.0.0.1:{st['prometheus_port']}"],
                             stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    st["prometheus_pid"] = p.pid
    save_state(d, st)
    prom = f"http://127.0.0.1:{st['prometheus_port']}"
    wait("prometheus ready", 60, lambda: http("GET", f"{prom}/-/ready", timeout=5)[0] == 200)
    log(f"prometheus on {prom}")
    # The gateway first: it creates the topics with the configured partitions.
    run_container(d, st, "gateway-1", "gateway")
    for name in ("worker-1", "worker-2"):
        run_container(d, st, name, "worker")
    run_container(d, st, "sink-1", "sink")
    run_container(d, st, "notifier-1", "notifier")
    return st


def down(d):
    d = os.path.abspath(d)
    try:
        st = load_state(d)
    except FileNotFoundError:
        return
    for name in st.get("containers", {}):
        cname = f"{st['tag']}-{name}"
        podman("stop", "-t", "20", cname, check=False)
        logs = podman("logs", cname, check=False)
        with open(os.path.join(d, f"{name}.log"), "w") as f:
            f.write((logs.stdout or "") + (logs.stderr or ""))
        podman("rm", "-f", cname, check=False)
    if st.get("prometheus_pid"):
        try:
            os.kill(st["prometheus_pid"], signal.SIGTERM)
        except ProcessLookupError:
            pass
    if os.path.isdir(os.path.join(d, "services")):
        sh(os.path.join(HERE, "services.sh"), "stop", os.path.join(d, "services"), check=False)
    os.remove(os.path.join(d, "cluster.json"))


def gateway(st):
    return f"http://127.0.0.1:{st['containers']['gateway-1']['port']}"


def submit(st, tenant, ids, ttl_ms=None, callback=None):
    body = [{"job_id": i, "model": MODEL, "input": {"text": f"document {i} about {tenant}'s catalogue"},
             "metadata": {"source": "deploy-test"}} for i in ids]
    for b in body:
        if ttl_ms is not None:
            b["ttl_ms"] = ttl_ms
        if callback is not None:
            b["callback"] = {"url": callback}
    for attempt in range(60):
        code, resp = http("POST", f"{gateway(st)}/v1/jobs", body, TENANTS[tenant])
        if code == 202:
            return
        if code in (429, 503, 0):
            time.sleep(0.5)
            continue
        raise SystemExit(f"cluster: submit answered {code}: {resp}")
    raise SystemExit("cluster: the gateway kept refusing submissions")


class Receiver:
    """A callback receiver on the host: every delivery's headers, body and
    whether its signature verified with its tenant's secret."""

    def __init__(self, secrets):
        spec = importlib.util.spec_from_file_location(
            "verify", os.path.join(os.path.dirname(DEPLOY), "schemas", "examples", "callback", "verify.py"))
        verify = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(verify)
        self.seen, self.lock = [], threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                h = {k.lower(): v for k, v in self.headers.items()}
                secret = secrets.get(h.get("sluice-tenant", ""), "")
                ok = verify.verify(secret, h.get("sluice-signature", ""), body)
                with outer.lock:
                    outer.seen.append((h, json.loads(body), ok))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def deliveries(self):
        """Delivery id -> (headers, body, signature verified), deduped."""
        with self.lock:
            return {h.get("sluice-delivery-id"): (h, b, ok) for h, b, ok in self.seen}


def submit_batch(st, tenant, n, callback):
    lines = "".join(json.dumps({"custom_id": f"line-{i}", "model": MODEL,
                                "input": {"text": f"batch line {i} of {tenant}"}}) + "\n" for i in range(n))
    q = urllib.parse.urlencode({"callback": callback})
    req = urllib.request.Request(f"{gateway(st)}/v1/batches?{q}", data=lines.encode(), method="POST")
    req.add_header("content-type", "application/x-ndjson")
    req.add_header("x-api-key", TENANTS[tenant])
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())["id"]


def check_callbacks(st, receiver, job_ids, batch_id):
    """What the notifier delivered: every job's callback and the batch's
    completion, signed with the tenant's secret. Returns failures."""
    want = len(job_ids) + 1
    try:
        wait("every callback delivered", 180, lambda: len(receiver.deliveries()) >= want)
    except SystemExit as e:
        return [str(e) + f": {len(receiver.deliveries())} of {want}"]
    failures = []
    got = receiver.deliveries().values()
    jobs = {b.get("job_id") for h, b, _ in got if h.get("sluice-event") == "job.succeeded"}
    batches = [b for h, b, _ in got if h.get("sluice-event") == "batch.completed"]
    if jobs != set(job_ids):
        failures.append(f"job callbacks: {len(jobs)} distinct, {len(set(job_ids) - jobs)} missing")
    if len(batches) != 1 or batches[0]["id"] != batch_id or batches[0]["counts"] != {"succeeded": BATCH_LINES}:
        failures.append(f"batch.completed deliveries: {batches}")
    unverified = sum(1 for _, _, ok in got if not ok)
    if unverified:
        failures.append(f"{unverified} deliveries whose signature did not verify")
    log(f"callbacks: {len(jobs)} jobs and {len(batches)} batch completion delivered, "
        f"{len(receiver.seen)} requests, {unverified} unverified")
    return failures


def sql(st, tenant, query):
    code, resp = http("POST", f"{gateway(st)}/v1/sql", {"query": query}, TENANTS[tenant])
    if code != 200:
        raise SystemExit(f"cluster: SQL answered {code}: {resp}")
    return resp["rows"]


def poison(env):
    """One record no decoder accepts, straight to Kafka: it must be dead-lettered."""
    code = (
        "from confluent_kafka import Producer\n"
        f"p = Producer({{'bootstrap.servers': '{env['SLUICE_TEST_BROKERS']}'}})\n"
        f"p.produce('sluice.jobs.{MODEL}', key=b'poison-1', value=b'{{not json')\n"
        "assert p.flush(30) == 0\n")
    sh(PYTHON, "-c", code)


def prom_query(st, expr):
    q = urllib.parse.urlencode({"query": expr})
    code, resp = http("GET", f"http://127.0.0.1:{st['prometheus_port']}/api/v1/query?{q}")
    if code != 200 or resp.get("status") != "success":
        raise SystemExit(f"cluster: Prometheus refused {expr!r}: {code} {resp}")
    return resp["data"]["result"]


def rule_metrics():
    """Every metric name a rule of rules.yml reads (recorded names excluded)."""
    with open(os.path.join(DEPLOY, "prometheus", "rules.yml")) as f:
        text = f.read()
    exprs = re.findall(r"expr: \|\n((?:          .*\n)+)|expr: (.*)", text)
    names = set()
    for block, line in exprs:
        names |= set(re.findall(r"\b(sluice_[a-z_]+)\b", block or line))
    return sorted(names)


def test(d):
    jobs = int(os.environ.get("JOBS", "3000"))
    d = os.path.abspath(d)
    try:
        st = up(d)
        env = services_env(d)
        secrets = {}
        for t, k in TENANTS.items():
            code, body = http("GET", f"{gateway(st)}/v1/callbacks/secret", key=k)
            if code != 200:
                raise SystemExit(f"cluster: GET /v1/callbacks/secret answered {code}: {body}")
            secrets[t] = body["secret"]
        receiver = Receiver(secrets)
        started = time.time()
        ids = {t: [] for t in TENANTS}
        callback_ids = []
        chunk, chunks = 100, jobs // 100
        for n in range(chunks):
            tenant = list(TENANTS)[n % 2]
            batch = [f"{tenant}-{n}-{i}" for i in range(chunk)]
            # Each tenant's first CALLBACK_JOBS jobs ask for a callback.
            wants = len(ids[tenant]) < CALLBACK_JOBS
            submit(st, tenant, batch, callback=receiver.url if wants else None)
            ids[tenant] += batch
            if wants:
                callback_ids += batch
            if n == 1:
                batch_id = submit_batch(st, "globex", BATCH_LINES, receiver.url)
                ids["globex"] += [f"{batch_id}-{i}" for i in range(1, BATCH_LINES + 1)]
            if n == chunks // 3:
                log(f"SIGKILL worker-1 after {sum(map(len, ids.values()))} submitted")
                podman("kill", "--signal", "KILL", f"{st['tag']}-worker-1")
            if n == 2 * chunks // 3:
                log("adding worker-3")
                run_container(d, st, "worker-3", "worker")
            time.sleep(0.2)
        submitted = sum(map(len, ids.values()))
        log(f"{submitted} jobs submitted in {time.time() - started:.1f}s")
        # What the dashboard's failure and DLQ panels show: one job that
        # expires before its batch, one record no decoder accepts.
        submit(st, "acme", ["acme-expiring"], ttl_ms=1)
        poison(env)

        # Every job finished: the store, through the API.
        def all_done():
            for t, group in ids.items():
                rows = sql(st, t, "SELECT count(*) AS n FROM shards")
                if rows[0]["n"] < len(group):
                    return False
            return True
        wait("every job in the shards", 600, all_done)
        unfinished = []
        for t, group in ids.items():
            for i in group:
                code, body = http("GET", f"{gateway(st)}/v1/jobs/{i}", key=TENANTS[t])
                if code != 200 or body.get("status") != "succeeded":
                    unfinished.append((i, code, body if code != 200 else body.get("status")))
        finished = submitted - len(unfinished)
        log(f"finished {finished} of {submitted} in {time.time() - started:.1f}s; unfinished: {unfinished[:5]}")

        # Exactly once in the lake and the shards, per tenant.
        failures = []
        wait("every job in the lake", 120, lambda: all(
            sql(st, t, "SELECT count(DISTINCT job_id) AS d FROM results WHERE job_id <> 'acme-expiring'")[0]["d"]
            >= len(g) for t, g in ids.items()))
        for t, group in ids.items():
            for table in ("results", "shards"):
                row = sql(st, t, f"SELECT count(*) AS n, count(DISTINCT job_id) AS d FROM {table} "
                                 f"WHERE job_id <> 'acme-expiring'")[0]
                log(f"{table:7} {t}: {row['n']} rows, {row['d']} distinct jobs (submitted {len(group)})")
                if row["n"] != len(group) or row["d"] != len(group):
                    failures.append(f"{table} of {t}: {row} for {len(group)} jobs")
        if unfinished:
            failures.append(f"{len(unfinished)} jobs not succeeded, e.g. {unfinished[:3]}")
        failures += check_callbacks(st, receiver, callback_ids, batch_id)
        # The kill and the addition happened under load: the killed worker
        # had finished jobs before it, the added one finished jobs after.
        by_worker = {}
        for t in TENANTS:
            for row in sql(st, t, "SELECT worker_id, count(*) AS n FROM results GROUP BY worker_id"):
                by_worker[row["worker_id"]] = by_worker.get(row["worker_id"], 0) + row["n"]
        log(f"jobs by worker: {dict(sorted(by_worker.items()))}")
        for w in ("worker-1", "worker-3"):
            if not by_worker.get(w):
                failures.append(f"{w} finished no job: the kill or the addition was not under load")

        # Prometheus scraped every process; what the rules read exists.
        time.sleep(12)
        ups = {(r["metric"]["job"], r["metric"]["instance"]): r["value"][1]
               for r in prom_query(st, 'up{job=~"sluice-.*"}')}
        log(f"scraped: {sorted(ups.items())}")
        for name, c in st["containers"].items():
            key = (f"sluice-{c['role']}", f"127.0.0.1:{c['port']}")
            want = "0" if name == "worker-1" else "1"
            if ups.get(key) != want:
                failures.append(f"up{{{key}}} = {ups.get(key)}, want {want}")
        for m in rule_metrics():
            series = prom_query(st, f'{{__name__=~"{m}(_bucket)?"}}')
            if not series:
                failures.append(f"no series of {m}, which an alert rule reads")
        down_alert = prom_query(st, 'up{job=~"sluice-.*"} == 0')
        if not down_alert:
            failures.append("the SluiceProcessDown expression finds no series for the killed worker")

        # Every dashboard panel returns data.
        with open(os.path.join(DEPLOY, "grafana", "dashboards", "sluice.json")) as f:
            dash = json.load(f)
        for p in dash["panels"]:
            for t in p["targets"]:
                n = len(prom_query(st, t["expr"]))
                if n == 0:
                    failures.append(f"panel {p['title']!r}: {t['expr']} returns no series")
        log(f"{sum(len(p['targets']) for p in dash['panels'])} panel queries over {len(dash['panels'])} panels checked")

        if failures:
            log("FAILED:\n  " + "\n  ".join(failures))
            return 1
        log(f"PASSED: {submitted} submitted, {finished} finished, 0 lost, 0 duplicated in lake and shards; "
            "worker-1 killed and worker-3 added mid-load")
        return 0
    finally:
        down(d)


def main():
    if len(sys.argv) != 3 or sys.argv[1] not in ("up", "down", "test"):
        print(__doc__, file=sys.stderr)
        return 2
    cmd, d = sys.argv[1], sys.argv[2]
    if cmd == "up":
        up(d)
        return 0
    if cmd == "down":
        down(d)
        return 0
    return test(d)


if __name__ == "__main__":
    sys.exit(main())
