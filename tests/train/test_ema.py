"""Weight EMA (``optimization.ema_decay``): the average follows its recurrence once per optimiser
step, a skipped batch leaves it alone, validation reports it, and resuming cannot switch it."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import loader, model_kwargs, random_batches, tiny_model, tiny_trainer
from recording import PoisonBatches, fit, logging_model

from animevq.runs.checkpoint_io import CheckpointError
from animevq.train.ema import ema_copy, ema_update
from animevq.train.module import VQVAEModel

DECAY = 0.5  # far from 1, so a few steps move the average visibly away from the live weights


def _ema_state(model: VQVAEModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.startswith("ema_tokenizer.")}


class _Steps(pl.Callback):
    """The live tokenizer's parameters (float64) after every optimiser step."""

    def __init__(self, accumulate: int) -> None:
        self.accumulate, self.history = accumulate, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.batches_seen % self.accumulate == 0:
            self.history.append([p.detach().double().clone() for p in pl_module.tokenizer.parameters()])


def test_ema_update_is_a_lerp_and_skips_exactly() -> None:
    live = torch.nn.Linear(3, 2)
    average = ema_copy(live)
    assert not any(p.requires_grad for p in average.parameters())
    with torch.no_grad():
        live.weight.add_(1.0)
    before = average.weight.detach().clone()
    ema_update(average, live, decay=0.75, skip=torch.tensor(True))
    assert torch.equal(average.weight, before)
    ema_update(average, live, decay=0.75, skip=torch.tensor(False))
    torch.testing.assert_close(average.weight, 0.75 * before + 0.25 * live.weight.detach())


@pytest.mark.parametrize(("family", "accumulate"), [("vqvae", 1), ("vqvae", 2), ("vqgan", 2)])
def test_ema_follows_the_recurrence_once_per_optimizer_step(family: str, accumulate: int, tmp_path: Path) -> None:
    """θ_ema after n steps equals the float64 recurrence e ← d·e + (1−d)·θ_k over the live
    weights after each step, starting from the initial weights; buffers are the live ones."""
    if family == "vqgan":  # accumulation by the model (manual optimisation); the EMA steps with the generator
        kwargs = model_kwargs(lambda_gan=0.5, adversarial={"disc_norm": "group", "disc_start": 0},
                              optimization={"warmup_steps": 0, "ema_decay": DECAY, "accumulate_grad_batches": 2})
        trainer_accumulate = 1
    else:
        kwargs = model_kwargs(optimization={"warmup_steps": 0, "ema_decay": DECAY})
        trainer_accumulate = accumulate
    model = VQVAEModel(**kwargs)
    expected = [p.detach().double().clone() for p in model.tokenizer.parameters()]
    steps = _Steps(accumulate)
    tiny_trainer(limit_val_batches=0, accumulate_grad_batches=trainer_accumulate, callbacks=[steps],
                 default_root_dir=tmp_path).fit(model, loader(random_batches(6)))
    assert len(steps.history) == 6 // accumulate
    for live in steps.history:
        expected = [DECAY * e + (1 - DECAY) * w for e, w in zip(expected, live)]
    averaged = list(model.ema_tokenizer.parameters())
    for e, a in zip(expected, averaged, strict=True):
        torch.testing.assert_close(a.double(), e, rtol=1e-6, atol=1e-7)
    assert any(not torch.allclose(a, w) for a, w in zip(averaged, model.tokenizer.parameters()))
    for a, b in zip(model.ema_tokenizer.buffers(), model.tokenizer.buffers(), strict=True):
        assert torch.equal(a, b)  # the codebook's own EMA statistics, copied as they are


@pytest.mark.parametrize("clip", [None, 1e6], ids=["device", "host"])  # clipping forgoes fused Adam
def test_a_skipped_batch_leaves_the_ema_unchanged(clip: float | None) -> None:
    model = logging_model(optimization={"grad_clip_norm": clip, "ema_decay": DECAY})
    poison = PoisonBatches({3, 4})

    class _After(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if pl_module.batches_seen == 5:  # both poisoned batches done
                self.on_device, self.ema = pl_module.guard.on_device, _ema_state(pl_module)

    after = _After()
    fit(model, [poison, after], max_steps=8)
    assert after.on_device == (clip is None) and model.guard.total == 2
    before = {k: v for k, v in poison.before.items() if k.startswith("ema_tokenizer.")}
    assert before.keys() == after.ema.keys() and all(torch.equal(before[k], after.ema[k]) for k in before)
    assert any(not torch.equal(v, after.ema[k]) for k, v in _ema_state(model).items())  # and it moves on


def test_validation_and_eval_mode_use_the_ema_weights(tmp_path: Path) -> None:
    # Weights that move, an average that lags them.
    model = tiny_model(learning_rate=1e-2, optimization={"warmup_steps": 0, "ema_decay": 0.9})
    val = random_batches(1, batch_size=4, seed=3)
    trainer = tiny_trainer(limit_train_batches=4, num_sanity_val_steps=0, default_root_dir=tmp_path)
    trainer.fit(model, loader(random_batches(4)), loader(val))
    logged = trainer.callback_metrics["val/recon_loss"]
    x = val[0]
    model.eval()
    with torch.no_grad():
        def recon(tokenizer) -> torch.Tensor:
            tokenized = tokenizer(x)
            return model.objective(x, tokenized.reconstruction, tokenized.quantized).recon_loss

        averaged, live = recon(model.ema_tokenizer), recon(model.tokenizer)
        torch.testing.assert_close(logged, averaged, rtol=1e-6, atol=0.0)
        assert not torch.isclose(averaged, live, rtol=1e-4, atol=0.0)  # far beyond the 1e-6 above
        torch.testing.assert_close(model(x).recon_loss, averaged)
        assert torch.equal(model.encode(x), model.ema_tokenizer.encode(x))
    assert model.train().inference_tokenizer is model.tokenizer
    plain = tiny_model().eval()
    assert plain.ema_tokenizer is None and plain.inference_tokenizer is plain.tokenizer


@pytest.mark.parametrize(("saved", "resumed"), [(0.0, DECAY), (DECAY, 0.0)], ids=["on", "off"])
@pytest.mark.parametrize("hparams", [True, False], ids=["hparams", "no-hparams"])
def test_resuming_cannot_switch_the_ema_on_or_off(saved: float, resumed: float, hparams: bool,
                                                  tmp_path: Path) -> None:
    model = tiny_model(optimization={"warmup_steps": 0, "ema_decay": saved})
    trainer = fit(model, [], max_steps=1)
    ckpt = tmp_path / "saved.ckpt"
    trainer.save_checkpoint(ckpt)
    if not hparams:  # a file whose hyperparameters do not record ema_decay
        checkpoint = torch.load(ckpt, weights_only=True)
        del checkpoint["hyper_parameters"]["optimization"]["ema_decay"]
        torch.save(checkpoint, ckpt)
    message = r"ema_decay > 0 \(weight EMA\): checkpoint" if hparams else r"weight EMA, but ema_decay is"
    with pytest.raises(CheckpointError, match=message):
        fit(tiny_model(optimization={"warmup_steps": 0, "ema_decay": resumed}), [], max_steps=2, ckpt_path=str(ckpt))
