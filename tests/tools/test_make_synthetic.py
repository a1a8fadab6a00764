"""tools.make_synthetic: a tiny end-to-end run and argparse errors."""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from engine.data.loco import LocoDataset
from tools.make_synthetic import main

REPO = Path(__file__).resolve().parents[2]


def test_cli_writes_category_and_contact_sheet(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    argv = ["--out", str(tmp_path), "--category", "screw_bag", "--size", "160x110"]
    argv += [
        "--n-train",
        "2",
        "--n-validation",
        "1",
        "--n-test",
        "2",
        "--seed",
        "5",
        "--no-progress",
    ]
    assert main(argv) == 0
    folder = tmp_path / "screw_bag"
    dataset = LocoDataset(tmp_path, "screw_bag")
    assert len(dataset.samples("train")) == 2 and len(dataset.samples("test")) == 6
    with Image.open(folder / "train" / "good" / "000.png") as im:
        assert im.size == (160, 110)
    assert (folder / "contact_sheet.png").is_file()
    summary = capsys.readouterr().out
    assert "screw_bag: train 2, validation 1" in summary and "160x110" in summary


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--size", "160-110"], "WxH"),
        (["--size", "0x10"], "WxH"),
        (["--category", "bottle"], "invalid choice"),
        (["--n-train", "-3"], "non-negative"),
        (["--category", "pushpins", "--size", "40x20"], "too small"),
    ],
)
def test_cli_bad_arguments(
    tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path), "--no-progress", *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "pushpins").exists()


def test_cli_module_entry_point(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tools.make_synthetic", "--out", str(tmp_path), "--size", "1x"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2 and "WxH" in result.stderr


def test_disk_full_exits_2_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "pushpins"))

    monkeypatch.setattr("tools.make_synthetic.generate_category", disk_full)
    assert main(["--out", str(tmp_path), "--category", "pushpins", "--no-progress"]) == 2
    assert "No space left on device" in capsys.readouterr().err


def test_out_below_a_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("mine")
    argv = ["--out", str(blocker / "data"), "--category", "pushpins", "--no-progress"]
    argv += ["--n-train", "1", "--n-validation", "1", "--n-test", "0"]
    assert main(argv) == 2
    assert str(blocker) in capsys.readouterr().err
    assert blocker.read_text() == "mine"
