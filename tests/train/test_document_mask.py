"""Training with --document_mask: every batch's attention stays inside the documents its eos tokens close."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import assert_close

from scratchlm.model import document_ids_from_eos
from scratchlm.model.pretrained import read_pretrained_config
from scratchlm.tokenizer.token_file import write_token_file
from scratchlm.train import TrainConfig, read_checkpoint, train
from scratchlm.train.cli import build_parser, config_from_args
from scratchlm.train.data import estimate_loss, evenly_spaced_starts, load_token_dataset, windows_at
from scratchlm.train.distributed import Parallel
from scratchlm.train.optim import global_grad_norm
from scratchlm.train.trainer import Trainer, adopt_pretrained_shape, resolve_eos_token_id
from tiny_run import CONTEXT, VOCAB, tiny_config

EOS = VOCAB - 1


def documents_config(tmp_path: Path, **overrides) -> TrainConfig:
    """tiny_config's run on packed documents: random walks of 1 to 9 tokens, each closed by EOS."""
    config = tiny_config(tmp_path, document_mask=True, eos_token_id=EOS, **overrides)
    rng = np.random.default_rng(1)
    stream: list[int] = []
    while len(stream) < 3000:
        stream += list(np.cumsum(rng.integers(1, 4, size=rng.integers(1, 10))) % EOS) + [EOS]
    ids = np.array(stream[:3000])
    write_token_file(config.train_data_path, ids[:2500], VOCAB)
    write_token_file(config.val_data_path, ids[2500:], VOCAB)
    return config


def test_each_step_trains_on_the_masked_loss_of_its_batch(tmp_path):
    config = documents_config(tmp_path).resolved()
    trainer = Trainer(config, Parallel(), torch.device("cpu"))
    data = load_token_dataset(config.train_data_path, VOCAB, CONTEXT)
    for _ in range(3):
        # The same batch by hand: the sampler's next draw, its ids, the loss and gradient of a copy of the model.
        sampler = torch.Generator().manual_seed(0)
        sampler.set_state(trainer.sampler.get_state())
        starts = torch.randint(0, len(data) - CONTEXT, (config.batch_size,), generator=sampler)
        inputs, targets = windows_at(data, starts, CONTEXT, "cpu")
        ids = document_ids_from_eos(inputs, EOS)
        assert int(ids.max()) >= 2  # several documents in some window
        model = copy.deepcopy(trainer.model)
        loss = model.loss(inputs, targets, document_ids=ids)
        loss.backward()
        with torch.no_grad():
            unmasked = float(model.loss(inputs, targets))
        record = trainer.train_step(data)
        assert record["loss"] == pytest.approx(loss.item(), rel=1e-6)
        assert abs(record["loss"] - unmasked) > 1e-5 * unmasked  # the ids made a difference
        assert record["grad_norm"] == pytest.approx(global_grad_norm(list(model.parameters())), rel=1e-5)
    # Validation scores the fixed windows with their ids too.
    val = load_token_dataset(config.val_data_path, VOCAB, CONTEXT)
    starts = evenly_spaced_starts(len(val), CONTEXT, config.eval_batches * config.batch_size)
    inputs, targets = windows_at(val, starts, CONTEXT, "cpu")
    with torch.no_grad():
        expected = float(trainer.model.loss(inputs, targets, document_ids=document_ids_from_eos(inputs, EOS)))
    assert trainer.evaluate(val) == pytest.approx(expected, rel=1e-5)
    plain = estimate_loss(trainer.model, val, context_length=CONTEXT, batch_size=4, num_batches=2, device="cpu")
    assert plain != pytest.approx(expected, rel=1e-3)


def trained(tmp_path: Path, kernels, steps: int = 3, **overrides) -> tuple[Trainer, list[dict], float]:
    config = documents_config(tmp_path, kernels=kernels, **overrides).resolved()
    trainer = Trainer(config, Parallel(), torch.device("cpu"))
    data = load_token_dataset(config.train_data_path, VOCAB, CONTEXT)
    records = [trainer.train_step(data) for _ in range(steps)]
    return trainer, records, trainer.evaluate(load_token_dataset(config.val_data_path, VOCAB, CONTEXT))


def assert_same_run(run: tuple[Trainer, list[dict], float], reference: tuple[Trainer, list[dict], float]) -> None:
    for ours, theirs in zip(run[1], reference[1]):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
        assert ours["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-4)
    assert run[2] == pytest.approx(reference[2], rel=1e-5)
    expected = reference[0].model.state_dict()
    for name, weight in run[0].model.state_dict().items():
        assert_close(weight, expected[name], atol=1e-5, rtol=1e-4, name=name)
    # Logits show the masking itself (a loss near log(vocab) barely does after a few steps).
    val = load_token_dataset(reference[0].config.val_data_path, VOCAB, CONTEXT)
    inputs, _ = windows_at(val, torch.tensor([0, 101]), CONTEXT, "cpu")
    ids = document_ids_from_eos(inputs, EOS)
    with torch.no_grad():
        theirs = reference[0].model(inputs, document_ids=ids)
        assert_close(run[0].model(inputs, document_ids=ids), theirs, atol=1e-4, rtol=1e-4, name="masked logits")
        assert (reference[0].model(inputs) - theirs).abs().max() > 1e-3


def test_torch_backend_trains_like_the_reference_with_document_mask(tmp_path):
    # On the CPU the torch backend attends through SDPA with the explicit mask.
    assert_same_run(trained(tmp_path / "torch", "torch"), trained(tmp_path / "reference", "reference"))


def test_triton_backend_trains_like_the_reference_with_document_mask(tmp_path):
    # The Triton kernels run under the interpreter here (conftest); the attention kernel gets document_ids.
    # Only attention on Triton: the other kernels' training is tested elsewhere, and the interpreter is slow.
    small = dict(steps=2, num_layers=1, batch_size=2, eval_batches=1)
    triton = trained(tmp_path / "triton", {"attention": "triton"}, **small)
    assert triton[0].model.backends["attention"] == "triton"
    assert_same_run(triton, trained(tmp_path / "reference", "reference", **small))


def test_settings_are_saved_and_a_resumed_run_keeps_them(tmp_path):
    config = documents_config(tmp_path, total_iters=4, checkpoint_interval=2, eval_interval=2)
    first = train(config, progress=False)
    run = Path(first["output_dir"])
    saved = json.loads((run / "train_config.json").read_text())
    assert saved["document_mask"] is True and saved["eos_token_id"] == EOS
    assert read_checkpoint(run / "checkpoint_00000004.pt")["extra"]["train_config"]["eos_token_id"] == EOS
    # Resume from the saved settings file with more steps: the same settings, and steps 5-6 still masked.
    args = build_parser().parse_args(["--config", str(run / "train_config.json"), "--resume", "--total_iters", "6"])
    resumed_config = config_from_args(args)
    assert resumed_config.document_mask is True and resumed_config.eos_token_id == EOS
    resumed = train(resumed_config, progress=False)
    assert resumed["start_iteration"] == 4 and resumed["iterations"] == 6
    stored = read_checkpoint(run / "checkpoint_00000006.pt")["extra"]["train_config"]
    assert stored["document_mask"] is True and stored["eos_token_id"] == EOS


def test_cli_flags_parse_into_the_config(tmp_path):
    base = ["--train_data_path", "t.npy", "--val_data_path", "v.npy", "--total_iters", "5", "--output_dir", "o",
            "--vocab_size", "64", "--context_length", "16", "--d_model", "32", "--num_layers", "1",
            "--num_heads", "4", "--d_ff", "64"]  # fmt: skip
    config = config_from_args(build_parser().parse_args([*base, "--document_mask", "--eos_token_id", "7"]))
    assert config.document_mask is True and config.eos_token_id == 7
    config = config_from_args(build_parser().parse_args(base))
    assert config.document_mask is False and config.eos_token_id is None
    help_text = build_parser().format_help()
    assert "--document_mask" in help_text and "--eos_token_id" in help_text


def test_document_mask_without_an_eos_id_or_a_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="--document_mask needs --eos_token_id"):
        tiny_config(tmp_path, document_mask=True).validate()
    with pytest.raises(ValueError, match=r"--eos_token_id=64 must be in \[0, vocab_size=64\)"):
        tiny_config(tmp_path, document_mask=True, eos_token_id=VOCAB).validate()
    with pytest.raises(ValueError, match=r"--eos_token_id must be an int >= 0, got -1"):
        tiny_config(tmp_path, document_mask=True, eos_token_id=-1).validate()
    with pytest.raises(ValueError, match="--document_mask must be true or false"):
        tiny_config(tmp_path, document_mask="yes").validate()


def test_eos_id_defaults_to_the_tokenizer_that_a_resumed_run_carries(tmp_path):
    from scratchlm.tokenizer import Tokenizer

    # A tokenizer with <|endoftext|> at id 256 travels in the checkpoint (as --init_from runs store it).
    tokenizer = Tokenizer({i: bytes([i]) for i in range(256)}, [], ["<|endoftext|>"])
    config = documents_config(tmp_path, vocab_size=300, total_iters=2, eval_interval=2, checkpoint_interval=2)
    first = Trainer(config.resolved(), Parallel(), torch.device("cpu"))
    first.tokenizer_document = tokenizer.to_document()
    run = Path(config.output_dir)
    run.mkdir()
    first.save(run / "checkpoint_00000000.pt")
    resumed = TrainConfig(**{**config.to_dict(), "eos_token_id": None, "resume": str(run)})
    payload = read_checkpoint(run / "checkpoint_00000000.pt")
    trainer = Trainer(resumed.resolved(), Parallel(), torch.device("cpu"), payload)
    assert trainer.config.eos_token_id == 256 and trainer.document_eos == 256
    # Fine-tuning from that checkpoint finds the id in the tokenizer --init_from brings.
    checkpoint = str(run / "checkpoint_00000000.pt")
    fine_tune = TrainConfig(**{**config.to_dict(), "eos_token_id": None, "init_from": checkpoint}).resolved()
    fine_tune = adopt_pretrained_shape(fine_tune, read_pretrained_config(checkpoint))
    trainer = Trainer(fine_tune, Parallel(), torch.device("cpu"), None, read_pretrained_config(checkpoint))
    assert trainer.config.eos_token_id == 256
    # Without a tokenizer in the checkpoint the flag is required, named in the error.
    del payload["extra"]["tokenizer"]
    with pytest.raises(ValueError, match="--document_mask needs --eos_token_id"):
        Trainer(resumed.resolved(), Parallel(), torch.device("cpu"), payload)


def test_eos_id_lookup_prefers_endoftext_then_the_eos_token():
    config = TrainConfig(train_data_path="t", val_data_path="v", total_iters=1, output_dir="o", document_mask=True)
    both = SimpleNamespace(special_token_ids={"<|endoftext|>": 3, "<|end_of_text|>": 9}, eos_id=9)
    assert resolve_eos_token_id(config, both, 10).eos_token_id == 3
    llama = SimpleNamespace(special_token_ids={"<|end_of_text|>": 9}, eos_id=9)
    assert resolve_eos_token_id(config, llama, 10).eos_token_id == 9
    with pytest.raises(ValueError, match=re.escape("the run's tokenizer has neither <|endoftext|> nor an eos token")):
        resolve_eos_token_id(config, SimpleNamespace(special_token_ids={}, eos_id=None), 10)
    with pytest.raises(ValueError, match=r"--eos_token_id=9 must be in \[0, vocab_size=8\)"):
        resolve_eos_token_id(config, llama, 8)
    given = dataclasses.replace(config, eos_token_id=4)
    assert resolve_eos_token_id(given, both, 10) is given  # a given id wins
    assert resolve_eos_token_id(dataclasses.replace(config, document_mask=False), both, 10).eos_token_id is None


def test_demo_flag_turns_document_mask_on_with_its_tokenizer_eos_id(tmp_path, monkeypatch):
    from scratchlm import cli, demo

    def small_corpus(output_dir: Path) -> tuple[Path, Path]:
        output_dir.mkdir(parents=True, exist_ok=True)
        text = "<|endoftext|>".join(f"document {i} says hello to the world" for i in range(40))
        (output_dir / "train.txt").write_text(text, encoding="utf-8")
        (output_dir / "val.txt").write_text(text[:600], encoding="utf-8")
        return output_dir / "train.txt", output_dir / "val.txt"

    seen = {}

    class Stop(Exception):
        pass

    def fake_train(config, progress=True):
        seen["config"] = config
        raise Stop

    monkeypatch.setattr(demo, "write_corpus", small_corpus)
    monkeypatch.setattr("scratchlm.train.train", fake_train)
    with pytest.raises(Stop):
        cli.main(["demo", "--output_dir", str(tmp_path), "--vocab_size", "300", "--document_mask", "--device", "cpu"])
    assert seen["config"].document_mask is True and seen["config"].eos_token_id == 256
    with pytest.raises(Stop):
        cli.main(["demo", "--output_dir", str(tmp_path), "--vocab_size", "300", "--device", "cpu"])
    assert seen["config"].document_mask is False and seen["config"].eos_token_id is None
