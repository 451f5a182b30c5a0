import pytest

from facenet_kfp.errors import InputError
from facenet_kfp.fsutil import (STEP_MARKER, atomic_dir, atomic_file, check_outputs_apart,
                               check_replaceable, read_json, write_json)


def test_atomic_file_replaces_only_on_success(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_file(target) as handle:
            handle.write(b"half")
            raise RuntimeError("crash")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]
    with atomic_file(target) as handle:
        handle.write(b"new")
    assert target.read_bytes() == b"new"


def test_atomic_dir_swaps_whole_folder(tmp_path):
    target = tmp_path / "artifact"
    target.mkdir()
    (target / "stale.txt").write_text("stale")
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("a")
        assert not (target / "a.txt").exists()
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]
    with pytest.raises(ValueError):
        with atomic_dir(target) as tmp:
            (tmp / "b.txt").write_text("b")
            raise ValueError("crash")
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]


def test_json_round_trip_and_errors(tmp_path):
    write_json(tmp_path / "x.json", {"a": [1, 2]})
    assert read_json(tmp_path / "x.json") == {"a": [1, 2]}
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(InputError, match="bad.json"):
        read_json(tmp_path / "bad.json")
    with pytest.raises(InputError, match="missing.json"):
        read_json(tmp_path / "missing.json")


def _write_step_output(target, step, name="a.txt", text="a"):
    with atomic_dir(target, step=step) as tmp:
        (tmp / name).write_text(text)


def test_atomic_dir_with_step_writes_into_empty_folder_and_replaces_own_output(tmp_path):
    target = tmp_path / "labels"
    target.mkdir()   # KFP creates output folders before the step runs
    _write_step_output(target, "labels")
    assert (target / STEP_MARKER).read_text() == "labels\n"
    _write_step_output(target, "labels", name="b.txt")
    assert sorted(p.name for p in target.iterdir()) == [STEP_MARKER, "b.txt"]
    _write_step_output(tmp_path / "new" / "out", "labels")
    assert (tmp_path / "new" / "out" / "a.txt").is_file()


@pytest.mark.parametrize("make, why", [
    (lambda p: (p.mkdir(), (p / "notes.txt").write_text("mine")), "did not write"),
    (lambda p: p.write_text("mine"), "is a file"),
    (lambda p: _write_step_output(p, "extract"), "output of step 'extract'"),
])
def test_atomic_dir_with_step_refuses_what_the_step_did_not_write(tmp_path, make, why):
    target = tmp_path / "out"
    make(target)
    before = sorted((p.name, p.read_bytes()) for p in target.rglob("*") if p.is_file()) \
        if target.is_dir() else target.read_bytes()
    ran = []
    with pytest.raises(InputError, match=why) as info:
        with atomic_dir(target, step="labels") as tmp:
            ran.append(tmp)
    assert str(target) in str(info.value)
    assert not ran   # refused before any work
    after = sorted((p.name, p.read_bytes()) for p in target.rglob("*") if p.is_file()) \
        if target.is_dir() else target.read_bytes()
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_dir_with_step_refuses_a_symlink(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(InputError, match="symbolic link"):
        check_replaceable(tmp_path / "link", "labels")


@pytest.mark.parametrize("out, why", [
    ("a.tgz", "is the input archive"),
    ("work", "holds the input images"),
    ("work/images/sub", "is inside the input images"),
])
def test_check_outputs_apart_refuses_overlap(tmp_path, out, why):
    (tmp_path / "work" / "images").mkdir(parents=True)
    (tmp_path / "a.tgz").write_bytes(b"x")
    inputs = {"archive": tmp_path / "a.tgz", "images": tmp_path / "work" / "images"}
    with pytest.raises(InputError, match=why):
        check_outputs_apart({"--out": tmp_path / out}, inputs)
    check_outputs_apart({"--out": tmp_path / "work" / "labels"}, inputs)
    check_outputs_apart({"--out": tmp_path / "other"}, {"source": "https://example.com/work"})
    with pytest.raises(InputError, match="is the input source"):
        check_outputs_apart({"--out": tmp_path / "a.tgz"}, {"source": f"file://{tmp_path}/a.tgz"})


def test_check_outputs_apart_resolves_links(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "images")
    with pytest.raises(InputError, match="is inside the input images"):
        check_outputs_apart({"--out": tmp_path / "alias" / "x"}, {"images": tmp_path / "images"})
