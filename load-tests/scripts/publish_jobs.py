#!/usr/bin/env python3
"""Publishes jobs to Kafka with a client that is not Sluice (confluent-kafka).

`sluice-load bench` runs it so that the jobs reach Sluice the way a user's
producer sends them. Input: a file of `key<TAB>value` lines (the value is a
JobRequest's JSON, written by the caller). Every record carries the
`tenant` header. Once connected it prints `{"ready": true}` and waits for a
line `go` on stdin (so that connecting is not timed), then publishes and
prints one JSON line when every record is acknowledged:

  {"published": N, "seconds": wall time from first send to last ack,
   "cpu_seconds": this process's user + system CPU while publishing}

Usage: publish_jobs.py --brokers B --topic T --file F --tenant T
                       [--linger-ms 5] [--max-in-flight 1]
"""

import argparse
import json
import resource
import sys
import time

from confluent_kafka import KafkaException, Producer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--brokers", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--file", required=True)
    ap.add_argument("--tenant", required=True)
    ap.add_argument("--linger-ms", type=int, default=5)
    # One request in flight per connection: tansu 0.6 races on concurrent
    # idempotent batches. The mock cluster takes 5 (Kafka's own limit).
    ap.add_argument("--max-in-flight", type=int, default=1)
    args = ap.parse_args()

    with open(args.file, "rb") as f:
        records = [line.rstrip(b"\n").split(b"\t", 1) for line in f if line.strip()]
    p = Producer({
        "bootstrap.servers": args.brokers,
        "enable.idempotence": True,
        "max.in.flight.requests.per.connection": args.max_in_flight,
        "linger.ms": args.linger_ms,
        "queue.buffering.max.messages": 1_000_000,
        "compression.type": "none",
    })
    failed = []

    def on_delivery(err, _msg):
        if err is not None:
            failed.append(str(err))

    headers = [("tenant", args.tenant.encode())]
    # Connected and ready (metadata fetched, and a second for the idempotent
    # producer to get its producer id, so the first send does not wait for
    # either): say so, then wait for the go-ahead on stdin.
    p.list_topics(args.topic, timeout=30)
    time.sleep(1)
    print(json.dumps({"ready": True}), flush=True)
    if sys.stdin.readline().strip() != "go":
        raise SystemExit("no go-ahead on stdin")
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.monotonic()
    for key, value in records:
        while True:
            try:
                p.produce(args.topic, key=key, value=value, headers=headers, on_delivery=on_delivery)
                break
            except BufferError:
                p.poll(0.05)
        p.poll(0)
    left = p.flush(120)
    elapsed = time.monotonic() - start
    if left or failed:
        raise KafkaException(f"{left} records unacknowledged, {len(failed)} failed: {failed[:3]}")
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    print(json.dumps({"published": len(records), "seconds": elapsed, "cpu_seconds": cpu}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
