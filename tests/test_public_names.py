"""Every name in a scratchlm package's ``__all__`` is the documented object, in any import order.

Importing a submodule binds it as an attribute of its package, so a public
function named like its module (``scratchlm.kernels.flash_attention``) can
turn into the module once that module has been imported, which building a
model does. Each order runs in a fresh interpreter, since the first import
decides.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PACKAGES = ["scratchlm.kernels", "scratchlm.model", "scratchlm.train", "scratchlm.tokenizer"]

# Prints, per package and public name, what the name is: "ok", or why it is not the documented object.
_CHECK = r"""
import importlib, json, pkgutil, sys, types

def import_all_submodules():
    import scratchlm
    for info in pkgutil.walk_packages(scratchlm.__path__, "scratchlm."):
        if not info.name.endswith("__main__"):  # running those would start the CLI
            importlib.import_module(info.name)

def verdict(package, name):
    value = getattr(package, name)
    if isinstance(value, types.ModuleType):
        return f"is the module {value.__name__}"
    defined_in = getattr(value, "__module__", None)
    if isinstance(value, (types.FunctionType, type)):
        if not defined_in.startswith("scratchlm."):
            return f"comes from {defined_in}"
        if getattr(importlib.import_module(defined_in), value.__name__, None) is not value:
            return f"is not {defined_in}.{value.__name__}"
    return "ok"

order = sys.argv[1]
packages = json.loads(sys.argv[2])
if order == "submodules first":
    import_all_submodules()
modules = [importlib.import_module(name) for name in packages]
if order == "names first":
    seen = {name: {n: getattr(m, n) for n in m.__all__} for name, m in zip(packages, modules)}
    import_all_submodules()
    for name, m in zip(packages, modules):
        for n, value in seen[name].items():
            assert getattr(m, n) is value, f"{name}.{n} changed after importing the submodules"
if order == "a model first":
    from scratchlm.model import TransformerLM
    TransformerLM(vocab_size=32, context_length=8, d_model=16, num_layers=1, num_heads=2, d_ff=32, kernels="reference")
print(json.dumps({name: {n: verdict(m, n) for n in m.__all__} for name, m in zip(packages, modules)}))
"""


@pytest.mark.parametrize("order", ["submodules first", "names first", "a model first"])
def test_every_public_name_is_the_documented_object(order):
    run = subprocess.run(
        [sys.executable, "-c", _CHECK, order, json.dumps(PACKAGES)], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    verdicts = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(verdicts) == set(PACKAGES) and all(verdicts.values())
    wrong = {f"{package}.{name}": said for package, names in verdicts.items() for name, said in names.items() if said != "ok"}
    assert wrong == {}


def test_the_kernel_functions_named_like_their_modules_are_callable_after_those_imports():
    code = (
        "import importlib\n"
        "for name in ('flash_attention', 'flash_attention_tiled', 'linear_cross_entropy',"
        " 'linear_cross_entropy_chunked', 'rmsnorm', 'rope', 'swiglu'):\n"
        "    module = importlib.import_module('scratchlm.kernels.' + name)\n"
        "    import scratchlm.kernels as kernels\n"
        "    from scratchlm.kernels import *\n"
        "    assert callable(getattr(kernels, name)) and getattr(kernels, name) is getattr(module, name), name\n"
        "    assert globals()[name] is getattr(module, name), name\n"
        "print('ok')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]
