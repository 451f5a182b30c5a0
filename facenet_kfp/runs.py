"""Local pipeline runs as data: task records, the run table, summary files and the artifacts they list.

A run (`make run`) or rerun (`make rerun`) is summarised as JSON: status,
seconds, one entry per task in DAG order (name, display name, status, seconds,
outputs with URIs and metadata, error) and headline metrics. This module builds,
prints and reads those summaries; it does not depend on kfp, so
pipelines/run_local.py only connects it to kfp.local.
"""

from __future__ import annotations

import io
import json
import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import yaml

from facenet_kfp.config import load_config, parameter_keys, parse_assignments
from facenet_kfp.errors import InputError
from facenet_kfp.fsutil import file_sha256, local_path, read_json, write_json

SUMMARY, RERUN_SUMMARY = "summary.json", "rerun-summary.json"
HEADLINE = [("test_accuracy", "test accuracy"), ("test_kfold_accuracy_mean", "10-fold accuracy"),
            ("test_kfold_accuracy_std", "± std"), ("test_auc", "AUC"),
            ("test_val_at_far_0.001", "VAL@FAR=1e-3"), ("test_kfold_val_at_far_0.001_mean", "k-fold VAL@FAR=1e-3"),
            ("test_eer", "EER"), ("threshold", "threshold")]
KEY_FIGURES = {
    "download-archive": ["size", "sha256"],
    "extract-images": ["identities", "images", "skipped_total", "shards"],
    "make-labels": ["identities", "singletons"],
    "complete-identities": ["generated", "identities_completed"],
    "split-identities": ["train_identities", "val_identities", "test_identities"],
    "train-model": ["steps"],
    "evaluate-model": ["test_accuracy", "test_auc", "threshold", "lfw_pairs_train_identities",
                       "lfw_pairs_overlapping_pairs"],
    "evaluate-on-archive": ["test_accuracy", "test_auc", "threshold", "eval_identities",
                            "eval_identities_in_training_archive", "lfw_pairs_overlapping_pairs"],
}
# A file every folder of each importable artifact holds.
MARKERS = {"images": "manifest.jsonl", "completion": "manifest.jsonl", "labels": "labels.json",
           "splits": "train.txt", "model": "model.json"}
log = logging.getLogger(__name__)
_STEP_FAILED = re.compile(r"(step \S+ failed: .*)$")
_EXCEPTION_LINE = re.compile(r"^([\w.]+(Error|Exception): .*)$")
_STEP_NUMBER = re.compile(r"(\d+)\.\s")


class Producer(NamedTuple):
    """Where the pipeline makes an artifact."""
    step: str      # step name (pipelines/facenet_pipeline.py STEPS)
    task: str      # kfp task name, also the run sub-folder
    output: str    # the task's output (and the artifact's name)
    cls: type      # artifact class for dsl.importer


@dataclass
class TaskRecord:
    name: str
    display_name: str
    status: str = "RUNNING"
    seconds: float = 0.0
    outputs: dict[str, Any] = field(default_factory=dict)
    error: str = ""


class Tee(io.TextIOBase):
    """Copies writes to the real stream and keeps the last lines (a task's log, for its error line)."""

    def __init__(self, stream: Any, keep: int = 200):
        self.stream, self.keep, self.lines = stream, keep, []

    def write(self, text: str) -> int:
        self.stream.write(text)
        self.lines.extend(text.splitlines())
        del self.lines[:-self.keep]
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


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
                   **({"error": r.error} if r.error else {})} for r in records],
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
        elif isinstance(value, float):
            parts.append(f"{key}={value:.4g}")
        elif value is not None and not isinstance(value, dict):
            parts.append(f"{key}={value}")
    return ", ".join(parts)


def headline_metrics(records: list[TaskRecord]) -> dict[str, Any]:
    """Scalar metrics of the train and evaluate tasks (what summary.json calls `metrics`)."""
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
    return metrics


def report_summary(summary: dict[str, Any], path: Path) -> int:
    """Print the table and headline figures of a finished run; the exit status it deserves."""
    records = [TaskRecord(name=t["name"], display_name=t["display_name"], status=t["status"],
                          seconds=t["seconds"], outputs=t["outputs"], error=t.get("error", ""))
               for t in summary["tasks"]]
    label = {"SUCCEEDED": "ran", "CACHED": "cache hit", "FAILED": "FAILED", "RUNNING": "?"}
    width = max([len(r.display_name) for r in records] + [10])
    print(f"\n{summary['pipeline']}: {summary['status']}")
    print(f"  {'task':<{width}}  {'status':<9}  {'seconds':>8}  key figures")
    for r in records:
        figures = r.error if r.status == "FAILED" else key_figures(r)
        print(f"  {r.display_name:<{width}}  {label[r.status]:<9}  {r.seconds:8.1f}  {figures}")
    if records and all(r.status == "CACHED" for r in records):
        print(f"  all {len(records)} tasks came from the cache")
    metrics = summary["metrics"]
    labels = {**dict(HEADLINE), "test_kfold_accuracy_mean": f"{int(metrics.get('test_folds', 10))}-fold accuracy"}
    shown = [(labels[key], metrics[key]) for key, _ in HEADLINE if isinstance(metrics.get(key), (int, float))]
    if shown and "eval_images" in metrics:
        print(f"\non the evaluation archive ({int(metrics['eval_identities']):,} identities, "
              f"{int(metrics['eval_images']):,} images; {int(metrics['eval_identities_in_training_archive']):,} "
              f"identity names also in the training archive, {int(metrics['eval_identities_in_train_split']):,} "
              f"in its train split):", end="")
    if shown:
        print("\n" + "  ".join(f"{label}: {value:.4f}" for label, value in shown))
    if metrics.get("lfw_pairs_overlapping_pairs"):
        held = (f"; on its held-out pairs: {int(metrics.get('lfw_pairs_heldout_folds', 10))}-fold accuracy "
                f"{metrics['lfw_pairs_heldout_kfold_accuracy_mean']:.4f}"
                if "lfw_pairs_heldout_kfold_accuracy_mean" in metrics else
                "; too few held-out pairs remain: the pairs.txt figures are not a held-out benchmark")
        print(f"pairs.txt: {int(metrics['lfw_pairs_overlapping_pairs']):,} of {int(metrics['lfw_pairs_pairs']):,} "
              f"pairs name {int(metrics['lfw_pairs_train_identities']):,} training identities{held}")
    for key, label in (("model_uri", "trained model"), ("report_uri", "report"), ("threshold_uri", "threshold.json")):
        if metrics.get(key):
            print(f"{label}: {metrics[key]}")
    print(f"summary: {path}")
    if summary["status"] != "SUCCEEDED":
        print(f"\nerror: {summary['error']}", file=sys.stderr)
        return 1
    return 0



# --- artifacts listed in summaries and run folders --------------------------------------------

def _local_path(uri: str, where: str) -> str:
    """An absolute local path for `uri` (a path or file:// URI); remote URIs are refused."""
    if not uri:
        raise InputError(f"{where}: empty path")
    path = local_path(uri)
    if path is None:
        raise InputError(f"{where}: {uri!r} is not a local path; local reruns read local artifacts "
                         f"(copy it here first)")
    return str(path.expanduser().resolve())


def artifacts_from_summary(path: Path, producers: Mapping[str, Producer]) -> dict[str, str]:
    """Artifact URIs listed in a summary.json or rerun-summary.json (task outputs, then `artifacts`)."""
    summary = read_json(path)
    if not isinstance(summary, dict) or not isinstance(summary.get("tasks"), list):
        raise InputError(f"{path}: not a pipeline summary (no 'tasks' list)")
    listed = summary.get("artifacts", {})
    if not isinstance(listed, dict):
        raise InputError(f"{path}: 'artifacts' must be a mapping of name to URI")
    found = {name: uri for name, uri in listed.items() if name in MARKERS and isinstance(uri, str)}
    by_output = {(p.task, p.output): name for name, p in producers.items()}
    for task in summary["tasks"]:
        if not isinstance(task, dict) or "name" not in task or not isinstance(task.get("outputs"), dict):
            raise InputError(f"{path}: every task needs 'name' and 'outputs'")
        for output, value in task["outputs"].items():
            name = by_output.get((task["name"], output))
            if name and isinstance(value, dict) and isinstance(value.get("uri"), str):
                found[name] = value["uri"]
    return found


def resolve_source(spec: str, producers: Mapping[str, Producer]) -> tuple[dict[str, str], str]:
    """({artifact name: uri}, a description of where they came from) for one --from value."""
    path = Path(spec).expanduser()
    if not path.exists() and "=" in spec:
        found = {}
        for item in spec.split(","):
            name, sep, uri = item.partition("=")
            if not sep or name.strip() not in MARKERS:
                raise InputError(f"--from {spec!r}: {item!r} is not name=path with name one of {', '.join(MARKERS)}")
            found[name.strip()] = _local_path(uri.strip(), f"--from {name.strip()}")
        return found, "name=path pairs"
    if not path.exists():
        raise InputError(f"--from {spec}: no such file or folder (and not name=path pairs)")
    summaries = [path] if path.is_file() else [p for p in (path / SUMMARY, path / RERUN_SUMMARY) if p.is_file()]
    if summaries:
        newest = max(summaries, key=lambda p: p.stat().st_mtime_ns)
        return artifacts_from_summary(newest, producers), str(newest)
    found = {name: str(path / p.task / p.output) for name, p in producers.items()
             if (path / p.task / p.output).exists()}
    if not found:
        tasks = ", ".join(f"{p.task}/" for p in producers.values())
        raise InputError(f"--from {spec}: neither a pipeline root (no {SUMMARY} or {RERUN_SUMMARY}) nor a run "
                         f"folder (no task folder {tasks})")
    return found, f"run folder {path}"


def check_inputs(needed: tuple[str, ...], found: dict[str, str], described: list[str],
                 producers: Mapping[str, Producer]) -> dict[str, str]:
    """{name: absolute local path} of the `needed` artifacts; InputError names what is missing."""
    missing = [name for name in needed if name not in found]
    if missing:
        names = ", ".join(f"{name} (from {producers[name].task})" for name in missing)
        hint = ("; a task that was a cache hit in a run has no folder in that run folder, so pass the "
                "pipeline root or its summary.json instead" if any(d.startswith("run folder") for d in described)
                else "")
        raise InputError(f"missing input artifact(s) {names} in {'; '.join(described) or 'no --from'}; "
                         f"give them as --from {missing[0]}=PATH{hint}")
    paths = {}
    for name in needed:
        path = Path(_local_path(found[name], f"artifact {name}"))
        if not path.is_dir():
            raise InputError(f"artifact {name}: folder {path} not found")
        if not (path / MARKERS[name]).is_file():
            raise InputError(f"artifact {name}: {path / MARKERS[name]} not found; is {path} a "
                             f"{producers[name].task} output?")
        paths[name] = str(path)
    return paths


# --- which archive and pairs file a local run uses ----------------------------------------------

def ensure_demo_archive(demo_dir: Path, identities: int, seed: int) -> tuple[str, str]:
    """The demo archive's path and sha256, generating it when missing."""
    archive, digest_file = demo_dir / "lfw.tgz", demo_dir / "lfw.tgz.sha256"
    if not (archive.is_file() and digest_file.is_file()):
        from facenet_kfp.synth import generate_demo_archive

        print(f"generating the demo dataset in {demo_dir} ({identities} identities, seed {seed})")
        generate_demo_archive(demo_dir, identities=identities, seed=seed)
    return str(archive.resolve()), digest_file.read_text().split()[0]


def data_sources(config_path: str | None, source: str | None, sha256: str | None, pairs: str | None,
                 pairs_sha256: str | None, demo_dir: str, demo_identities: int, demo_seed: int,
                 overrides: dict[str, dict[str, Any]]) -> dict[str, str]:
    """The archive and pairs.txt a local run uses: {source_uri, sha256, pairs_uri, pairs_sha256}.

    The archive is `source`, else the config's `data.source_uri` (from the file
    or `overrides`; DataConfig's LFW default does not count); only when neither
    names one is it the demo archive (generated when missing). `sha256` sets the
    archive's checksum; without it the config's stays when the archive is the
    config's, and a `source` of its own has none. `pairs` ("demo": the demo
    archive's pairs.txt) replaces the config's pairs file; the config's
    `pairs_sha256` stays when `pairs` names the config's `pairs_uri`, and
    `pairs_sha256` sets one, so a known checksum is never dropped.
    """
    config = load_config(config_path, overrides).data
    raw = yaml.safe_load(Path(config_path).read_text()) or {} if config_path else {}
    named = "source_uri" in (raw.get("data") or {}) or "source_uri" in overrides.get("data", {})
    demo = not (source or named)
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


def with_eval_source(overrides: dict[str, dict[str, Any]], source: str, sha256: str) -> dict[str, dict[str, Any]]:
    """`--eval-source` / `--eval-sha256` as overrides of data.eval_source_uri and data.eval_sha256."""
    if sha256 and not source:
        raise InputError("--eval-sha256 needs --eval-source")
    if source:
        overrides.setdefault("data", {}).update(eval_source_uri=source, eval_sha256=sha256)
    return overrides


def resolve_sources(specs: list[str], producers: Mapping[str, Producer]) -> tuple[dict[str, str], list[str]]:
    """Artifact URIs from every --from value (later ones win) and where each value pointed."""
    found: dict[str, str] = {}
    described = []
    for spec in specs:
        artifacts, where = resolve_source(spec, producers)
        log.info("--from %s: %s (%s)", spec, ", ".join(sorted(artifacts)) or "no artifacts", where)
        found.update(artifacts)
        described.append(where)
    return found, described


def step_overrides(items: list[str], steps: list[str], reads: Mapping[str, set[str]],
                   section: str) -> dict[str, dict[str, Any]]:
    """`--set` items of a rerun as config overrides; each must be a parameter one of `steps` reads.

    `reads` gives each step's pipeline parameters; a name is a config key, a
    pipeline parameter or a plain key of `section` (``learning_rate`` for train).
    """
    keys = parameter_keys()
    aliases = {**{key: (s, key) for name, (s, key) in keys.items() if s == section}, **keys}
    parameter_of = {key: name for name, key in keys.items()}
    used = set().union(*(reads[step] for step in steps))
    overrides = parse_assignments(items, aliases)
    for cfg_section, values in overrides.items():
        for key in values:
            param = parameter_of.get((cfg_section, key), f"{cfg_section}.{key}")
            if param not in used:
                hint = (" (add --with-evaluate to evaluate the new model too)"
                        if steps == ["train"] and param in reads["evaluate"] else "")
                raise InputError(f"--set {cfg_section}.{key}: step {' + '.join(steps)} does not read {param}"
                                 f"{hint}; it reads: {', '.join(sorted(used)) or 'no parameters'}")
    return overrides
