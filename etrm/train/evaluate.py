"""Held-out evaluation with a fresh carry: accuracy at max steps and where the Q-head would halt, with baselines."""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from etrm.loss import IGNORE_LABEL


def exact_and_token(preds: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row exact match and token accuracy over valid (non-ignored) label positions."""
    mask = labels != IGNORE_LABEL
    correct = (mask & (preds == labels)).sum(-1)
    count = mask.sum(-1)
    return (correct == count) & (count > 0), correct / count.clamp_min(1)


def would_halt_step(q_halt_per_step: torch.Tensor) -> torch.Tensor:
    """0-based index of the first step whose q_halt > 0 (the last step when none): [T, B] -> [B]."""
    t = q_halt_per_step.shape[0]
    says = q_halt_per_step > 0
    first = torch.where(says.any(0), says.int().argmax(0), t - 1)
    return first


def baselines(inputs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Copy-the-input and most-common-output baselines on one split (exact and token accuracy)."""
    inputs_t, labels_t = torch.as_tensor(inputs, dtype=torch.long), torch.as_tensor(labels, dtype=torch.long)
    copy_exact, copy_tok = exact_and_token(inputs_t, labels_t)
    common = Counter(map(bytes, labels.astype(np.int16))).most_common(1)[0][0]
    common_row = torch.as_tensor(np.frombuffer(common, dtype=np.int16).astype(np.int64))
    mode_exact, mode_tok = exact_and_token(common_row.expand_as(labels_t), labels_t)
    return {
        "copy_input.exact": copy_exact.float().mean().item(),
        "copy_input.token": copy_tok.mean().item(),
        "common_output.exact": mode_exact.float().mean().item(),
        "common_output.token": mode_tok.mean().item(),
    }


@torch.no_grad()
def evaluate(model, dataset, batch_size: int, device: torch.device, autocast) -> dict[str, float]:
    """Evaluate ``model`` on every sample of ``dataset``; returns means over samples and the sample count."""
    sums = {"exact": 0.0, "token": 0.0, "halt.exact": 0.0, "halt.token": 0.0, "halt.step": 0.0}
    n = len(dataset)
    for start in range(0, n, batch_size):
        ids = np.arange(start, start + batch_size)
        ids[ids >= n] = -1
        batch = {k: v.to(device) for k, v in dataset.batch(ids).items()}
        with autocast():
            res = model.evaluate_batch(batch)
        real = batch["sample_id"] >= 0
        labels = res["labels"]
        exact, token = exact_and_token(res["preds"][-1], labels)
        step = would_halt_step(res["q_halt_logits"])
        halt_preds = res["preds"].gather(0, step.view(1, -1, 1).expand(1, *labels.shape))[0]
        h_exact, h_token = exact_and_token(halt_preds, labels)
        for key, val in (("exact", exact), ("token", token), ("halt.exact", h_exact), ("halt.token", h_token),
                         ("halt.step", step + 1)):
            sums[key] += val[real].float().sum().item()
    out = {k: v / max(n, 1) for k, v in sums.items()}
    out["count"] = float(n)
    return out
