"""Distillation across tokenizers: which positions of a student and a teacher see the same text, and which
tokens of their vocabularies stand for the same text.

Shape legend: B rows, S student positions per row, R teacher rows, L teacher positions per row, N tokens,
Vt / Vs teacher / student vocabulary, M teacher ids shared, U distinct student ids they reach.

Positions. A student and a teacher cut the same text into different tokens, so their positions match only
where both have read exactly the same text: student position i (context: the bytes of its tokens 0..i) and
teacher position j (the bytes of its tokens 0..j) agree when their cumulative byte counts are equal, and then
both predict the same next text. `align_document` matches one document's two lists of token lengths;
`plan_cross_batch` turns each document piece of a packed student batch back into text, encodes it with the
teacher and aligns the two (a `CrossPlan`: the teacher's input rows and, per student position, where its
aligned teacher position is in them).

Vocabularies. A student's next-token distribution and a teacher's are over different ids. `VocabMap` pairs
the ids whose byte strings are identical (`TokenBytes`: GPT-2's "Ġ" and SentencePiece's "▁" both become
b" "), plus end-of-text with end-of-text; `VocabMap.to_student` moves the teacher's distribution onto those
student ids (a `kd.TopK`), so the sparse-teacher divergences of `kd` apply. The divergences are `cross_kd`.

With `match="prefix"` a teacher token the student lacks is also mapped, to the student token the student
begins that text with (its own encoding's first token, or where the text is not whole characters the longest
student token that is a prefix of it): the teacher's probability that the next text starts with that token.
A teacher with longer tokens than the student (a BPE teacher, a character student) puts most of its mass on
tokens the student lacks; exact matching alone keeps only the rest, a distorted remainder, while prefix
matching keeps it all (the first step of marginalising a token distribution onto a finer tokenizer).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import NamedTuple

import torch

from behemoth.data.loader import IGNORE_INDEX
from behemoth.data.token_bytes import TokenBytes
from behemoth.data.tokenizer import Tokenizer
from behemoth.train.kd import NEG_INF, TopK, _fp

_BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # SentencePiece's byte tokens


# ---------------------------------------------------------------------------------------------------
# Vocabularies


@dataclass(frozen=True, eq=False)
class VocabMap:
    """The tokens two vocabularies share: teacher id `teacher_ids[m]` stands for the same text as student id
    `student_ids[slot[m]]`. Several teacher ids may reach one student id (a byte-fallback "<0x41>" and "A"):
    their probabilities add. Every tensor is int64; `build` puts them on the CPU (`to` moves them)."""

    teacher_ids: torch.Tensor  # [M] teacher ids with a student counterpart, ascending
    slot: torch.Tensor  # [M] index into student_ids
    student_ids: torch.Tensor  # [U] distinct student ids reached, ascending
    teacher_vocab: int
    student_vocab: int

    @classmethod
    def build(cls, teacher_tok: Tokenizer, teacher_bytes: TokenBytes, student_tok: Tokenizer,
              student_bytes: TokenBytes, match: str = "exact") -> VocabMap:
        """Pair ids whose byte strings are identical and non-empty, and end-of-text with end-of-text (both mean
        "the document ends here"); with `match="prefix"` also every other teacher id with the student token its
        text begins with (module docstring). Where the student spells one byte string with several ids, the
        teacher's mass goes to one of them: not a byte-fallback token if it has another, else the lowest id."""
        if match not in MATCHES:
            raise ValueError(f"match={match!r}: expected one of {', '.join(MATCHES)}")
        canonical = student_canonical(student_tok, student_bytes)
        pairs = {t: canonical[b] for t, b in enumerate(teacher_bytes.table) if b in canonical}
        if match == "prefix":
            pairs.update(_prefix_pairs(teacher_bytes, student_tok, student_bytes, canonical, pairs))
        pairs[teacher_tok.eos_id] = student_tok.eos_id
        teacher_ids = sorted(pairs)
        student_ids = sorted(set(pairs.values()))
        where = {s: k for k, s in enumerate(student_ids)}
        return cls(torch.tensor(teacher_ids, dtype=torch.long),
                   torch.tensor([where[pairs[t]] for t in teacher_ids], dtype=torch.long),
                   torch.tensor(student_ids, dtype=torch.long),
                   len(teacher_bytes.table), len(student_bytes.table))

    def to(self, device: str | torch.device) -> VocabMap:
        return VocabMap(self.teacher_ids.to(device), self.slot.to(device), self.student_ids.to(device),
                        self.teacher_vocab, self.student_vocab)

    @property
    def unshared_teacher_mask(self) -> torch.Tensor:
        """[Vt] bool: teacher ids with no student counterpart."""
        return ~torch.zeros(self.teacher_vocab, dtype=torch.bool).index_fill_(0, self.teacher_ids.cpu(), True)

    @property
    def unshared_student_mask(self) -> torch.Tensor:
        """[Vs] bool: student ids no teacher id reaches."""
        return ~torch.zeros(self.student_vocab, dtype=torch.bool).index_fill_(0, self.student_ids.cpu(), True)

    def to_student(self, teacher_logprobs_NVt: torch.Tensor) -> TopK:
        """The teacher's distribution moved onto the student's vocabulary: ids [N, U] (`student_ids` on every
        row) and logprobs [N, U], the log of the summed probabilities of the teacher ids reaching each student
        id (exact; -inf where the sum is 0). Input: log-probabilities over the teacher vocabulary (columns
        beyond `teacher_vocab`, padding, are ignored), already at the temperature. fp32 (fp64 stays fp64)."""
        lp_NVt = _fp(teacher_logprobs_NVt)
        N, device = lp_NVt.shape[0], lp_NVt.device
        slot_NM = self.slot.to(device).expand(N, -1)
        lp_NM = lp_NVt[:, self.teacher_ids.to(device)]
        U = self.student_ids.shape[0]
        # logsumexp per slot: subtract each slot's max (0 for empty slots) before adding up probabilities
        max_NU = torch.full((N, U), NEG_INF, dtype=lp_NM.dtype, device=device)
        max_NU = max_NU.scatter_reduce(1, slot_NM, lp_NM, "amax", include_self=True)
        empty_NU = torch.isneginf(max_NU)
        max_NU = max_NU.masked_fill(empty_NU, 0.0)
        sum_NU = torch.zeros_like(max_NU).scatter_add(1, slot_NM, (lp_NM - max_NU.gather(1, slot_NM)).exp())
        logprobs_NU = torch.where(empty_NU, NEG_INF, sum_NU.log() + max_NU)
        return TopK(self.student_ids.to(device).expand(N, -1), logprobs_NU)

    def shared_mass(self, teacher_logprobs_NVt: torch.Tensor) -> torch.Tensor:
        """[N]: the teacher's probability on ids with a student counterpart."""
        return _fp(teacher_logprobs_NVt)[:, self.teacher_ids.to(teacher_logprobs_NVt.device)].exp().sum(-1)

    def summary(self) -> dict:
        """Sizes for logging: distinct student ids reached (U), teacher ids mapped (M), and their shares of
        each vocabulary."""
        U, M = self.student_ids.numel(), self.teacher_ids.numel()
        return {"shared_tokens": U, "teacher_tokens_mapped": M, "student_share": U / max(self.student_vocab, 1),
                "teacher_share": M / max(self.teacher_vocab, 1)}


MATCHES = ("exact", "prefix")


def _prefix_pairs(teacher_bytes: TokenBytes, student_tok: Tokenizer, student_bytes: TokenBytes,
                  canonical: dict[bytes, int], exact: dict[int, int]) -> dict[int, int]:
    """Teacher id -> the student id that begins its text, for the non-empty teacher tokens without an exact
    match (`first_student_tokens`)."""
    todo = [(t, b) for t, b in enumerate(teacher_bytes.table) if b and t not in exact]
    firsts = first_student_tokens([b for _, b in todo], student_tok, student_bytes, canonical)
    return {t: s for (t, _), s in zip(todo, firsts, strict=True) if s >= 0}


def first_student_tokens(texts: Sequence[bytes], student_tok: Tokenizer, student_bytes: TokenBytes,
                         canonical: dict[bytes, int]) -> list[int]:
    """For each byte string, the student token it begins with: the first token of the student's own encoding
    when the bytes are whole UTF-8 characters the student can encode, else the longest student token that is
    a byte prefix; -1 when there is none. `canonical`: byte string -> the student id that carries it."""
    decoded = [_decode(b) for b in texts]
    encoded = _encode_all(student_tok, [x or "" for x in decoded])
    out = []
    for b, text, ids in zip(texts, decoded, encoded, strict=True):
        first = ids[0] if text and ids else None
        if first is not None and student_bytes.table[first] and b.startswith(student_bytes.table[first]):
            out.append(canonical.get(student_bytes.table[first], first))
            continue
        out.append(next((canonical[b[:k]] for k in range(len(b), 0, -1) if b[:k] in canonical), -1))
    return out


def student_canonical(student_tok: Tokenizer, student_bytes: TokenBytes) -> dict[bytes, int]:
    """Byte string -> the one student id that carries it (not a byte-fallback token where there is another,
    else the lowest id)."""
    canonical: dict[bytes, int] = {}
    for i, b in enumerate(student_bytes.table):
        if b and (b not in canonical or _prefer(student_tok, i, canonical[b])):
            canonical[b] = i
    return canonical


@dataclass(frozen=True, eq=False)
class ContinuationMap:
    """The teacher's next-token distribution as a distribution over the student's next token, at any byte
    offset into the teacher's next token (`vocab_match="marginal"`).

    Where the student has read k bytes of the teacher's next token t* (`CrossPlan.offset`), the teacher tokens
    that may be that token are those whose bytes start with t*'s first k bytes and go on beyond them; each goes
    on with the student token its remaining bytes begin with (`first_student_tokens`):

        q(s) = sum {p(t) : t[:k] = t*[:k], |t| > k, first(t[k:]) = s} / sum {p(t) : t[:k] = t*[:k], |t| > k}

    At k = 0 (aligned) every teacher token counts: the prefix mapping, renormalised over the tokens that map;
    end-of-text maps to end-of-text. The teacher's tokenization is taken as the only one of its text (a
    teacher writing "36" as one token gives no mass to "3" then "6"), the usual approximation. Offsets beyond
    `max_offset` bytes are not scored.

    cls [K+1, Vt] int32: an id of t[:k] (equal ids, equal prefixes); -1 where |t| <= k (k >= 1)
    cont [K+1, Vt] int32: the student id t[k:] begins with, -1 where none
    """

    cls: torch.Tensor
    cont: torch.Tensor

    @classmethod
    def build(cls, teacher_tok: Tokenizer, teacher_bytes: TokenBytes, student_tok: Tokenizer,
              student_bytes: TokenBytes, max_offset: int = 16) -> ContinuationMap:
        canonical = student_canonical(student_tok, student_bytes)
        table = teacher_bytes.table
        K = max(0, min(max_offset, max((len(b) for b in table), default=1) - 1))
        prefix = torch.full((K + 1, len(table)), -1, dtype=torch.int32)
        cont = torch.full((K + 1, len(table)), -1, dtype=torch.int32)
        for k in range(K + 1):
            todo = [(t, b) for t, b in enumerate(table) if len(b) > k]
            firsts = first_student_tokens([b[k:] for _, b in todo], student_tok, student_bytes, canonical)
            ids: dict[bytes, int] = {}
            for (t, b), first in zip(todo, firsts, strict=True):
                prefix[k, t] = ids.setdefault(b[:k], len(ids))
                cont[k, t] = first
        prefix[0] = 0  # no prefix to agree on
        cont[0, teacher_tok.eos_id] = student_tok.eos_id
        return cls(prefix, cont)

    @property
    def max_offset(self) -> int:
        return self.cls.shape[0] - 1

    def to(self, device: str | torch.device) -> ContinuationMap:
        return ContinuationMap(self.cls.to(device), self.cont.to(device))

    def targets(self, teacher_logprobs_NVt: torch.Tensor, offset_N: torch.Tensor, next_N: torch.Tensor,
                width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(log q [N, width] over the student's ids (-inf where 0), valid [N]) from the teacher's log-probabilities
        at the position before its next token (at the temperature), the offset into that token and the token
        (`next_N`, read where offset >= 1). Invalid: no offset, beyond `max_offset`, or no teacher mass that
        goes on as some student token."""
        lp_NVt = _fp(teacher_logprobs_NVt)
        N, Vt = lp_NVt.shape[0], self.cls.shape[1]
        valid_N = (offset_N >= 0) & (offset_N <= self.max_offset)
        q_NW = torch.zeros(N, width + 1, dtype=lp_NVt.dtype, device=lp_NVt.device)
        # one offset at a time: its rows share one continuation index [Vt], so nothing [N, Vt] but the
        # probabilities and a boolean mask is ever built (a 128k teacher vocabulary stays cheap)
        for k in offset_N[valid_N].unique().tolist():
            rows = (valid_N & (offset_N == k)).nonzero().flatten()
            cont_Vt = self.cont[k].long()
            keep_RVt = (cont_Vt >= 0).expand(rows.numel(), -1)
            if k > 0:  # the teacher tokens that start like the token the student is inside
                cls_Vt = self.cls[k].long()
                own_R = cls_Vt[next_N[rows].clamp(0, Vt - 1).long()]
                keep_RVt = keep_RVt & (cls_Vt[None, :] == own_R[:, None])
            p_RVt = lp_NVt[rows, :Vt].exp() * keep_RVt
            q_NW[rows] = torch.zeros(rows.numel(), width + 1, dtype=q_NW.dtype, device=q_NW.device).index_add_(
                1, torch.where(cont_Vt >= 0, cont_Vt, width), p_RVt)
        q_NW = q_NW[:, :width]
        mass_N = q_NW.sum(-1, keepdim=True)
        valid_N = valid_N & (mass_N[:, 0] > 0)
        q_NW = q_NW / mass_N.clamp_min(torch.finfo(q_NW.dtype).tiny)
        return torch.where(q_NW > 0, q_NW.log(), NEG_INF), valid_N


def _prefer(tok: Tokenizer, new: int, old: int) -> bool:
    """Whether student id `new` should carry a byte string instead of `old` (which is lower)."""
    fallback = [bool(_BYTE_FALLBACK.fullmatch(tok.hf.id_to_token(i) or "")) for i in (new, old)]
    return fallback == [False, True]


# ---------------------------------------------------------------------------------------------------
# Positions


def align_document(student_lengths: Sequence[int], teacher_lengths: Sequence[int], student_start: bool) -> list[int]:
    """For each student position i (a token of `student_lengths[i]` bytes), the last teacher position j whose
    tokens 0..j cover as many bytes as the student's tokens 0..i (the same text prefix), or -1.

    A zero-length student token (a special token) is unaligned, except at the very start of a document
    (`student_start`, i = 0: an empty context, like BOS), where it aligns with the last zero-length teacher
    token at the start (the teacher's BOS) if there is one. O(len(student) + len(teacher)).
    """
    positions, offsets = _align(student_lengths, teacher_lengths, student_start, skip=0)
    return [j if k == 0 else -1 for j, k in zip(positions, offsets, strict=True)]


def _align(student_lengths: Sequence[int], teacher_lengths: Sequence[int], student_start: bool,
           skip: int) -> tuple[list[int], list[int]]:
    """`align_document` where the teacher's text starts `skip` bytes into the student's (student positions
    whose text ends within those bytes are unaligned), and each position's offset: 0 where aligned; k >= 1
    where the student's context ends k bytes into the teacher's token j + 1 (j then the teacher position
    before that token, the last whose context is a prefix of the student's); -1 where neither."""
    teacher_ends = list(accumulate(teacher_lengths))
    out, offsets, j, end = [], [], -1, -skip
    for i, n in enumerate(student_lengths):
        end += n
        if (n == 0 and not (student_start and i == 0)) or (n > 0 and end <= 0):
            out.append(-1)
            offsets.append(-1)
            continue
        while j + 1 < len(teacher_ends) and teacher_ends[j + 1] <= end:
            j += 1
        if j >= 0 and teacher_ends[j] == end:
            out.append(j)
            offsets.append(0)
        elif j >= 0 and n > 0 and j + 1 < len(teacher_ends):  # inside teacher token j + 1
            out.append(j)
            offsets.append(end - teacher_ends[j])
        else:
            out.append(-1)
            offsets.append(-1)
    return out, offsets


class CrossPlan(NamedTuple):
    """A packed student batch [B, S] seen by a teacher with another tokenizer: one teacher row per document
    piece, and where each student position's aligned teacher position is. CPU tensors."""

    teacher_ids: torch.Tensor  # [R, L] int64, right-padded with the teacher's pad id
    teacher_mask: torch.Tensor  # [R, L] bool, True on real tokens
    index: torch.Tensor  # [B*S] int64: flat index r*L + j into [R, L] of the aligned teacher position, or -1
    aligned: torch.Tensor  # [B*S] bool: aligned at a token boundary of both (offset == 0)
    # [B*S] int64: 0 where aligned; k >= 1 where the student's context ends k bytes into the teacher's next token
    # (`index` then points at the teacher position before it, and index + 1 at that token); -1 where neither
    offset: torch.Tensor | None = None
    position: torch.Tensor | None = None  # [B*S] int64: `index` where offset >= 0 (aligned or inside), else -1


def plan_cross_batch(input_ids_BS: torch.Tensor, positions_BS: torch.Tensor, segment_ids_BS: torch.Tensor,
                     student_bytes: TokenBytes, teacher_tok: Tokenizer, teacher_bytes: TokenBytes) -> CrossPlan:
    """Split each row into its document pieces (runs of one segment id), turn each piece into text, encode
    it with the teacher and align the two tokenizations (`align_document`).

    A piece's text is its student tokens' bytes, less a leading run of UTF-8 continuation bytes and a
    trailing incomplete character (a window can cut a character); positions within those bytes stay
    unaligned. Every piece gets the teacher's prompt prefix first (`encode_prompt("")`, e.g. its BOS, which
    Gemma and Llama 3 expect), at a document's start or not. A piece whose text is empty, does not decode,
    cannot be encoded by the teacher, or whose teacher tokens do not spell it back (a normaliser changed the
    text) has no teacher row and stays unaligned.
    """
    B, S = input_ids_BS.shape
    ids_rows, seg_rows = input_ids_BS.tolist(), segment_ids_BS.tolist()
    start_rows = (positions_BS == 0).tolist()
    prefix = teacher_tok.encode_prompt("")
    pieces = []  # (flat offset of the piece's first position, student lengths, text bytes, skip, doc start)
    for b in range(B):
        s = 0
        while s < S:
            e = s + 1
            while e < S and seg_rows[b][e] == seg_rows[b][s]:
                e += 1
            ids, start = ids_rows[b][s:e], start_rows[b][s]
            lengths = student_bytes.lengths(ids, document_start=start)
            raw = b"".join(student_bytes.table[i] for i in ids)
            skip, data = _complete_utf8(raw[len(raw) - sum(lengths):])
            pieces.append((b * S + s, lengths, data, skip, start))
            s = e
    texts = [_decode(p[2]) for p in pieces]
    encoded = _encode_all(teacher_tok, [t or "" for t in texts])
    rows, index, offset = [], [-1] * (B * S), [-1] * (B * S)
    for (flat, lengths, data, skip, start), text, t_ids in zip(pieces, texts, encoded, strict=True):
        if not text or t_ids is None:
            continue
        t_lengths = _teacher_lengths(teacher_bytes, t_ids, len(data))
        if t_lengths is None:
            continue
        t_ids, t_lengths = prefix + t_ids, [0] * len(prefix) + t_lengths  # every row, as a prompt starts
        aligned, offsets = _align(lengths, t_lengths, start, skip)
        # inside a teacher token only where that token spells its own bytes (not a prefix-space first token)
        offsets = [k if k <= 0 or t_lengths[j + 1] == len(teacher_bytes.table[t_ids[j + 1]]) else -1
                   for j, k in zip(aligned, offsets, strict=True)]
        rows.append((flat, t_ids, [j if k >= 0 else -1 for j, k in zip(aligned, offsets, strict=True)], offsets))
    L = max((len(r[1]) for r in rows), default=1)
    teacher_ids = torch.full((len(rows), L), teacher_tok.pad_id, dtype=torch.long)
    teacher_mask = torch.zeros((len(rows), L), dtype=torch.bool)
    for r, (flat, t_ids, aligned, offsets) in enumerate(rows):
        teacher_ids[r, :len(t_ids)] = torch.tensor(t_ids, dtype=torch.long)
        teacher_mask[r, :len(t_ids)] = True
        index[flat:flat + len(aligned)] = [r * L + j if j >= 0 else -1 for j in aligned]
        offset[flat:flat + len(offsets)] = offsets
    index_t, offset_t = torch.tensor(index, dtype=torch.long), torch.tensor(offset, dtype=torch.long)
    return CrossPlan(teacher_ids, teacher_mask, torch.where(offset_t == 0, index_t, -1), offset_t == 0, offset_t,
                     index_t)


def alignment_rate(plan: CrossPlan, labels_BS: torch.Tensor) -> float:
    """Share of the labelled student positions (label != IGNORE_INDEX) that have an aligned teacher position
    (0.0 when none is labelled)."""
    labelled = labels_BS.reshape(-1).cpu() != IGNORE_INDEX
    n = int(labelled.sum())
    return float((plan.aligned & labelled).sum()) / n if n else 0.0


def _complete_utf8(data: bytes) -> tuple[int, bytes]:
    """(bytes cut from the front, the rest): `data` less a leading run of continuation bytes (0b10xxxxxx) and a
    trailing character whose lead byte announces more bytes than follow it."""
    skip = 0
    while skip < len(data) and data[skip] & 0xC0 == 0x80:
        skip += 1
    data = data[skip:]
    for back in range(1, min(4, len(data)) + 1):
        lead = data[-back]
        if lead & 0xC0 == 0x80:
            continue
        need = 1 if lead < 0x80 else 2 if lead >> 5 == 0b110 else 3 if lead >> 4 == 0b1110 else 4
        if need > back:
            data = data[:-back]
        break
    return skip, data


def _decode(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _encode_all(tok: Tokenizer, texts: list[str]) -> list[list[int] | None]:
    """The teacher's ids of each text (`encode`, batched), None for a text it cannot encode."""
    try:
        return tok.encode_batch(texts)
    except ValueError:
        out = []
        for t in texts:
            try:
                out.append(tok.encode(t))
            except ValueError:
                out.append(None)
        return out


def _teacher_lengths(teacher_bytes: TokenBytes, ids: list[int], size: int) -> list[int] | None:
    """Bytes per teacher token of one encoded text of `size` bytes, None unless they add up to it. Each encode
    prepends a prefix-space tokenizer's space, unless the text already starts with one (then it is text)."""
    for document_start in (True, False):
        lengths = teacher_bytes.lengths(ids, document_start=document_start)
        if sum(lengths) == size:
            return lengths
    return None
