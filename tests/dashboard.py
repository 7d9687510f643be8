"""Test helpers that look at SwanLab runs the way a user does: through ``swanlab watch``.

Reusable on any log dir (ours from a tiny fit, or one written by ``animevq fit``)::

    from dashboard import api_keys, chromium_dump_dom, fetch_scalar, swanlab_dashboard

    with swanlab_dashboard(log_dir) as base_url:        # http://127.0.0.1:<free port>
        keys = api_keys(base_url)                        # {experiment name: {metric keys}}
        losses = fetch_scalar(base_url, "my-run", "train/total_loss")
        dom = chromium_dump_dom(f"{base_url}/experiment/{experiment_ids(base_url)['my-run']}")

The dashboard server (swanboard, FastAPI) answers ``{"code": 0, "message": "success",
"data": ...}`` on these routes, all under ``/api/v1``:

- ``GET /project``: the log dir's project and its ``experiments`` (id, name, run_id, status)
- ``GET /experiment/{id}``: one run, with its ``config`` and ``system`` metadata
- ``GET /experiment/{id}/chart``: its charts; each chart's ``source`` lists metric keys
- ``GET /experiment/{id}/tag/{key}``: a key's points ``list: [{index: step, data}]``; for
  images ``data`` is a list of file names
- ``GET /media/{file}?tag={key}&experiment_id={id}``: the image bytes (PNG)
- ``GET /experiment/{id}/summary``, ``/status``, ``/recent_log``, ``/requirements``

:func:`read_swanlog` reads the same data from disk without a server.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ports import HOST, free_port

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Flags for a browser that touches nothing but the page it is given.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
)


class DashboardError(RuntimeError):
    """The dashboard did not start or answered with an error."""


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome binary on PATH (Debian's package installs /usr/bin/chromium)."""
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def _http_get(url: str, timeout: float = 10.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - local server
        return response.read()


@contextmanager
def swanlab_dashboard(log_dir: str | os.PathLike[str], *, host: str = HOST, timeout: float = 60.0) -> Iterator[str]:
    """Run ``swanlab watch <log_dir>`` on a free local port; yield its base URL; stop it after.

    Raises:
        DashboardError: the server exited or did not answer ``/api/v1/project`` in time
            (the message carries its output).
    """
    port = free_port(host)
    cmd = [sys.executable, "-m", "swanlab", "watch", os.fspath(log_dir), "-h", host, "-p", str(port)]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        start_new_session=True,  # its own process group, so stopping it stops uvicorn too
    )
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    base_url = f"http://{host}:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            # `swanlab watch` silently moves to another port if ours was taken meanwhile.
            printed = re.search(rf"http://{re.escape(host)}:(\d+)", "".join(output))
            if printed:
                base_url = f"http://{host}:{printed.group(1)}"
            try:
                json.loads(_http_get(f"{base_url}/api/v1/project", timeout=2.0))
                break
            except (urllib.error.URLError, OSError, ValueError):
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                state = f"exited with {proc.returncode}" if proc.poll() is not None else f"silent for {timeout}s"
                raise DashboardError(f"`{' '.join(cmd)}` {state}; output:\n{''.join(output)}")
            time.sleep(0.2)
        yield base_url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        reader.join(timeout=5)


def api_get(base_url: str, route: str, **params: Any) -> Any:
    """GET ``/api/v1/<route>`` and return its ``data``; DashboardError unless ``code == 0``."""
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    url = f"{base_url}/api/v1/{route.lstrip('/')}{query}"
    try:
        body = json.loads(_http_get(url))
    except urllib.error.HTTPError as err:
        body = json.loads(err.read() or b"{}")
    if body.get("code") != 0:
        raise DashboardError(f"GET {url} -> {body}")
    return body.get("data")


def experiment_ids(base_url: str) -> dict[str, int]:
    """``{experiment name: dashboard id}`` for every run in the log dir."""
    return {exp["name"]: exp["id"] for exp in api_get(base_url, "project")["experiments"]}


def _exp_id(base_url: str, experiment: str | int) -> int:
    if isinstance(experiment, int):
        return experiment
    ids = experiment_ids(base_url)
    if experiment not in ids:
        raise DashboardError(f"no experiment named {experiment!r}; the dashboard lists {sorted(ids)}")
    return ids[experiment]


def api_keys(base_url: str) -> dict[str, set[str]]:
    """``{experiment name: {metric keys with a chart}}``, read from each run's charts."""
    return {
        name: {key for chart in api_get(base_url, f"experiment/{exp_id}/chart")["charts"] for key in chart["source"]}
        for name, exp_id in experiment_ids(base_url).items()
    }


def fetch_series(base_url: str, experiment: str | int, key: str) -> list[tuple[int, Any]]:
    """``[(step, data), ...]`` of one key, sorted by step (``data``: float, or file names)."""
    exp_id = _exp_id(base_url, experiment)
    data = api_get(base_url, f"experiment/{exp_id}/tag/{urllib.parse.quote(key, safe='')}")
    return sorted(((int(point["index"]), point["data"]) for point in data["list"]), key=lambda point: point[0])


def fetch_scalar(base_url: str, experiment: str | int, key: str) -> list[float]:
    """The values logged under a scalar key, in step order."""
    return [float(value) for _, value in fetch_series(base_url, experiment, key)]


def fetch_media(base_url: str, experiment: str | int, key: str) -> list[tuple[int, bytes]]:
    """``[(step, file bytes), ...]`` of a media key (images come back as PNG bytes)."""
    exp_id = _exp_id(base_url, experiment)
    files = []
    for step, names in fetch_series(base_url, exp_id, key):
        for name in names:
            query = urllib.parse.urlencode({"tag": key, "experiment_id": exp_id})
            files.append((step, _http_get(f"{base_url}/api/v1/media/{urllib.parse.quote(name)}?{query}")))
    return files


def chromium_dump_dom(url: str, *, timeout: float = 90.0, budget_ms: int = 10_000, height: int = 6000) -> str:
    """The DOM of ``url`` after headless Chromium ran its scripts for ``budget_ms`` of virtual
    time (so the Vue app has fetched and drawn its charts). The window is ``height`` px tall so
    lazily drawn panels further down render too."""
    chromium = find_chromium()
    if chromium is None:
        raise FileNotFoundError("no Chromium on PATH; install it with `apt-get install -y chromium`")
    with tempfile.TemporaryDirectory(prefix="animevq-chromium-") as profile:
        cmd = [
            chromium,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            f"--window-size=1280,{height}",
            f"--virtual-time-budget={budget_ms}",
            "--dump-dom",
            url,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0 or not done.stdout.strip():
        raise DashboardError(f"chromium exited with {done.returncode} on {url}:\n{done.stderr[-2000:]}")
    return done.stdout


def read_swanlog(log_dir: str | os.PathLike[str]) -> dict[str, dict[str, list[tuple[int, Any]]]]:
    """Read a local-mode log dir without a server: ``{experiment: {key: [(step, data)]}}``,
    ``data`` being a float for scalars and a list of file paths for media.

    Layout (SwanLab 0.10 local mode): ``<log_dir>/runs.swanlab`` (SQLite: experiment, tag, …
    tables) and one ``run-<YYYYmmdd_HHMMSS>-<id>/`` per run holding ``logs/<folder>/*.log``
    (JSON lines ``{"index": step, "data": ...}``), ``media/<folder>/`` (image files),
    ``files/`` (config.yaml, metadata, requirements) and ``console/``.
    """
    log_dir = Path(log_dir)
    with sqlite3.connect(log_dir / "runs.swanlab") as db:
        runs = db.execute("SELECT id, name, run_id FROM experiment").fetchall()
        tags = db.execute("SELECT experiment_id, name, folder FROM tag").fetchall()
    result: dict[str, dict[str, list[tuple[int, Any]]]] = {}
    for exp_id, name, run_dir in runs:
        series: dict[str, list[tuple[int, Any]]] = {}
        for tag_exp, key, folder in tags:
            if tag_exp != exp_id:
                continue
            points = []
            for log_file in sorted((log_dir / run_dir / "logs" / folder).glob("*.log")):
                points += [json.loads(line) for line in log_file.read_text(encoding="utf-8").splitlines() if line]
            media = log_dir / run_dir / "media" / folder
            pairs = [
                (int(p["index"]), [media / f for f in p["data"]] if isinstance(p["data"], list) else p["data"])
                for p in points
            ]
            series[key] = sorted(pairs, key=lambda pair: pair[0])
        result[name] = series
    return result
