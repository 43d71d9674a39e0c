"""Training under torchrun: 2 CPU processes (gloo) of train_vae.py and train_prior.py, resume, early
stop, the helpers; a training step without host sync."""
import ast
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import data
import models
import train_vae
from helpers import FAST, ROOT, TINY_PRIOR, write_latent_db

TINY = [*FAST, "train.batch_size=32", "train.num_threads=1", "train.beta_warmup_steps=20",
        "model.encoder_hidden=[32,16]", "model.decoder_hidden=[16,32]"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid):
    """Every process started by `pid`, children first (Linux /proc): torchrun's workers run in
    sessions of their own, so killing the launcher's process group leaves them running."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            found += [child] + descendants(child)
    return found


def torchrun(*args, nproc=2, timeout=180):
    """`python -m torch.distributed.run --nproc_per_node 2 ...` from the repository root: (code, stdout, stderr).
    The timeout turns a hang (ranks waiting on each other) into a failure: the launcher and its
    workers are killed, and the output is read from files (a pipe would wait for the last worker)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                                 "--master_port", str(free_port()), *map(str, args)], cwd=ROOT, env=env,
                                stdout=out, stderr=err, text=True, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for pid in descendants(proc.pid) + [proc.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait()
            out.seek(0), err.seek(0)
            raise AssertionError(f"torchrun {' '.join(map(str, args))} did not finish in {timeout} s:\n"
                                 f"{out.read()[-2000:]}\n{err.read()[-2000:]}") from None
        out.seek(0), err.seek(0)
        return proc.returncode, out.read(), err.read()


def train_ddp(demo_root, tmp_path, *extra):
    return torchrun("train_vae.py", "--config-name", "dgt_pitch_prediction", "name=t", f"rundir={tmp_path}",
                    f"+data.dataset.root={demo_root}", *TINY, *extra)


def progress_steps(out):
    return [int(m) for m in re.findall(r"^step (\d+)/", out, flags=re.M)]


@pytest.mark.slow
def test_two_processes_train_resume_and_write_one_run(demo_root, tmp_path):
    code, out, err = train_ddp(demo_root, tmp_path, "train.max_steps=20", "train.log_every=5", "train.val_every=10")
    assert code == 0, err
    assert [p.name for p in (tmp_path / "t").iterdir()] == ["version_0"]  # rank 0 alone made the folder
    run_dir = tmp_path / "t" / "version_0"
    assert sorted(p.name for p in tmp_path.rglob("*.pt")) == ["best.pt", "last.pt"]
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
    # only rank 0 logs: every line once
    assert progress_steps(out) == [5, 10, 15, 20]
    assert out.count("validation at step") == 2
    assert "effective batch 2 × 32 = 64 frames per step" in out and "not scaled" in out
    assert out.count("parameters identical on 2 ranks") == 1  # all-reduced SHA-256 of the weights
    checkpoint = torch.load(run_dir / "last.pt", weights_only=True)
    assert checkpoint["step"] == 20
    assert not any(k.startswith("module.") for k in checkpoint["model"])  # the format of one process
    models.load_vae(run_dir / "best.pt")

    # every rank loads last.pt and goes on from step 20
    code, out, err = train_ddp(demo_root, tmp_path, "train.max_steps=30", "train.log_every=5",
                               "train.val_every=10", "+resume=1")
    assert code == 0, err
    assert "resuming" in out and progress_steps(out) == [25, 30]
    assert out.count("parameters identical on 2 ranks") == 1
    assert [p.name for p in (tmp_path / "t").iterdir()] == ["version_0"]
    assert torch.load(run_dir / "last.pt", weights_only=True)["step"] == 30


@pytest.mark.slow
def test_early_stop_is_decided_on_rank_0_and_reaches_every_rank(demo_root, tmp_path):
    # lr 0: the validation loss never improves, so patience 1 stops at the second validation;
    # a rank that missed the decision would wait for its partner forever (the timeout fails the test)
    code, out, err = train_ddp(demo_root, tmp_path, "train.max_steps=500", "train.log_every=100",
                               "train.val_every=5", "train.lr=0", "train.patience=1")
    assert code == 0, err
    assert out.count("early stop") == 1 and "parameters identical on 2 ranks" in out
    assert torch.load(tmp_path / "t/version_0/last.pt", weights_only=True)["step"] == 10


@pytest.mark.slow
def test_two_processes_train_the_prior_and_resume(tmp_path):
    db = write_latent_db(tmp_path / "db")
    args = ["train_prior.py", "--db_path", db, "--name", "p", f"rundir={tmp_path}", *TINY_PRIOR,
            "train.num_threads=1", "train.log_every=5", "train.val_every=10"]
    code, out, err = torchrun(*args, "train.max_steps=20")
    assert code == 0, err
    run_dir = tmp_path / "p" / "version_0"
    assert [p.name for p in (tmp_path / "p").iterdir()] == ["version_0"]
    assert sorted(p.name for p in run_dir.glob("*.pt")) == ["best.pt", "last.pt"]
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
    assert progress_steps(out) == [5, 10, 15, 20] and out.count("validation at step") == 2
    assert "effective batch 2 × 16 = 32 crops per step" in out
    assert out.count("parameters identical on 2 ranks") == 1
    checkpoint = torch.load(run_dir / "last.pt", weights_only=True)
    assert checkpoint["step"] == 20 and not any(k.startswith("module.") for k in checkpoint["model"])
    models.load_prior(run_dir / "best.pt")

    code, out, err = torchrun(*args, "train.max_steps=30", "+resume=1")
    assert code == 0, err
    assert "resuming" in out and progress_steps(out) == [25, 30]
    assert out.count("parameters identical on 2 ranks") == 1
    assert torch.load(run_dir / "last.pt", weights_only=True)["step"] == 30


def test_prior_training_step_has_no_host_sync():
    """The prior's step on the meta device (see test_training_step_has_no_host_sync), gradient clipping included."""
    model = models.LatentPrior(3, 16, "transformer", dim=32, layers=2, heads=2, ffn_dim=64, context=16).to("meta")
    optimizer = torch.optim.AdamW(model.parameters())
    loss, logits, targets = models.next_frame_loss(model, torch.empty(4, 25, 3, dtype=torch.long, device="meta"))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    assert logits.shape == (4, 24, 3, 16)


HELPERS = """
import pathlib
import torch
import data


def main():
    info = data.init_distributed("cpu")
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    same = data.replicas_in_sync(model)
    with torch.no_grad():
        model.bias[0] += 1e-6 * info.rank  # one ulp-sized change on rank 1
    differ = data.replicas_in_sync(model)
    shards = [data.shard_indices(11, epoch, seed=3).tolist() for epoch in (0, 1)]
    told = data.broadcast_object(f"from rank {info.rank}")
    # one file per rank: two processes printing to one pipe can interleave their lines
    report = (f"rank {info.rank}/{info.world_size} {info.backend} same={same} differ={differ} told={told!r} "
              f"shards={shards}")
    pathlib.Path(__file__).with_name(f"rank_{info.rank}.txt").write_text(report)
    data.cleanup_distributed()


data.run_main(main)  # as the scripts end: a gloo process exits without tearing its group down
"""


@pytest.mark.slow
def test_helpers_under_torchrun(tmp_path):
    script = tmp_path / "helpers.py"
    script.write_text(HELPERS)
    code, out, err = torchrun(script)
    assert code == 0, err
    lines = [(tmp_path / f"rank_{rank}.txt").read_text() for rank in (0, 1)]
    shards = []
    for rank, line in enumerate(lines):
        assert line.startswith(f"rank {rank}/2 gloo same=True differ=False told='from rank 0'"), line
        shards.append(ast.literal_eval(line.split("shards=")[1]))
    for epoch in (0, 1):  # disjoint halves of one permutation (drop_last: 5 each of 11)
        a, b = shards[0][epoch], shards[1][epoch]
        assert len(a) == len(b) == 5 and not set(a) & set(b) and set(a) | set(b) <= set(range(11))
    assert shards[0][0] != shards[0][1]  # set_epoch: a new order every epoch


def test_one_process_creates_no_process_group(demo_root, tmp_path, capsys):
    info = data.init_distributed("cpu")
    assert (info.rank, info.world_size, info.backend, info.is_main) == (0, 1, None, True)
    assert data.broadcast_object("x") == "x" and data.replicas_in_sync(torch.nn.Linear(2, 2))
    run_dir = train_vae.main(["--config-name", "dgt_pitch_prediction", "name=t", f"rundir={tmp_path}",
                              f"+data.dataset.root={demo_root}", *TINY, "train.max_steps=4",
                              "train.log_every=2", "train.val_every=4", "train.amp=1"])
    assert not torch.distributed.is_initialized()
    out = capsys.readouterr().out
    assert progress_steps(out) == [2, 4] and "effective batch" not in out and "identical" not in out
    assert "train.amp=1 ignored" in out  # mixed precision is for CUDA only
    assert torch.load(run_dir / "last.pt", weights_only=True)["step"] == 4


@pytest.mark.parametrize("conditioned", [False, True])
def test_training_step_has_no_host_sync(conditioned):
    """A step on the meta device: its tensors hold no data, so any .item(), float(), bool() or
    `if tensor:` (a host sync on a GPU) raises."""
    extra = [] if conditioned else ["model.conditioning={}"]
    _, config = train_vae.parse_args(["--config-name", "dgt_pitch_prediction", *FAST, *extra])
    model = models.build_vae(config).to("meta")
    optimizer = torch.optim.Adam(model.parameters())
    labels = {t: torch.empty(16, dtype=torch.long, device="meta") for t in ("pitch", "octave")}
    losses = train_vae.compute_losses(model, torch.empty(16, 129, device="meta"), labels, config, 5, augment=True)
    losses["loss"].backward()
    optimizer.step()
    assert {"acc_pitch", "pred_octave", "kl"} <= set(losses)
