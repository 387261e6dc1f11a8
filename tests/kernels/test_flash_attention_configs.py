"""The attention kernels' launch policy: per GPU generation, forward candidates and backward settings
that fit its shared memory (that they also fit its registers is test_gpu_compilation's part)."""

from __future__ import annotations

import pytest

from scratchlm.kernels.flash_attention_configs import (
    COMPILE_TARGETS,
    GENERATIONS,
    MAX_HEAD_DIM,
    backward_settings,
    backward_shared_bytes,
    forward_configs,
    generation,
    padded_head_dim,
)

CONSUMER = 101376  # shared memory a program may use on sm_86/89/120, bytes
BLOCK_DS = (16, 32, 64, 128, 256)


@pytest.mark.parametrize(
    "capability, first",
    [(70, 80), (75, 80), (80, 80), (86, 86), (87, 86), (89, 86), (90, 90), (100, 100), (103, 100), (110, 100),
     (120, 120), (121, 120), (130, 120)],
)  # fmt: skip
def test_each_capability_takes_the_nearest_known_generation_at_or_below_it(capability, first):
    assert generation(capability).capability == first


@pytest.mark.parametrize("capability", [0, -90, 9.0, "90", True, None])
def test_a_capability_that_is_not_a_positive_int_is_refused(capability):
    with pytest.raises(ValueError, match=rf"capability must be a positive int .*got {capability!r}"):
        generation(capability)


def test_the_compile_test_covers_every_generation():
    assert sorted(generation(c).capability for c in COMPILE_TARGETS) == [g.capability for g in GENERATIONS]


@pytest.mark.parametrize("g", GENERATIONS, ids=lambda g: f"sm_{g.capability}")
@pytest.mark.parametrize("element_size", [2, 4])
@pytest.mark.parametrize("windowed", [False, True])
def test_forward_candidates_fit_shared_memory(g, element_size, windowed):
    for block_d in BLOCK_DS:
        for shared_memory in (g.shared_memory, CONSUMER, 48 * 1024):
            configs = forward_configs(block_d, element_size, g.capability, shared_memory, windowed)
            assert configs, (block_d, shared_memory)
            for c in configs:
                tiles = (c.kwargs["BLOCK_M"] + 2 * c.kwargs["BLOCK_N"] * c.num_stages) * block_d * element_size
                assert tiles <= shared_memory or len(configs) == 1, (block_d, shared_memory, c)
        # The generation's own shared memory is the default, and the tables hold distinct tiles.
        default = forward_configs(block_d, element_size, g.capability, windowed=windowed)
        assert [str(c) for c in default] == [str(c) for c in forward_configs(block_d, element_size, g.capability,
                                                                               g.shared_memory, windowed)]  # fmt: skip
        assert len({str(c) for c in default}) == len(default)


def test_smaller_shared_memory_drops_deep_pipelines_first():
    # A100's table at head dim 128 lists 3-stage 64 x 64 tiles; an sm_86-sized budget drops them.
    a100 = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages) for c in forward_configs(128, 2, 80)}
    small = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages) for c in forward_configs(128, 2, 80, CONSUMER)}
    assert (64, 64, 3) in a100 and (64, 64, 3) not in small and (64, 64, 2) in small


def test_backward_settings_per_generation():
    assert backward_settings(64, 2, 90) == {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
    assert backward_settings(128, 2, 90) == {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2}
    # mma.sync generations keep both operands and accumulators in registers: smaller tiles.
    for capability in (80, 89, 120):
        assert backward_settings(64, 2, capability) == {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
        assert backward_settings(128, 2, capability)["num_stages"] == 1
    # tcgen05 accumulates in tensor memory: 128 query rows at head dim 64.
    assert backward_settings(64, 2, 100)["BLOCK_M"] == 128
    # float32 is the same everywhere: no tensor cores.
    assert len({str(backward_settings(128, 4, g.capability)) for g in GENERATIONS}) == 1


def test_windowed_tables_are_the_plain_ones_less_what_spills_there():
    # A window or soft-capping costs registers: on sm_90 the 128-row tiles at head dim 128 spill
    # with them (kernels/NOTES.md), so the windowed candidates drop them and keep the rest.
    def tiles(*args, **kwargs):
        return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                for c in forward_configs(*args, **kwargs)}  # fmt: skip

    plain, windowed = tiles(128, 2, 90), tiles(128, 2, 90, windowed=True)
    assert windowed == plain - {(128, 64, 8, 2), (128, 128, 8, 2)} and len(windowed) == len(plain) - 2
    assert tiles(64, 2, 90, windowed=True) == tiles(64, 2, 90) - {(64, 128, 4, 3)}  # soft-capping alone spills
    # Every generation: windowed forward tiles come from the plain table or float32's smaller ones.
    for g in GENERATIONS:
        for key, candidates in g.windowed_forward.items():
            assert set(candidates) <= set(g.forward[key]) or key[1] == 4, (g.capability, key)
    assert backward_settings(128, 2, 90, windowed=True) == {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 8,
                                                             "num_stages": 2}  # fmt: skip
    assert backward_settings(128, 2, 90) == {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2}
    # Head dim 256 with a window: 16 query rows a dQ program on every generation (32 spill).
    assert {backward_settings(256, 2, g.capability, windowed=True)["BLOCK_M"] for g in GENERATIONS} == {16}


def test_backward_settings_shrink_to_fit_shared_memory():
    for g, windowed in [(g, windowed) for g in GENERATIONS for windowed in (False, True)]:
        for block_d in BLOCK_DS:
            for element_size in (2, 4):
                for shared_memory in (g.shared_memory, CONSUMER):
                    s = backward_settings(block_d, element_size, g.capability, shared_memory, windowed)
                    need = backward_shared_bytes(s["BLOCK_M"], s["BLOCK_N"], s["num_stages"], block_d, element_size)
                    assert need <= shared_memory, (g.capability, block_d, element_size, shared_memory)


@pytest.mark.parametrize("head_dim, block_d", [(1, 16), (16, 16), (17, 32), (40, 64), (96, 128), (MAX_HEAD_DIM, 256)])
def test_head_dim_pads_to_a_power_of_two_of_at_least_16(head_dim, block_d):
    assert padded_head_dim(head_dim) == block_d
