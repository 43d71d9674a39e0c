"""Train a spectral variational auto-encoder (vschaos2-style) on a folder of audio.

    python train_vae.py --config dgt_mid name=my_training rundir=my_path +data.dataset.root=my_data

Every argument after the config name is a dotted key=value override (a leading + is accepted
and means the same); values are YAML scalars. Runs go to rundir/name/version_K/ with
config.yaml, split.json, last.pt, best.pt and TensorBoard logs (tensorboard --logdir rundir).
`+check=1` prints the model and a dataset summary and exits; `+resume=1` continues the latest
version of rundir/name (or resume=path/to/version_K).

Several GPUs (or CPU processes): `torchrun --nproc_per_node N train_vae.py --config ...`
trains with DistributedDataParallel. Each process takes train.batch_size frames per step, so the
effective batch is N × train.batch_size; train.lr is used as given (not scaled with N). Only rank 0
logs, validates and writes the run folder; +resume=1 works the same way. On CUDA, train.amp=1
trains in mixed precision and train.compile=1 compiles the model with torch.compile.
"""
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import data
from data import ConfigError, UserError
import models

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

# Every key a config may hold, with its default. configs/*.yaml and key=value overrides change them.
DEFAULTS = {
    "name": "vae",           # run name: runs go to rundir/name/version_K
    "rundir": "runs",
    "check": 0,              # 1: print model + dataset summary and exit
    "resume": None,          # 1: continue the latest version of rundir/name; or a version folder
    "data": {
        "transform": {"sr": 44100, "n_fft": 1024, "hop": 256},
        "dataset": {
            "root": None,                # dataset folder holding data/ and metadata/
            "n_files": None,             # load only the first N files (sorted by path)
            "cache": None,               # spectra cache folder (default: rundir/cache)
            "metadata_callbacks": {},    # task: {name: read_single_metadata|read_multi_metadata, type: int|float}
        },
        "valid_fraction": 0.1,           # share of files held out for validation
        # pitch_p: share of frames shifted by 1..pitch_range semitones, as resampled audio (pitch and
        # octave labels follow); roll: vschaos2's shift by a few bins (not a musical pitch change)
        "augment": {"pitch_p": 0.8, "pitch_range": 4, "roll_p": 0.0, "roll_range": [-2, 1], "gain_std": 0.1},
    },
    "model": {
        "latent_dim": 8,
        "architecture": "mlp",           # mlp (fast, the default) | conv (vschaos2's conv stack)
        "encoder_hidden": [512, 256],
        "decoder_hidden": [256, 512],
        "conv": {"channels": [64, 32, 16, 8], "kernels": [3, 5, 7, 9], "strides": [1, 2, 2, 4],
                 "mlp_hidden": 800},
        "conditioning": {},              # task: {dim, target: [encoder, decoder], embedding: OneHot|Embedding}
        "prediction": {},                # task: {dim, type: MLPEncoder, args: {nlayers, hidden_dims}, target_dist: Categorical}
    },
    "train": {
        "batch_size": 256,               # frames per step and process (torchrun: N processes × this)
        "lr": 1e-3,                      # used as given: not scaled with the number of processes
        "lr_schedule": "cosine",         # cosine: down to lr_final·lr at the end of max_steps or max_minutes
        "lr_final": 0.05,                #   (held-out notes 1.2 dB closer than a constant lr after 10 minutes);
        "lr_half_life": None,            # constant: lr, or halving every lr_half_life steps
        "max_epochs": None,              # stop after this many passes over the training frames ...
        "max_steps": 20000,              # ... or this many optimizer steps, whichever comes first
        "max_minutes": None,             # ... or this much training time (checked every log_every steps)
        "seed": 0,
        "device": "auto",                # auto | cpu | cuda (under torchrun: cuda:LOCAL_RANK)
        "num_threads": None,             # CPU threads for torch (default: torch's choice)
        "beta": 0.005,                   # weight of the KL term after warm-up (0.02 before: notes it never
                                         # heard came back 1.9 dB worse, docs/training.md "Notes it never heard")
        "beta_warmup_steps": 2000,
        "free_bits": 0.05,               # nats per latent dimension left free of the KL penalty
        "log_magnitude_weight": 1.0,     # weight of the L1 term on normalised log-magnitudes
        "magnitude_sc_weight": 1.0,      # weight of spectral convergence on the magnitudes raised to
        "magnitude_power": 0.5,          #   magnitude_power (0.5: between the log and the linear magnitudes)
        "predictor_weight": 1.0,
        "log_every": 100,                # progress line + TensorBoard scalars every N steps
        "val_every": 500,                # validation + checkpoints every N steps (and at the end)
        "patience": None,                # stop after N validations without improvement
        "amp": 0,                        # 1: mixed precision on CUDA (bf16 if supported, else fp16 + GradScaler)
        "compile": 0,                    # 1: torch.compile the model for the training step
    },
}
OPEN_SECTIONS = ("data.dataset.metadata_callbacks", "model.conditioning", "model.prediction")
RANGES = {  # numbers out of these ranges are refused, naming the key (data.check_ranges)
    "data.transform.sr": ">= 1", "data.dataset.n_files": ">= 1", "data.valid_fraction": "[0, 1)",
    "data.augment.pitch_p": "[0, 1]", "data.augment.pitch_range": "[0, 12]", "data.augment.roll_p": "[0, 1]", "data.augment.gain_std": ">= 0", "model.latent_dim": ">= 1",
    "train.batch_size": ">= 1", "train.lr": ">= 0", "train.lr_half_life": "> 0", "train.max_epochs": ">= 1", "train.max_steps": ">= 1",
    "train.max_minutes": "> 0", "train.lr_final": "[0, 1]",
    "train.magnitude_sc_weight": ">= 0", "train.magnitude_power": "> 0",
    "train.num_threads": ">= 1", "train.beta": ">= 0", "train.beta_warmup_steps": ">= 0",
    "train.free_bits": ">= 0", "train.log_magnitude_weight": ">= 0", "train.predictor_weight": ">= 0",
    "train.log_every": ">= 1", "train.val_every": ">= 1", "train.patience": ">= 0"}


def check_tasks(config):
    """Check the per-task sections, which the generic key check leaves open."""
    callbacks = config["data"]["dataset"]["metadata_callbacks"] or {}
    for task, spec in callbacks.items():
        spec = spec or {}
        unknown = set(spec) - {"name", "type"}
        if unknown:
            raise ConfigError(f"unknown config key 'data.dataset.metadata_callbacks.{task}.{sorted(unknown)[0]}'")
        if spec.get("name", "read_single_metadata") not in ("read_single_metadata", "read_multi_metadata"):
            raise ConfigError(f"data.dataset.metadata_callbacks.{task}.name must be read_single_metadata "
                              f"or read_multi_metadata, got {spec.get('name')!r}")
        if spec.get("type", "int") not in ("int", "float"):
            raise ConfigError(f"data.dataset.metadata_callbacks.{task}.type must be int or float")
    for section, allowed in (("conditioning", {"dim", "target", "embedding", "embedding_dim"}),
                             ("prediction", {"dim", "type", "args", "target_dist"})):
        for task, spec in (config["model"][section] or {}).items():
            where = f"model.{section}.{task}"
            if not isinstance(spec, dict):
                raise ConfigError(f"{where} must be a section with at least 'dim'")
            unknown = set(spec) - allowed
            if unknown:
                raise ConfigError(f"unknown config key '{where}.{sorted(unknown)[0]}'")
            if not isinstance(spec.get("dim"), int) or isinstance(spec.get("dim"), bool) or spec["dim"] < 1:
                raise ConfigError(f"{where}.dim must be a positive int, got {spec.get('dim')!r}")
            if task not in callbacks:
                raise ConfigError(f"{where}: task '{task}' has no data.dataset.metadata_callbacks.{task} entry")
            if (callbacks[task] or {}).get("type", "int") != "int":
                raise ConfigError(f"{where}: only int (class) tasks can be conditioned on or predicted")
            if section == "conditioning":
                targets = spec.get("target", ["decoder"])
                if isinstance(targets, str):
                    targets = [targets]
                if not targets or set(targets) - {"encoder", "decoder"}:
                    raise ConfigError(f"{where}.target must be a list of encoder/decoder, got {spec.get('target')!r}")
                spec["target"] = list(targets)
                if spec.setdefault("embedding", "OneHot") not in ("OneHot", "Embedding"):
                    raise ConfigError(f"{where}.embedding must be OneHot or Embedding")
            else:
                if spec.setdefault("type", "MLPEncoder") != "MLPEncoder":
                    raise ConfigError(f"{where}.type must be MLPEncoder")
                if spec.setdefault("target_dist", "Categorical") != "Categorical":
                    raise ConfigError(f"{where}.target_dist must be Categorical")
                args = spec.setdefault("args", {}) or {}
                if set(args) - {"nlayers", "hidden_dims"}:
                    raise ConfigError(f"unknown config key '{where}.args.{sorted(set(args) - {'nlayers', 'hidden_dims'})[0]}'")
                spec["args"] = args
                if "encoder" in (config["model"]["conditioning"].get(task) or {}).get("target", []):
                    print(f"warning: task '{task}' both conditions the encoder and is predicted: "
                          "the predictor cannot help where the label is unknown", file=sys.stderr)
    if config["train"]["lr_schedule"] not in ("constant", "cosine"):
        raise ConfigError(f"train.lr_schedule must be constant or cosine, got {config['train']['lr_schedule']!r}")
    t = config["data"]["transform"]
    if t["hop"] < 1 or t["n_fft"] < 2 or t["hop"] > t["n_fft"]:
        raise ConfigError(f"data.transform: need 1 <= hop <= n_fft, got n_fft={t['n_fft']} hop={t['hop']}")


def parse_args(argv):
    args, config = data.parse_training_command(argv, __doc__, CONFIG_DIR, DEFAULTS, flags={"--name": "name"},
                                               open_sections=OPEN_SECTIONS)
    check_tasks(config)
    return args, config


def compute_losses(model, mags, labels, config, step, augment=False):
    """Every loss term of one batch. mags: (batch, bins) linear magnitudes; labels[task]: (batch,).

    "loss" is the VAE's objective (reconstruction + β·KL), the headline curve; the predictors'
    cross-entropies ("predictors", one "pred_<task>" each) train only the predictors (they read
    detached inputs) and are logged apart; "total" is what the step minimises.
    `model` is the SpectralVAE, or it wrapped in DistributedDataParallel and/or torch.compile: its
    forward is called through the wrapper. No host synchronisation (the values stay on the device)."""
    tc = config["train"]
    vae = getattr(model, "module", model)  # DDP (compiled or not) holds the SpectralVAE in .module
    if augment:
        a = config["data"]["augment"]
        label_dims = {task: spec["dim"] for section in ("conditioning", "prediction")
                      for task, spec in config["model"][section].items()}
        mags, labels = data.augment_frames(mags, labels, label_dims, a["pitch_p"], a["pitch_range"], a["roll_p"],
                                           a["roll_range"], a["gain_std"])
    x = vae.normalize(mags)  # (batch, bins)
    cond = models.fill_missing_labels(vae, labels)  # unlabelled -> random classes
    x_hat, mean, logvar, z = model(x, cond, sample=model.training)
    sc = models.spectral_convergence_loss(x_hat, x)
    log_l1 = (x_hat - x).abs().mean()
    # SC on compressed magnitudes (|X|^0.5): the log-domain terms alone leave the loud partials, which
    # SC and the ear hear first, as loose as the quiet ones; on linear magnitudes (power 1) training blew up
    sc_magnitude = models.spectral_convergence_loss(vae.denormalize(x_hat).pow(tc["magnitude_power"]),
                                                    mags.pow(tc["magnitude_power"]))
    kl = models.kl_divergence(mean, logvar)
    beta = models.beta_schedule(step, tc["beta"], tc["beta_warmup_steps"])
    reconstruction = sc + tc["log_magnitude_weight"] * log_l1 + tc["magnitude_sc_weight"] * sc_magnitude
    out = {"sc": sc, "log_l1": log_l1, "sc_magnitude": sc_magnitude, "kl": kl.sum(-1).mean(), "reconstruction": reconstruction,
           "loss": reconstruction + beta * models.free_bits_kl(kl, tc["free_bits"])}
    if model.training:
        out["beta"] = torch.tensor(beta)
    if vae.predictors:
        frames = x
        if model.training:  # half of the frames hidden from the predictors: decode's case, the latent alone
            frames = x * (torch.rand(x.shape[0], 1, device=x.device) < 0.5)
        out["predictors"] = torch.zeros((), device=x.device)
        for task, logits in vae.predict(mean, frames).items():
            y = labels[task]
            labelled = y >= 0
            # the seed's rule: where the label is unknown the predictor is trained on random labels
            target = torch.where(labelled, y, torch.randint_like(y, logits.shape[-1]))
            out[f"pred_{task}"] = F.cross_entropy(logits, target)
            out["predictors"] = out["predictors"] + out[f"pred_{task}"]
            # accuracy over the labelled frames; NaN when the batch has none (host_scalars leaves it out)
            out[f"acc_{task}"] = ((logits.argmax(-1) == y) & labelled).sum() / labelled.sum()
    out["total"] = out["loss"] + tc["predictor_weight"] * out.get("predictors", 0.0)
    return out


def host_scalars(losses):
    """Python floats of a loss dict (a host sync: only at log and validation time), without the
    accuracies of batches that held no labelled frame."""
    values = {k: float(v) for k, v in losses.items()}
    return {k: v for k, v in values.items() if not (k.startswith("acc_") and math.isnan(v))}


@torch.no_grad()
def evaluate(model, frames, config, step, device):
    """Mean losses over all validation frames (posterior mean, no augmentation); {} without frames."""
    if len(frames) == 0:
        return {}
    model.eval()
    totals, counts = {}, {}
    bs = config["train"]["batch_size"]
    # the random labels drawn for unlabelled frames are the same at every validation (a fixed seed,
    # training's generator untouched): two validations of the same weights give the same numbers
    devices = [device] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        for start in range(0, len(frames), bs):
            mags = frames.mags[start:start + bs].to(device)
            labels = {t: v[start:start + bs].to(device) for t, v in frames.labels.items()}
            for k, v in host_scalars(compute_losses(model, mags, labels, config, step)).items():
                totals[k] = totals.get(k, 0.0) + v * mags.shape[0]
                counts[k] = counts.get(k, 0) + mags.shape[0]
    model.train()
    return {k: totals[k] / counts[k] for k in totals}


@torch.no_grad()
def log_examples(writer, model, frames, config, step, device, log_original, max_frames=400):
    """A labelled figure of one validation file's spectrogram, original beside reconstruction (dB,
    colour map, time and frequency axes), and the reconstruction's audio; log_original: also the
    original's resynthesis from its magnitude (once per run is enough)."""
    t = config["data"]["transform"]
    model.eval()
    index = frames.file_frames(0)[:max_frames]
    mags = frames.mags[index].to(device)  # (frames, bins)
    labels = {k: v[index].to(device) for k, v in frames.labels.items()}
    x = model.normalize(mags)
    mean, _ = model.encode(x, models.fill_missing_labels(model, labels))
    cond = models.fill_missing_labels(model, labels, model.predict(mean, x))
    reconstruction = model.denormalize(model.decode(mean, cond)).cpu()  # (frames, bins)
    name = frames.files[0]
    figure = data.spectrogram_figure([(f"original: {name}", mags.t().cpu().numpy()),
                                      (f"reconstruction, step {step}", reconstruction.t().numpy())],
                                     t["sr"], t["hop"])
    writer.add_figure("valid/spectrogram_original_vs_reconstruction", figure, step)
    audio = models.reconstruct_audio(reconstruction.t(), t["n_fft"], t["hop"], "pghi", iters=10)
    writer.add_audio("valid/reconstruction", (audio / audio.abs().max().clamp(min=1.0)).unsqueeze(0), step,
                     sample_rate=t["sr"])
    if log_original:
        original = models.reconstruct_audio(mags.t().cpu(), t["n_fft"], t["hop"], "pghi", iters=10)
        writer.add_audio("valid/original_magnitude_resynthesis",
                         (original / original.abs().max().clamp(min=1.0)).unsqueeze(0), step, sample_rate=t["sr"])
    model.train()


def summarize(frames, metadata, config, split_name):
    """Files, frames and label coverage of a FrameSet, as printed by +check=1."""
    lines = [f"{split_name}: {len(frames.files)} files, {len(frames)} frames"]
    for task, y in frames.labels.items():
        if y.dtype == torch.float32:
            known = torch.isfinite(y)
            lines.append(f"  {task} (float): {known.float().mean().item():.0%} of frames labelled")
            continue
        known = y >= 0
        classes = metadata[task][1] or {}
        counts = torch.bincount(y[known]) if known.any() else torch.zeros(0, dtype=torch.long)
        per_class = ", ".join(f"{classes.get(c, c)}:{int(n)}" for c, n in enumerate(counts.tolist()) if n)
        lines.append(f"  {task}: {known.float().mean().item() if len(y) else 0:.0%} of frames labelled"
                     f"{' [' + per_class + ']' if per_class else ''}")
    return "\n".join(lines)


def load_frames(config, resume_dir, dist_info, check):
    """(train FrameSet, valid FrameSet, split, files, metadata, problems, warnings) of the config's
    dataset: the split saved in resume_dir, or a new seeded split by file. With check (+check=1),
    metadata problems are collected instead of stopping at the first."""
    ds, t, seed = config["data"]["dataset"], config["data"]["transform"], config["train"]["seed"]
    problems = [] if check else None
    callbacks = ds["metadata_callbacks"] or {}
    files, metadata = data.scan_dataset(ds["root"], ds["n_files"], callbacks, problems)
    task_dims = {task: spec["dim"] for section in ("conditioning", "prediction")
                 for task, spec in config["model"][section].items()}
    data.check_label_ranges(metadata, task_dims, problems)
    if resume_dir is not None:
        split = json.loads((resume_dir / "split.json").read_text())
    else:
        train_files, valid_files = data.split_files(files, config["data"]["valid_fraction"], seed)
        split = {"seed": seed, "train": train_files, "valid": valid_files}
    cache = ds["cache"] or str(Path(config["rundir"]) / "cache")
    warnings = []

    def warn(message):
        warnings.append(message)
        data.print0(message, file=sys.stderr)

    with data.main_process_first():  # under torchrun rank 0 fills the spectra cache, the others read it
        train_set = data.FrameSet(ds["root"], split["train"], metadata, callbacks, t, cache,
                                  progress=dist_info.is_main, warn=warn)
        valid_set = data.FrameSet(ds["root"], split["valid"], metadata, callbacks, t, cache,
                                  progress=dist_info.is_main, warn=warn)
    return train_set, valid_set, split, files, metadata, problems or [], warnings


def print_check(model, files, metadata, train_set, valid_set, problems, warnings, config):
    """What +check=1 prints: the model, the dataset and every problem found."""
    print(model)
    print(f"parameters: {sum(p.numel() for p in model.parameters()):,}")
    print(f"dataset {config['data']['dataset']['root']}: {len(files)} audio files")
    print(summarize(train_set, metadata, config, "train"))
    print(summarize(valid_set, metadata, config, "valid"))
    for message in problems + warnings:
        print(f"problem: {message}")
    print(f"{len(problems)} metadata problem(s), {len(warnings)} audio file(s) skipped")


def training_checkpoint(model, optimizer, step, epoch, stopper, config):
    """What last.pt / best.pt hold (data.save_checkpoint's format); +resume=1 reads it back."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "epoch": epoch,
            **stopper.state_dict(), "config": config}


def main(argv=None):
    args, config = parse_args(sys.argv[1:] if argv is None else argv)
    print0 = data.print0  # print on rank 0 only (a plain print without torchrun)

    # ---- run folder: a new version, or the one we resume (its saved config, train.* overrides) --
    config, resume_dir = data.resume_config(config, args.overrides)
    data.check_ranges(config, RANGES)
    if resume_dir is not None:
        print0(f"resuming {resume_dir}")
    tc = config["train"]
    if config["data"]["dataset"]["root"] is None:
        raise ConfigError("no dataset: set +data.dataset.root=path/to/my_data")

    # ---- processes and device: one process, or N under torchrun (process group from its env) --
    dist_info = data.init_distributed(tc["device"])
    device = dist_info.device
    torch.manual_seed(tc["seed"] + dist_info.rank)  # own noise per rank; DDP copies rank 0's weights
    if tc["num_threads"]:
        torch.set_num_threads(tc["num_threads"])

    # ---- data: every spectral frame of the split's files, in memory -------------------------
    check = bool(config["check"])
    train_set, valid_set, split, files, metadata, problems, warnings = load_frames(config, resume_dir, dist_info,
                                                                                   check)
    if len(train_set) == 0 and not check:
        raise UserError(f"{config['data']['dataset']['root']}: no usable training audio (every file was skipped)")

    # ---- model and optimizer, fresh or from last.pt ------------------------------------------
    model = models.build_vae(config).to(device)
    if check:
        if dist_info.is_main:
            print_check(model, files, metadata, train_set, valid_set, problems, warnings, config)
        data.cleanup_distributed()
        sys.exit(1 if problems else 0)
    model.set_normalization(train_set.mags)  # statistics of the training set (a resumed run loads its own)
    optimizer = torch.optim.Adam(model.parameters(), lr=tc["lr"])
    step, epoch, stopper = 0, 0, data.EarlyStopping(tc["patience"])
    if resume_dir is not None:  # every rank loads last.pt
        checkpoint = data.load_checkpoint(resume_dir / "last.pt")
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        step, epoch = checkpoint["step"], checkpoint["epoch"]
        stopper.load_state_dict(checkpoint)
        run_dir = resume_dir
        torch.manual_seed(tc["seed"] + step + dist_info.rank)
    else:
        run_dir = data.start_run(Path(config["rundir"]) / config["name"], config, split)  # made by rank 0
    print0(f"run {run_dir}: {len(train_set)} training frames ({len(train_set.files)} files), "
           f"{len(valid_set)} validation frames ({len(valid_set.files)} files), "
           f"{sum(p.numel() for p in model.parameters()):,} parameters, {device}")
    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(log_dir=str(run_dir)) if dist_info.is_main else None

    # ---- GPU options: mixed precision, torch.compile; DDP over several processes ----------------
    autocast, scaler = data.mixed_precision(tc["amp"], device)
    train_model = data.wrap_ddp(model, dist_info)  # what the step calls; `model` is saved and validated
    if tc["compile"]:
        train_model = torch.compile(train_model)

    # ---- batches: each epoch a new order of the frames (this rank's share under torchrun) ------
    train_mags = train_set.mags.to(device)  # (frames, bins): the whole set fits in memory
    train_labels = {k: v.to(device) for k, v in train_set.labels.items()}
    frames_per_rank = len(train_set) // dist_info.world_size  # per epoch (DistributedSampler, drop_last)
    if frames_per_rank == 0:
        raise UserError(f"{len(train_set)} training frames cannot be shared by {dist_info.world_size} processes")
    bs = min(tc["batch_size"], frames_per_rank)
    steps_per_epoch = max(1, frames_per_rank // bs)
    max_steps = tc["max_steps"] or math.inf
    if tc["max_epochs"]:
        max_steps = min(max_steps, tc["max_epochs"] * steps_per_epoch)
    if max_steps == math.inf:
        raise ConfigError("set train.max_steps or train.max_epochs")
    if dist_info.world_size > 1:
        print0(f"torchrun: {dist_info.world_size} processes ({dist_info.backend}), effective batch "
               f"{dist_info.world_size} × {bs} = {dist_info.world_size * bs} frames per step, "
               f"learning rate {tc['lr']:g} (not scaled with the number of processes)")
    order, batch_in_epoch = data.shard_indices(len(train_set), epoch, tc["seed"], device), 0

    # ---- training loop: step -> log -> validate and checkpoint (rank 0) -> early stop ---------
    last_log, frames_seen, t0 = time.time(), 0, time.time()
    start_step, original_logged = step, False
    total_steps, spent = max_steps, 0.0  # spent: the share of train.max_minutes used (rank 0's clock)
    model.train()
    try:
        while step < max_steps:
            for group in optimizer.param_groups:
                group["lr"] = data.learning_rate(tc, step, total_steps, spent)
            idx = order[batch_in_epoch * bs:(batch_in_epoch + 1) * bs]
            with autocast:
                losses = compute_losses(train_model, train_mags[idx], {k: v[idx] for k, v in train_labels.items()},
                                        config, step, augment=True)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(losses["total"]).backward()  # DDP averages the gradients of every rank here
            scaler.step(optimizer)
            scaler.update()
            step += 1
            frames_seen += bs * dist_info.world_size
            batch_in_epoch += 1
            if batch_in_epoch == steps_per_epoch:  # the epoch is done: a new order for the next one
                epoch, batch_in_epoch = epoch + 1, 0
                order = data.shard_indices(len(train_set), epoch, tc["seed"], device)
            if tc["max_minutes"] and step % tc["log_every"] == 0:  # the time budget, decided on rank 0
                spent = data.broadcast_object((time.time() - t0) / (60 * tc["max_minutes"]))
                if spent >= 1.0:
                    max_steps = step  # this step logs, validates and checkpoints as the last one

            if dist_info.is_main and (step % tc["log_every"] == 0 or step == max_steps):
                scalars = host_scalars(losses)  # the only host sync of the step, at log time
                for k, v in scalars.items():
                    writer.add_scalar(f"train/{k}", v, step)
                now = time.time()
                eta = (max_steps - step) * (now - t0) / max(step - start_step, 1)
                if tc["max_minutes"]:
                    eta = min(eta, 60 * tc["max_minutes"] - (now - t0))
                print(f"step {step}/{max_steps} epoch {epoch} loss {scalars['loss']:.4f} "
                      f"sc {scalars['sc']:.4f} kl {scalars['kl']:.2f} | "
                      f"{frames_seen / (now - last_log):,.0f} frames/s | ETA {eta / 60:.1f} min", flush=True)
                last_log, frames_seen = now, 0

            if step % tc["val_every"] == 0 or step == max_steps:
                if dist_info.is_main:  # the plain model under no_grad, no collective
                    metrics = evaluate(model, valid_set, config, step, device)  # {} without validation frames
                    # best.pt: the lowest reconstruction error on the validation files (not a total that
                    # mixes in KL weights and the predictors' cross-entropies)
                    improved = bool(metrics) and stopper.update(metrics["reconstruction"])
                    for k, v in metrics.items():
                        writer.add_scalar(f"valid/{k}", v, step)
                    if metrics:
                        log_examples(writer, model, valid_set, config, step, device, not original_logged)
                        original_logged = True
                    checkpoint = training_checkpoint(model, optimizer, step, epoch, stopper, config)
                    data.save_checkpoint(run_dir / "last.pt", checkpoint)
                    if improved:
                        data.save_checkpoint(run_dir / "best.pt", checkpoint)
                    if metrics:
                        accuracies = "".join(f" {k[4:]} accuracy {v:.3f}" for k, v in metrics.items()
                                             if k.startswith("acc_"))
                        print(f"  validation at step {step}: reconstruction {metrics['reconstruction']:.4f} "
                              f"(sc {metrics['sc']:.4f}, magnitude sc {metrics['sc_magnitude']:.4f}) loss {metrics['loss']:.4f} "
                              f"kl {metrics['kl']:.2f}{accuracies}{' (best)' if improved else ''}")
                if data.broadcast_object(stopper.should_stop):  # rank 0's decision: every rank stops here
                    print0(f"early stop: no improvement in {tc['patience']} validations")
                    break
    except KeyboardInterrupt:
        if dist_info.is_main:  # keep the progress: +resume=1 continues from here
            data.save_checkpoint(run_dir / "last.pt", training_checkpoint(model, optimizer, step, epoch, stopper, config))
            print(f"\ninterrupted at step {step}: saved {run_dir / 'last.pt'} (continue with +resume=1)")
        raise
    if dist_info.is_main:
        writer.close()
        # the latent space's principal axes and each class's mean latent, in both checkpoints: the
        # export orders its latents by them (script.py --fidelity) and recalls class presets
        class_names = {task: classes for task, (_, classes) in metadata.items()}
        for name in ("last.pt", "best.pt"):
            if (run_dir / name).exists():
                models.store_latent_axes(run_dir / name, train_set, class_names)
    data.finish_distributed(model)  # under torchrun: same weights on every rank, then leave the group
    print0(f"done: {run_dir} (best validation reconstruction error {stopper.best:.4f})")
    return run_dir


if __name__ == "__main__":
    data.run_main(main)
