"""`torchrun --nproc-per-node 2 -m behemoth train|distill|codistill` (gloo, CPU) follows the one-process
run of the same command, its checkpoints resume at the other world size, and bad settings stop every rank
with one error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from behemoth.cli import main

RUN = ["--model.preset=debug", "--train.batch_size=4", "--data.seq_len=32", "--data.num_problems=500",
       "--log.every=1", "--log.eval_every=5", "--log.health_every=5", "--optim.warmup_steps=2",
       "--optim.schedule=constant", "--router.bias_update_rate=0.01", "--checkpoint.every=0", "--log.plots=false",
       "--log.tensorboard=false", "--train.device=cpu"]


def torchrun(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "behemoth",
           *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def records(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


def assert_same_curve(got: Path, want: Path, steps: int) -> None:
    """Every step's loss within 1e-5 relative, grad norm within 1e-4, and every validation loss of `want`."""
    a, b = records(got, "train"), records(want, "train")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, steps + 1))
    for x, y in zip(a, b, strict=True):
        assert abs(x["loss"] - y["loss"]) <= 1e-5 * abs(y["loss"]), (x["step"], x["loss"], y["loss"])
        assert abs(x["grad_norm"] - y["grad_norm"]) <= 1e-4 * y["grad_norm"], (x["step"], x, y)
        assert x["tokens"] == y["tokens"]
    ea = {r["step"]: r["val_loss"] for r in records(got, "eval")}  # a resumed run also evaluates where it stopped
    eb = {r["step"]: r["val_loss"] for r in records(want, "eval")}
    assert eb and eb.keys() <= ea.keys()
    for step, loss in eb.items():
        assert abs(ea[step] - loss) <= 1e-5 * loss, (step, ea[step], loss)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The one-process run: 20 steps of mini training (its checkpoint is also the distillation teacher)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    assert main(["train", *RUN, "--train.steps=20", f"--train.out_dir={out}"]) == 0
    assert records(out, "train")[-1]["loss"] < records(out, "train")[0]["loss"] - 0.4  # it learns
    return out


def test_two_processes_follow_one_and_resume_across_world_sizes(tmp_path, reference, capsys):
    """EP=2 + FSDP on 2 processes for steps 1-8 (a distributed checkpoint), one process resumes it for 9-14
    (a one-process checkpoint, which rank 0 reads and sends), FSDP without EP on 2 processes resumes that for
    15-17, EP=2 resumes that (every rank reading its shards) for 18-20: the 20 losses, grad norms and
    validation losses are the uninterrupted one-process run's."""
    run = tmp_path / "run"
    r = torchrun("train", *RUN, "--train.steps=8", f"--train.out_dir={run}", "--parallel.ep=2")
    assert "2 processes (parallel.ep=2" in r.stdout and r.stdout.count("done: 8 steps") == 1  # rank 0 speaks
    step8 = run / "checkpoints" / "step_0000008"
    assert (step8 / "model.dcp").is_dir() and (step8 / "optim.dcp").is_dir()
    assert main(["train", *RUN, "--train.steps=14", f"--train.out_dir={run}", "--resume"]) == 0
    assert "resuming from" in capsys.readouterr().out
    assert (run / "checkpoints" / "step_0000014" / "model.safetensors").is_file()
    torchrun("train", *RUN, "--train.steps=17", f"--train.out_dir={run}", "--resume")
    torchrun("train", *RUN, "--train.steps=20", f"--train.out_dir={run}", "--resume", "--parallel.ep=2")
    assert_same_curve(run, reference, 20)
    # routing stability, probed by every rank through FSDP and EP and reported by rank 0: the same margins
    margins = {r["step"]: [x["margin"] for x in r["layers"]] for r in records(run, "routing")}
    for r in records(reference, "routing"):
        assert margins[r["step"]] == pytest.approx([x["margin"] for x in r["layers"]], abs=1e-4), r["step"]

    # the distributed checkpoint is a model directory: load_model and convert read it in one process
    import torch

    import behemoth

    a = behemoth.load_model(str(run / "checkpoints" / "step_0000020")).state_dict()
    b = behemoth.load_model(str(reference / "checkpoints" / "step_0000020")).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-4, msg=k)
    step17 = run / "checkpoints" / "step_0000017"  # written by FSDP alone
    assert (step17 / "model.dcp").is_dir()
    assert main(["convert", "native-to-hf", str(step17), str(tmp_path / "hf"), "--drop-router-bias"]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "llama4_text"

    # a damaged distributed checkpoint is one error naming it; it stays where it is
    step20 = run / "checkpoints" / "step_0000020"
    (step20 / "optim.dcp" / ".metadata").write_text("garbage")
    capsys.readouterr()
    assert main(["train", *RUN, "--train.steps=22", f"--train.out_dir={run}", "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{step20 / 'optim.dcp' / '.metadata'}: not a readable DCP metadata file" in err
    assert (step20 / "model.dcp").is_dir() and (run / "checkpoints" / "latest").read_text() == step20.name


def test_distill_and_codistill_on_two_processes_follow_one(tmp_path, reference):
    """Online distillation (the teacher sharded with EP=2 like the student; activation checkpointing),
    offline from a teacher cache, and codistillation under HSDP (parallel.dp_shard=1: replicated over both
    ranks; 2 micro-batches per step) match one process."""
    teacher = reference / "checkpoints" / "step_0000020"
    assert main(["distill-cache", "--teacher", str(teacher), "--out", str(tmp_path / "cache"), "--top-k", "16",
                 "--data.seq_len=32", "--data.num_problems=500", "--device=cpu"]) == 0
    runs = {"distill": ["distill", f"--distill.teacher={teacher}", "--train.activation_checkpointing=true"],
            "cached": ["distill", f"--distill.cache={tmp_path / 'cache'}"],
            "codistill": ["codistill", "--distill.teacher_preset=debug", "--train.grad_accum=2"]}
    parallel = {"distill": ["--parallel.ep=2"], "cached": ["--parallel.ep=2"], "codistill": ["--parallel.dp_shard=1"]}
    for name, args in runs.items():
        one, two = tmp_path / f"{name}1", tmp_path / f"{name}2"
        assert main([*args, *RUN, "--train.steps=10", f"--train.out_dir={one}"]) == 0
        torchrun(*args, *RUN, "--train.steps=10", f"--train.out_dir={two}", *parallel[name])
        assert_same_curve(two, one, 10)
        kd_one, kd_two = (records(p, "train")[-1]["kd_loss"] for p in (one, two))
        assert abs(kd_one - kd_two) <= 1e-4 * kd_one
    assert (tmp_path / "codistill2" / "checkpoints" / "step_0000010" / "teacher" / "model.dcp").is_dir()


@pytest.mark.parametrize("tokenizer", ["own", "teacher"], ids=["across-tokenizers", "same-tokenizer"])
def test_distill_from_a_transformers_teacher_on_two_processes_follows_one(tmp_path, tokenizer):
    """A Qwen 2 teacher (transformers) sharded with FSDP2 by its decoder layers, distilled on 2 processes into a
    character-tokenizer student, follows one process: with its own byte-level BPE (across tokenizers, its rows
    through `hidden_rows`), and with the student's tokenizer (the packed rows through `hidden_states`)."""
    pytest.importorskip("transformers")
    from foreign_models import bpe_tokenizer, char_tokenizer, save_teacher

    tok = bpe_tokenizer() if tokenizer == "own" else char_tokenizer()
    teacher = save_teacher(tmp_path / "qwen2", "qwen2", tok)
    args = ["distill", *RUN, "--train.steps=6", f"--distill.teacher={teacher}", f"--distill.tokenizer={tokenizer}"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*args, f"--train.out_dir={one}"]) == 0
    r = torchrun(*args, f"--train.out_dir={two}")
    assert "teacher: qwen2 sharded with FSDP2 over 2 processes, one unit per decoder layer (2)" in r.stdout
    assert_same_curve(two, one, 6)
    a, b = records(two, "train")[-1], records(one, "train")[-1]
    assert abs(a["kd_loss"] - b["kd_loss"]) <= 1e-4 * b["kd_loss"] and a.get("kd_aligned") == b.get("kd_aligned")
    assert ("kd_aligned" in b) == (tokenizer == "own")


def test_image_text_training_on_two_processes_follows_one(tmp_path):
    """Image-text rows label different numbers of tokens, so the ranks hold unequal shares of the batch's
    loss: normalised by the whole batch's count (and each rank decoding only its rows' pictures), 2 processes
    under EP=2 still follow one process."""
    args = ["--model.preset=mini-maverick-vl", "--data.images=true", "--data.seq_len=96", "--data.num_problems=200",
            "--train.steps=6", "--log.eval_every=3"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", *RUN, *args, f"--train.out_dir={one}"]) == 0
    torchrun("train", *RUN, *args, f"--train.out_dir={two}", "--parallel.ep=2")
    assert_same_curve(two, one, 6)
    seen = [0] + [r["tokens"] for r in records(one, "train")]  # labelled tokens so far
    assert len({b - a for a, b in zip(seen, seen[1:], strict=False)}) > 1  # steps label different numbers


def test_bad_settings_stop_every_rank_with_one_error(tmp_path):
    """A setting that does not fit the launch is reported once (by rank 0) and every rank exits non-zero;
    a failure on rank 0 while the others wait for it (missing data) stops them too; nothing is written."""
    run = tmp_path / "run"
    r = torchrun("train", *RUN, "--train.steps=2", f"--train.out_dir={run}", "--parallel.ep=3", check=False)
    assert r.returncode != 0 and r.stderr.count("parallel.ep=3: must divide the number of processes (2)") == 1
    r = torchrun("train", *RUN, "--train.steps=2", f"--train.out_dir={run}", "--train.batch_size=3", check=False)
    assert r.returncode != 0 and r.stderr.count("train.batch_size=3: must be divisible") == 1
    r = torchrun("train", *RUN, "--train.steps=2", f"--train.out_dir={run}", f"--data.path={tmp_path / 'no.txt'}",
                 check=False)
    assert r.returncode != 0 and "no.txt" in r.stderr
    assert not run.exists()


def test_expert_parallelism_without_torchrun_is_an_error(tmp_path, capsys):
    assert main(["train", *RUN, "--train.steps=2", f"--train.out_dir={tmp_path}/run", "--parallel.ep=2"]) == 2
    assert "parallel.ep=2: expert parallelism needs 2 processes" in capsys.readouterr().err
