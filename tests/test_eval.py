"""`flexdit eval`: the FID Inception (layout of pytorch-fid's weights file, outputs, loading), the ADM-style
evaluator on npz batches (Fashion-MNIST features for speed; the Inception path with random weights) and its
error paths, and the command end to end. The statistics themselves are tested in test_fidelity.py."""
import json
from contextlib import ExitStack

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import flexdit.measure.evaluate as evaluate_module
from flexdit.cli import main
from flexdit.errors import FlexDiTError
from flexdit.measure.evaluate import evaluate
from flexdit.measure.fidelity import feature_statistics
from flexdit.measure.fmnist_classifier import classify, load_classifier
from flexdit.measure.inception import (ENV_VAR, SPATIAL_DIM, WEIGHTS_NAME, WEIGHTS_URL, FIDInceptionV3,
                                       inception_features, load_inception)

from conftest import cli_fails

# tiny batches have fewer samples than feature dimensions: singular covariances are expected here
pytestmark = pytest.mark.filterwarnings("ignore:Matrix is singular")


@pytest.fixture(autouse=True)
def _deterministic():
    """Overrides conftest's: one thread, because the Inception's many small convolutions slow down by an order
    of magnitude when two threads share two cores with other work."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_inception(seed: int = 0) -> FIDInceptionV3:
    """Default-initialised weights with random BatchNorm statistics, so the running stats matter."""
    torch.manual_seed(seed)
    model = FIDInceptionV3()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """Random weights saved as pytorch-fid's file is: torch.save of a plain state dict."""
    model = random_inception()
    path = tmp_path_factory.mktemp("inception") / WEIGHTS_NAME
    torch.save(dict(model.state_dict()), path)
    return path


@pytest.fixture(scope="module")
def inception(inception_file):
    return load_inception(inception_file)


def pixels(n: int, side: int = 28, channels: int = 1, seed: int = 0) -> np.ndarray:
    """uint8 (n, side, side, channels): a bright blob of random brightness on a dark noisy background."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 40, size=(n, side, side, channels))
    lo, hi = side // 6, side - side // 6
    images[:, lo:hi, lo + 2:hi - 2] += rng.integers(60, 215, size=(n, 1, 1, channels))
    return images.astype(np.uint8)


def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="module")
def fm(tmp_path_factory):
    """Fashion-MNIST-like batches: samples (40 labelled 28x28x1) and a different reference (40 images)."""
    folder = tmp_path_factory.mktemp("fm")
    samples = pixels(40, seed=1)
    labels = np.arange(40) % 10
    return {"samples": write_npz(folder / "samples.npz", arr_0=samples, arr_1=labels),
            "reference": write_npz(folder / "reference.npz", arr_0=pixels(40, seed=2)),
            "images": samples, "labels": labels, "folder": folder}


def quick_frechet(mu1, sigma1, mu2, sigma2) -> float:
    """A stand-in for frechet_distance where its value is not the point: sqrtm of a singular 128-d product costs
    seconds on one core."""
    return float(np.square(mu1 - mu2).sum())


# --- the FID Inception ------------------------------------------------------------------------------------


def test_state_dict_has_pytorch_fid_layout():
    state = FIDInceptionV3().state_dict()
    expected = {"Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
                "Mixed_6e.branch7x7_2.conv.weight": (192, 192, 1, 7),
                "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1), "fc.weight": (1008, 2048),
                "fc.bias": (1008,), "Mixed_6d.branch1x1.bn.running_var": (192,),
                "Mixed_7b.branch_pool.conv.weight": (192, 1280, 1, 1)}
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, key
    assert not any("AuxLogits" in k for k in state)
    assert all(k.endswith(("conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
                           "bn.num_batches_tracked")) for k in state if not k.startswith("fc."))
    assert sum(k.endswith("conv.weight") for k in state) == 94  # InceptionV3's 94 convolutions
    assert not any(k.endswith("conv.bias") for k in state)
    assert all(m.eps == 0.001 for m in FIDInceptionV3().modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_loads_file_and_gives_three_outputs(inception, inception_file):
    assert not inception.training
    reference = random_inception()
    for key, value in reference.state_dict().items():
        assert torch.equal(inception.state_dict()[key], value), key
    rgb = torch.from_numpy(pixels(2, side=37, channels=3))
    grey = torch.from_numpy(pixels(2, side=37, channels=1))
    with torch.no_grad():
        out_rgb, out_grey, out_rep = inception(rgb), inception(grey), inception(grey.expand(-1, -1, -1, 3))
    for out in (out_rgb, out_grey):
        assert out.pool.shape == (2, 2048) and out.spatial.shape == (2, SPATIAL_DIM) == (2, 2023)
        assert out.logits.shape == (2, 1008)
        assert all(torch.isfinite(t).all() for t in out)
    for a, b in zip(out_grey, out_rep):  # grey images are their 3-channel repetition
        torch.testing.assert_close(a, b)
    # the logits are ADM's / improved-gan's softmax input: pool times the fc matrix, no bias
    torch.testing.assert_close(out_rgb.logits, out_rgb.pool @ inception.fc.weight.T)


def test_preprocessing_and_spatial_features(inception):
    images = torch.from_numpy(pixels(2, side=40, channels=3, seed=3))
    x = FIDInceptionV3.preprocess(images)
    manual = torch.nn.functional.interpolate(images.permute(0, 3, 1, 2).float() / 255, size=(299, 299),
                                             mode="bilinear", align_corners=False) * 2 - 1
    torch.testing.assert_close(x, manual)
    seen = {}
    hook = inception.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: seen.update(out=o))
    try:
        with torch.no_grad():
            out = inception(images)
    finally:
        hook.remove()
    assert seen["out"].shape == (2, 192, 17, 17)
    assert (seen["out"] >= 0).all()  # after BN and ReLU
    expected = seen["out"][:, :7].permute(0, 2, 3, 1).reshape(2, -1)  # TF's NHWC order
    torch.testing.assert_close(out.spatial, expected, rtol=0, atol=0)


def test_features_do_not_depend_on_batch_size(inception):
    images = pixels(3, side=24, channels=3, seed=4)
    one = inception_features(inception, images, batch_size=1, progress=False)
    two = inception_features(inception, images, batch_size=2, progress=False)
    assert set(one) == {"pool", "spatial", "logits"}
    for key in one:
        assert one[key].dtype == np.float64 and one[key].shape[0] == 3
        np.testing.assert_allclose(one[key], two[key], rtol=1e-4, atol=1e-5)
    with pytest.raises(FlexDiTError, match="uint8 NHWC"):
        inception_features(inception, images.astype(np.float32), progress=False)


def test_missing_weights_name_the_path_and_the_source(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere" / WEIGHTS_NAME
    with pytest.raises(FlexDiTError) as e:
        load_inception(missing)
    assert str(missing) in str(e.value) and WEIGHTS_URL in str(e.value) and "--inception" in str(e.value)
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "env.pth"))
    with pytest.raises(FlexDiTError, match=f"env.pth \\(from \\${ENV_VAR}\\)"):
        load_inception()
    monkeypatch.delenv(ENV_VAR)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(FlexDiTError) as e:
        load_inception()
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints" / WEIGHTS_NAME) in str(e.value)


def test_environment_variable_and_safetensors(tmp_path, monkeypatch, inception):
    state = {k: v for k, v in inception.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "inception.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))  # no BatchNorm counters: still loads
    monkeypatch.setenv(ENV_VAR, str(path))
    model = load_inception()
    torch.testing.assert_close(model.fc.weight, inception.fc.weight, rtol=0, atol=0)


def test_wrong_weights_are_refused(tmp_path, inception):
    other = tmp_path / "other.pth"
    torch.save({"stages.0.weight": torch.zeros(3)}, other)
    with pytest.raises(FlexDiTError, match="not the FID Inception weights"):
        load_inception(other)
    reshaped = dict(inception.state_dict())
    reshaped["fc.weight"] = torch.zeros(1000, 2048)
    torch.save(reshaped, other)
    with pytest.raises(FlexDiTError, match="not the FID Inception weights"):
        load_inception(other)
    with_aux = dict(inception.state_dict(), **{"AuxLogits.fc.weight": torch.zeros(1000, 768)})
    torch.save(with_aux, other)
    with pytest.raises(FlexDiTError, match="not the FID Inception weights"):
        load_inception(other)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(FlexDiTError, match="cannot read Inception weights"):
        load_inception(tmp_path / "junk.pth")


# --- the evaluator ----------------------------------------------------------------------------------------


def test_fmnist_self_comparison(fm):
    result = evaluate(fm["samples"], fm["samples"], features="fmnist")
    assert result["features"] == "fmnist" and result["num_samples"] == result["num_reference"] == 40
    assert abs(result["fid"]) < 1e-3
    assert result["precision"] == 1.0 and result["recall"] == 1.0
    assert result["sfid"] is None and result["reference_statistics"] == "computed"
    assert 1.0 <= result["inception_score"] <= 10.0
    _, logits = classify(load_classifier(), fm["images"])
    assert result["class_accuracy"] == pytest.approx((logits.argmax(1) == fm["labels"]).mean())
    assert 0.0 <= result["class_accuracy"] <= 1.0
    assert any("feature dimensions" in note for note in result["notes"])  # 40 samples < 128 features
    json.dumps(result)  # JSON-ready


def test_fmnist_against_another_batch(fm):
    result = evaluate(fm["samples"], fm["reference"], features="fmnist", batch_size=7)
    assert result["fid"] > 0.1
    for key in ("fid", "inception_score", "inception_score_std", "precision", "recall", "class_accuracy"):
        assert np.isfinite(result[key]), key
    assert 0.0 <= result["precision"] <= 1.0 and 0.0 <= result["recall"] <= 1.0


def test_precomputed_reference_statistics_are_used(fm):
    features, _ = classify(load_classifier(), fm["images"])
    mu, sigma = feature_statistics(features)
    folder = fm["folder"]
    # the reference's images differ from the samples, its statistics are the samples': FID ~ 0
    with_images = write_npz(folder / "ref_stats.npz", arr_0=pixels(40, seed=5), mu=mu, sigma=sigma)
    result = evaluate(fm["samples"], with_images, features="fmnist")
    assert abs(result["fid"]) < 1e-3 and result["reference_statistics"] == "precomputed"
    assert result["precision"] is not None and result["num_reference"] == 40
    stats_only = write_npz(folder / "ref_only_stats.npz", mu=mu, sigma=sigma)
    result = evaluate(fm["samples"], stats_only, features="fmnist")
    assert abs(result["fid"]) < 1e-3 and result["num_reference"] is None
    assert result["precision"] is None and result["recall"] is None
    assert any("precision/recall" in note for note in result["notes"])


def test_inception_path_with_random_weights(tmp_path, inception_file, monkeypatch):
    # 2048-d sqrtm on one core costs seconds; the distance itself is tested in test_fidelity.py
    calls = []

    def frechet(mu1, sigma1, mu2, sigma2):
        calls.append((mu1.shape, sigma2.shape))
        return quick_frechet(mu1, sigma1, mu2, sigma2)

    monkeypatch.setattr(evaluate_module, "frechet_distance", frechet)
    samples = write_npz(tmp_path / "s.npz", arr_0=pixels(4, side=16, channels=3, seed=6))
    reference = write_npz(tmp_path / "r.npz", arr_0=pixels(4, side=16, channels=3, seed=7))
    result = evaluate(samples, reference, features="inception", inception_path=inception_file, batch_size=3)
    assert calls == [((2048,), (2048, 2048)), ((2023,), (2023, 2023))]
    for key in ("fid", "sfid", "inception_score", "precision", "recall"):
        assert np.isfinite(result[key]), key
    assert result["class_accuracy"] is None and result["num_samples"] == 4
    assert result["reference_statistics"] == "computed"
    # pool statistics precomputed, spatial ones computed from the images: said per kind
    with_pool = write_npz(tmp_path / "rp.npz", arr_0=pixels(4, side=16, channels=3, seed=7), mu=np.zeros(2048),
                          sigma=np.eye(2048))
    mixed = evaluate(samples, with_pool, features="inception", inception_path=inception_file, batch_size=3)
    assert mixed["reference_statistics"] == "pool precomputed, spatial computed"


def test_compressed_npz_is_streamed_in_batches(tmp_path, fm):
    path = tmp_path / "compressed.npz"
    np.savez_compressed(path, arr_0=fm["images"], arr_1=fm["labels"])
    plain = evaluate(fm["samples"], fm["reference"], features="fmnist")
    packed = evaluate(path, fm["reference"], features="fmnist", batch_size=9)
    for key in ("fid", "precision", "recall", "class_accuracy", "inception_score"):
        assert packed[key] == pytest.approx(plain[key], rel=1e-5, abs=1e-6), key


def test_images_are_read_one_batch_at_a_time(fm, monkeypatch):
    monkeypatch.setattr(evaluate_module, "frechet_distance", quick_frechet)
    reads = []
    read = evaluate_module.NpzArray._read

    def counting(self, offset, shape):
        reads.append((self.key, shape[0]))
        return read(self, offset, shape)

    monkeypatch.setattr(evaluate_module.NpzArray, "_read", counting)
    evaluate(fm["samples"], fm["reference"], features="fmnist", batch_size=16)
    assert [rows for key, rows in reads if key == "arr_0"] == [16, 16, 8] * 2  # samples, then the reference
    assert ("arr_1", 40) in reads  # the labels, read whole


def test_column_major_statistics_are_read_as_written(tmp_path):
    sigma = np.arange(12.0).reshape(3, 4)  # not symmetric: a transposed read would show
    path = write_npz(tmp_path / "f_order.npz", mu=np.arange(3.0), sigma=np.asfortranarray(sigma))
    with ExitStack() as stack:
        stored = evaluate_module._open_arrays(path, "reference", stack)["sigma"]
        assert stored.fortran_order and stored.shape == (3, 4)
        np.testing.assert_array_equal(stored.read(), sigma)


def _bad_inputs(folder, fm):
    """(samples, reference, features, message) of each user error."""
    ok = fm["samples"]
    (folder / "text.npz").write_text("hello")
    mu, sigma = np.zeros(2048), np.eye(2048)
    return [
        (folder / "missing.npz", ok, "fmnist", "samples file not found"),
        (ok, folder / "missing.npz", "fmnist", "reference file not found"),
        (folder / "text.npz", ok, "fmnist", "is not an npz"),
        (write_npz(folder / "noarr.npz", images=pixels(5)), ok, "fmnist", "has no arr_0"),
        (ok, write_npz(folder / "noref.npz", x=np.zeros(3)), "fmnist", "has no arr_0.*or precomputed statistics"),
        (write_npz(folder / "float.npz", arr_0=pixels(5).astype(np.float32)), ok, "fmnist", "expected uint8 NHWC"),
        (write_npz(folder / "nhw.npz", arr_0=pixels(5)[..., 0]), ok, "fmnist", "expected uint8 NHWC"),
        (write_npz(folder / "two.npz", arr_0=pixels(5, channels=2)), ok, "fmnist", "expected uint8 NHWC"),
        (write_npz(folder / "few.npz", arr_0=pixels(3)), ok, "fmnist", "holds 3 images; need at least 4"),
        (write_npz(folder / "big.npz", arr_0=pixels(5, side=32)), ok, "fmnist", "same size and channels"),
        (write_npz(folder / "rgb.npz", arr_0=pixels(5, channels=3)), write_npz(folder / "rgb_r.npz",
                                                                                arr_0=pixels(5, channels=3)),
         "fmnist", "needs 1-channel"),
        (ok, write_npz(folder / "mu_only.npz", arr_0=pixels(5), mu=np.zeros(128)), "fmnist", "mu without sigma"),
        (ok, write_npz(folder / "wrong_dim.npz", mu=mu, sigma=sigma), "fmnist", "made with another network"),
        (write_npz(folder / "bad_labels.npz", arr_0=pixels(5), arr_1=np.arange(4)), ok, "fmnist",
         "expected 5 integer class labels"),
        (ok, ok, "clip", "unknown features"),
    ]


def test_user_errors_are_one_clear_line(tmp_path, fm):
    for samples, reference, features, message in _bad_inputs(tmp_path, fm):
        with pytest.raises(FlexDiTError, match=message) as e:
            evaluate(samples, reference, features=features)
        assert "\n" not in str(e.value)


def test_missing_inception_weights_through_evaluate(tmp_path, fm):
    rgb = write_npz(tmp_path / "rgb.npz", arr_0=pixels(5, channels=3))
    with pytest.raises(FlexDiTError, match="FID Inception weights not found: .*absent.pth"):
        evaluate(rgb, rgb, inception_path=tmp_path / "absent.pth")


# --- the command ------------------------------------------------------------------------------------------


def test_cli_json(capsys, fm):
    main(["eval", str(fm["samples"]), str(fm["reference"]), "--features", "fmnist", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert {"features", "samples", "reference", "num_samples", "num_reference", "reference_statistics", "fid",
            "sfid", "inception_score", "inception_score_std", "precision", "recall", "class_accuracy",
            "notes"} <= set(out)
    assert out["features"] == "fmnist" and out["num_samples"] == 40 and out["sfid"] is None
    assert np.isfinite(out["fid"]) and 0 <= out["class_accuracy"] <= 1


def test_cli_table_and_json_file(capsys, tmp_path, fm):
    target = tmp_path / "out" / "metrics.json"
    main(["eval", str(fm["samples"]), str(fm["reference"]), "--features", "fmnist", "--batch-size", "16",
          "--device", "cpu", "--json", str(target)])
    out = capsys.readouterr().out
    saved = json.loads(target.read_text())
    for label in ("FID-FM", "IS-FM", "precision", "recall", "class accuracy"):
        assert label in out
    assert "sFID" not in out and f"{saved['fid']:.4f}" in out and f"wrote {target}" in out


def test_cli_same_file_as_samples_and_reference(capsys, tmp_path, fm, monkeypatch):
    monkeypatch.setattr(evaluate_module, "frechet_distance", quick_frechet)
    target = tmp_path / "self.json"
    main(["eval", str(fm["samples"]), str(fm["samples"]), "--features", "fmnist", "--json", str(target)])
    result = json.loads(target.read_text())
    assert result["fid"] == 0.0 and result["precision"] == result["recall"] == 1.0


def test_cli_errors(capsys, tmp_path, fm):
    assert "samples file not found" in cli_fails(capsys, "eval", tmp_path / "none.npz", fm["samples"],
                                                 "--features", "fmnist")
    rgb = write_npz(tmp_path / "rgb.npz", arr_0=pixels(5, channels=3))
    err = cli_fails(capsys, "eval", rgb, rgb, "--inception", tmp_path / "absent.pth", "--device", "cpu")
    assert str(tmp_path / "absent.pth") in err and WEIGHTS_URL in err
