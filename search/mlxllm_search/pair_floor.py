"""The level a run's validation loss must pass before the scaling law describes it: the validation loss of a
table of token pairs counted on the training split (a bigram model, Witten-Bell smoothed toward the
unigram frequencies).

Why: the first hundred steps or so of a run learn the frequencies of tokens and of pairs of them, and
that fall ends at about this level; when and how fast a run gets through it varies with its seed and
shape far more than its size, so losses above it order architectures at random and say nothing of where a
long run ends. Only runs that are below it have learned something a table of pairs cannot (law_points
refuses the others). Computed once per search from the prepared tokens, in a second or two for
millions of them (a larger corpus is sampled: the level moves by far less than the noise of an evaluation).
"""

from __future__ import annotations

from mlxllm.data import TokenData

import numpy as np

MAX_TOKENS = 8_000_000  # counted from at most this many tokens of each split (evenly spaced stretches)
STRETCHES = 64


def _sample(tokens: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(previous token, target) pairs of a split whose target counts, from at most MAX_TOKENS of it."""
    n = len(tokens)
    if n > MAX_TOKENS:
        size = MAX_TOKENS // STRETCHES
        starts = np.linspace(0, n - size, STRETCHES).astype(np.int64)
        pieces = [np.arange(s, s + size) for s in starts]
    else:
        pieces = [np.arange(n)]
    prev, target = [], []
    for idx in pieces:
        t = np.asarray(tokens[idx], dtype=np.int64)
        keep = np.ones(len(t) - 1, dtype=bool) if mask is None else np.asarray(mask[idx][1:], dtype=bool)
        prev.append(t[:-1][keep])
        target.append(t[1:][keep])
    return np.concatenate(prev), np.concatenate(target)


def pair_floor(data: TokenData) -> float | None:
    """The bigram table's mean loss in nats per counted validation token (None: a split holds no pair)."""
    vocab = int(data.tokenizer.vocab_size)
    a, b = _sample(data.train, data.train_mask)
    va, vb = _sample(data.val, data.val_mask)
    if not len(a) or not len(va):
        return None
    unigram = (np.bincount(b, minlength=vocab) + 1.0) / (len(b) + vocab)
    codes, counts = np.unique(a * vocab + b, return_counts=True)
    context = np.bincount(a, minlength=vocab).astype(float)  # c(a)
    kinds = np.bincount(codes // vocab, minlength=vocab).astype(float)  # T(a): distinct tokens after a
    lam = np.divide(context, context + kinds, out=np.zeros(vocab), where=context > 0)
    code = va * vocab + vb
    at = np.searchsorted(codes, code)
    seen = (at < len(codes)) & (codes[np.minimum(at, len(codes) - 1)] == code)
    pair = np.where(seen, counts[np.minimum(at, len(codes) - 1)], 0) / np.maximum(context[va], 1.0)
    p = lam[va] * pair + (1.0 - lam[va]) * unigram[vb]
    return float(-np.log(p).mean())
