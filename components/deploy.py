"""Step 9 (with deploy.enabled): serve the trained model and its evaluated threshold with KServe."""

from kfp.dsl import Artifact, Input, Model, Output


def deploy_model(model: Input[Model], threshold: Input[Artifact], name: str, namespace: str, service_account: str,
                 cpu: str, memory: str, timeout_s: int, image: str, served_model: Output[Model]):
    """Create or replace an InferenceService serving the model with `facenet-kfp serve`; wait until it is ready.

    Args:
        model: Trained model folder from the train step.
        threshold: threshold.json from the evaluate step, evaluated for `model`.
        name: InferenceService name (DNS-1035 label); the served models are name and name-verify.
        namespace: Namespace of the InferenceService (the Kubeflow profile's).
        service_account: ServiceAccount of the predictor, with read access to the artifact store.
        cpu: CPU request and limit of the predictor.
        memory: Memory request and limit of the predictor.
        timeout_s: Seconds to wait for the InferenceService to become ready.
        image: The trainer image the predictor runs (compiled in).
        served_model: The serving bundle (the model folder plus threshold.json) the InferenceService
            loads. Metadata: url, name, namespace, action (created or replaced), storage_uri, image.
    """
    from facenet_kfp.deploy import deploy
    from facenet_kfp.kfp_io import compact_metadata, run_step

    settings = dict(name=name, namespace=namespace, service_account=service_account, cpu=cpu, memory=memory,
                    timeout_s=timeout_s)
    summary = run_step("deploy", deploy, model.path, threshold.path, served_model.path, served_model.uri,
                       settings, image)
    served_model.metadata.update(compact_metadata(summary))
