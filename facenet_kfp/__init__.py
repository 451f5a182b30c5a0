"""facenet-kfp: FaceNet embeddings trained with online triplet mining, as a Kubeflow pipeline."""

__version__ = "0.1.0"
