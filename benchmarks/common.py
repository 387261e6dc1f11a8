"""What every kernel benchmark shares: shapes, providers' skips, timing, bytes -> GB/s, FLOPs -> TFLOP/s.

Each ``bench_<op>.py`` builds, per provider, one callable that runs the op
(forward, or forward + backward) and hands it to ``measure``, together with
the number of bytes the op must move (memory-bound kernels) or the number of
floating-point operations it must do (attention), counted by a formula written
next to the op. ``measure`` records everything the report needs in
pytest-benchmark's ``extra_info``, so the JSON file alone is enough to rebuild
the tables.

Timing. pytest-benchmark times the callable with a wall clock, so the device
is synchronised inside that callable; those numbers (mean, spread, rounds) are
in the JSON's ``stats``. The number the report uses is a device-side timer:
on CUDA ``triton.testing.do_bench`` (CUDA events, the L2 cache flushed before
each repetition, median of about 100 ms of repetitions), which leaves the
synchronisation round trip out; on the CPU, the least of ten wall-clock rounds (a CPU
shared with other work only ever adds delay, so the minimum is the stable one).

Environment variables: ``SCRATCHLM_BENCH_SHAPES`` = auto (full on CUDA,
smoke on the CPU) | full | smoke, ``SCRATCHLM_BENCH_DTYPE`` = bfloat16
(default) | float16 | float32, and ``SCRATCHLM_BENCH_REPS`` = full (default)
| quick: quick times about 20 ms of repetitions on CUDA instead of 100 ms
(3 rounds instead of 10 on the CPU) and keeps pytest-benchmark's wall-clock
rounds to 3, for a GPU session with little time (benchmarks/gpu_check.sh).

Packed documents: ``document_layout`` draws the document ids of packed rows
(random lengths filling each row exactly, reproducible from a seed), for the
document-masked attention benchmarks.
"""

from __future__ import annotations

import functools
import importlib
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch

ON_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")

PROVIDERS = ("reference", "torch", "compile", "triton", "liger")
MODES = ("fwd", "fwd_bwd")

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def dtype_under_test() -> torch.dtype:
    name = os.environ.get("SCRATCHLM_BENCH_DTYPE", "bfloat16")
    if name not in _DTYPES:
        raise ValueError(f"SCRATCHLM_BENCH_DTYPE={name!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def quick_repetitions() -> bool:
    """True when ``SCRATCHLM_BENCH_REPS=quick``: fewer repetitions per measurement, the same cases."""
    choice = os.environ.get("SCRATCHLM_BENCH_REPS", "full")
    if choice not in ("full", "quick"):
        raise ValueError(f"SCRATCHLM_BENCH_REPS={choice!r}; expected 'full' or 'quick'")
    return choice == "quick"


def pick_shapes(full: Sequence[tuple[int, ...]], smoke: Sequence[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """The realistic shapes on CUDA, small ones on the CPU (so ``make bench`` runs anywhere)."""
    choice = os.environ.get("SCRATCHLM_BENCH_SHAPES", "auto")
    if choice not in ("auto", "full", "smoke"):
        raise ValueError(f"SCRATCHLM_BENCH_SHAPES={choice!r}; expected 'auto', 'full' or 'smoke'")
    if choice == "full" or (choice == "auto" and ON_CUDA):
        return list(full)
    return list(smoke)


def shape_id(shape: tuple[int, ...]) -> str:
    return "x".join(str(size) for size in shape)


def require_provider(provider: str) -> None:
    """Skip, with the reason, a provider whose numbers would mean nothing here."""
    if provider == "triton" and not ON_CUDA:
        pytest.skip(
            "triton: no CUDA device; the Triton interpreter runs kernels in NumPy on the CPU, "
            "so its time says nothing about the kernel"
        )
    if provider == "compile" and not ON_CUDA:
        pytest.skip("compile: no CUDA device; torch.compile would time Inductor's CPU code, not the GPU path compared")
    if provider == "liger":
        if not ON_CUDA:
            pytest.skip("liger: no CUDA device; Liger-Kernel's Triton kernels need one")
        try:
            import liger_kernel  # noqa: F401
        except ImportError:
            pytest.skip("liger: liger-kernel is not installed (pip install liger-kernel to compare with it)")


def document_layout(batch: int, n: int, mean_length: int, seed: int = 0) -> torch.Tensor:
    """Document ids (batch, n), int32 on the CPU, non-decreasing along each row: packed documents.

    Each row is filled by documents of random length until exactly ``n``
    tokens, the last one cut at the row's end as packing does. Lengths are
    geometric with mean ``mean_length`` (P(L = k) = p (1 - p)^(k - 1), p =
    1 / mean_length): the discrete exponential, many short documents and a
    long tail, like a web corpus. The realised mean is a little under
    ``mean_length`` (the cut), and far from it when a row holds only a few
    documents, so report it from the ids (``document_lengths``). Drawn with
    Python's ``random.Random(seed)``, row after row: the same ids on every
    machine and torch version for the same arguments.
    """
    if mean_length < 1 or n < 1 or batch < 1:
        raise ValueError(f"document_layout: batch {batch}, n {n}, mean_length {mean_length}; expected each >= 1")
    rng = random.Random(seed)
    # ceil(log U / log(1 - p)) for U uniform in (0, 1] is geometric with parameter p.
    log_keep = math.log1p(-1 / mean_length) if mean_length > 1 else None
    rows = []
    for _ in range(batch):
        lengths: list[int] = []
        filled = 0
        while filled < n:
            draw = 1 if log_keep is None else math.ceil(math.log(1.0 - rng.random()) / log_keep)
            length = min(max(draw, 1), n - filled)
            lengths.append(length)
            filled += length
        rows.append(torch.repeat_interleave(torch.arange(len(lengths), dtype=torch.int32), torch.tensor(lengths)))
    return torch.stack(rows)


def document_lengths(document_ids: torch.Tensor) -> list[list[int]]:
    """Per row, the lengths of its documents (runs of equal consecutive ids), in order."""
    rows = document_ids.reshape(-1, document_ids.shape[-1]).cpu()
    return [torch.unique_consecutive(row, return_counts=True)[1].tolist() for row in rows]


def import_kernel(module: str, name: str) -> Callable[..., Any]:
    """This project's kernel ``scratchlm.kernels.<module>.<name>``, or a skip while it has not landed."""
    try:
        return getattr(importlib.import_module(f"scratchlm.kernels.{module}"), name)
    except (ImportError, AttributeError) as error:
        pytest.skip(f"triton: scratchlm.kernels.{module}.{name} is not available ({error})")


def compiled(reference: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.compile`` of the reference, specialised to this benchmark's shapes.

    Dynamo keeps its compiled graphs on the function's code object, at most 8
    of them (its recompile limit), then silently runs eagerly; 6 shapes x 2
    modes would pass that. Resetting first gives every benchmark a fresh cache.
    """
    torch._dynamo.reset()
    return torch.compile(reference, dynamic=False)


def synchronize() -> None:
    if ON_CUDA:
        torch.cuda.synchronize()


def forward_step(op: Callable[..., Any], args: Sequence[Any]) -> Callable[[], None]:
    def step() -> None:
        op(*args)

    return step


def forward_backward_step(
    op: Callable[..., Any], args: Sequence[Any], wrt: Sequence[torch.Tensor], grad_outputs: Sequence[torch.Tensor]
) -> Callable[[], None]:
    """Forward, then the gradients of ``wrt`` given ``grad_outputs``.

    ``torch.autograd.grad`` returns fresh gradients instead of adding into
    ``.grad``, so no repetition pays for an extra read-modify-write.
    """

    def step() -> None:
        outputs = op(*args)
        if isinstance(outputs, torch.Tensor):
            outputs = (outputs,)
        torch.autograd.grad(outputs, wrt, grad_outputs)

    return step


@functools.cache
def copy_bandwidth_gbps() -> float:
    """This device's measured copy bandwidth: y.copy_(x), counting bytes read + written.

    It is the practical ceiling for a memory-bound kernel (H100 SXM: about
    3.0 TB/s of its 3.35 TB/s nominal), so "% of copy" says how close a kernel is.
    """
    nbytes = (1 << 30) if ON_CUDA else (1 << 25)  # 1 GiB, far beyond any L2; 32 MiB on the CPU
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=DEVICE).uniform_()
    y = torch.empty_like(x)
    seconds = device_time_ms(lambda: y.copy_(x)) / 1e3
    return 2 * nbytes / seconds / 1e9


def device_time_ms(step: Callable[[], Any], cpu_rounds: int = 10) -> float:
    """Time of one call of ``step`` in milliseconds (see the module docstring)."""
    if ON_CUDA:
        import triton.testing

        warmup, rep = (5, 20) if quick_repetitions() else (25, 100)
        return float(triton.testing.do_bench(step, warmup=warmup, rep=rep, return_mode="median"))
    times = []
    for _ in range(3 if quick_repetitions() else cpu_rounds):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def timer_description() -> str:
    """How ``device_time_ms`` timed, for the report."""
    quick = " (SCRATCHLM_BENCH_REPS=quick: about 20 ms of repetitions)" if quick_repetitions() else ""
    if ON_CUDA:
        return "triton.testing.do_bench median (CUDA events)" + quick
    return f"wall clock, least of {3 if quick_repetitions() else 10} rounds"


def peak_memory_bytes(step: Callable[[], Any]) -> int | None:
    """Bytes allocated by one call beyond what was allocated before it (inputs excluded); None off CUDA."""
    if not ON_CUDA:
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def environment() -> dict[str, str]:
    import triton

    return {
        "device_name": torch.cuda.get_device_name() if ON_CUDA else f"CPU ({os.cpu_count()} cores)",
        "torch_version": torch.__version__,
        "triton_version": triton.__version__,
    }


def measure(
    benchmark: Any,
    step: Callable[[], None],
    *,
    op: str,
    provider: str,
    mode: str,
    shape: tuple[int, ...],
    shape_label: str,
    dtype: torch.dtype,
    bytes_moved: int | None = None,
    flops: int | None = None,
    note: str = "",
    extra: dict[str, Any] | None = None,
) -> None:
    """Time ``step`` both ways and record it all in ``extra_info``.

    Give ``bytes_moved`` for a memory-bound op (recorded as GB/s and the
    fraction of copy bandwidth) or ``flops`` for a compute-bound one (recorded
    as TFLOP/s); ``extra`` adds fields of the op's own (e.g. attention's
    sequence length) for the report.
    """
    if (bytes_moved is None) == (flops is None):
        raise ValueError(f"measure: give exactly one of bytes_moved ({bytes_moved}) and flops ({flops})")
    step()  # the first call compiles (torch.compile, Triton's JIT); keep it out of every number
    synchronize()
    peak = peak_memory_bytes(step)
    time_ms = device_time_ms(step)
    copy_gbps = copy_bandwidth_gbps()
    if bytes_moved is not None:
        gbps = bytes_moved / (time_ms / 1e3) / 1e9
        throughput = {"bytes_moved": bytes_moved, "gbps": gbps, "fraction_of_copy": gbps / copy_gbps}
    else:
        throughput = {"flops": flops, "tflops": flops / (time_ms / 1e3) / 1e12}
    benchmark.extra_info.update(
        {
            "op": op,
            "provider": provider,
            "mode": mode,
            "shape": list(shape),
            "shape_label": shape_label,
            "dtype": str(dtype).removeprefix("torch."),
            "time_ms": time_ms,
            "timer": timer_description(),
            **throughput,
            "copy_gbps": copy_gbps,
            "peak_memory_bytes": peak,
            "note": note,
            **(extra or {}),
            **environment(),
        }
    )

    def synchronised_step() -> None:
        step()
        synchronize()

    rounds, warmup = (3, 0) if quick_repetitions() else (20, 3) if ON_CUDA else (3, 1)
    benchmark.pedantic(synchronised_step, rounds=rounds, warmup_rounds=warmup, iterations=1)
