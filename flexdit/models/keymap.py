"""Key mappings between our state dicts and another layout's (diffusers'), as (our key, their keys) pairs: one of
our tensors is their tensors concatenated along dim 0 (fused q/k/v), or one of theirs."""
import torch

from flexdit.errors import FlexDiTError

KeyPairs = list[tuple[str, tuple[str, ...]]]


def state_from_pairs(state: dict[str, torch.Tensor], pairs: KeyPairs, what: str) -> dict[str, torch.Tensor]:
    """Their state dict -> ours; every key of theirs must be used and present (`what` names the layout)."""
    expected = {k for _, theirs in pairs for k in theirs}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise FlexDiTError(f"the {what} weights do not fit the config: missing {missing[:3]}, unexpected "
                           f"{unexpected[:3]}; check the transformer's config.json")
    return {ours: torch.cat([state[k] for k in theirs]) if len(theirs) > 1 else state[theirs[0]]
            for ours, theirs in pairs}


def state_to_pairs(state: dict[str, torch.Tensor], pairs: KeyPairs) -> dict[str, torch.Tensor]:
    """Our state dict -> theirs: fused tensors split back into their equal parts."""
    out = {}
    for ours, theirs in pairs:
        out.update((k, part.clone()) for k, part in zip(theirs, state[ours].chunk(len(theirs))))
    return out
