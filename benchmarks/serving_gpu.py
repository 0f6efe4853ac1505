"""The serving engine on a GPU: correctness of both payloads against the reconstructed experts, decode-step
speed of mixed-expert batches (base alone, dense deltas, packed deltas through the Triton kernel),
device bytes per expert, and the switch cost from host memory.

SYNTHETIC weights (``meswitch.synthetic``: random base, fine-tuning-like deltas), compressed at 2 bits
with 1% salient channels (magnitude selection: no calibration text is needed). Needs torch,
transformers, safetensors and triton only.

    python benchmarks/serving_gpu.py --out benchmarks/results/serving-gpu-2026-11-22.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, DynamicCache

from meswitch.checkpoints import Checkpoint, check_expert
from meswitch.compression.delta import DeltaConfig
from meswitch.compression.expert import ExpertInfo, compress_expert
from meswitch.compression.reconstruct import open_artifact
from meswitch.serving.engine import EngineConfig, MixedExpertEngine
from meswitch.synthetic import finetune_like_delta, mistral_7b_config, write_synthetic_pair

DEV = "cuda"


def _sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def make_family(work: Path, args) -> tuple[Path, list[Path]]:
    cfg = mistral_7b_config(hidden_size=args.hidden, intermediate_size=args.inter, num_hidden_layers=args.layers,
                            num_attention_heads=args.heads, num_key_value_heads=args.kv, vocab_size=args.vocab,
                            max_position_embeddings=2048)  # fmt: skip
    base, first = write_synthetic_pair(work / "pair", cfg, seed=0, device=DEV)
    experts = [first]
    for j in range(1, args.experts):
        out = work / f"expert{j}"
        out.mkdir(parents=True, exist_ok=True)
        g = torch.Generator(device=DEV).manual_seed(100 + j)
        for f in sorted(base.iterdir()):
            if f.suffix == ".safetensors":
                t = load_file(f)
                for name, w in t.items():
                    d = 0.01 * torch.randn(w.shape, generator=g, device=DEV) if w.dim() == 1 else \
                        finetune_like_delta(tuple(w.shape), 0.02 * 1e-2, g, DEV)  # fmt: skip
                    t[name] = (w.to(DEV).float() + d).to(w.dtype).cpu()
                save_file(t, out / f.name, metadata={"format": "pt"})
            else:
                (out / f.name).write_bytes(f.read_bytes())
        experts.append(out)
    arts = []
    base_ckpt = Checkpoint(base)
    for j, e in enumerate(experts):
        out = work / f"art{j}"
        pairing = check_expert(base_ckpt, Checkpoint(e))
        compress_expert(base_ckpt, Checkpoint(e), pairing, None, DeltaConfig(method="magnitude", bits=2, salient=0.01),
                        out, ExpertInfo(f"e{j}"), device=DEV)  # fmt: skip
        arts.append(out)
    return base, arts


def timed(fn, reps: int) -> float:
    fn()
    _sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def decode_step_seconds(eng: MixedExpertEngine, rows, prompt_len: int, reps: int) -> float:
    b = len(rows)
    ids = torch.randint(3, eng.base_vocab, (b, prompt_len), device=eng.device)
    cache = DynamicCache()
    eng.forward(ids, rows, cache=cache, logits_to_keep=1)
    nxt = torch.randint(3, eng.base_vocab, (b, 1), device=eng.device)
    pos = torch.full((b, 1), prompt_len, device=eng.device)
    length = cache.get_seq_length()

    def step():
        eng.forward(nxt, rows, position_ids=pos, cache=cache, logits_to_keep=1)
        for layer in cache.layers:  # keep the cache length fixed: every rep times the same step
            layer.keys, layer.values = layer.keys[:, :, :length], layer.values[:, :, :length]

    return timed(step, reps)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/serving-gpu"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/serving-gpu-2026-11-22.json"))
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--inter", type=int, default=5632)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--device", default="cuda", help="cuda; cpu only to smoke-test the script")
    args = p.parse_args(argv)
    global DEV
    DEV = args.device
    dtype = "bfloat16" if DEV == "cuda" else "float32"
    t0 = time.perf_counter()
    base, arts = make_family(args.work, args)
    made = time.perf_counter() - t0
    ckpt = Checkpoint(base)
    engines = {kind: MixedExpertEngine(base, EngineConfig(device=DEV, dtype=dtype, payload=kind))
               for kind in ("dense", "packed")}  # fmt: skip
    slots = {kind: [eng.add_expert(a) for a in arts] for kind, eng in engines.items()}
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    result: dict = {
        "device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu",
        "date": dt.date.today().isoformat(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "triton": triton_version},
        "command": " ".join(["python", *sys.argv]),
        "synthetic": True,
        "geometry": {k: v for k, v in vars(args).items() if k not in ("work", "out")},
        "family_seconds": round(made, 1),
    }  # fmt: skip

    # Correctness: a mixed batch (every expert and the base, interleaved) against each reconstructed expert in fp32.
    ids = torch.randint(3, args.vocab, (2 * len(arts) + 1, 32), device=DEV, generator=torch.Generator(DEV))
    errors = {}
    refs, floor = [], []
    for a in arts:
        # base + Δ̂ in fp32, unrounded: what the engine computes (`meswitch reconstruct` rounds the sum to the
        # base's bf16, which alone moves logits by about as much as serving in bf16 does).
        m = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(DEV).eval()
        reader = open_artifact(a, ckpt)
        with torch.no_grad():
            for name, param in m.named_parameters():
                param += reader.delta(name, DEV)
        with torch.inference_mode():
            refs.append(m(input_ids=ids).logits.float())
            # The floor: the reconstructed full expert itself, run in the serving dtype.
            low = m.to(getattr(torch, dtype))(input_ids=ids).logits.float()
        floor.append(float(((low - refs[-1]).norm(dim=-1) / refs[-1].norm(dim=-1)).max()))
        del m
    errors["same_weights_fp32_vs_serving_dtype"] = {"max_relative_logit_error": max(floor)}
    for kind, eng in engines.items():
        rows = [*slots[kind], *slots[kind], None]
        got = eng.forward(ids, rows).float()
        rel = []
        for i, s in enumerate(rows[:-1]):
            want = refs[s.index % len(arts)][i]
            rel.append(float(((got[i] - want).norm(dim=-1) / want.norm(dim=-1)).max()))
        argmax = [float((got[i].argmax(-1) == refs[s.index % len(arts)][i].argmax(-1)).float().mean())
                  for i, s in enumerate(rows[:-1])]  # fmt: skip
        errors[kind] = {"max_relative_logit_error": max(rel), "min_argmax_agreement": min(argmax)}
    dense_vs_packed = engines["dense"].forward(ids, [*slots["dense"], *slots["dense"], None]).float()
    packed = engines["packed"].forward(ids, [*slots["packed"], *slots["packed"], None]).float()
    errors["packed_vs_dense_max_relative"] = float((packed - dense_vs_packed).norm() / dense_vs_packed.norm())
    result["correctness_vs_fp32_base_plus_delta"] = errors

    # Speed: one decode step of a batch whose rows cycle through the experts.
    b = args.batch
    speed = {"batch": b, "prompt_tokens": args.prompt}
    speed["base_only_ms"] = 1e3 * decode_step_seconds(engines["dense"], [None] * b, args.prompt, args.reps)
    for kind, eng in engines.items():
        one = [slots[kind][0]] * b
        mixed = [slots[kind][i * len(arts) // b] for i in range(b)]  # grouped by expert, as the scheduler orders rows
        speed[f"{kind}_one_expert_ms"] = 1e3 * decode_step_seconds(eng, one, args.prompt, args.reps)
        speed[f"{kind}_{len(arts)}_experts_mixed_ms"] = 1e3 * decode_step_seconds(eng, mixed, args.prompt, args.reps)
    speed = {k: round(v, 3) if isinstance(v, float) else v for k, v in speed.items()}
    result["decode_step"] = speed

    # End to end through the continuous-batching scheduler: requests for every expert arriving together.
    import threading

    from meswitch.serving.batching import GenRequest, Scheduler, SchedulerConfig

    sched_result = {}
    for kind, eng in engines.items():
        sched = Scheduler(eng, SchedulerConfig(max_batch=args.batch, max_prefill_tokens=8192)).start()
        done = threading.Semaphore(0)
        n_req, new_tokens = 4 * args.batch, 64
        gen = torch.Generator().manual_seed(0)
        t = time.perf_counter()

        def finished(ev, done=done):
            if ev.finish:
                done.release()

        for i in range(n_req):
            prompt = torch.randint(3, args.vocab, (args.prompt,), generator=gen).tolist()
            sched.submit(GenRequest(prompt, slots[kind][i % len(arts)], new_tokens, finished))
        for _ in range(n_req):
            done.acquire()
        wall = time.perf_counter() - t
        sched.stop()
        sched_result[kind] = {
            "requests": n_req,
            "new_tokens_each": new_tokens,
            "seconds": round(wall, 3),
            "tokens_per_second": round(n_req * new_tokens / wall, 1),
            "steps": sched.steps,
        }
    result["scheduler"] = sched_result

    # Memory and switch cost.
    mem = {kind: {"device_bytes_per_expert": slots[kind][0].device_bytes} for kind in engines}
    for kind, eng in engines.items():
        s = slots[kind][0]
        eng.tiers._drop(s)  # demote it (its packed copy stays in host memory)
        t = time.perf_counter()
        eng.tiers.ensure([s])
        mem[kind]["switch_from_host_ms"] = round(1e3 * (time.perf_counter() - t), 2)
    result["memory"] = mem
    result["elapsed_seconds"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
