"""The benchmark runs end to end (`bench/run.py --smoke`: a few images per class, 32 px, 1 epoch
per phase) and writes a report with every section filled with numbers. The full benchmark is
not a test; this only checks the machinery."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import SHARED_DATASETS

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `bench` is imported by the tests below
FLOWERS = SHARED_DATASETS / "flowers"
NUMBER = re.compile(r"\d+(\.\d+)?")


def _row(report: str, starts: str) -> list[str]:
    """The cells of the first table row whose first cell starts with `starts`."""
    for line in report.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0].startswith(starts):
            return cells
    raise AssertionError(f"no table row starting with {starts!r}")


def _section(report: str, title: str) -> str:
    parts = report.split(f"## {title}", 1)
    assert len(parts) == 2, f"section {title!r} missing"
    return parts[1].split("\n## ", 1)[0]


@pytest.mark.timeout(960)  # a hang fails here; how long it took is judged in bench/
def test_bench_smoke_writes_every_section_with_numbers(tmp_path):
    out, results = tmp_path / "BENCH.md", tmp_path / "results.json"
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "bench/run.py", "--data", str(FLOWERS), "--smoke", "--out", str(out),
                           "--results", str(results)],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    # The time is for the reader of the test log; how fast it ran is judged in bench/, not here.
    print(f"smoke bench took {time.monotonic() - started:.0f} s")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = out.read_text()

    for field in ("**Date**", "**Machine**", "**Command**", "**Data**", "**Recipe (both sides)**"):
        assert field in report
    assert "--smoke" in report

    side = _section(report, "Side by side")
    for name in ("head phase wall", "fine-tune phase wall", "whole job", "test accuracy", "test macro F1",
                 "peak RSS, process tree", "time to the baseline's final val accuracy"):
        cells = _row(side, name)
        assert NUMBER.fullmatch(cells[1].replace(",", "")), (name, cells)  # baseline
        assert NUMBER.search(cells[2]), (name, cells)  # tlcore (a number, or 'not reached')
    assert NUMBER.search(_row(side, "whole job")[3])  # the ratio
    assert "Feature cache reused by that run: not measured" in side  # the smoke run has no features-cached side

    # The "tlcore, features cached" side (a second tlcore job in the same data home) is the measurement
    # above made again, so the smoke run leaves it out; its column, epochs and target row are rendered
    # here from this run's own side, as that job reports it (every feature reused).
    from bench.run import build_report

    measured = json.loads(results.read_text())
    assert measured["tlcore_warm"] is None
    tl = measured["tlcore"]
    warm = {**tl, "summary": {**tl["summary"], "timings": {**tl["summary"]["timings"], "features_reused": True}}}
    # Likewise a fraction's scale row is the same measurement on a subset (one more training process each):
    # this run stands in for half the data.
    half = {**measured["scale"][-1], "fraction": "0.5", "images": measured["scale"][-1]["images"] // 2}
    rebuilt = build_report({**measured, "tlcore_warm": warm, "scale": [half, *measured["scale"]]})
    rebuilt_side = _section(rebuilt, "Side by side")
    assert _row(rebuilt_side, "")[4] == "tlcore, features cached", _row(rebuilt_side, "")
    for name in ("head phase wall", "fine-tune phase wall", "whole job", "test accuracy"):
        assert NUMBER.fullmatch(_row(rebuilt_side, name)[4].replace(",", "")), (name, _row(rebuilt_side, name))
    for name in ("head phase wall", "whole job"):
        assert NUMBER.search(_row(rebuilt_side, name)[5]), (name, _row(rebuilt_side, name))  # ratio vs the baseline
    warm_hit = _row(rebuilt_side, "time to the baseline's head val accuracy")[4]
    assert warm_hit == "not reached" or NUMBER.fullmatch(warm_hit.replace(",", "")), warm_hit
    assert "Feature cache reused by that run: yes" in rebuilt_side

    efficiency = _section(report, "Pipeline efficiency")
    assert re.search(r"forward .*\*\*[\d.]+ img/s\*\*.*\*\*[\d.]+ img/s\*\*", efficiency, re.S)
    assert NUMBER.search(_row(efficiency, "tlcore feature extraction")[-1])
    assert NUMBER.search(_row(efficiency, "tlcore fine-tune epoch 1")[-1])

    demo = _section(report, "Demo latency").splitlines()
    separator = next(i for i, line in enumerate(demo) if line.startswith("|---"))
    cells = [c.strip() for c in demo[separator + 1].strip().strip("|").split("|")]
    assert len(cells) == 5 and all(NUMBER.fullmatch(c) for c in cells), cells  # load, cold, p50, p95, n

    scale = _section(report, "Scale")
    assert all(NUMBER.search(c) for c in _row(scale, "1")), _row(scale, "1")
    for fraction in ("0.5", "1"):
        cells = _row(_section(rebuilt, "Scale"), fraction)
        assert all(NUMBER.search(c) for c in cells), cells

    capped = scale.split("### Under a memory limit", 1)[1]
    if "Not measured:" not in capped:  # needs a memory cgroup the bench may create
        lines = capped.splitlines()
        row = lines[next(i for i, line in enumerate(lines) if line.startswith("|---")) + 1]
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        assert NUMBER.fullmatch(cells[0]) and cells[1] == "yes" and cells[-1] == "0", cells  # finished, no OOM kill

    targets = _section(report, "Targets")
    for name in ("head phase", "whole job", "feature extraction", "fine-tune epoch", "demo p50"):
        assert _row(targets, name)[-1] in ("yes", "no")
    cold = _row(targets, "head phase ≥ 10× faster to the same val accuracy, cold cache")
    assert cold[-1] in ("yes", "no") and "at most" in cold[1], cold  # the measured lower-bound explanation
    warm_target = _row(_section(rebuilt, "Targets"),
                       "head phase ≥ 10× faster to the same val accuracy, features cached")
    assert warm_target[-1] in ("yes", "no"), warm_target

    epochs = _section(rebuilt, "Per-epoch log")
    for side_name, phase in (("baseline", "head"), ("baseline", "finetune"), ("tlcore", "head"),
                             ("tlcore", "finetune"), ("tlcore, features cached", "head"),
                             ("tlcore, features cached", "finetune")):
        assert re.search(rf"\| {side_name} \| {phase} \| 1 \| [\d.]+ \| [\d.]+ \|", epochs), (side_name, phase)


def test_the_memory_cap_kills_a_process_over_its_limit_and_spares_one_under_it():
    """`bench.memcap.MemoryCap`, the limit the full benchmark's capped side runs under (the smoke run skips
    that side): a child that fills 200 MB of anonymous memory under a 96 MB cap is killed, one filling 16 MB
    is not, and the cgroup reports the kill."""
    from bench.memcap import MemoryCap

    fill = "import sys; block = bytearray(int(sys.argv[1]) * 2**20); block[::4096] = b'x' * len(block[::4096])"
    outcomes = {}
    for mb in (16, 200):
        cap = MemoryCap(96, f"tltest-{os.getpid()}-{mb}")
        try:
            child = subprocess.run([sys.executable, "-c", fill, str(mb)], preexec_fn=cap.enter, timeout=60)
            outcomes[mb] = (child.returncode, cap.stats())
        finally:
            cap.close()
    assert outcomes[16][0] == 0 and outcomes[16][1]["oom_kills"] == 0
    assert outcomes[200][0] == -9 and outcomes[200][1]["oom_kills"] >= 1, outcomes[200]


def test_the_scale_runs_take_each_class_s_share_and_reuse_the_converted_weights(tmp_path):
    """`bench/run.py`'s scale side: a fraction keeps that share of every class (rounded up, first by name), and a
    fraction's data home gets the main home's converted weights instead of converting them again."""
    from bench.run import prepare_weights, subset_copy

    source = tmp_path / "source"
    for label, count in (("a", 5), ("b", 2)):
        (source / label).mkdir(parents=True)
        for i in range(count):
            (source / label / f"{i}.jpg").write_bytes(b"x")
    (source / "a" / "notes.txt").write_text("not an image")
    half = subset_copy(source, tmp_path / "half", fraction=0.5)
    assert {p.name: sorted(f.name for f in p.iterdir()) for p in half.iterdir()} == {"a": ["0.jpg", "1.jpg", "2.jpg"],
                                                                                     "b": ["0.jpg"]}
    template = tmp_path / "home-main"
    (template / "weights" / "lite").mkdir(parents=True)
    (template / "weights" / "lite" / "lite0.npz").write_bytes(b"converted")
    copied = prepare_weights(tmp_path / "home-0.5", template=template)
    assert (copied / "lite" / "lite0.npz").read_bytes() == b"converted"
