"""Task metrics computed locally (``evaluate.load`` needs the Hub; these do not).

`classification_metrics` has the shape of an ``evaluate``-style ``compute_metrics``: an
``EvalPrediction`` (or a ``(predictions, label_ids)`` tuple) in, a ``{name: float}`` dict out, so it can
be passed to any ``Trainer``. `evaluate_model` runs a model over a tokenised dataset and returns the
same metrics, without a Trainer (so teacher, student and exported low-bit models are measured alike).
"""

from __future__ import annotations

import math

import numpy as np
import torch

TASKS = ("sequence-classification", "causal-lm")


def accuracy(preds, labels) -> float:
    preds, labels = np.asarray(preds), np.asarray(labels)
    return float((preds == labels).mean()) if labels.size else float("nan")


def f1(preds, labels, num_labels: int | None = None) -> float:
    """Binary F1 of class 1 when there are two classes, else macro F1 over the classes."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    n = num_labels or int(max(preds.max(initial=0), labels.max(initial=0)) + 1)
    classes = [1] if n == 2 else range(n)
    scores = []
    for c in classes:
        tp = np.sum((preds == c) & (labels == c))
        fp = np.sum((preds == c) & (labels != c))
        fn = np.sum((preds != c) & (labels == c))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return float(np.mean(scores))


def perplexity(mean_loss: float) -> float:
    return math.exp(min(mean_loss, 700.0))  # exp overflows past ~709


def classification_metrics(eval_pred, num_labels: int | None = None) -> dict[str, float]:
    """``compute_metrics`` for a Trainer: accuracy and F1 (binary for 2 classes, macro otherwise)."""
    logits, labels = eval_pred[0], eval_pred[1]
    if isinstance(logits, (tuple, list)):  # models that also return hidden states
        logits = logits[0]
    return _scores(np.asarray(logits).argmax(-1), labels, num_labels)


def _scores(preds, labels, num_labels=None) -> dict[str, float]:
    return {"accuracy": accuracy(preds, labels), "f1": f1(preds, labels, num_labels)}


def primary_metric(task: str) -> tuple[str, bool]:
    """(metric name, higher is better) that the report plots for `task`."""
    return ("perplexity", False) if task == "causal-lm" else ("accuracy", True)


def _device(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@torch.inference_mode()
def evaluate_model(model, dataset, task: str = "sequence-classification", collator=None, batch_size: int = 64) -> dict[str, float]:
    """Metrics of `model` on a tokenised dataset (rows with input_ids, attention_mask, labels).

    Classification: accuracy and F1. Causal LM: mean next-token cross-entropy over the positions whose
    label is not -100 (the loss the model trains on), and its perplexity.
    """
    if task not in TASKS:
        raise ValueError(f"task={task!r}: use one of {TASKS}.")
    if collator is None:
        from transformers import default_data_collator as collator
    was_training = model.training
    model.eval()
    device = _device(model)
    preds, labels, loss_sum, count = [], [], 0.0, 0
    for start in range(0, len(dataset), batch_size):
        rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        batch = collator(rows)
        batch = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids", "labels")}
        y = batch.pop("labels")
        logits = model(**batch).logits.float()
        if task == "causal-lm":
            shift_logits, shift_y = logits[:, :-1], y[:, 1:]
            keep = shift_y != -100
            loss = torch.nn.functional.cross_entropy(shift_logits[keep], shift_y[keep], reduction="sum")
            loss_sum += loss.item()
            count += int(keep.sum())
        else:
            preds.append(logits.argmax(-1).cpu().numpy())
            labels.append(y.cpu().numpy())
    model.train(was_training)
    if task == "causal-lm":
        mean = loss_sum / max(count, 1)
        return {"loss": mean, "perplexity": perplexity(mean)}
    num_labels = getattr(getattr(model, "config", None), "num_labels", None)
    return _scores(np.concatenate(preds), np.concatenate(labels), num_labels)


def collator_for(task: str, tokenizer=None):
    """Dynamic padding for classification; causal-LM blocks are already of equal length."""
    from transformers import DataCollatorWithPadding, default_data_collator

    if task == "causal-lm" or tokenizer is None:
        return default_data_collator
    return DataCollatorWithPadding(tokenizer)
