"""``Selector``: the selection policy (an RLlib TorchRLModule) and its optimizer, as a plain class (no Ray).

    sel = Selector(cfg.semi, size=128, seed=0)
    sel.practice(cand_heldout, truth_heldout)          # REINFORCE on held-out LABELED pairs (truth reward)
    pl, record = sel.select(cand_unlabeled, explore=True)
    ...student update...
    sel.feedback(Feedback(sent_ids, post_probs, align))   # rewards of ``record`` -> policy update

Update rule (docs/selection.md): REINFORCE with a learned value baseline (PPO-clipped when a batch is
reused for several epochs; at one epoch the clipped surrogate equals REINFORCE) for the candidate head,
plus an entropy bonus; the per-pixel trust head maximises the expected pixel reward sigmoid(l) * r_trust
(the exact gradient of each pixel's Bernoulli bandit, since "ignore" is paid 0 by definition).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os

import numpy as np
import torch
from ray.rllib.core.columns import Columns

from l2l_ray.io import atomic_write_bytes
from l2l_ray.masks import dequantize, pack_bits
from l2l_ray.records import PseudoLabelBatch
from l2l_ray.selection.candidates import CANDIDATE_NAMES, REJECT, CandidateBatch
from l2l_ray.selection.episodes import ActionRecord, Rewards, candidate_reward_table, chosen_labels, compute_rewards
from l2l_ray.selection.policy import make_obs, policy_spec
from l2l_ray.selection.rewards import Feedback, HeldOutTruth, RewardWeights, iou, pixel_trust_reward
from l2l_ray.selection.rules import selection_stats

_CHUNK = 128
_CLIP = 0.2
_PROPOSAL = CANDIDATE_NAMES.index("proposal")


class Selector:
    """Policy + Adam optimizer + the pending (candidates, actions) of the last exploratory selection."""

    def __init__(self, semi, size: int, seed: int = 0):
        self.semi, self.size = semi, size
        torch.manual_seed(seed)  # initial weights
        # Own random streams (torch for action sampling, numpy for minibatches), saved in checkpoints; the
        # process-global torch RNG is left alone (see _own_rng).
        self.torch_rng = torch.Generator().manual_seed(seed).get_state()
        self.rng = np.random.default_rng(seed)
        self.module = policy_spec(size, semi.selector_pixel_stride, semi.selector_hidden).build()
        self.opt = torch.optim.Adam(self.module.parameters(), lr=semi.selector_lr)
        self.weights = RewardWeights.from_config(semi)
        self.n_select = 0
        self.n_updates = 0
        self._pending: tuple[CandidateBatch, ActionRecord] | None = None

    # --- acting -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _own_rng(self):
        """Sample from this selector's torch stream (RLlib's exploration samples from the global RNG)."""
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self.torch_rng)
            yield
            self.torch_rng = torch.get_rng_state()

    @torch.no_grad()
    def act(self, cand: CandidateBatch, explore: bool) -> ActionRecord:
        """Choose a candidate and per-pixel trust for every pair (sampled if ``explore``, else greedy)."""
        self.module.eval()
        choice, logp, labels, trusts, sampled = [], [], [], [], []
        for a in range(0, len(cand), _CHUNK):
            obs = make_obs(cand, slice(a, a + _CHUNK))
            out = self.module.forward_inference({Columns.OBS: obs})
            c, trust = out[Columns.ACTIONS]["cand"], out[Columns.ACTIONS]["trust"]
            lp = out[Columns.ACTION_LOGP]
            if explore:  # a share of the pairs act by a sample of the policy (they are what the update learns
                #          from); the rest act greedily, so an unsure policy does not hand the student random labels
                with self._own_rng():
                    smp = self.module.forward_exploration({Columns.OBS: obs})
                    rows = torch.rand(len(c)) < self.semi.explore_share
                c = torch.where(rows, smp[Columns.ACTIONS]["cand"], c)
                trust = torch.where(rows[:, None, None], smp[Columns.ACTIONS]["trust"], trust)
                lp = torch.where(rows, smp[Columns.ACTION_LOGP], lp)
                sampled.append(rows.numpy())
            trust &= (c != REJECT)[:, None, None]
            choice.append(c.numpy())
            logp.append(lp.numpy())
            labels.append(pack_bits(obs["masks"][torch.arange(len(c)), c].numpy() > 0.5))
            trusts.append(pack_bits(trust.numpy()))
        nbits = (self.size * self.size + 7) // 8
        self.n_select += 1
        return ActionRecord(self.n_select, cand.sent_ids.copy(), _cat(choice, np.int64), _cat(labels, np.uint8, nbits),
                            _cat(trusts, np.uint8, nbits), _cat(logp, np.float32), explore, self.size,
                            _cat(sampled, bool) if explore else None)

    def select(self, cand: CandidateBatch, explore: bool) -> tuple[PseudoLabelBatch, ActionRecord]:
        """Pseudo-labels of the kept pairs (chosen label, weight 1 on trusted pixels) and the action record."""
        if cand.size != self.size:
            raise ValueError(f"candidates at size {cand.size}, selector built for size {self.size}")
        rec = self.act(cand, explore)
        trust = rec.trust()  # (N, S, S) bool
        keep = (rec.cand != REJECT) & trust.any((1, 2))
        w8 = (trust[keep] * 255).astype(np.uint8)
        hist = {f"cand_share/{n}": float(np.mean(rec.cand == i)) if len(rec) else 0.0
                for i, n in enumerate(CANDIDATE_NAMES)}
        stats = selection_stats(trust.mean((1, 2)), keep, w8, "l2l", explore=bool(explore), **hist)
        pl = PseudoLabelBatch(cand.sent_ids[keep], cand.ref_ids[keep], rec.label_bits[keep], w8, self.size, stats)
        self._pending = (cand, rec) if explore else None
        return pl, rec

    @torch.no_grad()
    def candidate_probs(self, cand: CandidateBatch) -> np.ndarray:
        """float32 (N, K) candidate-head probabilities."""
        out = [torch.softmax(self.module.forward_inference({Columns.OBS: make_obs(cand, slice(a, a + _CHUNK))})[
            Columns.ACTION_DIST_INPUTS], -1).numpy() for a in range(0, len(cand), _CHUNK)]
        return np.concatenate(out) if out else np.zeros((0, len(CANDIDATE_NAMES)), np.float32)

    # --- learning ---------------------------------------------------------------------------------
    def _step(self, cand: CandidateBatch, idx: np.ndarray, choice: np.ndarray, ret: np.ndarray, pix: np.ndarray,
              logp_old: np.ndarray | None, sample: bool = False, full_table: bool = False) -> dict:
        """One gradient step on rows ``idx``. ``sample``: draw the candidates now (on-policy), else use ``choice``.

        ``ret``: callable(choice) -> (n,) returns if sample else array; ``pix``: likewise -> (n, S, S).
        ``full_table`` (with ``sample``): ``ret(None)`` is the (n, K) reward of every candidate (held-out LABELED
        pairs), and the candidate head follows the exact policy gradient sum_k grad(pi_k) * (r_k - V) instead of
        a one-sample estimate; the trust head still learns on the sampled candidate.
        """
        self.module.train()
        obs = make_obs(cand, idx)
        out = self.module._forward({Columns.OBS: obs})
        logits, emb = out[Columns.ACTION_DIST_INPUTS], out[Columns.EMBEDDINGS]
        table = None
        if sample:
            with self._own_rng():
                choice = torch.distributions.Categorical(logits=logits.detach()).sample().numpy()
            table = torch.from_numpy(np.asarray(ret(None), np.float32)) if full_table else None  # (n, K)
            ret, pix = ret(choice), pix(choice)
        a = torch.from_numpy(np.asarray(choice, np.int64))
        logp_all = torch.log_softmax(logits, -1)
        logp = logp_all.gather(1, a[:, None]).squeeze(1)
        value = self.module.compute_values({Columns.OBS: obs}, embeddings=emb)
        r = torch.from_numpy(np.asarray(ret, np.float32))
        if table is not None:  # every candidate's reward is known: the exact gradient of the expected reward
            pi = logp_all.exp()
            r = (pi.detach() * table).sum(-1)  # (n,) expected return under the current policy
            pg = -(pi * (table - value.detach()[:, None])).sum(-1).mean()
        else:  # REINFORCE / PPO-clip on the sampled candidate
            adv = r - value.detach()
            ratio = torch.exp(logp - (logp.detach() if logp_old is None else torch.from_numpy(logp_old)))
            pg = -torch.min(ratio * adv, ratio.clamp(1 - _CLIP, 1 + _CLIP) * adv).mean()
        entropy = -(logp_all.exp() * logp_all).sum(-1).mean()
        v_loss = 0.5 * ((value - r) ** 2).mean()
        kept = a != REJECT
        pix_loss = torch.zeros(())
        if kept.any():
            tl = self.module.trust_logits(obs, emb, a)  # (n, S, S)
            pix_loss = -(torch.sigmoid(tl[kept]) * torch.from_numpy(pix)[kept]).mean()
        loss = pg + v_loss - self.semi.selector_entropy * entropy + self.semi.selector_pixel_coef * pix_loss
        self.opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.module.parameters(), 1.0)
        self.opt.step()
        self.n_updates += 1
        return {"loss_pg": pg.item(), "loss_value": v_loss.item(), "loss_pixel": pix_loss.item(),
                "entropy": entropy.item(), "return": r.mean().item()}

    def update(self, record: ActionRecord, rewards: Rewards, cand: CandidateBatch | None = None) -> dict:
        """Policy update from the rewards of an exploratory selection (greedy selections are skipped)."""
        if cand is None:
            if self._pending is None or self._pending[1].key != record.key:
                raise ValueError(f"no pending selection with key {record.key}: pass cand= (the CandidateBatch the "
                                 "record was made on) or call select(explore=True) first")
            cand = self._pending[0]
        if not record.explore:
            return {"selector/update_skipped_greedy": 1.0, **rewards.stats}
        if len(record) == 0:
            return {"selector/update_pairs": 0.0, **rewards.stats}
        rows = np.flatnonzero(record.sampled) if record.sampled is not None else np.arange(len(record))
        if len(rows) == 0:
            return {"selector/update_pairs": 0.0, **rewards.stats}
        idx = np.sort(self.rng.permutation(rows)[: self.semi.selector_max_update_pairs])
        logs = []
        for _ in range(self.semi.selector_update_epochs):
            order = self.rng.permutation(idx)
            for a in range(0, len(order), self.semi.selector_minibatch):
                mb = np.sort(order[a : a + self.semi.selector_minibatch])
                logs.append(self._step(cand, mb, record.cand[mb], rewards.pair[mb], rewards.pixel(cand, record, mb),
                                       record.cand_logp[mb]))
        out = {f"selector/{k}": float(np.mean([x[k] for x in logs])) for k in logs[0]} if logs else {}
        out["selector/update_pairs"] = float(len(idx))
        return {**out, **rewards.stats}

    def feedback(self, fb: Feedback) -> dict:
        """Rewards for the pending exploratory selection from ``fb``, then ``update``; clears the pending."""
        if self._pending is None:
            return {"selector/update_skipped_no_pending": 1.0}
        cand, rec = self._pending
        rewards = compute_rewards(cand, rec, fb, self.weights)
        stats = self.update(rec, rewards, cand)
        self._pending = None
        return stats

    def practice(self, cand: CandidateBatch, truth: HeldOutTruth, steps: int | None = None) -> dict:
        """Held-out LABELED pairs processed like unlabeled ones; the reward is their truth (the prior term, a proxy
        for the truth where there is none, is left out here), every candidate's reward known (exact gradient)."""
        steps = self.semi.selector_practice_steps if steps is None else steps
        if len(cand) == 0 or steps <= 0:
            return {"practice/steps": 0.0}
        # before practice = out of sample for this slice: the honest overrule diagnostic
        before = {f"{k}_before": v for k, v in self.evaluate(cand, truth).items() if "greedy" in k or "overrule" in k}
        fb = Feedback(cand.sent_ids, truth=truth)
        w = dataclasses.replace(self.weights, prior=0.0)  # the truth is known here: no proxy for it
        table = candidate_reward_table(cand, fb, w)  # (n, K)
        q, t = dequantize(cand.proposal), truth.masks()
        rets = []
        for _ in range(steps):
            mb = np.sort(self.rng.permutation(len(cand))[: self.semi.selector_minibatch])

            def pix(choice, mb=mb):
                r = pixel_trust_reward(chosen_labels(cand, choice, mb), q[mb], cand.prior_score[mb], w,
                                       truth=t[mb])
                return np.where((choice != REJECT)[:, None, None], r, 0.0).astype(np.float32)

            def ret(c, mb=mb):
                return table[mb] if c is None else table[mb, c]

            log = self._step(cand, mb, None, ret, pix, None, sample=True, full_table=True)
            rets.append(log["return"])
        stats = {"practice/steps": float(steps), "practice/return_first": float(np.mean(rets[:5])),
                 "practice/return_last": float(np.mean(rets[-5:]))}
        return {**stats, **before, **self.evaluate(cand, truth)}

    def evaluate(self, cand: CandidateBatch, truth: HeldOutTruth) -> dict:
        """Greedy selection quality on LABELED pairs: IoU with the truth, trust precision and coverage."""
        rec = self.act(cand, explore=False)
        self.n_select -= 1  # an evaluation is not a selection
        labels, t, trust = rec.labels(), truth.masks(), rec.trust()
        kept = rec.cand != REJECT
        masks = cand.masks()
        oracle = np.max([iou(masks[:, k], t) for k in range(1, masks.shape[1])], 0)
        right = (labels == t) & trust
        # overrule: a kept label that is not the prior's region (IoU with the proposal < 0.5) where there is a prior;
        # right when the label is closer to the truth than the proposal is
        prop = masks[:, _PROPOSAL]
        overrule = kept & cand.prior_ok & (iou(labels, prop) < 0.5)
        better = iou(labels, t) > iou(prop, t)
        with_prior = max(int(cand.prior_ok.sum()), 1)
        return {"practice/overrule_share": float(overrule.sum() / with_prior),
                "practice/overrule_right": float(better[overrule].mean()) if overrule.any() else None,
                "practice/prior_wrong_share": float(((iou(prop, t) < 0.5) & cand.prior_ok).sum() / with_prior),
                "practice/greedy_truth_iou": float(iou(labels, t)[kept].mean()) if kept.any() else 0.0,
                "practice/oracle_truth_iou": float(oracle.mean()),
                "practice/teacher_truth_iou": float(iou(masks[:, 2], t).mean()),
                "practice/reject_share": float(1 - kept.mean()),
                "practice/trust_precision": float(right.sum() / max(trust.sum(), 1)),
                "practice/trust_coverage": float(trust[kept].mean()) if kept.any() else 0.0}

    # --- state ------------------------------------------------------------------------------------
    def get_pending(self) -> tuple[CandidateBatch, ActionRecord] | None:
        """The exploratory selection still waiting for its rewards (saved beside the checkpoint)."""
        return self._pending

    def set_pending(self, pending: tuple[CandidateBatch, ActionRecord] | None) -> None:
        self._pending = pending

    def get_state(self) -> dict:
        return {"module": {k: v.detach().clone() for k, v in self.module.state_dict().items()},
                "optimizer": self.opt.state_dict(), "n_select": self.n_select, "n_updates": self.n_updates,
                "torch_rng": self.torch_rng.clone(), "np_rng": self.rng.bit_generator.state}

    def set_state(self, state: dict, weights_only: bool = False) -> None:
        """Load a state from ``get_state``; ``weights_only`` keeps this selector's optimizer and RNGs."""
        self.module.load_state_dict(state["module"])
        if weights_only:
            return
        self.opt.load_state_dict(state["optimizer"])
        self.n_select, self.n_updates = int(state["n_select"]), int(state["n_updates"])
        self.torch_rng = state["torch_rng"].clone()
        self.rng.bit_generator.state = state["np_rng"]

    def save(self, path: str | os.PathLike) -> None:
        """Write the state atomically (a killed process leaves the old file or the new one)."""
        atomic_write_bytes(path, state_to_bytes(self.get_state()))

    def load(self, path: str | os.PathLike) -> None:
        self.set_state(state_from_bytes(open(path, "rb").read()))


def state_to_bytes(state: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def state_from_bytes(data: bytes) -> dict:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _cat(parts: list, dtype, width: int | None = None) -> np.ndarray:
    if parts:
        return np.concatenate(parts).astype(dtype, copy=False)
    return np.zeros((0,) if width is None else (0, width), dtype)
