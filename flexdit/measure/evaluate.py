"""The evaluator behind `flexdit eval`: ADM-format npz batches in, FID / sFID / Inception Score / precision /
recall out, as guided-diffusion's evaluations/evaluator.py computes them, with the maths of fidelity.py.

Batches are ADM's: `arr_0` uint8 NHWC images (1 or 3 channels), optionally `arr_1` labels. A reference batch
may also carry precomputed statistics, `mu`, `sigma` (pool features) and `mu_s`, `sigma_s` (spatial features),
as ADM's VIRTUAL_imagenet256_labeled.npz does; they are used for FID and sFID when present (as ADM does), and
the statistics are computed from the reference images otherwise. Precision and recall need the reference
images themselves; a reference holding statistics only gives them as None, with a note.

features="inception" uses the FID Inception (flexdit.measure.inception); features="fmnist" uses flexdit's
Fashion-MNIST classifier instead (1-channel 28 or 32 px images): FID on its 128-d features (FID-FM), the
Inception Score formula on its 10-class logits (IS-FM, at most 10), precision/recall on its features, and the
class accuracy of labelled samples (argmax class == arr_1, which must then be class ids 0..9). There is no
spatial feature, so no sFID.

The npz is read without numpy.load: each member's .npy header is checked against the member's size in the zip
before anything is allocated (a corrupt header cannot ask for terabytes), object arrays are refused (never
unpickled), and arr_0 is read one batch at a time, so a 50k x 512 x 512 x 3 batch (39 GB) never sits in
memory; only the features do (50k x 2048 float64 = 0.8 GB per kind).
"""
import math
import os
import zipfile
import zlib
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flexdit.errors import FlexDiTError
from flexdit.measure.fidelity import feature_statistics, frechet_distance, inception_score, precision_recall
from flexdit.measure.fmnist_classifier import FEATURE_DIM, NUM_CLASSES, RAW_SIDE, SIDE, classify, load_classifier
from flexdit.measure.inception import POOL_DIM, SPATIAL_DIM, inception_features, load_inception

FEATURES = ("inception", "fmnist")
FEATURE_DIMS = {"inception": {"pool": POOL_DIM, "spatial": SPATIAL_DIM}, "fmnist": {"pool": FEATURE_DIM}}
NEIGHBOURS = 3  # ADM's k for precision/recall
MIN_IMAGES = NEIGHBOURS + 1  # a covariance needs 2 images; the k-th nearest other image needs k + 1
STAT_KEYS = {"pool": ("mu", "sigma"), "spatial": ("mu_s", "sigma_s")}
DEFAULT_BATCH = {"inception": 64, "fmnist": 500}
MAX_DEFLATE_RATIO = 1032  # deflate never expands its input more than this: a member claiming more lies
HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
# what a damaged zip member raises when read: bad CRC or local header, short or corrupt stream, bad .npy header
READ_ERRORS = (OSError, EOFError, ValueError, RuntimeError, zipfile.BadZipFile, zlib.error)
REWRITE = "the file is truncated or corrupt, write it again with numpy.savez"


class NpzArray:
    """One array of an npz, read on demand: .shape and .dtype from its .npy header, which must agree with the
    member's size in the zip; rows by slicing, or read() for the whole array. Reads in increasing order are
    streamed (a compressed member is decompressed once, front to back)."""

    def __init__(self, path: Path, info: zipfile.ZipInfo, member):
        self.path, self.key, self._file = path, info.filename[:-len(".npy")], member
        try:
            version = np.lib.format.read_magic(member)
            if version not in HEADER_READERS:
                raise ValueError(f"npy format version {version}")
            self.shape, self.fortran_order, self.dtype = HEADER_READERS[version](member)
            self._offset = member.tell()
        except READ_ERRORS as e:
            raise FlexDiTError(f"{path}: {self.key} is not a readable array ({e}); {REWRITE}") from None
        if self.dtype.hasobject:
            raise FlexDiTError(f"{path}: {self.key} holds Python objects (dtype {self.dtype}), which flexdit never "
                               "unpickles; save plain numeric arrays (uint8 images, integer labels)")
        nbytes = math.prod(self.shape) * self.dtype.itemsize
        if self._offset + nbytes != info.file_size:
            raise FlexDiTError(f"{path}: the header of {self.key} says {self.dtype} {self.shape} ({nbytes} bytes) "
                               f"but the member holds {info.file_size - self._offset} bytes; {REWRITE}")

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("NpzArray reads contiguous row ranges only")
        start, stop, _ = rows.indices(self.shape[0])
        row_bytes = math.prod(self.shape[1:]) * self.dtype.itemsize
        return self._read(start * row_bytes, (max(stop - start, 0), *self.shape[1:]))

    def read(self) -> np.ndarray:
        """The whole array: for the small members (labels, statistics)."""
        if self.fortran_order:  # column-major bytes are the row-major bytes of the transpose
            return self._read(0, self.shape[::-1]).T
        return self._read(0, self.shape)

    def _read(self, offset: int, shape: tuple) -> np.ndarray:
        out = np.empty(shape, dtype=self.dtype)  # writable, filled in place
        view, filled = memoryview(out.reshape(-1).view(np.uint8)), 0
        try:
            self._file.seek(self._offset + offset)
            while filled < len(view):
                n = self._file.readinto(view[filled:])
                if not n:
                    raise EOFError("the data ends early")
                filled += n
        except READ_ERRORS as e:
            raise FlexDiTError(f"{self.path}: cannot read {self.key} ({e}); {REWRITE}") from None
        return out


@dataclass
class Batch:
    """An opened ADM batch: images (lazy) or None, labels or None, precomputed statistics by feature kind."""
    path: Path
    images: NpzArray | None = None
    labels: np.ndarray | None = None
    stats: dict = field(default_factory=dict)  # "pool" / "spatial" -> (mu, sigma)


def check_results_path(path, inputs) -> None:
    """Refuse, before any work, a results file that is a folder or one of the inputs (it would replace it)."""
    path = Path(path)
    if path.is_dir():
        raise FlexDiTError(f"--json {path} is a directory; give a file path such as {path / 'metrics.json'}")
    for given in inputs:
        if path.exists() and Path(given).exists() and os.path.samefile(path, given):
            raise FlexDiTError(f"--json {path} is the input {given}; writing the results would destroy it, "
                               "choose another path")


def _open_batch(path, role: str, features: str, stack: ExitStack) -> Batch:
    path = _regular_file(Path(path), role)
    arrays = _open_arrays(path, role, stack)
    batch = Batch(path, images=arrays.get("arr_0"))
    if batch.images is None and not (role == "reference" and "mu" in arrays):
        what = "arr_0 (uint8 NHWC images)" + (" or precomputed statistics mu, sigma" if role == "reference" else "")
        raise FlexDiTError(f"{role} file {path} has no {what}; keys present: {', '.join(sorted(arrays)) or 'none'}")
    if batch.images is not None:
        _check_images(batch.images)
    if role == "samples" and features == "fmnist" and "arr_1" in arrays:  # only the class accuracy uses labels
        batch.labels = _read_labels(arrays["arr_1"], len(batch.images))
    if role == "reference":
        batch.stats = _read_statistics(arrays, features)
    return batch


def _regular_file(path: Path, role: str) -> Path:
    """The path, if it is a non-empty regular file: a folder, a pipe or a device is refused before it is read."""
    if not path.exists():
        raise FlexDiTError(f"{role} file not found: {path}")
    if path.is_dir():
        raise FlexDiTError(f"{role} file {path} is a directory; give the npz file itself")
    if not path.is_file():
        raise FlexDiTError(f"{role} file {path} is not a regular file (a pipe or a device); save the batch to an "
                           "npz file first")
    if path.stat().st_size == 0:
        raise FlexDiTError(f"{role} file {path} is empty; write it again with numpy.savez")
    return path


def _open_arrays(path: Path, role: str, stack: ExitStack) -> dict[str, NpzArray]:
    """Every .npy member of the npz by key, headers checked; the member files close with the stack."""
    try:
        archive = stack.enter_context(zipfile.ZipFile(path))
    except zipfile.BadZipFile:
        with open(path, "rb") as f:
            is_zip = f.read(4) == b"PK\x03\x04"  # a zip's start without its directory (which comes last)
        raise FlexDiTError(f"{role} file {path} is truncated (its zip directory is missing); write it again" if is_zip
                           else f"{role} file {path} is not an npz (numpy.savez archive); write it with numpy.savez, "
                                "as `flexdit sample --npz` does") from None
    except OSError as e:
        raise FlexDiTError(f"cannot read {role} file {path}: {e.strerror or e}") from None
    size = path.stat().st_size
    arrays = {}
    for info in archive.infolist():
        if info.filename.endswith(".npy"):
            _check_zip_entry(path, info, size)
            try:
                member = stack.enter_context(archive.open(info))
            except READ_ERRORS as e:
                raise FlexDiTError(f"{path}: cannot open {info.filename} ({e}); {REWRITE}") from None
            arrays[info.filename[:-len(".npy")]] = NpzArray(path, info, member)
    return arrays


def _check_zip_entry(path: Path, info: zipfile.ZipInfo, archive_size: int) -> None:
    """The sizes the zip directory gives must be possible: the compressed bytes inside the file, and no more
    bytes out than the compression can produce from them."""
    inside = info.header_offset + info.compress_size <= archive_size
    possible = {zipfile.ZIP_STORED: info.file_size == info.compress_size,
                zipfile.ZIP_DEFLATED: info.file_size <= MAX_DEFLATE_RATIO * info.compress_size}
    if not (inside and possible.get(info.compress_type, True)):
        raise FlexDiTError(f"{path}: the zip entry {info.filename} claims {info.file_size} bytes from "
                           f"{info.compress_size}, more than the file holds; {REWRITE}")


def _check_images(images: NpzArray) -> None:
    shape, path = tuple(images.shape), images.path
    if images.dtype != np.uint8 or len(shape) != 4 or shape[3] not in (1, 3):
        raise FlexDiTError(f"{path}: arr_0 is {images.dtype} {shape}; expected uint8 NHWC images (N, H, W, 1 or 3), "
                           "pixel values 0..255")
    if images.fortran_order:
        raise FlexDiTError(f"{path}: arr_0 is stored column-major (Fortran order), which cannot be read batch by "
                           "batch; save numpy.ascontiguousarray(images)")
    if shape[1] == 0 or shape[2] == 0:
        raise FlexDiTError(f"{path}: arr_0 has shape {shape}; the images are empty")
    if shape[0] < MIN_IMAGES:
        raise FlexDiTError(f"{path} holds {shape[0]} image{'s' * (shape[0] != 1)}; need at least {MIN_IMAGES} "
                           f"(a covariance, and {NEIGHBOURS} nearest neighbours for precision/recall), and "
                           "thousands for meaningful numbers")


def _read_labels(labels: NpzArray, num_images: int) -> np.ndarray:
    """arr_1 as class ids of the Fashion-MNIST classifier, one per image."""
    if labels.shape != (num_images,) or labels.dtype.kind not in "iu":
        raise FlexDiTError(f"{labels.path}: arr_1 is {labels.dtype} {labels.shape}; expected {num_images} integer "
                           "class labels, one per image of arr_0")
    values = labels.read()
    outside = (values < 0) | (values >= NUM_CLASSES)
    if outside.any():
        raise FlexDiTError(f"{labels.path}: arr_1 holds label {values[outside][0]} ({outside.sum()} outside); the "
                           f"Fashion-MNIST classifier's classes are 0..{NUM_CLASSES - 1}")
    return values


def _read_statistics(arrays: dict[str, NpzArray], features: str) -> dict:
    """The reference's precomputed (mu, sigma) per feature kind the features have, checked before use."""
    stats = {}
    for kind, dim in FEATURE_DIMS[features].items():
        keys = STAT_KEYS[kind]
        present = [key for key in keys if key in arrays]
        if len(present) == 1:
            missing = keys[1 - keys.index(present[0])]
            raise FlexDiTError(f"{arrays[present[0]].path} holds {present[0]} without {missing}; give both or neither")
        if present:
            stats[kind] = tuple(_read_statistic(arrays[key], shape, features)
                                for key, shape in zip(keys, ((dim,), (dim, dim))))
    return stats


def _read_statistic(array: NpzArray, shape: tuple, features: str) -> np.ndarray:
    if array.shape != shape:
        raise FlexDiTError(f"{array.path}: precomputed {array.key} has shape {array.shape} but the {features} "
                           f"features need {shape}; they were made with another network (--features)")
    if array.dtype.kind not in "fiu":
        raise FlexDiTError(f"{array.path}: precomputed {array.key} is {array.dtype}; expected real numbers")
    value = array.read().astype(np.float64)
    if not np.isfinite(value).all():
        raise FlexDiTError(f"{array.path}: precomputed {array.key} contains NaN or infinite values; recompute the "
                           "reference statistics")
    return value


def evaluate(samples_path, reference_path, features: str = "inception", inception_path=None,
             batch_size: int | None = None, device="cpu", progress: bool = False) -> dict:
    """Compare an ADM sample batch with a reference batch. Returns a dict (JSON-ready: floats, ints, None,
    strings): features, samples, reference, num_samples, num_reference (None for a statistics-only
    reference), reference_statistics ("precomputed", "computed", or per kind when they differ), fid, sfid,
    inception_score, inception_score_std, precision, recall, class_accuracy and notes (a list of strings). A
    metric that does not apply is None: sfid for fmnist, class_accuracy for inception or unlabelled samples,
    precision/recall for a statistics-only reference. Both files' headers, labels and statistics are checked before any
    feature is computed; damaged image data is found as it is read."""
    if features not in FEATURES:
        raise FlexDiTError(f"unknown features {features!r}; use one of {', '.join(FEATURES)}")
    batch_size = DEFAULT_BATCH[features] if batch_size is None else batch_size
    if batch_size < 1:
        raise FlexDiTError(f"--batch-size must be at least 1, got {batch_size}")
    with ExitStack() as stack:
        samples = _open_batch(samples_path, "samples", features, stack)
        reference = _open_batch(reference_path, "reference", features, stack)
        _check_pair(samples, reference, features)
        notes = []
        result = {"features": features, "samples": str(samples.path), "reference": str(reference.path),
                  "num_samples": len(samples.images),
                  "num_reference": None if reference.images is None else len(reference.images),
                  "reference_statistics": None,
                  "fid": None, "sfid": None, "inception_score": None, "inception_score_std": None,
                  "precision": None, "recall": None, "class_accuracy": None, "notes": notes}
        if features == "inception":
            sample_f, reference_f = _inception(samples, reference, inception_path, batch_size, device, progress)
        else:
            sample_f, reference_f = _fmnist(samples, reference, batch_size, device)
            if samples.labels is None:
                notes.append("class accuracy needs sample labels (arr_1); the samples have none")
            else:
                result["class_accuracy"] = float((sample_f["logits"].argmax(axis=1) == samples.labels).mean())
        # FID (pool) and sFID (spatial): the reference's own statistics where it has them, as ADM does
        sources = {}  # feature kind -> "precomputed" or "computed"
        for kind, key in (("pool", "fid"), ("spatial", "sfid")):
            if kind not in FEATURE_DIMS[features]:
                continue
            if kind in reference.stats:
                ref_stats, sources[kind] = reference.stats[kind], "precomputed"
            elif reference_f is not None:
                ref_stats, sources[kind] = feature_statistics(reference_f[kind]), "computed"
            else:
                notes.append(f"{key} needs reference images or {'/'.join(STAT_KEYS[kind])}; the reference has "
                             "neither")
                continue
            result[key] = frechet_distance(*feature_statistics(sample_f[kind]), *ref_stats)
        kinds = set(sources.values())
        result["reference_statistics"] = (kinds.pop() if len(kinds) == 1 else
                                          ", ".join(f"{kind} {how}" for kind, how in sources.items()) or "none")
        result["inception_score"], result["inception_score_std"] = inception_score(sample_f["logits"])
        if reference_f is None:
            notes.append("precision/recall need the reference images (arr_0); this reference holds statistics only")
        else:
            result["precision"], result["recall"] = precision_recall(reference_f["pool"], sample_f["pool"],
                                                                     k=NEIGHBOURS)
        dim = FEATURE_DIMS[features]["pool"]
        if len(samples.images) < dim:
            notes.append(f"{len(samples.images)} samples < {dim} feature dimensions: the covariance is singular and "
                         "FID is biased upwards; ADM-style numbers use 50,000 samples")
        return result


def _check_pair(samples: Batch, reference: Batch, features: str) -> None:
    s_shape = tuple(samples.images.shape[1:])
    if reference.images is not None and tuple(reference.images.shape[1:]) != s_shape:
        raise FlexDiTError(f"samples are {s_shape} images (H, W, C) but the reference's are "
                           f"{tuple(reference.images.shape[1:])}; compare images of the same size and channels")
    if features == "fmnist":
        for batch in (samples, reference):
            if batch.images is None:
                continue
            shape = tuple(batch.images.shape[1:])
            if shape[2] != 1 or shape[:2] not in ((RAW_SIDE, RAW_SIDE), (SIDE, SIDE)):
                raise FlexDiTError(f"{batch.path}: --features fmnist needs 1-channel {RAW_SIDE}x{RAW_SIDE} or "
                                   f"{SIDE}x{SIDE} images, got (H, W, C) = {shape}; use --features inception")


def _inception(samples: Batch, reference: Batch, inception_path, batch_size: int, device, progress: bool):
    model = load_inception(inception_path, device)
    sample_f = inception_features(model, samples.images, batch_size, device, progress, desc="samples")
    reference_f = None
    if reference.images is not None:
        reference_f = inception_features(model, reference.images, batch_size, device, progress, desc="reference")
    return sample_f, reference_f


def _fmnist(samples: Batch, reference: Batch, batch_size: int, device):
    model = load_classifier(device=device)

    def run(images: NpzArray) -> dict:
        parts = [classify(model, images[start:start + batch_size], batch_size)  # one batch read at a time
                 for start in range(0, len(images), batch_size)]
        return {"pool": np.concatenate([f for f, _ in parts]),
                "logits": np.concatenate([logits for _, logits in parts])}

    return run(samples.images), None if reference.images is None else run(reference.images)
