"""Launch policy of the FlashAttention kernels: which tiles, warps and pipeline stages run on which GPU.

The kernels (``flash_attention_kernels.py``) are written for any tile shape;
this module picks them per GPU generation, padded head dim and dtype size:

* the forward autotunes over ``forward_configs``, a short list of
  (BLOCK_M, BLOCK_N, warps, stages) candidates, each a compile on first use;
* the backward kernels run fixed ``backward_settings``, so a shape always
  launches, and rounds, the same way on one GPU.

What decides each choice:

* **Registers.** A thread has at most 255; past that the compiler spills to
  local memory, which costs more than a smaller tile saves. The budget is
  spent differently per generation, because a 16-bit ``tl.dot`` compiles to a
  different tensor-core instruction on each: ``mma.sync`` on Ampere, Ada and
  consumer Blackwell (operands and accumulator all in registers), ``wgmma``
  on Hopper (operands read from shared memory), ``tcgen05`` on data-centre
  Blackwell (accumulator in tensor memory). So each generation has its own
  table: the largest tiles that compile without a spill there, plain and with
  documents, bf16 and fp16. float32 dots are IEEE (no tensor cores), the
  same on every generation, and need 8 warps and small tiles.
* **Shared memory.** K and V tiles once per pipeline stage, plus q, must fit
  what one program may use: 227 KiB on H100/H200 and B200, 163 KiB on A100,
  99 KiB on the consumer and workstation parts. Candidates that do not fit
  the device at hand are dropped at run time, so a generation's table can
  list deeper pipelines than its smallest member holds.
* **Unknown GPUs.** A compute capability not in the table takes the nearest
  known generation below it (a B300, sm_103, runs B200's tiles; anything
  below sm_80 runs A100's), still pruned by its own shared memory.

* **Windows and soft-capping.** A sliding window adds a lower bound per
  row and soft-capping a tanh per score: a few registers more, so attention
  with either takes windowed tables (``windowed=True``): each generation's
  own less the forward tiles that spill there, and a smaller backward tile
  where its usual one spills.

``tests/kernels/test_gpu_compilation.py`` compiles every listed candidate
and backward setting for sm_80, sm_89, sm_90, sm_100 and sm_120 at head dims
64, 128 and 256, plain, with documents and with a window and soft-capping,
and fails on any spill; ``kernels/NOTES.md`` keeps the register figures
behind the tables.
"""

from __future__ import annotations

import bisect
import functools
from typing import NamedTuple

import torch
import triton

# Head dims are padded to BLOCK_D = next_power_of_2(D) (at least 16, the
# smallest tl.dot); past 256 the tiles no longer fit a GPU's registers.
MAX_HEAD_DIM = 256


class Tile(NamedTuple):
    block_m: int  # query rows per program
    block_n: int  # keys per step
    num_warps: int
    num_stages: int


class Generation(NamedTuple):
    capability: int  # the lowest compute capability it covers, major * 10 + minor
    gpus: str
    shared_memory: int  # bytes one program may use
    tensor_cores: str  # what a 16-bit tl.dot compiles to
    # Per (head-dim class, element size): the forward's candidates and the backward's setting.
    forward: dict[tuple[int, int], tuple[Tile, ...]]
    backward: dict[tuple[int, int], Tile]
    # The same with a sliding window or soft-capping, where they differ (see WINDOWED_*).
    windowed_forward: dict[tuple[int, int], tuple[Tile, ...]]
    windowed_backward: dict[tuple[int, int], Tile]


# float32 and head dim 256: shared by the generations (no tensor cores / few tiles fit at all), but
# where one's own table says otherwise (_generation). float32 dots are IEEE multiply-adds: 8 warps,
# small tiles, one stage (a second spills on sm_89).
FLOAT32_FORWARD = {
    (64, 4): (Tile(32, 32, 8, 1), Tile(64, 32, 8, 1)),
    (128, 4): (Tile(16, 32, 8, 1),),
}
FLOAT32_BACKWARD = {(64, 4): Tile(32, 32, 8, 1), (128, 4): Tile(16, 16, 8, 1)}
# Head dim 256: 64 x 64 forward tiles spill (144 bytes on sm_90), and float32 fits only 16 query rows.
HEAD_DIM_256_FORWARD = {
    (256, 2): (Tile(64, 32, 8, 1), Tile(64, 32, 8, 2)),
    (256, 4): (Tile(16, 32, 8, 1),),
}
HEAD_DIM_256_BACKWARD = {(256, 2): Tile(32, 32, 8, 1), (256, 4): Tile(16, 16, 8, 1)}

# A sliding window adds a lower bound per row, soft-capping a tanh per score and its slope in the
# backward: a few registers more, which some tuned tiles lack. With either, float32 and head dim
# 256 take these smaller tiles unless a generation's windowed tables say otherwise, and each
# generation drops the 16-bit forward tiles that spill there (its windowed tables in GENERATIONS).
WINDOWED_FORWARD = {(64, 4): (Tile(16, 32, 8, 1),), (128, 4): (Tile(16, 16, 8, 1),)}
WINDOWED_BACKWARD = {(64, 4): Tile(16, 16, 8, 1), (256, 2): Tile(16, 32, 8, 1)}


def _without(table: dict, key: tuple[int, int], *spilling: Tile) -> dict:
    """``table``'s entry for ``key`` less the ``spilling`` tiles."""
    return {key: tuple(t for t in table[key] if t not in spilling)}


# mma.sync generations hold whole operand tiles in registers: 8 warps from 64 x 64 tiles up.
MMA_SYNC_FORWARD = {
    (64, 2): (
        Tile(64, 32, 4, 2), Tile(64, 32, 4, 3), Tile(64, 64, 4, 3), Tile(64, 64, 8, 2), Tile(64, 64, 8, 3),
        Tile(128, 32, 8, 2), Tile(128, 32, 8, 3), Tile(128, 64, 8, 2), Tile(128, 64, 8, 3),
    ),
    (128, 2): (
        Tile(64, 32, 4, 2), Tile(64, 32, 4, 3), Tile(64, 64, 8, 2), Tile(64, 64, 8, 3),
        Tile(128, 32, 8, 2), Tile(128, 32, 8, 3), Tile(64, 128, 8, 1), Tile(64, 128, 8, 2),
    ),
}  # fmt: skip
MMA_SYNC_BACKWARD = {(64, 2): Tile(32, 64, 4, 2), (128, 2): Tile(64, 64, 8, 1)}

HOPPER_FORWARD = {
    (64, 2): (
        Tile(64, 32, 4, 2), Tile(64, 32, 4, 3), Tile(64, 32, 4, 4), Tile(64, 64, 4, 2), Tile(64, 64, 4, 3),
        Tile(64, 128, 4, 2), Tile(64, 128, 4, 3), Tile(128, 32, 8, 2), Tile(128, 32, 8, 3), Tile(128, 32, 8, 4),
        Tile(128, 64, 8, 2), Tile(128, 64, 8, 3), Tile(128, 128, 8, 2), Tile(128, 128, 8, 3),
    ),
    (128, 2): (
        Tile(64, 32, 4, 2), Tile(64, 32, 4, 3), Tile(64, 32, 4, 4), Tile(64, 32, 8, 2), Tile(64, 32, 8, 3),
        Tile(64, 32, 8, 4), Tile(64, 64, 8, 2), Tile(64, 128, 8, 2), Tile(128, 32, 8, 2), Tile(128, 32, 8, 3),
        Tile(128, 32, 8, 4), Tile(128, 64, 8, 2), Tile(128, 128, 8, 2),
    ),
}  # fmt: skip
HOPPER_BACKWARD = {(64, 2): Tile(64, 64, 4, 2), (128, 2): Tile(64, 64, 8, 2)}

# tcgen05 keeps the accumulator in tensor memory: 128-row tiles fit, but a 128 x 128 tile
# still spills (at head dim 64 only plain, from 3 stages), and 4 warps with a pipeline
# spill from 64 x 128.
BLACKWELL_FORWARD = {
    (64, 2): (
        Tile(64, 64, 4, 2), Tile(64, 64, 4, 3), Tile(64, 128, 8, 2), Tile(64, 128, 8, 3), Tile(128, 32, 8, 2),
        Tile(128, 64, 8, 2), Tile(128, 64, 8, 3),
    ),
    (128, 2): (
        Tile(64, 32, 8, 2), Tile(64, 64, 8, 2), Tile(64, 64, 8, 3), Tile(64, 128, 8, 2), Tile(64, 128, 8, 3),
        Tile(128, 32, 8, 2), Tile(128, 32, 8, 3), Tile(128, 64, 8, 2), Tile(128, 64, 8, 3),
    ),
}  # fmt: skip
BLACKWELL_BACKWARD = {(64, 2): Tile(128, 64, 8, 2), (128, 2): Tile(64, 64, 8, 2)}


def _generation(capability, gpus, shared_memory, tensor_cores, forward, backward,
                windowed_forward=None, windowed_backward=None) -> Generation:  # fmt: skip
    # The shared tables first: a generation's own entry overrides them.
    forward = {**FLOAT32_FORWARD, **HEAD_DIM_256_FORWARD, **forward}
    backward = {**FLOAT32_BACKWARD, **HEAD_DIM_256_BACKWARD, **backward}
    return Generation(capability, gpus, shared_memory, tensor_cores, forward, backward,
                      {**WINDOWED_FORWARD, **(windowed_forward or {})},
                      {**WINDOWED_BACKWARD, **(windowed_backward or {})})  # fmt: skip


# sm_89 stops some kernels at 128 registers: 64 x 32 (4 warps, 2 stages) at head dim 64 and 64 x 64 (8 warps,
# 2 stages) at 128 spill 8 and 24 bytes even plain; at head dim 256 float32's 16-row forward tiles spill 16 to
# 32 bytes and the 16-bit dQ 24 with 32 x 32.
SM89_FORWARD = {
    **_without(MMA_SYNC_FORWARD, (64, 2), Tile(64, 32, 4, 2)),
    **_without(MMA_SYNC_FORWARD, (128, 2), Tile(64, 64, 8, 2)),
    (256, 4): (Tile(32, 16, 8, 1),),
}

GENERATIONS = (
    # float32 at head dim 256: A100's dQ spills 16 bytes with 16 x 16 tiles, the others' dK/dV with 16 x 32.
    _generation(80, "A100, A30", 166912, "mma.sync", MMA_SYNC_FORWARD,
                {**MMA_SYNC_BACKWARD, (256, 4): Tile(16, 32, 8, 1)},
                _without(MMA_SYNC_FORWARD, (64, 2), Tile(64, 32, 4, 2), Tile(64, 32, 4, 3))),
    _generation(86, "RTX 30, A10, A40, L4, L40, RTX 40 (sm_86, sm_89)", 101376, "mma.sync", SM89_FORWARD,
                {**MMA_SYNC_BACKWARD, (256, 2): Tile(16, 32, 8, 1)},
                _without(SM89_FORWARD, (64, 2), Tile(64, 32, 4, 3), Tile(64, 64, 4, 3)),
                {(64, 2): Tile(32, 64, 8, 2)}),
    _generation(90, "H100, H200, GH200", 232448, "wgmma", HOPPER_FORWARD, HOPPER_BACKWARD,
                {**_without(HOPPER_FORWARD, (64, 2), Tile(64, 128, 4, 3)),
                 **_without(HOPPER_FORWARD, (128, 2), Tile(128, 64, 8, 2), Tile(128, 128, 8, 2))},
                {(128, 2): Tile(64, 32, 8, 2), (128, 4): Tile(16, 32, 8, 1)}),
    _generation(100, "B200, GB200, B300", 232448, "tcgen05", BLACKWELL_FORWARD, BLACKWELL_BACKWARD,
                {**_without(BLACKWELL_FORWARD, (64, 2), Tile(64, 64, 4, 2), Tile(64, 64, 4, 3)),
                 **_without(BLACKWELL_FORWARD, (128, 2), Tile(64, 64, 8, 3), Tile(64, 128, 8, 3))},
                {(64, 4): Tile(32, 32, 8, 1)}),
    _generation(120, "RTX 50, RTX PRO 6000 Blackwell", 101376, "mma.sync", MMA_SYNC_FORWARD, MMA_SYNC_BACKWARD,
                _without(MMA_SYNC_FORWARD, (64, 2), Tile(64, 32, 4, 2)),
                {(128, 2): Tile(64, 32, 8, 1), (128, 4): Tile(16, 32, 8, 1)}),
)  # fmt: skip
# The targets the compile test checks, one per generation (sm_89 stands for sm_86 too: same tables,
# same shared memory, same instruction set).
COMPILE_TARGETS = (80, 89, 90, 100, 120)


def generation(capability: int) -> Generation:
    """The generation whose tables a GPU of ``capability`` (major * 10 + minor) runs: the nearest
    known one at or below it, A100's below sm_80."""
    if isinstance(capability, bool) or not isinstance(capability, int) or capability <= 0:
        raise ValueError(f"capability must be a positive int such as 90 (sm_90), got {capability!r}")
    index = bisect.bisect_right([g.capability for g in GENERATIONS], capability) - 1
    return GENERATIONS[max(index, 0)]


def _head_dim_class(block_d: int) -> int:
    return 64 if block_d <= 64 else block_d


def forward_shared_bytes(tile: Tile, block_d: int, element_size: int) -> int:
    """q once, K and V tiles once per pipeline stage."""
    return (tile.block_m + 2 * tile.block_n * tile.num_stages) * block_d * element_size


def forward_configs(block_d: int, element_size: int, capability: int, shared_memory: int | None = None,
                    windowed: bool = False):  # fmt: skip
    """The forward's autotuning candidates (triton.Config) for one padded head dim and dtype size on a
    GPU of ``capability``, pruned to ``shared_memory`` bytes a program (the generation's by default);
    ``windowed``: for attention with a sliding window or soft-capping."""
    g = generation(capability)
    shared_memory = g.shared_memory if shared_memory is None else shared_memory
    key = (_head_dim_class(block_d), element_size)
    tiles = g.windowed_forward[key] if windowed and key in g.windowed_forward else g.forward[key]
    fitting = [t for t in tiles if forward_shared_bytes(t, block_d, element_size) <= shared_memory]
    # Nothing fits only on a GPU with less shared memory than any generation here: one unpipelined tile.
    fitting = fitting or [Tile(32 if element_size == 4 else 64, 32, 8, 1)]
    return [
        triton.Config({"BLOCK_M": t.block_m, "BLOCK_N": t.block_n}, num_warps=t.num_warps, num_stages=t.num_stages)
        for t in fitting
    ]


def backward_shared_bytes(block_m: int, block_n: int, num_stages: int, block_d: int, element_size: int) -> int:
    """A bound on a backward kernel's shared memory (the compiled kernels use less): the streamed
    pair of tiles per pipeline stage plus room for layout conversions of the held pair."""
    return (2 * block_m * num_stages + 2 * (block_m + block_n)) * block_d * element_size


def backward_settings(block_d: int, element_size: int, capability: int, shared_memory: int | None = None,
                      windowed: bool = False) -> dict:  # fmt: skip
    """Fixed backward launch settings by padded head dim and dtype size on a GPU of ``capability``.

    The backward holds two float32 accumulators of (block, BLOCK_D) per
    program (dK and dV, or dQ next to q and dO), about twice the forward's
    register state, so it cannot reuse the forward's tuned blocks. Where the
    generation's tile would not fit ``shared_memory``: fewer stages, then
    smaller blocks. ``windowed``: for attention with a sliding window or soft-capping.
    """
    g = generation(capability)
    shared_memory = g.shared_memory if shared_memory is None else shared_memory
    key = (_head_dim_class(block_d), element_size)
    block_m, block_n, num_warps, num_stages = (g.windowed_backward if windowed and key in g.windowed_backward
                                               else g.backward)[key]  # fmt: skip
    while backward_shared_bytes(block_m, block_n, num_stages, block_d, element_size) > shared_memory:
        if num_stages > 1:
            num_stages -= 1
        elif max(block_m, block_n) > 16:
            block_m, block_n = (block_m // 2, block_n) if block_m >= block_n else (block_m, block_n // 2)
        else:
            break
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": num_warps, "num_stages": num_stages}


@functools.lru_cache(maxsize=None)
def device_capability(device_index: int) -> int:
    """The compute capability of CUDA device ``device_index`` as major * 10 + minor (90 for an H100)."""
    major, minor = torch.cuda.get_device_capability(device_index)
    return major * 10 + minor


@functools.lru_cache(maxsize=None)
def shared_memory_per_block(device_index: int) -> int:
    """The most shared memory one program may use on CUDA device ``device_index``."""
    return triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"]


def padded_head_dim(head_dim: int) -> int:
    """BLOCK_D: the head dim padded to a power of two, at least 16 (the smallest tl.dot)."""
    return max(16, triton.next_power_of_2(head_dim))
