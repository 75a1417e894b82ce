"""The README's commands work as written: every command line and Python block in its code blocks is run here
at tiny sizes (in a scratch directory, placeholders such as TEACHER_DIR filled in, a few size settings
appended), or names the test that covers it. A README line that stops working, or a new one that no test
covers, fails CI."""

from __future__ import annotations

import io
import json
import re
import shlex
import sys
from pathlib import Path

import pytest
from PIL import Image

import behemoth
from behemoth.checkpoint import export_hf, latest_checkpoint, save_model
from behemoth.cli import main
from behemoth.config import PRESETS
from behemoth.data.images import IMAGE_SPECIAL_TOKENS, PATCH
from behemoth.data.tokenizer import Tokenizer
from behemoth.inference.chat import LLAMA4_SPECIALS

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CLI_DIST = "tests/parallel/test_cli_distributed.py"
# README commands that cannot run inside this test (a server that runs until stopped, several processes,
# several machines, the Makefile targets), and the test that runs what they run
COVERED_ELSEWHERE = {
    "make demo": "tests/test_readme.py::test_the_two_commands_are_the_makefiles_and_ci",
    "make test": "tests/test_readme.py::test_the_two_commands_are_the_makefiles_and_ci",
    ".venv/bin/torchrun --nproc-per-node 2 -m behemoth train --parallel.ep=2":
        f"{CLI_DIST}::test_two_processes_follow_one_and_resume_across_world_sizes",
    ".venv/bin/torchrun --nproc-per-node 8 -m behemoth train --config run.toml --parallel.ep=8":
        f"{CLI_DIST}::test_two_processes_follow_one_and_resume_across_world_sizes",
    ".venv/bin/torchrun --nproc-per-node 2 -m behemoth distill --distill.teacher=runs/teacher/checkpoints/step_0002000"
    " --model.preset=mini-maverick --parallel.ep=2 --train.out_dir=runs/student":
        f"{CLI_DIST}::test_distill_and_codistill_on_two_processes_follow_one",
    "torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint NODE0:29500 --rdzv-id run42 -m behemoth"
    " train --config run.toml --parallel.ep=8 --train.out_dir=/shared/runs/run42":
        f"{CLI_DIST}::test_two_processes_follow_one_and_resume_across_world_sizes",
    ".venv/bin/behemoth serve --model HF_DIR --port 8000":
        "tests/inference/test_server.py::test_serve_command_on_a_transformers_directory",
    "python: from openai import OpenAI": "tests/inference/test_server.py::test_completion_and_chat",
    ".venv/bin/behemoth serve --model out/demo/teacher --name teacher --port 8000 &":
        "tests/eval/test_harness.py::test_the_harness_against_the_server_and_in_process",
    ".venv/bin/lm_eval --model local-completions --include_path src/behemoth/eval/harness_tasks --model_args"
    " base_url=http://127.0.0.1:8000/v1/completions,model=teacher,tokenizer_backend=remote"
    " --tasks behemoth_tasks_gen,behemoth_tasks_mc":
        "tests/eval/test_harness.py::test_the_harness_against_the_server_and_in_process",
}
TRAINING = ("train", "distill", "codistill")
TINY_RUN = ["--train.steps=2", "--train.batch_size=2", "--data.num_problems=40", "--log.every=1",
            "--log.eval_every=0", "--log.plots=false", "--log.tensorboard=false", "--checkpoint.every=0"]
TINY_TEXT = ["--data.seq_len=32"]  # image-text rows keep their length (a picture's tokens and the question)


def readme_commands() -> list[str]:
    """Each command line of the README's code blocks (continuations joined, comments dropped), and each
    Python block as "python: <its first line>\\n<the block>"."""
    commands, block, lang = [], None, ""
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            if block is None:
                block, lang = [], line[3:].strip()
                continue
            if lang == "python":
                commands.append(f"python: {block[0]}\n" + "\n".join(block))
            else:
                commands += _shell_lines(block)
            block = None
        elif block is not None:
            block.append(line)
    return commands


def _shell_lines(lines: list[str]) -> list[str]:
    out, pending = [], ""
    for line in lines:
        code = _strip_comment(line)
        if code.endswith("\\"):
            pending += code[:-1].strip() + " "
            continue
        code = (pending + code).strip()
        pending = ""
        if code:
            out.append(" ".join(code.split()))
    return out


def _strip_comment(line: str) -> str:
    """The line without a trailing `# comment` (a # inside quotes is text)."""
    quote = None
    for i, ch in enumerate(line):
        if ch in "'\"" and quote in (None, ch):
            quote = None if quote else ch
        elif ch == "#" and quote is None and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def _argv(command: str) -> list[str]:
    """shell words of a README command; bash's $'...' strings decoded (the prompts with newlines)."""
    command = re.sub(r"\$'((?:[^'\\]|\\.)*)'", lambda m: shlex.quote(m.group(1).encode().decode("unicode_escape")),
                     command)
    return shlex.split(command)


def test_every_readme_command_is_run_here_or_covered_by_a_named_test():
    commands = readme_commands()
    assert len(commands) > 30
    for key, where in COVERED_ELSEWHERE.items():
        assert any(c == key or c.startswith(key + "\n") for c in commands), f"stale entry, not in the README: {key}"
        file, name = where.split("::")
        assert re.search(rf"^def {name}\(", (ROOT / file).read_text(), re.M), f"{where}: no such test"
    for c in commands:
        first = c.split("\n")[0]
        covered = c in COVERED_ELSEWHERE or first in COVERED_ELSEWHERE
        runnable = first.startswith((".venv/bin/behemoth ", "python: "))
        assert covered or runnable, f"README command neither run by test_readme_commands nor covered: {c}"


def test_the_two_commands_are_the_makefiles_and_ci():
    """`make demo` sets up, then runs the demo with arguments the CLI takes (the demo itself: tests/test_demo.py);
    `make test` is what CI runs."""
    makefile = (ROOT / "Makefile").read_text()
    demo = re.search(r"^demo: setup\n\t\$\(BIN\)/behemoth (.+)$", makefile, re.M)
    assert demo and re.search(r'^test: setup-dev\n\t\$\(BIN\)/python -m pytest -q -m "not slow and not gpu"$',
                              makefile, re.M)
    assert re.search(r"^\$\(VENV\)/.installed-dev: \$\(VENV\)/.installed$", makefile, re.M)  # dev tools on top
    from behemoth.cli import build_parser

    args = build_parser().parse_args(demo.group(1).split())
    assert args.command == "demo" and args.force and args.out == "out/demo"
    assert "make test" in (ROOT / ".ci" / "run").read_text()


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A directory with what the README's commands name: a corpus, a TOML file, pictures, config files, a
    model directory, a transformers directory of a small vision model, and trained teachers."""
    home = tmp_path_factory.mktemp("readme")
    words = "the teacher writes and the student reads every line of the book twice".split()
    docs = [" ".join(words[(i + j) % len(words)] for j in range(12 + i % 7)) for i in range(60)]
    (home / "corpus").mkdir()
    for part in (0, 1):
        (home / "corpus" / f"part{part}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n"
                                                                   for d in docs[part::2]))
    (home / "corpus.txt").write_text("\n".join(docs))
    (home / "run.toml").write_text('[train]\nout_dir = "runs/toml"\nsteps = 2\nbatch_size = 2\n[data]\n'
                                   'num_problems = 40\nseq_len = 32\n[log]\neval_every = 0\nplots = false\n'
                                   'tensorboard = false\n')
    rows = []
    for i, colour in enumerate(["red", "green", "blue"] * 100):  # distinct rows: some held out at 1%
        if i < 6:
            Image.new("RGB", (64 + 8 * i, 64), colour).save(home / f"p{i}.png")
        rows.append({"image": f"p{i % 6}.png", "prompt": f"Q: colour {i}?\nA:", "text": f" {colour}"})
    (home / "pics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    Image.new("RGB", (100, 60), "blue").save(home / "photo.png")
    (home / "questions.jsonl").write_text("".join(json.dumps({"prompt": f"Q: {i}+{i}=?\nA:", "answer": str(2 * i)})
                                                  + "\n" for i in range(4)))
    vl = PRESETS["mini-maverick-vl"]
    (home / "my_vl_config.json").write_text(json.dumps({"format": "behemoth", "model": vl.to_dict()}))
    (home / "path" / "to").mkdir(parents=True)
    (home / "path" / "to" / "config.json").write_text(json.dumps({"format": "behemoth",
                                                                  "model": PRESETS["debug"].to_dict()}))
    save_model(behemoth.build_model("debug"), home / "path" / "to" / "dir")
    bpe = Tokenizer.train(docs + ["Hello, what is in this picture?"], vocab_size=300)  # byte-level: any text
    bpe.hf.add_special_tokens([*IMAGE_SPECIAL_TOKENS, *LLAMA4_SPECIALS])  # Llama 4's chat and image tokens
    vl_tok = Tokenizer(bpe.hf)
    hf_model = behemoth.build_model(vl.replace(vocab_size=vl_tok.vocab_size,
                                               image_token_id=vl_tok.token_to_id(PATCH)))
    export_hf(hf_model, home / "hf")
    vl_tok.save(home / "hf" / "tokenizer.json")
    from foreign_models import bpe_tokenizer, save_teacher  # a teacher of another family: a tiny Qwen 2

    save_teacher(home / "path" / "to" / "Qwen2.5-0.5B", "qwen2", bpe_tokenizer())
    base = [*TINY_RUN, *TINY_TEXT, "--model.preset=debug"]
    assert main(["train", *base, f"--train.out_dir={home / 'teacher'}"]) == 0
    assert main(["train", *TINY_RUN, "--model.preset=mini-maverick-vl", "--data.images=true",
                 "--data.seq_len=80", f"--train.out_dir={home / 'vl_teacher'}"]) == 0
    teacher = str(latest_checkpoint(home / "teacher"))
    places = {"VL_TEACHER_DIR": str(latest_checkpoint(home / "vl_teacher")), "TEACHER_DIR": teacher,
              "runs/teacher/checkpoints/step_0000500": teacher, "runs/student/checkpoints/step_0000500": teacher,
              "out/demo/student_distilled": str(home / "teacher"), "out/demo/teacher": str(home / "teacher"),
              "HF_DIR2": "hf_back", "HF_DIR": str(home / "hf"), "OUT_DIR": "native"}
    return home, places


def _runnable(command: str, places: dict[str, str], n: int) -> list[str] | str:
    """A README command as behemoth's argv at tiny sizes ("..." is the distill line above it), or the Python
    block to run."""
    if command.startswith("python: "):
        return command.split("\n", 1)[1]
    command = command.replace("distill ...", "distill --distill.teacher=TEACHER_DIR --model.preset=mini-maverick")
    for name, value in places.items():
        command = command.replace(name, value)
    argv = _argv(command)[1:]
    if argv[0] in TRAINING:
        size = TINY_RUN + ([] if "--data.images=true" in argv else TINY_TEXT)
        own_dir = any(a.startswith(("--train.out_dir", "--config")) for a in argv)
        return argv + size + ([] if own_dir else [f"--train.out_dir=runs/readme{n}"])
    extra = {"distill-cache": TINY_RUN + TINY_TEXT, "eval": ["--problems", "8", "--seq-len", "32"],
             "generate": ["--max-new-tokens", "4"], "chat": ["--max-new-tokens", "4"],
             # a teacher of two steps verifies nothing: what it writes is kept, so that training on it can run
             "synthesize": ["--num-prompts", "8", "--max-tokens", "16", "--keep", "all"]}
    return argv + extra.get(argv[0], [])


def test_readme_commands(scratch, monkeypatch, capsys):
    """Every README command not covered elsewhere, in the README's order, from the scratch directory."""
    home, places = scratch
    monkeypatch.chdir(home)
    ran = 0
    for n, command in enumerate(readme_commands()):
        first = command.split("\n")[0]
        if command in COVERED_ELSEWHERE or first in COVERED_ELSEWHERE:
            continue
        todo = _runnable(command, places, n)
        if isinstance(todo, str):
            exec(compile(todo, f"README.md ({first})", "exec"), {})
        else:
            monkeypatch.setattr(sys, "stdin", io.StringIO("12+30=?\n/exit\n"))  # for `chat`
            code = main(todo)
            assert code == 0, f"{command}\n-> behemoth {' '.join(todo)}\n{capsys.readouterr().err[-2000:]}"
        ran += 1
    assert ran >= 30
    assert (home / "runs" / "tiny" / "checkpoints" / "latest").is_file()
    assert (home / "cache" / "manifest.json").is_file()
    assert json.loads((home / "eval.json").read_text())["heldout"]["tokens"] > 0
