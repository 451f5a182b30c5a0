"""Glue shared by the KFP components: logging set-up, artifact metadata and metric logging.

Kept free of heavy imports: the data-step containers import it at start-up.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import sys
import time
from typing import Any, Callable

log = logging.getLogger("facenet_kfp")

MAX_LIST_ITEMS = 20


def configure_logging(level: int = logging.INFO) -> None:
    """Log lines with timestamps to stdout (what the KFP UI and the local runner show).

    Inside a KFP executor the root logger already has the executor's handler;
    a second one would print every line twice.
    """
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s",
                                               "%H:%M:%S"))
        root.addHandler(handler)
    root.setLevel(level)


def run_step(name: str, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run one step's library function with logging; errors propagate and fail the task.

    SIGTERM (a stopped pod or run) becomes SystemExit while the step runs, so
    its temporary files are removed on the way out.
    """
    from facenet_kfp.fsutil import sigterm_as_exit

    configure_logging()
    log.info("step %s: starting", name)
    start = time.monotonic()
    try:
        with sigterm_as_exit():
            result = func(*args, **kwargs)
    except Exception as exc:
        # One clear line before the traceback: the local runner's summary quotes it.
        log.error("step %s failed: %s: %s", name, type(exc).__name__, exc)
        raise
    log.info("step %s: done in %.1f s", name, time.monotonic() - start)
    return result


def compact_metadata(summary: dict[str, Any]) -> dict[str, Any]:
    """A step summary made small enough for artifact metadata: long lists are cut to 20 items."""
    out: dict[str, Any] = {}
    for key, value in summary.items():
        if isinstance(value, (list, tuple)) and len(value) > MAX_LIST_ITEMS:
            out[key] = list(value[:MAX_LIST_ITEMS])
            out[f"{key}_total"] = len(value)
        else:
            out[key] = value
    return json.loads(json.dumps(out, default=str))


def checkpoint_dir_for(root: str, output_uri: str) -> str | None:
    """Checkpoint folder under `root` for the task writing `output_uri`, or None when root is empty.

    `<root>/train-<sha256 of output_uri, 16 hex>`, keyed by the URI of the
    task's model output artifact: a retried pod of the same task finds its
    checkpoints again, and another run (even with the same inputs, parameters
    and cached upstream artifacts) gets a new folder and trains from step 0,
    while the cache key stays as it is. Why the output URI has these
    properties on the KFP backend and under kfp.local, with the upstream code
    it rests on: docs/design.md, "Checkpoints keyed by the output URI".
    """
    if not root:
        return None
    key = hashlib.sha256(output_uri.encode()).hexdigest()[:16]
    return f"{root.rstrip('/')}/train-{key}"


def _scalars(values: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Finite numbers of `values`, nested dicts flattened with '_' (booleans and text left out)."""
    found: dict[str, float] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            found.update(_scalars(value, prefix=f"{name}_"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            found[name] = float(value)
    return found


def log_metrics(metrics: Any, values: dict[str, Any]) -> None:
    """Log every finite scalar of `values` to a Metrics artifact (the UI's scalar table).

    The same numbers are written as JSON to the artifact's file: the UI reads the
    metadata, while the file is what makes the artifact exist in object storage
    (kfp.local treats an artifact without a file as missing and re-runs the step).
    """
    from facenet_kfp.fsutil import write_json

    scalars = _scalars(values)
    for name, value in scalars.items():
        metrics.log_metric(name, value)
    write_json(metrics.path, scalars)


def log_classification(artifact: Any, roc: dict[str, list[float]], confusion: list[list[int]]) -> None:
    """ROC curve and confusion matrix in the shape the KFP UI renders (also saved as JSON)."""
    from facenet_kfp.fsutil import write_json

    # The UI cannot draw infinite thresholds; clip them to a finite value.
    thresholds = [t if math.isfinite(t) else 1e6 for t in roc["thresholds"]]
    artifact.log_roc_curve(list(roc["fpr"]), list(roc["tpr"]), thresholds)
    artifact.log_confusion_matrix(["different", "same"], confusion)
    write_json(artifact.path, {"roc": {"fpr": list(roc["fpr"]), "tpr": list(roc["tpr"]),
                                       "thresholds": thresholds},
                               "confusion_matrix": {"labels": ["different", "same"],
                                                    "matrix": confusion}})


def evaluate_task(model: Any, images: Any, splits: Any, eval_images: Any, settings: dict[str, Any],
                  pairs: Any, metrics: Any, roc: Any, report: Any, threshold: Any) -> None:
    """The body of both evaluate components: `settings` are EvaluateConfig's keys; `eval_images`
    is the packed dataset of a separate evaluation archive, or None; `pairs` the check pairs step's output."""
    from facenet_kfp.config import EvaluateConfig
    from facenet_kfp.evaluate import evaluate

    result = run_step("evaluate", evaluate, model.path, images.path, splits.path, EvaluateConfig(**settings),
                      report_path=report.path, threshold_path=threshold.path, pairs_dir=pairs.path,
                      model_uri=model.uri,
                      eval_dataset_dir=eval_images.path if eval_images is not None else None)
    log_metrics(metrics, result["metrics"])
    log_classification(roc, result["roc"], result["confusion_matrix"])
    threshold.metadata.update(result["threshold"])


def train_task(images: Any, completion: Any, labels: Any, splits: Any, settings: dict[str, Any],
               checkpoint_root: str, tensorboard_root: str, model: Any, metrics: Any, training_report: Any,
               tensorboard: Any, trainjob: dict[str, Any] | None = None) -> None:
    """The body of both train components: `settings` are TrainConfig's keys. Trains in this task, or with
    `trainjob` ({nodes, runtime, image, task_config}) as a Kubeflow Trainer TrainJob (`trainjob.launch`);
    either way the model, metrics, report and TensorBoard events are the task's outputs."""
    from facenet_kfp.config import TrainConfig
    from facenet_kfp.objectives import for_config as objective_for
    from facenet_kfp.report import write_training_report

    config = TrainConfig(**settings)
    # Keyed by this task's model URI: a retried pod resumes, a new run starts at step 0.
    checkpoint_dir = checkpoint_dir_for(checkpoint_root, model.uri)
    live_events = checkpoint_dir_for(tensorboard_root, model.uri)
    if trainjob is None:
        from facenet_kfp.train import train

        result = run_step("train", train, images.path, completion.path, labels.path, splits.path, model.path,
                          config, checkpoint_dir=checkpoint_dir,
                          tensorboard_dir=[tensorboard.path] + ([live_events] if live_events else []),
                          run_key=model.uri)
    else:
        from facenet_kfp import trainjob as trainjob_mod

        launch = trainjob_mod.Launch(nodes=int(trainjob["nodes"]), runtime=trainjob["runtime"],
                                     image=trainjob["image"])
        result = run_step("train", trainjob_mod.launch, images.path, completion.path, labels.path, splits.path,
                          model.path, config, launch, run_key=model.uri, task_config=trainjob.get("task_config"),
                          checkpoint_dir=checkpoint_dir, tensorboard_dir=tensorboard.path, live_events=live_events)
    log_metrics(metrics, result)
    model.metadata.update({"framework": "keras", "format": "model.keras + saved_model + serving/1 + model.onnx",
                           "architecture": config.architecture, "embedding_dim": config.embedding_dim,
                           "distance": objective_for(config).distance(config),
                           "trained_steps": int(result["steps"]), "start_step": int(result["start_step"])})
    if trainjob is not None:
        model.metadata.update({"trainjob_nodes": int(trainjob["nodes"]), "trainjob_runtime": trainjob["runtime"]})
    write_training_report(model.path, training_report.path)
    tensorboard.metadata.update({"format": "TensorBoard event files", "tensorboard_root_folder": live_events or ""})
