"""lm-evaluation-harness on behemoth models: the shipped task definitions, the harness's CLI against a live
`behemoth serve` (no network), and the same tasks in-process through `behemoth eval --lm-eval`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest
import torch

from behemoth import build_model
from behemoth.checkpoint import save_model
from behemoth.cli import main
from behemoth.data.tasks import ALPHABET, check, distinct_problems
from behemoth.data.tokenizer import Tokenizer
from behemoth.eval import task_accuracy
from behemoth.eval.harness import EXPORT, TASKS_DIR, export_tasks

pytest.importorskip("lm_eval")
yaml = pytest.importorskip("yaml")

LIMIT = 40  # documents per task in the harness runs
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random model whose output layer is scaled up: peaked next-token distributions, so that greedy decoding
    has no near-ties that batch shapes could break differently in the server and in `behemoth eval`."""
    model = build_model("debug", seed=0)
    with torch.no_grad():
        model.output.weight.mul_(30)
    d = tmp_path_factory.mktemp("harness") / "model"
    save_model(model, d)
    Tokenizer.from_chars(ALPHABET).save(d / "tokenizer.json")
    return d


def task_yaml(name: str) -> dict:
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    return yaml.load((TASKS_DIR / f"{name}.yaml").read_text(), Loader=Loader)


def test_shipped_data_is_a_fresh_export(tmp_path):
    for path in export_tasks(tmp_path):
        assert path.read_bytes() == (TASKS_DIR / path.name).read_bytes(), path.name
    gen = [json.loads(line) for line in (TASKS_DIR / "behemoth_tasks_gen.jsonl").read_text().splitlines()]
    test = distinct_problems("test", EXPORT["problems"], seed=EXPORT["seed"], difficulty=EXPORT["difficulty"])
    assert [(r["prompt"], r["answer"]) for r in gen] == [(p.prompt, p.answer) for p in test]
    for line in (TASKS_DIR / "behemoth_tasks_mc.jsonl").read_text().splitlines():
        r = json.loads(line)
        right = next(p for p in test if p.key == r["key"])
        assert r["choices"][r["label"]] == right.solution and len(r["choices"]) == 4
        assert len({c.rsplit("####", 1)[1] for c in r["choices"]}) == 4  # four different answers


@pytest.mark.parametrize("generated, answer", [
    (" 4+9=13; 2+1+1=4; #### 43", "43"), (" #### 43", "43"), ("####43", "43"), (" #### 43  ", "43"),
    (" #### 4 3", "4 3"), (" #### 42", "43"), (" 43", "43"), (" ####", "43"), (" ####   ", "43"),
    (" #### 43 #### 44", "43"), ("", "43"), (" #### -7", "-7"), (" #### a,b", "a,b"),
])
def test_the_harness_grades_as_behemoth_does(generated, answer):
    """The generation task's filter and metric, as the harness applies them, against `data.tasks.check`."""
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter

    spec = task_yaml("behemoth_tasks_gen")
    regex = spec["filter_list"][0]["filter"][0]
    f = RegexFilter(regex["regex_pattern"], regex["group_select"], regex["fallback"])
    [[picked]] = f.apply([[generated]], [{}])
    harness = exact_match_hf_evaluate(predictions=[picked], references=[answer])["exact_match"]
    from behemoth.data.tasks import Problem

    assert bool(harness) == check(Problem("add", "Q:", "", answer), generated)


def test_the_harness_against_the_server_and_in_process(model_dir, tmp_path, capsys):
    from behemoth.inference.runner import Runner
    from behemoth.inference.server import make_server

    runner = Runner.load(model_dir)
    srv, engine = make_server(runner, port=0, model_name="tiny", quiet=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/v1/completions"
    try:  # the README's command
        proc = subprocess.run(
            [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args",
             f"base_url={url},model=tiny,tokenizer_backend=remote,max_retries=1", "--include_path", str(TASKS_DIR),
             "--tasks", "behemoth_tasks_gen,behemoth_tasks_mc", "--limit", str(LIMIT), "--output_path",
             str(tmp_path / "out"), "--log_samples"],
            env=os.environ | OFFLINE, capture_output=True, text=True, timeout=300)
    finally:
        srv.shutdown()
        srv.server_close()
        engine.close()
    assert proc.returncode == 0, proc.stderr[-3000:]
    samples = {name: [json.loads(line) for line in next((tmp_path / "out").rglob(f"samples_{name}_*.jsonl"))
                      .read_text().splitlines()] for name in ("behemoth_tasks_gen", "behemoth_tasks_mc")}
    gen = sorted(samples["behemoth_tasks_gen"], key=lambda s: s["doc_id"])
    assert len(gen) == LIMIT

    # generation: each answer equals `behemoth eval`'s, graded alike, so the accuracies are equal
    problems = distinct_problems("test", LIMIT, seed=0)
    ours = task_accuracy(runner.model, runner.tokenizer, problems, samples=LIMIT)
    assert [s["doc"]["prompt"] for s in gen] == [p.prompt for p in problems]
    assert [s["resps"][0][0] for s in gen] == [o["generated"] for o in ours["samples"]]
    assert [bool(s["exact_match"]) for s in gen] == [check(p, o["generated"]) for p, o in
                                                     zip(problems, ours["samples"], strict=True)]
    harness_acc = sum(s["exact_match"] for s in gen) / LIMIT
    assert harness_acc == ours["overall"]

    # multiple choice: each choice's log-likelihood is the forward pass's
    mc = sorted(samples["behemoth_tasks_mc"], key=lambda s: s["doc_id"])
    tok = runner.tokenizer
    for s in mc[:10]:
        for choice, resp in zip(s["doc"]["choices"], s["resps"], strict=True):
            ctx, whole = tok.encode(s["doc"]["prompt"]), tok.encode(s["doc"]["prompt"] + choice)
            with torch.no_grad():
                logp = runner.model(torch.tensor([whole])).float().log_softmax(-1)[0]
            ref = sum(float(logp[p - 1, whole[p]]) for p in range(len(ctx), len(whole)))
            assert float(resp[0][0]) == pytest.approx(ref, abs=1e-3)
    server_acc = sum(s["acc"] for s in mc) / LIMIT

    # in-process: `behemoth eval --lm-eval` gives the same scores
    out = tmp_path / "report.json"
    assert main(["eval", "--model", str(model_dir), "--problems", "7", "--lm-eval",
                 "behemoth_tasks_gen,behemoth_tasks_mc", "--lm-eval-limit", str(LIMIT), "--out", str(out)]) == 0
    report = json.loads(out.read_text())["lm_eval"]
    assert report["behemoth_tasks_gen"]["exact_match,final_answer"] == harness_acc
    assert report["behemoth_tasks_mc"]["acc,none"] == server_acc and report["behemoth_tasks_mc"]["n"] == LIMIT
    assert "lm-eval behemoth_tasks_mc (40 documents): acc,none" in capsys.readouterr().out


def test_unknown_harness_task_is_one_line(model_dir, capsys):
    assert main(["eval", "--model", str(model_dir), "--problems", "7", "--lm-eval", "no_such_task"]) == 2
    assert "unknown task(s) no_such_task" in capsys.readouterr().err


def test_generation_follows_the_tasks_sampling_settings(model_dir):
    """gen_kwargs as transformers reads them: greedy unless do_sample (or a temperature without it) asks for sampling;
    sampled continuations are seeded (the same twice) and differ from greedy ones; `until` cuts the text."""
    from behemoth.checkpoint.model_dir import load_model
    from behemoth.eval.harness_lm import BehemothLM

    lm = BehemothLM(load_model(model_dir), Tokenizer.load(model_dir), batch_size=4)
    greedy = lm._params({"max_gen_toks": 7, "until": ["\n"]})
    assert greedy.temperature == 0 and greedy.max_new_tokens == 7
    assert lm._params({"do_sample": False, "temperature": 0.8}).temperature == 0
    hot = lm._params({"do_sample": True, "temperature": 5.0, "top_p": 0.9, "max_gen_toks": 12})
    assert (hot.temperature, hot.top_p, hot.seed) == (5.0, 0.9, lm.seed)
    chunk = [("Q: 3+4=?\nA:", {"max_gen_toks": 12}), ("Q: 3+4=?\nA:", {"do_sample": True, "temperature": 5.0,
                                                                           "max_gen_toks": 12})]
    a, b = lm._generate(chunk), lm._generate(chunk)
    assert a == b and a[0] != a[1]

    class Req:
        def __init__(self, args):
            self.args = args

    text = lm._generate(chunk[:1])[0]
    stop = text[len(text) // 2]
    cut = lm.generate_until([Req((chunk[0][0], {"max_gen_toks": 12, "until": [stop]}))])[0]
    assert cut == text[:text.find(stop)]
