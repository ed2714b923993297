"""A backward pass through the frozen model that keeps fewer activations: same values, less memory.

Prompt tuning sends gradients through every layer, so autograd keeps what each op's backward reads. Two kinds of
module keep more than they need once the weights are frozen:
* transformers' RMSNorm upcasts its input and keeps that fp32 copy (twice the bytes of a bf16 input, and it runs
  twice per layer). Here it keeps the input as it came plus one fp32 scale per position, and rebuilds the rest;
* the gated MLP, `down(act(gate(x)) * up(x))`, keeps the gate, the up projection AND the activated gate (three
  `[tokens, intermediate]` tensors). Here it keeps the gate and the up projection and recomputes the activation.
That is about a third of what a Llama layer keeps in bf16 (`python bench/saved_activations.py`, docs/benchmarks.md),
for one extra elementwise kernel per layer.

`install` swaps the forward of each recognised module (Llama/Qwen2/Gemma3 norms and MLPs) and checks on the spot
that it returns exactly what the original does; anything unrecognised or different keeps its own forward. A norm
goes lean only while gradients flow to its input and its weight is frozen (its backward has no weight gradient;
model tuning trains it), an MLP whenever autograd records (its projections run outside the function, trainable or
not); inference, and anything inside `disabled()`, runs the original forward.
"""

from __future__ import annotations

import contextlib
import functools
import weakref

import torch
from torch import Tensor, nn

# class name -> how it applies its weight: after the cast back (Llama, Qwen2) or in fp32 as 1 + weight (Gemma)
NORMS = {"LlamaRMSNorm": "llama", "Qwen2RMSNorm": "llama", "Gemma3RMSNorm": "gemma"}
GATED_MLPS = {"LlamaMLP", "Qwen2MLP", "Gemma3MLP"}


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float, style: str) -> Tensor:
        ctx.style = style
        hidden = x.float()  # transformers' RMSNorm arithmetic from here on, op for op
        scale = torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, scale)
        if style == "gemma":
            return (hidden * scale * (1.0 + weight.float())).type_as(x)
        return weight * (hidden * scale).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, scale = ctx.saved_tensors
        normed = x.float() * scale
        if ctx.style == "gemma":
            grad_normed = grad.float() * (1.0 + weight.float())
        else:
            grad_normed = (grad * weight).float()
        # d/dx of x * rsqrt(mean(x^2) + eps), applied to grad_normed
        grad_x = scale * (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), None, None, None


# activations (transformers' module class names) whose gradient is one kernel, given the input
_ACTIVATION_GRADIENTS = {
    "SiLUActivation": torch.ops.aten.silu_backward.default,
    "SiLU": torch.ops.aten.silu_backward.default,
    "GELUTanh": functools.partial(torch.ops.aten.gelu_backward.default, approximate="tanh"),
}


class _GatedActivation(torch.autograd.Function):
    """act(gate) * up, keeping gate and up only."""

    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor, activation: nn.Module) -> Tensor:
        ctx.activation = activation
        ctx.save_for_backward(gate, up)
        return activation(gate) * up

    @staticmethod
    def backward(ctx, grad: Tensor):
        gate, up = ctx.saved_tensors
        activation_gradient = _ACTIVATION_GRADIENTS.get(type(ctx.activation).__name__)
        if activation_gradient is not None:
            grad_gate = activation_gradient(grad * up, gate)
            activated = ctx.activation(gate)
        else:  # any other activation: differentiate its recomputation
            with torch.enable_grad():
                leaf = gate.detach().requires_grad_()
                activated = ctx.activation(leaf)
            (grad_gate,) = torch.autograd.grad(activated, leaf, grad * up)
            activated = activated.detach()
        return grad_gate, grad * activated, None


# Process-wide, not per thread: on CUDA, autograd runs the backward pass, and with it the recomputation of
# checkpointed layers, in its own threads; a layer recomputed lean after a forward that was not fails the check
# that both kept the same tensors.
_disabled_depth = 0


@contextlib.contextmanager
def disabled():
    """Every module runs its own forward inside this block, in every thread (benchmarks run PEFT this way)."""
    global _disabled_depth
    _disabled_depth += 1
    try:
        yield
    finally:
        _disabled_depth -= 1


def _recording() -> bool:
    return torch.is_grad_enabled() and not _disabled_depth


def _norm_forward(self: nn.Module, x: Tensor) -> Tensor:
    if not (_recording() and x.requires_grad) or self.weight.requires_grad:  # its backward has no weight gradient
        return type(self).forward(self, x)
    style = NORMS[type(self).__name__]
    return _RMSNorm.apply(x, self.weight, self.eps if style == "gemma" else self.variance_epsilon, style)


def _mlp_forward(self: nn.Module, x: Tensor) -> Tensor:
    if not _recording():  # (trainable projections are fine: they run outside the autograd function)
        return type(self).forward(self, x)
    return self.down_proj(_GatedActivation.apply(self.gate_proj(x), self.up_proj(x), self.act_fn))


def install(model: nn.Module) -> int:
    """Give each recognised norm and gated MLP the lean backward; returns how many modules took it."""
    checked: dict[type, bool] = {}
    count = 0
    for module in model.modules():
        name = type(module).__name__
        forward = _norm_forward if name in NORMS else _mlp_forward if name in GATED_MLPS else None
        if forward is None or "forward" in module.__dict__:  # unknown, or already wrapped (accelerate's offload)
            continue
        if type(module) not in checked:
            checked[type(module)] = _same_values(module, forward)
        if checked[type(module)]:
            module.forward = _LeanForward(forward, module)
            count += 1
    return count


class _LeanForward:
    """`forward` bound to its module through a weak reference: a bound method stored on the module would be a
    reference cycle, and a dropped model's weights would stay allocated until Python's next full collection."""

    def __init__(self, forward, module: nn.Module):
        self.forward = forward
        self.owner = weakref.ref(module)

    def __call__(self, x: Tensor) -> Tensor:
        return self.forward(self.owner(), x)

    def __deepcopy__(self, memo: dict) -> _LeanForward:
        # a deep-copied model (model tuning trains one) runs its own copied weights
        owner = self.owner()
        return _LeanForward(self.forward, memo.get(id(owner), owner))


def remove(model: nn.Module) -> None:
    """Back to each module's own forward (compiled layers get their own memory planning from inductor)."""
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), _LeanForward):
            del module.forward


def _same_values(module: nn.Module, forward) -> bool:
    """On a probe input the lean forward equals the module's own and so does the input's gradient, in the
    module's dtype: a transformers release with other arithmetic fails here and keeps its own forward."""
    weight = next(module.parameters())
    width = module.gate_proj.in_features if hasattr(module, "gate_proj") else weight.shape[-1]
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(2, 3, width, generator=generator).to(weight.device, weight.dtype)
    frozen = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        with torch.enable_grad():
            results = []
            for run in (forward, type(module).forward):
                leaf = probe.clone().requires_grad_()
                output = run(module, leaf)
                results.append((output, *torch.autograd.grad(output.float().square().sum(), leaf)))
        (lean, lean_grad), (own, own_grad) = results
        return torch.equal(lean, own) and torch.allclose(lean_grad.float(), own_grad.float(), rtol=0.02, atol=1e-3)
    except (AttributeError, RuntimeError, TypeError):
        return False
    finally:
        for parameter, flag in zip(module.parameters(), frozen):
            parameter.requires_grad_(flag)
