"""Memory benchmark: a 2048 x 2448 detector at 1800 projections per rotation.

    python benchmarks/memory.py --json benchmarks/results/memory.json
    python benchmarks/memory.py --rotations 1.1 --refresh-every 180   # the defaults

Whole frames of two such rotations would take 72 GB (float32). The scan's
documents (darks, flats, projections with inline uint16 frames of a centred
disk, one array shared by every event, so making them costs nothing) go
straight into a :class:`~bluesky_jit.callbacks.JitCallback` with the default
settings (the memory budget a quarter of the machine's memory, training on),
except ``refresh_every``: fewer refreshes keep the run to a few minutes on a
2-core machine. Documents are fed as fast as the worker takes them (at most
``--backlog`` waiting), so the peak is that of the pipeline, not of a queue.

Reported (``--json``): the peak resident memory of the process (``ru_maxrss``)
and of its largest ended child process (``children_peak_rss_bytes``: the
trainer is a thread here; with ``trainer_process`` it would count there),
the resident memory before the scan, the memory plan of the run (the derived
run's ``memory`` metadata: rows kept, vertical binning, what whole frames
would need) and the run's summary, with the machine's description.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from event_model import compose_run

sys.path.insert(0, str(Path(__file__).resolve().parent))
from learning import machine  # noqa: E402  (the sibling benchmark's helper)

from bluesky_jit.callbacks import JitCallback  # noqa: E402
from bluesky_jit.config import JitConfig  # noqa: E402
from bluesky_jit.memory import budget_bytes  # noqa: E402

SHAPE = (2048, 2448)
ANGLES = 1800


def rss() -> int:
    """Resident memory of this process now (bytes)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def peak(who: int) -> int:
    """Peak resident memory (bytes) of this process or of its ended children."""
    return resource.getrusage(who).ru_maxrss * 1024


def documents(rotations: float, darks: int = 10):
    """The scan's documents, one at a time: darks, flats, then the projections."""
    rows, cols = SHAPE
    s = np.arange(cols) - (cols - 1) / 2
    path = 2 * np.sqrt(np.clip((cols / 3) ** 2 - s**2, 0, None))  # a centred disk, pixels
    projection = np.ascontiguousarray(
        np.broadcast_to(100 + 3000 * np.exp(-0.001 * path), SHAPE), dtype=np.uint16
    )
    tomo = {"num_angles": ANGLES, "angular_range": [0, 180], "detector_shape": list(SHAPE)}
    bundle = compose_run(metadata={"tomo": tomo, "plan_name": "tomo_scan"})
    yield "start", bundle.start_doc
    image = {"dtype": "array", "shape": list(SHAPE), "source": "sim", "dtype_numpy": "<u2"}
    angle = {"dtype": "number", "shape": [], "source": "sim"}
    fields = {"dark": np.full(SHAPE, 100, np.uint16), "flat": np.full(SHAPE, 3100, np.uint16)}
    for stream in ("dark", "flat", "primary"):
        keys = {"det": image, **({"rot_stage": angle} if stream == "primary" else {})}
        desc = bundle.compose_descriptor(name=stream, data_keys=keys)
        yield "descriptor", desc.descriptor_doc
        count = darks if stream != "primary" else int(rotations * ANGLES)
        for k in range(count):
            data: dict[str, Any] = {"det": fields.get(stream, projection)}
            if stream == "primary":
                data["rot_stage"] = k * 180 / ANGLES
            yield "event", desc.compose_event(data=data, timestamps=dict.fromkeys(data, 0))
    yield "stop", bundle.compose_stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rotations", type=float, default=1.1)
    parser.add_argument("--refresh-every", type=int, default=180)
    parser.add_argument("--backlog", type=int, default=20, help="documents waiting at most")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    config = JitConfig(refresh_every=args.refresh_every)
    starts: list[dict] = []
    stops: list[dict] = []

    def emit(name: str, doc: dict) -> None:
        {"start": starts, "stop": stops}.get(name, []).append(doc)

    before = rss()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as directory:
        jit = JitCallback(config=config, emit=emit, directory=directory, run_engine_here=False)
        for name, doc in documents(args.rotations):
            while jit.backlog > args.backlog:
                time.sleep(0.005)
            jit(name, doc)
        jit.flush()
        jit.close()
    summary = jit.summaries[0]
    result = {
        "detector_shape": list(SHAPE),
        "projections_per_rotation": ANGLES,
        "rotations": args.rotations,
        "refresh_every": args.refresh_every,
        "memory_budget_bytes": budget_bytes(config.runtime.memory_budget_gb),
        "rss_before_bytes": before,
        "peak_rss_bytes": peak(resource.RUSAGE_SELF),
        "children_peak_rss_bytes": peak(resource.RUSAGE_CHILDREN) or None,
        "memory_plan": starts[0].get("memory") if starts else None,
        "wall_s": round(time.monotonic() - t0, 1),
        "summary": summary.to_dict(),
        "machine": machine(),
    }
    result["within_budget"] = result["peak_rss_bytes"] <= result["memory_budget_bytes"]
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 0 if result["within_budget"] and summary.exit_status == "success" else 1


if __name__ == "__main__":
    raise SystemExit(main())
