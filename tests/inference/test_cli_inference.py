"""`behemoth generate` and `behemoth chat` as a user runs them, on a run that `train` produced and on
a transformers directory."""

from __future__ import annotations

import io

import pytest

from behemoth import load_model
from behemoth.cli import main
from behemoth.data.tokenizer import Tokenizer
from behemoth.inference.generate import generate
from behemoth.train.config import build_config
from behemoth.train.run import run_training


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    args = {"model.preset": "debug", "train.steps": 2, "train.batch_size": 2, "data.seq_len": 32,
            "data.num_problems": 100, "log.plots": False, "log.tensorboard": False, "train.out_dir": str(d)}
    run_training(build_config(None, [f"--{k}={v}" for k, v in args.items()]), say=lambda s: None)
    return d


def test_generate_on_a_training_run(run_dir, capsys):
    prompt = "Q: 12+30=?\nA:"
    assert main(["generate", "--model", str(run_dir), "--prompt", prompt, "--max-new-tokens", "12"]) == 0
    out, err = capsys.readouterr()
    model = load_model(str(run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()))
    tok = Tokenizer.load(run_dir)
    expect = tok.decode(generate(model, [tok.encode(prompt)], max_new_tokens=12, stop_ids=(tok.eos_id,))[0])
    assert out == expect + "\n"
    assert "tokens/s" in err


def test_generate_streams_and_batches(run_dir, capsys):
    args = ["generate", "--model", str(run_dir), "--max-new-tokens", "8", "--temperature", "0.7", "--seed", "3"]
    assert main([*args, "--prompt", "Q: 1+1=?\nA:", "--stream"]) == 0
    streamed = capsys.readouterr().out
    assert main([*args, "--prompt", "Q: 1+1=?\nA:"]) == 0
    assert capsys.readouterr().out == streamed  # same seed, same tokens, streamed or not
    assert main([*args, "--prompt", "Q: 1+1=?\nA:", "--prompt", "Q: 7*8=?\nA:"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("--- 0\n") and "--- 1\n" in out


def test_chat_keeps_the_conversation_and_resets(run_dir, monkeypatch, capsys):
    from behemoth.inference import interactive

    seen = []
    real = interactive.Runner.encode_chat

    def spy(self, msgs):
        seen.append([m["role"] for m in msgs])
        return real(self, msgs)

    monkeypatch.setattr(interactive.Runner, "encode_chat", spy)
    monkeypatch.setattr("sys.stdin", io.StringIO("1+2=?\n3+4=?\n/reset\n5+6=?\n"))
    assert main(["chat", "--model", str(run_dir), "--max-new-tokens", "6"]) == 0
    assert seen == [["user"], ["user", "assistant", "user"], ["user"]]
    assert "conversation cleared" in capsys.readouterr().err


def test_generate_and_chat_on_a_transformers_directory(hf_model_dir, capsys, monkeypatch):
    assert main(["generate", "--model", str(hf_model_dir), "--prompt", "Hello world", "--max-new-tokens", "5"]) == 0
    assert "tokens/s" in capsys.readouterr().err
    assert main(["generate", "--model", str(hf_model_dir), "--prompt", "Hello", "--chat", "--system", "Be brief.",
                 "--max-new-tokens", "5", "--stream"]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n"))
    assert main(["chat", "--model", str(hf_model_dir), "--max-new-tokens", "4"]) == 0
    assert "llama4 format" in capsys.readouterr().err


@pytest.mark.parametrize("argv, needle", [
    (["generate", "--model", "/no/such/dir", "--prompt", "x"], "no such directory"),
    (["generate", "--model", "RUN", "--prompt", "x", "--top-p", "0"], "top_p"),
    (["generate", "--model", "RUN", "--prompt", "x", "--max-new-tokens", "100000"], "max_seq_len"),
    (["generate", "--model", "RUN", "--prompt", "x", "--chat-format", "llama4"], "lacks"),
    (["chat", "--model", "RUN", "--temperature", "-1"], "temperature"),
    (["serve", "--model", "RUN", "--max-batch", "0"], "max_batch"),
])
def test_bad_input_is_one_line(run_dir, argv, needle, capsys):
    argv = [str(run_dir) if a == "RUN" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


def test_run_dir_without_checkpoints_is_refused(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path), "--prompt", "x"]) == 2
    assert "neither a model directory" in capsys.readouterr().err


def test_generate_reads_long_prompts_from_files_and_prefills_them_in_chunks(run_dir, tmp_path, capsys):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Q: 12+7=?\nA: #### 19\n" * 30 + "Q: 3+4=?\nA:")
    args = ["generate", "--model", str(run_dir), "--max-new-tokens", "6", "--prompt-file", str(prompt)]
    assert main(args + ["--prefill-chunk", "64"]) == 0
    chunked = capsys.readouterr().out
    assert main(args + ["--prefill-chunk", "0"]) == 0
    assert capsys.readouterr().out == chunked
    assert main(["generate", "--model", str(run_dir), "--prompt-file", str(tmp_path / "nope.txt")]) == 2
    assert "--prompt-file" in capsys.readouterr().err
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00")
    assert main(["generate", "--model", str(run_dir), "--prompt-file", str(tmp_path / "binary.txt")]) == 2
    assert capsys.readouterr().err.strip().endswith("binary.txt: not UTF-8 text")


def test_chat_and_serve_take_a_draft(run_dir, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("1+2=?\n"))
    assert main(["chat", "--model", str(run_dir), "--max-new-tokens", "6", "--draft", str(run_dir)]) == 0
    assert "drafted tokens accepted" in capsys.readouterr().err
    assert main(["chat", "--model", str(run_dir), "--draft", str(run_dir), "--draft-k", "0"]) == 2
    assert "--draft-k 0" in capsys.readouterr().err
    assert main(["serve", "--model", str(run_dir), "--draft", str(run_dir), "--draft-k", "17"]) == 2
