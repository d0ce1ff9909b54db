"""The in-process runtime: route every modality's request through a build's components.

    prepare_row (pipeline) -> encoder -> bridge -> [bridge tokens ; prompt embeddings]
      -> decoder (the row's adapter set) -> head | the decode loop -> to_prediction (pipeline)

A batch may mix modalities: encoders and bridges run once per modality, then every row shares one
decoder call (left padding, positions from the mask, `adapter_ids` per row). A bad request fails
alone with its own typed error. Component and tensor names come from the manifest (its routes and
KV-cache names); the backend is any registered one (`allspark.runtime.backend`). `Runtime` is safe
to call from many threads.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..contract import tensors as C
from ..contract.integrity import verify_files
from ..contract.manifest import SYNTHETIC_KEY, decoder_cache, read_manifest, require_modality, routes
from ..errors import AllSparkError, ConfigError, InputError, NumericsError
from ..model.config import AllSparkConfig, normalize_modality
from ..model.generation import GenerationConfig, beam_width, generate
from ..model.pipeline import Prediction, Row, padding, prepare_row, stack, to_prediction
from ..model.registry import resolve_modality, spec
from ..model.tokenizer import RuntimeTokenizer
from .backend import Backend, load_backend
from .decoding import DecodeState, DeviceDecoding, DeviceStages, host_arrays, host_state, rounded_max_len

log = logging.getLogger(__name__)


@dataclass
class Request:
    modality: str
    inputs: dict[str, Any]
    prompt: str | None = None


class _Timer:
    def __init__(self) -> None:
        self.ms: dict[str, float] = {}

    def add(self, stage: str, t0: float) -> float:
        now = time.perf_counter()
        self.ms[stage] = self.ms.get(stage, 0.0) + 1e3 * (now - t0)
        return now


def _mark(bad: dict[int, str], rows: Sequence[int], x: Any, stage: str) -> None:
    """Record `stage` for every row of `x` (batch first, one per entry of `rows`) with a NaN or inf
    (`x` a host array, or a device tensor: then only the per-row flags leave the device)."""
    if isinstance(x, np.ndarray):
        finite = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    else:
        finite = x.reshape(len(x), -1).isfinite().all(dim=1).cpu().numpy()
    for i, ok in zip(rows, finite):
        if not ok:
            bad.setdefault(i, stage)


def _cat(parts: list[Any]) -> Any:
    """Concatenate host arrays, or device tensors where they lie."""
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts)
    import torch

    return torch.cat([p.to(parts[0].dtype) for p in parts])


def _zeros(shape: tuple[int, ...], like: Sequence[Any]) -> Any:
    """Zeros where and of the dtype `like` lie (host arrays: their common dtype, so an fp16 build's
    embeddings reach the decoder as fp16, not through a float32 round trip)."""
    if isinstance(like[0], np.ndarray):
        return np.zeros(shape, np.result_type(*(x.dtype for x in like)))
    import torch

    return torch.zeros(shape, dtype=like[0].dtype, device=like[0].device)


class Runtime:
    def __init__(self, manifest: dict, backend: Backend, tokenizer, build: Path, max_positions: int | None = None):
        self.manifest, self.backend, self.tokenizer, self.build = manifest, backend, tokenizer, build
        self.config = AllSparkConfig.from_dict(manifest["config"])
        self.modalities = tuple(manifest["modalities"])
        self.routes = routes(manifest)
        self.adapter_index = {m: r.adapter_index for m, r in self.routes.items()}
        self.cache = decoder_cache(manifest)
        past = {t["name"]: t for t in manifest["components"][C.DECODER_COMPONENT]["inputs"]}[self.cache.past[0]]
        self.kv_shape = (int(past["dims"][1]), int(past["dims"][3]))  # (kv_heads, head_dim) of one layer's past
        self._tok_lock = threading.Lock()  # HF fast tokenizers are not re-entrant across threads
        self.default_generation = GenerationConfig()
        # the decode loop's cache stays on the backend's device (allspark.runtime.decoding)
        self.device_resident = isinstance(backend, DeviceDecoding) and bool(getattr(backend, "device_resident", False))
        limit = self.config.llm.max_position_embeddings
        if max_positions is not None and not (isinstance(max_positions, int) and 1 <= max_positions <= limit):
            raise ConfigError(f"max_positions: expected an integer in 1..{limit} (the model's "
                              f"max_position_embeddings), got {max_positions!r}")
        # a device-resident generation whose prompt + new tokens would pass this runs on the host path
        self.max_positions = max_positions or limit

    @classmethod
    def load(cls, build: str | Path, backend: str = "onnxruntime", verify: bool = True,
             max_positions: int | None = None, **options: Any) -> "Runtime":
        """A build on a registered backend; `options` are the backend's (onnxruntime: providers,
        threads, spin; torch: checkpoint, device, compile). Every file the build names is checked to
        lie inside it and, unless `verify=False` (a deployment that verified it once), to match its
        recorded sha256 (hashed once per file version; see `allspark.contract.integrity`).
        `max_positions`: the longest a device-resident (static cache) generation may grow, below the
        model's max_position_embeddings to bound its cache; longer ones run on host arrays."""
        build = Path(build)
        manifest = read_manifest(build)
        verify_files(build, manifest, hashes=verify)
        if not manifest.get("tokenizer"):
            raise AllSparkError(f"{build}: the build has no tokenizer; re-export from a checkpoint with one")
        if manifest.get(SYNTHETIC_KEY):
            log.warning("%s has synthetic weights (filled from a skeleton): for timing only, its answers mean nothing",
                        build)
        be = load_backend(backend, build, manifest, **options)
        return cls(manifest, be, RuntimeTokenizer.load(build / manifest["tokenizer"]), build, max_positions)

    # ---- public API ---------------------------------------------------------------------------
    def predict(self, modality: str, inputs: dict[str, Any], prompt: str | None = None,
                generation: GenerationConfig | None = None) -> Prediction:
        result = self.predict_batch([Request(modality, inputs, prompt)], generation)[0]
        if isinstance(result, Exception):
            raise result
        return result

    def generate(self, modality: str, inputs: dict[str, Any], prompt: str | None = None,
                 config: GenerationConfig | None = None) -> Prediction:
        p = self.predict(modality, inputs, prompt, config or self.default_generation)
        if p.text is None:
            raise InputError(modality, "modality", "a generation modality (language, code)", "a head modality")
        return p

    def check_max_new_tokens(self, modality: str, n: int) -> int:
        """The one bound on a generation's length, checked where a request enters (here, the
        scheduler, the serving models): 1 .. the build's maximum positions."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= self.config.llm.max_position_embeddings:
            raise InputError(modality, "max_new_tokens", f"1..{self.config.llm.max_position_embeddings} (the build's maximum positions)",
                             repr(n))
        return int(n)

    def detokenize(self, tokens: Sequence[int]) -> str:
        """Token ids -> text, special tokens skipped (the tokenizer is shared across threads)."""
        with self._tok_lock:
            return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    def predict_batch(self, requests: Sequence[Request], generation: GenerationConfig | None = None
                      ) -> list[Prediction | AllSparkError]:
        timer = _Timer()
        t0 = time.perf_counter()
        gen = generation or self.default_generation
        results: list[Prediction | AllSparkError | None] = [None] * len(requests)
        prepared: list[tuple[int, Row]] = []
        for i, r in enumerate(requests):
            try:
                row = self._prepare(r)
                if self.routes[row.modality].head is None:  # it generates: bounded before any graph runs
                    self.check_max_new_tokens(row.modality, gen.max_new_tokens)
                prepared.append((i, row))
            except AllSparkError as e:  # this request alone fails
                results[i] = e
            except Exception as e:  # whatever a malformed request trips over: still its failure alone
                results[i] = InputError(str(getattr(r, "modality", "<request>")), "<request>",
                                        "a request the runtime can prepare", f"{type(e).__name__}: {e}")
        timer.add("preprocess", t0)
        if prepared:
            outs = self._run([p for _, p in prepared], timer, gen)
            for (i, _), out in zip(prepared, outs):
                results[i] = out
        total = sum(timer.ms.values())
        for r in results:
            if isinstance(r, Prediction):
                r.timings_ms = {**timer.ms, "total": total}
        return results  # type: ignore[return-value]

    # ---- stages -------------------------------------------------------------------------------
    def _prepare(self, r: Request) -> Row:
        m = normalize_modality(r.modality)
        if m not in self.adapter_index:
            require_modality(self.manifest, resolve_modality(r.modality), self.build)  # unknown, or not exported
        return prepare_row(spec(m), self.config.modality(m), self.tokenizer, r.inputs, r.prompt,
                           self.config.max_prompt_tokens, self._tok_lock)

    def _run(self, rows: list[Row], timer: _Timer, gen: GenerationConfig) -> list[Prediction | AllSparkError]:
        """Every row through the graph; a row whose values stop being finite at some stage gets a
        NumericsError naming that stage instead of an answer (rows never mix, so others are unharmed)."""
        bad: dict[int, str] = {}  # row -> first stage that produced a non-finite value
        feed, out = self.prefill(rows, timer, bad, on_device=self.device_resident)
        t = time.perf_counter()
        last = out.hidden[:, -1]  # (B, H): left padding puts every row's last token here
        _mark(bad, range(len(rows)), last, "decoder")
        preds: list[Prediction | AllSparkError | None] = [None] * len(rows)
        for m in dict.fromkeys(r.modality for r in rows if self.routes[r.modality].head is not None):
            idx = [i for i, r in enumerate(rows) if r.modality == m]
            y = self.backend.head(self.routes[m].head, np.ascontiguousarray(last[idx]))
            _mark(bad, idx, y, "head")
            for i, yi in zip(idx, y):
                if i not in bad:
                    preds[i] = p = to_prediction(spec(m), self.config.modality(m), yi, rows[i].context)
                    if p.values is not None:
                        _mark(bad, [i], np.asarray(p.values, np.float64)[None], "postprocess")
        t = timer.add("head", t)
        gen_idx = [i for i, p in enumerate(preds) if p is None and i not in bad]
        if gen_idx:
            first = out.logits[:, -1]
            _mark(bad, gen_idx, first[gen_idx], "decoder")
            gen_idx = [i for i in gen_idx if i not in bad]
        if gen_idx:
            present, out = out.present, out._replace(present=[])  # _generate frees it once copied
            texts = self._generate(gen_idx, rows, out.logits[:, -1], feed, present, gen)
            for i, toks in zip(gen_idx, texts):
                preds[i] = Prediction(rows[i].modality, text=self.detokenize(toks).strip(), tokens=toks)
            timer.add("generate", t)
        for i, stage in bad.items():
            preds[i] = NumericsError(rows[i].modality, stage)
        return preds  # type: ignore[return-value]

    def prepare(self, request: Request) -> Row:
        """A request validated, preprocessed and tokenized (typed errors name what is wrong)."""
        return self._prepare(request)

    def prefill(self, rows: list[Row], timer: _Timer | None = None, bad: dict[int, str] | None = None,
                on_device: bool = False) -> tuple[dict[str, np.ndarray], Any]:
        """Encoders, bridges, prompt embeddings and one decoder call over `rows` (left-padded):
        (the decoder's feed, its output: logits and hidden state of the last position only). Rows
        whose values stop being finite are recorded in `bad`. `on_device` (a device-resident
        backend): the output's cache stays on the device."""
        timer = timer or _Timer()
        bad = {} if bad is None else bad
        stages = on_device and isinstance(self.backend, DeviceStages)  # stage outputs stay on the device
        bridged = self._encode_and_bridge(rows, timer, bad, stages)
        t = time.perf_counter()
        prompts = self._embed([r.prompt_ids for r in rows], stages)
        t = timer.add("embed", t)
        seqs = [_cat([bridged[i], p]) if i in bridged else p for i, p in enumerate(prompts)]
        feed = self._left_pad(seqs, [self.adapter_index[r.modality] for r in rows])
        out = self.backend.prefill_on_device(feed) if on_device else self.backend.decode(feed, last=True)  # type: ignore[attr-defined]
        timer.add("decoder", t)
        return feed, out

    def _encode_and_bridge(self, rows: list[Row], timer: _Timer, bad: dict[int, str],
                           on_device: bool = False) -> dict[int, Any]:
        """Bridge tokens per row with an encoder: host arrays, or (`on_device`, a `DeviceStages`
        backend) device tensors that never left the device between encoder, bridge and decoder."""
        be: Any = self.backend
        encode, bridge = (be.encode_on_device, be.bridge_on_device) if on_device else (be.encode, be.bridge)
        bridged: dict[int, Any] = {}
        for m in dict.fromkeys(r.modality for r in rows if self.routes[r.modality].encoder is not None):
            route = self.routes[m]
            idx = [i for i, r in enumerate(rows) if r.modality == m]
            t = time.perf_counter()
            media = encode(route.encoder, stack([rows[i] for i in idx]))
            _mark(bad, idx, media, "encoder")
            t = timer.add("encoder", t)
            tokens = bridge(route.bridge, media)
            _mark(bad, idx, tokens, "bridge")
            for i, b in zip(idx, tokens):
                bridged[i] = b
            timer.add("bridge", t)
        return bridged

    def _embed(self, id_lists: list[list[int]], on_device: bool = False) -> list[Any]:
        L = max(len(x) for x in id_lists)
        ids = np.zeros((len(id_lists), L), dtype=np.int64)
        for i, x in enumerate(id_lists):
            ids[i, L - len(x):] = x
        emb = self.backend.embed_on_device(ids) if on_device else self.backend.embed(ids)  # type: ignore[attr-defined]
        return [emb[i, L - len(x):] for i, x in enumerate(id_lists)]

    def _left_pad(self, seqs: list[Any], adapter_ids: list[int]) -> dict[str, Any]:
        """The decoder's feed; `inputs_embeds` stays where `seqs` lie (host, or device)."""
        mask, pos = padding([len(s) for s in seqs])
        B, T, H = len(seqs), mask.shape[1], seqs[0].shape[1]
        emb = _zeros((B, T, H), seqs)
        for i, s in enumerate(seqs):
            emb[i, T - len(s):] = s
        feed = {C.INPUTS_EMBEDS: emb, C.ATTENTION_MASK: mask, C.POSITION_IDS: pos,
                C.ADAPTER_IDS: np.asarray(adapter_ids, np.int64)}
        empty = np.zeros((B, self.kv_shape[0], 0, self.kv_shape[1]), np.float32)  # prefill: an empty past
        feed.update({n: empty for n in self.cache.past})
        return feed

    def _generate(self, idx: list[int], rows: list[Row], first: np.ndarray, feed: dict,
                  present: list[Any], gen: GenerationConfig) -> list[list[int]]:
        sel = np.repeat(np.asarray(idx), beam_width(gen))  # rows (x beams) that generate
        mask, pos, ids = feed[C.ATTENTION_MASK][sel], feed[C.POSITION_IDS][sel, -1:], feed[C.ADAPTER_IDS][sel]
        state = self.decode_state(present, sel, mask, pos, ids, gen.max_new_tokens)
        present.clear()  # the state holds what it needs: the prefill's whole cache can go
        eos = None if gen.ignore_eos else self.tokenizer.eos_token_id
        try:
            return generate(first[sel], state.step, gen, eos, prompts=[rows[i].prompt_ids for i in sel])
        finally:
            state.close()

    def decode_state(self, cache: list[Any], rows: np.ndarray, mask: np.ndarray, pos: np.ndarray, ids: np.ndarray,
                     max_new_tokens: int, owners: Sequence[Any] | None = None,
                     budgets: Sequence[int] | None = None) -> DecodeState:
        """The decode state (`allspark.runtime.decoding`) for `rows` of a prefill's `cache` (`prefill`'s
        output, with `on_device=self.device_resident`), its attention mask, last positions and adapter
        ids: on the device plane where the backend keeps the cache on its device and the generation
        fits `max_positions`, else on the host plane. `owners`, `budgets`: a scheduler's streams, one per
        row, and the tokens each may still take (what a device workspace's columns are sized for)."""
        max_len = rounded_max_len(mask.shape[1] + max_new_tokens, self.max_positions) if self.device_resident else None
        if max_len is None:  # host arrays: the CPU path, and a device generation longer than the model's positions
            state: DecodeState = host_state(self.backend, self.cache.past, host_arrays(cache, rows), mask, pos, ids)
        else:
            state = self.backend.start_generation(cache, rows, mask, pos, ids, max_len, self.max_positions)  # type: ignore[attr-defined]
        if owners is not None:
            state.claim(owners, budgets)
        return state
