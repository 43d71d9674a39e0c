"""Models shared by every script: the spectral transform, the VAE, its losses, phase reconstruction.

Conventions (used everywhere in the toolkit):
- audio: float32, (batch, samples) or (samples,)
- spectra: one-sided, (batch, bins, frames) with bins = n_fft // 2 + 1, computed with
  torch.stft(center=True) and a Gaussian window (see `gaussian_window`)
- magnitude frames fed to the VAE: (frames, bins) rows, log1p-compressed then min-max scaled
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------
# Spectral transform: Gaussian-windowed STFT ("DGT")

WINDOW_EDGE = 0.01  # the window falls to 1% of its peak at its edges


def gaussian_std(n_fft):
    """Standard deviation (in samples) of the Gaussian window that falls to WINDOW_EDGE at ±n_fft/2."""
    return n_fft / (2.0 * math.sqrt(-2.0 * math.log(WINDOW_EDGE)))  # ≈ 0.165 · n_fft


def gaussian_window(n_fft):
    """Periodic Gaussian window of length n_fft centred at n_fft/2: (n_fft,) float32."""
    t = torch.arange(n_fft, dtype=torch.float64) - n_fft / 2
    return torch.exp(-0.5 * (t / gaussian_std(n_fft)) ** 2).float()


def gaussian_lambda(n_fft):
    """Time-frequency ratio λ of the Gaussian window exp(-π t²/λ) (t in samples), used by PGHI."""
    return 2.0 * math.pi * gaussian_std(n_fft) ** 2


def stft(audio, n_fft, hop, window=None):
    """Complex one-sided STFT: (..., samples) -> (..., bins, frames), frames = samples // hop + 1."""
    if window is None:
        window = gaussian_window(n_fft).to(audio.device)
    shape = audio.shape
    spec = torch.stft(audio.reshape(-1, shape[-1]), n_fft, hop, window=window, center=True,
                      return_complex=True)
    return spec.reshape(shape[:-1] + spec.shape[-2:])


def istft(spec, n_fft, hop, length=None, window=None):
    """Inverse of `stft` with the canonical dual window g/Σg² (torch.istft's least-squares synthesis)."""
    if window is None:
        window = gaussian_window(n_fft).to(spec.device)
    shape = spec.shape
    audio = torch.istft(spec.reshape((-1,) + shape[-2:]), n_fft, hop, window=window, center=True,
                        length=length)
    return audio.reshape(shape[:-2] + audio.shape[-1:])


def magnitude(audio, n_fft, hop):
    """|STFT|: (..., samples) -> (..., bins, frames)."""
    return stft(audio, n_fft, hop).abs()
