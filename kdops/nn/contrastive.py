"""Contrastive distillation modules: CRD (Tian et al. 2020) with its embeddings, memory banks and bank update, and
the other-class negative sampler of its data pipeline."""

import math
import numbers

import torch
import torch.nn.functional as Fn
from torch import nn

from kdops.functional import contrastive as F


class CRDLoss(nn.Module):
    """Contrastive Representation Distillation, as RepDistiller's ``CRDLoss`` (``METHODS.md``, "CRD").

    Holds the two embeddings (Linear(d -> feat_dim) then L2 normalisation, one per side, both trainable), the two
    memory banks ``memory_student`` / ``memory_teacher`` (n_data x feat_dim buffers, initialised U(-s, s) with
    s = 1 / sqrt(feat_dim / 3)) and the two NCE normalisers ``z_student`` / ``z_teacher`` (buffers, 0 until the
    first batch fixes them; they are saved in the state dict, so a resumed run keeps them).

    ``forward(student_features, teacher_features, idx, contrast_idx=None)``: features (b, ...) (flattened to
    (b, d)); ``idx`` (b,) the samples' indices in the training set (their bank rows); ``contrast_idx`` (b, k + 1)
    the bank rows to score, column 0 equal to ``idx`` and columns 1..k the negatives (CRD draws them from other
    classes in the data pipeline); without it, k = ``num_negatives`` rows are drawn uniformly (``generator``).
    Returns L_student + L_teacher: the student embedding scored against the teacher bank with
    :func:`kdops.functional.crd_nce_loss` and the teacher embedding against the student bank. In training mode
    both banks are then updated, memory[idx] <- normalise(m * memory[idx] + (1 - m) * v): the loss and its
    gradient use the rows as they were before this update (the published semantics).

    The banks are per process: under torch.distributed with more than one rank the forward refuses to train
    (each rank would update its own copy from its own samples, and DDP's buffer broadcast would then discard
    all ranks' updates but rank 0's).
    """

    def __init__(self, student_dim, teacher_dim, n_data, feat_dim=128, num_negatives=16384, temperature=0.07,
                 momentum=0.5, eps=1e-7):
        super().__init__()
        for arg, v in (("student_dim", student_dim), ("teacher_dim", teacher_dim), ("n_data", n_data),
                       ("feat_dim", feat_dim), ("num_negatives", num_negatives)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError("CRDLoss: %s must be an int >= 1, got %r" % (arg, v))
        if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not temperature > 0 \
                or not math.isfinite(temperature):
            raise ValueError("CRDLoss: temperature must be a finite number > 0, got %r" % (temperature,))
        if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) or not 0 <= momentum <= 1:
            raise ValueError("CRDLoss: momentum must be in [0, 1], got %r" % (momentum,))
        self.embed_student = nn.Linear(student_dim, feat_dim)
        self.embed_teacher = nn.Linear(teacher_dim, feat_dim)
        stdv = 1.0 / math.sqrt(feat_dim / 3)
        self.register_buffer("memory_student", torch.rand(n_data, feat_dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("memory_teacher", torch.rand(n_data, feat_dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("z_student", torch.zeros(()))
        self.register_buffer("z_teacher", torch.zeros(()))
        self.n_data, self.num_negatives = int(n_data), int(num_negatives)
        self.temperature, self.momentum, self.eps = float(temperature), float(momentum), float(eps)
        self.student_dim, self.teacher_dim = int(student_dim), int(teacher_dim)

    def embed(self, student_features, teacher_features):
        """The two L2-normalised embeddings (b, feat_dim)."""
        v_s = Fn.normalize(self.embed_student(student_features.flatten(1)), dim=1)
        v_t = Fn.normalize(self.embed_teacher(teacher_features.flatten(1)), dim=1)
        return v_s, v_t

    def sample_negatives(self, idx, generator=None):
        """(b, num_negatives + 1) bank rows: idx, then uniform draws over the bank."""
        neg = torch.randint(0, self.n_data, (idx.shape[0], self.num_negatives), device=idx.device,
                            generator=generator)
        return torch.cat([idx.view(-1, 1).long(), neg], dim=1)

    def forward(self, student_features, teacher_features, idx, contrast_idx=None, generator=None):
        name = "CRDLoss"
        b = student_features.shape[0] if student_features.dim() else 0
        if student_features.dim() < 2 or teacher_features.dim() < 2 or teacher_features.shape[0] != b:
            raise ValueError("%s: student_features and teacher_features must be (b, ...) with one b, got %s and %s"
                             % (name, tuple(student_features.shape), tuple(teacher_features.shape)))
        if student_features[0].numel() != self.student_dim or teacher_features[0].numel() != self.teacher_dim:
            raise ValueError("%s: features must flatten to (b, %d) and (b, %d) (student_dim, teacher_dim), got %s "
                             "and %s" % (name, self.student_dim, self.teacher_dim, tuple(student_features.shape),
                                         tuple(teacher_features.shape)))
        if not isinstance(idx, torch.Tensor) or idx.is_floating_point() or idx.dtype == torch.bool \
                or idx.shape != (b,):
            raise ValueError("%s: idx must be the (%d,) integer indices of the samples in the training set, got %s"
                             % (name, b, tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__))
        if self.training and torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            raise RuntimeError("%s: the memory banks are per process; training with %d ranks would let them diverge "
                               "(run CRD in one process)" % (name, torch.distributed.get_world_size()))
        if contrast_idx is None:
            contrast_idx = self.sample_negatives(idx, generator)
        v_s, v_t = self.embed(student_features, teacher_features)
        args = (self.temperature,)
        loss_s, z_s = F._crd_nce(name, v_s, self.memory_teacher, contrast_idx, *args, self.z_student, self.n_data,
                                 self.eps, "mean")
        loss_t, z_t = F._crd_nce(name, v_t, self.memory_student, contrast_idx, *args, self.z_teacher, self.n_data,
                                 self.eps, "mean")
        with torch.no_grad():
            self.z_student.copy_(z_s)
            self.z_teacher.copy_(z_t)
            if self.training:
                self._update(self.memory_student, idx, v_s)
                self._update(self.memory_teacher, idx, v_t)
        return loss_s + loss_t

    def _update(self, memory, idx, v):
        idx = idx.long()
        rows = memory.index_select(0, idx).mul_(self.momentum)
        rows.add_(v.detach().to(memory.dtype), alpha=1 - self.momentum)
        memory.index_copy_(0, idx, Fn.normalize(rows, dim=1))

    def extra_repr(self):
        return "n_data=%d, feat_dim=%d, num_negatives=%d, temperature=%s, momentum=%s" % (
            self.n_data, self.memory_student.shape[1], self.num_negatives, self.temperature, self.momentum)


class ClassNegativeSampler(nn.Module):
    """CRD's negatives from other classes, drawn in O(N) memory (no per-class index lists).

    ``labels``: the (N,) integer class of every training sample. The samples are sorted by class once (a
    non-persistent buffer of N indices and one of the class offsets); ``forward(idx, k, generator=None)`` returns
    (b, k + 1) bank rows: column 0 is ``idx``, columns 1..k are drawn uniformly, with replacement, among the
    samples whose class differs from sample idx's (the published sampler's ``np.random.choice(cls_negative[y], k,
    replace=True)``): a draw r in [0, N - n_y) skips the block of class y in the sorted order.
    """

    def __init__(self, labels):
        super().__init__()
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.is_floating_point() \
                or labels.dtype == torch.bool or labels.numel() == 0:
            raise ValueError("ClassNegativeSampler: labels must be a non-empty (N,) integer tensor, got %s"
                             % (tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__,))
        labels = labels.long()
        if int(labels.min()) < 0:
            raise ValueError("ClassNegativeSampler: labels must be >= 0, got %d" % int(labels.min()))
        counts = torch.bincount(labels)
        if int((counts > 0).sum()) < 2:
            raise ValueError("ClassNegativeSampler: the labels hold one class only, so there are no other-class "
                             "negatives")
        self.register_buffer("labels", labels.clone(), persistent=False)
        self.register_buffer("order", torch.argsort(labels, stable=True), persistent=False)
        self.register_buffer("counts", counts, persistent=False)
        self.register_buffer("offsets", torch.cumsum(counts, 0) - counts, persistent=False)

    def forward(self, idx, k, generator=None):
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0:
            raise ValueError("ClassNegativeSampler: k must be an int >= 0, got %r" % (k,))
        n = self.labels.numel()
        if not isinstance(idx, torch.Tensor) or idx.dim() != 1 or idx.is_floating_point() or idx.dtype == torch.bool:
            raise ValueError("ClassNegativeSampler: idx must be a (b,) integer tensor of sample indices, got %s"
                             % (tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__,))
        idx = idx.long().to(self.labels.device)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise ValueError("ClassNegativeSampler: idx must be in [0, %d), got values in [%d, %d]"
                             % (n, int(idx.min()), int(idx.max())))
        y = self.labels[idx]
        cnt, off = self.counts[y].unsqueeze(1), self.offsets[y].unsqueeze(1)
        u = torch.rand(idx.numel(), k, generator=generator, device=idx.device, dtype=torch.float64)
        r = torch.minimum((u * (n - cnt)).long(), n - cnt - 1)  # uniform in [0, n - n_y)
        pos = r + (r >= off).long() * cnt
        return torch.cat([idx.unsqueeze(1), self.order[pos]], dim=1)
