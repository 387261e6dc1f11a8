"""Distribution `scratchlm`: the four top-level folders mapped into one package.

The folders keep short names in the repository (``model/``, ``train/``, ...)
but are installed as ``scratchlm.model``, ``scratchlm.train``, ... so nothing
generic such as ``model`` lands in site-packages.
"""

from setuptools import setup

PARTS = ("kernels", "model", "train", "tokenizer")

setup(
    name="scratchlm",
    version="0.1.0",
    description="A Llama-style language model from scratch, with fused Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["scratchlm", *(f"scratchlm.{part}" for part in PARTS)],
    package_dir={"scratchlm": "scratchlm", **{f"scratchlm.{part}": part for part in PARTS}},
    install_requires=[
        # 2.5: scaled_dot_product_attention's enable_gqa (grouped-query attention on the "torch" backend).
        "torch>=2.5",
        # Triton ships Linux wheels only; elsewhere the "triton" kernels are unavailable.
        "triton; platform_system == 'Linux'",
        "numpy",
        "regex",
        "einops",
        "tqdm",
        # Pretrained Llama checkpoints (scratchlm.model.load_pretrained / export_hf): Hugging Face
        # weights and llama.cpp's GGUF files. Both are small readers, imported only when used.
        "safetensors",
        "gguf",
    ],
    extras_require={
        "dev": [
            "pytest",
            "pytest-benchmark",
            "hypothesis",
            "tiktoken",
            # The tokenizer's tokenizer.json export is tested by loading it with HF's library.
            "tokenizers",
            # Tested outputs of training runs: TensorBoard event files and `scratchlm plot`.
            "tensorboard",
            "matplotlib",
            # Parity tests of pretrained-model loading and export: tiny Llamas built by transformers itself.
            "transformers",
            # transformers reads GGUF files (the independent check of our GGUF reader) only with accelerate.
            "accelerate",
            "sentencepiece",  # the SentencePiece-style tokenizers are cross-checked against the real library
            "peft",  # apply_kernels is tested with LoRA adapters on the patched projections
        ],
        # `make bench` draws its plot with matplotlib (skipped with a note without it);
        # bench_tokenizer.py compares training with Hugging Face's tokenizers.
        "bench": ["pytest-benchmark", "matplotlib", "tokenizers"],
    },
    entry_points={"console_scripts": ["scratchlm = scratchlm.cli:main"]},
)
