"""A toy world small enough to pre-train, instruction-tune and fine-tune Llama models on a CPU.

Used by ``paper_analog.py`` to rebuild, from scratch, the tree of the paper's transfer
(arXiv 2511.10850): base → reference (instruction-tuned) → skill model; base → target (an
independent instruction-tuning branch). Everything is character-level:

* **pre-training text**: sentences drawn from a fixed random Markov chain over a lexicon of
  pseudo-words, and runs of consecutive numbers (``"41 42 43 44"``);
* **instruction tasks**, written ``"<task> <input> > <output>."``: ``copy``, ``rev`` (reverse),
  ``sort`` (sort the letters) of random 3–6 letter strings, ``next`` (successor of a number),
  and the skill, ``add`` of two 2-digit numbers.

The checkpoints are ordinary ``LlamaForCausalLM`` folders (GQA 4/2 heads, SwiGLU, RoPE) with a
character-level fast tokenizer saved beside them, so mergekit and activation alignment read
them like any Hub model.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import torch

from examples.common import pack_examples

LETTERS = string.ascii_lowercase
CHARS = LETTERS + string.digits + " >."
SPECIALS = ("<pad>", "<bos>", "<eos>")
VOCAB = {tok: i for i, tok in enumerate(SPECIALS + tuple(CHARS))}
PAD, BOS, EOS = 0, 1, 2
WORLD_SEED = 1729  # the world (lexicon, Markov chain) is the same for every model seed

Example = Tuple[str, str]  # (prompt, completion): the loss is on the completion only


def encode(text: str) -> List[int]:
    return [VOCAB[c] for c in text]


def decode(ids: Sequence[int]) -> str:
    inverse = {i: t for t, i in VOCAB.items()}
    return "".join(inverse[i] for i in ids if i >= len(SPECIALS))


def model_config(hidden: int = 128, layers: int = 4, intermediate: int = 384):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(VOCAB), hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        head_dim=hidden // 4, max_position_embeddings=64, rope_theta=10000.0,
        tie_word_embeddings=False, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
    )


def save_tokenizer(path: Path):
    """A fast tokenizer giving exactly :func:`encode`'s ids (plus ``<bos>`` first)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(dict(VOCAB), unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", BOS)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>",
                                  eos_token="<eos>")
    tok.save_pretrained(str(path))
    return tok


# --------------------------------------------------------------------------- the world


class World:
    """The fixed lexicon and Markov chain behind the pre-training text."""

    def __init__(self, words: int = 200, successors: int = 4):
        rng = random.Random(WORLD_SEED)
        lexicon: List[str] = []
        while len(lexicon) < words:
            w = "".join(rng.choice(LETTERS) for _ in range(rng.randint(2, 6)))
            if w not in lexicon:
                lexicon.append(w)
        self.lexicon = lexicon
        self.next_words = {w: rng.sample(lexicon, successors) for w in lexicon}

    def sentence(self, rng: random.Random) -> str:
        w = rng.choice(self.lexicon)
        out = [w]
        for _ in range(rng.randint(3, 9)):
            w = rng.choice(self.next_words[w])
            out.append(w)
        return " ".join(out) + "."

    def number_run(self, rng: random.Random) -> str:
        start = rng.randint(0, 980)
        return " ".join(str(start + i) for i in range(rng.randint(3, 8))) + "."

    def pretraining_example(self, rng: random.Random) -> Example:
        text = self.sentence(rng) if rng.random() < 0.7 else self.number_run(rng)
        return "", text


def random_string(rng: random.Random) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6)))


def task_example(task: str, rng: random.Random) -> Example:
    if task == "add":
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return f"add {a} {b} >", f" {a + b}."
    if task == "next":
        n = rng.randint(0, 998)
        return f"next {n} >", f" {n + 1}."
    s = random_string(rng)
    out = {"copy": s, "rev": s[::-1], "sort": "".join(sorted(s))}[task]
    return f"{task} {s} >", f" {out}."


TASKS = ("copy", "rev", "sort", "next", "add")


def mixture(tasks: Dict[str, float], world: World | None = None,
            pretraining: float = 0.0) -> Callable[[random.Random], Example]:
    """A sampler of instruction examples (task -> weight), optionally mixed with raw text."""
    names, weights = zip(*tasks.items())

    def sample(rng: random.Random) -> Example:
        if world is not None and rng.random() < pretraining:
            return world.pretraining_example(rng)
        return task_example(rng.choices(names, weights)[0], rng)

    return sample


def held_out(task: str, n: int, seed: int = 99) -> List[Example]:
    """``n`` distinct evaluation examples of ``task`` (training never sees them: see train())."""
    rng = random.Random(10_000 + seed + TASKS.index(task))
    seen, out = set(), []
    while len(out) < n:
        ex = task_example(task, rng)
        if ex[0] not in seen:
            seen.add(ex[0])
            out.append(ex)
    return out


# --------------------------------------------------------------------------- training


def batch(examples: Sequence[Example]):
    """Right-padded ``(input_ids, attention_mask, labels)``, labels on the completions only."""
    rows = [([BOS] + encode(p), encode(c) + [EOS]) for p, c in examples]
    return pack_examples(rows, PAD)


@dataclass
class Schedule:
    steps: int
    lr: float
    batch_size: int = 64


def train(model, sample: Callable[[random.Random], Example], schedule: Schedule, seed: int,
          exclude: set = frozenset(), desc: str = "train") -> List[float]:
    """AdamW, 5 % warm-up then cosine decay; loss on completions; never on ``exclude`` prompts."""
    import math

    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    rng = random.Random(seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=schedule.lr, weight_decay=0.01,
                            betas=(0.9, 0.98))
    warmup = max(1, schedule.steps // 20)

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, schedule.steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    losses: List[float] = []
    bar = tqdm(range(schedule.steps), desc=desc, unit="step", dynamic_ncols=True, leave=False)
    for _ in bar:
        examples = []
        while len(examples) < schedule.batch_size:
            ex = sample(rng)
            if ex[0] not in exclude:
                examples.append(ex)
        ids, mask, labels = batch(examples)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if len(losses) % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / 20:.3f}")
    bar.close()
    model.eval()
    return losses


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def accuracy(model, examples: Sequence[Example], max_new_tokens: int = 10) -> float:
    """Greedy decoding, exact match of the completion (prompts grouped by length: no padding)."""
    groups: Dict[int, List[Example]] = {}
    for ex in examples:
        groups.setdefault(len(ex[0]), []).append(ex)
    hits = 0
    for group in groups.values():
        ids = torch.tensor([[BOS] + encode(p) for p, _ in group])
        want = [encode(c) + [EOS] for _, c in group]
        steps = min(max_new_tokens, max(len(w) for w in want))
        for _ in range(steps):
            nxt = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
        out = ids[:, -steps:].tolist()
        hits += sum(o[: len(w)] == w for o, w in zip(out, want))
    return hits / len(examples)


@torch.no_grad()
def completion_logprobs(model, examples: Sequence[Example]) -> torch.Tensor:
    """Teacher-forced next-token log-probabilities at every completion position: ``[N, V]``."""
    ids, mask, labels = batch(examples)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    keep = labels[:, 1:] != -100
    return torch.log_softmax(logits[keep].float(), dim=-1)

