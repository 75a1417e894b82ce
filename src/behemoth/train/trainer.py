"""The one training loop: schedule, gradient accumulation and clipping, optimizer, routing-bias
update, logging, routing health, evaluation, checkpoints, interruption and non-finite handling.

It knows nothing of losses: a step object (`train/steps.py`) does forward, loss and backward for
one micro-batch. Pretraining, distillation and codistillation are steps; this file is shared.
"""

from __future__ import annotations

import json
import math
import random
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from behemoth.checkpoint.model_card import CARD
from behemoth.checkpoint.training import (
    load_optimizer_state,
    save_distributed_training_checkpoint,
    save_training_checkpoint,
)
from behemoth.data.loader import Batch, DataLoader
from behemoth.parallel.distributed import (
    all_reduce_counts,
    all_reduce_metrics,
    all_reduce_sum,
    any_rank,
    clip_grad_norm,
    is_peer_failure,
    set_timeout,
)
from behemoth.parallel.watch import Heartbeat, LocalTime, StragglerWatch, gather_hosts, gather_local
from behemoth.progress import format_duration
from behemoth.runlog import METRICS_FILE
from behemoth.train.balance import BiasBalancer
from behemoth.train.card import card_text
from behemoth.train.config import TrainConfig
from behemoth.train.faults import peer_lost
from behemoth.train.health import RoutingHealth, stability_means
from behemoth.train.optim import build_optimizer, lr_at
from behemoth.train.probe import RouterProbe
from behemoth.train.steps import Step, moe_layers


class TrainingStopped(Exception):
    """The run stopped on purpose (too many non-finite losses); the message says why."""


class Interrupted(Exception):
    """SIGINT/SIGTERM: a checkpoint was saved and the run stopped. `signum` says which."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"interrupted by signal {signum} at step {step}; checkpoint saved")
        self.signum, self.step = signum, step


@dataclass
class RunInfo:
    """What the loop needs to know about the run beyond the config."""

    run_dir: Path
    flops_per_token: float  # model FLOPs per trained token (forward + backward)
    peak_flops: float | None  # device peak for MFU; None where unknown (CPU)
    device: torch.device
    world: int = 1  # processes of a distributed run (torchrun); each trains on 1/world of every batch


class MetricsLog:
    """metrics.jsonl next to the checkpoints (and TensorBoard scalars when available)."""

    def __init__(self, run_dir: Path, tensorboard: bool, resume_step: int | None):
        self.path = run_dir / METRICS_FILE
        if resume_step is not None and self.path.exists():  # drop what the interrupted run logged after its checkpoint
            lines = self.path.read_text().splitlines()
            keep = [ln for ln in lines if ln and json.loads(ln).get("step", 0) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in keep))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self.file = self.path.open("a")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except Exception:  # tensorboard not installed: JSONL only
                self.tb = None

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None and record.get("type") in ("train", "eval"):
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"{record['type']}/{k}", v, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


class NullLog:
    """The metrics log of ranks other than 0 in a distributed run: rank 0 writes the run's files."""

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


class Trainer:
    """The loop over optimizer steps of one `Step` (`global_step` counts those done)."""

    def __init__(self, cfg: TrainConfig, step: Step, train_loader: DataLoader,
                 val_batches: Callable[[], Iterator[Batch]], info: RunInfo, say: Callable[[str], None] = print,
                 probe: RouterProbe | None = None):
        """`probe`: the fixed batch routing stability is measured on at each health report (None: not measured)."""
        self.cfg, self.step, self.loader, self.val_batches, self.info, self.say = (
            cfg, step, train_loader, val_batches, info, say)
        self.models = step.trained_models()
        self.optimizer = build_optimizer(list(self.models.values()), cfg.optim)
        self.moes = [m for model in self.models.values() for m in moe_layers(model)]
        self.balancer = BiasBalancer(self.moes, cfg.router)
        primary = self.models["model"]
        self.primary_moes = moe_layers(primary)
        layer_ids = [i for i, blk in enumerate(primary.layers) if blk.is_moe]
        E = self.primary_moes[0].num_experts if self.primary_moes else 1
        K = self.primary_moes[0].top_k if self.primary_moes else 1
        self.health = RoutingHealth(layer_ids, E, cfg.health, top_k=K, total_steps=cfg.train.steps)
        self.probe = probe
        self.global_step = 0
        self.nonfinite_total = 0
        self.nonfinite_streak = 0
        self.tokens_seen = 0
        self.elapsed = 0.0
        self.card_facts: dict[str, dict] | None = None  # each model's card facts (`train/card.py`); None: no cards
        self.last_eval: dict | None = None  # {"step", "val_loss"} of the latest evaluation
        self._signal: int | None = None
        self._signal_at = 0.0
        self._watch_ranks(cfg)

    def _watch_ranks(self, cfg: TrainConfig) -> None:
        """In a distributed run: every rank's host, the timing of each rank's own work for the straggler warning, and
        the heartbeat that names a lost or stuck rank after a failure (`parallel/watch.py`)."""
        world, p = self.info.world, cfg.parallel
        self.hosts = gather_hosts() if world > 1 else None
        self.heartbeat = Heartbeat.start(int(torch.distributed.get_rank()), world, p.heartbeat_s) \
            if world > 1 and p.heartbeat_s > 0 else None
        self.local = LocalTime(self.info.device, self.heartbeat, events=world > 1)  # one process never reads them
        self.stragglers = StragglerWatch(world, p.straggler_factor, p.straggler_windows, self.hosts) \
            if world > 1 else None

    # ---- state for exact resume -------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything but the models; the optimizer's state too in one process (a distributed run saves it
        sharded, beside the models). The data position, counters and RNG are the same on every rank."""
        state = {"step": self.global_step, "data": self.loader.state_dict(),
                 "health": self.health.state_dict(), "balancer": self.balancer.state_dict(),
                 "nonfinite_total": self.nonfinite_total,
                 "nonfinite_streak": self.nonfinite_streak, "tokens_seen": self.tokens_seen, "elapsed": self.elapsed,
                 "last_eval": self.last_eval,
                 "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
                 "config": self.cfg.to_dict()}
        if self.info.world == 1:
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict, ckpt_dir: Path) -> None:
        """Resume from a checkpoint written at any world size (`ckpt_dir`: its directory, for a sharded
        optimizer state)."""
        self.global_step = int(state["step"])
        load_optimizer_state(self.models, self.optimizer, ckpt_dir, state)
        self.loader.load_state_dict(state["data"])
        self.health.load_state_dict(state["health"])
        self.balancer.load_state_dict(state.get("balancer"))
        self.nonfinite_total, self.nonfinite_streak = int(state["nonfinite_total"]), int(state["nonfinite_streak"])
        self.tokens_seen, self.elapsed = int(state["tokens_seen"]), float(state["elapsed"])
        self.last_eval = state.get("last_eval")
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])

    def save(self) -> Path:
        tok = self.info.run_dir / "tokenizer.json"
        extra = {"tokenizer.json": tok.read_bytes()} if tok.is_file() else None
        cards = self._cards()
        if self.info.world > 1:
            return save_distributed_training_checkpoint(self.info.run_dir, self.global_step, self.models,
                                                        self.optimizer, self.state_dict(),
                                                        self.cfg.checkpoint.keep_last, extra, cards)
        return save_training_checkpoint(self.info.run_dir, self.global_step, self.models, self.state_dict(),
                                        self.cfg.checkpoint.keep_last, extra, cards)

    def _cards(self) -> dict[str, dict[str, bytes]] | None:
        """Each model's model card as it stands at this step (the held-out loss is the trained model's)."""
        if self.card_facts is None:
            return None
        state = {"step": self.global_step, "total_steps": self.cfg.train.steps, "tokens_seen": self.tokens_seen,
                 "elapsed_s": self.elapsed}
        return {name: {CARD: card_text(facts, state | {"eval": self.last_eval if name == "model" else None})
                       .encode("utf-8")} for name, facts in self.card_facts.items()}

    # ---- the loop --------------------------------------------------------------------------------
    def fit(self, log: MetricsLog) -> dict:
        cfg = self.cfg
        total = cfg.train.steps
        for m in self.models.values():
            m.train()
        self._zero_counts()
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        window_t, window_tokens, window_loss, window_n = time.perf_counter(), 0, 0.0, 0
        last_saved = self.global_step
        start = self.global_step
        try:
            while self.global_step < total:
                if self.info.world > 1 and self.global_step == start + 1:  # started: the short timeout from now on
                    set_timeout(cfg.parallel.timeout_s)
                lr = lr_at(self.global_step, total, cfg.optim)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                metrics = self._optimizer_step()
                self.global_step += 1
                if metrics is not None:
                    window_loss += metrics["loss"]
                    window_n += 1
                    window_tokens += metrics["tokens"]
                    self.tokens_seen += metrics["tokens"]
                if self.info.world > 1 and any_rank(self._signal is not None):  # one rank's signal stops all
                    self._signal = self._signal or signal.SIGTERM  # after the same step
                if self.global_step % cfg.log.every == 0 or self.global_step == total:
                    dt = time.perf_counter() - window_t
                    self.elapsed += dt
                    self._log_window(log, self._train_record(lr, window_loss / max(1, window_n),
                                                             window_tokens / max(dt, 1e-9), metrics, total), dt)
                    window_t, window_tokens, window_loss, window_n = time.perf_counter(), 0, 0.0, 0
                at_end = self.global_step == total
                t_side = time.perf_counter()  # health probes, evaluation and checkpoints stay out of tokens/s and MFU
                if self.health.layer_ids and (self.global_step % cfg.log.health_every == 0 or at_end):
                    self._report_health(log)
                if cfg.log.eval_every and (self.global_step % cfg.log.eval_every == 0 or self.global_step == total):
                    self._evaluate(log)
                if self._signal is not None:
                    self.save()
                    raise Interrupted(self._signal, self.global_step)
                if cfg.checkpoint.every and self.global_step % cfg.checkpoint.every == 0:
                    self.save()
                    last_saved = self.global_step
                window_t += time.perf_counter() - t_side
            if last_saved != self.global_step or cfg.checkpoint.every == 0:
                self.save()
        except Exception as e:
            if self.info.world > 1 and is_peer_failure(e):
                raise peer_lost(e, self.info.run_dir, self.global_step, self.info.world, self.hosts,
                                self.heartbeat) from e
            raise
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            if self.heartbeat is not None:
                self.heartbeat.close()
        return {"step": self.global_step, "tokens": self.tokens_seen, "nonfinite_steps": self.nonfinite_total,
                "elapsed_s": self.elapsed}

    def _optimizer_step(self) -> dict | None:
        """Accumulate micro-batches, clip, step, update routing biases. None if the step was skipped.

        The device is read once per step: every micro-batch's metrics stay on it (0-dim tensors), and they, the
        router entropy, the gradient norm and the routed counts come to the host in one transfer, which also
        decides whether the step is taken (a non-finite loss or gradient norm skips it, weights and biases
        untouched)."""
        cfg = self.cfg
        accum = cfg.train.grad_accum
        sums: dict[str, torch.Tensor | float] = {}
        tokens = 0
        entropy = None
        self.step.begin_step(self.global_step, cfg.train.steps)
        self.local.begin(self.global_step + 1)
        for _ in range(accum):
            with self.local.part("input"):  # the copy to the device stays out: it waits for the device's queue
                batch = next(self.loader)
            batch = batch.to(self.info.device)
            m = self.step.forward_backward(batch, 1.0 / accum)
            tokens += m.pop("tokens")
            e = m.pop("router_entropy", None)
            if e is not None:
                entropy = e / accum if entropy is None else entropy + e / accum
            for k, v in m.items():  # every float a step reports is averaged over micro-batches and logged
                if k == "nonfinite":
                    sums[k] = v if k not in sums else sums[k] | v
                else:
                    sums[k] = sums.get(k, 0.0) + v / accum
        params = [p for model in self.models.values() for p in model.parameters() if p.requires_grad]
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        if self.info.world > 1:
            grad_norm = clip_grad_norm(params, clip)  # over every rank's shards
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
        all_reduce_counts(self.moes)  # the bias moves by the global load, identically on every rank
        counts = torch.stack([m.tokens_per_expert for m in self.primary_moes]) if self.primary_moes else None
        host = self._to_host(sums, entropy, grad_norm, counts)
        agg, entropy = all_reduce_metrics({**host["metrics"], "tokens": tokens}, host["entropy"])  # over all ranks
        nonfinite = any_rank(host["nonfinite"])
        if nonfinite or not math.isfinite(host["grad_norm"]):
            what = "loss" if nonfinite else "gradient norm"
            return self._skip(f"non-finite {what} at step {self.global_step + 1}")
        with self.local.part("update", on_device=True):
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_streak = 0
        self.balancer.update()
        if counts is not None:
            self.health.observe(host["counts"], entropy if entropy is not None else torch.zeros(len(counts)))
        self._zero_counts()
        agg["grad_norm"] = host["grad_norm"]
        return agg

    @staticmethod
    def _to_host(sums: dict, entropy: torch.Tensor | None, grad_norm: torch.Tensor | float,
                 counts_LE: torch.Tensor | None) -> dict:
        """One device-to-host transfer of a step's figures: the metrics (floats), whether any micro-batch's loss was
        non-finite, the router entropy [L], the gradient norm and the routed counts [L, E] (CPU float64)."""
        names = [k for k, v in sums.items() if isinstance(v, torch.Tensor) and k != "nonfinite"]
        pieces = {"metrics": [sums[k].detach().reshape(()) for k in names],
                  "nonfinite": [torch.as_tensor(sums.get("nonfinite", False)).reshape(())],
                  "grad_norm": [torch.as_tensor(grad_norm).detach().reshape(())],
                  "entropy": [] if entropy is None else [entropy.detach().flatten()],
                  "counts": [] if counts_LE is None else [counts_LE.detach().flatten()]}
        device = pieces["grad_norm"][0].device  # the gradients' (a metric a step kept on the CPU moves there)
        flat = torch.cat([t.to(device, torch.float64).reshape(-1) for ts in pieces.values() for t in ts]).cpu()
        parts = dict(zip(pieces, flat.split([sum(t.numel() for t in ts) for ts in pieces.values()]), strict=True))
        metrics = {k: v for k, v in sums.items() if not isinstance(v, torch.Tensor) and k != "nonfinite"}
        return {"metrics": {**metrics, **dict(zip(names, parts["metrics"].tolist(), strict=True))},
                "nonfinite": bool(parts["nonfinite"]), "grad_norm": float(parts["grad_norm"]),
                "entropy": None if entropy is None else parts["entropy"].view(entropy.shape),
                "counts": None if counts_LE is None else parts["counts"].view(counts_LE.shape)}

    def _skip(self, why: str) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self._zero_counts()
        self.nonfinite_total += 1
        self.nonfinite_streak += 1
        self.say(f"warning: {why}; step skipped ({self.nonfinite_streak} in a row, {self.nonfinite_total} in all)")
        if self.nonfinite_streak >= self.cfg.train.max_nonfinite:
            raise TrainingStopped(f"{self.nonfinite_streak} non-finite steps in a row (train.max_nonfinite="
                                  f"{self.cfg.train.max_nonfinite}); stopped at step {self.global_step + 1}, the last "
                                  "checkpoint is intact: lower optim.lr or check the data")
        return None

    def _zero_counts(self) -> None:
        for m in self.moes:
            m.tokens_per_expert.zero_()

    def _on_signal(self, signum, frame) -> None:
        if self._signal is not None:
            if self.info.world > 1 and time.monotonic() - self._signal_at < 5:
                return  # the same request again: torchrun passes on a Ctrl-C its workers received themselves
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without saving
        self._signal, self._signal_at = signum, time.monotonic()
        self.say(f"\nsignal {signum}: saving a checkpoint after this step, then stopping")

    # ---- reporting -------------------------------------------------------------------------------
    def _train_record(self, lr: float, loss: float, tokens_per_s: float, last: dict | None, total: int) -> dict:
        peak = self.info.peak_flops * self.info.world if self.info.peak_flops else None
        mfu = tokens_per_s * self.info.flops_per_token / peak if peak else None
        steps_per_s = self.global_step / max(self.elapsed, 1e-9)
        rec = {"type": "train", "step": self.global_step, "loss": loss, "lr": lr, "tokens_per_s": tokens_per_s,
               "mfu": mfu, "tokens": self.tokens_seen, "elapsed_s": self.elapsed,
               "eta_s": (total - self.global_step) / max(steps_per_s, 1e-9), "skipped_steps": self.nonfinite_total}
        if last is not None:
            rec.update({k: v for k, v in last.items() if k not in ("loss", "tokens")})
        return rec

    def _progress(self, rec: dict, total: int) -> None:
        mfu = f"{rec['mfu']:.1%}" if rec["mfu"] is not None else "n/a"
        filled = int(20 * rec["step"] / total)
        bar = f"[{'#' * filled}{'.' * (20 - filled)}]"
        self.say(f"{bar} step {rec['step']:>{len(str(total))}}/{total} | loss {rec['loss']:.4f} | lr {rec['lr']:.2e} | "
                 f"{rec['tokens_per_s']:,.0f} tok/s | MFU {mfu} | ETA {format_duration(rec['eta_s'])}"
                 + (f" | skipped {rec['skipped_steps']}" if rec["skipped_steps"] else ""))

    def _report_health(self, log: MetricsLog) -> None:
        biases = torch.stack([m.router.expert_bias.detach().float().cpu() for m in self.primary_moes])
        probe = None if self.probe is None else self.probe.router_logits(self.models["model"], self.primary_moes)
        rec, warnings = self.health.report(self.global_step, biases, probe)  # every rank probes; rank 0 logs
        log.write(rec)
        worst = max(rec["layers"], key=lambda r: r["step_max_over_mean"])
        dead = sum(r["dead"] for r in rec["layers"])
        flip, margin = stability_means(rec["layers"])
        stability = "" if self.probe is None else (f", flip rate {'n/a' if flip is None else f'{flip:.1%}'}, "
                                                   f"margin {'n/a' if margin is None else f'{margin:.3f}'}")
        self.say(f"  routing @ {self.global_step}: worst max/mean load {worst['step_max_over_mean']:.2f} "
                 f"(layer {worst['layer']}), "
                 f"mean router entropy {sum(r['router_entropy'] for r in rec['layers']) / len(rec['layers']):.2f}, "
                 f"dead experts {dead}, bias range [{float(biases.min()):+.3f}, {float(biases.max()):+.3f}]"
                 f"{stability}")
        for w in warnings:
            log.write(w)
            self.say(f"  WARNING {w['event']}: {w['message']}")

    def _log_window(self, log: MetricsLog, rec: dict, window_s: float) -> None:
        """A logging window's record and progress line; in a distributed run each rank's own work in it, gathered,
        and any straggler warnings on screen and in the log."""
        log.write(rec)
        self._progress(rec, self.cfg.train.steps)
        if self.stragglers is None:
            return
        rec, warnings = self.stragglers.window(self.global_step, gather_local(self.local.take()), window_s)
        log.write(rec)
        for w in warnings:
            log.write(w)
            self.say(f"  WARNING {w['event']}: {w['message']}")

    @torch.no_grad()
    def _evaluate(self, log: MetricsLog) -> None:
        for m in self.models.values():
            m.eval()
        total, n = 0.0, 0
        for batch in self.val_batches():
            s, k = self.step.eval_loss(batch.to(self.info.device))
            total, n = total + s, n + k
        total, n = all_reduce_sum([total, n])  # each rank evaluated its rows of every batch
        for m in self.models.values():
            m.train()
        if n:
            loss = total / n
            log.write({"type": "eval", "step": self.global_step, "val_loss": loss, "val_ppl": math.exp(min(loss, 50))})
            self.last_eval = {"step": self.global_step, "val_loss": loss}
            self.say(f"  eval @ {self.global_step}: val loss {loss:.4f} (ppl {math.exp(min(loss, 50)):.2f})")


def stdout_say(msg: str) -> None:
    print(msg, flush=True, file=sys.stdout)

