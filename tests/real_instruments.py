"""Real-instrument benchmark data: General MIDI notes and melodies rendered with fluidsynth.

A helper for benchmarks, not a pytest test (nothing here is named test_*):

    .venv/bin/python tests/real_instruments.py OUT_DIR [--sr 44100] [--soundfont PATH] [--force]

writes, in the vschaos2 layout (docs/training.md "Dataset layout"):

    OUT_DIR/data/notes/<instrument>/<instrument>_<Note><octave>.wav   single notes (mono float32)
    OUT_DIR/data/melodies/<name>.wav                                  short monophonic melodies
    OUT_DIR/metadata/pitch, metadata/octave   track labels, note-on..note-off (tails unlabelled)
    OUT_DIR/metadata/instrument               one label per file
    OUT_DIR/midi/...                          the MIDI files that were rendered
    OUT_DIR/notes.json    every file: path, kind, instrument, midi, heldout, segments, gain, ...
    OUT_DIR/render.json   the parameters of the render (cache key) and its summary

MIDI convention: midi 60 = C4, octave = midi // 12 - 1, pitch class C=0 ... B=11.
Hold-out by pitch: per instrument, every 5th of its sorted notes (index % 5 == 2) is held out and
that instrument's training melodies avoid those pitches; melodies 2 and 5 are held out whole.
Rendering is dry (fluidsynth reverb and chorus off) so that release tails stay short.
"""
import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from data import PITCH_NAMES  # noqa: E402

VERSION = 1
SEED = 0
SOUNDFONTS = ["/usr/share/sounds/sf2/TimGM6mb.sf2", "/usr/share/sounds/sf3/MuseScore_General_Lite.sf3",
              "/usr/share/sounds/sf3/MuseScore_General.sf3", "/usr/share/sounds/sf2/FluidR3_GM.sf2"]
INSTALL = "apt-get install fluidsynth timgm6mb-soundfont"
# name: (GM program, zero-based; lowest midi; highest midi; step in semitones)
INSTRUMENTS = {
    "cello": (42, 36, 81, 2),     # C2..A5
    "violin": (40, 55, 100, 2),   # G3..E7
    "flute": (73, 60, 96, 2),     # C4..C7
    "clarinet": (71, 50, 82, 2),  # D3..Bb6
    "trumpet": (56, 52, 84, 2),   # E3..C6
    "piano": (0, 24, 107, 5),     # C1..B7 in fourths: 17 notes covering all 12 pitch classes
}
MELODIES = [("cello", 12.0), ("violin", 10.0), ("flute", 9.0), ("clarinet", 11.0),
            ("trumpet", 8.0), ("piano", 14.0), ("violin", 13.0)]  # (instrument, seconds)
HELDOUT_MELODIES = {2, 5}
LEAD, HOLD, TAIL = 0.05, 1.5, 0.5  # seconds: silence before note-on, note-on..note-off, release tail
GAIN = 2.0                         # fluidsynth master gain, lowered per file only if it would clip
SILENT_DB = -60.0                  # RMS over the sounding time below this: the note is skipped
TICKS_PER_BEAT, TEMPO = 500, 500000  # 500 ticks per 0.5 s quarter note: 1 tick = 1 ms


def find_soundfont():
    """The GM soundfont to use: $REAL_INSTRUMENTS_SOUNDFONT, else the first Debian one present."""
    env = os.environ.get("REAL_INSTRUMENTS_SOUNDFONT")
    if env:
        return Path(env) if Path(env).is_file() else None
    return next((Path(p) for p in SOUNDFONTS if Path(p).is_file()), None)


def missing_reason():
    """None if fluidsynth and a soundfont are present, else a one-line message saying what to install."""
    if shutil.which("fluidsynth") is None:
        return f"fluidsynth not found: {INSTALL}"
    if find_soundfont() is None:
        env = os.environ.get("REAL_INSTRUMENTS_SOUNDFONT")
        where = (f"REAL_INSTRUMENTS_SOUNDFONT={env} is not a file" if env
                 else "no General MIDI soundfont found")
        return f"{where}: {INSTALL} (or set REAL_INSTRUMENTS_SOUNDFONT)"
    return None


def note_name(midi):
    """60 -> 'C4' (MIDI convention)."""
    return f"{PITCH_NAMES[midi % 12]}{midi // 12 - 1}"


# ----------------------------------------------------------------------------------------------
# Standard MIDI file writer (type 0, one track, one channel)


def vlq(n):
    """A MIDI variable-length quantity: 7 bits a byte, most significant first, high bit = 'more'."""
    out = [n & 0x7F]
    while n > 0x7F:
        n >>= 7
        out.append(0x80 | (n & 0x7F))
    return bytes(reversed(out))


def ticks(seconds):
    return int(round(seconds * 1e6 / TEMPO * TICKS_PER_BEAT))


def midi_file(program, notes, end):
    """SMF bytes: notes = [(onset_s, offset_s, midi, velocity)] on channel 0; the track ends at `end` s."""
    events = []  # (tick, order, bytes): note-offs sort before note-ons at the same tick (legato)
    for onset, offset, pitch, velocity in notes:
        events.append((ticks(onset), 1, bytes([0x90, pitch, velocity])))
        events.append((ticks(offset), 0, bytes([0x80, pitch, 64])))
    events.sort(key=lambda e: e[:2])
    track = bytearray(b"\x00\xff\x51\x03" + TEMPO.to_bytes(3, "big"))  # tempo
    track += bytes([0, 0xC0, program, 0, 0xB0, 7, 100])                 # program, channel volume
    last = 0
    for tick, _, event in events:
        track += vlq(tick - last) + event
        last = tick
    track += vlq(max(ticks(end) - last, 0)) + b"\xff\x2f\x00"           # end of track after the tail
    return (b"MThd" + struct.pack(">IHHH", 6, 0, 1, TICKS_PER_BEAT)
            + b"MTrk" + struct.pack(">I", len(track)) + bytes(track))


# ----------------------------------------------------------------------------------------------
# What to render


def instrument_notes(name):
    """Sorted midi notes of an instrument and the held-out ones (index % 5 == 2)."""
    _, lo, hi, step = INSTRUMENTS[name]
    notes = list(range(lo, hi + 1, step))
    return notes, {m for i, m in enumerate(notes) if i % 5 == 2}


def random_melody(rng, lo, hi, seconds, avoid):
    """A seeded random walk [(onset, offset, midi, velocity)]: notes of 0.2-0.8 s, ~40 % legato."""
    allowed = [m for m in range(lo, hi + 1) if m not in avoid]
    index, t, notes = len(allowed) // 2, LEAD, []
    while True:
        length = round(float(rng.uniform(0.2, 0.8)), 3)
        if t + length > seconds - TAIL:
            return notes
        notes.append((t, round(t + length, 3), allowed[index], int(rng.integers(70, 111))))
        gap = 0.0 if rng.random() < 0.4 else float(rng.uniform(0.05, 0.3))
        t = round(t + length + gap, 3)
        index = int(np.clip(index + rng.integers(-4, 5), 0, len(allowed) - 1))


def plan():
    """Every file to render, deterministic from SEED: a list of notes.json entries (before rendering)."""
    rng = np.random.default_rng(SEED)
    entries = []
    for name, (program, *_) in INSTRUMENTS.items():
        notes, heldout = instrument_notes(name)
        for midi in notes:
            velocity = int(rng.integers(80, 111))
            entries.append(dict(path=f"data/notes/{name}/{name}_{note_name(midi)}.wav", kind="note",
                                instrument=name, program=program, midi=midi, heldout=midi in heldout,
                                velocity=velocity, seconds=round(LEAD + HOLD + TAIL, 3),
                                segments=[[LEAD, LEAD + HOLD, midi]], velocities=[velocity]))
    for i, (name, seconds) in enumerate(MELODIES):
        program, lo, hi, _ = INSTRUMENTS[name]
        held = i in HELDOUT_MELODIES
        notes = random_melody(rng, lo, hi, seconds, set() if held else instrument_notes(name)[1])
        entries.append(dict(path=f"data/melodies/melody{i}_{name}.wav", kind="melody", instrument=name,
                            program=program, midi=sorted({n[2] for n in notes}), heldout=held,
                            seconds=seconds, segments=[[on, off, m] for on, off, m, _ in notes],
                            velocities=[v for *_, v in notes]))
    return entries


# ----------------------------------------------------------------------------------------------
# Rendering


def fluidsynth(midi_path, soundfont, sr, gain):
    """Render a MIDI file (dry) -> mono float32 array (samples,).

    dynamic-sample-loading decodes only the presets used: same samples, ~2x faster on an .sf3."""
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "out.wav"
        cmd = ["fluidsynth", "-ni", "-q", "-R", "0", "-C", "0", "-o", "synth.dynamic-sample-loading=1",
               "-g", f"{gain:.4f}", "-r", str(sr),
               "-O", "float", "-T", "wav", "-F", str(wav), str(soundfont), str(midi_path)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0 or not wav.exists():
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
        audio, file_sr = sf.read(str(wav), dtype="float32", always_2d=True)  # (samples, 2)
    if file_sr != sr:
        raise RuntimeError(f"fluidsynth wrote {file_sr} Hz instead of {sr} Hz")
    return audio.mean(axis=1)


def render_entry(entry, tmp_root, soundfont, sr):
    """Render one planned file into tmp_root; adds gain/peak/rms_db to `entry`; False if silent."""
    notes = [(on, off, m, v) for (on, off, m), v in zip(entry["segments"], entry["velocities"])]
    midi_path = tmp_root / "midi" / Path(entry["path"]).relative_to("data").with_suffix(".mid")
    midi_path.parent.mkdir(parents=True, exist_ok=True)
    midi_path.write_bytes(midi_file(entry["program"], notes, entry["seconds"]))
    n = int(round(entry["seconds"] * sr))
    gain = GAIN
    for _ in range(5):  # lower the gain until the mono mixdown peaks below 0.99
        audio = fluidsynth(midi_path, soundfont, sr, gain)
        audio = np.pad(audio[:n], (0, max(n - len(audio), 0)))  # (n,): exactly `seconds` long
        peak = float(np.abs(audio).max())
        if peak < 0.99:
            break
        gain *= 0.9 / peak
    sounding = np.concatenate([audio[int(on * sr):int(off * sr)] for on, off, _ in entry["segments"]])
    rms_db = float(20 * np.log10(np.sqrt(np.mean(sounding.astype(np.float64) ** 2)) + 1e-12))
    entry.update(gain=round(gain, 4), peak=round(peak, 4), rms_db=round(rms_db, 1))
    if rms_db < SILENT_DB:
        return False
    out = tmp_root / entry["path"]
    out.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(out), audio, sr, subtype="FLOAT")
    return True


def write_labels(root, entries):
    """metadata/pitch and metadata/octave (tracks) and metadata/instrument (one label a file)."""
    tasks = {"pitch": (PITCH_NAMES, lambda m: m % 12),
             "octave": ([f"O{o}" for o in range(8)], lambda m: m // 12 - 1)}
    for task, (classes, label) in tasks.items():
        task_dir = root / "metadata" / task
        lines = []
        for e in entries:
            track = "tracks/" + Path(e["path"]).relative_to("data").with_suffix(".txt").as_posix()
            (task_dir / track).parent.mkdir(parents=True, exist_ok=True)
            (task_dir / track).write_text("".join(f"{on:.3f},{off:.3f}\t{label(m)}\n"
                                                  for on, off, m in e["segments"]))
            lines.append(f"{e['path']}\t{track}\n")
        (task_dir / "metadata.txt").write_text("".join(lines))
        (task_dir / "classes.txt").write_text("".join(f"{i}\t{n}\n" for i, n in enumerate(classes)))
    names = list(INSTRUMENTS)
    task_dir = root / "metadata" / "instrument"
    task_dir.mkdir(parents=True, exist_ok=True)
    (task_dir / "metadata.txt").write_text("".join(f"{e['path']}\t{names.index(e['instrument'])}\n"
                                                   for e in entries))
    (task_dir / "classes.txt").write_text("".join(f"{i}\t{n}\n" for i, n in enumerate(names)))


def summarize(entries):
    """Per instrument: counts of train/held-out notes and melodies, and seconds of audio."""
    rows = {}
    for e in entries:
        row = rows.setdefault(e["instrument"], {"notes_train": 0, "notes_heldout": 0, "melodies_train": 0,
                                                 "melodies_heldout": 0, "seconds": 0.0})
        row[f"{'notes' if e['kind'] == 'note' else 'melodies'}_{'heldout' if e['heldout'] else 'train'}"] += 1
        row["seconds"] = round(row["seconds"] + e["seconds"], 3)
    return rows


def render_dataset(root, sr=44100, soundfont=None, force=False):
    """Render the dataset into `root`; returns render.json's dict plus 'cached'.

    Cached: nothing is rendered if root/render.json has the same parameters and every file is there
    (unless force). The render goes to a temporary folder beside root, renamed into place at the end."""
    root = Path(root).resolve()
    soundfont = Path(soundfont) if soundfont else find_soundfont()
    if soundfont is None or not soundfont.is_file() or shutil.which("fluidsynth") is None:
        raise RuntimeError(missing_reason() or f"soundfont {soundfont} is not a file")
    stat = soundfont.stat()
    params = dict(version=VERSION, seed=SEED, sr=int(sr), soundfont=str(soundfont.resolve()),
                  soundfont_size=stat.st_size, soundfont_mtime=int(stat.st_mtime), base_gain=GAIN)
    if (root / "render.json").exists() and not force:
        done = json.loads((root / "render.json").read_text())
        entries = json.loads((root / "notes.json").read_text()) if (root / "notes.json").exists() else []
        if done.get("params") == params and entries and all((root / e["path"]).is_file() for e in entries):
            return dict(done, cached=True)
    elif root.exists() and any(root.iterdir()) and not (root / "render.json").exists():
        raise RuntimeError(f"{root} exists and is not a rendered dataset (no render.json): "
                           "not overwriting it")

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".tmp", dir=root.parent))
    try:
        start, kept, silent = time.time(), [], []
        for entry in plan():  # one file at a time: light on a shared machine
            (kept if render_entry(entry, tmp, soundfont, sr) else silent).append(entry)
        write_labels(tmp, kept)
        (tmp / "notes.json").write_text(json.dumps(kept, indent=1))
        result = dict(params=params, files=len(kept), seconds=round(sum(e["seconds"] for e in kept), 3),
                      render_seconds=round(time.time() - start, 1), max_peak=max(e["peak"] for e in kept),
                      gains=sorted({e["gain"] for e in kept}),
                      silent=[dict(path=e["path"], rms_db=e["rms_db"]) for e in silent],
                      instruments=summarize(kept))
        (tmp / "render.json").write_text(json.dumps(result, indent=1))
        old = root.with_name(f".{root.name}.old-{os.getpid()}")
        if root.exists():
            root.rename(old)
        tmp.rename(root)  # the complete render appears at once
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dict(result, cached=False)


def split(root):
    """(train_files, heldout_files): dataset-relative paths 'data/...' from notes.json."""
    entries = json.loads((Path(root) / "notes.json").read_text())
    return ([e["path"] for e in entries if not e["heldout"]], [e["path"] for e in entries if e["heldout"]])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--sr", type=int, default=44100)
    parser.add_argument("--soundfont", default=None, help="a .sf2/.sf3 (default: $REAL_INSTRUMENTS_SOUNDFONT "
                                                          "or the first Debian GM soundfont present)")
    parser.add_argument("--force", action="store_true", help="render again even if the cache matches")
    args = parser.parse_args(argv)
    if args.soundfont is None and missing_reason():
        sys.exit(f"cannot render: {missing_reason()}")
    try:
        info = render_dataset(args.out_dir, sr=args.sr, soundfont=args.soundfont, force=args.force)
    except RuntimeError as e:
        sys.exit(f"cannot render: {e}")
    print(f"{args.out_dir}: {info['files']} files, {info['seconds']:.1f} s of audio at {args.sr} Hz from "
          f"{Path(info['params']['soundfont']).name}" + (" (cached)" if info["cached"] else
                                                          f", rendered in {info['render_seconds']:.1f} s"))
    print(f"{'instrument':<10} {'notes train':>11} {'held-out':>8} {'melodies train':>14} {'held-out':>8} "
          f"{'seconds':>8}")
    for name, r in info["instruments"].items():
        print(f"{name:<10} {r['notes_train']:>11} {r['notes_heldout']:>8} {r['melodies_train']:>14} "
              f"{r['melodies_heldout']:>8} {r['seconds']:>8.1f}")
    train, heldout = split(args.out_dir)
    print(f"train {len(train)} files, held-out {len(heldout)} files; peak {info['max_peak']:.3f}, "
          f"gains {info['gains']}")
    for s in info["silent"]:
        print(f"skipped silent: {s['path']} (RMS {s['rms_db']} dB)")


if __name__ == "__main__":
    main()
