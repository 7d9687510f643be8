"""The object-store path for real: a moto S3 server on localhost that this module starts,
written by ``animevq prepare SRC s3://…``, opened by LitData itself and streamed by
AnimeDataModule, plus the errors and re-runs of a URL destination.

Nothing is mocked inside the process: animevq, LitData's boto3 clients and its obstore
downloads all speak HTTP to the server, which keeps the objects in its memory.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch
from PIL import Image

from animevq.data import AnimeDataModule, PrepareOptions, load_image, prepare_folder, read_info
from animevq.data.transforms import stored_image
from animevq.tools.prepare import main

pytestmark = pytest.mark.timeout(120)  # a stalled transfer fails here instead of hanging the run

S = 16
BUCKET, PREFIX = "animevq-test", "ds"
URL = f"s3://{BUCKET}/{PREFIX}"
SIZES = [(24, 24), (40, 20), (20, 52)]  # (width, height): square, landscape, portrait past max_aspect
GOOD = {(f"sub/img{i:02d}.png" if i % 4 == 3 else f"img{i:02d}.png"): SIZES[i % 3] for i in range(11)}
BAD = {"empty.png": "empty", "text.jpg": "not_an_image"}
VAL = round(0.25 * len(GOOD))  # 3: split_stream's count for val_split=0.25
TRAIN = len(GOOD) - VAL  # 8: four full batches of 2, also as 2 workers × 2 batches each
CHUNK_MB = "0.002"  # ~2 KB chunks of one or two images: a dozen objects, split by whole chunks


class S3(NamedTuple):
    client: Any  # boto3's S3 client on the server
    endpoint: str


class Prepared(NamedTuple):
    src: Path
    out: str  # what `animevq prepare` printed


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3]:
    """A moto S3 server on a free localhost port with one empty bucket, and an environment
    that points boto3 and obstore at it (restored afterwards)."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)  # port 0: the OS picks
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        scratch = tmp_path_factory.mktemp("s3-env")
        with pytest.MonkeyPatch.context() as patch:
            # Nothing from the developer's AWS setup: no profile, token or S3-only endpoint.
            for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_REGION",
                         "AWS_ENDPOINT_URL_S3", "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS"):
                patch.delenv(name, raising=False)
            patch.setenv("AWS_CONFIG_FILE", str(scratch / "no-aws-config"))
            patch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(scratch / "no-aws-credentials"))
            patch.setenv("AWS_ENDPOINT_URL", endpoint)  # boto3 ≥ 1.28; LitData's obstore store copies it
            patch.setenv("AWS_ACCESS_KEY_ID", "testing")
            patch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
            patch.setenv("AWS_DEFAULT_REGION", "us-east-1")
            # No AWS_ALLOW_HTTP: animevq.data.store lets LitData's chunk transfers use http://
            # by itself (LitData's own client options would drop that variable).
            # Where `animevq prepare` keeps its skip logs for a URL, and LitData its local chunks.
            patch.setenv("XDG_CACHE_HOME", str(scratch / "xdg"))
            patch.setenv("DATA_OPTIMIZER_CACHE_FOLDER", str(scratch / "optimize-chunks"))
            patch.setenv("DATA_OPTIMIZER_DATA_CACHE_FOLDER", str(scratch / "optimize-data"))
            client = boto3.client("s3")
            client.create_bucket(Bucket=BUCKET)
            yield S3(client, endpoint)
    finally:
        server.stop()


def _source(root: Path) -> Path:
    for seed, (name, (width, height)) in enumerate(GOOD.items()):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)
    (root / "empty.png").write_bytes(b"")
    (root / "text.jpg").write_text("<html>not found</html>")
    return root


def _prepare_cli(src: Path, *extra: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["prepare", str(src), URL, "--size", str(S), "--workers", "1",
                     "--chunk_size_mb", CHUNK_MB, "--no_progress", *extra])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def prepared(s3: S3, tmp_path_factory: pytest.TempPathFactory) -> Prepared:
    """The source folder, prepared once into ``URL`` by the CLI."""
    src = _source(tmp_path_factory.mktemp("src"))
    code, out, err = _prepare_cli(src)
    assert code == 0, err
    return Prepared(src, out)


def _objects(s3: S3, prefix: str = PREFIX) -> dict[str, str]:
    """Key → ETag of every object under ``prefix/``."""
    listing = s3.client.list_objects_v2(Bucket=BUCKET, Prefix=prefix + "/")
    return {item["Key"]: item["ETag"] for item in listing.get("Contents", [])}


def _read_object(s3: S3, key: str) -> bytes:
    return s3.client.get_object(Bucket=BUCKET, Key=key)["Body"].read()


def test_prepare_into_a_bucket_writes_a_litdata_dataset(s3: S3, prepared: Prepared, tmp_path: Path) -> None:
    import litdata

    out = prepared.out
    assert f"prepared {len(GOOD)} images (short side {S}) into {URL}" in out
    assert "1 empty (empty.png)" in out and "1 not_an_image (text.jpg)" in out
    info = read_info(URL)
    assert info is not None and (info.location, info.size, info.num_images) == (URL, S, len(GOOD))
    assert {item.path: item.reason for item in info.skipped} == BAD

    # The bucket holds LitData's index, its chunks and the description; nothing else is left
    # behind (no checkpoints or partial uploads).
    keys = set(_objects(s3))
    index = json.loads(_read_object(s3, f"{PREFIX}/index.json"))
    chunks = {f"{PREFIX}/{chunk['filename']}" for chunk in index["chunks"]}
    assert len(chunks) >= 4 and all(re.fullmatch(rf"{PREFIX}/chunk-\d+-\d+\.bin", key) for key in chunks)
    assert keys == {f"{PREFIX}/index.json", f"{PREFIX}/animevq.json"} | chunks
    assert sum(chunk["chunk_size"] for chunk in index["chunks"]) == len(GOOD)
    assert json.loads(_read_object(s3, f"{PREFIX}/animevq.json"))["format"] == "animevq-litdata"

    # LitData opens it directly: each good image once, stored exactly as prepare stores it.
    dataset = litdata.StreamingDataset(URL, cache_dir=str(tmp_path / "cache"))
    assert len(dataset) == len(GOOD)
    items = [dataset[i] for i in range(len(dataset))]
    for item in items:
        assert isinstance(item, np.ndarray) and item.dtype == np.uint8
        assert item.ndim == 3 and item.shape[2] == 3 and min(item.shape[:2]) == S
    expected = [stored_image(load_image(prepared.src / name, target_size=S), S, 2.0) for name in GOOD]
    assert sorted((item.shape, item.tobytes()) for item in items) == \
        sorted((item.shape, item.tobytes()) for item in expected)
    assert sorted(item.shape for item in items) == sorted(
        {(24, 24): (S, S, 3), (40, 20): (S, 2 * S, 3), (20, 52): (2 * S, S, 3)}[size] for size in GOOD.values()
    )


@pytest.mark.parametrize("num_workers", [0, 2])
def test_datamodule_streams_the_bucket_reproducibly(s3: S3, prepared: Prepared, tmp_path: Path,
                                                     num_workers: int) -> None:
    def one_epoch(cache: Path) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        dm = AnimeDataModule(data_dir=URL, batch_size=2, image_size=S, val_split=0.25,
                             num_workers=num_workers, cache_dir=str(cache))
        dm.setup("fit")
        assert dm.store is not None and dm.store.location == URL
        assert dm.state_dict() == {"num_images": len(GOOD), "num_train_images": TRAIN}
        assert dm.skipped == {"empty": 1, "not_an_image": 1}
        return list(dm.train_dataloader()), list(dm.val_dataloader())

    cache = tmp_path / "cache"
    train, val = one_epoch(cache)
    assert [tuple(batch.shape) for batch in train] == [(2, 3, S, S)] * (TRAIN // 2)
    assert sum(len(batch) for batch in val) == VAL
    for batch in train + val:
        assert batch.dtype == torch.float32 and batch.shape[1:] == (3, S, S) and 1 <= len(batch) <= 2
        assert batch.min() >= -1.0 and batch.max() <= 1.0
    samples = torch.cat(train + val)
    assert len({sample.numpy().tobytes() for sample in samples}) == len(GOOD)  # each image once

    # Every chunk came from the bucket into cache_dir.
    downloaded = {path.name for path in cache.rglob("chunk-*.bin")}
    assert downloaded == {Path(key).name for key in _objects(s3) if Path(key).name.startswith("chunk-")}
    assert all(path.stat().st_size > 0 for path in cache.rglob("chunk-*.bin"))

    # A fresh data module, downloading into a fresh cache, reads the same epoch bit for bit.
    train_again, val_again = one_epoch(tmp_path / "cache-again")
    assert len(train_again) == len(train) and len(val_again) == len(val)
    assert all(torch.equal(a, b) for a, b in zip(train + val, train_again + val_again))


def test_s3_errors_and_reruns(s3: S3, prepared: Prepared, capsys: pytest.CaptureFixture[str]) -> None:
    missing = f"s3://{BUCKET}/nothing-here"
    with pytest.raises(ValueError) as error:
        AnimeDataModule(data_dir=missing, batch_size=2, image_size=S, num_workers=0).setup("fit")
    assert missing in str(error.value) and f"animevq prepare SRC {missing}" in str(error.value)

    before = _objects(s3)
    again = prepare_folder(prepared.src, URL, PrepareOptions(size=S), workers=1, progress=False)
    assert again.already_prepared and again.dst == URL and again.num_images == len(GOOD)
    assert dict(again.skipped.files) == BAD
    code, out, _ = _prepare_cli(prepared.src)
    assert code == 0 and "nothing to do" in out

    with pytest.raises(ValueError, match="--overwrite"):
        prepare_folder(prepared.src, URL, PrepareOptions(size=8), workers=1, progress=False)
    code, _, err = _prepare_cli(prepared.src, "--size", "8")
    assert code == 1 and "--overwrite" in err and URL in err
    assert _objects(s3) == before  # refused runs wrote nothing


def test_a_prefix_that_prepare_did_not_finish_is_refused(s3: S3, prepared: Prepared) -> None:
    half = f"s3://{BUCKET}/half"
    index = _read_object(s3, f"{PREFIX}/index.json")
    s3.client.put_object(Bucket=BUCKET, Key="half/index.json", Body=index)  # LitData's index, no animevq.json
    with pytest.raises(ValueError, match="did not finish") as error:
        prepare_folder(prepared.src, half, PrepareOptions(size=S), workers=1, progress=False)
    assert "--overwrite" in str(error.value)
    with pytest.raises(ValueError, match="animevq prepare"):
        AnimeDataModule(data_dir=half, batch_size=2, image_size=S, num_workers=0).setup("fit")
    assert set(_objects(s3, "half")) == {"half/index.json"}
