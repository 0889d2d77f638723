"""Out-of-process listening (bluesky_jit.apps.listen): 0MQ end to end, Kafka against a stand-in.

0MQ: a real ``bluesky-0MQ-proxy`` subprocess, ``bluesky-jit listen --zmq`` in another
subprocess, a RunEngine with bluesky's ``Publisher`` in this process, a real Tiled server.

Kafka: no broker can be installed here, so :class:`StandInBroker` plays one: partitions
keyed like Kafka (one key -> one partition), consumer groups that split partitions, and
committed offsets a restarted member resumes from. Messages are produced by
:class:`~bluesky_jit.apps.listen.RunKeyedPublisher` with bluesky-kafka's encoding.
"""

from __future__ import annotations

import collections
import os
import pickle
import re
import socket
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest

from bluesky_jit.apps.listen import (
    KafkaSource,
    Listener,
    OffsetTracker,
    RunKeyedPublisher,
    kafka_deserializer,
    kafka_serializer,
    zmq_deserializer,
    zmq_serializer,
)
from bluesky_jit.catalog import derived_runs_for, runs_container
from bluesky_jit.errors import ConfigError, ScanDataError

from .helpers import wait_for

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tomo_runs(RE, beamline, *, bad: bool = False, num_angles: int = 16):
    """A short tomography scan; ``bad`` takes no darks and flats (the run must fail)."""
    from simulated_devices.plans import tomo_scan

    n = 0 if bad else 2
    return RE(
        tomo_scan(
            *beamline.plan_devices,
            num_angles=num_angles,
            num_darks=n,
            num_flats=n,
        )
    )


def tiny_beamline(path: Path, external: bool = True):
    """ophyd v1 devices: frames in HDF5 files (Resource/Datum) or inline in the events."""
    from bluesky_jit.apps.session import simulated_beamline

    settings = {"size": 32, "rows": 4, "photons": 300.0, "api": "v1", "external": external}
    return simulated_beamline(path, settings)


# =========================================================================== 0MQ
@pytest.mark.slow
def test_zmq_listener_in_another_process_writes_derived_runs(jit_catalog, tiny_toml, RE, tmp_path):
    import zmq
    from bluesky.callbacks.zmq import Publisher
    from bluesky.plans import count
    from ophyd.sim import det1

    port_in, port_out = free_port(), free_port()
    data_dir = jit_catalog.base / "zmq"
    proxy = subprocess.Popen(
        [
            BIN / "bluesky-0MQ-proxy",
            "--in-address",
            f"127.0.0.1:{port_in}",
            "--out-address",
            f"127.0.0.1:{port_out}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    listener = publisher = None
    try:
        wait_for(lambda: listens(port_out), 20, f"a listener on port {port_out}")
        listener = subprocess.Popen(
            [
                BIN / "bluesky-jit",
                "listen",
                "--zmq",
                f"127.0.0.1:{port_out}",
                "--catalog",
                jit_catalog.uri,
                "--data-dir",
                str(data_dir),
                "--max-runs",
                "2",
                "--config",
                str(tiny_toml),
                "--live",  # the figure loop in the main thread, the dispatcher in another
                "--web",  # and the web view, with the catalog's key
                "0",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "TILED_API_KEY": jit_catalog.api_key, "MPLBACKEND": "Agg"},
        )
        lines = Lines(listener.stdout)
        publisher = Publisher(f"127.0.0.1:{port_in}", serializer=zmq_serializer())
        RE.subscribe(publisher)
        context = zmq.Context()
        poison = context.socket(zmq.PUB)  # a message the dispatcher chokes on
        poison.connect(f"tcp://127.0.0.1:{port_in}")
        beamline = tiny_beamline(tmp_path / "det")
        lines.wait_for("listening to 0MQ proxy", 60)
        (web,) = re.findall(r"live web view on (http://127\.0\.0\.1:\d+/)", lines.text)
        key = {"Authorization": f"Apikey {jit_catalog.api_key}"}
        assert httpx.get(web + "api/state").status_code == 401
        assert httpx.get(web + "api/state", headers=key).json() == {"raw_uid": None}
        lines.heard(poison, "probe-subscribed")
        # a pickle that would create a file if anyone unpickled it: refused, logged
        trap = tmp_path / "unpickled-by-the-listener"
        poison.send(b" ".join([b"", b"start", pickle.dumps(_Trap(trap))]))
        poison.send(b" ".join([b"", b"no_such_document", zmq_serializer()({})]))
        lines.wait_for("0MQ dispatcher failed; reconnecting", 30)
        lines.heard(poison, "probe-reconnected")  # a new dispatcher after 1 s
        poison.close()
        context.term()
        RE(count([det1], num=1))  # not a tomography scan: ignored
        (bad,) = tomo_runs(RE, beamline, bad=True)
        (good,) = tomo_runs(RE, beamline)
        code = listener.wait(90)
        assert code == 1, lines.text  # one of the two runs failed
    finally:
        if publisher is not None:  # while the proxy runs: its context would block at exit
            publisher.close()
        for process in (listener, proxy):
            if process is not None and process.poll() is None:
                process.terminate()
                process.wait(10)
    derived = runs_container(jit_catalog.client(), "derived")
    (ok,) = derived_runs_for(derived, good)
    assert ok.metadata.get("stop"), lines.text
    assert ok.metadata["stop"]["exit_status"] == "success", ok.metadata["stop"]
    assert len(ok["reconstruction"]["reconstruction"].read()) >= 1
    (failed,) = derived_runs_for(derived, bad)
    assert failed.metadata.get("stop"), lines.text
    assert failed.metadata["stop"]["exit_status"] == "fail"
    assert "dark" in failed.metadata["stop"]["reason"]
    assert f"-> derived run {ok.metadata['start']['uid']} (success)" in lines.text
    assert "0MQ dispatcher failed; reconnecting" in lines.text
    assert "Refused a 0MQ message" in lines.text and "(a pickle)" in lines.text
    assert not trap.exists()  # the pickle was never run


class _Trap:
    """Unpickling this opens (creates) a file: the proof that a pickle was executed."""

    def __init__(self, path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_zmq_messages_round_trip_msgpack_with_arrays_and_refuse_objects():
    import msgpack

    doc = {"data": {"img": np.arange(6, dtype=np.uint16).reshape(2, 3), "x": np.float32(1.5)}}
    back = zmq_deserializer()(zmq_serializer()(doc))
    np.testing.assert_array_equal(back["data"]["img"], doc["data"]["img"])
    assert back["data"]["img"].dtype == np.uint16 and back["data"]["x"] == 1.5
    evil = msgpack.packb(
        {"a": msgpack.ExtType(42, msgpack.packb(["|O", [1], b"\0" * 8]))}, use_bin_type=True
    )
    with pytest.raises(ScanDataError, match="numbers only"):
        zmq_deserializer()(evil)
    with pytest.raises(ScanDataError, match="a pickle"):
        zmq_deserializer()(pickle.dumps({"uid": "x"}))


def listens(port: int) -> bool:
    """True if something accepts TCP connections on 127.0.0.1:port."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class Lines:
    """Collect a subprocess's output lines in a thread."""

    def __init__(self, stream) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.append(line)

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, needle: str, timeout: float) -> None:
        wait_for(lambda: needle in self.text, timeout, f"{needle!r} in\n{self.text}")

    def heard(self, socket, tag: str, timeout: float = 30) -> None:
        """Send a harmless document of run ``tag`` on ``socket`` until the listener logs it.

        0MQ subscriptions propagate asynchronously: this is how a test knows
        the listener's (re)connected dispatcher receives what is published.
        """
        doc = b" ".join([b"", b"descriptor", zmq_serializer()({"uid": tag, "run_start": tag})])
        wait_for(lambda: socket.send(doc) or f"run {tag}:" in self.text, timeout, tag, 0.2)


# ========================================================================= Kafka
class StandInBroker:
    """One topic of ``partitions`` in-memory logs; consumer groups; committed offsets.

    Like Kafka: a message's partition is a hash of its key, members of a group
    split the partitions (re-split when one joins or leaves, announced to each
    member in its next poll), and a member starts a partition at the group's
    committed offset.
    """

    def __init__(self, topic: str, partitions: int = 4, initial_members: int = 1) -> None:
        self.topic = topic
        self.initial_members = initial_members  # like group.initial.rebalance.delay.ms
        self.logs = {(topic, p): [] for p in range(partitions)}
        self.committed: dict[tuple[str, tuple[str, int]], int] = {}
        self.commit_log: list[tuple[str, tuple[str, int], int]] = []
        self.members: dict[str, list[StandInConsumer]] = collections.defaultdict(list)
        self.on_commit = None
        self.lock = threading.RLock()

    def producer(self) -> SimpleNamespace:
        def produce(*, topic, key, value, on_delivery=None):
            with self.lock:
                tp = (topic, zlib.crc32(key or b"") % len(self.logs))
                self.logs[tp].append((key, value))
            if on_delivery is not None:
                on_delivery(None, None)

        return SimpleNamespace(produce=produce, poll=lambda t=0: 0, flush=lambda t=None: 0)

    def consumer(self, group: str, max_messages: int | None = None) -> StandInConsumer:
        return StandInConsumer(self, group, max_messages)

    def rebalance(self, group: str) -> None:
        with self.lock:
            members = self.members[group]
            for i, member in enumerate(members):
                member.pending = [
                    tp for k, tp in enumerate(sorted(self.logs)) if k % len(members) == i
                ]

    def decoded(self):
        """(tp, offset, name, doc) of every message that decodes."""
        loads = kafka_deserializer()
        for tp, log in self.logs.items():
            for offset, (_, value) in enumerate(log):
                try:
                    name, doc = loads(value)
                except Exception:
                    continue
                yield tp, offset, name, doc


class StandInMessage:
    def __init__(self, tp, offset, key, value) -> None:
        self._tp, self._offset, self._key, self._value = tp, offset, key, value

    def topic(self):
        return self._tp[0]

    def partition(self):
        return self._tp[1]

    def offset(self):
        return self._offset

    def key(self):
        return self._key

    def value(self):
        return self._value

    def error(self):
        return None


class StandInConsumer:
    """The part of ``confluent_kafka.Consumer`` that KafkaSource uses."""

    def __init__(self, broker: StandInBroker, group: str, max_messages: int | None) -> None:
        self.broker, self.group, self.max_messages = broker, group, max_messages
        self.assigned: list[tuple[str, int]] = []
        self.pending: list[tuple[str, int]] | None = None
        self.position: dict[tuple[str, int], int] = {}
        self.delivered = 0
        self.exhausted = threading.Event()
        self.callbacks = (None, None)
        self.paused: set[tuple[str, int]] = set()
        self.pauses = 0

    def list_topics(self, timeout=None):
        return SimpleNamespace(topics={self.broker.topic: object()})

    def subscribe(self, topics, on_assign=None, on_revoke=None):
        self.callbacks = (on_assign, on_revoke)
        with self.broker.lock:
            self.broker.members[self.group].append(self)
            self.broker.rebalance(self.group)

    def _apply_rebalance(self) -> None:
        pending, self.pending = self.pending, None
        on_assign, on_revoke = self.callbacks
        revoked = [tp for tp in self.assigned if tp not in pending]
        if revoked and on_revoke:
            on_revoke(self, [SimpleNamespace(topic=t, partition=p) for t, p in revoked])
        self.assigned = list(pending)
        for tp in self.assigned:
            self.position[tp] = self.broker.committed.get((self.group, tp), 0)
        if on_assign:
            on_assign(self, [SimpleNamespace(topic=t, partition=p) for t, p in self.assigned])

    def assignment(self):
        return [SimpleNamespace(topic=t, partition=p) for t, p in self.assigned]

    def pause(self, partitions):
        self.paused.update((p.topic, p.partition) for p in partitions)
        self.pauses += 1

    def resume(self, partitions):
        self.paused.difference_update((p.topic, p.partition) for p in partitions)

    def poll(self, timeout=None):
        if len(self.broker.members[self.group]) < self.broker.initial_members:
            time.sleep(0.01)  # the group waits for its first members before assigning
            return None
        if self.pending is not None:
            self._apply_rebalance()
        if self.max_messages is not None and self.delivered >= self.max_messages:
            self.exhausted.set()
            time.sleep(0.01)
            return None
        with self.broker.lock:
            for tp in self.assigned:
                if tp in self.paused:
                    continue
                log = self.broker.logs[tp]
                if self.position[tp] < len(log):
                    offset = self.position[tp]
                    self.position[tp] += 1
                    self.delivered += 1
                    return StandInMessage(tp, offset, *log[offset])
        time.sleep(min(timeout or 0.0, 0.02))
        return None

    def commit(self, offsets=None, asynchronous=True):
        for tp in offsets:
            key = (tp.topic, tp.partition)
            if self.broker.on_commit is not None:
                self.broker.on_commit(self.group, key, tp.offset)
            self.broker.committed[(self.group, key)] = tp.offset
            self.broker.commit_log.append((self.group, key, tp.offset))

    def close(self):
        with self.broker.lock:
            self.broker.members[self.group].remove(self)
            if self.broker.members[self.group]:
                self.broker.rebalance(self.group)


def worker(broker, group, derived, directory, config, max_backlog=256, **consumer_kwargs):
    listener = Listener(
        derived_runs=derived, directory=directory, config=config, skip_done=True, run_timeout_s=60
    )
    source = KafkaSource(
        listener,
        bootstrap_servers="stand-in:9092",
        topics=[broker.topic],
        group_id=group,
        consumer=broker.consumer(group, **consumer_kwargs),
        poll_s=0.02,
        max_backlog=max_backlog,
    )
    stop = threading.Event()
    thread = threading.Thread(target=source.run, args=(stop,), daemon=True)
    return SimpleNamespace(listener=listener, source=source, stop=stop, thread=thread)


def publish_runs(RE, broker, beamline):
    """Runs through RunKeyedPublisher: good, count (not tomography), bad, good; plus junk."""
    from bluesky.plans import count
    from ophyd.sim import det1

    RE.subscribe(RunKeyedPublisher(broker.topic, producer=broker.producer()))
    (a,) = tomo_runs(RE, beamline)
    RE(count([det1], num=1))
    (bad,) = tomo_runs(RE, beamline, bad=True)
    (c,) = tomo_runs(RE, beamline)
    dumps = kafka_serializer()
    junk = broker.producer()
    junk.produce(topic=broker.topic, key=b"junk", value=b"\xc1 not msgpack")
    junk.produce(topic=broker.topic, key=b"junk", value=dumps(("no_such_document", {})))
    return a, bad, c


@pytest.mark.slow
def test_kafka_consumer_group_shares_runs_and_commits_after_derived_runs_are_written(
    jit_catalog, tiny_config, RE, tmp_path
):
    broker = StandInBroker("bl.bluesky.runengine.documents", partitions=4, initial_members=2)
    derived = runs_container(jit_catalog.client(), "derived_kafka")
    # frames inline: numpy arrays in the messages (msgpack-numpy)
    good_a, bad, good_c = publish_runs(RE, broker, tiny_beamline(tmp_path / "det", external=False))

    # Where every run's messages went: one run, one partition (keyed by start uid).
    placement = collections.defaultdict(set)
    stop_offset = {}
    for tp, offset, name, doc in broker.decoded():
        run = doc.get("uid") if name == "start" else doc.get("run_start")
        if name in ("start", "descriptor", "stop"):
            placement[run].add(tp)
        if name == "stop":
            stop_offset[run] = (tp, offset)
    assert all(len(tps) == 1 for tps in placement.values())

    violations = []

    def on_commit(group, tp, offset):  # runs wholly below a commit must be in the catalog
        for run in (good_a, bad, good_c):
            run_tp, run_stop = stop_offset[run]
            if run_tp == tp and run_stop < offset:
                found = derived_runs_for(derived, run)
                if not found or not found[-1].metadata.get("stop"):
                    violations.append((run, tp, offset))

    broker.on_commit = on_commit
    directory = jit_catalog.base / "kafka"
    workers = [  # a small backlog limit: fetching pauses while a worker is behind
        worker(broker, "jit", derived, directory, tiny_config, max_backlog=4) for _ in range(2)
    ]
    for w in workers:
        w.thread.start()
    expected = {good_a, bad, good_c}
    ends = {tp: len(log) for tp, log in broker.logs.items() if log}

    def committed():
        return {tp: off for (g, tp), off in broker.committed.items() if g == "jit"}

    def finished():
        done = {s.raw_uid for w in workers for s in w.listener.summaries if s.derived_uid}
        return done >= expected and committed() == ends

    wait_for(finished, 120, "three runs processed and every offset committed")
    for w in workers:
        w.stop.set()
        w.thread.join(30)
        w.listener.close()

    by_worker = [{s.raw_uid for s in w.listener.summaries if s.derived_uid} for w in workers]
    assert by_worker[0] | by_worker[1] == expected
    assert not by_worker[0] & by_worker[1]  # each run processed by one member only
    assert violations == []
    assert sum(w.source.consumer.pauses for w in workers) > 0
    assert all(
        s.exit_status != "fail" or "dropped" not in s.reason
        for w in workers
        for s in w.listener.summaries
    )
    assert committed() == ends  # everything committed, the junk messages too
    (a,) = derived_runs_for(derived, good_a)
    assert a.metadata["stop"]["exit_status"] == "success"
    (b,) = derived_runs_for(derived, bad)
    assert b.metadata["stop"]["exit_status"] == "fail"


@pytest.mark.slow
def test_kafka_run_left_unfinished_by_a_dead_worker_is_redone(
    jit_catalog, tiny_config, RE, tmp_path
):
    broker = StandInBroker("t", partitions=1)
    RE.subscribe(RunKeyedPublisher("t", producer=broker.producer()))
    (uid,) = tomo_runs(RE, tiny_beamline(tmp_path / "det"))
    derived = runs_container(jit_catalog.client(), "derived_redo")
    directory = jit_catalog.base / "kafka_redo"
    n = len(broker.logs[("t", 0)])

    first = worker(broker, "g", derived, directory, tiny_config, max_messages=n // 2)
    first.thread.start()
    assert first.source.consumer.exhausted.wait(60)
    first.stop.set()  # the worker "dies" mid-run
    first.thread.join(30)
    first.listener.close()
    assert broker.committed[("g", ("t", 0))] == 0  # the run's start: nothing skipped
    (aborted,) = derived_runs_for(derived, uid)
    assert aborted.metadata["stop"]["exit_status"] != "success"  # half a run: not a result

    second = worker(broker, "g", derived, directory, tiny_config)
    second.thread.start()
    wait_for(
        lambda: second.listener.summaries and broker.committed[("g", ("t", 0))] == n,
        60,
        "the run redone and committed",
    )
    second.stop.set()
    second.thread.join(30)
    second.listener.close()
    runs = derived_runs_for(derived, uid)
    assert [r.metadata["stop"]["exit_status"] == "success" for r in runs] == [False, True]
    assert broker.committed[("g", ("t", 0))] == n


def test_offset_tracker_commits_below_the_oldest_unfinished_run():
    tracker = OffsetTracker()
    tp = ("t", 0)
    tracker.seen(tp, 0, start_of="A")
    tracker.seen(tp, 1)
    tracker.seen(tp, 2, start_of="B")  # B interleaves with A in the partition
    tracker.seen(tp, 3)
    assert tracker.pending() == {tp: 0}
    tracker.settled("B")
    assert tracker.pending() == {tp: 0}  # A still open
    tracker.settled("A")
    assert tracker.pending() == {tp: 4}
    tracker.committed({tp: 4})
    assert tracker.pending() == {}


def test_listener_drops_documents_of_runs_it_never_saw_start_and_closes_silent_runs(
    tiny_config, tmp_path, caplog
):
    emitted = []

    def collect(name, doc):
        emitted.append((name, doc))

    listener = Listener(emit=collect, directory=tmp_path, config=tiny_config, run_timeout_s=0.1)
    listener("descriptor", {"uid": "d", "run_start": "never-started", "data_keys": {}})
    listener("event", {"descriptor": "d", "seq_num": 1, "data": {}})
    assert sum("never reached this listener" in r.message for r in caplog.records) == 1
    start = {"uid": "r1", "time": time.time(), "tomo": {"beam": "parallel"}}
    listener("start", start)
    assert listener.open_runs == ["r1"]
    time.sleep(0.2)
    listener.housekeeping()  # silent too long: closed as aborted
    assert listener.open_runs == []
    listener.jit.flush(30)
    listener("event", {"descriptor": "x", "seq_num": 1})  # late documents: dropped
    listener.close()
    (summary,) = listener.summaries
    assert summary.raw_uid == "r1"
    stops = [d for n, d in emitted if n == "stop"]
    assert stops and stops[-1]["exit_status"] in ("fail", "abort")


def test_kafka_secrets_come_from_the_environment_and_missing_ones_exit_2(tmp_path, capsys):
    from bluesky_jit.apps.cli import main
    from bluesky_jit.apps.listen import kafka_consumer_config

    file_config = {"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512"}
    env = {"BLUESKY_JIT_KAFKA_SASL_USERNAME": "jit", "BLUESKY_JIT_KAFKA_SASL_PASSWORD": "s3cret"}
    config = kafka_consumer_config(file_config, env)
    assert config["sasl.username"] == "jit" and config["sasl.password"] == "s3cret"
    assert config["security.protocol"] == "SASL_SSL"
    with pytest.raises(ConfigError, match="BLUESKY_JIT_KAFKA_SASL_PASSWORD"):
        kafka_consumer_config(file_config, {"BLUESKY_JIT_KAFKA_SASL_USERNAME": "jit"})
    assert kafka_consumer_config({}, {}) == {}  # no SASL: nothing asked for
    settings = tmp_path / "kafka.toml"
    settings.write_text(
        '[listen]\nconsumer_config = {"security.protocol" = "SASL_SSL", '
        '"sasl.mechanism" = "PLAIN", "sasl.username" = "jit"}\n'
    )
    code = main(
        ["listen", "--kafka", "127.0.0.1:9", "--topic", "t", "--config", str(settings)]
    )  # the check comes before any broker is asked
    assert code == 2
    assert "sasl.password" in capsys.readouterr().err
