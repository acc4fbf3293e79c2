"""Manifest rules that used to pass silently: partial split columns, a file in two splits,
labels that differ only by case, and text encodings."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from tests.helpers import compose_config

from distillery.data.sources import read_manifest
from distillery.pipeline.contract import ConfigError, validate


def wavs(folder: Path, *names: str) -> None:
    for name in names:
        sf.write(folder / name, np.zeros(800, dtype=np.float32), 8000)


def test_a_partial_split_column_is_an_error_naming_the_rows(tmp_path: Path) -> None:
    wavs(tmp_path, *(f"{i}.wav" for i in range(8)))
    rows = [f"{i}.wav,up,test" for i in range(7)] + ["7.wav,up,"]
    (tmp_path / "m.csv").write_text("path,label,split\n" + "\n".join(rows) + "\n")
    with pytest.raises(ValueError, match=r"m.csv: lines 9 have no split while 7 other rows"):
        read_manifest(tmp_path / "m.csv")


def test_a_file_in_two_splits_is_an_error(tmp_path: Path) -> None:
    wavs(tmp_path, "a.wav", "b.wav")
    (tmp_path / "m.csv").write_text(
        "path,label,split\na.wav,up,train\nb.wav,up,train\n./a.wav,up,test\n"
    )
    with pytest.raises(ValueError, match=r"lines 2 and 4: audio file .*a.wav' is in two splits"):
        read_manifest(tmp_path / "m.csv")


def test_labels_differing_only_by_case_or_whitespace_warn(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    wavs(tmp_path, "a.wav", "b.wav", "c.wav")
    (tmp_path / "m.csv").write_text("path,label\na.wav,Up\nb.wav,up\nc.wav,go  left\n")
    with caplog.at_level(logging.WARNING, logger="distillery.data"):
        table = read_manifest(tmp_path / "m.csv")
    assert table.class_names == ["Up", "go  left", "up"]  # kept as given: a warning, not a fix
    assert "'Up' and 'up' differ only by case or whitespace" in caplog.text
    assert "lines 2, 3" in caplog.text
    assert "go  left" not in caplog.text


@pytest.mark.parametrize(
    "encoding", ["utf-8", "utf-8-sig", "utf-16", "utf-16-le-bom", "utf-16-be-bom", "latin-1"]
)
def test_manifest_encodings_are_detected(
    tmp_path: Path, encoding: str, caplog: pytest.LogCaptureFixture
) -> None:
    wavs(tmp_path, "é.wav", "b.wav")
    text = "path,label\né.wav,café\nb.wav,thé\n"
    if encoding.endswith("-bom"):  # an explicit byte order with its mark
        codec = encoding[: -len("-bom")]
        data = ("\ufeff" + text).encode(codec)
    else:
        data = text.encode(encoding)
    (tmp_path / "m.csv").write_bytes(data)
    with caplog.at_level(logging.WARNING, logger="distillery.data"):
        table = read_manifest(tmp_path / "m.csv")
    assert table.class_names == ["café", "thé"]
    assert [r.path.name for r in table.records] == ["é.wav", "b.wav"]
    assert not table.problems
    assert ("as Latin-1" in caplog.text) == (encoding == "latin-1")


def test_utf16_without_a_byte_order_mark_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_bytes("path,label\na.wav,up\n".encode("utf-16-le"))
    with pytest.raises(ValueError, match=r"m.csv: line 1: cannot decode the manifest \(NUL bytes"):
        read_manifest(tmp_path / "m.csv")


def test_a_damaged_utf16_manifest_names_file_and_line(tmp_path: Path) -> None:
    data = "path,label\na.wav,up\nb.wav,go\n".encode("utf-16")
    (tmp_path / "m.csv").write_bytes(data + b"\x00\xd8")  # a lone surrogate on line 4
    with pytest.raises(ValueError, match=r"m.csv: line 4: cannot decode the manifest \(utf-16\)"):
        read_manifest(tmp_path / "m.csv")


def test_manifest_rules_are_checked_at_start_up_with_the_key(tmp_path: Path) -> None:
    wavs(tmp_path, "a.wav", "b.wav")
    (tmp_path / "m.csv").write_text("path,label,split\na.wav,up,train\nb.wav,go,\n")
    cfg = compose_config(
        ["experiment=supervised", "data=manifest", f"data.path={tmp_path / 'm.csv'}"]
    )
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert any(
        p.startswith("data.path: ") and "lines 3 have no split" in p for p in err.value.problems
    ), err.value
