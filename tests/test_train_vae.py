"""train_vae.py: a real (small) training run, resume, checkpoints, conditioning and prediction."""
import json

import pytest
import torch

import data
import models
import train_vae
from helpers import FAST, run_script


def train(demo_root, tmp_path, *extra):
    return train_vae.main(["--config-name", "dgt_pitch_prediction", "name=t", f"rundir={tmp_path}",
                           f"+data.dataset.root={demo_root}", *FAST, "train.batch_size=64",
                           "train.log_every=20", "train.beta_warmup_steps=100", *extra])


def scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0, "audio": 0})
    acc.Reload()
    return acc, [(e.step, e.value) for e in acc.Scalars(tag)]


@pytest.mark.slow
def test_training_lowers_validation_loss_and_writes_the_run(demo_root, tmp_path):
    run_dir = train(demo_root, tmp_path, "train.max_steps=300", "train.val_every=100")
    assert run_dir == tmp_path / "t" / "version_0"
    for name in ("config.yaml", "split.json", "last.pt", "best.pt"):
        assert (run_dir / name).exists(), name
    acc, valid = scalars(run_dir, "valid/sc")
    assert [s for s, _ in valid] == [100, 200, 300]
    _, first = scalars(run_dir, "train/loss")
    assert first[-1][1] < first[0][1]
    # the held-out file (same seed, same split) against the same model untrained (lr 0): one 1 s file
    # is too noisy to compare one validation with the next, so the reference is the untrained model
    untrained_dir = train(demo_root, tmp_path, "name=untrained", "train.lr=0", "train.max_steps=1", "train.val_every=1")
    _, untrained = scalars(untrained_dir, "valid/sc")
    assert valid[-1][1] < 0.25 * untrained[0][1], (valid, untrained)
    assert acc.Tags()["images"] and acc.Tags()["audio"]  # spectrogram figure and audio at validation
    assert "train/acc_pitch" in acc.Tags()["scalars"] and "train/beta" in acc.Tags()["scalars"]
    assert "valid/beta" not in acc.Tags()["scalars"] and "valid/acc_pitch" in acc.Tags()["scalars"]
    # the headline curve is the VAE's objective; the predictors' cross-entropy is logged apart
    _, loss = scalars(run_dir, "train/loss")
    _, total = scalars(run_dir, "train/total")
    _, predictors = scalars(run_dir, "train/predictors")
    assert all(abs(t - (v + p)) < 1e-3 for (_, t), (_, v), (_, p) in zip(total, loss, predictors))
    # best.pt holds the step of the lowest validation spectral convergence
    best_step = min(valid, key=lambda sv: sv[1])[0]
    best = torch.load(run_dir / "best.pt", weights_only=True)
    assert best["step"] == best_step
    # both checkpoints carry the latent axes (ordered latents at export) and the class presets
    for checkpoint in (best, torch.load(run_dir / "last.pt", weights_only=True)):
        axes = checkpoint["latent_axes"]
        assert axes["rotation"].shape == (8, 8) and torch.all(axes["variance"][:-1] >= axes["variance"][1:])
        assert axes["preset_names"]["pitch"][0] == "C" and axes["presets"]["octave"].shape == (8, 8)
    saved = data.read_yaml(run_dir / "config.yaml")
    assert saved["data"]["transform"]["n_fft"] == 256 and saved["data"]["dataset"]["root"] == str(demo_root)
    split = json.loads((run_dir / "split.json").read_text())
    assert len(split["valid"]) == 2 and len(split["train"]) == 7  # at least two validation files


def test_checkpoint_reloads_with_weights_only_and_reconstructs(demo_root, tmp_path):
    run_dir = train(demo_root, tmp_path, "train.max_steps=40", "train.val_every=40")
    checkpoint = torch.load(run_dir / "last.pt", weights_only=True)
    assert checkpoint["step"] == 40 and set(checkpoint) >= {"model", "optimizer", "config", "best_val"}
    model, _ = models.load_vae(run_dir / "best.pt")
    assert model.norm_scale.item() > 0.1  # normalisation statistics travel with the model
    x = torch.rand(5, 129)
    x_hat, mean, logvar, z = model(x, {"pitch": torch.zeros(5, dtype=torch.long),
                                       "octave": torch.ones(5, dtype=torch.long)}, sample=False)
    assert x_hat.shape == (5, 129) and mean.shape == (5, 8) and torch.isfinite(x_hat).all()


def test_resume_continues_the_step_count_with_the_same_split(demo_root, tmp_path):
    run_dir = train(demo_root, tmp_path, "train.max_steps=40", "train.val_every=20")
    split = (run_dir / "split.json").read_text()
    resumed = train(demo_root, tmp_path, "train.max_steps=80", "train.val_every=20", "+resume=1")
    assert resumed == run_dir and not (tmp_path / "t" / "version_1").exists()
    assert torch.load(run_dir / "last.pt", weights_only=True)["step"] == 80
    assert (run_dir / "split.json").read_text() == split
    _, valid = scalars(run_dir, "valid/loss")
    assert sorted({s for s, _ in valid}) == [20, 40, 60, 80]
    # a new run without resume never overwrites the earlier one
    assert train(demo_root, tmp_path, "train.max_steps=1") == tmp_path / "t" / "version_1"


def test_conditioning_and_prediction_shapes():
    model = models.SpectralVAE(bins=129, latent_dim=4, conditioning={
        "pitch": {"dim": 12, "target": ["encoder", "decoder"], "embedding": "OneHot"},
        "inst": {"dim": 3, "target": ["decoder"], "embedding": "Embedding", "embedding_dim": 5}},
        prediction={"octave": {"dim": 9, "args": {"nlayers": 1, "hidden_dims": 16}}})
    labels = {"pitch": torch.tensor([0, 11]), "inst": torch.tensor([2, 0])}
    mean, logvar = model.encode(torch.rand(2, 129), labels)
    assert mean.shape == logvar.shape == (2, 4)
    assert model.decode(mean, labels).shape == (2, 129)
    assert model.predict(mean)["octave"].shape == (2, 9)
    # the decoder really uses its labels
    assert not torch.allclose(model.decode(mean, labels), model.decode(mean, dict(labels, inst=torch.tensor([1, 1]))))


def test_conv_architecture_builds_for_every_transform_size():
    for bins in (257, 513, 1025):
        model = models.SpectralVAE(bins=bins, architecture="conv", conditioning={
            "p": {"dim": 3, "target": ["encoder", "decoder"]}})
        out, *_ = model(torch.rand(4, bins), {"p": torch.tensor([0, 1, 2, 0])})
        assert out.shape == (4, bins)


def test_predictors_do_not_train_the_encoder():
    model = models.SpectralVAE(bins=33, latent_dim=4, prediction={"p": {"dim": 3}})
    x = torch.rand(8, 33)
    mean, _ = model.encode(x)
    loss = torch.nn.functional.cross_entropy(model.predict(mean, x)["p"], torch.zeros(8, dtype=torch.long))
    loss.backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is not None for p in model.predictors.parameters())


def test_missing_labels_are_replaced_by_random_or_predicted_classes():
    model = models.SpectralVAE(bins=33, conditioning={"p": {"dim": 3, "target": ["decoder"]}})
    labels = {"p": torch.tensor([2, -1, -1, -1] * 50)}
    filled = models.fill_missing_labels(model, labels)["p"]
    assert filled[0] == 2 and (filled >= 0).all() and (filled < 3).all() and len(set(filled.tolist())) == 3
    logits = {"p": torch.tensor([[0.0, 5.0, 0.0]]).repeat(200, 1)}
    predicted = models.fill_missing_labels(model, labels, logits)["p"]
    assert torch.equal(predicted, torch.where(labels["p"] >= 0, labels["p"], 1))


def test_losses_have_the_correct_forms():
    x = torch.rand(16, 33)
    # spectral convergence is relative to the target: scaling the reconstruction does not shrink it
    assert models.spectral_convergence_loss(x * 2, x).item() == pytest.approx(1.0, rel=1e-5)
    assert models.spectral_convergence_loss(torch.zeros_like(x), x).item() == pytest.approx(1.0, rel=1e-5)
    # KL(q‖p) against torch.distributions (the original had it reversed)
    mean, logvar = torch.randn(16, 4), torch.randn(16, 4)
    q = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros(4), torch.ones(4))
    torch.testing.assert_close(models.kl_divergence(mean, logvar), torch.distributions.kl_divergence(q, p))
    # free bits: dimensions under the allowance count as the allowance (no pull toward the prior)
    kl = torch.tensor([[0.01, 2.0]]).repeat(4, 1)
    assert models.free_bits_kl(kl, 0.5).item() == pytest.approx(2.5)
    assert models.beta_schedule(50, 1.0, 100) == 0.5 and models.beta_schedule(500, 1.0, 100) == 1.0


def test_check_prints_model_and_dataset_summary(demo_root, tmp_path):
    code, out, err = run_script("train_vae.py", "--config-name", "dgt_pitch_prediction", f"rundir={tmp_path}",
                                f"+data.dataset.root={demo_root}", *FAST, "+check=1")
    assert code == 0, err
    assert "parameters:" in out and "9 audio files" in out and "pitch: 100% of frames labelled" in out
    assert not (tmp_path / "vae").exists()  # check trains nothing and writes no run


def test_check_reports_every_problem_at_once(demo_root, tmp_path):
    import shutil
    root = tmp_path / "broken"
    shutil.copytree(demo_root, root)
    meta = root / "metadata" / "pitch" / "metadata.txt"
    meta.write_text(meta.read_text() + "data/none.wav\ttracks/x.txt\nbad line\n")
    (root / "data" / "corrupt.wav").write_bytes(b"nope")
    code, out, err = run_script("train_vae.py", "--config-name", "dgt_pitch_prediction", f"rundir={tmp_path}",
                                f"+data.dataset.root={root}", *FAST, "+check=1")
    assert code == 1
    assert "metadata.txt:10: audio file 'data/none.wav' not found" in out
    assert "metadata.txt:11: expected" in out and "corrupt.wav" in out
    assert "2 metadata problem(s), 1 audio file(s) skipped" in out


def test_bad_metadata_without_check_is_one_clear_error(demo_root, tmp_path):
    import shutil
    root = tmp_path / "broken"
    shutil.copytree(demo_root, root)
    (root / "metadata" / "octave" / "metadata.txt").write_text("data/soft/note_00.wav\tloud\n")
    code, out, err = run_script("train_vae.py", "--config-name", "dgt_pitch_cond", f"rundir={tmp_path}",
                                f"+data.dataset.root={root}", *FAST)
    assert code == 2 and "Traceback" not in err
    assert "octave/metadata.txt:1: track file 'loud' not found" in err


def test_resume_without_a_run_is_a_clear_error(tmp_path):
    code, _, err = run_script("train_vae.py", "--config-name", "dgt_mid", f"rundir={tmp_path}", "name=nope",
                              "+data.dataset.root=x", "+resume=1")
    assert code == 2 and "Traceback" not in err and "no such run folder" in err


def test_interrupt_saves_last_checkpoint_for_resume(demo_root, tmp_path, monkeypatch):
    real = train_vae.compute_losses

    def interrupted_at_step_7(model, mags, labels, config, step, augment=False):
        if augment and step == 7:
            raise KeyboardInterrupt
        return real(model, mags, labels, config, step, augment)

    monkeypatch.setattr(train_vae, "compute_losses", interrupted_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        train(demo_root, tmp_path, "train.max_steps=50", "train.val_every=100")
    assert torch.load(tmp_path / "t/version_0/last.pt", weights_only=True)["step"] == 7


@pytest.mark.parametrize("override, message", [
    ("data.dataset.n_files=-1", "config key 'data.dataset.n_files' must be >= 1, got -1"),
    ("train.max_steps=-5", "config key 'train.max_steps' must be >= 1, got -5"),
    ("train.lr=-1", "config key 'train.lr' must be >= 0, got -1"),
    ("data.valid_fraction=1", "config key 'data.valid_fraction' must be [0, 1), got 1"),
])
def test_a_number_out_of_range_is_refused_naming_the_key(demo_root, tmp_path, override, message):
    """Before, n_files=-1 silently dropped a file and max_steps=-5 'trained' with no checkpoint."""
    with pytest.raises(data.ConfigError, match=message.replace("[", r"\[").replace(")", r"\)")):
        train(demo_root, tmp_path, override)
    assert not (tmp_path / "t").exists()  # no run folder was made


def test_a_time_budget_stops_training_at_the_next_log_step_with_a_checkpoint(demo_root, tmp_path):
    run_dir = train(demo_root, tmp_path, "train.max_minutes=1e-6", "train.log_every=5", "train.max_steps=1000",
                    "train.val_every=1000")
    checkpoint = data.load_checkpoint(run_dir / "last.pt")
    assert checkpoint["step"] == 5 and (run_dir / "best.pt").exists()  # validated as the last step
