"""Train an autoregressive prior (MSPrior-style) on latent sequences made by preprocess.py.

    python train_prior.py --config decoder_only --db_path /path/to/db --name training_name [key=value ...]
    python train_prior.py --config decoder_only --db_path db --name t --pretrained_embedding model.ts

Configs live in configs/prior/ (decoder_only: small ALiBi transformer, the default; recurrent: GRU;
decoder_only_large: the original's 8 x 512 transformer; encoder_decoder_continuous: conditioned on
the loudness/f0 features of `preprocess.py --features loudness,f0`). Every key=value argument
overrides a config key (a leading + is accepted). Runs go to rundir/name/version_K/ with
config.yaml, split.json, last.pt, best.pt and TensorBoard logs (tensorboard --logdir rundir).
`+check=1` prints the model and the dataset and exits; `+resume=1` continues the latest version
of rundir/name (or resume=path/to/version_K). The quantizer and resolution come from the dataset
and are stored in the checkpoint, so the export cannot disagree with the training.

Several GPUs (or CPU processes): `torchrun --nproc_per_node N train_prior.py --config ...` trains
with DistributedDataParallel. Each process draws its own train.batch_size random crops per step
(its own random generator), so the effective batch is N × train.batch_size; train.lr is used as
given (not scaled with N). Only rank 0 logs, validates and writes the run folder; +resume=1 works
the same way. On CUDA, train.amp=1 trains in mixed precision and train.compile=1 compiles the model.
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

CONFIG_DIR = Path(__file__).resolve().parent / "configs" / "prior"

# Every key a config may hold, with its default. configs/prior/*.yaml and key=value overrides change them.
DEFAULTS = {
    "name": "prior",         # run name: runs go to rundir/name/version_K
    "rundir": "runs",
    "check": 0,              # 1: print model + dataset summary and exit
    "resume": None,          # 1: continue the latest version of rundir/name; or a version folder
    "pretrained_embedding": None,  # a discrete model's .ts: initialise token embeddings from its codebook
    "decoder": None,         # the latent model's .ts that decodes generated latents for TensorBoard (--model);
                             # default: the file index.json names (the one preprocess.py encoded with)
    "data": {
        "db_path": None,             # folder written by preprocess.py (index.json, tokens/, ...)
        "valid_fraction": 0.1,       # share of files held out for validation
        "crop": 256,                 # frames per training example (the model predicts each from those before)
        "jitter": 0.0,               # probability that an input token moves to a neighbouring bin (augmentation)
    },
    "model": {
        "backbone": "transformer",   # transformer (causal ALiBi) | gru | seq2seq (needs features)
        "dim": 256,                  # model width
        "layers": 4,
        "heads": 4,                  # attention heads (transformer / seq2seq)
        "ffn_dim": 1024,             # feed-forward width (transformer / seq2seq)
        "context": 256,              # frames each attention sees: the sliding window of the nn~ export
        "dropout": 0.1,
        "encoder_layers": 2,         # seq2seq: causal encoder layers over the conditioning features
        "markov_head": 0,            # 1: a per-stream transition table p(x_t | x_{t-1}) in the head, started from
                                     # the training set's Markov chain (resolution <= 256 only; see docs/prior.md)
    },
    "train": {
        "batch_size": 16,            # crops per step and process (torchrun: N processes × this)
        "lr": 1e-3,                  # AdamW peak learning rate (not scaled with the number of processes)
        "betas": [0.9, 0.99],
        "weight_decay": 0.01,
        "warmup_steps": 1000,        # linear warm-up from warmup_start·lr to lr ...
        "warmup_start": 0.01,
        "decay_half_life": 20000,    # ... then exponential decay: lr halves every N steps (lr_schedule: constant)
        "lr_schedule": "constant",   # constant (with decay_half_life) | cosine: to lr_final·lr at the end of
        "lr_final": 0.05,            #   max_steps or max_minutes, whichever comes first
        "max_steps": 50000,
        "max_minutes": None,         # stop after this much training time (checked every log_every steps)
        "grad_clip": 1.0,            # max gradient norm (0: off)
        "seed": 0,
        "device": "auto",            # auto | cpu | cuda (under torchrun: cuda:LOCAL_RANK)
        "num_threads": None,         # CPU threads for torch (default: torch's choice)
        "amp": 0,                    # 1: mixed precision on CUDA (bf16 if supported, else fp16 + GradScaler)
        "compile": 0,                # 1: torch.compile the model for the training step
        "log_every": 100,            # progress line + TensorBoard scalars every N steps
        "val_every": 1000,           # validation + checkpoints every N steps (and at the end)
        "patience": 20,              # stop after N validations without a lower validation cross-entropy
        "top_k": 5,                  # top-k accuracy logged besides top-1
        "listen_seconds": 4.0,       # at each validation, seconds generated (primed and unprimed) for TensorBoard
    },
}


RANGES = {  # numbers out of these ranges are refused, naming the key (data.check_ranges)
    "data.valid_fraction": "[0, 1)", "data.crop": ">= 1", "data.jitter": "[0, 1]", "model.dim": ">= 1", "model.layers": ">= 1",
    "model.heads": ">= 1", "model.ffn_dim": ">= 1", "model.context": ">= 1", "model.dropout": "[0, 1)",
    "model.encoder_layers": ">= 1", "train.batch_size": ">= 1", "train.lr": ">= 0", "train.weight_decay": ">= 0",
    "train.warmup_steps": ">= 0", "train.warmup_start": "[0, 1]", "train.decay_half_life": "> 0", "train.lr_final": "[0, 1]",
    "train.max_steps": ">= 1", "train.max_minutes": "> 0", "train.grad_clip": ">= 0", "train.num_threads": ">= 1",
    "train.log_every": ">= 1", "train.val_every": ">= 1", "train.patience": ">= 0", "train.top_k": ">= 1",
    "train.listen_seconds": ">= 0"}


MARKOV_HEAD_MAX_RESOLUTION = 256  # above, the (Q, N, N) table grows too large (discrete codebooks of 1024)


def check_model_config(config, index):
    if config["train"]["lr_schedule"] not in ("constant", "cosine"):
        raise ConfigError(f"train.lr_schedule must be constant or cosine, got {config['train']['lr_schedule']!r}")
    m = config["model"]
    if m["backbone"] not in ("transformer", "gru", "seq2seq"):
        raise ConfigError(f"model.backbone must be transformer, gru or seq2seq, got {m['backbone']!r}")
    if m["backbone"] != "gru" and m["dim"] % m["heads"]:
        raise ConfigError(f"model.dim ({m['dim']}) must be a multiple of model.heads ({m['heads']})")
    if m["backbone"] == "seq2seq" and not index.get("features"):
        raise ConfigError(f"model.backbone=seq2seq needs conditioning features, and {config['data']['db_path']} "
                          "has none: preprocess with --features loudness,f0 into a new --out")


def parse_args(argv):
    return data.parse_training_command(
        argv, __doc__, CONFIG_DIR, DEFAULTS, default_config="decoder_only",
        flags={"--db_path": "data.db_path", "--name": "name", "--pretrained_embedding": "pretrained_embedding",
               "--model": "decoder"})


def token_metrics(logits, targets, top_k):
    """Cross-entropy, top-1 and top-k accuracy of (batch, frames, Q, N) logits; tensors, no host sync."""
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    top = logits.topk(min(top_k, logits.shape[-1]), dim=-1).indices  # (batch, frames, Q, k)
    hits = top == targets.unsqueeze(-1)
    return {"cross_entropy": ce, "top1": hits[..., 0].float().mean(), f"top{top_k}": hits.any(-1).float().mean()}


@torch.no_grad()
def evaluate(model, sequences, config):
    """Mean metrics over every validation file, each on its own (frame t of a file predicted from its
    frames before t, as the baselines are measured); {} when no file holds two frames."""
    model.eval()
    totals, n = {}, 0
    for tokens, features in sequences.files():
        if len(tokens) < 2:
            continue
        _, logits, targets = models.next_frame_loss(model, tokens[None], features[None] if model.n_features else None)
        for k, v in token_metrics(logits, targets, config["train"]["top_k"]).items():
            totals[k] = totals.get(k, 0.0) + float(v) * targets.numel()
        n += targets.numel()
    model.train()
    if n == 0:
        return {}
    metrics = {k: v / n for k, v in totals.items()}
    metrics["perplexity"] = math.exp(metrics["cross_entropy"])
    return metrics


def load_codebook(path, n_streams, resolution):
    """(Q, N, d) codebook of a discrete nn~ model, or None when the model has none."""
    model = models.load_torchscript(path)
    found = []
    for name, tensor in list(model.named_buffers()) + list(model.named_parameters()):
        if ("codebook" in name or name.endswith("embed") or "embedding" in name) and tensor.dim() == 2 \
                and tensor.shape[0] == resolution:
            found.append(tensor.detach().float())
    if len(found) != n_streams:
        return None
    return torch.stack(found)


def init_embedding_from_codebook(model, codebook):
    """Copy each stream's codebook (N, d) into its token embeddings (first min(d, dim) columns),
    rescaled to the embedding's initial spread."""
    q, n, d = codebook.shape
    width = min(d, model.dim)
    with torch.no_grad():
        table = model.embedding.weight.view(q, n, model.dim)
        scale = table.std() / codebook.std().clamp(min=1e-8)
        table[:, :, :width] = codebook[:, :, :width] * scale


def load_decoder(config, index, n_streams):
    """The nn~ model that decodes generated latents into audio for TensorBoard (train.decoder, or the
    file index.json names), or None, said once, when there is none to load."""
    path = config["decoder"] or index["model"].get("path")
    try:
        if not path:
            raise UserError("the dataset names no model file")
        return models.load_latent_model(path, index, n_streams)
    except UserError as e:
        data.print0(f"note: no decoder for the generated latents ({e}): TensorBoard gets the latents only; "
                    "pass --model the_vae.ts to hear them", file=sys.stderr)
        return None


@torch.no_grad()
def log_generations(writer, model, valid_set, index, decoder, step, seconds):
    """Generate `seconds` from the prior as its nn~ export does (models.StreamingPrior, temperature 1),
    primed with the start of the first validation file and unprimed, and log the latents (a figure) and,
    with a decoder, the audio. Runs on a random generator of its own: training's is left untouched."""
    tokens, features = next(((t, f) for t, f in valid_set.files() if len(t) >= 4), (None, None))
    if tokens is None:
        return
    sr, ratio = index["model"]["sample_rate"], index["model"]["ratio"]
    frames = max(2, int(seconds * sr / ratio))
    heard = min(len(tokens) // 2, frames)
    if model.n_features:  # the features drive a seq2seq prior: generate only where the file has them
        frames = min(frames, len(tokens) - heard)
    discrete = index["quantizer"] == "none"
    panels, sounds = [], []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(step)
        for name, primer in (("primed", tokens[:heard]), ("unprimed", None)):
            stream = models.StreamingPrior(model, discrete).cpu()
            start = 0
            if primer is not None:  # listen to the file's first frames, then go on
                stream(stream.dequantize(primer.cpu())[None], features[None, :heard].cpu() if model.n_features else None,
                       True, 1.0)
                start = heard
            cond = features[None, start:start + frames].cpu() if model.n_features else None
            latents, _ = stream(torch.zeros(1, frames, model.n_streams), cond, False, 1.0)  # (1, frames, Q)
            shown = torch.cat([stream.dequantize(primer.cpu()), latents[0]]) if primer is not None else latents[0]
            panels.append((f"{name}: " + (f"{heard} frames heard, then generated" if primer is not None
                                          else "generated from an all-zero frame"), shown.numpy()))
            if decoder is not None:
                sounds.append((name, models.decode_latents(decoder, latents.transpose(1, 2))[0, 0]))
    writer.add_figure("generated/latents", data.latent_figure(panels, sr / ratio), step)
    for name, audio in sounds:
        writer.add_audio(f"generated/{name}", (audio / audio.abs().max().clamp(min=1.0)).unsqueeze(0), step,
                         sample_rate=sr)


def print_check(model, index, split, train_set, valid_set, db_path, baselines):
    """What +check=1 prints: the model and the dataset."""
    n_streams, resolution = index["model"]["latent_dim"], index["resolution"]
    frame_rate = index["model"]["sample_rate"] / index["model"]["ratio"]
    print(model)
    print(f"parameters: {sum(p.numel() for p in model.parameters()):,}")
    print(f"dataset {db_path}: {len(index['files'])} files, {n_streams} streams x {resolution} tokens "
          f"({index['quantizer']}), {frame_rate:.1f} frames/s, features {index.get('features') or 'none'}")
    print(f"train: {len(split['train'])} files, {len(train_set)} frames; "
          f"valid: {len(split['valid'])} files, {len(valid_set)} frames")
    print(f"baselines on the validation files: unigram {baselines['unigram']:.3f}, first-order Markov chain "
          f"{baselines['markov']:.3f} nats per token")


def training_checkpoint(model, optimizer, step, stopper, config, prior_kwargs, index):
    """What last.pt / best.pt hold (data.save_checkpoint's format); +resume=1 reads it back."""
    dataset_info = {k: index[k] for k in ("model", "discrete", "quantizer", "resolution", "features") if k in index}
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, **stopper.state_dict(),
            "config": config, "prior": prior_kwargs, "dataset": dataset_info}


def main(argv=None):
    args, config = parse_args(sys.argv[1:] if argv is None else argv)
    print0 = data.print0  # print on rank 0 only (a plain print without torchrun)

    # ---- run folder: a new version, or the one we resume (its saved config, train.* overrides) --
    config, resume_dir = data.resume_config(config, args.overrides)
    data.check_ranges(config, RANGES)
    if resume_dir is not None:
        print0(f"resuming {resume_dir}")
    tc = config["train"]
    if config["data"]["db_path"] is None:
        raise ConfigError("no dataset: pass --db_path path/to/db (made by preprocess.py)")
    db_path = Path(config["data"]["db_path"])
    index = data.read_latent_index(db_path)
    check_model_config(config, index)

    # ---- processes and device: one process, or N under torchrun (process group from its env) --
    dist_info = data.init_distributed(tc["device"])
    device = dist_info.device
    torch.manual_seed(tc["seed"] + dist_info.rank)  # own dropout per rank; DDP copies rank 0's weights
    if tc["num_threads"]:
        torch.set_num_threads(tc["num_threads"])

    # ---- data: token sequences of the split's files, joined, on the device --------------------
    if resume_dir is not None:
        split = json.loads((resume_dir / "split.json").read_text())
    else:  # by file: every pitch-shifted copy of a training file trains, validation reads originals only
        originals = sorted({f["file"] for f in index["files"]})
        train_files, valid_files = data.split_files(originals, config["data"]["valid_fraction"], tc["seed"])
        train_files = set(train_files)
        split = {"seed": tc["seed"], "train": [f["key"] for f in index["files"] if f["file"] in train_files],
                 "valid": [f["key"] for f in index["files"] if f["file"] not in train_files and not f.get("shift")]}
    train_set = data.LatentSequences(db_path, index, split["train"]).to(device)
    valid_set = data.LatentSequences(db_path, index, split["valid"]).to(device)
    resolution, n_streams = index["resolution"], index["model"]["latent_dim"]
    crop = config["data"]["crop"]
    if len(train_set) < crop + 1:
        raise UserError(f"{db_path}: the training files hold {len(train_set)} frames, fewer than one crop "
                        f"of {crop + 1}: set data.crop={max(len(train_set) - 1, 1)} or add audio")
    # what the prior must beat on the validation files: the unigram and "the next frame looks like this one"
    baselines = train_set.baseline_cross_entropies(valid_set if len(valid_set) else train_set)

    # ---- model and optimizer, fresh or from last.pt ------------------------------------------
    if config["model"]["markov_head"] and resolution > MARKOV_HEAD_MAX_RESOLUTION:
        print0(f"note: model.markov_head is off: its table would hold {n_streams} x {resolution}² entries "
               f"(resolution > {MARKOV_HEAD_MAX_RESOLUTION})", file=sys.stderr)
        config["model"]["markov_head"] = 0
    n_features = len(index.get("features") or []) if config["model"]["backbone"] == "seq2seq" else 0
    prior_kwargs = models.prior_config_kwargs(config, n_streams, resolution, n_features)
    model = models.LatentPrior(**prior_kwargs).to(device)
    if config["check"]:
        if dist_info.is_main:
            print_check(model, index, split, train_set, valid_set, db_path, baselines)
        data.cleanup_distributed()
        sys.exit(0)
    # the Markov table holds log-probabilities: weight decay would only flatten them
    groups = [{"params": [p for name, p in model.named_parameters() if name != "head.transition"]}]
    if model.head.markov:
        groups.append({"params": [model.head.transition], "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=tc["lr"], betas=tuple(tc["betas"]), weight_decay=tc["weight_decay"])
    step, stopper = 0, data.EarlyStopping(tc["patience"])
    if n_features:  # feature normalisation statistics of the training set, stored in the model
        model.feature_mean.copy_(train_set.features.mean(0))
        model.feature_std.copy_(train_set.features.std(0).clamp(min=1e-3))
    if resume_dir is not None:  # every rank loads last.pt
        checkpoint = data.load_checkpoint(resume_dir / "last.pt")
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        step = checkpoint["step"]
        stopper.load_state_dict(checkpoint)
        run_dir = resume_dir
        torch.manual_seed(tc["seed"] + step + dist_info.rank)
    else:
        if model.head.markov:  # start as the training set's Markov chain, the rest of the head nearly silent
            with torch.no_grad():
                model.head.transition.copy_(train_set.markov_log_probs().to(device))
                model.head.out_weight.mul_(0.1)  # (zero would hold the backbone's gradients back at first)
        if config["pretrained_embedding"]:
            codebook = load_codebook(config["pretrained_embedding"], n_streams, resolution)
            if codebook is None:
                print0(f"note: {config['pretrained_embedding']} has no codebook of {n_streams} x {resolution} "
                       "codes (a continuous model?): token embeddings start from random values", file=sys.stderr)
            else:
                init_embedding_from_codebook(model, codebook.to(device))
                print0(f"token embeddings initialised from the codebook of {config['pretrained_embedding']}")
        run_dir = data.start_run(Path(config["rundir"]) / config["name"], config, split)  # made by rank 0
    print0(f"run {run_dir}: {len(train_set)} training frames ({len(split['train'])} files), {len(valid_set)} "
           f"validation frames, {n_streams} streams x {resolution} tokens, "
           f"{sum(p.numel() for p in model.parameters()):,} parameters, {device}\n"
           f"baselines on the validation files: unigram {baselines['unigram']:.3f}, first-order Markov chain "
           f"{baselines['markov']:.3f} nats per token (a prior must beat the Markov chain to have learned anything)")
    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(log_dir=str(run_dir)) if dist_info.is_main else None
    decoder = load_decoder(config, index, n_streams) if dist_info.is_main and tc["listen_seconds"] > 0 else None

    # ---- GPU options: mixed precision, torch.compile; DDP over several processes ----------------
    autocast, scaler = data.mixed_precision(tc["amp"], device)
    train_model = data.wrap_ddp(model, dist_info)  # what the step calls; `model` is saved and validated
    if tc["compile"]:
        train_model = torch.compile(train_model)
    if dist_info.world_size > 1:
        print0(f"torchrun: {dist_info.world_size} processes ({dist_info.backend}), effective batch "
               f"{dist_info.world_size} × {tc['batch_size']} = {dist_info.world_size * tc['batch_size']} crops "
               f"per step, learning rate {tc['lr']:g} (not scaled with the number of processes)")

    # ---- training loop: step -> log -> validate and checkpoint (rank 0) -> early stop ---------
    # crops come from a generator of this run, step and rank (rank 0 draws what one process would)
    generator = torch.Generator(device=device).manual_seed(tc["seed"] + step + 1_000_003 * dist_info.rank)
    last_log, frames_seen, t0 = time.time(), 0, time.time()
    start_step, max_steps = step, tc["max_steps"]
    total_steps, spent = max_steps, 0.0  # spent: the share of train.max_minutes used (rank 0's clock)
    jitter = config["data"]["jitter"]
    model.train()
    try:
        while step < max_steps:
            lr = data.learning_rate(tc, step, total_steps, spent)
            for group in optimizer.param_groups:
                group["lr"] = lr
            tokens, features = train_set.random_crops(tc["batch_size"], crop + 1, generator)  # (batch, crop + 1, Q)
            with autocast:
                jittered = models.jitter_tokens(tokens[:, :-1], jitter, resolution) if jitter else None
                loss, logits, targets = models.next_frame_loss(train_model, tokens, features if n_features else None,
                                                               jittered)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()  # DDP averages the gradients of every rank here
            if tc["grad_clip"]:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc["grad_clip"])  # no host sync
            scaler.step(optimizer)
            scaler.update()
            step += 1
            frames_seen += tokens.shape[0] * crop * dist_info.world_size
            if tc["max_minutes"] and step % tc["log_every"] == 0:  # the time budget, decided on rank 0
                spent = data.broadcast_object((time.time() - t0) / (60 * tc["max_minutes"]))
                if spent >= 1.0:
                    max_steps = step  # this step logs, validates and checkpoints as the last one

            if dist_info.is_main and (step % tc["log_every"] == 0 or step == max_steps):
                metrics = {k: float(v) for k, v in token_metrics(logits.detach(), targets, tc["top_k"]).items()}
                metrics.update(perplexity=math.exp(metrics["cross_entropy"]), lr=lr)
                for k, v in metrics.items():
                    writer.add_scalar(f"train/{k}", v, step)
                now = time.time()
                eta = (max_steps - step) * (now - t0) / max(step - start_step, 1)
                if tc["max_minutes"]:
                    eta = min(eta, 60 * tc["max_minutes"] - (now - t0))
                print(f"step {step}/{max_steps} cross-entropy {metrics['cross_entropy']:.4f} "
                      f"top1 {metrics['top1']:.3f} lr {lr:.2e} | {frames_seen / (now - last_log):,.0f} frames/s | "
                      f"ETA {eta / 60:.1f} min", flush=True)
                last_log, frames_seen = now, 0

            if step % tc["val_every"] == 0 or step == max_steps:
                if dist_info.is_main:  # the plain model under no_grad, no collective
                    metrics = evaluate(model, valid_set, config)  # {} without validation frames
                    improved = bool(metrics) and stopper.update(metrics["cross_entropy"])
                    for k, v in metrics.items():
                        writer.add_scalar(f"valid/{k}", v, step)
                    for k, v in baselines.items():
                        writer.add_scalar(f"valid/{k}_baseline", v, step)
                    if tc["listen_seconds"] > 0:
                        log_generations(writer, model, valid_set, index, decoder, step, tc["listen_seconds"])
                    checkpoint = training_checkpoint(model, optimizer, step, stopper, config, prior_kwargs, index)
                    data.save_checkpoint(run_dir / "last.pt", checkpoint)
                    if improved:
                        data.save_checkpoint(run_dir / "best.pt", checkpoint)
                    if metrics:
                        print(f"  validation at step {step}: cross-entropy {metrics['cross_entropy']:.4f} "
                              f"({metrics['cross_entropy'] / baselines['markov']:.2f} x Markov) top1 {metrics['top1']:.3f} "
                              f"perplexity {metrics['perplexity']:.2f}{' (best)' if improved else ''}")
                if data.broadcast_object(stopper.should_stop):  # rank 0's decision: every rank stops here
                    print0(f"early stop: no lower validation cross-entropy in {tc['patience']} validations")
                    break
    except KeyboardInterrupt:
        if dist_info.is_main:  # keep the progress: +resume=1 continues from here
            data.save_checkpoint(run_dir / "last.pt",
                                 training_checkpoint(model, optimizer, step, stopper, config, prior_kwargs, index))
            print(f"\ninterrupted at step {step}: saved {run_dir / 'last.pt'} (continue with +resume=1)")
        raise
    if dist_info.is_main:
        writer.close()
    data.finish_distributed(model)  # under torchrun: same weights on every rank, then leave the group
    print0(f"done: {run_dir} (best validation cross-entropy {stopper.best:.4f}; baselines: unigram "
           f"{baselines['unigram']:.4f}, Markov {baselines['markov']:.4f})")
    return run_dir


if __name__ == "__main__":
    data.run_main(main)
