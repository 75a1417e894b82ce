"""All format conversion: HF <-> native key maps (as data), expert stack/split, sharded safetensors.

Native names are Meta's (`layers.N.attention.wq.weight`); HF names are transformers' Llama 4 names
(`model.layers.N.self_attn.q_proj.weight`), with a `language_model.` prefix inside
`Llama4ForConditionalGeneration`, whose vision tower and projector have their own table
(`VISION_KEY_MAP`). Experts are stored in both as input-major 3-D tensors
(`w13` == `gate_up_proj` [E, D, 2F], `w2` == `down_proj` [E, F, D]), so the fused layout maps one
to one. The per-expert layout some tools write (`experts.{e}.gate_proj.weight`, [F, D]) is stacked
on read.

Every error is a `CheckpointError` whose message names the file and the key.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

# (native template, HF template); "{i}" is the layer index.
KEY_MAP: tuple[tuple[str, str], ...] = (
    ("tok_embeddings.weight", "model.embed_tokens.weight"),
    ("norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
    ("layers.{i}.attention_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("layers.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("layers.{i}.attention.wq.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    ("layers.{i}.attention.wk.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    ("layers.{i}.attention.wv.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    ("layers.{i}.attention.wo.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    # dense layers
    ("layers.{i}.feed_forward.w1.weight", "model.layers.{i}.feed_forward.gate_proj.weight"),
    ("layers.{i}.feed_forward.w3.weight", "model.layers.{i}.feed_forward.up_proj.weight"),
    ("layers.{i}.feed_forward.w2.weight", "model.layers.{i}.feed_forward.down_proj.weight"),
    # MoE layers
    ("layers.{i}.feed_forward.router.weight", "model.layers.{i}.feed_forward.router.weight"),
    ("layers.{i}.feed_forward.experts.w13", "model.layers.{i}.feed_forward.experts.gate_up_proj"),
    ("layers.{i}.feed_forward.experts.w2", "model.layers.{i}.feed_forward.experts.down_proj"),
    ("layers.{i}.feed_forward.shared_expert.w1.weight", "model.layers.{i}.feed_forward.shared_expert.gate_proj.weight"),
    ("layers.{i}.feed_forward.shared_expert.w3.weight", "model.layers.{i}.feed_forward.shared_expert.up_proj.weight"),
    ("layers.{i}.feed_forward.shared_expert.w2.weight", "model.layers.{i}.feed_forward.shared_expert.down_proj.weight"),
)
# The vision tower and projector of `Llama4ForConditionalGeneration`: (native, HF) full key templates.
_VE, _HV = "vision_embeddings.vision_encoder.", "vision_model."
VISION_KEY_MAP: tuple[tuple[str, str], ...] = (
    (_VE + "conv1._linear.weight", _HV + "patch_embedding.linear.weight"),
    (_VE + "class_embedding", _HV + "class_embedding"),
    (_VE + "positional_embedding_vlm", _HV + "positional_embedding_vlm"),
    *((_VE + f"{ours}.{t}", _HV + f"{theirs}.{t}") for ours, theirs in (("ln_pre", "layernorm_pre"),
                                                                       ("ln_post", "layernorm_post"))
      for t in ("weight", "bias")),
    *((_VE + f"transformer.resblocks.{{i}}.{ours}.{t}", _HV + f"model.layers.{{i}}.{theirs}.{t}")
      for ours, theirs in (("attn.wq", "self_attn.q_proj"), ("attn.wk", "self_attn.k_proj"),
                           ("attn.wv", "self_attn.v_proj"), ("attn.wo", "self_attn.o_proj"),
                           ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2"), ("ln_1", "input_layernorm"),
                           ("ln_2", "post_attention_layernorm"))
      for t in ("weight", "bias")),
    ("vision_embeddings.vision_adapter.mlp.c_fc.weight", _HV + "vision_adapter.mlp.fc1.weight"),
    ("vision_embeddings.vision_adapter.mlp.c_proj.weight", _HV + "vision_adapter.mlp.fc2.weight"),
    ("vision_projection.weight", "multi_modal_projector.linear_1.weight"),
)
# Native state that transformers' Llama 4 has no place for: the auxiliary-loss-free routing bias. It is
# zero in every released checkpoint, so a checkpoint without it loads with zeros.
NATIVE_ONLY = ("layers.{i}.feed_forward.router.expert_bias",)
_PER_EXPERT = re.compile(r"^(model\.layers\.\d+\.feed_forward\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_PER_EXPERT_SUFFIX = re.compile(r"\.experts\.\d+\.(gate_proj|up_proj|down_proj)\.weight$")


class CheckpointError(ValueError):
    """A checkpoint problem; the message names the file and key."""


def _template_regex(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


_TO_NATIVE = [(_template_regex(hf), native) for native, hf in KEY_MAP]
_TO_HF = [(_template_regex(native), hf) for native, hf in KEY_MAP]
_NATIVE_ONLY = [_template_regex(t) for t in NATIVE_ONLY]


def is_native_only(key: str) -> bool:
    """Whether a native key has no HF counterpart (and may be absent from a checkpoint: zeros)."""
    return any(p.match(key) for p in _NATIVE_ONLY)


def _translate(key: str, table: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, template in table:
        m = pattern.match(key)
        if m:
            return template.replace("{i}", m.group("i")) if "i" in m.groupdict() else template
    return None


def hf_to_native_key(hf_key: str, prefix: str = "") -> str | None:
    """`[prefix]model.layers.3.self_attn.q_proj.weight` -> `layers.3.attention.wq.weight` (None if unknown)."""
    if not hf_key.startswith(prefix):
        return None
    return _translate(hf_key[len(prefix):], _TO_NATIVE)


_VISION_TO_NATIVE = [(_template_regex(hf), native) for native, hf in VISION_KEY_MAP]
_VISION_TO_HF = [(_template_regex(native), hf) for native, hf in VISION_KEY_MAP]


def hf_to_native_vision_key(hf_key: str) -> str | None:
    """`vision_model.model.layers.3.self_attn.q_proj.bias` -> `vision_embeddings.vision_encoder
    .transformer.resblocks.3.attn.wq.bias` (None if not a vision or projector key)."""
    return _translate(hf_key, _VISION_TO_NATIVE)


def native_to_hf_vision_key(key: str) -> str | None:
    return _translate(key, _VISION_TO_HF)


def native_to_hf_key(key: str, prefix: str = "") -> str:
    """A native key's HF name: vision and projector keys by their own (unprefixed) map, text keys
    with `prefix` (`language_model.` inside `Llama4ForConditionalGeneration`)."""
    vision = native_to_hf_vision_key(key)
    if vision is not None:
        return vision
    hf = _translate(key, _TO_HF)
    if hf is None:
        raise CheckpointError(f"no HF name for native key {key!r}")
    return prefix + hf


# ---- safetensors: index, read, write ----------------------------------------------------------

def weight_files(directory: Path) -> tuple[dict[str, Path], Path]:
    """Map every tensor name to the file holding it, from `model.safetensors.index.json` or the single
    `model.safetensors`. Returns (key -> file, the file that lists keys, for error messages)."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e})") from None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: not a valid safetensors index (weight_map is not an object)")
        files = {}
        for key, fname in weight_map.items():
            # shard names are plain file names next to the index; never follow paths out of the directory
            if not isinstance(fname, str) or not fname or Path(fname).name != fname or fname in (".", ".."):
                raise CheckpointError(f"{index}: key {key!r} points to invalid file name {fname!r}")
            f = directory / fname
            if not f.is_file():
                raise CheckpointError(f"{index}: key {key!r} points to missing file {fname}")
            files[key] = f
        return files, index
    single = directory / "model.safetensors"
    if not single.is_file():
        raise CheckpointError(f"{directory}: no model.safetensors or model.safetensors.index.json "
                              "(only safetensors checkpoints are read; pickle files are never loaded)")
    return {k: single for k in _keys_of(single)}, single


def _keys_of(path: Path) -> list[str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # safetensors raises its own error type for truncated / corrupt files
        raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None


def read_tensors(files: dict[str, Path], keys: Iterable[str]) -> Iterable[tuple[str, torch.Tensor]]:
    """Yield (key, tensor) for the requested keys, opening each file once. Never unpickles."""
    by_file: dict[Path, list[str]] = {}
    for k in keys:
        by_file.setdefault(files[k], []).append(k)
    for path, ks in by_file.items():
        try:
            with safe_open(str(path), framework="pt") as f:
                present = set(f.keys())
                for k in ks:
                    if k not in present:
                        raise CheckpointError(f"{path}: key {k!r} is listed in the index but not in the file")
                    yield k, f.get_tensor(k)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None


def write_safetensors(tensors: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int | None = None,
                      metadata: dict[str, str] | None = None) -> list[Path]:
    """Write `model.safetensors`, or shards `model-0000i-of-0000n.safetensors` plus the HF index when
    the tensors exceed `max_shard_bytes`. Tensors are made contiguous; shared storage is split."""
    directory.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    storage_uses = Counter(_storage_id(t) for t in tensors.values())
    for k, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shared = storage_uses[_storage_id(t)] > 1
        shards[-1][k] = t.detach().contiguous().clone() if shared else t.detach().contiguous()
        size += nbytes
    meta = {"format": "pt", **(metadata or {})}
    if len(shards) == 1:
        path = directory / "model.safetensors"
        save_file(shards[0], str(path), metadata=meta)
        return [path]
    paths, weight_map = [], {}
    for n, shard in enumerate(shards, 1):
        path = directory / f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path), metadata=meta)
        paths.append(path)
        weight_map.update({k: path.name for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return paths


def _storage_id(t: torch.Tensor) -> tuple[str, int]:
    """Identifies a tensor's storage (tensors that share one, e.g. tied weights, are cloned on write)."""
    return str(t.device), t.untyped_storage().data_ptr()


# ---- whole state dicts ---------------------------------------------------------------------------

def hf_source_map(hf_keys: Iterable[str], prefix: str, index_file: Path) -> dict[str, list[str]]:
    """Native key -> the HF keys it is built from (one, or 2E for a per-expert w13, E for w2).

    Vision and projector keys (of a multimodal checkpoint, `prefix` set) map by their own table.
    Unknown keys raise; so does a tensor given twice (a fused and a per-expert copy of the same experts).
    """
    sources: dict[str, list[str]] = {}
    per_expert: dict[str, dict[str, dict[int, str]]] = {}
    for k in hf_keys:
        native = hf_to_native_key(k, prefix)
        if native is not None:
            if native in sources:
                raise CheckpointError(f"{index_file}: tensors {sources[native][0]!r} and {k!r} both give {native!r}")
            sources[native] = [k]
            continue
        native = hf_to_native_vision_key(k) if prefix else None
        if native is not None:
            sources[native] = [k]
            continue
        m = _PER_EXPERT.match(k[len(prefix):]) if k.startswith(prefix) else None
        if m is None:
            raise CheckpointError(f"{index_file}: unexpected tensor {k!r}")
        base, e, proj = m.group(1), int(m.group(2)), m.group(3)
        per_expert.setdefault(base, {}).setdefault(proj, {})[e] = k
    for base, projs in per_expert.items():
        native_base = hf_to_native_key(prefix + base + ".down_proj", prefix).rsplit(".", 1)[0]
        n = 1 + max(e for v in projs.values() for e in v)  # a gap anywhere (even at the end of one proj) shows
        for proj in ("gate_proj", "up_proj", "down_proj"):
            missing = [e for e in range(n) if e not in projs.get(proj, {})]
            if missing:
                raise CheckpointError(f"{index_file}: missing tensor {prefix}{base}.{missing[0]}.{proj}.weight")
        for suffix, fused in ((".w13", "gate_up_proj"), (".w2", "down_proj")):
            if native_base + suffix in sources:
                raise CheckpointError(f"{index_file}: both fused {prefix}{base}.{fused} and per-expert "
                                      f"{prefix}{base}.N.* tensors are present")
        sources[native_base + ".w13"] = [projs["gate_proj"][e] for e in range(n)] + [
            projs["up_proj"][e] for e in range(n)]
        sources[native_base + ".w2"] = [projs["down_proj"][e] for e in range(n)]
    return sources


def is_per_expert(hf_keys: list[str]) -> bool:
    """Whether these source keys are per-expert linear weights (`experts.{e}.gate_proj.weight`, ...)."""
    return bool(hf_keys) and _PER_EXPERT_SUFFIX.search(hf_keys[0]) is not None


def source_shapes(native_key: str, native_shape: Iterable[int], hf_keys: list[str],
                  index_file: Path) -> list[tuple[int, ...]]:
    """The shape each HF source tensor must have to build `native_key` of `native_shape`.

    One source: the native shape itself. Per-expert sources: [F, D] (gate, up) or [D, F] (down) each,
    and exactly E (w2) or 2E (w13) of them, else `CheckpointError`.
    """
    shape = tuple(native_shape)
    if not is_per_expert(hf_keys):
        return [shape]
    E, rows, cols = shape
    if native_key.endswith(".w13"):  # [E, D, 2F] from 2E tensors [F, D]
        n, part = len(hf_keys) // 2, (cols // 2, rows)
    else:  # [E, F, D] from E tensors [D, F]
        n, part = len(hf_keys), (cols, rows)
    if n != E:
        base = hf_keys[0].rsplit(".", 3)[0]
        raise CheckpointError(f"{index_file}: {n} per-expert tensors {base}.N.* for {native_key!r}, expected {E}")
    return [part] * len(hf_keys)


def assemble(native_key: str, parts: list[torch.Tensor], hf_keys: list[str] | None = None) -> torch.Tensor:
    """Build one native tensor from its HF parts (identity, or stack per-expert [out, in] weights).

    With `hf_keys` the layout is decided by the source names, else by the rank of the first part.
    """
    per_expert = is_per_expert(hf_keys) if hf_keys is not None else (
        native_key.endswith((".experts.w13", ".experts.w2")) and parts[0].dim() == 2)
    if not per_expert:
        return parts[0]
    if native_key.endswith(".w13"):
        n = len(parts) // 2
        return torch.cat([torch.stack([p.T for p in parts[:n]]), torch.stack([p.T for p in parts[n:]])], dim=-1)
    return torch.stack([p.T for p in parts])


def native_to_hf_state(state: dict[str, torch.Tensor], prefix: str = "",
                       drop_router_bias: bool = False) -> dict[str, torch.Tensor]:
    """Rename a native state dict to HF names (fused expert layout, as transformers writes it).

    Native-only tensors are left out when zero. A non-zero routing bias changes which experts are
    chosen, and transformers cannot hold it: that raises unless `drop_router_bias` is set.
    """
    out = {}
    for k, v in state.items():
        if is_native_only(k):
            if bool(v.any()) and not drop_router_bias:
                raise CheckpointError(f"{k} is non-zero: transformers' Llama 4 has no routing bias, so the exported "
                                      "model would route differently (pass drop_router_bias / --drop-router-bias)")
            continue
        out[native_to_hf_key(k, prefix)] = v
    return out
