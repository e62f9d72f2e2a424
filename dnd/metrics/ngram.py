"""A smoothed character n-gram language model, the judge behind PPL-OCR.

Generated text images have no ground truth, so their legibility is scored by the
perplexity of their OCR'd text under a language model. No pretrained language model is
available offline, so this one is fitted on the training corpus of the experiment.

Smoothing: interpolated Kneser-Ney (Chen & Goodman 1998, section 3.5) with one
absolute discount per order, estimated as D = n1 / (n1 + 2 n2) from the counts-of-counts
of that order. The highest order uses raw counts, lower orders continuation counts
(the number of distinct characters seen before the n-gram); the recursion ends in a
uniform distribution over the training characters, the end-of-text symbol and one
unknown-character symbol, so every string has a finite perplexity.

Texts are whitespace-normalised (runs of whitespace become one space) before fitting
and scoring, and padded with order-1 begin symbols and one end symbol; the perplexity
is per character, the end symbol included.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Iterable

BOS, EOS, UNK = "\x02", "\x03", "\x00"


class CharNgramLM:
    def __init__(self, order: int = 5):
        if order < 1:
            raise ValueError(f"CharNgramLM: order must be >= 1, got {order}")
        self.order = order
        self.vocab: set[str] = set()
        self.counts: dict[int, Counter] = {}        # k -> {k-gram: count} (raw for k = order, else continuation)
        self.context_total: dict[int, Counter] = {}  # k -> {(k-1)-gram history: sum of its k-gram counts}
        self.context_types: dict[int, Counter] = {}  # k -> {history: number of distinct next characters}
        self.discount: dict[int, float] = {}
        self.num_texts = self.num_chars = 0

    def _pad(self, text: str) -> str:
        return BOS * (self.order - 1) + " ".join(text.split()) + EOS

    def fit(self, texts: Iterable[str]) -> "CharNgramLM":
        n = self.order
        top: Counter = Counter()
        for text in texts:
            padded = self._pad(text)
            self.num_texts += 1
            self.num_chars += len(padded) - (n - 1)
            self.vocab.update(padded[n - 1:])
            for i in range(n - 1, len(padded)):
                top[padded[i - n + 1:i + 1]] += 1
        if not top:
            raise ValueError("CharNgramLM.fit: no training text given")
        self.counts = {n: top}
        for k in range(n - 1, 0, -1):
            # every distinct (k+1)-gram x+g adds one distinct left neighbour to g
            self.counts[k] = Counter(gram[1:] for gram in self.counts[k + 1])
        for k, counts in self.counts.items():
            total, types = Counter(), Counter()
            for gram, c in counts.items():
                total[gram[:-1]] += c
                types[gram[:-1]] += 1
            self.context_total[k], self.context_types[k] = total, types
            count_of_counts = Counter(counts.values())
            n1, n2 = count_of_counts[1], count_of_counts[2]
            self.discount[k] = n1 / (n1 + 2 * n2) if n1 and n2 else 0.5
        return self

    def prob(self, char: str, history: str) -> float:
        """P(char | history): history is the preceding characters (begin-padded as needed)."""
        if not self.counts:
            raise RuntimeError("CharNgramLM: call fit(texts) before scoring")
        if char not in self.vocab:
            char = UNK
        history = (BOS * (self.order - 1) + history)[len(history):] if self.order > 1 else ""
        p = 1.0 / (len(self.vocab) + 1)  # uniform over the vocabulary and UNK
        for k in range(1, self.order + 1):
            h = history[len(history) - (k - 1):] if k > 1 else ""
            total = self.context_total[k].get(h, 0)
            if total == 0:
                continue  # unseen history: keep the lower-order estimate
            d = self.discount[k]
            p = max(self.counts[k].get(h + char, 0) - d, 0.0) / total + d * self.context_types[k][h] / total * p
        return p

    def log_prob(self, text: str) -> tuple[float, int]:
        """(natural-log probability of the text and its end symbol, number of predicted symbols)."""
        padded = self._pad(text)
        n = self.order
        logp = sum(math.log(self.prob(padded[i], padded[i - n + 1:i])) for i in range(n - 1, len(padded)))
        return logp, len(padded) - (n - 1)

    def perplexity(self, text: str) -> float:
        logp, count = self.log_prob(text)
        return math.exp(-logp / count)

    def describe(self) -> str:
        return (f"character {self.order}-gram LM (interpolated Kneser-Ney) fitted on the training corpus "
                f"({self.num_texts} texts, {self.num_chars} characters)")
