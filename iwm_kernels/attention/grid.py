"""Launch grid of the attention kernels: one program per (sequence, head, row tile).

The row-tile count comes from the longest sequence the layout really has, not from the caller's
max_seqlen, which is only an upper bound (a caller may pass the padded or maximal length; a grid sized
from it would launch mostly idle programs, and past 65535 tiles exceed CUDA's grid y limit).

The programs are numbered linearly, (sequence, head) fastest and row tile next, and the number is split
over the grid dimensions within CUDA's limits (x up to 2^31 - 1, y and z up to 65535); the kernels
decode it (`_program_tile` in triton_kernels.py). When (sequence x head, tiles) fits in (x, y), the grid
is exactly that, so the common launch is unchanged. Programs past the end of the numbering exit at once.
Plain Python, so that it is tested without triton.
"""
from __future__ import annotations

GRID_X_LIMIT = 2**31 - 1
GRID_YZ_LIMIT = 65535


def num_row_tiles(longest: int, block: int) -> int:
    return -(-longest // block)


def tile_grid(num_seq_heads: int, longest: int, block: int) -> tuple[int, int, int]:
    """(x, y, z) covering num_seq_heads * ceil(longest / block) programs, every dimension within limits."""
    if num_seq_heads < 0 or longest < 0 or block < 1:
        raise ValueError(f"tile_grid: invalid sizes ({num_seq_heads}, {longest}, {block})")
    tiles = num_row_tiles(longest, block)
    if num_seq_heads == 0 or tiles == 0:
        return (1, 1, 1)  # one program with nothing to do (callers skip empty launches anyway)
    if num_seq_heads <= GRID_X_LIMIT and tiles <= GRID_YZ_LIMIT:
        return (num_seq_heads, tiles, 1)
    programs = num_seq_heads * tiles
    x = min(programs, GRID_X_LIMIT)
    rest = -(-programs // x)
    y = min(rest, GRID_YZ_LIMIT)
    z = -(-rest // y)
    if z > GRID_YZ_LIMIT:
        raise ValueError(f"varlen_attention: {num_seq_heads} sequence-heads x {tiles} row tiles need more programs "
                         "than a CUDA grid holds")
    return (x, y, z)
