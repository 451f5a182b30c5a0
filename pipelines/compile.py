"""Compile the pipeline to YAML: `python -m pipelines.compile --config configs/lfw.yaml --out build/facenet_pipeline.yaml`.

``--set KEY=VALUE`` overrides a config key, as for a local run: the DAG's compile-time keys too
(``--set deploy.enabled=true`` adds the deploy step, ``--set data.align=mtcnn`` the align steps).

The YAML names two container images. With the project's default references
(`components.DEFAULT_IMAGES`, ``ghcr.io/facenet-kfp/...``) compiling warns, and `pipelines.submit`
refuses them unless told they exist (``--images-exist``): a cluster can run the pipeline only if
its images are in the registry it names.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from kfp import compiler

from components import DEFAULT_IMAGES, Images
from facenet_kfp.config import assignments_label, load_config, parameter_keys, parse_assignments
from facenet_kfp.errors import FacenetError
from pipelines.facenet_pipeline import build_pipeline


DEFAULT_REGISTRY = DEFAULT_IMAGES.light.rsplit("/", 1)[0]   # ghcr.io/facenet-kfp


def default_images(*images: str) -> list[str]:
    """The `images` that are the project's default references (under its registry, any tag)."""
    return [image for image in images if image.startswith(f"{DEFAULT_REGISTRY}/")]


def default_images_note(images: list[str]) -> str:
    """One line: `images` are the project's default references, and how to name your own."""
    many = len(images) > 1
    return (f"{' and '.join(images)} {'are' if many else 'is'} the project's default image "
            f"reference{'s' if many else ''}, which a cluster can pull only if {'they exist' if many else 'it exists'} "
            f"in that registry: build and push your own (make images push IMAGE_REGISTRY=<registry> "
            f"IMAGE_TAG=<tag>) and use the same IMAGE_REGISTRY and IMAGE_TAG here")


def compile_pipeline(config_path: str | None, out: str | os.PathLike, light_image: str, trainer_image: str,
                     sets: list[str] | None = None, trainer_jax_image: str = "") -> Path:
    """Compile with defaults from `config_path` and the `sets` (``key=value``) overrides; the YAML appears
    at `out` whole or not at all. `trainer_jax_image`: the JAX trainer image of a TrainJob's nodes
    (cluster.train_nodes above 1), default the trainer image's repository with ``-jax`` appended."""
    overrides = parse_assignments(sets or [], parameter_keys())
    config = load_config(config_path, overrides, overrides_from=assignments_label(sets or []))
    pipeline = build_pipeline(config, Images(light=light_image, trainer=trainer_image, trainer_jax=trainer_jax_image))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.compiling.yaml")
    try:
        compiler.Compiler().compile(pipeline, package_path=str(tmp))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/lfw.yaml", help="YAML config whose values become the run form's defaults")
    parser.add_argument("--out", default="build/facenet_pipeline.yaml", help="output YAML path")
    parser.add_argument("--light-image", required=True, help="image of the five data steps, e.g. REGISTRY/facenet-kfp:TAG")
    parser.add_argument("--trainer-image", required=True, help="image of train and evaluate, e.g. REGISTRY/facenet-kfp-trainer:TAG")
    parser.add_argument("--trainer-jax-image", default="",
                        help="JAX (CUDA) image of the TrainJob's nodes with cluster.train_nodes above 1, e.g. "
                             "REGISTRY/facenet-kfp-trainer-jax:TAG (default: the trainer image's name + -jax)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. deploy.enabled=true (repeatable)")
    parser.add_argument("--images-exist", action="store_true",
                        help=f"the images exist in their registry: no warning for {DEFAULT_REGISTRY}/ ones")
    args = parser.parse_args(argv)
    try:
        print(f"wrote {compile_pipeline(args.config, args.out, args.light_image, args.trainer_image, args.sets, args.trainer_jax_image)}")
        if (defaults := default_images(args.light_image, args.trainer_image)) and not args.images_exist:
            print(f"warning: {default_images_note(defaults)}", file=sys.stderr)
    except (FacenetError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
