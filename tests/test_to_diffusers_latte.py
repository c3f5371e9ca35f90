"""to_diffusers for Latte: a caption Latte as the transformer of diffusers' LattePipeline, compared with diffusers'
LatteTransformer3DModel holding the same weights in the same pipeline; the attention-mask forms; a FlexDiT Latte in
the pipeline; errors."""
import pytest
import torch

from flexdit.diffusers_interop import to_diffusers
from flexdit.models.from_dense import flexdit_from_dense
from flexdit.models.latte import Latte, config_to_diffusers, state_to_diffusers
from flexdit.models.layout import Layout
from flexdit.schedule import DensitySchedule
from conftest import assert_one_line_error
from test_latte import CAPTION_CH, FLEX, FRAMES, SIZE, caption_batch, tiny_latte, videos
from test_to_diffusers import tiny_vae

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers", reason="diffusers' LattePipeline needs transformers")

PIPELINE_SIZE = dict(video_length=FRAMES, height=8 * SIZE, width=8 * SIZE)  # the pipeline defaults to 16 x 512 px
SCHEDULERS = {  # DDIM has no variance type: the pipeline keeps the noise half; DDPM learned_range splits it itself
    "ddim": lambda: diffusers.DDIMScheduler(),
    "ddpm-learned-range": lambda: diffusers.DDPMScheduler(variance_type="learned_range"),
}


# --- helpers -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vae():
    return tiny_vae()


def caption_latte(layout: Layout = Layout.dense(2), **kw) -> Latte:
    return tiny_latte(layout, "caption", **kw)


def diffusers_latte(ours: Latte) -> torch.nn.Module:
    """diffusers' own LatteTransformer3DModel holding our dense weights."""
    theirs = diffusers.LatteTransformer3DModel(**config_to_diffusers(ours.config)).eval()
    theirs.load_state_dict(state_to_diffusers(ours.state_dict(), ours.config), strict=True)
    return theirs


def prompt_embeds(batch: int = 2, length: int = 7, seed: int = 5) -> dict:
    """T5-like prompt and negative-prompt embeddings of one shape, in place of a text encoder."""
    g = torch.Generator().manual_seed(seed)
    return dict(prompt_embeds=torch.randn(batch, length, CAPTION_CH, generator=g),
                negative_prompt_embeds=torch.randn(batch, length, CAPTION_CH, generator=g))


def run_pipeline(transformer: torch.nn.Module, vae: torch.nn.Module, scheduler: str = "ddim", **kw):
    """Latents with guidance, and the pipeline (whose scheduler holds the timesteps it ran)."""
    pipe = diffusers.LattePipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                                   scheduler=SCHEDULERS[scheduler]())
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt=None, negative_prompt=None, num_inference_steps=3, guidance_scale=4.5, output_type="latent",
               generator=torch.Generator().manual_seed(0), **{**PIPELINE_SIZE, **prompt_embeds(), **kw})
    return out.frames, pipe


def frame_bias(mask: torch.Tensor, frames: int) -> torch.Tensor:
    """(B, L) 1/0 -> the (B*F, 1, L) additive bias, 0 = keep, -10000 = discard, that diffusers' Latte accepts."""
    return ((1 - mask.float()) * -10000.0)[:, None].repeat_interleave(frames, dim=0)


def forward(transformer, x, **kw) -> torch.Tensor:
    with torch.no_grad():
        return transformer(x, return_dict=False, **kw)[0]


# --- the adapter ---------------------------------------------------------------------------------------
def test_adapter_wraps_the_model_and_carries_the_pipeline_config():
    model = caption_latte()
    adapter = to_diffusers(model)
    assert adapter.model is model and list(adapter.parameters()) == list(model.parameters())
    theirs = diffusers_latte(model).config
    for key in ("sample_size", "in_channels", "out_channels", "patch_size", "num_layers", "num_attention_heads",
                "attention_head_dim", "caption_channels", "cross_attention_dim", "video_length"):
        assert adapter.config[key] == getattr(adapter.config, key) == theirs[key], key
    assert (adapter.dtype, adapter.device) == (torch.float32, torch.device("cpu"))


def test_forward_equals_diffusers_transformer_with_every_mask_form():
    ours = caption_latte()
    x, t = videos(ours, batch=3, t=[0, 500, 999])
    caption, mask = caption_batch(3)  # the last two tokens of samples 1 and 2 are padding
    expected = forward(diffusers_latte(ours), x, timestep=t, encoder_hidden_states=caption,
                       encoder_attention_mask=frame_bias(mask, FRAMES))
    adapter = to_diffusers(ours)
    bias = ((1 - mask.float()) * -10000.0)[:, None]  # (B, 1, L)
    for form in (mask, mask.bool(), bias, frame_bias(mask, FRAMES)):
        got = forward(adapter, x, timestep=t, encoder_hidden_states=caption, encoder_attention_mask=form)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # guard: the padding matters, so the comparisons above are not vacuous
    unmasked = forward(adapter, x, timestep=t, encoder_hidden_states=caption)
    assert not torch.allclose(unmasked, expected, atol=1e-3)
    with torch.no_grad():
        out = adapter(x, t, caption)
    assert isinstance(out, diffusers.models.modeling_outputs.Transformer2DModelOutput)
    assert torch.equal(out.sample, unmasked)


# --- parity with diffusers' transformer in LattePipeline --------------------------------------------------
@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_pipeline_equals_diffusers_transformer(vae, scheduler):
    ours = caption_latte()
    expected, _ = run_pipeline(diffusers_latte(ours), vae, scheduler)
    got, _ = run_pipeline(to_diffusers(ours), vae, scheduler)
    assert tuple(got.shape) == (2, 4, FRAMES, SIZE, SIZE) and expected.std() > 0
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


# --- a FlexDiT Latte in the pipeline -------------------------------------------------------------------------
def test_flexdit_latte_runs_in_the_pipeline_at_the_scheduled_density(vae, pooled_grids):
    dense = caption_latte(Layout.dense(len(FLEX)))
    flex, _ = flexdit_from_dense(dense, FLEX, DensitySchedule(0.61, 0.86))
    dense_latents, _ = run_pipeline(to_diffusers(dense), vae)
    pooled_grids.clear()
    latents, pipe = run_pipeline(to_diffusers(flex.eval()), vae)
    # one SDTM, one grid per step (the guided batch shares its timestep): the density's grid at that timestep
    assert pooled_grids == [flex.grids_for(t[None])[0] for t in pipe.scheduler.timesteps]
    assert len(set(pooled_grids)) > 1
    assert latents.shape == dense_latents.shape and torch.isfinite(latents).all()
    assert not torch.allclose(latents, dense_latents, atol=1e-3)  # sparse tokens: a different model


# --- errors --------------------------------------------------------------------------------------------
def _latte_call(model_kw: dict | None = None, x=None, **kw):
    def call():
        model = caption_latte(**(model_kw or {}))
        x_, t = videos(model, batch=3)
        caption, mask = caption_batch(3)
        args = dict(timestep=t, encoder_hidden_states=caption, encoder_attention_mask=mask)
        to_diffusers(model)(x_ if x is None else x, **{**args, **kw})
    return call


def _pipeline_call(**kw):
    def call():
        run_pipeline(to_diffusers(caption_latte()), tiny_vae(), **kw)
    return call


L = caption_batch(3)[0].shape[1]
DISAGREEING = torch.zeros(3 * FRAMES, 1, L).index_fill_(0, torch.tensor([1]), -10000.0)  # frame 1 of video 0 masked
ERROR_CASES = [
    ("unconditional Latte", lambda: to_diffusers(tiny_latte()), ["conditioning='none'", "flexdit's own sampler"]),
    ("class Latte", lambda: to_diffusers(tiny_latte(conditioning="class")), ["conditioning='class'"]),
    ("noise-only Latte", lambda: to_diffusers(caption_latte(learn_sigma=False)), ["learned sigma", "noise-only"]),
    ("FlexDiT without density", lambda: to_diffusers(caption_latte(FLEX, density={"grid": [4, 4]}).with_density(None)),
     ["density", "with_density"]),
    ("not a flexdit model", lambda: to_diffusers(torch.nn.Linear(2, 2)), ["caption Latte", "Linear"]),
    ("temporal attentions off", _latte_call(enable_temporal_attentions=False), ["enable_temporal_attentions", "True"]),
    ("temporal attentions off in the pipeline", _pipeline_call(enable_temporal_attentions=False),
     ["enable_temporal_attentions"]),
    ("pipeline's default video length", _pipeline_call(video_length=16),
     ["(B, 4, 3, 16, 16)", f"video_length={FRAMES}", f"height={8 * SIZE}"]),
    ("no caption", _latte_call(encoder_hidden_states=None), ["encoder_hidden_states", "prompt_embeds"]),
    ("timestep count", _latte_call(timestep=torch.tensor([1, 2])), ["2 values", "batch of 3"]),
    ("mask shape", _latte_call(encoder_attention_mask=torch.ones(3, 2, L)), ["(3, 2, 6)", "(3, 1, 6)", "(9, 1, 6)"]),
    ("soft bias", _latte_call(encoder_attention_mask=torch.full((3, 1, L), -1.0)), ["soft biases", "(B, L)"]),
    ("frames disagree", _latte_call(encoder_attention_mask=DISAGREEING), ["differs between frames"]),
]


@pytest.mark.parametrize("name, call, words", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_user_errors_name_the_problem(name, call, words):
    assert_one_line_error(call, words)
