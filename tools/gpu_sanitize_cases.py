"""A small, fast call of every kdops CUDA kernel, forward and backward, for compute-sanitizer.

    compute-sanitizer --tool memcheck python tools/gpu_sanitize_cases.py [--device cuda]

Every public loss of kdops.functional (the cases of python_tests/loss_cases.py, so a new loss is covered as
soon as it has a case) in fp32 and bf16, plus the op variants those cases do not reach: KD rows masked by
ignore_index, MMD's saved and recomputed weight blocks and its poly kernel, Sinkhorn's online backend and
batched problems, partial L2 through its op pair, mutual learning with more peers than one register group,
CRD's NCE loss over several work chunks per row and in bf16 with a given normaliser. `--device cpu` runs the
same calls on the CPU (the dry run of the GPU check keeps this list working there). Prints one line per call
and exits non-zero if one raised.
"""

import argparse
import os
import sys
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "python_tests"))

from kdops import functional as F  # noqa: E402
from loss_cases import CASES, make, with_grad  # noqa: E402


def call_case(name, dtype, device):
    case = CASES[name]
    args, kwargs = make(name, dtype, dtype, device)
    args, leaves = with_grad(case, args)
    out = getattr(F, name)(*args, **kwargs)
    total = out.float().sum()
    torch.autograd.grad(total, leaves, allow_unused=True)


def extra_calls(device):
    g = torch.Generator().manual_seed(1)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype).requires_grad_()

    def kd_masked():
        s, t = randn(6, 3, 37), randn(6, 3, 37)
        y = torch.randint(0, 37, (6, 3), generator=g).to(device)
        y[0, 1] = -100
        for fn in (F.kd_loss, F.jsd_loss, F.dkd_loss):
            loss = fn(s, t, target=y) if fn is not F.dkd_loss else fn(s, t, y)
            torch.autograd.grad(loss, (s, t))

    def kd_wide_rows():
        s, t = randn(3, 5000, dtype=torch.bfloat16), randn(3, 5000, dtype=torch.bfloat16)
        torch.autograd.grad(F.reverse_kd_loss(s, t), (s, t))

    def mmd_blocks():
        x, y = randn(40, 6), randn(33, 6)
        for kernel in ("rbf", "poly", "linear"):
            for save in (None, True, False):
                torch.autograd.grad(F.mmd(x, y, kernel=kernel, save_blocks=save), (x, y))

    def sinkhorn_backends():
        x, y = randn(3, 70, 4), randn(3, 50, 4)
        for backend in ("tensorized", "online"):
            torch.autograd.grad(F.sinkhorn(x, y, eps=0.5, backend=backend, debias=True).sum(), (x, y))

    def partial_l2_ops():
        s, t = randn(2, 5, 7, 3), randn(2, 5, 7, 3)
        m = -torch.rand(5, generator=g).to(device)
        per_sample = torch.ops.kdops.partial_l2(s, t, m)
        torch.autograd.grad(per_sample.sum(), (s, t))

    def mutual_many_peers():  # more peers than one pass of the forward kernel's register groups
        zs = [randn(4, 3, 300) for _ in range(11)]
        torch.autograd.grad(F.mutual_kd_loss(zs, temperature=3.0).sum(), zs)

    def crd_bank(b, d, n, k, dtype):  # unit rows, as CRD's embeddings and banks
        anchor = torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=1)
        memory = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
        index = torch.randint(0, n, (b, k + 1), generator=g).to(device)
        return anchor.to(device=device, dtype=dtype).requires_grad_(), memory.to(device=device, dtype=dtype), index

    def crd_many_chunks():  # k + 1 = 2001 index columns: several work chunks per row; Z formed from the batch
        anchor, memory, index = crd_bank(5, 64, 3000, 2000, torch.float32)
        torch.autograd.grad(F.crd_nce_loss(anchor, memory, index), anchor)

    def crd_bf16_given_normalizer():  # bf16 anchor and bank (the bf16 kernels), a fixed Z, per-row losses
        anchor, memory, index = crd_bank(6, 32, 500, 300, torch.bfloat16)
        loss = F.crd_nce_loss(anchor, memory, index, normalizer=2.5e3, reduction="none")
        torch.autograd.grad(loss.sum(), anchor)

    def lm_fused_all_divergences():  # several chunks, ignored rows, softcap, hard CE, teacher gradients
        sh, sw, th, tw = randn(37, 16).requires_grad_(), randn(301, 16).requires_grad_(), randn(37, 24), randn(320, 24)
        th.requires_grad_(), tw.requires_grad_()
        target = torch.randint(0, 301, (37,), generator=g).to(device)
        target[:5] = -100
        for div in F.LM_DIVERGENCES:
            loss = F.fused_linear_kd_loss(sh, sw, th, tw, target=target, divergence=div, temperature=2.0,
                                          hard_weight=0.5, vocab_size=301, student_softcap=30.0, chunk_size=8)
            torch.autograd.grad(loss, (sh, sw, th, tw))
        rows = F.fused_linear_kd_loss(sh, sw, th, tw, vocab_size=301, reduction="none", chunk_size=16)
        torch.autograd.grad(rows.sum(), (sh, sw))

    def lm_topk_tails():
        sh, sw = randn(29, 16).requires_grad_(), randn(203, 16).requires_grad_()
        ids = torch.stack([torch.randperm(203, generator=g)[:12] for _ in range(29)]).to(device)
        lps = torch.log_softmax(randn(29, 40), -1)[:, :12]
        for tail in F.TOPK_TAILS:
            loss = F.topk_kd_loss(sh, sw, ids, lps, tail=tail, teacher_temperature=0.7, temperature=1.3, chunk_size=8)
            torch.autograd.grad(loss, (sh, sw))

    return {"kd masked rows": kd_masked, "kd wide rows bf16": kd_wide_rows, "mmd blocks": mmd_blocks,
            "sinkhorn backends": sinkhorn_backends, "partial_l2 op pair": partial_l2_ops,
            "mutual_kd 11 peers": mutual_many_peers, "crd_nce k=2000 batch normalizer": crd_many_chunks,
            "crd_nce bf16 anchor given normalizer none": crd_bf16_given_normalizer,
            "lm fused all divergences": lm_fused_all_divergences, "lm topk tails": lm_topk_tails}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    args = p.parse_args(argv)
    calls = [("%s %s" % (name, str(dt).replace("torch.", "")), (lambda n=name, d=dt: call_case(n, d, args.device)))
             for name in sorted(CASES) for dt in (torch.float32, torch.bfloat16)]
    calls += list(extra_calls(args.device).items())
    failed = 0
    for label, fn in calls:
        try:
            fn()
            if args.device == "cuda":
                torch.cuda.synchronize()
            print("ok   %s" % label, flush=True)
        except Exception:  # report every failure, then fail
            failed += 1
            print("FAIL %s\n%s" % (label, traceback.format_exc()), flush=True)
    print("%d calls, %d failed" % (len(calls), failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
