"""read_audio / write_wav / audio_info on files written with soundfile."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from distillery.data.audio_io import AudioFileError, audio_info, read_audio, write_wav

SR = 16000


def _sine(freq: float = 440.0, seconds: float = 0.25, sr: int = SR, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.mark.parametrize(
    ("subtype", "atol"),
    [("PCM_U8", 1.0 / 64), ("PCM_16", 1e-4), ("PCM_24", 1e-6), ("PCM_32", 1e-7), ("FLOAT", 0.0)],
)
def test_bit_depths_read_as_float32_in_range(tmp_path, subtype, atol):
    x = _sine()
    path = tmp_path / f"{subtype}.wav"
    sf.write(path, x, SR, subtype=subtype)
    y = read_audio(path, SR)
    assert y.dtype == np.float32
    assert y.shape == x.shape
    assert np.abs(y).max() <= 1.0
    np.testing.assert_allclose(y, x, atol=atol)


def test_stereo_is_averaged_to_mono(tmp_path):
    left, right = _sine(440.0), _sine(1000.0, amp=0.25)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), SR, subtype="FLOAT")
    y = read_audio(path, SR)
    assert y.ndim == 1
    np.testing.assert_allclose(y, (left + right) / 2, atol=1e-6)


def test_other_sample_rate_is_resampled(tmp_path):
    path = tmp_path / "44k.flac"
    sf.write(path, _sine(440.0, seconds=0.5, sr=44100), 44100)
    y = read_audio(path, SR)
    assert y.shape == (SR // 2,)
    # The tone must survive resampling at the same frequency.
    spectrum = np.abs(np.fft.rfft(y))
    peak_hz = np.argmax(spectrum) * SR / y.shape[0]
    assert abs(peak_hz - 440.0) < 4.0


def test_float_file_beyond_full_scale_is_clipped(tmp_path):
    path = tmp_path / "loud.wav"
    sf.write(path, np.array([0.5, 2.0, -3.0] * 100, dtype=np.float32), SR, subtype="FLOAT")
    y = read_audio(path, SR)
    assert y.max() == 1.0 and y.min() == -1.0


def test_empty_file_raises_naming_path(tmp_path):
    path = tmp_path / "empty.wav"
    sf.write(path, np.zeros(0, dtype=np.float32), SR)
    with pytest.raises(AudioFileError, match="empty") as info:
        read_audio(path, SR)
    assert str(path) in str(info.value)


def test_garbage_file_raises_naming_path(tmp_path):
    path = tmp_path / "not_audio.wav"
    path.write_bytes(b"this is not a wav file" * 50)
    with pytest.raises(AudioFileError, match="decoded") as info:
        read_audio(path, SR)
    assert str(path) in str(info.value)


def test_nan_samples_raise_naming_path(tmp_path):
    path = tmp_path / "nan.wav"
    sf.write(path, np.array([0.1, np.nan, 0.2] * 10, dtype=np.float32), SR, subtype="FLOAT")
    with pytest.raises(AudioFileError, match="non-finite") as info:
        read_audio(path, SR)
    assert str(path) in str(info.value)


def test_missing_file_raises_naming_path(tmp_path):
    path = tmp_path / "nope.wav"
    with pytest.raises(AudioFileError, match="does not exist") as info:
        read_audio(path, SR)
    assert str(path) in str(info.value)


def test_audio_file_error_is_a_value_error_and_keeps_plain_messages():
    err = AudioFileError("3 unreadable files: a, b, c")
    assert isinstance(err, ValueError)
    assert str(err) == "3 unreadable files: a, b, c"
    assert err.path is None


def test_write_wav_round_trip_and_info(tmp_path):
    x = _sine(seconds=0.5)
    path = tmp_path / "sub" / "dir" / "clip.wav"
    write_wav(path, x, SR)
    info = audio_info(path)
    assert info == {
        "frames": x.shape[0],
        "sample_rate": SR,
        "channels": 1,
        "duration_s": pytest.approx(0.5),
        "subtype": "PCM_16",
    }
    np.testing.assert_allclose(read_audio(path, SR), x, atol=1e-4)
    # Atomic write leaves no temporary files behind.
    assert sorted(p.name for p in path.parent.iterdir()) == ["clip.wav"]


def test_write_wav_saturates_and_overwrites(tmp_path):
    path = tmp_path / "clip.wav"
    write_wav(path, np.zeros(100, dtype=np.float32), SR)
    write_wav(path, np.array([2.0, -2.0, 0.5] * 10, dtype=np.float32), SR)
    y = read_audio(path, SR)
    assert y.shape == (30,)
    assert y.max() == pytest.approx(1.0, abs=1e-4) and y.min() == -1.0


def test_write_wav_rejects_non_finite(tmp_path):
    path = tmp_path / "bad.wav"
    with pytest.raises(ValueError, match="non-finite"):
        write_wav(path, np.array([0.0, np.inf]), SR)
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_audio_info_on_garbage_raises(tmp_path):
    path = tmp_path / "x.flac"
    path.write_bytes(b"\x00" * 100)
    with pytest.raises(AudioFileError) as info:
        audio_info(path)
    assert str(path) in str(info.value)


def test_wav_cut_mid_data_is_rejected_not_read_shorter(tmp_path):
    # libsndfile alone would read the first half as a shorter clip.
    full = tmp_path / "full.wav"
    write_wav(full, _sine(seconds=0.5), SR)
    cut = tmp_path / "cut.wav"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2 + 1])
    for read in (audio_info, lambda p: read_audio(p, SR)):
        with pytest.raises(AudioFileError, match="is truncated") as info:
            read(cut)
        assert str(cut) in str(info.value)


def test_wav_with_unset_data_size_is_read_whole(tmp_path):
    # A streaming writer that never rewrote the header leaves 0xFFFFFFFF sizes.
    path = tmp_path / "stream.wav"
    write_wav(path, _sine(seconds=0.25), SR)
    data = bytearray(path.read_bytes())
    at = data.index(b"data")
    data[4:8] = data[at + 4 : at + 8] = b"\xff\xff\xff\xff"
    path.write_bytes(bytes(data))
    assert read_audio(path, SR).shape == (_sine(seconds=0.25).shape[0],)


def test_header_checks_find_empty_and_frameless_files(tmp_path):
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    frameless = tmp_path / "frameless.wav"
    sf.write(frameless, np.zeros(0, dtype=np.float32), SR)
    with pytest.raises(AudioFileError, match=r"is empty \(0 bytes\)"):
        audio_info(empty)
    with pytest.raises(AudioFileError, match="no audio frames"):
        audio_info(frameless)
