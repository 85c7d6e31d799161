"""The notebook-friendly entry point: `dsv4jax.load(...)` returns a `Model` with `logits` and `generate`."""

from __future__ import annotations

import math
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv4jax.config import ConfigError, ModelConfig, load_config
from dsv4jax.model import DeepseekV4, init_state
from dsv4jax.run import Runner
from dsv4jax.tokenizer import load_tokenizer

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "dsv4-tiny"
_BUCKET = 64


def _bucket(n: int) -> int:
    """Round a length up to a multiple of 64 so that shapes, and compilations, repeat."""
    return max(_BUCKET, -(-n // _BUCKET) * _BUCKET)


class Model:
    """A loaded DeepSeek-V4: parameters split once from the NNX module, plus its tokenizer."""

    def __init__(self, model: DeepseekV4, name: str, tokenizer=None):
        self.config: ModelConfig = model.config
        self.name = name
        self.module = model
        self.graphdef, self.params = nnx.split(model)
        self.tokenizer = tokenizer or load_tokenizer(None, self.config.vocab_size)

    def encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            return [self.config.bos_token_id] + self.tokenizer.encode(prompt)
        ids = [int(t) for t in prompt]
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.config.vocab_size})")
        if not ids:
            raise ValueError("a prompt needs at least one token")
        return ids

    def _batch(self, prompts) -> tuple[list[list[int]], bool]:
        single = isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], (int, np.integer)))
        batch = [self.encode(p) for p in ([prompts] if single else prompts)]
        if not batch:
            raise ValueError("no prompts given")
        return batch, single

    def _padded(self, batch: list[list[int]], extra: int):
        longest = max(len(s) for s in batch)
        if longest + extra > self.config.max_position_embeddings:
            raise ValueError(f"prompt ({longest} tokens) + {extra} new tokens exceeds max_position_embeddings "
                             f"({self.config.max_position_embeddings})")
        width = _bucket(longest)
        ids = np.zeros((len(batch), width), np.int32)
        for row, seq in enumerate(batch):
            ids[row, :len(seq)] = seq
        lengths = np.array([len(s) for s in batch], np.int32)
        state = init_state(self.config, len(batch), _bucket(longest + extra))
        return jnp.asarray(ids), jnp.asarray(lengths), state

    def logits(self, prompts) -> np.ndarray | list[np.ndarray]:
        """All-position fp32 logits: [S, V] for one prompt (text or ids), a list of those for a batch."""
        batch, single = self._batch(prompts)
        ids, lengths, state = self._padded(batch, 0)
        logits, _, _ = self.runner().forward(self.params, state, ids, lengths)
        logits = np.asarray(logits)
        out = [logits[row, :len(seq)] for row, seq in enumerate(batch)]
        return out[0] if single else out

    def runner(self, mesh=None, kernels: str = "auto") -> Runner:
        """The runner that carries this model's calls to the devices (dsv4jax/run.py), cached per mesh (None: one
        device; or a spec such as "cp=2,tp=2,ep=2" over all devices) and kernel choice."""
        key = (str(mesh), kernels)
        runners = self.__dict__.setdefault("_runners", {})
        if key not in runners:
            runners[key] = Runner(self.graphdef, mesh, kernels=kernels)
        return runners[key]

    def engine(self, mesh=None, kernels: str = "auto", **settings):
        """A serving engine (dsv4jax.serve) over this model, cached per settings (an `EngineConfig`'s fields),
        mesh and kernel choice (see `runner`)."""
        from dsv4jax.serve.engine import Engine, EngineConfig

        key = (str(mesh), kernels, tuple(sorted(settings.items())))
        engines = self.__dict__.setdefault("_engines", {})
        if key not in engines:
            engines[key] = Engine(self, EngineConfig(**settings), runner=self.runner(mesh, kernels))
        return engines[key]

    def generate(self, prompts, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, stop_at_eos: bool = True, speculative_steps: int = 0,
                 mesh=None):
        """Continue each prompt through the engine; returns text for text prompts and token ids for id prompts.

        Row i samples with seed + i; `speculative_steps` > 0 drafts with the MTP head (same greedy output);
        `mesh` spreads the model over devices (see `engine`)."""
        from dsv4jax.serve.sampling import SamplingParams

        if max_new_tokens < 0 or temperature < 0 or not 0 < top_p <= 1:
            raise ValueError("need max_new_tokens ≥ 0, temperature ≥ 0 and 0 < top_p ≤ 1")
        batch, single = self._batch(prompts)
        longest = max(len(s) for s in batch)
        if longest + max_new_tokens > self.config.max_position_embeddings:
            raise ValueError(f"prompt ({longest} tokens) + {max_new_tokens} new tokens exceeds max_position_embeddings "
                             f"({self.config.max_position_embeddings})")
        if max_new_tokens == 0:
            outputs = [[] for _ in batch]
        else:
            # Shapes repeat across calls: batch rounded to a power of two, lengths to multiples of 64 and pages.
            rows = 1 << (len(batch) - 1).bit_length()
            page = math.lcm(*[r for r in self.config.compress_ratios if r] or [1])
            length = _bucket(longest + max_new_tokens)
            engine = self.engine(mesh=mesh, max_running_requests=rows, max_model_len=-(-length // page) * page,
                                 page_tokens=page, prefill_chunk=_bucket(min(longest, 256)), prefill_buckets=(),
                                 max_prefill_rows=rows, decode_buckets=(rows,), prefill_row_buckets=(rows,),
                                 speculative_steps=speculative_steps, prompt_logprobs=False)
            params = [SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                     seed=seed + row, ignore_eos=not stop_at_eos) for row in range(len(batch))]
            outputs = [c.token_ids for c in engine.generate(batch, params)]
        results = [self.tokenizer.decode(tokens) if isinstance(prompt, str) else tokens
                   for prompt, tokens in zip([prompts] if single else prompts, outputs)]
        return results[0] if single else results


def load(path_or_config: str | os.PathLike | ModelConfig | None = None, dtype: str | None = None,
         seed: int = 0, progress: bool = True) -> Model:
    """Load a model: a checkpoint directory, a config (file, directory without weights, or `ModelConfig`,
    giving random weights), or, with no argument, the default model shipped in the repository."""
    from dsv4jax.checkpoint.loader import load_model
    from dsv4jax.checkpoint.safetensors_io import read_index

    source = DEFAULT_MODEL if path_or_config is None else path_or_config
    overrides = {"dtype": dtype} if dtype else {}
    if isinstance(source, ModelConfig):
        config = source.replace(**overrides)
        return Model(DeepseekV4(config, nnx.Rngs(seed)), name="random")
    path = Path(source)
    if not path.exists():
        raise ConfigError(f"no model at {path}: give a checkpoint directory or a config.json")
    directory = path if path.is_dir() else path.parent
    has_weights = path.is_dir() and (any(path.glob("*.safetensors")))
    if has_weights:
        read_index(path)
        model = load_model(path, progress=progress, **overrides)
        return Model(model, name=path.name, tokenizer=load_tokenizer(path, model.config.vocab_size))
    config = load_config(path, **overrides)
    return Model(DeepseekV4(config, nnx.Rngs(seed)), name=f"{directory.name} (random weights)",
                 tokenizer=load_tokenizer(directory, config.vocab_size))
