"""Generate sound: reconstruct files through a VAE, walk its latent space, or generate with a prior.

    python generate.py reconstruct path_to_rundir --files a.wav some_folder/ --sr 44100 --out out/
    python generate.py trajectories path_to_rundir --trajectories sin random line --sr 44100 -b 3 -s 512 --out out/
    python generate.py prior runs/training_name --model vae.ts --seconds 10 -b 3 --temperature 1.0 --out out/ [--prime some.wav]

path_to_rundir is a run folder (rundir/name: its latest version, or -v K), a version folder or a
checkpoint file. `reconstruct` writes out/reconstructions/<relative path>.wav; `trajectories`
writes out/trajectories/<type>_<i>.wav and the latent path as <type>_<i>.npy. `prior` runs a
prior run (train_prior.py) exactly as its nn~ export does (listen to the --prime file's latents,
then generate) and writes out/prior/<i>.wav, decoded by the --model .ts, and the latents <i>.npy.
Files an earlier run wrote are never replaced without --force. An unreadable file, or one shorter
than one window, is reported and skipped; the others are still done.

Conditioning labels: --label TASK=VALUE (a class id or a name from classes.txt) fixes a label;
otherwise a task with a predictor takes the predictor's guess frame by frame, and a task without
one is an error asking for --label.
"""
import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import data
from data import UserError
import models

TRAJECTORIES = ("line", "sin", "square", "ellipse", "random")
PHASES = ("pghi", "griffin_lim", "rtpghi", "random")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_subparsers(dest="mode", required=True, metavar="{reconstruct,trajectories,prior}")
    run_args = argparse.ArgumentParser(add_help=False)
    run_args.add_argument("run", help="run folder (rundir/name), version folder or checkpoint file")
    data.add_checkpoint_arguments(run_args)
    data.add_out_argument(run_args, "generations")
    run_args.add_argument("--force", action="store_true", help="replace files an earlier run wrote in --out")
    run_args.add_argument("--seed", type=int, default=0)
    common = argparse.ArgumentParser(add_help=False, parents=[run_args])
    common.add_argument("--sr", type=int, help="sample rate of the written files (default: the model's)")
    common.add_argument("--phase", choices=PHASES, default="pghi",
                        help="phase reconstruction (default pghi, refined by --iters fast Griffin-Lim iterations)")
    common.add_argument("--iters", type=int, default=20, help="Griffin-Lim iterations (refinement for pghi)")
    common.add_argument("--label", action="append", default=[], metavar="TASK=VALUE",
                        help="force a conditioning label (repeatable)")
    rec = modes.add_parser("reconstruct", parents=[common], help="pass audio files through the model",
                           description="Encode and decode audio files (folders are searched recursively).")
    rec.add_argument("--files", nargs="+", required=True, help="audio files and/or folders")
    rec.add_argument("--temperature", type=float, default=0.0,
                     help="latent sampling noise: 0 = posterior mean (default), 1 = a full posterior sample")
    traj = modes.add_parser("trajectories", parents=[common], help="decode paths through the latent space",
                            description="Decode latent trajectories: line (between two N(0,1) points), sin and "
                                        "square (random amplitude/phase per dimension), ellipse, random (walk, σ 0.2).")
    traj.add_argument("--trajectories", nargs="+", default=["line"], metavar="TYPE",
                      help=f"any of {', '.join(TRAJECTORIES)}")
    traj.add_argument("-b", "--batches", type=int, default=1, help="trajectories of each type")
    traj.add_argument("-s", "--steps", type=int, default=512, help="latent frames per trajectory (one per hop)")
    traj.add_argument(*data.spellings("--from_class"), default=None, metavar="TASK=CLASS",
                      help="with --to_class: walk in a line from this class's mean latent (e.g. pitch=A) ...")
    traj.add_argument(*data.spellings("--to_class"), default=None, metavar="TASK=CLASS",
                      help="... to this one's (e.g. pitch=E); written as class_<from>_to_<to>.wav/.npy")
    prior = modes.add_parser("prior", parents=[run_args], help="generate latent sequences with a prior",
                             description="Generate with a prior run: listen to --prime (encoded by --model), "
                                         "then generate --seconds of latents and decode them with --model.")
    prior.add_argument("--model", required=True, help="the latent model's .ts (the one preprocess.py used)")
    prior.add_argument("--seconds", type=float, default=10.0, help="length to generate (default 10 s)")
    prior.add_argument("-b", "--batches", type=int, default=1, help="sequences to generate")
    prior.add_argument("--temperature", type=float, default=1.0, help="sampling temperature, 0 = most likely")
    prior.add_argument("--prime", default=None, help="an audio file whose latents start the context")
    args = parser.parse_args(argv)
    if args.mode == "prior" and (args.batches < 1 or args.seconds <= 0 or args.temperature < 0):
        parser.error("need -b >= 1, --seconds > 0 and --temperature >= 0")
    if args.mode == "trajectories":
        unknown = [t for t in args.trajectories if t not in TRAJECTORIES]
        if unknown:
            parser.error(f"unknown trajectory type '{unknown[0]}' (choose from {', '.join(TRAJECTORIES)})")
        if args.batches < 1 or args.steps < 2:
            parser.error("need -b >= 1 and -s >= 2")
        if (args.from_class is None) != (args.to_class is None):
            parser.error("--from_class and --to_class go together")
    return args


def parse_labels(specs, model, config):
    """--label TASK=VALUE list -> {task: class index}."""
    root = config["data"]["dataset"]["root"]
    out = {}
    for spec in specs:
        if "=" not in spec:
            raise UserError(f"--label {spec}: expected TASK=VALUE")
        task, value = spec.split("=", 1)
        if task not in model.task_dims:
            known = ", ".join(model.task_dims) or "none"
            raise UserError(f"--label {spec}: the model is not conditioned on '{task}' (conditioning tasks: {known})")
        try:
            index = int(value)
        except ValueError:
            classes_file = Path(root or "") / "metadata" / task / "classes.txt"
            names = {n: i for i, n in data.read_classes(classes_file).items()} if classes_file.exists() else {}
            if value not in names:
                raise UserError(f"--label {spec}: '{value}' is neither a class id nor a name in {classes_file}") from None
            index = names[value]
        if not 0 <= index < model.task_dims[task]:
            raise UserError(f"--label {spec}: class {index} outside 0..{model.task_dims[task] - 1}")
        out[task] = index
    return out


def check_labels_available(model, fixed):
    """Every conditioning task needs a fixed label or (decoder-only tasks) a predictor."""
    for task in model.task_dims:
        if task in fixed:
            continue
        if task in model.encoder_tasks:
            raise UserError(f"the encoder is conditioned on '{task}': give it with --label {task}=VALUE")
        if task not in model.predictors:
            raise UserError(f"the decoder is conditioned on '{task}' and the model has no predictor for it: "
                            f"give it with --label {task}=VALUE")


def decoder_labels(model, z, fixed, x=None):
    """Labels for decoding latent frames z (frames, latent): fixed ones, else predicted (from z and,
    when they were encoded from audio, its normalised frames x)."""
    logits = model.predict(z, x)
    labels = {}
    for task in model.task_dims:
        if task in fixed:
            labels[task] = torch.full((z.shape[0],), fixed[task], dtype=torch.long)
        else:
            labels[task] = logits[task].argmax(-1)
    return labels


def to_audio(model, x_hat, config, args):
    """Normalised frames (frames, bins) -> audio at --sr (samples,)."""
    t = config["data"]["transform"]
    mag = model.denormalize(x_hat).t()  # (bins, frames)
    audio = models.reconstruct_audio(mag, t["n_fft"], t["hop"], args.phase, iters=args.iters)
    if args.sr and args.sr != t["sr"]:
        import torchaudio
        audio = torchaudio.functional.resample(audio, t["sr"], args.sr)
    peak = audio.abs().max().item()
    return audio / peak if peak > 1.0 else audio  # normalise only what would clip


def output_names(inputs):
    """Relative output names for files and folders: folder/sub/file for folders, file for files,
    with a numeric suffix where two inputs would collide."""
    pairs, used = [], set()
    for item in inputs:
        item = Path(item)
        if not item.exists():
            pairs.append((item, None))
            continue
        files = data.find_audio_files(item)
        if item.is_dir() and not files:
            print(f"warning: {item}: no audio files", file=sys.stderr)
        for f in files:
            rel = Path(item.name) / f.relative_to(item) if item.is_dir() else Path(f.name)
            rel = rel.with_suffix(".wav")
            candidate, k = rel, 1
            while candidate.as_posix() in used:
                candidate = rel.with_name(f"{rel.stem}_{k}.wav")
                k += 1
            used.add(candidate.as_posix())
            pairs.append((f, candidate))
    return pairs


def refuse_overwrite(paths, force):
    """Nothing an earlier run wrote is replaced without --force: checked before anything is written."""
    existing = [p for p in paths if Path(p).exists()]
    if existing and not force:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise UserError(f"{existing[0]} already exists{more}: pass --force to replace, or choose another --out")


@torch.no_grad()
def reconstruct(model, config, args, fixed):
    t = config["data"]["transform"]
    out_dir = Path(args.out) / "reconstructions"
    failed, written = [], 0
    pairs = output_names(args.files)
    refuse_overwrite([out_dir / rel for _, rel in pairs if rel is not None], args.force)
    for path, rel in tqdm(pairs, desc="reconstruct", unit="file", disable=len(pairs) < 2):
        if rel is None:
            print(f"warning: {path}: no such file or folder", file=sys.stderr)
            failed.append(path)
            continue
        try:
            mag = torch.from_numpy(data.file_magnitude(path, t))  # (frames, bins), as training reads files
        except UserError as e:  # unreadable, empty, shorter than one window
            print(f"warning: skipping {e}", file=sys.stderr)
            failed.append(path)
            continue
        x = model.normalize(mag)  # (frames, bins)
        enc_labels = {k: torch.full((x.shape[0],), v, dtype=torch.long) for k, v in fixed.items()}
        mean, logvar = model.encode(x, enc_labels)
        z = mean + args.temperature * torch.exp(0.5 * logvar) * torch.randn_like(mean)
        x_hat = model.decode(z, decoder_labels(model, mean, fixed, x))
        data.save_audio(out_dir / rel, to_audio(model, x_hat, config, args), args.sr or t["sr"])
        written += 1
    print(f"wrote {written} file(s) to {out_dir}" + (f"; {len(failed)} failed" if failed else ""))
    if not written and failed:
        raise UserError("no file could be reconstructed")


def trajectory(kind, steps, dim, generator):
    """A latent path (steps, dim) of the given kind."""
    def normal(*shape):
        return torch.randn(*shape, generator=generator)

    def uniform(low, high, *shape):
        return low + (high - low) * torch.rand(*shape, generator=generator)

    s = torch.linspace(0, 1, steps).unsqueeze(1)  # (steps, 1)
    if kind == "line":
        start, end = normal(dim), normal(dim)
        return start + s * (end - start)
    if kind in ("sin", "square"):
        amplitude, cycles, phase = uniform(0.5, 2.0, dim), uniform(0.5, 4.0, dim), uniform(0, 2 * math.pi, dim)
        wave = torch.sin(2 * math.pi * cycles * s + phase)
        return amplitude * (torch.sign(wave) if kind == "square" else wave)
    if kind == "ellipse":
        centre, a, b = 0.3 * normal(dim), normal(dim), normal(dim)
        angle = 2 * math.pi * s
        return centre + a * torch.cos(angle) + b * torch.sin(angle)
    if kind == "random":
        return torch.cumsum(torch.cat([normal(1, dim), 0.2 * normal(steps - 1, dim)]), dim=0)
    raise ValueError(kind)


def class_latent(spec, axes):
    """--from_class/--to_class TASK=CLASS (a class id or name) -> that class's mean latent z (D,)."""
    task, _, value = spec.partition("=")
    if axes is None or task not in axes["presets"]:
        known = ", ".join(axes["presets"]) if axes else "none (the run has no latent axes)"
        raise UserError(f"{spec}: no class presets for '{task}' (tasks with presets: {known or 'none'})")
    names = axes["preset_names"][task]
    index = names.index(value) if value in names else (int(value) if value.isdigit() else -1)
    if not 0 <= index < len(names) or not torch.isfinite(axes["presets"][task][index]).all():
        raise UserError(f"{spec}: no training frame of class '{value}' (classes: {', '.join(names)})")
    return axes["mean"] + axes["rotation"] @ axes["presets"][task][index]


@torch.no_grad()
def class_walk(model, config, args, fixed, axes):
    """A line from one class's mean latent to another's, decoded."""
    t = config["data"]["transform"]
    start, end = class_latent(args.from_class, axes), class_latent(args.to_class, axes)
    out_dir = Path(args.out) / "trajectories"
    stem = f"class_{args.from_class}_to_{args.to_class}".replace("=", "-").replace("/", "-")
    refuse_overwrite([out_dir / f"{stem}.{ext}" for ext in ("wav", "npy")], args.force)
    s = torch.linspace(0, 1, args.steps)[:, None]
    z = (1 - s) * start + s * end  # (steps, latent)
    x_hat = model.decode(z, decoder_labels(model, z, fixed))
    data.save_audio(out_dir / f"{stem}.wav", to_audio(model, x_hat, config, args), args.sr or t["sr"])
    np.save(out_dir / f"{stem}.npy", z.numpy())
    print(f"wrote {out_dir / stem}.wav (+ .npy): {args.steps} frames from {args.from_class} to {args.to_class}")


@torch.no_grad()
def trajectories(model, config, args, fixed):
    t = config["data"]["transform"]
    out_dir = Path(args.out) / "trajectories"
    generator = torch.Generator().manual_seed(args.seed)
    jobs = [(kind, i) for kind in args.trajectories for i in range(args.batches)]
    refuse_overwrite([out_dir / f"{kind}_{i}.{ext}" for kind, i in jobs for ext in ("wav", "npy")], args.force)
    for kind, i in tqdm(jobs, desc="trajectories", unit="file", disable=len(jobs) < 2):
        z = trajectory(kind, args.steps, model.latent_dim, generator)  # (steps, latent)
        x_hat = model.decode(z, decoder_labels(model, z, fixed))
        data.save_audio(out_dir / f"{kind}_{i}.wav", to_audio(model, x_hat, config, args), args.sr or t["sr"])
        np.save(out_dir / f"{kind}_{i}.npy", z.numpy())
    print(f"wrote {len(jobs)} trajectories (.wav + latent .npy) to {out_dir}")


@torch.no_grad()
def prior_generation(args):
    """Listen to the primer's latents, generate, decode: the exported prior's own code, run offline."""
    out_dir = Path(args.out) / "prior"
    refuse_overwrite([out_dir / f"{i}.{ext}" for i in range(args.batches) for ext in ("wav", "npy")], args.force)
    run_version, checkpoint_path = data.find_checkpoint(args.run, args.version, args.checkpoint)
    prior, checkpoint = models.load_prior(checkpoint_path)
    dataset = checkpoint["dataset"]
    if prior.n_features:
        raise UserError("this prior is conditioned on features (seq2seq): play it in nn~ with feature inputs; "
                        "generate.py prior drives unconditioned priors only")
    model = models.load_latent_model(args.model, dataset, prior.n_streams)
    stream = models.StreamingPrior(prior, discrete=dataset["quantizer"] == "none")  # what the nn~ export runs
    q, ratio, sr = prior.n_streams, int(dataset["model"]["ratio"]), int(dataset["model"]["sample_rate"])
    if args.prime:
        audio = data.load_audio(args.prime, sr)  # (samples,)
        audio = torch.nn.functional.pad(audio, (0, -len(audio) % ratio))
        primer = model.encode(audio.view(1, 1, -1))[:, :q]  # (1, Q, frames): the latent channels
        stream(primer.transpose(1, 2).expand(args.batches, -1, -1), None, True, args.temperature)  # listen
        print(f"primed with {primer.shape[-1]} frames of {args.prime}")
    n_frames = max(1, int(round(args.seconds * sr / ratio)))
    # generate; unprimed, the context starts from one all-zero frame
    latents, perplexity = stream(torch.zeros(args.batches, n_frames, q), None, False, args.temperature)
    latents = latents.transpose(1, 2)  # (batch, Q, frames)
    audio = models.decode_latents(model, latents)  # (batch, 1, frames · ratio)
    out_dir.mkdir(parents=True, exist_ok=True)
    for i in range(args.batches):
        data.save_audio(out_dir / f"{i}.wav", audio[i, 0], sr)
        np.save(out_dir / f"{i}.npy", latents[i].t().numpy())  # (frames, Q)
    print(f"wrote {args.batches} x {n_frames / (sr / ratio):.1f} s (.wav + latent .npy) to {out_dir}; "
          f"mean perplexity {float(perplexity.mean()):.2f} of {prior.resolution}")


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    torch.manual_seed(args.seed)
    if args.mode == "prior":
        return prior_generation(args)
    run_version, checkpoint_path = data.find_checkpoint(args.run, args.version, args.checkpoint)
    model, checkpoint = models.load_vae(checkpoint_path)
    config = checkpoint["config"]
    fixed = parse_labels(args.label, model, config)
    check_labels_available(model, fixed)
    if args.mode == "reconstruct":
        reconstruct(model, config, args, fixed)
    elif args.from_class:
        class_walk(model, config, args, fixed, models.run_latent_axes(checkpoint_path, checkpoint, run_version))
    else:
        trajectories(model, config, args, fixed)


if __name__ == "__main__":
    data.run_main(main)
