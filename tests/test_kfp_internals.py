"""pipelines.kfp_internals: kfp's private API is used only for the kfp versions pyproject.toml pins."""

import tomllib
from pathlib import Path

import kfp
import pytest
from kfp.local import docker_task_handler
from kfp.local.cache import LocalCache
from kfp.local.orchestrator import task_executor

from facenet_kfp.errors import FacenetError
from pipelines import kfp_internals

ROOT = Path(__file__).resolve().parents[1]


def test_supported_range_is_the_pin_in_pyproject():
    pins = [d for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
            if d.replace(" ", "").startswith("kfp>") or d.replace(" ", "").startswith("kfp<")]
    assert len(pins) == 1
    assert sorted(kfp_internals.supported_kfp().split(",")) == sorted(pins[0].replace(" ", "")[3:].split(","))
    assert kfp_internals.supported_kfp() in (">=2.17,<2.18", "<2.18,>=2.17")


@pytest.mark.parametrize("use", [
    lambda: kfp_internals.observe_local_tasks(lambda *a: None).__enter__(),
    lambda: kfp_internals.replace_docker_run(lambda *a, **k: 0).__enter__(),
    lambda: kfp_internals.image_with_tag("a/b"),
])
def test_another_kfp_version_is_refused_with_its_number(monkeypatch, use):
    monkeypatch.setattr(kfp, "__version__", "2.99.0")
    with pytest.raises(FacenetError, match=r"written for kfp .*2\.18.* but kfp 2\.99\.0 is installed"):
        use()
    assert task_executor.execute_single_task.__module__ == task_executor.__name__   # nothing was patched
    assert docker_task_handler.run_docker_container.__module__ == docker_task_handler.__name__


def test_a_missing_attribute_is_named(monkeypatch):
    monkeypatch.delattr(docker_task_handler, "run_docker_container")
    with pytest.raises(FacenetError, match=r"kfp 2\.17\.\d+ has no .*docker_task_handler\.run_docker_container"):
        kfp_internals.replace_docker_run(lambda *a, **k: 0).__enter__()


def test_patches_are_undone_after_the_block_even_after_an_error():
    originals = task_executor.execute_single_task, LocalCache.get, docker_task_handler.run_docker_container
    with pytest.raises(RuntimeError):
        with kfp_internals.observe_local_tasks(lambda *a: None), kfp_internals.replace_docker_run(lambda *a: 0):
            assert task_executor.execute_single_task is not originals[0]
            assert docker_task_handler.run_docker_container is not originals[2]
            raise RuntimeError("the run failed")
    assert (task_executor.execute_single_task, LocalCache.get, docker_task_handler.run_docker_container) == originals


def test_image_with_tag_is_kfps_rule():
    assert kfp_internals.image_with_tag("registry.example/x") == "registry.example/x:latest"
    assert kfp_internals.image_with_tag("registry.example/x:1.0") == "registry.example/x:1.0"


def test_observed_tasks_report_cache_lookups_before_they_run(tmp_path):
    """A real two-task pipeline run twice: `run()` says cached or not, and `cache_lookup` hears the answer
    inside `run()`, before the task executes (the local run prints a start line for a miss only)."""
    from kfp import dsl, local

    @dsl.component(base_image="python:3.11")
    def add(a: int, b: int) -> int:
        return a + b

    @dsl.pipeline(name="sums")
    def sums():
        add(a=add(a=1, b=2).output, b=3)

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path), enable_caching=True)
    for expected in (False, True):
        events = []

        def wrap(task_name, display_name, run):
            events.append(("start", task_name))
            outputs, failed, cached = run()
            events.append(("end", task_name, failed, cached))

        with kfp_internals.observe_local_tasks(wrap, lambda hit: events.append(("lookup", hit))):
            sums()
        names = [e[1] for e in events if e[0] == "start"]
        assert sorted(names) == ["add", "add-2"]
        for name in names:
            mine = events[events.index(("start", name)):]
            assert mine[1] == ("lookup", expected) and mine[2] == ("end", name, False, expected)
