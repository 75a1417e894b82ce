"""Teachers of other model families (transformers causal LMs) and distillation across tokenizers, end to end:
tiny random Llama 3, Qwen 2, GPT-2 and Mixtral (MoE) models saved by `save_pretrained` with tokenizers trained
here."""

from __future__ import annotations

import json

import pytest
import torch

from behemoth import build_model
from behemoth.checkpoint.convert import CheckpointError
from behemoth.checkpoint.foreign import ForeignTeacher, load_any_model, load_foreign
from behemoth.cli import main
from behemoth.config import PRESETS
from behemoth.data.loader import IGNORE_INDEX, DataLoader
from behemoth.data.packing import build_in_memory
from behemoth.data.tasks import make_problems
from behemoth.train.config import DistillSection, RouterSection
from behemoth.train.cross_step import CrossTokenizerDistillStep
from behemoth.train.kd import Divergence
from behemoth.train.kd_loss import kd_loss
from behemoth.train.steps import DistillStep

transformers = pytest.importorskip("transformers")
from foreign_models import FAMILIES, bpe_tokenizer, char_tokenizer, save_teacher  # noqa: E402

RUN = ["--model.preset=debug", "--train.batch_size=4", "--data.seq_len=48", "--data.num_problems=300",
       "--log.every=1", "--log.eval_every=0", "--log.health_every=2", "--checkpoint.every=0", "--log.plots=false",
       "--log.tensorboard=false", "--train.steps=3"]


@pytest.fixture(scope="module")
def char_tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def bpe_tok():
    return bpe_tokenizer()


@pytest.fixture(scope="module")
def teachers(tmp_path_factory, char_tok):
    """One teacher per family, with the student's own (character) tokenizer."""
    root = tmp_path_factory.mktemp("teachers")
    return {f: save_teacher(root / f, f, char_tok, seed=i) for i, f in enumerate(FAMILIES)}


def packed_batch(tok, rows=3, seq_len=48):
    """Packed windows of the built-in tasks: several documents per row, one cut at the row's start."""
    store = build_in_memory([p.text for p in make_problems("test", 40, seed=3)], tok)
    return next(iter(DataLoader(store, rows, seq_len, shuffle=False)))


def student_for(tok):
    torch.manual_seed(0)
    return build_model(PRESETS["debug"].replace(vocab_size=tok.vocab_size)).eval()


def own_logits_per_document(hf, batch):
    """Reference: the transformers model's own forward, run on each document piece alone, [B*S, V]."""
    out = torch.empty(*batch.input_ids.shape, hf.config.vocab_size)
    for b in range(batch.input_ids.shape[0]):
        seg = batch.segment_ids[b]
        for s in seg.unique():
            cols = (seg == s).nonzero().flatten()
            with torch.no_grad():
                out[b, cols] = hf(input_ids=batch.input_ids[b, cols][None]).logits[0]
    return out.flatten(0, 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_rows_give_each_documents_own_logits(teachers, char_tok, family):
    teacher = load_foreign(teachers[family])
    assert isinstance(teacher, ForeignTeacher) and teacher.config.model_type == family
    batch = packed_batch(char_tok)
    assert int(batch.segment_ids.max()) >= 1  # several documents per row
    got = teacher.logits(teacher.hidden_states(batch.input_ids, **batch.model_inputs).flatten(0, 1))
    torch.testing.assert_close(got, own_logits_per_document(teacher.model, batch), rtol=1e-4, atol=1e-5)
    if family == "mixtral":  # MoE: routed expert parameters count by top-k / experts
        assert teacher.config.num_active_params() < teacher.config.num_params() * 0.8


@pytest.mark.parametrize("family", FAMILIES)
def test_same_tokenizer_distillation_is_the_dense_kd_on_the_teachers_own_logits(teachers, char_tok, family):
    """The step's KD sum equals the existing dense forward KL computed from the transformers model's own forward
    (the closed form the native path is tested against)."""
    teacher = load_any_model(teachers[family])
    student = student_for(char_tok)
    step = DistillStep(student, teacher, RouterSection(), DistillSection(alpha=1.0))
    batch = packed_batch(char_tok)
    h_BSD = step._hidden(batch)
    _, metrics = step._distill(batch, h_BSD, step._targets(batch), 1.0)
    mask = batch.labels.flatten() != IGNORE_INDEX
    with torch.no_grad():
        want, n = kd_loss(h_BSD.flatten(0, 1), student.logits, own_logits_per_document(teacher.model, batch), mask,
                          Divergence("forward_kl"), max_padded_mass=None)
    assert metrics["tokens"] == n
    assert metrics["kd_loss"] == pytest.approx(want.item(), rel=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_cross_tokenizer_step_matches_aligned_positions_only(tmp_path, char_tok, bpe_tok, family):
    """A teacher with a byte-level BPE vs a character student, vocab_match=prefix: KD at the aligned positions,
    computed from the teacher run on its own tokens of the same text; the CE covers every labelled position."""
    teacher = load_foreign(save_teacher(tmp_path / "t", family, bpe_tok))
    student = student_for(char_tok)
    cfg = DistillSection(alpha=0.5, cross_method="aligned", vocab_match="prefix")
    step = CrossTokenizerDistillStep(student, teacher, bpe_tok, char_tok, RouterSection(), cfg)
    batch = packed_batch(char_tok)
    targets = step._targets(batch)
    labelled = batch.labels.flatten() != IGNORE_INDEX
    rate = float((targets.aligned & labelled).sum() / labelled.sum())
    assert 0.2 < rate < 1.0  # BPE merges: positions inside a teacher token have no teacher position
    # each aligned position's teacher logits are the teacher's own forward on its encoding of the prefix text
    for n in targets.aligned.nonzero().flatten()[:5].tolist():
        b, s = divmod(n, batch.input_ids.shape[1])
        start = (batch.segment_ids[b] == batch.segment_ids[b, s]).nonzero().min().item()
        prefix = char_tok.decode(batch.input_ids[b, start:s + 1])
        ids = bpe_tok.encode(prefix)
        with torch.no_grad():
            own = teacher.model(input_ids=torch.tensor([ids])).logits[0, -1]
        torch.testing.assert_close(targets.logits(n, n + 1)[0], own, rtol=1e-4, atol=1e-5)
    res_h = step._hidden(batch)
    loss, metrics = step._distill(batch, res_h, targets, 1.0)
    assert metrics["kd_weight"] == pytest.approx(0.5 * float((targets.aligned & labelled).sum()), rel=1e-6)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)


def test_marginal_matching_scores_positions_inside_teacher_tokens(tmp_path, char_tok, bpe_tok):
    """vocab_match=marginal (the default): positions inside a teacher token are scored too, with the teacher's
    logits at the position before that token (its own forward on its tokens so far)."""
    from behemoth.train.token_align import plan_cross_batch

    teacher = load_foreign(save_teacher(tmp_path / "t", "qwen2", bpe_tok))
    student = student_for(char_tok)
    assert DistillSection().vocab_match == "marginal" and DistillSection().cross_method == "aligned"
    step = CrossTokenizerDistillStep(student, teacher, bpe_tok, char_tok, RouterSection(), DistillSection(alpha=0.5))
    batch = packed_batch(char_tok)
    targets = step._targets(batch)
    plan = plan_cross_batch(batch.input_ids, batch.positions, batch.segment_ids, step.student_bytes, bpe_tok,
                            step.teacher_bytes)
    labelled = batch.labels.flatten() != IGNORE_INDEX
    assert torch.equal(targets.aligned, plan.offset >= 0) and torch.equal(targets.offset, plan.offset)
    matched, aligned = float((targets.aligned & labelled).sum()), float((plan.aligned & labelled).sum())
    assert matched > aligned and matched >= 0.9 * float(labelled.sum())
    L = plan.teacher_ids.shape[1]
    for n in (plan.offset > 0).nonzero().flatten()[:5].tolist():
        r, j = divmod(int(plan.position[n]), L)
        assert int(targets.next_ids[n]) == int(plan.teacher_ids[r, j + 1])
        with torch.no_grad():
            own = teacher.model(input_ids=plan.teacher_ids[r:r + 1, :j + 1]).logits[0, -1]
        torch.testing.assert_close(targets.logits(n, n + 1)[0], own, rtol=1e-4, atol=1e-5)
    loss, metrics = step._distill(batch, step._hidden(batch), targets, 1.0)
    assert 0.5 * float((plan.aligned & labelled).sum()) < metrics["kd_weight"]
    assert metrics["kd_weight"] <= 0.5 * float((targets.aligned & labelled).sum())
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)


def run_cli(*args):
    return main(list(args))


@pytest.mark.parametrize("method", ["aligned", "uld", "hybrid"])
def test_distill_cli_across_tokenizers_logs_overlap_and_alignment(tmp_path, bpe_tok, method, capsys):
    teacher = save_teacher(tmp_path / "gpt2", "gpt2", bpe_tok)
    out = tmp_path / "run"
    assert run_cli("distill", *RUN, f"--distill.teacher={teacher}", "--distill.tokenizer=own",
                   f"--distill.cross_method={method}", f"--train.out_dir={out}") == 0
    said = capsys.readouterr().out
    assert f"distill.cross_method={method}" in said and "shared tokens" in said and "positions aligned" in said
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["type"] == "train"]
    assert len(train) == 3 and all(0 < r["kd_aligned"] <= 1 and r["kd_loss"] > 0 for r in train)
    (overlap,) = [r for r in recs if r["type"] == "cross_tokenizer"]  # the opening figures, logged
    assert overlap["step"] == 0 and overlap["cross_method"] == method and overlap["shared_tokens"] > 0
    assert 0 < overlap["teacher_mass_shared"] <= overlap["teacher_mass_mapped"] <= 1 + 1e-6
    assert json.loads((out / "train_config.json").read_text())["distill"]["cross_method"] == method


def test_distill_cli_from_a_transformers_run_directory_and_same_tokenizer(tmp_path, teachers, capsys):
    """A transformers teacher with the student's tokenizer distils by the usual path (no alignment)."""
    out = tmp_path / "run"
    assert run_cli("distill", *RUN, f"--distill.teacher={teachers['mixtral']}", f"--train.out_dir={out}") == 0
    said = capsys.readouterr().out
    assert "another tokenizer" not in said
    train = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert train and "kd_aligned" not in train[-1] and train[-1]["kd_loss"] > 0


def test_eval_reports_bits_per_byte_and_accuracy_for_a_transformers_model(teachers, tmp_path, capsys):
    report = tmp_path / "r.json"
    assert run_cli("eval", "--model", str(teachers["llama"]), "--problems", "8", "--seq-len", "64",
                   "--teacher", str(teachers["qwen2"]), "--out", str(report)) == 0
    r = json.loads(report.read_text())
    h = r["heldout"]
    assert h["bits_per_byte"] == pytest.approx(h["loss"] * h["tokens"] / h["bytes"] / 0.6931471805599453)
    assert h["chars"] == h["bytes"]  # the built-in tasks are ASCII
    assert r["tasks"]["n"] == 8 and r["teacher_kl"]["kl"] > 0
    assert "bits/byte" in capsys.readouterr().out


def bad(capsys, *args) -> str:
    assert main(list(args)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_bad_teachers_are_one_line_errors_and_write_nothing(tmp_path, bpe_tok, char_tok, capsys):
    out = tmp_path / "run"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "no_such_family", "vocab_size": 10}))
    char_tok.save(broken)
    assert "transformers cannot read" in bad(capsys, "distill", *RUN, f"--distill.teacher={broken}",
                                            f"--train.out_dir={out}")
    no_tok = save_teacher(tmp_path / "notok", "llama", char_tok, tokenizer=False)
    assert "tokenizer.json" in bad(capsys, "distill", *RUN, f"--distill.teacher={no_tok}", f"--train.out_dir={out}")
    cross = save_teacher(tmp_path / "cross", "qwen2", bpe_tok)
    err = bad(capsys, "distill", *RUN, f"--distill.teacher={cross}", "--distill.tokenizer=own", "--distill.top_k=4",
              f"--train.out_dir={out}")
    assert "distill.top_k" in err
    err = bad(capsys, "distill-cache", "--teacher", str(cross), "--out", str(tmp_path / "cache"),
              "--data.tokenizer=" + str(tmp_path / "notok" / "none.json"))
    assert "--data.tokenizer" in err or "none.json" in err
    char_tok.save(tmp_path / "chars.json")
    err = bad(capsys, "distill-cache", "--teacher", str(cross), "--out", str(tmp_path / "cache"),
              f"--data.tokenizer={tmp_path / 'chars.json'}")
    assert "distil online" in err
    assert "is not a Llama 4 checkpoint" in bad(capsys, "generate", "--model", str(cross), "--prompt", "1+1=")
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_a_tokenizer_that_cannot_spell_its_tokens_is_refused(tmp_path, capsys):
    """WordPiece joins tokens with spaces its "##" pieces lack: no token stands for a fixed piece of text."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[SEP]": 1, "[UNK]": 2, **{c: i + 3 for i, c in enumerate("0123456789+=#?:;*%abcdefgh")}}
    hf = tokenizers.Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.decoder = decoders.WordPiece()
    (tmp_path / "wp").mkdir()
    hf.save(str(tmp_path / "wp" / "tokenizer.json"))
    import transformers as tf

    tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                                       num_hidden_layers=1, num_attention_heads=2)).save_pretrained(tmp_path / "wp")
    err = bad(capsys, "distill", *RUN, f"--distill.teacher={tmp_path / 'wp'}", "--distill.tokenizer=own",
              f"--train.out_dir={tmp_path / 'run'}")
    assert "error: distill.teacher:" in err and "WordPiece" in err
    assert not (tmp_path / "run").exists()


def test_load_foreign_refuses_what_it_cannot_distil(tmp_path, char_tok):
    with pytest.raises(CheckpointError, match="no weights"):
        d = tmp_path / "empty"
        d.mkdir()
        transformers.LlamaConfig(vocab_size=10, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2).save_pretrained(d)
        load_foreign(d)


def test_distill_cache_from_a_transformers_teacher_trains_like_online_top_k(tmp_path, teachers):
    """distill-cache runs a transformers teacher once; distilling from its cache (f32 values) gives the same
    losses as distilling online from its top-k."""
    args = [*RUN, "--data.seq_len=32"]
    assert run_cli("distill-cache", "--teacher", str(teachers["gpt2"]), "--out", str(tmp_path / "cache"),
                   "--top-k", "8", "--values", "f32", "--data.seq_len=32", "--data.num_problems=300",
                   "--device=cpu") == 0
    assert run_cli("distill", *args, f"--distill.cache={tmp_path / 'cache'}", f"--train.out_dir={tmp_path / 'c'}") == 0
    assert run_cli("distill", *args, f"--distill.teacher={teachers['gpt2']}", "--distill.top_k=8",
                   f"--train.out_dir={tmp_path / 'o'}") == 0
    a, b = ([json.loads(x) for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
            for r in ("c", "o"))
    assert len(a) == len(b) == 3
    for x, y in zip(a, b, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5) and x["kd_loss"] == pytest.approx(y["kd_loss"], rel=1e-4)


def test_eval_teacher_with_another_tokenizer_is_one_line(tmp_path, teachers, bpe_tok, capsys):
    other = save_teacher(tmp_path / "bpe", "qwen2", bpe_tok)
    err = bad(capsys, "eval", "--model", str(teachers["llama"]), "--teacher", str(other), "--problems", "4")
    assert "--teacher" in err and "bits per byte" in err


def test_a_teacher_whose_tokenizer_adds_bos_sees_it_before_every_document(tmp_path, char_tok):
    """A tokenizer whose post-processor puts BOS before a prompt (Llama 3's, Gemma's): each document piece runs
    after that BOS, as the model's own forward on [BOS] + the document, the BOS's output dropped."""
    from tokenizers import processors

    tok = char_tokenizer()
    tok.hf.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                          special_tokens=[("<|begin_of_text|>", tok.bos_id)])
    teacher = load_foreign(save_teacher(tmp_path / "t", "llama", tok))
    assert teacher.prefix_ids == [tok.bos_id]
    batch = packed_batch(char_tok)
    got = teacher.logits(teacher.hidden_states(batch.input_ids, **batch.model_inputs))
    for b in range(batch.input_ids.shape[0]):
        seg = batch.segment_ids[b]
        for s in seg.unique():
            cols = (seg == s).nonzero().flatten()
            ids = torch.cat([torch.tensor([tok.bos_id]), batch.input_ids[b, cols]])[None]
            with torch.no_grad():
                own = teacher.model(input_ids=ids).logits[0, 1:]
            torch.testing.assert_close(got[b, cols], own, rtol=1e-4, atol=1e-5)


def test_settings_a_transformers_teacher_cannot_take_are_one_line(tmp_path, teachers, bpe_tok, capsys):
    err = bad(capsys, "distill", *RUN, f"--distill.teacher={teachers['gpt2']}", "--data.seq_len=300",
              f"--train.out_dir={tmp_path / 'a'}")
    assert "data.seq_len=300" in err and "256" in err
    cross = save_teacher(tmp_path / "cross", "qwen2", bpe_tok)
    err = bad(capsys, "distill", *RUN, f"--distill.teacher={cross}", "--distill.tokenizer=own",
              "--distill.loss=reverse_kl", f"--train.out_dir={tmp_path / 'b'}")
    assert "distill.loss=reverse_kl" in err and "marginal" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
