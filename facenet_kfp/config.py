"""Typed configuration: frozen dataclasses with commented defaults, overridden by YAML files.

A config file has up to four sections, each optional::

    data:     {source_uri: ..., sha256: ..., multiple: 4, ...}
    train:    {architecture: nn4_small2, loss: batch_hard, ...}
    evaluate: {folds: 10, ...}
    cluster:  {train_gpus: 1, ...}

Unknown keys and wrong types are errors that name the file and the key.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from facenet_kfp.errors import InputError

LFW_URL = "https://ndownloader.figshare.com/files/5976018"
LFW_SHA256 = "055f7d9c632d7370e6fb4afc7468d40f970c34a80d4c6f50ffec63f5a8d536c0"
LFW_PAIRS_URL = "https://ndownloader.figshare.com/files/5976006"
LFW_PAIRS_SHA256 = "ea42330c62c92989f9d7c03237ed5d591365e89b3e649747777b70e692dc1592"

ARCHITECTURES = ("nn4_small2", "small_cnn")
LOSSES = ("batch_all", "batch_hard", "semi_hard")
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class DataConfig:
    """Steps 1-5: download, extract, labels, completion, splits."""
    source_uri: str = LFW_URL          # https://, gs://, file:// or a local path to the archive
    sha256: str = LFW_SHA256           # expected archive sha256; "" skips the check
    max_download_gb: float = 20.0      # download fails past this many GB (10**9 bytes); raise it for larger archives
    pairs_uri: str = ""                # optional LFW View 2 pairs.txt for the standard protocol
    pairs_sha256: str = ""             # expected pairs.txt sha256; "" skips the check
    shard_size_mb: int = 64            # target size of each packed image shard
    max_skipped_fraction: float = 0.01  # extract fails when more of the images are unusable (junk files do not count)
    max_expansion: float = 20.0        # extract may write this many times the archive's size (at least 64 MiB)
    multiple: int = 4                  # complete every identity up to a multiple of this (K)
    min_images: int = 1                # identities with fewer real images are not completed
    completion_seed: int = 0           # seed of the completion augmentations
    train_fraction: float = 0.70       # identity-disjoint split fractions (sum to 1)
    val_fraction: float = 0.15         # validation identities (threshold selection), 2+ images each
    test_fraction: float = 0.15        # held-out test identities, 2+ images each
    split_seed: int = 0                # seed of the identity shuffle

    def validate(self) -> None:
        check_fields(self, "data")
        fractions = {"train_fraction": self.train_fraction, "val_fraction": self.val_fraction,
                     "test_fraction": self.test_fraction}
        for key, value in fractions.items():
            if not 0 < value < 1:
                raise InputError(f"data.{key} must be in (0, 1), got {value}")
        if not math.isclose(sum(fractions.values()), 1.0, abs_tol=1e-6):
            raise InputError(f"data.train_fraction + val_fraction + test_fraction must be 1, "
                             f"got {sum(fractions.values()):.6g}")
        _positive("data", "max_download_gb", self.max_download_gb)
        _positive("data", "multiple", self.multiple)
        _positive("data", "min_images", self.min_images)
        _positive("data", "shard_size_mb", self.shard_size_mb)
        if not 0 <= self.max_skipped_fraction <= 1:
            raise InputError(f"data.max_skipped_fraction must be from 0 to 1, got {self.max_skipped_fraction}")
        if not 1 <= self.max_expansion < math.inf:
            raise InputError(f"data.max_expansion must be a finite number >= 1, got {self.max_expansion}")
        if not self.source_uri:
            raise InputError("data.source_uri must not be empty")
        for key in ("sha256", "pairs_sha256"):
            _check_sha256(f"data.{key}", getattr(self, key))


@dataclass(frozen=True)
class TrainConfig:
    """Step 6: the embedding network and its triplet-loss training."""
    architecture: str = "nn4_small2"   # nn4_small2 (OpenFace, 96x96) or small_cnn (demo/tests)
    image_size: int = 96               # model input is image_size x image_size RGB
    crop_fraction: float = 0.6         # centre crop of the 250x250 image kept around the face
    embedding_dim: int = 128           # size of the L2-normalised embedding
    p: int = 16                        # identities per batch
    k: int = 4                         # images per identity per batch (the completion multiple)
    loss: str = "batch_hard"           # batch_all | batch_hard | semi_hard
    margin: float = 0.2                # triplet margin, in the units of the distance below
    squared: bool = True               # squared L2 distances (FaceNet) or plain L2
    learning_rate: float = 1e-3        # Adam learning rate (peak, after warm-up)
    lr_schedule: str = "cosine"        # constant | cosine (decays to 1% of the peak)
    warmup_steps: int = 0              # linear warm-up steps
    max_steps: int = 20000             # optimizer steps
    augment: bool = True               # random mirror, crop jitter, brightness (training only)
    validate_every: int = 500          # steps between validation passes (0: never)
    validation_batches: int = 10       # P x K batches per validation pass
    checkpoint_every: int = 500        # steps between checkpoints
    log_every: int = 20                # steps between log lines / TensorBoard points
    precision: str = "auto"            # auto | float32 | mixed_float16 (GPU default) | mixed_bfloat16
    seed: int = 0                      # seed of sampling, augmentation and initialisation

    def validate(self) -> None:
        check_fields(self, "train")
        _choice("train", "architecture", self.architecture, ARCHITECTURES)
        _choice("train", "loss", self.loss, LOSSES)
        _choice("train", "precision", self.precision, PRECISIONS)
        _choice("train", "lr_schedule", self.lr_schedule, LR_SCHEDULES)
        for key in ("image_size", "embedding_dim", "max_steps", "checkpoint_every",
                    "log_every", "validation_batches"):
            _positive("train", key, getattr(self, key))
        if self.p < 2:
            raise InputError(f"train.p must be at least 2 (negatives need two identities), got {self.p}")
        if self.k < 2:
            raise InputError(f"train.k must be at least 2 (positives need two images), got {self.k}")
        if self.margin <= 0:
            raise InputError(f"train.margin must be > 0, got {self.margin}")
        if self.learning_rate <= 0:
            raise InputError(f"train.learning_rate must be > 0, got {self.learning_rate}")
        if not 0 < self.crop_fraction <= 1:
            raise InputError(f"train.crop_fraction must be in (0, 1], got {self.crop_fraction}")
        if self.validate_every < 0 or self.warmup_steps < 0:
            raise InputError("train.validate_every and train.warmup_steps must be >= 0")


@dataclass(frozen=True)
class EvaluateConfig:
    """Step 7: threshold selection and verification metrics."""
    max_positive_pairs: int = 3000     # cap on same-person pairs per split (as many different pairs)
    folds: int = 10                    # k-fold cross-validation of the accuracy
    far_targets: tuple[float, ...] = (1e-3, 1e-2)   # report VAL at these false accept rates
    seed_threshold: float = 1.242      # the seed's fixed plain-L2 threshold, for comparison
    batch_size: int = 128              # images per embedding batch
    report_examples: int = 16          # example pairs shown in the HTML report
    seed: int = 0                      # seed of the negative-pair draw

    def validate(self) -> None:
        check_fields(self, "evaluate")
        _positive("evaluate", "max_positive_pairs", self.max_positive_pairs)
        _positive("evaluate", "batch_size", self.batch_size)
        if self.folds < 2:
            raise InputError(f"evaluate.folds must be at least 2, got {self.folds}")
        for far in self.far_targets:
            if not 0 < far < 1:
                raise InputError(f"evaluate.far_targets values must be in (0, 1), got {far}")
        if self.seed_threshold <= 0:
            raise InputError(f"evaluate.seed_threshold must be > 0, got {self.seed_threshold}")


@dataclass(frozen=True)
class ClusterConfig:
    """Kubernetes settings baked into the compiled pipeline (ignored by local runs)."""
    data_cpu: str = "2"                # CPU request/limit of the five data steps
    data_memory: str = "2Gi"           # memory request/limit of the five data steps
    train_cpu: str = "8"               # CPU request/limit of training (input pipeline workers)
    train_memory: str = "32Gi"         # memory request/limit of training
    train_gpus: int = 1                # GPUs for training (0: CPU only)
    evaluate_cpu: str = "4"            # CPU request/limit of evaluation
    evaluate_memory: str = "16Gi"      # memory request/limit of evaluation
    evaluate_gpus: int = 0             # GPUs for evaluation (0: CPU only)
    accelerator_type: str = "nvidia.com/gpu"   # GPU resource name on open-source KFP
    gpu_node_selector: dict[str, str] = field(default_factory=dict)   # e.g. {cloud.google.com/gke-accelerator: nvidia-tesla-t4}
    gpu_toleration: dict[str, str] = field(default_factory=dict)      # e.g. {key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}
    shm_size: str = "4Gi"              # /dev/shm (memory-backed emptyDir) for the input pipeline
    gcs_secret: str = ""               # Secret with key.json for gs:// sources; "" = Workload Identity
    download_retries: int = 3          # task-level retries of the download step
    train_retries: int = 2             # task-level retries of training (resumes from checkpoint)
    checkpoint_root: str = ""          # persistent folder (gs:// or path) for resumable checkpoints
    tensorboard_root: str = ""         # folder (gs:// or path) for live TensorBoard events, one subfolder per train run

    def validate(self) -> None:
        check_fields(self, "cluster")
        for key in ("data_cpu", "data_memory", "train_cpu", "train_memory", "evaluate_cpu",
                    "evaluate_memory", "accelerator_type", "shm_size"):
            if not getattr(self, key):
                raise InputError(f"cluster.{key} must not be empty")
        for key in ("train_gpus", "evaluate_gpus", "download_retries", "train_retries"):
            if getattr(self, key) < 0:
                raise InputError(f"cluster.{key} must be >= 0, got {getattr(self, key)}")


@dataclass(frozen=True)
class PipelineConfig:
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def validate(self) -> "PipelineConfig":
        self.data.validate()
        self.train.validate()
        self.evaluate.validate()
        self.cluster.validate()
        if self.train.k != self.data.multiple:
            # Not fatal in principle, but P x K batches then miss completed images.
            raise InputError(f"train.k ({self.train.k}) must equal data.multiple ({self.data.multiple})")
        return self


SECTIONS = {"data": DataConfig, "train": TrainConfig, "evaluate": EvaluateConfig,
            "cluster": ClusterConfig}


def check_fields(config: Any, section: str) -> None:
    """Checks every key of a section needs: floats finite, counts and seeds >= 0, texts not blank.

    An int key is a count, size, step or seed, so none may be negative; NaN or
    infinity in a float key would only fail later, far from its cause.
    """
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value, kind, where = getattr(config, f.name), hints[f.name], f"{section}.{f.name}"
        values = value if typing.get_origin(kind) is tuple else (value,)
        for item in values:
            if isinstance(item, float) and not math.isfinite(item):
                raise InputError(f"{where} must be a finite number, got {item!r}")
        if kind is int and not isinstance(value, bool) and isinstance(value, int) and value < 0:
            raise InputError(f"{where} must be >= 0, got {value}")
        if kind is str and isinstance(value, str) and value != value.strip():
            raise InputError(f"{where} must not start or end with spaces, got {value!r}")


def _positive(section: str, key: str, value: Any) -> None:
    if value <= 0:
        raise InputError(f"{section}.{key} must be > 0, got {value}")


def _choice(section: str, key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise InputError(f"{section}.{key} must be one of {', '.join(allowed)}; got {value!r}")


def _check_sha256(key: str, value: str) -> None:
    if value and (len(value) != 64 or any(c not in "0123456789abcdef" for c in value.lower())):
        raise InputError(f"{key} must be 64 hex digits or empty, got {value!r}")


def _coerce(where: str, value: Any, kind: Any) -> Any:
    """Check a YAML value against a dataclass field type (ints become floats where asked)."""
    origin = typing.get_origin(kind)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"{where} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise InputError(f"{where} must be a finite number, got {value!r}")
        return float(value)
    if kind in (int, str, bool):
        if type(value) is not kind:
            raise InputError(f"{where} must be {kind.__name__}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise InputError(f"{where} must be a list, got {value!r}")
        item = typing.get_args(kind)[0]
        return tuple(_coerce(f"{where}[{i}]", v, item) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise InputError(f"{where} must be a mapping, got {value!r}")
        return {str(k): str(v) for k, v in value.items()}
    return value


def section_from_dict(cls: type, values: dict[str, Any], where: str) -> Any:
    """Build one config section from a mapping, naming `where.key` in every error."""
    if not isinstance(values, dict):
        raise InputError(f"{where} must be a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise InputError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    return cls(**{k: _coerce(f"{where}.{k}", v, hints[k]) for k, v in values.items()})


def field_help(cls: type) -> dict[str, str]:
    """Each field's trailing `# comment` in this file: the one description of a config key."""
    import inspect
    import re

    pattern = re.compile(r"^\s+(\w+): [^=]+=.*?#\s*(.+)$")
    found = {}
    for line in inspect.getsource(cls).splitlines():
        match = pattern.match(line)
        if match:
            found[match.group(1)] = match.group(2).strip()
    return found


def load_config(path: str | os.PathLike | None = None, overrides: dict[str, dict[str, Any]] | None = None
                ) -> PipelineConfig:
    """Load and validate a YAML config (defaults when `path` is None), then apply overrides."""
    raw: dict[str, Any] = {}
    where = "config"
    if path is not None:
        path = Path(path)
        where = str(path)
        if not path.is_file():
            raise InputError(f"{path}: config file not found")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise InputError(f"{path}: not valid YAML ({exc})") from exc
        if not isinstance(raw, dict):
            raise InputError(f"{path}: top level must be a mapping of sections")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise InputError(f"{where}: unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    sections = {}
    for name, cls in SECTIONS.items():
        section = raw.get(name)
        if section is not None and not isinstance(section, dict):
            raise InputError(f"{where}: section {name!r} must be a mapping of keys, got "
                             f"{type(section).__name__} {section!r}")
        values = dict(section or {})
        values.update((overrides or {}).get(name, {}))
        sections[name] = section_from_dict(cls, values, f"{where}: {name}")
    return PipelineConfig(**sections).validate()


def to_dict(config: Any) -> dict[str, Any]:
    """A config (or section) as plain YAML/JSON-friendly values."""
    data = dataclasses.asdict(config)

    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value
    return plain(data)
