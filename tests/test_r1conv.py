"""r1conv.py: the convolution whose double backward runs on ordinary backward kernels gives the built-in
convolution's values, gradients and second derivatives; routed into D's pass on the reals, D's step with R1
matches the built-in one."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_fast_path import dgnet, step

import r1conv
from networks import MsImageDis, dis_loss
from utils import UserError


@pytest.mark.parametrize("stride,padding,bias", [(1, 0, True), (2, 1, True), (1, 1, False), (2, 0, False)])
def test_gradgradcheck(stride: int, padding: int, bias: bool) -> None:
    """First and second derivatives against finite differences, in float64, for every input of the three
    Functions (the gradcheck of a double backward exercises _InputGrad and _WeightGrad too)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, generator=g, requires_grad=True) if bias else None
    inputs = (x, w) + ((b,) if bias else ())

    def f(*args: torch.Tensor) -> torch.Tensor:
        return r1conv.conv2d(args[0], args[1], args[2] if bias else None, stride, padding)

    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


def test_r1_penalty_gradient_matches_the_builtin_double_backward() -> None:
    """The R1 pattern itself: the input gradient taken with create_graph (weight gradients skipped), its
    squared norm differentiated with respect to the weights and the input."""
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 2, 9, 8, dtype=torch.float64, generator=g)
    w1 = torch.randn(5, 2, 3, 3, dtype=torch.float64, generator=g).requires_grad_()
    w2 = torch.randn(1, 5, 3, 3, dtype=torch.float64, generator=g).requires_grad_()

    def penalty(conv, skip: bool) -> tuple[torch.Tensor, ...]:
        x = x0.clone().requires_grad_()
        out = conv(F.leaky_relu(conv(x, w1, None, 2, 1), 0.2), w2, None, 1, 1)
        with r1conv.weight_grads_skipped(skip):
            (grad,) = torch.autograd.grad(out.sum(), x, create_graph=True)
        return torch.autograd.grad(grad.pow(2).sum() + out.pow(2).sum(), (w1, w2, x))

    expected = penalty(F.conv2d, False)
    for skip in (False, True):
        for e, g_ in zip(expected, penalty(r1conv.conv2d, skip)):
            torch.testing.assert_close(g_, e, rtol=1e-10, atol=1e-12)


def test_d_step_with_routed_convolutions_matches_the_builtin_one() -> None:
    """dis_loss with r1_conv on: D's convolutions on the reals run through r1conv (reflect padding stays
    nn.Conv2d's own), and the loss, the R1 term and every weight gradient equal the built-in ones."""
    torch.manual_seed(0)
    dis = MsImageDis(3, dim=4, n_layer=2, n_res=1, num_scales=2)
    fake, real = torch.randn(2, 3, 32, 16), torch.randn(2, 3, 32, 16)
    calls = []
    original = r1conv.conv2d
    results = []
    for routed in (False, True):
        dis.zero_grad(set_to_none=True)

        def counted(*args, **kwargs):
            calls.append(args[0].shape)
            return original(*args, **kwargs)

        r1conv.conv2d = counted
        try:
            loss, r1 = dis_loss(dis, fake, real, "lsgan", 0.5, r1_conv=routed)
            loss.backward()
        finally:
            r1conv.conv2d = original
        results.append((loss.detach(), r1.detach(), [p.grad.clone() for p in dis.parameters()]))
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in dis.modules())
    assert len(calls) == convs  # the reals' pass only, every convolution of it, once
    (loss0, r10, grads0), (loss1, r11, grads1) = results
    assert float(r10) > 0
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=0)  # the same forward arithmetic
    torch.testing.assert_close(r11, r10, rtol=1e-5, atol=1e-7)
    for a, b in zip(grads1, grads0):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_dgnet_iteration_with_r1_conv_matches_the_builtin_one() -> None:
    """Two DG-Net iterations with every loss term on: r1_conv: always gives the default path's losses and
    weights up to float rounding (the key is off on every device until a GPU measures it: auto)."""
    plain, routed = dgnet(), dgnet("r1_conv=always")
    assert not plain.r1_conv and routed.r1_conv
    for it in range(2):
        a, b = step(plain, it), step(routed, it)
        assert float(a["R1"]) > 0
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6, msg=key)
    for name in plain.parts:
        for p, q in zip(plain.parts[name].module.parameters(), routed.parts[name].module.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)
    with pytest.raises(UserError, match="r1_conv is 'sometimes'"):
        dgnet("r1_conv=sometimes")


def test_routing_takes_keyword_arguments() -> None:
    """F.conv2d called with keywords inside the routed pass gives what it gives outside."""
    x, w = torch.randn(1, 2, 6, 5), torch.randn(3, 2, 3, 3)
    with r1conv.r1_convs():
        routed = F.conv2d(input=x, weight=w, stride=2, padding=1)
    torch.testing.assert_close(routed, F.conv2d(x, w, stride=2, padding=1))
