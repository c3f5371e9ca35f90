"""T5 caption conditioning, shared by the backbones that read captions (PixArt-alpha, Latte-1): checking what a
caller passes, padding captions of different lengths under their masks, pairing a caption with its null (guidance)
and swapping the null in (caption dropout)."""
import torch

from flexdit.errors import FlexDiTError

CAPTION_KEYS = ("caption", "caption_mask", "negative_caption", "negative_caption_mask")
Caption = tuple[torch.Tensor, torch.Tensor | None]  # (B, L, C) embeddings, (B, L) 1/0 mask or None: all tokens


def checked_caption(caption: torch.Tensor | None, caption_mask: torch.Tensor | None, batch: int,
                    channels: int) -> torch.Tensor | None:
    """Raise on a caption (B, L, channels) or mask (B, L) that does not fit; return the mask as bool (B, L), None
    when nothing is padded."""
    if caption is None or caption.dim() != 3 or caption.shape[0] != batch or caption.shape[2] != channels \
            or caption.shape[1] < 1:
        raise FlexDiTError(f"caption of shape {None if caption is None else tuple(caption.shape)} does not fit the "
                           f"model; expected (B={batch}, L, {channels}) T5 embeddings with L >= 1")
    if caption_mask is None:
        return None
    if tuple(caption_mask.shape) != tuple(caption.shape[:2]):
        raise FlexDiTError(f"caption_mask of shape {tuple(caption_mask.shape)} does not match the caption's "
                           f"(B, L) = {tuple(caption.shape[:2])}")
    keep = caption_mask != 0
    empty = (~keep.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise FlexDiTError(f"caption_mask masks every token of sample {empty[0]}; keep at least one token "
                           "(T5 keeps the end-of-sequence token of an empty prompt)")
    return None if bool(keep.all()) else keep


def prepare_captions(condition, channels: int, who: str, extra_keys: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """A caption conditioning dict (CAPTION_KEYS, plus a backbone's `extra_keys`) as batch-first tensors, each caption
    and mask checked against the first caption's batch and the model's `channels`; `who` names the model."""
    if not isinstance(condition, dict) or "caption" not in condition:
        raise FlexDiTError(f"{who} is conditioned on captions: give {{'caption': (B, L, C) T5 embeddings, "
                           "'caption_mask': (B, L)} (flexdit sample --prompt with --text-encoder)")
    known = CAPTION_KEYS + extra_keys
    unknown = sorted(set(condition) - set(known))
    if unknown:
        raise FlexDiTError(f"unknown caption condition {unknown[0]!r}; known: {', '.join(known)}")
    out = {k: torch.as_tensor(v) for k, v in condition.items() if v is not None}
    B = out["caption"].shape[0]
    for key in ("caption", "negative_caption"):
        if key in out and (out[key].dim() != 3 or out[key].shape[0] != B or out[key].shape[2] != channels):
            raise FlexDiTError(f"{key} of shape {tuple(out[key].shape)} does not fit the model; expected "
                               f"(B={B}, L, {channels}) T5 embeddings")
        if f"{key}_mask" in out and tuple(out[f"{key}_mask"].shape) != tuple(out[key].shape[:2]):
            raise FlexDiTError(f"{key}_mask of shape {tuple(out[f'{key}_mask'].shape)} does not match the "
                               f"{key}'s (B, L) = {tuple(out[key].shape[:2])}")
    return out


def pad_caption(caption: torch.Tensor, mask: torch.Tensor | None, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L, C) caption and (B, L) mask (None: all tokens) -> both padded to `length` tokens, padding masked."""
    B, L, C = caption.shape
    mask = torch.ones(B, L, dtype=torch.long, device=caption.device) if mask is None else mask.long()
    if L == length:
        return caption, mask
    return (torch.cat([caption, caption.new_zeros(B, length - L, C)], 1),
            torch.cat([mask, mask.new_zeros(B, length - L)], 1))


def _common_length(a: Caption, b: Caption) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    length = max(a[0].shape[1], b[0].shape[1])
    return pad_caption(*a, length), pad_caption(*b, length)


def with_null(caption: Caption, null: Caption) -> dict[str, torch.Tensor]:
    """Guidance's doubled batch: the captions (B, L, C) followed by their nulls (B, L', C), padded to one length."""
    (c, m), (n, nm) = _common_length(caption, null)
    return {"caption": torch.cat([c, n]), "caption_mask": torch.cat([m, nm])}


def dropped_captions(caption: Caption, null: Caption, drop: torch.Tensor) -> dict[str, torch.Tensor]:
    """Caption dropout: the null (B, L', C) where drop (B,) is True, the caption elsewhere, padded to one length."""
    (c, m), (n, nm) = _common_length(caption, null)
    keep = ~drop.to(c.device)
    return {"caption": torch.where(keep[:, None, None], c, n), "caption_mask": torch.where(keep[:, None], m, nm)}


def expand_null(null: tuple[torch.Tensor, torch.Tensor], like: torch.Tensor) -> Caption:
    """A single null caption ((L', C), (L',)), e.g. T5 of the empty prompt, for every sample of `like` (B, L, C)."""
    B = like.shape[0]
    return null[0].to(like)[None].expand(B, -1, -1), null[1][None].expand(B, -1)
