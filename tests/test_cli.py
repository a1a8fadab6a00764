"""Every command-line tool: --help works, names its options, and shows no reST markup."""

from __future__ import annotations

import importlib

import pytest

MODULES = [
    "engine.build", "tools.accuracy", "tools.bench_report", "tools.camera_loop",
    "tools.evaluate", "tools.gpu_probe", "tools.make_synthetic", "tools.predict", "tools.threshold",
    "tools.visualize",
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
