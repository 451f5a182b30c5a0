"""Run the whole pipeline on this machine with `kfp.local`, then print and save a summary.

`python -m pipelines.run_local [--config YAML] [--source URI --sha256 HEX] [--pairs URI --pairs-sha256 HEX]`
runs the seven steps as a real KFP pipeline (SubprocessRunner in this venv, or
DockerRunner with `--runner docker`), caching on. The archive is `--source`, else
the config's `data.source_uri`; only when neither names one does it run on the
demo archive, generating it first when missing. `--pairs` replaces the config's
pairs.txt (`demo`: the demo archive's); a checksum is never dropped: the config's
`pairs_sha256` stays when `--pairs` names the config's `pairs_uri`, and
`--pairs-sha256` sets one. At the end it prints one line per task in DAG order
(ran / cache hit / failed, seconds, key figures) and writes
`<pipeline root>/summary.json`. A failed run exits 1 and names the failed task
and its error.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import re
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import yaml
from kfp import local
from kfp.local.cache import LocalCache
from kfp.local.orchestrator import task_executor

from components import Images
from facenet_kfp.config import load_config
from facenet_kfp.errors import FacenetError, InputError
from facenet_kfp.fsutil import file_sha256, write_json
from pipelines.facenet_pipeline import PIPELINE_NAME, build_pipeline

log = logging.getLogger(__name__)

DEFAULT_LIGHT_IMAGE = "ghcr.io/facenet-kfp/facenet-kfp:0.1.0"
DEFAULT_TRAINER_IMAGE = "ghcr.io/facenet-kfp/facenet-kfp-trainer:0.1.0"
HEADLINE = [
    ("test_accuracy", "test accuracy"),
    ("test_kfold_accuracy_mean", "10-fold accuracy"),
    ("test_kfold_accuracy_std", "± std"),
    ("test_auc", "AUC"),
    ("test_val_at_far_0.001", "VAL@FAR=1e-3"),
    ("threshold", "threshold"),
]
_STEP_FAILED = re.compile(r"(step \S+ failed: .*)$")
_EXCEPTION_LINE = re.compile(r"^([\w.]+(Error|Exception): .*)$")
_STEP_NUMBER = re.compile(r"(\d+)\.\s")


@dataclass
class TaskRecord:
    name: str
    display_name: str
    status: str = "RUNNING"
    seconds: float = 0.0
    outputs: dict[str, Any] = field(default_factory=dict)
    error: str = ""


class _Tee(io.TextIOBase):
    """Copies writes to the real stream and keeps the last lines (the task's log)."""

    def __init__(self, stream: Any, keep: int = 200):
        self.stream, self.keep, self.lines = stream, keep, []

    def write(self, text: str) -> int:
        self.stream.write(text)
        self.lines.extend(text.splitlines())
        del self.lines[:-self.keep]
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def _artifact_summary(value: Any) -> Any:
    if hasattr(value, "uri"):
        return {"uri": value.uri, "metadata": json.loads(json.dumps(dict(value.metadata), default=str))}
    return {"value": value}


@contextlib.contextmanager
def record_tasks(records: list[TaskRecord]) -> Iterator[None]:
    """Record status, wall time, outputs and errors of every task kfp.local executes.

    kfp.local reports a cache hit only as an INFO log line, so the cache lookup
    itself is observed: a lookup that returns outputs marks the current task CACHED.
    """
    original = task_executor.execute_single_task
    original_get = LocalCache.get
    current = threading.local()

    def observed_get(self: LocalCache, key: str):
        found = original_get(self, key)
        if found is not None:
            current.hit = True
        return found

    def recorded(*args: Any, **kwargs: Any):
        task_name = kwargs["task_name"]
        spec = kwargs["task_spec"]
        record = TaskRecord(name=task_name, display_name=spec.task_info.name or task_name)
        records.append(record)
        tee = _Tee(sys.stdout)
        current.hit = False
        start = time.monotonic()
        with contextlib.redirect_stdout(tee):
            outputs, status = original(*args, **kwargs)
        record.seconds = time.monotonic() - start
        failed = getattr(status, "name", str(status)) == "FAILURE"
        record.status = "FAILED" if failed else ("CACHED" if current.hit else "SUCCEEDED")
        record.outputs = {key: _artifact_summary(value) for key, value in (outputs or {}).items()}
        if failed:
            record.error = task_error(tee.lines)
        return outputs, status

    task_executor.execute_single_task = recorded
    LocalCache.get = observed_get
    try:
        yield
    finally:
        task_executor.execute_single_task = original
        LocalCache.get = original_get


def task_error(lines: list[str]) -> str:
    """The error line of a failed task's log: the step's own "step X failed: ..." line, else the
    traceback's last exception line (warnings that quote an error, such as skipped images, are not it)."""
    for pattern in (_STEP_FAILED, _EXCEPTION_LINE):
        found = [m.group(1) for line in lines if (m := pattern.search(line.strip()))]
        if found:
            return found[0] if pattern is _STEP_FAILED else found[-1]
    return "see the task log above"


def dag_order(records: list[TaskRecord]) -> list[TaskRecord]:
    """The records sorted by the step number that starts each display name ("4. complete ...").

    The pipeline numbers its steps in DAG order (tests/test_pipeline.py checks
    that every task's upstream tasks have lower numbers), so the table reads the
    same whichever order kfp.local ran independent tasks in. Tasks without a
    number (a rerun's importers) come first, by display name.
    """
    def key(record: TaskRecord) -> tuple[int, str]:
        match = _STEP_NUMBER.match(record.display_name)
        return (int(match.group(1)) if match else 0, record.display_name)
    return sorted(records, key=key)


def task_summaries(records: list[TaskRecord]) -> list[dict[str, Any]]:
    """The `tasks` list of a summary: one entry per task, in DAG order."""
    return [{"name": r.name, "display_name": r.display_name, "status": r.status,
             "seconds": round(r.seconds, 2), "outputs": r.outputs,
             **({"error": r.error} if r.error else {})} for r in dag_order(records)]


def failure_message(records: list[TaskRecord], failure: str) -> str:
    """What a failed run's summary says: the first failed task in DAG order and its error."""
    failed = [r for r in dag_order(records) if r.status == "FAILED"]
    return (f"task {failed[0].name} failed: {failed[0].error}" if failed
            else f"pipeline failed before a task ran: {failure}")


KEY_FIGURES = {
    "download-archive": ["size", "sha256"],
    "extract-images": ["identities", "images", "skipped_total", "shards"],
    "make-labels": ["identities", "singletons"],
    "complete-identities": ["generated", "identities_completed"],
    "split-identities": ["train_identities", "val_identities", "test_identities"],
    "train-model": ["steps"],
    "evaluate-model": ["test_accuracy", "test_auc", "threshold"],
}


def key_figures(record: TaskRecord) -> str:
    """A few figures for the table line of one task."""
    values: dict[str, Any] = {}
    for output in record.outputs.values():
        for key, value in output.get("metadata", {}).items():
            if isinstance(value, dict):  # e.g. splits: {"train": {"identities": n}} -> train_identities
                values.update({f"{key}_{k}": v for k, v in value.items()})
            values[key] = value
    wanted = KEY_FIGURES.get(record.name, [])
    parts = []
    start_step = values.get("start_step")
    if record.name == "train-model" and isinstance(start_step, (int, float)) and start_step > 0:
        parts.append(f"resumed at step {int(start_step)}")
    for first, last, label in (("first_val_loss", "val_loss", "val loss"),
                               ("first_val_fraction_positive", "val_fraction_positive",
                                "val positive triplets")):
        if isinstance(values.get(first), (int, float)) and isinstance(values.get(last), (int, float)):
            parts.append(f"{label} {values[first]:.3f} -> {values[last]:.3f}")
    for key in wanted:
        value = values.get(key)
        if isinstance(value, dict):
            continue
        if isinstance(value, list):
            value = len(value)
        if key == "size" and isinstance(value, (int, float)):
            parts.append(f"{value / 1e6:.1f} MB")
        elif key == "sha256" and isinstance(value, str):
            parts.append(f"sha256 {value[:12]}…")
        elif isinstance(value, float):
            parts.append(f"{key}={value:.4g}")
        elif value is not None:
            parts.append(f"{key}={value}")
    return ", ".join(parts)


def headline_metrics(records: list[TaskRecord]) -> dict[str, Any]:
    """Scalar metrics of the train and evaluate tasks (what summary.json calls `metrics`)."""
    metrics: dict[str, Any] = {}
    for record in records:
        if record.name == "train-model":
            out = record.outputs.get("metrics", {}).get("metadata", {})
            metrics.update({f"train_{k}" if not k.startswith(("train_", "val_")) else k: v
                            for k, v in out.items() if isinstance(v, (int, float))})
        if record.name == "evaluate-model":
            metrics.update({k: v for k, v in record.outputs.get("metrics", {}).get("metadata", {}).items()
                            if isinstance(v, (int, float))})
            threshold = record.outputs.get("threshold", {})
            if threshold:
                metrics["threshold_uri"] = threshold.get("uri")
            report = record.outputs.get("report", {})
            if report:
                metrics["report_uri"] = report.get("uri")
        if record.name == "train-model" and "model" in record.outputs:
            metrics["model_uri"] = record.outputs["model"]["uri"]
    return metrics


def print_table(records: list[TaskRecord], status: str, out: Any = None) -> None:
    out = out or sys.stdout
    label = {"SUCCEEDED": "ran", "CACHED": "cache hit", "FAILED": "FAILED", "RUNNING": "?"}
    width = max([len(r.display_name) for r in records] + [10])
    print(f"\n{PIPELINE_NAME}: {status}", file=out)
    print(f"  {'task':<{width}}  {'status':<9}  {'seconds':>8}  key figures", file=out)
    for r in records:
        figures = r.error if r.status == "FAILED" else key_figures(r)
        print(f"  {r.display_name:<{width}}  {label[r.status]:<9}  {r.seconds:8.1f}  {figures}", file=out)
    cached = sum(r.status == "CACHED" for r in records)
    if records and cached == len(records):
        print(f"  all {cached} tasks came from the cache", file=out)


def print_headline(metrics: dict[str, Any], out: Any = None) -> None:
    out = out or sys.stdout
    shown = [(label, metrics[key]) for key, label in HEADLINE if isinstance(metrics.get(key), (int, float))]
    if shown:
        print("\n" + "  ".join(f"{label}: {value:.4f}" for label, value in shown), file=out)
    for key, label in (("model_uri", "trained model"), ("report_uri", "report"),
                       ("threshold_uri", "threshold.json")):
        if metrics.get(key):
            print(f"{label}: {metrics[key]}", file=out)


def ensure_demo_archive(demo_dir: Path, identities: int, seed: int) -> tuple[str, str]:
    """The demo archive's path and sha256, generating it when missing."""
    archive, digest_file = demo_dir / "lfw.tgz", demo_dir / "lfw.tgz.sha256"
    if not (archive.is_file() and digest_file.is_file()):
        from facenet_kfp.synth import generate_demo_archive

        print(f"generating the demo dataset in {demo_dir} ({identities} identities, seed {seed})")
        generate_demo_archive(demo_dir, identities=identities, seed=seed)
    return str(archive.resolve()), digest_file.read_text().split()[0]


def config_names_source(config_path: str | None) -> bool:
    """Whether the YAML file itself sets `data.source_uri` (DataConfig's LFW default does not count)."""
    if config_path is None:
        return False
    raw = yaml.safe_load(Path(config_path).read_text()) or {}
    return "source_uri" in (raw.get("data") or {})


def data_sources(config_path: str | None, source: str | None, sha256: str | None, pairs: str | None,
                 pairs_sha256: str | None, demo_dir: str, demo_identities: int, demo_seed: int,
                 overrides: dict[str, dict[str, Any]]) -> dict[str, str]:
    """The archive and pairs.txt a local run uses: {source_uri, sha256, pairs_uri, pairs_sha256}.

    The archive is `source`, else the config's `data.source_uri`; only when
    neither names one is it the demo archive (generated when missing). `sha256`
    sets the archive's checksum; without it the config's stays when the archive
    is the config's, and a `source` of its own has none. `pairs` ("demo": the
    demo archive's pairs.txt) replaces the config's pairs file; the config's
    `pairs_sha256` stays when `pairs` names the config's `pairs_uri`, and
    `pairs_sha256` sets one, so a known checksum is never dropped.
    """
    config = load_config(config_path, overrides).data
    demo = not (source or config_names_source(config_path) or "source_uri" in overrides.get("data", {}))
    if demo:
        source_uri, source_sha = ensure_demo_archive(Path(demo_dir), demo_identities, demo_seed)
    elif source:
        source_uri, source_sha = source, (config.sha256 if source == config.source_uri else "")
    else:
        source_uri, source_sha = config.source_uri, config.sha256
    if pairs == "demo":
        if not demo:
            raise InputError(f"--pairs demo is the demo archive's pairs.txt, but this run uses "
                             f"{source_uri}; give that dataset's pairs file as --pairs URI")
        demo_pairs = (Path(demo_dir) / "pairs.txt").resolve()
        if not demo_pairs.is_file():
            raise InputError(f"{demo_pairs}: demo pairs file not found; remove {demo_dir} to "
                             f"generate the demo dataset again")
        pairs_uri, pairs_sha = str(demo_pairs), file_sha256(demo_pairs)
    elif pairs:
        pairs_uri, pairs_sha = pairs, (config.pairs_sha256 if pairs == config.pairs_uri else "")
    else:
        pairs_uri, pairs_sha = config.pairs_uri, config.pairs_sha256
    if pairs_sha256 and not pairs_uri:
        raise InputError("--pairs-sha256 needs a pairs file: give --pairs URI or set data.pairs_uri "
                         f"in {config_path or 'the config'}")
    return {"source_uri": source_uri, "sha256": sha256 or source_sha,
            "pairs_uri": pairs_uri, "pairs_sha256": pairs_sha256 or pairs_sha}


def run_pipeline(config_path: str | None, source: str | None, sha256: str | None,
                 pairs: str | None, pipeline_root: str, runner: str = "subprocess",
                 demo_dir: str = "data/demo", demo_identities: int = 120, demo_seed: int = 0,
                 images: Images | None = None, enable_caching: bool = True,
                 overrides: dict[str, dict[str, Any]] | None = None,
                 pairs_sha256: str | None = None) -> dict[str, Any]:
    """Run the pipeline locally; returns the summary (also written to summary.json).

    Which archive and pairs file it uses: see `data_sources`.
    """
    overrides = {k: dict(v) for k, v in (overrides or {}).items()}
    overrides.setdefault("data", {}).update(data_sources(
        config_path, source, sha256, pairs, pairs_sha256, demo_dir, demo_identities, demo_seed, overrides))
    config = load_config(config_path, overrides)
    log.info("archive: %s%s", config.data.source_uri, "" if config.data.sha256 else " (no sha256 to check)")
    if config.data.pairs_uri:
        log.info("pairs.txt: %s%s", config.data.pairs_uri,
                 "" if config.data.pairs_sha256 else " (no sha256 to check)")
    images = images or Images(light=DEFAULT_LIGHT_IMAGE, trainer=DEFAULT_TRAINER_IMAGE)
    root = Path(pipeline_root).resolve()
    root.mkdir(parents=True, exist_ok=True)

    containers: Any = contextlib.nullcontext()
    if runner == "subprocess":
        kfp_runner = local.SubprocessRunner(use_venv=False)
    elif runner == "docker":
        from pipelines.docker_runner import make_docker_runner, race_free_containers

        kfp_runner = make_docker_runner(
            root, inputs={"data.source_uri": config.data.source_uri, "data.pairs_uri": config.data.pairs_uri},
            output_dirs={"cluster.checkpoint_root": config.cluster.checkpoint_root,
                         "cluster.tensorboard_root": config.cluster.tensorboard_root})
        containers = race_free_containers(root / "containers.json")
    else:
        raise FacenetError(f"unknown runner {runner!r}; use subprocess or docker")
    local.init(runner=kfp_runner, pipeline_root=str(root), enable_caching=enable_caching,
               raise_on_error=True)
    pipeline = build_pipeline(config, images, cluster=False)

    records: list[TaskRecord] = []
    start = time.monotonic()
    status, failure = "SUCCEEDED", ""
    with warnings.catch_warnings(), record_tasks(records), containers:
        # The subprocess runner warns for every image whose name lacks "python".
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        # Display names and cluster settings are for the KFP UI; the local runner says so per task.
        warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
        try:
            pipeline()
        except Exception as exc:  # the run failed: report which task and why
            status = "FAILED"
            failure = str(exc)
    if any(r.status == "FAILED" for r in records):
        status = "FAILED"
    summary = {
        "pipeline": PIPELINE_NAME,
        "status": status,
        "runner": runner,
        "seconds": round(time.monotonic() - start, 1),
        "source_uri": config.data.source_uri,
        "pairs_uri": config.data.pairs_uri,
        "tasks": task_summaries(records),
        "metrics": headline_metrics(records),
    }
    if status == "FAILED":
        summary["error"] = failure_message(records, failure)
    write_json(root / "summary.json", summary)
    return summary


def report_summary(summary: dict[str, Any], path: Path) -> int:
    """Print the table and headline figures of a finished run; the exit status it deserves."""
    records = [TaskRecord(name=t["name"], display_name=t["display_name"], status=t["status"],
                          seconds=t["seconds"], outputs=t["outputs"], error=t.get("error", ""))
               for t in summary["tasks"]]
    print_table(records, summary["status"], out=sys.stdout)
    print_headline(summary["metrics"], out=sys.stdout)
    print(f"summary: {path}")
    if summary["status"] != "SUCCEEDED":
        print(f"\nerror: {summary['error']}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml", help="YAML config (default: configs/demo.yaml)")
    parser.add_argument("--source", default="", help="archive URI or path; default: the config's data.source_uri, "
                                                     "else the demo archive")
    parser.add_argument("--sha256", default="", help="expected sha256 of the archive")
    parser.add_argument("--pairs", default="", help="pairs.txt URI or path for the LFW protocol; 'demo' for the demo archive's")
    parser.add_argument("--pairs-sha256", default="", help="expected sha256 of the pairs file")
    parser.add_argument("--pipeline-root", default="local_outputs", help="where artifacts and summary.json go")
    parser.add_argument("--runner", choices=["subprocess", "docker"], default="subprocess")
    parser.add_argument("--demo-dir", default="data/demo", help="where the demo archive is kept")
    parser.add_argument("--demo-identities", type=int, default=120, help="identities in a newly generated demo archive")
    parser.add_argument("--no-cache", action="store_true", help="run every task even when cached")
    parser.add_argument("--light-image", default=DEFAULT_LIGHT_IMAGE, help="image of the data steps (DockerRunner)")
    parser.add_argument("--trainer-image", default=DEFAULT_TRAINER_IMAGE, help="image of train/evaluate (DockerRunner)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        summary = run_pipeline(args.config, args.source or None, args.sha256 or None, args.pairs or None,
                               args.pipeline_root, runner=args.runner, demo_dir=args.demo_dir,
                               demo_identities=args.demo_identities, enable_caching=not args.no_cache,
                               images=Images(light=args.light_image, trainer=args.trainer_image),
                               pairs_sha256=args.pairs_sha256 or None)
    except (FacenetError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return report_summary(summary, Path(args.pipeline_root) / "summary.json")


if __name__ == "__main__":
    sys.exit(main())
