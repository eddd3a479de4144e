"""Fast paths for the context blocks (GC, SNL, SE and every pooling x fusion) and an NL attention backward.

Cao et al., "GCNet", arXiv:1904.11492: z = x * gate + add, (gate, add) = transforms(sum_j alpha_j x_j),
alpha = softmax_j(W_k x_j + b_k) or 1/N.

The blocks are memory-bound: their work is a few passes over x. Plain autograd spends more passes
than the math needs (it sums the gradient coming from the fusion with the one coming from the
pooling, and routes the pooling gradient through broadcast temporaries). `ContextFusion` keeps x,
the (B, N) weights, the (B, C) gate and the small graph of the transforms on (B, C) vectors; its
backward reads grad_out and x once for the fusion's gradients and once more for grad_x.
`BlockwiseAttention` keeps SDPA's forward for the non-local block and replaces CPU flash
attention's slow backward (small head dims) by bmm over blocks of query rows. `residual_relu` ends
a residual block, ReLU(x * gate + add + residual), in one pass (with the context block's fusion
inside ContextFusion when that block sits before the add).

Where the optional CPU kernels `gcnet._C` are built (see setup.py), attention pooling, its backward
and the fusion's gradients of a CPU float32/float64 batch run there instead: one read of x per
pass, in blocks of each sample sized from this machine's caches (src/gcnet/csrc/attention_pool.cpp).
The transforms' bottleneck (Linear [LayerNorm] [ReLU] Linear [sigmoid]) and its gradients run there
too, one call each (`ContextTransforms`).

Only eager mode takes these paths: under tracing, scripting, ONNX export, torch.compile or
functorch transforms the blocks run their plain composite path (which computes the same numbers).
Double backward needs `composite_autograd()` (once_differentiable here).
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import _disable_current_modes, is_in_torch_dispatch_mode

from gcnet._machine import cache_sizes, last_level_cache_bytes

try:
    from gcnet import _C as _native
except ImportError:  # built only where setup.py could compile it
    _native = None

_ENABLED = True
_NATIVE_ENABLED = True
_BLOCK_ENDS_FUSED = True
_ONEDNN_CHOICE: bool | None = None


@contextlib.contextmanager
def _module_setting(name: str, value: object) -> Iterator[None]:
    """This module's global `name` set to `value` inside the context, restored after."""
    settings = globals()
    previous, settings[name] = settings[name], value
    try:
        yield
    finally:
        settings[name] = previous


def composite_autograd() -> contextlib.AbstractContextManager[None]:
    """Run the blocks on their plain composite autograd path inside this context.

    The fast paths' backward cannot itself be differentiated; use this for double backward
    (gradient penalties, higher-order gradients). Benchmarks also use it to compare the two.
    """
    return _module_setting("_ENABLED", False)


def composite_requested() -> bool:
    """True inside `composite_autograd()`: every op must be differentiable to any order."""
    return not _ENABLED


def _eager() -> bool:
    if not _ENABLED or torch.compiler.is_compiling() or torch.jit.is_scripting() or torch._C._is_tracing():
        return False
    return not (torch._C._are_functorch_transforms_active() or _in_onnx_export())


@functools.cache
def _onnx_export_flags() -> tuple[object, object] | None:
    """The two flags torch.onnx.is_in_onnx_export reads, or None where this torch keeps them elsewhere."""
    try:
        from torch.onnx._internal.exporter import _flags
        from torch.onnx._internal.torchscript_exporter._globals import GLOBALS
    except ImportError:
        return None
    if not (hasattr(GLOBALS, "in_onnx_export") and hasattr(_flags, "_is_onnx_exporting")):
        return None
    return GLOBALS, _flags


def _in_onnx_export() -> bool:
    """torch.onnx.is_in_onnx_export() without the two imports it runs on every call: with the caches
    evicted, as a block finds them after the pass over x, they cost ~20 us per call."""
    flags = _onnx_export_flags()
    if flags is None:
        return torch.onnx.is_in_onnx_export()
    exporter, dynamo = flags
    return bool(exporter.in_onnx_export or dynamo._is_onnx_exporting)


def fused_enabled(*tensors: Tensor | None) -> bool:
    """True when the eager autograd fast path may run: grad is wanted and nothing is tracing."""
    if not _eager() or not torch.is_grad_enabled():
        return False
    return any(t is not None and t.requires_grad for t in tensors)


def native_kernels_available() -> bool:
    """True when the CPU kernels `gcnet._C` were built with this install (an optimisation only)."""
    return _native is not None


def native_kernels(enabled: bool) -> contextlib.AbstractContextManager[None]:
    """Allow (True) or forbid (False) the CPU kernels inside this context, e.g. to compare paths."""
    return _module_setting("_NATIVE_ENABLED", enabled)


def fused_block_ends(enabled: bool) -> contextlib.AbstractContextManager[None]:
    """Fuse (True, default) or not (False) a residual block's end, ReLU(context(out) + identity),
    inside this context: the unfused three ops compute the same numbers; benchmarks compare the two.
    """
    return _module_setting("_BLOCK_ENDS_FUSED", enabled)


def block_ends_fused() -> bool:
    """False inside `fused_block_ends(False)`."""
    return _BLOCK_ENDS_FUSED


def _native_layout(positions: Tensor) -> bool:
    return positions.is_contiguous() or positions.transpose(1, 2).is_contiguous()


def _use_native(positions: Tensor) -> bool:
    """The CPU kernels run one sample per thread; smaller batches keep BLAS's threading."""
    return (
        _native is not None
        and _NATIVE_ENABLED
        and _eager()
        and not is_in_torch_dispatch_mode()  # e.g. FlopCounterMode sees only dispatched ops
        and positions.device.type == "cpu"
        and positions.dtype in (torch.float32, torch.float64)
        and type(positions) is Tensor
        and positions.shape[0] >= torch.get_num_threads()
        and _native_layout(positions)
    )


def _same_layout(positions: Tensor, grad: Tensor) -> bool:
    """grad_out as the kernels take it with x: same dtype, same dense layout."""
    same = grad.dtype == positions.dtype and positions.is_contiguous() == grad.is_contiguous()
    return same and _native_layout(grad)


@functools.cache
def _cache_bytes() -> tuple[int, int]:
    """(L2 per core, last-level cache) in bytes; 1 MiB and 32 MiB where the machine does not say."""
    return cache_sizes().get("L2", 2**20), last_level_cache_bytes() or 32 * 2**20


# Shortest row segment the pooling kernels cut NCHW rows to (16 cache lines). On Zen 5 the 56x56
# forward took 1.03-1.07x one pass over x cold, 1.07-1.16x warm on blocks of 448 positions (1792-byte
# rows), 1.13-1.17x / 1.28-1.38x on whole samples, the backward 0.94x its time on whole samples; with
# shorter rows the gain depended on the shape and the cache mode (`benchmarks.pool_blocks`).
_MIN_ROW_BYTES = 1024


def positions_per_block(positions: Tensor) -> int:
    """Positions the pooling kernels take at a time from one sample of (B, C, N), from this machine's
    caches.

    A block is read twice in a row (logits, then the weighted sum, or grad_w), x alone; the second read
    must find it in cache (the backward then writes grad_x over whole rows). Channels-last blocks are
    contiguous and sized to half of L2. NCHW blocks cut every channel row, and rows cut short defeat
    the hardware prefetcher: they fit in half of L2, split evenly, where that leaves each row at least
    `_MIN_ROW_BYTES`; else a whole sample is one block while the threads' samples fit in half of the
    last-level cache, and blocks stay that large above.
    """
    B, C, N = positions.shape
    l2, l3 = _cache_bytes()
    row = C * positions.element_size()  # bytes of one position
    if _transposed_is_dense(positions):
        return min(N, max(16, (l2 // 2) // row))
    whole = min(N, max(16, max(l2, l3 // (2 * min(B, torch.get_num_threads()))) // row))
    blocks = -(-N // max(1, (l2 // 2) // row))
    even = -(-N // blocks)
    return min(whole, even) if even * positions.element_size() >= _MIN_ROW_BYTES else whole


def _dense(weight: Tensor) -> Tensor:
    """weight as the kernels read it: its values contiguous, in any shape (a Linear's (1, C) is)."""
    return weight if weight.is_contiguous() else weight.contiguous()


def attention_logits(positions: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """W_k x_j + b_k for every position: (B, C, N) -> (B, 1, N), one pass over x in any layout.

    An explicit (b)addbmm: torch.matmul would fold (1, C) @ (B, C, N) into one mm over a copy of x.
    """
    B, C, _ = positions.shape
    return torch.baddbmm(bias.view(1, 1, 1), weight.expand(B, 1, C), positions)  # (B, 1, N)


def weighted_pool(positions: Tensor, weights: Tensor) -> Tensor:
    """sum_j alpha_j x_j as (B, 1, N) @ (B, N, C) -> (B, C).

    The row-vector form is one fast gemv per sample for NCHW (BLAS reads x^T in place) and for
    channels_last memory; (B, C, N) @ (B, N, 1) is ~2x slower on CPU.
    """
    return torch.bmm(weights, positions.transpose(1, 2)).squeeze(1)  # (B, C)


def attention_pool(positions: Tensor, weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """alpha = softmax_j(W_k x_j + b_k), (B, 1, N), and the context sum_j alpha_j x_j, (B, C).

    Through the CPU kernels when they apply and no gradient is wanted (they build no graph).
    """
    wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (positions, weight, bias))
    if not wants_grad and _use_native(positions):
        return _native.attention_pool(
            positions, _dense(weight), bias, positions_per_block(positions)
        )
    weights = attention_logits(positions, weight, bias).softmax(dim=-1)  # (B, 1, N)
    return weights, weighted_pool(positions, weights)


def position_sums(positions: Tensor, mean: bool = False) -> Tensor:
    """sum_j x_j (or their mean) of (B, C, N) -> (B, C): through the CPU kernel in channels_last
    memory, where torch's reduction over the strided positions took 1.4-3.3x a pass over x (Zen 5);
    torch's op elsewhere.

    Through the kernel only where no gradient is wanted (it builds no graph).
    """
    wants_grad = torch.is_grad_enabled() and positions.requires_grad
    if not wants_grad and _transposed_is_dense(positions) and _use_native(positions):
        sums = _native.position_sums(positions)
        return sums / positions.shape[-1] if mean else sums
    return positions.mean(dim=-1) if mean else positions.sum(dim=-1)


def _transposed_is_dense(t: Tensor) -> bool:
    """(B, C, N) whose transpose (B, N, C) is contiguous: channels_last memory."""
    return t.stride(1) == 1 and t.stride(2) == t.shape[1] and t.shape[1] > 1


def native_scale_shift(
    positions: Tensor, scale: Tensor, shift: Tensor, residual: Tensor | None = None
) -> Tensor | None:
    """positions * scale + shift, (B, C, N) with (B, C) scale and shift, through the CPU kernel;
    with a residual (B, C, N), ReLU(that + residual).

    None where the kernel does not apply or a gradient is wanted. One pass at memory speed, in the
    layout of positions; torch's addcmul with two broadcast operands is slower than a copy on CPU.
    """
    same_dtype = scale.dtype == shift.dtype == positions.dtype
    tensors = (positions, scale, shift) if residual is None else (positions, scale, shift, residual)
    wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if not same_dtype or wants_grad or not _use_native(positions):
        return None
    if residual is not None and not (type(residual) is Tensor and _same_layout(positions, residual)):
        return None
    return _native.scale_shift(positions, scale.contiguous(), shift.contiguous(), residual)


def fuse(x: Tensor, gate: Tensor | None, add: Tensor | None) -> Tensor:
    """z = x * gate + add with (B, C) gate and add broadcast over positions; either may be None."""
    broadcast = x.shape[:2] + (1,) * (x.dim() - 2)  # (B, C, 1, ...)
    if gate is None:
        return x + add.view(broadcast)
    if add is None:
        return x * gate.view(broadcast)
    fused = native_scale_shift(x.flatten(2), gate, add)
    if fused is not None:
        return fused.view(x.shape)
    return torch.addcmul(add.view(broadcast), x, gate.view(broadcast))


def _native_residual_relu(
    x: Tensor, residual: Tensor, gate: Tensor | None, add: Tensor | None
) -> Tensor | None:
    """ReLU(x * gate + add + residual) through the CPU kernel, or None where it does not apply."""
    if residual.shape != x.shape or not _use_native(x.flatten(2)):
        return None  # before allocating the unit scale and zero shift (launches on CUDA)
    B, C = x.shape[:2]
    scale = x.new_ones(B, C) if gate is None else gate
    shift = x.new_zeros(B, C) if add is None else add
    out = native_scale_shift(x.flatten(2), scale, shift, residual.flatten(2))
    return None if out is None else out.view(x.shape)


def residual_relu(
    x: Tensor, residual: Tensor, gate: Tensor | None = None, add: Tensor | None = None
) -> Tensor:
    """ReLU(x * gate + add + residual): the end of a residual block, with a context block's fusion.

    gate and add are (B, C) (either may be None: a plain block's ReLU(x + residual)). One pass over
    x and the residual through the CPU kernel where it applies (the composite ops take two or three).
    """
    if gate is None and add is None and fused_enabled(x, residual):
        return ResidualReLU.apply(x, residual)
    out = _native_residual_relu(x, residual, gate, add)
    if out is not None:
        return out
    z = x if gate is None and add is None else fuse(x, gate, add)
    return (z + residual).relu_()


class ResidualReLU(torch.autograd.Function):
    """ReLU(x + residual) in one pass; both inputs receive grad_out where the output is positive.

    Its backward is differentiable (ReLU's second derivative is zero), so a plain ResNet keeps
    double backward without `composite_autograd()`.
    """

    @staticmethod
    def forward(ctx, x: Tensor, residual: Tensor) -> Tensor:  # type: ignore[override]
        out = _native_residual_relu(x, residual, None, None)
        if out is None:
            out = (x + residual).relu_()
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        (out,) = ctx.saved_tensors
        grad = torch.ops.aten.threshold_backward(grad_out, out, 0)
        return grad, grad


_PLAIN = (Tensor, nn.Parameter)


def _hooked(module: nn.Module) -> bool:
    return any((module._forward_hooks, module._forward_pre_hooks, module._backward_hooks,
                module._backward_pre_hooks))


def _native_transform_args(transform: nn.Module, context: Tensor) -> tuple | None:
    """(w1, b1, ln_w, ln_b, eps, relu, w2, b2) of a Linear [LayerNorm] [ReLU] Linear stack that the
    CPU kernel computes as the modules would, else None (any other module, hooks, dtype or device).

    Runs on every call: reads the modules' dicts directly (nn.Module.__getattr__ would cost more
    than the kernel at small sizes).
    """
    if not isinstance(transform, nn.Sequential) or type(transform).forward is not nn.Sequential.forward:
        return None
    if _hooked(transform):
        return None
    layers = list(transform._modules.values())
    if len(layers) < 2 or type(layers[0]) is not nn.Linear or type(layers[-1]) is not nn.Linear:
        return None
    first, last, middle = layers[0]._parameters, layers[-1]._parameters, layers[1:-1]
    norm = middle.pop(0) if middle and type(middle[0]) is nn.LayerNorm else None
    relu = bool(middle) and type(middle[0]) is nn.ReLU
    if middle[int(relu):] or any(_hooked(layer) for layer in layers):
        return None
    ln_w = ln_b = None
    eps = 0.0
    if norm is not None:
        ln_w, ln_b, eps = norm._parameters["weight"], norm._parameters["bias"], norm.eps
        if ln_w is None or ln_b is None or len(norm.normalized_shape) != 1:
            return None
    w1, b1, w2, b2 = first["weight"], first["bias"], last["weight"], last["bias"]
    tensors = (w1, b1, w2, b2) if norm is None else (w1, b1, w2, b2, ln_w, ln_b)
    dtype = context.dtype
    if not all(type(t) in _PLAIN and t.dtype == dtype and t.is_cpu and t.is_contiguous() for t in tensors):
        return None  # also a missing bias (None)
    return w1, b1, ln_w, ln_b, eps, relu, w2, b2


class _NativeState(NamedTuple):
    """What `transform_backward` takes from one transform's forward."""

    norm: bool
    relu: bool
    sigmoid: bool
    out: Tensor
    hidden: Tensor
    stats: Tensor


class ContextTransforms:
    """The transforms of a context block: the sigmoid gate's (`scale`) and the add term's (`add`).

    Either may be None. Called, it returns (gate, add) of a (B, C) context, each (B, C) or None.
    Where no gradient is wanted and both are Linear [LayerNorm] [ReLU] Linear stacks (GC's and SE's
    bottlenecks) on a CPU float32/float64 context, they run through the CPU kernels: one call for
    the small GEMMs rather than a dozen dispatched ops, each of which finds its code and data evicted
    by the pass over x before it (`python -m benchmarks.gc_breakdown`). Elsewhere, as torch ops.
    """

    def __init__(self, scale: nn.Module | None, add: nn.Module | None) -> None:
        self.scale, self.add = scale, add

    def __call__(self, context: Tensor) -> tuple[Tensor | None, Tensor | None]:
        if not (torch.is_grad_enabled() and self._wants_grad(context)):
            native = self.native(context)
            if native is not None:
                return native[0], native[1]
        gate = None if self.scale is None else torch.sigmoid(self.scale(context))
        add = None if self.add is None else self.add(context)
        return gate, add

    def _wants_grad(self, context: Tensor) -> bool:
        modules = (t for t in (self.scale, self.add) if t is not None)
        return context.requires_grad or any(p.requires_grad for t in modules for p in t.parameters())

    def native(self, context: Tensor) -> tuple[Tensor | None, Tensor | None, list[_NativeState]] | None:
        """(gate, add, state for `native_backward`) through the CPU kernel, or None where it does not
        apply. Builds no graph."""
        if not (_native is not None and _NATIVE_ENABLED and _eager() and not is_in_torch_dispatch_mode()):
            return None
        if context.device.type != "cpu" or context.dtype not in (torch.float32, torch.float64):
            return None
        if type(context) is not Tensor or torch.is_autocast_enabled("cpu") or _global_module_hooks():
            return None
        transforms = [(t, sigmoid) for t, sigmoid in ((self.scale, True), (self.add, False)) if t is not None]
        args = [_native_transform_args(t, context) for t, _ in transforms]
        if not transforms or any(a is None for a in args):
            return None
        if not context.is_contiguous():
            context = context.contiguous()
        values: dict[bool, Tensor] = {}
        states = []
        for (_, sigmoid), (w1, b1, ln_w, ln_b, eps, relu, w2, b2) in zip(transforms, args):
            # The kernel reads the parameters' memory and records no graph: no detach needed.
            out, hidden, stats = _native.transform_forward(
                context, w1, b1, ln_w, ln_b, eps, relu, w2, b2, sigmoid
            )
            values[sigmoid] = out
            states.append(_NativeState(ln_w is not None, relu, sigmoid, out, hidden, stats))
        return values.get(True), values.get(False), states

    @staticmethod
    def native_backward(
        states: list[_NativeState], context: Tensor, params: list[Tensor], grad_gate: Tensor | None,
        grad_add: Tensor | None,
    ) -> tuple[Tensor, list[Tensor]]:
        """grad_context and the gradients of `params` (the transforms' parameters in module order) of
        what `native` computed, from the gradients of the gate and the add term."""
        grad_context, grads, index = None, [], 0
        for state in states:
            count = 6 if state.norm else 4
            w1, b1, *rest = params[index:index + count]
            ln_w, ln_b, w2, b2 = rest if state.norm else (None, None, *rest)
            index += count
            grad = (grad_gate if state.sigmoid else grad_add).to(context.dtype).contiguous()
            g_context, g_w1, g_b1, g_ln_w, g_ln_b, g_w2, g_b2 = _native.transform_backward(
                grad, state.out, state.sigmoid, context, w1, b1, ln_w, ln_b, state.relu, w2, b2, state.hidden,
                state.stats,
            )
            grads += [g_w1, g_b1, g_ln_w, g_ln_b, g_w2, g_b2] if state.norm else [g_w1, g_b1, g_w2, g_b2]
            grad_context = g_context if grad_context is None else grad_context + g_context
        return grad_context, grads


def _global_module_hooks() -> bool:
    """True while nn.Module's global forward hooks are registered (they would see no module calls)."""
    module = torch.nn.modules.module
    return any(getattr(module, name, None) for name in ("_global_forward_hooks", "_global_forward_pre_hooks"))


class ContextFusion(torch.autograd.Function):
    """z = x * gate + add, (gate, add) = transforms(sum_j alpha_j x_j): a whole context block; with a
    residual, ReLU(z + residual): the block and the end of the residual block around it.

    alpha is softmax_j(W_k x_j + b_k) (attention pooling) or 1/N where the key weight is None
    (average pooling). `transforms` maps the (B, C) context to the sigmoid gate and the add term,
    either None, using the tensors `params` (passed so that they receive gradients): through the
    CPU kernels where they apply (`ContextTransforms.native`), else on a detached context inside an
    enable_grad island, whose small graph torch.autograd.grad runs in backward. Backward: the
    fusion's gradients (sum_j g_j, sum_j g_j x_j) in one pass over grad_out and x, then grad_x in
    one more.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: Tensor,
        key_weight: Tensor | None,
        key_bias: Tensor | None,
        transforms: ContextTransforms,
        residual: Tensor | None,
        *params: Tensor,
    ) -> Tensor:
        positions = x.flatten(2)  # (B, C, N)
        if key_weight is None:
            weights, context = None, position_sums(positions, mean=True)  # (B, C)
        else:
            weights, context = attention_pool(positions, key_weight, key_bias)  # (B, 1, N), (B, C)
        native = transforms.native(context)
        if native is None:
            with torch.enable_grad():
                leaf = context.detach().requires_grad_(True)
                gate, add = transforms(leaf)  # (B, C) each, or None
            ctx.graph, ctx.native = (leaf, gate, add), None
        else:
            gate, add, ctx.native = native
            ctx.graph = (None, gate, add)
        gate_value = None if gate is None else gate.detach()
        add_value = None if add is None else add.detach()
        if residual is None:
            out, relu_out = fuse(x, gate_value, add_value), None
        else:
            out = relu_out = residual_relu(x, residual, gate_value, add_value)
        ctx.save_for_backward(x, key_weight, weights, context, gate_value, relu_out, *params)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        x, key_weight, weights, context, gate, out, *params = ctx.saved_tensors
        leaf, gate_graph, add_graph = ctx.graph
        needs = ctx.needs_input_grad
        grad_residual = None
        if out is not None:  # through the ReLU: z and the residual receive grad_out where out > 0
            grad_out = grad_residual = torch.ops.aten.threshold_backward(grad_out, out, 0)
        B, C = x.shape[:2]
        positions = x.flatten(2)  # (B, C, N)
        grad = grad_out.flatten(2)  # (B, C, N)
        native = _use_native(positions) and _same_layout(positions, grad)

        # The fusion's gradients: add receives sum_j g_j, the gate sum_j g_j x_j.
        products = None
        if gate is None:
            sums = position_sums(grad)  # (B, C)
        elif native:
            sums, products = _native.fusion_sums(positions, grad)  # (B, C) each
        else:
            sums, products = grad.sum(dim=-1), (grad * positions).sum(dim=-1)
        grad_add = None if add_graph is None else sums
        if ctx.native is not None:
            grad_context, grad_params = ContextTransforms.native_backward(
                ctx.native, context, params, products, grad_add
            )
            grad_params = [g if need else None for g, need in zip(grad_params, needs[5:])]
        else:
            pairs = [(t, g) for t, g in ((gate_graph, products), (add_graph, grad_add)) if t is not None]
            wanted = [p for p, need in zip(params, needs[5:]) if need]
            # retain_graph: the outer graph may be run again (retain_graph=True, gradcheck); the small
            # transform graph is freed with this node.
            outputs, grad_outputs = [t for t, _ in pairs], [g.to(t.dtype) for t, g in pairs]
            grads = torch.autograd.grad(outputs, [leaf, *wanted], grad_outputs, retain_graph=True,
                                        allow_unused=True)
            found = iter(grads[1:])
            grad_params = [next(found) if need else None for need in needs[5:]]
            grad_context = torch.zeros_like(context) if grads[0] is None else grads[0]
        # Under autocast the pooled weights, the context, the gate and x may differ in dtype: run the
        # products in x's dtype, as autocast ran the forward's.
        dtype = positions.dtype
        grad_context = grad_context.to(dtype)  # (B, C)
        gate = None if gate is None else gate.to(dtype)
        grad = grad.to(dtype)

        if key_weight is None:  # average pooling: d context / d x_j = 1/N
            grad_x = None
            if needs[0]:
                spread = grad_context / positions.shape[-1]  # (B, C)
                if gate is None:
                    grad_x = grad + spread.unsqueeze(-1)
                else:
                    grad_x = native_scale_shift(grad, gate, spread) if native else None
                    if grad_x is None:
                        grad_x = torch.addcmul(spread.unsqueeze(-1), grad, gate.unsqueeze(-1))
                grad_x = grad_x.reshape(x.shape)
            return (grad_x, None, None, None, grad_residual, *grad_params)

        if needs[0] and native:
            grad_x, grad_key_weight, grad_key_bias = _native.attention_pool_backward(
                positions, grad, _dense(key_weight), weights, context,
                grad_context.contiguous(), gate, positions_per_block(positions),
            )
            return (grad_x.view(x.shape), grad_key_weight if needs[1] else None,
                    grad_key_bias if needs[2] else None, None, grad_residual, *grad_params)

        weights = weights.to(dtype)
        # d loss / d alpha_j = grad_context . x_j, then the softmax backward.
        grad_weights = torch.bmm(grad_context.unsqueeze(1), positions)  # (B, 1, N)
        grad_logits = weights * (grad_weights - (weights * grad_weights).sum(dim=-1, keepdim=True))

        grad_x = None
        if needs[0]:
            direct = grad if gate is None else grad * gate.unsqueeze(-1)  # (B, C, N)
            # grad_x = direct + grad_context alpha^T + W_k^T grad_logits: one pass, no temporaries.
            left = torch.stack((grad_context, key_weight.to(dtype).expand(B, C)), dim=2)  # (B, C, 2)
            right = torch.cat((weights, grad_logits), dim=1)  # (B, 2, N)
            if _transposed_is_dense(direct):
                grad_x = torch.baddbmm(direct.transpose(1, 2), right.transpose(1, 2), left.transpose(1, 2))
                grad_x = grad_x.transpose(1, 2)  # (B, C, N) in channels_last memory
            else:
                grad_x = torch.baddbmm(direct, left, right)  # (B, C, N)
            grad_x = grad_x.reshape(x.shape)
        grad_key_weight = None
        if needs[1]:
            grad_key_weight = weighted_pool(positions, grad_logits).sum(dim=0, keepdim=True).to(key_weight.dtype)
        grad_key_bias = grad_logits.sum().reshape(1).to(key_weight.dtype) if needs[2] else None
        return (grad_x, grad_key_weight, grad_key_bias, None, grad_residual, *grad_params)


def attention_blocks(
    batch: int, queries: int, keys: int, head_dim: int, element_size: int
) -> tuple[int, int]:
    """(samples, query rows) per block of the blockwise attention backward.

    A block's (samples x rows x keys) matrices, two at a time (probabilities and their gradient), are
    sized to twice the L2 per core (at most 1M elements): near the cache, and a few percent of the
    N x N form's memory. Where whole samples fit, a block takes several of them with all their rows;
    otherwise one sample and a band of rows, and each band adds a rank-rows update into the
    (keys x head_dim) gradients of keys and values: at head dim 64, small bands made the backward up
    to 1.6x slower, so rows >= D^2 / 32 (`python -m benchmarks.attention_blocks`, docs/benchmarks.md).
    """
    l2, _ = _cache_bytes()
    budget = min(1 << 20, max(1 << 14, 2 * l2 // element_size))
    if queries * keys <= budget:
        return max(1, min(batch, budget // max(queries * keys, 1))), max(queries, 1)
    return 1, max(1, min(queries, max(budget // keys, head_dim * head_dim // 32)))


_HAS_ONEDNN = torch.backends.mkldnn.is_available()


def onednn_float32(*tensors: Tensor) -> bool:
    """float32 CPU tensors, with oneDNN built, `torch.backends.mkldnn` enabled and its products chosen
    (`onednn_products`, or measured faster than MKL's here): where gcnet sends products to oneDNN."""
    if not (_HAS_ONEDNN and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)):
        return False
    return _onednn_choice()[0]


def _onednn_choice() -> tuple[bool, str]:
    """(whether oneDNN's products are chosen here, why)."""
    if not (_HAS_ONEDNN and torch._C._get_mkldnn_enabled()):
        return False, "oneDNN off"
    if _ONEDNN_CHOICE is not None:
        return _ONEDNN_CHOICE, "pinned by onednn_products"
    if torch.are_deterministic_algorithms_enabled():  # as torch turns cudnn.benchmark off there
        return False, "deterministic algorithms: not timed"
    speedup = onednn_speedup()
    if speedup is None:
        return False, "no oneDNN matmul in this torch"
    return speedup >= ONEDNN_MIN_SPEEDUP, f"oneDNN's GEMM ran {speedup:.2f}x MKL's speed here"


def describe_onednn_products() -> str:
    """Which library runs the non-local block's float32 CPU products here, and why, e.g.
    "oneDNN (oneDNN's GEMM ran 1.86x MKL's speed here)": for logs and benchmark headers."""
    chosen, why = _onednn_choice()
    return f"{'oneDNN' if chosen else 'MKL'} ({why})"


def onednn_products(enabled: bool | None) -> contextlib.AbstractContextManager[None]:
    """Inside this context, send the non-local block's float32 CPU products to oneDNN (True), keep them
    on MKL's bmm and SDPA (False), or choose by `onednn_speedup` (None, the default outside; under
    torch.use_deterministic_algorithms nothing is timed and MKL's products run unless pinned).

    MKL runs AVX2 code on AMD CPUs and oneDNN AVX-512, so there oneDNN's products take about half the
    time; where both run the same instructions, the bmm / SDPA paths measured as fast or faster.
    The two paths agree to float32 rounding; pin one where every machine of a run must take the same.
    """
    return _module_setting("_ONEDNN_CHOICE", enabled)


# oneDNN's products replace MKL's where its GEMM is at least this many times faster (Zen 5: ~2; where
# both run the same ISA ~1, and at 1x64x128x128 the oneDNN attention gained only 1.07-1.15x on Zen 5).
ONEDNN_MIN_SPEEDUP = 1.5


@functools.cache
def onednn_speedup() -> float | None:
    """MKL's time over oneDNN's for one float32 512x256 @ 256x512 product, best of 5 each, measured once
    per process (~15 ms with oneDNN's first kernel build): ~2 on AMD CPUs with AVX-512, ~1 where both
    run the same instructions. None without oneDNN's matmul."""
    matmul = _onednn_matmul()
    if matmul is None:
        return None
    best = {"mkl": math.inf, "onednn": math.inf}
    with _plain_eager():
        generator = torch.Generator().manual_seed(0)
        a, w = (torch.randn(512, 256, generator=generator) for _ in range(2))
        w_t = w.t().contiguous()
        runs = {"mkl": lambda: torch.mm(a, w_t), "onednn": lambda: matmul(a, w, None, "none", [], "")}
        for repeat in range(7):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                if repeat >= 2:  # after two warm-up calls (oneDNN builds its kernel on the first)
                    best[name] = min(best[name], time.perf_counter() - start)
    return best["mkl"] / best["onednn"]


@contextlib.contextmanager
def _plain_eager() -> Iterator[None]:
    """Plain float eager ops for a probe, though its first call may come under autocast, a dispatch mode
    (e.g. the FLOP counter, which would count them) or torch.jit.trace (which would record them)."""
    tracing = torch._C._get_tracing_state()
    torch._C._set_tracing_state(None)
    try:
        with _disable_current_modes(), torch.autocast("cpu", enabled=False), torch.no_grad():
            yield
    finally:
        torch._C._set_tracing_state(tracing)


@functools.cache
def _onednn_matmul() -> Callable[..., Tensor] | None:
    """oneDNN's matmul, a @ w^T, as torch exposes it to inductor (`mkldnn::_linear_pointwise`), where
    this torch has it and it agrees with torch.mm on a probe; None otherwise (a private op)."""
    if not _HAS_ONEDNN:
        return None
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    try:
        with _plain_eager():
            generator = torch.Generator().manual_seed(0)
            a, w = torch.randn(5, 7, generator=generator), torch.randn(3, 7, generator=generator)
            agrees = op is not None and torch.allclose(op(a, w, None, "none", [], ""), a @ w.t(), atol=1e-5)
    except (RuntimeError, TypeError):
        agrees = False
    return op if agrees else None


# Multiply-adds per sample (N * Nk * D) below which attention keeps bmm / SDPA: oneDNN's matmul runs
# one sample per call, and at 128x64x16x16 (2M) the calls cost more than its speed saved (Zen 5).
ONEDNN_ATTENTION_MIN_WORK = 1 << 23


def onednn_attention(queries: Tensor, keys: Tensor, values: Tensor) -> bool:
    """Whether attention's products run through oneDNN's matmul rather than MKL (torch.mm, bmm, SDPA):
    float32 CPU tensors, eagerly, where `onednn_float32` holds, and samples large enough. MKL runs
    AVX2 code on AMD CPUs, oneDNN AVX-512: on Zen 5 the blockwise forward took about half of SDPA's
    time (docs/benchmarks.md)."""
    if not _eager() or is_in_torch_dispatch_mode() or not onednn_float32(queries, keys, values):
        return False
    plain = all(type(t) is Tensor for t in (queries, keys, values))
    work = queries.shape[1] * keys.shape[1] * queries.shape[2]
    return plain and work >= ONEDNN_ATTENTION_MIN_WORK and _onednn_matmul() is not None


def _mm_t(a: Tensor, b: Tensor, onednn: bool) -> Tensor:
    """a @ b^T for (s, n, K) and (s, m, K): bmm, or oneDNN's matmul on one sample's matrices (s = 1)."""
    if not onednn:
        return torch.bmm(a, b.transpose(1, 2))
    matmul = _onednn_matmul()
    assert matmul is not None and a.shape[0] == 1
    return matmul(a[0], b[0], None, "none", [], "").unsqueeze(0)


def attention_rows(queries: int, keys: int) -> int:
    """Query rows per block of the oneDNN attention forward: 512, fewer where the (rows x keys) logits
    would pass 4M elements (16 MiB in float32), at least 64. On Zen 5, of 128 to 1024 rows, 512 were
    fastest at 4096 and 1568 keys; at 16384 keys 256 rows keep the peak memory low."""
    return max(1, min(queries, 512, max(64, (4 << 20) // max(keys, 1))))


def onednn_attention_forward(queries: Tensor, keys: Tensor, values: Tensor, scale: float) -> Tensor:
    """softmax(q k^T * scale) v of float32 CPU (B, N, D), (B, Nk, D), (B, Nk, Dv), a band of query rows
    at a time with whole softmax rows (no online rescaling): memory O(rows * Nk)."""
    B, N, _ = queries.shape
    out = queries.new_empty(B, N, values.shape[-1])
    rows = attention_rows(N, keys.shape[1])
    for b in range(B):
        k, v_t = keys[b:b + 1], values[b:b + 1].transpose(1, 2).contiguous()  # (1, Nk, D), (1, Dv, Nk)
        for start in range(0, N, rows):
            logits = _mm_t(queries[b:b + 1, start:start + rows], k, True)  # (1, n, Nk)
            if scale != 1.0:
                logits.mul_(scale)
            out[b:b + 1, start:start + rows] = _mm_t(logits.softmax(dim=-1), v_t, True)
    return out


class BlockwiseAttention(torch.autograd.Function):
    """softmax(q k^T * scale) v for (B, N, D) queries, (B, Nk, D) keys and values; blockwise backward.

    The forward is `scaled_dot_product_attention` (flash path, no N x Nk matrix), or where
    `onednn_attention` holds, `onednn_attention_forward`. On CPU SDPA's flash backward is several times
    slower than BLAS for small head dims (measured: 18.7 s against 5.5 s for the naive N x N form at
    1x64x128x128), so the backward recomputes the probabilities a block of samples or of query rows at
    a time and runs the five products through bmm (or oneDNN's matmul): memory stays O(block * Nk).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, queries: Tensor, keys: Tensor, values: Tensor, scale: float
    ) -> Tensor:
        # Under autocast the Gaussian mode's queries and keys are x itself (fp32) and its values bf16.
        ctx.dtypes = (queries.dtype, keys.dtype, values.dtype)
        common = torch.promote_types(torch.promote_types(queries.dtype, keys.dtype), values.dtype)
        queries, keys, values = queries.to(common), keys.to(common), values.to(common)
        ctx.onednn = onednn_attention(queries, keys, values)
        with torch.autocast(queries.device.type, enabled=False):  # the backward recomputes in this dtype
            if ctx.onednn:
                out = onednn_attention_forward(queries, keys, values, scale)
            else:
                out = torch.nn.functional.scaled_dot_product_attention(
                    queries.unsqueeze(1), keys.unsqueeze(1), values.unsqueeze(1), scale=scale
                ).squeeze(1)  # (B, N, Dv)
        ctx.save_for_backward(queries, keys, values, out)
        ctx.scale = scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        queries, keys, values, out = ctx.saved_tensors
        scale, onednn = ctx.scale, ctx.onednn
        N, Nk = queries.shape[1], keys.shape[1]
        grad_out = grad_out.to(out.dtype).contiguous()
        grad_q = torch.empty_like(queries)
        grad_k = torch.zeros_like(keys)
        grad_v = torch.zeros_like(values)
        # D_i = sum_j P_ij dP_ij = dO_i . O_i, the softmax backward's row term.
        row_term = (grad_out * out).sum(dim=-1, keepdim=True)  # (B, N, 1)
        samples, step = attention_blocks(queries.shape[0], N, Nk, queries.shape[-1], out.element_size())
        samples = 1 if onednn else samples  # oneDNN's matmul takes one sample's matrices
        for first in range(0, queries.shape[0], samples):
            batch = slice(first, first + samples)
            k, v = keys[batch], values[batch]  # (b, Nk, D), (b, Nk, Dv)
            k_t = k.transpose(1, 2).contiguous() if onednn else k.transpose(1, 2)  # (b, D, Nk)
            for start in range(0, N, step):
                rows = slice(start, start + step)
                q, d_out = queries[batch, rows], grad_out[batch, rows]  # (b, n, D), (b, n, Dv)
                probs = (_mm_t(q, k, onednn) * scale).softmax(dim=-1)  # (b, n, Nk)
                grad_v[batch] += _mm_t(probs.transpose(1, 2), d_out.transpose(1, 2), onednn)  # (b, Nk, Dv)
                grad_logits = _mm_t(d_out, v, onednn)  # (b, n, Nk): dP
                grad_logits.sub_(row_term[batch, rows]).mul_(probs).mul_(scale)  # dS, scaled
                grad_q[batch, rows] = _mm_t(grad_logits, k_t, onednn)  # (b, n, D)
                grad_k[batch] += _mm_t(grad_logits.transpose(1, 2), q.transpose(1, 2), onednn)  # (b, Nk, D)
        return (*(g.to(dtype) for g, dtype in zip((grad_q, grad_k, grad_v), ctx.dtypes)), None)
