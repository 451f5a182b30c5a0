"""pairs.txt parsing and checking, and pair sampling balanced across identities, against loop references."""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import logging
import math
import re

import numpy as np
import pytest

from facenet_kfp import pairs as pairs_module
from facenet_kfp.errors import DownloadError, InputError
from facenet_kfp.pairs import (PAIRS_JSON, PAIRS_TXT, Pair, check_pairs_exist, check_pairs_source, declared_folds,
                               draw_negatives, duplicate_pairs, lfw_file_name, make_pairs, parse_pairs_file,
                               positive_quotas, read_checked_pairs)
from facenet_kfp.shards import ShardWriter

# 2 folds x 3 pairs per class; fields separated by tabs, one line by spaces.
GOOD = """2\t3
Ann\t1\t2
Bob\t1\t3
Cy\t2\t4
Ann\t1\tBob\t2
Bob  3   Cy 1
Cy\t4\tDee\t1
Dee\t1\t2
Ann\t2\t3
Bob\t2\t3
Dee\t2\tAnn\t3
Ann\t1\tCy\t1
Bob\t1\tDee\t2
"""


def write(tmp_path, text, name="pairs.txt"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def lines_of(text):
    return text.splitlines()


def test_parse_well_formed(tmp_path):
    pairs = parse_pairs_file(write(tmp_path, GOOD))
    assert len(pairs) == 12
    assert pairs[0] == Pair("Ann", 1, "Ann", 2, True, 0, 2)
    assert pairs[4] == Pair("Bob", 3, "Cy", 1, False, 0, 6)
    assert pairs[6] == Pair("Dee", 1, "Dee", 2, True, 1, 8)
    assert pairs[11] == Pair("Bob", 1, "Dee", 2, False, 1, 13)
    assert [p.fold for p in pairs] == [0] * 6 + [1] * 6
    assert [p.same for p in pairs] == ([True] * 3 + [False] * 3) * 2
    assert [p.line for p in pairs] == list(range(2, 14))
    assert pairs[3].file1 == "Ann/Ann_0001.jpg" and pairs[3].file2 == "Bob/Bob_0002.jpg"


def test_parse_view1_single_count_and_trailing_blank_lines(tmp_path):
    text = "2\nAnn 1 2\nBob 1 3\nAnn 1 Bob 2\nCy 4 Dee 1\n\n  \n"
    pairs = parse_pairs_file(write(tmp_path, text))
    assert len(pairs) == 4 and {p.fold for p in pairs} == {0}
    assert [p.same for p in pairs] == [True, True, False, False]


def replace_line(text, lineno, new):
    lines = text.splitlines()
    lines[lineno - 1] = new
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("lineno, new, problem", [
    (1, "2 three", "header"),
    (1, "0 3", "header"),
    (1, "2 3 4", "header"),
    (1, "", "header"),
    (3, "Bob\t1", "expected a matched pair"),
    (3, "Bob\t1\tCy\t2", "expected a matched pair"),             # a mismatched line where a matched one belongs
    (5, "Ann\t1\tBob", "expected a mismatched pair"),
    (5, "Bob\t3\tCy\t1\t9", "expected a mismatched pair"),
    (9, "Ann\tx\t3", "integers >= 1"),
    (9, "Ann\t0\t3", "integers >= 1"),
    (9, "Ann\t-1\t3", "integers >= 1"),
    (9, "Ann\t2.0\t3", "integers >= 1"),
    (11, "Dee\t2\tAnn\t0", "integers >= 1"),
    (9, "Ann\t3\t3", "same image twice"),
    (11, "Dee\t2\tDee\t3", "one person twice"),
    (7, "", "expected a mismatched pair"),                      # a blank line inside the file
    (8, "", "expected a matched pair"),
])
def test_parse_malformed_line(tmp_path, lineno, new, problem):
    path = write(tmp_path, replace_line(GOOD, lineno, new))
    with pytest.raises(InputError) as info:
        parse_pairs_file(path)
    message = str(info.value)
    assert message.startswith(f"{path} line {lineno}: ")
    assert problem in message
    assert repr(new) in message


def test_parse_missing_lines(tmp_path):
    # fold 2 lacks its last mismatched pair (wrong count per fold)
    text = "\n".join(GOOD.splitlines()[:-1]) + "\n"
    path = write(tmp_path, text)
    with pytest.raises(InputError, match=re.escape(f"{path} line 13: file ends early") + ".*fold 2 of 2, mismatched pair 3 of 3"):
        parse_pairs_file(path)
    # a fold with only 2 matched pairs: the first mismatched line shows up where a matched one belongs
    lines = GOOD.splitlines()
    del lines[3]
    path = write(tmp_path, "\n".join(lines) + "\n")
    with pytest.raises(InputError, match=re.escape(f"{path} line 4: expected a matched pair")):
        parse_pairs_file(path)


def test_parse_extra_lines(tmp_path):
    path = write(tmp_path, GOOD + "Ann\t1\tBob\t1\n")
    with pytest.raises(InputError, match=re.escape(f"{path} line 14: extra line") + ".*'Ann\\\\t1\\\\tBob\\\\t1'"):
        parse_pairs_file(path)
    # 4 matched pairs in fold 1 where the header says 3
    lines = GOOD.splitlines()
    lines.insert(4, "Dee\t1\t2")
    path = write(tmp_path, "\n".join(lines) + "\n")
    with pytest.raises(InputError, match=re.escape(f"{path} line 5: expected a mismatched pair")):
        parse_pairs_file(path)


def test_parse_empty_and_missing_file(tmp_path):
    with pytest.raises(InputError, match="empty pairs file"):
        parse_pairs_file(write(tmp_path, "\n\n"))
    with pytest.raises(InputError, match="cannot read pairs file"):
        parse_pairs_file(tmp_path / "absent.txt")


def test_lfw_file_name():
    assert lfw_file_name("George_W_Bush", 12) == "George_W_Bush/George_W_Bush_0012.jpg"
    assert lfw_file_name("A", 1234) == "A/A_1234.jpg"
    with pytest.raises(InputError, match="index"):
        lfw_file_name("A", 0)
    with pytest.raises(InputError, match="person name"):
        lfw_file_name("a/b", 1)
    with pytest.raises(InputError, match="person name"):
        lfw_file_name("", 1)


def test_check_pairs_exist(tmp_path):
    pairs = parse_pairs_file(write(tmp_path, GOOD))
    available = {p.file1 for p in pairs} | {p.file2 for p in pairs}
    check_pairs_exist(pairs, available)                       # complete: no error
    gone = {"Cy/Cy_0001.jpg", "Dee/Dee_0002.jpg"}
    with pytest.raises(InputError) as info:
        check_pairs_exist(pairs, available - gone)
    message = str(info.value)
    # Cy_0001 is in the pairs on lines 6 and 12; Dee_0002 on lines 8, 11 and 13
    assert message.startswith("5 of 12 pairs name 2 images that are not in the dataset")
    # Cy keeps images 2 and 4 (index 1 is a gap); Dee keeps image 1 (index 2 is past its images).
    for expected in ("line 6 'Bob  3   Cy 1': Cy/Cy_0001.jpg is not in the dataset (2 image(s) of 'Cy')",
                     "line 8 'Dee\\t1\\t2': Dee/Dee_0002.jpg: index 2 is out of range: the dataset has 1 image(s) "
                     "of 'Dee', highest index 1",
                     "line 11 'Dee\\t2\\tAnn\\t3': Dee/Dee_0002.jpg: index 2 is out of range",
                     "line 12 'Ann\\t1\\tCy\\t1': Cy/Cy_0001.jpg is not in the dataset",
                     "line 13 'Bob\\t1\\tDee\\t2': Dee/Dee_0002.jpg: index 2 is out of range"):
        assert expected in message
    assert "line 2:" not in message
    with pytest.raises(InputError, match=r"^gs://b/pairs\.txt: 5 of 12 pairs .*\(9 images\)"):
        check_pairs_exist(pairs, available - gone, source="gs://b/pairs.txt", dataset_images=9)
    with pytest.raises(InputError, match=re.escape("line 2 'Ann\\t1\\t2': 'Ann' is not in the dataset")):
        check_pairs_exist(pairs, {k for k in available if not k.startswith("Ann/")})


def test_check_pairs_exist_lists_at_most_ten():
    pairs = [Pair(f"P{i}", 1, f"P{i}", 2, True, 0, i + 2) for i in range(25)]
    with pytest.raises(InputError) as info:
        check_pairs_exist(pairs, set())
    message = str(info.value)
    assert message.startswith("25 of 25 pairs name 50 images")
    assert message.count("line ") == 10 and "line 11:" in message and "line 12:" not in message


# --------------------------------------------------------------------------- the check pairs step

# Images of the packed dataset GOOD is checked against: every image GOOD names, and Eve whom it does not.
IMAGES = {"Ann": 3, "Bob": 3, "Cy": 4, "Dee": 2, "Eve": 2}


@pytest.fixture
def dataset(tmp_path):
    """A packed dataset (manifest + shard) of IMAGES, plus one synthetic (completion-style) image of Dee."""
    with ShardWriter(tmp_path / "images") as writer:
        for name, count in IMAGES.items():
            for n in range(1, count + 1):
                writer.add(name, f"{name}/{name}_{n:04d}.jpg", b"\xff\xd8 not decoded")
        writer.add("Dee", "Dee/Dee_0003.jpg", b"\xff\xd8 copy", synthetic=True)
    return tmp_path / "images"


def check(tmp_path, dataset, text, *, name="user-pairs.txt", sha256="", encoding="utf-8"):
    """Run the step on `text` written to a file of the user's; returns (its path as given, summary, out folder)."""
    source = tmp_path / name
    source.write_bytes(text.encode(encoding) if isinstance(text, str) else text)
    out = tmp_path / "out" / "pairs"
    return str(source), check_pairs_source(str(source), sha256, dataset, out), out


def step_error(tmp_path, dataset, text, error=InputError, **kwargs):
    """The error of the step on `text`; nothing is left at its output path."""
    with pytest.raises(error) as info:
        check(tmp_path, dataset, text, **kwargs)
    assert not (tmp_path / "out" / "pairs").exists()
    leftovers = [p.name for p in (tmp_path / "out").iterdir()] if (tmp_path / "out").exists() else []
    assert leftovers == []
    return str(info.value)


def test_check_pairs_writes_the_checked_copy_and_its_counts(tmp_path, dataset):
    source, summary, out = check(tmp_path, dataset, GOOD, sha256=hashlib.sha256(GOOD.encode()).hexdigest())
    assert (out / PAIRS_TXT).read_bytes() == GOOD.encode()
    assert json.loads((out / PAIRS_JSON).read_text()) == summary
    assert {k: summary[k] for k in ("pairs_uri", "pairs", "same_pairs", "different_pairs", "folds",
                                    "pairs_per_fold", "duplicates", "identities", "images", "dataset_images",
                                    "sha256_checked")} == {
        "pairs_uri": source, "pairs": 12, "same_pairs": 6, "different_pairs": 6, "folds": 2, "pairs_per_fold": 3,
        "duplicates": 0, "identities": 4, "images": 11, "dataset_images": 14, "sha256_checked": True}
    assert summary["sha256"] == hashlib.sha256(GOOD.encode()).hexdigest()
    uri, pairs = read_checked_pairs(out)
    assert uri == source and pairs == parse_pairs_file(tmp_path / "user-pairs.txt")
    assert declared_folds(pairs) == 2


def test_check_pairs_without_a_pairs_file_says_so(tmp_path, dataset):
    out = tmp_path / "out" / "pairs"
    summary = check_pairs_source("", "", dataset, out)
    assert summary["pairs_uri"] == "" and summary["pairs"] == 0 and "no pairs file" in summary["note"]
    assert not (out / PAIRS_TXT).exists() and read_checked_pairs(out) == ("", [])
    with pytest.raises(InputError, match="pairs_sha256 is set .* but pairs_uri is empty"):
        check_pairs_source("", "a" * 64, dataset, tmp_path / "other")


def test_missing_pairs_file_names_the_users_path(tmp_path, dataset):
    missing = str(tmp_path / "nowhere" / "pairs.txt")
    with pytest.raises(InputError) as info:
        check_pairs_source(missing, "", dataset, tmp_path / "out" / "pairs")
    assert missing in str(info.value) and "not found" in str(info.value)
    assert not (tmp_path / "out" / "pairs").exists()


@pytest.mark.parametrize("lineno, new, problem", [
    (5, "Ann\t1\tBob", "expected a mismatched pair"),
    (9, "Ann\tone\t3", "integers >= 1"),
    (3, "Bob/x\t1\t3", "may not contain '/'"),
])
def test_malformed_line_names_the_users_uri_and_line(tmp_path, dataset, lineno, new, problem):
    message = step_error(tmp_path, dataset, replace_line(GOOD, lineno, new))
    source = str(tmp_path / "user-pairs.txt")
    assert message.startswith(f"{source} line {lineno}: ") and problem in message and repr(new) in message
    # Not the temporary copy the step downloaded it to.
    assert ".tmp-" not in message and str(tmp_path / "out") not in message


def test_name_not_in_the_archive(tmp_path, dataset):
    message = step_error(tmp_path, dataset, replace_line(GOOD, 11, "Zed\t2\tAnn\t3"))
    source = str(tmp_path / "user-pairs.txt")
    assert message.startswith(f"{source}: 1 of 12 pairs name 1 images that are not in the dataset (14 images)")
    assert "line 11 'Zed\\t2\\tAnn\\t3': 'Zed' is not in the dataset" in message


def test_index_out_of_range(tmp_path, dataset):
    message = step_error(tmp_path, dataset, replace_line(GOOD, 2, "Ann\t1\t7"))
    assert "line 2 'Ann\\t1\\t7': Ann/Ann_0007.jpg: index 7 is out of range: the dataset has 3 image(s) of 'Ann', " \
           "highest index 3" in message
    # A completion copy is not a real image: Dee_0003 exists only as a synthetic row.
    message = step_error(tmp_path, dataset, replace_line(GOOD, 8, "Dee\t1\t3"))
    assert "Dee/Dee_0003.jpg: index 3 is out of range: the dataset has 2 image(s) of 'Dee'" in message


def test_old_mac_line_ends_and_a_blank_uri(tmp_path, dataset):
    source, summary, _ = check(tmp_path, dataset, GOOD.replace("\n", "\r"))
    assert summary["pairs"] == 12
    with pytest.raises(InputError, match="pairs_uri '   ' is blank"):
        check_pairs_source("   ", "", dataset, tmp_path / "blank")


def test_byte_order_mark_and_crlf_are_accepted(tmp_path, dataset):
    text = "\ufeff" + GOOD.replace("\n", "\r\n")
    source, summary, out = check(tmp_path, dataset, text)
    assert summary["pairs"] == 12 and summary["folds"] == 2
    assert (out / PAIRS_TXT).read_bytes() == text.encode()           # kept as fetched
    assert read_checked_pairs(out)[1] == parse_pairs_file(write(tmp_path, GOOD, "plain.txt"))
    # A byte order mark anywhere else is part of a name, and that name is not in the dataset.
    (tmp_path / "mid").mkdir()
    message = step_error(tmp_path / "mid", dataset, replace_line(GOOD, 3, "\ufeffBob\t1\t3"))
    assert "'\\ufeffBob' is not in the dataset" in message and "line 3 " in message


def test_names_are_matched_in_nfc(tmp_path):
    """A name typed decomposed (macOS) is the person extract stored composed."""
    with ShardWriter(tmp_path / "images") as writer:
        for name in ("Jos\u00e9", "Ann"):
            for n in (1, 2):
                writer.add(name, f"{name}/{name}_{n:04d}.jpg", b"x")
    text = "1\nJose\u0301\t1\t2\nJose\u0301\t1\tAnn\t2\n"
    source = write(tmp_path, text)
    summary = check_pairs_source(str(source), "", tmp_path / "images", tmp_path / "out")
    assert summary["pairs"] == 2 and summary["identities"] == 2
    assert read_checked_pairs(tmp_path / "out")[1][0].file1 == "Jos\u00e9/Jos\u00e9_0001.jpg"


def test_duplicate_pairs_are_warned_with_their_count(tmp_path, dataset, caplog):
    text = replace_line(replace_line(GOOD, 3, "Ann\t2\t1"), 12, "Dee\t2\tBob\t1")   # lines 3 and 13 repeat 2 and 12
    with caplog.at_level(logging.WARNING, logger="facenet_kfp.pairs"):
        source, summary, _ = check(tmp_path, dataset, text)
    assert summary["duplicates"] == 2 and summary["duplicate_lines"] == [3, 13] and summary["pairs"] == 12
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1 and warning[0].startswith(f"{source}: 2 duplicate pair(s)") and "line 3" in warning[0]
    assert [p.line for p in duplicate_pairs(parse_pairs_file(write(tmp_path, text, "d.txt")))] == [3, 13]


def test_wrong_checksum_non_utf8_and_oversized_files(tmp_path, dataset, monkeypatch):
    message = step_error(tmp_path, dataset, GOOD, error=DownloadError, sha256="0" * 64)
    assert message.startswith(f"{tmp_path / 'user-pairs.txt'}: sha256 mismatch")
    message = step_error(tmp_path, dataset, GOOD.replace("Cy\t2\t4", "C\xe9\t2\t4"), encoding="latin-1")
    assert message.startswith(f"{tmp_path / 'user-pairs.txt'} line 4: not UTF-8 text")
    monkeypatch.setattr(pairs_module, "MAX_PAIRS_MB", 0.0001)        # 100 bytes
    message = step_error(tmp_path, dataset, GOOD, error=DownloadError)
    assert "a pairs file is at most 0.0001 MB" in message and "max_download_gb (config" not in message


def test_a_gs_uri_is_named_in_errors(tmp_path, dataset, gcs):
    gcs.blob("lfw/pairs.txt").upload_from_string(replace_line(GOOD, 9, "Ann\t3\t3").encode())
    with pytest.raises(InputError) as info:
        check_pairs_source("gs://test-bucket/lfw/pairs.txt", "", dataset, tmp_path / "out" / "pairs")
    assert str(info.value).startswith("gs://test-bucket/lfw/pairs.txt line 9: "
                                      "a matched pair names the same image twice")
    gcs.blob("lfw/good.txt").upload_from_string(GOOD.encode())
    summary = check_pairs_source("gs://test-bucket/lfw/good.txt", "", dataset, tmp_path / "out" / "pairs")
    assert summary["pairs_uri"] == "gs://test-bucket/lfw/good.txt" and summary["pairs"] == 12


def test_checked_copy_that_changed_or_is_not_a_record_is_refused(tmp_path, dataset):
    _, _, out = check(tmp_path, dataset, GOOD)
    (out / PAIRS_TXT).write_text(GOOD.replace("Ann\t1\t2", "Ann\t1\t3"))
    with pytest.raises(InputError, match=r"pairs\.txt: changed since .*user-pairs\.txt was checked"):
        read_checked_pairs(out)
    (out / PAIRS_JSON).write_text("[]")
    with pytest.raises(InputError, match="not a checked-pairs record"):
        read_checked_pairs(out)


def test_check_refuses_to_replace_a_folder_it_did_not_write(tmp_path, dataset):
    out = tmp_path / "out" / "pairs"
    out.mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="refusing to replace it"):
        check_pairs_source(str(write(tmp_path, GOOD)), "", dataset, out)
    assert (out / "notes.txt").read_text() == "mine"


# --------------------------------------------------------------------------- make_pairs

def identities(sizes):
    return {f"id{k:02d}": [f"id{k:02d}/img{j}.jpg" for j in range(n)] for k, n in enumerate(sizes)}


def pairs_of(images, max_positive=1000, max_per_identity=1000, seed=0):
    return make_pairs(images, max_positive=max_positive, max_per_identity=max_per_identity, seed=seed)


def check_pair_set(images, keys, a, b, same):
    """Properties every result must have; returns the set of pairs."""
    owner = {key: name for name, files in images.items() for key in files}
    assert keys == [k for name in sorted(images) for k in sorted(images[name])]
    assert a.dtype == np.int64 and b.dtype == np.int64 and same.dtype == bool
    assert a.shape == b.shape == same.shape
    assert np.all(a < b) and a.min() >= 0 and b.max() < len(keys)
    pairs = set(zip(a.tolist(), b.tolist()))
    assert len(pairs) == a.size                                          # no duplicate pairs
    for i, j, s in zip(a, b, same):
        assert (owner[keys[i]] == owner[keys[j]]) == s                   # labels right, negatives cross identities
    assert same.sum() * 2 == same.size                                   # balanced
    return pairs


def positives_per_identity(images, keys, a, same):
    owner = {key: name for name, files in images.items() for key in files}
    counts = {name: 0 for name in images}
    for i in a[same]:
        counts[owner[keys[i]]] += 1
    return counts


def test_make_pairs_all_positives_when_under_cap():
    images = identities([3, 2, 1, 4])
    keys, a, b, same = pairs_of(images, max_positive=100, max_per_identity=6)
    check_pair_set(images, keys, a, b, same)
    positives = {(int(i), int(j)) for i, j, s in zip(a, b, same) if s}
    start = 0
    expected = set()
    for n in (3, 2, 1, 4):
        expected |= {(start + i, start + j) for i, j in itertools.combinations(range(n), 2)}
        start += n
    assert positives == expected                                         # 3 + 1 + 0 + 6 = 10
    assert same.sum() == 10
    # the order is mixed, so contiguous folds see both kinds
    assert not np.all(same[:10]) and not np.all(~same[10:])


def test_make_pairs_caps_same_person_pairs_per_identity():
    images = identities([30, 20, 4, 3, 2, 1])               # 435, 190, 6, 3, 1, 0 possible
    keys, a, b, same = pairs_of(images, max_per_identity=5)
    check_pair_set(images, keys, a, b, same)
    assert positives_per_identity(images, keys, a, same) == {"id00": 5, "id01": 5, "id02": 5, "id03": 3,
                                                             "id04": 1, "id05": 0}


def reference_quotas(possible, max_per_identity, max_positive):
    """The level c of the water-filling, found by trying every level from the cap down."""
    for c in range(max_per_identity, -1, -1):
        if sum(min(p, c) for p in possible) <= max_positive:
            return c
    raise AssertionError("unreachable")


@pytest.mark.parametrize("seed", range(20))
def test_positive_quotas_against_a_loop(seed):
    rng = np.random.default_rng(seed)
    possible = rng.integers(0, 60, size=rng.integers(2, 30))
    cap, total = int(rng.integers(1, 40)), int(rng.integers(1, 400))
    quota = positive_quotas(possible, cap, total, np.random.default_rng(0))
    c = reference_quotas(possible.tolist(), cap, total)
    capped = np.minimum(possible, cap)
    assert quota.sum() == min(total, capped.sum())
    if capped.sum() <= total:
        np.testing.assert_array_equal(quota, capped)
    else:
        extra = quota - np.minimum(possible, c)
        assert set(extra.tolist()) <= {0, 1}                         # identities differ by at most one pair
        assert np.all(extra[possible <= c] == 0) and np.all(quota <= capped)


def test_make_pairs_overall_cap_lowers_the_per_identity_cap_evenly():
    images = identities([30, 20, 10, 5, 1, 1])               # 435, 190, 45, 10 possible
    first = pairs_of(images, max_positive=25, max_per_identity=10, seed=7)
    check_pair_set(images, *first)
    counts = positives_per_identity(images, first[0], first[1], first[3])
    # 25 over four identities of >= 10 pairs each: 6 or 7 each, not 25 from the largest.
    assert sum(counts.values()) == 25
    assert sorted(counts.values()) == [0, 0, 6, 6, 6, 7]


def test_make_pairs_is_deterministic_and_ignores_input_order():
    images = identities([30, 20, 10, 5, 1, 1])
    first = pairs_of(images, max_positive=50, max_per_identity=20, seed=7)
    again = pairs_of(images, max_positive=50, max_per_identity=20, seed=7)
    other = pairs_of(images, max_positive=50, max_per_identity=20, seed=8)
    check_pair_set(images, *first)
    assert first[0] == again[0]
    for x, y in zip(first[1:], again[1:]):
        np.testing.assert_array_equal(x, y)
    assert first[1].size == 100 and first[3].sum() == 50
    assert set(zip(first[1].tolist(), first[2].tolist())) != set(zip(other[1].tolist(), other[2].tolist()))
    shuffled = {name: list(reversed(files)) for name, files in reversed(list(images.items()))}
    third = pairs_of(shuffled, max_positive=50, max_per_identity=20, seed=7)
    for x, y in zip(first[1:], third[1:]):
        np.testing.assert_array_equal(x, y)


def test_make_pairs_uses_every_negative_when_exactly_enough():
    # 1 identity of 3 (3 positives) + 1 of 1 -> exactly 3 possible negatives
    images = identities([3, 1])
    keys, a, b, same = pairs_of(images, max_positive=10, max_per_identity=10)
    check_pair_set(images, keys, a, b, same)
    assert {(int(i), int(j)) for i, j, s in zip(a, b, same) if not s} == {(0, 3), (1, 3), (2, 3)}


def reference_negatives(sizes, count, rng):
    """The definition, one draw at a time: two distinct identities uniformly, one image of each, no repeats."""
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    chosen = []
    while len(chosen) < count:
        i, j = rng.choice(len(sizes), size=2, replace=False)
        x, y = starts[i] + rng.integers(sizes[i]), starts[j] + rng.integers(sizes[j])
        pair = (min(x, y), max(x, y))
        if pair not in chosen:
            chosen.append(pair)
    return chosen


def identity_pair_counts(pairs, sizes):
    owner = np.repeat(np.arange(len(sizes)), sizes)
    counts = collections.Counter()
    for x, y in pairs:
        counts[(int(owner[x]), int(owner[y]))] += 1
    return counts


@pytest.mark.parametrize("bulk", [False, True])
def test_negatives_follow_the_identity_pair_definition(monkeypatch, bulk):
    """Identity-pair frequencies of draw_negatives agree with the one-at-a-time reference (both code paths)."""
    import facenet_kfp.pairs as pairs_module
    if bulk:
        monkeypatch.setattr(pairs_module, "_ENUMERATE_LIMIT", 10)
    sizes = np.array([12, 1, 3, 1, 2])                       # 10 identity pairs, 1 to 36 image pairs each
    count, runs = 6, 1500
    ours, ref = collections.Counter(), collections.Counter()
    for seed in range(runs):
        a, b = draw_negatives(sizes, count, np.random.default_rng(seed))
        assert len(set(zip(a.tolist(), b.tolist()))) == count
        ours += identity_pair_counts(zip(a, b), sizes)
        ref += identity_pair_counts(reference_negatives(sizes, count, np.random.default_rng(10_000 + seed)), sizes)
    assert set(ours) == set(ref) and len(ours) == 10
    total = count * runs
    for key in ref:
        # Each frequency ~0.1 of 9000 draws: binomial sd ~28 per sample; allow 5 sd of the difference.
        assert abs(ours[key] - ref[key]) < 5 * math.sqrt(2 * total * 0.1), (key, ours[key], ref[key])
    # Spread across identities, not images: the 12-image identity is in ~4 of 10 identity pairs.
    big = sum(v for (i, j), v in ours.items() if 0 in (i, j)) / total
    assert 0.35 < big < 0.45


def test_make_pairs_negatives_are_spread_across_identities():
    # One identity of 100 images and nine of 2: drawn over images, ~90% of negatives would involve the
    # large one; drawn over identity pairs, 2/10 do.
    images = identities([100] + [2] * 9)
    keys, a, b, same = pairs_of(images, max_positive=1000, max_per_identity=10)
    check_pair_set(images, keys, a, b, same)
    big = sorted(images["id00"])
    share = np.mean([keys[i] in big or keys[j] in big for i, j in zip(a[~same], b[~same])])
    assert 0.1 < share < 0.3


def test_make_pairs_bulk_sampling_path(monkeypatch):
    import facenet_kfp.pairs as pairs_module
    monkeypatch.setattr(pairs_module, "_ENUMERATE_LIMIT", 10)
    images = identities([6, 5, 4, 3, 2, 2, 1, 1])
    keys, a, b, same = pairs_of(images, max_positive=20, max_per_identity=5, seed=3)
    check_pair_set(images, keys, a, b, same)
    again = pairs_of(images, max_positive=20, max_per_identity=5, seed=3)
    np.testing.assert_array_equal(a, again[1])


@pytest.mark.parametrize("images, max_positive, max_per_identity, problem", [
    ({"a": ["a/1", "a/2"]}, 10, 10, "at least 2 identities"),
    ({"a": ["a/1"], "b": ["b/1"]}, 10, 10, "no identity among 2 has 2 images"),
    ({"a": ["a/1", "a/2"], "b": []}, 10, 10, "identity 'b' has no images"),
    ({"a": ["x", "a/2"], "b": ["x"]}, 10, 10, "image 'x' is listed twice"),
    ({"a": ["a/1", "a/2", "a/3", "a/4"], "b": ["b/1"]}, 10, 10, "need 6 different-person pairs"),
    ({"a": ["a/1", "a/2"], "b": ["b/1"]}, 0, 10, "max_positive must be an integer >= 1"),
    ({"a": ["a/1", "a/2"], "b": ["b/1"]}, 10, 0, "max_per_identity must be an integer >= 1"),
])
def test_make_pairs_errors(images, max_positive, max_per_identity, problem):
    with pytest.raises(InputError, match=re.escape(problem)):
        pairs_of(images, max_positive=max_positive, max_per_identity=max_per_identity)
