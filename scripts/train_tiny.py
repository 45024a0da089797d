"""Train the small GPT-2 that jaxlens ships, from nothing, on CPU, and export it as an HF checkpoint.

    .venv/bin/python scripts/train_tiny.py     # writes jaxlens/assets/tiny and jaxlens/assets/prompts.jsonl

About 8.5 minutes on a shared 2-core CPU (training_log.json records the time of the shipped run).
1. generates text with `jaxlens.data` (seeded) and trains a byte-level BPE tokenizer on it;
2. trains a GPT-2-architecture model with optax on jaxlens's own Flax model (`jaxlens.forward`):
   - 300 steps of repeated random tokens only, 64 rows a step: induction heads form (around
     step 250) with big batches of such rows; mixed with text, they had not formed after thousands
     of steps in our runs;
   - then packed documents, 30% random rows (the induction heads stay) and 64 short rows of one
     IOI-like sentence each, whose answer token weighs 5x in the loss. The IOI action clauses put
     the repeated name 1 to 6 tokens before the answer: the adjacent cases are learnt first and
     teach the model to avoid the name it holds, which then pulls the repeated name forward from
     further back (without them it sat at chance for 900+ steps in our runs);
3. measures it (held-out losses, IOI-like accuracy on held-out templates, induction scores) and
   exports it with `jaxlens.export.save_hf_gpt2` (config.json, model.safetensors, tokenizer files,
   training_log.json with the curve and final numbers).
Deterministic given --seed on one machine (two runs of the default command gave identical weights).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from jaxlens.apps import data  # noqa: E402
from jaxlens.config import ModelConfig  # noqa: E402
from jaxlens.apps.export import save_hf_gpt2  # noqa: E402
from jaxlens.model.forward import forward  # noqa: E402
from jaxlens.hooked import lm_loss  # noqa: E402
from jaxlens.hooks import RunCtx  # noqa: E402
from jaxlens.model import Transformer  # noqa: E402
from jaxlens.apps.probes import ioi_batch, model_induction_scores, model_ioi_scores  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SPECIAL = "<|endoftext|>"


def build_tokenizer(seed: int, vocab_size: int, n_docs: int) -> Any:
    """Byte-level BPE trained on generated text, wrapped so `AutoTokenizer.from_pretrained` loads it."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(data.corpus(seed, n_docs), vocab_size=vocab_size, min_frequency=2,
                            special_tokens=[SPECIAL], show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=SPECIAL, eos_token=SPECIAL,
                                  unk_token=SPECIAL, pad_token=SPECIAL, model_max_length=10**6)
    multi = [n for n in data.NAMES if len(tok.encode(" " + n, add_special_tokens=False)) != 1]
    if multi:
        raise ValueError(f"names {multi} are not single tokens; raise --vocab or --tok-docs")
    return tok


def portable_tokenizer_config(path: Path) -> None:
    """Name the tokenizer class `PreTrainedTokenizerFast` (transformers 5 writes its own backend
    class name), so that transformers 4 and 5 both load the folder with AutoTokenizer."""
    f = path / "tokenizer_config.json"
    conf = json.loads(f.read_text())
    conf.pop("backend", None)
    conf["tokenizer_class"] = "PreTrainedTokenizerFast"
    f.write_text(json.dumps(conf, indent=2) + "\n")


def text_docs(tok: Any, rng: np.random.Generator, answer_weight: float, kind: str | None = None,
              ioi_share: float | None = None, chunk: int = 256) -> Iterator[tuple[list[int], list[float]]]:
    """Endless tokenized training documents (of `kind`, or drawn by `data.DOC_WEIGHTS` with the IOI
    share set to `ioi_share` if given) with loss
    weights: 1, except `answer_weight` on the answer of IOI sentences (" {io}" before the final ".").
    IOI uses train templates only."""
    p = np.asarray(data.DOC_WEIGHTS)
    if ioi_share is not None:  # the IOI share replaced, the other kinds keep their proportions
        p = np.where(np.asarray(data.DOC_KINDS) == "ioi", ioi_share, p * (1 - ioi_share) / (1 - p[0]))
    while True:
        if kind is None:
            kinds = [data.DOC_KINDS[k] for k in rng.choice(len(data.DOC_KINDS), size=chunk, p=p)]
        else:
            kinds = [kind] * chunk
        texts = [data.document(rng, k) for k in kinds]
        for k, enc in zip(kinds, tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)):
            w = [1.0] * len(enc.ids)
            if k == "ioi":
                w[-2] = answer_weight
            yield enc.ids, w


Batch = tuple[tuple[np.ndarray, np.ndarray], ...]


def batches(tok: Any, cfg: ModelConfig, a: argparse.Namespace) -> Iterator[Batch]:
    """Each step's batch: groups of (tokens, weights) rows, one group per row length.

    The first `a.induction_steps` steps see repeated random tokens only (induction heads form
    quickly and reliably that way). Then: packed documents, a share `a.frac_random` of random rows
    (so the induction heads stay), and `a.ioi_rows` short rows holding one IOI sentence each.
    """
    rng = np.random.default_rng(a.seed)

    def random_rows(n: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        t, w = data.random_repeat_rows(rng, n, length, cfg.d_vocab, cfg.bos_token_id, max_span=a.max_span)
        return t, np.maximum(w, a.first_copy_weight)

    for _ in range(a.induction_steps):
        yield (random_rows(a.induction_batch, a.seq_len),)
    docs = text_docs(tok, rng, a.answer_weight, ioi_share=a.ioi_share)
    ioi_docs = text_docs(tok, rng, a.answer_weight, kind="ioi")
    n_rand = int(round(a.batch * a.frac_random))
    while True:
        t1, w1 = data.pack_rows(docs, a.batch - n_rand, a.seq_len, cfg.bos_token_id)
        t2, w2 = random_rows(n_rand, a.seq_len)
        perm = rng.permutation(a.batch)
        groups = [(np.concatenate([t1, t2])[perm], np.concatenate([w1, w2])[perm])]
        if a.ioi_rows:
            groups.append(data.single_rows(ioi_docs, a.ioi_rows, a.ioi_len, cfg.bos_token_id))
        yield tuple(groups)


def eval_sets(tok: Any, cfg: ModelConfig, seed: int, seq_len: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Fixed held-out rows per document kind (IOI from held-out templates; every token weighted 1)
    and repeated random tokens (weighted on the predictable copies)."""
    rng = np.random.default_rng(seed + 1_000_003)
    out = {}
    for kind in data.DOC_KINDS:
        if kind == "ioi":
            texts = [e.text for e in data.ioi_examples(rng, 512, "heldout")]
        else:
            texts = [data.document(rng, kind) for _ in range(512)]
        encs = tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
        out[kind] = data.pack_rows(iter([(e.ids, [1.0] * len(e.ids)) for e in encs]), 16, seq_len, cfg.bos_token_id)
    out["random_repeat"] = data.random_repeat_rows(rng, 16, seq_len, cfg.d_vocab, cfg.bos_token_id)
    return out


def init_params(cfg: ModelConfig, seed: int) -> dict[str, Any]:
    """GPT-2 initialisation of jaxlens's Flax model: N(0, 0.02), with the residual-writing
    projections (W_O, W_out) scaled by 1/sqrt(2 * n_layers)."""
    dummy = jnp.zeros((1, 8), jnp.int32)
    params = Transformer(cfg).init(jax.random.key(seed), dummy, jnp.ones_like(dummy), RunCtx())["params"]
    for l in range(cfg.n_layers):
        b = params[f"blocks_{l}"]
        b["attn"]["W_O"] = b["attn"]["W_O"] / np.sqrt(2 * cfg.n_layers)
        b["mlp"]["W_out"] = b["mlp"]["W_out"] / np.sqrt(2 * cfg.n_layers)
    return params


def make_step(cfg: ModelConfig, opt: optax.GradientTransformation):
    """The jitted update (float32; b_U is kept at zero, as GPT-2 has none) and the loss function."""

    def loss_fn(trainable, groups):
        """Weighted mean next-token loss over every group of rows (each group one row length)."""
        p = {**trainable, "b_U": jnp.zeros((cfg.d_vocab,), jnp.float32)}
        total, weight = 0.0, 0.0
        for tokens, weights in groups:
            logits, _, _ = forward(p, cfg, tokens)
            total = total + (lm_loss(logits, tokens, per_token=True) * weights[:, 1:]).sum()
            weight = weight + weights[:, 1:].sum()
        return total / jnp.maximum(weight, 1.0)

    @jax.jit
    def step(trainable, opt_state, groups):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, groups)
        updates, opt_state = opt.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss, optax.global_norm(grads)

    eval_loss = jax.jit(loss_fn)
    return step, eval_loss


def measure(params: dict[str, Any], cfg: ModelConfig, tok: Any, evals: dict[str, np.ndarray], eval_loss,
            ioi: dict[str, np.ndarray], probe: np.ndarray) -> dict[str, Any]:
    trainable = {k: v for k, v in params.items() if k != "b_U"}
    losses = {k: float(eval_loss(trainable, ((jnp.asarray(t), jnp.asarray(w)),))) for k, (t, w) in evals.items()}
    ind = model_induction_scores(params, cfg, probe)
    l, h = np.unravel_index(ind.argmax(), ind.shape)
    return {"eval_loss": losses, "ioi_heldout": model_ioi_scores(params, cfg, ioi),
            "induction_best": {"layer": int(l), "head": int(h), "score": float(ind[l, h])},
            "induction_scores": np.round(ind, 4).tolist()}


def _rel(v: Any) -> Any:
    """Paths inside the repository as relative paths (the log should not name this machine)."""
    if isinstance(v, str) and v.startswith(str(ROOT) + os.sep):
        return os.path.relpath(v, ROOT)
    return v


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "jaxlens/assets/tiny"))
    ap.add_argument("--prompts", default=str(ROOT / "jaxlens/assets/prompts.jsonl"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=1500, help="all steps, the induction phase included")
    ap.add_argument("--batch", type=int, default=16, help="rows of --seq-len tokens per step after the induction phase")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--d-mlp", type=int, default=256, help="MLP width (GPT-2's n_inner; 2 * d_model is enough here)")
    ap.add_argument("--vocab", type=int, default=1024, help="BPE vocabulary (1024 keeps every generated word one token)")
    ap.add_argument("--tok-docs", type=int, default=20000)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--frac-random", type=float, default=0.3, help="share of rows of repeated random tokens")
    ap.add_argument("--induction-steps", type=int, default=300,
                    help="first train this many steps on repeated random tokens only (induction heads form fast)")
    ap.add_argument("--induction-batch", type=int, default=64)
    ap.add_argument("--ioi-rows", type=int, default=64, help="rows of one IOI sentence each, per step after the induction phase")
    ap.add_argument("--ioi-share", type=float, default=None, help="share of IOI sentences among packed documents "
                    "(default: jaxlens.data.DOC_WEIGHTS)")
    ap.add_argument("--ioi-len", type=int, default=32, help="length of those rows")
    ap.add_argument("--probe-len", type=int, default=50, help="seq_len of the induction probe (BOS + 2 copies)")
    ap.add_argument("--answer-weight", type=float, default=5.0,
                    help="loss weight of the answer token of IOI training sentences")
    ap.add_argument("--first-copy-weight", type=float, default=1.0,
                    help="loss weight of the unpredictable first copy in random rows (1: plain LM loss; it "
                         "penalises copying any earlier token, which pushes towards real induction)")
    ap.add_argument("--max-span", type=int, default=None, help="longest random span (default: half a row)")
    ap.add_argument("--init-from", default=None, help="continue training an exported checkpoint (HF GPT-2 folder)")
    ap.add_argument("--eval-every", type=int, default=100)
    a = ap.parse_args(argv)
    if not 0 <= a.warmup < a.steps or not 0 <= a.induction_steps <= a.steps:
        ap.error(f"need 0 <= --warmup < --steps and 0 <= --induction-steps <= --steps "
                 f"(got warmup {a.warmup}, induction-steps {a.induction_steps}, steps {a.steps})")
    t0, cpu0, load0 = time.time(), time.process_time(), os.getloadavg()

    if a.init_from:  # continue from a checkpoint (its config and tokenizer)
        from jaxlens.conversion import load_any
        from jaxlens.tokens import load_tokenizer

        cfg, params = load_any(a.init_from)
        params, tok = jax.tree.map(jnp.asarray, params), load_tokenizer(a.init_from)
        eot = tok.convert_tokens_to_ids(SPECIAL)
    else:
        tok = build_tokenizer(a.seed, a.vocab, a.tok_docs)
        eot = tok.convert_tokens_to_ids(SPECIAL)
        cfg = ModelConfig(model_type="gpt2", d_model=a.d_model, n_layers=a.layers, n_heads=a.heads,
                          d_head=a.d_model // a.heads, d_mlp=a.d_mlp or 4 * a.d_model, d_vocab=len(tok),
                          n_ctx=a.seq_len, act_fn="gelu_new", tie_word_embeddings=True, model_name="jaxlens-tiny",
                          bos_token_id=eot, eos_token_id=eot, pad_token_id=eot)
        params = init_params(cfg, a.seed)
    print(f"tokenizer: {len(tok)} tokens ({time.time() - t0:.1f}s); model: {cfg.n_layers} layers, "
          f"d_model {cfg.d_model}, {cfg.n_heads} heads, d_mlp {cfg.d_mlp}, n_ctx {cfg.n_ctx}", flush=True)
    trainable = {k: v for k, v in params.items() if k != "b_U"}
    n_params = sum(x.size for x in jax.tree.leaves(trainable))

    sched = optax.warmup_cosine_decay_schedule(0.0, a.lr, a.warmup, a.steps, end_value=a.lr * 0.05)
    decay_mask = jax.tree.map(lambda x: x.ndim >= 2, trainable)
    opt = optax.chain(optax.clip_by_global_norm(1.0),
                      optax.adamw(sched, b1=0.9, b2=0.98, weight_decay=a.weight_decay, mask=decay_mask))
    opt_state = opt.init(trainable)
    step, eval_loss = make_step(cfg, opt)

    evals = eval_sets(tok, cfg, a.seed, a.seq_len)
    ioi = ioi_batch(tok, data.ioi_examples(a.seed + 7, 400, "heldout"), eot)
    probe = data.repeated_tokens(np.random.default_rng(a.seed + 11), 16, min(a.probe_len, (a.seq_len - 1) // 2), cfg.d_vocab, eot)
    full = lambda tr: {**tr, "b_U": jnp.zeros((cfg.d_vocab,), jnp.float32)}  # noqa: E731

    curve, evals_log = [], []
    stream = batches(tok, cfg, a)
    t_train = time.time()
    for i in range(1, a.steps + 1):
        groups = jax.tree.map(jnp.asarray, next(stream))
        trainable, opt_state, loss, gnorm = step(trainable, opt_state, groups)
        if i == 1:
            print(f"first step (compile) {time.time() - t_train:.1f}s", flush=True)
        if i % 10 == 0 or i == 1:
            curve.append({"step": i, "loss": round(float(loss), 4), "grad_norm": round(float(gnorm), 3),
                          "lr": float(sched(i)), "time_s": round(time.time() - t_train, 1)})
        if i % a.eval_every == 0 or i == a.steps:
            m = measure(full(trainable), cfg, tok, evals, eval_loss, ioi, probe)
            evals_log.append({"step": i, **{k: v for k, v in m.items() if k != "induction_scores"}})
            print(f"step {i:5d}  loss {float(loss):.3f}  ioi top1 {m['ioi_heldout']['top1']:.2f} "
                  f"diff-acc {m['ioi_heldout']['logit_diff_acc']:.2f}  induction {m['induction_best']['score']:.2f} "
                  f"(L{m['induction_best']['layer']}H{m['induction_best']['head']})  "
                  f"[{time.time() - t_train:.0f}s]", flush=True)
    train_s = time.time() - t_train

    params = full(trainable)
    out = save_hf_gpt2(a.out, cfg, params, tok)
    portable_tokenizer_config(out)
    final = measure(params, cfg, tok, evals, eval_loss, ioi, probe)
    log = {
        "command": " ".join(["python scripts/train_tiny.py", *(argv if argv is not None else sys.argv[1:])]),
        "args": {k: _rel(v) for k, v in vars(a).items()}, "n_params": int(n_params), "config": cfg.to_dict(),
        "train_seconds": round(train_s, 1), "total_seconds": round(time.time() - t0, 1),
        "cpu_seconds": round(time.process_time() - cpu0, 1),
        "machine": {"jax": jax.__version__, "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
                    "load_average_at_start": load0, "load_average_at_end": os.getloadavg()},
        "final": {"train_loss_last50": float(np.mean([c["loss"] for c in curve[-5:]])), **final},
        "evals": evals_log, "curve": curve,
    }
    (out / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
    data.write_prompts(a.prompts, a.seed)
    print(f"saved {out} ({n_params:,} parameters) in {time.time() - t0:.0f}s; final: "
          f"{json.dumps({k: v for k, v in final.items() if k != 'induction_scores'})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
