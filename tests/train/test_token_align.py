"""Cross-tokenizer distillation: position alignment, vocabulary maps and the divergences across vocabularies,
against hand-made cases, real tokenizers of three kinds (characters, byte-level BPE, SentencePiece-like) and
closed forms written out in plain torch."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from behemoth.data.loader import IGNORE_INDEX
from behemoth.data.token_bytes import TokenBytes
from behemoth.data.tokenizer import Tokenizer
from behemoth.train.cross_kd import METHODS, aligned_divergence, cross_divergence, hybrid, uld
from behemoth.train.kd import KINDS, MISSING_MASS, Divergence, token_divergence
from behemoth.train.token_align import VocabMap, align_document, alignment_rate, plan_cross_batch

DOCS = [
    "the café in 東京 is nice 🙂 and the café again",
    "hello world, the quick brown fox 東京",
    " a doc that starts with a space: Größe ½ 🙂🙂",
    "last one, café 東京 the end",
]
ALPHABET = "".join(sorted(set("".join(DOCS))))
BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]


def _spm_decoder():
    return decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                              decoders.Strip(" ", 1, 0)])


def _spm_from(hf: HFTokenizer) -> Tokenizer:
    """A SentencePiece-like tokenizer: its byte tokens are ordinary vocabulary entries (as in Llama 2's
    tokenizer.json), "<s>" is prepended to prompts."""
    spec = json.loads(hf.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] not in BYTE_TOKENS]
    hf = HFTokenizer.from_str(json.dumps(spec))
    hf.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", hf.token_to_id("<s>"))])
    return Tokenizer(hf)


@pytest.fixture(scope="module")
def toks() -> dict[str, tuple[Tokenizer, TokenBytes]]:
    chars = Tokenizer.from_chars(ALPHABET)
    bpe = Tokenizer.train(DOCS * 5, vocab_size=300)
    hf = HFTokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    hf.decoder = _spm_decoder()
    trainer = trainers.BpeTrainer(vocab_size=340, special_tokens=["<unk>", "<s>", "</s>", *BYTE_TOKENS],
                                  show_progress=False)
    hf.train_from_iterator(DOCS * 5, trainer=trainer)
    spm = _spm_from(hf)
    return {name: (tok, TokenBytes.of(tok)) for name, tok in (("chars", chars), ("bpe", bpe), ("spm", spm))}


@pytest.fixture(scope="module")
def tiny() -> tuple[Tokenizer, TokenBytes, Tokenizer, TokenBytes]:
    """A hand-made SentencePiece-like teacher (byte tokens, "▁", "A", "B", "▁A", "ab") and a character student
    over "AB ab": teacher "<0x41>" and "A" both spell "A" (many-to-one)."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{t: 3 + i for i, t in enumerate(BYTE_TOKENS)}}
    for t in ("▁", "A", "B", "▁A", "ab"):
        vocab[t] = len(vocab)
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[("▁", "A")], byte_fallback=True, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    hf.decoder = _spm_decoder()
    hf.add_special_tokens(["<unk>", "<s>", "</s>"])
    teacher, student = Tokenizer(hf), Tokenizer.from_chars("AB ab")
    return teacher, TokenBytes.of(teacher), student, TokenBytes.of(student)


# ---------------------------------------------------------------------------------------------------
# align_document


def test_align_document_hand_made():
    assert align_document([1, 2, 1], [1, 2, 1], True) == [0, 1, 2]  # same tokenization
    assert align_document([2, 1], [1, 2], False) == [-1, 1]  # "ab","c" vs "a","bc"
    assert align_document([2, 1, 1], [1, 2, 1], False) == [-1, 1, 2]
    # "é" (2 bytes) + "x": a character student against byte-level tokens, and the other way round
    assert align_document([2, 1], [1, 1, 1], False) == [1, 2]
    assert align_document([1, 1, 1], [2, 1], False) == [-1, 0, 1]
    # 4-byte emoji split 3 + 1 by the student, 2 + 2 by the teacher, then "ab" vs "a","b"
    assert align_document([3, 1, 2], [2, 2, 1, 1], False) == [-1, 1, 3]
    # zero-length specials: BOS at a document start aligns with the teacher's (the last one at the start)
    assert align_document([0, 1, 1], [0, 1, 1], True) == [0, 1, 2]
    assert align_document([0, 2], [0, 0, 2], True) == [1, 2]
    assert align_document([0, 1], [1], True) == [-1, 0]  # teacher without BOS
    assert align_document([0, 1], [0, 1], False) == [-1, 1]  # not a document start
    assert align_document([1, 0, 1], [1, 1], True) == [0, -1, 1]  # a special in the middle
    assert align_document([1, 1], [1, 0, 1], False) == [1, 2]  # the last teacher position with that prefix
    assert align_document([1, 1, 1], [1, 1], False) == [0, 1, -1]  # teacher text shorter
    assert align_document([], [1, 2], True) == []
    assert align_document([1, 2], [], True) == [-1, -1]


# ---------------------------------------------------------------------------------------------------
# plan_cross_batch on packed batches


def _pack(tok: Tokenizer, starts: list[int], S: int) -> tuple[torch.Tensor, ...]:
    """Rows [S] of the packed stream of DOCS (each + EOS) from the given offsets: input ids, labels,
    positions, segment ids."""
    stream, pos, doc = [], [], []
    for d, text in enumerate(DOCS):
        ids = tok.encode(text) + [tok.eos_id]
        stream += ids
        pos += range(len(ids))
        doc += [d] * len(ids)
    assert max(starts) + S + 1 <= len(stream)
    rows = [(stream[s:s + S], stream[s + 1:s + S + 1], pos[s:s + S], [d - doc[s] for d in doc[s:s + S]])
            for s in starts]
    return tuple(torch.tensor([r[k] for r in rows], dtype=torch.long) for k in range(4))


def _pieces(segment_ids_BS: torch.Tensor) -> list[tuple[int, int, int]]:
    """(row, start, end) of each run of one segment id."""
    out = []
    for b, row in enumerate(segment_ids_BS.tolist()):
        s = 0
        for e in range(1, len(row) + 1):
            if e == len(row) or row[e] != row[s]:
                out.append((b, s, e))
                s = e
    return out


def _decodable_prefix(data: bytes) -> bytes:
    while data:
        try:
            data.decode("utf-8")
            return data
        except UnicodeDecodeError:
            data = data[:-1]
    return data


def _check_plan(plan, batch, student: TokenBytes, teacher: TokenBytes, char_teacher: bool = False) -> None:
    """Every aligned pair has read the same text; pieces map to teacher rows in order, one row each; with a
    character teacher, exactly the positions that end on a character boundary are aligned."""
    input_ids, _, positions, segment_ids = batch
    B, S = input_ids.shape
    L = plan.teacher_ids.shape[1]
    assert plan.index.shape == plan.aligned.shape == (B * S,)
    assert torch.equal(plan.aligned, plan.index >= 0)
    assert plan.teacher_mask.shape == plan.teacher_ids.shape
    index = plan.index.tolist()
    last_row = -1
    for b, s, e in _pieces(segment_ids):
        ids = input_ids[b, s:e].tolist()
        raw = b"".join(student.table[i] for i in ids)  # these students prepend no space
        lead = len(raw) - len(raw.lstrip(bytes(range(0x80, 0xC0))))
        text = _decodable_prefix(raw[lead:])
        rows = {index[b * S + i] // L for i in range(s, e) if index[b * S + i] >= 0}
        assert len(rows) <= 1
        if not rows:
            continue
        r = rows.pop()
        assert r > last_row
        last_row = r
        t_ids = plan.teacher_ids[r][plan.teacher_mask[r]].tolist()
        assert not plan.teacher_mask[r, len(t_ids):].any()
        t_all = b"".join(teacher.table[i] for i in t_ids)
        extra = int(teacher.prefix_space and t_all.startswith(b" ") and not text.startswith(b" "))
        assert t_all[extra:] == text  # the teacher row spells the piece's (complete) text
        for i in range(s, e):
            n = len(student.table[ids[i - s]])
            end = sum(len(student.table[t]) for t in ids[:i - s + 1]) - lead  # bytes of text read, past the cut
            k = index[b * S + i]
            if k >= 0:
                j = k - r * L
                s_prefix = raw[lead:lead + end] if end > 0 else b""
                assert b"".join(teacher.table[t] for t in t_ids[:j + 1])[extra:] == s_prefix, (b, i, j)
                assert n > 0 or (i == s and positions[b, s] == 0)
            if char_teacher:
                boundary = 0 < end <= len(text) and (end == len(text) or text[end] & 0xC0 != 0x80)
                assert (k >= 0) == (n > 0 and boundary), (b, i)


@pytest.mark.parametrize("teacher", ["bpe", "spm", "chars"])
def test_plan_char_student(toks, teacher):
    student_tok, student = toks["chars"]
    teacher_tok, teacher_bytes = toks[teacher]
    batch = _pack(student_tok, [0, 30, 70], 60)  # two documents per row; rows 1 and 2 start mid-document
    plan = plan_cross_batch(batch[0], batch[2], batch[3], student, teacher_tok, teacher_bytes)
    _check_plan(plan, batch, student, teacher_bytes, char_teacher=teacher == "chars")
    assert plan.teacher_ids.shape[0] == len(_pieces(batch[3]))
    rate = alignment_rate(plan, batch[1])
    if teacher == "chars":  # the same tokenizer: every position but the EOS ones
        assert torch.equal(plan.aligned, batch[0].reshape(-1) != student_tok.eos_id)
        assert rate == plan.aligned.double().mean().item() > 0.9
    else:  # the teacher's words end on characters, so a fair share of student positions are aligned
        assert 0.25 < rate < 1.0
    if teacher == "spm":  # every piece (a document's start or not) begins with the teacher's BOS, aligned with nothing
        starts = [r for r in range(plan.teacher_ids.shape[0]) if plan.teacher_ids[r, 0] == teacher_tok.bos_id]
        assert len(starts) == len(_pieces(batch[3])) > sum(1 for b, s, _ in _pieces(batch[3]) if batch[2][b, s] == 0)
        assert not torch.isin(plan.index, torch.tensor([r * plan.teacher_ids.shape[1] for r in starts])).any()


def test_plan_identity_maps_each_position_to_itself(toks):
    tok, tb = toks["chars"]
    batch = _pack(tok, [5, 50], 70)
    plan = plan_cross_batch(batch[0], batch[2], batch[3], tb, tok, tb)
    L = plan.teacher_ids.shape[1]
    for r, (b, s, e) in enumerate(_pieces(batch[3])):
        ids = [i for i in batch[0][b, s:e].tolist() if i != tok.eos_id]
        assert plan.teacher_ids[r][plan.teacher_mask[r]].tolist() == ids
        for i in range(s, s + len(ids)):
            assert plan.index[b * 70 + i] == r * L + i - s


def test_plan_student_bos_aligns_with_teacher_bos(toks):
    """A student whose documents start with BOS: the BOS position (empty context) aligns with the teacher's."""
    student_tok, student = toks["chars"]
    teacher_tok, teacher_bytes = toks["spm"]
    ids = [student_tok.bos_id, *student_tok.encode(DOCS[1]), student_tok.eos_id]
    input_ids = torch.tensor([ids])
    positions, segments = torch.arange(len(ids))[None], torch.zeros(1, len(ids), dtype=torch.long)
    plan = plan_cross_batch(input_ids, positions, segments, student, teacher_tok, teacher_bytes)
    assert plan.teacher_ids[0, 0] == teacher_tok.bos_id
    # the last teacher position with no text yet: BOS, or a lone prepended "▁" right after it
    lone_space = teacher_tok.hf.id_to_token(int(plan.teacher_ids[0, 1])) == "▁"
    assert plan.index[0] == int(lone_space) and plan.index[-1] == -1
    _check_plan(plan, (input_ids, None, positions, segments), student, teacher_bytes)


@pytest.mark.parametrize("teacher", ["chars", "spm", "bpe"])
def test_plan_window_cut_inside_a_character(toks, teacher):
    """A byte-level student whose rows start and end inside multi-byte characters: those bytes are left out
    of the teacher's text, their positions stay unaligned, and the rest aligns as usual."""
    student_tok = Tokenizer.train(["the quick brown fox, hello world: the end"] * 5, vocab_size=280)  # bytes of
    student = TokenBytes.of(student_tok)  # other characters stay apart
    stream = [i for d in DOCS for i in [*student_tok.encode(d), student_tok.eos_id]]
    cont = [k for k, i in enumerate(stream) if student.table[i][:1] and student.table[i][0] & 0xC0 == 0x80]
    assert len(cont) >= 2
    S = 24
    starts = [cont[0], next(k for k in cont if k > cont[0] + S) - S, 0]  # row 1 ends cutting a character
    batch = _pack(student_tok, starts, S)
    assert student.table[int(batch[0][0, 0])][0] & 0xC0 == 0x80  # row 0 starts inside a character
    assert student.table[stream[starts[1] + S]][0] & 0xC0 == 0x80  # row 1 stops inside one
    teacher_tok, teacher_bytes = toks[teacher]
    plan = plan_cross_batch(batch[0], batch[2], batch[3], student, teacher_tok, teacher_bytes)
    _check_plan(plan, batch, student, teacher_bytes, char_teacher=teacher == "chars")
    assert not plan.aligned[0]  # a continuation byte: no text of its own yet
    assert not plan.aligned[2 * S - 1]  # ends inside the character the window cuts
    if teacher == "chars":  # every row keeps its teacher text: the cut bytes are trimmed, not the whole piece
        assert plan.aligned.view(3, S).any(1).all() and plan.aligned.sum() > S


# ---------------------------------------------------------------------------------------------------
# VocabMap


def test_vocab_map_same_tokenizer_is_identity(toks):
    tok, tb = toks["bpe"]
    vmap = VocabMap.build(tok, tb, tok, tb)
    shared = [i for i, b in enumerate(tb.table) if b] + [tok.eos_id]
    assert vmap.teacher_ids.tolist() == sorted(shared) == vmap.student_ids.tolist()
    assert torch.equal(vmap.student_ids[vmap.slot], vmap.teacher_ids)
    assert vmap.unshared_teacher_mask.nonzero().flatten().tolist() == [tok.bos_id, tok.pad_id]
    assert torch.equal(vmap.unshared_teacher_mask, vmap.unshared_student_mask)
    logits = 3 * torch.randn(5, tok.vocab_size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    logits[:, [tok.bos_id, tok.pad_id]] = -math.inf
    lp = torch.log_softmax(logits, -1)
    topk = vmap.to_student(lp)
    assert topk.logprobs.dtype == torch.float64 and topk.ids.shape == topk.logprobs.shape == (5, len(shared))
    dense = torch.full_like(lp, -math.inf).scatter(1, topk.ids, topk.logprobs)
    torch.testing.assert_close(dense, lp, rtol=0, atol=1e-12)
    torch.testing.assert_close(vmap.shared_mass(lp), torch.ones(5, dtype=torch.float64))
    summary = vmap.summary()
    assert summary["shared_tokens"] == len(shared) and summary["student_share"] == len(shared) / tok.vocab_size


def test_vocab_map_many_to_one_closed_form(tiny):
    teacher, tb, student, sb = tiny
    vmap = VocabMap.build(teacher, tb, student, sb)
    t, s = teacher.token_to_id, student.token_to_id
    pairs = {t("<0x41>"): s("A"), t("A"): s("A"), t("<0x42>"): s("B"), t("B"): s("B"), t("<0x20>"): s(" "),
             t("▁"): s(" "), t("<0x61>"): s("a"), t("<0x62>"): s("b"), teacher.eos_id: student.eos_id}
    got = dict(zip(vmap.teacher_ids.tolist(), vmap.student_ids[vmap.slot].tolist(), strict=True))
    assert got == pairs  # "▁A", "ab", the other bytes and "<s>", "<unk>" have no counterpart
    assert vmap.student_ids.tolist() == sorted({s("A"), s("B"), s(" "), s("a"), s("b"), student.eos_id})
    assert vmap.unshared_student_mask.nonzero().flatten().tolist() == [student.bos_id, student.pad_id]
    assert vmap.summary() == {"shared_tokens": 6, "teacher_tokens_mapped": 9, "student_share": 6 / 8,
                              "teacher_share": 9 / teacher.vocab_size}
    logits = torch.randn(4, teacher.vocab_size + 3, generator=torch.Generator().manual_seed(1))  # 3 padding columns
    logits[0, t("A")] = -math.inf  # one of the two teacher ids of "A" has no mass
    logits[1, [t("<0x42>"), t("B")]] = -math.inf  # neither of "B"
    p = torch.softmax(logits.double(), -1)
    topk = vmap.to_student(torch.log_softmax(logits, -1))
    assert topk.logprobs.dtype == torch.float32
    col = {sid: k for k, sid in enumerate(vmap.student_ids.tolist())}
    want = torch.zeros(4, 6, dtype=torch.float64)
    for tid, sid in pairs.items():
        want[:, col[sid]] += p[:, tid]
    torch.testing.assert_close(topk.logprobs.double().exp(), want, rtol=1e-5, atol=1e-7)
    assert torch.isneginf(topk.logprobs[1, col[s("B")]]) and torch.isfinite(topk.logprobs[0, col[s("A")]])
    torch.testing.assert_close(vmap.shared_mass(torch.log_softmax(logits, -1)).double(), want.sum(-1))


def test_vocab_map_prefix_maps_the_tokens_the_student_lacks_to_how_it_begins_them(tiny):
    """match="prefix": "▁A" (text " A") goes to the student's " ", "ab" to "a"; the exact pairs stay; the
    teacher's probabilities on all of them add up on the student's side."""
    teacher, tb, student, sb = tiny
    exact = VocabMap.build(teacher, tb, student, sb)
    vmap = VocabMap.build(teacher, tb, student, sb, match="prefix")
    t, s = teacher.token_to_id, student.token_to_id
    got = dict(zip(vmap.teacher_ids.tolist(), vmap.student_ids[vmap.slot].tolist(), strict=True))
    want = {**dict(zip(exact.teacher_ids.tolist(), exact.student_ids[exact.slot].tolist(), strict=True)),
            t("▁A"): s(" "), t("ab"): s("a")}
    assert got == want
    logits = torch.randn(3, teacher.vocab_size, generator=torch.Generator().manual_seed(2))
    p = torch.softmax(logits.double(), -1)
    lp = vmap.to_student(torch.log_softmax(logits, -1)).logprobs.double().exp()
    col = {sid: k for k, sid in enumerate(vmap.student_ids.tolist())}
    torch.testing.assert_close(lp[:, col[s("a")]], p[:, t("<0x61>")] + p[:, t("ab")], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="match="):
        VocabMap.build(teacher, tb, student, sb, match="fuzzy")


def test_vocab_map_prefix_for_a_bpe_teacher_and_a_character_student(toks):
    """Every teacher token of whole characters begins with some student character: prefix matching maps all of
    them, each to its first character; a token that is part of a multi-byte character maps to nothing."""
    (bpe, bb), (chars, cb) = toks["bpe"], toks["chars"]
    vmap = VocabMap.build(bpe, bb, chars, cb, match="prefix")
    got = dict(zip(vmap.teacher_ids.tolist(), vmap.student_ids[vmap.slot].tolist(), strict=True))
    for tid, b in enumerate(bb.table):
        first = b.decode("utf-8", errors="ignore")[:1]  # the first whole character ("" within one)
        if b and first and b.startswith(first.encode()) and chars.token_to_id(first) is not None:
            assert got[tid] == chars.token_to_id(first), b
        elif tid != bpe.eos_id:
            assert tid not in got, b


def test_vocab_map_spm_to_itself_prefers_pieces_over_byte_tokens(tiny):
    teacher, tb, _, _ = tiny
    vmap = VocabMap.build(teacher, tb, teacher, tb)
    got = dict(zip(vmap.teacher_ids.tolist(), vmap.student_ids[vmap.slot].tolist(), strict=True))
    t = teacher.token_to_id
    assert got[t("<0x41>")] == got[t("A")] == t("A") and got[t("<0x20>")] == t("▁")
    assert got[t("<0x43>")] == t("<0x43>")  # no other spelling of "C"
    assert got[teacher.eos_id] == teacher.eos_id and teacher.bos_id not in got


# ---------------------------------------------------------------------------------------------------
# Divergences across vocabularies


def test_uld_closed_form():
    p = torch.tensor([[0.7, 0.2, 0.1]], dtype=torch.float64)
    q = torch.tensor([[0.4, 0.6]], dtype=torch.float64)
    # sorted: p = [0.7, 0.2, 0.1], q = [0.6, 0.4, 0]
    torch.testing.assert_close(uld(q.log(), p.log()), torch.tensor([0.1 + 0.2 + 0.1], dtype=torch.float64))
    tau = 2.0  # softmax(log p / 2) = sqrt(p) / sum sqrt(p)
    ps, qs = p.sqrt() / p.sqrt().sum(), q.sqrt() / q.sqrt().sum()
    want = tau**2 * ((ps[0, 0] - qs[0, 1]).abs() + (ps[0, 1] - qs[0, 0]).abs() + ps[0, 2])
    torch.testing.assert_close(uld(q.log(), p.log(), tau), want[None])


def test_uld_is_zero_for_permuted_vocabularies():
    z = torch.randn(3, 7, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(3))
    wider = torch.cat([z[:, perm], torch.full((3, 4), -math.inf, dtype=torch.float64)], -1)
    for tau in (1.0, 3.0):
        torch.testing.assert_close(uld(z, wider, tau), torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-12)
    assert uld(z, wider + 1.0).max() < 1e-12  # a shift of the logits changes nothing
    assert uld(z, z.flip(-1) * 2).min() > 0.1


def _tiny_logits(tiny, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    teacher, _, student, _ = tiny
    g = torch.Generator().manual_seed(seed)
    return (2 * torch.randn(5, student.vocab_size, generator=g, dtype=torch.float64),
            2 * torch.randn(5, teacher.vocab_size, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_hybrid_is_its_two_terms(tiny, tau):
    teacher, tb, student, sb = tiny
    vmap = VocabMap.build(teacher, tb, student, sb)
    s, t = _tiny_logits(tiny, 4)
    p, q = torch.softmax(t / tau, -1), torch.softmax(s / tau, -1)
    # teacher mass on each shared student id, and on the rest; the student's likewise
    p_shared = torch.zeros(5, vmap.student_ids.numel(), dtype=torch.float64)
    p_shared.index_add_(1, vmap.slot, p[:, vmap.teacher_ids])
    q_shared = q[:, vmap.student_ids]
    P = torch.cat([p_shared, 1 - p_shared.sum(-1, keepdim=True)], -1)
    Q = torch.cat([q_shared, 1 - q_shared.sum(-1, keepdim=True)], -1)
    kl = (P * (P / Q).log()).sum(-1)
    p_rest = p[:, vmap.unshared_teacher_mask].sort(-1, descending=True).values
    q_rest = q[:, vmap.unshared_student_mask].sort(-1, descending=True).values
    w = max(p_rest.shape[1], q_rest.shape[1])
    pad = torch.nn.functional.pad
    l1 = (pad(p_rest, (0, w - p_rest.shape[1])) - pad(q_rest, (0, w - q_rest.shape[1]))).abs().sum(-1)
    div = Divergence("forward_kl", temperature=tau, missing_mass="renormalize")  # hybrid forces the residual
    torch.testing.assert_close(hybrid(s, t, vmap, div, uld_weight=0.3), tau**2 * (kl + 0.3 * l1))
    torch.testing.assert_close(aligned_divergence(s, t, vmap, Divergence("forward_kl", tau, missing_mass="residual")),
                               tau**2 * kl)
    torch.testing.assert_close(cross_divergence("hybrid", s, t, vmap, div, 0.3), hybrid(s, t, vmap, div, 0.3))


@pytest.mark.parametrize("mode", MISSING_MASS)
@pytest.mark.parametrize("kind", KINDS)
def test_aligned_with_identity_map_is_dense_divergence(toks, kind, mode):
    tok, tb = toks["chars"]
    vmap = VocabMap.build(tok, tb, tok, tb)
    g = torch.Generator().manual_seed(5)
    s, t = (2 * torch.randn(6, tok.vocab_size, generator=g, dtype=torch.float64) for _ in range(2))
    s[:, [tok.bos_id, tok.pad_id]] = -math.inf  # the unshared ids: no mass on either side
    t[:, [tok.bos_id, tok.pad_id]] = -math.inf
    div = Divergence(kind, temperature=1.5, missing_mass=mode)
    torch.testing.assert_close(aligned_divergence(s, t, vmap, div), token_divergence(s, t, div))
    torch.testing.assert_close(cross_divergence("aligned", s, t, vmap, div), token_divergence(s, t, div))


def test_renormalize_ignores_unshared_mass(tiny):
    """With renormalisation only the teacher's ranking over the shared tokens counts: moving mass between
    unshared teacher ids changes nothing."""
    teacher, tb, student, sb = tiny
    vmap = VocabMap.build(teacher, tb, student, sb)
    s, t = _tiny_logits(tiny, 6)
    t2 = t.clone()
    t2[:, vmap.unshared_teacher_mask] = t2[:, vmap.unshared_teacher_mask].flip(-1)
    div = Divergence("forward_kl", missing_mass="renormalize")
    torch.testing.assert_close(aligned_divergence(s, t, vmap, div), aligned_divergence(s, t2, vmap, div))
    assert (hybrid(s, t, vmap, div, 1.0) - hybrid(s, t2, vmap, div, 1.0)).abs().max() < 1e-9  # sorted: same values


@pytest.mark.parametrize("method", METHODS)
def test_finite_values_and_gradients_with_neg_inf_logits(tiny, method):
    teacher, tb, student, sb = tiny
    vmap = VocabMap.build(teacher, tb, student, sb)
    s, t = (x.float() for x in _tiny_logits(tiny, 7))
    s[0, [student.bos_id, student.pad_id, student.token_to_id("A")]] = -math.inf  # the teacher has no "A" there
    t[0, [teacher.token_to_id("A"), teacher.token_to_id("<0x41>")]] = -math.inf
    s[1, vmap.unshared_student_mask] = -math.inf  # no student mass off the shared ids
    t[2, vmap.teacher_ids] = -math.inf  # no teacher mass on them
    t[3, vmap.unshared_teacher_mask] = -math.inf
    t[4, :] = -math.inf  # a row with no teacher at all
    for mode in MISSING_MASS:
        for kind in ("forward_kl", "reverse_kl", "jsd", "tvd"):
            s_ = s.clone().requires_grad_(True)
            loss = cross_divergence(method, s_, t, vmap, Divergence(kind, 2.0, missing_mass=mode), uld_weight=0.5)
            assert loss.dtype == torch.float32 and loss.shape == (5,)
            assert not loss.isnan().any() and torch.isfinite(loss[:2]).all(), (kind, mode, loss)
            torch.where(torch.isfinite(loss), loss, 0.0).sum().backward()
            assert torch.isfinite(s_.grad).all(), (kind, mode)


def test_cross_divergence_checks(tiny):
    teacher, tb, student, sb = tiny
    vmap = VocabMap.build(teacher, tb, student, sb)
    s, t = _tiny_logits(tiny, 8)
    torch.testing.assert_close(cross_divergence("uld", s, t, div=Divergence(temperature=2.0)), uld(s, t, 2.0))
    with pytest.raises(ValueError, match="expected one of"):
        cross_divergence("dskd", s, t, vmap)
    with pytest.raises(ValueError, match="needs a VocabMap"):
        cross_divergence("aligned", s, t)
    with pytest.raises(ValueError, match="narrower"):
        aligned_divergence(s[:, :4], t, vmap, Divergence())


def test_alignment_rate_counts_labelled_positions_only(toks):
    tok, tb = toks["chars"]
    input_ids, labels, positions, segments = _pack(tok, [0], 50)
    plan = plan_cross_batch(input_ids, positions, segments, tb, tok, tb)
    eos = input_ids == tok.eos_id  # zero bytes: unaligned
    assert eos.sum() == 1
    assert alignment_rate(plan, labels) == 49 / 50
    assert alignment_rate(plan, labels.masked_fill(eos, IGNORE_INDEX)) == 1.0
    assert alignment_rate(plan, labels.masked_fill(~eos, IGNORE_INDEX)) == 0.0
    assert alignment_rate(plan, torch.full_like(labels, IGNORE_INDEX)) == 0.0


def test_continuation_map_is_the_teachers_marginal_over_the_students_next_character(toks):
    """vocab_match="marginal": k bytes into the teacher's next token t*, the student's next character has the
    teacher's probability of the tokens that start like t* and go on with that character, renormalised; brute
    force over the vocabulary for random offsets and tokens; k = 0 is the prefix mapping."""
    from behemoth.train.token_align import ContinuationMap

    (bpe, bb), (chars, cb) = toks["bpe"], toks["chars"]
    cmap = ContinuationMap.build(bpe, bb, chars, cb)
    g = torch.Generator().manual_seed(3)
    long_tokens = [t for t, b in enumerate(bb.table) if len(b) >= 3 and _whole(b)]
    N = 12
    nxt = torch.tensor([long_tokens[i] for i in torch.randint(len(long_tokens), (N,), generator=g)])
    off = torch.tensor([i % 3 for i in range(N)])  # 0, 1, 2 bytes into t*
    lp = torch.log_softmax(torch.randn(N, bpe.vocab_size, generator=g).double(), -1)
    got, valid = cmap.targets(lp, off, nxt, width=chars.vocab_size + 4)
    assert valid.all() and got.shape == (N, chars.vocab_size + 4)
    for n in range(N):
        k, star = int(off[n]), bb.table[int(nxt[n])]
        want = torch.zeros(chars.vocab_size + 4, dtype=torch.float64)
        for t, b in enumerate(bb.table):
            if len(b) > k and (k == 0 or b[:k] == star[:k]):
                first = b[k:].decode("utf-8", errors="ignore")[:1]
                if first and b[k:].startswith(first.encode()) and chars.token_to_id(first) is not None:
                    want[chars.token_to_id(first)] += lp[n, t].exp()
            elif k == 0 and t == bpe.eos_id:
                want[chars.eos_id] += lp[n, t].exp()
        torch.testing.assert_close(got[n].exp(), want / want.sum(), rtol=1e-5, atol=1e-9)
    none, valid = cmap.targets(lp[:2], torch.tensor([-1, cmap.max_offset + 1]), nxt[:2], width=chars.vocab_size)
    assert not valid.any()


def _whole(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_plan_offsets_point_inside_the_teachers_next_token(toks):
    """Every student position inside a teacher token: the teacher position before it plus the offset spell the
    student's context, and the offset is within that token."""
    (bpe, bb), (chars, cb) = toks["bpe"], toks["chars"]
    ids = [chars.encode(d) + [chars.eos_id] for d in DOCS]
    row = sum(ids, [])[:64]
    seg = [k for k, d in enumerate(ids) for _ in d][:64]
    starts = {s: seg.index(s) for s in set(seg)}
    pos = [i - starts[s] for i, s in enumerate(seg)]
    plan = plan_cross_batch(torch.tensor([row]), torch.tensor([pos]), torch.tensor([seg]), cb, bpe, bb)
    inside = (plan.offset > 0).nonzero().flatten().tolist()
    assert inside and (plan.offset >= 0).sum() > plan.aligned.sum()
    flat = plan.teacher_ids.flatten().tolist()
    L = plan.teacher_ids.shape[1]
    for i in inside:
        r, j = divmod(int(plan.position[i]), L)
        start = starts[seg[i]]
        student_text = cb.join(row[start:i + 1])
        teacher_text = b"".join(bb.table[t] for t in flat[r * L:r * L + j + 1])
        nxt = bb.table[flat[r * L + j + 1]]
        k = int(plan.offset[i])
        assert 0 < k < len(nxt) and student_text == teacher_text + nxt[:k], i
