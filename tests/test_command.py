"""`animevq` itself: every command listed with one line, without importing Lightning's trainer;
only fit and validate go to LightningCLI (test and predict are not commands of animevq)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from animevq.command import main, overview
from animevq.tools import LIGHTNING_COMMANDS, TOOLS

PROBE = ("import sys\nfrom animevq.command import main\ntry:\n    main(['--help'])\nexcept SystemExit as e:\n"
         "    code = e.code\nprint('LOADED', sorted(m for m in ('lightning', 'torch', 'swanlab') if m in sys.modules), code)")


def test_the_overview_lists_every_command_and_loads_no_framework() -> None:
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    listed = {line.split()[0] for line in result.stdout.splitlines() if line.startswith("  ")}
    assert listed == {*LIGHTNING_COMMANDS, *TOOLS}  # fit, validate and the six tools, each with its line
    assert result.stdout.strip().endswith("LOADED [] 0")  # nothing heavy imported: it answers at once


def test_unknown_commands_and_test_or_predict_are_refused_with_the_list(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("test", "predict", "tokenize"):
        with pytest.raises(SystemExit) as exit_:
            main([command])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and f"unknown command {command!r}" in err and overview() in err
    with pytest.raises(SystemExit) as exit_:
        main([])
    assert exit_.value.code == 2 and "tools:" in capsys.readouterr().out


def test_lightning_keeps_only_fit_and_validate(capsys: pytest.CaptureFixture[str]) -> None:
    from animevq.cli import main as lightning_main

    with pytest.raises(SystemExit):
        lightning_main(["--help"])
    assert "{fit,validate}" in capsys.readouterr().out  # was: {fit,validate,test,predict}, two of them broken


def test_tool_help_shows_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["encode", "--help"])
    assert "(default: 64)" in capsys.readouterr().out  # --batch_size
