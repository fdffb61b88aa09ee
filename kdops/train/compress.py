"""Compressed students: magnitude pruning with fixed masks (``distill --prune AMOUNT``), optionally from the
weights of a trained run (``--student-init RUN``).

The masks are global: the AMOUNT fraction of the smallest |w| over every Conv / Linear weight of the student
(biases and BatchNorm parameters are kept), computed once, from the weights the run starts from. After every
optimiser step the pruned weights are set back to 0, so they stay 0 whatever the momentum or weight decay; the
saved model is a plain model (no masks or re-parametrisation to remove) whose pruned weights are exactly 0. The
masks are also kept in the checkpoint, so that ``--resume`` continues with the same ones.
"""

import torch
from torch import nn

PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Linear)


def prunable(model):
    """(name, weight) of every Conv / Linear weight, in module order."""
    return [(name + ".weight", m.weight) for name, m in model.named_modules() if isinstance(m, PRUNABLE)]


@torch.no_grad()
def magnitude_masks(model, amount):
    """Boolean keep-masks, {param name: mask}, pruning the `amount` fraction of smallest-magnitude weights
    over all prunable weights together (ties at the threshold are pruned first in flat order, so exactly
    round(amount * total) weights go)."""
    if not 0.0 < amount < 1.0:
        raise ValueError("--prune must be in (0, 1), the fraction of weights set to 0, got %r" % (amount,))
    params = prunable(model)
    if not params:
        raise ValueError("--prune: the model has no Conv / Linear weights")
    flat = torch.cat([w.detach().abs().flatten().float().cpu() for _, w in params])
    n_prune = int(round(amount * flat.numel()))
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    keep[torch.argsort(flat, stable=True)[:n_prune]] = False
    masks, start = {}, 0
    for name, w in params:
        masks[name] = keep[start:start + w.numel()].view_as(w).to(w.device)
        start += w.numel()
    return masks


@torch.no_grad()
def apply_masks(model, masks):
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        params[name].mul_(mask.to(params[name].dtype))


def sparsity(model):
    """Fraction of the prunable weights that are exactly 0."""
    params = prunable(model)
    zeros = sum(int((w == 0).sum()) for _, w in params)
    return zeros / sum(w.numel() for _, w in params)


def load_init(model, path, model_name, dataset):
    """The student's starting weights from the final checkpoint of a run of the same model and data."""
    from kdops.train import runlog

    ck = runlog.load_checkpoint(path, "--student-init")
    if ck.get("model") != model_name or ck.get("num_classes") != dataset.num_classes \
            or tuple(ck.get("input_shape", ())) != tuple(dataset.input_shape):
        raise ValueError("--student-init %s is a %s with %s classes on inputs %s; the student is a %s with %d classes "
                         "on inputs %s" % (path, ck.get("model"), ck.get("num_classes"),
                                           tuple(ck.get("input_shape", ())), model_name, dataset.num_classes,
                                           tuple(dataset.input_shape)))
    model.load_state_dict(ck["model_state"])
