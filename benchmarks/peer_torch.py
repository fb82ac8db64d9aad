r"""The PyTorch peer: diffusers' UNet2DModel with the paper's architecture, timed like ours.

Measures train-step images/s (L_simple, Adam, bf16 autocast, torch.compile, channels_last)
and sampling image-steps/s (one network evaluation per image and step, no grad), and prints
one JSON line per result in the same format as benchmarks/bench_train.py and bench_sample.py,
so `python -m benchmarks.compare` can put the two side by side.

Needs torch and diffusers (not dependencies of ddpm-jax):

  pip install torch diffusers
  python benchmarks/peer_torch.py --preset cifar10 --batch_sizes 128 --precision bf16 \
      --out benchmarks/results/h100.jsonl

It imports nothing from ddpm_jax, so it runs in an environment without JAX.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import time

import torch
from diffusers import UNet2DModel

# The paper's models (PAPER_FACTS "U-Net"); "tiny" is for smoke tests on CPU.
PRESETS = {
    "cifar10": dict(image_size=32, ch=128, ch_mult=(1, 2, 2, 2), attn=(16,), dropout=0.1),
    "celebahq256": dict(image_size=256, ch=128, ch_mult=(1, 1, 2, 2, 4, 4), attn=(16,),
                        dropout=0.0),
    "tiny": dict(image_size=32, ch=32, ch_mult=(1, 2), attn=(16,), dropout=0.0),
}


def build(preset: dict) -> UNet2DModel:
    """A UNet2DModel laid out as the DDPM U-Net (one attention head, eps 1e-6, conv resampling)."""
    down, res = [], preset["image_size"]
    for _ in preset["ch_mult"]:
        down.append("AttnDownBlock2D" if res in preset["attn"] else "DownBlock2D")
        res //= 2
    up = [b.replace("Down", "Up") for b in reversed(down)]
    return UNet2DModel(
        sample_size=preset["image_size"], in_channels=3, out_channels=3,
        block_out_channels=tuple(preset["ch"] * m for m in preset["ch_mult"]),
        layers_per_block=2, down_block_types=tuple(down), up_block_types=tuple(up),
        attention_head_dim=None, norm_num_groups=32, norm_eps=1e-6, act_fn="silu",
        flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, dropout=preset["dropout"],
    )


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device, repeats):
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


class Peer:
    """The peer's model, optimizer, train step and forward pass on one device.

    ``train_step(x0)`` is one L_simple + Adam + clip step on a batch of images in
    [-1, 1]; ``forward(xt, t)`` one network evaluation without gradients.
    """

    def __init__(self, preset: str, precision: str = "fp32", compile_: bool = False,
                 device: str | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.preset = PRESETS[preset]
        self.model = build(self.preset).to(self.device).to(memory_format=torch.channels_last)
        self.num_params = sum(p.numel() for p in self.model.parameters())
        self.opt = torch.optim.Adam(self.model.parameters(), lr=2e-4, betas=(0.9, 0.999),
                                    eps=1e-8)
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16,
                                       enabled=precision == "bf16")
        betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
        self.abar = torch.cumprod(1 - betas, 0).to(torch.float32).to(self.device)
        self.train_step = torch.compile(self._train_step) if compile_ else self._train_step
        self.forward = torch.compile(self._forward) if compile_ else self._forward

    def _train_step(self, x0):
        t = torch.randint(0, 1000, (x0.shape[0],), device=self.device)
        noise = torch.randn_like(x0)
        a = self.abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with self.autocast:
            loss = torch.mean((self.model(xt, t).sample.float() - noise) ** 2)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        return loss

    def _forward(self, xt, t):
        with torch.no_grad(), self.autocast:
            return self.model(xt, t).sample

    def inputs(self, batch: int):
        """Images in [-1, 1] (channels-last) and timesteps for one batch."""
        size = self.preset["image_size"]
        x0 = torch.rand(batch, 3, size, size, device=self.device).mul(2).sub(1)
        x0 = x0.contiguous(memory_format=torch.channels_last)
        return x0, torch.full((batch,), 500, device=self.device)

    def sync(self):
        _sync(self.device)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cifar10")
    parser.add_argument("--batch_sizes", default="8")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--steps", type=int, default=5, help="train steps / sampling steps timed")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    peer = Peer(args.preset, args.precision, args.compile)
    device, preset, model, params = peer.device, peer.preset, peer.model, peer.num_params
    train_step, forward = peer.train_step, peer.forward

    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        x0, t = peer.inputs(batch)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        model.train()
        train_step(x0)
        _sync(device)
        first_s = time.perf_counter() - start

        def run_train(x0=x0):
            for _ in range(args.steps):
                train_step(x0)

        def run_sample(x0=x0, t=t):
            for _ in range(args.steps):
                forward(x0, t)

        train_times = _time(run_train, device, args.repeats)
        model.eval()
        sample_times = _time(run_sample, device, args.repeats)
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
        common = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(shlex.quote(a) for a in sys.argv),
            "framework": "torch",
            "device": {"platform": device.type,
                       "device_kind": (torch.cuda.get_device_name() if device.type == "cuda"
                                       else platform.processor() or "cpu"),
                       "cpu_count": os.cpu_count(), "host": platform.node()},
            "versions": {"torch": torch.__version__,
                         "diffusers": __import__("diffusers").__version__},
            "config": {"preset": args.preset, **{k: list(v) if isinstance(v, tuple) else v
                                                  for k, v in preset.items()}},
            "dtype": "bfloat16" if args.precision == "bf16" else "float32",
            "compiled": args.compile, "batch": batch, "num_params": params,
            "peak_memory_bytes": peak,
        }
        for record in (
            {"benchmark": "train", "first_step_s": round(first_s, 3),
             "images_per_s": batch * args.steps / min(train_times),
             "steps_per_s": args.steps / min(train_times)},
            {"benchmark": "sample", "image_steps_per_s": batch * args.steps / min(sample_times),
             "seconds_per_image_step": min(sample_times) / (batch * args.steps)},
        ):
            line = json.dumps({**common, **record}, sort_keys=True)
            print(line, flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(line + "\n")


if __name__ == "__main__":
    main()
