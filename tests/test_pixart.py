"""PixArt-alpha on the FlexDiT core: parity with diffusers' PixArtTransformer2DModel, the original repository's key
names, FlexDiT conversion, caption lengths and masks, micro-conditions, errors."""
import json
from dataclasses import replace

import pytest
import torch

from flexdit.models.from_dense import flexdit_from_dense
from flexdit.models.layout import Layout
from flexdit.models.pixart import (PixArt, PixArtConfig, config_from_diffusers, config_to_diffusers, pixart_config,
                                   state_from_diffusers, state_to_diffusers)
from flexdit.nn.embed import sincos_pos_embed_2d
from flexdit.nn.pixart_blocks import CaptionCrossAttention
from flexdit.schedule import DensitySchedule, FixedGrid
from conftest import assert_one_line_error, randomize

HEADS, HEAD_DIM, SIZE, CAPTION_CH, CAPTION_LEN = 4, 12, 16, 24, 6
HIDDEN = HEADS * HEAD_DIM  # 48: divisible by 3 (micro-conditions) and 4 (positions)
FLEX = Layout.flexdit(pool=1, sdtms=1, gen=1, sparse=1, recover=1, dense=0, top=1)  # pool,gen,sparse,recover,dense
NO_POOL = Layout(("gen", "sparse", "recover", "dense"))
PAPER = DensitySchedule(0.61, 0.86)


def tiny_config(layout: Layout = Layout.dense(3), **kw) -> PixArtConfig:
    cfg = dict(input_size=(SIZE, SIZE), hidden_size=HIDDEN, num_heads=HEADS, caption_channels=CAPTION_CH,
               caption_length=CAPTION_LEN, layout=layout.kinds)
    cfg.update(kw)
    return PixArtConfig(**cfg)


def tiny_pixart(layout: Layout = Layout.dense(3), seed: int = 0, **kw) -> PixArt:
    return randomize(PixArt(tiny_config(layout, **kw)), seed).eval()


def caption_batch(batch: int, length: int = 5, seed: int = 2, pad: int = 2):
    """Captions (B, length + pad, C) whose last `pad` tokens are padding for every sample but the first,
    and the (B, length + pad) 1/0 mask."""
    g = torch.Generator().manual_seed(seed)
    caption = torch.randn(batch, length + pad, CAPTION_CH, generator=g)
    mask = torch.ones(batch, length + pad, dtype=torch.long)
    mask[1:, length:] = 0
    return caption, mask


def micro(batch: int):
    """Binned [height, width] in pixels and height / width, as the 1024-MS pipeline passes them."""
    sizes = torch.tensor([[1024.0, 1024.0], [768.0, 1344.0], [1344.0, 768.0], [896.0, 1152.0]])[:batch]
    return sizes, sizes[:, 0] / sizes[:, 1]


def latents(model: PixArt, batch: int = 3, seed: int = 1, t=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, model.in_channels, *model.config.input_size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g) if t is None else torch.as_tensor(t)
    return x, t


def run(model: PixArt, x, t, caption, mask=None, **kw):
    size_kw = dict(zip(("resolution", "aspect_ratio"), micro(x.shape[0]))) if model.config.micro_conditions else {}
    with torch.no_grad():
        return model(x, t, caption, mask, **size_kw, **kw)


# --- parity with diffusers ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def diffusers():
    return pytest.importorskip("diffusers")


def diffusers_pixart(diffusers, seed: int = 3, **kw) -> torch.nn.Module:
    cfg = dict(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4, out_channels=8, num_layers=2,
               sample_size=SIZE, patch_size=2, caption_channels=CAPTION_CH, cross_attention_dim=HIDDEN)
    cfg.update(kw)
    return randomize(diffusers.PixArtTransformer2DModel(**cfg), seed).eval()


def diffusers_forward(model, x, t, caption, mask, resolution=None, aspect_ratio=None):
    ratio = None if aspect_ratio is None else aspect_ratio[:, None]
    with torch.no_grad():
        return model(x, encoder_hidden_states=caption, timestep=t, encoder_attention_mask=mask,
                     added_cond_kwargs={"resolution": resolution, "aspect_ratio": ratio}, return_dict=False)[0]


PARITY_CASES = [  # id, diffusers config, latent (H, W), padded caption mask
    ("256-form", dict(use_additional_conditions=False, interpolation_scale=0.5), (SIZE, SIZE), True),
    ("512-form", dict(use_additional_conditions=False, interpolation_scale=1), (SIZE, SIZE), False),
    ("1024-MS", dict(use_additional_conditions=True, interpolation_scale=2), (SIZE, SIZE), True),
    ("1024-MS-aspect-bin", dict(use_additional_conditions=True, interpolation_scale=2), (SIZE, 24), True),
    ("eps-only", dict(out_channels=4, use_additional_conditions=False), (SIZE, SIZE), True),
    ("config-defaults", dict(), (SIZE, SIZE), True),  # interpolation_scale and micro-conditions derived
]


@pytest.mark.parametrize("name, config, latent, masked", PARITY_CASES, ids=[c[0] for c in PARITY_CASES])
def test_parity_with_diffusers(diffusers, name, config, latent, masked):
    theirs = diffusers_pixart(diffusers, **config)
    cfg = replace(config_from_diffusers(dict(theirs.config)), input_size=latent)
    ours = PixArt(cfg).eval()
    ours.load_state_dict(state_from_diffusers(theirs.state_dict(), cfg), strict=True)
    x, t = latents(ours, t=[0, 500, 999])
    caption, mask = caption_batch(3)
    mask = mask if masked else None
    sizes = micro(3) if cfg.micro_conditions else (None, None)
    expected = diffusers_forward(theirs, x, t, caption, mask, *sizes)
    torch.testing.assert_close(run(ours, x, t, caption, mask), expected, atol=1e-4, rtol=1e-4)


def test_round_trip_to_diffusers(diffusers):
    ours = tiny_pixart(Layout.dense(2), micro_conditions=True, interpolation_scale=2.0, learned_null_caption=False)
    theirs = diffusers.PixArtTransformer2DModel(**config_to_diffusers(ours.config)).eval()
    theirs.load_state_dict(state_to_diffusers(ours.state_dict(), ours.config), strict=True)
    x, t = latents(ours)
    caption, mask = caption_batch(3)
    expected = diffusers_forward(theirs, x, t, caption, mask, *micro(3))
    torch.testing.assert_close(run(ours, x, t, caption, mask), expected, atol=1e-4, rtol=1e-4)
    # caption_length sizes only the null caption, which diffusers does not carry
    assert config_from_diffusers(dict(theirs.config)) == replace(ours.config, caption_length=120)


@pytest.mark.parametrize("grid, base, scale", [((8, 8), 8, 0.5), ((8, 12), 8, 2.0), ((12, 8), 16, 1.0)])
def test_positions_match_diffusers(diffusers, grid, base, scale):
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    expected = get_2d_sincos_pos_embed(HIDDEN, grid, base_size=base, interpolation_scale=scale).float()
    torch.testing.assert_close(sincos_pos_embed_2d(HIDDEN, *grid, base, scale), expected, atol=1e-6, rtol=0)


# --- original PixArt-alpha names, sizes ----------------------------------------------------------------------
def original_keys(depth: int, ms: bool) -> set[str]:
    """The state-dict keys of PixArt-alpha's PixArt / PixArtMS (diffusion/model/nets), pos_embed excluded."""
    linears = ["x_embedder.proj", "t_embedder.mlp.0", "t_embedder.mlp.2", "t_block.1", "y_embedder.y_proj.fc1",
               "y_embedder.y_proj.fc2", "final_layer.linear"]
    linears += ["csize_embedder.mlp.0", "csize_embedder.mlp.2", "ar_embedder.mlp.0", "ar_embedder.mlp.2"] if ms else []
    linears += [f"blocks.{i}.{name}" for i in range(depth) for name in
                ("attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear", "cross_attn.proj",
                 "mlp.fc1", "mlp.fc2")]
    tables = [f"blocks.{i}.scale_shift_table" for i in range(depth)] + ["final_layer.scale_shift_table"]
    return {f"{m}.{p}" for m in linears for p in ("weight", "bias")} | set(tables) | {"y_embedder.y_embedding"}


@pytest.mark.parametrize("ms", [False, True])
def test_state_dict_keys_are_the_original_repositorys(ms):
    model = PixArt(tiny_config(Layout.dense(2), micro_conditions=ms))
    assert set(model.state_dict()) == original_keys(2, ms)


@pytest.mark.parametrize("image_size, latent, scale, ms, params", [
    (256, 32, 0.5, False, 610_856_096), (512, 64, 1.0, False, 610_856_096), (1024, 128, 2.0, True, 611_349_152)])
def test_factory_configs(image_size, latent, scale, ms, params):
    config = pixart_config(image_size)
    assert (config.input_size, config.interpolation_scale, config.micro_conditions) == ((latent, latent), scale, ms)
    assert (config.depth, config.hidden_size, config.num_heads, config.out_channels) == (28, 1152, 16, 8)
    assert config.base_size == latent // 2 and config.caption_length == 120 and config.caption_channels == 4096
    with torch.device("meta"):
        assert PixArt(config).num_parameters() == params  # PixArt-XL/2: 610.86 M, PixArtMS: 611.35 M


def test_factory_flexdit_layout_and_density():
    config = pixart_config(512, density=PAPER)
    assert config.layout == Layout.default_flexdit(28).kinds and config.density == PAPER.to_dict()
    assert pixart_config(256, layout="default").density == PAPER.to_dict()
    assert config.dense() == pixart_config(512)


def test_config_round_trips_through_json():
    config = tiny_config(FLEX, density=PAPER.to_dict(), micro_conditions=True, interpolation_scale=0.5, base_size=4)
    assert PixArtConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_initialisation_zeroes_caption_output_and_head_and_sets_tables():
    model = PixArt(tiny_config(FLEX, micro_conditions=True))
    for block in model.blocks:
        assert not block.cross_attn.proj.weight.any() and not block.cross_attn.proj.bias.any()
        assert block.scale_shift_table.std() > 0
    assert not model.final_layer.linear.weight.any()
    merge = model.blocks[FLEX.kinds.index("recover")].merge
    assert not merge.sparse.weight.any() and torch.equal(merge.dense.weight, torch.eye(HIDDEN))


# --- FlexDiT conversion -----------------------------------------------------------------------------------
def converted(layout: Layout, density=FixedGrid(8, 8), **kw):
    dense = tiny_pixart(Layout.dense(len(layout)), **kw)
    flex, report = flexdit_from_dense(dense, layout=layout, density=density)
    return dense, flex.eval(), report


def test_dense_layout_conversion_is_the_same_model():
    dense, flex, report = converted(Layout.dense(3), density=None, micro_conditions=True)
    assert isinstance(flex, PixArt) and report.new == []
    x, t = latents(dense)
    caption, mask = caption_batch(3)
    assert torch.equal(run(flex, x, t, caption, mask), run(dense, x, t, caption, mask))


def test_conversion_slices_qkv_and_copies_the_rest():
    dense, flex, report = converted(FLEX)
    d, f = dense.state_dict(), flex.state_dict()
    qkv = {i: (d[f"blocks.{i}.attn.qkv.weight"], d[f"blocks.{i}.attn.qkv.bias"]) for i in range(len(FLEX))}
    for i, kind in enumerate(FLEX.kinds):
        w, b = qkv[i]
        if kind == "pool":
            assert torch.equal(f[f"blocks.{i}.attn.v.weight"], w[2 * HIDDEN:])
        elif kind in ("gen", "recover"):
            assert torch.equal(f[f"blocks.{i}.attn.q.weight"], w[:HIDDEN])
            assert torch.equal(f[f"blocks.{i}.attn.kv.bias"], b[HIDDEN:])
    carried = [k for k in f if "attn." not in k or "cross_attn." in k]
    assert all(torch.equal(f[k], d[k]) for k in carried if "merge." not in k)
    recover = FLEX.kinds.index("recover")
    assert sorted(report.new) == sorted(f"blocks.{recover}.merge.{n}.{p}" for n in ("sparse", "dense")
                                        for p in ("weight", "bias"))


def test_full_grid_flexdit_equals_dense_when_merge_passes_sparse_path():
    # At the full grid pooling and upsampling are identities; with X_merged = Xs every SDTM block is its dense one.
    dense, flex, _ = converted(NO_POOL)
    merge = flex.blocks[NO_POOL.kinds.index("recover")].merge
    with torch.no_grad():
        merge.sparse.weight.copy_(torch.eye(HIDDEN))
        merge.dense.weight.zero_()
    x, t = latents(dense)
    caption, mask = caption_batch(3)
    torch.testing.assert_close(run(flex, x, t, caption, mask), run(dense, x, t, caption, mask), atol=1e-5, rtol=0)


@pytest.mark.parametrize("grid", [(1, 1), (2, 3), (4, 4), (6, 6), (8, 8)])
def test_flexdit_runs_at_each_grid(grid):
    model = tiny_pixart(FLEX, micro_conditions=True)
    x, t = latents(model)
    caption, mask = caption_batch(3)
    out = run(model, x, t, caption, mask, grid=grid)
    assert out.shape == (3, 8, SIZE, SIZE) and torch.isfinite(out).all()


def test_every_block_cross_attends_to_the_caption_at_its_token_count():
    model = tiny_pixart(FLEX)
    seen = []
    for module in model.modules():
        if isinstance(module, CaptionCrossAttention):
            module.register_forward_hook(lambda m, args, out: seen.append((args[0].shape[1], args[1].shape[1])))
    x, t = latents(model)
    run(model, x, t, *caption_batch(3, length=5), grid=(3, 3))
    assert seen == [(64, 7), (9, 7), (9, 7), (64, 7), (64, 7)]  # pool, gen, sparse, recover, dense



def test_grid_follows_the_timestep_and_groups_match_single_samples(pooled_grids):
    model = tiny_pixart(FLEX, density=PAPER.to_dict(), micro_conditions=True)
    x, t = latents(model, batch=4, t=[999, 0, 600, 0])
    caption, mask = caption_batch(4)
    batched = run(model, x, t, caption, mask)
    assert sorted(pooled_grids) == sorted(set(model.grids_for(t))) == [(3, 3), (4, 4), (5, 5)]
    sizes, ratios = micro(4)
    for i in range(4):
        with torch.no_grad():
            alone = model(x[i:i + 1], t[i:i + 1], caption[i:i + 1], mask[i:i + 1], sizes[i:i + 1], ratios[i:i + 1])
        torch.testing.assert_close(batched[i:i + 1], alone, atol=1e-5, rtol=1e-5)


# --- captions: any length, masks -------------------------------------------------------------------------
@pytest.mark.parametrize("layout", [Layout.dense(3), FLEX], ids=["dense", "flexdit"])
@pytest.mark.parametrize("length", [1, 5, 9])
def test_padding_a_caption_under_its_mask_changes_nothing(layout, length):
    model = tiny_pixart(layout, density=FixedGrid(5, 5).to_dict() if layout.has_sparse_tokens else None)
    x, t = latents(model, batch=2)
    caption = torch.randn(2, length, CAPTION_CH)
    padded = torch.cat([caption, 10 * torch.randn(2, 3, CAPTION_CH)], dim=1)  # 3 junk tokens
    mask = torch.cat([torch.ones(2, length), torch.zeros(2, 3)], dim=1)
    unpadded = run(model, x, t, caption)
    torch.testing.assert_close(run(model, x, t, padded, mask), unpadded, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(run(model, x, t, padded, mask.bool()), unpadded, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(run(model, x, t, padded), unpadded, atol=1e-3)  # without the mask the junk counts


def test_all_ones_mask_equals_no_mask():
    model = tiny_pixart()
    x, t = latents(model)
    caption, _ = caption_batch(3)
    assert torch.equal(run(model, x, t, caption, torch.ones(3, caption.shape[1])), run(model, x, t, caption))


def test_micro_conditions_change_the_output():
    model = tiny_pixart(micro_conditions=True)
    x, t = latents(model, batch=2)
    caption, mask = caption_batch(2)
    sizes = torch.tensor([[1024.0, 1024.0], [1024.0, 1024.0]])
    with torch.no_grad():
        square = model(x, t, caption, mask, sizes, torch.ones(2))
        other = model(x, t, caption, mask, sizes.flip(0) * 0.75, torch.ones(2, 1) * 0.5)
    assert not torch.allclose(square, other, atol=1e-3)


def test_null_caption_is_the_learned_buffer():
    model = tiny_pixart()
    null = model.null_caption(3)
    assert null.shape == (3, CAPTION_LEN, CAPTION_CH) and torch.equal(null[2], model.y_embedder.y_embedding)
    assert run(model, *latents(model), null).shape == (3, 8, SIZE, SIZE)


def test_gradient_reaches_every_parameter_with_checkpointing_alike():
    grads = []
    for checkpointing in (False, True):
        model = tiny_pixart(FLEX, density=FixedGrid(4, 4).to_dict(), micro_conditions=True).train()
        model.grad_checkpointing = checkpointing
        x, t = latents(model, batch=2)
        caption, mask = caption_batch(2)
        model(x, t, caption, mask, *micro(2)).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert all(g is not None and g.abs().sum() > 0 for g in grads[0].values())
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-6, rtol=1e-5)


# --- errors --------------------------------------------------------------------------------------------
def _forward(model_kw=None, x=None, t=None, caption=None, mask=None, **kw):
    def call():
        model = tiny_pixart(**(model_kw or {}))
        x_, t_ = latents(model, batch=2)
        caption_, _ = caption_batch(2)
        model(x_ if x is None else x, t_ if t is None else t, caption_ if caption is None else caption, mask, **kw)
    return call


def _state_missing_a_key(diffusers_config: dict):
    def call():
        cfg = config_from_diffusers(diffusers_config)
        state = PixArt(cfg).state_dict()
        theirs = state_to_diffusers(state, cfg)
        theirs.pop("proj_out.bias")
        state_from_diffusers(theirs, cfg)
    return call


DIFFUSERS_TINY = dict(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, num_layers=1, sample_size=SIZE,
                      caption_channels=CAPTION_CH, cross_attention_dim=HIDDEN)
ERROR_CASES = [
    ("latent size", _forward(x=torch.randn(2, 4, 8, 8)), ["input", "shape", "expected"]),
    ("t shape", _forward(t=torch.zeros(3, dtype=torch.long)), ["t must have shape"]),
    ("caption channels", _forward(caption=torch.randn(2, 5, 7)), ["caption", "T5", str(CAPTION_CH)]),
    ("caption batch", _forward(caption=torch.randn(3, 5, CAPTION_CH)), ["caption", "B=2"]),
    ("empty caption", _forward(caption=torch.randn(2, 0, CAPTION_CH)), ["caption", "L >= 1"]),
    ("mask shape", _forward(mask=torch.ones(2, 4)), ["caption_mask", "does not match"]),
    ("mask empties a sample", _forward(mask=torch.tensor([[1] * 7, [0] * 7])), ["masks every token", "sample 1"]),
    ("missing micro-conditions", _forward(dict(micro_conditions=True)), ["1024-MS", "resolution", "aspect_ratio"]),
    ("micro-condition shape", _forward(dict(micro_conditions=True), resolution=torch.ones(2, 3),
                                       aspect_ratio=torch.ones(2)), ["resolution must have shape"]),
    ("unexpected micro-conditions", _forward(resolution=torch.ones(2, 2), aspect_ratio=torch.ones(2)),
     ["no micro-conditions", "drop"]),
    ("hidden not divisible by 3", lambda: tiny_config(hidden_size=32, num_heads=4, micro_conditions=True),
     ["divisible by 3", "micro_conditions=False"]),
    ("heads", lambda: tiny_config(num_heads=5), ["not divisible by 5 heads"]),
    ("patch", lambda: tiny_config(input_size=(15, 16)), ["not divisible by patch"]),
    ("interpolation scale", lambda: tiny_config(interpolation_scale=0), ["interpolation_scale must be positive"]),
    ("unknown config key", lambda: PixArtConfig.from_dict({"hidden": 3}), ["unknown PixArtConfig keys"]),
    ("factory size", lambda: pixart_config(768), ["768", "256, 512, 1024"]),
    ("factory density on dense", lambda: pixart_config(512, layout="dense", density=PAPER), ["dense layout"]),
    ("no null caption", lambda: tiny_pixart(learned_null_caption=False).null_caption(1), ["null caption", "T5"]),
    ("diffusers norm type", lambda: config_from_diffusers({"norm_type": "ada_norm_zero"}),
     ["norm_type", "not supported"]),
    ("diffusers out channels", lambda: config_from_diffusers({**DIFFUSERS_TINY, "out_channels": 6}),
     ["out_channels 6"]),
    ("diffusers no captions", lambda: config_from_diffusers({**DIFFUSERS_TINY, "caption_channels": None}),
     ["caption_channels"]),
    ("diffusers missing weight", _state_missing_a_key(DIFFUSERS_TINY), ["missing", "proj_out.bias"]),
    ("diffusers from a FlexDiT", lambda: config_to_diffusers(tiny_config(FLEX)), ["dense", "config.dense()"]),
]


@pytest.mark.parametrize("name, call, words", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_user_errors_name_the_problem(name, call, words):
    assert_one_line_error(call, words)
