"""Batches of packed training windows from a `TokenStore`, endless, deterministic and resumable.

The token stream is cut into `num_windows = (num_tokens - 1) // seq_len` windows of `seq_len + 1`
tokens with stride `seq_len` (consecutive windows share one token, so every token except the very
first is a label exactly once per epoch): window w is `tokens[w*S : w*S + S + 1]`, its input is
`w[:-1]` and its labels `w[1:]`. Windows ignore document boundaries (documents are packed); each
token also carries its position within its own document and a segment id, so the model can restart
RoPE positions and block attention across documents. A label that is a document's prompt token (a store
with prompts, `data.packing`) is IGNORE_INDEX: the model reads the prompt but is not trained to write it,
while the first token after the prompt, and the EOS that ends the document, are trained.

Epoch e visits every window once, in the order of a permutation seeded by (seed, e) (in stream order
without shuffling). Batches take the next `batch_size` windows of the endless sequence epoch 0,
epoch 1, ...; a batch may straddle an epoch boundary, so no window is dropped and every batch has
the same shape. The whole state is (epoch, index of the next window within the epoch): a loader
restored with `load_state_dict` produces exactly the batches the uninterrupted one would have.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from behemoth.data.packing import TokenStore

IGNORE_INDEX = -100  # the label of a position that is not trained on (an image token, a prompt)


@dataclass
class Batch:
    """One training batch; every [B, S] tensor is int64 on the CPU until `to` moves it."""

    input_ids: torch.Tensor  # tokens
    labels: torch.Tensor  # the next token of each input token
    positions: torch.Tensor  # position within the token's own document (0 at each document start)
    segment_ids: torch.Tensor  # document of each token, numbered from 0 within each row
    # [B] int64: the token-stream offset of each row's first input token (window w starts at w * seq_len);
    # it keys per-position data such as cached teacher targets. Stays on the CPU (`to` does not move it).
    offsets: torch.Tensor | None = None
    # [N, 3, T, T] image tiles of the whole batch, row by row (image-text data); their features replace the
    # batch's <|patch|> tokens in order (`Transformer.hidden_states`)
    pixel_values: torch.Tensor | None = None
    # the number of labelled positions (labels != IGNORE_INDEX), counted on the CPU by `to` before the move, so that
    # a training step on a GPU never waits for the device to count them (None: count when asked)
    num_labelled: int | None = None

    def to(self, device: str | torch.device, non_blocking: bool = False) -> Batch:
        pixels = None if self.pixel_values is None else self.pixel_values.to(device, non_blocking=non_blocking)
        return Batch(*(t.to(device, non_blocking=non_blocking)
                       for t in (self.input_ids, self.labels, self.positions, self.segment_ids)),
                     offsets=self.offsets, pixel_values=pixels, num_labelled=self.labelled)

    @property
    def labelled(self) -> int:
        """The number of labelled positions (a host read of the labels where `num_labelled` is unknown)."""
        if self.num_labelled is None:
            return int((self.labels != IGNORE_INDEX).sum())
        return self.num_labelled

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    @property
    def model_inputs(self) -> dict:
        """The keyword arguments of `Transformer.hidden_states` for this batch (pixel values only when it has
        images, so text-only batches suit any model)."""
        extra = {} if self.pixel_values is None else {"pixel_values": self.pixel_values}
        return {"positions": self.positions, "segment_ids": self.segment_ids, **extra}


class EpochOrder:
    """The endless, resumable order in which `num_windows` items (packed windows, or whole examples) are
    drawn `batch_size` at a time: epoch e visits every item once, in the order of a permutation seeded by
    (seed, e) (stream order without shuffling). The state is (epoch, index of the next item in the epoch)."""

    def __init__(self, num_windows: int, batch_size: int, seq_len: int, seed: int = 0, shuffle: bool = True) -> None:
        for name, value, low in (("batch_size", batch_size, 1), ("seq_len", seq_len, 1), ("seed", seed, 0)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name}={value!r}: must be an integer >= {low}")
        self.batch_size = int(batch_size)
        self.seq_len = int(seq_len)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.num_windows = int(num_windows)
        self.epoch = 0
        self.index = 0  # next item within the epoch's order
        self._order_epoch = -1
        self._order: np.ndarray | None = None

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.seq_len

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        return self._batch_of(self._take(self.batch_size))

    def next_rows(self, start: int, stop: int) -> Batch:
        """Rows [start, stop) of the next batch, the order advancing by the whole batch (one rank's share in
        data-parallel training: every rank draws the same batches and builds only its rows)."""
        return self._batch_of(self._take(self.batch_size)[start:stop])

    def _batch_of(self, indices: np.ndarray) -> Batch:
        raise NotImplementedError

    def _take(self, n: int) -> np.ndarray:
        """The next `n` item indices, advancing (epoch, index) across epoch boundaries."""
        parts = []
        while n > 0:
            order = self._epoch_order(self.epoch)
            stop = min(self.index + n, self.num_windows)
            parts.append(order[self.index:stop] if order is not None else np.arange(self.index, stop, dtype=np.int64))
            n -= stop - self.index
            self.index = stop
            if self.index == self.num_windows:
                self.epoch, self.index = self.epoch + 1, 0
        return np.concatenate(parts).astype(np.int64)

    def _epoch_order(self, epoch: int) -> np.ndarray | None:
        if not self.shuffle:
            return None
        if self._order_epoch != epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            self._order_epoch = epoch
        return self._order

    # ---- checkpointing -------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Plain JSON-able state; (epoch, index) is the position, the rest guards against a mismatched resume."""
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "shuffle": self.shuffle,
                "seq_len": self.seq_len, "num_windows": self.num_windows, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        """Resume from `state_dict()`. The data (num_windows), seq_len, seed and shuffle must match;
        batch_size may differ (the position is counted in items)."""
        for key in ("epoch", "index"):
            if key not in state:
                raise ValueError(f"loader state: missing {key!r}")
        for key, mine in (("seed", self.seed), ("shuffle", self.shuffle), ("seq_len", self.seq_len),
                          ("num_windows", self.num_windows)):
            if key in state and state[key] != mine:
                raise ValueError(f"loader state: {key}={state[key]!r} but this loader has {key}={mine!r} "
                                 "(different data or settings)")
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index < self.num_windows:
            raise ValueError(f"loader state: epoch={epoch}, index={index} out of range ({self.num_windows} windows)")
        self.epoch, self.index = epoch, index


class DataLoader(EpochOrder):
    """Endless iterator of `Batch`es of `batch_size` windows of `seq_len` tokens from `store`."""

    def __init__(self, store: TokenStore, batch_size: int, seq_len: int, seed: int = 0, shuffle: bool = True) -> None:
        super().__init__(0, batch_size, seq_len, seed, shuffle)  # validates the settings
        self.store = store
        self.num_windows = max(store.num_tokens - 1, 0) // self.seq_len
        if self.num_windows < 1:
            where = store.directory if store.directory is not None else "token store"
            raise ValueError(f"{where}: {store.num_tokens} tokens, too few for one window of seq_len + 1 = "
                             f"{self.seq_len + 1} tokens")

    def _batch_of(self, indices: np.ndarray) -> Batch:
        return window_batch(self.store, self.seq_len, indices)


def window_batch(store: TokenStore, seq_len: int, windows: np.ndarray) -> Batch:
    """The `Batch` of the given window indices (window w: stream tokens w*S .. w*S + S, see the module doc)."""
    S = seq_len
    windows = np.asarray(windows, dtype=np.int64)
    tokens = store.tokens
    rows_BW = np.stack([np.asarray(tokens[w * S:w * S + S + 1], dtype=np.int64) for w in windows.tolist()])
    offsets_BS = windows[:, None] * S + np.arange(S, dtype=np.int64)
    doc_BS = store.doc_index(offsets_BS)
    positions_BS = offsets_BS - np.asarray(store.doc_starts)[doc_BS]
    segments_BS = doc_BS - doc_BS[:, :1]
    labels_BS = rows_BW[:, 1:].copy()  # a copy: masking must not touch the inputs (a view when B = 1)
    if store.prompt_lens is not None:  # the label at stream offset o + 1 is masked where it is its document's prompt
        label_doc_BS = store.doc_index(offsets_BS + 1)
        label_pos_BS = offsets_BS + 1 - np.asarray(store.doc_starts)[label_doc_BS]
        in_prompt_BS = label_pos_BS < np.asarray(store.prompt_lens)[label_doc_BS]
        labels_BS[in_prompt_BS] = IGNORE_INDEX
    return Batch(input_ids=torch.from_numpy(np.ascontiguousarray(rows_BW[:, :-1])),
                 labels=torch.from_numpy(labels_BS),
                 positions=torch.from_numpy(positions_BS), segment_ids=torch.from_numpy(segments_BS),
                 offsets=torch.from_numpy(windows * S))
