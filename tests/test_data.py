"""The vschaos2 dataset layout: audio loading, every metadata format, and bad input."""
import numpy as np
import pytest
import soundfile as sf
import torch

import data
from data import MISSING

TRANSFORM = {"sr": 16000, "n_fft": 256, "hop": 64}


def tone(seconds=0.5, sr=16000, freq=440.0, channels=1):
    t = np.arange(int(seconds * sr)) / sr
    x = 0.5 * np.sin(2 * np.pi * freq * t).astype(np.float32)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


def make_dataset(root, files=("a.wav", "sub/b.wav", "sub/c.wav"), sr=16000):
    for name in files:
        (root / "data" / name).parent.mkdir(parents=True, exist_ok=True)
        sf.write(root / "data" / name, tone(sr=sr), sr)
    return root


def write_task(root, task, lines, classes=None, tracks=None):
    task_dir = root / "metadata" / task
    task_dir.mkdir(parents=True, exist_ok=True)
    (task_dir / "metadata.txt").write_text("".join(line + "\n" for line in lines))
    if classes is not None:
        (task_dir / "classes.txt").write_text("".join(f"{i}\t{n}\n" for i, n in classes.items()))
    for name, content in (tracks or {}).items():
        (task_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (task_dir / name).write_text(content)
    return task_dir


def test_load_audio_mixes_to_mono_and_resamples(tmp_path):
    sf.write(tmp_path / "st.wav", tone(1.0, 22050, channels=2), 22050)
    audio = data.load_audio(tmp_path / "st.wav", 16000)
    assert audio.dtype == torch.float32 and audio.dim() == 1
    assert abs(audio.shape[0] - 16000) <= 1
    spectrum = torch.fft.rfft(audio).abs()
    assert abs(spectrum.argmax().item() - 440) <= 2  # the 440 Hz tone survives resampling


@pytest.mark.parametrize("fmt", ["flac", "ogg", "aiff"])
def test_load_audio_reads_other_formats(tmp_path, fmt):
    path = tmp_path / f"x.{fmt}"
    sf.write(path, tone(), 16000)
    assert data.load_audio(path, 16000).shape[0] == 8000


def test_unreadable_and_empty_audio_name_the_file(tmp_path):
    (tmp_path / "bad.wav").write_bytes(b"not audio at all")
    with pytest.raises(data.AudioError, match="bad.wav"):
        data.load_audio(tmp_path / "bad.wav", 16000)
    sf.write(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(data.AudioError, match="empty.wav.*empty"):
        data.load_audio(tmp_path / "empty.wav", 16000)


def test_single_metadata_int_float_none_and_class_names(tmp_path):
    root = make_dataset(tmp_path)
    write_task(root, "inst", ["data/a.wav\t1", "data/sub/b.wav\tnone", "data/sub/c.wav\tflute"],
               classes={0: "violin", 1: "cello", 2: "flute"})
    labels, classes = data.read_metadata(root, "inst")
    assert labels == {"data/a.wav": 1, "data/sub/b.wav": None, "data/sub/c.wav": 2}
    assert classes[2] == "flute"
    write_task(root, "gain", ["data/a.wav\t0.5", "data/sub/b.wav\tnone"])
    labels, _ = data.read_metadata(root, "gain", value_type="float")
    assert labels == {"data/a.wav": 0.5, "data/sub/b.wav": None}


def test_tracks_give_each_frame_the_label_of_the_segment_holding_its_centre(tmp_path):
    root = make_dataset(tmp_path)
    write_task(root, "note", ["data/a.wav\ttracks/a.txt"],
               tracks={"tracks/a.txt": "0.0,0.1\t3\n0.1,0.2\tnone\n0.2,0.4\t5\n"})
    labels, _ = data.read_metadata(root, "note", "read_multi_metadata")
    assert labels["data/a.wav"] == [(0.0, 0.1, 3), (0.1, 0.2, None), (0.2, 0.4, 5)]
    hop, sr = 64, 16000  # frame t is centred at t·4 ms
    per_frame = data.frame_labels(labels["data/a.wav"], 126, hop, sr)
    centres = np.arange(126) * hop / sr
    assert (per_frame[centres < 0.1] == 3).all()
    assert (per_frame[(centres >= 0.1) & (centres < 0.2)] == MISSING).all()
    assert (per_frame[(centres >= 0.2) & (centres < 0.4)] == 5).all()
    assert (per_frame[centres >= 0.4] == MISSING).all()  # after the last segment: unlabelled
    floats = data.frame_labels([(0.0, 0.1, 2.5)], 40, hop, sr, "float")
    assert floats[0] == 2.5 and np.isnan(floats[-1])


def test_file_absent_from_metadata_is_unlabelled(tmp_path, capsys):
    root = make_dataset(tmp_path)
    write_task(root, "inst", ["data/a.wav\t1"])
    files, metadata = data.scan_dataset(root, None, {"inst": {"name": "read_single_metadata", "type": "int"}})
    frames = data.FrameSet(root, files, metadata, {"inst": {"type": "int"}}, TRANSFORM, progress=False)
    per_file = [frames.labels["inst"][frames.file_frames(i)] for i in range(len(frames.files))]
    assert (per_file[frames.files.index("data/a.wav")] == 1).all()
    assert (per_file[frames.files.index("data/sub/b.wav")] == MISSING).all()


@pytest.mark.parametrize("lines, tracks, pattern", [
    (["data/a.wav 1"], None, r"metadata.txt:1: expected"),                       # no tab
    (["data/a.wav\t1", "data/sub/b.wav\tone"], None, r"metadata.txt:2: 'one' is not an int"),
    (["data/a.wav\t1", "data/missing.wav\t1"], None, r"metadata.txt:2: audio file 'data/missing.wav' not found"),
    (["data/a.wav\t1", "data/a.wav\t2"], None, r"metadata.txt:2: 'data/a.wav' already"),
    (["data/a.wav\ttracks/a.txt"], {"tracks/a.txt": "0.0;0.5\t1\n"}, r"a.txt:1: expected 'onset,offset"),
    (["data/a.wav\ttracks/a.txt"], {"tracks/a.txt": "0.0,0.5\t1\n0.5,x\t2\n"}, r"a.txt:2: onset/offset"),
    (["data/a.wav\ttracks/a.txt"], {"tracks/a.txt": "0.5,0.1\t1\n"}, r"a.txt:1: need 0 <= onset <= offset"),
    (["data/a.wav\ttracks/nope.txt"], None, r"metadata.txt:1: track file 'tracks/nope.txt' not found"),
])
def test_malformed_metadata_names_file_and_line(tmp_path, lines, tracks, pattern):
    root = make_dataset(tmp_path)
    write_task(root, "t", lines, tracks=tracks)
    callback = "read_multi_metadata" if tracks or "tracks/" in lines[0] else "read_single_metadata"
    with pytest.raises(data.MetadataError, match=pattern):
        data.read_metadata(root, "t", callback)


def test_classes_txt_that_disagrees_with_labels_is_an_error(tmp_path):
    root = make_dataset(tmp_path)
    write_task(root, "inst", ["data/a.wav\t0", "data/sub/b.wav\t7"], classes={0: "violin", 1: "cello"})
    with pytest.raises(data.MetadataError, match=r"metadata.txt:2: label 7 is not a class id"):
        data.read_metadata(root, "inst")


def test_label_outside_dim_is_an_error(tmp_path):
    root = make_dataset(tmp_path)
    write_task(root, "inst", ["data/a.wav\t0", "data/sub/b.wav\t12"])
    _, metadata = data.scan_dataset(root, None, {"inst": {"name": "read_single_metadata", "type": "int"}})
    with pytest.raises(data.MetadataError, match=r"label 12 of 'data/sub/b.wav' is outside 0..3"):
        data.check_label_ranges(metadata, {"inst": 4})


def test_errors_list_collects_every_problem_at_once(tmp_path):
    root = make_dataset(tmp_path)
    write_task(root, "inst", ["data/a.wav\tx", "data/missing.wav\t1", "data/sub/b.wav\t2"])
    errors = []
    labels, _ = data.read_metadata(root, "inst", errors=errors)
    assert len(errors) == 2 and ":1:" in errors[0] and ":2:" in errors[1]
    assert labels == {"data/sub/b.wav": 2}


def test_bad_audio_files_are_skipped_with_a_warning_naming_them(tmp_path):
    root = make_dataset(tmp_path)
    (root / "data" / "broken.wav").write_bytes(b"RIFF....garbage")
    sf.write(root / "data" / "short.wav", tone(0.005), 16000)  # 80 samples < n_fft 256
    files, metadata = data.scan_dataset(root)
    warnings = []
    frames = data.FrameSet(root, files, metadata, {}, TRANSFORM, progress=False, warn=warnings.append)
    assert sorted(frames.skipped) == ["data/broken.wav", "data/short.wav"]
    assert any("broken.wav" in w for w in warnings) and any("shorter than one window" in w for w in warnings)
    assert len(frames.files) == 3 and len(frames) == 3 * (8000 // 64 + 1)


def test_empty_data_folder_is_a_clear_error(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(data.UserError, match="no audio files"):
        data.scan_dataset(tmp_path)
    with pytest.raises(data.UserError, match="not a dataset folder"):
        data.scan_dataset(tmp_path / "nowhere")


def test_spectra_cache_is_keyed_by_the_transform(tmp_path):
    root = make_dataset(tmp_path, files=("a.wav",))
    cache = tmp_path / "cache"
    first = data.file_magnitude(root / "data/a.wav", TRANSFORM, cache)
    assert first.shape == (8000 // 64 + 1, 129)
    other = dict(TRANSFORM, n_fft=512, hop=128)
    second = data.file_magnitude(root / "data/a.wav", other, cache)
    assert second.shape == (8000 // 128 + 1, 257)  # a new n_fft never reuses the stale cache
    assert len(list(cache.iterdir())) == 2
    again = data.file_magnitude(root / "data/a.wav", TRANSFORM, cache)
    np.testing.assert_array_equal(first, again)


def test_split_is_seeded_by_file_and_never_empty():
    files = [f"data/{i}.wav" for i in range(20)]
    train, valid = data.split_files(files, 0.1, seed=3)
    assert (train, valid) == data.split_files(files, 0.1, seed=3)
    assert len(valid) == 2 and not set(train) & set(valid) and sorted(train + valid) == sorted(files)
    assert data.split_files(files, 0.1, seed=4) != (train, valid)
    assert len(data.split_files(files[:2], 0.1, 0)[1]) == 1
    assert len(data.split_files(files[:10], 0.1, 0)[1]) == 2  # never a single validation file from four on
    assert data.split_files(files[:1], 0.1, 0) == (files[:1], [])


def test_new_version_dirs_never_overwrite(tmp_path):
    a, b = data.new_version_dir(tmp_path / "run"), data.new_version_dir(tmp_path / "run")
    assert (a.name, b.name) == ("version_0", "version_1")
    assert data.find_run_version(tmp_path / "run") == b
    assert data.find_run_version(tmp_path / "run", 0) == a
    with pytest.raises(data.UserError, match="version_5"):
        data.find_run_version(tmp_path / "run", 5)


def test_metadata_with_a_byte_order_mark_or_windows_line_ends_reads_as_usual(tmp_path):
    root = make_dataset(tmp_path)
    task_dir = write_task(root, "pitch", [], classes={0: "C", 1: "D"}, tracks={"tracks/b.txt": ""})
    (task_dir / "metadata.txt").write_bytes("\ufeffdata/a.wav\t1\r\ndata/sub/b.wav\tnone\r\n".encode("utf-8"))
    (task_dir / "classes.txt").write_bytes("\ufeff0\tC\r\n1\tD\r\n".encode("utf-8"))
    (task_dir / "tracks" / "b.txt").write_bytes("\ufeff0.0,0.2\tD\r\n".encode("utf-8"))
    labels, classes = data.read_metadata(root, "pitch")
    assert classes == {0: "C", 1: "D"}
    assert labels == {"data/a.wav": 1, "data/sub/b.wav": None}
    assert data.read_track(task_dir / "tracks" / "b.txt", "int", {"C": 0, "D": 1}) == [(0.0, 0.2, 1)]


@pytest.mark.parametrize("name", ["metadata.txt", "classes.txt", "tracks/b.txt"])
def test_metadata_that_is_not_utf8_names_the_file_and_line(tmp_path, name):
    root = make_dataset(tmp_path)
    task_dir = write_task(root, "pitch", ["data/a.wav\ttracks/a.txt", "data/sub/b.wav\ttracks/b.txt"],
                          classes={0: "C", 1: "D"}, tracks={"tracks/a.txt": "0.0,0.1\t0\n",
                                                            "tracks/b.txt": "0.0,0.2\t1\n"})
    text = (task_dir / name).read_bytes()
    (task_dir / name).write_bytes(text + "# r\xe9sum\xe9\n".encode("latin-1"))  # one Latin-1 line at the end
    lineno = len(text.splitlines()) + 1
    with pytest.raises(data.MetadataError, match=rf"{name}:{lineno}: not UTF-8"):
        data.read_metadata(root, "pitch", "read_multi_metadata")


def test_a_pitch_shift_moves_the_partials_as_resampling_the_audio_does():
    sr, n_fft = 16000, 1024
    t = np.arange(sr) / sr
    note = lambda f0: sum(np.sin(2 * np.pi * h * f0 * t) / h for h in range(1, 6))  # noqa: E731
    frame = lambda f0: data.magnitude(torch.from_numpy(note(f0)).float(), n_fft, 256)[:, 8]  # noqa: E731
    semitones = torch.tensor([2, -1, 0])
    shifted = data.pitch_shift_frames(torch.stack([frame(440.0)] * 3), semitones)  # (3, bins)
    for row, s in zip(shifted, semitones.tolist()):
        resampled = frame(440.0 * 2 ** (s / 12))  # the same note played s semitones higher
        peaks = lambda m: sorted(torch.topk(m, 5).indices.tolist())  # noqa: E731
        assert all(abs(a - b) <= 1 for a, b in zip(peaks(row), peaks(resampled))), (s, peaks(row), peaks(resampled))
        assert torch.nn.functional.cosine_similarity(row, resampled, dim=0) > 0.9
    assert torch.equal(shifted[2], frame(440.0))  # 0 semitones: the frame itself


def test_pitch_and_octave_labels_follow_a_pitch_shift():
    labels = {"pitch": torch.tensor([11, 0, 0, -1, 5]), "octave": torch.tensor([3, 0, 7, -1, -1]),
              "instrument": torch.tensor([1, 2, 3, 4, 5])}
    out = data.shift_pitch_labels(labels, torch.tensor([1, -1, 12, 2, 2]), {"pitch": 12, "octave": 8})
    assert out["pitch"].tolist() == [0, 11, 0, -1, 7]  # B3 -> C4; C0 -> B-1; unknown stays unknown
    assert out["octave"].tolist() == [4, -1, -1, -1, -1]  # out of 0..7 (or unknown before): unknown
    assert torch.equal(out["instrument"], labels["instrument"])
    augmented, moved = data.augment_frames(torch.rand(64, 33), labels | {"pitch": torch.zeros(64, dtype=torch.long),
                                                                         "octave": torch.full((64,), 4)},
                                           {"pitch": 12, "octave": 8}, pitch_p=1.0, pitch_range=2, gain_std=0.0)
    midi = moved["octave"] * 12 + moved["pitch"]
    assert set((midi - 48).tolist()) <= {-2, -1, 1, 2} and len(set(midi.tolist())) > 1
