"""Models of other families as frozen teachers: any causal LM that transformers loads (Llama 3, Qwen 2/3,
Mistral, Mixtral, Gemma, GPT-2, Phi, OLMo, ...), wrapped so the training steps use it as they use a native
teacher.

The architectures are transformers' own (`AutoModelForCausalLM`); nothing here re-implements one. What the
wrapper adds is the interface distillation needs (`hidden_states`, then `logits` chunk by chunk), so the
teacher's [tokens, vocabulary] logits never exist for a whole batch at once:

  hidden_states(input_ids_BS, positions_BS, segment_ids_BS)   the student's packed rows: each document
                                                              piece runs as its own row of a padded batch
                                                              (the row's other documents are not context),
                                                              the result scattered back to [B, S, D]
  hidden_rows(ids_RL, mask_RL)                                rows of the teacher's own tokens (cross-
                                                              tokenizer distillation), right-padded
  logits(h_ND)                                                the output head, with the family's own logit
                                                              post-processing (Gemma's soft-capping, Cohere's
                                                              and Granite's scaling)

Running each document as its own right-padded row is what every family supports the same way (a 2-D
attention mask), unlike packed rows with per-document masks, whose form differs across families and versions.
`load_foreign` checks, on a few tokens, that `logits(hidden_states)` reproduces the model's own forward
logits, so a family whose head does something else is refused rather than distilled wrongly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from behemoth.checkpoint.convert import CheckpointError

HF_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def _transformers():
    try:
        import transformers
    except ImportError:
        raise CheckpointError("a teacher of another model family is loaded through transformers; install it "
                              "(pip install 'behemoth[teachers]')") from None
    return transformers


@dataclass(frozen=True)
class ForeignConfig:
    """What the run needs to know about a transformers teacher (the model's own config is `hf`)."""

    model_type: str
    vocab_size: int  # rows of its output head (may exceed its tokenizer's size: padding)
    hidden_size: int
    num_layers: int
    params: int
    active: int  # parameters used per token (a MoE's routed experts counted by top-k / experts)
    hf: object = field(default=None, repr=False, compare=False)

    def num_params(self) -> int:
        return self.params

    def num_active_params(self) -> int:
        return self.active

    def train_flops_per_token(self, seq_len: int) -> float:
        """6 x active non-embedding parameters plus attention's 12 x layers x width x sequence: the same
        estimate `ModelConfig.train_flops_per_token` makes for a native model (a forward is a third)."""
        return 6.0 * self.active + 12.0 * self.num_layers * self.hidden_size * seq_len


def is_foreign(raw_config: dict) -> bool:
    """Whether a config.json describes a transformers model that is not Llama 4 (and not native)."""
    return (raw_config.get("format") != "behemoth" and "model_type" in raw_config
            and raw_config["model_type"] not in ("llama4", "llama4_text"))


def _active_params(model: nn.Module, hf_config) -> tuple[int, int]:
    """(total, active per token) non-embedding parameters: routed expert weights (".experts." in the name)
    counted by top-k / experts, from the config's `num_experts_per_tok` and `num_local_experts`/`num_experts`."""
    embed = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None
             for p in m.parameters()}
    k = getattr(hf_config, "num_experts_per_tok", None)
    e = (getattr(hf_config, "num_local_experts", None) or getattr(hf_config, "num_experts", None)
         or getattr(hf_config, "n_routed_experts", None))  # Mixtral, Qwen MoE, DeepSeek
    total, active = 0, 0.0
    for name, p in model.named_parameters():
        total += p.numel()
        if id(p) in embed:
            continue
        active += p.numel() * (k / e if k and e and ".experts." in name else 1)
    return total, int(active)


def _decoder_layers(base: nn.Module) -> nn.ModuleList:
    """The decoder's list of layers (`layers`, GPT-2's `h`, a multimodal model's language model's): the largest
    ModuleList anywhere in the base model."""
    lists = [m for m in base.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise CheckpointError(f"{type(base).__name__}: no list of decoder layers found")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


class ForeignTeacher(nn.Module):
    """A transformers causal LM, frozen, with the teacher interface of a native `Transformer`."""

    def __init__(self, model: nn.Module, source: str, prefix_ids: list[int] | None = None):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.source = source
        # what its tokenizer puts before a prompt (a BOS, which Gemma and Llama 3 expect): every row starts with it
        self.prefix_ids = list(prefix_ids or [])
        hf = model.config
        total, active = _active_params(model, hf)
        text = hf.get_text_config() if hasattr(hf, "get_text_config") else hf
        self.config = ForeignConfig(model_type=hf.model_type, vocab_size=model.get_output_embeddings().weight.shape[0],
                                    hidden_size=text.hidden_size, num_layers=len(self.layers), params=total,
                                    active=active, hf=hf)

    @property
    def base(self) -> nn.Module:
        return self.model.base_model

    @property
    def layers(self) -> nn.ModuleList:
        return _decoder_layers(self.base)

    def hidden_rows(self, ids_RL: torch.Tensor, mask_RL: torch.Tensor) -> torch.Tensor:
        """Final hidden states [R, L, D] of right-padded rows (`mask_RL` True on real tokens), each row its
        own text from position 0."""
        return self._rows(ids_RL, mask_RL)

    def _rows(self, ids_RL: torch.Tensor, mask_RL: torch.Tensor) -> torch.Tensor:
        # the one body of both public methods (each an FSDP forward method under torchrun: neither calls the other)
        limit = getattr(self.config.hf, "n_positions", None)  # learned absolute positions (GPT-2)
        if limit and ids_RL.shape[1] > limit:
            raise ValueError(f"{self.source}: a row of {ids_RL.shape[1]} teacher tokens is longer than its {limit} "
                             "learned positions; lower data.seq_len")
        pos_RL = torch.arange(ids_RL.shape[1], device=ids_RL.device).expand_as(ids_RL)
        out = self.base(input_ids=ids_RL, attention_mask=mask_RL.long(), position_ids=pos_RL, use_cache=False)
        return out.last_hidden_state

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                      segment_ids: torch.Tensor | None = None, **unused) -> torch.Tensor:
        """Final hidden states [B, S, D] of packed rows (the student's tokens, the same tokenizer): each
        document piece (a run of one segment id) as its own row, so no document sees another."""
        if unused.get("pixel_values") is not None:
            raise ValueError("a transformers teacher takes text only (image-text data: distil from a native teacher)")
        B, S = input_ids.shape
        if segment_ids is None:
            segment_ids = torch.zeros_like(input_ids)
        rows, starts, lengths = pieces(segment_ids)
        P = len(self.prefix_ids)
        L = int(lengths.max()) + P
        offset_N = torch.arange(B * S, device=input_ids.device) - starts.repeat_interleave(lengths) + P
        row_N = torch.arange(len(rows), device=input_ids.device).repeat_interleave(lengths)
        ids_RL = input_ids.new_zeros(len(rows), L)
        mask_RL = torch.zeros(len(rows), L, dtype=torch.bool, device=input_ids.device)
        if P:
            ids_RL[:, :P] = torch.tensor(self.prefix_ids, device=input_ids.device)
            mask_RL[:, :P] = True
        ids_RL[row_N, offset_N] = input_ids.flatten()
        mask_RL[row_N, offset_N] = True
        h_RLD = self._rows(ids_RL, mask_RL)
        return h_RLD[row_N, offset_N].view(B, S, -1)

    def logits(self, h_ND: torch.Tensor) -> torch.Tensor:
        """The output head on hidden states [..., D] -> [..., V], with the family's logit post-processing."""
        z = self.model.get_output_embeddings()(h_ND)
        cfg = self.config.hf
        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        if getattr(text, "logit_scale", None):  # Cohere
            z = z * text.logit_scale
        if getattr(text, "logits_scaling", None):  # Granite
            z = z / text.logits_scaling
        cap = getattr(text, "final_logit_softcapping", None)  # Gemma 2/3
        if cap:
            z = torch.tanh(z / cap) * cap
        return z

    def forward(self, input_ids: torch.Tensor, **kw) -> torch.Tensor:
        return self.logits(self.hidden_states(input_ids, **kw))


def pieces(segment_ids_BS: torch.Tensor) -> tuple[list[tuple[int, int]], torch.Tensor, torch.Tensor]:
    """The document pieces of packed rows, in row-major order: ([(row, first column)], flat start [P], length
    [P]); a piece is a maximal run of one segment id within a row."""
    B, S = segment_ids_BS.shape
    new_BS = torch.ones_like(segment_ids_BS, dtype=torch.bool)
    new_BS[:, 1:] = segment_ids_BS[:, 1:] != segment_ids_BS[:, :-1]
    flat = new_BS.flatten().nonzero().flatten()
    lengths = torch.diff(torch.cat([flat, flat.new_tensor([B * S])]))
    rows = [(i // S, i % S) for i in flat.tolist()]  # one transfer, not one per piece
    return rows, flat, lengths


def _dtype_kw(transformers) -> str:
    """transformers 5 names the load dtype `dtype`; 4.x `torch_dtype`."""
    return "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"


def read_foreign_config(directory: Path):
    """The transformers config of a model directory; `CheckpointError` naming it when transformers cannot read
    it or it is not a causal LM."""
    transformers = _transformers()
    try:
        cfg = transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except Exception as e:  # transformers raises ValueError, OSError, KeyError... for unknown or broken configs
        raise CheckpointError(f"{directory}: transformers cannot read its config.json ({_first_line(e)})") from None
    if type(cfg) not in transformers.MODEL_FOR_CAUSAL_LM_MAPPING:
        raise CheckpointError(f"{directory}: model_type={cfg.model_type!r} is not a causal language model "
                              "transformers knows (AutoModelForCausalLM)")
    return cfg


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def load_foreign(directory: str | Path, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> ForeignTeacher:
    """A transformers causal LM from a local directory, frozen, in `dtype`, on `device` ("meta": its structure
    only, no weights read). Checks that chunked `logits(hidden_states)` reproduces its forward."""
    transformers = _transformers()
    transformers.utils.logging.disable_progress_bar()  # its per-file bars would interleave with the run's lines
    directory = Path(directory)
    cfg = read_foreign_config(directory)
    if torch.device(device).type == "meta":
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(cfg)
        for p in model.parameters():
            p.data = p.data.to(dtype)
        return ForeignTeacher(model, str(directory), _prompt_prefix(directory))
    if not any((directory / f).is_file() for f in HF_FILES):
        raise CheckpointError(f"{directory}: no weights (looked for {', '.join(HF_FILES)})")
    kw = {_dtype_kw(transformers): dtype, "local_files_only": True}
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(directory), attn_implementation="sdpa", **kw)
    except (ValueError, ImportError):  # a family without an SDPA implementation
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(str(directory), **kw)
        except Exception as e:
            raise CheckpointError(f"{directory}: transformers cannot load it ({_first_line(e)})") from None
    except Exception as e:
        raise CheckpointError(f"{directory}: transformers cannot load it ({_first_line(e)})") from None
    teacher = ForeignTeacher(model.to(device), str(directory), _prompt_prefix(directory))
    check_head(teacher)
    return teacher


def _prompt_prefix(directory: Path) -> list[int]:
    """The ids the model's tokenizer puts before a prompt (its BOS), [] without a readable tokenizer."""
    from behemoth.data.tokenizer import Tokenizer

    try:
        return Tokenizer.load(directory).encode_prompt("")
    except ValueError:
        return []


@torch.no_grad()
def check_head(teacher: ForeignTeacher, tokens: int = 8) -> None:
    """`CheckpointError` unless the teacher's own forward and `logits(hidden_rows)` agree on a few tokens."""
    device = next(teacher.model.parameters()).device
    ids = (torch.arange(tokens, device=device) * 7 + 3).remainder(teacher.config.vocab_size)[None]
    mask = torch.ones_like(ids, dtype=torch.bool)
    want = teacher.model(input_ids=ids, attention_mask=mask.long(), use_cache=False).logits.float()
    got = teacher.logits(teacher.hidden_rows(ids, mask)).float()
    tol = 1e-3 if want.dtype == torch.float32 and next(teacher.model.parameters()).dtype == torch.float32 else 5e-2
    err = float((want - got).abs().max())
    if not err <= tol * max(1.0, float(want.abs().max())):
        raise CheckpointError(f"{teacher.source}: model_type={teacher.config.model_type!r}: its output head applied "
                              f"to its hidden states differs from its logits (max diff {err:.3g}); it cannot be "
                              "distilled chunk by chunk")


def foreign_summary(directory: Path) -> str:
    """model_type and architectures from config.json, for messages."""
    raw = json.loads((Path(directory) / "config.json").read_text())
    return f"a transformers {raw.get('model_type')!r} model ({', '.join(raw.get('architectures') or [])})"


def is_foreign_dir(directory: str | Path) -> bool:
    """Whether a model directory (`resolve_model_dir`'s) holds a transformers model of a family other than
    Llama 4."""
    cfg = Path(directory) / "config.json"
    try:
        raw = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and is_foreign(raw)


def load_any_model(directory: str | Path, dtype: torch.dtype | None = torch.float32,
                   device: str | torch.device = "cpu") -> nn.Module:
    """A teacher of any family from a resolved model directory: a native or Llama 4 one through `load_model`
    (`dtype` None keeps the stored one), any other transformers causal LM as a `ForeignTeacher`."""
    from behemoth.checkpoint.model_dir import load_model

    if is_foreign_dir(directory):
        return load_foreign(directory, dtype or torch.float32, device)
    return load_model(directory, dtype=dtype, device=device)


def meta_copy(teacher: ForeignTeacher) -> ForeignTeacher:
    """A teacher of the same structure and dtype on the meta device (no weights), for sharding."""
    transformers = _transformers()
    dtype = next(teacher.model.parameters()).dtype
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(teacher.config.hf)
    for p in model.parameters():  # buffers keep their own dtype, as from_pretrained leaves RoPE frequencies in fp32
        p.data = p.data.to(dtype)
    return ForeignTeacher(model, teacher.source, teacher.prefix_ids)
