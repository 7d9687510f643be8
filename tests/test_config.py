"""The typed configs: one place for each default, checks at construction, the hyperparameters
of 0.1 and 0.2 read alike, and a description for every option in ``animevq fit --help``."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import fields

import pytest
import torch
from conftest import FIXTURES, TINY_TOKENIZER

from animevq.config import ARCHITECTURE_KEYS, GROUPS, SEED_DEFAULTS, SEED_PARAMETERS, ModelConfig
from animevq.nn import TokenizerConfig, VQConfig


def test_seed_defaults_come_from_the_configs() -> None:
    config = ModelConfig()
    assert config.seed_values() == SEED_DEFAULTS and list(SEED_DEFAULTS) == list(SEED_PARAMETERS)
    assert SEED_DEFAULTS["num_embeddings"] == VQConfig().num_embeddings == 1024
    assert ARCHITECTURE_KEYS == ("in_channels", "latent_channels", "encoder_channels", "decoder_channels",
                                 "num_res_blocks", "num_embeddings", "embedding_dim")


def test_every_field_has_a_docstring() -> None:
    """Each field's docstring is what --help shows; the source must have one below every field."""
    import ast
    import inspect

    classes = {*GROUPS.values(), TokenizerConfig, VQConfig}
    from animevq import config as training

    classes |= {training.LossConfig, training.OptimizerConfig, training.LoggingConfig}
    for cls in classes:
        body = ast.parse(inspect.getsource(cls)).body[0].body
        documented = {node.target.id for node, after in zip(body, body[1:])
                      if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr)
                      and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)}
        own = {f.name for f in fields(cls)} - {f.name for base in cls.__mro__[1:] if hasattr(base, "__dataclass_fields__")
                                               for f in fields(base)}
        assert own <= documented, (cls.__name__, sorted(own - documented))


def test_hparams_round_trip_and_0_1_flat_hparams_land_in_their_groups() -> None:
    config = ModelConfig.build({"num_embeddings": 64, "lambda_gan": 0.1},
                               {"quantizer": {"kmeans_init": True}, "adversarial": {"disc_start": 5}})
    assert ModelConfig.from_hparams(config.to_hparams()) == config
    old = torch.load(FIXTURES / "v0_1_0/vqgan/checkpoints/last.ckpt", weights_only=True)["hyper_parameters"]
    assert "warmup_steps" in old and "optimization" not in old  # 0.1: every knob flat
    migrated = ModelConfig.from_hparams(old)
    assert migrated.optimization.warmup_steps == 2 and migrated.adversarial.lecam_weight == 0.001
    assert migrated.tokenizer.quantizer.decay == 0.0 and migrated.tokenizer.quantizer.embedding_dim == 8
    # A key it did not record takes the value it is compared with.
    filled = ModelConfig.from_hparams({"num_embeddings": 8}, fill=config)
    assert filled.adversarial.disc_start == 5 and filled.tokenizer.quantizer.num_embeddings == 8


def test_configs_refuse_bad_values_and_unknown_keys() -> None:
    with pytest.raises(ValueError, match="same number of stages"):
        TokenizerConfig(encoder_channels=(8, 16), decoder_channels=(16,))
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\)"):
        VQConfig(decay=1.0)
    with pytest.raises(ValueError, match="restart_sampling must be one of"):
        VQConfig(restart_sampling="random")
    with pytest.raises(ValueError, match="disc_norm must be one of"):
        ModelConfig.build({}, {"adversarial": {"disc_norm": "layer"}})
    with pytest.raises(ValueError, match="compile_mode must be one of .*got 'reduce-overhead'"):
        ModelConfig.build({}, {"speed": {"compile_mode": "reduce-overhead"}})
    with pytest.raises(ValueError, match=r"model\.speed has no setting 'fast'"):
        ModelConfig.build({}, {"speed": {"fast": True}})
    with pytest.raises(TypeError, match=r"model\.quantizer takes a QuantizerOptions .*not a VQConfig; .*'num_embeddings'"):
        ModelConfig.build({}, {"quantizer": VQConfig(num_embeddings=8)})  # the seed's num_embeddings decides
    with pytest.raises(ValueError, match="unknown quantizer family 'rvq'; known: vq, fsq, lfq, simvq, ibq"):
        TokenizerConfig.from_dict({**TINY_TOKENIZER.to_dict(), "quantizer": {"family": "rvq"}})
    with pytest.raises(ValueError, match="codebook_size 16 differs from the 1000 codes its fsq quantizer makes"):
        TokenizerConfig.from_dict({**TINY_TOKENIZER.to_dict(), "quantizer": {"family": "fsq"}})


@pytest.mark.slow
def test_fit_help_describes_every_model_option() -> None:
    result = subprocess.run([sys.executable, "-m", "animevq.cli", "fit", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    options = [*SEED_PARAMETERS, *(f"{group}.{f.name}" for group, kind in GROUPS.items() for f in fields(kind))]
    for option in options:
        # "  --model.NAME VALUE\n        <description> (type: ..., default: ...)": a description before "(type:"
        found = re.search(rf"^  --model\.{re.escape(option)}\b[^\n]*\n((?:\s{{10,}}[^\n]*\n)+)", text, re.M)
        assert found, option
        description = " ".join(found.group(1).split())
        assert not description.startswith("(type:"), f"--model.{option} has no description: {description}"


@pytest.mark.parametrize(("values", "message"), [
    ({"latent_channels": "16"}, "latent_channels must be an int, got '16'"),
    ({"num_res_blocks": 1.0}, "num_res_blocks must be an int"),
    ({"encoder_channels": [8, "16"]}, "encoder_channels must be a list of an int"),
    ({"in_channels": True}, "in_channels must be an int, got True"),
])
def test_tokenizer_config_fields_must_have_their_types(values: dict, message: str) -> None:
    with pytest.raises(TypeError, match=re.escape(message)):
        TokenizerConfig(**values)


def test_training_config_fields_must_have_their_types_and_ranges() -> None:
    with pytest.raises(TypeError, match=r"betas must be a list of 2 numbers, got \[0\.9\]"):
        ModelConfig.build({"betas": [0.9]}, {})
    with pytest.raises(TypeError, match="learning_rate must be a finite float, got nan"):
        ModelConfig.build({"learning_rate": float("nan")}, {})
    with pytest.raises(TypeError, match="max_nonfinite_steps must be an int or None"):
        ModelConfig.build({}, {"safety": {"max_nonfinite_steps": "10"}})
    # Zero intervals were a ZeroDivisionError at the first batch; now the model is not built.
    with pytest.raises(ValueError, match="log_every_n_steps and log_images_every_n_steps must be >= 1"):
        ModelConfig.build({"log_every_n_steps": 0}, {})
    with pytest.raises(ValueError, match="usage_window must be >= 1"):
        ModelConfig.build({}, {"logging": {"usage_window": 0}})


def test_a_tokenizer_too_large_to_build_is_refused_before_allocating() -> None:
    import time
    import tracemalloc

    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"would hold about 4\.13e\+09 weights and codebook values, more than"):
        TokenizerConfig(quantizer=VQConfig(num_embeddings=8_000_000))  # 16 GB of codebook statistics
    with pytest.raises(ValueError, match=r"num_embeddings must lie in \[1, 16777216\]"):
        VQConfig(num_embeddings=2**30)
    with pytest.raises(ValueError, match="would hold about"):
        TokenizerConfig(encoder_channels=(65536,) * 4, decoder_channels=(65536,) * 4)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 10 * 2**20 and time.perf_counter() - start < 5
    default = TokenizerConfig()
    assert 2e7 < default.parameter_count() < 3e7  # the seed's tokenizer: ~2.4e7 values, built fine


def test_ema_decay_is_checked_and_switching_it_changes_the_architecture() -> None:
    from animevq.config import OptimizationOptions
    from animevq.train.resumed import architecture_differences

    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match=r"ema_decay must be in \[0, 1\)"):
            OptimizationOptions(ema_decay=bad)
    off, on = ModelConfig(), ModelConfig.build({}, {"optimization": {"ema_decay": 0.999}})
    assert ModelConfig.from_hparams(on.to_hparams()).optimization.ema_decay == 0.999
    assert architecture_differences(off, on) == ["ema_decay > 0 (weight EMA): checkpoint False, now True"]
    slower = ModelConfig.build({}, {"optimization": {"ema_decay": 0.9999}})
    assert architecture_differences(on, slower) == []  # another decay is a setting, applied on resume
