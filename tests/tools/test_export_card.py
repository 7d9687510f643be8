"""``animevq export``'s model card: training data, codebook and evaluate's metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_trainer
from tooling import GOOD

from animevq import VQVAEModel
from animevq.data import AnimeDataModule
from animevq.runs.checkpoint_io import load_tokenizer
from animevq.tools import export
from animevq.tools.evaluate import evaluate


@pytest.fixture
def fitted(model: VQVAEModel, images: Path, tmp_path: Path) -> Path:
    """A checkpoint of a real (one-step) fit on ``images``: what Lightning records of the data."""
    data = AnimeDataModule(data_dir=str(images), batch_size=2, val_split=0.2, image_size=32, num_workers=0)
    trainer = tiny_trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(model, datamodule=data)
    trainer.save_checkpoint(tmp_path / "fit.ckpt")
    return tmp_path / "fit.ckpt"


def test_the_card_names_the_data_the_codebook_and_the_metrics(fitted: Path, images: Path, tmp_path: Path) -> None:
    tokenizer = load_tokenizer(fitted)
    report = evaluate(tokenizer, images, image_size=32, compute_fid=False, out_dir=tmp_path / "eval", progress=False)
    out = tmp_path / "export"
    assert export.main(["export", "--ckpt", str(fitted), "--out", str(out),
                        "--metrics", str(tmp_path / "eval" / "report.json")]) == 0
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: animevq" in card
    assert f"| data folder | `{images}` |" in card
    # Files listed at setup: the five drawings and broken.png (skipped when drawn); one in validation.
    assert f"| image files | {len(GOOD) + 1} ({len(GOOD)} for training) |" in card
    assert "| resolution | 32×32 |" in card
    q = tokenizer.config.quantizer
    assert f"| codebook size K | {q.num_embeddings} |" in card and f"| code dimension D | {q.embedding_dim} |" in card
    assert "| quantizer | vq |" in card and "| code grid | 2×2 at 32×32 |" in card
    for key in ("psnr", "ssim", "perplexity", "code_usage_rate"):
        assert f"{report[key]:.4g} |" in card, key
    assert "| rFID (lower is better) | unknown |" in card  # --no_fid: not known
    assert f"`{tokenizer.weights_sha256()}`" in card
    assert not list(out.glob(".*"))  # written whole, no temporary file left


def test_without_metrics_or_recorded_data_the_card_says_unknown(model: VQVAEModel, ckpt: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "export"
    assert export.main(["export", "--ckpt", str(ckpt), "--out", str(out)]) == 0  # a checkpoint of no fit
    card = (out / "README.md").read_text()
    assert "| data folder | unknown |" in card and "| image files | unknown |" in card and "| resolution | unknown |" in card
    assert "Not evaluated" in card and "PSNR" not in card
    assert f"| codebook size K | {model.tokenizer.codebook_size} |" in card
    other = tmp_path / "report.json"
    other.write_text(json.dumps({"model_sha256": "0" * 64, "psnr": 99.0}))
    capsys.readouterr()
    assert export.main(["export", "--ckpt", str(ckpt), "--out", str(out), "--metrics", str(other)]) == 1
    err = capsys.readouterr().err.strip()
    assert "scored other weights" in err and str(other) in err and len(err.splitlines()) == 1

