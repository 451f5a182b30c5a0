"""Rerun one step locally on the artifacts of an earlier run: `python -m pipelines.rerun --step train --from local_outputs`.

`python -m pipelines.rerun --step STEP --from SOURCE [--from SOURCE ...]
[--config YAML] [--set key=value ...] [--with-evaluate] [--pipeline-root DIR]`
builds a small pipeline, one `dsl.importer` per upstream artifact the step
reads, then the step's own component, and runs it with kfp.local
(SubprocessRunner in this venv, caching on), so training can be iterated on
without redoing the data steps.

STEP is one of train, evaluate, complete, splits, labels. A SOURCE is

- a pipeline root (``local_outputs``): the newer of its ``summary.json``
  (written by `make run`) and ``rerun-summary.json`` (written by this command);
- a summary file (either kind);
- one run folder (``local_outputs/facenet-kfp-2026-.../``): task output
  folders ``extract-images/images``, ``make-labels/labels``,
  ``complete-identities/completion``, ``split-identities/splits``,
  ``train-model/model`` (a task that was a cache hit in that run has no
  folder there; use the summary instead);
- explicit pairs ``images=PATH,completion=PATH,labels=PATH,splits=PATH,model=PATH``.

Later sources override earlier ones per artifact (``--from local_outputs
--from model=/tmp/my_model``). Parameters come from the config as in the full
pipeline; ``--set`` overrides them by pipeline parameter name
(``train_learning_rate=0.0005``) or by the plain key of the step's config
section (``learning_rate=0.0005``). The table and ``<pipeline root>/rerun-summary.json``
follow run_local's format (tasks in DAG order: the importers, then the step); the
summary's ``artifacts`` lists every artifact known after the rerun (the new
outputs replace the imported ones), so a later
rerun can start from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml
from kfp import dsl, local

from components import Images, build_components
from facenet_kfp.config import (SECTIONS, EvaluateConfig, PipelineConfig, TrainConfig,
                                load_config)
from facenet_kfp.errors import FacenetError, InputError
from facenet_kfp.fsutil import read_json, write_json
from pipelines.facenet_pipeline import PIPELINE_NAME, SECTION_PREFIX, pipeline_parameters
from pipelines.run_local import (DEFAULT_LIGHT_IMAGE, DEFAULT_TRAINER_IMAGE, TaskRecord,
                                 failure_message, headline_metrics, record_tasks, report_summary,
                                 task_summaries)

log = logging.getLogger(__name__)

SUMMARY = "summary.json"
RERUN_SUMMARY = "rerun-summary.json"


@dataclass(frozen=True)
class ArtifactKind:
    """Where an artifact comes from in the full pipeline and how to recognise one."""
    task: str            # task (and run sub-folder) that produces it
    output: str          # output name of that task
    cls: type            # artifact class for dsl.importer
    marker: str          # a file every such artifact folder holds


ARTIFACTS = {
    "images": ArtifactKind("extract-images", "images", dsl.Dataset, "manifest.jsonl"),
    "completion": ArtifactKind("complete-identities", "completion", dsl.Dataset, "manifest.jsonl"),
    "labels": ArtifactKind("make-labels", "labels", dsl.Artifact, "labels.json"),
    "splits": ArtifactKind("split-identities", "splits", dsl.Artifact, "train.txt"),
    "model": ArtifactKind("train-model", "model", dsl.Model, "model.json"),
}


def _same_names(prefix: str, cls: type) -> dict[str, str]:
    return {f.name: prefix + f.name for f in dataclasses.fields(cls)}


@dataclass(frozen=True)
class Step:
    """One rerunnable step: its component, input artifacts and {component argument: pipeline parameter}."""
    component: str       # key of components.build_components
    task: str            # its task name (and run sub-folder)
    display_name: str
    inputs: tuple[str, ...]
    arguments: dict[str, str]
    section: str         # config section whose plain keys --set accepts


# The same wiring as pipelines/facenet_pipeline.py `build_pipeline` (argument -> pipeline parameter).
STEPS = {
    "labels": Step("labels", "make-labels", "3. label JSON", ("images",), {}, "data"),
    "complete": Step("complete", "complete-identities", "4. complete to multiple of K", ("images", "labels"),
                     {"multiple": "multiple", "min_images": "min_images", "seed": "completion_seed",
                      "shard_size_mb": "shard_size_mb"}, "data"),
    "splits": Step("splits", "split-identities", "5. identity splits", ("labels",),
                   {"train_fraction": "train_fraction", "val_fraction": "val_fraction",
                    "test_fraction": "test_fraction", "seed": "split_seed"}, "data"),
    "train": Step("train", "train-model", "6. train embeddings", ("images", "completion", "labels", "splits"),
                  {**_same_names(SECTION_PREFIX["train"], TrainConfig), "checkpoint_root": "checkpoint_root",
                   "tensorboard_root": "tensorboard_root"},
                  "train"),
    "evaluate": Step("evaluate", "evaluate-model", "7. threshold evaluation", ("model", "images", "splits"),
                     {**_same_names(SECTION_PREFIX["evaluate"], EvaluateConfig), "pairs_uri": "pairs_uri",
                      "pairs_sha256": "pairs_sha256"}, "evaluate"),
}


def parameter_fields() -> dict[str, tuple[str, str]]:
    """{pipeline parameter name: (config section, key)}, the naming of facenet_pipeline.pipeline_parameters."""
    fields = {}
    for section, prefix in SECTION_PREFIX.items():
        for f in dataclasses.fields(SECTIONS[section]):
            fields[prefix + f.name] = (section, f.name)
    fields["checkpoint_root"] = ("cluster", "checkpoint_root")
    fields["tensorboard_root"] = ("cluster", "tensorboard_root")
    return fields


# --- where the upstream artifacts are ---------------------------------------------------------

def _local_path(uri: str, where: str) -> str:
    """An absolute local path for `uri` (a path or file:// URI); remote URIs are refused."""
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    elif "://" in uri:
        raise InputError(f"{where}: {uri!r} is not a local path; local reruns read local artifacts "
                         f"(copy it here first)")
    if not uri:
        raise InputError(f"{where}: empty path")
    return str(Path(uri).expanduser().resolve())


def artifacts_from_summary(path: Path) -> dict[str, str]:
    """Artifact URIs listed in a run_local summary.json or a rerun-summary.json.

    Task outputs ({"tasks": [{"name", "outputs": {out: {"uri"}}}]}) are read by
    task name and output name (see ARTIFACTS); a rerun summary's
    ``artifacts`` mapping adds the ones it imported.
    """
    summary = read_json(path)
    if not isinstance(summary, dict) or not isinstance(summary.get("tasks"), list):
        raise InputError(f"{path}: not a pipeline summary (no 'tasks' list)")
    found: dict[str, str] = {}
    listed = summary.get("artifacts", {})
    if not isinstance(listed, dict):
        raise InputError(f"{path}: 'artifacts' must be a mapping of name to URI")
    for name, uri in listed.items():
        if name in ARTIFACTS and isinstance(uri, str):
            found[name] = uri
    by_output = {(kind.task, kind.output): name for name, kind in ARTIFACTS.items()}
    for task in summary["tasks"]:
        if not isinstance(task, dict) or "name" not in task or not isinstance(task.get("outputs"), dict):
            raise InputError(f"{path}: every task needs 'name' and 'outputs'")
        for output, value in task["outputs"].items():
            name = by_output.get((task["name"], output))
            if name and isinstance(value, dict) and isinstance(value.get("uri"), str):
                found[name] = value["uri"]
    return found


def latest_summary(root: Path) -> Path | None:
    """The more recently written of `root`/summary.json and `root`/rerun-summary.json, if any."""
    candidates = [p for p in (root / SUMMARY, root / RERUN_SUMMARY) if p.is_file()]
    if not candidates:
        return None
    return max(candidates, key=lambda p: p.stat().st_mtime_ns)


def artifacts_from_run_folder(folder: Path) -> dict[str, str]:
    """Task output folders (`<task>/<output>`) that exist in one kfp.local run folder."""
    return {name: str(folder / kind.task / kind.output) for name, kind in ARTIFACTS.items()
            if (folder / kind.task / kind.output).exists()}


def parse_pairs(spec: str) -> dict[str, str]:
    """`images=PATH,splits=PATH` -> {"images": PATH, "splits": PATH}."""
    found = {}
    for item in spec.split(","):
        name, sep, uri = item.partition("=")
        name = name.strip()
        if not sep or name not in ARTIFACTS:
            raise InputError(f"--from {spec!r}: {item!r} is not name=path with name one of "
                             f"{', '.join(ARTIFACTS)}")
        found[name] = _local_path(uri.strip(), f"--from {name}")
    return found


def resolve_source(spec: str) -> tuple[dict[str, str], str]:
    """({artifact name: uri}, a description of where they came from) for one --from value."""
    path = Path(spec).expanduser()
    if not path.exists() and "=" in spec:
        return parse_pairs(spec), "name=path pairs"
    if not path.exists():
        raise InputError(f"--from {spec}: no such file or folder (and not name=path pairs)")
    if path.is_file():
        return artifacts_from_summary(path), str(path)
    summary = latest_summary(path)
    if summary is not None:
        return artifacts_from_summary(summary), str(summary)
    found = artifacts_from_run_folder(path)
    if not found:
        tasks = ", ".join(f"{kind.task}/" for kind in ARTIFACTS.values())
        raise InputError(f"--from {spec}: neither a pipeline root (no {SUMMARY} or {RERUN_SUMMARY}) "
                         f"nor a run folder (no task folder {tasks})")
    return found, f"run folder {path}"


def resolve_sources(specs: list[str]) -> tuple[dict[str, str], list[str]]:
    """Artifact URIs from every --from value (later ones win) and where each value pointed."""
    found: dict[str, str] = {}
    described = []
    for spec in specs:
        artifacts, where = resolve_source(spec)
        log.info("--from %s: %s (%s)", spec, ", ".join(sorted(artifacts)) or "no artifacts", where)
        found.update(artifacts)
        described.append(where)
    return found, described


def check_inputs(needed: tuple[str, ...], found: dict[str, str], described: list[str]) -> dict[str, str]:
    """{name: absolute local path} of the `needed` artifacts; InputError names what is missing."""
    missing = [name for name in needed if name not in found]
    if missing:
        producers = ", ".join(f"{name} (from {ARTIFACTS[name].task})" for name in missing)
        hint = ("; a task that was a cache hit in a run has no folder in that run folder, so pass the "
                "pipeline root or its summary.json instead" if any(d.startswith("run folder") for d in described)
                else "")
        raise InputError(f"missing input artifact(s) {producers} in {'; '.join(described) or 'no --from'}; "
                         f"give them as --from {missing[0]}=PATH{hint}")
    paths = {}
    for name in needed:
        path = _local_path(found[name], f"artifact {name}")
        marker = Path(path) / ARTIFACTS[name].marker
        if not Path(path).is_dir():
            raise InputError(f"artifact {name}: folder {path} not found")
        if not marker.is_file():
            raise InputError(f"artifact {name}: {marker} not found; is {path} a {ARTIFACTS[name].task} output?")
        paths[name] = path
    return paths


# --- parameters -----------------------------------------------------------------------------

def parse_sets(items: list[str], steps: list[str]) -> dict[str, dict[str, Any]]:
    """`--set` overrides as load_config overrides {section: {key: value}}.

    A name is a pipeline parameter name (``train_learning_rate``, ``multiple``,
    ``eval_folds``, ``checkpoint_root``) or a plain key of the first step's config
    section (``learning_rate`` for train). It must be a parameter one of `steps`
    reads. Values of str keys are taken as written; others are parsed as YAML
    (``0.0005``, ``true``, ``[0.001, 0.01]``) and type-checked by load_config.
    """
    fields = parameter_fields()
    used = {param for step in steps for param in STEPS[step].arguments.values()}
    section = STEPS[steps[0]].section
    overrides: dict[str, dict[str, Any]] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise InputError(f"--set {item!r}: expected key=value")
        param = name if name in fields else SECTION_PREFIX.get(section, "") + name
        if param not in fields:
            raise InputError(f"--set {name}: unknown parameter; step {' + '.join(steps)} reads: "
                             f"{', '.join(sorted(used)) or 'no parameters'}")
        if param not in used:
            hint = (" (add --with-evaluate to evaluate the new model too)"
                    if steps == ["train"] and param in STEPS["evaluate"].arguments.values() else "")
            raise InputError(f"--set {name}: step {' + '.join(steps)} does not read {param}{hint}; it reads: "
                             f"{', '.join(sorted(used)) or 'no parameters'}")
        cfg_section, key = fields[param]
        kind = typing.get_type_hints(SECTIONS[cfg_section])[key]
        if kind is str:
            value: Any = raw
        else:
            try:
                value = yaml.safe_load(raw)
            except yaml.YAMLError as exc:
                raise InputError(f"--set {name}={raw!r}: not a YAML value ({exc})") from exc
        overrides.setdefault(cfg_section, {})[key] = value
    return overrides


def step_arguments(step: str, config: PipelineConfig) -> dict[str, Any]:
    """The component's parameter arguments for `step`, valued as the full pipeline's defaults would be."""
    values = {name: default for name, _, default, _ in pipeline_parameters(config)}
    return {arg: values[param] for arg, param in STEPS[step].arguments.items()}


# --- the pipeline ---------------------------------------------------------------------------

def build_rerun_pipeline(step: str, inputs: dict[str, str], config: PipelineConfig, images: Images,
                         with_evaluate: bool = False) -> Callable:
    """A pipeline `facenet-kfp-rerun-<step>`: one importer per input artifact, the step, optionally evaluate."""
    components = build_components(images)
    arguments = step_arguments(step, config)
    eval_arguments = step_arguments("evaluate", config) if with_evaluate else {}

    def dag():  # no return annotation: kfp would read the string "None" as an output
        imported = {}
        for name, uri in inputs.items():
            task = dsl.importer(artifact_uri=uri, artifact_class=ARTIFACTS[name].cls, reimport=False)
            task.set_display_name(f"import {name}")
            imported[name] = task.output
        main = components[STEPS[step].component](
            **{name: imported[name] for name in STEPS[step].inputs}, **arguments)
        main.set_display_name(STEPS[step].display_name)
        if with_evaluate:
            evaluate = components["evaluate"](model=main.outputs["model"], images=imported["images"],
                                              splits=imported["splits"], **eval_arguments)
            evaluate.set_display_name(STEPS["evaluate"].display_name)

    dag.__name__ = f"facenet_rerun_{step}"
    return dsl.pipeline(name=f"{PIPELINE_NAME}-rerun-{step}",
                        description=f"Rerun of the {step} step on imported artifacts.")(dag)


def rerun(step: str, sources: list[str], config_path: str | None, pipeline_root: str,
          sets: list[str] | None = None, with_evaluate: bool = False, images: Images | None = None,
          enable_caching: bool = True) -> dict[str, Any]:
    """Rerun `step` on the artifacts named by `sources`; returns the summary (also in rerun-summary.json).

    Raises InputError before anything runs for an unknown step, a bad source,
    a missing or malformed input artifact, or a bad override.
    """
    if step not in STEPS:
        raise InputError(f"unknown step {step!r}; rerunnable: {', '.join(STEPS)}")
    if with_evaluate and step != "train":
        raise InputError("--with-evaluate applies to --step train only")
    if not sources:
        raise InputError("--from is required: a pipeline root, summary, run folder or name=path pairs")
    steps = [step, "evaluate"] if with_evaluate else [step]
    config = load_config(config_path, parse_sets(sets or [], steps))
    found, described = resolve_sources(sources)
    needed = tuple(dict.fromkeys(STEPS[step].inputs + (("images", "splits") if with_evaluate else ())))
    inputs = check_inputs(needed, found, described)
    images = images or Images(light=DEFAULT_LIGHT_IMAGE, trainer=DEFAULT_TRAINER_IMAGE)

    root = Path(pipeline_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root),
               enable_caching=enable_caching, raise_on_error=True)
    pipeline = build_rerun_pipeline(step, inputs, config, images, with_evaluate)

    records: list[TaskRecord] = []
    start = time.monotonic()
    status, failure = "SUCCEEDED", ""
    with warnings.catch_warnings(), record_tasks(records):
        # The subprocess runner warns for every image whose name lacks "python".
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        # Display names label the table; kfp.local warns that it does not show them itself.
        warnings.filterwarnings("ignore", message=r".*settings \['display_name'\] have no effect.*")
        try:
            pipeline()
        except Exception as exc:  # the run failed: the summary names the task and why
            status, failure = "FAILED", str(exc)
    if any(r.status == "FAILED" for r in records):
        status = "FAILED"

    artifacts = {**found, **inputs}
    by_output = {(kind.task, kind.output): name for name, kind in ARTIFACTS.items()}
    for record in records:
        for output, value in record.outputs.items():
            name = by_output.get((record.name, output))
            if name and record.status != "FAILED":
                artifacts[name] = value["uri"]
    used = {param for s in steps for param in STEPS[s].arguments.values()}
    values = {name: default for name, _, default, _ in pipeline_parameters(config)}
    summary = {
        "pipeline": f"{PIPELINE_NAME}-rerun-{step}",
        "step": step,
        "with_evaluate": with_evaluate,
        "status": status,
        "seconds": round(time.monotonic() - start, 1),
        "from": described,
        "inputs": inputs,
        "parameters": {name: values[name] for name in sorted(used)},
        "tasks": task_summaries(records),
        "metrics": headline_metrics(records),
        "artifacts": artifacts,
    }
    if status == "FAILED":
        summary["error"] = failure_message(records, failure)
    write_json(root / RERUN_SUMMARY, summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--step", required=True, help=f"step to rerun: {', '.join(STEPS)}")
    parser.add_argument("--from", dest="sources", action="append", default=[], metavar="SOURCE",
                        help="pipeline root, summary JSON, run folder or name=path pairs (repeatable; later wins)")
    parser.add_argument("--config", default="configs/demo.yaml", help="YAML config (default: configs/demo.yaml)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override a parameter, e.g. train_learning_rate=0.0005 or learning_rate=0.0005")
    parser.add_argument("--with-evaluate", action="store_true", help="with --step train: also evaluate the new model")
    parser.add_argument("--pipeline-root", default="local_outputs", help="where outputs, the cache and rerun-summary.json go")
    parser.add_argument("--no-cache", action="store_true", help="run every task even when cached")
    parser.add_argument("--light-image", default=DEFAULT_LIGHT_IMAGE, help="image of the data steps (part of the cache key)")
    parser.add_argument("--trainer-image", default=DEFAULT_TRAINER_IMAGE, help="image of train/evaluate (part of the cache key)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        summary = rerun(args.step, args.sources, args.config, args.pipeline_root, sets=args.sets,
                        with_evaluate=args.with_evaluate, enable_caching=not args.no_cache,
                        images=Images(light=args.light_image, trainer=args.trainer_image))
    except (FacenetError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return report_summary(summary, Path(args.pipeline_root) / RERUN_SUMMARY)


if __name__ == "__main__":
    sys.exit(main())
