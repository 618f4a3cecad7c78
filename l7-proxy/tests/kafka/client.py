#!/usr/bin/env python3
"""One Kafka client action through membrane, for the end-to-end suites.

    client.py LIB ACTION BOOTSTRAP TOPIC CLIENT_ID

LIB is kafka-python or confluent-kafka; ACTION is produce, consume or metadata. Prints one JSON
line: {"ok": bool, "error": str, "seconds": float, ...}. A denied request must surface as the
client's own authorization error, promptly: the suites check both.
"""
import json, sys, time

lib, action, bootstrap, topic, client_id = sys.argv[1:6]
t0 = time.time()
out = {"lib": lib, "action": action, "topic": topic}


def done(ok, error="", **kw):
    out.update(ok=ok, error=error, seconds=round(time.time() - t0, 3), **kw)
    print(json.dumps(out))
    sys.exit(0)


if lib == "confluent-kafka":
    from confluent_kafka import Consumer, Producer
    from confluent_kafka.admin import AdminClient

    errors = []  # what librdkafka reports through error_cb (e.g. a topic it may not use)
    base = {"bootstrap.servers": bootstrap, "client.id": client_id, "enable.metrics.push": False,
            "error_cb": lambda e: errors.append(e.name())}
    if action == "produce":
        p = Producer({**base, "acks": 1, "linger.ms": 5, "message.timeout.ms": 10000})
        results = []
        p.produce(topic, b"membrane-" + str(time.time()).encode(),
                  on_delivery=lambda err, msg: results.append(err))
        deadline = time.time() + 10
        while not results and time.time() < deadline:
            p.poll(0.05)
        err = results[0] if results else "timeout"
        if err is None:
            done(True)
        done(False, str(err.name() if hasattr(err, "name") else err), reported=errors)
    elif action == "consume":
        # A subscription, as applications use it: librdkafka reports a subscribed topic it may
        # not read as a consumer error at once (an assign() would only retry). tansu's first
        # group join takes session_timeout/2, so the session is short.
        c = Consumer({**base, "group.id": "membrane-" + client_id, "auto.offset.reset": "earliest",
                      "enable.auto.commit": False, "session.timeout.ms": 6000,
                      "heartbeat.interval.ms": 2000})
        c.subscribe([topic])
        deadline = time.time() + 10
        while time.time() < deadline:
            m = c.poll(0.05)
            if m is None:
                if errors:
                    c.close()
                    done(False, errors[0])
                continue
            if m.error():
                c.close()
                done(False, m.error().name())
            c.close()
            done(True, value=m.value().decode(errors="replace"))
        c.close()
        done(False, "timeout")
    elif action == "metadata":
        md = AdminClient(base).list_topics(topic=topic or None, timeout=10)
        topics = {name: (t.error.name() if t.error else "") for name, t in md.topics.items()}
        done(True, topics=topics)
else:
    from kafka import KafkaConsumer, KafkaProducer

    if action == "produce":
        p = KafkaProducer(bootstrap_servers=bootstrap, client_id=client_id, acks=1,
                          max_block_ms=10000, request_timeout_ms=10000)
        try:
            p.send(topic, b"membrane").get(timeout=10)
            done(True)
        except Exception as e:
            done(False, type(e).__name__)
        finally:
            p.close(timeout=1)
    elif action == "consume":
        # kafka-python reports a topic it may not read in two ways: an exception from the fetcher,
        # or (when the Metadata answer already refused the topic) an ERROR log record from
        # kafka.cluster while it keeps retrying. Both are the client's own report; both count.
        import logging

        class Refusals(logging.Handler):
            seen = []

            def emit(self, record):
                if "not authorized" in record.getMessage():
                    self.seen.append(record.getMessage())

        logging.getLogger("kafka").addHandler(Refusals(logging.ERROR))
        from kafka import TopicPartition

        c = KafkaConsumer(bootstrap_servers=bootstrap, client_id=client_id,
                          auto_offset_reset="earliest", request_timeout_ms=10000)
        try:
            tp = TopicPartition(topic, 0)
            c.assign([tp])
            c.seek(tp, 0)
            deadline = time.time() + 10
            while time.time() < deadline:
                for records in c.poll(timeout_ms=50).values():
                    done(True, value=records[0].value.decode(errors="replace"))
                if Refusals.seen:
                    done(False, "TopicAuthorizationFailedError", via="log: " + Refusals.seen[0])
            done(False, "timeout")
        except Exception as e:
            done(False, type(e).__name__)
        finally:
            c.close()
    elif action == "metadata":
        c = None
        try:  # the constructor already bootstraps: a broker not reachable yet is a result too
            c = KafkaConsumer(bootstrap_servers=bootstrap, client_id=client_id, request_timeout_ms=10000)
            done(True, topics={t: "" for t in sorted(c.topics())})
        except Exception as e:
            done(False, type(e).__name__)
        finally:
            if c is not None:
                c.close()
