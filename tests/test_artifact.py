"""Artifact directories: atomic creation, checksums, refusal of tampered, missing or unknown-version files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qcache.artifact import ArtifactError, staging_dir, verify_artifact, write_manifest


def make_artifact(final: Path) -> Path:
    with staging_dir(final) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "weights.bin").write_bytes(b"\x00\x01" * 100)
        (tmp / "schedule.json").write_text('{"nfc": 14}')
        write_manifest(tmp, base_model="builtin:digits")
    return final


def test_manifest_lists_every_file_and_verifies(tmp_path: Path):
    art = make_artifact(tmp_path / "art")
    m = verify_artifact(art)
    assert set(m["files"]) == {"sub/weights.bin", "schedule.json"}
    assert m["format_version"] == 1 and m["base_model"] == "builtin:digits"
    assert [p.name for p in tmp_path.iterdir()] == ["art"]  # no temporary left behind


def test_failure_inside_staging_leaves_nothing(tmp_path: Path):
    with pytest.raises(RuntimeError):
        with staging_dir(tmp_path / "art") as tmp:
            (tmp / "half.bin").write_bytes(b"123")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_failed_rewrite_keeps_the_old_artifact(tmp_path: Path):
    art = make_artifact(tmp_path / "art")
    with pytest.raises(RuntimeError):
        with staging_dir(art):
            raise RuntimeError("killed")
    verify_artifact(art)
    make_artifact(art)  # a successful rewrite replaces it
    assert [p.name for p in tmp_path.iterdir()] == ["art"]


@pytest.mark.parametrize("damage, message", [
    (lambda a: (a / "sub" / "weights.bin").write_bytes(b"tampered"), "checksum mismatch for .*weights.bin"),
    (lambda a: (a / "schedule.json").unlink(), "file listed in the manifest is missing: .*schedule.json"),
    (lambda a: (a / "manifest.json").unlink(), "manifest.json is missing"),
    (lambda a: (a / "manifest.json").write_text(json.dumps({**json.loads((a / "manifest.json").read_text()),
                                                            "format_version": 99})), "unknown format_version 99"),
    (lambda a: (a / "manifest.json").write_text("{not json"), "manifest.json is not valid JSON"),
])
def test_damaged_artifacts_are_refused_naming_the_file(tmp_path: Path, damage, message):
    art = make_artifact(tmp_path / "art")
    damage(art)
    with pytest.raises(ArtifactError, match=message):
        verify_artifact(art)
