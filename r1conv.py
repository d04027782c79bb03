"""R1's double backward through D's convolutions, on the kernels of an ordinary backward (config key `r1_conv`).

R1 differentiates D's input gradient again. For a convolution y = conv(x, W), the input gradient is
dgrad(g, W) (a transposed convolution of the output gradient g), and R1's second pass needs its derivative
with respect to W. PyTorch's built-in double backward computes that term as a forward convolution whose
"kernel" is a whole image, with the batch in the channels' place: on a GPU these are the costliest kernels of
a DG-Net iteration (BENCHMARKS.md: 42.7 ms in 12 calls at the defaults, against ~200 ms of GPU work in all).
The same term is the weight gradient an ordinary backward computes, wgrad(input=the gradient reaching the
input gradient, output gradient=g), for which cuDNN has its tuned kernels.

Here a convolution is three autograd Functions that differentiate into one another, each on the kernels of an
ordinary forward and backward (torch.nn.grad's conv2d_input and conv2d_weight call convolution_backward):
- `_Conv`:        y  = conv(x, W)      backward: dx = _InputGrad(g, W),   dW = _WeightGrad(x, g)
- `_InputGrad`:   dx = dgrad(g, W)     backward: dg = _Conv(h, W),        dW = _WeightGrad(h, g)
- `_WeightGrad`:  dW = wgrad(x, g)     backward: dx = _InputGrad(g, H),   dg = _Conv(x, H)
(h, H: the gradients reaching dx and dW). Every map is bilinear, so these are exact, at any order.

`r1_convs()` routes D's convolutions through `_Conv` during the pass on the real images (a torch function mode:
D's modules and their state dicts are untouched). `weight_grads_skipped()` wraps R1's torch.autograd.grad call:
that pass asks for the input gradient only, which the built-in backward knows and a custom Function does not,
so the weight gradients are skipped by this flag instead (StyleGAN2-ADA's no_weight_gradients does the same).
Both run on the host while the step is recorded, so a CUDA graph captures their choices.

The values are the built-in double backward's up to rounding (tests/test_r1conv.py: gradgradcheck in float64,
D's step against the built-in one). Whether it is faster is a GPU measurement (bench/gpu_run.sh, dgnet_r1_conv);
until then `r1_conv: auto` leaves it off.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn import grad as conv_grad
from torch.overrides import TorchFunctionMode

Conf = tuple[Any, Any, Any, int]  # stride, padding, dilation, groups

_skip_weight_grads = False  # set around R1's autograd.grad call; read by _Conv.backward on autograd's threads


class _Conv(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                conf: Conf) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.conf, ctx.has_bias = conf, bias is not None
        # fp32 as the built-in double backward, also where _InputGrad and _WeightGrad call this in a backward
        # that would run under autocast (D's R1 pass itself runs with autocast off)
        with torch.autocast(x.device.type, enabled=False):
            return F.conv2d(x, weight, bias, *conf)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        dx = _InputGrad.apply(g, weight, x.shape, ctx.conf) if ctx.needs_input_grad[0] else None
        dw = (_WeightGrad.apply(x, g, weight.shape, ctx.conf)
              if ctx.needs_input_grad[1] and not _skip_weight_grads else None)
        db = g.sum((0, 2, 3)) if ctx.has_bias and ctx.needs_input_grad[2] and not _skip_weight_grads else None
        return dx, dw, db, None


class _InputGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, g: torch.Tensor, weight: torch.Tensor, x_shape: torch.Size, conf: Conf) -> torch.Tensor:
        ctx.save_for_backward(g, weight)
        ctx.conf = conf
        return conv_grad.conv2d_input(x_shape, weight, g, *conf)

    @staticmethod
    def backward(ctx: Any, h: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        g, weight = ctx.saved_tensors
        dg = _Conv.apply(h, weight, None, ctx.conf) if ctx.needs_input_grad[0] else None
        dw = _WeightGrad.apply(h, g, weight.shape, ctx.conf) if ctx.needs_input_grad[1] else None
        return dg, dw, None, None


class _WeightGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, g: torch.Tensor, w_shape: torch.Size, conf: Conf) -> torch.Tensor:
        ctx.save_for_backward(x, g)
        ctx.conf = conf
        return conv_grad.conv2d_weight(x, w_shape, g, *conf)

    @staticmethod
    def backward(ctx: Any, big_h: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, g = ctx.saved_tensors
        dx = _InputGrad.apply(g, big_h, x.shape, ctx.conf) if ctx.needs_input_grad[0] else None
        dg = _Conv.apply(x, big_h, None, ctx.conf) if ctx.needs_input_grad[1] else None
        return dx, dg, None, None


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride: Any = 1,
           padding: Any = 0, dilation: Any = 1, groups: int = 1) -> torch.Tensor:
    """F.conv2d with the double backward above (numeric padding only: nn.Conv2d pads other modes itself)."""
    return _Conv.apply(x, weight, bias, (stride, padding, dilation, groups))


class _RouteConvs(TorchFunctionMode):
    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        if func is not F.conv2d:
            return func(*args, **kwargs)
        if "input" in kwargs:  # F.conv2d(input=x, ...): the first argument by name
            args = (kwargs.pop("input"), *args)
        if isinstance(kwargs.get("padding", args[4] if len(args) > 4 else 0), str):  # "same", "valid"
            return func(*args, **kwargs)
        return conv2d(*args, **kwargs)


@contextmanager
def r1_convs(enabled: bool = True) -> Iterator[None]:
    """Inside: every F.conv2d (what nn.Conv2d calls) runs as `conv2d` above."""
    if not enabled:
        yield
        return
    with _RouteConvs():
        yield


@contextmanager
def weight_grads_skipped(enabled: bool = True) -> Iterator[None]:
    """Inside: the backward of `conv2d` computes input gradients only (R1's torch.autograd.grad pass)."""
    global _skip_weight_grads
    saved, _skip_weight_grads = _skip_weight_grads, enabled or _skip_weight_grads
    try:
        yield
    finally:
        _skip_weight_grads = saved
