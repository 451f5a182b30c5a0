"""Planning an extraction: the archive's layout, and which files become candidate images of which identity.

The layout is detected from the file paths (`detect_layout`), with the
evidence that chose it recorded in ``dataset.json``:

- ``lfw``: ``lfw/``, ``lfw-deepfunneled/`` or ``lfw-funneled/`` on top, or
  files named ``<identity>/<identity>_NNNN.<ext>`` (``root/<identity>/<file>``);
- ``casia``: CASIA-WebFace, an image root named ``CASIA-WebFace`` or whose
  identity folders are all 7-digit ids (``CASIA-WebFace/0000045/001.jpg``);
- ``vggface2``: ``train/`` and/or ``test/`` holding ``n<6 digits>`` identity
  folders, possibly below one folder (``vggface2/train/n000002/0001_01.jpg``);
  the splits' identities are disjoint and are merged. With a
  ``loose_bb_<split>.csv`` (in ``bb_landmark/`` or next to the split folders)
  each image is cut to the square of `BOX_SCALE` times its box's longer side
  around the box's centre (`square_box`), clipped to the image;
- ``folders``: any other tree; each folder holding an image file is an
  identity, at any depth below the image root (the folder all identity
  folders share). Two identity folders with the same name refuse the archive.

Every file becomes a candidate ``<identity>/<file>`` or is skipped with a
reason (junk, outside the identity folders, too large, ...).
"""

from __future__ import annotations

import collections
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from facenet_kfp.errors import InputError
from facenet_kfp.extract.archive import _Member, _nfc
from facenet_kfp.extract.boxes import _box_files

# One logger for the whole step: log lines name facenet_kfp.extract, whichever module writes them.
log = logging.getLogger(__package__)

# Top folders of the published LFW variants, preferred when several top folders exist.
KNOWN_ROOTS = ("lfw", "lfw-deepfunneled", "lfw-funneled")
# The layouts `detect_layout` tells apart, as dataset.json names them.
LAYOUTS = ("lfw", "casia", "vggface2", "folders")
CASIA_ROOT = "CASIA-WebFace"
VGGFACE2_SPLITS = ("train", "test")
# A file with one of these suffixes in an identity folder is an image, even when it does not decode.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp")
# No face image is this large (LFW's are ~15 KB); refusing bigger members bounds memory.
MAX_IMAGE_BYTES = 64 << 20
JUNK_NAMES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})
_CASIA_ID = re.compile(r"\d{7}")
_VGGFACE2_ID = re.compile(r"n\d{6}")
_LFW_FILE = re.compile(r"(.+)_\d{4}\.\w+")     # <identity>_NNNN.<ext>
# C0 and C1 control characters: never part of a real file name (C1 appear when latin-1 decodes junk).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class _Candidate(NamedTuple):
    member: _Member
    identity: str
    file: str          # "<identity>/<file name>", the manifest's `file`
    split: str = ""    # vggface2: "train" or "test"
    box: tuple | None = None   # vggface2: the loose face box (x, y, w, h), when its csv has one


# --------------------------------------------------------------------------- planning

def _junk(parts: tuple) -> str:
    """Why a path is OS metadata or a hidden file ("" if it is not)."""
    if "__MACOSX" in parts:
        return "junk: macOS resource fork (__MACOSX)"
    if parts[-1] in JUNK_NAMES:
        return f"junk: {parts[-1]}"
    if any(part.startswith(".") for part in parts):
        return "junk: hidden file or folder"
    return ""


@dataclass(frozen=True)
class Layout:
    """How an archive holds its images, as `detect_layout` found it."""
    name: str                  # one of LAYOUTS
    root: tuple                # the image root's path components; () for the archive's top
    evidence: str              # what chose this layout, in words
    splits: tuple = ()         # vggface2: the split folders between the root and identity folders
    nested: bool = False       # folders: identity folders at any depth below the root

    @property
    def root_name(self) -> str:
        """The root as dataset.json's image_root gives it: "a/b", or "." for the archive's top."""
        return "/".join(self.root) or "."

    def identity_folder(self, parts: tuple, image_folders: set[tuple]) -> tuple | str:
        """The identity folder (path components) holding the file `parts`, or why it is in none.

        `parts` starts with the root; `image_folders` are the folders holding a file
        with an image suffix (what makes a folder an identity in a nested tree).
        """
        r = "/".join(self.root) + "/" if self.root else ""
        depth = len(self.root) + (3 if self.splits else 2)
        if self.splits:
            if len(parts) != depth or parts[len(self.root)] not in self.splits:
                return (f"not inside an identity folder (expected "
                        f"{' or '.join(f'{r}{split}/<identity>/<file>' for split in self.splits)})")
        elif not self.nested:
            if len(parts) != depth:
                return f"not directly inside an identity folder (expected {r}<identity>/<file>)"
        elif len(parts) < depth:
            return f"not inside an identity folder (expected {r}[<folder>/...]<identity>/<file>)"
        elif parts[:-1] not in image_folders:
            return "junk: no file with an image suffix in its folder, so not an identity folder"
        return parts[:-1]


def _where(root: tuple) -> str:
    return f"top folder {root[0]}" if len(root) == 1 else f"folder {'/'.join(root)}" if root \
        else "the archive's top"


def _common_root(images: list[tuple]) -> tuple:
    """The folder all identity folders of a tree share: the longest common prefix of the
    images' folders, less its last part when every image is in that one folder."""
    folders = [parts[:-1] for parts in images]
    prefix = os.path.commonprefix(folders)
    return tuple(prefix[:-1]) if all(folder == prefix for folder in folders) else tuple(prefix)


def detect_layout(paths: list[tuple]) -> Layout:
    """The layout of an archive from its files' path components (junk already removed).

    In order: a published LFW top folder (`KNOWN_ROOTS`) is lfw; ``train/`` or
    ``test/`` folders holding ``n<6 digits>`` folders are vggface2 (their parent
    is the root); otherwise the root is the folder the image files' folders
    share (`_common_root`) and the tree is casia when the root is named
    CASIA-WebFace or every identity folder directly below it is a 7-digit id,
    lfw when every image sits directly in an identity folder and is named
    ``<identity>_NNNN``, else folders (identity folders at any depth).
    Only files with an image suffix decide, or every file when none has one.

    Raises:
        InputError: several LFW top folders, or several VGGFace2 roots.
    """
    tops = {parts[0] for parts in paths if len(parts) >= 2}
    known = [name for name in KNOWN_ROOTS if name in tops]
    if len(known) > 1:
        raise InputError(f"several image roots in one archive: {', '.join(known)}; "
                         f"repack it with one of them")
    if known:
        return Layout("lfw", (known[0],), f"top folder {known[0]}, a published LFW variant")
    images = [parts for parts in paths if parts[-1].lower().endswith(IMAGE_SUFFIXES)] or paths

    vgg: dict[tuple, tuple] = {}   # root -> its first identity folder, as an example
    for parts in images:
        if len(parts) >= 3 and parts[-3] in VGGFACE2_SPLITS and _VGGFACE2_ID.fullmatch(parts[-2]):
            vgg[parts[:-3]] = min(vgg.get(parts[:-3], parts[:-1]), parts[:-1])
    if len(vgg) > 1:
        where = ", ".join(sorted("/".join(root) + "/" if root else "the archive's top" for root in vgg))
        raise InputError(f"several VGGFace2 roots (folders holding train/ or test/) in one "
                         f"archive: {where}; repack it with one of them")
    if vgg:
        (root, example), = vgg.items()
        splits = sorted({parts[len(root)] for parts in images if len(parts) == len(root) + 3
                         and parts[:len(root)] == root and parts[len(root)] in VGGFACE2_SPLITS})
        return Layout("vggface2", root, f"{_where(root)} holds {' and '.join(f'{s}/' for s in splits)} "
                                        f"with n-numbered identity folders (e.g. {'/'.join(example)})",
                      splits=VGGFACE2_SPLITS)

    root = _common_root(images)
    flat = [parts for parts in images if len(parts) == len(root) + 2]
    folders = sorted({parts[-2] for parts in flat})
    named = bool(root) and root[-1].lower() == CASIA_ROOT.lower()
    numbered = bool(folders) and all(_CASIA_ID.fullmatch(name) for name in folders)
    if named or numbered:
        other = next((name for name in folders if not _CASIA_ID.fullmatch(name)), "")
        ids = f"identity folders are not all 7-digit ids (e.g. {other})" if other else \
            "identity folders are 7-digit ids"
        return Layout("casia", root, f"{_where(root)}, {ids}")
    if len(flat) == len(images) and all((match := _LFW_FILE.fullmatch(parts[-1])) and match[1] == parts[-2]
                                        for parts in flat):
        return Layout("lfw", root, f"{_where(root)}, identity folders hold <identity>_NNNN files")
    depths = sorted({len(parts) - len(root) - 1 for parts in images if len(parts) >= len(root) + 2} or {1})
    deepest = max(images, key=len)
    shape = f"directly below {_where(root)}" if depths == [1] else \
        f"{depths[0]} to {depths[-1]} levels below {_where(root)} (e.g. {'/'.join(deepest[:-1])})"
    return Layout("folders", root, f"identity folders (folders holding images) {shape}", nested=True)


def _unstorable(member: _Member, parts: tuple) -> str:
    """Why a file in an identity folder cannot be stored without decoding it ("" if it may be)."""
    if _CONTROL.search(parts[-2]) or _CONTROL.search(parts[-1]):
        return "control character (tab, newline, ...) in the name"
    if member.problem:
        return member.problem
    if member.size > MAX_IMAGE_BYTES:
        return f"too large for an image ({member.size:,} bytes, limit {MAX_IMAGE_BYTES:,})"
    return ""


def _skip(skipped: list[dict], member: str, reason: str) -> None:
    level = logging.INFO if reason.startswith("junk") else logging.WARNING
    log.log(level, "skipping %s: %s", member, reason)
    skipped.append({"member": member, "reason": reason})


def _plan(members: list[_Member], skipped: list[dict], unusable: list[dict], archive: Path,
          max_skipped_fraction: float) -> tuple[Layout, list[_Candidate], dict[str, _Member]]:
    """Detect the layout and choose the candidate images, sorted by identity then file name.

    Returns (layout, candidates, vggface2 face-box files by split). Skipped
    members go to `skipped`; those that are images in an identity folder also to `unusable`,
    and so do images the layout leaves out (outside the image root or outside
    any identity folder: a second dataset, VGGFace2's ``val/``). When those are
    more than `max_skipped_fraction` of the images, the archive is refused
    naming their folders (`_refuse_left_out`). Identity and file names are
    normalised to Unicode NFC; two identity folders whose names are equal
    after that refuse the archive.
    """
    if not members:
        raise InputError(f"{archive}: archive holds no files (only folders)")
    kept = []
    for member in members:
        reason = _junk(member.parts) if member.parts else "empty name"
        if reason:
            _skip(skipped, member.name, reason)
        else:
            kept.append(member)
    if not kept:
        raise InputError(f"{archive}: no identity has a valid image "
                         f"(only {len(skipped)} junk or empty-named files)")
    try:
        layout = detect_layout([member.parts for member in kept])
    except InputError as exc:
        raise InputError(f"{archive}: {exc}") from exc
    root = layout.root
    root_text = "/".join(root) + "/" if root else ""
    box_files = _box_files(layout, kept, archive)
    image_folders = {member.parts[:-1] for member in kept
                     if member.parts[-1].lower().endswith(IMAGE_SUFFIXES)} if layout.nested else set()

    by_file: dict[str, _Candidate] = {}
    folder_of: dict[str, tuple] = {}    # identity -> its folder: two folders may not share a name
    left_out: list[tuple[_Member, str]] = []   # images outside the layout's identity folders
    box_parts = {member.parts for member in box_files.values()}
    for member in kept:
        parts = member.parts
        if parts in box_parts:
            if member not in box_files.values():
                _skip(skipped, member.name, "replaced by a later member with the same name")
            continue
        if parts[:len(root)] != root:
            folder = f"outside the image root {root_text!r}"
        else:
            folder = layout.identity_folder(parts, image_folders)
        if isinstance(folder, str):
            if parts[-1].lower().endswith(IMAGE_SUFFIXES) and not folder.startswith("junk"):
                left_out.append((member, folder))
            else:
                _skip(skipped, member.name, folder)
            continue
        identity = _nfc(folder[-1])
        other = folder_of.setdefault(identity, folder)
        if other != folder:
            _refuse_same_identity(archive, identity, other, folder)
        if reason := _unstorable(member, parts):
            _skip(skipped, member.name, reason)
            if parts[-1].lower().endswith(IMAGE_SUFFIXES):
                unusable.append(skipped[-1])
            continue
        file = f"{identity}/{_nfc(parts[-1])}"
        earlier = by_file.get(file)
        if earlier is not None:
            # Extracting would let the later member overwrite the earlier one: do the same.
            _skip(skipped, earlier.member.name, "replaced by a later member with the same name")
        by_file[file] = _Candidate(member, identity, file, folder[len(root)] if layout.splits else "")
    candidates = sorted(by_file.values(), key=lambda cand: (cand.identity, cand.file))
    images = len(candidates) + len(unusable) + len(left_out)
    if left_out and len(left_out) > max_skipped_fraction * images:
        _refuse_left_out(archive, layout, left_out, images, len(candidates), max_skipped_fraction)
    for member, reason in left_out:
        _skip(skipped, member.name, f"image left out: {reason}")
        unusable.append(skipped[-1])
    if not candidates:
        raise InputError(f"{archive}: no identity has a valid image: no file is inside an identity "
                         f"folder of the {layout.name} layout below {root_text or 'the top'!r} "
                         f"({len(skipped)} files skipped)")
    return layout, candidates, box_files



def _refuse_same_identity(archive: Path, identity: str, one: tuple, other: tuple) -> None:
    """InputError: two identity folders `one` and `other` (path components) both name `identity`."""
    first, second = sorted(("/".join(one), "/".join(other)))
    if one[-1] == other[-1]:
        raise InputError(f"{archive}: two identity folders are both named {identity!r}: "
                         f"{first}/ and {second}/; identities are folder names, so these would "
                         f"merge into one person; rename one of them and repack the archive")
    raise InputError(f"{archive}: two identity folders are both named {identity!r} once their names "
                     f"are in Unicode NFC: {ascii(first + '/')} and {ascii(second + '/')} (the same letters, "
                     f"encoded differently); identities are folder names, so these would be one "
                     f"person under two labels; merge or rename them and repack the archive")


def _left_out_folder(parts: tuple, root: tuple) -> str:
    """The folder to name for an image the layout leaves out: the first folder below where its
    path leaves the image root (``CASIA-WebFace/`` next to ``lfw/``, ``vggface2/val/``)."""
    common = len(os.path.commonprefix([parts[:-1], root]))
    folder = parts[:min(common + 1, len(parts) - 1)]
    return "/".join(folder) + "/" if folder else "the archive's top"


def _refuse_left_out(archive: Path, layout: Layout, left_out: list[tuple[_Member, str]], images: int,
                     used: int, max_fraction: float) -> None:
    """InputError naming the folders whose images the layout would leave out, and the folders it uses."""
    counts = collections.Counter(_left_out_folder(member.parts, layout.root) for member, _ in left_out)
    examples = {}
    for member, _ in left_out:
        examples.setdefault(_left_out_folder(member.parts, layout.root), member.name)
    folders = ", ".join(f"{folder} ({count:,} image{'s' * (count != 1)}, e.g. {examples[folder]})"
                        for folder, count in sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:5])
    if len(counts) > 5:
        folders += f" and {len(counts) - 5} more folders"
    root_text = "/".join(layout.root) + "/" if layout.root else ""
    below = "[<folder>/...]" if layout.nested else ""
    places = " and ".join(f"{root_text}{split}/<identity>/" for split in layout.splits) if layout.splits \
        else f"{root_text}{below}<identity>/"
    raise InputError(
        f"{archive}: {len(left_out):,} of {images:,} images lie outside the identity folders of the "
        f"{layout.name} layout ({places}, {used:,} files) and would be left out, more than "
        f"max_skipped_fraction {max_fraction:g}: {folders}; repack the archive with one dataset in "
        f"one image root, or raise max_skipped_fraction (config "
        f"data.max_skipped_fraction, pipeline parameter max_skipped_fraction, facenet-kfp extract "
        f"--max-skipped-fraction) to leave them out")
