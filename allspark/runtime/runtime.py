"""The in-process runtime: route every modality's request through a build's components.

    preprocess (registry) -> encoder -> bridge -> [bridge tokens ; prompt embeddings]
      -> decoder (the row's adapter set) -> head | generation loop -> postprocess

A batch may mix modalities: encoders and bridges run once per modality, then every row shares one
decoder call (left padding, positions from the mask, `adapter_ids` per row). A bad request fails
alone with its own typed error. `Runtime` is safe to call from many threads.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import AllSparkError, InputError
from ..export.manifest import read_manifest
from ..export.specs import past_names
from ..model.config import AllSparkConfig, HeadKind, ModalityConfig
from ..model.registry import ModalitySpec, build_question, resolve_modality, spec
from ..model.tokenizer import encode_prompt, load_tokenizer
from .backends import OrtBackend, TorchBackend
from .generation import GenerationConfig, Strategy, generate


@dataclass
class Request:
    modality: str
    inputs: dict[str, Any]
    prompt: str | None = None


@dataclass
class Prediction:
    modality: str
    label: str | None = None  # classification
    scores: dict[str, float] | None = None  # classification: probability per label
    values: np.ndarray | None = None  # regression, in the task's real units and shape
    text: str | None = None  # generation
    tokens: list[int] | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"modality": self.modality}
        for k in ("label", "scores", "text", "tokens"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        if self.values is not None:
            d["values"] = np.asarray(self.values).tolist()
        d["timings_ms"] = {k: round(v, 3) for k, v in self.timings_ms.items()}
        return d


@dataclass
class _Prepared:
    modality: str
    spec: ModalitySpec
    mc: ModalityConfig
    tensors: dict[str, np.ndarray]
    prompt_ids: list[int]
    context: dict[str, Any]


class _Timer:
    def __init__(self) -> None:
        self.ms: dict[str, float] = {}

    def add(self, stage: str, t0: float) -> float:
        now = time.perf_counter()
        self.ms[stage] = self.ms.get(stage, 0.0) + 1e3 * (now - t0)
        return now


class Runtime:
    def __init__(self, manifest: dict, backend, tokenizer, build: Path):
        self.manifest, self.backend, self.tokenizer, self.build = manifest, backend, tokenizer, build
        self.config = AllSparkConfig.from_dict(manifest["config"])
        self.modalities = tuple(manifest["modalities"])
        self.adapter_index = dict(manifest["adapter_index"])
        llm = self.config.llm
        self._kv = (llm.num_kv_heads, llm.head_dim)
        self._past_names = past_names(llm.num_layers, "past")
        self._tok_lock = threading.Lock()  # HF fast tokenizers are not re-entrant across threads
        self.default_generation = GenerationConfig()

    @classmethod
    def load(cls, build: str | Path, backend: str = "onnxruntime", providers: Sequence[str] | None = None,
             threads: int = 0, checkpoint: str | Path | None = None, device: str = "cpu",
             compile: bool = False, spin: bool = True) -> "Runtime":
        build = Path(build)
        manifest = read_manifest(build)
        if backend == "onnxruntime":
            be = OrtBackend(build, manifest, providers=providers, threads=threads, spin=spin)
        elif backend == "torch":
            be = TorchBackend(manifest, checkpoint=checkpoint, device=device, compile=compile)
        else:
            raise AllSparkError(f"backend: expected 'onnxruntime' or 'torch', got {backend!r}")
        if not manifest.get("tokenizer"):
            raise AllSparkError(f"{build}: the build has no tokenizer; re-export from a checkpoint with one")
        return cls(manifest, be, load_tokenizer(build / manifest["tokenizer"]), build)

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

    def predict_batch(self, requests: Sequence[Request], generation: GenerationConfig | None = None
                      ) -> list[Prediction | AllSparkError]:
        timer = _Timer()
        t0 = time.perf_counter()
        results: list[Prediction | AllSparkError | None] = [None] * len(requests)
        prepared: list[tuple[int, _Prepared]] = []
        for i, r in enumerate(requests):
            try:
                prepared.append((i, self._prepare(r)))
            except AllSparkError as e:  # this request alone fails
                results[i] = e
        timer.add("preprocess", t0)
        if prepared:
            outs = self._run([p for _, p in prepared], timer, generation or self.default_generation)
            for (i, _), out in zip(prepared, outs):
                results[i] = out
        total = sum(timer.ms.values())
        for r in results:
            if isinstance(r, Prediction):
                r.timings_ms = {**timer.ms, "total": total}
        return results  # type: ignore[return-value]

    # ---- stages -------------------------------------------------------------------------------
    def _prepare(self, r: Request) -> _Prepared:
        m = resolve_modality(r.modality).value
        if m not in self.adapter_index:
            from ..errors import UnknownModalityError
            raise UnknownModalityError(m, self.modalities)
        s, mc = spec(m), self.config.modality(m)
        x = s.schema(mc).validate(m, r.inputs)
        tensors, ctx = s.preprocess(mc, x)
        with self._tok_lock:
            ids = encode_prompt(self.tokenizer, build_question(s.modality, mc, r.prompt, ctx))
        if len(ids) > self.config.max_prompt_tokens:
            raise InputError(m, "prompt" if s.has_encoder else "text",
                             f"at most {self.config.max_prompt_tokens} tokens", f"{len(ids)} tokens")
        return _Prepared(m, s, mc, {k: v.numpy() for k, v in tensors.items()}, ids, ctx)

    def _run(self, rows: list[_Prepared], timer: _Timer, gen: GenerationConfig) -> list[Prediction]:
        bridged = self._encode_and_bridge(rows, timer)
        t = time.perf_counter()
        prompts = self._embed([r.prompt_ids for r in rows])
        t = timer.add("embed", t)
        seqs = [np.concatenate([bridged[i], p]) if i in bridged else p for i, p in enumerate(prompts)]
        feed = self._left_pad(seqs, [self.adapter_index[r.modality] for r in rows])
        logits, hidden, present = self.backend.decode(feed)
        t = timer.add("decoder", t)
        last = hidden[:, -1]  # (B, H): left padding puts every row's last token here
        preds: list[Prediction] = [Prediction(r.modality) for r in rows]
        for m in dict.fromkeys(r.modality for r in rows if r.spec.head != HeadKind.GENERATION):
            idx = [i for i, r in enumerate(rows) if r.modality == m]
            out = self.backend.head(m, np.ascontiguousarray(last[idx]))
            for i, y in zip(idx, out):
                self._postprocess(rows[i], y, preds[i])
        t = timer.add("head", t)
        gen_idx = [i for i, r in enumerate(rows) if r.spec.head == HeadKind.GENERATION]
        if gen_idx:
            texts = self._generate(gen_idx, rows, logits[:, -1], feed, present, gen)
            for i, toks in zip(gen_idx, texts):
                preds[i].tokens = toks
                with self._tok_lock:
                    preds[i].text = self.tokenizer.decode(toks, skip_special_tokens=True).strip()
            timer.add("generate", t)
        return preds

    def _encode_and_bridge(self, rows: list[_Prepared], timer: _Timer) -> dict[int, np.ndarray]:
        bridged: dict[int, np.ndarray] = {}
        for m in dict.fromkeys(r.modality for r in rows if r.spec.has_encoder):
            idx = [i for i, r in enumerate(rows) if r.modality == m]
            t = time.perf_counter()
            stacked = {k: np.concatenate([rows[i].tensors[k] for i in idx]) for k in rows[idx[0]].tensors}
            media = self.backend.encode(m, stacked)
            t = timer.add("encoder", t)
            for i, b in zip(idx, self.backend.bridge(m, media)):
                bridged[i] = b
            timer.add("bridge", t)
        return bridged

    def _embed(self, id_lists: list[list[int]]) -> list[np.ndarray]:
        L = max(len(x) for x in id_lists)
        ids = np.zeros((len(id_lists), L), dtype=np.int64)
        for i, x in enumerate(id_lists):
            ids[i, L - len(x):] = x
        emb = self.backend.embed(ids)
        return [emb[i, L - len(x):] for i, x in enumerate(id_lists)]

    def _left_pad(self, seqs: list[np.ndarray], adapter_ids: list[int]) -> dict[str, np.ndarray]:
        B, T, H = len(seqs), max(len(s) for s in seqs), seqs[0].shape[1]
        emb = np.zeros((B, T, H), np.float32)
        mask = np.zeros((B, T), np.int64)
        for i, s in enumerate(seqs):
            emb[i, T - len(s):] = s
            mask[i, T - len(s):] = 1
        pos = np.clip(mask.cumsum(-1) - 1, 0, None)
        feed = {"inputs_embeds": emb, "attention_mask": mask, "position_ids": pos,
                "adapter_ids": np.asarray(adapter_ids, np.int64)}
        empty = np.zeros((B, self._kv[0], 0, self._kv[1]), np.float32)
        feed.update({n: empty for n in self._past_names})
        return feed

    def _postprocess(self, row: _Prepared, y: np.ndarray, pred: Prediction) -> None:
        if row.spec.head in (HeadKind.CLASSIFICATION, HeadKind.PIXEL_CLASSIFICATION):
            p = np.exp(y - y.max())
            p /= p.sum()
            pred.label = row.mc.labels[int(y.argmax())]
            pred.scores = {lab: float(v) for lab, v in zip(row.mc.labels, p)}
        else:
            pred.values = row.spec.postprocess(row.mc, y.astype(np.float32), row.context)

    def _generate(self, idx: list[int], rows: list[_Prepared], first: np.ndarray, feed: dict,
                  present: list[np.ndarray], gen: GenerationConfig) -> list[list[int]]:
        K = gen.num_beams if gen.strategy == Strategy.BEAM else 1
        sel = np.repeat(np.asarray(idx), K)  # rows (x beams) that generate
        state = {"mask": feed["attention_mask"][sel], "pos": feed["position_ids"][sel, -1:],
                 "ids": feed["adapter_ids"][sel], "past": [p[sel] for p in present]}

        def step(tokens: np.ndarray, reorder: np.ndarray | None) -> np.ndarray:
            if reorder is not None:  # beam search: follow each beam's parent
                state["past"] = [p[reorder] for p in state["past"]]
            state["mask"] = np.concatenate([state["mask"], np.ones((len(tokens), 1), np.int64)], 1)
            state["pos"] = state["pos"] + 1
            f = {"inputs_embeds": self.backend.embed(tokens[:, None]), "attention_mask": state["mask"],
                 "position_ids": state["pos"], "adapter_ids": state["ids"],
                 **dict(zip(self._past_names, state["past"]))}
            logits, _, state["past"] = self.backend.decode(f)
            return logits[:, -1]

        eos = None if gen.ignore_eos else self.tokenizer.eos_token_id
        return generate(first[sel], step, gen, eos, prompts=[rows[i].prompt_ids for i in sel])
