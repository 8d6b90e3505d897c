"""The pseudo-label selection policy: an RLlib new-API-stack ``TorchRLModule`` (torch only, no Ray cluster).

    spec = policy_spec(size=128, stride=4, hidden=64)
    module = spec.build()                          # a torch.nn.Module, runs in any process
    out = module.forward_exploration({Columns.OBS: make_obs(cand, idx)})
    out[Columns.ACTIONS]                           # {"cand": (B,), "trust": (B, S, S) bool}

One decision per (ref, sentence) pair, made of two actions:
- ``cand``: a categorical choice among the K region candidates (index 0 = reject the pair), scored by a
  DeepSets encoder over the candidates' features (each candidate sees the pooled context of the others);
- ``trust``: a Bernoulli per pixel, trust (train on the chosen label there) or ignore. The trust logit is
  a coarse context term (a small conv net over the evidence planes plus the chosen candidate's mask,
  modulated (FiLM) by the chosen candidate's embedding, run at size/stride and upsampled) plus a fine
  per-pixel linear term at full resolution (planes, label, |label - teacher|, |label - proposal|).
The value head (``ValueFunctionAPI.compute_values``) is the REINFORCE baseline of the candidate head.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from ray.rllib.core.columns import Columns
from ray.rllib.core.distribution.torch.torch_distribution import TorchCategorical
from ray.rllib.core.rl_module.apis import ValueFunctionAPI
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.core.rl_module.torch import TorchRLModule
from torch import nn

from l2l_ray.selection.candidates import FEATURE_NAMES, PLANE_NAMES, CandidateBatch
from l2l_ray.selection.candidates import K as NUM_CANDIDATES

TRUST_LOGITS = "trust_logits"  # (B, S, S) per-pixel trust logits for the chosen candidate
TRUST_INIT = 2.0  # initial trust logit bias: sigmoid(2) = 0.88, start by trusting most of the chosen label


class PseudoLabelPolicy(TorchRLModule, ValueFunctionAPI):
    """obs: {"feats": (B,K,F), "planes": (B,C,S,S), "masks": (B,K,S,S)}; the coarse path pools by ``stride``.

    actions: {"cand": int64 (B,), "trust": bool (B, size, size)}.
    """

    def setup(self):
        k, f = self.observation_space["feats"].shape
        c = self.observation_space["planes"].shape[0]
        h = int(self.model_config.get("hidden", 64))
        ph = max(8, h // 4)
        self.size = int(self.model_config["size"])
        self.stride = int(self.model_config.get("stride", 4))
        self.enc = nn.Sequential(nn.Linear(f, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU())
        self.mix = nn.Linear(h, h)
        self.score = nn.Linear(h, 1)
        self.vf = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 1))
        self.pix_in = nn.Conv2d(c + 1, ph, 3, padding=1)
        self.pix_film = nn.Linear(h, 2 * ph)
        self.pix_mid = nn.Conv2d(ph, ph, 1)
        self.pix_out = nn.Conv2d(ph, 1, 1)
        # Fine term: a per-pixel linear map at full resolution over [planes, label, |label-p|, |label-q|]
        # (a weighted sum, not a 1x1 conv: mkldnn is slow with one output channel).
        self.fine_w = nn.Parameter(torch.zeros(c + 3))
        nn.init.zeros_(self.pix_film.weight)
        nn.init.zeros_(self.pix_film.bias)
        nn.init.constant_(self.pix_out.bias, TRUST_INIT)

    # --- candidate head -------------------------------------------------------------------------
    def _encode(self, feats: torch.Tensor) -> torch.Tensor:
        e = self.enc(feats)  # (B, K, h)
        return F.relu(e + self.mix(e.mean(1, keepdim=True)))  # (B, K, h): each candidate sees the others

    def _forward(self, batch, **kwargs):
        e = self._encode(batch[Columns.OBS]["feats"])
        return {Columns.ACTION_DIST_INPUTS: self.score(e).squeeze(-1), Columns.EMBEDDINGS: e}  # logits (B, K)

    def compute_values(self, batch, embeddings=None):
        e = embeddings if embeddings is not None else self._encode(batch[Columns.OBS]["feats"])
        return self.vf(e.mean(1)).squeeze(-1)  # (B,)

    # --- pixel trust head -----------------------------------------------------------------------
    def trust_logits(self, obs: dict, emb: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
        """(B, S, S) trust logits given the chosen candidate ``cand`` (B,) and embeddings (B, K, h)."""
        rows = torch.arange(len(cand), device=cand.device)
        planes = obs["planes"]  # (B, C, S, S); channel 0 = teacher, 3 = proposal
        label = obs["masks"][rows, cand].unsqueeze(1)  # (B, 1, S, S)
        w = self.fine_w
        c = planes.shape[1]
        fine = (torch.einsum("bchw,c->bhw", planes, w[:c]) + w[c] * label[:, 0]
                + w[c + 1] * (label[:, 0] - planes[:, 0]).abs() + w[c + 2] * (label[:, 0] - planes[:, 3]).abs())
        x = torch.cat([planes, label], 1)  # (B, C+1, S, S)
        if self.stride > 1:
            x = F.avg_pool2d(x, self.stride)  # (B, C+1, S/st, S/st)
        gamma, beta = self.pix_film(emb[rows, cand]).chunk(2, -1)  # (B, ph) each
        y = F.relu(self.pix_in(x) * (1 + gamma[..., None, None]) + beta[..., None, None])
        coarse = self.pix_out(F.relu(self.pix_mid(y)))  # (B, 1, S/st, S/st)
        if self.stride > 1:
            coarse = F.interpolate(coarse, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return coarse[:, 0] + fine  # (B, S, S)

    def _act(self, batch, sample: bool):
        out = self._forward(batch)
        logits = out[Columns.ACTION_DIST_INPUTS]
        cand = torch.distributions.Categorical(logits=logits).sample() if sample else logits.argmax(-1)
        tl = self.trust_logits(batch[Columns.OBS], out[Columns.EMBEDDINGS], cand)
        trust = torch.bernoulli(torch.sigmoid(tl)).bool() if sample else tl > 0
        out[Columns.ACTIONS] = {"cand": cand, "trust": trust}
        out[Columns.ACTION_LOGP] = torch.log_softmax(logits, -1).gather(1, cand[:, None]).squeeze(1)
        out[TRUST_LOGITS] = tl
        return out

    def _forward_inference(self, batch, **kwargs):
        return self._act(batch, sample=False)

    def _forward_exploration(self, batch, **kwargs):
        return self._act(batch, sample=True)

    def _forward_train(self, batch, **kwargs):
        """Logits, embeddings and the trust logits for the candidates in ``batch[ACTIONS]["cand"]``."""
        out = self._forward(batch)
        out[TRUST_LOGITS] = self.trust_logits(batch[Columns.OBS], out[Columns.EMBEDDINGS],
                                              batch[Columns.ACTIONS]["cand"])
        return out

    def get_inference_action_dist_cls(self):
        return TorchCategorical  # of the candidate head; the trust head is a per-pixel Bernoulli

    def get_exploration_action_dist_cls(self):
        return TorchCategorical

    def get_train_action_dist_cls(self):
        return TorchCategorical


def spaces(size: int) -> tuple[gym.spaces.Dict, gym.spaces.Dict]:
    """(observation_space, action_space) of the policy at model resolution ``size``."""
    s = size
    k, f, c = NUM_CANDIDATES, len(FEATURE_NAMES), len(PLANE_NAMES)
    obs = gym.spaces.Dict({"feats": gym.spaces.Box(-np.inf, np.inf, (k, f), np.float32),
                           "planes": gym.spaces.Box(0.0, 1.0, (c, s, s), np.float32),
                           "masks": gym.spaces.Box(0.0, 1.0, (k, s, s), np.float32)})
    act = gym.spaces.Dict({"cand": gym.spaces.Discrete(k), "trust": gym.spaces.MultiBinary([size, size])})
    return obs, act


def policy_spec(size: int, stride: int = 4, hidden: int = 64) -> RLModuleSpec:
    """The ``RLModuleSpec`` of the selection policy; ``.build()`` gives the module."""
    if size % stride:
        raise ValueError(f"model size {size} must be divisible by semi.selector_pixel_stride={stride}")
    obs, act = spaces(size)
    return RLModuleSpec(module_class=PseudoLabelPolicy, observation_space=obs, action_space=act,
                        model_config={"hidden": hidden, "size": size, "stride": stride})


def make_obs(cand: CandidateBatch, idx=None) -> dict[str, torch.Tensor]:
    """Observation tensors for rows ``idx`` of a candidate batch: feats (n,K,F), planes (n,C,S,S), masks (n,K,S,S)."""
    idx = slice(None) if idx is None else idx
    return {"feats": torch.from_numpy(np.array(cand.features[idx], np.float32)),  # a copy: ray.get gives read-only
            "planes": torch.from_numpy(cand.planes(idx)),
            "masks": torch.from_numpy(cand.masks(idx).astype(np.float32))}
