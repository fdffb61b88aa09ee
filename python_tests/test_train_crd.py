"""CRD in the trainer: the other-class negative sampler, ``distill --method crd`` with its memory banks and
normalisers in the checkpoint (its resume is in test_train.py), the published step, and the refusals (several
processes, a cached teacher, bad settings)."""

import os

import pytest
import torch

from kdops.nn import ClassNegativeSampler
from kdops.train import cli, methods
from kdops.train.runlog import load_checkpoint

TINY = ["--train-subset", "256", "--test-subset", "128", "--batch-size", "32", "--threads", "1", "--no-progress"]


def run(*argv):
    assert cli.main([str(a) for a in argv]) == 0


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("teacher"))
    run("teacher", "--model", "cnn-m", "--epochs", 2, "--out", out, "--threads", "1", "--no-progress")
    return out


def test_sampler_draws_other_class_rows_uniformly():
    labels = torch.tensor([2, 0, 1, 2, 2, 0, 1, 1, 1, 2, 0, 2])  # classes of sizes 3, 4, 5
    sampler = ClassNegativeSampler(labels)
    idx = torch.tensor([0, 1, 6, 11])
    g = torch.Generator().manual_seed(0)
    k = 20000
    rows = sampler(idx, k, generator=g)
    assert rows.shape == (4, k + 1) and rows.dtype == torch.long
    assert torch.equal(rows[:, 0], idx)
    neg = rows[:, 1:]
    assert not (labels[neg] == labels[idx].unsqueeze(1)).any()  # never a sample of the anchor's class
    for i, anchor in enumerate(idx.tolist()):
        others = (labels != labels[anchor]).nonzero().flatten()
        freq = torch.bincount(neg[i], minlength=len(labels))[others].double() / k
        expected = 1.0 / len(others)
        # each of the other-class samples is drawn about k / |others| times (binomial sd ~ 0.003 here)
        assert (freq - expected).abs().max() < 0.02, (anchor, freq, expected)
        assert torch.bincount(neg[i], minlength=len(labels))[labels == labels[anchor]].sum() == 0


def test_sampler_holds_o_n_state_and_checks_its_input():
    labels = torch.arange(1000) % 100
    sampler = ClassNegativeSampler(labels)
    sizes = {name: b.numel() for name, b in sampler.named_buffers()}
    assert sizes == {"labels": 1000, "order": 1000, "counts": 100, "offsets": 100}
    assert sampler.state_dict() == {}  # rebuilt from the labels, not checkpointed
    with pytest.raises(ValueError, match="one class only"):
        ClassNegativeSampler(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must be a non-empty"):
        ClassNegativeSampler(torch.zeros(5))
    with pytest.raises(ValueError, match=r"idx must be in \[0, 1000\)"):
        sampler(torch.tensor([1000]), 3)
    with pytest.raises(ValueError, match="k must be an int >= 0"):
        sampler(torch.tensor([1]), -1)


def test_crd_distils_and_checkpoints_its_banks(teacher, tmp_path):
    out = str(tmp_path / "crd")
    run("distill", "--method", "crd", "--teacher", teacher, "--model", "cnn-s", "--epochs", 2, "--out", out,
        "--stop-after", 1, *TINY)
    first = load_checkpoint(out)["distiller_state"]
    run("distill", "--method", "crd", "--teacher", teacher, "--model", "cnn-s", "--epochs", 2, "--out", out,
        "--resume", *TINY)
    ck = load_checkpoint(out)
    state = ck["distiller_state"]
    assert ck["config"]["hp"]["negatives"] == "auto"
    for side in ("student", "teacher"):
        memory = state["terms.0.loss.memory_%s" % side]
        assert memory.shape == (256, 128)
        # every row was written at least once in an epoch, and written rows are unit vectors (the update normalises)
        torch.testing.assert_close(memory.norm(dim=1), torch.ones(256))
        assert not torch.equal(memory, first["terms.0.loss.memory_%s" % side])
        z = state["terms.0.loss.z_%s" % side]
        assert z > 0 and torch.equal(z, first["terms.0.loss.z_%s" % side])  # fixed on the first batch, kept
    assert not any(k.startswith("terms.0.sampler") for k in state)


def test_crd_term_uses_the_published_step(teacher):
    """One training step of the term equals RepDistiller's: both NCE losses on the banks before the update, with
    k = negatives other-class rows, then memory[idx] <- normalise(0.5 memory[idx] + 0.5 v)."""
    from kdops.train import data, models

    d = data.load("digits")
    ck = load_checkpoint(teacher)
    t = models.build(ck["model"], 10, (1, 8, 8))
    t.load_state_dict(ck["model_state"])
    t.eval()
    torch.manual_seed(0)
    s = models.build("cnn-s", 10, (1, 8, 8))
    method = methods.get("crd")
    hp = method.hparams({"negatives": 40})
    dist = methods.build_distiller(method, hp, s, [t], d.x_train[:2], train_labels=d.y_train)
    term = dist.terms[0]
    idx = torch.tensor([5, 17, 300, 2, 41, 1000, 9, 77])
    x = d.x_train[idx]
    s_out, t_out = s(x, features=True), t(x, features=True)
    before = {k: v.clone() for k, v in term.loss.state_dict().items()}
    torch.manual_seed(3)
    loss = dist(s_out, [t_out], d.y_train[idx], 1, idx)[2]
    torch.manual_seed(3)
    contrast = term.sampler(idx, 40)
    assert not (d.y_train[contrast[:, 1:]] == d.y_train[idx].unsqueeze(1)).any()
    v_s = torch.nn.functional.normalize(s_out.pooled @ before["embed_student.weight"].T + before["embed_student.bias"])
    v_t = torch.nn.functional.normalize(t_out.pooled @ before["embed_teacher.weight"].T + before["embed_teacher.bias"])
    n = len(d.y_train)
    expected = 0.0
    for v, memory in ((v_s, before["memory_teacher"]), (v_t, before["memory_student"])):
        p = torch.exp(torch.einsum("bkd,bd->bk", memory[contrast].double(), v.double()) / 0.07)
        p = p / (p.mean() * n)
        c = 40 / n
        expected = expected - (torch.log(p[:, 0] / (p[:, 0] + c + 1e-7)).sum()
                               + torch.log(c / (p[:, 1:] + c + 1e-7)).sum()) / len(idx)
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-5)
    for side, v in (("student", v_s), ("teacher", v_t)):
        want = torch.nn.functional.normalize(0.5 * before["memory_" + side][idx] + 0.5 * v.detach())
        torch.testing.assert_close(term.loss.state_dict()["memory_" + side][idx], want)
        others = torch.ones(n, dtype=torch.bool)
        others[idx] = False
        assert torch.equal(term.loss.state_dict()["memory_" + side][others], before["memory_" + side][others])


@pytest.mark.parametrize("arg, message", [("negatives=0", "negatives must be an int >= 1"),
                                          ("negatives='many'", "negatives must be an int >= 1"),
                                          ("feat_dim=0", "feat_dim must be an int >= 1"),
                                          ("momentum=2.0", "momentum must be in [0, 1]")])
def test_bad_crd_settings_are_one_line(teacher, tmp_path, capsys, arg, message):
    argv = ["distill", "--method", "crd", "--teacher", teacher, "--method-arg", arg, "--out", str(tmp_path / "o"),
            *TINY]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "o" / "checkpoint.pt")


def test_crd_refuses_several_processes_and_a_cached_teacher(teacher, tmp_path, capsys):
    from kdops.train import data, models

    d = data.load("digits")
    s = models.build("cnn-s", 10, (1, 8, 8))
    t = models.build("cnn-m", 10, (1, 8, 8))
    with pytest.raises(methods.MethodError, match="one process"):
        methods.build_distiller(methods.get("crd"), methods.get("crd").hparams({}), s, [t], d.x_train[:2],
                                world_size=2, train_labels=d.y_train)
    cache = str(tmp_path / "cache")
    run("cache-teacher", "--teacher", teacher, "--out", cache)
    argv = ["distill", "--method", "crd", "--teacher-cache", cache, "--out", str(tmp_path / "o"), *TINY]
    assert cli.main(argv) == 2
    assert "method crd needs pooled" in capsys.readouterr().err
