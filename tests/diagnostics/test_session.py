"""diagnostics.session, piece by piece: content identity, the events it builds from an upstream-shaped step, the
run directory's lifecycle, bad input. The whole loop (example and faults) is tests/examples/test_own_loop.py."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from diagnostics.trace.loading import load_run, load_timings, run_status
from diagnostics.session import (UNKNOWN_ID, CarryShape, RunSpec, TracedRun, build_events, content_ids, field_of,
                                 trace_run)
from diagnostics.trace.schema import TRACE_NAME

B, S, V = 4, 5, 7


def sample(ids: list[int]) -> dict[str, torch.Tensor]:
    """Upstream-shaped data rows for sample ids (no id in the data: inputs and labels depend on it)."""
    rows = [torch.Generator().manual_seed(100 + i) for i in ids]
    inputs = torch.stack([torch.randint(1, V, (S,), generator=g) for g in rows])
    return {"inputs": inputs, "labels": (inputs + 1) % V, "puzzle_identifiers": torch.tensor(ids) % 3}


def carry(ids: list[int], halted: list[bool], steps: list[int]) -> dict:
    return {"halted": torch.tensor(halted), "steps": torch.tensor(steps, dtype=torch.int32),
            "current_data": sample(ids)}


def outputs(q_halt: list[float]) -> dict[str, torch.Tensor]:
    return {"logits": torch.zeros(B, S, V), "q_halt_logits": torch.tensor(q_halt),
            "q_continue_logits": torch.zeros(B)}


SPEC = RunSpec(model="toy", mode="cached", batch_size=B, max_steps=10, max_steps_per_sample=3, trace_every=5)


def test_content_ids_equal_rows_agree_and_structured_differences_do_not_cancel():
    a = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [4, 3, 2, 1], [2, 1, 3, 4], [-100, 2, 3, 4]])
    ids = content_ids(a).tolist()
    assert ids[0] == ids[1] and len(set(ids[1:])) == 4 and all(0 <= i < 2**31 for i in ids)
    assert content_ids(a, torch.arange(5)).tolist()[0] != content_ids(a, torch.arange(5)).tolist()[1]


def test_events_of_a_cached_step_with_labels_from_the_batch():
    """Slots 0 and 2 reset (take the fed samples 10 and 12), 1 and 3 continue (samples 1 and 3) while the feed put
    11 and 13 at their positions; the loss read the batch's labels; the encoder ran on the two reset slots."""
    before = carry([0, 1, 2, 3], [True, False, True, False], [3, 1, 3, 2])
    batch = sample([10, 11, 12, 13])
    after = carry([10, 1, 12, 3], [False, False, False, True], [1, 2, 1, 3])
    rows = torch.randn(2, 3, requires_grad=True)
    ev = build_events(SPEC, before, after, batch, outputs([1.0, -1.0, 2.0, -3.0]), batch["labels"], rows)
    ids = content_ids(after["current_data"]["inputs"], after["current_data"]["puzzle_identifiers"])
    fed = content_ids(batch["inputs"], batch["puzzle_identifiers"])
    assert torch.equal(ev.sample_id_after, ids) and torch.equal(ev.batch_sample_id, fed)
    assert torch.equal(ev.label_sample_id, torch.stack([ids[0], fed[1], ids[2], fed[3]]))
    assert ev.encoded.tolist() == [True, False, True, False] and ev.encoded_slots.tolist() == [0, 2]
    assert ev.needs_encode.tolist() == ev.reset.tolist() == [True, False, True, False]
    # slot 0 and 2 said halt but did not halt: vetoed; slot 3 halted at the limit without Q saying so
    assert ev.q_says_halt.tolist() == [True, False, True, False]
    assert ev.explore_veto.tolist() == [True, False, True, False] and ev.is_last_step.tolist() == [False] * 3 + [True]
    other = torch.full((B, S), 6)
    assert build_events(SPEC, before, after, batch, outputs([0.0] * 4), other).label_sample_id.tolist() == [UNKNOWN_ID] * B


def test_a_missing_field_or_a_bad_spec_is_a_one_line_error():
    with pytest.raises(ValueError, match="no field 'done'.*CarryShape"):
        field_of({"halted": 1}, "done")
    with pytest.raises(ValueError, match="mode must be one of reencode, cached, fct, trm"):
        RunSpec(model="x", mode="cache", batch_size=4, max_steps=10, max_steps_per_sample=3)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        RunSpec(model="x", mode="trm", batch_size=0, max_steps=10, max_steps_per_sample=3)


def test_an_existing_trace_is_never_overwritten(tmp_path):
    run = TracedRun(tmp_path / "r", SPEC)
    run.close()
    before = (tmp_path / "r" / TRACE_NAME).read_bytes()
    again = TracedRun(tmp_path / "r", SPEC)  # issue 26: a rerun goes to the next numbered sibling
    again.close()
    assert again.run_dir == tmp_path / "r-1" and (tmp_path / "r-1" / TRACE_NAME).exists()
    assert (tmp_path / "r" / TRACE_NAME).read_bytes() == before


class Toy(nn.Module):
    """Enough of a model for the session: an 'encoder' whose output feeds the logits."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(S, V)
        self.head = nn.Linear(V, V)


def toy_step(model: Toy, run: TracedRun, loss_scale: float = 1.0, encode_twice: bool = False,
             timed: bool = False) -> None:
    before = carry([0, 1, 2, 3], [True] * B, [3] * B)
    batch = sample([0, 1, 2, 3])
    after = carry([0, 1, 2, 3], [False] * B, [1] * B)
    ctx = model.encoder(batch["inputs"].float())
    if encode_twice:
        model.encoder(batch["inputs"].float())
    logits = model.head(ctx)[:, None, :].expand(B, S, V)
    labels = after["current_data"]["labels"]
    loss = nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum") * loss_scale
    out = {"logits": logits, "q_halt_logits": torch.full((B,), -5.0)}
    run.step(before, after, batch, out, loss, labels=labels, terms={"lm_loss": loss})
    with run.phase("backward") if timed else contextlib.nullcontext():
        loss.backward()
    run.after_backward()
    model.zero_grad()


def test_lifecycle_flush_cadence_findings_and_markers(tmp_path):
    model = Toy()
    seen = []
    spec = RunSpec(model="toy", mode="reencode", batch_size=B, max_steps=7, max_steps_per_sample=3, trace_every=5)
    with trace_run(tmp_path / "ok", spec, model, encoder=model.encoder, on_finding=seen.append) as run:
        with run.phase("forward"):
            pass
        toy_step(model, run, timed=True)
        for _ in range(3):
            toy_step(model, run)
        assert run.tracer.steps == [1, 2, 3, 4]     # nothing flushed before the cadence
        toy_step(model, run)
        assert run.tracer.steps == []               # step 5: flushed
        toy_step(model, run, loss_scale=float("nan"))
        assert not run.non_finite                   # known only at the next flush (step 7, the last)
        toy_step(model, run)
        assert run.non_finite and [f.code for f in seen] == ["non-finite-loss"]
    df = load_run(tmp_path / "ok")
    assert df.index.to_list() == list(range(1, 8)) and (df["coverage_num"] == B).all()
    assert df.attrs["meta"]["source"] == "own-loop" and run_status(tmp_path / "ok") == "finished"
    timings = load_timings(tmp_path / "ok")
    assert timings[["step", "phase"]].values.tolist() == [[1, "backward"], [1, "forward"]]  # both step 1's

    with pytest.raises(RuntimeError):
        with trace_run(tmp_path / "boom", spec, model, encoder=model.encoder) as run:
            toy_step(model, run)
            raise RuntimeError("the user's loop failed")
    assert run_status(tmp_path / "boom") == "crashed"
    small = carry([0, 1, 2], [True] * 3, [1] * 3)
    with pytest.raises(ValueError, match="carry has 3 slots but RunSpec.batch_size is 4"):
        with trace_run(tmp_path / "small", spec, model) as run:
            run.step(small, small, sample([0, 1, 2]), outputs([0.0] * 3), torch.zeros(()),
                     small["current_data"]["labels"])
    with pytest.raises(ValueError, match="ran 2 times with grad in one step"):
        with trace_run(tmp_path / "twice", spec, model, encoder=model.encoder) as run:
            toy_step(model, run, encode_twice=True)


def test_a_dict_carry_with_its_own_names_and_sample_ids(tmp_path):
    shape = CarryShape(data="data", puzzle_id="puzzle", sample_id="sid")
    before = {"halted": torch.ones(B, dtype=torch.bool), "steps": torch.zeros(B, dtype=torch.int32),
              "data": {"sid": torch.full((B,), -1), "puzzle": torch.zeros(B), "labels": torch.zeros(B, S)}}
    batch = {"sid": torch.tensor([5, 6, -1, 8]), "puzzle": torch.tensor([1, 1, 0, 2]),
             "labels": torch.arange(B * S).view(B, S)}
    after = {"halted": torch.zeros(B, dtype=torch.bool), "steps": torch.ones(B, dtype=torch.int32), "data": batch}
    ev = build_events(SPEC, before, after, batch, outputs([0.0] * 4), batch["labels"], shape=shape)
    assert ev.sample_id_after.tolist() == [5, 6, -1, 8] == ev.label_sample_id.tolist()
    assert ev.puzzle_id_after.tolist() == [1, 1, 0, 2] and ev.encoder_out is None and not ev.encoded.any()


def test_a_non_finite_gradient_with_a_finite_loss_also_says_stop(tmp_path):
    model = Toy()
    spec = RunSpec(model="toy", mode="reencode", batch_size=B, max_steps=4, max_steps_per_sample=3, trace_every=2)
    found = []
    with trace_run(tmp_path / "g", spec, model, encoder=model.encoder, on_finding=found.append) as run:
        toy_step(model, run)
        toy_step(model, run)
        assert not run.non_finite
        handle = model.head.weight.register_hook(lambda g: g * float("nan"))
        toy_step(model, run)
        toy_step(model, run)
        handle.remove()
        assert run.non_finite and [f.code for f in found] == ["non-finite-loss"]
        assert found[0].evidence["columns"] == ["grad_norm_rest"]


def test_meta_holds_the_description_and_extra_keys_cannot_replace_it():
    meta = RunSpec(model="mine", mode="cached", batch_size=2, max_steps=3, max_steps_per_sample=2,
                   extra={"mode": "reencode", "preset": "fork", "lr": 1e-4}).meta("cuda")
    assert (meta["model"], meta["mode"], meta["batch_size"], meta["max_steps"], meta["max_steps_per_sample"],
            meta["device"], meta["sampler"], meta["source"]) == ("mine", "cached", 2, 3, 2, "cuda", "trm", "own-loop")
    assert meta["preset"] == "fork" and meta["lr"] == 1e-4
