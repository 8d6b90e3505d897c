"""Tokenizers and text encoders (no Ray imports).

Offline default: a WordPiece tokenizer trained with the ``tokenizers`` library on the *training*
sentences and saved as ``<run_dir>/tokenizer.json``, plus a small transformer encoder trained from
scratch. GPU users: a BERT-class ``BertModel`` (random init from ``BertConfig``, or ``from_pretrained``
by hub id / local path) with that model's own tokenizer (``pretrained=`` below).

    tok = build_tokenizer(sentences, run_dir, vocab_size=2000, max_len=16)   # writes run_dir/tokenizer.json
    tok = load_tokenizer(run_dir)                                             # or the file itself
    tokens, token_mask = tok.encode(["the red circle", "left ring"])          # (B, T) long, (B, T) bool
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from l2l_ray.io import atomic_write_text

TOKENIZER_FILE = "tokenizer.json"
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` with fixed-length padding; pickles as its JSON (small, Ray-safe)."""

    def __init__(self, tokenizer, max_len: int):
        self.tok = tokenizer
        self.max_len = int(max_len)
        pad_id = self.tok.token_to_id("[PAD]")
        self.pad_id = 0 if pad_id is None else int(pad_id)
        self.tok.enable_truncation(self.max_len)
        self.tok.enable_padding(length=self.max_len, pad_id=self.pad_id, pad_token="[PAD]")

    @property
    def vocab_size(self) -> int:
        return int(self.tok.get_vocab_size(with_added_tokens=True))

    def encode_numpy(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Sentences -> int32 ids (B, T) and bool mask (B, T), T = max_len (padded / truncated)."""
        if not texts:
            return np.zeros((0, self.max_len), np.int32), np.zeros((0, self.max_len), bool)
        encs = self.tok.encode_batch([t if isinstance(t, str) else str(t) for t in texts])
        ids = np.asarray([e.ids for e in encs], np.int32)
        mask = np.asarray([e.attention_mask for e in encs], bool)
        return ids, mask

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Sentences -> tokens LongTensor (B, T) and token_mask BoolTensor (B, T)."""
        ids, mask = self.encode_numpy(texts)
        return torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask)

    def to_json(self) -> str:
        return self.tok.to_str()

    @classmethod
    def from_json(cls, text: str, max_len: int | None = None) -> TextTokenizer:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(text)
        trunc = tok.truncation
        return cls(tok, max_len or (trunc["max_length"] if trunc else 32))

    def save(self, path: str | os.PathLike) -> str:
        """Write ``tokenizer.json`` (atomically) to ``path`` (a folder or a file path); returns the file."""
        p = Path(path)
        if p.suffix != ".json":
            p = p / TOKENIZER_FILE
        atomic_write_text(p, self.to_json())
        return str(p)

    def __reduce__(self):
        return (TextTokenizer.from_json, (self.to_json(), self.max_len))


def _train_wordpiece(sentences: Iterable[str], vocab_size: int):
    """A WordPiece vocabulary built deterministically (the `tokenizers` trainer breaks frequency ties in hash
    order, so two runs on the same sentences gave different vocabularies): specials, every character and its
    ``##`` continuation, then whole words by (-count, word) up to ``vocab_size``."""
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    normalizer, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in sentences:
        counts.update(w for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for w in counts for c in w})
    vocab = list(dict.fromkeys([*SPECIALS, *chars, *(f"##{c}" for c in chars)]))
    known = set(vocab)
    words = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if w not in known]
    vocab += words[: max(0, vocab_size - len(vocab))]
    tok = Tokenizer(models.WordPiece(vocab={t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer = normalizer, pre
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    tok.decoder = decoders.WordPiece()
    return tok


def build_tokenizer(sentences: Iterable[str], out_dir: str | os.PathLike | None = None, *,
                    vocab_size: int = 2000, max_len: int = 16, pretrained: str = "") -> TextTokenizer:
    """Train a WordPiece tokenizer on ``sentences`` (or take ``pretrained``'s, a hub id / local path,
    e.g. ``bert-base-uncased``), fix its length to ``max_len`` and save it to ``out_dir/tokenizer.json``."""
    if pretrained:
        from transformers import AutoTokenizer

        backend = AutoTokenizer.from_pretrained(pretrained).backend_tokenizer
    else:
        backend = _train_wordpiece(sentences, vocab_size)
    tok = TextTokenizer(backend, max_len)
    if out_dir is not None:
        tok.save(out_dir)
    return tok


def load_tokenizer(path: str | os.PathLike) -> TextTokenizer:
    """Load ``tokenizer.json`` (``path`` is the file or its folder, e.g. the run folder)."""
    p = Path(path)
    if p.is_dir():
        p = p / TOKENIZER_FILE
    if not p.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {p}; it is written by the first training stage "
                                "of a run (build_tokenizer)")
    return TextTokenizer.from_json(p.read_text())


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over valid tokens: x (B, T, D), mask (B, T) bool -> (B, D)."""
    m = mask.unsqueeze(-1).to(x.dtype)  # (B, T, 1)
    return (x * m).sum(1) / m.sum(1).clamp(min=1.0)


class SmallTextEncoder(nn.Module):
    """Token embedding + learned positions + a pre-norm transformer encoder, trained from scratch."""

    def __init__(self, vocab_size: int, width: int, layers: int, heads: int, max_len: int, pad_id: int = 0):
        super().__init__()
        self.dim = width
        self.embed = nn.Embedding(vocab_size, width, padding_idx=pad_id)
        self.pos = nn.Parameter(torch.zeros(1, max_len, width))
        nn.init.trunc_normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.1, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, tokens: torch.Tensor, token_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (B, T) long, token_mask (B, T) bool -> words (B, T, D), sentence (B, D)."""
        x = self.embed(tokens) + self.pos[:, : tokens.shape[1]]  # (B, T, D)
        x = self.norm(self.encoder(x, src_key_padding_mask=~token_mask))
        return x, masked_mean(x, token_mask)


class BertTextEncoder(nn.Module):
    """A transformers ``BertModel`` (no pooler): random init from ``BertConfig`` or ``from_pretrained``."""

    def __init__(self, vocab_size: int, max_len: int, hub: str = "", pretrained: bool = False, **bert_kwargs):
        super().__init__()
        from transformers import BertConfig, BertModel

        if pretrained:
            if not hub:
                raise ValueError("model.pretrained=true needs a text encoder hub id or local path (model.text_encoder)")
            self.bert = BertModel.from_pretrained(hub, add_pooling_layer=False)
        else:
            conf = BertConfig(vocab_size=vocab_size, max_position_embeddings=max(512, max_len), **bert_kwargs)
            self.bert = BertModel(conf, add_pooling_layer=False)
        self.dim = int(self.bert.config.hidden_size)

    def forward(self, tokens: torch.Tensor, token_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (B, T) long, token_mask (B, T) bool -> words (B, T, D), sentence (B, D)."""
        x = self.bert(input_ids=tokens, attention_mask=token_mask.long()).last_hidden_state  # (B, T, D)
        return x, masked_mean(x, token_mask)


def build_text_encoder(spec, tokenizer: TextTokenizer, pretrained: bool) -> nn.Module:
    """The text encoder of a resolved ``Preset``."""
    if spec.text == "small":
        kw = spec.text_kwargs
        return SmallTextEncoder(tokenizer.vocab_size, kw["width"], kw["layers"], kw["heads"], tokenizer.max_len,
                                tokenizer.pad_id)
    if spec.text == "bert":
        return BertTextEncoder(tokenizer.vocab_size, tokenizer.max_len, spec.text_hub, pretrained, **spec.text_kwargs)
    raise ValueError(f"unknown text encoder kind {spec.text!r} in preset {spec.name!r}")
