#!/usr/bin/env python
"""Train the shipped reference model on procedurally generated clips, and measure it.

Stages (``--stage``):
  vae          train the Wan VAE on short crops (few frames, small tiles), then measure per-channel latent statistics
  transformer  train the Wan transformer with Wan's flow-matching objective on latents of full-size clips
  all          vae then transformer
  install      write packed weights from a training machine (``--import-dir``) into the asset folder
  acceptance   generate the held-out captions, check object colours, measure attention locality
  timing       time one default generation (50-step CFG, 33x256x256) on --device; appends it to the acceptance JSON
  card         rewrite the asset folder's model_card.json from the training log and the acceptance result
  export-text-encoder  write an fp16 copy of MiniLM (small enough to carry to a training machine)

Every step draws its clips, noise and timesteps from seeds derived from (--seed, stage, step), so a run resumed
from a checkpoint (``--resume``) continues exactly where it stopped. With ``--vae-seconds`` / ``--transformer-seconds``
the step count is planned from the throughput measured in the first steps and recorded in the log; passing that
count as ``--vae-steps`` / ``--transformer-steps`` (and no seconds) repeats the run. Checkpoints hold weights, the
EMA copy and the AdamW moments as safetensors beside a JSON file (no pickle).

Example (GPU):  python benchmarks/train_reference.py --stage all --vae-seconds 200 --transformer-seconds 300 \
                    --init-from assets/reference      (a warm start from the shipped weights)
Smoke (CPU):    python benchmarks/train_reference.py --stage all --config smoke --vae-steps 3 --transformer-steps 3 \
                    --assets-dir /tmp/ref --log-dir /tmp/ref/logs --checkpoint-dir /tmp/ref/ckpt
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# Appended, not prepended: the checkout's top-level ``kernels`` folder must not shadow HF's ``kernels`` package,
# which transformers imports when it is installed (vidaccel itself maps the folder to ``vidaccel.kernels``).
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from vidaccel.reference import data  # noqa: E402
from vidaccel.reference.architecture import (  # noqa: E402
    FLOW_SHIFT,
    GENERATION_DEFAULTS,
    MINI,
    NUM_TRAIN_TIMESTEPS,
    SHIPPED,
    SMOKE,
    ReferenceSizes,
    build_transformer,
    build_vae,
)
from vidaccel.reference.pipeline import write_reference_assets  # noqa: E402
from vidaccel.reference.text_encoder import encode_captions, load_minilm, minilm_model_dir  # noqa: E402

STAGE_IDS = {"vae": 1, "transformer": 2, "acceptance": 3}
CONFIGS = {"shipped": SHIPPED, "mini": MINI, "smoke": SMOKE}


def step_seed(seed: int, stage: str, step: int) -> int:
    """Independent, reproducible seed for each (run seed, stage, step)."""
    return (seed * 1_000_003 + STAGE_IDS[stage] * 1_000_000_007 + step * 7_919) % (2**62)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--stage",
        default="all",
        choices=["all", "vae", "transformer", "install", "acceptance", "timing", "card", "export-text-encoder"],
    )
    parser.add_argument("--config", default="shipped", choices=sorted(CONFIGS))
    parser.add_argument(
        "--clip-size",
        default=None,
        help="FRAMES,HEIGHT,WIDTH of the clips the transformer trains on and acceptance generates (default: the"
        " config's); smaller clips make a cheap first stage of progressive training, the architecture is unchanged",
    )
    parser.add_argument("--seed", type=int, default=20261127)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--assets-dir", type=Path, default=REPO / "assets" / "reference")
    parser.add_argument("--log-dir", type=Path, default=REPO / "benchmarks" / "reference_training")
    parser.add_argument("--checkpoint-dir", type=Path, default=REPO / "out" / "reference_checkpoints")
    parser.add_argument(
        "--export-dir",
        type=Path,
        default=None,
        help="also write packed weights here (vae-<i>.safetensors, transformer-<i>.safetensors)",
    )
    parser.add_argument("--import-dir", type=Path, default=None, help="packed weights for --stage install")
    parser.add_argument("--text-encoder-dir", type=Path, default=None, help="MiniLM folder (default: the package)")
    parser.add_argument("--resume", action="store_true", help="continue from the stage checkpoint if present")
    parser.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="asset folder whose vae/ and transformer/ weights start training (a warm start)",
    )
    parser.add_argument("--checkpoint-every", type=int, default=500)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument(
        "--deadline-seconds", type=float, default=None, help="stop training, whatever the plan, this long after start"
    )
    # VAE
    parser.add_argument("--vae-steps", type=int, default=2000)
    parser.add_argument("--vae-seconds", type=float, default=None)
    parser.add_argument("--vae-batch", type=int, default=16)
    parser.add_argument("--vae-lr", type=float, default=6e-4)
    parser.add_argument(
        "--vae-frames",
        type=int,
        default=None,
        help="frames per training crop (4k + 1); default: the whole clip. The causal VAE's feature cache is only"
        " trained for as many latent frames as the crops hold: v0/v1 trained on 9 frames (3 latent frames) and drifted"
        " in colour from frame 9 on of a 33-frame clip (see benchmarks/reference_training/README.md, session 3)",
    )
    parser.add_argument(
        "--vae-tile", type=int, default=64, help="side of the square training crop, pixels (v0/v1 used 128)"
    )
    parser.add_argument("--vae-kl-weight", type=float, default=1e-4)
    parser.add_argument(
        "--vae-object-weight",
        type=float,
        default=0.0,
        help="extra reconstruction weight on the object's pixels (its coverage from the renderer): the object is a"
        " few percent of a frame, so an unweighted loss lets the VAE drop it",
    )
    parser.add_argument(
        "--vae-crop-mode",
        choices=("random", "object"),
        default="random",
        help="where the spatial crop lies: anywhere, or centred on the object's mean position over the crop's frames",
    )
    parser.add_argument(
        "--vae-train",
        default="all",
        choices=["all", "decoder"],
        help="decoder: freeze the encoder (and quant_conv) of the --init-from VAE and keep its latent statistics, so"
        " the latent space, and a transformer trained on it, stay valid while the decoder is fine-tuned",
    )
    parser.add_argument("--latent-stat-clips", type=int, default=64)
    # transformer
    parser.add_argument("--transformer-steps", type=int, default=4000)
    parser.add_argument("--transformer-seconds", type=float, default=None)
    parser.add_argument("--transformer-batch", type=int, default=32)
    parser.add_argument("--transformer-lr", type=float, default=5e-4)
    parser.add_argument(
        "--pool-clips",
        type=int,
        default=None,
        help="training clips encoded once before the transformer trains (its batches sample them);"
        " default 6144 (shipped), 2048 (mini), 8 (smoke)",
    )
    parser.add_argument(
        "--pool-cache",
        type=Path,
        default=None,
        help="safetensors file for the encoded pool: loaded if present (same clip size and count), else written,"
        " so that variants trained side by side encode it once",
    )
    parser.add_argument(
        "--mix-clip-size",
        default=None,
        help="FRAMES,HEIGHT,WIDTH of a second pool the transformer also trains on (every --mix-every-th step):"
        " cheap small clips teach colour and layout, full-size ones the object scale and positions of the"
        " acceptance size, which a model trained at one size alone does not extrapolate to",
    )
    parser.add_argument("--mix-every", type=int, default=2, help="every N-th step draws from the second pool")
    parser.add_argument("--mix-batch", type=int, default=None, help="batch of the second pool (default: the same)")
    parser.add_argument("--mix-pool-clips", type=int, default=None, help="clips of the second pool (default: same)")
    parser.add_argument("--mix-pool-cache", type=Path, default=None, help="--pool-cache for the second pool")
    parser.add_argument("--caption-dropout", type=float, default=0.1)
    parser.add_argument(
        "--transformer-object-weight",
        type=float,
        default=0.0,
        help="extra flow-matching weight on the latent positions the object covers (its coverage pooled to the"
        " latent grid): the object is a few percent of the tokens, so a uniform loss barely asks for its colour",
    )
    parser.add_argument(
        "--train-flow-shift",
        type=float,
        default=None,
        help="shift of the training sigma density (default: the sampler's flow_shift); larger draws more high-noise"
        " samples, where the layout and the object's colour are decided",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the transformer's training forward (CUDA; the tiny model is launch-bound in eager mode)",
    )
    parser.add_argument("--ema-decay", type=float, default=0.999)
    # acceptance
    parser.add_argument("--acceptance-steps", type=int, default=GENERATION_DEFAULTS["num_inference_steps"])
    parser.add_argument("--acceptance-videos", type=int, default=None, help="default: every held-out caption")
    parser.add_argument(
        "--acceptance-seconds",
        type=float,
        default=None,
        help="start no new generation after this long (the result records how many ran)",
    )
    parser.add_argument(
        "--roundtrip-clips",
        type=int,
        default=6,
        help="held-out renders passed through the VAE to check the classifier on reconstructions",
    )
    parser.add_argument("--locality-videos", type=int, default=2)
    parser.add_argument("--locality-query-stride", type=int, default=1)
    parser.add_argument("--acceptance-out", type=Path, default=None, help="default: <log-dir>/acceptance.json")
    parser.add_argument(
        "--card-training-logs",
        type=Path,
        nargs="+",
        default=None,
        help="--stage card: the training logs of the runs that made the shipped weights (default: <log-dir>/training_log.json)",
    )
    parser.add_argument("--samples-out", type=Path, default=None, help="PNG strip of generated held-out clips")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------
# shared pieces


class RunLog:
    """Loss curves and run facts, rewritten to JSON (and one CSV per stage) whenever something is added."""

    def __init__(self, folder: Path, args: argparse.Namespace, sizes: ReferenceSizes) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "training_log.json"
        self.content: dict[str, Any] = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.content["sizes"] = dataclasses.asdict(sizes)
        self.content.setdefault("stages", {})
        self.content.setdefault("invocations", []).append(
            {
                "argv": sys.argv[1:],
                "device": str(args.device),
                "torch": torch.__version__,
                "gpu": torch.cuda.get_device_name() if str(args.device).startswith("cuda") else None,
            }
        )

    def stage(self, name: str) -> dict[str, Any]:
        return self.content["stages"].setdefault(name, {"curve": []})

    def save(self) -> None:
        self.path.write_text(json.dumps(self.content, indent=1) + "\n")
        for name, stage in self.content["stages"].items():
            if stage.get("curve"):
                with open(self.folder / f"{name}_loss.csv", "w", newline="") as handle:
                    writer = csv.DictWriter(handle, fieldnames=list(stage["curve"][0]))
                    writer.writeheader()
                    writer.writerows(stage["curve"])


def learning_rate(base: float, step: int, warmup: int, planned: int | None) -> float:
    """Linear warm-up, then cosine decay to 10% over the planned steps (flat until the plan is known)."""
    if step < warmup:
        return base * (step + 1) / warmup
    if planned is None or planned <= warmup:
        return base
    progress = min(1.0, (step - warmup) / max(1, planned - warmup))
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


class StepPlanner:
    """Turns a time budget into a step count from the throughput of steps [skip, skip + measure)."""

    def __init__(
        self, steps: int, seconds: float | None, skip: int = 5, measure: int = 20, started: float | None = None
    ) -> None:
        self.max_steps, self.seconds, self.skip, self.measure = steps, seconds, skip, measure
        self.planned: int | None = steps if seconds is None else None
        self.started = time.perf_counter() if started is None else started
        self._mark: float | None = None
        self.seconds_per_step: float | None = None

    def after_step(self, done: int) -> None:
        """``done`` steps of this process finished (resumed steps do not count)."""
        if self.planned is not None:
            return
        if done == self.skip:
            self._mark = time.perf_counter()
        elif done == self.skip + self.measure:
            self.seconds_per_step = (time.perf_counter() - self._mark) / self.measure
            remaining = self.seconds - (time.perf_counter() - self.started)
            self.planned_extra = max(0, int(remaining / self.seconds_per_step))

    def out_of_time(self) -> bool:
        return self.seconds is not None and time.perf_counter() - self.started > self.seconds

    def resolve(self, step: int) -> int | None:
        if self.planned is None and self.seconds_per_step is not None:
            self.planned = min(self.max_steps, step + 1 + self.planned_extra)
        return self.planned


def optimizer_state_tensors(
    optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]
) -> dict[str, torch.Tensor]:
    tensors = {}
    for index, param in enumerate(params):
        state = optimizer.state.get(param, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                tensors[f"optimizer.{index}.{key}"] = state[key].detach().cpu().contiguous()
    return tensors


def restore_optimizer_state(
    optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], tensors: dict[str, torch.Tensor], step: int
) -> None:
    for index, param in enumerate(params):
        if f"optimizer.{index}.exp_avg" in tensors:
            optimizer.state[param] = {
                "step": torch.tensor(float(step)),
                "exp_avg": tensors[f"optimizer.{index}.exp_avg"].to(param.device),
                "exp_avg_sq": tensors[f"optimizer.{index}.exp_avg_sq"].to(param.device),
            }


def save_checkpoint(
    folder: Path,
    stage: str,
    model: torch.nn.Module,
    ema: dict[str, torch.Tensor] | None,
    optimizer: torch.optim.Optimizer,
    step: int,
    meta: dict[str, Any],
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    params = [p for p in model.parameters() if p.requires_grad]
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in ema.items()})
    tensors.update(optimizer_state_tensors(optimizer, params))
    save_file(tensors, str(folder / f"{stage}_checkpoint.safetensors"))
    (folder / f"{stage}_checkpoint.json").write_text(json.dumps({"step": step, **meta}, indent=1) + "\n")


def load_checkpoint(folder: Path, stage: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    weights, meta = folder / f"{stage}_checkpoint.safetensors", folder / f"{stage}_checkpoint.json"
    if not (weights.is_file() and meta.is_file()):
        return None
    return load_file(str(weights)), json.loads(meta.read_text())


def autocast(device: torch.device):
    """bf16 autocast on CUDA; plain float32 elsewhere (CPU runs are tests and must stay exact)."""
    return (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )


def decode_unclamped(vae, latents: torch.Tensor) -> torch.Tensor:
    """``AutoencoderKLWan.decode`` without its final clamp to [-1, 1], whose zero gradient would strand overshoots.

    Same frame-by-frame causal decoding with the feature cache as diffusers 0.42's ``_decode``.
    """
    vae.clear_cache()
    x = vae.post_quant_conv(latents)
    frames = []
    for index in range(latents.shape[2]):
        vae._conv_idx = [0]
        frames.append(
            vae.decoder(
                x[:, :, index : index + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx, first_chunk=index == 0
            )
        )
    vae.clear_cache()
    out = torch.cat(frames, dim=2)
    if vae.config.patch_size is not None:
        from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

        out = unpatchify(out, patch_size=vae.config.patch_size)
    return out


class CaptionBank:
    """Caption -> prompt embedding exactly as WanPipeline computes it, encoded once per caption."""

    def __init__(self, device: torch.device, max_sequence_length: int, folder: Path | None) -> None:
        self.encoder, self.tokenizer = load_minilm(device=device, dtype=torch.float32, path=folder)
        self.max_sequence_length = max_sequence_length
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, captions: list[str]) -> torch.Tensor:
        missing = sorted({c for c in captions if c not in self.cache})
        for start in range(0, len(missing), 256):
            chunk = missing[start : start + 256]
            for caption, embedding in zip(
                chunk, encode_captions(self.encoder, self.tokenizer, chunk, self.max_sequence_length)
            ):
                self.cache[caption] = embedding
        return torch.stack([self.cache[c] for c in captions])


def latent_normaliser(vae, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    channels = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean, device=device).view(1, channels, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=device).view(1, channels, 1, 1, 1)
    return mean, std


EXPORT_SHARD_BYTES = 15 * 2**20  # files that come back from a training machine must stay under 16 MiB


def export_weights(folder: Path, name: str, model: torch.nn.Module) -> list[Path]:
    """A component's float32 weights as ``name-<i>.safetensors`` shards of at most 15 MiB each, its diffusers
    config in every shard's metadata (few, small files carry back from a training machine)."""
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, value in model.state_dict().items():
        tensor = value.detach().float().cpu().contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > EXPORT_SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    paths = []
    for index, shard in enumerate(shards):
        path = folder / f"{name}-{index}.safetensors"
        save_file(shard, str(path), metadata={"config": json.dumps(dict(model.config)), "shards": str(len(shards))})
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------------------------------
# VAE


def vae_crop(args: argparse.Namespace, sizes: ReferenceSizes) -> tuple[int, int]:
    """Frames and side of the VAE's training crops: by default every frame of a clip, so the causal feature cache
    is trained over the whole length the pipeline encodes and decodes."""
    frames = sizes.num_frames if args.vae_frames is None else min(args.vae_frames, sizes.num_frames)
    if (frames - 1) % 4:
        raise ValueError("--vae-frames must be 4k + 1")
    return frames, min(args.vae_tile, sizes.height, sizes.width)


def object_crop_corners(coverage: torch.Tensor, tile: int) -> list[tuple[int, int]]:
    """Top-left corners of ``tile``-sized crops centred on each clip's object, averaged over the frames.

    ``coverage`` is (B, F, H, W); a clip whose object is out of view gets the centre crop.
    """
    _, _, height, width = coverage.shape
    mass = coverage.sum(dim=1)  # (B, H, W)
    total = mass.sum(dim=(1, 2)).clamp_min(1e-6)
    ys = torch.arange(height, device=coverage.device, dtype=torch.float32)
    xs = torch.arange(width, device=coverage.device, dtype=torch.float32)
    centre_y = (mass.sum(dim=2) * ys).sum(dim=1) / total
    centre_x = (mass.sum(dim=1) * xs).sum(dim=1) / total
    empty = mass.sum(dim=(1, 2)) <= 1e-6
    centre_y = torch.where(empty, torch.full_like(centre_y, height / 2), centre_y)
    centre_x = torch.where(empty, torch.full_like(centre_x, width / 2), centre_x)
    y0 = (centre_y - tile / 2).round().clamp(0, height - tile).long().tolist()
    x0 = (centre_x - tile / 2).round().clamp(0, width - tile).long().tolist()
    return list(zip(y0, x0))


def train_vae(args: argparse.Namespace, sizes: ReferenceSizes, log: RunLog, device: torch.device, deadline: float):
    torch.manual_seed(args.seed)
    vae = build_vae(sizes)
    initial_statistics = None
    if args.init_from is not None:
        from diffusers import AutoencoderKLWan

        initial = AutoencoderKLWan.from_pretrained(args.init_from / "vae")
        vae.load_state_dict(initial.state_dict())
        initial_statistics = {"mean": list(initial.config.latents_mean), "std": list(initial.config.latents_std)}
        print(f"vae: starting from {args.init_from / 'vae'}", flush=True)
    if args.vae_train == "decoder":
        if initial_statistics is None:
            raise ValueError("--vae-train decoder fine-tunes the decoder of an --init-from VAE")
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    vae = vae.to(device).train()
    params = [p for p in vae.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.vae_lr, betas=(0.9, 0.99), weight_decay=0.0)
    record = log.stage("vae")
    start, planner = 0, StepPlanner(args.vae_steps, args.vae_seconds)
    checkpoint = load_checkpoint(args.checkpoint_dir, "vae") if args.resume else None
    if checkpoint is not None:
        tensors, meta = checkpoint
        vae.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        start = meta["step"] + 1
        restore_optimizer_state(optimizer, params, tensors, start)
        if planner.planned is None:  # a time budget was planned once; keep that plan
            planner.planned = meta["planned_steps"]
        record["curve"] = [row for row in record["curve"] if row["step"] < start]
        print(f"vae: resumed at step {start} of {planner.planned}", flush=True)
    crop_frames, tile = vae_crop(args, sizes)
    window: dict[str, float] = {}
    began, step, done = time.perf_counter(), start, 0
    while True:
        planned = planner.resolve(step)
        if (planned is not None and step >= planned) or planner.out_of_time() or time.perf_counter() > deadline:
            break
        seed = step_seed(args.seed, "vae", step)
        scenes = data.sample_scenes(args.vae_batch, seed)
        clips, coverage = data.render_clips(
            scenes,
            seed=seed,
            num_frames=sizes.num_frames,
            height=sizes.height,
            width=sizes.width,
            device=device,
            return_coverage=True,
        )
        crop = torch.Generator().manual_seed(seed + 1)
        t0 = int(torch.randint(sizes.num_frames - crop_frames + 1, (1,), generator=crop))
        coverage = coverage[:, t0 : t0 + crop_frames]
        if args.vae_crop_mode == "object":
            corners = object_crop_corners(coverage, tile)
        else:
            y0 = int(torch.randint(sizes.height - tile + 1, (1,), generator=crop))
            x0 = int(torch.randint(sizes.width - tile + 1, (1,), generator=crop))
            corners = [(y0, x0)] * len(scenes)
        target = torch.stack(
            [clips[b, :, t0 : t0 + crop_frames, y : y + tile, x : x + tile] for b, (y, x) in enumerate(corners)]
        )
        weight = 1.0 + args.vae_object_weight * torch.stack(
            [coverage[b, :, y : y + tile, x : x + tile] for b, (y, x) in enumerate(corners)]
        ).unsqueeze(1)
        noise_generator = torch.Generator(device=device).manual_seed(seed + 2)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(args.vae_lr, step, warmup=100, planned=planned)
        with autocast(device):
            moments = vae.encode(target).latent_dist
            mean, logvar = moments.mean.float(), moments.logvar.float()
            latents = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=noise_generator, device=device)
            recon = decode_unclamped(vae, latents).float()
        l1 = ((recon - target).abs() * weight).mean() / weight.mean()
        # Edges carry the shapes: an L1 term on finite differences keeps them sharp.
        edges = sum((recon.diff(dim=d) - target.diff(dim=d)).abs().mean() for d in (2, 3, 4))
        kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).mean()
        loss = l1 + 0.5 * edges + args.vae_kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        for key, value in (("loss", loss), ("l1", l1), ("edges", edges), ("kl", kl), ("grad_norm", grad_norm)):
            window[key] = window.get(key, 0.0) + float(value.detach())
        window["n"] = window.get("n", 0) + 1
        done += 1
        planner.after_step(done)
        if (step + 1) % args.log_every == 0 or (planned is not None and step + 1 == planned):
            row = {
                "step": step,
                **{k: round(v / window["n"], 6) for k, v in window.items() if k != "n"},
                "lr": optimizer.param_groups[0]["lr"],
                "seconds": round(time.perf_counter() - began, 2),
            }
            record["curve"].append(row)
            window = {}
            print(f"vae {row}", flush=True)
        if args.checkpoint_every and (step + 1) % args.checkpoint_every == 0:
            save_checkpoint(args.checkpoint_dir, "vae", vae, None, optimizer, step, {"planned_steps": planner.planned})
        step += 1
    record.update(
        {
            "steps_done": step,
            "planned_steps": planner.planned,
            "seconds": round(time.perf_counter() - began, 1),
            "seconds_per_step": planner.seconds_per_step,
            "stopped_by_deadline": planner.planned is None or step < planner.planned,
            "batch": args.vae_batch,
            "crop": [crop_frames, tile, tile],
            "trained_parts": args.vae_train,
            "object_weight": args.vae_object_weight,
            "crop_mode": args.vae_crop_mode,
            "lr": args.vae_lr,
            "kl_weight": args.vae_kl_weight,
        }
    )
    save_checkpoint(args.checkpoint_dir, "vae", vae, None, optimizer, step - 1, {"planned_steps": planner.planned})
    vae.eval()
    stats = measure_latent_statistics(vae, sizes, args, device)
    if args.vae_train == "decoder":
        # Same encoder, same latent space: keep the statistics the transformer was trained with, bit for bit.
        stats["measured"] = {"mean": stats["mean"], "std": stats["std"]}
        stats["mean"], stats["std"] = initial_statistics["mean"], initial_statistics["std"]
    vae.register_to_config(latents_mean=stats["mean"], latents_std=stats["std"])
    record["latent_statistics"] = stats
    log.save()
    return vae


def reconstruction_l1_by_frame(recon: torch.Tensor, clips: torch.Tensor) -> list[float]:
    """Mean absolute error of each frame of (B, 3, F, H, W) reconstructions, rounded, first frame first."""
    return [round(v, 4) for v in (recon.float() - clips.float()).abs().mean(dim=(0, 1, 3, 4)).tolist()]


@torch.no_grad()
def measure_latent_statistics(vae, sizes: ReferenceSizes, args: argparse.Namespace, device: torch.device) -> dict:
    """Per-channel mean and std of posterior means over full-size training clips (WanPipeline de-normalises with
    them)."""
    total = torch.zeros(sizes.latent_channels, dtype=torch.float64)
    squares = torch.zeros_like(total)
    count, recon_error, by_frame, batch = 0, 0.0, [], min(args.vae_batch, 8)
    batches = max(1, args.latent_stat_clips // batch)
    for index in range(batches):
        seed = step_seed(args.seed, "vae", 10_000_000 + index)
        clips = data.render_clips(
            data.sample_scenes(batch, seed),
            seed=seed,
            num_frames=sizes.num_frames,
            height=sizes.height,
            width=sizes.width,
            device=device,
        )
        with autocast(device):
            latents = vae.encode(clips).latent_dist.mode().float()
        if index == 0:  # full-size reconstruction error, float32 as at inference
            recon = vae.decode(latents.float()).sample
            recon_error = float((recon.float() - clips).abs().mean())
            by_frame = reconstruction_l1_by_frame(recon.float(), clips)
        flat = latents.transpose(0, 1).reshape(sizes.latent_channels, -1).double().cpu()
        total += flat.sum(1)
        squares += flat.square().sum(1)
        count += flat.shape[1]
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(1e-8).sqrt()
    return {
        "mean": [round(v, 6) for v in mean.tolist()],
        "std": [round(v, 6) for v in std.tolist()],
        "clips": batches * batch,
        "full_size_reconstruction_l1": recon_error,
        # A VAE trained on shorter crops than the clip drifts late in the clip; the mean above hides that.
        "full_size_reconstruction_l1_by_frame": by_frame,
    }


# ----------------------------------------------------------------------------------------------------------------
# transformer


class LatentPool:
    """Normalised latents of ``clips`` rendered training clips, encoded once, with their caption embeddings.

    Encoding full-size clips costs more than a transformer step (on the H100, 10 ms per clip against 100 ms per
    32-clip step), so the transformer samples its batches from this pool instead of encoding fresh clips.
    """

    def __init__(
        self,
        vae,
        bank: CaptionBank,
        sizes: ReferenceSizes,
        clips: int,
        batch: int,
        seed: int,
        device: torch.device,
        cache: Path | None = None,
    ) -> None:
        storage = torch.bfloat16 if device.type == "cuda" else torch.float32
        meta = {
            "clips": str(clips),
            "seed": str(seed),
            "batch": str(batch),  # the clips drawn depend on it
            "latent_shape": json.dumps(list(sizes.latent_shape)),
        }
        if cache is not None and cache.is_file():
            from safetensors import safe_open

            with safe_open(str(cache), "pt") as handle:
                stored = handle.metadata()
                if {k: stored.get(k) for k in meta} != meta:
                    raise ValueError(f"{cache} holds another pool ({stored}); expected {meta}: delete it or pass another")
                self.latents = handle.get_tensor("latents").to(device=device, dtype=storage)
                if "coverage" not in handle.keys():
                    raise ValueError(f"{cache} was written before pools kept the object coverage: delete it")
                self.coverage = handle.get_tensor("coverage").to(device=device, dtype=storage)
            self._index_captions(bank, json.loads(stored["captions"]), device)
            return
        mean, std = latent_normaliser(vae, device)
        self.latents = torch.empty((clips, *sizes.latent_shape), dtype=storage, device=device)
        latent_frames, latent_height, latent_width = sizes.latent_shape[1:]
        self.coverage = torch.empty((clips, latent_frames, latent_height, latent_width), dtype=storage, device=device)
        captions: list[str] = []
        for start in range(0, clips, batch):
            count = min(batch, clips - start)
            batch_seed = step_seed(seed, "transformer", 10_000_000 + start)
            scenes = data.sample_scenes(count, batch_seed)
            with torch.no_grad():
                rendered, coverage = data.render_clips(
                    scenes,
                    seed=batch_seed,
                    num_frames=sizes.num_frames,
                    height=sizes.height,
                    width=sizes.width,
                    device=device,
                    return_coverage=True,
                )
                with autocast(device):
                    latents = vae.encode(rendered).latent_dist.mode().float()
            self.latents[start : start + count] = ((latents - mean) / std).to(storage)
            self.coverage[start : start + count] = latent_coverage(coverage, self.coverage.shape[1:]).to(storage)
            captions += [scene.caption for scene in scenes]
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            partial = cache.with_suffix(".partial")
            save_file(
                {"latents": self.latents.cpu(), "coverage": self.coverage.cpu()},
                str(partial),
                metadata={**meta, "captions": json.dumps(captions)},
            )
            partial.replace(cache)  # whole file or none: another process may be waiting for it
        self._index_captions(bank, captions, device)

    def _index_captions(self, bank: CaptionBank, captions: list[str], device: torch.device) -> None:
        unique = sorted(set(captions))
        self.embeddings = bank(unique)  # (unique captions, max_sequence_length, 384)
        index = {caption: i for i, caption in enumerate(unique)}
        self.caption_index = torch.tensor([index[c] for c in captions], device=device)

    def __len__(self) -> int:
        return self.latents.shape[0]

    def batch(self, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Latents (size, C, F, H, W), caption embeddings and the object coverage (size, F, H, W) of random clips."""
        picks = torch.randint(len(self), (size,), generator=torch.Generator().manual_seed(seed))
        picks = picks.to(self.latents.device)
        return self.latents[picks].float(), self.embeddings[self.caption_index[picks]], self.coverage[picks].float()


def latent_coverage(coverage: torch.Tensor, latent_grid: tuple[int, int, int]) -> torch.Tensor:
    """Pixel coverage (B, frames, H, W) -> the fraction of each latent cell the object covers (B, F', H', W').

    The causal VAE encodes the first frame alone and every later group of frames together, so latent frame t > 0
    spans `stride` pixel frames; a cell counts the most the object covers it in any of them (a moving object
    crosses cells within a group). Spatially, the mean over the cell's pixels.
    """
    frames, height, width = coverage.shape[1:]
    latent_frames, latent_height, latent_width = latent_grid
    stride = (frames - 1) // max(latent_frames - 1, 1)
    if 1 + stride * (latent_frames - 1) != frames or height % latent_height or width % latent_width:
        raise ValueError(f"coverage {tuple(coverage.shape)} does not map onto the latent grid {latent_grid}")
    spatial = F.avg_pool2d(coverage.float(), (height // latent_height, width // latent_width))  # over (H, W)
    first = spatial[:, :1]
    rest = spatial[:, 1:].reshape(spatial.shape[0], latent_frames - 1, stride, latent_height, latent_width)
    return torch.cat([first, rest.amax(dim=2)], dim=1)


def train_transformer(
    args: argparse.Namespace, sizes: ReferenceSizes, log: RunLog, device: torch.device, deadline: float, vae=None
):
    from diffusers import AutoencoderKLWan

    if vae is None:
        vae = AutoencoderKLWan.from_pretrained(args.assets_dir / "vae")
    vae = vae.to(device).eval().requires_grad_(False)
    bank = CaptionBank(device, sizes.max_sequence_length, args.text_encoder_dir)
    empty = bank([""])[0]  # WanPipeline's default negative prompt, the unconditional branch of CFG
    mix_sizes = None if args.mix_clip_size is None else clip_sizes(sizes, args.mix_clip_size)
    mix_batch = args.mix_batch or args.transformer_batch
    began = time.perf_counter()
    pool_clips = args.pool_clips or {"shipped": 6144, "mini": 2048, "smoke": 8}[args.config]
    pool = LatentPool(vae, bank, sizes, pool_clips, args.transformer_batch, args.seed, device, args.pool_cache)
    mix_pool = None
    if mix_sizes is not None:  # another seed: the second pool holds other scenes
        mix_pool = LatentPool(vae, bank, mix_sizes, args.mix_pool_clips or pool_clips, mix_batch, args.seed + 1,
                              device, args.mix_pool_cache)
    if device.type == "cuda":
        torch.cuda.synchronize()
    pool_seconds = time.perf_counter() - began
    print(
        f"transformer: encoded a pool of {len(pool)} clips ({pool.embeddings.shape[0]} captions) "
        + ("" if mix_pool is None else f"and {len(mix_pool)} at {args.mix_clip_size} (every {args.mix_every}th step) ")
        + f"in {pool_seconds:.0f} s",
        flush=True,
    )

    torch.manual_seed(args.seed + 1)
    transformer = build_transformer(sizes)
    if args.init_from is not None:
        from diffusers import WanTransformer3DModel

        transformer.load_state_dict(WanTransformer3DModel.from_pretrained(args.init_from / "transformer").state_dict())
        print(f"transformer: starting from {args.init_from / 'transformer'}", flush=True)
    transformer = transformer.to(device).train()
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.transformer_lr, betas=(0.9, 0.99), weight_decay=0.01)
    ema = {k: v.detach().clone().float() for k, v in transformer.state_dict().items()}
    record = log.stage("transformer")
    # The time budget covers encoding the pool too.
    start, planner = 0, StepPlanner(args.transformer_steps, args.transformer_seconds, started=began)
    checkpoint = load_checkpoint(args.checkpoint_dir, "transformer") if args.resume else None
    if checkpoint is not None:
        tensors, meta = checkpoint
        transformer.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        ema = {k[4:]: v.to(device) for k, v in tensors.items() if k.startswith("ema.")}
        start = meta["step"] + 1
        restore_optimizer_state(optimizer, params, tensors, start)
        if planner.planned is None:  # a time budget was planned once; keep that plan
            planner.planned = meta["planned_steps"]
        record["curve"] = [row for row in record["curve"] if row["step"] < start]
        print(f"transformer: resumed at step {start} of {planner.planned}", flush=True)

    ema_keys = sorted(ema)
    train_shift = FLOW_SHIFT if args.train_flow_shift is None else args.train_flow_shift
    forward = transformer
    if args.compile and device.type == "cuda":
        # Same parameters; state_dict stays on `transformer`. Static shapes: a mixed second clip size gets its
        # own graph instead of turning every graph dynamic.
        forward = torch.compile(transformer, dynamic=False)
    # Sums stay on the device between log rows: a float() per step would synchronise the host every step.
    window: dict[str, torch.Tensor] = {}
    window_steps = 0
    began, step, done = time.perf_counter(), start, 0
    while True:
        planned = planner.resolve(step)
        if (planned is not None and step >= planned) or planner.out_of_time() or time.perf_counter() > deadline:
            break
        if mix_pool is not None and step % args.mix_every == args.mix_every - 1:
            x0, embeddings, coverage = mix_pool.batch(mix_batch, step_seed(args.seed, "transformer", step))
        else:
            x0, embeddings, coverage = pool.batch(args.transformer_batch, step_seed(args.seed, "transformer", step))
        generator = torch.Generator(device=device).manual_seed(step_seed(args.seed, "transformer", step) + 1)
        batch = x0.shape[0]
        noise = torch.randn(x0.shape, generator=generator, device=device)
        uniform = torch.rand(batch, generator=generator, device=device)
        sigma = train_shift * uniform / (1 + (train_shift - 1) * uniform)  # shift 3: the sampler's sigma density
        dropped = torch.rand(batch, generator=generator, device=device) < args.caption_dropout
        context = torch.where(dropped.view(-1, 1, 1), empty.expand_as(embeddings), embeddings)
        s = sigma.view(-1, 1, 1, 1, 1)
        noisy = (1 - s) * x0 + s * noise
        target = noise - x0
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(args.transformer_lr, step, warmup=200, planned=planned)
        inputs = dict(
            hidden_states=noisy, timestep=sigma * NUM_TRAIN_TIMESTEPS, encoder_hidden_states=context, return_dict=False
        )
        with autocast(device):
            if done == 0 and forward is not transformer:
                try:  # compilation happens here; a failure costs speed, not the run
                    prediction = forward(**inputs)[0]
                except Exception as error:  # noqa: BLE001
                    print(f"transformer: torch.compile failed ({type(error).__name__}: {error}); eager", flush=True)
                    forward = transformer
                    prediction = forward(**inputs)[0]
            else:
                prediction = forward(**inputs)[0]
        if args.transformer_object_weight:
            # Weighted mean of the squared error, normalised by the weights so the loss keeps its scale.
            weight = (1.0 + args.transformer_object_weight * coverage).unsqueeze(1)  # broadcast over channels
            loss = ((prediction.float() - target).square() * weight).mean() / weight.mean()
        else:
            loss = F.mse_loss(prediction.float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            current = transformer.state_dict()
            torch._foreach_lerp_([ema[k] for k in ema_keys], [current[k].float() for k in ema_keys], 1 - decay)
        for key, value in (("loss", loss.detach()), ("grad_norm", grad_norm.detach())):
            window[key] = window[key] + value if key in window else value.clone()
        window_steps += 1
        done += 1
        if device.type == "cuda" and done in (planner.skip, planner.skip + planner.measure):
            torch.cuda.synchronize()  # the throughput the plan is made from must be the device's, not the queue's
        planner.after_step(done)
        if (step + 1) % args.log_every == 0 or (planned is not None and step + 1 == planned):
            row = {
                "step": step,
                **{k: round(float(v) / window_steps, 6) for k, v in window.items()},
                "lr": optimizer.param_groups[0]["lr"],
                "seconds": round(time.perf_counter() - began, 2),
            }
            record["curve"].append(row)
            window, window_steps = {}, 0
            print(f"transformer {row}", flush=True)
        if args.checkpoint_every and (step + 1) % args.checkpoint_every == 0:
            save_checkpoint(
                args.checkpoint_dir,
                "transformer",
                transformer,
                ema,
                optimizer,
                step,
                {"planned_steps": planner.planned},
            )
        step += 1
    record.update(
        {
            "steps_done": step,
            "planned_steps": planner.planned,
            "seconds": round(time.perf_counter() - began, 1),
            "seconds_per_step": planner.seconds_per_step,
            "pool_clips": len(pool),
            "pool_captions": int(pool.embeddings.shape[0]),
            "pool_seconds": round(pool_seconds, 1),
            "stopped_by_deadline": planner.planned is None or step < planner.planned,
            "batch": args.transformer_batch,
            "lr": args.transformer_lr,
            "caption_dropout": args.caption_dropout,
            "object_weight": args.transformer_object_weight,
            "mix": None if mix_pool is None else {
                "clip_size": args.mix_clip_size, "every": args.mix_every, "batch": mix_batch, "clips": len(mix_pool)},
            "ema_decay": args.ema_decay,
            "flow_shift": FLOW_SHIFT,
            "train_flow_shift": train_shift,
            "compiled": forward is not transformer,
            "captions_encoded": len(bank.cache),
        }
    )
    save_checkpoint(
        args.checkpoint_dir, "transformer", transformer, ema, optimizer, step - 1, {"planned_steps": planner.planned}
    )
    log.save()
    transformer.load_state_dict({k: v.to(transformer.dtype) for k, v in ema.items()})
    return transformer.eval(), vae


# ----------------------------------------------------------------------------------------------------------------
# acceptance


def run_acceptance(args: argparse.Namespace, sizes: ReferenceSizes, device: torch.device) -> dict[str, Any]:
    import numpy as np

    from vidaccel.reference.evaluation import AttentionLocalityProbe, classify_object_colour, clips_to_videos
    from vidaccel.reference.pipeline import reference_pipeline

    pipe = reference_pipeline(device=device, path=args.assets_dir)
    pipe.set_progress_bar_config(disable=True)
    call = dict(
        GENERATION_DEFAULTS,
        num_inference_steps=args.acceptance_steps,
        height=sizes.height,
        width=sizes.width,
        num_frames=sizes.num_frames,
        max_sequence_length=sizes.max_sequence_length,
    )
    scenes = data.evaluation_scenes()[: args.acceptance_videos]
    result: dict[str, Any] = {"device": str(device), "call": call, "captions": len(scenes)}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name()

    # The classifier itself, on ground-truth renders of the same captions and on their VAE round trip.
    seed = step_seed(args.seed, "acceptance", 0)
    truth = data.render_clips(
        scenes, seed=seed, num_frames=sizes.num_frames, height=sizes.height, width=sizes.width, device=device
    )
    with torch.no_grad():
        roundtrip = torch.cat(
            [
                pipe.vae.decode(pipe.vae.encode(clip[None]).latent_dist.mode()).sample
                for clip in truth[: args.roundtrip_clips]
            ]
        )
    result["vae_roundtrip_l1"] = float((roundtrip - truth[: len(roundtrip)]).abs().mean())
    result["vae_roundtrip_l1_by_frame"] = reconstruction_l1_by_frame(roundtrip, truth[: len(roundtrip)])
    for name, clips in (("classifier_on_renders", truth), ("classifier_on_vae_roundtrip", roundtrip)):
        videos = clips_to_videos(clips)
        hits = sum(classify_object_colour(video) == scene.colour for video, scene in zip(videos, scenes))
        result[name] = hits / len(videos)

    rows, strips = [], []
    probe_summary = None
    began = time.perf_counter()
    for index, scene in enumerate(scenes):
        if args.acceptance_seconds is not None and time.perf_counter() - began > args.acceptance_seconds:
            print(f"acceptance: time budget spent after {index} videos", flush=True)
            break
        generator = torch.Generator(device="cpu").manual_seed(1000 + index)
        if index < args.locality_videos:
            with AttentionLocalityProbe(pipe.transformer, query_stride=args.locality_query_stride) as probe:
                video = pipe(scene.caption, generator=generator, output_type="pt", **call).frames[0]
            summary = probe.summary()
            probe_summary = summary if probe_summary is None else _merge_locality(probe_summary, summary)
        else:
            video = pipe(scene.caption, generator=generator, output_type="pt", **call).frames[0]
        predicted = classify_object_colour(video)
        rows.append(
            {
                "caption": scene.caption,
                "expected": scene.colour,
                "predicted": predicted,
                "match": predicted == scene.colour,
            }
        )
        print(f"acceptance {index}: {scene.caption!r} -> {predicted}", flush=True)
        if len(strips) < 8:
            picks = [0, sizes.num_frames // 2, sizes.num_frames - 1]
            strips.append(np.concatenate([video[f].permute(1, 2, 0).float().cpu().numpy() for f in picks], axis=1))
    result["generation_seconds_total"] = round(time.perf_counter() - began, 1)
    result["videos_generated"] = len(rows)
    result["colour_match_rate"] = sum(r["match"] for r in rows) / len(rows)
    result["colour_threshold"] = 0.7
    result["colour_passed"] = result["colour_match_rate"] >= 0.7
    result["locality_factor_required"] = LOCALITY_FACTOR
    result["videos"] = rows
    if probe_summary is not None:
        probe_summary["videos"] = min(args.locality_videos, len(scenes))
        probe_summary["query_stride"] = args.locality_query_stride
        result["attention_locality"] = probe_summary
    if args.samples_out is not None and strips:
        from PIL import Image

        args.samples_out.parent.mkdir(parents=True, exist_ok=True)
        grid = (np.clip(np.concatenate(strips, axis=0), 0, 1) * 255).astype(np.uint8)
        Image.fromarray(grid).save(args.samples_out)
    return result


def _merge_locality(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """Average two locality summaries of the same model (equal weights: same grid and query count)."""
    merged = dict(first)
    for key in ("mean_mass_within_1_frame", "mean_mass_in_window"):
        merged[key] = (first[key] + second[key]) / 2
    merged["layers"] = [
        {
            **a,
            "mass_within_1_frame": [(x + y) / 2 for x, y in zip(a["mass_within_1_frame"], b["mass_within_1_frame"])],
            "mass_in_window": [(x + y) / 2 for x, y in zip(a["mass_in_window"], b["mass_in_window"])],
        }
        for a, b in zip(first["layers"], second["layers"])
    ]
    return merged


def _cpu_name() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        return None
    return None


def time_generation(pipe, sizes: ReferenceSizes, device: torch.device) -> dict[str, Any]:
    """Wall time of one default generation (CFG, default step count), split into transformer and VAE decode."""
    call = dict(
        GENERATION_DEFAULTS,
        height=sizes.height,
        width=sizes.width,
        num_frames=sizes.num_frames,
        max_sequence_length=sizes.max_sequence_length,
    )
    caption = data.evaluation_scenes()[0].caption
    generator = torch.Generator(device="cpu").manual_seed(0)
    load_before = round(os.getloadavg()[0], 2)
    pipe(caption, generator=generator, output_type="latent", **dict(call, num_inference_steps=2))  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    latents = pipe(caption, generator=generator, output_type="latent", **call).frames
    if device.type == "cuda":
        torch.cuda.synchronize()
    denoise = time.perf_counter() - began
    began = time.perf_counter()
    with torch.no_grad():
        mean = torch.tensor(pipe.vae.config.latents_mean).view(1, -1, 1, 1, 1).to(latents)
        std = torch.tensor(pipe.vae.config.latents_std).view(1, -1, 1, 1, 1).to(latents)
        pipe.vae.decode(latents * std + mean)
    if device.type == "cuda":
        torch.cuda.synchronize()
    decode = time.perf_counter() - began
    return {
        "steps": call["num_inference_steps"],
        "guidance_scale": call["guidance_scale"],
        "threads": torch.get_num_threads(),
        "load_average_1min_before": load_before,
        "load_average_1min_after": round(os.getloadavg()[0], 2),
        "cpu": _cpu_name(),
        "denoise_seconds": round(denoise, 2),
        "vae_decode_seconds": round(decode, 2),
        "total_seconds": round(denoise + decode, 2),
    }


LOCALITY_FACTOR = 1.5  # acceptance: attention mass within one frame at least this multiple of a uniform map's


def _repo_relative(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def _stage_summaries(log: dict[str, Any]) -> dict[str, Any]:
    return {
        name: {key: stage.get(key) for key in ("steps_done", "seconds", "batch", "lr")}
        | {"final_loss": stage["curve"][-1]["loss"] if stage.get("curve") else None}
        for name, stage in log["stages"].items()
    }


def write_model_card(
    assets_dir: Path, log_dir: Path, acceptance_path: Path, training_logs: list[Path] | None = None
) -> dict[str, Any]:
    """``model_card.json`` beside the weights: how they were trained and whether they passed acceptance.

    ``reference_pipeline`` warns when the card says the weights did not pass, so nobody mistakes numbers measured
    on them for meaningful quality numbers. ``training_logs`` names the logs of the runs that produced the
    shipped weights when they are not ``<log_dir>/training_log.json`` (e.g. a VAE run, a decoder fine-tune and a
    transformer run kept under ``runs/<name>/``); each is summarised under its file name.
    """
    explicit = bool(training_logs)
    logs = training_logs or [log_dir / "training_log.json"]
    card: dict[str, Any] = {
        "acceptance": _repo_relative(acceptance_path),
        "training_log": [_repo_relative(p) for p in logs],
    }
    invocations = []
    for log_path in logs:
        if not log_path.is_file():
            if explicit:
                raise FileNotFoundError(f"training log {log_path} does not exist")
            continue
        log = json.loads(log_path.read_text())
        summary = _stage_summaries(log)
        if explicit:
            card.setdefault("training", {})[log_path.stem] = summary
        else:
            card["training"] = summary
        invocations += log.get("invocations", [])  # training runs only
    if invocations:
        card["trained_on"] = sorted({i.get("gpu") or i["device"] for i in invocations})
    # Shipped weights are often warm-started over several runs: summarise each run kept under runs/<name>/.
    runs = {}
    for run_log in sorted((log_dir / "runs").glob("*/training_log.json")):
        run_stages = json.loads(run_log.read_text()).get("stages", {})
        runs[run_log.parent.name] = {
            name: {key: stage.get(key) for key in ("steps_done", "seconds", "batch", "lr")} for name, stage in run_stages.items()
        }
    if runs:
        card["runs"] = runs
    if acceptance_path.is_file():
        result = json.loads(acceptance_path.read_text())
        locality = result.get("attention_locality", {})
        ratio = (locality["mean_mass_within_1_frame"] / locality["uniform_within_1_frame"]) if locality else None
        card["colour_match_rate"] = result["colour_match_rate"]
        card["colour_videos"] = result.get("videos_generated", len(result.get("videos", [])))
        card["locality_ratio"] = ratio
        card["acceptance_passed"] = bool(
            result["colour_match_rate"] >= 0.7 and ratio is not None and ratio >= LOCALITY_FACTOR
        )
    else:
        card["acceptance_passed"] = False
    (assets_dir / "model_card.json").write_text(json.dumps(card, indent=1) + "\n")
    return card


# ----------------------------------------------------------------------------------------------------------------
# moving weights between machines


def install_from_export(import_dir: Path, assets_dir: Path) -> None:
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    from safetensors import safe_open

    components = {}
    for name, cls in (("vae", AutoencoderKLWan), ("transformer", WanTransformer3DModel)):
        paths = sorted(import_dir.glob(f"{name}-*.safetensors"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))
        if not paths:
            continue
        with safe_open(str(paths[0]), "pt") as handle:
            metadata = handle.metadata()
        if int(metadata["shards"]) != len(paths):
            raise FileNotFoundError(f"{name}: {metadata['shards']} shards expected in {import_dir}, found {len(paths)}")
        model = cls.from_config(json.loads(metadata["config"]))
        state = {}
        for path in paths:
            state.update(load_file(str(path)))
        model.load_state_dict(state)
        components[name] = model
    if not components:
        raise FileNotFoundError(f"no vae-*.safetensors or transformer-*.safetensors in {import_dir}")
    write_reference_assets(assets_dir, **components)
    print(f"installed {sorted(components)} into {assets_dir}")


def export_text_encoder(target: Path) -> None:
    """fp16 copy of the MiniLM folder (half the bytes); loaders upcast it to float32."""
    source = minilm_model_dir()
    target.mkdir(parents=True, exist_ok=True)
    tensors = load_file(str(source / "model.safetensors"))
    save_file(
        {k: (v.half() if v.is_floating_point() else v) for k, v in tensors.items()},
        str(target / "model.safetensors"),
        metadata={"format": "pt"},
    )
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy2(source / name, target / name)
    print(f"wrote {target}")


# ----------------------------------------------------------------------------------------------------------------


def clip_sizes(sizes: ReferenceSizes, text: str) -> ReferenceSizes:
    """The config's sizes with the clip size "FRAMES,HEIGHT,WIDTH" (the architecture is unchanged)."""
    try:
        frames, height, width = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"a clip size is FRAMES,HEIGHT,WIDTH, e.g. 33,256,256; got {text!r}") from None
    return dataclasses.replace(sizes, num_frames=frames, height=height, width=width)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    deadline = started + (args.deadline_seconds if args.deadline_seconds is not None else float("inf"))
    sizes = CONFIGS[args.config]
    if args.clip_size is not None:
        sizes = clip_sizes(sizes, args.clip_size)
    if args.mix_clip_size is not None:  # refused before anything loads or trains
        clip_sizes(sizes, args.mix_clip_size)
        if args.mix_every < 2:
            raise ValueError(f"--mix-every must be >= 2 (every N-th step uses the second pool), got {args.mix_every}")
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    if args.stage == "export-text-encoder":
        export_text_encoder(args.export_dir or REPO / ".minilm_fp16")
        return
    if args.stage == "install":
        install_from_export(args.import_dir, args.assets_dir)
        return
    if args.stage == "card":
        print(
            json.dumps(
                write_model_card(
                    args.assets_dir,
                    args.log_dir,
                    args.acceptance_out or args.log_dir / "acceptance.json",
                    args.card_training_logs,
                ),
                indent=1,
            )
        )
        return
    if args.stage == "timing":
        from vidaccel.reference.pipeline import reference_pipeline

        pipe = reference_pipeline(device=device, path=args.assets_dir)
        pipe.set_progress_bar_config(disable=True)
        timing = time_generation(pipe, sizes, device)
        out = args.acceptance_out or args.log_dir / "acceptance.json"
        result = json.loads(out.read_text()) if out.is_file() else {}
        # Every measurement is kept: on a shared machine the load beside it matters as much as the number.
        result.setdefault("timings", []).append({"device": str(device), **timing})
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(timing, indent=1))
        return
    if args.stage == "acceptance":
        result = run_acceptance(args, sizes, device)
        out = args.acceptance_out or args.log_dir / "acceptance.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        write_model_card(args.assets_dir, args.log_dir, out)
        brief = {k: v for k, v in result.items() if k not in ("videos", "attention_locality")}
        if "attention_locality" in result:
            brief["attention_locality"] = {k: v for k, v in result["attention_locality"].items() if k != "layers"}
        print(json.dumps(brief, indent=1))
        return

    log = RunLog(args.log_dir, args, sizes)
    vae = None
    if args.stage in ("all", "vae"):
        vae = train_vae(args, sizes, log, device, deadline)
        write_reference_assets(args.assets_dir, vae=vae)
        if args.export_dir is not None:
            export_weights(args.export_dir, "vae", vae)
        print(f"vae done at {time.perf_counter() - started:.0f} s", flush=True)
    if args.stage in ("all", "transformer"):
        transformer, vae = train_transformer(args, sizes, log, device, deadline, vae)
        write_reference_assets(args.assets_dir, transformer=transformer)
        if args.export_dir is not None:
            export_weights(args.export_dir, "transformer", transformer)
        print(f"transformer done at {time.perf_counter() - started:.0f} s", flush=True)
    log.content["total_seconds"] = round(time.perf_counter() - started, 1)
    log.save()
    # New weights have not been through acceptance yet.
    write_model_card(args.assets_dir, args.log_dir, args.assets_dir / "no_acceptance_yet.json")


if __name__ == "__main__":
    main()
