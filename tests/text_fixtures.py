"""A tiny T5 text encoder and tokenizer built without downloads, saved as PixArt-alpha keeps them (a pipeline folder
with text_encoder/ and tokenizer/) or as a single T5 model folder. Tests import make_tiny_text_encoder."""
import re
from pathlib import Path

import torch

from flexdit.training.data import FASHION_MNIST_CLASS_NAMES

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"  # T5's special tokens, with T5's ids 0, 1, 2
TEMPLATE_WORDS = ("a", "an", "photo", "of", "picture", "or", "-")


def default_words() -> list[str]:
    """The Fashion-MNIST class names' words (lower-cased, split on non-letters) and a few template words."""
    words = [w for name in FASHION_MNIST_CLASS_NAMES for w in re.split(r"[^a-z]+", name.lower()) if w]
    return list(dict.fromkeys([*words, *TEMPLATE_WORDS]))


def make_tokenizer(words: list[str]):
    """A T5-like tokenizer: whole words (split on whitespace and punctuation), unknown words -> <unk>, </s>
    appended to every sequence, right padding with <pad>."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(dict.fromkeys([PAD, EOS, UNK, *words]))}
    backend = Tokenizer(WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = Whitespace()
    backend.post_processor = TemplateProcessing(single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}",
                                                special_tokens=[(EOS, vocab[EOS])])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, eos_token=EOS, unk_token=UNK)


def make_tiny_text_encoder(folder: str | Path, d_model: int = 32, words: list[str] | None = None,
                           pipeline: bool = True, seed: int = 0, num_layers: int = 2) -> Path:
    """Save a seeded random T5EncoderModel (T5 v1.1's gated-GELU, as PixArt's T5-XXL) and its tokenizer under
    `folder`: text_encoder/ + tokenizer/ when `pipeline`, else both in `folder` itself. Returns `folder`."""
    from transformers import T5Config, T5EncoderModel

    folder = Path(folder)
    tokenizer = make_tokenizer(default_words() if words is None else list(words))
    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=num_layers,
                      num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                      feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    with torch.random.fork_rng(devices=[]):  # seeded weights, without moving the caller's random stream
        torch.manual_seed(seed)
        model = T5EncoderModel(config).eval()
    model.save_pretrained(folder / "text_encoder" if pipeline else folder)
    tokenizer.save_pretrained(folder / "tokenizer" if pipeline else folder)
    return folder
