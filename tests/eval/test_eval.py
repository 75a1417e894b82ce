"""`behemoth eval`: the report on a small model, against itself as teacher and against a checker."""

from __future__ import annotations

import json

import pytest
import torch

from behemoth import build_model
from behemoth.checkpoint import save_model
from behemoth.cli import main
from behemoth.data.tasks import ALPHABET, Problem
from behemoth.data.tokenizer import Tokenizer
from behemoth.eval import evaluate_model, task_accuracy


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("m") / "model"
    save_model(build_model("debug"), d)
    Tokenizer.from_chars(ALPHABET).save(d / "tokenizer.json")
    return d


def test_report(model_dir, tmp_path, capsys):
    report = evaluate_model(str(model_dir), teacher_dir=str(model_dir), problems=8, max_new_tokens=8)
    assert report["heldout"]["tokens"] > 0 and report["heldout"]["ppl"] == pytest.approx(
        torch.tensor(report["heldout"]["loss"]).exp().item(), rel=1e-5)
    assert report["teacher_kl"]["kl"] == pytest.approx(0.0, abs=1e-6)  # itself as teacher
    assert report["tasks"]["n"] == 8 and 0.0 <= report["tasks"]["overall"] <= 1.0
    out = tmp_path / "r.json"
    assert main(["eval", "--model", str(model_dir), "--problems", "4", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["tasks"]["n"] == 4
    assert "exact match" in capsys.readouterr().out


class Echo(torch.nn.Module):
    """A 'model' that always continues with a fixed text: exact match is then known in advance."""

    def __init__(self, tok: Tokenizer, text: str):
        super().__init__()
        self.tok, self.ids = tok, tok.encode(text)

    def forward(self, ids_BS):
        B, S = ids_BS.shape
        logits = torch.zeros(B, S, self.tok.vocab_size)
        step = S - self.prompt_len
        logits[:, -1, self.ids[min(step, len(self.ids) - 1)]] = 1.0
        return logits


def test_task_accuracy_exact_match():
    tok = Tokenizer.from_chars(ALPHABET)
    problems = [Problem("add", "Q: 1+2=?\nA:", " 1+2=3; #### 3\n", "3"),
                Problem("add", "Q: 2+2=?\nA:", " 2+2=4; #### 4\n", "4")]
    model = Echo(tok, " #### 3\n")
    model.prompt_len = len(tok.encode(problems[0].prompt))
    r = task_accuracy(model, tok, problems)
    assert r["overall"] == 0.5 and r["samples"][0]["generated"] == " #### 3"


def test_teacher_with_other_tokenizer_is_refused(model_dir, tmp_path):
    other = tmp_path / "other"
    save_model(build_model("debug"), other)
    Tokenizer.from_chars("abc").save(other / "tokenizer.json")
    with pytest.raises(ValueError, match="tokenizer differs"):
        evaluate_model(str(model_dir), teacher_dir=str(other), problems=2, max_new_tokens=2)
