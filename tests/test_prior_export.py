"""The prior's nn~ export (script.py --prior) and generate.py prior, checked with the nn~ host
of test_export.py on a tiny prior trained over the latents of a tiny exported VAE."""
import numpy as np
import pytest
import soundfile as sf
import torch

import models
import script
import train_prior
from helpers import TINY_PRIOR, NnHost, make_run, run_script, write_latent_db

SR, RATIO, LATENT = 16000, 64, 8  # the tiny VAE of test_export: 16 kHz, hop 64, 8 latents

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """(vae.ts, prior run folder, prior.ts, combined.ts): a prior over 8 latent streams at ratio 64."""
    root = tmp_path_factory.mktemp("prior_chain")
    make_run(root, name="vae")
    vae_ts = script.export(root / "vae", verbose=False)
    db = write_latent_db(root / "db", n_streams=LATENT, frames=200, ratio=RATIO, sample_rate=SR)
    train_prior.main(["--db_path", str(db), "--name", "p", f"rundir={root}", *TINY_PRIOR, "train.max_steps=40",
                      "train.val_every=40"])
    prior_ts = script.export_prior(root / "p", root / "out", verbose=False)
    combined_ts = script.export_prior(root / "p", root / "out", model_path=vae_ts, verbose=False)
    return vae_ts, root / "p", prior_ts, combined_ts


def latent_sequence(batch=1, frames=64, seed=0):
    """Latents (batch, 8, frames) as the VAE's encode would send them."""
    return torch.randn(batch, LATENT, frames, generator=torch.Generator().manual_seed(seed))


def at_full_rate(latents):
    """What nn~ feeds a ratio-64 input: each latent frame held for 64 samples."""
    return latents.repeat_interleave(RATIO, dim=2)


def test_prior_file_follows_the_nn_contract(chain):
    _, _, prior_ts, _ = chain
    host = NnHost(prior_ts)
    assert host.model.get_methods() == ["forward"]
    assert host.params["forward"] == [LATENT, RATIO, LATENT + 1, RATIO]
    assert host.model.forward_output_labels[-1] == "perplexity"
    assert host.model.get_attributes() == ["temperature", "listen", "reset"]
    assert [int(host.model.temperature_params[0]), int(host.model.listen_params[0]),
            int(host.model.reset_params[0])] == [2, 3, 3]  # listen, reset: str
    assert host.model.set_temperature(-1.0) == 1 and host.model.get_temperature() == [1.0]
    for listen in ("true", "false"):
        assert host.model.set_listen(listen) == 0
        for batch in (1, 4):
            for buffer in (RATIO, 2 * RATIO, 8 * RATIO, 4096):
                out = host.stream("forward", at_full_rate(latent_sequence(batch)), buffer)  # shape/dtype checked
                perplexity = out[:, -1, ::RATIO]
                assert ((perplexity >= 1.0 - 1e-4) & (perplexity <= 16.0 + 1e-3)).all()


@pytest.mark.parametrize("message, listening", [("1.000000", True), ("0.000000", False), ("true", True),
                                                ("false", False), ("1", True), ("0", False), ("on", True),
                                                ("off", False)])
def test_listen_reads_as_a_musician_means_it_from_pd_and_max(chain, message, listening):
    """nn~ 1.6 sends a Pd number as text ("0.000000"): with a bool attribute `set listen 0` read as
    true. listen is a str attribute, parsed by the model: 1/0, true/false and on/off all work."""
    _, _, prior_ts, combined_ts = chain
    latents = latent_sequence(frames=16)
    for path, method in ((prior_ts, "forward"), (combined_ts, "prior")):
        host = NnHost(path)
        assert host.model.set_listen(message) == 0
        assert host.model.get_listen() == ["true" if listening else "false"]
        out = host.perform(method, at_full_rate(latents))[:, :LATENT, ::RATIO]
        assert torch.equal(out, latents) == listening  # listening passes the latents through


def test_a_bad_latent_never_silences_the_prior(chain):
    """NaN or inf latents from upstream: every output buffer stays finite, listening or generating."""
    _, _, prior_ts, _ = chain
    for listen in ("true", "false"):
        host = NnHost(prior_ts)
        host.model.set_listen(listen)
        latents = latent_sequence(frames=64)
        latents[0, 3, 9], latents[0, 5, 20], latents[0, 1, 0] = float("nan"), float("inf"), 1e30
        outputs = [host.perform("forward", at_full_rate(latents[..., i:i + 8]), finite=False) for i in range(0, 64, 8)]
        assert all(torch.isfinite(out).all() for out in outputs), listen


def test_a_switch_that_means_nothing_is_refused_and_the_value_kept(chain):
    _, _, prior_ts, _ = chain
    host = NnHost(prior_ts)
    assert host.model.set_listen("true") == 0
    for bad in ("maybe", "", "nan"):
        assert host.model.set_listen(bad) == 1 and host.model.get_listen() == ["true"]
        assert host.model.set_reset(bad) == 1 and host.model.get_reset() == ["false"]


@pytest.mark.parametrize("frames_per_buffer", [1, 2, 8])
def test_listening_in_buffers_gives_the_full_sequence_logits(chain, frames_per_buffer):
    """The sliding window (context 16 < 64 frames) streamed buffer by buffer = one offline pass."""
    _, run, prior_ts, _ = chain
    prior, _ = models.load_prior(run / "version_0" / "last.pt")
    latents = latent_sequence(frames=64)
    tokens = models.quantize_latents(latents.transpose(1, 2), prior.resolution)  # (1, 64, 8)
    with torch.no_grad():
        expected = prior(tokens[:, :-1], tokens[:, 1:])  # (1, 63, 8, 16): frames 1..63
    host = NnHost(prior_ts)
    host.model.set_listen("true")
    logits = []
    for i in range(0, 64, frames_per_buffer):
        out = host.perform("forward", at_full_rate(latents[..., i:i + frames_per_buffer]))
        assert torch.equal(out[:, :LATENT, ::RATIO], latents[..., i:i + frames_per_buffer])  # passed through
        logits.append(host.model.stream.last_logits)
    logits = torch.cat(logits, dim=1)  # (1, 64, 8, 16)
    assert torch.allclose(logits[:, 1:], expected, atol=1e-4)


def test_reset_clears_the_context(chain):
    _, _, prior_ts, _ = chain
    a, b = latent_sequence(seed=1, frames=32), latent_sequence(seed=2, frames=32)
    fresh = NnHost(prior_ts)
    fresh.model.set_listen("true")
    fresh_out = fresh.perform("forward", at_full_rate(b))
    host = NnHost(prior_ts)
    host.model.set_listen("true")
    host.perform("forward", at_full_rate(a))
    continued = host.perform("forward", at_full_rate(b))
    assert not torch.allclose(continued[:, -1], fresh_out[:, -1])  # the context of a shows
    host.model.set_reset("true")
    assert host.model.get_reset() == ["true"]
    after_reset = host.perform("forward", at_full_rate(b))
    assert torch.allclose(after_reset, fresh_out, atol=1e-5)
    assert host.model.get_reset() == ["false"]  # one-shot


def generate_with_host(prior_ts, primer, n_frames, buffer_frames, temperature=0.0):
    """Listen to primer (1, 8, P) then generate n_frames, in buffers, as a patch would."""
    host = NnHost(prior_ts)
    host.model.set_temperature(temperature)
    host.model.set_listen("true")
    host.stream("forward", at_full_rate(primer), buffer_frames * RATIO)
    host.model.set_listen("false")
    out = host.stream("forward", at_full_rate(torch.zeros(1, LATENT, n_frames)), buffer_frames * RATIO)
    return out[:, :LATENT, ::RATIO], out[:, -1, ::RATIO]


def test_temperature_zero_is_deterministic_and_equals_generate_py(chain, tmp_path):
    vae_ts, run, prior_ts, _ = chain
    t = np.arange(SR // 2) / SR
    prime = tmp_path / "prime.wav"
    sf.write(prime, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), SR)
    code, out, err = run_script("generate.py", "prior", run, "--model", vae_ts, "--seconds", 64 * RATIO / SR,
                                "-b", 2, "--temperature", 0, "--prime", prime, "--out", tmp_path / "gen")
    assert code == 0, err
    offline = np.load(tmp_path / "gen" / "prior" / "0.npy")  # (frames, 8)
    assert offline.shape == (64, LATENT)
    assert np.array_equal(offline, np.load(tmp_path / "gen" / "prior" / "1.npy"))  # deterministic
    info = sf.info(tmp_path / "gen" / "prior" / "0.wav")
    assert info.samplerate == SR and info.frames == 64 * RATIO
    audio = torch.from_numpy(sf.read(prime, dtype="float32")[0])
    primer = torch.jit.load(str(vae_ts)).encode(audio.view(1, 1, -1))[:, :LATENT]  # a fresh encoder, as generate.py
    for buffer_frames in (1, 8):
        latents, perplexity = generate_with_host(prior_ts, primer, 64, buffer_frames)
        assert torch.allclose(latents[0].t(), torch.from_numpy(offline), atol=1e-5), buffer_frames
        assert torch.isfinite(perplexity).all() and (perplexity >= 1.0 - 1e-4).all()


def test_sampling_at_temperature_one_varies_between_runs(chain):
    _, _, prior_ts, _ = chain
    primer = latent_sequence(frames=8)
    torch.manual_seed(0)
    first, _ = generate_with_host(prior_ts, primer, 32, 8, temperature=1.0)
    second, _ = generate_with_host(prior_ts, primer, 32, 8, temperature=1.0)
    assert not torch.equal(first, second)


def test_combined_file_chains_encode_prior_decode(chain):
    vae_ts, _, _, combined_ts = chain
    host = NnHost(combined_ts)
    assert host.model.get_methods() == ["encode", "decode", "forward", "prior"]
    assert host.params["prior"] == [LATENT, RATIO, LATENT + 1, RATIO]
    assert host.params["encode"][2] == LATENT and host.params["decode"][0] == LATENT
    vae = torch.jit.load(str(vae_ts))
    for method in ("encode", "decode", "forward"):  # inlet/outlet names and latency of the VAE's own methods
        for side in ("input", "output"):
            assert getattr(host.model, f"{method}_{side}_labels") == getattr(vae, f"{method}_{side}_labels")
        assert host.model.get_latency(method) == vae.get_latency(method)
    assert host.model.get_latency("prior") == 0
    assert set(host.model.get_attributes()) >= {"temperature", "listen", "reset", "phase_mode", "latent_scale"}
    assert host.model.set_phase_mode("random") == 0 and host.model.get_phase_mode() == ["random"]
    assert host.model.set_temperature(0.0) == 0 and host.model.get_temperature() == [0.0]
    t = torch.arange(8192) / SR
    for batch in (1, 4):
        audio = (0.3 * torch.sin(2 * torch.pi * 330 * t)).expand(batch, 1, -1).contiguous()
        for buffer in (RATIO, 2048):
            latents = host.stream("encode", audio, buffer)
            generated = host.stream("prior", latents, buffer)
            out = host.stream("decode", generated[:, :LATENT], buffer)
            assert out.shape == (batch, 1, 8192)
            host.model.set_reset("true")
    host.model.set_phase_mode("keep_input")
    plain = NnHost(vae_ts)  # forward is the model's own
    x = torch.randn(1, 1, 2048) * 0.1
    assert torch.allclose(host.perform("forward", x), plain.perform("forward", x), atol=1e-5)


class PlainLatentModel(torch.nn.Module):
    """An nn~ model of another toolkit (RAVE-like): encode/decode/forward with their _params, no
    inlet/outlet names, no get_latency, one attribute of its own."""

    def __init__(self):
        super().__init__()
        self.register_buffer("encode_params", torch.tensor([1, 1, LATENT, RATIO]))
        self.register_buffer("decode_params", torch.tensor([LATENT, RATIO, 1, 1]))
        self.register_buffer("forward_params", torch.tensor([1, 1, 1, 1]))
        self.ratio, self.latent = RATIO, LATENT

    @torch.jit.export
    def get_attributes(self):
        return ["gain"]

    @torch.jit.export
    def encode(self, x: torch.Tensor) -> torch.Tensor:  # (batch, 1, n) -> (batch, LATENT, n / RATIO)
        frames = x.reshape(x.size(0), 1, -1, self.ratio).mean(-1)
        return frames.expand(-1, self.latent, -1).contiguous()

    @torch.jit.export
    def decode(self, z: torch.Tensor) -> torch.Tensor:  # (batch, LATENT, k) -> (batch, 1, k * RATIO)
        return z.mean(1, keepdim=True).repeat_interleave(self.ratio, dim=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


def test_combined_file_with_another_toolkits_model(chain, tmp_path):
    _, run, _, _ = chain
    plain_ts = tmp_path / "plain.ts"
    torch.jit.save(torch.jit.script(PlainLatentModel()), str(plain_ts))
    combined_ts = script.export_prior(run, tmp_path, model_path=plain_ts, verbose=False)
    host = NnHost(combined_ts)
    assert host.model.get_methods() == ["encode", "decode", "forward", "prior"]
    assert host.model.encode_output_labels == [f"output {i}" for i in range(LATENT)]  # numbered: it has none
    assert host.model.get_attributes() == ["temperature", "listen", "reset"]  # its "gain" is not reachable
    audio = torch.randn(4, 1, 4096) * 0.1
    generated = host.stream("prior", host.stream("encode", audio, 1024), 1024)
    assert host.stream("decode", generated[:, :LATENT], 1024).shape == (4, 1, 4096)


@pytest.mark.slow
def test_export_cli(chain, tmp_path):
    vae_ts, run, _, _ = chain
    code, out, err = run_script("script.py", "--prior", "--run", run, "-o", tmp_path)
    assert code == 0 and (tmp_path / "p.ts").exists() and "perplexity" in out, err
    code, out, err = run_script("script.py", "--prior", "--run", run, "-o", tmp_path)
    assert code == 2 and "already exists" in err and "Traceback" not in err
    code, out, err = run_script("script.py", "--prior", "--run", run, "--model", vae_ts, "-o", tmp_path)
    assert code == 0 and (tmp_path / "p_vae.ts").exists(), err
    # the VAE's own temperature gives way to the prior's: said so
    assert "not reachable in the combined file: temperature" in out, out
    code, out, err = run_script("script.py", "--prior", "--run", vae_ts.parent)
    assert code == 2 and "not a prior checkpoint" in err and "Traceback" not in err
    code, out, err = run_script("script.py", "--run", run, "--model", vae_ts)
    assert code == 2 and "--prior" in err


def test_training_lets_you_hear_the_prior(chain, tmp_path, capsys):
    """At each validation the prior generates (primed and unprimed) as its export does; with the
    dataset's model at hand the audio goes to TensorBoard, without it the latents alone, said once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    vae_ts, run, _, _ = chain
    db = run.parent / "db"
    for extra, with_audio in (([], False), (["--model", str(vae_ts)], True)):
        run_dir = train_prior.main(["--db_path", str(db), "--name", "hear", f"rundir={tmp_path}", *TINY_PRIOR,
                                    "train.max_steps=4", "train.val_every=2", *extra])
        events = EventAccumulator(str(run_dir), size_guidance={"images": 0, "audio": 0}).Reload()
        assert "generated/latents" in events.Tags()["images"]
        assert len(events.Images("generated/latents")) == 2  # one per validation
        audio = events.Tags()["audio"]
        assert ("generated/primed" in audio and "generated/unprimed" in audio) == with_audio
        err = capsys.readouterr().err
        assert err.count("no decoder for the generated latents") == (0 if with_audio else 1), err
