"""One seed mixer for every random stream in iwm.

Each stream is a CPU `torch.Generator` seeded by `mix(domain, *parts)`: a stream's name (`domain`, one
of the constants below) and its integers, e.g. (seed, step) for a step's masks or (seed, step, index)
for a sample's crop. Nothing else goes in, so a stream is the same in the main process, in any loader
worker, on any rank and after a resume. The domain keeps streams with the same integers apart (the
crop of sample 7 at step s must not be the batch order of epoch s).

The mixer is splitmix64 (Steele, Lea and Flood, "Fast splittable pseudorandom number generators"):
each part is XOR-ed into the state and the state is scrambled; the domain's bytes and the number of
parts enter the same way, so (a, b) and (a, b, 0) differ. It is not cryptographic, only well spread:
distinct inputs give unrelated 63-bit seeds (torch seeds are < 2**63 here).
"""
from __future__ import annotations

import functools
import operator

import torch

_MASK64 = (1 << 64) - 1

# The streams, by what they draw (one name each; iwm.masks, iwm.data, iwm.augment).
MASKS = "iwm.masks"              # (seed, step): a step's mask block sizes and positions
ORDER = "iwm.data.order"         # (seed, epoch): the epoch's permutation of the dataset
CROP = "iwm.data.crop"           # (seed, step, index[, split]): a sample's crop box and flip
VIEWS = "iwm.augment.views"      # (seed, step): the global batch's photometric view parameters


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


@functools.lru_cache(maxsize=64)
def _domain_state(domain: str) -> int:
    if not isinstance(domain, str) or not domain:
        raise ValueError(f"domain: expected a non-empty stream name, got {domain!r}")
    state = 0
    for byte in domain.encode():
        state = _splitmix64(state ^ byte)
    return state


def mix(domain: str, *parts: int) -> int:
    """A 63-bit generator seed from a stream name and integers (negative ones too, e.g. step -1)."""
    state = _splitmix64(_domain_state(domain) ^ len(parts))
    for i, part in enumerate(parts):
        if isinstance(part, bool):
            raise TypeError(f"parts[{i}]: expected an int, got bool")
        try:
            value = operator.index(part)  # ints and NumPy integers; not floats or tensors
        except TypeError:
            raise TypeError(f"parts[{i}]: expected an int, got {type(part).__name__}") from None
        state = _splitmix64(state ^ (value & _MASK64))
    return state >> 1


def generator(domain: str, *parts: int) -> torch.Generator:
    """A CPU generator whose stream depends only on (domain, *parts)."""
    return torch.Generator().manual_seed(mix(domain, *parts))
