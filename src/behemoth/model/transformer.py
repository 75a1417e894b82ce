"""The Llama 4 transformer: embeddings, pre-norm blocks (attention + dense or MoE FFN), head; with a
vision tower when the config has one (early fusion: image features replace `<|patch|>` embeddings).

Module names follow Meta's checkpoints (`tok_embeddings`, `layers.N.attention.wq`, `attention_norm`,
`ffn_norm`, `feed_forward`, `norm`, `output`); HF names are mapped in `checkpoint/convert.py`.
Single-device code: parallelism, compile and activation checkpointing are applied from outside.

Shape legend: B batch, S sequence, D model dim, V vocabulary; N image tiles, C channels, T tokens per tile.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from behemoth.config import ModelConfig
from behemoth.model.attention import Attention, AttnMask, attention_mask, block_mask, flex_ok
from behemoth.model.cache import KVCacheProtocol
from behemoth.model.layers import FeedForward, RMSNorm, rope_cos_sin, rope_inv_freq
from behemoth.model.moe import MoE
from behemoth.model.vision import VisionEmbeddings


class Block(nn.Module):
    """h = x + attention(attention_norm(x)); out = h + feed_forward(ffn_norm(h))."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.use_rope = cfg.rope_layers[layer_id]
        self.is_moe = cfg.is_moe_layer(layer_id)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg, self.use_rope)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = MoE(cfg) if self.is_moe else FeedForward(cfg.dim, cfg.ffn_dim)

    def forward(self, x_BSD: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], pos_BS: torch.Tensor,
                masks: dict[bool, AttnMask], kv: Callable | None = None) -> torch.Tensor:
        h = x_BSD + self.attention(self.attention_norm(x_BSD), rope, pos_BS, masks[self.use_rope], kv)
        if self.is_moe:  # padding (position -1) is routed but not counted as load
            return h + self.feed_forward(self.ffn_norm(h), (pos_BS >= 0).expand(x_BSD.shape[:2]))
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """The text model. `forward(input_ids [B, S]) -> logits [B, S, V]` in the model dtype.

    `attention_impl` ("auto", "flex" or "sdpa"; a runtime setting, not part of the config) picks how a forward
    without a cache attends where it needs a mask (`model.attention.flex_ok`): FlexAttention on a GPU by default.
    """

    attention_impl = "auto"

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = None if cfg.tie_word_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.vision is not None:
            self.vision_embeddings = VisionEmbeddings(cfg.vision)
            self.vision_projection = nn.Linear(cfg.vision.adapter_dim, cfg.dim, bias=False)
        self._inv_freq_cache: dict[torch.device, torch.Tensor] = {}

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None, cache: KVCacheProtocol | None = None,
                pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, S] -> logits [B, S, V]. See `hidden_states` for the other arguments."""
        return self.logits(self.hidden_states(input_ids, positions, segment_ids, cache, pixel_values))

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                      segment_ids: torch.Tensor | None = None, cache: KVCacheProtocol | None = None,
                      pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """The final-normed hidden states [B, S, D], before the output head.

        positions: [B, S] or [S] absolute positions (default 0..S-1); they drive RoPE, the chunk
        boundaries and temperature tuning; -1 marks padding (never attended to). segment_ids: [B, S];
        when given, a token attends only to tokens of its own segment (packed documents, each with
        positions restarting at 0, then behave exactly as if run one by one).

        cache: a KV cache the caller owns (`model.cache.KVCacheProtocol`, e.g. `inference.KVCache`). The new
        tokens' keys/values are stored in it and attention also reads the earlier ones, so a prompt can be
        prefilled and then extended one token per call (positions are then required: each row continues
        from its own length).

        pixel_values: [N, C, S, S] normalised image tiles (all images of the batch, in order); their
        projected features, [N * T, D], replace the embeddings of the `<|patch|>` tokens in sequence
        order, which must number exactly N * T. After that, image tokens are ordinary positions.
        """
        B, S = input_ids.shape
        plain = positions is None and segment_ids is None  # 0..S-1 in every row, one document
        if positions is None:
            if cache is not None:
                raise ValueError("positions are required with a cache (each row continues at its own length)")
            positions = torch.arange(S, device=input_ids.device)
        pos_BS = positions.expand(B, S) if positions.dim() == 1 else positions
        rope = rope_cos_sin(self._inv_freq(input_ids.device), pos_BS)
        chunk = {True: self.config.attention_chunk_size, False: None}
        if cache is None:
            masks = self._masks(pos_BS, segment_ids, chunk, plain)
            kvs = [None] * len(self.layers)
        else:
            if segment_ids is not None:
                raise ValueError("segment_ids cannot be combined with a cache")
            decode, plans, key_pos = cache.begin(pos_BS)
            masks = {kind: AttnMask(dense=attention_mask(pos_BS, k_pos, chunk[kind], k_pos >= 0))
                     for kind, k_pos in key_pos.items()}
            kvs = [partial(cache.update, i, plans[layer.use_rope], decode=decode)
                   for i, layer in enumerate(self.layers)]
        x_BSD = self.tok_embeddings(input_ids)
        if pixel_values is not None:
            x_BSD = self.fuse_images(input_ids, x_BSD, pixel_values)
        for layer, kv in zip(self.layers, kvs, strict=True):
            x_BSD = layer(x_BSD, rope, pos_BS, masks, kv)
        return self.norm(x_BSD)

    def _masks(self, pos_BS: torch.Tensor, segment_ids: torch.Tensor | None, chunk: dict[bool, int | None],
               plain: bool) -> dict[bool, AttnMask]:
        """The masks of a forward without a cache, per layer kind (True: chunked RoPE layers). `plain`: positions
        0..S-1 in every row (the default) and one document. A kind whose rule is then just causal (global, or chunks
        no shorter than the call) attends with `is_causal` and no mask; others take a FlexAttention block mask
        where `flex_ok`, else the dense mask."""
        S = pos_BS.shape[1]
        masks = {}
        for kind in set(self.config.rope_layers):
            c = chunk[kind]
            if plain and (c is None or c >= S):
                masks[kind] = AttnMask()
            elif flex_ok(pos_BS.device, self.attention_impl):
                masks[kind] = AttnMask(block=block_mask(pos_BS, c, segment_ids))
            else:
                m = attention_mask(pos_BS, pos_BS, c, pos_BS >= 0)
                if segment_ids is not None:
                    m = m & (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
                masks[kind] = AttnMask(dense=m)
        return masks

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Tiles [N, C, S, S] -> projected features [N, T, D], in the text model's width."""
        if self.config.vision is None:
            raise ValueError("this model has no vision tower (its config has no `vision`)")
        return self.vision_projection(self.vision_embeddings(pixel_values))

    def fuse_images(self, input_ids: torch.Tensor, x_BSD: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        """Early fusion: the `<|patch|>` positions of `x` take the image features, in sequence order."""
        feats = self.image_features(pixel_values).reshape(-1, x_BSD.shape[-1])
        is_patch_BS = input_ids == self.config.image_token_id
        n = int(is_patch_BS.sum())
        if n != feats.shape[0]:
            N, T = pixel_values.shape[0], self.config.vision.tokens_per_tile
            raise ValueError(f"the input has {n} <|patch|> tokens (id {self.config.image_token_id}), but {N} image "
                             f"tiles give {N} x {T} = {N * T} features")
        return x_BSD.masked_scatter(is_patch_BS[..., None], feats.to(x_BSD.dtype))

    def _inv_freq(self, device: torch.device) -> torch.Tensor:
        """RoPE inverse frequencies [H/2], computed once per device (the config is frozen)."""
        if device not in self._inv_freq_cache:
            self._inv_freq_cache[device] = rope_inv_freq(self.config, device)
        return self._inv_freq_cache[device]

    def logits(self, h_BSD: torch.Tensor) -> torch.Tensor:
        if self.output is None:
            return h_BSD @ self.tok_embeddings.weight.T
        return self.output(h_BSD)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Normal(0, std) for every matrix (experts included), ones for norms: HF's initializer. In the
        vision tower: zeros for biases, LayerNorms at (1, 0), and normal(0, std) class/position embeddings.

        The projector alone is normal(0, adapter_dim^-0.5), so image features enter the text model at unit
        scale: at std 0.02 a from-scratch tower sees a gradient ~4x smaller through it and learns the
        built-in visual tasks far more slowly."""
        for p in self.parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            else:
                nn.init.normal_(p, 0.0, std, generator=generator)
        if self.config.vision is not None:
            for m in self.vision_embeddings.modules():
                if isinstance(m, (nn.Linear, nn.LayerNorm)) and m.bias is not None:
                    nn.init.zeros_(m.bias)
            nn.init.normal_(self.vision_embeddings.vision_encoder.class_embedding, 0.0, std, generator=generator)
            nn.init.normal_(self.vision_projection.weight, 0.0, self.config.vision.adapter_dim ** -0.5,
                            generator=generator)
        for m in self.modules():
            if isinstance(m, MoE):
                m.tokens_per_expert.zero_()
