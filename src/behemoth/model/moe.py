"""The Llama 4 mixture-of-experts block: Router, GroupedExperts, MoE (routed + shared expert).

Semantics (llama4_spec.md §3.7, which HF and Meta share):
  1. router logits r = W_router x, computed here in fp32;
  2. top-k over r; score = sigmoid(r_e) of the chosen experts, no renormalisation;
  3. the score multiplies the expert *input*: z_e = x * score_e (SwiGLU is nonlinear, so this is
     not the same as weighting the output);
  4. out = shared_expert(x) + sum_e expert_e(z_e), the shared expert on the raw x.

The fast path sorts token slots by expert and runs all experts as two grouped GEMMs
(`torch._grouped_mm` where the build supports it, else a per-expert loop over the sorted slices);
no FLOPs are spent on experts a token did not choose. `GroupedExperts.forward_loop` is the plain
reference the tests compare against.

Shape legend: B batch, S sequence, T tokens (B*S), D model dim, F expert hidden dim, E experts,
K top-k, M routed slots (T*K).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from behemoth.config import ModelConfig
from behemoth.model.layers import FeedForward

_GROUPED_MM_OK: dict[tuple[str, torch.dtype], bool] = {}


def grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `torch._grouped_mm` runs here (probed once per device type and dtype).

    CUDA builds support it for bf16 on Hopper and newer; recent CPU builds support it too.
    Anything that raises falls back to the loop, which is slower but exact.
    """
    key = (device.type, dtype)
    if key not in _GROUPED_MM_OK:
        ok = hasattr(torch, "_grouped_mm")
        if ok:
            try:
                a = torch.ones(16, 16, device=device, dtype=dtype)
                b = torch.ones(2, 16, 16, device=device, dtype=dtype)
                offs = torch.tensor([8, 16], device=device, dtype=torch.int32)
                ok = bool(torch._grouped_mm(a, b, offs=offs)[0, 0].item() == 16)
            except (RuntimeError, NotImplementedError, TypeError):
                ok = False
        _GROUPED_MM_OK[key] = ok
    return _GROUPED_MM_OK[key]


class Router(nn.Module):
    """Sigmoid top-k router. `force_balance` (benchmarks only) assigns slots round-robin so that every
    expert gets the same number of tokens, while scores still come from the router's logits."""

    def __init__(self, dim: int, num_experts: int, top_k: int):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        self.force_balance = False

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, D] -> scores [T, K] fp32, expert ids [T, K] int64, logits [T, E] fp32."""
        logits_TE = F.linear(x_TD.float(), self.weight.float())
        if self.force_balance:
            T = x_TD.shape[0]
            slots = torch.arange(T * self.top_k, device=x_TD.device).view(T, self.top_k)
            ids_TK = slots % self.num_experts
        else:
            ids_TK = torch.topk(logits_TE, self.top_k, dim=-1).indices
        scores_TK = torch.sigmoid(logits_TE.gather(-1, ids_TK))
        return scores_TK, ids_TK, logits_TE


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored as 3-D weights, input-major (y = x @ W), the HF layout:
    `w13` [E, D, 2F] with the gate (Meta w1) in [..., :F] and the up projection (w3) in [..., F:];
    `w2` [E, F, D] (down)."""

    def __init__(self, dim: int, hidden_dim: int, num_experts: int):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.w13 = nn.Parameter(torch.empty(num_experts, dim, 2 * hidden_dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))

    def forward(self, x_MD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """x [M, D] sorted by expert, counts [E] -> [M, D]. Grouped GEMMs where supported."""
        if not grouped_mm_supported(x_MD.device, x_MD.dtype):
            return self.forward_loop(x_MD, counts_E)
        offs_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
        h_MF2 = torch._grouped_mm(x_MD, self.w13, offs=offs_E)
        gate_MF, up_MF = h_MF2.chunk(2, dim=-1)
        return torch._grouped_mm(F.silu(gate_MF) * up_MF, self.w2, offs=offs_E)

    def forward_loop(self, x_MD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Reference: one matmul pair per expert over its contiguous slice of sorted tokens."""
        outs, start = [], 0
        for e, n in enumerate(counts_E.tolist()):
            if n == 0:
                continue
            gate_nF, up_nF = (x_MD[start:start + n] @ self.w13[e]).chunk(2, dim=-1)
            outs.append((F.silu(gate_nF) * up_nF) @ self.w2[e])
            start += n
        return torch.cat(outs) if outs else x_MD.new_zeros(x_MD.shape)


class MoE(nn.Module):
    """Routed experts plus an optional shared expert.

    forward: route (fp32) -> sort slots by expert -> scale inputs by score -> grouped experts ->
    unsort -> sum over k -> + shared_expert(x).

    `tokens_per_expert` (non-persistent) accumulates routed counts in training mode only; the
    trainer reads and resets it for balance statistics and bias updates.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        m = cfg.moe
        assert m is not None
        self.num_experts, self.top_k = m.num_experts, m.top_k
        self.router = Router(cfg.dim, m.num_experts, m.top_k)
        self.experts = GroupedExperts(cfg.dim, m.expert_dim, m.num_experts)
        self.shared_expert = FeedForward(cfg.dim, m.expert_dim) if m.num_shared_experts else None
        self.register_buffer("tokens_per_expert", torch.zeros(m.num_experts), persistent=False)
        self.use_loop = False  # route through GroupedExperts.forward_loop (the reference)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(-1, D)
        scores_TK, ids_TK, _ = self.router(x_TD)
        ids_M = ids_TK.flatten()
        order_M = torch.argsort(ids_M, stable=True)
        counts_E = torch.bincount(ids_M, minlength=self.num_experts)
        if self.training:
            with torch.no_grad():
                self.tokens_per_expert += counts_E.to(self.tokens_per_expert.dtype)
        x_MD = x_TD[order_M // self.top_k] * scores_TK.flatten()[order_M, None].to(x_TD.dtype)
        run = self.experts.forward_loop if self.use_loop else self.experts
        y_MD = run(x_MD, counts_E)
        y_TD = torch.empty_like(y_MD).index_copy_(0, order_M, y_MD).view(-1, self.top_k, D).sum(1)
        if self.shared_expert is not None:
            y_TD = y_TD + self.shared_expert(x_TD)
        return y_TD.view(B, S, D)
