"""A parent's skill onto its pruned, *retrained* child, on real weights (docs/cross-size.md).

    .venv/bin/python -m benchmarks.cross_size_smollm2 [--workdir bench-output/cross-size-smollm2]
        [--family demo-output] [--child 576,3,3,1344,] [--distill-steps 40,120] [--sweep]

The parent is SmolLM2-135M-Instruct (the demo's reference), the skill model the demo's
addition fine-tune of it (``examples.demo.build_family``; a demo's ``demo-output`` is reused
when its build notes match). The **child** is the parent pruned by importance
(``crosssize.prune_state_dict``: residual channels, KV groups with their query heads, MLP
neurons, layers), then **distilled from the parent** (KL to the parent's next-token
distribution at every position; AdamW, constant learning rate after a short warm-up, every
weight trained, embeddings included) on English text the model never saw in this project:
the docstrings of Python's standard library, read with ``ast`` (nothing imported, nothing
downloaded). Snapshots are kept at each ``--distill-steps`` count (one run, so a longer
retraining continues the shorter one).

Onto each snapshot it moves ``tau = skill - parent``: by position (what a shape-blind tool
does), restricted by the maps matched from the weights (``crosssize.match_child``), by the true
pruning indices (the oracle), at scales 0.5 and 1.5 too; against the child fine-tuned on the
skill directly with the skill model's own schedule (``examples.demo.finetune``: 120 steps,
lr 3e-4, batch 16, embeddings frozen). Scores: addition accuracy on held-out problems (greedy,
exact match; the demo's held-out pool) and the child's own ability, measured as the mean
KL(parent || model) of next-token distributions on held-out docstrings (lower is better; the
child was distilled to imitate the parent). Once per snapshot the other direction: the child's
own skill fine-tune scattered into the parent (zeros elsewhere).

The machine is a CPU: one seed, and retraining lengths that a CPU allows (a real Minitron
child sees ~100B tokens; these see ~0.1-0.2M). Figures land in docs/cross-size.md between the
``generated:cross_size_smollm2`` markers.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import statistics
import os
import random
import sys
import sysconfig
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from benchmarks import docs_pages  # noqa: E402
from examples import demo, smollm  # noqa: E402
from mergekit_symalign import crosssize as cs  # noqa: E402

BUILD_VERSION = 1
SEQ, BATCH, WARMUP = 64, 8, 10
DISTILL_LR = 2e-4
SCALES = (0.5, 1.0, 1.5)
DEFAULT_REGION = "cross_size_smollm2"  # docs/cross-size.md's region for the default child


def _log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------- text


def stdlib_docstrings() -> Tuple[List[str], List[str]]:
    """(train, held-out) docstrings of the standard library's ``.py`` files, split by file
    (every tenth file, by sorted path, held out), without repeats. Parsed, never imported."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if "site-packages" not in p.parts and "test" not in p.parts
                   and "tests" not in p.parts and "idlelib" not in p.parts)
    train: List[str] = []
    held: List[str] = []
    for i, path in enumerate(files):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        docs = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 80:
                    docs.append(doc)
        (held if i % 10 == 0 else train).extend(docs)
    seen = set(train)  # a docstring repeated across files stays on the training side
    return list(dict.fromkeys(train)), [d for d in dict.fromkeys(held) if d not in seen]


def token_blocks(tok, texts: Sequence[str], length: int, limit: int) -> torch.Tensor:
    """``[n, length]`` consecutive token blocks of the texts joined by EOS (at most ``limit``)."""
    ids: List[int] = []
    for t in texts:
        ids += tok(t)["input_ids"] + [tok.eos_token_id]
        if len(ids) >= length * limit:
            break
    n = min(limit, len(ids) // length)
    return torch.tensor(ids[: n * length]).reshape(n, length)


# --------------------------------------------------------------------------- models


@torch.no_grad()
def activation_importance(model, blocks: torch.Tensor) -> "cs.PruningImportance":
    """Minitron-style importance from activations on calibration blocks: a residual channel
    by the mean |value| of every norm's output (each layer's two, and the final one); a query
    head by the mean norm of what it writes into the residual stream (its slice of o_proj
    applied to its own output); a neuron by mean |input to down_proj| times its down_proj
    column's norm. (Weight norms alone drop SmolLM2 neurons and heads it depends on.)"""
    layers = model.model.layers
    g_heads = model.config.num_attention_heads
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // g_heads
    residual = torch.zeros(model.config.hidden_size, dtype=torch.float64)
    heads = {i: torch.zeros(g_heads, dtype=torch.float64) for i in range(len(layers))}
    neurons = {i: torch.zeros(model.config.intermediate_size, dtype=torch.float64) for i in range(len(layers))}
    hooks = []

    def on_norm(_m, _inp, out):
        residual.add_(out.detach().abs().double().mean((0, 1)))

    def on_o(i, o_proj):
        w = o_proj.weight.detach().double().reshape(o_proj.weight.shape[0], g_heads, head_dim)

        def hook(_m, inp):
            x = inp[0].detach().double().reshape(*inp[0].shape[:2], g_heads, head_dim)
            written = torch.einsum("bshd,ohd->bsho", x, w)  # each head's write, separately
            heads[i].add_(written.norm(dim=-1).mean((0, 1)))
        return hook

    def on_down(i, down):
        col = down.weight.detach().double().norm(dim=0)

        def hook(_m, inp):
            neurons[i].add_(inp[0].detach().double().abs().mean((0, 1)) * col)
        return hook

    for i, layer in enumerate(layers):
        hooks += [layer.input_layernorm.register_forward_hook(on_norm),
                  layer.post_attention_layernorm.register_forward_hook(on_norm),
                  layer.self_attn.o_proj.register_forward_pre_hook(on_o(i, layer.self_attn.o_proj)),
                  layer.mlp.down_proj.register_forward_pre_hook(on_down(i, layer.mlp.down_proj))]
    hooks.append(model.model.norm.register_forward_hook(on_norm))
    try:
        for j in range(0, len(blocks), 8):
            model.model(input_ids=blocks[j: j + 8])
    finally:
        for h in hooks:
            h.remove()
    return cs.PruningImportance(residual, heads, neurons)


def _model(config, state: Dict[str, torch.Tensor]):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # a tied model's lm_head.weight is its embedding; nothing else may be missing
    if unexpected or [m for m in missing if not m.endswith("lm_head.weight")]:
        raise RuntimeError(f"state dict does not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.eval()


def _state(model) -> Dict[str, torch.Tensor]:
    """A copy of the weights; a tied model without ``lm_head.weight`` (its embedding: the
    restriction reads that, and :func:`_model` ties it back)."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return state


@torch.no_grad()
def own_kl(model, parent_logprobs: torch.Tensor, blocks: torch.Tensor) -> float:
    """Mean KL(parent || model) of next-token distributions over the held-out blocks."""
    q = logprobs(model, blocks).reshape(-1, parent_logprobs.shape[-1])
    p = parent_logprobs.reshape(-1, q.shape[-1])
    return float((p.exp() * (p - q)).sum(-1).mean())


@torch.no_grad()
def logprobs(model, blocks: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.log_softmax(model(input_ids=blocks[i: i + 16]).logits.float(), -1)
                      for i in range(0, len(blocks), 16)])


def distill(student, teacher, blocks: torch.Tensor, stops: Sequence[int], lr: float,
            seed: int, on_stop) -> List[float]:
    """Train every weight of ``student`` to the teacher's next-token distributions (KL at every
    position), AdamW at a constant ``lr`` after a warm-up; ``on_stop(step, student)`` at each
    step count in ``stops`` (so a longer retraining continues the shorter one)."""
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / WARMUP))
    losses: List[float] = []
    bar = tqdm(range(max(stops)), desc="distil child from parent", unit="step", dynamic_ncols=True)
    for step in bar:
        batch = blocks[torch.randint(len(blocks), (BATCH,), generator=gen)]
        with torch.no_grad():
            target = torch.log_softmax(teacher(input_ids=batch).logits.float(), -1)
        logq = torch.log_softmax(student(input_ids=batch).logits.float(), -1)
        loss = (target.exp() * (target - logq)).sum(-1).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(kl=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
        if step + 1 in stops:
            student.eval()
            on_stop(step + 1, student)
            student.train()
    bar.close()
    student.eval()
    return losses


def skill_finetune(model, tok, steps: int, seed: int) -> None:
    """The skill model's own schedule (``examples.demo``), on the same problems' distribution
    with the demo's held-out pool excluded."""
    exclude = set(demo.eval_problems(demo.EVAL_POOL, seed))
    rng = random.Random(seed)
    demo.finetune(model, lambda: demo.skill_batch(tok, rng, exclude), steps, demo.SKILL_LR,
                  "fine-tune child on the skill", seed=seed, rng=rng)


# --------------------------------------------------------------------------- the run


def parse_child(text: str) -> Dict[str, object]:
    """``hidden,kv_groups,heads_per_group,intermediate,dropped layers (;-separated)``."""
    parts = (text.split(",") + [""] * 5)[:5]
    drop = tuple(int(x) for x in parts[4].split(";") if x.strip())
    return {"hidden": int(parts[0]), "kv_heads": int(parts[1]), "heads_per_group": int(parts[2]),
            "intermediate": int(parts[3]), "drop_layers": drop}


def describe(child: Dict[str, object], config) -> str:
    """The child's sizes against the parent's ``config``."""
    drop = child["drop_layers"]
    heads_per_group = config.num_attention_heads // config.num_key_value_heads
    return (f"{child['hidden']}/{config.hidden_size} channels, {child['kv_heads']}/"
            f"{config.num_key_value_heads} KV groups x {child['heads_per_group']}/{heads_per_group} "
            f"query heads, {child['intermediate']}/{config.intermediate_size} neurons"
            + (f", layers {', '.join(map(str, drop))} of {config.num_hidden_layers} dropped" if drop else ""))


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.cross_size_smollm2", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="bench-output/cross-size-smollm2")
    ap.add_argument("--family", default="demo-output",
                    help="the demo's workdir: its reference and skill model are reused or built there")
    ap.add_argument("--child", default="576,3,3,1344,",
                    help="hidden,kv_groups,heads_per_group,intermediate,dropped layers (;-separated)")
    ap.add_argument("--distill-steps", default="40,120",
                    help="retraining lengths (snapshots of one run), batch %d x %d tokens" % (BATCH, SEQ))
    ap.add_argument("--distill-lr", type=float, default=DISTILL_LR)
    ap.add_argument("--importance", choices=("activations", "weights"), default="activations",
                    help="what ranks channels, heads and neurons for pruning (default: activations "
                         "on --calibration-blocks blocks of the training text, as Minitron)")
    ap.add_argument("--calibration-blocks", type=int, default=64)
    ap.add_argument("--skill-steps", type=int, default=120, help="the child's own skill fine-tune")
    ap.add_argument("--eval-problems", type=int, default=200)
    ap.add_argument("--own-blocks", type=int, default=32, help="held-out docstring blocks for the own-ability KL")
    ap.add_argument("--sweep", default="",
                    help="only measure the pruned skill model (no retraining) at these children, "
                         "';'-separated --child values, and stop")
    ap.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-docs", dest="docs", action="store_false",
                    help="do not write the table into docs/cross-size.md")
    ap.add_argument("--render", metavar="RESULTS_JSON",
                    help="only rewrite the docs table from a saved results.json (no model is run)")
    ap.add_argument("--region", default=DEFAULT_REGION,
                    help="the docs/cross-size.md region the table goes to")
    a = ap.parse_args(argv)
    if a.render:
        text = render(json.loads(Path(a.render).read_text()), a.region)
        if a.docs:
            docs_pages.update_page("cross-size.md", a.region, text)
        _log(text)
        return 0
    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    workdir = Path(a.workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    opts = demo.Options(Path(a.family).resolve(), 120, 40, 100, a.seed, False, False, a.threads, False)
    paths = demo.build_family(opts)["paths"]
    parent, tok = smollm.load_pretrained(paths["reference"])
    skill, _ = smollm.load_pretrained(paths["skill"])
    cfg = parent.config
    p_sd, s_sd = _state(parent), _state(skill)
    problems = demo.eval_problems(a.eval_problems, a.seed)
    train_text, held_text = stdlib_docstrings()
    own_blocks = token_blocks(tok, held_text, SEQ, a.own_blocks)
    parent_lp = logprobs(parent, own_blocks)
    importance = (activation_importance(parent, token_blocks(tok, train_text, SEQ, a.calibration_blocks))
                  if a.importance == "activations" else None)

    def score(model) -> Dict[str, float]:
        acc, _ = demo.skill_accuracy(model, tok, problems)
        return {"skill": acc, "own_kl": own_kl(model, parent_lp, own_blocks)}

    rows: Dict[str, object] = {"parent": score(parent), "skill model": score(skill)}
    _log(f"parent {rows['parent']}; skill model {rows['skill model']}")

    if a.sweep:
        sweep = []
        for spec in a.sweep.split(";"):
            child = parse_child(spec)
            c_sd, c_cfg, true_map = cs.prune_state_dict(p_sd, cfg, importance=importance, **child)
            pruned_skill = cs.restrict_state_dict(s_sd, cfg, true_map)
            entry = {"child": describe(child, cfg), "child pruned": score(_model(c_cfg, c_sd)),
                     "skill model pruned": score(_model(c_cfg, pruned_skill))}
            _log(json.dumps(entry))
            sweep.append(entry)
        (workdir / "sweep.json").write_text(json.dumps({"parent": rows, "sweep": sweep}, indent=1))
        return 0

    child = parse_child(a.child)
    stops = sorted(int(x) for x in a.distill_steps.split(","))
    c_sd, c_cfg, true_map = cs.prune_state_dict(p_sd, cfg, importance=importance, **child)
    pruned_skill = cs.restrict_state_dict(s_sd, cfg, true_map)
    rows["child before retraining"] = score(_model(c_cfg, c_sd))
    rows["skill model pruned by the same indices"] = score(_model(c_cfg, pruned_skill))
    _log(json.dumps(rows))
    result: Dict[str, object] = {"args": vars(a), "child": describe(child, cfg), "rows": rows,
                                 "snapshots": {}}

    def save() -> None:  # after every snapshot, so an interrupted run keeps what it measured
        (workdir / "results.json").write_text(json.dumps(result, indent=1, default=float))

    def evaluate(step: int, student) -> None:
        t0 = time.perf_counter()
        retrained = _state(student)
        out: Dict[str, object] = {"child": score(student)}
        out["child + tau by position"] = score(_model(c_cfg, cs.by_position(retrained, p_sd, s_sd)))
        t = time.perf_counter()
        match = cs.match_child(p_sd, cfg, retrained, c_cfg)
        match_s = time.perf_counter() - t
        recovery = {"residual": float((match.map.residual == true_map.residual).double().mean()),
                    "layers": float(match.map.layers == true_map.layers)}
        for axis in ("kv_groups", "q_heads", "neurons"):
            recovery[axis] = _mean([(getattr(m, axis) == getattr(t, axis)).double().mean()
                                    for m, t in zip(match.map.per_layer, true_map.per_layer)])
        for scale in SCALES:
            tag = "" if scale == 1.0 else f" (x{scale:g})"
            out[f"child + tau, matched{tag}"] = score(_model(c_cfg, cs.transfer(retrained, p_sd, s_sd, cfg, match.map, scale)))
        out["child + tau, oracle indices"] = score(_model(c_cfg, cs.transfer(retrained, p_sd, s_sd, cfg, true_map)))
        direct = _model(c_cfg, retrained)
        skill_finetune(direct, tok, a.skill_steps, a.seed)
        out["child fine-tuned on the skill"] = score(direct)
        other = cs.scatter(p_sd, retrained, _state(direct), cfg, match.map)
        out["parent + child's tau scattered (other direction)"] = score(_model(cfg, other))
        explained = cs.explained(retrained, p_sd, cfg, match.map)
        out["facts"] = {"index_recovery": recovery, "match_s": match_s,
                        "weakest_cosine": match.worst(),
                        "explained": explained, "eval_s": time.perf_counter() - t0}
        result["snapshots"][str(step)] = out
        _log(f"after {step} distillation steps: " + json.dumps(out))
        save()

    student = _model(c_cfg, c_sd)
    train_blocks = token_blocks(tok, train_text, SEQ, BATCH * max(stops))
    _log(f"distillation text: {len(train_blocks)} blocks of {SEQ} tokens "
         f"({len(train_text)} docstrings); held out: {len(own_blocks)} blocks")
    losses = distill(student, parent, train_blocks, stops, a.distill_lr, a.seed, evaluate)
    result.update(distill_kl={str(s): _mean(losses[max(0, s - 10): s]) for s in stops},
                  wall_s=time.perf_counter() - t_start, date=time.strftime("%Y-%m-%d"))
    save()
    if a.docs:
        docs_pages.update_page("cross-size.md", a.region, render(result, a.region))
    _log(render(result, a.region))
    return 0


def _mean(xs) -> float:
    xs = [float(x) for x in xs]
    return sum(xs) / len(xs) if xs else math.nan


def render(result: Dict[str, object], region: str = DEFAULT_REGION) -> str:
    a = result["args"]
    where = "" if region == DEFAULT_REGION else f" --region {region}"
    rows, snaps = result["rows"], result["snapshots"]
    lines = [
        f"Parent SmolLM2-135M-Instruct; skill model: the demo's addition fine-tune; child: "
        f"{result['child']}, kept by {a['importance']} importance and re-ordered, then distilled from the parent on "
        f"stdlib docstrings (batch {BATCH} x {SEQ} tokens, lr {a['distill_lr']:g}, every weight). "
        f"Skill: addition accuracy on {a['eval_problems']} held-out problems (greedy, exact match; binomial "
        f"standard error at most {0.5 / math.sqrt(a['eval_problems']):.3f}); own: mean KL(parent || "
        f"model) on {a['own_blocks']} held-out docstring blocks (lower is better). One seed. "
        f"Regenerate: `.venv/bin/python -m benchmarks.cross_size_smollm2 --child '{a['child']}' --importance {a['importance']} "
        f"--distill-steps {a['distill_steps']}{where}` ({result.get('wall_s', math.nan) / 60:.0f} min on a shared "
        f"2-core x86_64 CPU, torch {torch.__version__}, {result.get('date', time.strftime('%Y-%m-%d'))}).",
        "",
        "| model | skill: addition | own: KL to parent |",
        "|---|---:|---:|",
    ]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['skill']:.2f} | {r['own_kl']:.3f} |")
    for step, snap in snaps.items():
        kl = result.get("distill_kl", {}).get(step)
        lines += ["", f"**Child distilled {step} steps**"
                  + (f" (training KL to the parent over its last 10 steps: {kl:.3f})" if kl is not None else "")
                  + ":", "",
                  "| model | skill: addition | own: KL to parent |", "|---|---:|---:|"]
        for name, r in snap.items():
            if name != "facts":
                lines.append(f"| {name} | {r['skill']:.2f} | {r['own_kl']:.3f} |")
        f = snap["facts"]
        mats = [v for k, v in f["explained"].items() if "norm" not in k]
        child_acc = snap["child"]["skill"]
        gain = snap["child + tau, matched"]["skill"] - child_acc
        direct = snap["child fine-tuned on the skill"]["skill"] - child_acc
        lines += ["", f"Matched gain / direct fine-tune's gain: {gain:.2f} / {direct:.2f}"
                  + (f" ({gain / direct:.0%})" if direct > 0 else "") + ". Index recovery: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in f["index_recovery"].items())
                  + f"; weakest matched mean cosine {f['weakest_cosine']:.4f}; share of each child "
                  f"weight matrix the restricted parent explains: min {min(mats):.4f}, median "
                  f"{statistics.median(mats):.4f}; matching {f['match_s']:.0f} s."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
