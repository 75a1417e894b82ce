"""Model cards: written by every training run beside each model, updated by `behemoth eval --card`, carried over
by `convert`; their front matter is Hugging Face's (YAML), their fingerprints identify what they name."""

from __future__ import annotations

import json

import pytest

from behemoth.checkpoint.locate import latest_checkpoint
from behemoth.checkpoint.model_card import (
    CARD,
    RESULTS_BEGIN,
    RESULTS_END,
    carry_card,
    model_fingerprint,
    read_card,
    update_results,
)
from behemoth.cli import main
from behemoth.config import PRESETS
from behemoth.train.config import build_config
from behemoth.train.run import run_training

yaml = pytest.importorskip("yaml")

BASE = {"model.preset": "debug", "train.steps": 4, "train.batch_size": 4, "data.seq_len": 32,
        "data.num_problems": 300, "log.every": 1, "log.health_every": 2, "log.eval_every": 2,
        "checkpoint.every": 2, "log.tensorboard": False, "log.plots": False}


def cfg_for(run_dir, **over):
    return build_config(None, [f"--{k}={v}" for k, v in {**BASE, "train.out_dir": str(run_dir), **over}.items()])


def front(directory) -> dict:
    text = (directory / CARD).read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A pretrained teacher, a student distilled from it, and a codistillation run (student + teacher)."""
    root = tmp_path_factory.mktemp("cards")
    run_training(cfg_for(root / "teacher"), say=lambda s: None)
    teacher = latest_checkpoint(root / "teacher")
    student = PRESETS["debug"].replace(dim=32, head_dim=8, moe={"num_experts": 8, "expert_dim": 16})
    (root / "student.json").write_text(json.dumps({"format": "behemoth", "model": student.to_dict()}))
    run_training(cfg_for(root / "distilled", **{"distill.teacher": str(teacher),
                                                "model.config_file": str(root / "student.json")}),
                 say=lambda s: None, mode="distill")
    run_training(cfg_for(root / "co", **{"model.config_file": str(root / "student.json"),
                                         "distill.teacher_preset": "debug"}), say=lambda s: None, mode="codistill")
    return {"teacher": teacher, "distilled": latest_checkpoint(root / "distilled"),
            "co": latest_checkpoint(root / "co")}


def test_every_trained_model_has_a_card(runs):
    teacher, distilled, co = runs["teacher"], runs["distilled"], runs["co"]
    for d in (teacher, distilled, co, co / "teacher"):
        meta = front(d)
        assert meta["library_name"] == "behemoth" and meta["pipeline_tag"] == "text-generation"
        text = (d / CARD).read_text()
        cfg = json.loads((d / "config.json").read_text())["model"]
        for needle in ("## Architecture", "## Tokenizer", "## Training data", "## Training", "## Recipe",
                       "## Hardware and versions", "tokens seen", "wall time", "torch", json.dumps(cfg["dim"])):
            assert needle in text, (d, needle)
        assert f"{json.loads((d / 'meta.json').read_text())['total_params']:,} parameters" in text
    t = (teacher / CARD).read_text()
    assert "trained from scratch" in t and "## Teacher" not in t and "steps | 4 of 4" in t
    # the held-out loss of the last evaluation, in the results and the model-index
    loss = [json.loads(line) for line in (teacher.parent.parent / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["type"] == "eval"][-1]["val_loss"]
    assert front(teacher)["model-index"][0]["results"][0]["metrics"][0]["value"] == pytest.approx(loss)
    d = (distilled / CARD).read_text()
    assert "distilled from a frozen teacher" in d and "## Teacher" in d
    assert model_fingerprint(teacher)["sha256"] in d and str(teacher) in d  # which teacher, and its fingerprint
    assert "distillation" in front(distilled)["tags"]
    c = (co / CARD).read_text()
    assert "trained in the same run" in c and "teacher of a codistillation run" in (co / "teacher" / CARD).read_text()


def test_fingerprints_follow_the_weights(runs, tmp_path, monkeypatch):
    import shutil

    from behemoth.checkpoint import model_card

    copy = tmp_path / "copy"
    shutil.copytree(runs["teacher"], copy)
    assert model_fingerprint(copy) == model_fingerprint(runs["teacher"])
    weights = next(copy.glob("*.safetensors"))
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 1  # one bit of the last tensor
    weights.write_bytes(bytes(raw))
    assert model_fingerprint(copy)["sha256"] != model_fingerprint(runs["teacher"])["sha256"]
    monkeypatch.setattr(model_card, "HASH_LIMIT", 0)  # a big model: config and headers only, said so
    big = model_fingerprint(copy)
    assert big["kind"] == "config and safetensors headers" and big == model_fingerprint(runs["teacher"])


def test_results_are_replaced_and_the_rest_kept(runs, tmp_path):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(runs["teacher"], d)
    before = (d / CARD).read_text()
    results = [{"metric": "exact match", "value": 0.25, "interval": [0.1, 0.4], "n": 40, "dataset": "tasks",
                "source": "test"}]
    for _ in range(2):  # idempotent
        assert update_results(d, results) == d / CARD
    after = (d / CARD).read_text()
    assert after.count(RESULTS_BEGIN) == 1 and after.count(RESULTS_END) == 1
    assert "| exact match | tasks | 0.2500 | [0.1000, 0.4000] | 40 | test |" in after
    assert before.split(RESULTS_BEGIN)[0].split("---\n", 2)[2] == after.split(RESULTS_BEGIN)[0].split("---\n", 2)[2]
    index = front(d)["model-index"][0]["results"]
    assert [r["metrics"][0]["value"] for r in index] == [0.25]
    assert update_results(tmp_path, results) is None  # no card: nothing written
    assert not (tmp_path / CARD).exists()


def test_eval_card_and_convert_carry_it(runs, tmp_path, capsys):
    import shutil

    pytest.importorskip("transformers")
    d = tmp_path / "m"
    shutil.copytree(runs["teacher"], d)
    assert main(["eval", "--model", str(d), "--problems", "7", "--card"]) == 0
    assert f"updated the results of {d / CARD}" in capsys.readouterr().out
    text = (d / CARD).read_text()
    assert "| exact match |" in text and "| exact match (add) |" in text and "bits per byte" in text
    assert "behemoth eval" in text
    hf = tmp_path / "hf"
    assert main(["convert", "native-to-hf", str(d), str(hf), "--drop-router-bias"]) == 0
    meta, carried = read_card(hf)
    assert meta["library_name"] == "transformers" and front(hf)["library_name"] == "transformers"
    assert carried.split("---\n", 2)[2] == text.split("---\n", 2)[2]  # the body as it was
    assert meta["model-index"] == front(d)["model-index"]
    assert carry_card(tmp_path / "nothing", tmp_path, "behemoth") is None


def test_a_results_row_keeps_its_columns():
    from behemoth.checkpoint.model_card import results_section

    row = results_section([{"metric": "KL(teacher || model)", "value": 0.1, "dataset": "a|b", "n": 3,
                            "source": "x"}], "m").splitlines()[5]
    assert row.replace("\\|", "").count("|") == 7 and "KL(teacher \\|\\| model)" in row


def test_a_corpus_run_names_its_corpus_and_fingerprint(tmp_path):
    from behemoth.data.corpus import corpus_fingerprint

    corpus = tmp_path / "notes.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"note {i} on foxes, dogs and the cats of house {i}"}) + "\n"
                              for i in range(300)))
    run_training(cfg_for(tmp_path / "run", **{"data.path": str(corpus), "data.cache_dir": str(tmp_path / "cache"),
                                             "data.tokenizer_vocab_size": 300, "log.eval_every": 0}),
                 say=lambda s: None)
    text = (latest_checkpoint(tmp_path / "run") / CARD).read_text()
    assert f"| fingerprint | corpus sha256 {corpus_fingerprint(corpus)} |" in text and "| name | notes.jsonl |" in text
    assert front(latest_checkpoint(tmp_path / "run"))["datasets"] == ["notes.jsonl"]


def test_an_ordinary_hugging_face_card_keeps_its_front_matter(tmp_path):
    """A card this project did not write (YAML lists in its front matter): the results section is added, the front
    matter left as it was, and it still parses."""
    card = "---\nlicense: apache-2.0\ntags:\n- llama\n- text-generation\n---\n# A model\n\nSome words.\n"
    (tmp_path / CARD).write_text(card)
    update_results(tmp_path, [{"metric": "exact match", "value": 0.5, "dataset": "tasks", "source": "test"}])
    text = (tmp_path / CARD).read_text()
    assert text.startswith(card.split("# A model")[0]) and "| exact match | tasks | 0.5000 |" in text
    assert yaml.safe_load(text.split("---\n")[1]) == {"license": "apache-2.0", "tags": ["llama", "text-generation"]}
    out = tmp_path / "copy"
    out.mkdir()
    carry_card(tmp_path, out, "transformers")
    assert (out / CARD).read_text() == text
    assert model_fingerprint(out)["sha256"] is None  # no weights, no fingerprint
