"""Mutated document streams through JitCallback.

One small scan is recorded once per session with a real RunEngine and the
simulated devices; hypothesis then reorders, duplicates, drops, retypes and
truncates its documents and feeds them to the callback directly. Whatever
comes: no exception escapes, every derived start gets exactly one stop, a
non-success stop says why, and a stop says ``success`` only if every document
was processed (or the documents that were not could not be told to any run and
are counted on the callback).
"""

from __future__ import annotations

import copy

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from bluesky_jit.callbacks import REQUIRED_FIELDS, JitCallback  # noqa: E402

from .helpers import run_engine  # noqa: E402
from .test_callbacks import CONFIG, Collector, recorded_inline_scan  # noqa: E402

FIELDS = {  # the fields a router and the ingest need, by document (event-model's names)
    "start": ["uid", "time"],
    "descriptor": ["uid", "run_start", "data_keys", "name"],
    "event": ["uid", "descriptor", "seq_num", "data", "timestamps", "time", "data.det"],
    "stop": ["uid", "run_start", "exit_status"],
}
WRONG = [7, "seven", ["x"], {"x": 1}, None, 1.5]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """The documents of a 2-rotation, 16-angle scan with inline frames (ophyd v1)."""
    with run_engine() as RE:
        return list(recorded_inline_scan(RE, tmp_path_factory.mktemp("recorded")).docs)


def _get(doc: dict, field: str) -> object:
    return doc["data"].get("det") if field == "data.det" else doc.get(field)


def _same_kind(old: object, new: object) -> bool:
    number = (int, float)
    return isinstance(new, type(old)) or (isinstance(old, number) and isinstance(new, number))


def _retype(doc: dict, field: str, value: object) -> dict:
    doc = copy.deepcopy(doc)
    if field == "data.det":
        doc["data"]["det"] = value
    else:
        doc[field] = value
    return doc


def mutations():
    """Up to three edits of a stream (positions taken modulo its length)."""
    index = st.integers(0, 999)
    edit = st.one_of(
        st.tuples(st.just("swap"), index, index),
        st.tuples(st.just("duplicate"), index, index),
        st.tuples(st.just("drop"), index),
        st.tuples(st.just("retype"), index, st.integers(0, 9), st.sampled_from(WRONG)),
        st.tuples(st.just("truncate"), index),
    )
    return st.lists(edit, min_size=1, max_size=3)


def mutate(docs: list, edits: list) -> tuple[list, dict[int, str]]:
    """The mutated stream, and the field changed of each document changed, by its id."""
    docs, changed = list(docs), {}
    for kind, *args in edits:
        if not docs:
            break
        if kind != "retype":
            args = [a % len(docs) for a in args]
        else:
            args[0] %= len(docs)
        if kind == "swap":
            i, j = args
            docs[i], docs[j] = docs[j], docs[i]
        elif kind == "duplicate":
            i, j = args
            docs.insert(j, docs[i])
        elif kind == "drop":
            del docs[args[0]]
        elif kind == "truncate":
            docs = docs[: args[0]]
        else:
            i, which, value = args
            name, doc = docs[i]
            if id(doc) in changed:  # once per document: the wrong type stays wrong
                continue
            fields = FIELDS[name]
            field = fields[which % len(fields)]
            if _same_kind(_get(doc, field), value):
                value = None  # no field here may be None
            docs[i] = (name, _retype(doc, field, value))
            changed[id(docs[i][1])] = field
    return docs, changed


def every_document_processable(docs: list, changed: dict[int, str]) -> bool:
    """Whether the callback can process every document (duplicates by uid aside: a copy
    whose routing fields are intact is recognised as one, whatever else it holds)."""
    seen, descriptors, started, stopped = set(), set(), False, False
    for name, doc in docs:
        if changed.get(id(doc)) in REQUIRED_FIELDS[name]:
            return False
        key = (name, doc["uid"])
        if key in seen:
            continue
        seen.add(key)
        if id(doc) in changed or stopped:
            return False
        if name == "start":
            started = True
        elif not started:
            return False
        if name == "descriptor":
            descriptors.add(doc["uid"])
        elif name == "event" and doc["descriptor"] not in descriptors:
            return False
        stopped = name == "stop"
    return stopped


@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,  # the same examples on every run: deterministic in CI
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(edits=mutations())
def test_mutated_document_streams(recorded, tmp_path, edits):
    docs, changed = mutate(recorded, edits)
    derived = Collector()  # validates every derived document against event-model's schema
    jit = JitCallback(
        config=CONFIG.replace(refresh_every=4, train=False),
        emit=derived,
        directory=tmp_path,
        run_engine_here=False,
    )
    try:
        for name, doc in docs:
            jit(name, doc)  # no exception escapes
        assert jit.flush(timeout=60)
    finally:
        jit.close(timeout=60)

    starts = derived.named("start")
    stops = derived.named("stop")
    assert sorted(s["run_start"] for s in stops) == sorted(s["uid"] for s in starts)
    for stop in stops:
        if stop["exit_status"] != "success":
            assert stop.get("reason"), stop
    clean = every_document_processable(docs, changed)
    if clean:
        assert not jit.unroutable, jit.unroutable
    elif stops and stops[0]["exit_status"] == "success":
        # documents that could not be told to the run are counted on the callback
        assert sum(jit.unroutable.values()) > 0, (edits, jit.unroutable)
