"""VQ-GAN training under manual optimisation (issue: adversarial training)."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from animevq.lightning_module import VQVAEModel


def loader(n: int = 6, batch: int = 2, size: int = 32) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    data = [torch.rand(batch, 3, size, size, generator=g) * 2 - 1 for _ in range(n)]
    return DataLoader(data, batch_size=None)


def trainer(tmp_path, **kwargs) -> pl.Trainer:
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                    enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path)
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


@pytest.fixture
def gan_kwargs(tiny_kwargs) -> dict:
    return dict(tiny_kwargs, lambda_gan=0.5, disc_norm="group", disc_start=3, log_every_n_steps=1,
                log_images_every_n_steps=10**6)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict, module: torch.nn.Module) -> bool:
    return any(not torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_discriminator_untouched_before_disc_start_then_both_step(tmp_path, gan_kwargs) -> None:
    model = VQVAEModel(**gan_kwargs)
    assert not model.automatic_optimization
    d0, e0 = snapshot(model.discriminator), snapshot(model.encoder)
    trainer(tmp_path, max_epochs=1, limit_train_batches=3).fit(model, loader())
    assert model.batches_seen == 3
    assert changed(e0, model.encoder)
    assert not changed(d0, model.discriminator)  # batches 0..2 < disc_start
    d1, e1 = snapshot(model.discriminator), snapshot(model.encoder)
    trainer(tmp_path, max_epochs=1, limit_train_batches=2).fit(model, loader())
    assert changed(d1, model.discriminator) and changed(e1, model.encoder)


def test_generator_step_gives_discriminator_no_gradient(tmp_path, gan_kwargs) -> None:
    """Only the discriminator's own loss moves it: its weights after one batch equal one Adam
    step on d_loss computed from the same reconstruction."""
    model = VQVAEModel(**dict(gan_kwargs, disc_start=0))
    x = next(iter(loader()))
    reference = copy.deepcopy(model)
    trainer(tmp_path, max_epochs=1, limit_train_batches=1).fit(model, DataLoader([x], batch_size=None))
    from animevq.losses import d_loss

    with torch.no_grad():
        x_rec = reference(x).reconstruction
    opt = torch.optim.Adam(reference.discriminator.parameters(), lr=reference.hparams.learning_rate,
                           betas=reference.hparams.betas)
    loss = d_loss(reference.discriminator(x), reference.discriminator(x_rec), "hinge")
    loss.backward()
    opt.step()
    for p, q in zip(model.discriminator.parameters(), reference.discriminator.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_logged_gan_keys(tmp_path, gan_kwargs) -> None:
    logged: list[dict] = []

    class Capture(pl.loggers.logger.Logger):
        name, version = "capture", "0"

        def log_metrics(self, metrics, step=None):
            logged.append(dict(metrics))

        def log_hyperparams(self, params, *args, **kwargs):
            pass

    model = VQVAEModel(**dict(gan_kwargs, disc_start=1))
    trainer(tmp_path, max_epochs=1, limit_train_batches=3, logger=Capture()).fit(model, loader())
    keys = {"train/g_loss", "train/d_loss", "train/d_weight", "train/logits_real", "train/logits_fake",
            "train/recon_loss", "train/total_loss", "train/code_usage_rate", "train/perplexity"}
    assert keys <= set(logged[-1])
    assert logged[0]["train/d_loss"] == 0.0 and logged[-1]["train/d_loss"] > 0  # off, then on
    assert logged[-1]["train/d_weight"] > 0


def test_checkpoint_holds_both_optimizers_and_counter_and_resumes(tmp_path, gan_kwargs) -> None:
    model = VQVAEModel(**dict(gan_kwargs, disc_start=1))
    t = trainer(tmp_path, max_epochs=1, limit_train_batches=4)
    t.fit(model, loader())
    path = tmp_path / "gan.ckpt"
    t.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    assert len(ckpt["optimizer_states"]) == 2 and len(ckpt["lr_schedulers"]) == 2
    assert ckpt["animevq"]["batches_seen"] == 4
    assert not any(k.startswith("lpips.") for k in ckpt["state_dict"])
    resumed = VQVAEModel(**dict(gan_kwargs, disc_start=1))
    t2 = trainer(tmp_path, max_epochs=2, limit_train_batches=4)
    t2.fit(resumed, loader(), ckpt_path=path)
    assert resumed.batches_seen == 8  # counter continued from 4, not from global_step


def test_nonsaturating_and_fixed_weight_variants_are_finite(tmp_path, gan_kwargs) -> None:
    model = VQVAEModel(**dict(gan_kwargs, disc_start=0, disc_loss="nonsaturating", adaptive_disc_weight=False,
                              lecam_weight=0.01, grad_clip_norm=1.0))
    trainer(tmp_path, max_epochs=1, limit_train_batches=2).fit(model, loader())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert model.lecam.ema_real != 0


def test_accumulation_steps_every_k_batches(tmp_path, gan_kwargs) -> None:
    model = VQVAEModel(**dict(gan_kwargs, disc_start=0, accumulate_grad_batches=2))
    e0 = snapshot(model.encoder)
    trainer(tmp_path, max_epochs=1, limit_train_batches=1).fit(model, loader())
    assert not changed(e0, model.encoder)  # one batch of two accumulated: no step yet
    trainer(tmp_path, max_epochs=1, limit_train_batches=1).fit(model, loader())
    assert changed(e0, model.encoder)


def test_mixed_precision_on_cpu_stays_finite(tmp_path, gan_kwargs) -> None:
    """Lightning runs '16-mixed' as bf16 on a CPU; fp16 with loss scaling is a GPU test."""
    model = VQVAEModel(**dict(gan_kwargs, disc_start=0))
    trainer(tmp_path, max_epochs=1, limit_train_batches=2, precision="16-mixed").fit(model, loader())
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_single_pass_generator_gradient_equals_the_textbook_loss(gan_kwargs) -> None:
    """The surrogate's gradients equal those of nll + λ_gan·w·G with w from ∇_W on the full graph."""
    from animevq.losses import adaptive_weight, generator_loss

    kwargs = dict(gan_kwargs, disc_start=0, use_lpips=True, lpips_random_init=True, lambda_perc=0.7)
    model = VQVAEModel(**kwargs).eval()  # eval: the quantiser leaves its codebook alone
    x = torch.rand(2, 3, 32, 32) * 2 - 1

    out, g_loss, d_weight, surrogate = model._generator_losses(x, step=0)
    surrogate.backward()
    fast = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    ref = model(x)
    g_ref = generator_loss(model.discriminator(ref.reconstruction), "hinge")
    w_ref = adaptive_weight(ref.total_loss, g_ref, model.decoder.last_layer) * kwargs["lambda_gan"]
    assert torch.allclose(d_weight, w_ref, rtol=1e-4)
    assert torch.allclose(g_loss, g_ref) and torch.allclose(out.total_loss, ref.total_loss)
    (ref.total_loss + w_ref * g_ref).backward()
    slow = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None and "discriminator" not in n}
    assert set(slow) <= set(fast) and any(n.startswith("encoder") for n in slow)
    for name, grad in slow.items():
        torch.testing.assert_close(fast[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("clip", [None, 1e6], ids=["device", "host"])  # how the guard decides
def test_nonfinite_batch_is_skipped_by_both_optimizers(tmp_path, gan_kwargs, clip) -> None:
    g = torch.Generator().manual_seed(2)
    data = [torch.rand(2, 3, 32, 32, generator=g) * 2 - 1 for _ in range(3)]
    data[1][0, 0, 0, 0] = float("nan")  # one poisoned pixel poisons every loss of batch 1
    model = VQVAEModel(**dict(gan_kwargs, disc_start=0, grad_clip_norm=clip, disc_norm="batch", lecam_weight=0.01))

    class _AroundPoison(pl.Callback):  # everything the model holds, before and after batch 1
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if batch_idx == 1:
                self.on_device = pl_module._on_device
                self.before = copy.deepcopy(pl_module.state_dict())
                self.adam_before = copy.deepcopy([o.state_dict()["state"] for o in trainer.optimizers])

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if batch_idx == 1:
                self.after = copy.deepcopy(pl_module.state_dict())
                self.adam_after = copy.deepcopy([o.state_dict()["state"] for o in trainer.optimizers])

    around = _AroundPoison()
    trainer(tmp_path, max_epochs=1, limit_train_batches=3, callbacks=[around]).fit(model, DataLoader(data, batch_size=None))
    assert around.on_device == (clip is None)
    assert around.before.keys() == around.after.keys()
    assert [k for k in around.before if not torch.equal(around.before[k], around.after[k])] == []  # BatchNorm, LeCam too
    flat = [(torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b))
            for a, b in zip(around.adam_before, around.adam_after)]
    assert all(len(a) == len(b) > 0 and all(torch.equal(torch.as_tensor(u), torch.as_tensor(v)) for u, v in zip(a, b))
               for a, b in flat)
    assert model.batches_seen == 3 and model.nonfinite_total == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(b).all() for b in model.quantizer.buffers())


def test_float16_loss_scaling_on_cpu(tmp_path, gan_kwargs) -> None:
    """A real GradScaler ('16-mixed' on the CPU via an explicit plugin): the generator's
    loss-scale borrowing divides out exactly, so no step overflows and the scale holds."""
    from lightning.pytorch.plugins import MixedPrecision

    model = VQVAEModel(**dict(gan_kwargs, disc_start=0, use_lpips=True, lpips_random_init=True))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    e0 = snapshot(model.encoder)
    trainer(tmp_path, max_epochs=1, limit_train_batches=3,
            plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)]).fit(model, loader())
    assert model._loss_scale() == 1024.0 and scaler.get_scale() == 1024.0  # no inf/NaN step backed it off
    assert changed(e0, model.encoder) and model.nonfinite_total == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_generator_gradients_do_not_depend_on_the_borrowed_loss_scale(gan_kwargs) -> None:
    model = VQVAEModel(**dict(gan_kwargs, disc_start=0)).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    grads = []
    for scale in (1.0, 1024.0):
        model._loss_scale = lambda scale=scale: scale  # what a GradScaler's scale would be
        _, _, weight, surrogate = model._generator_losses(x, step=0)
        model.zero_grad()
        surrogate.backward()
        grads.append((weight, [p.grad.clone() for p in model.decoder.parameters()]))
    assert torch.allclose(grads[0][0], grads[1][0], rtol=1e-5)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
