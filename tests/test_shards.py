import json
import re
import tarfile

import pytest

from facenet_kfp.errors import InputError
from facenet_kfp.fsutil import atomic_dir
from facenet_kfp.shards import ShardReader, ShardWriter, iter_manifest, read_manifest, shard_files


def _write(tmp_path, items, max_bytes):
    out = tmp_path / "ds"
    with atomic_dir(out) as tmp, ShardWriter(tmp, max_shard_bytes=max_bytes) as writer:
        for identity, file, data in items:
            writer.add(identity, file, data, width=1)
    return out


def test_round_trip_and_offsets(tmp_path):
    items = [(f"P{i}", f"P{i}/P{i}_{j:04d}.jpg", bytes([i, j]) * (100 + 37 * j))
             for i in range(5) for j in range(1, 4)]
    items.append(("Ünïcødé_" + "x" * 120, "Ünïcødé_" + "x" * 120 + "/long_0001.jpg", b"long name"))
    out = _write(tmp_path, items, max_bytes=1500)
    rows = read_manifest(out)
    assert len(rows) == len(items)
    assert len(shard_files(out)) > 1
    with ShardReader(out) as reader:
        for (identity, file, data), row in zip(items, rows):
            assert (row["identity"], row["file"], row["synthetic"], row["width"]) == (identity, file, False, 1)
            assert reader.read(row) == data
    # Shards are ordinary tar files: standard tools see the same members and bytes.
    for shard in shard_files(out):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                row = next(r for r in rows if r["file"] == member.name)
                assert tar.extractfile(member).read() == dict((f, d) for _, f, d in items)[member.name]
                assert row["shard"] == f"shards/{shard.name}"


def test_manifest_errors_name_file_and_line(tmp_path):
    out = _write(tmp_path, [("A", "A/A_0001.jpg", b"x")], max_bytes=1 << 20)
    with open(out / "manifest.jsonl", "a") as handle:
        handle.write(json.dumps({"identity": "B", "file": "B/B_0001.jpg"}) + "\n")
    with pytest.raises(InputError, match=r"manifest.jsonl:2: missing key\(s\) synthetic, shard, offset, size"):
        read_manifest(out)
    with pytest.raises(InputError, match="manifest not found"):
        read_manifest(tmp_path / "nowhere")


def test_reader_detects_missing_and_truncated_shards(tmp_path):
    out = _write(tmp_path, [("A", "A/A_0001.jpg", b"x" * 5000)], max_bytes=1 << 20)
    row = read_manifest(out)[0]
    shard = out / row["shard"]
    shard.write_bytes(shard.read_bytes()[:1000])
    with ShardReader(out) as reader, pytest.raises(InputError, match="truncated"):
        reader.read(row)
    shard.unlink()
    with ShardReader(out) as reader, pytest.raises(InputError, match="missing"):
        reader.read(row)


@pytest.mark.parametrize("name", ["A/A_0001.jpg", "x" * 99, "Ann_Lee/Ann_Lee_c0005.jpg"])
def test_fast_header_matches_tarfile_ustar(name):
    from facenet_kfp.shards import _member_header

    reference = tarfile.TarInfo(name)
    reference.size, reference.mode = 123456, 0o644
    assert _member_header(name, 123456) == reference.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")


def test_writer_counts_and_streams_the_manifest(tmp_path):
    items = [(f"P{i % 3}", f"P{i % 3}/P{i % 3}_{i:04d}.jpg", bytes([i]) * 700) for i in range(10)]
    out = tmp_path / "ds"
    with ShardWriter(out, max_shard_bytes=2000) as writer:
        for identity, file, data in items:
            writer.add(identity, file, data)
        assert (out / "manifest.jsonl").is_file()          # open from the start: rows go out as they come
    assert writer.images == 10 and writer.identities == {"P0": 4, "P1": 3, "P2": 3}
    rows = read_manifest(out)
    # The slow, obvious reading: every line parsed on its own.
    assert rows == [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert rows == list(iter_manifest(out)) and len({r["shard"] for r in rows}) == len(shard_files(out)) > 1
    # One string object per shard path, however many rows name it.
    first = [row["shard"] for row in iter_manifest(out) if row["shard"].endswith("00000.tar")]
    assert len(first) > 1 and all(shard is first[0] for shard in first)


def test_iter_manifest_yields_the_rows_before_a_bad_one(tmp_path):
    out = _write(tmp_path, [("A", f"A/A_{i:04d}.jpg", b"x") for i in range(3)], max_bytes=1 << 20)
    line = _append_row(out, offset=-1)
    rows = iter_manifest(out)
    assert [next(rows)["file"] for _ in range(3)] == [f"A/A_{i:04d}.jpg" for i in range(3)]
    with pytest.raises(InputError, match=f"manifest.jsonl:{line}: offset must be an integer >= 0"):
        next(rows)
    with pytest.raises(InputError, match="manifest not found"):
        next(iter_manifest(tmp_path / "nowhere"))


def _append_row(out, **changes) -> int:
    """Append a copy of the first manifest row with `changes`; returns its line number."""
    lines = (out / "manifest.jsonl").read_text().splitlines()
    row = json.loads(lines[0]) | changes
    (out / "manifest.jsonl").write_text("\n".join(lines + [json.dumps(row)]) + "\n")
    return len(lines) + 1


@pytest.mark.parametrize("shard, why", [
    ("../outside.tar", r"a '\.\.' path component"),
    ("shards/../../outside.tar", r"a '\.\.' path component"),
    ("ABSOLUTE", "an absolute path"),
    ("shards/link.tar", "a symbolic link leading to .*outside.tar, outside the dataset folder"),
    ("", "not a file path"),
])
def test_manifest_naming_a_shard_outside_the_dataset_is_refused(tmp_path, shard, why):
    out = _write(tmp_path, [("A", "A/A_0001.jpg", b"inside")], max_bytes=1 << 20)
    outside = tmp_path / "outside.tar"
    outside.write_bytes(b"secret" * 100)
    (out / "shards/link.tar").symlink_to(outside)
    shard = str(outside) if shard == "ABSOLUTE" else shard
    line = _append_row(out, shard=shard, offset=0, size=6)
    with pytest.raises(InputError, match=f"manifest.jsonl:{line}: refusing shard {re.escape(repr(shard))}: {why}"):
        read_manifest(out)
    row = json.loads((out / "manifest.jsonl").read_text().splitlines()[-1])
    with ShardReader(out) as reader, pytest.raises(InputError, match=f"refusing shard .*{why}"):
        reader.read(row)


def test_symlink_inside_the_dataset_is_read(tmp_path):
    out = _write(tmp_path, [("A", "A/A_0001.jpg", b"inside")], max_bytes=1 << 20)
    (out / "shards/alias.tar").symlink_to("images-00000.tar")
    _append_row(out, shard="shards/alias.tar")
    rows = read_manifest(out)
    with ShardReader(out) as reader:
        assert reader.read(rows[1]) == b"inside"


@pytest.mark.parametrize("key, value", [("offset", -1), ("size", "6"), ("size", True), ("offset", 1.5)])
def test_manifest_offsets_and_sizes_are_checked(tmp_path, key, value):
    out = _write(tmp_path, [("A", "A/A_0001.jpg", b"x")], max_bytes=1 << 20)
    line = _append_row(out, **{key: value})
    with pytest.raises(InputError, match=f"manifest.jsonl:{line}: {key} must be an integer >= 0"):
        read_manifest(out)


def test_names_that_are_not_text_are_refused(tmp_path):
    undecoded = b"Zo\xeb".decode("utf-8", "surrogateescape")
    with atomic_dir(tmp_path / "ds") as tmp, ShardWriter(tmp) as writer:
        writer.add("Zoë", "Zoë/Zoë_0001.jpg", b"x")  # any real text is fine
        with pytest.raises(InputError, match=r"identity 'Zo\\udceb' holds bytes that are not text"):
            writer.add(undecoded, f"{undecoded}/{undecoded}_0001.jpg", b"x")
    assert [row["identity"] for row in read_manifest(tmp_path / "ds")] == ["Zoë"]
