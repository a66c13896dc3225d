"""Progress off a terminal: plain lines a log file can show, not a silent live display."""

from __future__ import annotations

from rich.progress import Progress

from safetypatch.cli import _app


def test_progress_off_a_terminal_prints_a_line_per_tenth_and_at_the_end(monkeypatch):
    clock = iter(float(t) for t in range(0, 10_000, 5))
    monkeypatch.setattr(_app.time, "monotonic", lambda: next(clock))
    bars = _app.TaskBars(Progress(disable=True))
    with _app.console.capture() as captured:
        for step in range(0, 101):
            bars("train", step, 100)
        bars("retain answers", 3, None)
    lines = captured.get().splitlines()
    assert lines[0] == "train: 0/100 (0 %), 0.0 min"
    assert [line.split(":")[1].split(",")[0].strip() for line in lines[:12]] == [
        f"{k}/100 ({k} %)" for k in (0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100)] + ["3"]
    assert "min left" in lines[1] and "left" not in lines[10] and lines[11].startswith("retain answers: 3")


def test_progress_off_a_terminal_also_prints_every_minute(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(_app.time, "monotonic", lambda: now[0])
    bars = _app.TaskBars(Progress(disable=True))
    with _app.console.capture() as captured:
        for step, t in ((0, 0), (1, 30), (2, 61), (3, 90), (4, 122)):
            now[0] = float(t)
            bars("eval harmbench", step, 1000)
    assert len(captured.get().splitlines()) == 3  # at 0 s, 61 s and 122 s
