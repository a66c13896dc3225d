"""PNG figures: valid, non-trivial images; nothing to draw is an error, not an empty picture."""

from __future__ import annotations

import subprocess
import sys

import pytest

from safetypatch.errors import DataError, OutputExistsError
from safetypatch.eval.metrics import MetricValue
from safetypatch.eval.results import ResultsBuilder, read_results
from safetypatch.report.plots import bar_chart, run_names, scatter_plot, write_png
from safetypatch.report.summary import summarize
from safetypatch.report.tables import compare

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(png: bytes, min_width: int = 500) -> None:
    """A PNG with its signature, an IHDR chunk, a sensible size and real content."""
    assert png[:8] == PNG_SIGNATURE and png[12:16] == b"IHDR"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width >= min_width and height >= 400
    assert len(png) > 20_000


def test_bar_chart_and_scatter(before_after, tmp_path):
    # "$" must not start matplotlib mathtext (an unbalanced one would fail at draw time).
    table = compare([read_results(p) for p in before_after], labels=["base $x", "patched"])
    bars = bar_chart(table)
    assert_png(bars)
    assert_png(scatter_plot(summarize(table)))
    path = write_png(bars, tmp_path / "bars.png")
    assert path.read_bytes() == bars
    with pytest.raises(OutputExistsError):
        write_png(b"other", path)
    assert path.read_bytes() == bars


def test_nothing_to_draw(write_results):
    builder = ResultsBuilder("org/drift-only", device="cpu").add_task("benign-drift", version=1, n_samples=64)
    builder.add_metric("benign-drift", "kl", "none", MetricValue(0.02, None, None, None, 64), False)
    table = compare([read_results(write_results(builder, "drift"))])
    with pytest.raises(DataError, match="nothing to draw as bars"):
        bar_chart(table)
    with pytest.raises(DataError, match="nothing to draw as safety versus capability"):
        scatter_plot(summarize(table))


def test_run_names():
    assert run_names(["a"]) == ["a"]
    assert run_names(["a", "b"]) == ["before: a", "after: b"]
    assert run_names(["a", "b", "c"]) == ["before: a", "b", "c"]


def test_matplotlib_is_imported_lazily():
    code = "import sys, safetypatch.report; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_bar_chart_draws_out_of_family_tasks_in_panels_of_their_own(write_results, monkeypatch):
    from safetypatch.report import plots

    builder = ResultsBuilder("org/families", device="cpu")
    tasks = (("harmbench", "in", "refusal_rate"), ("strongreject", "out", "refusal_rate"),
             ("harmbench-dev", "dev", "refusal_rate"), ("xstest-safe", "out", "over_refusal_rate"))
    for task, family, metric in tasks:
        builder.add_task(task, version=1, n_samples=40, config={"family": family})
        builder.add_metric(task, metric, "keyword_v2_w256", MetricValue(0.5, 0.08, 0.35, 0.65, 40), True)
    drawn = []
    monkeypatch.setattr(plots, "_bar_panel", lambda ax, rows, n, title, ylabel: drawn.append(
        (title.split(":")[0], [row.task for row in rows])))
    plots.bar_chart(compare([read_results(write_results(builder, "families"))]))
    assert drawn == [("Safety", ["harmbench", "harmbench-dev"]), ("Safety out-of-family", ["strongreject"]),
                     ("Over-refusal out-of-family", ["xstest-safe"])]
