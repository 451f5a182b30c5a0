"""Tests of what makes training ready for a GPU, across modules: the host-overhead part of the train benchmark."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["jax", "tensorflow"])
def test_train_benchmark_host_part_runs_and_prints_both_paths(backend):
    """`benchmarks.train --smoke --host-only` times both ways of feeding and checking a step on this backend and
    prints ms/step, bytes per batch and the before / after ratio (the figures themselves are not asserted)."""
    pytest.importorskip(backend)
    result = subprocess.run([sys.executable, "-m", "benchmarks.train", "--smoke", "--host-only"],
                            capture_output=True, text=True, timeout=900, cwd=ROOT,
                            env={**os.environ, "KERAS_BACKEND": backend})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert re.search(rf"^6\. host time per step \({backend}, 64 images of 32 px, trivially cheap model; "
                     r"readback every \d+ steps\):$", out, re.M), out
    rows = {}
    for name in ("float32 + readback every step", "uint8 + periodic readback", "float32 + periodic readback",
                 "uint8 + readback every step"):
        row = re.search(rf"^  {re.escape(name)} +([\d.]+) ms/step wall, +([\d.]+) ms/step CPU, ([\d.]+) MB per "
                        r"batch to the device$", out, re.M)
        assert row, out
        rows[name] = [float(v) for v in row.groups()]
        assert rows[name][0] > 0 and rows[name][1] > 0
    # 64 x 32 x 32 x 3 pixels: 4 bytes each as float32, 1 as uint8.
    assert {name: row[2] for name, row in rows.items()} == {
        "float32 + readback every step": 0.79, "uint8 + periodic readback": 0.20,
        "float32 + periodic readback": 0.79, "uint8 + readback every step": 0.20}
    assert re.search(r"^  before / after: [\d.]+x wall, [\d.]+x CPU, 4x bytes$", out, re.M), out
