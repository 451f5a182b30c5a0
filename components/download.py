"""Step 1: fetch the dataset archive and verify its sha256."""

from kfp.dsl import Dataset, Output


def download_archive(source_uri: str, sha256: str, max_download_gb: float, archive: Output[Dataset]):
    """Download the dataset archive (LFW's lfw.tgz by default) and verify it.

    Args:
        source_uri: https://, http://, gs://, file:// URI or local path of the archive.
        sha256: Expected sha256 (64 hex digits); empty to skip the check.
        max_download_gb: The step fails past this many GB (10**9 bytes) received.
        archive: The verified archive file. Metadata: source, size, sha256.
    """
    from facenet_kfp.download import download
    from facenet_kfp.kfp_io import run_step

    result = run_step("download", download, source_uri, archive.path, sha256,
                      max_download_gb=max_download_gb)
    archive.metadata.update(result.metadata())
