"""The local runner end to end (kfp.local SubprocessRunner): a real run, its cache, failures, what data it uses."""

import hashlib
import io
import json
import re
import socket
from pathlib import Path

import pytest
import yaml

from pipelines import run_local
from facenet_kfp.runs import data_sources
from pipelines.run_local import run_pipeline

ROOT = Path(__file__).resolve().parents[1]
LFW = yaml.safe_load((ROOT / "configs/lfw.yaml").read_text())["data"]
# The eight tasks in DAG order (the step numbers of their display names).
TASKS = ["download-archive", "extract-images", "make-labels", "complete-identities",
         "split-identities", "check-pairs", "train-model", "evaluate-model"]
# Floors (chance: 0.5) of the tiny config on the 40-identity demo archive. Measured with train,
# split and completion seed s = 0..7: test AUC 0.82-0.99, test accuracy 0.67-0.93 (a threshold
# chosen on 2-5 validation identities, tested on 2-5 others), on the demo pairs.txt AUC 0.91-0.96
# and 10-fold accuracy 0.83-0.91. The test runs s = 0: 0.90, 0.70, 0.94 and 0.88.
FLOORS = {"test_auc": 0.75, "test_accuracy": 0.6, "lfw_pairs_auc": 0.85, "lfw_pairs_kfold_accuracy_mean": 0.75}


def write_config(folder: Path, name: str, config: dict) -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    """The demo config cut to about a minute on 2 CPU cores; it names no source (the demo archive)."""
    config = yaml.safe_load((ROOT / "configs/demo.yaml").read_text())
    config["train"].update(max_steps=60, validate_every=15, checkpoint_every=15, log_every=5,
                           image_size=32, p=8, validation_batches=2)
    config["evaluate"].update(max_positive_pairs=200, report_examples=4)
    return write_config(tmp_path_factory.mktemp("cfg"), "tiny.yaml", config)


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# What a run prints per task by default (pipelines.run_local.Console): "HH:MM:SS  <display name>: ..."
TASK_LINE = re.compile(r"^\d\d:\d\d:\d\d  (?P<task>\d\. [^:]+): (?P<what>started|ran in [\d.]+ s|cache hit|FAILED .*)$")
PROGRESS = re.compile(r"^ {10}\S")


def check_quiet_output(out: str, summary: dict) -> list[str]:
    """The default output of a run: one line as each task starts (not for a cache hit) and as it ends,
    progress lines between them, never kfp.local's stream or colour codes; returns the other lines."""
    assert "executor_input" not in out and "\x1b[" not in out and "cuInit" not in out
    lines = out.splitlines()
    seen = [m.groupdict() for line in lines if (m := TASK_LINE.match(line))]
    for task in summary["tasks"]:
        mine = [s["what"] for s in seen if s["task"] == task["display_name"]]
        expected = {"SUCCEEDED": ["started", "ran in"], "CACHED": ["cache hit"], "FAILED": ["started", "FAILED"]}
        assert [w.split(" ")[0] for w in mine] == [e.split(" ")[0] for e in expected[task["status"]]], (task, mine)
    assert len(seen) == sum(1 if t["status"] == "CACHED" else 2 for t in summary["tasks"])
    progress = [line for line in lines if PROGRESS.match(line)]
    assert all(re.search(r"(left|elapsed|done in \d+:\d\d)$", line) for line in progress), progress
    return [line for line in lines if not TASK_LINE.match(line) and not PROGRESS.match(line)]


def check_task_logs(root: Path, summary: dict) -> None:
    """Every task's whole output is in <root>/logs/<task>.log, without colour codes."""
    for task in summary["tasks"]:
        log = root / "logs" / f"{task['name']}.log"
        assert task["log"] == str(log) and log.is_file()
        text = log.read_text()
        assert "\x1b[" not in text
        if task["status"] == "SUCCEEDED":     # the last run's section holds the step's own lines
            section = text.rsplit("===== ", 1)[-1]
            assert "executor_input" in section and "done in" in section, section[-2000:]


# --- real runs ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_demo_run_end_to_end_then_from_cache(tmp_path, demo_archive, tiny_config, capsys):
    """No source anywhere: the demo archive and (PAIRS=demo) its pairs.txt, checked by sha256."""
    root = tmp_path / "outputs"
    first = run_pipeline(str(tiny_config), None, None, "demo", str(root), demo_dir=str(demo_archive["dir"]))
    assert first["status"] == "SUCCEEDED", first.get("error")
    # Quiet by default: the task lines only (and progress lines); the whole stream in the task logs.
    assert check_quiet_output(capsys.readouterr().out, first) == []
    check_task_logs(root, first)
    assert [(t["name"], t["status"]) for t in first["tasks"]] == [(name, "SUCCEEDED") for name in TASKS]
    assert [t["display_name"][:2] for t in first["tasks"]] == [f"{n}." for n in range(1, len(TASKS) + 1)]
    assert json.loads((root / "summary.json").read_text()) == first
    assert first["source_uri"] == str(demo_archive["archive"]) and first["pairs_uri"] == str(demo_archive["pairs"])

    outputs = {t["name"]: t["outputs"] for t in first["tasks"]}
    assert outputs["download-archive"]["archive"]["metadata"]["sha256"] == demo_archive["sha256"]
    images = Path(outputs["extract-images"]["images"]["uri"])
    assert (images / "manifest.jsonl").is_file() and len(list((images / "shards").glob("*.tar"))) >= 1

    # Evaluation artifacts the UI renders: metrics, ROC + confusion matrix, HTML report, threshold.json.
    evaluation = outputs["evaluate-model"]
    metrics = evaluation["metrics"]["metadata"]
    # The tiny run beats chance on held-out identities and on the demo pairs.txt.
    assert {key: metrics[key] for key in FLOORS if metrics[key] < FLOORS[key]} == {}
    roc = evaluation["roc"]["metadata"]
    assert len(roc["confidenceMetrics"]) >= 2 and roc["confusionMatrix"]["annotationSpecs"]
    report = Path(evaluation["report"]["uri"]).read_text()
    assert "<html" in report.lower() and "data:image/png;base64" in report
    threshold = json.loads(Path(evaluation["threshold"]["uri"]).read_text())
    assert threshold["threshold"] == metrics["threshold"] and threshold["distance"] == "squared_l2"
    assert first["metrics"]["test_accuracy"] == metrics["test_accuracy"]
    # Copies for people in the pipeline root: report.html opens in a browser.
    assert (first["report_html"], first["threshold_json"]) == (str(root / "report.html"), str(root / "threshold.json"))
    assert (root / "report.html").read_text() == report
    assert json.loads((root / "threshold.json").read_text()) == threshold

    second = run_pipeline(str(tiny_config), None, None, "demo", str(root), demo_dir=str(demo_archive["dir"]))
    assert [(t["name"], t["status"]) for t in second["tasks"]] == [(name, "CACHED") for name in TASKS]
    assert second["metrics"]["test_accuracy"] == metrics["test_accuracy"]
    assert check_quiet_output(capsys.readouterr().out, second) == []
    assert second["report_html"] == str(root / "report.html")      # a cached evaluation is this run's too

    # A wrong pairs checksum reaches the pairs check (a new cache key there only) and fails it before
    # training; independent data steps may or may not have come from the cache before it stopped.
    third = run_pipeline(str(tiny_config), None, None, "demo", str(root), demo_dir=str(demo_archive["dir"]),
                         pairs_sha256="0" * 64)
    statuses = {t["name"]: t["status"] for t in third["tasks"]}
    assert statuses.pop("check-pairs") == "FAILED" and set(statuses.values()) == {"CACHED"}
    assert not {"train-model", "evaluate-model"} & set(statuses)
    assert "check-pairs" in third["error"] and "sha256" in third["error"]
    assert check_quiet_output(capsys.readouterr().out, third) == []
    failed_log, [failed] = root / "logs" / "check-pairs.log", [t for t in third["tasks"] if t["status"] == "FAILED"]
    assert failed["log"] == str(failed_log)
    assert failed["error"] in failed_log.read_text().rsplit("===== ", 1)[-1]
    assert "report_html" not in third                                # a failed run copies nothing
    assert (root / "report.html").read_text() == report             # and leaves the last copies

    # `make run SET=...`: a config key typed by its field; only the step that reads it runs again.
    code = run_local.main(["--config", str(tiny_config), "--pipeline-root", str(root), "--pairs", "demo",
                           "--demo-dir", str(demo_archive["dir"]), "--set", "evaluate.report_examples=2",
                           "--set", "eval_seed=1"])
    assert code == 0
    fourth = json.loads((root / "summary.json").read_text())
    assert [(t["name"], t["status"]) for t in fourth["tasks"]] == \
        [(name, "CACHED") for name in TASKS[:-1]] + [("evaluate-model", "SUCCEEDED")]
    # `make run`'s whole output: task lines, then the table, the headline and the paths (about 40 lines).
    captured = capsys.readouterr()
    rest = check_quiet_output(captured.out, fourth)
    assert len(captured.out.splitlines()) - len(rest) == len(TASKS) + 1     # a line per cache hit, two for evaluate
    table = rest[:rest.index("", 1)] if "" in rest[1:] else rest
    assert table[:3] == ["", "facenet-kfp: SUCCEEDED", "  task                          seconds  key figures"]
    assert len(table) <= 3 + 2 * len(TASKS) + 1, table      # a row takes at most two lines at 100 columns
    assert all(len(line) <= 100 for line in table), table
    # The headline figures follow (their lines: tests/test_runs.py); the whole output stays short.
    assert len(captured.out.splitlines()) <= 60, captured.out
    assert "\x1b[" not in captured.err and "executor_input" not in captured.err
    new_report = Path(fourth["tasks"][-1]["outputs"]["report"]["uri"])
    assert new_report != Path(evaluation["report"]["uri"])
    assert (root / "report.html").read_text() == new_report.read_text()
    for label, path in (("report:", root / "report.html"), ("threshold.json:", root / "threshold.json"),
                        ("task logs:", root / "logs"), ("summary:", root / "summary.json")):
        assert f"{label:<15} {path}" in rest

    # VERBOSE=1: kfp.local's whole stream (here: cache hits), still without colour codes off a terminal.
    assert run_local.main(["--config", str(tiny_config), "--pipeline-root", str(root), "--pairs", "demo",
                           "--demo-dir", str(demo_archive["dir"]), "--set", "evaluate.report_examples=2",
                           "--set", "eval_seed=1", "--verbose"]) == 0
    verbose = capsys.readouterr().out
    assert "Running pipeline" in verbose and "cache hit" in verbose and "\x1b[" not in verbose
    assert not TASK_LINE.search(verbose.splitlines()[0])


@pytest.mark.slow
def test_failed_download_fails_the_run_and_names_it(tmp_path, demo_archive, tiny_config, capsys):
    summary = run_pipeline(str(tiny_config), str(demo_archive["archive"]), "0" * 64, None,
                           str(tmp_path / "outputs"))
    assert summary["status"] == "FAILED"
    assert [(t["name"], t["status"]) for t in summary["tasks"]] == [("download-archive", "FAILED")]
    assert "download-archive" in summary["error"] and "sha256" in summary["error"]
    assert json.loads((tmp_path / "outputs" / "summary.json").read_text()) == summary
    log = tmp_path / "outputs" / "logs" / "download-archive.log"
    assert check_quiet_output(capsys.readouterr().out, summary) == []
    assert summary["tasks"][0]["log"] == str(log) and "Traceback" in log.read_text()
    assert "report_html" not in summary and not (tmp_path / "outputs" / "report.html").exists()


@pytest.mark.slow
def test_config_source_is_downloaded_and_offline_fails_at_step_1(tmp_path, capsys):
    """configs/lfw.yaml with its URL made unreachable: no demo archive, one failed task, a clear error."""
    url = f"http://127.0.0.1:{closed_port()}/lfw.tgz"
    config = yaml.safe_load((ROOT / "configs/lfw.yaml").read_text())
    config["data"]["source_uri"] = url
    path = write_config(tmp_path, "lfw-offline.yaml", config)
    demo_dir, root = tmp_path / "demo", tmp_path / "outputs"
    code = run_local.main(["--config", str(path), "--pipeline-root", str(root), "--demo-dir", str(demo_dir)])
    captured = capsys.readouterr()
    assert code == 1
    error = captured.err.strip().splitlines()[-1]
    assert error.startswith("error: task download-archive failed:") and url in error
    log = root / "logs" / "download-archive.log"
    assert f"FAILED after" in captured.out and f"(log: {log})" in captured.out   # the task line
    assert re.search(rf"1\. download archive +FAILED +.*\(log:\s+{re.escape(str(log))}\)", captured.out, re.S)
    assert "executor_input" not in captured.out + captured.err and log.is_file()
    assert "connection failed" in error and "refused" in error.lower()
    summary = json.loads((root / "summary.json").read_text())
    assert summary["source_uri"] == url
    assert [(t["name"], t["status"]) for t in summary["tasks"]] == [("download-archive", "FAILED")]
    assert not demo_dir.exists()


# --- which archive and pairs file a run uses ----------------------------------------------------

def test_demo_archive_only_when_nothing_names_a_source(tmp_path, demo_archive, tiny_config):
    demo = str(demo_archive["dir"])
    used = data_sources(str(tiny_config), None, None, None, None, demo, 40, 3, {})
    assert used == {"source_uri": str(demo_archive["archive"]), "sha256": demo_archive["sha256"],
                    "pairs_uri": "", "pairs_sha256": ""}
    lfw = data_sources(str(ROOT / "configs/lfw.yaml"), None, None, None, None, str(tmp_path / "demo"), 40, 3, {})
    assert lfw == {key: LFW[key] for key in ("source_uri", "sha256", "pairs_uri", "pairs_sha256")}
    assert not (tmp_path / "demo").exists()
    # SOURCE wins; it keeps the config's checksum only when it is the config's archive.
    other = data_sources(str(ROOT / "configs/lfw.yaml"), "/data/lfw.tgz", None, None, None, demo, 40, 3, {})
    assert (other["source_uri"], other["sha256"]) == ("/data/lfw.tgz", "")
    same = data_sources(str(ROOT / "configs/lfw.yaml"), LFW["source_uri"], None, None, None, demo, 40, 3, {})
    assert same["sha256"] == LFW["sha256"]
    given = data_sources(str(tiny_config), "/data/lfw.tgz", "a" * 64, None, None, demo, 40, 3, {})
    assert (given["source_uri"], given["sha256"]) == ("/data/lfw.tgz", "a" * 64)


def test_pairs_keep_or_set_a_checksum(tmp_path, demo_archive, tiny_config):
    demo, lfw = str(demo_archive["dir"]), str(ROOT / "configs/lfw.yaml")
    same = data_sources(lfw, None, None, LFW["pairs_uri"], None, demo, 40, 3, {})
    assert (same["pairs_uri"], same["pairs_sha256"]) == (LFW["pairs_uri"], LFW["pairs_sha256"])
    other = data_sources(lfw, None, None, "/data/pairs.txt", None, demo, 40, 3, {})
    assert (other["pairs_uri"], other["pairs_sha256"]) == ("/data/pairs.txt", "")
    given = data_sources(lfw, None, None, "/data/pairs.txt", "b" * 64, demo, 40, 3, {})
    assert (given["pairs_uri"], given["pairs_sha256"]) == ("/data/pairs.txt", "b" * 64)
    config_pairs = data_sources(lfw, None, None, None, "c" * 64, demo, 40, 3, {})
    assert (config_pairs["pairs_uri"], config_pairs["pairs_sha256"]) == (LFW["pairs_uri"], "c" * 64)
    demo_pairs = data_sources(str(tiny_config), None, None, "demo", None, demo, 40, 3, {})
    assert demo_pairs["pairs_uri"] == str(demo_archive["pairs"])
    assert demo_pairs["pairs_sha256"] == hashlib.sha256(demo_archive["pairs"].read_bytes()).hexdigest()


@pytest.mark.parametrize("argv, message", [
    (["--config", str(ROOT / "configs/lfw.yaml"), "--pairs", "demo"], "--pairs demo is the demo archive's pairs.txt"),
    (["--pairs-sha256", "d" * 64], "--pairs-sha256 needs a pairs file"),
    (["--pairs", "/data/pairs.txt", "--pairs-sha256", "xyz"], "data.pairs_sha256 must be 64 hex digits"),
    (["--set", "train.max_steps=0"], "train.max_steps must be at least 1, got 0"),
    (["--set", "train.max_steps=ten"], "--set train.max_steps must be int, got 'ten'"),
    (["--set", "train.k=8"], "train.k (8) must equal data.multiple (4)"),
])
def test_source_and_pairs_usage_errors_exit_2(tmp_path, capsys, demo_archive, tiny_config, argv, message):
    argv = ["--config", str(tiny_config), *argv] if "--config" not in argv else argv
    code = run_local.main([*argv, "--pipeline-root", str(tmp_path / "out"), "--demo-dir", str(demo_archive["dir"])])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --- what a run shows while it runs (no pipeline) -----------------------------------------------

class FakeTerminal(io.StringIO):
    def __init__(self, terminal: bool):
        super().__init__()
        self.terminal = terminal

    def isatty(self) -> bool:
        return self.terminal


def console_run(console, clock, task: str, lines: list[tuple[float, str]], status: str, hit: bool | None):
    """Feed `console` one task: its cache lookup, then each (time, line), then its end."""
    from facenet_kfp.runs import TaskRecord

    record = TaskRecord(task, f"7. {task}", log=f"/root/logs/{task}.log")
    clock[0] = 0.0
    console.task_started(record)
    if hit is not None:
        console.cache_lookup(hit)
    for when, line in lines:
        clock[0] = when
        console.task_line(line)
    record.status, record.seconds = status, clock[0]
    console.task_ended(record)


def test_console_shows_start_end_and_spaced_progress_lines(monkeypatch):
    from pipelines.run_local import Console

    clock = [0.0]
    monkeypatch.setattr(run_local.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(run_local.time, "strftime", lambda fmt: "12:00:00")
    prefix = "    [KFP Executor 2026-01-01 12:00:00,000 INFO]: "
    step = [(0.5, "\x1b[96mExecuting task 'train'\x1b[0m"), (0.6, prefix + "Got executor_input:"),
            (5, prefix + "training: 10/400 steps (2%), 2.0 steps/s, 3:15 left"),      # under 30 s: not shown
            (31, prefix + "training: 62/400 steps (16%), 2.0 steps/s, 2:49 left"),
            (36, prefix + "training: 72/400 steps (18%), 2.0 steps/s, 2:44 left"),    # 5 s after the last
            (62, prefix + "training: 124/400 steps (31%), 2.0 steps/s, 2:18 left"),
            (63, "E0000 00:00:1796546902.883933    5259 cuda_platform.cc:52] failed call to cuInit"),
            (70, prefix + "training: 400/400 steps (100%), 5.7 steps/s, done in 1:10")]
    out = FakeTerminal(False)
    console = Console(out, gpu_driver=False)
    console_run(console, clock, "train", step, "SUCCEEDED", hit=False)
    console_run(console, clock, "labels", [(0.1, "Task labels cache hit (key=abc); skipping execution.")],
                "CACHED", hit=True)
    console_run(console, clock, "evaluate", [(0.2, prefix + "step evaluate failed: InputError: bad")],
                "FAILED", hit=False)
    pad = " " * 10
    assert out.getvalue().splitlines() == [
        "12:00:00  7. train: started",
        pad + "training: 62/400 steps (16%), 2.0 steps/s, 2:49 left",
        pad + "training: 124/400 steps (31%), 2.0 steps/s, 2:18 left",
        pad + "training: 400/400 steps (100%), 5.7 steps/s, done in 1:10",
        "12:00:00  7. train: ran in 70.0 s",
        "12:00:00  7. labels: cache hit",
        "12:00:00  7. evaluate: started",
        "12:00:00  7. evaluate: FAILED after 0.2 s (log: /root/logs/evaluate.log)"]

    # Caching off (no lookup): the start line comes with the task's first line.
    out = FakeTerminal(False)
    console_run(Console(out, caching=False), clock, "labels", [(0.1, "Executing task")], "SUCCEEDED", hit=None)
    assert out.getvalue().splitlines() == ["12:00:00  7. labels: started", "12:00:00  7. labels: ran in 0.1 s"]
    # Caching on, a task kfp.local does not look up (a rerun's importer): its end line.
    out = FakeTerminal(False)
    console_run(Console(out), clock, "import", [(0.1, "Executing task")], "SUCCEEDED", hit=None)
    assert out.getvalue().splitlines() == ["12:00:00  7. import: ran in 0.1 s"]

    # A terminal: the end line replaces the start line when nothing came between.
    out = FakeTerminal(True)
    console = Console(out)
    console_run(console, clock, "labels", [(0.1, "Executing task")], "SUCCEEDED", hit=False)
    console_run(console, clock, "train", step, "SUCCEEDED", hit=False)
    text = out.getvalue()
    assert text.startswith("12:00:00  7. labels: started\r\x1b[K12:00:00  7. labels: ran in 0.1 s\n")
    assert "12:00:00  7. train: started\n" + pad + "training: 62/400" in text


def test_verbose_console_is_the_whole_stream_without_cpu_noise_or_colour_off_a_terminal():
    from pipelines.run_local import Console

    lines = ["\x1b[96mExecuting task 'train'\x1b[0m", "Got executor_input:",
             "    WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
             "    I0000 00:00:1796546899.744586    5259 cudart_stub.cc:31] Could not find cuda drivers on your "
             "machine, GPU will not be used.",
             "    E0000 00:00:1796546902.883933    5259 cuda_platform.cc:52] failed call to cuInit: INTERNAL: "
             "CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)",
             "    E0000 00:00:1796546902.883933    5259 gpu_device.cc:2344] Cannot dlopen some GPU libraries.",
             "    step train failed: ResourceExhaustedError: OOM"]
    cpu, gpu, terminal = FakeTerminal(False), FakeTerminal(False), FakeTerminal(True)
    for out, driver in ((cpu, False), (gpu, True), (terminal, False)):
        console = Console(out, verbose=True, gpu_driver=driver)
        for line in lines:
            console.task_line(line)
    assert cpu.getvalue().splitlines() == ["Executing task 'train'", "Got executor_input:", lines[5], lines[6]]
    # With an NVIDIA driver a failed cuInit is a real error: shown.
    assert gpu.getvalue().splitlines() == ["Executing task 'train'", *lines[1:]]
    assert terminal.getvalue().splitlines()[0] == lines[0]          # colours stay on a terminal


def test_progress_message_reads_what_progress_writes(monkeypatch):
    from facenet_kfp.progress import EVERY_ENV, Progress, progress_message

    clock = [100.0]
    monkeypatch.setattr("facenet_kfp.progress.time.monotonic", lambda: clock[0])
    monkeypatch.delenv(EVERY_ENV, raising=False)
    with_total, unbounded = Progress("decode images", total=720, unit="images", bar=False), \
        Progress("decompress lfw.tgz", unit="MB", scale=1 << 20, bar=False)
    with_total.update(180)
    unbounded.update(3 << 20)
    clock[0] = 101.0
    texts = [with_total.status(), with_total.status(final=True), unbounded.status(), unbounded.status(final=True)]
    assert texts == ["decode images: 180/720 images (25%), 180.0 images/s, 0:03 left",
                     "decode images: 180/720 images (25%), 180.0 images/s, done in 0:01",
                     "decompress lfw.tgz: 3.0 MB, 3.0 MB/s, 0:01 elapsed",
                     "decompress lfw.tgz: 3.0 MB, 3.0 MB/s, done in 0:01"]
    for text in texts:
        for prefix in ("    [KFP Executor 2026-01-01 12:00:00,000 INFO]: ", "12:00:00 INFO facenet_kfp.extract: ", ""):
            assert progress_message(prefix + text) == text
    for other in ("    [KFP Executor 2026-01-01 12:00:00,000 INFO]: step train: starting",
                  "[KFP Executor 2026-01-01 12:00:00,000 INFO]: step 20/400: loss 0.25, 599 images/s, ETA 0:40",
                  "downloaded /tmp/x: 6064255 bytes, sha256 6747d9", ""):
        assert progress_message(other) is None


def test_progress_interval_is_capped_by_the_local_run(monkeypatch):
    import logging

    from facenet_kfp.progress import EVERY_ENV, Progress

    clock = [0.0]
    monkeypatch.setattr("facenet_kfp.progress.time.monotonic", lambda: clock[0])
    logged = []
    logger = logging.getLogger("test-progress")
    monkeypatch.setattr(logger, "info", lambda fmt, *args: logged.append(fmt % args))
    for env, expected in ((None, 0), ("30", 3), ("nonsense", 0), ("-1", 0)):
        if env is None:
            monkeypatch.delenv(EVERY_ENV, raising=False)
        else:
            monkeypatch.setenv(EVERY_ENV, env)
        logged.clear()
        progress = Progress("training", total=100, unit="steps", every=float("inf"), bar=False, logger=logger)
        for step in range(100):
            clock[0] += 1.0
            progress.update()
        assert len(logged) == expected, (env, logged)


def test_run_files_copy_the_report_and_threshold_after_a_successful_evaluation(tmp_path):
    from facenet_kfp.runs import TaskRecord
    from pipelines.run_local import run_files

    report, threshold = tmp_path / "x" / "report", tmp_path / "x" / "threshold"
    report.parent.mkdir()
    report.write_text("<html>new</html>")
    threshold.write_text('{"threshold": 0.5}')
    root = tmp_path / "root"
    root.mkdir()
    evaluated = TaskRecord("evaluate-model", "8. threshold evaluation", status="CACHED",
                           outputs={"report": {"uri": str(report)}, "threshold": {"uri": str(threshold)}})
    trained = TaskRecord("train-model", "7. train embeddings", status="SUCCEEDED",
                         outputs={"training_report": {"uri": str(report)}})
    assert run_files([trained], "", root) == {"logs": str(root / "logs")}          # no evaluation: no copies
    assert not (root / "report.html").exists()
    assert run_files([trained, evaluated], "", root) == {
        "logs": str(root / "logs"), "report_html": str(root / "report.html"),
        "threshold_json": str(root / "threshold.json")}
    assert (root / "report.html").read_text() == "<html>new</html>"
    assert (root / "threshold.json").read_text() == '{"threshold": 0.5}'
    report.write_text("<html>newer</html>")
    assert "report_html" not in run_files([trained, evaluated], "task x failed", root)   # a failed run
    assert (root / "report.html").read_text() == "<html>new</html>"
    assert sorted(p.name for p in root.iterdir()) == ["report.html", "threshold.json"]   # no temporary left


def test_a_file_where_the_logs_go_is_refused_before_anything_runs(tmp_path, capsys, demo_archive, tiny_config):
    root = tmp_path / "out"
    root.mkdir()
    (root / "logs").write_text("not a folder")
    code = run_local.main(["--config", str(tiny_config), "--pipeline-root", str(root),
                           "--demo-dir", str(demo_archive["dir"])])
    assert code == 2
    assert f"{root / 'logs'} is a file" in capsys.readouterr().err
    assert sorted(p.name for p in root.iterdir()) == ["logs"]
    # A pipeline root that is a file: named, no traceback.
    code = run_local.main(["--config", str(tiny_config), "--pipeline-root", str(root / "logs"),
                           "--demo-dir", str(demo_archive["dir"])])
    assert code == 2 and f"{root / 'logs'} is a file, not a folder" in capsys.readouterr().err


@pytest.mark.parametrize("target", ["run", "rerun"])
def test_make_verbose_passes_the_flag_and_echoes_one_line(target):
    import os
    import subprocess

    # Not MAKELEVEL either: under `make test` the inner make would also print "Entering directory".
    env = {k: v for k, v in os.environ.items() if k not in ("VERBOSE", "MAKEFLAGS", "MAKELEVEL")}
    for args, verbose in (([], False), (["VERBOSE=1"], True)):
        out = subprocess.run(["make", "-n", "-o", "install", target, *args], cwd=ROOT, env=env,
                             capture_output=True, text=True, check=True).stdout
        assert len(out.splitlines()) == 1 and "pipelines.run_local" in out, out
        assert ("--verbose" in out.split()) == verbose
