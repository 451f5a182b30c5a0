"""What a local run or rerun reads: artifacts of earlier runs (summaries, run folders, name=path
pairs), the archive and pairs file a run uses, and a rerun's ``--set`` overrides.

`facenet_kfp.runs` re-exports these names; like it, this module does not depend on kfp.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import yaml

from facenet_kfp.config import load_config, parameter_keys, parse_assignments
from facenet_kfp.errors import InputError
from facenet_kfp.fsutil import file_sha256, local_path, read_json

SUMMARY, RERUN_SUMMARY = "summary.json", "rerun-summary.json"
# A file every folder of each importable artifact holds (eval_images: the evaluation archive's images;
# pairs: the check pairs step's output; raw_images, eval_raw_images: extract's images before alignment).
MARKERS = {"images": "manifest.jsonl", "completion": "manifest.jsonl", "labels": "labels.json",
           "splits": "train.txt", "model": "model.json", "eval_images": "manifest.jsonl", "pairs": "pairs.json",
           "raw_images": "manifest.jsonl", "eval_raw_images": "manifest.jsonl"}
log = logging.getLogger(__name__)


class Producer(NamedTuple):
    """Where the pipeline makes an artifact."""
    step: str      # step name (pipelines/facenet_pipeline.py STEPS)
    task: str      # kfp task name, also the run sub-folder
    output: str    # the task's output (and the artifact's name)
    cls: type      # artifact class for dsl.importer


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


def artifacts_from_summary(path: Path, producers: Mapping[str, Producer],
                           aligned: Mapping[str, Producer] | None = None) -> dict[str, str]:
    """Artifact URIs listed in a summary.json or rerun-summary.json (task outputs, then `artifacts`).

    `aligned`: the producers in the DAG with face alignment, used when the
    summary lists its align task (that run's ``images`` are the aligned ones).
    """
    summary = read_json(path)
    if not isinstance(summary, dict) or not isinstance(summary.get("tasks"), list):
        raise InputError(f"{path}: not a pipeline summary (no 'tasks' list)")
    if aligned is not None and any(isinstance(task, dict) and task.get("name") == aligned["images"].task
                                   for task in summary["tasks"]):
        producers = aligned
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


def resolve_source(spec: str, producers: Mapping[str, Producer],
                   aligned: Mapping[str, Producer] | None = None) -> tuple[dict[str, str], str]:
    """({artifact name: uri}, a description of where they came from) for one --from value.

    `aligned`: the producers in the DAG with face alignment, used for a run that
    has its align task (a summary listing it, a run folder holding its output).
    """
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
        return artifacts_from_summary(newest, producers, aligned), str(newest)
    if aligned is not None and (path / aligned["images"].task / aligned["images"].output).exists():
        producers = aligned
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


def used_evaluation_archive(found: Mapping[str, str]) -> bool:
    """Whether the run that made the artifacts `found` evaluated on a separate evaluation archive.

    It did when they include the evaluation archive's images (``eval_images``),
    or when its splits were made without a test split (their provenance.json
    records ``test_split: false``): a rerun of evaluate then needs that
    archive's images, and a rerun of splits makes no test split either.
    """
    if "eval_images" in found:
        return True
    path = local_path(found["splits"]) if "splits" in found else None
    record = path / "provenance.json" if path is not None else None
    if record is None or not record.is_file():
        return False
    provenance = read_json(record)
    return isinstance(provenance, dict) and provenance.get("test_split") is False


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


def resolve_sources(specs: list[str], producers: Mapping[str, Producer],
                    aligned: Mapping[str, Producer] | None = None) -> tuple[dict[str, str], list[str]]:
    """Artifact URIs from every --from value (later ones win) and where each value pointed (`aligned`: see
    `resolve_source`)."""
    found: dict[str, str] = {}
    described = []
    for spec in specs:
        artifacts, where = resolve_source(spec, producers, aligned)
        log.info("--from %s: %s (%s)", spec, ", ".join(sorted(artifacts)) or "no artifacts", where)
        found.update(artifacts)
        described.append(where)
    return found, described


def step_overrides(items: list[str], steps: list[str], reads: Mapping[str, set[str]],
                   section: str, option: str = "--set") -> dict[str, dict[str, Any]]:
    """`--set` items of a rerun as config overrides; each must be a parameter one of `steps` reads.

    `reads` gives each step's pipeline parameters; a name is a config key, a
    pipeline parameter or a plain key of `section` (``learning_rate`` for train).
    Errors name `option`, as the user gave the items (``SET`` for make's).
    """
    keys = parameter_keys()
    aliases = {**{key: (s, key) for name, (s, key) in keys.items() if s == section}, **keys}
    parameter_of = {key: name for name, key in keys.items()}
    used = set().union(*(reads[step] for step in steps))
    overrides = parse_assignments(items, aliases, option=option)
    for cfg_section, values in overrides.items():
        for key in values:
            param = parameter_of.get((cfg_section, key), f"{cfg_section}.{key}")
            if param not in used:
                hint = (" (add --with-evaluate to evaluate the new model too)"
                        if steps == ["train"] and param in reads["evaluate"] else "")
                raise InputError(f"{option} {cfg_section}.{key}: step {' + '.join(steps)} does not read {param}"
                                 f"{hint}; it reads: {', '.join(sorted(used)) or 'no parameters'}")
    return overrides
