"""Sampling a PixArt from captions: the generic sampler's guidance with the learned null caption or a negative
caption, seeds independent of batching, and `flexdit sample --prompt` with a local text encoder end to end."""
import numpy as np
import pytest
import torch

from flexdit.cli import main
from flexdit.errors import FlexDiTError
from flexdit.models.layout import Layout
from flexdit.models.pixart import PixArt, PixArtConfig
from flexdit.sampling import decode, sample
from flexdit.schedule import FixedGrid
from flexdit.text import TextEncoder
from flexdit.vae import load_vae
from conftest import randomize
from text_fixtures import make_tiny_text_encoder

T5_WIDTH = 32


def tiny(layout=Layout.dense(3), **kw) -> PixArt:
    config = PixArtConfig(input_size=(8, 8), hidden_size=48, num_heads=4, caption_channels=T5_WIDTH, caption_length=7,
                          layout=layout.kinds, **kw)
    return randomize(PixArt(config), seed=1, scale=0.1).eval()


def captions(batch: int, length: int = 5, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, 3:] = 0
    return {"caption": torch.randn(batch, length, T5_WIDTH, generator=g), "caption_mask": mask}


class HandGuided(PixArt):
    """Guidance written out by hand in the forward pass: cond + scale (cond - uncond) on all four noise channels,
    the learned null caption as uncond, the variance channels of the conditional output."""
    scale = 3.0

    def forward(self, x, t, caption, caption_mask=None, **kw):
        cond = super().forward(x, t, caption, caption_mask)
        uncond = super().forward(x, t, self.null_caption(x.shape[0]))
        return torch.cat([uncond[:, :4] + self.scale * (cond[:, :4] - uncond[:, :4]), cond[:, 4:]], dim=1)


def test_guidance_combines_caption_and_null_caption_on_every_noise_channel():
    model, cond = tiny(), captions(2)
    by_hand = HandGuided(model.config).eval()
    by_hand.load_state_dict(model.state_dict())
    for sampler in ("ddim", "ddpm"):
        guided = sample(model, cond, sampler, 3, cfg_scale=3.0, seed=4)
        torch.testing.assert_close(guided, sample(by_hand, cond, sampler, 3, seed=4), atol=1e-3, rtol=1e-3)
    assert not torch.allclose(guided, sample(model, cond, "ddpm", 3, seed=4))


def test_a_negative_caption_replaces_the_null_caption_and_pads_under_its_mask():
    model = tiny(learned_null_caption=False)
    cond = captions(2)
    with pytest.raises(FlexDiTError, match="negative caption"):
        sample(model, cond, "ddim", 2, cfg_scale=2.0)
    negative = torch.randn(1, 2, T5_WIDTH).expand(2, -1, -1)
    padded = torch.cat([negative, torch.randn(2, 4, T5_WIDTH)], 1)
    mask = torch.tensor([[1, 1, 0, 0, 0, 0]] * 2)
    short = sample(model, {**cond, "negative_caption": negative}, "ddim", 3, cfg_scale=2.0, seed=1)
    long = sample(model, {**cond, "negative_caption": padded, "negative_caption_mask": mask}, "ddim", 3,
                  cfg_scale=2.0, seed=1)
    torch.testing.assert_close(short, long, atol=1e-5, rtol=1e-5)


def test_flexdit_pixart_samples_alike_whatever_the_batching():
    model = tiny(Layout(("pool", "gen", "sparse", "recover", "dense")), density=FixedGrid(2, 2).to_dict())
    cond = captions(3)
    whole = sample(model, cond, "ddpm", 4, cfg_scale=2.0, seed=2)
    parts = [sample(model, {k: v[i:i + 1] for k, v in cond.items()}, "ddpm", 4, cfg_scale=2.0, seed=2,
                    sample_indices=[i]) for i in range(3)]
    torch.testing.assert_close(whole, torch.cat(parts), atol=1e-3, rtol=1e-3)  # x0 = eps / 0.006 at t = 999


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from diffusers import AutoencoderKL

    root = tmp_path_factory.mktemp("pixart-sample")
    make_tiny_text_encoder(root / "t5", d_model=T5_WIDTH)
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4, sample_size=8).save_pretrained(
        root / "vae")
    tiny().save(root / "pixart.safetensors")
    tiny(learned_null_caption=False).save(root / "no-null.safetensors")
    return root


def test_sample_command_from_prompts_writes_what_the_library_makes(files, tmp_path, capsys):
    prompts = ["a photo of a dress", "a photo of a bag"]
    args = ["sample", "--ckpt", str(files / "pixart.safetensors"), "--text-encoder", str(files / "t5"),
            "--vae", str(files / "vae"), "--sampler", "ddim", "--steps", "3", "--cfg", "2", "--num-samples", "3",
            "--device", "cpu", "--dtype", "fp32", "--npz", str(tmp_path / "s.npz"), "--out", str(tmp_path / "s.png")]
    main(args + [arg for p in prompts for arg in ("--prompt", p)])
    out = np.load(tmp_path / "s.npz")
    assert out["arr_0"].shape == (3, 8, 8, 3) and out["arr_1"].tolist() == [0, 1, 0]
    assert out["prompts"].tolist() == prompts and (tmp_path / "s.png").stat().st_size > 0
    encoder = TextEncoder.load(files / "t5")
    embeddings, masks = encoder.encode([prompts[0], prompts[1], prompts[0]])
    from flexdit import load

    latents = sample(load(files / "pixart.safetensors"), {"caption": embeddings, "caption_mask": masks}, "ddim", 3,
                     cfg_scale=2.0)
    assert np.abs(decode(latents, load_vae(str(files / "vae"))).astype(int) - out["arr_0"].astype(int)).max() <= 1


@pytest.mark.parametrize("extra, words", [
    (["--prompt", "a dress"], ["--prompt needs --text-encoder"]),
    ([], ["--prompt TEXT", "--captions"]),
    (["--classes", "1,2"], ["--classes is for class-conditional"]),
])
def test_sample_command_refuses_incomplete_caption_requests(files, capsys, extra, words):
    with pytest.raises(SystemExit):
        main(["sample", "--ckpt", str(files / "pixart.safetensors"), "--vae", str(files / "vae"), "--device", "cpu",
              *extra])
    err = capsys.readouterr().err
    assert all(w in err for w in words) and err.count("\n") == 1


def test_diffusers_style_pixart_guides_with_the_encoded_empty_prompt(files, tmp_path, capsys):
    base = ["sample", "--ckpt", str(files / "no-null.safetensors"), "--vae", str(files / "vae"), "--device", "cpu",
            "--steps", "2", "--sampler", "ddim", "--cfg", "3", "--npz", str(tmp_path / "n.npz")]
    main(base + ["--prompt", "a bag", "--text-encoder", str(files / "t5")])
    assert np.load(tmp_path / "n.npz")["arr_0"].shape == (1, 8, 8, 3)
