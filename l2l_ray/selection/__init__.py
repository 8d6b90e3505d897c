"""Pseudo-label selection: candidates, rules (baselines), rewards, the RL selector (docs/selection.md).

The one entry the round driver calls for any method:

    pl = select_for_method(cfg.method, cand, cfg, selector_group, explore=True)   # PseudoLabelBatch | None

Importing this package does not import Ray or RLlib; ``l2l_ray.selection.selector`` (SelectorGroup) and
``l2l_ray.selection.agent`` (Selector) do.
"""

from __future__ import annotations

from l2l_ray.config import ConfigError
from l2l_ray.records import PseudoLabelBatch
from l2l_ray.selection.candidates import CANDIDATE_NAMES, CandidateBatch, build_candidates, concat_candidates
from l2l_ray.selection.rewards import Feedback, HeldOutTruth, RewardWeights, credit_map
from l2l_ray.selection.rules import RULES

__all__ = ["CANDIDATE_NAMES", "CandidateBatch", "Feedback", "HeldOutTruth", "RULES", "RewardWeights",
           "build_candidates", "concat_candidates", "credit_map", "select_for_method"]


def select_for_method(method: str, cand: CandidateBatch, cfg, selector_group=None,
                      explore: bool = True) -> PseudoLabelBatch | None:
    """Pseudo-labels for ``cand`` under ``method``; None for ``supervised``.

    l2l uses ``selector_group`` (a SelectorGroup, or an in-process ``Selector``) unless ``cfg.semi.use_rl``
    is false, in which case the fixed rule on the same candidates is used (the no-RL ablation).
    """
    if method == "supervised":
        return None
    if method in ("mean_teacher", "semires"):
        return RULES[method](cand, cfg.semi)
    if method == "l2l":
        if not cfg.semi.use_rl:
            return RULES["fixed_rule"](cand, cfg.semi)
        if selector_group is None:
            raise ValueError("method=l2l with semi.use_rl=true needs a SelectorGroup (or a Selector)")
        out = selector_group.select(cand, explore)
        return out[0] if isinstance(out, tuple) else out
    raise ConfigError(f"method={method!r}: no selection for it; choose supervised, mean_teacher, semires or l2l")
