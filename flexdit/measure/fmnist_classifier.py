"""The Fashion-MNIST domain network: a small CNN whose penultimate features give FID-FM and precision/recall,
and whose predictions give the class accuracy of class-conditional samples.

FID on ImageNet Inception features says little about 28x28 grey clothes, so flexdit ships its own network
(trained by scripts/train_fmnist_classifier.py; the weights file's metadata records its test accuracy and
settings). Inputs are what the Fashion-MNIST data source gives: 1x32x32 in [-1, 1], the 28x28 images padded
with background (0, i.e. -1 after scaling), so features of samples and of real data are comparable.
"""
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from flexdit.errors import FlexDiTError

WEIGHTS = Path(__file__).parent / "weights" / "fmnist_classifier.safetensors"
SIDE, RAW_SIDE = 32, 28  # the padded side the network sees, and Fashion-MNIST's own
CHANNELS = (32, 64, 128)  # per stage; each stage halves the side: 32 -> 16 -> 8 -> 4
FEATURE_DIM, NUM_CLASSES = 128, 10


def conv_stage(c_in: int, c_out: int) -> nn.Sequential:
    """3x3 conv (no bias: BatchNorm follows), BatchNorm, GELU, 2x2 max pooling."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.GELU(),
                         nn.MaxPool2d(2))


class FashionMNISTClassifier(nn.Module):
    """Three conv stages, a 128-wide feature layer (the FID-FM features) and a linear head to the 10 classes."""

    def __init__(self):
        super().__init__()
        self.stages = nn.Sequential(*(conv_stage(c_in, c_out) for c_in, c_out in zip((1, *CHANNELS), CHANNELS)))
        final_side = SIDE // 2 ** len(CHANNELS)
        self.feature = nn.Sequential(nn.Flatten(), nn.Linear(CHANNELS[-1] * final_side ** 2, FEATURE_DIM), nn.GELU())
        self.head = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 1, 32, 32) in [-1, 1] -> penultimate activations (B, 128)."""
        return self.feature(self.stages(x))  # stages: (B, 128, 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 1, 32, 32) in [-1, 1] -> logits (B, 10)."""
        return self.head(self.features(x))


def load_classifier(path: str | Path | None = None, device="cpu") -> FashionMNISTClassifier:
    """The classifier in eval mode with the weights shipped in the package, or those at `path`."""
    path = WEIGHTS if path is None else Path(path)
    try:
        state = load_file(str(path))
    except FileNotFoundError:
        raise FlexDiTError(f"classifier weights not found: {path}; reinstall flexdit or train them with "
                           "scripts/train_fmnist_classifier.py") from None
    except (OSError, SafetensorError) as e:
        raise FlexDiTError(f"cannot read classifier weights {path} ({e}); train them again with "
                           "scripts/train_fmnist_classifier.py") from None
    model = FashionMNISTClassifier()
    try:
        model.load_state_dict(state)
    except RuntimeError:
        raise FlexDiTError(f"{path} does not hold FashionMNISTClassifier weights (different tensors or shapes); "
                           "train them with scripts/train_fmnist_classifier.py") from None
    return model.to(device).eval()


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 1), H = 28 or 32, -> float32 (B, 1, 32, 32) in [-1, 1], padded and scaled exactly as the
    Fashion-MNIST data source does; float input is taken as already (B, 1, 32, 32) in [-1, 1]."""
    if images.dtype != torch.uint8:
        return images.float()
    pad = (SIDE - images.shape[2]) // 2
    # the channel dropped and re-inserted rather than permuted: a permuted (B, 1, H, W) has channels_last strides,
    # which send the convolutions down another path whose results differ in the last bits
    x = F.pad(images[..., 0], (pad, pad, pad, pad)).unsqueeze(1)  # (B, 1, 32, 32), background 0
    return x.float() / 127.5 - 1


def _check_images(x: torch.Tensor) -> None:
    shape = tuple(x.shape)
    if x.dtype == torch.uint8:
        if x.ndim != 4 or shape[1:] not in ((SIDE, SIDE, 1), (RAW_SIDE, RAW_SIDE, 1)):
            raise FlexDiTError(f"uint8 images have shape {shape}; expected (N, 32, 32, 1) or (N, 28, 28, 1), NHWC")
    elif x.is_floating_point():
        if x.ndim != 4 or shape[1:] != (1, SIDE, SIDE):
            raise FlexDiTError(f"float images have shape {shape}; expected (N, 1, 32, 32) in [-1, 1]")
        if x.numel() and x.abs().max() > 1 + 1e-3:
            raise FlexDiTError("float images must lie in [-1, 1]; pass uint8 pixels (0..255) as uint8")
    else:
        raise FlexDiTError(f"images have dtype {x.dtype}; expected uint8 NHWC or float (N, 1, 32, 32)")
    if shape[0] == 0:
        raise FlexDiTError("no images to classify")


@torch.no_grad()
def classify(model: FashionMNISTClassifier, images: np.ndarray | torch.Tensor,
             batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, 128) float64, logits (N, 10) float64) of uint8 NHWC images (N, 32, 32, 1) or (N, 28, 28, 1),
    as the sampler writes them (ADM npz arr_0), or float (N, 1, 32, 32) in [-1, 1]. Converted batch by batch,
    so a 50k-sample npz is never held as float32 at once."""
    x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.array(images))  # a writable copy
    _check_images(x)
    if batch_size < 1:
        raise FlexDiTError(f"batch_size must be at least 1, got {batch_size}")
    model.eval()
    device = next(model.parameters()).device
    features, logits = [], []
    for start in range(0, x.shape[0], batch_size):
        f = model.features(to_model_input(x[start:start + batch_size]).to(device))  # (b, 128)
        features.append(f.double().cpu())
        logits.append(model.head(f).double().cpu())
    return torch.cat(features).numpy(), torch.cat(logits).numpy()
