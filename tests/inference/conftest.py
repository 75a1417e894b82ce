"""Model directories for the inference tests: one native (char tokenizer, plain chat format), one
written by transformers' `save_pretrained` with a Llama-4-style tokenizer (control tokens, BOS)."""

from __future__ import annotations

import pytest
import torch
from tokenizers import processors

from behemoth import build_model
from behemoth.checkpoint import save_model
from behemoth.config import PRESETS
from behemoth.data.tasks import ALPHABET
from behemoth.data.tokenizer import Tokenizer

LLAMA4_SPECIALS = ["<|header_start|>", "<|header_end|>", "<|eom|>", "<|eot|>", "<|finetune_right_pad|>",
                   "<|python_start|>", "<|python_end|>", "<|image_start|>", "<|image_end|>", "<|tile_x_separator|>",
                   "<|tile_y_separator|>", "<|image|>", "<|patch|>"]
CHAR_CFG = PRESETS["debug"].replace(vocab_size=64, max_seq_len=2048)


def llama4_style_tokenizer() -> Tokenizer:
    """A small byte-level BPE with Llama 4's control tokens and its BOS-prepending post-processor."""
    texts = ["Hello world, how are you today?", "The answer is 42.", "Mixture of experts routes tokens."] * 20
    tok = Tokenizer.train(texts, vocab_size=300)
    hf = tok.hf
    hf.add_special_tokens(LLAMA4_SPECIALS)
    bos = hf.token_to_id("<|begin_of_text|>")
    hf.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[
        ("<|begin_of_text|>", bos)])
    return _reload(hf)


def _reload(hf) -> Tokenizer:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "tokenizer.json").write_text(hf.to_str())
        return Tokenizer.load(d)


@pytest.fixture(scope="session")
def llama4_tok() -> Tokenizer:
    return llama4_style_tokenizer()


@pytest.fixture(scope="session")
def char_model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("char-model")
    save_model(build_model(CHAR_CFG, seed=0), d)
    Tokenizer.from_chars(ALPHABET).save(d)
    return d


@pytest.fixture(scope="session")
def mm_model_dir(tmp_path_factory):
    """A tiny random transformers `Llama4ForConditionalGeneration` (56-pixel tiles, 4 tokens each) with a
    Llama-4-style tokenizer whose `<|patch|>` is the model's image token."""
    pytest.importorskip("transformers")
    from hf_reference import hf_multimodal

    from behemoth.config import VisionConfig

    tok = llama4_style_tokenizer()
    cfg = PRESETS["debug"].replace(vocab_size=512, vision=VisionConfig(
        dim=16, n_layers=2, n_heads=2, ffn_dim=64, image_size=56, patch_size=14, adapter_dim=32),
        image_token_id=tok.token_to_id("<|patch|>"))
    model = hf_multimodal(cfg)
    out = tmp_path_factory.mktemp("mm-model")
    model.save_pretrained(out)
    tok.save(out)
    return out


@pytest.fixture(scope="session")
def hf_model_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    from hf_reference import hf_text_config

    d = tmp_path_factory.mktemp("hf-model")
    cfg = PRESETS["debug"].replace(vocab_size=512)
    torch.manual_seed(0)
    model = transformers.Llama4ForCausalLM(hf_text_config(cfg)).eval()
    model.save_pretrained(d)
    llama4_style_tokenizer().save(d)
    return d


@pytest.fixture(scope="module")
def server(char_model_dir):
    """A live server (`make_server`) on 127.0.0.1 over the character model, model id "tiny", run in a thread:
    (server, engine, runner)."""
    import threading

    from behemoth.inference.runner import Runner
    from behemoth.inference.server import make_server

    runner = Runner.load(char_model_dir)
    srv, engine = make_server(runner, port=0, model_name="tiny", max_tokens_limit=1500, quiet=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv, engine, runner
    srv.shutdown()
    srv.server_close()
    engine.close()
