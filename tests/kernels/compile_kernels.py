"""Compile scratchlm's Triton kernels ahead of time for a GPU generation, on a machine without a GPU.

    python tests/kernels/compile_kernels.py SM [OP ...] [--all]

SM is a compute capability as an integer (80, 89, 90, 100, 120); OP one of
rmsnorm, swiglu, rope, linear_cross_entropy, flash_attention (all by
default). Each kernel is compiled with the launch settings the package picks
for that generation, on every core: with ``--all`` every setting in bf16,
fp16 and float32, else the representative subset that ``make test`` compiles
(see attention_jobs). Each is described by one JSON line on
stdout: registers per thread and stack bytes (spills) as cuobjdump reads them
from the cubin, the tensor-core instructions in its PTX and SASS, whether its
program id and head strides are used in 64-bit arithmetic, and its widest
global loads. ``test_gpu_compilation.py`` runs this and checks the lines;
``-s`` there prints them for tuning.

Run it under a Python whose environment has not set TRITON_INTERPRET (the
interpreter skips compilation): this script removes it before importing
Triton.
"""

from __future__ import annotations

import concurrent.futures
import importlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

OPS = ("rmsnorm", "swiglu", "rope", "linear_cross_entropy", "flash_attention")
FLOAT_ARGS = {"eps", "offset", "qk_scale_log2", "scale", "z_loss", "softcap", "softcap_log2"}
FP32_POINTERS = {"rstd_ptr", "dw_partial_ptr", "lse_ptr", "delta_ptr", "cos_ptr", "sin_ptr"}
FP32_POINTERS |= {"loss_ptr", "grad_ptr", "dh_ptr", "dw_ptr"}  # linear_cross_entropy's float32 rows and buffers
INT64_POINTERS = {"targets_ptr"}
INT32_POINTERS = {"doc_ptr"}  # flash attention's document table
# Row lengths that an aligned launch (feature counts that are multiples of 16) marks as such.
LENGTHS = {"n_cols", "n_elements", "n_pairs", "dim", "vocab"}
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
ATTENTION = "scratchlm.kernels.flash_attention_kernels"
# Tensor-core instructions by class: what a 16-bit tl.dot becomes on each generation.
PTX_MMA = {"mma.sync": r"\bmma\.sync\.", "wgmma": r"\bwgmma\.mma_async\.", "tcgen05": r"\btcgen05\.mma\."}
SASS_MMA = r"\b(?:HMMA|HGMMA|UTC\w*MMA)\b"


def compile_kernel(fn, constexprs: dict, dtype: str, capability: int, num_warps: int, num_stages: int,
                   aligned: bool = False):  # fmt: skip
    """Compile as a launch on aligned tensors does: Triton's JIT marks pointers that are 16-byte
    aligned (every PyTorch allocation) and ints divisible by 16 (the strides of rows of 64 or 128
    elements), which lets loads be whole vectors. Lengths get that mark only when ``aligned``
    (feature counts that are multiples of 16, as every real model's are); without it, lengths
    that are not multiples of 16 are the worst case."""
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
        if name.endswith("_ptr") or name.startswith("stride") or (aligned and name in LENGTHS):
            attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    target = GPUTarget("cuda", capability, 32)
    return triton.compile(source, target=target, options={"num_warps": num_warps, "num_stages": num_stages})


def describe(fn, compiled) -> dict:
    """What the compiled kernel shows and the interpreter cannot.

    registers, stack: per thread, from cuobjdump (stack bytes are spills).
    ptx_mma: tensor-core instructions in the PTX by class (mma.sync on sm_80 to sm_89 and
    sm_120, wgmma on sm_90, tcgen05 on sm_100); sass_mma: all of them in the SASS.
    pid64: the program id widened to 64 bits in the PTX before any arithmetic on it (a cvt or a
    widening multiply straight from %ctaid), as `.to(tl.int64)` compiles; without it, row *
    stride is a 32-bit multiply that wraps past 2^31 elements.
    head64: for the attention kernels, whose compiler narrows the program id's division back to
    32 bits, every head stride (stride_qh, stride_lse_h, ...) is used only in 64-bit arithmetic
    (sign-extended, or a widening multiply); None for other kernels.
    load_bits: the widest global load in the SASS (LDG.E.128 is a whole 16-byte vector); 32 when
    none is wider.
    """
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", cubin.name], capture_output=True, text=True)
        sass = subprocess.run([CUOBJDUMP, "-sass", cubin.name], capture_output=True, text=True).stdout
    resources = " ".join(line for line in usage.stdout.splitlines() if "REG:" in line)
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
    # LDG: a load to registers; LDGSTS: an asynchronous copy to shared memory (cp.async).
    load_bits = [int(bits) for bits in re.findall(r"\bLDG(?:STS)?\.E(?:\.\w+)*?\.(64|128|256)\b", sass)]
    return {
        "registers": int(resources.split("REG:")[1].split()[0]),
        "stack": int(resources.split("STACK:")[1].split()[0]),
        "ptx_mma": {kind: len(re.findall(pattern, ptx)) for kind, pattern in PTX_MMA.items()},
        "sass_mma": len(re.findall(SASS_MMA, sass)),
        "pid64": bool(pid_registers) and widened == pid_registers,
        "head64": head64,
        "load_bits": max(load_bits, default=32),
    }


def run_job(job: dict) -> dict:
    """Compile one job (module, kernel, constexprs, dtype, capability, warps, stages, aligned) and
    describe it."""
    start = time.perf_counter()
    fn = getattr(importlib.import_module(job["module"]), job["kernel"])
    settings = (job["constexprs"], job["dtype"], job["capability"], job["warps"], job["stages"], job["aligned"])
    compiled = compile_kernel(fn, *settings)
    return {**job, **describe(fn, compiled), "seconds": round(time.perf_counter() - start, 1)}


# Attention's variants by what they add to a row's state: documents (per-key bounds), a sliding
# window with soft-capping (a lower bound per row, a tanh per score; Gemma 2's local layers),
# soft-capping alone (its global layers), all of it, or none.
VARIANTS = {
    "plain": {"DOCUMENTS": False, "WINDOW": False, "SOFTCAP": False},
    "documents": {"DOCUMENTS": True, "WINDOW": False, "SOFTCAP": False},
    "window+softcap": {"DOCUMENTS": False, "WINDOW": True, "SOFTCAP": True},
    "softcap": {"DOCUMENTS": False, "WINDOW": False, "SOFTCAP": True},
    "documents+window+softcap": {"DOCUMENTS": True, "WINDOW": True, "SOFTCAP": True},
}
# With --all also the window alone (Mistral).
MORE_VARIANTS = {"window": {"DOCUMENTS": False, "WINDOW": True, "SOFTCAP": False}}
# Without --all, the variants whose every forward candidate is compiled (the others: the largest).
EVERY_CANDIDATE = ("documents", "window+softcap")


def attention_jobs(capability: int, dtype: str, everything: bool) -> list[dict]:
    """Each backward setting and every forward config the autotuner may try, at head dims 64, 128
    and 256, in each variant (VARIANTS), as the launch policy picks them for ``capability`` (a
    window or soft-capping takes its windowed tables).

    Unless ``everything``, a representative subset (make test's time): every forward candidate
    with documents and with a window and soft-capping (the most registers, each its own way), the
    largest tile otherwise; fp16 (compiled as bf16 is, but for its conversions) only the largest
    tile and the backward."""
    policy = importlib.import_module("scratchlm.kernels.flash_attention_configs")
    size = 4 if dtype == "fp32" else 2
    variants = {**VARIANTS, **MORE_VARIANTS} if everything else VARIANTS
    jobs = []
    for block_d in (64, 128, 256):
        for variant, flags in variants.items():
            windowed = flags["WINDOW"] or flags["SOFTCAP"]
            configs = policy.forward_configs(block_d, size, capability, windowed=windowed)
            largest = max(configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.num_stages))
            constants = {"CAUSAL": True, **flags, "BOUNDED": flags["DOCUMENTS"] or flags["WINDOW"],
                         "BLOCK_D": block_d, "EVEN_D": True}  # fmt: skip
            every = everything or (variant in EVERY_CANDIDATE and dtype != "fp16")
            for c in configs if every else [largest]:
                jobs.append(_job(ATTENTION, "flash_attention_fwd_kernel", {**constants, **c.kwargs}, dtype,
                                 capability, c.num_warps, c.num_stages))  # fmt: skip
            s = policy.backward_settings(block_d, size, capability, windowed=windowed)
            backward = {**constants, "BLOCK_M": s["BLOCK_M"], "BLOCK_N": s["BLOCK_N"]}
            for kernel in ("flash_attention_bwd_dkdv_kernel", "flash_attention_bwd_dq_kernel"):
                jobs.append(_job(ATTENTION, kernel, backward, dtype, capability, s["num_warps"], s["num_stages"]))
        s = policy.backward_settings(block_d, size, capability)
        preprocess = {"BLOCK_M": s["BLOCK_M"], "BLOCK_D": block_d}
        jobs.append(_job(ATTENTION, "flash_attention_bwd_preprocess_kernel", preprocess, dtype, capability,
                         s["num_warps"], 2))  # fmt: skip
    return jobs


def jobs_for(op: str, capability: int, dtype: str, everything: bool = True) -> list[dict]:
    """The kernels of ``op`` with the launch settings its launcher picks; the row-wise kernels
    twice, with lengths of any size and with lengths marked as multiples of 16. Unless
    ``everything``, a representative subset (see attention_jobs; the row-wise kernels in fp16
    compile as in bf16 and are left out)."""
    if op == "flash_attention":
        return attention_jobs(capability, dtype, everything)
    if dtype == "fp16" and not everything:
        return []
    return [{**job, "aligned": aligned} for job in _row_jobs(op, capability, dtype) for aligned in (False, True)]


def _row_jobs(op: str, capability: int, dtype: str) -> list[dict]:
    name = f"scratchlm.kernels.{op}"
    module = importlib.import_module(name)
    size = 4 if dtype == "fp32" else 2
    jobs = []
    if op == "rmsnorm":
        # Rows of 4096 features fit one block; 8192 (Llama 70B) walk the row in blocks.
        for n_cols in (4096, 8192):
            s = module.launch_settings(1024, n_cols, size, module.torch.device("cpu"))
            settings = {"BLOCK_SIZE": s.block_size, "ONE_BLOCK": s.one_block}
            for kernel in ("_rmsnorm_fwd_kernel", "_rmsnorm_bwd_kernel"):
                jobs.append(_job(name, kernel, settings, dtype, capability, s.num_warps, 2))
    elif op == "swiglu":
        for kernel in ("_swiglu_fwd_kernel", "_swiglu_bwd_kernel"):
            for gelu_tanh in (False, True):  # SwiGLU, GeGLU
                settings = {"BLOCK_SIZE": module.BLOCK_SIZE, "GELU_TANH": gelu_tanh}
                jobs.append(_job(name, kernel, settings, dtype, capability, module.NUM_WARPS, 2))
    elif op == "rope":
        block_rows, block_pairs = module._launch_settings(64)
        for halves in (False, True):  # adjacent pairs, Hugging Face's half rotation
            for inverse in (False, True):
                settings = {"INVERSE": inverse, "HALVES": halves, "BLOCK_ROWS": block_rows,
                            "BLOCK_PAIRS": block_pairs}  # fmt: skip
                jobs.append(_job(name, "_rope_kernel", settings, dtype, capability, module.NUM_WARPS, 2))
    elif op == "linear_cross_entropy":
        s = module.launch_settings(size)
        blocks = {"BLOCK_M": s.block_m, "BLOCK_V": s.block_v, "BLOCK_D": s.block_d}
        for kernel in ("_lce_fwd_kernel", "_lce_bwd_dh_kernel", "_lce_bwd_dw_kernel"):
            for softcap in (False, True):  # plain, and Gemma 2's final soft-capping
                settings = {**blocks, "SOFTCAP": softcap}
                jobs.append(_job(name, kernel, settings, dtype, capability, s.num_warps, s.num_stages))
    else:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    return jobs


def _job(module: str, kernel: str, constexprs: dict, dtype: str, capability: int, warps: int, stages: int) -> dict:
    op = module.rsplit(".", 1)[1].removesuffix("_kernels")
    return {"op": op, "module": module, "kernel": kernel, "constexprs": constexprs, "dtype": dtype,
            "capability": capability, "warps": warps, "stages": stages, "aligned": False}  # fmt: skip


def compile_all(jobs: list[dict]) -> None:
    """Compile the jobs on every core (each compile is single-threaded), printing in job order."""
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(max_workers=os.cpu_count() or 1, mp_context=context) as pool:
        for result in pool.map(run_job, jobs):
            print(json.dumps(result), flush=True)


def main(argv: list[str]) -> None:
    everything = "--all" in argv
    argv = [arg for arg in argv if arg != "--all"]
    if not argv or not argv[0].isdigit() or not set(argv[1:]) <= set(OPS):
        sys.exit(__doc__)
    capability, ops = int(argv[0]), argv[1:] or list(OPS)
    jobs = [job for op in ops for dtype in ("bf16", "fp16", "fp32") for job in jobs_for(op, capability, dtype, everything)]
    compile_all(jobs)


if __name__ == "__main__":
    main(sys.argv[1:])
