import dataclasses
import re
from pathlib import Path

import pytest

from facenet_kfp.config import (ClusterConfig, DataConfig, EvaluateConfig, TrainConfig, field_help,
                                load_config, parse_assignments, to_dict)
from facenet_kfp.errors import InputError

CONFIGS = sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    load_config(path)   # validation runs at load: a shipped config that breaks a rule fails here


def test_seed_config_reproduces_the_seed():
    train = load_config(Path(__file__).resolve().parents[1] / "configs/seed.yaml").train
    assert (train.p * train.k, train.loss, train.margin, train.squared, train.learning_rate,
            train.max_steps) == (24, "batch_all", 0.5, False, 0.001, 3000)


@pytest.mark.parametrize("text, message", [
    ("train: {lerning_rate: 0.1}", "unknown key.*lerning_rate"),
    ("trian: {}", "unknown section.*trian"),
    ("train: {max_steps: ten}", r"train\.max_steps must be int"),
    ("train: {loss: hardest}", r"train\.loss must be one of"),
    ("data: {train_fraction: 0.8, val_fraction: 0.15, test_fraction: 0.15}", "must be 1"),
    ("data: {val_fraction: 0}", r"data\.val_fraction must be in \(0, 1\)"),
    ("data: {sha256: abc}", r"data\.sha256 must be 64 hex"),
    ("train: {p: 1}", r"train\.p must be at least 2"),
    ("train: {k: 3}", r"train\.k \(3\) must equal data\.multiple \(4\)"),
    ("evaluate: {far_targets: [0.5, 2]}", "far_targets"),
    ("- a list", "top level must be a mapping"),
])
def test_bad_configs_name_the_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(InputError, match=message):
        load_config(path)


def test_ints_accepted_for_floats_and_overrides_apply(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: {learning_rate: 1, margin: 1}\n")
    config = load_config(path, {"train": {"max_steps": 7}})
    assert config.train.learning_rate == 1.0 and isinstance(config.train.margin, float)
    assert config.train.max_steps == 7
    assert to_dict(config)["evaluate"]["far_targets"] == [0.001, 0.01]


@pytest.mark.parametrize("cls", [DataConfig, TrainConfig, EvaluateConfig, ClusterConfig])
def test_every_key_is_documented(cls):
    assert set(field_help(cls)) == {f.name for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("text, message", [
    ("train: [1, 2]", r"bad\.yaml: section 'train' must be a mapping of keys, got list"),
    ("data: just text", r"section 'data' must be a mapping of keys, got str"),
    ("train: {learning_rate: .nan}", r"train\.learning_rate must be a finite number"),
    ("train: {margin: .inf}", r"train\.margin must be a finite number"),
    ("train: {margin: -.inf}", r"train\.margin must be a finite number"),
    ("train: {learning_rate: high}", r"train\.learning_rate must be a number, got 'high'"),
    ("train: {margin: true}", r"train\.margin must be a number"),
    ("evaluate: {seed_threshold: .nan}", r"evaluate\.seed_threshold must be a finite number"),
    ("evaluate: {far_targets: [0.01, .nan]}", r"evaluate\.far_targets\[1\] must be a finite"),
    ("train: {seed: -1}", r"train\.seed must be >= 0"),
    ("evaluate: {report_examples: -3}", r"evaluate\.report_examples must be >= 0"),
    ("data: {split_seed: -2}", r"data\.split_seed must be >= 0"),
    ("data: {source_uri: ' https://example.com/a.tgz'}", r"data\.source_uri must not start or end"),
    ("data: {max_download_gb: 0}", r"data\.max_download_gb must be > 0"),
    ("cluster: {train_memory: ''}", r"cluster\.train_memory must not be empty"),
])
def test_bad_values_name_the_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(InputError, match=message):
        load_config(path)


@pytest.mark.parametrize("cls, key", [(TrainConfig, "learning_rate"), (TrainConfig, "margin"),
                                      (TrainConfig, "crop_fraction"), (DataConfig, "train_fraction"),
                                      (EvaluateConfig, "seed_threshold")])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_floats_refused_when_built_in_code(cls, key, value):
    """Sections built in code (as the components build theirs) check themselves: no invalid config exists."""
    section = cls.__name__.removesuffix("Config").lower()
    with pytest.raises(InputError, match=rf"{section}\.{key} must be a finite number"):
        dataclasses.replace(cls(), **{key: value})


def test_errors_name_the_file_and_the_key(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("train: {max_steps: 0}\n")
    with pytest.raises(InputError, match=rf"^{re.escape(str(path))}: train\.max_steps must be at least 1, got 0$"):
        load_config(path)


def test_help_lives_in_the_field_metadata():
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert fields["loss"].metadata["help"] == field_help(TrainConfig)["loss"]
    assert fields["loss"].metadata["choices"] == ("batch_all", "batch_hard", "semi_hard")
    assert all(text and not text.startswith("#") for text in field_help(ClusterConfig).values())


def test_dict_values_keep_their_yaml_types(tmp_path):
    path = tmp_path / "gpu.yaml"
    path.write_text("cluster:\n  gpu_toleration: {key: nvidia.com/gpu, operator: Exists, effect: NoExecute, "
                    "tolerationSeconds: 300}\n  gpu_node_selector: {pool: gpu}\n")
    cluster = load_config(path).cluster
    assert cluster.gpu_toleration["tolerationSeconds"] == 300
    assert cluster.toleration() == {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoExecute",
                                    "toleration_seconds": 300}
    path.write_text("cluster:\n  gpu_toleration: {tolerationSeconds: soon}\n")
    with pytest.raises(InputError, match=r"cluster\.gpu_toleration\.tolerationSeconds must be int, got 'soon'"):
        load_config(path)
    path.write_text("cluster:\n  gpu_toleration: {toleration_seconds: 3}\n")
    with pytest.raises(InputError, match=r"gpu_toleration: unknown key\(s\) toleration_seconds; known: key"):
        load_config(path)
    path.write_text("cluster:\n  gpu_node_selector: {pool: 1}\n")
    with pytest.raises(InputError, match=r"cluster\.gpu_node_selector\.pool must be str, got 1"):
        load_config(path)


@pytest.mark.parametrize("items, expected", [
    (["train.max_steps=800", "evaluate.folds=5"], {"train": {"max_steps": 800}, "evaluate": {"folds": 5}}),
    (["data.sha256=0123"], {"data": {"sha256": "0123"}}),            # a str field keeps the text
    (["data.pairs_uri="], {"data": {"pairs_uri": ""}}),
    (["train.learning_rate=1"], {"train": {"learning_rate": 1.0}}),  # an int is a float where asked
    (["evaluate.far_targets=[0.001, 0.1]"], {"evaluate": {"far_targets": (0.001, 0.1)}}),
    (["train.augment=false"], {"train": {"augment": False}}),
])
def test_assignments_are_typed_by_the_field(items, expected):
    assert parse_assignments(items) == expected


@pytest.mark.parametrize("item, message", [
    ("train.max_steps=1.5", r"--set train\.max_steps must be int, got 1\.5"),
    ("train.augment=1", r"train\.augment must be bool, got 1"),
    ("train.max_step=5", r"train\.max_step: not a config key; did you mean train\.max_steps"),
    ("max_steps=5", r"max_steps: not a config key"),
    ("train.max_steps", "expected key=value"),
    ("evaluate.far_targets=[0.1", "not a YAML value"),
])
def test_bad_assignments_name_the_key(item, message):
    with pytest.raises(InputError, match=message):
        parse_assignments([item])
