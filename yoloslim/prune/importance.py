"""What matters: one score per channel of a group, from a callable that takes the graph and the group.

Coupled channels are judged together: a group's channel scores the maximum over its coupled layers. A channel of a
residual sum can only go if every branch feeding it is unimportant, so a single strong branch keeps it (the max is the
conservative choice; a mean would let two weak branches outvote a strong one).
"""

from __future__ import annotations

from typing import Callable

import torch

from yoloslim.graph import ChannelGroup, group_batchnorms, group_out_convs

Importance = Callable[..., torch.Tensor]


def _max_over_layers(group: ChannelGroup, per_layer) -> torch.Tensor:
    scores = torch.zeros(group.size)
    for values, root_idxs in per_layer:
        index = torch.tensor(root_idxs)
        scores[index] = torch.maximum(scores[index], values.float())
    return scores


@torch.no_grad()
def bn_gamma_importance(graph, group: ChannelGroup) -> torch.Tensor:
    """|gamma| of the BatchNorm scale factors (Network Slimming): comparable across layers after sparsity training."""
    return _max_over_layers(group, ((bn.weight[idxs].abs(), root) for bn, idxs, root in group_batchnorms(graph, group)))


@torch.no_grad()
def l1_filter_importance(graph, group: ChannelGroup) -> torch.Tensor:
    """L1 norm of each output filter (Li et al. 2017), divided by its layer's mean so one global threshold fits all
    layers of a model that was not sparsity-trained."""

    def normalised(conv, idxs):
        norms = conv.weight.detach().abs().flatten(1).sum(1)
        return norms[idxs] / norms.mean().clamp(min=1e-12)

    return _max_over_layers(
        group, ((normalised(conv, idxs), root) for conv, idxs, root in group_out_convs(graph, group))
    )


IMPORTANCES: dict[str, Importance] = {"bn": bn_gamma_importance, "l1": l1_filter_importance}
