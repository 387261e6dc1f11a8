"""Launch policy of the FlashAttention kernels: which tiles, warps and pipeline stages run where.

The kernels (``flash_attention.py``) are written for any tile shape; this
module picks them, per padded head dim, dtype size and GPU shared memory:

* the forward autotunes over ``forward_configs``: (BLOCK_M, num_warps) x
  BLOCK_N x stages, pruned ahead of time by ``fits_forward`` to what fits a
  GPU's shared memory and registers (13 or 14 configs for 16-bit head dims
  up to 128 on an H100, each a compile on first use);
* the backward kernels run fixed ``backward_settings``, so a shape always
  launches, and rounds, the same way on one GPU.

``tests/kernels/test_gpu_compilation.py`` compiles every listed config for
sm_90 and fails on spills; ``kernels/NOTES.md`` keeps the register figures
behind these rules.
"""

from __future__ import annotations

import functools

import triton

# Head dims are padded to BLOCK_D = next_power_of_2(D) (at least 16, the
# smallest tl.dot); past 256 the tiles no longer fit a GPU's registers.
MAX_HEAD_DIM = 256
# Forward candidates; four pipeline stages only for the smallest key tiles.
FORWARD_QUERY_TILES = ((64, 4), (64, 8), (128, 8))  # (BLOCK_M, num_warps)
FORWARD_BLOCK_N = (32, 64, 128)
FORWARD_STAGES = (2, 3, 4)


def fits_forward(block_m: int, block_n: int, num_warps: int, num_stages: int, block_d: int, element_size: int,
                 shared_memory: int) -> bool:  # fmt: skip
    """Whether a forward config fits: shared memory for the pipelined K/V tiles, registers for the accumulator."""
    # q once, K and V tiles once per pipeline stage.
    tiles_bytes = (block_m + 2 * block_n * num_stages) * block_d * element_size
    # float32 accumulator plus the (BLOCK_M, BLOCK_N) scores, per thread: past
    # ~128 values the compiler spills to local memory.
    values_per_thread = (block_m * block_d + block_m * block_n) / (32 * num_warps)
    # 8 warps on 64 query rows pay off only when 4 would hold too many values (D >= 128).
    wasteful = (num_warps == 8 and block_m == 64 and block_d < 128) or (num_stages == 4 and block_n > 32)
    # From head dim 128, tiles of 64 or more keys on one warpgroup (4 warps) or
    # with a third pipeline stage spill on sm_90.
    crowded = block_d >= 128 and block_n >= 64 and (num_warps == 4 or num_stages > 2)
    return tiles_bytes <= shared_memory and values_per_thread <= 128 and not wasteful and not crowded


def forward_configs(block_d: int, element_size: int, shared_memory: int) -> list[triton.Config]:
    """The forward's autotuning candidates for one padded head dim, dtype size and GPU shared-memory size."""
    configs = [
        triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages)
        for block_m, num_warps in FORWARD_QUERY_TILES
        for block_n in FORWARD_BLOCK_N
        for num_stages in FORWARD_STAGES
        if fits_forward(block_m, block_n, num_warps, num_stages, block_d, element_size, shared_memory)
    ]
    # Nothing fits only for float32 at head dim 256 on a small-memory GPU: one unpipelined small tile.
    return configs or [triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=8, num_stages=1)]


@functools.lru_cache(maxsize=None)
def shared_memory_per_block(device_index: int) -> int:
    """The most shared memory one program may use on CUDA device ``device_index``."""
    return triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"]


def backward_shared_bytes(block_m: int, block_n: int, num_stages: int, block_d: int, element_size: int) -> int:
    """A bound on a backward kernel's shared memory (the compiled kernels use less): the streamed
    pair of tiles per pipeline stage plus room for layout conversions of the held pair."""
    return (2 * block_m * num_stages + 2 * (block_m + block_n)) * block_d * element_size


def backward_settings(block_d: int, element_size: int, shared_memory: int) -> dict:
    """Fixed backward launch settings by padded head dim, dtype size and GPU shared memory per block.

    The backward holds two float32 accumulators of (block, BLOCK_D) per
    program (dK and dV, or dQ next to q and dO), about twice the forward's
    register state, so it cannot reuse the forward's tuned blocks. These are
    fixed, so a shape always launches (and rounds) the same way on one GPU;
    where the tiles would not fit (float32, or small-memory GPUs) fewer
    stages, then smaller blocks.
    """
    if block_d <= 64:
        block_m, block_n, num_warps, num_stages = 64, 64, 4, 2
    elif block_d <= 128:
        block_m, block_n, num_warps, num_stages = (64 if element_size == 2 else 32), 64, 8, 2
    else:
        block_m, block_n, num_warps, num_stages = 32, 32, 8, 1
    while backward_shared_bytes(block_m, block_n, num_stages, block_d, element_size) > shared_memory:
        if num_stages > 1:
            num_stages -= 1
        elif max(block_m, block_n) > 16:
            block_m, block_n = (block_m // 2, block_n) if block_m >= block_n else (block_m, block_n // 2)
        else:
            break
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": num_warps, "num_stages": num_stages}


def padded_head_dim(head_dim: int) -> int:
    """BLOCK_D: the head dim padded to a power of two, at least 16 (the smallest tl.dot)."""
    return max(16, triton.next_power_of_2(head_dim))
