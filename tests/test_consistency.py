"""Every view of a run tells the same numbers: one real traced run per mode, every registered figure compared across
the doctor's JSON summary, ``load_run``, the TensorBoard scalars, the CSV/Parquet exports, the dashboard's cards,
charts and efficiency table, and a bucketed SQL read against the in-memory one, all against the trace's own sums.

It fails when a figure is added to a probe but missing from a view.
"""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path

import pandas as pd
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dashboards.run_view import CARD_FIGURES, CARD_STEPS, fmt, kpis
from dashboards.figures.compare import EFFICIENCY_FIGURES, METRICS, compare_figure, efficiency
from dashboards import runs as R
from diagnostics.trace import figures
from diagnostics.cli import main as doctor_main
from diagnostics.trace.loading import load_run
from diagnostics.trace.reader import ratio_spec
from diagnostics.trace.store import TRACE_NAME
from diagnostics.trace.tb_scalars import TENSORBOARD_DIR
from etrm.cli import main as train_main

TINY = ["arch.hidden_size=16", "arch.num_heads=2", "arch.L_layers=1", "arch.L_cycles=1", "arch.expansion=1.0",
        "arch.puzzle_emb_len=2", "data.canvas=4", "data.min_grid=2", "data.max_grid=3", "data.num_demos=2",
        "data.train_tasks=8", "data.heldout_tasks=2", "train.batch_size=8", "train.eval_batch_size=8",
        "train.eval_every=1000", "train.lr_warmup_steps=2", "train.trace_every=10", "act.halt_max_steps=3"]
STEPS = 40
MODES = {"reencode": ["--preset", "demo"], "cached": ["--preset", "demo", "encoder.mode=cached"],
         "fct": ["--preset", "demo", "encoder.mode=fct", "fct.steps=3"], "trm": ["--preset", "demo-trm"]}


def truth(db: Path, fig: figures.Figure, lo: int, hi: int) -> float:
    """The figure straight from the trace: SQL sums of its terms over steps [lo, hi]."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        sums = {t: conn.execute(f'SELECT TOTAL("{t}") FROM steps WHERE step BETWEEN ? AND ?', (lo, hi)).fetchone()[0]
                for t in fig.terms}
        rows = conn.execute("SELECT COUNT(*) FROM steps WHERE step BETWEEN ? AND ?", (lo, hi)).fetchone()[0]
    num, den = sum(sums[t] for t in fig.num), (sum(sums[t] for t in fig.den) if fig.den else rows)
    if den == 0:
        return math.nan
    return math.sqrt(num / den) if fig.sqrt else num / den


def same(a: float | None, b: float) -> bool:
    a = math.nan if a is None else float(a)
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-9, abs=1e-12)


@pytest.fixture(scope="module", params=list(MODES))
def run(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"consistency-{request.param}")
    d = root / request.param
    code = train_main([*MODES[request.param], "--trace", "--tensorboard", "--run-dir", str(d), "--device", "cpu",
                       "--max-steps", str(STEPS), *TINY])
    assert code in (0, 1)
    return root, d, request.param


def test_every_view_tells_the_same_figures(run, capsys, tmp_path):
    root, d, mode = run
    db = d / TRACE_NAME
    df = load_run(d)
    assert df.attrs["meta"]["mode"] == mode
    expected = [f for f in figures.available(df.columns, mode)]
    names = {f.name for f in expected}
    assert names == {f.name for f in figures.REGISTRY.values() if figures.applies(f, mode)}  # every input stored
    last = int(df.index.max())

    # load_run: every applicable figure as a column, per step
    for fig in expected:
        for step in (1, last // 2, last):
            assert same(df.loc[step, fig.name], truth(db, fig, step, step)), (fig.name, step)

    # the doctor's JSON summary (whole run and the final window) and its exports
    capsys.readouterr()
    csv, parquet = tmp_path / "steps.csv", tmp_path / "steps.parquet"
    assert doctor_main([str(d), "--json", "--export", "csv", str(csv)]) in (0, 1)
    report = json.loads(capsys.readouterr().out)["summary"]
    assert doctor_main([str(d), "--json", "--export", "parquet", str(parquet)]) in (0, 1)
    capsys.readouterr()
    assert set(report["figures"]) == names
    lo, hi = report["final"]["window"]
    for fig in expected:
        assert same(report["figures"][fig.name], truth(db, fig, 1, last)), fig.name
        assert same(report["final"][fig.name], truth(db, fig, lo, hi)), fig.name
    for exported in (pd.read_csv(csv, index_col=0), pd.read_parquet(parquet)):
        assert names <= set(exported.columns)
        for fig in expected:
            a, b = exported[fig.name].to_numpy(dtype=float), df[fig.name].to_numpy(dtype=float)
            assert pd.Series(a).equals(pd.Series(b)) or (pd.Series(a) - pd.Series(b)).abs().max() < 1e-12, fig.name

    # TensorBoard: one point per flush, each figure over that flush's steps
    acc = EventAccumulator(str(d / TENSORBOARD_DIR))
    acc.Reload()
    tags = {t for t in acc.Tags()["scalars"] if t.startswith("train/")}
    defined = {f.name for f in expected if not math.isnan(truth(db, f, 1, last))}
    assert {t[len("train/"):] for t in tags} <= names and defined <= {t[len("train/"):] for t in tags}
    for tag in tags:
        fig = figures.REGISTRY[tag[len("train/"):]]
        for e in acc.Scalars(tag):
            assert e.value == pytest.approx(truth(db, fig, e.step - 9, e.step), rel=1e-5, abs=1e-6), (tag, e.step)

    # the dashboard: every figure is offered on the compare page, its overlay draws the trace's per-step values
    assert set(METRICS) == set(figures.REGISTRY)
    runs = R.Runs(root)
    cache = runs.get(mode)
    for fig in expected:
        frame = cache.frame(R.metric_spec(fig.name))
        drawn = compare_figure({mode: frame}, fig.name)
        if math.isnan(truth(db, fig, 1, last)) and frame[fig.name].isna().all():
            continue
        line = [t for t in drawn["data"] if t.get("name") == mode]
        assert line, fig.name
        ys = line[0]["y"]
        assert len(ys) == len(frame) == last  # full detail: one point per step
        for i in (0, last // 2, last - 1):
            step = int(frame["step"].iloc[i])
            assert same(ys[i], truth(db, fig, step, step)), (fig.name, step)

    # the run card: the same values as the trace's sums over the window it names
    (wlo, whi), values = cache.window(CARD_STEPS)
    card = json.dumps(kpis(cache.info, cache).to_plotly_json(), default=lambda o: o.to_plotly_json()
                      if hasattr(o, "to_plotly_json") else str(o))
    assert f"steps {wlo:,}..{whi:,}" in card
    for name in CARD_FIGURES:
        assert same(values.get(name), truth(db, figures.REGISTRY[name], wlo, whi)), name
        assert json.dumps(fmt(name, values.get(name))) in card, name

    # the efficiency table: whole-run figures
    eff = efficiency(cache.info.meta, cache.totals())
    for row, name in EFFICIENCY_FIGURES.items():
        if figures.applies(figures.REGISTRY[name], mode):
            assert same(eff[row], truth(db, figures.REGISTRY[name], 1, last)), row


def test_a_bucketed_sql_read_equals_the_in_memory_read(run, monkeypatch):
    root, d, mode = run
    every = ratio_spec(*figures.REGISTRY)
    memory = R.Runs(root).get(mode).frame(every, max_buckets=7)
    monkeypatch.setattr(R, "RAW_MAX_STEPS", 0)  # as for a large run: SQL aggregates, nothing held raw
    sql = R.Runs(root).get(mode).frame(every, max_buckets=7)
    assert len(sql) == len(memory) == 7
    stored = [c for c in every.resolve(memory.columns).sums]
    assert (sql[stored].fillna(0).to_numpy() == memory[stored].fillna(0).to_numpy()).all()  # sums: exact
    for fig in figures.available(memory.columns, mode):
        assert sql[fig.name].to_numpy() == pytest.approx(memory[fig.name].to_numpy(), rel=1e-9, nan_ok=True)
        if f"{fig.name}_min" in memory.columns:
            assert sql[f"{fig.name}_min"].to_numpy() == pytest.approx(memory[f"{fig.name}_min"].to_numpy(),
                                                                      rel=1e-9, nan_ok=True)
