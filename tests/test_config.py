import dataclasses
import re
from pathlib import Path

import pytest

from facenet_kfp.config import (SECTIONS, ClusterConfig, DataConfig, EvaluateConfig, TrainConfig,
                                describe_limits, field_help, load_config, markdown_table, parse_assignments,
                                to_dict)
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
    ("data: {val_fraction: 0}", r"data\.val_fraction must be > 0, got 0$"),
    ("data: {val_fraction: 1.5}", r"data\.val_fraction must be < 1, got 1\.5$"),
    ("data: {sha256: abc}", r"data\.sha256 must be 64 hex"),
    ("train: {p: 1}", r"train\.p must be at least 2"),
    ("train: {k: 3}", r"train\.k \(3\) must equal data\.multiple \(4\)"),
    ("evaluate: {far_targets: [0.5, 2]}", "far_targets"),
    ("evaluate: {far_targets: [1e-3, 0.001, 0.01]}", r"evaluate\.far_targets lists 0\.001 more than once"),
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
    ("train: {seed: -1}", r"train\.seed must be at least 0, got -1"),
    ("evaluate: {report_examples: -3}", r"evaluate\.report_examples must be at least 0, got -3"),
    ("data: {split_seed: -2}", r"data\.split_seed must be at least 0, got -2"),
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


def test_a_folder_is_not_a_config_file(tmp_path):
    with pytest.raises(InputError, match=rf"^{re.escape(str(tmp_path))}: is a folder, not a config file$"):
        load_config(tmp_path)
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"train: {loss: \xe9}\n")
    with pytest.raises(InputError, match=r"latin1\.yaml: not valid YAML \('utf-8' codec can't decode"):
        load_config(path)


def test_errors_name_the_file_and_the_key(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("train: {max_steps: 0}\n")
    with pytest.raises(InputError, match=rf"^{re.escape(str(path))}: train\.max_steps must be at least 1, got 0$"):
        load_config(path)


def test_help_lives_in_the_field_metadata():
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert fields["loss"].metadata["help"] == field_help(TrainConfig)["loss"]
    assert fields["loss"].metadata["choices"] == ("batch_all", "batch_hard", "semi_hard", "arcface", "cosface",
                                                  "softmax")
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


# --- numbers as people write them ------------------------------------------------------------

def test_exponent_notation_in_a_config_file(tmp_path):
    """YAML 1.1 reads 1e-3 as a string; the config reads it as the number it is, everywhere."""
    path = tmp_path / "exp.yaml"
    path.write_text("train: {learning_rate: 1e-3, margin: 2E-1, max_steps: 2e4, warmup_steps: 1_000}\n"
                    "evaluate: {far_targets: [1e-3, 1.5e-2, .5e-1], seed_threshold: 1.242e+0}\n"
                    "data: {max_download_gb: 5e1}\n")
    config = load_config(path)
    assert config.train.learning_rate == 0.001 and config.train.margin == 0.2
    assert config.train.max_steps == 20000 and type(config.train.max_steps) is int
    assert config.train.warmup_steps == 1000
    assert config.evaluate.far_targets == (0.001, 0.015, 0.05)
    assert config.evaluate.seed_threshold == 1.242 and config.data.max_download_gb == 50.0


@pytest.mark.parametrize("item, expected", [
    ("train.learning_rate=1e-3", {"train": {"learning_rate": 0.001}}),
    ("train.learning_rate=-1E-3", None),
    ("train_learning_rate=5e-4", {"train": {"learning_rate": 0.0005}}),
    ("evaluate.far_targets=[1e-3]", {"evaluate": {"far_targets": (0.001,)}}),
    ("evaluate.far_targets=[1e-3, 1e-2]", {"evaluate": {"far_targets": (0.001, 0.01)}}),
    ("train.max_steps=1e3", {"train": {"max_steps": 1000}}),
    ("data.sha256=1e5", {"data": {"sha256": "1e5"}}),     # a str field keeps the text
])
def test_exponent_notation_in_assignments(item, expected):
    aliases = {"train_learning_rate": ("train", "learning_rate")}
    if expected is None:
        with pytest.raises(InputError, match=r"--set train\.learning_rate must be > 0, got -0\.001"):
            parse_assignments([item], aliases)
    else:
        assert parse_assignments([item], aliases) == expected


@pytest.mark.parametrize("text, message", [
    ("train: {learning_rate: 1e999}", r"train\.learning_rate must be a finite number, got inf"),
    ("train: {learning_rate: -1e999}", r"train\.learning_rate must be a finite number, got -inf"),
    ("train: {max_steps: 1.5e0}", r"train\.max_steps must be int, got 1\.5"),
    ("train: {max_steps: 1e999}", r"train\.max_steps must be int, got inf"),
    ("data: {sha256: 1e5}", r"data\.sha256 must be str, got 100000\.0; quote it in YAML"),
])
def test_exponent_notation_keeps_the_checks(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(InputError, match=message):
        load_config(path)


# --- bounds ------------------------------------------------------------------------------------

@pytest.mark.parametrize("item, message", [
    ("train.image_size=10000", r"train\.image_size must be at most 512, got 10000$"),
    ("train.image_size=16", r"train\.image_size must be at least 32, got 16$"),
    ("train.embedding_dim=1", r"train\.embedding_dim must be at least 8, got 1$"),
    ("evaluate.seed_threshold=-1", r"evaluate\.seed_threshold must be > 0, got -1$"),
    ("evaluate.seed_threshold=1e300", r"evaluate\.seed_threshold must be at most 2, got 1e\+300$"),
    ("evaluate.far_targets=[1e-3, 1e300]", r"evaluate\.far_targets must be < 1, got 1e\+300$"),
    ("train.margin=1e300", r"train\.margin must be at most 4, got 1e\+300$"),
    ("train.seed=1e20", r"train\.seed must be at most 4,294,967,295, got 100,000,000,000,000,000,000$"),
    ("data.shard_size_mb=1e6", r"data\.shard_size_mb must be at most 4096, got 1,000,000$"),
    ("train.crop_fraction=0.01", r"train\.crop_fraction must be at least 0\.25, got 0\.01$"),
    ("evaluate.folds=1000", r"evaluate\.folds must be at most 100, got 1000$"),
])
def test_sizes_and_thresholds_have_a_range(item, message):
    """Out-of-range values are refused when the assignment is read, as they are in a config file."""
    with pytest.raises(InputError, match=r"^SET " + message):
        parse_assignments([item], option="SET")
    name, text = item.split("=")
    section, key = name.split(".")
    with pytest.raises(InputError, match=rf"^{message}"):   # a section built in code: the same check
        SECTIONS[section](**{key: _typed(section, key, text)})


def _typed(section, key, text):
    """`text` as the field's type, without the field's limits."""
    import typing

    from facenet_kfp.config import parse_value
    return parse_value(f"{section}.{key}", text, typing.get_type_hints(SECTIONS[section])[key])


def test_cross_field_limits():
    with pytest.raises(InputError, match=r"train\.p x train\.k must be at most 4096 images per batch, got "
                                         r"1024 x 8 = 8192"):
        TrainConfig(p=1024, k=8)
    with pytest.raises(InputError, match=r"train\.margin must be at most 2 with plain L2 distances"):
        TrainConfig(squared=False, margin=3)
    assert TrainConfig(squared=True, margin=3).margin == 3


@pytest.mark.parametrize("cls", list(SECTIONS.values()), ids=lambda c: c.NAME)
def test_every_number_has_a_range_and_every_default_is_inside_it(cls):
    """Every int and float field states its range (ints have an upper bound too), and the table says it."""
    import typing

    table = markdown_table()
    for f in dataclasses.fields(cls):
        kind = typing.get_type_hints(cls)[f.name]
        kind = typing.get_args(kind)[0] if typing.get_origin(kind) is tuple else kind
        limits = describe_limits(cls, f.name)
        if kind in (int, float):
            assert limits, f"{cls.NAME}.{f.name} has no range"
            if kind is int or f.metadata["maximum"] is not None or f.metadata["below"] is not None:
                assert limits.startswith("in "), f"{cls.NAME}.{f.name}: {limits}"
        if limits:
            assert limits in table.split(f"`{cls.NAME}.{f.name}`")[1].split("\n")[0]
    cls()   # every default is inside its range (the section checks itself)


# --- errors name where a value came from ---------------------------------------------------------

def test_override_errors_name_the_override_not_the_file(tmp_path):
    path = tmp_path / "demo.yaml"
    path.write_text("data: {multiple: 4}\ntrain: {k: 4, max_steps: 10}\n")
    with pytest.raises(InputError, match=r"^SET train\.max_steps must be int, got 'ten'$"):
        parse_assignments(["train.max_steps=ten"], option="SET")
    with pytest.raises(InputError, match=r"^SET train\.max_steps must be at least 1, got 0$"):
        parse_assignments(["train.max_steps=0"], option="SET")
    overrides = parse_assignments(["train.k=8"], option="SET")
    with pytest.raises(InputError, match=rf"^SET train\.k=8 \(applied to {re.escape(str(path))}\): "
                                         r"train\.k \(8\) must equal data\.multiple \(4\)$"):
        load_config(path, overrides, overrides_from="SET train.k=8")
    # Overrides that mend the file's rule between keys are fine.
    assert load_config(path, parse_assignments(["train.k=8", "data.multiple=8"])).train.k == 8
    # The file's own error names the file, whatever the overrides.
    path.write_text("train: {max_steps: 0}\n")
    with pytest.raises(InputError, match=rf"^{re.escape(str(path))}: train\.max_steps must be at least 1"):
        load_config(path, {"train": {"k": 8}}, overrides_from="SET train.k=8")
    # Overrides built in code are checked when the config is built.
    with pytest.raises(InputError, match=r"^overrides \(applied to defaults\): train\.max_steps must be at least 1"):
        load_config(None, {"train": {"max_steps": 0}})


@pytest.mark.parametrize("items, message", [
    (["train.max_steps=ten"], "error: SET train.max_steps must be int, got 'ten'"),
    (["train.max_steps=0"], "error: SET train.max_steps must be at least 1, got 0"),
    (["train.k=8"], "error: SET train.k=8 (applied to configs/demo.yaml): train.k (8) must equal data.multiple (4)"),
    (["train.learning_rate=1e-3", "train.image_size=1e4"],
     "error: SET train.image_size must be at most 512, got 10000"),
])
def test_make_run_set_errors_name_the_set(items, message, tmp_path, capsys, monkeypatch):
    """`make run SET=...` passes each word as --set and exports SET: an error names SET, not the config
    file, and nothing runs."""
    run_local = pytest.importorskip("pipelines.run_local")
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    monkeypatch.setenv("SET", " ".join(items))
    argv = ["--config", "configs/demo.yaml", "--pipeline-root", str(tmp_path / "root"),
            "--demo-dir", str(tmp_path / "demo")]
    assert run_local.main([*argv, *(x for item in items for x in ("--set", item))]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "root").exists() and not (tmp_path / "demo").exists()
    # The same values typed as --set options are named so.
    monkeypatch.delenv("SET")
    assert run_local.main([*argv, *(x for item in items for x in ("--set", item))]) == 2
    assert message.replace("SET ", "--set ", 1).split(" (applied")[0] in capsys.readouterr().err
    # A rerun's --set values too.
    monkeypatch.setenv("SET", " ".join(items))
    assert run_local.main(["--rerun", "train", "--from", str(tmp_path / "none"), *argv[:2],
                           *(x for item in items for x in ("--set", item))]) == 2
    assert "error: SET " in capsys.readouterr().err


def test_make_run_takes_exponent_notation(tmp_path, monkeypatch):
    """SET=train.learning_rate=1e-3 reaches the pipeline as the number 0.001."""
    run_local = pytest.importorskip("pipelines.run_local")
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    overrides = run_local.checked_overrides("configs/demo.yaml", ["train.learning_rate=1e-3",
                                                                  "eval_far_targets=[1e-3]"], "SET")
    assert overrides == {"train": {"learning_rate": 0.001}, "evaluate": {"far_targets": (0.001,)}}


def test_image_size_minimum_is_the_networks():
    """train.image_size's lower bound is the smallest input either architecture builds with."""
    model = pytest.importorskip("facenet_kfp.model")
    from facenet_kfp.config import ARCHITECTURES, MIN_IMAGE_SIZE

    assert set(model.MIN_INPUT_SIZE) == set(ARCHITECTURES)
    assert MIN_IMAGE_SIZE == max(model.MIN_INPUT_SIZE.values())
    for architecture in ARCHITECTURES:
        model.build_embedding_model((MIN_IMAGE_SIZE, MIN_IMAGE_SIZE, 3), 8, architecture)


# --- face alignment: data.align chooses the DAG, its two settings are the align step's parameters -------

def test_align_keys_defaults_and_limits():
    data = DataConfig()
    assert (data.align, data.align_size, data.max_align_fallback_fraction) == ("none", 112, 0.5)
    assert DataConfig(align="mtcnn", align_size=160, max_align_fallback_fraction=0).align == "mtcnn"
    for values, message in (({"align": "dlib"}, r"data\.align must be one of none, mtcnn; got 'dlib'"),
                            ({"align_size": 16}, r"data\.align_size must be at least 32, got 16"),
                            ({"align_size": 1024}, r"data\.align_size must be at most 512, got 1024"),
                            ({"max_align_fallback_fraction": 1.5},
                             r"data\.max_align_fallback_fraction must be at most 1, got 1\.5")):
        with pytest.raises(InputError, match=message):
            DataConfig(**values)


def test_align_methods_are_the_align_modules_and_config_imports_no_tensorflow():
    import subprocess
    import sys

    from facenet_kfp import align, config

    assert config.ALIGN_METHODS == align.ALIGN_METHODS == ("none", "mtcnn")
    assert DataConfig().align_size == align.DEFAULT_ALIGN_SIZE
    code = ("import sys, facenet_kfp.config; "
            "print(sorted(m for m in ('tensorflow', 'mtcnn', 'facenet_kfp.align') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"


def test_align_is_compiled_in_and_its_settings_are_parameters_only_with_it_on():
    from facenet_kfp.config import ALIGN_PARAMETERS, parameter_keys, pipeline_parameters

    keys = parameter_keys()
    assert ("data", "align") not in keys.values()
    assert {name: keys[name] for name in ALIGN_PARAMETERS} == {
        "align_size": ("data", "align_size"), "max_align_fallback_fraction": ("data", "max_align_fallback_fraction")}
    off = {name: default for name, _, default, _ in pipeline_parameters(load_config())}
    on = {name: default for name, _, default, _ in
          pipeline_parameters(load_config(overrides={"data": {"align": "mtcnn", "align_size": 96}}))}
    assert set(on) - set(off) == set(ALIGN_PARAMETERS)
    assert (on["align_size"], on["max_align_fallback_fraction"]) == (96, 0.5)
    # As a run parameter it is refused by name; as a config key it is an ordinary override.
    with pytest.raises(InputError, match="align: not a config key"):
        parse_assignments(["align=mtcnn"], keys)
    assert parse_assignments(["data.align=mtcnn"], keys) == {"data": {"align": "mtcnn"}}


def test_dataset_configs_align_and_keep_the_whole_aligned_crop():
    for name in ("lfw", "casia", "vggface2"):
        config = load_config(Path(__file__).resolve().parents[1] / f"configs/{name}.yaml")
        assert (config.data.align, config.data.align_size, config.train.crop_fraction) == ("mtcnn", 112, 1.0), name
    assert load_config(Path(__file__).resolve().parents[1] / "configs/demo.yaml").data.align == "none"


# --- deploy: deploy.enabled chooses the DAG, the other deploy keys are the deploy step's parameters -----

def test_deploy_is_compiled_in_and_its_settings_are_parameters_only_with_it_on():
    import subprocess
    import sys

    from facenet_kfp.config import DeployConfig, parameter_keys, pipeline_parameters

    keys = parameter_keys()
    assert ("deploy", "enabled") not in keys.values()
    deploy_keys = {name: key for name, key in keys.items() if key[0] == "deploy"}
    assert deploy_keys == {f"deploy_{f.name}": ("deploy", f.name) for f in dataclasses.fields(DeployConfig)
                           if f.name != "enabled"}
    off = {name for name, *_ in pipeline_parameters(load_config())}
    on = {name: default for name, _, default, _ in
          pipeline_parameters(load_config(overrides={"deploy": {"enabled": True, "namespace": "team-a"}}))}
    assert set(on) - off == set(deploy_keys) and not off & set(deploy_keys)
    assert (on["deploy_name"], on["deploy_namespace"], on["deploy_timeout_s"]) == ("facenet", "team-a", 600)
    with pytest.raises(InputError, match="deploy_enabled: not a config key"):
        parse_assignments(["deploy_enabled=true"], keys)
    assert parse_assignments(["deploy.enabled=true", "deploy_name=faces"], keys) == {
        "deploy": {"enabled": True, "name": "faces"}}
    with pytest.raises(InputError, match=r"SET \(applied to defaults\): deploy\.name must be a DNS-1035 label"):
        load_config(overrides={"deploy": {"name": "Faces"}}, overrides_from="SET")
    # Reading a config loads no Kubernetes client: only the deploy step does.
    code = ("import sys, facenet_kfp.config, facenet_kfp.deploy; "
            "print(sorted(m for m in ('kserve', 'kubernetes', 'tensorflow') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"
