"""The T5 text encoder against transformers and diffusers' PixArt-alpha pipeline, caption tables, and their errors."""
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from flexdit.errors import FlexDiTError
from flexdit.io import save_safetensors
from flexdit.text import (CAPTIONS_FORMAT, CaptionTable, TextEncoder, class_captions,
                          extract_captions, read_captions_file)
from flexdit.training.data import FASHION_MNIST_CLASS_NAMES, FASHION_MNIST_CLASSES
from text_fixtures import EOS, PAD, UNK, make_tiny_text_encoder

transformers = pytest.importorskip("transformers")
PROMPTS = ["A photo of a T-shirt or top", "  Bag ", "a picture of an ankle boot", "a a a a a a a a a a a a a a"]


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return make_tiny_text_encoder(tmp_path_factory.mktemp("pixart") / "pipe")


@pytest.fixture(scope="module")
def encoder(pipeline_dir):
    return TextEncoder.load(pipeline_dir, max_length=12)


def copy_of(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / "copy")


# --- the encoder --------------------------------------------------------------------------------------------------
def hand_tokens(prompt: str, vocab: dict, length: int) -> list[int]:
    """T5's tokens for the fixture's word vocabulary, made without the tokenizer: words, cut to leave room for </s>,
    then </s>, then <pad> to `length`."""
    words = prompt.lower().replace("-", " - ").split()[:length - 1]
    ids = [vocab.get(w, vocab[UNK]) for w in words] + [vocab[EOS]]
    return ids + [vocab[PAD]] * (length - len(ids))


def test_encode_equals_t5_on_hand_made_tokens(encoder, pipeline_dir):
    vocab = encoder.tokenizer.get_vocab()
    ids = torch.tensor([hand_tokens(p, vocab, encoder.max_length) for p in PROMPTS])  # (B, L)
    mask = (torch.arange(ids.shape[1]) <= (ids == vocab[EOS]).int().argmax(1, keepdim=True)).long()  # to </s>
    t5 = transformers.T5EncoderModel.from_pretrained(pipeline_dir / "text_encoder").eval()
    with torch.no_grad():
        want = t5(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, C)
    embeddings, got_mask = encoder.encode(PROMPTS)
    assert embeddings.dtype == torch.float32 and got_mask.dtype == torch.int64
    assert embeddings.shape == (len(PROMPTS), encoder.max_length, encoder.channels) == want.shape
    assert torch.equal(got_mask, mask)
    torch.testing.assert_close(embeddings, want, atol=1e-5, rtol=1e-5)
    assert got_mask[-1].all() and not got_mask[1, 3:].any()  # the long prompt is cut, the short one padded


@pytest.mark.parametrize("max_length", [120, 6])
@pytest.mark.parametrize("pipeline", [True, False])
def test_encode_equals_pixart_pipeline_encode_prompt(tmp_path, max_length, pipeline):
    from diffusers import PixArtAlphaPipeline

    folder = make_tiny_text_encoder(tmp_path / "t5", pipeline=pipeline, seed=1)
    encoder = TextEncoder.load(folder, max_length=max_length)
    pipe = PixArtAlphaPipeline(tokenizer=encoder.tokenizer, text_encoder=encoder.model, vae=None, transformer=None,
                               scheduler=None)
    want, want_mask, _, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False, device="cpu",
                                               max_sequence_length=max_length)
    embeddings, mask = encoder.encode(PROMPTS)
    assert embeddings.shape == (len(PROMPTS), max_length, 32)
    assert torch.equal(mask, want_mask)
    torch.testing.assert_close(embeddings, want.detach(), atol=1e-5, rtol=1e-5)


def test_encode_in_bfloat16_returns_float32(pipeline_dir, encoder):
    half = TextEncoder.load(pipeline_dir, dtype=torch.bfloat16, max_length=12)
    assert half.model.dtype == torch.bfloat16
    embeddings, mask = half.encode(PROMPTS[:2])
    assert embeddings.dtype == torch.float32
    torch.testing.assert_close(embeddings, encoder.encode(PROMPTS[:2])[0], atol=0.1, rtol=0.05)
    assert half.encode([])[0].shape == (0, 12, 32)


def test_class_captions_words_are_in_the_fixture_vocabulary(encoder):
    captions = class_captions(list(FASHION_MNIST_CLASS_NAMES))
    assert len(captions) == FASHION_MNIST_CLASSES
    assert captions[0] == "a photo of a t-shirt or top" and captions[-1] == "a photo of a ankle boot"
    assert class_captions(["golden_retriever"], "a picture of {}, a dog") == ["a picture of golden retriever, a dog"]
    ids = encoder.tokenizer(captions + class_captions(list(FASHION_MNIST_CLASS_NAMES), "a picture of {}")).input_ids
    assert encoder.tokenizer.convert_tokens_to_ids(UNK) not in sum(ids, [])
    with pytest.raises(FlexDiTError, match="must hold"):
        class_captions(["bag"], "a photo")


# --- encoder errors ---------------------------------------------------------------------------------------------
def test_load_refuses_missing_paths_and_folders_without_t5(tmp_path, pipeline_dir):
    with pytest.raises(FlexDiTError, match="text encoder not found"):
        TextEncoder.load(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FlexDiTError, match="is a file"):
        TextEncoder.load(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FlexDiTError, match="holds no T5 encoder"):
        TextEncoder.load(tmp_path / "empty")
    folder = copy_of(pipeline_dir, tmp_path)
    shutil.rmtree(folder / "tokenizer")
    with pytest.raises(FlexDiTError, match="no tokenizer/"):
        TextEncoder.load(folder)
    (folder / "tokenizer").mkdir()
    with pytest.raises(FlexDiTError, match="holds no tokenizer"):
        TextEncoder.load(folder)


def test_load_refuses_a_config_that_is_not_t5(tmp_path, pipeline_dir):
    folder = copy_of(pipeline_dir, tmp_path)
    config = folder / "text_encoder" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "model_type": "bert"}))
    with pytest.raises(FlexDiTError, match="describes a bert model, not T5"):
        TextEncoder.load(folder)
    config.write_text("{not json")
    with pytest.raises(FlexDiTError, match="cannot read"):
        TextEncoder.load(folder)


def test_load_refuses_missing_damaged_or_partial_weights(tmp_path, pipeline_dir):
    folder = copy_of(pipeline_dir, tmp_path)
    weights = folder / "text_encoder" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 2])
    with pytest.raises(FlexDiTError, match="cannot load the T5 encoder"):
        TextEncoder.load(folder)
    weights.unlink()
    with pytest.raises(FlexDiTError, match="cannot load the T5 encoder"):
        TextEncoder.load(folder)
    weights.write_bytes(data)
    config = folder / "text_encoder" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "num_layers": 3}))  # a block the file lacks
    with pytest.raises(FlexDiTError, match="do not fit its config.json"):
        TextEncoder.load(folder)
    config.write_text(json.dumps({**json.loads(config.read_text()), "vocab_size": 4}))
    with pytest.raises(FlexDiTError, match="only 4"):
        TextEncoder.load(folder)


def test_load_names_the_packages_a_sentencepiece_tokenizer_needs(tmp_path, pipeline_dir, monkeypatch):
    folder = copy_of(pipeline_dir, tmp_path)
    (folder / "tokenizer" / "tokenizer.json").unlink()
    (folder / "tokenizer" / "spiece.model").write_bytes(b"\x00")  # as T5's folders hold, without tokenizer.json
    monkeypatch.setattr("flexdit.text._missing_sentencepiece", lambda: ["sentencepiece"])
    with pytest.raises(FlexDiTError, match="pip install sentencepiece"):
        TextEncoder.load(folder)


# --- caption tables ---------------------------------------------------------------------------------------------
def test_per_class_table_round_trip_and_lookup(encoder, tmp_path):
    captions = class_captions(list(FASHION_MNIST_CLASS_NAMES))
    table = extract_captions(encoder, captions, "class", batch=3)
    want, want_mask = encoder.encode(captions)
    torch.testing.assert_close(table.embeddings, want)
    assert torch.equal(table.masks, want_mask) and table.captions == captions and len(table) == FASHION_MNIST_CLASSES
    table.save(tmp_path / "captions.safetensors")
    loaded = CaptionTable.load(tmp_path / "captions.safetensors")
    assert torch.equal(loaded.embeddings, table.embeddings.half().float()) and loaded.embeddings.dtype == torch.float32
    assert torch.equal(loaded.masks, table.masks) and torch.equal(loaded.rows, table.rows)
    assert (loaded.captions, loaded.per, loaded.max_length, loaded.channels) == (captions, "class", 12, 32)
    assert loaded.text_encoder == encoder.path
    labels = torch.tensor([3, 0, 3, 9])
    embeddings, mask = loaded.lookup(torch.tensor([7, 8, 9, 10]), labels)  # (B, L, C), (B, L)
    assert torch.equal(embeddings, want[labels].half().float()) and torch.equal(mask, want_mask[labels])
    loaded.check_data(num_samples=60000, num_classes=10)
    with pytest.raises(FlexDiTError, match="10 classes but the data has 5"):
        loaded.check_data(num_samples=60000, num_classes=5)
    with pytest.raises(FlexDiTError, match="label 10 is outside"):
        loaded.lookup(None, torch.tensor([1, 10]))
    with pytest.raises(FlexDiTError, match="looked up by label"):
        loaded.lookup(torch.tensor([1]), None)


def test_per_sample_table_encodes_each_distinct_caption_once(encoder, tmp_path, monkeypatch):
    encoded = []
    encode = encoder.encode
    monkeypatch.setattr(encoder, "encode", lambda prompts: encoded.extend(prompts) or encode(prompts))
    captions = ["a bag", "a coat", " A Bag", "a coat", "a dress"]
    table = extract_captions(encoder, captions, "sample", batch=2)
    assert sorted(encoded) == ["", "a bag", "a coat", "a dress"] and len(table.embeddings) == 3  # "": the null
    torch.testing.assert_close(table.null[0], encode([""])[0][0])
    assert table.rows.tolist() == [0, 1, 0, 1, 2]
    table.save(tmp_path / "t.safetensors")
    loaded = CaptionTable.load(tmp_path / "t.safetensors")
    embeddings, mask = loaded.lookup(torch.tensor([4, 2, 1]), torch.tensor([0, 0, 0]))
    want, want_mask = encode(["a dress", "a bag", "a coat"])
    torch.testing.assert_close(embeddings, want, atol=1e-2, rtol=1e-2)  # float16 on disk
    assert torch.equal(mask, want_mask)
    loaded.check_data(num_samples=5, num_classes=10)
    with pytest.raises(FlexDiTError, match="5 samples but the data has 6"):
        loaded.check_data(num_samples=6, num_classes=10)
    with pytest.raises(FlexDiTError, match="sample index 5 is outside"):
        loaded.lookup(torch.tensor([5]), None)


def test_extract_refuses_bad_arguments(encoder):
    with pytest.raises(FlexDiTError, match="choose class or sample"):
        extract_captions(encoder, ["a bag"], "image")
    with pytest.raises(FlexDiTError, match="no captions"):
        extract_captions(encoder, [], "class")
    with pytest.raises(FlexDiTError, match="at least 1"):
        extract_captions(encoder, ["a bag"], "class", batch=0)


def table_tensors(U=2, L=4, C=8, N=3):
    return {"embeddings": torch.randn(U, L, C).half(), "masks": torch.ones(U, L, dtype=torch.long),
            "rows": torch.arange(N) % U}


def table_meta(**changes):
    return {"format": CAPTIONS_FORMAT, "per": "sample", "text_encoder": "", "max_length": "4",
            "captions": json.dumps(["a", "b"]), **changes}


@pytest.mark.parametrize("tensors, meta, match", [
    (table_tensors(), {}, "not a flexdit-captions file"),
    (table_tensors(), table_meta(per="pixel"), "choose class or sample"),
    (table_tensors(), table_meta(max_length="5"), "says captions of 5 tokens"),
    (table_tensors(), table_meta(captions="[1"), "damaged caption metadata"),
    (table_tensors(), table_meta(captions=json.dumps(["a"])), "should name 2 captions"),
    ({k: v for k, v in table_tensors().items() if k != "rows"}, table_meta(), "not a whole caption table"),
    ({**table_tensors(), "masks": torch.ones(2, 5, dtype=torch.long)}, table_meta(), "not float"),
    ({**table_tensors(), "masks": torch.full((2, 4), 2)}, table_meta(), "not 0 or 1"),
    ({**table_tensors(), "rows": torch.tensor([0, 2])}, table_meta(), "rows outside"),
    ({**table_tensors(), "embeddings": torch.full((2, 4, 8), float("nan"))}, table_meta(), "NaN"),
])
def test_load_refuses_wrong_tables(tmp_path, tensors, meta, match):
    path = tmp_path / "t.safetensors"
    save_safetensors(path, tensors, meta)
    with pytest.raises(FlexDiTError, match=match):
        CaptionTable.load(path)


def test_load_refuses_missing_foreign_and_truncated_files(tmp_path):
    with pytest.raises(FlexDiTError, match="caption table not found"):
        CaptionTable.load(tmp_path / "none.safetensors")
    (tmp_path / "x.pt").write_bytes(b"\x80\x02not safetensors at all")
    with pytest.raises(FlexDiTError, match="not a readable caption table"):
        CaptionTable.load(tmp_path / "x.pt")
    path = tmp_path / "t.safetensors"
    save_file(table_tensors(), str(path), metadata=table_meta())
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(FlexDiTError, match="not a readable caption table"):
        CaptionTable.load(path)


# --- captions files -----------------------------------------------------------------------------------------------
def test_read_captions_file(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_bytes("\ufeffa photo of a bag\r\n  a café \nlast".encode())
    assert read_captions_file(path) == ["a photo of a bag", "a café", "last"]
    path.write_text("one\n\ntwo\n")
    with pytest.raises(FlexDiTError, match="line 2 .* is blank"):
        read_captions_file(path)
    path.write_text("")
    with pytest.raises(FlexDiTError, match="holds no captions"):
        read_captions_file(path)
    path.write_bytes(b"caf\xe9\n")
    with pytest.raises(FlexDiTError, match="not UTF-8"):
        read_captions_file(path)
    with pytest.raises(FlexDiTError, match="captions not found"):
        read_captions_file(tmp_path / "missing.txt")
