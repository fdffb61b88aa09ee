"""Pure-PyTorch references of the feature-map losses (the Overhaul's released code, FitNet, LogSum)."""

import torch
import torch.nn.functional as F


def margin_relu(teacher, margin):
    return torch.max(teacher, margin.to(teacher.dtype).view(1, -1, *([1] * (teacher.dim() - 2))))


def partial_l2_loss(student, teacher, margin, reduction="sum"):
    """As the Overhaul's released code: mse(reduction='none') masked by (s > t^) | (t^ > 0), summed."""
    target = margin_relu(teacher, margin)
    loss = F.mse_loss(student, target, reduction="none")
    loss = (loss * ((student > target) | (target > 0)).to(loss.dtype)).sum()
    if reduction == "batchmean":
        return loss / student.shape[0]
    if reduction == "mean":
        return loss / student.numel()
    return loss


def hint_loss(student_regressed, teacher):
    return F.mse_loss(student_regressed, teacher)


def logsum_loss(delta_or_pair, alpha=4.0, eps=0.0):
    if isinstance(delta_or_pair, (tuple, list)):
        delta = delta_or_pair[0] - delta_or_pair[1]
    else:
        delta = delta_or_pair
    return torch.log(delta.abs().pow(alpha).sum() + eps)
