"""LPIPS: agreement with the reference implementations, frozen/eval behaviour, weight loading.

Every network here uses a randomly initialised VGG16 saved to a temp file; nothing is
downloaded (an autouse fixture makes any download attempt fail the test).
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
import torchvision
from torch import nn

from animevq.nn.lpips import LPIPS

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a test tried to download {args[:1]}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


@pytest.fixture(scope="module")
def net() -> LPIPS:
    torch.manual_seed(0)
    return LPIPS(random_init=True)


@pytest.fixture(scope="module")
def vgg_file(net: LPIPS, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """torchvision-format VGG16 state dict (features.N.*) plus a classifier key to be ignored."""
    state = {f"features.{k}": v for k, v in net.vgg.state_dict().items()}
    state["classifier.6.bias"] = torch.zeros(1000)  # stands in for the (unused) 500 MB classifier
    path = tmp_path_factory.mktemp("vgg") / "vgg16-random.pth"
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def images() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(2, 3, 32, 32, generator=g)).clamp(-1, 1)
    return x, y


def _copy_vgg_into_slices(ref_net: nn.Module, net: LPIPS) -> None:
    """Loads our VGG16 into a reference's slice1..slice5 (they keep torchvision's indices)."""
    ours = net.vgg.state_dict()
    for s in range(1, 6):
        sl = getattr(ref_net, f"slice{s}")
        sl.load_state_dict({k: v for k, v in ours.items() if k.split(".")[0] in sl._modules})


def test_matches_torchmetrics(net: LPIPS, images: tuple[torch.Tensor, torch.Tensor]) -> None:
    from torchmetrics.functional.image.lpips import _LPIPS

    # pretrained=True loads torchmetrics' shipped heads; pnet_rand=True builds VGG16 without download.
    ref = _LPIPS(pretrained=True, net="vgg", pnet_rand=True)
    _copy_vgg_into_slices(ref.net, net)
    x, y = images
    with torch.no_grad():
        expected = ref(x, y).flatten()
        got = net(x, y)
    assert got.shape == (2,)
    assert (expected > 0).all()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


# The lpips package still calls torchvision's deprecated vgg16(pretrained=...).
@pytest.mark.filterwarnings("ignore:.*(pretrained|weight enum).*:UserWarning")
def test_matches_lpips_package(net: LPIPS, images: tuple[torch.Tensor, torch.Tensor]) -> None:
    lpips = pytest.importorskip("lpips")  # optional test dependency; torchmetrics is always checked
    ref = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
    _copy_vgg_into_slices(ref.net, net)
    x, y = images
    with torch.no_grad():
        expected = ref(x, y).flatten()
        got = net(x, y, reduction="mean")
    torch.testing.assert_close(got, expected.mean(), rtol=1e-5, atol=1e-7)


def test_identity_symmetry_nonnegative(net: LPIPS, images: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = images
    with torch.no_grad():
        d_xy, d_yx, d_xx = net(x, y), net(y, x), net(x, x)
        d_rand = net(x, torch.rand_like(x) * 2 - 1)
    assert torch.equal(d_xx, torch.zeros(2))
    torch.testing.assert_close(d_xy, d_yx, rtol=1e-6, atol=0)
    assert (d_xy > 0).all() and (d_rand > 0).all()


def test_frozen_gradients_reach_input(net: LPIPS, images: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = images
    x_rec = y.clone().requires_grad_(True)
    net(x, x_rec, reduction="mean").backward()
    assert all(not p.requires_grad and p.grad is None for p in net.parameters())
    assert x_rec.grad is not None and x_rec.grad.abs().sum() > 0


def test_stays_in_eval_mode_under_parent_train(net: LPIPS) -> None:
    parent = nn.ModuleDict({"lpips": net, "head": nn.Linear(2, 2)})
    parent.train()
    assert parent["head"].training
    assert not any(m.training for m in net.modules())
    net.train(True)
    assert not net.training


def test_vgg_weights_file_gives_same_network(
    net: LPIPS, vgg_file: Path, images: tuple[torch.Tensor, torch.Tensor]
) -> None:
    loaded = LPIPS(vgg_weights=vgg_file)
    for (name, a), b in zip(net.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    x, y = images
    with torch.no_grad():
        assert torch.equal(loaded(x, y), net(x, y))


def test_default_weights_come_from_torch_hub_cache(
    net: LPIPS, vgg_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = torchvision.models.VGG16_Weights.IMAGENET1K_V1.url
    cache = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
    cache.parent.mkdir(parents=True)
    cache.symlink_to(vgg_file)
    cached = LPIPS(allow_download=False)
    assert all(torch.equal(a, b) for a, b in zip(net.vgg.parameters(), cached.vgg.parameters(), strict=True))


def test_missing_weights_error_says_how_to_provide_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache_dir = os.path.join(torch.hub.get_dir(), "checkpoints")
    with pytest.raises(RuntimeError) as err:
        LPIPS(allow_download=False)
    message = str(err.value)
    assert cache_dir in message and "vgg_weights" in message and "random_init=True" in message


def test_offline_download_failure_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(RuntimeError, match="name resolution") as err:
        LPIPS()  # allow_download=True, but the machine is offline
    assert "vgg_weights" in str(err.value)


def test_bad_files_raise_actionable_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        LPIPS(vgg_weights=tmp_path / "nope.pth")
    bogus = tmp_path / "bogus.pth"
    torch.save({"encoder.weight": torch.zeros(1)}, bogus)
    with pytest.raises(ValueError, match="bogus.pth"):
        LPIPS(vgg_weights=bogus)


def test_bf16_autocast_close_to_float32(net: LPIPS, images: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = images
    with torch.no_grad():
        ref = net(x, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = net(x, y)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=0)


def test_float16_autocast_survives_all_zero_features(
    net: LPIPS, images: tuple[torch.Tensor, torch.Tensor]
) -> None:
    # A pixel whose relu5_3 channels are all zero gives 0 / sqrt(1e-8 + 0); in float16 the eps
    # underflows and that is 0/0 = NaN, so the normalisation must run in float32.
    handle = net.vgg[29].register_forward_hook(lambda m, inp, out: torch.zeros_like(out))
    try:
        with torch.no_grad():
            ref = net(*images)
            with torch.autocast("cpu", dtype=torch.float16):
                got = net(*images)
    finally:
        handle.remove()
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=0)


def test_one_vgg_pass_over_both_batches(net: LPIPS, images: tuple[torch.Tensor, torch.Tensor]) -> None:
    batches: list[int] = []
    handle = net.vgg[0].register_forward_hook(lambda m, inp, out: batches.append(inp[0].shape[0]))
    try:
        with torch.no_grad():
            net(*images)
    finally:
        handle.remove()
    assert batches == [4]


def _saved_bytes(fn, module: nn.Module) -> int:
    """Bytes of activations autograd saves for backward while ``fn()`` runs (``module``'s
    weights, which every conv saves whatever its batch, not counted)."""
    weights = {p.data_ptr() for p in module.parameters()}
    total = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in weights:
            total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


def test_a_constant_side_runs_without_autograd_and_changes_nothing(net: LPIPS,
                                                                   images: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Training passes the real image (a constant) and the reconstruction (with gradient): the
    constant's VGG pass runs apart, without autograd; distances and gradients are those of the
    one pass over both, and about half as much is saved for backward."""
    double = LPIPS(random_init=True).double()
    double.load_state_dict({k: v.double() for k, v in net.state_dict().items()})
    x, y = (t.double() for t in images)
    batches: list[int] = []
    handle = double.vgg[0].register_forward_hook(lambda m, inp, out: batches.append(inp[0].shape[0]))
    try:
        y_split = y.clone().requires_grad_(True)
        split = double(x, y_split)
        assert batches == [2, 2]  # the constant, then the reconstruction
        y_both, x_both = y.clone().requires_grad_(True), x.clone().requires_grad_(True)
        both = double(x_both, y_both)  # both need gradients: one pass over the two
        assert batches == [2, 2, 4]
    finally:
        handle.remove()
    torch.testing.assert_close(split, both, rtol=1e-12, atol=1e-12)
    (g_split,) = torch.autograd.grad(split.sum(), y_split)
    (g_both,) = torch.autograd.grad(both.sum(), y_both)
    torch.testing.assert_close(g_split, g_both, rtol=1e-10, atol=1e-12)
    swapped = double(y_split, x)  # the constant may come second
    torch.testing.assert_close(swapped, split, rtol=1e-12, atol=1e-12)
    saved_split = _saved_bytes(lambda: double(x, y.clone().requires_grad_(True)), double)
    saved_both = _saved_bytes(lambda: double(x.clone().requires_grad_(True), y.clone().requires_grad_(True)),
                              double)
    assert saved_split < 0.6 * saved_both, (saved_split, saved_both)
