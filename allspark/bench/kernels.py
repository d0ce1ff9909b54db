"""Benchmark of the fused attention at AllSpark's shapes; writes JSON and prints a short table.

On a CUDA machine: for each preset's shapes (bridge cross-attention, EVA self-attention, decoder
prefill) and fp16/bf16, the Triton kernel vs torch SDPA vs unfused math (matmul, softmax, matmul),
timed with CUDA events (median of `repeat` runs after warmup), with achieved TB/s, TFLOP/s and the
fraction of the device's peak.

Without a GPU: one bridge cross-attention layer (LayerNorm'd latents -> to_q, media -> to_kv,
attention, to_out) exported twice to ONNX (opset 23), once through SDPA (one fused `Attention`
node) and once through explicit MatMul/Softmax/MatMul, both run in ONNX Runtime CPU with 1 and
with the default number of intra-op threads, repetitions interleaved so drift hits both alike.

    allspark bench kernels --out docs/benchmarks/kernels.json --presets demo paper --repeat 20

On a GPU each case also times "auto" (what the runtime calls: the kernel or SDPA as the dispatch
table in `allspark.kernels.dispatch` picks) and records the pick; the report says when the table
was measured on another device. ``--write-dispatch PATH`` (GPU only) writes a new table from this
run, e.g. ``--write-dispatch allspark/kernels/attention_dispatch.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..commands import at_least
from ..errors import ConfigError
from ..kernels import dispatch
from ..kernels.op import attention, sdpa_attention
from ..model.config import AllSparkConfig
from ..model.presets import get_preset
from ..onnxrt import session

# Peak HBM bandwidth (TB/s) and dense fp16/bf16 tensor-core TFLOP/s, by device-name substring.
_PEAKS: tuple[tuple[str, float, float], ...] = (
    ("H200", 4.8, 989.0),
    ("H100 80GB HBM3", 3.35, 989.0),  # the SXM part's name in torch.cuda.get_device_name
    ("H100 SXM", 3.35, 989.0),
)
GPU_BATCH = 8  # images (bridge, EVA) or prompts (prefill) per call
CPU_BATCH = 2  # the second row is padded to show the key padding mask
CPU_WIDTH_CAP = 1024  # latent and media widths are capped so the paper preset runs in seconds


# ---- shapes ------------------------------------------------------------------------------------


def _rgb_encoder(cfg: AllSparkConfig) -> Any:
    return cfg.modality("rgb").encoder  # the EVA ViT's shapes


def preset_shapes(name: str) -> list[dict[str, Any]]:
    """Attention problems of one preset: {name, B, H, Nq, Nk, D, causal}."""
    cfg = get_preset(name)
    rgb = _rgb_encoder(cfg)
    br, llm = cfg.bridge, cfg.llm
    shapes = [dict(name=f"bridge_xattn_n{n}", B=GPU_BATCH, H=br.heads, Nq=br.num_latents, Nk=n,
                   D=br.head_dim, causal=False)
              for n in sorted({rgb.num_tokens, 197, 577})]
    shapes.append(dict(name="eva_self_attn", B=GPU_BATCH, H=rgb.heads, Nq=rgb.num_tokens,
                       Nk=rgb.num_tokens, D=rgb.width // rgb.heads, causal=False))
    seq = br.num_latents + 64  # the media's latents plus a 64-token prompt
    shapes.append(dict(name="decoder_prefill", B=GPU_BATCH, H=llm.num_heads, Nq=seq, Nk=seq,
                       D=llm.head_dim, causal=True))
    # one new token against the cache: reads K and V once, so bandwidth is the measure
    shapes += [dict(name=f"decoder_decode_n{n}", B=GPU_BATCH, H=llm.num_heads, Nq=1, Nk=n, D=llm.head_dim,
                    causal=False) for n in (512, 2048)]
    return shapes


# ---- GPU: kernel vs SDPA vs unfused math -------------------------------------------------------


def _unfused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, H, Nq, Nk)
    if causal:
        n_q, n_k = s.shape[-2:]
        keep = torch.ones(n_q, n_k, dtype=torch.bool, device=s.device).tril(n_k - n_q)
        s = s.masked_fill(~keep, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def _cuda_median_ms(fn: Callable[[], Any], repeat: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _graph_median_ms(fn: Callable[[], Any], repeat: int, per_graph: int = 10) -> float | None:
    """Median time of one call replayed from a CUDA graph holding `per_graph` calls; None where
    the call cannot be captured."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(per_graph):
                fn()
    except Exception:  # a capture failure leaves the device usable; report eager timings only
        torch.cuda.synchronize()
        return None
    return _cuda_median_ms(graph.replay, repeat) / per_graph


def _peaks(device_name: str) -> tuple[float | None, float | None]:
    for key, tbps, tflops in _PEAKS:
        if key in device_name:
            return tbps, tflops
    return None, None


def _gpu_case(shape: dict[str, Any], dtype: torch.dtype, repeat: int,
              peaks: tuple[float | None, float | None]) -> dict[str, Any]:
    B, H, n_q, n_k, D, causal = (shape[x] for x in ("B", "H", "Nq", "Nk", "D", "causal"))
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, H, n_q, D, device="cuda", dtype=dtype, generator=gen)
    k = torch.randn(B, H, n_k, D, device="cuda", dtype=dtype, generator=gen)
    v = torch.randn(B, H, n_k, D, device="cuda", dtype=dtype, generator=gen)
    impls = {
        "triton": lambda: attention(q, k, v, causal=causal, backend="triton"),
        "sdpa": lambda: sdpa_attention(q, k, v, causal=causal),
        "auto": lambda: attention(q, k, v, causal=causal),  # the runtime's path: as the table picks
        "unfused": lambda: _unfused(q, k, v, causal),
    }
    if importlib.util.find_spec("triton") is None:  # no `kernels` extra: time the others
        del impls["triton"]
    ref = impls["unfused"]().float()
    bytes_moved = (2 * B * H * n_q * D + 2 * B * H * n_k * D) * q.element_size()  # q, o, k, v once
    flops = 4 * B * H * n_q * n_k * D  # QKᵀ and PV; causal counted dense
    peak_tbps, peak_tflops = peaks
    row: dict[str, Any] = dict(shape, dtype=str(dtype).removeprefix("torch."), results={},
                               dispatch=dispatch.choose(q, k, None, causal))
    for impl, fn in impls.items():
        eager_ms = _cuda_median_ms(fn, repeat)
        graph_ms = _graph_median_ms(fn, repeat)
        # the kernel's own time: replayed from a CUDA graph (as a captured decode step runs it),
        # without the host's launch overhead, which dominates small shapes when called eagerly
        ms = graph_ms if graph_ms is not None else eager_ms
        tbps, tflops = bytes_moved / (ms * 1e-3) / 1e12, flops / (ms * 1e-3) / 1e12
        row["results"][impl] = dict(
            ms=ms, eager_ms=eager_ms, graph_ms=graph_ms, tbps=tbps, tflops=tflops,
            frac_peak_bw=None if peak_tbps is None else tbps / peak_tbps,
            frac_peak_flops=None if peak_tflops is None else tflops / peak_tflops,
            max_abs_diff_vs_unfused=(fn().float() - ref).abs().max().item())
    return row


ADAPTER_BATCHES = (1, 8, 64)  # decode rows per step


def adapter_cases(presets: Sequence[str], repeat: int, device: str = "cuda",
                  timer: Callable[[Callable[[], Any], int], float] | None = None,
                  min_programs: int | None = None) -> list[dict[str, Any]]:
    """The segmented adapter kernel (`allspark.kernels.sgmv`) at each preset's adapter shape, fp16,
    rows of one set and rows over every set, with today's tiles and with output tiles narrowed
    until the grid has `min_programs` (default: 2 per multiprocessor): ms, TB/s of the adapter
    weights read, and the largest difference between the two answers."""
    from ..kernels import sgmv

    if min_programs is None:
        min_programs = 2 * torch.cuda.get_device_properties(0).multi_processor_count if device == "cuda" else 64
    timer = timer or (lambda fn, n: _graph_median_ms(fn, n) or _cuda_median_ms(fn, n))
    dtype = torch.float16 if device == "cuda" else torch.float32  # (the CPU interpreter: fp32)
    rows = []
    for p in presets:
        cfg = get_preset(p)
        H, r, A = cfg.llm.hidden_size, cfg.llm.adapter_size, len(cfg.modalities)
        g = torch.Generator().manual_seed(0)
        mk = lambda *s: (torch.randn(*s, generator=g) * 0.02).to(device, dtype)  # noqa: E731
        down, db, up, ub = mk(A, r, H), mk(A, r), mk(A, H, r), mk(A, H)
        for n in ADAPTER_BATCHES:
            x = mk(n, H)
            for used in (1, A):
                sets = (torch.arange(n) % used).to(device)
                row: dict[str, Any] = dict(preset=p, H=H, r=r, sets_in_model=A, rows=n, sets_used=min(used, n),
                                           weight_bytes=min(used, n) * (2 * r * H + r + H) * down.element_size(),
                                           min_programs=min_programs, results={})
                outs = {}
                for label, m in (("default", 0), ("narrow", min_programs)):
                    def call(m=m):
                        return sgmv.segmented_adapter(x, sets, down, db, up, ub, capturable=True, check_sets=False,
                                                      min_programs=m)
                    outs[label] = call()
                    ms = timer(call, repeat)
                    row["results"][label] = dict(ms=ms, tbps=row["weight_bytes"] / (ms * 1e-3) / 1e12)
                row["narrow_speedup"] = row["results"]["default"]["ms"] / row["results"]["narrow"]["ms"]
                row["max_abs_diff"] = (outs["default"].float() - outs["narrow"].float()).abs().max().item()
                rows.append(row)
    return rows


def gpu_bench(presets: Sequence[str], repeat: int) -> dict[str, Any]:
    name = torch.cuda.get_device_name()
    peaks = _peaks(name)
    rows = [_gpu_case(s, dt, repeat, peaks) for p in presets for s in preset_shapes(p)
            for dt in (torch.float16, torch.bfloat16)]
    try:
        adapters: Any = adapter_cases(presets, repeat)
    except Exception as e:  # the attention cases stand on their own
        adapters = {"error": f"{type(e).__name__}: {e}"[:500]}
    triton_version = None
    if importlib.util.find_spec("triton") is not None:
        import triton

        triton_version = triton.__version__
    return dict(device=name, gpu=name, peak_tbps=peaks[0], peak_tflops=peaks[1], triton=triton_version,
                flops_counted="4*B*H*Nq*Nk*D (causal counted dense)",
                bytes_counted="q, k, v read and o written once", gpu_cases=rows,
                dispatch_table=dispatch_table_info(name), adapter_cases=adapters)


def dispatch_table_info(device: str) -> dict[str, Any]:
    """Which dispatch table "auto" used, and whether it was measured on this device."""
    table = dispatch.default_table()
    same = table.device == device
    info = dict(path=table.path, measured_on=table.device, this_device=device, same_device=same)
    if not same:
        info["note"] = (f"dispatch table measured on {table.device}, applied on {device}: its picks "
                        "may not be the faster one here; rerun with --write-dispatch to measure")
    return info


# ---- CPU: fused vs unfused ONNX Runtime graphs of one bridge cross-attention layer ----------


def _masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, media_mask: torch.Tensor,
                      fused: bool) -> torch.Tensor:
    """q (B, h, N, hd), k/v (B, h, n, hd), media_mask bool (B, n) -> (B, h, N, hd)."""
    B, _, N, hd = q.shape
    n = k.shape[2]
    # (B, 1, N, n): ONNX Runtime's Attention wants the mask's query axis spelled out.
    mask = media_mask[:, None, None, :].expand(B, 1, N, n)
    if fused:  # exports as one ONNX `Attention` node at opset 23
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    s = (q @ k.transpose(-1, -2)) * hd ** -0.5  # (B, h, N, n)
    return torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1) @ v


class BridgeCrossAttention(nn.Module):
    """One Perceiver cross-attention layer of the bridge; `fused` picks SDPA or explicit math."""

    def __init__(self, dim: int, media_dim: int, heads: int, head_dim: int, fused: bool):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim, self.fused = heads, head_dim, fused
        self.norm_media, self.norm_latents = nn.LayerNorm(media_dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(media_dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, media: torch.Tensor, latents: torch.Tensor,
                media_mask: torch.Tensor) -> torch.Tensor:
        B, n, _ = media.shape  # media (B, n, d), latents (B, N, D), media_mask bool (B, n)
        N = latents.shape[1]
        media, latents = self.norm_media(media), self.norm_latents(latents)
        q = self.to_q(latents).view(B, N, self.heads, self.head_dim).transpose(1, 2)  # (B, h, N, hd)
        k, v = self.to_kv(media).view(B, n, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        o = _masked_attention(q, k, v, media_mask, self.fused)  # (B, h, N, hd)
        return self.to_out(o.transpose(1, 2).reshape(B, N, -1))  # (B, N, D)


class AttentionOnly(nn.Module):
    """The layer's attention alone, so the projections do not hide the difference."""

    def __init__(self, fused: bool):
        super().__init__()
        self.fused = fused

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                media_mask: torch.Tensor) -> torch.Tensor:
        return _masked_attention(q, k, v, media_mask, self.fused)


def _cpu_inputs(part: str, dims: dict[str, int], n: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(n)
    mask = torch.ones(CPU_BATCH, n, dtype=torch.bool)
    mask[1:, (n + 1) // 2:] = False  # the second image has about half the tokens
    if part == "layer":
        return dict(media=torch.randn(CPU_BATCH, n, dims["media_dim"], generator=gen),
                    latents=torch.randn(CPU_BATCH, dims["num_latents"], dims["dim"], generator=gen),
                    media_mask=mask)
    h, hd = dims["heads"], dims["head_dim"]
    return dict(q=torch.randn(CPU_BATCH, h, dims["num_latents"], hd, generator=gen),
                k=torch.randn(CPU_BATCH, h, n, hd, generator=gen),
                v=torch.randn(CPU_BATCH, h, n, hd, generator=gen), media_mask=mask)


def _export(module: nn.Module, example: dict[str, torch.Tensor], path: Path) -> dict[str, int]:
    """Export with a symbolic token count; return the graph's node count per op type."""
    tokens = torch.export.Dim("num_tokens", min=2, max=4096)
    token_axis = {"media": 1, "media_mask": 1, "k": 2, "v": 2}  # every other axis is static
    dyn = {name: ({token_axis[name]: tokens} if name in token_axis else None) for name in example}
    prog = torch.onnx.export(module, tuple(example.values()), dynamo=True, opset_version=23,
                             dynamic_shapes=dyn, input_names=list(example), output_names=["out"])
    prog.save(str(path))
    import onnx  # late: only this path needs it

    return dict(Counter(node.op_type for node in onnx.load(str(path)).graph.node))


def _ort_session(path: Path, threads: int | None) -> Any:
    return session(path, threads=threads or 0)


def cpu_bench(presets: Sequence[str], repeat: int) -> dict[str, Any]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in presets:
            cfg = get_preset(preset)
            rgb = _rgb_encoder(cfg)
            dims = dict(dim=min(cfg.llm.hidden_size, CPU_WIDTH_CAP),
                        media_dim=min(rgb.width, CPU_WIDTH_CAP),
                        num_latents=cfg.bridge.num_latents, heads=cfg.bridge.heads,
                        head_dim=cfg.bridge.head_dim)
            for part in ("layer", "attention_only"):
                rows += _cpu_part(preset, part, dims, rgb.num_tokens, repeat, Path(tmp))
    return dict(device="cpu", gpu="not available", cpu_cases=rows,
                note="ONNX Runtime CPU; one bridge cross-attention layer (and its attention alone), "
                     f"widths capped at {CPU_WIDTH_CAP}; times are medians of interleaved runs")


def _cpu_modules(part: str, dims: dict[str, int]) -> dict[str, nn.Module]:
    if part == "attention_only":
        return {"fused": AttentionOnly(True).eval(), "unfused": AttentionOnly(False).eval()}
    torch.manual_seed(0)
    args = (dims["dim"], dims["media_dim"], dims["heads"], dims["head_dim"])
    fused, unfused = BridgeCrossAttention(*args, fused=True), BridgeCrossAttention(*args, fused=False)
    unfused.load_state_dict(fused.state_dict())  # same weights: outputs must agree
    return {"fused": fused.eval(), "unfused": unfused.eval()}


def _cpu_part(preset: str, part: str, dims: dict[str, int], rgb_tokens: int, repeat: int,
              tmp: Path) -> list[dict[str, Any]]:
    example = _cpu_inputs(part, dims, 197)
    paths = {kind: tmp / f"{preset}_{part}_{kind}.onnx" for kind in ("fused", "unfused")}
    ops = {kind: _export(m, example, paths[kind]) for kind, m in _cpu_modules(part, dims).items()}
    rows = []
    for threads in (1, None):
        sess = {kind: _ort_session(path, threads) for kind, path in paths.items()}
        for n in sorted({rgb_tokens, 197, 577}):
            feed = {name: t.numpy() for name, t in _cpu_inputs(part, dims, n).items()}
            outs = {kind: s.run(None, feed)[0] for kind, s in sess.items()}  # also warms up
            times: dict[str, list[float]] = {"fused": [], "unfused": []}
            for rep in range(repeat):
                for kind in ("fused", "unfused") if rep % 2 == 0 else ("unfused", "fused"):
                    t0 = time.perf_counter()
                    sess[kind].run(None, feed)
                    times[kind].append((time.perf_counter() - t0) * 1e3)
            med = {kind: statistics.median(t) for kind, t in times.items()}
            rows.append(dict(preset=preset, part=part, B=CPU_BATCH, Nq=dims["num_latents"], Nk=n,
                             H=dims["heads"], D=dims["head_dim"], dim=dims["dim"],
                             media_dim=dims["media_dim"],
                             intra_op_threads="default" if threads is None else threads,
                             fused_ms=med["fused"], unfused_ms=med["unfused"],
                             unfused_over_fused=med["unfused"] / med["fused"],
                             max_abs_diff=float(abs(outs["fused"] - outs["unfused"]).max()),
                             op_types=ops, fused_attention_nodes=ops["fused"].get("Attention", 0),
                             unfused_attention_nodes=ops["unfused"].get("Attention", 0)))
    return rows


# ---- entry points ------------------------------------------------------------------------------


def run_kernel_bench(out_path: str | Path, presets: Sequence[str] = ("demo", "paper"),
                     repeat: int = 20, write_dispatch: str | Path | None = None) -> dict[str, Any]:
    """Run the GPU or the CPU benchmark (whichever this machine can), write JSON, return it; with
    `write_dispatch`, also the attention dispatch table measured here (GPU only)."""
    if repeat < 1:
        raise ConfigError(f"repeat: expected >= 1, got {repeat}")
    if write_dispatch is not None and not torch.cuda.is_available():
        raise ConfigError("--write-dispatch: the dispatch table is measured on a CUDA GPU; none here")
    presets = tuple(presets)
    result = gpu_bench(presets, repeat) if torch.cuda.is_available() else cpu_bench(presets, repeat)
    result.update(presets=list(presets), repeat=repeat, torch=torch.__version__)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    if write_dispatch is not None:
        table = dispatch.table_from_bench(result, source=str(out_path))
        result["dispatch_written"] = str(dispatch.write_table(table, write_dispatch))
    return result


def format_table(result: dict[str, Any]) -> str:
    lines = [f"device: {result['device']}"]
    for r in result.get("gpu_cases", []):
        cells = "  ".join(f"{impl} {x['ms']:.4f} ms (eager {x.get('eager_ms', x['ms']):.4f}) {x['tbps']:.2f} TB/s "
                          f"{x['tflops']:.1f} TF/s"
                          for impl, x in r["results"].items())
        pick = f"  auto->{r['dispatch']}" if "dispatch" in r else ""
        lines.append(f"{r['name']:<22} {r['dtype']:<8} B{r['B']} H{r['H']} {r['Nq']}x{r['Nk']} "
                     f"D{r['D']}{pick}  {cells}")
    for r in result.get("adapter_cases", []) if isinstance(result.get("adapter_cases"), list) else []:
        d, nw = r["results"]["default"], r["results"]["narrow"]
        lines.append(f"adapters {r['preset']:<6} H{r['H']} r{r['r']} rows {r['rows']:<3} sets {r['sets_used']:<2} "
                     f"default {d['ms']:.4f} ms {d['tbps']:.2f} TB/s  narrow (>= {r['min_programs']} programs) "
                     f"{nw['ms']:.4f} ms {nw['tbps']:.2f} TB/s  x{r['narrow_speedup']:.2f}")
    info = result.get("dispatch_table")
    if info:
        lines.append(f"dispatch table: {info['path']} (measured on {info['measured_on']})"
                     + ("" if info["same_device"] else f"\nNOTE: {info['note']}"))
    if result.get("dispatch_written"):
        lines.append(f"wrote dispatch table {result['dispatch_written']}")
    for r in result.get("cpu_cases", []):
        lines.append(f"{r['preset']:<6} {r['part']:<15} n={r['Nk']:<4} threads={r['intra_op_threads']!s:<7} "
                     f"fused {r['fused_ms']:.3f} ms  unfused {r['unfused_ms']:.3f} ms  "
                     f"unfused/fused {r['unfused_over_fused']:.2f}  max|diff| {r['max_abs_diff']:.1e}"
                     f"  Attention nodes {r['fused_attention_nodes']}")
    return "\n".join(lines)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--out", default="docs/benchmarks/kernels.json", help="JSON file to write")
    ap.add_argument("--repeat", type=at_least(1), default=20, help="timed runs per case (median reported)")
    ap.add_argument("--presets", nargs="+", default=["demo", "paper"], help="preset names")
    ap.add_argument("--write-dispatch", metavar="PATH", default=None,
                    help="GPU only: also write the attention dispatch table measured here "
                         "(the committed one is allspark/kernels/attention_dispatch.json)")


def run(args: argparse.Namespace) -> int:
    result = run_kernel_bench(args.out, args.presets, args.repeat, getattr(args, "write_dispatch", None))
    print(format_table(result))
    print(f"wrote {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(ap)
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
