"""The facenet-kfp pipeline: DAG definition, compiler and local runner entry points."""
