r"""Pretrains a small GPT-2-architecture byte-level LM on the shipped corpus.

The demo's base model a(x): the project cannot download pretrained weights, so
it trains one on ``fdiv_jax/data/corpus.txt`` (fortune-cookie passages, see
``fdiv_jax/data/README.md``) and ships the result in
``fdiv_jax/data/pretrained/``. Usage::

  python -m fdiv_jax.lm.pretrain --out=/tmp/base_lm  # the shipped model's settings

writes ``OUT/config.json`` (model config, tokenizer ids, training summary) and
``OUT/params.msgpack`` (``flax.serialization.to_bytes`` of the params), which
``load_pretrained(OUT)`` reads back as ``(model, params, tokenizer)``.

Data. Each corpus line is one passage, tokenised as ``[BOS] + bytes + [EOS]``;
the passages are concatenated (in the corpus' order) into one stream, read
circularly. A training row is the ``seq_len + 1`` stream tokens starting at a
passage's BOS (so that every passage start is seen at position 0 after BOS,
exactly as unconditional sampling starts), or, for passages longer than a row,
also at offsets ``k · (seq_len − 32)`` inside it, so that their tails are
learnt too. Rows are drawn uniformly with replacement. The last
``holdout_fraction`` of the passages are held out.

Objective. Mean next-token cross-entropy ``−log a(x_t | x_<t)`` in nats, over
the targets of the row except BOS targets (BOS is never sampled, and after EOS
it is certain) and padding (``loss_mask``); with a byte tokenizer this is
nats/byte. AdamW with linear warm-up then cosine decay to 10% of the peak,
global-norm clipping at 1; one jitted step.
"""

import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable, Iterator, NamedTuple

from absl import app
from absl import flags
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fdiv_jax.lm import sampling
from fdiv_jax.lm.models import GPT2Config
from fdiv_jax.lm.models import GPT2LM
from fdiv_jax.lm.tokenization import ByteTokenizer

DATA_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
CORPUS_PATH = os.path.join(DATA_DIR, "corpus.txt")
PRETRAINED_DIR = os.path.join(DATA_DIR, "pretrained")
CONFIG_FILE = "config.json"
PARAMS_FILE = "params.msgpack"

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
  """Model size and optimisation settings of ``pretrain``.

  The defaults are those of the shipped ``fdiv_jax/data/pretrained`` model
  (~11 minutes on two shared CPU cores).
  """
  n_layer: int = 4
  n_head: int = 4
  n_embd: int = 128
  seq_len: int = 128
  batch_size: int = 16
  steps: int = 1200
  learning_rate: float = 4e-3
  warmup_steps: int = 100
  weight_decay: float = 0.1
  holdout_fraction: float = 0.05
  eval_every: int = 200
  eval_batches: int = 8
  seed: int = 0

  def __post_init__(self):
    if self.steps < 1 or self.eval_every < 1 or self.batch_size < 1:
      raise ValueError(f"steps, eval_every and batch_size must be >= 1: {self}")


# ----------------------------------------------------------------------------
# Data.


def load_corpus(path: str | None = None) -> list[str]:
  """The corpus passages, one per non-empty line (default: the shipped one)."""
  with open(path or CORPUS_PATH, encoding="utf-8") as f:
    return [line.rstrip("\n") for line in f if line.strip()]


def split_corpus(passages: list[str],
                 holdout_fraction: float) -> tuple[list[str], list[str]]:
  """``(train, heldout)``: the last ``holdout_fraction`` of lines held out."""
  num_heldout = max(1, int(round(len(passages) * holdout_fraction)))
  return passages[:-num_heldout], passages[-num_heldout:]


class TokenStream(NamedTuple):
  """A corpus as one token stream plus the allowed row starts.

  Attributes:
    tokens: int32 [L], ``[BOS] + bytes + [EOS]`` of each passage, concatenated.
    starts: int64 [R], the offsets rows may start at.
  """
  tokens: np.ndarray
  starts: np.ndarray


def make_stream(passages: list[str], tokenizer: ByteTokenizer,
                seq_len: int) -> TokenStream:
  """Tokenises passages into a stream; row starts as in the module docstring."""
  stride = max(seq_len - 32, 1)
  pieces, starts, offset = [], [], 0
  for text in passages:
    ids = [tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id]
    pieces.append(np.asarray(ids, dtype=np.int32))
    starts.extend(offset + k for k in range(0, max(len(ids) - 32, 1), stride))
    offset += len(ids)
  return TokenStream(np.concatenate(pieces), np.asarray(starts, np.int64))


def make_rows(stream: TokenStream, row_starts: np.ndarray, seq_len: int,
              bos_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Rows of ``seq_len + 1`` tokens (read circularly) and their loss mask.

  Returns:
    ``(tokens int32 [B, seq_len + 1], loss_mask float32 [B, seq_len])``; the
    mask is 0 where the target ``tokens[:, 1:]`` is BOS.
  """
  index = (row_starts[:, None] + np.arange(seq_len + 1)[None]) % len(
      stream.tokens)
  tokens = stream.tokens[index]
  loss_mask = (tokens[:, 1:] != bos_id).astype(np.float32)
  return tokens, loss_mask


def batches(stream: TokenStream, batch_size: int, seq_len: int, bos_id: int,
            rng: np.random.Generator) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Endless batches of rows drawn uniformly, with replacement."""
  while True:
    row_starts = stream.starts[rng.integers(len(stream.starts),
                                            size=batch_size)]
    yield make_rows(stream, row_starts, seq_len, bos_id)


# ----------------------------------------------------------------------------
# Model, loss, optimiser.


def model_config(config: PretrainConfig, vocab_size: int) -> GPT2Config:
  return GPT2Config(vocab_size=vocab_size, n_positions=config.seq_len,
                    n_layer=config.n_layer, n_head=config.n_head,
                    n_embd=config.n_embd)


def next_token_loss(params, model: GPT2LM, tokens: Array,
                    loss_mask: Array) -> Array:
  """Masked mean next-token cross-entropy in nats.

    loss = Σ_{b,t} m[b,t] · −log softmax(logits[b,t])[tokens[b,t+1]] / Σ m

  Args:
    params: model parameters.
    model: the ``GPT2LM``.
    tokens: int32 [B, T + 1].
    loss_mask: float32 [B, T]; 1 for targets that count.
  """
  logits = model.apply({"params": params}, tokens[:, :-1])
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
  return jnp.sum(nll * loss_mask) / jnp.maximum(jnp.sum(loss_mask), 1.0)


def make_optimizer(config: PretrainConfig) -> optax.GradientTransformation:
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate,
      warmup_steps=min(config.warmup_steps, max(config.steps - 1, 1)),
      decay_steps=max(config.steps, 2), end_value=0.1 * config.learning_rate)
  # No weight decay on biases, LayerNorm scales and the position table.
  decay_mask = lambda params: jax.tree_util.tree_map_with_path(
      lambda path, x: x.ndim == 2 and "wpe" not in jax.tree_util.keystr(path),
      params)
  return optax.chain(
      optax.clip_by_global_norm(1.0),
      optax.adamw(schedule, b1=0.9, b2=0.98,
                  weight_decay=config.weight_decay, mask=decay_mask))


def make_train_step(model: GPT2LM, optimizer: optax.GradientTransformation):
  """Jitted ``(params, opt_state, tokens, loss_mask) -> (params, opt_state,
  loss)``, donating params and optimiser state."""

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_step(params, opt_state, tokens, loss_mask):
    loss, grads = jax.value_and_grad(next_token_loss)(params, model, tokens,
                                                      loss_mask)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return train_step


def evaluate(params, model: GPT2LM, stream: TokenStream, config: PretrainConfig,
             bos_id: int) -> float:
  """Mean loss (nats/token) over ``eval_batches`` fixed batches of ``stream``."""
  loss_fn = jax.jit(functools.partial(next_token_loss, model=model))
  rng = np.random.default_rng(1234)
  data = batches(stream, config.batch_size, config.seq_len, bos_id, rng)
  losses = [loss_fn(params, tokens=t, loss_mask=m)
            for t, m in (next(data) for _ in range(config.eval_batches))]
  return float(np.mean(jax.device_get(losses)))


# ----------------------------------------------------------------------------
# Checkpoint files.


def _config_to_json(config: GPT2Config) -> dict[str, Any]:
  out = {}
  for field in dataclasses.fields(config):
    value = getattr(config, field.name)
    if field.name in ("dtype", "param_dtype"):
      value = jnp.dtype(value).name
    out[field.name] = value
  return out


def _config_from_json(data: dict[str, Any]) -> GPT2Config:
  kwargs = dict(data)
  for name in ("dtype", "param_dtype"):
    if name in kwargs:
      kwargs[name] = jnp.dtype(kwargs[name]).type
  return GPT2Config(**kwargs)


def save_pretrained(out_dir: str, config: GPT2Config, params,
                    tokenizer: ByteTokenizer,
                    info: dict[str, Any] | None = None) -> None:
  """Writes ``out_dir/config.json`` and ``out_dir/params.msgpack``."""
  os.makedirs(out_dir, exist_ok=True)
  meta = {
      "model": "GPT2LM",
      "model_config": _config_to_json(config),
      "tokenizer": {"name": "ByteTokenizer", "bos_id": tokenizer.bos_id,
                    "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id,
                    "vocab_size": tokenizer.vocab_size},
      "info": info or {},
  }
  with open(os.path.join(out_dir, CONFIG_FILE), "w", encoding="utf-8") as f:
    json.dump(meta, f, indent=2, sort_keys=True)
    f.write("\n")
  with open(os.path.join(out_dir, PARAMS_FILE), "wb") as f:
    f.write(flax.serialization.to_bytes(jax.device_get(params)))


def load_pretrained(path: str | None = None
                   ) -> tuple[GPT2LM, Any, ByteTokenizer]:
  """Loads ``(model, params, tokenizer)`` written by ``save_pretrained``.

  Args:
    path: the checkpoint directory; default the shipped
      ``fdiv_jax/data/pretrained``.

  Raises:
    FileNotFoundError: no ``config.json`` / ``params.msgpack`` there.
    ValueError: the stored tokenizer ids differ from ``ByteTokenizer()``'s.
  """
  path = path or PRETRAINED_DIR
  with open(os.path.join(path, CONFIG_FILE), encoding="utf-8") as f:
    meta = json.load(f)
  config = _config_from_json(meta["model_config"])
  model = GPT2LM(config)
  tokenizer = ByteTokenizer()
  stored = meta.get("tokenizer", {})
  for key in ("bos_id", "eos_id", "pad_id"):
    if key in stored and stored[key] != getattr(tokenizer, key):
      raise ValueError(f"Checkpoint {path} has tokenizer {key}={stored[key]}, "
                       f"ByteTokenizer() has {getattr(tokenizer, key)}.")
  template = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
  template = jax.tree_util.tree_map(
      lambda s: np.zeros(s.shape, s.dtype), template["params"])
  with open(os.path.join(path, PARAMS_FILE), "rb") as f:
    params = flax.serialization.from_bytes(template, f.read())
  return model, jax.tree_util.tree_map(jnp.asarray, params), tokenizer


# ----------------------------------------------------------------------------
# Training.


def pretrain(config: PretrainConfig, out_dir: str | None = None,
             corpus_path: str | None = None,
             log: Callable[[str], None] = print) -> tuple[GPT2LM, Any, dict]:
  """Trains the model; saves it to ``out_dir`` when given.

  Returns:
    ``(model, params, info)`` with ``info`` holding the final train and
    held-out losses (nats/byte), parameter count, steps and seconds.
  """
  tokenizer = ByteTokenizer()
  train_text, heldout_text = split_corpus(load_corpus(corpus_path),
                                          config.holdout_fraction)
  train_stream = make_stream(train_text, tokenizer, config.seq_len)
  heldout_stream = make_stream(heldout_text, tokenizer, config.seq_len)
  model = GPT2LM(model_config(config, tokenizer.vocab_size))
  params = model.init(jax.random.key(config.seed),
                      jnp.zeros((1, config.seq_len), jnp.int32))["params"]
  num_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
  log(f"pretrain: {num_params:,} parameters, {len(train_text)} train / "
      f"{len(heldout_text)} held-out passages, "
      f"{len(train_stream.tokens):,} train tokens")
  optimizer = make_optimizer(config)
  opt_state = optimizer.init(params)
  train_step = make_train_step(model, optimizer)
  data = batches(train_stream, config.batch_size, config.seq_len,
                 tokenizer.bos_id, np.random.default_rng(config.seed))
  start, recent = time.perf_counter(), []
  for step in range(1, config.steps + 1):
    tokens, loss_mask = next(data)
    params, opt_state, loss = train_step(params, opt_state, tokens, loss_mask)
    recent.append(loss)
    if step % config.eval_every == 0 or step == config.steps:
      train_loss = float(np.mean(jax.device_get(recent)))
      recent = []
      heldout = evaluate(params, model, heldout_stream, config,
                         tokenizer.bos_id)
      log(f"step {step:5d}  train {train_loss:.4f}  held-out {heldout:.4f} "
          f"nats/byte  {time.perf_counter() - start:7.1f}s")
  info = {
      "train_loss_nats_per_byte": round(train_loss, 4),
      "heldout_loss_nats_per_byte": round(heldout, 4),
      "num_params": int(num_params),
      "seconds": round(time.perf_counter() - start, 1),
      "pretrain_config": dataclasses.asdict(config),
      "corpus": os.path.basename(corpus_path or CORPUS_PATH),
  }
  if out_dir:
    save_pretrained(out_dir, model.config, params, tokenizer, info)
    log(f"pretrain: saved to {out_dir}")
  return model, params, info


def load_or_pretrain(cache_dir: str | None = None,
                     config: PretrainConfig = PretrainConfig(),
                     log: Callable[[str], None] = print
                     ) -> tuple[GPT2LM, Any, ByteTokenizer]:
  """The demo's base model: shipped, else cached, else trained now.

  Loads the shipped ``fdiv_jax/data/pretrained`` checkpoint when it exists;
  otherwise loads ``cache_dir`` when it holds one; otherwise pretrains with
  ``config`` (minutes on a CPU) and saves to ``cache_dir`` (when given) so that
  later runs reuse it.
  """
  for path in (PRETRAINED_DIR, cache_dir):
    if path and os.path.exists(os.path.join(path, PARAMS_FILE)):
      return load_pretrained(path)
  log(f"pretrain: no pretrained base model found; training one "
      f"({config.steps} steps) into {cache_dir}")
  model, params, _ = pretrain(config, cache_dir, log=log)
  return model, params, ByteTokenizer()


# ----------------------------------------------------------------------------
# Sampling and command line.


def print_samples(model: GPT2LM, params, tokenizer: ByteTokenizer,
                  num_samples: int, length: int, seed: int = 0) -> list[str]:
  """Draws and prints unconditional samples (temperature 1) from BOS."""
  config = sampling.SamplerConfig(
      max_new_tokens=min(length, model.config.n_positions - 1),
      eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
  prompts, lengths = sampling.pad_prompts([[tokenizer.bos_id]] * num_samples,
                                          tokenizer.pad_id)
  out = sampling.make_sampler(model, config)(params, jax.random.key(seed),
                                             prompts, lengths)
  texts = tokenizer.batch_decode(*jax.device_get((out.tokens, out.mask)))
  for text in texts:
    print(repr(text))
  return texts


def define_flags() -> dict[str, Any]:
  """Defines the command-line flags (only when run as a script, so that
  importing this module adds no flags to the importer's program)."""
  holders = {
      "out": flags.DEFINE_string("out", None, "Output checkpoint directory."),
      "corpus": flags.DEFINE_string(
          "corpus", None, "Corpus, one passage per line (default: the "
          "shipped fdiv_jax/data/corpus.txt)."),
      "num_samples": flags.DEFINE_integer(
          "num_samples", 5, "Unconditional samples printed after training."),
      "sample_length": flags.DEFINE_integer(
          "sample_length", 100, "New bytes per printed sample."),
  }
  for field in dataclasses.fields(PretrainConfig):
    define = (flags.DEFINE_integer if isinstance(field.default, int) else
              flags.DEFINE_float)
    holders[field.name] = define(field.name, field.default,
                                 f"PretrainConfig.{field.name}")
  flags.mark_flag_as_required("out")
  return holders


def main(argv, holders):
  del argv
  config = PretrainConfig(**{f.name: holders[f.name].value
                             for f in dataclasses.fields(PretrainConfig)})
  model, params, _ = pretrain(config, holders["out"].value,
                              holders["corpus"].value)
  if holders["num_samples"].value:
    print_samples(model, params, ByteTokenizer(), holders["num_samples"].value,
                  holders["sample_length"].value, seed=config.seed)


if __name__ == "__main__":
  _holders = define_flags()
  app.run(functools.partial(main, holders=_holders))
