"""facenet_kfp.runs: the run table and summaries, independent of the order kfp.local ran tasks in."""

import random
from pathlib import Path

import pytest

from facenet_kfp.runs import TaskRecord, dag_order, key_figures, task_error


def test_table_is_in_dag_order_whatever_order_tasks_ran_in():
    names = ["1. download archive", "2. extract images", "3. label JSON", "4. complete to multiple of K",
             "5. identity splits", "6. train embeddings", "7. threshold evaluation"]
    rerun = ["import completion", "import images", "6. train embeddings", "7. threshold evaluation"]
    # A step between two numbers has a letter: align follows both extracts, precedes labels.
    aligned = ["1. download archive", "1. download evaluation archive", "2. extract evaluation images",
               "2. extract images", "2a. align faces", "2a. align faces of the evaluation archive", "3. label JSON",
               "10. a tenth step"]
    for expected in (names, rerun, aligned):
        for seed in range(5):
            shuffled = [TaskRecord(name=n, display_name=n) for n in expected]
            random.Random(seed).shuffle(shuffled)
            assert [r.display_name for r in dag_order(shuffled)] == expected


def test_train_line_says_when_it_resumed():
    def train(start_step):
        return TaskRecord(name="train-model", display_name="6. train embeddings", status="SUCCEEDED",
                          outputs={"metrics": {"uri": "m", "metadata": {"steps": 400, "start_step": start_step}}})
    assert key_figures(train(300)) == "resumed at step 300, steps=400"
    assert key_figures(train(0)) == "steps=400"


def test_align_line_shows_its_fallbacks():
    """The align task (and the evaluation archive's, align-faces-2) reports how many images had no face found."""
    metadata = {"images": 13233.0, "identities": 5749.0, "align_fallbacks": 12.0,
                "align_fallback_examples": ["A/A_0001.jpg"], "detector": "mtcnn 1.0.0", "size": 112.0}
    for name in ("align-faces", "align-faces-2"):
        record = TaskRecord(name=name, display_name="2a. align faces", status="SUCCEEDED",
                            outputs={"images": {"uri": "i", "metadata": metadata}})
        assert key_figures(record) == "identities=5,749, images=13,233, align_fallbacks=12"


def test_failed_task_line_quotes_the_step_error_not_a_warning():
    log = ["12:00:01 WARNING facenet_kfp.extract: skipping P/P_0002.jpg: undecodable image (OSError: Truncated File Read)",
           "12:00:02 ERROR facenet_kfp: step extract failed: InputError: a.tgz: 80 of 100 images are unusable",
           "Traceback (most recent call last):",
           "facenet_kfp.errors.InputError: a.tgz: 80 of 100 images are unusable"]
    assert task_error(log) == "step extract failed: InputError: a.tgz: 80 of 100 images are unusable"
    # Without the step's line (a crash before logging was set up): the traceback's last exception.
    assert task_error(["ValueError: first", "  File x", "facenet_kfp.errors.InputError: last"]
                                ) == "facenet_kfp.errors.InputError: last"
    assert task_error(["nothing useful"]) == "see the task's log"


def test_the_headline_says_when_pairs_name_training_identities(capsys, tmp_path):
    from facenet_kfp.runs import report_summary

    metrics = {"test_accuracy": 0.9, "lfw_pairs_pairs": 6000, "lfw_pairs_overlapping_pairs": 5100,
               "lfw_pairs_train_identities": 3799, "lfw_pairs_heldout_kfold_accuracy_mean": 0.81,
               "lfw_pairs_heldout_kfold_accuracy_std": 0.02, "lfw_pairs_heldout_folds": 10,
               "lfw_pairs_heldout_pairs": 900, "lfw_pairs_heldout_same_pairs": 450,
               "lfw_pairs_heldout_different_pairs": 450}
    summary = {"pipeline": "facenet-kfp", "status": "SUCCEEDED", "tasks": [], "metrics": metrics}
    assert report_summary(summary, tmp_path / "summary.json") == 0
    out = capsys.readouterr().out
    assert "pairs.txt: 5,100 of 6,000 pairs name 3,799 training identities, so its figures are optimistic\n" \
           "  on its 900 held-out pairs: 450 same, 450 different (10 seeded stratified folds)\n" \
           "    10-fold accuracy: 0.8100 ± 0.0200\n" in out
    del metrics["lfw_pairs_heldout_kfold_accuracy_mean"]
    report_summary(summary, tmp_path / "summary.json")
    assert "not a held-out benchmark" in capsys.readouterr().out


# ----------------------------------------------------------------------------- figures and what they rest on

def summary_of(metrics: dict, tasks: list | None = None) -> dict:
    return {"pipeline": "facenet-kfp", "status": "SUCCEEDED", "tasks": tasks or [], "metrics": metrics}


# LFW's real pairs.txt on an archive holding its pair identities: 923 pairs of two held-out identities remain,
# 900 same and 23 different (as KFP metadata gives them: every number a float).
LFW_HELD_OUT = {
    "threshold": 0.61, "test_accuracy": 0.96, "test_kfold_accuracy_mean": 0.955, "test_kfold_accuracy_std": 0.01,
    "test_folds": 10.0, "test_folds_from_file": 0.0, "test_auc": 0.99, "test_eer": 0.04, "test_pairs": 3000.0,
    "test_same_pairs": 1500.0, "test_different_pairs": 1500.0,
    "test_val_at_far_0.001": 0.62, "test_far_at_far_0.001": 0.0013,
    "test_kfold_val_at_far_0.001_needs_different_pairs": 1000.0,
    "lfw_pairs_pairs": 6000.0, "lfw_pairs_same_pairs": 3000.0, "lfw_pairs_different_pairs": 3000.0,
    "lfw_pairs_folds": 10.0, "lfw_pairs_folds_from_file": 1.0, "lfw_pairs_kfold_accuracy_mean": 0.97,
    "lfw_pairs_kfold_accuracy_std": 0.01, "lfw_pairs_auc": 0.995, "lfw_pairs_eer": 0.03,
    "lfw_pairs_kfold_val_at_far_0.001_needs_different_pairs": 1000.0,
    "lfw_pairs_overlapping_pairs": 5077.0, "lfw_pairs_train_identities": 3799.0,
    "lfw_pairs_heldout_pairs": 923.0, "lfw_pairs_heldout_same_pairs": 900.0,
    "lfw_pairs_heldout_different_pairs": 23.0, "lfw_pairs_heldout_folds": 10.0,
    "lfw_pairs_heldout_kfold_accuracy_mean": 0.9892, "lfw_pairs_heldout_kfold_accuracy_std": 0.012,
    "lfw_pairs_heldout_auc": 0.9712, "lfw_pairs_heldout_eer": 0.0833, "lfw_pairs_heldout_accuracy_withheld": 1.0,
    "lfw_pairs_heldout_kfold_val_at_far_0.001_needs_different_pairs": 1000.0}


def test_held_out_pairs_with_23_different_pairs_print_counts_not_accuracy(capsys, tmp_path):
    from facenet_kfp.runs import report_summary

    assert report_summary(summary_of(dict(LFW_HELD_OUT)), tmp_path / "summary.json") == 0
    out = capsys.readouterr().out
    held = out[out.index("on its 923 held-out pairs"):out.index("summary:")]
    assert held.splitlines()[:3] == [
        "on its 923 held-out pairs: 900 same, 23 different (10 seeded stratified folds)",
        "    AUC: 0.9712  EER: 0.0833",
        "    accuracy withheld: 23 different pairs (< 100); answering 'same' to all scores 0.975"]
    assert "0.9892" not in out and "accuracy: 0.98" not in held
    # The other pair sets have enough of both classes: their accuracies are headline figures, with their counts.
    assert "test pairs: 1,500 same, 1,500 different (10 seeded stratified folds)\n" \
           "  test accuracy: 0.9600  10-fold accuracy: 0.9550 ± 0.0100  AUC: 0.9900" in out
    assert "pairs.txt: 3,000 same, 3,000 different (the file's 10 folds)\n  10-fold accuracy: 0.9700 ± 0.0100" in out


def test_the_threshold_of_100_pairs_per_class_is_the_boundary(capsys, tmp_path):
    from facenet_kfp.metrics import MIN_CLASS_PAIRS
    from facenet_kfp.runs import headline_lines

    metrics = {"test_accuracy": 0.9, "test_kfold_accuracy_mean": 0.89, "test_auc": 0.95, "test_eer": 0.1}
    at = headline_lines({**metrics, "test_same_pairs": MIN_CLASS_PAIRS, "test_different_pairs": MIN_CLASS_PAIRS})
    below = headline_lines({**metrics, "test_same_pairs": MIN_CLASS_PAIRS, "test_different_pairs": MIN_CLASS_PAIRS - 1})
    assert "test accuracy: 0.9000" in "\n".join(at) and "withheld" not in "\n".join(at)
    assert "0.9000" not in "\n".join(below) and "0.8900" not in "\n".join(below)
    assert "  accuracy withheld: 99 different pairs (< 100); answering 'same' to all scores 0.503" \
        in below


def test_demo_headline_val_at_far_is_na_on_97_different_pairs(capsys, tmp_path):
    """The demo's test split: 97 same and 97 different pairs, VAL@FAR at 1e-3 and 1e-2."""
    from facenet_kfp.runs import report_summary

    metrics = {"threshold": 0.4808, "test_accuracy": 0.9485, "test_kfold_accuracy_mean": 0.9444,
               "test_kfold_accuracy_std": 0.0522, "test_folds": 10.0, "test_folds_from_file": 0.0, "test_auc": 0.978,
               "test_eer": 0.0722, "test_pairs": 194.0, "test_same_pairs": 97.0, "test_different_pairs": 97.0,
               "test_val_at_far_0.001_needs_different_pairs": 1000.0,
               "test_kfold_val_at_far_0.001_needs_different_pairs": 1000.0,
               "test_val_at_far_0.01_needs_different_pairs": 100.0,
               "test_kfold_val_at_far_0.01_needs_different_pairs": 100.0}
    task = {"name": "evaluate-model", "display_name": "8. threshold evaluation", "status": "SUCCEEDED",
            "seconds": 7.5, "outputs": {"metrics": {"uri": "m", "metadata": metrics}}}
    report_summary(summary_of(metrics, [task]), tmp_path / "summary.json")
    out = capsys.readouterr().out
    # Neither VAL nor its k-fold variant can be measured: one line per target FAR says so for both.
    assert ("  VAL@FAR=1e-3 and its k-fold variant: n/a (needs >= 1,000 different pairs, in each fold for "
            "k-fold)\n") in out
    assert ("  VAL@FAR=1e-2 and its k-fold variant: n/a (needs >= 100 different pairs, in each fold for "
            "k-fold)\n") in out
    assert "test pairs: 97 same, 97 different (10 seeded stratified folds)\n  AUC: 0.9780  EER: 0.0722  threshold: 0.4808\n" \
           "  accuracy withheld: 97 same and 97 different pairs (< 100 each); answering 'same' to " \
           "all scores 0.500\n" in out
    assert "0.9485" not in out and "0.9444" not in out
    from facenet_kfp.runs import TaskRecord, key_figures
    line = key_figures(TaskRecord(name=task["name"], display_name=task["display_name"], outputs=task["outputs"]))
    assert line == "test_pairs=194 (97 same, 97 different), test_accuracy withheld, test_auc=0.978, threshold=0.4808"


def test_val_at_far_prints_the_far_reached_beside_every_val(capsys):
    from facenet_kfp.runs import headline_lines

    metrics = {"test_same_pairs": 3000, "test_different_pairs": 3000, "test_auc": 0.99,
               "test_val_at_far_0.001": 0.61, "test_far_at_far_0.001": 0.0017,
               "test_kfold_val_at_far_0.001_needs_different_pairs": 1000,
               "test_val_at_far_0.01": 0.8, "test_far_at_far_0.01": 0.0093,
               "test_kfold_val_at_far_0.01_mean": 0.79, "test_kfold_val_at_far_0.01_std": 0.03,
               "test_kfold_far_at_far_0.01_mean": 0.011}
    lines = headline_lines(metrics)
    assert "  VAL@FAR=1e-3: 0.6100 (FAR reached 0.0017)" in lines
    assert "  k-fold VAL@FAR=1e-3: n/a (needs >= 1,000 different pairs per fold)" in lines
    assert ("  VAL@FAR=1e-2: 0.8000 (FAR reached 0.0093)  k-fold VAL@FAR=1e-2: 0.7900 ± 0.0300 "
            "(FAR reached 0.0110)") in lines


def test_folds_of_the_evaluation_archive_pairs_file_are_named(capsys):
    from facenet_kfp.runs import headline_lines

    base = {"eval_identities": 100.0, "eval_images": 600.0, "eval_identities_in_training_archive": 0.0,
            "eval_identities_in_train_split": 0.0, "test_same_pairs": 1200.0, "test_different_pairs": 1200.0,
            "test_kfold_accuracy_mean": 0.9, "test_kfold_accuracy_std": 0.01, "lfw_pairs_pairs": 2400.0,
            "lfw_pairs_same_pairs": 1200.0, "lfw_pairs_different_pairs": 1200.0}
    four = headline_lines({**base, "test_folds": 4.0, "test_folds_from_file": 1.0})
    assert "test pairs (the evaluation archive's pairs.txt): 1,200 same, 1,200 different (the file's 4 folds)" in four
    assert "  4-fold accuracy: 0.9000 ± 0.0100" in four
    one = headline_lines({**base, "test_folds": 10.0, "test_folds_from_file": 0.0})
    assert ("test pairs (the evaluation archive's pairs.txt): 1,200 same, 1,200 different "
            "(10 seeded stratified folds; the file declares one fold)") in one
    # The pairs file is the test set here: its figures are not printed twice.
    assert not [line for line in four + one if line.startswith("pairs.txt")]


@pytest.mark.parametrize("value, text", [(11053.0, "11,053"), (11053, "11,053"), (3.0, "3"), (0.0, "0"),
                                         (1234567.0, "1,234,567"), (0.978, "0.978"), (0.48081, "0.4808"),
                                         (12345.6, "12,345.6"), (float("nan"), "nan"), (True, "True")])
def test_format_figure_prints_counts_as_integers(value, text):
    from facenet_kfp.runs import format_figure

    assert format_figure(value) == text


def test_counts_in_the_run_table_print_as_integers():
    """KFP metadata turns every int into a float; the table still prints counts as integers."""
    record = TaskRecord(name="extract-images", display_name="2. extract images", status="SUCCEEDED", outputs={
        "images": {"uri": "i", "metadata": {"identities": 5749.0, "images": 11053.0, "skipped_total": 0.0,
                                            "shards": 3.0}}})
    line = key_figures(record)
    assert line == "identities=5,749, images=11,053, skipped_total=0, shards=3"
    assert "e+" not in line
    splits = TaskRecord(name="split-identities", display_name="5. identity splits", outputs={
        "splits": {"uri": "s", "metadata": {"train": {"identities": 10575.0}, "val": {"identities": 1200.0},
                                            "test": {"identities": 1300.0}}}})
    assert key_figures(splits) == "train_identities=10,575, val_identities=1,200, test_identities=1,300"


# --- task logs and the table in a terminal ------------------------------------------------------

def test_tee_writes_whole_lines_without_colour_codes_and_keeps_the_last(tmp_path):
    from facenet_kfp.runs import Tee

    seen = []
    with open(tmp_path / "task.log", "w") as log:
        tee = Tee(log, seen.append, keep=3)
        tee.write("\x1b[96m'train-model'\x1b[0m starts\nhalf a ")
        assert seen == ["\x1b[96m'train-model'\x1b[0m starts"]      # the console gets what was written
        tee.write("line\n[#####     ] 50%\r[##########] 100%\n")
        tee.write("1\n2\nno newline at the end")
        tee.finish()
    assert (tmp_path / "task.log").read_text().splitlines() == [
        "'train-model' starts", "half a line", "[##########] 100%", "1", "2", "no newline at the end"]
    assert tee.lines == ["1", "2", "no newline at the end"]
    assert seen[1:] == ["half a line", "[##########] 100%", "1", "2", "no newline at the end"]


def test_table_fits_100_columns_and_a_failed_task_names_its_log(capsys, tmp_path, monkeypatch):
    from facenet_kfp.runs import report_summary

    monkeypatch.setenv("COLUMNS", "100")
    log = "/runs/root/logs/train-model.log"
    tasks = [{"name": "split-identities", "display_name": "5. identity splits", "status": "CACHED", "seconds": 0.1,
              "outputs": {"splits": {"uri": "s", "metadata": {
                  "train": {"identities": 9600}, "val": {"identities": 1200}, "test": {"identities": 1200}}}}},
             {"name": "train-model", "display_name": "6. train embeddings", "status": "FAILED", "seconds": 12.5,
              "outputs": {}, "log": log,
              "error": "step train failed: FacenetError: training collapsed: the mean negative distance stayed "
                       "below 0.01 for 200 steps; lower train.learning_rate"}]
    summary = {"pipeline": "facenet-kfp", "status": "FAILED", "error": "task train-model failed", "tasks": tasks,
               "metrics": {}, "logs": "/runs/root/logs"}
    monkeypatch.chdir(tmp_path)     # a short summary path: pytest's temporary folders vary in length
    assert report_summary(summary, Path("summary.json")) == 1
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 100, out
    assert "cached" in out and "FAILED" in out
    assert f"{log})" in out.split()          # "(log: PATH)": the path whole, never broken
    assert "lower train.learning_rate" in " ".join(out.split())
    assert "task logs:      /runs/root/logs" in out


def test_table_cell_breaks_between_figures_and_keeps_paths_whole():
    from facenet_kfp.runs import table_cell

    assert table_cell("a=1, b=2, c=3", 9) == ["a=1, b=2,", "c=3"]
    assert table_cell("a=1, b=2", 40) == ["a=1, b=2"]
    path = "/a/very/long/path/" + "x" * 60 + ".log"
    assert table_cell(f"failed (log: {path})", 30) == ["failed (log:", f"{path})"]
    assert all(len(line) <= 30 for line in table_cell("val loss 0.347 -> 0.112, val positive triplets "
                                                      "0.335 -> 0.027, steps=400", 30))


def test_paths_point_at_the_copies_for_people(capsys, tmp_path):
    """report: names report.html (a browser renders it), not the artifact file named `report`."""
    from facenet_kfp.runs import report_summary

    metrics = {"model_uri": "/r/x/train-model/model", "report_uri": "/r/x/evaluate-model/report",
               "threshold_uri": "/r/x/evaluate-model/threshold"}
    summary = {"pipeline": "facenet-kfp", "status": "SUCCEEDED", "tasks": [], "metrics": metrics,
               "report_html": "/r/report.html", "threshold_json": "/r/threshold.json", "logs": "/r/logs"}
    report_summary(summary, tmp_path / "summary.json")
    lines = capsys.readouterr().out.splitlines()
    assert lines[-5:] == ["trained model:  /r/x/train-model/model", "report:         /r/report.html",
                          "threshold.json: /r/threshold.json", "task logs:      /r/logs",
                          f"summary:        {tmp_path / 'summary.json'}"]
    # A summary without copies (an older one): the artifacts.
    del summary["report_html"], summary["threshold_json"]
    report_summary(summary, tmp_path / "summary.json")
    out = capsys.readouterr().out
    assert "report:         /r/x/evaluate-model/report" in out and "threshold.json: /r/x/evaluate-model/threshold" in out


def test_a_pairs_check_without_a_pairs_file_says_so():
    from facenet_kfp.runs import TaskRecord, key_figures

    def line(metadata: dict) -> str:
        return key_figures(TaskRecord(name="check-pairs", display_name="6. check pairs.txt",
                                      outputs={"pairs": {"uri": "p", "metadata": metadata}}))

    assert line({"pairs_uri": "", "pairs": 0.0, "note": "no pairs file given"}) == "no pairs.txt given"
    assert line({"pairs_uri": "/data/pairs.txt", "pairs": 6000.0, "same_pairs": 3000.0,
                 "different_pairs": 3000.0, "folds": 10.0, "duplicates": 0.0}) == \
        "pairs=6,000, same_pairs=3,000, different_pairs=3,000, folds=10, duplicates=0"


def test_runs_re_exports_what_a_run_reads():
    """Callers import the input readers from runs; they are run_inputs's own objects, not copies."""
    from facenet_kfp import run_inputs, runs

    for name in ("MARKERS", "SUMMARY", "RERUN_SUMMARY", "Producer", "artifacts_from_summary", "check_inputs",
                 "data_sources", "ensure_demo_archive", "resolve_source", "resolve_sources", "step_overrides",
                 "used_evaluation_archive", "with_eval_source"):
        assert getattr(runs, name) is getattr(run_inputs, name), name
    assert (runs.SUMMARY, runs.RERUN_SUMMARY) == ("summary.json", "rerun-summary.json")
