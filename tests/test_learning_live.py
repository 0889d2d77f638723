"""The learning settings of JitConfig, live: a real RunEngine, simulated devices, JitCallback.

K splits (X:1 and 1:X), Z and T stacks, the online strategies, the trainer in
its own process, changing the patches during a run, and the errors a bad
setting gives. Tiny scans as in ``test_callbacks``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from bluesky_jit.callbacks import JitCallback
from bluesky_jit.config import DYNAMIC_SETTINGS, SECTION_OF, JitConfig
from bluesky_jit.errors import ConfigError
from bluesky_jit.models import build_model, resolve_config
from bluesky_jit.models.checkpoint import save_checkpoint
from bluesky_jit.pairs import SamplingRegion
from bluesky_jit.process_trainer import ProcessTrainer
from bluesky_jit.training import Normalizer, resolve_precision
from simulated_devices.beamline import hw as make_hw

from .test_callbacks import ANGLES, CONFIG, SHAPE, Collector, run_scan, source


def scan(RE, tmp_path, config, *, rotations=2, frame_rate=20.0, hook=None):
    """Run a paced scan; return the summary, the derived documents and the run's pipeline."""
    derived = Collector()
    jit = JitCallback(config=config, emit=derived, directory=tmp_path / "derived")
    seen = {}

    def watch(name, doc):
        if name == "event" and "pipeline" not in seen and jit.pipelines:
            seen["pipeline"] = next(iter(jit.pipelines.values()))
        if hook is not None:
            hook(jit, name, doc)

    RE.subscribe(watch)
    beamline = make_hw(tmp_path / "raw", source=source(), frame_rate=frame_rate, paced=True)
    run_scan(RE, jit, beamline, rotations=rotations)
    summary = jit.summaries[0]
    assert summary.exit_status == "success", summary.reason
    return summary, derived, seen["pipeline"]


def checkpoint(path, config: JitConfig):
    """A network of ``config``'s architecture with a normaliser, as an earlier run leaves it."""
    model = build_model(config.training.model, config.training.model_config, seed=3)
    extra = {"step": 0, "normalizer": Normalizer(offset=0.0, scale=0.02).to_dict()}
    t = config.training
    name, resolved = t.model, resolve_config(t.model, t.model_config)
    return str(save_checkpoint(path, name=name, config=resolved, model=model, extra=extra))


@pytest.mark.parametrize(("splits", "strategy"), [(4, "X:1"), (3, "1:X")])
def test_k_splits_train_live_and_are_recorded(RE, tmp_path, splits, strategy):
    config = CONFIG.replace(splits=splits, n2i_strategy=strategy)
    summary, derived, pipeline = scan(RE, tmp_path, config)
    assert (pipeline.pairs.splits, pipeline.pairs.n2i_strategy) == (splits, strategy)
    inputs, _ = pipeline.pairs.inference_inputs()
    assert inputs.shape == (splits, *summary.last_slice.shape)
    # the K inputs average to the reconstruction from all projections
    full = summary.last_slice
    assert np.linalg.norm(inputs.mean(axis=0) - full) < 1e-4 * np.linalg.norm(full)
    start = derived.named("start")[0]
    assert start["noise2inverse"] == {
        "splits": splits,
        "strategy": strategy,
        "stack": None,
        "frames": 1,
    }
    assert summary.train_steps > 0
    metrics = [e["data"] for e in derived.named("event") if "alpha" in e["data"]]
    assert metrics and all(m["pairs_pushed"] > 0 for m in metrics[1:])
    finite = [m for m in metrics if math.isfinite(m["sigma_fbp"])]
    assert finite, "the K-split noise estimate was never computed"


@pytest.mark.parametrize("name", ["Z3", "T3"])
def test_stacks_denoise_live_from_a_warm_start(RE, tmp_path, name):
    """A Zx/Tx network denoises every slice it has a full stack for; Tx the middle window."""
    others = CONFIG.to_dict()
    for key in ("model", "model_config"):
        others["training"].pop(key)
    others["pairs"].pop("stack")
    base = JitConfig.for_variant(name, **others)
    assert base.training.model == "unet3d" and base.frames == 3
    assert base.pairs.stack == name[0].lower()
    ckpt = checkpoint(tmp_path / "net.pt", base)
    config = base.replace(warm_start=ckpt, train=False)
    summary, derived, pipeline = scan(RE, tmp_path, config, rotations=3)
    assert (pipeline.pairs.stack, pipeline.pairs.frames) == (name[0].lower(), 3)
    assert summary.problems == []
    streams = {d["uid"]: d["name"] for d in derived.named("descriptor")}
    events = derived.named("event")
    recon = [e["data"] for e in events if streams[e["descriptor"]] == "reconstruction"]
    denoised = [e["data"] for e in events if streams[e["descriptor"]] == "denoised"]
    step = ANGLES // 2  # default frame_step: half a rotation
    if name == "Z3":
        assert len(denoised) == len(recon) == summary.slices > 0
        ends = [d["projection_index"] for d in denoised]
        assert ends == [r["projection_index"] for r in recon]
    else:  # no stack before a rotation plus two steps; then the middle window's slice
        ready = [r for r in recon if r["projection_index"] + 1 >= ANGLES + 2 * step]
        assert len(denoised) == len(ready) > 0
        for d, r in zip(denoised, ready, strict=True):
            assert d["projection_index"] == r["projection_index"] - step
            assert d["first_projection_index"] == r["first_projection_index"] - step


@pytest.mark.parametrize("strategy", ["sequential", "frozen"])
def test_online_strategies_live(RE, tmp_path, strategy):
    settings = {}
    if strategy == "frozen":
        settings["warm_start"] = checkpoint(tmp_path / "net.pt", CONFIG)
    config = CONFIG.replace(online_strategy=strategy, **settings)
    summary, derived, pipeline = scan(RE, tmp_path, config)
    assert type(pipeline.trainer.buffer).__name__ == (
        "SequentialBuffer" if strategy == "sequential" else "ReplayBuffer"
    )
    if strategy == "frozen":
        assert summary.train_steps == 0
        assert summary.denoised == summary.slices > 0  # a pretrained network denoises at once
        assert math.isfinite(summary.final_alpha)  # and is rated on hold-out pairs
    else:
        assert summary.train_steps > 0


def test_trainer_in_its_own_process_live(RE, tmp_path):
    config = CONFIG.replace(trainer_process=True)
    summary, derived, pipeline = scan(RE, tmp_path, config, rotations=6, frame_rate=12.0)
    assert isinstance(pipeline.trainer, ProcessTrainer)
    assert summary.train_steps > 0, "the training process took no step during the scan"
    assert derived.named("start")[0]["config"]["runtime"]["trainer_process"] is True


def test_default_learning_settings_reach_the_trainer_and_denoiser(RE, tmp_path):
    summary, derived, pipeline = scan(RE, tmp_path, CONFIG)
    trainer, denoiser, cfg = pipeline.trainer, pipeline.denoiser, CONFIG
    assert trainer.precision == resolve_precision("auto") == denoiser.precision
    assert trainer.augment is True and trainer.average == cfg.training.average_weights == 0.99
    assert trainer.num_threads == pipeline.budget.train_threads and trainer.learning_rate == 2e-3
    assert derived.named("start")[0]["precision"]["train"] == trainer.precision


def test_patches_and_sampling_region_change_during_a_run(RE, tmp_path):
    seen = {}

    def change_at_projection_30(jit, name, doc):
        if name == "event" and doc["seq_num"] == 30 and "rot_stage" in doc["data"]:
            assert jit.flush(timeout=30)
            seen["pipeline"] = next(iter(jit.pipelines.values()))
            jit.set_sampling(patch_size=8, region=SamplingRegion.disc(6.0))

    summary, _, _ = scan(RE, tmp_path, CONFIG, hook=change_at_projection_30)
    pipeline = seen["pipeline"]
    assert pipeline.pairs.patch_size == 8
    assert pipeline.pairs.region.radius == 6.0
    assert pipeline.trainer.buffer.item_shapes == ((1, 8, 8), (1, 8, 8))
    assert summary.problems == []


def test_a_patch_larger_than_the_slice_fails_the_derived_run_clearly(RE, tmp_path):
    config = CONFIG.replace(patch_size=SHAPE[1] + 8)
    derived = Collector()
    jit = JitCallback(config=config, emit=derived, directory=tmp_path / "derived")
    uid, raw = run_scan(RE, jit, make_hw(tmp_path / "raw", source=source(), frame_rate=50.0))
    assert raw.named("stop")[0]["exit_status"] == "success"  # the raw scan is untouched
    summary = jit.summaries[0]
    assert summary.exit_status == "fail"
    assert "does not fit" in summary.reason and "patch" in summary.reason


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"model": "unet3d"}, "takes stacks"),
        ({"stack": "z"}, "needs a network on stacks"),
        ({"splits": 1}, "at least 2"),
        ({"n2i_strategy": "2:1"}, "Unknown Noise2Inverse strategy"),
        ({"online_strategy": "frozen"}, "warm_start"),
        ({"online_strategy": "fifo"}, "online_strategy"),
        ({"train_precision": "float16"}, "train_precision"),
        ({"average_weights": 1.5}, "average_weights"),
        ({"trainer_process": True, "device": "cuda"}, "trains on the CPU"),
        ({"model": "unet", "model_config": {"levels": "3"}}, "type int"),
    ],
)
def test_bad_learning_settings_are_clear_errors(settings, match):
    with pytest.raises(ConfigError, match=match):
        JitConfig(**settings)


def test_for_variant_does_not_let_settings_replace_the_network():
    with pytest.raises(ConfigError, match="sets model, model_config and stack"):
        JitConfig.for_variant("Z3", model="unet")
    assert JitConfig.for_variant("V30").pairs.patch_size == 30
    assert JitConfig.for_variant("C16").training.model_config == {"features": 16}


@pytest.mark.parametrize("dose", ["normal", "low"])
def test_for_dynamic_sets_its_settings_under_the_given_ones(dose):
    base, dynamic = JitConfig(), JitConfig.for_dynamic(dose)
    for key, value in DYNAMIC_SETTINGS[dose].items():
        section = SECTION_OF[key]
        assert getattr(getattr(dynamic, section), key) == value
        assert getattr(getattr(base, section), key) != value  # it changes something
    given = JitConfig.for_dynamic(dose, patch_size=32, pairs={"neighbourhood_rows": 1}, seed=3)
    assert (given.pairs.patch_size, given.pairs.neighbourhood_rows) == (32, 1)
    assert (given.training.batch_size, given.runtime.seed) == (
        DYNAMIC_SETTINGS[dose].get("batch_size", 32),
        3,
    )
    with pytest.raises(ConfigError, match="Unknown JitConfig setting"):
        JitConfig.for_dynamic(dose, patch_sise=32)


def test_for_dynamic_refuses_an_unknown_dose():
    with pytest.raises(ConfigError, match=r"expected one of \['normal', 'low'\]"):
        JitConfig.for_dynamic("high")


def test_a_checkpoint_of_another_network_fails_the_run_clearly(RE, tmp_path):
    other = checkpoint(tmp_path / "msd.pt", JitConfig(model="msdnet"))
    derived = Collector()
    jit = JitCallback(config=CONFIG.replace(warm_start=other), emit=derived, directory=tmp_path)
    run_scan(RE, jit, make_hw(tmp_path / "raw", source=source(), frame_rate=50.0))
    summary = jit.summaries[0]
    assert summary.exit_status == "fail"
    assert "msdnet" in summary.reason
