"""Phase reconstruction: quality (spectral convergence), streaming invariance, TorchScript."""
import math

import pytest
import torch

from data import istft, stft
from helpers import phase_test_signal
from models import (StreamingISTFT, StreamingPhase, StreamingSTFT, griffin_lim, pghi, reconstruct_audio,
                    spectral_convergence, spectral_convergence_audio)

SR = 44100
CONFIGS = [(1024, 256), (2048, 512)]


pytestmark = pytest.mark.usefixtures("one_thread")  # streaming code is timed for one thread


def signal(kind, seconds=1.0):
    return phase_test_signal(SR, seconds, kind)  # (samples,)


def stream_phase(module, mag, chunk, mode="rtpghi"):
    """Feed (batch, bins, frames) to a StreamingPhase in chunks; concatenated output."""
    module.reset(mag.shape[0])
    outs = [module(mag[..., i:i + chunk], mode) for i in range(0, mag.shape[-1], chunk)]
    return torch.cat(outs, dim=-1)  # (batch, bins, frames)


def test_spectral_convergence_extremes():
    audio = signal("mix", 0.5)
    mag = stft(audio, 1024, 256).abs()
    assert spectral_convergence(mag, mag) < -100
    random_audio = reconstruct_audio(mag, 1024, 256, method="random", length=audio.numel())
    assert spectral_convergence_audio(mag, random_audio, 1024, 256) > -10


@pytest.mark.parametrize("n_fft,hop", CONFIGS)
@pytest.mark.parametrize("kind", ["tone", "chirp"])
def test_pghi_quality(kind, n_fft, hop):
    audio = signal(kind)
    mag = stft(audio, n_fft, hop).abs()  # (bins, frames)
    phase = pghi(mag, n_fft, hop)
    assert phase.shape == mag.shape
    resynth = istft(torch.polar(mag, phase), n_fft, hop, length=audio.numel())
    assert spectral_convergence_audio(mag, resynth, n_fft, hop) <= -20


@pytest.mark.parametrize("lookahead", [False, True])
@pytest.mark.parametrize("n_fft,hop", CONFIGS)
@pytest.mark.parametrize("kind", ["tone", "chirp"])
def test_streaming_rtpghi_quality(kind, n_fft, hop, lookahead):
    audio = signal(kind)
    mag = stft(audio, n_fft, hop).abs().unsqueeze(0)  # (1, bins, frames)
    module = StreamingPhase(n_fft, hop, lookahead=lookahead)
    delay = module.delay_frames
    padded = torch.cat([mag] + [mag[..., -1:]] * delay, dim=-1)
    spec = stream_phase(module, padded, chunk=4)[..., delay:]  # re-aligned (1, bins, frames)
    assert torch.allclose(spec.abs(), mag, rtol=1e-5, atol=1e-5)
    resynth = istft(spec, n_fft, hop, length=audio.numel())
    assert spectral_convergence_audio(mag, resynth, n_fft, hop) <= -20


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("mode", ["rtpghi", "random"])
@pytest.mark.parametrize("lookahead", [False, True])
def test_streaming_phase_chunking_invariant(lookahead, mode, batch):
    kinds = ["tone", "chirp", "mix", "tone"][:batch]
    audio = torch.stack([signal(k, 0.4) for k in kinds])  # (batch, samples)
    audio[-1] *= 0.01  # different levels per entry
    mag = stft(audio, 1024, 256).abs()  # (batch, bins, frames)
    module = StreamingPhase(1024, 256, lookahead=lookahead)
    whole = stream_phase(module, mag, chunk=mag.shape[-1], mode=mode)
    assert whole.shape == mag.shape and whole.is_complex()
    for chunk in (1, 2, 4, 16):
        chunked = stream_phase(module, mag, chunk=chunk, mode=mode)
        assert torch.allclose(chunked, whole, rtol=0, atol=1e-6), chunk
    if batch > 1:  # each batch entry only depends on its own input
        single = stream_phase(module, mag[1:2], chunk=3, mode=mode)
        assert torch.allclose(single, whole[1:2], rtol=0, atol=1e-6)


def test_streaming_phase_batch_resize():
    mag = stft(torch.stack([signal("tone", 0.2)] * 4), 1024, 256).abs()
    module = StreamingPhase(1024, 256)
    first = module(mag[:1, :, :5], "rtpghi")
    assert module(mag[:, :, :5], "rtpghi").shape == (4, 513, 5)  # resized to batch 4 (state reset)
    again = module(mag[:1, :, :5], "rtpghi")  # back to batch 1: reset, same as a fresh start
    assert torch.allclose(again, first, rtol=0, atol=1e-6)


@pytest.mark.parametrize("n_fft,hop", CONFIGS)
def test_streaming_stft_matches_offline(n_fft, hop):
    torch.manual_seed(0)
    audio = torch.randn(4, 24 * hop)
    audio[:, :n_fft // 2 + 1] = 0.0  # silent start: offline reflect padding equals the stream's zeros
    offline = stft(audio, n_fft, hop)  # (4, bins, 25)
    module = StreamingSTFT(n_fft, hop)
    delay = module.delay_frames
    assert module.latency == delay * hop
    for chunk in (1, 2, 4, 8):
        module.reset(4)
        frames = torch.cat([module(audio[:, i:i + chunk * hop]) for i in range(0, audio.shape[-1], chunk * hop)], -1)
        assert frames.shape == (4, n_fft // 2 + 1, 24)
        assert torch.allclose(frames[..., delay:], offline[..., :24 - delay], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("n_fft,hop", CONFIGS)
def test_streaming_istft_matches_offline(n_fft, hop):
    torch.manual_seed(0)
    audio = torch.randn(4, 24 * hop)
    spec = stft(audio, n_fft, hop)  # (4, bins, 25)
    offline = istft(spec, n_fft, hop, length=audio.shape[-1])  # (4, samples)
    module = StreamingISTFT(n_fft, hop)
    latency = module.latency
    start, end = n_fft // 2, audio.shape[-1] - n_fft // 2  # samples every frame overlaps fully
    for chunk in (1, 2, 4, 16):
        module.reset(4)
        out = torch.cat([module(spec[..., i:i + chunk]) for i in range(0, spec.shape[-1], chunk)], -1)
        assert out.shape == (4, spec.shape[-1] * hop) and out.dtype == torch.float32
        assert torch.allclose(out[:, latency + start:latency + end], offline[:, start:end], rtol=1e-5, atol=1e-5)


def test_torchscript_modules():
    mag = stft(torch.stack([signal("mix", 0.3)] * 2), 1024, 256).abs()  # (2, bins, frames)
    for lookahead in (False, True):
        eager = StreamingPhase(1024, 256, lookahead=lookahead)
        scripted = torch.jit.script(StreamingPhase(1024, 256, lookahead=lookahead))
        assert scripted.delay_frames == eager.delay_frames
        for mode in ("rtpghi", "random"):
            assert torch.allclose(stream_phase(scripted, mag, 4, mode), stream_phase(eager, mag, 4, mode),
                                  rtol=0, atol=1e-6)
    audio = torch.randn(2, 16 * 256)
    stft_eager, stft_scripted = StreamingSTFT(1024, 256), torch.jit.script(StreamingSTFT(1024, 256))
    frames = stft_eager(audio)
    assert torch.allclose(stft_scripted(audio), frames, rtol=0, atol=1e-6)
    istft_eager, istft_scripted = StreamingISTFT(1024, 256), torch.jit.script(StreamingISTFT(1024, 256))
    assert torch.allclose(istft_scripted(frames), istft_eager(frames), rtol=0, atol=1e-6)
    assert istft_scripted.latency == 512


def test_griffin_lim_beats_random_phase():
    audio = signal("mix", 0.5)
    mag = stft(audio, 1024, 256).abs()
    random_sc = spectral_convergence_audio(mag, reconstruct_audio(mag, 1024, 256, "random", length=audio.numel()),
                                           1024, 256)
    gl_sc = spectral_convergence_audio(mag, griffin_lim(mag, 1024, 256, iters=16, length=audio.numel()), 1024, 256)
    assert gl_sc < random_sc - 8
    batch = griffin_lim(torch.stack([mag, mag]), 1024, 256, iters=2)  # batch dims allowed
    assert batch.shape == (2, (mag.shape[-1] - 1) * 256)


def test_pghi_refinement_and_batch():
    audio = signal("chirp", 0.5)
    mag = stft(audio, 1024, 256).abs()
    plain = reconstruct_audio(mag, 1024, 256, "pghi", iters=0, length=audio.numel())
    refined = reconstruct_audio(mag, 1024, 256, "pghi", iters=10, length=audio.numel())
    assert (spectral_convergence_audio(mag, refined, 1024, 256)
            < spectral_convergence_audio(mag, plain, 1024, 256) + 1.0)
    phases = pghi(torch.stack([mag, mag]), 1024, 256, refine_iters=2)
    assert phases.shape == (2,) + mag.shape and math.isfinite(float(phases.abs().max()))
