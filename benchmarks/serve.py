"""Benchmark `facenet-kfp serve`: requests/s and latency of embed and verify over real HTTP.

Starts the server (`facenet-kfp serve`, its own process, on a free local port)
on the demo model, the one `make run` leaves in local_outputs (`--run`), or
`--model DIR`. When the run has no model yet, it says so (`make run` trains
one) and serves an untrained stand-in instead: configs/demo.yaml's network
(same architecture, input size and embedding size, so the same cost per
image), built in `--work` with a threshold.json, cheap to make; the report
says which it measured.

Each request carries `--images` images (a real face photo, matplotlib's
sample grace_hopper.jpg, at 250 x 250 like the demo's images, so a model
trained on aligned faces finds its face) as a v2 request with base64 BYTES.
Settings, one after the other, each after `--warmup` untimed requests:

* embed at concurrency 1 and 8 (that many client threads, one httpx client
  each, sending `--requests` requests in all);
* verify (one pair a request) at concurrency 1.

Prints requests/s and p50 / p99 latency per setting, the ratio of embed's
requests/s at concurrency 8 to 1 (the server's dynamic batching and its
thread pool overlapping decoding with the model), and the machine
(`harness.machine_info`). The result JSON goes to `--json`, else $OUT when
set, else `--work`/results.json. No figure has a target: they describe this
machine.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import machine_info, print_machine, result_path, say, write_result

ROOT = Path(__file__).resolve().parents[1]
JSON_NAME = "serve-benchmark.json"
STAND_IN_THRESHOLD = 1.0        # squared L2; the stand-in is untrained, so any value in [0, 4] serves
CONCURRENCY = (1, 8)


def stand_in_model(work: Path) -> tuple[Path, Path]:
    """An untrained model of configs/demo.yaml's network in `work`/model, with a threshold.json evaluated for it
    in form (embedding size, distance, preprocessing, model sha256); made once and reused."""
    folder = work / "model"
    threshold = folder / "threshold.json"
    if threshold.is_file():
        return folder, threshold
    from facenet_kfp import export
    from facenet_kfp.config import load_config
    from facenet_kfp.fsutil import file_sha256, write_json
    from facenet_kfp.model import build_embedding_model

    train = load_config(ROOT / "configs" / "demo.yaml").train
    model = build_embedding_model((train.image_size, train.image_size, 3), train.embedding_dim,
                                  architecture=train.architecture)
    history = {"train": [], "val": []}
    export.save_model_artifact(model, folder, export.artifact_metadata(train, trained_steps=0), history)
    metadata = json.loads((folder / "model.json").read_text())
    write_json(threshold, {"threshold": STAND_IN_THRESHOLD, "distance": metadata["distance"]["name"],
                           "model": str(folder), "model_sha256": file_sha256(folder / "model.keras"),
                           "model_distance": metadata["distance"]["name"],
                           "embedding_dim": metadata["embedding_dim"], "preprocessing": metadata["preprocessing"],
                           "note": "untrained stand-in for the serving benchmark"})
    return folder, threshold


def choose_model(args: argparse.Namespace) -> tuple[Path, Path | None, str]:
    """(model folder, threshold.json or None, what it is) from --model, else --run, else the stand-in."""
    from facenet_kfp.errors import InputError
    from facenet_kfp.verify import find_threshold_file, run_artifacts

    if args.model:
        return Path(args.model), find_threshold_file(args.model), f"--model {args.model}"
    try:
        model_dir, threshold, where = run_artifacts(args.run)
        return model_dir, threshold, f"the model of {where}"
    except InputError as exc:
        say(f"no model in {args.run} ({exc}); `make run` trains the demo model there. Serving an untrained "
            f"stand-in of configs/demo.yaml's network instead (same architecture and input size: the same "
            f"cost per image)")
    model_dir, threshold = stand_in_model(Path(args.work))
    return model_dir, threshold, "untrained stand-in of configs/demo.yaml's network"


def face_photo(side: int = 250) -> bytes:
    """matplotlib's sample photo of a face, side x side, as a JPEG (quality 90)."""
    from matplotlib import cbook
    from PIL import Image

    with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as photo:
        buffer = io.BytesIO()
        photo.convert("RGB").resize((side, side)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def server(model_dir: Path, threshold: Path | None, log: Path, timeout: float = 300):
    """`facenet-kfp serve` on the model (embed only without a threshold) until ready: yields its URL."""
    args = ["--model", str(model_dir)]
    args += ["--threshold", str(threshold)] if threshold is not None else ["--embed-only"]
    log.parent.mkdir(parents=True, exist_ok=True)
    with running_server(args, log, timeout) as url:
        yield url


@contextlib.contextmanager
def running_server(args: list[str], log: Path, timeout: float = 300):
    """`facenet-kfp serve ARGS` on a free local port until ready: yields its base URL; SIGTERM at the end.

    RuntimeError with the end of its log (`log`) when it exits or is not ready within `timeout` seconds.
    """
    import httpx

    port = free_port()
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "facenet_kfp.cli", "serve", *args, "--host", "127.0.0.1",
                                    "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with status {process.returncode}; its log:\n"
                                   f"{log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server was not ready in {timeout:.0f} s; its log ({log}):\n"
                                   f"{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def drive(url: str, path: str, body: dict[str, Any], requests: int, warmup: int, concurrency: int) -> dict[str, Any]:
    """Send `warmup` untimed requests, then `requests` from `concurrency` threads: requests/s, latency figures."""
    import httpx

    with httpx.Client(base_url=url, timeout=120) as client:
        for _ in range(warmup):
            client.post(path, json=body).raise_for_status()
    latencies: list[float] = []
    errors: list[str] = []
    left = iter(range(requests))
    lock = threading.Lock()

    def worker() -> None:
        with httpx.Client(base_url=url, timeout=120) as client:
            while True:
                with lock:
                    if next(left, None) is None:
                        return
                start = time.perf_counter()
                response = client.post(path, json=body)
                seconds = time.perf_counter() - start
                with lock:
                    (latencies.append(seconds) if response.status_code == 200
                     else errors.append(f"{response.status_code} {response.text[:200]}"))

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    if errors:
        raise SystemExit(f"{len(errors)} of {requests} requests to {path} failed, e.g. {errors[0]}")
    ms = np.asarray(latencies) * 1e3
    return {"concurrency": concurrency, "requests": requests, "wall_seconds": wall,
            "requests_per_second": requests / wall, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean())}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="local_outputs", help="pipeline root or run folder whose model is served "
                                                          "(default local_outputs, what `make run` leaves)")
    p.add_argument("--model", default=None, help="serve this model folder instead (its threshold.json if any)")
    p.add_argument("--requests", type=int, default=200, help="timed requests per setting (default 200)")
    p.add_argument("--warmup", type=int, default=20, help="untimed requests before each setting (default 20)")
    p.add_argument("--images", type=int, default=1, help="images per embed request (default 1)")
    p.add_argument("--work", default="data/bench/serve", help="stand-in model, server log, results.json")
    p.add_argument("--json", default=None, help=f"write the result here (default: $OUT/{JSON_NAME} when OUT is "
                                                f"set, else WORK/results.json)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    for name in ("requests", "images"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be at least 1")
    work = Path(args.work)
    model_dir, threshold, what = choose_model(args)
    photo = base64.b64encode(face_photo()).decode()
    embed = {"inputs": [{"name": "images", "shape": [args.images], "datatype": "BYTES", "data": [photo] * args.images}]}
    pair = {"inputs": [{"name": name, "shape": [1], "datatype": "BYTES", "data": [photo]}
                       for name in ("image_a", "image_b")]}
    settings: dict[str, Any] = {}
    say(f"serving {model_dir} ({what})")
    with server(model_dir, threshold, work / "server.log") as url:
        for concurrency in CONCURRENCY:
            say(f"embed, concurrency {concurrency}: {args.requests} requests of {args.images} image(s) ...")
            settings[f"embed_c{concurrency}"] = drive(url, "/v2/models/facenet/infer", embed, args.requests,
                                                      args.warmup, concurrency)
        if threshold is not None:
            say(f"verify, concurrency 1: {args.requests} requests of one pair ...")
            settings["verify_c1"] = drive(url, "/v2/models/facenet-verify/infer", pair, args.requests, args.warmup, 1)
    metadata = json.loads((model_dir / "model.json").read_text())
    ratio = settings["embed_c8"]["requests_per_second"] / settings["embed_c1"]["requests_per_second"]
    result = {"machine": machine_info("tensorflow"), "model": str(model_dir), "model_source": what,
              "stand_in": what.startswith("untrained stand-in"), "architecture": metadata.get("architecture"),
              "input_shape": metadata.get("input_shape"), "embedding_dim": metadata.get("embedding_dim"),
              "alignment": (metadata.get("alignment") or {}).get("method", "none"),
              "images_per_request": args.images, "requests": args.requests, "warmup": args.warmup,
              "protocol": "v2 REST, base64 BYTES", "settings": settings, "embed_c8_vs_c1": ratio,
              "verify_skipped": None if "verify_c1" in settings else "no threshold.json for the model"}

    print()
    print_machine(result["machine"])
    print(f"model: {model_dir} ({what}; {metadata.get('architecture')} {metadata.get('input_shape')}, "
          f"{metadata.get('embedding_dim')}-D)")
    print(f"{'setting':<22} {'requests/s':>10} {'p50 ms':>9} {'p99 ms':>9}")
    for name, row in settings.items():
        label = f"{name.split('_')[0]}, concurrency {row['concurrency']}"
        print(f"{label:<22} {row['requests_per_second']:10.1f} {row['p50_ms']:9.1f} {row['p99_ms']:9.1f}")
    print(f"embed requests/s at concurrency 8 vs 1: {ratio:.2f}x")
    if "verify_c1" not in settings:
        print("verify not measured: the model has no threshold.json")
    path = result_path(args.json, JSON_NAME) or work / "results.json"
    write_result(path, result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
