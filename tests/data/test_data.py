"""AnimeDataModule: discovery, split, transforms, loader settings, errors."""

from __future__ import annotations

import importlib
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from animevq.data import (
    IMAGE_EXTENSIONS,
    AnimeDataModule,
    ImageFolderDataset,
    SampleKey,
    SkipLedger,
    default_num_workers,
    find_images,
    split_by_hash,
)

S = 16  # crop side used throughout


def _solid(path: Path, size: tuple[int, int], color: tuple[int, int, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _noise_folder(root: Path, count: int, prefix: str = "img") -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        pixels = rng.integers(0, 256, (16 + i % 5, 24, 3), dtype=np.uint8)
        path = root / f"{prefix}{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def test_batches_are_float_tensors_in_range(tmp_path: Path) -> None:
    _noise_folder(tmp_path, 12)
    _solid(tmp_path / "red.png", (40, 20), (255, 0, 0))
    dm = AnimeDataModule(str(tmp_path), batch_size=4, val_split=0.3, image_size=S, num_workers=0)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == len(dm.train_dataset) // 4  # drop_last by default
    for batch in batches + list(dm.val_dataloader()):
        assert isinstance(batch, torch.Tensor) and batch.dtype == torch.float32
        assert batch.shape[1:] == (3, S, S) and 1 <= batch.shape[0] <= 4
        assert batch.min() >= -1.0 and batch.max() <= 1.0
    # Exact mapping of 8-bit values to [-1,1]: pure red is (1,-1,-1).
    red = dm.files.index("red.png")
    dataset = dm.train_dataset if red in dm.train_dataset.file_ids else dm.val_dataset
    sample = dataset[dataset.file_ids.tolist().index(red)]
    expected = torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1).expand(3, S, S)
    torch.testing.assert_close(sample, expected)


def test_recursive_discovery_is_sorted_and_case_insensitive(tmp_path: Path) -> None:
    wanted = ["a/b/deep.JPG", "a/x.jpeg", "b.Png", "c.webp", "d.bmp", "e.gif", "z/up.JPEG",
              "イラスト/少女.png"]
    for name in wanted:
        ext = Path(name).suffix.lower()
        fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".bmp": "BMP"}
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16), (9, 9, 9)).save(path, format=fmt.get(ext, "GIF"))
    _solid(tmp_path / ".hidden.png", (16, 16), (0, 0, 0))  # dot-files are ignored,
    _solid(tmp_path / ".cache" / "x.png", (16, 16), (0, 0, 0))  # and dot-folders
    (tmp_path / "notes.txt").write_text("not an image extension")
    Image.new("RGB", (16, 16)).save(tmp_path / "scan.tiff")  # an image, but not a listed type
    discovery = find_images(tmp_path)
    assert discovery.files == sorted(wanted)
    assert discovery.skipped == []
    dm = AnimeDataModule(str(tmp_path), batch_size=2, image_size=S, num_workers=0)
    dm.setup()
    assert sorted([*dm.train_dataset.file_ids, *dm.val_dataset.file_ids]) == list(range(8))
    for dataset in (dm.train_dataset, dm.val_dataset):
        assert all(dataset[i].shape == (3, S, S) for i in range(len(dataset)))
    assert dm.skipped == {}  # every file, including the non-ASCII path, was read


def test_split_is_deterministic_disjoint_complete_and_stable(tmp_path: Path) -> None:
    _noise_folder(tmp_path / "old", 40)
    first = AnimeDataModule(str(tmp_path), val_split=0.25, seed=3, num_workers=0)
    again = AnimeDataModule(str(tmp_path), val_split=0.25, seed=3, num_workers=0)
    first.setup(), again.setup()
    train = {first.files[i] for i in first.train_dataset.file_ids}
    val = {first.files[i] for i in first.val_dataset.file_ids}
    assert train.isdisjoint(val) and train | val == set(first.files)
    assert val and train
    assert {again.files[i] for i in again.val_dataset.file_ids} == val

    other_seed = AnimeDataModule(str(tmp_path), val_split=0.25, seed=4, num_workers=0)
    other_seed.setup()
    assert {other_seed.files[i] for i in other_seed.val_dataset.file_ids} != val

    _noise_folder(tmp_path / "new", 30, prefix="added")  # the dataset grows elsewhere
    grown = AnimeDataModule(str(tmp_path), val_split=0.25, seed=3, num_workers=0)
    grown.setup()
    grown_val = {grown.files[i] for i in grown.val_dataset.file_ids}
    assert {path for path in grown_val if path.startswith("old/")} == val
    assert len(grown.files) == 70


@pytest.mark.parametrize("val_split", [0.001, 0.999])
def test_split_keeps_one_file_on_each_side(val_split: float) -> None:
    split = split_by_hash(["a.png", "b.png"], val_split, seed=0)
    assert len(split.train) == 1 and len(split.val) == 1
    assert split_by_hash(["a.png"], val_split, seed=0).val == []
    assert split_by_hash(["a.png", "b.png"], 0.0, seed=0).val == []


def test_val_is_a_deterministic_centre_crop(tmp_path: Path) -> None:
    bands = np.zeros((S, 3 * S, 3), dtype=np.uint8)  # red | green | blue, 48×16
    bands[:, :S, 0] = bands[:, S : 2 * S, 1] = bands[:, 2 * S :, 2] = 255
    Image.fromarray(bands).save(tmp_path / "bands.png")
    _solid(tmp_path / "other.png", (S, S), (0, 0, 0))
    files = find_images(tmp_path).files
    dataset = ImageFolderDataset(
        tmp_path, files, [files.index("bands.png")], SkipLedger(len(files)), image_size=S,
        train=False,
    )
    green = torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1).expand(3, S, S)
    torch.testing.assert_close(dataset[0], green)
    assert torch.equal(dataset[0], dataset[0])


def test_train_augmentation_depends_on_seed_and_epoch_only(tmp_path: Path) -> None:
    ramp = np.tile(np.linspace(0, 255, 4 * S).astype(np.uint8)[None, :, None], (S, 1, 3))
    Image.fromarray(ramp).save(tmp_path / "ramp.png")  # 64×16, brighter to the right

    def crops(seed: int) -> list[torch.Tensor]:
        dm = AnimeDataModule(str(tmp_path), val_split=0.0, image_size=S, seed=seed, num_workers=0)
        dm.setup()
        return [dm.train_dataset[SampleKey(0, epoch)] for epoch in range(16)]

    seed0, seed0_again, seed1 = crops(0), crops(0), crops(1)
    assert all(torch.equal(a, b) for a, b in zip(seed0, seed0_again))
    assert any(not torch.equal(a, b) for a, b in zip(seed0, seed1))
    assert len({tuple(c[0, 0].tolist()) for c in seed0}) > 2  # crops move between epochs
    slopes = [float(c[0, 0, -1] - c[0, 0, 0]) for c in seed0 + seed1]
    assert any(s > 0 for s in slopes) and any(s < 0 for s in slopes)  # flipped and not


def test_augmentation_is_independent_of_worker_count(tmp_path: Path) -> None:
    _noise_folder(tmp_path, 8)
    batches = {}
    for workers in (0, 2):
        dm = AnimeDataModule(str(tmp_path), batch_size=4, val_split=0.0, image_size=S,
                             num_workers=workers, persistent_workers=False)
        loader = dm.train_dataloader()
        batches[workers] = [torch.cat(list(loader)) for _ in range(2)]  # two epochs
    assert not torch.equal(batches[0][0], batches[0][1])  # epochs differ
    for epoch in range(2):
        assert torch.equal(batches[0][epoch], batches[2][epoch])


def test_loader_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _noise_folder(tmp_path, 6)
    dm = AnimeDataModule(str(tmp_path), batch_size=2, val_split=0.3, image_size=S, num_workers=2)
    train, val = dm.train_dataloader(), dm.val_dataloader()
    assert train.drop_last and not val.drop_last
    assert train.persistent_workers and train.num_workers == 2
    assert train.pin_memory == torch.cuda.is_available()
    auto = AnimeDataModule(str(tmp_path), batch_size=2, image_size=S).train_dataloader()
    assert auto.num_workers == default_num_workers()
    assert auto.persistent_workers == (auto.num_workers > 0)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert default_num_workers() == 16 and default_num_workers(devices_per_node=8) == 7
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0}, raising=False)
    assert default_num_workers() == 0
    # Fewer images than a batch: the partial batch is kept rather than an empty epoch.
    few = AnimeDataModule(str(tmp_path), batch_size=64, val_split=0.0, image_size=S, num_workers=0)
    assert [len(batch) for batch in few.train_dataloader()] == [6]


# Run in its own interpreter: the fork hook must not reach pytest's other processes.
WORKERS_UNDER_FIRE = r"""
import os, subprocess, sys, threading, time
import torch
from animevq.data.datamodule import sigterm_from_parent_only

# As some libraries do: a thread started in every forked child, before worker_init_fn runs.
os.register_at_fork(after_in_child=lambda: threading.Thread(target=time.sleep, args=(3600,), daemon=True).start())
loader = torch.utils.data.DataLoader([torch.zeros(2)] * 1000, batch_size=None, num_workers=2,
                                     worker_init_fn=sigterm_from_parent_only)
batches = iter(loader)
for _ in range(4):
    next(batches)  # both workers are running, past worker_init_fn
pids = [worker.pid for worker in batches._workers]
# 20 SIGTERMs to each worker from another process, as `timeout` or a scheduler send them.
sender = "import os, signal, time\nfor _ in range(20):\n    [os.kill(p, signal.SIGTERM) for p in %r]\n    time.sleep(0.02)"
subprocess.run([sys.executable, "-c", sender % pids], check=True)
print("batches", 4 + sum(1 for _ in batches))
"""


@pytest.mark.skipif(not hasattr(signal, "sigwaitinfo"), reason="the guard is a no-op without sigwaitinfo")
def test_loader_workers_survive_sigterm_from_others_with_a_thread_started_at_fork() -> None:
    # The worker's main thread blocks SIGTERM, but a thread started in the fork before that
    # could still take the signal, and PyTorch's worker handler would end the worker: the
    # loader then raised "DataLoader worker (pid N) is killed by signal: Terminated".
    done = subprocess.run([sys.executable, "-c", WORKERS_UNDER_FIRE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["batches", "1000"]


def test_missing_and_empty_folders_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        AnimeDataModule(str(missing)).setup()
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="empty") as error:
        AnimeDataModule(str(empty)).setup()
    assert all(ext in str(error.value) for ext in IMAGE_EXTENSIONS)
    assert "1 other file" in str(error.value)
    a_file = _solid(tmp_path / "one.png", (S, S), (0, 0, 0))
    with pytest.raises(ValueError, match="one.png"):
        AnimeDataModule(str(a_file)).setup()


def test_a_folder_where_nothing_decodes_is_counted_whole(tmp_path: Path) -> None:
    for i in range(5):
        (tmp_path / f"page{i}.png").write_text("<html>not an image</html>")
    dm = AnimeDataModule(str(tmp_path), image_size=S, val_split=0.2, batch_size=1, num_workers=0)
    dm.setup("fit")
    assert len(dm.val_dataset) == 1
    # The sanity check reads the validation split first. Was: "none of the 1 image files".
    with pytest.raises(RuntimeError, match=r"none of the 5 image files under .* could be decoded \(5 not_an_image\); "
                                           r".*--data\.data_dir"):
        dm.val_dataset[0]
    in_training = dm.train_dataset.paths[int(dm.train_dataset.file_ids[0])]
    _solid(tmp_path / in_training, (S, S), (10, 20, 30))  # one good file, in the training split
    dm = AnimeDataModule(str(tmp_path), image_size=S, val_split=0.2, batch_size=1, num_workers=0)
    dm.setup("fit")
    with pytest.raises(RuntimeError, match=r"none of the 1 image files of the validation split .* though 1 of "
                                           r"the folder's 5 can .*--data\.val_split"):
        dm.val_dataset[0]


@pytest.mark.parametrize(
    "kwargs", [{"batch_size": 0}, {"val_split": 1.0}, {"val_split": -0.1}, {"num_workers": -1}]
)
def test_bad_arguments_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        AnimeDataModule("unused", **kwargs)


def test_hyperparameters_and_seed_import_path(tmp_path: Path) -> None:
    from jsonargparse import ArgumentParser

    dm = AnimeDataModule(str(tmp_path), batch_size=8, image_size=32, num_workers=1)
    assert dict(dm.hparams) == {
        "data_dir": str(tmp_path), "batch_size": 8, "val_split": 0.2, "image_size": 32,
        "num_workers": 1, "seed": 0, "pin_memory": None, "persistent_workers": None,
        "max_image_pixels": 16384 * 8192, "max_image_bytes": 4 * 16384 * 8192, "min_image_size": 8, "random_flip": True,
        "drop_last": True, "cache_dir": None, "max_cache_size": None,
    }
    parser = ArgumentParser()  # what LightningCLI does with the YAML `data:` section
    parser.add_class_arguments(AnimeDataModule, "data")
    config = parser.parse_args(["--data.data_dir", str(tmp_path), "--data.batch_size", "4"])
    built = parser.instantiate_classes(config).data
    assert isinstance(built, AnimeDataModule) and built.batch_size == 4
    seed_module = importlib.import_module("dataloader.dataModule")
    assert seed_module.AnimeDataModule is AnimeDataModule
    assert AnimeDataModule().data_dir is None  # None → the package's sample folder
