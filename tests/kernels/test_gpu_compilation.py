"""Every Triton kernel compiles for each GPU generation people train on, even on a machine without a GPU.

The interpreter runs kernels as Python, so it accepts code the GPU compiler
refuses (a global that is not a constexpr, a dot shape below the hardware
minimum, shared memory beyond the limit) and cannot show what the compiled
code does with registers. ``compile_kernels.py`` compiles every kernel ahead
of time for sm_80 (A100), sm_89 (L4, RTX 4090; sm_86 runs the same tables),
sm_90 (H100/H200), sm_100 (B200) and sm_120 (RTX 50), with the launch
settings the package picks there: every forward config the attention
autotuner may try and each backward setting, at head dims 64, 128 and 256,
plain, with documents, with a sliding window and soft-capping, with
soft-capping alone, and with all three (see compile_kernels.VARIANTS), in
bf16, fp16 and float32. This checks compilation only;
the CUDA tests check results. It fails when:

* a kernel keeps values in local memory (spills), on any generation;
* a 16-bit tl.dot does not take the generation's tensor-core instruction
  (mma.sync on sm_80/89/120, wgmma on sm_90, tcgen05 on sm_100; mma.sync
  too where a tile has fewer than 64 rows, below wgmma's and tcgen05's
  smallest), or a float32 one takes any (float32 dots must stay IEEE, not TF32);
* an offset of rows or heads is computed in 32 bits (wraps past 2^31);
* RMSNorm, SwiGLU, RoPE or the fused loss does not load whole 16-byte
  vectors when its lengths are multiples of 16.

``pytest -s`` prints registers per thread and spills of every compiled kernel.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import subprocess
import sys

import pytest

from scratchlm.kernels.flash_attention_configs import COMPILE_TARGETS, generation

SCRIPT = os.path.join(os.path.dirname(__file__), "compile_kernels.py")
OPS = ("rmsnorm", "swiglu", "rope", "linear_cross_entropy", "flash_attention")
# The kernels that multiply tiles with tl.dot.
DOT_KERNELS = {
    "flash_attention_fwd_kernel", "flash_attention_bwd_dkdv_kernel", "flash_attention_bwd_dq_kernel",
    "_lce_fwd_kernel", "_lce_bwd_dh_kernel", "_lce_bwd_dw_kernel",
}  # fmt: skip
# The kernels whose loads must be whole 16-byte vectors at aligned lengths.
VECTOR_LOADS = {"rmsnorm", "swiglu", "rope", "linear_cross_entropy"}


def _has_ahead_of_time_compiler() -> bool:
    try:
        importlib.import_module("triton.compiler").ASTSource
        importlib.import_module("triton.backends.compiler").GPUTarget
    except (ImportError, AttributeError):
        return False
    return True


def _triton_version() -> tuple[int, int]:
    major, minor = importlib.import_module("triton").__version__.split(".")[:2]
    return int(major), int(minor)


@functools.lru_cache(maxsize=None)
def compiled(capability: int) -> tuple[dict, ...]:
    """Every kernel compiled for ``capability``, once per test session (in a fresh interpreter:
    conftest has set TRITON_INTERPRET for this one)."""
    result = subprocess.run([sys.executable, SCRIPT, str(capability)], capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    return tuple(json.loads(line) for line in result.stdout.splitlines())


def _label(r: dict) -> str:
    aligned = " aligned" if r["aligned"] else ""
    return f"sm_{r['capability']} {r['kernel']} {r['dtype']} {r['constexprs']} warps={r['warps']} stages={r['stages']}{aligned}"


@pytest.mark.skipif(
    not _has_ahead_of_time_compiler(), reason="this Triton has no ASTSource/GPUTarget ahead-of-time compile API"
)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("capability", COMPILE_TARGETS)
def test_kernels_compile_for_every_generation(capability, op):
    results = [r for r in compiled(capability) if r["op"] == op]
    assert results, f"sm_{capability}: nothing of {op} compiled"
    for r in results:
        print(f"{_label(r)}: REG {r['registers']} STACK {r['stack']} mma {r['ptx_mma']} load {r['load_bits']} bits")
    problems = [f"{_label(r)}: {problem}" for r in results for problem in _problems(r)]
    # The register budget is held for the Triton the project is developed with (3.9 on); an older
    # one allocates differently, so there the kernels must compile and their spills are printed.
    if _triton_version() < (3, 9):
        problems = [p for p in problems if "bytes a thread in local memory" not in p]
    assert not problems, "\n".join(problems)


def _problems(r: dict) -> list[str]:
    """What is wrong with one compiled kernel (see the module docstring)."""
    problems = []
    if r["stack"]:
        problems.append(f"{r['stack']} bytes a thread in local memory (spilled at {r['registers']} registers)")
    expected = generation(r["capability"]).tensor_cores
    found = {kind: count for kind, count in r["ptx_mma"].items() if count}
    if r["dtype"] == "fp32":
        if found or r["sass_mma"]:
            problems.append(f"tensor-core instructions {found} for float32 dots, which must stay IEEE")
    elif r["kernel"] in DOT_KERNELS:
        # wgmma and tcgen05 start at 64 rows: a dot of a smaller tile is mma.sync on every generation.
        small = min(r["constexprs"].get("BLOCK_M", 64), r["constexprs"].get("BLOCK_N", 64)) < 64
        allowed = {expected, "mma.sync"} if small else {expected}
        if not found or not set(found) <= allowed:
            problems.append(f"16-bit dots compiled to {found or 'no tensor-core instruction'}, expected {expected}")
    if r["kernel"].startswith("flash_attention"):
        if r["head64"] is not True:
            problems.append("a head offset is computed in 32 bits")
    elif not r["pid64"]:
        problems.append("the program id is not made 64-bit before use")
    if r["aligned"] and r["op"] in VECTOR_LOADS and r["load_bits"] < 128:
        problems.append(f"widest global load {r['load_bits']} bits at aligned lengths; expected 128")
    return problems
