"""Everything the scripts share below the models: errors, files, configs, run folders, audio, the
spectral transform, the vschaos2 dataset layout, latent datasets and torchrun helpers.

Nothing here imports from models.py: imports run data <- models <- scripts.

Sections, in the order data flows through a run:
  1. Errors and the scripts' entry point   UserError (one line, no traceback), run_main
  2. Files                                 atomic writes, sha256, is_power_of_two
  3. Configs and command lines            plain YAML + dotted key=value overrides, shared flags
  4. Run folders and checkpoints           rundir/name/version_K, resume, early stopping, .pt files
  5. Audio files                           find, load (mono, resampled), save
  6. Spectral transform                    Gaussian-windowed STFT ("DGT") and its inverse
  7. Metadata                              the vschaos2 layout: metadata.txt, classes.txt, tracks/
  8. Spectral frames                       a dataset's frames and labels in memory, cached spectra
  9. Latent sequences                      what preprocess.py writes and train_prior.py reads
 10. Distributed training                  torchrun process groups, DDP, mixed precision
 11. Figures                               labelled spectrograms and latent curves for TensorBoard

Dataset layout (as in vschaos2):

    my_data/
        data/**/*.wav                      audio, any sub-folders
        metadata/<task>/metadata.txt       "data/rel/path.wav<TAB>value" or "data/rel/path.wav<TAB>tracks/f.txt"
        metadata/<task>/classes.txt        optional, "id<TAB>name" per line
        metadata/<task>/tracks/f.txt       "onset,offset<TAB>value" per line (seconds)

A value is an int, a float or `none` (unlabelled). A spectral frame takes the label of the
segment that contains its centre; frames outside every segment are unlabelled.
"""
import argparse
import contextlib
import datetime
import hashlib
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import soundfile as sf
import torch
import torch.distributed as dist
import torchaudio
import yaml

# ----------------------------------------------------------------------------------------------
# 1. Errors and the scripts' entry point


class UserError(Exception):
    """An error caused by the user's input: scripts print its message alone, without traceback."""


class ConfigError(UserError):
    pass


class MetadataError(UserError):
    pass


class AudioError(UserError):
    pass


class CheckpointError(UserError):
    pass


def run_main(main):
    """Run a script's main(), turning UserError (and Ctrl-C) into one clear line and exit code.

    A process of a gloo group (torchrun on CPUs) then ends with os._exit, its output flushed:
    tearing the group down can deadlock (the group's destructor joins a worker thread that waits
    for the GIL the destructor holds) or abort at interpreter exit (torch 2.5.1: 1 run in 16, and
    1 in 30, on a loaded 2-core machine). Every file is written and closed by then."""
    code = 0
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    except SystemExit as e:  # argparse's errors, +check=1
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "gloo":
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


# ----------------------------------------------------------------------------------------------
# 2. Files: written through a temporary file and an atomic rename, so an interrupted run never
#    leaves half a file under the real name


@contextlib.contextmanager
def atomic_path(path):
    """A temporary path beside `path`; renamed onto `path` when the block ends without error,
    removed when it raises. `with atomic_path(p) as tmp: torch.save(obj, tmp)`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json_atomic(path, obj):
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=1)


def write_yaml_atomic(path, obj):
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        yaml.safe_dump(obj, f, sort_keys=False)


def save_npy(path, array):
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_power_of_two(n):
    """nn~ needs power-of-two ratios (a model's hop, a latent ratio)."""
    return n >= 1 and (n & (n - 1)) == 0


# ----------------------------------------------------------------------------------------------
# 3. Configs (plain YAML + dotted key=value overrides) and the flags every script spells the same way


_FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)$")


def fix_floats(obj):
    """PyYAML reads '1e-4' (no dot) as a string: turn such strings into floats, recursively."""
    if isinstance(obj, str) and _FLOAT_RE.match(obj):
        return float(obj)
    if isinstance(obj, dict):
        return {k: fix_floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [fix_floats(v) for v in obj]
    return obj


def flatten_config(config, prefix=""):
    """[('a.b', value), ...] for every leaf of a nested config."""
    out = []
    for k, v in config.items():
        if isinstance(v, dict) and v:
            out += flatten_config(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v))
    return out


def parse_overrides(args):
    """['a.b=3', '+c=x'] -> [('a.b', 3), ('c', 'x')]; values parsed as YAML scalars."""
    out = []
    for arg in args:
        if "=" not in arg:
            raise ConfigError(f"cannot parse argument '{arg}': expected key=value (e.g. train.lr=1e-4)")
        key, value = arg.split("=", 1)
        key = key.lstrip("+").strip()
        if not key or not re.fullmatch(r"[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*", key):
            raise ConfigError(f"invalid config key '{key}' in '{arg}'")
        try:
            parsed = fix_floats(yaml.safe_load(value)) if value != "" else None
        except yaml.YAMLError:
            parsed = value
        out.append((key, parsed))
    return out


def set_dotted(config, key, value):
    node = config
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if node.get(part) is None:
            node[part] = {}
        if not isinstance(node[part], dict):
            raise ConfigError(f"cannot set '{key}': '{'.'.join(parts[:i + 1])}' is not a section")
        node = node[part]
    node[parts[-1]] = value


def deep_merge(base, update):
    """A copy of `base` with `update` merged in (dicts merged recursively, other values replaced)."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path):
    try:
        with open(path) as f:
            content = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    content = fix_floats(content)
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise ConfigError(f"{path}: a config must be a mapping of keys to values")
    return content


def resolve_config_path(name, config_dir):
    """`--config dgt_mid` -> configs/dgt_mid.yaml; a path to any .yaml also works."""
    if name.endswith((".yaml", ".yml")) or os.sep in name:
        path = Path(name)
    else:
        path = Path(config_dir) / f"{name}.yaml"
    if not path.exists():
        available = ", ".join(list_configs(config_dir)) or "none"
        raise ConfigError(f"config '{name}' not found ({path}); available: {available}")
    return path


def list_configs(config_dir):
    return sorted(p.stem for p in Path(config_dir).glob("*.yaml"))


def check_config(config, schema, open_sections=(), prefix=""):
    """Check keys and types of `config` against `schema` (the defaults).

    Keys absent from the schema are errors, except under `open_sections` (dotted paths whose
    children are free, e.g. per-task sections). A None default accepts any value; an int is
    accepted where a float is expected."""
    for key, value in config.items():
        path = f"{prefix}{key}"
        if path in open_sections:
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"config key '{path}' must be a section (mapping), got {value!r}")
            continue
        if key not in schema:
            close = [k for k in schema if k.lower() == key.lower() or k.startswith(key[:3])]
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{path}'{hint}")
        expected = schema[key]
        if isinstance(expected, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{path}' must be a section, got {value!r}")
            check_config(value, expected, open_sections, path + ".")
        elif expected is not None and value is not None:
            ok = isinstance(value, type(expected))
            if isinstance(expected, float) and isinstance(value, int) and not isinstance(value, bool):
                ok = True
            if isinstance(expected, int) and not isinstance(expected, bool) and isinstance(value, bool):
                ok = False
            if isinstance(expected, bool) and isinstance(value, int) and value in (0, 1):
                ok = True
            if not ok:
                raise ConfigError(f"config key '{path}' expects {type(expected).__name__}, got {value!r}")


def load_config(name, overrides, defaults, config_dir="configs", open_sections=()):
    """Defaults <- configs/NAME.yaml <- key=value overrides, checked against the defaults."""
    config = defaults
    if name is not None:
        path = resolve_config_path(name, config_dir)
        file_config = read_yaml(path)
        try:
            check_config(file_config, defaults, open_sections)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        config = deep_merge(config, file_config)
    config = json.loads(json.dumps(config))  # deep copy of plain data
    for key, value in parse_overrides(overrides):
        set_dotted(config, key, value)
    check_config(config, defaults, open_sections)
    return config


def check_ranges(config, ranges):
    """Numbers of a config must lie in their range, e.g. {"train.max_steps": ">= 1", "train.lr": "> 0",
    "data.valid_fraction": "[0, 1)"}: a ConfigError naming the key otherwise. Unset (None) keys pass."""
    for key, rule in ranges.items():
        value = config
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is None or isinstance(value, bool):
            continue
        if rule.startswith(">="):
            ok = value >= float(rule[2:])
        elif rule.startswith(">"):
            ok = value > float(rule[1:])
        else:  # "[low, high]" or "[low, high)"
            low, high = (float(v) for v in rule[1:-1].split(","))
            ok = low <= value and (value <= high if rule.endswith("]") else value < high)
        if not ok:
            raise ConfigError(f"config key '{key}' must be {rule}, got {value!r}")


def spellings(flag):
    """A multi-word flag in both spellings, underscore first (MSPrior's --db_path style), e.g.
    spellings("--crepe_step") -> ("--crepe_step", "--crepe-step"): every script accepts both."""
    return (flag, flag.replace("_", "-")) if "_" in flag else (flag,)


def add_config_argument(parser, config_dir, default=None):
    """--config NAME (vschaos2's --config-name / -cn and MSPrior's --config): a config of config_dir
    or a path to a .yaml file."""
    parser.add_argument("--config", "--config-name", "-cn", dest="config", default=default,
                        help=f"a config of {config_dir} (by name, e.g. {default or 'dgt_mid'}) or a path to a "
                             ".yaml file" + (f" (default {default})" if default else ""))


def parse_training_command(argv, description, config_dir, defaults, default_config=None, flags=None,
                           open_sections=()):
    """The command line of a trainer -> (args, config): --config NAME, options that set a config key
    (`flags`: {"--db_path": "data.db_path", ...}) and key=value overrides, in any order. --help lists
    the configs and every key with its default."""
    configs = ", ".join(list_configs(config_dir))
    keys = "\n".join(f"  {k} = {v}" for k, v in flatten_config(defaults))
    sections = f" (per-task sections: {', '.join(s + '.<task>' for s in open_sections)})" if open_sections else ""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"configs (in {config_dir}): {configs}\n\nkeys and their defaults{sections}:\n{keys}")
    add_config_argument(parser, config_dir, default_config)
    for flag, key in (flags or {}).items():
        parser.add_argument(*spellings(flag), dest=key.replace(".", "__"), default=None, metavar="VALUE",
                            help=f"sets {key}")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=20000 "
                                                     "(a leading + is accepted, as in vschaos2)")
    args = parser.parse_intermixed_args(argv)  # options and key=value overrides in any order
    for key in (flags or {}).values():
        value = getattr(args, key.replace(".", "__"))
        if value is not None:
            args.overrides.append(f"{key}={json.dumps(value)}")  # quoted: a YAML string whatever it holds
    return args, load_config(args.config, args.overrides, defaults, config_dir, open_sections)


def add_out_argument(parser, default, what="output folder"):
    """--out DIR (also -o, --output, and MSPrior's --out_path)."""
    parser.add_argument("--out", "-o", "--output", *spellings("--out_path"), dest="out", default=default,
                        help=f"{what} (default: {default or 'the run folder'})")


def add_checkpoint_arguments(parser):
    """-v K (the run's version, default the latest) and -n NAME (the checkpoint: last or best)."""
    parser.add_argument("-v", "--version", type=int, default=None, help="version K of the run (default: the latest)")
    parser.add_argument("-n", "--checkpoint", default="last",
                        help="checkpoint of the version folder: last (default) or best")


# ----------------------------------------------------------------------------------------------
# 4. Run folders (rundir/name/version_K, never overwritten) and checkpoints


def version_dirs(run_root):
    run_root = Path(run_root)
    if not run_root.is_dir():
        return []
    versions = [p for p in run_root.iterdir() if p.is_dir() and re.fullmatch(r"version_\d+", p.name)]
    return sorted(versions, key=lambda p: int(p.name.split("_")[1]))


def new_version_dir(run_root):
    """Create and return rundir/name/version_K with K one more than the largest existing."""
    run_root = Path(run_root)
    run_root.mkdir(parents=True, exist_ok=True)
    existing = version_dirs(run_root)
    k = int(existing[-1].name.split("_")[1]) + 1 if existing else 0
    while True:
        path = run_root / f"version_{k}"
        try:
            path.mkdir()  # atomic: two runs started together never share a folder
            return path
        except FileExistsError:
            k += 1


def find_run_version(path, version=None):
    """A run folder (rundir/name), a version folder or a checkpoint file -> its version folder."""
    path = Path(path)
    if path.is_file():
        return path.parent
    if not path.exists():
        raise UserError(f"{path}: no such run folder")
    if (path / "config.yaml").exists() and version is None:
        return path
    versions = version_dirs(path)
    if version is not None:
        chosen = path / f"version_{version}"
        if not chosen.is_dir():
            names = ", ".join(v.name for v in versions) or "none"
            raise UserError(f"{chosen}: no such version (available: {names})")
        return chosen
    if not versions:
        raise UserError(f"{path}: not a run folder (no config.yaml and no version_K sub-folder)")
    return versions[-1]


def resume_config(config, overrides):
    """(config, version folder to resume or None). With +resume=1 (the latest version of
    rundir/name) or resume=path/to/version_K, the run's saved config.yaml, with the `train.*`
    overrides of this command line applied (e.g. a larger train.max_steps extends a finished run)."""
    if config["resume"] in (None, 0, False):
        return config, None
    resume_dir = find_run_version(Path(config["rundir"]) / config["name"] if config["resume"] in (1, True)
                                  else config["resume"])
    saved = read_yaml(resume_dir / "config.yaml")
    for key, value in parse_overrides(overrides):
        if key.startswith("train."):
            set_dotted(saved, key, value)
    return dict(saved, resume=config["resume"], check=config["check"]), resume_dir


def find_checkpoint(path, version=None, name="last"):
    """(version folder, checkpoint file) from a run folder (its latest version, or `version`), a
    version folder (+ `name`: last or best) or a checkpoint file given directly."""
    path = Path(path)
    if path.is_file():
        return path.parent, path
    run_version = find_run_version(path, version)
    checkpoint = run_version / (name if name.endswith(".pt") else f"{name}.pt")
    if not checkpoint.is_file():
        found = ", ".join(sorted(p.stem for p in run_version.glob("*.pt"))) or "none"
        raise CheckpointError(f"{checkpoint}: no such checkpoint (available: {found}); "
                              "has this run trained long enough to validate once?")
    return run_version, checkpoint


def save_checkpoint(path, checkpoint):
    """One checkpoint format for every script: a plain dict of tensors and Python scalars/dicts
    (no pickled classes), written atomically, read back with torch.load(weights_only=True)."""
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable checkpoint ({str(e).splitlines()[0]})") from None


def learning_rate(tc, step, total_steps, spent=0.0):
    """The learning rate at `step` of a trainer's `train` section: a linear warm-up from
    warmup_start·lr over warmup_steps (when the section has them), then `lr_schedule`: constant (or
    halving every `half_life` steps when the section sets one), or cosine: down along a half cosine
    to lr_final·lr at the end of the run, its total_steps or, with max_minutes, its time (spent: the
    share of it used), whichever is further along."""
    warmup = tc.get("warmup_steps", 0)
    if step < warmup:
        return tc["lr"] * (tc["warmup_start"] + (1.0 - tc["warmup_start"]) * step / warmup)
    if tc["lr_schedule"] == "cosine":
        done = min(1.0, max((step - warmup) / max(total_steps - warmup, 1), spent))
        return tc["lr"] * (tc["lr_final"] + (1.0 - tc["lr_final"]) * 0.5 * (1.0 + math.cos(math.pi * done)))
    half_life = tc.get("lr_half_life") or tc.get("decay_half_life")
    return tc["lr"] * 0.5 ** ((step - warmup) / half_life) if half_life else tc["lr"]


class EarlyStopping:
    """The best validation value so far and the validations since it improved. Saved in every
    checkpoint (state_dict), so a resumed run keeps its count instead of starting over."""

    def __init__(self, patience=None):
        self.patience = patience
        self.best = math.inf
        self.bad_validations = 0

    def update(self, value):
        """Record one validation value (lower is better); True when it is the best so far."""
        if value < self.best:
            self.best, self.bad_validations = value, 0
            return True
        self.bad_validations += 1
        return False

    @property
    def should_stop(self):
        return bool(self.patience) and self.bad_validations >= self.patience

    def state_dict(self):
        return {"best_val": self.best, "bad_validations": self.bad_validations}

    def load_state_dict(self, checkpoint):
        self.best = checkpoint["best_val"]
        self.bad_validations = checkpoint.get("bad_validations", 0)  # absent from older checkpoints


# ----------------------------------------------------------------------------------------------
# 5. Audio files


AUDIO_EXTENSIONS = (".wav", ".aif", ".aiff", ".flac", ".ogg", ".mp3")


def find_audio_files(folder):
    """All audio files under `folder`, recursively, sorted (a file given directly is returned as is)."""
    folder = Path(folder)
    if folder.is_file():
        return [folder]
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS
                  and not p.name.startswith("."))


def load_audio(path, sr):
    """Read an audio file as mono float32 at `sr` Hz: a 1-D torch tensor (samples,).

    Any channel count is averaged to mono; any sample rate is resampled with torchaudio.
    Raises AudioError naming the file if it cannot be read or holds no samples."""
    try:
        audio, file_sr = sf.read(str(path), dtype="float32", always_2d=True)  # (samples, channels)
    except Exception as e:  # soundfile raises several types (LibsndfileError, RuntimeError, ...)
        raise AudioError(f"{path}: cannot read audio ({e})") from None
    if audio.shape[0] == 0:
        raise AudioError(f"{path}: audio file is empty")
    mono = torch.from_numpy(audio.mean(axis=1))
    if file_sr != sr:
        mono = torchaudio.functional.resample(mono, int(file_sr), int(sr))
    if not torch.isfinite(mono).all():
        raise AudioError(f"{path}: audio contains NaN or infinite samples")
    return mono.contiguous()


def save_audio(path, audio, sr):
    """Write mono or (channels, samples) float audio as a 32-bit float wav, creating folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    audio = torch.as_tensor(audio).detach().cpu().float()
    if audio.dim() == 2:
        audio = audio.t()  # soundfile wants (samples, channels)
    sf.write(str(path), audio.numpy(), int(sr), subtype="FLOAT")


# ----------------------------------------------------------------------------------------------
# 6. Spectral transform: Gaussian-windowed STFT ("DGT")
#
# spectra are one-sided, (..., bins, frames) with bins = n_fft // 2 + 1, computed with
# torch.stft(center=True) and a Gaussian window; audio is float32 (..., samples)

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
# 7. Metadata (vschaos2 layout)

MISSING = -1  # int label of an unlabelled frame (float tasks use NaN)
PITCH_NAMES = ["C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B"]  # pitch classes 0..11 (MIDI)


def parse_value(text, value_type, where, class_ids=None):
    """A metadata value -> int / float / None (for 'none'). `where` is 'file:line' for errors."""
    text = text.strip()
    if text.lower() in ("none", ""):
        return None
    if value_type == "float":
        try:
            value = float(text)
        except ValueError:
            raise MetadataError(f"{where}: '{text}' is not a float") from None
        if not math.isfinite(value):
            raise MetadataError(f"{where}: '{text}' is not a finite float")
        return value
    try:
        return int(text)
    except ValueError:
        pass
    if class_ids is not None and text in class_ids:  # a class name from classes.txt
        return class_ids[text]
    try:
        as_float = float(text)
        if as_float.is_integer():
            return int(as_float)
    except ValueError:
        pass
    raise MetadataError(f"{where}: '{text}' is not an int label" +
                        (" nor a class name of classes.txt" if class_ids else ""))


def text_lines(path, what):
    """The (line number, line) pairs of a metadata text file worth reading: blank and # lines left
    out, line ends stripped, a UTF-8 byte-order mark (Windows editors) ignored. A file that cannot
    be read or is not UTF-8 is a MetadataError naming the file and line."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise MetadataError(f"{path}: cannot read {what} ({e.strerror})") from None
    lines = []
    for lineno, chunk in enumerate(raw.splitlines(), 1):
        try:
            line = chunk.decode("utf-8")
        except UnicodeDecodeError:
            raise MetadataError(f"{path}:{lineno}: not UTF-8 text (save the {what} as UTF-8)") from None
        line = line.lstrip("\ufeff") if lineno == 1 else line
        if line.strip() and not line.lstrip().startswith("#"):
            lines.append((lineno, line.rstrip("\r\n")))
    return lines


def read_classes(path):
    """classes.txt ('id<TAB>name' lines) -> {id: name}."""
    classes = {}
    for lineno, line in text_lines(path, "classes file"):
        parts = line.split("\t")
        if len(parts) < 2:
            parts = line.split(None, 1)
        if len(parts) < 2:
            raise MetadataError(f"{path}:{lineno}: expected 'id<TAB>name', got {line.strip()!r}")
        try:
            cid = int(parts[0])
        except ValueError:
            raise MetadataError(f"{path}:{lineno}: class id '{parts[0]}' is not an int") from None
        if cid in classes:
            raise MetadataError(f"{path}:{lineno}: class id {cid} appears twice")
        classes[cid] = parts[1].strip()
    return classes


def read_track(path, value_type, class_ids=None):
    """A track file ('onset,offset<TAB>value' lines) -> list of (onset, offset, value)."""
    segments = []
    for lineno, line in text_lines(path, "track file"):
        where = f"{path}:{lineno}"
        parts = line.split("\t")
        if len(parts) != 2 or "," not in parts[0]:
            raise MetadataError(f"{where}: expected 'onset,offset<TAB>value', got {line.strip()!r}")
        try:
            onset, offset = (float(t) for t in parts[0].split(","))
        except ValueError:
            raise MetadataError(f"{where}: onset/offset '{parts[0]}' are not numbers") from None
        if not (0 <= onset <= offset):
            raise MetadataError(f"{where}: need 0 <= onset <= offset, got {onset},{offset}")
        segments.append((onset, offset, parse_value(parts[1], value_type, where, class_ids)))
    return segments


def read_metadata(root, task, callback="read_single_metadata", value_type="int", errors=None):
    """Read metadata/<task>/metadata.txt.

    Returns (labels, classes): labels maps 'data/rel/path.wav' to a value (single) or to a list
    of (onset, offset, value) segments (multi); classes is {id: name} from classes.txt or None.
    Every problem names its file and line. With `errors` (a list), problems are appended to it and
    reading goes on (for `+check=1`); without, the first one raises MetadataError."""
    def fail(message):
        if errors is None:
            raise MetadataError(message)
        errors.append(message)

    task_dir = Path(root) / "metadata" / task
    meta_path = task_dir / "metadata.txt"
    if callback not in ("read_single_metadata", "read_multi_metadata"):
        fail(f"task '{task}': unknown metadata callback '{callback}' "
             "(use read_single_metadata or read_multi_metadata)")
        return {}, None
    if value_type not in ("int", "float"):
        fail(f"task '{task}': unknown metadata type '{value_type}' (use int or float)")
        return {}, None
    if not meta_path.exists():
        fail(f"{meta_path}: metadata file of task '{task}' not found")
        return {}, None
    classes = None
    if (task_dir / "classes.txt").exists():
        try:
            classes = read_classes(task_dir / "classes.txt")
        except MetadataError as e:
            fail(str(e))
    class_ids = {name: cid for cid, name in classes.items()} if classes else None
    labels = {}
    try:
        lines = text_lines(meta_path, "metadata file")
    except MetadataError as e:
        fail(str(e))
        return {}, classes
    for lineno, line in lines:
        where = f"{meta_path}:{lineno}"
        try:
            parts = line.split("\t")
            if len(parts) != 2 or not parts[0].strip():
                raise MetadataError(f"{where}: expected 'data/path/to/file.wav<TAB>value', got {line.strip()!r}")
            key, field = parts[0].strip(), parts[1].strip()
            if key in labels:
                raise MetadataError(f"{where}: '{key}' already has a label in this file")
            if not (Path(root) / key).is_file():
                raise MetadataError(f"{where}: audio file '{key}' not found under {root}")
            if callback == "read_multi_metadata" or field.startswith("tracks/"):
                if callback == "read_single_metadata":
                    raise MetadataError(f"{where}: '{field}' is a track file but task '{task}' uses "
                                        "read_single_metadata (set its name to read_multi_metadata)")
                if not (task_dir / field).is_file():
                    raise MetadataError(f"{where}: track file '{field}' not found in {task_dir}")
                value = read_track(task_dir / field, value_type, class_ids)
            else:
                value = parse_value(field, value_type, where, class_ids)
            if classes is not None and value_type == "int":
                for v in ([s[2] for s in value] if isinstance(value, list) else [value]):
                    if v is not None and v not in classes:
                        raise MetadataError(f"{where}: label {v} is not a class id of "
                                            f"{task_dir / 'classes.txt'} (ids {min(classes)}..{max(classes)})")
            labels[key] = value
        except MetadataError as e:
            fail(str(e))
    return labels, classes


def frame_labels(value, n_frames, hop, sr, value_type="int"):
    """Per-frame labels of one file: frame t (centre at t*hop/sr seconds) takes the label of the
    segment containing its centre. Returns int64 (MISSING for unlabelled) or float32 (NaN)."""
    if value_type == "float":
        out = np.full(n_frames, np.nan, dtype=np.float32)
    else:
        out = np.full(n_frames, MISSING, dtype=np.int64)
    if value is None:
        return out
    if not isinstance(value, list):
        out[:] = value
        return out
    centres = np.arange(n_frames) * hop / sr
    for onset, offset, label in value:  # later segments win where segments overlap
        if label is None:
            continue
        inside = (centres >= onset) & (centres < offset)
        out[inside] = label
    return out


def label_values(value):
    """All non-missing values of a file's label (single value or track segments)."""
    if value is None:
        return []
    if isinstance(value, list):
        return [s[2] for s in value if s[2] is not None]
    return [value]


def check_label_ranges(metadata, task_dims, errors=None):
    """Int labels must lie in [0, dim) of the task's conditioning/prediction."""
    for task, dim in task_dims.items():
        labels, _ = metadata[task]
        for key, value in labels.items():
            bad = [v for v in label_values(value) if not (0 <= v < dim)]
            if bad:
                message = (f"task '{task}': label {bad[0]} of '{key}' is outside 0..{dim - 1} "
                           f"(raise model.conditioning/prediction.{task}.dim or fix the metadata)")
                if errors is None:
                    raise MetadataError(message)
                errors.append(message)


# ----------------------------------------------------------------------------------------------
# 8. Spectral frames of a dataset (magnitudes cached on disk) and their labels


def transform_key(transform):
    """Cache key of a transform: a change of sr, n_fft or hop never reuses a stale cache."""
    text = json.dumps({"sr": transform["sr"], "n_fft": transform["n_fft"], "hop": transform["hop"],
                       "window": "gaussian0.01", "format": 1}, sort_keys=True)
    return "dgt_" + hashlib.sha1(text.encode()).hexdigest()[:12]


def file_magnitude(path, transform, cache_dir=None):
    """|DGT| of one file: (frames, bins) float32 numpy array, cached as .npy under cache_dir.

    The cache file name hashes the audio path, size and modification time, so an edited file is
    recomputed. Raises AudioError for unreadable, empty or too-short files."""
    path = Path(path)
    cache_file = None
    if cache_dir is not None:
        stat = path.stat()
        ident = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        cache_file = Path(cache_dir) / transform_key(transform) / (hashlib.sha1(ident.encode()).hexdigest() + ".npy")
        if cache_file.exists():
            try:
                return np.load(cache_file)
            except (OSError, ValueError):
                pass  # a damaged cache entry is recomputed
    audio = load_audio(path, transform["sr"])
    if audio.shape[0] < transform["n_fft"]:
        raise AudioError(f"{path}: shorter than one window ({audio.shape[0]} < n_fft {transform['n_fft']} "
                         f"samples at {transform['sr']} Hz)")
    mag = magnitude(audio, transform["n_fft"], transform["hop"]).t().contiguous().numpy()  # (frames, bins)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        save_npy(cache_file, mag)
    return mag


def scan_dataset(root, n_files=None, metadata_callbacks=None, errors=None):
    """Find the audio files of a dataset and read its metadata.

    Returns (files, metadata): files are paths relative to root ('data/...'), metadata maps
    task -> (labels, classes). Metadata problems raise MetadataError, or go to `errors`."""
    root = Path(root)
    if not (root / "data").is_dir():
        raise UserError(f"{root}: not a dataset folder (expected audio files under {root / 'data'})")
    files = [p.relative_to(root).as_posix() for p in find_audio_files(root / "data")]
    if not files:
        raise UserError(f"{root / 'data'}: no audio files ({', '.join(AUDIO_EXTENSIONS)})")
    if n_files:
        files = files[:int(n_files)]
    metadata = {}
    for task, spec in (metadata_callbacks or {}).items():
        spec = spec or {}
        metadata[task] = read_metadata(root, task, spec.get("name", "read_single_metadata"),
                                       spec.get("type", "int"), errors)
    return files, metadata


def split_files(files, valid_fraction, seed):
    """Seeded train/validation split by file: round(files × valid_fraction) validation files, and with
    valid_fraction > 0 at least one when there are two files, at least two when there are four (one
    file is too few frames to tell a better model from noise)."""
    order = list(files)
    np.random.default_rng(seed).shuffle(order)
    n_valid = int(round(len(order) * valid_fraction))
    if valid_fraction > 0 and len(order) >= 2:
        n_valid = max(1 if len(order) < 4 else 2, n_valid)
    n_valid = min(n_valid, len(order) - 1)
    return sorted(order[n_valid:]), sorted(order[:n_valid])


class FrameSet:
    """All spectral frames of a list of files, in memory, with per-frame labels.

    mags: (frames, bins) float32 linear magnitude; labels[task]: (frames,) int64 (MISSING = -1)
    or float32 (NaN = missing); file_of_frame: (frames,) index into `files`."""

    def __init__(self, root, files, metadata, metadata_callbacks, transform, cache_dir=None,
                 progress=True, warn=print):
        from tqdm import tqdm
        mags, file_ids, kept, self.skipped = [], [], [], []
        label_parts = {task: [] for task in metadata}
        iterator = tqdm(files, desc="spectra", unit="file", disable=not progress or len(files) < 2,
                        leave=False)
        for key in iterator:
            try:
                mag = file_magnitude(Path(root) / key, transform, cache_dir)
            except (AudioError, OSError) as e:
                warn(f"warning: skipping {e}")
                self.skipped.append(key)
                continue
            for task, (labels, _) in metadata.items():
                value_type = (metadata_callbacks[task] or {}).get("type", "int")
                label_parts[task].append(frame_labels(labels.get(key), mag.shape[0], transform["hop"],
                                                      transform["sr"], value_type))
            file_ids.append(np.full(mag.shape[0], len(kept), dtype=np.int64))
            mags.append(mag)
            kept.append(key)
        self.files = kept
        bins = transform["n_fft"] // 2 + 1
        self.mags = torch.from_numpy(np.concatenate(mags)) if mags else torch.zeros(0, bins)
        self.file_of_frame = torch.from_numpy(np.concatenate(file_ids)) if file_ids else torch.zeros(0, dtype=torch.long)
        self.labels = {t: torch.from_numpy(np.concatenate(p)) if p else torch.zeros(0, dtype=torch.long)
                       for t, p in label_parts.items()}

    def __len__(self):
        return self.mags.shape[0]

    def file_frames(self, index):
        """Frame indices of file number `index` (in time order)."""
        return torch.nonzero(self.file_of_frame == index).squeeze(1)


def pitch_shift_frames(mags, semitones):
    """Magnitude frames (batch, bins) as they would be with the audio resampled `semitones` (batch,)
    higher (lower when negative): the frequency axis is stretched by 2^(semitones/12), read by linear
    interpolation between bins (bins past the top repeat the last one). For one frame this is what
    resampling the audio does (a tape played faster), up to the width of each partial's peak."""
    bins = mags.shape[1]
    ratio = torch.pow(2.0, semitones.float() / 12.0)  # (batch,)
    source = torch.arange(bins, device=mags.device, dtype=mags.dtype)[None, :] / ratio[:, None]  # (batch, bins)
    source = source.clamp(max=bins - 1)
    below = source.floor().long().clamp(max=bins - 2)
    fraction = source - below
    return torch.gather(mags, 1, below) * (1 - fraction) + torch.gather(mags, 1, below + 1) * fraction


def shift_pitch_labels(labels, semitones, task_dims):
    """Labels that follow a pitch shift: 'pitch' (12 classes, C = 0) moves by `semitones` (batch,), and
    'octave' (MIDI convention, C4 = middle C) carries over B -> C; an octave outside [0, dim) becomes
    unknown (-1). These are the tasks extract_pitch.py writes; other tasks stay as they are."""
    pitch = labels.get("pitch")
    if pitch is None or task_dims.get("pitch") != 12:
        return labels
    known = pitch >= 0
    moved = pitch + semitones
    out = dict(labels, pitch=torch.where(known, moved % 12, pitch))
    octave = labels.get("octave")
    if octave is not None and "octave" in task_dims:
        shifted = octave + torch.div(moved, 12, rounding_mode="floor")
        shifted = torch.where((shifted >= 0) & (shifted < task_dims["octave"]), shifted, torch.full_like(octave, -1))
        out["octave"] = torch.where(known & (octave >= 0), shifted, octave)
    return out


def augment_frames(mags, labels, task_dims, pitch_p=0.8, pitch_range=4, roll_p=0.0, roll_range=(-2, 1),
                   gain_std=0.1):
    """Training augmentations of linear magnitude frames (batch, bins) and their labels
    {task: (batch,)} -> (mags, labels). No host sync.

    - pitch: with probability pitch_p a frame is shifted by a whole number of semitones in
      ±pitch_range (never 0), as if its audio were resampled (pitch_shift_frames); pitch and octave
      labels follow (shift_pitch_labels). A frame model otherwise learns the pitches it was given,
      not the timbre: on notes of real instruments held out by pitch, spectral convergence went
      from -4 dB to -13.4 dB through the export after the same training time (docs/measurements.md).
    - roll (vschaos2's): with probability roll_p a roll by a few bins (edges repeated). It does not
      change pitch in a musical way (a constant offset in Hz, not a ratio); off by default.
    - gain: ×(1 + gain_std·N(0, 1))."""
    batch = mags.shape[0]
    if pitch_p > 0 and pitch_range >= 1:
        steps = torch.randint(1, int(pitch_range) + 1, (batch,), device=mags.device)
        signs = torch.randint(0, 2, (batch,), device=mags.device) * 2 - 1
        semitones = torch.where(torch.rand(batch, device=mags.device) < pitch_p, steps * signs,
                                torch.zeros_like(steps))
        mags = pitch_shift_frames(mags, semitones)
        labels = shift_pitch_labels(labels, semitones, task_dims)
    if roll_p > 0:
        shifts = torch.randint(int(roll_range[0]), int(roll_range[1]) + 1, (batch,), device=mags.device)
        shifts = torch.where(torch.rand(batch, device=mags.device) < roll_p, shifts, torch.zeros_like(shifts))
        bins = mags.shape[1]
        index = (torch.arange(bins, device=mags.device)[None, :] - shifts[:, None]).clamp(0, bins - 1)
        mags = torch.gather(mags, 1, index)
    if gain_std > 0:
        gain = (1.0 + gain_std * torch.randn(batch, 1, device=mags.device)).clamp(min=0.1)
        mags = mags * gain
    return mags, labels


# ----------------------------------------------------------------------------------------------
# 9. Latent sequences written by preprocess.py (db/index.json + tokens/, latents/, features/)


LATENT_FORMAT = 1  # the version of index.json that preprocess.py writes and this code reads


def read_latent_index(db_path, require_files=True):
    """The index.json of a latent dataset (written by preprocess.py), checked, with errors that name
    the file; require_files: a dataset holding no encoded file is an error (training needs one)."""
    db_path = Path(db_path)
    index_path = db_path / "index.json"
    if not index_path.is_file():
        raise UserError(f"{db_path}: no index.json (make the dataset with: python preprocess.py --audio "
                        f"my_audio --out {db_path} --model model.ts)")
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{index_path}: cannot read the dataset index ({e})") from None
    if not isinstance(index, dict) or index.get("format") != LATENT_FORMAT:
        raise UserError(f"{index_path}: not a dataset index of this toolkit (format {LATENT_FORMAT})")
    for key in ("model", "resolution", "quantizer", "files"):
        if key not in index:
            raise UserError(f"{index_path}: missing '{key}' (not written by preprocess.py?)")
    if not isinstance(index["files"], list) or (require_files and not index["files"]):
        raise UserError(f"{index_path}: the dataset holds no encoded file")
    return index


class LatentSequences:
    """The token sequences (and conditioning features) of some files of a latent dataset, joined
    end to end into one stream (batch, frames, Q) in memory, as language-model corpora are:
    training crops may span a file boundary, which keeps every frame usable however short the files.
    Validation and the baselines read each file on its own (`files`): no prediction across files.
    """

    def __init__(self, db_path, index, keys):
        db_path = Path(db_path)
        tokens, features = [], []
        for key in keys:
            path = db_path / "tokens" / f"{key}.npy"
            try:
                tokens.append(torch.from_numpy(np.load(path).astype(np.int64)))  # (frames, Q)
                if index.get("features"):
                    features.append(torch.from_numpy(np.load(db_path / "features" / f"{key}.npy")).float())
            except (OSError, ValueError) as e:
                raise UserError(f"{path}: cannot read the encoded file ({e}); re-run preprocess.py") from None
        q = index["model"]["latent_dim"]
        self.keys = list(keys)
        self.lengths = [len(t) for t in tokens]  # frames of each file, in order
        self.resolution = index["resolution"]
        self.tokens = torch.cat(tokens) if tokens else torch.zeros(0, q, dtype=torch.long)  # (frames, Q)
        n_features = len(index.get("features") or [])
        self.features = torch.cat(features) if features else torch.zeros(len(self.tokens), n_features)
        if len(self.tokens) and (self.tokens.min() < 0 or self.tokens.max() >= self.resolution):
            raise UserError(f"{db_path}: tokens outside [0, {self.resolution}): the dataset is corrupt")

    def __len__(self):
        return len(self.tokens)

    def to(self, device):
        self.tokens, self.features = self.tokens.to(device), self.features.to(device)
        return self

    def files(self):
        """Each file on its own: a list of (tokens (frames, Q), features (frames, F))."""
        return list(zip(self.tokens.split(self.lengths), self.features.split(self.lengths)))

    def crops(self, starts, length):
        """Crops of `length` frames at `starts` (n,) -> tokens (n, length, Q), features (n, length, F)."""
        index = starts[:, None] + torch.arange(length, device=starts.device)[None, :]
        return self.tokens[index], self.features[index]

    def random_crops(self, n, length, generator=None):
        starts = torch.randint(0, len(self) - length + 1, (n,), device=self.tokens.device, generator=generator)
        return self.crops(starts, length)

    def markov_log_probs(self, smoothing=0.1):
        """log p(x_t | x_{t−1}) of each stream, counted over the transitions inside each file and
        add-`smoothing` smoothed: (Q, N previous, N next) float32, the first-order Markov chain."""
        n, q = self.resolution, self.tokens.shape[1]
        counts = torch.full((q, n * n), smoothing, dtype=torch.float64)
        for tokens, _ in self.files():
            pairs = (tokens[:-1] * n + tokens[1:]).cpu()  # (frames − 1, Q): previous·N + next
            for stream in range(q):
                counts[stream] += torch.bincount(pairs[:, stream], minlength=n * n).double()
        counts = counts.view(q, n, n)
        return (counts / counts.sum(-1, keepdim=True)).log().float()

    def baseline_cross_entropies(self, other):
        """What a prior must beat, in nats per token on the frames it predicts (every frame of each of
        `other`'s files but its first): the unigram (this set's token frequencies, add-one smoothed;
        ignores context) and the first-order Markov chain (markov_log_probs: "the next frame looks
        like this one")."""
        n, q = self.resolution, self.tokens.shape[1]
        counts = torch.stack([torch.bincount(self.tokens[:, s].cpu(), minlength=n) for s in range(q)]).double() + 1.0
        unigram = (counts / counts.sum(1, keepdim=True)).log()  # (Q, N)
        markov = self.markov_log_probs().double()  # (Q, N, N)
        streams = torch.arange(q)
        totals, count = {"unigram": 0.0, "markov": 0.0}, 0
        for tokens, _ in other.files():
            tokens = tokens.cpu()
            previous, following = tokens[:-1], tokens[1:]  # (frames − 1, Q)
            totals["unigram"] -= float(unigram[streams, following].sum())
            totals["markov"] -= float(markov[streams, previous, following].sum())
            count += following.numel()
        return {k: v / max(count, 1) for k, v in totals.items()}


# ----------------------------------------------------------------------------------------------
# 10. Distributed training (torchrun)
#
# `torchrun --nproc_per_node N script.py ...` starts N copies of a script with RANK, WORLD_SIZE,
# LOCAL_RANK, MASTER_ADDR and MASTER_PORT in their environment. A trainer calls init_distributed()
# once; without those variables (a plain `python script.py`) no process group is created and every
# helper below acts as for one process, so single-process runs behave exactly as before.
# Collectives (broadcast_object, main_process_first, replicas_in_sync) must be reached by every
# rank in the same order: decide anything that changes control flow on rank 0 and broadcast it.


class DistInfo(NamedTuple):
    rank: int              # global rank, 0 .. world_size - 1 (0 without torchrun)
    world_size: int        # number of processes (1 without torchrun)
    device: torch.device   # where this process trains (cuda:LOCAL_RANK under torchrun on GPUs)
    backend: Optional[str]  # "nccl" (CUDA), "gloo" (CPU), or None without torchrun

    @property
    def is_main(self):
        """Rank 0: the one process that logs, validates and writes files."""
        return self.rank == 0


def resolve_device(setting="auto", name="train.device"):
    """A device setting (auto | cpu | cuda | cuda:K) -> torch.device; auto is cuda when available.
    `name` is how the user gave it (train.device, --device), for the error message."""
    if setting in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(setting)
    except (RuntimeError, TypeError):
        raise ConfigError(f"{name} must be auto, cpu or cuda, got {setting!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        sep = "=" if "." in name else " "
        raise ConfigError(f"{name}{sep}{setting} but no CUDA device is available (use {name}{sep}auto or cpu)")
    return device


def _distributed():
    return dist.is_available() and dist.is_initialized()


def get_rank():
    """This process's global rank (RANK of torchrun before the process group exists; 0 without torchrun)."""
    return dist.get_rank() if _distributed() else int(os.environ.get("RANK", 0))


def print0(*args, **kwargs):
    """print() on rank 0 only: under torchrun the N processes would print every line N times."""
    if get_rank() == 0:
        print(*args, **kwargs)


def init_distributed(device_setting="auto", timeout_s=1800):
    """Join the process group that torchrun describes in the environment and pick this process's device.

    Under torchrun: nccl with cuda:LOCAL_RANK when the setting resolves to CUDA, else gloo on the CPU;
    `timeout_s` bounds how long a collective waits (e.g. the other ranks while rank 0 validates).
    Without torchrun: no process group, DistInfo(rank 0, world_size 1, device of the setting)."""
    device = resolve_device(device_setting)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo(0, 1, device, None)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"process with LOCAL_RANK {local_rank} has no CUDA device (this machine has "
                              f"{torch.cuda.device_count()}): use --nproc_per_node <= {torch.cuda.device_count()}")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if backend == "nccl" else None)
    return DistInfo(rank, world_size, device, backend)


def start_run(base, config, split):
    """A new run folder base/version_K holding config.yaml and split.json, made by rank 0 alone
    (never an earlier run's); its path on every rank."""
    run_dir = None
    if get_rank() == 0:
        run_dir = new_version_dir(base)
        write_yaml_atomic(run_dir / "config.yaml", config)
        write_json_atomic(run_dir / "split.json", split)
    return broadcast_object(run_dir)


def cleanup_distributed():
    """Leave the process group at the end of a successful run (nothing without one). Every rank
    must call it: it waits for all of them first. After an error, do not call it: torchrun stops
    the other processes. A gloo (CPU) group is not destroyed here: run_main ends the process
    without tearing it down (see there)."""
    if _distributed():
        barrier()
        if dist.get_backend() == "nccl":
            dist.destroy_process_group()


def finish_distributed(model):
    """End of a successful run: under torchrun, check that every rank holds the same weights (an
    error if not, a line if so) and leave the process group; nothing for one process."""
    if _distributed():
        if not replicas_in_sync(model):
            raise RuntimeError(f"parameters differ between the {dist.get_world_size()} ranks after training")
        print0(f"parameters identical on {dist.get_world_size()} ranks")
    cleanup_distributed()


def barrier():
    """Wait until every rank gets here (nothing without a process group)."""
    if _distributed():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def broadcast_object(obj, src=0):
    """Rank `src`'s `obj` (any picklable value) on every rank; `obj` itself without a process group.
    Every rank must call it; what the others pass is ignored."""
    if not _distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@contextlib.contextmanager
def main_process_first():
    """Run the body on rank 0 first and then on the other ranks, e.g. rank 0 computes the spectra
    cache and the others read it instead of computing the same files N times."""
    if _distributed() and dist.get_rank() != 0:
        barrier()
    yield
    if _distributed() and dist.get_rank() == 0:
        barrier()


def shard_indices(n, epoch, seed, device=None):
    """This process's example order for one epoch: an int64 tensor on `device`, copied there once.

    One process: torch.randperm(n) from the global generator (what a single-process run always did).
    Under torchrun: torch.utils.data.DistributedSampler(shuffle, drop_last) with set_epoch(epoch),
    i.e. one permutation seeded by seed + epoch, the same on every rank, of which each rank takes a
    disjoint n // world_size share (every rank then runs the same number of steps)."""
    if not _distributed():
        return torch.randperm(n, device=device)
    from torch.utils.data import DistributedSampler
    sampler = DistributedSampler(range(n), num_replicas=dist.get_world_size(), rank=dist.get_rank(),
                                 shuffle=True, seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    return torch.tensor(list(sampler), dtype=torch.long).to(device)


def wrap_ddp(model, dist_info):
    """`model` in DistributedDataParallel when there are several processes, else `model` itself.
    Keep the plain model for saving and evaluation: its state_dict has no `module.` prefix."""
    if dist_info.world_size <= 1:
        return model
    from torch.nn.parallel import DistributedDataParallel
    device_ids = [dist_info.device.index] if dist_info.device.type == "cuda" else None
    # buffers (e.g. normalisation statistics) are equal on every rank and never trained:
    # broadcasting them before every forward would cost one more collective per step
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)


def mixed_precision(enabled, device):
    """(autocast context, GradScaler) for train.amp: bf16 autocast where the GPU supports it, else
    fp16 with gradient scaling; with amp off, or on the CPU (said once), a no-op pair in float32."""
    amp_dtype = None
    if enabled and device.type != "cuda":
        print0(f"train.amp=1 ignored: mixed precision is for CUDA devices only (training in float32 on {device})")
    elif enabled:
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        print0(f"mixed precision: {amp_dtype} autocast{' with gradient scaling' if amp_dtype == torch.float16 else ''}")
    autocast = torch.autocast("cuda", dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    return autocast, torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)  # scaler: fp16 only


def replicas_in_sync(model):
    """True when every rank holds bit-identical parameters and buffers of `model`: a SHA-256 of this
    rank's state_dict is all-reduced as MAX and MIN, which agree only when every rank's digest does.
    True without a process group. Every rank must call it."""
    if not _distributed():
        return True
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    checksum = torch.from_numpy(np.frombuffer(digest.digest(), dtype=np.int64).copy()).to(device)  # (4,)
    low, high = checksum.clone(), checksum.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    return bool(torch.equal(low, high))


# ----------------------------------------------------------------------------------------------
# 11. Figures for TensorBoard (matplotlib, imported on use; writer.add_figure logs them)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # no screen needed
    import matplotlib.pyplot as plt
    return plt


def spectrogram_figure(panels, sr, hop, range_db=80.0):
    """Magnitude spectrograms side by side, each named: panels = [(name, mag (bins, frames))].
    dB relative to the loudest panel's peak (range_db shown), a colour map with its scale, time in
    seconds and a logarithmic frequency axis in Hz (tonal detail lives in the low bins)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels) + 1, 3.6), sharey=True, squeeze=False,
                             constrained_layout=True)
    peak = max(float(np.max(mag)) for _, mag in panels) + 1e-12
    for ax, (name, mag) in zip(axes[0], panels):
        mag = np.asarray(mag, dtype=np.float64)
        db = 20 * np.log10(np.maximum(mag, peak * 10 ** (-range_db / 20)) / peak)  # (bins, frames)
        times = np.arange(mag.shape[1] + 1) * hop / sr
        freqs = np.linspace(0, sr / 2, mag.shape[0] + 1)
        image = ax.pcolormesh(times, np.maximum(freqs, 1.0), db, vmin=-range_db, vmax=0, cmap="magma",
                              shading="flat", rasterized=True)
        ax.set_yscale("log")
        ax.set_ylim(30, sr / 2)
        ax.set_title(name)
        ax.set_xlabel("time (s)")
    axes[0][0].set_ylabel("frequency (Hz)")
    fig.colorbar(image, ax=list(axes[0]), label="dB")
    return fig


def latent_figure(panels, frame_rate):
    """Latent trajectories, one panel each: panels = [(name, latents (frames, Q))], one curve per
    dimension against time in seconds."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2.4 * len(panels)), squeeze=False, sharex=True)
    for ax, (name, z) in zip(axes[:, 0], panels):
        z = np.asarray(z)
        ax.plot(np.arange(len(z)) / frame_rate, z, linewidth=0.8)
        ax.set_title(name)
        ax.set_ylabel("latent")
    axes[-1, 0].set_xlabel("time (s)")
    fig.tight_layout()
    return fig
