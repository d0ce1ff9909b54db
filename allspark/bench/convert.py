"""`allspark bench convert`: peak memory and time of `allspark convert` on a base LLM of a few GB.

Writes a LLaMA-shaped transformers directory of random fp16 weights in 1 GB shards (hidden 2048 by
default: TinyLlama's width, with enough layers to pass 2 GB), a Lynx-layout training checkpoint
for it (adapters on every 2nd layer, a small bridge) and an EVA-layout vision file, then runs the
conversion in a fresh process and reads its peak resident memory (`ru_maxrss` of the child). The
baseline is the same interpreter importing the same modules, so the difference is what the
conversion itself holds. Results: JSON + Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..commands import at_least

BASELINE = ("import torch, transformers, safetensors; import allspark.model.lynx, allspark.model.checkpoint; "
            "import allspark.modalities")


def write_inputs(root: Path, hidden: int, layers: int, vocab: int, shard: str) -> dict:
    """A random LLaMA directory (fp16, shards + index), a Lynx checkpoint and an EVA file for it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 2.75),
                      num_hidden_layers=layers, num_attention_heads=hidden // 64, tie_word_embeddings=False,
                      torch_dtype="float16")
    with torch.device("meta"):
        meta = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in meta.parameters())
    llm = LlamaForCausalLM(cfg).half()  # ~2 bytes per parameter, once
    llm.save_pretrained(root / "llm", max_shard_size=shard)
    del llm
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g) * 0.02  # noqa: E731
    W, R, lat, inner = 176, hidden // 2, 8, 128
    train = {"bridge.latents": r(lat, hidden), "bridge.norm.weight": torch.ones(hidden), "bridge.norm.bias": r(hidden)}
    b = "bridge.layers.0."
    train.update({b + "0.norm_media.weight": torch.ones(W), b + "0.norm_media.bias": r(W),
                  b + "0.norm_latents.weight": torch.ones(hidden), b + "0.norm_latents.bias": r(hidden),
                  b + "0.to_q.weight": r(inner, hidden), b + "0.to_kv.weight": r(2 * inner, W),
                  b + "0.to_out.weight": r(hidden, inner), b + "1.0.weight": torch.ones(hidden), b + "1.0.bias": r(hidden),
                  b + "1.1.weight": r(4 * hidden, hidden), b + "1.3.weight": r(hidden, 4 * hidden)})
    for layer in range(0, layers, 2):
        a = f"LLM.model.layers.{layer}.output_adapter."
        train.update({a + "scaling": torch.ones(1), a + "adapter_norm_before.weight": torch.ones(hidden),
                      a + "adapter_norm_before.bias": r(hidden), a + "adapter_down.weight": r(R, hidden),
                      a + "adapter_down.bias": r(R), a + "adapter_up.weight": r(hidden, R), a + "adapter_up.bias": r(hidden)})
    torch.save({"model": {f"module.{k}": v.half() for k, v in train.items()}}, root / "lynx.pt")
    eva = {"cls_token": r(1, 1, W), "pos_embed": r(1, 257, W), "patch_embed.proj.weight": r(W, 3, 14, 14),
           "patch_embed.proj.bias": r(W)}
    for k, shape in (("norm1.weight", (W,)), ("norm1.bias", (W,)), ("attn.qkv.weight", (3 * W, W)), ("attn.q_bias", (W,)),
                     ("attn.v_bias", (W,)), ("attn.proj.weight", (W, W)), ("attn.proj.bias", (W,)), ("norm2.weight", (W,)),
                     ("norm2.bias", (W,)), ("mlp.fc1.weight", (768, W)), ("mlp.fc1.bias", (768,)),
                     ("mlp.fc2.weight", (W, 768)), ("mlp.fc2.bias", (W,))):
        eva[f"blocks.0.{k}"] = r(*shape)
    torch.save(eva, root / "eva.pth")
    files = sorted((root / "llm").glob("*.safetensors"))
    return {"llm_parameters": n_params, "llm_bytes": sum(f.stat().st_size for f in files),
            "llm_source_shards": len(files), "largest_source_shard_bytes": max(f.stat().st_size for f in files)}


def _peak_rss_mb(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS in MB of one child process, seconds): that child's own rusage (KiB on Linux)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited with status {proc.returncode}")
    return usage.ru_maxrss / 1024, seconds


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="allspark-bench-convert-") as tmp:
        root = Path(tmp)
        # In a child of its own: Linux children inherit the RSS high-water mark of their parent at fork,
        # so this process stays small for the measured children that follow.
        subprocess.run([sys.executable, "-c", "import json, sys; from pathlib import Path; "
                        "from allspark.bench.convert import write_inputs; "
                        f"json.dump(write_inputs(Path({str(root)!r}), {args.hidden}, {args.layers}, {args.vocab}, "
                        f"{args.source_shard!r}), open({str(root / 'facts.json')!r}, 'w'))"], check=True)
        facts = json.loads((root / "facts.json").read_text())
        baseline_mb, _ = _peak_rss_mb([sys.executable, "-c", BASELINE])
        peak_mb, seconds = _peak_rss_mb([sys.executable, "-m", "allspark", "convert", "--lynx", str(root / "lynx.pt"),
                                         "--llm", str(root / "llm"), "--vision", str(root / "eva.pth"), "--modality",
                                         "rgb", "--out", str(root / "ckpt"), "--shard-mb", str(args.shard_mb)])
        report = json.loads((root / "ckpt" / "convert_report.json").read_text())["written"]
    shard = report["largest_llm_shard_bytes"] / 2 ** 20
    result = {"machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
                          "torch": torch.__version__},
              "inputs": facts, "shard_mb_requested": args.shard_mb, "written": report,
              "baseline_rss_mb": round(baseline_mb, 1), "peak_rss_mb": round(peak_mb, 1),
              "conversion_rss_mb": round(peak_mb - baseline_mb, 1), "largest_written_shard_mb": round(shard, 1),
              "ratio_to_largest_shard": round((peak_mb - baseline_mb) / shard, 2), "seconds": round(seconds, 1),
              "llm_gb": round(facts["llm_bytes"] / 1e9, 2)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(r: dict) -> str:
    i = r["inputs"]
    return "\n".join([
        "# `allspark convert` in bounded memory", "",
        f"A base LLM of {i['llm_parameters'] / 1e6:.0f}M parameters ({r['llm_gb']} GB fp16, {i['llm_source_shards']} "
        f"source shards of at most {i['largest_source_shard_bytes'] / 2 ** 20:.0f} MB), converted with "
        f"`--shard-mb {r['shard_mb_requested']}` on {r['machine']['cpu']} (python {r['machine']['python']}, torch "
        f"{r['machine']['torch']}), in a fresh process.", "",
        "| measure | value |", "|---|---|",
        f"| peak RSS of the conversion process | {r['peak_rss_mb']:.0f} MB |",
        f"| baseline (same interpreter, same imports, no work) | {r['baseline_rss_mb']:.0f} MB |",
        f"| held by the conversion (peak - baseline) | {r['conversion_rss_mb']:.0f} MB |",
        f"| largest LLM shard written | {r['largest_written_shard_mb']:.0f} MB |",
        f"| held / largest shard | {r['ratio_to_largest_shard']:.2f} (goal <= 1.5) |",
        f"| LLM size | {r['llm_gb']} GB: never held whole |",
        f"| wall time | {r['seconds']:.1f} s |", "",
        "Reproduce: `allspark bench convert` (writes this file and its JSON).", ""])


def add_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("--out", default="docs/benchmarks/convert.json", help="JSON; the .md summary is written beside it")
    s.add_argument("--hidden", type=at_least(64), default=2048)
    s.add_argument("--layers", type=at_least(2), default=18, help="18 layers of width 2048 pass 2 GB in fp16")
    s.add_argument("--vocab", type=at_least(8), default=32000)
    s.add_argument("--source-shard", default="1GB", help="shard size of the generated LLM directory")
    s.add_argument("--shard-mb", type=at_least(1), default=1024, help="largest LLM shard the conversion writes")
