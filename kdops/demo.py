"""`make demo`: kdops' fused KD losses against the pure-PyTorch reference on a few shapes.

For each loss and shape: the max abs difference of the loss and of the student and teacher gradients
(kdops in fp32 vs the reference in float64 on the same values), and the forward+backward time of the
reference divided by kdops' (median of several runs; > 1 means kdops is faster).
"""

import argparse
import statistics
import time

import torch

import kdops
from kdops import functional as F
from kdops import reference as R

LOSSES = {
    "kd": (F.kd_loss, R.kd_loss),
    "reverse_kd": (F.reverse_kd_loss, R.reverse_kd_loss),
    "jsd": (F.jsd_loss, R.jsd_loss),
    "dkd": (F.dkd_loss, R.dkd_loss),
}


def run(fn, name, s, t, y):
    s = s.detach().requires_grad_()
    t = t.detach().requires_grad_()
    loss = fn(s, t, y) if name == "dkd" else fn(s, t)
    gs, gt = torch.autograd.grad(loss, (s, t))
    return loss.detach(), gs, gt


def median_ms(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median is shown)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    info = kdops.build_info()
    print("kdops %s | torch %s | CUDA kernels %s | device %s | %d threads"
          % (info["version"], info["torch"], "built" if info["cuda_built"] else "not built", args.device,
             torch.get_num_threads()))
    cases = [("kd", shape) for shape in [(256, 100), (4096, 1000), (1024, 32000)]]
    cases += [(name, (4096, 1000)) for name in ("reverse_kd", "jsd", "dkd")]
    header = "%-11s %-12s %10s %10s %10s %10s %10s %8s" % (
        "loss", "shape", "|dloss|", "|dgrad_s|", "|dgrad_t|", "kdops ms", "ref ms", "speedup")
    print(header)
    print("-" * len(header))
    g = torch.Generator().manual_seed(0)
    for name, shape in cases:
        s = (torch.randn(shape, generator=g) * 3).to(args.device)
        t = (torch.randn(shape, generator=g) * 3).to(args.device)
        y = torch.randint(0, shape[-1], shape[:-1], generator=g).to(args.device)
        ours_fn, ref_fn = LOSSES[name]
        ours = run(ours_fn, name, s, t, y)
        exact = run(ref_fn, name, s.double(), t.double(), y)
        diffs = [(a.double() - b).abs().max().item() for a, b in zip(ours, exact)]

        def timed(fn):
            def call():
                out = run(fn, name, s, t, y)
                if args.device == "cuda":
                    torch.cuda.synchronize()
                return out
            return median_ms(call, args.repeats)

        t_ours, t_ref = timed(ours_fn), timed(ref_fn)
        print("%-11s %-12s %10.2e %10.2e %10.2e %10.2f %10.2f %7.1fx" % (
            name, "x".join(map(str, shape)), *diffs, t_ours, t_ref, t_ref / t_ours))


if __name__ == "__main__":
    main()
