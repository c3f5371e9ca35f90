"""to_diffusers: our models as the transformer of diffusers' own pipelines (PixArtAlphaPipeline, DiTPipeline), compared
with diffusers' transformers loaded with the same weights in the same pipelines; FlexDiTs in the pipeline; the
DiT null class; errors."""
import pytest
import torch

from flexdit.diffusers_interop import to_diffusers
from flexdit.errors import FlexDiTError
from flexdit.models.dit import DiT
from flexdit.models.from_dense import flexdit_from_dense
from flexdit.models.layout import Layout
from flexdit.models.pixart import PixArt, config_to_diffusers, state_to_diffusers
from flexdit.schedule import DensitySchedule, FixedGrid
from conftest import assert_one_line_error, randomize, tiny_config as tiny_dit_config
from test_pixart import CAPTION_CH, FLEX, HIDDEN, NO_POOL, tiny_pixart as tiny_pixart_16

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models
from test_diffusers_parity import to_diffusers_state as dit_state_to_diffusers

diffusers = pytest.importorskip("diffusers")

# The pipeline's forms: its 256-px path (sample_size 32, decoded to images) and its 1024-MS path (sample_size 128:
# it passes resolution and aspect ratio; latents only, patch 4 keeps the token count small).
PLAIN = dict(input_size=(32, 32), patch_size=2, interpolation_scale=0.5)
MS = dict(input_size=(128, 128), patch_size=4, interpolation_scale=2.0, micro_conditions=True)


# --- helpers -------------------------------------------------------------------------------------------


def tiny_pixart(layout: Layout = Layout.dense(2), seed: int = 0, **kw) -> PixArt:
    """test_pixart's tiny PixArt in the pipeline's 256-px form unless `kw` says otherwise."""
    return tiny_pixart_16(layout, seed, **{**PLAIN, **kw})


def diffusers_pixart(ours: PixArt) -> torch.nn.Module:
    """diffusers' own PixArtTransformer2DModel holding our dense weights."""
    theirs = diffusers.PixArtTransformer2DModel(**config_to_diffusers(ours.config)).eval()
    theirs.load_state_dict(state_to_diffusers(ours.state_dict(), ours.config), strict=True)
    return theirs


def tiny_vae() -> torch.nn.Module:
    """Four blocks: the pipeline's VAE scale factor 8, as the real one."""
    torch.manual_seed(4)
    return diffusers.AutoencoderKL(block_out_channels=(8,) * 4, down_block_types=("DownEncoderBlock2D",) * 4,
                                   up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, latent_channels=4,
                                   norm_num_groups=4).eval()


@pytest.fixture(scope="module")
def vae():
    return tiny_vae()


def captions(batch: int = 2, length: int = 7, seed: int = 5) -> dict:
    """T5-like prompt embeddings in place of a text encoder: the second prompt padded (mask 0) after 4 tokens, the
    negative prompt 2 tokens long, as the pipeline's tokenizer pads to a common length."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1:, 4:] = 0
    negative_mask = torch.zeros(batch, length, dtype=torch.long)
    negative_mask[:, :2] = 1
    return dict(prompt_embeds=torch.randn(batch, length, CAPTION_CH, generator=g), prompt_attention_mask=mask,
                negative_prompt_embeds=torch.randn(batch, length, CAPTION_CH, generator=g),
                negative_prompt_attention_mask=negative_mask)


def pixart_pipeline(transformer: torch.nn.Module, vae: torch.nn.Module):
    pytest.importorskip("transformers", reason="diffusers' PixArtAlphaPipeline needs transformers")
    pipe = diffusers.PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                                         scheduler=diffusers.DPMSolverMultistepScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_pixart_pipeline(transformer: torch.nn.Module, vae: torch.nn.Module, output_type: str = "np"):
    """Images (or latents) with guidance, and the pipeline (whose scheduler holds the timesteps it ran)."""
    pipe = pixart_pipeline(transformer, vae)
    out = pipe(prompt=None, negative_prompt=None, num_inference_steps=3, guidance_scale=4.5, output_type=output_type,
               generator=torch.Generator().manual_seed(0), **captions())
    return torch.as_tensor(out.images), pipe


def pixart_inputs(model: PixArt, batch: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, model.in_channels, *model.config.input_size, generator=g)
    caption = torch.randn(batch, 7, CAPTION_CH, generator=g)
    mask = torch.ones(batch, 7, dtype=torch.long)
    mask[1:, 5:] = 0
    return x, caption, mask


def micro_conditions(batch: int = 3) -> dict:
    """Non-square binned sizes, so that a swap of height and width, or of size and ratio, shows."""
    sizes = torch.tensor([[1024.0, 1024.0], [768.0, 1344.0], [1344.0, 768.0]])[:batch]
    return {"resolution": sizes, "aspect_ratio": (sizes[:, 0] / sizes[:, 1])[:, None]}


def forward(transformer, x, **kw) -> torch.Tensor:
    with torch.no_grad():
        return transformer(x, return_dict=False, **kw)[0]


# --- the adapter ---------------------------------------------------------------------------------------
def test_adapter_wraps_the_model_and_carries_the_pipeline_config():
    model = tiny_pixart(**MS)
    adapter = to_diffusers(model)
    assert adapter.model is model and list(adapter.parameters()) == list(model.parameters())
    theirs = diffusers_pixart(model).config
    for key in ("sample_size", "in_channels", "out_channels", "patch_size", "num_layers", "caption_channels",
                "use_additional_conditions", "interpolation_scale"):
        assert adapter.config[key] == getattr(adapter.config, key) == theirs[key], key
    assert (adapter.dtype, adapter.device) == (torch.float32, torch.device("cpu"))
    adapter.to(torch.float64)  # as pipeline.to(dtype) does: moves the wrapped model itself
    assert adapter.dtype == model.x_embedder.proj.weight.dtype == torch.float64


def test_output_is_diffusers_output_or_a_tuple():
    model = tiny_pixart()
    adapter = to_diffusers(model)
    x, caption, mask = pixart_inputs(model)
    t = torch.tensor([0, 500, 999])
    with torch.no_grad():
        out = adapter(x, encoder_hidden_states=caption, timestep=t, encoder_attention_mask=mask)
        plain = adapter(x, encoder_hidden_states=caption, timestep=t, encoder_attention_mask=mask, return_dict=False)
        expected = model(x, t, caption, mask)
    assert isinstance(out, diffusers.models.modeling_outputs.Transformer2DModelOutput)
    assert isinstance(plain, tuple) and len(plain) == 1
    assert torch.equal(out.sample, expected) and torch.equal(plain[0], expected)


@pytest.mark.parametrize("timestep, ours", [
    (torch.tensor(500), 500), (torch.tensor(499.6), 500), (torch.tensor([250.2]), 250), (731.0, 731), (12, 12)],
    ids=["0-d int", "0-d float", "(1,) float", "python float", "python int"])
def test_timesteps_become_our_integers_for_the_whole_batch(timestep, ours):
    model = tiny_pixart()
    x, caption, mask = pixart_inputs(model)
    expected = model(x, torch.full((3,), ours), caption, mask).detach()
    got = forward(to_diffusers(model), x, encoder_hidden_states=caption, timestep=timestep,
                  encoder_attention_mask=mask)
    assert torch.equal(got, expected)


# --- PixArt: parity with diffusers' transformer in PixArtAlphaPipeline -------------------------------------
@pytest.mark.parametrize("form, output_type", [(PLAIN, "np"), (MS, "latent")], ids=["256-form", "1024-MS"])
def test_pixart_pipeline_equals_diffusers_transformer(vae, form, output_type):
    ours = tiny_pixart(**form)
    expected, pipe = run_pixart_pipeline(diffusers_pixart(ours), vae, output_type)
    got, _ = run_pixart_pipeline(to_diffusers(ours), vae, output_type)
    latent = (2, 4, *form["input_size"])
    assert tuple(got.shape) == ((2, 8 * latent[2], 8 * latent[3], 3) if output_type == "np" else latent)
    assert expected.std() > 0
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("micro", [True, False], ids=["1024-MS", "no micro-conditions ignores them"])
def test_micro_conditions_map_as_diffusers_reads_them(micro):
    # Non-square sizes at the forward level (the pipeline's 1024 path passes a square 1024x1024). A model without
    # micro-conditions ignores them, as PixArtTransformer2DModel without additional conditions does.
    ours = tiny_pixart(input_size=(16, 16), micro_conditions=micro, interpolation_scale=2.0)
    x, caption, mask = pixart_inputs(ours)
    kw = dict(encoder_hidden_states=caption, timestep=torch.tensor([0, 500, 999]), encoder_attention_mask=mask,
              added_cond_kwargs=micro_conditions())
    expected = forward(diffusers_pixart(ours), x, **kw)
    torch.testing.assert_close(forward(to_diffusers(ours), x, **kw), expected, atol=1e-4, rtol=1e-4)
    if micro:  # guard: the sizes matter, so the comparison above is not vacuous
        square = {"resolution": torch.full((3, 2), 1024.0), "aspect_ratio": torch.ones(3, 1)}
        assert not torch.allclose(forward(to_diffusers(ours), x, **{**kw, "added_cond_kwargs": square}), expected,
                                  atol=1e-3)


# --- PixArt: FlexDiT in the pipeline ---------------------------------------------------------------------
def test_flexdit_equal_to_its_dense_model_samples_the_same_in_the_pipeline(vae):
    # At the full grid pooling and upsampling are identities; with X_merged = Xs the FlexDiT is its dense model.
    dense = tiny_pixart(Layout.dense(len(NO_POOL)))
    flex, _ = flexdit_from_dense(dense, NO_POOL, FixedGrid(16, 16))
    merge = flex.blocks[NO_POOL.kinds.index("recover")].merge
    with torch.no_grad():
        merge.sparse.weight.copy_(torch.eye(HIDDEN))
        merge.dense.weight.zero_()
    expected, _ = run_pixart_pipeline(to_diffusers(dense), vae, "latent")
    got, _ = run_pixart_pipeline(to_diffusers(flex.eval()), vae, "latent")
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)



def test_flexdit_density_follows_the_pipelines_timesteps(vae, pooled_grids):
    dense = tiny_pixart(Layout.dense(len(FLEX)))
    flex, _ = flexdit_from_dense(dense, FLEX, DensitySchedule(0.61, 0.86))
    flex.eval()
    dense_latents, _ = run_pixart_pipeline(to_diffusers(dense), vae, "latent")
    pooled_grids.clear()
    latents, pipe = run_pixart_pipeline(to_diffusers(flex), vae, "latent")
    # one SDTM, one grid per step (the guided batch shares its timestep): the density's grid at that timestep
    assert pooled_grids == [flex.grids_for(t[None])[0] for t in pipe.scheduler.timesteps]
    assert len(set(pooled_grids)) > 1
    assert latents.shape == dense_latents.shape and torch.isfinite(latents).all()
    assert not torch.allclose(latents, dense_latents, atol=1e-3)  # sparse tokens: a different model


def test_flexdit_forward_through_the_adapter_is_the_models_own():
    dense = tiny_pixart(Layout.dense(len(FLEX)), input_size=(16, 16), micro_conditions=True)
    flex, _ = flexdit_from_dense(dense, FLEX, DensitySchedule(0.61, 0.86))
    x, caption, mask = pixart_inputs(flex)
    t = torch.tensor([999, 0, 600])  # three grids: the batch runs as groups
    sizes = micro_conditions()
    with torch.no_grad():
        expected = flex(x, t, caption, mask, sizes["resolution"], sizes["aspect_ratio"])
    got = forward(to_diffusers(flex), x, encoder_hidden_states=caption, timestep=t, encoder_attention_mask=mask,
                  added_cond_kwargs=sizes)
    assert torch.equal(got, expected)


# --- DiT: parity with diffusers' transformer in DiTPipeline, the null class ----------------------------------
DIT_DEPTH = 2


def tiny_dit(num_classes: int = 1000, class_dropout_prob: float = 0.1, **kw) -> DiT:
    config = tiny_dit_config(Layout.dense(DIT_DEPTH), num_classes=num_classes, class_dropout_prob=class_dropout_prob,
                             timestep_freq_shift=1, **kw)
    return randomize(DiT(config), seed=3).eval()


def diffusers_dit(ours: DiT) -> torch.nn.Module:
    c = ours.config
    theirs = diffusers.DiTTransformer2DModel(
        num_attention_heads=c.num_heads, attention_head_dim=c.hidden_size // c.num_heads, num_layers=DIT_DEPTH,
        sample_size=c.input_size[0], patch_size=c.patch_size, in_channels=c.in_channels,
        out_channels=c.out_channels, num_embeds_ada_norm=c.num_classes, norm_eps=1e-6).eval()
    theirs.load_state_dict(dit_state_to_diffusers(ours.state_dict(), DIT_DEPTH), strict=True)
    return theirs


def run_dit_pipeline(transformer, vae, guidance_scale: float = 4.0) -> torch.Tensor:
    pipe = diffusers.DiTPipeline(transformer=transformer, vae=vae, scheduler=diffusers.DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    out = pipe(class_labels=[3, 7], guidance_scale=guidance_scale, num_inference_steps=3, output_type="np",
               generator=torch.Generator().manual_seed(0))
    return torch.as_tensor(out.images)


def test_dit_pipeline_equals_diffusers_transformer(vae):
    ours = tiny_dit()
    expected = run_dit_pipeline(diffusers_dit(ours), vae)
    got = run_dit_pipeline(to_diffusers(ours), vae)
    assert got.shape == (2, 8 * 16, 8 * 16, 3) and expected.std() > 0
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_pipeline_null_class_becomes_the_models_own(vae):
    # DiTPipeline passes 1000 for the unconditional half; a 10-class DiT's null class is row 10.
    model = tiny_dit(num_classes=10)
    x = torch.randn(2, 4, 16, 16)
    t = torch.tensor([999, 999])
    with torch.no_grad():
        expected = model(x, t, torch.tensor([3, 10]))
    got = forward(to_diffusers(model), x, timestep=t, class_labels=torch.tensor([3, 1000]))
    assert torch.equal(got, expected)
    images = run_dit_pipeline(to_diffusers(model), vae)
    assert images.shape == (2, 128, 128, 3) and torch.isfinite(images).all()


def test_pipeline_guidance_needs_a_null_class(vae):
    model = tiny_dit(num_classes=1000, class_dropout_prob=0.0)
    with pytest.raises(FlexDiTError, match="guidance_scale=1"):
        run_dit_pipeline(to_diffusers(model), vae)
    assert torch.isfinite(run_dit_pipeline(to_diffusers(model), vae, guidance_scale=1.0)).all()


# --- errors --------------------------------------------------------------------------------------------
def _pixart_call(model_kw: dict | None = None, **kw):
    def call():
        model = tiny_pixart(input_size=(16, 16), **(model_kw or {}))
        x, caption, mask = pixart_inputs(model)
        args = dict(encoder_hidden_states=caption, timestep=torch.tensor([0, 1, 2]), encoder_attention_mask=mask)
        to_diffusers(model)(x, **{**args, **kw})
    return call


ERROR_CASES = [
    ("not a flexdit model", lambda: to_diffusers(torch.nn.Linear(2, 2)), ["DiT or PixArt", "Linear"]),
    ("FlexDiT without density",
     lambda: to_diffusers(tiny_pixart(FLEX, input_size=(16, 16)).with_density(None)), ["density", "with_density"]),
    ("DiT with more than 1000 classes", lambda: to_diffusers(tiny_dit(num_classes=1001)), ["1000", "1001 classes"]),
    ("non-square DiT", lambda: to_diffusers(tiny_dit(input_size=(16, 8))), ["square", "16x8"]),
    ("timestep out of range", _pixart_call(timestep=torch.tensor(1000.0)), ["0..999", "1000"]),
    ("timestep count", _pixart_call(timestep=torch.tensor([1, 2])), ["2 values", "batch of 3"]),
    ("no timestep", _pixart_call(timestep=None), ["timestep"]),
    ("no caption", _pixart_call(encoder_hidden_states=None), ["encoder_hidden_states", "prompt_embeds"]),
    ("bias-form mask", _pixart_call(encoder_attention_mask=torch.zeros(3, 1, 7)), ["(B, L)", "(3, 1, 7)"]),
    ("hidden-state mask", _pixart_call(attention_mask=torch.ones(3, 64)), ["attention_mask", "drop"]),
    ("unknown added_cond_kwargs", _pixart_call(added_cond_kwargs={"fps": 1}), ["fps", "resolution"]),
    ("1024-MS without sizes", _pixart_call(dict(micro_conditions=True),
                                           added_cond_kwargs={"resolution": None, "aspect_ratio": None}),
     ["1024-MS", "resolution"]),
]


@pytest.mark.parametrize("name, call, words", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_user_errors_name_the_problem(name, call, words):
    assert_one_line_error(call, words)
