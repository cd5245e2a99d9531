"""Issue 26: the field's code as it is. examples/upstream_fork (a fork-shaped ETRM: dataclass encoder output,
upstream's ``ACTLossHead`` shape, a ``pretrain.py``-style loop) is traced with no change to its model or loss code;
its fault variants get the bundled trainer's finding codes on the same first steps; the encoder mode is measured
(``wasted-encoder-compute`` and ``mode-mismatch`` whatever is declared); any encoder output kind is traced; reruns
go to numbered siblings; evaluations are recorded through ``run.evaluation`` and judged by ``etrm-doctor``.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from diagnostics import RunSpec, trace_run
from diagnostics.doctor.diagnose import diagnose
from diagnostics.trace.loading import load_eval_audits, load_findings, load_run
from test_own_loop import BATCH, STEPS, VARIANTS, etrm_doctor


def doctor_in_process(run: Path, capsys) -> tuple[int, dict]:
    """``etrm-doctor RUN --json`` through its entry point in this process (the variant tests run the real
    subprocess; these save its start-up)."""
    import json

    from diagnostics.cli import main

    capsys.readouterr()
    code = main([str(run), "--json"])
    return code, json.loads(capsys.readouterr().out)

# (variant, declared mode) -> the findings etrm-doctor names when the declaration is not what the code does
MISDECLARED = {("cached", "reencode"): {"gradient-starvation", "mode-mismatch", "dropped-samples"},
               ("full-batch-encode", "reencode"): {"gradient-starvation", "wasted-encoder-compute", "mode-mismatch",
                                                   "dropped-samples"}}


@pytest.fixture(scope="module")
def fork_runs(upstream_fork, tmp_path_factory) -> Path:
    """One run of each variant (declared as the code means it) and the misdeclared ones, 40 steps, batch 8."""
    from upstream_fork import pretrain

    root = tmp_path_factory.mktemp("fork_runs")
    for variant in VARIANTS:
        pretrain.pretrain(root / variant, variant, steps=STEPS, batch_size=BATCH)
    for variant, declared in MISDECLARED:
        pretrain.pretrain(root / f"{variant}-as-{declared}", variant, steps=STEPS, batch_size=BATCH,
                          declare=declared, eval_at_end=False)
    return root


def first_steps(findings) -> dict[str, int]:
    return {f["code"]: f["first_step"] for f in findings}


@pytest.mark.parametrize("variant", VARIANTS)
def test_field_code_fork_variant_gets_the_bundled_findings_on_the_same_steps(variant, fork_runs, bundled_runs):
    code, report = etrm_doctor(fork_runs / variant)
    bundled = {f.code: f.first_step for f in diagnose(load_run(bundled_runs / variant))}
    assert first_steps(report["findings"]) == bundled, (report["findings"], bundled)
    assert "mode-mismatch" not in bundled  # the measured rules do not misfire on the bundled trainer
    assert code == (0 if variant == "healthy" else 1)
    stored = {r.code: int(r.first_step) for r in load_findings(fork_runs / variant).itertuples()}
    assert stored == {**first_steps(report["findings"]), **stored} and set(stored) >= set(bundled)


def test_field_code_fork_is_traced_without_touching_its_model_or_loss(upstream_fork):
    for name in ("model.py", "losses.py", "puzzle_dataset.py"):
        text = (upstream_fork / name).read_text()
        assert not re.search(r"#\s*etrm\b|\bdiagnostics\b|\betrm\b", text), name
    marked = [line.strip() for line in (upstream_fork / "pretrain.py").read_text().splitlines()
              if re.search(r"#\s*etrm\b", line)]
    assert 0 < len(marked) <= 12
    doc = (upstream_fork.parents[1] / "docs" / "own-loop.md").read_text()
    for line in marked:
        code = re.split(r"#\s*etrm", line)[0].strip()
        assert code in doc, f"docs/own-loop.md does not show {code!r}"


@pytest.mark.parametrize("variant,declared", sorted(MISDECLARED))
def test_field_code_encoder_mode_is_measured_not_declared(variant, declared, fork_runs, capsys):
    code, report = doctor_in_process(fork_runs / f"{variant}-as-{declared}", capsys)
    found = {f["code"]: f for f in report["findings"]}
    assert set(found) == MISDECLARED[(variant, declared)] and report["summary"]["mode"] == declared
    mismatch = found["mode-mismatch"]
    assert mismatch["severity"] == "warning" and "'reencode'" in mismatch["message"] and "'cached'" in mismatch[
        "message"]
    assert (mismatch["evidence"]["declared"], mismatch["evidence"]["observed"]) == ("reencode", "cached")
    df = load_run(fork_runs / f"{variant}-as-{declared}")
    assert (df["coverage_num"] == df["resets"]).all()  # rows that reached the loss: the reset slots only
    if variant == "full-batch-encode":
        wasted = found["wasted-encoder-compute"]["evidence"]
        assert (df["encoded"] == BATCH).all() and (df["encode_needed"] == BATCH).all()  # declared: all needed
        assert wasted["wasted"] == wasted["encoded"] - wasted["reached_loss"] > 0


# ------------------------------------------------------------------------------------------------------------------
# encoder outputs of every kind

@dataclasses.dataclass
class Summary:
    """An encoder output with no ``context`` field (module level: its annotation must resolve)."""

    pooled: torch.Tensor
    note: str


def kinds():
    from upstream_fork.model import DemoEncoder

    class AsTensor(DemoEncoder):
        def forward(self, demo_inputs, demo_labels):
            return super().forward(demo_inputs, demo_labels).context

    class AsTuple(DemoEncoder):
        def forward(self, demo_inputs, demo_labels):
            out = super().forward(demo_inputs, demo_labels)
            return out.context, out.demo_vectors

    class AsDict(DemoEncoder):
        def forward(self, demo_inputs, demo_labels):
            out = super().forward(demo_inputs, demo_labels)
            return {"context": out.context, "demo_vectors": out.demo_vectors}

    class Renamed(DemoEncoder):  # no field named "context": the selector names it
        def forward(self, demo_inputs, demo_labels):
            out = super().forward(demo_inputs, demo_labels)
            return {"demo_vectors": out.demo_vectors, "task_code": out.context}

    # kind -> (encoder class, trace_run's encoder_select, how the model reads the context from the output)
    return {"tensor": (AsTensor, None, lambda o: o), "tuple": (AsTuple, None, lambda o: o[0]),
            "dict": (AsDict, None, lambda o: o["context"]), "dataclass": (DemoEncoder, None, lambda o: o.context),
            "selected": (Renamed, "task_code", lambda o: o["task_code"])}


def traced_fork(root: Path, encoder_cls=None, select=None, steps: int = 4, mode: str = "reencode",
                dtype: str = "float32", read=None):
    """A few traced steps of the healthy fork with its encoder's class swapped (``read``: how the model takes the
    context from the new output); the run directory."""
    from upstream_fork import pretrain
    from upstream_fork.losses import ACTLossHead
    from upstream_fork.model import ForkConfig, TRMWithEncoder
    from upstream_fork.puzzle_dataset import FewShotPuzzles, PuzzleDataset, PuzzleDatasetConfig

    torch.manual_seed(0)
    puzzles = FewShotPuzzles(PuzzleDatasetConfig(global_batch_size=BATCH))
    model = TRMWithEncoder(ForkConfig(puzzles.cfg.colours, puzzles.cfg.seq_len, context_mode=mode,
                                      forward_dtype=dtype))
    if encoder_cls is not None:
        model.encoder.__class__ = encoder_cls
        model.encode = lambda *demos: read(model.encoder(*demos))
    head = ACTLossHead(model)
    state = pretrain.TrainState(head, torch.optim.AdamW(head.parameters(), lr=1e-3), total_steps=steps)
    spec = RunSpec(model="fork", mode=mode, batch_size=BATCH, max_steps=steps, max_steps_per_sample=4, trace_every=2)
    run = trace_run(root, spec, model, encoder=model.encoder, loss_head=head, encoder_select=select,
                    on_finding=None)
    for _, batch, size in PuzzleDataset(puzzles):
        if state.step >= steps:
            break
        pretrain.train_batch(state, batch, size, 1e-3, 1, run)
    run.close()
    return run.run_dir


@pytest.mark.parametrize("kind", ["tensor", "tuple", "dict", "dataclass", "selected"])
def test_field_code_encoder_output_of_any_kind_is_traced(kind, upstream_fork, tmp_path):
    cls, select, read = kinds()[kind]
    df = load_run(traced_fork(tmp_path / kind, cls, select, read=read))
    assert len(df) == 4 and (df["encoded"] == BATCH).all() and (df["coverage_num"] == BATCH).all()
    assert (df["grad_norm_encoder"] > 0).all()  # the whole encoder's group, not a sub-module's


def test_field_code_bf16_forward_is_traced(upstream_fork, tmp_path):
    df = load_run(traced_fork(tmp_path / "bf16", dtype="bfloat16", mode="cached", steps=6))
    assert (df["coverage_num"] == df["resets"]).all() and df["loss"].notna().all()


def test_field_code_unusable_encoder_output_is_one_line_at_trace_run(upstream_fork, tmp_path):
    from upstream_fork.model import DemoEncoder

    class Annotated(DemoEncoder):
        def forward(self, demo_inputs, demo_labels) -> Summary:
            return Summary(super().forward(demo_inputs, demo_labels).context, "x")

    with pytest.raises(ValueError) as err:
        traced_fork(tmp_path / "annotated", Annotated, read=lambda o: o.pooled)
    msg = str(err.value)
    assert "\n" not in msg and "Summary" in msg and "encoder_select" in msg and "pooled" in msg
    assert not (tmp_path / "annotated").exists()  # refused before anything was created
    with pytest.raises(ValueError) as err:  # the selector names a field that is not a tensor
        traced_fork(tmp_path / "note", Annotated, "note", read=lambda o: o.pooled)
    assert "encoder_select='note'" in str(err.value) and not (tmp_path / "note").exists()
    # without an annotation the output is checked at the first step, outside the user's forward
    class Unannotated(DemoEncoder):
        def forward(self, demo_inputs, demo_labels):
            return {"pooled": super().forward(demo_inputs, demo_labels).context}

    with pytest.raises(ValueError) as err:
        traced_fork(tmp_path / "unannotated", Unannotated, read=lambda o: o["pooled"])
    msg = str(err.value)
    assert "\n" not in msg and "dict (keys: pooled)" in msg and "encoder_select" in msg


# ------------------------------------------------------------------------------------------------------------------
# reruns and evaluations

def test_field_code_rerun_goes_to_the_next_numbered_directory(upstream_fork, tmp_path, capsys):
    from upstream_fork import pretrain

    run = tmp_path / "x"
    args = ["--steps", "3", "--batch-size", "4", "--run-dir", str(run)]
    assert pretrain.main(args) == 0
    first = (run / "trace.sqlite").read_bytes()
    capsys.readouterr()
    assert pretrain.main(args) == 0 and pretrain.main(args) == 0
    err = capsys.readouterr().err
    assert f"{run} already holds a trace; this run writes {tmp_path / 'x-1'}" in err
    assert f"this run writes {tmp_path / 'x-2'}" in err
    assert (run / "trace.sqlite").read_bytes() == first
    assert len(load_run(tmp_path / "x-1")) == len(load_run(tmp_path / "x-2")) == 3


def test_field_code_example_records_its_evaluation(fork_runs):
    audits = load_eval_audits(fork_runs / "healthy")
    assert sorted(audits["act_step"]) == [1, 2, 3, 4] and (audits["step"] == STEPS).all()
    assert (audits["weights"] == "raw").all() and (audits["count"] == 288).all()  # every sample, padding left out
    assert audits["halt_rule"].iloc[0] == "q_halt > 0" and audits["halt_share"].sum() == pytest.approx(1.0)


def test_field_code_late_halting_evaluation_gets_eval_halting_mismatch(upstream_fork, tmp_path, capsys):
    """A constructed model: in evaluation it answers right at ACT step 1, where its Q-head says halt, and wrong at
    every later step, so evaluating at the maximum step understates it (``late``)."""
    from upstream_fork import pretrain
    from upstream_fork.losses import ACTLossHead
    from upstream_fork.model import ForkConfig, TRMWithEncoder
    from upstream_fork.puzzle_dataset import FewShotPuzzles, PuzzleDataset, PuzzleDatasetConfig

    class LateHalting(TRMWithEncoder):
        def forward(self, carry, batch):
            new_carry, outputs = super().forward(carry, batch)
            if not self.training:
                labels = new_carry.current_data["labels"].clamp_min(0)
                first = (new_carry.steps == 1).view(-1, 1)
                answer = torch.where(first, labels, (labels + 1) % self.config.vocab_size)
                outputs["logits"] = torch.nn.functional.one_hot(answer, self.config.vocab_size).float()
                outputs["q_halt_logits"] = torch.where(first[:, 0], 5.0, -5.0)
            return new_carry, outputs

    puzzles = FewShotPuzzles(PuzzleDatasetConfig(global_batch_size=BATCH))
    model = LateHalting(ForkConfig(puzzles.cfg.colours, puzzles.cfg.seq_len))
    head = ACTLossHead(model)
    spec = RunSpec(model="late", mode="reencode", batch_size=BATCH, max_steps=2, max_steps_per_sample=4)
    run = trace_run(tmp_path / "late", spec, model, encoder=model.encoder, loss_head=head, on_finding=None)
    state = pretrain.TrainState(head, torch.optim.AdamW(head.parameters()), total_steps=2)
    data = PuzzleDataset(puzzles)
    for _, batch, size in data:
        if state.step >= 2:
            break
        pretrain.train_batch(state, batch, size, 1e-3, 1, run)
    with run.evaluation():
        pretrain.evaluate(head, data)
    run.close()
    assert [f.code for f in run.findings if f.code == "eval-halting-mismatch"]  # the live doctor saw it
    code, report = doctor_in_process(run.run_dir, capsys)
    [f] = [f for f in report["findings"] if f["code"] == "eval-halting-mismatch"]
    ev = f["evidence"]
    assert ev["kind"] == "late" and f["first_step"] == 2
    assert ev["exact_at_would_halt"] == 1.0 and ev["exact_at_max_step"] == 0.0 and ev["best_act_step"] == 1
