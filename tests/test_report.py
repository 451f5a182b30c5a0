"""HTML reports: training-history parsing, the training report, the evaluation report's content and escaping."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from facenet_kfp import report
from facenet_kfp.errors import InputError


def jpeg(colour, size=60) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def png(colour=(10, 20, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def images_in(html: str, kind: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(rf'src="data:image/{kind};base64,([^"]+)"', html)]


# ----------------------------------------------------------------------------- history parsing

def test_history_columns_with_steps_and_nulls():
    series = report.history_series({"step": [10, 20, 30], "loss": [0.5, None, 0.2], "lr": [1e-3, 1e-3, 5e-4],
                                    "note": "text", "flag": [True, False, True]})
    assert set(series) == {"loss", "lr"}
    x, y = series["loss"]
    assert x.tolist() == [10, 30] and y.tolist() == [0.5, 0.2]
    assert series["lr"][0].tolist() == [10, 20, 30]


def test_history_groups_and_records():
    series = report.history_series({
        "train": {"step": [1, 2, 3, 4], "loss": [4, 3, 2, 1]},
        "val": [{"step": 2, "loss": 3.5, "fraction_positive": 0.4}, {"step": 4, "loss": 2.5}],
        "epoch_loss": [9.0, 8.0],                       # no step axis: 0, 1, ...
    })
    assert set(series) == {"train/loss", "val/loss", "val/fraction_positive", "epoch_loss"}
    assert series["val/loss"][0].tolist() == [2, 4] and series["val/loss"][1].tolist() == [3.5, 2.5]
    assert series["val/fraction_positive"][0].tolist() == [2]
    assert series["epoch_loss"][0].tolist() == [0, 1]


def test_history_without_numbers_is_an_error():
    with pytest.raises(InputError, match=r"h\.json: no numeric training series"):
        report.history_series({"note": "nothing", "empty": []}, "h.json")


# ----------------------------------------------------------------------------- training report

def write_model(folder, history=True, curves=None):
    folder.mkdir(parents=True, exist_ok=True)
    if history:
        (folder / "history.json").write_text(json.dumps(
            {"step": [100, 200, 300], "loss": [0.31, 0.22, 0.1834], "val_loss": [0.35, 0.3, 0.2712]}))
    (folder / "model.json").write_text(json.dumps(
        {"architecture": "small_cnn", "distance": {"squared": True, "margin": 0.2}, "note": "<b>x</b>"}))
    if curves is not None:
        (folder / "curves.png").write_bytes(curves)
    return folder


def test_training_report_plots_history(tmp_path):
    model = write_model(tmp_path / "model")
    out = tmp_path / "out" / "training.html"
    report.write_training_report(model, out)
    html = out.read_text()
    pictures = images_in(html, "png")
    assert len(pictures) == 1
    assert Image.open(io.BytesIO(pictures[0])).format == "PNG"
    # Final values: last step and value of each series.
    assert re.search(r"<td>loss</td><td class=\"num\">300</td><td class=\"num\">0.1834</td>", html)
    assert re.search(r"<td>val_loss</td><td class=\"num\">300</td><td class=\"num\">0.2712</td>", html)
    assert "distance.squared" in html and "small_cnn" in html
    assert "&lt;b&gt;x&lt;/b&gt;" in html and "<b>x</b>" not in html
    assert sorted(p.name for p in out.parent.iterdir()) == ["training.html"]    # atomic: no temp left


def test_training_report_reads_train_records(tmp_path):
    """The layout train writes: {"train": [records], "val": [records]} (see export.py)."""
    folder = tmp_path / "model"
    folder.mkdir()
    record = {"loss": 0.2, "fraction_positive_triplets": 0.25, "mean_positive_distance": 0.4,
              "mean_negative_distance": 1.2}
    (folder / "history.json").write_text(json.dumps({
        "train": [dict(record, step=s, loss=1.0 / s) for s in (20, 40, 60)],
        "val": [dict(record, step=60, loss=0.0625)]}))
    out = tmp_path / "training.html"
    report.write_training_report(folder, out)
    html = out.read_text()
    assert len(images_in(html, "png")) == 1
    assert re.search(r"<td>train/loss</td><td class=\"num\">60</td><td class=\"num\">0.0167</td>", html)
    assert re.search(r"<td>val/loss</td><td class=\"num\">60</td><td class=\"num\">0.0625</td>", html)
    assert "val/fraction_positive_triplets" in html


def test_training_report_uses_curves_png(tmp_path):
    curves = png((200, 0, 0))
    model = write_model(tmp_path / "model", curves=curves)
    out = tmp_path / "training.html"
    report.write_training_report(model, out)
    assert images_in(out.read_text(), "png") == [curves]


def test_training_report_needs_history(tmp_path):
    model = write_model(tmp_path / "model", history=False, curves=png())
    with pytest.raises(InputError, match=r"history\.json"):
        report.write_training_report(model, tmp_path / "training.html")
    with pytest.raises(InputError, match="model folder not found"):
        report.write_training_report(tmp_path / "missing", tmp_path / "training.html")
    (model / "history.json").write_text("[1, 2]")
    with pytest.raises(InputError, match=r"history\.json: expected a JSON object"):
        report.write_training_report(model, tmp_path / "training.html")
    assert not (tmp_path / "training.html").exists()


# ----------------------------------------------------------------------------- evaluation report

METRICS = {"threshold": 1.05, "distance": "squared_l2", "val_accuracy": 0.91, "test_accuracy": 0.9,
           "test_kfold_accuracy_mean": 0.89, "test_kfold_accuracy_std": 0.02, "test_auc": 0.95,
           "test_eer": 0.1, "threshold_at_far_0.001": 0.41, "test_val_at_far_0.001": 0.3,
           "test_kfold_val_at_far_0.001_mean": 0.28, "test_kfold_val_at_far_0.001_std": 0.05,
           "seed_threshold": 1.542564, "test_accuracy_at_seed_threshold": 0.6,
           "val_pairs": 1200, "test_pairs": 6000}


def build(examples=(), history=None, curves=None, notes=("a < b & c",)):
    rng = np.random.default_rng(0)
    same = np.arange(100) % 2 == 0
    distances = np.where(same, rng.normal(0.7, 0.2, 100), rng.normal(1.4, 0.2, 100))
    return report.build_report_html(
        title="Eval <report>", model="gs://bucket/model", metrics=METRICS, distance_label="squared L2",
        threshold=1.05, seed_threshold=1.542564, test_distances=distances, test_same=same,
        rocs={"test pairs": ([0, 0.1, 1], [0, 0.8, 1]), "LFW pairs.txt": ([0, 0.2, 1], [0, 0.7, 1])},
        history=history, curves_png=curves, examples=list(examples), notes=list(notes))


def test_evaluation_report_sections_and_labels():
    html = build(history={"step": [1, 2], "loss": [1.0, 0.5]})
    for heading in ("Headline", "Method", "ROC curves", "Distances of test pairs", "Training curves",
                    "Example test pairs", "All metrics"):
        assert f"<h2>{heading}</h2>" in html
    assert "1.0500 (squared L2); same person when distance &lt; threshold" in html
    assert "0.8900 ± 0.0200" in html
    # Every threshold-valued metric carries the distance definition; rates do not.
    assert re.search(r"<td>threshold_at_far_0.001</td><td>[^<]*</td><td class=\"num\">0.4100 \(squared L2\)</td>",
                     html)
    assert re.search(r"<td>test_auc</td><td>[^<]*</td><td class=\"num\">0.9500</td>", html)
    assert '<td>test VAL @ FAR=0.001</td><td class="num">0.3000</td>' in html
    assert '<td>test k-fold VAL @ FAR=0.001</td><td class="num">0.2800 ± 0.0500</td>' in html
    assert "<title>Eval &lt;report&gt;</title>" in html and "a &lt; b &amp; c" in html
    assert len(images_in(html, "png")) == 3          # ROC, histogram, training curves
    assert html.count("No examples requested") == 1


def test_evaluation_report_without_training_history_says_so():
    html = build()
    assert "neither history.json nor curves.png" in html
    assert len(images_in(html, "png")) == 2


def test_example_pairs_are_escaped_and_marked():
    examples = [
        report.ExamplePair("Zoe_&_<Co>/Zoe_&_<Co>_0001.jpg", "Bob/Bob_0002.jpg", jpeg((200, 10, 10), 250),
                           jpeg((10, 200, 10)), distance=0.4, same=False, predicted_same=True),
        report.ExamplePair("Ann/Ann_0001.jpg", "Ann/Ann_0002.jpg", jpeg((1, 2, 200)), jpeg((1, 2, 190)),
                           distance=0.2, same=True, predicted_same=True),
    ]
    html = build(examples)
    assert html.count('<div class="pair wrong">') == 1 and html.count('<div class="pair correct">') == 1
    assert "Zoe_&amp;_&lt;Co&gt;/Zoe_&amp;_&lt;Co&gt;_0001.jpg" in html and "<Co>" not in html
    assert "distance 0.4000; verdict: same person" in html and "truth: different people" in html
    thumbs = images_in(html, "jpeg")
    assert len(thumbs) == 4
    sizes = [Image.open(io.BytesIO(t)).size for t in thumbs]
    assert sizes[0] == (report.THUMBNAIL_SIZE, report.THUMBNAIL_SIZE) and sizes[1] == (60, 60)
    assert "1 misclassified (red), 1 correct (green)" in html


def test_format_value_and_descriptions():
    assert report.format_value(6000) == "6,000"
    assert report.format_value(0.123456) == "0.1235"
    assert report.format_value(2.5e-5) == "2.500e-05"
    assert report.format_value(True) == "yes"
    assert report.describe_metric("test_kfold_val_at_far_0.01_mean") == "k-fold VAL on test at FAR 0.01 (mean over folds)"
    assert report.describe_metric("lfw_pairs_pairs") == "LFW pairs.txt: pairs"
    assert report.describe_metric("val_identities") == "validation: identities"
    rows = dict((name, value) for name, _, value in report.metric_rows(
        {"test_eer_threshold": 0.5, "lfw_pairs_accuracy_at_threshold": 0.75, "test_accuracy_at_seed_threshold": 0.5},
        "plain L2"))
    assert rows == {"test_eer_threshold": "0.5000 (plain L2)", "lfw_pairs_accuracy_at_threshold": "0.7500",
                    "test_accuracy_at_seed_threshold": "0.5000"}
    assert report.describe_metric("unknown_key") == ""


def test_histogram_keeps_the_axis_on_the_data():
    rng = np.random.default_rng(1)
    same = np.arange(200) % 2 == 0
    d = np.where(same, rng.uniform(0.0, 0.05, 200), rng.uniform(0.03, 0.2, 200))
    fig = report.histogram_figure(d, same, 0.04, "squared L2", seed_threshold=1.54)
    ax = fig.axes[0]
    assert ax.get_xlim()[1] < 0.25                     # the far seed threshold does not squash the plot
    labels = ax.get_legend_handles_labels()[1]
    assert "seed threshold 1.54 (off the axis, right)" in labels and "threshold 0.04" in labels
    fig = report.histogram_figure(d, same, 0.04, "squared L2", seed_threshold=0.1)
    assert "seed threshold 0.1" in fig.axes[0].get_legend_handles_labels()[1]


def test_flip_key_and_its_inverse():
    cases = {"test_accuracy": "test_flip_accuracy", "val_auc": "val_flip_auc", "threshold": "flip_threshold",
             "threshold_at_far_0.001": "flip_threshold_at_far_0.001",
             "lfw_pairs_kfold_accuracy_mean": "lfw_pairs_flip_kfold_accuracy_mean",
             "lfw_pairs_heldout_auc": "lfw_pairs_heldout_flip_auc"}
    for plain, flip in cases.items():
        assert report.flip_key(plain) == flip
        assert report.plain_key(flip) == (plain, True) and report.plain_key(plain) == (plain, False)


def test_descriptions_of_flip_held_out_and_overlap_metrics():
    assert report.describe_metric("test_flip_accuracy") == (
        "accuracy on test pairs at the validation threshold (flip: image + mirror embeddings)")
    assert report.describe_metric("lfw_pairs_heldout_kfold_accuracy_mean") == (
        "LFW pairs.txt, held-out identities: accuracy over seeded stratified folds")
    assert report.describe_metric("lfw_pairs_heldout_flip_auc") == (
        "LFW pairs.txt, held-out identities: area under the ROC curve (flip: image + mirror embeddings)")
    assert report.describe_metric("lfw_pairs_heldout_pairs") == "LFW pairs.txt, held-out identities: pairs"
    assert report.describe_metric("lfw_pairs_overlapping_pairs") == "LFW pairs.txt: pairs naming a training identity"
    assert report.describe_metric("test_positive_identities") == "test: identities in same-person pairs"
    assert report.describe_metric("flip_unknown") == ""
    rows = {name: value for name, _, value in report.metric_rows({"flip_threshold": 0.9}, "cosine distance")}
    assert rows == {"flip_threshold": "0.9000 (cosine distance)"}


FLIP_METRICS = {**METRICS, **{report.flip_key(k): v + 0.01 for k, v in METRICS.items()
                               if k not in ("distance", "val_pairs", "test_pairs", "seed_threshold")},
                "val_positive_identities": 12, "test_positive_identities": 34,
                "lfw_pairs_heldout_kfold_accuracy_mean": 0.81, "lfw_pairs_heldout_kfold_accuracy_std": 0.03,
                "lfw_pairs_heldout_auc": 0.88}


def build_with(metrics, warnings=(), seed_threshold=1.542564):
    same = np.arange(20) % 2 == 0
    return report.build_report_html(
        title="Eval", model="m", metrics=metrics, distance_label="squared L2", threshold=1.05,
        seed_threshold=seed_threshold, test_distances=np.where(same, 0.5, 1.5), test_same=same,
        rocs={"test pairs": ([0, 1], [0, 1])}, history=None, curves_png=None, examples=[], notes=["n"],
        warnings=list(warnings))


def headline(html):
    return html[html.index('<table class="headline">'):html.index("</table>")]


def test_headline_puts_flip_figures_next_to_the_plain_ones():
    table = headline(build_with(FLIP_METRICS))
    assert "<th>with flip</th>" in table
    assert ('<td>test accuracy</td><td class="num">0.9000</td><td class="num">0.9100</td>') in table
    assert ('<td>test k-fold accuracy</td><td class="num">0.8900 ± 0.0200</td>'
            '<td class="num">0.9000 ± 0.0300</td>') in table
    assert "1.0600 (squared L2); same person when distance &lt; threshold" in table
    assert '<td>LFW pairs.txt, held-out identities k-fold accuracy</td><td class="num">0.8100 ± 0.0300</td>' in table
    assert '<td>identities in same-person pairs (validation / test)</td><td class="num">12 / 34</td>' in table
    plain = headline(build_with(METRICS))
    assert "with flip" not in plain and '<td>test accuracy</td><td class="num">0.9000</td></tr>' in plain


def test_warnings_section_and_a_missing_seed_threshold():
    metrics = {k: v for k, v in METRICS.items() if "seed_threshold" not in k}
    html = build_with(metrics, warnings=["val: only 3 <identities>"], seed_threshold=None)
    assert "<h2>Warnings</h2>" in html and "<li>val: only 3 &lt;identities&gt;</li>" in html
    assert html.index("<h2>Warnings</h2>") < html.index("<h2>Headline</h2>")
    assert "seed threshold" not in headline(html)
    assert "<h2>Warnings</h2>" not in build_with(METRICS)


# ----------------------------------------------------------------------------- what the figures rest on

def headline_cells(html):
    """{label: [value cells]} of the headline table."""
    rows = re.findall(r"<tr><td>([^<]*)</td>((?:<td class=\"num\">[^<]*</td>)*)</tr>", headline(html))
    return {label: re.findall(r'<td class="num">([^<]*)</td>', cells) for label, cells in rows}


HELD_OUT_LFW = {**METRICS, "test_same_pairs": 3000, "test_different_pairs": 3000, "test_folds": 10,
                "test_folds_from_file": 0, "test_far_at_far_0.001": 0.0017,
                "val_same_pairs": 600, "val_different_pairs": 600,
                "lfw_pairs_pairs": 6000, "lfw_pairs_same_pairs": 3000, "lfw_pairs_different_pairs": 3000,
                "lfw_pairs_folds": 10, "lfw_pairs_folds_from_file": 1, "lfw_pairs_kfold_accuracy_mean": 0.97,
                "lfw_pairs_kfold_accuracy_std": 0.01, "lfw_pairs_auc": 0.99, "lfw_pairs_eer": 0.03,
                "lfw_pairs_kfold_val_at_far_0.001_needs_different_pairs": 1000,
                "lfw_pairs_heldout_pairs": 923, "lfw_pairs_heldout_same_pairs": 900,
                "lfw_pairs_heldout_different_pairs": 23, "lfw_pairs_heldout_accuracy_withheld": 1,
                "lfw_pairs_heldout_folds": 10, "lfw_pairs_heldout_kfold_accuracy_mean": 0.9892,
                "lfw_pairs_heldout_kfold_accuracy_std": 0.012, "lfw_pairs_heldout_auc": 0.9712,
                "lfw_pairs_heldout_eer": 0.0833,
                "lfw_pairs_heldout_kfold_val_at_far_0.001_needs_different_pairs": 1000}


def test_headline_withholds_accuracy_of_900_same_and_23_different_held_out_pairs():
    html = build_with(HELD_OUT_LFW)
    cells = headline_cells(html)
    assert cells["LFW pairs.txt, held-out identities pairs"] == ["900 same, 23 different in 10 seeded stratified folds"]
    assert cells["LFW pairs.txt, held-out identities accuracy"] == [
        "accuracy withheld: 23 different pairs (&lt; 100); answering &#x27;same&#x27; to all scores 0.975"]
    assert "LFW pairs.txt, held-out identities k-fold accuracy" not in cells
    assert cells["LFW pairs.txt, held-out identities ROC AUC"] == ["0.9712"]
    assert cells["LFW pairs.txt, held-out identities equal error rate"] == ["0.0833"]
    assert "0.9892" not in headline(html)
    # The sets with enough pairs keep their accuracies, beside their counts.
    assert cells["test pairs"] == ["3,000 same, 3,000 different in 10 seeded stratified folds"]
    assert cells["test accuracy"] == ["0.9000"] and cells["LFW pairs.txt k-fold accuracy"] == ["0.9700 ± 0.0100"]
    assert cells["LFW pairs.txt pairs"] == ["3,000 same, 3,000 different in the 10 folds of the file"]
    # The full table still lists the held-out accuracy, saying it is not a headline figure.
    assert re.search(r"<td>lfw_pairs_heldout_kfold_accuracy_mean</td><td>[^<]*not a headline figure: accuracy "
                     r"withheld: 23 different pairs[^<]*</td><td class=\"num\">0.9892</td>", html)


def test_headline_val_at_far_with_the_far_reached_or_na():
    cells = headline_cells(build_with(HELD_OUT_LFW))
    assert cells["test VAL @ FAR=0.001"] == ["0.3000 (FAR reached 0.0017)"]
    assert cells["test k-fold VAL @ FAR=0.001"] == ["0.2800 ± 0.0500"]
    assert cells["LFW pairs.txt k-fold VAL @ FAR=0.001"] == [
        "n/a (needs &gt;= 1,000 different pairs in each fold&#x27;s test part)"]
    demo = {k: v for k, v in METRICS.items() if "val_at_far" not in k}
    demo.update({"test_same_pairs": 97, "test_different_pairs": 97, "val_same_pairs": 96, "val_different_pairs": 96,
                 "test_val_at_far_0.001_needs_different_pairs": 1000,
                 "test_kfold_val_at_far_0.001_needs_different_pairs": 1000})
    html = build_with(demo)
    cells = headline_cells(html)
    assert cells["test VAL @ FAR=0.001"] == ["n/a (needs &gt;= 1,000 different pairs)"]
    assert cells["test k-fold VAL @ FAR=0.001"] == ["n/a (needs &gt;= 1,000 different pairs in each fold&#x27;s test part)"]
    assert cells["test accuracy"][0].startswith("accuracy withheld: 97 same and 97 different pairs")
    assert "test k-fold accuracy" not in cells and not [c for c in cells if "seed threshold" in c]
    assert cells["validation accuracy"][0].startswith("accuracy withheld: 96 same and")
    assert report.describe_metric("test_val_at_far_0.001_needs_different_pairs").startswith(
        "VAL on test at FAR 0.001 is n/a")
    assert report.describe_metric("lfw_pairs_heldout_different_pairs") == (
        "LFW pairs.txt, held-out identities: different-person pairs")


def test_headline_flip_column_follows_the_same_rules():
    metrics = {**HELD_OUT_LFW, "flip_threshold": 1.06, "test_flip_accuracy": 0.91, "test_flip_val_at_far_0.001": 0.31,
               "test_flip_far_at_far_0.001": 0.0021, "test_flip_kfold_val_at_far_0.001_needs_different_pairs": 1000,
               "lfw_pairs_heldout_flip_auc": 0.975}
    cells = headline_cells(build_with(metrics))
    assert cells["test VAL @ FAR=0.001"] == ["0.3000 (FAR reached 0.0017)", "0.3100 (FAR reached 0.0021)"]
    assert cells["test k-fold VAL @ FAR=0.001"] == [
        "0.2800 ± 0.0500", "n/a (needs &gt;= 1,000 different pairs in each fold&#x27;s test part)"]
    assert cells["LFW pairs.txt, held-out identities ROC AUC"] == ["0.9712", "0.9750"]
    assert cells["LFW pairs.txt, held-out identities accuracy"][1] == ""
