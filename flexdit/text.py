"""Captions for PixArt-alpha: a local T5 encoder that turns prompts into caption embeddings as PixArt-alpha's
pipeline does, and caption tables, the embeddings of a training set's captions computed once and stored.

A caption table keeps one row per distinct caption and, per class or per sample, the row it uses: T5-XXL rows are
120 x 4096, so a per-sample table of templated captions would otherwise repeat the same rows thousands of times.
"""
import importlib.util
import json
import os
from pathlib import Path

import torch
from tqdm import tqdm

from flexdit.checkpoints.files import first_sentence
from flexdit.errors import FlexDiTError
from flexdit.io import check_input_file, save_safetensors

MAX_LENGTH = 120  # PixArt-alpha's caption length (paper Sec. 3.1), padded with mask 0
TOKENIZER_FILES = ("tokenizer.json", "spiece.model")  # a fast tokenizer, or T5's SentencePiece model
CAPTIONS_FORMAT = "flexdit-captions"
TABLE_KEYS = ("embeddings", "masks", "rows")
NULL_KEYS = ("null_embedding", "null_mask")  # optional: the encoded empty prompt
PER = ("class", "sample")
REMAKE = "extract the captions again"


def prepare_caption(text: str) -> str:
    """What PixArt-alpha's pipeline feeds T5 when it does not clean captions: lower case, outer whitespace removed."""
    return text.lower().strip()


# --- the text encoder -----------------------------------------------------------------------------------------
class TextEncoder:
    """A T5 encoder and its tokenizer, read from a local folder; encode() matches diffusers' PixArtAlphaPipeline
    .encode_prompt (clean_caption=False): captions padded with <pad> and cut to max_length tokens, </s> included."""

    def __init__(self, model, tokenizer, max_length: int = MAX_LENGTH, path: str = ""):
        if max_length < 1:
            raise FlexDiTError(f"the caption length must be at least 1 token, got {max_length}")
        self.model, self.tokenizer, self.max_length, self.path = model, tokenizer, max_length, path

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             max_length: int = MAX_LENGTH) -> "TextEncoder":
        """A T5 model folder (config.json, weights, tokenizer files), or a pipeline folder with text_encoder/ and
        tokenizer/ (as PixArt-alpha's on the hub). Local files only: nothing is downloaded."""
        encoder_dir, tokenizer_dir = _find_folders(Path(path))
        config = _read_t5_config(encoder_dir)
        tokenizer = _load_tokenizer(tokenizer_dir)
        if len(tokenizer) > config.get("vocab_size", len(tokenizer)):
            raise FlexDiTError(f"the tokenizer in {tokenizer_dir} has {len(tokenizer)} tokens but the T5 encoder in "
                               f"{encoder_dir} only {config['vocab_size']}; give the tokenizer made for this encoder")
        model = _load_model(encoder_dir, dtype).to(device).eval()
        return cls(model, tokenizer, max_length, str(Path(path).resolve()))

    @property
    def channels(self) -> int:
        """C, the width of the embeddings (4096 for PixArt-alpha's T5-XXL)."""
        return self.model.config.d_model

    @property
    def device(self) -> torch.device:
        return self.model.device

    @torch.inference_mode()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> embeddings float32 (B, max_length, C) and mask int64 (B, max_length), on the encoder's device."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            return torch.empty(0, self.max_length, self.channels), torch.empty(0, self.max_length, dtype=torch.long)
        tokens = self.tokenizer([prepare_caption(p) for p in prompts], padding="max_length",
                                max_length=self.max_length, truncation=True, add_special_tokens=True,
                                return_tensors="pt")
        ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)  # (B, L), (B, L)
        embeddings = self.model(input_ids=ids, attention_mask=mask)[0].float()  # (B, L, C)
        if not torch.isfinite(embeddings).all():
            raise FlexDiTError(f"the T5 encoder gave NaN or infinite embeddings in {self.model.dtype}; load it in "
                               "float32 or bfloat16")
        return embeddings, mask.long()


def _find_folders(root: Path) -> tuple[Path, Path]:
    """(encoder folder, tokenizer folder) of a pipeline folder (text_encoder/ + tokenizer/) or a T5 model folder."""
    if not root.exists():
        raise FlexDiTError(f"text encoder not found: {root}; give a local T5 folder or a PixArt pipeline folder "
                           "(flexdit downloads nothing)")
    if not root.is_dir():
        raise FlexDiTError(f"text encoder {root} is a file; give the T5 folder (or the pipeline folder) that holds it")
    encoder_dir = tokenizer_dir = root
    if (root / "text_encoder").is_dir():
        encoder_dir, tokenizer_dir = root / "text_encoder", root / "tokenizer"
        if not tokenizer_dir.is_dir():
            raise FlexDiTError(f"{root} has text_encoder/ but no tokenizer/ beside it; copy the pipeline's "
                               "tokenizer/ folder there too")
    if not (encoder_dir / "config.json").is_file():
        raise FlexDiTError(f"{root} holds no T5 encoder (no config.json there or in text_encoder/); give a T5 "
                           "model folder or a PixArt pipeline folder")
    if not any((tokenizer_dir / name).is_file() for name in TOKENIZER_FILES):
        raise FlexDiTError(f"{tokenizer_dir} holds no tokenizer ({' or '.join(TOKENIZER_FILES)}); copy the "
                           "tokenizer files of this T5 model there")
    return encoder_dir, tokenizer_dir


def _read_t5_config(encoder_dir: Path) -> dict:
    path = encoder_dir / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise FlexDiTError(f"cannot read {path}: {first_sentence(e)}; copy the model's config.json again") from None
    kind = config.get("model_type") if isinstance(config, dict) else None
    if kind != "t5":
        raise FlexDiTError(f"{path} describes a {kind or 'unknown'} model, not T5; give a T5 encoder such as "
                           "PixArt-alpha's text_encoder/")
    return config


def _transformers():
    try:
        import transformers
    except ImportError:
        raise FlexDiTError("T5 text encoders are read with transformers: pip install transformers") from None
    return transformers


def _load_model(encoder_dir: Path, dtype: torch.dtype):
    """The T5 encoder's weights; any weight the files lack is an error, not a random initialisation."""
    transformers = _transformers()
    try:
        model, info = transformers.T5EncoderModel.from_pretrained(encoder_dir, local_files_only=True, dtype=dtype,
                                                                  output_loading_info=True)
    except Exception as e:  # transformers raises many types for missing or damaged files
        raise FlexDiTError(f"cannot load the T5 encoder in {encoder_dir}: {first_sentence(e)}") from None
    missing = info.get("missing_keys") or info.get("mismatched_keys")
    if missing:
        raise FlexDiTError(f"the weights in {encoder_dir} do not fit its config.json ({len(missing)} missing or "
                           f"misshapen, first {sorted(missing)[0]}); copy the model's files again")
    return model


def _missing_sentencepiece() -> list[str]:
    """The packages transformers needs to read a SentencePiece model (spiece.model) and are not installed."""
    needed = {"sentencepiece": "sentencepiece", "protobuf": "google.protobuf"}
    return [package for package, module in needed.items() if not _importable(module)]


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # the parent package (google) is absent
        return False


def _load_tokenizer(tokenizer_dir: Path):
    transformers = _transformers()
    if not (tokenizer_dir / "tokenizer.json").is_file():
        missing = _missing_sentencepiece()
        if missing:
            raise FlexDiTError(f"{tokenizer_dir} holds a SentencePiece tokenizer (spiece.model), which transformers "
                               f"reads with {' and '.join(missing)}: pip install {' '.join(missing)}")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    except Exception as e:  # as for the model: many types
        raise FlexDiTError(f"cannot load the tokenizer in {tokenizer_dir}: {first_sentence(e)}") from None
    if tokenizer.pad_token is None:
        raise FlexDiTError(f"the tokenizer in {tokenizer_dir} has no pad token, which captions are padded with; "
                           "give T5's tokenizer")
    return tokenizer


# --- caption tables ---------------------------------------------------------------------------------------------
class CaptionTable:
    """The caption embeddings of a training set.

    embeddings (U, L, C) float32 and masks (U, L) int64: one row per distinct caption, `captions` (U strings, as
    encoded). rows (N,) int64: the row each class uses (per "class": N = number of classes, sample i uses
    rows[label_i]) or each sample uses (per "sample": N = number of samples, sample i uses rows[i]).
    Stored as safetensors, embeddings in float16."""

    def __init__(self, embeddings: torch.Tensor, masks: torch.Tensor, captions: list[str], rows: torch.Tensor,
                 per: str, text_encoder: str = "", source: str = "the caption table",
                 null: tuple[torch.Tensor, torch.Tensor] | None = None):
        _check_table(embeddings, masks, captions, rows, per, source)
        if null is not None:
            _check_table(null[0][None], null[1][None], [""], torch.zeros(1, dtype=torch.long), per, source)
        self.embeddings, self.masks, self.rows = embeddings.float(), masks.long(), rows.long()
        self.captions, self.per, self.text_encoder = list(captions), per, text_encoder
        # (L, C), (L,): the encoded empty prompt, the null caption of caption dropout for a PixArt without a
        # learned one (diffusers checkpoints), as diffusers' pipeline guides with it
        self.null = None if null is None else (null[0].float(), null[1].long())

    def __len__(self) -> int:
        """N: the number of classes or samples the table covers."""
        return len(self.rows)

    @property
    def max_length(self) -> int:
        return self.embeddings.shape[1]

    @property
    def channels(self) -> int:
        return self.embeddings.shape[2]

    def lookup(self, sample_indices: torch.Tensor | None, labels: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) sample indices and (B,) labels -> embeddings (B, L, C) float32 and masks (B, L) int64, on the CPU.
        Only the one the table is indexed by is needed: labels per class, sample indices per sample."""
        name, keys = ("label", labels) if self.per == "class" else ("sample index", sample_indices)
        if keys is None:
            raise FlexDiTError(f"a per-{self.per} caption table is looked up by {name}; give them")
        keys = keys.long().cpu()  # (B,)
        bad = keys[(keys < 0) | (keys >= len(self))]
        if len(bad):
            raise FlexDiTError(f"{name} {int(bad[0])} is outside the caption table's {len(self)} {self.per} "
                               f"captions; {REMAKE} for this data")
        rows = self.rows[keys]  # (B,)
        return self.embeddings[rows], self.masks[rows]

    def check_data(self, num_samples: int, num_classes: int) -> None:
        """Refuse a table made for other data: per class it must cover num_classes, per sample num_samples."""
        want = num_classes if self.per == "class" else num_samples
        if len(self) != want:
            raise FlexDiTError(f"the caption table holds captions for {len(self)} {_plural(self.per)} but the data "
                               f"has {want}; {REMAKE} for this data")

    def save(self, path: str | os.PathLike) -> None:
        """Atomically, as safetensors: embeddings float16, masks, rows, and JSON-able metadata."""
        half = self.embeddings.half()
        if not torch.isfinite(half).all():
            raise FlexDiTError("the caption embeddings exceed float16's range (65504); they cannot be stored")
        metadata = {"format": CAPTIONS_FORMAT, "per": self.per, "text_encoder": self.text_encoder,
                    "max_length": str(self.max_length), "captions": json.dumps(self.captions)}
        tensors = {"embeddings": half, "masks": self.masks, "rows": self.rows}
        if self.null is not None:
            tensors.update(null_embedding=self.null[0].half(), null_mask=self.null[1])
        save_safetensors(path, tensors, metadata)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CaptionTable":
        """A table written by save(); safetensors only, checked for format, keys, shapes and values."""
        tensors, meta = _read_table_file(Path(path))
        if meta.get("format") != CAPTIONS_FORMAT:
            raise FlexDiTError(f"{path} is not a {CAPTIONS_FORMAT} file (format {meta.get('format')!r}); give a "
                               "caption table")
        null = tuple(tensors.pop(k) for k in NULL_KEYS if k in tensors) or None
        if sorted(tensors) != sorted(TABLE_KEYS) or any(k not in meta for k in ("per", "max_length", "captions")) \
                or (null is not None and len(null) != 2):
            raise FlexDiTError(f"{path} holds {sorted(tensors)} and metadata {sorted(meta)}, not a whole caption "
                               f"table; {REMAKE}")
        try:
            captions, max_length = json.loads(meta["captions"]), int(meta["max_length"])
        except ValueError:
            raise FlexDiTError(f"{path} has damaged caption metadata; {REMAKE}") from None
        table = cls(tensors["embeddings"], tensors["masks"], captions, tensors["rows"], meta["per"],
                    meta.get("text_encoder", ""), source=str(path), null=null)
        if table.max_length != max_length:
            raise FlexDiTError(f"{path} says captions of {max_length} tokens but holds {table.max_length}; {REMAKE}")
        return table


def _plural(per: str) -> str:
    return {"class": "classes", "sample": "samples"}[per]


def _read_table_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    check_input_file(path, "caption table")
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise FlexDiTError(f"{path} is not a readable caption table (safetensors): {first_sentence(e)}; "
                           f"{REMAKE}") from None


def _check_table(embeddings, masks, captions, rows, per: str, source: str) -> None:
    """Shapes, types and values that fit together, or a FlexDiTError naming `source`."""
    if per not in PER:
        raise FlexDiTError(f"{source}: captions are per {per!r}; choose {' or '.join(PER)}")
    shapes = f"embeddings {list(embeddings.shape)}, masks {list(masks.shape)}, rows {list(rows.shape)}"
    if (embeddings.dim() != 3 or not embeddings.is_floating_point() or masks.shape != embeddings.shape[:2]
            or rows.dim() != 1 or masks.is_floating_point() or rows.is_floating_point() or len(embeddings) == 0):
        raise FlexDiTError(f"{source} has {shapes}: not float (U, L, C), integer (U, L) and (N,) with U >= 1; "
                           f"{REMAKE}")
    if not isinstance(captions, list) or len(captions) != len(embeddings) or \
            not all(isinstance(c, str) for c in captions):
        raise FlexDiTError(f"{source} should name {len(embeddings)} captions, one per row; {REMAKE}")
    if ((masks != 0) & (masks != 1)).any():
        raise FlexDiTError(f"{source} has masks that are not 0 or 1; {REMAKE}")
    if len(rows) and (rows.min() < 0 or rows.max() >= len(embeddings)):
        raise FlexDiTError(f"{source} points to rows outside its {len(embeddings)} captions; {REMAKE}")
    if not torch.isfinite(embeddings).all():
        raise FlexDiTError(f"{source} holds NaN or infinite embeddings; {REMAKE}")


def extract_captions(encoder: TextEncoder, captions: list[str], per: str, batch: int = 64,
                     progress: bool = False) -> CaptionTable:
    """Encode the captions of every class (per "class", in label order) or every sample (per "sample", in sample
    order); each distinct caption (as prepare_caption makes it) is encoded once, and the empty prompt as the
    table's null caption."""
    if per not in PER:
        raise FlexDiTError(f"captions are per {per!r}; choose {' or '.join(PER)}")
    if not captions:
        raise FlexDiTError("no captions to encode; give one per class or one per sample")
    if batch < 1:
        raise FlexDiTError(f"the caption batch must be at least 1, got {batch}")
    prepared = [prepare_caption(c) for c in captions]
    distinct = list(dict.fromkeys(prepared))
    row_of = {c: i for i, c in enumerate(distinct)}
    embeddings, masks = [], []
    for start in tqdm(range(0, len(distinct), batch), desc="captions", unit="batch", disable=not progress):
        e, m = encoder.encode(distinct[start:start + batch])  # (b, L, C), (b, L)
        embeddings.append(e.cpu())
        masks.append(m.cpu())
    rows = torch.tensor([row_of[c] for c in prepared], dtype=torch.long)  # (N,)
    null_embedding, null_mask = encoder.encode([""])
    return CaptionTable(torch.cat(embeddings), torch.cat(masks), distinct, rows, per, encoder.path,
                        null=(null_embedding[0].cpu(), null_mask[0].cpu()))


def readable_class_name(name: str) -> str:
    """A class folder or dataset name as words: lower case, "_" as a space, "/" as "or" ("T-shirt/top" ->
    "t-shirt or top"); hyphens stay, as T5 reads them."""
    words = name.replace("_", " ").replace("/", " or ").split()
    return " ".join(words).lower()


def class_captions(class_names: list[str], template: str = "a photo of a {}") -> list[str]:
    """One caption per class, in label order: the template with "{}" replaced by the readable class name."""
    if template.count("{}") != 1:
        raise FlexDiTError(f"the caption template {template!r} must hold {{}} once, where the class name goes")
    return [template.replace("{}", readable_class_name(name)) for name in class_names]


def read_captions_file(path: str | os.PathLike) -> list[str]:
    """A UTF-8 text file, one caption per line (per class in label order, or per sample in sample order)."""
    check_input_file(path, "captions")
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")  # a byte-order mark, as some editors write, is dropped
    except UnicodeDecodeError as e:
        raise FlexDiTError(f"{path} is not UTF-8 text (byte {e.start}); save it as UTF-8, one caption per "
                           "line") from None
    except OSError as e:
        raise FlexDiTError(f"cannot read {path}: {e.strerror}") from None
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the newline ending the last line
    lines = [line.rstrip("\r").strip() for line in lines]
    if not lines:
        raise FlexDiTError(f"{path} holds no captions; write one caption per line")
    blank = next((i for i, line in enumerate(lines, 1) if not line), None)
    if blank is not None:
        raise FlexDiTError(f"line {blank} of {path} is blank; write one caption per line, with no blank lines")
    return lines


def caption_condition(encoder: TextEncoder | None, prompts: list[str] | None = None, table: str | None = None,
                      num: int | None = None, negative: str | None = None
                      ) -> tuple[dict[str, torch.Tensor], list[int], list[str]]:
    """The conditioning of `num` samples (default: one per caption) cycling over `prompts` (encoded by `encoder`) or
    over the captions of the caption table at `table`; with `negative` (a prompt, "" for the empty one) also the
    negative caption guidance uses instead of a learned null caption. Returns the conditioning (CPU tensors: caption,
    caption_mask and maybe negative_caption, negative_caption_mask), each sample's caption index and the captions."""
    if prompts is not None:
        if encoder is None:
            raise FlexDiTError("--prompt needs --text-encoder T5_FOLDER (a local T5 encoder, e.g. the text_encoder/ "
                               "and tokenizer/ of PixArt-alpha's pipeline folder), or use --captions TABLE")
        embeddings, masks = encoder.encode(prompts)
    else:
        loaded = CaptionTable.load(table)
        prompts, embeddings, masks = loaded.captions, loaded.embeddings, loaded.masks
    ids = [i % len(prompts) for i in range(num or len(prompts))]
    condition = {"caption": embeddings[ids].cpu(), "caption_mask": masks[ids].cpu()}
    if negative is not None:
        if encoder is None:
            raise FlexDiTError("guidance of this model needs a negative caption (it has no learned null caption): "
                               "give --text-encoder (T5 of the empty prompt, or --negative-prompt), or --cfg 1")
        null, null_mask = encoder.encode([negative])
        condition.update(negative_caption=null.cpu().expand(len(ids), -1, -1),
                         negative_caption_mask=null_mask.cpu().expand(len(ids), -1))
    return condition, ids, list(prompts)

