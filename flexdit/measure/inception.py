"""The FID Inception network: InceptionV3 as TensorFlow's 2015-12-05 graph computes it (the network of the
original FID, improved-gan's Inception Score and ADM's evaluator), in the PyTorch port's weight layout
(pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`), so that file loads strictly.

The port differs from torchvision's ImageNet InceptionV3 where the TF graph does: 1008 output classes, every
average-pooling branch ignores padded zeros (count_include_pad=False), and the last block's pooling branch is a
3x3 max pool of stride 1. There is no auxiliary classifier.

One forward gives what ADM's evaluator reads from the graph, per image:
- pool (2048): the global average pool after the last block ("pool_3"): FID, precision and recall;
- spatial (2023): the first 7 channels of Mixed_6d's 1x1 branch (17x17x192 after BN and ReLU, TF's
  "mixed_6/conv"), flattened height, width, channel as TF's NHWC tensor is: sFID;
- logits (1008): pool times the final layer's weight matrix, without its bias, as improved-gan and ADM build
  their softmax from the graph's "softmax/logits/MatMul" input: the Inception Score. (fc.bias is loaded, so
  the file loads strictly, and not used.)

Inputs are uint8 NHWC images of any size, scaled to [0, 1], resized to 299x299 bilinearly
(align_corners=False) and mapped to [-1, 1], as pytorch-fid does; grey images are repeated to 3 channels.
"""
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from flexdit.errors import FlexDiTError

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_NAME}"
ENV_VAR = "FLEXDIT_INCEPTION"
SIDE = 299
POOL_DIM, SPATIAL_CHANNELS, SPATIAL_SIDE, NUM_LOGITS = 2048, 7, 17, 1008
SPATIAL_DIM = SPATIAL_SIDE * SPATIAL_SIDE * SPATIAL_CHANNELS  # 2023


class BasicConv2d(nn.Module):
    """Convolution without bias, BatchNorm (TF's epsilon 0.001), ReLU."""

    def __init__(self, c_in: int, c_out: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x: torch.Tensor) -> torch.Tensor:
    """3x3, stride 1, padding 1, averaging only the pixels inside the image (TF's SAME average pooling)."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionBlock(nn.Module, ABC):
    """A block whose output is its branches concatenated along channels; `branches` gives them separately."""

    @abstractmethod
    def branches(self, x: torch.Tensor) -> list[torch.Tensor]: ...

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.branches(x), 1)


class InceptionA(InceptionBlock):
    """35x35 block: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avg pool-1x1; 224 + pool_features channels."""

    def __init__(self, c_in: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 64, 1)
        self.branch5x5_1 = BasicConv2d(c_in, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(c_in, pool_features, 1)

    def branches(self, x):
        return [self.branch1x1(x),
                self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                self.branch_pool(_avg_pool(x))]


class InceptionB(InceptionBlock):
    """35x35 -> 17x17 reduction: 3x3/2 | 1x1-3x3-3x3/2 | max pool 3x3/2; 384 + 96 + c_in channels."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def branches(self, x):
        return [self.branch3x3(x),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                F.max_pool2d(x, 3, stride=2)]


class InceptionC(InceptionBlock):
    """17x17 block with factorised 7x7 convolutions (c7 channels inside); 4 x 192 = 768 channels."""

    def __init__(self, c_in: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def branches(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d7 = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d7 = layer(d7)
        return [self.branch1x1(x), b7, d7, self.branch_pool(_avg_pool(x))]


class InceptionD(InceptionBlock):
    """17x17 -> 8x8 reduction: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | max pool 3x3/2; 320 + 192 + c_in channels."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def branches(self, x):
        b7 = x
        for layer in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7)
        return [self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)]


class InceptionE(InceptionBlock):
    """8x8 block with split 1x3/3x1 convolutions; 320 + 768 + 768 + 192 = 2048 channels. pool = "avg" (Mixed_7b)
    or "max" (Mixed_7c: the TF graph max-pools there)."""

    def __init__(self, c_in: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(c_in, 320, 1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def branches(self, x):
        b3 = self.branch3x3_1(x)
        d3 = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = _avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
        return [self.branch1x1(x),
                torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1),
                torch.cat([self.branch3x3dbl_3a(d3), self.branch3x3dbl_3b(d3)], 1),
                self.branch_pool(pooled)]


class InceptionOutput(NamedTuple):
    pool: torch.Tensor  # (N, 2048)
    spatial: torch.Tensor  # (N, 2023)
    logits: torch.Tensor  # (N, 1008), without the fc bias


class FIDInceptionV3(nn.Module):
    """The FID InceptionV3; module names are torchvision's, so the pytorch-fid weights load as they are."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(POOL_DIM, NUM_LOGITS)

    @staticmethod
    def preprocess(images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 1 or 3) -> float32 (N, 3, 299, 299) in [-1, 1]: scaled to [0, 1], resized bilinearly
        (align_corners=False), then 2x - 1 (pytorch-fid's order)."""
        x = images.permute(0, 3, 1, 2).float() / 255.0
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[2:] != (SIDE, SIDE):
            x = F.interpolate(x, size=(SIDE, SIDE), mode="bilinear", align_corners=False)
        return 2.0 * x - 1.0

    def forward_prepared(self, x: torch.Tensor) -> InceptionOutput:
        """x (N, 3, 299, 299) in [-1, 1] -> pool, spatial and logits."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (N, 64, 147, 147)
        x = F.max_pool2d(x, 3, stride=2)  # 73x73
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (N, 192, 71, 71)
        x = F.max_pool2d(x, 3, stride=2)  # 35x35
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c):
            x = block(x)  # ends (N, 768, 17, 17)
        parts = self.Mixed_6d.branches(x)
        spatial = parts[0][:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)  # (N, 17*17*7), NHWC like TF
        x = torch.cat(parts, 1)
        for block in (self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)  # ends (N, 2048, 8, 8)
        pool = x.mean(dim=(2, 3))
        return InceptionOutput(pool, spatial, pool @ self.fc.weight.T)

    def forward(self, images: torch.Tensor) -> InceptionOutput:
        """uint8 NHWC images (N, H, W, 1 or 3), any size -> pool (N, 2048), spatial (N, 2023), logits (N, 1008)."""
        return self.forward_prepared(self.preprocess(images))


def default_weights_path() -> Path:
    """$FLEXDIT_INCEPTION if set, else where pytorch-fid caches the file (torch hub's checkpoints folder)."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_NAME


def _read_state(path: Path) -> dict:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated, pickled code refused by weights_only, not a weights file at all
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise FlexDiTError(f"cannot read Inception weights {path} ({reason}); expected pytorch-fid's "
                           f"{WEIGHTS_NAME} from {WEIGHTS_URL}") from None


def load_inception(path: str | os.PathLike | None = None, device="cpu") -> FIDInceptionV3:
    """The FID Inception in eval mode, weights from `path`, else $FLEXDIT_INCEPTION, else pytorch-fid's cache
    (~/.cache/torch/hub/checkpoints/). Never downloads: a missing file is a FlexDiTError saying how to get it."""
    if path is not None:
        path, origin = Path(path).expanduser(), ""
    else:
        path = default_weights_path()
        origin = f" (from ${ENV_VAR})" if os.environ.get(ENV_VAR) else f" (pytorch-fid's cache; ${ENV_VAR} is not set)"
    if not path.is_file():
        raise FlexDiTError(f"FID Inception weights not found: {path}{origin}; flexdit never downloads: get "
                           f"{WEIGHTS_URL} (pytorch-fid's port of the TF graph) and pass --inception PATH or set "
                           f"${ENV_VAR}")
    state = _read_state(path)
    model = FIDInceptionV3()
    refused = FlexDiTError(f"{path} is not the FID Inception weights (different tensors or shapes); use pytorch-fid's "
                           f"{WEIGHTS_NAME} from {WEIGHTS_URL}")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise refused
    state = dict(state)
    for name, module in model.named_modules():  # files written without BatchNorm's counter still load strictly
        if isinstance(module, nn.BatchNorm2d):
            state.setdefault(f"{name}.num_batches_tracked", torch.tensor(0))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError:
        raise refused from None
    return model.to(device).eval()


def _check_images(images) -> None:
    shape = tuple(images.shape)
    if images.dtype != np.uint8 or len(shape) != 4 or shape[3] not in (1, 3):
        raise FlexDiTError(f"images are {images.dtype} {shape}; expected uint8 NHWC (N, H, W, 1 or 3)")
    if shape[0] == 0 or shape[1] == 0 or shape[2] == 0:
        raise FlexDiTError(f"images have shape {shape}; need at least one non-empty image")


@torch.inference_mode()
def inception_features(model: FIDInceptionV3, images, batch_size: int = 64, device=None, progress: bool = True,
                       desc: str = "inception") -> dict[str, np.ndarray]:
    """{"pool": (N, 2048), "spatial": (N, 2023), "logits": (N, 1008)} float64 of uint8 NHWC images: a numpy
    array, or anything with .shape, .dtype and row slicing (the evaluator's lazy npz reader). Batches are read
    and converted one at a time, so only one batch is ever float; the features do not depend on batch_size."""
    _check_images(images)
    if batch_size < 1:
        raise FlexDiTError(f"batch_size must be at least 1, got {batch_size}")
    device = next(model.parameters()).device if device is None else torch.device(device)
    model.eval().to(device)
    n = images.shape[0]
    out = {"pool": np.empty((n, POOL_DIM)), "spatial": np.empty((n, SPATIAL_DIM)), "logits": np.empty((n, NUM_LOGITS))}
    with tqdm(total=n, desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for start in range(0, n, batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])).to(device)
            result = model(batch)
            for key, value in zip(InceptionOutput._fields, result):
                out[key][start:start + len(batch)] = value.double().cpu().numpy()
            bar.update(len(batch))
    return out
