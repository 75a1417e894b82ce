"""The training loop end to end on a toy model: progress, health, exact resume (after a signal and
after a kill in the middle of a save), non-finite handling, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from behemoth.checkpoint.locate import latest_checkpoint
from behemoth.cli import main
from behemoth.data.tokenizer import Tokenizer
from behemoth.train.config import build_config
from behemoth.train.run import run_training
from behemoth.train.steps import PretrainStep
from behemoth.train.trainer import Interrupted, TrainingStopped

BASE = {"model.preset": "debug", "train.steps": 8, "train.batch_size": 4, "data.seq_len": 32,
        "data.num_problems": 300, "log.every": 1, "log.health_every": 2, "log.eval_every": 4, "log.eval_batches": 2,
        "checkpoint.every": 2, "log.tensorboard": False, "log.plots": False, "router.bias_update_rate": 0.01}


def cfg_for(run_dir, **over):
    args = {**BASE, "train.out_dir": str(run_dir), **over}
    return build_config(None, [f"--{k}={v}" for k, v in args.items()])


def records(run_dir, kind):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


def final_state(run_dir):
    from safetensors.torch import load_file

    return load_file(str(latest_checkpoint(run_dir) / "model.safetensors"))


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ref")
    lines = []
    summary = run_training(cfg_for(run_dir), say=lines.append)
    return run_dir, summary, lines


def test_run_shows_progress_health_and_learns(reference_run):
    run_dir, summary, lines = reference_run
    assert summary["step"] == 8 and summary["nonfinite_steps"] == 0
    last = [line for line in lines if line.startswith("[####################] step 8/8 | loss")]
    assert last and "tok/s" in last[0] and "ETA" in last[0]
    train = records(run_dir, "train")
    assert [r["step"] for r in train] == list(range(1, 9))
    assert train[-1]["loss"] < train[0]["loss"]
    routing = records(run_dir, "routing")
    assert [r["step"] for r in routing] == [2, 4, 6, 8]
    layer = routing[-1]["layers"][0]
    assert {"tokens", "max_over_mean", "router_entropy", "dead", "bias_min", "bias_max", "flip_rate", "margin",
            "logit_margin"} <= set(layer)
    assert sum(layer["tokens"]) == 2 * 4 * 32  # two optimizer steps of 4 x 32 tokens, top-1
    assert len(records(run_dir, "eval")) == 2
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["latest", "step_0000004", "step_0000006", "step_0000008"]  # keep_last=3
    assert (run_dir / "tokenizer.json").is_file() and (run_dir / "train_config.json").is_file()
    step_dir = latest_checkpoint(run_dir)  # self-describing: model, tokenizer and training state
    assert (step_dir / "tokenizer.json").read_bytes() == (run_dir / "tokenizer.json").read_bytes()
    import behemoth

    # a new model takes its tokenizer's vocabulary (the debug preset's 256 is not kept)
    assert behemoth.load_model(str(step_dir)).config.vocab_size == Tokenizer.load(run_dir).vocab_size == 54


def test_bias_update_moves_and_recentres(reference_run):
    state = final_state(reference_run[0])
    biases = [v for k, v in state.items() if k.endswith("expert_bias")]
    assert biases and all(b.abs().sum() > 0 for b in biases)
    assert all(abs(float(b.mean())) < 1e-6 for b in biases)


def test_no_bias_update_when_disabled(tmp_path):
    run_training(cfg_for(tmp_path, **{"router.bias_update_rate": 0.0, "train.steps": 2}), say=lambda s: None)
    assert all(not v.any() for k, v in final_state(tmp_path).items() if k.endswith("expert_bias"))


def test_resume_after_signal_is_bitwise_identical(reference_run, tmp_path):
    ref_dir = reference_run[0]

    def say(line):  # SIGTERM in the middle of the run, as a scheduler would send it
        if "step 5/8" in line:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Interrupted) as e:
        run_training(cfg_for(tmp_path), say=say)
    assert e.value.signum == signal.SIGTERM and e.value.step == 5
    assert latest_checkpoint(tmp_path).name == "step_0000005"
    run_training(cfg_for(tmp_path), resume=True, say=lambda s: None)
    assert_same_weights(final_state(tmp_path), final_state(ref_dir))
    assert [r["loss"] for r in records(tmp_path, "train")] == [r["loss"] for r in records(ref_dir, "train")]
    # routing health, stability included (the probe's last selection is in the checkpoint), as if uninterrupted
    assert records(tmp_path, "routing") == records(ref_dir, "routing")


def test_kill_during_save_leaves_previous_checkpoint_and_resume_is_exact(reference_run, tmp_path):
    """A process killed (os._exit, like kill -9) while writing its second checkpoint."""
    cfg_args = [f"--{k}={v}" for k, v in {**BASE, "train.out_dir": str(tmp_path)}.items()]
    script = textwrap.dedent(f"""
        import os, behemoth.checkpoint.training as io
        from behemoth.train.config import build_config
        from behemoth.train.run import run_training
        real, calls = io.write_state, []
        def dying(state, directory, name):
            calls.append(1)
            if len(calls) == 2:
                (directory / "partial.bin").write_bytes(b"x" * 100)
                os._exit(137)
            real(state, directory, name)
        io.write_state = dying
        run_training(build_config(None, {cfg_args!r}), say=lambda s: None)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 137, r.stderr
    assert latest_checkpoint(tmp_path).name == "step_0000002"
    assert list((tmp_path / "checkpoints").glob(".step_0000004.partial-*"))  # the torn write, never published
    run_training(cfg_for(tmp_path), resume=True, say=lambda s: None)
    assert_same_weights(final_state(tmp_path), final_state(reference_run[0]))


def test_nonfinite_steps_are_skipped_then_stop_the_run(tmp_path, monkeypatch):
    real = PretrainStep.forward_backward
    calls = {"n": 0}

    def poisoned(self, batch, loss_scale):
        calls["n"] += 1
        m = real(self, batch, loss_scale) if calls["n"] not in (3,) and calls["n"] < 6 else None
        if m is None:
            self.model.zero_grad(set_to_none=True)
            return {"loss": float("nan"), "tokens": 0, "nonfinite": True}
        return m

    monkeypatch.setattr(PretrainStep, "forward_backward", poisoned)
    lines = []
    with pytest.raises(TrainingStopped, match="3 non-finite steps in a row"):
        run_training(cfg_for(tmp_path, **{"train.max_nonfinite": 3}), say=lines.append)
    assert sum("non-finite loss" in line for line in lines) == 4  # step 3 alone, then 6, 7, 8
    # Step 6 was skipped (weights untouched) and saved as usual; the run stopped at step 8 without a save.
    assert latest_checkpoint(tmp_path).name == "step_0000006"
    assert all(torch.isfinite(v).all() for v in final_state(tmp_path).values())
    assert [r["skipped_steps"] for r in records(tmp_path, "train")][:5] == [0, 0, 1, 1, 1]


def test_train_on_a_text_corpus_with_a_trained_tokenizer(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    docs = [{"text": f"document {i}: the quick brown fox jumps over the lazy dog {i * 7} times."} for i in range(60)]
    corpus.write_text("\n".join(json.dumps(d) for d in docs))
    out = tmp_path / "run"
    cfg = cfg_for(out, **{"data.path": str(corpus), "data.tokenizer_vocab_size": 300, "model.vocab_size": 320,
                          "data.cache_dir": str(tmp_path / "cache"), "data.val_fraction": 0.1, "train.steps": 3})
    summary = run_training(cfg, say=lambda s: None)
    assert summary["step"] == 3 and (out / "tokenizer.json").is_file()


BAD = [
    ({"data.path": "/no/such/corpus.jsonl"}, "no/such/corpus.jsonl"),
    ({"model.preset": "nope"}, "unknown preset"),
    ({"optim.lr": "-1"}, "optim.lr"),
]


@pytest.mark.parametrize("over,match", BAD)
def test_bad_input_one_line_exit_2(tmp_path, capsys, over, match):
    args = {**BASE, "train.out_dir": str(tmp_path / "run"), **over}
    assert main(["train", *[f"--{k}={v}" for k, v in args.items()]]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_bad_corpora(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    bad_parquet = tmp_path / "bad.parquet"
    bad_parquet.write_bytes(b"PAR1 this is not parquet")
    for path, match in ((empty, "no documents"), (bad_parquet, "bad.parquet")):
        args = {**BASE, "train.out_dir": str(tmp_path / "run"), "data.path": str(path),
                "data.cache_dir": str(tmp_path / "cache")}
        assert main(["train", *[f"--{k}={v}" for k, v in args.items()]]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and match in err


def test_tokenizer_larger_than_vocabulary(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text(" ".join(f"word{i}" for i in range(3000)))
    tok = tmp_path / "tok.json"
    assert main(["tokenizer", "train", "--data", str(corpus), "--vocab-size", "600", "--out", str(tok)]) == 0
    args = {**BASE, "train.out_dir": str(tmp_path / "run"), "data.path": str(corpus), "data.tokenizer": str(tok),
            "data.cache_dir": str(tmp_path / "cache"), "model.vocab_size": 256}
    assert main(["train", *[f"--{k}={v}" for k, v in args.items()]]) == 2
    assert "vocabulary holds 256" in capsys.readouterr().err


def test_a_new_model_takes_its_vocabulary_from_the_tokenizer_unless_set(tmp_path):
    """No --model.vocab_size: the tokenizer's size (54 characters of the built-in tasks, not the preset's 256);
    set: that size, which may exceed the tokenizer's; a resumed run keeps the checkpoint's."""
    import behemoth

    fast = {"train.steps": 1, "log.eval_every": 0, "checkpoint.every": 0}
    run_training(cfg_for(tmp_path / "a", **fast), say=lambda s: None)
    assert behemoth.load_model(str(tmp_path / "a")).config.vocab_size == Tokenizer.load(tmp_path / "a").vocab_size
    run_training(cfg_for(tmp_path / "b", **fast, **{"model.vocab_size": 300}), say=lambda s: None)
    assert behemoth.load_model(str(tmp_path / "b")).config.vocab_size == 300
    run_training(cfg_for(tmp_path / "a", **{**fast, "train.steps": 2}), resume=True, say=lambda s: None)
    assert behemoth.load_model(str(tmp_path / "a")).config.vocab_size == 54
    # a run made at another size (by model.vocab_size, or before this rule) resumes at its checkpoint's size
    run_training(cfg_for(tmp_path / "b", **{**fast, "train.steps": 2}), resume=True, say=lambda s: None)
    assert behemoth.load_model(str(tmp_path / "b")).config.vocab_size == 300


def test_too_little_data_is_an_error_before_any_model_is_built(tmp_path, monkeypatch, capsys):
    import behemoth.train.models as models

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the data were checked")

    monkeypatch.setattr(models, "build_model", no_model)
    corpus = tmp_path / "c.txt"
    corpus.write_text("a b c\n")  # one short document: not one window of seq_len + 1 tokens
    args = {**BASE, "train.out_dir": str(tmp_path / "run"), "data.path": str(corpus), "data.val_fraction": 0.0,
            "data.cache_dir": str(tmp_path / "cache"), "data.tokenizer_vocab_size": 300}
    assert main(["train", *[f"--{k}={v}" for k, v in args.items()]]) == 2
    assert "too few for one window" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_existing_run_and_incompatible_resume_are_refused(reference_run, capsys):
    run_dir = reference_run[0]
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    args = [f"--{k}={v}" for k, v in {**BASE, "train.out_dir": str(run_dir)}.items()]
    assert main(["train", *args]) == 2
    assert "already holds a run's checkpoints" in capsys.readouterr().err
    assert main(["train", "--resume", *args, "--data.seq_len=16"]) == 2
    assert "data.seq_len differs" in capsys.readouterr().err
    assert main(["train", "--resume", *args, "--model.preset=mini-maverick"]) == 2
    assert "model differs" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before  # nothing overwritten


def test_activation_checkpointing_changes_nothing(reference_run, tmp_path):
    """Recomputing activations in backward gives bitwise the same run, and the same logged routing counts
    (the recomputation does not count its tokens a second time)."""
    run_training(cfg_for(tmp_path, **{"train.activation_checkpointing": True}), say=lambda s: None)
    assert_same_weights(final_state(tmp_path), final_state(reference_run[0]))
    health = [records(d, "routing") for d in (tmp_path, reference_run[0])]
    assert health[0] and health[0] == health[1]
