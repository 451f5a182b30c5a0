"""`facenet-kfp <step> ...`: run any pipeline step by hand on local paths.

Each subcommand calls the same library function as the step's KFP component.
Errors in the input (a bad archive, a missing file, a wrong value) print one
line naming the file, key or value and exit with status 2. An output path is
never an input, a folder holding one or inside one; SIGTERM stops a step with
its temporary files removed (exit status 143). The data steps' options take
their defaults, types and limits from the config (facenet_kfp.config: one
source); numbers may be written as ``1e-3``; sizes are in MiB (2**20 bytes).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable

from facenet_kfp import __version__
from facenet_kfp.errors import FacenetError
from facenet_kfp.fsutil import atomic_dir


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def cmd_synth(args: argparse.Namespace) -> None:
    """`facenet-kfp synth`: write a generated face archive (and pairs.txt) into the folder `--out`.

    Calls `synth.generate_demo_archive`; prints the archive, pairs file, sha256 and counts. The folder
    is written atomically and only replaces an earlier synth output. InputError for bad sizes or layouts.
    """
    from facenet_kfp.synth import generate_demo_archive

    out = Path(args.out)
    # Written as one folder: an earlier synth output may be replaced, a user's folder never.
    with atomic_dir(out, step="synth") as tmp:
        result = generate_demo_archive(tmp, identities=args.identities, seed=args.seed,
                                       lfw_scale=args.lfw_scale, image_size=args.image_size,
                                       workers=args.workers, layout=args.layout,
                                       archive_format=args.format, counts=args.counts,
                                       casia_scale=args.casia_scale, pool=args.pool,
                                       boxes=not args.no_boxes)
    pairs = f"pairs:   {out / result.pairs.name}\n" if result.pairs else ""
    print(f"archive: {out / result.archive.name}\n{pairs}sha256:  {result.sha256}\n"
          f"{result.layout} layout, {result.identities} identities, {result.images} images")


def cmd_download(args: argparse.Namespace) -> None:
    """`facenet-kfp download SOURCE --out FILE [--sha256 HEX]`: `download.download`; prints size and sha256.

    A FILE that exists is replaced only when it is a regular file (`download.check_replaceable_file`).
    InputError for a bad URI or sha256, DownloadError when fetching fails or the hash differs.
    """
    from facenet_kfp.download import check_replaceable_file, download

    check_replaceable_file(args.out, args.sha256)
    result = download(args.source, args.out, args.sha256, max_download_gb=args.max_download_gb)
    _print_json(result.metadata())


def cmd_extract(args: argparse.Namespace) -> None:
    """`facenet-kfp extract ARCHIVE --out FOLDER`: `extract.extract_dataset`; prints its summary.

    The summary's list of skipped members is printed as its length. InputError for an unsafe,
    corrupt or mostly unusable archive (see `extract_dataset`).
    """
    from facenet_kfp.extract import extract_dataset

    summary = extract_dataset(args.archive, args.out, shard_size_mb=args.shard_size_mb,
                              max_skipped_fraction=args.max_skipped_fraction,
                              max_expansion=args.max_expansion)
    _print_json({k: v for k, v in summary.items() if k != "skipped"} | {"skipped": len(summary.get("skipped", []))})


def cmd_align(args: argparse.Namespace) -> None:
    """`facenet-kfp align IMAGES --out FOLDER`: `align.align_dataset`; prints its summary.

    Detects each image's face (MTCNN) and aligns it on its five landmarks at `--size`. InputError when more
    than `--max-fallback-fraction` of the images had no face found (naming examples).
    """
    from facenet_kfp.align import align_dataset

    summary = align_dataset(args.images, args.out, size=args.size, max_fallback_fraction=args.max_fallback_fraction)
    _print_json(summary)


def cmd_labels(args: argparse.Namespace) -> None:
    """`facenet-kfp labels IMAGES --out FOLDER`: `labels.build_labels`; prints its summary."""
    from facenet_kfp.labels import build_labels

    _print_json(build_labels(args.images, args.out))


def cmd_complete(args: argparse.Namespace) -> None:
    """`facenet-kfp complete IMAGES LABELS --out FOLDER`: `complete.complete_dataset`; prints its summary.

    The list of excluded identities stays in the output's completion.json. InputError when the labels
    were not made from IMAGES.
    """
    from facenet_kfp.complete import complete_dataset

    summary = complete_dataset(args.images, args.labels, args.out, multiple=args.multiple,
                               seed=args.seed, min_images=args.min_images,
                               shard_size_mb=args.shard_size_mb)
    _print_json({k: v for k, v in summary.items() if k != "excluded"})


def cmd_splits(args: argparse.Namespace) -> None:
    """`facenet-kfp splits LABELS --out FOLDER`: `splits.make_splits`; prints the split sizes."""
    from facenet_kfp.splits import make_splits

    _print_json(make_splits(args.labels, args.out, fractions=args.fractions, seed=args.seed))


def _fractions(text: str) -> tuple[float, float, float]:
    """`--fractions train,val,test`: three finite numbers (make_splits checks their range and sum)."""
    parts = text.split(",")
    try:
        values = tuple(float(x) for x in parts)
    except ValueError:
        values = ()
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected three numbers train,val,test such as "
                                         f"0.7,0.15,0.15; got {text!r}")
    return values


def _load_config(path: str | None, items: list[str], section: str) -> Any:
    """The config of `--config` and the `--set key=value` options (`key` or `section.key`), typed and
    checked by the config fields; an error in a --set value names the --set value."""
    from dataclasses import fields

    from facenet_kfp.config import SECTIONS, assignments_label, load_config, parse_assignments

    overrides = parse_assignments(items, {f.name: (section, f.name) for f in fields(SECTIONS[section])})
    return load_config(path, overrides, overrides_from=assignments_label(items))


def cmd_train(args: argparse.Namespace) -> None:
    """`facenet-kfp train IMAGES COMPLETION LABELS SPLITS --out MODEL`: `train.train`; prints its final metrics.

    The config (`--config`, `--set`) is checked before TensorFlow is imported, so a wrong key fails at
    once. InputError for inputs of different lineages or a checkpoint of another run; FacenetError
    when training collapses or diverges (nothing is exported then).
    """
    config = _load_config(args.config, args.set, "train")   # checked before TensorFlow is imported
    if args.processes is not None:
        _run_train_processes(args)
        return
    from facenet_kfp import multiprocess
    from facenet_kfp.fsutil import write_json
    from facenet_kfp.train import train

    result = train(args.images, args.completion, args.labels, args.splits, args.out, config.train,
                   checkpoint_dir=args.checkpoint_dir, tensorboard_dir=args.tensorboard_dir, run_key=args.run_key)
    if args.result and multiprocess.is_chief():
        write_json(args.result, result)
    _print_json(result)


def _run_train_processes(args: argparse.Namespace) -> None:
    """`train --processes N`: the same command as N local processes of one JAX process group
    (`multiprocess.run_local`). InputError when the backend is not jax or N < 1; FacenetError when a
    process fails (the others are stopped then)."""
    from facenet_kfp import multiprocess
    from facenet_kfp.errors import FacenetError, InputError

    backend = os.environ.get("KERAS_BACKEND", "")
    if backend != "jax":
        raise InputError(f"train --processes {args.processes}: multi-process training runs on JAX; set "
                         f"KERAS_BACKEND=jax (it is {backend or 'unset'})")
    argv = [*(["--quiet"] if args.quiet else []), "train", args.images, args.completion, args.labels,
            args.splits, "--out", args.out]
    for option, value in (("--config", args.config), ("--checkpoint-dir", args.checkpoint_dir),
                          ("--run-key", args.run_key), ("--result", args.result)):
        argv += [option, value] if value is not None else []
    for folder in args.tensorboard_dir or []:
        argv += ["--tensorboard-dir", folder]
    for setting in args.set:
        argv += ["--set", setting]
    rc = multiprocess.run_local(argv, args.processes)
    if rc:
        raise FacenetError(f"train --processes {args.processes}: a training process failed (exit status {rc})")


def cmd_evaluate(args: argparse.Namespace) -> None:
    """`facenet-kfp evaluate MODEL IMAGES SPLITS --out FOLDER`: `evaluate.evaluate`; prints the metrics.

    FOLDER gets report.html, threshold.json and metrics.json, written as one folder that only replaces
    an earlier evaluate output. InputError for a model folder, pairs file or split that cannot be used.
    """
    config = _load_config(args.config, args.set, "evaluate")
    from facenet_kfp.evaluate import evaluate

    out = Path(args.out)
    # The three files are written as one folder: an earlier evaluate output may be replaced,
    # a user's folder never.
    with atomic_dir(out, step="evaluate") as tmp:
        result = evaluate(args.model, args.images, args.splits, config.evaluate,
                          report_path=tmp / "report.html", threshold_path=tmp / "threshold.json",
                          metrics_path=tmp / "metrics.json", pairs_uri=args.pairs or "",
                          pairs_sha256=args.pairs_sha256 or "",
                          model_uri=str(Path(args.model).resolve()))
    _print_json(result["metrics"])
    print(f"report: {out / 'report.html'}\nthreshold: {out / 'threshold.json'}")


def _model_of(args: argparse.Namespace, threshold_needed: bool) -> tuple[str, str | None, str]:
    """(model folder, threshold file or None, where they came from: "" or the run) of `--model` /
    `--threshold-file`, or of `--run`."""
    from facenet_kfp.errors import InputError
    from facenet_kfp.verify import run_artifacts

    if not args.run:
        return args.model, getattr(args, "threshold_file", None), ""
    if getattr(args, "threshold_file", None):
        raise InputError("--threshold-file and --run both name a threshold: give one (--threshold VALUE "
                         "overrides the run's)")
    model_dir, threshold_file, where = run_artifacts(args.run)
    explicit = getattr(args, "threshold", None) is not None
    if threshold_needed and threshold_file is None and not explicit:
        raise InputError(f"--run {args.run}: the run's model {model_dir} has no evaluated threshold in "
                         f"{where}; pass --threshold VALUE, or evaluate the model (make rerun STEP=evaluate "
                         f"FROM={args.run})")
    return str(model_dir), None if explicit or threshold_file is None else str(threshold_file), where


def cmd_verify(args: argparse.Namespace) -> None:
    """`facenet-kfp verify A B (--model M | --run R)`: `verify.verify_pair`; prints distance, threshold, verdict.

    A model trained on aligned faces gets each photo's face aligned first (`--face`, `--no-detect`);
    a line per image then says how many faces were found and which was used. InputError names an
    unreadable image or one without a face, a threshold outside the distance's range, or a threshold
    file of another model.
    """
    from facenet_kfp.evaluate import DISTANCE_LABELS
    from facenet_kfp.verify import verify_pair

    model_dir, threshold_file, where = _model_of(args, threshold_needed=True)
    result = verify_pair(model_dir, args.image_a, args.image_b, threshold=args.threshold,
                         threshold_file=threshold_file, detect=not args.no_detect, face=args.face)
    if where:
        print(f"model:     {model_dir} (from {where})")
    for line in _face_lines(result):
        print(line)
    unit = DISTANCE_LABELS[result["distance_definition"]]
    source = "" if result["threshold_source"] == "argument" else f"; from {result['threshold_source']}"
    print(f"distance:  {result['distance']:.4f} ({unit})")
    print(f"threshold: {result['threshold']:.4f} ({unit}; same person when distance < threshold{source})")
    print(result["verdict"])


def _face_lines(result: dict[str, Any]) -> list[str]:
    """verify's lines on the faces used: one per image when detecting, one when `--no-detect` skipped
    detection, none for a model trained on unaligned images."""
    alignment = result.get("alignment")
    if alignment is None:
        return []
    size = f"{alignment['size']}x{alignment['size']}"
    if not alignment["detect"]:
        return [f"faces:     not detected (--no-detect): the images are taken as aligned {size} crops"]
    lines = []
    for label, found in zip(("face A:", "face B:"), result["faces"]):
        count = found["faces"]
        chosen = "" if count == 1 else (", the most central used" if found["chosen"] == "central"
                                        else ", the largest used")
        x, y, w, h = (round(v) for v in found["box"])
        lines.append(f"{label:<10} {found['path']}: {count} face{'s' if count != 1 else ''} found{chosen} "
                     f"(score {found['score']:.3f}, box {w}x{h} at {x},{y}); aligned to {size}")
    return lines


def cmd_embed(args: argparse.Namespace) -> None:
    """`facenet-kfp embed IMAGE... (--model M | --run R) --out FILE`: `verify.embed_files`; prints its summary.

    FILE is .npz (embeddings and paths), .csv or .tsv (a row per image); it must not be the model or
    inside it. A model trained on aligned faces gets each photo's face aligned first (`--face`,
    `--no-detect`); the summary then lists, per image, the faces found and the one used. InputError
    for another suffix, an unreadable image or one without a face.
    """
    from facenet_kfp.verify import embed_files

    from facenet_kfp.fsutil import check_outputs_apart

    model_dir, _, where = _model_of(args, threshold_needed=False)
    if where:
        logging.getLogger(__name__).info("model %s (from %s)", model_dir, where)
    check_outputs_apart({"--out": args.out}, {"the model": model_dir})
    _print_json(embed_files(model_dir, args.images, args.out, batch_size=args.batch_size,
                            detect=not args.no_detect, face=args.face))


def cmd_serve(args: argparse.Namespace) -> None:
    """`facenet-kfp serve (--model M [--threshold FILE] | --run R)`: `serve.load_served`, then `serve.serve`.

    Everything is checked before the server starts: the model, a threshold.json evaluated for it
    (`--threshold`, else the model's or the run's; without one the server refuses to start unless
    `--embed-only`) and the face detector of a model trained on aligned faces. Serves `--name` (embed)
    and `--name`-verify on KServe's v1 and v2 endpoints until SIGINT / SIGTERM.
    """
    from facenet_kfp.serve import check_model_name, load_served, serve
    from facenet_kfp.verify import run_artifacts

    check_model_name(args.name)
    threshold_file, where = args.threshold, ""
    model_dir = args.model
    if args.run:
        model_dir, run_threshold, where = run_artifacts(args.run)
        threshold_file = threshold_file or run_threshold
    if where:
        logging.getLogger(__name__).info("model %s (from %s)", model_dir, where)
    served = load_served(model_dir, threshold_file, embed_only=args.embed_only, detect=not args.no_detect,
                         face=args.face)
    serve(served, name=args.name, host=args.host, port=args.port, max_images=args.max_images,
          max_batch=args.max_batch)


def _add_set(parser: argparse.ArgumentParser, section: str, example: str) -> None:
    """`--set KEY=VALUE` for one config section; `--help` lists its keys with their help and defaults."""
    from dataclasses import fields

    from facenet_kfp.config import SECTIONS

    from facenet_kfp.config import describe_limits

    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a {section} key ({example}); the keys are listed below")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    cls = SECTIONS[section]
    parser.epilog = f"{section} keys (--set KEY=VALUE, or in --config under {section}:):\n" + "\n".join(
        f"  {f.name:<20} {f.metadata['help']} (default {f.default!r}"
        + (f"; {limits})" if (limits := describe_limits(cls, f.name)) else ")") for f in fields(cls))


def _number(kind: type, option: str, minimum: int | None = None) -> Callable[[str], Any]:
    """An argparse type: a number of `kind` as the config reads one (``1e-3``, ``2e4`` for an int),
    finite, at least `minimum`."""
    def parse(text: str) -> Any:
        from facenet_kfp.config import parse_value

        try:
            value = parse_value(option, text, kind)
        except FacenetError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"{option} must be at least {minimum}, got {text}")
        return value
    return parse


def _from_config(parser: argparse.ArgumentParser, option: str, section: str, key: str, help_text: str) -> None:
    """An option whose type, limits and default are the config field `section.key`'s (one source)."""
    import typing
    from dataclasses import fields

    from facenet_kfp.config import SECTIONS, describe_limits, parse_assignments

    cls = SECTIONS[section]
    default = {f.name: f.default for f in fields(cls)}[key]

    def parse(text: str) -> Any:
        try:
            return parse_assignments([f"{section}.{key}={text}"], option=option)[section][key]
        except FacenetError as exc:
            raise argparse.ArgumentTypeError(str(exc).replace(f"{option} {section}.{key} ", f"{option} ", 1)) from None

    parse.__name__ = typing.get_type_hints(cls)[key].__name__
    limits = describe_limits(cls, key)
    parser.add_argument(option, type=parse, default=default,
                        help=f"{help_text} (default {default:g}{'; ' + limits if limits else ''}; config "
                             f"{section}.{key})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="facenet-kfp", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"facenet-kfp {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<step>")

    def add(name: str, func: Callable[[argparse.Namespace], None], help_text: str,
            inputs: tuple[str, ...] = (), outputs: tuple[str, ...] = ("out",)) -> argparse.ArgumentParser:
        """A subcommand; `inputs` / `outputs` name its path arguments for `_check_paths`."""
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func, path_inputs=inputs, path_outputs=outputs)
        return p

    from facenet_kfp import synth   # its choices of layout, format and counts

    p = add("synth", cmd_synth, "write a demo archive of procedurally drawn faces (default lfw.tgz, "
                                "pairs.txt, sha256; also CASIA-WebFace, VGGFace2 and nested layouts)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--identities", type=_number(int, "--identities", 1), default=120,
                   help="number of identities (default 120)")
    p.add_argument("--seed", type=_number(int, "--seed", 0), default=0, help="random seed (default 0)")
    p.add_argument("--lfw-scale", action="store_true", help="LFW's full size: 5,749 identities, 13,233 images")
    p.add_argument("--layout", default="lfw", choices=synth.LAYOUTS,
                   help="archive layout (default lfw; only lfw writes pairs.txt)")
    p.add_argument("--format", default="tgz", choices=synth.ARCHIVE_FORMATS, help="archive format (default tgz)")
    p.add_argument("--counts", choices=synth.COUNT_SHAPES, default=None,
                   help="shape of the images-per-identity counts (default casia with --casia-scale, else lfw)")
    p.add_argument("--casia-scale", action="store_true",
                   help="CASIA-WebFace's size: 10,575 identities, 494,414 images (use with --pool)")
    p.add_argument("--pool", type=_number(int, "--pool", 1), default=None,
                   help="render N faces per identity and derive every image from one of them (much faster)")
    p.add_argument("--image-size", type=_number(int, "--image-size", 1), default=250,
                   help="image side in px (default 250)")
    p.add_argument("--workers", type=_number(int, "--workers", 1), default=None,
                   help="rendering processes (default: all CPUs)")
    p.add_argument("--no-boxes", action="store_true", help="vggface2: leave out bb_landmark/loose_bb_*.csv")

    p = add("download", cmd_download, "step 1: fetch an archive (https://, gs://, file:// or path), verify sha256",
            inputs=("source",))
    p.add_argument("source", help="archive URI or path")
    p.add_argument("--out", required=True, help="destination file")
    p.add_argument("--sha256", default="", help="expected sha256 (64 hex digits)")
    _from_config(p, "--max-download-gb", "data", "max_download_gb", "fail past this many GB (10**9 bytes) received")

    p = add("extract", cmd_extract, "step 2: safely extract an archive into a packed image dataset",
            inputs=("archive",))
    p.add_argument("archive", help="archive file (.tgz, .tar.gz, .tar, .zip)")
    p.add_argument("--out", required=True, help="output dataset folder")
    _from_config(p, "--shard-size-mb", "data", "shard_size_mb", "target shard size in MiB (2**20 bytes)")
    _from_config(p, "--max-skipped-fraction", "data", "max_skipped_fraction",
                 "fail when a larger fraction of the images is unusable")
    _from_config(p, "--max-expansion", "data", "max_expansion",
                 "fail when extraction writes more than this many times the archive's size (at least 64 MiB)")

    p = add("align", cmd_align, "step 2a: detect and align every face (MTCNN, five landmarks) into a packed dataset",
            inputs=("images",))
    p.add_argument("images", help="packed image dataset folder (extract's output)")
    p.add_argument("--out", required=True, help="output folder of the aligned dataset")
    _from_config(p, "--size", "data", "align_size", "side of the aligned crops in pixels")
    _from_config(p, "--max-fallback-fraction", "data", "max_align_fallback_fraction",
                 "fail when more of the images had no face found (they become centre crops)")

    p = add("labels", cmd_labels, "step 3: write labels.json (name -> id, sorted) and image_counts.json",
            inputs=("images",))
    p.add_argument("images", help="packed image dataset folder")
    p.add_argument("--out", required=True, help="output labels folder")

    p = add("complete", cmd_complete, "step 4: augment identities up to a multiple of K images",
            inputs=("images", "labels"))
    p.add_argument("images", help="packed image dataset folder")
    p.add_argument("labels", help="labels folder")
    p.add_argument("--out", required=True, help="output completion folder")
    _from_config(p, "--multiple", "data", "multiple", "K: complete every identity up to a multiple of K images")
    _from_config(p, "--min-images", "data", "min_images", "skip identities with fewer real images")
    _from_config(p, "--seed", "data", "completion_seed", "augmentation seed")
    _from_config(p, "--shard-size-mb", "data", "shard_size_mb", "target shard size in MiB (2**20 bytes)")

    from facenet_kfp.config import DataConfig

    data_fractions = (DataConfig().train_fraction, DataConfig().val_fraction, DataConfig().test_fraction)
    p = add("splits", cmd_splits, "step 5: identity-disjoint train/val/test splits", inputs=("labels",))
    p.add_argument("labels", help="labels folder")
    p.add_argument("--out", required=True, help="output splits folder")
    p.add_argument("--fractions", type=_fractions, default=data_fractions,
                   help=f"train,val,test fractions (default {','.join(f'{v:g}' for v in data_fractions)}; "
                        f"config data.train_fraction, val_fraction, test_fraction)")
    _from_config(p, "--seed", "data", "split_seed", "shuffle seed")

    p = add("train", cmd_train, "step 6: train the embedding network with online triplet mining (Keras backend: "
            "KERAS_BACKEND=tensorflow, the default, or jax)",
            inputs=("images", "completion", "labels", "splits", "config"),
            outputs=("out", "checkpoint_dir", "tensorboard_dir", "result"))
    for name in ("images", "completion", "labels", "splits"):
        p.add_argument(name, help=f"{name} folder")
    p.add_argument("--out", required=True, help="output model folder")
    p.add_argument("--config", default=None, help="YAML config (its train section is used)")
    _add_set(p, "train", "e.g. --set max_steps=100")
    p.add_argument("--checkpoint-dir", default=None, help="checkpoint folder (default <out>.ckpt); resumed only when it "
                   "was written for the same --out, inputs and settings")
    p.add_argument("--tensorboard-dir", action="append", default=None,
                   help="write TensorBoard events here (repeat for several folders, paths or gs://)")
    p.add_argument("--run-key", default=None, help="what this training is for (a KFP task gives its model output "
                   "URI): a checkpoint is resumed only for the same key (default: the absolute --out)")
    p.add_argument("--result", default=None, help="also write the final metrics to this JSON file (process 0)")
    p.add_argument("--processes", type=_number(int, "--processes", 1), default=None,
                   help="run as this many local JAX processes of one process group, as a Kubeflow TrainJob "
                        "runs one per node (KERAS_BACKEND=jax)")

    p = add("evaluate", cmd_evaluate, "step 7: choose the threshold on validation pairs, report test metrics",
            inputs=("model", "images", "splits", "config", "pairs"))
    p.add_argument("model", help="model folder from train")
    p.add_argument("images", help="packed image dataset folder")
    p.add_argument("splits", help="splits folder")
    p.add_argument("--out", required=True, help="output folder (report.html, threshold.json, metrics.json)")
    p.add_argument("--config", default=None, help="YAML config (its evaluate section is used)")
    _add_set(p, "evaluate", "e.g. --set folds=5")
    p.add_argument("--pairs", default="", help="LFW pairs.txt (URI or path) for the standard protocol")
    p.add_argument("--pairs-sha256", default="", help="expected sha256 of pairs.txt")

    p = add("verify", cmd_verify, "are two face images the same person? prints the distance and the verdict",
            outputs=())
    _model_options(p, "trained model and evaluated threshold")
    p.add_argument("image_a")
    p.add_argument("image_b")
    p.add_argument("--threshold", type=_number(float, "--threshold"), default=None,
                   help="distance threshold, in the model's own distance (default: the evaluated one)")
    p.add_argument("--threshold-file", default=None, help="threshold.json from the evaluate step, evaluated "
                                                          "for this model")
    _face_options(p)

    p = add("embed", cmd_embed, "write embeddings of face images (one row per image, with its path)",
            inputs=("model", "images"))
    _model_options(p, "trained model")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--out", required=True, help="output .npz, .csv or .tsv")
    _from_config(p, "--batch-size", "evaluate", "batch_size", "images per embedding batch")
    _face_options(p)

    from facenet_kfp import serve as sd

    p = add("serve", cmd_serve, "serve embeddings and face verification over HTTP (KServe model server, v1 and v2 "
            "protocols): models NAME and NAME-verify", outputs=())
    _model_options(p, "trained model and evaluated threshold")
    p.add_argument("--threshold", default=None, metavar="FILE",
                   help="threshold.json from the evaluate step, evaluated for this model (default: the run's, "
                        "else <model>/threshold.json, else threshold.json next to the model folder)")
    p.add_argument("--embed-only", action="store_true",
                   help="serve embeddings only (NAME), no verification: needs no threshold")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    p.add_argument("--port", type=_number(int, "--port", 1), default=sd.DEFAULT_PORT,
                   help=f"HTTP port (default {sd.DEFAULT_PORT}, KServe's container port)")
    p.add_argument("--name", default=sd.DEFAULT_NAME,
                   help=f"model name in the URLs; verification is NAME-verify (default {sd.DEFAULT_NAME})")
    p.add_argument("--max-images", type=_number(int, "--max-images", 1), default=sd.DEFAULT_MAX_IMAGES,
                   help=f"images one request may hold, a pair counting two (default {sd.DEFAULT_MAX_IMAGES})")
    p.add_argument("--max-batch", type=_number(int, "--max-batch", 1), default=sd.DEFAULT_MAX_BATCH,
                   help=f"images the model embeds in one call, requests waiting together (default "
                        f"{sd.DEFAULT_MAX_BATCH})")
    _face_options(p)
    return parser


def _face_options(parser: argparse.ArgumentParser) -> None:
    """`--face` and `--no-detect`: how photos are aligned for a model trained on aligned faces."""
    from facenet_kfp.verify import FACE_RULES

    parser.add_argument("--face", choices=FACE_RULES, default=FACE_RULES[0],
                        help="for a model trained on aligned faces: the face used when a photo shows several, "
                             "the most central or the largest (default central)")
    parser.add_argument("--no-detect", action="store_true",
                        help="for a model trained on aligned faces: the images are aligned crops already "
                             "(the align step's); skip face detection")


def _model_options(parser: argparse.ArgumentParser, what: str) -> None:
    """`--model FOLDER` or `--run RUN` (a run's model and threshold), one of them required."""
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--model", help="model folder from train")
    group.add_argument("--run", help=f"a local pipeline run: its pipeline root (summary.json), a summary file "
                                     f"or a run folder; takes the run's {what}")


def _check_paths(args: argparse.Namespace) -> None:
    """No output path of the command is one of its inputs, holds one, or lies inside one."""
    from facenet_kfp.fsutil import check_outputs_apart

    def named(dests: tuple[str, ...], option: bool) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for dest in dests:
            value = getattr(args, dest)
            label = "--" + dest.replace("_", "-") if option else dest
            values = value if isinstance(value, list) else [value]
            for i, item in enumerate(values):
                found[label if len(values) == 1 else f"{label} #{i + 1}"] = item
        return found

    check_outputs_apart(named(args.path_outputs, True), named(args.path_inputs, False))


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default: sys.argv), run the subcommand; 0 on success, 2 on a FacenetError (one line on stderr)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from facenet_kfp.fsutil import sigterm_as_exit

    try:
        with sigterm_as_exit():
            _check_paths(args)
            args.func(args)
    except FacenetError as exc:
        print(f"facenet-kfp {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
