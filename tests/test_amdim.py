"""The AMDIM trainer: model shapes, augmentation, objective, training steps, exact resume,
multi-process semantics, errors."""
import os
import re
import socket

import pytest
import torch
import torch.multiprocessing as mp

from amdim import train as amdim_train
from amdim.data import SPECS, GreyTwoViews, TwoViews, build_datasets, two_views
from amdim.model import AMDIM, ConvResNxN
from amdim_kernels import multiscale as objective
from amdim_kernels.multiscale import as_targets, multiscale_nce
from amdim_kernels import available_backends, nce_loss

TINY = ["--dataset", "synthetic", "--ndf", "8", "--n-rkhs", "32", "--n-depth", "1", "--batch-size", "16",
        "--workers", "0", "--eval-batches", "1"]


@pytest.mark.parametrize("size, width_mult", [(32, 4), (64, 8), (128, 8)])
def test_encoder_feature_shapes(size, width_mult):
    model = AMDIM(size, ndf=8, n_rkhs=96, n_depth=2)
    x = torch.randn(3, 3, size, size)
    f1, f5, f7 = model.encoder(x)
    assert f1.shape == (3, 96, 1, 1)
    assert f5.shape == (3, 8 * width_mult, 5, 5) and f7.shape == (3, 8 * width_mult, 7, 7)
    r1, r5, r7 = model(x)
    assert r1.shape == (3, 96) and r5.shape == (3, 96, 5, 5) and r7.shape == (3, 96, 7, 7)


def test_official_cifar_model_size():
    # AMDIM_NOTES: 32 px, ndf 128, n_rkhs 1024, depth 3: 20M parameters
    n = sum(p.numel() for p in AMDIM(32, 128, 1024, 3).parameters())
    assert 19.5e6 < n < 20.5e6


def test_residual_block_starts_as_its_shortcut():
    block = ConvResNxN(4, 8, 2, 2, use_bn=False)
    x = torch.randn(2, 4, 6, 6)
    short = torch.nn.functional.avg_pool2d(x, 2, 2)
    torch.testing.assert_close(block(x), torch.cat([short, torch.zeros_like(short)], 1))


def test_two_views_share_the_flip():
    spec = SPECS["synthetic"]
    img = torch.zeros(3, 32, 32, dtype=torch.uint8)
    img[:, :, 16:] = 255  # dark left, bright right
    two = TwoViews(spec)
    signs = set()
    for _ in range(40):
        v1, v2 = two(img)
        assert v1.shape == v2.shape == (3, 32, 32) and v1.dtype == torch.float32
        s1 = bool(v1[:, :, :16].mean() < v1[:, :, 16:].mean())
        s2 = bool(v2[:, :, :16].mean() < v2[:, :, 16:].mean())
        assert s1 == s2  # one flip for both views
        signs.add(s1)
    assert signs == {True, False}  # and the flip does happen


def test_grey_dataset_views_have_three_equal_channels_and_share_the_flip():
    spec = SPECS["fashion-mnist"]
    assert isinstance(two_views(spec), GreyTwoViews)
    img = torch.zeros(1, 28, 28, dtype=torch.uint8)
    img[:, :, 14:] = 255  # dark left, bright right
    signs = set()
    for _ in range(40):
        v1, v2 = two_views(spec)(img)
        assert v1.shape == v2.shape == (3, 32, 32) and v1.dtype == torch.float32
        assert torch.equal(v1[0], v1[1]) and torch.equal(v1[0], v1[2])
        s1, s2 = (bool(v[:, :, :16].mean() < v[:, :, 16:].mean()) for v in (v1, v2))
        assert s1 == s2
        signs.add(s1)
    assert signs == {True, False}


@pytest.mark.parametrize("shift, jitter", [((3, -4), (1.3, 0.7, True)), ((-4, 1), (0.65, 1.35, False)),
                                           (None, (1.1, 0.9, False)), ((2, 2), None), (None, None)])
def test_grey_views_are_the_official_augmentation_on_one_channel(shift, jitter):
    """A grey view is what torchvision's steps of TwoViews make of the three-channel image:
    reflect padding by 4 and a 32 px crop, brightness and contrast in the drawn order, the
    saturation and grayscale steps (which change nothing), normalisation."""
    from torchvision.transforms.v2 import functional as TF

    spec = SPECS["fashion-mnist"]
    grey = GreyTwoViews(spec)
    x = torch.nn.functional.pad(torch.rand(1, 28, 28), (2, 2, 2, 2))
    want = x.expand(3, -1, -1)
    if shift is not None:
        want = TF.crop(TF.pad(want, [4], padding_mode="reflect"), 4 + shift[0], 4 + shift[1], 32, 32)
    if jitter is not None:
        brightness, contrast, brightness_first = jitter
        ops = [lambda t: TF.adjust_brightness(t, brightness), lambda t: TF.adjust_contrast(t, contrast)]
        for op in ops if brightness_first else ops[::-1]:
            want = op(want)
        want = TF.adjust_saturation(want, 1.4)
    want = TF.normalize(TF.rgb_to_grayscale(want, num_output_channels=3), spec.mean, spec.std)
    # torchvision's grey weights (0.2989, 0.587, 0.114) sum to 0.9999: its grey of a grey image,
    # and the mean its contrast blends with, are 1e-4 darker; normalised, up to 3e-4
    torch.testing.assert_close(grey.view(x, shift, jitter), want, atol=5e-4, rtol=0)


def test_grey_views_draw_the_official_parameters():
    grey = GreyTwoViews(SPECS["fashion-mnist"])
    torch.manual_seed(0)
    draws = [grey.draw() for _ in range(4000)]
    shifts = [d["shift"] for d in draws if d["shift"] is not None]
    jitters = [d["jitter"] for d in draws if d["jitter"] is not None]
    assert abs(len(shifts) / 4000 - 0.8) < 0.03 and abs(len(jitters) / 4000 - 0.8) < 0.03
    assert {s for shift in shifts for s in shift} == set(range(-4, 5))
    factors = torch.tensor([j[:2] for j in jitters])
    assert factors.min() >= 0.6 and factors.max() <= 1.4 and factors.min() < 0.62 and factors.max() > 1.38
    assert abs(sum(j[2] for j in jitters) / len(jitters) - 0.5) < 0.04


def _six_call_objective(v1, v2, locs, tclip):
    """docs/loss.md#amdims-multiscale-objective written out: six reference calls, one per loss, and the formula."""
    rows = torch.arange(v1[0].shape[0])
    s5 = (as_targets(v1[1])[rows, locs[0]], as_targets(v2[1])[rows, locs[1]])
    calls = [(v1[0], v2[1]), (v2[0], v1[1]), (v1[0], v2[2]), (v2[0], v1[2]), (s5[0], v2[1]), (s5[1], v1[1])]
    out = [nce_loss(s, as_targets(t), tclip=tclip, backend="reference") for s, t in calls]
    means = [(out[k][0] + out[k + 1][0]) / 2 for k in (0, 2, 4)]
    reg = sum(o[1] for o in out)
    return sum(means) + 0.5 * reg, dict(zip(("loss_1t5", "loss_1t7", "loss_5t5"), means), reg=reg)


@pytest.mark.parametrize("share_targets", [True, False], ids=["four calls", "six calls"])
@pytest.mark.parametrize("tclip", [20.0, None])
@pytest.mark.parametrize("backend", [b for b in ("reference", "cpp", "triton") if b in available_backends()])
def test_multiscale_objective_formula(backend, tclip, share_targets):
    """Four calls (1->5 and 5->5 of a direction in one), or six, give the six-loss
    objective, its figures and its gradient with respect to every feature map."""
    b, d = 6, 16
    view = lambda: tuple(t.requires_grad_() for t in (torch.randn(b, d), torch.randn(b, d, 5, 5),  # noqa: E731
                                                      torch.randn(b, d, 7, 7)))
    v1, v2 = view(), view()
    locs = (torch.randint(0, 25, (b,)), torch.randint(0, 25, (b,)))
    got = multiscale_nce(v1, v2, tclip=tclip, backend=backend, locations=locs, share_targets=share_targets)
    grads = torch.autograd.grad(got.total, v1 + v2)
    want, want_figures = _six_call_objective(v1, v2, locs, tclip)
    want_grads = torch.autograd.grad(want, v1 + v2)
    torch.testing.assert_close(got.total, want)
    figures = got.figures()
    for name, value in want_figures.items():
        torch.testing.assert_close(figures[name], value, msg=name)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w)
    assert set(got.as_dict()) == {"total", "loss_1t5", "loss_1t7", "loss_5t5", "reg"}


def test_training_steps_reduce_the_loss(tmp_path):
    args = amdim_train.parse_args(TINY + ["--lr", "2e-3", "--warmup-steps", "1", "--out", str(tmp_path)])
    run = amdim_train.Run(args)
    (v1, v2), labels = next(iter(run.train_loader(0)))
    losses = [amdim_train.read_metrics(run.train_step((v1, v2), labels))["total"] for _ in range(25)]
    # the loss is bounded below by ~0 but starts near log(#negatives) ~ 20: a clear fall is 5%
    assert sum(losses[-5:]) / 5 < 0.95 * sum(losses[:5]) / 5


def _last_loss(out_dir) -> float:
    import csv

    with open(os.path.join(out_dir, "metrics.csv")) as f:
        return float(list(csv.DictReader(f))[-1]["total"])


def test_resume_reproduces_the_next_step(tmp_path):
    common = TINY + ["--warmup-steps", "5"]
    amdim_train.main(common + ["--max-steps", "4", "--out", str(tmp_path / "straight")])
    amdim_train.main(common + ["--max-steps", "3", "--out", str(tmp_path / "split")])
    amdim_train.main(common + ["--max-steps", "4", "--out", str(tmp_path / "split"),
                               "--resume", str(tmp_path / "split" / "last.pt")])
    straight, split = _last_loss(tmp_path / "straight"), _last_loss(tmp_path / "split")
    if torch.cuda.is_available():  # cuDNN's convolution backward is not bitwise reproducible
        assert split == pytest.approx(straight, rel=1e-5)
    else:
        assert split == straight  # bitwise: the same step 4
    state = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    assert state["step"] == 4 and state["epoch"] == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _features(seed: int, b: int, d: int):
    gen = torch.Generator().manual_seed(seed)
    view = lambda: (torch.randn(b, d, generator=gen), torch.randn(b, d, 5, 5, generator=gen),  # noqa: E731
                    torch.randn(b, d, 7, 7, generator=gen))
    return view(), view(), (torch.randint(0, 25, (b,), generator=gen), torch.randint(0, 25, (b,), generator=gen))


def _rank_loss_and_grads(rank: int, world: int, port: int, b: int, d: int, out: dict):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    v1, v2, locs = _features(0, world * b, d)
    part = slice(rank * b, (rank + 1) * b)
    leaves = [t[part].clone().requires_grad_() for t in (*v1, *v2)]
    local_locs = (locs[0][part], locs[1][part])
    gathers = []
    gather = objective._AllGatherWithGrad
    apply = gather.apply
    gather.apply = lambda x: gathers.append(x.shape) or apply(x)  # counts the all-gathers
    try:
        losses = multiscale_nce(tuple(leaves[:3]), tuple(leaves[3:]), backend="reference", locations=local_locs)
    finally:
        del gather.apply  # torch.autograd.Function's again
    losses.total.backward()
    out[rank] = (losses.total.detach(), [t.grad for t in leaves], len(gathers))
    dist.destroy_process_group()


def test_two_processes_match_one_on_the_concatenated_batch():
    """Targets all-gathered with gradient: the mean of the ranks' losses is the one-process
    loss, and each rank's feature gradients, divided by the world size (DDP's averaging), are
    the one-process gradients of its slice."""
    world, b, d = 2, 4, 8
    out = mp.Manager().dict()
    mp.spawn(_rank_loss_and_grads, args=(world, _free_port(), b, d, out), nprocs=world, join=True)
    v1, v2, locs = _features(0, world * b, d)
    leaves = [t.clone().requires_grad_() for t in (*v1, *v2)]
    one = multiscale_nce(tuple(leaves[:3]), tuple(leaves[3:]), backend="reference", locations=locs)
    one.total.backward()
    torch.testing.assert_close(sum(out[r][0] for r in range(world)) / world, one.total.detach())
    assert [out[r][2] for r in range(world)] == [4] * world  # each view's r5 and r7 targets, gathered once
    for rank in range(world):
        for g_rank, leaf in zip(out[rank][1], leaves):
            torch.testing.assert_close(g_rank / world, leaf.grad[rank * b:(rank + 1) * b])


def _global_batch(images: int):
    """A fixed batch of two views, its labels and its 5->5 locations."""
    gen = torch.Generator().manual_seed(7)
    views = torch.randn(2, images, 3, 32, 32, generator=gen)
    labels = torch.randint(0, 10, (images,), generator=gen)
    locations = (torch.randint(0, 25, (images,), generator=gen), torch.randint(0, 25, (images,), generator=gen))
    return views, labels, locations


def _trainer_rank(rank: int, world: int, port: int, argv: list, steps: int, out: dict):
    """One torchrun-like process: a Run over the gloo group, `steps` steps on its share of the
    fixed global batch; reports the first step's objective and gradients, and the weights."""
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    run = amdim_train.Run(amdim_train.parse_args(argv))
    views, labels, locations = _global_batch(run.args.batch_size)
    share = slice(rank * run.rank_batch, (rank + 1) * run.rank_batch)
    amdim_train.draw_locations = lambda b: (locations[0][share], locations[1][share])
    first = run.train_step((views[0][share], views[1][share]), labels[share])
    grads = {name: p.grad.clone() for name, p in run.model.named_parameters()}
    for _ in range(steps - 1):
        run.train_step((views[0][share], views[1][share]), labels[share])
    weights = [{k: p.detach().clone() for k, p in module.named_parameters()} for module in (run.model, run.evaluator)]
    out[rank] = (float(first["total"]), grads, *weights, run.rank_batch)
    torch.distributed.destroy_process_group()


def test_two_trainer_processes_split_the_batch_and_keep_equal_classifiers(tmp_path):
    """--batch-size is the global batch: under two processes each takes half. After some steps
    the encoders and the online classifiers are equal on both ranks (DDP averages both), and the
    first step's objective and gradients are those of one process that encodes each half in its
    own pass (each rank's BatchNorm sees its share of a view, as the official DataParallel
    replicas did) and scores the whole batch's targets."""
    world, argv = 2, TINY + ["--batch-size", "16", "--out", str(tmp_path)]
    out = mp.Manager().dict()
    mp.spawn(_trainer_rank, args=(world, _free_port(), argv, 3, out), nprocs=world, join=True)
    assert [out[r][4] for r in range(world)] == [8, 8]
    for state in (2, 3):  # the encoder's weights, the classifiers' weights (BatchNorm statistics are each rank's)
        for k, v in out[0][state].items():
            assert torch.equal(v, out[1][state][k]), k

    run = amdim_train.Run(amdim_train.parse_args(argv))  # rank 0's initial weights, which DDP broadcast
    views, _, locations = _global_batch(16)
    halves = [run.model(torch.cat([views[0][s], views[1][s]]), n_views=2) for s in (slice(0, 8), slice(8, 16))]
    view1, view2 = (tuple(torch.cat([h[v][k] for h in halves]) for k in range(3)) for v in (0, 1))
    one = multiscale_nce(view1, view2, tclip=20.0, locations=locations)
    one.total.backward()
    torch.testing.assert_close(torch.tensor((out[0][0] + out[1][0]) / 2), one.total.detach())
    # float32 sums in another order (each rank's half, then the all-reduce): rounding of about
    # 1e-5 of the gradients' scale, also in the biases before a BatchNorm, whose gradient is 0
    scale = max(float(p.grad.abs().max()) for p in run.model.parameters())
    for name, p in run.model.named_parameters():
        torch.testing.assert_close(out[0][1][name], p.grad, rtol=1e-4, atol=1e-4 * scale, msg=name)


@pytest.mark.parametrize("dataset, message", [("mnist", r"MNIST not found under .*: get the raw IDX files"),
                                               ("cifar10", r"dataset .cifar10. not found.*--data-root")])
def test_missing_dataset_is_a_clear_error(tmp_path, capsys, dataset, message):
    with pytest.raises(SystemExit) as e:
        amdim_train.main(["--dataset", dataset, "--data-root", str(tmp_path), "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    assert re.fullmatch(f"amdim.train: error: {message}.*\\n", capsys.readouterr().err)


@pytest.mark.parametrize("flags", [["--batch-size", "0"], ["--tclip", "-1"], ["--backend", "fast"], ["--dataset", "svhn"]])
def test_bad_flags_are_refused(flags, capsys):
    with pytest.raises(SystemExit) as e:
        amdim_train.parse_args(flags)
    assert e.value.code == 2


def test_synthetic_dataset_splits_share_classes():
    train, test, spec = build_datasets("synthetic", "/nonexistent")
    assert spec.n_classes == 10 and len(train) > len(test) > 0
    (v1, v2), y = train[0]
    assert v1.shape == (3, 32, 32) and 0 <= y < 10


def test_amp_step_runs_in_bf16_autocast(tmp_path):
    args = amdim_train.parse_args(TINY + ["--amp", "--out", str(tmp_path)])
    run = amdim_train.Run(args)
    assert not run.scaler.is_enabled()
    (v1, v2), labels = next(iter(run.train_loader(0)))
    metrics = amdim_train.read_metrics(run.train_step((v1, v2), labels))
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())


def test_float16_amp_scales_the_loss_and_resumes_the_scale(tmp_path):
    """--amp-dtype float16 trains under a GradScaler (the official runs' apex loss scaling):
    the first steps overflow and are skipped while the scale settles (3 here, from 2^16),
    later ones update the weights, and a checkpoint carries the scale."""
    common = TINY + ["--amp", "--amp-dtype", "float16", "--warmup-steps", "1"]
    args = amdim_train.parse_args(common + ["--out", str(tmp_path)])
    run = amdim_train.Run(args)
    assert run.scaler.is_enabled()
    before = [p.detach().clone() for p in run.model.parameters()]
    (v1, v2), labels = next(iter(run.train_loader(0)))
    for _ in range(8):
        metrics = amdim_train.read_metrics(run.train_step((v1, v2), labels))
        assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    assert run.scaler.get_scale() < 2.0 ** 16
    assert any(not torch.equal(b, p) for b, p in zip(before, run.model.parameters()))
    run.scaler.update(1024.0)
    run.save()
    resumed = amdim_train.Run(amdim_train.parse_args(common + ["--out", str(tmp_path / "next")]))
    resumed.load_state(torch.load(tmp_path / "last.pt", weights_only=True))
    assert resumed.scaler.get_scale() == 1024.0


@pytest.mark.parametrize("backend", ["reference"] + [b for b in ("cpp",) if b in available_backends("cpu")])
def test_compiled_training_step_matches_eager(tmp_path, backend):
    """--compile traces the whole forward (encoder, six nce_loss calls, probes) as one graph
    (fullgraph here, to prove it) and takes the same steps as eager."""
    import torch._dynamo

    torch._dynamo.reset()
    losses = {}
    for compiled in (False, True):
        # cpp serves CPU tensors only: its trainer runs on the CPU whatever the machine has
        flags = TINY + ["--backend", backend, "--out", str(tmp_path)] + (["--device", "cpu"] if backend == "cpp" else [])
        args = amdim_train.parse_args(flags + (["--compile", "--compile-backend", "aot_eager"] if compiled else []))
        torch.manual_seed(0)
        run = amdim_train.Run(args)
        if compiled:  # the same, with fullgraph: any graph break fails the test
            run.forward_losses = torch.compile(run._forward_losses, backend="aot_eager", fullgraph=True)
        (v1, v2), labels = next(iter(run.train_loader(0)))
        torch.manual_seed(1)
        losses[compiled] = [amdim_train.read_metrics(run.train_step((v1, v2), labels))["total"] for _ in range(3)]
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_channels_last_takes_the_same_steps(tmp_path):
    """--channels-last changes memory layouts only: the same losses, and targets whose
    features are contiguous (what the fused backends read without a copy)."""
    losses = {}
    for channels_last in (False, True):
        args = amdim_train.parse_args(TINY + ["--out", str(tmp_path)] + ["--channels-last" if channels_last else "--no-channels-last"])
        torch.manual_seed(0)
        run = amdim_train.Run(args)
        (v1, v2), labels = next(iter(run.train_loader(0)))
        with torch.no_grad():
            r5 = run.model(torch.cat([v1, v2]).to(run.device).contiguous(memory_format=run.memory_format))[1]
        assert (as_targets(r5).stride(2) == 1) == channels_last
        torch.manual_seed(1)
        losses[channels_last] = [amdim_train.read_metrics(run.train_step((v1, v2), labels))["total"]
                                 for _ in range(3)]
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def _batchnorm_batches(run, views, labels) -> dict[str, set[int]]:
    """The batch sizes every BatchNorm of the model and the online classifiers normalised over
    during one Run.train_step."""
    seen: dict[str, set[int]] = {}
    hooks = [m.register_forward_hook(lambda m, inp, out, name=name: seen.setdefault(name, set()).add(inp[0].shape[0]))
             for module in (run.model, run.evaluator) for name, m in module.named_modules()
             if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d))]
    try:
        run.train_step(views, labels)
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("flags", [[], ["--use-bn", "--channels-last"]])
def test_every_batchnorm_sees_one_views_batch(tmp_path, flags):
    """Each view is encoded in its own pass (the official model): no BatchNorm normalises an
    image together with its positive, so each sees B images, never 2B."""
    run = amdim_train.Run(amdim_train.parse_args(TINY + flags + ["--out", str(tmp_path)]))
    (v1, v2), labels = next(iter(run.train_loader(0)))
    b = labels.shape[0]
    seen = _batchnorm_batches(run, (v1, v2), labels)
    # the phi heads' and f1's BatchNorms and the MLP probe's, and with --use-bn the encoder's
    assert len(seen) == (4 if not flags else 13)
    assert all(sizes == {b} for sizes in seen.values()), seen


def test_batchnorm_warm_up_recomputes_the_running_statistics_from_the_test_batches(tmp_path):
    """After the warm-up every BatchNorm's running statistics are the average of its batch
    statistics on the test batches, the weights are untouched, no RNG was drawn from, and the
    modules are left in eval mode. Run.test_accuracy warms up on a copy of the statistics: it
    leaves every tensor of the run, and its train mode, as training left them."""
    import copy

    from amdim.warmup import batchnorms, warm_up_batchnorm

    run = amdim_train.Run(amdim_train.parse_args(TINY + ["--use-bn", "--out", str(tmp_path)]))
    (v1, v2), labels = next(iter(run.train_loader(0)))
    run.train_step((v1, v2), labels)  # running statistics that training left
    before = {k: v.clone() for k, v in {**run.model.state_dict(), **run.evaluator.state_dict()}.items()}
    accuracy = run.test_accuracy()
    after = {**run.model.state_dict(), **run.evaluator.state_dict()}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert run.model.training and run.evaluator.training
    assert set(accuracy) == {"test_acc_linear", "test_acc_mlp"} and 0.0 <= accuracy["test_acc_mlp"] <= 1.0

    batches = list(next(run.test_batches(1))[0].split(48))  # three batches, the last one smaller
    # what each BatchNorm is fed in train mode with dropout off, batch by batch
    twin = copy.deepcopy((run.model, run.evaluator))
    inputs = {}
    for module in twin:
        module.eval()
        for bn in batchnorms(module):
            bn.train()
            bn.register_forward_hook(lambda m, inp, out: inputs.setdefault(m, []).append(inp[0].detach()))
    with torch.no_grad():
        for x in batches:
            twin[1](twin[0](x)[0])
    weights = [p.detach().clone() for p in run.model.parameters()]
    rng = torch.get_rng_state()
    warm_up_batchnorm((run.model, run.evaluator), batches, run._encode_and_classify)
    assert torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(w, p) for w, p in zip(weights, run.model.parameters()))
    assert not any(m.training for module in (run.model, run.evaluator) for m in module.modules())
    norms = batchnorms(run.model, run.evaluator)
    assert len(norms) == 13
    for bn, twin_bn in zip(norms, batchnorms(*twin)):
        dims = [0] + list(range(2, inputs[twin_bn][0].dim()))
        mean = torch.stack([t.mean(dims) for t in inputs[twin_bn]]).mean(0)
        var = torch.stack([t.var(dims, unbiased=True) for t in inputs[twin_bn]]).mean(0)
        torch.testing.assert_close(bn.running_mean, mean)
        torch.testing.assert_close(bn.running_var, var)
        assert bn.momentum == 0.1


@pytest.mark.parametrize("dataset, resize, crop", [("stl10", 70, 64), ("imagenet", 146, 128)])
def test_test_transform_is_the_official_bicubic_resize_and_center_crop(dataset, resize, crop):
    from torchvision.transforms import v2

    from amdim.data import test_transform

    steps = test_transform(SPECS[dataset]).transforms
    resizes = [t for t in steps if isinstance(t, v2.Resize)]
    crops = [t for t in steps if isinstance(t, v2.CenterCrop)]
    assert len(resizes) == 1 and resizes[0].size == [resize]
    assert resizes[0].interpolation == v2.InterpolationMode.BICUBIC
    assert len(crops) == 1 and crops[0].size == (crop, crop)
    image = torch.randint(0, 256, (3, 96, 120), dtype=torch.uint8)
    assert test_transform(SPECS[dataset])(image).shape == (3, crop, crop)


def test_phi_shortcut_starts_near_the_identity_only_where_it_widens():
    from amdim.model import PhiHead

    torch.manual_seed(0)
    wide = PhiHead(16, 32, use_bn=False).shortcut.weight[:, :, 0, 0]
    eye = torch.eye(32, 16, dtype=torch.bool)
    assert torch.all(wide[eye] == 1.0) and wide[~eye].abs().max() <= 0.01
    narrow = PhiHead(64, 32, use_bn=False).shortcut.weight
    assert narrow.abs().max() > 0.01  # Conv2d's default init, as the official code leaves it


def test_cifar100_is_normalised_with_cifar10_statistics():
    """As the official run (its CIFAR-10 transforms serve CIFAR-100 too)."""
    assert (SPECS["cifar100"].mean, SPECS["cifar100"].std) == (SPECS["cifar10"].mean, SPECS["cifar10"].std)
