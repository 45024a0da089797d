"""Compiled generation: prefill, then one jit-compiled `lax.while_loop` over decoding steps.

TransformerLens generates in a Python loop and cannot capture activations while it does. Here
the whole decode (sampling, stop tokens, KV-cache writes, hooks, captured activations) is one
XLA program. Compiled programs are cached per bucketed shape: batch, prompt length and
`max_new_tokens` are rounded up (padding rows, extra left padding, a loop bound that is a
traced value under a static buffer size), so a new prompt of a similar size reuses the
program. Sampling takes an explicit PRNG key; step `s` draws with `fold_in(key, s)`.

Layout: the prompt (left-padded) is prefilled but for its last token; step `s` feeds one token
(the last prompt token, then new token `s-1`) and samples new token `s`. Activations captured
at step `s` are those of that fed position, so a captured activation has the shape the same
hook has in `run_with_cache`, with the position axis running over the generation steps, and
equals `run_with_cache(output)` at positions `prompt_len - 1 + s`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from jaxlens.fingerprint import compiled_or_eager, retry_static
from jaxlens.config import ModelConfig
from jaxlens.hooks import SCORE_HOOKS, Hooks, pos_axis
from jaxlens.model.forward import is_scanned
from jaxlens.generation.kv_cache import KVCache, check_cache, forward_cached
from jaxlens.generation.stopping import HostStop, ask_host
from jaxlens.tokens import check_tokens
from jaxlens.validate import check_key


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------

def filter_logits(logits: jax.Array, temperature: jax.Array | float = 1.0, top_k: int | None = None,
                  top_p: jax.Array | float | None = None) -> jax.Array:
    """Logits [.. vocab] divided by temperature, with tokens outside top-k / top-p set to -inf.

    Order as HF's warpers: temperature, then top-k, then top-p. top-k keeps every token tied
    with the k-th largest logit. top-p keeps the smallest set of most likely tokens whose
    probability reaches `top_p` (always at least one), again keeping ties at the threshold.
    Sampling `softmax` of the result is what `sample_logits` does.
    """
    x = logits.astype(jnp.float32) / jnp.asarray(temperature, jnp.float32)
    neg = jnp.asarray(-jnp.inf, jnp.float32)
    if top_k is not None:
        k = min(int(top_k), x.shape[-1])
        kth = jax.lax.top_k(x, k)[0][..., -1:]
        x = jnp.where(x >= kth, x, neg)
    if top_p is not None:
        srt = -jnp.sort(-x, axis=-1)  # descending
        probs = jax.nn.softmax(srt, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
        keep = before < jnp.asarray(top_p, jnp.float32)
        n_keep = jnp.maximum(keep.sum(axis=-1, keepdims=True), 1)
        threshold = jnp.take_along_axis(srt, n_keep - 1, axis=-1)
        x = jnp.where(x >= threshold, x, neg)
    return x


@dataclass(frozen=True)
class Sampler:
    """The static part of a sampling rule: greedy or not, top-k, whether top-p applies.

    Temperature and the top-p value are traced, so changing them does not recompile.
    """

    greedy: bool = True
    top_k: int | None = None
    use_top_p: bool = False
    use_freq_penalty: bool = False
    use_repetition_penalty: bool = False


def first_argmax(logits: jax.Array) -> jax.Array:
    """`jnp.argmax(logits, -1)` as int32 (the first maximum; the first NaN if any), as a max and a
    min-reduction: XLA:CPU's variadic argmax reduce is scalar, 3x slower over a 50k vocabulary
    (1 ms of a 27 ms batch-8 decode step)."""
    top = logits.max(-1, keepdims=True)  # NaN if the row has one
    hit = (logits == top) | jnp.isnan(logits)
    iota = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    return jnp.min(jnp.where(hit, iota, logits.shape[-1]), axis=-1)


def sample_logits(logits: jax.Array, key: jax.Array, sampler: Sampler, temperature: jax.Array | float = 1.0,
                  top_p: jax.Array | float = 1.0, freq_penalty: jax.Array | float = 0.0,
                  counts: jax.Array | None = None, repetition_penalty: jax.Array | float = 1.0,
                  seen: jax.Array | None = None) -> jax.Array:
    """Next tokens [batch] int32 from last-position logits [batch vocab].

    With `sampler.use_repetition_penalty`, HF's and TransformerLens's repetition penalty first,
    greedy decoding included: the logit of every token in `seen` [batch vocab] (bool: it occurs in
    the row so far) is divided by the penalty when positive, multiplied by it when not.
    With `sampler.use_freq_penalty`, TransformerLens's frequency penalty: `logits / temperature
    - freq_penalty * counts` (counts [batch vocab]: occurrences of each token so far) before
    top-k / top-p. Greedy decoding ignores it, as TransformerLens's `sample_logits` does.
    """
    if sampler.use_repetition_penalty:
        x, rp = logits.astype(jnp.float32), jnp.asarray(repetition_penalty, jnp.float32)
        logits = jnp.where(seen, jnp.where(x > 0, x / rp, x * rp), x)
    if sampler.greedy:
        return first_argmax(logits)
    x = logits.astype(jnp.float32) / jnp.asarray(temperature, jnp.float32)
    if sampler.use_freq_penalty:
        x = x - jnp.asarray(freq_penalty, jnp.float32) * counts.astype(jnp.float32)
    x = filter_logits(x, 1.0, sampler.top_k, top_p if sampler.use_top_p else None)
    return jax.random.categorical(key, x, axis=-1).astype(jnp.int32)


def token_counts(tokens: jax.Array, mask: jax.Array, vocab: int) -> jax.Array:
    """[batch vocab] int32: how often each token occurs among a row's real (mask 1) tokens."""
    rows = jnp.broadcast_to(jnp.arange(tokens.shape[0])[:, None], tokens.shape)
    return jnp.zeros((tokens.shape[0], vocab), jnp.int32).at[rows, tokens].add(mask.astype(jnp.int32))


# ---------------------------------------------------------------------------------------------
# The compiled loop
# ---------------------------------------------------------------------------------------------

class GenerateOutput(NamedTuple):
    """What `generate_tokens` returns (a pytree).

    tokens: [batch prompt+max_new] the prompt as given, then the generated tokens; a row that
      stopped holds pad after its stop token, and columns past `n_steps` hold pad.
    attention_mask: same shape; the prompt's mask, then 1 for every column < prompt + n_steps.
    n_steps: scalar, decoding steps run (fewer than max_new_tokens when every row stopped).
    finished: [batch] bool, the row emitted a stop token.
    acts: {hook name: activation} captured at every step, the position axis running over steps
      (e.g. resid [batch step d_model], pattern [batch head step key]); the key axis of
      patterns/scores runs over the cached prefix (if a kv_cache was given) and then the
      returned tokens' columns.
    logits: [batch step vocab] when asked for, else None.
    kv_cache: the cache after the last step (it holds every token but the last one sampled).
    """

    tokens: jax.Array
    attention_mask: jax.Array
    n_steps: jax.Array
    finished: jax.Array
    acts: dict[str, jax.Array]
    logits: jax.Array | None
    kv_cache: KVCache


def _write(buf: jax.Array, x: jax.Array, step: jax.Array, axis: int) -> jax.Array:
    """Write one position (axis size 1) of `x` into `buf` at `step` along `axis`."""
    idx = [jnp.zeros((), jnp.int32)] * buf.ndim
    idx[axis] = step
    return jax.lax.dynamic_update_slice(buf, x.astype(buf.dtype), tuple(idx))


@retry_static(eager=False)  # generate_tokens runs a storing hook's call eagerly, at its exact shapes
@partial(jax.jit, static_argnames=("cfg", "sampler", "n_buf", "cache_len", "capture", "precision", "return_logits",
                                   "host_stop"))
def _generate_core(params, cfg: ModelConfig, tokens, mask, cache: KVCache | None, n_new, key, temperature, top_p,
                   pad_id, eos, hooks: Hooks, freq_penalty=0.0, repetition_penalty=1.0, seen_mask=None,
                   stop_handle=0, *, sampler: Sampler, n_buf: int, cache_len: int, capture: frozenset[str],
                   precision: str | None, return_logits: bool, host_stop: bool = False):
    """Prefill all but the last prompt token, then decode up to `n_new` (<= n_buf) tokens.

    `eos` [n] int32 are the stop tokens (n = 0: never stop early). Without `cache`, an empty one
    of `cache_len` slots is made here (inside the program: no separate allocation to compile).
    With `sampler.use_freq_penalty`, per-row token counts (prompt's real tokens, then each new
    one) are carried through the loop for `sample_logits`; with `sampler.use_repetition_penalty`,
    which tokens each row holds (the prompt's columns where `seen_mask` is 1, then each new one).
    With `host_stop`, after every step the host's criteria registered under `stop_handle`
    (`stopping.HostStop`) say which rows are done, from the tokens so far and the step's logits.
    """
    batch, p = tokens.shape
    if cache is None:
        cache = KVCache.init(cfg, batch, cache_len, params["W_E"].dtype)
    run = partial(forward_cached, params, cfg, hooks=hooks, precision=precision)
    if p > 1:
        _, _, cache = run(tokens[:, :-1], mask[:, :-1], cache)

    # shapes without the hooks (they cannot change them): an eager run's storing hooks must
    # see only concrete steps, never this abstract one
    step_shape = jax.eval_shape(lambda c: forward_cached(params, cfg, tokens[:, -1:], mask[:, -1:], c, hooks=Hooks(),
                                                         precision=precision, capture=capture), cache)
    logits_sd, acts_sd, _ = step_shape

    def grow(sd: jax.ShapeDtypeStruct, axis: int) -> jax.Array:
        shape = list(sd.shape)
        shape[axis] = n_buf
        return jnp.zeros(shape, sd.dtype)

    acts0 = {n: grow(sd, pos_axis(n)) for n, sd in acts_sd.items()}
    logits0 = grow(logits_sd, 1) if return_logits else None
    stops = eos.shape[0] > 0 or host_stop

    def cond(state):
        step, done = state[0], state[3]
        go = step < n_new
        return go & ~jnp.all(done) if stops else go

    def body(state):
        step, cur, cur_mask, done, out, cache, acts, logits_buf, counts, seen = state
        logits, step_acts, cache = run(cur[:, None], cur_mask[:, None], cache, capture=capture)
        nxt = sample_logits(logits[:, 0], jax.random.fold_in(key, step), sampler, temperature, top_p,
                            freq_penalty, counts, repetition_penalty, seen)
        if stops:
            nxt = jnp.where(done, pad_id, nxt)
            done = done | jnp.isin(nxt, eos)
        if counts is not None:
            counts = counts.at[jnp.arange(batch), nxt].add(1)
        if seen is not None:
            seen = seen.at[jnp.arange(batch), nxt].set(True)
        out = jax.lax.dynamic_update_slice(out, nxt[:, None], (jnp.zeros((), jnp.int32), step))
        if host_stop:
            done = io_callback(ask_host, jax.ShapeDtypeStruct((batch,), jnp.bool_), stop_handle, out, step,
                               logits[:, 0], done, ordered=True)
        acts = {n: _write(acts[n], step_acts[n], step, pos_axis(n)) for n in acts}
        if return_logits:
            logits_buf = _write(logits_buf, logits, step, 1)
        return step + 1, nxt, jnp.ones_like(cur_mask), done, out, cache, acts, logits_buf, counts, seen

    done0 = mask.sum(axis=1) == 0  # batch-padding rows (no prompt) never hold up an early stop
    counts0 = token_counts(tokens, mask, cfg.d_vocab) if sampler.use_freq_penalty else None
    seen0 = token_counts(tokens, seen_mask, cfg.d_vocab) > 0 if sampler.use_repetition_penalty else None
    state = (jnp.zeros((), jnp.int32), tokens[:, -1], mask[:, -1], done0,
             jnp.full((batch, n_buf), pad_id, jnp.int32),
             cache if is_scanned(params) else cache.split(), acts0, logits0, counts0, seen0)  # see KVCache.split
    n_steps, _, _, done, out, cache, acts, logits, _, _ = jax.lax.while_loop(cond, body, state)
    cache = cache.stacked()
    gen_mask = (jnp.arange(n_buf) < n_steps).astype(mask.dtype)
    return GenerateOutput(jnp.concatenate([tokens, out], axis=1),
                          jnp.concatenate([mask, jnp.broadcast_to(gen_mask, (batch, n_buf))], axis=1),
                          n_steps, done, acts, logits, cache)


def compile_count() -> int:
    """How many programs the generation loop has compiled so far (for tests and tuning)."""
    return _generate_core._cache_size()


# ---------------------------------------------------------------------------------------------
# The functional entry point
# ---------------------------------------------------------------------------------------------

def bucket(n: int, minimum: int = 1) -> int:
    """Round a size up to a compile bucket: a power of two up to 64, then a multiple of 64."""
    n = max(int(n), minimum)
    if n <= 64:
        return 1 << (n - 1).bit_length()
    return -(-n // 64) * 64


def _check_args(max_new_tokens: Any, temperature: Any, top_k: Any, top_p: Any) -> None:
    if not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not np.isfinite(float(temperature)) or float(temperature) < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and not (0.0 < float(top_p) <= 1.0):
        raise ValueError(f"top_p must be in (0, 1] (or None for no nucleus filtering), got {top_p!r}")


def _eos_tuple(eos_token_id: int | Sequence[int] | None, cfg: ModelConfig) -> tuple[int, ...]:
    ids = eos_token_id if eos_token_id is not None else cfg.eos_token_id
    if ids is None:
        raise ValueError("stop_at_eos=True but no eos_token_id is known for this model; pass eos_token_id=... "
                         "or stop_at_eos=False")
    ids = (ids,) if isinstance(ids, (int, np.integer)) else tuple(ids)
    if not ids or any(not (0 <= int(i) < cfg.d_vocab) for i in ids):
        raise ValueError(f"eos_token_id {eos_token_id!r} must be token id(s) in [0, {cfg.d_vocab})")
    return tuple(sorted(set(int(i) for i in ids)))


def generate_tokens(params: dict[str, Any], cfg: ModelConfig, tokens: Any, attention_mask: Any = None, *,
                    max_new_tokens: int, key: jax.Array | None = None, temperature: float = 0.0,
                    top_k: int | None = None, top_p: float | None = None, stop_at_eos: bool = True,
                    eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
                    capture: frozenset[str] = frozenset(), hooks: Hooks = Hooks(), kv_cache: KVCache | None = None,
                    max_len: int | None = None, return_logits: bool = False, precision: str | None = None,
                    bucket_shapes: bool = True, freq_penalty: float = 0.0,
                    repetition_penalty: float = 1.0, stopping_criteria: Sequence[Any] = (),
                    on_step: Callable[[np.ndarray, np.ndarray], bool] | None = None) -> GenerateOutput:
    """Generate `max_new_tokens` after left-padded prompts `tokens` [batch pos] (mask 0 = padding).

    temperature 0 is greedy (argmax); otherwise sampling from `filter_logits` needs an explicit
    `key`, and `freq_penalty` > 0 subtracts `freq_penalty * count` of every token so far in the
    row (its real prompt tokens and the generated ones; a `kv_cache` prefix is not counted) from
    the temperature-scaled logits, as TransformerLens does. `repetition_penalty` != 1 is HF's and
    TransformerLens's (greedy too): every token the row holds so far, its prompt columns padding
    included as theirs, has its logit divided by the penalty if positive, else multiplied.
    With `stop_at_eos`, a row stops after
    emitting one of `eos_token_id` (default the model's) and is padded with `pad_token_id`
    (default the model's pad, else the first EOS).
    `stopping_criteria` (`stopping.resolve_criteria`): after every step each is asked
    `criterion(input_ids, scores)` with the running rows (prompt then new tokens) and the step's
    logits; a row it says is done stops and is padded after its last token, as for EOS.
    `on_step(tokens, done)` hears each step's new tokens [batch] and done rows [batch] on the
    host as the loop runs (`generate_stream`); returning True stops every row.
    `capture` (from `resolve_names`) and `hooks` act at every step, prefill included.
    `kv_cache` continues from a cached prefix (a batch-1 cache is forked to the batch); else a
    cache of `max_len` slots (default: the bucketed prompt plus new tokens) is made.
    Returns a `GenerateOutput` with the prompt's original width and batch.
    """
    _check_args(max_new_tokens, temperature, top_k, top_p)
    if not np.isfinite(float(freq_penalty)) or float(freq_penalty) < 0:
        raise ValueError(f"freq_penalty must be a finite number >= 0 (0: no penalty), got {freq_penalty!r}")
    if isinstance(repetition_penalty, bool) or not np.isfinite(float(repetition_penalty)) or float(repetition_penalty) <= 0:
        raise ValueError(f"repetition_penalty must be a finite number > 0 (1: no penalty), got {repetition_penalty!r}")
    flat = sorted(n for n in capture if pos_axis(n) is None)
    if flat:
        raise ValueError(f"{flat[0]} cannot be captured step by step: MoE router hooks hold the routed tokens "
                         "flattened [batch*pos ...]; read them with run_with_cache over the output (or "
                         "generate(return_cache=True))")
    if key is not None:
        check_key(key)
    toks, mask = check_tokens(tokens, cfg, attention_mask)
    batch, p = toks.shape
    if p + max_new_tokens > cfg.n_ctx:  # one rule for every positional scheme, as run_with_cache's
        raise ValueError(f"prompt of {p} tokens + max_new_tokens={max_new_tokens} exceeds the model's context "
                         f"n_ctx={cfg.n_ctx} (the output must fit it, as run_with_cache requires); lower "
                         "max_new_tokens or shorten the prompt")
    if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, (int, np.integer))
                                or not 1 <= max_len <= cfg.n_ctx):
        raise ValueError(f"max_len={max_len!r} must be an int in 1..n_ctx={cfg.n_ctx}: a longer cache can never be "
                         "filled within the model's context")
    empty = np.flatnonzero(mask.sum(axis=1) == 0)
    if empty.size:
        raise ValueError(f"prompt row(s) {empty.tolist()} have no real tokens (attention_mask all 0); "
                         "every prompt needs at least one token (e.g. BOS)")
    if not mask[:, -1].all():
        rows = np.flatnonzero(mask[:, -1] == 0).tolist()
        raise ValueError(f"prompt row(s) {rows} end in padding: generation needs left-padded prompts "
                         "(padding_side='left'), so every row's last column is a real token")
    greedy = float(temperature) == 0.0
    if not greedy and key is None:
        raise ValueError("sampling needs an explicit PRNG key: pass key=jax.random.key(0) "
                         "(or temperature=0 for greedy decoding)")
    eos = _eos_tuple(eos_token_id, cfg) if stop_at_eos else ()
    criteria = tuple(stopping_criteria)
    pad = pad_token_id if pad_token_id is not None else (cfg.pad_token_id if cfg.pad_token_id is not None
                                                          else (eos[0] if eos else None))
    if pad is None and criteria and cfg.eos_token_id is not None:
        pad = _eos_tuple(None, cfg)[0]
    if pad is None:
        if criteria and batch > 1:
            raise ValueError("stopping criteria on a batch need a token to pad the rows that stop, and this model "
                             "knows no pad or EOS token: pass pad_token_id=..., stop_at_eos=True with eos_token_id, "
                             "or one prompt at a time")
        pad = 0
    if not 0 <= int(pad) < cfg.d_vocab:
        raise ValueError(f"pad_token_id {pad} is outside the vocabulary [0, {cfg.d_vocab})")

    if kv_cache is not None:
        if max_len is not None:
            raise ValueError("max_len sizes the cache generate makes; with kv_cache= the cache's own max_len "
                             f"({kv_cache.max_len}) applies: pass one or the other")
        if kv_cache.batch_size == 1 and batch > 1:
            kv_cache = kv_cache.fork(batch)
        check_cache(kv_cache, cfg, batch, p + max_new_tokens - 1)
    elif max_len is not None and max_len < p + max_new_tokens - 1:
        raise ValueError(f"max_len={max_len} is too small: a {p}-token prompt and {max_new_tokens} new tokens "
                         f"need {p + max_new_tokens - 1} cache slots")
    sampler = Sampler(greedy, None if greedy else top_k, (not greedy) and top_p is not None,
                      (not greedy) and float(freq_penalty) > 0, float(repetition_penalty) != 1.0)

    def launch(bucketed: bool, handle: np.int32) -> GenerateOutput:
        """The loop at bucketed shapes (compiled, reused across similar sizes) or exact ones (an
        eager run, which compiles nothing, so its storing hooks see the call's own shapes)."""
        b_pad, p_pad, n_buf = batch, p, max_new_tokens
        if kv_cache is not None:
            if bucketed and int(kv_cache.length) + p + bucket(max_new_tokens) - 1 <= kv_cache.max_len:
                n_buf = bucket(max_new_tokens)
            cache_len, cached = kv_cache.max_len, int(kv_cache.length)
        else:
            if bucketed:
                b_pad, p_pad, n_buf = bucket(batch), bucket(p, 8), bucket(max_new_tokens, 8)
            need = p_pad + n_buf - 1
            if max_len is not None:
                if max_len < need:  # no room for bucket padding: use the exact shapes
                    p_pad, n_buf = p, max_new_tokens
                need = max_len
            cache_len, cached = need, 0
        left = p_pad - p
        toks_b = np.full((b_pad, p_pad), pad, np.int32)
        mask_b = np.zeros((b_pad, p_pad), np.int32)
        toks_b[:batch, left:], mask_b[:batch, left:] = toks, mask
        seen_b = np.zeros((b_pad, p_pad), np.int32)
        seen_b[:batch, left:] = 1  # the prompt's own columns (its padding too, as HF's input_ids), not the buckets'
        # inputs go in as numpy and outputs are cut on the host or in one jitted `_trim`: eager jnp
        # ops would each compile a small program of their own on the first call of every shape
        out = _generate_core(params, cfg, toks_b, mask_b, kv_cache, np.int32(max_new_tokens),
                             _default_key() if key is None else key, np.float32(1.0 if greedy else temperature),
                             np.float32(1.0 if top_p is None else top_p), np.int32(pad), np.asarray(eos, np.int32),
                             hooks, np.float32(freq_penalty), np.float32(repetition_penalty), seen_b, handle,
                             sampler=sampler, n_buf=n_buf, cache_len=cache_len, capture=capture, precision=precision,
                             return_logits=return_logits, host_stop=host.needed)
        cols = slice(left, p_pad + max_new_tokens)
        tokens_h, mask_h, n_steps, finished = jax.device_get((out.tokens, out.attention_mask, out.n_steps,
                                                              out.finished))
        keys = (0, cached + p + max_new_tokens) if kv_cache is not None else (left, p_pad + max_new_tokens)
        acts, logits, cache_out = out.acts, out.logits, out.kv_cache
        if acts or logits is not None or b_pad != batch:
            acts, logits, cache_out = _trim(acts, logits, cache_out, batch=batch, steps=max_new_tokens, keys=keys)
        put = jax.device_put  # (jnp.asarray would compile a copy program per shape)
        return GenerateOutput(put(tokens_h[:batch, cols]), put(mask_h[:batch, cols]), put(n_steps),
                              put(finished[:batch]), acts, logits, cache_out)

    host = HostStop(criteria, toks, on_step)
    with host.active() as handle:  # the criteria answer the loop's callbacks meanwhile
        return compiled_or_eager(lambda: launch(bucket_shapes, handle), lambda: launch(False, handle))


@partial(jax.jit, static_argnames=("batch", "steps", "keys"))
def _trim(acts: dict[str, jax.Array], logits: jax.Array | None, cache: KVCache, *, batch: int, steps: int,
          keys: tuple[int, int]) -> tuple[dict[str, jax.Array], jax.Array | None, KVCache]:
    """Drop the bucket padding: extra rows, extra steps, and key columns outside the output."""
    def act(name: str, a: jax.Array) -> jax.Array:
        a = jax.lax.slice_in_dim(a[:batch], 0, steps, axis=pos_axis(name))
        return a[..., keys[0]:keys[1]] if name.endswith(SCORE_HOOKS) else a

    cache = KVCache(cache.keys[:, :batch], cache.values[:, :batch], cache.mask[:batch], cache.length)
    return ({n: act(n, a) for n, a in acts.items()}, None if logits is None else logits[:batch, :steps], cache)


def _default_key() -> jax.Array:
    """The key passed when none is needed (greedy): made once, so it costs no compile per call."""
    global _KEY
    if _KEY is None:
        _KEY = jax.random.key(0)
    return _KEY


_KEY: jax.Array | None = None
_WARNED_KEY = False


def _warn_default_key() -> None:
    """Say once per process that sampling fell back to the fixed default key."""
    global _WARNED_KEY
    if not _WARNED_KEY:
        _WARNED_KEY = True
        warnings.warn("generate: sampling without key= uses jax.random.key(0), so the same call samples the same "
                      "tokens; pass key=jax.random.key(seed) for other draws", stacklevel=4)


# ---------------------------------------------------------------------------------------------
# TransformerLens-style entry point (HookedTransformer.generate)
# ---------------------------------------------------------------------------------------------

RETURN_TYPES = ("input", "str", "tokens")


def _check_output_args(return_type: str, padding_side: str | None) -> None:
    """generate's and generate_stream's `return_type` and `padding_side`, checked before any work."""
    if return_type not in RETURN_TYPES:
        raise ValueError(f"return_type must be one of {RETURN_TYPES}, got {return_type!r}")
    if padding_side not in (None, "left", "right"):
        raise ValueError(f"padding_side must be None, 'left' or 'right', got {padding_side!r}")


def generate(model: Any, input: Any, max_new_tokens: int = 10, *, stop_at_eos: bool = True,
             eos_token_id: int | Sequence[int] | None = None, do_sample: bool = True, top_k: int | None = None,
             top_p: float | None = None, temperature: float = 1.0, freq_penalty: float = 0.0,
             repetition_penalty: float = 1.0, use_past_kv_cache: bool = True, key: jax.Array | None = None,
             prepend_bos: bool | None = None,
             padding_side: str | None = None, attention_mask: Any = None, return_type: str = "input",
             verbose: bool = True, output_logits: bool = False, return_cache: bool = False,
             return_input_tokens: bool = False, names_filter: Any = None, fwd_hooks: Any = None,
             kv_cache: KVCache | None = None, max_len: int | None = None, stop_strings: str | Sequence[str] | None = None,
             stopping_criteria: Any = None, on_step: Callable[[np.ndarray, np.ndarray], bool] | None = None) -> Any:
    """`HookedTransformer.generate`: TransformerLens's signature, one compiled loop.

    input: a string, a list of strings (left-padded into a batch, whatever `padding_side` says,
    as TransformerLens forces for generation) or token ids [pos] / [batch pos] (with
    `attention_mask` for left padding). do_sample=False (or temperature 0) is greedy. Sampling
    without `key` uses `jax.random.key(0)` and warns once: the same call gives the same text.
    freq_penalty: TransformerLens's frequency penalty (see `generate_tokens`); greedy ignores it.
    repetition_penalty: HF's and TransformerLens's (see `generate_tokens`); greedy applies it.
    use_past_kv_cache: accepted; False gives the same tokens (the loop always uses its KV cache).
    verbose: accepted and ignored (the loop is one XLA program: no per-step progress bar).
    return_type "input" gives text for text input and tokens for tokens; "str" decodes (special
    tokens skipped; one row gives a string, more a list, as TransformerLens 4); "tokens" gives
    [batch prompt+new] ids. Columns after
    the last step any row ran are dropped.
    output_logits (TransformerLens 4 / HF): return a `GenerateLogitsOutput` (`.sequences`, the
    tokens; `.logits`, one [batch vocab] array of the model's logits per step run) instead.
    return_cache (TransformerLens 4): also return `run_with_cache` over the output, its mask the
    prompt's extended over the generated columns, restricted by `names_filter`.
    return_input_tokens: also return the prompt tokens fed to the model (after BOS handling).
    Tuples are (output, cache, input_tokens), leaving out what was not asked for.
    names_filter without return_cache (jaxlens): also return {hook: activation over the generated
    steps} (see `GenerateOutput.acts`), an `ActivationCache` whose position axis runs over the steps.
    fwd_hooks: TransformerLens-style hooks applied at every step (prefill included).
    stop_strings (TransformerLens 4 / HF): a row stops once its text ends with one of them
    (HF's StopStringCriteria matching, `stopping.StopStrings`; needs the tokenizer).
    stopping_criteria (TransformerLens 4 / HF): a callable or a list, asked after every step as
    `criterion(input_ids, scores)` with the running rows and the step's logits, returning a bool
    per row (or one); transformers' StoppingCriteria get torch tensors, other callables numpy.
    Either stops a row as EOS does (stop_at_eos or not); the loop stays compiled, asking them
    through a host callback.
    on_step (jaxlens): see `generate_tokens`; `generate_stream` streams through it.
    """
    from jaxlens.cache.activation_cache import ActivationCache
    from jaxlens.generation.stopping import resolve_criteria
    from jaxlens.hooks import make_hooks, resolve_names
    from jaxlens.tokens import is_text, parse_input

    _check_output_args(return_type, padding_side)
    if key is None and do_sample and float(temperature) > 0:
        key = _default_key()
        _warn_default_key()
    criteria = resolve_criteria(stop_strings, stopping_criteria, model.tokenizer)
    toks, mask = parse_input(model.tokenizer, input, model.cfg, attention_mask, prepend_bos, "left")
    per_step = names_filter is not None and not return_cache
    capture = resolve_names(names_filter, model.cfg) if per_step else frozenset()
    tok = model.tokenizer
    eos = eos_token_id
    if stop_at_eos and eos is None and model.cfg.eos_token_id is None and tok is not None:
        eos = tok.eos_token_id
    pad = model.cfg.pad_token_id
    if pad is None and tok is not None:
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = generate_tokens(model.params, model.cfg, toks, mask, max_new_tokens=max_new_tokens, key=key,
                          temperature=temperature if do_sample else 0.0, top_k=top_k, top_p=top_p,
                          stop_at_eos=stop_at_eos, eos_token_id=eos, pad_token_id=pad, capture=capture,
                          hooks=make_hooks(fwd_hooks, model.cfg), kv_cache=kv_cache, max_len=max_len,
                          precision=model.precision, freq_penalty=freq_penalty,
                          repetition_penalty=repetition_penalty, return_logits=output_logits,
                          stopping_criteria=criteria, on_step=on_step)
    n_steps = int(out.n_steps)
    width = out.tokens.shape[1] - max_new_tokens + n_steps
    tokens_h = np.asarray(out.tokens)[:, :width]  # cut on the host: no program per output width
    tokens_out = jax.device_put(tokens_h)
    if return_type == "str" or (return_type == "input" and is_text(input)):
        if tok is None:
            raise ValueError("return_type='str' needs a tokenizer; this model has none: use return_type='tokens'")
        rows = tokens_h
        keep = np.asarray(out.attention_mask)[:, :width].astype(bool)
        texts = [tok.decode(r[k].tolist(), skip_special_tokens=True) for r, k in zip(rows, keep)]
        result: Any = texts[0] if len(texts) == 1 else texts  # one row: a string, as TransformerLens 4
    else:
        result = tokens_out
    if output_logits:  # as TransformerLens 4, in place of the output of any return_type
        logits = np.asarray(out.logits)
        result = GenerateLogitsOutput(tokens_out, tuple(jax.device_put(logits[:, i]) for i in range(n_steps)))
    extra: list[Any] = []
    if return_cache:
        mask_out = np.asarray(out.attention_mask)[:, :width]
        extra.append(model.run_with_cache(tokens_out, names_filter=names_filter, attention_mask=mask_out)[1])
    elif per_step:
        unused = max_new_tokens - n_steps  # trailing columns no row reached: dropped from steps and keys

        def trim(name: str, a: jax.Array) -> jax.Array:
            a = jax.lax.slice_in_dim(a, 0, n_steps, axis=pos_axis(name))
            return a[..., : a.shape[-1] - unused] if name.endswith(SCORE_HOOKS) else a

        acts = out.acts if unused == 0 else {n: trim(n, a) for n, a in out.acts.items()}
        extra.append(ActivationCache(acts, model.cfg, True, model.cache_weights()))
    if return_input_tokens:
        extra.append(jax.device_put(np.asarray(toks)))
    return (result, *extra) if extra else result


def generate_stream(model: Any, input: Any = "", max_new_tokens: int = 10, max_tokens_per_yield: int = 25, *,
                    prepend_bos: bool | None = None, padding_side: str | None = None, attention_mask: Any = None,
                    return_type: str = "input", **kwargs: Any) -> Iterator[Any]:
    """`HookedTransformer.generate_stream` (TransformerLens 4): `generate`'s tokens, yielded as
    the compiled loop makes them.

    The first yield holds the prompt and the first new tokens, prompt included in the count of
    `max_tokens_per_yield`; each later yield at most `max_tokens_per_yield` new tokens [batch n];
    the last whatever is left when every row has stopped (or `max_new_tokens` ran). With
    return_type "str" (or "input" for text) each yield is the new text (a string for one row, a
    list for more), a character whose bytes are not all generated yet held back to the next.
    Joined, the yields are `generate(..., return_type="tokens")`'s output, token for token: the
    same program runs (in a worker thread), its per-step host callback feeding this generator.
    The loop runs at most one yield ahead of the reader: a consumer that stops reading holds it
    at that step (no work past what it may still read). Closing the generator, or dropping the
    last reference to it, stops the loop at its next step. Other arguments: `generate`'s.
    """
    import queue
    import threading

    from jaxlens.tokens import is_text, parse_input

    if isinstance(max_tokens_per_yield, bool) or not isinstance(max_tokens_per_yield, (int, np.integer)) \
            or max_tokens_per_yield < 1:
        raise ValueError(f"max_tokens_per_yield must be an int >= 1, got {max_tokens_per_yield!r}")
    return_type = "tokens" if return_type is None else return_type  # TransformerLens: None yields tokens
    _check_output_args(return_type, padding_side)
    for name in ("output_logits", "return_cache", "return_input_tokens", "names_filter"):
        if kwargs.get(name):
            raise ValueError(f"generate_stream yields tokens only: {name} is generate's; call generate for it")
    as_text = return_type == "str" or (return_type == "input" and is_text(input))
    tok = model.tokenizer
    if as_text and tok is None:
        raise ValueError("return_type='str' needs a tokenizer; this model has none: use return_type='tokens'")
    toks, mask = parse_input(tok, input, model.cfg, attention_mask, prepend_bos, "left")
    # Bounded: the loop's callback waits while a yield's worth of steps is unread, so an idle reader
    # holds the loop instead of letting it run to max_new_tokens; `closed` releases any wait.
    steps: queue.Queue = queue.Queue(maxsize=max_tokens_per_yield)
    closed = threading.Event()

    def send(item: tuple[str, Any]) -> None:
        """Queue item for the reader, waiting for room; dropped once the reader has gone."""
        while not closed.is_set():
            try:
                steps.put(item, timeout=0.05)
                return
            except queue.Full:
                pass

    def on_step(tokens: np.ndarray, done: np.ndarray) -> bool:
        send(("step", tokens))
        return closed.is_set()

    def work() -> None:
        try:
            generate(model, toks, max_new_tokens, attention_mask=mask, return_type="tokens", on_step=on_step,
                     **kwargs)
            send(("end", None))
        except BaseException as e:  # noqa: BLE001 - raised again in the consumer's thread
            send(("error", e))

    worker = threading.Thread(target=work, name="jaxlens-generate-stream", daemon=True)
    worker.start()
    history = np.asarray(toks)
    emitted = [0] * history.shape[0]

    def delta(hold: bool) -> Any:
        out = []
        for i, row in enumerate(history):  # the whole row each time: a character split over yields stays whole
            text = tok.decode(row.tolist(), skip_special_tokens=True)
            text = text.rstrip("\ufffd") if hold else text
            out.append(text[emitted[i]:])
            emitted[i] = len(text)
        return out[0] if len(out) == 1 else out

    chunk: list[np.ndarray] = []
    pending = history.shape[1]  # the prompt counts toward the first yield, as in TransformerLens
    first = True

    def emit() -> Any:
        nonlocal history, chunk, pending, first
        new = np.stack(chunk, 1) if chunk else np.zeros((history.shape[0], 0), np.int32)
        history = np.concatenate([history, new], 1)
        piece = np.concatenate([np.asarray(toks), new], 1) if first else new
        chunk, pending, first = [], 0, False
        return delta(hold=True) if as_text else jax.device_put(piece)

    try:
        while True:
            kind, value = steps.get()
            if kind == "error":
                raise value
            if kind == "end":
                break
            chunk.append(value)
            pending += 1
            if pending >= max_tokens_per_yield:
                yield emit()
        if chunk:
            yield emit()
        if as_text:
            rest = delta(hold=False)
            if any(rest) if isinstance(rest, list) else rest:
                yield rest
    finally:
        closed.set()
        worker.join()


@dataclass(frozen=True)
class GenerateLogitsOutput:
    """`generate(output_logits=True)`: HF's GenerateDecoderOnlyOutput fields, read as attributes
    or keys: `sequences` [batch prompt+new] and `logits`, one [batch vocab] array per step run."""

    sequences: jax.Array
    logits: tuple[jax.Array, ...]

    def __getitem__(self, key: str | int) -> Any:
        return getattr(self, key) if isinstance(key, str) else (self.sequences, self.logits)[key]

__all__ = ["filter_logits", "first_argmax", "Sampler", "sample_logits", "token_counts", "GenerateOutput",
           "GenerateLogitsOutput", "compile_count",
           "bucket", "generate_tokens", "RETURN_TYPES", "generate", "generate_stream"]
