"""bf16 matmuls computed in fp32 on CPUs without native bf16 kernels (modules/wide_matmul.py)."""

import subprocess
import sys
import threading

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from modules import mkl_bf16, wide_matmul
from modules.fp8 import quantize_linears
from modules.wide_matmul import linear, matmul, set_wide_cpu_matmuls, wide_cpu_matmuls, widen_linears
from networks.lora_kandinsky import create_network

from .dit_helpers import random_dit, random_inputs

BF16 = torch.bfloat16


KERNELS = ["mkl", "widening"]
NO_MKL = "this PyTorch carries no MKL bf16 GEMM"
needs_mkl = pytest.mark.skipif(not mkl_bf16.available(), reason=NO_MKL)


@pytest.fixture(autouse=True)
def default_kernels():
    """Every test leaves the choice of path and kernel as it found it: decided by the CPU, MKL allowed."""
    yield
    set_wide_cpu_matmuls(None)
    wide_matmul.use_mkl_bf16(True)


def use_kernel(kernel: str) -> None:
    """Take the fp32 path with one of its two kernels (see modules/wide_matmul.py)."""
    if kernel == "mkl" and not mkl_bf16.available():
        pytest.skip(NO_MKL)
    set_wide_cpu_matmuls(True)
    wide_matmul.use_mkl_bf16(kernel == "mkl")


@pytest.fixture(params=KERNELS)
def wide(request):
    use_kernel(request.param)
    return request.param


@pytest.fixture
def small_chunks(monkeypatch):
    """Blocks of 16 weight rows, so a 100-row weight is widened in 7 blocks (the last of 4 rows)."""
    monkeypatch.setattr(wide_matmul, "BLOCK_ROWS", 16)


def bf16_operands(seed=0, rows=100, features=64, tokens=(3, 5)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*tokens, features, generator=g).to(BF16)
    weight = (torch.randn(rows, features, generator=g) * 0.1).to(BF16)
    bias = torch.randn(rows, generator=g).to(BF16)
    return x, weight, bias


def test_wide_linear_is_the_fp32_product_rounded_once(wide, small_chunks):
    x, weight, bias = bf16_operands()
    out = linear(x, weight, bias)
    expected = F.linear(x.float(), weight.float(), bias.float())
    assert out.dtype == BF16 and out.shape == (3, 5, 100)
    # exact fp32 sums of exact bf16 products, rounded to bf16 once: at most half a bf16 step off
    assert ((out.float() - expected).abs() <= expected.abs() * 2**-8 + 1e-6).all()
    assert torch.equal(linear(x, weight), F.linear(x.float(), weight.float()).to(BF16))
    native = F.linear(x, weight, bias)  # PyTorch's own bf16 kernel, fp32 accumulation too
    torch.testing.assert_close(out, native, rtol=2**-7, atol=1e-2)


def _block_sizes(rows: int, features: int = 64) -> list[int]:
    blocks = list(wide_matmul._row_blocks(torch.empty(rows, features, dtype=BF16)))
    assert blocks[0][0] == 0 and blocks[-1][1] == rows
    assert [start for start, _ in blocks[1:]] == [end for _, end in blocks[:-1]]  # no gap, no overlap
    return [end - start for start, end in blocks]


def test_weight_rows_are_widened_in_blocks_of_block_rows_a_short_remainder_joining_the_last(small_chunks):
    assert _block_sizes(100) == [16] * 6 + [4]
    assert _block_sizes(99) == [16] * 5 + [19]  # 3 rows alone would be a GEMM too thin to run fast
    assert _block_sizes(16) == [16] and _block_sizes(5) == [5]


def test_blocks_have_fewer_rows_where_block_rows_of_fp32_would_pass_the_scratch_limit(monkeypatch):
    monkeypatch.setattr(wide_matmul, "SCRATCH_LIMIT", 4 * 1000 * 200)  # 200 rows of 1000 features
    assert wide_matmul._rows_per_block(1000) == 192  # a multiple of 64 that fits
    assert wide_matmul._rows_per_block(10) == wide_matmul.BLOCK_ROWS
    assert wide_matmul._rows_per_block(10**6) == 64  # never fewer
    assert _block_sizes(1010, 1000) == [192] * 5 + [50] and _block_sizes(1000, 1000) == [192] * 4 + [232]


def test_wide_linear_gradients_match_fp32_math(wide, small_chunks):
    x, weight, bias = bf16_operands(seed=1)
    leaves = [t.clone().requires_grad_(True) for t in (x, weight, bias)]
    out = linear(*leaves)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(BF16)
    out.backward(grad)
    g = grad.float().reshape(-1, 100)
    expected = {
        "x": (g @ weight.float()).view(x.shape),
        "weight": g.t() @ x.float().reshape(-1, 64),
        "bias": g.sum(0),
    }
    for name, leaf in zip(expected, leaves, strict=True):
        assert leaf.grad.dtype == BF16, name
        torch.testing.assert_close(leaf.grad.float(), expected[name], rtol=2**-7, atol=1e-3, msg=name)


def test_frozen_weight_gets_no_gradient_and_the_input_does(wide, small_chunks):
    x, weight, bias = bf16_operands(seed=3)
    x.requires_grad_(True)
    linear(x, weight, bias).float().sum().backward()
    assert weight.grad is None and bias.grad is None
    torch.testing.assert_close(x.grad.float(), weight.float().sum(0).expand(x.shape), rtol=2**-7, atol=1e-3)


def saved_for_backward(function, *args) -> list[torch.Tensor]:
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        function(*args)
    return saved


def test_the_input_is_kept_for_the_backward_only_when_the_weight_is_trained(wide, small_chunks):
    # A frozen weight needs no input for its gradient: keeping it (every Linear's input, for the
    # whole forward) was 30% of a frozen DiT's activations in forward+backward.
    x, weight, bias = bf16_operands(seed=5)
    x.requires_grad_(True)
    assert all(t.data_ptr() != x.data_ptr() for t in saved_for_backward(linear, x, weight, bias))
    weight.requires_grad_(True)
    assert any(t.data_ptr() == x.data_ptr() for t in saved_for_backward(linear, x, weight, bias))


def test_repeated_products_of_other_shapes_do_not_disturb_each_other(wide, small_chunks):
    # the fp32 input, product and gradient buffers are reused from call to call
    outputs, grads = [], []
    for seed, (rows, features, tokens) in enumerate([(100, 64, (3, 5)), (40, 16, (7,)), (100, 64, (2, 9))]):
        x, weight, bias = bf16_operands(seed, rows, features, tokens)
        x.requires_grad_(True)
        out = linear(x, weight, bias)
        out.float().square().sum().backward()
        outputs.append((out, F.linear(x.float(), weight.float(), bias.float())))
        grads.append((x.grad, (2 * out.float()).reshape(-1, rows) @ weight.float()))
    for out, expected in outputs:
        torch.testing.assert_close(out.float(), expected, rtol=2**-7, atol=1e-3)
    for grad, expected in grads:
        torch.testing.assert_close(grad.float(), expected.view(grad.shape), rtol=2**-6, atol=1e-2)


def test_wide_matmul_rounds_once_and_fp32_is_untouched(wide):
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(2, 7, 9, generator=g).to(BF16), torch.randn(2, 9, 4, generator=g).to(BF16)
    assert torch.equal(matmul(a, b), torch.matmul(a.float(), b.float()).to(BF16))
    a32, b32 = a.float(), b.float()
    assert torch.equal(matmul(a32, b32), torch.matmul(a32, b32))
    assert not wide_cpu_matmuls(torch.float32)


def test_the_choice_follows_the_override_variable(monkeypatch):
    set_wide_cpu_matmuls(None)
    monkeypatch.setenv(wide_matmul.ENV_OVERRIDE, "fp32")
    assert wide_cpu_matmuls(BF16)
    monkeypatch.setenv(wide_matmul.ENV_OVERRIDE, "native")
    assert not wide_cpu_matmuls(BF16)
    monkeypatch.setenv(wide_matmul.ENV_OVERRIDE, "auto")
    assert wide_cpu_matmuls(BF16) == (not wide_matmul._native_kernel(BF16))
    monkeypatch.setenv(wide_matmul.ENV_OVERRIDE, "fast")
    with pytest.raises(ValueError, match="KANDINSKY5_CPU_MATMUL='fast'"):
        wide_cpu_matmuls(BF16)


class ReducedMatmuls(TorchFunctionMode):
    """Records each matrix product whose operands are bf16 (the kernels this machine may lack)."""

    PRODUCTS = {F.linear, torch.matmul, torch.mm, torch.bmm, torch.addmm, torch.Tensor.matmul, torch.Tensor.__matmul__}

    def __init__(self):
        super().__init__()
        self.reduced = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.PRODUCTS and any(isinstance(a, torch.Tensor) and a.dtype == BF16 for a in args):
            self.reduced.append(func.__name__)
        return func(*args, **(kwargs or {}))


def bf16_dit(kind: str):
    model = random_dit("tiny-t2v").set_compute_dtype(BF16)
    if kind == "lora":
        network = create_network(model, 4, 4)
        for lora in network.loras.values():
            torch.nn.init.normal_(lora.lora_up.weight, std=0.1)
        network.apply_to(model)
    elif kind == "fp8":
        quantize_linears(model, lambda name: "modulation" not in name and "embeddings" not in name)
    return model


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("kind", ["plain", "lora", "fp8"])
def test_a_bf16_dit_on_the_fp32_path_runs_no_bf16_product_and_keeps_its_output(kind, kernel):
    model = bf16_dit(kind)
    inputs = random_inputs(model, 2, 2, 4, 4, 6)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    results = {}
    for wide_path in (False, True):
        if wide_path:
            use_kernel(kernel)
        else:
            set_wide_cpu_matmuls(False)
        with ReducedMatmuls() as seen:
            out = model(*inputs, text_mask=mask)
            out.float().square().mean().backward()
        results[wide_path] = out.detach().float(), seen.reduced
    (native, native_seen), (widened, wide_seen) = results[False], results[True]
    assert native_seen  # the check can see bf16 products: the native path has them
    assert wide_seen == []
    error = (widened - native).norm() / native.norm()
    assert error < 0.02  # both are bf16 models; they differ only in the order of the fp32 sums


def test_widen_linears_routes_a_foreign_model_and_keeps_its_output(wide):
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)).to(BF16)
    x = torch.randn(3, 8).to(BF16)
    with torch.no_grad():
        expected = model(x)
        assert widen_linears(model) == 2
        with ReducedMatmuls() as seen:
            out = model(x)
    assert seen.reduced == []
    torch.testing.assert_close(out, expected, rtol=2**-7, atol=1e-2)


def test_a_bf16_block_on_the_fp32_path_traces_as_one_graph_for_compile(wide):
    model = bf16_dit("plain")
    block, calls = model.visual_transformer_blocks[0], {}
    block.register_forward_hook(lambda module, args, out: calls.setdefault("args", args) and None)
    with torch.no_grad():
        model(*random_inputs(model, 1, 2, 4, 6, 5))
    wide_matmul.register_compile_operators()  # as compile_blocks does
    explanation = torch._dynamo.explain(block)(*calls["args"])
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    # MKL's kernel as an opaque operator in the graph, or the widening kernel traced through
    code = [m.code for graph in explanation.graphs for m in graph.modules() if isinstance(m, torch.fx.GraphModule)]
    on_mkl = "kandinsky5.mkl_bf16_linear" in "".join(code)  # in the autograd.Function's forward graph
    assert on_mkl == (wide == "mkl")


def test_importing_the_dit_leaves_torch_dynamo_unloaded():
    """The custom operators wait for compile_blocks: torch.library would load torch._dynamo, about 70 MB
    of anonymous memory in every eager run's peak."""
    code = "import sys, kandinsky5.dit, modules.wide_matmul; print('torch._dynamo' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


@needs_mkl
def test_compiled_bf16_blocks_call_mkl_as_custom_operators_with_eager_results():
    """torch.compile cannot trace the ctypes call into MKL; the kernels run as opaque custom operators
    inside the block's one graph, with the eager results (a full fine-tune: weight gradients too)."""
    use_kernel("mkl")
    model = bf16_dit("plain")
    x, *rest = random_inputs(model, 1, 2, 4, 6, 5)
    x = x.to(BF16)
    results = []
    for compiled in (False, True):
        if compiled:
            model.compile_blocks()
        model.zero_grad(set_to_none=True)
        leaf = x.clone().requires_grad_(True)
        out = model(leaf, *rest)
        out.float().square().mean().backward()
        weight = model.visual_transformer_blocks[0].feed_forward.in_layer.weight
        results.append((out.float(), leaf.grad.float(), weight.grad.float()))
    # the compiled elementwise work rounds to bf16 less often: about 1% apart with either kernel
    for name, eager, compiled in zip(["out", "input grad", "weight grad"], *results, strict=True):
        assert (compiled - eager).abs().max() <= 0.03 * eager.abs().max(), name


@needs_mkl
def test_the_two_kernels_give_the_same_products_and_gradients():
    # MKL's bf16 GEMM and the widened fp32 GEMM compute the same fp32 sums of the same exact products
    x, weight, bias = bf16_operands(seed=6, rows=300, features=96, tokens=(4, 50))
    results = []
    for kernel in KERNELS:
        use_kernel(kernel)
        leaves = [t.clone().requires_grad_(True) for t in (x, weight, bias)]
        out = linear(*leaves)
        out.float().square().sum().backward()
        results.append([out.float()] + [leaf.grad.float() for leaf in leaves])
    for name, mkl, widened in zip(["out", "x", "weight", "bias"], *results, strict=True):
        torch.testing.assert_close(mkl, widened, rtol=2**-7, atol=1e-3, msg=name)


def test_many_tokens_are_multiplied_a_block_of_rows_at_a_time(wide, monkeypatch):
    monkeypatch.setattr(wide_matmul, "SCRATCH_LIMIT", 4 * 100 * 7)  # 7 tokens of 100 fp32 features
    assert list(wide_matmul._token_blocks(20, 100)) == [(0, 7), (7, 14), (14, 20)]
    x, weight, bias = bf16_operands(seed=7, tokens=(4, 5))
    x.requires_grad_(True)
    out = linear(x, weight, bias)
    expected = F.linear(x.float(), weight.float(), bias.float())
    torch.testing.assert_close(out.float(), expected, rtol=2**-7, atol=1e-3)
    out.float().sum().backward()
    torch.testing.assert_close(x.grad.float(), weight.float().sum(0).expand(x.shape), rtol=2**-7, atol=1e-3)


def widened_weights_in_a_fresh_thread(kernel: str, tokens=(3, 5)) -> bool:
    """Whether a bf16 forward+backward in a new thread (fresh scratch buffers) widened any weight rows."""
    seen = {}

    def work():
        use_kernel(kernel)
        x, weight, bias = bf16_operands(seed=8, tokens=tokens)
        linear(x.requires_grad_(True), weight, bias).float().sum().backward()
        seen["widened"] = getattr(wide_matmul._scratch, "weight", None) is not None

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    return seen["widened"]


@needs_mkl
def test_mkl_kernel_makes_no_fp32_copy_of_a_weight():
    assert widened_weights_in_a_fresh_thread("widening")  # the check sees the widening kernel's copies
    assert not widened_weights_in_a_fresh_thread("mkl")


@needs_mkl
def test_products_of_many_tokens_take_the_widened_weight(monkeypatch):
    # beyond MKL_MAX_ROWS tokens PyTorch's fp32 GEMM is the faster kernel
    monkeypatch.setattr(wide_matmul, "MKL_MAX_ROWS", 15)
    assert not widened_weights_in_a_fresh_thread("mkl", tokens=(3, 5))
    assert widened_weights_in_a_fresh_thread("mkl", tokens=(4, 4))


@needs_mkl
@pytest.mark.parametrize("layout", ["row-major", "transposed", "row slice", "column slice", "strided"])
def test_mkl_mm_takes_each_layout_and_accumulates(layout):
    g = torch.Generator().manual_seed(9)
    big_a, big_b = torch.randn(12, 20, generator=g).to(BF16), torch.randn(20, 16, generator=g).to(BF16)
    a, b = {
        "row-major": (big_a[:, :10], big_b[:10, :6].contiguous()),
        "transposed": (big_a.t().contiguous().t(), big_b),
        "row slice": (big_a[3:9], big_b[:, 2:9]),
        "column slice": (big_a[:, 4:14], big_b.t().contiguous()[5:11, 4:14].t()),  # b: a transposed view
        "strided": (big_a[::2, ::3], big_b[::3][:, ::2][: big_a[::2, ::3].shape[1]]),
    }[layout]
    out = torch.full((a.shape[0], b.shape[1]), 2.0)
    expected = a.float() @ b.float()
    torch.testing.assert_close(mkl_bf16.mm(a, b, out), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mkl_bf16.mm(a, b, out, accumulate=True), 2 * expected, rtol=1e-5, atol=1e-5)


@needs_mkl
def test_mkl_mm_names_what_it_cannot_take():
    a, b = torch.ones(3, 4, dtype=BF16), torch.ones(4, 5, dtype=BF16)
    with pytest.raises(ValueError, match="bf16 CPU matrices, got torch.float32"):
        mkl_bf16.mm(a.float(), b, torch.empty(3, 5))
    with pytest.raises(ValueError, match=r"\(3, 4\) @ \(4, 5\) into torch.float32 \(3, 4\)"):
        mkl_bf16.mm(a, b, torch.empty(3, 4))
    with pytest.raises(ValueError, match=r"rows of out must be contiguous, got strides \(1, 3\)"):
        mkl_bf16.mm(a, b, torch.empty(5, 3).t())
    assert torch.equal(mkl_bf16.mm(a[:, :0], b[:0], torch.ones(3, 5)), torch.zeros(3, 5))


@needs_mkl
def test_mkl_mm_writes_a_block_of_columns_of_a_wider_result():
    g = torch.Generator().manual_seed(10)
    a, b = torch.randn(6, 8, generator=g).to(BF16), torch.randn(8, 4, generator=g).to(BF16)
    wide = torch.full((6, 10), 7.0)
    mkl_bf16.mm(a, b, wide[:, 3:7])
    torch.testing.assert_close(wide[:, 3:7], a.float() @ b.float(), rtol=1e-5, atol=1e-5)
    assert (wide[:, :3] == 7).all() and (wide[:, 7:] == 7).all()  # the other columns untouched
