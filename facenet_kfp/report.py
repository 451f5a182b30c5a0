"""Self-contained HTML reports (evaluation and training): tables, matplotlib figures and thumbnails inline.

Every picture is embedded as a base64 ``data:`` URI, so a report is one file
that the KFP UI's HTML view, a browser or an e-mail shows as is. Figures
(facenet_kfp.figures, re-exported here with the training-history reading) are
drawn with matplotlib's Agg canvas (no display, no global pyplot state).
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from facenet_kfp.errors import InputError
from facenet_kfp.figures import (  # noqa: F401  (re-exported: callers import them from report)
    CURVES_PNG, HISTORY_JSON, STEP_KEYS, histogram_figure, history_figure, history_series, load_training_history,
    roc_figure)
from facenet_kfp.fsutil import read_json, write_text
from facenet_kfp.metrics import MIN_CLASS_PAIRS, accuracy_withheld

log = logging.getLogger(__name__)

MODEL_JSON = "model.json"
THUMBNAIL_SIZE = 112     # pixels, longest side of an example-pair thumbnail
# Split prefixes of evaluation metric names, longest first; a flip variant has FLIP after its prefix.
SPLIT_PREFIXES = ("lfw_pairs_heldout_", "lfw_pairs_", "val_", "test_")
FLIP = "flip_"
HELDOUT = "lfw_pairs_heldout_"

CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 24px auto;
       max-width: 1100px; color: #222; line-height: 1.4; padding: 0 16px; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.25em; border-bottom: 1px solid #ddd; padding-bottom: 4px; margin-top: 1.8em; }
.sub { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.headline td.num { font-weight: 600; }
img.figure { max-width: 100%; border: 1px solid #eee; }
ul.notes li { margin-bottom: 4px; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; }
.pair { border: 3px solid #ccc; border-radius: 6px; padding: 6px; width: 244px; font-size: 0.85em; }
.pair.correct { border-color: #2e9d48; }
.pair.wrong { border-color: #d33; }
.pair .imgs { display: flex; gap: 4px; justify-content: center; }
.pair .imgs img { width: 118px; height: auto; }
.pair .names { color: #555; word-break: break-all; }
.tag { font-weight: 600; }
.tag.correct { color: #2e9d48; }
.tag.wrong { color: #d33; }
.missing { color: #a60; }
ul.warnings li { color: #a40; font-weight: 600; margin-bottom: 4px; }
"""


@dataclass
class ExamplePair:
    """One test pair to show: image keys and encoded bytes, its distance, the truth and the verdict."""
    key_a: str
    key_b: str
    image_a: bytes
    image_b: bytes
    distance: float
    same: bool
    predicted_same: bool

    @property
    def correct(self) -> bool:
        return self.same == self.predicted_same


# ----------------------------------------------------------------------------- encoding helpers

def figure_data_uri(fig: Any) -> str:
    """A matplotlib Figure as a ``data:image/png;base64,...`` URI (drawn with the Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return png_data_uri(buffer.getvalue())


def png_data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def thumbnail_data_uri(image: bytes, size: int = THUMBNAIL_SIZE) -> str:
    """An encoded image shrunk to fit `size` x `size`, as a base64 JPEG URI (photos: ~4 KB each).

    The pixels are the model's (`codec.decode_rgb`); UnusableImage for a file the codec refuses.
    """
    from facenet_kfp.codec import decode_rgb

    with decode_rgb(image) as img:
        img.thumbnail((size, size))
        buffer = io.BytesIO()
        img.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _img(uri: str, alt: str, cls: str = "figure") -> str:
    return f'<img class="{cls}" alt="{html.escape(alt)}" src="{uri}">'


def _page(title: str, subtitle: str, body: Iterable[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            f"<h1>{html.escape(title)}</h1>\n<p class=\"sub\">{html.escape(subtitle)}</p>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")


def format_value(value: Any) -> str:
    """Numbers for tables: integers with thousands separators, floats with 4 significant decimals."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if not math.isfinite(value):
            return str(value)
        if value != 0 and abs(value) < 1e-3:
            return f"{value:.3e}"
        return f"{value:.4f}"
    return str(value)


# ----------------------------------------------------------------------------- metric names

def flip_key(key: str) -> str:
    """The name of a metric's flip variant: FLIP after its split prefix, else in front.

    ``test_accuracy`` -> ``test_flip_accuracy``, ``lfw_pairs_auc`` ->
    ``lfw_pairs_flip_auc``, ``lfw_pairs_heldout_auc`` ->
    ``lfw_pairs_heldout_flip_auc``, ``threshold`` -> ``flip_threshold``.
    """
    prefix = next((p for p in SPLIT_PREFIXES if key.startswith(p)), "")
    return f"{prefix}{FLIP}{key[len(prefix):]}"


def plain_key(key: str) -> tuple[str, bool]:
    """(name of the plain metric, whether `key` is a flip variant): the inverse of `flip_key`."""
    prefix = next((p for p in SPLIT_PREFIXES if key.startswith(p)), "")
    rest = key[len(prefix):]
    if rest.startswith(FLIP):
        return prefix + rest[len(FLIP):], True
    return key, False


# ----------------------------------------------------------------------------- training history

def _final_values(series: dict[str, tuple[np.ndarray, np.ndarray]]) -> list[tuple[str, str, str]]:
    """(series, last step, last value) for the training-numbers table."""
    return [(name, format_value(float(x[-1])) if x[-1] != int(x[-1]) else f"{int(x[-1]):,}",
             format_value(float(y[-1]))) for name, (x, y) in series.items()]


def _training_section(history: dict[str, Any] | None, curves_png: bytes | None, where: str) -> list[str]:
    out = ["<h2>Training curves</h2>"]
    if curves_png is not None:
        out.append(_img(png_data_uri(curves_png), "training curves (curves.png from the model folder)"))
    if history is not None:
        series = history_series(history, where)
        if curves_png is None:
            out.append(_img(figure_data_uri(history_figure(series)), "training curves from history.json"))
        out.append("<h3>Final values</h3>")
        out.append(_table(["series", "last step", "value"], _final_values(series), numeric_from=1))
    if curves_png is None and history is None:
        out.append('<p class="missing">The model folder has neither history.json nor curves.png: '
                   'no training curves to show.</p>')
    return out


# ----------------------------------------------------------------------------- tables

def _table(header: Sequence[str], rows: Iterable[Sequence[str]], numeric_from: int = 1,
           cls: str = "") -> str:
    """An HTML table; cells are escaped; columns from `numeric_from` on are right-aligned numbers."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = "".join(f'<td class="num">{html.escape(c)}</td>' if i >= numeric_from
                        else f"<td>{html.escape(c)}</td>" for i, c in enumerate(row))
        body.append(f"<tr>{cells}</tr>")
    class_attr = f' class="{cls}"' if cls else ""
    return f"<table{class_attr}><tr>{head}</tr>\n" + "\n".join(body) + "</table>"


def _is_threshold_key(key: str) -> bool:
    """Metrics whose value is a distance threshold (not an accuracy measured at one)."""
    return "threshold" in key and "accuracy" not in key


def describe_metric(key: str) -> str:
    """One-line meaning of an evaluation metric name (empty when unknown)."""
    key, flip = plain_key(key)
    if flip:
        meaning = describe_metric(key)
        return f"{meaning} (flip: image + mirror embeddings)" if meaning else ""
    if key.startswith(HELDOUT):
        meaning = describe_metric("lfw_pairs_" + key[len(HELDOUT):])
        # Held-out pairs are dealt into seeded stratified folds, not the file's.
        return (meaning.replace("LFW pairs.txt", "LFW pairs.txt, held-out identities", 1)
                .replace("over the file's folds", "over seeded stratified folds"))
    fixed = {
        "threshold": "distance threshold chosen on validation pairs (max accuracy)",
        "distance": "distance definition of every threshold and distance",
        "val_accuracy": "accuracy on validation pairs at the threshold",
        "test_accuracy": "accuracy on test pairs at the validation threshold",
        "test_kfold_accuracy_mean": "k-fold accuracy on test pairs (threshold from the other folds)",
        "test_kfold_accuracy_std": "standard deviation of the k-fold accuracy over folds",
        "test_auc": "area under the test ROC curve",
        "val_auc": "area under the validation ROC curve",
        "test_eer": "equal error rate on test (FAR = FRR)",
        "test_eer_threshold": "threshold at the equal error rate on test",
        "seed_threshold": "the fixed threshold 1.242 (plain L2) of the original TF1 implementation, in this distance",
        "test_accuracy_at_seed_threshold": "accuracy on test pairs at that fixed threshold",
        "embedding_dim": "size of the embedding",
        "lfw_pairs_kfold_accuracy_mean": "LFW pairs.txt: accuracy over the file's folds",
        "lfw_pairs_kfold_accuracy_std": "LFW pairs.txt: standard deviation over folds",
        "lfw_pairs_accuracy_at_threshold": "LFW pairs.txt: accuracy at the validation threshold",
        "lfw_pairs_auc": "LFW pairs.txt: area under the ROC curve",
        "lfw_pairs_eer": "LFW pairs.txt: equal error rate",
        "lfw_pairs_train_identities": "LFW pairs.txt: identities that are training identities",
        "lfw_pairs_overlapping_pairs": "LFW pairs.txt: pairs naming a training identity",
    }
    if key in fixed:
        return fixed[key]
    patterns = [
        (r"threshold_at_far_(.+)", "threshold reaching FAR {0} on validation pairs"),
        (r"test_val_at_far_(.+)_needs_different_pairs",
         "VAL on test at FAR {0} is n/a: it needs this many different-person test pairs"),
        (r"test_kfold_val_at_far_(.+)_needs_different_pairs",
         "k-fold VAL on test at FAR {0} is n/a: it needs this many different-person pairs in each fold's test part"),
        (r"test_val_at_far_(.+)", "VAL on test at the validation threshold for FAR {0}"),
        (r"test_far_at_far_(.+)", "FAR that threshold actually gives on test (target {0})"),
        (r"test_kfold_val_at_far_(.+)_mean", "k-fold VAL on test at FAR {0} (mean over folds)"),
        (r"test_kfold_val_at_far_(.+)_std", "k-fold VAL on test at FAR {0} (std over folds)"),
        (r"test_kfold_far_at_far_(.+)_mean", "k-fold FAR actually reached on test (target {0})"),
        (r"lfw_pairs_kfold_val_at_far_(.+)_needs_different_pairs",
         "LFW pairs.txt: k-fold VAL at FAR {0} is n/a: it needs this many different-person pairs in each "
         "fold's test part"),
        (r"lfw_pairs_kfold_val_at_far_(.+)_mean", "LFW pairs.txt: k-fold VAL at FAR {0} (mean)"),
        (r"lfw_pairs_kfold_val_at_far_(.+)_std", "LFW pairs.txt: k-fold VAL at FAR {0} (std)"),
        (r"lfw_pairs_kfold_far_at_far_(.+)_mean", "LFW pairs.txt: k-fold FAR actually reached (target {0})"),
        (r"(val|test|lfw_pairs)_pairs", "{0}: pairs"),
        (r"(val|test|lfw_pairs)_same_pairs", "{0}: same-person pairs"),
        (r"(val|test|lfw_pairs)_different_pairs", "{0}: different-person pairs"),
        (r"(val|test|lfw_pairs)_accuracy_withheld",
         f"{{0}}: 1 when either class has fewer than {MIN_CLASS_PAIRS} pairs: its accuracies are not headline "
         f"figures"),
        (r"(test|lfw_pairs)_folds", "{0}: folds of the k-fold figures"),
        (r"(test|lfw_pairs)_folds_from_file",
         "{0}: 1 when the folds are those the pairs file declares, 0 for seeded stratified folds"),
        (r"(val|test|lfw_pairs)_identities", "{0}: identities"),
        (r"(val|test|lfw_pairs)_positive_identities", "{0}: identities in same-person pairs"),
        (r"(val|test|lfw_pairs)_images", "{0}: images embedded"),
    ]
    names = {"val": "validation", "test": "test", "lfw_pairs": "LFW pairs.txt"}
    for pattern, text in patterns:
        match = re.fullmatch(pattern, key)
        if match:
            return text.format(*(names.get(g, g) for g in match.groups()))
    return ""


def metric_rows(metrics: dict[str, Any], distance_label: str) -> list[tuple[str, str, str]]:
    """(name, value, meaning) per metric; threshold values carry the distance definition."""
    rows = []
    for key, value in metrics.items():
        text = format_value(value)
        if _is_threshold_key(key) and isinstance(value, (int, float)):
            text += f" ({distance_label})"
        meaning = describe_metric(key)
        prefix = next((p for p in SPLIT_PREFIXES if plain_key(key)[0].startswith(p)), "")
        if "accuracy" in key and not key.endswith("_withheld") and withheld_text(metrics, prefix):
            meaning += f" (not a headline figure: {withheld_text(metrics, prefix)})"
        rows.append((key, meaning, text))
    return rows


# Pair sets of the headline: metric prefix and label.
PAIR_SETS = (("val_", "validation"), ("test_", "test"), ("lfw_pairs_", "LFW pairs.txt"),
             (HELDOUT, "LFW pairs.txt, held-out identities"))


def pair_counts_text(metrics: dict[str, Any], prefix: str) -> str:
    """"S same, D different" for the pair set `prefix`; "" when the metrics do not count its classes."""
    same, different = metrics.get(f"{prefix}same_pairs"), metrics.get(f"{prefix}different_pairs")
    if not isinstance(same, (int, float)) or not isinstance(different, (int, float)):
        return ""
    return f"{int(same):,} same, {int(different):,} different"


def withheld_text(metrics: dict[str, Any], prefix: str) -> str:
    """Why the accuracy of the pair set `prefix` is not a headline figure (`metrics.accuracy_withheld`);
    "" when it is one or when the metrics do not count the set's classes."""
    same, different = metrics.get(f"{prefix}same_pairs"), metrics.get(f"{prefix}different_pairs")
    if not isinstance(same, (int, float)) or not isinstance(different, (int, float)):
        return ""
    return accuracy_withheld(int(same), int(different))


def far_targets_in(metrics: dict[str, Any], prefix: str) -> list[str]:
    """The FAR keys ("0.001") of the VAL@FAR figures of pair set `prefix`, measured or n/a, smallest FAR first."""
    found: list[str] = []
    for key in metrics:
        match = re.fullmatch(re.escape(prefix) + r"(?:kfold_)?val_at_far_(.+?)(?:_mean|_std|_needs_different_pairs)?",
                             key)
        if match and match.group(1) not in found:
            found.append(match.group(1))

    def order(far: str) -> tuple[float, str]:
        try:
            return float(far), far
        except ValueError:
            return float("inf"), far
    return sorted(found, key=order)


def val_at_far_text(metrics: dict[str, Any], prefix: str, far: str, kfold: bool) -> str:
    """One VAL@FAR figure of pair set `prefix` with the FAR it reached, or why it is n/a; "" when absent.

    ``0.9175 (FAR reached 0.0012)``, k-fold ``0.9000 ± 0.0100 (FAR reached 0.0011)``,
    or ``n/a (needs >= 1,000 different pairs)`` (k-fold: ``... in each fold's test part``).
    """
    base = f"{prefix}{'kfold_' if kfold else ''}val_at_far_{far}"
    need = metrics.get(f"{base}_needs_different_pairs")
    if isinstance(need, (int, float)):
        return f"n/a (needs >= {int(need):,} different pairs{' in each fold' + chr(39) + 's test part' if kfold else ''})"
    if kfold:
        keys = (f"{base}_mean", f"{base}_std", f"{prefix}kfold_far_at_far_{far}_mean")
        if not all(k in metrics for k in keys[:2]):
            return ""
        text = f"{metrics[keys[0]]:.4f} ± {metrics[keys[1]]:.4f}"
    else:
        keys = (base, f"{prefix}far_at_far_{far}")
        if base not in metrics:
            return ""
        text = f"{metrics[base]:.4f}"
    reached = metrics.get(keys[-1])
    return text + (f" (FAR reached {reached:.4f})" if isinstance(reached, (int, float)) else "")


def _headline_rows(metrics: dict[str, Any], distance_label: str) -> list[list[str]]:
    """Headline table rows: a label, the plain value and, when flip figures exist, the flip value.

    Each pair set (validation, test, LFW pairs.txt and its held-out pairs) first
    gets a row with its same and different pair counts; a set with too few of
    either class (`metrics.accuracy_withheld`) shows why its accuracy is
    withheld instead of any accuracy; VAL@FAR shows the FAR reached, or n/a.
    """
    flip = flip_key("threshold") in metrics
    names = [lambda k: k, flip_key] if flip else [lambda k: k]

    def row(label: str, text: Any, *keys: str) -> list[str]:
        cells = [label]
        for name in names:
            variant = [name(k) for k in keys]
            cells.append(text(*(metrics[k] for k in variant)) if all(k in metrics for k in variant) else "")
        return cells

    def plain_row(label: str, text: str) -> list[str]:
        return [label, text] + ([""] if flip else [])

    def mean_std(mean: float, std: float) -> str:
        return f"{mean:.4f} ± {std:.4f}"

    rows = [row("threshold", lambda t: f"{t:.4f} ({distance_label}); same person when distance < threshold",
                "threshold")]
    for prefix, label in PAIR_SETS:
        counts = pair_counts_text(metrics, prefix)
        folds = metrics.get(f"{prefix}folds")
        if counts:
            where = ""
            if prefix != "val_" and isinstance(folds, (int, float)):
                from_file = metrics.get(f"{prefix}folds_from_file")
                where = (f" in the {int(folds)} folds of the file" if from_file else
                         f" in {int(folds)} seeded stratified folds")
            rows.append(plain_row(f"{label} pairs", counts + where))
        withheld = withheld_text(metrics, prefix)
        if withheld:
            if any(key.startswith(prefix) and "accuracy" in key and not key.endswith("_withheld")
                   for key in metrics):
                rows.append(plain_row(f"{label} accuracy", withheld))
        elif prefix in ("val_", "test_"):
            rows.append(row(f"{label} accuracy", format_value, f"{prefix}accuracy"))
        if not withheld:
            rows.append(row(f"{label} k-fold accuracy", mean_std, f"{prefix}kfold_accuracy_mean",
                            f"{prefix}kfold_accuracy_std"))
        if prefix == "val_":
            continue
        rows.append(row(f"{label} ROC AUC", format_value, f"{prefix}auc"))
        rows.append(row(f"{label} equal error rate", format_value, f"{prefix}eer"))
        for far in far_targets_in(metrics, prefix):
            for kfold in (False, True):
                rows.append([f"{label} {'k-fold ' if kfold else ''}VAL @ FAR={far}",
                             val_at_far_text(metrics, prefix, far, kfold)]
                            + ([val_at_far_text(_flip_view(metrics), prefix, far, kfold)] if flip else []))
        if prefix == "test_" and "seed_threshold" in metrics and not withheld:
            rows.append(row(f"test accuracy at the seed threshold ({metrics['seed_threshold']:.4g} {distance_label})",
                            format_value, "test_accuracy_at_seed_threshold"))
    rows = [r for r in rows if any(r[1:])]
    if "val_positive_identities" in metrics and "test_positive_identities" in metrics:
        rows.append(plain_row("identities in same-person pairs (validation / test)",
                              f"{metrics['val_positive_identities']:,} / {metrics['test_positive_identities']:,}"))
    return rows


def _flip_view(metrics: dict[str, Any]) -> dict[str, Any]:
    """The metrics with each flip variant under its plain name (`plain_key`), for the 'with flip' column."""
    return {plain_key(key)[0]: value for key, value in metrics.items() if plain_key(key)[1]}


def _examples_section(examples: Sequence[ExamplePair], distance_label: str, threshold: float) -> list[str]:
    n_wrong = sum(1 for e in examples if not e.correct)
    out = ["<h2>Example test pairs</h2>",
           f"<p>{len(examples)} test pairs: {n_wrong} misclassified (red), {len(examples) - n_wrong} "
           f"correct (green). Verdict: same person when distance &lt; {threshold:.4f} "
           f"({html.escape(distance_label)}).</p>", '<div class="grid">']
    for e in examples:
        status = "correct" if e.correct else "wrong"
        verdict = "same person" if e.predicted_same else "different people"
        truth = "same person" if e.same else "different people"
        out.append(
            f'<div class="pair {status}"><div class="imgs">'
            f'{_img(thumbnail_data_uri(e.image_a), e.key_a, "thumb")}'
            f'{_img(thumbnail_data_uri(e.image_b), e.key_b, "thumb")}</div>'
            f'<div class="names">{html.escape(e.key_a)}<br>{html.escape(e.key_b)}</div>'
            f"<div>distance {e.distance:.4f}; verdict: {verdict}</div>"
            f"<div>truth: {truth} <span class=\"tag {status}\">{status.upper()}</span></div></div>")
    out.append("</div>")
    if not examples:
        out.append('<p class="missing">No examples requested (evaluate.report_examples = 0).</p>')
    return out


def build_report_html(*, title: str, model: str, metrics: dict[str, Any], distance_label: str,
                      threshold: float, seed_threshold: float | None, test_distances: np.ndarray,
                      test_same: np.ndarray, rocs: dict[str, tuple[Sequence[float], Sequence[float]]],
                      history: dict[str, Any] | None, curves_png: bytes | None,
                      examples: Sequence[ExamplePair], notes: Sequence[str],
                      warnings: Sequence[str] = ()) -> str:
    """The evaluation report as one self-contained HTML page.

    Sections: `warnings` (when any), headline numbers (plain and, when the
    metrics hold flip variants, flip figures side by side), every metric (thresholds labelled with
    `distance_label`, e.g. "squared L2"), ROC curves (`rocs`: label -> (FAR [M],
    VAL [M])), histograms of test same/different distances with `threshold`
    (and `seed_threshold`) marked, training curves (curves.png, else plotted
    from `history`), the example pairs, and `notes` on the method. All text
    is HTML-escaped.
    """
    body = []
    if warnings:
        body += ["<h2>Warnings</h2>", '<ul class="warnings">']
        body += [f"<li>{html.escape(warning)}</li>" for warning in warnings]
        body.append("</ul>")
    header = ["", "value", "with flip"] if flip_key("threshold") in metrics else ["", "value"]
    body += ["<h2>Headline</h2>",
             _table(header, _headline_rows(metrics, distance_label), cls="headline"),
             "<h2>Method</h2>", '<ul class="notes">']
    body += [f"<li>{html.escape(note)}</li>" for note in notes]
    body.append("</ul>")
    body += ["<h2>ROC curves</h2>", _img(figure_data_uri(roc_figure(rocs)), "ROC curves")]
    body += ["<h2>Distances of test pairs</h2>",
             _img(figure_data_uri(histogram_figure(test_distances, test_same, threshold, distance_label,
                                                   seed_threshold)), "distance histograms")]
    body += _training_section(history, curves_png, f"{model}/{HISTORY_JSON}")
    body += _examples_section(examples, distance_label, threshold)
    body += ["<h2>All metrics</h2>",
             f"<p>Every threshold and distance is {html.escape(distance_label)}.</p>",
             _table(["metric", "meaning", "value"], metric_rows(metrics, distance_label), numeric_from=2)]
    return _page(title, f"model: {model}", body)


# ----------------------------------------------------------------------------- training report

def write_training_report(model_dir: str | os.PathLike, out_path: str | os.PathLike) -> None:
    """Write the training report (HTML) of a model folder to `out_path`, atomically.

    Shows curves.png when the folder has it (else curves plotted from
    history.json), the last value of every training series, and model.json's
    settings. Raises InputError when the folder has no history.json.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise InputError(f"{model_dir}: model folder not found")
    history, curves_png = load_training_history(model_dir, required=True)
    body = _training_section(history, curves_png, str(model_dir / HISTORY_JSON))
    model_json = model_dir / MODEL_JSON
    if model_json.is_file():
        settings = read_json(model_json)
        if isinstance(settings, dict):
            body += ["<h2>Model (model.json)</h2>",
                     _table(["key", "value"], _flatten_settings(settings), numeric_from=2)]
    write_text(out_path, _page("FaceNet training report", f"model folder: {model_dir}", body))
    log.info("wrote training report %s", out_path)


def _flatten_settings(settings: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    rows = []
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows += _flatten_settings(value, f"{name}.")
        elif isinstance(value, (list, tuple)):
            text = json.dumps(value)
            rows.append((name, text if len(text) <= 200 else text[:197] + "..."))
        else:
            rows.append((name, format_value(value)))
    return rows
