"""Every bad input is refused before any kernel runs, with a message naming the argument."""
from unittest import mock

import numpy as np
import pytest
import torch

from amdim_kernels import available_backends, nce_loss
from truth import backends_here


def good():
    return dict(src=torch.randn(4, 8), trg=torch.randn(4, 3, 8), pos_idx=torch.tensor([0, 1, 2, 3]))


def call(**changes):
    kwargs = good()
    kwargs.update(changes)
    return nce_loss(kwargs.pop("src"), kwargs.pop("trg"), kwargs.pop("pos_idx"), **kwargs)


BAD = [  # (argument changes, exception, regex the message must match)
    (dict(src=torch.randn(4, 8, 1)), ValueError, r"src must have 2 dimensions \(N, D\)"),
    (dict(src=torch.randn(8)), ValueError, r"src must have 2 dimensions"),
    (dict(trg=torch.randn(4, 8)), ValueError, r"trg must have 3 dimensions \(M, L, D\)"),
    (dict(src=[[1.0]]), TypeError, r"src must be a torch.Tensor"),
    (dict(src=torch.randn(4, 8).to_sparse()), TypeError,
     r"src must be a dense \(strided\) tensor, got layout torch.sparse_coo; call .to_dense\(\) first"),
    (dict(trg=torch.randn(4, 3, 8).to_sparse()), TypeError, r"trg must be a dense \(strided\) tensor"),
    (dict(pos_idx=torch.arange(4).to_sparse()), TypeError, r"pos_idx must be a dense \(strided\) tensor"),
    (dict(trg=torch.randn(4, 3, 9)), ValueError, r"trg's last dimension must equal src's D = 8"),
    (dict(src=torch.randn(0, 8), pos_idx=torch.zeros(0, dtype=torch.long)), ValueError, r"src has N = 0"),
    (dict(trg=torch.randn(0, 3, 8)), ValueError, r"trg has M = 0"),
    (dict(trg=torch.randn(4, 0, 8)), ValueError, r"trg has L = 0"),
    (dict(src=torch.randn(4, 0), trg=torch.randn(4, 3, 0)), ValueError, r"src has D = 0"),
    (dict(pos_idx=torch.tensor([0, 1, 2])), ValueError, r"pos_idx must have shape \(N,\) = \(4,\)"),
    (dict(pos_idx=torch.zeros(4, 1, dtype=torch.long)), ValueError, r"pos_idx must have shape"),
    (dict(pos_idx=torch.tensor([0.0, 1.0, 2.0, 3.0])), TypeError, r"pos_idx must have an integer dtype"),
    (dict(pos_idx=torch.tensor([True, False, True, False])), TypeError, r"pos_idx must have an integer dtype"),
    (dict(pos_idx=torch.tensor([0, 1, 2, 4])), ValueError, r"pos_idx values must lie in \[0, M\) = \[0, 4\), got values in \[0, 4\]"),
    (dict(pos_idx=torch.tensor([-1, 1, 2, 3])), ValueError, r"pos_idx values must lie in \[0, M\)"),
    (dict(pos_idx=[0, 1, 2, 3]), TypeError, r"pos_idx as a list must hold Python ranges, got int, int, int, int; indices go in a tensor, torch.tensor\(pos_idx\)"),
    (dict(pos_idx=()), TypeError, r"pos_idx as a tuple must hold Python ranges, got nothing"),
    (dict(pos_idx=(range(2), torch.arange(2))), TypeError, r"pos_idx as a tuple must hold Python ranges, got range, Tensor"),
    (dict(pos_idx={0, 1, 2, 3}), TypeError, r"pos_idx must be a torch.Tensor of shape \(N,\), a range or a tuple of ranges, got set"),
    (dict(scale=torch.tensor(0.5, requires_grad=True)), TypeError,
     r"scale must be a Python number or None \(1/sqrt\(D\)\), got a tensor \(a learnable scale multiplies the sources: nce_loss\(src \* scale"),
    (dict(tclip=torch.tensor(20.0)), TypeError, r"tclip must be a Python number or None \(no clipping\), got a tensor$"),
    (dict(reg_weight=torch.tensor(0.05)), TypeError, r"reg_weight must be a Python number, got a tensor$"),
    (dict(tclip="abc"), TypeError, r"tclip must be a Python number or None \(no clipping\), got str 'abc'$"),
    (dict(tclip="20"), TypeError, r"tclip must be a Python number or None \(no clipping\), got str '20'$"),
    (dict(tclip=True), TypeError, r"tclip must be a Python number or None \(no clipping\), got bool True$"),
    (dict(reg_weight=None), TypeError, r"reg_weight must be a Python number, got NoneType None$"),
    (dict(reg_weight="0.05"), TypeError, r"reg_weight must be a Python number, got str '0.05'$"),
    (dict(scale="0.25"), TypeError, r"scale must be a Python number or None \(1/sqrt\(D\)\), got str '0.25'$"),
    (dict(scale=[0.25]), TypeError, r"scale must be a Python number or None \(1/sqrt\(D\)\), got list \[0.25\]$"),
    (dict(pos_idx=(range(2), range(1))), ValueError, r"pos_idx must hold N = 4 indices, got \(range\(0, 2\), range\(0, 1\)\) of length 3"),
    (dict(pos_idx=(range(2), range(3, 5))), ValueError, r"pos_idx values must lie in \[0, M\) = \[0, 4\), got \(range\(0, 2\), range\(3, 5\)\)"),
    (dict(pos_idx=range(3)), ValueError, r"pos_idx must hold N = 4 indices, got range\(0, 3\) of length 3"),
    (dict(pos_idx=range(1, 5)), ValueError, r"pos_idx values must lie in \[0, M\) = \[0, 4\), got range\(1, 5\)"),
    (dict(pos_idx=range(2, -2, -1)), ValueError, r"pos_idx values must lie in \[0, M\) = \[0, 4\), got range\(2, -2, -1\)"),
    (dict(src=torch.randn(4, 8, dtype=torch.float64), trg=torch.randn(4, 3, 8, dtype=torch.float64)),
     TypeError, r"src must be float32, float16 or bfloat16, got torch.float64"),
    (dict(src=torch.randint(0, 3, (4, 8))), TypeError, r"src must be float32, float16 or bfloat16"),
    (dict(trg=torch.randn(4, 3, 8, dtype=torch.float16)), TypeError, r"src and trg must have the same dtype"),
    (dict(tclip=0.0), ValueError, r"tclip must be a positive finite number or None, got 0.0"),
    (dict(tclip=-1.0), ValueError, r"tclip must be a positive"),
    (dict(tclip=1e-39), ValueError, r"tclip must lie in float32's normal range \[1.17549e-38, 3.40282e\+38\] "
                                    r"\(or be None\), got 1e-39"),
    (dict(tclip=1e39), ValueError, r"tclip must lie in float32's normal range"),
    (dict(tclip=float("inf")), ValueError, r"tclip must be a positive finite"),
    (dict(reg_weight=-0.1), ValueError, r"reg_weight must be a finite number >= 0, got -0.1"),
    (dict(scale=float("nan")), ValueError, r"scale must be a finite number"),
    (dict(reduction="sum"), ValueError, r"reduction must be one of \('mean', 'group_means', 'none'\), got 'sum'"),
    (dict(backend="fastest"), ValueError, r"backend must be one of .*'auto'.*got 'fastest'"),
    (dict(src=torch.randn(3, 8), pos_idx=None), ValueError, r"pos_idx is required when N != M"),
]


@pytest.mark.parametrize("changes, exc, match", BAD, ids=[m for _, _, m in BAD])
def test_bad_input_is_refused(changes, exc, match):
    with pytest.raises(exc, match=match):
        call(**changes)


@pytest.mark.parametrize("options", [dict(tclip=20, reg_weight=0, scale=1), dict(
    tclip=np.float32(20.0), reg_weight=np.float64(0.05), scale=np.float32(0.25))], ids=["int", "numpy"])
def test_numbers_of_any_real_type_are_taken(options):
    """ints and numpy scalars are Python numbers (numbers.Real) and mean their value."""
    as_float = {k: float(v) for k, v in options.items()}
    inputs = good()
    for got, want in zip(call(**inputs, **options, backend="reference"),
                         call(**inputs, **as_float, backend="reference")):
        assert torch.equal(got, want)


def test_meta_tensors_on_other_device_are_refused():
    with pytest.raises(ValueError, match=r"src and trg must be on the same device, got src on cpu and trg on meta"):
        call(trg=torch.randn(4, 3, 8, device="meta"))
    with pytest.raises(ValueError, match=r"pos_idx must be on src's device cpu, got meta"):
        call(pos_idx=torch.zeros(4, dtype=torch.long, device="meta"))


def test_unavailable_backend_says_why():
    if "cpp" not in available_backends("cpu"):
        with pytest.raises(ValueError, match=r"backend 'cpp' is not available: .*not built"):
            call(backend="cpp")
    with pytest.raises(ValueError, match=r"backend 'cuda' is not available: .*needs CUDA tensors"):
        call(backend="cuda")


def test_available_backends_and_auto():
    names = available_backends("cpu")
    assert names[0] == "reference"
    assert set(available_backends()) >= set(names)
    kw = good()
    loss_auto, _ = nce_loss(kw["src"], kw["trg"], kw["pos_idx"], backend="auto")
    loss_ref, _ = nce_loss(kw["src"], kw["trg"], kw["pos_idx"], backend="reference")
    torch.testing.assert_close(loss_auto, loss_ref)


def test_gpu_without_a_kernel_image_is_not_cuda(monkeypatch):
    """A GPU the extension was not built for (e.g. a build for 9.0 only, on an A100)
    makes backend 'cuda' unavailable with the reason and a rebuild command, so `auto` takes
    the next backend, rather than failing at the first launch. The device is asked once;
    mocks stand in for the GPU and the extension."""
    from types import SimpleNamespace

    from amdim_kernels import environment, extension_loader, registry

    asked = []

    def kernel_image_error(index):
        asked.append(index)
        return "no kernel image is available for execution on the device" if index == 1 else ""

    monkeypatch.setattr(extension_loader, "STATE",
                        extension_loader.ExtensionState(SimpleNamespace(), ("cpu", "cuda"), "installed", None, None))
    monkeypatch.setattr(registry, "kernel_image_error", kernel_image_error)
    monkeypatch.setattr(registry, "KERNEL_IMAGE_ERRORS", {})
    monkeypatch.setattr(environment, "TRITON_INSTALLED", True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (8, 0))
    a100, h100 = torch.device("cuda", 1), torch.device("cuda", 0)
    for _ in range(2):
        assert registry.resolve("auto", h100) == "cuda"
        assert registry.resolve("auto", a100) == "triton"
    assert asked == [0, 1]
    with pytest.raises(ValueError, match=r"backend 'cuda' is not available: the compiled extension has no CUDA "
                                           r"kernels that this GPU \(compute capability 8.0\) can load: no kernel "
                                           r"image .* TORCH_CUDA_ARCH_LIST=8.0 pip install"):
        registry.resolve("cuda", a100)


# every backend that runs here, with its device; the reference's backward only after the
# autocast block (inside it, autocast rounds the reference's backward products)
AUTOCAST_CASES = [
    pytest.param(backend, device, inside, marks=here.marks,
                 id=f"{backend}-{device}-backward {'inside' if inside else 'after'}")
    for here in backends_here() for backend, device in [here.values]
    for inside in ([False] if backend == "reference" else [False, True])]


@pytest.mark.parametrize("backend, device, backward_inside", AUTOCAST_CASES)
def test_autocast_passes_features_through(backend, device, backward_inside):
    """Under autocast every backend takes float32 features as they come and returns float32,
    with the values and gradients it gives without autocast (the reference too, whose score
    product autocast would round to bfloat16). The fused backends' backward gives them also
    when it runs inside the autocast block, which PyTorch advises against."""
    leaves = torch.randn(6, 16, device=device), torch.randn(6, 4, 16, device=device)
    out = []
    for enabled in (False, True):
        src, trg = (x.clone().requires_grad_() for x in leaves)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=enabled):
            loss, reg = nce_loss(src, trg, backend=backend)
            if backward_inside:
                (loss + reg).backward()
        if not backward_inside:
            (loss + reg).backward()
        out.append((loss, reg, src.grad, trg.grad))
    assert all(x.dtype == torch.float32 for x in out[1])
    torch.testing.assert_close(out[1], out[0])


@pytest.mark.parametrize("backend", available_backends("cpu"))
def test_torch_func_transforms_need_the_reference(backend):
    """torch.func.grad of the reference is autograd's gradient; the fused backends, whose
    autograd Functions are not functorch-aware, refuse every transform before any kernel
    runs, naming the way out."""
    src, trg = torch.randn(5, 8), torch.randn(5, 3, 8)

    def total(s, t):
        return sum(nce_loss(s, t, backend=backend))

    if backend == "reference":
        leaves = src.clone().requires_grad_(), trg.clone().requires_grad_()
        want = torch.autograd.grad(total(*leaves), leaves)
        torch.testing.assert_close(torch.func.grad(total, argnums=(0, 1))(src, trg), want)
        return
    transforms = (torch.func.grad(total), lambda s, t: torch.func.vjp(total, s, t),
                  lambda s, t: torch.func.vmap(total)(s.expand(2, 5, 8), t.expand(2, 5, 3, 8)))
    for transform in transforms:
        with pytest.raises(RuntimeError, match=rf"backend '{backend}' does not support torch.func transforms.*"
                                               r"torch.autograd.*backend='reference'"):
            transform(src, trg)


def test_nested_tensors_are_refused():
    nested = torch.nested.nested_tensor([torch.randn(4, 8)], layout=torch.jagged)
    with pytest.raises(TypeError, match=r"src must be a dense \(strided\) tensor, got a nested tensor"):
        call(src=nested)


@pytest.mark.parametrize("backend", available_backends("cpu"))
def test_a_learnable_scale_through_the_sources(backend):
    """What the error for a tensor scale advises: src * t with scale=1.0 gives the loss of
    scale=t and carries t's gradient, d/dt = <src, d src> / t (a scales with t)."""
    src, trg = torch.randn(5, 8, requires_grad=True), torch.randn(5, 3, 8)
    t = torch.tensor(0.7, requires_grad=True)
    loss, reg = nce_loss(src * t, trg, scale=1.0, backend=backend)
    (loss + reg).backward()
    want_loss, want_reg = nce_loss(src, trg, scale=0.7, backend="reference")
    torch.testing.assert_close((loss, reg), (want_loss, want_reg))
    src_again = src.detach().requires_grad_()
    loss, reg = nce_loss(src_again, trg, scale=0.7, backend="reference")
    (loss + reg).backward()
    torch.testing.assert_close(t.grad, (src.detach() * src_again.grad).sum() / 0.7, rtol=1e-5, atol=1e-6)


def test_int32_pos_idx_is_accepted():
    kw = good()
    loss32, _ = nce_loss(kw["src"], kw["trg"], kw["pos_idx"].int(), backend="reference")
    loss64, _ = nce_loss(kw["src"], kw["trg"], kw["pos_idx"], backend="reference")
    torch.testing.assert_close(loss32, loss64)


@pytest.mark.parametrize("backend", available_backends("cpu"))
def test_strided_pos_idx_equals_its_packed_copy(backend):
    """A pos_idx with stride 2 (every other entry of a longer tensor) gives what its packed
    copy gives: the kernels read a packed array, so the call packs it first."""
    src, trg = torch.randn(4, 8, requires_grad=True), torch.randn(6, 3, 8, requires_grad=True)
    strided = torch.randint(0, 6, (8,))[::2]
    assert strided.stride() == (2,)
    got, want = (nce_loss(src, trg, p, reduction="none", backend=backend) for p in (strided, strided.contiguous()))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    weight = torch.rand_like(want[0])
    grads = [torch.autograd.grad((loss * weight).sum() + reg, (src, trg)) for loss, reg in (got, want)]
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


@pytest.mark.parametrize("ranges, values", [(range(4, 7), [4, 5, 6]), ((range(5, 7), range(6, 3, -1)), [5, 6, 6, 5, 4]),
                                            ([range(2), range(0), range(2)], [0, 1, 0, 1])],
                         ids=["range", "tuple", "list"])
@pytest.mark.parametrize("backend", available_backends("cpu"))
def test_range_pos_idx_equals_its_tensor_and_reads_nothing_back(backend, ranges, values):
    """A range, or a tuple or list of ranges, is checked on the host: the call never reads a
    tensor back (no device sync on a GPU), and it gives what the same indices as a tensor give."""
    src, trg = torch.randn(len(values), 8, requires_grad=True), torch.randn(7, 5, 8, requires_grad=True)
    with mock.patch.object(torch.Tensor, "tolist", side_effect=AssertionError("read back")), \
            mock.patch.object(torch.Tensor, "item", side_effect=AssertionError("read back")):
        got = nce_loss(src, trg, ranges, reduction="none", backend=backend)
    want = nce_loss(src, trg, torch.tensor(values), reduction="none", backend=backend)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    weight = torch.rand_like(want[0])
    grads = [torch.autograd.grad((loss * weight).sum() + reg, (src, trg)) for loss, reg in (got, want)]
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def test_build_info_reports_what_can_run():
    from amdim_kernels import build_info

    info = build_info()
    assert info["torch"] == torch.__version__
    assert info["available_backends"]["cpu"] == available_backends("cpu")
    assert info["auto"]["cpu"] in info["available_backends"]["cpu"]
    if "cpp" in available_backends("cpu"):
        assert "cpu" in info["extension_built_for"]


@pytest.mark.parametrize("backend", [b for b in available_backends("cpu") if b != "reference"])
def test_double_backward_is_a_clear_error(backend):
    """The fused backends give first derivatives only. Under create_graph=True their gradients
    keep their values, a gradient penalty on another leaf of the same graph still works, and
    differentiating their own gradients raises, naming the way out, rather than silently
    leaving nce_loss's part out."""
    src, trg = torch.randn(4, 8, requires_grad=True), torch.randn(5, 3, 8, requires_grad=True)
    y = torch.randn(6, requires_grad=True)
    pos_idx = torch.tensor([4, 0, 2, 2])
    want = torch.autograd.grad(sum(nce_loss(src, trg, pos_idx, backend=backend)), (src, trg))
    loss, reg = nce_loss(src, trg, pos_idx, backend=backend)
    d_src, d_trg, d_y = torch.autograd.grad(loss + reg + y.sin().square().sum(), (src, trg, y), create_graph=True)
    torch.testing.assert_close((d_src, d_trg), want, rtol=0, atol=0)
    penalty, = torch.autograd.grad(d_y.square().sum(), y, retain_graph=True)  # d/dy of sin(2y)^2
    torch.testing.assert_close(penalty, 2 * torch.sin(2 * y) * torch.cos(2 * y) * 2)
    for grad, leaf in ((d_src, src), (d_trg, trg)):
        with pytest.raises(RuntimeError, match=r"first derivatives only.*backend='reference'"):
            torch.autograd.grad(grad.square().sum(), leaf, retain_graph=True)
