"""CURVE on a 0MQ bus: real sockets on 127.0.0.1, keys from zmq.auth certificate files."""

from __future__ import annotations

import threading

import pytest
import zmq
import zmq.auth
from zmq.utils.monitor import recv_monitor_message

from bluesky_jit.apps.listen import Listener, listen_zmq, zmq_curve, zmq_serializer
from bluesky_jit.errors import ConfigError

from .helpers import wait_for
from .test_callbacks import CONFIG, Collector
from .test_memory_budget import disk_scan


def start_listener(tmp_path, address, name, secret, server):
    derived = Collector()
    listener = Listener(emit=derived, directory=tmp_path / name, config=CONFIG, max_runs=1)
    stop = threading.Event()
    thread = threading.Thread(
        target=listen_zmq,
        args=(address, listener),
        kwargs={"stop": stop, "curve_secret_key": secret, "curve_server_key": server},
        daemon=True,
    )
    thread.start()
    return derived, listener, stop, thread


def test_a_curve_listener_receives_the_run_and_a_wrong_key_nothing(tmp_path):
    keys = tmp_path / "keys"
    keys.mkdir()
    server_public, server_secret = zmq.auth.create_certificates(keys, "proxy")
    _, client_secret = zmq.auth.create_certificates(keys, "listener")
    stranger_public, stranger_secret = zmq.auth.create_certificates(keys, "stranger")
    context = zmq.Context()
    publisher = context.socket(zmq.PUB)
    public, secret = zmq.auth.load_certificate(server_secret)
    publisher.curve_secretkey, publisher.curve_publickey, publisher.curve_server = secret, public, 1
    port = publisher.bind_to_random_port("tcp://127.0.0.1")
    address = f"127.0.0.1:{port}"
    monitor = publisher.get_monitor_socket()
    good = start_listener(tmp_path, address, "good", client_secret, server_public)
    wrong = start_listener(tmp_path, address, "wrong", stranger_secret, stranger_public)
    try:
        events = set()

        def handshakes() -> bool:
            while monitor.poll(100):
                events.add(recv_monitor_message(monitor)["event"])
            return zmq.EVENT_HANDSHAKE_SUCCEEDED in events and any(
                e in events
                for e in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_AUTH)
            )

        wait_for(handshakes, 30, "one CURVE handshake that succeeded and one that failed")
        tomo = {"num_angles": 16, "angular_range": [0, 180], "detector_shape": [8, 48]}
        pack = zmq_serializer()
        for name, doc in disk_scan(tomo, (8, 48)):
            publisher.send(b" ".join([b"", name.encode(), pack(doc)]))
        derived, listener, _, thread = good
        wait_for(lambda: listener.stopped.is_set(), 120, "the derived run of the listener")
        thread.join(10)
        assert [d["exit_status"] for d in derived.named("stop")] == ["success"]
        assert wrong[0].docs == [] and not wrong[1].summaries
    finally:
        for _, listener, stop, thread in (good, wrong):
            stop.set()
            thread.join(10)
            listener.close()
        publisher.disable_monitor()
        context.destroy(linger=0)


def test_curve_keys_must_be_certificate_files(tmp_path):
    public, secret = zmq.auth.create_certificates(tmp_path, "listener")
    assert zmq_curve(None, None) is None
    with pytest.raises(ConfigError, match="both certificate files"):
        zmq_curve(secret, None)
    with pytest.raises(ConfigError, match="holds no secret key"):
        zmq_curve(public, public)
    with pytest.raises(ConfigError, match="Cannot read the CURVE"):
        zmq_curve(secret, tmp_path / "missing.key")
