"""The training objectives' table: Keras-free, the config's choices, distances and loss bounds by objective."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from facenet_kfp import config, objectives
from facenet_kfp.config import TrainConfig
from facenet_kfp.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


def test_the_table_imports_neither_keras_nor_tensorflow():
    code = ("import sys; import facenet_kfp.objectives, facenet_kfp.config; "
            "print(sorted(m for m in ('keras', 'tensorflow', 'jax') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_the_config_choices_are_the_table():
    assert config.LOSSES == objectives.NAMES == ("batch_all", "batch_hard", "semi_hard", "arcface", "cosface",
                                                 "softmax")
    assert objectives.NAMES == objectives.TRIPLET_NAMES + objectives.MARGIN_NAMES
    loss = next(f for f in dataclasses.fields(TrainConfig) if f.name == "loss")
    assert loss.metadata["choices"] == objectives.NAMES
    assert loss.metadata["help"] == ("training objective: triplet mining batch_all, batch_hard, semi_hard (P x K "
                                     "batches), or margin-softmax over a head of one centre per training "
                                     "identity: arcface, cosface, softmax")
    with pytest.raises(InputError, match=r"train.loss must be one of batch_all, batch_hard, semi_hard, arcface, "
                                         r"cosface, softmax; got 'x'"):
        objectives.get("x")


@pytest.mark.parametrize("name", objectives.TRIPLET_NAMES)
def test_triplet_objectives(name):
    objective = objectives.get(name)
    assert objective.name == name and objective.pk_batches and objective.head is None
    assert objective.statistics == ("loss", "fraction_positive_triplets", "mean_positive_distance",
                                    "mean_negative_distance")
    assert objective.reported() == (*objective.statistics, "mean_pairwise_l2", "max_pairwise_l2")
    squared, plain = TrainConfig(loss=name, margin=0.3), TrainConfig(loss=name, margin=0.3, squared=False)
    assert objective.distance(squared) == "squared_l2" and objective.distance(plain) == "l2"
    # The hinge max(d(a,p) - d(a,n) + margin, 0) of unit vectors: at most the largest distance + margin.
    assert objective.loss_bound(squared) == pytest.approx(4.3) and objective.loss_bound(plain) == pytest.approx(2.3)
    assert objectives.for_config(squared) is objective
    assert objective.loss == f"facenet_kfp.losses:{name}_objective"
    assert objective.head_on_validation and objective.divergence_rise(squared) == (0.3, "train.margin=0.3")


@pytest.mark.parametrize("name", objectives.MARGIN_NAMES)
def test_margin_softmax_objectives(name):
    """Their code and head are in margin_losses (tests/test_margin_losses.py checks them against loops)."""
    objective = objectives.get(name)
    assert objective.name == name and not objective.pk_batches and not objective.head_on_validation
    assert objective.statistics == ("loss", "accuracy", "mean_true_cosine", "mean_other_cosine")
    assert objective.loss == f"facenet_kfp.margin_losses:{name}_objective"
    assert objective.head == "facenet_kfp.margin_losses:class_centre_head"
    config = TrainConfig(loss=name, scale=64.0)
    assert objective.distance(config) == "cosine" and objective.loss_bound(config) == float("inf")
    assert objective.divergence_rise(config) == (pytest.approx(6.4), "6.4 (a tenth of train.scale=64)")


def test_loss_code_and_head_are_imported_only_when_asked_for():
    """An entry names its code; a name that does not resolve fails when training resolves it, not before."""
    entry = objectives.Objective(name="nowhere", summary="", loss="facenet_kfp.no_such_module:f",
                                 distance=lambda c: "cosine", loss_bound=lambda c: float("inf"),
                                 head="facenet_kfp.no_such_module:head")
    with pytest.raises(ModuleNotFoundError, match="no_such_module"):
        entry.function
    with pytest.raises(ModuleNotFoundError, match="no_such_module"):
        entry.build_head(TrainConfig())
    with pytest.raises(InputError, match="must be 'module:attribute'"):
        dataclasses.replace(entry, loss="no colon").function
    assert objectives.get("batch_hard").build_head(TrainConfig()) is None


def test_statistics_start_with_the_loss():
    with pytest.raises(InputError, match="statistics must start with 'loss'"):
        objectives.Objective(name="x", summary="", loss="m:f", distance=objectives.triplet_distance,
                             loss_bound=objectives.triplet_loss_bound, statistics=("mean_negative_distance",))
