"""Denoising quality on three dynamic phantoms, through the plugin itself.

    python benchmarks/dynamic_quality.py --json benchmarks/results/dynamic_quality.json
    python benchmarks/dynamic_quality.py --phantom porous --size 128 --photons 300 \\
        --setting half --json out.json
    python benchmarks/dynamic_quality.py --table   # the README table, from the JSON

Each case streams a phantom (``bubbles``: `BubbleColumn`, ``sintering``:
`SinteringGrains`, ``porous``: `PorousFlow`) as a real scan, the way
``benchmarks/live_learning.py`` does: a paced simulated detector at ``--fps``,
a RunEngine running ``tomo_continuous`` over 360-degree rotations of
``--rotation-s`` seconds, and the plugin reconstructing, training and
denoising: by default a ``JitProcess``, the README's wiring (the work in a
child process, so it shares no interpreter lock with the RunEngine and the
detector); ``--wiring callback`` runs a ``JitCallback`` in the RunEngine's
process instead. After ``--seconds`` of stream the newest slice is compared with
the phantom's truth over its own window (PSNR and SSIM inside 85 % of the
reconstruction circle) for FBP, for TV and BM3D whose parameter is chosen
against that truth (oracles: the best these denoisers can do with one
parameter), and for the Noise2Inverse denoiser, with the published alpha.

Settings (``--setting``, several allowed), what temporal resolution needs:

- ``full``: the product's default; the window is the plan's rotation (360 degrees);
- ``half``: the same acquisition planned as 180-degree rotations, so the
  window is half as long (a parallel-beam 360-degree rotation holds two);
- ``half-T3``: ``half`` with the T3 network (the slice and two earlier windows in);
- ``half-sup``: ``half`` with ``target="supervised"`` (TomoGAN-style: the window's FBP
  in, SIRT over the last two windows as target); its alpha is against that target;
- ``dynamic``: ``half`` with ``JitConfig.for_dynamic(dose)``, what the README
  recommends: pairs from four rows either side, and at ``LOW_DOSE_PHOTONS`` or fewer
  photons per pixel ``dose="low"`` (40x40 patches in batches of 16);
- ``dynamic-low``: ``half`` with ``JitConfig.for_dynamic("low")`` at every dose.

``--set max_train_steps_per_s=N`` holds the trainer to N steps/s, to compare
settings at equal compute or to stand in for a slower machine.

Writes JSON with the machine; ``--table`` prints the README table from it.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bluesky_jit.baselines import bm3d_available, bm3d_denoise, tune_bm3d, tune_tv, tv_denoise
from bluesky_jit.config import JitConfig
from bluesky_jit.evaluation import disc_mask, psnr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from learning import machine, ssim  # noqa: E402  (the sibling benchmark's helpers)

PHANTOMS = ("bubbles", "sintering", "porous")
SETTINGS = {
    "full": {"range": 360.0, "variant": None},
    "half": {"range": 180.0, "variant": None},
    "half-T3": {"range": 180.0, "variant": "T3"},
    "half-sup": {"range": 180.0, "variant": None, "target": "supervised"},
    "dynamic": {"range": 180.0, "variant": None, "dynamic": "by photons"},
    "dynamic-low": {"range": 180.0, "variant": None, "dynamic": "low"},
}
TARGETS_DB = {1000.0: 1.5, 300.0: 2.0}  # denoised >= oracle TV + this, by photons
LOW_DOSE_PHOTONS = 300.0  # the setting "dynamic" uses for_dynamic("low") at this or fewer


def make_phantom(name: str, size: int, rows: int, seed: int) -> Any:
    """The phantom by benchmark name, ``(rows, size)`` detector."""
    from simulated_devices.phantoms import BubbleColumn, PorousFlow, SinteringGrains

    shape = (rows, size)
    if name == "bubbles":
        return BubbleColumn(detector_shape=shape, seed=seed, n_bubbles=max(rows // 2, 4) * 2)
    if name == "sintering":
        return SinteringGrains(detector_shape=shape, seed=seed)
    if name == "porous":
        return PorousFlow(detector_shape=shape, seed=seed)
    raise SystemExit(f"--phantom must be one of {PHANTOMS}; got {name!r}.")


def stream(args: argparse.Namespace, phantom: Any, photons: float, setting: str) -> dict:
    """One scan through RunEngine + JitCallback; the test moment's slices and windows."""
    from bluesky import RunEngine

    from bluesky_jit.callbacks import JitCallback
    from bluesky_jit.steering import QualitySignals
    from bluesky_jit.worker_process import JitProcess
    from simulated_devices import hw
    from simulated_devices.plans import tomo_continuous
    from simulated_devices.sources import PhantomSource

    class ClockedSource(PhantomSource):
        """Records the virtual time of every projection (the truth's clock)."""

        times: list[float] = []

        def frame(self, **kw: Any) -> np.ndarray:
            if kw["shutter_open"] and kw["sample_in"]:
                self.times.append(float(kw["t"]))
            return super().frame(**kw)

    spec = SETTINGS[setting]
    given = {"slice_row": args.row, **{k: v for k, v in args.config.items()}}
    if "target" in spec:
        given["target"] = spec["target"]
    variant = spec["variant"]
    if variant:
        config = JitConfig.for_variant(variant, **given)
    elif spec.get("dynamic"):
        dose = spec["dynamic"]
        if dose == "by photons":
            dose = "low" if photons <= LOW_DOSE_PHOTONS else "normal"
        config = JitConfig.for_dynamic(dose, **given)
    else:
        config = JitConfig(**given)
    quality = QualitySignals(name="jit_quality")
    plugin = JitProcess if args.wiring == "process" else JitCallback
    jit = plugin(config=config, directory=args.workdir / "derived", quality=quality)
    RE = RunEngine({})
    RE.subscribe(jit)
    source = ClockedSource(phantom, photons=photons)
    source.times = []
    beamline = hw(
        args.workdir / "raw", source=source, frame_rate=args.fps, paced=True, seed=args.seed
    )
    per_rotation = round(args.rotation_s * args.fps * spec["range"] / 360.0)
    rotations = int(np.ceil((args.seconds + 2) * args.fps / per_rotation))
    test_at = int(args.seconds * args.fps)
    # The newest slice is scored at the test moment and at the window ends before it.
    moments = {test_at - j * per_rotation for j in range(args.moments)}
    captured: list[dict[str, Any]] = []

    def capture() -> None:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            running = jit.progress()
            s = running[0] if running else None
            if s is not None and s.last_denoised is not None:
                # the denoised slice of the newest window (a stack's comes a window late)
                newest = np.array_equal(s.last_denoised_indices, s.last_indices)
                done = newest or variant is not None
                if done:
                    captured.append(
                        dict(
                            fbp=s.last_slice,
                            indices=s.last_indices,
                            denoised=s.last_denoised,
                            denoised_indices=s.last_denoised_indices,
                            alpha=quality.alpha.get(),
                            steps=s.train_steps,
                        )
                    )
                    return
            time.sleep(0.01)

    def watch(name: str, doc: dict) -> None:
        if name == "event" and "rot_stage" in doc["data"] and doc["seq_num"] - 1 in moments:
            threading.Thread(target=capture, daemon=True).start()

    RE.subscribe(watch)
    t0 = time.monotonic()
    RE(
        tomo_continuous(
            *beamline.plan_devices,
            num_angles=per_rotation,
            rotations=rotations,
            angular_range=(0.0, spec["range"]),
            sample=f"{type(phantom).__name__} (simulated)",
        )
    )
    scan_s = time.monotonic() - t0
    jit.flush(timeout=600)
    jit.close()
    summary = jit.summaries[0]
    unique = {int(m["indices"][-1]): m for m in captured}  # two threads may see one window
    marks: dict[str, Any] = dict(
        moments=[unique[k] for k in sorted(unique)],
        times=np.asarray(source.times),
        window_s=per_rotation / args.fps,
        scan_seconds=scan_s,
        projections_per_s=summary.projections_per_s,
        train_steps_per_s=summary.train_steps_per_s,
        exit_status=summary.exit_status,
    )
    return marks


def evaluate(args: argparse.Namespace, phantom: Any, times: np.ndarray, m: dict) -> dict:
    """PSNR and SSIM of FBP, oracle TV, oracle BM3D and the denoiser against the truth."""
    fbp = m["fbp"]
    reference = window_truth(args, phantom, times, m["indices"])
    mask = disc_mask(reference.shape[0], 0.85)

    def scores(image: np.ndarray, ref: np.ndarray = reference) -> dict[str, float]:
        return {"psnr": psnr(image, ref, mask), "ssim": ssim(image, ref, mask)}

    out: dict[str, Any] = {"window_end": int(m["indices"][-1]), "fbp": scores(fbp)}
    tv = tune_tv([fbp], [reference], mask=mask)
    out["tv_oracle"] = scores(tv_denoise(fbp, tv.value)) | {"weight": tv.value}
    if bm3d_available() and not args.no_bm3d:
        sigma = float(np.std((fbp - reference)[mask]))
        bm = tune_bm3d([fbp], [reference], sigma=sigma, mask=mask, factors=(0.5, 1.0, 2.0))
        out["bm3d_oracle"] = scores(bm3d_denoise(fbp, bm.value)) | {"sigma": bm.value}
    same = m["denoised_indices"] is m["indices"]
    ref = reference if same else window_truth(args, phantom, times, m["denoised_indices"])
    out["denoised"] = scores(m["denoised"], ref) | {"alpha": m["alpha"]}
    if not same:  # a T stack denoises an earlier window: TV on that window's FBP is unknown
        lag = int(m["indices"][-1]) - int(m["denoised_indices"][-1])
        out["denoised"]["note"] = f"window ends {lag} projections earlier"
    return out


def window_truth(args: argparse.Namespace, phantom: Any, times: np.ndarray, indices: Any):
    """The phantom's truth averaged over the times of a window's projections."""
    t = times[np.asarray(indices)]
    return phantom.truth_window(float(t[0]), float(t[-1]), args.row, num=args.truth_samples)


def recency(args: argparse.Namespace, phantom: Any, times: np.ndarray, moments: list) -> dict:
    """Weighting recent projections: ``w`` x the newest window + ``(1 - w)`` x the one before.

    With half-turn windows two consecutive windows make a full parallel-beam
    turn, so every blend is a complete reconstruction whose older half counts
    ``1 - w``. Scored against the truth of the newest window (what the user wants
    to see now): FBP and oracle TV on the blended FBP, and the blended denoised
    slices (w = 1 is the newest window alone, w = 0.5 the full turn).
    """
    old, new = moments[-2], moments[-1]
    reference = window_truth(args, phantom, times, new["indices"])
    mask = disc_mask(reference.shape[0], 0.85)
    out = {}
    for w in (1.0, 0.75, 0.5):
        fbp = w * new["fbp"] + (1 - w) * old["fbp"]
        denoised = w * new["denoised"] + (1 - w) * old["denoised"]
        tv = tune_tv([fbp], [reference], mask=mask)
        out[f"{w:g}"] = {
            "fbp": psnr(fbp, reference, mask),
            "tv_oracle": psnr(tv_denoise(fbp, tv.value), reference, mask),
            "denoised": psnr(denoised, reference, mask),
        }
    return out


def run_case(args: argparse.Namespace, name: str, size: int, photons: float, setting: str) -> dict:
    phantom = make_phantom(name, size, args.rows, args.seed)
    marks = stream(args, phantom, photons, setting)
    case: dict[str, Any] = {
        "phantom": name,
        "size": size,
        "photons": photons,
        "setting": setting,
        "window_s": marks["window_s"],
        "scan_seconds": marks["scan_seconds"],
        "projections_per_s": marks["projections_per_s"],
        "train_steps_per_s": marks["train_steps_per_s"],
        "exit_status": marks["exit_status"],
    }
    if not marks["moments"]:
        return case | {"error": "no denoised slice at the test moments (training too slow?)"}
    scored = [evaluate(args, phantom, marks["times"], m) for m in marks["moments"]]
    case |= {k: v for k, v in scored[-1].items() if k != "window_end"} | {"moments": scored}
    if len(marks["moments"]) >= 2 and SETTINGS[setting]["variant"] is None:
        case["recency"] = recency(args, phantom, marks["times"], marks["moments"])
    margins = [s["denoised"]["psnr"] - s["tv_oracle"]["psnr"] for s in scored]
    need = TARGETS_DB.get(photons, 1.5)
    case["targets"] = {  # at the test moment; the earlier windows show the learning
        f"psnr >= tv_oracle + {need} dB": bool(margins[-1] >= need),
        "margin_db": margins[-1],
        "margin_db_by_window": margins,
    }
    if "target" not in SETTINGS[setting]:  # alpha against a SIRT target is another measure
        case["targets"]["alpha <= 0.6"] = bool(case["denoised"]["alpha"] <= 0.6)
    return case


def runs(path: Path) -> list[dict]:
    """A results JSON as runs (machine, settings, cases): its own, then its exploration's."""
    data = json.loads(path.read_text())
    keys = ("machine", "settings", "cases")
    return [{k: data[k] for k in keys}] + [
        {k: r[k] for k in keys} for r in data.get("exploration", [])
    ]


def table(path: Path) -> str:
    """The README tables (markdown) from a results JSON: the cases, then the exploration."""
    data = json.loads(path.read_text())
    text = label(data, "Cases") + rows(data["cases"])
    for run in data.get("exploration", []):
        text += "\n" + label(run, "Exploration") + rows(run["cases"])
    return text + "\nPSNR (dB) / SSIM against the truth over each slice's window.\n"


def label(run: dict, what: str) -> str:
    """A line naming a run's JitConfig changes and the machine's load."""
    given = run["settings"].get("set", "[]")
    config = "default JitConfig" if given == "[]" else f"JitConfig {given}"
    load = run["machine"].get("load_average") or [None]
    seen = "load average not recorded" if load[0] is None else f"load average {load[0]:.1f}"
    return f"{what}, {config} ({seen}):\n\n"


def rows(cases: list[dict]) -> str:
    """One markdown table of cases; the earlier windows' margins where they were scored."""
    earlier = any("margin_db_by_window" in c.get("targets", {}) for c in cases)
    lines = [
        "| phantom | px | photons | window | FBP | TV oracle | BM3D oracle | denoised "
        "| denoised - TV | alpha | steps/s |" + (" earlier windows |" if earlier else ""),
        "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if earlier else ""),
    ]

    def cell(v: dict | None) -> str:
        return "–" if v is None else f"{v['psnr']:.1f} / {v['ssim']:.2f}"

    for c in cases:
        if "error" in c:
            continue
        before = c["targets"].get("margin_db_by_window", [])[:-1]
        lines.append(
            f"| {c['phantom']} | {c['size']} | {c['photons']:g} | {c['setting']} "
            f"({c['window_s']:.1f} s) | {cell(c['fbp'])} | {cell(c['tv_oracle'])} | "
            f"{cell(c.get('bm3d_oracle'))} | {cell(c['denoised'])} | "
            f"{c['targets']['margin_db']:+.1f} dB | {c['denoised']['alpha']:.2f}"
            f"{' (vs SIRT)' if 'target' in SETTINGS.get(c['setting'], {}) else ''} | "
            f"{c['train_steps_per_s']:.0f} |"
            + (f" {', '.join(f'{m:+.1f}' for m in before)} |" if earlier else "")
        )
    return "\n".join(lines) + "\n" + recency_rows(cases)


def recency_rows(cases: list[dict]) -> str:
    """The recency blends (PSNR against the newest window's truth), where scored."""
    blended = [c for c in cases if "recency" in c]
    if not blended:
        return ""
    lines = [
        "\nWeighting recent projections, w x newest half turn + (1 - w) x the one before, "
        "PSNR (dB) against the newest window's truth, FBP / TV oracle / denoised:\n",
        "| phantom | px | photons | w = 1 (newest window) | w = 0.75 | w = 0.5 (full turn) |",
        "|---|---|---|---|---|---|",
    ]
    for c in blended:
        cells = " | ".join(
            "{fbp:.1f} / {tv_oracle:.1f} / {denoised:.1f}".format(**c["recency"][w])
            for w in ("1", "0.75", "0.5")
        )
        lines.append(f"| {c['phantom']} | {c['size']} | {c['photons']:g} | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--table", action="store_true", help="print the table from --json")
    parser.add_argument("--phantom", action="append", choices=PHANTOMS, default=None)
    parser.add_argument("--size", action="append", type=int, default=None)
    parser.add_argument("--photons", action="append", type=float, default=None)
    parser.add_argument("--setting", action="append", choices=list(SETTINGS), default=None)
    parser.add_argument("--set", action="append", default=[], help="JitConfig key=value")
    parser.add_argument("--seconds", type=float, default=60.0, help="stream before the test")
    parser.add_argument("--rotation-s", type=float, default=15.0, help="one 360-degree turn")
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--row", type=int, default=12, help="slice row (above the bubbles' bed)")
    parser.add_argument("--truth-samples", type=int, default=16)
    parser.add_argument(
        "--moments",
        type=int,
        default=3,
        help="score the window ending at the test moment (the table) "
        "and this many minus one windows before it (the learning over time)",
    )
    parser.add_argument("--no-bm3d", action="store_true")
    parser.add_argument(
        "--exploration", type=Path, action="append", default=[], help="earlier JSON to include"
    )
    parser.add_argument("--combine", type=Path, default=None, help="a JSON's cases as main")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--wiring",
        choices=("process", "callback"),
        default="process",
        help="process: JitProcess (the README's wiring); callback: JitCallback in process",
    )
    parser.add_argument("--workdir", type=Path, default=Path("bluesky_jit_data/dynamic_quality"))
    args = parser.parse_args(argv)
    path = args.json or Path(__file__).parent / "results" / "dynamic_quality.json"
    if args.table:
        print(table(path))
        return 0
    if args.combine is not None:  # no scan: one run's cases, every other run as exploration
        main_run, *others = runs(args.combine)
        unique = {json.dumps(r["cases"]): r for p in args.exploration for r in runs(p)}
        known = [main_run, *others]
        main_run["exploration"] = others + [r for r in unique.values() if r not in known]
        path.write_text(json.dumps(main_run, indent=1))
        return 0
    from live_learning import parse_value

    args.config = {k: parse_value(v) for k, v in (s.split("=", 1) for s in args.set)}
    cases = []
    for name in args.phantom or PHANTOMS:
        for size in args.size or (128, 256):
            for photons in args.photons or (1000.0, 300.0):
                for setting in args.setting or ["full"]:
                    case = run_case(args, name, size, photons, setting)
                    print(json.dumps(case, default=str), flush=True)
                    cases.append(case)
    out = {"machine": machine(), "settings": {k: str(v) for k, v in vars(args).items()}}
    out["cases"] = cases
    out["exploration"] = [run for p in args.exploration for run in runs(p)]
    text = json.dumps(out, indent=1, default=lambda v: v.item() if hasattr(v, "item") else str(v))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
    return 0 if all("error" not in c for c in cases) else 1


if __name__ == "__main__":
    raise SystemExit(main())
