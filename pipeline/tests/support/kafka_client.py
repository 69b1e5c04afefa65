#!/usr/bin/env python3
"""A Kafka client that is not Sluice (confluent-kafka), for the tests.

  produce  --brokers B --topic T [--partition P]   reads JSON lines from stdin:
           {"key": str|null, "value": str, "headers": {str: str}} (or
           "value_hex" for bytes that are not UTF-8); prints
           one JSON line per record: {"partition": p, "offset": o}
  consume  --brokers B --topic T --count N [--timeout S]
           prints up to N records as JSON lines {key, value, value_hex, headers,
           partition, offset} (value: UTF-8 with replacements; value_hex: the bytes)
           (reads from the beginning, no consumer group commits)
  committed --brokers B --group G --topic T   prints {"partition": offset, ...}
  produce-jobs --brokers B --topic T --tag TAG --count N [--create]
           N text jobs `TAG-i` of tenant `t` for all-minilm-l6-v2, fast (batched)
  produce-results --brokers B --topic T --tag TAG --lo A --hi B [--create]
                  [--tenant T] [--callback URL]
                  [--batch-id ID --batch-total N --batch-callback URL]
           synthetic JobResults `TAG-A..B` (5 tenants, or T; 2 models, 1 in
           10 failed; with a callback to URL; result i as line i of batch
           ID of N lines), fast (batched), keyed <tenant>/<job_id> like
           Sluice's
  --create makes the topic (4 partitions) first, and with produce-jobs also
  <prefix>.results and <prefix>.dlq, where the prefix is the topic's up to
  ".jobs.".
"""

import argparse
import json
import sys
import time

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic


def produce(args):
    # One request in flight: tansu 0.6 races on concurrent idempotent batches.
    p = Producer({"bootstrap.servers": args.brokers, "enable.idempotence": True, "max.in.flight.requests.per.connection": 1})
    delivered = []

    def on_delivery(err, msg):
        if err is not None:
            raise KafkaException(err)
        delivered.append({"partition": msg.partition(), "offset": msg.offset()})

    for line in sys.stdin:
        if not line.strip():
            continue
        rec = json.loads(line)
        kw = {}
        if args.partition is not None:
            kw["partition"] = args.partition
        p.produce(
            args.topic,
            key=None if rec.get("key") is None else rec["key"].encode(),
            value=bytes.fromhex(rec["value_hex"]) if "value_hex" in rec else rec["value"].encode(),
            headers=[(k, v.encode()) for k, v in rec.get("headers", {}).items()],
            on_delivery=on_delivery,
            **kw,
        )
        p.flush(30)
    if p.flush(30) != 0:
        sys.exit("records left undelivered")
    for d in delivered:
        print(json.dumps(d))


def consume(args):
    c = Consumer({
        "bootstrap.servers": args.brokers,
        "group.id": f"test-reader-{time.time_ns()}",
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
    })
    md = c.list_topics(args.topic, timeout=10)
    parts = md.topics[args.topic].partitions
    c.assign([TopicPartition(args.topic, p, 0) for p in parts])
    got = 0
    deadline = time.time() + args.timeout
    while got < args.count and time.time() < deadline:
        m = c.poll(0.5)
        if m is None or m.error():
            continue
        got += 1
        print(json.dumps({
            "key": None if m.key() is None else m.key().decode(errors="replace"),
            "value": (m.value() or b"").decode(errors="replace"),
            "value_hex": (m.value() or b"").hex(),
            "headers": {k: (v or b"").decode(errors="replace") for k, v in (m.headers() or [])},
            "partition": m.partition(),
            "offset": m.offset(),
        }), flush=True)
    c.close()


def committed(args):
    c = Consumer({"bootstrap.servers": args.brokers, "group.id": args.group, "enable.auto.commit": False})
    md = c.list_topics(args.topic, timeout=10)
    tps = [TopicPartition(args.topic, p) for p in md.topics[args.topic].partitions]
    out = {str(tp.partition): tp.offset for tp in c.committed(tps, timeout=10)}
    print(json.dumps(out))
    c.close()


def commit(args):
    """Joins --group, commits --offset for every partition of --topic and
    leaves, as if its members' commits had been lost. (A commit from outside
    the group is refused by librdkafka's mock cluster.)"""
    c = Consumer({"bootstrap.servers": args.brokers, "group.id": args.group, "enable.auto.commit": False,
                  "auto.offset.reset": "earliest"})
    md = c.list_topics(args.topic, timeout=10)
    want = len(md.topics[args.topic].partitions)
    c.subscribe([args.topic])
    deadline = time.time() + args.timeout
    while len(c.assignment()) < want:
        if time.time() > deadline:
            raise SystemExit(f"assigned {c.assignment()} of {want} partitions")
        c.poll(0.2)
    tps = [TopicPartition(args.topic, p, args.offset) for p in md.topics[args.topic].partitions]
    for tp in c.commit(offsets=tps, asynchronous=False):
        if tp.error:
            raise SystemExit(f"commit {tp}: {tp.error}")
    c.close()


def create_topics(brokers, topics):
    admin = AdminClient({"bootstrap.servers": brokers})
    for f in admin.create_topics([NewTopic(t, 4, 1) for t in topics]).values():
        try:
            f.result()
        except Exception as e:
            if "TOPIC_ALREADY_EXISTS" not in str(e) and "already exists" not in str(e):
                raise


def bulk(brokers, topic, records):
    """Produces (key, value) pairs as fast as the broker takes them: batched
    (linger), idempotent, one request in flight (tansu 0.6 races on
    concurrent idempotent batches)."""
    p = Producer({"bootstrap.servers": brokers, "linger.ms": 20, "enable.idempotence": True,
                  "max.in.flight.requests.per.connection": 1})
    for key, value in records:
        while True:
            try:
                p.produce(topic, key=key, value=value)
                break
            except BufferError:
                p.poll(0.1)
        p.poll(0)
    if p.flush(120) != 0:
        sys.exit("records left undelivered")


def produce_jobs(args):
    if args.create:
        prefix = args.topic.split(".jobs.")[0]
        create_topics(args.brokers, [args.topic, prefix + ".results", prefix + ".dlq"])
    bulk(args.brokers, args.topic, (
        (f"{args.tag}-{i}", json.dumps({"job_id": f"{args.tag}-{i}", "tenant": "t", "model": "all-minilm-l6-v2",
                                        "input": {"text": f"backlog sentence number {i}"}}))
        for i in range(args.count)))


def produce_results(args):
    if args.create:
        create_topics(args.brokers, [args.topic])
    models = ["all-minilm-l6-v2", "logreg-iris"]

    def result(i):
        ok = i % 10 != 0
        r = {"job_id": f"{args.tag}-{i}", "tenant": f"tenant-{i % 5}", "model": models[i % 2], "model_version": "1",
             "status": "succeeded" if ok else "failed",
             "timings": {"queued_ms": i % 300, "inference_ms": 5 + i % 20, "batch_size": 1 + i % 32,
                         "input_tokens": 3 + i % 60},
             "worker_id": "synthetic", "submitted_at": "2026-11-27T10:00:00Z",
             "finished_at": f"2026-11-27T{10 + i % 3:02d}:00:01Z"}
        if ok:
            r["output"] = {"embedding": [0.25, -0.5, i % 7 / 7.0]}
        else:
            r["error"] = {"code": "input_too_long", "message": "synthetic failure"}
        if args.tenant:
            r["tenant"] = args.tenant
        if args.callback:
            r["callback"] = {"url": args.callback}
        if args.batch_id:
            r["batch"] = {"id": args.batch_id, "index": i, "total": args.batch_total,
                          "callback_url": args.batch_callback}
        return f"{r['tenant']}/{r['job_id']}", json.dumps(r)

    bulk(args.brokers, args.topic, (result(i) for i in range(args.lo, args.hi)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("command", choices=["produce", "consume", "committed", "commit", "produce-jobs", "produce-results"])
    ap.add_argument("--brokers", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--partition", type=int)
    ap.add_argument("--count", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=30)
    ap.add_argument("--group")
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--tag")
    ap.add_argument("--lo", type=int, default=0)
    ap.add_argument("--hi", type=int, default=0)
    ap.add_argument("--create", action="store_true")
    ap.add_argument("--tenant")
    ap.add_argument("--callback")
    ap.add_argument("--batch-id")
    ap.add_argument("--batch-total", type=int)
    ap.add_argument("--batch-callback")
    args = ap.parse_args()
    {"produce": produce, "consume": consume, "committed": committed, "commit": commit,
     "produce-jobs": produce_jobs, "produce-results": produce_results}[args.command](args)


if __name__ == "__main__":
    main()
