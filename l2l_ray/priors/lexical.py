"""The ``lexical`` prior backend: no weights, just the sentence's words and the image's colours and shapes.

    from l2l_ray.priors.base import PriorRequest, build_backend
    backend = build_backend(cfg.priors)               # priors.backend=lexical (the offline default)
    priors = backend([PriorRequest(1, 1, "img.png", 128, 128, "the red circle on the left")])

1. ``parse_sentence``: colour, category, size, position and relation words (``l2l_ray.vocab``), split at
   the first relation phrase into the target ("the red ball") and a landmark ("the blue box").
2. ``ImageRegions`` (``lexical_regions``): every pixel gets its nearest named colour (a Lab lookup
   table), connected regions of one colour become candidate objects with shape features.
3. ``choose``: regions of the named colour are scored by how well their shape fits the named category;
   among the plausible ones a position word picks the extreme one, a size word the biggest/smallest, a
   relation the one placed right w.r.t. the landmark. The region's box and an inside point make the
   prior, ``soft_proposal`` its soft mask.

No region of the named colour: a box from the position words with a low score (counted as a
"fallback" in ``raw_text``), or ``status="no_box"`` when there are none. Empty sentence:
``"empty_sentence"``; unreadable image: ``"image_error"``. Never raises on one bad request.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np

from l2l_ray.config import PriorsConfig
from l2l_ray.priors.base import PriorRequest, register
from l2l_ray.priors.lexical_regions import ImageRegions, Region, load_image
from l2l_ray.priors.proposals import ProposalParams, soft_proposal
from l2l_ray.records import Prior
from l2l_ray.vocab import CATEGORIES, COLOUR_SYNONYMS, COLOURS, SIZE_WORDS, SPATIAL_WORDS

MODEL = "lexical-v1"
# relation phrase -> canonical relation; longest first so "to the left of" wins over "left of"
RELATIONS = (
    ("to the left of", "left"), ("on the left of", "left"), ("left of", "left"),
    ("to the right of", "right"), ("on the right of", "right"), ("right of", "right"),
    ("on top of", "above"), ("above", "above"), ("over", "above"), ("below", "below"), ("under", "below"),
    ("beneath", "below"), ("next to", "near"), ("closest to", "near"), ("nearest to", "near"),
    ("beside", "near"), ("near", "near"), ("by", "near"),
)
# words after a relation that do not name a landmark ("left of the picture" is a position, not a relation)
_NOT_LANDMARK = {"the", "a", "an", "image", "picture", "photo", "frame", "pic", "screen", "side", "it", "them"}
_STOP = {"the", "a", "an", "on", "in", "at", "of", "to", "that", "is", "with", "and", "one", "thing", "side",
         "very", "far", "most", "from", "who", "which", "its", "his", "her", "guy", "first", "second", "third"}
_FALLBACK_BOXES = {"left": (0.0, 0.0, 0.5, 1.0), "right": (0.5, 0.0, 1.0, 1.0), "top": (0.0, 0.0, 1.0, 0.5),
                   "bottom": (0.0, 0.5, 1.0, 1.0), "center": (0.25, 0.25, 0.75, 0.75)}
FALLBACK_SCORE = 0.05


@dataclass(frozen=True)
class Phrase:
    """The words describing one object."""

    colours: tuple[str, ...] = ()
    category: str = ""  # canonical synthetic category (vocab.CATEGORIES key) or ""
    noun: str = ""  # the head noun as written ("ball", "man"), "" if none found
    size: str = ""  # "large" | "small" | ""
    spatial: tuple[str, ...] = ()  # canonical directions: left right top bottom center


@dataclass(frozen=True)
class Parse:
    target: Phrase
    relation: str = ""  # left | right | above | below | near | ""
    landmark: Phrase | None = None

    def describe(self) -> dict:
        d = {k: v for k, v in vars(self.target).items() if v}
        if self.relation:
            d["relation"] = self.relation
            d["landmark"] = {k: v for k, v in vars(self.landmark).items() if v}
        return d


def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


_CATEGORY_WORDS = sorted(((w, c) for c, ws in CATEGORIES.items() for w in ws), key=lambda t: -len(t[0]))


def _phrase(tokens: list[str]) -> Phrase:
    text = " " + " ".join(tokens) + " "
    colours = tuple(dict.fromkeys(COLOUR_SYNONYMS.get(t, t) for t in tokens
                                  if t in COLOURS or t in COLOUR_SYNONYMS))
    category, noun = "", ""
    for word, cat in _CATEGORY_WORDS:  # multi-word synonyms ("round thing") first
        for form in (word, word + "s", word + "es"):
            if f" {form} " in text:
                category, noun = cat, word
                break
        if category:
            break
    size = next((SIZE_WORDS[t] for t in tokens if t in SIZE_WORDS), "")
    spatial = tuple(dict.fromkeys(SPATIAL_WORDS[t] for t in tokens if t in SPATIAL_WORDS))
    if not noun:  # real sentences: the first word that is no cue word ("man in red shirt" -> "man")
        known = set(COLOURS) | set(COLOUR_SYNONYMS) | set(SIZE_WORDS) | set(SPATIAL_WORDS) | _STOP
        noun = next((t for t in tokens if t not in known and len(t) > 1), "")
    return Phrase(colours, category, noun, size, spatial)


def parse_sentence(text: str) -> Parse:
    """Words of a referring sentence -> target phrase, relation and landmark phrase (unknown words are fine)."""
    tokens = _tokens(text)
    joined = " " + " ".join(tokens) + " "
    best = None  # (position in the sentence, phrase, relation)
    for phrase, rel in RELATIONS:
        at = joined.find(f" {phrase} ")
        if at < 0:
            continue
        tail = _tokens(joined[at + len(phrase) + 2:])
        names = [t for t in tail if t not in _NOT_LANDMARK]
        if names and (best is None or at < best[0]):
            best = (at, phrase, rel)
    if best is None:
        return Parse(_phrase(tokens))
    at, phrase, rel = best
    head, tail = _tokens(joined[:at]), _tokens(joined[at + len(phrase) + 2:])
    return Parse(_phrase(head), rel, _phrase(tail))


# ---------------------------------------------------------------------------------------------- choice
def _candidates(regions: ImageRegions, phrase: Phrase) -> list[tuple[Region, float]]:
    """Plausible regions for a phrase with a match score in (0, 1], best first."""
    pool = regions.of_colours(phrase.colours) if phrase.colours else regions.all_regions()
    scored = []
    for r in pool:
        s = r.shape_prob(phrase.category) if phrase.category else r.objectness
        if phrase.category and not phrase.colours:  # any colour: also ask that it look like an object
            s *= r.objectness
        scored.append((r, s))
    if not scored:
        return []
    top = max(s for _, s in scored)
    floor = 0.02 if phrase.category else 0.0  # a named shape nothing resembles: no candidate (-> fallback)
    keep = [(r, s) for r, s in scored if s >= 0.3 * top and s > floor]
    return sorted(keep, key=lambda t: -t[1])


def _rank(values: np.ndarray) -> np.ndarray:
    """Ranks scaled to [0, 1] (1 = largest); a single value gets 1."""
    if len(values) == 1:
        return np.ones(1)
    return np.argsort(np.argsort(values)) / (len(values) - 1)


def _cue_scores(cands: list[Region], phrase: Phrase) -> np.ndarray | None:
    """How well each candidate fits the position and size words, (N,) in [0, k]; None without such words."""
    cx = np.array([r.cx for r in cands])
    cy = np.array([r.cy for r in cands])
    terms = []
    for d in phrase.spatial:
        if d == "center":
            terms.append(-np.abs(cx - np.median(cx)) - 0.5 * np.abs(cy - np.median(cy)) if len(cands) >= 3
                         else -np.hypot(cx - 0.5, cy - 0.5))
        else:
            terms.append({"left": -cx, "right": cx, "top": -cy, "bottom": cy}[d])
    if phrase.size:
        area = np.array([r.area for r in cands])
        terms.append(area if phrase.size == "large" else -area)
    if not terms:
        return None
    return sum(_rank(t) for t in terms)


def _relation_scores(cands: list[Region], rel: str, lm: Region) -> np.ndarray:
    """(N,) how well each candidate stands in ``rel`` to the landmark (higher is better)."""
    out = []
    for r in cands:
        dx, dy = lm.cx - r.cx, lm.cy - r.cy  # from the candidate towards the landmark
        along, cross = {"left": (dx, dy), "right": (-dx, dy), "above": (dy, dx), "below": (-dy, dx),
                        "near": (-np.hypot(dx, dy), 0.0)}[rel]
        out.append(along - 0.5 * abs(cross))
    return np.array(out)


def choose(regions: ImageRegions, parse: Parse) -> tuple[Region | None, float, dict]:
    """The best region for the parse, a confidence in [0, 1] and notes for ``raw_text``."""
    cands = _candidates(regions, parse.target)
    notes: dict = {"candidates": len(cands)}
    if not cands:
        return None, 0.0, notes
    regs = [r for r, _ in cands]
    match = np.array([s for _, s in cands])
    cue = _cue_scores(regs, parse.target)
    lm = None
    if parse.relation and parse.landmark is not None:
        lms = [(r, s) for r, s in _candidates(regions, parse.landmark) if all(r is not c for c in regs)]
        if lms:
            lm = lms[0][0]
            rel = _rank(_relation_scores(regs, parse.relation, lm))
            cue = rel if cue is None else cue + rel
            notes["landmark_box"] = [round(v, 3) for v in lm.box]
    total = match / match.max() + (2.0 * cue if cue is not None else 0.0)
    order = np.argsort(-total)
    best = int(order[0])
    margin = 1.0 if len(regs) == 1 else float(total[best] - total[order[1]]) / max(float(total[best]), 1e-6)
    resolved = len(regs) == 1 or cue is not None
    conf = float(np.clip(0.2 + 0.45 * match[best] + (0.35 * min(1.0, 2 * margin) if resolved else 0.0), 0, 1))
    return regs[best], conf, notes


def fallback_box(spatial: tuple[str, ...]) -> tuple[float, float, float, float] | None:
    """The intersection of the half-image boxes of the position words ("top left" -> top-left quarter)."""
    boxes = [_FALLBACK_BOXES[d] for d in spatial if d in _FALLBACK_BOXES]
    if not boxes:
        return None
    b = np.array(boxes)
    x1, y1, x2, y2 = b[:, 0].max(), b[:, 1].max(), b[:, 2].min(), b[:, 3].min()
    if x2 <= x1 or y2 <= y1:  # contradictory words ("left ... right"): the first one alone
        return boxes[0]
    return (float(x1), float(y1), float(x2), float(y2))


# ---------------------------------------------------------------------------------------------- backend
class LexicalBackend:
    """``PriorBackend``: a batch of requests -> one ``Prior`` each, in order. Images are analysed once per batch."""

    name = "lexical"
    model = MODEL

    def __init__(self, cfg: PriorsConfig | None = None) -> None:
        cfg = cfg or PriorsConfig()
        self.size = cfg.proposal_size
        self.work_size = cfg.lexical_work_size
        self.params = ProposalParams.from_config(cfg)

    def __call__(self, requests: list[PriorRequest]) -> list[Prior]:
        cache: dict[str, ImageRegions | None] = {}
        out = []
        for req in requests:
            if req.image_path not in cache:
                img = load_image(req.image_path, req.width, req.height, self.work_size)
                cache[req.image_path] = ImageRegions(img) if img is not None else None
            out.append(self.one(req, cache[req.image_path]))
        return out

    def _prior(self, req: PriorRequest, status: str, raw: dict, **kw) -> Prior:
        return Prior(sent_id=req.sent_id, ref_id=req.ref_id, status=status, backend=self.name, model=self.model,
                     raw_text=json.dumps(raw, separators=(",", ":")), **kw)

    def one(self, req: PriorRequest, regions: ImageRegions | None) -> Prior:
        """The prior of one request given its analysed image (None = the image could not be read)."""
        if not req.sentence or not _tokens(req.sentence):
            return self._prior(req, "empty_sentence", {"sentence": req.sentence})
        parse = parse_sentence(req.sentence)
        t = parse.target
        words = {"category": t.category or t.noun, "attributes": t.colours + ((t.size,) if t.size else ()),
                 "spatial": t.spatial + ((f"{parse.relation} of",) if parse.relation else ())}
        raw = parse.describe()
        if regions is None:
            return self._prior(req, "image_error", {**raw, "image": req.image_path}, **words)
        region, conf, notes = choose(regions, parse)
        raw.update(notes)
        if region is not None:
            box, points = region.box, (region.point,)
        else:
            box, points, conf = fallback_box(t.spatial), (), FALLBACK_SCORE
            raw["fallback"] = "spatial" if box is not None else "none"
            if box is None:
                return self._prior(req, "no_box", raw, **words)
        raw["box"] = [round(v, 3) for v in box]
        proposal = soft_proposal(regions.image, box, points, self.size, self.params)
        return self._prior(req, "ok", raw, box=box, points=points, score=round(conf, 4), proposal=proposal, **words)


@register("lexical")
def make_lexical(cfg: PriorsConfig) -> LexicalBackend:
    return LexicalBackend(cfg)


__all__ = ["LexicalBackend", "Parse", "Phrase", "choose", "fallback_box", "parse_sentence"]
