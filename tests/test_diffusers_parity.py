"""Parity of our dense DiT with an independent implementation: diffusers' DiTTransformer2DModel.

The weight mapping is written here from the two key layouts, independently of flexdit/checkpoints.py,
so that a mistake in the library's converter cannot hide a mistake in the model (or vice versa).
"""
import pytest
import torch

from flexdit.models.dit import DiT
from flexdit.models.layout import Layout
from conftest import randomize, tiny_config

diffusers = pytest.importorskip("diffusers")

HEADS, HEAD_DIM, DEPTH, SIZE, PATCH, IN_CH, NUM_CLASSES = 4, 8, 3, 16, 2, 4, 10
HIDDEN = HEADS * HEAD_DIM
TIMESTEPS = [0, 1, 250, 500, 998, 999]
LABELS = [0, 3, 9, 10, 10, 5]  # 10 is the null class (row num_classes of the label table)


def diffusers_model() -> torch.nn.Module:
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, num_layers=DEPTH, sample_size=SIZE,
        patch_size=PATCH, in_channels=IN_CH, out_channels=2 * IN_CH, num_embeds_ada_norm=NUM_CLASSES,
        norm_eps=1e-6,
    ).eval()


def our_model(freq_shift: int) -> DiT:
    config = tiny_config(input_size=(SIZE, SIZE), patch_size=PATCH, in_channels=IN_CH, hidden_size=HIDDEN,
                         num_heads=HEADS, num_classes=NUM_CLASSES, class_dropout_prob=0.1, learn_sigma=True,
                         timestep_freq_shift=freq_shift, layout=Layout.dense(DEPTH))
    return randomize(DiT(config), seed=3).eval()


def to_diffusers_state(ours: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """Our (original DiT) keys -> diffusers keys. Diffusers keeps one copy of the t/y embedders per block."""
    out = {
        "pos_embed.proj.weight": ours["x_embedder.proj.weight"],
        "pos_embed.proj.bias": ours["x_embedder.proj.bias"],
        "proj_out_1.weight": ours["final_layer.adaLN_modulation.1.weight"],
        "proj_out_1.bias": ours["final_layer.adaLN_modulation.1.bias"],
        "proj_out_2.weight": ours["final_layer.linear.weight"],
        "proj_out_2.bias": ours["final_layer.linear.bias"],
    }
    for i in range(depth):
        src, dst = f"blocks.{i}.", f"transformer_blocks.{i}."
        emb = dst + "norm1.emb."
        for p in ("weight", "bias"):
            out[f"{emb}timestep_embedder.linear_1.{p}"] = ours[f"t_embedder.mlp.0.{p}"]
            out[f"{emb}timestep_embedder.linear_2.{p}"] = ours[f"t_embedder.mlp.2.{p}"]
            out[f"{dst}norm1.linear.{p}"] = ours[f"{src}adaLN_modulation.1.{p}"]
            q, k, v = ours[f"{src}attn.qkv.{p}"].chunk(3, dim=0)
            out[f"{dst}attn1.to_q.{p}"], out[f"{dst}attn1.to_k.{p}"], out[f"{dst}attn1.to_v.{p}"] = q, k, v
            out[f"{dst}attn1.to_out.0.{p}"] = ours[f"{src}attn.proj.{p}"]
            out[f"{dst}ff.net.0.proj.{p}"] = ours[f"{src}mlp.fc1.{p}"]
            out[f"{dst}ff.net.2.{p}"] = ours[f"{src}mlp.fc2.{p}"]
        out[f"{emb}class_embedder.embedding_table.weight"] = ours["y_embedder.embedding_table.weight"]
    return out


def load_into_diffusers(ours: DiT) -> torch.nn.Module:
    theirs = diffusers_model()
    state = to_diffusers_state(ours.state_dict(), DEPTH)
    # strict: every diffusers parameter is set and no key of ours is misnamed (pos_embed is a non-persistent buffer).
    theirs.load_state_dict(state, strict=True)
    return theirs


def run_both(ours: DiT, theirs: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(len(TIMESTEPS), IN_CH, SIZE, SIZE, generator=g)
    t, y = torch.tensor(TIMESTEPS), torch.tensor(LABELS)
    with torch.no_grad():
        return ours(x, t, y), theirs(x, timestep=t, class_labels=y).sample


class _RecordingDict(dict):
    """A state dict that remembers which keys were read."""

    def __init__(self, *args):
        super().__init__(*args)
        self.read = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)


def test_mapping_covers_every_weight():
    # The mapping reads every parameter of ours (only the fixed sin-cos buffer is recomputed by diffusers),
    # and the random weights are non-trivial everywhere.
    ours = _RecordingDict(our_model(freq_shift=1).state_dict())
    state = to_diffusers_state(ours, DEPTH)
    assert set(ours) - ours.read == {"pos_embed"}
    assert all(v.abs().sum() > 0 for v in state.values())


def test_positions_match_diffusers():
    # Our persistent pos_embed buffer equals diffusers' sin-cos table (diffusers recomputes it, not loaded).
    ours, theirs = our_model(freq_shift=1), diffusers_model()
    torch.testing.assert_close(ours.pos_embed, theirs.pos_embed.pos_embed, atol=1e-6, rtol=0)


def diffusers_with_original_frequencies(ours):
    theirs = load_into_diffusers(ours)
    for block in theirs.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    return theirs


def test_dense_dit_equals_diffusers_with_its_frequency_shift():
    # timestep_freq_shift=1 reproduces diffusers' (half - 1) denominator in the timestep frequencies.
    ours = our_model(freq_shift=1)
    out, ref = run_both(ours, load_into_diffusers(ours))
    assert out.shape == ref.shape == (len(TIMESTEPS), 2 * IN_CH, SIZE, SIZE)
    assert (out - ref).abs().max().item() <= 1e-5


def test_original_dit_frequencies_equal_diffusers_with_shift_zero():
    # The original DiT divides by half (our default, shift 0). Diffusers' Timesteps module reads its
    # downscale_freq_shift attribute at every call, so setting it to 0 in every block (each block has its
    # own copy of the embedder, and the final layer reads block 0's) turns diffusers into the original DiT.
    ours = our_model(freq_shift=0)
    out, ref = run_both(ours, diffusers_with_original_frequencies(ours))
    assert (out - ref).abs().max().item() <= 1e-5


def test_frequency_shift_matters():
    # Guard that the two tests above are not vacuous: the shift changes the output for t > 0.
    ours = our_model(freq_shift=1)
    out, ref = run_both(ours, diffusers_with_original_frequencies(ours))
    assert (out - ref).abs().max().item() > 1e-3
