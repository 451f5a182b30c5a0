"""The training monitor and the run's callback: fail fast, log, validate, checkpoint; the summary metrics.

Every `log_every` steps a log line gives loss, fraction of positive
triplets, mean positive / negative distance, learning rate, images/s and ETA
(means over the steps since the previous line). Every `validate_every` steps
(and after the last step) the same metrics are computed on
`validation_batches` fixed P x K batches of real validation images, without
augmentation, by the model as it is exported (`evaluation_model`): a float32
copy whose batch-norm moving statistics are recalibrated on
BN_CALIBRATION_BATCHES fixed unaugmented train batches, since training's own
moving averages (momentum 0.99) lag the weights by hundreds of steps. Both are also TensorBoard scalars (`tensorboard_log.TensorBoardLog`:
train/<metric> with train/learning_rate and train/images_per_second, and
val/<metric>) in each folder of `tensorboard_dir`.

Fail fast (`TrainingMonitor`, on every step's values whatever `log_every`
is, read back from the device every READBACK_STEPS steps): a non-finite loss,
embedding collapse (negatives closer than half the margin for a window of
steps, or at the end of a run) or divergence raises FacenetError naming the
step and the setting to change; the step then fails and no model is exported
(unlike keras.callbacks.TerminateOnNaN, which ends `fit` as if it had succeeded).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections import deque

import keras
import numpy as np

from facenet_kfp.checkpoints import HISTORY_JSON, _checkpoint_errors, _sync, save_checkpoint
from facenet_kfp import objectives
from facenet_kfp.config import TrainConfig
from facenet_kfp.errors import FacenetError
from facenet_kfp.fsutil import join, write_json_any
from facenet_kfp.objectives import Objective
from facenet_kfp.progress import Progress, _fmt_seconds
from facenet_kfp.tensorboard_log import TensorBoardLog
from facenet_kfp.trainer import EmbeddingTrainer, batch_loss, learning_rate_at

log = logging.getLogger("facenet_kfp.train")      # one logger for all of training's lines

COLLAPSE_MEAN_DISTANCE = 1e-3    # plain L2; random unit vectors in 128-D are ~1.41 apart
COLLAPSE_MAX_DISTANCE = 1e-6
COLLAPSE_STEPS = 20              # consecutive steps below COLLAPSE_MEAN_DISTANCE that count as collapse
# Negatives closer (plain L2) than this fraction of the margin's plain-L2 length, sqrt(margin) for squared
# distances: collapse (`collapse_negative_limit`). Seen: a collapsed demo run at 0.05 plain L2 in both units,
# healthy batch-hard runs no lower than 0.34 (squared) and 0.49 (plain) on their way down and up.
COLLAPSE_MARGIN_FRACTION = 0.5
COLLAPSE_END_STEPS = 5           # a run that ends with this many collapsed steps fails, however short it is
DIVERGENCE_STEPS = 50            # steps per mean loss of the divergence check
STAT_KEYS = objectives.TRIPLET_STATISTICS     # what the triplet objectives report (`Objective.statistics`)
# Relative and absolute slack over an objective's loss bound (float32 rounding of distances near their maximum).
BOUND_RTOL, BOUND_ATOL = 1e-4, 1e-5
# Steps whose statistics wait on the device before the host reads them back and checks them, at most. Reading
# every step makes the host wait for each step (its dispatch no longer overlaps the device's work); a GPU step of
# a small model takes a few ms, a readback a fraction of one, so 10 amortises it to a few per cent while a bad step
# is still caught within 9 more steps. Log lines, validation, checkpoints and the last step read back first.
READBACK_STEPS = 10
# How the log line writes a statistic (others: "<name> <value>").
LOG_FORMATS = {"loss": "loss %.4f", "fraction_positive_triplets": "positive triplets %.3f",
               "mean_positive_distance": "d+ %.4f", "mean_negative_distance": "d- %.4f"}
# The summary metric name of a statistic, after "train_" / "val_" (others: the statistic's own name).
SUMMARY_NAMES = {"fraction_positive_triplets": "fraction_positive"}


# ----------------------------------------------------------------------------- monitor

def collapse_negative_limit(config: TrainConfig) -> float:
    """Mean negative distance, in the configured distance's units, below which the embeddings count as collapsed.

    The limit is a plain-L2 length, COLLAPSE_MARGIN_FRACTION times the margin's
    plain-L2 length (sqrt(margin) when train.squared, else margin), written in
    the units of `mean_negative_distance`: f * margin for plain L2 and
    f^2 * margin for squared L2 (margin 0.2: 0.1 plain, 0.05 squared).
    """
    f = COLLAPSE_MARGIN_FRACTION
    return f * f * config.margin if config.squared else f * config.margin


class TrainingMonitor:
    """Fail-fast checks on the values of each training step, as plain floats (no backend needed).

    `update(step, values)` takes step `step`'s (1-based) "loss", "mean_negative_distance" (in the
    configured distance), "mean_pairwise_l2" and "max_pairwise_l2" (plain L2 between the batch's
    embeddings, `batch_loss`) and raises FacenetError naming the step and the setting to change when

    - the loss is not finite (NaN or infinite weights or activations), or above the objective's
      bound (`Objective.loss_bound`: for a triplet objective the largest distance between unit
      vectors plus the margin), which only embeddings that are not unit vectors reach;
    - the embeddings collapse: the largest distance is below COLLAPSE_MAX_DISTANCE (all at one
      point), or the mean distance stays below COLLAPSE_MEAN_DISTANCE for COLLAPSE_STEPS
      consecutive steps, or (for an objective that reports it) the mean negative distance stays
      below `collapse_negative_limit`
      (half the margin, as a plain-L2 length) for COLLAPSE_STEPS consecutive steps: different
      people's embeddings closer than the margin asks, the loss pinned at the margin, nothing learnt;
    - training diverges: the mean loss over the last DIVERGENCE_STEPS steps is more than the
      objective's allowance (`Objective.divergence_rise`: one `margin` for a triplet objective)
      above the lowest such mean so far. The triplet loss of unit vectors is bounded
      (the objective's loss bound), so divergence shows as a lasting rise, not a blow-up; a healthy
      run's windowed loss falls from about the margin towards 0 with ripples far below a margin.

    `finish(step)` after the last step of a call: a run that ends with at least COLLAPSE_END_STEPS
    collapsed steps fails too, so a short run (shorter than the window) is not exported collapsed.

    The windows count steps, whatever `log_every` is; a resumed call starts them afresh.
    """

    def __init__(self, config: TrainConfig, objective: Objective | None = None):
        self.config = config
        self.objective = objective or objectives.for_config(config)
        self.loss_bound = float(self.objective.loss_bound(config))
        self.rise, self.rise_text = self.objective.divergence_rise(config)
        self.low_distance_run = 0
        self.low_negative_run = 0
        self.last_negative = math.nan
        self.losses: deque[float] = deque(maxlen=DIVERGENCE_STEPS)
        self.best: tuple[float, int] | None = None        # lowest windowed mean loss, its last step

    def learning_rate(self, step: int) -> float:
        """The learning rate step `step` (1-based) trained with."""
        c = self.config
        return learning_rate_at(step - 1, c.learning_rate, c.warmup_steps, c.max_steps, c.lr_schedule)

    def _negative_collapse(self, step: int, steps: int, ended: bool) -> FacenetError:
        limit, unit = collapse_negative_limit(self.config), "squared L2" if self.config.squared else "L2"
        when = "the run ended with it" if ended else "it stayed there"
        return FacenetError(
            f"embedding collapse at step {step}: the mean distance between different people's embeddings "
            f"({unit}) was below {limit:.3g} (half of train.margin={self.config.margin:g} as an L2 length) for "
            f"the last {steps} steps, {self.last_negative:.3g} at the last, and {when}: the loss stays at "
            f"the margin and nothing is learnt; lower train.learning_rate (now "
            f"{self.learning_rate(step):.3g}) or raise train.warmup_steps")

    def update(self, step: int, values: dict[str, float]) -> None:
        loss, lr = values["loss"], self.learning_rate(step)
        if not math.isfinite(loss):
            raise FacenetError(f"loss is {loss} at step {step} (learning rate {lr:.3g}): training diverged; "
                               f"lower train.learning_rate or use precision: float32")
        if loss > self.loss_bound * (1.0 + BOUND_RTOL) + BOUND_ATOL:
            raise FacenetError(f"loss is {loss:.6g} at step {step}, above {self.loss_bound:.6g}, the largest "
                               f"train.loss={self.objective.name} can take with these settings: the embeddings "
                               f"are not unit vectors; the embedding model must end in L2Normalize")
        if values["max_pairwise_l2"] < COLLAPSE_MAX_DISTANCE:
            raise FacenetError(f"embedding collapse at step {step}: all embeddings of the batch are at one "
                               f"point (largest distance {values['max_pairwise_l2']:.2e}); lower "
                               f"train.learning_rate (now {lr:.3g})")
        low = values["mean_pairwise_l2"] < COLLAPSE_MEAN_DISTANCE
        self.low_distance_run = self.low_distance_run + 1 if low else 0
        if self.low_distance_run >= COLLAPSE_STEPS:
            raise FacenetError(f"embedding collapse at step {step}: mean distance between embeddings below "
                               f"{COLLAPSE_MEAN_DISTANCE} for {self.low_distance_run} steps; lower "
                               f"train.learning_rate (now {lr:.3g})")
        self.last_negative = values.get("mean_negative_distance", math.nan)
        near = self.last_negative < collapse_negative_limit(self.config)       # False for NaN: not reported
        self.low_negative_run = self.low_negative_run + 1 if near else 0
        if self.low_negative_run >= COLLAPSE_STEPS:
            raise self._negative_collapse(step, self.low_negative_run, ended=False)
        self.losses.append(loss)
        if len(self.losses) < DIVERGENCE_STEPS:
            return
        mean = sum(self.losses) / DIVERGENCE_STEPS
        if self.best is None or mean < self.best[0]:
            self.best = (mean, step)
        elif mean > self.best[0] + self.rise:
            best, at = self.best
            raise FacenetError(f"training diverged at step {step}: the mean loss of steps "
                               f"{step - DIVERGENCE_STEPS + 1}-{step} is {mean:.4g}, up from {best:.4g} "
                               f"(steps {at - DIVERGENCE_STEPS + 1}-{at}), more than {self.rise_text} "
                               f"higher; lower train.learning_rate (now {lr:.3g}) "
                               f"or raise train.warmup_steps")

    def finish(self, step: int) -> None:
        """After the last step of a call: FacenetError when the run ends collapsed (see the class)."""
        if self.low_negative_run >= COLLAPSE_END_STEPS:
            raise self._negative_collapse(step, self.low_negative_run, ended=True)


# ----------------------------------------------------------------------------- one callback per run

@dataclasses.dataclass
class RunState:
    """What a training call knows besides the variables: its steps, history and timing."""
    config: TrainConfig
    start_step: int
    checkpoint_dir: str
    tensorboard: TensorBoardLog
    history: dict[str, list[dict[str, float]]]
    val_batches: list | None = None
    calibration_images: list = dataclasses.field(default_factory=list)   # `evaluation_model`'s batches
    step: int = 0
    first_done_time: float | None = None      # after the first (traced) step
    first_done_step: int = 0
    paused: float = 0.0                       # seconds in validation and checkpoints since then
    evaluation: keras.Model | None = None     # `evaluation_model`'s copy, built once
    chief: bool = True                        # writes checkpoints (False: a process other than 0 of several)


@contextlib.contextmanager
def _this_process():
    """No keras.distribution inside: the evaluation model lives and predicts on this process's default
    device, even inside `fit` under a DataParallel that spans the devices of several processes (whose
    outputs this process could not read back)."""
    outer = keras.distribution.distribution()
    keras.distribution.set_distribution(None)
    try:
        yield
    finally:
        keras.distribution.set_distribution(outer)


def evaluation_model(trainer: keras.Model, state: RunState) -> keras.Model:
    """The model as it will be exported: a float32 copy of the trained embedding model whose batch-norm
    moving statistics are recalibrated (`model.calibrate_batch_norm`) on `state.calibration_images`.

    Training's own moving statistics (an exponential average with momentum
    0.99) lag far behind the weights in the first few hundred steps, so
    inference-mode embeddings of a short run would sit at a fraction of the
    distances training sees. The trainer's variables are not touched: the
    checkpoints, and a resumed run, hold training's state as it is.
    """
    from facenet_kfp.model import calibrate_batch_norm

    with _this_process():
        return _evaluation_model(trainer, state, calibrate_batch_norm)


def _evaluation_model(trainer: keras.Model, state: RunState, calibrate_batch_norm) -> keras.Model:
    if state.evaluation is None:
        state.evaluation = float32_model(trainer, state.config)
    else:
        _sync(trainer)
        state.evaluation.set_weights([keras.ops.convert_to_numpy(v) for v in trainer.embedding.weights])
    calibrate_batch_norm(state.evaluation, state.calibration_images)
    return state.evaluation


def validate(trainer: keras.Model, state: RunState) -> dict[str, float]:
    """The mean statistics of the fixed validation batches at the current step, computed with the model as it
    would be exported (`evaluation_model`); in history and TensorBoard."""
    model = evaluation_model(trainer, state)
    keys = trainer.objective.statistics
    sums = {k: 0.0 for k in keys}
    for images, labels in state.val_batches:
        with _this_process():
            embeddings = model.predict(images, batch_size=len(images), verbose=0)
        head_output = (trainer.head(embeddings) if trainer.head is not None      # synced: a Keras weight
                       and trainer.objective.head_on_validation else None)
        out = batch_loss(state.config, labels, embeddings, head_output, trainer.objective)
        for k in keys:
            sums[k] += float(out[k])
    step, batches = state.step, len(state.val_batches)
    record = {"step": step, **{k: v / batches for k, v in sums.items()}}
    if not math.isfinite(record["loss"]):
        raise FacenetError(f"validation loss is {record['loss']} at step {step}: the model produces "
                           f"non-finite embeddings; lower train.learning_rate")
    state.history["val"].append(record)
    log.info("validation at step %d (%d batches): %s", step, batches, _statistics_text(record, keys))
    state.tensorboard.write("val", record)
    return record


def _statistics_text(record: dict[str, float], keys) -> str:
    """"loss 0.1234, positive triplets 0.500, d+ 0.1234, d- 0.5678" (LOG_FORMATS) of `keys` in `record`."""
    return ", ".join(LOG_FORMATS.get(k, f"{k} %.4g") % record[k] for k in keys)


class TrainingProgress(keras.callbacks.Callback):
    """After each step: fail fast, log, validate and checkpoint on their schedules (in that order).

    The trainer's `fit` (`trainer.DeviceLogsCallbackList`) hands each step's
    statistics over as device scalars (``device_logs``); they are read back
    together every READBACK_STEPS steps, on the first step, and before a log
    line, a validation, a checkpoint and the last step. `TrainingMonitor` then
    checks each step in order, so a bad step k (a NaN loss, say) fails `fit`
    by step k + READBACK_STEPS - 1 at the latest, with a FacenetError that
    names step k; no checkpoint is written after a step the monitor has not
    checked. This callback validates and checkpoints, so it is not one Keras
    may run in a thread while training goes on. Validation and checkpoints do
    not count in images/s.
    """

    device_logs = True        # `trainer.DeviceLogsCallbackList`: logs as the step gave them

    def __init__(self, state: RunState, progress: Progress):
        super().__init__()
        self.state, self.progress = state, progress
        self.monitor: TrainingMonitor | None = None        # the trainer's objective's, at on_train_begin
        self.keys: tuple[str, ...] = ()
        self.window: dict[str, list[float]] = {}
        self.window_start, self.window_steps = time.monotonic(), 0
        self.pending: list[tuple[int, dict]] = []        # (step, its logs) not read back yet

    def on_train_begin(self, logs=None):
        self.pending = []
        self.monitor = TrainingMonitor(self.state.config, self.model.objective)
        self.keys = self.model.objective.statistics
        self.window = {k: [] for k in self.keys}

    def on_train_batch_end(self, batch, logs=None):
        state, config = self.state, self.state.config
        state.step = state.start_step + batch + 1
        self.pending.append((state.step, logs))
        last = state.step == config.max_steps
        logs_due = state.step % config.log_every == 0 or last
        validation_due = state.val_batches is not None and (state.step % config.validate_every == 0 or last)
        checkpoint_due = state.step % config.checkpoint_every == 0 or last
        if (state.first_done_time is None or len(self.pending) >= READBACK_STEPS or logs_due or validation_due
                or checkpoint_due):
            self.read_back()
        else:
            return
        if last:
            self.monitor.finish(state.step)          # before its checkpoint: nothing collapsed is kept
        if state.first_done_time is None:          # the first step traced the step function: not in the rate
            state.first_done_time, state.first_done_step = time.monotonic(), state.step
            self.window_start, self.window_steps = state.first_done_time, 0
        if logs_due:
            self.log_line()
        paused = time.monotonic()
        if validation_due:
            validate(self.model, state)
        if checkpoint_due:
            self.checkpoint()
        paused = time.monotonic() - paused
        self.window_start += paused
        state.paused += paused

    def on_train_end(self, logs=None):
        if self.pending:            # a `fit` that stopped short of max_steps: its last steps are checked too
            self.read_back()

    def read_back(self) -> None:
        """Read the pending steps' statistics back to the host and check each, in step order
        (`TrainingMonitor.update`: FacenetError naming the first bad step)."""
        pending, self.pending = self.pending, []
        for step, logs in pending:
            values = {k: float(keras.ops.convert_to_numpy(v)) for k, v in logs.items()}
            self.monitor.update(step, values)
            for k in self.keys:
                self.window[k].append(values[k])
            self.window_steps += 1
            self.progress.update()

    def log_line(self) -> None:
        state, config = self.state, self.state.config
        batch_size = config.p * config.k
        now = time.monotonic()
        rate = (self.window_steps * batch_size / max(now - self.window_start, 1e-9) if self.window_steps
                else math.nan)
        record = {"step": state.step, **{k: float(np.mean(v)) for k, v in self.window.items()},
                  "learning_rate": self.monitor.learning_rate(state.step)}
        state.history["train"].append(record)
        eta = (_fmt_seconds((config.max_steps - state.step) * batch_size / rate)
               if math.isfinite(rate) and rate > 0 else "?")
        log.info("step %d/%d: %s, lr %.3g, %.0f images/s, ETA %s", state.step, config.max_steps,
                 _statistics_text(record, self.keys), record["learning_rate"], rate, eta)
        state.tensorboard.write("train", {**record, "images_per_second": rate})
        self.window = {k: [] for k in self.keys}
        self.window_start, self.window_steps = time.monotonic(), 0

    def checkpoint(self) -> None:
        state = self.state
        if not state.chief:         # process 0 of several writes them
            return
        with _checkpoint_errors(state.checkpoint_dir, f"the checkpoint of step {state.step}"):
            path = save_checkpoint(state.checkpoint_dir, self.model, state.step)
            write_json_any(join(state.checkpoint_dir, HISTORY_JSON), {"step": state.step, **state.history})
        log.info("checkpoint %s", path)

# ----------------------------------------------------------------------------- summary and export

def _summary(split: str, record: dict[str, float]) -> dict[str, float]:
    """{"<split>_<statistic>": value} of a history record's statistics (SUMMARY_NAMES shortens some)."""
    return {f"{split}_{SUMMARY_NAMES.get(k, k)}": v for k, v in record.items() if k not in ("step", "learning_rate")}


def summary_metrics(state: RunState, train_end: float, train_seconds: float) -> dict[str, float]:
    """The returned metrics: steps, start_step, images/s, time, learning rate, last train and val values."""
    config, history = state.config, state.history
    batch_size = config.p * config.k
    timed_steps = state.step - state.first_done_step
    images_per_second = (timed_steps * batch_size / (train_end - state.first_done_time - state.paused)
                         if state.first_done_time is not None and timed_steps > 0 else 0.0)
    metrics: dict[str, float] = {
        "steps": state.step, "start_step": state.start_step, "images_per_second": images_per_second,
        "train_seconds": train_seconds,
        "learning_rate": learning_rate_at(max(state.step - 1, 0), config.learning_rate, config.warmup_steps,
                                          config.max_steps, config.lr_schedule)}
    if history["train"]:
        metrics.update(_summary("train", history["train"][-1]))
    if history["val"]:
        first_val, last_val = history["val"][0], history["val"][-1]
        metrics.update({"first_val_step": first_val["step"], "first_val_loss": first_val["loss"]})
        if "fraction_positive_triplets" in first_val:
            metrics["first_val_fraction_positive"] = first_val["fraction_positive_triplets"]
        metrics.update(_summary("val", last_val))
    return metrics


def float32_model(trainer: EmbeddingTrainer, config: TrainConfig) -> keras.Model:
    """A plain float32 copy of the trained embedding model, outside any distribution."""
    from facenet_kfp import model as model_mod

    _sync(trainer)
    previous_policy = keras.mixed_precision.global_policy()
    try:
        keras.mixed_precision.set_global_policy("float32")
        final = model_mod.build_embedding_model((config.image_size, config.image_size, 3), config.embedding_dim,
                                                config.architecture)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
    final.set_weights([keras.ops.convert_to_numpy(v) for v in trainer.embedding.weights])
    return final

