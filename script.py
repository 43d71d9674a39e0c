"""Export a trained spectral VAE as a TorchScript file for the nn~ external (Max/MSP, PureData).

    python script.py path_to_model/ -o output_dir/ -v version_number -n name [--force]
    python script.py runs/training_name --fidelity 0.95    # the fewest latents explaining 95% (or --latent_size K)
    python script.py --prior --run runs/training_name [--out out/]                 # a prior alone
    python script.py --prior --run runs/training_name --model vae.ts [--out out/]  # model + prior, one file

`path_to_model` is a run folder (rundir/name), one of its version_K folders or a checkpoint file;
`-v` picks the version (default: the latest), `-n` the checkpoint (default: last; or best),
`--out` (or -o) the output folder (default: the run folder). The file is <output_dir>/<run name>.ts.
An existing file is never replaced unless --force is given (and then atomically).

The exported module implements the nn~ contract itself (no nn_tilde package needed):
  encode  (audio [+ encoder labels]) @1            -> latent_0..latent_{L-1} [+ pred_<task>] @hop
  decode  (latent_0.. [+ decoder labels]) @hop      -> audio @1
  forward (audio [+ one signal per conditioning task]) @1 -> audio [+ pred_<task>] @1
and keeps its own STFT/ISTFT overlap state, so any buffer that is a multiple of the hop works.
Attributes: phase_mode (keep_input | rtpghi | random), temperature, latent_scale, latent_bias, preset.
Latents come out ordered by importance (the principal axes train_vae.py stores in the checkpoint),
labelled with their share of the variance; --fidelity / --latent_size keep the first ones.

A prior (train_prior.py) exports as `forward` (latent_0..latent_{Q-1} [+ features]) @ratio ->
(latent_0.. + perplexity) @ratio with attributes temperature, listen and reset (see NnPrior);
with --model the file also holds the model's encode / decode / forward, so one file does
encode -> prior -> decode. The quantizer and resolution come from the run.
"""
import argparse
import sys
from pathlib import Path
from typing import List, Optional, Tuple

import torch
import torch.nn as nn

import data
import models
from data import UserError

PHASE_MODES = ["keep_input", "rtpghi", "random"]  # keep_input: the analysed input's phase (forward only)
# Live safety: audio and latent inputs are read with NaN and ±inf as 0 and clamped to ±LIVE_LIMIT, so one bad
# value upstream never enters the streaming state (it would silence every later buffer), and the
# methods never raise (in nn~ an exception can crash the host): a wrong input is answered with one
# printed line and silence of the shape nn~ expects.
LIVE_LIMIT = 1e4
# The export's RTPGHI is causal (delay 0): the one-frame look-ahead version measured only 0.1 dB
# better on the tone+chirp of tests/benchmark.py and 0.5 dB (1024/256) to 2.5 dB (2048/512) better
# on the demo notes (-36 / -32 dB causal): not worth a hop of extra latency.
PHASE_LOOKAHEAD = False


class NnSpectralVAE(nn.Module):
    """A SpectralVAE wrapped for nn~: streaming encode / decode / forward on (batch, channels, time).

    Label inputs are signals carrying class indices, decimated to one value per hop (the last
    sample of each hop block, as nn~ does for a ratio-hop input); they are rounded and clamped to
    [0, dim). A negative value means "unknown": the task's predictor guesses it (argmax from the
    frame's latent) where there is one, else class 0 (always class 0 for encoder conditioning).
    Prediction outputs carry the predicted class index, one value per hop, held (never summed).

    Latents are ordered by importance: with the run's latent axes (models.latent_axes) encode outputs
    y = (z − mean) · axes[:, :K], the K coordinates along the principal axes explaining the most
    variance, first the most important; decode and forward rebuild z = mean + axes[:, :K] · y, the
    dropped axes at their mean (or noise of their spread × temperature in decode). K = all axes
    unless the export asks for fewer (--fidelity / --latent_size). The `preset` attribute recalls a
    class's mean latent (e.g. `set preset pitch:A`): decode's latent inputs then move around it.
    """

    methods: List[str]
    preset_keys: List[str]
    attributes: List[str]
    phase_modes: List[str]
    encode_input_labels: List[str]
    encode_output_labels: List[str]
    decode_input_labels: List[str]
    decode_output_labels: List[str]
    forward_input_labels: List[str]
    forward_output_labels: List[str]
    encoder_label_channel: List[int]
    encoder_label_dim: List[int]
    decoder_label_channel: List[int]
    decoder_label_dim: List[int]
    decoder_label_predictor: List[int]

    def __init__(self, vae: models.SpectralVAE, sr: int, n_fft: int, hop: int, axes=None, latent_size=None):
        super().__init__()
        if not data.is_power_of_two(hop):
            raise UserError(f"hop {hop} is not a power of two: nn~ needs power-of-two ratios "
                            f"(retrain with data.transform.hop=256 or another power of two)")
        vae = vae.eval()
        self.sample_rate, self.n_fft, self.hop = int(sr), int(n_fft), int(hop)
        self.bins = n_fft // 2 + 1
        ordered = axes is not None
        if axes is None:  # a run without latent axes: the latents in training's order
            d = vae.latent_dim
            axes = {"mean": torch.zeros(d), "rotation": torch.eye(d), "variance": torch.ones(d), "presets": {},
                    "preset_names": {}}
        k = models.latent_size_for(axes, None, latent_size)
        self.latent_dim = k  # latents exposed to nn~, most important first
        share = axes["variance"] / axes["variance"].sum().clamp(min=1e-12)
        self.register_buffer("latent_mean", axes["mean"].float().clone())  # (D,)
        self.register_buffer("latent_axes", axes["rotation"][:, :k].float().contiguous())  # (D, K)
        self.register_buffer("dropped_axes", axes["rotation"][:, k:].float().contiguous())  # (D, D − K)
        self.register_buffer("dropped_std", axes["variance"][k:].float().sqrt().contiguous())  # (D − K,)
        # class presets: "task:name" and "task:id" keys -> a row of preset_table (ordered coordinates)
        keys, rows = [], []
        for task, table in axes["presets"].items():
            for c in range(table.shape[0]):
                if torch.isfinite(table[c]).all():
                    name = axes["preset_names"][task][c]
                    keys += [f"{task}:{name}"] + ([f"{task}:{c}"] if name != str(c) else [])
                    rows += [table[c, :k]] * (1 if name == str(c) else 2)
        self.preset_keys = keys
        self.register_buffer("preset_table", torch.stack(rows).float() if rows else torch.zeros(0, k))
        self.register_buffer("preset_latent", torch.zeros(k))  # the recalled preset (zeros: none)
        self.vae = vae  # its normalisation, encoder and decoder; the label modules are listed below
        self.live_limit = LIVE_LIMIT
        tasks = list(vae.task_dims)  # every conditioning task, config order: forward's label inputs
        pred_tasks = list(vae.predictors)
        self.encoder_embeddings = nn.ModuleList([vae.embeddings[t] for t in vae.encoder_tasks])
        self.decoder_embeddings = nn.ModuleList([vae.embeddings[t] for t in vae.decoder_tasks])
        self.predictors = nn.ModuleList([vae.predictors[t] for t in pred_tasks])
        self.n_predictions = len(pred_tasks)
        # label channels, counted among the label inputs of forward (encode / decode pick theirs)
        self.encoder_label_channel = [tasks.index(t) for t in vae.encoder_tasks]
        self.encoder_label_dim = [vae.task_dims[t] for t in vae.encoder_tasks]
        self.decoder_label_channel = [tasks.index(t) for t in vae.decoder_tasks]
        self.decoder_label_dim = [vae.task_dims[t] for t in vae.decoder_tasks]
        self.decoder_label_predictor = [pred_tasks.index(t) if t in pred_tasks else -1 for t in vae.decoder_tasks]
        self.decode_uses_predictors = max(self.decoder_label_predictor, default=-1) >= 0
        self.n_encoder_labels, self.n_decoder_labels, self.n_labels = (
            len(vae.encoder_tasks), len(vae.decoder_tasks), len(tasks))

        # streaming state per method (encode: analysis; decode: synthesis; forward: both)
        self.encode_stft = models.StreamingSTFT(n_fft, hop)
        self.forward_stft = models.StreamingSTFT(n_fft, hop)
        self.decode_phase = models.StreamingPhase(n_fft, hop, lookahead=PHASE_LOOKAHEAD)
        self.forward_phase = models.StreamingPhase(n_fft, hop, lookahead=PHASE_LOOKAHEAD)
        self.decode_istft = models.StreamingISTFT(n_fft, hop)
        self.forward_istft = models.StreamingISTFT(n_fft, hop)
        _share_constant_buffers([self.encode_stft, self.forward_stft])
        _share_constant_buffers([self.decode_phase, self.forward_phase])
        _share_constant_buffers([self.decode_istft, self.forward_istft])
        # latency in samples between a method's input and its output streams (nn~ adds its own)
        phase_delay = self.decode_phase.delay_frames * hop
        self.encode_latency = self.encode_stft.latency
        self.decode_latency = self.decode_istft.latency + phase_delay
        self.forward_latency = self.encode_latency + self.decode_latency

        # nn~ methods: <method>_params = [in_channels, in_ratio, out_channels, out_ratio]
        latents = [f"latent_{i} ({float(share[i]):.0%})" if ordered else f"latent_{i}" for i in range(k)]
        predictions = [f"pred_{t}" for t in pred_tasks]
        self.methods = ["encode", "decode", "forward"]
        self.encode_input_labels = ["audio"] + list(vae.encoder_tasks)
        self.encode_output_labels = latents + predictions
        self.decode_input_labels = latents + list(vae.decoder_tasks)
        self.decode_output_labels = ["audio"]
        self.forward_input_labels = ["audio"] + tasks
        self.forward_output_labels = ["audio"] + predictions
        for method in self.methods:
            ins, outs = getattr(self, f"{method}_input_labels"), getattr(self, f"{method}_output_labels")
            in_ratio, out_ratio = {"encode": (1, hop), "decode": (hop, 1), "forward": (1, 1)}[method]
            self.register_buffer(f"{method}_params", torch.tensor([len(ins), in_ratio, len(outs), out_ratio]))

        # nn~ attributes: <attr>_params = type codes (0 bool, 1 int, 2 float, 3 str)
        self.attributes = ["phase_mode", "temperature", "latent_scale", "latent_bias", "preset"]
        self.phase_modes = list(PHASE_MODES)
        self.phase_mode = "keep_input"
        self.temperature = 0.0
        self.latent_scale = 1.0
        self.latent_bias = 0.0
        self.preset = "none"
        self.register_buffer("phase_mode_params", torch.tensor([3]))
        self.register_buffer("temperature_params", torch.tensor([2]))
        self.register_buffer("latent_scale_params", torch.tensor([2]))
        self.register_buffer("latent_bias_params", torch.tensor([2]))
        self.register_buffer("preset_params", torch.tensor([3]))

    # ---- nn~ introspection -------------------------------------------------------------------
    @torch.jit.export
    def get_methods(self) -> List[str]:
        return self.methods

    @torch.jit.export
    def get_attributes(self) -> List[str]:
        return self.attributes

    @torch.jit.export
    def get_latency(self, method: str) -> int:
        """Samples between a method's input and output streams (nn~'s own 2·buffer not included)."""
        if method == "encode":
            return self.encode_latency
        if method == "decode":
            return self.decode_latency
        if method == "forward":
            return self.forward_latency
        return -1

    @torch.jit.export
    def set_sample_rate(self, sample_rate: int) -> int:
        """0 if the host runs at the model's rate (or says none: nn~ 1.6 passes 0 on a reload); else a
        message and 1 (the model would be detuned)."""
        if sample_rate == self.sample_rate or sample_rate <= 0:
            return 0
        print("nn~ model: trained at", self.sample_rate, "Hz but the host runs at", sample_rate,
              "Hz: set the audio sample rate to", self.sample_rate, "Hz (pitch and timing would be wrong)")
        return 1

    # ---- attributes (setters return 0 on success, 1 and keep the old value otherwise) ---------
    @torch.jit.export
    def get_phase_mode(self) -> List[str]:
        return [self.phase_mode]

    @torch.jit.export
    def set_phase_mode(self, mode: str) -> int:
        if mode in self.phase_modes:
            self.phase_mode = mode
            return 0
        print("nn~ model: phase_mode must be keep_input, rtpghi or random, got", mode)
        return 1

    @torch.jit.export
    def get_temperature(self) -> List[float]:
        return [self.temperature]

    @torch.jit.export
    def set_temperature(self, value: float) -> int:
        if not (value >= 0.0 and value < 1e6):  # also refuses nan
            print("nn~ model: temperature must be a number >= 0, got", value)
            return 1
        self.temperature = value
        return 0

    @torch.jit.export
    def get_latent_scale(self) -> List[float]:
        return [self.latent_scale]

    @torch.jit.export
    def set_latent_scale(self, value: float) -> int:
        if not (abs(value) < 1e6):
            print("nn~ model: latent_scale must be a finite number, got", value)
            return 1
        self.latent_scale = value
        return 0

    @torch.jit.export
    def get_latent_bias(self) -> List[float]:
        return [self.latent_bias]

    @torch.jit.export
    def set_latent_bias(self, value: float) -> int:
        if not (abs(value) < 1e6):
            print("nn~ model: latent_bias must be a finite number, got", value)
            return 1
        self.latent_bias = value
        return 0

    @torch.jit.export
    def get_preset(self) -> List[str]:
        return [self.preset]

    @torch.jit.export
    def set_preset(self, value: str) -> int:
        """`task:class` (a class name or id, e.g. pitch:A or pitch:9) recalls that class's mean latent
        for decode; none clears it."""
        key = value.strip().replace("=", ":").replace(" ", ":")
        if key == "none" or key == "":
            self.preset = "none"
            self.preset_latent.zero_()
            return 0
        for i, known in enumerate(self.preset_keys):
            if known == key:
                self.preset = key
                self.preset_latent.copy_(self.preset_table[i])
                return 0
        print("nn~ model: no preset", value, "(task:class, e.g.", self.preset_keys[0] if len(self.preset_keys) > 0
              else "none: this model has no class presets", ")")
        return 1

    # ---- frame-level helpers -----------------------------------------------------------------
    def _usable(self, x: torch.Tensor, n_inputs: int, in_ratio: int, method: str) -> bool:
        """True when x is (batch, n_inputs, k·hop / in_ratio) with k >= 1; else one printed line."""
        if x.dim() != 3 or x.size(1) != n_inputs:
            print("nn~ model:", method, "expects (batch,", n_inputs, "channels, time), got", x.shape)
            return False
        if x.size(2) == 0 or (x.size(2) * in_ratio) % self.hop != 0:
            print("nn~ model:", method, "needs a buffer size that is a multiple of", self.hop, "samples, got",
                  x.size(2) * in_ratio)
            return False
        return True

    def _silence(self, x: torch.Tensor, n_outputs: int, in_ratio: int, out_ratio: int) -> torch.Tensor:
        """What a method answers to an input it cannot use: zeros (batch, n_outputs, length · in / out)."""
        batch = x.size(0) if x.dim() == 3 else 1
        length = x.size(-1) * in_ratio // out_ratio if x.dim() == 3 else 0
        return torch.zeros(batch, n_outputs, length)

    def _sanitize(self, signal: torch.Tensor) -> torch.Tensor:
        """Audio or latents as the model may use them: NaN and ±inf -> 0, clamped to ±LIVE_LIMIT."""
        return torch.nan_to_num(signal.float(), nan=0.0, posinf=0.0, neginf=0.0).clamp(-self.live_limit,
                                                                                      self.live_limit)

    def _decimate(self, signals: torch.Tensor) -> torch.Tensor:
        """Full-rate signals (batch, n, k·hop) -> their last sample in each hop block (batch, n, k)."""
        return signals[:, :, self.hop - 1::self.hop]

    def _frames(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, channels, k) -> (batch·k, channels) rows, batch-major."""
        return x.transpose(1, 2).reshape(x.size(0) * x.size(2), x.size(1))

    def _unframe(self, rows: torch.Tensor, batch: int) -> torch.Tensor:
        """(batch·k, channels) -> (batch, channels, k)."""
        return rows.reshape(batch, rows.size(0) // batch, rows.size(1)).transpose(1, 2)

    def _class_index(self, values: torch.Tensor, dim: int) -> torch.Tensor:
        """Label signal values (rows,) -> int64 classes in [0, dim), or -1 where unknown (< -0.5, nan)."""
        rounded = torch.round(torch.nan_to_num(values, nan=-1.0, posinf=1e6, neginf=-1e6))
        return torch.where(rounded < 0, -1.0, rounded.clamp(max=float(dim - 1))).long()

    def _encoder_condition(self, labels: torch.Tensor) -> torch.Tensor:
        """labels (rows, n_labels) of forward's layout -> (rows, encoder condition width)."""
        parts: List[torch.Tensor] = []
        for i, embedding in enumerate(self.encoder_embeddings):
            y = self._class_index(labels[:, self.encoder_label_channel[i]], self.encoder_label_dim[i])
            parts.append(embedding(y.clamp(min=0)))
        if len(parts) == 0:
            return torch.zeros(labels.size(0), 0)
        return torch.cat(parts, dim=1)

    def _predict(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Predicted class of every prediction task: z (rows, latent), the normalised input frames x
        (rows, bins; zeros in decode, which has no input frame) -> (rows, n_predictions) int64."""
        classes: List[torch.Tensor] = []
        for predictor in self.predictors:
            classes.append(predictor(z, x).argmax(dim=1))
        if len(classes) == 0:
            return torch.zeros(z.size(0), 0, dtype=torch.long)
        return torch.stack(classes, dim=1)

    def _decoder_condition(self, labels: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
        """labels (rows, n_labels) of forward's layout, predicted (rows, n_predictions) int64
        -> (rows, decoder condition width); unknown labels take the prediction, else class 0."""
        parts: List[torch.Tensor] = []
        for i, embedding in enumerate(self.decoder_embeddings):
            y = self._class_index(labels[:, self.decoder_label_channel[i]], self.decoder_label_dim[i])
            p = self.decoder_label_predictor[i]
            if p >= 0:
                y = torch.where(y < 0, predicted[:, p], y)
            parts.append(embedding(y.clamp(min=0)))
        if len(parts) == 0:
            return torch.zeros(labels.size(0), 0)
        return torch.cat(parts, dim=1)

    def _latent(self, spec: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """spec (batch, bins, k) complex, labels (batch·k, n_labels) -> the ordered latents y (batch·k,
        K), predicted classes (batch·k, n_predictions) int64 (from the mean and the frames)."""
        x = self.vae.normalize(self._frames(spec.abs()))  # (rows, bins)
        mean, logvar = self.vae.encode_conditioned(x, self._encoder_condition(labels))  # (rows, D) each
        predicted = self._predict(mean, x)
        z = mean
        if self.temperature > 0.0:
            z = mean + self.temperature * torch.exp(0.5 * logvar) * torch.randn_like(mean)
        return (z - self.latent_mean) @ self.latent_axes, predicted

    def _unrotate(self, y: torch.Tensor, noise: bool) -> torch.Tensor:
        """Ordered latents y (rows, K) -> the model's z (rows, D); the dropped axes at their mean, or
        with noise: their spread × temperature."""
        z = self.latent_mean + y @ self.latent_axes.t()
        if noise and self.temperature > 0.0 and self.dropped_std.size(0) > 0:
            dropped = torch.randn(y.size(0), self.dropped_std.size(0)) * self.dropped_std * self.temperature
            z = z + dropped @ self.dropped_axes.t()
        return z

    def _magnitude(self, z: torch.Tensor, condition: torch.Tensor, batch: int) -> torch.Tensor:
        """z (rows, latent), condition (rows, width) -> linear magnitude (batch, bins, k)."""
        x_hat = self.vae.decoder(z, condition)  # (rows, bins), normalised log-magnitude
        return self._unframe(self.vae.denormalize(x_hat), batch)

    # ---- nn~ methods -------------------------------------------------------------------------
    @torch.jit.export
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, 1 + encoder labels, k·hop) -> (batch, latent + predictions, k)."""
        if not self._usable(x, 1 + self.n_encoder_labels, 1, "encode"):
            return self._silence(x, self.latent_dim + self.n_predictions, 1, self.hop)
        x = x.float()
        batch = x.size(0)
        spec = self.encode_stft(self._sanitize(x[:, 0]))  # (batch, bins, k)
        # encode's label inputs are the encoder tasks only: map them to forward's layout
        labels = torch.full((batch * spec.size(2), self.n_labels), -1.0)
        if self.n_encoder_labels > 0:
            encoder_labels = self._frames(self._decimate(x[:, 1:]))  # (rows, n_encoder_labels)
            for i in range(self.n_encoder_labels):
                labels[:, self.encoder_label_channel[i]] = encoder_labels[:, i]
        z, predicted = self._latent(spec, labels)  # ordered latents (rows, K), (rows, predictions)
        out = torch.cat([z, predicted.float()], dim=1)  # (rows, latent + predictions)
        return self._unframe(out, batch).contiguous()

    @torch.jit.export
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, latent + decoder labels, k) -> audio (batch, 1, k·hop). keep_input falls back to rtpghi."""
        if not self._usable(x, self.latent_dim + self.n_decoder_labels, self.hop, "decode"):
            return self._silence(x, 1, self.hop, 1)
        x = x.float()
        batch = x.size(0)
        rows = self._frames(x)  # (rows, latent + decoder labels)
        z = self._unrotate(self._sanitize(rows[:, :self.latent_dim]) + self.preset_latent, True)  # (rows, D)
        # decoder labels sit right after the latent, in decoder-task order
        labels = torch.full((rows.size(0), self.n_labels), -1.0)
        for i in range(self.n_decoder_labels):
            labels[:, self.decoder_label_channel[i]] = rows[:, self.latent_dim + i]
        if self.decode_uses_predictors:  # no input frame here: the predictors read the latent alone
            predicted = self._predict(z, torch.zeros(rows.size(0), self.bins))
        else:
            predicted = torch.zeros(rows.size(0), 0, dtype=torch.long)
        mag = self._magnitude(z, self._decoder_condition(labels, predicted), batch)
        phase_mode = "rtpghi" if self.phase_mode == "keep_input" else self.phase_mode  # no input phase here
        spec = self.decode_phase(mag, phase_mode)  # (batch, bins, k)
        return self.decode_istft(spec).unsqueeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, 1 + labels, k·hop) -> (batch, 1 + predictions, k·hop): audio, then predicted classes."""
        if not self._usable(x, 1 + self.n_labels, 1, "forward"):
            return self._silence(x, 1 + self.n_predictions, 1, 1)
        x = x.float()
        batch = x.size(0)
        spec = self.forward_stft(self._sanitize(x[:, 0]))  # (batch, bins, k)
        labels = self._frames(self._decimate(x[:, 1:]))  # (rows, n_labels)
        y, predicted = self._latent(spec, labels)  # (rows, K), (rows, predictions)
        z = self._unrotate(self._sanitize(y * self.latent_scale + self.latent_bias), False)  # (rows, D)
        mag = self._magnitude(z, self._decoder_condition(labels, predicted), batch)
        if self.phase_mode == "keep_input":
            out_spec = torch.polar(mag, torch.angle(spec))
        else:
            out_spec = self.forward_phase(mag, self.phase_mode)
        audio = self.forward_istft(out_spec).unsqueeze(1)  # (batch, 1, k·hop)
        if self.n_predictions == 0:
            return audio
        held = self._unframe(predicted.float(), batch).repeat_interleave(self.hop, dim=2)
        return torch.cat([audio, held], dim=1)


def parse_switch(value: str) -> int:
    """An on/off attribute as nn~ sends it -> 1 (on), 0 (off) or -1 (not a switch). Pd sends numbers
    as text ("1.000000"); the words true/false, on/off, yes/no work in any case."""
    word = value.strip().lower()
    if word in ["true", "on", "yes"]:
        return 1
    if word in ["false", "off", "no"]:
        return 0
    digits = word[1:] if word.startswith("-") or word.startswith("+") else word
    if len(digits) == 0 or digits.count(".") > 1 or len(digits.replace(".", "")) == 0:
        return -1
    for c in digits:  # a plain decimal number (what nn~ sends for a Pd number: "%f")
        if c not in "0123456789.":
            return -1
    return 1 if float(digits) != 0.0 else 0


def _share_constant_buffers(modules):
    """Point the constant buffers of identical streaming modules at one tensor (saved once)."""
    first = modules[0]
    for other in modules[1:]:
        for name, buffer in first.named_buffers(recurse=False):
            if name in ("window", "inv_envelope", "bin_advance", "torch_sign", "bin_index", "bin_float",
                        "random_table", "bin_offset"):
                setattr(other, name, buffer)


# ----------------------------------------------------------------------------------------------
# The prior for nn~: forward (latents [+ features]) @ratio -> (latents + perplexity) @ratio


class NnPrior(nn.Module):
    """A LatentPrior for nn~: models.StreamingPrior (the prior frame by frame with its own state)
    behind nn~'s method and attributes.

    forward: (batch, Q [+ features], k) latents at the latent ratio -> (batch, Q + 1, k): latents,
    then perplexity. Attributes: temperature (float >= 0), listen (true: the input passes through and
    fills the context; false: the prior generates) and reset (one-shot: the context is cleared at the
    next buffer). The quantizer and resolution are the dataset's, stored in the run.

    listen and reset are string attributes parsed here: nn~ 1.6 reads a bool attribute as false only
    for the word `false` (`set listen 0` arrives as "0.000000" and reads true), so a musician's
    1/0, true/false, on/off and yes/no all work (see parse_switch).
    """

    attributes: List[str]
    forward_input_labels: List[str]
    forward_output_labels: List[str]

    def __init__(self, prior: models.LatentPrior, dataset: dict):
        super().__init__()
        ratio = int(dataset["model"]["ratio"])
        if not data.is_power_of_two(ratio):
            raise UserError(f"latent ratio {ratio} is not a power of two: nn~ cannot play it")
        self.stream = models.StreamingPrior(prior, discrete=dataset["quantizer"] == "none")
        self.live_limit = LIVE_LIMIT
        self.n_streams, self.resolution, self.n_features = prior.n_streams, prior.resolution, prior.n_features
        self.ratio, self.sample_rate = ratio, int(dataset["model"]["sample_rate"])

        self.methods = ["forward"]
        features = list(dataset.get("features") or []) if self.n_features else []
        self.forward_input_labels = [f"latent_{i}" for i in range(self.n_streams)] + features
        self.forward_output_labels = [f"latent_{i}" for i in range(self.n_streams)] + ["perplexity"]
        self.register_buffer("forward_params", torch.tensor(
            [len(self.forward_input_labels), ratio, len(self.forward_output_labels), ratio]))
        self.attributes = ["temperature", "listen", "reset"]
        self.temperature = 1.0
        self.listen = False
        self.reset = False
        self.register_buffer("temperature_params", torch.tensor([2]))
        self.register_buffer("listen_params", torch.tensor([3]))  # str: see the class docstring
        self.register_buffer("reset_params", torch.tensor([3]))

    # ---- nn~ introspection and attributes ----------------------------------------------------
    @torch.jit.export
    def get_methods(self) -> List[str]:
        return self.methods

    @torch.jit.export
    def get_attributes(self) -> List[str]:
        return self.attributes

    @torch.jit.export
    def get_latency(self, method: str) -> int:
        return 0 if method == "forward" else -1

    @torch.jit.export
    def set_sample_rate(self, sample_rate: int) -> int:
        if sample_rate == self.sample_rate or sample_rate <= 0:  # nn~ 1.6 passes 0 on a reload
            return 0
        print("nn~ prior: its latent model runs at", self.sample_rate, "Hz but the host runs at", sample_rate, "Hz")
        return 1

    @torch.jit.export
    def get_temperature(self) -> List[float]:
        return [self.temperature]

    @torch.jit.export
    def set_temperature(self, value: float) -> int:
        if not (value >= 0.0 and value < 1e6):
            print("nn~ prior: temperature must be a number >= 0, got", value)
            return 1
        self.temperature = value
        return 0

    @torch.jit.export
    def get_listen(self) -> List[str]:
        return ["true" if self.listen else "false"]

    @torch.jit.export
    def set_listen(self, value: str) -> int:
        switch = parse_switch(value)
        if switch < 0:
            print("nn~ prior: listen must be 1 or 0 (true/false, on/off), got", value)
            return 1
        self.listen = switch == 1
        return 0

    @torch.jit.export
    def get_reset(self) -> List[str]:
        return ["true" if self.reset else "false"]

    @torch.jit.export
    def set_reset(self, value: str) -> int:
        """One-shot: the context is cleared at the next buffer, then reset reads false again."""
        switch = parse_switch(value)
        if switch < 0:
            print("nn~ prior: reset must be 1 or 0 (true/false, on/off), got", value)
            return 1
        self.reset = switch == 1
        return 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, Q [+ features], k) -> (batch, Q + 1, k): latents, then perplexity."""
        if x.dim() != 3 or x.size(1) != self.n_streams + self.n_features or x.size(2) == 0:
            print("nn~ prior: expects (batch,", self.n_streams + self.n_features, "channels, frames), got", x.shape)
            return torch.zeros(x.size(0) if x.dim() == 3 else 1, self.n_streams + 1, x.size(-1) if x.dim() == 3 else 0)
        x = torch.nan_to_num(x.float(), nan=0.0, posinf=0.0, neginf=0.0).clamp(-self.live_limit, self.live_limit)
        if self.reset:
            self.stream.reset(x.size(0))
            self.reset = False
        latents = x[:, :self.n_streams].transpose(1, 2)  # (batch, k, Q)
        features: Optional[torch.Tensor] = None
        if self.n_features > 0:
            features = x[:, self.n_streams:].transpose(1, 2).contiguous()  # (batch, k, F)
        out, perplexity = self.stream(latents, features, self.listen, self.temperature)
        return torch.cat([out.transpose(1, 2), perplexity.unsqueeze(1)], dim=1).contiguous()


class NnModelWithPrior(nn.Module):
    """One file for the whole chain: the latent model's encode / decode / forward plus `prior`.

    In Max/Pd: [nn~ file.ts encode] -> [nn~ file.ts prior] -> [nn~ file.ts decode]. The prior's
    attributes (temperature, listen, reset) are the file's; the model's are forwarded by
    NnSpectralVAEWithPrior for this toolkit's VAE (phase_mode, latent_scale, latent_bias).
    """

    methods: List[str]
    attributes: List[str]
    encode_input_labels: List[str]
    encode_output_labels: List[str]
    decode_input_labels: List[str]
    decode_output_labels: List[str]
    forward_input_labels: List[str]
    forward_output_labels: List[str]
    prior_input_labels: List[str]
    prior_output_labels: List[str]

    def __init__(self, model, prior: NnPrior):
        super().__init__()
        self.model = model
        self.prior_module = prior
        self.sample_rate = prior.sample_rate
        self.methods = ["encode", "decode", "forward", "prior"]
        for method in ("encode", "decode", "forward"):
            params = getattr(model, f"{method}_params")
            self.register_buffer(f"{method}_params", params.clone())
            # the model's inlet/outlet names (Max shows them), or numbered ones when it has none
            for side, count in (("input", int(params[0])), ("output", int(params[2]))):
                name = f"{method}_{side}_labels"
                labels = getattr(model, name) if hasattr(model, name) else [f"{side} {i}" for i in range(count)]
                setattr(self, name, list(labels))
        self.register_buffer("prior_params", prior.forward_params.clone())
        self.prior_input_labels = prior.forward_input_labels
        self.prior_output_labels = prior.forward_output_labels
        self.attributes = ["temperature", "listen", "reset"]
        for name in ("temperature", "listen", "reset"):
            self.register_buffer(f"{name}_params", getattr(prior, f"{name}_params").clone())

    @torch.jit.export
    def get_methods(self) -> List[str]:
        return self.methods

    @torch.jit.export
    def get_attributes(self) -> List[str]:
        return self.attributes

    @torch.jit.export
    def set_sample_rate(self, sample_rate: int) -> int:
        return self.prior_module.set_sample_rate(sample_rate)

    @torch.jit.export
    def get_temperature(self) -> List[float]:
        return self.prior_module.get_temperature()

    @torch.jit.export
    def set_temperature(self, value: float) -> int:
        return self.prior_module.set_temperature(value)

    @torch.jit.export
    def get_listen(self) -> List[str]:
        return self.prior_module.get_listen()

    @torch.jit.export
    def set_listen(self, value: str) -> int:
        return self.prior_module.set_listen(value)

    @torch.jit.export
    def get_reset(self) -> List[str]:
        return self.prior_module.get_reset()

    @torch.jit.export
    def set_reset(self, value: str) -> int:
        return self.prior_module.set_reset(value)

    @torch.jit.export
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode(x)

    @torch.jit.export
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.decode(x)

    @torch.jit.export
    def prior(self, x: torch.Tensor) -> torch.Tensor:
        return self.prior_module(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class NnSpectralVAEWithPrior(NnModelWithPrior):
    """NnModelWithPrior for this toolkit's VAE export: also forwards its phase/latent attributes
    (its own `temperature`, the encoder's sampling noise, gives way to the prior's)."""

    def __init__(self, model, prior: NnPrior):
        super().__init__(model, prior)
        self.attributes = self.attributes + ["phase_mode", "latent_scale", "latent_bias"]
        for name in ("phase_mode", "latent_scale", "latent_bias"):
            self.register_buffer(f"{name}_params", getattr(model, f"{name}_params").clone())

    @torch.jit.export
    def get_latency(self, method: str) -> int:
        """The VAE's latency for its methods (preprocess.py compensates encode's); the prior adds none."""
        return 0 if method == "prior" else self.model.get_latency(method)

    @torch.jit.export
    def get_phase_mode(self) -> List[str]:
        return self.model.get_phase_mode()

    @torch.jit.export
    def set_phase_mode(self, mode: str) -> int:
        return self.model.set_phase_mode(mode)

    @torch.jit.export
    def get_latent_scale(self) -> List[float]:
        return self.model.get_latent_scale()

    @torch.jit.export
    def set_latent_scale(self, value: float) -> int:
        return self.model.set_latent_scale(value)

    @torch.jit.export
    def get_latent_bias(self) -> List[float]:
        return self.model.get_latent_bias()

    @torch.jit.export
    def set_latent_bias(self, value: float) -> int:
        return self.model.set_latent_bias(value)


# ----------------------------------------------------------------------------------------------
# Export: build, script, save through a temporary file, test-load, rename


def build_module(model, config, axes=None, latent_size=None):
    """The nn~ module (eager) for a SpectralVAE and its run config; with the run's latent axes, its
    latents ordered by importance, the first latent_size of them (default all)."""
    t = config["data"]["transform"]
    return NnSpectralVAE(model, t["sr"], t["n_fft"], t["hop"], axes, latent_size).eval()


def check_module(module, buffer_size=4096):
    """Call every method as nn~ would (batch 1 and 4, zeros); raise UserError on a bad answer."""
    for method in module.get_methods():
        in_ch, in_ratio, out_ch, out_ratio = [int(v) for v in getattr(module, f"{method}_params")]
        size = max(buffer_size, in_ratio, out_ratio)
        for batch in (1, 4):
            with torch.no_grad():
                y = getattr(module, method)(torch.zeros(batch, in_ch, size // in_ratio))
            if y.shape != (batch, out_ch, size // out_ratio) or y.dtype != torch.float32:
                raise UserError(f"exported method {method} answered {tuple(y.shape)} {y.dtype}, expected "
                                f"{(batch, out_ch, size // out_ratio)} float32")
            if not torch.isfinite(y).all():
                raise UserError(f"exported method {method} produced non-finite values")


def export(path, output_dir=None, version=None, name="last", force=False, verbose=True, fidelity=None,
           latent_size=None):
    """Export a run to <output_dir>/<run name>.ts and return the file's path. Latents are ordered by
    importance; fidelity (a share of the variance, RAVE's flag) or latent_size keeps the first ones."""
    run_version, checkpoint_path = data.find_checkpoint(path, version, name)
    model, checkpoint = models.load_vae(checkpoint_path)
    config = checkpoint["config"]
    run_name = config.get("name") or run_version.parent.name
    if output_dir is None:  # the run folder (rundir/name), as the vschaos2 README says
        output_dir = run_version.parent if run_version.name.startswith("version_") else run_version
    target = Path(output_dir) / f"{run_name}.ts"
    axes = models.run_latent_axes(checkpoint_path, checkpoint, run_version)
    if axes is None and (fidelity is not None or latent_size is not None):
        raise UserError(f"{checkpoint_path}: --fidelity/--latent_size need the run's latent axes")
    k = models.latent_size_for(axes, fidelity, latent_size) if axes is not None else None
    scripted = write_module(build_module(model, config, axes, k), target, force)
    if verbose:
        describe(scripted, target, checkpoint_path)
        if axes is not None:
            share = float(axes["variance"][:k].sum() / axes["variance"].sum().clamp(min=1e-12))
            print(f"latents: {k} of {len(axes['variance'])}, ordered by importance, explaining {share:.1%} of the "
                  f"variance; presets: {', '.join(scripted.preset_keys[:6]) or 'none'}"
                  f"{' ...' if len(scripted.preset_keys) > 6 else ''}")
        print("attributes: " + ", ".join(scripted.get_attributes()) + f" (phase_mode: {', '.join(PHASE_MODES)})")
    return target


def write_module(module, target, force=False):
    """Script `module`, save it through a temporary file, test-load it as nn~ would, rename it to
    `target` (never replacing an existing file without force) -> the scripted module."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not force:
        raise UserError(f"{target} already exists: pass --force to replace it")
    try:
        scripted = torch.jit.script(module)
    except Exception as e:
        raise UserError(f"the model cannot be exported to TorchScript ({str(e).strip().splitlines()[0]})") from None
    with data.atomic_path(target) as tmp:
        scripted.save(str(tmp))
        try:  # a .ts that does not load aborts Pd: prove this one does before it takes the name
            check_module(torch.jit.load(str(tmp)))
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"the exported file does not load or run ({str(e).splitlines()[0]})") from None
    return scripted


def export_prior(run, output_dir=None, version=None, name="last", force=False, model_path=None, verbose=True):
    """Export a prior run to <output_dir>/<run name>.ts, or with model_path, the latent model and
    the prior in one file <output_dir>/<run name>_<model name>.ts. Returns the file's path."""
    run_version, checkpoint_path = data.find_checkpoint(run, version, name)
    prior, checkpoint = models.load_prior(checkpoint_path)
    prior_module = NnPrior(prior, checkpoint["dataset"])
    run_name = checkpoint["config"].get("name") or run_version.parent.name
    if output_dir is None:
        output_dir = run_version.parent if run_version.name.startswith("version_") else run_version
    if model_path is None:
        target = Path(output_dir) / f"{run_name}.ts"
        module = prior_module
    else:
        model = models.load_latent_model(model_path, checkpoint["dataset"], prior.n_streams)
        target = Path(output_dir) / f"{run_name}_{Path(model_path).stem}.ts"
        forwarded = {"phase_mode", "latent_scale", "latent_bias"}
        if forwarded <= set(model.get_attributes()):
            module = NnSpectralVAEWithPrior(model, prior_module)
        else:
            module = NnModelWithPrior(model, prior_module)
        dropped = [a for a in model.get_attributes() if a not in module.attributes or a == "temperature"]
        if dropped and verbose:
            print(f"note: attributes of {model_path} not reachable in the combined file: {', '.join(dropped)} "
                  "(load the model's own .ts for those)")
    scripted = write_module(module, target, force)
    if verbose:
        describe(scripted, target, checkpoint_path)
        data_info = checkpoint["dataset"]
        print(f"attributes: {', '.join(scripted.get_attributes())}; prior: {prior.n_streams} streams x "
              f"{prior.resolution} tokens ({data_info['quantizer']}), context {prior.context} frames")
    return target


def describe(module, target, checkpoint_path):
    n_params = sum(p.numel() for p in module.parameters())
    print(f"exported {checkpoint_path} -> {target} ({target.stat().st_size / 1e6:.2f} MB, {n_params:,} parameters)")
    largest_ratio = 1
    for method in module.get_methods():
        in_ch, in_ratio, out_ch, out_ratio = [int(v) for v in getattr(module, f"{method}_params")]
        largest_ratio = max(largest_ratio, in_ratio, out_ratio)
        ins = getattr(module, f"{method}_input_labels", None)
        outs = getattr(module, f"{method}_output_labels", None)
        latency = module.get_latency(method) if hasattr(module, "get_latency") else None
        print(f"  {method:<8} in {in_ch}{' [' + ', '.join(ins) + ']' if ins else ''} @{in_ratio} -> out {out_ch}"
              f"{' [' + ', '.join(outs) + ']' if outs else ''} @{out_ratio}"
              f"{'' if latency is None else f'; latency {latency} samples + nn~' + chr(39) + 's own'}")
    print(f"sample rate {module.sample_rate} Hz: nn~ buffer sizes must be multiples of {largest_ratio} "
          f"(e.g. {max(largest_ratio, 2048)}, {max(largest_ratio, 4096)})")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", nargs="?", default=None,
                        help="run folder (rundir/name), a version_K folder or a checkpoint file")
    parser.add_argument("--prior", action="store_true", help="export a prior run (train_prior.py) instead of a VAE")
    parser.add_argument("--run", default=None, help="the run to export (same as the positional path)")
    parser.add_argument("--model", default=None,
                        help="with --prior: the latent model's .ts, to write model + prior in one file "
                             "(methods encode, decode, forward, prior)")
    data.add_out_argument(parser, None)
    data.add_checkpoint_arguments(parser)
    parser.add_argument("--force", action="store_true", help="replace an existing .ts file")
    kept = parser.add_mutually_exclusive_group()
    kept.add_argument("--fidelity", type=float, default=None,
                      help="keep the fewest latents (ordered by importance) explaining this share of the "
                           "variance, e.g. 0.95 (RAVE's flag); default: all latents, still ordered")
    kept.add_argument(*data.spellings("--latent_size"), type=int, default=None,
                      help="keep the first K latents (ordered by importance)")
    args = parser.parse_args(argv)
    if args.fidelity is not None and not 0 < args.fidelity <= 1:
        parser.error(f"--fidelity is a share of the variance in (0, 1], got {args.fidelity}")
    if args.latent_size is not None and args.latent_size < 1:
        parser.error(f"--latent_size must be at least 1, got {args.latent_size}")
    if args.prior and (args.fidelity is not None or args.latent_size is not None):
        parser.error("--fidelity and --latent_size apply to a VAE export, not to --prior")
    if (args.path is None) == (args.run is None):
        parser.error("give the run folder once, as a path or with --run")
    args.path = args.path or args.run
    if args.model and not args.prior:
        parser.error("--model combines a latent model with a prior: add --prior")
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.prior:
        return export_prior(args.path, args.out, args.version, args.checkpoint, args.force, args.model)
    return export(args.path, args.out, args.version, args.checkpoint, args.force, fidelity=args.fidelity,
                  latent_size=args.latent_size)


if __name__ == "__main__":
    data.run_main(main)
