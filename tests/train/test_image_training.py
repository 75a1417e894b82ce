"""Training and distillation on image-text data (`data.images`): the vision tower learns, runs resume
exactly, the teacher sees the pictures, JSONL data trains a BPE with image tokens, and misuse is a
one-line error."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from PIL import Image

import behemoth
from behemoth.checkpoint.locate import latest_checkpoint
from behemoth.cli import main
from behemoth.config import PRESETS
from behemoth.data.images import PATCH
from behemoth.data.tokenizer import Tokenizer
from behemoth.model import Transformer
from behemoth.train.config import build_config
from behemoth.train.run import run_training
from behemoth.train.trainer import Interrupted

BASE = {"train.steps": 6, "train.batch_size": 4, "data.seq_len": 96, "data.images": True,
        "data.num_problems": 60, "data.max_tiles": 1, "log.every": 1, "log.health_every": 2, "log.eval_every": 3,
        "log.eval_batches": 1, "checkpoint.every": 3, "log.tensorboard": False, "log.plots": False}


@pytest.fixture(scope="module")
def vl_config(tmp_path_factory):
    """The debug model with a small vision tower: 64-pixel tiles of 16-pixel patches, 4 tokens per tile."""
    cfg = PRESETS["debug"].replace(
        image_token_id=3, vision={"dim": 32, "n_layers": 1, "n_heads": 2, "ffn_dim": 128, "image_size": 64,
                                  "patch_size": 16, "adapter_dim": 32})
    path = tmp_path_factory.mktemp("vl") / "config.json"
    path.write_text(json.dumps({"format": "behemoth", "model": cfg.to_dict()}))
    return path


def cfg_for(run_dir, config_file, **over):
    args = {**BASE, "model.config_file": str(config_file), "train.out_dir": str(run_dir), **over}
    return build_config(None, [f"--{k}={v}" for k, v in args.items()])


def weights(run_dir, sub=""):
    return behemoth.load_model(str(latest_checkpoint(run_dir) / sub)).state_dict()


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, vl_config):
    run_dir = tmp_path_factory.mktemp("ref")
    lines: list[str] = []
    summary = run_training(cfg_for(run_dir, vl_config), say=lines.append)
    return run_dir, summary, lines


def test_trains_the_vision_tower_on_the_visual_tasks(reference_run, vl_config):
    run_dir, summary, lines = reference_run
    assert summary["step"] == 6 and summary["nonfinite_steps"] == 0
    assert any("built-in visual tasks" in s for s in lines)
    tok = Tokenizer.load(latest_checkpoint(run_dir))
    model = behemoth.load_model(str(latest_checkpoint(run_dir)))
    assert model.config.image_token_id == tok.token_to_id(PATCH)  # adopted from the tokenizer
    fresh = behemoth.build_model(model.config, seed=0).state_dict()
    trained = model.state_dict()
    for name in ("vision_embeddings.vision_encoder.conv1._linear.weight", "vision_projection.weight",
                 "vision_embeddings.vision_adapter.mlp.c_fc.weight"):
        assert not torch.equal(trained[name], fresh[name]), name  # the picture's gradient reached it
    evals = [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals if r["type"] == "eval"] == [3, 6]


def test_every_vision_parameter_gets_a_gradient_and_the_loss_depends_on_the_picture(vl_config):
    from behemoth.config_io import load_config_file
    from behemoth.data.image_text import ImageTextData, visual_task_examples
    from behemoth.data.images import IMAGE_SPECIAL_TOKENS
    from behemoth.data.tasks import ALPHABET
    from behemoth.data.vision_tasks import make_visual_problems
    from behemoth.train.config import RouterSection
    from behemoth.train.steps import PretrainStep

    tok = Tokenizer.from_chars(ALPHABET, IMAGE_SPECIAL_TOKENS)
    cfg = load_config_file(vl_config).replace(image_token_id=tok.token_to_id(PATCH))
    model = behemoth.build_model(cfg, seed=0)
    examples = visual_task_examples(make_visual_problems("train", 4, seed=0))
    data = ImageTextData(examples, tok, cfg.vision, 96, max_tiles=1)
    batch = data.batch(range(4))
    PretrainStep(model, RouterSection(z_loss_coef=0.0)).forward_backward(batch, 1.0)
    vision = {n: p for n, p in model.named_parameters() if n.startswith("vision_")}
    assert vision and all(p.grad is not None and p.grad.abs().sum() > 0 for p in vision.values())
    with torch.no_grad():
        a = model(batch.input_ids, **batch.model_inputs)
        batch.pixel_values = batch.pixel_values.flip(0)  # the pictures swapped between rows
        b = model(batch.input_ids, **batch.model_inputs)
    assert (a - b).abs().max() > 1e-4


def test_resume_after_signal_is_bitwise_identical(reference_run, vl_config, tmp_path):
    def say(line):
        if "step 4/6" in line:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Interrupted):
        run_training(cfg_for(tmp_path, vl_config), say=say)
    run_training(cfg_for(tmp_path, vl_config), resume=True, say=lambda s: None)
    a, b = weights(tmp_path), weights(reference_run[0])
    assert all(torch.equal(a[k], b[k]) for k in a)
    routing = [[r for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if r["type"] == "routing"]
               for d in (tmp_path, reference_run[0])]
    assert routing[0] == routing[1] and routing[0][-1]["layers"][0]["flip_rate"] is not None  # probed with pictures


def test_distill_online_gives_the_teacher_the_pictures(reference_run, vl_config, tmp_path, monkeypatch):
    seen = []
    real = Transformer.hidden_states

    def spy(self, input_ids, *a, pixel_values=None, **k):
        if not self.training:  # the teacher (the student trains)
            seen.append(None if pixel_values is None else pixel_values.shape[0])
        return real(self, input_ids, *a, pixel_values=pixel_values, **k)

    monkeypatch.setattr(Transformer, "hidden_states", spy)
    teacher = latest_checkpoint(reference_run[0])
    cfg = cfg_for(tmp_path, vl_config, **{"distill.teacher": str(teacher), "train.steps": 2, "log.eval_every": 0})
    run_training(cfg, say=lambda s: None, mode="distill")
    assert seen[:2] == [4, 4]  # one tile per picture, four pictures per batch
    rec = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all("kd_loss" in r for r in rec if r["type"] == "train")


def test_codistill_teacher_must_cut_pictures_alike(vl_config, tmp_path):
    cfg = cfg_for(tmp_path, vl_config, **{"distill.teacher_preset": "mini-maverick-vl", "train.steps": 2,
                                         "data.seq_len": 128, "log.eval_every": 0, "checkpoint.every": 0})
    with pytest.raises(ValueError, match="64-pixel tiles into 16 tokens.*must match"):
        run_training(cfg, say=lambda s: None, mode="codistill")


def test_jsonl_data_with_a_trained_bpe(tmp_path, vl_config):
    rows = []
    for i, (name, colour) in enumerate([("red", (220, 20, 20)), ("green", (20, 200, 20)), ("blue", (20, 20, 220))] * 4):
        Image.new("RGB", (48 + 8 * i, 64), colour).save(tmp_path / f"{i}.png")
        rows.append({"picture": f"{i}.png", "caption": f" The square is {name}.", "question": "Colour?"})
    data = tmp_path / "pics.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    code = main(["train", f"--model.config_file={vl_config}", f"--data.path={data}", "--data.images=true",
                 "--data.image_field=picture", "--data.field=caption", "--data.prompt_field=question",
                 "--data.val_fraction=0.25", "--data.tokenizer_vocab_size=300", "--model.vocab_size=320",
                 "--data.seq_len=64", "--train.steps=2", "--train.batch_size=2", "--log.eval_every=0",
                 "--log.tensorboard=false", "--log.plots=false", f"--train.out_dir={out}"])
    assert code == 0
    tok = Tokenizer.load(latest_checkpoint(out))
    assert tok.token_to_id(PATCH) is not None and tok.vocab_size > 259  # a BPE with merges, plus image tokens
    assert tok.decode(tok.encode(" The square is red.")) == " The square is red."
    assert behemoth.load_model(str(latest_checkpoint(out))).config.image_token_id == tok.token_to_id(PATCH)


@pytest.mark.parametrize("mode, over, match", [
    ("train", {"model.config_file": None, "model.preset": "debug"}, "data.images needs a model with a vision tower"),
    ("distill", {"distill.cache": "somewhere"}, "distill.cache does not hold image-text data"),
    ("train", {"data.max_tiles": 0}, "data.max_tiles"),
    ("train", {"data.seq_len": 16}, "needs .* tokens with its images"),
    ("train", {"model.vocab_size": 40}, "the tokenizer has 60 tokens but the model's vocabulary holds 40"),
])
def test_misuse_is_a_one_line_error(tmp_path, vl_config, capsys, mode, over, match):
    args = {**BASE, "model.config_file": str(vl_config), "train.out_dir": str(tmp_path / "r"), **over}
    code = main([mode, *(f"--{k}={v}" for k, v in args.items() if v is not None)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert __import__("re").search(match, err), err
    assert not (tmp_path / "r" / "checkpoints").exists()
