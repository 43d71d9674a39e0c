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

from data import UserError

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


# ----------------------------------------------------------------------------------------------
# Spectral VAE: every magnitude frame is one example (no temporal context), as in vschaos2


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
    """Label predictor from the latent (vschaos2's MLPEncoder with a Categorical output): logits."""

    def __init__(self, latent_dim, n_classes, nlayers=2, hidden_dims=200):
        super().__init__()
        self.net = mlp([latent_dim] + [hidden_dims] * nlayers + [n_classes])

    def forward(self, z):  # (batch, latent) -> (batch, n_classes)
        return self.net(z)


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
            t: Predictor(latent_dim, int(p["dim"]), **(p.get("args") or {})) for t, p in prediction.items()})
        self.register_buffer("norm_offset", torch.tensor(0.0))
        self.register_buffer("norm_scale", torch.tensor(1.0))

    # normalisation between linear magnitude and the model's domain
    def normalize(self, mag):
        return (torch.log1p(mag) - self.norm_offset) / self.norm_scale

    def denormalize(self, x):
        return torch.expm1((x * self.norm_scale + self.norm_offset).clamp(min=0.0))

    def embed(self, tasks, labels, batch, device):
        """Concatenated label embeddings of `tasks`: (batch, sum of dims)."""
        parts = [self.embeddings[t](labels[t]) for t in tasks]
        return torch.cat(parts, dim=-1) if parts else torch.zeros(batch, 0, device=device)

    def encode(self, x, labels=None):
        """(batch, bins) normalised frames -> mean, log-variance, each (batch, latent)."""
        cond = self.embed(self.encoder_tasks, labels or {}, x.shape[0], x.device)
        mean, logvar = self.encoder(x, cond).chunk(2, dim=-1)
        return mean, logvar.clamp(-12.0, 8.0)

    def decode(self, z, labels=None):
        """(batch, latent) -> (batch, bins) normalised frames."""
        cond = self.embed(self.decoder_tasks, labels or {}, z.shape[0], z.device)
        return self.decoder(z, cond)

    def predict(self, z):
        """Logits of every predictor, from a *detached* latent (predictors never train the encoder)."""
        return {t: p(z.detach()) for t, p in self.predictors.items()}

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
        missing = y < 0
        if missing.any():
            if logits is not None and task in logits:
                fill = logits[task].argmax(-1)
            else:
                fill = torch.randint(0, dim, y.shape, device=y.device)
            y = torch.where(missing, fill, y)
        out[task] = y
    return out


# ----------------------------------------------------------------------------------------------
# Losses (the original's defects fixed: SC divided by the target, KL(q‖p), standard free bits)


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
# Checkpoints: one format for every script. A plain dict of tensors and Python scalars/dicts
# (no pickled classes), written atomically, read with torch.load(weights_only=True).


class CheckpointError(UserError):
    pass


def save_checkpoint(path, checkpoint):
    """Write `checkpoint` (a dict) to `path` through a temporary file and an atomic rename."""
    import os
    tmp = f"{path}.tmp"
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    import os
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable checkpoint ({str(e).splitlines()[0]})") from None


def build_vae(config):
    """A SpectralVAE from a run's resolved config."""
    m, t = config["model"], config["data"]["transform"]
    return SpectralVAE(bins=t["n_fft"] // 2 + 1, latent_dim=m["latent_dim"], architecture=m["architecture"],
                       encoder_hidden=m["encoder_hidden"], decoder_hidden=m["decoder_hidden"], conv=m["conv"],
                       conditioning=m["conditioning"], prediction=m["prediction"])


def load_vae(path):
    """(model in eval mode, checkpoint dict) from a checkpoint file written by train_vae.py."""
    checkpoint = load_checkpoint(path)
    if "config" not in checkpoint or "model" not in checkpoint:
        raise CheckpointError(f"{path}: not a VAE checkpoint of this toolkit (no config/model entries)")
    model = build_vae(checkpoint["config"])
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not match the config ({str(e).splitlines()[0]})") from None
    return model.eval(), checkpoint


# ----------------------------------------------------------------------------------------------
# Phase reconstruction


def reconstruct_audio(mag, n_fft, hop, method="griffin_lim", iters=32):
    """Audio from a magnitude spectrogram (..., bins, frames) -> (..., samples)."""
    angles = torch.exp(2j * math.pi * torch.rand(mag.shape))
    spec = mag * angles
    for _ in range(iters):
        audio = istft(spec, n_fft, hop)
        spec = mag * torch.exp(1j * torch.angle(stft(audio, n_fft, hop)))
    return istft(spec, n_fft, hop)
