"""Demo: plain vs symmetry-aligned task arithmetic on a family built from SmolLM2-135M-Instruct.

Run with ``python -m examples.demo`` from the repository root (or ``scripts/demo.sh``).
Everything is offline and CPU-only. The demo builds, once (cached under ``--workdir``):

* **reference**: SmolLM2-135M-Instruct as is (float32 safetensors + tokenizer);
* **skill**: the reference after a short fine-tune on 2-3 digit addition
  (``What is 347+582? Answer: 929``; loss on the answer tokens only);
* **sibling**: the reference after a light fine-tune on unrelated English sentences (a
  diverged relative of the reference, the realistic transfer target);
* **reference-scrambled** / **sibling-scrambled**: those two models moved by a random element
  of their exact symmetry group (:func:`mergekit_symalign.statedict.scramble_state_dict`):
  same function, different weights.

The skill vector (skill - reference) is then transferred onto each target with an unmodified
``mergekit-yaml``, once with plain ``task_arithmetic`` and once with
``symmetry_aligned_task_arithmetic``, and every merged model is scored on held-out addition
problems (greedy decoding, exact match) and by KL(skill || merged) of the next-token
distributions at the answer positions. Plain task arithmetic works on the targets that share
the reference's coordinates and collapses on the scrambled ones; the aligned method does not
care.

Fine-tunes freeze the (tied) token embeddings: that keeps them cheap on a CPU, and it keeps the
skill vector in the decoder layers, where the symmetries act.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from examples import smollm
from examples.common import (
    load_tensors,
    mean_kl,
    pack_examples,
    run_mergekit_yaml,
    text_logits,
    transfer_recipe,
)

BUILD_VERSION = 1  # bump to invalidate cached models when the recipes below change

PROMPT = "What is {a}+{b}? Answer:"
SKILL_LR = 3e-4
SIBLING_LR = 2e-4
BATCH = 16
EVAL_POOL = 1000  # held-out problems: --eval-problems scores the first N of these
SCRAMBLE_SEEDS = {"reference": 101, "sibling": 202}  # offset by --seed

TARGETS = ("reference", "sibling", "reference-scrambled", "sibling-scrambled")
# The merge kept by default (with its model card) and described by `mergekit-symalign report`:
# the realistic case where alignment matters, a diverged relative whose coordinates differ.
KEPT_MERGE = "sibling-scrambled--aligned"
METHODS = ("task_arithmetic", "symmetry_aligned_task_arithmetic")


# --------------------------------------------------------------------------- data


Problem = Tuple[int, int]


def random_problem(rng: random.Random) -> Problem:
    return rng.randint(10, 999), rng.randint(10, 999)


def eval_problems(n: int, seed: int) -> List[Problem]:
    """The first ``n`` held-out problems (distinct; a prefix of one fixed sequence per seed)."""
    rng = random.Random(10_000 + seed)
    seen, out = set(), []
    while len(out) < n:
        p = random_problem(rng)
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def prompt_text(p: Problem) -> str:
    return PROMPT.format(a=p[0], b=p[1])


def answer_text(p: Problem, eos: str) -> str:
    return f" {p[0] + p[1]}{eos}"


_SUBJECTS = ["The old farmer", "A young girl", "My neighbour", "The small dog", "Our teacher",
             "The tired pilot", "A quiet student", "The baker", "His sister", "The gardener",
             "A curious cat", "The captain", "Her grandfather", "The painter", "A tall man"]
_VERBS = ["carried", "painted", "found", "lost", "cleaned", "opened", "watched", "repaired",
          "borrowed", "hid", "wrapped", "noticed", "dropped", "collected", "described"]
_OBJECTS = ["a red umbrella", "the wooden box", "an old letter", "the silver key", "a basket of apples",
            "the broken clock", "a warm blanket", "the map of the island", "a bright lantern",
            "the green bicycle", "a stack of books", "the kitchen window", "a paper kite"]
_PLACES = ["in the garden", "near the river", "at the market", "before breakfast", "after the storm",
           "behind the barn", "on a cold morning", "in the library", "under the bridge",
           "during the festival", "by the old mill", "at the station"]
_ENDINGS = [".", " and smiled.", " without a word.", " and went home.", " once again.",
            " for the first time.", " and told everyone about it."]


def sibling_sentence(rng: random.Random) -> str:
    return (f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} "
            f"{rng.choice(_PLACES)}{rng.choice(_ENDINGS)}")


# --------------------------------------------------------------------------- batches


def skill_batch(tok, rng: random.Random, exclude: set, size: int = BATCH):
    rows = []
    while len(rows) < size:
        p = random_problem(rng)
        if p in exclude:
            continue
        rows.append((tok(prompt_text(p))["input_ids"], tok(answer_text(p, tok.eos_token))["input_ids"]))
    return pack_examples(rows, tok.pad_token_id)


def sibling_batch(tok, rng: random.Random, size: int = BATCH):
    rows = []
    for _ in range(size):
        ids = tok(sibling_sentence(rng) + tok.eos_token)["input_ids"]
        rows.append((ids[:1], ids[1:]))  # loss on every token but the first
    return pack_examples(rows, tok.pad_token_id)


def _label_logits(model, ids, mask, labels):
    """Logits only where a label is set (the lm_head over 49k tokens is costly)."""
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    targets = labels[:, 1:]
    where = targets != -100
    return model.lm_head(hidden[:, :-1][where]), targets[where]


# --------------------------------------------------------------------------- fine-tune


CHECKPOINT_EVERY_S = 180.0  # a fine-tune saves its state this often (and when interrupted)


class _StopRequests:
    """Turns Ctrl-C / SIGTERM during a fine-tune into a request honoured between steps, so
    the checkpoint written on the way out is a consistent one (never half an optimizer step)."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._request)
        return self

    def _request(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def _load_checkpoint(path: Optional[Path], note: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The saved state of this very fine-tune (same build note), or None (a stale one goes)."""
    if path is None or not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception:  # a torn or foreign file: start over
        state = None
    if not isinstance(state, dict) or state.get("note") != note:
        path.unlink(missing_ok=True)
        return None
    return state


def _save_checkpoint(path: Path, state: Dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a kill mid-write leaves the previous checkpoint intact


def finetune(model, make_batch: Callable[[], Tuple], steps: int, lr: float, desc: str,
             seed: int, rng: Optional[random.Random] = None, checkpoint: Optional[Path] = None,
             note: Optional[Dict[str, Any]] = None,
             save_every_s: float = CHECKPOINT_EVERY_S) -> List[float]:
    """AdamW with a short warm-up and linear decay; token embeddings (tied) frozen.

    With ``checkpoint``, the trainable weights, optimizer, schedule, ``rng`` (the random
    source ``make_batch`` draws from) and torch's RNG are saved there every ``save_every_s``
    seconds and on Ctrl-C/SIGTERM (after the step in flight), and a run with the same ``note``
    resumes from it: the result is the uninterrupted run's. Removed when the run completes.
    """
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    model.train()
    model.get_input_embeddings().weight.requires_grad_(False)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, min(10, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, 1.0 - s / steps)
    )
    losses: List[float] = []
    start = 0
    saved = _load_checkpoint(checkpoint, note)
    if saved is not None:
        with torch.no_grad():
            for name, p in named:
                p.copy_(saved["trainable"][name])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["torch_rng"])
        if rng is not None:
            rng.setstate(saved["rng"])
        losses, start = list(saved["losses"]), saved["step"]
        _log(f"{desc}: resuming from step {start} of {steps} ({checkpoint})")

    def save(step: int) -> None:
        _save_checkpoint(checkpoint, {
            "note": note, "step": step, "losses": losses,
            "trainable": {n: p.detach().clone() for n, p in named},
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "torch_rng": torch.get_rng_state(), "rng": rng.getstate() if rng is not None else None,
        })

    last_save = time.monotonic()
    bar = tqdm(range(start, steps), desc=desc, unit="step", dynamic_ncols=True, initial=start,
               total=steps)
    with _StopRequests() as stop:
        for step in bar:
            ids, mask, labels = make_batch()
            logits, targets = _label_logits(model, ids, mask, labels)
            loss = torch.nn.functional.cross_entropy(logits, targets)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
            due = time.monotonic() - last_save >= save_every_s
            if checkpoint is not None and step + 1 < steps and (due or stop.requested):
                save(step + 1)
                last_save = time.monotonic()
            if stop.requested and step + 1 < steps:  # (after the last step: just finish)
                bar.close()
                where = f"; run again to resume from step {step + 1} ({checkpoint})" if checkpoint else ""
                raise KeyboardInterrupt(f"{desc} interrupted{where}")
    bar.close()
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)
    model.get_input_embeddings().weight.requires_grad_(True)
    model.eval()
    return losses


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def skill_accuracy(model, tok, problems: Sequence[Problem], batch: int = 50,
                   max_new_tokens: int = 6) -> Tuple[float, List[str]]:
    """Greedy-decode a few tokens after each prompt; exact match of the first number."""
    side = tok.padding_side
    tok.padding_side = "left"
    texts: List[str] = []
    try:
        for i in range(0, len(problems), batch):
            chunk = problems[i : i + batch]
            enc = tok([prompt_text(p) for p in chunk], return_tensors="pt", padding=True)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            texts += tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tok.padding_side = side
    hits = 0
    for p, text in zip(problems, texts):
        m = re.search(r"\d+", text)
        hits += bool(m and int(m.group()) == p[0] + p[1])
    return hits / len(problems), texts


@torch.no_grad()
def answer_logprobs(model, tok, problems: Sequence[Problem], batch: int = 50) -> torch.Tensor:
    """Next-token log-probabilities at every answer position (teacher-forced): ``[N, vocab]``."""
    out = []
    for i in range(0, len(problems), batch):
        rows = [(tok(prompt_text(p))["input_ids"], tok(answer_text(p, tok.eos_token))["input_ids"])
                for p in problems[i : i + batch]]
        logits, _ = _label_logits(model, *pack_examples(rows, tok.pad_token_id))
        out.append(torch.log_softmax(logits.float(), dim=-1))
    return torch.cat(out)


def max_logit_diff(a, b, tok, texts: Sequence[str]) -> float:
    return float((text_logits(a, tok, texts) - text_logits(b, tok, texts)).abs().max())


# --------------------------------------------------------------------------- the family


@dataclass
class Options:
    workdir: Path
    steps: int
    sibling_steps: int
    eval_problems: int
    seed: int
    fresh: bool
    keep_merges: bool
    threads: int
    verbose: bool


def _note(kind: str, opts: Options, **extra) -> Dict[str, Any]:
    note = {"model": kind, "version": BUILD_VERSION, "seed": opts.seed}
    note.update(extra)
    return note


def _cached(path: Path, note: Dict[str, Any]) -> bool:
    marker = path / smollm.MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()) == note
    except ValueError:
        return False


def _save(model, tok, path: Path, note: Dict[str, Any]) -> None:
    smollm.save_pretrained(model, tok, path, note=json.dumps(note, sort_keys=True))


def _log(msg: str) -> None:
    print(msg, flush=True)


def build_family(opts: Options) -> Dict[str, Any]:
    """Build (or reuse) the five models; returns their paths and build facts."""
    from mergekit_symalign.statedict import scramble_state_dict

    models_dir = opts.workdir / "models"
    paths = {name: models_dir / name for name in ("reference", "skill", "sibling",
                                                  "reference-scrambled", "sibling-scrambled")}
    notes = {
        "reference": _note("reference", opts, source=smollm.GGUF_FILE),
        "skill": _note("skill", opts, steps=opts.steps, lr=SKILL_LR, batch=BATCH,
                       held_out=EVAL_POOL),
        "sibling": _note("sibling", opts, steps=opts.sibling_steps, lr=SIBLING_LR, batch=BATCH),
    }
    for base in ("reference", "sibling"):
        notes[f"{base}-scrambled"] = _note(
            f"{base}-scrambled", opts, scramble_seed=SCRAMBLE_SEEDS[base] + opts.seed,
            of=notes[base],
        )
    facts: Dict[str, Any] = {"paths": {k: str(v) for k, v in paths.items()}, "build_s": {}}

    tok = None

    def get_tokenizer():
        nonlocal tok
        if tok is None:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(paths["reference"]))
        return tok

    # 1. reference
    if not _cached(paths["reference"], notes["reference"]):
        t = time.perf_counter()
        _log("building reference: SmolLM2-135M-Instruct (float32 safetensors + tokenizer)")
        model, tokenizer = smollm.load_smollm2(torch.float32)
        _save(model, tokenizer, paths["reference"], notes["reference"])
        facts["build_s"]["reference"] = time.perf_counter() - t

    # 2. skill and 3. sibling
    exclude = set(eval_problems(EVAL_POOL, opts.seed))  # never trained on, whatever is scored
    for name, steps, lr in (("skill", opts.steps, SKILL_LR), ("sibling", opts.sibling_steps, SIBLING_LR)):
        if _cached(paths[name], notes[name]):
            continue
        t = time.perf_counter()
        tok = get_tokenizer()
        model, _ = smollm.load_pretrained(paths["reference"])
        if name == "skill":
            rng = random.Random(opts.seed)
            make = lambda: skill_batch(tok, rng, exclude)  # noqa: E731
            desc = "fine-tune skill (addition)"
        else:
            rng = random.Random(opts.seed + 1)
            make = lambda: sibling_batch(tok, rng)  # noqa: E731
            desc = "fine-tune sibling (English)"
        losses = finetune(model, make, steps, lr, desc, seed=opts.seed, rng=rng,
                          checkpoint=opts.workdir / "checkpoints" / f"{name}.pt",
                          note=notes[name])
        _save(model, tok, paths[name], notes[name])
        facts["build_s"][name] = time.perf_counter() - t
        facts[f"{name}_loss"] = {"first": losses[0], "last10": sum(losses[-10:]) / len(losses[-10:])}
        del model

    # 4. scrambled targets
    checks = ["What is 347+582? Answer: 929", "The old farmer carried a red umbrella near the river.",
              "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n"]
    facts["scramble_max_logit_diff"] = {}
    for base in ("reference", "sibling"):
        name = f"{base}-scrambled"
        cached = _cached(paths[name], notes[name])
        tok = get_tokenizer()
        original, _ = smollm.load_pretrained(paths[base])
        if not cached:
            t = time.perf_counter()
            state, _transforms = scramble_state_dict(
                original.state_dict(), original.config, seed=SCRAMBLE_SEEDS[base] + opts.seed
            )
            scrambled, _ = smollm.load_pretrained(paths[base])
            scrambled.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
            _save(scrambled, tok, paths[name], notes[name])
            facts["build_s"][name] = time.perf_counter() - t
        else:
            scrambled, _ = smollm.load_pretrained(paths[name])
        diff = max_logit_diff(original, scrambled, tok, checks)
        weight_change = max(
            float((a - b).abs().max()) / max(float(a.abs().max()), 1e-12)
            for (n, a), (_, b) in zip(original.state_dict().items(), scrambled.state_dict().items())
            if ".layers." in n
        )
        facts["scramble_max_logit_diff"][base] = diff
        _log(f"{name}: same function as {base}: max |delta logits| = {diff:.2e} "
             f"(weights moved: max |delta w| / max |w| = {weight_change:.2f})")
        del original, scrambled
    return facts


# --------------------------------------------------------------------------- merges


def check_plain_ta(merged: Path, target: Path, reference: Path, skill: Path) -> float:
    """max |merged - (target + skill - reference)| over every tensor the merge wrote."""
    m, t, r, s = (load_tensors(p) for p in (merged, target, reference, skill))
    if not m or set(m) - set(t):
        raise RuntimeError(f"{merged}: unexpected tensors {sorted(set(m) - set(t))[:5]}")
    worst = 0.0
    for name, value in m.items():
        expected = t[name].double() + s[name].double() - r[name].double()
        worst = max(worst, float((value.double() - expected).abs().max()))
    return worst


def max_relative_difference(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> float:
    """max over tensors of max |a - b| / max |b| (the same tensor names in both)."""
    if a.keys() != b.keys():
        raise ValueError(f"different tensors: {sorted(a.keys() ^ b.keys())[:5]}")
    worst = 0.0
    for name, value in a.items():
        expected = b[name].to(value.dtype)
        scale = max(float(expected.abs().max()), 1e-12)
        worst = max(worst, float((value - expected).abs().max()) / scale)
    return worst


def equivariance_error(merged_scrambled: Path, merged: Path, config, seed: int) -> float:
    """max over tensors of max |A - T(B)| / max |T(B)|, T = the scramble with ``seed``."""
    from mergekit_symalign.statedict import scramble_state_dict

    tb, _ = scramble_state_dict(load_tensors(merged), config, seed=seed)
    return max_relative_difference(load_tensors(merged_scrambled), tb)


# --------------------------------------------------------------------------- main


def parse_args(argv: Optional[Sequence[str]] = None) -> Options:
    ap = argparse.ArgumentParser(
        prog="python -m examples.demo",
        description="Plain vs symmetry-aligned task arithmetic (through mergekit-yaml) on a "
                    "model family built from SmolLM2-135M-Instruct, on CPU, offline.",
    )
    ap.add_argument("--workdir", default="demo-output",
                    help="where models, merges and results go (default: ./demo-output)")
    ap.add_argument("--steps", type=int, default=120,
                    help="skill fine-tune steps (batch %d; default 120)" % BATCH)
    ap.add_argument("--sibling-steps", type=int, default=40,
                    help="sibling fine-tune steps (default 40)")
    ap.add_argument("--eval-problems", type=int, default=100,
                    help="held-out addition problems to score (default 100, at most %d)" % EVAL_POOL)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fresh", action="store_true", help="rebuild every model from scratch")
    ap.add_argument("--keep-merges", action="store_true",
                    help="keep every merged model (default: only merges/%s, with its model "
                         "card; the others' recipes stay)" % KEPT_MERGE)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--verbose", action="store_true", help="show mergekit's output")
    a = ap.parse_args(argv)
    if a.steps < 1 or a.sibling_steps < 1 or a.threads < 1:
        ap.error("--steps, --sibling-steps and --threads must be positive")
    if not 1 <= a.eval_problems <= EVAL_POOL:
        ap.error(f"--eval-problems must be between 1 and {EVAL_POOL}")
    return Options(Path(a.workdir).resolve(), a.steps, a.sibling_steps, a.eval_problems, a.seed,
                   a.fresh, a.keep_merges, a.threads, a.verbose)


def _fmt_time(seconds: Optional[float]) -> str:
    return "" if seconds is None else f"{seconds:.1f}"


def results_table(rows: List[Dict[str, Any]]) -> str:
    lines = ["| target | method | skill accuracy | KL to skill | merge time (s) |",
             "|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['target']} | {r['method']} | {r['accuracy']:.3f} | "
                     f"{r['kl_to_skill']:.4f} | {_fmt_time(r.get('merge_s'))} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    opts = parse_args(argv)
    # Everything is local: never ask the Hugging Face Hub (set before any model is loaded).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    torch.set_num_threads(opts.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    start = time.perf_counter()
    if opts.fresh and opts.workdir.exists():
        for sub in ("models", "merges", "checkpoints", "report"):
            shutil.rmtree(opts.workdir / sub, ignore_errors=True)
    opts.workdir.mkdir(parents=True, exist_ok=True)
    try:
        smollm.gguf_path()
    except smollm.SmolLM2Missing as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    problems = eval_problems(opts.eval_problems, opts.seed)
    facts = build_family(opts)
    paths = {k: Path(v) for k, v in facts["paths"].items()}
    build_s = time.perf_counter() - start
    _log(f"model family ready in {build_s:.0f} s ({opts.workdir / 'models'})")

    _, tok = smollm.load_pretrained(paths["reference"])

    def evaluate(path: Path) -> Tuple[float, torch.Tensor, List[str]]:
        model, _ = smollm.load_pretrained(path)
        acc, texts = skill_accuracy(model, tok, problems)
        logp = answer_logprobs(model, tok, problems)
        return acc, logp, texts

    rows: List[Dict[str, Any]] = []
    skill_acc, skill_logp, _ = evaluate(paths["skill"])
    for name in ("reference", "skill", "sibling"):
        acc, logp, _ = (skill_acc, skill_logp, None) if name == "skill" else evaluate(paths[name])
        rows.append({"target": name, "method": "(no merge)", "accuracy": acc,
                     "kl_to_skill": mean_kl(skill_logp, logp), "merge_s": None})
        _log(f"{name:>20} alone: accuracy {acc:.3f}, KL to skill {rows[-1]['kl_to_skill']:.4f}")

    merges_dir = opts.workdir / "merges"
    config = None
    equivariance: Dict[str, float] = {}
    same_as_plain: Dict[str, float] = {}
    keep_for_check: List[Path] = []
    for target in TARGETS:
        for method in METHODS:
            short = "plain" if method == "task_arithmetic" else "aligned"
            out = merges_dir / f"{target}--{short}"
            spec = transfer_recipe(paths[target], paths["reference"], paths["skill"],
                                   None if method == "task_arithmetic" else {})
            _log(f"merging: {method} of the skill vector onto {target} ...")
            wall = run_mergekit_yaml(spec, merges_dir / f"{target}--{short}.yaml", out,
                                     quiet=not opts.verbose, show_output=opts.verbose).wall_s
            row = {"target": target, "method": method, "merge_s": wall,
                   "recipe": str(merges_dir / f"{target}--{short}.yaml")}
            if method == "task_arithmetic":
                row["max_abs_err_vs_target_plus_skill_minus_reference"] = check_plain_ta(
                    out, paths[target], paths["reference"], paths["skill"])
            acc, logp, texts = evaluate(out)
            row.update(accuracy=acc, kl_to_skill=mean_kl(skill_logp, logp), samples=texts[:5])
            rows.append(row)
            _log(f"{target:>20} {short:>7}: accuracy {acc:.3f}, KL to skill "
                 f"{row['kl_to_skill']:.4f}, merge {wall:.1f} s")
            base = target[: -len("-scrambled")] if target.endswith("-scrambled") else None
            if short == "aligned" and base is not None:
                # The aligned merge must be equivariant: merging onto T(target) gives
                # T(merge onto target), T the scramble (same seed, hence same transforms).
                if config is None:
                    from transformers import AutoConfig

                    config = AutoConfig.from_pretrained(str(paths["reference"]))
                err = equivariance_error(out, merges_dir / f"{base}--aligned", config,
                                         SCRAMBLE_SEEDS[base] + opts.seed)
                equivariance[target] = err
                row["max_rel_err_vs_scrambled_unscrambled_merge"] = err
                _log(f"{'':>20} aligned merge onto {target} = scramble(aligned merge onto "
                     f"{base}) up to max |delta w| / max |w| = {err:.1e}")
            if short == "aligned" and base is None:
                # Same base: the alignment is the identity, so the aligned merge is plain task
                # arithmetic's up to float rounding (the two sum the deltas in another order).
                err = max_relative_difference(load_tensors(out),
                                              load_tensors(merges_dir / f"{target}--plain"))
                same_as_plain[target] = err
                row["max_rel_err_vs_plain_merge"] = err
                _log(f"{'':>20} aligned merge onto {target} = plain merge onto {target} up to "
                     f"max |delta w| / max |w| = {err:.1e}")
            if base is None:  # kept for the checks above and below
                keep_for_check.append(out)
            elif not opts.keep_merges and out.name != KEPT_MERGE:
                shutil.rmtree(out, ignore_errors=True)
    if not opts.keep_merges:
        for out in keep_for_check:
            shutil.rmtree(out, ignore_errors=True)
    report_dir = write_alignment_report(merges_dir / f"{KEPT_MERGE}.yaml", opts.workdir / "report",
                                        opts.verbose)

    table = results_table(rows)
    total = time.perf_counter() - start
    header = (
        f"Skill: 2-3 digit addition, {len(problems)} held-out problems (greedy, exact match). "
        f"KL: mean KL(skill || model) of the next-token distribution at the answer positions. "
        f"Merges: mergekit-yaml wall time (includes process start-up).\n"
    )
    notes = summary_lines(rows, facts, equivariance, same_as_plain)
    print()
    print(header)
    print(table)
    print()
    print("In short (README.md's table):")
    print()
    print(condensed_table(rows))
    print()
    for line in notes:
        print(line)
    print(f"total {total:.0f} s (model family {build_s:.0f} s)")
    print()
    print(where_everything_is(opts.workdir, merges_dir, report_dir, opts.keep_merges))
    (opts.workdir / "results.md").write_text(
        "# Plain vs symmetry-aligned task arithmetic (SmolLM2-135M-Instruct)\n\n"
        + header + "\n" + table + "\n\nIn short:\n\n" + condensed_table(rows) + "\n\n"
        + "\n".join(f"* {line}" for line in notes) + "\n"
    )
    payload = {
        "rows": rows,
        "eval_problems": len(problems),
        "options": {"steps": opts.steps, "sibling_steps": opts.sibling_steps, "seed": opts.seed,
                    "threads": opts.threads},
        "build": facts,
        "equivariance_max_rel_err": equivariance,
        "total_s": total,
    }
    (opts.workdir / "results.json").write_text(json.dumps(payload, indent=2, default=str))
    return 0


def condensed_table(rows: List[Dict[str, Any]]) -> str:
    """The README's table: per target, plain and aligned accuracy / KL side by side."""
    names = {"reference": "reference", "sibling": "sibling",
             "reference-scrambled": "reference under an exact random symmetry",
             "sibling-scrambled": "sibling under an exact random symmetry"}
    cell = {(r["target"], r["method"]): f"{r['accuracy']:.2f} / {r['kl_to_skill']:.3f}"
            for r in rows}
    lines = ["| target | plain task_arithmetic (acc / KL) | symmetry_aligned (acc / KL) |",
             "|---|---|---|"]
    for target in TARGETS:
        lines.append(f"| {names[target]} | {cell[(target, METHODS[0])]} | "
                     f"{cell[(target, METHODS[1])]} |")
    return "\n".join(lines)


def write_alignment_report(recipe: Path, out: Path, verbose: bool) -> Optional[Path]:
    """``mergekit-symalign report`` of the kept merge's recipe into ``out`` (None if it fails:
    the demo's results stand without it)."""
    import subprocess

    script = Path(sys.executable).with_name("mergekit-symalign")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "mergekit_symalign.cli"]
    _log(f"alignment report of {recipe.name} ...")
    proc = subprocess.run(command + ["report", str(recipe), str(out), "--quiet"],
                          capture_output=not verbose, text=True)
    if proc.returncode != 0:
        _log(f"the alignment report failed ({proc.returncode}): {(proc.stderr or '')[-500:]}")
        return None
    return out


def where_everything_is(workdir: Path, merges: Path, report: Optional[Path],
                        keep_merges: bool) -> str:
    """The closing lines: what the demo left and where."""
    def show(path: Path) -> str:
        try:
            return str(path.relative_to(Path.cwd()))
        except ValueError:
            return str(path)

    kept = (f"{show(merges)}/*/ (every merge; README.md in each is its model card)" if keep_merges
            else f"{show(merges / KEPT_MERGE)}/ (an aligned merge; README.md is its model card)")
    lines = ["Where everything is:",
             f"  {show(workdir / 'results.md')}, results.json   the tables above, every figure",
             f"  {kept}",
             f"  {show(merges)}/*.yaml   every recipe (mergekit-yaml RECIPE OUT merges it again)",
             f"  {show(workdir / 'models')}/   the model family (reused by the next run; "
             f"--fresh rebuilds it)"]
    if report is not None:
        lines.append(f"  {show(report)}/   mergekit-symalign report of {KEPT_MERGE}.yaml: "
                     f"report.md, report.json, distance.png, moved.png")
    return "\n".join(lines)


def summary_lines(rows, facts, equivariance, same_as_plain=None) -> List[str]:
    acc = {(r["target"], r["method"]): r["accuracy"] for r in rows}

    def accs(method):
        return ", ".join(f"{t} {acc[(t, method)]:.2f}" for t in TARGETS)

    diffs = facts["scramble_max_logit_diff"]
    lines = [
        f"alone: reference {acc[('reference', '(no merge)')]:.2f}, skill "
        f"{acc[('skill', '(no merge)')]:.2f}, sibling {acc[('sibling', '(no merge)')]:.2f}",
        f"plain task_arithmetic: {accs('task_arithmetic')}",
        f"symmetry_aligned_task_arithmetic: {accs('symmetry_aligned_task_arithmetic')}",
        "scrambles are exact: max |delta logits| scrambled vs original: "
        + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()),
    ]
    if same_as_plain:
        lines.append(
            "aligned merge onto an unscrambled target = plain task_arithmetic's (the alignment "
            "is the identity), up to max |delta w| / max |w| of "
            + ", ".join(f"{k} {v:.1e}" for k, v in same_as_plain.items())
        )
    if equivariance:
        lines.append(
            "aligned merge onto a scrambled target = the scramble of the aligned merge onto the "
            "original, up to max |delta w| / max |w| of "
            + ", ".join(f"{k} {v:.1e}" for k, v in equivariance.items())
        )
    return lines


if __name__ == "__main__":
    sys.exit(main())
