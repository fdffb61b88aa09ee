"""The trainer end to end on tiny data: a teacher that learns, one short run per method, ensembles, the method
registry's kdops / reference parity, cross-dataset transfer, resume, and bad command lines."""

import copy
import json
import os

import pytest
import torch

import fake_data
from conftest import needs_cuda, read_metrics
from kdops.train import cli, data, methods, models
from kdops.train.runlog import load_checkpoint

FIELDS = {"epoch", "lr", "train_loss", "train_ce", "train_kd", "train_acc", "test_loss", "test_acc", "epoch_time",
          "samples"}
TINY = ["--train-subset", "256", "--test-subset", "128", "--batch-size", "32", "--threads", "1", "--no-progress"]


def run(*argv):
    assert cli.main([str(a) for a in argv]) == 0


metrics = read_metrics


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("teacher"))
    run("teacher", "--model", "cnn-m", "--epochs", 3, "--out", out, "--threads", "1", "--no-progress")
    return out


def test_teacher_learns_and_writes_its_files(teacher):
    rows = metrics(teacher)
    assert [r["epoch"] for r in rows] == [1, 2, 3] and all(set(r) == FIELDS for r in rows)
    assert rows[-1]["test_acc"] > 0.8  # chance is 0.1
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    summary = json.load(open(os.path.join(teacher, "summary.json")))
    assert summary["final_test_acc"] == rows[-1]["test_acc"] and summary["model"] == "cnn-m"
    assert os.path.getsize(os.path.join(teacher, "curves.png")) > 1000
    ck = load_checkpoint(teacher)
    assert ck["epoch"] == 3 and ck["kind"] == "teacher" and ck["num_classes"] == 10
    assert not [f for f in os.listdir(teacher) if ".tmp" in f]  # atomic writes leave no temporaries


@pytest.mark.parametrize("method", sorted(methods.METHODS))
def test_each_method_trains(teacher, tmp_path, method):
    out = str(tmp_path / method)
    run("distill", "--method", method, "--teacher", teacher, "--model", "cnn-s", "--epochs", 2, "--out", out, *TINY)
    rows = metrics(out)
    assert len(rows) == 2 and all(set(r) == FIELDS for r in rows)
    # CRD's term is scored against memory banks that start random and fill with the embeddings during the first
    # epoch, so its value is not comparable across the first two epochs (it rises, then falls): its CE must fall
    key = "train_ce" if method == "crd" else "train_loss"
    assert rows[1][key] < rows[0][key]
    assert all(r["samples"] == 256 for r in rows)
    kd = [r["train_kd"] for r in rows]
    if method == "none":
        assert kd == [0.0, 0.0]
        assert rows[0]["train_loss"] == rows[0]["train_ce"]
    else:
        assert all(v != 0.0 and torch.isfinite(torch.tensor(v)) for v in kd)
    ck = load_checkpoint(out)
    trainable = [k for k in ck["distiller_state"] if "weight" in k]
    n_student = len(list(models.build("cnn-s", 10, (1, 8, 8)).parameters()))
    buffers = ("running_mean", "running_var", "num_batches_tracked", "memory_student", "memory_teacher", "z_student",
               "z_teacher")  # statistics, OFD's margins, CRD's memory banks and normalisers: not optimised
    n_method = sum(1 for k, v in ck["distiller_state"].items() if not k.endswith(buffers) and "margin" not in k)
    # every trainable tensor (student and method modules) has an SGD momentum buffer: all are optimised
    assert len(ck["optimizer"]["state"]) == n_student + n_method
    # the teacher (cnn-m) is wider than the student: every trainable method holds a connector / projector here
    assert bool(trainable) == methods.METHODS[method].trainable


@needs_cuda
@pytest.mark.parametrize("method", ["kd", "dkd", "ofd", "logsum"])
def test_distill_on_cuda_matches_cpu_closely(teacher, tmp_path, method):
    args = ["distill", "--method", method, "--teacher", teacher, "--model", "cnn-s", "--epochs", 2, *TINY]
    run(*args, "--out", tmp_path / "cpu")
    run(*args, "--out", tmp_path / "cuda", "--device", "cuda")
    a, b = metrics(tmp_path / "cpu")[0], metrics(tmp_path / "cuda")[0]  # one epoch: 8 steps, little drift
    assert abs(a["train_loss"] - b["train_loss"]) < 0.05 * abs(a["train_loss"]) + 1e-3
    assert len(metrics(tmp_path / "cuda")) == 2
    assert load_checkpoint(tmp_path / "cuda")["model_state"]["fc.weight"].device.type == "cpu"


def test_terms_match_the_reference_losses(teacher):
    d = data.load("digits")
    ck = load_checkpoint(teacher)
    t = models.build(ck["model"], 10, (1, 8, 8))
    t.load_state_dict(ck["model_state"])
    t.eval()
    x, y = d.x_train[:16], d.y_train[:16]
    for name, method in methods.METHODS.items():
        if name == "none":
            continue
        torch.manual_seed(0)
        s = models.build("cnn-s", 10, (1, 8, 8))
        hp = method.hparams({})
        dist = methods.build_distiller(method, hp, s, [t], x[:2], train_labels=d.y_train)
        s_out, t_out = s(x, features=True), t(x, features=True)
        state = copy.deepcopy(dist.state_dict())  # both calls start from the same statistics / memory banks
        torch.manual_seed(1)  # and draw the same CRD negatives
        ours = dist(s_out, [t_out], y, 1, torch.arange(16))[2]
        after = copy.deepcopy(dist.state_dict())
        dist.load_state_dict(state)
        dist.use_reference(True)
        torch.manual_seed(1)
        ref = dist(s_out, [t_out], y, 1, torch.arange(16))[2]
        torch.testing.assert_close(ours, ref.to(ours.dtype), rtol=1e-4, atol=1e-5, msg=name)
        for key, value in dist.state_dict().items():  # the state updates (BN statistics, CRD banks) agree too
            torch.testing.assert_close(after[key], value, rtol=1e-5, atol=1e-6, msg="%s: %s" % (name, key))


def _pair_of_models(teacher, student="cnn-s"):
    ck = load_checkpoint(teacher)
    t = models.build(ck["model"], 10, (1, 8, 8))
    t.load_state_dict(ck["model_state"])
    torch.manual_seed(0)
    return models.build(student, 10, (1, 8, 8)), t.eval()


def test_ofd_ablation_switches_follow_their_definitions(teacher):
    s, t = _pair_of_models(teacher)
    x, y = data.load("digits").x_train[:16], data.load("digits").y_train[:16]
    so, to = s(x, features=True), t(x, features=True)
    ofd = methods.get("ofd")
    bns = t.bn_before_relu()
    for position, distance, margin in [("pre", "partial_l2", "bn"), ("post", "partial_l2", "bn"),
                                       ("pre", "l2", "bn"), ("pre", "partial_l2", "zero"), ("post", "l2", "zero")]:
        hp = ofd.hparams({"position": position, "distance": distance, "margin": margin})
        term = methods.build_distiller(ofd, hp, s, [t], x[:2]).terms[0]
        fs, ft = (so.preact, to.preact) if position == "pre" else (so.stages, to.stages)
        expect = 0.0
        for k, (a, b) in enumerate(zip(fs, ft)):  # equal stage counts: stage k with stage k
            m = nn_margins(bns[k]) if margin == "bn" else torch.zeros(b.shape[1])
            mapped = term.loss.connectors[k](a.unsqueeze(-1) if a.dim() < 4 else a)
            target = torch.max(b, m.view(1, -1, 1, 1))
            sq = (mapped - target) ** 2
            if distance == "partial_l2":
                sq = sq * ((mapped > target) | (target > 0)).to(sq.dtype)
            expect = expect + 2.0 ** -(len(fs) - k - 1) * sq.sum()
        expect = expect / x.shape[0] / 1000
        got = term(so, to, y, 1)
        torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-7, msg=str((position, distance, margin)))
        term.use_reference(True)
        torch.testing.assert_close(term(so, to, y, 1), expect, rtol=1e-4, atol=1e-7)
    with pytest.raises(methods.MethodError, match="ofd: distance must be one of partial_l2, l2, got 'l1'"):
        methods.build_distiller(ofd, ofd.hparams({"distance": "l1"}), s, [t], x[:2])


def nn_margins(bn):
    from kdops.nn import margins_from_batchnorm

    return margins_from_batchnorm(bn)


def test_kd2m_class_and_joint_terms_pass_labels_and_logits(teacher):
    from kdops import functional as F

    s, t = _pair_of_models(teacher)
    d = data.load("digits")
    x, y = d.x_train[:32], d.y_train[:32]
    so, to = s(x, features=True), t(x, features=True)
    for name in ("class_w", "joint_w"):
        m = methods.get(name)
        term = methods.build_distiller(m, m.hparams({}), s, [t], x[:2]).terms[0]
        z = term.projector(so.pooled)  # the student is 32 wide, the teacher 64
        expect = (F.class_conditional_wasserstein(z, to.pooled, y) if name == "class_w"
                  else F.joint_wasserstein(z, to.pooled, so.logits, to.logits))
        torch.testing.assert_close(term(so, to, y, 1), expect)
    # class-conditional: the sum over classes of the exact W2 within each class
    m = methods.get("class_w")
    term = methods.build_distiller(m, m.hparams({}), s, [t], x[:2]).terms[0]
    z = term.projector(so.pooled)
    by_class = sum(F.wasserstein_exact(z[y == c], to.pooled[y == c]) for c in torch.unique(y).tolist())
    torch.testing.assert_close(term(so, to, y, 1), by_class)


def test_logsum_without_a_projector_needs_equal_widths(teacher):
    s, t = _pair_of_models(teacher, "cnn-w")  # cnn-w ends 256 wide, the cnn-m teacher 64
    x = data.load("digits").x_train[:8]
    m = methods.get("logsum")
    with pytest.raises(ValueError, match="projector='identity' needs student_dim == teacher_dim, got 256 and 64"):
        methods.build_distiller(m, m.hparams({"projector": "identity"}), s, [t], x[:2])
    s, _ = _pair_of_models(teacher, "cnn-m")
    dist = methods.build_distiller(m, m.hparams({"projector": "identity"}), s, [t], x[:2])
    assert not list(dist.parameters())


def test_ensemble_averages_one_term_per_teacher(teacher, tmp_path):
    out = str(tmp_path / "ens")
    run("distill", "--method", "logsum", "--teacher", teacher, "--teacher", teacher, "--model", "cnn-s",
        "--epochs", 1, "--out", out, *TINY)
    ck = load_checkpoint(out)
    assert {k.split(".")[1] for k in ck["distiller_state"]} == {"0", "1"}  # a projector per teacher
    assert ck["config"]["teacher"] == [teacher, teacher]


@pytest.mark.parametrize("output, student", [("pooled", "cnn-s"), ("stages", "cnn-m")])
def test_a_new_pair_method_is_one_registry_entry(teacher, tmp_path, output, student):
    entry = methods.register(methods.Method("hint_" + output, needs=(output,), trainable=True,
                                            build=methods.pair_term("hint_loss", output, project=True)))
    try:
        out = str(tmp_path / "hint")
        run("distill", "--method", entry.name, "--teacher", teacher, "--model", student, "--epochs", 2,
            "--out", out, *TINY)
        rows = metrics(out)
        assert rows[1]["train_kd"] < rows[0]["train_kd"]
        state = load_checkpoint(out)["distiller_state"]
        if output == "pooled":
            assert "terms.0.projector.weight" in state  # 32 -> 64 wide
        else:  # a sum over the three stages, which have equal widths here
            assert not state
            ck = load_checkpoint(out)
            t = models.build("cnn-m", 10, (1, 8, 8)).eval()
            t.load_state_dict(load_checkpoint(teacher)["model_state"])
            s = models.build("cnn-m", 10, (1, 8, 8)).eval()
            s.load_state_dict(ck["model_state"])
            x = data.load("digits").x_train[:8]
            so, to = s(x, features=True), t(x, features=True)
            dist = methods.build_distiller(entry, entry.hparams({}), s, [t], x[:2])
            expect = sum(torch.nn.functional.mse_loss(a, b) for a, b in zip(so.stages, to.stages))
            torch.testing.assert_close(dist.terms[0](so, to, None, 1), expect)
    finally:
        del methods.METHODS[entry.name]


def test_a_joint_teachers_method_gets_every_teacher_at_once(teacher, tmp_path):
    seen = []

    def mean_mse(fs, fts):
        seen.append(len(fts))
        return sum(torch.nn.functional.mse_loss(fs, f) for f in fts) / len(fts)

    entry = methods.register(methods.Method("joint_mse", needs=("pooled",), trainable=True, joint_teachers=True,
                                            build=methods.pair_term(mean_mse, project=True)))
    try:
        out = str(tmp_path / "joint")
        run("distill", "--method", entry.name, "--teacher", teacher, "--teacher", teacher, "--model", "cnn-s",
            "--epochs", 2, "--out", out, *TINY)
        assert set(seen) == {2}
        assert {k.split(".")[1] for k in load_checkpoint(out)["distiller_state"]} == {"0"}  # one shared projector
        rows = metrics(out)
        assert rows[1]["train_kd"] < rows[0]["train_kd"]
    finally:
        del methods.METHODS[entry.name]


def test_method_hyper_parameters_from_generic_flags(teacher, tmp_path):
    out = str(tmp_path / "dkd")
    run("distill", "--method", "dkd", "--teacher", teacher, "--beta", 2, "--temperature", 3,
        "--method-arg", "warmup=5", "--epochs", 1, "--out", out, *TINY)
    hp = load_checkpoint(out)["config"]["hp"]
    assert hp == {"ce_weight": 1.0, "loss_weight": 1.0, "alpha": 1.0, "beta": 2.0, "temperature": 3.0, "warmup": 5}


def test_cross_dataset_transfer_with_feature_methods_only(tmp_path, capsys):
    root = str(tmp_path / "data")
    os.makedirs(root)
    fake_data.write_cifar10(root)
    fake_data.write_cifar100(root)
    t_out = str(tmp_path / "t100")
    common = ["--data-dir", root, "--epochs", 1, "--batch-size", 8, "--threads", 1, "--no-progress"]
    run("teacher", "--dataset", "cifar100", "--model", "cnn-s", "--out", t_out, *common)
    out = str(tmp_path / "s10")
    run("distill", "--dataset", "cifar10", "--method", "logsum", "--teacher", t_out, "--teacher-dataset", "cifar100",
        "--model", "cnn-s", "--out", out, *common)
    assert len(metrics(out)) == 1
    capsys.readouterr()
    assert cli.main([str(a) for a in ["distill", "--dataset", "cifar10", "--method", "kd", "--teacher", t_out,
                                        "--teacher-dataset", "cifar100", "--out", str(tmp_path / "kd"), *common]]) == 2
    err = capsys.readouterr().err
    assert "label space" in err and "100 classes of cifar100" in err and err.count("\n") == 1
    assert cli.main([str(a) for a in ["distill", "--dataset", "cifar10", "--method", "logsum", "--teacher", t_out,
                                        "--out", str(tmp_path / "x"), *common]]) == 2
    assert "--teacher-dataset cifar100" in capsys.readouterr().err


@pytest.mark.parametrize("method", [["ofd"], ["crd", "--method-arg", "negatives=64"]], ids=lambda m: m[0])
def test_resume_matches_an_uninterrupted_run(teacher, tmp_path, method):
    # crd: its memory banks, normalisers and negatives (from the checkpointed generator) continue exactly too
    args = ["distill", "--method", *method, "--teacher", teacher, "--model", "cnn-s", "--epochs", 3,
            "--lr-schedule", "step", *TINY]
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    run(*args, "--out", full)
    run(*args, "--out", split, "--stop-after", 1)
    assert len(metrics(split)) == 1 and not os.path.exists(os.path.join(split, "summary.json"))
    run(*args, "--out", split, "--resume")
    a, b = load_checkpoint(full), load_checkpoint(split)
    for key in ("model_state", "distiller_state"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "epoch_time"} for r in rows]  # noqa: E731
    assert strip(metrics(full)) == strip(metrics(split))


BAD = [
    (["distill", "--method", "nosuch", "--teacher", "{teacher}"], "unknown method 'nosuch'"),
    (["distill", "--method", "kd", "--teacher", "{tmp}/missing.pt"], "not found"),
    (["distill", "--method", "kd"], "needs at least one --teacher"),
    (["distill", "--method", "kd", "--teacher", "{teacher}", "--alpha", "1"], "has no hyper-parameter alpha"),
    (["distill", "--method", "kd", "--teacher", "{teacher}", "--method-arg", "oops"], "KEY=VALUE"),
    (["distill", "--method", "kd", "--teacher", "{teacher}", "--method-arg", "temperature=hot"],
     "temperature must be a number, got 'hot'"),
    (["distill", "--method", "kd", "--teacher", "{teacher}", "--dataset", "mnist1d"], "--teacher-dataset digits"),
    (["distill", "--method", "ofd", "--teacher", "{teacher}", "--model", "mlp-s"], "spatial size"),
    (["teacher", "--epochs", "0"], "--epochs must be >= 1"),
    (["teacher", "--sync-bn"], "--sync-bn needs --device cuda"),
    (["teacher", "--dataset", "cifar10"], "pass --data-dir"),
    (["teacher", "--model", "resnet20", "--dataset", "multiview"], "image inputs"),
]


@pytest.mark.parametrize("argv, message", BAD)
def test_bad_input_is_one_line_and_exit_2(teacher, tmp_path, capsys, argv, message):
    argv = [a.format(teacher=teacher, tmp=tmp_path) for a in argv] + ["--out", str(tmp_path / "o"), "--no-progress"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("kdops: error:")


def test_argparse_errors_are_one_line_too(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["teacher", "--epochs", "two", "--out", "x"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "invalid int value: 'two'" in err and err.count("\n") == 1


def test_existing_run_needs_resume(teacher, tmp_path, capsys):
    out = str(tmp_path / "again")
    run("distill", "--method", "none", "--epochs", 1, "--out", out, *TINY)
    assert cli.main(["distill", "--method", "none", "--epochs", "1", "--out", out] + TINY) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert cli.main(["distill", "--method", "none", "--epochs", "1", "--out", out, "--resume", "--lr", "0.1"]
                      + TINY) == 2
    assert "used different lr" in capsys.readouterr().err


def test_a_trailing_batch_of_one_joins_the_previous_batch(teacher, tmp_path):
    # 33 samples in batches of 32: BatchNorm (and logsum's batch norm) cannot train on a batch of one
    out = str(tmp_path / "odd")
    run("distill", "--method", "logsum", "--teacher", teacher, "--model", "cnn-s", "--epochs", 1, "--out", out,
        "--train-subset", 33, "--test-subset", 16, "--batch-size", 32, "--threads", 1, "--no-progress")
    assert metrics(out)[0]["samples"] == 33
