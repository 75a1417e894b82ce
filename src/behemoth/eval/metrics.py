"""Metrics on a trained model: held-out loss / perplexity, KL to a teacher, task accuracy (exact match over n
problems, each share with its 95% Wilson score interval: n is small, and a share alone overstates what it shows).

Loss per token depends on the tokenizer: a tokenizer with longer tokens has fewer, harder ones. Bits per byte
(the held-out loss summed over the tokens, in bits, divided by the UTF-8 bytes of the text those tokens spell,
`data.token_bytes`) and bits per character do not, so models with different tokenizers compare on them.

Shape legend: B batch, S sequence, V vocabulary, N tokens.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Sequence

import torch
from torch import nn

from behemoth.checkpoint.foreign import ForeignTeacher, load_any_model
from behemoth.checkpoint.locate import resolve_model_dir
from behemoth.data.corpus import iter_documents, resolve_paths
from behemoth.data.image_text import encode_image
from behemoth.data.loader import DataLoader
from behemoth.data.packing import TokenStore, build_in_memory
from behemoth.data.tasks import ANSWER_MARK, Problem, accuracy, check, distinct_problems
from behemoth.data.token_bytes import TokenBytes, utf8_chars
from behemoth.data.tokenizer import Tokenizer
from behemoth.inference.generate import generate
from behemoth.train.kd import Divergence
from behemoth.train.kd_loss import kd_loss
from behemoth.train.losses import chunked_cross_entropy

Z95 = 1.959964  # the standard normal's 97.5% quantile: two-sided 95% intervals


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval for a share `successes / n` (closed form). Unlike the textbook p +- z*se
    it stays inside [0, 1] and does not shrink to a point at 0/n or n/n, which small held-out sets hit
    often. No trials (n = 0) say nothing: (0, 1)."""
    if not 0 <= successes <= n:
        raise ValueError(f"successes={successes}, n={n}: need 0 <= successes <= n")
    if n == 0:
        return 0.0, 1.0
    p, z2 = successes / n, z * z
    denom = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return (0.0 if successes == 0 else max(0.0, center - half)), (1.0 if successes == n else min(1.0, center + half))


def with_intervals(result: dict, problems: Sequence[Problem]) -> dict:
    """`data.tasks.accuracy`'s result plus each share's 95% Wilson interval: `interval` [lo, hi] for
    `overall`, `per_task_interval` and `per_task_n` per task. The counts come back from share x n."""
    per_n = Counter(p.task for p in problems)
    right = {t: round(share * per_n[t]) for t, share in result["per_task"].items()}
    result["interval"] = list(wilson_interval(sum(right.values()), result["n"]))
    result["per_task_n"] = {t: per_n[t] for t in result["per_task"]}
    result["per_task_interval"] = {t: list(wilson_interval(right[t], per_n[t])) for t in result["per_task"]}
    return result


def paired_comparison(a: Sequence[bool], b: Sequence[bool], z: float = Z95) -> dict:
    """Two models graded on the same problems (`correct` of two `task_accuracy` results, in the same order): the
    difference of their shares, a - b, with its 95% interval, and the exact two-sided McNemar test. Only the
    problems one got right and the other wrong (`a_only`, `b_only`) carry information, so the comparison is far
    tighter than two independent intervals, which ignore that both models face the same problems.

    interval: the paired Wald interval, d +- z * sqrt(a_only + b_only - (a_only - b_only)^2 / n) / n.
    p_value: 2 * P(X <= min(a_only, b_only)) for X ~ Binomial(a_only + b_only, 1/2), at most 1 (1 when no problem
    separates them)."""
    if len(a) != len(b):
        raise ValueError(f"paired comparison: {len(a)} and {len(b)} problems; need the same problems for both")
    n = len(a)
    a_only = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
    b_only = sum(1 for x, y in zip(a, b, strict=True) if y and not x)
    if n == 0:
        return {"n": 0, "a_only": 0, "b_only": 0, "difference": 0.0, "interval": [-1.0, 1.0], "p_value": 1.0}
    d = (a_only - b_only) / n
    half = z * math.sqrt(max(0.0, a_only + b_only - (a_only - b_only) ** 2 / n)) / n
    m = a_only + b_only
    tail = sum(math.comb(m, k) for k in range(min(a_only, b_only) + 1)) / 2 ** m
    return {"n": n, "a_only": a_only, "b_only": b_only, "difference": d,
            "interval": [max(-1.0, d - half), min(1.0, d + half)], "p_value": min(1.0, 2 * tail)}


def format_accuracy(share: float, interval: Sequence[float] | None = None) -> str:
    """A share with its 95% interval in percent, e.g. "33.3% [24.9, 42.9]"; just the share when none is known
    (a report written before intervals)."""
    return f"{share:.1%}" if interval is None else f"{share:.1%} [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"


def _batches(store: TokenStore, seq_len: int, batch_size: int, max_batches: int | None, device):
    loader = DataLoader(store, batch_size, seq_len, shuffle=False)
    n = loader.num_windows // batch_size or 1
    return (b.to(device) for b in itertools.islice(loader, min(n, max_batches or n)))


@torch.no_grad()
def heldout_loss(model: nn.Module, store: TokenStore, seq_len: int, batch_size: int = 8,
                 max_batches: int | None = 32, device: str | torch.device = "cpu",
                 token_bytes: TokenBytes | None = None) -> dict:
    """Mean next-token cross-entropy (nats) and perplexity over the first batches of `store`, the output head
    applied a chunk of tokens at a time (as in training: the full [B, S, V] logits never exist at once). With
    `token_bytes` (the store's tokenizer's) also bits per byte and per character: the loss of every labelled
    token, in bits, over the bytes (characters) of the text the labels spell (special tokens spell none)."""
    model.eval()
    total, n, nbytes, nchars = 0.0, 0, 0, 0
    sizes = chars = None
    if token_bytes is not None:
        sizes = torch.tensor([len(b) for b in token_bytes.table] + [0], dtype=torch.int64)
        chars = torch.tensor([utf8_chars(b) for b in token_bytes.table] + [0], dtype=torch.int64)
    for b in _batches(store, seq_len, batch_size, max_batches, device):
        h_ND = model.hidden_states(b.input_ids, **b.model_inputs).flatten(0, 1)
        ce_sum, count = chunked_cross_entropy(h_ND, model.logits, b.labels.flatten())
        total, n = total + ce_sum.item(), n + count
        if sizes is not None:
            y = b.labels.flatten().cpu()
            y = torch.where((y >= 0) & (y < len(sizes) - 1), y, len(sizes) - 1)  # ignored and unknown: no text
            nbytes, nchars = nbytes + int(sizes[y].sum()), nchars + int(chars[y].sum())
    loss = total / max(n, 1)
    out = {"loss": loss, "ppl": math.exp(min(loss, 50)), "tokens": n}
    if sizes is not None:
        bits = total / math.log(2)
        out.update(bits_per_byte=bits / max(nbytes, 1), bits_per_char=bits / max(nchars, 1), bytes=nbytes,
                   chars=nchars)
    return out


@torch.no_grad()
def teacher_kl(student: nn.Module, teacher: nn.Module, store: TokenStore, seq_len: int, batch_size: int = 8,
               max_batches: int | None = 16, device: str | torch.device = "cpu") -> dict:
    """Mean per-token KL(teacher || student) in nats over every position of the same batches: the forward-KL
    divergence of distillation (`train.kd_loss.kd_loss`), both output heads applied chunk by chunk. A
    teacher vocabulary padded beyond the student's is cut to the student's size and renormalised."""
    student.eval()
    teacher.eval()
    total, n = 0.0, 0
    for b in _batches(store, seq_len, batch_size, max_batches, device):
        h_ND = student.hidden_states(b.input_ids, **b.model_inputs).flatten(0, 1)
        t_ND = teacher.hidden_states(b.input_ids, **b.model_inputs).flatten(0, 1)
        kl_sum, count = kd_loss(h_ND, student.logits, lambda s, e, t_ND=t_ND: teacher.logits(t_ND[s:e]).float(),
                                div=Divergence("forward_kl"), max_padded_mass=None)
        total, n = total + kl_sum.item(), n + count
    return {"kl": total / max(n, 1), "tokens": n}


@torch.no_grad()
def task_accuracy(model: nn.Module, tokenizer: Tokenizer, problems: Sequence[Problem], max_new_tokens: int = 64,
                  batch_size: int = 64, samples: int = 3) -> dict:
    """Greedy-decode each prompt and exact-match the answer after "####" (see `data.tasks.check`).

    Prompts of any lengths share a batch (the cached generator pads them without changing any result).
    """
    model.eval()
    encoded = [tokenizer.encode_prompt(p.prompt) if isinstance(model, ForeignTeacher) else tokenizer.encode(p.prompt)
               for p in problems]
    outputs: list[str] = []
    for start in range(0, len(encoded), batch_size):
        if isinstance(model, ForeignTeacher):
            rows = _generate_foreign(model, encoded[start:start + batch_size], max_new_tokens, _stop_ids(tokenizer),
                                     tokenizer.pad_id)
        else:
            rows = generate(model, encoded[start:start + batch_size], max_new_tokens=max_new_tokens,
                            stop_ids=_stop_ids(tokenizer))
        outputs += [tokenizer.decode(r) for r in rows]
    return _graded(problems, outputs, samples)


def _generate_foreign(model: ForeignTeacher, rows: list[list[int]], max_new_tokens: int, stop_ids: tuple[int, ...],
                      pad_id: int) -> list[list[int]]:
    """Greedy continuations of a transformers model (its own `generate`, rows left-padded), each cut after its
    first stop token, as `inference.generate` returns them."""
    L = max(len(r) for r in rows)
    device = next(model.model.parameters()).device
    ids = torch.tensor([[pad_id] * (L - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows], device=device)
    out = model.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                               eos_token_id=list(stop_ids), pad_token_id=pad_id)[:, L:].tolist()
    cut = []
    for r in out:
        end = next((i + 1 for i, t in enumerate(r) if t in stop_ids), len(r))
        cut.append(r[:end])
    return cut


def _stop_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
    """An answer ends at its newline (the task format) or at EOS."""
    return tuple(tokenizer.encode("\n")[-1:]) + (tokenizer.eos_id,)


def _graded(problems: Sequence[Problem], outputs: list[str], samples: int) -> dict:
    """`data.tasks.accuracy` of the outputs with 95% intervals, plus the first `samples` prompts and answers."""
    result = with_intervals(accuracy(problems, outputs), problems)
    result["correct"] = [check(p, g) for p, g in zip(problems, outputs, strict=True)]  # per problem, for pairing
    result["samples"] = [{"prompt": p.prompt, "expected": p.answer, "generated": g}
                         for p, g in zip(problems[:samples], outputs[:samples], strict=True)]
    return result


@torch.no_grad()
def visual_task_accuracy(model: nn.Module, tokenizer: Tokenizer, problems: Sequence, max_new_tokens: int = 16,
                         batch_size: int = 64, samples: int = 3, max_tiles: int = 16) -> dict:
    """`task_accuracy` for visual problems (`data.vision_tasks.VisualProblem`): each prompt is the
    picture's image block then the question, exactly as the model trained on them (`data.image_text`)."""
    model.eval()
    vision = model.config.vision
    if vision is None:
        raise ValueError("visual tasks need a model with a vision tower")
    device = next(model.parameters()).device
    outputs: list[str] = []
    for start in range(0, len(problems), batch_size):
        rows, tiles = [], []
        for p in problems[start:start + batch_size]:
            ids, pixels = encode_image(p.image(), tokenizer, vision, max_tiles)
            rows.append(ids + tokenizer.encode(p.problem.prompt))
            tiles.append(pixels)
        out = generate(model, rows, max_new_tokens=max_new_tokens, stop_ids=_stop_ids(tokenizer),
                       pixel_values=torch.cat(tiles).to(device))
        outputs += [tokenizer.decode(r) for r in out]
    return _graded([p.problem for p in problems], outputs, samples)


def majority_baseline(train: Sequence[Problem], test: Sequence[Problem]) -> dict:
    """The accuracy of always giving each task's most frequent training answer: what a model that ignores
    the question's input (e.g. the picture) can reach. Same keys as `data.tasks.accuracy`, with intervals."""
    by_task: dict[str, dict[str, int]] = {}
    for p in train:
        counts = by_task.setdefault(p.task, {})
        counts[p.answer] = counts.get(p.answer, 0) + 1
    guess = {t: max(c, key=c.get) for t, c in by_task.items()}
    return with_intervals(accuracy(test, [f"{ANSWER_MARK} {guess.get(p.task, '')}" for p in test]), test)


def _token_bytes(tok: Tokenizer) -> TokenBytes | None:
    """The tokenizer's bytes per token, or None when its tokens do not spell text one by one."""
    try:
        return TokenBytes.of(tok)
    except ValueError:
        return None


def evaluate_model(model_dir: str, teacher_dir: str | None = None, data: str | None = None, problems: int = 200,
                   difficulty: int = 1, seq_len: int = 256, seed: int = 0, max_new_tokens: int = 64,
                   tasks: Sequence[str] | None = None, lm_eval: Sequence[str] = (), lm_eval_limit: int | None = None,
                   lm_eval_include: str | None = None) -> dict:
    """Held-out loss/perplexity, KL to a teacher (if given) and, on the built-in tasks, exact-match
    accuracy of greedy answers. Data: the built-in held-out test problems (of `tasks`, default all), or every
    document of `data`. `lm_eval`: lm-evaluation-harness tasks to run in-process as well (`eval.harness`; at most
    `lm_eval_limit` documents each, task definitions also from `lm_eval_include`), reported under "lm_eval".
    `model_dir` and `teacher_dir` are model directories (native, or transformers of any causal LM family) or run
    directories (their latest checkpoint). Bits per byte come with the loss wherever the tokenizer spells its
    tokens as text (`data.token_bytes`)."""
    if lm_eval:  # unknown task names fail here, before any work
        from behemoth.eval.harness import harness_metrics, run_harness, task_manager

        manager = task_manager(lm_eval, lm_eval_include)
    model_dir = str(resolve_model_dir(model_dir))
    model = load_any_model(model_dir, dtype=torch.float32)
    tok = Tokenizer.load(model_dir)
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"{model_dir}: tokenizer has {tok.vocab_size} tokens, the model {model.config.vocab_size}")
    if data is None:
        test = distinct_problems("test", problems, seed=seed, difficulty=difficulty, tasks=tasks)
        store = build_in_memory((p.text for p in test), tok)
    else:
        test, store = None, build_in_memory(iter_documents(resolve_paths(data)), tok)
    seq_len = min(seq_len, store.num_tokens - 1)  # a small held-out set still gives one window
    report: dict = {"model": model_dir, "data": data, "params": model.config.num_params(),
                    "active_params": model.config.num_active_params(),
                    "heldout": heldout_loss(model, store, seq_len, max_batches=None, token_bytes=_token_bytes(tok))}
    if teacher_dir:
        teacher_dir = str(resolve_model_dir(teacher_dir))
        if Tokenizer.load(teacher_dir).fingerprint != tok.fingerprint:
            raise ValueError(f"--teacher: {teacher_dir}: its tokenizer differs from the model's, and KL(teacher || "
                             "model) needs one vocabulary; compare the two models' bits per byte instead (eval each)")
        teacher = load_any_model(teacher_dir, dtype=torch.float32)
        report["teacher_kl"] = teacher_kl(model, teacher, store, seq_len, max_batches=None)
    if test is not None:
        report["tasks"] = task_accuracy(model, tok, test, max_new_tokens=max_new_tokens)
    if lm_eval:
        report["lm_eval"] = harness_metrics(run_harness(model, tok, lm_eval, limit=lm_eval_limit, manager=manager))
    return report
