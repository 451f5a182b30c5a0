"""facenet_kfp.runs: the run table and summaries, independent of the order kfp.local ran tasks in."""

import random

from facenet_kfp.runs import TaskRecord, dag_order, key_figures, task_error


def test_table_is_in_dag_order_whatever_order_tasks_ran_in():
    names = ["1. download archive", "2. extract images", "3. label JSON", "4. complete to multiple of K",
             "5. identity splits", "6. train embeddings", "7. threshold evaluation"]
    rerun = ["import completion", "import images", "6. train embeddings", "7. threshold evaluation"]
    for expected in (names, rerun):
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


def test_failed_task_line_quotes_the_step_error_not_a_warning():
    log = ["12:00:01 WARNING facenet_kfp.extract: skipping P/P_0002.jpg: undecodable image (OSError: Truncated File Read)",
           "12:00:02 ERROR facenet_kfp: step extract failed: InputError: a.tgz: 80 of 100 images are unusable",
           "Traceback (most recent call last):",
           "facenet_kfp.errors.InputError: a.tgz: 80 of 100 images are unusable"]
    assert task_error(log) == "step extract failed: InputError: a.tgz: 80 of 100 images are unusable"
    # Without the step's line (a crash before logging was set up): the traceback's last exception.
    assert task_error(["ValueError: first", "  File x", "facenet_kfp.errors.InputError: last"]
                                ) == "facenet_kfp.errors.InputError: last"
    assert task_error(["nothing useful"]) == "see the task log above"


def test_the_headline_says_when_pairs_name_training_identities(capsys, tmp_path):
    from facenet_kfp.runs import report_summary

    metrics = {"test_accuracy": 0.9, "lfw_pairs_pairs": 6000, "lfw_pairs_overlapping_pairs": 5100,
               "lfw_pairs_train_identities": 3799, "lfw_pairs_heldout_kfold_accuracy_mean": 0.81}
    summary = {"pipeline": "facenet-kfp", "status": "SUCCEEDED", "tasks": [], "metrics": metrics}
    assert report_summary(summary, tmp_path / "summary.json") == 0
    out = capsys.readouterr().out
    assert "pairs.txt: 5,100 of 6,000 pairs name 3,799 training identities; on its held-out pairs: " \
           "10-fold accuracy 0.8100" in out
    del metrics["lfw_pairs_heldout_kfold_accuracy_mean"]
    report_summary(summary, tmp_path / "summary.json")
    assert "not a held-out benchmark" in capsys.readouterr().out
