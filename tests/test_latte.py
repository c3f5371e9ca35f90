"""Latte on the FlexDiT core: parity with diffusers' LatteTransformer3DModel (Latte-1) and with a reference of the
original Vchitect/Latte forward, spatial/temporal pairs in FlexDiT layouts, conversion, FLOPs, sampler hooks, errors."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from conftest import assert_one_line_error, randomize
from flexdit.measure.flops import flops_report, model_macs
from flexdit.models.from_dense import flexdit_from_dense
from flexdit.models.latte import (LATTE_LAYOUTS, Latte, LatteConfig, config_from_diffusers, config_from_original,
                                  config_to_diffusers, default_layout, latte_config, state_from_diffusers,
                                  state_from_original, state_to_diffusers)
from flexdit.models.layout import Layout
from flexdit.nn.latte_blocks import TemporalBlock
from flexdit.nn.pixart_blocks import CaptionCrossAttention
from flexdit.sampling import plan, sample
from flexdit.schedule import DensitySchedule, FixedGrid

HEADS, HEAD_DIM, SIZE, FRAMES, CLASSES = 4, 8, 16, 3, 5
HIDDEN = HEADS * HEAD_DIM  # 32: not a standard Latte width, so original files need num_heads
CAPTION_CH, CAPTION_LEN = 24, 6
FLEX = Layout.flexdit(pool=1, sdtms=1, gen=1, sparse=1, recover=1, dense=0, top=1)  # pool,gen,sparse,recover,dense
NO_POOL = Layout(("gen", "sparse", "recover", "dense"))
PAPER = DensitySchedule(0.61, 0.86)
DDPM_250 = plan("ddpm", 250).timesteps


def tiny_config(layout: Layout = Layout.dense(2), conditioning: str = "none", **kw) -> LatteConfig:
    cfg = dict(input_size=(SIZE, SIZE), hidden_size=HIDDEN, num_heads=HEADS, frames=FRAMES,
               conditioning=conditioning, layout=layout.kinds)
    if conditioning == "class":
        cfg["num_classes"] = CLASSES
    if conditioning == "caption":
        cfg.update(caption_channels=CAPTION_CH, caption_length=CAPTION_LEN)
    cfg.update(kw)
    return LatteConfig(**cfg)


def tiny_latte(layout: Layout = Layout.dense(2), conditioning: str = "none", seed: int = 0, **kw) -> Latte:
    return randomize(Latte(tiny_config(layout, conditioning, **kw)), seed).eval()


def videos(model: Latte, batch: int = 2, seed: int = 1, t=None):
    """x (B, C, F, H, W) and t (B,)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *model.sample_shape, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g) if t is None else torch.as_tensor(t)
    return x, t


def caption_batch(batch: int, length: int = CAPTION_LEN, seed: int = 2, pad: int = 2):
    """Captions (B, length, C) whose last `pad` tokens are padding for every sample but the first, and the mask."""
    g = torch.Generator().manual_seed(seed)
    caption = torch.randn(batch, length, CAPTION_CH, generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1:, length - pad:] = 0
    return caption, mask


def condition(model: Latte, batch: int, seed: int = 3) -> dict:
    """forward()'s conditioning keywords for the model's form (padded captions with their mask)."""
    if model.conditioning == "class":
        return {"y": torch.randint(0, CLASSES, (batch,), generator=torch.Generator().manual_seed(seed))}
    if model.conditioning == "caption":
        caption, mask = caption_batch(batch, seed=seed)
        return {"caption": caption, "caption_mask": mask}
    return {}


def run(model: Latte, x, t, **kw):
    with torch.no_grad():
        return model(x, t, **kw)


# --- parity with diffusers (Latte-1) -----------------------------------------------------------------
@pytest.fixture(scope="module")
def diffusers():
    return pytest.importorskip("diffusers")


def diffusers_latte(diffusers, frames: int, seed: int = 3, **kw) -> torch.nn.Module:
    cfg = dict(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4, out_channels=8, num_layers=2,
               sample_size=SIZE, patch_size=2, caption_channels=CAPTION_CH, cross_attention_dim=HIDDEN,
               norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
               activation_fn="gelu-approximate", attention_bias=True, num_embeds_ada_norm=1000, video_length=frames)
    cfg.update(kw)
    return randomize(diffusers.LatteTransformer3DModel(**cfg), seed).eval()


def diffusers_forward(model, x, t, caption, mask=None):
    """diffusers takes no 2-D mask (it would not match its (B*F) batch): give it LatteT2V's per-frame bias."""
    bias = None if mask is None else ((1 - mask.float()) * -10000.0)[:, None].repeat_interleave(x.shape[2], dim=0)
    with torch.no_grad():
        return model(x, t, caption, encoder_attention_mask=bias, return_dict=False)[0]


PARITY_CASES = [  # id, frames, padded caption mask, diffusers config
    ("one-frame", 1, False, {}),
    ("three-frames", 3, False, {}),
    ("three-frames-masked", 3, True, {}),
    ("eps-only", 3, True, dict(out_channels=4)),
    ("position-scale-2", 2, True, dict(sample_size=128, patch_size=8)),  # interpolation scale 128 // 64
]


@pytest.mark.parametrize("name, frames, masked, config", PARITY_CASES, ids=[c[0] for c in PARITY_CASES])
def test_parity_with_diffusers(diffusers, name, frames, masked, config):
    theirs = diffusers_latte(diffusers, frames, **config)
    cfg = config_from_diffusers(dict(theirs.config))
    ours = Latte(cfg).eval()
    ours.load_state_dict(state_from_diffusers(theirs.state_dict(), cfg), strict=True)
    x, t = videos(ours, batch=3, t=[0, 500, 999])
    caption, mask = caption_batch(3)
    mask = mask if masked else None
    expected = diffusers_forward(theirs, x, t, caption, mask)
    torch.testing.assert_close(run(ours, x, t, caption=caption, caption_mask=mask), expected, atol=1e-4, rtol=1e-4)


def test_round_trip_to_diffusers(diffusers):
    ours = tiny_latte(conditioning="caption", caption_length=120)
    theirs = diffusers.LatteTransformer3DModel(**config_to_diffusers(ours.config)).eval()
    theirs.load_state_dict(state_to_diffusers(ours.state_dict(), ours.config), strict=True)
    x, t = videos(ours, batch=3)
    caption, mask = caption_batch(3)
    expected = diffusers_forward(theirs, x, t, caption, mask)
    torch.testing.assert_close(run(ours, x, t, caption=caption, caption_mask=mask), expected, atol=1e-4, rtol=1e-4)
    assert config_from_diffusers(dict(theirs.config)) == ours.config


def test_latte_1_factory_is_the_hub_config():
    # maxin-cn/Latte-1 transformer/config.json (docs/backbones.md 2.4)
    hub = dict(num_layers=28, attention_head_dim=72, num_attention_heads=16, in_channels=4, out_channels=8,
               patch_size=2, sample_size=64, caption_channels=4096, cross_attention_dim=1152,
               norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
               activation_fn="gelu-approximate", attention_bias=True, num_embeds_ada_norm=1000, video_length=16)
    assert config_from_diffusers(hub) == latte_config("Latte-1", image_size=512)


# --- parity with the original Vchitect/Latte ---------------------------------------------------------
# A reference of models/latte.py's forward, written from reading it: (B, F, C, H, W) videos, the conditioning
# repeated per frame and per token position, math attention, MAE's numpy sin-cos tables stored in the state.
def mae_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", positions.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def original_tables(dim: int, side: int, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    axis = np.arange(side, dtype=np.float32)
    grid = np.stack(np.meshgrid(axis, axis), axis=0).reshape(2, 1, side, side)  # w first
    spatial = np.concatenate([mae_1d(dim // 2, grid[0]), mae_1d(dim // 2, grid[1])], axis=1)
    temporal = mae_1d(dim, np.arange(frames))
    return torch.from_numpy(spatial).float()[None], torch.from_numpy(temporal).float()[None]


def original_state(pairs: int = 2, classes: int | None = None, frames: int = FRAMES, seed: int = 5) -> dict:
    D, C, p, out, hidden = HIDDEN, 4, 2, 8, 4 * HIDDEN
    linears = {"t_embedder.mlp.0": (D, 256), "t_embedder.mlp.2": (D, D), "final_layer.linear": (p * p * out, D),
               "final_layer.adaLN_modulation.1": (2 * D, D)}
    for j in range(2 * pairs):
        linears.update({f"blocks.{j}.attn.qkv": (3 * D, D), f"blocks.{j}.attn.proj": (D, D),
                        f"blocks.{j}.mlp.fc1": (hidden, D), f"blocks.{j}.mlp.fc2": (D, hidden),
                        f"blocks.{j}.adaLN_modulation.1": (6 * D, D)})
    shapes = {"x_embedder.proj.weight": (D, C, p, p), "x_embedder.proj.bias": (D,)}
    for name, (rows, cols) in linears.items():
        shapes.update({f"{name}.weight": (rows, cols), f"{name}.bias": (rows,)})
    if classes is not None:
        shapes["y_embedder.embedding_table.weight"] = (classes + 1, D)
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(shape, generator=g) * 0.2 for k, shape in shapes.items()}
    state["pos_embed"], state["temp_embed"] = original_tables(D, SIZE // p, frames)
    return state


def original_forward(state: dict, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    B, Fr, C, H, W = x.shape
    D, p = state["x_embedder.proj.weight"].shape[0], state["x_embedder.proj.weight"].shape[2]
    N, frames, depth = state["pos_embed"].shape[1], state["temp_embed"].shape[1], 0

    def lin(h, name):
        return F.linear(h, state[f"{name}.weight"], state[f"{name}.bias"])

    def norm(h):
        return F.layer_norm(h, (D,), eps=1e-6)

    def mod(h, shift, scale):
        return h * (1 + scale[:, None]) + shift[:, None]

    def block(h, c, j):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = \
            lin(F.silu(c), f"blocks.{j}.adaLN_modulation.1").chunk(6, dim=1)
        b, n, _ = h.shape
        q, k, v = lin(mod(norm(h), shift_msa, scale_msa), f"blocks.{j}.attn.qkv") \
            .reshape(b, n, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (D // HEADS) ** -0.5).softmax(dim=-1)
        h = h + gate_msa[:, None] * lin((attn @ v).transpose(1, 2).reshape(b, n, D), f"blocks.{j}.attn.proj")
        hidden = F.gelu(lin(mod(norm(h), shift_mlp, scale_mlp), f"blocks.{j}.mlp.fc1"), approximate="tanh")
        return h + gate_mlp[:, None] * lin(hidden, f"blocks.{j}.mlp.fc2")

    h = F.conv2d(x.reshape(B * Fr, C, H, W), state["x_embedder.proj.weight"], state["x_embedder.proj.bias"],
                 stride=p).flatten(2).transpose(1, 2) + state["pos_embed"]
    args = t[:, None].float() * torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)[None]
    c = lin(F.silu(lin(torch.cat([torch.cos(args), torch.sin(args)], dim=-1), "t_embedder.mlp.0")), "t_embedder.mlp.2")
    if "y_embedder.embedding_table.weight" in state:
        c = c + state["y_embedder.embedding_table.weight"][y]
    c_spatial, c_temporal = c.repeat_interleave(frames, dim=0), c.repeat_interleave(N, dim=0)
    while f"blocks.{depth}.attn.qkv.weight" in state:
        depth += 1
    for j in range(0, depth, 2):
        h = block(h, c_spatial, j).reshape(B, Fr, N, D).transpose(1, 2).reshape(B * N, Fr, D)  # (b t) f d
        if j == 0:
            h = h + state["temp_embed"]
        h = block(h, c_temporal, j + 1).reshape(B, N, Fr, D).transpose(1, 2).reshape(B * Fr, N, D)  # (b f) t d
    shift, scale = lin(F.silu(c_spatial), "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    h = lin(mod(norm(h), shift, scale), "final_layer.linear")
    side, out = int(N ** 0.5), h.shape[-1] // (p * p)
    h = torch.einsum("nhwpqc->nchpwq", h.reshape(B * Fr, side, side, p, p, out))
    return h.reshape(B, Fr, out, side * p, side * p)


def original_forward_with_cfg(state: dict, x, t, y, cfg_scale: float) -> torch.Tensor:
    half = x[: len(x) // 2]
    out = original_forward(state, torch.cat([half, half]), t, y)
    eps, rest = out[:, :, :4], out[:, :, 4:]
    cond, uncond = torch.split(eps, len(eps) // 2, dim=0)
    half_eps = uncond + cfg_scale * (cond - uncond)
    return torch.cat([torch.cat([half_eps, half_eps]), rest], dim=2)


def from_original(state: dict) -> Latte:
    config = config_from_original(state, {"num_heads": HEADS})
    model = Latte(config).eval()
    model.load_state_dict(state_from_original(state, config), strict=True)
    return model


def original_videos(batch: int, frames: int = FRAMES, seed: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, F, C, H, W) in the original's layout and t (B,)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, frames, 4, SIZE, SIZE, generator=g), torch.randint(0, 1000, (batch,), generator=g)


@pytest.mark.parametrize("classes, frames", [(None, FRAMES), (None, 1), (CLASSES, FRAMES)],
                         ids=["unconditional", "unconditional-one-frame", "class"])
def test_parity_with_the_original(classes, frames):
    state = original_state(classes=classes, frames=frames)
    ours = from_original(state)
    assert ours.conditioning == ("class" if classes else "none") and ours.frames == frames
    x, t = original_videos(3, frames)
    y = torch.tensor([0, 2, CLASSES]) if classes else None  # the null class too
    expected = original_forward(state, x, t, y)
    torch.testing.assert_close(run(ours, x.transpose(1, 2), t, y=y).transpose(1, 2), expected, atol=1e-4, rtol=1e-4)


def test_forward_with_cfg_is_the_originals():
    state = original_state(classes=CLASSES)
    ours = from_original(state)
    x, t = original_videos(4)
    y = torch.tensor([1, 3, CLASSES, CLASSES])  # [cond, uncond] halves, as sample.py builds them
    expected = original_forward_with_cfg(state, x, t, y, 4.0)
    with torch.no_grad():
        got = ours.forward_with_cfg(x.transpose(1, 2), t, y, cfg_scale=4.0).transpose(1, 2)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert ours.GUIDED_CHANNELS == 4


@pytest.mark.parametrize("name, pairs, hidden, heads, patch", [
    ("Latte-XL/2", 14, 1152, 16, 2), ("Latte-L/4", 12, 1024, 16, 4), ("Latte-B/8", 6, 768, 12, 8),
    ("Latte-S/2", 6, 384, 6, 2)])
def test_factory_sizes(name, pairs, hidden, heads, patch):
    config = latte_config(name)
    assert (config.depth, config.hidden_size, config.num_heads, config.patch_size) == (pairs, hidden, heads, patch)
    assert (config.frames, config.input_size, config.out_channels, config.density) == (16, (32, 32), 8, None)
    flex = latte_config("FlexDiT-" + name)
    assert flex.layout == default_layout(pairs).kinds and flex.density == PAPER.to_dict()
    assert flex.dense() == config


def test_latte_xl_parameter_count_is_the_originals():
    # The original Latte-XL/2's parameters less its two frozen sin-cos tables (which we rebuild, not store).
    with torch.device("meta"):
        model = Latte(latte_config("Latte-XL/2", conditioning="class"))
    D, p, hidden = 1152, 2, 4608
    block = 3 * D * D + 3 * D + D * D + D + 2 * D * hidden + hidden + D + 6 * D * D + 6 * D
    original = (D * 4 * p * p + D) + (256 * D + D + D * D + D) + 102 * D + 28 * block \
        + (p * p * 8 * D + p * p * 8) + (2 * D * D + 2 * D)
    assert model.num_parameters() == original


def test_config_round_trips_through_json():
    for config in (tiny_config(FLEX, "class", density=PAPER.to_dict()), tiny_config(conditioning="caption")):
        assert LatteConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


# --- FlexDiT: pairs in SDTMs ------------------------------------------------------------------------
@pytest.mark.parametrize("conditioning", ["class", "caption"])
def test_conversion_splits_the_spatial_qkv_and_carries_the_temporal_block(conditioning):
    dense = tiny_latte(Layout.dense(len(FLEX)), conditioning)
    flex, report = flexdit_from_dense(dense, layout=FLEX, density=FixedGrid(4, 4))
    assert isinstance(flex, Latte)
    d, f = dense.state_dict(), flex.state_dict()
    for i, kind in enumerate(FLEX.kinds):
        w, b = d[f"blocks.{i}.attn.qkv.weight"], d[f"blocks.{i}.attn.qkv.bias"]
        if kind == "pool":
            assert torch.equal(f[f"blocks.{i}.attn.v.weight"], w[2 * HIDDEN:])
        elif kind in ("gen", "recover"):
            assert torch.equal(f[f"blocks.{i}.attn.q.weight"], w[:HIDDEN])
            assert torch.equal(f[f"blocks.{i}.attn.kv.bias"], b[HIDDEN:])
        assert torch.equal(f[f"blocks.{i}.temporal.attn.qkv.weight"], d[f"blocks.{i}.temporal.attn.qkv.weight"])
    carried = [k for k in f if ("attn." not in k or ".temporal." in k or "cross_attn." in k) and "merge." not in k]
    assert all(torch.equal(f[k], d[k]) for k in carried)
    recover = FLEX.kinds.index("recover")
    assert sorted(report.new) == sorted(f"blocks.{recover}.merge.{n}.{p}" for n in ("sparse", "dense")
                                        for p in ("weight", "bias"))


@pytest.mark.parametrize("conditioning", ["none", "class", "caption"])
def test_full_grid_flexdit_equals_dense_when_merge_passes_sparse_path(conditioning):
    # At the full grid pooling and upsampling are identities; with X_merged = Xs every SDTM pair is its dense one.
    dense = tiny_latte(Layout.dense(len(NO_POOL)), conditioning)
    flex, _ = flexdit_from_dense(dense, layout=NO_POOL, density=FixedGrid(8, 8))
    merge = flex.blocks[NO_POOL.kinds.index("recover")].merge
    with torch.no_grad():
        merge.sparse.weight.copy_(torch.eye(HIDDEN))
        merge.dense.weight.zero_()
    x, t = videos(dense)
    kw = condition(dense, 2)
    torch.testing.assert_close(run(flex.eval(), x, t, **kw), run(dense, x, t, **kw), atol=1e-5, rtol=0)


@pytest.mark.parametrize("conditioning", ["class", "caption"])
def test_temporal_blocks_see_the_tokens_their_spatial_stage_holds(conditioning):
    model = tiny_latte(FLEX, conditioning)
    temporal, cross = [], []
    for module in model.modules():
        if isinstance(module, TemporalBlock):
            module.attn.register_forward_hook(lambda m, args, out: temporal.append(tuple(args[0].shape[:2])))
        if isinstance(module, CaptionCrossAttention):
            module.register_forward_hook(lambda m, args, out: cross.append(tuple(args[0].shape[:2])))
    x, t = videos(model)
    out = run(model, x, t, **condition(model, 2), grid=(3, 3))
    assert out.shape == (2, 8, FRAMES, SIZE, SIZE) and torch.isfinite(out).all()
    # pool, gen, sparse, recover, dense: B * n rows of F frames each, n = 64 dense or 9 sparse tokens a frame
    assert temporal == [(2 * n, FRAMES) for n in (64, 9, 9, 64, 64)]
    if conditioning == "caption":  # each sample's frames query its caption together
        assert cross == [(2, FRAMES * n) for n in (64, 9, 9, 64, 64)]



def test_grid_follows_the_timestep_and_groups_match_single_samples(pooled_grids):
    model = tiny_latte(FLEX, "caption", density=PAPER.to_dict())
    x, t = videos(model, batch=4, t=[999, 0, 600, 0])
    kw = condition(model, 4)
    batched = run(model, x, t, **kw)
    grids = model.grids_for(t)
    assert sorted(set(grids)) == [(3, 3), (4, 4), (5, 5)]
    # one group per grid, pooled per frame: (samples in the group) * F rows
    assert sorted(zip(pooled_grids.rows, pooled_grids)) == sorted((grids.count(g) * FRAMES, g) for g in set(grids))
    for i in range(4):
        alone = run(model, x[i:i + 1], t[i:i + 1], **{k: v[i:i + 1] for k, v in kw.items()})
        torch.testing.assert_close(batched[i:i + 1], alone, atol=1e-5, rtol=1e-5)


def test_gradient_reaches_every_parameter_with_checkpointing_alike():
    grads = []
    for checkpointing in (False, True):
        model = tiny_latte(FLEX, "caption", density=FixedGrid(4, 4).to_dict()).train()
        model.grad_checkpointing = checkpointing
        x, t = videos(model)
        model(x, t, **condition(model, 2)).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert all(g is not None and g.abs().sum() > 0 for g in grads[0].values())
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("pairs", sorted(LATTE_LAYOUTS))
def test_default_layouts(pairs):
    layout = default_layout(pairs)
    assert len(layout) == pairs and layout.has_sparse_tokens and layout.kinds[-1] in ("dense", "recover")


# --- FLOPs ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("conditioning, layout, grid, kw", [
    ("none", Layout.dense(2), None, {}),
    ("class", FLEX, (3, 2), {}),
    ("caption", FLEX, (2, 3), {}),
    ("caption", Layout.dense(1), None, dict(learn_sigma=False, mlp_ratio=2.0, frames=1)),
])
def test_counter_matches_torch_flop_counter(conditioning, layout, grid, kw):
    # torch counts 2 FLOPs per multiply-add; the math SDPA backend exposes attention's matmuls to it.
    density = {"grid": list(grid)} if grid else None
    config = tiny_config(layout, conditioning, input_size=(16, 12), density=density, **kw)
    model = Latte(config).eval()
    x, t = videos(model, batch=1)
    kw = condition(model, 1)
    kw.pop("caption_mask", None)  # FLOPs count caption_length tokens
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, t, **kw)
    assert counter.get_total_flops() == 2 * model_macs(config, grid)


def test_latte_xl_gflops_near_the_published_figure():
    # 1893 G counts the original's per-frame and per-position adaLN rows; we run and count adaLN once a sample.
    report = flops_report(latte_config("Latte-XL/2", frames=16, image_size=256), DDPM_250)
    assert report.gflops == pytest.approx(1893, rel=0.025) and report.gflops == report.dense_gflops


@pytest.mark.parametrize("name", ["FlexDiT-Latte-XL/2", "FlexDiT-Latte-1"])
def test_default_flexdit_saves_half_the_flops(name):
    report = flops_report(latte_config(name, frames=16, image_size=256), DDPM_250)
    assert report.saving >= 0.5
    assert report.dense_gflops == model_macs(latte_config(name, image_size=256).dense()) / 1e9


# --- sampler and trainer hooks ---------------------------------------------------------------------------
def test_the_shared_sampler_guides_a_class_latte():
    model = tiny_latte(FLEX, "class", density=PAPER.to_dict())
    videos_ = sample(model, [1, 2], sampler="ddim", steps=2, cfg_scale=3.0)
    assert videos_.shape == (2, 4, FRAMES, SIZE, SIZE) and torch.isfinite(videos_).all()


def test_conditioning_helpers():
    unconditional = tiny_latte()
    assert unconditional.prepare_condition(3)["y"].shape == (3,) and not unconditional.can_guide
    assert unconditional.dropped_condition({"y": torch.zeros(2)}, torch.tensor([True, False]))["y"].shape == (2,)
    labelled = tiny_latte(conditioning="class")
    doubled = labelled.guidance_condition(labelled.prepare_condition([1, 4]))
    assert doubled["y"].tolist() == [1, 4, CLASSES, CLASSES] and labelled.can_guide
    captioned = tiny_latte(conditioning="caption")
    assert captioned.GUIDED_CHANNELS is None and not captioned.can_guide
    caption, mask = caption_batch(2)
    prepared = captioned.prepare_condition({"caption": caption, "caption_mask": mask,
                                            "negative_caption": torch.randn(2, 2, CAPTION_CH)})
    doubled = captioned.guidance_condition(prepared)
    assert doubled["caption"].shape == (4, CAPTION_LEN, CAPTION_CH) and doubled["caption_mask"][2:, 2:].sum() == 0
    dropped = captioned.dropped_condition({"caption": caption, "caption_mask": mask}, torch.tensor([False, True]),
                                          (torch.randn(1, CAPTION_CH), torch.ones(1)))
    assert dropped["caption_mask"][1].tolist() == [1, 0, 0, 0, 0, 0] and torch.equal(dropped["caption"][0], caption[0])
    for model in (unconditional, labelled, captioned):
        x, t = videos(model)
        assert run(model, x, t, **model.example_condition(2, torch.Generator())).shape == (2, 8, FRAMES, SIZE, SIZE)


def test_padding_a_caption_under_its_mask_changes_nothing():
    model = tiny_latte(FLEX, "caption", density=FixedGrid(5, 5).to_dict())
    x, t = videos(model)
    caption = torch.randn(2, 4, CAPTION_CH)
    padded = torch.cat([caption, 10 * torch.randn(2, 3, CAPTION_CH)], dim=1)
    mask = torch.cat([torch.ones(2, 4), torch.zeros(2, 3)], dim=1)
    torch.testing.assert_close(run(model, x, t, caption=padded, caption_mask=mask), run(model, x, t, caption=caption),
                               atol=1e-5, rtol=1e-5)


# --- errors --------------------------------------------------------------------------------------------
def _forward(conditioning="none", x=None, t=None, **kw):
    def call():
        model = tiny_latte(conditioning=conditioning)
        x_, t_ = videos(model)
        model(x_ if x is None else x, t_ if t is None else t, **kw)
    return call


def _original(edit, overrides=None, classes=None):
    def call():
        state = original_state(classes=classes)
        edit(state)
        config = config_from_original(state, {"num_heads": HEADS, **(overrides or {})})
        state_from_original(state, config)
    return call


def _diffusers_state_missing_a_key():
    config = tiny_config(conditioning="caption")
    theirs = state_to_diffusers(Latte(config).state_dict(), config)
    theirs.pop("temporal_transformer_blocks.1.scale_shift_table")
    state_from_diffusers(theirs, config)


DIFFUSERS_TINY = dict(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4, out_channels=8,
                      num_layers=1, sample_size=SIZE, patch_size=2, caption_channels=CAPTION_CH,
                      cross_attention_dim=HIDDEN, norm_type="ada_norm_single", norm_elementwise_affine=False,
                      norm_eps=1e-6, activation_fn="gelu-approximate", attention_bias=True)
ERROR_CASES = [
    ("wrong frames", _forward(x=torch.randn(2, 4, 5, SIZE, SIZE)), ["(B, 4, 3, 16, 16)", "runs 3 frames"]),
    ("original layout", _forward(x=torch.randn(2, 3, 4, SIZE, SIZE)), ["(B, F, C, H, W)", "permute"]),
    ("frame size", _forward(x=torch.randn(2, 4, 3, 8, 8)), ["does not fit", "expected (B, C, F, H, W)"]),
    ("t shape", _forward(t=torch.zeros(3, dtype=torch.long)), ["t must have shape (2,)"]),
    ("class without y", _forward("class"), ["needs y"]),
    ("class out of range", _forward("class", y=torch.tensor([0, CLASSES + 1])), ["class ids must lie in 0..5"]),
    ("caption missing", _forward("caption"), ["caption of shape None", "T5"]),
    ("caption with y", _forward("caption", y=torch.zeros(2, dtype=torch.long)), ["not class ids y"]),
    ("caption to unconditional", _forward(caption=torch.randn(2, 3, CAPTION_CH)), ["unconditional", "drop caption"]),
    ("mask shape", _forward("caption", caption=torch.randn(2, 3, CAPTION_CH), caption_mask=torch.ones(2, 4)),
     ["caption_mask", "does not match"]),
    ("cfg unconditional", lambda: tiny_latte().forward_with_cfg(*videos(tiny_latte())), ["guidance needs"]),
    ("cfg odd batch", lambda: tiny_latte(conditioning="class").forward_with_cfg(
        *videos(tiny_latte(), batch=3), y=torch.zeros(3, dtype=torch.long)), ["even batch"]),
    ("guide unconditional", lambda: tiny_latte().guidance_condition({"y": torch.zeros(2)}), ["cannot guide"]),
    ("caption dropout without null", lambda: tiny_latte(conditioning="caption").dropped_condition(
        {"caption": torch.randn(2, 3, CAPTION_CH)}, torch.tensor([True, False])), ["null caption"]),
    ("unknown conditioning", lambda: tiny_config(conditioning="text"), ["conditioning 'text'", "none, class"]),
    ("frames", lambda: tiny_config(frames=0), ["frames must be a positive integer"]),
    ("class without classes", lambda: tiny_config(conditioning="class", num_classes=None), ["needs num_classes"]),
    ("classes on unconditional", lambda: tiny_config(num_classes=3), ["num_classes applies", "drop it"]),
    ("factory name", lambda: latte_config("Latte-XXL/2"), ["unknown Latte model", "Latte-XL/2"]),
    ("factory layout depth", lambda: latte_config("Latte-S/2", layout="2+4x1-3-1-1+2"), ["28 blocks", "6"]),
    ("no default layout", lambda: default_layout(5), ["no default FlexDiT layout", "5 pairs"]),
    ("factory density on dense", lambda: latte_config(layout="dense", density=PAPER), ["dense layout"]),
    ("original odd blocks", _original(lambda s: [s.pop(k) for k in list(s) if k.startswith("blocks.3.")]),
     ["even run"]),
    ("original text form", _original(lambda s: s.update({"text_embedding_projection.1.weight": torch.zeros(1)})),
     ["extras 78"]),
    ("original width without heads", lambda: config_from_original(original_state()), ["hidden size 32", "num_heads"]),
    ("original label rows", _original(lambda s: None, {"num_classes": 2}, classes=CLASSES),
     ["6 rows", "num_classes 2"]),
    ("original damaged positions", _original(lambda s: s["temp_embed"].mul_(2)), ["temp_embed", "damaged"]),
    ("original extra key", _original(lambda s: s.update({"blocks.0.attn.extra": torch.zeros(1)})),
     ["do not fit", "unexpected ['blocks.0.attn.extra']"]),
    ("original missing pos_embed", _original(lambda s: s.pop("pos_embed")), ["lacks pos_embed"]),
    ("diffusers norm type", lambda: config_from_diffusers({**DIFFUSERS_TINY, "norm_type": "layer_norm"}),
     ["norm_type='layer_norm'", "not supported"]),
    ("diffusers defaults", lambda: config_from_diffusers({"num_layers": 2}), ["not supported"]),
    ("diffusers no patch size", lambda: config_from_diffusers({**DIFFUSERS_TINY, "patch_size": None}), ["patch_size"]),
    ("diffusers out channels", lambda: config_from_diffusers({**DIFFUSERS_TINY, "out_channels": 6}),
     ["out_channels 6"]),
    ("diffusers missing weight", _diffusers_state_missing_a_key, ["missing", "temporal_transformer_blocks.1"]),
    ("diffusers from a FlexDiT", lambda: config_to_diffusers(tiny_config(FLEX, "caption")), ["dense caption"]),
    ("diffusers from a class model", lambda: config_to_diffusers(tiny_config(conditioning="class")),
     ["dense caption"]),
]


@pytest.mark.parametrize("name, call, words", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_user_errors_name_the_problem(name, call, words):
    assert_one_line_error(call, words)
