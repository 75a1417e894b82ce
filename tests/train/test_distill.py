"""Online distillation and codistillation through the one trainer loop."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

import behemoth
from behemoth.checkpoint.locate import latest_checkpoint
from behemoth.cli import main
from behemoth.config import PRESETS
from behemoth.data.tokenizer import Tokenizer
from behemoth.train.config import build_config
from behemoth.train.run import run_training
from behemoth.train.steps import DistillStep
from behemoth.train.trainer import Interrupted

BASE = {"model.preset": "debug", "train.steps": 4, "train.batch_size": 4, "data.seq_len": 32,
        "data.num_problems": 300, "log.every": 1, "log.health_every": 2, "log.eval_every": 0,
        "checkpoint.every": 2, "log.tensorboard": False, "log.plots": False}


def cfg_for(run_dir, **over):
    args = {**BASE, "train.out_dir": str(run_dir), **over}
    return build_config(None, [f"--{k}={v}" for k, v in args.items()])


def records(run_dir, kind="train"):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A briefly trained debug teacher with a vocabulary padded to 320 (tokenizer: 54 chars)."""
    run = tmp_path_factory.mktemp("teacher")
    run_training(cfg_for(run, **{"model.vocab_size": 320, "train.steps": 30, "optim.lr": 1e-2,
                                 "optim.warmup_steps": 0, "checkpoint.every": 0}), say=lambda s: None)
    return latest_checkpoint(run)


@pytest.fixture(scope="module")
def student_config(tmp_path_factory):
    """A smaller student: half the width, other experts."""
    cfg = PRESETS["debug"].replace(dim=32, head_dim=8, moe={"num_experts": 8, "expert_dim": 16})
    path = tmp_path_factory.mktemp("student") / "config.json"
    path.write_text(json.dumps({"format": "behemoth", "model": cfg.to_dict()}))
    return path


def test_distill_trains_a_different_shape_student(teacher_dir, student_config, tmp_path):
    out = tmp_path / "run"
    cfg = cfg_for(out, **{"distill.teacher": str(teacher_dir), "model.config_file": str(student_config),
                          "distill.schedule": "linear", "distill.alpha": 0.8})
    summary = run_training(cfg, say=lambda s: None, mode="distill")
    assert summary["step"] == 4
    rec = records(out)
    assert all("kd_loss" in r and "kd_weight" in r for r in rec)
    assert rec[0]["kd_weight"] == pytest.approx(0.0) and rec[-1]["kd_weight"] == pytest.approx(0.8)
    student = behemoth.load_model(str(latest_checkpoint(out)))
    # the student takes the shared tokenizer's vocabulary: the teacher's padding is not copied
    assert student.config.dim == 32 and student.config.vocab_size == Tokenizer.load(teacher_dir).vocab_size
    assert behemoth.load_model(str(teacher_dir)).config.vocab_size > student.config.vocab_size
    assert Tokenizer.load(latest_checkpoint(out)).fingerprint == Tokenizer.load(teacher_dir).fingerprint


def test_distill_step_gradients_reach_only_the_student(teacher_dir):
    from behemoth.data.loader import DataLoader
    from behemoth.data.packing import build_in_memory
    from behemoth.data.tasks import make_problems
    from behemoth.train.config import DistillSection, RouterSection

    tok = Tokenizer.load(teacher_dir)
    teacher = behemoth.load_model(str(teacher_dir))
    student = behemoth.build_model(PRESETS["debug"]).train()
    batch = next(DataLoader(build_in_memory((p.text for p in make_problems("train", 50)), tok), 2, 32))
    with torch.no_grad():  # make the teacher rank its padding columns (ids 256..319) highest
        teacher.output.weight[256:] = teacher.output.weight[:64] * 3
    for kind, top_k in (("forward_kl", 0), ("jsd", 8), ("tvd", 0)):
        step = DistillStep(student, teacher, RouterSection(), DistillSection(loss=kind, top_k=top_k))
        m = step.forward_backward(batch, 1.0)
        assert not m["nonfinite"] and m["kd_loss"] >= 0
        assert all(p.grad is None for p in teacher.parameters())
        assert all(p.grad is not None for p in student.parameters() if p.dim() > 1)
        student.zero_grad(set_to_none=True)


def test_bad_teacher_settings_and_missing_teacher_are_errors(teacher_dir, tmp_path, capsys):
    args = [f"--{k}={v}" for k, v in {**BASE, "train.out_dir": str(tmp_path / "r")}.items()]
    other_tok = tmp_path / "tok.json"
    Tokenizer.from_chars("\n #%*+,-/0123456789:;=?AQabcdefghijklmnopqrstuvwxyz!").save(other_tok)
    # another tokenizer is distilled across tokenizers (test_foreign_teacher.py), but not from its top-k
    assert main(["distill", *args, f"--distill.teacher={teacher_dir}", f"--data.tokenizer={other_tok}",
                 "--distill.top_k=4"]) == 2
    assert "distill.top_k=4: a teacher with another tokenizer" in capsys.readouterr().err
    assert main(["distill", *args]) == 2
    assert "distill.teacher" in capsys.readouterr().err
    bare = tmp_path / "bare"
    behemoth.checkpoint.save_model(behemoth.build_model("debug"), bare)
    assert main(["distill", *args, f"--distill.teacher={bare}"]) == 2
    assert "tokenizer" in capsys.readouterr().err
    assert main(["distill", *args, f"--distill.teacher={teacher_dir}", "--distill.top_k=55"]) == 2
    assert "distill.top_k=55 exceeds the vocabulary (54 tokens)" in capsys.readouterr().err
    assert main(["distill", *args, f"--distill.teacher={teacher_dir}", "--model.preset=mini-maverick",
                 "--model.vocab_size=2048"]) == 2
    assert "smaller than the student's" in capsys.readouterr().err
    codistill = [f"--{k}={v}" for k, v in {**BASE, "train.out_dir": str(tmp_path / "co")}.items()]
    assert main(["codistill", *codistill, "--distill.teacher_preset=debug", "--distill.top_k=55"]) == 2
    assert "distill.top_k=55 exceeds the vocabulary" in capsys.readouterr().err
    assert not (tmp_path / "co").exists()  # checked before anything is written


def test_a_teacher_run_directory_is_pinned_to_its_checkpoint(teacher_dir, tmp_path):
    """A teacher named by its run directory is that run's latest checkpoint, recorded as such: a resume
    (or another rank) takes the same teacher even if the teacher's run moves on."""
    out = tmp_path / "run"
    cfg = cfg_for(out, **{"distill.teacher": str(teacher_dir.parent.parent), "train.steps": 1})
    run_training(cfg, say=lambda s: None, mode="distill")
    saved = json.loads((out / "train_config.json").read_text())["distill"]["teacher"]
    assert saved == str(teacher_dir)


def test_codistill_trains_both_with_one_teacher_forward(tmp_path, monkeypatch, student_config):
    from behemoth.model import Transformer

    calls = {"n": 0}
    real = Transformer.hidden_states

    def counted(self, *a, **k):
        calls["n"] += self.config.dim == 64 and self.training  # the teacher (debug preset; the student has 32)
        return real(self, *a, **k)

    monkeypatch.setattr(Transformer, "hidden_states", counted)
    out = tmp_path / "co"
    cfg = cfg_for(out, **{"model.config_file": str(student_config), "distill.teacher_preset": "debug"})
    run_training(cfg, say=lambda s: None, mode="codistill")
    assert calls["n"] == 4  # one teacher trunk forward per step, for its own loss and the student's targets
    ckpt = latest_checkpoint(out)
    teacher = behemoth.load_model(str(ckpt / "teacher"))
    fresh = behemoth.build_model("debug", seed=1)
    assert any(not torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), fresh.state_dict().values(),
                                                     strict=True))
    rec = records(out)
    assert all("teacher_loss" in r and "kd_loss" in r for r in rec)


def test_codistill_resume_is_exact(tmp_path, student_config):
    """A student and teacher with different numbers of experts (8 and 4): both models and the routing-bias
    state of both are saved and resumed exactly."""
    def cfg(d):
        return cfg_for(d, **{"distill.teacher_preset": "debug", "train.steps": 6,
                             "model.config_file": str(student_config)})

    run_training(cfg(tmp_path / "ref"), say=lambda s: None, mode="codistill")

    def say(line):
        if "step 3/6" in line:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Interrupted):
        run_training(cfg(tmp_path / "b"), say=say, mode="codistill")
    run_training(cfg(tmp_path / "b"), resume=True, say=lambda s: None, mode="codistill")
    for sub in ("", "teacher"):
        a = behemoth.load_model(str(latest_checkpoint(tmp_path / "ref") / sub)).state_dict()
        b = behemoth.load_model(str(latest_checkpoint(tmp_path / "b") / sub)).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), sub
