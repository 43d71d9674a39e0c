"""Helpers shared by the tests and tests/benchmark.py: small synthetic data made on the spot, the
nn~-like host that plays exported files, fake runs and latent datasets. Fixtures live in conftest.py;
no test module imports another."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import models  # noqa: E402
import train_vae  # noqa: E402

TWO_PI = 2.0 * math.pi

# A fast transform for tests: 16 kHz, 256-point windows (and the CPU, whatever the machine has)
FAST = ["data.transform.sr=16000", "data.transform.n_fft=256", "data.transform.hop=64", "train.device=cpu"]
SR, N_FFT, HOP = 16000, 256, 64  # what FAST sets


def run_script(*args, cwd=ROOT):
    """Run one of the project's scripts in a subprocess: (returncode, stdout, stderr)."""
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=600)
    return proc.returncode, proc.stdout, proc.stderr


# ---- signals ----------------------------------------------------------------------------------


def phase_test_signal(sr=44100, seconds=3.0, kind="mix", fade_seconds=0.05):
    """Synthetic test material: 'tone' (harmonic, 220 Hz, 5.5 Hz vibrato ±3 %), 'chirp'
    (exponential 100 Hz -> 8 kHz) or 'mix' (their sum), with raised-cosine fades in and out.
    Returns (samples,) float32 in [−1, 1].

    The fades matter for the measurement: with abrupt ends, the reflect-padded edge frames of
    `stft` (a partial and its mirror image interfering) are reconstructed at ~−4 dB whatever the
    method, which alone caps the SC of a 1 s signal near −20 dB (PGHI interior frames: −50 dB)."""
    t = np.arange(int(sr * seconds)) / sr
    out = np.zeros_like(t)
    if kind in ("tone", "mix"):
        f0 = 220.0 * (1.0 + 0.03 * np.sin(TWO_PI * 5.5 * t))
        phase0 = TWO_PI * np.cumsum(f0) / sr
        for h in range(1, 16):
            if h * 220.0 * 1.03 < sr / 2:
                out += np.sin(h * phase0 + 0.3 * h) / h
    if kind in ("chirp", "mix"):
        f_start, f_end = 100.0, 8000.0
        rate = math.log(f_end / f_start) / seconds
        out += 0.7 * np.sin(TWO_PI * f_start * (np.exp(rate * t) - 1.0) / rate)
    n_fade = int(fade_seconds * sr)
    if n_fade > 0:
        ramp = 0.5 - 0.5 * np.cos(np.pi * np.arange(n_fade) / n_fade)
        out[:n_fade] *= ramp
        out[-n_fade:] *= ramp[::-1]
    out /= np.abs(out).max() + 1e-9
    return torch.from_numpy(0.9 * out).float()


# ---- nn~ ---------------------------------------------------------------------------------------


class NnHost:
    """What nn~ does with a .ts file (see REFERENCE §3 and nn_tilde's backend)."""

    def __init__(self, path, phase_mode=None):
        self.model = torch.jit.load(str(path))
        self.params = {m: [int(v) for v in getattr(self.model, f"{m}_params")] for m in self.model.get_methods()}
        if phase_mode is not None:
            assert self.model.set_phase_mode(phase_mode) == 0

    def perform(self, method, signals, finite=True):
        """One nn~ buffer: full-rate signals (batch, in_channels, B) -> full-rate outputs (batch, out_channels, B).
        finite=False: leave the output's finiteness to the caller (tests of bad input)."""
        in_ch, in_ratio, out_ch, out_ratio = self.params[method]
        batch, channels, size = signals.shape
        assert channels == in_ch and size % in_ratio == 0
        x = signals.reshape(batch, in_ch, size // in_ratio, in_ratio)[..., -1]  # decimation
        with torch.no_grad():
            y = getattr(self.model, method)(x.contiguous())
        assert y.shape == (batch, out_ch, size // out_ratio), (method, y.shape)
        assert y.dtype == torch.float32 and (not finite or torch.isfinite(y).all())
        return y.repeat_interleave(out_ratio, dim=2)  # sample-and-hold

    def stream(self, method, signals, buffer):
        """Feed `signals` (batch, in_channels, samples) buffer by buffer; concatenated outputs."""
        return torch.cat([self.perform(method, signals[..., i:i + buffer])
                          for i in range(0, signals.shape[-1], buffer)], dim=-1)


def make_run(root, conditioning=None, prediction=None, hop=HOP, name="fake", version=0, seed=0):
    """A run folder (config.yaml + last.pt) holding an untrained model, as train_vae.py writes it."""
    _, config = train_vae.parse_args(["--config", "dgt_mid", f"name={name}", f"rundir={root}", *FAST,
                                      f"data.transform.hop={hop}", "model.encoder_hidden=[64]",
                                      "model.decoder_hidden=[64]"])
    config["model"]["conditioning"] = conditioning or {}
    config["model"]["prediction"] = prediction or {}
    torch.manual_seed(seed)
    model = models.build_vae(config)
    model.norm_offset.fill_(0.0)
    model.norm_scale.fill_(2.0)
    run_dir = root / name / f"version_{version}"
    run_dir.mkdir(parents=True)
    data.write_yaml_atomic(run_dir / "config.yaml", config)
    data.save_checkpoint(run_dir / "last.pt", {"model": model.state_dict(), "config": config, "step": 0})
    return run_dir, model


# ---- priors -------------------------------------------------------------------------------------

TINY_PRIOR = ["model.dim=32", "model.layers=2", "model.heads=2", "model.ffn_dim=64", "model.context=16",
              "model.encoder_layers=1", "model.dropout=0.0", "data.crop=24", "train.batch_size=16",
              "train.warmup_steps=20", "train.log_every=50", "train.num_threads=2", "train.device=cpu",
              "train.listen_seconds=0.25"]


def write_latent_db(root, n_files=6, frames=300, n_streams=3, resolution=16, features=False, seed=0,
                    ratio=64, sample_rate=16000):
    """A dataset as preprocess.py writes it, with learnable structure: stream 0 counts up by one per
    frame (10 % of frames jump at random), stream q repeats stream 0 shifted by 3q inside the
    frame. With features, stream 0 steps by 1 or 5 at random (no jumps) and feature column 0 of
    a frame says which: only a model that reads the features can predict it."""
    rng = np.random.default_rng(seed)
    (root / "tokens").mkdir(parents=True)
    if features:
        (root / "features").mkdir()
    files = []
    for i in range(n_files):
        step = rng.choice([1, 5], size=frames) if features else np.ones(frames, dtype=np.int64)
        first = np.zeros(frames, dtype=np.int64)
        first[0] = rng.integers(resolution)
        for t in range(1, frames):
            first[t] = (first[t - 1] + step[t]) % resolution
            if not features and rng.random() < 0.1:
                first[t] = rng.integers(resolution)
        tokens = np.stack([(first + 3 * q) % resolution for q in range(n_streams)], axis=1)
        key = f"file_{i:03d}"
        np.save(root / "tokens" / f"{key}.npy", tokens.astype(np.int16))
        if features:
            feats = np.stack([step.astype(np.float32), rng.normal(size=frames).astype(np.float32)], axis=1)
            np.save(root / "features" / f"{key}.npy", feats)
        files.append({"file": f"{key}.wav", "key": key, "frames": frames})
    index = {"format": data.LATENT_FORMAT,
             "model": {"path": "stub.ts", "sha256": "", "sample_rate": sample_rate, "ratio": ratio,
                       "latent_dim": n_streams},
             "discrete": False, "quantizer": "normal_cdf", "resolution": resolution,
             "features": ["step", "noise"] if features else [], "num_secs": 16.0, "files": files}
    (root / "index.json").write_text(json.dumps(index))
    return root
