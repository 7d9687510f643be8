"""VQ-GAN training under manual optimisation: the GanStep and the objective's two players."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from conftest import merged, model_kwargs, random_batches, tiny_trainer
from conftest import loader as batches_loader

from animevq.train.losses import adaptive_weight, d_loss, generator_loss
from animevq.train.module import VQVAEModel


def loader(n: int = 6, batch: int = 2, size: int = 32) -> torch.utils.data.DataLoader:
    return batches_loader(random_batches(n, batch, size, seed=1))


def trainer(tmp_path, **kwargs) -> pl.Trainer:
    return tiny_trainer(limit_val_batches=0, default_root_dir=tmp_path, **kwargs)


def gan(**overrides) -> VQVAEModel:
    """The tiny VQ-GAN: discriminator from batch 3 (``overrides`` merge into its groups)."""
    base = model_kwargs(lambda_gan=0.5, log_every_n_steps=1, log_images_every_n_steps=10**6,
                        adversarial={"disc_norm": "group", "disc_start": 3})
    return VQVAEModel(**merged(base, overrides))


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict, module: torch.nn.Module) -> bool:
    return any(not torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_discriminator_untouched_before_disc_start_then_both_step(tmp_path) -> None:
    model = gan()
    assert not model.automatic_optimization
    d0, e0 = snapshot(model.objective.discriminator), snapshot(model.tokenizer.encoder)
    trainer(tmp_path, max_epochs=1, limit_train_batches=3).fit(model, loader())
    assert model.batches_seen == 3
    assert changed(e0, model.tokenizer.encoder)
    assert not changed(d0, model.objective.discriminator)  # batches 0..2 < disc_start
    d1, e1 = snapshot(model.objective.discriminator), snapshot(model.tokenizer.encoder)
    trainer(tmp_path, max_epochs=1, limit_train_batches=2).fit(model, loader())
    assert changed(d1, model.objective.discriminator) and changed(e1, model.tokenizer.encoder)


def test_generator_step_gives_discriminator_no_gradient(tmp_path) -> None:
    """Only the discriminator's own loss moves it: its weights after one batch equal one Adam
    step on d_loss computed from the same reconstruction."""
    model = gan(adversarial={"disc_start": 0})
    x = next(iter(loader()))
    reference = copy.deepcopy(model)
    trainer(tmp_path, max_epochs=1, limit_train_batches=1).fit(model, batches_loader([x]))

    with torch.no_grad():
        x_rec = reference(x).reconstruction
    opt = torch.optim.Adam(reference.objective.discriminator.parameters(), lr=reference.hparams.learning_rate,
                           betas=tuple(reference.hparams.betas))
    loss = d_loss(reference.objective.discriminator(x), reference.objective.discriminator(x_rec), "hinge")
    loss.backward()
    opt.step()
    for p, q in zip(model.objective.discriminator.parameters(), reference.objective.discriminator.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_logged_gan_keys(tmp_path) -> None:
    logged: list[dict] = []

    class Capture(pl.loggers.logger.Logger):
        name, version = "capture", "0"

        def log_metrics(self, metrics, step=None):
            logged.append(dict(metrics))

        def log_hyperparams(self, params, *args, **kwargs):
            pass

    model = gan(adversarial={"disc_start": 1})
    trainer(tmp_path, max_epochs=1, limit_train_batches=3, logger=Capture()).fit(model, loader())
    keys = {"train/g_loss", "train/d_loss", "train/d_weight", "train/logits_real", "train/logits_fake",
            "train/recon_loss", "train/total_loss", "train/code_usage_rate", "train/perplexity"}
    assert keys <= set(logged[-1])
    assert logged[0]["train/d_loss"] == 0.0 and logged[-1]["train/d_loss"] > 0  # off, then on
    assert logged[-1]["train/d_weight"] > 0


def test_checkpoint_holds_both_optimizers_and_counter_and_resumes(tmp_path) -> None:
    model = gan(adversarial={"disc_start": 1})
    t = trainer(tmp_path, max_epochs=1, limit_train_batches=4)
    t.fit(model, loader())
    path = tmp_path / "gan.ckpt"
    t.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    assert len(ckpt["optimizer_states"]) == 2 and len(ckpt["lr_schedulers"]) == 2
    assert ckpt["animevq"]["batches_seen"] == 4
    assert not any("lpips." in k for k in ckpt["state_dict"])
    assert any(k.startswith("objective.discriminator.") for k in ckpt["state_dict"])
    resumed = gan(adversarial={"disc_start": 1})
    t2 = trainer(tmp_path, max_epochs=2, limit_train_batches=4)
    t2.fit(resumed, loader(), ckpt_path=path)
    assert resumed.batches_seen == 8  # counter continued from 4, not from global_step


def test_nonsaturating_and_fixed_weight_variants_are_finite(tmp_path) -> None:
    model = gan(adversarial={"disc_start": 0, "disc_loss": "nonsaturating", "adaptive_disc_weight": False,
                             "lecam_weight": 0.01}, optimization={"grad_clip_norm": 1.0})
    trainer(tmp_path, max_epochs=1, limit_train_batches=2).fit(model, loader())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert model.objective.lecam.ema_real != 0


def test_accumulation_steps_every_k_batches(tmp_path) -> None:
    model = gan(adversarial={"disc_start": 0}, optimization={"accumulate_grad_batches": 2})
    e0 = snapshot(model.tokenizer.encoder)
    trainer(tmp_path, max_epochs=1, limit_train_batches=1).fit(model, loader())
    assert not changed(e0, model.tokenizer.encoder)  # one batch of two accumulated: no step yet
    trainer(tmp_path, max_epochs=1, limit_train_batches=1).fit(model, loader())
    assert changed(e0, model.tokenizer.encoder)


def test_mixed_precision_on_cpu_stays_finite(tmp_path) -> None:
    """Lightning runs '16-mixed' as bf16 on a CPU; fp16 with loss scaling is a GPU test."""
    model = gan(adversarial={"disc_start": 0})
    trainer(tmp_path, max_epochs=1, limit_train_batches=2, precision="16-mixed").fit(model, loader())
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_single_pass_generator_gradient_equals_the_textbook_loss() -> None:
    """The surrogate's gradients equal those of nll + λ_gan·w·G with w from ∇_W on the full graph."""
    model = gan(adversarial={"disc_start": 0}, use_lpips=True, losses={"lpips_random_init": True},
                lambda_perc=0.7).eval()  # eval: the quantiser leaves its codebook alone
    x = torch.rand(2, 3, 32, 32) * 2 - 1

    tokenized = model.tokenizer(x)
    out, g_loss, d_weight, surrogate = model.objective.generator(
        x, tokenized.reconstruction, tokenized.quantized, batch=0, last_layer=model.tokenizer.decoder.last_layer)
    surrogate.backward()
    fast = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    ref = model(x)
    g_ref = generator_loss(model.objective.discriminator(ref.reconstruction), "hinge")
    w_ref = adaptive_weight(ref.total_loss, g_ref, model.tokenizer.decoder.last_layer) * 0.5  # lambda_gan
    assert torch.allclose(d_weight, w_ref, rtol=1e-4)
    assert torch.allclose(g_loss, g_ref) and torch.allclose(out.total_loss, ref.total_loss)
    (ref.total_loss + w_ref * g_ref).backward()
    slow = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None and "discriminator" not in n}
    assert set(slow) <= set(fast) and any(n.startswith("tokenizer.encoder") for n in slow)
    for name, grad in slow.items():
        torch.testing.assert_close(fast[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("clip", [None, 1e6], ids=["device", "host"])  # how the guard decides
def test_nonfinite_batch_is_skipped_by_both_optimizers(tmp_path, clip) -> None:
    g = torch.Generator().manual_seed(2)
    data = [torch.rand(2, 3, 32, 32, generator=g) * 2 - 1 for _ in range(3)]
    data[1][0, 0, 0, 0] = float("nan")  # one poisoned pixel poisons every loss of batch 1
    model = gan(adversarial={"disc_start": 0, "disc_norm": "batch", "lecam_weight": 0.01},
                optimization={"grad_clip_norm": clip, "ema_decay": 0.5})  # the weight EMA too

    class _AroundPoison(pl.Callback):  # everything the model holds, before and after batch 1
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if batch_idx == 1:
                self.on_device = pl_module.guard.on_device
                self.before = copy.deepcopy(pl_module.state_dict())
                self.adam_before = copy.deepcopy([o.state_dict()["state"] for o in trainer.optimizers])

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if batch_idx == 1:
                self.after = copy.deepcopy(pl_module.state_dict())
                self.adam_after = copy.deepcopy([o.state_dict()["state"] for o in trainer.optimizers])

    around = _AroundPoison()
    trainer(tmp_path, max_epochs=1, limit_train_batches=3, callbacks=[around]).fit(model, batches_loader(data))
    assert around.on_device == (clip is None)
    assert around.before.keys() == around.after.keys() and any(k.startswith("ema_tokenizer.") for k in around.before)
    assert [k for k in around.before if not torch.equal(around.before[k], around.after[k])] == []  # BatchNorm, LeCam too
    flat = [(torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b))
            for a, b in zip(around.adam_before, around.adam_after)]
    assert all(len(a) == len(b) > 0 and all(torch.equal(torch.as_tensor(u), torch.as_tensor(v)) for u, v in zip(a, b))
               for a, b in flat)
    assert model.batches_seen == 3 and model.guard.total == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(b).all() for b in model.tokenizer.quantizer.buffers())


def test_float16_loss_scaling_on_cpu(tmp_path) -> None:
    """A real GradScaler ('16-mixed' on the CPU via an explicit plugin): the generator's
    loss-scale borrowing divides out exactly, so no step overflows and the scale holds."""
    from lightning.pytorch.plugins import MixedPrecision

    model = gan(adversarial={"disc_start": 0}, use_lpips=True, losses={"lpips_random_init": True})
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    e0 = snapshot(model.tokenizer.encoder)
    trainer(tmp_path, max_epochs=1, limit_train_batches=3,
            plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)]).fit(model, loader())
    assert model._loss_scale() == 1024.0 and scaler.get_scale() == 1024.0  # no inf/NaN step backed it off
    assert changed(e0, model.tokenizer.encoder) and model.guard.total == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_generator_gradients_do_not_depend_on_the_borrowed_loss_scale() -> None:
    model = gan(adversarial={"disc_start": 0}).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    grads = []
    for scale in (1.0, 1024.0):  # what a GradScaler's scale would be
        tokenized = model.tokenizer(x)
        _, _, weight, surrogate = model.objective.generator(
            x, tokenized.reconstruction, tokenized.quantized, batch=0,
            last_layer=model.tokenizer.decoder.last_layer, loss_scale=scale)
        model.zero_grad()
        surrogate.backward()
        grads.append((weight, [p.grad.clone() for p in model.tokenizer.decoder.parameters()]))
    assert torch.allclose(grads[0][0], grads[1][0], rtol=1e-5)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
