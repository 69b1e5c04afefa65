#!/usr/bin/env python3
"""Runs the README's quick start as written, so the README cannot drift.

The commands are not copied here: they are read from the README's shell
blocks marked with an HTML comment just above them,

    <!-- quickstart: install -->   run in the clone (must succeed)
    <!-- quickstart: server -->    started in the background (must answer on
                                   127.0.0.1:8080), stopped with SIGINT at the end
    <!-- quickstart: client -->    run in order in a scratch directory
    <!-- quickstart: sql -->       run until its answer counts the jobs
                                   (the sinks flush every few seconds)

each in a fresh `bash -eu -o pipefail` with only HOME, PATH (with
~/.cargo/bin, where `make install` puts the binaries), LANG and TERM set, as
a new shell on a freshly set-up machine has them: no ORT_DYLIB_PATH, no
SLUICE_* variables.

What is checked is what a user would look at: every job id the client
blocks submit (`"job_id": "…"` in a JSON body, `-k ID` of kcat) is printed
with status `succeeded` by a later command, and the SQL answer counts that
many jobs of the model.

Usage: readme_quickstart.py README.md
"""

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

BLOCK = re.compile(r"<!-- quickstart: (install|server|client|sql) -->\s*\n```sh\n(.*?)\n```", re.S)
SERVER_URL = "http://127.0.0.1:8080/healthz"


def fail(msg):
    print(f"README quick start: FAILED: {msg}", file=sys.stderr)
    sys.exit(1)


def shell_env():
    home = os.environ["HOME"]
    path = f"{home}/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    return {"HOME": home, "PATH": path, "LANG": "C.UTF-8", "TERM": "dumb"}


def run(body, cwd, timeout):
    print(f"$ {body}", flush=True)
    p = subprocess.run(
        ["bash", "-eu", "-o", "pipefail", "-c", body],
        cwd=cwd,
        env=shell_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    print(p.stdout, end="", flush=True)
    if p.returncode != 0:
        print(p.stderr, file=sys.stderr)
        fail(f"exit status {p.returncode}: {body}")
    return p.stdout


def port_answers(url):
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def statuses(output):
    """job_id -> status of every JSON object printed one per line."""
    seen = {}
    for line in output.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            doc = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(doc, dict) and "job_id" in doc and "status" in doc:
            seen[doc["job_id"]] = doc["status"]
    return seen


def submitted_ids(body):
    ids = re.findall(r'"job_id"\s*:\s*"([^"]+)"', body)
    ids += re.findall(r"\s-k\s+(\S+)", body)
    return list(dict.fromkeys(ids))


def main():
    readme = sys.argv[1] if len(sys.argv) > 1 else "README.md"
    repo = os.path.dirname(os.path.abspath(readme))
    blocks = BLOCK.findall(open(readme, encoding="utf-8").read())
    kinds = [k for k, _ in blocks]
    for needed in ("install", "server", "client", "sql"):
        if needed not in kinds:
            fail(f"the README has no block marked <!-- quickstart: {needed} -->")
    if port_answers(SERVER_URL):
        fail("something already answers on 127.0.0.1:8080; stop it first")

    scratch = tempfile.mkdtemp(prefix="sluice-quickstart-")
    server, server_log = None, os.path.join(scratch, "server.log")
    output, ids = "", []
    try:
        for kind, body in blocks:
            if kind == "install":
                run(body, repo, 3600)
            elif kind == "server":
                print(f"$ {body}   (in the background; log in {server_log})", flush=True)
                log = open(server_log, "w")
                server = subprocess.Popen(
                    ["bash", "-eu", "-o", "pipefail", "-c", f"exec {body}"],
                    cwd=scratch,
                    env=shell_env(),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
                deadline = time.time() + 120
                while not port_answers(SERVER_URL):
                    if server.poll() is not None:
                        fail(f"`{body}` exited with {server.returncode}:\n" + open(server_log).read())
                    if time.time() > deadline:
                        fail(f"`{body}` did not answer on {SERVER_URL} within 120 s:\n" + open(server_log).read())
                    time.sleep(0.5)
            elif kind == "client":
                ids += submitted_ids(body)
                output += run(body, scratch, 120)
            elif kind == "sql":
                done = statuses(output)
                unfinished = {i: done.get(i) for i in ids if done.get(i) != "succeeded"}
                if not ids or unfinished:
                    fail(f"jobs submitted by the quick start {ids}; not shown as succeeded: {unfinished}")
                # The sinks land results every few seconds: ask until the
                # answer counts every job (the real quantity), for at most 60 s.
                deadline = time.time() + 60
                while True:
                    answer = run(body, scratch, 60)
                    counts = [int(n) for n in re.findall(r"all-minilm-l6-v2\D+?(\d+)", answer)]
                    if counts and max(counts) >= len(ids):
                        break
                    if time.time() > deadline:
                        fail(f"the SQL answer never counted {len(ids)} jobs:\n{answer}")
                    time.sleep(1)
        print(f"README quick start: OK ({len(ids)} jobs: {', '.join(ids)})")
    finally:
        if server is not None and server.poll() is None:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
                fail("`sluice up` did not stop within 60 s of SIGINT")
        if server is not None and server.returncode not in (0, None, -signal.SIGINT):
            fail(f"`sluice up` exited with {server.returncode}:\n" + open(server_log).read())


if __name__ == "__main__":
    main()
