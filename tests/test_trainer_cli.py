"""The trainer's command line and checkpoints: every refused value is one line and exit code 2
before any work; a run stopped by a signal, or killed, resumes to the very run that was not
interrupted (every model, evaluator, optimiser and RNG tensor bitwise equal)."""
import os
import random
import re
import select
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch.utils.data import Subset

from amdim import checkpoint
from amdim import data as amdim_data
from amdim import evaluate as amdim_evaluate
from amdim import train as amdim_train
from amdim_kernels import environment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 64 images of 8: 8 steps an epoch, 2 epochs
RUN = ["--dataset", "synthetic", "--ndf", "8", "--n-rkhs", "32", "--n-depth", "1", "--batch-size", "8",
       "--train-subset", "64", "--epochs", "2", "--warmup-steps", "3", "--workers", "0", "--eval-batches", "1",
       "--device", "cpu"]
STEPS_PER_EPOCH, STEPS = 8, 16


# ---- refused values ----

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Checkpoints and other files the refusal cases name."""
    d = tmp_path_factory.mktemp("files")
    args = amdim_train.parse_args(RUN + ["--ndf", "16", "--out", str(d / "ndf16")])
    amdim_train.Run(args).save()  # a checkpoint of another model size than RUN's
    whole = (d / "ndf16" / "last.pt").read_bytes()
    (d / "truncated.pt").write_bytes(whole[: len(whole) // 2])
    (d / "empty.pt").write_bytes(b"")
    (d / "random.pt").write_bytes(random.Random(0).randbytes(4096))
    torch.save({"weights": torch.ones(3)}, d / "foreign.pt")
    torch.save({"model": _RunsCode(str(d / "code-ran"))}, d / "code.pt")
    (d / "a-file").write_text("")
    return d


class _RunsCode:
    """Pickles to a call of open(): unpickling it creates the file `path`."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def _case(argv, message, **marks):
    return pytest.param(argv, message, id=" ".join(argv).replace("{d}/", ""), **marks)


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")


TRAIN_REFUSALS = [
    _case(["--epochs", "0"], r"argument --epochs: needs a positive integer, got 0"),
    _case(["--max-steps", "-1"], r"argument --max-steps: needs an integer >= 0, got -1"),
    _case(["--eval-batches", "-1"], r"argument --eval-batches: needs an integer >= 0, got -1"),
    _case(["--warmup-steps", "-3"], r"argument --warmup-steps: needs an integer >= 0, got -3"),
    _case(["--workers", "-1"], r"argument --workers: needs an integer >= 0, got -1"),
    _case(["--save-every", "-1"], r"argument --save-every: needs an integer >= 0, got -1"),
    _case(["--seed", "-1"], r"argument --seed: needs an integer >= 0, got -1"),
    _case(["--milestones", "10", "-5"], r"argument --milestones: needs an integer >= 0, got -5"),
    _case(["--batch-size", "x"], r"argument --batch-size: needs a positive integer, got 'x'"),
    _case(["--lr", "nan"], r"argument --lr: needs a finite number > 0, got nan"),
    _case(["--lr", "0"], r"argument --lr: needs a finite number > 0, got 0"),
    _case(["--tclip", "nan"], r"argument --tclip: needs a finite number >= 0, got nan"),
    _case(["--tclip", "inf"], r"argument --tclip: needs a finite number >= 0, got inf"),
    _case(["--train-subset", "4"], r"--train-subset 4 is below a batch \(--batch-size 8\)"),
    _case(["--data-root", "{d}/nonexistent"], r"--data-root \S+/nonexistent: no such folder"),
    _case(["--out", "{d}/a-file/run"], r"--out \S+/a-file/run: cannot write there \(Not a directory\)"),
    _case(["--out", "/proc/amdim-run"], r"--out /proc/amdim-run: cannot write there"),
    _case(["--device", "gpu0"], r"--device 'gpu0' is not a device: expected cpu, cuda or cuda:INDEX"),
    _case(["--device", "meta"], r"--device meta: expected a cpu or cuda device"),
    _case(["--device", "cuda"], r"--device cuda: no CUDA GPU is available here", marks=NO_CUDA),
    _case(["--backend", "cuda"], r"--backend cuda cannot run on --device cpu: the 'cuda' backend needs CUDA tensors"),
    _case(["--resume", "{d}/missing.pt"], r"--resume \S+/missing.pt: no such file"),
    _case(["--resume", "{d}"], r"--resume \S+: Is a directory"),
    _case(["--resume", "{d}/empty.pt"], r"--resume \S+/empty.pt: the file is empty or cut short"),
    _case(["--resume", "{d}/truncated.pt"], r"--resume \S+/truncated.pt: truncated or corrupted"),
    _case(["--resume", "{d}/random.pt"], r"--resume \S+/random.pt: not a PyTorch checkpoint"),
    _case(["--resume", "{d}/foreign.pt"],
          r"--resume \S+/foreign.pt: not a checkpoint of amdim.train \(it lacks 'model'"),
    _case(["--resume", "{d}/code.pt"], r"--resume \S+/code.pt: it holds Python objects other than tensors and plain "
                                  r"values \(GLOBAL \S+open\), which are not loaded"),
    _case(["--resume", "{d}/ndf16/last.pt"],
          r"--resume \S+/last.pt: the checkpoint's run has --ndf 16 \(this run: 8\); a resumed run keeps them"),
]


def _fill(argv, files):
    return [a.format(d=files) for a in argv]


def _refused_line(capsys, prog, message):
    err = capsys.readouterr().err
    assert re.fullmatch(f"{prog}: error: {message}.*\n", err), err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv, message", TRAIN_REFUSALS)
def test_trainer_refuses(argv, message, files, tmp_path, capsys, monkeypatch):
    """One line naming the flag, exit code 2, before the dataset is loaded."""
    monkeypatch.setattr(amdim_train, "build_datasets", lambda *a: pytest.fail("the run started"))
    with pytest.raises(SystemExit) as e:
        amdim_train.main(RUN + ["--out", str(tmp_path / "out")] + _fill(argv, files))
    assert e.value.code == 2
    _refused_line(capsys, "amdim.train", message)
    assert not os.path.exists(files / "code-ran")  # the checkpoint's pickled call did not run
    assert not os.path.exists(files / "nonexistent")


def test_trainer_refuses_triton_on_the_cpu_without_its_interpreter(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(environment, "TRITON_INTERPRET", False)  # as if TRITON_INTERPRET were unset at import
    with pytest.raises(SystemExit) as e:
        amdim_train.parse_args(RUN + ["--backend", "triton", "--out", str(tmp_path)])
    assert e.value.code == 2
    _refused_line(capsys, "amdim.train",
                  r"--backend triton cannot run on --device cpu: .*(TRITON_INTERPRET=1|Triton is not installed)")


def test_trainer_refuses_a_batch_larger_than_the_dataset(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        amdim_train.main(RUN + ["--train-subset", "0", "--batch-size", "1024", "--out", str(tmp_path)])
    assert e.value.code == 2
    _refused_line(capsys, "amdim.train", r"--batch-size 1024 exceeds the 512 training images")


def test_trainer_refuses_a_batch_that_the_processes_cannot_share(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it
    with pytest.raises(SystemExit) as e:
        amdim_train.parse_args(RUN + ["--batch-size", "15", "--out", str(tmp_path)])
    assert e.value.code == 2
    _refused_line(capsys, "amdim.train", r"--batch-size 15 is not a multiple of the 2 processes torchrun started")


def test_trainer_refuses_weights_that_do_not_fit(files, tmp_path, capsys):
    state = checkpoint.load(files / "ndf16" / "last.pt")
    state["args"]["ndf"] = 8  # arguments that agree with the run, weights that do not
    torch.save(state, tmp_path / "forged.pt")
    with pytest.raises(SystemExit) as e:
        amdim_train.main(RUN + ["--out", str(tmp_path), "--resume", str(tmp_path / "forged.pt")])
    assert e.value.code == 2
    _refused_line(capsys, "amdim.train", r"--resume \S+: its weights do not fit this model \(size mismatch for "
                                         r"\S+: .*\) \(and \d+ more\)\)")


EVALUATE_REFUSALS = [
    _case(["{d}/missing.pt"], r"checkpoint \S+/missing.pt: no such file"),
    _case(["{d}/foreign.pt"], r"checkpoint \S+/foreign.pt: not a checkpoint of amdim.train"),
    _case(["{d}/code.pt"], r"checkpoint \S+/code.pt: it holds Python objects other than tensors"),
    _case(["{d}/ndf16/last.pt", "--epochs", "0"], r"argument --epochs: needs a positive integer, got 0"),
    _case(["{d}/ndf16/last.pt", "--train-subset", "-1"], r"argument --train-subset: needs an integer >= 0, got -1"),
    _case(["{d}/ndf16/last.pt", "--device", "gpu0"], r"--device 'gpu0' is not a device"),
    _case(["{d}/ndf16/last.pt", "--data-root", "{d}/nonexistent"], r"--data-root \S+/nonexistent: no such folder"),
    _case(["{d}/ndf16/last.pt", "--milestones", "5"], r"--milestones applies to --classifiers only"),
    _case(["{d}/ndf16/last.pt", "--epochs", "5"], r"--epochs applies to --classifiers only"),
    _case(["{d}/ndf16/last.pt", "--classifiers", "--l2", "0.1"], r"--l2 applies to the linear probe, not to --classifiers"),
    _case(["{d}/ndf16/last.pt", "--l2", "-1"], r"argument --l2: needs a finite number >= 0, got -1"),
    _case(["{d}/ndf16/last.pt", "--lr", "1e-3"], r"--lr applies to --classifiers only"),
    _case(["{d}/ndf16/last.pt", "--classifiers", "--baselines"],
          r"--classifiers evaluates the checkpoint's encoder: without --random-init and --baselines"),
    _case(["{d}/ndf16/last.pt", "--classifiers", "--batch-size", "0"],
          r"argument --batch-size: needs a positive integer, got 0"),
    _case(["{d}/ndf16/last.pt", "--random-init", "--baselines"],
          r"argument --baselines: not allowed with argument --random-init"),
]


@pytest.mark.parametrize("argv, message", EVALUATE_REFUSALS)
def test_evaluate_refuses(argv, message, files, capsys, monkeypatch):
    monkeypatch.setattr(amdim_evaluate, "build_datasets", lambda *a: pytest.fail("the probe started"))
    with pytest.raises(SystemExit) as e:
        amdim_evaluate.main(_fill(argv, files))
    assert e.value.code == 2
    _refused_line(capsys, "amdim.evaluate", message)
    assert not os.path.exists(files / "code-ran")


# ---- exact resume ----

def _assert_same(got, want, where="checkpoint"):
    """Bitwise equality of two checkpoints' every tensor and value (their arguments aside)."""
    if isinstance(want, dict):
        assert set(got) == set(want), where
        for k in want:
            if k != "args":
                _assert_same(got[k], want[k], f"{where}[{k!r}]")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for k, (g, w) in enumerate(zip(got, want)):
            _assert_same(g, w, f"{where}[{k}]")
    elif isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and torch.equal(got, want), where
    else:
        assert got == want, where


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The checkpoint at the end of the uninterrupted run."""
    out = tmp_path_factory.mktemp("straight")
    amdim_train.main(RUN + ["--out", str(out)])
    return checkpoint.load(out / "last.pt")


def _signal_at_call(monkeypatch, owner, name, call, signum):
    """Make the `call`-th call of owner.name send this process `signum` before it runs."""
    original, calls = getattr(owner, name), [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            os.kill(os.getpid(), signum)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapped)


# (where the signal lands, its call count there, the signal, extra flags, the step the checkpoint holds)
INTERRUPTS = {
    "fetching step 1's images": (amdim_data.TwoViews, "__call__", 3, signal.SIGINT, [], 1),
    "after step 5's 5->5 draws": (amdim_train, "draw_locations", 5, signal.SIGINT, [], 5),
    "inside the optimiser's step 8, the epoch's last": (torch.optim.Adam, "step", 8, signal.SIGTERM, [], 8),
    "testing at the end of epoch 0": (amdim_train.Run, "test_accuracy", 1, signal.SIGINT, [], 8),
    "at step 11 with two workers": (amdim_train, "draw_locations", 11, signal.SIGINT, ["--workers", "2"], 11),
}


@pytest.mark.parametrize("where", INTERRUPTS)
def test_a_signal_stops_at_the_step_boundary_and_the_run_resumes_exactly(where, straight, tmp_path, capsys,
                                                                         monkeypatch):
    owner, name, call, signum, flags, step = INTERRUPTS[where]
    with monkeypatch.context() as patch:
        _signal_at_call(patch, owner, name, call, signum)
        with pytest.raises(SystemExit) as e:
            amdim_train.main(RUN + flags + ["--out", str(tmp_path)])
    assert e.value.code == 128 + signum
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(rf"stopped by {signal.Signals(signum).name} after step {step} \(epoch {step // 8}\): "
                        rf"checkpoint \S+; continue with --resume \S+", last)
    assert checkpoint.load(tmp_path / "last.pt")["step"] == step
    stale = tmp_path / "last.pt.tmp999999999"  # a write killed midway, by a process that is gone
    stale.write_bytes(b"")
    amdim_train.main(RUN + ["--out", str(tmp_path), "--resume", str(tmp_path / "last.pt")])
    assert not stale.exists()
    _assert_same(checkpoint.load(tmp_path / "last.pt"), straight)


def test_augmentation_depends_on_seed_epoch_and_image_only():
    train, _, _ = amdim_data.build_datasets("synthetic", "")
    views = amdim_data.SeededAugmentation(train, seed=1, epoch=0)
    torch.manual_seed(0)
    (a1, a2), _ = views[3]
    torch.manual_seed(1)
    views[5]
    state = torch.get_rng_state()
    (b1, b2), _ = views[3]
    assert torch.equal(state, torch.get_rng_state())  # fetching leaves the global RNG alone
    assert torch.equal(a1, b1) and torch.equal(a2, b2)  # whatever the global RNG, whatever came before
    assert not torch.equal(a1, a2)  # two views, two augmentations
    (c1, _), _ = amdim_data.SeededAugmentation(train, seed=1, epoch=1)[3]
    assert not torch.equal(a1, c1)  # another epoch, another augmentation


def test_stale_temporaries_are_those_of_dead_processes(tmp_path):
    path = str(tmp_path / "last.pt")
    dead = subprocess.Popen(["true"])
    dead.wait()
    names = {who: f"{path}.tmp{pid}" for who, pid in
             (("dead", dead.pid), ("parent", os.getppid()), ("this", os.getpid()))}
    for name in names.values():
        open(name, "w").close()
    assert checkpoint.remove_stale_temporaries(path) == [names["dead"]]
    assert all(os.path.exists(names[who]) for who in ("parent", "this"))


# ---- real signals, and kill -9, in separate processes ----

class Trainer:
    """`python -m amdim.train` in its own process group, its progress bar read as it goes
    (tqdm redrawn at every step)."""

    def __init__(self, argv):
        # the thread count of this process, whose uninterrupted run the checkpoints must equal
        # bit for bit (CPU reductions split by thread)
        env = dict(os.environ, TQDM_MININTERVAL="0", PYTHONPATH=ROOT, OMP_NUM_THREADS=str(torch.get_num_threads()))
        self.proc = subprocess.Popen([sys.executable, "-m", "amdim.train"] + argv, cwd=ROOT, env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        self.err = b""

    def wait_for_step(self, step, timeout=600):
        """Read stderr until the bar shows `step` steps done; False if the run ended first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if select.select([self.proc.stderr], [], [], 0.5)[0]:
                chunk = os.read(self.proc.stderr.fileno(), 65536)
                if not chunk:
                    return False
                self.err += chunk
                done = [int(e) * STEPS_PER_EPOCH + int(k) for e, k in
                        re.findall(rb"epoch (\d+):[^\r\n]*?\| *(\d+)/%d " % STEPS_PER_EPOCH, self.err)]
                if done and max(done) >= step:
                    return True
        raise TimeoutError(f"no step {step} within {timeout} s: {self.err[-2000:]!r}")

    def finish(self, timeout=600):
        self.err += self.proc.communicate(timeout=timeout)[1]
        return self.proc.returncode, self.err.decode(errors="replace")


def test_ctrl_c_to_the_process_group_writes_the_checkpoint_and_exits_130(straight, tmp_path):
    """Ctrl-C reaches the trainer and its DataLoader workers (one process group, as from a
    terminal): one line, exit code 130, and the checkpoint resumes to the uninterrupted run."""
    trainer = Trainer(RUN + ["--workers", "2", "--out", str(tmp_path)])
    target = random.Random().randint(1, 6)  # well before the end: the signal comes in time
    assert trainer.wait_for_step(target), trainer.err
    os.killpg(trainer.proc.pid, signal.SIGINT)
    code, err = trainer.finish()
    assert code == 130, err
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(r"stopped by SIGINT after step (\d+) \(epoch \d\): checkpoint \S+; continue with --resume "
                        r"\S+", last), err
    assert "Traceback" not in err
    assert checkpoint.load(tmp_path / "last.pt")["step"] >= target
    amdim_train.main(RUN + ["--out", str(tmp_path), "--resume", str(tmp_path / "last.pt")])
    _assert_same(checkpoint.load(tmp_path / "last.pt"), straight)


def test_kill_9_at_random_moments_loses_at_most_save_every_steps(straight, tmp_path):
    """Killed at random steps and moments within them (a checkpoint write among them): the
    checkpoint on disk always loads, holds a step at most --save-every behind, and the run
    continued from it ends as the uninterrupted one."""
    rand, save_every = random.Random(), 2
    argv = RUN + ["--save-every", str(save_every), "--out", str(tmp_path)]
    path, reached = tmp_path / "last.pt", 0
    resume = lambda: ["--resume", str(path)] if path.exists() else []  # noqa: E731
    for kill in range(2):
        if reached >= STEPS - 2:
            break
        target = rand.randint(reached + 1, min(reached + 5, STEPS - 2))
        trainer = Trainer(argv + resume())
        if not trainer.wait_for_step(target):  # the run ended first: only a later kill may come too late
            assert kill > 0 and trainer.finish()[0] == 0, trainer.err
            break
        time.sleep(rand.uniform(0, 0.05))  # somewhere within a step
        os.killpg(trainer.proc.pid, signal.SIGKILL)
        code, err = trainer.finish()
        if code == 0:  # the run ended before the kill
            assert kill > 0, err
            break
        assert code == -signal.SIGKILL, err
        if path.exists():
            state = checkpoint.load(path)
            assert state["step"] >= target - save_every, (target, state["step"])
            reached = state["step"]
        else:  # killed before the first write was whole
            assert target < 2 * save_every
    amdim_train.main(argv + resume())
    _assert_same(checkpoint.load(path), straight)
    assert not list(tmp_path.glob("last.pt.tmp*"))


# ---- the probe ----

def test_evaluate_probes_on_labeled_images_only(tmp_path, monkeypatch):
    """The probe's training set leaves out label -1 (STL-10's train+unlabeled split): chosen
    from the dataset's label list where it has one, dropped after encoding where it has not.
    Without that, cross-entropy fails on the -1 targets."""
    amdim_train.Run(amdim_train.parse_args(RUN + ["--out", str(tmp_path)])).save()
    real = amdim_data.build_datasets

    def half_unlabeled(*args, **kwargs):
        train, test, spec = real(*args, **kwargs)
        train.labels[::2] = -1
        return train, test, spec

    chosen = amdim_evaluate.labeled(Subset(half_unlabeled("synthetic", "")[0], range(10)))
    assert list(chosen.indices) == [1, 3, 5, 7, 9]
    encode, encoded = amdim_evaluate.encode, []

    def counted_encode(model, dataset, *args, **kwargs):
        encoded.append(len(dataset))
        return encode(model, dataset, *args, **kwargs)

    monkeypatch.setattr(amdim_evaluate, "build_datasets", half_unlabeled)
    monkeypatch.setattr(amdim_evaluate, "encode", counted_encode)
    argv = [str(tmp_path / "last.pt"), "--train-subset", "64", "--device", "cpu"]
    assert 0.0 <= amdim_evaluate.main(argv) <= 1.0
    assert encoded[0] == 32  # the labeled half of the 64
    # a dataset without a label list: its -1 rows are dropped after encoding
    monkeypatch.setattr(amdim_evaluate, "labeled", lambda dataset: dataset)
    assert 0.0 <= amdim_evaluate.main(argv) <= 1.0
    assert encoded[2] == 64


def test_evaluate_baselines_print_the_pretrained_accuracy_last(tmp_path, capsys):
    amdim_train.Run(amdim_train.parse_args(RUN + ["--out", str(tmp_path)])).save()
    acc = amdim_evaluate.main([str(tmp_path / "last.pt"), "--baselines", "--device", "cpu"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    assert re.fullmatch(r"linear probe on frozen r1 \(randomly initialised encoder\), synthetic test accuracy: "
                        r"[01]\.\d{4}", lines[0])
    assert re.fullmatch(r"linear probe on the raw pixels, synthetic test accuracy: [01]\.\d{4}", lines[1])
    assert re.fullmatch(rf"linear probe on frozen r1 \(encoder of \S+last.pt\), synthetic test accuracy: "
                        rf"{acc:.4f}", lines[2])
    # the synthetic classes are a pattern plus noise: raw pixels separate them
    assert float(lines[1].rsplit(" ", 1)[1]) > 0.9


def test_evaluate_classifiers_trains_fresh_classifiers_on_the_frozen_encoder(tmp_path, capsys, monkeypatch):
    """The official final evaluation: every epoch tested and reported, the encoder's weights
    untouched, the classifiers trained from a fresh start (not the checkpoint's online ones) on
    augmented training images, with the asked schedule."""
    run = amdim_train.Run(amdim_train.parse_args(RUN + ["--out", str(tmp_path)]))
    run.save()
    from amdim import classifiers

    trained = {}
    real = classifiers.train_classifiers

    def spy(model, train_set, test_set, n_classes, schedule, device, **kwargs):
        before = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "batches" not in k}
        trained["schedule"], trained["augmented"] = schedule, train_set[0][0]
        result = real(model, train_set, test_set, n_classes, schedule, device, **kwargs)
        after = model.state_dict()
        trained["frozen"] = all(torch.equal(v, after[k]) for k, v in before.items())
        return result

    monkeypatch.setattr(amdim_evaluate, "train_classifiers", spy)
    acc = amdim_evaluate.main([str(tmp_path / "last.pt"), "--classifiers", "--epochs", "3", "--milestones", "2",
                               "--batch-size", "16", "--device", "cpu", "--workers", "0"])
    out = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in out[:3]] == [f"classifiers epoch {k}/3" for k in (1, 2, 3)]
    assert re.fullmatch(rf"official classifiers on frozen r1 \(encoder of \S+\), synthetic test accuracy: "
                        rf"linear {acc:.4f}, MLP [01]\.\d{{4}}", out[3])
    assert trained["schedule"] == classifiers.Schedule(epochs=3, milestones=(2,), lr=run.args.lr, batch_size=16)
    assert isinstance(trained["augmented"], tuple)  # two views: the training augmentation
    assert trained["frozen"]


def test_classifier_schedule_is_the_official_one_per_dataset():
    assert (amdim_data.SPECS["cifar10"].classifier_epochs, amdim_data.SPECS["cifar10"].classifier_milestones) == \
        (120, (80, 110))
    assert (amdim_data.SPECS["stl10"].classifier_epochs, amdim_data.SPECS["stl10"].classifier_milestones) == \
        (120, (80, 110))
    assert (amdim_data.SPECS["imagenet"].classifier_epochs, amdim_data.SPECS["imagenet"].classifier_milestones) == \
        (30, (15, 25))


def test_a_run_draws_its_curves(tmp_path):
    amdim_train.main(RUN + ["--max-steps", "10", "--log-every", "2", "--out", str(tmp_path)])
    with open(tmp_path / "steps.csv") as f:
        assert [row.split(",")[1] for row in f.read().splitlines()[1:]] == ["2", "4", "6", "8", "10"]
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
