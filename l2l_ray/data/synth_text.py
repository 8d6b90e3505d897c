"""Referring expressions for synthetic scenes: sentences that single out one object among 2+ of its kind.

A description is a category word plus cues: an optional colour filter, then one of an absolute position
superlative (left/right/top/bottom/middle among the same-kind objects), a size superlative, or a
relation to a uniquely nameable landmark of another kind ("the red ball left of the blue box"). A cue
set is kept only if it leaves exactly the target, with a clear geometric margin. Pure Python/numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from l2l_ray.vocab import CATEGORIES

POSITION_TEMPLATES = {
    "left": ("left {np}", "{np} on the left", "leftmost {np}", "the {np} on the left", "{np} on the left side"),
    "right": ("right {np}", "{np} on the right", "rightmost {np}", "the {np} on the right", "{np} on the right side"),
    "top": ("top {np}", "{np} at the top", "upper {np}", "highest {np}"),
    "bottom": ("bottom {np}", "{np} at the bottom", "lower {np}", "lowest {np}"),
    "middle": ("middle {np}", "{np} in the middle", "the center {np}"),
}
SIZE_ADJ = {("big", 2): ("bigger", "big", "large"), ("big", 3): ("biggest", "largest", "big"),
            ("small", 2): ("smaller", "small", "little"), ("small", 3): ("smallest", "tiny", "small")}
RELATION_PHRASES = {"left": ("left of", "to the left of"), "right": ("right of", "to the right of"),
                    "above": ("above",), "below": ("below",), "near": ("next to", "near", "beside", "closest to")}
SIZE_RATIO = 1.6  # area ratio for big/small


@dataclass(frozen=True)
class Cue:
    """One way to single out the target: kind in colour|position|size|relation, arg, colour used or not."""

    kind: str
    arg: str = ""
    colour: bool = False
    landmark: int = -1  # object index (relation only)


def _dominant(d: float, other: float, margin: float, ratio: float = 0.5) -> bool:
    """d is a clear step along the axis (>= margin) and at least ``ratio`` times the cross-axis offset."""
    return d >= margin and d >= ratio * abs(other)


def _position_ok(t, others, direction: str, m: float) -> bool:
    if direction == "middle":
        if len(others) != 2:
            return False
        dx = sorted(o.cx - t.cx for o in others)
        return dx[0] <= -m and dx[1] >= m
    ax = {"left": (1, 0), "right": (-1, 0), "top": (0, 1), "bottom": (0, -1)}[direction]
    for o in others:
        d = ax[0] * (o.cx - t.cx) + ax[1] * (o.cy - t.cy)
        cross = (o.cy - t.cy) if ax[0] else (o.cx - t.cx)
        if not _dominant(d, cross, m):
            return False
    return True


def _size_ok(t, others, which: str) -> bool:
    if which == "big":
        return t.area >= SIZE_RATIO * max(o.area for o in others)
    return t.area * SIZE_RATIO <= min(o.area for o in others)


def _relation_holds(o, lm, rel: str, m: float, strict: bool) -> bool:
    dx, dy = lm.cx - o.cx, lm.cy - o.cy  # o's offset seen from o towards the landmark
    d = {"left": (dx, dy), "right": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[rel]
    # "X below Y" should read as below, not beside: a steeper cone than for superlatives among X's kind
    return _dominant(d[0], d[1], m, 0.8) if strict else d[0] > 0 and d[0] >= 0.3 * abs(d[1])


def _relation_ok(t, others, lm, rel: str, m: float, size: int) -> bool:
    if rel == "near":
        dist = lambda o: float(np.hypot(o.cx - lm.cx, o.cy - lm.cy))  # noqa: E731
        return dist(t) <= t.scale + lm.scale + 0.2 * size and dist(t) * 1.8 <= min(dist(o) for o in others)
    return _relation_holds(t, lm, rel, m, True) and not any(_relation_holds(o, lm, rel, m, False) for o in others)


def nameable(j: int, objs) -> bool:
    """Object j can be named uniquely: the only one of its category, or of its category and colour."""
    o = objs[j]
    return sum(p.cat == o.cat and p.colour == o.colour for p in objs) == 1


def landmark_name(j: int, objs, rng: np.random.Generator) -> str:
    """'the blue box', or 'the star' when it is the only star (``nameable(j, objs)`` must hold)."""
    o = objs[j]
    word = str(rng.choice(CATEGORIES[o.cat]))
    if sum(p.cat == o.cat for p in objs) == 1 and rng.random() < 0.5:
        return f"the {word}"
    return f"the {o.colour} {word}"


def _cues_within(t_idx: int, pool: list[int], objs, colour: bool, size: int) -> list[Cue]:
    """Cues (other than colour alone) that leave only the target among ``pool`` (object indices)."""
    t, others = objs[t_idx], [objs[i] for i in pool if i != t_idx]
    m = 0.08 * size
    cues = [Cue("position", d, colour) for d in POSITION_TEMPLATES if _position_ok(t, others, d, m)]
    cues += [Cue("size", w, colour) for w in ("big", "small") if _size_ok(t, others, w)]
    for j, lm in enumerate(objs):
        if lm.cat != t.cat and nameable(j, objs):
            cues += [Cue("relation", r, colour, j) for r in RELATION_PHRASES if _relation_ok(t, others, lm, r, m, size)]
    return cues


def candidate_cues(t_idx: int, objs, size: int) -> list[Cue]:
    """Every cue set that identifies object ``t_idx`` among the objects of its category (needs >= 2 of them)."""
    t = objs[t_idx]
    same = [i for i, o in enumerate(objs) if o.cat == t.cat]
    same_col = [i for i in same if objs[i].colour == t.colour]
    base = _cues_within(t_idx, same, objs, False, size)
    cues = base + [Cue(c.kind, c.arg, True, c.landmark) for c in base]  # redundant colour is fine
    if same_col == [t_idx]:
        cues.append(Cue("colour", "", True))
    elif len(same_col) < len(same):
        cues += [c for c in _cues_within(t_idx, same_col, objs, True, size) if Cue(c.kind, c.arg, False, c.landmark)
                 not in base]
    return cues


def realise(cue: Cue, t_idx: int, objs, rng: np.random.Generator) -> str:
    """One sentence (lower case, no punctuation) for a cue set."""
    t = objs[t_idx]
    n_same = sum(o.cat == t.cat for o in objs) if not cue.colour else \
        sum(o.cat == t.cat and o.colour == t.colour for o in objs)
    noun = str(rng.choice(CATEGORIES[t.cat]))
    np_ = f"{t.colour} {noun}" if cue.colour else noun
    if cue.kind == "colour":
        return str(rng.choice([f"{np_}", f"the {np_}", f"{noun} that is {t.colour}"]))
    if cue.kind == "position":
        return str(rng.choice(POSITION_TEMPLATES[cue.arg])).format(np=np_)
    if cue.kind == "size":
        adj = str(rng.choice(SIZE_ADJ[(cue.arg, min(max(n_same, 2), 3))]))
        return str(rng.choice([f"{adj} {np_}", f"the {adj} {np_}"]))
    lm = landmark_name(cue.landmark, objs, rng)
    rel = str(rng.choice(RELATION_PHRASES[cue.arg]))
    return str(rng.choice([f"{np_} {rel} {lm}", f"the {np_} {rel} {lm}"]))


def describe(t_idx: int, objs, rng: np.random.Generator, size: int, n_sent: int) -> list[tuple[str, Cue]]:
    """Up to ``n_sent`` distinct sentences for the target, each with the cue it uses.

    Cue kinds are visited round-robin in a random order so phrasings differ in kind; colour-only cues come
    last (they make colour priors look better than the data warrants). Empty list: no unique description.
    """
    cues = candidate_cues(t_idx, objs, size)
    if not cues:
        return []
    kinds = [k for k in rng.permutation(["position", "size", "relation"]) if any(c.kind == k for c in cues)]
    kinds += ["colour"] if any(c.kind == "colour" for c in cues) else []
    out: list[tuple[str, Cue]] = []
    for attempt in range(4 * n_sent + 8):
        kind = kinds[attempt % len(kinds)]
        pool = [c for c in cues if c.kind == kind]
        cue = pool[int(rng.integers(len(pool)))]
        sent = realise(cue, t_idx, objs, rng)
        if sent not in {s for s, _ in out}:
            out.append((sent, cue))
        if len(out) == n_sent:
            break
    return out


def raw_form(sent: str, rng: np.random.Generator) -> str:
    """A REFER-like 'raw' string: sometimes capitalised, sometimes with a final period."""
    raw = sent[0].upper() + sent[1:] if rng.random() < 0.3 else sent
    return raw + "." if rng.random() < 0.2 else raw
