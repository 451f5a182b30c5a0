"""Run the pipeline on this machine with `kfp.local`, or rerun one step on earlier artifacts.

`python -m pipelines.run_local [--config YAML] [--source URI] [--pairs URI] [--set KEY=VALUE]`
runs the eight steps (SubprocessRunner in this venv, or DockerRunner with
`--runner docker`; ``--set deploy.enabled=true`` adds deploy, which needs a cluster),
caching on; which archive and pairs.txt it uses: `facenet_kfp.runs.data_sources`.
`--rerun STEP --from SOURCE [--with-evaluate]` runs one step (train, evaluate, complete,
splits, labels or align) on the artifacts of
an earlier run, each brought in by a `dsl.importer`; a SOURCE is a pipeline root,
a summary file, a run folder or ``images=PATH,splits=PATH``
(`facenet_kfp.runs.resolve_source`), later ones winning per artifact. `--set`
takes config keys (``train.max_steps=800``) or pipeline parameter names
(``train_max_steps=800``; a rerun also takes the step's plain keys), typed by the
config field. Both print a line as each task starts and ends (`Console`;
``--verbose``: kfp.local's whole output), keep each task's whole output in
``<pipeline root>/logs/<task>.log``, then print the run table in DAG order and
write ``summary.json`` (a rerun: ``rerun-summary.json``, which lists every
artifact known after it) in the pipeline root, with ``report.html`` and
``threshold.json`` after a successful evaluation; a failed run exits 1 naming
the task and its log.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

from kfp import dsl, local

from components import DEFAULT_IMAGES, Images, build_components, producers
from facenet_kfp.config import PipelineConfig, assignments_label, load_config, parse_assignments, to_dict
from facenet_kfp.errors import FacenetError, InputError
from facenet_kfp.fsutil import atomic_file
from facenet_kfp.progress import EVERY_ENV, progress_message
from facenet_kfp.pairs import read_checked_pairs
from facenet_kfp.runs import (RERUN_SUMMARY, SUMMARY, TaskRecord, Tee, artifact_summary, check_inputs, dag_order,
                              data_sources, report_summary, resolve_sources, step_overrides, summarise,
                              task_error, used_evaluation_archive, with_eval_source)
from pipelines.facenet_pipeline import (PIPELINE_NAME, Step, add_tasks, build_pipeline, dag_steps,
                                        parameter_keys)
from facenet_kfp.runs import strip_ansi, table_width
from pipelines.kfp_internals import observe_local_tasks

log = logging.getLogger(__name__)

DEFAULT_LIGHT_IMAGE, DEFAULT_TRAINER_IMAGE = DEFAULT_IMAGES.light, DEFAULT_IMAGES.trainer
# `--rerun` choices, in DAG order: the rows marked rerunnable, align's included (the DAG with alignment).
RERUNNABLE = tuple(step.name for step in dag_steps(evaluation_archive=False, align=True) if step.rerunnable)


LOGS = "logs"                  # the pipeline root's folder of task logs: <task>.log, appended per run
PIPELINE_LOG = "pipeline.log"  # what kfp.local prints outside the tasks
REPORT_HTML, THRESHOLD_JSON = "report.html", "threshold.json"   # the evaluation's copies in the pipeline root
PROGRESS_EVERY = 30.0          # seconds: at most one progress line per task this often (plus its last)
# TensorFlow's start-up lines that are noise on a machine without an NVIDIA driver: its CUDA probes
# (cuInit fails: no driver), CPU-feature hints and the absl banner. The task logs keep them.
_TF_CPU_NOISE = re.compile(r"^\s*(?:[IWE]\d{4} [\d:.]+\s+\d+ (?:cudart_stub|cuda_platform|cuda_executor|"
                           r"cuda_diagnostics|cpu_feature_guard|port)\.cc:\d+\] |"
                           r"WARNING: All log messages before absl::InitializeLog\(\) is called|"
                           r"To enable the following instructions: .* rebuild TensorFlow)")


def has_nvidia_driver() -> bool:
    return Path("/proc/driver/nvidia/version").exists()


class Console:
    """What a local run shows while it runs.

    By default: a line as each task starts and as it ends (a cache hit, or with
    caching on a task kfp.local does not look up, such as a rerun's importer:
    the end line only); between them, for a step that runs `PROGRESS_EVERY` seconds or more,
    its progress lines (`facenet_kfp.progress`), at most one per `PROGRESS_EVERY`
    seconds, and its last. On a terminal the end line replaces the start line
    when nothing came between. Verbose: the whole stream as kfp.local prints it,
    except TensorFlow's CUDA start-up noise on a machine without an NVIDIA
    driver. Colour codes only on a terminal. The task logs keep every line
    either way.
    """

    def __init__(self, stream: Any, verbose: bool = False, gpu_driver: bool | None = None, caching: bool = True):
        self.stream, self.verbose, self.caching = stream, verbose, caching
        self.terminal = bool(getattr(stream, "isatty", lambda: False)())
        self.gpu_driver = has_nvidia_driver() if gpu_driver is None else gpu_driver
        self.width = table_width()
        self.task: TaskRecord | None = None    # the task running now (kfp.local runs one at a time)
        self._start = self._shown = 0.0        # when it started; when its last progress line was shown
        self._announced = self._hit = False    # its start line is out; it was found in the cache
        self._open = False                     # a start line without its newline yet (terminal only)

    def say(self, text: str, replace: bool = False) -> None:
        """Print a line; `replace`: over the open start line, if there is one."""
        if self._open:
            self.stream.write("\r\x1b[K" if replace else "\n")
            self._open = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        """End an open start line (an interrupted run)."""
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False

    def stream_line(self, line: str) -> None:
        """A line of kfp.local's output: shown when verbose."""
        if self.verbose and (self.gpu_driver or not _TF_CPU_NOISE.match(strip_ansi(line))):
            self.say(line if self.terminal else strip_ansi(line))

    def _stamped(self, text: str, replace: bool = False) -> None:
        self.say(f"{time.strftime('%H:%M:%S')}  {text}", replace)

    def _announce(self) -> None:
        if self.task is not None and not (self._announced or self._hit or self.verbose):
            self._announced = True
            if self.terminal:     # left open, for the end line to replace
                self.close()
                self.stream.write(f"{time.strftime('%H:%M:%S')}  {self.task.display_name}: started")
                self.stream.flush()
                self._open = True
            else:
                self._stamped(f"{self.task.display_name}: started")

    def task_started(self, record: TaskRecord) -> None:
        self.task, self._start, self._shown = record, time.monotonic(), 0.0
        self._announced = self._hit = False

    def cache_lookup(self, hit: bool) -> None:
        self._hit = hit
        self._announce()

    def task_line(self, line: str) -> None:
        if self.verbose:
            self.stream_line(line)
            return
        if not self.caching:     # no cache lookup: the task's first line says it started
            self._announce()
        message = progress_message(strip_ansi(line))
        now = time.monotonic()
        if message is None or now - self._start < PROGRESS_EVERY:
            return
        last = message.rpartition(", ")[2].startswith("done in ")
        if last or now - (self._shown or self._start) >= PROGRESS_EVERY:
            self._announce()
            self._shown = now
            text = f"{'':10}{message}"
            self.say(text if len(text) <= self.width else text[:self.width - 1] + "…")

    def task_ended(self, record: TaskRecord) -> None:
        if not self.verbose:
            ended = {"SUCCEEDED": f"ran in {record.seconds:.1f} s", "CACHED": "cache hit",
                     "FAILED": f"FAILED after {record.seconds:.1f} s (log: {record.log})"}.get(record.status, "?")
            self._stamped(f"{record.display_name}: {ended}", replace=True)
        self.task = None


class _StdoutHandler(logging.StreamHandler):
    """Writes log records to whatever sys.stdout is at the time (a task's log while it runs)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stdout    # not setStream: that flushes the previous stream, maybe a closed task log
        super().emit(record)


@contextlib.contextmanager
def captured(tee: Tee) -> Iterator[Tee]:
    """stdout and stderr into `tee` inside the block."""
    try:
        with contextlib.redirect_stdout(tee), contextlib.redirect_stderr(tee):
            yield tee
    finally:
        tee.finish()


@contextlib.contextmanager
def run_logging(console: Console, logs: Path, title: str) -> Iterator[Callable[[TaskRecord], Any]]:
    """Inside the block, output outside the tasks (stdout, stderr, the root logger) goes to
    logs/pipeline.log and `console`; yields `open_log(record)`, which opens a task's log file for
    appending, after a header line with `title`. InputError when `logs` cannot be a folder."""
    make_folder(logs, f"the task log folder {logs}")

    def open_log(record: TaskRecord) -> Any:
        handle = open(record.log, "a", encoding="utf-8")
        handle.write(f"===== {title}: {record.display_name} ({record.name}) =====\n")
        return handle

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    previous_every = os.environ.get(EVERY_ENV)
    handler = _StdoutHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    with open_log(TaskRecord("pipeline", "outside the tasks", log=str(logs / PIPELINE_LOG))) as pipeline_log:
        root.handlers[:] = [handler]
        root.setLevel(logging.INFO)
        # The steps' progress lines come at least this often (`Progress` reads it in the task processes).
        os.environ[EVERY_ENV] = str(PROGRESS_EVERY)
        try:
            with captured(Tee(pipeline_log, console.stream_line)):
                yield open_log
        finally:
            root.handlers[:], root.level = handlers, level
            if previous_every is None:
                os.environ.pop(EVERY_ENV, None)
            else:
                os.environ[EVERY_ENV] = previous_every


def execute(pipeline: Callable, root: Path, runner: Any, enable_caching: bool,
            containers: Any = None, verbose: bool = False) -> tuple[list[TaskRecord], str, float]:
    """Run `pipeline` with kfp.local; (task records in DAG order, "" or why the run failed, seconds).

    Each task's output is appended to ``<root>/logs/<task name>.log``; the console shows what
    `Console` shows.
    """
    local.init(runner=runner, pipeline_root=str(root), enable_caching=enable_caching, raise_on_error=True)
    records: list[TaskRecord] = []
    console, logs = Console(sys.stdout, verbose, caching=enable_caching), root / LOGS
    title = f"{getattr(pipeline, 'name', 'pipeline')} run started {time.strftime('%Y-%m-%d %H:%M:%S')}"
    start, failure = time.monotonic(), ""
    with run_logging(console, logs, title) as open_log:
        def record(task_name: str, display_name: str, run: Callable[[], tuple[Any, bool, bool]]) -> None:
            records.append(entry := TaskRecord(task_name, display_name, log=str(logs / f"{task_name}.log")))
            console.task_started(entry)
            task_start = time.monotonic()
            with open_log(entry) as log_file:
                tee = Tee(log_file, console.task_line)
                with captured(tee):
                    outputs, failed, cached = run()
            entry.seconds = time.monotonic() - task_start
            entry.status = "FAILED" if failed else ("CACHED" if cached else "SUCCEEDED")
            entry.outputs = {key: artifact_summary(value) for key, value in (outputs or {}).items()}
            entry.error = task_error(tee.lines) if failed else ""
            console.task_ended(entry)

        with (warnings.catch_warnings(), observe_local_tasks(record, console.cache_lookup),
              containers or contextlib.nullcontext()):
            # The subprocess runner warns for every image whose name lacks "python".
            warnings.filterwarnings("ignore", message=".*non-Python base image.*")
            # Display names and cluster settings are for the KFP UI; the local runner says so per task.
            warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
            try:
                pipeline()
            except Exception as exc:  # the run failed: the summary names the task and why
                failure = str(exc) or type(exc).__name__
                log.info("the run stopped: %s", strip_ansi(failure))
            finally:
                console.close()
    failed = [r for r in dag_order(records) if r.status == "FAILED"]
    if failed:
        failure = f"task {failed[0].name} failed: {failed[0].error}"
    elif failure:
        failure = f"pipeline failed before a task ran: {strip_ansi(failure)} (log: {logs / PIPELINE_LOG})"
    return dag_order(records), failure, time.monotonic() - start


def pipeline_root_folder(pipeline_root: str) -> Path:
    """The pipeline root as an absolute folder, created when missing; InputError when it cannot be one."""
    root = Path(pipeline_root).resolve()
    make_folder(root, f"--pipeline-root {pipeline_root}: {root}")
    return root


def make_folder(path: Path, what: str) -> None:
    """Create the folder `path` (and its parents) unless it exists; InputError naming `what` when
    `path` is a file or cannot be created."""
    if path.exists() and not path.is_dir():
        raise InputError(f"{what} is a file, not a folder: move the file away")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create {what}: {exc.strerror or exc}") from exc


def run_files(records: list[TaskRecord], failure: str, root: Path) -> dict[str, str]:
    """Files of the run for people, as summary fields: ``logs`` (the task logs' folder) and, after a
    successful run whose evaluation ran or came from the cache, copies of its HTML report and
    threshold in the pipeline root (``report_html``: report.html, which a browser renders, and
    ``threshold_json``), each replaced whole. A run that failed only in tasks after its evaluation
    (deploy without a cluster; `records` in DAG order) gets them too."""
    files = {"logs": str(root / LOGS)}
    evaluated = [i for i, r in enumerate(records)
                 if {"report", "threshold"} <= set(r.outputs) and r.status != "FAILED"]
    failed = [i for i, r in enumerate(records) if r.status == "FAILED"]
    if not evaluated or (failure and not (failed and min(failed) > evaluated[-1])):
        return files
    evaluation = records[evaluated[-1]]
    for output, name, key in (("report", REPORT_HTML, "report_html"),
                              ("threshold", THRESHOLD_JSON, "threshold_json")):
        source, target = Path(evaluation.outputs[output]["uri"]), root / name
        try:
            with open(source, "rb") as original, atomic_file(target) as copy:
                shutil.copyfileobj(original, copy)
        except OSError as exc:
            log.warning("could not copy %s to %s: %s", source, target, exc)
            continue
        files[key] = str(target)
    return files


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
                 pairs_sha256: str | None = None, verbose: bool = False) -> dict[str, Any]:
    """Run the pipeline locally; returns the summary (also written to summary.json).

    Which archive and pairs file it uses: see `data_sources`. `verbose`: print
    kfp.local's whole output, not one line per task start and end (`Console`).
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
    root = pipeline_root_folder(pipeline_root)
    kfp_runner, containers = make_runner(runner, root, config)
    records, failure, seconds = execute(build_pipeline(config, images, cluster=False), root, kfp_runner,
                                        enable_caching, containers, verbose=verbose)
    return summarise(PIPELINE_NAME, records, failure, seconds, root / SUMMARY, runner=runner,
                     source_uri=config.data.source_uri, pairs_uri=config.data.pairs_uri,
                     **run_files(records, failure, root))


# --- one step on earlier artifacts ----------------------------------------------------------

# --set keys that make a rerun of evaluate check a new pairs file first (the check pairs step).
PAIRS_KEYS = {"pairs_uri", "pairs_sha256"}


def rerun_overrides(items: list[str], steps: list[str], option: str = "--set") -> dict[str, dict[str, Any]]:
    """`--set` items of a rerun as config overrides; each must be a parameter one of `steps` reads.

    A rerun of evaluate also takes the pairs check's parameters (`rerun_steps`).
    Errors name `option` (``SET`` for make's).
    """
    reads = {step.name: set(step.parameters.values()) for step in dag_steps(evaluation_archive=False, align=True)}
    reads["evaluate"] |= reads["check_pairs"]
    return step_overrides(items, steps, reads, {"train": "train", "evaluate": "evaluate"}.get(steps[0], "data"),
                          option=option)


def parameter_values(config: PipelineConfig) -> dict[str, Any]:
    """{pipeline parameter: its value in `config`} of every parameter, also those a compiled DAG leaves out
    (align's two when data.align is none: a rerun of align reads them)."""
    return {name: to_dict(getattr(config, section))[key] for name, (section, key) in parameter_keys().items()}


def rerun_steps(names: list[str], evaluation_archive: bool) -> list[Step]:
    """The steps of the DAG a rerun of `names` adds, in DAG order: with `evaluation_archive` (the run
    evaluated on a separate archive) those of that DAG: evaluation on the archive, splits without a test split.
    A rerun of align aligns the training archive's images (the DAG with alignment)."""
    wanted = set(names) | ({"evaluate_on_archive"} if "evaluate" in names else set())
    align = "align" in names
    return [step for step in dag_steps(evaluation_archive and not align, align) if step.name in wanted]


def build_rerun_pipeline(names: list[str], inputs: dict[str, str], config: PipelineConfig,
                         images: Images, evaluation_archive: bool | None = None) -> Callable:
    """A pipeline `facenet-kfp-rerun-<first step>`: one importer per input artifact, then the steps.

    `evaluation_archive` (default: whether `config` names one) picks the DAG whose steps are rerun.
    """
    if evaluation_archive is None:
        evaluation_archive = bool(config.data.eval_source_uri)
    components = build_components(images)
    values = parameter_values(config)
    steps = rerun_steps(names, evaluation_archive)
    # Each importer's artifact class: that of the step input reading it (align's raw_images, which no
    # producer of a whole run's artifacts lists), else its producer's.
    classes = {cls.schema_title: cls for cls in (dsl.Artifact, dsl.Dataset, dsl.Model)}
    read_as = {s.renamed.get(arg, arg): classes[components[s.name].component_spec.inputs[arg].type.split("@")[0]]
               for s in steps for arg in s.inputs}

    def dag():  # no return annotation: kfp would read the string "None" as an output
        imported = {}
        for name, uri in inputs.items():
            cls = read_as[name] if name in read_as else producers()[name].cls
            task = dsl.importer(artifact_uri=uri, artifact_class=cls, reimport=False)
            task.set_display_name(f"import {name}")
            imported[name] = task.output
        add_tasks(components, steps, values, imported, images)

    dag.__name__ = f"facenet_rerun_{names[0]}"
    return dsl.pipeline(name=f"{PIPELINE_NAME}-rerun-{names[0]}",
                        description=f"Rerun of the {names[0]} step on imported artifacts.")(dag)


def rerun(step: str, sources: list[str], config_path: str | None, pipeline_root: str,
          sets: list[str] | None = None, with_evaluate: bool = False, images: Images | None = None,
          enable_caching: bool = True, runner: str = "subprocess", verbose: bool = False,
          set_option: str = "--set") -> dict[str, Any]:
    """Rerun `step` on the artifacts named by `sources`; returns the summary (also in rerun-summary.json).

    The steps are those of the DAG the sources' run used: when it evaluated on a
    separate evaluation archive (`runs.used_evaluation_archive`), or the config
    names one, evaluate runs on that archive's images (``eval_images``). A
    rerun of evaluate uses the run's checked pairs (``pairs``), or with
    ``--set pairs_uri=...`` (or ``pairs_sha256``) checks that file first.

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
    overrides = rerun_overrides(sets or [], names, set_option)
    if "evaluate" in names and PAIRS_KEYS & set(overrides.get("data", {})):
        names.append("check_pairs")
    config = load_config(config_path, overrides, overrides_from=assignments_label(sets or [], set_option))
    found, described = resolve_sources(sources, producers(), producers(align=True))
    if "align" in names and "raw_images" not in found and "images" in found:
        found["raw_images"] = found["images"]       # a run without alignment: its images are extract's
    # The artifacts' producers in the DAG the run used (with alignment, images are the align task's).
    family = producers(align="align" in names or config.data.align != "none" or "raw_images" in found)
    evaluation_archive = bool(config.data.eval_source_uri) or used_evaluation_archive(found)
    steps = rerun_steps(names, evaluation_archive)
    produced = {name for name, p in family.items() if p.step in names}
    needed = tuple(dict.fromkeys(s.renamed.get(name, name) for s in steps for name in s.inputs
                                 if s.renamed.get(name, name) not in produced))
    try:
        inputs = check_inputs(needed, found, described, family)
    except InputError as exc:
        if "pairs" in needed and "pairs" not in found:
            raise InputError(f"{exc}; or check a pairs file in this rerun: --set pairs_uri=URI "
                             f"(--set pairs_uri= for none)") from exc
        raise
    if "pairs" in inputs:
        read_checked_pairs(inputs["pairs"])     # a malformed record is refused before anything runs
    pipeline = build_rerun_pipeline(names, inputs, config, images or DEFAULT_IMAGES, evaluation_archive)
    root = pipeline_root_folder(pipeline_root)
    kfp_runner, containers = make_runner(runner, root, config)
    records, failure, seconds = execute(pipeline, root, kfp_runner, enable_caching, containers, verbose=verbose)
    artifacts = {**found, **inputs}
    by_output = {(p.task, p.output): name for name, p in family.items()}
    for record in records:
        for output, value in record.outputs.items():
            if (name := by_output.get((record.name, output))) and record.status != "FAILED":
                artifacts[name] = value["uri"]
    values = parameter_values(config)
    used = sorted({param for s in steps for param in s.parameters.values()})
    return summarise(f"{PIPELINE_NAME}-rerun-{step}", records, failure, seconds, root / RERUN_SUMMARY,
                     step=step, with_evaluate=with_evaluate, evaluation_archive=evaluation_archive,
                     **{"from": described}, inputs=inputs,
                     parameters={name: values[name] for name in used}, artifacts=artifacts,
                     **run_files(records, failure, root))


def checked_overrides(config_path: str | None, items: list[str], option: str) -> dict[str, dict[str, Any]]:
    """`--set` items as config overrides, checked against the config file before anything runs; an error
    in a value names the value as `option` gave it (``SET train.k=8``), not the config file."""
    overrides = parse_assignments(items, parameter_keys(), option=option)
    load_config(config_path, overrides, overrides_from=assignments_label(items, option))
    return overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml", help="YAML config (default: configs/demo.yaml)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. train.max_steps=800 (repeatable)")
    parser.add_argument("--pipeline-root", default="local_outputs", help="where artifacts, the cache and the summary go")
    parser.add_argument("--runner", choices=["subprocess", "docker"], default="subprocess")
    parser.add_argument("--no-cache", action="store_true", help="run every task even when cached")
    parser.add_argument("--verbose", action="store_true",
                        help="print every task's whole output as it runs (default: a line as each task starts and "
                             "ends, with its progress lines; the whole output is in <pipeline root>/logs either way)")
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
    # make passes its SET variable as --set values (and exports it): errors then name SET, as typed.
    option = "SET" if args.sets and os.environ.get("SET", "").split() == args.sets else "--set"
    try:
        images = Images(light=args.light_image, trainer=args.trainer_image)
        if args.rerun:
            summary = rerun(args.rerun, args.sources, args.config, args.pipeline_root, sets=args.sets,
                            with_evaluate=args.with_evaluate, enable_caching=not args.no_cache,
                            runner=args.runner, images=images, verbose=args.verbose, set_option=option)
            path = Path(args.pipeline_root) / RERUN_SUMMARY
        else:
            summary = run_pipeline(args.config, args.source or None, args.sha256 or None, args.pairs or None,
                                   args.pipeline_root, runner=args.runner, demo_dir=args.demo_dir,
                                   demo_identities=args.demo_identities, enable_caching=not args.no_cache,
                                   overrides=with_eval_source(checked_overrides(args.config, args.sets, option),
                                                               args.eval_source, args.eval_sha256),
                                   pairs_sha256=args.pairs_sha256 or None, images=images,
                                   verbose=args.verbose)
            path = Path(args.pipeline_root) / SUMMARY
    except (FacenetError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return report_summary(summary, path)


if __name__ == "__main__":
    sys.exit(main())
