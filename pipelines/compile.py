"""Compile the pipeline to YAML: `python -m pipelines.compile --config configs/lfw.yaml --out build/facenet_pipeline.yaml`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from kfp import compiler

from components import Images
from facenet_kfp.config import load_config
from facenet_kfp.errors import FacenetError
from pipelines.facenet_pipeline import build_pipeline


def compile_pipeline(config_path: str | None, out: str | os.PathLike, light_image: str, trainer_image: str) -> Path:
    """Compile with defaults from `config_path`; the YAML appears at `out` whole or not at all."""
    pipeline = build_pipeline(load_config(config_path), Images(light=light_image, trainer=trainer_image))
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
    args = parser.parse_args(argv)
    try:
        print(f"wrote {compile_pipeline(args.config, args.out, args.light_image, args.trainer_image)}")
    except (FacenetError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
