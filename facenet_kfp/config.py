"""Typed configuration: frozen dataclasses whose fields carry their own help, overridden by YAML.

A config file has up to five sections, each optional::

    data:     {source_uri: ..., sha256: ..., multiple: 4, ...}
    train:    {architecture: nn4_small2, loss: batch_hard, ...}
    evaluate: {folds: 10, ...}
    cluster:  {train_gpus: 1, ...}
    deploy:   {enabled: true, namespace: ..., ...}     (facenet_kfp.deploy_config)

Each field's metadata holds its help text (read by the pipeline's parameter
descriptions, the command line's ``--help`` and the README's config table) and
its limits. A section checks itself when it is built (``__post_init__``), so an
invalid config cannot exist; `load_config` adds the file name to the message, or
the override (``--set``, ``SET``, ``--param``) when the file alone is valid.
Unknown keys and wrong types are errors that name the key.

Numbers are read as people write them: YAML 1.1 (PyYAML) reads ``1e-3`` as a
string, so config files and ``key=value`` texts are read with YAML 1.2's
floats (`yaml_load`), and an int field takes a float with no fractional part
(``2e4``). Sizes are in MiB (2**20 bytes), download limits in GB (10**9 bytes).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from facenet_kfp import objectives
from facenet_kfp.config_fields import (  # noqa: F401  (re-exported: callers import them here)
    MAX_INT, Section, _check_limits, _coerce, describe_limits, setting)
from facenet_kfp.deploy_config import DeployConfig
from facenet_kfp.errors import InputError
from facenet_kfp.yaml12 import ConfigLoader, yaml_load  # noqa: F401  (re-exported: callers import them here)

LFW_URL = "https://ndownloader.figshare.com/files/5976018"
LFW_SHA256 = "055f7d9c632d7370e6fb4afc7468d40f970c34a80d4c6f50ffec63f5a8d536c0"
LFW_PAIRS_URL = "https://ndownloader.figshare.com/files/5976006"
LFW_PAIRS_SHA256 = "ea42330c62c92989f9d7c03237ed5d591365e89b3e649747777b70e692dc1592"

ARCHITECTURES = ("nn4_small2", "small_cnn")
LOSSES = objectives.NAMES        # train.loss: the training objectives' table (objectives.OBJECTIVES)
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
LR_SCHEDULES = ("constant", "cosine")
SAMPLINGS = ("pk", "uniform")     # train.sampling: P x K identity-balanced batches, or images uniformly
# train.margin's range per margin-softmax objective (the triplet objectives': the field's own limits and the
# distance's largest value): ArcFace's angle stays below pi / 2, where cos(theta + m) still falls over most
# of [0, pi]; CosFace's cosine shift at most 1, half the cosine's range.
MARGIN_LIMITS = {"arcface": math.pi / 2, "cosface": 1.0}
ALIGN_METHODS = ("none", "mtcnn")   # data.align; facenet_kfp.align implements mtcnn (without TensorFlow here)
# Toleration keys as a Kubernetes manifest spells them -> kfp.kubernetes.add_toleration's arguments.
TOLERATION_KEYS = {"key": "key", "operator": "operator", "value": "value", "effect": "effect",
                   "tolerationSeconds": "toleration_seconds"}
# The smallest input side either architecture accepts (model.MIN_INPUT_SIZE; three stride-2 stages).
MIN_IMAGE_SIZE = 32
MAX_SEED = 2**32 - 1          # numpy's legacy seeding, which Keras uses, takes seeds below 2**32
MAX_BATCH = 4096              # train.p x train.k: FaceNet's own batches were 1,800 images


def _check_sha256(key: str, value: str) -> None:
    if value and (len(value) != 64 or any(c not in "0123456789abcdef" for c in value.lower())):
        raise InputError(f"{key} must be 64 hex digits or empty, got {value!r}")


@dataclass(frozen=True)
class DataConfig(Section):
    """Steps 1-5: download, extract, face alignment (optional), labels, completion, splits."""
    NAME: ClassVar[str] = "data"
    source_uri: str = setting(LFW_URL, "https://, gs://, file:// or a local path to the archive")
    sha256: str = setting(LFW_SHA256, "expected archive sha256; empty skips the check")
    max_download_gb: float = setting(20.0, "download fails past this many GB (10**9 bytes); raise it for "
                                           "larger archives", above=0, maximum=10_000)
    eval_source_uri: str = setting("", "archive of a separate evaluation dataset (LFW, say): when set, the "
                                       "pipeline gets a second download and extract branch, the test pairs "
                                       "come from it, and data.test_fraction's identities are trained on")
    eval_sha256: str = setting("", "expected sha256 of the evaluation archive; empty skips the check")
    pairs_uri: str = setting("", "optional LFW View 2 pairs.txt for the standard protocol (of the "
                                 "evaluation archive when there is one)")
    pairs_sha256: str = setting("", "expected pairs.txt sha256; empty skips the check")
    shard_size_mb: int = setting(256, "target size of each packed image shard in MiB (2**20 bytes), as the "
                                      "extract and complete steps write them: artifact files grow with bytes, "
                                      "not with images", minimum=1, maximum=4096)
    max_skipped_fraction: float = setting(0.01, "extract fails when more of the images are unusable "
                                                "(junk files do not count)", minimum=0, maximum=1)
    max_expansion: float = setting(20.0, "extract may write this many times the archive's size "
                                         "(at least 64 MiB); a compressed image archive expands little, "
                                         "a far larger output is a decompression bomb", minimum=1, maximum=1000)
    align: str = setting("none", "face alignment: mtcnn adds an align step after each extract (five landmarks "
                                 "warped onto a fixed template, align_size square), none uses the images as "
                                 "extracted; decides the DAG when the pipeline is compiled", choices=ALIGN_METHODS)
    align_size: int = setting(112, "side in pixels of the aligned face crops (112: the template's own size)",
                              minimum=MIN_IMAGE_SIZE, maximum=512)
    max_align_fallback_fraction: float = setting(0.5, "align fails when more of the images had no face found "
                                                      "(each such image is kept as its centre square crop)",
                                                 minimum=0, maximum=1)
    multiple: int = setting(4, "complete every identity up to a multiple of this many images (K; equals "
                               "train.k)", minimum=2, maximum=128)
    min_images: int = setting(1, "identities with fewer real images are not completed", minimum=1,
                              maximum=10_000)
    completion_seed: int = setting(0, "seed of the completion augmentations", maximum=MAX_SEED)
    train_fraction: float = setting(0.70, "fraction of identities for training (the three fractions sum "
                                          "to 1)", above=0, below=1)
    val_fraction: float = setting(0.15, "fraction of identities for validation (threshold selection), "
                                        "2+ images each", above=0, below=1)
    test_fraction: float = setting(0.15, "fraction of held-out test identities, 2+ images each",
                                   above=0, below=1)
    split_seed: int = setting(0, "seed of the identity shuffle", maximum=MAX_SEED)

    def check(self) -> None:
        total = self.train_fraction + self.val_fraction + self.test_fraction
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise InputError(f"data.train_fraction + val_fraction + test_fraction must be 1, got {total:.6g}")
        if not self.source_uri:
            raise InputError("data.source_uri must not be empty")
        for key in ("sha256", "eval_sha256", "pairs_sha256"):
            _check_sha256(f"data.{key}", getattr(self, key))
        if self.eval_sha256 and not self.eval_source_uri:
            raise InputError("data.eval_sha256 is set but data.eval_source_uri is empty")


@dataclass(frozen=True)
class TrainConfig(Section):
    """Step 6: the embedding network and its triplet-loss training."""
    NAME: ClassVar[str] = "train"
    architecture: str = setting("nn4_small2", "nn4_small2 (OpenFace, 96x96) or small_cnn (demo and tests)",
                                choices=ARCHITECTURES)
    image_size: int = setting(96, f"model input is image_size x image_size RGB: at least {MIN_IMAGE_SIZE} "
                                  "(the networks' stride-2 stages), at most 512 (training memory grows with "
                                  "its square)", minimum=MIN_IMAGE_SIZE, maximum=512)
    crop_fraction: float = setting(0.6, "centre crop kept around the face: this fraction of the image's "
                                        "height and of its width (a crop under a quarter is mostly "
                                        "upscaled pixels)", minimum=0.25, maximum=1)
    embedding_dim: int = setting(128, "size of the L2-normalised embedding: at least 8 (unit vectors of a "
                                      "few dimensions cannot keep many identities apart; in 1-D there are "
                                      "only +1 and -1)", minimum=8, maximum=4096)
    p: int = setting(16, "identities per batch (at least 2: negatives need two identities); p x k is at "
                         f"most {MAX_BATCH}", minimum=2, maximum=1024)
    k: int = setting(4, "images per identity per batch; equals data.multiple", minimum=2, maximum=128)
    loss: str = setting("batch_hard", f"training objective: triplet mining {', '.join(objectives.TRIPLET_NAMES)}"
                                      f" (P x K batches), or margin-softmax over a head of one centre per "
                                      f"training identity: {', '.join(objectives.MARGIN_NAMES)}", choices=LOSSES)
    margin: float = setting(0.2, "the objective's margin: triplet (0.2): in the units of the distance (see "
                                 "train.squared; unit vectors are at most 4 apart in squared L2, 2 in plain L2); "
                                 "arcface: additive angular margin in radians, below pi/2 (paper: 0.5); "
                                 "cosface: additive cosine margin, at most 1 (paper: 0.35); softmax: not used",
                            above=0, maximum=4)
    scale: float = setting(64.0, "margin-softmax objectives: the scale s of the cosine logits (ArcFace and "
                                 "CosFace papers: 64); not used by the triplet objectives", above=0, maximum=1024)
    sampling: str = setting("pk", "batches of p identities x k images (pk; triplet objectives need it), or "
                                  "uniform: p x k images drawn uniformly, without replacement within an epoch "
                                  "(margin-softmax objectives only)", choices=SAMPLINGS)
    squared: bool = setting(True, "squared L2 distances (FaceNet) when true, plain L2 when false")
    learning_rate: float = setting(1e-3, "Adam learning rate (peak, after warm-up)", above=0)
    lr_schedule: str = setting("cosine", "constant, or cosine (decays to 1% of the peak)", choices=LR_SCHEDULES)
    warmup_steps: int = setting(0, "linear warm-up steps", maximum=100_000_000)
    max_steps: int = setting(20000, "optimizer steps", minimum=1, maximum=100_000_000)
    augment: bool = setting(True, "random mirror, crop jitter and brightness (training only)")
    validate_every: int = setting(500, "steps between validation passes (0: never)", maximum=100_000_000)
    validation_batches: int = setting(10, "P x K batches per validation pass", minimum=1, maximum=10_000)
    checkpoint_every: int = setting(500, "steps between checkpoints", minimum=1, maximum=100_000_000)
    log_every: int = setting(20, "steps between log lines and TensorBoard points", minimum=1,
                             maximum=100_000_000)
    precision: str = setting("auto", "auto (mixed_float16 on a GPU, else float32), float32, mixed_float16 "
                                     "or mixed_bfloat16", choices=PRECISIONS)
    seed: int = setting(0, "seed of batch sampling, augmentation and weight initialisation", maximum=MAX_SEED)

    def check(self) -> None:
        if self.p * self.k > MAX_BATCH:
            raise InputError(f"train.p x train.k must be at most {MAX_BATCH} images per batch, got "
                             f"{self.p} x {self.k} = {self.p * self.k}")
        objective = objectives.get(self.loss)
        if objective.pk_batches and not self.squared and self.margin > 2:
            raise InputError(f"train.margin must be at most 2 with plain L2 distances (train.squared false: "
                             f"unit vectors are at most 2 apart), got {self.margin:g}")
        limit = MARGIN_LIMITS.get(self.loss)
        if limit is not None and not (self.margin < limit if self.loss == "arcface" else self.margin <= limit):
            rule = "below pi/2 = 1.5708 radians" if self.loss == "arcface" else f"at most {limit:g}"
            raise InputError(f"train.margin must be {rule} with train.loss {self.loss}, got {self.margin:g}")
        if objective.pk_batches and self.sampling != "pk":
            raise InputError(f"train.sampling {self.sampling} does not suit train.loss {self.loss}: it mines "
                             f"triplets within P x K batches; use train.sampling pk")


@dataclass(frozen=True)
class EvaluateConfig(Section):
    """Step 7: threshold selection and verification metrics."""
    NAME: ClassVar[str] = "evaluate"
    max_positive_pairs: int = setting(3000, "cap on same-person pairs per split (as many different-person "
                                            "pairs are drawn)", minimum=1, maximum=1_000_000)
    max_pairs_per_identity: int = setting(10, "cap on same-person pairs per identity, so that no identity "
                                              "dominates a split's pairs (as in LFW's pairs.txt)", minimum=1,
                                          maximum=1_000_000)
    flip: bool = setting(True, "also report every figure for each image's embedding plus its mirror "
                               "image's, re-normalised (flip_ metrics)")
    distance: str = setting("model", "pair distance: model (as trained: squared_l2 or l2), squared_l2, l2 "
                                     "or cosine", choices=("model", "squared_l2", "l2", "cosine"))
    folds: int = setting(10, "k-fold cross-validation of the accuracy", minimum=2, maximum=100)
    far_targets: tuple[float, ...] = setting((1e-3, 1e-2), "report VAL at these false accept rates",
                                             above=0, below=1)
    seed_threshold: float = setting(1.242, "a fixed plain-L2 threshold reported for comparison (1.242: "
                                           "the original TF1 FaceNet's LFW threshold; unit vectors are at "
                                           "most 2 apart)", above=0, maximum=2)
    batch_size: int = setting(128, "images per embedding batch", minimum=1, maximum=4096)
    report_examples: int = setting(16, "example pairs shown in the HTML report", maximum=200)
    seed: int = setting(0, "seed of the pair draws (which same-person and different-person pairs)",
                        maximum=MAX_SEED)

    def check(self) -> None:
        repeated = sorted({f"{v:g}" for v in self.far_targets if self.far_targets.count(v) > 1})
        if repeated:
            raise InputError(f"evaluate.far_targets lists {', '.join(repeated)} more than once")


@dataclass(frozen=True)
class ClusterConfig(Section):
    """Kubernetes settings baked into the compiled pipeline (ignored by local runs)."""
    NAME: ClassVar[str] = "cluster"
    data_cpu: str = setting("2", "CPU request and limit of the five data steps")
    data_memory: str = setting("2Gi", "memory request and limit of the five data steps")
    train_cpu: str = setting("8", "CPU request and limit of training (input pipeline workers)")
    train_memory: str = setting("32Gi", "memory request and limit of training")
    train_gpus: int = setting(1, "GPUs for training (0: CPU only; several: one replica each)", maximum=16)
    evaluate_cpu: str = setting("4", "CPU request and limit of evaluation")
    evaluate_memory: str = setting("16Gi", "memory request and limit of evaluation")
    evaluate_gpus: int = setting(0, "GPUs for evaluation (0: CPU only)", maximum=16)
    align_cpu: str = setting("8", "CPU request and limit of face alignment (data.align; the detector uses them all)")
    align_memory: str = setting("8Gi", "memory request and limit of face alignment")
    align_gpus: int = setting(0, "GPUs for face alignment (0: CPU only)", maximum=16)
    accelerator_type: str = setting("nvidia.com/gpu", "GPU resource name (nvidia.com/gpu on open-source KFP)")
    gpu_node_selector: dict[str, str] = setting({}, "node labels the GPU tasks require, e.g. "
                                                    "{cloud.google.com/gke-accelerator: nvidia-l4}")
    gpu_toleration: dict[str, Any] = setting({}, "toleration of the GPU tasks, as in a pod spec, e.g. {key: "
                                                 "nvidia.com/gpu, operator: Exists, effect: NoSchedule}")
    shm_size: str = setting("4Gi", "/dev/shm (memory-backed emptyDir) of train and evaluate")
    gcs_secret: str = setting("", "Secret with key.json for gs:// sources; empty: Workload Identity")
    download_retries: int = setting(3, "task-level retries of the download step", maximum=20)
    train_retries: int = setting(2, "task-level retries of training (a retry resumes from its checkpoint)",
                                 maximum=20)
    checkpoint_root: str = setting("", "persistent folder (gs:// or path) for resumable checkpoints; "
                                       "empty: next to the model output")
    tensorboard_root: str = setting("", "folder (gs:// or path) for live TensorBoard events, one subfolder "
                                        "per train run; empty: none")
    train_nodes: int = setting(1, "nodes of training: 1 trains in the train task; above 1 (compiled in) the train "
                                  "task launches a Kubeflow Trainer TrainJob of one JAX process per node, each "
                                  "with train_cpu, train_memory and train_gpus", minimum=1, maximum=64)
    train_runtime: str = setting("facenet-kfp-jax", "the TrainJob's JAX runtime (train_nodes above 1): the "
                                                    "ClusterTrainingRuntime of manifests/trainer or jax-distributed")
    train_volume: str = setting("facenet-kfp-data", "ReadWriteMany PersistentVolumeClaim the train task and every "
                                                    "TrainJob node mount (train_nodes above 1): inputs, checkpoints "
                                                    "and the model travel on it")

    def check(self) -> None:
        for key in ("data_cpu", "data_memory", "train_cpu", "train_memory", "evaluate_cpu",
                    "evaluate_memory", "align_cpu", "align_memory", "accelerator_type", "shm_size",
                    "train_runtime", "train_volume"):
            if not getattr(self, key):
                raise InputError(f"cluster.{key} must not be empty")
        unknown = sorted(set(self.gpu_toleration) - set(TOLERATION_KEYS))
        if unknown:
            raise InputError(f"cluster.gpu_toleration: unknown key(s) {', '.join(unknown)}; known: "
                             f"{', '.join(TOLERATION_KEYS)}")
        for key, value in self.gpu_toleration.items():
            kind = int if key == "tolerationSeconds" else str
            _coerce(f"cluster.gpu_toleration.{key}", value, kind)

    def toleration(self) -> dict[str, Any]:
        """`gpu_toleration` as keyword arguments of kfp.kubernetes.add_toleration."""
        return {TOLERATION_KEYS[key]: value for key, value in self.gpu_toleration.items()}


SECTIONS = {cls.NAME: cls for cls in (DataConfig, TrainConfig, EvaluateConfig, ClusterConfig, DeployConfig)}


@dataclass(frozen=True)
class PipelineConfig:
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    deploy: DeployConfig = field(default_factory=DeployConfig)

    def __post_init__(self) -> None:
        if self.train.k != self.data.multiple:
            # P x K batches would miss completed images.
            raise InputError(f"train.k ({self.train.k}) must equal data.multiple ({self.data.multiple})")


def field_help(cls: type) -> dict[str, str]:
    """{key: help text} of a config section."""
    return {f.name: f.metadata["help"] for f in dataclasses.fields(cls)}


def section_from_dict(cls: type, values: dict[str, Any], where: str = "") -> Any:
    """Build one config section from a mapping; errors name `where` (a file) and the key."""
    try:
        if not isinstance(values, dict):
            raise InputError(f"section {cls.NAME!r} must be a mapping of keys, got "
                             f"{type(values).__name__} {values!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(key) for key in values if key not in names)
        if unknown:
            raise InputError(f"{cls.NAME}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        return cls(**values)
    except InputError as exc:
        raise InputError(f"{where}: {exc}" if where else str(exc)) from None


def _read_config_file(path: str | os.PathLike | None) -> tuple[dict[str, Any], str]:
    """(the file's sections, how messages name it) of a YAML config; ({}, "defaults") for None."""
    if path is None:
        return {}, "defaults"
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not a config file")
    if not path.is_file():
        raise InputError(f"{path}: config file not found")
    try:
        raw = yaml_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(raw, dict):
        raise InputError(f"{path}: top level must be a mapping of sections")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise InputError(f"{path}: unknown section(s) {', '.join(map(str, unknown))}; known: {', '.join(SECTIONS)}")
    return raw, str(path)


def _build_config(raw: dict[str, Any], overrides: dict[str, dict[str, Any]]) -> PipelineConfig:
    """The config of a file's sections and overrides {section: {key: value}}; InputError naming the key."""
    sections = {}
    for name, cls in SECTIONS.items():
        section = raw.get(name)
        if section is not None and not isinstance(section, dict):
            section_from_dict(cls, section)   # raises: not a mapping
        sections[name] = section_from_dict(cls, {**(section or {}), **overrides.get(name, {})})
    return PipelineConfig(**sections)


def load_config(path: str | os.PathLike | None = None, overrides: dict[str, dict[str, Any]] | None = None,
                overrides_from: str = "overrides") -> PipelineConfig:
    """Load a YAML config (defaults when `path` is None), then apply overrides {section: {key: value}}.

    An error names the file when the file alone is invalid, else `overrides_from`
    (how the user gave the overrides: ``SET train.k=8``, ``--set ...``), with
    the file they were applied to.
    """
    raw, where = _read_config_file(path)
    overrides = overrides or {}
    try:
        return _build_config(raw, overrides)
    except InputError as exc:
        if not any(overrides.values()):
            raise InputError(f"{where}: {exc}") from None
        error = exc
    try:
        _build_config(raw, {})
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from None
    raise InputError(f"{overrides_from} (applied to {where}): {error}") from None


def config_key(name: str, aliases: typing.Mapping[str, tuple[str, str]] | None = None) -> tuple[str, str]:
    """(section, key) for `section.key`, or for a name in `aliases` (pipeline parameter names)."""
    if aliases and name in aliases:
        return aliases[name]
    section, dot, key = name.partition(".")
    if not dot or section not in SECTIONS or key not in {f.name for f in dataclasses.fields(SECTIONS[section])}:
        known = [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)] + list(aliases or ())
        close = difflib.get_close_matches(name, known, n=3)
        raise InputError(f"{name}: not a config key" + (f"; did you mean {' or '.join(close)}?" if close else
                                                        "; expected section.key, e.g. train.max_steps"))
    return section, key


def parse_value(name: str, raw: str, kind: Any) -> Any:
    """The text of a `key=value` assignment as a value of the config field type `kind`.

    A str field takes the text as it is (so a sha256 of digits stays a string);
    other types are read as YAML with YAML 1.2's numbers (``800``, ``1e-3``,
    ``true``, ``[1e-3, 0.01]``, ``{key: nvidia.com/gpu}``) and then checked
    against the field's type.
    """
    if kind is str:
        return raw
    try:
        value = yaml_load(raw)
    except yaml.YAMLError as exc:
        raise InputError(f"{name}={raw!r}: not a YAML value ({exc})") from exc
    return _coerce(name, value, kind)


def parse_assignments(items: typing.Iterable[str], aliases: typing.Mapping[str, tuple[str, str]] | None = None,
                      option: str = "--set") -> dict[str, dict[str, Any]]:
    """`key=value` texts as load_config overrides {section: {key: value}}, typed by the config fields.

    A key is `section.key` (``train.max_steps=800``) or a name in `aliases`
    (``train_max_steps=800`` for a pipeline parameter). Each value is checked
    against its field's type and limits; an error names `option` (``--set``,
    ``SET``, ``--param``) and the key. Rules between keys are checked by
    `load_config`.
    """
    overrides: dict[str, dict[str, Any]] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise InputError(f"{option} {item!r}: expected key=value")
        try:
            section, key = config_key(name, aliases)
            kind = typing.get_type_hints(SECTIONS[section])[key]
            value = parse_value(name, raw, kind)
            _check_limits(name, value, {f.name: f for f in dataclasses.fields(SECTIONS[section])}[key].metadata)
            overrides.setdefault(section, {})[key] = value
        except InputError as exc:
            raise InputError(f"{option} {exc}") from None
    return overrides


def assignments_label(items: typing.Iterable[str], option: str = "--set") -> str:
    """How messages name `key=value` texts given with `option`: ``SET a=1 b=2`` (make's one variable),
    ``--set a=1 --set b=2`` (a repeated option)."""
    items = list(items)
    if option == "SET":
        return "SET " + " ".join(items)
    return " ".join(f"{option} {item}" for item in items)


def to_dict(config: Any) -> dict[str, Any]:
    """A config (or section) as plain YAML/JSON-friendly values."""
    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value
    return plain(dataclasses.asdict(config))


# --- the pipeline parameters: one per config key of data, train, evaluate and deploy -------------

EVAL_PARAMETERS = ("eval_source_uri", "eval_sha256")
ALIGN_PARAMETERS = ("align_size", "max_align_fallback_fraction")   # parameters of the align step, with data.align on
# Keys that decide the DAG when it is compiled (data.align: whether there are align steps; deploy.enabled:
# whether there is a deploy step): never parameters.
DAG_KEYS = (("data", "align"), ("deploy", "enabled"))
SECTION_PREFIX = {"data": "", "train": "train_", "evaluate": "eval_", "deploy": "deploy_"}
# Cluster keys that are pipeline parameters: where the train task writes outside its outputs.
CLUSTER_PARAMETERS = ("checkpoint_root", "tensorboard_root", "train_nodes")
# Config field type -> pipeline parameter type; any other field type cannot be a parameter.
PARAMETER_TYPES = {str: str, int: int, float: float, bool: bool, tuple[float, ...]: list}


def parameter_keys() -> dict[str, tuple[str, str]]:
    """{pipeline parameter name: (config section, key)}, in signature order (`pipeline_parameters`
    leaves out the evaluation archive's two when the config names none, the align step's two when
    data.align is none, the deploy step's when deploy.enabled is false).

    Data keys keep their names (``source_uri``), train, evaluate and deploy keys are
    prefixed ``train_``, ``eval_`` and ``deploy_`` (``train_learning_rate``, ``eval_folds``,
    ``deploy_namespace``), and two cluster keys, where the train task writes, are parameters too;
    `DAG_KEYS` are not.
    """
    keys = {SECTION_PREFIX[section] + f.name: (section, f.name)
            for section in SECTION_PREFIX for f in dataclasses.fields(SECTIONS[section])
            if (section, f.name) not in DAG_KEYS}
    keys.update({key: ("cluster", key) for key in CLUSTER_PARAMETERS})
    return keys


def pipeline_parameters(config: PipelineConfig) -> list[tuple[str, Any, Any, str]]:
    """(name, type, default, description) of every pipeline parameter, in signature order.

    A config field whose type has no pipeline parameter type fails here, at compile time.
    """
    params = []
    for name, (section, key) in parameter_keys().items():
        if (name in EVAL_PARAMETERS and not config.data.eval_source_uri) or \
                (name in ALIGN_PARAMETERS and config.data.align == "none") or \
                (section == "deploy" and not config.deploy.enabled):
            continue
        kind = typing.get_type_hints(SECTIONS[section])[key]
        if kind not in PARAMETER_TYPES:
            raise InputError(f"config {section}.{key} has type {kind}, which has no pipeline parameter "
                               f"type; known: {', '.join(map(str, PARAMETER_TYPES))}")
        value = getattr(getattr(config, section), key)
        params.append((name, PARAMETER_TYPES[kind], list(value) if isinstance(value, tuple) else value,
                       f"{field_help(SECTIONS[section])[key]} (config: {section}.{key})"))
    return params


def markdown_table() -> str:
    """Every config key with its default, allowed values and help: the configuration table in README.md."""
    lines = ["| key | default | allowed | meaning |", "|---|---|---|---|"]
    for name, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            default = to_dict(cls())[f.name]
            shown = default if isinstance(default, str) and default else json.dumps(default)
            lines.append(f"| `{name}.{f.name}` | `{shown}` | {describe_limits(cls, f.name)} | "
                         f"{f.metadata['help']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
