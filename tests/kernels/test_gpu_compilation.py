"""Every Triton kernel compiles for a Hopper GPU (sm_90), even on a machine without one.

The interpreter runs kernels as Python, so it accepts code the GPU compiler
refuses (a global that is not a constexpr, a dot shape below the hardware
minimum, shared memory beyond the limit). Compiling ahead of time to PTX for
sm_90 catches those here, with the launch settings the launchers pick on an
H100. This checks compilation only; the CUDA tests check results. Each
compiled kernel's registers per thread and stack bytes (spills), as cuobjdump
reads them from the cubin, are printed (shown with ``pytest -s``) for tuning.
"""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

# Compilation must see compiled (not interpreted) kernels, and conftest has set
# TRITON_INTERPRET for this process; so each case runs in a fresh interpreter.
SCRIPT = r'''
import importlib, os, subprocess, sys, tempfile
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

H100_SHARED_MEMORY = 232448
FLOAT_ARGS = {"eps", "qk_scale_log2", "scale", "z_loss"}
FP32_POINTERS = {"rstd_ptr", "dw_partial_ptr", "lse_ptr", "delta_ptr", "cos_ptr", "sin_ptr"}
FP32_POINTERS |= {"loss_ptr", "grad_ptr", "dh_ptr", "dw_ptr"}  # linear_cross_entropy's float32 rows and buffers
INT64_POINTERS = {"targets_ptr"}
INT32_POINTERS = {"doc_ptr"}  # flash attention's document table
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def report_resources(fn, compiled, label):
    """Print the kernel's registers per thread and stack bytes as cuobjdump reads them from the cubin."""
    if not os.path.exists(CUOBJDUMP):
        return
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        out = subprocess.run([CUOBJDUMP, "--dump-resource-usage", cubin.name], capture_output=True, text=True).stdout
    usage = " ".join(line.strip() for line in out.splitlines() if "REG:" in line)
    print(f"{fn.__name__} {label}: {usage}")


def compile_for_h100(fn, constexprs, dtype, num_warps, num_stages=2):
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            kinds = (("*fp32", FP32_POINTERS), ("*i64", INT64_POINTERS), ("*i32", INT32_POINTERS))
            signature[name] = next((kind for kind, names in kinds if name in names), f"*{dtype}")
        else:
            # Lengths, sizes and counts such as flash attention's group (query heads per K/V head)
            # are runtime i32, as Triton compiles any int other than 1.
            signature[name] = "fp32" if name in FLOAT_ARGS else "i32"
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    report_resources(fn, compiled, f"{dtype} {constexprs} warps={num_warps} stages={num_stages}")
    return compiled


op, dtype = sys.argv[1], sys.argv[2]
module = importlib.import_module(f"scratchlm.kernels.{op}")
size = 4 if dtype == "fp32" else 2
if op == "rmsnorm":
    for one_block in (True, False):
        settings = {"BLOCK_SIZE": 4096, "ONE_BLOCK": one_block}
        compile_for_h100(module._rmsnorm_fwd_kernel, settings, dtype, 8)
        compile_for_h100(module._rmsnorm_bwd_kernel, settings, dtype, 8)
elif op == "swiglu":
    compile_for_h100(module._swiglu_fwd_kernel, {"BLOCK_SIZE": module.BLOCK_SIZE}, dtype, module.NUM_WARPS)
    compile_for_h100(module._swiglu_bwd_kernel, {"BLOCK_SIZE": module.BLOCK_SIZE}, dtype, module.NUM_WARPS)
elif op == "rope":
    block_rows, block_pairs = module._launch_settings(64)
    for inverse in (False, True):
        settings = {"INVERSE": inverse, "BLOCK_ROWS": block_rows, "BLOCK_PAIRS": block_pairs}
        compile_for_h100(module._rope_kernel, settings, dtype, module.NUM_WARPS)
elif op == "flash_attention":
    for block_d, documents in ((64, False), (128, False), (128, True)):
        config = module.forward_configs(block_d, size, H100_SHARED_MEMORY)[0]
        forward = {"CAUSAL": True, "DOCUMENTS": documents, "BLOCK_D": block_d, **config.kwargs}
        compile_for_h100(module._flash_attention_fwd_kernel, forward, dtype, config.num_warps, config.num_stages)
        s = module.backward_settings(block_d, size, H100_SHARED_MEMORY)
        backward = {"CAUSAL": True, "DOCUMENTS": documents, "BLOCK_D": block_d}
        backward.update(BLOCK_M=s["BLOCK_M"], BLOCK_N=s["BLOCK_N"])
        for fn in (module._flash_attention_bwd_dkdv_kernel, module._flash_attention_bwd_dq_kernel):
            compile_for_h100(fn, backward, dtype, s["num_warps"], s["num_stages"])
        preprocess = {"BLOCK_M": s["BLOCK_M"], "BLOCK_D": block_d}
        compile_for_h100(module._flash_attention_bwd_preprocess_kernel, preprocess, dtype, s["num_warps"])
elif op == "linear_cross_entropy":
    s = module.launch_settings(size)
    blocks = {"BLOCK_M": s.block_m, "BLOCK_V": s.block_v, "BLOCK_D": s.block_d}
    for fn in (module._lce_fwd_kernel, module._lce_bwd_dh_kernel, module._lce_bwd_dw_kernel):
        compile_for_h100(fn, blocks, dtype, s.num_warps, s.num_stages)
print("compiled")
'''


def _has_ahead_of_time_compiler() -> bool:
    try:
        importlib.import_module("triton.compiler").ASTSource
        importlib.import_module("triton.backends.compiler").GPUTarget
    except (ImportError, AttributeError):
        return False
    return True


@pytest.mark.skipif(
    not _has_ahead_of_time_compiler(), reason="this Triton has no ASTSource/GPUTarget ahead-of-time compile API"
)
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("op", ["rmsnorm", "swiglu", "rope", "flash_attention", "linear_cross_entropy"])
def test_kernels_compile_for_sm90(op, dtype):
    result = subprocess.run([sys.executable, "-c", SCRIPT, op, dtype], capture_output=True, text=True, timeout=600)
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 0 and lines[-1:] == ["compiled"], result.stderr[-3000:]
    print("\n".join(lines[:-1]))
