"""Loading PixArt-alpha with flexdit.load: diffusers PixArtTransformer2DModel folders (model and pipeline layouts), the
original repository's .pth files ({"state_dict": ...}, fused qkv / kv_linear, learned null caption, stored
pos_embed), and our own files; outputs against diffusers' on the same weights."""
import json

import pytest
import torch

import flexdit
from flexdit.errors import FlexDiTError
from flexdit.models.layout import Layout
from flexdit.models.pixart import PixArt
from flexdit.nn.embed import sincos_pos_embed_2d
from test_pixart import (CAPTION_CH, CAPTION_LEN, HEADS, HIDDEN, SIZE, caption_batch, diffusers_forward, diffusers_pixart,
                         latents, micro, run, tiny_pixart)

diffusers = pytest.importorskip("diffusers")
FORMS = {"256": dict(use_additional_conditions=False, interpolation_scale=0.5),
         "512": dict(use_additional_conditions=False, interpolation_scale=1.0),
         # PixArtMS files store zero positions: the released rule (scale = latent side / 64, 2 at 1024 px) applies
         "1024-MS": dict(use_additional_conditions=True, interpolation_scale=SIZE / 64)}


def original_state(theirs: torch.nn.Module, scale: float, null: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """diffusers weights in the original repository's layout, written here from its conversion script's table:
    q/k/v fused into attn.qkv, k/v into cross_attn.kv_linear, the pos_embed buffer the original model saves."""
    s = theirs.state_dict()
    out = {"x_embedder.proj.weight": s["pos_embed.proj.weight"], "x_embedder.proj.bias": s["pos_embed.proj.bias"],
           "final_layer.scale_shift_table": s["scale_shift_table"]}
    top = {"t_embedder.mlp.0": "adaln_single.emb.timestep_embedder.linear_1",
           "t_embedder.mlp.2": "adaln_single.emb.timestep_embedder.linear_2", "t_block.1": "adaln_single.linear",
           "y_embedder.y_proj.fc1": "caption_projection.linear_1",
           "y_embedder.y_proj.fc2": "caption_projection.linear_2", "final_layer.linear": "proj_out"}
    if theirs.config.use_additional_conditions:
        top.update({"csize_embedder.mlp.0": "adaln_single.emb.resolution_embedder.linear_1",
                    "csize_embedder.mlp.2": "adaln_single.emb.resolution_embedder.linear_2",
                    "ar_embedder.mlp.0": "adaln_single.emb.aspect_ratio_embedder.linear_1",
                    "ar_embedder.mlp.2": "adaln_single.emb.aspect_ratio_embedder.linear_2"})
    for i in range(theirs.config.num_layers):
        b = f"transformer_blocks.{i}."
        top.update({f"blocks.{i}.attn.proj": b + "attn1.to_out.0", f"blocks.{i}.cross_attn.q_linear": b + "attn2.to_q",
                    f"blocks.{i}.cross_attn.proj": b + "attn2.to_out.0", f"blocks.{i}.mlp.fc1": b + "ff.net.0.proj",
                    f"blocks.{i}.mlp.fc2": b + "ff.net.2"})
        out[f"blocks.{i}.scale_shift_table"] = s[b + "scale_shift_table"]
        for p in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{p}"] = torch.cat([s[f"{b}attn1.to_{n}.{p}"] for n in "qkv"])
            out[f"blocks.{i}.cross_attn.kv_linear.{p}"] = torch.cat([s[f"{b}attn2.to_{n}.{p}"] for n in "kv"])
    for ours, their in top.items():
        for p in ("weight", "bias"):
            out[f"{ours}.{p}"] = s[f"{their}.{p}"]
    side = SIZE // 2
    ms = theirs.config.use_additional_conditions
    out["pos_embed"] = torch.zeros(1, side * side, HIDDEN) if ms else \
        sincos_pos_embed_2d(HIDDEN, side, side, side, scale)[None]  # PixArtMS files hold zeros
    if null is not None:
        out["y_embedder.y_embedding"] = null
    return out


def compare(model, theirs, batch=3):
    x, t = latents(model, batch, t=[0, 500, 999][:batch])
    caption, mask = caption_batch(batch)
    sizes = micro(batch) if model.config.micro_conditions else (None, None)
    torch.testing.assert_close(run(model, x, t, caption, mask), diffusers_forward(theirs, x, t, caption, mask, *sizes),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("form", FORMS)
def test_original_pth_loads_and_matches_diffusers(tmp_path, form):
    theirs = diffusers_pixart(diffusers, **FORMS[form])
    null = torch.randn(CAPTION_LEN, CAPTION_CH)
    path = tmp_path / "PixArt-tiny.pth"
    torch.save({"state_dict": original_state(theirs, FORMS[form]["interpolation_scale"], null)}, path)
    loaded = flexdit.load_checkpoint(path, num_heads=HEADS)  # the file cannot tell
    assert loaded.format == "pixart" and isinstance(loaded.model, PixArt)
    c = loaded.model.config
    assert (c.micro_conditions, c.interpolation_scale, c.caption_length) == \
        (form == "1024-MS", FORMS[form]["interpolation_scale"], CAPTION_LEN)
    compare(loaded.model, theirs)
    torch.testing.assert_close(loaded.model.null_caption(1)[0], null)


def test_original_training_file_prefers_its_ema_weights(tmp_path):
    theirs, other = diffusers_pixart(diffusers, seed=3), diffusers_pixart(diffusers, seed=4)
    path = tmp_path / "epoch_1_step_100.pth"
    torch.save({"state_dict": original_state(other, 1.0, None), "state_dict_ema": original_state(theirs, 1.0, None),
                "epoch": 1}, path)
    compare(flexdit.load(path, num_heads=HEADS), theirs)
    compare(flexdit.load(path, num_heads=HEADS, weights="model"), other)


@pytest.mark.parametrize("pipeline_layout", [False, True])
def test_diffusers_folder_loads_and_matches(tmp_path, pipeline_layout):
    theirs = diffusers_pixart(diffusers, **FORMS["1024-MS" if pipeline_layout else "256"])
    folder = tmp_path / "PixArt-XL-2-tiny"
    theirs.save_pretrained(folder / "transformer" if pipeline_layout else folder)
    loaded = flexdit.load_checkpoint(folder)
    assert loaded.format == "diffusers-pixart" and not loaded.model.config.learned_null_caption
    compare(loaded.model, theirs)


def test_our_files_round_trip_dense_and_flexdit(tmp_path):
    dense = tiny_pixart(Layout.dense(5), micro_conditions=True)
    for model in (dense, flexdit.flexdit_from_dense(dense, Layout(("pool", "gen", "sparse", "recover", "dense")))[0]):
        path = tmp_path / f"{len(model.layout)}-{model.is_flexdit}.safetensors"
        model.save(path)
        loaded = flexdit.load_checkpoint(path)
        assert loaded.format == "flexdit" and loaded.model.config == model.config
        x, t = latents(model)
        caption, mask = caption_batch(3)
        torch.testing.assert_close(run(loaded.model, x, t, caption, mask), run(model, x, t, caption, mask))


def test_load_converts_a_dense_pixart_on_request(tmp_path):
    theirs = diffusers_pixart(diffusers, num_layers=5)
    theirs.save_pretrained(tmp_path / "m")
    loaded = flexdit.load_checkpoint(tmp_path / "m", layout="1+1x1-1-1-0+1", grid=4)
    assert loaded.model.is_flexdit and loaded.conversion is not None and loaded.model.density.grid(0, (8, 8)) == (4, 4)


def test_loading_errors_are_one_sentence(tmp_path):
    theirs = diffusers_pixart(diffusers)
    state = original_state(theirs, 1.0, None)
    torch.save({"state_dict": {k: v for k, v in state.items() if k != "pos_embed"}}, tmp_path / "nopos.pth")
    with pytest.raises(FlexDiTError, match="heads is unknown"):
        flexdit.load(tmp_path / "nopos.pth", input_size=SIZE)
    with pytest.raises(FlexDiTError, match="input_size"):
        flexdit.load(tmp_path / "nopos.pth", num_heads=HEADS)
    assert flexdit.load(tmp_path / "nopos.pth", num_heads=HEADS, input_size=SIZE).config.interpolation_scale == SIZE / 64
    torch.save({"state_dict": {**state, "pos_embed": torch.randn(1, 64, HIDDEN)}}, tmp_path / "badpos.pth")
    with pytest.raises(FlexDiTError, match="position scale"):
        flexdit.load(tmp_path / "badpos.pth", num_heads=HEADS)
    torch.save({"state_dict": state}, tmp_path / "ok.pth")
    with pytest.raises(FlexDiTError, match="num_classes applies to class-conditional DiT"):
        flexdit.load(tmp_path / "ok.pth", num_heads=HEADS, num_classes=10)
    torch.save(theirs.state_dict(), tmp_path / "bare.pt")
    with pytest.raises(FlexDiTError, match="config.json"):
        flexdit.load(tmp_path / "bare.pt")
    theirs.save_pretrained(tmp_path / "folder")
    with pytest.raises(FlexDiTError, match="contradicts"):
        flexdit.load(tmp_path / "folder", num_heads=2)
    config = json.loads((tmp_path / "folder" / "config.json").read_text())
    (tmp_path / "folder" / "config.json").write_text(json.dumps({**config, "norm_type": "ada_norm_zero"}))
    with pytest.raises(FlexDiTError):
        flexdit.load(tmp_path / "folder")
