"""The reference-model training script at the tiny smoke sizes: it runs, logs, writes loadable assets, packs and
unpacks weights, and resumes exactly."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vidaccel.reference.architecture import SMOKE, build_vae
from vidaccel.reference.pipeline import UnacceptedReferenceWarning, reference_pipeline

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_reference.py"


@pytest.fixture(scope="module")
def train():
    spec = importlib.util.spec_from_file_location("train_reference", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _smoke_args(root: Path, *extra: str) -> list[str]:
    return [
        "--config",
        "smoke",
        "--device",
        "cpu",
        "--vae-batch",
        "2",
        "--transformer-batch",
        "2",
        "--latent-stat-clips",
        "2",
        "--log-every",
        "1",
        "--checkpoint-every",
        "0",
        "--assets-dir",
        str(root / "assets"),
        "--log-dir",
        str(root / "logs"),
        "--checkpoint-dir",
        str(root / "checkpoints"),
        *extra,
    ]


def test_smoke_run_trains_logs_and_writes_loadable_assets(train, tmp_path):
    train.main(
        _smoke_args(
            tmp_path,
            "--stage",
            "all",
            "--vae-steps",
            "3",
            "--transformer-steps",
            "3",
            "--export-dir",
            str(tmp_path / "export"),
        )
    )
    log = json.loads((tmp_path / "logs" / "training_log.json").read_text())
    for stage in ("vae", "transformer"):
        assert log["stages"][stage]["steps_done"] == 3
        assert [row["step"] for row in log["stages"][stage]["curve"]] == [0, 1, 2]
        assert all(torch.isfinite(torch.tensor(row["loss"])) for row in log["stages"][stage]["curve"])
        assert (tmp_path / "logs" / f"{stage}_loss.csv").is_file()
    assert len(log["stages"]["vae"]["latent_statistics"]["std"]) == SMOKE.latent_channels

    card = json.loads((tmp_path / "assets" / "model_card.json").read_text())
    assert card["acceptance_passed"] is False and card["training"]["transformer"]["steps_done"] == 3
    with pytest.warns(UnacceptedReferenceWarning):
        pipe = reference_pipeline(path=tmp_path / "assets")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae.config.latents_std == log["stages"]["vae"]["latent_statistics"]["std"]
    video = pipe(
        "a green square grows over a white background",
        height=32,
        width=32,
        num_frames=5,
        num_inference_steps=2,
        max_sequence_length=SMOKE.max_sequence_length,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).frames
    assert video.shape == (1, 5, 3, 32, 32) and torch.isfinite(video).all()

    # Packed weights from a training machine install into an identical asset folder.
    train.main(["--stage", "install", "--import-dir", str(tmp_path / "export"), "--assets-dir", str(tmp_path / "copy")])
    for component in ("vae", "transformer"):
        original = load_file(str(tmp_path / "assets" / component / "diffusion_pytorch_model.safetensors"))
        installed = load_file(str(tmp_path / "copy" / component / "diffusion_pytorch_model.safetensors"))
        assert original.keys() == installed.keys()
        assert all(torch.equal(original[k], installed[k]) for k in original)
        config = json.loads((tmp_path / "copy" / component / "config.json").read_text())
        assert config == json.loads((tmp_path / "assets" / component / "config.json").read_text())


def test_warm_start_begins_from_the_given_weights(train, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    train.main(_smoke_args(first, "--stage", "all", "--vae-steps", "2", "--transformer-steps", "2"))
    # Zero steps from a warm start must reproduce the starting weights exactly (EMA included).
    train.main(
        _smoke_args(
            second,
            "--stage",
            "all",
            "--vae-steps",
            "0",
            "--transformer-steps",
            "0",
            "--init-from",
            str(first / "assets"),
        )
    )
    for component in ("vae", "transformer"):
        a = load_file(str(first / "assets" / component / "diffusion_pytorch_model.safetensors"))
        b = load_file(str(second / "assets" / component / "diffusion_pytorch_model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), component


def test_resumed_run_matches_an_uninterrupted_one(train, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train.main(_smoke_args(straight, "--stage", "all", "--vae-steps", "3", "--transformer-steps", "3"))
    train.main(_smoke_args(resumed, "--stage", "vae", "--vae-steps", "2"))
    train.main(_smoke_args(resumed, "--stage", "vae", "--vae-steps", "3", "--resume"))
    train.main(_smoke_args(resumed, "--stage", "transformer", "--transformer-steps", "2"))
    train.main(_smoke_args(resumed, "--stage", "transformer", "--transformer-steps", "3", "--resume"))
    for component in ("vae", "transformer"):
        a = load_file(str(straight / "assets" / component / "diffusion_pytorch_model.safetensors"))
        b = load_file(str(resumed / "assets" / component / "diffusion_pytorch_model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), component


def test_unclamped_decode_is_the_stock_decode_before_its_clamp(train):
    torch.manual_seed(0)
    vae = build_vae(SMOKE).eval()
    latents = torch.randn(1, SMOKE.latent_channels, 2, 4, 4)
    with torch.no_grad():
        unclamped = train.decode_unclamped(vae, latents)
        stock = vae.decode(latents).sample
    assert unclamped.shape == stock.shape == (1, 3, 5, 32, 32)
    assert vae.config.patch_size == SMOKE.vae_patch_size == 2  # the unpatchify path is the one exercised
    assert torch.allclose(unclamped.clamp(-1, 1), stock, atol=1e-6)


def test_step_planner_turns_seconds_into_a_step_count(train, monkeypatch):
    clock = iter(float(t) for t in range(1000))
    monkeypatch.setattr(train.time, "perf_counter", lambda: next(clock))
    planner = train.StepPlanner(steps=10_000, seconds=100.0, skip=2, measure=4)
    for done in range(1, 7):
        planner.after_step(done)
        assert planner.resolve(done) is None or done == 6
    # The clock ticks once per reading: started at 0, marked at 1 after step 2, read at 2 after step 6 and at 3
    # for the remaining budget, so 4 steps took 1 s and 97 s remain.
    assert planner.seconds_per_step == pytest.approx(0.25)
    assert planner.resolve(6) == 6 + 1 + int(97 / 0.25)


def test_vae_crops_cover_the_whole_clip_by_default(train):
    # The causal VAE's feature cache is trained only over as many latent frames as a crop holds; 9-frame crops left
    # frames 9-32 of a 33-frame clip drifting in colour (benchmarks/reference_training/README.md, session 3).
    shipped = train.parse_args(["--config", "shipped"])
    assert train.vae_crop(shipped, train.CONFIGS["shipped"]) == (33, 64)
    assert train.vae_crop(train.parse_args(["--vae-frames", "9", "--vae-tile", "128"]), SMOKE) == (5, 32)
    with pytest.raises(ValueError):
        train.vae_crop(train.parse_args(["--vae-frames", "8"]), train.CONFIGS["shipped"])


def test_reconstruction_error_is_logged_per_frame(train, tmp_path):
    clips = torch.zeros(2, 3, 5, 4, 4)
    recon = clips.clone()
    recon[:, :, 3] = 0.5
    assert train.reconstruction_l1_by_frame(recon, clips) == [0.0, 0.0, 0.0, 0.5, 0.0]
    train.main(_smoke_args(tmp_path, "--stage", "vae", "--vae-steps", "1"))
    stats = json.loads((tmp_path / "logs" / "training_log.json").read_text())["stages"]["vae"]["latent_statistics"]
    assert len(stats["full_size_reconstruction_l1_by_frame"]) == SMOKE.num_frames


def test_decoder_only_vae_training_keeps_the_latent_space(train, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    train.main(_smoke_args(first, "--stage", "vae", "--vae-steps", "2"))
    train.main(
        _smoke_args(
            second, "--stage", "vae", "--vae-steps", "2", "--vae-train", "decoder", "--init-from", str(first / "assets")
        )
    )
    a = load_file(str(first / "assets" / "vae" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(second / "assets" / "vae" / "diffusion_pytorch_model.safetensors"))
    encoder = [k for k in a if k.startswith(("encoder.", "quant_conv."))]
    decoder = [k for k in a if k.startswith(("decoder.", "post_quant_conv."))]
    assert encoder and decoder
    assert all(torch.equal(a[k], b[k]) for k in encoder)
    assert any(not torch.equal(a[k], b[k]) for k in decoder)
    config_a = json.loads((first / "assets" / "vae" / "config.json").read_text())
    config_b = json.loads((second / "assets" / "vae" / "config.json").read_text())
    assert config_b["latents_mean"] == config_a["latents_mean"] and config_b["latents_std"] == config_a["latents_std"]
    with pytest.raises(ValueError):
        train.main(_smoke_args(tmp_path / "third", "--stage", "vae", "--vae-steps", "1", "--vae-train", "decoder"))


def test_object_crops_centre_on_the_object_and_stay_inside(train):
    coverage = torch.zeros(3, 4, 64, 64)
    coverage[0, :, 10:14, 50:54] = 1.0  # near the top right corner: the crop is clamped inside the frame
    coverage[1, :2, 30:34, 30:34] = 1.0
    coverage[1, 2:, 38:42, 38:42] = 1.0  # moving: centred on the mean position
    corners = train.object_crop_corners(coverage, 16)  # clip 2 has no object in view: centre crop
    assert corners == [(4, 44), (28, 28), (24, 24)]


def test_object_weighted_vae_stage_runs(train, tmp_path):
    train.main(
        _smoke_args(
            tmp_path, "--stage", "vae", "--vae-steps", "2", "--vae-object-weight", "8", "--vae-crop-mode", "object"
        )
    )
    stage = json.loads((tmp_path / "logs" / "training_log.json").read_text())["stages"]["vae"]
    assert stage["object_weight"] == 8.0 and stage["crop_mode"] == "object" and stage["steps_done"] == 2


def test_latent_coverage_follows_the_causal_frame_groups(train):
    coverage = torch.zeros(1, 9, 16, 16)  # 9 frames -> latent frames {0}, {1-4}, {5-8}; 8x8 pixels per cell
    coverage[0, 0, :8, :8] = 1.0  # frame 0, top-left cell fully covered
    coverage[0, 2, 8:, 8:12] = 1.0  # frame 2 only, half of the bottom-right cell
    latent = train.latent_coverage(coverage, (3, 2, 2))
    expected = torch.zeros(1, 3, 2, 2)
    expected[0, 0, 0, 0] = 1.0
    expected[0, 1, 1, 1] = 0.5  # the most any frame of the group covers it
    assert torch.equal(latent, expected)
    with pytest.raises(ValueError, match="latent grid"):
        train.latent_coverage(coverage, (4, 2, 2))


def test_object_weighted_transformer_stage_runs_and_caches_the_coverage(train, tmp_path):
    pool = tmp_path / "pool.safetensors"
    args = _smoke_args(tmp_path, "--stage", "all", "--vae-steps", "1", "--transformer-steps", "2",
                       "--transformer-object-weight", "5", "--pool-cache", str(pool))
    train.main(args)
    stage = json.loads((tmp_path / "logs" / "training_log.json").read_text())["stages"]["transformer"]
    assert stage["object_weight"] == 5.0 and stage["steps_done"] == 2
    assert all(row["loss"] == row["loss"] for row in stage["curve"])  # finite, not NaN
    stored = load_file(str(pool))
    assert stored["coverage"].shape[0] == stored["latents"].shape[0]
    assert stored["coverage"].shape[1:] == stored["latents"].shape[2:]
    assert 0 < float(stored["coverage"].max()) <= 1  # the object is in view somewhere


def test_mixed_clip_sizes_alternate_pools(train, tmp_path, monkeypatch):
    """--mix-clip-size trains every N-th step on a second pool of another clip size (and says so in the log)."""
    shapes = []
    original = train.LatentPool.batch

    def recording(self, size, seed):
        x0, embeddings, coverage = original(self, size, seed)
        shapes.append(tuple(x0.shape))
        return x0, embeddings, coverage

    monkeypatch.setattr(train.LatentPool, "batch", recording)
    train.main(_smoke_args(tmp_path, "--stage", "all", "--vae-steps", "1", "--transformer-steps", "6",
                           "--transformer-object-weight", "5", "--mix-clip-size", "9,64,64", "--mix-every", "3",
                           "--mix-batch", "1", "--mix-pool-clips", "3"))
    small, large = (2, 4, 2, 4, 4), (1, 4, 3, 8, 8)  # (batch, latent channels, frames, height, width)
    assert shapes == [small, small, large, small, small, large]
    stage = json.loads((tmp_path / "logs" / "training_log.json").read_text())["stages"]["transformer"]
    assert stage["mix"] == {"clip_size": "9,64,64", "every": 3, "batch": 1, "clips": 3}
    assert stage["steps_done"] == 6 and all(row["loss"] == row["loss"] for row in stage["curve"])


@pytest.mark.parametrize("extra, message", [
    (("--mix-clip-size", "10,64,64"), "4k \\+ 1"),
    (("--mix-clip-size", "9,64"), "FRAMES,HEIGHT,WIDTH"),
    (("--mix-clip-size", "9,64,64", "--mix-every", "1"), "mix-every"),
])
def test_bad_mixed_clip_sizes_are_refused_before_training(train, tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        train.main(_smoke_args(tmp_path, "--stage", "transformer", "--transformer-steps", "1", *extra))
