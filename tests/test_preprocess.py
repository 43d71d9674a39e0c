"""preprocess.py: audio folder -> latent/token dataset, through a script.py export and RAVE-like stubs.

The stubs are small TorchScript modules built here with what a RAVE export exposes (`encode`,
`encode_params`, `sr`; a discrete RAVE returns its codes as floats from a DiscreteEncoder).
"""
import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn as nn

import data
import models
import preprocess
import script
from helpers import make_run, run_script

SR = 16000
RATIO, N_LATENT = 2048, 16


class RaveLike(nn.Module):
    """A stateless continuous encoder: a fixed random projection of each `ratio`-sample block."""

    def __init__(self, ratio: int = RATIO, latents: int = N_LATENT, sr: int = SR, declared_ratio: int = 0):
        super().__init__()
        self.sr = sr
        self.ratio = ratio
        self.register_buffer("encode_params", torch.tensor([1, 1, latents, declared_ratio or ratio]))
        generator = torch.Generator().manual_seed(0)
        self.register_buffer("projection", torch.randn(latents, ratio, generator=generator) * (4.0 / math.sqrt(ratio)))

    @torch.jit.export
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        blocks = x.reshape(x.size(0), -1, self.ratio)  # (batch, frames, ratio)
        return (blocks @ self.projection.t()).transpose(1, 2)  # (batch, latents, frames)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x)


class IntCodes(nn.Module):
    """A discrete encoder returning int64 codes (batch, 4, frames), exposing no codebook size."""

    def __init__(self):
        super().__init__()
        self.sr = SR
        self.register_buffer("encode_params", torch.tensor([1, 1, 4, 1024]))

    @torch.jit.export
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        blocks = x.reshape(x.size(0), -1, 1024)
        level = (blocks.abs().mean(-1) * 100).long() % 50  # (batch, frames)
        return torch.stack([level, level + 1, level * 2, torch.zeros_like(level)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x)


class Codebook(nn.Module):
    def __init__(self):
        super().__init__()
        self.codebook_size = 256


class Rvq(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Codebook(), Codebook()])


class DiscreteEncoder(nn.Module):  # the class name a RAVE discrete export's encoder has
    def __init__(self):
        super().__init__()
        self.rvq = Rvq()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = x.reshape(x.size(0), -1, 1024)
        level = (blocks.abs().mean(-1) * 1000).long() % 256
        return torch.stack([level, 255 - level], dim=1).float()  # RAVE returns codes as floats


class RaveDiscrete(nn.Module):
    def __init__(self):
        super().__init__()
        self.sr = SR
        self.encoder = DiscreteEncoder()
        self.register_buffer("encode_params", torch.tensor([1, 1, 2, 1024]))

    @torch.jit.export
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x)


class NoEncode(nn.Module):
    def __init__(self):
        super().__init__()
        self.sr = SR
        self.register_buffer("encode_params", torch.tensor([1, 1, 4, 1024]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def save_script(module, path):
    torch.jit.script(module).save(str(path))
    return path


def write_noise(path, seconds, sr=SR, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    audio = 0.3 * np.random.default_rng(seed).standard_normal(int(seconds * sr)).astype(np.float32)
    sf.write(path, audio, sr, subtype="FLOAT")
    return audio


def read_db(db):
    index = json.loads((db / "index.json").read_text())
    return index, {e["file"]: e for e in index["files"]}


@pytest.fixture(scope="module")
def rave_like(tmp_path_factory):
    return save_script(RaveLike(), tmp_path_factory.mktemp("stub") / "rave_like.ts")


# ---- through the VAE export ------------------------------------------------------------------


def test_vae_export_dataset(demo_root, tmp_path):
    make_run(tmp_path)
    ts = script.export(tmp_path / "fake", verbose=False)
    db = tmp_path / "db"
    preprocess.main(["--audio", str(demo_root / "data"), "--out_path", str(db), "--model", str(ts)])
    index, entries = read_db(db)
    module = torch.jit.load(str(ts))
    ratio = int(module.encode_params[3])
    assert index["format"] == 1 and index["discrete"] is False and index["quantizer"] == "normal_cdf"
    assert index["resolution"] == 64 and index["features"] == [] and index["num_secs"] == 16.0
    assert index["model"] == {"path": str(ts.resolve()), "sha256": data.file_sha256(ts),
                              "sample_rate": SR, "ratio": ratio, "latent_dim": 8}
    audio_files = sorted(p.relative_to(demo_root / "data").as_posix() for p in (demo_root / "data").rglob("*.wav"))
    assert sorted(entries) == audio_files and len(entries) == 9
    assert len({e["key"] for e in index["files"]}) == 9
    for rel, entry in entries.items():
        samples = sf.info(str(demo_root / "data" / rel)).frames
        assert entry["frames"] == math.ceil(samples / ratio)
        z = np.load(db / "latents" / f"{entry['key']}.npy")
        tokens = np.load(db / "tokens" / f"{entry['key']}.npy")
        assert z.dtype == np.float32 and z.shape == (entry["frames"], 8)  # latent channels only
        assert tokens.dtype == np.int16 and tokens.shape == z.shape
        assert tokens.min() >= 0 and tokens.max() < 64
        assert np.array_equal(tokens, models.quantize_latents(torch.from_numpy(z), 64).numpy())
        assert z.std() > 0  # real latents, not padding
    # the model's latency is compensated: frame t comes from the STFT frame centred at t·hop
    rel = audio_files[0]
    audio = torch.from_numpy(sf.read(str(demo_root / "data" / rel), dtype="float32")[0])
    n = math.ceil(audio.shape[0] / ratio) * ratio
    with torch.no_grad():
        direct = module.encode(torch.nn.functional.pad(audio, (0, n + ratio - audio.shape[0])).view(1, 1, -1))
    expected = direct[0, :8, 1:].t().numpy()
    assert np.allclose(np.load(db / "latents" / f"{entries[rel]['key']}.npy"), expected, atol=1e-5)


# ---- RAVE-like stubs -------------------------------------------------------------------------


def test_chunks_and_tail_do_not_change_latents(rave_like, tmp_path):
    audio_dir = tmp_path / "audio"
    # 0.4 s chunks = 3 frames of 2048: every file spans several chunks and ends with a partial frame
    lengths = {"a.wav": 5 * RATIO * 3 + 100, "sub/b c.wav": 7 * RATIO + 1, "short.wav": 300}
    signals = {}
    for i, (name, n) in enumerate(lengths.items()):
        signals[name] = write_noise(audio_dir / name, n / SR, seed=i)
    db = tmp_path / "db"
    preprocess.main(["--audio", str(audio_dir), "--out_path", str(db), "--rave", str(rave_like), "--num_secs", "0.4"])
    index, entries = read_db(db)
    assert index["model"]["ratio"] == RATIO and index["model"]["latent_dim"] == N_LATENT
    assert index["num_secs"] == 0.4 and entries["sub/b c.wav"]["key"] == "sub__b_c"
    stub = torch.jit.load(str(rave_like))
    for name, n in lengths.items():
        frames = math.ceil(n / RATIO)
        assert entries[name]["frames"] == frames  # the tail is kept
        padded = np.zeros(frames * RATIO, dtype=np.float32)
        padded[:n] = signals[name]
        with torch.no_grad():
            whole = stub.encode(torch.from_numpy(padded).view(1, 1, -1))[0].t().numpy()  # (frames, 16)
        z = np.load(db / "latents" / f"{entries[name]['key']}.npy")
        assert z.shape == (frames, N_LATENT)
        assert np.allclose(z, whole, atol=1e-5)
        assert np.array_equal(np.load(db / "tokens" / f"{entries[name]['key']}.npy"),
                              models.quantize_latents(torch.from_numpy(whole), 64).numpy())


def test_rerun_skips_adds_and_refuses_incompatible(rave_like, tmp_path):
    audio_dir, db = tmp_path / "audio", tmp_path / "db"
    write_noise(audio_dir / "a.wav", 0.5)
    args = ["--audio", str(audio_dir), "--out_path", str(db), "--model", str(rave_like), "--resolution", "32"]
    preprocess.main(args)
    first = (db / "tokens" / "a.npy").stat().st_mtime_ns
    write_noise(audio_dir / "b.wav", 0.7, seed=1)
    preprocess.main(args)
    index, entries = read_db(db)
    assert [e["file"] for e in index["files"]] == ["a.wav", "b.wav"]  # a once, b added
    assert (db / "tokens" / "a.npy").stat().st_mtime_ns == first  # not re-encoded
    assert np.load(db / "tokens" / "b.npy").max() < 32
    preprocess.main(args[:-2])  # no --resolution: the dataset's own is used
    with pytest.raises(preprocess.UserError, match="resolution 32"):
        preprocess.main(args[:-1] + ["64"])
    with pytest.raises(preprocess.UserError, match="features"):
        preprocess.main(args + ["--features", "loudness"])
    other = save_script(RaveLike(latents=8), tmp_path / "other.ts")
    with pytest.raises(preprocess.UserError, match="another model"):
        preprocess.main(["--audio", str(audio_dir), "--out_path", str(db), "--model", str(other)])
    assert read_db(db)[0] == index  # refusals leave the dataset as it was


def test_interrupted_run_keeps_what_it_encoded(rave_like, tmp_path, monkeypatch):
    audio_dir, db = tmp_path / "audio", tmp_path / "db"
    for i, name in enumerate(("a.wav", "b.wav", "c.wav")):
        write_noise(audio_dir / name, 0.3, seed=i)
    real_load, calls = preprocess.data.load_audio, []

    def load_then_interrupt(path, sr):  # Ctrl-C while reading the second file
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_load(path, sr)

    monkeypatch.setattr(preprocess.data, "load_audio", load_then_interrupt)
    args = ["--audio", str(audio_dir), "--out_path", str(db), "--model", str(rave_like)]
    with pytest.raises(KeyboardInterrupt):
        preprocess.main(args)
    assert [e["file"] for e in read_db(db)[0]["files"]] == ["a.wav"]
    monkeypatch.setattr(preprocess.data, "load_audio", real_load)
    preprocess.main(args)
    assert [e["file"] for e in read_db(db)[0]["files"]] == ["a.wav", "b.wav", "c.wav"]


def test_discrete_int_codes_stored_as_is(tmp_path, capsys):
    audio_dir, db = tmp_path / "audio", tmp_path / "db"
    signal = write_noise(audio_dir / "a.wav", 0.5)
    ts = save_script(IntCodes(), tmp_path / "codes.ts")
    preprocess.main(["--audio", str(audio_dir), "--out_path", str(db), "--model", str(ts)])
    index, entries = read_db(db)
    assert index["discrete"] is True and index["quantizer"] == "none"
    assert "largest code" in capsys.readouterr().err
    frames = math.ceil(len(signal) / 1024)
    padded = np.zeros(frames * 1024, dtype=np.float32)
    padded[:len(signal)] = signal
    with torch.no_grad():
        codes = torch.jit.load(str(ts)).encode(torch.from_numpy(padded).view(1, 1, -1))[0].t().numpy()
    tokens = np.load(db / "tokens" / "a.npy")
    assert tokens.dtype == np.int16 and np.array_equal(tokens, codes)
    assert index["resolution"] == codes.max() + 1
    assert not (db / "latents").exists()


def test_discrete_rave_float_codes_and_codebook(tmp_path):
    audio_dir, db = tmp_path / "audio", tmp_path / "db"
    write_noise(audio_dir / "a.wav", 0.5)
    ts = save_script(RaveDiscrete(), tmp_path / "discrete.ts")
    preprocess.main(["--audio", str(audio_dir), "--out_path", str(db), "--model", str(ts), "--resolution", "64"])
    index, _ = read_db(db)
    assert index["discrete"] is True and index["quantizer"] == "none"
    assert index["resolution"] == 256  # encoder.rvq.layers[0].codebook_size, not --resolution
    tokens = np.load(db / "tokens" / "a.npy")
    assert tokens.shape == (math.ceil(0.5 * SR / 1024), 2) and np.array_equal(tokens[:, 1], 255 - tokens[:, 0])


def test_quantize_round_trip():
    k = torch.arange(64)
    assert torch.equal(models.quantize_latents(models.dequantize_latents(k, 64), 64), k)
    z = torch.linspace(-2, 2, 1001)
    error = (models.dequantize_latents(models.quantize_latents(z, 64), 64) - z).abs()
    assert error.max() < 0.1  # bins are narrowest at 0 (~0.08 wide) and ~0.18 wide at ±2


def test_features_loudness_and_f0(rave_like, tmp_path):
    audio_dir, db = tmp_path / "audio", tmp_path / "db"
    t = np.arange(int(1.5 * SR)) / SR
    sine = (0.5 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)
    sine[: SR // 2] = 0.0  # half a second of silence first
    audio_dir.mkdir()
    sf.write(audio_dir / "tone.wav", sine, SR)
    preprocess.main(["--audio", str(audio_dir), "--out_path", str(db), "--model", str(rave_like),
                     "--features", "f0,loudness"])
    index, entries = read_db(db)
    assert index["features"] == ["loudness", "f0"]
    features = np.load(db / "features" / "tone.npy")
    frames = entries["tone.wav"]["frames"]
    assert features.dtype == np.float32 and features.shape == (frames, 2) and frames == math.ceil(len(sine) / RATIO)
    loudness, f0 = features[:, 0], features[:, 1]
    assert np.isfinite(loudness).all()
    assert loudness[0] == -100.0  # silence, floored
    assert abs(loudness[-2] - 20 * np.log10(0.5 / np.sqrt(2))) < 0.5  # a full block of the sine: -9 dB
    assert f0[0] == 0.0  # unvoiced
    voiced = f0 > 0
    assert voiced[5:].all()
    assert np.abs(1200 * np.log2(f0[voiced] / 440.0)).max() < 30  # cents


# ---- errors, in a subprocess as a user sees them ---------------------------------------------


def check_error(*args, match):
    code, out, err = run_script("preprocess.py", *args)
    assert code == 2, (out, err)
    assert "error:" in err and "Traceback" not in err, err
    assert match in err, err
    return err


@pytest.mark.slow
def test_clear_errors(rave_like, tmp_path):
    audio_dir, db = tmp_path / "audio", tmp_path / "db"
    write_noise(audio_dir / "a.wav", 0.2)
    common = ["--audio", audio_dir, "--out_path", db]
    check_error(*common, "--model", save_script(NoEncode(), tmp_path / "no_encode.ts"), match="no `encode` method")
    check_error(*common, "--model", save_script(RaveLike(declared_ratio=1000), tmp_path / "ratio.ts"),
                match="not a power of two")
    check_error(*common, "--model", tmp_path / "missing.ts", match="no such model file")
    (tmp_path / "empty").mkdir()
    check_error("--audio", tmp_path / "empty", "--out_path", db, "--model", rave_like, match="no audio files")
    assert not (db / "index.json").exists()


def test_unreadable_file_is_skipped(rave_like, tmp_path):
    audio_dir, db = tmp_path / "audio", tmp_path / "db"
    write_noise(audio_dir / "a.wav", 0.2)
    write_noise(audio_dir / "c.wav", 0.3)
    (audio_dir / "x.wav").write_bytes(b"this is not audio" * 10)
    code, out, err = run_script("preprocess.py", "--audio", audio_dir, "--out_path", db, "--model", rave_like)
    assert code == 0, err
    assert "warning" in err and "x.wav" in err and "skipped 1 unreadable" in err
    index, entries = read_db(db)
    assert sorted(entries) == ["a.wav", "c.wav"]


def test_pitch_shifted_copies_are_encoded_beside_each_file(demo_root, tmp_path):
    """--pitch_shifts=-1,2: each file also encoded played a semitone lower and two higher (resampled:
    longer and shorter), marked with its shift; rerunning skips them; other shifts are refused."""
    make_run(tmp_path)
    ts = script.export(tmp_path / "fake", verbose=False)
    db = tmp_path / "db"
    args = ["--audio", str(demo_root / "data"), "--out", str(db), "--model", str(ts), "--pitch_shifts=-1,2"]
    preprocess.main(args)
    index = json.loads((db / "index.json").read_text())
    assert index["shifts"] == [-1, 2] and len(index["files"]) == 27
    by_file = {}
    for entry in index["files"]:
        by_file.setdefault(entry["file"], {})[entry["shift"]] = entry["frames"]
    for frames in by_file.values():
        assert sorted(frames) == [-1, 0, 2]
        assert frames[-1] == pytest.approx(frames[0] * 2 ** (1 / 12), abs=2)  # a semitone lower lasts longer
        assert frames[2] == pytest.approx(frames[0] / 2 ** (2 / 12), abs=2)
    assert "encoded 0 new file(s)" in run_script("preprocess.py", *args)[1]
    code, _, err = run_script("preprocess.py", *args[:-1], "--pitch_shifts=1")
    assert code == 2 and "pitch shifts [-1, 2]" in err


def test_pitch_shift_means_pitch(tmp_path):
    t = torch.arange(SR) / SR
    tone = torch.sin(2 * math.pi * 440 * t)
    for semitones in (-2, 1):
        shifted = preprocess.pitch_shifted(tone, semitones, SR)
        spectrum = torch.fft.rfft(shifted[:8192] * torch.hann_window(8192)).abs()
        assert spectrum.argmax().item() * SR / 8192 == pytest.approx(440 * 2 ** (semitones / 12), rel=0.01)
