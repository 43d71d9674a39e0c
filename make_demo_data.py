"""Synthesise the small demo dataset used by the README's first command and by the tests.

    python make_demo_data.py demo_data [--files 12] [--seconds 2.5]

Writes harmonic notes (several timbres, known MIDI pitches) in the vschaos2 layout:
demo_data/data/<timbre>/note_<i>.wav, with pitch-class and octave labels as track files
(metadata/pitch, metadata/octave, MIDI convention: C=0 ... B=11, octave = midi // 12 - 1), and a
per-file `timbre` label (metadata/timbre, read_single_metadata).
"""
import argparse
from pathlib import Path

import numpy as np
import soundfile as sf

from data import PITCH_NAMES
SCALE = [48, 52, 55, 60, 64, 67, 72, 76]  # C major arpeggio over three octaves (C3 .. E5)
TIMBRES = {  # name: (harmonic amplitude decay exponent, odd harmonics only)
    "soft": (2.0, False),
    "bright": (0.8, False),
    "hollow": (1.2, True),
}


def harmonic_note(midi, seconds, sr, decay, odd_only, rng):
    """A harmonic tone with a little vibrato and an attack/release envelope: (samples,) float32."""
    t = np.arange(int(seconds * sr)) / sr
    f0 = 440.0 * 2 ** ((midi - 69) / 12)
    vibrato = 1 + 0.004 * np.sin(2 * np.pi * rng.uniform(4, 6) * t)
    phase = 2 * np.pi * np.cumsum(f0 * vibrato) / sr
    note = np.zeros_like(t)
    for h in range(1, 40):
        if h * f0 >= sr / 2 - 1000 or (odd_only and h % 2 == 0):
            continue
        note += np.sin(h * phase + rng.uniform(0, 2 * np.pi)) / h ** decay
    envelope = np.minimum(1, t / 0.02) * np.minimum(1, (t[-1] - t) / 0.05) * np.exp(-t * rng.uniform(0.2, 1.0))
    return (0.3 * note * envelope / np.abs(note).max()).astype(np.float32)


def write_demo_dataset(root, n_files=12, seconds=2.5, sr=44100, seed=0):
    """Write the dataset; returns the list of (relative path, [(onset, offset, midi), ...])."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    written = []
    for i in range(n_files):
        timbre = list(TIMBRES)[i % len(TIMBRES)]
        decay, odd = TIMBRES[timbre]
        n_notes = 2
        note_len = seconds / n_notes
        audio, segments = [], []
        for k in range(n_notes):
            midi = int(rng.choice(SCALE))
            audio.append(harmonic_note(midi, note_len, sr, decay, odd, rng))
            segments.append((k * note_len, (k + 1) * note_len, midi))
        rel = f"data/{timbre}/note_{i:02d}.wav"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        sf.write(root / rel, np.concatenate(audio), sr)
        written.append((rel, segments))
    for task, label in (("pitch", lambda m: m % 12), ("octave", lambda m: m // 12 - 1)):
        task_dir = root / "metadata" / task
        (task_dir / "tracks").mkdir(parents=True, exist_ok=True)
        names = PITCH_NAMES if task == "pitch" else [f"O{o}" for o in range(8)]  # as extract_pitch.py
        (task_dir / "classes.txt").write_text("".join(f"{i}\t{n}\n" for i, n in enumerate(names)))
        lines = []
        for rel, segments in written:
            track = f"tracks/{Path(rel).relative_to('data').with_suffix('.txt').as_posix()}"
            (task_dir / track).parent.mkdir(parents=True, exist_ok=True)
            (task_dir / track).write_text("".join(f"{a:.4f},{b:.4f}\t{label(m)}\n" for a, b, m in segments))
            lines.append(f"{rel}\t{track}\n")
        (task_dir / "metadata.txt").write_text("".join(lines))
    timbre_dir = root / "metadata" / "timbre"
    timbre_dir.mkdir(parents=True, exist_ok=True)
    (timbre_dir / "classes.txt").write_text("".join(f"{i}\t{n}\n" for i, n in enumerate(TIMBRES)))
    (timbre_dir / "metadata.txt").write_text(
        "".join(f"{rel}\t{list(TIMBRES).index(Path(rel).parent.name)}\n" for rel, _ in written))
    return written


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="folder to create (must not hold a dataset already)")
    parser.add_argument("--files", type=int, default=12)
    parser.add_argument("--seconds", type=float, default=2.5, help="length of each file")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if (Path(args.root) / "data").exists():
        print(f"{args.root}/data already exists: keeping it (nothing written)")
        raise SystemExit(0)
    write_demo_dataset(args.root, args.files, args.seconds, seed=args.seed)
    print(f"wrote {args.files} files to {args.root}/data with pitch, octave and timbre metadata")
