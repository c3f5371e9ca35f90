"""Diffusion maths, samplers, guidance, decoding and the `flexdit sample` command."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from flexdit.cli import main
from flexdit.diffusion.gaussian import GaussianDiffusion, linear_betas
from flexdit.errors import FlexDiTError
from flexdit.models.dit import DiT
from flexdit.models.layout import Layout
from flexdit.sampling import decode, plan, sample
from flexdit.schedule import DensitySchedule

from conftest import randomize, tiny_config, tiny_model


def flex_model(**kw) -> DiT:
    config = tiny_config(Layout.parse("1+1x1-1-1-1+1"), input_size=(16, 16), density={"r_min": 0.4, "r_max": 0.9}, **kw)
    return randomize(DiT(config), seed=3, scale=0.1).eval()


# --- diffusion maths against closed forms -----------------------------------------------------------------
def closed_form(timesteps):
    """beta, alpha_bar and alpha_bar_prev of a respaced process, computed from the definitions."""
    alpha_bar_full = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    alpha_bar = alpha_bar_full[timesteps]
    alpha_bar_prev = np.concatenate([[1.0], alpha_bar[:-1]])
    beta = 1 - alpha_bar / alpha_bar_prev
    return beta, alpha_bar, alpha_bar_prev


@pytest.mark.parametrize("spacing", [None, "250", "ddim50"])
def test_posterior_mean_and_variance(spacing):
    d = GaussianDiffusion(spacing)
    beta, ab, ab_prev = closed_form(np.array(d.timesteps))
    g = torch.Generator().manual_seed(0)
    x0, xt = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64), torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    for i in (1, len(d.timesteps) // 2, len(d.timesteps) - 1):
        mean, var, _ = d.q_posterior(x0, xt, torch.full((3,), i))
        expected_var = beta[i] * (1 - ab_prev[i]) / (1 - ab[i])
        expected_mean = (np.sqrt(ab_prev[i]) * beta[i] / (1 - ab[i])) * x0 + \
                        (np.sqrt(1 - beta[i]) * (1 - ab_prev[i]) / (1 - ab[i])) * xt
        assert torch.allclose(var.flatten(), torch.full((3,), expected_var, dtype=torch.float64), rtol=1e-10)
        assert torch.allclose(mean, expected_mean, rtol=1e-10, atol=1e-12)


def test_learned_range_variance_interpolates_in_log_space():
    d = GaussianDiffusion("250")
    beta, ab, ab_prev = closed_form(np.array(d.timesteps))
    xt = torch.zeros(3, 2, 4, 4, dtype=torch.float64)
    v = torch.stack([torch.full((2, 4, 4), value, dtype=torch.float64) for value in (-1.0, 0.0, 1.0)])
    i = 100
    _, log_var, _, _ = d.p_mean_variance(torch.cat([torch.zeros_like(xt), v], dim=1), xt, torch.full((3,), i))
    log_posterior = np.log(beta[i] * (1 - ab_prev[i]) / (1 - ab[i]))
    expected = [log_posterior, (log_posterior + np.log(beta[i])) / 2, np.log(beta[i])]
    assert torch.allclose(log_var[:, 0, 0, 0], torch.tensor(expected, dtype=torch.float64), rtol=1e-10)


def test_fixed_variance_is_the_original_fixed_large():
    d = GaussianDiffusion("ddim25", learn_sigma=False)
    beta, ab, ab_prev = closed_form(np.array(d.timesteps))
    xt = torch.zeros(1, 2, 2, 2, dtype=torch.float64)
    for i, expected in ((0, beta[1] * (1 - ab_prev[1]) / (1 - ab[1])), (7, beta[7])):
        _, log_var, _, _ = d.p_mean_variance(torch.zeros_like(xt), xt, torch.tensor([i]))
        assert float(log_var[0, 0, 0, 0]) == pytest.approx(np.log(expected), rel=1e-12)


def test_betas_are_dit_linear_schedule():
    betas = linear_betas()
    assert len(betas) == 1000 and betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)


@pytest.mark.parametrize("eta", [0.0, 0.6])
def test_ddim_step_equals_diffusers(eta):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                              clip_sample=False, set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading")
    scheduler.set_timesteps(50)
    ours = GaussianDiffusion("ddim50")
    assert sorted(int(t) for t in scheduler.timesteps) == ours.timesteps
    g = torch.Generator().manual_seed(0)
    x, eps, z = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    for t in (980, 500, 20, 0):
        step = ours.timesteps.index(t)
        expected = scheduler.step(eps, t, x, eta=eta, variance_noise=z).prev_sample
        got = ours.ddim_step(eps.double(), x.double(), step, z.double(), eta).float()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# --- sampling loops ---------------------------------------------------------------------------------------
def recorded_grids(model: DiT) -> list:
    grids, original = [], model.forward_grid

    def record(x, t, y, grid):
        grids.append((int(t[0]), grid))
        return original(x, t, y, grid)

    model.forward_grid = record
    return grids


@pytest.mark.parametrize("sampler, steps", [("ddpm", 10), ("ddim", 8), ("dpm", 5)])
def test_each_step_runs_at_the_schedules_grid(sampler, steps):
    model = flex_model()
    grids = recorded_grids(model)
    sample(model, [1, 2], sampler, steps)
    timesteps = plan(sampler, steps).timesteps
    assert [t for t, _ in grids] == timesteps and timesteps == sorted(timesteps, reverse=True)
    schedule = DensitySchedule(0.4, 0.9)
    assert [g for _, g in grids] == [schedule.grid(t, (8, 8)) for t in timesteps]
    assert len({g for _, g in grids}) > 1  # the density really changes along the trajectory


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm"])
def test_same_seed_same_samples_whatever_the_batching(sampler):
    model = flex_model()
    whole = sample(model, [1, 2, 3, 4], sampler, 6, seed=7)
    assert torch.equal(whole, sample(model, [1, 2, 3, 4], sampler, 6, seed=7))
    split = torch.cat([sample(model, [1, 2], sampler, 6, seed=7, sample_indices=[0, 1]),
                       sample(model, [3, 4], sampler, 6, seed=7, sample_indices=[2, 3])])
    # Same noise per sample; only matmul blocking differs with the batch size, amplified over the steps.
    torch.testing.assert_close(split, whole, rtol=1e-3, atol=1e-3)
    assert not torch.allclose(whole, sample(model, [1, 2, 3, 4], sampler, 6, seed=8))
    assert torch.isfinite(whole).all()


def test_guidance_scale_one_is_the_plain_conditional_model():
    model = flex_model()
    batches = []
    original = model.forward_grid
    model.forward_grid = lambda x, t, y, grid: batches.append(x.shape[0]) or original(x, t, y, grid)
    unguided = sample(model, [1, 2], "ddim", 4, cfg_scale=1.0, seed=1)
    assert set(batches) == {2}  # no doubled batch
    batches.clear()
    guided = sample(model, [1, 2], "ddim", 4, cfg_scale=4.0, seed=1)
    assert set(batches) == {4}
    assert not torch.allclose(unguided, guided)


def test_guidance_channels_follow_the_option():
    model = flex_model()
    all_channels = sample(model, [3], "ddim", 3, cfg_scale=3.0, guided_channels=None, seed=2)
    three = sample(model, [3], "ddim", 3, cfg_scale=3.0, guided_channels=3, seed=2)
    assert not torch.allclose(all_channels[:, 3], three[:, 3])


def test_sampling_errors():
    model = flex_model()
    with pytest.raises(FlexDiTError, match="unknown class id 10"):
        sample(model, [10], "ddim", 2)
    with pytest.raises(FlexDiTError, match="at least 1"):
        sample(model, [1], "ddim", 0)
    with pytest.raises(FlexDiTError, match="sampler"):
        sample(model, [1], "euler", 5)
    no_null = randomize(DiT(tiny_config(class_dropout_prob=0.0))).eval()
    with pytest.raises(FlexDiTError, match="null class"):
        sample(no_null, [1], "ddim", 2, cfg_scale=2.0)


# --- decoding ----------------------------------------------------------------------------------------------
def test_decode_pixels_and_vae(tmp_path):
    pixels = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 2, 2)
    assert decode(pixels).tolist() == [[[[0], [128]], [[255], [255]]]]
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4, sample_size=16)
    vae.save_pretrained(tmp_path / "vae")
    from flexdit.vae import load_vae

    loaded = load_vae(str(tmp_path / "vae"))
    images = decode(torch.randn(2, 4, 8, 8), loaded)
    assert images.shape == (2, 8, 8, 3) and images.dtype == np.uint8
    with pytest.raises(FlexDiTError, match="4-channel latents"):
        decode(torch.randn(1, 8, 8, 8), loaded)
    with pytest.raises(FlexDiTError, match="need a VAE"):
        decode(torch.randn(1, 4, 8, 8))
    with pytest.raises(FlexDiTError, match="VAE folder not found"):
        load_vae(str(tmp_path / "missing"))


# --- the command -----------------------------------------------------------------------------------------
@pytest.fixture
def pixel_ckpt(tmp_path):
    """A 3-channel pixel-space FlexDiT, as trained on images directly (no VAE)."""
    path = tmp_path / "pixel.safetensors"
    flex_model(in_channels=3).save(path)
    return path


def test_sample_command_writes_adm_npz_and_png(tmp_path, capsys, pixel_ckpt):
    npz, png = tmp_path / "s.npz", tmp_path / "grid.png"
    main(["sample", "--ckpt", str(pixel_ckpt), "--num", "5", "--sampler", "ddim", "--steps", "3", "--batch", "2",
          "--npz", str(npz), "--out", str(png), "--device", "cpu"])
    assert "images/s" in capsys.readouterr().out
    data = np.load(npz)
    assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (5, 16, 16, 3)
    assert data["arr_1"].tolist() == [0, 1, 2, 3, 4]
    from PIL import Image

    assert Image.open(png).size == (3 * 18 + 2, 2 * 18 + 2)  # 3 x 2 grid with 2-pixel gaps
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".flexdit")]


def test_sample_command_errors(tmp_path, capsys, pixel_ckpt):
    latent = tmp_path / "latent.safetensors"
    tiny_model().save(latent)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for argv, message in [
        (["--ckpt", pixel_ckpt, "--classes", "1,99"], "unknown class id 99"),
        (["--ckpt", pixel_ckpt, "--steps", "0"], "at least 1"),
        (["--ckpt", pixel_ckpt, "--out", blocker / "grid.png"], "cannot write"),
        (["--ckpt", latent, "--num", "1"], "--vae"),
        (["--ckpt", latent, "--vae", tmp_path / "nope"], "VAE folder not found"),
    ]:
        with pytest.raises(SystemExit):
            main(["sample", "--device", "cpu", "--out", str(tmp_path / "o.png")] + [str(a) for a in argv])
        assert message in capsys.readouterr().err


def test_two_process_sampling_equals_one(tmp_path, pixel_ckpt):
    common = ["sample", "--ckpt", str(pixel_ckpt), "--num-samples", "5", "--sampler", "ddim", "--steps", "2",
              "--batch", "2", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
                    "-m", "flexdit", *common, "--npz", str(tmp_path / "two.npz")], check=True, env=env,
                   capture_output=True)
    main(common + ["--npz", str(tmp_path / "one.npz")])
    two, one = np.load(tmp_path / "two.npz"), np.load(tmp_path / "one.npz")
    assert np.array_equal(two["arr_1"], one["arr_1"])
    assert np.abs(two["arr_0"].astype(int) - one["arr_0"].astype(int)).max() <= 1  # rounding at 127.5 steps
    assert not [p for p in os.listdir(tmp_path) if ".rank" in p]


def test_guidance_never_touches_the_variance_of_a_one_channel_model():
    model = randomize(DiT(tiny_config(in_channels=1)), seed=4).eval()  # outputs eps and variance: 2 channels
    x = torch.randn(2, 1, 16, 16)
    t, y = torch.tensor([300, 300]), torch.tensor([2, 10])
    with torch.no_grad():
        raw = model(torch.cat([x[:1], x[:1]]), t, y)
        guided = model.forward_with_cfg(x, t, y, 4.0)
    assert torch.equal(guided[:, 1], raw[:, 1])  # the variance channel is passed through
    assert not torch.allclose(guided[0, 0], raw[0, 0])


def test_low_precision_models_sample_with_a_float32_state():
    model = flex_model().to(torch.bfloat16)
    out = sample(model, [1, 2], "ddim", 3, seed=0)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_keeping_latents_needs_an_npz(tmp_path, capsys, pixel_ckpt):
    with pytest.raises(SystemExit):
        main(["sample", "--ckpt", str(pixel_ckpt), "--vae", "none", "--device", "cpu"])
    assert "--npz" in capsys.readouterr().err
    main(["sample", "--ckpt", str(pixel_ckpt), "--vae", "none", "--num-samples", "2", "--steps", "2",
          "--sampler", "ddim", "--device", "cpu", "--npz", str(tmp_path / "latents")])  # .npz is added
    data = np.load(tmp_path / "latents.npz")
    assert data["latents"].shape == (2, 3, 16, 16) and data["labels"].tolist() == [0, 1]
