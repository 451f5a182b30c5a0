"""Step 6: train the embedding network with online triplet mining (GPU on a cluster)."""

from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output


def train_model(images: Input[Dataset], completion: Input[Dataset], labels: Input[Artifact],
                splits: Input[Artifact], architecture: str, image_size: int, crop_fraction: float,
                embedding_dim: int, p: int, k: int, loss: str, margin: float, squared: bool,
                learning_rate: float, lr_schedule: str, warmup_steps: int, max_steps: int,
                augment: bool, validate_every: int, validation_batches: int,
                checkpoint_every: int, log_every: int, precision: str, seed: int,
                checkpoint_root: str, tensorboard_root: str, model: Output[Model],
                metrics: Output[Metrics], training_report: Output[HTML], tensorboard: Output[Artifact]):
    """Train FaceNet embeddings on the train split; validate on the validation split.

    Args:
        images: Packed image dataset (real images).
        completion: Packed completion images (synthetic, to fill P x K batches).
        labels: Labels folder.
        splits: Splits folder (train.txt, val.txt, test.txt).
        architecture: nn4_small2 (OpenFace, 96x96) or small_cnn.
        image_size: Model input size in pixels (square).
        crop_fraction: Centre crop of the original image kept around the face.
        embedding_dim: Size of the L2-normalised embedding.
        p: Identities per batch.
        k: Images per identity per batch.
        loss: batch_all, batch_hard or semi_hard.
        margin: Triplet margin (same units as the distance).
        squared: Squared L2 distances when true, plain L2 when false.
        learning_rate: Peak Adam learning rate.
        lr_schedule: constant or cosine.
        warmup_steps: Linear warm-up steps.
        max_steps: Optimizer steps.
        augment: Random mirror, crop jitter and brightness during training.
        validate_every: Steps between validation passes (0 = never).
        validation_batches: P x K batches per validation pass.
        checkpoint_every: Steps between checkpoints.
        log_every: Steps between log lines.
        precision: auto, float32, mixed_float16 or mixed_bfloat16.
        seed: Random seed of sampling, augmentation and initialisation.
        checkpoint_root: Persistent folder (gs:// or path) for checkpoints that
            survive a pod retry: a retry of this task resumes there, another
            run starts at step 0; empty keeps them next to the model output.
        tensorboard_root: Folder (gs:// or path) that gets this run's
            TensorBoard events as training goes, in its own subfolder
            (train-<hash of the model URI>, like the checkpoints); empty: none.
        model: Model folder: model.keras, model.json (how to use it), history.json,
            curves.png and, where TensorFlow is installed, saved_model/, serving/1/
            (TensorFlow Serving) and model.onnx.
        metrics: Final train and validation loss and triplet statistics.
        training_report: Loss and fraction-of-positive-triplet curves.
        tensorboard: TensorBoard event files of the whole run (train and
            validation scalars, learning rate, images/s):
            `tensorboard --logdir <its URI>`.
    """
    from facenet_kfp.config import TrainConfig
    from facenet_kfp.kfp_io import checkpoint_dir_for, log_metrics, run_step
    from facenet_kfp.objectives import for_config as objective_for
    from facenet_kfp.report import write_training_report
    from facenet_kfp.train import train

    config = TrainConfig(
        architecture=architecture, image_size=image_size, crop_fraction=crop_fraction,
        embedding_dim=embedding_dim, p=p, k=k, loss=loss, margin=margin, squared=squared,
        learning_rate=learning_rate, lr_schedule=lr_schedule, warmup_steps=warmup_steps,
        max_steps=max_steps, augment=augment, validate_every=validate_every,
        validation_batches=validation_batches, checkpoint_every=checkpoint_every,
        log_every=log_every, precision=precision, seed=seed)
    # Keyed by this task's model URI: a retried pod resumes, a new run starts at step 0.
    checkpoint_dir = checkpoint_dir_for(checkpoint_root, model.uri)
    live_events = checkpoint_dir_for(tensorboard_root, model.uri)
    result = run_step("train", train, images.path, completion.path, labels.path, splits.path,
                      model.path, config, checkpoint_dir=checkpoint_dir,
                      tensorboard_dir=[tensorboard.path] + ([live_events] if live_events else []),
                      run_key=model.uri)
    log_metrics(metrics, result)
    model.metadata.update({"framework": "keras", "format": "model.keras + saved_model + serving/1 + model.onnx",
                           "architecture": architecture, "embedding_dim": embedding_dim,
                           "distance": objective_for(config).distance(config),
                           "trained_steps": int(result["steps"]), "start_step": int(result["start_step"])})
    write_training_report(model.path, training_report.path)
    tensorboard.metadata.update({"format": "TensorBoard event files",
                                 "tensorboard_root_folder": live_events or ""})
