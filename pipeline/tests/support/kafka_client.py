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
"""

import argparse
import json
import sys
import time

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition


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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("command", choices=["produce", "consume", "committed", "commit"])
    ap.add_argument("--brokers", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--partition", type=int)
    ap.add_argument("--count", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=30)
    ap.add_argument("--group")
    ap.add_argument("--offset", type=int, default=0)
    args = ap.parse_args()
    {"produce": produce, "consume": consume, "committed": committed, "commit": commit}[args.command](args)


if __name__ == "__main__":
    main()
