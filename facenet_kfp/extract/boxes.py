"""VGGFace2's loose face boxes: their csv files, read in bounded memory, the square cut around a box.

Also dataset.json's ``layout`` summary, which counts the images cut to their box.
"""

from __future__ import annotations

import collections
import csv
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from facenet_kfp.errors import InputError
from facenet_kfp.extract.archive import _Member, _nfc
from facenet_kfp.codec import MAX_IMAGE_PIXELS, MIN_IMAGE_SIDE

if TYPE_CHECKING:
    from facenet_kfp.extract import _Budget
    from facenet_kfp.extract.images import _Source
    from facenet_kfp.extract.layout import Layout, _Candidate

# One logger for the whole step: log lines name facenet_kfp.extract, whichever module writes them.
log = logging.getLogger(__package__)

# VGGFace2's loose face boxes, one file per split; NAME_ID is "<identity>/<file name without suffix>".
BOX_FILES = {"train": "loose_bb_train.csv", "test": "loose_bb_test.csv"}
BOX_FOLDER = "bb_landmark"
BOX_COLUMNS = ("NAME_ID", "X", "Y", "W", "H")
# Side of the square cut around a loose box, in units of the box's longer side: the 0.3
# extension VGGFace2's authors apply to face boxes "to include the whole head".
BOX_SCALE = 1.3
BOX_JPEG_QUALITY = 95
# A face-box file is streamed line by line; these bound it. VGGFace2's loose_bb_train.csv is
# ~100 MB in lines of ~40 characters.
MAX_BOX_FILE_BYTES = 256 << 20
_MAX_BOX_LINE = 4096
# No accepted image has a side longer than this (codec.MAX_IMAGE_PIXELS over the shortest side).
MAX_BOX_COORDINATE = MAX_IMAGE_PIXELS // MIN_IMAGE_SIDE


# --------------------------------------------------------------------------- face boxes (VGGFace2)

def _box_files(layout: Layout, kept: list[_Member], archive: Path) -> dict[str, _Member]:
    """The loose-box csv of each vggface2 split, found in ``<root>/bb_landmark/`` or ``<root>/``."""
    if layout.name != "vggface2":
        return {}
    found: dict[str, _Member] = {}
    for split, name in BOX_FILES.items():
        places = (layout.root + (BOX_FOLDER, name), layout.root + (name,))
        matches = [member for member in kept if member.parts in places]
        if len({member.parts for member in matches}) > 1:
            raise InputError(f"{archive}: two face-box files for {split}/: "
                             f"{', '.join(sorted(m.name for m in matches))}; keep one")
        if matches:
            found[split] = matches[-1]  # a tar member stored twice: the later one wins, as on extraction
    return found


def square_box(box: tuple[int, int, int, int], width: int, height: int,
               scale: float = BOX_SCALE) -> tuple[int, int, int, int] | None:
    """The cut for a loose face box ``(x, y, w, h)``: ``(left, top, right, bottom)`` pixels, or None.

    The square of side s = round(scale * max(w, h)) centred on the box's centre
    (left = round(x + (w - s) / 2), top = round(y + (h - s) / 2), Python's
    rounding), clipped to the `width` x `height` image; None when nothing of it
    is inside the image. The result is not square where the square was clipped.
    """
    x, y, w, h = box
    side = round(scale * max(w, h))
    left, top = round(x + (w - side) / 2), round(y + (h - side) / 2)
    cut = (max(left, 0), max(top, 0), min(left + side, width), min(top + side, height))
    return cut if cut[0] < cut[2] and cut[1] < cut[3] else None


def _read_boxes(stream, where: str) -> Iterator[tuple[str, tuple[int, int, int, int]]]:
    """(NAME_ID, (x, y, w, h)) of each row of a loose-box csv read from the binary `stream`.

    The file is read a block of lines at a time (`_line_blocks`): memory does not
    grow with it. A line longer than `_MAX_BOX_LINE` characters, a coordinate
    beyond ``±MAX_BOX_COORDINATE`` or any other malformed row raises InputError
    naming the line. NAME_IDs come back in Unicode NFC, as extract names images.
    """
    before = 0          # lines in the blocks already read
    header = None
    try:
        for lines in _line_blocks(stream, where):
            rows = csv.reader(lines)
            if header is None:
                header = next(rows, [])
                if tuple(field.strip() for field in header) != BOX_COLUMNS:
                    raise InputError(f"{where}: header {','.join(header)[:200]!r}, "
                                     f"expected {','.join(BOX_COLUMNS)!r}")
            for row in rows:
                if not row or row == [""]:
                    continue
                try:
                    name_id, x, y, w, h = row
                    box = (int(x), int(y), int(w), int(h))   # int() ignores surrounding blanks
                except ValueError:
                    raise InputError(f"{where}, line {before + rows.line_num}: expected NAME_ID and four "
                                     f"integers X,Y,W,H, got {','.join(row)[:200]!r}") from None
                if min(box) < -MAX_BOX_COORDINATE or max(box) > MAX_BOX_COORDINATE:
                    raise InputError(f"{where}, line {before + rows.line_num}: a box coordinate is out of "
                                     f"range (X, Y, W and H must lie within ±{MAX_BOX_COORDINATE:,}, the "
                                     f"most pixels an accepted image has), got {','.join(row)[:200]!r}")
                name_id = name_id.strip()
                if box[2] < 1 or box[3] < 1 or not name_id:
                    raise InputError(f"{where}, line {before + rows.line_num}: a box needs a NAME_ID and "
                                     f"W, H >= 1, got {','.join(row)!r}")
                yield _nfc(name_id), box
            before += rows.line_num
    except (UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{where}: not a readable csv file ({exc})") from None
    if header is None:
        raise InputError(f"{where}: header '', expected {','.join(BOX_COLUMNS)!r}")


def _line_blocks(stream, where: str, block_bytes: int = 1 << 20) -> Iterator[list[str]]:
    """The UTF-8 text of `stream` (a leading BOM dropped) as lists of whole lines without their
    newline, about `block_bytes` at a time. A line longer than `_MAX_BOX_LINE` raises InputError:
    a file that is one long line would otherwise be held in memory whole."""
    rest = b""
    number = 0          # lines in the blocks already yielded
    encoding = "utf-8-sig"
    while block := stream.read(block_bytes):
        data = rest + block
        cut = data.rfind(b"\n") + 1          # a newline byte is never part of a UTF-8 character
        rest = data[cut:]
        lines = data[:cut].decode(encoding).split("\n")[:-1] if cut else []
        if cut:
            encoding = "utf-8"
        long = len(lines) if len(rest) > _MAX_BOX_LINE else None
        if lines and max(map(len, lines)) > _MAX_BOX_LINE:
            long = next(i for i, line in enumerate(lines) if len(line) > _MAX_BOX_LINE)
        if long is not None:
            raise InputError(f"{where}, line {number + long + 1}: longer than {_MAX_BOX_LINE:,} "
                             f"characters; not a face-box file")
        number += len(lines)
        if lines:
            yield lines
    if rest:
        yield [rest.decode(encoding)]


def _attach_boxes(source: "_Source", archive: Path, box_files: dict[str, _Member],
                  candidates: list[_Candidate], budget: "_Budget") -> tuple[list[_Candidate], int]:
    """`candidates` with the box of each image its split's csv has; also the number of csv rows.

    A row names an image as ``<identity>/<file name without suffix>``; rows of
    images the archive does not hold are ignored, an image given two boxes
    refuses the file. Each file is streamed (`_Source.open`), under the same
    caps as every member: at most `MAX_BOX_FILE_BYTES`, and a zip member's
    inflated size counts against the expansion `budget`.
    """
    index = {(cand.split, cand.file.rsplit(".", 1)[0]): i for i, cand in enumerate(candidates)}
    boxes: dict[int, tuple] = {}
    rows = 0
    for split, member in sorted(box_files.items()):
        where = f"{archive}: {member.name}"
        if member.problem:
            raise InputError(f"{where}: cannot read the face-box file ({member.problem})")
        if member.size > MAX_BOX_FILE_BYTES:
            raise InputError(f"{where}: face-box file of {member.size:,} bytes, more than the limit "
                             f"of {MAX_BOX_FILE_BYTES:,} (VGGFace2's largest is about 100 MB)")
        if source.fmt == "zip":
            budget.spend(member.size, f"the face-box file {member.name}")
        with source.open(member) as stream:
            for name_id, box in _read_boxes(stream, where):
                rows += 1
                i = index.get((split, name_id))
                if i is None:
                    continue
                if i in boxes:
                    raise InputError(f"{where}: {name_id!r} has two boxes; keep one")
                boxes[i] = box
    log.info("%s: %d face boxes in %s, %d of them for images in the archive", archive, rows,
             ", ".join(m.name for m in box_files.values()), len(boxes))
    return [cand._replace(box=boxes[i]) if i in boxes else cand for i, cand in enumerate(candidates)], rows


def _layout_summary(layout: Layout, stored: collections.Counter, candidates: list[_Candidate],
                    box_files: dict[str, _Member], boxes: collections.Counter) -> dict:
    """dataset.json's ``layout``: ``{"name", "root", "evidence"}``; vggface2 adds

    ``"splits": {split: {"identities", "images"}}`` (stored, per split folder)
    and ``"boxes"``: None without a box file, else ``{"files", "rows", "scale",
    "applied", "without_box", "outside_image"}`` (member names, csv rows,
    `BOX_SCALE`, and stored images cut to their box, without a box, and
    with a box that misses the image; the last two are stored uncut).
    `stored` counts the stored images per identity.
    """
    out = {"name": layout.name, "root": layout.root_name, "evidence": layout.evidence}
    if layout.name != "vggface2":
        return out
    split_of = {cand.identity: cand.split for cand in candidates}
    images, identities = collections.Counter(), collections.Counter()
    for name, count in stored.items():
        images[split_of[name]] += count
        identities[split_of[name]] += 1
    out["splits"] = {split: {"identities": identities[split], "images": images[split]}
                     for split in layout.splits}
    out["boxes"] = None if not box_files else {
        "files": sorted(member.name for member in box_files.values()), "rows": boxes["rows"],
        "scale": BOX_SCALE, "applied": boxes["applied"], "without_box": boxes["without_box"],
        "outside_image": boxes["outside_image"]}
    return out
