"""scratchlm.kernels: fused Triton kernels with PyTorch autograd wrappers.

Empty for now: the model's "reference" and "torch" paths are complete, and the
Triton kernels (RMSNorm, SwiGLU, RoPE, FlashAttention-2) arrive here next,
registered in ``scratchlm.model.backends`` as the "triton" backend.
"""
