"""What a build may replace: nothing is ever written over a file, a link, the user's files or a
folder of artifacts; an empty folder or an engine artifact (holding nothing else) may be."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.artifact import ArtifactError, ArtifactWriter, check_target

ADVICE = "choose another --out or remove it yourself"


def names_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_check_target_allows_nothing_an_empty_folder_or_an_artifact(
    art: Path, tmp_path: Path
) -> None:
    check_target(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    check_target(tmp_path / "empty")
    check_target(art)


def _artifacts_folder(built, tiny, root: Path) -> Path:
    """``artifacts/`` as a user has it: two artifacts and a README."""
    tiny["save"](root / "artifacts" / "pushpins", *built)
    tiny["save"](root / "artifacts" / "screw_bag", *built)
    (root / "artifacts" / "README.txt").write_text("my notes")
    return root / "artifacts"


@pytest.mark.parametrize("kind", ["file", "user folder", "artifacts folder", "link", "extra file"])
def test_check_target_refuses_what_is_not_an_artifact(
    built, tiny, art: Path, tmp_path: Path, kind: str
) -> None:
    target = {
        "file": tmp_path / "file.txt",
        "user folder": tmp_path / "photos",
        "artifacts folder": tmp_path / "artifacts",
        "link": tmp_path / "link",
        "extra file": art,
    }[kind]
    if kind == "file":
        target.write_text("data")
    elif kind == "user folder":
        target.mkdir()
        (target / "holiday.jpg").write_bytes(b"jpg")
    elif kind == "artifacts folder":
        _artifacts_folder(built, tiny, tmp_path)
    elif kind == "link":
        target.symlink_to(art)
    else:
        (art / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError, match=ADVICE):
        check_target(target)


def test_writing_over_a_folder_of_artifacts_destroys_nothing(built, tiny, tmp_path: Path) -> None:
    folder = _artifacts_folder(built, tiny, tmp_path)
    before = sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
    with pytest.raises(ArtifactError, match="not an engine artifact"):
        tiny["save"](folder, *built)
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) == before
    assert names_in(tmp_path) == ["artifacts"]


def test_commit_checks_the_target_again(built, tmp_path: Path) -> None:
    out = tmp_path / "art"
    with pytest.raises(ArtifactError, match=ADVICE), ArtifactWriter(out) as writer:
        writer.file("logical.pt").write_bytes(b"x")
        out.mkdir()
        (out / "mine.txt").write_text("appeared meanwhile")
        writer.commit({})
    assert names_in(out) == ["mine.txt"] and names_in(tmp_path) == ["art"]
