"""The MoE block: grouped kernel vs per-expert loop vs a per-token naive reference vs transformers, the
router's semantics, routed-count bookkeeping and forced balance. CPU, fp32, seconds.

Shape legend: T tokens, D model dim, F expert hidden dim, E experts, K top-k.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from behemoth.config import ModelConfig, MoEConfig
from behemoth.model import moe as moe_module
from behemoth.model.moe import MoE, Router, grouped_mm_supported

D, FH, E = 32, 16, 8
CPU = torch.device("cpu")
needs_grouped_mm = pytest.mark.skipif(
    not grouped_mm_supported(CPU, torch.float32), reason="this torch build has no CPU torch._grouped_mm"
)


def make_moe(top_k: int, favoured: tuple[int, ...] | None = None, seed: int = 0) -> MoE:
    """A random fp32 MoE. With `favoured`, feature 0 of the inputs from `make_input` pushes the router
    logits of those experts up by ~3 and all others down by ~3, so only they receive tokens."""
    cfg = ModelConfig(dim=D, moe=MoEConfig(num_experts=E, top_k=top_k, expert_dim=FH))
    gen = torch.Generator().manual_seed(seed)
    moe = MoE(cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
        if favoured is not None:
            moe.router.weight[:, 0] = -1.0
            moe.router.weight[list(favoured), 0] = 1.0
    return moe


def make_input(T: int = 48, seed: int = 1, favoured: bool = False) -> torch.Tensor:
    """x [2, T/2, D]; with `favoured`, feature 0 is a constant 3 (see `make_moe`)."""
    x = torch.randn(2, T // 2, D, generator=torch.Generator().manual_seed(seed))
    if favoured:
        x[..., 0] = 3.0
    return x


def named_params(moe: MoE) -> dict[str, torch.Tensor]:
    return {
        "router": moe.router.weight,
        "w13": moe.experts.w13,
        "w2": moe.experts.w2,
        "shared.w1": moe.shared_expert.w1.weight,
        "shared.w3": moe.shared_expert.w3.weight,
        "shared.w2": moe.shared_expert.w2.weight,
    }


def run_with_grads(moe: MoE, x: torch.Tensor, fn=None) -> dict[str, torch.Tensor]:
    """Output and the gradients of input and every weight under a fixed random output gradient."""
    moe.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y = (fn or moe)(x)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(2)))
    out = {"out": y.detach(), "x.grad": x.grad}
    out.update({k + ".grad": p.grad.clone() for k, p in named_params(moe).items()})
    return out


def assert_all_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], **tol) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=lambda m, k=k: f"{k}: {m}", **tol)


def naive_moe(moe: MoE, x_BSD: torch.Tensor) -> torch.Tensor:
    """Token by token, straight from the Llama 4 MoE definition, sharing no code with `MoE.forward`."""
    Fh, K = moe.experts.hidden_dim, moe.top_k
    w13, w2, sh = moe.experts.w13, moe.experts.w2, moe.shared_expert
    rows = []
    for x_D in x_BSD.reshape(-1, D):
        logits_E = moe.router.weight @ x_D
        y_D = sh.w2.weight @ (F.silu(sh.w1.weight @ x_D) * (sh.w3.weight @ x_D))
        for e in torch.topk(logits_E, K).indices.tolist():
            z_D = x_D * torch.sigmoid(logits_E[e])  # the score scales the expert's input
            gate_F, up_F = z_D @ w13[e][:, :Fh], z_D @ w13[e][:, Fh:]
            y_D = y_D + (F.silu(gate_F) * up_F) @ w2[e]
        rows.append(y_D)
    return torch.stack(rows).view(x_BSD.shape)


def sigmoid(v: float) -> float:
    return 1 / (1 + math.exp(-v))


def routed_counts(moe: MoE, x: torch.Tensor) -> list[int]:
    _, ids_TK, _ = moe.router(x.reshape(-1, D))
    return torch.bincount(ids_TK.flatten(), minlength=E).tolist()


ROUTING_CASES = [  # (top_k, favoured experts): natural, some experts idle, all tokens on K experts
    (1, None),
    (2, None),
    (1, (0, 3, 6)),
    (2, (0, 3, 6)),
    (1, (5,)),
    (2, (5, 2)),
]
CASE_IDS = ["k1-natural", "k2-natural", "k1-some-idle", "k2-some-idle", "k1-all-to-one", "k2-all-to-two"]


def routing_case(top_k: int, favoured: tuple[int, ...] | None) -> tuple[MoE, torch.Tensor]:
    moe = make_moe(top_k, favoured)
    x = make_input(favoured=favoured is not None)
    counts = routed_counts(moe, x)
    if favoured is not None:
        assert {e for e, n in enumerate(counts) if n} == set(favoured), counts
    return moe, x


@needs_grouped_mm
@pytest.mark.parametrize(("top_k", "favoured"), ROUTING_CASES, ids=CASE_IDS)
def test_grouped_kernel_matches_loop_outputs_and_grads(top_k, favoured):
    moe, x = routing_case(top_k, favoured)
    moe.experts.grouped = True
    grouped = run_with_grads(moe, x)
    moe.use_loop = True
    loop = run_with_grads(moe, x)
    assert_all_close(grouped, loop)


@pytest.mark.parametrize(("top_k", "favoured"), ROUTING_CASES, ids=CASE_IDS)
def test_default_path_matches_naive_per_token_reference(top_k, favoured):
    moe, x = routing_case(top_k, favoured)
    fast = run_with_grads(moe, x)
    naive = run_with_grads(moe, x, lambda x: naive_moe(moe, x))
    assert_all_close(fast, naive)
    if favoured is not None:  # experts nobody chose: no compute, so exactly zero gradient
        idle = [e for e in range(E) if e not in favoured]
        assert fast["w13.grad"][idle].abs().max().item() == 0.0
        assert fast["w2.grad"][idle].abs().max().item() == 0.0


@needs_grouped_mm
def test_grouped_kernel_matches_naive_reference():
    moe, x = routing_case(2, None)
    moe.experts.grouped = True
    naive = run_with_grads(moe, x, lambda x: naive_moe(moe, x))
    assert_all_close(run_with_grads(moe, x), naive)


def test_router_sigmoid_top_k_without_renormalisation():
    router = Router(dim=2, num_experts=3, top_k=2)
    with torch.no_grad():
        router.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
    x_TD = torch.tensor([[2.0, 0.5], [-1.0, -2.0]])  # logits [2, 0.5, -2.5] and [-1, -2, 3]
    scores_TK, ids_TK, logits_TE = router(x_TD)
    torch.testing.assert_close(logits_TE, torch.tensor([[2.0, 0.5, -2.5], [-1.0, -2.0, 3.0]]))
    assert ids_TK.tolist() == [[0, 1], [2, 0]]
    expect = torch.tensor([[sigmoid(2.0), sigmoid(0.5)], [sigmoid(3.0), sigmoid(-1.0)]])
    torch.testing.assert_close(scores_TK, expect)
    assert scores_TK.dtype == logits_TE.dtype == torch.float32
    assert abs(scores_TK[0].sum().item() - 1) > 0.1  # not renormalised to sum to 1
    router.top_k = 1
    scores_TK, ids_TK, _ = router(x_TD)
    assert ids_TK.tolist() == [[0], [2]]
    torch.testing.assert_close(scores_TK, torch.tensor([[sigmoid(2.0)], [sigmoid(3.0)]]))


def test_score_multiplies_the_expert_input_by_hand():
    """D=2, F=1, one routed expert, no shared expert: out = down(silu(s x.g) * (s x.u)), s = sigmoid(1)."""
    cfg = ModelConfig(dim=2, moe=MoEConfig(num_experts=2, top_k=1, expert_dim=1, num_shared_experts=0))
    moe = MoE(cfg)
    with torch.no_grad():
        moe.router.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        moe.experts.w13.copy_(torch.tensor([[[1.0, 1.0], [0.0, 0.0]], [[9.0, 9.0], [9.0, 9.0]]]))
        moe.experts.w2.copy_(torch.tensor([[[1.0, 2.0]], [[9.0, 9.0]]]))
    y = moe(torch.tensor([[[1.0, -1.0]]]))  # logits [1, -1] -> expert 0
    s = sigmoid(1.0)
    h = s * sigmoid(s) * s  # silu(s * 1) * (s * 1)
    torch.testing.assert_close(y, torch.tensor([[[h, 2 * h]]]))
    output_weighted = s * sigmoid(1.0)  # s * expert(x) = s * silu(1) * 1: what the spec rules out
    assert abs(h - output_weighted) > 0.1


def test_tokens_per_expert_counts_in_training_only():
    moe = make_moe(2)
    x = make_input()
    expect = torch.tensor(routed_counts(moe, x), dtype=torch.float32)
    moe.train()
    moe(x)
    with torch.no_grad():
        moe(x)
    torch.testing.assert_close(moe.tokens_per_expert, 2 * expect)
    assert moe.tokens_per_expert.sum().item() == 2 * x.shape[0] * x.shape[1] * 2
    moe.eval()
    moe(x)
    torch.testing.assert_close(moe.tokens_per_expert, 2 * expect)


def test_padding_is_routed_but_not_counted():
    """`valid_BS` leaves the output alone and counts only the valid tokens' slots in `tokens_per_expert`."""
    moe = make_moe(2)
    x = make_input()
    valid = torch.ones(x.shape[:2], dtype=torch.bool)
    valid[:, -5:] = False  # each row's last 5 tokens are padding
    moe.train()
    with torch.no_grad():
        y_all = moe(x)
        moe.tokens_per_expert.zero_()
        y_masked = moe(x, valid)
    torch.testing.assert_close(y_masked, y_all, rtol=0, atol=0)
    expect = torch.tensor(routed_counts(moe, x[:, :-5]), dtype=torch.float32)
    torch.testing.assert_close(moe.tokens_per_expert, expect)


@pytest.mark.parametrize("top_k", [1, 2])
def test_force_balance_gives_equal_counts(top_k):
    moe = make_moe(top_k, favoured=(5,))  # routing alone would send every token to expert 5
    moe.router.force_balance = True
    moe.train()
    x = make_input(T=64, favoured=True)
    y = moe(x)
    assert moe.tokens_per_expert.tolist() == [64 * top_k / E] * E
    _, ids_TK, _ = moe.router(x.reshape(-1, D))
    assert all(len(set(row)) == top_k for row in ids_TK.tolist())  # a token's k experts are distinct
    moe.use_loop = True
    torch.testing.assert_close(y, moe(x))


def test_cpu_default_is_the_loop_and_missing_grouped_mm_falls_back(monkeypatch):
    moe, x = routing_case(2, (0, 3, 6))
    assert not moe.experts.use_grouped_mm(x.reshape(-1, D))
    ref = run_with_grads(moe, x)
    monkeypatch.setattr(moe_module, "_GROUPED_MM_OK", {})
    monkeypatch.delattr(torch, "_grouped_mm", raising=False)
    assert not grouped_mm_supported(CPU, torch.float32)
    assert_all_close(run_with_grads(moe, x), ref, rtol=0, atol=0)


def test_grouped_mm_probe_ignores_grad_mode(monkeypatch):
    monkeypatch.setattr(moe_module, "_GROUPED_MM_OK", {})
    with torch.inference_mode():
        under_inference = grouped_mm_supported(CPU, torch.float32)
    monkeypatch.setattr(moe_module, "_GROUPED_MM_OK", {})
    assert grouped_mm_supported(CPU, torch.float32) == under_inference


@pytest.mark.parametrize("top_k", [1, 2])
def test_matches_transformers_llama4_text_moe(top_k):
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

    hf = Llama4TextMoe(
        transformers.Llama4TextConfig(
            hidden_size=D, intermediate_size=FH, num_local_experts=E, num_experts_per_tok=top_k, hidden_act="silu"
        )
    )
    ours = make_moe(top_k)
    with torch.no_grad():
        hf.router.weight.copy_(ours.router.weight)
        hf.experts.gate_up_proj.copy_(ours.experts.w13)
        hf.experts.down_proj.copy_(ours.experts.w2)
        hf.shared_expert.gate_proj.weight.copy_(ours.shared_expert.w1.weight)
        hf.shared_expert.up_proj.weight.copy_(ours.shared_expert.w3.weight)
        hf.shared_expert.down_proj.weight.copy_(ours.shared_expert.w2.weight)
    x = make_input(T=64)
    x_ours, x_hf = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_ours = ours(x_ours)
    y_hf, logits_hf = hf(x_hf)
    assert (y_ours.reshape(-1, D) - y_hf).abs().max().item() <= 1e-5
    torch.testing.assert_close(ours.router(x.reshape(-1, D))[2], logits_hf)
    g = torch.randn(y_ours.shape, generator=torch.Generator().manual_seed(3))
    y_ours.backward(g)
    y_hf.backward(g.reshape(-1, D))
    torch.testing.assert_close(x_ours.grad, x_hf.grad)
    torch.testing.assert_close(ours.experts.w13.grad, hf.experts.gate_up_proj.grad)
    torch.testing.assert_close(ours.router.weight.grad, hf.router.weight.grad)


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("compiling", [False, True], ids=["eager", "gather"])
def test_decode_sized_path_matches_naive_reference(top_k, compiling, monkeypatch):
    """Inference with T*K <= E takes `_forward_few`: per-slot expert views in eager mode, gathered
    weights under torch.compile (exercised here by making `is_compiling` true)."""
    moe = make_moe(top_k).eval()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
    calls = []
    monkeypatch.setattr(moe, "_forward_few", lambda *a, f=moe._forward_few: calls.append(1) or f(*a))
    x = torch.randn(1, E // top_k, D, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = moe(x)
    assert calls, "the decode-sized path was not taken"
    torch.testing.assert_close(got, naive_moe(moe, x), rtol=1e-5, atol=1e-5)


# ---- the kernel decision, autocast, compilation ---------------------------------------------------------------


@pytest.mark.parametrize(("device", "dtype", "capability", "fast"), [
    ("cuda", torch.bfloat16, (9, 0), True),  # H100 / H200
    ("cuda", torch.bfloat16, (10, 0), True),  # B200
    ("cuda", torch.bfloat16, (8, 0), False),  # A100: torch >= 2.9 runs a slow fallback
    ("cuda", torch.float32, (9, 0), False),  # fp32 master weights outside autocast
    ("cpu", torch.bfloat16, None, False),  # on the CPU the grouped GEMM is itself a loop
])
def test_grouped_gemm_only_where_it_is_fast(device, dtype, capability, fast, monkeypatch):
    monkeypatch.setattr(moe_module, "_GROUPED_MM_FAST", {})
    monkeypatch.setattr(moe_module, "grouped_mm_supported", lambda d, t: True)  # a build that runs it
    assert moe_module.grouped_mm_fast(torch.device(device), dtype, capability) is fast


def test_experts_compute_in_the_autocast_dtype(monkeypatch):
    """Under bf16 autocast the experts get bf16 operands (fp32 master weights cast, as autocast would for a
    Linear), whichever kernel runs; the result equals the loop run on bf16 copies by hand, and gradients reach
    the fp32 weights."""
    moe = make_moe(2).train()
    x = make_input()
    seen = []
    grouped_mm = getattr(torch, "_grouped_mm", None)
    monkeypatch.setattr(torch, "_grouped_mm", lambda a, b, offs: seen.append((a.dtype, b.dtype)) or grouped_mm(
        a.float(), b.float(), offs=offs).to(a.dtype), raising=False)
    for grouped in ([False, True] if grouped_mm is not None else [False]):
        moe.experts.grouped = grouped
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = moe(x)
        assert moe.experts.kernel == ("grouped" if grouped else "loop")
        y.float().square().mean().backward()
        assert moe.experts.w13.grad.dtype == torch.float32 and moe.experts.w13.grad.abs().sum() > 0
        moe.zero_grad()
    assert seen and all(dt == (torch.bfloat16, torch.bfloat16) for dt in seen)
    ids = moe.router(x.reshape(-1, D))[1].flatten()
    order = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids, minlength=E)
    scores = moe.router(x.reshape(-1, D))[0].flatten()
    x_MD = (x.reshape(-1, D)[order // 2] * scores[order, None]).bfloat16()
    with torch.no_grad():
        ref = moe_module.GroupedExperts.forward_loop(moe.experts, x_MD, counts)  # no autocast: x's dtype, bf16
        moe.experts.grouped = False
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = moe.experts(x_MD.float(), counts)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_compiled_moe_model_has_no_graph_break():
    """A whole MoE model (training mode: routing records on) compiles with fullgraph=True, forward and backward,
    after `apply_compile`'s set-up (the kernel decided eagerly, the loop's counts as unbacked sizes); gradients and
    routing counts equal eager. The aot_eager backend: dynamo and AOTAutograd, without Inductor's code generation."""
    from behemoth import build_model
    from behemoth.config import get_preset
    from behemoth.parallel import apply_compile

    cfg = get_preset("debug").replace(moe=MoEConfig(num_experts=8, top_k=2, expert_dim=64, interleave_step=2))
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    segments = torch.tensor([[0] * 10 + [1] * 14, [0] * 24])

    def step(compiled: bool):
        model = build_model(cfg, seed=0).train()
        fn = model
        if compiled:
            apply_compile(model)  # per block, as training does; then the whole model in one graph
            fn = torch.compile(model, backend="aot_eager", fullgraph=True)
        fn(ids, segment_ids=segments).square().mean().backward()
        moes = [m for m in model.modules() if isinstance(m, MoE)]
        return [m.tokens_per_expert.clone() for m in moes], {n: p.grad for n, p in model.named_parameters()}

    torch._dynamo.reset()
    try:
        counts, grads = step(compiled=True)
    finally:
        torch._dynamo.reset()
    ref_counts, ref_grads = step(compiled=False)
    for got, want in zip(counts, ref_counts, strict=True):
        assert torch.equal(got, want)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
