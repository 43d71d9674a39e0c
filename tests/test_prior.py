"""The latent prior (models.LatentPrior) and train_prior.py, on small synthetic latent datasets."""
import json

import numpy as np
import pytest
import torch

import data
import models
import train_prior
import train_vae
from helpers import TINY_PRIOR, run_script, write_latent_db

@pytest.fixture(scope="module")
def latent_db(tmp_path_factory):
    return write_latent_db(tmp_path_factory.mktemp("latent_db"))


@pytest.fixture(scope="module")
def feature_db(tmp_path_factory):
    return write_latent_db(tmp_path_factory.mktemp("feature_db"), features=True)


def tiny_prior(backbone, n_streams=3, resolution=16, context=8, seed=0, markov_head=False):
    torch.manual_seed(seed)
    model = models.LatentPrior(n_streams, resolution, backbone, dim=32, layers=2, heads=4, ffn_dim=64,
                               context=context, dropout=0.0, n_features=2 if backbone == "seq2seq" else 0,
                               encoder_layers=1, markov_head=markov_head).eval()
    with torch.no_grad():
        model.head.transition.normal_()  # a table that changes the logits (it starts at zero)
    return model


def random_features(backbone, batch, frames):
    return torch.randn(batch, frames, 2) if backbone == "seq2seq" else None


BACKBONES = ["transformer", "gru", "seq2seq"]


# ---- the model -------------------------------------------------------------------------------

@pytest.mark.parametrize("backbone", BACKBONES)
def test_changing_frame_t_never_changes_predictions_before_t(backbone):
    model = tiny_prior(backbone)
    tokens = torch.randint(0, 16, (2, 20, 3))
    features = random_features(backbone, 2, 20)
    with torch.no_grad():
        h, _ = model.hidden(tokens, features, model.init_state(2))
        for t in (0, 7, 19):
            changed = tokens.clone()
            changed[:, t] = (changed[:, t] + 5) % 16
            changed_features = None if features is None else features.clone()
            if changed_features is not None:
                changed_features[:, t] += 3.0
            h2, _ = model.hidden(changed, changed_features, model.init_state(2))
            assert torch.allclose(h[:, :t], h2[:, :t], atol=1e-5)
            assert not torch.allclose(h[:, t], h2[:, t], atol=1e-3)  # frame t itself does change


@pytest.mark.parametrize("backbone", BACKBONES)
def test_streaming_in_chunks_equals_the_full_sequence_pass(backbone):
    """Chunks of 1, 3 and 7 frames through the streaming state give the full pass's states, also
    beyond the attention window (context 8 < 30 frames: the sliding key/value cache), with growing
    caches and with preallocated ones (moved to the front, or replaced when a chunk does not fit)."""
    model = tiny_prior(backbone, context=8)
    tokens = torch.randint(0, 16, (2, 30, 3))
    features = random_features(backbone, 2, 30)
    with torch.no_grad():
        full, _ = model.hidden(tokens, features, model.init_state(2))
        for chunk, capacity in ((1, 0), (3, 0), (7, 0), (1, 16), (3, 16), (7, 16), (20, 16)):
            state, parts = model.init_state(2, capacity), []
            for i in range(0, 30, chunk):
                part, state = model.hidden(tokens[:, i:i + chunk],
                                           None if features is None else features[:, i:i + chunk], state)
                parts.append(part)
            assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5), (chunk, capacity)


def test_attention_window_limits_what_a_frame_sees():
    """With context 8, each layer looks 7 frames back: with 2 layers frame 20 depends on frames 6..20."""
    model = tiny_prior("transformer", context=8)
    tokens = torch.randint(0, 16, (1, 21, 3))
    with torch.no_grad():
        h, _ = model.hidden(tokens, None, model.init_state(1))
        far, near = tokens.clone(), tokens.clone()
        far[:, 5] = (far[:, 5] + 1) % 16
        near[:, 13] = (near[:, 13] + 1) % 16
        h_far, _ = model.hidden(far, None, model.init_state(1))
        h_near, _ = model.hidden(near, None, model.init_state(1))
    assert torch.allclose(h[:, 20], h_far[:, 20], atol=1e-6)
    assert not torch.allclose(h[:, 20], h_near[:, 20], atol=1e-4)


@pytest.mark.parametrize("markov_head", [False, True])
def test_coarse_to_fine_head_teacher_forcing(markov_head):
    """Training logits of stream q see the true tokens of streams < q of the same frame and nothing
    else of that frame; sampling with the same tokens given reproduces them (with the Markov table,
    the previous frame's tokens too)."""
    model = tiny_prior("transformer", markov_head=markov_head)
    tokens = torch.randint(0, 16, (2, 12, 3))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    with torch.no_grad():
        logits = model(inputs, targets)  # (2, 11, 3, 16)
        h, _ = model.hidden(inputs, None, model.init_state(2))
        table = model.head.film_table()
        for t in (0, 5, 10):
            _, sampled_logits = model.head.sample(h[:, t], 1.0, table, inputs[:, t], targets[:, t])
            assert torch.allclose(sampled_logits, logits[:, t], atol=1e-5)
        changed = targets.clone()
        changed[:, :, 1] = (changed[:, :, 1] + 1) % 16  # stream 1's target
        logits2 = model(inputs, changed)
    assert torch.allclose(logits[:, :, :2], logits2[:, :, :2], atol=1e-6)  # streams 0, 1 unchanged
    assert not torch.allclose(logits[:, :, 2], logits2[:, :, 2], atol=1e-4)  # stream 2 sees it


def test_sampling_at_temperature_zero_is_argmax_and_perplexity_is_at_least_one():
    model = tiny_prior("gru")
    h = torch.randn(4, 32)
    table = model.head.film_table()
    with torch.no_grad():
        previous = torch.randint(0, 16, (4, 3))
        tokens, logits = model.head.sample(h, 0.0, table, previous)
        again, _ = model.head.sample(h, 0.0, table, previous)
    assert torch.equal(tokens, again)
    assert torch.equal(tokens[:, 0], logits[:, 0].argmax(-1))
    ppl = models.perplexity(logits)
    assert torch.isfinite(ppl).all() and (ppl >= 1.0).all() and (ppl <= 16.0 + 1e-3).all()
    uniform = models.perplexity(torch.zeros(1, 3, 16))
    assert torch.allclose(uniform, torch.tensor([16.0]))


def test_prior_scripts_for_torchscript():
    for backbone in BACKBONES:
        scripted = torch.jit.script(tiny_prior(backbone))
        tokens = torch.randint(0, 16, (1, 5, 3))
        h, state = scripted.hidden(tokens, random_features(backbone, 1, 5), scripted.init_state(1))
        assert h.shape == (1, 5, 32)


# ---- train_prior.py --------------------------------------------------------------------------

def train(db, tmp_path, *overrides, config="decoder_only"):
    return train_prior.main(["--config", config, "--db_path", str(db), "--name", "p", f"rundir={tmp_path}",
                             *TINY_PRIOR, *overrides])


@pytest.mark.slow
@pytest.mark.parametrize("config", ["decoder_only", "recurrent"])
def test_training_brings_validation_cross_entropy_below_the_markov_chain(latent_db, tmp_path, config):
    """Stream 0 counts up (10 % jumps), streams 1, 2 repeat it shifted: a Markov chain per stream
    knows "+1" but not the jumps; a prior that reads stream 0 before streams 1, 2 knows them too."""
    run_dir = train(latent_db, tmp_path, "train.max_steps=300", "train.val_every=300", config=config)
    checkpoint = data.load_checkpoint(run_dir / "best.pt")
    index = data.read_latent_index(latent_db)
    split = json.loads((run_dir / "split.json").read_text())
    train_set = data.LatentSequences(latent_db, index, split["train"])
    valid_set = data.LatentSequences(latent_db, index, split["valid"])
    baselines = train_set.baseline_cross_entropies(valid_set)
    assert baselines["unigram"] > 2.5 and baselines["markov"] < 0.8  # frequencies say little, "+1" a lot
    assert checkpoint["best_val"] < 0.75 * baselines["markov"], (checkpoint["best_val"], baselines)
    assert checkpoint["dataset"]["resolution"] == 16 and checkpoint["dataset"]["quantizer"] == "normal_cdf"
    model, _ = models.load_prior(run_dir / "best.pt")
    assert model.n_streams == 3 and model.resolution == 16


@pytest.mark.slow
def test_seq2seq_training_uses_the_conditioning_features(feature_db, tmp_path):
    """Stream 0 steps by 1 or 5 at random and only the features say which: without them no model
    does better than ln 2 / 3 streams = 0.231 nats per token; the conditioned model must."""
    run_dir = train(feature_db, tmp_path, "train.max_steps=400", "train.val_every=400", "train.lr=0.003",
                    config="encoder_decoder_continuous")
    best = data.load_checkpoint(run_dir / "best.pt")["best_val"]
    assert best < 0.8 * np.log(2) / 3, best
    model, _ = models.load_prior(run_dir / "best.pt")
    assert model.n_features == 2 and float(model.feature_std[0]) > 0.1  # statistics stored


def test_resume_continues_from_the_saved_step(latent_db, tmp_path):
    run_dir = train(latent_db, tmp_path, "train.max_steps=20", "train.val_every=10")
    assert data.load_checkpoint(run_dir / "last.pt")["step"] == 20
    resumed = train(latent_db, tmp_path, "+resume=1", "train.max_steps=40")
    assert resumed == run_dir
    checkpoint = data.load_checkpoint(run_dir / "last.pt")
    assert checkpoint["step"] == 40 and checkpoint["config"]["train"]["max_steps"] == 40
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["version_0"]
    again = train(latent_db, tmp_path, "train.max_steps=5")  # a new run never overwrites
    assert again.name == "version_1"


def test_learning_rate_warms_up_then_decays():
    tc = dict(train_prior.DEFAULTS["train"], lr=1e-3, warmup_steps=100, warmup_start=0.01, decay_half_life=1000)
    assert data.learning_rate(tc, 0, 10000) == pytest.approx(1e-5)
    assert data.learning_rate(tc, 100, 10000) == pytest.approx(1e-3)
    assert data.learning_rate(tc, 1100, 10000) == pytest.approx(5e-4)


def test_cosine_learning_rate_ends_at_lr_final_by_steps_or_by_minutes():
    tc = dict(train_prior.DEFAULTS["train"], lr=1e-3, warmup_steps=100, warmup_start=0.01, lr_schedule="cosine",
              lr_final=0.1)
    assert data.learning_rate(tc, 100, 1100) == pytest.approx(1e-3)  # after the warm-up: the peak
    assert data.learning_rate(tc, 600, 1100) == pytest.approx(0.55e-3)  # half way down
    assert data.learning_rate(tc, 1100, 1100) == pytest.approx(1e-4)
    assert data.learning_rate(tc, 200, 10 ** 7, spent=1.0) == pytest.approx(1e-4)  # the time budget is spent
    vae = dict(train_vae.DEFAULTS["train"], lr=1e-3, lr_schedule="cosine", lr_final=0.0)  # no warm-up key
    assert data.learning_rate(vae, 0, 100) == pytest.approx(1e-3)
    assert data.learning_rate(vae, 50, 100, spent=0.5) == pytest.approx(0.5e-3)


@pytest.mark.slow
def test_pretrained_embedding_from_a_codebook_and_without_one(latent_db, tmp_path):
    class Discrete(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for q in range(3):
                self.register_buffer(f"codebook_{q}", torch.randn(16, 8))

        def forward(self, x):
            return x

    class Continuous(torch.nn.Module):
        def forward(self, x):
            return x

    torch.jit.script(Discrete()).save(str(tmp_path / "discrete.ts"))
    torch.jit.script(Continuous()).save(str(tmp_path / "continuous.ts"))
    codebook = train_prior.load_codebook(tmp_path / "discrete.ts", 3, 16)
    assert codebook.shape == (3, 16, 8)
    assert train_prior.load_codebook(tmp_path / "continuous.ts", 3, 16) is None
    model = tiny_prior("gru")
    train_prior.init_embedding_from_codebook(model, codebook)
    table = model.embedding.weight.view(3, 16, 32)[:, :, :8]
    ratio = table / codebook
    assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio), atol=1e-4)  # a rescaled copy
    code, out, err = run_script("train_prior.py", "--db_path", latent_db, "--name", "p", f"rundir={tmp_path}",
                                "--pretrained_embedding", tmp_path / "continuous.ts", *TINY_PRIOR, "train.max_steps=2")
    assert code == 0 and "no codebook" in err, err


@pytest.mark.parametrize("args, message", [
    (["--db_path", "{tmp}/nowhere"], "no index.json"),
    (["--db_path", "{db}", "model.layerz=3"], "unknown config key 'model.layerz'"),
    (["--db_path", "{db}", "--config", "encoder_decoder_continuous"], "needs conditioning features"),
    (["--db_path", "{db}", "data.crop=100000"], "fewer than one crop"),
    (["--db_path", "{db}", "--config", "nope"], "config 'nope' not found"),
    (["--db_path", "{db}", "train.max_steps=-5"], "config key 'train.max_steps' must be >= 1, got -5"),
    (["--db_path", "{db}", "model.dropout=1.5"], "config key 'model.dropout' must be [0, 1), got 1.5"),
])
def test_bad_input_gives_one_clear_message(latent_db, tmp_path, args, message):
    args = [a.format(tmp=tmp_path, db=latent_db) for a in args]
    code, out, err = run_script("train_prior.py", "--name", "p", f"rundir={tmp_path}", *args)
    assert code == 2 and message in err and "Traceback" not in err, err


def test_markov_baseline_counts_transitions_inside_files_only(tmp_path):
    """Two files whose last/first frames would make a transition never seen inside a file."""
    db = write_latent_db(tmp_path / "db", n_files=2, frames=50, n_streams=1, resolution=4)
    index = data.read_latent_index(db)
    files = data.LatentSequences(db, index, [f["key"] for f in index["files"]])
    log_p = files.markov_log_probs(smoothing=0.1)  # (1, 4, 4)
    counts = torch.zeros(4, 4)
    for tokens, _ in files.files():
        for a, b in zip(tokens[:-1, 0].tolist(), tokens[1:, 0].tolist()):
            counts[a, b] += 1
    expected = ((counts + 0.1) / (counts + 0.1).sum(1, keepdim=True)).log()
    assert torch.allclose(log_p[0], expected, atol=1e-6)
    ce = files.baseline_cross_entropies(files)["markov"]
    manual = -float((expected * counts).sum() / counts.sum())  # mean log-probability of every transition
    assert ce == pytest.approx(manual, rel=1e-6)


def test_markov_head_starts_as_the_markov_chain(latent_db, tmp_path):
    """Trained for one step at lr 0, the prior's validation cross-entropy is the Markov chain's (within
    the small random output layer it starts with)."""
    run_dir = train(latent_db, tmp_path, "train.max_steps=1", "train.val_every=1", "train.lr=0", "model.markov_head=1")
    index = data.read_latent_index(latent_db)
    split = json.loads((run_dir / "split.json").read_text())
    baselines = data.LatentSequences(latent_db, index, split["train"]).baseline_cross_entropies(
        data.LatentSequences(latent_db, index, split["valid"]))
    assert data.load_checkpoint(run_dir / "last.pt")["best_val"] == pytest.approx(baselines["markov"], rel=0.02)


def test_a_time_budget_stops_the_prior_at_the_next_log_step(latent_db, tmp_path):
    run_dir = train(latent_db, tmp_path, "train.max_minutes=1e-6", "train.log_every=5", "train.max_steps=1000",
                    "train.val_every=1000")
    assert data.load_checkpoint(run_dir / "last.pt")["step"] == 5 and (run_dir / "best.pt").exists()


def test_pitch_shifted_copies_train_and_never_validate(tmp_path):
    """A file's shifted copies go where the file goes: training, or nowhere (validation reads originals)."""
    db = write_latent_db(tmp_path / "db", n_files=10, frames=60)
    index = json.loads((db / "index.json").read_text())
    copies = []
    for entry in index["files"]:
        entry["shift"] = 0
        key = entry["key"] + "__shift+1"
        np.save(db / "tokens" / f"{key}.npy", np.load(db / "tokens" / f"{entry['key']}.npy"))
        copies.append(dict(entry, key=key, shift=1))
    index["files"] += copies
    index["shifts"] = [1]
    (db / "index.json").write_text(json.dumps(index))
    run_dir = train(db, tmp_path, "train.max_steps=2", "train.val_every=2", "data.valid_fraction=0.2")
    split = json.loads((run_dir / "split.json").read_text())
    assert len(split["valid"]) == 2 and not any("shift" in key for key in split["valid"])
    assert len(split["train"]) == 16
    valid_originals = {key for key in split["valid"]}
    assert not any(key.replace("__shift+1", "") in valid_originals for key in split["train"])


def test_jitter_moves_a_share_of_the_tokens_to_a_neighbouring_bin():
    torch.manual_seed(0)
    tokens = torch.randint(0, 16, (64, 100, 3))
    tokens[0] = 0  # the edges stay inside [0, resolution)
    tokens[1] = 15
    moved = models.jitter_tokens(tokens, 0.2, 16)
    assert moved.min() >= 0 and moved.max() <= 15
    assert (moved - tokens).abs().max() == 1
    assert 0.15 < (moved != tokens).float().mean() < 0.25
    assert torch.equal(models.jitter_tokens(tokens, 0.0, 16), tokens)
