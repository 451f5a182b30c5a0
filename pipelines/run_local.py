"""Run the pipeline on this machine with `kfp.local`, or rerun one step on earlier artifacts.

`python -m pipelines.run_local [--config YAML] [--source URI] [--pairs URI] [--set KEY=VALUE]`
runs the seven steps (SubprocessRunner in this venv, or DockerRunner with
`--runner docker`), caching on; which archive and pairs.txt it uses:
`facenet_kfp.runs.data_sources`. `--rerun STEP --from SOURCE [--with-evaluate]`
runs one step (train, evaluate, complete, splits or labels) on the artifacts of
an earlier run, each brought in by a `dsl.importer`; a SOURCE is a pipeline root,
a summary file, a run folder or ``images=PATH,splits=PATH``
(`facenet_kfp.runs.resolve_source`), later ones winning per artifact. `--set`
takes config keys (``train.max_steps=800``) or pipeline parameter names
(``train_max_steps=800``; a rerun also takes the step's plain keys), typed by the
config field. Both print one line per task in DAG order and write
``summary.json`` (a rerun: ``rerun-summary.json``, which lists every artifact
known after it) in the pipeline root; a failed run exits 1 naming the task.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

from kfp import dsl, local

from components import DEFAULT_IMAGES, Images, build_components, producers
from facenet_kfp.config import PipelineConfig, load_config, parse_assignments
from facenet_kfp.errors import FacenetError, InputError
from facenet_kfp.runs import (RERUN_SUMMARY, SUMMARY, TaskRecord, Tee, artifact_summary, check_inputs, dag_order,
                              data_sources, report_summary, resolve_sources, step_overrides, summarise,
                              task_error, with_eval_source)
from pipelines.facenet_pipeline import (PIPELINE_NAME, STEPS, add_tasks, build_pipeline, parameter_keys,
                                        pipeline_parameters, steps_for)
from pipelines.kfp_internals import observe_local_tasks

log = logging.getLogger(__name__)

DEFAULT_LIGHT_IMAGE, DEFAULT_TRAINER_IMAGE = DEFAULT_IMAGES.light, DEFAULT_IMAGES.trainer
RERUNNABLE = ("labels", "complete", "splits", "train", "evaluate")


def execute(pipeline: Callable, root: Path, runner: Any, enable_caching: bool,
            containers: Any = None) -> tuple[list[TaskRecord], str, float]:
    """Run `pipeline` with kfp.local; (task records in DAG order, "" or why the run failed, seconds)."""
    local.init(runner=runner, pipeline_root=str(root), enable_caching=enable_caching, raise_on_error=True)
    records: list[TaskRecord] = []

    def record(task_name: str, display_name: str, run: Callable[[], tuple[Any, bool, bool]]) -> None:
        records.append(entry := TaskRecord(task_name, display_name))
        tee, start = Tee(sys.stdout), time.monotonic()
        with contextlib.redirect_stdout(tee):
            outputs, failed, cached = run()
        entry.seconds = time.monotonic() - start
        entry.status = "FAILED" if failed else ("CACHED" if cached else "SUCCEEDED")
        entry.outputs = {key: artifact_summary(value) for key, value in (outputs or {}).items()}
        entry.error = task_error(tee.lines) if failed else ""

    start, failure = time.monotonic(), ""
    with warnings.catch_warnings(), observe_local_tasks(record), containers or contextlib.nullcontext():
        # The subprocess runner warns for every image whose name lacks "python".
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        # Display names and cluster settings are for the KFP UI; the local runner says so per task.
        warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
        try:
            pipeline()
        except Exception as exc:  # the run failed: the summary names the task and why
            failure = str(exc) or type(exc).__name__
    failed = [r for r in dag_order(records) if r.status == "FAILED"]
    if failed:
        failure = f"task {failed[0].name} failed: {failed[0].error}"
    elif failure:
        failure = f"pipeline failed before a task ran: {failure}"
    return dag_order(records), failure, time.monotonic() - start


def make_runner(runner: str, root: Path, config: PipelineConfig) -> tuple[Any, Any]:
    """(kfp.local runner, context manager around the run) for `--runner`."""
    if runner == "subprocess":
        return local.SubprocessRunner(use_venv=False), None
    if runner == "docker":
        from pipelines.docker_runner import make_docker_runner, race_free_containers

        return (make_docker_runner(
            root, inputs={"data.source_uri": config.data.source_uri, "data.pairs_uri": config.data.pairs_uri},
            output_dirs={"cluster.checkpoint_root": config.cluster.checkpoint_root,
                         "cluster.tensorboard_root": config.cluster.tensorboard_root}),
                race_free_containers(root / "containers.json"))
    raise FacenetError(f"unknown runner {runner!r}; use subprocess or docker")


# --- the whole pipeline ---------------------------------------------------------------------

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
    for what, uri, digest in (("archive", config.data.source_uri, config.data.sha256),
                              ("pairs.txt", config.data.pairs_uri, config.data.pairs_sha256)):
        if uri:
            log.info("%s: %s%s", what, uri, "" if digest else " (no sha256 to check)")
    images = images or DEFAULT_IMAGES
    root = Path(pipeline_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    kfp_runner, containers = make_runner(runner, root, config)
    records, failure, seconds = execute(build_pipeline(config, images, cluster=False), root, kfp_runner,
                                        enable_caching, containers)
    return summarise(PIPELINE_NAME, records, failure, seconds, root / SUMMARY, runner=runner,
                     source_uri=config.data.source_uri, pairs_uri=config.data.pairs_uri)


# --- one step on earlier artifacts ----------------------------------------------------------

def rerun_overrides(items: list[str], steps: list[str]) -> dict[str, dict[str, Any]]:
    """`--set` items of a rerun as config overrides; each must be a parameter one of `steps` reads."""
    reads = {step.name: set(step.parameters.values()) for step in STEPS}
    return step_overrides(items, steps, reads, {"train": "train", "evaluate": "evaluate"}.get(steps[0], "data"))


def build_rerun_pipeline(names: list[str], inputs: dict[str, str], config: PipelineConfig,
                         images: Images) -> Callable:
    """A pipeline `facenet-kfp-rerun-<first step>`: one importer per input artifact, then the steps."""
    components = build_components(images)
    values = {name: default for name, _, default, _ in pipeline_parameters(config)}

    def dag():  # no return annotation: kfp would read the string "None" as an output
        imported = {}
        for name, uri in inputs.items():
            task = dsl.importer(artifact_uri=uri, artifact_class=producers()[name].cls, reimport=False)
            task.set_display_name(f"import {name}")
            imported[name] = task.output
        add_tasks(components, [s for s in steps_for(config) if s.name in names], values, imported)

    dag.__name__ = f"facenet_rerun_{names[0]}"
    return dsl.pipeline(name=f"{PIPELINE_NAME}-rerun-{names[0]}",
                        description=f"Rerun of the {names[0]} step on imported artifacts.")(dag)


def rerun(step: str, sources: list[str], config_path: str | None, pipeline_root: str,
          sets: list[str] | None = None, with_evaluate: bool = False, images: Images | None = None,
          enable_caching: bool = True, runner: str = "subprocess") -> dict[str, Any]:
    """Rerun `step` on the artifacts named by `sources`; returns the summary (also in rerun-summary.json).

    Raises InputError before anything runs for an unknown step, a bad source,
    a missing or malformed input artifact, or a bad override.
    """
    if step not in RERUNNABLE:
        raise InputError(f"unknown step {step!r}; rerunnable: {', '.join(RERUNNABLE)}")
    if with_evaluate and step != "train":
        raise InputError("--with-evaluate applies to --rerun train only")
    if not sources:
        raise InputError("--from is required: a pipeline root, summary, run folder or name=path pairs")
    names = [step, "evaluate"] if with_evaluate else [step]
    config = load_config(config_path, rerun_overrides(sets or [], names))
    if config.data.eval_source_uri and "evaluate" in names:
        raise InputError(f"{config_path}: data.eval_source_uri is set, and a rerun does not import the evaluation "
                         f"archive's images; run the whole pipeline (make run): its cached steps are not rerun")
    found, described = resolve_sources(sources, producers())
    produced = {name for name, p in producers().items() if p.step in names}
    needed = tuple(dict.fromkeys(name for s in STEPS if s.name in names for name in s.inputs
                                 if name not in produced))
    inputs = check_inputs(needed, found, described, producers())
    pipeline = build_rerun_pipeline(names, inputs, config,
                                    images or DEFAULT_IMAGES)
    root = Path(pipeline_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    kfp_runner, containers = make_runner(runner, root, config)
    records, failure, seconds = execute(pipeline, root, kfp_runner, enable_caching, containers)
    artifacts = {**found, **inputs}
    by_output = {(p.task, p.output): name for name, p in producers().items()}
    for record in records:
        for output, value in record.outputs.items():
            if (name := by_output.get((record.name, output))) and record.status != "FAILED":
                artifacts[name] = value["uri"]
    values = {name: default for name, _, default, _ in pipeline_parameters(config)}
    used = sorted({param for s in STEPS if s.name in names for param in s.parameters.values()})
    return summarise(f"{PIPELINE_NAME}-rerun-{step}", records, failure, seconds, root / RERUN_SUMMARY,
                     step=step, with_evaluate=with_evaluate, **{"from": described}, inputs=inputs,
                     parameters={name: values[name] for name in used}, artifacts=artifacts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml", help="YAML config (default: configs/demo.yaml)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. train.max_steps=800 (repeatable)")
    parser.add_argument("--pipeline-root", default="local_outputs", help="where artifacts, the cache and the summary go")
    parser.add_argument("--runner", choices=["subprocess", "docker"], default="subprocess")
    parser.add_argument("--no-cache", action="store_true", help="run every task even when cached")
    parser.add_argument("--light-image", default=DEFAULT_LIGHT_IMAGE, help="image of the data steps (part of the cache key)")
    parser.add_argument("--trainer-image", default=DEFAULT_TRAINER_IMAGE, help="image of train/evaluate (part of the cache key)")
    whole = parser.add_argument_group("the whole pipeline")
    whole.add_argument("--source", default="", help="archive URI or path; default: the config's data.source_uri, "
                                                    "else the demo archive")
    whole.add_argument("--sha256", default="", help="expected sha256 of the archive")
    whole.add_argument("--eval-source", default="", help="archive of a separate evaluation dataset (LFW, say); "
                                                         "default: the config's data.eval_source_uri")
    whole.add_argument("--eval-sha256", default="", help="expected sha256 of the evaluation archive")
    whole.add_argument("--pairs", default="", help="pairs.txt URI or path for the LFW protocol; 'demo' for the demo archive's")
    whole.add_argument("--pairs-sha256", default="", help="expected sha256 of the pairs file")
    whole.add_argument("--demo-dir", default="data/demo", help="where the demo archive is kept")
    whole.add_argument("--demo-identities", type=int, default=120, help="identities in a newly generated demo archive")
    one = parser.add_argument_group("one step on earlier artifacts")
    one.add_argument("--rerun", metavar="STEP", help=f"rerun this step only: {', '.join(RERUNNABLE)}")
    one.add_argument("--from", dest="sources", action="append", default=[], metavar="SOURCE",
                     help="pipeline root, summary JSON, run folder or name=path pairs (repeatable; later wins)")
    one.add_argument("--with-evaluate", action="store_true", help="with --rerun train: also evaluate the new model")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        images = Images(light=args.light_image, trainer=args.trainer_image)
        if args.rerun:
            summary = rerun(args.rerun, args.sources, args.config, args.pipeline_root, sets=args.sets,
                            with_evaluate=args.with_evaluate, enable_caching=not args.no_cache,
                            runner=args.runner, images=images)
            path = Path(args.pipeline_root) / RERUN_SUMMARY
        else:
            summary = run_pipeline(args.config, args.source or None, args.sha256 or None, args.pairs or None,
                                   args.pipeline_root, runner=args.runner, demo_dir=args.demo_dir,
                                   demo_identities=args.demo_identities, enable_caching=not args.no_cache,
                                   overrides=with_eval_source(parse_assignments(args.sets, parameter_keys()),
                                                               args.eval_source, args.eval_sha256),
                                   pairs_sha256=args.pairs_sha256 or None, images=images)
            path = Path(args.pipeline_root) / SUMMARY
    except (FacenetError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return report_summary(summary, path)


if __name__ == "__main__":
    sys.exit(main())
