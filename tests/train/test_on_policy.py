"""On-policy distillation: the rollout loss is the closed form at the student's own tokens, λ = 0 is today's
distillation bit for bit, a resumed run is bitwise the uninterrupted one, and bad settings are one line."""

from __future__ import annotations

import copy
import json
import os
import signal

import pytest
import torch

import behemoth
from behemoth import build_model
from behemoth.checkpoint import save_model
from behemoth.checkpoint.locate import latest_checkpoint
from behemoth.cli import main
from behemoth.config import PRESETS
from behemoth.data import DataLoader, build_in_memory
from behemoth.data.loader import IGNORE_INDEX
from behemoth.data.tasks import ALPHABET, make_problems
from behemoth.data.tokenizer import Tokenizer
from behemoth.train.config import build_config
from behemoth.train.on_policy import OnPolicyDistillStep, PromptPool, on_policy_at, rollout_batch, rollout_seed
from behemoth.train.run import run_training
from behemoth.train.steps import DistillStep
from behemoth.train.trainer import Interrupted

TOK = Tokenizer.from_chars(ALPHABET)
CFG = PRESETS["debug"].replace(vocab_size=64)
BASE = {"model.preset": "debug", "model.vocab_size": 64, "train.steps": 6, "train.batch_size": 4,
        "data.seq_len": 32, "data.num_problems": 200, "log.every": 1, "log.health_every": 2, "log.eval_every": 0,
        "checkpoint.every": 2, "log.tensorboard": False, "log.plots": False, "distill.on_policy_tokens": 12}


def config(**over):
    return build_config(None, [f"--{k}={v}" for k, v in {**BASE, **over}.items()])


def loader(seed=0):
    store = build_in_memory([p.text for p in make_problems("train", 100, seed=seed)], TOK)
    return DataLoader(store, batch_size=3, seq_len=32, seed=seed)


def make_step(share, **over):
    cfg = config(**{"distill.on_policy": share, **over})
    pool = PromptPool([TOK.encode(p.prompt) for p in make_problems("train", 20, tasks="add,count")], 8, seed=0)
    return OnPolicyDistillStep(build_model(CFG, seed=0), build_model(CFG, seed=1), cfg.router, cfg.distill, None,
                               pool, TOK.eos_id, seed=0)


def test_the_share_of_on_policy_steps():
    for share, want in ((0.0, 0), (0.25, 25), (0.5, 50), (1 / 3, 33), (1.0, 100)):
        assert sum(on_policy_at(i, share) for i in range(100)) == want
    assert [on_policy_at(i, 0.25) for i in range(8)] == [False, False, False, True] * 2
    assert [on_policy_at(i, 1.0, start=3) for i in range(5)] == [False, False, False, True, True]  # a warm start


def test_rollout_rows_label_the_students_tokens_only():
    b = rollout_batch([[5, 6, 7], [8]], [[9, 10, TOK.eos_id], [11]], TOK.eos_id, torch.device("cpu"))
    assert b.input_ids.tolist() == [[5, 6, 7, 9, 10], [8, 11, TOK.eos_id, TOK.eos_id, TOK.eos_id]]
    X = IGNORE_INDEX
    assert b.labels.tolist() == [[X, X, 9, 10, TOK.eos_id], [11, X, X, X, X]]
    assert b.positions.tolist() == [[0, 1, 2, 3, 4], [0, -1, -1, -1, -1]] and b.labelled == 4  # padding: -1


@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl"])
def test_rollout_loss_is_the_closed_form_at_the_sampled_tokens(kind):
    step = make_step(1.0, **{"distill.on_policy_loss": kind, "distill.temperature": 2.0})
    batch = next(loader())
    step.begin_step(0, 1)
    metrics = step.forward_backward(batch, 1.0)
    assert metrics["on_policy"] == 1.0 and metrics["gen_s"] > 0
    # the same rollout again (a pure function of seed, step and micro-batch; the weights did not move)
    prompts = step.pool.draw(batch, 0, 0)
    rows = rollout_batch(prompts, step.sample(prompts, rollout_seed(0, 0, 0))[0], TOK.eos_id, torch.device("cpu"))
    assert rows.labelled == metrics["tokens"] > 0
    with torch.no_grad():
        s = step.model.logits(step.model.hidden_states(rows.input_ids, **rows.model_inputs)).float() / 2.0
        t = step.teacher.logits(step.teacher.hidden_states(rows.input_ids, **rows.model_inputs)).float() / 2.0
    q, p = s.log_softmax(-1), t.log_softmax(-1)
    per_token = (q.exp() * (q - p)).sum(-1) if kind == "reverse_kl" else (p.exp() * (p - q)).sum(-1)
    mask = rows.labels != IGNORE_INDEX
    want = per_token[mask].mean() * 2.0**2  # the tau^2 factor of KD at a temperature
    assert float(metrics["kd_loss"]) == pytest.approx(float(want), rel=1e-5)
    assert float(metrics["loss"]) == float(metrics["kd_loss"]) and "rollout_nll" in metrics


def test_share_zero_is_todays_distillation_bit_for_bit():
    on = make_step(0.0)
    off = DistillStep(copy.deepcopy(on.model), on.teacher, on.router_cfg, on.cfg)
    for step in (on, off):
        opt = torch.optim.AdamW(step.model.parameters(), lr=1e-2)
        data = loader()
        for i in range(3):
            step.begin_step(i, 3)
            step.forward_backward(next(data), 1.0)
            opt.step()
            opt.zero_grad()
    a, b = on.model.state_dict(), off.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("teacher")
    save_model(build_model(CFG, seed=1), d)
    TOK.save(d)
    return d


def test_on_policy_resume_is_bitwise(teacher_dir, tmp_path):
    over = {"distill.teacher": str(teacher_dir), "distill.on_policy": 0.5, "distill.on_policy_temperature": 1.0}
    run_training(config(**over, **{"train.out_dir": str(tmp_path / "ref")}), say=lambda s: None, mode="distill")

    def say(line):
        if "step 3/6" in line:
            os.kill(os.getpid(), signal.SIGTERM)

    cut = config(**over, **{"train.out_dir": str(tmp_path / "b")})
    with pytest.raises(Interrupted):
        run_training(cut, say=say, mode="distill")
    run_training(cut, resume=True, say=lambda s: None, mode="distill")
    a = behemoth.load_model(str(latest_checkpoint(tmp_path / "ref"))).state_dict()
    b = behemoth.load_model(str(latest_checkpoint(tmp_path / "b"))).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)

    def train(d):
        return [r for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if r["type"] == "train"]

    ref, resumed = train(tmp_path / "ref"), train(tmp_path / "b")
    assert [r["on_policy"] for r in ref] == [0.0, 1.0] * 3
    assert [(r["step"], r["loss"]) for r in ref[3:]] == [(r["step"], r["loss"]) for r in resumed[-3:]]
    assert all(r["gen_s"] > 0 and r["score_s"] > 0 and r["train_s"] > 0 for r in ref if r["on_policy"])


def test_bad_on_policy_settings_are_one_line(teacher_dir, tmp_path, capsys):
    base = ["--model.preset=debug", "--model.vocab_size=64", "--train.steps=1", f"--train.out_dir={tmp_path / 'r'}"]

    def fails(args, match):
        assert main(args + base) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and match in err, err

    fails(["distill", f"--distill.teacher={teacher_dir}", "--distill.on_policy=1.5"], "distill.on_policy=1.5")
    fails(["distill", f"--distill.teacher={teacher_dir}", "--distill.on_policy=1", "--distill.on_policy_loss=kl"],
          "distill.on_policy_loss='kl'")
    fails(["codistill", "--distill.teacher_preset=debug", "--distill.on_policy=0.5"], "applies to `behemoth distill`")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"question": "1+1"}) + "\n")
    fails(["distill", f"--distill.teacher={teacher_dir}", "--distill.on_policy=1",
           f"--distill.on_policy_prompts={prompts}"], "p.jsonl:1: no 'prompt' field")
    assert not (tmp_path / "r").exists()  # nothing written


def test_distributed_ranks_decode_every_step_and_sample_the_same(monkeypatch):
    """Alone, decoding stops once every row has; with several processes every rank runs all `on_policy_tokens`
    decode steps (its forwards are collectives), and the completions are the same."""
    import behemoth.train.on_policy as on_policy

    step = make_step(1.0, **{"distill.on_policy_tokens": 40})
    logits = step.model.logits
    bias = torch.zeros(CFG.vocab_size)
    bias[TOK.eos_id] = 4.0  # a student that stops soon, so that the early stop happens
    monkeypatch.setattr(step.model, "logits", lambda h: logits(h) + bias)
    prompts = [TOK.encode(p.prompt) for p in make_problems("train", 6)]
    alone, n_alone = step.sample(prompts, 7)
    monkeypatch.setattr(on_policy, "world_size", lambda: 2)
    spread, n_spread = step.sample(prompts, 7)
    assert spread == alone and n_alone == 16 and n_spread == 40
    assert all(c[-1] == TOK.eos_id for c in alone)


def test_ranks_draw_their_own_rollouts():
    pool = PromptPool([TOK.encode(p.prompt) for p in make_problems("train", 50)], 8, seed=0)
    batch = next(loader())
    assert pool.draw(batch, 3, 0, 8, rank=0) != pool.draw(batch, 3, 0, 8, rank=1)
    assert pool.draw(batch, 3, 0, 8, rank=1) == pool.draw(batch, 3, 0, 8, rank=1)
    assert rollout_seed(0, 3, 0, 0) != rollout_seed(0, 3, 0, 1)
