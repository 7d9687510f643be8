"""What torch.compile makes of our modules: graph counts and the ops it keeps. These pin
compiler internals (they were written against torch 2.11-2.14) rather than behaviour; the
speed they protect is measured in benchmarks/. Deselect them with ``-m "not perf"``."""

from __future__ import annotations

import pytest

from animevq.nn.autoencoder import Decoder

pytestmark = pytest.mark.perf


def test_compiled_decoder_realigns_gradients_and_matches_eager() -> None:
    # Every upsampling followed by a ResBlock copies its output gradient into channels_last
    # (an op Inductor keeps); the last, followed by the head's conv, does not need to.
    import torch._dynamo
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    torch._dynamo.reset()
    decoder = Decoder(channels=(16, 16, 8), num_res_blocks=1, latent_channels=8)
    assert [stage[-1].realign_grad for stage in decoder.stages] == [True, True, False]
    decoder = decoder.to(memory_format=torch.channels_last)
    backward_ops: list[str] = []

    def backward_compiler(gm, example_inputs):
        backward_ops.extend(str(node.target) for node in gm.graph.nodes)
        return make_boxed_func(gm.forward)

    compiled = torch.compile(decoder, backend=aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm.forward),
                                                           bw_compiler=backward_compiler))
    z = torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    grads = []
    for fn in (decoder, compiled):
        decoder.zero_grad()
        fn(z).square().mean().backward()
        grads.append([p.grad.clone() for p in decoder.parameters()])
    assert sum("animevq.channels_last_copy" in op for op in backward_ops) == 2
    for eager, comp in zip(*grads):
        torch.testing.assert_close(comp, eager, rtol=1e-4, atol=1e-5)


def test_decoder_stages_compile_to_one_graph() -> None:
    """VQ-GAN compiles the decoder's stages alone. As a plain nn.Sequential (torch 2.11)
    that became one graph per block, re-compiled per resolution; it must be one graph."""
    import torch._dynamo

    graphs: list[int] = []

    def counting_backend(gm, example_inputs):
        graphs.append(len(gm.graph.nodes))
        return gm.forward

    torch._dynamo.reset()
    decoder = Decoder(channels=(16, 16, 8), num_res_blocks=1, latent_channels=8)
    eager = Decoder(channels=(16, 16, 8), num_res_blocks=1, latent_channels=8)
    eager.load_state_dict(decoder.state_dict())  # same keys as before: nn.Sequential numbering
    assert isinstance(decoder.stages, torch.nn.Sequential)
    decoder.stages.compile(backend=counting_backend)
    z = torch.randn(2, 8, 4, 4)
    out = decoder(z)
    out.sum().backward()
    assert len(graphs) == 1
    torch.testing.assert_close(out, eager(z))
