"""Speculative decoding: greedy output equal to the target's own, caches that roll back exactly (across chunk
boundaries too), sampled output that follows the target's distribution whatever the draft, and adaptive k."""

from __future__ import annotations

import pytest
import torch

from behemoth import build_model
from behemoth.config import PRESETS
from behemoth.inference.cache import KVCache
from behemoth.inference.generate import decode_step, generate, prefill
from behemoth.inference.sampling import SamplingParams
from behemoth.inference.speculative import best_k, probs, speculative_generate

CFG = PRESETS["debug"].replace(vocab_size=64, max_seq_len=512)  # chunk 32: the runs below cross boundaries


def peaked(seed: int, cfg=CFG, scale: float = 20.0):
    """A random model with peaked next-token distributions (no near-ties for greedy decoding to break)."""
    m = build_model(cfg, seed=seed).eval()
    with torch.no_grad():
        m.output.weight.mul_(scale)
    return m


@pytest.fixture(scope="module")
def target():
    return peaked(0)


@pytest.fixture(scope="module")
def draft():
    small = CFG.replace(n_layers=2, dim=32, head_dim=8, moe={"num_experts": 4, "expert_dim": 16})
    return peaked(1, small)


PROMPTS = [[5, 9, 3, 7], [1] * 29, list(range(40, 60))]  # the second ends just before a chunk boundary


@pytest.mark.parametrize("k", [1, 3, 6])
def test_greedy_equals_the_target_alone(target, draft, k):
    params = SamplingParams(max_new_tokens=70)
    ref = generate(target, PROMPTS, params)
    for d in (draft, target):  # a poor draft (most rejected) and a perfect one (all accepted)
        out, stats = speculative_generate(target, d, PROMPTS, params, k=k)
        assert out == ref, (k, stats)
    assert stats.acceptance == 1.0 and stats.rounds < 70  # the target as its own draft: k+1 tokens a round


def test_adaptive_k_and_stop_ids(target, draft):
    ref = generate(target, PROMPTS, SamplingParams(max_new_tokens=60))
    stop = ref[0][10]
    params = SamplingParams(max_new_tokens=60, stop_ids=(stop,))
    out, stats = speculative_generate(target, target, PROMPTS, params, k=2, adaptive=True, k_max=6, draft_cost=0.05)
    assert out == generate(target, PROMPTS, params)
    assert max(stats.ks) == 6 and stats.ks[0] == 2  # a cheap draft that is always right: k grows to its ceiling
    _, stats = speculative_generate(target, target, PROMPTS, params, k=4, adaptive=True, k_max=6)
    assert stats.ks[-1] == 1  # a draft as costly as the target never pays: the least k
    _, stats = speculative_generate(target, draft, PROMPTS, SamplingParams(max_new_tokens=60), k=6, adaptive=True)
    assert stats.acceptance < 0.5 and stats.ks[-1] < 6
    assert best_k(0.9, 0.1, 8) > best_k(0.3, 0.1, 8) >= 1 and best_k(0.9, 1.0, 8) < best_k(0.9, 0.01, 8)


def test_a_rolled_back_cache_equals_one_that_never_ran_ahead(target):
    """Write k speculative tokens past a chunk boundary, take them back, go on: every logit as if never written."""
    prompt = list(range(3, 33))  # 30 tokens; the boundary at 32
    spec = KVCache(target.config, 1, 128, lookahead=6)
    plain = KVCache(target.config, 1, 128)
    with torch.no_grad():
        prefill(target, [prompt], spec)
        prefill(target, [prompt], plain)
        ids = torch.tensor([[7, 8, 9, 10, 11, 12, 13]])
        target.hidden_states(ids, torch.arange(30, 37)[None], cache=spec)  # positions 30..36, across 32
        spec.truncate([31])  # only position 30 (token 7) was accepted
        target.hidden_states(ids[:, :1], torch.tensor([[30]]), cache=plain)
        for p, tok in enumerate([21, 22, 23, 24, 25], start=31):  # continue differently, through the boundary
            a = decode_step(target, torch.tensor([tok]), torch.tensor([p]), spec)
            b = decode_step(target, torch.tensor([tok]), torch.tensor([p]), plain)
            assert torch.allclose(a, b, atol=1e-5, rtol=0), p


def test_sampled_output_follows_the_target_distribution():
    """A tiny vocabulary: the first two sampled tokens' frequencies over 6,000 rows against the target's exact
    distribution (enumerated), with a draft that disagrees with it."""
    cfg = CFG.replace(vocab_size=6)
    target, draft = peaked(3, cfg, 1.0), peaked(4, cfg, 3.0)
    prompt, n = [1, 2, 3], 6000
    params = SamplingParams(max_new_tokens=2, temperature=1.0, seed=0)
    out, stats = speculative_generate(target, draft, [prompt] * n, params, k=2)
    assert 0.1 < stats.acceptance < 0.95  # a real mix of acceptances and rejections
    with torch.no_grad():
        p1 = torch.softmax(target(torch.tensor([prompt])).float()[0, -1], -1)
        p12 = torch.stack([torch.softmax(target(torch.tensor([prompt + [t]])).float()[0, -1], -1) * p1[t]
                           for t in range(6)])  # [first, second]
    first = torch.bincount(torch.tensor([o[0] for o in out]), minlength=6).float() / n
    second = torch.bincount(torch.tensor([o[1] for o in out]), minlength=6).float() / n
    assert (first - p1).abs().max() < 0.025, (first, p1)
    assert (second - p12.sum(0)).abs().max() < 0.025, (second, p12.sum(0))
    joint = torch.zeros(6, 6)
    for o in out:
        joint[o[0], o[1]] += 1 / n
    assert (joint - p12).abs().sum() < 0.12  # total variation of the 36-cell joint, ~0.05 expected from noise


def test_probs_apply_the_sampling_settings():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    p = probs(logits, SamplingParams(temperature=0.5, top_k=2), 6)
    assert p.shape == (1, 6) and p[0, 2:].sum() == 0
    assert torch.allclose(p[0, :2], torch.softmax(torch.tensor([6.0, 4.0]), -1))


def test_bad_settings(target, draft):
    with pytest.raises(ValueError, match="vocabulary"):
        speculative_generate(draft, peaked(5, CFG.replace(vocab_size=128)), PROMPTS, SamplingParams())
    with pytest.raises(ValueError, match="k=9"):
        speculative_generate(target, draft, PROMPTS, SamplingParams(), k=9)


def test_generate_command_with_a_draft(target, draft, tmp_path, capsys):
    from behemoth.checkpoint import save_model
    from behemoth.cli import main
    from behemoth.data.tasks import ALPHABET
    from behemoth.data.tokenizer import Tokenizer

    dirs = {}
    for name, m in (("target", target), ("draft", draft)):
        save_model(m, tmp_path / name)
        Tokenizer.from_chars(ALPHABET).save(tmp_path / name)
        dirs[name] = str(tmp_path / name)
    base = ["generate", "--model", dirs["target"], "--prompt", "Q: 12+7=?", "--max-new-tokens", "40"]
    assert main(base) == 0
    alone = capsys.readouterr().out
    assert main(base + ["--draft", dirs["draft"], "--draft-k", "3"]) == 0
    out = capsys.readouterr()
    assert out.out == alone and "[speculative: " in out.err and "tokens per target step and row, k 3]" in out.err
    Tokenizer.from_chars(ALPHABET + "~").save(tmp_path / "draft")
    assert main(base + ["--draft", dirs["draft"]]) == 2
    assert "its tokenizer differs" in capsys.readouterr().err
