"""The distillery-data console script, driven through main([...])."""

from __future__ import annotations

import numpy as np
import soundfile as sf

from distillery.data.cli import main
from distillery.data.synthetic import CLASS_NAMES, SyntheticSpec, spec_hash

ARGS = [
    "--num-classes",
    "3",
    "--clips-per-class",
    "2",
    "--sample-rate",
    "8000",
    "--clip-seconds",
    "0.5",
]


def test_synthetic_generates_and_prints_manifest_and_counts(tmp_path, capsys):
    assert main(["synthetic", "--out", str(tmp_path), *ARGS, "--seed", "5"]) == 0
    out = capsys.readouterr().out
    spec = SyntheticSpec(
        num_classes=3, clips_per_class=2, sample_rate=8000, clip_seconds=0.5, seed=5
    )
    manifest = tmp_path / f"synthetic-{spec_hash(spec)}" / "manifest.csv"
    assert manifest.is_file()
    assert f"manifest: {manifest}" in out
    for name in CLASS_NAMES[:3]:
        assert any(line.split() == [name, "2"] for line in out.splitlines()), name


def test_info_on_synthetic_cache_dir(tmp_path, capsys):
    main(["synthetic", "--out", str(tmp_path), *ARGS])
    capsys.readouterr()
    (cache,) = tmp_path.glob("synthetic-*")
    assert main(["info", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "files: 6" in out and "classes: 3" in out
    assert "total duration: 3.0 s" in out
    assert "8000: 6 files" in out and "1: 6 files" in out
    # The cache root holds generated sets, not class folders: point at the set instead.
    assert main(["info", str(tmp_path)]) == 2
    assert str(cache) in capsys.readouterr().err


def test_info_on_folder_with_mixed_files(tmp_path, capsys):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    sf.write(tmp_path / "a" / "x.wav", np.zeros(16000), 16000)
    sf.write(tmp_path / "b" / "y.flac", np.zeros((22050, 2)), 22050)
    sf.write(tmp_path / "b" / "z.wav", np.zeros(8000), 16000)
    assert main(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "files: 3" in out and "classes: 2" in out
    assert "total duration: 2.5 s" in out
    assert "16000: 2 files" in out and "22050: 1 files" in out
    assert "1: 2 files, 2: 1 files" in out


def test_info_on_manifest_reports_unreadable_files(tmp_path, capsys):
    sf.write(tmp_path / "ok.wav", np.zeros(800), 8000)
    sf.write(tmp_path / "ok2.wav", np.zeros(800), 8000)
    sf.write(tmp_path / "one_hz.wav", np.zeros(800), 1)  # a header claiming 1 Hz
    (tmp_path / "bad.wav").write_bytes(b"garbage" * 20)
    (tmp_path / "m.csv").write_text(
        "path,label,split\nok.wav,a,train\nbad.wav,,test\nok2.wav,b,test\ngone.wav,a,val\n"
        "one_hz.wav,a,train\n"
    )
    assert main(["info", str(tmp_path / "m.csv")]) == 1
    out = capsys.readouterr().out
    assert "files: 5" in out and "(unlabelled)" in out
    assert "splits: test=2, train=2, val=1" in out
    assert "bad files: 4" in out and "bad.wav" in out
    assert "one_hz.wav': sample rate 1 Hz is outside 4000-192000 Hz" in out
    assert "line 4:" in out and "'b' occurs in no train row" in out
    assert "line 5:" in out and "gone.wav" in out


def test_errors_return_nonzero_with_message(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    assert main(["synthetic", "--out", str(tmp_path), "--num-classes", "99"]) == 2
    assert "num_classes" in capsys.readouterr().err
