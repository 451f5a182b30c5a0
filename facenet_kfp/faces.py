"""Procedural faces: each identity's fixed look, drawn into photos that vary in everything else.

Each identity is a fixed set of facial parameters (face shape, skin, hair,
eyes, brows, nose, mouth, glasses, beard) drawn from its own seeded RNG. Each
image re-draws everything that is *not* identity: pose (rotation, shift, scale,
yaw), expression, lighting, background, clothes, blur and JPEG quality. The
background and clothes never depend on the identity, so a network can only
tell people apart by their faces.
"""

from __future__ import annotations

import functools
import io
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from facenet_kfp.errors import InputError
from facenet_kfp.population import _SEED_IDENTITY, _SEED_IMAGE, _rng

MIN_IMAGE_SIZE = 64
LFW_IMAGE_SIZE = 250
_SUPERSAMPLE = 2                        # faces are drawn at 2x and reduced: anti-aliased edges


# --- faces -----------------------------------------------------------------------------------

_SKIN_ANCHORS = np.array([(255, 226, 204), (241, 196, 160), (224, 170, 125), (198, 134, 90),
                          (160, 100, 62), (120, 74, 46), (84, 52, 34)], dtype=np.float64)
_HAIR_COLOURS = {"black": (24, 20, 20), "dark_brown": (58, 38, 28), "brown": (105, 70, 42),
                 "auburn": (140, 62, 32), "red": (178, 82, 40), "blonde": (222, 190, 118),
                 "ash": (176, 160, 128), "grey": (148, 148, 146), "white": (228, 226, 218)}
_EYE_COLOURS = ((78, 48, 28), (40, 26, 20), (66, 112, 170), (76, 124, 78), (116, 126, 138),
                (128, 96, 48))
_FRAME_COLOURS = ((20, 20, 20), (92, 58, 30), (186, 186, 196), (170, 30, 40), (30, 60, 150))
HAIR_STYLES = ("short", "side_part", "long", "curly", "afro", "bald", "buzz")
BEARDS = ("none", "moustache", "goatee", "full")


@dataclass(frozen=True)
class FaceIdentity:
    """The fixed look of one synthetic person.

    Lengths are pixels of a 250-px image (scaled for other sizes), positions are
    relative to the face centre with y pointing down; colours are RGB 0-255.
    """
    face_rx: float               # half width of the face outline
    face_ry: float               # half height
    squareness: float            # superellipse exponent: 2 = ellipse, 3 = boxy
    chin_taper: float            # narrowing of the lower face towards the chin
    skin: tuple[int, int, int]
    hair_colour: tuple[int, int, int]
    hair_style: str              # one of HAIR_STYLES
    hair_volume: float           # hair thickness beyond the outline
    hairline: float              # hairline height above the centre, fraction of face_ry
    hairline_recede: float       # how much the hairline rises at the temples
    hair_part: float             # hairline tilt (side parting), -1..1
    eye_y: float                 # eye line above the centre, fraction of face_ry
    eye_spacing: float           # eye centre offset from the midline, fraction of face_rx
    eye_w: float                 # eye half width
    eye_h: float                 # eye half height when fully open
    iris_colour: tuple[int, int, int]
    brow_thickness: float
    brow_arch: float             # rise of the brow middle
    brow_tilt: float             # inner end lower (+) or higher (-)
    brow_gap: float              # gap between eye top and brow
    nose_length: float           # eye line to nose base, fraction of face_ry
    nose_width: float
    mouth_width: float           # fraction of face_rx
    lip_thickness: float
    lip_colour: tuple[int, int, int]
    ear_size: float              # fraction of face_ry
    beard: str                   # one of BEARDS
    glasses: tuple[int, int, int] | None   # frame colour; None = no glasses
    glasses_round: bool
    blush: float                 # cheek redness alpha, 0..1
    moles: tuple[tuple[float, float], ...]   # positions (fractions of rx, ry)


def sample_identity(rng: np.random.Generator) -> FaceIdentity:
    """Draw one identity's fixed facial parameters from `rng`."""
    tone = rng.uniform(0, len(_SKIN_ANCHORS) - 1)
    base = int(tone)
    frac = tone - base
    skin = (1 - frac) * _SKIN_ANCHORS[base] + frac * _SKIN_ANCHORS[min(base + 1, len(_SKIN_ANCHORS) - 1)]
    skin = np.clip(skin + rng.normal(0, 9, 3), 0, 255)
    # Darker skin goes with darker hair more often, as in the population LFW samples.
    hair_names = list(_HAIR_COLOURS)
    weights = np.array([3, 3, 2, 1, 0.6, 1.2, 0.8, 1.2, 0.5]) if tone < 2.5 else \
        np.array([6, 3, 1, 0.3, 0.1, 0.1, 0.1, 0.8, 0.4])
    hair_name = hair_names[rng.choice(len(hair_names), p=weights / weights.sum())]
    hair = np.clip(np.array(_HAIR_COLOURS[hair_name]) + rng.normal(0, 14, 3), 0, 255)
    style = HAIR_STYLES[rng.choice(len(HAIR_STYLES), p=[0.26, 0.16, 0.18, 0.1, 0.08, 0.1, 0.12])]
    beard = BEARDS[rng.choice(len(BEARDS), p=[0.62, 0.14, 0.1, 0.14])]
    lip = np.clip(skin * np.array([0.86, 0.58, 0.58]) + np.array([28, 0, 4]), 0, 255)
    glasses = _FRAME_COLOURS[rng.integers(len(_FRAME_COLOURS))] if rng.random() < 0.3 else None
    moles = tuple((float(rng.uniform(-0.6, 0.6)), float(rng.uniform(-0.1, 0.6)))
                  for _ in range(rng.choice(3, p=[0.6, 0.3, 0.1])))
    return FaceIdentity(
        face_rx=float(rng.uniform(42, 58)),
        face_ry=float(rng.uniform(54, 70)),
        squareness=float(rng.uniform(1.9, 3.0)),
        chin_taper=float(rng.uniform(0.0, 0.3)),
        skin=_rgb(skin),
        hair_colour=_rgb(hair),
        hair_style=style,
        hair_volume=float(rng.uniform(4, 16)),
        hairline=float(rng.uniform(0.42, 0.72)),
        hairline_recede=float(rng.uniform(0.0, 0.35)),
        hair_part=float(rng.uniform(-1, 1)),
        eye_y=float(rng.uniform(0.06, 0.22)),
        eye_spacing=float(rng.uniform(0.34, 0.48)),
        eye_w=float(rng.uniform(7.5, 12.5)),
        eye_h=float(rng.uniform(3.2, 5.2)),
        iris_colour=_EYE_COLOURS[rng.integers(len(_EYE_COLOURS))],
        brow_thickness=float(rng.uniform(2.0, 6.0)),
        brow_arch=float(rng.uniform(0.0, 5.0)),
        brow_tilt=float(rng.uniform(-3.0, 3.0)),
        brow_gap=float(rng.uniform(3.0, 8.0)),
        nose_length=float(rng.uniform(0.36, 0.56)),
        nose_width=float(rng.uniform(7.0, 13.0)),
        mouth_width=float(rng.uniform(0.38, 0.62)),
        lip_thickness=float(rng.uniform(2.0, 5.0)),
        lip_colour=_rgb(lip),
        ear_size=float(rng.uniform(0.22, 0.32)),
        beard=beard,
        glasses=glasses,
        glasses_round=bool(rng.random() < 0.5),
        blush=float(rng.uniform(0.0, 0.35)),
        moles=moles,
    )


def identity_params(seed: int, identity_index: int) -> FaceIdentity:
    """The fixed parameters of identity `identity_index` (position in sorted name order)."""
    return sample_identity(_rng(seed, _SEED_IDENTITY, identity_index))


def _rgb(colour: Sequence[float], alpha: int | None = None) -> tuple[int, ...]:
    rgb = tuple(int(round(float(c))) for c in colour[:3])
    return rgb if alpha is None else (*rgb, alpha)


def _mix(a: Sequence[float], b: Sequence[float], t: float) -> tuple[int, ...]:
    """(1 - t) * a + t * b, as an RGB tuple."""
    return _rgb((1 - t) * np.array(a[:3], dtype=np.float64) + t * np.array(b[:3], dtype=np.float64))


def _shade(colour: Sequence[float], factor: float, alpha: int | None = None) -> tuple[int, ...]:
    return _rgb(np.clip(np.array(colour[:3], dtype=np.float64) * factor, 0, 255), alpha)


def _outline(rx: float, ry: float, squareness: float, taper: float, n: int = 72) -> np.ndarray:
    """Face outline, (n, 2) points clockwise from the right: a superellipse narrowed below the centre.

    x = rx * sgn(cos t) |cos t|^(2/p), y = ry * sgn(sin t) |sin t|^(2/p), then
    x *= 1 - taper * (y / ry)^2 for y > 0 (the jaw narrows towards the chin).
    """
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    e = 2.0 / squareness
    x = rx * np.sign(np.cos(t)) * np.abs(np.cos(t)) ** e
    y = ry * np.sign(np.sin(t)) * np.abs(np.sin(t)) ** e
    lower = y > 0
    x[lower] *= 1 - taper * (y[lower] / ry) ** 2
    return np.stack([x, y], axis=1)


@dataclass(frozen=True)
class Variation:
    """Ranges of the per-image, identity-independent variation (lengths in px of a 250 image)."""
    rotation_deg: float = 7.0                  # in-plane rotation, uniform +-
    shift_px: float = 5.0                      # face centre shift per axis, uniform +-
    scale: tuple[float, float] = (0.9, 1.1)    # face scale
    yaw_squash: float = 0.1                    # width x (1 - yaw_squash * |yaw|), yaw in -1..1
    # Lighting is kept moderate: stronger gain and cast swamp skin tone, the most
    # salient identity cue, and cut a small CNN's held-out verification accuracy
    # from ~0.90 to ~0.83 in a test with 120 identities.
    gain: tuple[float, float] = (0.88, 1.12)   # overall brightness factor
    cast_sigma: float = 0.03                   # per-channel colour cast, N(1, sigma)
    gradient: float = 0.2                      # light falloff across the image, up to +-
    contrast: tuple[float, float] = (0.9, 1.1)
    noise_sigma: float = 6.0                   # luminance noise, sigma uniform in [0, this]
    blur_probability: float = 0.3              # Gaussian blur of radius 0.3-1.1 px
    jpeg_quality: tuple[int, int] = (60, 95)   # inclusive


DEFAULT_VARIATION = Variation()


@dataclass(frozen=True)
class _Expression:
    """Per-image, identity-independent variation drawn into the face layer."""
    yaw: float           # -1..1: inner features shift towards the turned side
    smile: float         # -0.4..1: mouth-corner lift
    mouth_open: float    # px
    brow_raise: float    # px
    eye_open: float      # 0..1 of eye_h
    gaze: tuple[float, float]
    clothes: tuple[int, int, int]
    collar: tuple[int, int, int]


def _sample_expression(rng: np.random.Generator) -> _Expression:
    blink = rng.random() < 0.06
    return _Expression(
        yaw=float(rng.uniform(-1, 1)),
        smile=float(rng.uniform(-0.4, 1.0)),
        mouth_open=float(rng.uniform(2, 7)) if rng.random() < 0.25 else 0.0,
        brow_raise=float(rng.uniform(-2, 4)),
        eye_open=float(rng.uniform(0.1, 0.3)) if blink else float(rng.uniform(0.6, 1.0)),
        gaze=(float(rng.uniform(-1.5, 1.5)), float(rng.uniform(-0.8, 0.8))),
        clothes=_rgb(rng.integers(0, 256, 3)),
        collar=_rgb(rng.integers(0, 256, 3)),
    )


def _draw_head(face: FaceIdentity, expr: _Expression, canvas: int) -> Image.Image:
    """The person in canonical pose on a transparent (canvas, canvas) RGBA layer."""
    # Extra rows below, so rotating and shrinking the layer never lifts the bottom edge of
    # the shoulders into view.
    layer = Image.new("RGBA", (canvas, canvas + canvas // 4), (0, 0, 0, 0))
    # Every fill is opaque: drawing a translucent fill onto an RGBA layer replaces the
    # layer's alpha (it does not blend), which would punch holes showing the background.
    draw = ImageDraw.Draw(layer)
    # Canvas px per unit of FaceIdentity lengths: faces are drawn 10% larger than the
    # units say, so the face fills a 60% centre crop about as much as in LFW.
    k = canvas / LFW_IMAGE_SIZE * 1.1
    cx, cy = canvas / 2, canvas / 2 + 6 * k        # LFW faces sit slightly below the centre

    def pts(points) -> list[tuple[float, float]]:
        return [(cx + float(x) * k, cy + float(y) * k) for x, y in points]

    def box(x0, y0, x1, y1) -> list[float]:
        return [cx + x0 * k, cy + y0 * k, cx + x1 * k, cy + y1 * k]

    rx, ry = face.face_rx, face.face_ry
    skin = face.skin
    hair = face.hair_colour
    if face.hair_style == "buzz":
        hair = _mix(hair, skin, 0.45)
    shift = expr.yaw * 0.12 * rx                   # inner features move with head yaw
    outline = _outline(rx, ry, face.squareness, face.chin_taper)

    # Shoulders and neck: clothes are per image so they carry no identity.
    draw.ellipse(box(-118, ry + 28, 118, ry + 170), fill=expr.clothes)
    draw.polygon(pts([(-0.3 * rx, ry + 22), (0, ry + 48), (0.3 * rx, ry + 22)]), fill=expr.collar)
    draw.rectangle(box(-0.42 * rx, 0.3 * ry, 0.42 * rx, ry + 30), fill=_shade(skin, 0.86))
    draw.polygon(pts([(-0.3 * rx, ry + 26), (0, ry + 42), (0.3 * rx, ry + 26)]), fill=_shade(skin, 0.86))

    # Hair behind the head.
    vol = face.hair_volume + (14 if face.hair_style == "afro" else 0)
    if face.hair_style == "long":
        draw.rounded_rectangle(box(-(rx + vol), -0.4 * ry, rx + vol, ry * 1.35), radius=24 * k, fill=hair)
    if face.hair_style != "bald":
        back = _outline(rx + vol, ry + vol, face.squareness, 0.0)
        back[:, 1] -= vol * 0.5
        cut = 0.15 * ry if face.hair_style != "buzz" else -0.2 * ry
        back = back[back[:, 1] <= cut]
        if face.hair_style in ("curly", "afro"):
            for x, y in back[::2]:
                r = vol * 0.9 + 3
                draw.ellipse(box(x - r, y - r, x + r, y + r), fill=hair)
        draw.polygon(pts(back), fill=hair)
    else:
        # A fringe of hair around the back of the head, at ear height only.
        side = _outline(rx + 4, ry + 4, face.squareness, 0.0)
        side = side[(side[:, 1] > -0.4 * ry) & (side[:, 1] < 0.15 * ry)]
        for sign in (-1, 1):
            part = side[side[:, 0] * sign > 0]
            draw.polygon(pts(np.vstack([part, [[0.7 * sign * rx, 0.0]]])), fill=hair)

    # Ears, then the face.
    ear_w, ear_h = 0.2 * rx, face.ear_size * ry
    for sign in (-1, 1):
        ex = sign * (rx * 0.96) - shift * 0.3
        draw.ellipse(box(ex - ear_w, 0.05 * ry - ear_h, ex + ear_w, 0.05 * ry + ear_h), fill=_shade(skin, 0.93))
        draw.ellipse(box(ex - ear_w * 0.45, 0.05 * ry - ear_h * 0.6, ex + ear_w * 0.45, 0.05 * ry + ear_h * 0.6),
                     fill=_shade(skin, 0.78))
    draw.polygon(pts(outline), fill=skin)

    # Hair over the forehead: outline above the temples closed by the hairline curve.
    if face.hair_style not in ("bald",):
        temple = -0.22 * ry
        top = outline[outline[:, 1] < temple]
        # Order left -> over the top -> right so the hairline closes the polygon.
        top = top[np.argsort(np.arctan2(top[:, 1], top[:, 0]))]
        xs = np.linspace(top[-1, 0], top[0, 0], 24)
        line_y = -face.hairline * ry - face.hairline_recede * ry * (xs / rx) ** 2 \
            + face.hair_part * 0.12 * xs
        fringe = np.vstack([top * [1.02, 1.02], np.stack([xs, np.minimum(line_y, temple)], axis=1)])
        if face.hair_style in ("curly", "afro"):
            for x, y in fringe[len(top):][::2]:
                r = 5.0
                draw.ellipse(box(x - r, y - r, x + r, y + r), fill=hair)
        draw.polygon(pts(fringe), fill=hair)

    # Cheeks and moles.
    if face.blush > 0.02:
        for sign in (-1, 1):
            bx = sign * 0.52 * rx + shift
            draw.ellipse(box(bx - 0.2 * rx, 0.12 * ry, bx + 0.2 * rx, 0.34 * ry),
                         fill=_mix(skin, (214, 96, 96), face.blush * 0.5))
    for mx, my in face.moles:
        px, py = mx * rx + shift, my * ry
        draw.ellipse(box(px - 1.6, py - 1.6, px + 1.6, py + 1.6), fill=_shade(skin, 0.45))

    # Beard (under the mouth), drawn semi-opaque so the jaw line shows through.
    eye_line = -face.eye_y * ry
    nose_base = eye_line + face.nose_length * ry
    mouth_y = nose_base + (ry - nose_base) * 0.4
    beard_fill = _mix(hair, skin, 0.12)
    if face.beard == "full":
        # Jaw from the right ear round the chin to the left ear (atan2 runs 0 -> pi for y >= 0),
        # closed by a line over the cheeks and the upper lip.
        jaw = outline[outline[:, 1] >= 0]
        jaw = jaw[np.argsort(np.arctan2(jaw[:, 1], jaw[:, 0]))]
        inner = [(-0.97 * rx, 0.0), (-0.6 * rx, mouth_y - 14), (-0.25 * rx + shift, mouth_y - 10),
                 (0.25 * rx + shift, mouth_y - 10), (0.6 * rx, mouth_y - 14), (0.97 * rx, 0.0)]
        draw.polygon(pts(np.vstack([jaw, np.array(inner)])), fill=beard_fill)
    if face.beard == "goatee":
        draw.ellipse(box(-0.3 * rx + shift, mouth_y + 2, 0.3 * rx + shift, ry + 2), fill=beard_fill)
    if face.beard in ("moustache", "full", "goatee"):
        half = face.mouth_width * rx * 0.55
        draw.polygon(pts([(shift - half, mouth_y - 1), (shift - 0.6 * half, mouth_y - 10),
                          (shift + 0.6 * half, mouth_y - 10), (shift + half, mouth_y - 1),
                          (shift, mouth_y - 5)]), fill=beard_fill)

    # Eyes.
    for sign in (-1, 1):
        ex = sign * face.eye_spacing * rx + shift
        w = face.eye_w * (1 - 0.12 * expr.yaw * sign)
        h = max(face.eye_h * expr.eye_open, 0.6)
        draw.ellipse(box(ex - w - 2, eye_line - face.eye_h - 2, ex + w + 2, eye_line + face.eye_h + 2),
                     fill=_shade(skin, 0.88))            # eye socket shadow
        draw.ellipse(box(ex - w, eye_line - h, ex + w, eye_line + h), fill=(244, 242, 236))
        iris = min(face.eye_h * 0.85, h)
        gx, gy = ex + expr.gaze[0], eye_line + expr.gaze[1] * 0.5
        draw.ellipse(box(gx - iris, gy - iris, gx + iris, gy + iris), fill=face.iris_colour)
        pupil = iris * 0.45
        draw.ellipse(box(gx - pupil, gy - pupil, gx + pupil, gy + pupil), fill=(12, 10, 10))
        lid = [(ex + u * w, eye_line - h * math.sqrt(max(1 - u * u, 0.0))) for u in np.linspace(-1, 1, 9)]
        draw.line(pts(lid), fill=_shade(skin, 0.35), width=max(1, round(1.6 * k)), joint="curve")

        # Brow: a quadratic from the inner to the outer end.
        inner_x, outer_x = ex - sign * 0.55 * w, ex + sign * 1.05 * w
        base_y = eye_line - face.eye_h - face.brow_gap - expr.brow_raise
        brow = []
        for u in np.linspace(0, 1, 7):
            x = inner_x + (outer_x - inner_x) * u
            y = base_y + face.brow_tilt * (1 - u) - face.brow_arch * 4 * u * (1 - u)
            brow.append((x, y))
        draw.line(pts(brow), fill=_shade(hair, 0.85) if face.hair_style != "bald" else _shade(skin, 0.45),
                  width=max(1, round(face.brow_thickness * k)), joint="curve")

    # Nose: a shaded bridge and a base with nostrils; it protrudes, so it moves most with yaw.
    nx = shift * 1.3
    nw = face.nose_width
    draw.line(pts([(nx - 0.2 * nw, eye_line + 4), (nx + 0.25 * nw * (1 if expr.yaw >= 0 else -1), nose_base - 3)]),
              fill=_shade(skin, 0.82), width=max(1, round(1.5 * k)))
    draw.ellipse(box(nx - nw, nose_base - 0.45 * nw, nx + nw, nose_base + 0.25 * nw), fill=_shade(skin, 0.9))
    for sign in (-1, 1):
        ox = nx + sign * 0.42 * nw
        draw.ellipse(box(ox - 0.24 * nw, nose_base - 0.12 * nw, ox + 0.24 * nw, nose_base + 0.12 * nw),
                     fill=_shade(skin, 0.45))

    # Mouth: lips around a midline that curves up at the corners when smiling.
    mx = shift * 1.1
    half = face.mouth_width * rx / 2 * (1 + 0.12 * max(expr.smile, 0))
    u = np.linspace(-1, 1, 17)
    mid = mouth_y - expr.smile * 5 * u ** 2 + expr.smile * 1.5
    bulge = (1 - u ** 2) ** 0.7
    upper = mid - face.lip_thickness * 0.8 * bulge - expr.mouth_open / 2 * bulge
    lower = mid + face.lip_thickness * bulge + expr.mouth_open / 2 * bulge
    xs = mx + u * half
    draw.polygon(pts(np.vstack([np.stack([xs, upper], 1), np.stack([xs, lower], 1)[::-1]])), fill=face.lip_colour)
    if expr.mouth_open > 0:
        top = mid - expr.mouth_open / 2 * bulge
        bottom = mid + expr.mouth_open / 2 * bulge
        draw.polygon(pts(np.vstack([np.stack([xs, top], 1), np.stack([xs, bottom], 1)[::-1]])), fill=(70, 22, 26))
        teeth = top + np.minimum(expr.mouth_open * 0.4, 2.5) * bulge
        draw.polygon(pts(np.vstack([np.stack([xs, top], 1), np.stack([xs, teeth], 1)[::-1]])), fill=(236, 232, 220))
    else:
        draw.line(pts(np.stack([xs, mid], 1)), fill=_shade(face.lip_colour, 0.55), width=max(1, round(1.4 * k)),
                  joint="curve")

    # Glasses last: frames over eyes and brows' lower edge.
    if face.glasses is not None:
        width = max(1, round(2.2 * k))
        rims = []
        for sign in (-1, 1):
            ex = sign * face.eye_spacing * rx + shift
            gw, gh = face.eye_w * 1.45, face.eye_w * 1.05
            rim = box(ex - gw, eye_line - gh, ex + gw, eye_line + gh)
            rims.append((ex - gw, ex + gw))
            if face.glasses_round:
                draw.ellipse(rim, outline=face.glasses, width=width)
            else:
                draw.rounded_rectangle(rim, radius=4 * k, outline=face.glasses, width=width)
            arm_from = ex + sign * gw
            draw.line(pts([(arm_from, eye_line - 2), (sign * rx * 0.98 - shift * 0.3, eye_line + 1)]),
                      fill=face.glasses, width=width)
        draw.line(pts([(rims[0][1], eye_line - 2), (rims[1][0], eye_line - 2)]), fill=face.glasses, width=width)
    return layer


@functools.lru_cache(maxsize=8)
def _unit_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(yy, xx) pixel coordinates scaled to [-0.5, 0.5], float32, shape (size, size)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1) - 0.5
    return yy, xx


def _scene_colour(rng: np.random.Generator) -> np.ndarray:
    """A colour of mostly muted saturation, as walls, curtains and crowds are."""
    lightness = rng.uniform(20, 235)
    hue = rng.uniform(0, 255, 3)
    return np.clip(lightness + rng.uniform(0, 0.5) * (hue - hue.mean()), 0, 255)


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """A random RGB scene, independent of identity: flat, gradient, blotchy or shapes.

    Drawn at a quarter of the size and upscaled: cheap, and soft like the
    out-of-focus backgrounds of press photos.
    """
    small = max(size // 4, 8)
    kind = rng.integers(4)
    c1 = _scene_colour(rng)
    c2 = _scene_colour(rng)
    if kind == 0:
        arr = np.broadcast_to(c1, (small, small, 3))
    elif kind == 1:
        angle = rng.uniform(0, 2 * np.pi)
        yy, xx = _unit_grid(small)
        t = np.clip(xx * np.cos(angle) + yy * np.sin(angle) + 0.5, 0, 1)[..., None]
        arr = (1 - t) * c1 + t * c2
    elif kind == 2:
        cells = int(rng.integers(2, 7))
        grid = np.clip(c1 + rng.normal(0, 45, (cells, cells, 3)), 0, 255).astype(np.uint8)
        arr = np.asarray(Image.fromarray(grid).resize((small, small), Image.BICUBIC))
    else:
        img = Image.new("RGB", (small, small), _rgb(c1))
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(3, 9))):
            x0, y0 = rng.uniform(-0.2, 1.0, 2) * small
            w, h = rng.uniform(0.1, 0.7, 2) * small
            shape = [float(x0), float(y0), float(x0 + w), float(y0 + h)]
            (draw.rectangle if rng.random() < 0.6 else draw.ellipse)(shape, fill=_rgb(_scene_colour(rng)))
        arr = np.asarray(img)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    return img.resize((size, size), Image.BICUBIC if rng.random() < 0.5 else Image.BILINEAR)


def render_face(identity: FaceIdentity, image_rng: np.random.Generator,
                size: int = LFW_IMAGE_SIZE, variation: Variation = DEFAULT_VARIATION) -> Image.Image:
    """One (size, size) RGB photo of `identity`; pose, expression, light and scene come from `image_rng`.

    The ranges of pose (rotation, shift, scale, yaw squash) and lighting (gain,
    colour cast, linear gradient, contrast about the mean, noise, blur) are
    `variation`'s; lengths are for size 250 and scale with `size`.
    """
    if size < MIN_IMAGE_SIZE:
        raise InputError(f"image_size must be >= {MIN_IMAGE_SIZE}, got {size}")
    background = _background(image_rng, size)
    expr = _sample_expression(image_rng)
    canvas = size * _SUPERSAMPLE
    layer = _draw_head(identity, expr, canvas)

    v = variation
    angle = math.radians(image_rng.uniform(-v.rotation_deg, v.rotation_deg))
    scale = image_rng.uniform(*v.scale)
    squash = 1 - v.yaw_squash * abs(expr.yaw)
    shift = image_rng.uniform(-v.shift_px, v.shift_px, 2) * canvas / LFW_IMAGE_SIZE
    # Forward map: out = c + t + R(angle) diag(scale * squash, scale) (in - c); PIL wants the inverse.
    c = canvas / 2
    cos, sin = math.cos(angle), math.sin(angle)
    sx, sy = 1 / (scale * squash), 1 / scale
    a, b, d, e = sx * cos, sx * sin, -sy * sin, sy * cos
    ox, oy = c + float(shift[0]), c + float(shift[1])
    coeffs = (a, b, c - a * ox - b * oy, d, e, c - d * ox - e * oy)
    # NEAREST at 2x then a 2x2 box reduce is 4-sample anti-aliasing; PIL's BILINEAR
    # affine on RGBA is ~25x slower and would dominate the render time.
    layer = layer.transform((canvas, canvas), Image.AFFINE, coeffs, resample=Image.NEAREST)
    layer = layer.reduce(_SUPERSAMPLE)
    background.paste(layer, (0, 0), layer)         # alpha-blends the person over the scene
    arr = np.asarray(background, dtype=np.float32)

    gain = image_rng.uniform(*v.gain)
    cast = np.clip(image_rng.normal(1.0, v.cast_sigma, 3), 0.5, 1.5).astype(np.float32)
    direction = image_rng.uniform(0, 2 * np.pi)
    strength = image_rng.uniform(0, v.gradient)
    contrast = image_rng.uniform(*v.contrast)
    noise = image_rng.standard_normal((size, size, 1), dtype=np.float32) * image_rng.uniform(0, v.noise_sigma)
    yy, xx = _unit_grid(size)
    light = gain * (1 + 2 * strength * (xx * math.cos(direction) + yy * math.sin(direction)))
    # Contrast c about the mean m of the lit image, folded into one pass:
    # (x * light * cast - m) * c + m = x * (light * c) * cast + m * (1 - c).
    # m comes from every 4th pixel: it only sets the pivot, and this is the hot loop.
    mean = float((arr[::4, ::4] * light[::4, ::4, None] * cast).mean())
    arr *= (light * contrast)[..., None]
    arr *= cast
    arr += noise + mean * (1 - contrast)
    np.clip(arr, 0, 255, out=arr)
    image = Image.fromarray(arr.astype(np.uint8), "RGB")
    if image_rng.random() < v.blur_probability:
        image = image.filter(ImageFilter.GaussianBlur(float(image_rng.uniform(0.3, 1.1))))
    return image


def render_jpeg(seed: int, identity_index: int, image_index: int, size: int = LFW_IMAGE_SIZE,
                identity: FaceIdentity | None = None, variation: Variation = DEFAULT_VARIATION) -> bytes:
    """JPEG bytes of image `image_index` (0-based) of identity `identity_index`."""
    rng = _rng(seed, _SEED_IMAGE, identity_index, image_index)
    identity = identity_params(seed, identity_index) if identity is None else identity
    image = render_face(identity, rng, size, variation)
    out = io.BytesIO()
    low, high = variation.jpeg_quality
    image.save(out, format="JPEG", quality=int(rng.integers(low, high + 1)))
    return out.getvalue()


def contact_sheet(seed: int = 0, identities: int = 8, images: int = 8, thumb: int = 125,
                  size: int = LFW_IMAGE_SIZE) -> Image.Image:
    """A grid of rendered faces: one row per identity (0..identities-1), `images` columns.

    Returns an RGB image of (images * thumb, identities * thumb) pixels; for eyeballing
    that faces look like faces and vary sensibly within a row.
    """
    sheet = Image.new("RGB", (images * thumb, identities * thumb))
    for row in range(identities):
        face = identity_params(seed, row)
        for col in range(images):
            image = Image.open(io.BytesIO(render_jpeg(seed, row, col, size, face)))
            sheet.paste(image.resize((thumb, thumb), Image.BILINEAR), (col * thumb, row * thumb))
    return sheet
