"""The Markdown of docs/independent-init.md's generated region: tables, verdicts, notes."""

from __future__ import annotations

import math
import statistics
from typing import Dict, List, Sequence

from benchmarks.independent_init.matching import ROUNDS
from benchmarks.independent_init.variants import FUSION, PARTS_VARIANTS, SAME_BASE, TRANSFER, config_for


def mean_se(values: Sequence[float], digits: int = 2, percent: bool = False) -> str:
    values = [v * 100 if percent else v for v in values]
    m = statistics.mean(values)
    unit = " %" if percent else ""
    fmt = f"{{:.{0 if percent else digits}f}}"
    if len(values) < 2:
        return fmt.format(m) + unit
    se = statistics.stdev(values) / math.sqrt(len(values))
    return f"{fmt.format(m)} ± {fmt.format(se)}{unit}"


def se(values: Sequence[float]) -> float:
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0


def fusion_table(pairs: List[Dict], width: int) -> str:
    sel = [p for p in pairs if p["width"] == width]
    lines = [f"**Width {width}** ({len(sel)} seed pair{'s' if len(sel) != 1 else ''}; "
             f"endpoint losses {mean_se([p['variants']['plain']['losses'][0] for p in sel])} / "
             f"{mean_se([p['variants']['plain']['losses'][-1] for p in sel])} nats):", "",
             "| variant | barrier (nats) | barrier / plain | loss at α = ½ | distance to A | "
             "residual corr. | MLP corr. | align (s) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in FUSION:
        rows = [p["variants"][name] for p in sel if name in p["variants"]]
        if not rows:
            continue
        plain = [p["variants"]["plain"]["barrier"] for p in sel if name in p["variants"]]
        mid = [r["losses"][len(r["losses"]) // 2] for r in rows]
        ratio = [r["barrier"] / b for r, b in zip(rows, plain)]
        lines.append(
            f"| {name} | {mean_se([r['barrier'] for r in rows])} | "
            f"{'' if name == 'plain' else mean_se(ratio, percent=True)} | {mean_se(mid)} | "
            f"{mean_se([r['distance'] for r in rows])} | {mean_se([r['residual_corr'] for r in rows])} | "
            f"{mean_se([r['mlp_corr'] for r in rows])} | {statistics.mean(r['align_s'] for r in rows):.1f} |")
    return "\n".join(lines)


def ratio_table(pairs: List[Dict], widths: Sequence[int]) -> str:
    head = "| variant | " + " | ".join(f"width {w}" for w in widths) + " |"
    lines = [head, "|---|" + "---:|" * len(widths)]
    for name in FUSION:
        if name == "plain":
            cells = [mean_se([p["variants"]["plain"]["barrier"] for p in pairs if p["width"] == w])
                     + " nats" for w in widths]
            lines.append("| plain barrier | " + " | ".join(cells) + " |")
            continue
        cells = []
        for w in widths:
            vals = [p["variants"][name]["barrier"] / p["variants"]["plain"]["barrier"]
                    for p in pairs if p["width"] == w and name in p["variants"]]
            cells.append(mean_se(vals, percent=True) if vals else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def iterative_table(pairs: List[Dict], widths: Sequence[int]) -> str:
    lines = ["| width | residual | distance to A, one pass | after each re-solve | barrier, one pass "
             "→ iterative |", "|---:|---|---:|---|---|"]
    for w in widths:
        sel = [p for p in pairs if p["width"] == w]
        for mode, once in (("permutation", "+ residual permutation"),
                           ("orthogonal", "+ residual orthogonal")):
            name = f"iterative, {mode}"
            traces = [p["variants"][name]["trace"] for p in sel if name in p["variants"]]
            if not traces:
                continue
            steps = min(len(t) for t in traces)
            by_round = [statistics.mean(t[r]["distance"] for t in traces) for r in range(steps)]
            b1 = [p["variants"][once]["barrier"] for p in sel]
            b2 = [p["variants"][name]["barrier"] for p in sel]
            lines.append(f"| {w} | {mode} | {by_round[0]:.3f} | "
                         + " → ".join(f"{d:.3f}" for d in by_round[1:])
                         + f" | {mean_se(b1)} → {mean_se(b2)} |")
    return "\n".join(lines)


def parts_table(pairs: List[Dict], widths: Sequence[int]) -> str:
    names = [n for n in PARTS_VARIANTS]
    parts = list(pairs[0]["parts"][names[0]])
    lines = ["| width | variant | whole model at ½ | " + " | ".join(parts) + " |",
             "|---:|---|---:|" + "---:|" * len(parts)]
    for w in widths:
        sel = [p for p in pairs if p["width"] == w and "parts" in p]
        for name in names:
            whole = [p["variants"][name]["losses"][len(p["variants"][name]["losses"]) // 2]
                     - p["variants"][name]["losses"][0] for p in sel]
            cells = [mean_se([p["parts"][name][part] for p in sel]) for part in parts]
            lines.append(f"| {w} | {name} | {mean_se(whole)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def transfer_table(rows: List[Dict], setting: str, width: int) -> str:
    lines = ["| model | skill: add | target's own: rev, sort | shared: copy, next | "
             "KL(skill ‖ ·) on add | KL(target ‖ ·) on own | distance to reference |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    order = ["reference", "skill", "target", *TRANSFER]
    for variant in order:
        sel = [r for r in rows if r["width"] == width and r["variant"] == variant
               and (r["setting"] == setting or (r["setting"] == "models" and setting == "same base"))]
        if not sel:
            continue
        cells = [mean_se([r[k] for r in sel]) if k in sel[0] else "" for k in
                 ("skill", "own", "shared", "kl_skill", "kl_target", "distance_to_reference")]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def snap_note(pairs: List[Dict], widths: Sequence[int]) -> str:
    """Whether the one-pass weight-based rotation was kept, per width (from ``residual_fit``)."""
    lines = ["| width | rotation kept (pairs) | its gain, share of the permutation's objective "
             "| noise limit it must beat | entries (2 × vocab × width) |",
             "|---:|---:|---:|---:|---:|"]
    for w in widths:
        fits = [p["residual_fit"] for p in pairs if p["width"] == w and "residual_fit" in p]
        if not fits:
            continue
        kept = sum(f["mode"] == "orthogonal" for f in fits)
        lines.append(f"| {w} | {kept} / {len(fits)} | {mean_se([f['gain_share'] for f in fits])} "
                     f"| {statistics.mean(f['threshold'] for f in fits):.2f} | "
                     f"{fits[0]['entries']} |")
    return "\n".join(lines)


def fusion_verdict(pairs: List[Dict], widths: Sequence[int]) -> str:
    """The goal (aligned barrier <= 30 % of plain at the widest width), per width's best."""
    out = []
    for w in widths:
        sel = [p for p in pairs if p["width"] == w]
        ratios = {name: [p["variants"][name]["barrier"] / p["variants"]["plain"]["barrier"]
                         for p in sel if name in p["variants"]] for name in FUSION if name != "plain"}
        best = min((n for n in ratios if ratios[n]), key=lambda n: statistics.mean(ratios[n]))
        out.append(f"width {w}: plain {mean_se([p['variants']['plain']['barrier'] for p in sel])} "
                   f"nats, best variant *{best}* {mean_se([p['variants'][best]['barrier'] for p in sel])}"
                   f" nats = {mean_se(ratios[best], percent=True)} of plain")
    w = max(widths)
    sel = [p for p in pairs if p["width"] == w]
    means = {n: statistics.mean(p["variants"][n]["barrier"] / p["variants"]["plain"]["barrier"]
                                for p in sel) for n in FUSION if n != "plain"}
    met = min(means.values()) <= 0.30
    return ("**Goal 1, barrier ≤ 30 % of plain at the widest width ("
            f"{w}): {'met' if met else 'not met'}.** Best variant per width (chosen after the "
            "fact among all variants, so optimistic): " + "; ".join(out) + ".")


def transfer_verdict(rows: List[Dict], width: int) -> str:
    """The goal (cross-init skill gain >= half the same-base transfer's), per variant."""
    seeds = sorted({r["seed"] for r in rows if r["width"] == width})

    def get(setting, variant, seed):
        for r in rows:
            if (r["width"], r["setting"], r["variant"], r["seed"]) == (width, setting, variant, seed):
                return r
        return None

    def gains(setting, variant):
        return [get(setting, variant, s)["skill"] - get(setting, "target", s)["skill"]
                for s in seeds if get(setting, variant, s)]

    def own(setting, variant):
        return [get(setting, variant, s)["own"] - get(setting, "target", s)["own"]
                for s in seeds if get(setting, variant, s)]

    same = gains("same base", "target + τ (plain task arithmetic)")
    lines = ["| setting | model | skill gain over its target | own-task change |",
             "|---|---|---:|---:|"]
    for setting, variants in (("same base", SAME_BASE), ("other init", list(TRANSFER))):
        for v in variants:
            g = gains(setting, v)
            if g:
                lines.append(f"| {setting} | {v} | {mean_se(g)} | {mean_se(own(setting, v))} |")
    other = {v: statistics.mean(gains("other init", v)) for v in TRANSFER if gains("other init", v)}
    best = max(other, key=other.get)
    half = statistics.mean(same) / 2
    met = other[best] >= half and statistics.mean(same) > 0
    return "\n".join([
        f"**Goal 2, cross-init skill gain ≥ ½ of the same-base transfer's (width {width}): "
        f"{'met' if met else 'not met'}.** Same-base plain task arithmetic raises the skill "
        f"by {mean_se(same)} over its target (half: {half:.2f}); the best cross-init variant, "
        f"*{best}*, by {other[best]:.3f}. Gains and own-task changes are per seed against the "
        "target the vector was added to (mean ± SE):", "", *lines])


def timing_note(saved: Dict) -> str:
    """Where the time went (summed over seeds; cached steps count with the time they took)."""
    t = saved.get("timings", {})

    def total(kind):
        vals = [v for k, v in t.items() if k.endswith(kind) and v]
        return sum(vals) / 60

    return (f"Compute (1 thread, on a machine shared with other jobs): training "
            f"{total('-train'):.0f} min where recorded, fusion measurements "
            f"{total('-fusion'):.0f} min, transfers {total('-transfer'):.0f} min; this "
            f"invocation {saved['wall_s'] / 60:.0f} min (everything already in the workdir is "
            f"reused).")


def command(saved: Dict) -> str:
    a = saved["args"]
    parts = [".venv/bin/python -m benchmarks.independent_init", f"--seeds {a['seeds']}",
             "--widths " + " ".join(a["widths"])]
    if a["transfer_widths"] != [128]:
        parts.append("--transfer-widths " + " ".join(map(str, a["transfer_widths"])))
    return " ".join(parts)


def render(saved: Dict) -> str:
    pairs, rows, alphas = saved["pairs"], saved["transfer"], saved["alphas"]
    widths = sorted({p["width"] for p in pairs})
    a = saved["args"]
    cfg = config_for(widths[0])
    text = [
        f"Llama, {cfg.num_hidden_layers} layers, GQA {cfg.num_attention_heads}/"
        f"{cfg.num_key_value_heads} heads (head_dim = width / 4), MLP 3 × width, untied "
        f"embeddings; bases trained as the paper analog's (800 steps, batch 32). Linear path: "
        f"{len(alphas)} points, loss on {a['eval_examples']} held-out pre-training examples; "
        f"activation matching and correlations on {a['calibration']} calibration lines. "
        f"Regenerate: `{command(saved)}` ({saved['date']}; {saved['machine']}). "
        + timing_note(saved),
        "",
        "**Barrier / plain barrier against width** (mean ± SE over seed pairs; the goal is "
        "30 %):", "", ratio_table(pairs, widths), "",
    ]
    text += [fusion_verdict(pairs, widths), ""]
    if any("residual_fit" in p for p in pairs):
        text += ["**Was the weight-based rotation kept?** `+ residual orthogonal` is the "
                 "package's one-pass solve from the embedding and lm_head rows of the toy "
                 "vocabulary only; the package keeps a rotation only where it removes a larger "
                 "share of the signed permutation's objective than a fit of its D (D − 1) / 2 "
                 "parameters would remove from noise, and otherwise uses the signed "
                 "permutation (then the row equals `+ residual permutation`):", "",
                 snap_note(pairs, widths), ""]
    for w in widths:
        text += [fusion_table(pairs, w), ""]
    text += ["**Iterative weight matching** (mean relative distance ‖B' − A‖ / ‖A‖ over all "
             f"tensors after the first pass and after each of {ROUNDS} residual re-solves; "
             "barrier mean ± SE):", "", iterative_table(pairs, widths), ""]
    if all("parts" in p for p in pairs):
        text += ["**Where the barrier is**: model A with one part replaced by the midpoint "
                 "(A + B') / 2 of that part, loss above A's own (nats; mean ± SE). The first "
                 "column is the whole midpoint's excess over A:", "",
                 parts_table(pairs, widths), ""]
    for w in sorted({r["width"] for r in rows}):
        n = len({r["seed"] for r in rows if r["width"] == w})
        text += [f"**Transfer at width {w}** ({n} seeds; {a['problems']} held-out problems per "
                 "task). Target from the reference's own base (the paper analog's setting):", "",
                 transfer_table(rows, "same base", w), "",
                 "Target from the other random initialisation:", "",
                 transfer_table(rows, "other init", w), "",
                 transfer_verdict(rows, w), ""]
    return "\n".join(text).strip()
