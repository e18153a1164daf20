"""Transformer++ bf16 decoding at batch 1 on one GPU: tokens/s and fraction of the copy-bandwidth
roofline of the static decoder's step backends, the launch shapes of the Triton step's products,
and whether the greedy tokens match the eager `Decoder`'s.

    python scripts/bench_tf_decode.py --sizes 1.3b,2.7b,13b [--sweep] [--budget-s 200]

Per size: the PyTorch step and the Triton step (default launch shapes), each one CUDA graph per
token (`GraphDecoder`), timed with CUDA events over `--new-tokens - 1` greedy steps after a
`--prompt-len` prompt, best of `--repeats`. The roofline is `streamed_bytes` (the weights one step
reads, workloads/weight_bytes.py) at the measured device-to-device copy rate, as decode-power
computes `bandwidth_frac`. `--sweep` also times each product's kernel alone over the layers'
weights in turn (so that the L2 cache does not hold them) for a few launch shapes, each as one
CUDA graph of all its launches (Python's launch cost left out, as in the decoder's graph), and then
the whole step with the fastest shape of each product. `--profile` records `--profile-steps` graph
replays of each backend's step with torch.profiler (CUPTI records the kernels inside a graph) and
prints a per-launch table: kernel (the Triton step's by role), launches a step, bytes each (weights
and cache read), us each, GB/s, share of the step; and the kernels' sum against the step's time
(the rest is gaps between a graph's kernels).
"""

from __future__ import annotations

import argparse
import time

import torch

from mmprof.kernels import bf16_decode as k
from mmprof.profiler import Timer, copy_bandwidth_gbps, time_fn
from mmprof.workloads import Decoder, build_model, streamed_bytes
from mmprof.workloads.decode import GraphDecoder

SHAPES = [k.GemvBlocks(8, 512, 4, 4), k.GemvBlocks(16, 512, 4, 4), k.GemvBlocks(32, 512, 8, 4),
          k.GemvBlocks(32, 256, 4, 4), k.GemvBlocks(16, 1024, 8, 3), k.GemvBlocks(4, 1024, 4, 4)]
# split-K shapes, tried for the products with few rows (o_proj, down_proj) besides SHAPES
SPLIT_SHAPES = [k.GemvBlocks(16, 256, 4, 4, split=2), k.GemvBlocks(16, 256, 4, 4, split=4),
                k.GemvBlocks(8, 512, 4, 4, split=4), k.GemvBlocks(16, 512, 4, 4, split=8)]


def _split(rows: int, block_rows: int = 16) -> int:
    """Ranges a row's columns are cut into so that a product of `rows` rows runs at least two
    programs an SM (the GPU's own SM count)."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    return max(1, -(-2 * sms // -(-rows // block_rows)))


def _splitk(cfg) -> dict:
    """o_proj and down_proj split-K to two programs an SM, the rest as tuned."""
    split = _split(cfg.hidden_size)
    return {"o_proj": k.GemvBlocks(16, 256, 4, 4, split=split), "down_proj": k.GemvBlocks(16, 256, 4, 4, split=split)}


def _wide(cfg) -> dict:
    """Whole rows of up to 2048 columns a loop step (fewer dependent steps), 256 keys an attention step."""
    return {"qkv": k.GemvBlocks(8, 2048, 8, 1), "o_proj": k.GemvBlocks(4, 2048, 4, 1),
            "gate_up": k.GemvBlocks(4, 2048, 8, 1), "down_proj": k.GemvBlocks(4, 2048, 4, 1),
            "lm_head": k.GemvBlocks(4, 2048, 4, 1), "attend_block": 256}


PRODUCTS = ("qkv", "o_proj", "gate_up", "down_proj", "lm_head")
# variants of the Triton step: product name -> launch shape (and "attend_block": keys per attention
# step, "pdl": programmatic dependent launch between the step's kernels)
VARIANTS = {
    "wide": _wide,
    "splitk": _splitk,
    "attend256": lambda cfg: {"attend_block": 256},
    "pdl": lambda cfg: {"pdl": True},
    "pdl-rows8": lambda cfg: {"pdl": True, **{name: k.GemvBlocks(8, 512) for name in PRODUCTS}},
    "attend128": lambda cfg: {"attend_block": 128},
}


def events_s(fn, repeats: int) -> float:
    """Best time of `fn`'s GPU work over `repeats`, captured once as a CUDA graph and replayed
    (compiled and warmed by one eager call first)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    return time_fn(graph.replay, warmup=0, repeats=repeats, device="cuda").min_s


def decode_rate(decoder, prompt, new_tokens: int, repeats: int) -> tuple[float, torch.Tensor]:
    """(tokens/s over the greedy steps, best of `repeats`; the greedy ids [new_tokens]). The timed
    loop is decode-power's: each step is fed the ids buffer the step before returned."""
    def timed():
        token = decoder.prefill(prompt).argmax(-1)
        torch.cuda.synchronize()
        timer = Timer("cuda")
        timer.mark()
        for _ in range(new_tokens - 1):
            token = decoder.greedy_step(token)
        timer.mark()
        return (new_tokens - 1) / timer.total_s()

    token = decoder.prefill(prompt).argmax(-1)  # warm-up: compiles, captures; keeps the ids
    ids = [token.clone()]
    for _ in range(new_tokens - 1):
        token = decoder.greedy_step(token)
        ids.append(token.clone())
    return max(timed() for _ in range(repeats)), torch.cat(ids)


def eager_greedy(model, prompt, new_tokens: int) -> torch.Tensor:
    dec = Decoder(model, 1, prompt.shape[1] + new_tokens)
    token = dec.prefill(prompt).argmax(-1)
    out = [token]
    for _ in range(new_tokens - 1):
        token = dec.greedy_step(token)
        out.append(token)
    return torch.cat(out)


def tie_gap(model, prompt, ids, first: int) -> str:
    """At the first token where a backend's greedy ids leave the eager decoder's: how far below the
    eager model's best logit (given the backend's prefix) the backend's choice is, against the top
    logit: a bf16 near-tie (summation order) reads as a gap of a few thousandths of it."""
    if first < 0:
        return ""
    prefix = torch.cat([prompt, ids[None, :first]], 1)
    logits = Decoder(model, 1, prefix.shape[1]).prefill(prefix)[0].float()
    top = logits.max()
    return f"; eager gap there {float(top - logits[ids[first]]):.4f} of top {float(top):.3f}"


def sweep(model, sd, repeats: int, own: bool = False) -> dict:
    """Fastest launch shape per product, each timed over all layers' weights in turn (`own`: only
    the decoder's own shape of each product and its attention block: a per-product table)."""
    layers = model.model.layers
    cfg = model.config
    x = torch.randn(cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
    inter = torch.randn(cfg.intermediate_size, device="cuda", dtype=torch.bfloat16)
    resid = x.clone()  # what o_proj and down_proj add into (its values grow: only the time counts)
    pos = torch.tensor([40], device="cuda")
    nw = layers[0].input_layernorm.weight
    cache = sd.cache
    products = {
        "qkv": lambda b: [k.norm_qkv_rope(x, nw, 1e-6, sd.qkv[n], sd.cos_half, sd.sin_half, pos, sd.q,
                                          cache.k[n, 0], cache.v[n, 0], cfg.num_heads, b) for n in range(len(layers))],
        "o_proj": lambda b: [k.gemv(sd.attn_out, layers[n].self_attn.o_proj.weight, resid, residual=True, blocks=b)
                             for n in range(len(layers))],
        "gate_up": lambda b: [k.gemv(x, sd.gate_up[n], sd.glu_out, norm=nw, glu=True, blocks=b) for n in range(len(layers))],
        "down_proj": lambda b: [k.gemv(inter, layers[n].mlp.down_proj.weight, resid, residual=True, blocks=b)
                                for n in range(len(layers))],
        "lm_head": lambda b: [k.gemv(x, model.lm_head.weight, norm=nw, blocks=b) for _ in range(4)],
    }
    weights = {"qkv": sd.qkv[0], "o_proj": layers[0].self_attn.o_proj.weight, "gate_up": sd.gate_up[0],
               "down_proj": layers[0].mlp.down_proj.weight, "lm_head": model.lm_head.weight}
    copies = {name: (len(layers) if name != "lm_head" else 4) for name in products}
    best = {}
    for name, fn in products.items():
        nbytes = weights[name].numel() * 2 * copies[name]
        line = []
        shapes = [sd.blocks[name]] if own else SHAPES + (SPLIT_SHAPES if name in ("o_proj", "down_proj") else [])
        for shape in shapes:
            try:
                s = events_s(lambda: fn(shape), repeats)
            except Exception as e:  # noqa: BLE001 - a shape that fails to compile is reported, not fatal
                line.append(f"{shape.rows}/{shape.cols}/{shape.warps}/{shape.stages}: {type(e).__name__}")
                continue
            us = s / copies[name] * 1e6
            line.append(f"{shape.rows}/{shape.cols}/{shape.warps}/{shape.stages}/s{shape.split}: {us:.1f}us {nbytes / s / 1e9:.0f}GB/s")
            if name not in best or s < best[name][0]:
                best[name] = (s, shape)
        print(f"  {name} {tuple(weights[name].shape)}: " + " | ".join(line), flush=True)
    # attention: the Triton kernel's key block against SDPA over the whole padded cache
    for block_t in (sd.attend_block,) if own else (32, 64, 128):
        s = events_s(lambda: [k.attend(sd.q, cache.k[n, 0], cache.v[n, 0], pos, sd.attn_out, block_t)
                              for n in range(len(layers))], repeats)
        print(f"  attend block_t {block_t}: {s / len(layers) * 1e6:.1f}us per layer (41 keys)", flush=True)
    return {name: shape for name, (_, shape) in best.items()}


def _role_bytes(model, sd, keys: float) -> dict:
    """Bytes one launch of each Triton-step role reads (weights; the cache for attention)."""
    cfg, layer = model.config, model.model.layers[0]
    size = 2  # bf16
    attn = 2 * cfg.kv_heads * keys * cfg.head_dim * size
    return {"qkv": sd.qkv[0].numel() * size, "attend": attn, "o_proj": layer.self_attn.o_proj.weight.numel() * size,
            "gate_up": sd.gate_up[0].numel() * size, "down_proj": layer.mlp.down_proj.weight.numel() * size,
            "lm_head": model.lm_head.weight.numel() * size}


def _label(names: list[str], layers: int) -> list[str]:
    """Roles of one Triton step's kernels in launch order (gemvs, split-K partial products among
    them: o_proj, gate_up, down_proj by layer, then lm_head); other kernels keep their (shortened)
    names."""
    out, gemvs = [], 0
    for name in names:
        if "_qkv_rope_kernel" in name:
            out.append("qkv")
        elif "_attend_kernel" in name:
            out.append("attend")
        elif "_gemv_sum_kernel" in name:
            out.append("split-K sum")
        elif "_gemv_kernel" in name or "_gemv_part_kernel" in name:
            out.append("lm_head" if gemvs == 3 * layers else ("o_proj", "gate_up", "down_proj")[gemvs % 3])
            gemvs += 1
        else:
            out.append(name[:60])
    return out


def profile_table(label: str, model, sd, decoder, prompt, steps: int, step_s: float) -> None:
    """Per-launch table of `steps` graph replays of the decoder's greedy step (see the docstring)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    token = decoder.prefill(prompt).argmax(-1)
    token = decoder.greedy_step(token)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            token = decoder.greedy_step(token)
        torch.cuda.synchronize()
    events = sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA),
                    key=lambda e: e.time_range.start)
    if not events or len(events) % steps:
        print(f"  {label}: profiler saw {len(events)} GPU events over {steps} replays: no per-launch table"
              + ("; each product's launches as one graph instead:" if sd.backend == "triton" else ""), flush=True)
        if sd.backend == "triton":
            sweep(model, sd, 3, own=True)
        return
    per = len(events) // steps
    layers = len(model.model.layers)
    roles = _label([e.name for e in events[:per]], layers) if sd.backend == "triton" else \
        [e.name[:60] for e in events[:per]]
    keys = prompt.shape[1] + 2 + steps / 2
    nbytes = _role_bytes(model, sd, keys) if sd.backend == "triton" else {}
    rows: dict[str, list] = {}
    for i, e in enumerate(events):
        rows.setdefault(roles[i % per], []).append(e.time_range.elapsed_us())
    total = sum(sum(v) for v in rows.values()) / steps
    print(f"  {label}: per launch in graph replay ({steps} steps; {per} kernels a step; kernels "
          f"{total:.0f} us of a {step_s * 1e6:.0f} us step, gaps {step_s * 1e6 - total:.0f} us)", flush=True)
    print("    kernel | launches/step | MB/launch | us/launch | GB/s | share of step", flush=True)
    for role, times in sorted(rows.items(), key=lambda kv: -sum(kv[1])):
        n = len(times) / steps
        us = sum(times) / len(times)
        b = nbytes.get(role)
        mb, gbps = (f"{b / 1e6:.2f}", f"{b / us / 1e3:.0f}") if b else ("-", "-")
        print(f"    {role} | {n:g} | {mb} | {us:.2f} | {gbps} | {sum(times) / steps / (step_s * 1e6):.3f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1.3b,2.7b,13b")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--with-torch", action=argparse.BooleanOptionalAction, default=True,
                    help="time the PyTorch step too")
    ap.add_argument("--variants", default="", help=f"more launch-shape variants: {', '.join(VARIANTS)}")
    ap.add_argument("--compile-mode", default="", help="also the torch.compile step in this mode "
                    "(max-autotune-no-cudagraphs as gpt-fast; default compiles faster)")
    ap.add_argument("--profile", action="store_true", help="per-launch table of each backend's graph replay")
    ap.add_argument("--profile-steps", type=int, default=16)
    ap.add_argument("--budget-s", type=float, default=1e9, help="skip what is left after this many seconds")
    args = ap.parse_args()
    t0 = time.time()
    if args.compile_mode:
        from mmprof.workloads.transformer import TransformerStaticDecoder

        TransformerStaticDecoder.COMPILE_MODE = args.compile_mode
    copy = copy_bandwidth_gbps("cuda")
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}; copy {copy:.0f} GB/s", flush=True)
    print("size | backend | tokens/s | ms/token | bytes/step GiB | GB/s | bandwidth_frac | greedy = eager", flush=True)
    for size in args.sizes.split(","):
        if time.time() - t0 > args.budget_s:
            print(f"{size}: skipped (budget)")
            continue
        model = build_model("transformer", size, device="cuda", dtype=torch.bfloat16).eval()
        gen = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt_len), generator=gen).cuda()
        step_bytes = streamed_bytes(model, 1)
        max_len = args.prompt_len + args.new_tokens
        with torch.inference_mode():
            eager = eager_greedy(model, prompt, args.new_tokens)
            variants = [("torch", None), ("triton", None)] if args.with_torch else [("triton", None)]
            if args.compile_mode:
                variants.append(("compile", None))
            for name in args.variants.split(",") if args.variants else []:
                variants.append((name, VARIANTS[name](model.config)))
            if args.sweep:
                sd = model.static_decoder(1, max_len, backend="triton")
                tuned = sweep(model, sd, args.repeats)
                print(f"  fastest: {tuned}", flush=True)
                variants.append(("triton", tuned))
            for backend, blocks in variants:
                if time.time() - t0 > args.budget_s:
                    print(f"{size} | {backend}: skipped (budget)", flush=True)
                    continue
                name = backend if backend in ("torch", "triton", "compile") and not blocks else \
                    ("triton-swept" if backend == "triton" else f"triton-{backend}")
                sd = model.static_decoder(1, max_len, backend=backend if backend in ("torch", "compile") else "triton")
                if blocks:
                    sd.attend_block = blocks.pop("attend_block", sd.attend_block)
                    sd.pdl = blocks.pop("pdl", sd.pdl)
                    sd.blocks.update(blocks)
                graph = GraphDecoder(sd)
                rate, ids = decode_rate(graph, prompt, args.new_tokens, args.repeats)
                gbps = step_bytes * rate / 1e9
                same = int((ids == eager).all())
                first = int((ids != eager).nonzero()[0]) if not same else -1
                print(f"{size} | {name} | {rate:.1f} | {1e3 / rate:.3f} | {step_bytes / 2**30:.3f} | {gbps:.0f} | "
                      f"{gbps / copy:.3f} | {same} (first differing token {first}{tie_gap(model, prompt, ids, first)})",
                      flush=True)
                if args.profile:
                    profile_table(f"{size} {name}", model, sd, graph, prompt, args.profile_steps, 1 / rate)
        del model
        torch.cuda.empty_cache()
    print(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
