"""Targets past a checkpoint's learned positions: which rule to start the new rows with, and what a fine-tune learned.

    python -m scripts.long_targets init_rules [--steps 300]     # the measurement behind DEFAULT_POSITION_INIT
    python -m scripts.long_targets score --model runs/long/export [--rows 26]

``init_rules``, a scaled-down version of "Florence-2-base, 1,024 positions, fine-tuned on 2,000-token
targets", small enough for a CPU: a tiny Florence-2 (BART d=128, 2+2 layers, random init) learns the synthetic
JSON forms of ``train/data/synthetic_long.py`` with 128 positions (5 rows, ~113 target tokens: every position
trained), is grown to 256 positions by each rule of :data:`florence_jax.positions.POSITION_INITS`, and is
fine-tuned the same way on 11-row forms (~245 tokens). It prints the teacher-forced token accuracy and loss on
held-out forms in position ranges [0, 128) and [128, 256) after every ``--every`` steps: how fast each rule learns
the positions past the old limit, and what it costs the ones below. Text only (no image: the answer does not
depend on it), so the run takes minutes.

``score``: the same per-range accuracy for a trained model on ``rows``-row forms (the CPU config
``configs/cpu_long_targets.py`` trains the shipped reader, 512 positions grown to 640, on 26-row forms of 573-600
tokens): the positions past the checkpoint's 512 are learned when their accuracy matches the ones below.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time

import numpy as np

RANGE = 128


def per_range(logits: np.ndarray, labels: np.ndarray, mask: np.ndarray, edges: list[int]) -> list[dict]:
    """Token accuracy and mean loss of the counted positions in each ``[edges[i], edges[i+1])``."""
    import jax
    import jax.numpy as jnp

    from florence_jax.losses import token_cross_entropy

    losses, weights = token_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask))
    losses, weights = np.asarray(losses), np.asarray(weights)
    right = (np.asarray(jax.device_get(jnp.argmax(logits, -1))) == labels) & (weights > 0)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        n = weights[:, lo:hi].sum()
        out.append({"range": f"{lo}-{hi}", "tokens": int(n),
                    "accuracy": float(right[:, lo:hi].sum() / max(n, 1)),
                    "loss": float(losses[:, lo:hi].sum() / max(n, 1))})
    return out


def _text_batch(tokenizer, records, target_length: int, prompt_length: int = 24):
    """Text-only arrays (prompt ids, labels, mask) as the training pipeline tokenizes prompt and target."""
    n = len(records)
    ids = np.full((n, prompt_length), tokenizer.pad_token_id, np.int32)
    am = np.zeros_like(ids)
    labels = np.full((n, target_length), tokenizer.pad_token_id, np.int32)
    mask = np.zeros((n, target_length), np.float32)
    for i, r in enumerate(records):
        p = tokenizer(tokenizer.bos_token + r["prompt"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        t = tokenizer(text_target=r["target"])["input_ids"]
        if len(p) > prompt_length or len(t) > target_length:
            raise ValueError(f"record {i} does not fit: prompt {len(p)} > {prompt_length} or target {len(t)} > "
                             f"{target_length}")
        ids[i, : len(p)], am[i, : len(p)] = p, 1
        labels[i, : len(t)], mask[i, : len(t)] = t, 1.0
    return ids, am, labels, mask


def init_rules(args) -> int:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from florence_jax import Florence2ForConditionalGeneration
    from florence_jax.assets import TINY_READER
    from florence_jax.losses import shift_tokens_right, token_cross_entropy
    from florence_jax.positions import POSITION_INITS, grow_positions
    from florence_jax.processing import load_processor
    from train.data.synthetic_long import make_records
    from train.state import tiny_config

    tokenizer = load_processor(TINY_READER).tokenizer
    vocab = -(-len(tokenizer) // 64) * 64
    fc = tiny_config(vocab, tokenizer.convert_tokens_to_ids("<image>"))
    fc = fc.replace(text_config=dataclasses.replace(fc.text_config, max_position_embeddings=RANGE))
    t = fc.text_config

    def data(rows, n, seed, length):
        return _text_batch(tokenizer, make_records(n, seed, rows=rows), length)

    short_train, short_val = data(5, 2000, 0, RANGE), data(5, 64, 1_000_003, RANGE)
    long_train, long_val = data(11, 2000, 1, 2 * RANGE), data(11, 64, 1_000_004, 2 * RANGE)

    @functools.partial(jax.jit, static_argnums=(0, 1))
    def step(graphdef, tx, params, rest, opt, batch):
        ids, am, labels, mask = batch

        def loss_fn(p):
            model = nnx.merge(graphdef, p, rest)
            dec = shift_tokens_right(labels, t.pad_token_id, t.decoder_start_token_id)
            logits = model(input_ids=ids, attention_mask=am, decoder_input_ids=dec).logits
            losses, weights = token_cross_entropy(logits, labels, mask)
            return losses.sum() / jnp.maximum(weights.sum(), 1.0)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    @functools.partial(jax.jit, static_argnums=(0,))
    def logits_of(graphdef, params, rest, ids, am, labels):
        dec = shift_tokens_right(labels, t.pad_token_id, t.decoder_start_token_id)
        return nnx.merge(graphdef, params, rest)(input_ids=ids, attention_mask=am, decoder_input_ids=dec).logits

    def evaluate(model, val, edges):
        model.eval()
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        ids, am, labels, mask = val
        return per_range(np.asarray(logits_of(graphdef, params, rest, ids, am, labels)), labels, mask, edges)

    def train(model, batches, steps, lr, seed, report=None):
        model.train()
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, min(50, steps // 5), steps), weight_decay=0.01)
        opt = tx.init(params)
        rng = np.random.default_rng(seed)
        n = len(batches[0])
        for s in range(steps):
            idx = rng.choice(n, args.batch_size, replace=False)
            params, opt, loss = step(graphdef, tx, params, rest, opt, tuple(x[idx] for x in batches))
            if report and (s + 1) % args.every == 0:
                nnx.update(model, params)
                report(s + 1, float(loss))
        nnx.update(model, params)
        model.eval()
        return model

    t0 = time.time()
    base = Florence2ForConditionalGeneration(fc, rngs=nnx.Rngs(args.seed))
    base = train(base, short_train, args.pretrain_steps, 1e-3, args.seed)
    first = evaluate(base, short_val, [0, RANGE])[0]
    print(f"pretrained at {RANGE} positions ({args.pretrain_steps} steps, {time.time() - t0:.0f} s): held-out "
          f"5-row forms, accuracy {first['accuracy']:.3f}, loss {first['loss']:.3f}", flush=True)
    edges = [0, RANGE, 2 * RANGE]
    for init in args.rules or POSITION_INITS:
        t0 = time.time()
        model = grow_positions(base, 2 * RANGE, init)

        def log(s, loss, model=model, init=init):
            r = evaluate(model, long_val, edges)
            print(f"  {init:<12} step {s:4d}  train loss {loss:.3f}  " + "  ".join(
                f"[{x['range']}) acc {x['accuracy']:.3f} loss {x['loss']:.3f}" for x in r), flush=True)
            model.train()

        r0 = evaluate(model, long_val, edges)
        print(f"  {init:<12} step    0  " + "  ".join(
            f"[{x['range']}) acc {x['accuracy']:.3f} loss {x['loss']:.3f}" for x in r0), flush=True)
        train(model, long_train, args.steps, args.lr, args.seed + 1, report=log)
        print(f"  {init:<12} ({time.time() - t0:.0f} s)", flush=True)
    return 0


def score(args) -> int:
    from PIL import Image

    from florence_jax import Florence2ForConditionalGeneration
    from florence_jax.losses import shift_tokens_right
    from florence_jax.processing import load_processor, prepare_inputs
    from train.data.synthetic_long import ROWS, make_records

    processor = load_processor(args.model)
    model = Florence2ForConditionalGeneration.from_pretrained(args.model, max_positions=args.max_positions)
    tokenizer = processor.tokenizer
    t = model.config.text_config
    rows = args.rows or ROWS
    records = make_records(args.examples, args.seed + 1_000_003, rows=rows, image_size=args.image_size)
    length = max(len(tokenizer(text_target=r["target"])["input_ids"]) for r in records)
    _, _, labels, mask = _text_batch(tokenizer, records, length, prompt_length=32)
    image = Image.new("RGB", (args.image_size, args.image_size), (128, 128, 128))
    inputs = prepare_inputs(processor, [image] * len(records), [r["prompt"] for r in records])
    dec = np.asarray(shift_tokens_right(labels, t.pad_token_id, t.decoder_start_token_id))
    logits = np.asarray(model(**inputs, decoder_input_ids=dec).logits)
    edges = sorted({*range(0, length, args.range), length})
    print(f"{args.model}: {t.max_position_embeddings} positions; {len(records)} held-out {rows}-row forms, "
          f"{length} target tokens")
    for r in per_range(logits, labels, mask, edges):
        print(f"  positions [{r['range']})  tokens {r['tokens']:5d}  accuracy {r['accuracy']:.3f}  loss {r['loss']:.3f}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.long_targets", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("init_rules")
    a.add_argument("--pretrain_steps", type=int, default=1500)
    a.add_argument("--steps", type=int, default=300)
    a.add_argument("--every", type=int, default=100)
    a.add_argument("--lr", type=float, default=1e-3)
    a.add_argument("--batch_size", type=int, default=16)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--rules", nargs="*")
    s = sub.add_parser("score")
    s.add_argument("--model", required=True)
    s.add_argument("--rows", type=int, default=None, help="default: the task's ROWS")
    s.add_argument("--examples", type=int, default=8)
    s.add_argument("--range", type=int, default=128)
    s.add_argument("--image_size", type=int, default=64)
    s.add_argument("--max_positions", type=int, help="grow the model's positions at load (the before-training score)")
    s.add_argument("--seed", type=int, default=0, help="the config's data.synthetic.seed")
    args = p.parse_args(argv)
    return init_rules(args) if args.command == "init_rules" else score(args)


if __name__ == "__main__":
    sys.exit(main())
