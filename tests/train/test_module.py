"""VQVAEModel: the seed's API over the composed tokenizer, objective and guard."""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import loader, model_kwargs, random_batches, tiny_trainer

from animevq import Tokenizer
from animevq.config import SEED_DEFAULTS
from animevq.train.module import VQVAEModel, VQVAEOutput
from animevq.train.optim import warmup_cosine


def test_every_seed_parameter_has_the_seed_default() -> None:
    params = inspect.signature(VQVAEModel.__init__).parameters
    names = [n for n in params if n != "self"]
    assert names[: len(SEED_DEFAULTS)] == list(SEED_DEFAULTS)  # same order, positional as in the seed
    for name, default in SEED_DEFAULTS.items():
        assert params[name].default == default, name
    assert SEED_DEFAULTS == {
        "in_channels": 3, "latent_channels": 256, "encoder_channels": (128, 256, 256, 256),
        "decoder_channels": (256, 256, 256, 128), "num_res_blocks": 2, "num_embeddings": 1024,
        "embedding_dim": 256, "commitment_cost": 0.25, "decay": 0.99, "lambda_rec": 1.0, "lambda_vq": 1.0,
        "lambda_commit": 0.25, "lambda_perc": 0.5, "lambda_gan": 0.0, "use_lpips": True,
        "learning_rate": 2e-4, "betas": (0.9, 0.99), "weight_decay": 0.0, "log_every_n_steps": 100,
        "log_images_every_n_steps": 500,
    }


def test_hyperparameters_are_plain_values_and_rebuild_the_model(tiny_kwargs) -> None:
    model = VQVAEModel(**model_kwargs(quantizer={"kmeans_init": True}, safety={"max_nonfinite_steps": 3}))
    plain = (int, float, bool, str, type(None), list)

    def check(key, value):
        if isinstance(value, dict):
            for k, v in value.items():
                check(f"{key}.{k}", v)
        else:
            assert isinstance(value, plain), (key, type(value))

    for key, value in model.hparams.items():
        check(key, value)
    assert model.hparams.encoder_channels == [8, 16, 16, 16]
    assert model.hparams.quantizer["kmeans_init"] is True and model.hparams.safety == {"max_nonfinite_steps": 3}
    again = VQVAEModel(**model.hparams)  # what load_from_checkpoint does
    assert again.config == model.config


def test_the_model_holds_a_tokenizer(tiny_kwargs) -> None:
    model = VQVAEModel(**tiny_kwargs)
    assert isinstance(model.tokenizer, Tokenizer) and model.tokenizer.config == model.config.tokenizer
    assert model.tokenizer.codebook_size == 16
    tokenizer_keys = {f"tokenizer.{k}" for k in model.tokenizer.state_dict()}
    assert tokenizer_keys == {k for k in model.state_dict() if k.startswith("tokenizer.")}


def test_use_lpips_false_builds_no_vgg(tiny_kwargs) -> None:
    model = VQVAEModel(**tiny_kwargs)
    assert model.objective.lpips is None
    assert not any("lpips" in name for name, _ in model.named_parameters())


def test_forward_total_loss_formula_with_lpips(tiny_kwargs) -> None:
    kwargs = dict(tiny_kwargs, use_lpips=True, losses={"lpips_random_init": True}, lambda_rec=0.7, lambda_vq=1.3,
                  lambda_commit=0.4, lambda_perc=0.9)
    model = VQVAEModel(**kwargs)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    out = model(x)
    assert isinstance(out, VQVAEOutput)
    assert out.reconstruction.shape == x.shape and out.indices.shape == (2, 2, 2)
    expected = 0.7 * out.recon_loss + 1.3 * out.vq_loss + 0.4 * out.commitment_loss + 0.9 * out.perc_loss
    assert torch.allclose(out.total_loss, expected)
    assert torch.isclose(out.recon_loss, (out.reconstruction - x).abs().mean())
    assert torch.isclose(out.perc_loss, model.objective.lpips(x, out.reconstruction).mean())
    assert out.perc_loss > 0


def test_encode_decode_round_trip_equals_forward(tiny_kwargs) -> None:
    model = VQVAEModel(**tiny_kwargs).eval()
    x = torch.rand(3, 3, 64, 32) * 2 - 1
    indices = model.encode(x)
    assert indices.shape == (3, 8) and indices.dtype == torch.int64
    assert 0 <= int(indices.min()) and int(indices.max()) < 16
    with torch.no_grad():
        ref = model(x).reconstruction
    assert torch.allclose(model.decode(indices.view(3, 4, 2)), ref, atol=1e-6)
    with pytest.raises(ValueError, match="not a square grid"):
        model.decode(indices)  # 8 is not a square: the grid shape must be given


def test_flat_square_indices_decode(tiny_kwargs) -> None:
    model = VQVAEModel(**tiny_kwargs).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.allclose(model.decode(model.encode(x)), model(x).reconstruction, atol=1e-6)


def test_encode_never_updates_the_codebook(tiny_kwargs) -> None:
    model = VQVAEModel(**tiny_kwargs).train()
    before = model.tokenizer.quantizer.codebook.clone()
    model.encode(torch.rand(2, 3, 32, 32))
    assert torch.equal(before, model.tokenizer.quantizer.codebook)


def test_projection_when_latent_differs_from_code_dim(tiny_kwargs) -> None:
    model = VQVAEModel(**dict(tiny_kwargs, embedding_dim=4))
    assert isinstance(model.tokenizer.quant_conv, torch.nn.Conv2d) and model.tokenizer.quant_conv.out_channels == 4
    out = model(torch.rand(1, 3, 32, 32))
    assert out.reconstruction.shape == (1, 3, 32, 32)


def test_gradients_reach_encoder_through_straight_through(tiny_kwargs) -> None:
    model = VQVAEModel(**tiny_kwargs)
    model(torch.rand(2, 3, 32, 32) * 2 - 1).total_loss.backward()
    assert model.tokenizer.encoder.stem.weight.grad.abs().sum() > 0
    assert model.tokenizer.decoder.last_layer.grad.abs().sum() > 0


def test_bf16_autocast_on_cpu_gives_finite_losses(tiny_kwargs) -> None:
    model = VQVAEModel(**dict(tiny_kwargs, use_lpips=True, losses={"lpips_random_init": True}))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.rand(2, 3, 32, 32) * 2 - 1)
    for name in ("recon_loss", "vq_loss", "commitment_loss", "perc_loss", "total_loss"):
        assert torch.isfinite(getattr(out, name)), name
    out.total_loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_optimizer_and_scheduler(tiny_kwargs) -> None:
    model = VQVAEModel(**model_kwargs(learning_rate=1e-3, betas=(0.5, 0.9), weight_decay=0.01,
                                      optimization={"warmup_steps": 10, "lr_schedule": "constant"}))
    config = model.configure_optimizers()
    opt = config[0]["optimizer"]
    assert isinstance(opt, torch.optim.Adam)
    group = opt.param_groups[0]
    assert group["betas"] == (0.5, 0.9) and group["weight_decay"] == 0.01
    sched = config[0]["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step(), sched.step()
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3) and lrs[11] == pytest.approx(1e-3)
    ids = {id(p) for p in group["params"]}
    assert id(model.tokenizer.quantizer.codebook) not in ids  # EMA codebook: not trained by Adam
    assert [id(p) for p in group["params"]] == [id(p) for p in model.tokenizer.parameters()]  # 0.1's order


def test_warmup_cosine_shape() -> None:
    f = lambda s: warmup_cosine(s, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)  # noqa: E731
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert warmup_cosine(50, warmup_steps=0, total_steps=None, min_lr_ratio=0.1) == 1.0


def test_bad_configuration_errors(tiny_kwargs) -> None:
    with pytest.raises(ValueError, match="same number of stages"):
        VQVAEModel(**dict(tiny_kwargs, decoder_channels=(16, 16, 8)))
    with pytest.raises(ValueError, match="lr_schedule"):
        VQVAEModel(**model_kwargs(optimization={"lr_schedule": "linear"}))
    with pytest.raises(ValueError, match=r"model\.optimization has no setting 'warmup'"):
        VQVAEModel(**model_kwargs(optimization={"warmup": 3}))
    with pytest.raises(TypeError, match="unexpected keyword argument 'warmup_steps'"):
        VQVAEModel(**dict(tiny_kwargs, warmup_steps=3))  # 0.1's flat spelling: now optimization.warmup_steps


def test_seed_import_path_exports_the_six_classes() -> None:
    import model.modelModule as seed

    for name in ("ResBlock", "Encoder", "Decoder", "VectorQuantizerEMA", "LPIPS", "VQVAEModel"):
        assert getattr(seed, name) is getattr(__import__("animevq"), name)


def test_seed_self_test_script_passes() -> None:
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "model/modelModule.py"], cwd=root, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAIL" not in result.stdout and "checks passed" in result.stdout
    assert "randomly" in result.stdout  # says it uses random LPIPS weights


def test_progress_bar_loss_is_logged_as_a_host_tensor(tiny_kwargs, tmp_path, monkeypatch) -> None:
    """Lightning keeps a logged value on its tensor's device and reads the progress bar's
    values back after every batch: the loss must be a host tensor, or a GPU run waits for
    the GPU once per step."""
    model = VQVAEModel(**tiny_kwargs, log_every_n_steps=1)
    logged: dict[str, object] = {}
    real_log = model.log

    def log(name, value, **kwargs):
        logged[name] = value
        real_log(name, value, **kwargs)

    monkeypatch.setattr(model, "log", log)
    trainer = tiny_trainer(limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(model, train_dataloaders=loader(random_batches(2)))
    value = logged["train/total_loss"]
    assert isinstance(value, torch.Tensor) and value.device.type == "cpu"
    assert trainer.progress_bar_metrics["train/total_loss"] == pytest.approx(float(value))
