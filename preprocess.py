"""Encode an audio dataset into latent sequences for the prior (MSPrior's `preprocess`).

    python preprocess.py --audio /path/to/audio/folder --out /path/to/db --model /path/to/model.ts

(MSPrior's spellings `--out_path` and `--rave` are accepted for `--out` and `--model`.) Every audio file under --audio is read with
soundfile, mixed to mono, resampled to the model's rate and passed through the model's `encode`
method (batch 1, input (1, 1, samples)) in chunks of --num_secs seconds. The last chunk is kept:
it is zero-padded up to a multiple of the latent ratio, so a file of n samples gives exactly
ceil(n / ratio) latent frames. The model is any nn~-style TorchScript file with an `encode`
method: a RAVE export or this toolkit's `script.py` export.

Dataset written under --out (train_prior.py reads exactly this):

    index.json                  what the dataset holds (below), rewritten atomically as files are encoded
    latents/<key>.npy           float32 (frames, Q) continuous latents (continuous models only)
    tokens/<key>.npy            int16 (frames, Q) tokens in [0, resolution)
    features/<key>.npy          float32 (frames, F) conditioning features (with --features only)

    index.json = {"format": 1,
                  "model": {"path", "sha256", "sample_rate", "ratio", "latent_dim"},
                  "discrete": bool, "quantizer": "normal_cdf" | "none", "resolution": int,
                  "features": [] | ["loudness", "f0"], "shifts": [semitones], "num_secs": float,
                  "files": [{"file": <path relative to --audio>, "key": <npy name>, "frames": int,
                             "shift": 0 or the semitones of a pitch-shifted copy}, ...]}

--pitch_shifts -2,-1,1,2 also encodes every file resampled that many semitones up or down (pitch and
duration change together, as a tape played faster or slower): five times the sequences for a prior
to learn from on a small dataset. train_prior.py splits by file, trains on every copy of its training
files and validates on the original validation files only.

Continuous latents are quantized with models.quantize_latents (k = floor(Φ(z/2)·N), N =
--resolution); the quantizer and the resolution are stored in the index, so training and export
read them from the dataset and cannot disagree. Discrete models' codes are stored as they are
(quantizer "none").

What is read from the model:
  - sample rate: its `sample_rate` attribute (script.py exports) or `sr` (RAVE); else --sr.
  - ratio: encode_params = [in_channels, in_ratio, out_channels, out_ratio]; in_ratio must be 1
    (audio in), out_ratio is the latent ratio and must be a power of two (as nn~ requires).
  - latent channels: those named latent_* in `encode_output_labels` when there are some (a
    script.py export also outputs pred_<task> channels, which are dropped); else all out_channels.
  - discrete or continuous: discrete if the module has a truthy `is_discrete` attribute, if the
    TorchScript class name of the module or of its `encoder` contains "Discrete" (a RAVE export of
    a discrete model is a DiscreteScriptedRAVE whose encoder is a DiscreteEncoder; this is also how
    MSPrior tells them apart), or if `encode` returns an integer tensor. RAVE returns its codes as
    floats (z.float()): they are rounded and must be non-negative integers.
  - codebook size of a discrete model (its resolution): the first of the attributes `n_codes`,
    `codebook_size`, `quantizer.n_codes` (older RAVE exports), `encoder.rvq.layers.0.codebook_size`
    (RAVE v2 exports); if none exists, the largest code seen + 1 (printed as such).
  - `get_latency("encode")` when the model has it (script.py exports): the latents are shifted by
    that many samples (rounded to frames) so that frame t describes samples [t·ratio, (t+1)·ratio).
Each file is encoded by a fresh copy of the loaded model, so a streaming model's state never
carries from one file to the next, and chunking never changes its latents.

Features (--features loudness,f0), one value per latent frame t, for the seq2seq prior:
  - loudness: RMS of samples [t·ratio, (t+1)·ratio) in dB, floored at -100 dB;
  - f0: torchcrepe (models.f0_at_frames, as extract_pitch.py; --crepe tiny by default) at the frame's centre,
    in Hz, 0 where unvoiced (crepe periodicity < 0.5 or frame level < -60 dB).

Re-running on the same --out adds new files and skips those already in the index; it refuses
when the model (its sha256), the resolution or the features differ from the index's, since the
dataset would mix incompatible sequences. An unreadable audio file is skipped with a warning and
listed at the end; the run goes on. Ctrl-C keeps everything encoded so far.
"""
import argparse
import copy
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchaudio
from tqdm import tqdm

import data
import models
from data import UserError

FEATURES = ("loudness", "f0")  # stored in this order, whatever the order given on the command line
LOUDNESS_FLOOR_DB = -100.0
CODEBOOK_ATTRIBUTES = ("n_codes", "codebook_size", "quantizer.n_codes", "encoder.rvq.layers.0.codebook_size")
INDEX_EVERY_S = 5.0  # index.json is rewritten at most this often while encoding (and always at the end)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--audio", required=True,
                   help="folder of audio files (searched recursively: wav, aif(f), flac, ogg, mp3), or one file")
    p.add_argument("--out", *data.spellings("--out_path"), "-o", dest="out", required=True,
                   help="dataset folder to create, or to extend if it already holds an index.json")
    p.add_argument("--model", "--rave", dest="model", required=True,
                   help="TorchScript model with an `encode` method (RAVE export or script.py export)")
    p.add_argument(*data.spellings("--num_secs"), type=float, default=None,
                   help="chunk length in seconds passed to encode at once (default 16; rounded down to a "
                        "multiple of the latent ratio). On an existing dataset, the index's value is kept")
    p.add_argument("--resolution", type=int, default=None,
                   help="number of quantization bins of continuous latents (default 64, or the existing "
                        "dataset's); ignored for discrete models, whose codebook size is used")
    p.add_argument(*data.spellings("--pitch_shifts"), default="",
                   help="comma-separated semitones, e.g. -2,-1,1,2: every file is also encoded played that many "
                        "semitones higher or lower (resampled), more sequences for the prior to learn from; "
                        "train_prior.py trains on them and validates on the originals only")
    p.add_argument("--features", default="",
                   help="comma-separated conditioning features per latent frame, for the seq2seq prior: "
                        "loudness (dB), f0 (Hz, 0 where unvoiced), e.g. --features loudness,f0")
    p.add_argument("--crepe", choices=["tiny", "full"], default="tiny",
                   help="torchcrepe model for the f0 feature (default tiny; full is ~25x slower on CPU)")
    p.add_argument("--sr", type=int, default=None,
                   help="the model's sample rate, only needed when the model exposes none "
                        "(no `sample_rate` or `sr` attribute)")
    p.add_argument("--device", default="cpu",
                   help="cpu (default: nn~ models are made to stream on a CPU, and script.py exports run "
                        "there only), auto (cuda if available), cuda, cuda:1...: for models whose encode "
                        "supports it, e.g. RAVE")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's default)")
    args = p.parse_args(argv)
    args.features = parse_features(args.features)
    args.pitch_shifts = parse_shifts(args.pitch_shifts)
    if args.num_secs is not None and not args.num_secs > 0:
        raise UserError(f"--num_secs must be a positive number of seconds, got {args.num_secs}")
    if args.resolution is not None and not 2 <= args.resolution <= 32767:
        raise UserError(f"--resolution must lie in 2..32767 (tokens are stored as int16), got {args.resolution}")
    if args.sr is not None and args.sr < 1:
        raise UserError(f"--sr must be a positive sample rate, got {args.sr}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be positive, got {args.threads}")
    return args


def parse_shifts(text):
    try:
        shifts = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise UserError(f"--pitch_shifts takes whole semitones separated by commas (e.g. -2,-1,1,2), got {text!r}") from None
    if 0 in shifts or any(abs(s) > 12 for s in shifts):
        raise UserError(f"--pitch_shifts: each shift must be a non-zero number of semitones up to 12, got {text!r}")
    return shifts


def parse_features(text):
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in FEATURES]
    if unknown:
        raise UserError(f"--features: unknown feature(s) {', '.join(unknown)} (available: {', '.join(FEATURES)})")
    return [name for name in FEATURES if name in names]


def dotted_attribute(module, name):
    """module.a.b.0.c, or None when any step is missing (ModuleList items are attributes '0', '1'...)."""
    obj = module
    for part in name.split("."):
        try:
            obj = getattr(obj, part)
        except (AttributeError, RuntimeError):
            return None
    return obj


# ----------------------------------------------------------------------------------------------
# The model


class Encoder:
    """A loaded TorchScript model and what preprocessing needs to know about it."""

    def __init__(self, path, sr=None, device="cpu"):
        path = Path(path)
        module = models.load_torchscript(path, device)
        if not hasattr(module, "encode"):
            raise UserError(f"{path}: the model has no `encode` method (methods: "
                            f"{', '.join(self._methods(module)) or 'none found'}); preprocessing needs an "
                            "encoder, e.g. a RAVE export or a script.py export")
        params = getattr(module, "encode_params", None)
        if not isinstance(params, torch.Tensor) or params.numel() != 4:
            raise UserError(f"{path}: the model has no `encode_params` buffer [in_channels, in_ratio, "
                            "out_channels, out_ratio], as nn~ models have")
        self.in_channels, in_ratio, self.out_channels, self.ratio = [int(v) for v in params.tolist()]
        if in_ratio != 1:
            raise UserError(f"{path}: encode takes an input at ratio {in_ratio}; preprocessing needs audio in "
                            "(in_ratio 1)")
        if not data.is_power_of_two(self.ratio):
            raise UserError(f"{path}: the latent ratio (encode_params[3]) is {self.ratio}, not a power of two "
                            "(nn~ needs power-of-two ratios)")
        if self.in_channels < 1 or self.out_channels < 1:
            raise UserError(f"{path}: encode_params {params.tolist()} declare no input or no output channel")

        model_sr = getattr(module, "sample_rate", None)
        if model_sr is None:
            model_sr = getattr(module, "sr", None)
        if model_sr is None:
            if sr is None:
                raise UserError(f"{path}: the model exposes no sample rate (no `sample_rate` or `sr` "
                                "attribute): pass it with --sr")
            model_sr = sr
        elif sr is not None and int(sr) != int(model_sr):
            raise UserError(f"--sr {sr} differs from the model's own sample rate {int(model_sr)} Hz")
        self.sample_rate = int(model_sr)

        labels = getattr(module, "encode_output_labels", None)
        latent = [i for i, name in enumerate(labels or []) if str(name).startswith("latent_")]
        self.channels = latent if latent else list(range(self.out_channels))
        self.latent_dim = len(self.channels)
        input_labels = list(getattr(module, "encode_input_labels", None) or [])
        # script.py exports take label signals after the audio (negative = unknown); other
        # multi-channel models (RAVE with n_channels > 1) get the mono mix on every channel
        self.label_inputs = bool(input_labels) and input_labels[0] == "audio"
        try:  # samples between encode's input and output streams (script.py exports say it)
            latency = int(module.get_latency("encode")) if hasattr(module, "get_latency") else 0
        except Exception:
            latency = 0
        self.delay_frames = max(0, int(round(latency / self.ratio)))

        self.path, self.module, self.device = path.resolve(), module, device
        self.sha256 = data.file_sha256(path)
        self.discrete = bool(getattr(module, "is_discrete", False)) or any(
            "Discrete" in str(getattr(m, "original_name", "")) for m in (module, getattr(module, "encoder", None)))
        probe = self._call(copy.deepcopy(module), torch.zeros(1, self.in_channels, 4 * self.ratio), "a silent input")
        if not probe.is_floating_point():
            self.discrete = True
        self.codebook_size = None
        if self.discrete:
            for name in CODEBOOK_ATTRIBUTES:
                value = dotted_attribute(module, name)
                if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                    self.codebook_size = value
                    break

    @staticmethod
    def _methods(module):
        try:
            return list(module.get_methods())
        except Exception:
            return [name for name in ("forward", "decode", "prior") if hasattr(module, name)]

    def _call(self, module, x, what):
        """encode one chunk: x (1, in_channels, L) -> (out_channels, L / ratio), checked."""
        try:
            with torch.no_grad():
                y = module.encode(x.to(self.device))
        except Exception as e:
            message = str(e).strip().splitlines()
            raise UserError(f"{self.path}: encode failed on {what} of shape "
                            f"{tuple(x.shape)} ({message[-1] if message else type(e).__name__})") from None
        expected = (1, self.out_channels, x.shape[-1] // self.ratio)
        if not isinstance(y, torch.Tensor) or tuple(y.shape) != expected:
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise UserError(f"encode answered {got} for an input {tuple(x.shape)}, expected {expected} "
                            f"(encode_params says {self.out_channels} channels at ratio {self.ratio})")
        return y[0].cpu()

    def encode(self, audio, chunk):
        """Mono audio (samples,) -> (ceil(samples / ratio), out_channels) latents, encoded chunk by chunk."""
        frames = -(-audio.shape[0] // self.ratio)
        # zero-pad to whole frames, plus the model's latency (its first frames are dropped below)
        total = (frames + self.delay_frames) * self.ratio
        audio = F.pad(audio, (0, total - audio.shape[0]))
        if self.in_channels == 1:
            x = audio.view(1, 1, -1)
        elif self.label_inputs:  # audio + label signals, all "unknown"
            x = torch.cat([audio.view(1, 1, -1), torch.full((1, self.in_channels - 1, total), -1.0)], dim=1)
        else:
            x = audio.view(1, 1, -1).expand(1, self.in_channels, total)
        module = copy.deepcopy(self.module)  # fresh streaming state for every file
        outputs = [self._call(module, x[..., start:start + chunk].contiguous(), "a chunk")
                   for start in range(0, total, chunk)]
        z = torch.cat(outputs, dim=1)[:, self.delay_frames:]  # (out_channels, frames)
        return z.t().contiguous()


def code_tokens(z, codebook_size, path):
    """A discrete model's codes (frames, Q), float (RAVE) or integer -> int16 tokens, checked."""
    codes = torch.round(z.double())
    if not torch.isfinite(codes).all() or (codes - z.double()).abs().max() > 1e-3 or codes.min() < 0:
        raise UserError(f"{path}: the model is discrete but its codes are not non-negative integers")
    if codebook_size is not None and codes.max() >= codebook_size:
        raise UserError(f"{path}: code {int(codes.max())} is outside the model's codebook (size {codebook_size})")
    if codes.max() > 32767:
        raise UserError(f"{path}: code {int(codes.max())} does not fit the int16 token files")
    return codes.to(torch.int16)


# ----------------------------------------------------------------------------------------------
# Features


def loudness_db(audio, ratio, frames):
    """RMS of each ratio block in dB, floored at -100 dB: (frames,) float32. The last block's mean
    is over its real samples only (not the zero padding)."""
    padded = F.pad(audio, (0, frames * ratio - audio.shape[0]))
    energy = padded.view(frames, ratio).pow(2).sum(dim=1)  # (frames,)
    count = torch.full((frames,), float(ratio))
    count[-1] = audio.shape[0] - (frames - 1) * ratio
    rms = (energy / count).sqrt()
    floor = 10 ** (LOUDNESS_FLOOR_DB / 20)
    return (20 * torch.log10(rms.clamp_min(floor))).numpy().astype(np.float32)


def crepe_f0(audio, sr, ratio, frames, forward, args):
    """f0 in Hz at the centre of each latent frame ((t + 0.5)·ratio samples), 0 where unvoiced."""
    audio16 = torchaudio.functional.resample(audio, sr, models.CREPE_SR) if sr != models.CREPE_SR else audio
    centres_s = (np.arange(frames) + 0.5) * ratio / sr
    f0 = models.f0_at_frames(audio16, centres_s, forward, batch_size=1024 if args.crepe == "tiny" else 256,
                             device=args.device)
    return np.nan_to_num(f0, nan=0.0).astype(np.float32)


def pitch_shifted(audio, semitones, sr):
    """The audio played `semitones` higher (or lower) by resampling, as a tape sped up: pitch and
    duration change together, timbre's formants move with it. 0 gives the audio itself."""
    if semitones == 0:
        return audio
    factor = 2 ** (semitones / 12)
    source = max(1, int(round(sr * factor / 10)))  # rates with a common divisor keep resample's filter short
    return torchaudio.functional.resample(audio, source, max(1, int(round(sr / 10))))


# ----------------------------------------------------------------------------------------------
# The dataset folder


def make_key(rel, used):
    """'sub dir/a.wav' -> 'sub_dir__a', unique among `used` (compared case-insensitively)."""
    parts = [re.sub(r"[^A-Za-z0-9._-]", "_", p) for p in Path(rel).with_suffix("").parts]
    key = "__".join(parts).lstrip(".") or "file"
    candidate, n = key, 2
    while candidate.lower() in used:
        candidate, n = f"{key}-{n}", n + 1
    used.add(candidate.lower())
    return candidate


def check_compatible(index, index_path, encoder, args):
    """Refuse to extend a dataset with latents it could not be trained with alongside."""
    if index["model"].get("sha256") != encoder.sha256:
        raise UserError(f"{index_path} was encoded with another model ({index['model'].get('path')}, sha256 "
                        f"{str(index['model'].get('sha256'))[:12]}...) than {encoder.path} (sha256 "
                        f"{encoder.sha256[:12]}...): the dataset would mix incompatible latents; "
                        "use another --out")
    if not encoder.discrete and args.resolution is not None and index.get("resolution") != args.resolution:
        raise UserError(f"{index_path} was quantized at resolution {index.get('resolution')}, not --resolution "
                        f"{args.resolution}: the dataset would mix incompatible tokens; pass --resolution "
                        f"{index.get('resolution')} or use another --out")
    if index.get("shifts", []) != args.pitch_shifts:
        raise UserError(f"{index_path} holds pitch shifts {index.get('shifts', []) or 'none'}, not "
                        f"{args.pitch_shifts or 'none'}: pass the same --pitch_shifts or use another --out")
    if index.get("features", []) != args.features:
        wanted = ",".join(index.get("features", [])) or "''"
        raise UserError(f"{index_path} holds features {index.get('features', []) or 'none'}, not "
                        f"{args.features or 'none'}: pass --features {wanted} or use another --out")


# ----------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    audio_root, out = Path(args.audio), Path(args.out)
    if not audio_root.exists():
        raise UserError(f"{audio_root}: no such folder")
    files = data.find_audio_files(audio_root)
    if not files:
        raise UserError(f"{audio_root}: no audio files found ({', '.join(data.AUDIO_EXTENSIONS)})")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    args.device = str(data.resolve_device(args.device, "--device"))
    if args.threads:
        torch.set_num_threads(args.threads)

    encoder = Encoder(args.model, args.sr, args.device)
    index_path = out / "index.json"
    if index_path.exists():
        index = data.read_latent_index(out, require_files=False)
        check_compatible(index, index_path, encoder, args)
        if args.num_secs is not None and args.num_secs != index["num_secs"]:
            print(f"note: --num_secs {args.num_secs} ignored: the dataset's chunks are {index['num_secs']} s",
                  file=sys.stderr)
        index["model"]["path"] = str(encoder.path)
    else:
        index = {"format": data.LATENT_FORMAT,
                 "model": {"path": str(encoder.path), "sha256": encoder.sha256, "sample_rate": encoder.sample_rate,
                           "ratio": encoder.ratio, "latent_dim": encoder.latent_dim},
                 "discrete": encoder.discrete, "quantizer": "none" if encoder.discrete else "normal_cdf",
                 "resolution": (encoder.codebook_size or 1) if encoder.discrete else (args.resolution or 64),
                 "features": args.features, "shifts": args.pitch_shifts, "num_secs": float(args.num_secs or 16.0),
                 "files": []}
    chunk = max(encoder.ratio, int(index["num_secs"] * encoder.sample_rate) // encoder.ratio * encoder.ratio)

    kind = "discrete codes (stored as they are)" if encoder.discrete else \
        f"continuous latents (quantized normal_cdf, resolution {index['resolution']})"
    print(f"model {encoder.path.name}: {encoder.sample_rate} Hz, ratio {encoder.ratio}, "
          f"{encoder.latent_dim} {kind}")
    if encoder.discrete and encoder.codebook_size is None:
        print("note: the model exposes no codebook size (n_codes, codebook_size...): the resolution is the "
              "largest code seen + 1", file=sys.stderr)
    if args.resolution is not None and encoder.discrete:
        print("note: --resolution is ignored for a discrete model (its codebook size is used)", file=sys.stderr)

    rel_of = {f: (f.relative_to(audio_root).as_posix() if audio_root.is_dir() else f.name) for f in files}
    done = {(entry["file"], entry.get("shift", 0)) for entry in index["files"]}
    todo = [f for f in files if any((rel_of[f], s) not in done for s in [0] + index.get("shifts", []))]
    used_keys = {entry["key"].lower() for entry in index["files"]}
    for sub in ["tokens"] + ([] if encoder.discrete else ["latents"]) + (["features"] if args.features else []):
        (out / sub).mkdir(parents=True, exist_ok=True)
    forward = None
    if "f0" in args.features:
        forward = models.load_crepe(args.crepe, args.device)

    failed, n_new, n_frames, audio_s = [], 0, 0, 0.0
    start_time = last_write = time.perf_counter()
    data.write_json_atomic(index_path, index)
    try:
        bar = tqdm(todo, unit="file", desc="encode", dynamic_ncols=True, file=sys.stderr, disable=not todo)
        for f in bar:
            rel = rel_of[f]
            try:
                original = data.load_audio(f, encoder.sample_rate)  # (samples,)
            except data.AudioError as e:
                bar.write(f"warning: skipping {e}", file=sys.stderr)
                failed.append(rel)
                continue
            for shift in [0] + index.get("shifts", []):
                if (rel, shift) in done:
                    continue
                audio = pitch_shifted(original, shift, encoder.sample_rate)
                z = encoder.encode(audio, chunk)[:, encoder.channels]  # (frames, Q)
                frames = z.shape[0]
                key = make_key(rel if shift == 0 else f"{rel}__shift{shift:+d}", used_keys)
                if encoder.discrete:
                    tokens = code_tokens(z, encoder.codebook_size, f)
                    index["resolution"] = max(index["resolution"], int(tokens.max()) + 1)
                else:
                    if not torch.isfinite(z).all():
                        raise UserError(f"{f}: the model's encode produced non-finite latents")
                    data.save_npy(out / "latents" / f"{key}.npy", z.float().numpy())
                    tokens = models.quantize_latents(z, index["resolution"]).to(torch.int16)
                data.save_npy(out / "tokens" / f"{key}.npy", tokens.numpy())
                if args.features:
                    columns = {}
                    if "loudness" in args.features:
                        columns["loudness"] = loudness_db(audio, encoder.ratio, frames)
                    if "f0" in args.features:
                        columns["f0"] = crepe_f0(audio, encoder.sample_rate, encoder.ratio, frames, forward, args)
                    data.save_npy(out / "features" / f"{key}.npy",
                                  np.stack([columns[n] for n in args.features], axis=1))
                index["files"].append({"file": rel, "key": key, "frames": int(frames), "shift": shift})
                n_new, n_frames = n_new + 1, n_frames + frames
                audio_s += audio.shape[0] / encoder.sample_rate
                if time.perf_counter() - last_write > INDEX_EVERY_S:
                    data.write_json_atomic(index_path, index)
                    last_write = time.perf_counter()
        bar.close()
    finally:  # also on Ctrl-C and errors: the index lists exactly the files whose .npy are complete
        data.write_json_atomic(index_path, index)

    elapsed = time.perf_counter() - start_time
    print(f"encoded {n_new} new file(s), {audio_s:.1f} s of audio, {n_frames} frames in {elapsed:.1f} s; "
          f"{len(files) - len(todo)} already in the dataset; {out} now holds {len(index['files'])} file(s)")
    if failed:
        print(f"skipped {len(failed)} unreadable file(s): {', '.join(failed)}", file=sys.stderr)
    if not index["files"]:
        raise UserError(f"none of the {len(files)} audio file(s) could be read: the dataset is empty")
    return index


if __name__ == "__main__":
    data.run_main(main)
