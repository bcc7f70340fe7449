"""The latency predictor: a non-negative least-squares fit of measured latency on per-convolution work.

A plan gives every prunable group a width; each convolution then has cin and cout kept channels, and each tensor its
kept channels. The features, summed per spatial level (height times width of the convolution's output) so that the
fit can learn that a small map runs less efficiently per operation than a large one:

- multiply-accumulates of 1x1 convolutions, cin * cout * H * W;
- multiply-accumulates of larger kernels, cin * cout * k * H * W (depthwise ones cout * k * H * W);
- activation elements, kept channels * H * W over every tensor (SiLU, Add, Concat, pooling and upsampling move them);

each divided by its value in the unpruned model, plus a constant (what no prune removes: the head's decoding, calls,
layout conversions). Being bilinear in the widths, it captures what a sum of per-group terms cannot: a convolution
between two groups that both halve does a quarter of its work. The target is the measured latency as a fraction of the
unpruned model's, timed interleaved with it.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np

from yoloslim.profile.groups import ChannelGraph


class Features:
    """Computes a plan's feature vector quickly: per tensor, where its channels sit in their groups' sections.

    Its state is plain data (to_dict), stored in the latency table, so that pruning predicts without the ONNX.
    """

    def __init__(self, state: dict):
        self.sizes: Dict[str, int] = state["sizes"]
        self.names: List[str] = state["names"]
        self.terms = [tuple(t) for t in state["terms"]]
        self.layouts = {
            t: (fixed, [(root, np.asarray(p)) for root, p in groups]) for t, (fixed, groups) in state["layouts"].items()
        }
        self.full = np.asarray(state["full"], dtype=float)

    @classmethod
    def of_graph(cls, graph: ChannelGraph) -> Features:
        group_of = graph.group_of()
        position = {c: i % g.size for g in graph.groups for i, c in enumerate(g.channels)}
        layouts = {}
        for tensor, roots in graph.tensors.items():
            fixed, per_group = 0, {}
            for c in roots.tolist():
                group = graph.groups[group_of[c]] if c in group_of else None
                if group is None or group.fixed:
                    fixed += 1
                else:
                    per_group.setdefault(group.root, []).append(position[c])
            layouts[tensor] = [fixed, [[root, sorted(p)] for root, p in per_group.items()]]
        levels = sorted({c.out_hw for c in graph.convs}, reverse=True)
        names = [f"{kind}@{hw}" for hw in levels for kind in ("mac1x1", "mackxk", "elems")]
        column = {name: i for i, name in enumerate(names)}
        terms = []  # (column, coefficient, tensor a, tensor b or None): coefficient * kept(a) * kept(b)
        for conv in graph.convs:
            kind = "mac1x1" if conv.kernel == 1 else "mackxk"
            other = None if conv.depthwise else conv.input
            terms.append([column[f"{kind}@{conv.out_hw}"], conv.kernel * conv.out_hw, conv.output, other])
        for tensor, hw in graph.hw.items():
            if hw in levels:
                terms.append([column[f"elems@{hw}"], hw, tensor, None])
        state = {"sizes": graph.full_widths(), "names": names, "terms": terms, "layouts": layouts, "full": []}
        features = cls(state)
        full = features._raw(features.sizes)
        features.full = np.where(full == 0, 1.0, full)
        return features

    def to_dict(self) -> dict:
        layouts = {
            t: [fixed, [[root, p.tolist()] for root, p in groups]] for t, (fixed, groups) in self.layouts.items()
        }
        return {
            "sizes": self.sizes,
            "names": self.names,
            "terms": [list(t) for t in self.terms],
            "layouts": layouts,
            "full": self.full.tolist(),
        }

    def kept(self, tensor: str, widths: Dict[str, int]) -> int:
        fixed, per_group = self.layouts[tensor]
        return fixed + sum(int(np.searchsorted(p, widths.get(root, self.sizes[root]))) for root, p in per_group)

    def _raw(self, widths: Dict[str, int]) -> np.ndarray:
        cache, row = {}, np.zeros(len(self.names))
        for col, coefficient, a, b in self.terms:
            for t in (a, b):
                if t is not None and t not in cache:
                    cache[t] = self.kept(t, widths)
            row[col] += coefficient * cache[a] * (cache[b] if b is not None else 1)
        return row

    def __call__(self, widths: Dict[str, int]) -> np.ndarray:
        """[1, each feature as a fraction of the unpruned model's]."""
        return np.concatenate([[1.0], self._raw(widths) / self.full])

    def work(self, widths: Dict[str, int]) -> float:
        """Multiply-accumulates of the plan as a fraction of the unpruned model's."""
        raw = self._raw(widths)
        macs = [i for i, n in enumerate(self.names) if n.startswith("mac")]
        return float(raw[macs].sum() / self.full[macs].sum())


def nonnegative_least_squares(x: np.ndarray, y: np.ndarray, iterations: int = 5000) -> np.ndarray:
    """min |x b - y|^2 over b >= 0, by cyclic coordinate descent on the normal equations (a few dozen columns; no
    scipy on the device)."""
    gram, target = x.T @ x, x.T @ y
    b = np.zeros(x.shape[1])
    for _ in range(iterations):
        change = 0.0
        for j in range(len(b)):
            if gram[j, j] <= 0:
                continue
            new = max(0.0, b[j] - (gram[j] @ b - target[j]) / gram[j, j])
            change = max(change, abs(new - b[j]))
            b[j] = new
        if change < 1e-10:
            break
    return b


class Predictor:
    """Latency of a plan as a fraction of the unpruned model's."""

    def __init__(self, features: Features, coefficients: Sequence[float]):
        self.features = features
        self.coefficients = np.asarray(coefficients, dtype=float)

    @classmethod
    def fit(cls, features: Features, plans: List[Dict[str, int]], ratios: Sequence[float]) -> Predictor:
        x = np.stack([features(p) for p in plans])
        return cls(features, nonnegative_least_squares(x, np.asarray(ratios, dtype=float)))

    def __call__(self, widths: Dict[str, int]) -> float:
        return float(self.features(widths) @ self.coefficients)

    def as_dict(self) -> dict:
        return {"features": ["constant", *self.features.names], "coefficients": self.coefficients.tolist()}


def relative_errors(predictor: Predictor, plans: List[Dict[str, int]], ratios: Sequence[float]) -> List[float]:
    """|predicted - measured| / measured of each plan."""
    return [abs(predictor(p) - r) / r for p, r in zip(plans, ratios)]
