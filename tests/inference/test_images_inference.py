"""Image questions end to end: tiles through the vision tower into a cached generation, equal token for
token to greedy decoding with transformers' forward on the same multimodal model (its `generate`
drops `pixel_values` for Llama 4 in 5.23, so it is not the reference); `generate --image`, `chat /image`."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from behemoth.cli import main
from behemoth.inference.runner import Runner
from behemoth.inference.sampling import SamplingParams


def picture(path, w: int, h: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("size", [(40, 40), (150, 60)], ids=["one-tile", "2x3-tiles-plus-global"])
def test_image_question_matches_transformers_generate(mm_model_dir, tmp_path, size):
    transformers = pytest.importorskip("transformers")
    runner = Runner.load(mm_model_dir)
    block, pixels = runner.image(picture(tmp_path / "a.png", *size))
    assert pixels.shape[0] == (1 if size == (40, 40) else 7)  # 150 x 60 -> a 112 x 168 canvas of 56-pixel tiles
    ids = runner.encode_chat([{"role": "user", "content": [{"type": "tokens", "ids": block},
                                                           {"type": "text", "text": "What is this?"}]}])
    ours = runner.model(torch.tensor([ids]), pixel_values=pixels)[0, -1]
    got = runner.complete([ids], SamplingParams(max_new_tokens=12), pixel_values=pixels)[0].token_ids
    hf = transformers.Llama4ForConditionalGeneration.from_pretrained(mm_model_dir).eval()
    seq = list(ids)
    with torch.no_grad():  # transformers' own forward, the whole sequence with the image at every step
        ref_logits = hf(input_ids=torch.tensor([ids]), pixel_values=pixels.float()).logits[0, -1]
        for _ in range(12):
            seq.append(int(hf(input_ids=torch.tensor([seq]), pixel_values=pixels.float()).logits[0, -1].argmax()))
    # fp32 on both sides; measured on CPU (torch 2.13, transformers 5.23.0): max |diff| 1.2e-7 (one tile) and
    # 1.8e-7 (seven tiles) with logits up to ~0.5, a few fp32 ulps. 1e-6 keeps a 5x margin and still sees
    # the vision tower's GELU switched to its tanh approximation (1.4e-6 with one tile, 7.5e-6 with seven)
    assert ours.dtype == torch.float32
    err = (ours - ref_logits).abs().max().item()
    assert err <= 1e-6, f"max |logit diff| {err:.3e}"
    assert got == seq[len(ids):]


def test_generate_and_chat_with_an_image(mm_model_dir, tmp_path, capsys, monkeypatch):
    img = picture(tmp_path / "b.png", 90, 70)
    assert main(["generate", "--model", str(mm_model_dir), "--image", str(img), "--prompt", "Hello", "--chat",
                 "--max-new-tokens", "4"]) == 0
    assert "tokens/s" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO(f"/image {img}\nWhat is this?\n/image {tmp_path}/nope.png\nAnd?\n"))
    assert main(["chat", "--model", str(mm_model_dir), "--max-new-tokens", "3"]) == 0
    err = capsys.readouterr().err
    assert "image attached: 5 tile(s)" in err and "nope.png: no such image file" in err  # 2 x 2 + global


@pytest.mark.parametrize("argv, needle", [
    (["--image", "IMG", "--prompt", "x"], None),  # sanity: works
    (["--image", "BAD", "--prompt", "x"], "not a readable image"),
    (["--image", "IMG", "--prompt", "x", "--prompt", "y"], "single --prompt"),
])
def test_image_errors_are_one_line(mm_model_dir, tmp_path, capsys, argv, needle):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    img = picture(tmp_path / "ok.png", 30, 30)
    argv = [str(img) if a == "IMG" else str(tmp_path / "bad.png") if a == "BAD" else a for a in argv]
    code = main(["generate", "--model", str(mm_model_dir), "--max-new-tokens", "2", *argv])
    if needle is None:
        assert code == 0
        return
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and needle in err, err


def test_text_only_model_refuses_images(hf_model_dir, tmp_path, capsys):
    img = picture(tmp_path / "c.png", 30, 30)
    assert main(["generate", "--model", str(hf_model_dir), "--image", str(img), "--prompt", "x"]) == 2
    assert "has no vision tower" in capsys.readouterr().err


def test_server_answers_an_image_question_through_the_openai_client(mm_model_dir, tmp_path):
    """A base64 `data:` image in an OpenAI chat message: the answer equals the offline one; a remote URL,
    broken base64, a corrupt image and an image for a text-only server are 400s."""
    import base64

    openai = pytest.importorskip("openai")
    from behemoth.inference.server import make_server

    runner = Runner.load(mm_model_dir)
    img = picture(tmp_path / "d.png", 120, 50, seed=3)
    block, pixels = runner.image(img)
    ids = runner.encode_chat([{"role": "user", "content": [{"type": "tokens", "ids": block},
                                                           {"type": "text", "text": "Describe it."}]}])
    params = SamplingParams(max_new_tokens=10, stop_ids=runner.chat.stop_ids)
    expected = runner.complete([ids], params, runner.chat.stop_strings, lstrip=True, pixel_values=pixels)[0].text
    server, engine = make_server(runner, port=0, model_name="mm", quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="x", max_retries=0)
        url = "data:image/png;base64," + base64.b64encode(img.read_bytes()).decode()

        def ask(image_url: str, **kw):
            return client.chat.completions.create(model="mm", max_tokens=10, temperature=0, messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                             {"type": "text", "text": "Describe it."}]}], **kw)

        assert ask(url).choices[0].message.content == expected
        assert "".join(c.choices[0].delta.content or "" for c in ask(url, stream=True)) == expected
        for bad, needle in [("https://example.com/cat.png", "not fetched"), ("data:image/png;base64,@@@", "base64"),
                            ("data:image/png;base64," + base64.b64encode(b"junk").decode(), "not a readable image")]:
            with pytest.raises(openai.BadRequestError, match=needle):
                ask(bad)
        nine = [{"type": "image_url", "image_url": {"url": url}}] * 9
        with pytest.raises(openai.BadRequestError, match="at most 8 per request"):
            client.chat.completions.create(model="mm", max_tokens=2, messages=[{"role": "user", "content": nine}])
    finally:
        server.shutdown()
        server.server_close()
        engine.close()
