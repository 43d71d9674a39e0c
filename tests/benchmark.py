"""Speed and quality figures of the toolkit (a plain script, not a pytest test).

    .venv/bin/python tests/benchmark.py                 # every section
    .venv/bin/python tests/benchmark.py --only vae pca  # some sections: vae, pca, phase, pitch, export, distributed,
                                                        #   prior, prior_export, real_pitch, real_vae, real_latents, real_prior
    .venv/bin/python tests/benchmark.py --json out.json

The real_* sections render notes and melodies of General MIDI instruments with fluidsynth
(apt-get install fluidsynth timgm6mb-soundfont; they say so and skip without it) into --workdir and
train on them for a fixed time on 2 CPU threads (real_vae 10 min, real_prior 10 min per config; keep
a --workdir to reuse the render, the VAE and the latent dataset between sections):

    .venv/bin/python tests/benchmark.py --only real_pitch real_vae real_latents real_prior --workdir bench/
    .venv/bin/python tests/benchmark.py --only real_prior --workdir bench/ --prior_configs decoder_only --prior_minutes 60

Timings set their thread count explicitly; compare ratios measured in one run (shared machines
are noisy). Every section prints a small table; --json writes all figures to one file.
"""
import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import extract_pitch  # noqa: E402
import models  # noqa: E402
import script  # noqa: E402
import train_prior  # noqa: E402
import train_vae  # noqa: E402
from make_demo_data import write_demo_dataset  # noqa: E402
from helpers import NnHost, phase_test_signal, write_latent_db  # noqa: E402


def table(title, rows):
    print(f"\n== {title}")
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


def load_frames(config, root, files, cache):
    callbacks = config["data"]["dataset"]["metadata_callbacks"]
    _, metadata = data.scan_dataset(root, None, callbacks)
    return data.FrameSet(root, files, metadata, callbacks, config["data"]["transform"], cache, progress=False)


def bench_vae_training(results, workdir, threads=2, steps=60):
    """Training throughput in spectral frames per second for dgt_mid on CPU."""
    torch.set_num_threads(threads)
    root = workdir / "bench_data"
    if not (root / "data").exists():
        write_demo_dataset(root, n_files=24, seconds=2.5)
    rows = []
    for name in ("dgt_mid", "dgt_normal"):
        _, config = train_vae.parse_args(["--config-name", name, f"+data.dataset.root={root}"])
        files, _ = data.scan_dataset(root)
        frames = load_frames(config, root, files, workdir / "cache")
        model = models.build_vae(config)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        bs = config["train"]["batch_size"]
        labels = {}
        for step in range(steps + 5):
            if step == 5:
                start = time.perf_counter()  # a few warm-up steps first
            idx = torch.randint(0, len(frames), (bs,))
            losses = train_vae.compute_losses(model, frames.mags[idx], labels, config, step, augment=True)
            optimizer.zero_grad()
            losses["loss"].backward()
            optimizer.step()
        fps = steps * bs / (time.perf_counter() - start)
        results[f"train_frames_per_s_{name}_{threads}threads"] = fps
        rows.append((f"{name} ({threads} threads, batch {bs})", f"{fps:,.0f} frames/s"))
    table("VAE training throughput (CPU)", rows)


def sc_db(reference, estimate):
    """Spectral convergence in dB of linear magnitudes, (frames, bins)."""
    return 20 * np.log10(np.linalg.norm(reference - estimate) / np.linalg.norm(reference))


def pca_reconstructions(x_train, x_test, sizes):
    """{k: x_test projected on the first k principal axes of x_train and back} (frames, bins) each:
    the PCA baseline of a VAE with latent size k, fitted on the same training frames."""
    centre = x_train.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(x_train - centre, full_matrices=False)  # rows of v: the axes
    return {k: (x_test - centre) @ v[:k].t() @ v[:k] + centre for k in sizes}


def bench_vae_vs_pca(results, workdir, threads=2, steps=3000):
    """Reconstruction of held-out files: VAE (posterior mean) vs PCA with the same latent size.

    Both work on the same normalised log-magnitude frames and are scored on linear magnitudes
    (spectral convergence, dB, lower is better) and on log-magnitudes (mean absolute error)."""
    torch.set_num_threads(threads)
    root = workdir / "pca_data"
    if not (root / "data").exists():
        write_demo_dataset(root, n_files=30, seconds=2.5, seed=1)
    run = train_vae.main(["--config-name", "dgt_mid", f"rundir={workdir / 'runs'}", "name=pca",
                          f"+data.dataset.root={root}", f"train.max_steps={steps}",
                          f"train.val_every={steps}", f"train.log_every={steps // 5}",
                          "data.valid_fraction=0.2"])
    model, checkpoint = models.load_vae(run / "last.pt")
    config = checkpoint["config"]
    split = json.loads((run / "split.json").read_text())
    train = load_frames(config, root, split["train"], Path(config["rundir"]) / "cache")
    valid = load_frames(config, root, split["valid"], Path(config["rundir"]) / "cache")
    with torch.no_grad():
        x_train, x_valid = model.normalize(train.mags), model.normalize(valid.mags)
        mean, _ = model.encode(x_valid)
        vae_mag = model.denormalize(model.decode(mean)).numpy()
    k = config["model"]["latent_dim"]
    pca_x = pca_reconstructions(x_train, x_valid, [k])[k]
    pca_mag = model.denormalize(pca_x).numpy()
    ref = valid.mags.numpy()
    rows = []
    for name, est, x_hat in (("VAE", vae_mag, None), ("PCA", pca_mag, pca_x)):
        sc = float(sc_db(ref, est))
        log_err = float(np.abs(np.log1p(ref) - np.log1p(np.maximum(est, 0))).mean())
        results[f"heldout_sc_db_{name.lower()}"] = sc
        results[f"heldout_log_l1_{name.lower()}"] = log_err
        rows.append((f"{name} (latent {k})", f"SC {sc:6.2f} dB   log-magnitude L1 {log_err:.4f}"))
    rows.append(("held-out files / frames", f"{len(valid.files)} / {len(valid)}"))
    table(f"held-out reconstruction, dgt_mid, {steps} training steps", rows)

    # phase reconstruction of what the VAE predicts for one held-out file (the sound users hear)
    t = config["data"]["transform"]
    frames = valid.file_frames(0)
    target = torch.from_numpy(vae_mag[frames.numpy()]).t()  # (bins, frames)
    rows = []
    for name, method, iters in (("random", "random", 0), ("griffin_lim_100", "griffin_lim", 100),
                                ("pghi", "pghi", 0), ("pghi_gl20", "pghi", 20), ("rtpghi", "rtpghi", 0)):
        audio = models.reconstruct_audio(target, t["n_fft"], t["hop"], method, iters=iters)
        sc = models.spectral_convergence_audio(target, audio, t["n_fft"], t["hop"])
        results[f"demo_reconstruction_phase_sc_db/{name}"] = sc
        rows.append((name, f"{sc:6.1f} dB"))
    table("phase methods on the VAE's reconstruction of a held-out demo file (SC vs predicted magnitude)", rows)


def _time_streaming(module, mag, chunk, repeats=3):
    """µs per frame of `module(mag chunk, mode)` fed in chunks of `chunk` frames (best of repeats)."""
    best = float("inf")
    n_frames = mag.shape[-1] - mag.shape[-1] % chunk
    for _ in range(repeats):
        module.reset(mag.shape[0])
        start = time.perf_counter()
        for i in range(0, n_frames, chunk):
            module(mag[..., i:i + chunk], "rtpghi")
        best = min(best, (time.perf_counter() - start) / n_frames * 1e6)
    return best


def bench_phase(results, workdir=None, seconds=3.0, sr=44100):
    """Spectral convergence of every phase method on `phase_test_signal` at 1024/256 and 2048/512,
    and StreamingPhase cost (µs/frame, one thread, 2048/512). Prints a table, fills `results`."""
    audio = phase_test_signal(sr, seconds)  # (samples,)
    methods = [("random", "random", 0), ("griffin_lim_100", "griffin_lim", 100), ("pghi", "pghi", 0),
               ("pghi_gl20", "pghi", 20), ("rtpghi", "rtpghi", 0), ("rtpghi_lookahead", "rtpghi_lookahead", 0)]
    print(f"phase reconstruction, spectral convergence in dB (lower is better), {seconds:g} s tone+chirp")
    print(f"{'method':<20}" + "".join(f"{f'{n}/{h}':>12}" for n, h in ((1024, 256), (2048, 512))))
    table = {name: [] for name, _, _ in methods}
    for n_fft, hop in ((1024, 256), (2048, 512)):
        mag = data.stft(audio, n_fft, hop).abs()  # (bins, frames)
        for name, method, iters in methods:
            resynth = models.reconstruct_audio(mag, n_fft, hop, method=method, iters=iters, length=audio.numel())
            sc = models.spectral_convergence_audio(mag, resynth, n_fft, hop)
            results[f"phase_sc_db/{name}/{n_fft}_{hop}"] = sc
            table[name].append(sc)
        # the same signal without fades: the reflect-padded edge frames dominate (see phase_test_signal)
        abrupt = phase_test_signal(sr, seconds, fade_seconds=0.0)
        abrupt_mag = data.stft(abrupt, n_fft, hop).abs()
        resynth = models.reconstruct_audio(abrupt_mag, n_fft, hop, method="pghi", iters=0, length=abrupt.numel())
        sc = models.spectral_convergence_audio(abrupt_mag, resynth, n_fft, hop)
        results[f"phase_sc_db/pghi_abrupt_edges/{n_fft}_{hop}"] = sc
        table.setdefault("pghi_abrupt_edges", []).append(sc)
    for name, values in table.items():
        print(f"{name:<20}" + "".join(f"{v:12.1f}" for v in values))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        n_fft, hop = 2048, 512
        mag = data.stft(audio, n_fft, hop).abs().unsqueeze(0)  # (1, bins, frames)
        print(f"StreamingPhase (TorchScript, 1 thread, {n_fft}/{hop}), µs per frame:")
        for lookahead in (False, True):
            module = torch.jit.script(models.StreamingPhase(n_fft, hop, lookahead=lookahead))
            for chunk in (1, 4):
                us = _time_streaming(module, mag, chunk)
                key = f"streaming_phase_us_per_frame/{'lookahead' if lookahead else 'causal'}/chunk{chunk}"
                results[key] = us
                print(f"  {'lookahead' if lookahead else 'causal':<10} chunk {chunk:>2}: {us:8.1f}")
    finally:
        torch.set_num_threads(threads)
    return results



def synth_notes(seconds, sr, seed=0):
    """Consecutive 0.5 s harmonic notes of random MIDI pitch 36..81 (65..880 Hz), random timbre and
    vibrato, -50 dB noise floor. Returns audio and the MIDI note of each sample."""
    rng = np.random.default_rng(seed)
    audio, midi = [], []
    for _ in range(int(seconds / 0.5)):
        note = int(rng.integers(36, 82))
        f = 440 * 2 ** ((note - 69) / 12)
        t = np.arange(int(0.5 * sr)) / sr
        inst = f * 2 ** (rng.uniform(0, 25) / 1200 * np.sin(2 * np.pi * rng.uniform(4, 6) * t))
        phase = 2 * np.pi * np.cumsum(inst) / sr
        amps = rng.uniform(0.2, 1, 8) / np.arange(1, 9) ** rng.uniform(0.5, 2)
        x = sum(a * np.sin(k * phase) for k, a in enumerate(amps, 1) if k * f < sr / 2)
        env = np.minimum(1, np.minimum(t / 0.01, (t[::-1]) / 0.03))
        audio.append(0.3 * env * x / np.abs(x).max())
        midi.append(np.full(t.size, note))
    audio = np.concatenate(audio) + 10 ** (-50 / 20) * rng.standard_normal(sum(a.size for a in audio))
    return audio.astype(np.float32), np.concatenate(midi)


def accuracy(f0, midi_per_sample, hop, sr, note_len):
    """Pitch-class and octave accuracy over the frames inside a note (30 ms away from its edges);
    an unvoiced prediction counts as wrong."""
    centres = np.arange(len(f0)) * hop
    inside = centres < len(midi_per_sample)
    pos = (centres[inside] / sr) % note_len
    keep = (pos > 0.03) & (pos < note_len - 0.03)
    truth = midi_per_sample[centres[inside][keep]]
    pitch, octave = models.pitch_classes(f0[inside][keep])
    return float(np.mean(pitch == truth % 12)), float(np.mean(octave == truth // 12 - 1))


def bench_pitch(results, workdir=None, seconds=10.0, threads=2, hop=256, sr=44100, repeats=3):
    """Fill results['pitch'] with throughput (audio-s per wall-s, best of `repeats` for tiny; the
    process CPU time too) and pitch-class / octave accuracy rows; print a table."""
    torch.set_num_threads(threads)
    audio, midi = synth_notes(seconds, sr)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "notes.wav"
        sf.write(path, audio, sr, subtype="FLOAT")
        warm = Path(tmp) / "warm.wav"
        sf.write(warm, audio[: sr // 2], sr, subtype="FLOAT")
        configs = [("tiny", "tiny", []), ("tiny, crepe every hop", "tiny", ["--crepe-step", "0"]),
                   ("full", "full", [])]
        for name, model, extra in configs:
            args = extract_pitch.parse_args([tmp, "--model", model, "--device", "cpu", "--hop", str(hop), *extra])
            forward = models.load_crepe(model, "cpu")
            extract_pitch.analyse_file(warm, args, forward)
            best = None
            for _ in range(repeats if model == "tiny" else 1):  # best of N: the wall clock of a shared machine is noisy
                start, cpu_start = time.perf_counter(), time.process_time()
                f0, _, _ = extract_pitch.analyse_file(path, args, forward)
                models.pitch_classes(f0)
                wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
                if best is None or wall < best[0]:
                    best = (wall, cpu, f0)
            wall, cpu, f0 = best
            pitch_acc, octave_acc = accuracy(f0, midi, hop, sr, 0.5)
            rows[name] = {"audio_s_per_s": seconds / wall, "wall_s": wall, "cpu_s": cpu,
                          "pitch_class_acc": pitch_acc, "octave_acc": octave_acc}
    results["pitch"] = {"threads": threads, "hop": hop, "sr": sr, "audio_s": seconds, "rows": rows}
    print(f"extract_pitch on CPU, {threads} threads, hop {hop} @ {sr} Hz, {seconds:.0f} s of notes")
    print(f"{'config':<24}{'audio-s/s':>10}{'wall s':>8}{'cpu s':>7}{'pitch acc':>11}{'octave acc':>12}")
    for name, r in rows.items():
        print(f"{name:<24}{r['audio_s_per_s']:>10.2f}{r['wall_s']:>8.2f}{r['cpu_s']:>7.2f}"
              f"{100 * r['pitch_class_acc']:>10.1f}%{100 * r['octave_acc']:>11.1f}%")
    return results



def _scripted_export(config_name):
    """The exported module of an untrained default model of `config_name`, saved and reloaded as nn~ would."""
    _, config = train_vae.parse_args(["--config-name", config_name])
    torch.manual_seed(0)
    model = models.build_vae(config).eval()
    model.norm_offset.fill_(0.0)
    model.norm_scale.fill_(4.0)  # a typical log1p range, so magnitudes are in a realistic range
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(script.build_module(model, config)), buffer)
    size = buffer.tell()
    buffer.seek(0)
    return torch.jit.load(buffer), config, size


def _seconds_per_call(module, method, inputs, repeats=5, calls=40, warmup=20):
    """Best over `repeats` of the mean wall time of `calls` consecutive calls (after `warmup`):
    the least disturbed measurement on a shared machine."""
    fn = getattr(module, method)
    with torch.no_grad():
        for i in range(warmup):
            fn(inputs[i % len(inputs)])
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for i in range(calls):
                fn(inputs[i % len(inputs)])
            times.append((time.perf_counter() - start) / calls)
    return min(times)


def bench_export(results, workdir=None, buffer=2048, threads=1):
    """Real-time factor (audio seconds per wall second) of encode, decode and forward (each phase
    mode) of the nn~ export at `buffer` samples per call, batch 1, on `threads` CPU thread(s)."""
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    rows, sizes = [], []
    try:
        for config_name in ("dgt_normal", "dgt_mid"):
            module, config, size = _scripted_export(config_name)
            param_bytes = 4 * sum(p.numel() for p in module.parameters())
            results[f"export_file_mb/{config_name}"] = size / 1e6
            results[f"export_param_mb/{config_name}"] = param_bytes / 1e6
            sizes.append(f"{config_name}: file {size / 1e6:.2f} MB for {param_bytes / 1e6:.2f} MB of parameters")
            sr, hop = config["data"]["transform"]["sr"], config["data"]["transform"]["hop"]
            audio = phase_test_signal(sr, 2.0)  # (samples,)
            chunks = [audio[i:i + buffer] for i in range(0, audio.numel() - buffer + 1, buffer)]
            in_forward = [torch.cat([c.view(1, 1, -1), torch.full((1, module.n_labels, buffer), -1.0)], 1)
                          for c in chunks]  # labels unknown: predicted (the costlier path)
            in_encode = [torch.cat([c.view(1, 1, -1), torch.zeros(1, module.n_encoder_labels, buffer)], 1)
                         for c in chunks]
            with torch.no_grad():
                latents = [module.encode(x)[:, :module.latent_dim] for x in in_encode]
            in_decode = [torch.cat([z, torch.full((1, module.n_decoder_labels, z.shape[-1]), -1.0)], 1)
                         for z in latents]
            cases = [("forward", "keep_input", in_forward), ("forward", "rtpghi", in_forward),
                     ("forward", "random", in_forward), ("encode", "-", in_encode),
                     ("decode", "rtpghi", in_decode), ("decode", "random", in_decode)]
            for method, mode, inputs in cases:
                if mode != "-":
                    module.set_phase_mode(mode)
                seconds = _seconds_per_call(module, method, inputs)
                rtf = buffer / sr / seconds
                key = f"export_rtf/{config_name}/{method}" + (f"/{mode}" if mode != "-" else "")
                results[key] = rtf
                results[key.replace("export_rtf", "export_ms_per_call")] = seconds * 1e3
                rows.append((config_name, f"{config['data']['transform']['n_fft']}/{hop}", method, mode,
                             seconds * 1e3, rtf, module.get_latency(method)))
    finally:
        torch.set_num_threads(saved_threads)
    print(f"\n== nn~ export: real-time factor at buffer {buffer}, batch 1, {threads} CPU thread(s), "
          f"untrained default models (target >= 20x)")
    print(f"  {'config':<11}{'fft/hop':>10}  {'method':<8}{'phase':<11}{'ms/call':>9}{'x real time':>13}"
          f"{'latency':>9}")
    for name, fft_hop, method, mode, ms, rtf, latency in rows:
        print(f"  {name:<11}{fft_hop:>10}  {method:<8}{mode:<11}{ms:>9.3f}{rtf:>12.1f}x{latency:>9}")
    for line in sizes:
        print(f"  {line}")
    return results


def _trainer_frames_per_s(script_name, args, nproc=1, threads=1, timeout=900):
    """Training frames/s (all processes together) of `script_name args` (train_vae.py or
    train_prior.py) run in a subprocess, under torchrun when nproc > 1: the best of its progress
    lines after the first (warm-up) one, the least disturbed interval on a shared machine."""
    import os
    import re
    import socket
    import subprocess
    launcher = [sys.executable]
    if nproc > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    proc = subprocess.run([*launcher, str(ROOT / script_name), *args, f"train.num_threads={threads}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{script_name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    fps = [float(v.replace(",", "")) for v in re.findall(r"\| ([\d,]+) frames/s", proc.stdout)]
    return max(fps[1:])


def bench_distributed(results, workdir):
    """Training throughput (frames/s of all processes together, from the trainers' progress lines)
    on the CPU with 1 process vs 2 torchrun processes (gloo) of 1 thread each, same batch per
    process (so the effective batch doubles), and 1 process of 2 threads: train_vae.py dgt_mid
    (spectral frames) and train_prior.py decoder_only (latent frames, 8 streams x 64 tokens).
    When there is a GPU: dgt_normal and decoder_only on it, with and without train.amp=1."""
    root = workdir / "bench_data"
    if not (root / "data").exists():
        write_demo_dataset(root, n_files=24, seconds=2.5)
    db = workdir / "bench_latents"
    if not db.exists():
        write_latent_db(db, n_files=6, frames=400, n_streams=PRIOR_LATENTS["streams"],
                        resolution=PRIOR_LATENTS["resolution"], ratio=PRIOR_LATENTS["ratio"],
                        sample_rate=PRIOR_LATENTS["sample_rate"])
    vae_steps, prior_steps = 240, 40
    vae = ["train_vae.py", "--config-name", "dgt_mid", "name=distributed", f"+data.dataset.root={root}",
           f"data.dataset.cache={workdir / 'cache'}", f"rundir={workdir / 'runs'}", f"train.max_steps={vae_steps}",
           f"train.log_every={vae_steps // 6}", f"train.val_every={vae_steps}"]
    prior = ["train_prior.py", "--config", "decoder_only", "--db_path", str(db), "--name", "distributed_prior",
             f"rundir={workdir / 'runs'}", f"train.max_steps={prior_steps}", f"train.log_every={prior_steps // 4}",
             f"train.val_every={prior_steps}", "train.warmup_steps=10"]
    vae_batch = train_vae.parse_args(["--config-name", "dgt_mid"])[1]["train"]["batch_size"]
    prior_config = train_prior.parse_args(["--config", "decoder_only"])[1]
    prior_batch = f"{prior_config['train']['batch_size']} crops of {prior_config['data']['crop']}"
    rows, out = [], {"gpu": None}
    for label, (script_name, *args), batch in (("train_vae.py dgt_mid", vae, vae_batch),
                                                ("train_prior.py decoder_only", prior, prior_batch)):
        section = {}
        for name, nproc, threads in (("1 process, 1 thread", 1, 1), ("2 processes, 1 thread each", 2, 1),
                                     ("1 process, 2 threads", 1, 2)):
            fps = _trainer_frames_per_s(script_name, [*args, "train.device=cpu"], nproc, threads)
            section[name] = {"processes": nproc, "threads_per_process": threads, "frames_per_s": fps}
            rows.append((f"{label}, {name}", f"{fps:9,.0f} frames/s  (batch {nproc} x {batch})"))
        speedup = section["2 processes, 1 thread each"]["frames_per_s"] / section["1 process, 1 thread"]["frames_per_s"]
        rows.append((f"{label}, 2 processes vs 1", f"{speedup:9.2f}x"))
        out[script_name] = {"cpu": section, "speedup_2_processes": speedup}
    if torch.cuda.is_available():
        gpu = {}
        for label, (script_name, *args), config_args in (
                ("train_vae.py dgt_normal", vae, ["--config-name", "dgt_normal"]),
                ("train_prior.py decoder_only", prior, [])):
            for amp in (0, 1):
                fps = _trainer_frames_per_s(script_name, [*args, *config_args, "train.device=cuda", f"train.amp={amp}"],
                                            1, 4)
                gpu[f"{label}, amp {amp}"] = fps
                rows.append((f"GPU {label}, amp={amp}", f"{fps:9,.0f} frames/s"))
        out["gpu"] = {"device": torch.cuda.get_device_name(), "rows": gpu}
    else:
        rows.append(("GPU", "skipped: no CUDA device"))
    results["distributed"] = out
    table("training throughput on the CPU: torchrun processes vs threads (best progress interval after the first)",
          rows)


# ---- the latent prior: train_prior.py configs, script.NnPrior ----------------------------------

PRIOR_CONFIGS = ("decoder_only", "recurrent", "encoder_decoder_continuous", "decoder_only_large")
PRIOR_LATENTS = {"streams": 8, "resolution": 64, "sample_rate": 44100, "ratio": 512}  # dgt_normal's latents
PRIOR_FEATURES = ["loudness", "f0"]  # what encoder_decoder_continuous is conditioned on
# (warm-up steps, most timed steps, seconds after which timing stops once 3 steps are done) of the
# training measurement, and single-frame calls timed per repeat: decoder_only_large is ~10x the default
PRIOR_TRAIN_STEPS = {"decoder_only": (2, 12, 30.0), "recurrent": (2, 20, 30.0),
                     "encoder_decoder_continuous": (2, 10, 30.0), "decoder_only_large": (1, 3, 20.0)}
PRIOR_GENERATE_CALLS = {"decoder_only_large": 30}  # else 100


def _prior_setup(config_name):
    """(config, LatentPrior kwargs, dataset entry) of a configs/prior/ config over latents like
    dgt_normal's (8 streams, resolution 64, 44.1 kHz, ratio 512); seq2seq gets loudness and f0."""
    _, config = train_prior.parse_args(["--config", config_name])
    n_features = len(PRIOR_FEATURES) if config["model"]["backbone"] == "seq2seq" else 0
    lat = PRIOR_LATENTS
    dataset = {"model": {"path": "benchmark.ts", "sha256": "", "sample_rate": lat["sample_rate"],
                         "ratio": lat["ratio"], "latent_dim": lat["streams"]},
               "discrete": False, "quantizer": "normal_cdf", "resolution": lat["resolution"],
               "features": PRIOR_FEATURES if n_features else []}
    train_prior.check_model_config(config, dataset)
    return config, models.prior_config_kwargs(config, lat["streams"], lat["resolution"], n_features), dataset


def _prior_train_frames_per_s(config, kwargs, warmup, max_steps, budget_s, min_steps=3, seed=0):
    """train_prior.py's step (AdamW with the config's settings, gradient clipping) on random crops
    of a random token stream, at the config's batch size and crop -> (frames/s, timed steps)."""
    torch.manual_seed(seed)
    model = models.LatentPrior(**kwargs).train()
    tc = config["train"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc["lr"], betas=tuple(tc["betas"]),
                                  weight_decay=tc["weight_decay"])
    bs, crop = tc["batch_size"], config["data"]["crop"]
    generator = torch.Generator().manual_seed(seed)
    stream = torch.randint(0, kwargs["resolution"], (8 * (crop + 1), kwargs["n_streams"]), generator=generator)
    features = torch.randn(len(stream), kwargs["n_features"], generator=generator) if kwargs["n_features"] else None
    offsets = torch.arange(crop + 1)

    def step():
        idx = torch.randint(0, len(stream) - crop, (bs, 1), generator=generator) + offsets  # (bs, crop + 1)
        loss, _, _ = models.next_frame_loss(model, stream[idx], None if features is None else features[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if tc["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc["grad_clip"])
        optimizer.step()

    for _ in range(warmup):
        step()
    steps, start = 0, time.perf_counter()
    while steps < max_steps and (steps < min_steps or time.perf_counter() - start < budget_s):
        step()
        steps += 1
    return bs * crop * steps / (time.perf_counter() - start), steps


def _scripted_prior(kwargs, dataset, seed=0):
    """An untrained LatentPrior's nn~ export (script.NnPrior), saved and reloaded as nn~ would
    -> (module, the eager LatentPrior, parameter count, file size in bytes)."""
    torch.manual_seed(seed)
    prior = models.LatentPrior(**kwargs).eval()
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(script.NnPrior(prior, dataset)), buffer)
    size = buffer.tell()
    buffer.seek(0)
    return torch.jit.load(buffer), prior, sum(p.numel() for p in prior.parameters()), size


def _prior_inputs(kwargs, frames, n=8, seed=0):
    """`n` nn~ input buffers of the prior (1, Q + F, frames): normal latents (and features)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(1, kwargs["n_streams"] + kwargs["n_features"], frames, generator=generator)
            for _ in range(n)]


def bench_prior(results, workdir=None, threads=1):
    """For each prior config (its sizes from configs/prior/): training throughput (frames/s of
    train_prior.py's step at the config's batch and crop) and single-step generation (the
    scripted NnPrior in generate mode, one frame per call, context full) against the latent frame
    rate, on `threads` CPU thread(s)."""
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    lat = PRIOR_LATENTS
    frame_rate = lat["sample_rate"] / lat["ratio"]
    results["prior_frame_rate"] = frame_rate
    rows = []
    try:
        for name in PRIOR_CONFIGS:
            config, kwargs, dataset = _prior_setup(name)
            warmup, max_steps, budget_s = PRIOR_TRAIN_STEPS[name]
            train_fps, steps = _prior_train_frames_per_s(config, kwargs, warmup, max_steps, budget_s)
            module, prior, n_params, _ = _scripted_prior(kwargs, dataset)
            calls = PRIOR_GENERATE_CALLS.get(name, 100)
            module.set_listen("false")  # generate: each call predicts one frame from the ones before it
            seconds = _seconds_per_call(module, "forward", _prior_inputs(kwargs, 1), repeats=3, calls=calls,
                                        warmup=prior.context + 1)  # past the context: the window is full
            x_realtime = 1.0 / seconds / frame_rate
            results[f"prior_params/{name}"] = n_params
            results[f"prior_train_frames_per_s/{name}"] = train_fps
            results[f"prior_train_timed_steps/{name}"] = steps
            results[f"prior_generate_ms_per_frame/{name}"] = seconds * 1e3
            results[f"prior_generate_frames_per_s/{name}"] = 1.0 / seconds
            results[f"prior_generate_x_realtime/{name}"] = x_realtime
            rows.append((name, n_params, f"{config['train']['batch_size']} x {config['data']['crop']}", steps,
                         train_fps, seconds * 1e3, 1.0 / seconds, x_realtime))
    finally:
        torch.set_num_threads(saved_threads)
    print(f"\n== latent prior, {threads} CPU thread(s): training throughput and single-step generation, "
          f"{lat['streams']} streams x {lat['resolution']} tokens at {lat['sample_rate'] / 1000:g} kHz / "
          f"{lat['ratio']} = {frame_rate:.2f} frames/s")
    print(f"  {'config':<28}{'params':>8}{'batch x crop':>14}{'steps':>7}{'train frames/s':>16}"
          f"{'gen ms/frame':>14}{'frames/s':>10}{'x real time':>13}")
    for name, n_params, batch_crop, steps, train_fps, ms, fps, x in rows:
        print(f"  {name:<28}{n_params / 1e6:>7.2f}M{batch_crop:>14}{steps:>7}{train_fps:>16,.0f}"
              f"{ms:>14.3f}{fps:>10,.0f}{x:>12.1f}x")
    print("  train: AdamW steps of train_prior.py's loss on random crops (after warm-up steps), dropout on")
    print("  gen: the scripted NnPrior (TorchScript, saved and reloaded) in generate mode (listen 0), one frame")
    print("       per call, temperature 1, after context + 1 frames")
    x = results["prior_generate_x_realtime/decoder_only"]
    print(f"  target: decoder_only generates >= 5x real time on one thread: {'met' if x >= 5 else 'MISSED'} ({x:.1f}x)")
    return results


def bench_prior_export(results, workdir=None, buffer=4096, threads=1):
    """Real-time factor (audio seconds per wall second) of each prior config's nn~ export
    (script.NnPrior of an untrained prior, scripted, saved and reloaded) at `buffer` samples per
    call, batch 1, on `threads` CPU thread(s), generating (listen off) and listening."""
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    lat = PRIOR_LATENTS
    frames = buffer // lat["ratio"]
    rows, sizes = [], []
    try:
        for name in PRIOR_CONFIGS:
            _, kwargs, dataset = _prior_setup(name)
            module, prior, n_params, size = _scripted_prior(kwargs, dataset)
            results[f"prior_export_params/{name}"] = n_params
            results[f"prior_export_file_mb/{name}"] = size / 1e6
            sizes.append(f"{name}: {n_params / 1e6:.2f} M parameters ({4 * n_params / 1e6:.1f} MB), "
                         f".ts {size / 1e6:.1f} MB")
            inputs = _prior_inputs(kwargs, frames, n=16)
            large = name == "decoder_only_large"
            for mode, listen in (("generate", "false"), ("listen", "true")):
                module.set_listen(listen)
                module.set_reset("true")  # a fresh context, then past it before timing: the window is full
                seconds = _seconds_per_call(module, "forward", inputs, repeats=3 if large else 5,
                                            calls=10 if large else 40, warmup=prior.context // frames + 1)
                rtf = buffer / lat["sample_rate"] / seconds
                results[f"prior_export_rtf/{name}/{mode}"] = rtf
                results[f"prior_export_ms_per_call/{name}/{mode}"] = seconds * 1e3
                rows.append((name, mode, seconds * 1e3, rtf))
    finally:
        torch.set_num_threads(saved_threads)
    print(f"\n== nn~ prior export: real-time factor at buffer {buffer} ({frames} frames per call), batch 1, "
          f"{threads} CPU thread(s), untrained priors (target >= 5x for decoder_only)")
    print(f"  {'config':<28}{'mode':<10}{'ms/call':>9}{'x real time':>13}")
    for name, mode, ms, rtf in rows:
        print(f"  {name:<28}{mode:<10}{ms:>9.3f}{rtf:>12.1f}x")
    for line in sizes:
        print(f"  {line}")
    worst = min(results[f"prior_export_rtf/decoder_only/{mode}"] for mode in ("generate", "listen"))
    print(f"  target: decoder_only >= 5x real time: {'met' if worst >= 5 else 'MISSED'} (slowest mode {worst:.1f}x)")
    return results


# ---- pitch labels on real instruments --------------------------------------------------------------

def _real_instruments(workdir, title):
    """(root, train files, held-out files) of the real-instrument dataset rendered into workdir (once),
    or None, with the reason in a table, where fluidsynth or a General MIDI soundfont is missing."""
    import real_instruments
    reason = real_instruments.missing_reason()
    if reason:
        table(title, [("skipped", reason)])
        return None
    root = workdir / "real_instruments"
    real_instruments.render_dataset(root)
    return (root, *real_instruments.split(root))


def bench_real_pitch(results, workdir, threads=2):
    """extract_pitch.py with its defaults on the real-instrument notes and melodies: per note, the
    label most of its frames get (note-on to note-off, 0.1 s margins) against the MIDI note played
    (pitch class, octave); on the melodies, the share of note-on frames labelled with the right note;
    and the speed (audio seconds per second, `threads` CPU threads)."""
    rendered = _real_instruments(workdir, "pitch labels on real instruments")
    if rendered is None:
        return
    root = rendered[0]
    labelled = workdir / "real_pitch"  # a copy of the audio (links) that extract_pitch.py labels
    entries = json.loads((root / "notes.json").read_text())
    for e in entries:
        target = labelled / e["path"]
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to((root / e["path"]).resolve())
    args = ["--device", "cpu", "--threads", str(threads), "--overwrite"]
    started = time.perf_counter()
    extract_pitch.main([str(labelled), *args])
    wall = time.perf_counter() - started
    hop, sr = 256, 44100  # extract_pitch's default hop, at the files' rate
    notes = {"pitch": 0, "octave": 0, "n": 0}
    melody = {"right": 0, "n": 0}
    wrong = []
    for e in entries:
        f0 = _track_values(labelled / "metadata" / "f0", e["path"], hop / sr, int(e["seconds"] * sr / hop) + 1)
        for start, end, note in e["segments"]:
            index = np.arange(int((start + 0.1) * sr / hop), min(int((end - 0.1) * sr / hop), len(f0)))
            values = f0[index]
            midi = np.round(69 + 12 * np.log2(np.where(np.isfinite(values), values, 440.0) / 440)).astype(int)
            if e["kind"] == "melody":
                melody["right"] += int(np.sum(np.isfinite(values) & (midi == note)))
                melody["n"] += len(index)
                continue
            voiced = midi[np.isfinite(values)]
            label = int(np.bincount(voiced).argmax()) if len(voiced) else -100
            notes["n"] += 1
            notes["pitch"] += int(label % 12 == note % 12)
            notes["octave"] += int(label // 12 == note // 12)
            if label != note:
                wrong.append(f"{Path(e['path']).stem}: {_midi_name(label) if label >= 0 else 'none'}")
    seconds = sum(e["seconds"] for e in entries)
    figures = {"notes": notes["n"], "pitch_class_acc": notes["pitch"] / notes["n"],
               "octave_acc": notes["octave"] / notes["n"], "melody_frame_acc": melody["right"] / max(melody["n"], 1),
               "audio_s_per_s": seconds / wall, "threads": threads, "wrong": wrong}
    results["real_pitch"] = figures
    table(f"pitch labels on real instruments: extract_pitch.py defaults, {threads} CPU threads", [
        ("notes", f"{notes['n']} (6 instruments over their ranges, C1..B7)"),
        ("pitch class per note", f"{100 * figures['pitch_class_acc']:.1f}%"),
        ("octave per note", f"{100 * figures['octave_acc']:.1f}%"),
        ("melody frames, right note", f"{100 * figures['melody_frame_acc']:.1f}% of {melody['n']}"),
        ("speed", f"{figures['audio_s_per_s']:.1f}x real time ({seconds:.0f} s of audio in {wall:.0f} s)"),
        ("wrong notes", ", ".join(wrong) or "none")])
    print(f"  targets: pitch class >= 97%: {'met' if figures['pitch_class_acc'] >= 0.97 else 'MISSED'}; octave >= 95%: "
          f"{'met' if figures['octave_acc'] >= 0.95 else 'MISSED'}; >= 4x real time: "
          f"{'met' if figures['audio_s_per_s'] >= 4 else 'MISSED'}")


def _track_values(task_dir, key, hop_s, frames):
    """Per-frame float values (NaN for none) of one file's track in a task written by extract_pitch.py."""
    tracks = dict(line.split("\t") for line in (task_dir / "metadata.txt").read_text().splitlines())
    values = np.full(frames, np.nan)
    for line in (task_dir / tracks[key]).read_text().splitlines():
        span, label = line.split("\t")
        onset, offset = (float(v) for v in span.split(","))
        if label != "none":
            values[int(np.ceil(onset / hop_s - 1e-9)):int(np.ceil(offset / hop_s - 1e-9))] = float(label)
    return values


def _midi_name(midi):
    return f"{data.PITCH_NAMES[midi % 12]}{midi // 12 - 1}"


# ---- the VAE on real instruments -------------------------------------------------------------------

REAL_VAE = {"minutes": 10.0, "threads": 2, "config": "dgt_normal", "buffer": 2048, "overrides": [], "run": None}
# the benchmark's VAE also learns to predict pitch and octave (predictors read detached inputs: the
# VAE itself trains exactly as plain dgt_normal)
REAL_VAE_PREDICTION = ["+data.dataset.metadata_callbacks.pitch.name=read_multi_metadata",
                       "+data.dataset.metadata_callbacks.octave.name=read_multi_metadata",
                       "+model.prediction.pitch.dim=12", "+model.prediction.octave.dim=8"]


def _training_root(workdir, root, train_files, name):
    """A dataset folder holding only `train_files` of the rendered dataset (links) and their labels."""
    train_root = workdir / name
    keep = set(train_files)
    for key in train_files:
        target = train_root / key
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to((root / key).resolve())
    for task_dir in (root / "metadata").iterdir():
        out = train_root / "metadata" / task_dir.name
        out.mkdir(parents=True, exist_ok=True)
        lines = [line for line in (task_dir / "metadata.txt").read_text().splitlines()
                 if line.split("\t")[0] in keep]
        (out / "metadata.txt").write_text("\n".join(lines) + "\n")
        for extra in ("classes.txt", "tracks"):
            if (task_dir / extra).exists() and not (out / extra).exists():
                (out / extra).symlink_to((task_dir / extra).resolve())
    return train_root


def _stft_db(reference, estimate, n_fft=2048, hop=512, floor_db=-80.0, sounding_db=-60.0):
    """(spectral convergence, log-spectral distance), both in dB, of estimate against reference audio
    (samples,) on a Hann n_fft/hop STFT. SC = 20·log10(‖|S|−|Ŝ|‖ / ‖|S|‖) hears the loud partials; the
    log-spectral distance (per frame, the RMS over bins of the difference of the two spectra in dB, both
    floored `floor_db` below the reference's loudest bin, averaged over the frames whose loudest bin is
    within `sounding_db` of it) hears the quiet ones too."""
    window = torch.hann_window(n_fft)
    ref = torch.stft(reference, n_fft, hop, window=window, return_complex=True).abs()  # (bins, frames)
    est = torch.stft(estimate, n_fft, hop, window=window, return_complex=True).abs()
    sc = float(20 * torch.log10(torch.linalg.norm(ref - est) / torch.linalg.norm(ref)))
    peak = ref.max()
    floor = peak * 10 ** (floor_db / 20)
    difference = 20 * torch.log10(ref.clamp(min=floor)) - 20 * torch.log10(est.clamp(min=floor))
    sounding = ref.amax(0) > peak * 10 ** (sounding_db / 20)
    return sc, float(difference.pow(2).mean(0).sqrt()[sounding].mean())


def _score_labels(entry, tasks, n_samples, sr, classes):
    """Label signals (len(tasks), n_samples) of a notes.json entry for the given tasks, as a user who
    knows the score would send them: pitch class and octave during each note (-1 between notes),
    the instrument's class all along; -1 for any other task."""
    signals = torch.full((len(tasks), n_samples), -1.0)
    for i, task in enumerate(tasks):
        if task == "instrument":
            signals[i] = float(classes["instrument"].index(entry["instrument"]))
        elif task in ("pitch", "octave"):
            for start, end, midi in entry["segments"]:
                value = midi % 12 if task == "pitch" else midi // 12 - 1
                signals[i, int(start * sr):int(end * sr)] = float(value)
    return signals


def _played_forward(host, audio, buffer, labels=None):
    """`audio` (samples,) through the .ts `forward` buffer by buffer as nn~ plays it, with `labels`
    (label inputs, samples) or every label input -1 (unknown): the outputs (1 + predictions, samples)
    aligned with the input (the method's latency removed)."""
    latency = int(host.model.forward_latency)
    n_labels = host.params["forward"][0] - 1
    if labels is None:
        labels = torch.full((n_labels, len(audio)), -1.0)
    signals = torch.cat([audio.view(1, -1), labels])
    padded = torch.cat([signals, torch.full((len(signals), latency + buffer), -1.0)], dim=1)
    padded[0, len(audio):] = 0.0
    padded = padded[:, : padded.shape[1] // buffer * buffer]
    return host.stream("forward", padded.unsqueeze(0), buffer)[0, :, latency: latency + len(audio)]


def _played_chain(host, audio, buffer, labels=None):
    """`audio` through `encode` then `decode`, buffer by buffer, as two nn~ objects (or a patch that
    moves the latents between them) play it: decode gets encode's latents and, for its label inputs,
    `labels` ((forward's label inputs, samples), the ones decode takes picked out) or -1. The audio
    (samples,), aligned with the input (both methods' latencies removed)."""
    model = host.model
    latency = int(model.encode_latency) + int(model.decode_latency)
    tasks = list(model.forward_input_labels[1:])
    padded_len = (len(audio) + latency + buffer) // buffer * buffer
    x = torch.zeros(1, 1 + int(model.n_encoder_labels), padded_len)
    x[0, 0, :len(audio)] = audio
    given = torch.full((len(tasks), padded_len), -1.0)
    if labels is not None:
        given[:, :len(audio)] = labels
    for i, task in enumerate(model.encode_input_labels[1:]):
        x[0, 1 + i] = given[tasks.index(task)]
    decoder_tasks = list(model.decode_input_labels[int(model.latent_dim):])
    outputs = []
    for start in range(0, padded_len, buffer):
        latents = host.perform("encode", x[..., start:start + buffer])[:, :int(model.latent_dim)]
        decoder_labels = torch.stack([given[tasks.index(t), start:start + buffer] for t in decoder_tasks]
                                     ).unsqueeze(0) if decoder_tasks else latents[:, :0]
        outputs.append(host.perform("decode", torch.cat([latents, decoder_labels], dim=1)))
    return torch.cat(outputs, dim=-1)[0, 0, latency: latency + len(audio)]


# the paths a user hears, each through the .ts buffer by buffer: (name, method, phase mode)
HEARD_PATHS = [("forward keep_input", "forward", "keep_input"), ("forward rtpghi", "forward", "rtpghi"),
               ("encode -> decode rtpghi", "chain", "rtpghi"), ("encode -> decode random", "chain", "random")]


def _note_frames(entry, frames, hop, sr, margin=0.1):
    """(frame indices, midi) of the frames inside each note-on segment of a notes.json entry (margins cut)."""
    index, midi = [], []
    for start, end, note in entry["segments"]:
        first, last = int((start + margin) * sr / hop), int((end - margin) * sr / hop)
        for f in range(max(first, 0), min(last, frames)):
            index.append(f)
            midi.append(note)
    return np.array(index, dtype=np.int64), np.array(midi, dtype=np.int64)


def _training_frames_per_s(config, train_set, augment, threads, seconds=20.0, warmup=10):
    """Training steps of `config` on `train_set` as train_vae.py runs them (its compute_losses, Adam),
    with or without the augmentations: frames per second over `seconds` after `warmup` steps."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = models.build_vae(config)
    model.set_normalization(train_set.mags)
    optimizer = torch.optim.Adam(model.parameters(), lr=config["train"]["lr"])
    bs = config["train"]["batch_size"]
    step, frames, start = 0, 0, None
    while start is None or time.perf_counter() - start < seconds:
        if step == warmup:
            start, frames = time.perf_counter(), 0
        idx = torch.randint(0, len(train_set), (bs,))
        losses = train_vae.compute_losses(model, train_set.mags[idx], {k: v[idx] for k, v in train_set.labels.items()},
                                          config, step, augment=augment)
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        optimizer.step()
        step, frames = step + 1, frames + bs
    return frames / (time.perf_counter() - start)


def _method_speeds(host, buffer, sr, threads=1):
    """Real-time factor of every method and phase mode of an exported model at `buffer`, batch 1,
    `threads` CPU thread(s), on noise (labels unknown: the costlier predicted path)."""
    torch.set_num_threads(threads)
    model, params = host.model, host.params
    torch.manual_seed(0)
    audio = [torch.randn(1, 1, buffer) * 0.1 for _ in range(4)]
    forward = [torch.cat([a, torch.full((1, params["forward"][0] - 1, buffer), -1.0)], 1) for a in audio]
    encode = [torch.cat([a, torch.zeros(1, params["encode"][0] - 1, buffer)], 1) for a in audio]
    frames = buffer // params["decode"][1]
    with torch.no_grad():
        decode = [torch.cat([model.encode(x)[:, :int(model.latent_dim)],
                             torch.full((1, params["decode"][0] - int(model.latent_dim), frames), -1.0)], 1)
                  for x in encode]
    speeds = {}
    for method, mode, inputs in (("forward", "keep_input", forward), ("forward", "rtpghi", forward),
                                 ("forward", "random", forward), ("encode", None, encode),
                                 ("decode", "rtpghi", decode), ("decode", "random", decode)):
        if mode:
            model.set_phase_mode(mode)
        speeds[f"{method} {mode}" if mode else method] = buffer / sr / _seconds_per_call(model, method, inputs)
    model.set_phase_mode("keep_input")
    return speeds


def bench_real_vae(results, workdir):
    """The VAE on real instruments (tests/real_instruments.py): REAL_VAE["config"] trained for
    REAL_VAE["minutes"] on REAL_VAE["threads"] CPU threads on the training notes and melodies, exported,
    and the held-out files (notes at pitches it never heard, two melodies) played through the .ts
    buffer by buffer (REAL_VAE["buffer"] samples) as nn~ does, on every path a user hears: `forward`
    with the input's phase (keep_input) and with the real-time phase (rtpghi), and `encode` -> `decode`
    as two objects (rtpghi, and random for reference). Beside them: the ceiling of the phase (each
    file's own magnitudes through RTPGHI and PGHI), PCA-8/16 fitted on the same training frames and the
    VAE's own magnitude frames (no phase). Spectral convergence and log-spectral distance on a Hann
    2048/512 STFT; the predictors' accuracy on the held-out notes' frames; training frames/s with and
    without augmentation; every method's real-time factor on one thread."""
    rendered = _real_instruments(workdir, "VAE on real instruments")
    if rendered is None:
        return
    root, train_files, heldout_files = rendered
    threads = REAL_VAE["threads"]
    torch.set_num_threads(threads)
    entries = {e["path"]: e for e in json.loads((root / "notes.json").read_text())}
    train_root = _training_root(workdir, root, train_files, "real_vae_train_audio")
    started = time.time()
    if REAL_VAE["run"]:  # a run trained earlier (--vae_run): evaluate it again
        run, train_minutes = Path(REAL_VAE["run"]), None
    else:
        run = train_vae.main(["--config", REAL_VAE["config"], "name=real_vae",
                              f"rundir={workdir / 'runs'}", f"+data.dataset.root={train_root}",
                              "train.max_steps=10000000", "train.val_every=1000",
                              f"train.max_minutes={REAL_VAE['minutes']}", f"train.num_threads={threads}",
                              "train.device=cpu", *REAL_VAE_PREDICTION, *REAL_VAE["overrides"]])
        train_minutes = (time.time() - started) / 60
    ts = script.export(run, workdir / "real_vae", force=True, verbose=False, name="best")
    model, checkpoint = models.load_vae(run / "best.pt")
    config = checkpoint["config"]
    t = config["data"]["transform"]
    sr, hop, n_fft = t["sr"], t["hop"], t["n_fft"]

    # PCA on the training frames, in the model's normalised log-magnitude domain
    cache = Path(config["rundir"]) / "cache"
    train_set = load_frames(config, train_root, list(train_files), cache)
    heldout_set = load_frames(config, root, heldout_files, cache)
    with torch.no_grad():
        x_train, x_held = model.normalize(train_set.mags), model.normalize(heldout_set.mags)
        pca = pca_reconstructions(x_train, x_held, (8, 16))
        labels = models.fill_missing_labels(model, {k: v for k, v in heldout_set.labels.items()
                                                    if k in model.task_dims})
        mean, _ = model.encode(x_held, labels)
        frames_vae = model.denormalize(model.decode(mean, labels))
    ref = heldout_set.mags.numpy()
    offline = {f"PCA-{k}": float(sc_db(ref, model.denormalize(x).numpy())) for k, x in pca.items()}
    offline["VAE frames, posterior mean (no phase)"] = float(sc_db(ref, frames_vae.numpy()))

    # every path, buffer by buffer, as nn~ plays it; the phase's ceiling; predicted labels on the note frames
    torch.set_num_threads(1)
    host = NnHost(ts)
    buffer = REAL_VAE["buffer"]
    classes = {task: [line.split("\t")[1] for line in (root / "metadata" / task / "classes.txt").read_text().splitlines()]
               for task in ("instrument", "pitch", "octave")}
    tasks = list(host.model.forward_input_labels[1:])
    scores = {name: [] for name, _, _ in HEARD_PATHS + [("ceiling: own magnitudes, rtpghi", 0, 0),
                                                        ("ceiling: own magnitudes, pghi", 0, 0)]}
    notes = {name: [] for name in scores}
    correct = {"pitch": [0, 0], "octave": [0, 0], "both": [0, 0]}
    predicted_tasks = [name[5:] for name in host.model.forward_output_labels[1:]]  # pred_pitch, pred_octave
    for key in heldout_files:
        audio = data.load_audio(root / key, sr)
        entry = entries[key]
        labels = _score_labels(entry, tasks, len(audio), sr, classes)
        outputs = {}
        for name, method, mode in HEARD_PATHS:
            host.model.set_phase_mode(mode)
            if method == "forward":
                played = _played_forward(host, audio, buffer, labels)  # (1 + predictions, samples)
                outputs[name] = played[0]
                if mode == "keep_input":
                    predictions = played[1:]
            else:
                outputs[name] = _played_chain(host, audio, buffer, labels)
        own = data.magnitude(audio, n_fft, hop)  # (bins, frames): the file's own Gaussian-window magnitudes
        for method in ("rtpghi", "pghi"):
            outputs[f"ceiling: own magnitudes, {method}"] = models.reconstruct_audio(own, n_fft, hop, method, iters=0,
                                                                                      length=len(audio))
        for name, out in outputs.items():
            scores[name].append(_stft_db(audio, out))
            if entry["kind"] == "note":
                notes[name].append(scores[name][-1])
        if entry["kind"] != "note" or not predicted_tasks:
            continue
        predicted = predictions[:, ::hop]  # (predictions, frames): the class held at each hop
        index, midi = _note_frames(entry, predicted.shape[1], hop, sr)
        by_task = {task: predicted[i, index].round().long().numpy() for i, task in enumerate(predicted_tasks)}
        ok = {"pitch": by_task.get("pitch") == midi % 12, "octave": by_task.get("octave") == midi // 12 - 1}
        ok["both"] = ok["pitch"] & ok["octave"]
        for name, hits in ok.items():
            correct[name][0] += int(np.sum(hits))
            correct[name][1] += len(index)
    speeds = _method_speeds(host, buffer, sr)
    fps = {augment: _training_frames_per_s(config, train_set, augment, threads) for augment in (False, True)}
    torch.set_num_threads(threads)

    paths = {name: {"sc_db": float(np.mean([s for s, _ in v])), "lsd_db": float(np.mean([d for _, d in v])),
                    "sc_db_notes": float(np.mean([s for s, _ in notes[name]])) if notes[name] else None}
             for name, v in scores.items()}
    results[f"real_vae/{REAL_VAE['config']}"] = {
        "config": REAL_VAE["config"], "overrides": REAL_VAE["overrides"], "minutes": train_minutes,
        "steps": checkpoint["step"], "heldout_files": len(heldout_files), "paths": paths, "offline_sc_db": offline,
        "predictor_accuracy": {k: c / max(n, 1) for k, (c, n) in correct.items()},
        "validation_sc_best": checkpoint["best_val"], "x_real_time_1thread": speeds,
        "train_frames_per_s": {"augmented": fps[True], "plain": fps[False]}}
    trained = f"{train_minutes:.1f} min" if train_minutes else f"earlier ({run})"
    n_notes = len(notes["forward keep_input"])
    rows = [("trained", f"{trained}, best.pt at step {checkpoint['step']:,} ({threads} threads)"),
            ("held-out files", f"{len(heldout_files)} ({n_notes} notes at unheard pitches, "
                               f"{len(heldout_files) - n_notes} melodies); buffer {buffer}, SC / log-spectral distance")]
    rows += [(name, f"SC {p['sc_db']:6.2f} dB   LSD {p['lsd_db']:5.2f} dB   (notes alone: SC {p['sc_db_notes']:6.2f} dB)")
             for name, p in paths.items()]
    rows += [(name, f"SC {v:6.2f} dB (magnitude frames)") for name, v in offline.items()]
    rows += [(f"predicted {k} on held-out note frames", f"{100 * c / max(n, 1):.1f}% of {n} frames")
             for k, (c, n) in correct.items() if n]
    rows.append(("training frames/s", f"{fps[True]:,.0f} augmented, {fps[False]:,.0f} without "
                                      f"({fps[True] / fps[False]:.2f}x; {threads} threads)"))
    rows.append(("x real time, 1 thread", ", ".join(f"{m} {x:.0f}x" for m, x in speeds.items())))
    table(f"VAE on real instruments: {REAL_VAE['config']} {' '.join(REAL_VAE['overrides'])}, "
          f"{REAL_VAE['minutes']:g} min", rows)
    chain, keep = paths["encode -> decode rtpghi"]["sc_db"], paths["forward keep_input"]["sc_db"]
    print(f"  targets: encode -> decode (rtpghi) <= -14 dB: {'met' if chain <= -14 else 'MISSED'} ({chain:.2f}); "
          f"forward keep_input <= -17 dB: {'met' if keep <= -17 else 'MISSED'} ({keep:.2f}); every method >= 20x: "
          f"{'met' if min(speeds.values()) >= 20 else 'MISSED'}; augmentation within 15% of plain: "
          f"{'met' if fps[True] >= 0.85 * fps[False] else 'MISSED'}")


# ---- ordered latents and the fidelity knob on real instruments ----------------------------------

def bench_real_latents(results, workdir, sizes=(1, 2, 4, 8)):
    """The latest real_vae run of this workdir (run `--only real_vae` first) exported with its first K
    ordered latents (script.py --latent_size K): held-out SC through the .ts forward (buffer 2048,
    keep_input) against K, beside PCA-K of the training frames; each axis's share of the variance;
    the export's speed per method on one thread at K = 8 and the smallest K."""
    runs = sorted((workdir / "runs" / "real_vae").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    if not runs:
        table("ordered latents on real instruments", [("skipped", "no real_vae run in this workdir: run --only real_vae")])
        return
    run = runs[-1]
    rendered = _real_instruments(workdir, "ordered latents on real instruments")
    if rendered is None:
        return
    root, train_files, heldout_files = rendered
    model, checkpoint = models.load_vae(run / "best.pt")
    axes = models.run_latent_axes(run / "best.pt", checkpoint, run)
    config = checkpoint["config"]
    cache = Path(config["rundir"]) / "cache"
    train_set = load_frames(config, workdir / "real_vae_train_audio", train_files, cache)
    heldout_set = load_frames(config, root, heldout_files, cache)
    with torch.no_grad():
        pca = pca_reconstructions(model.normalize(train_set.mags), model.normalize(heldout_set.mags), sizes)
    ref = heldout_set.mags.numpy()
    share = (axes["variance"] / axes["variance"].sum()).tolist()
    rows = [("variance share per axis", "  ".join(f"{100 * s:.0f}%" for s in share))]
    figures = {"variance_share": share, "sizes": {}}
    for k in sizes:
        target = script.export(run, workdir / f"real_latents_{k}", force=True, verbose=False, name="best", latent_size=k)
        torch.set_num_threads(1)
        host = NnHost(target)
        buffer, n_labels = 2048, host.params["forward"][0] - 1
        scores = []
        for key in heldout_files:
            audio = data.load_audio(root / key, config["data"]["transform"]["sr"])
            scores.append(_stft_db(audio, _played_forward(host, audio, buffer)[0]))
        pca_db = float(sc_db(ref, model.denormalize(pca[k]).numpy()))
        speed = {}
        if k in (min(sizes), max(sizes)):
            inputs = {"encode": torch.randn(1, 1, buffer) * 0.1,
                      "decode": torch.cat([torch.randn(1, k, buffer // host.params["decode"][1]),
                                           torch.full((1, host.params["decode"][0] - k, buffer // host.params["decode"][1]), -1.0)], 1),
                      "forward": torch.cat([torch.randn(1, 1, buffer) * 0.1, torch.full((1, n_labels, buffer), -1.0)], 1)}
            for method, x in inputs.items():
                seconds = _seconds_per_call(host.model, method, [x])
                speed[method] = buffer / config["data"]["transform"]["sr"] / seconds
        torch.set_num_threads(REAL_VAE["threads"])
        figures["sizes"][k] = {"ts_forward_sc_db": float(np.mean(scores)), "pca_sc_db": pca_db,
                               "share": float(sum(share[:k])), "x_real_time_1thread": speed}
        rows.append((f"K = {k} ({100 * sum(share[:k]):.0f}% of the variance)",
                     f".ts forward SC {np.mean(scores):6.2f} dB   PCA-{k} {pca_db:6.2f} dB"
                     + (("   speed " + ", ".join(f"{m} {x:.0f}x" for m, x in speed.items())) if speed else "")))
    results["real_latents"] = figures
    table(f"ordered latents on real instruments ({run}, best.pt; held-out files, buffer 2048)", rows)


# ---- the prior on real instruments ----------------------------------------------------------------

REAL_PRIOR = {"minutes": 10.0, "threads": 2, "vae": None, "vae_minutes": 10.0, "pitch_shifts": "-2,-1,1,2",
              "configs": ["decoder_only", "recurrent", "encoder_decoder_continuous", "decoder_only_large"]}


def _real_instruments_vae(workdir, root, train_files):
    """The VAE whose latents the prior learns: --vae FILE, or the real_vae section's export when it ran
    in this workdir, or dgt_normal trained here on the training files for REAL_PRIOR["vae_minutes"]."""
    if REAL_PRIOR["vae"]:
        return Path(REAL_PRIOR["vae"])
    for made in sorted((workdir / "real_vae").glob("*.ts")):
        return made
    train_root = _training_root(workdir, root, train_files, "real_prior_train_audio")
    run = train_vae.main(["--config", "dgt_normal", "name=real_prior_vae", f"rundir={workdir / 'runs'}",
                          f"+data.dataset.root={train_root}", "train.max_steps=1000000", "train.val_every=1000",
                          f"train.max_minutes={REAL_PRIOR['vae_minutes']}", f"train.num_threads={REAL_PRIOR['threads']}",
                          "train.device=cpu"])
    return script.export(run, workdir / "real_prior_vae", force=True, verbose=False)


def _validation_curve(run_dir):
    """[(minutes since the first training step, validation cross-entropy)] from a run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir)).Reload()
    start = events.Scalars("train/cross_entropy")[0].wall_time if events.Scalars("train/cross_entropy") else None
    points = events.Scalars("valid/cross_entropy")
    start = start or points[0].wall_time
    return [((p.wall_time - start) / 60, p.value) for p in points]


def bench_real_prior(results, workdir):
    """The prior on latent sequences of real instruments (tests/real_instruments.py: notes over each
    instrument's range and melodies, encoded by a VAE trained on them): each config of
    REAL_PRIOR["configs"] trained for REAL_PRIOR["minutes"] on REAL_PRIOR["threads"] CPU threads, its
    validation cross-entropy against minutes beside the unigram and first-order Markov baselines on
    the same held-out files (each file on its own), and the exported model's generation speed."""
    import preprocess
    rendered = _real_instruments(workdir, "prior on real instruments")
    if rendered is None:
        return
    root, train_files, _ = rendered
    torch.set_num_threads(REAL_PRIOR["threads"])
    vae_ts = _real_instruments_vae(workdir, root, train_files)
    rows = [("VAE", str(vae_ts))]
    needed = {False: any(c != "encoder_decoder_continuous" for c in REAL_PRIOR["configs"]),
              True: "encoder_decoder_continuous" in REAL_PRIOR["configs"]}  # with loudness/f0 features
    for features, wanted in needed.items():
        db = workdir / ("real_prior_db_features" if features else "real_prior_db")
        if wanted and not (db / "index.json").exists():
            preprocess.main(["--audio", str(root / "data"), "--out", str(db), "--model", str(vae_ts),
                             "--threads", str(REAL_PRIOR["threads"]), f"--pitch_shifts={REAL_PRIOR['pitch_shifts']}"]
                            + (["--features", "loudness,f0"] if features else []))
    for name in REAL_PRIOR["configs"]:
        features = name == "encoder_decoder_continuous"
        db = workdir / ("real_prior_db_features" if features else "real_prior_db")
        run = train_prior.main(["--config", name, "--db_path", str(db), "--name", f"real_{name}",
                                f"rundir={workdir / 'runs'}", f"train.max_minutes={REAL_PRIOR['minutes']}",
                                "train.max_steps=10000000", f"train.num_threads={REAL_PRIOR['threads']}",
                                "train.device=cpu", "train.patience=0", "--model", str(vae_ts)])
        index = data.read_latent_index(db)
        split = json.loads((run / "split.json").read_text())
        baselines = data.LatentSequences(db, index, split["train"]).baseline_cross_entropies(
            data.LatentSequences(db, index, split["valid"]))
        curve = _validation_curve(run)
        best = min(ce for _, ce in curve)
        results[f"real_prior/{name}"] = {"baselines": baselines, "curve_minutes_ce": curve, "best": best,
                                         "best_over_markov": best / baselines["markov"]}
        rows.append((f"{name}: baselines", f"unigram {baselines['unigram']:.3f}, Markov {baselines['markov']:.3f} nats"))
        shown = curve if len(curve) <= 12 else [curve[i * (len(curve) - 1) // 11] for i in range(12)]
        rows.append((f"{name}: CE at minutes", "  ".join(f"{m:.1f}:{ce:.3f}" for m, ce in shown)))
        rows.append((f"{name}: best", f"{best:.3f} nats = {best / baselines['markov']:.2f} x Markov"))
        prior, checkpoint = models.load_prior(run / "best.pt")
        module = script.NnPrior(prior, checkpoint["dataset"])
        frames = 4096 // checkpoint["dataset"]["model"]["ratio"]
        kwargs = {"n_streams": prior.n_streams, "n_features": prior.n_features}
        torch.set_num_threads(1)
        scripted = torch.jit.script(module)
        scripted.set_listen("false")
        seconds = _seconds_per_call(scripted, "forward", _prior_inputs(kwargs, frames), repeats=3, calls=20,
                                    warmup=prior.context // frames + 1)
        torch.set_num_threads(REAL_PRIOR["threads"])
        rtf = 4096 / checkpoint["dataset"]["model"]["sample_rate"] / seconds
        results[f"real_prior/{name}"]["generate_rtf_1thread_buffer4096"] = rtf
        rows.append((f"{name}: export", f"generates {rtf:.1f}x real time (1 thread, buffer 4096)"))
    table(f"prior on real instruments ({REAL_PRIOR['minutes']:g} min per config, {REAL_PRIOR['threads']} threads)", rows)


SECTIONS = {"vae": bench_vae_training, "pca": bench_vae_vs_pca, "phase": bench_phase, "pitch": bench_pitch, "export": bench_export,
            "distributed": bench_distributed, "prior": bench_prior, "prior_export": bench_prior_export,
            "real_pitch": bench_real_pitch, "real_vae": bench_real_vae, "real_latents": bench_real_latents, "real_prior": bench_real_prior}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=sorted(SECTIONS), help="sections to run (default: all)")
    parser.add_argument("--json", help="write every figure to this JSON file")
    parser.add_argument("--workdir", help="where to put synthetic data and runs (default: a temporary folder)")
    parser.add_argument("--vae_minutes", type=float, default=REAL_VAE["minutes"],
                        help="real_vae: training minutes (default 10)")
    parser.add_argument("--vae_config", default=REAL_VAE["config"], help="real_vae: the config to train (default dgt_normal)")
    parser.add_argument("--vae_overrides", nargs="*", default=[], help="real_vae: config overrides (key=value)")
    parser.add_argument("--vae_run", help="real_vae: evaluate this run (a version folder) instead of training one")
    parser.add_argument("--prior_minutes", type=float, default=REAL_PRIOR["minutes"],
                        help="real_prior: training minutes per config (default 10; e.g. 60 for a long run)")
    parser.add_argument("--prior_configs", nargs="*", default=REAL_PRIOR["configs"], help="real_prior: configs to train")
    parser.add_argument("--vae", help="real_prior: the VAE .ts whose latents the prior learns (default: the real_vae "
                                      "section's, or one trained here)")
    args = parser.parse_args()
    REAL_VAE.update(minutes=args.vae_minutes, config=args.vae_config, overrides=args.vae_overrides, run=args.vae_run)
    REAL_PRIOR.update(minutes=args.prior_minutes, configs=args.prior_configs, vae=args.vae)
    results = {"torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for name in args.only or SECTIONS:
            SECTIONS[name](results, workdir)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
