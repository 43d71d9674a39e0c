"""generate.py: reconstruct and trajectories write the expected files; clear errors."""
import shutil

import numpy as np
import pytest
import soundfile as sf

import generate
from data import UserError
import train_vae
from helpers import FAST, run_script


@pytest.fixture(scope="module")
def run_dir(demo_root, tmp_path_factory):
    rundir = tmp_path_factory.mktemp("gen_runs")
    return train_vae.main(["--config-name", "dgt_pitch_prediction", "name=g", f"rundir={rundir}",
                           f"+data.dataset.root={demo_root}", *FAST, "train.max_steps=30", "train.val_every=30"])


def test_reconstruct_files_and_folders_without_collisions(run_dir, demo_root, tmp_path):
    out = tmp_path / "out"
    single = tmp_path / "note_00.wav"  # same name as a file inside the folder below
    shutil.copy(demo_root / "data/soft/note_00.wav", single)
    generate.main(["reconstruct", str(run_dir.parent), "--files", str(demo_root / "data"), str(single),
                   "--out", str(out), "--sr", "22050"])
    written = sorted(p.relative_to(out / "reconstructions").as_posix() for p in out.rglob("*.wav"))
    assert len(written) == 10
    assert "data/soft/note_00.wav" in written and "note_00.wav" in written
    audio, sr = sf.read(out / "reconstructions/data/soft/note_00.wav")
    original, original_sr = sf.read(demo_root / "data/soft/note_00.wav")
    assert sr == 22050 and abs(len(audio) / sr - len(original) / original_sr) < 0.01  # resampled, same length
    assert np.abs(audio).max() <= 1.0 and np.isfinite(audio).all() and np.abs(audio).max() > 1e-4


def test_reconstruct_skips_an_unreadable_file_and_does_the_others(run_dir, demo_root, tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"nothing")
    code, out, err = run_script("generate.py", "reconstruct", run_dir, "--files", bad,
                                demo_root / "data/soft/note_00.wav", "--out", tmp_path / "o", "--phase", "rtpghi")
    assert code == 0, err
    assert "bad.wav" in err and "Traceback" not in err
    assert (tmp_path / "o/reconstructions/note_00.wav").exists()


@pytest.mark.parametrize("phase", ["griffin_lim", "random"])
def test_reconstruct_with_forced_label_and_other_phases(run_dir, demo_root, tmp_path, phase):
    generate.main(["reconstruct", str(run_dir / "best.pt"), "--files", str(demo_root / "data/soft/note_00.wav"),
                   "--out", str(tmp_path), "--phase", phase, "--iters", "4", "--label", "pitch=E",
                   "--label", "octave=4", "--temperature", "0.5"])
    assert (tmp_path / "reconstructions/note_00.wav").exists()


def test_trajectories_write_audio_and_latent_paths(run_dir, tmp_path):
    generate.main(["trajectories", str(run_dir.parent), "-v", "0", "--trajectories", "sin", "square", "line",
                   "ellipse", "random", "-b", "2", "-s", "40", "--out", str(tmp_path), "--phase", "rtpghi"])
    for kind in generate.TRAJECTORIES:
        for i in range(2):
            audio, sr = sf.read(tmp_path / f"trajectories/{kind}_{i}.wav")
            z = np.load(tmp_path / f"trajectories/{kind}_{i}.npy")
            assert sr == 16000 and z.shape == (40, 8)
            assert len(audio) == 39 * 64 and np.abs(audio).max() <= 1.0
    square = np.load(tmp_path / "trajectories/square_0.npy")
    assert len(np.unique(np.abs(square[:, 0]).round(5))) == 1  # a square wave has one amplitude per dimension


def test_trajectory_shapes_and_random_walk_step():
    import torch
    g = torch.Generator().manual_seed(0)
    walk = generate.trajectory("random", 2000, 4, g)
    assert walk.shape == (2000, 4)
    assert abs(walk.diff(dim=0).std().item() - 0.2) < 0.01
    line = generate.trajectory("line", 5, 3, g)
    torch.testing.assert_close(line[2], (line[0] + line[4]) / 2)


@pytest.mark.slow
def test_clear_errors(run_dir, tmp_path):
    cases = [
        (["trajectories", run_dir, "--trajectories", "spiral"], "unknown trajectory type 'spiral'"),
        (["reconstruct", tmp_path / "nope", "--files", "x.wav"], "no such run folder"),
        (["reconstruct", run_dir, "-n", "epoch3", "--files", "x.wav"], "epoch3.pt: no such checkpoint"),
        (["trajectories", run_dir, "--label", "color=1"], "not conditioned on 'color'"),
        (["trajectories", run_dir, "--label", "pitch=H"], "neither a class id nor a name"),
    ]
    for argv, message in cases:
        code, _, err = run_script("generate.py", *argv, "--out", tmp_path)
        assert code == 2 and message in err and "Traceback" not in err, (argv, err)


def test_decoder_task_without_predictor_needs_a_label(demo_root, tmp_path):
    run = train_vae.main(["--config-name", "dgt_pitch_cond", f"rundir={tmp_path}", f"+data.dataset.root={demo_root}",
                          *FAST, "train.max_steps=2", "train.val_every=2"])
    code, _, err = run_script("generate.py", "trajectories", run, "--out", tmp_path)
    assert code == 2 and "--label pitch=VALUE" in err
    generate.main(["trajectories", str(run), "--label", "pitch=0", "--label", "octave=3", "-s", "8",
                   "--out", str(tmp_path), "--phase", "random"])
    assert (tmp_path / "trajectories/line_0.wav").exists()


def test_reconstruct_skips_a_file_shorter_than_one_window_and_does_the_others(run_dir, demo_root, tmp_path):
    """Before, a folder whose first file was shorter than n_fft stopped on a torch.stft traceback."""
    folder = tmp_path / "in"
    folder.mkdir()
    sf.write(folder / "a_short.wav", np.zeros(100, dtype=np.float32), 16000)  # < n_fft (256)
    shutil.copy(demo_root / "data" / "bright" / "note_01.wav", folder / "b.wav")
    code, out, err = run_script("generate.py", "reconstruct", run_dir, "--files", folder, "--out", tmp_path / "out")
    assert code == 0 and "a_short.wav: shorter than one window" in err and "Traceback" not in err, err
    assert (tmp_path / "out" / "reconstructions" / "in" / "b.wav").exists()


def test_nothing_an_earlier_run_wrote_is_replaced_without_force(run_dir, demo_root, tmp_path):
    note = demo_root / "data" / "bright" / "note_01.wav"
    args = ["reconstruct", str(run_dir), "--files", str(note), "--out", str(tmp_path)]
    generate.main(args)
    target = tmp_path / "reconstructions" / "note_01.wav"
    first = target.stat().st_mtime_ns
    with pytest.raises(UserError, match="note_01.wav already exists: pass --force"):
        generate.main(args)
    assert target.stat().st_mtime_ns == first
    generate.main(args + ["--force"])
    traj = ["trajectories", str(run_dir), "-s", "8", "--out", str(tmp_path)]
    generate.main(traj)
    with pytest.raises(UserError, match="line_0.wav already exists .and 1 more."):
        generate.main(traj)


def test_a_walk_from_one_class_to_another(run_dir, tmp_path):
    generate.main(["trajectories", str(run_dir), "--from-class", "pitch=C", "--to-class", "octave=4", "-s", "30",
                   "--out", str(tmp_path), "--phase", "rtpghi"])
    z = np.load(tmp_path / "trajectories/class_pitch-C_to_octave-4.npy")
    audio, sr = sf.read(tmp_path / "trajectories/class_pitch-C_to_octave-4.wav")
    assert z.shape == (30, 8) and len(audio) == 29 * 64 and not np.allclose(z[0], z[-1])
    with pytest.raises(UserError, match="no training frame of class 'X'"):
        generate.main(["trajectories", str(run_dir), "--from-class", "pitch=X", "--to-class", "pitch=C",
                       "--out", str(tmp_path / "b")])
