"""Training history and the reports' matplotlib figures: history.json reading, training curves, ROC, histograms.

Figures are matplotlib ``Figure`` objects (no display, no global pyplot state),
matplotlib is imported only when one is drawn; `report.figure_data_uri` embeds them.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from facenet_kfp.errors import InputError
from facenet_kfp.fsutil import read_json

HISTORY_JSON = "history.json"
CURVES_PNG = "curves.png"
# Keys naming the x axis of a history, in order of preference.
STEP_KEYS = ("step", "steps", "epoch", "epochs")


# ----------------------------------------------------------------------------- training history

def load_training_history(model_dir: str | os.PathLike, required: bool = True
                          ) -> tuple[dict[str, Any] | None, bytes | None]:
    """(history.json content, curves.png bytes) of a model folder; either is None when absent.

    With `required`, a missing history.json raises InputError naming it.
    """
    model_dir = Path(model_dir)
    path = model_dir / HISTORY_JSON
    history = None
    if path.is_file():
        history = read_json(path)
        if not isinstance(history, dict):
            raise InputError(f"{path}: expected a JSON object of training series, got "
                             f"{type(history).__name__}")
    elif required:
        raise InputError(f"{path}: not found; the model folder has no training history "
                         f"(is {model_dir} a model folder from train?)")
    curves = model_dir / CURVES_PNG
    return history, (curves.read_bytes() if curves.is_file() else None)


def _numbers(values: Any) -> bool:
    return (isinstance(values, list) and len(values) > 0
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) or v is None for v in values))


def history_series(history: dict[str, Any], where: str = HISTORY_JSON
                   ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Training series as {name: (x [n], y [n])} from a history.json object.

    Two layouts are read:

    * columns: ``{"step": [...], "loss": [...], ...}`` (Keras-like), optionally
      grouped, e.g. ``{"train": {"step": [...], "loss": [...]}, "val": {...}}``;
      a group's x axis is its "step" (or "steps", "epoch") list when of equal
      length, else 0, 1, 2...;
    * records: ``{"train": [{"step": 20, "loss": 0.3, ...}, ...], "val": [...]}``.

    Nested groups prefix their series names (``val/loss``). Non-numeric and
    None values are skipped. Raises InputError when no numeric series is found.
    """
    series: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def add_columns(prefix: str, columns: dict[str, Any]) -> None:
        lists = {k: v for k, v in columns.items() if _numbers(v)}
        x_key = next((k for k in STEP_KEYS if k in lists), None)
        for key, values in lists.items():
            if key == x_key:
                continue
            if x_key is not None and len(lists[x_key]) == len(values):
                x = np.asarray(lists[x_key], dtype=np.float64)
            else:
                x = np.arange(len(values), dtype=np.float64)
            y = np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)
            keep = np.isfinite(y)
            if keep.any():
                series[prefix + key] = (x[keep], y[keep])
        for key, value in columns.items():
            if isinstance(value, dict):
                add_columns(f"{prefix}{key}/", value)
            elif isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
                add_records(f"{prefix}{key}/", value)

    def add_records(prefix: str, records: list[dict[str, Any]]) -> None:
        x_key = next((k for k in STEP_KEYS if all(k in r for r in records)), None)
        names = sorted({k for r in records for k, v in r.items()
                        if k != x_key and isinstance(v, (int, float)) and not isinstance(v, bool)})
        for name in names:
            points = [(float(r[x_key]) if x_key else float(i), float(r[name]))
                      for i, r in enumerate(records)
                      if isinstance(r.get(name), (int, float)) and not isinstance(r.get(name), bool)]
            x = np.asarray([p[0] for p in points])
            y = np.asarray([p[1] for p in points])
            keep = np.isfinite(y)
            if keep.any():
                series[prefix + name] = (x[keep], y[keep])

    add_columns("", history)
    if not series:
        raise InputError(f"{where}: no numeric training series found (keys: {', '.join(sorted(history))})")
    return series


def _metric_group(name: str) -> str:
    """Series sharing a panel: the name without its split prefix (val/loss, val_loss, loss -> loss)."""
    base = name.rsplit("/", 1)[-1]
    return re.sub(r"^(train|val|validation)_", "", base)


def history_figure(series: dict[str, tuple[np.ndarray, np.ndarray]]) -> Any:
    """One panel per metric (train and validation curves together), up to 3 panels per row."""
    from matplotlib.figure import Figure

    groups: dict[str, list[str]] = {}
    for name in series:
        groups.setdefault(_metric_group(name), []).append(name)
    cols = min(3, len(groups))
    rows = math.ceil(len(groups) / cols)
    fig = Figure(figsize=(4.6 * cols, 3.2 * rows))
    for i, (group, names) in enumerate(groups.items(), start=1):
        ax = fig.add_subplot(rows, cols, i)
        for name in names:
            x, y = series[name]
            style = "o-" if x.size <= 30 else "-"
            ax.plot(x, y, style, markersize=3, linewidth=1.2, label=name)
        ax.set_title(group)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(names) > 1:
            ax.legend(loc="upper right", fontsize=8)
    # Fixed margins in inches (tight_layout re-measures every label: slow).
    height = 3.2 * rows
    fig.subplots_adjust(left=0.6 / (4.6 * cols), right=0.98, bottom=0.5 / height,
                        top=1 - 0.35 / height, wspace=0.28, hspace=0.5)
    return fig


# ----------------------------------------------------------------------------- evaluation figures

def roc_figure(rocs: dict[str, tuple[Sequence[float], Sequence[float]]]) -> Any:
    """ROC curves (VAL against FAR): linear axes, and a log FAR axis for the low-FAR end."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig = Figure(figsize=(10, 4.2))
    linear, log_ax = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for label, (fpr, tpr) in rocs.items():
        fpr, tpr = np.asarray(fpr), np.asarray(tpr)
        linear.plot(fpr, tpr, label=label, linewidth=1.5)
        positive = fpr > 0
        log_ax.plot(fpr[positive], tpr[positive], label=label, linewidth=1.5)
    linear.plot([0, 1], [0, 1], ":", color="grey", linewidth=1)
    linear.set_xlim(0, 1)
    linear.set_ylim(0, 1.01)
    linear.set_title("ROC")
    log_ax.set_xscale("log")
    # Plain tick labels ("0.001"): mathtext "10^-3" labels take most of the drawing time.
    log_ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    log_ax.xaxis.set_minor_formatter(NullFormatter())
    log_ax.set_ylim(0, 1.01)
    log_ax.set_title("ROC, log FAR axis")
    for ax in (linear, log_ax):
        ax.set_xlabel("FAR (false accept rate)")
        ax.set_ylabel("VAL (true accept rate)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.92, wspace=0.22)
    return fig


def histogram_figure(distances: np.ndarray, same: np.ndarray, threshold: float, distance_label: str,
                     seed_threshold: float | None = None) -> Any:
    """Overlaid histograms of same-person and different-person pair distances, thresholds marked."""
    from matplotlib.figure import Figure

    d, s = np.asarray(distances, dtype=np.float64), np.asarray(same, dtype=bool)
    fig = Figure(figsize=(8, 3.8))
    ax = fig.add_subplot(1, 1, 1)
    low, high = min(float(d.min()), threshold), max(float(d.max()), threshold)
    if high <= low:
        high = low + 1e-6
    bins = np.linspace(low, high, 50)
    ax.hist(d[s], bins=bins, histtype="stepfilled", alpha=0.5, color="tab:green",
            label=f"same person ({int(s.sum()):,})")
    ax.hist(d[~s], bins=bins, histtype="stepfilled", alpha=0.5, color="tab:red",
            label=f"different people ({int((~s).sum()):,})")
    ax.axvline(threshold, color="black", linewidth=1.5, label=f"threshold {threshold:.4g}")
    if seed_threshold is not None:
        # Marked only inside the data's range: far outside it would squash the histograms.
        margin = 0.05 * (high - low)
        if low - margin <= seed_threshold <= high + margin:
            ax.axvline(seed_threshold, color="grey", linestyle="--", linewidth=1.2,
                       label=f"seed threshold {seed_threshold:.4g}")
        else:
            side = "right" if seed_threshold > high else "left"
            ax.plot([], [], color="grey", linestyle="--", linewidth=1.2,
                    label=f"seed threshold {seed_threshold:.4g} (off the axis, {side})")
    ax.set_xlabel(f"distance ({distance_label})")
    ax.set_ylabel("pairs")
    ax.legend(loc="upper right", fontsize=8)   # a fixed place: "best" costs seconds to search
    ax.grid(alpha=0.3)
    fig.subplots_adjust(left=0.09, right=0.98, bottom=0.14, top=0.96)
    return fig
