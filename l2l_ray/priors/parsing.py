"""MLLM grounding answers -> normalised boxes, one parser per model family (pure; never raises).

Coordinate conventions (the reason there is more than one parser):
- ``qwen2-vl``: special tokens ``<|object_ref_start|>label<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>``
  (or the same ``(x1,y1),(x2,y2)`` left after ``skip_special_tokens``), or JSON, relative 0-1000.
- ``qwen2.5-vl``: JSON ``{"bbox_2d": [x1, y1, x2, y2], "point_2d": [x, y], "label": ...}`` in *absolute pixels of
  the resized model input*; mapped back with ``smart_resize`` (the processor's rule, same min/max pixels).
- ``qwen3-vl``: the same JSON keys, relative 0-1000.

    parse_answer('```json\\n[{"bbox_2d": [100, 50, 300, 200], "label": "cat"}]\\n```', "qwen2.5-vl", 640, 480)
    # -> Parsed(status='ok', box=(0.155280, 0.105042, 0.465839, 0.420168), score=1.0, category='cat', ...)
    #    (the 640x480 image is seen as 644x476 by the model: x / 644, y / 476)

What comes back is untrusted: every failure is a status from ``records.NO_PRIOR_REASONS``
(``empty_answer``, ``malformed_json``, ``no_box``, ``box_out_of_range``, ``empty_box``), never an exception.
``score`` is the *parse* confidence (1.0 clean box, lower for salvaged / swapped / point-only answers), not a
model probability.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

FAMILIES = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl")
# smart_resize factor = patch size * spatial merge size of the vision tower
RESIZE_FACTOR = {"qwen2-vl": 28, "qwen2.5-vl": 28, "qwen3-vl": 32}
DEFAULT_MIN_PIXELS = 56 * 56  # Qwen2-VL / Qwen2.5-VL processors' default (3136)
DEFAULT_MAX_PIXELS = 28 * 28 * 1280  # 1003520, the value vLLM's Qwen examples pass

TOLERANCE = 0.02  # normalised slack beyond [0, 1] that is clipped silently
MIN_INSIDE = 0.5  # a box keeping less than this share of its area inside the image is "box_out_of_range"
POINT_BOX_HALF = 0.05  # a point-only answer becomes a box of +-5% of the image side around it
SCORE_SALVAGED, SCORE_SWAPPED, SCORE_POINT = 0.7, 0.8, 0.5

_NUM = r"(-?\d+(?:\.\d+)?)"
_TUPLE_BOX = re.compile(
    rf"(?:<\|box_start\|>)?\s*\(\s*{_NUM}\s*,\s*{_NUM}\s*\)\s*,\s*\(\s*{_NUM}\s*,\s*{_NUM}\s*\)\s*(?:<\|box_end\|>)?"
)
_REF = re.compile(r"<\|object_ref_start\|>(.*?)<\|object_ref_end\|>", re.S)
_FENCE = re.compile(r"```(?:json|JSON)?\s*\n?(.*?)(?:```|$)", re.S)
_SALVAGE_BOX = re.compile(rf'"(?:bbox_2d|bbox|box)"\s*:\s*\[\s*{_NUM}\s*,\s*{_NUM}\s*,\s*{_NUM}\s*,\s*{_NUM}\s*[\],]')
_SALVAGE_POINT = re.compile(rf'"(?:point_2d|point)"\s*:\s*\[\s*{_NUM}\s*,\s*{_NUM}\s*\]')
_SALVAGE_LABEL = re.compile(r'"label"\s*:\s*"([^"]*)"')
_BARE_BOX = re.compile(rf"\[\s*{_NUM}\s*,\s*{_NUM}\s*,\s*{_NUM}\s*,\s*{_NUM}\s*\]")
_INSIDE_VALUE = re.compile(r'("\s*:|,)\s*$')  # text before a value nested in an object or list
_OTHER_SPECIAL = re.compile(r"<\|(?!box_start|box_end|object_ref_start|object_ref_end)[a-z_]+\|>")
_BOX_KEYS = ("bbox_2d", "bbox", "box")
_POINT_KEYS = ("point_2d", "point")


@dataclass(frozen=True)
class Parsed:
    """One parsed answer. ``box``/``points`` are normalised to the original image, x right, y down."""

    status: str
    box: tuple[float, float, float, float] | None = None
    points: tuple[tuple[float, float], ...] = ()
    score: float = 0.0
    category: str = ""
    attributes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = DEFAULT_MIN_PIXELS,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(height, width) of the Qwen-VL model input for an image of ``height`` x ``width``: both multiples of
    ``factor``, pixel count within [min_pixels, max_pixels], aspect ratio kept.

    The rule of ``transformers.models.qwen2_vl.image_processing_qwen2_vl.smart_resize``, restated here because
    importing that module costs seconds and pulls torch into HTTP-only prior actors; ``tests/test_parsing.py``
    checks the two agree.
    """
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio of {width}x{height} exceeds 200")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def parse_answer(text: str | None, family: str, width: int, height: int, *, resized_hw: tuple[int, int] | None = None,
                 min_pixels: int = DEFAULT_MIN_PIXELS, max_pixels: int = DEFAULT_MAX_PIXELS) -> Parsed:
    """Parse one model answer for an image of ``width`` x ``height`` pixels (the original image).

    ``resized_hw``: the (height, width) the model actually saw (qwen2.5-vl only; default: ``smart_resize`` of the
    image with ``min_pixels``/``max_pixels``). Never raises on any text: unexpected failures become
    ``malformed_json``. Only an unknown ``family`` (a config error) raises ``ValueError``.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")
    try:
        return _parse(text or "", family, int(width), int(height), resized_hw, min_pixels, max_pixels)
    except Exception:  # a parser bug must not kill a million-sample run; the reason stays typed
        return Parsed("malformed_json")


def _parse(text, family, width, height, resized_hw, min_pixels, max_pixels) -> Parsed:
    if not text.strip():
        return Parsed("empty_answer")
    objects, salvaged = _candidates(text)
    if not objects:
        looks_json = any(c in text for c in "{[") or "```" in text
        return Parsed("malformed_json" if looks_json else "no_box")
    if family == "qwen2.5-vl" and resized_hw is None:
        resized_hw = smart_resize(height, width, RESIZE_FACTOR[family], min_pixels, max_pixels)
    first_failure = None
    for want in ("box", "point"):  # the first object with a valid box wins; a point only if no box is valid
        for obj in objects:
            res = _from_object(obj, want, family, width, height, resized_hw)
            if res is None:
                continue
            if res.ok:
                return _scaled(res, SCORE_SALVAGED if salvaged else 1.0)
            first_failure = first_failure or res
    return first_failure or Parsed("no_box")


def _scaled(p: Parsed, factor: float) -> Parsed:
    return Parsed(p.status, p.box, p.points, round(p.score * factor, 4), p.category, p.attributes)


def _candidates(text: str) -> tuple[list[dict], bool]:
    """Objects that may hold coordinates, in the model's order, and whether they were salvaged from broken text."""
    tokens = _token_boxes(text)
    if tokens:
        return tokens, False
    clean = _OTHER_SPECIAL.sub("", text)
    for chunk in [m.group(1) for m in _FENCE.finditer(clean)] + [clean]:
        objects = _json_objects(chunk)
        if objects is not None:
            return objects, False
    return _salvage(clean), True


def _token_boxes(text: str) -> list[dict]:
    """Qwen2-VL ``(x1,y1),(x2,y2)`` boxes (0-1000 whatever the family), labelled by the preceding object_ref."""
    out = []
    for m in _TUPLE_BOX.finditer(text):
        refs = _REF.findall(text[: m.start()])
        label = refs[-1] if refs else ""
        out.append({"bbox_2d": [float(g) for g in m.groups()], "label": label, "_scale": 1000.0})
    return out


def _json_objects(chunk: str) -> list[dict] | None:
    """The first JSON value in ``chunk`` that decodes, as a list of dicts; None if nothing decodes."""
    decoder = json.JSONDecoder()
    for m in re.finditer(r"[\[{]", chunk):
        if _INSIDE_VALUE.search(chunk[max(0, m.start() - 64): m.start()]):
            continue  # a value inside a broken outer object: leave it to _salvage, which keeps its key and label
        try:
            value, _ = decoder.raw_decode(chunk, m.start())
        except json.JSONDecodeError:
            continue
        objects = _as_objects(value)
        if objects:
            return objects
    return None


def _as_objects(value) -> list[dict]:
    if isinstance(value, dict):
        for key in ("objects", "results", "detections", "boxes"):
            if isinstance(value.get(key), list):
                return _as_objects(value[key])
        return [value]
    if isinstance(value, list):
        if len(value) == 4 and all(_is_num(v) for v in value):
            return [{"bbox_2d": value}]
        out = []
        for v in value:
            if isinstance(v, dict):
                out.append(v)
            elif isinstance(v, list) and len(v) == 4 and all(_is_num(x) for x in v):
                out.append({"bbox_2d": v})
        return out
    return []


def _salvage(text: str) -> list[dict]:
    """Truncated or broken JSON: keep a box only if all four numbers are complete (followed by ',' or ']')."""
    labels = _SALVAGE_LABEL.findall(text)
    label = labels[0] if labels else ""
    m = _SALVAGE_BOX.search(text)
    if m:
        obj = {"bbox_2d": [float(g) for g in m.groups()], "label": label}
        p = _SALVAGE_POINT.search(text)
        if p:
            obj["point_2d"] = [float(g) for g in p.groups()]
        return [obj]
    p = _SALVAGE_POINT.search(text)
    if p:
        return [{"point_2d": [float(g) for g in p.groups()], "label": label}]
    m = _BARE_BOX.search(text)
    return [{"bbox_2d": [float(g) for g in m.groups()], "label": label}] if m else []


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _get_coords(obj: dict, keys: tuple[str, ...], n: int) -> list[float] | None:
    for key in keys:
        v = obj.get(key)
        if isinstance(v, list) and len(v) == 2 and n == 4 and all(isinstance(p, list) for p in v):
            v = [*v[0], *v[1]]  # [[x1, y1], [x2, y2]]
        if isinstance(v, list) and len(v) == n and all(_is_num(x) for x in v):
            return [float(x) for x in v]
        if v is not None:
            return []  # present but unusable
    return None


def _from_object(obj, want, family, width, height, resized_hw) -> Parsed | None:
    """Parsed for one object, or None when it lacks the wanted coordinates."""
    box = _get_coords(obj, _BOX_KEYS, 4)
    point = _get_coords(obj, _POINT_KEYS, 2)
    sx, sy = _scale(obj, family, resized_hw)
    label, attrs = _words(obj)
    pts: tuple[tuple[float, float], ...] = ()
    if point:
        px, py = point[0] / sx, point[1] / sy
        if -TOLERANCE <= px <= 1 + TOLERANCE and -TOLERANCE <= py <= 1 + TOLERANCE:
            pts = ((_clip(px), _clip(py)),)
    if want == "box":
        if box is None:
            return None
        if not box:
            return Parsed("malformed_json", category=label, attributes=attrs)
        status, nbox, score = check_box((box[0] / sx, box[1] / sy, box[2] / sx, box[3] / sy), width, height)
        return Parsed(status, nbox, pts if nbox else (), score if nbox else 0.0, label, attrs)
    if not point:
        return None if point is None else Parsed("malformed_json", category=label, attributes=attrs)
    if not pts:
        return Parsed("box_out_of_range", category=label, attributes=attrs)
    (px, py), h = pts[0], POINT_BOX_HALF
    pbox = (_clip(px - h), _clip(py - h), _clip(px + h), _clip(py + h))
    return Parsed("ok", pbox, pts, SCORE_POINT, label, attrs)


def _scale(obj: dict, family: str, resized_hw) -> tuple[float, float]:
    """Divisors that turn the family's coordinates into [0, 1] fractions of the image (x, y)."""
    if "_scale" in obj or family in ("qwen2-vl", "qwen3-vl"):
        return 1000.0, 1000.0
    rh, rw = resized_hw
    return float(rw), float(rh)


def _words(obj: dict) -> tuple[str, tuple[str, ...]]:
    label = obj.get("label", "")
    label = " ".join(label.split()).lower()[:64] if isinstance(label, str) else ""
    attrs = obj.get("attributes", ())
    if isinstance(attrs, str):
        attrs = [attrs]
    attrs = tuple(" ".join(a.split()).lower()[:32] for a in attrs if isinstance(a, str) and a.strip())[:8] \
        if isinstance(attrs, (list, tuple)) else ()
    return label, attrs


def _clip(v: float) -> float:
    return min(1.0, max(0.0, v))


def check_box(box: tuple[float, float, float, float], width: int, height: int):
    """Validate a normalised (x1, y1, x2, y2) -> (status, clipped box | None, score).

    Both axes inverted = the two corners listed in reverse order: reordered (score 0.8). One axis inverted is
    not a consistent corner order: ``empty_box``. Beyond ``TOLERANCE`` outside [0, 1], or keeping less than
    half its area inside: ``box_out_of_range``. Narrower than one pixel of the original image: ``empty_box``.
    """
    x1, y1, x2, y2 = box
    if not all(math.isfinite(v) for v in box):
        return "malformed_json", None, 0.0
    score = 1.0
    if x1 > x2 and y1 > y2:
        x1, y1, x2, y2, score = x2, y2, x1, y1, SCORE_SWAPPED
    elif x1 > x2 or y1 > y2:
        return "empty_box", None, 0.0
    if x2 < -TOLERANCE or y2 < -TOLERANCE or x1 > 1 + TOLERANCE or y1 > 1 + TOLERANCE:
        return "box_out_of_range", None, 0.0
    c = (_clip(x1), _clip(y1), _clip(x2), _clip(y2))
    area, inside = (x2 - x1) * (y2 - y1), (c[2] - c[0]) * (c[3] - c[1])
    if area > 0 and inside < MIN_INSIDE * area:
        return "box_out_of_range", None, 0.0
    if (c[2] - c[0]) * width < 1 or (c[3] - c[1]) * height < 1:
        return "empty_box", None, 0.0
    return "ok", tuple(round(v, 6) for v in c), score


# ---- answer -> Prior record (shared by the hf, openai and vllm backends) ------------------------------------------

MAX_RAW_CHARS = 2000  # raw model text kept in the record (and the cache) for auditing


def spatial_words(sentence: str, attributes: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Canonical spatial words (left/right/top/bottom/center) of the sentence and the model's attributes."""
    from l2l_ray.vocab import SPATIAL_WORDS

    words = re.findall(r"[a-z]+", " ".join((sentence, *attributes)).lower())
    return tuple(dict.fromkeys(SPATIAL_WORDS[w] for w in words if w in SPATIAL_WORDS))


def make_prior(req, parsed: Parsed, raw_text: str, backend: str, model: str):
    """``Prior`` for ``req`` (a ``PriorRequest``) from a parsed answer; no proposal yet (see ``attach_proposals``)."""
    from l2l_ray.records import Prior

    ok = parsed.ok
    return Prior(sent_id=req.sent_id, ref_id=req.ref_id, status=parsed.status, box=parsed.box if ok else None,
                 points=parsed.points if ok else (), score=parsed.score if ok else 0.0, category=parsed.category,
                 attributes=parsed.attributes, spatial=spatial_words(req.sentence, parsed.attributes),
                 raw_text=(raw_text or "")[:MAX_RAW_CHARS], backend=backend, model=model)


def failed_prior(req, status: str, message: str, backend: str, model: str):
    """A no-prior record with its reason (``status``) and the error text kept in ``raw_text``."""
    return make_prior(req, Parsed(status), message, backend, model)


def attach_proposals(priors: list, images: list, cfg) -> list:
    """Fill ``proposal`` (uint8 (S, S), S = cfg.proposal_size) of every ok prior from its image (uint8 (H, W, 3)).

    ``images[i]`` may be None (the image was not read): that prior keeps ``proposal=None``. A failure of the
    proposal code for one sample turns that prior into ``image_error`` rather than stopping the batch.
    """
    from l2l_ray.priors.proposals import ProposalParams, soft_proposal

    params = ProposalParams.from_config(cfg)
    for i, (prior, image) in enumerate(zip(priors, images, strict=True)):
        if not prior.ok or image is None:
            continue
        try:
            prior.proposal = soft_proposal(image, prior.box, list(prior.points), cfg.proposal_size, params)
        except Exception as e:  # noqa: BLE001 - counted, reported fallback
            priors[i].status, priors[i].box, priors[i].proposal = "image_error", None, None
            priors[i].raw_text = f"soft proposal failed: {type(e).__name__}: {e}\n{prior.raw_text}"[:MAX_RAW_CHARS]
    return priors
