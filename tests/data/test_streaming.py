"""AnimeDataModule on a LitData dataset written by `animevq prepare`: the split and the
shuffle fixed by seed, exact mid-epoch starts with workers, disjoint ranks under gloo DDP,
sizes, damaged datasets, and folders prepared by animevq 0.1 (refused for training, converted
by `animevq prepare`)."""

from __future__ import annotations

import json
from pathlib import Path

import litdata
import numpy as np
import pytest
import torch
from PIL import Image

from animevq.data import AnimeDataModule, LoaderPosition, PrepareOptions, prepare_folder
from animevq.tools.prepare import main as prepare_main
from gloo import spawn_ranks

S = 16
COUNT = 40  # images, each one flat colour: crops and flips keep it, so it names the image


def _colour(i: int) -> tuple[int, int, int]:
    return (10 + 6 * i, 250 - 5 * i, (37 * i) % 256)


@pytest.fixture(scope="module")
def stream(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("stream")
    src = root / "src"
    src.mkdir()
    for i in range(COUNT):
        size = [(24, 24), (40, 20), (20, 36)][i % 3]
        Image.new("RGB", size, _colour(i)).save(src / f"{i:03d}.png")
    dst = root / "dst"
    prepare_folder(src, dst, PrepareOptions(size=S), workers=1, chunk_bytes=5 * S * 2 * S * 3, progress=False)
    return dst


def _ids(batches: list[torch.Tensor]) -> list[int]:
    """Which image each sample is, from its flat colour."""
    lookup = {_colour(i): i for i in range(COUNT)}
    found = []
    for batch in batches:
        for image in batch:
            pixel = ((image[:, 0, 0] + 1) * 127.5).round().int().tolist()
            found.append(lookup[tuple(pixel)])
    return found


def _module(data: Path, **kwargs) -> AnimeDataModule:
    dm = AnimeDataModule(str(data), **{"batch_size": 4, "image_size": S, "val_split": 0.25,
                                       "num_workers": 0, **kwargs})
    dm.setup("fit")
    return dm


def _epoch(dm: AnimeDataModule, epoch: int, done: int = 0, train: bool = True) -> list[torch.Tensor]:
    loader = dm.train_dataloader() if train else dm.val_dataloader()
    loader.position = lambda: LoaderPosition(epoch, done)
    return list(loader)


def test_split_and_shuffle_are_fixed_by_seed(stream: Path) -> None:
    dm = _module(stream, seed=3)
    train, val = _ids(_epoch(dm, 0)), _ids(_epoch(dm, 0, train=False))
    assert len(val) == 10 and len(train) == 28  # 30 train images, 7 full batches of 4
    assert set(train).isdisjoint(val) and len(set(train)) == len(train)
    assert dm.state_dict() == {"num_images": COUNT, "num_train_images": 30}
    again = _module(stream, seed=3)
    assert _ids(_epoch(again, 0, train=False)) == val and _ids(_epoch(again, 0)) == train
    assert _ids(_epoch(dm, 1)) != train  # another epoch, another order
    other = _module(stream, seed=4)
    assert set(_ids(_epoch(other, 0, train=False))) != set(val)
    batch = _epoch(dm, 0)[0]
    assert batch.dtype == torch.float32 and batch.shape == (4, 3, S, S)


@pytest.mark.parametrize("workers", [0, 2])
def test_an_epoch_started_part_way_is_the_rest_of_that_epoch(stream: Path, workers: int) -> None:
    """Random crops and flips included (non-square images): bit-equal to the uninterrupted epoch."""
    whole = _epoch(_module(stream, num_workers=workers), 2)
    for done in (1, 3, len(whole) - 1):
        rest = _epoch(_module(stream, num_workers=workers), 2, done)
        assert len(rest) == len(whole) - done
        assert all(torch.equal(a, b) for a, b in zip(rest, whole[done:]))


def _rank(rank: int, data: str, out: str) -> None:
    dm = _module(Path(data), num_workers=1)
    torch.save([_ids(_epoch(dm, epoch)) for epoch in range(2)], f"{out}/rank{rank}.pt")


@pytest.mark.timeout(180)
def test_two_gloo_ranks_read_disjoint_images_in_equal_batches(stream: Path, tmp_path: Path) -> None:
    spawn_ranks(_rank, str(stream), str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    train = set(range(COUNT)) - set(_ids(_epoch(_module(stream), 0, train=False)))  # the training split
    for epoch in range(2):
        first, second = ranks[0][epoch], ranks[1][epoch]
        assert len(first) == len(second) and len(first) % 4 == 0 and first
        assert set(first).isdisjoint(second) and set(first) | set(second) <= train
        assert len(set(first) | set(second)) >= len(train) - 2 * 4  # at most a batch each dropped
    assert ranks[0][0] != ranks[0][1]


def test_a_smaller_image_size_resizes_and_a_larger_one_is_refused(stream: Path) -> None:
    batch = _epoch(_module(stream, image_size=S // 2), 0, train=False)[0]
    assert batch.shape == (4, 3, S // 2, S // 2)
    with pytest.raises(ValueError, match=rf"prepared at size {S}.*--size {2 * S}"):
        _module(stream, image_size=2 * S)


def test_a_damaged_dataset_is_refused_naming_it(stream: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    for file in stream.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    info = json.loads((copy / "animevq.json").read_text())
    (copy / "animevq.json").write_text(json.dumps({**info, "num_images": COUNT + 1}))
    with pytest.raises(ValueError, match=rf"holds {COUNT} images, animevq.json says {COUNT + 1}"):
        _module(copy)
    (copy / "animevq.json").write_text(json.dumps({**info, "size": 2 * S}))
    with pytest.raises(ValueError, match=r"item \d+ of .*copy.* not a stored image .* re-run `animevq prepare"):
        _epoch(_module(copy), 0)
    (copy / "animevq.json").write_text(json.dumps(info))
    (copy / "index.json").write_text("{")
    with pytest.raises(ValueError, match="no readable LitData index"):
        _module(copy)


def _legacy_folder(root: Path, images: list[np.ndarray]) -> Path:
    """A folder as animevq 0.1's `prepare` wrote it: manifest, index, paths, one shard."""
    root.mkdir()
    offsets = np.cumsum([0] + [image.nbytes for image in images[:-1]])
    index = np.array([[0, offset, *image.shape[:2]] for offset, image in zip(offsets, images)], np.int64)
    np.save(root / "index.npy", index)
    paths = [f"img{i}.png" for i in range(len(images))]
    (root / "paths.json").write_text(json.dumps(paths))
    (root / "shard-00000.bin").write_bytes(b"".join(image.tobytes() for image in images))
    manifest = {"format": "animevq-prepared", "version": 1, "size": S, "source": "/gone/illustrations",
                "options": {"size": S, "max_aspect": 2.0}, "num_images": len(images),
                "shards": [{"name": "shard-00000.bin", "bytes": sum(i.nbytes for i in images)}],
                "skipped": [{"path": "bad.png", "reason": "truncated", "detail": "cut", "stage": "loading"}]}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_a_folder_of_version_0_1_is_refused_for_training_and_converted_by_prepare(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((S, S, 3), (S, 2 * S, 3), (S + 4, S, 3))]
    old = _legacy_folder(tmp_path / "old", images)
    with pytest.raises(ValueError, match=rf"animevq 0.1 .*`animevq prepare {old} {old}-litdata`"):
        _module(old)
    assert prepare_main(["prepare", str(old), str(tmp_path / "new"), "--size", str(S), "--no_progress"]) == 0
    assert "prepared 3 images" in capsys.readouterr().out
    converted = litdata.StreamingDataset(str(tmp_path / "new"))
    items = sorted((converted[i] for i in range(len(converted))), key=lambda a: a.tobytes())
    assert all(np.array_equal(a, b) for a, b in zip(items, sorted(images, key=lambda a: a.tobytes())))
    info = json.loads((tmp_path / "new" / "animevq.json").read_text())
    assert info["source"] == "/gone/illustrations" and info["skipped_counts"] == {"truncated": 1}
    assert prepare_main(["prepare", str(old), str(tmp_path / "other"), "--size", str(2 * S),
                         "--no_progress"]) == 1
    assert f"pass --size {S}" in capsys.readouterr().err
