"""Evaluation: held-out loss and perplexity, KL to a teacher, exact-match accuracy on built-in tasks."""

from behemoth.eval.metrics import evaluate_model, heldout_loss, task_accuracy, teacher_kl

__all__ = ["evaluate_model", "heldout_loss", "task_accuracy", "teacher_kl"]
