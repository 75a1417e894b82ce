"""The Llama 4 mixture-of-experts block: Router, GroupedExperts, MoE (routed + shared expert).

Semantics (Meta's llama-models `moe.py` and transformers' `Llama4TextMoe` agree):
  1. router logits r = W_router x, computed here in fp32;
  2. top-k over r; score = sigmoid(r_e) of the chosen experts, no renormalisation;
  3. the score multiplies the expert *input*: z_e = x * score_e (SwiGLU is nonlinear, so this is
     not the same as weighting the output);
  4. out = shared_expert(x) + sum_e expert_e(z_e), the shared expert on the raw x.

Routed slots are sorted by expert so that every expert multiplies one contiguous slice; no FLOPs are
spent on experts a token did not choose. Two kernels compute the experts, equal up to rounding:
  * `torch._grouped_mm` (one grouped GEMM per projection, no host sync): where it is fast, bf16 on a
    Hopper (sm90) or Blackwell (sm100) GPU whose torch runs it (`grouped_mm_fast`), with operands that
    meet its 16-byte alignment. Elsewhere torch either lacks it or runs a slow fallback (sm80 from
    torch 2.9; on the CPU it is itself a loop of GEMMs);
  * a loop of plain matmuls, one pair per expert, everywhere else (measured in benchmarks/README.md,
    `moe_layer.py`). Under torch.compile the loop reads the counts as unbacked sizes
    (`capture_scalar_outputs`, which `parallel.apply_compile` turns on), so it traces without a break.
The experts compute in autocast's dtype where autocast is on (bf16 on a GPU): `torch._grouped_mm` is not
on autocast's list, so fp32 master weights would otherwise reach it as fp32. The kernel is decided eagerly
(`prepare_expert_kernels`, called before compiling): a compiled forward only reads that decision and
checks shapes, never probes or reads a pointer. `MoE.use_loop` forces the loop (the reference the tests
compare against); `GroupedExperts.grouped = True` forces the grouped kernel; `GroupedExperts.kernel`
names the one the last eager forward ran.

Shape legend: B batch, S sequence, T tokens (B*S), D model dim, F expert hidden dim, E experts,
K top-k, M routed slots (T*K), n slots of one expert.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from behemoth.config import ModelConfig
from behemoth.model.layers import FeedForward

_GROUPED_MM_OK: dict[tuple[str, torch.dtype], bool] = {}
_GROUPED_MM_FAST: dict[tuple[str, torch.dtype], bool] = {}
FAST_CAPABILITIES = (9, 10)  # compute capability majors where the grouped GEMM has a native kernel


def grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `torch._grouped_mm` runs forward and backward here (probed once per device type and dtype).

    CUDA builds support it for bf16 on Hopper (and on sm80+ from torch 2.9); CPU builds from torch 2.9.
    Anything that raises or gives a wrong number counts as unsupported. The probe runs with autograd
    on, so that a first call under `no_grad` or `inference_mode` does not cache a wrong answer. It reads
    numbers on the host: call it eagerly, never inside a compiled region (`prepare_expert_kernels`).
    """
    key = (device.type, dtype)
    if key not in _GROUPED_MM_OK:
        ok = hasattr(torch, "_grouped_mm")
        if ok:
            try:
                with torch.inference_mode(False), torch.enable_grad():
                    a = torch.ones(16, 16, device=device, dtype=dtype, requires_grad=True)
                    b = torch.ones(2, 16, 16, device=device, dtype=dtype, requires_grad=True)
                    offs = torch.tensor([8, 16], device=device, dtype=torch.int32)
                    y = torch._grouped_mm(a, b, offs=offs)
                    y.backward(torch.ones_like(y))
                    ok = (y[0, 0].item(), a.grad[0, 0].item(), b.grad[1, 0, 0].item()) == (16, 16, 8)
            except Exception:  # an unsupported build, device or dtype: fall back to the loop
                ok = False
        _GROUPED_MM_OK[key] = ok
    return _GROUPED_MM_OK[key]


def grouped_mm_fast(device: torch.device, dtype: torch.dtype, capability: tuple[int, int] | None = None) -> bool:
    """Whether experts computing in `dtype` on `device` should take the grouped GEMM: bf16 on CUDA with compute
    capability 9.x or 10.x (`capability`, default the device's) and a torch that runs it (probed). Decided once
    per device type and dtype, eagerly; `prepare_expert_kernels` makes the decision before compiling."""
    key = (device.type, dtype)
    if key not in _GROUPED_MM_FAST:
        fast = device.type == "cuda" and dtype == torch.bfloat16
        if fast:
            major = (capability or torch.cuda.get_device_capability(device))[0]
            fast = major in FAST_CAPABILITIES and grouped_mm_supported(device, dtype)
        _GROUPED_MM_FAST[key] = fast
    return _GROUPED_MM_FAST[key]


def prepare_expert_kernels(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Decide the experts' kernel for `dtype` (the autocast dtype, or the weights') on `device` now, eagerly, so
    that a compiled forward finds the decision made (it cannot probe). Returns whether it is the grouped GEMM."""
    return grouped_mm_fast(torch.device(device), dtype)


def _decided_fast(device: torch.device, dtype: torch.dtype) -> bool:
    """`grouped_mm_fast` eagerly; under compilation only the decision made before (none made: the loop)."""
    if torch.compiler.is_compiling():
        return _GROUPED_MM_FAST.get((device.type, dtype), False)
    return grouped_mm_fast(device, dtype)


def _aligned_16(t: torch.Tensor, pointer: bool = True) -> bool:
    """Every non-unit stride a multiple of 16 bytes with a unit last stride, and (`pointer`, eager only) the base
    pointer too. A compiled forward checks strides alone: its operands are fresh tensors, and reading a pointer
    would break the graph."""
    es = t.element_size()
    strides_ok = t.stride(-1) == 1 and all(s * es % 16 == 0 for s in t.stride()[:-1])
    return strides_ok and (not pointer or t.data_ptr() % 16 == 0)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the experts compute in: autocast's where it is on for `x`'s device, else `x`'s."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


class Router(nn.Module):
    """Sigmoid top-k router.

    `expert_bias` [E] is the auxiliary-loss-free balancing bias (DeepSeek-V3): it is added to the
    logits for the top-k *selection only*; the scores stay sigmoid(unbiased logit). It is zero in
    every released Llama 4 checkpoint and is moved by the trainer (`train.balance.BiasBalancer`),
    never by gradients. `selection_noise` (training only, set by the trainer): the standard deviation
    of Gaussian noise added to the biased logits for the selection, which splits groups of identical
    tokens between experts (`train/balance.py`); in eval mode, and at 0, selection is deterministic.
    `force_balance` (benchmarks only) assigns slots round-robin so that every expert gets the same
    number of tokens, while scores still come from the router's logits.
    """

    def __init__(self, dim: int, num_experts: int, top_k: int):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        self.register_buffer("expert_bias", torch.zeros(num_experts))
        self.selection_noise = 0.0
        self.force_balance = False

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, D] -> scores [T, K] fp32, expert ids [T, K] int64, logits [T, E] fp32."""
        with torch.autocast(x_TD.device.type, enabled=False):  # router math in fp32, also under autocast
            logits_TE = F.linear(x_TD.float(), self.weight.float())
        if self.force_balance:
            T = x_TD.shape[0]
            slots = torch.arange(T * self.top_k, device=x_TD.device).view(T, self.top_k)
            ids_TK = slots % self.num_experts
        else:
            select_TE = logits_TE + self.expert_bias.float()
            if self.training and self.selection_noise > 0:
                select_TE = select_TE + self.selection_noise * torch.randn_like(select_TE)
            ids_TK = torch.topk(select_TE, self.top_k, dim=-1).indices
        scores_TK = torch.sigmoid(logits_TE.gather(-1, ids_TK))
        return scores_TK, ids_TK, logits_TE


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored as 3-D weights, input-major (y = x @ W), the HF layout:
    `w13` [E, D, 2F] with the gate (Meta w1) in [..., :F] and the up projection (w3) in [..., F:];
    `w2` [E, F, D] (down).

    `grouped` picks the kernel: None lets `use_grouped_mm` decide, True forces `torch._grouped_mm`,
    False forces the per-expert loop; either computes in `compute_dtype` (autocast's, under autocast).
    `direct_ok`: the weights hold every expert, so `MoE` may index them by expert id for decode-sized inputs (a
    subclass holding a slice of the experts sets it False).
    """

    direct_ok = True

    def __init__(self, dim: int, hidden_dim: int, num_experts: int):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.w13 = nn.Parameter(torch.empty(num_experts, dim, 2 * hidden_dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.grouped: bool | None = None
        self.kernel: str | None = None  # "grouped" or "loop": what the last eager forward ran

    def use_grouped_mm(self, x_MD: torch.Tensor) -> bool:
        """The default kernel choice for input `x` [M, D]: the grouped GEMM where it is fast for the dtype the
        experts compute in (`grouped_mm_fast`) and the operands meet its 16-byte alignment; else the loop."""
        dtype = compute_dtype(x_MD)
        if not _decided_fast(x_MD.device, dtype):
            return False
        w13, w2 = self.weights()
        es = torch.finfo(dtype).bits // 8
        if (self.hidden_dim * es % 16) or (x_MD.shape[-1] * es % 16):  # the [M, F] activation and [M, D] rows
            return False
        if w13.dtype != dtype or w2.dtype != dtype:  # cast in the forward: fresh, contiguous copies
            return all(w.shape[-1] * es % 16 == 0 for w in (w13, w2))
        pointer = not torch.compiler.is_compiling()
        return all(_aligned_16(t, pointer) for t in (w13, w2))

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w13, w2) as the kernels use them (a subclass holding distributed tensors returns its local part)."""
        return self.w13, self.w2

    def operands(self, x_MD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x [M, D], w13, w2) in the dtype the experts compute in (`compute_dtype`); casts only what differs."""
        dtype = compute_dtype(x_MD)
        w13, w2 = self.weights()
        return x_MD.to(dtype), w13.to(dtype), w2.to(dtype)

    def forward(self, x_MD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """x [M, D] sorted by expert, counts [E] (slots per expert) -> [M, D] in the experts' compute dtype."""
        grouped = self.use_grouped_mm(x_MD) if self.grouped is None else self.grouped
        if not torch.compiler.is_compiling():
            self.kernel = "grouped" if grouped else "loop"
        return self.forward_grouped(x_MD, counts_E) if grouped else self.forward_loop(x_MD, counts_E)

    def forward_grouped(self, x_MD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Two grouped GEMMs over the sorted slots; offsets are int32 cumulative counts [E]."""
        offs_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
        x_MD, w13, w2 = self.operands(x_MD)
        gate_MF, up_MF = torch._grouped_mm(x_MD, w13, offs=offs_E).chunk(2, dim=-1)
        return torch._grouped_mm(F.silu(gate_MF) * up_MF, w2, offs=offs_E)

    def forward_loop(self, x_MD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """One matmul pair per expert over its contiguous slice [n, D]; experts with no slots are skipped (eager).

        The weights are `unbind`-ed once rather than indexed per expert: the backward of `w13[e]` would
        build a zero-filled [E, D, 2F] gradient for every expert and add them up (E^2 weight-sized memory
        traffic), while that of `unbind` stacks the E per-expert gradients once. Under torch.compile the
        counts become unbacked sizes (one host read, as eager has), bounded by `torch._check` so that the
        split traces; an empty slice is then multiplied rather than skipped.
        """
        counts = counts_E.tolist()
        compiling = torch.compiler.is_compiling()
        if compiling:
            for n in counts:
                torch._check(n >= 0)
            torch._check(sum(counts) == x_MD.shape[0])
        outs = []
        x_MD, w13, w2 = self.operands(x_MD)
        slices = zip(x_MD.split(counts), w13.unbind(0), w2.unbind(0), counts, strict=True)
        for x_nD, w13_DF2, w2_FD, n in slices:
            if not compiling and n == 0:
                continue
            gate_nF, up_nF = (x_nD @ w13_DF2).chunk(2, dim=-1)
            outs.append((F.silu(gate_nF) * up_nF) @ w2_FD)
        return torch.cat(outs) if outs else x_MD.new_zeros(x_MD.shape)


class MoE(nn.Module):
    """Routed experts plus an optional shared expert.

    forward: route (fp32) -> sort slots by expert -> scale inputs by score -> experts -> unsort ->
    sum over k -> + shared_expert(x).

    In training mode only: `tokens_per_expert` [E] (non-persistent) accumulates routed counts, which the
    trainer reads and resets for balance statistics and bias updates; and `last_router_logits` [B, S, E]
    (fp32, with grad) and `last_expert_ids` [B, S, K] keep the latest forward's routing for the router
    losses (per sequence for the sequence-wise balance loss), with `last_valid` [B, S] (padding False, which
    the losses leave out). `record_routing = False` turns that
    bookkeeping off, so that a wrapper which runs a forward a second time (activation checkpointing's
    recomputation in backward) records each token once.
    `use_loop` routes the experts through `GroupedExperts.forward_loop`, the reference.
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
        self.use_loop = False
        self.record_routing = True
        self.last_router_logits: torch.Tensor | None = None
        self.last_expert_ids: torch.Tensor | None = None
        self.last_valid: torch.Tensor | None = None  # [B, S] bool, padding False (None: every token)

    def forward(self, x_BSD: torch.Tensor, valid_BS: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, S, D] -> [B, S, D]. `valid_BS` [B, S] bool: the tokens that count in `tokens_per_expert`
        (None: all); padding is computed like any token but is not load the routing bias should balance."""
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(-1, D)
        scores_TK, ids_TK, logits_TE = self.router(x_TD)
        few = not self.training and not self.use_loop and x_TD.shape[0] * self.top_k <= self.num_experts
        # where the grouped GEMM runs, it is sync-free already
        if few and self.experts.direct_ok and not self.experts.use_grouped_mm(x_TD):
            return self._forward_few(x_TD, scores_TK, ids_TK).view(B, S, D)
        ids_M = ids_TK.flatten()
        order_M = torch.argsort(ids_M, stable=True)  # slot m = t*K + k, sorted by expert id
        counts_E = ids_M.new_zeros(self.num_experts).scatter_add_(0, ids_M, torch.ones_like(ids_M))  # no host sync
        if self.training and self.record_routing:
            self.last_router_logits, self.last_expert_ids = logits_TE.view(B, S, -1), ids_TK.view(B, S, -1)
            self.last_valid = valid_BS
            with torch.no_grad():
                if valid_BS is None:
                    self.tokens_per_expert += counts_E.to(self.tokens_per_expert.dtype)
                else:  # the valid tokens' slots only (a scatter: no host sync)
                    valid_M = valid_BS.reshape(-1, 1).expand(-1, self.top_k).reshape(-1)
                    self.tokens_per_expert.scatter_add_(0, ids_M, valid_M.to(self.tokens_per_expert.dtype))
        x_MD = x_TD[order_M // self.top_k] * scores_TK.flatten()[order_M, None].to(x_TD.dtype)
        run = self.experts.forward_loop if self.use_loop else self.experts
        y_MD = run(x_MD, counts_E)
        y_MD = torch.empty_like(y_MD).index_copy_(0, order_M, y_MD)  # back to slot order t*K + k
        y_TD = y_MD if self.top_k == 1 else y_MD.view(-1, self.top_k, D).sum(1)
        if self.shared_expert is not None:
            y_TD = y_TD + self.shared_expert(x_TD)
        return y_TD.view(B, S, D)

    def _forward_few(self, x_TD: torch.Tensor, scores_TK: torch.Tensor, ids_TK: torch.Tensor) -> torch.Tensor:
        """Decode-sized inputs (inference, T*K <= E) where the grouped GEMM does not run (CPU, or a
        GPU/dtype without it): run each routed slot's expert directly, [T, D].

        Same math as the sorted path, without the sort / count / scatter machinery that dominates
        when there are only a few tokens. Eager: the expert ids are read on the host and each slot
        multiplies views of its expert's weights (nothing copied). Under `torch.compile` (no host
        reads allowed): the slots' expert weights are gathered and contracted in one einsum each, as
        in gpt-fast's MoE decoding.
        """
        T, D = x_TD.shape
        K = self.top_k
        x_MD = (x_TD if K == 1 else x_TD.repeat_interleave(K, 0)) * scores_TK.reshape(-1, 1).to(x_TD.dtype)
        ids_M = ids_TK.reshape(-1)
        w13_EDF2, w2_EFD = self.experts.w13, self.experts.w2
        if torch.compiler.is_compiling():
            h_MF2 = torch.einsum("md,mdf->mf", x_MD, w13_EDF2[ids_M])
            gate_MF, up_MF = h_MF2.chunk(2, dim=-1)
            y_MD = torch.einsum("mf,mfd->md", F.silu(gate_MF) * up_MF, w2_EFD[ids_M])
        else:
            rows = []
            for m, e in enumerate(ids_M.tolist()):
                gate_1F, up_1F = (x_MD[m:m + 1] @ w13_EDF2[e]).chunk(2, dim=-1)
                rows.append((F.silu(gate_1F) * up_1F) @ w2_EFD[e])
            y_MD = torch.cat(rows)
        y_TD = y_MD if K == 1 else y_MD.view(T, K, D).sum(1)
        if self.shared_expert is not None:
            y_TD = y_TD + self.shared_expert(x_TD)
        return y_TD
