"""Step 7: train the embedding network, in this task (GPU on a cluster) or as a Kubeflow Trainer TrainJob."""

from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output, TaskConfig


def train_model(images: Input[Dataset], completion: Input[Dataset], labels: Input[Artifact],
                splits: Input[Artifact], architecture: str, image_size: int, crop_fraction: float,
                embedding_dim: int, p: int, k: int, loss: str, margin: float, scale: float, sampling: str,
                squared: bool,
                learning_rate: float, lr_schedule: str, warmup_steps: int, max_steps: int,
                augment: bool, validate_every: int, validation_batches: int,
                checkpoint_every: int, log_every: int, precision: str, seed: int,
                checkpoint_root: str, tensorboard_root: str, train_nodes: int, model: Output[Model],
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
        loss: Training objective: batch_all, batch_hard or semi_hard (triplet
            mining), arcface, cosface or softmax (margin softmax).
        margin: Triplet margin (same units as the distance), ArcFace's additive
            angular margin (radians) or CosFace's additive cosine margin.
        scale: Logit scale s of the margin-softmax objectives.
        sampling: pk (P identities x K images, class-balanced) or uniform
            (P x K images drawn over all images).
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
        train_nodes: 1 (this pipeline trains in this task; compile with
            cluster.train_nodes above 1 for a Kubeflow Trainer TrainJob).
        model: Model folder: model.keras, model.json (how to use it), history.json,
            curves.png and, where TensorFlow is installed, saved_model/, serving/1/
            (TensorFlow Serving) and model.onnx.
        metrics: Final train and validation loss and triplet statistics.
        training_report: Loss and fraction-of-positive-triplet curves.
        tensorboard: TensorBoard event files of the whole run (train and
            validation scalars, learning rate, images/s):
            `tensorboard --logdir <its URI>`.
    """
    arguments = dict(locals())
    import dataclasses

    from facenet_kfp.config import TrainConfig
    from facenet_kfp.errors import InputError
    from facenet_kfp.kfp_io import train_task

    if train_nodes != 1:
        raise InputError(f"cluster.train_nodes={train_nodes}, but this pipeline trains inside its train task: "
                         f"compile it with SET='cluster.train_nodes={train_nodes}' so that the train task launches "
                         f"a Kubeflow Trainer TrainJob")
    settings = {f.name: arguments[f.name] for f in dataclasses.fields(TrainConfig)}
    train_task(images, completion, labels, splits, settings, checkpoint_root, tensorboard_root, model, metrics,
               training_report, tensorboard)


def train_on_trainer(images: Input[Dataset], completion: Input[Dataset], labels: Input[Artifact],
                     splits: Input[Artifact], architecture: str, image_size: int, crop_fraction: float,
                     embedding_dim: int, p: int, k: int, loss: str, margin: float, scale: float, sampling: str,
                squared: bool,
                     learning_rate: float, lr_schedule: str, warmup_steps: int, max_steps: int,
                     augment: bool, validate_every: int, validation_batches: int,
                     checkpoint_every: int, log_every: int, precision: str, seed: int,
                     checkpoint_root: str, tensorboard_root: str, train_nodes: int, train_runtime: str,
                     image: str, task_config: TaskConfig, model: Output[Model], metrics: Output[Metrics],
                     training_report: Output[HTML], tensorboard: Output[Artifact]):
    """Train FaceNet embeddings as a Kubeflow Trainer TrainJob of `train_nodes` JAX processes, one per node.

    The same training as train_model (its arguments mean the same), run by
    `facenet-kfp train` on every node of the TrainJob, which this task
    creates, follows (node 0's log comes into this task's log) and waits for;
    the outputs are train_model's. The task's GPUs, CPU, memory, tolerations,
    node selector and affinity go to each node, not to this task; its volumes
    (cluster.train_volume, where the inputs and outputs travel) and
    environment go to both.

    Args:
        train_nodes: Nodes of the TrainJob (one JAX process each).
        train_runtime: The JAX TrainingRuntime or ClusterTrainingRuntime
            (facenet-kfp-jax from manifests/trainer, or jax-distributed).
        image: The JAX trainer image the nodes run (compiled in).
        task_config: This task's Kubernetes settings, which kfp passes through.
    """
    arguments = dict(locals())
    import dataclasses

    from facenet_kfp.config import TrainConfig
    from facenet_kfp.kfp_io import train_task

    settings = {f.name: arguments[f.name] for f in dataclasses.fields(TrainConfig)}
    train_task(images, completion, labels, splits, settings, checkpoint_root, tensorboard_root, model, metrics,
               training_report, tensorboard,
               trainjob={"nodes": train_nodes, "runtime": train_runtime, "image": image, "task_config": task_config})
