"""The attention kernels' launch policy: forward configs and backward settings that fit in shared memory."""

from __future__ import annotations

import pytest

from scratchlm.kernels.flash_attention_configs import (
    MAX_HEAD_DIM,
    backward_settings,
    backward_shared_bytes,
    forward_configs,
    padded_head_dim,
)

H100, A100, CONSUMER = 232448, 166912, 101376  # shared memory per block, bytes


@pytest.mark.parametrize("block_d", [16, 64, 128, 256])
@pytest.mark.parametrize("element_size", [2, 4])
@pytest.mark.parametrize("shared_memory", [CONSUMER, H100])
def test_forward_configs_fit_the_head_dim(block_d, element_size, shared_memory):
    configs = forward_configs(block_d, element_size, shared_memory)
    assert configs
    for c in configs:
        block_m, block_n = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        tiles = (block_m + 2 * block_n * c.num_stages) * block_d * element_size
        assert tiles <= shared_memory or c.num_stages == 1
        # A 128 x 128 float32 accumulator needs 8 warps (64 values per thread).
        assert block_m * block_d <= 64 * 32 * c.num_warps
    if block_d == 16:  # small tiles: everything fits but 8 warps on 64 rows and 4 stages past 32 keys
        assert len(configs) == 14


def test_backward_settings_rule():
    assert backward_settings(64, 2, H100) == {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
    assert backward_settings(128, 2, H100) == {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2}
    assert backward_settings(128, 4, H100)["BLOCK_M"] == 32
    assert backward_settings(256, 2, H100) == {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 8, "num_stages": 1}
    # Smaller GPUs: fewer stages first, then smaller blocks.
    assert backward_settings(128, 2, CONSUMER) == {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 8, "num_stages": 1}
    assert backward_settings(256, 4, A100) == {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 8, "num_stages": 1}
    for block_d in (16, 32, 64, 128, 256):
        for element_size in (2, 4):
            for shared_memory in (H100, A100, CONSUMER):
                s = backward_settings(block_d, element_size, shared_memory)
                need = backward_shared_bytes(s["BLOCK_M"], s["BLOCK_N"], s["num_stages"], block_d, element_size)
                assert need <= shared_memory, (block_d, element_size, shared_memory)


@pytest.mark.parametrize("head_dim, block_d", [(1, 16), (16, 16), (17, 32), (40, 64), (96, 128), (MAX_HEAD_DIM, 256)])
def test_head_dim_pads_to_a_power_of_two_of_at_least_16(head_dim, block_d):
    assert padded_head_dim(head_dim) == block_d
