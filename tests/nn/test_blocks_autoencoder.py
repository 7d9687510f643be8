from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from animevq.nn.autoencoder import Decoder, Encoder
from animevq.nn.blocks import (
    CHANNEL_SUMS,
    GROUP_NORM_EPS,
    ResBlock,
    Upsample,
    group_norm,
    group_norm_silu_by_channel_sums,
    norm_groups,
    set_norm_silu_kernel,
    upsample_conv3x3,
)


@pytest.mark.parametrize(
    ("channels", "groups"), [(256, 32), (128, 32), (64, 16), (16, 4), (8, 2), (12, 3), (3, 1), (1, 1)]
)
def test_norm_groups_adapts_to_small_widths(channels: int, groups: int) -> None:
    assert norm_groups(channels) == groups
    assert channels % norm_groups(channels) == 0


def test_resblock_skip_projection_only_when_width_changes() -> None:
    same, wider = ResBlock(8), ResBlock(8, 16)
    assert isinstance(same.skip, torch.nn.Identity)
    assert isinstance(wider.skip, torch.nn.Conv2d) and wider.skip.kernel_size == (1, 1)
    x = torch.randn(2, 8, 5, 7)
    assert wider(x).shape == (2, 16, 5, 7)
    # With the residual branch zeroed the block is exactly its skip path.
    torch.nn.init.zeros_(same.conv2.weight), torch.nn.init.zeros_(same.conv2.bias)
    assert torch.equal(same(x), x)


def literal_upsample_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    up = torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")
    return torch.nn.functional.conv2d(up, weight, bias, padding=1)


@pytest.mark.parametrize(("height", "width"), [(1, 1), (2, 3), (7, 5), (16, 16)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_phase_conv_equals_nearest_upsample_then_conv3x3(height: int, width: int, with_bias: bool) -> None:
    g = torch.Generator().manual_seed(height * 100 + width)
    x = torch.randn(2, 5, height, width, generator=g, dtype=torch.float64)
    weight = torch.randn(3, 5, 3, 3, generator=g, dtype=torch.float64)
    bias = torch.randn(3, generator=g, dtype=torch.float64) if with_bias else None
    torch.testing.assert_close(upsample_conv3x3(x, weight, bias), literal_upsample_conv(x, weight, bias),
                               rtol=1e-12, atol=1e-12)


def test_phase_conv_gradients_equal_the_literal_form() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 6, 5, generator=g, dtype=torch.float64)
    weight = torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64)
    bias = torch.randn(6, generator=g, dtype=torch.float64)
    upstream = torch.randn(2, 6, 12, 10, generator=g, dtype=torch.float64)
    grads = []
    for fn in (upsample_conv3x3, literal_upsample_conv):
        inputs = [t.clone().requires_grad_(True) for t in (x, weight, bias)]
        grads.append(torch.autograd.grad((fn(*inputs) * upstream).sum(), inputs))
    for fast, literal in zip(*grads):
        torch.testing.assert_close(fast, literal, rtol=1e-12, atol=1e-12)


def test_upsample_module_keeps_the_3x3_parameter_and_both_forms_agree() -> None:
    torch.manual_seed(0)
    fast = Upsample(8, 4)
    literal = Upsample(8, 4, phase_conv=False)
    literal.load_state_dict(fast.state_dict())  # same checkpoint keys and shapes either way
    assert fast.conv.weight.shape == (4, 8, 3, 3) and list(fast.state_dict()) == ["conv.weight", "conv.bias"]
    x = torch.randn(2, 8, 5, 4)
    torch.testing.assert_close(fast(x), literal(x), rtol=1e-5, atol=1e-5)
    channels_last = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fast.to(memory_format=torch.channels_last)(channels_last), literal(x),
                               rtol=1e-5, atol=1e-5)


def test_phase_conv_under_autocast_keeps_the_literal_forms_dtype() -> None:
    # conv2d adds its bias in the autocast dtype; a float32 bias added after the phase conv
    # would turn the output (and the decoder's residual stream after it) into float32.
    torch.manual_seed(0)
    fast = Upsample(8, 4)
    literal = Upsample(8, 4, phase_conv=False)
    literal.load_state_dict(fast.state_dict())
    x = torch.randn(2, 8, 5, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_fast, y_literal = fast(x), literal(x)
    assert y_literal.dtype == torch.bfloat16 and y_fast.dtype == y_literal.dtype
    torch.testing.assert_close(y_fast.float(), y_literal.float(), rtol=2e-2, atol=2e-2)


def test_channels_last_copy_op_is_a_registered_channels_last_copy() -> None:
    x = torch.randn(2, 6, 5, 4)
    torch.library.opcheck(torch.ops.animevq.channels_last_copy.default, (x,))
    y = torch.ops.animevq.channels_last_copy(x)
    assert y.is_contiguous(memory_format=torch.channels_last) and torch.equal(y, x)
    assert y.data_ptr() != x.data_ptr()


def test_encoder_decoder_shapes_seed_architecture_at_small_width() -> None:
    enc = Encoder(3, (8, 16, 16, 16), 1, 12, stem_channels=8)
    dec = Decoder(3, (16, 16, 16, 8), 1, 12)
    x = torch.rand(2, 3, 64, 48) * 2 - 1
    z = enc(x)
    assert z.shape == (2, 12, 4, 3)  # four stride-2 stages: /16
    y = dec(z)
    assert y.shape == x.shape  # the fix: four upsamplings, not three
    assert y.min() >= -1 and y.max() <= 1


def test_default_encoder_is_seed_layout() -> None:
    enc = Encoder()
    widths = [stage[0].conv.out_channels for stage in enc.stages]
    assert widths == [128, 256, 256, 256] and enc.stem.out_channels == 128
    assert all(stage[0].conv.kernel_size == (4, 4) and stage[0].conv.stride == (2, 2) for stage in enc.stages)
    dec = Decoder()
    assert [stage[-1].conv.out_channels for stage in dec.stages] == [256, 256, 256, 128]
    assert dec.head[0].out_channels == 64 and isinstance(dec.head[3], torch.nn.Tanh)


def test_encoder_rejects_sides_not_multiple_of_16() -> None:
    with pytest.raises(ValueError, match="multiples of 16"):
        Encoder(3, (8, 8, 8, 8), 1, 8, stem_channels=8)(torch.zeros(1, 3, 40, 32))


@pytest.mark.parametrize("compiling", [False, True])
def test_group_norm_matches_torch_and_keeps_channels_last_when_compiling(monkeypatch, compiling: bool) -> None:
    ours = group_norm(32).double()
    torch.nn.init.normal_(ours.weight), torch.nn.init.normal_(ours.bias)
    reference = torch.nn.GroupNorm(ours.num_groups, 32, eps=ours.eps).double()
    reference.load_state_dict(ours.state_dict())
    assert isinstance(ours, torch.nn.GroupNorm) and set(ours.state_dict()) == {"weight", "bias"}
    x = torch.randn(2, 32, 8, 8, dtype=torch.float64).to(memory_format=torch.channels_last)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    g = torch.randn(2, 32, 8, 8, dtype=torch.float64)  # NCHW, as a traced ATen kernel hands it back
    expected = reference(x2)
    expected.backward(g)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
    # ATen's CUDA kernel normalises input.contiguous(): NCHW output and input gradient.
    like_cuda = lambda self, x: F.group_norm(x.contiguous(), self.num_groups, self.weight, self.bias, self.eps)  # noqa: E731
    monkeypatch.setattr(torch.nn.GroupNorm, "forward", like_cuda)
    seen: list[torch.Tensor] = []  # the gradient as the norm returns it (a leaf's .grad is restrided)
    inp = x1.clone()
    inp.register_hook(seen.append)
    got = ours(inp)
    got.backward(g)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.weight.grad, reference.weight.grad, rtol=1e-12, atol=1e-12)
    if compiling:  # the layout both ways is channels_last, whatever the kernels return
        assert got.is_contiguous(memory_format=torch.channels_last)
        assert seen[0].is_contiguous(memory_format=torch.channels_last)
    else:  # eager: the kernel's own layouts, untouched
        assert got.is_contiguous() and seen[0].is_contiguous()


def _norm_silu_reference(x, weight, bias, groups):
    return F.silu(F.group_norm(x, groups, weight, bias, GROUP_NORM_EPS))


@pytest.mark.parametrize("offset", [0.0, 1e3])  # 1e3: channel means far from zero against a spread of 1
def test_group_norm_silu_by_channel_sums_is_group_norm_then_silu(offset: float) -> None:
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 12, 5, 7, generator=g, dtype=torch.float64) + offset * torch.randn(1, 12, 1, 1, generator=g,
         dtype=torch.float64)).requires_grad_(True)
    weight = torch.randn(12, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(12, generator=g, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(3, 12, 5, 7, generator=g, dtype=torch.float64)
    got = group_norm_silu_by_channel_sums(x, weight, bias, 3, GROUP_NORM_EPS)
    expected = _norm_silu_reference(x, weight, bias, 3)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    for ours, theirs in zip(torch.autograd.grad(got, (x, weight, bias), grad),
                            torch.autograd.grad(expected, (x, weight, bias), grad)):
        torch.testing.assert_close(ours, theirs, rtol=1e-8, atol=1e-8)
    # float32 with a large mean: no worse than ATen's Welford against float64
    x32, w32, b32 = x.detach().float(), weight.detach().float(), bias.detach().float()
    error = (group_norm_silu_by_channel_sums(x32, w32, b32, 3, GROUP_NORM_EPS).double() - expected).abs().max()
    aten_error = (_norm_silu_reference(x32, w32, b32, 3).double() - expected).abs().max()
    assert error <= 2 * aten_error + 1e-6, (error, aten_error)


def test_group_norm_silu_by_channel_sums_computes_in_float32_and_returns_the_input_dtype() -> None:
    x = torch.randn(2, 8, 4, 4).to(torch.bfloat16)
    weight, bias = torch.randn(8), torch.randn(8)
    got = group_norm_silu_by_channel_sums(x, weight, bias, 2, GROUP_NORM_EPS)
    assert got.dtype == torch.bfloat16
    expected = _norm_silu_reference(x.float(), weight, bias, 2)
    torch.testing.assert_close(got.float(), expected, rtol=2**-8, atol=1e-6)  # one rounding of the float32 result


def test_compiled_resblock_with_channel_sums_matches_eager_and_keeps_channels_last() -> None:
    torch.manual_seed(0)
    block = ResBlock(16)
    for norm in (block.norm1, block.norm2):
        torch.nn.init.normal_(norm.weight), torch.nn.init.normal_(norm.bias)
    summed = copy.deepcopy(block)
    assert set_norm_silu_kernel(summed, CHANNEL_SUMS) == 2
    assert summed.state_dict().keys() == block.state_dict().keys()
    x = (torch.randn(2, 16, 8, 8) * 3 + 2).to(memory_format=torch.channels_last)
    grad = torch.randn(2, 16, 8, 8)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    expected = block(x1)
    expected.backward(grad)
    assert not CHANNEL_SUMS.supports(x, 4)  # eager: ATen's kernels
    got = torch.compile(summed, backend="aot_eager")(x2)  # traced: the channel-sums form runs
    got.backward(grad)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-4, atol=1e-4)
    for ours, theirs in zip(summed.parameters(), block.parameters()):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-4, atol=1e-4)
    assert got.is_contiguous(memory_format=torch.channels_last)
