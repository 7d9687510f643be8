"""A token folder is untrusted input: ``decode`` checks its manifest and shards against the model
and the folder before it allocates or writes anything, and refuses in one line naming the file."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from tooling import SIZE

from animevq.tools import codes

GRID = SIZE // 16  # 2×2 codes


@pytest.fixture
def tokens(ckpt: Path, images: Path, tmp_path: Path) -> Path:
    out = tmp_path / "tokens"
    assert codes.main(["encode", "--ckpt", str(ckpt), "--data_dir", str(images), "--out", str(out),
                       "--image_size", str(SIZE), "--num_workers", "0", "--quiet", "--shard_size", "3"]) == 0
    return out


def _edit(tokens: Path, change: Callable[[dict], None]) -> None:
    path = tokens / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def _replace_shard(tokens: Path, index: int, array: np.ndarray) -> None:
    """Write ``array`` as shard ``index`` and record its checksum, as a careful forger would."""
    from animevq.tools.manifest import sha256_file

    path = tokens / f"codes-{index:05d}.npy"
    np.save(path, array)
    _edit(tokens, lambda m: m["shards"][index].update(sha256=sha256_file(path)))


def _decode(ckpt: Path, tokens: Path, out: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = codes.main(["decode", "--ckpt", str(ckpt), "--tokens", str(tokens), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    return rc, err


def _refused(ckpt: Path, tokens: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], *patterns: str) -> str:
    out = tmp_path / "decoded"
    rc, err = _decode(ckpt, tokens, out, capsys)
    assert rc == 1, err
    assert len(err.splitlines()) == 1 and err.startswith("animevq decode: error: "), err
    for pattern in patterns:
        assert pattern in err, (pattern, err)
    assert not out.exists()  # checked before anything was written
    return err


def test_a_good_folder_decodes_every_listed_file(ckpt: Path, tokens: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = _decode(ckpt, tokens, tmp_path / "decoded", capsys)
    assert rc == 0, err
    assert len(list((tmp_path / "decoded").rglob("*.png"))) == 5


@pytest.mark.parametrize("name", ["/tmp/animevq-escape/evil", "../evil", "sub/../../evil", "", "a\\..\\b"])
def test_file_names_outside_the_output_folder_are_refused(ckpt: Path, tokens: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str], name: str) -> None:
    _edit(tokens, lambda m: m["files"].__setitem__(0, name))
    _refused(ckpt, tokens, tmp_path, capsys, "manifest.json is malformed", "is not a relative path inside the folder")
    assert not Path("/tmp/animevq-escape").exists() and not (tmp_path / "evil.png").exists()


def test_a_link_in_the_output_folder_cannot_lead_writes_outside(ckpt: Path, tokens: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    out, elsewhere = tmp_path / "decoded", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    os.symlink(elsewhere, out / "sub")  # the folder holds sub/d.png and sub/e.png
    rc, err = _decode(ckpt, tokens, out, capsys)
    assert rc == 1 and "would be written outside --out" in err
    assert list(elsewhere.iterdir()) == [] and list(out.glob("*.png")) == []


@pytest.mark.parametrize("name", ["../codes-00000.npy", "/etc/passwd", "codes-00001.npy"])
def test_shards_are_read_only_from_the_folder_and_in_order(ckpt: Path, tokens: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str], name: str) -> None:
    _edit(tokens, lambda m: m["shards"][0].update(name=name))
    _refused(ckpt, tokens, tmp_path, capsys, "shard 0 must be named 'codes-00000.npy'")


def test_an_oversized_grid_is_refused_from_the_shard_header(ckpt: Path, tokens: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    # 3 rows of 8192×8192 codes: 400 MB to decode into, and far more through the decoder; the
    # .npy file is sparse on disk and only its header is read.
    path = tokens / "codes-00000.npy"
    big = np.lib.format.open_memmap(path, mode="w+", dtype=np.int16, shape=(3, 8192, 8192))
    del big
    _edit(tokens, lambda m: m["shards"][0].update(sha256="0" * 64))
    count = json.loads((tokens / "manifest.json").read_text())["shards"][0]["count"]
    start = time.perf_counter()
    _refused(ckpt, tokens, tmp_path, capsys, "codes-00000.npy holds a int16 array of shape (3, 8192, 8192)",
             f"not the int16 ({count}, {GRID}, {GRID}) its manifest says")
    assert time.perf_counter() - start < 20  # nothing of the array was read


@pytest.mark.parametrize(("grid", "image_size"), [([4, 4], SIZE), ([2, 2], 48), ([2, 3], SIZE), ([2048, 2048], 32768)])
def test_a_grid_that_does_not_fit_the_model_is_refused(ckpt: Path, tokens: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str], grid: list,
                                                        image_size: int) -> None:
    _edit(tokens, lambda m: m.update(grid=grid, image_size=image_size))
    _refused(ckpt, tokens, tmp_path, capsys, "does not fit image_size", "16× downsampling")


def test_a_shard_with_fewer_rows_than_its_entry_is_refused(ckpt: Path, tokens: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    full = np.load(tokens / "codes-00000.npy")
    assert len(full) == 2  # a.png, b.png (broken.png has no row)
    _replace_shard(tokens, 0, full[:1])
    _refused(ckpt, tokens, tmp_path, capsys, f"shape (1, {GRID}, {GRID})", f"(2, {GRID}, {GRID}) its manifest says")


@pytest.mark.parametrize(("field", "value", "message"), [
    ("offset", -1, "must start at row 2"),
    ("count", -2, "with a count >= 0"),
    ("count", 99, "its shards hold"),
    ("sha256", None, "has no sha256"),
])
def test_offsets_and_counts_must_tile_the_file_list(ckpt: Path, tokens: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str], field: str, value: object,
                                                    message: str) -> None:
    _edit(tokens, lambda m: m["shards"][-1].update({field: value}))
    _refused(ckpt, tokens, tmp_path, capsys, message)


def test_duplicate_names_are_refused(ckpt: Path, tokens: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    _edit(tokens, lambda m: m["files"].__setitem__(1, m["files"][0]))
    _refused(ckpt, tokens, tmp_path, capsys, "is listed twice")
    # Distinct sources that would be written to one PNG: b.jpg and b.webp keep their
    # extensions (b.jpg.png, b.webp.png), and b.jpg.png becomes b.jpg.png too.
    _edit(tokens, lambda m: m["files"].__setitem__(slice(0, 3), ["b.jpg", "b.webp", "b.jpg.png"]))
    _refused(ckpt, tokens, tmp_path, capsys, "would both be written as b.jpg.png")


@pytest.mark.parametrize("dtype", ["float32", "bool", "complex64", "int64", "uint8"])
def test_codes_that_are_not_the_manifests_integers_are_refused(ckpt: Path, tokens: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str], dtype: str) -> None:
    _replace_shard(tokens, 0, np.load(tokens / "codes-00000.npy").astype(dtype))
    _refused(ckpt, tokens, tmp_path, capsys, f"holds a {dtype} array", "not the int16")


def test_a_manifest_dtype_other_than_int16_or_int32_is_refused(ckpt: Path, tokens: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    _edit(tokens, lambda m: m.update(dtype="float32"))
    _refused(ckpt, tokens, tmp_path, capsys, "dtype 'float32' is not one of")


def test_codes_outside_the_codebook_are_refused_naming_the_rows(ckpt: Path, tokens: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    array = np.load(tokens / "codes-00001.npy")
    array[1, 0, 0] = 16  # K = 16
    _replace_shard(tokens, 1, array)
    out = tmp_path / "decoded"
    rc, err = _decode(ckpt, tokens, out, capsys)
    assert rc == 1 and len(err.splitlines()) == 1
    assert "codes-00001.npy holds codes outside [0, 16) in rows 0–" in err


@pytest.mark.parametrize("change", [
    lambda m: m.pop("files"),
    lambda m: m.update(shards="all of them"),
    lambda m: m.update(num_embeddings="16"),
    lambda m: m.update(grid=None),
    lambda m: m.update(complete="yes"),
    lambda m: m["shards"].__setitem__(0, ["codes-00000.npy"]),
    lambda m: m["files"].__setitem__(0, 7),
], ids=["no files", "shards not a list", "K a string", "no grid", "complete a string", "entry a list",
        "a name a number"])
def test_malformed_manifests_are_refused_in_one_line(ckpt: Path, tokens: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str], change) -> None:
    _edit(tokens, change)
    _refused(ckpt, tokens, tmp_path, capsys, "manifest.json")


def test_invalid_json_names_the_file(ckpt: Path, tokens: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    (tokens / "manifest.json").write_text('{"format": "animevq.codes/1", ')
    _refused(ckpt, tokens, tmp_path, capsys, f"{tokens / 'manifest.json'} is not valid JSON")


def test_encode_refuses_to_continue_a_malformed_folder(ckpt: Path, images: Path, tokens: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    _edit(tokens, lambda m: m["shards"][0].update(name="../elsewhere.npy"))
    rc = codes.main(["encode", "--ckpt", str(ckpt), "--data_dir", str(images), "--out", str(tokens),
                     "--image_size", str(SIZE), "--num_workers", "0", "--quiet", "--shard_size", "3"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "shard 0 must be named 'codes-00000.npy'" in err and len(err.splitlines()) == 1
