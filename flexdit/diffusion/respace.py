"""Timestep respacing with the original DiT/ADM semantics.

A sampler with fewer steps than the 1000 training steps runs the model at a subset of the integer
timesteps 0..999; the model (and so the density schedule) always sees these original integers.
"""
from flexdit.errors import FlexDiTError


def space_timesteps(num_timesteps: int, section_counts: str | int | list[int]) -> list[int]:
    """The kept timesteps, ascending. "250" -> 250 evenly strided steps (ADM's rounding);
    "ddim50" -> range(0, T, T // 50); "10,15,20" -> that many steps from each of three equal sections."""
    if isinstance(section_counts, str) and section_counts.startswith("ddim"):
        desired = int(section_counts[len("ddim"):])
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == desired:
                return list(range(0, num_timesteps, stride))
        raise FlexDiTError(f"cannot create exactly {desired} DDIM steps from {num_timesteps} with an integer stride")
    if isinstance(section_counts, int):
        section_counts = [section_counts]
    elif isinstance(section_counts, str):
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, kept = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise FlexDiTError(f"cannot take {count} steps from a section of {size} timesteps; "
                               f"use between 1 and {size}")
        stride = (size - 1) / (count - 1) if count > 1 else 1
        position = 0.0  # accumulated, not j * stride: ADM's float rounding, so the same steps come out
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return sorted(set(kept))
