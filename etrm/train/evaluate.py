"""Held-out evaluation with a fresh carry: accuracy at max steps and where the Q-head would halt, with baselines."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from diagnostics.trace.eval_audits import ACT_FIELDS, act_key
from diagnostics.events import q_says_halt
from etrm.loss import IGNORE_LABEL


def exact_and_token(preds: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row exact match and token accuracy over valid (non-ignored) label positions."""
    mask = labels != IGNORE_LABEL
    correct = (mask & (preds == labels)).sum(-1)
    count = mask.sum(-1)
    return (correct == count) & (count > 0), correct / count.clamp_min(1)


def would_halt_step(q_halt_per_step: torch.Tensor, q_continue_per_step: torch.Tensor | None = None) -> torch.Tensor:
    """0-based index of the first step where the Q-head says halt (``diagnostics.events.q_says_halt``; the last
    step when none): [T, B] -> [B]."""
    t = q_halt_per_step.shape[0]
    says = q_says_halt(q_halt_per_step, q_continue_per_step)
    first = torch.where(says.any(0), says.int().argmax(0), t - 1)
    return first


def act_step_sums(preds: torch.Tensor, labels: torch.Tensor, halt_step: torch.Tensor,
                  real: torch.Tensor) -> torch.Tensor:
    """Sums over the ``real`` rows, per ACT step, of exact, token accuracy and "would halt here" (the order of
    ``ACT_FIELDS``, steps inner): preds [T, B, L], labels [B, L], 0-based halt_step [B] -> [3 * T], on the device."""
    t = preds.shape[0]
    exact, token = exact_and_token(preds, labels.unsqueeze(0))  # [T, B] each
    halts = torch.nn.functional.one_hot(halt_step, t).T  # [T, B]
    stacked = torch.stack([exact.double(), token.double(), halts.double()])  # [3, T, B]
    return (stacked * real.double()).sum(-1).reshape(-1)


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


class ArcVotes:
    """Votes over augmentations per (task, test input), as upstream's ARC evaluator, with an honest denominator.

    Each prediction (already mapped back to the task's frame) votes for its grid; candidates rank by vote count,
    then by mean sigmoid(q_halt). pass@K counts a test input solved when its true output is among the top K; a task
    scores the mean over its test inputs; pass@K is the mean over the tasks that got at least one prediction (the
    tasks evaluated), not over the whole evaluation set.
    """

    def __init__(self) -> None:
        self.votes: dict[str, dict[int, dict[bytes, list]]] = {}

    def add(self, task: str, test: int, grid: np.ndarray, q_prob: float) -> None:
        grid = np.asarray(grid, dtype=np.uint8)
        key = np.asarray(grid.shape, dtype=np.int64).tobytes() + grid.tobytes()
        entry = self.votes.setdefault(task, {}).setdefault(int(test), {}).setdefault(key, [0, 0.0, grid])
        entry[0] += 1
        entry[1] += float(q_prob)

    def ranked(self, task: str, test: int) -> list[np.ndarray]:
        cands = self.votes.get(task, {}).get(test, {})
        order = sorted(cands.values(), key=lambda e: (e[0], e[1] / e[0]), reverse=True)
        return [e[2] for e in order]

    def score(self, truths: dict[tuple[str, int], np.ndarray], num_tests: dict[str, int],
              ks: tuple[int, ...] = (1, 2)) -> dict[str, float]:
        """``arc.pass@K`` for each K and ``arc.tasks`` (the denominator: tasks evaluated)."""
        tasks = sorted(self.votes)
        totals = {k: 0.0 for k in ks}
        for task in tasks:
            n = num_tests[task]
            for k in ks:
                hits = 0
                for test in range(n):
                    truth = np.asarray(truths[(task, test)])
                    top = self.ranked(task, test)[:k]
                    hits += any(g.shape == truth.shape and np.array_equal(g, truth) for g in top)
                totals[k] += hits / n
        out = {f"arc.pass@{k}": totals[k] / max(len(tasks), 1) for k in ks}
        out["arc.tasks"] = float(len(tasks))
        return out

    def submission(self, num_tests: dict[str, int]) -> dict[str, list[dict[str, list[list[int]]]]]:
        """The ARC Prize format: task id -> one {attempt_1, attempt_2} per test input ([[0]] when nothing better)."""
        out = {}
        for task in sorted(self.votes):
            entries = []
            for test in range(num_tests[task]):
                top = [g for g in self.ranked(task, test) if g.size][:2] or [np.zeros((1, 1), np.uint8)]
                top = top + top[:1] if len(top) == 1 else top
                entries.append({f"attempt_{i + 1}": g.astype(int).tolist() for i, g in enumerate(top)})
            out[task] = entries
        return out


SUBMISSION_NAME = "submission.json"


@torch.no_grad()
def evaluate(model, dataset, batch_size: int, device: torch.device, autocast,
             out_dir: Path | None = None) -> dict[str, float]:
    """Evaluate ``model`` on every sample of ``dataset``; returns means over samples and the sample count.

    Per ACT step k = 1..``model.max_steps`` (the audit, ``diagnostics.trace.eval_audits``): ``act.<k>.exact`` and
    ``act.<k>.token`` (the answer at step k) and ``act.<k>.halts`` (the share of samples whose would-halt step is k),
    from the same ACT run. On an ARC eval set (``dataset.arc_index``) it also votes over augmentations
    (``arc.pass@1``, ``arc.pass@2``, ``arc.tasks``) and, given ``out_dir``, writes ``submission.json`` there. A set
    with a ``row_scorer`` (the maze set's valid shortest path) also reports each of its scores at max steps
    (``NAME``) and at halt (``halt.NAME``).
    """
    index = getattr(dataset, "arc_index", None)
    votes = ArcVotes() if index is not None else None
    scorer = getattr(dataset, "row_scorer", None)
    sums = {"exact": 0.0, "token": 0.0, "halt.exact": 0.0, "halt.token": 0.0, "halt.step": 0.0}
    if scorer is not None:  # every key present from the start: sharded ranks must reduce the same keys
        sums.update({f"{p}{name}": 0.0 for name in scorer.names for p in ("", "halt.")})
    max_steps = int(model.max_steps)
    act_names = [act_key(k, what) for what in ACT_FIELDS for k in range(1, max_steps + 1)]
    act_sums = torch.zeros(len(act_names), dtype=torch.float64, device=device)
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
        step = would_halt_step(res["q_halt_logits"], res.get("q_continue_logits"))
        halt_preds = res["preds"].gather(0, step.view(1, -1, 1).expand(1, *labels.shape))[0]
        h_exact, h_token = exact_and_token(halt_preds, labels)
        for key, val in (("exact", exact), ("token", token), ("halt.exact", h_exact), ("halt.token", h_token),
                         ("halt.step", step + 1)):
            sums[key] += val[real].float().sum().item()
        act_sums += act_step_sums(res["preds"], labels, step, real)
        if scorer is not None:
            x, y = batch["inputs"][real].cpu().numpy(), labels[real].cpu().numpy()
            for prefix, p in (("", res["preds"][-1]), ("halt.", halt_preds)):
                for name, ok in scorer(x, y, p[real].cpu().numpy()).items():
                    sums[prefix + name] += float(np.sum(ok))
        if votes is not None:
            rows = batch["sample_id"][real].cpu().numpy()
            preds = res["preds"][-1][real].cpu().numpy()
            q = torch.sigmoid(res["q_halt_logits"][-1][real].float()).cpu().numpy()
            for row, pred, qp in zip(rows, preds, q):
                grid = index.to_original(int(row), pred)
                votes.add(index.task_names[index.row_task[row]], int(index.row_test[row]), grid, float(qp))
    sums.update(zip(act_names, act_sums.tolist()))
    out = {k: v / max(n, 1) for k, v in sums.items()}
    out["count"] = float(n)
    if votes is not None:
        out.update(votes.score(index.truths, index.num_tests))
        if out_dir is not None:
            path = Path(out_dir) / SUBMISSION_NAME
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(votes.submission(index.num_tests)))
            tmp.replace(path)
    return out
