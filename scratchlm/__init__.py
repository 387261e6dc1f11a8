"""scratchlm: a Llama-style language model built from first principles.

Parts: ``scratchlm.model`` (layers, TransformerLM, generation),
``scratchlm.train`` (optimizers, loss, data, checkpoints, training loop),
``scratchlm.tokenizer`` (byte-level BPE) and ``scratchlm.kernels`` (Triton).
"""

__version__ = "0.1.0"
