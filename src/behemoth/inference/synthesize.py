"""Teacher-written datasets (`behemoth synthesize`): a teacher's sampled completions of prompts, verified,
filtered, and written as a training corpus (sequence-level distillation is `synthesize`, then `train
--data.path=` on its output: the loader trains on the completions with the prompts masked).

Prompts (`load_prompts`): the built-in tasks' *training* problems (so no held-out problem is ever written),
verified by their exact checker; a JSONL file of {prompt, answer (optional), task (optional)}, verified
where there is an answer by an extraction rule (`data.answers`); or a text file, one prompt per non-blank
line. Sampling takes `generate`'s options; each prompt gets `samples` completions, each with its own
generator seeded from (seed, prompt index, sample index), run through the continuous-batching engine
(`inference.engine`, driven in this thread: slots are filled in prompt order). A transformers teacher of
another family samples through its own `generate`, in batches seeded likewise.

What is kept (`keep`): every sample (`all`), the verified ones (`verified`: rejection sampling), or per
prompt the one with the highest mean log-probability per token under the teacher (`best`; the mean, so that
short completions are not favoured), among the verified ones when verifying. `verified` and `best` never keep a
completion cut off by `max_tokens`: trained on, it would end with an EOS its teacher never wrote. Each record is
{prompt, completion, teacher, index, sample, verified (null when not verified), logprob (the summed
log-probability of the sampled tokens, stop token included), tokens, finish_reason, task, answer}.

On disk: `shard-NNNNN.jsonl` (shard k: prompts [k*shard_size, (k+1)*shard_size)) and `manifest.json`
(teacher and tokenizer fingerprints, the prompts' fingerprint, the settings, every shard's records, hash and
counts, acceptance per task, `complete`), and the teacher's `tokenizer.json`, which a run training on the
directory takes as its own (`train.datasets`). A shard is written to a hidden temporary file, synced and
renamed, then recorded in the manifest; hidden files are never read as data, so a torn shard is never
read. Run again on the same directory, a run checks that the manifest is its own (another teacher, other
prompts or settings: an error, nothing overwritten) and continues at the first shard not recorded; a
shard depends only on its prompts and the settings, so the final dataset equals an uninterrupted run's.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from behemoth.checkpoint.foreign import ForeignTeacher, load_any_model
from behemoth.checkpoint.locate import resolve_model_dir
from behemoth.data.answers import extractor, matches
from behemoth.data.fingerprint import teacher_fingerprint
from behemoth.data.prompts import Prompt
from behemoth.data.tasks import check
from behemoth.data.tokenizer import Tokenizer
from behemoth.fsutil import write_file_atomically, write_json_atomically
from behemoth.inference.engine import Engine, Request
from behemoth.inference.runner import Runner
from behemoth.inference.sampling import SamplingParams
from behemoth.inference.text import Completer, Completion
from behemoth.progress import format_duration

FORMAT, VERSION = "behemoth-synthesized", 1
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
KEEP = ("all", "verified", "best")
VERIFY = ("auto", "none", "task", "answer")


@dataclass(frozen=True)
class Settings:
    """Everything that decides what a run writes (a resumed run must have the same)."""

    samples: int = 1
    max_tokens: int = 128
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int = 0
    verify: str = "auto"
    extract: str = "marker"
    keep: str = "all"
    shard_size: int = 256
    batch_size: int = 32  # completions decoded together: which rows share a batch moves the floats a little

    def __post_init__(self) -> None:
        checks = [("samples", self.samples >= 1, "must be >= 1"), ("max_tokens", self.max_tokens >= 1, "must be >= 1"),
                  ("shard_size", self.shard_size >= 1, "must be >= 1"),
                  ("batch_size", self.batch_size >= 1, "must be >= 1"),
                  ("verify", self.verify in VERIFY, f"must be one of {', '.join(VERIFY)}"),
                  ("keep", self.keep in KEEP, f"must be one of {', '.join(KEEP)}")]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)!r}: {why}")
        extractor(self.extract)  # raises for a bad rule
        SamplingParams(max_new_tokens=self.max_tokens, temperature=self.temperature, top_k=self.top_k,
                       top_p=self.top_p)  # raises for bad sampling options

    def params(self, stop_ids: Sequence[int], seed: int) -> SamplingParams:
        return SamplingParams(max_new_tokens=self.max_tokens, temperature=self.temperature, top_k=self.top_k,
                              top_p=self.top_p, seed=seed, stop_ids=tuple(stop_ids))


@dataclass
class Counts:
    """Per task: samples drawn, samples verified (accepted by the checker), records kept."""

    samples: dict[str, int] = field(default_factory=dict)
    verified: dict[str, int] = field(default_factory=dict)
    kept: dict[str, int] = field(default_factory=dict)

    def add(self, other: dict) -> None:
        for k in ("samples", "verified", "kept"):
            for task, n in other[k].items():
                getattr(self, k)[task] = getattr(self, k).get(task, 0) + n

    def summary(self, verifying: bool) -> dict:
        tasks = sorted(self.samples)
        per_task = {t: {"samples": self.samples[t], "verified": self.verified.get(t, 0) if verifying else None,
                        "kept": self.kept.get(t, 0),
                        "acceptance": self.verified.get(t, 0) / self.samples[t] if verifying else None}
                    for t in tasks}
        total = sum(self.samples.values())
        verified = sum(self.verified.values())
        return {"samples": total, "verified": verified if verifying else None, "kept": sum(self.kept.values()),
                "acceptance": verified / total if verifying and total else None, "per_task": per_task}


# ---- verification ------------------------------------------------------------------------------

def verifier(prompts: Sequence[Prompt], settings: Settings, source: str) -> Callable[[Prompt, str], bool] | None:
    """How a completion is verified (None: not at all), from `settings.verify`: `task` (the built-in checker),
    `answer` (the reference answer, by `settings.extract`), `none`, or `auto` (whichever the prompts allow)."""
    mode = settings.verify
    if mode == "auto":
        mode = ("task" if all(p.problem is not None for p in prompts) else
                "answer" if all(p.answer is not None for p in prompts) else "none")
    if mode == "task":
        if any(p.problem is None for p in prompts):
            raise ValueError(f"--verify task: the exact checker is for the built-in tasks; {source} has prompts "
                             "of no built-in task (use --verify answer with reference answers)")
        return lambda p, text: check(p.problem, text)
    if mode == "answer":
        missing = next((p for p in prompts if p.answer is None), None)
        if missing is not None:
            raise ValueError(f"--verify answer: {source}: prompt {missing.index} has no reference answer "
                             "(an 'answer' field)")
        rule = extractor(settings.extract)
        return lambda p, text: matches(text, p.answer, rule)
    if settings.keep == "verified":
        raise ValueError("--keep verified needs a verifier: the built-in tasks, or prompts with reference answers")
    return None


def sample_seed(seed: int, index: int, sample: int) -> int:
    """The generator seed of one sample: a hash of (run seed, prompt index, sample index), 63 bits."""
    digest = hashlib.blake2b(f"behemoth.synthesize|{seed}|{index}|{sample}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# ---- generation ------------------------------------------------------------------------------------

class Teacher:
    """The model that writes, its tokenizer and where it came from."""

    def __init__(self, path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
        directory = resolve_model_dir(path)
        self.tokenizer = Tokenizer.load(directory)
        self.model = load_any_model(directory, dtype=dtype, device=device)
        self.foreign = isinstance(self.model, ForeignTeacher)
        self.fingerprint = teacher_fingerprint(directory)
        self.name = Path(path).resolve().name
        self.family = f"transformers:{self.model.config.model_type}" if self.foreign else "behemoth"
        self.max_len = (getattr(self.model.config.hf, "max_position_embeddings", None) if self.foreign
                        else self.model.config.max_seq_len)

    def encode(self, prompt: Prompt) -> list[int]:
        ids = self.tokenizer.encode_prompt(prompt.text)
        if not ids:
            raise ValueError(f"prompt {prompt.index}: empty (it encodes to no tokens)")
        return ids

    def check_fits(self, prompts: Sequence[Prompt], max_tokens: int) -> None:
        """Every prompt encodes, and fits the teacher's context with `max_tokens` after it (`ValueError`)."""
        length, longest = max((len(self.encode(p)), p.index) for p in prompts)
        if self.max_len is not None and length + max_tokens > self.max_len:
            raise ValueError(f"prompt {longest} ({length} tokens) plus --max-tokens {max_tokens} "
                             f"exceeds the teacher's context of {self.max_len} tokens")

    def complete(self, rows: list[tuple[list[int], SamplingParams]], stop: tuple[str, ...],
                 batch_size: int) -> tuple[list[Completion], int]:
        """One completion per (prompt ids, sampling params) row, in order, and the positions the model computed
        (prefills padded to their longest prompt; every decode slot of every step, idle ones included)."""
        if self.foreign:
            return _foreign_complete(self, rows, stop, batch_size)
        need = max(len(ids) for ids, _ in rows) + rows[0][1].max_new_tokens
        engine = Engine(Runner(self.model, self.tokenizer, name=self.name), max_batch=batch_size, max_len=need,
                        background=False)
        requests = [engine.submit(Request(ids, params, stop, logprobs=True)) for ids, params in rows]
        engine.run_until_done()
        out = []
        for r in requests:
            events = [r.events.get_nowait() for _ in range(r.events.qsize())]
            if not events or events[-1][0] != "done":
                last = events[-1] if events else "no event"
                raise RuntimeError(f"request {r.id}: generation did not finish ({last})")
            out.append(events[-1][1])
        return out, engine.stats.positions


@torch.no_grad()
def _foreign_complete(teacher: Teacher, rows: list[tuple[list[int], SamplingParams]], stop: tuple[str, ...],
                      batch_size: int) -> tuple[list[Completion], int]:
    """A transformers model's sampled completions (its own `generate`, rows left-padded), `batch_size` rows
    at a time, each batch seeded with its first row's seed (transformers samples from the global generator,
    so a row's sample depends on its batch: `Settings.batch_size` is part of what a resumed run must match);
    log-probabilities from its raw logits. Also the positions computed."""
    hf = teacher.model.model
    device = next(hf.parameters()).device
    pad = teacher.tokenizer.pad_id
    out, positions = [], 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        params = batch[0][1]
        L = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([[pad] * (L - len(r)) + r for r, _ in batch], device=device)
        mask = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r, _ in batch], device=device)
        torch.manual_seed(params.seed or 0)
        sampling = ({"do_sample": True, "temperature": params.temperature, "top_p": params.top_p,
                     "top_k": params.top_k or 0} if not params.greedy else {"do_sample": False})
        gen = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=params.max_new_tokens,
                          eos_token_id=list(params.stop_ids), pad_token_id=pad, output_logits=True,
                          return_dict_in_generate=True, **sampling)
        new_BN = gen.sequences[:, L:]
        positions += len(batch) * gen.sequences.shape[1]
        logp_BN = torch.stack(gen.logits, 1).float().log_softmax(-1).gather(-1, new_BN[..., None])[..., 0]
        for b in range(len(batch)):
            done = Completer(teacher.tokenizer, batch[b][1], stop)
            total = 0.0
            for j, t in enumerate(new_BN[b].tolist()):
                done.push(t)
                total += float(logp_BN[b, j])
                if done.reason:
                    break
            done.finish()
            c = done.completion()
            c.logprob = total
            out.append(c)
    return out, positions


# ---- the run ---------------------------------------------------------------------------------------

def select(prompts: Sequence[Prompt], completions: Sequence[Sequence[Completion]], verified: Sequence[Sequence],
           keep: str) -> list[list[bool]]:
    """Which samples are kept, per prompt and sample (`keep`: all, verified, best; module docstring).
    `verified[i][s]` is True, False, or None when not verifying."""
    chosen = []
    for comps, ok in zip(completions, verified, strict=True):
        whole = [c.finish_reason != "length" for c in comps]  # not cut off by max_tokens
        if keep == "all":
            chosen.append([True] * len(comps))
        elif keep == "verified":
            chosen.append([v is True and w for v, w in zip(ok, whole, strict=True)])
        else:  # verified (or any, when not verifying), whole, the highest mean log-probability per token
            pool = [s for s in range(len(comps)) if ok[s] is not False and whole[s]]
            best = max(pool, key=lambda s: (mean_logprob(comps[s]), -s), default=None)
            chosen.append([s == best for s in range(len(comps))])
    return chosen


def mean_logprob(c: Completion) -> float:
    """A completion's log-probability per sampled token (its stop token counted)."""
    return c.logprob / max(1, len(c.token_ids) + (c.finish_reason == "stop"))


def synthesize(teacher_path: str, out: str | Path, prompts: list[Prompt], source: dict, settings: Settings,
               device: str = "cpu", dtype: torch.dtype = torch.float32, say: Callable[[str], None] = print) -> dict:
    """Write the teacher's dataset into `out` (or continue an interrupted one there); returns the manifest.
    Everything is checked before anything is written."""
    out = Path(out)
    if not prompts:
        raise ValueError(f"{source['source']}: no prompts")
    verify = verifier(prompts, settings, source["source"])
    teacher = Teacher(teacher_path, device, dtype)
    teacher.check_fits(prompts, settings.max_tokens)
    head = {"format": FORMAT, "version": VERSION,
            "teacher": {"path": str(teacher_path), "name": teacher.name, "family": teacher.family,
                        "fingerprint": teacher.fingerprint},
            "tokenizer": teacher.tokenizer.fingerprint, "prompts": source,
            "settings": {**asdict(settings), "stop": list(settings.stop)}}
    manifest = _resume(out, head)
    if not (out / TOKENIZER).is_file():  # the corpus names its tokenizer: a student trained on it takes the teacher's
        teacher.tokenizer.save(out / TOKENIZER)
    shards = -(-len(prompts) // settings.shard_size)
    done = {s["shard"]: s for s in manifest["shards"]}
    counts = Counts()
    for s in manifest["shards"]:
        counts.add(s["counts"])
    if done:
        say(f"synthesize: {len(done)} of {shards} shards already in {out}; continuing")
    t0, tokens = time.perf_counter(), 0
    for k in range(shards):
        if k in done:
            continue
        part = prompts[k * settings.shard_size:(k + 1) * settings.shard_size]
        records, shard_counts, work = _shard(teacher, part, settings, verify)
        tokens += work["generated"]
        entry = _write_shard(out, k, records, (part[0].index, part[-1].index + 1), asdict(shard_counts), work)
        manifest["shards"].append(entry)
        counts.add(entry["counts"])
        manifest["counts"] = _totals(manifest["shards"], counts, verify is not None)
        write_json_atomically(out / MANIFEST, manifest)
        elapsed = time.perf_counter() - t0
        left = sum(1 for j in range(k + 1, shards) if j not in done)
        rate = (k + 1 - sum(1 for j in done if j <= k)) / elapsed
        accept = manifest["counts"]["acceptance"]
        say(f"shard {k + 1}/{shards}: {len(part)} prompts, {len(part) * settings.samples} samples, {len(records)} kept"
            + (f", {accept:.0%} verified so far" if accept is not None else "")
            + f"; {tokens / elapsed:,.0f} tokens/s, ETA {format_duration(left / rate)}")
    manifest["counts"] = _totals(manifest["shards"], counts, verify is not None)
    manifest["complete"] = True
    write_json_atomically(out / MANIFEST, manifest)
    return manifest


def _totals(shards: list[dict], counts: Counts, verifying: bool) -> dict:
    """The manifest's counts: prompts done, samples, verified, kept, acceptance (per task too), and the tokens the
    teacher read (prompts, once per sample) and wrote, and the positions it computed (padding included)."""
    tokens = {k: sum(s["tokens"][k] for s in shards) for k in ("prompt", "generated", "computed")}
    return {"prompts": sum(s["stop"] - s["start"] for s in shards), **counts.summary(verifying), "tokens": tokens}


def _shard(teacher: Teacher, part: Sequence[Prompt], settings: Settings, verify) -> tuple[list[dict], Counts, dict]:
    """One shard's kept records, its counts, and the tokens the teacher read and wrote for it."""
    rows = [(teacher.encode(p), settings.params((teacher.tokenizer.eos_id,), sample_seed(settings.seed, p.index, s)))
            for p in part for s in range(settings.samples)]
    flat, computed = teacher.complete(rows, settings.stop, settings.batch_size)
    comps = [flat[i * settings.samples:(i + 1) * settings.samples] for i in range(len(part))]
    ok = [[verify(p, c.text) if verify else None for c in cs] for p, cs in zip(part, comps, strict=True)]
    kept = select(part, comps, ok, settings.keep)
    records, counts = [], Counts()
    for p, cs, vs, ks in zip(part, comps, ok, kept, strict=True):
        for s, (c, v, keep) in enumerate(zip(cs, vs, ks, strict=True)):
            counts.samples[p.task] = counts.samples.get(p.task, 0) + 1
            counts.verified[p.task] = counts.verified.get(p.task, 0) + (v is True)
            counts.kept[p.task] = counts.kept.get(p.task, 0) + keep
            if keep:
                records.append({"prompt": p.text, "completion": c.text, "teacher": teacher.name, "index": p.index,
                                "sample": s, "verified": v, "logprob": c.logprob, "tokens": len(c.token_ids),
                                "finish_reason": c.finish_reason, "task": p.task, "answer": p.answer})
    generated = sum(len(c.token_ids) + (c.finish_reason == "stop") for c in flat)  # a stop token was sampled too
    return records, counts, {"prompt": sum(len(ids) for ids, _ in rows), "generated": generated, "computed": computed}


def _resume(out: Path, head: dict) -> dict:
    """The manifest to continue: the one in `out` when it is this run's, a new one for an empty or new `out`.
    Another teacher's, other prompts' or other settings' shards, or files that are no synthesized dataset,
    are an error; nothing is overwritten."""
    file = out / MANIFEST
    if file.is_file():
        try:
            old = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{file}: not valid JSON ({e}); not writing into {out}") from None
        keys = ("teacher", "tokenizer", "prompts", "settings", "shards")
        if not isinstance(old, dict) or old.get("format") != FORMAT or any(k not in old for k in keys):
            raise ValueError(f"{file}: not a synthesized dataset's manifest; not writing into {out}")
        if old["teacher"]["fingerprint"] != head["teacher"]["fingerprint"]:
            raise ValueError(f"{out}: holds the shards of another teacher ({old['teacher']['name']}, "
                             f"{old['teacher']['fingerprint'][:12]}); choose another --out")
        for key in ("tokenizer", "prompts", "settings"):
            if old[key] != head[key]:
                diff = ([k for k in head[key] if old[key].get(k) != head[key][k]] if isinstance(head[key], dict)
                        else [key])
                raise ValueError(f"{out}: was written with other {key} ({', '.join(diff)} differ); use the same "
                                 "ones to continue it, or another --out")
        for s in old["shards"]:
            path = out / s["file"]
            if not path.is_file() or _sha256(path) != s["sha256"]:
                raise ValueError(f"{path}: missing or changed since it was written; not continuing {out}")
        return {**head, "shards": old["shards"], "counts": old.get("counts"), "complete": False}
    if out.exists() and (not out.is_dir() or any(p for p in out.iterdir() if not p.name.startswith("."))):
        raise ValueError(f"{out}: exists and is not a synthesized dataset (no {MANIFEST}); choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    manifest = {**head, "shards": [], "counts": None, "complete": False}
    write_json_atomically(file, manifest)  # first, so that the directory is known as this run's from now on
    return manifest


def _write_shard(out: Path, k: int, records: list[dict], span: tuple[int, int], counts: dict, tokens: dict) -> dict:
    """Shard k, written whole to a hidden temporary file, synced, then renamed into place."""
    name = f"shard-{k:05d}.jsonl"
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    write_file_atomically(out / name, data)
    return {"shard": k, "file": name, "start": span[0], "stop": span[1], "records": len(records),
            "sha256": hashlib.sha256(data).hexdigest(), "counts": counts, "tokens": tokens}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
