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
class accuracy of labelled samples (argmax class == arr_1). There is no spatial feature, so no sFID.

arr_0 is read from the npz lazily, one batch at a time, so a 50k x 512 x 512 x 3 batch (39 GB) never sits in
memory; only the features do (50k x 2048 float64 = 0.8 GB per kind).
"""
import zipfile
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flexdit.errors import FlexDiTError
from flexdit.measure.fidelity import feature_statistics, frechet_distance, inception_score, precision_recall

FEATURES = ("inception", "fmnist")
NEIGHBOURS = 3  # ADM's k for precision/recall
MIN_IMAGES = NEIGHBOURS + 1  # a covariance needs 2 images; the k-th nearest other image needs k + 1
STAT_KEYS = {"pool": ("mu", "sigma"), "spatial": ("mu_s", "sigma_s")}
DEFAULT_BATCH = {"inception": 64, "fmnist": 500}


class NpzImages:
    """arr_0 of an npz, read on demand: .shape and .dtype from the .npy header, rows by slicing. Reads in
    increasing order are streamed (a compressed member is decompressed once, front to back)."""

    def __init__(self, path: Path, archive: zipfile.ZipFile, member: str):
        self.path = path
        self._file = archive.open(member)
        try:
            version = np.lib.format.read_magic(self._file)
            reader = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in reader:
                raise ValueError(f"npy format version {version}")
            self.shape, fortran_order, self.dtype = reader[version](self._file)
        except ValueError as e:
            raise FlexDiTError(f"{path}: arr_0 is not a readable array ({e}); write it with numpy.savez") from None
        self._offset = self._file.tell()
        self._array = None
        if fortran_order or self.dtype.hasobject:  # rare layouts: read whole, the plain way
            with np.load(path, allow_pickle=False) as z:
                self._array = z["arr_0"]

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        if self._array is not None:
            return self._array[rows]
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("NpzImages reads contiguous row ranges only")
        start, stop, _ = rows.indices(self.shape[0])
        count = max(stop - start, 0)
        row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        out = np.empty((count, *self.shape[1:]), dtype=self.dtype)  # writable, filled in place
        view, filled = memoryview(out.reshape(-1).view(np.uint8)), 0
        self._file.seek(self._offset + start * row_bytes)
        while filled < len(view):
            n = self._file.readinto(view[filled:])
            if not n:
                raise FlexDiTError(f"{self.path} is truncated: arr_0 ends before its {self.shape[0]} images")
            filled += n
        return out

    def read_all(self) -> np.ndarray:
        return self[0:self.shape[0]]

    def close(self) -> None:
        self._file.close()


@dataclass
class Batch:
    """An opened ADM batch: images (lazy) or None, labels or None, precomputed statistics by feature kind."""
    path: Path
    images: NpzImages | None = None
    labels: np.ndarray | None = None
    stats: dict = field(default_factory=dict)  # "pool" / "spatial" -> (mu, sigma)


def _open_batch(path, role: str, stack: ExitStack) -> Batch:
    path = Path(path)
    if not path.is_file():
        raise FlexDiTError(f"{role} file not found: {path}")
    try:
        archive = stack.enter_context(zipfile.ZipFile(path))
    except (zipfile.BadZipFile, OSError):
        raise FlexDiTError(f"{role} file {path} is not an npz (numpy.savez archive); write it with numpy.savez, "
                           "as `flexdit sample --npz` does") from None
    members = {name[:-4]: name for name in archive.namelist() if name.endswith(".npy")}
    batch = Batch(path)
    if "arr_0" in members:
        batch.images = NpzImages(path, archive, members["arr_0"])
        stack.callback(batch.images.close)
        _check_images(batch.images, path)
    try:
        with np.load(path, allow_pickle=False) as z:
            if "arr_1" in members:
                batch.labels = z["arr_1"]
            for kind, (mu_key, sigma_key) in STAT_KEYS.items():
                present = [k for k in (mu_key, sigma_key) if k in members]
                if len(present) == 1:
                    raise FlexDiTError(f"{path} holds {present[0]} without "
                                       f"{sigma_key if present[0] == mu_key else mu_key}; give both or neither")
                if present:
                    batch.stats[kind] = (z[mu_key].astype(np.float64), z[sigma_key].astype(np.float64))
    except ValueError as e:  # pickled members refused, corrupt arrays
        raise FlexDiTError(f"cannot read {path}: {e}") from None
    if batch.images is None and not (role == "reference" and "pool" in batch.stats):
        what = "arr_0 (uint8 NHWC images)" + (" or precomputed statistics mu, sigma" if role == "reference" else "")
        raise FlexDiTError(f"{role} file {path} has no {what}; keys present: {', '.join(sorted(members)) or 'none'}")
    return batch


def _check_images(images: NpzImages, path: Path) -> None:
    shape = tuple(images.shape)
    if images.dtype != np.uint8 or len(shape) != 4 or shape[3] not in (1, 3):
        raise FlexDiTError(f"{path}: arr_0 is {images.dtype} {shape}; expected uint8 NHWC images (N, H, W, 1 or 3), "
                           "pixel values 0..255")
    if shape[1] == 0 or shape[2] == 0:
        raise FlexDiTError(f"{path}: arr_0 has shape {shape}; the images are empty")
    if shape[0] < MIN_IMAGES:
        raise FlexDiTError(f"{path} holds {shape[0]} image{'s' * (shape[0] != 1)}; need at least {MIN_IMAGES} "
                           f"(a covariance, and {NEIGHBOURS} nearest neighbours for precision/recall), and "
                           "thousands for meaningful numbers")


def _check_statistics(batch: Batch, kind: str, dim: int, features: str) -> None:
    mu, sigma = batch.stats[kind]
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
        mu_key, sigma_key = STAT_KEYS[kind]
        raise FlexDiTError(f"{batch.path}: precomputed {mu_key} {mu.shape} / {sigma_key} {sigma.shape} do not fit "
                           f"the {features} features ({dim}); they were made with another network (--features)")


def evaluate(samples_path, reference_path, features: str = "inception", inception_path=None,
             batch_size: int | None = None, device="cpu", progress: bool = False) -> dict:
    """Compare an ADM sample batch with a reference batch. Returns a dict (JSON-ready: floats, ints, None,
    strings): features, samples, reference, num_samples, num_reference (None for a statistics-only
    reference), reference_statistics ("precomputed", "computed", or per kind when they differ), fid, sfid, inception_score,
    inception_score_std, precision, recall, class_accuracy and notes (a list of strings). A metric that does
    not apply is None: sfid for fmnist, class_accuracy for inception or unlabelled samples, precision/recall
    for a statistics-only reference."""
    if features not in FEATURES:
        raise FlexDiTError(f"unknown features {features!r}; use one of {', '.join(FEATURES)}")
    batch_size = DEFAULT_BATCH[features] if batch_size is None else batch_size
    if batch_size < 1:
        raise FlexDiTError(f"--batch-size must be at least 1, got {batch_size}")
    with ExitStack() as stack:
        samples = _open_batch(samples_path, "samples", stack)
        reference = _open_batch(reference_path, "reference", stack)
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
            dims = {"pool": sample_f["pool"].shape[1], "spatial": sample_f["spatial"].shape[1]}
        else:
            sample_f, reference_f = _fmnist(samples, reference, batch_size, device)
            dims = {"pool": sample_f["pool"].shape[1]}
            if samples.labels is None:
                notes.append("class accuracy needs sample labels (arr_1); the samples have none")
            else:
                labels = np.asarray(samples.labels)
                if labels.shape != (len(samples.images),) or not np.issubdtype(labels.dtype, np.integer):
                    raise FlexDiTError(f"{samples.path}: arr_1 is {labels.dtype} {labels.shape}; expected "
                                       f"{len(samples.images)} integer class labels")
                result["class_accuracy"] = float((sample_f["logits"].argmax(axis=1) == labels).mean())
        for kind, dim in dims.items():
            if kind in reference.stats:
                _check_statistics(reference, kind, dim, features)
        # FID (pool) and sFID (spatial): the reference's own statistics where it has them, as ADM does
        sources = {}  # feature kind -> "precomputed" or "computed"
        for kind, key in (("pool", "fid"), ("spatial", "sfid")):
            if kind not in dims:
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
        dim = dims["pool"]
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
        from flexdit.measure.fmnist_classifier import RAW_SIDE, SIDE

        for batch in (samples, reference):
            if batch.images is None:
                continue
            shape = tuple(batch.images.shape[1:])
            if shape[2] != 1 or shape[:2] not in ((RAW_SIDE, RAW_SIDE), (SIDE, SIDE)):
                raise FlexDiTError(f"{batch.path}: --features fmnist needs 1-channel {RAW_SIDE}x{RAW_SIDE} or "
                                   f"{SIDE}x{SIDE} images, got (H, W, C) = {shape}; use --features inception")


def _inception(samples: Batch, reference: Batch, inception_path, batch_size: int, device, progress: bool):
    from flexdit.measure.inception import inception_features, load_inception

    model = load_inception(inception_path, device)
    sample_f = inception_features(model, samples.images, batch_size, device, progress, desc="samples")
    reference_f = None
    if reference.images is not None:
        reference_f = inception_features(model, reference.images, batch_size, device, progress, desc="reference")
    return sample_f, reference_f


def _fmnist(samples: Batch, reference: Batch, batch_size: int, device):
    from flexdit.measure.fmnist_classifier import classify, load_classifier

    model = load_classifier(device=device)

    def run(batch: Batch):
        features, logits = classify(model, batch.images.read_all(), batch_size)  # 28x28 grey: small in memory
        return {"pool": features, "logits": logits}

    return run(samples), None if reference.images is None else run(reference)
