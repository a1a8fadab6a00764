"""Every command-line tool: --help works, names its options, and shows no reST markup."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

MODULES = [
    "engine.build", "tools.accuracy", "tools.bench_report", "tools.camera_loop",
    "tools.evaluate", "tools.gpu_probe", "tools.make_synthetic", "tools.precision_gate",
    "tools.predict", "tools.threshold", "tools.visualize",
]  # fmt: skip


@pytest.mark.parametrize("name", MODULES)
def test_help_is_plain_text(name: str, capsys: pytest.CaptureFixture) -> None:
    module = importlib.import_module(name)
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: python -m {name}")
    for markup in ("``", ":class:", ":func:", ":mod:"):
        assert markup not in text, f"{name} --help shows {markup!r}"


@pytest.mark.parametrize("name", ["engine.build", "tools.camera_loop", "tools.evaluate"])
def test_device_choices_are_the_same_everywhere(name: str, capsys) -> None:
    module = importlib.import_module(name)
    with pytest.raises(SystemExit):
        module.main(["--help"])
    assert "--device {auto,cpu,cuda}" in capsys.readouterr().out


def test_messages_of_a_cli_run_with_dash_m_are_logged(tmp_path: Path) -> None:
    """Under ``python -m`` a module is ``__main__``; its INFO lines must still be shown."""
    argv = [sys.executable, "-m", "engine.build", "--category=none", f"--data-root={tmp_path}"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2
    assert " INFO engine.build: config: preset " in result.stderr
