"""Manifests (CSV / JSONL), class-per-folder scanning and source dispatch."""

from __future__ import annotations

import json

import numpy as np
import pytest

from distillery.data.audio_io import write_wav
from distillery.data.sources import AudioRecord, load_source, read_manifest, scan_folder
from distillery.data.synthetic import SyntheticSpec

SR = 8000


def _wav(path, seconds: float = 0.1):
    write_wav(path, np.zeros(int(SR * seconds), dtype=np.float32), SR)
    return path


def test_csv_manifest_with_relative_paths_labels_and_splits(tmp_path):
    _wav(tmp_path / "audio" / "a.wav")
    _wav(tmp_path / "audio" / "b.wav")
    _wav(tmp_path / "audio" / "c.wav")
    elsewhere = _wav(tmp_path / "other" / "d.wav")
    manifest = tmp_path / "lists" / "m.csv"
    manifest.parent.mkdir()
    manifest.write_text(
        "path,label,split\n"
        "../audio/a.wav,dog,train\n"
        "../audio/b.wav,cat,train\n"
        "../audio/c.wav,,val\n"
        f"{elsewhere},dog,test\n"
    )
    table = read_manifest(manifest)
    assert table.class_names == ["cat", "dog"]
    assert [(r.path.name, r.label, r.split) for r in table.records] == [
        ("a.wav", 1, "train"),
        ("b.wav", 0, "train"),
        ("c.wav", -1, "val"),
        ("d.wav", 1, "test"),
    ]
    assert all(r.path.is_absolute() and r.path.is_file() for r in table.records)
    assert isinstance(table.records[0], AudioRecord)


def test_csv_manifest_without_label_column_is_unlabelled(tmp_path):
    _wav(tmp_path / "x.wav")
    (tmp_path / "m.csv").write_text("path\nx.wav\n")
    table = read_manifest(tmp_path / "m.csv")
    assert table.class_names == []
    assert table.records[0].label == -1 and table.records[0].split is None


def test_jsonl_manifest(tmp_path):
    _wav(tmp_path / "sub" / "a.wav")
    _wav(tmp_path / "sub" / "b.wav")
    lines = [
        {"path": "sub/a.wav", "label": "zebra"},
        {"path": "sub/b.wav"},
        {"path": "sub/a.wav", "label": "ant"},
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    table = read_manifest(manifest)
    assert table.class_names == ["ant", "zebra"]
    assert [(r.path, r.label, r.split) for r in table.records] == [
        ((tmp_path / "sub" / "a.wav").resolve(), 1, None),
        ((tmp_path / "sub" / "b.wav").resolve(), -1, None),
        ((tmp_path / "sub" / "a.wav").resolve(), 0, None),
    ]


def test_missing_files_are_kept_as_problems_naming_the_line(tmp_path):
    _wav(tmp_path / "ok.wav")
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\nok.wav,a\ngone1.wav,a\nok.wav,b\ngone2.wav,b\n")
    table = read_manifest(manifest)
    # Rows stay in place (indices follow the manifest); the data module reports or skips them.
    assert [r.path.name for r in table.records] == ["ok.wav", "gone1.wav", "ok.wav", "gone2.wav"]
    assert sorted(table.problems) == [1, 3]
    for index, line, name in ((1, 3, "gone1.wav"), (3, 5, "gone2.wav")):
        message = table.problems[index]
        assert message.startswith(f"{manifest}: line {line}: ") and name in message
        assert "does not exist" in message


def test_missing_path_column(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("file,label\nx.wav,a\n")
    with pytest.raises(ValueError, match=r"line 1: .*'path'") as info:
        read_manifest(manifest)
    assert str(manifest) in str(info.value)


def test_missing_path_key_in_jsonl_names_the_line(tmp_path):
    _wav(tmp_path / "x.wav")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"path": "x.wav"}\n{"label": "a"}\n')
    with pytest.raises(ValueError, match=r"line 2: key 'path'"):
        read_manifest(manifest)


def test_unknown_split_names_line_and_key(tmp_path):
    _wav(tmp_path / "x.wav")
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,split\nx.wav,train\nx.wav,validation\n")
    with pytest.raises(ValueError, match=r"line 3: key 'split' .*'validation'") as info:
        read_manifest(manifest)
    assert str(manifest) in str(info.value)


def test_invalid_json_and_unknown_extension(tmp_path):
    bad = tmp_path / "m.jsonl"
    bad.write_text('{"path": "x.wav"\n')
    with pytest.raises(ValueError, match="line 1: invalid JSON"):
        read_manifest(bad)
    other = tmp_path / "m.txt"
    other.write_text("path\n")
    with pytest.raises(ValueError, match=r"\.csv or \.jsonl"):
        read_manifest(other)
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_manifest(tmp_path / "nope.csv")


def test_empty_manifest_is_an_error(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\n")
    with pytest.raises(ValueError, match="no files"):
        read_manifest(manifest)


def _speech_commands_like(root):
    for name in (
        "yes/a.wav",
        "yes/b.wav",
        "no/c.wav",
        "no/deep/d.flac",
        "_background_noise_/n.wav",
    ):
        _wav(root / name)
    (root / "no" / "notes.txt").write_text("not audio")
    (root / "empty").mkdir()
    (root / "README.md").write_text("readme")


def test_scan_folder_class_per_subfolder(tmp_path):
    _speech_commands_like(tmp_path)
    table = scan_folder(tmp_path)
    assert table.class_names == ["no", "yes"]
    got = [
        (r.path.relative_to(tmp_path.resolve()).as_posix(), r.label, r.split) for r in table.records
    ]
    assert got == [
        ("no/c.wav", 0, None),
        ("no/deep/d.flac", 0, None),
        ("yes/a.wav", 1, None),
        ("yes/b.wav", 1, None),
    ]
    assert not any("_background_noise_" in str(r.path) for r in table.records)


def test_scan_folder_uses_speech_commands_split_lists(tmp_path):
    _speech_commands_like(tmp_path)
    (tmp_path / "validation_list.txt").write_text("yes/b.wav\n")
    (tmp_path / "testing_list.txt").write_text("no/c.wav\n")
    splits = {r.path.name: r.split for r in scan_folder(tmp_path).records}
    assert splits == {"c.wav": "test", "d.flac": "train", "a.wav": "train", "b.wav": "val"}


def test_scan_folder_extensions_and_errors(tmp_path):
    _speech_commands_like(tmp_path)
    assert [r.path.name for r in scan_folder(tmp_path, extensions=(".flac",)).records] == ["d.flac"]
    with pytest.raises(ValueError, match="does not exist") as info:
        scan_folder(tmp_path / "missing")
    assert "missing" in str(info.value)
    (tmp_path / "hollow" / "cls").mkdir(parents=True)
    with pytest.raises(ValueError, match="no audio") as info:
        scan_folder(tmp_path / "hollow")
    assert "hollow" in str(info.value)


def test_load_source_dispatch(tmp_path):
    _speech_commands_like(tmp_path / "tree")
    assert load_source("folder", root=tmp_path / "tree").class_names == ["no", "yes"]

    _wav(tmp_path / "m" / "x.wav")
    (tmp_path / "m" / "list.csv").write_text("path,label\nx.wav,k\n")
    assert load_source("manifest", path=tmp_path / "m" / "list.csv").class_names == ["k"]

    spec = SyntheticSpec(num_classes=2, clips_per_class=3, sample_rate=8000, clip_seconds=0.2)
    table = load_source("synthetic", cache_dir=tmp_path / "cache", synthetic=spec)
    assert len(table.records) == 6 and table.class_names == sorted(spec.class_names)
    assert all(r.path.is_file() and r.split is None for r in table.records)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"source": "hdf5"}, r"data\.source.*synthetic, speech, folder, manifest"),
        ({"source": "folder"}, r"data\.root"),
        ({"source": "manifest"}, r"data\.path"),
        ({"source": "synthetic"}, r"data\.cache_dir"),
    ],
)
def test_load_source_errors_name_the_config_key(kwargs, message):
    source = kwargs.pop("source")
    with pytest.raises(ValueError, match=message):
        load_source(source, **kwargs)
