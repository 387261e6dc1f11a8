"""Triton helpers shared by the kernels: exact dots, GPU rounding, log-base constants.

* ``dot(a, b, acc)``: ``a @ b (+ acc)`` accumulated in float32; float32
  operands stay IEEE float32 (Triton's default for float32 is TF32, ~1e-3
  off). ``tests/kernels/test_gpu_compilation.py`` checks the SASS for it.
* ``round_to(x, DTYPE)``: float32 rounded to DTYPE to nearest, ties to even,
  as a GPU's ``x.to(DTYPE)`` rounds.
* ``LOG2E``, ``LN2``: the softmax kernels work in log2 units (``exp2`` is one
  instruction) and convert back to natural logs at the end.

Two defects of Triton's interpreter (3.9) with bfloat16 are worked around
only under it: ``tl.dot`` multiplies bfloat16 operands as their raw 16-bit
patterns, and float32 -> bfloat16 casts truncate where a GPU rounds to
nearest even. There dot operands are widened to float32 and downcasts are
rounded by hand (the result kept in float32, so stores are exact); on a GPU
both branches compile away.
"""

from __future__ import annotations

import inspect

import triton
import triton.language as tl

from scratchlm.kernels._registration import INTERPRETING

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
INTERPRETER_WORKAROUNDS = tl.constexpr(INTERPRETING)
# tl.range(..., disable_licm=True) exists only in newer Tritons; older ones get a plain loop.
RANGE_TAKES_DISABLE_LICM = tl.constexpr("disable_licm" in inspect.signature(tl.range.__init__).parameters)


@triton.jit
def dot(a, b, acc):
    """a @ b (+ acc) with float32 accumulation; float32 operands stay IEEE float32, not TF32."""
    if INTERPRETER_WORKAROUNDS:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    """float32 x rounded to DTYPE (to nearest, ties to even), as a GPU's x.to(DTYPE) does."""
    if INTERPRETER_WORKAROUNDS and DTYPE == tl.bfloat16:
        # Round the float32 bits at bit 16, ties to even; -65536 = 0xFFFF0000
        # keeps the 16 bits a bfloat16 has.
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        return bits.to(tl.float32, bitcast=True)
    return x.to(DTYPE)
