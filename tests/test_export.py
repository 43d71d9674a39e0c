"""script.py: the nn~ export, checked by a host that does what nn~ does with the .ts file.

`NnHost` loads the file with torch.jit.load, reads get_methods and <method>_params, keeps the last
sample of each in_ratio block of every signal input, calls the method on (batch, channels,
B/in_ratio) and sample-and-holds the output (repeat_interleave(out_ratio)), checking shape, dtype
and finiteness on every call. Behaviour tests use the fast 16 kHz, 256/64 transform.
"""
from pathlib import Path

import pytest
import torch

import data
import models
import script
import train_vae
from helpers import FAST, HOP, N_FFT, SR, NnHost, make_run, run_script

LATENT = 8
N_SAMPLES = 16384  # a multiple of every buffer size tested


pytestmark = pytest.mark.usefixtures("one_thread")  # streaming code is timed for one thread


ENCODER_AND_DECODER = {  # every label path: encoder + decoder task, decoder task with and without a predictor
    "conditioning": {"timbre": {"dim": 3, "target": ["encoder", "decoder"], "embedding": "Embedding",
                                "embedding_dim": 4},
                     "pitch": {"dim": 12, "target": ["decoder"], "embedding": "OneHot"},
                     "octave": {"dim": 8, "target": ["decoder"], "embedding": "OneHot"}},
    "prediction": {"pitch": {"dim": 12, "args": {"nlayers": 1, "hidden_dims": 32}}}}


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """(exported .ts, eager model) of an untrained model with encoder and decoder conditioning."""
    root = tmp_path_factory.mktemp("labelled")
    run_dir, model = make_run(root, **ENCODER_AND_DECODER)
    return script.export(root / "fake", verbose=False), model.eval()


@pytest.fixture(scope="module")
def trained(demo_root, tmp_path_factory):
    """A short real training run of dgt_pitch_prediction (FAST transform) and its export via the CLI."""
    rundir = tmp_path_factory.mktemp("trained")
    run_dir = train_vae.main(["--config-name", "dgt_pitch_prediction", "name=exp", f"rundir={rundir}",
                              f"+data.dataset.root={demo_root}", *FAST, "train.max_steps=20",
                              "train.val_every=20", "train.log_every=20", "train.batch_size=64"])
    code, out, err = run_script("script.py", rundir / "exp")
    assert code == 0, err
    assert (rundir / "exp" / "exp.ts").exists() and "forward" in out
    return rundir / "exp" / "exp.ts", run_dir


def tones(batch=1, silent=N_FFT):
    """Test audio (batch, 1, N_SAMPLES): harmonic tones of different pitch and level, silent start."""
    t = torch.arange(N_SAMPLES) / SR
    audio = torch.stack([sum(torch.sin(2 * torch.pi * h * (180 + 70 * b) * t) / h for h in range(1, 6))
                         * (0.3 / (1 + b)) for b in range(batch)]).unsqueeze(1)
    audio[..., :silent] = 0.0
    return audio


def label_signals(batch, values, n=N_SAMPLES):
    """Constant label signals (batch, len(values), n)."""
    return torch.tensor(values, dtype=torch.float32).view(1, -1, 1).expand(batch, -1, n).clone()


# ---- the nn~ contract ------------------------------------------------------------------------


def test_methods_params_labels_and_latency(trained):
    path, _ = trained
    host = NnHost(path)
    model = host.model
    assert model.get_methods() == ["encode", "decode", "forward"]
    assert host.params["encode"] == [1, 1, LATENT + 2, HOP]
    assert host.params["decode"] == [LATENT + 2, HOP, 1, 1]
    assert host.params["forward"] == [3, 1, 3, 1]
    # latents ordered by importance, each labelled with its rank and share of the variance
    latents = model.encode_output_labels[:LATENT]
    assert [label.split(" ")[0] for label in latents] == [f"latent_{i}" for i in range(LATENT)]
    shares = [int(label.split("(")[1].rstrip("%)")) for label in latents]
    assert shares == sorted(shares, reverse=True) and 95 <= sum(shares) <= 105
    assert model.encode_output_labels[LATENT:] == ["pred_pitch", "pred_octave"]
    assert model.decode_input_labels == latents + ["pitch", "octave"]
    assert model.forward_input_labels == ["audio", "pitch", "octave"]
    assert model.forward_output_labels == ["audio", "pred_pitch", "pred_octave"]
    for method, (in_ch, in_ratio, out_ch, out_ratio) in host.params.items():
        assert len(getattr(model, f"{method}_input_labels")) == in_ch
        assert len(getattr(model, f"{method}_output_labels")) == out_ch
        assert in_ratio & (in_ratio - 1) == 0 and out_ratio & (out_ratio - 1) == 0  # powers of two
    # analysis delay (one hop at n_fft = 4·hop), synthesis n_fft/2, causal phase: no extra frame
    assert model.get_latency("encode") == HOP
    assert model.get_latency("decode") == N_FFT // 2
    assert model.get_latency("forward") == N_FFT - HOP
    assert model.sample_rate == SR


def test_attributes_and_sample_rate(trained):
    model = NnHost(trained[0]).model
    assert model.get_attributes() == ["phase_mode", "temperature", "latent_scale", "latent_bias", "preset"]
    codes = {a: getattr(model, f"{a}_params").tolist() for a in model.get_attributes()}
    assert codes == {"phase_mode": [3], "temperature": [2], "latent_scale": [2], "latent_bias": [2], "preset": [3]}
    assert model.get_phase_mode() == ["keep_input"] and model.get_temperature() == [0.0]
    for mode in ("rtpghi", "random", "keep_input"):
        assert model.set_phase_mode(mode) == 0 and model.get_phase_mode() == [mode]
    assert model.set_phase_mode("pghi") != 0 and model.get_phase_mode() == ["keep_input"]  # old value kept
    assert model.set_temperature(0.5) == 0 and model.get_temperature() == [0.5]
    assert model.set_temperature(-1.0) != 0 and model.set_temperature(float("nan")) != 0
    assert model.get_temperature() == [0.5]
    assert model.set_latent_scale(2.0) == 0 and model.get_latent_scale() == [2.0]
    assert model.set_latent_bias(float("inf")) != 0 and model.get_latent_bias() == [0.0]
    assert model.set_sample_rate(SR) == 0
    assert model.set_sample_rate(44100) != 0  # refused with a message, never silent garbage
    assert model.set_sample_rate(0) == 0  # "unknown": what nn~ 1.6 passes on a [reload(


# ---- streaming at every buffer size and batch --------------------------------------------------


@pytest.mark.parametrize("batch", [1, 4])
def test_buffers_chunked_equal_one_shot(labelled, batch):
    """Every method, buffers of one hop, 2048, 4096 and 8192: identical to one call on the whole signal."""
    path, _ = labelled
    audio = tones(batch)
    labels = label_signals(batch, [1, 5, 2])  # timbre, pitch, octave (forward's order)
    labels[:, 1, N_SAMPLES // 2:] = -1  # pitch unknown in the second half: predicted
    inputs = {"encode": torch.cat([audio, labels[:, :1]], 1), "forward": torch.cat([audio, labels], 1)}
    one_shot = {m: NnHost(path).perform(m, x) for m, x in inputs.items()}
    latents = one_shot["encode"][:, :LATENT]
    inputs["decode"] = torch.cat([latents, labels], 1)  # decode's labels: timbre, pitch, octave
    one_shot["decode"] = NnHost(path).perform("decode", inputs["decode"])
    assert one_shot["forward"].abs()[:, 0].max() > 1e-3  # not silence
    for buffer in (HOP, 2048, 4096, 8192):
        host = NnHost(path)
        for method, x in inputs.items():
            chunked = host.stream(method, x, buffer)
            assert torch.allclose(chunked, one_shot[method], rtol=0, atol=1e-5), (method, buffer)


@pytest.mark.parametrize("phase_mode", ["rtpghi", "random"])
def test_phase_modes_stream_and_chain(labelled, phase_mode):
    """forward in each generated-phase mode: chunking-invariant, and equal to encode -> decode chained
    in the host (forward's latency is encode's plus decode's), encode's predicted pitch patched into
    decode's pitch inlet (decode alone has no input frame for its predictor to read)."""
    path, _ = labelled
    batch = 2
    audio, labels = tones(batch), label_signals(batch, [0, -1, 3])
    x = torch.cat([audio, labels], 1)
    whole = NnHost(path, phase_mode).perform("forward", x)
    assert torch.allclose(NnHost(path, phase_mode).stream("forward", x, 128), whole, rtol=0, atol=1e-5)
    host = NnHost(path, phase_mode)
    encoded = host.stream("encode", torch.cat([audio, labels[:, :1]], 1), 2048)  # latents, predicted pitch
    chained = host.stream("decode", torch.cat([encoded[:, :LATENT], labels[:, :1], encoded[:, LATENT:], labels[:, 2:]],
                                              1), 2048)
    assert torch.allclose(chained, whole[:, :1], rtol=0, atol=1e-5)
    assert not torch.allclose(whole[:, :1], NnHost(path).perform("forward", x)[:, :1], atol=1e-3)  # ≠ keep_input


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e30])
@pytest.mark.parametrize("method, phase_mode", [("forward", "keep_input"), ("forward", "rtpghi"),
                                                ("forward", "random"), ("encode", "keep_input"),
                                                ("decode", "rtpghi"), ("decode", "random")])
def test_one_bad_value_upstream_never_silences_a_method(labelled, method, phase_mode, bad):
    """A live model never dies: one NaN, inf or absurd sample in a buffer (audio, or one latent into
    decode) and every output buffer stays finite and bounded, that one included; the next clean
    buffers play as usual. (Before, rtpghi kept a NaN phase forever.)"""
    path, _ = labelled
    host = NnHost(path, phase_mode)
    batch, buffer = 2, 1024
    audio, labels = tones(batch), label_signals(batch, [1, -1, 3])
    if method == "decode":  # latents of the clean audio, as an encode upstream would send them
        x = torch.cat([NnHost(path).stream("encode", torch.cat([audio, labels[:, :1]], 1), buffer)[:, :LATENT],
                       labels], 1)
    else:
        x = torch.cat([audio, labels if method == "forward" else labels[:, :1]], 1)
    clean = NnHost(path, phase_mode).stream(method, x, buffer)
    x = x.clone()
    x[0, 0, 5 * buffer + 77:5 * buffer + 77 + HOP] = bad  # one hop of bad values in buffer 5 of voice 0
    outputs = [host.perform(method, x[..., i:i + buffer], finite=False) for i in range(0, N_SAMPLES, buffer)]
    for i, out in enumerate(outputs):
        assert torch.isfinite(out).all(), f"buffer {i} after a bad value in buffer 5"
        if method != "encode":
            assert out[:, 0].abs().max() < 100, f"buffer {i}: {out[:, 0].abs().max()}"
    assert torch.equal(torch.cat(outputs, -1)[1], clean[1])  # the other voice never noticed


def test_a_wrong_input_is_answered_with_one_line_and_silence_not_an_exception(labelled, capfd):
    """nn~ never calls a method with a wrong shape, but Python users may: one printed line and zeros
    of the shape nn~ would expect, never a TorchScript traceback (an exception inside nn~'s thread
    can crash the host)."""
    path, _ = labelled
    host = NnHost(path)
    out = host.model.forward(torch.zeros(1, 4, 1000))  # 1000 is not a multiple of the hop (64)
    assert out.shape == (1, 2, 1000) and not out.any()
    assert "multiple of 64" in capfd.readouterr().out
    out = host.model.decode(torch.zeros(4, 3, 8))  # 3 channels where decode takes 8 latents + 3 labels
    assert out.shape == (4, 1, 8 * HOP) and not out.any()
    assert "decode expects (batch, 11 channels" in capfd.readouterr().out
    assert host.model.encode(torch.zeros(2, 2, 256)).shape == (2, LATENT + 1, 4)  # still plays afterwards


def test_batch_entries_are_independent_and_batch_size_can_change(labelled):
    path, _ = labelled
    audio, labels = tones(4), label_signals(4, [2, 4, 1])
    x = torch.cat([audio, labels], 1)
    host = NnHost(path)
    four = host.stream("forward", x, 2048)
    single = NnHost(path).stream("forward", x[2:3], 2048)
    assert torch.allclose(four[2:3], single, rtol=0, atol=1e-5)
    again = host.stream("forward", x[2:3], 2048)  # batch 4 -> 1: state re-sized, as after a fresh load
    assert torch.allclose(again, single, rtol=0, atol=1e-5)


# ---- equal to offline processing after the reported latency ------------------------------------


def offline_latents(model, audio, labels):
    """model.encode means of stft frames: (batch, latent, frames)."""
    mag = data.stft(audio[:, 0], N_FFT, HOP).abs()  # (batch, bins, frames)
    frames = mag.transpose(1, 2).reshape(-1, mag.shape[1])
    with torch.no_grad():
        mean, _ = model.encode(model.normalize(frames), labels)
    return mean.reshape(audio.shape[0], -1, LATENT).transpose(1, 2)


def test_streaming_equals_offline_after_latency(labelled):
    path, model = labelled
    batch = 2
    audio = tones(batch)
    classes = {"timbre": 2, "pitch": 7, "octave": 3}
    signals = label_signals(batch, list(classes.values()))
    host = NnHost(path)
    latency = {m: host.model.get_latency(m) for m in ("encode", "decode", "forward")}
    n_frames = N_SAMPLES // HOP + 1
    frame_labels = {t: torch.full((batch * n_frames,), c) for t, c in classes.items()}
    # encode: the latent held over hop block k is offline frame k - latency/hop
    streamed = host.stream("encode", torch.cat([audio, signals[:, :1]], 1), 2048)[:, :LATENT, ::HOP]
    offline = offline_latents(model, audio, frame_labels)
    delay = latency["encode"] // HOP
    assert torch.allclose(streamed[..., delay:], offline[..., :streamed.shape[-1] - delay], atol=1e-4)
    # forward (keep_input): the audio, latency samples later
    out = host.stream("forward", torch.cat([audio, signals], 1), 4096)[:, 0]
    with torch.no_grad():
        mean = offline_latents(model, audio, frame_labels).transpose(1, 2).reshape(-1, LATENT)
        mag = model.denormalize(model.decode(mean, frame_labels)).reshape(batch, n_frames, -1).transpose(1, 2)
    spec = data.stft(audio[:, 0], N_FFT, HOP)
    reference = data.istft(torch.polar(mag, spec.angle()), N_FFT, HOP, length=N_SAMPLES)
    start, end = N_FFT, N_SAMPLES - N_FFT - latency["forward"]  # away from the offline edges
    shift = latency["forward"]
    assert torch.allclose(out[:, start + shift:end + shift], reference[:, start:end], rtol=1e-4, atol=1e-4)
    # decode: frame k given at hop block k comes out decode-latency samples after k·hop
    z = offline[..., :N_SAMPLES // HOP]  # (batch, latent, frames)
    held = torch.cat([z, label_signals(batch, list(classes.values()), z.shape[-1])], 1)
    decoded = NnHost(path).stream("decode", held.repeat_interleave(HOP, dim=2), 1024)[:, 0]
    with torch.no_grad():
        rows = z.transpose(1, 2).reshape(-1, LATENT)
        cond = {t: torch.full((rows.shape[0],), c) for t, c in classes.items()}
        mag = model.denormalize(model.decode(rows, cond)).reshape(batch, -1, N_FFT // 2 + 1).transpose(1, 2)
    phase_spec = models.StreamingPhase(N_FFT, HOP)(mag, 0)  # decode's default: keep_input falls back to rtpghi
    reference = data.istft(phase_spec, N_FFT, HOP, length=N_SAMPLES)
    end = N_SAMPLES - N_FFT - latency["decode"]
    shift = latency["decode"]
    assert torch.allclose(decoded[:, start + shift:end + shift], reference[:, start:end], rtol=1e-4, atol=1e-4)


# ---- labels in, predictions out ------------------------------------------------------------------


def test_label_signals_decimated_rounded_clamped_and_unknown_predicted(labelled):
    path, model = labelled
    audio = tones(1)
    base = torch.cat([audio, label_signals(1, [1, 4, 2])], 1)
    reference = NnHost(path).stream("forward", base, 2048)
    # only the last sample of each hop block counts (nn~'s decimation of a ratio-hop input)
    jittered = base.clone()
    jittered[:, 2, ::HOP] = 6.0  # first sample of each block
    assert torch.allclose(NnHost(path).stream("forward", jittered, 2048), reference, rtol=0, atol=1e-6)
    rounded = base.clone()
    rounded[:, 2] = 4.3  # rounded to class 4
    assert torch.allclose(NnHost(path).stream("forward", rounded, 2048), reference, rtol=0, atol=1e-6)
    top, clamped = base.clone(), base.clone()
    top[:, 2], clamped[:, 2] = 11.0, 99.0  # pitch has 12 classes: 99 means 11
    assert torch.allclose(NnHost(path).stream("forward", clamped, 2048), NnHost(path).stream("forward", top, 2048),
                          rtol=0, atol=1e-6)
    assert not torch.allclose(NnHost(path).stream("forward", top, 2048)[:, 0], reference[:, 0], atol=1e-4)
    # pitch unknown (-1): the predictor's class, which forward also outputs
    unknown = base.clone()
    unknown[:, 2] = -1.0
    out = NnHost(path).stream("forward", unknown, 2048)
    predicted = out[:, 1]  # pred_pitch, held per hop
    assert torch.equal(predicted, predicted.round()) and predicted.min() >= 0 and predicted.max() <= 11
    fed_back = base.clone()
    fed_back[:, 2] = predicted  # pred_pitch fed back as the pitch label: the same sound
    assert torch.allclose(NnHost(path).stream("forward", fed_back, 2048), out, rtol=0, atol=1e-5)
    # octave has no predictor: unknown means class 0; timbre conditions the encoder: unknown means 0
    for channel in (1, 3):
        minus_one, zero = base.clone(), base.clone()
        minus_one[:, channel], zero[:, channel] = -1.0, 0.0
        assert torch.allclose(NnHost(path).stream("forward", minus_one, 2048),
                              NnHost(path).stream("forward", zero, 2048), rtol=0, atol=1e-6)


def test_predictions_are_held_class_indices(labelled):
    path, model = labelled
    audio = tones(1)
    out = NnHost(path).stream("encode", torch.cat([audio, label_signals(1, [1])], 1), 2048)  # (1, latent + 1, n)
    z, predicted = out[0, :LATENT, ::HOP], out[0, LATENT]
    blocks = predicted.reshape(-1, HOP)
    assert torch.equal(blocks, blocks[:, :1].expand(-1, HOP))  # one value per hop, held, never summed
    assert set(blocks[:, 0].tolist()) <= set(range(12))  # class indices of the 12 pitch classes
    # what a predictor reading the latent alone (decode's case) says differs: encode reads the frames too
    with torch.no_grad():
        latent_only = model.predictors["pitch"](z.t(), torch.zeros(z.shape[1], model.bins)).argmax(-1)
    assert not torch.equal(blocks[:, 0], latent_only.float())


def test_temperature_and_latent_controls(labelled):
    path, _ = labelled
    x = torch.cat([tones(1), label_signals(1, [0, 3, 3])], 1)
    plain = NnHost(path).stream("forward", x, 2048)
    host = NnHost(path)
    host.model.set_temperature(1.0)
    noisy = host.stream("forward", x, 2048)
    assert not torch.allclose(noisy[:, 0], plain[:, 0], atol=1e-4)
    host = NnHost(path)
    host.model.set_latent_bias(1.5)
    assert not torch.allclose(host.stream("forward", x, 2048)[:, 0], plain[:, 0], atol=1e-4)
    encoded = NnHost(path).stream("encode", x[:, :2], 2048)
    host = NnHost(path)
    host.model.set_latent_bias(1.5)  # a forward-only control: encode's latents stay raw
    assert torch.allclose(host.stream("encode", x[:, :2], 2048), encoded, rtol=0, atol=1e-6)


def test_unconditioned_model_and_large_fft_with_small_buffer(tmp_path):
    """No labels at all, and n_fft 2048 / hop 512 fed 512-sample buffers (buffer < n_fft)."""
    _, config = train_vae.parse_args(["--config-name", "dgt_normal", "data.transform.sr=16000",
                                      "model.encoder_hidden=[32]", "model.decoder_hidden=[32]"])
    torch.manual_seed(0)
    model = models.build_vae(config)
    module = torch.jit.script(script.build_module(model, config))
    path = tmp_path / "normal.ts"
    module.save(str(path))
    host = NnHost(path)
    assert host.params == {"encode": [1, 1, 8, 512], "decode": [8, 512, 1, 1], "forward": [1, 1, 1, 1]}
    assert host.model.get_latency("forward") == 2048 - 512
    audio = tones(4)
    for method, x in (("forward", audio), ("encode", audio)):
        whole = NnHost(path).perform(method, x)
        assert torch.allclose(host.stream(method, x, 512), whole, rtol=0, atol=1e-5)
    z = NnHost(path).perform("encode", audio)
    assert torch.allclose(host.stream("decode", z, 512), NnHost(path).perform("decode", z), rtol=0, atol=1e-5)


def test_conv_architecture_exports_and_streams(tmp_path):
    """The vschaos2 conv stack (BatchNorm in eval mode) through the same export."""
    _, config = train_vae.parse_args(["--config-name", "dgt_mid", *FAST, "model.architecture=conv",
                                      "model.conv.channels=[8,8,4,4]", "model.conv.mlp_hidden=32"])
    path = tmp_path / "conv.ts"
    torch.jit.script(script.build_module(models.build_vae(config), config)).save(str(path))
    audio = tones(2)
    whole = NnHost(path).perform("forward", audio)
    assert torch.allclose(NnHost(path).stream("forward", audio, HOP), whole, rtol=0, atol=1e-5)


# ---- the command line --------------------------------------------------------------------------


def test_export_file_size_matches_parameters(trained):
    path, run_dir = trained
    model, _ = models.load_vae(run_dir / "last.pt")
    param_bytes = 4 * sum(p.numel() for p in model.parameters())
    # parameters, one random-phase table (256 kB) and the code; no unused buffers
    assert path.stat().st_size < param_bytes + 400_000, (path.stat().st_size, param_bytes)


def test_cli_versions_names_output_and_overwrite(trained, tmp_path, capsys):
    path, run_dir = trained
    run_root = run_dir.parent
    code, _, err = run_script("script.py", run_root)  # the fixture already exported there
    assert code == 2 and "already exists" in err and "--force" in err
    assert script.main([str(run_root), "-o", str(tmp_path), "-v", "0", "-n", "best"]) == tmp_path / "exp.ts"
    assert "best.pt" in capsys.readouterr().out
    assert script.main([str(run_root), "-o", str(tmp_path), "--force"]) == tmp_path / "exp.ts"
    assert not list(tmp_path.glob(".*"))  # written through a temporary file, renamed
    with pytest.raises(data.UserError, match="version_7"):
        script.main([str(run_root), "-v", "7"])
    with pytest.raises(data.UserError, match="no such checkpoint.*last"):
        script.main([str(run_root), "-o", str(tmp_path / "x"), "-n", "first"])
    NnHost(tmp_path / "exp.ts").perform("forward", torch.zeros(1, 3, 2048))


def test_refuses_hop_that_is_not_a_power_of_two(tmp_path):
    make_run(tmp_path, hop=48)
    with pytest.raises(data.UserError, match="power of two"):
        script.export(tmp_path / "fake", verbose=False)
    assert not list(tmp_path.rglob("*.ts"))


def test_export_refuses_a_file_that_does_not_run(tmp_path, monkeypatch):
    make_run(tmp_path)

    def broken_check(module, buffer_size=4096):
        raise RuntimeError("simulated load failure")
    monkeypatch.setattr(script, "check_module", broken_check)
    with pytest.raises(data.UserError, match="does not load or run"):
        script.export(tmp_path / "fake", verbose=False)
    assert not list((tmp_path / "fake").glob("*.ts*")) and not list((tmp_path / "fake").glob(".*"))


def test_pd_example_patch_matches_the_exported_demo_model(trained):
    """patches/pd_example.pd: every [nn~] box names a method of a dgt_pitch_prediction export, its
    connections fit the method's inlets/outlets, and every [set ...( message is accepted."""
    patch = (Path(__file__).resolve().parent.parent / "patches" / "pd_example.pd").read_text()
    records = [r.strip() for r in patch.replace("\\;", "\0").split(";\n") if r.strip()]
    boxes = [r.split() for r in records if r.startswith("#X") and not r.startswith("#X connect")]
    connects = [list(map(int, r.split()[2:6])) for r in records if r.startswith("#X connect")]
    host = NnHost(trained[0])
    nn_boxes = {i: b for i, b in enumerate(boxes) if b[1] == "obj" and b[4] == "nn~"}
    assert {b[6] for b in nn_boxes.values()} == {"forward", "decode"}
    for i, box in nn_boxes.items():
        method, buffer = box[6], int(box[7])
        in_ch, _, out_ch, _ = host.params[method]
        assert buffer & (buffer - 1) == 0 and buffer % 256 == 0  # the demo's hop is 256
        assert {c[3] for c in connects if c[2] == i} == set(range(in_ch)), method  # every inlet fed
        assert all(c[1] < out_ch for c in connects if c[0] == i)
    for src, _, dst, _ in connects:
        assert src < len(boxes) and dst < len(boxes)
        if boxes[src][1] == "msg" and boxes[src][4] == "set":
            attribute, value = boxes[src][5], boxes[src][6]
            assert attribute in host.model.get_attributes()
            if attribute in ("phase_mode", "preset"):
                assert getattr(host.model, f"set_{attribute}")(value) == 0


# ---- ordered latents, the fidelity knob, class presets -----------------------------------------


def test_latent_axes_order_the_latents_by_variance_and_presets_are_class_means():
    torch.manual_seed(0)
    model = models.SpectralVAE(bins=33, latent_dim=4).eval()
    mags = torch.rand(300, 33) * torch.linspace(0.1, 3, 300)[:, None]
    labels = {"pitch": torch.arange(300) % 3 - (torch.arange(300) % 7 == 0).long() * 10}  # some -10: unknown
    axes = models.latent_axes(model, mags, labels, {"pitch": {0: "C", 1: "C#", 2: "D"}})
    assert torch.all(axes["variance"][:-1] >= axes["variance"][1:])
    assert torch.allclose(axes["rotation"].t() @ axes["rotation"], torch.eye(4), atol=1e-5)
    with torch.no_grad():
        z = model.encode(model.normalize(mags))[0]
    rotated = (z - axes["mean"]) @ axes["rotation"]
    assert torch.allclose(rotated.var(0), axes["variance"], rtol=1e-3, atol=1e-7)
    assert axes["preset_names"] == {}  # pitch is neither conditioned nor predicted: no presets
    model = models.SpectralVAE(bins=33, latent_dim=4, prediction={"pitch": {"dim": 4}}).eval()
    axes = models.latent_axes(model, mags, labels, {"pitch": {0: "C", 1: "C#", 2: "D"}})
    with torch.no_grad():
        z = model.encode(model.normalize(mags))[0]
    rotated = (z - axes["mean"]) @ axes["rotation"]
    assert torch.allclose(axes["presets"]["pitch"][1], rotated[labels["pitch"] == 1].mean(0), atol=1e-5)
    assert torch.isnan(axes["presets"]["pitch"][3]).all()  # no frame of class 3
    assert axes["preset_names"]["pitch"] == ["C", "C#", "D", "3"]
    assert models.latent_size_for(axes, fidelity=1.0) == 4 and models.latent_size_for(axes, latent_size=2) == 2
    share = axes["variance"][0] / axes["variance"].sum()
    assert models.latent_size_for(axes, fidelity=float(share) * 0.99) == 1


def test_the_fidelity_knob_keeps_the_most_important_latents(trained, tmp_path):
    path, run_dir = trained
    code, out, err = run_script("script.py", run_dir, "--fidelity", "0.6", "--out", tmp_path)
    assert code == 0, err
    host = NnHost(tmp_path / "exp.ts")
    k = host.params["decode"][0] - 2  # decode's latent inputs (then pitch, octave)
    checkpoint = data.load_checkpoint(run_dir / "last.pt")
    variance = checkpoint["latent_axes"]["variance"]
    share = torch.cumsum(variance, 0) / variance.sum()
    assert 1 <= k < LATENT and share[k - 1] >= 0.6 and (k == 1 or share[k - 2] < 0.6)
    assert host.params["encode"][2] == k + 2 and "latents: %d of 8" % k in out
    audio = torch.cat([tones(1), torch.full((1, 2, N_SAMPLES), -1.0)], 1)
    encoded = host.stream("encode", audio[:, :1], 2048)
    assert encoded.shape[1] == k + 2 and torch.isfinite(encoded).all()
    decoded = host.stream("decode", torch.cat([encoded[:, :k], torch.full((1, 2, encoded.shape[2]), -1.0)], 1), 2048)
    assert decoded.shape == (1, 1, N_SAMPLES) and decoded.abs().max() > 0
    # all latents, ordered: forward sounds as the unordered model's (a rotation and back)
    full = NnHost(path).stream("forward", audio, 2048)
    model, checkpoint = models.load_vae(run_dir / "last.pt")
    plain = torch.jit.script(script.build_module(model, checkpoint["config"]))
    host_plain = NnHost(path)
    host_plain.model = plain
    assert torch.allclose(host_plain.stream("forward", audio, 2048), full, atol=1e-4)
    code, _, err = run_script("script.py", run_dir, "--fidelity", "1.5", "--out", tmp_path)
    assert code == 2 and "--fidelity" in err


def test_a_preset_recalls_a_class_mean_latent_in_decode(trained):
    path, run_dir = trained
    model = NnHost(path).model
    assert "pitch:C" in model.preset_keys and "pitch:0" in model.preset_keys
    latents = torch.zeros(1, LATENT + 2, 32 * HOP)
    latents[:, LATENT:] = -1.0
    plain = NnHost(path).stream("decode", latents, 2048)
    host = NnHost(path)
    assert host.model.set_preset("pitch:E") == 0 and host.model.get_preset() == ["pitch:E"]
    with_preset = host.stream("decode", latents, 2048)
    assert not torch.allclose(with_preset, plain, atol=1e-4)
    assert host.model.set_preset("pitch:A") == 1 and host.model.get_preset() == ["pitch:E"]  # no A: kept
    assert host.model.set_preset("none") == 0 and torch.allclose(NnHost(path).stream("decode", latents, 2048), plain)
