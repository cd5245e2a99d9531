"""Context diversity: exact per-step statistics, no host sync, and ``encoder-collapse`` on real tiny runs.

``fault=constant-context`` (the encoder sees blank demos) must yield ``encoder-collapse``, live and offline, and open
the automatic profiler window; healthy ``demo`` (re-encode) and ``demo-trm`` must not. Training runs in-process.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from diagnostics.doctor.diagnose import diagnose, encoder_collapse
from diagnostics.doctor.live import LiveDoctor
from diagnostics.doctor.thresholds import DoctorConfig
from diagnostics.trace.loading import load_findings, load_run
from diagnostics.probes import DIVERSITY_EVERY, ContextDiversityProbe, default_probes
from diagnostics.probes.diversity import context_stats
from etrm.cli import main as train_main
from etrm.config import Config
from etrm.train.trainer import Trainer

TINY = [
    "arch.hidden_size=16", "arch.num_heads=2", "arch.L_layers=1", "arch.L_cycles=1", "arch.expansion=1.0",
    "arch.puzzle_emb_len=2", "data.canvas=4", "data.min_grid=2", "data.max_grid=3", "data.num_demos=2",
    "data.train_tasks=8", "data.heldout_tasks=2", "train.batch_size=8", "train.eval_batch_size=8",
    "train.eval_every=1000", "train.lr_warmup_steps=2",
]
STEPS = 60  # warm-up 20 + window 10: a collapse holds at step 30, is reported at the flush of step 40
SYNC_OPS = ("aten._local_scalar_dense", "aten.nonzero", "aten.item")


# ---------------------------------------------------------------------------------------------------------------
# The statistics

def test_context_stats_are_a_one_way_analysis_of_variance():
    g = torch.Generator().manual_seed(0)
    ctx = torch.randn(7, 3, 5, generator=g)
    ids = torch.tensor([4, 4, 2, 2, 2, 3, 9])
    real = torch.tensor([True] * 6 + [False])  # the last row is padding: it must not count
    s = {k: float(v) for k, v in context_stats(ctx, ids, real).items()}

    x = ctx.mean(1).double().numpy()[:6]
    gid = ids.numpy()[:6]
    mean = x.mean(0)
    group_mean = np.stack([x[gid == k].mean(0) for k in gid])
    d = x.shape[1]
    assert s["context_rows"] == 6 and s["context_puzzles"] == 3
    assert s["context_cross_ss"] == pytest.approx(((group_mean - mean) ** 2).sum() / d, rel=1e-5)
    assert s["context_within_ss"] == pytest.approx(((x - group_mean) ** 2).sum() / d, rel=1e-5)
    total = ((x - mean) ** 2).sum() / d
    assert s["context_cross_ss"] + s["context_within_ss"] == pytest.approx(total, rel=1e-5)
    assert s["context_sq_norm"] == pytest.approx((x ** 2).sum() / d, rel=1e-5)
    assert s["context_ms"] == pytest.approx(float(ctx[:6].double().pow(2).mean((1, 2)).sum()), rel=1e-5)


def test_identical_contexts_have_no_cross_puzzle_spread():
    one = torch.randn(1, 2, 8)
    s = context_stats(one.expand(6, 2, 8), torch.arange(1, 7), torch.ones(6, dtype=torch.bool))
    sq = float(s["context_sq_norm"])
    assert sq > 0 and float(s["context_puzzles"]) == 6
    # zero up to the rounding of the mean (sum / n)
    assert float(s["context_cross_ss"]) < 1e-9 * sq and float(s["context_within_ss"]) < 1e-9 * sq


def test_the_probe_is_among_the_defaults():
    probes = [p for p in default_probes(4) if isinstance(p, ContextDiversityProbe)]
    assert len(probes) == 1 and probes[0].every == DIVERSITY_EVERY > 1
    assert [p for p in default_probes(4, diversity_every=3) if isinstance(p, ContextDiversityProbe)][0].every == 3
    with pytest.raises(ValueError, match="every"):
        ContextDiversityProbe(0)


# ---------------------------------------------------------------------------------------------------------------
# The estimator: one step in ``every`` measured exactly, the others left at zero

class Events:
    """The fields the probe reads, of an ETRM step that encoded ``n`` fresh slots."""

    def __init__(self, context, puzzle_ids, token_rms=0.25):
        from diagnostics.events import Mode

        n = context.shape[0]
        self.encoder_out, self.mode = context, Mode.REENCODE
        self.encoded_slots = torch.arange(n)
        self.puzzle_id_after, self.sample_id_after = puzzle_ids, torch.arange(n)
        self.token_embed_rms = torch.tensor(token_rms)


def test_the_probe_measures_the_first_step_then_one_in_every_exactly():
    g = torch.Generator().manual_seed(1)
    steps = [Events(torch.randn(6, 2, 4, generator=g), torch.tensor([0, 0, 1, 1, 2, 3])) for _ in range(10)]
    probe = ContextDiversityProbe(every=4)
    rows = []
    for ev in steps:
        row = Row()
        probe.observe(ev, {}, row)
        rows.append({k: float(v) for k, v in row.values.items()})
    measured = [i for i, r in enumerate(rows) if r]
    assert measured == [0, 4, 8]
    for i in measured:  # a measured step holds the exact statistics of that step, and says it was measured
        exact = {k: float(v) for k, v in context_stats(steps[i].encoder_out, steps[i].puzzle_id_after,
                                                       torch.ones(6, dtype=torch.bool)).items()}
        assert rows[i]["context_measured"] == 1.0
        for k, v in exact.items():
            assert rows[i][k] == pytest.approx(v, rel=1e-6)
        assert rows[i]["token_ms"] == pytest.approx(0.0625 * 6)


def test_the_estimate_of_a_steady_context_equals_the_exact_figure_and_a_collapse_still_shows():
    """Over a window the figures are ratios of sums over the measured steps: for a context whose statistics do not
    change from step to step the estimate is the exact figure, and a collapsed context reads ~0 either way."""
    from diagnostics.trace import figures

    g = torch.Generator().manual_seed(2)
    ctx, ids = torch.randn(8, 2, 4, generator=g), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    for context in (ctx, ctx[:1].expand(8, 2, 4)):  # healthy, then collapsed
        out = {}
        for every in (1, 8):
            probe, rows = ContextDiversityProbe(every), []
            for step in range(1, 41):
                row = Row()
                probe.observe(Events(context, ids), {}, row)
                rows.append({"step": step, **{k: float(v) for k, v in row.values.items()}})
            df = pd.DataFrame(rows).set_index("step").fillna(0.0)
            out[every] = figures.over(df)
            assert df["context_measured"].sum() == 40 // every
        for name in ("context_cross_share", "context_within_share", "context_to_token_rms"):
            assert out[8][name] == pytest.approx(out[1][name], rel=1e-6, abs=1e-12), name
    assert out[8]["context_cross_share"] < 1e-9  # the collapsed one


# ---------------------------------------------------------------------------------------------------------------
# No host sync, and the values of real steps

class FailOnSync(TorchDispatchMode):
    """Fails on any op that reads a device value back to the host (as in test_tracer.py)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(str(func).startswith(op) for op in SYNC_OPS):
            raise AssertionError(f"host sync inside the traced step: {func}")
        return func(*args, **(kwargs or {}))


class Row:
    def __init__(self):
        self.values: dict[str, torch.Tensor] = {}

    def set(self, name, value):
        self.values[name] = value

    def later(self, name):
        return lambda value: self.values.__setitem__(name, value)


def tiny_trainer(tmp_path: Path, *overrides: str) -> Trainer:
    from etrm.config import apply_overrides
    from etrm.presets import load_preset

    cfg = Config.from_dict(apply_overrides(load_preset("demo"), [*TINY, *overrides]))
    return Trainer(cfg, tmp_path / "run", device=torch.device("cpu"))


@pytest.mark.parametrize("mode", ["reencode", "fct", "cached"])
def test_the_probe_adds_no_host_sync(tmp_path, mode):
    """Re-encode and fct: the whole step (model, loss, probe) runs sync-free. Cached: the model's own subset encode
    reads the reset count back by design, so only the probe runs under the detector there."""
    torch.manual_seed(0)
    trainer = tiny_trainer(tmp_path, f"encoder.mode={mode}")
    probe = ContextDiversityProbe(every=2)  # a measured, a skipped and a measured step, all under the detector
    rows = []
    for _ in range(3):
        batch = trainer.next_batch()
        row = Row()
        if mode == "cached":
            carry, out, events = trainer.model(trainer.carry, batch)
            loss, metrics = trainer.loss_fn(out, events)
            with FailOnSync():
                probe.observe(events, metrics, row)
        else:
            with FailOnSync():
                carry, out, events = trainer.model(trainer.carry, batch)
                loss, metrics = trainer.loss_fn(out, events)
                probe.observe(events, metrics, row)
        trainer.carry = carry
        rows.append({k: float(v) for k, v in row.values.items()})
    assert rows[1] == {}  # the skipped step keeps the row's zeros
    assert mode == "cached" or rows[2]["context_measured"] == 1.0  # (cached: measured only if a slot reset)
    # the first step encodes all 8 slots in every mode
    first = rows[0]
    assert first["context_rows"] == 8 and 2 <= first["context_puzzles"] <= 8
    assert first["context_cross_ss"] > 0 and first["context_within_ss"] >= 0
    # the context is RMS-normed (1 per element) and the token table starts at std 1/sqrt(hidden) (upstream's
    # corrected truncated normal): their RMS ratio starts near sqrt(hidden), up to the table's sampling noise
    ratio = math.sqrt(first["context_ms"] / first["token_ms"])
    assert 0.85 < ratio / math.sqrt(16) < 1.15


def test_trm_rows_stay_zero(tmp_path):
    from etrm.config import apply_overrides
    from etrm.presets import load_preset

    cfg = Config.from_dict(apply_overrides(load_preset("demo-trm"), TINY))
    trainer = Trainer(cfg, tmp_path / "run", device=torch.device("cpu"))
    batch = trainer.next_batch()
    _, out, events = trainer.model(trainer.carry, batch)
    row = Row()
    ContextDiversityProbe().observe(events, {}, row)
    assert events.token_embed_rms is None and row.values == {}  # the tracer's row starts at zero


# ---------------------------------------------------------------------------------------------------------------
# encoder-collapse on real runs

def train(run_dir: Path, *args: str) -> Path:
    code = train_main([*args, "--trace", "--run-dir", str(run_dir), "--max-steps", str(STEPS), "--device", "cpu",
                       *TINY])
    assert code == 0
    return run_dir


@pytest.fixture(scope="module")
def collapsed(tmp_path_factory) -> Path:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(tmp_path_factory.mktemp("collapse") / "run", "--preset", "demo", "fault=constant-context")
    finally:
        torch.set_num_threads(previous)


def test_constant_context_yields_encoder_collapse(collapsed, capsys):
    df = load_run(collapsed)
    found = {f.code: f for f in diagnose(df)}
    assert "encoder-collapse" in found
    f = found["encoder-collapse"]
    cfg = DoctorConfig()
    assert f.severity == "warning" and f.first_step == cfg.collapse_warmup + cfg.collapse_window
    assert f.evidence["cross_puzzle_share"] < 1e-9 and f.evidence["puzzles_per_step"] >= 2
    assert f.evidence["window"] == [cfg.collapse_warmup + 1, cfg.collapse_warmup + cfg.collapse_window]
    assert f.evidence["context_to_token_rms"] > 1
    # the trainer's live doctor stored the same finding, at the same first step
    live = load_findings(collapsed).set_index("code")
    assert live.loc["encoder-collapse", "first_step"] == f.first_step
    # and the LiveDoctor fed flush by flush agrees
    doctor = LiveDoctor(df.attrs["meta"])
    rows = [{"step": int(s), **{c: float(df.at[s, c]) for c in df.columns}} for s in df.index]
    hits = [x for i in range(0, len(rows), 7) for x in doctor.update(rows[i:i + 7])]
    assert [x.first_step for x in hits if x.code == "encoder-collapse"] == [f.first_step]


def test_the_collapse_opened_a_profiler_window(collapsed):
    """The finding holds at step 30 and is reported at the flush of step 40: a window (warmup 1, active 3) opens
    there, so the trace shows steps 42..44, named by their etrm step numbers."""
    import json

    files = sorted((collapsed / "profiler").glob("finding-encoder-collapse.*.pt.trace.json"))
    assert len(files) == 1
    names = {e.get("name") for e in json.loads(files[0].read_text())["traceEvents"]}
    assert {"etrm.step 42", "etrm.step 43", "etrm.step 44"} <= names


@pytest.mark.parametrize("args", [["--preset", "demo"], ["--preset", "demo-trm"]], ids=["demo", "demo-trm"])
def test_healthy_presets_do_not_collapse(tmp_path, args):
    run = train(tmp_path / "run", *args)
    df = load_run(run)
    assert encoder_collapse(df) is None
    assert "encoder-collapse" not in set(load_findings(run)["code"])
    if args[1] == "demo":  # measured, for the record: the share stays orders of magnitude above the threshold
        share = df["context_cross_ss"].sum() / df["context_sq_norm"].sum()
        assert share > 100 * DoctorConfig().collapse_share_min
    else:
        assert (df["context_rows"] == 0).all()  # TRM: no encoder context, the rule does not apply
    assert not (run / "profiler").exists()  # no finding, no request: no profiler ever ran


def test_the_rate_is_a_setting_checked_against_the_collapse_window():
    from etrm.config import ConfigError, apply_overrides
    from etrm.presets import load_preset

    cfg = Config.from_dict(apply_overrides(load_preset("demo"), ["train.diversity_every=3"]))
    assert cfg.train.diversity_every == 3
    with pytest.raises(ConfigError, match="collapse_window"):  # a window without a measured step could not judge
        Config.from_dict(apply_overrides(load_preset("demo"), ["train.diversity_every=11"]))
    with pytest.raises(ConfigError, match="diversity_every"):
        Config.from_dict(apply_overrides(load_preset("demo"), ["train.diversity_every=0"]))
