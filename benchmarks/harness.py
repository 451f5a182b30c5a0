"""What every benchmark shares: the generated data it measures on, and how it reports (machine, figures, JSON).

Data: `make_archive` generates a demo archive once (`synth.generate_demo_archive`)
and `prepare_data` runs the library's extract, labels, complete and splits on
it in this process, each timed, reusing a step's earlier complete output.

Report: `machine_info` says what the figures were measured on (CPU model,
cores, memory, accelerator, library versions), `machine_lines` prints it,
`verdict` words a figure against its target and `write_result` writes a
result as JSON atomically.

Module-level imports stay light and free of TensorFlow and Keras:
benchmarks/gpu.py imports this module on a machine that has neither until
benchmarks/gpu.sh installs Keras, and the archive's rendering processes
import the calling benchmark (and so this module) again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import resource
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from facenet_kfp.config import DataConfig
from facenet_kfp.fsutil import STEP_MARKER, write_text

DATA_STEPS = ("extract", "labels", "complete", "splits")      # in the order each reads the one before
OUTPUTS = {"extract": "images", "align": "aligned", "labels": "labels", "complete": "completion", "splits": "splits"}


def say(message: str) -> None:
    """A progress line with the time of day, flushed at once (a benchmark's output is followed live)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ----------------------------------------------------------------------------- data

@dataclasses.dataclass(frozen=True)
class DataPaths:
    """Where `prepare_data` left the archive and each data step's output, and what it ran, in seconds."""
    archive: Path               # the archive file
    images: Path                # extract: the real images, packed in shards
    labels: Path
    completion: Path            # complete: the generated images
    splits: Path
    seconds: dict[str, float]   # wall seconds of "synth" and of each step this call ran, in order

    def split_folders(self) -> tuple[Path, Path, Path, Path]:
        """(images, completion, labels, splits): the arguments `numpy_input.open_split` and
        `tf_input.load_split_images` take before the split's name."""
        return self.images, self.completion, self.labels, self.splits


def archive_name(layout: str = "lfw") -> str:
    """The file `synth.generate_demo_archive` writes for `layout`: lfw.tgz, CASIA-WebFace.tgz, ..."""
    from facenet_kfp.synth import TOP_FOLDERS

    return f"{TOP_FOLDERS[layout]}.tgz"


def make_archive(folder: Path, *, identities: int = 120, seed: int = 0, lfw_scale: bool = False,
                 layout: str = "lfw", counts: str | None = None, casia_scale: bool = False,
                 pool: int | None = None, progress: Callable[[str], None] = say) -> tuple[Path, float | None]:
    """The demo archive in `folder`, generated only when missing; (its path, seconds it took or None if reused).

    The arguments are `synth.generate_demo_archive`'s (`lfw_scale` and
    `casia_scale` ignore `identities`). The archive is written atomically and
    its `.sha256` after it, so an archive with its checksum is complete.
    """
    archive = Path(folder) / archive_name(layout)
    if archive.is_file() and Path(f"{archive}.sha256").is_file():     # the checksum is written last
        return archive, None
    from facenet_kfp.synth import generate_demo_archive

    size = "LFW scale" if lfw_scale else "CASIA scale" if casia_scale else f"{identities:,} identities"
    progress(f"data: synth ({size}, {layout} layout) -> {archive} ...")
    start = time.perf_counter()
    generate_demo_archive(folder, identities=identities, seed=seed, lfw_scale=lfw_scale, layout=layout,
                          counts=counts, casia_scale=casia_scale, pool=pool)
    seconds = time.perf_counter() - start
    progress(f"data: synth done in {seconds:.1f} s")
    return archive, seconds


def _step_calls(archive: Path, out: dict[str, Path], data: DataConfig, images: Path
                ) -> dict[str, Callable[[], Any]]:
    """Each data step as the library call the pipeline makes, with `data`'s settings; the steps after
    extract (and align) read `images`."""
    from facenet_kfp.complete import complete_dataset
    from facenet_kfp.extract import extract_dataset
    from facenet_kfp.labels import build_labels
    from facenet_kfp.splits import make_splits

    fractions = (data.train_fraction, data.val_fraction, data.test_fraction)
    return {
        "extract": lambda: extract_dataset(archive, out["extract"], shard_size_mb=data.shard_size_mb),
        "align": lambda: _align(out["extract"], out["align"], data),
        "labels": lambda: build_labels(images, out["labels"]),
        "complete": lambda: complete_dataset(images, out["labels"], out["complete"],
                                             multiple=data.multiple, seed=data.completion_seed,
                                             min_images=data.min_images, shard_size_mb=data.shard_size_mb),
        "splits": lambda: make_splits(out["labels"], out["splits"], seed=data.split_seed, fractions=fractions),
    }


def _align(images: Path, out: Path, data: DataConfig) -> Any:
    from facenet_kfp.align import align_dataset

    return align_dataset(images, out, size=data.align_size, max_fallback_fraction=data.max_align_fallback_fraction)


def holds_output(folder: Path, step: str) -> bool:
    """Whether `folder` is `step`'s complete output: the library writes each atomically, marker included."""
    marker = folder / STEP_MARKER
    return marker.is_file() and marker.read_text().strip() == step


def prepare_data(archive_dir: Path, out: Path, *, identities: int = 120, seed: int = 0, lfw_scale: bool = False,
                 data: DataConfig | None = None, reuse: bool = True, align: bool = False, layout: str = "lfw",
                 progress: Callable[[str], None] = say) -> DataPaths:
    """A demo archive in `archive_dir` and its prepared dataset in `out`, as the pipeline's data steps make it.

    The archive (`identities` people drawn with `seed`, or LFW's 5,749 with
    `lfw_scale`; in `layout`, as `make_archive` names it) is generated when
    missing. Then extract, labels, complete and splits run with `data`'s
    settings (default `DataConfig()`), each into
    `out`/images, labels, completion, splits; with `reuse`, a step whose
    folder already holds its complete output is skipped, until one runs:
    every step after it runs too, since it reads that new output. With `align`
    the align step runs after extract (into `out`/aligned, with `data`'s
    align settings) and the later steps read its output, as in the pipeline
    with data.align on; `DataPaths.images` is then the aligned dataset.
    """
    data = DataConfig() if data is None else data
    archive, synth_seconds = make_archive(Path(archive_dir), identities=identities, seed=seed, lfw_scale=lfw_scale,
                                          layout=layout, progress=progress)
    steps = (DATA_STEPS[0], "align", *DATA_STEPS[1:]) if align else DATA_STEPS
    folders = {step: Path(out) / OUTPUTS[step] for step in steps}
    images = folders["align" if align else "extract"]
    calls = _step_calls(archive, folders, data, images)
    seconds = {} if synth_seconds is None else {"synth": synth_seconds}
    fresh = not reuse
    for step in steps:
        if not fresh and holds_output(folders[step], step):
            continue
        fresh = True
        progress(f"data: {step} -> {folders[step]} ...")
        start = time.perf_counter()
        calls[step]()
        seconds[step] = time.perf_counter() - start
        progress(f"data: {step} done in {seconds[step]:.1f} s")
    return DataPaths(archive, images, folders["labels"], folders["complete"], folders["splits"], seconds)


def extract_only(archive: Path, out: Path, data: DataConfig | None = None,
                 progress: Callable[[str], None] = say) -> Path:
    """`archive` extracted into `out` (a packed image dataset: a separate evaluation archive's, say), as the
    pipeline's evaluation branch does; reused when `out` already holds extract's complete output."""
    if not holds_output(Path(out), "extract"):
        from facenet_kfp.extract import extract_dataset

        progress(f"data: extract {archive} -> {out} ...")
        start = time.perf_counter()
        extract_dataset(archive, out, shard_size_mb=(DataConfig() if data is None else data).shard_size_mb)
        progress(f"data: extract done in {time.perf_counter() - start:.1f} s")
    return Path(out)


# ----------------------------------------------------------------------------- machine

def _cpu_model_and_flags() -> tuple[str, set[str]]:
    """The CPU's model name and the first core's flags, from /proc/cpuinfo where there is one."""
    cpu, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    return cpu, flags


def _memory_gb() -> float | None:
    """Physical memory in GB (10**9 bytes), or None where the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        return None


def _backend_info(backend: str) -> dict[str, Any]:
    """Keras and its backend: versions and devices. Imports only `backend`'s library (never TensorFlow for jax)."""
    import keras

    info: dict[str, Any] = {"keras": keras.__version__, "backend": backend}
    if backend == "tensorflow":
        import tensorflow as tf

        devices = tf.config.list_logical_devices()
        info |= {"tensorflow": tf.__version__, "device": devices[0].device_type if devices else "",
                 "devices": len(devices), "device_list": ", ".join(d.name for d in devices)}
    elif backend == "jax":
        import jax

        first = jax.devices()[0]
        info |= {"jax": jax.__version__, "device": f"{first.platform} {getattr(first, 'device_kind', '')}".strip(),
                 "devices": len(jax.devices()), "device_list": str(jax.devices())}
    return info


MACHINE_KEYS = ("system", "arch", "cpu", "cpus", "usable_cores", "memory_gb", "load_average", "bf16",
                "python", "numpy", "pillow")
BACKEND_KEYS = ("keras", "backend", "device", "devices", "device_list")     # with a backend, plus its own version


def machine_info(backend: str | None = None) -> dict[str, Any]:
    """What figures are measured on: `MACHINE_KEYS`, and with `backend` (a Keras backend) `BACKEND_KEYS` and
    the backend library's version under its name ("tensorflow", "jax").

    bf16: the CPU's bfloat16 instructions (avx512_bf16, amx_bf16) that
    mixed_bfloat16 can use; load_average: the 1-minute load now.
    """
    import PIL

    cpu, flags = _cpu_model_and_flags()
    info: dict[str, Any] = {
        "system": platform.system(), "arch": platform.machine(), "cpu": cpu, "cpus": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)), "memory_gb": _memory_gb(),
        "load_average": os.getloadavg()[0], "bf16": [f for f in ("avx512_bf16", "amx_bf16") if f in flags],
        "python": platform.python_version(), "numpy": np.__version__, "pillow": PIL.__version__}
    if backend is not None:
        info |= _backend_info(backend)
    return info


def machine_lines(info: dict[str, Any]) -> list[str]:
    """`machine_info` as printed at the head of every report."""
    bf16 = ", ".join(info["bf16"]) if info["bf16"] else "none (no avx512_bf16 / amx_bf16)"
    memory = f"{info['memory_gb']:.1f} GB" if info["memory_gb"] is not None else "unknown"
    lines = [f"machine: {info['system']} {info['arch']}, {info['cpu']}, os.cpu_count()={info['cpus']}, "
             f"usable cores {info['usable_cores']}, load average {info['load_average']:.1f} now",
             f"  CPU bfloat16 instructions: {bf16}",
             f"  memory {memory}, Python {info['python']}, NumPy {info['numpy']}, Pillow {info['pillow']}"]
    if info.get("backend") == "tensorflow":
        lines.append(f"  keras {info['keras']}, backend tensorflow, TF {info['tensorflow']}, "
                     f"devices: {info['device_list']}")
    elif info.get("backend") == "jax":
        lines.append(f"  keras {info['keras']}, backend jax, jax {info['jax']}, devices: {info['device_list']}")
    return lines


def print_machine(info: dict[str, Any]) -> None:
    for line in machine_lines(info):
        print(line)


# ----------------------------------------------------------------------------- figures

def verdict(ok: bool) -> str:
    """How a report words a figure against its target."""
    return "meets" if ok else "MISSES"


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (threads included, child processes not), in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024    # Linux reports KiB


def result_path(explicit: str | None, name: str) -> Path | None:
    """Where a result goes: `explicit`, else $OUT/`name` when OUT is set (a device run's output folder), else None."""
    if explicit:
        return Path(explicit)
    out = os.environ.get("OUT")
    return Path(out) / name if out else None


def write_result(path: Path, result: Any) -> None:
    """`result` as indented JSON at `path`, atomically: a reader sees the old file or the whole new one.

    Values JSON has no type for (paths, say) are written as their str().
    The text is made before the file is touched, so a result that cannot be
    written leaves `path` as it was.
    """
    text = json.dumps(result, indent=2, default=str) + "\n"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_text(path, text)


def med(values) -> float:
    """Median of `values` as a float."""
    return float(np.median(values))


def iqr_ms(values, decimals: int = 0) -> str:
    """Interquartile range of seconds as 'p25-p75' in ms."""
    q1, q3 = np.percentile(values, [25, 75]) * 1e3
    return f"{q1:.{decimals}f}-{q3:.{decimals}f}"


def paired_median_ci(diffs, seed: int = 0, resamples: int = 2000) -> tuple[float, float, float]:
    """Median of per-round differences and its 95% bootstrap interval (percentile method)."""
    rng = np.random.default_rng(seed)
    boot = np.median(rng.choice(diffs, size=(resamples, len(diffs)), replace=True), axis=1)
    low, high = np.percentile(boot, [2.5, 97.5])
    return float(np.median(diffs)), float(low), float(high)


def tree_cpu_seconds() -> float:
    """CPU seconds used so far by this process (all threads) and its live child processes (Linux /proc)."""
    total = time.process_time()
    me, tick = str(os.getpid()), os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue                       # the process ended while being listed
        if fields[1] == me:                # fields after the command: state, ppid, ..., utime, stime
            total += (int(fields[11]) + int(fields[12])) / tick
    return total
