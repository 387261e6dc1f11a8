"""Every Triton kernel compiles for a Hopper GPU (sm_90), even on a machine without one.

The interpreter runs kernels as Python, so it accepts code the GPU compiler
refuses (a global that is not a constexpr, a dot shape below the hardware
minimum, shared memory beyond the limit). Compiling ahead of time to PTX for
sm_90 catches those here, with the launch settings the launchers pick on an
H100. This checks compilation only; the CUDA tests check results. Each
compiled kernel's registers per thread and stack bytes (spills), as cuobjdump
reads them from the cubin, are printed (shown with ``pytest -s``) for tuning,
and the 16-bit attention kernels, every forward config the autotuner may pick
and each backward setting, fail the test when they spill. The compiled code
is also read for what the interpreter ignores: float32 dots must stay IEEE
(no tensor-core instruction in the SASS), and offsets of rows and heads must
be computed in 64 bits (in the PTX).
"""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

# Compilation must see compiled (not interpreted) kernels, and conftest has set
# TRITON_INTERPRET for this process; so each case runs in a fresh interpreter.
SCRIPT = r'''
import concurrent.futures, contextlib, importlib, io, multiprocessing, os, re, subprocess, sys, tempfile
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
    """Print the kernel's registers per thread and stack bytes as cuobjdump reads them from the
    cubin, and return them as (REG, STACK); (None, 0) without cuobjdump."""
    if not os.path.exists(CUOBJDUMP):
        return None, 0
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        out = subprocess.run([CUOBJDUMP, "--dump-resource-usage", cubin.name], capture_output=True, text=True).stdout
        sass = subprocess.run([CUOBJDUMP, "-sass", cubin.name], capture_output=True, text=True).stdout
    usage = " ".join(line.strip() for line in out.splitlines() if "REG:" in line)
    print(f"{fn.__name__} {label}: {usage}")
    report_code(fn, compiled, sass)
    return int(usage.split("REG:")[1].split()[0]), int(usage.split("STACK:")[1].split()[0])


def report_code(fn, compiled, sass):
    """Print "CODE <kernel> mma=<n> pid64=<bool> head64=<bool or None>", what the interpreter
    cannot show.
    mma: tensor-core matrix instructions (HGMMA on sm_90, HMMA before) in the SASS; a float32
    tl.dot with input_precision="ieee" has none, TF32 compiles to HGMMA.
    pid64: the program id widened to 64 bits in the PTX before any arithmetic on it (a cvt or a
    widening multiply straight from the %ctaid register), as `.to(tl.int64)` compiles; without
    it, row * stride is a 32-bit multiply that wraps past 2^31 elements.
    head64: for the attention kernels, whose compiler narrows the program id's division back to
    32 bits, every head stride (stride_qh, stride_lse_h, ...) is used only in 64-bit arithmetic
    (sign-extended, or a widening multiply), never in a 32-bit multiply; None for other kernels."""
    mma = len(re.findall(r"\b(?:HGMMA|HMMA)\b", sass))
    ptx = compiled.asm["ptx"]
    pid_registers = re.findall(r"mov\.u32\s+(%r\d+),\s*%ctaid\.x;", ptx)
    widened = [r for r in pid_registers if re.search(rf"(?:cvt\.[su]64\.[su]32|mul\.wide\.[su]32)\s+%rd\d+,\s*{r}[,;]", ptx)]
    head64 = None
    for index, name in enumerate(fn.arg_names):
        if not re.fullmatch(r"stride_(?:q|k|v|o|do|dq|dk|dv|lse_|delta_)h", name):
            continue
        for register in re.findall(rf"ld\.param\.[bus]32\s+(%r\d+),\s*\[\w+_param_{index}\];", ptx):
            uses = re.findall(rf"^[ \t]*([\w.]+)[ \t]+[^;\n]*{register}[,;]", ptx, flags=re.MULTILINE)
            wide = all(op.startswith(("cvt.s64", "mul.wide")) for op in uses if not op.startswith("ld.param"))
            head64 = wide if head64 is None else head64 and wide
    print(f"CODE {fn.__name__} mma={mma} pid64={bool(pid_registers) and widened == pid_registers} head64={head64}")


def compile_for_h100(fn, constexprs, dtype, num_warps, num_stages=2, must_fit=False):
    """Compile as a launch on aligned tensors does: Triton's JIT marks pointers that are 16-byte
    aligned (every PyTorch allocation) and ints divisible by 16 (the strides of rows of 64 or 128
    elements), which lets loads be whole vectors. Lengths get no such mark: sequence lengths
    that are not multiples of 16 are the worst case. ``must_fit``: print SPILLS when the kernel
    keeps values on the stack (local memory)."""
    signature, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            kinds = (("*fp32", FP32_POINTERS), ("*i64", INT64_POINTERS), ("*i32", INT32_POINTERS))
            signature[name] = next((kind for kind, names in kinds if name in names), f"*{dtype}")
        else:
            # Lengths, sizes and counts such as flash attention's group (query heads per K/V head)
            # are runtime i32, as Triton compiles any int other than 1.
            signature[name] = "fp32" if name in FLOAT_ARGS else "i32"
        if name.endswith("_ptr") or name.startswith("stride"):
            attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    label = f"{dtype} {constexprs} warps={num_warps} stages={num_stages}"
    registers, stack = report_resources(fn, compiled, label)
    if must_fit and stack:
        print(f"SPILLS {fn.__name__} {label}: REG {registers} STACK {stack}")
    return compiled


def compile_job(job):
    """compile_for_h100 of (module, kernel name, constexprs, dtype, warps, stages, must_fit) in a
    worker process; returns what it printed."""
    module_name, kernel, constexprs, dtype, num_warps, num_stages, must_fit = job
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        fn = getattr(importlib.import_module(module_name), kernel)
        compile_for_h100(fn, constexprs, dtype, num_warps, num_stages, must_fit)
    return printed.getvalue()


def compile_all(jobs):
    """Compile the jobs on every core (each compile is single-threaded), printing in job order."""
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(max_workers=os.cpu_count() or 1, mp_context=context) as pool:
        for printed in pool.map(compile_job, jobs):
            sys.stdout.write(printed)


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
    # 16-bit: every forward config the autotuner may pick (fp16 compiles as bf16 does, so there
    # only the 128-row tiles) and the backward settings, at head dims 64 and 128, plain and with
    # documents, must not spill. float32 (IEEE float32 dots, no tensor cores; correctness more
    # than speed) compiles its first config and the backward without documents, spills printed,
    # not checked.
    name, must_fit, jobs = "scratchlm.kernels.flash_attention_kernels", dtype != "fp32", []
    for block_d in (64, 128):
        for documents in (False, True) if must_fit else (False,):
            constants = {"CAUSAL": True, "DOCUMENTS": documents, "BLOCK_D": block_d, "EVEN_D": True}
            configs = module.forward_configs(block_d, size, H100_SHARED_MEMORY)
            if dtype == "fp32":
                configs = configs[:1]
            elif dtype == "fp16":
                configs = [c for c in configs if c.kwargs["BLOCK_M"] == 128]
            for c in configs:
                jobs.append((name, "flash_attention_fwd_kernel", {**constants, **c.kwargs}, dtype, c.num_warps,
                             c.num_stages, must_fit))  # fmt: skip
            s = module.backward_settings(block_d, size, H100_SHARED_MEMORY)
            backward = {**constants, "BLOCK_M": s["BLOCK_M"], "BLOCK_N": s["BLOCK_N"]}
            for kernel in ("flash_attention_bwd_dkdv_kernel", "flash_attention_bwd_dq_kernel"):
                jobs.append((name, kernel, backward, dtype, s["num_warps"], s["num_stages"], must_fit))
        preprocess = {"BLOCK_M": s["BLOCK_M"], "BLOCK_D": block_d}
        jobs.append((name, "flash_attention_bwd_preprocess_kernel", preprocess, dtype, s["num_warps"], 2, False))
    compile_all(jobs)
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
@pytest.mark.parametrize(
    "op, dtype",
    [(op, dtype) for op in ("rmsnorm", "swiglu", "rope", "flash_attention", "linear_cross_entropy")
     for dtype in ("bf16", "fp32")] + [("flash_attention", "fp16")],
)  # fmt: skip
def test_kernels_compile_for_sm90(op, dtype):
    result = subprocess.run([sys.executable, "-c", SCRIPT, op, dtype], capture_output=True, text=True, timeout=900)
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 0 and lines[-1:] == ["compiled"], result.stderr[-3000:]
    print("\n".join(lines[:-1]))
    _check_compiled_code(op, dtype, [line.split() for line in lines if line.startswith("CODE ")])
    spills = [line for line in lines if line.startswith("SPILLS")]
    # The register budget is held for the Triton the project is developed with (3.9 on); an older
    # one allocates differently (3.6 spills 8 bytes in the 128 x 128 document tile at head dim 128),
    # so there the kernels must compile and their spills are only printed.
    if _triton_version() >= (3, 9):
        assert not spills, "kernels that keep values in local memory (bytes a thread):\n" + "\n".join(spills)


# The kernels that multiply tiles with tl.dot.
DOT_KERNELS = {
    "flash_attention_fwd_kernel", "flash_attention_bwd_dkdv_kernel", "flash_attention_bwd_dq_kernel",
    "_lce_fwd_kernel", "_lce_bwd_dh_kernel", "_lce_bwd_dw_kernel",
}  # fmt: skip


def _check_compiled_code(op: str, dtype: str, codes: list[list[str]]) -> None:
    """What only the compiled code shows (the interpreter ignores both): float32 dots stay IEEE
    (no tensor-core instruction; TF32 would be HGMMA, ~1e-3 off), 16-bit dots use the tensor
    cores, and row or head offsets are 64-bit (see report_code in SCRIPT)."""
    assert codes, f"{op} {dtype}: no CODE lines; Triton's cuobjdump ({op} needs it) is missing"
    for _, kernel, mma, pid64, head64 in codes:
        mma_count = int(mma.removeprefix("mma="))
        if dtype == "fp32":
            assert mma_count == 0, f"{kernel} float32: {mma_count} tensor-core instructions; its dots must be IEEE"
        elif kernel in DOT_KERNELS:
            assert mma_count > 0, f"{kernel} {dtype}: no tensor-core instruction for its dots"
        if kernel.startswith("flash_attention"):
            assert head64 == "head64=True", f"{kernel} {dtype}: a head offset is computed in 32 bits"
        else:
            assert pid64 == "pid64=True", f"{kernel} {dtype}: the program id is not made 64-bit before use"


def _triton_version() -> tuple[int, int]:
    major, minor = importlib.import_module("triton").__version__.split(".")[:2]
    return int(major), int(minor)
