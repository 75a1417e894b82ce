"""The KV cache and generation: cached decoding equals the full forward and transformers' generate."""

from __future__ import annotations

import importlib

import pytest
import torch
from hf_reference import hf_pair

from behemoth import build_model
from behemoth.config import PRESETS, MoEConfig, RopeScaling
from behemoth.inference.cache import KVCache, cache_bytes
from behemoth.inference.generate import generate, generate_reference, prefill, stream
from behemoth.inference.sampling import SamplingParams, filter_logits, sample

DEBUG = PRESETS["debug"]  # chunk 32, floor_scale 64: temperature tuning is active from position 63
SCOUT_LIKE = DEBUG.replace(moe=MoEConfig(num_experts=4, top_k=2, expert_dim=48, interleave_step=1),
                           rope_scaling=RopeScaling(16.0, 1.0, 1.0, 32), attention_chunk_size=16, floor_scale=8)


def _prompts(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("cfg", [DEBUG, SCOUT_LIKE], ids=["debug", "scout-like"])
def test_decode_logits_equal_full_forward(cfg):
    """Prefill a padded batch, then decode one token at a time across chunk boundaries and past
    floor_scale: every step's logits equal a full forward of that row alone."""
    model = build_model(cfg).eval()
    rows = _prompts([21, 5, 40], cfg.vocab_size)
    T = 100  # every row ends past position 99: three chunks of 32, temperature tuning on
    full = [_prompts([T - len(r)], cfg.vocab_size, seed=i + 1)[0] for i, r in enumerate(rows)]
    seqs = [r + f for r, f in zip(rows, full, strict=True)]
    cache = KVCache(cfg, len(rows), T)
    with torch.no_grad():
        ref = [model(torch.tensor([s]))[0] for s in seqs]
        S = max(map(len, rows))
        ids = torch.zeros(3, S, dtype=torch.long)
        pos = torch.full((3, S), -1)
        for b, r in enumerate(rows):
            ids[b, :len(r)], pos[b, :len(r)] = torch.tensor(r), torch.arange(len(r))
        pre = model(ids, pos, cache=cache)
        for b, r in enumerate(rows):
            assert (pre[b, :len(r)] - ref[b][:len(r)]).abs().max() < 1e-5
        for step in range(T - S):
            p = torch.tensor([len(r) + step for r in rows])
            tok = torch.tensor([s[q] if q < T else 0 for s, q in zip(seqs, p.tolist(), strict=True)])
            out = model(tok[:, None], p[:, None], cache=cache)[:, 0]
            for b in range(3):
                if p[b] < T:
                    err = (out[b] - ref[b][p[b]]).abs().max()
                    assert err < 1e-5, f"row {b} position {int(p[b])}: {err:.2e}"


def test_multi_token_extension_equals_full_forward():
    """A cache can also be extended several tokens at a time (a conversation's next turn)."""
    model = build_model(DEBUG).eval()
    ids = torch.tensor(_prompts([100], DEBUG.vocab_size))
    cache = KVCache(DEBUG, 1, 100)
    with torch.no_grad():
        ref = model(ids)
        outs = [model(ids[:, a:b], torch.arange(a, b)[None], cache=cache)
                for a, b in [(0, 30), (30, 31), (31, 70), (70, 100)]]
    assert (torch.cat(outs, 1) - ref).abs().max() < 1e-5


def test_chunked_layers_keep_one_chunk():
    cfg = DEBUG  # 4 layers: 3 RoPE (chunk 32) + 1 NoPE
    cache = KVCache(cfg, 2, 1000)
    kinds = [t.shape[2] for t in cache.k]
    assert kinds == [32, 32, 32, 1000]
    assert cache_bytes(cfg, 2, 1000, torch.float32)["total"] == cache.nbytes()
    small, big = cache_bytes(cfg, 1, 10_000), cache_bytes(cfg, 1, 100_000)
    assert small["chunked"] == big["chunked"] and big["global"] == 10 * small["global"]


@pytest.mark.parametrize("cfg", [DEBUG, SCOUT_LIKE], ids=["debug", "scout-like"])
def test_greedy_equals_transformers_generate(cfg):
    """Token for token, each prompt alone and as one left-padded transformers batch."""
    hf, ours = hf_pair(cfg, seed=1)
    prompts = _prompts([40, 25, 7], cfg.vocab_size)
    N = 40  # the longest row reaches position 79: past two chunk boundaries and floor_scale
    got = generate(ours, prompts, max_new_tokens=N)
    opts = dict(max_new_tokens=N, min_new_tokens=N, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        alone = [hf.generate(torch.tensor([p]), **opts)[0, len(p):].tolist() for p in prompts]
        L = max(map(len, prompts))
        ids = torch.zeros(3, L, dtype=torch.long)
        mask = torch.zeros(3, L, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, L - len(p):], mask[i, L - len(p):] = torch.tensor(p), 1
        batch = hf.generate(ids, attention_mask=mask, **opts)[:, L:].tolist()
    assert got == alone
    assert got == batch


def test_padding_changes_nothing_and_matches_reference():
    model = build_model(DEBUG).eval()
    prompts = _prompts([3, 17, 50, 9], DEBUG.vocab_size)
    together = generate(model, prompts, max_new_tokens=30)
    assert together == [generate(model, [p], max_new_tokens=30)[0] for p in prompts]
    assert together == generate_reference(model, prompts, max_new_tokens=30)


def test_stop_ids_stream_and_seeded_sampling():
    model = build_model(DEBUG).eval()
    prompts = _prompts([6, 11], DEBUG.vocab_size)
    free = generate(model, prompts, max_new_tokens=12)
    stop = free[0][4]  # stop row 0 at its fifth token (not emitted)
    cut = generate(model, prompts, max_new_tokens=12, stop_ids=(stop,))
    assert cut[0] == free[0][:free[0].index(stop)]
    assert cut[1] == (free[1][:free[1].index(stop)] if stop in free[1] else free[1])
    streamed = [[], []]
    for step in stream(model, prompts, max_new_tokens=12, stop_ids=(stop,)):
        for b, t in enumerate(step):
            if t is not None:
                streamed[b].append(t)
    assert streamed == cut
    opts = dict(max_new_tokens=20, temperature=1.0, top_k=50, top_p=0.9)
    a = generate(model, prompts, seed=7, **opts)
    assert a == generate(model, prompts, seed=7, **opts)
    assert a != generate(model, prompts, seed=8, **opts)
    assert generate(model, prompts[:1], seed=3, **opts) == generate_reference(model, prompts[:1], seed=3, **opts)


def test_top_k_top_p_filters_closed_form():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    keep = lambda k, p: torch.isfinite(filter_logits(logits, k, p))[0].tolist()  # noqa: E731
    assert keep(2, 1.0) == [True, True, False, False]
    assert keep(None, 0.8) == [True, True, False, False]  # 0.5 + 0.3 reaches 0.8
    assert keep(None, 0.81) == [True, True, True, False]
    assert keep(None, 0.1) == [True, False, False, False]  # at least one token
    assert keep(None, 1.0) == [True] * 4
    assert keep(3, 0.6) == [True, True, False, False]
    assert keep(None, 5e-324) == [True, False, False, False]  # below fp32's range: still the most likely token


def test_sampling_follows_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).expand(20000, 4)
    g = torch.Generator().manual_seed(0)
    ids = sample(logits, SamplingParams(temperature=2.0), g)
    freq = torch.bincount(ids, minlength=4).float() / ids.numel()
    assert (freq - torch.softmax(logits[0] / 2.0, -1)).abs().max() < 0.015
    assert sample(logits[:2], SamplingParams()).tolist() == [0, 0]
    tiny = SamplingParams(temperature=5e-324, top_p=5e-324)  # divides logits to infinity without the floor
    assert sample(logits[:2], tiny, g).tolist() == [0, 0]


def test_bad_options_and_lengths_are_refused():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    model = build_model(DEBUG).eval()
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, [[1, 2, 3]], max_new_tokens=DEBUG.max_seq_len)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="token ids"):
        generate(model, [[1, DEBUG.vocab_size]], max_new_tokens=2)
    steps = stream(model, [[1, 2]], max_new_tokens=3)
    next(steps)
    assert torch.is_grad_enabled()  # no_grad does not leak out of the generator between steps


@pytest.mark.slow
def test_compiled_decode_step_gives_the_same_tokens():
    """torch.compile of the decode step (about 20 s to compile on CPU): same greedy tokens, and a second
    call with other lengths in the same cache bucket reuses the compiled step."""
    model = build_model(DEBUG).eval()
    prompts = _prompts([9, 30], DEBUG.vocab_size)
    assert generate(model, prompts, max_new_tokens=40, compile=True) == generate(model, prompts, max_new_tokens=40)
    short = _prompts([5, 12], DEBUG.vocab_size, seed=4)
    assert generate(model, short, max_new_tokens=20, compile=True) == generate(model, short, max_new_tokens=20)


def test_repeated_compiled_generation_compiles_once(monkeypatch):
    """`generate(compile=True)` keeps one cache per (rows, length bucket) and resets it in place: a second call with
    the same shapes builds no new cache (on CUDA a new one, marked static, re-records the graph, and on older torch
    recompiles) and compiles no new graph (dynamo's counters), and its tokens equal eager decoding. Dynamo with the
    eager backend (what is counted is tracing, not code generation)."""
    from torch._dynamo.utils import counters

    generate_module = importlib.import_module("behemoth.inference.generate")  # the package exports a function so named

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, **{**kw, "backend": "eager"}))
    built = []

    class CountedCache(KVCache):
        def __init__(self, *args, **kwargs):
            built.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(generate_module, "KVCache", CountedCache)
    torch._dynamo.reset()
    counters.clear()
    try:
        model = build_model(DEBUG).eval()
        prompts = _prompts([9, 30], DEBUG.vocab_size)
        want = generate(model, prompts, max_new_tokens=12)
        assert generate(model, prompts, max_new_tokens=12, compile=True) == want
        graphs = counters["stats"]["unique_graphs"]
        assert graphs >= 1
        other = _prompts([20, 4], DEBUG.vocab_size, seed=5)  # the same rows and bucket, other prompts
        assert generate(model, other, max_new_tokens=12, compile=True) == generate(model, other, max_new_tokens=12)
        assert generate(model, prompts, max_new_tokens=12, compile=True) == want
        assert counters["stats"]["unique_graphs"] == graphs
        assert len(built) == 3  # two eager calls, and one cache for the three compiled ones
    finally:
        torch._dynamo.reset()


def test_cache_in_another_dtype():
    """A bf16 cache under an fp32 model: keys are stored rounded and read back in the model's dtype,
    so decode logits stay within bf16 rounding of the full forward (and differ from it)."""
    model = build_model(DEBUG).eval()
    ids = torch.tensor(_prompts([60], DEBUG.vocab_size))
    cache = KVCache(DEBUG, 1, 60, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = model(ids)
        model(ids[:, :40], torch.arange(40)[None], cache=cache)
        steps = torch.cat([model(ids[:, t:t + 1], torch.tensor([[t]]), cache=cache) for t in range(40, 60)], 1)
    err = (steps - ref[:, 40:]).abs().max()
    assert 0 < err < 2e-2, err
    assert generate(model, ids.tolist(), max_new_tokens=4, cache_dtype=torch.bfloat16)[0]


def test_a_prefilled_row_moves_into_a_larger_cache():
    """Prefill two prompts in a cache sized to them, move row 1 into row 2 of a long-context cache,
    decode there across chunk boundaries: the logits equal a full forward."""
    model = build_model(DEBUG).eval()
    a, b = _prompts([10, 45], DEBUG.vocab_size)
    rest = _prompts([40], DEBUG.vocab_size, seed=9)[0]
    seq = b + rest
    small, big = KVCache(DEBUG, 2, 45), KVCache(DEBUG, 3, 200)
    with torch.no_grad():
        ref = model(torch.tensor([seq]))[0]
        prefill(model, [a, b], small)
        big.load_row(2, small, 1)
        for t in range(45, len(seq)):
            ids = torch.tensor([0, 0, seq[t]])
            pos = torch.tensor([-1, -1, t])
            out = model(ids[:, None], pos[:, None], cache=big)[2, 0]
            assert (out - ref[t]).abs().max() < 1e-5, t


@pytest.mark.parametrize("cfg", [DEBUG, SCOUT_LIKE], ids=["debug", "scout-like"])
def test_chunked_prefill_equals_whole(cfg):
    """Prompts of different lengths prefilled 24 tokens at a time (across attention chunks of 16 and 32): the same
    last-token logits as one whole prefill (fp32), and the same generated tokens."""
    model = build_model(cfg).eval()
    rows = _prompts([70, 9, 48], cfg.vocab_size)
    with torch.no_grad():
        whole = prefill(model, rows, KVCache(cfg, 3, 90))
        pieces = prefill(model, rows, KVCache(cfg, 3, 90), chunk=24)
    torch.testing.assert_close(pieces, whole, rtol=1e-5, atol=1e-5)
    assert generate(model, rows, max_new_tokens=12, prefill_chunk=24) == generate(model, rows, max_new_tokens=12)


def test_prefill_pieces_shorten_with_the_context(monkeypatch):
    """A piece's queries times the keys they see stay within PREFILL_PAIRS; a prefill whose pieces shorten that way
    still equals the whole one."""
    g = importlib.import_module("behemoth.inference.generate")
    assert g.piece_len(1024, 0) == 1024 and g.piece_len(1024, 1 << 16) < 1024
    for done in (0, 5000, 60_000, 1 << 18):
        n = g.piece_len(2048, done)
        assert n * (done + n) <= g.PREFILL_PAIRS or n == 16
    monkeypatch.setattr(g, "PREFILL_PAIRS", 40 * 40)
    model = build_model(DEBUG).eval()
    rows = _prompts([90, 31], DEBUG.vocab_size)
    sizes = []
    real = model.hidden_states

    def spy(ids, pos, **kw):
        sizes.append(ids.shape[1])
        return real(ids, pos, **kw)

    with torch.no_grad():
        whole = prefill(model, rows, KVCache(DEBUG, 2, 100))
        model.hidden_states = spy
        pieces = prefill(model, rows, KVCache(DEBUG, 2, 100), chunk=32)
    assert sizes[0] == 32 and min(sizes) < 32  # shorter pieces once the keys grow
    torch.testing.assert_close(pieces, whole, rtol=1e-5, atol=1e-5)
