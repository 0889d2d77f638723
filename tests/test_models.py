"""Model registry, the Standard U-Net of Graas et al. 2023, and checkpoints."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from bluesky_jit.errors import CheckpointError, ConfigError, ScanDataError
from bluesky_jit.models import (
    MODELS,
    available_models,
    build_model,
    default_config,
    describe_model,
    resolve_config,
)
from bluesky_jit.models.checkpoint import load_checkpoint, save_checkpoint
from bluesky_jit.models.unet import UNet

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- registry ---------------------------------------------------------------------------


def test_registry_lists_unet():
    assert "unet" in available_models()
    assert available_models() == sorted(MODELS)
    assert default_config("unet") == {
        "in_channels": 1,
        "out_channels": 1,
        "features": 8,
        "levels": 3,
        "convs_per_level": 3,
        "residual": False,
    }


def test_unknown_model_lists_known_names():
    with pytest.raises(ConfigError, match=r"known models are \[.*'unet'.*'unet3d'") as info:
        build_model("resnet", {})
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"feature": 8}, "Unknown setting"),
        ({"features": "8"}, "must be of type int"),
        ({"features": 8.0}, "must be of type int"),
        ({"levels": True}, "must be of type int"),
        ({"residual": 1}, "must be of type bool"),
        ({"features": 0}, "features must be an integer >= 1"),
        ({"convs_per_level": 1}, "convs_per_level must be an integer >= 2"),
        ({"residual": True, "out_channels": 2}, "in_channels"),
        ([("features", 8)], "must be a dict"),
    ],
)
def test_bad_configs_raise_config_error(config, match):
    with pytest.raises(ConfigError, match=match):
        build_model("unet", config)


def test_build_records_name_and_resolved_config():
    model = build_model("unet", {"features": 4})
    name, config = describe_model(model)
    assert name == "unet"
    assert config == resolve_config("unet", {"features": 4})
    with pytest.raises(ConfigError, match="build_model"):
        describe_model(nn.Conv2d(1, 1, 3))


def test_seeded_build_is_reproducible_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a = build_model("unet", seed=7).state_dict()
    b = build_model("unet", seed=7).state_dict()
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = build_model("unet", seed=8).state_dict()
    assert not torch.equal(a["encoders.0.0.weight"], c["encoders.0.0.weight"])


def test_importing_models_does_no_torch_import():
    code = "import sys, bluesky_jit.models; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- the Standard U-Net -------------------------------------------------------------------


@pytest.mark.parametrize("size", [(20, 20), (16, 16), (21, 17), (5, 3), (1, 1), (40, 64)])
def test_unet_keeps_the_image_size(size):
    model = build_model("unet", seed=0)
    out = model(torch.randn(2, 1, *size))
    assert out.shape == (2, 1, *size)


def test_unet_channels():
    model = build_model("unet", {"in_channels": 3, "out_channels": 2, "features": 4})
    assert model(torch.randn(1, 3, 24, 24)).shape == (1, 2, 24, 24)


def expected_parameters(cin, cout, f, levels, n):
    """Parameter count derived from Graas et al. 2023's description, independently of the code."""

    def conv(k, a, b):
        return k * k * a * b + b

    widths = [f * 2**level for level in range(levels + 1)]
    total, channels = 0, cin
    for w in widths:  # encoder: n 3x3 convs per level (the first one strided below level 0)
        total += conv(3, channels, w) + (n - 1) * conv(3, w, w)
        channels = w
    for level in range(levels):  # decoder: transposed conv + (n - 1) convs after the concat
        w = widths[level]
        total += conv(3, widths[level + 1], w) + conv(3, 2 * w, w) + (n - 2) * conv(3, w, w)
    return total + conv(1, f, cout)


@pytest.mark.parametrize(
    "config", [{}, {"features": 16}, {"features": 32, "levels": 2}, {"convs_per_level": 2}]
)
def test_unet_parameter_count(config):
    model = build_model("unet", config)
    c = resolve_config("unet", config)
    count = sum(p.numel() for p in model.parameters())
    assert count == expected_parameters(
        c["in_channels"], c["out_channels"], c["features"], c["levels"], c["convs_per_level"]
    )
    if not config:
        assert count == 183_201  # the number in UNet's docstring


def test_unet_structure_follows_graas2023():
    model = build_model("unet")
    convs = [m for m in model.modules() if type(m) is nn.Conv2d]
    strided = [m for m in convs if m.stride == (2, 2)]
    transposed = [m for m in model.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert len(strided) == 3 and len(transposed) == 3  # three down and up levels
    assert [m.out_channels for m in strided] == [16, 32, 64]  # 8 features, doubling
    assert len(convs) + len(transposed) == 4 * 3 + 3 * 3 + 1  # 3 enc/level, 3 dec/level, 1x1
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert model.size_multiple == 8


def test_residual_unet_starts_as_identity():
    model = build_model("unet", {"residual": True}, seed=0)
    x = torch.randn(2, 1, 13, 20)
    assert torch.equal(model(x), x)


def test_adam_steps_lower_the_loss_on_a_fixed_batch():
    model = build_model("unet", seed=0)
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(8, 1, 20, 20, generator=gen)
    v = nn.functional.avg_pool2d(u, 3, stride=1, padding=1) + 0.5  # smooth and shift
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(u), v)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


# -- checkpoints --------------------------------------------------------------------------


def test_checkpoint_round_trip(tmp_path):
    model = build_model("unet", {"features": 4}, seed=1)
    name, config = describe_model(model)
    extra = {"step": 12, "normalizer": {"offset": 0.1, "scale": 2.0}, "tags": ["a", 1.5, None]}
    path = save_checkpoint(
        tmp_path / "sub" / "c.pt", name=name, config=config, model=model, extra=extra
    )
    assert sorted(p.name for p in path.parent.iterdir()) == ["c.pt"]  # no temporary left
    loaded, loaded_extra = load_checkpoint(path, expected_name="unet", expected_config=config)
    assert loaded_extra == extra
    assert describe_model(loaded) == (name, config)
    x = torch.randn(2, 1, 20, 20)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_checkpoint_of_a_state_dict(tmp_path):
    model = build_model("unet", seed=1)
    path = save_checkpoint(tmp_path / "c.pt", name="unet", config={}, model=model.state_dict())
    loaded, extra = load_checkpoint(path)
    assert extra == {}
    loaded_state = loaded.state_dict()
    assert all(torch.equal(t, loaded_state[k]) for k, t in model.state_dict().items())


def test_checkpoint_for_another_architecture_raises(tmp_path):
    model = build_model("unet", {"features": 4})
    path = save_checkpoint(tmp_path / "c.pt", name="unet", config={"features": 4}, model=model)
    with pytest.raises(CheckpointError, match="holds a 'unet' network; expected 'msdnet'"):
        load_checkpoint(path, expected_name="msdnet")
    with pytest.raises(CheckpointError, match="features"):
        load_checkpoint(path, expected_config={"features": 8})
    # weights of one config saved under another config
    wrong = save_checkpoint(tmp_path / "w.pt", name="unet", config={"features": 8}, model=model)
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(wrong)


class NotWeights:
    pass


@pytest.mark.parametrize(
    "content",
    [
        b"not a checkpoint at all",
        b"",
        "pickled-object",
        "wrong-format",
        "missing-keys",
        "truncated",
        "unknown-name",
    ],
)
def test_garbage_and_tampered_files_raise(tmp_path, content):
    path = tmp_path / "bad.pt"
    good = save_checkpoint(
        tmp_path / "good.pt",
        name="unet",
        config={"features": 2},
        model=build_model("unet", {"features": 2}),
    )
    payload = torch.load(good, weights_only=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "pickled-object":  # would run code with weights_only=False
        torch.save({"format": "bluesky_jit.checkpoint/1", "obj": NotWeights()}, path)
    elif content == "wrong-format":
        torch.save({**payload, "format": "other/9"}, path)
    elif content == "missing-keys":
        torch.save({k: v for k, v in payload.items() if k != "state_dict"}, path)
    elif content == "truncated":
        path.write_bytes(good.read_bytes()[:200])
    elif content == "unknown-name":
        torch.save({**payload, "name": "gan"}, path)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_missing_file_and_non_plain_extra(tmp_path):
    with pytest.raises(CheckpointError, match="No checkpoint file"):
        load_checkpoint(tmp_path / "nope.pt")
    model = build_model("unet", {"features": 2})
    with pytest.raises(ConfigError, match="plain data"):
        save_checkpoint(
            tmp_path / "c.pt", name="unet", config={}, model=model, extra={"obj": NotWeights()}
        )
    with pytest.raises(ConfigError, match="Unknown model"):
        save_checkpoint(tmp_path / "c.pt", name="gan", config={}, model=model)


def test_unet_class_is_usable_directly():
    assert isinstance(build_model("unet"), UNet)


# -- the model zoo: MSD-Net, tunable U-Net, SMSNet, 3D U-Net (Zx / Tx) ---------------------

ZOO = {
    "msdnet": {"depth": 8, "width": 2, "dilations": [1, 2, 3]},
    "tunet": {"depth": 3, "base_channels": 4, "growth_rate": 1.5, "hidden_rate": 0.5},
    "smsnet": {"depth": 6, "width": 2, "dilations": [1, 2, 4], "graph_seed": 3},
    "unet3d": {"features": 4, "frames": 3},
}


def zoo_input(name, batch=2, size=(20, 20)):
    if name == "unet3d":
        return torch.randn(batch, 1, ZOO[name]["frames"], *size)
    return torch.randn(batch, 1, *size)


def test_registry_lists_the_zoo():
    assert {"unet", "unet3d", "msdnet", "tunet", "smsnet"} <= set(available_models())
    for name in available_models():
        assert isinstance(build_model(name), nn.Module)


@pytest.mark.parametrize("name", sorted(ZOO))
@pytest.mark.parametrize("size", [(20, 20), (21, 17), (5, 3)])
def test_zoo_shapes(name, size):
    model = build_model(name, ZOO[name], seed=0)
    out = model(zoo_input(name, size=size))
    expected = (2, 1, 1, *size) if name == "unet3d" else (2, 1, *size)
    assert out.shape == expected


def test_unet3d_takes_z_and_t_stacks_and_returns_the_middle_frame():
    model = build_model("unet3d", {"features": 2, "frames": 5, "residual": True}, seed=0)
    x = torch.randn(1, 1, 5, 12, 16)
    assert torch.equal(model(x), x[:, :, 2:3])  # residual + zero head: the middle frame
    with pytest.raises(ScanDataError, match=r"\(B, C, 5, H, W\)"):
        model(torch.randn(1, 1, 3, 12, 16))  # wrong number of frames
    with pytest.raises(ScanDataError):
        model(torch.randn(1, 1, 12, 16))  # a 2D image
    assert model.frames == 5 and model.spatial_dims == 3


def test_unet3d_parameter_count():
    cfg = resolve_config("unet3d", {"features": 4, "frames": 3})

    def conv(a, b, k=27):
        return k * a * b + b

    f, n = cfg["features"], cfg["convs_per_level"]
    widths = [f * 2**level for level in range(cfg["levels"] + 1)]
    total, c = 0, 1
    for w in widths:
        total += conv(c, w) + (n - 1) * conv(w, w)
        c = w
    for level in range(cfg["levels"]):
        w = widths[level]
        total += conv(widths[level + 1], w) + conv(2 * w, w) + (n - 2) * conv(w, w)
    total += conv(f, 1, 1)
    assert sum(p.numel() for p in build_model("unet3d", cfg).parameters()) == total


def test_msdnet_parameter_count_and_pelt_sethian_defaults():
    cfg = ZOO["msdnet"]
    d, w = cfg["depth"], cfg["width"]
    expected = sum(9 * w * (1 + i * w) + w for i in range(d)) + (1 + d * w) + 1
    assert sum(p.numel() for p in build_model("msdnet", cfg).parameters()) == expected
    default = build_model("msdnet")
    # Pelt and Sethian 2018: "~46 thousand"
    assert sum(p.numel() for p in default.parameters()) == 45_652
    assert default.dilations[:12] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2]  # (i mod 10) + 1


def test_msdnet_matches_a_naive_dense_network_and_its_gradients():
    torch.manual_seed(0)
    model = build_model("msdnet", {"depth": 5, "width": 2, "dilations": [1, 3]}).double()
    x = torch.randn(2, 1, 9, 11, dtype=torch.float64, requires_grad=True)

    def naive(x):
        features = [x]
        for w, b, d in zip(model.weights, model.biases, model.dilations, strict=True):
            z = nn.functional.conv2d(torch.cat(features, 1), w, b, padding=d, dilation=d)
            features.append(torch.relu(z))
        return model.head(torch.cat(features, 1))

    params = [x, *model.parameters()]
    fast = torch.autograd.grad(model(x).square().sum(), params)
    slow = torch.autograd.grad(naive(x).square().sum(), params)
    torch.testing.assert_close(model(x), naive(x))
    for a, b in zip(fast, slow, strict=True):
        torch.testing.assert_close(a, b)


def test_msdnet_bfloat16_autocast_runs_and_is_close():
    model = build_model("msdnet", {"depth": 4}, seed=0)
    x = torch.randn(2, 1, 12, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x).float()
    assert torch.allclose(low, model(x), atol=0.05, rtol=0.05)


def test_tunet_channels_follow_growth_and_hidden_rates():
    model = build_model("tunet", {"depth": 3, "base_channels": 6, "growth_rate": 1.5})
    assert model.channels == [6, 9, 14]  # round(c_b * r**l)
    assert model.size_multiple == 4
    bn = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bn) == 2 * 3 + 2 * 2  # after every 3x3 conv (DLSIA default)
    plain = build_model("tunet", {"depth": 3, "batch_norm": False})
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    hidden = build_model("tunet", {"depth": 1, "base_channels": 8, "hidden_rate": 0.5})
    assert [m.out_channels for m in hidden.modules() if isinstance(m, nn.Conv2d)][:2] == [4, 8]


def test_smsnet_graph_is_reproducible_sparse_and_has_no_dead_nodes():
    cfg = {"depth": 12, "width": 1, "graph_seed": 5}
    a, b = build_model("smsnet", cfg), build_model("smsnet", cfg)
    assert a.edges == b.edges  # the architecture depends on the config only
    assert build_model("smsnet", {**cfg, "graph_seed": 6}).edges != a.edges
    depth = cfg["depth"]
    hidden_edges = [e for e in a.edges if 1 <= e.source and e.target <= depth]
    assert len(hidden_edges) < depth * (depth - 1) // 2  # sparse, unlike an MSD-Net
    for node in range(1, depth + 1):
        assert any(e.target == node for e in a.edges)  # fed
        assert any(e.source == node for e in a.edges)  # used
    assert all(e.source < e.target for e in a.edges)  # acyclic
    assert all(e.dilation in (1, 2, 4, 8, 16) for e in a.edges if e.target <= depth)
    assert any(e.source == 0 and e.target == depth + 1 for e in a.edges)  # P_IO
    out = 1 + sum(1 for e in a.edges if e.target == depth + 1)  # 1x1 head: one weight per source
    assert a.head.weight.numel() + a.head.bias.numel() == out


@pytest.mark.parametrize(
    ("name", "config", "match"),
    [
        ("msdnet", {"depth": 0}, "depth"),
        ("msdnet", {"dilations": [1, 0]}, "dilations"),
        ("msdnet", {"dilations": (1, 2)}, "must be of type list"),
        ("msdnet", {"width": 1.5}, "must be of type int"),
        ("tunet", {"growth_rate": 0}, "growth_rate"),
        ("tunet", {"growth_rate": "2"}, "must be of type float"),
        ("smsnet", {"min_edges": 4, "max_edges": 2}, "min_edges"),
        ("smsnet", {"p_input_hidden": 1.5}, "p_input_hidden"),
        ("smsnet", {"input_output": 1}, "must be of type bool"),
        ("unet3d", {"frames": 4}, "odd"),
        ("unet3d", {"frames": 0}, "frames"),
    ],
)
def test_zoo_bad_configs(name, config, match):
    with pytest.raises(ConfigError, match=match):
        build_model(name, config)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_adam_steps_lower_the_loss(name):
    model = build_model(name, ZOO[name], seed=0)
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(8, 1, 16, 16, generator=gen)
    v = nn.functional.avg_pool2d(u, 3, stride=1, padding=1) + 0.5
    if name == "unet3d":
        u = u[:, :, None].expand(-1, -1, 3, -1, -1).contiguous()
        v = v[:, :, None]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(u), v)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0]


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_checkpoint_round_trip(tmp_path, name):
    model = build_model(name, ZOO[name], seed=1)
    model.eval()
    path = save_checkpoint(tmp_path / "c.pt", name=name, config=ZOO[name], model=model)
    loaded, _ = load_checkpoint(path, expected_name=name, expected_config=ZOO[name])
    loaded.eval()
    x = zoo_input(name)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    other = next(n for n in sorted(ZOO) if n != name)
    with pytest.raises(CheckpointError, match="expected"):
        load_checkpoint(path, expected_name=other)


def test_smsnet_checkpoint_of_another_graph_is_refused(tmp_path):
    a = build_model("smsnet", {"graph_seed": 1})
    path = save_checkpoint(tmp_path / "c.pt", name="smsnet", config={"graph_seed": 2}, model=a)
    with pytest.raises(CheckpointError):  # graph 2 has other edges, so other weight shapes
        load_checkpoint(path)


def test_graas2023_variants():
    from bluesky_jit.models import VARIANTS, variant

    assert variant("standard").model == "unet" and variant("standard").patch_size == 20
    assert variant("C32").config == {"features": 32}
    assert variant("V150").patch_size == 150
    z7, t3 = variant("Z7"), variant("T3")
    assert (z7.model, z7.stack, z7.frames) == ("unet3d", "z", 7)
    assert (t3.model, t3.stack, t3.frames) == ("unet3d", "t", 3)
    for v in VARIANTS.values():
        build_model(v.model, v.config)  # every variant builds
    with pytest.raises(ConfigError, match="known variants"):
        variant("Q9")
