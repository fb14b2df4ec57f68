#!/usr/bin/env python3
"""The barnraise trainer's model and inner step in PyTorch, for throughput
comparisons (scripts/compare-torch.sh runs both side by side).

Same model as trainer/src/model.rs: byte vocabulary, Llama-style blocks
(RMSNorm, rotary positions in the rotate-half convention, causal softmax
attention, SwiGLU MLP), untied embedding and head, no biases. Same step as
trainer/src/train.rs: AdamW (betas 0.9/0.95, eps 1e-8, weight decay 0.1 on
matrices only), global-norm clipping at 1.0. Under --precision bf16 the
matmuls run in bf16 through autocast with f32 master weights, which is the
policy of trainer/src/precision.rs.

Prints one JSON object with the field names `barnraise bench train --json`
uses. Attention is written out as barnraise computes it (scores, mask,
softmax, mix) unless --attention sdpa asks for PyTorch's fused kernel.
"""

import argparse
import json
import math
import sys
import time

import torch
import torch.nn.functional as F

PRESETS = {
    # d_model, n_layers, n_heads, d_ff, max_seq_len
    "tiny": (64, 2, 4, 176, 64),
    "small": (256, 4, 8, 688, 128),
    "medium": (768, 18, 12, 2048, 1024),
    "large": (1024, 24, 16, 2816, 1024),
    "xl": (2048, 24, 16, 5632, 2048),
}
VOCAB = 256


class RMSNorm(torch.nn.Module):
    def __init__(self, d, eps=1e-5):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        inv = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * inv) * self.weight


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Block(torch.nn.Module):
    def __init__(self, d, heads, ff, attention):
        super().__init__()
        self.heads = heads
        self.attention = attention
        self.attn_norm = RMSNorm(d)
        self.mlp_norm = RMSNorm(d)
        self.q = torch.nn.Linear(d, d, bias=False)
        self.k = torch.nn.Linear(d, d, bias=False)
        self.v = torch.nn.Linear(d, d, bias=False)
        self.o = torch.nn.Linear(d, d, bias=False)
        self.gate = torch.nn.Linear(d, ff, bias=False)
        self.up = torch.nn.Linear(d, ff, bias=False)
        self.down = torch.nn.Linear(ff, d, bias=False)

    def forward(self, x, cos, sin, mask):
        b, s, d = x.shape
        hd = d // self.heads
        h = self.attn_norm(x)

        def split(proj):
            return proj(h).view(b, s, self.heads, hd).transpose(1, 2)

        q, k, v = split(self.q), split(self.k), split(self.v)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if self.attention == "sdpa":
            mixed = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hd))
            attn = torch.softmax(scores.float() + mask, dim=-1).to(v.dtype)
            mixed = attn @ v
        x = x + self.o(mixed.transpose(1, 2).reshape(b, s, d))
        h = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class Model(torch.nn.Module):
    def __init__(self, preset, attention):
        super().__init__()
        d, layers, heads, ff, ctx = PRESETS[preset]
        self.embed = torch.nn.Embedding(VOCAB, d)
        self.blocks = torch.nn.ModuleList(Block(d, heads, ff, attention) for _ in range(layers))
        self.norm = RMSNorm(d)
        self.head = torch.nn.Linear(d, VOCAB, bias=False)
        hd = d // heads
        inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
        angles = torch.arange(ctx, dtype=torch.float64)[:, None] * inv[None, :]
        angles = torch.cat((angles, angles), dim=-1)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02
                if name.endswith("o.weight") or name.endswith("down.weight"):
                    std /= math.sqrt(2 * layers)
                torch.nn.init.normal_(p, 0.0, std)

    def forward(self, ids):
        s = ids.shape[1]
        x = self.embed(ids)
        cos, sin = self.cos[:s], self.sin[:s]
        mask = torch.full((s, s), float("-inf"), device=ids.device).triu(1)
        for block in self.blocks:
            x = block(x, cos, sin, mask)
        return self.head(self.norm(x))


def flops_per_token(preset, seq):
    d, layers, heads, ff, ctx = PRESETS[preset]
    per_layer = 4 * d * d + 3 * d * ff
    return 6.0 * (layers * per_layer + VOCAB * d) + 12.0 * layers * seq * d


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="small", choices=sorted(PRESETS))
    ap.add_argument("--device", default="cpu", help="cpu or cuda:N")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--precision", default="auto", choices=["auto", "f32", "bf16"])
    ap.add_argument("--attention", default="manual", choices=["manual", "sdpa"])
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    seq = args.seq_len or PRESETS[args.model][4]
    precision = args.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "f32"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False

    model = Model(args.model, args.attention).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=3e-3, betas=(0.9, 0.95), eps=1e-8,
        foreach=True,
    )
    step_model = torch.compile(model) if args.compile else model
    gen = torch.Generator().manual_seed(args.seed)
    # Random bytes: throughput does not depend on the text.
    data = torch.randint(0, VOCAB, (args.warmup + args.steps, args.batch_size, seq + 1), generator=gen)
    data = data.to(device)

    def step(i):
        ids, targets = data[i, :, :-1], data[i, :, 1:]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = step_model(ids)
        loss = F.cross_entropy(logits.float().reshape(-1, VOCAB), targets.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item()  # waits for the device, as barnraise does each step

    for i in range(args.warmup):
        step(i)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    started = last = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.steps):
        losses.append(step(i))
        now = time.perf_counter()
        times.append(now - last)
        last = now
    wall = time.perf_counter() - started
    tokens = args.batch_size * seq
    tps = tokens * args.steps / wall
    fpt = flops_per_token(args.model, seq)
    report = {
        "implementation": "pytorch",
        "torch_version": torch.__version__,
        "mode": "compile" if args.compile else "eager",
        "attention": args.attention,
        "preset": args.model,
        "params": sum(p.numel() for p in model.parameters()),
        "device": args.device,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads",
        "precision": precision,
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "seq_len": seq,
        "steps": args.steps,
        "tokens_per_step": tokens,
        "step_seconds_median": sorted(times)[len(times) // 2],
        "tokens_per_sec": tps,
        "flops_per_token": fpt,
        "flops_per_sec": tps * fpt,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "loss_first": losses[0],
        "loss_last": losses[-1],
    }
    json.dump(report, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
