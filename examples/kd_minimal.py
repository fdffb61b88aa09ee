"""Minimal knowledge distillation with kdops: a wide teacher MLP, then a narrow student trained with
cross-entropy + Hinton KD (kdops.nn.KDLoss), on synthetic Gaussian-mixture data (no downloads).

    python examples/kd_minimal.py [--epochs 30] [--seed 0]

Prints the test accuracy of the teacher, of the student trained alone, and of the distilled student.
"""

import argparse

import torch
from torch import nn

import kdops


def make_data(n_train, n_test, num_classes=10, dim=20, seed=0):
    """Each class is a mixture of two Gaussian blobs, so a narrow model benefits from soft targets."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, 2, dim, generator=g) * 2.0

    def sample(n):
        y = torch.randint(0, num_classes, (n,), generator=g)
        blob = torch.randint(0, 2, (n,), generator=g)
        return centers[y, blob] + torch.randn(n, dim, generator=g) * 1.5, y

    return sample(n_train), sample(n_test)


def mlp(dim, width, num_classes):
    return nn.Sequential(nn.Linear(dim, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, num_classes))


def train(model, x, y, epochs, teacher=None, kd_weight=0.9, temperature=4.0, seed=0):
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    ce, kd = nn.CrossEntropyLoss(), kdops.nn.KDLoss(temperature=temperature)
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 128):
            idx = perm[i:i + 128]
            logits = model(x[idx])
            loss = ce(logits, y[idx])
            if teacher is not None:
                with torch.no_grad():
                    teacher_logits = teacher(x[idx])
                loss = (1 - kd_weight) * loss + kd_weight * kd(logits, teacher_logits)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model


@torch.no_grad()
def accuracy(model, x, y):
    return (model(x).argmax(1) == y).float().mean().item()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    (x, y), (x_test, y_test) = make_data(6000, 2000, seed=args.seed)
    teacher = train(mlp(20, 256, 10), x, y, args.epochs, seed=args.seed).eval()
    alone = train(mlp(20, 8, 10), x, y, args.epochs, seed=args.seed).eval()
    student = train(mlp(20, 8, 10), x, y, args.epochs, teacher=teacher, seed=args.seed).eval()
    results = {"teacher": accuracy(teacher, x_test, y_test), "student alone": accuracy(alone, x_test, y_test),
               "student + KD": accuracy(student, x_test, y_test)}
    for name, acc in results.items():
        print("%-14s test accuracy %.3f" % (name, acc))
    return results


if __name__ == "__main__":
    main()
