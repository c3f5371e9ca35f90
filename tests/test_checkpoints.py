"""Checkpoints: every source format flexdit reads, our own format, conversion on load, and the error paths.

Every source file is written here by the test itself (no flexdit code writes it), and the loaded model is
checked against an independent forward pass: the source model itself (DiT, diffusers), or a reference
written below from the SparseDiT authors' code structure (plain functions over their key layout).
"""
import argparse
import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import save_file

import flexdit
import flexdit.checkpoints as ckpt
import flexdit.io
from flexdit import DensitySchedule, FixedGrid, FlexDiTError, Layout
from flexdit.cli import main
from flexdit.models.dit import DiT
from flexdit.models.from_dense import flexdit_from_dense
from flexdit.training.trainer import CHECKPOINT_VERSION, load_training_checkpoint, save_checkpoint

from conftest import inputs, randomize, tiny_model

HEADS = 4  # hidden 32 is not a standard DiT size, so files without a config need num_heads=4
D, MLP_HIDDEN, C_IN, PATCH, CLASSES, TOKENS = 32, 128, 4, 2, 10, 64  # the tiny config: 16x16 latent, 8x8 tokens


# --- helpers: comparing models ---------------------------------------------------------------------------
def run(model, batch: int = 3, t=None) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs(model, batch=batch, t=t))


def assert_same_state(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def assert_same_model(a: DiT, b: DiT) -> None:
    """Bit-identical: every tensor, the config, the density and the outputs."""
    assert a.config.to_dict() == b.config.to_dict()
    assert a.density == b.density
    assert_same_state(a.state_dict(), b.state_dict())
    t = [0, 300, 700, 999]  # several timesteps, so a DensitySchedule runs more than one grid
    assert torch.equal(run(a, batch=4, t=t), run(b, batch=4, t=t))


def load_error(path, match: str, **overrides) -> FlexDiTError:
    """flexdit.load must fail with a one-line FlexDiTError matching `match`."""
    with pytest.raises(FlexDiTError, match=match) as e:
        flexdit.load(path, **overrides)
    assert "\n" not in str(e.value)
    return e.value


# --- helpers: writing the original DiT layout (facebookresearch/DiT) ---------------------------------
def save_pt(obj, path: Path) -> Path:
    torch.save(obj, path)
    return path


def training_checkpoint(model_sd: dict, ema_sd: dict) -> dict:
    """What DiT's (and the SparseDiT authors') train.py writes: weights, EMA, optimizer state and args."""
    opt = {"state": {0: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(3)}},
           "param_groups": [{"lr": 1e-4, "weight_decay": 0.0, "params": [0]}]}
    return {"model": model_sd, "ema": ema_sd, "opt": opt, "args": argparse.Namespace(model="DiT-XL/2")}


def dit_file(tmp_path: Path, model: DiT | None = None) -> Path:
    return save_pt((model or tiny_model()).state_dict(), tmp_path / "dit.pt")


# --- helpers: the SparseDiT authors' layout and an independent reference forward pass ---------------
# A structure is (poolingformer blocks, dumbbells, dumbbell_group [merge, semantic, recover, normal], top normal).
MAIN = (2, 2, (1, 2, 1, 1), 1)
TWO_MERGES = (2, 2, (2, 1, 1, 0), 1)


def sparsedit_state(structure=MAIN, seed: int = 0) -> dict:
    """Random non-zero weights for every tensor of the authors' module tree (merged_layer1 included)."""
    pool, dumbbells, (merge, semantic, recover, normal), top = structure
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def tensor(name, *shape):
        sd[name] = torch.randn(*shape, generator=g) * 0.2

    def linear(name, out_features, in_features):
        tensor(f"{name}.weight", out_features, in_features)
        tensor(f"{name}.bias", out_features)

    def block(prefix, mixer):
        if mixer == "pool":
            linear(prefix + "attn.v", D, D)
        elif mixer == "cross":
            linear(prefix + "attn.q", D, D)
            linear(prefix + "attn.kv", 2 * D, D)
        else:
            linear(prefix + "attn.qkv", 3 * D, D)
        linear(prefix + "attn.proj", D, D)
        linear(prefix + "mlp.fc1", MLP_HIDDEN, D)
        linear(prefix + "mlp.fc2", D, MLP_HIDDEN)
        linear(prefix + "adaLN_modulation.1", 6 * D, D)

    tensor("x_embedder.proj.weight", D, C_IN, PATCH, PATCH)
    tensor("x_embedder.proj.bias", D)
    linear("t_embedder.mlp.0", D, 256)
    linear("t_embedder.mlp.2", D, D)
    tensor("y_embedder.embedding_table.weight", CLASSES + 1, D)  # + the null class
    tensor("pos_embed", 1, TOKENS, D)
    for i in range(pool):
        block(f"poolingformer_blocks.{i}.", "pool")
    for d in range(dumbbells):
        p = f"dumbbell_blocks.{d}."
        for j in range(merge):
            block(f"{p}token_merge_blocks.{j}.", "cross")
        for j in range(semantic):
            block(f"{p}semantic_blocks.{j}.", "self")
        for j in range(recover):
            block(f"{p}token_recover_blocks.{j}.", "cross")
            linear(f"{p}token_recover_blocks.{j}.merged_layer1", D, D)
            linear(f"{p}token_recover_blocks.{j}.merged_layer2", D, D)
        for j in range(normal):
            block(f"{p}normal_blocks.{j}.", "self")
    for i in range(top):
        block(f"normal_blocks.{i}.", "self")
    linear("final_layer.linear", PATCH * PATCH * 2 * C_IN, D)
    linear("final_layer.adaLN_modulation.1", 2 * D, D)
    return sd


def sparsedit_file(tmp_path: Path, sd: dict, name: str = "sparsedit.pt") -> Path:
    # The authors' train.py wraps weights like DiT's, with an argparse.Namespace under "args".
    return save_pt({"model": sd, "ema": sd, "opt": {}, "args": argparse.Namespace(model="DiT-XL/2")},
                   tmp_path / name)


def sparsedit_kinds(structure) -> tuple[str, ...]:
    pool, dumbbells, (merge, semantic, recover, normal), top = structure
    sdtm = ("gen",) * merge + ("sparse",) * semantic + ("recover",) * recover + ("dense",) * normal
    return ("pool",) * pool + sdtm * dumbbells + ("dense",) * top


def reference_sparsedit(sd: dict, structure, x, t, y, heads: int, semantic_size: int) -> torch.Tensor:
    """The authors' forward pass, written from their code's structure (no flexdit.nn)."""
    pool, dumbbells, (merge, semantic, recover, normal), top = structure
    B = x.shape[0]

    def linear(name, v):
        return F.linear(v, sd[f"{name}.weight"], sd[f"{name}.bias"])

    def modulate(v, shift, scale):
        return F.layer_norm(v, v.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]

    def attention(q, k, v):  # multi-head softmax(q k^T / sqrt(head_dim)) v, (B, N, C) x (B, M, C)
        hd = q.shape[-1] // heads
        q, k, v = (a.reshape(B, a.shape[1], heads, hd).permute(0, 2, 1, 3) for a in (q, k, v))
        w = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(hd), dim=-1)
        return (w @ v).permute(0, 2, 1, 3).reshape(B, -1, heads * hd)

    def block(p, base, c, mixer):
        """adaLN-Zero: base + gate_msa * mixer(modulate_msa), then + gate_mlp * mlp(modulate_mlp)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = linear(
            p + "adaLN_modulation.1", F.silu(c)).chunk(6, dim=1)
        h = base + gate_msa[:, None] * mixer(lambda v: modulate(v, shift_msa, scale_msa))
        hidden = F.gelu(linear(p + "mlp.fc1", modulate(h, shift_mlp, scale_mlp)), approximate="tanh")
        mlp = linear(p + "mlp.fc2", hidden)
        return h + gate_mlp[:, None] * mlp

    def dit_block(p, h, c):
        return block(p, h, c, lambda mod: linear(p + "attn.proj",
                                                  attention(*linear(p + "attn.qkv", mod(h)).chunk(3, -1))))

    def cross_block(p, base, kv_source, c):  # queries from base, keys/values from kv_source, both modulated
        return block(p, base, c, lambda mod: linear(p + "attn.proj", attention(
            linear(p + "attn.q", mod(base)), *linear(p + "attn.kv", mod(kv_source)).chunk(2, -1))))

    def pooling_block(p, h, c):
        def mixer(mod):  # the authors' uniform N x N attention (exactly the mean of V)
            v = linear(p + "attn.v", mod(h))
            uniform = torch.softmax(torch.ones(B, h.shape[1], h.shape[1]), dim=-1)
            return linear(p + "attn.proj", uniform @ v)
        return block(p, h, c, mixer)

    def to_map(v):
        side = math.isqrt(v.shape[1])
        return v.reshape(B, side, side, -1).permute(0, 3, 1, 2)

    def to_tokens(m):
        return m.permute(0, 2, 3, 1).reshape(B, -1, m.shape[1])

    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=PATCH)
    h = h.flatten(2).transpose(1, 2) + sd["pos_embed"]
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    args = t[:, None].float() * freqs[None]
    t_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    t_emb = linear("t_embedder.mlp.2", F.silu(linear("t_embedder.mlp.0", t_freq)))
    c = t_emb + sd["y_embedder.embedding_table.weight"][y]

    for i in range(pool):
        h = pooling_block(f"poolingformer_blocks.{i}.", h, c)
    for d in range(dumbbells):
        p = f"dumbbell_blocks.{d}."
        dense = h
        h = to_tokens(F.adaptive_avg_pool2d(to_map(h), semantic_size))
        for j in range(merge):
            h = cross_block(f"{p}token_merge_blocks.{j}.", h, dense, c)
        for j in range(semantic):
            h = dit_block(f"{p}semantic_blocks.{j}.", h, c)
        for j in range(recover):
            q = f"{p}token_recover_blocks.{j}."
            up = to_tokens(F.interpolate(to_map(h), size=(math.isqrt(TOKENS),) * 2, mode="nearest"))
            merged = linear(q + "merged_layer1", up) + linear(q + "merged_layer2", dense)
            h = cross_block(q, merged, h, c)
        for j in range(normal):
            h = dit_block(f"{p}normal_blocks.{j}.", h, c)
    for i in range(top):
        h = dit_block(f"normal_blocks.{i}.", h, c)

    shift, scale = linear("final_layer.adaLN_modulation.1", F.silu(c)).chunk(2, dim=1)
    out = linear("final_layer.linear", modulate(h, shift, scale))
    side, oc = math.isqrt(TOKENS), 2 * C_IN
    out = torch.einsum("nhwpqc->nchpwq", out.reshape(B, side, side, PATCH, PATCH, oc))
    return out.reshape(B, oc, side * PATCH, side * PATCH)


# --- helpers: diffusers ------------------------------------------------------------------------------
def diffusers_dit(seed: int = 3):
    """A random DiTTransformer2DModel whose per-block embedders are copies of block 0's (as converted DiT is)."""
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel(num_attention_heads=HEADS, attention_head_dim=D // HEADS, in_channels=C_IN,
                                  out_channels=2 * C_IN, num_layers=3, sample_size=16, patch_size=PATCH,
                                  norm_eps=1e-6, num_embeds_ada_norm=CLASSES)
    randomize(model, seed)
    shared = model.transformer_blocks[0].norm1.emb.state_dict()
    for block in model.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(shared)
    return model.eval()


def diffusers_output(model, x, t, y) -> torch.Tensor:
    with torch.no_grad():
        return model(x, timestep=t, class_labels=y).sample


def diffusers_state_file(tmp_path: Path, state: dict) -> Path:
    path = tmp_path / "diffusers_state.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


# --- every source format, as (path, load overrides), for the round-trip test -------------------------
def _src_dit(tmp):
    return dit_file(tmp), {"num_heads": HEADS}


def _src_dit_training(tmp):
    return save_pt(training_checkpoint(tiny_model(seed=1).state_dict(), tiny_model(seed=0).state_dict()),
                   tmp / "train.pt"), {"num_heads": HEADS}


def _src_dit_ddp(tmp):
    ddp = {f"module.{k}": v for k, v in tiny_model().state_dict().items()}
    return save_pt(ddp, tmp / "ddp.pt"), {"num_heads": HEADS}


def _src_dit_no_sigma(tmp):
    return dit_file(tmp, tiny_model(learn_sigma=False)), {"num_heads": HEADS}


def _src_dit_safetensors(tmp):
    path = tmp / "dit.safetensors"
    save_file(tiny_model().state_dict(), str(path))
    return path, {"num_heads": HEADS}


def _src_dit_converted(tmp):
    return dit_file(tmp), {"num_heads": HEADS, "layout": "2+1x1-1-1-1+0", "density": "0.61,0.86"}


def _src_sparsedit(tmp):
    return sparsedit_file(tmp, sparsedit_state(MAIN)), {"num_heads": HEADS, "sparse_grid": 4}


def _src_sparsedit_two_merges(tmp):
    return sparsedit_file(tmp, sparsedit_state(TWO_MERGES)), {"num_heads": HEADS, "sparse_grid": 4}


def _src_diffusers_folder(tmp):
    diffusers_dit().save_pretrained(tmp / "dit")
    return tmp / "dit", {"timestep_freq_shift": 1}


def _src_diffusers_pipeline(tmp):
    diffusers_dit().save_pretrained(tmp / "pipe" / "transformer")
    return tmp / "pipe", {"timestep_freq_shift": 1}


def _src_diffusers_state(tmp):
    return diffusers_state_file(tmp, diffusers_dit().state_dict()), {"input_size": 16, "num_heads": HEADS,
                                                                     "timestep_freq_shift": 1}


SOURCES = {
    "dit": _src_dit, "dit-training": _src_dit_training, "dit-ddp": _src_dit_ddp, "dit-no-sigma": _src_dit_no_sigma,
    "dit-safetensors": _src_dit_safetensors, "dit-converted-on-load": _src_dit_converted,
    "sparsedit": _src_sparsedit, "sparsedit-two-merges": _src_sparsedit_two_merges,
    "diffusers-folder": _src_diffusers_folder, "diffusers-pipeline": _src_diffusers_pipeline,
    "diffusers-state-dict": _src_diffusers_state,
}


# === 1. original DiT key layout =========================================================================
def test_dit_bare_state_dict_loads_exactly(tmp_path):
    source = tiny_model()
    loaded = flexdit.load(dit_file(tmp_path, source), num_heads=HEADS)
    c = loaded.config
    # Shape inference: hidden, depth, patch, channels, sigma; 11 table rows = 10 classes + the null class.
    inferred = (c.hidden_size, c.depth, c.patch_size, c.in_channels, c.learn_sigma, c.num_classes)
    assert inferred == (32, 6, 2, 4, True, 10)
    assert c.input_size == (16, 16) and loaded.has_null_class and loaded.layout.is_dense
    assert c.to_dict() == source.config.to_dict()
    assert torch.equal(run(loaded), run(source))


def test_dit_training_checkpoint_defaults_to_ema(tmp_path):
    ema, raw = tiny_model(seed=0), tiny_model(seed=1)
    path = save_pt(training_checkpoint(raw.state_dict(), ema.state_dict()), tmp_path / "0100000.pt")
    assert torch.equal(run(flexdit.load(path, num_heads=HEADS)), run(ema))  # EMA weights are the ones to sample with
    assert torch.equal(run(flexdit.load(path, num_heads=HEADS, weights="model")), run(raw))
    assert torch.equal(run(flexdit.load(path, num_heads=HEADS, weights="ema")), run(ema))


def test_dit_ddp_prefix_is_dropped(tmp_path):
    source = tiny_model()
    path = save_pt({f"module.{k}": v for k, v in source.state_dict().items()}, tmp_path / "ddp.pt")
    assert torch.equal(run(flexdit.load(path, num_heads=HEADS)), run(source))


def test_dit_without_learned_sigma(tmp_path):
    source = tiny_model(learn_sigma=False)
    loaded = flexdit.load(dit_file(tmp_path, source), num_heads=HEADS)
    assert not loaded.config.learn_sigma and loaded.out_channels == 4
    assert torch.equal(run(loaded), run(source))


def test_dit_nonstandard_hidden_size_needs_num_heads(tmp_path):
    path = dit_file(tmp_path)
    load_error(path, "num_heads")  # hidden 32 is no standard DiT size: heads cannot be inferred
    assert flexdit.load(path, num_heads=4).config.num_heads == 4


def test_dit_safetensors_file(tmp_path):
    source = tiny_model()
    path = tmp_path / "dit.safetensors"
    save_file(source.state_dict(), str(path))
    loaded = flexdit.load_checkpoint(path, num_heads=HEADS)
    assert loaded.format == "dit"
    assert torch.equal(run(loaded.model), run(source))


# === 2. SparseDiT authors' key layout ===================================================================
@pytest.mark.parametrize("structure, spec", [(MAIN, "2+2x1-2-1-1+1"), (TWO_MERGES, "2+2x2-1-1-0+1")],
                         ids=["main", "two-merges"])
def test_sparsedit_matches_reference(tmp_path, structure, spec):
    sd = sparsedit_state(structure)
    loaded = flexdit.load_checkpoint(sparsedit_file(tmp_path, sd), sparse_grid=4, num_heads=HEADS)
    model = loaded.model
    assert loaded.format == "sparsedit"
    assert str(model.layout) == spec and model.layout.kinds == sparsedit_kinds(structure)
    assert model.density == FixedGrid(4, 4)
    for t in ([0, 999], [250, 500], [1, 998]):
        x, t, y = inputs(model, batch=2, t=t)
        with torch.no_grad():
            out = model(x, t, y)
            ref = reference_sparsedit(sd, structure, x, t, y, HEADS, semantic_size=4)
        assert out.shape == (2, 8, 16, 16)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_sparsedit_default_grid_is_8(tmp_path):
    sd = sparsedit_state(MAIN)
    model = flexdit.load(sparsedit_file(tmp_path, sd), num_heads=HEADS)
    assert model.density == FixedGrid(8, 8)  # the released code's fixed semantic_size
    x, t, y = inputs(model, batch=2)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), reference_sparsedit(sd, MAIN, x, t, y, HEADS, semantic_size=8),
                                   rtol=1e-5, atol=1e-5)


def test_sparsedit_relative_position_bias_is_refused(tmp_path):
    sd = sparsedit_state(MAIN)
    sd["relative_pos_embedder.0.relative_position_bias_table"] = torch.randn(228, HEADS)
    load_error(sparsedit_file(tmp_path, sd), "relative position", num_heads=HEADS)


# === 3. diffusers DiTTransformer2DModel ==================================================================
def test_diffusers_folder_matches_diffusers(tmp_path):
    source = diffusers_dit()
    source.save_pretrained(tmp_path / "dit")
    loaded = flexdit.load_checkpoint(tmp_path / "dit", timestep_freq_shift=1)
    assert loaded.format == "diffusers" and loaded.model.config.num_heads == HEADS
    x, t, y = inputs(loaded.model, batch=3, t=[0, 500, 999])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x, t, y), diffusers_output(source, x, t, y), rtol=1e-5, atol=1e-5)


def test_diffusers_pipeline_folder(tmp_path):
    source = diffusers_dit()
    source.save_pretrained(tmp_path / "pipe" / "transformer")  # as DiTPipeline.save_pretrained lays it out
    model = flexdit.load(tmp_path / "pipe", timestep_freq_shift=1)
    x, t, y = inputs(model, batch=2)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), diffusers_output(source, x, t, y), rtol=1e-5, atol=1e-5)


def test_diffusers_bare_state_dict_needs_input_size(tmp_path):
    source = diffusers_dit()
    path = diffusers_state_file(tmp_path, source.state_dict())
    load_error(path, "input_size", num_heads=HEADS)  # no config.json: the latent size is not recorded
    model = flexdit.load(path, input_size=16, num_heads=HEADS, timestep_freq_shift=1)
    x, t, y = inputs(model, batch=2)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), diffusers_output(source, x, t, y), rtol=1e-5, atol=1e-5)


def test_diffusers_differing_block_embedders_are_refused(tmp_path):
    state = dict(diffusers_dit().state_dict())
    key = "transformer_blocks.2.norm1.emb.timestep_embedder.linear_1.weight"
    state[key] = state[key] + 1.0  # a DiT shares one embedder; this model would need per-block ones
    load_error(diffusers_state_file(tmp_path, state), "differ", input_size=16, num_heads=HEADS)


# === 4. our format ===================================================================================
@pytest.mark.parametrize("layout, density", [
    (Layout.dense(6), None),
    (Layout.parse("2+1x1-1-1-1+0"), DensitySchedule(0.3, 0.8)),
    (Layout.parse("1+1x2-1-1-0+1"), FixedGrid(4, 4)),
], ids=["dense", "density-schedule", "fixed-grid"])
def test_save_then_load_is_exact(tmp_path, layout, density):
    source = tiny_model(layout, density=density.to_dict() if density else None)
    source.save(tmp_path / "m.safetensors")
    loaded = flexdit.load_checkpoint(tmp_path / "m.safetensors")
    assert loaded.format == "flexdit"
    assert_same_model(loaded.model, source)


@pytest.mark.parametrize("source", list(SOURCES))
def test_every_format_survives_a_round_trip_through_ours(tmp_path, source):
    path, overrides = SOURCES[source](tmp_path)
    first = flexdit.load(path, **overrides)
    flexdit.save_model(first, tmp_path / "ours.safetensors")
    assert_same_model(flexdit.load(tmp_path / "ours.safetensors"), first)


# The file's content says what it is, never its name: flexdit reads back everything it writes.
NAMES = ["out", "out.pt", "X.SAFETENSORS", "model.bin"]


@pytest.mark.parametrize("name", NAMES)
def test_saved_model_reads_back_whatever_its_name(tmp_path, name):
    source = tiny_model(Layout.parse("2+1x1-1-1-1+0"), density=DensitySchedule(0.3, 0.8).to_dict())
    source.save(tmp_path / name)
    loaded = flexdit.load_checkpoint(tmp_path / name)
    assert loaded.format == "flexdit"
    assert_same_model(loaded.model, source)


@pytest.mark.parametrize("name", NAMES)
def test_training_checkpoint_reads_back_whatever_its_name(tmp_path, name):
    ema, raw = tiny_model(seed=0), tiny_model(seed=1)
    state = {"version": CHECKPOINT_VERSION, "step": 7, "model": raw.state_dict(), "ema": ema.state_dict(),
             "model_config": json.dumps(ema.config.to_dict())}
    save_checkpoint(tmp_path / name, state)
    assert load_training_checkpoint(tmp_path / name)["step"] == 7  # what --resume reads
    assert flexdit.load_checkpoint(tmp_path / name).format == "flexdit"
    assert_same_model(flexdit.load(tmp_path / name), ema)
    assert_same_model(flexdit.load(tmp_path / name, weights="model"), raw)


@pytest.mark.parametrize("name, write", [
    ("dit.safetensors", lambda sd, path: torch.save(sd, path)),
    ("dit.pt", lambda sd, path: save_file(sd, str(path))),
    ("dit.safetensors", lambda sd, path: torch.save(sd, path, _use_new_zipfile_serialization=False)),
], ids=["torch-zip-named-safetensors", "safetensors-named-pt", "legacy-pickle-named-safetensors"])
def test_foreign_file_is_told_by_its_content(tmp_path, name, write):
    source = tiny_model()
    write(source.state_dict(), tmp_path / name)
    assert torch.equal(run(flexdit.load(tmp_path / name, num_heads=HEADS)), run(source))


def test_cli_reads_back_what_it_writes_whatever_its_name(capsys, tmp_path):
    source = tiny_model(Layout.dense(12))
    main(["convert", str(dit_file(tmp_path, source)), str(tmp_path / "out"), "--num-heads", str(HEADS), "--json"])
    assert json.loads(capsys.readouterr().out)["output"] == str(tmp_path / "out")
    main(["info", str(tmp_path / "out"), "--json"])
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "flexdit" and info["kind"] == "FlexDiT"
    expected, _ = flexdit_from_dense(flexdit.load(tmp_path / "dit.pt", num_heads=HEADS), "default")
    assert_same_state(flexdit.load(tmp_path / "out").state_dict(), expected.state_dict())


def test_error_non_finite_weights_name_the_first_bad_tensor(tmp_path):
    sd = tiny_model().state_dict()
    sd["blocks.4.attn.qkv.bias"][3] = float("inf")
    load_error(save_pt(sd, tmp_path / "x.pt"), r"NaN or infinite values in blocks\.4\.attn\.qkv\.bias", num_heads=HEADS)


def test_dit_state_dict_gives_the_original_layout(tmp_path):
    path = dit_file(tmp_path)
    original = torch.load(path, weights_only=True)
    assert_same_state(ckpt.dit_state_dict(flexdit.load(path, num_heads=HEADS)), original)


def test_save_leaves_no_temporary_file(tmp_path):
    folder = tmp_path / "new" / "folder"  # created on the way
    tiny_model().save(folder / "m.safetensors")
    tiny_model(seed=1).save(folder / "m.safetensors")  # overwriting, too
    assert os.listdir(folder) == ["m.safetensors"]


def _save_file_crashing_with(exc: BaseException):
    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x08\x00\x00\x00partial")  # a half-written file, as a crash leaves
        raise exc
    return crash


@pytest.mark.parametrize("exc, expected", [
    (OSError(28, "No space left on device"), FlexDiTError),
    # safetensors reports I/O failures (disk full, permissions, name too long) as SafetensorError, not OSError.
    (SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"), FlexDiTError),
    (RuntimeError("simulated crash"), RuntimeError),  # not a user error: propagates, but still cleans up
], ids=["oserror", "safetensors-io-error", "unexpected-error"])
def test_failed_save_keeps_the_existing_file_and_no_temp(tmp_path, monkeypatch, exc, expected):
    path = tmp_path / "model.safetensors"
    tiny_model(seed=0).save(path)
    before = path.read_bytes()
    monkeypatch.setattr(flexdit.io, "save_file", _save_file_crashing_with(exc))
    with pytest.raises(expected) as e:
        tiny_model(seed=1).save(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["model.safetensors"]
    if expected is FlexDiTError:
        assert "cannot write" in str(e.value) and "\n" not in str(e.value)


def test_save_accepts_a_long_file_name(tmp_path):
    # 252 characters is a legal name (the limit is 255); the temporary name must not push it over.
    path = tmp_path / ("m" * 240 + ".safetensors")
    source = tiny_model()
    source.save(path)
    assert_same_model(flexdit.load(path), source)


# === 5. conversion on load ===========================================================================
def test_dense_file_converts_on_load(tmp_path):
    dense = tiny_model()
    loaded = flexdit.load_checkpoint(dit_file(tmp_path, dense), num_heads=HEADS, layout="2+1x1-1-1-1+0",
                                     density="0.61,0.86")
    model = loaded.model
    assert model.is_flexdit and model.layout.kinds == ("pool", "pool", "gen", "sparse", "recover", "dense")
    assert model.density == DensitySchedule(0.61, 0.86)
    assert sorted(loaded.conversion.new) == [f"blocks.4.merge.{m}.{p}" for m in ("dense", "sparse")
                                             for p in ("bias", "weight")]
    # The same model as `flexdit convert` builds from the dense one.
    expected, _ = flexdit_from_dense(dense, "2+1x1-1-1-1+0", DensitySchedule(0.61, 0.86))
    assert_same_model(model, expected.eval())


# === 6. error paths ==================================================================================
class Payload:
    """An object whose unpickling would run code: it writes a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (_payload_ran, (str(self.marker),))


def _payload_ran(marker: str) -> None:
    Path(marker).write_text("unpickling executed code")


def test_error_missing_file(tmp_path):
    load_error(tmp_path / "nope.pt", "not found")


def test_error_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    load_error(tmp_path / "empty", "is a directory without a config.json")


@pytest.mark.parametrize("content, match", [(b"hello world\n", "not a checkpoint"), (b"", "is empty"),
                                            (b"not a checkpoint\n", "neither safetensors nor a PyTorch file")],
                         ids=["text", "empty", "other-text"])
def test_error_pt_file_that_is_not_a_checkpoint(tmp_path, content, match):
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    load_error(path, match)


def test_error_pickled_object_is_refused_not_executed(tmp_path):
    marker = tmp_path / "marker"
    path = save_pt({"model": {"w": torch.zeros(1)}, "hook": Payload(marker)}, tmp_path / "evil.pt")
    message = str(load_error(path, r"pickled Python objects \(first: .*_payload_ran\) that flexdit will not unpickle"))
    assert "weights_only" not in message
    assert not marker.exists()


def test_error_unknown_key_layout(tmp_path):
    load_error(save_pt({"encoder.weight": torch.zeros(3)}, tmp_path / "x.pt"), "unknown checkpoint key layout")


def test_error_extra_tensor(tmp_path):
    sd = tiny_model().state_dict()
    sd["blocks.0.attn.extra.weight"] = torch.zeros(3)
    load_error(save_pt(sd, tmp_path / "x.pt"), "does not use .*blocks.0.attn.extra.weight", num_heads=HEADS)


def test_error_shape_mismatch(tmp_path):
    sd = tiny_model().state_dict()
    sd["blocks.1.mlp.fc1.weight"] = torch.zeros(100, D)
    load_error(save_pt(sd, tmp_path / "x.pt"), r"shape mismatch for blocks\.1\.mlp\.fc1\.weight", num_heads=HEADS)


def test_error_missing_tensor(tmp_path):
    sd = tiny_model().state_dict()
    del sd["blocks.2.attn.proj.bias"]
    load_error(save_pt(sd, tmp_path / "x.pt"), r"missing 1 tensors.*blocks\.2\.attn\.proj\.bias", num_heads=HEADS)


@pytest.mark.parametrize("overrides, match", [
    ({"density": "0.5,0.8", "grid": 4}, "either density or grid"),
    ({"input_size": 32}, "input_size 32x32 contradicts .*64 position embeddings"),
    ({"num_classes": 5}, "num_classes=5 contradicts .*11 rows"),
    ({"num_heads": 5}, "num_heads=5 does not divide .*32"),
    ({"sparse_grid": 4}, "sparse_grid applies to SparseDiT"),
    ({"heads": 4}, "unknown load option 'heads'"),
    ({"weights": "ema"}, "no 'ema' weights"),
], ids=["density-and-grid", "input-size", "num-classes", "heads-not-dividing", "sparse-grid", "unknown-option",
        "ema-on-bare"])
def test_error_contradictory_override_on_dit_file(tmp_path, overrides, match):
    load_error(dit_file(tmp_path), match, **{"num_heads": HEADS, **overrides})


def test_error_num_heads_contradicts_flexdit_file(tmp_path):
    tiny_model().save(tmp_path / "m.safetensors")
    load_error(tmp_path / "m.safetensors", "num_heads=8 contradicts the checkpoint's num_heads=4", num_heads=8)
