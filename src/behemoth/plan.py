"""`behemoth plan`: will a model train or serve on N GPUs of M GB, and how long will it take?

Everything is arithmetic on the config (`ModelConfig.param_breakdown`), no weights are built. Memory is
per GPU, in GB of 10^9 bytes, by part; a plan fits when the parts sum to at most `usable` = 90% of each
GPU's memory (the rest goes to the CUDA context, NCCL buffers and allocator fragmentation; vLLM's default
`gpu_memory_utilization` is the same 0.9).

Serving (`mode="serve"`): weights and KV cache are sharded evenly over the GPUs (tensor/expert parallel):
  * weights: bf16 = 2 bytes per parameter; fp8 = 1 byte for the routed experts (with one fp32 scale per
    output channel) and bf16 for everything else, as Meta's FP8 Maverick checkpoint stores them;
  * KV cache (bf16, `inference.cache.cache_bytes`, what `behemoth serve` allocates): K and V of `batch`
    sequences of `context` tokens; chunked-attention (RoPE) layers keep at most `attention_chunk_size`
    tokens, NoPE (global) layers all of them;
  * activations: the transient of one prefill chunk (at most 8,192 tokens in flight, vLLM's default
    batch budget) through the widest layer, plus the fp32 logits of the last position of every sequence.
Training (`mode="train"`): FSDP (ZeRO-3) over all GPUs with expert parallelism (`expert_parallel_degree`),
mixed precision, AdamW; no tensor, context or pipeline parallelism, so the activations of a GPU's own
sequences do not shrink as GPUs are added:
  * weights: fp32 master weights sharded (4 bytes / parameter / GPU count) plus two blocks gathered in
    the compute precision (the one computing and the one prefetched), each with only its EP rank's experts;
  * gradients: fp32, sharded (4 bytes / parameter / GPU count); optimizer: AdamW's two fp32 moments (8);
  * activations: full activation checkpointing (each block keeps its bf16 input) plus one block's
    activations being recomputed, for `batch` sequences of `context` tokens per GPU (an estimate: see
    `_block_activation_bytes`).
Distillation (train plans): the largest frozen teacher that fits beside the student in the memory left, sharded
the way `behemoth distill` shards it (FSDP over every GPU by decoder layers, forward only, bf16 weights: no
gradients or optimizer state): 2 bytes per parameter over the GPUs, plus two layers gathered at once, taken as
1/32 of the teacher each (a teacher of 32+ layers), so P parameters cost P x (2 / GPUs + 1/8) bytes per GPU. Not
counted: its embeddings and head, which stay gathered while it runs (Llama 3 70B: 4.2 GB), and its activations.
One GPU as a benchmark runs it (`train_step_memory`, `forward_memory`, `step_peak`): the same parts for one
process, or FSDP2 over a few, in the precisions the step really uses (fp32 master weights under bf16 autocast, pure
bf16, or fp32), with or without activation checkpointing; the parts' peak takes into account that gradients are
made in the backward while the activations of the same blocks are freed (see `step_peak`), where a plan above adds
every part.
FLOPs per token: training `ModelConfig.train_flops_per_token` (6 x active parameters + attention);
serving a third of it (the forward pass). Time = FLOPs / (GPUs x sustained TFLOP/s): per training step
(every GPU's `batch` x `context` tokens), per generated token at `batch` sequences, and for `tokens`
tokens in all when given.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from behemoth import roofline
from behemoth.config import ModelConfig
from behemoth.inference.cache import cache_bytes

GB = 1e9
USABLE = 0.9  # share of each GPU's memory a plan may fill
PREFILL_TOKENS = 8192  # tokens in flight per serving step, at most
MAX_GPUS = 1 << 20  # the search for the minimum GPU count stops here


@dataclass(frozen=True)
class PlanRequest:
    mode: str  # train | serve
    gpus: int
    gpu_mem_gb: float
    precision: str  # bf16 | fp8
    context: int  # tokens per sequence
    batch: int  # sequences (serve: in all; train: per GPU)
    tflops: float  # sustained dense TFLOP/s per GPU, for the time estimates
    tokens: float | None = None  # training tokens in all (train) or tokens to generate (serve)
    gpu: str = "h100"  # serve: the GPU whose memory bandwidth and interconnect bound decode (`roofline.HARDWARE`)
    hbm_tb_s: float | None = None  # serve: override its memory bandwidth (TB/s)
    link_gb_s: float | None = None  # serve: override its interconnect (GB/s each way)

    def check(self) -> None:
        for name, ok in (("mode", self.mode in ("train", "serve")), ("gpus", self.gpus >= 1),
                         ("gpu_mem_gb", self.gpu_mem_gb > 0), ("precision", self.precision in ("bf16", "fp8")),
                         ("context", self.context >= 1), ("batch", self.batch >= 1), ("tflops", self.tflops > 0),
                         ("tokens", self.tokens is None or self.tokens > 0),
                         ("hbm_tb_s", self.hbm_tb_s is None or self.hbm_tb_s > 0),
                         ("link_gb_s", self.link_gb_s is None or self.link_gb_s > 0)):
            if not ok:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)!r}: not a valid value")


def _weight_bytes(cfg: ModelConfig, precision: str) -> float:
    """Serving weights: bf16 everywhere, or fp8 routed experts (+ fp32 per-channel scales) and bf16 rest."""
    total = cfg.param_breakdown()["total"]
    n = sum(total.values())
    if precision == "bf16":
        return 2.0 * n
    experts = total["routed_experts"]
    scales = 0
    if cfg.moe is not None:  # one scale per output channel of w13 (2F) and w2 (D), per expert and layer
        scales = len(cfg.moe_layers) * cfg.moe.num_experts * (2 * cfg.moe.expert_dim + cfg.dim)
    return 1.0 * experts + 4.0 * scales + 2.0 * (n - experts)


def _widest_ffn(cfg: ModelConfig) -> int:
    """Hidden width of the widest feed-forward a token goes through in one layer (routed + shared)."""
    widths = [cfg.ffn_dim] if len(cfg.moe_layers) < cfg.n_layers else []
    if cfg.moe is not None and cfg.moe_layers:
        widths.append((cfg.moe.top_k + cfg.moe.num_shared_experts) * cfg.moe.expert_dim)
    return max(widths)


def ffn_activation_bytes(dim: int, hidden: int, visits: int, value_bytes: float = 2.0) -> float:
    """Bytes one token keeps for the backward of a feed-forward of `hidden` width in all (routed + shared, or
    dense) that it enters `visits` times (once per expert it visits): its input each time (D) and the gate, up and
    product activations of the whole width (3 x hidden), `value_bytes` each (2: bf16)."""
    return value_bytes * (visits * dim + 3 * hidden)


def _block_activation_bytes(cfg: ModelConfig, residual_bytes: float = 2.0, value_bytes: float = 2.0) -> float:
    """Bytes one token keeps for the backward of one block (flash attention: no S x S scores): the two
    residuals (2D, `residual_bytes` each: the residual stream's precision, fp32 under autocast), and in
    `value_bytes` (the compute precision) the two norm outputs (2D), q/k/v and the attention output (2 q-width +
    2 kv-width), and in the feed-forward the input and gate/up/product activations of every expert the token
    visits (D + 3F each). The defaults, bf16 throughout, are what a plan counts."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    visits = 1 if cfg.moe is None else cfg.moe.top_k + cfg.moe.num_shared_experts
    return (residual_bytes * 2 * cfg.dim + value_bytes * (2 * cfg.dim + 2 * q + 2 * kv)
            + ffn_activation_bytes(cfg.dim, _widest_ffn(cfg), visits, value_bytes))


def expert_parallel_degree(cfg: ModelConfig, gpus: int) -> int:
    """Training's EP degree: the largest divisor of the expert count that is at most the GPU count (each
    EP rank holds num_experts / EP whole experts; the other GPUs are data-parallel replicas of that split)."""
    if cfg.moe is None or not cfg.moe_layers:
        return 1
    return max(d for d in range(1, min(cfg.moe.num_experts, gpus) + 1) if cfg.moe.num_experts % d == 0)


def _gathered_layer_params(cfg: ModelConfig, ep: int) -> int:
    """Parameters of the largest block as FSDP gathers it on one GPU: everything but the routed experts,
    and of those the 1/ep share this GPU's EP rank owns."""
    total = cfg.param_breakdown()["total"]
    attn = total["attention"] / cfg.n_layers
    dense = 3 * cfg.dim * cfg.ffn_dim if len(cfg.moe_layers) < cfg.n_layers else 0
    moe = 0.0
    if cfg.moe_layers:
        n = len(cfg.moe_layers)
        moe = (total["routers"] + total["shared_experts"] + total["routed_experts"] / ep) / n
    return int(attn + max(dense, moe))


def memory_per_gpu(cfg: ModelConfig, req: PlanRequest, gpus: int) -> dict[str, float]:
    """Bytes per GPU by part at `gpus` GPUs (see the module docstring)."""
    n = cfg.num_params()
    if req.mode == "serve":
        prefill = min(PREFILL_TOKENS, req.batch * req.context)
        transient = prefill * 2.0 * (4 * cfg.dim + 3 * _widest_ffn(cfg)) + req.batch * cfg.vocab_size * 4.0
        return {"weights": _weight_bytes(cfg, req.precision) / gpus, "gradients": 0.0, "optimizer": 0.0,
                "activations": transient / gpus,
                "kv_cache": cache_bytes(cfg, req.batch, req.context)["total"] / gpus}
    compute_bytes = 1.0 if req.precision == "fp8" else 2.0
    tokens = req.batch * req.context
    checkpoints = cfg.n_layers * tokens * cfg.dim * 2.0
    logits = min(tokens, 1024) * cfg.vocab_size * 4.0  # fp32 logits of one 1,024-token loss chunk
    gathered = 2 * compute_bytes * _gathered_layer_params(cfg, expert_parallel_degree(cfg, gpus))
    return {"weights": 4.0 * n / gpus + gathered, "gradients": 4.0 * n / gpus,
            "optimizer": 8.0 * n / gpus,
            "activations": checkpoints + tokens * _block_activation_bytes(cfg) + logits, "kv_cache": 0.0}


def _fits(cfg: ModelConfig, req: PlanRequest, gpus: int) -> bool:
    return sum(memory_per_gpu(cfg, req, gpus).values()) <= USABLE * req.gpu_mem_gb * GB


def min_gpus(cfg: ModelConfig, req: PlanRequest) -> int | None:
    """The fewest GPUs (of `req.gpu_mem_gb`) on which the plan fits; None if no count up to 2^20 does."""
    if not _fits(cfg, req, MAX_GPUS):
        return None
    lo, hi = 1, MAX_GPUS  # memory per GPU only falls as GPUs are added: bisect
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if _fits(cfg, req, mid) else (mid + 1, hi)
    return lo


def teacher_bytes_per_param(gpus: int) -> float:
    """Bytes per GPU per parameter of a frozen bf16 teacher sharded over `gpus` (module docstring)."""
    return 2.0 / gpus + 2 * 2.0 / 32


PRECISION_BYTES = {"fp32": 4.0, "bf16": 2.0}  # bytes per value of the precisions a step's parts are held in


def _precision_bytes(name: str, what: str) -> float:
    if name not in PRECISION_BYTES:
        raise ValueError(f"{what}={name!r}: not one of {', '.join(PRECISION_BYTES)}")
    return PRECISION_BYTES[name]


def _root_params(cfg: ModelConfig) -> int:
    """Parameters outside the blocks: the embedding table, the output head (unless tied) and the final norm."""
    total = cfg.param_breakdown()["total"]
    return total["embeddings"] + total["output"] + cfg.dim


def train_step_memory(cfg: ModelConfig, batch: int, context: int, *, weights: str = "fp32", compute: str = "bf16",
                      activation_checkpointing: bool = False, fsdp_gpus: int | None = None, ep: int = 1,
                      optimizer: bool = True, logit_rows: int | None = 1024) -> dict[str, float]:
    """Bytes on one GPU, by part, of one training step (forward, loss, backward, AdamW) of `batch` sequences of
    `context` tokens on that GPU, as one process runs it (`fsdp_gpus` None) or as FSDP2 over `fsdp_gpus` processes
    with the routed experts split `ep`-way runs it (`parallel.distributed.parallelize`, blocks gathered in the
    compute precision). Add them with `step_peak`.

    `weights`: the parameters' precision, and that of their gradients and AdamW's two moments (fp32: master
    weights; with `compute` bf16 the step runs under bf16 autocast); `compute`: the precision matmuls read and
    activations are kept in; `optimizer=False`: a forward and backward only, no optimizer state. Parts:
      * weights, gradients, optimizer: `weights` bytes x 1, 1 and 2 per parameter, over the FSDP processes;
      * gathered (FSDP): the root (embeddings, final norm, head) held whole in `weights` precision for the whole
        step, and over 2+ processes two blocks in the compute precision (the planner's: computing, prefetched);
      * compute_copies: weights the forward keeps in the compute precision for the backward: under autocast in
        one process the bf16 cast of every matrix (every parameter but the embedding table and the norms); FSDP
        over one process every block, gathered from its forward to its backward (nothing to reshard for);
      * activations: with activation checkpointing each block's input in the residual stream's precision (the
        weights': autocast leaves the residual stream fp32) plus one block's activations being recomputed,
        without it every block's (`_block_activation_bytes`: residuals in the weights' precision, the rest in the
        compute precision); plus the fp32 logits of
        `logit_rows` tokens at once (the chunked loss: 1,024; None: every token, as a model computing full logits).
    """
    w, c = _precision_bytes(weights, "weights"), _precision_bytes(compute, "compute")
    n, root = cfg.num_params(), _root_params(cfg)
    gpus = fsdp_gpus or 1
    tokens = batch * context
    gathered = copies = 0.0
    if fsdp_gpus is None:
        if c < w:
            total = cfg.param_breakdown()["total"]
            copies = c * (n - total["embeddings"] - total["norms"])
    else:
        gathered = w * root
        if fsdp_gpus == 1:
            copies = c * (n - root)
        else:
            gathered += 2 * c * _gathered_layer_params(cfg, ep)
    block = tokens * _block_activation_bytes(cfg, w, c)
    if activation_checkpointing:
        acts = cfg.n_layers * tokens * cfg.dim * w + block
    else:
        acts = cfg.n_layers * block
    acts += (tokens if logit_rows is None else min(tokens, logit_rows)) * cfg.vocab_size * 4.0
    return {"weights": w * n / gpus, "gathered": gathered, "gradients": w * n / gpus,
            "optimizer": 2 * w * n / gpus if optimizer else 0.0, "compute_copies": copies, "activations": acts}


def forward_memory(cfg: ModelConfig, batch: int, context: int, *, weights: str = "bf16", compute: str = "bf16",
                   cache_len: int | None = None, logit_rows: int | None = 1024) -> dict[str, float]:
    """Bytes on one GPU, by part, of a forward without gradients (a frozen teacher, a prefill) of `batch` sequences
    of `context` tokens, weights held in `weights` precision: the residual stream (a block's input and output, in
    the weights' precision) and one block's activations (`_block_activation_bytes`, the rest in the `compute`
    precision) for every token, the fp32 logits of `logit_rows` tokens at once (None: every token), and with
    `cache_len` a KV cache of `batch` rows of that many tokens in the compute precision
    (`inference.cache.cache_bytes`)."""
    w, c = _precision_bytes(weights, "weights"), _precision_bytes(compute, "compute")
    tokens = batch * context
    acts = tokens * (2 * cfg.dim * w + _block_activation_bytes(cfg, w, c))
    acts += (tokens if logit_rows is None else min(tokens, logit_rows)) * cfg.vocab_size * 4.0
    kv = 0.0
    if cache_len is not None:
        kv = float(cache_bytes(cfg, batch, cache_len, torch.bfloat16 if c == 2.0 else torch.float32)["total"])
    return {"weights": w * cfg.num_params(), "gradients": 0.0, "optimizer": 0.0, "activations": acts,
            "kv_cache": kv}


def step_peak(mem: dict[str, float]) -> float:
    """The most bytes of `mem` (a `train_step_memory`, `forward_memory` or `memory_per_gpu` answer) held at once.
    Gradients are made in the backward block by block as the activations and compute copies of the same blocks
    are freed, and the previous step's are freed before the forward (`zero_grad(set_to_none=True)`), so those two
    are never held whole together: every other part plus max(gradients, compute_copies + activations)."""
    overlap = ("gradients", "compute_copies", "activations")
    rest = sum(v for k, v in mem.items() if k not in overlap)
    return rest + max(mem.get("gradients", 0.0), mem.get("compute_copies", 0.0) + mem.get("activations", 0.0))


def plan(cfg: ModelConfig, req: PlanRequest, name: str = "") -> dict:
    """The whole answer as a dict (what `behemoth plan --json` prints)."""
    req.check()
    mem = memory_per_gpu(cfg, req, req.gpus)
    total = sum(mem.values())
    train_fpt = cfg.train_flops_per_token(req.context)
    fpt = train_fpt if req.mode == "train" else train_fpt / 3
    rate = req.gpus * req.tflops * 1e12  # FLOP/s of the whole job
    out = {
        "model": name, "mode": req.mode, "gpus": req.gpus, "gpu_mem_gb": req.gpu_mem_gb,
        "precision": req.precision, "context": req.context, "batch": req.batch,
        "total_params": cfg.num_params(), "active_params": cfg.num_active_params(),
        "memory_gb_per_gpu": {k: v / GB for k, v in mem.items()} | {"total": total / GB},
        "usable_gb_per_gpu": USABLE * req.gpu_mem_gb,
        "fits": total <= USABLE * req.gpu_mem_gb * GB,
        "min_gpus": min_gpus(cfg, req),
        "flops_per_token": fpt, "sustained_tflops_per_gpu": req.tflops,
    }
    if req.mode == "train":
        out["ep"] = expert_parallel_degree(cfg, req.gpus)
        spare = USABLE * req.gpu_mem_gb * GB - total
        out["max_teacher_params"] = max(0.0, spare) / teacher_bytes_per_param(req.gpus)
        step_tokens = req.gpus * req.batch * req.context
        out["tokens_per_step"] = step_tokens
        out["seconds_per_step"] = fpt * step_tokens / rate
        if req.tokens is not None:
            out["total_seconds"] = fpt * req.tokens / rate
    else:
        out |= _serve_times(cfg, req)
        if req.tokens is not None:  # generated at the batch asked for
            out["total_seconds"] = req.tokens / (out["decode"]["tokens_per_s_per_gpu"] * req.gpus)
    if req.tokens is not None:
        out["tokens"] = req.tokens
        out["total_days"] = out["total_seconds"] / 86400
    return out


def _serve_times(cfg: ModelConfig, req: PlanRequest) -> dict:
    """Decode and prefill on the roofline (`roofline.py`): the bound that dominates, tokens/s, and the batch at
    which decode becomes compute-bound."""
    hw = roofline.hardware(req.gpu, req.hbm_tb_s, req.link_gb_s)
    args = dict(gpus=req.gpus, tflops=req.tflops, precision=req.precision)
    return {"hardware": {"name": hw.name, "hbm_tb_s": hw.hbm_tb_s, "link_gb_s": hw.link_gb_s,
                         "collective_us": hw.collective_us},
            "decode": roofline.decode(cfg, hw, req.batch, req.context, **args),
            "prefill": roofline.prefill(cfg, hw, 1, req.context, **args),
            "compute_bound_batch": roofline.compute_bound_batch(cfg, hw, req.context, **args)}


def _serve_rows(p: dict) -> list[str]:
    d, f, hw = p["decode"], p["prefill"], p["hardware"]
    b = d["bounds_seconds"]
    cb = p["compute_bound_batch"]
    return [f"on {hw['name']} ({hw['hbm_tb_s']:g} TB/s memory, {hw['link_gb_s']:g} GB/s link each way) at "
            f"{p['sustained_tflops_per_gpu']:g} TFLOP/s sustained per GPU:",
            f"  decode step of {p['batch']:,} sequence{'s' if p['batch'] != 1 else ''} at {p['context']:,} tokens: "
            f"{d['seconds'] * 1e3:.3g} ms, "
            f"{d['bound']}-bound (compute {b['compute'] * 1e3:.3g} ms, memory {b['memory'] * 1e3:.3g} ms, "
            f"all-to-all {b['all_to_all'] * 1e3:.3g} ms); {d['tokens_per_s_per_sequence']:,.1f} tokens/s per "
            f"sequence, {d['tokens_per_s_per_gpu']:,.1f} per GPU",
            f"  prefill of one {p['context']:,}-token prompt: {f['seconds'] * 1e3:.4g} ms, {f['bound']}-bound",
            "  decode becomes compute-bound at batch " + (f"{cb:,}" if cb else "never (the KV cache grows with "
                                                          "the batch as fast as the compute)")]


def format_plan(p: dict) -> str:
    """The human-readable table of `plan`'s answer."""
    rows = [f"{p['model'] or 'model'}: {p['total_params']:,} parameters, {p['active_params']:,} active per token; "
            f"{p['mode']} in {p['precision']} on {p['gpus']:,} x {p['gpu_mem_gb']:g} GB, context {p['context']:,}, "
            f"batch {p['batch']:,}{' per GPU' if p['mode'] == 'train' else ''}",
            f"{'memory per GPU':<22}{'GB':>12}"]
    for part, gb in p["memory_gb_per_gpu"].items():
        rows.append(f"  {part:<20}{gb:>12,.2f}")
    verdict = "fits" if p["fits"] else "does NOT fit"
    rows.append(f"{verdict} in {p['usable_gb_per_gpu']:,.1f} GB usable per GPU (90%); fewest GPUs that fit: "
                + (f"{p['min_gpus']:,}" if p["min_gpus"] is not None else
                   "none (what does not shrink with more GPUs is already too much"
                   + ("; lower --batch or --context, or add tensor/pipeline parallelism)" if p["mode"] == "train"
                      else ")")))
    if p["mode"] == "train":
        rows.append(f"parallelism: FSDP over {p['gpus']:,} GPUs, experts split {p['ep']}-way (EP)")
        rows.append(f"distillation: a frozen teacher (any family, bf16, FSDP over the {p['gpus']:,} GPUs by its "
                    f"layers, 32 or more of them) fits beside it up to {p['max_teacher_params'] / 1e9:,.1f}B "
                    "parameters, less its gathered embeddings and head")
    rows.append(f"FLOPs per token: {p['flops_per_token']:.4g} ({'training' if p['mode'] == 'train' else 'forward'})")
    tf = p["sustained_tflops_per_gpu"]
    if p["mode"] == "train":
        rows.append(f"at {tf:g} TFLOP/s per GPU: {p['seconds_per_step']:.3g} s per step of "
                    f"{p['tokens_per_step']:,} tokens")
    else:
        rows += _serve_rows(p)
    if "total_seconds" in p:
        rows.append(f"{p['tokens']:.4g} tokens: {p['total_seconds']:.4g} s = {p['total_days']:.1f} days")
    return "\n".join(rows)
