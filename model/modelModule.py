"""The seed's import path for the model (``from model.modelModule import VQVAEModel``).

Running this file performs the seed's self-test: forward pass, encode/decode round trip
and loss computation, on a small configuration that finishes in seconds on a CPU.

    python model/modelModule.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository's src/ importable
    _root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(_root / "src"))

from animevq.config import LossOptions  # noqa: E402
from animevq.train.module import VQVAEModel, VQVAEOutput  # noqa: E402
from animevq.nn import LPIPS, Decoder, Encoder, ResBlock, VectorQuantizerEMA  # noqa: E402

__all__ = ["ResBlock", "Encoder", "Decoder", "VectorQuantizerEMA", "LPIPS", "VQVAEModel", "VQVAEOutput"]

SELF_TEST_CONFIG = dict(  # the seed's 4-stage layout at a fraction of its width
    latent_channels=32,
    encoder_channels=(16, 32, 32, 32),
    decoder_channels=(32, 32, 32, 16),
    num_res_blocks=1,
    num_embeddings=64,
    embedding_dim=32,
    losses=LossOptions(lpips_random_init=True),  # no pretrained VGG16 needed: LPIPS values are not meaningful
)


def self_test() -> int:
    import torch

    checks: list[tuple[str, bool]] = []

    def check(name: str, ok: bool) -> None:
        checks.append((name, bool(ok)))
        print(f"  [{'ok' if ok else 'FAIL'}] {name}")

    start = time.perf_counter()
    torch.manual_seed(0)
    print("animevq self-test: a small VQVAEModel (channels 16–32, K=64) with a randomly")
    print("initialised LPIPS VGG16 (no pretrained weights are loaded; LPIPS values are not meaningful)")
    model = VQVAEModel(**SELF_TEST_CONFIG)
    x = torch.rand(2, 3, 64, 64) * 2 - 1

    model.train()
    out = model(x)
    check("forward returns a named VQVAEOutput", isinstance(out, VQVAEOutput))
    check("reconstruction has the input's shape (2, 3, 64, 64)", out.reconstruction.shape == x.shape)
    check("reconstruction lies in [-1, 1]", bool(out.reconstruction.abs().max() <= 1))
    names = ("recon_loss", "vq_loss", "commitment_loss", "perc_loss", "total_loss", "perplexity", "code_usage_rate")
    check("losses and metrics are finite", all(torch.isfinite(getattr(out, n)).all() for n in names))
    hp = model.hparams
    total = (hp.lambda_rec * out.recon_loss + hp.lambda_vq * out.vq_loss
             + hp.lambda_commit * out.commitment_loss + hp.lambda_perc * out.perc_loss)
    check("total = λ_rec·L1 + λ_vq·vq + λ_commit·commit + λ_perc·LPIPS", torch.allclose(out.total_loss, total))
    out.total_loss.backward()
    grad = model.tokenizer.encoder.stem.weight.grad
    check("gradients reach the encoder (straight-through)", grad is not None and grad.abs().sum() > 0)

    model.eval()
    indices = model.encode(x)
    check("encode gives (2, 16) int64 indices in [0, K)", indices.shape == (2, 16) and indices.dtype == torch.int64
          and int(indices.min()) >= 0 and int(indices.max()) < hp.num_embeddings)
    with torch.no_grad():
        ref = model(x).reconstruction
    check("decode(encode(x)) equals forward(x).reconstruction", torch.allclose(model.decode(indices), ref, atol=1e-6))
    check("decode accepts (B, h, w) grids", torch.allclose(model.decode(indices.view(2, 4, 4)), ref, atol=1e-6))

    failed = [name for name, ok in checks if not ok]
    print(f"{len(checks) - len(failed)}/{len(checks)} checks passed in {time.perf_counter() - start:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(self_test())
