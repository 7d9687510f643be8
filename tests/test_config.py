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
    with pytest.raises(ValueError, match=r"model\.speed has no setting 'fast'"):
        ModelConfig.build({}, {"speed": {"fast": True}})
    with pytest.raises(TypeError, match=r"model\.quantizer takes a VQOptions .*not a VQConfig; .*'num_embeddings'"):
        ModelConfig.build({}, {"quantizer": VQConfig(num_embeddings=8)})  # the seed's num_embeddings decides
    with pytest.raises(ValueError, match="unknown quantizer family 'fsq'"):
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
