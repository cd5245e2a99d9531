"""End to end in real headless chromium, on runs made by the trainer: the compare page puts a cached and a reencode
run side by side (coverage charts, the gradient-starvation finding), a live run's step count grows on screen and
polling stops when it ends, and a URL for a path outside --runs is refused."""

from __future__ import annotations

import math
import signal
import sqlite3
import subprocess
import time

import pytest

By = pytest.importorskip("selenium.webdriver.common.by", reason="dash[testing] (selenium) is not installed: "
                         "pip install -e '.[test]'").By

from dashboards.synthetic import write_synthetic


def card(browser, run: str):
    return browser.driver.find_element(By.CSS_SELECTOR, f"div[id*='cmp-card'][id*='\"{run}\"']")


def wait_until(check, timeout: float = 30, every: float = 0.3):
    deadline = time.time() + timeout
    while True:
        try:
            value = check()
            if value:
                return value
        except Exception:  # noqa: BLE001 - the page may be re-rendering
            pass
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {check.__doc__ or check}")
        time.sleep(every)


def test_runs_list_shows_both_runs_with_the_doctors_verdict(browser, served):
    browser.driver.get(served.url + "/")
    browser.wait_for_element("table.runs", timeout=30)
    rows = wait_until(lambda: {r.find_element(By.CSS_SELECTOR, ".run-name").text: r.text
                               for r in browser.driver.find_elements(By.CSS_SELECTOR, "tr.run-row")})
    assert "gradient-starvation" in rows["cached"] and "finished" in rows["cached"]
    assert "healthy" in rows["reencode"] and "40" in rows["reencode"]


def test_cached_and_reencode_side_by_side_show_coverage_and_the_starvation_finding(browser, served):
    browser.driver.get(served.url + "/compare?runs=cached,reencode")
    browser.wait_for_element("#efficiency", timeout=30)
    cached, reencode = card(browser, "cached"), card(browser, "reencode")
    for c in (cached, reencode):
        plot = c.find_element(By.CSS_SELECTOR, ".js-plotly-plot")
        assert plot.find_elements(By.CSS_SELECTOR, "g.trace.scatter path.js-line")  # lines drawn
        legend = " ".join(e.text for e in plot.find_elements(By.CSS_SELECTOR, ".legendtext"))
        assert "coverage" in legend and "reset fraction" in legend
    assert "gradient-starvation" in cached.text and "error" in cached.text
    assert "healthy" in reencode.text and "gradient-starvation" not in reencode.text
    assert "bad" in cached.get_attribute("class") and "good" in reencode.get_attribute("class")
    table = browser.driver.find_element(By.ID, "efficiency").text
    assert "encoder gradient coverage" in table and "25.0%" in table and "100.0%" in table
    overlay = browser.driver.find_element(By.CSS_SELECTOR, "#cmp-overlay .legendtext").text
    assert overlay in ("cached", "reencode")


def test_run_view_links_each_finding_to_its_step(browser, served):
    browser.driver.get(served.url + "/run/cached")
    browser.wait_for_element(".finding-gradient-starvation", timeout=30)
    link = browser.driver.find_element(By.CSS_SELECTOR, ".finding-gradient-starvation a.at")
    step = link.text.split()[1]
    assert link.get_attribute("href").endswith(f"/run/cached?step={step}")
    browser.wait_for_element("div[id*='step-graph'][id*='\"coverage\"'] .js-plotly-plot", timeout=30)
    link.click()
    wait_until(lambda: f"step={step}" in browser.driver.current_url)
    browser.wait_for_element(".finding-gradient-starvation", timeout=30)


def test_a_live_runs_step_count_grows_on_screen_and_polling_stops_when_it_ends(browser, served, runs_root, helpers):
    run = runs_root / "live"
    proc = subprocess.Popen(helpers.train_cmd(run, 5000), env=helpers.env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        def started():
            """the trainer's first flushed rows"""
            conn = sqlite3.connect(f"file:{run / 'trace.sqlite'}?mode=ro", uri=True, timeout=1)
            try:
                return (conn.execute("SELECT MAX(step) FROM steps").fetchone()[0] or 0) > 0
            finally:
                conn.close()

        wait_until(started, timeout=60)
        browser.driver.get(served.url + "/run/live")
        browser.wait_for_element("#run-steps", timeout=30)
        first = int(browser.driver.find_element(By.ID, "run-steps").text.replace(",", ""))

        def grew():
            """the step count on screen to grow without a reload"""
            return int(browser.driver.find_element(By.ID, "run-steps").text.replace(",", "")) > first

        wait_until(grew, timeout=30)
        assert "live" in browser.driver.find_element(By.CSS_SELECTOR, ".run-head .status").text
        proc.send_signal(signal.SIGINT)  # the trainer stops cleanly and marks the run stopped
        proc.wait(timeout=60)

        def ended():
            """the status to read 'stopped' (the last refresh before polling stops)"""
            return "stopped" in browser.driver.find_element(By.CSS_SELECTOR, ".run-head .status").text

        wait_until(ended, timeout=30)
        shown = browser.driver.find_element(By.ID, "run-steps").text
        time.sleep(3)  # polling has stopped: nothing changes any more
        assert browser.driver.find_element(By.ID, "run-steps").text == shown
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_url_for_a_path_outside_runs_is_refused(browser, served, runs_root):
    secret = runs_root.parent / "outside-run"
    if not secret.exists():
        write_synthetic(secret, 30, timings=False, preset="secret-preset")
    for path in ("/run/..%2Foutside-run", f"/run/{'%2F'.join(str(secret).split('/'))}",
                 "/compare?runs=..%2Foutside-run"):
        browser.driver.get(served.url + path)
        browser.wait_for_element(".refused-card", timeout=30)
        assert "Refused" in browser.driver.find_element(By.CSS_SELECTOR, ".refused-card").text
        assert "secret-preset" not in browser.driver.page_source


def test_a_corrupt_run_shows_an_error_card_and_the_app_keeps_working(browser, served, runs_root):
    broken = runs_root / "broken"
    broken.mkdir(exist_ok=True)
    (broken / "trace.sqlite").write_bytes(b"SQLite format 3\x00" + b"\xff" * 4000)  # a torn header
    browser.driver.get(served.url + "/run/broken")
    browser.wait_for_element(".error-card", timeout=30)
    assert "could not be read" in browser.driver.find_element(By.CSS_SELECTOR, ".error-card").text
    browser.driver.get(served.url + "/")
    rows = wait_until(lambda: {r.find_element(By.CSS_SELECTOR, ".run-name").text: r.text
                               for r in browser.driver.find_elements(By.CSS_SELECTOR, "tr.run-row")})
    assert "unreadable" in rows["broken"] and "healthy" in rows["reencode"]


# ------------------------------------------------------------------------------------------------------------------
# Charts that read well, as drawn: four runs (a cached and a reencode run, a copy of the reencode run whose lines
# are the same, and a TRM run)

@pytest.fixture(scope="module")
def four(runs_root, helpers, tmp_path_factory):
    import shutil

    root = tmp_path_factory.mktemp("four")
    for name in ("cached", "reencode"):
        shutil.copytree(runs_root / name, root / name)
    shutil.copytree(runs_root / "reencode", root / "reencode-again")
    cmd = helpers.train_cmd(root / "trm", 40)
    cmd[cmd.index("demo")] = "demo-trm"
    out = subprocess.run(cmd, env=helpers.env(), capture_output=True, text=True, timeout=180)
    assert out.returncode in (0, 1), out.stdout[-2000:] + out.stderr[-2000:]
    s = helpers.Served(root)
    yield s
    s.stop()


RECTS = """
const out = [];
for (const el of arguments[0].querySelectorAll(arguments[1])) {
  const r = el.getBoundingClientRect();
  out.push({text: el.textContent, left: r.left, right: r.right, top: r.top, bottom: r.bottom});
}
return out;"""


def rects(browser, root, css: str) -> list[dict]:
    return browser.driver.execute_script(RECTS, root, css)


def overlap(a: dict, b: dict) -> bool:
    return a["left"] < b["right"] and b["left"] < a["right"] and a["top"] < b["bottom"] and b["top"] < a["bottom"]


def open_compare(browser, served, runs: str):
    browser.driver.get(served.url + f"/compare?runs={runs}")
    browser.wait_for_element("#efficiency", timeout=30)
    wait_until(lambda: len(browser.driver.find_elements(By.CSS_SELECTOR, ".run-card .js-plotly-plot .bartext"))
               >= 2 * len(runs.split(",")))


def swatches(browser) -> dict[str, str]:
    return {c.find_element(By.CSS_SELECTOR, ".name").text:
            c.find_element(By.CSS_SELECTOR, ".swatch").value_of_css_property("background-color")
            for c in browser.driver.find_elements(By.CSS_SELECTOR, ".run-card")}


def test_a_four_run_compare_reads_well(browser, four):
    """Every chart titles its step axis; each card's bar labels and caption sit apart and inside the chart; the
    findings keep the card's width; the overlay keeps the two identical reencode lines apart and says so."""
    open_compare(browser, four, "cached,reencode,reencode-again,trm")
    cards = browser.driver.find_elements(By.CSS_SELECTOR, ".run-card")
    assert len(cards) == 4
    for c in cards:
        plot = c.find_element(By.CSS_SELECTOR, ".js-plotly-plot")
        assert plot.find_element(By.CSS_SELECTOR, ".g-xtitle").text == "step"
        labels = rects(browser, plot, ".x2tick text") + rects(browser, plot, ".bartext")
        assert len(labels) == 4  # two tick labels, two value labels
        for i, a in enumerate(labels):
            for b in labels[i + 1:]:
                assert not overlap(a, b), (a, b)
        svg = rects(browser, plot, "svg.main-svg")[0]
        caption = rects(browser, plot, ".g-x2title text")
        assert caption and "mean of" in caption[0]["text"] and "shown steps" in caption[0]["text"]
        for r in caption + labels:  # nothing clipped by the chart's edges
            assert svg["left"] + 1 <= r["left"] and r["right"] <= svg["right"] - 1, r
            assert svg["top"] + 1 <= r["top"] and r["bottom"] <= svg["bottom"] - 1, r
    starved = card(browser, "cached").find_element(By.CSS_SELECTOR, ".finding-gradient-starvation")
    msg = rects(browser, starved, ".msg")[0]
    li = rects(browser, starved.find_element(By.XPATH, ".."), ".finding-gradient-starvation")[0]
    assert msg["right"] - msg["left"] >= 0.9 * (li["right"] - li["left"])  # a line of its own, not a column
    overlay = browser.driver.find_element(By.ID, "cmp-overlay")
    assert overlay.find_element(By.CSS_SELECTOR, ".g-xtitle").text == "step"
    assert "identical lines: reencode = reencode-again" in overlay.text
    dashes = browser.driver.execute_script(
        "return Array.from(arguments[0].querySelectorAll('g.trace.scatter path.js-line'))"
        ".map(p => p.style.strokeDasharray || '')", overlay)
    assert any(d and d != "none" for d in dashes)  # the duplicate drawn dashed on top of the first
    assert overlay.find_elements(By.CSS_SELECTOR, "g.trace.scatter .points path")  # with markers


def test_a_run_keeps_its_colour_across_selections(browser, four):
    open_compare(browser, four, "cached,reencode,trm")
    first = swatches(browser)
    open_compare(browser, four, "trm,reencode")
    again = swatches(browser)
    assert again == {n: first[n] for n in ("trm", "reencode")}
    legend = browser.driver.execute_script(
        "const gd = document.querySelector('#cmp-overlay .js-plotly-plot');"
        "return gd.data.filter(t => t.showlegend !== false).map(t => [t.name, t.line.color]);")
    assert len(legend) == 2 and len({c for _, c in legend}) == 2


def axis_texts(browser, fig: str, css: str) -> list[str]:
    plot = browser.driver.find_element(By.CSS_SELECTOR, f"div[id*='step-graph'][id*='\"{fig}\"'] .js-plotly-plot")
    return [e.text for e in plot.find_elements(By.CSS_SELECTOR, css) if e.text]


def open_tab(browser, served, run: str, tab: str, fig: str):
    browser.driver.get(served.url + f"/run/{run}?tab={tab}")
    browser.wait_for_element(f"div[id*='step-graph'][id*='\"{fig}\"'] .js-plotly-plot .ytick", timeout=30)


def test_run_view_axes_read_plainly(browser, four):
    """steps/s ticks are plain numbers (it drew "631m"), the gradient-norm log axis has 1-2-5 ticks, every chart
    titles its step axis, and exact accuracy's axis ends where its values live (0-10% for a tiny run)."""
    open_tab(browser, four, "reencode", "timing", "timing-detail")
    rate = axis_texts(browser, "timing-detail", ".y2tick text")
    assert rate and all(t.replace(",", "").replace(".", "", 1).isdigit() for t in rate), rate
    open_tab(browser, four, "reencode", "coverage", "grad-norm")
    ticks = axis_texts(browser, "grad-norm", ".ytick text")
    assert len(ticks) >= 2 and all(float(t) / 10 ** math.floor(math.log10(float(t))) in (1, 2, 5)
                                   for t in ticks), ticks
    open_tab(browser, four, "reencode", "overview", "accuracy")
    for fig in ("coverage", "loss", "accuracy", "halting", "timing"):
        assert axis_texts(browser, fig, ".g-xtitle text") == ["step"], fig
    shown = browser.driver.execute_script(
        "const gd = document.querySelector(\"div[id*='step-graph'][id*='accuracy'] .js-plotly-plot\");"
        "return [gd.layout.yaxis.range[1], Math.max(...gd.data.flatMap(t => t.y.filter(v => v !== null)))];")
    top = max(float(t.rstrip("%")) for t in axis_texts(browser, "accuracy", ".ytick text")) / 100
    assert shown[1] <= top < 1 and top <= next(t for t in (0.1, 0.25, 0.5, 1.0) if shown[1] <= t / 1.05), shown


def test_trm_runs_say_puzzle_table_rows(browser, four):
    open_tab(browser, four, "trm", "coverage", "grad-norm")
    legend = axis_texts(browser, "grad-norm", ".legendtext")
    assert "puzzle-table rows" in legend and "encoder" not in legend
    assert "puzzle-table row" in browser.driver.find_element(By.CSS_SELECTOR, ".kpis").text.lower()
    open_tab(browser, four, "reencode", "coverage", "grad-norm")
    assert "encoder" in axis_texts(browser, "grad-norm", ".legendtext")
def test_samples_tab_shows_the_ledger_per_task_sortable_with_its_charts(browser, served, runs_root):
    """The per-sample ledger's tab: the per-task table (values those of ``load_task_stats``; sorting by a column
    reorders it), the calibration diagram and the halting-step histogram drawn, halt reasons over time, and the
    evaluation audits' exact-per-ACT-step curve."""
    from diagnostics import load_task_stats

    stats = load_task_stats(runs_root / "reencode")
    assert len(stats) > 1
    browser.driver.get(served.url + "/run/reencode")
    browser.wait_for_element("#run-tab", timeout=30)
    tab = wait_until(lambda: [t for t in browser.driver.find_elements(By.CSS_SELECTOR, "#run-tab .tab")
                              if t.text.strip() == "Samples"])
    tab[0].click()
    browser.wait_for_element("#samples-table", timeout=30)
    heads = browser.driver.find_element(By.ID, "samples-table").text
    for label in ("SAMPLES SEEN", "MEAN HALT STEP", "EXACT RATE", "CALIBRATION ERROR"):
        assert label in heads.upper(), heads

    def column(name: str) -> list[str]:
        return [td.text for td in browser.driver.find_elements(
            By.CSS_SELECTOR, f"#samples-table td[data-dash-column='{name}']")]

    shown = wait_until(lambda: column("samples"))
    top = sorted(stats["samples"].astype(int).tolist(), reverse=True)[:len(shown)]
    assert [int(v) for v in shown] == top  # sorted by samples seen, most first, as the trace's task stats say
    sort = browser.driver.find_element(
        By.CSS_SELECTOR, "#samples-table th[data-dash-column='mean_halt_step'] .column-header--sort")
    sort.click()

    def ascending():
        """the table re-sorted by mean halt step"""
        v = [float(x) for x in column("mean_halt_step")]
        return v if v == sorted(v) and v[0] == round(stats["mean_halt_step"].min(), 2) else None

    wait_until(ascending)
    for fig in ("calibration", "halt-steps"):
        plot = browser.wait_for_element(f"div[id*='samples-graph'][id*='\"{fig}\"'] .js-plotly-plot", timeout=30)
        assert plot.find_elements(By.CSS_SELECTOR, "g.trace")
    reasons = browser.wait_for_element("div[id*='step-graph'][id*='\"halt-reasons\"'] .js-plotly-plot", timeout=30)
    legend = " ".join(e.text for e in reasons.find_elements(By.CSS_SELECTOR, ".legendtext"))
    assert "Q-halt" in legend and "max step" in legend
    curve = browser.wait_for_element("div[id*='samples-graph'][id*='\"eval-per-step\"'] .js-plotly-plot", timeout=30)
    assert "exact accuracy at each ACT step" in curve.text  # the evaluation audits' curve (an eval at the last step)
    assert curve.find_elements(By.CSS_SELECTOR, "g.trace")
