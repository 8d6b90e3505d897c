"""Segmenter throughput: training and inference samples/s and peak memory, random weights, random inputs.

    python bench/train_throughput.py                      # CPU preset (tiny, 128 px, batch 32), 1 and 2 threads
    python bench/train_throughput.py --preset lavt_swin_b --size 480 --batch 32 --compile both   # on a GPU

On a GPU the large presets run with bf16 autocast, eager and (``--compile both``) ``torch.compile``. Each
figure is the median of ``--steps`` timed steps after ``--warmup`` untimed ones. On a shared CPU the numbers
move a lot with other load: run it on an idle machine and read them as rough.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time

import torch

from l2l_ray.config import load_config
from l2l_ray.model import build_segmenter, count_parameters, make_batch, resolve_preset


class _Tok:
    """A stand-in tokenizer (only the sizes matter for throughput)."""

    def __init__(self, vocab_size: int, max_len: int):
        self.vocab_size, self.max_len, self.pad_id = vocab_size, max_len, 0


def _batch(b: int, s: int, t: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(5, 1000, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[:, t // 2:] = torch.rand(b, t - t // 2, generator=g) > 0.5
    target = (torch.rand(b, s, s, generator=g) > 0.9).float()
    return make_batch(torch.randint(0, 255, (b, 3, s, s), dtype=torch.uint8, generator=g), tokens, mask,
                      prior=torch.rand(b, s // 4, s // 4, generator=g), box=torch.tensor([[0.2, 0.2, 0.6, 0.7]] * b),
                      prior_valid=torch.rand(b, generator=g) > 0.3, target=target, device=device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(args, compiled: bool) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    cfg = load_config(None, [f"model.preset={args.preset}", f"data.image_size={args.size}", *args.overrides])
    spec = resolve_preset(cfg.model)
    tok = _Tok(spec.vocab_size if spec.text == "small" else 30522, args.tokens)  # BERT's vocabulary when pretrained
    model = build_segmenter(cfg, tok).to(device)
    net = torch.compile(model) if compiled else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = _batch(args.batch, args.size, args.tokens, device)
    amp = device.type == "cuda"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def train_step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = net(batch)
        loss, _ = model.loss_from_outputs(out, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def infer_step():
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            torch.sigmoid(net(batch)["logits"])

    model.train()
    t_train = _time(train_step, args.steps, args.warmup, device)
    train_mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    model.eval().fuse_batchnorm()  # as l2l_ray.train.infer.load_model does for every inference
    t_infer = _time(infer_step, args.steps, args.warmup, device)
    return {
        "preset": args.preset, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads() if device.type == "cpu" else None, "compile": compiled,
        "params_M": round(count_parameters(model) / 1e6, 2), "batch": args.batch, "size": args.size,
        "bf16": amp, "train_samples_per_s": round(args.batch / t_train, 1),
        "infer_samples_per_s": round(args.batch / t_infer, 1),
        "peak_gpu_mem_GiB": round(train_mem, 2) if train_mem is not None else None,
        "peak_rss_GiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--size", type=int, default=None, help="input side (default: 128 tiny, 480 otherwise)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--tokens", type=int, default=20)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", default="1,2", help="CPU only: torch thread counts to try")
    p.add_argument("--compile", choices=["no", "yes", "both"], default="no")
    p.add_argument("--cpu", action="store_true", help="stay on the CPU even when a GPU is present")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. model.width=128")
    args = p.parse_args(argv)
    args.size = args.size or (128 if args.preset == "tiny" else 480)
    modes = {"no": [False], "yes": [True], "both": [False, True]}[args.compile]
    on_gpu = torch.cuda.is_available() and not args.cpu
    threads = [None] if on_gpu else [int(t) for t in args.threads.split(",")]
    for n in threads:
        if n:
            torch.set_num_threads(n)
        for compiled in modes:
            print(json.dumps(bench(args, compiled)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
