"""chronicals::linear_cross_entropy against an fp64 truth (the numerics rule of tests/helpers.py).

On CPU the Triton kernels run in the interpreter (conftest), so shapes are tiny but odd: H=24 is
not a multiple of BLOCK_K, N=37/38 and V=131/1000 are not multiples of BLOCK_N/BLOCK_V, the
forward splits the vocabulary (its last split ends in a tile wholly past V), and the backward
walks it in several chunks.
"""

from __future__ import annotations

import pytest
import torch

import chronicals.ops.linear_cross_entropy as lce
import chronicals.ops.linear_cross_entropy_frozen as frozen_head
from chronicals import reference
from chronicals.ops.linear_cross_entropy import linear_cross_entropy
from tests.helpers import ULP, assert_no_worse_than_eager, count_frozen_lce_calls, devices

# The loss is an fp32 sum over H products and V exponentials taken in another order than eager's:
# a few fp32 ulps of a loss of ~5.
LOSS_ATOL = 1e-5


def _assert_grad_no_worse_than_eager(name, out, eager, truth):
    """Gradients are GEMM outputs: every element carries the rounding of ~V (or ~N) dlogits
    terms, so one element of the kernel can be unlucky where eager was lucky. The rule for them:
    norm-wise no worse than eager (25% slack, plus one ulp of the dtype for when eager is exact),
    and element-wise within eager's own error there plus twice eager's worst error, which a
    wrong row or column (an error the size of the gradient) never is."""
    truth = truth.double()
    eager_err = eager.double() - truth
    assert_no_worse_than_eager(name, out, eager, truth, atol=2 * float(eager_err.abs().max()))
    err_norm = float((out.double() - truth).norm())
    allowed = 1.25 * float(eager_err.norm()) + ULP[out.dtype] * float(truth.norm())
    assert err_norm <= allowed, f"{name}: error norm {err_norm:.3e} > allowed {allowed:.3e}"


def _inputs(shape, hidden_size, vocab, dtype, device, ignored=0.2, scale=1.0):
    hidden = torch.randn(*shape, hidden_size, device=device).to(dtype)
    weight = (torch.randn(vocab, hidden_size, device=device) * scale / hidden_size**0.5).to(dtype)
    labels = torch.randint(0, vocab, shape, device=device)
    labels[torch.rand(shape, device=device) < ignored] = -100
    return hidden, weight, labels


def _loss_and_grads(fn, hidden, weight, labels, grad_hidden=True, grad_weight=True, **kwargs):
    """Loss and the gradients of hidden and weight (None where not required) for an upstream
    gradient drawn in [0.5, 1.5), the same for every fn."""
    h = hidden.detach().requires_grad_(grad_hidden)
    w = weight.detach().requires_grad_(grad_weight)
    loss = fn(h, w, labels, **kwargs)
    gen = torch.Generator().manual_seed(1)
    grad = torch.rand(loss.shape, generator=gen, dtype=torch.float64).add(0.5)
    loss.backward(grad.to(loss.device, loss.dtype))
    return loss.detach(), h.grad, w.grad


def _check(hidden, weight, labels, grad_hidden=True, grad_weight=True, **kwargs):
    """Loss, d_hidden and d_weight of the op vs eager (reference in the same dtype) vs fp64."""
    flags = dict(grad_hidden=grad_hidden, grad_weight=grad_weight)
    out = _loss_and_grads(linear_cross_entropy, hidden, weight, labels, **flags, **kwargs)
    eager = _loss_and_grads(reference.linear_cross_entropy, hidden, weight, labels, **flags,
                            **kwargs)
    truth = _loss_and_grads(reference.linear_cross_entropy, hidden.double(), weight.double(),
                            labels, **flags, **kwargs)
    dtype = hidden.dtype
    assert out[0].dtype == torch.float32
    assert_no_worse_than_eager("loss", out[0], eager[0], truth[0], atol=LOSS_ATOL)
    for name, o, e, t in zip(("d_hidden", "d_weight"), out[1:], eager[1:], truth[1:]):
        if t is None:
            assert o is None, f"{name} computed although not required"
            continue
        assert o.dtype == dtype
        _assert_grad_no_worse_than_eager(name, o, e, t)
    return out


@pytest.mark.parametrize("d_hidden_in_forward", [False, True])
def test_opcheck(d_hidden_in_forward):
    hidden, weight, labels = _inputs((2, 3), 16, 40, torch.float32, "cpu")
    hidden.requires_grad_()
    weight.requires_grad_(not d_hidden_in_forward)
    args = (hidden, weight, labels, None, None, -100, "mean", True, None, 0.37, 0.0, 0.0,
            d_hidden_in_forward)
    torch.library.opcheck(torch.ops.chronicals.linear_cross_entropy.default, args)
    _loss, lse, _ = torch.ops.chronicals.linear_cross_entropy(*args)
    bwd_args = (torch.ones(()), hidden.detach(), weight.detach(), labels, lse, None, None, -100,
                "mean", True, None, 0.37, 0.0, 0.0, True, False)
    torch.library.opcheck(torch.ops.chronicals.linear_cross_entropy_backward.default, bwd_args)
    torch.library.opcheck(torch.ops.chronicals.linear_cross_entropy_scale.default,
                          (torch.randn(6, 16), torch.tensor(0.75)))


OPTIONS = {
    "mean": dict(),
    "sum": dict(reduction="sum"),
    "none": dict(reduction="none"),
    "shift": dict(shift=True),
    "softcap_sum_shift": dict(softcap=2.0, reduction="sum", shift=True),
    "scale_sum_shift": dict(logit_scale=0.37, reduction="sum", shift=True),
    "scale_softcap_z_smoothing": dict(logit_scale=2.5, softcap=3.0, z_loss=1e-3,
                                      label_smoothing=0.05),
    "z_loss": dict(z_loss=1e-2),
    "smoothing_none": dict(label_smoothing=0.1, reduction="none"),
    "num_items_int": dict(num_items_in_batch=29),
}
# Every option in bf16 (the training dtype); a spread of them in fp32 and fp16 (the interpreter
# costs ~1 s per forward + backward, and the dtypes share every code path but the tile dtype).
CASES = [(torch.bfloat16, name) for name in OPTIONS] + [
    (dtype, name) for dtype in (torch.float32, torch.float16)
    for name in ("mean", "softcap_sum_shift", "smoothing_none", "scale_softcap_z_smoothing")
]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype, options", CASES, ids=[f"{d}-{n}" for d, n in CASES])
def test_matches_fp64_truth(device, dtype, options):
    hidden, weight, labels = _inputs((2, 19), 24, 131, dtype, device, scale=4.0)
    _check(hidden, weight, labels, **OPTIONS[options])


@pytest.mark.parametrize("device", devices())
def test_all_options_many_chunks_and_splits(device, monkeypatch):
    """V=1000 (15.6 tiles of 64), a backward walked in 8 chunks of 128 columns, every option at
    once, a num_items_in_batch tensor, and an all-ignored row."""
    monkeypatch.setattr(lce, "_DLOGITS_CHUNK_ELEMENTS", 10 * 128)
    hidden, weight, labels = _inputs((2, 5), 24, 1000, torch.bfloat16, device, scale=4.0)
    labels[1] = -100
    _check(hidden, weight, labels, shift=True, softcap=3.0, logit_scale=0.7, z_loss=1e-3,
           label_smoothing=0.05, num_items_in_batch=torch.tensor(7, device=device))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("hidden_size, tma", [(24, True), (20, False)])
def test_tma_and_pointer_loads(device, hidden_size, tma):
    """Operands load through TMA descriptors when their rows are 16-byte aligned (H=24 in bf16:
    48 bytes) and through pointers otherwise (H=20: 40 bytes); both paths match the truth."""
    hidden, weight, labels = _inputs((2, 19), hidden_size, 131, torch.bfloat16, device, scale=4.0)
    on_hopper = device == "cpu" or torch.cuda.get_device_capability() >= (9, 0)
    assert lce._tma_ok(hidden.view(-1, hidden_size), weight) == (tma and on_hopper)
    _check(hidden, weight, labels, shift=True, softcap=3.0, label_smoothing=0.05)


@pytest.mark.parametrize("device", devices())
def test_hidden_strided_in_its_last_dim(device):
    hidden, weight, labels = _inputs((2, 19), 48, 131, torch.bfloat16, device)
    _check(hidden[..., ::2], weight[:, ::2].contiguous(), labels)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fully_ignored_batch_is_zero_not_nan(device, reduction):
    hidden, weight, labels = _inputs((3, 4), 24, 131, torch.bfloat16, device, ignored=1.0)
    loss, d_hidden, d_weight = _check(hidden, weight, labels, reduction=reduction, shift=True)
    assert torch.all(loss == 0)
    assert torch.all(d_hidden == 0) and torch.all(d_weight == 0)


@pytest.mark.parametrize("device", devices())
def test_frozen_weight_gets_no_weight_gradient_work(device, monkeypatch):
    """LoRA's frozen LM head: d_weight is neither returned nor computed (no GEMM writes a
    [V, H] result)."""
    d_weight_gemms = []
    mm = torch.mm

    def counting_mm(a, b, **kwargs):
        out = mm(a, b, **kwargs)
        d_weight_gemms.extend([1] if out.shape == weight.shape else [])
        return out

    monkeypatch.setattr(torch, "mm", counting_mm)
    hidden, weight, labels = _inputs((37,), 24, 131, torch.bfloat16, device)
    for reduction in ("mean", "none"):  # hidden's gradient in the forward, and in the backward
        _check(hidden, weight, labels, grad_weight=False, reduction=reduction)
    assert not d_weight_gemms


FROZEN_CASES = ["mean", "sum", "shift", "softcap_sum_shift", "z_loss", "smoothing_sum",
                "num_items_int", "scale_sum_shift", "scale_softcap", "scale_z_smoothing"]
OPTIONS_FROZEN = {
    **OPTIONS,
    "smoothing_sum": dict(label_smoothing=0.1, reduction="sum"),
    "scale_softcap": dict(logit_scale=2.5, softcap=3.0),
    "scale_z_smoothing": dict(logit_scale=0.37, z_loss=1e-2, label_smoothing=0.1),
}


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("options", FROZEN_CASES)
def test_frozen_weight_gradient_in_the_forward(device, dtype, options, monkeypatch):
    """A frozen weight and a scalar loss: the forward computes d_hidden (for an upstream
    gradient of 1, scaled in the backward by the test's random one) over logits blocks of 8
    tokens x 48 vocab columns: 5 token chunks (the last one short) x 3 blocks (the last 35
    columns), so running maxima grow and accumulators are rescaled between blocks."""
    calls = count_frozen_lce_calls(monkeypatch)
    monkeypatch.setattr(frozen_head, "_frozen_blocks", lambda *a: (8, 48))
    hidden, weight, labels = _inputs((2, 19), 24, 131, dtype, device, scale=4.0)
    _check(hidden, weight, labels, grad_weight=False, **OPTIONS_FROZEN[options])
    assert calls == [1]


@pytest.mark.parametrize("device", devices())
def test_frozen_weight_all_options_and_ignored_rows(device, monkeypatch):
    calls = count_frozen_lce_calls(monkeypatch)
    monkeypatch.setattr(frozen_head, "_frozen_blocks", lambda *a: (3, 320))
    hidden, weight, labels = _inputs((2, 5), 24, 1000, torch.bfloat16, device, scale=4.0)
    labels[1] = -100
    common = dict(grad_weight=False, shift=True, logit_scale=1.7, z_loss=1e-3,
                  num_items_in_batch=torch.tensor(7, device=device))
    _check(hidden, weight, labels, label_smoothing=0.05, **common)
    _check(hidden, weight, labels, softcap=3.0, **common)
    assert calls == [1, 1]
    # Softcap with label smoothing: the gradient is taken in the backward.
    _check(hidden, weight, labels, softcap=3.0, label_smoothing=0.05, **common)
    assert calls == [1, 1]


@pytest.mark.parametrize("device", devices())
def test_frozen_weight_growing_maxima_rescale_exactly(device, monkeypatch):
    """Logits that rise block after block (each token's running max grows at every block, so its
    accumulator is rescaled each time) and a batch whose every label is ignored (zero loss and
    gradient, not NaN)."""
    monkeypatch.setattr(frozen_head, "_frozen_blocks", lambda *a: (4, 16))
    hidden = torch.randn(6, 24, device=device, dtype=torch.float64)
    ramp = torch.linspace(0, 12, 80, device=device, dtype=torch.float64)[:, None]
    weight = torch.randn(80, 24, device=device, dtype=torch.float64) * 0.2 + ramp * hidden.mean(0)
    hidden, weight = hidden.float(), (weight / weight.norm(dim=1, keepdim=True) * 3).float()
    labels = torch.randint(0, 80, (6,), device=device)
    _check(hidden, weight, labels, grad_weight=False)
    out = linear_cross_entropy(hidden.requires_grad_(), weight, torch.full_like(labels, -100))
    out.backward()
    assert out.item() == 0.0 and hidden.grad.abs().max().item() == 0.0


def test_frozen_blocks_stay_within_their_budget(monkeypatch):
    """The GPU's block choice (the interpreter's tiny blocks aside): block + fp32 accumulator
    within 1% of the bf16 logits, or within the gradient [N, H] the path keeps anyway, or within
    the 8 MiB floor for small problems, and never above 48 MiB."""
    monkeypatch.setattr(frozen_head, "interpreter_on", lambda: False)
    shapes = [(16384, 896, 151936), (16384, 2048, 128256), (8192, 4096, 128256),
              (8192, 2304, 256000), (300, 64, 1000), (5, 8192, 32000), (65536, 16384, 32000),
              (0, 896, 151936)]
    for N, H, V in shapes:
        rows, cols = frozen_head._frozen_blocks(N, H, V, 2)
        assert 1 <= rows <= max(1, min(N, 2048)) and cols % 256 == 0 and 256 <= cols < V + 256
        used = 4 * rows * H + 2 * rows * cols
        allowed = max(0.01 * N * V * 2, N * H * 2, frozen_head._FROZEN_MIN_BYTES)
        assert used <= min(allowed, frozen_head._FROZEN_MAX_BYTES), (N, H, V, rows, cols)
    assert frozen_head._frozen_blocks(16384, 896, 151936, 2) == (2048, 9472)
    assert frozen_head._frozen_blocks(8192, 4096, 128256, 2) == (1024, 16384)
    assert frozen_head._frozen_blocks(300, 64, 1000, 2) == (300, 1024)  # one block


def test_gradient_in_the_forward_only_when_a_backward_wants_hidden_alone(monkeypatch):
    h = torch.zeros(3, 4, requires_grad=True)
    w = torch.zeros(5, 4)
    assert lce.takes_frozen_head_path(h, w, "mean") and lce.takes_frozen_head_path(h, w, "sum")
    assert not lce.takes_frozen_head_path(h, w, "none")  # per-token upstream gradients
    assert not lce.takes_frozen_head_path(h, w.requires_grad_(), "mean")  # dW needs the backward
    assert not lce.takes_frozen_head_path(h.detach(), w.detach(), "mean")
    assert not lce.takes_frozen_head_path(h.half(), w.detach().half(), "mean")  # fp16 loss scale
    frozen = w.detach()
    assert lce.takes_frozen_head_path(h, frozen, "mean", softcap=2.0)
    assert lce.takes_frozen_head_path(h, frozen, "mean", label_smoothing=0.1)
    assert not lce.takes_frozen_head_path(h, frozen, "mean", softcap=2.0, label_smoothing=0.1)
    with torch.no_grad():
        assert not lce.takes_frozen_head_path(h, w.detach(), "mean")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the reference path: gradients in the backward
    assert not lce.takes_frozen_head_path(h, w.detach(), "mean")


def test_gradient_in_the_forward_refuses_a_weight_that_needs_grad():
    hidden, weight, labels = _inputs((2, 3), 16, 40, torch.float32, "cpu")
    args = (hidden.requires_grad_(), weight.requires_grad_(), labels, None, None, -100, "mean",
            False, None, None, 0.0, 0.0, True)
    loss, _, _ = torch.ops.chronicals.linear_cross_entropy(*args)
    with pytest.raises(RuntimeError,
                       match="d_hidden_in_forward=True, which computes hidden's alone"):
        loss.backward()
    for reduction, dtype in (("none", torch.float32), ("mean", torch.float16)):
        args = (hidden.detach().to(dtype), weight.detach().to(dtype), labels, None, None, -100,
                reduction, False, None, None, 0.0, 0.0, True)
        with pytest.raises(ValueError, match=f"d_hidden_in_forward needs a scalar loss .* Got "
                                             f"reduction='{reduction}', dtype {dtype}"):
            torch.ops.chronicals.linear_cross_entropy(*args)


@pytest.mark.parametrize("device", devices())
def test_frozen_hidden_and_int32_labels(device):
    hidden, weight, labels = _inputs((37,), 24, 131, torch.float16, device)
    _check(hidden, weight, labels.int(), grad_hidden=False, reduction="sum")


@pytest.mark.parametrize("device", devices())
def test_num_items_in_batch_divides_the_sum_on_device(device):
    hidden, weight, labels = _inputs((2, 19), 24, 131, torch.float32, device)
    total = linear_cross_entropy(hidden, weight, labels, reduction="sum")
    as_int = linear_cross_entropy(hidden, weight, labels, num_items_in_batch=13)
    as_tensor = linear_cross_entropy(hidden, weight, labels,
                                     num_items_in_batch=torch.tensor(13.0, device=device))
    # fp32 default tolerances: CUDA may divide by a Python scalar through its reciprocal.
    torch.testing.assert_close(as_int, total / 13)
    torch.testing.assert_close(as_tensor, total / 13)


def test_compiles_fullgraph_without_host_sync():
    hidden, weight, labels = _inputs((2, 9), 16, 40, torch.float32, "cpu")
    h = hidden.clone().requires_grad_()
    step = torch.compile(
        lambda h, w, y, n: linear_cross_entropy(h, w, y, shift=True, num_items_in_batch=n),
        backend="aot_eager", fullgraph=True,
    )
    n = torch.tensor(11)
    step(h, weight, labels, n).backward()
    expected = h.detach().clone().requires_grad_()
    reference.linear_cross_entropy(expected, weight, labels, shift=True,
                                   num_items_in_batch=n).backward()
    torch.testing.assert_close(h.grad, expected.grad, rtol=1e-5, atol=1e-7)


def test_reference_path_without_interpreter(monkeypatch):
    """CPU without TRITON_INTERPRET runs chronicals.reference, forward and backward."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    hidden, weight, labels = _inputs((2, 7), 16, 40, torch.float32, "cpu")
    options = dict(shift=True, label_smoothing=0.1, logit_scale=0.37)
    out = _loss_and_grads(linear_cross_entropy, hidden, weight, labels, **options)
    ref = _loss_and_grads(reference.linear_cross_entropy, hidden, weight, labels, **options)
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, rtol=0, atol=0)


def test_noncontiguous_hidden():
    hidden, weight, labels = _inputs((7, 3), 24, 131, torch.float32, "cpu")
    _check(hidden.transpose(0, 1), weight, labels.t(), shift=True)


BAD_INPUTS = [
    (dict(labels=torch.zeros(5, dtype=torch.long)), ValueError,
     r"labels must have shape \(2, 3\)"),
    (dict(labels=torch.zeros(2, 3)), TypeError, "labels must be int64 or int32. Got torch.float32"),
    (dict(weight=torch.zeros(11, 8)), ValueError,
     r"weight must have shape \(V, 16\).*Got \(11, 8\)"),
    (dict(weight=torch.zeros(11, 16, dtype=torch.float16)), TypeError, "hidden's dtype"),
    (dict(hidden=torch.zeros(2, 3, 16, dtype=torch.int32)), TypeError, "hidden must be float32"),
    (dict(labels=torch.zeros(2, 3, dtype=torch.long, device="meta")), ValueError, "one device"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(softcap=0.0), ValueError, "softcap must be None or finite and > 0. Got 0.0"),
    (dict(softcap=float("inf")), ValueError, "softcap must be None or finite and > 0. Got inf"),
    (dict(logit_scale=float("nan")), ValueError, "logit_scale must be None or finite. Got nan"),
    (dict(logit_scale=float("-inf")), ValueError, "logit_scale must be None or finite. Got -inf"),
    (dict(z_loss=float("inf")), ValueError, "z_loss must be finite and >= 0. Got inf"),
    (dict(z_loss=-1e-4), ValueError, "z_loss must be finite and >= 0"),
    (dict(num_items_in_batch=0), ValueError, "num_items_in_batch must be >= 1. Got 0"),
    (dict(num_items_in_batch=-3), ValueError, "num_items_in_batch must be >= 1. Got -3"),
    (dict(hidden=torch.zeros(2, 3, 0), weight=torch.zeros(11, 0)), ValueError,
     r"at least one vocab row and hidden column. Got \(11, 0\)"),
    (dict(labels=torch.zeros(2, 3, dtype=torch.int32), ignore_index=2**32 + 3), ValueError,
     r"ignore_index must fit the labels' dtype torch.int32 \(\[-2147483648, 2147483647\]\)"),
    (dict(label_smoothing=1.5), ValueError, r"label_smoothing must be in \[0, 1\]"),
    (dict(num_items_in_batch=torch.ones(2)), ValueError, "one-element tensor"),
    (dict(num_items_in_batch=2.5), TypeError, "num_items_in_batch must be an int"),
    # PyTorch's CPU cross-entropy message; on CUDA the token's loss is NaN (test below).
    (dict(labels=torch.tensor([[0, 1, 11], [0, -100, 2]])), IndexError,
     "Target 11 is out of bounds"),
    (dict(labels=torch.tensor([[0, 1, -5], [0, -100, 2]])), IndexError,
     "Target -5 is out of bounds"),
]


@pytest.mark.parametrize("change, error, match", BAD_INPUTS)
def test_bad_inputs(change, error, match):
    args = dict(hidden=torch.zeros(2, 3, 16), weight=torch.zeros(11, 16),
                labels=torch.zeros(2, 3, dtype=torch.long))
    args.update(change)
    hidden, weight, labels = args.pop("hidden"), args.pop("weight"), args.pop("labels")
    with pytest.raises(error, match=match):
        linear_cross_entropy(hidden, weight, labels, **args)


def test_shift_never_checks_the_unscored_first_label():
    """With shift, each row's first label is scored against nothing, so an out-of-range value
    there is not an error (HF's shifted labels drop it); the same value further on is."""
    hidden, weight, labels = _inputs((2, 5), 16, 11, torch.float32, "cpu", ignored=0.0)
    labels[:, 0] = 99
    _check(hidden, weight, labels, shift=True)
    labels[1, 2] = 99
    with pytest.raises(IndexError, match="Target 99 is out of bounds"):
        linear_cross_entropy(hidden, weight, labels, shift=True)


@pytest.mark.parametrize("device", devices())
def test_empty_token_dims(device):
    hidden = torch.zeros(2, 0, 16, device=device, requires_grad=True)
    weight = torch.randn(11, 16, device=device, requires_grad=True)
    labels = torch.zeros(2, 0, dtype=torch.long, device=device)
    loss = linear_cross_entropy(hidden, weight, labels)
    assert loss.shape == () and loss.item() == 0.0
    loss.backward()
    assert hidden.grad.shape == hidden.shape
    torch.testing.assert_close(weight.grad, torch.zeros_like(weight))
    assert linear_cross_entropy(hidden, weight, labels, reduction="none").shape == (2, 0)
    hidden.grad = None
    linear_cross_entropy(hidden, weight.detach(), labels).backward()  # frozen head
    assert hidden.grad.shape == hidden.shape


@pytest.mark.cuda
def test_out_of_range_label_poisons_loss_on_cuda():
    hidden, weight, labels = _inputs((8,), 64, 300, torch.bfloat16, "cuda", ignored=0.0)
    labels[3] = 300
    loss = linear_cross_entropy(hidden, weight, labels, reduction="none")
    assert torch.isnan(loss[3]) and not torch.isnan(loss[:3]).any()
