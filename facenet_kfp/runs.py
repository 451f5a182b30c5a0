"""Local pipeline runs as data: task records, the run table, summary files and the artifacts they list.

A run (`make run`) or rerun (`make rerun`) is summarised as JSON: status,
seconds, one entry per task in DAG order (name, display name, status, seconds,
outputs with URIs and metadata, error) and headline metrics. This module builds,
prints and reads those summaries; it does not depend on kfp, so
pipelines/run_local.py only connects it to kfp.local. What a run or rerun reads
(earlier runs' artifacts, the archive and pairs file, a rerun's overrides) is
`facenet_kfp.run_inputs`, re-exported here.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

from facenet_kfp.fsutil import write_json
from facenet_kfp.run_inputs import (  # noqa: F401  (re-exported: callers import them from runs)
    MARKERS, RERUN_SUMMARY, SUMMARY, Producer, artifacts_from_summary, check_inputs, data_sources,
    ensure_demo_archive, resolve_source, resolve_sources, step_overrides, used_evaluation_archive,
    with_eval_source)

# Headline figures of each pair set (test_, lfw_pairs_, lfw_pairs_heldout_ metrics) that do not depend on a
# class balance; its accuracies come first where both classes have enough pairs (`metrics.accuracy_withheld`),
# its VAL@FAR figures after, with the FAR each reached or "n/a".
HEADLINE = [("auc", "AUC"), ("eer", "EER")]
WIDTH = 110   # headline figures side by side up to this many characters
KEY_FIGURES = {
    "download-archive": ["size", "sha256"],
    "extract-images": ["identities", "images", "skipped_total", "shards"],
    "align-faces": ["identities", "images", "align_fallbacks"],
    "make-labels": ["identities", "singletons"],
    "complete-identities": ["generated", "identities_completed"],
    "split-identities": ["train_identities", "val_identities", "test_identities"],
    "check-pairs": ["pairs", "same_pairs", "different_pairs", "folds", "duplicates"],
    "train-model": ["steps"],
    "evaluate-model": ["test_pairs", "test_accuracy", "test_auc", "threshold", "lfw_pairs_train_identities",
                       "lfw_pairs_overlapping_pairs"],
    "evaluate-on-archive": ["test_pairs", "test_accuracy", "test_auc", "threshold", "eval_identities",
                            "eval_identities_in_training_archive", "lfw_pairs_overlapping_pairs"],
    "deploy-model": ["namespace", "name", "action", "url"],
}
_STEP_FAILED = re.compile(r"(step \S+ failed: .*)$")
_EXCEPTION_LINE = re.compile(r"^([\w.]+(Error|Exception): .*)$")
_STEP_NUMBER = re.compile(r"(\d+)([a-z]?)\.\s")   # "2. extract images", "2a. align faces"


@dataclass
class TaskRecord:
    name: str
    display_name: str
    status: str = "RUNNING"
    seconds: float = 0.0
    outputs: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    log: str = ""          # the file holding the task's full log ('' when none was kept)


# Colour and cursor codes (kfp.local colours its log lines): never written to files.
ANSI_CODE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def strip_ansi(text: str) -> str:
    return ANSI_CODE.sub("", text)


class Tee(io.TextIOBase):
    """A task's output as whole lines: appended to `log` (a text file) and kept (the last `keep`, for
    the task's error line) without colour codes, and handed to `on_line` as written.

    `finish()` passes on a last line that has no newline yet.
    """

    def __init__(self, log: Any = None, on_line: Callable[[str], None] | None = None, keep: int = 200):
        self.log, self.on_line, self.keep = log, on_line, keep
        self.lines: list[str] = []
        self._pending = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        *lines, self._pending = (self._pending + text).split("\n")
        for line in lines:
            self._line(line)
        return len(text)

    def _line(self, raw: str) -> None:
        raw = raw.rstrip().rsplit("\r", 1)[-1]   # a progress bar redrawn in place: its last state
        line = strip_ansi(raw)
        if self.log is not None:
            self.log.write(line + "\n")
        self.lines.append(line)
        del self.lines[:-self.keep]
        if self.on_line is not None:
            self.on_line(raw)

    def finish(self) -> None:
        if self._pending:
            pending, self._pending = self._pending, ""
            self._line(pending)
        self.flush()

    def flush(self) -> None:
        if self.log is not None:
            self.log.flush()


def artifact_summary(value: Any) -> Any:
    if hasattr(value, "uri"):
        return {"uri": value.uri, "metadata": json.loads(json.dumps(dict(value.metadata), default=str))}
    return {"value": value}


def task_error(lines: list[str]) -> str:
    """The error line of a failed task's log: the step's own "step X failed: ..." line, else the
    traceback's last exception line (warnings that quote an error, such as skipped images, are not it)."""
    for pattern in (_STEP_FAILED, _EXCEPTION_LINE):
        found = [m.group(1) for line in lines if (m := pattern.search(line.strip()))]
        if found:
            return found[0] if pattern is _STEP_FAILED else found[-1]
    return "see the task's log"


def dag_order(records: list[TaskRecord]) -> list[TaskRecord]:
    """The records sorted by the step number that starts each display name ("4. complete ...").

    The pipeline numbers its steps in DAG order (tests/test_pipeline.py checks
    that every task's upstream tasks have lower numbers), so the table reads the
    same whichever order kfp.local ran independent tasks in; a step between two
    numbers has a letter ("2a. align faces" follows "2. extract images"). Tasks
    without a number (a rerun's importers) come first, by display name.
    """
    def key(record: TaskRecord) -> tuple[int, str, str]:
        match = _STEP_NUMBER.match(record.display_name)
        return (int(match.group(1)), match.group(2), record.display_name) if match else (0, "", record.display_name)
    return sorted(records, key=key)


def summarise(pipeline: str, records: list[TaskRecord], failure: str, seconds: float, path: Path,
              **fields: Any) -> dict:
    """The summary of a run of `pipeline`, written to `path`: status, tasks in DAG order, metrics, error."""
    summary = {
        "pipeline": pipeline,
        "status": "FAILED" if failure else "SUCCEEDED",
        "seconds": round(seconds, 1),
        **fields,
        "tasks": [{"name": r.name, "display_name": r.display_name, "status": r.status,
                   "seconds": round(r.seconds, 2), "outputs": r.outputs,
                   **({"error": r.error} if r.error else {}), **({"log": r.log} if r.log else {})}
                  for r in records],
        "metrics": headline_metrics(records),
    }
    if failure:
        summary["error"] = failure
    write_json(path, summary)
    return summary


def key_figures(record: TaskRecord) -> str:
    """A few figures for the table line of one task."""
    values: dict[str, Any] = {}
    for output in record.outputs.values():
        for key, value in output.get("metadata", {}).items():
            if isinstance(value, dict):  # e.g. splits: {"train": {"identities": n}} -> train_identities
                values.update({f"{key}_{k}": v for k, v in value.items()})
            values[key] = value
    parts = []
    if re.sub(r"-\d+$", "", record.name) == "check-pairs" and values.get("pairs_uri") == "":
        return "no pairs.txt given"
    start_step = values.get("start_step")
    if record.name == "train-model" and isinstance(start_step, (int, float)) and start_step > 0:
        parts.append(f"resumed at step {int(start_step)}")
    for first, last, label in (("first_val_loss", "val_loss", "val loss"),
                               ("first_val_fraction_positive", "val_fraction_positive", "val positive triplets")):
        if isinstance(values.get(first), (int, float)) and isinstance(values.get(last), (int, float)):
            parts.append(f"{label} {values[first]:.3f} -> {values[last]:.3f}")
    for key in KEY_FIGURES.get(re.sub(r"-\d+$", "", record.name), []):
        value = values.get(key)
        value = len(value) if isinstance(value, list) else value
        if key == "size" and isinstance(value, (int, float)):
            parts.append(f"{value / 1e6:.1f} MB")
        elif key == "sha256" and isinstance(value, str):
            parts.append(f"sha256 {value[:12]}…")
        elif key.endswith("_pairs") and _is_number(value) and (counts := _class_counts(values, key[:-len("pairs")])):
            parts.append(f"{key}={format_figure(value)} ({counts})")
        elif "accuracy" in key and _is_number(value) and _withheld(values, key[:key.index("accuracy")]):
            parts.append(f"{key} withheld")
        elif value is not None and not isinstance(value, dict):
            parts.append(f"{key}={format_figure(value)}")
    return ", ".join(parts)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def format_figure(value: Any) -> str:
    """A figure for the run table and headline: counts with thousands separators ("11,053"), also the
    integral floats KFP metadata turns every integer into; other numbers to 4 significant digits."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int) or value.is_integer():
        return f"{int(value):,}"
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.1f}"


def _pair_counts(metrics: Mapping[str, Any], prefix: str) -> tuple[int, int] | None:
    """(same, different) pairs of the pair set `prefix` ("test_"); None when they are not recorded."""
    same, different = metrics.get(f"{prefix}same_pairs"), metrics.get(f"{prefix}different_pairs")
    return (int(same), int(different)) if _is_number(same) and _is_number(different) else None


def _class_counts(metrics: Mapping[str, Any], prefix: str) -> str:
    """"S same, D different" of the pair set `prefix`; "" when its counts are not recorded."""
    counts = _pair_counts(metrics, prefix)
    return f"{counts[0]:,} same, {counts[1]:,} different" if counts else ""


def _withheld(metrics: Mapping[str, Any], prefix: str) -> str:
    """Why the accuracy of pair set `prefix` is not a headline figure (`metrics.accuracy_withheld`), or ""."""
    from facenet_kfp.metrics import accuracy_withheld

    counts = _pair_counts(metrics, prefix)
    return accuracy_withheld(*counts) if counts else ""


def _far_label(far: str) -> str:
    """A FAR as metric names spell it ("0.001") the way people write it ("1e-3")."""
    mantissa, exponent = f"{float(far):e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def _far_order(far: str) -> tuple[float, str]:
    try:
        return float(far), far
    except ValueError:
        return float("inf"), far


class _Val(NamedTuple):
    """One VAL@FAR figure of the headline."""
    far: str              # the target FAR as metric names spell it ("0.001")
    text: str             # "VAL@FAR=1e-3: 0.9175 (FAR reached 0.0012)" or "...: n/a (needs >= ...)"
    needs: int | None     # different pairs it needs where it could not be measured, else None


def _val_at_far(metrics: Mapping[str, Any], prefix: str, kfold: bool) -> list[_Val]:
    """VAL@FAR beside the FAR reached, or n/a with the different pairs it needs, per target FAR of pair
    set `prefix`, in order of the target; k-fold figures with `kfold`."""
    base = f"{prefix}{'kfold_' if kfold else ''}val_at_far_"
    label = "k-fold VAL@FAR" if kfold else "VAL@FAR"
    texts = []
    # In order of the target FAR (KFP metadata does not keep the metrics' order).
    found = [(m, key) for key in metrics if (m := re.fullmatch(re.escape(base) + r"(.+?)(_mean|_needs_different_pairs)?",
                                                                key))]
    for match, key in sorted(found, key=lambda item: _far_order(item[0].group(1))):
        if (kfold and not match.group(2)) or (not kfold and match.group(2) == "_mean"):
            continue
        far = match.group(1)
        if match.group(2) == "_needs_different_pairs":
            needs = int(metrics[key])
            part = " per fold" if kfold else ""
            texts.append(_Val(far, f"{label}={_far_label(far)}: n/a (needs >= {needs:,} different pairs{part})",
                              needs))
            continue
        reached = metrics.get(f"{prefix}{'kfold_' if kfold else ''}far_at_far_{far}{'_mean' if kfold else ''}")
        std = metrics.get(f"{base}{far}_std")
        value = f"{metrics[key]:.4f}" + (f" ± {std:.4f}" if kfold and _is_number(std) else "")
        texts.append(_Val(far, f"{label}={_far_label(far)}: {value}"
                          + (f" (FAR reached {reached:.4f})" if _is_number(reached) else ""), None))
    return texts


def _folds_text(metrics: Mapping[str, Any], prefix: str, pairs_file: bool) -> str:
    folds = metrics.get(f"{prefix}folds")
    if not _is_number(folds):
        return ""
    if pairs_file and metrics.get(f"{prefix}folds_from_file"):
        return f"the file's {int(folds)} folds"
    return f"{int(folds)} seeded stratified folds" + ("; the file declares one fold" if pairs_file else "")


def pair_set_lines(metrics: Mapping[str, Any], prefix: str, title: str, pairs_file: bool = False,
                   indent: str = "") -> list[str]:
    """The headline lines of one pair set: its counts (and folds), then its figures.

    Accuracies only where both classes have `metrics.MIN_CLASS_PAIRS` pairs or
    more, else the sentence saying why they are withheld; AUC, EER (and for
    test the threshold); VAL@FAR beside the FAR reached, or n/a.
    """
    counts = _class_counts(metrics, prefix)
    folds = _folds_text(metrics, prefix, pairs_file)
    head = f"{indent}{title}" + (f": {counts}" if counts else "") + (f" ({folds})" if folds else "")
    figures: list[str] = []
    withheld = _withheld(metrics, prefix)
    if not withheld:
        if _is_number(metrics.get(f"{prefix}accuracy")):
            figures.append(f"{prefix.rstrip('_')} accuracy: {metrics[f'{prefix}accuracy']:.4f}")
        mean, std = metrics.get(f"{prefix}kfold_accuracy_mean"), metrics.get(f"{prefix}kfold_accuracy_std")
        if _is_number(mean):
            n = metrics.get(f"{prefix}folds")
            figures.append(f"{int(n) if _is_number(n) else 'k'}-fold accuracy: {mean:.4f}"
                           + (f" ± {std:.4f}" if _is_number(std) else ""))
    figures += [f"{label}: {metrics[prefix + key]:.4f}" for key, label in HEADLINE
                if _is_number(metrics.get(prefix + key))]
    if prefix == "test_" and _is_number(metrics.get("threshold")):
        figures.append(f"threshold: {metrics['threshold']:.4f}")
    lines = [head] + ([f"{indent}  " + "  ".join(figures)] if figures else [])
    if withheld:
        lines.append(f"{indent}  {withheld}")
    # One line per target FAR (VAL and k-fold VAL side by side, one n/a for both when neither can be
    # measured), or each on its own when that is too wide.
    single, kfold = _val_at_far(metrics, prefix, False), _val_at_far(metrics, prefix, True)
    same_targets = [v.far for v in single] == [v.far for v in kfold]
    for vals in (list(zip(single, kfold)) if same_targets else [(v,) for v in single + kfold]):
        if len(vals) == 2 and vals[0].needs is not None and vals[0].needs == vals[1].needs:
            joined = (f"{indent}  VAL@FAR={_far_label(vals[0].far)} and its k-fold variant: n/a (needs >= "
                      f"{vals[0].needs:,} different pairs, in each fold for k-fold)")
        else:
            joined = f"{indent}  " + "  ".join(v.text for v in vals)
        lines += [joined] if len(joined) <= WIDTH else [f"{indent}  {v.text}" for v in vals]
    return lines


def headline_lines(metrics: Mapping[str, Any]) -> list[str]:
    """The headline of a run: every pair set's figures with the same and different pairs they rest on."""
    lines: list[str] = []
    separate = "eval_images" in metrics
    has_pairs_file = _is_number(metrics.get("lfw_pairs_pairs"))
    if separate:
        lines.append(f"on the evaluation archive ({int(metrics['eval_identities']):,} identities, "
                     f"{int(metrics['eval_images']):,} images; {int(metrics['eval_identities_in_training_archive']):,} "
                     f"identity names also in the training archive, {int(metrics['eval_identities_in_train_split']):,} "
                     f"in its train split):")
    if _class_counts(metrics, "test_") or _is_number(metrics.get("test_accuracy")):
        title = "test pairs (the evaluation archive's pairs.txt)" if separate and has_pairs_file else "test pairs"
        lines += pair_set_lines(metrics, "test_", title, pairs_file=separate and has_pairs_file)
    if has_pairs_file and not separate:
        lines += pair_set_lines(metrics, "lfw_pairs_", "pairs.txt", pairs_file=True)
    if metrics.get("lfw_pairs_overlapping_pairs"):
        lines.append(f"pairs.txt: {int(metrics['lfw_pairs_overlapping_pairs']):,} of "
                     f"{int(metrics['lfw_pairs_pairs']):,} pairs name {int(metrics['lfw_pairs_train_identities']):,} "
                     f"training identities, so its figures are optimistic")
        held = "lfw_pairs_heldout_"
        if _is_number(metrics.get(f"{held}auc")) or _is_number(metrics.get(f"{held}kfold_accuracy_mean")):
            lines += pair_set_lines(metrics, held, f"on its {int(metrics[f'{held}pairs']):,} held-out pairs",
                                    indent="  ")
        else:
            counts = _class_counts(metrics, held)
            lines.append(f"  too few held-out pairs remain{f' ({counts})' if counts else ''}: "
                         f"the pairs.txt figures are not a held-out benchmark")
    return lines


def headline_metrics(records: list[TaskRecord]) -> dict[str, Any]:
    """Scalar metrics of the train and evaluate tasks (what summary.json calls `metrics`), with the URIs of
    the model, threshold and report, and after a deploy the InferenceService's URL (``serving_url``) and
    the bundle it serves (``served_model_uri``)."""
    metrics: dict[str, Any] = {}
    for record in records:
        scalars = {k: v for k, v in record.outputs.get("metrics", {}).get("metadata", {}).items()
                   if isinstance(v, (int, float))}
        if record.name == "train-model":
            metrics.update({k if k.startswith(("train_", "val_")) else f"train_{k}": v for k, v in scalars.items()})
            if "model" in record.outputs:
                metrics["model_uri"] = record.outputs["model"]["uri"]
        if record.name in ("evaluate-model", "evaluate-on-archive"):
            metrics.update(scalars)
            for output in ("threshold", "report"):
                if record.outputs.get(output):
                    metrics[f"{output}_uri"] = record.outputs[output].get("uri")
        served = record.outputs.get("served_model") or {}
        if record.name == "deploy-model" and record.status != "FAILED" and served.get("metadata", {}).get("url"):
            metrics["serving_url"] = served["metadata"]["url"]
            metrics["served_model_uri"] = served.get("uri")
    return metrics


def table_width() -> int:
    """Columns the run table may use: the terminal's ($COLUMNS), 100 when it is not a terminal."""
    return max(60, shutil.get_terminal_size((100, 24)).columns)


def table_cell(text: str, width: int) -> list[str]:
    """`text` in lines of at most `width` characters, broken after ", " where it can be, else at spaces
    (a longer word, such as a path, stays whole)."""
    lines: list[str] = []
    parts = text.split(", ")
    for i, part in enumerate(parts):
        piece = part + ("," if i < len(parts) - 1 else "")
        if lines and len(lines[-1]) + 1 + len(piece) <= width:
            lines[-1] += " " + piece
        else:
            lines.extend(textwrap.wrap(piece, max(width, 20), break_long_words=False, break_on_hyphens=False) or [""])
    return lines or [""]


def report_summary(summary: dict[str, Any], path: Path) -> int:
    """Print the table and headline figures of a finished run; the exit status it deserves."""
    records = [TaskRecord(name=t["name"], display_name=t["display_name"], status=t["status"],
                          seconds=t["seconds"], outputs=t["outputs"], error=t.get("error", ""),
                          log=t.get("log", "")) for t in summary["tasks"]]
    width = max([len(r.display_name) for r in records] + [10])
    print(f"\n{summary['pipeline']}: {summary['status']}")
    print(f"  {'task':<{width}}  {'seconds':>7}  key figures")
    indent = 2 + width + 2 + 7 + 2
    for r in records:
        ran = {"CACHED": "cached", "FAILED": "FAILED", "RUNNING": "?"}.get(r.status, f"{r.seconds:.1f}")
        figures = r.error if r.status == "FAILED" else key_figures(r)
        if r.status == "FAILED" and r.log:
            figures += f" (log: {r.log})"
        lines = table_cell(figures, table_width() - indent)
        print(f"  {r.display_name:<{width}}  {ran:>7}  {lines[0]}".rstrip())
        for line in lines[1:]:
            print(" " * indent + line)
    if records and all(r.status == "CACHED" for r in records):
        print(f"  all {len(records)} tasks came from the cache")
    metrics = summary["metrics"]
    headline = headline_lines(metrics)
    if headline:
        print("\n" + "\n".join(headline))
    # The report and threshold as the run folder's copies (report.html opens in a browser), else the artifacts.
    paths = [("trained model", metrics.get("model_uri")),
             ("report", summary.get("report_html") or metrics.get("report_uri")),
             ("threshold.json", summary.get("threshold_json") or metrics.get("threshold_uri")),
             ("serving URL", metrics.get("serving_url")),
             ("task logs", summary.get("logs")), ("summary", str(path))]
    for label, where in paths:
        if where:
            print(f"{label + ':':<15} {where}")
    if summary["status"] != "SUCCEEDED":
        print(f"\nerror: {summary['error']}", file=sys.stderr)
        return 1
    return 0
