"""The DiT model class: dense and FlexDiT layouts, conversion from dense, density, guidance and errors."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import inputs, randomize, tiny_config, tiny_model
from flexdit.errors import FlexDiTError
from flexdit.models.dit import DiT, model_config
from flexdit.models.from_dense import flexdit_from_dense
from flexdit.models.layout import Layout
from flexdit.nn.attention import MeanPoolMixer
from flexdit.schedule import DensitySchedule, FixedGrid

HIDDEN = 32
# Two SDTMs in 8 blocks: pool, [gen, sparse, recover] x 2, dense.
FLEX = Layout.flexdit(pool=1, sdtms=2, gen=1, sparse=1, recover=1, dense=0, top=1)
PAPER = DensitySchedule(0.61, 0.86)


def raises(fn, match: str):
    """Assert a one-line FlexDiTError whose message contains `match`."""
    with pytest.raises(FlexDiTError, match=match) as info:
        fn()
    assert "\n" not in str(info.value)


def indices(layout: Layout, kind: str) -> list[int]:
    return [i for i, k in enumerate(layout.kinds) if k == kind]


def converted(layout: Layout = FLEX, density=PAPER, seed: int = 0, **kw):
    """A random dense tiny DiT of the layout's depth and the FlexDiT converted from it."""
    dense = tiny_model(Layout.dense(len(layout)), seed=seed, **kw)
    flex, report = flexdit_from_dense(dense, layout=layout, density=density)
    return dense, flex.eval(), report


# --- the dense layout ----------------------------------------------------------------------------
def test_dense_layout_conversion_is_the_same_model():
    dense = tiny_model(Layout.dense(4))
    same, report = flexdit_from_dense(dense, layout=Layout.dense(4))
    assert report.new == [] and report.unused == []
    assert not same.is_flexdit and same.density is None
    for (k1, v1), (k2, v2) in zip(dense.state_dict().items(), same.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    x, t, y = inputs(dense, batch=3)
    with torch.no_grad():
        assert torch.equal(dense(x, t, y), same.eval()(x, t, y))


def test_flexdit_xl_config_differs_from_dit_xl_only_in_layout_and_density():
    flex, dense = model_config("FlexDiT-XL/2").to_dict(), model_config("DiT-XL/2").to_dict()
    assert {k for k in flex if flex[k] != dense[k]} == {"layout", "density"}
    assert Layout(tuple(flex["layout"])) == Layout.parse("2+4x1-3-1-1+2")
    assert flex["density"] == {"r_min": 0.61, "r_max": 0.86} and dense["density"] is None


# --- shapes --------------------------------------------------------------------------------------
@pytest.mark.parametrize("learn_sigma, channels", [(True, 8), (False, 4)])
def test_output_shape(learn_sigma, channels):
    model = tiny_model(Layout.dense(2), learn_sigma=learn_sigma)
    x, t, y = inputs(model, batch=3)
    with torch.no_grad():
        assert model(x, t, y).shape == (3, channels, 16, 16)


@pytest.mark.parametrize("layout, density", [
    (Layout.dense(3), None),
    (FLEX, {"grid": [4, 2]}),
    (FLEX, {"r_min": 0.61, "r_max": 0.86}),
])
def test_non_square_latents(layout, density):
    # A 16x8 latent is an 8x4 token grid; sparse grids keep that aspect.
    model = tiny_model(layout, input_size=(16, 8), density=density)
    x, t, y = inputs(model, batch=3, t=[0, 500, 999])
    with torch.no_grad():
        out = model(x, t, y)
    assert out.shape == (3, 8, 16, 8) and torch.isfinite(out).all()


# --- conversion from a dense model ---------------------------------------------------------------
def test_report_new_lists_exactly_the_merge_parameters():
    _, flex, report = converted()
    expected = [f"blocks.{i}.merge.{p}" for i in indices(FLEX, "recover")
                for p in ("sparse.weight", "sparse.bias", "dense.weight", "dense.bias")]
    assert sorted(report.new) == sorted(expected)
    assert set(expected) == {k for k in flex.state_dict() if ".merge." in k}


def test_report_unused_names_q_and_k_rows_of_pool_blocks():
    _, _, report = converted()
    assert report.unused == [f"blocks.{i}.attn.qkv (q and k rows 0..{2 * HIDDEN - 1})" for i in indices(FLEX, "pool")]


def test_cross_attention_weights_are_row_slices_of_dense_qkv():
    dense, flex, _ = converted()
    C = HIDDEN
    for i in indices(FLEX, "gen") + indices(FLEX, "recover"):
        qkv, attn = dense.blocks[i].attn.qkv, flex.blocks[i].attn
        assert torch.equal(attn.q.weight, qkv.weight[:C]) and torch.equal(attn.q.bias, qkv.bias[:C])
        assert torch.equal(attn.kv.weight, qkv.weight[C:]) and torch.equal(attn.kv.bias, qkv.bias[C:])


def test_pool_value_weights_are_last_third_of_dense_qkv():
    dense, flex, _ = converted()
    for i in indices(FLEX, "pool"):
        qkv, v = dense.blocks[i].attn.qkv, flex.blocks[i].attn.v
        assert torch.equal(v.weight, qkv.weight[2 * HIDDEN:]) and torch.equal(v.bias, qkv.bias[2 * HIDDEN:])


def test_every_other_weight_is_copied():
    dense, flex, _ = converted()
    source = dense.state_dict()
    for key, value in flex.state_dict().items():
        renamed = ".attn.q." in key or ".attn.kv." in key or ".attn.v." in key or ".merge." in key
        if not renamed:
            assert torch.equal(value, source[key]), key


def test_merge_starts_at_zero_and_identity():
    _, flex, _ = converted()
    for i in indices(FLEX, "recover"):
        merge = flex.blocks[i].merge
        assert torch.equal(merge.sparse.weight, torch.zeros(HIDDEN, HIDDEN)) and not merge.sparse.bias.any()
        assert torch.equal(merge.dense.weight, torch.eye(HIDDEN)) and not merge.dense.bias.any()


# Functional checks of the initialisation at the full token grid (FixedGrid(8, 8) on the 8x8 token grid
# of a 16x16 latent, no pool blocks). Pooling and upsampling are then identities and cross-attention of
# a set of tokens to itself equals self-attention, so the generation block equals the dense block.
# The whole converted FlexDiT does NOT equal the dense model in general, whatever the SDTM shape:
# with W1 = 0, W2 = I the merge returns the SDTM's dense *input* X, so the recovery block computes
#     X + CrossAttn(q = X, kv = Xs) (+ MLP)    where the dense block computes    Xs + SelfAttn(Xs) (+ MLP),
# and Xs (the sparse path's output) differs from X as soon as the gen/sparse blocks change the tokens.
# (This holds even for [1 gen, 0 sparse, 1 recover]: the gen block's residual update is dropped.)
# What is exact: (1) the gen block equals its dense block; (2) with the merge set to pass the sparse path
# (W1 = I, W2 = 0) the whole FlexDiT equals the dense model; (3) at the merge's initialisation the FlexDiT
# equals the dense model when the SDTM's gen/sparse blocks are identities (adaLN-Zero gates at zero, as
# in a freshly initialised DiT), because then Xs = X.
FULL = FixedGrid(8, 8)
NO_POOL = Layout.flexdit(pool=0, sdtms=2, gen=1, sparse=1, recover=1, dense=1, top=0)  # 8 blocks


def test_generation_block_at_full_grid_equals_dense_block():
    dense, flex, _ = converted(NO_POOL, FULL)
    g = torch.Generator().manual_seed(4)
    x, c = torch.randn(2, 64, HIDDEN, generator=g), torch.randn(2, HIDDEN, generator=g)
    i = indices(NO_POOL, "gen")[0]
    with torch.no_grad():
        torch.testing.assert_close(flex.blocks[i](x, c, context=x), dense.blocks[i](x, c), atol=1e-5, rtol=0)


def test_full_grid_flexdit_equals_dense_when_merge_passes_sparse_path():
    dense, flex, _ = converted(NO_POOL, FULL)
    for i in indices(NO_POOL, "recover"):
        flex.blocks[i].merge.reset_to_identity()
        with torch.no_grad():  # swap W1 and W2: X_merged = Up(Xs) = Xs at the full grid
            flex.blocks[i].merge.sparse.weight.copy_(torch.eye(HIDDEN))
            flex.blocks[i].merge.dense.weight.zero_()
    x, t, y = inputs(dense, batch=3)
    with torch.no_grad():
        torch.testing.assert_close(flex(x, t, y), dense(x, t, y), atol=1e-5, rtol=0)


def test_full_grid_flexdit_at_initialisation_equals_dense_with_identity_sdtm_blocks():
    dense = tiny_model(Layout.dense(len(NO_POOL)))
    with torch.no_grad():
        for i in indices(NO_POOL, "gen") + indices(NO_POOL, "sparse"):
            dense.blocks[i].adaLN_modulation[-1].weight.zero_()  # gates 0: the block is an identity
            dense.blocks[i].adaLN_modulation[-1].bias.zero_()
    flex, _ = flexdit_from_dense(dense, layout=NO_POOL, density=FULL)
    x, t, y = inputs(dense, batch=3)
    with torch.no_grad():
        torch.testing.assert_close(flex.eval()(x, t, y), dense(x, t, y), atol=1e-5, rtol=0)


def test_merge_returns_dense_input_at_initialisation():
    _, flex, _ = converted()
    seen = []
    for i in indices(FLEX, "recover"):
        flex.blocks[i].merge.register_forward_hook(lambda m, args, out: seen.append((args[1], out)))
    x, t, y = inputs(flex, batch=2, t=[0, 0])
    with torch.no_grad():
        flex(x, t, y)
    assert len(seen) == FLEX.num_sdtms
    for dense_input, merged in seen:
        torch.testing.assert_close(merged, dense_input, atol=1e-6, rtol=0)


# --- the Poolingformer mixer ---------------------------------------------------------------------
def uniform_attention_reference(mixer: MeanPoolMixer, x: torch.Tensor) -> torch.Tensor:
    """What the authors' code computes: an explicit N x N uniform attention matrix over V, then proj."""
    N = x.shape[1]
    weights = torch.full((N, N), 1.0 / N)
    return mixer.proj(weights @ mixer.v(x))


def test_pool_mixer_equals_uniform_attention():
    mixer = randomize(MeanPoolMixer(HIDDEN))
    x = torch.randn(2, 37, HIDDEN)
    with torch.no_grad():
        out = mixer(x)  # one (B, 1, C) row that the block broadcasts to every token
        assert out.shape == (2, 1, HIDDEN)
        torch.testing.assert_close(out.expand(2, 37, HIDDEN), uniform_attention_reference(mixer, x), atol=1e-5, rtol=0)


class MaxNumel(TorchDispatchMode):
    """Records the largest tensor any operation produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor):
                self.largest = max(self.largest, o.numel())
        return out


def test_pool_mixer_is_linear_in_tokens():
    # 16384 tokens: an N x N matrix would hold 2^28 numbers. The input tiles a small one, so the mean
    # (and the output of every token) equals the reference computed on the small input.
    mixer = randomize(MeanPoolMixer(HIDDEN))
    small = torch.randn(1, 16, HIDDEN)
    large = small.repeat(1, 1024, 1)
    N = large.shape[1]
    with torch.no_grad(), MaxNumel() as probe:
        out = mixer(large)
    assert probe.largest <= N * HIDDEN < N * N
    with torch.no_grad():
        ref = uniform_attention_reference(mixer, small)
    torch.testing.assert_close(out.expand(1, N, HIDDEN), ref.repeat(1, 1024, 1), atol=1e-5, rtol=0)


# --- density follows the timestep ----------------------------------------------------------------
ONE_SDTM = Layout.flexdit(pool=1, sdtms=1, gen=1, sparse=1, recover=1, dense=1, top=0)  # pool_tokens once per pass



def scheduled_model(**kw) -> DiT:
    # 32x32 latent, patch 2: a 16x16 token grid, the paper's 256 px setting.
    return tiny_model(ONE_SDTM, input_size=(32, 32), density=PAPER.to_dict(), **kw)


@pytest.mark.parametrize("t, side", [(0, 10), (600, 8), (999, 6)])
def test_grid_follows_density(pooled_grids, t, side):
    model = scheduled_model()
    x, t_, y = inputs(model, batch=1, t=[t])
    with torch.no_grad():
        model(x, t_, y)
    assert pooled_grids == [PAPER.grid(t, (16, 16))] == [(side, side)]


def test_mixed_timesteps_run_as_groups_and_match_single_samples(pooled_grids):
    model = scheduled_model()
    x, t, y = inputs(model, batch=4, t=[999, 0, 600, 0])
    with torch.no_grad():
        batched = model(x, t, y)
        assert sorted(pooled_grids) == [(6, 6), (8, 8), (10, 10)]  # one pass per distinct grid
        for i in range(4):
            alone = model(x[i:i + 1], t[i:i + 1], y[i:i + 1])
            torch.testing.assert_close(batched[i:i + 1], alone, atol=1e-5, rtol=0)


def test_grid_argument_overrides_schedule(pooled_grids):
    model = scheduled_model()
    x, t, y = inputs(model, batch=2, t=[0, 999])
    with torch.no_grad():
        model(x, t, y, grid=(4, 3))
    assert pooled_grids == [(4, 3)]


@pytest.mark.parametrize("grid", [(9, 9), (8, 20), (0, 4)])
def test_error_grid_argument_must_fit_token_grid(grid):
    # grid= is user input like FixedGrid: a sparse grid larger than the 8x8 token grid (or empty) is an error,
    # not a silent upsampling "sparse" pass or a raw torch RuntimeError.
    model = tiny_model(ONE_SDTM, density=PAPER.to_dict())
    x, t, y = inputs(model, batch=2)
    with torch.no_grad():
        raises(lambda: model(x, t, y, grid=grid), "grid")


def test_flexdit_without_density_needs_grid():
    model = tiny_model(ONE_SDTM, density=None)
    x, t, y = inputs(model, batch=2)
    raises(lambda: model(x, t, y), "no density schedule")
    with torch.no_grad():
        assert model(x, t, y, grid=(4, 4)).shape == (2, 8, 16, 16)


# --- classifier-free guidance --------------------------------------------------------------------
def cfg_setup(**kw):
    model = tiny_model(FLEX, density=PAPER.to_dict(), **kw)
    x, t, y = inputs(model, batch=2, t=[0, 700])
    null = torch.full_like(y, model.config.num_classes)
    with torch.no_grad():
        cond, uncond = model(x, t, y), model(x, t, null)
    both = (torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
    return model, both, cond, uncond


def test_cfg_guides_first_three_channels_only():
    model, (x, t, y), cond, uncond = cfg_setup()
    with torch.no_grad():
        out = model.forward_with_cfg(x, t, y, cfg_scale=4.0, guided_channels=3)
    guided = uncond[:, :3] + 4.0 * (cond[:, :3] - uncond[:, :3])  # atol 1e-4: the scale amplifies float error
    torch.testing.assert_close(out[:2, :3], guided, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out[2:, :3], guided, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out[:2, 3:], cond[:, 3:], atol=1e-5, rtol=0)  # channel 3 and variances: raw
    torch.testing.assert_close(out[2:, 3:], uncond[:, 3:], atol=1e-5, rtol=0)


def test_cfg_all_noise_channels_never_variance():
    model, (x, t, y), cond, uncond = cfg_setup()
    with torch.no_grad():
        out = model.forward_with_cfg(x, t, y, cfg_scale=4.0, guided_channels=None)
    guided = uncond[:, :4] + 4.0 * (cond[:, :4] - uncond[:, :4])
    torch.testing.assert_close(out[:2, :4], guided, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out[:2, 4:], cond[:, 4:], atol=1e-5, rtol=0)


def test_cfg_without_learned_sigma_guides_every_channel():
    model, (x, t, y), cond, uncond = cfg_setup(learn_sigma=False)
    with torch.no_grad():
        out = model.forward_with_cfg(x, t, y, cfg_scale=2.0, guided_channels=None)
    assert out.shape == (4, 4, 16, 16)
    torch.testing.assert_close(out[:2], uncond + 2.0 * (cond - uncond), atol=1e-4, rtol=1e-5)


def test_cfg_scale_one_is_conditional_output():
    model, (x, t, y), cond, _ = cfg_setup()
    with torch.no_grad():
        out = model.forward_with_cfg(x, t, y, cfg_scale=1.0)
    torch.testing.assert_close(out[:2], cond, atol=1e-5, rtol=0)


def test_cfg_needs_null_class():
    model = tiny_model(Layout.dense(2), class_dropout_prob=0.0)
    x, t, y = inputs(model, batch=2)
    raises(lambda: model.forward_with_cfg(x, t, y, cfg_scale=1.5), "null class")


def test_cfg_needs_even_batch():
    model = tiny_model(Layout.dense(2))
    x, t, y = inputs(model, batch=3)
    raises(lambda: model.forward_with_cfg(x, t, y, cfg_scale=1.5), "even batch")


# --- user errors ---------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 3, 16, 16), (2, 4, 16, 8), (2, 4, 16), (4, 16, 16)])
def test_error_wrong_input_shape(shape):
    model = tiny_model(Layout.dense(2))
    _, t, y = inputs(model, batch=2)
    raises(lambda: model(torch.randn(shape), t, y), "does not fit the model")


@pytest.mark.parametrize("t_shape, y_shape", [((3,), (2,)), ((2,), (2, 1)), ((), (2,))])
def test_error_wrong_t_or_y_shape(t_shape, y_shape):
    model = tiny_model(Layout.dense(2))
    x, _, _ = inputs(model, batch=2)
    t, y = torch.zeros(t_shape, dtype=torch.long), torch.zeros(y_shape, dtype=torch.long)
    raises(lambda: model(x, t, y), "t and y must have shape")


@pytest.mark.parametrize("dropout, label", [(0.1, 11), (0.1, -1), (0.0, 10)])
def test_error_class_id_out_of_range(dropout, label):
    # With dropout > 0 id 10 is the null class and valid; without a null class it is out of range.
    model = tiny_model(Layout.dense(2), class_dropout_prob=dropout)
    x, t, _ = inputs(model, batch=2)
    raises(lambda: model(x, t, torch.tensor([0, label])), "class ids must lie in 0..")


def test_null_class_is_valid_with_dropout():
    model = tiny_model(Layout.dense(2), class_dropout_prob=0.1)
    x, t, _ = inputs(model, batch=2)
    with torch.no_grad():
        assert torch.isfinite(model(x, t, torch.tensor([10, 10]))).all()


@pytest.mark.parametrize("bad_t", [1000, -1])
def test_error_timestep_out_of_range_on_flexdit(bad_t):
    model = tiny_model(ONE_SDTM, density=PAPER.to_dict())
    x, _, y = inputs(model, batch=2)
    raises(lambda: model(x, torch.tensor([0, bad_t]), y), "timesteps must lie in 0..999")


def test_error_input_size_not_divisible_by_patch():
    raises(lambda: tiny_config(input_size=(15, 16)), "not divisible by patch size 2")


def test_error_hidden_not_divisible_by_heads():
    raises(lambda: tiny_config(hidden_size=36, num_heads=5), "not divisible by 5 heads")


def test_error_converting_a_flexdit():
    _, flex, _ = converted()
    raises(lambda: flexdit_from_dense(flex, layout=FLEX), "already a FlexDiT")


def test_error_conversion_layout_depth_mismatch():
    raises(lambda: flexdit_from_dense(tiny_model(Layout.dense(4)), layout=FLEX), "blocks but the dense model has 4")


# --- training and numerics -----------------------------------------------------------------------
def test_gradient_reaches_every_parameter():
    model = tiny_model(FLEX, density=PAPER.to_dict()).train()
    x, t, y = inputs(model, batch=2, t=[100, 900])
    model(x, t, y).square().mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    zero_grad = [n for n, p in model.named_parameters() if p.grad is not None and not p.grad.any()]
    assert no_grad == [] and zero_grad == []


def test_same_seed_same_model_and_outputs():
    config = tiny_config(FLEX, density=PAPER.to_dict())
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        model = randomize(DiT(config), seed=5).eval()
        x, t, y = inputs(model, batch=3, seed=9)
        with torch.no_grad():
            outs.append(model(x, t, y))
    assert torch.equal(*outs)


def test_same_seed_same_initialisation():
    config = tiny_config(FLEX, density=PAPER.to_dict())
    states = []
    for _ in range(2):
        torch.manual_seed(7)
        states.append(DiT(config).state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_runs_under_bfloat16_autocast():
    model = tiny_model(FLEX, density=PAPER.to_dict())
    x, t, y = inputs(model, batch=2, t=[0, 999])
    with torch.no_grad():
        ref = model(x, t, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t, y)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert (out.float() - ref).norm() / ref.norm() < 0.1  # bf16 has ~3 significant digits


def test_a_dense_name_given_a_density_is_its_flexdit():
    from flexdit.schedule import DensitySchedule

    with_density = model_config("DiT-XL/2", density=DensitySchedule(0.5, 0.9))
    assert with_density.layout == model_config("FlexDiT-XL/2").layout
    assert with_density.density == {"r_min": 0.5, "r_max": 0.9}
    with pytest.raises(FlexDiTError, match="density or grid was given for the dense layout"):
        model_config("DiT-XL/2", layout="dense", density=DensitySchedule(0.5, 0.9))  # not silently dropped
