"""Part 5 of bench-train: the NumPy input pipeline's images/s per core on aligned crops beside the originals.

The align step (mtcnn) turns the demo's 250x250 images into small aligned
crops, so the input pipeline decodes far fewer pixels per image. Both datasets
come from the same demo archive through `harness.prepare_data` (with and
without `align`), and the same P x K batches are timed in alternating rounds.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from benchmarks.harness import DataPaths, med, prepare_data, tree_cpu_seconds
from facenet_kfp.config import DataConfig
from facenet_kfp.numpy_input import TrainBatches, open_split

def compare_aligned_input(plan: Any, data: DataPaths, aligned: DataPaths) -> dict[str, np.ndarray]:
    """CPU seconds of `plan.input_batches` P x K batches from `TrainBatches` over the demo's 250x250 originals
    and over the same faces aligned by the align step (`aligned`), in alternating rounds (the order rotates)."""
    m, rounds = plan.model, plan.input_rounds
    sources = {"originals": data, "aligned": aligned}
    cpu = {name: np.zeros(rounds) for name in sources}
    for r in range(rounds):
        for name in (list(sources) if r % 2 == 0 else list(sources)[::-1]):
            with open_split(*sources[name].split_folders(), "train") as split, \
                    TrainBatches(split, split.labels, m.p, m.k, m.image_size, m.crop_fraction, m.augment, 200 + r,
                                 workers=plan.workers) as stream:
                for _ in range(3):
                    next(stream)
                start = tree_cpu_seconds()
                for _ in range(plan.input_batches):
                    next(stream)
                cpu[name][r] = tree_cpu_seconds() - start
        print(f"  aligned vs originals: round {r + 1}/{rounds}", flush=True)
    return cpu


def report_aligned_input(plan: Any, cpu: dict[str, np.ndarray], aligned: DataPaths) -> None:
    """Section 5: the NumPy pipeline's images/s per core on aligned crops beside the 250x250 originals."""
    images, m = plan.input_batches * plan.batch, plan.model
    size = json.loads((aligned.images / "dataset.json").read_text())["alignment"]["size"]
    print(f"\n5. facenet_kfp.numpy_input on aligned crops ({size}x{size} JPEG, the align step's output) beside the "
          f"250x250 originals: crop {m.crop_fraction}, resize to {m.image_size}, augmented; "
          f"{plan.input_batches} batches per round, {len(cpu['aligned'])} rounds, medians")
    for name, seconds in cpu.items():
        print(f"  {name:<10} {med(images / seconds):8.0f} images/s per core")
    ratios = cpu["originals"] / cpu["aligned"]
    print(f"  per-core rate, aligned / originals: {med(ratios):.2f} (median of per-round ratios; range "
          f"{ratios.min():.2f}-{ratios.max():.2f})")


def aligned_data(plan: Any, identities: int) -> DataPaths | None:
    """The demo data with the align step (mtcnn) after extract, or None (said) where mtcnn is not installed."""
    try:
        import mtcnn  # noqa: F401
    except ImportError:
        print("5. aligned crops: skipped, the align step needs the mtcnn package (the train extra)")
        return None
    return prepare_data(plan.work, plan.work / "work-aligned", identities=identities,
                        data=DataConfig(multiple=plan.model.k), align=True)


def aligned_section(plan: Any, data: DataPaths, identities: int) -> None:
    """Part 5, measured and printed when the align step can run here (`identities`: the demo archive's)."""
    aligned = aligned_data(plan, identities)
    if aligned is not None:
        report_aligned_input(plan, compare_aligned_input(plan, data, aligned), aligned)
