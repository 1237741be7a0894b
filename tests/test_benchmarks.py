"""The paper-analog benchmark's toy world and a smoke run of its pipeline (tiny schedules).

The benchmark's numbers live in docs/paper-analog.md; here we only check that the pipeline
the regeneration command runs still works, and that its plain baseline is what it claims.
"""

import json
import re
from pathlib import Path

import pytest
import torch

from benchmarks import toyworld as tw

ROOT = Path(__file__).resolve().parent.parent


def test_toy_tokenizer_matches_training_ids(tmp_path):
    """Activation alignment tokenizes calibration text with the saved tokenizer: the ids must
    be the ones the models were trained on."""
    tok = tw.save_tokenizer(tmp_path)
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    world = tw.World()
    import random

    rng = random.Random(0)
    texts = [world.sentence(rng), world.number_run(rng)] + [
        "".join(tw.task_example(t, rng)) for t in tw.TASKS]
    for t in texts:
        assert loaded(t)["input_ids"] == tok(t)["input_ids"] == [tw.BOS] + tw.encode(t)
    assert tw.decode(tw.encode(texts[0])) == texts[0]


def test_toy_tasks_and_scorer():
    assert tw.task_example("add", __import__("random").Random(3))[1].strip(" .").isdigit()
    held = tw.held_out("rev", 50)
    assert len({p for p, _ in held}) == 50
    assert all(c.strip(" .") == p.split()[1][::-1] for p, c in held)

    class Oracle(torch.nn.Module):  # predicts each example's completion exactly
        def __init__(self, examples):
            super().__init__()
            self.answers = {tuple([tw.BOS] + tw.encode(p)): tw.encode(c) + [tw.EOS]
                            for p, c in examples}

        def forward(self, input_ids):
            logits = torch.zeros(input_ids.shape[0], input_ids.shape[1], len(tw.VOCAB))
            for i, row in enumerate(input_ids.tolist()):
                for n in range(1, len(row) + 1):
                    if tuple(row[:n]) in self.answers:
                        done = len(row) - n
                        logits[i, -1, self.answers[tuple(row[:n])][done]] = 1.0
            return type("Out", (), {"logits": logits})

    assert tw.accuracy(Oracle(held), held) == 1.0
    assert tw.accuracy(Oracle(held[:25]), held) == 0.5


@pytest.mark.filterwarnings("ignore")
def test_paper_analog_pipeline_smoke(tmp_path):
    from benchmarks import paper_analog

    work = tmp_path / "work"
    paper_analog.main(["--seeds", "1", "--scale", "0.01", "--problems", "5", "--threads", "1",
                       "--workdir", str(work), "--no-docs"])
    rows = json.loads((work / "results.json").read_text())["rows"]
    assert {r["setting"] for r in rows} == {"models", *paper_analog.SETTINGS}
    for setting in paper_analog.SETTINGS:
        got = {r["variant"] for r in rows if r["setting"] == setting}
        assert got == {"target", *paper_analog.VARIANTS}
    # the plain baseline really is target + skill - reference, tensor by tensor
    from safetensors.torch import load_file

    seed = work / "seed0"
    merged = load_file(str(seed / "merges" / "target--plain" / "model.safetensors"))
    t, s, r = (load_file(str(seed / n / "model.safetensors")) for n in ("target", "skill", "reference"))
    assert set(merged) == set(t)
    for name, value in merged.items():
        torch.testing.assert_close(value, t[name] + s[name] - r[name], atol=1e-6, rtol=0)
    # the scrambled target computes what the target computes, in other coordinates
    by = {(r["setting"], r["variant"]): r for r in rows}
    assert by[("same base, scrambled", "target")]["kl_skill"] == pytest.approx(
        by[("same base", "target")]["kl_skill"], abs=1e-4)
    # paper_analog's report reads the saved results back without retraining
    paper_analog.main(["--workdir", str(work), "--from-results", "--no-docs", "--problems", "5"])


# --------------------------------------------------------------------------- independent inits


def _toy_pair(seed=0, width=32):
    """A random toy model with non-trivial norm weights, and the same function under a random
    exact symmetry of every layer and of the residual stream (rotated, norms folded)."""
    from transformers import LlamaForCausalLM

    from mergekit_symalign.statedict import scramble_state_dict

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tw.model_config(hidden=width, intermediate=3 * width)).eval()
    g = torch.Generator().manual_seed(seed)
    sd = {k: (v + 0.3 * torch.rand(v.shape, generator=g) if "norm" in k else v).clone()
          for k, v in model.state_dict().items()}
    scrambled, _ = scramble_state_dict(sd, model.config, seed=seed + 1, residual="orthogonal")
    return model, sd, scrambled


@pytest.mark.parametrize("residual", ["none", "permutation", "orthogonal"])
def test_one_pass_weight_matching_is_the_packages(residual):
    """The benchmark's weight matching with no re-solve is align_state_dict, tensor by tensor."""
    from benchmarks.independent_init.matching import weight_matching
    from mergekit_symalign.statedict import align_state_dict

    model, a, _ = _toy_pair(1)
    b = {k: v.clone() for k, v in _toy_pair(2)[1].items()}  # another init: a real problem
    benchmark, _ = weight_matching(a, b, model.config, residual)
    package, _ = align_state_dict(a, b, model.config, residual=residual)
    assert set(benchmark) == set(package)
    for name in package:
        torch.testing.assert_close(benchmark[name], package[name], atol=0, rtol=0)


def test_iterative_weight_matching_is_exact_and_undoes_a_scramble():
    """Re-solving the residual stream from every layer's readers and writers (in the layers'
    aligned coordinates) keeps the model's function and still finds the true transform."""
    from benchmarks.independent_init.matching import weight_matching
    from benchmarks.independent_init.states import relative_distance

    model, sd, scrambled = _toy_pair(3)
    ids = torch.randint(3, len(tw.VOCAB), (2, 17), generator=torch.Generator().manual_seed(0))
    trace = []
    aligned, _ = weight_matching(sd, scrambled, model.config, "orthogonal", rounds=2, trace=trace)
    assert [t["round"] for t in trace] == [0, 1, 2]
    assert trace[-1]["distance"] < 1e-5 and relative_distance(sd, aligned) < 1e-5
    with torch.no_grad():
        model.load_state_dict(scrambled)
        before = model(ids).logits
        model.load_state_dict(aligned)
        after = model(ids).logits
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)


def test_barrier_is_the_excess_over_the_endpoints_line():
    from benchmarks.independent_init.fusion import barrier
    from benchmarks.independent_init.run import parse_widths

    alphas = [0, 0.25, 0.5, 0.75, 1]
    assert barrier(alphas, [1.0, 1.5, 2.5, 2.2, 2.0]) == pytest.approx(1.0)
    assert barrier(alphas, [1.0, 1.25, 1.5, 1.75, 2.0]) == pytest.approx(0.0)
    assert parse_widths(["128", "256:2"], 3) == [(128, 3), (256, 2)]


@pytest.mark.filterwarnings("ignore")
def test_independent_init_pipeline_smoke(tmp_path):
    """Tiny schedules, one width with the transfer: every variant's path ends at the same loss
    as the plain one (the aligned endpoint computes B's function), and mergekit's aligned
    transfer computes what the state-dict formula computes."""
    from benchmarks.independent_init import variants
    from benchmarks.independent_init.run import main

    work = tmp_path / "work"
    main(["--quick", "--widths", "32", "--transfer-widths", "32", "--points", "3",
             "--threads", "1", "--workdir", str(work), "--no-docs"])
    saved = json.loads((work / "results.json").read_text())
    (pair,) = saved["pairs"]
    assert set(pair["variants"]) == set(variants.FUSION)
    plain = pair["variants"]["plain"]["losses"]
    for name, row in pair["variants"].items():
        assert len(row["losses"]) == 3
        assert row["losses"][0] == plain[0]  # alpha = 0 is model A itself
        assert row["losses"][-1] == pytest.approx(plain[-1], abs=1e-4), name
        assert row["barrier"] >= 0
    fit = pair["residual_fit"]  # the one-pass rotation's keep-or-snap decision, recorded
    assert fit["mode"] in ("permutation", "orthogonal") and fit["entries"] == 2 * 32 * fit["vocab"]
    assert (fit["mode"] == "orthogonal") == (fit["gain_share"] > fit["threshold"])
    assert set(pair["parts"]) == set(variants.PARTS_VARIANTS)
    rows = saved["transfer"]
    got = {(r["setting"], r["variant"]) for r in rows}
    assert {("other init", v) for v in variants.TRANSFER} <= got
    assert {("same base", v) for v in variants.SAME_BASE} <= got
    checks = [r["statedict_check_kl"] for r in rows if "statedict_check_kl" in r]
    assert checks and max(checks) < 1e-5
    # the report reads the saved results back without training or measuring
    main(["--workdir", str(work), "--from-results", "--no-docs"])


def test_bench_assignment_activation_matching_smoke(capsys):
    """benchmarks/bench_assignment.py's activation matching at a small width (the script
    runs at 8B widths in scripts/benchmarks.sh): both paths find the planted permutation."""
    from benchmarks import bench_assignment

    bench_assignment.main(["--skip-mlp", "--skip-layer", "--activations", "--repeats", "1",
                           "--activation-neurons", "640", "--activation-tokens", "512"])
    out = capsys.readouterr().out
    assert out.count("exact=True") == 2 and ("path=rowwise" in out or "path=sparse" in out)


def test_bench_merge_child_reports_its_own_peak_rss(family, tmp_path):
    """bench_merge's timed child reports the merge's own peak RSS. It read ru_maxrss, which
    Linux carries across fork and exec: every merge of the GPU run showed the benchmark's own
    size (it had just built the models). A parent holding 2 GiB more than usual must not show
    up in the child's figure."""
    if not Path("/proc/self/status").is_file():
        pytest.skip("needs Linux's /proc/self/status")
    from benchmarks.bench_merge import child
    from tests.support import plain_transfer_recipe

    ballast = torch.ones(2**29)  # 2 GiB of float32, touched: this process's RSS grows by it
    with open("/proc/self/status") as f:
        parent_mib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
    recipe = plain_transfer_recipe(family["sibling"], family["reference"], family["skill"])
    seconds, rss_mib, anon_mib, gpu_mib, distance = child.run_one(recipe, tmp_path, [])
    del ballast
    assert seconds > 0 and 0 < anon_mib <= rss_mib and gpu_mib == 0  # no --cuda
    assert rss_mib < parent_mib - 1024, (rss_mib, parent_mib)
    assert distance is None  # mergekit's own card: no alignment


def test_bench_merge_reads_the_distance_after_from_the_aligned_merges_card(family, tmp_path):
    """run_one returns the model card's median distance to the reference after alignment:
    onto the scrambled reference itself (the alignment undoes it exactly) ~0, onto the
    unmoved sibling its own distance; read from a real merge's card, so a change of the
    card's table shows here."""
    from benchmarks.bench_merge import child
    from tests.support import aligned_recipe

    def after(target):
        recipe = aligned_recipe("symmetry_aligned_task_arithmetic", family[target],
                                family["reference"], [(family["skill"], {"align": False})])
        return child.run_one(recipe, tmp_path, []).distance_after

    exact, sibling = after("reference_scrambled"), after("sibling")
    assert exact is not None and sibling is not None
    assert exact < 1e-4 < sibling, (exact, sibling)


def test_bench_merge_calibration_samples_rows_and_region(tmp_path, monkeypatch):
    """--calibration-samples times plain, weights and alignment: activations at the default
    budget and at each number of prompts, with a distance column, into its own region."""
    from benchmarks.bench_merge import child, merge, run

    from tests.conftest import make_config, save_word_tokenizer

    shape = tmp_path / "shape"
    make_config("llama").save_pretrained(shape)
    save_word_tokenizer(shape)
    ran, written = [], []
    monkeypatch.setattr(merge, "run_one", lambda recipe, workdir, extra: ran.append(recipe)
                        or child.MergeRun(1.0, 2.0, 1.0, 0.0, 0.5 if len(ran) > 1 else None))
    monkeypatch.setattr(merge, "calibration_token_count", lambda paths, samples: 100 + samples)
    monkeypatch.setattr(merge, "cost_plot", lambda *a, **k: "img/x.png")
    monkeypatch.setattr(merge.docs_pages, "update_page",
                        lambda page, region, text: written.append((region, text)))
    run.main(["--suites", "smollm2-random", "--smollm2-dir", str(shape), "--repeats", "1",
              "--workdir", str(tmp_path / "work"), "--calibration-samples", "20", "14"])
    assert [r.get("parameters", {}).get("calibration_samples") for r in ran] == [None, None, None,
                                                                                 20, 14]
    assert [r.get("parameters", {}).get("alignment") for r in ran[2:]] == ["activations"] * 3
    (region, text), = written
    assert region == "merge_cost_smollm2-random_calibration"
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert table[0].endswith("| distance after |") and len({line.count("|") for line in table}) == 1
    assert "the default budget: 100 tokens" in text and "calibration_samples: 14: 114 tokens" in text
    assert table[2].endswith("| — |") and table[-1].endswith("| 0.5 |")
    with pytest.raises(SystemExit):
        run.main(["--suites", "1b", "--calibration-samples", "20"])


def test_bench_merge_smollm2_random_builds_from_a_config_and_tokenizer(tmp_path):
    """The GPU machine's stand-in for SmolLM2 (suite smollm2-random): the models have the
    given config's shapes and its tokenizer (activation alignment needs it), and the target is
    the sibling moved by an exact symmetry (same shapes, other values), not the sibling."""
    from benchmarks.bench_merge import models
    from safetensors.torch import load_file

    from tests.conftest import make_config, save_word_tokenizer

    shape = tmp_path / "shape"
    make_config("llama").save_pretrained(shape)
    save_word_tokenizer(shape)
    paths = models.build_models(tmp_path / "work", "smollm2-random", str(shape))
    assert sorted(paths) == ["reference", "sibling", "skill", "target"]
    want = make_config("llama")
    states = {name: load_file(f"{p}/model.safetensors") for name, p in paths.items()}
    for name, p in paths.items():
        assert (Path(p) / "tokenizer.json").is_file(), name
        assert states[name]["model.layers.0.mlp.up_proj.weight"].shape == (
            want.intermediate_size, want.hidden_size)
        assert states[name]["model.layers.0.mlp.up_proj.weight"].dtype == torch.float32
    up = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(states["target"][up], states["sibling"][up])


def test_bench_merge_table_gpu_columns():
    """With --cuda the table adds each merge's peak GPU memory against plain's; every line has
    the header's number of cells."""
    from benchmarks.bench_merge import tables

    def row(name, t, anon, gpu):
        return {"name": name, "t": t, "t_min": t, "t_max": t, "paired": t / 10, "paired_min": 1,
                "paired_max": 1, "anon": anon, "anon_min": anon, "anon_max": anon, "rss": 3000,
                "rss_min": 3000, "rss_max": 3000, "gpu": gpu, "gpu_min": gpu, "gpu_max": gpu}

    rows = [row("plain", 10.0, 1000, 800), row("aligned", 12.0, 1100, 1216)]
    for gpu_columns in (False, True):
        lines = tables.merge_table(rows, 416.0, gpu_columns).splitlines()
        assert len({line.count("|") for line in lines}) == 1
        assert ("peak GPU memory" in lines[0]) == gpu_columns
    assert lines[-1].endswith("| 1216 (1216–1216) | +416 MiB = +1.0 layers |")
    assert "| 1.20x |" in lines[-1]


def test_host_memory_probe_runs_every_step(capsys):
    """benchmarks/host_memory.py (the GPU session's probe of the --cuda merges' host memory)
    runs each step on CPU and prints one figure per step."""
    from benchmarks import host_memory

    host_memory.main(["--device", "cpu"])
    out = capsys.readouterr().out
    names = [name for name, _ in host_memory.steps("cpu")]
    assert all(name in out for name in names) and "total over import torch" in out
    assert "nan" not in out.lower() or not Path("/proc/self/status").is_file()


def test_gpu_check_script_names_what_exists():
    """scripts/gpu_check.sh (run on a GPU machine, never in CI) is valid bash, and every
    benchmark, test file and bench_merge option it names exists."""
    import importlib
    import re
    import subprocess

    from benchmarks.bench_merge import run

    script = (ROOT / "scripts" / "gpu_check.sh").read_text()
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_check.sh")], check=True)
    paths = set(re.findall(r"\btests/[\w/]+\.py", script))
    assert paths and all((ROOT / p).is_file() for p in paths), paths
    modules = set(re.findall(r"-m (benchmarks\.\w+)", script))
    assert {"benchmarks.bench_merge", "benchmarks.host_memory"} <= modules, modules
    for module in modules:
        importlib.import_module(module)
    lines = [line for line in script.splitlines()
             if "benchmarks.bench_merge" in line or line.startswith("SMOLLM2=")]
    flags = {f for line in lines for f in re.findall(r"--[a-z][\w-]*", line)}
    known = {o for action in run.build_parser()._actions for o in action.option_strings}
    assert {"--smollm2-dir", "--rows", "--cuda"} <= flags <= known, flags - known


def test_bench_merge_rows_runs_plain_and_the_named_rows_and_never_writes_docs(tmp_path, monkeypatch):
    """--rows keeps plain and the rows named (a partial table: printed, never written over the
    page's full one), and names the suite's rows when none matches."""
    from benchmarks.bench_merge import child, merge, run

    from tests.conftest import make_config, save_word_tokenizer

    shape = tmp_path / "shape"
    make_config("llama").save_pretrained(shape)
    save_word_tokenizer(shape)
    ran = []
    monkeypatch.setattr(merge, "run_one",
                        lambda recipe, workdir, extra: ran.append(recipe)
                        or child.MergeRun(1.0, 2.0, 1.0, 0.0, None))
    monkeypatch.setattr(merge.docs_pages, "update_page",
                        lambda *a, **k: pytest.fail("a --rows run wrote docs/"))
    common = ["--suites", "smollm2-random", "--smollm2-dir", str(shape), "--repeats", "1",
              "--workdir", str(tmp_path / "work")]
    run.main(common + ["--rows", "activations"])
    assert len(ran) == 2 and ran[1]["parameters"]["alignment"] == "activations"
    with pytest.raises(SystemExit, match="no row of suite smollm2-random matches.*activations"):
        run.main(common + ["--rows", "no-such-row"])


def test_report_figures_writes_the_three_cases_pngs_and_not_the_docs(tmp_path):
    """The script that draws docs/img/report_*.png runs offline and writes each case's plots
    where it is told (here a tmp dir; docs/ untouched)."""
    from benchmarks import report_figures

    docs_page = ROOT / "docs" / "report.md"
    before = docs_page.read_text() if docs_page.exists() else None
    written = report_figures.main(["--images", str(tmp_path / "img"), "--workdir", str(tmp_path),
                                   "--no-docs"])
    names = sorted(p.name for p in (tmp_path / "img").iterdir())
    assert names == ["report_child_child.png", "report_identity_distance.png",
                     "report_identity_moved.png", "report_scrambled_distance.png",
                     "report_scrambled_moved.png"]
    assert all((tmp_path / "img" / n).read_bytes()[:4] == b"\x89PNG" for n in names)
    assert sorted(written) == ["child", "identity", "scrambled"]
    assert (docs_page.read_text() if docs_page.exists() else None) == before
    # the docs show exactly the files the script writes
    shown = set(re.findall(r"img/(report_[a-z_]+\.png)", docs_page.read_text()))
    assert shown == set(names)


def test_cross_size_smollm2_distillation_moves_a_child_toward_its_parent_and_keeps_snapshots():
    """The real-weights cross-size benchmark's retraining, on a tiny random Llama pair: the
    child pruned from the parent gets closer to it (KL on held-out blocks), snapshots come at
    the asked step counts, and its text helpers split and block deterministically."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from benchmarks import cross_size_smollm2 as bench
    from mergekit_symalign import crosssize as cs

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                      num_key_value_heads=2, num_hidden_layers=2, tie_word_embeddings=True)
    parent = LlamaForCausalLM(cfg).eval()
    sd = {k: v for k, v in parent.state_dict().items() if k != "lm_head.weight"}
    calibration = torch.randint(64, (16, 8), generator=torch.Generator().manual_seed(2))
    importance = bench.activation_importance(parent, calibration)
    assert importance.residual.shape == (32,) and importance.heads[1].shape == (4,)
    assert importance.neurons[0].shape == (64,) and bool((importance.neurons[0] > 0).all())
    child_sd, child_cfg, _ = cs.prune_state_dict(sd, cfg, hidden=24, intermediate=48,
                                                 importance=importance)
    child = bench._model(child_cfg, child_sd)
    blocks = torch.randint(64, (64, 8), generator=torch.Generator().manual_seed(1))
    held = blocks[:8]
    parent_lp = bench.logprobs(parent, held)
    before = bench.own_kl(child, parent_lp, held)
    seen = []
    losses = bench.distill(child, parent, blocks[8:], [5, 30], lr=3e-3, seed=0,
                           on_stop=lambda step, m: seen.append((step, bench.own_kl(m, parent_lp, held))))
    assert [s for s, _ in seen] == [5, 30] and len(losses) == 30
    assert seen[-1][1] < 0.8 * before, (before, seen)
    assert bench.parse_child("512,3,2,1344,9;20") == {
        "hidden": 512, "kv_heads": 3, "heads_per_group": 2, "intermediate": 1344, "drop_layers": (9, 20)}
    assert bench.describe(bench.parse_child("24,1,2,48,1"), cfg) == (
        "24/32 channels, 1/2 KV groups x 2/2 query heads, 48/64 neurons, layers 1 of 2 dropped")
    assert "lm_head.weight" not in bench._state(parent)  # tied: the embedding stands for it
    assert torch.equal(bench._model(cfg, bench._state(parent)).lm_head.weight, parent.lm_head.weight)

    class Tok:
        eos_token_id = 0

        def __call__(self, text):
            return {"input_ids": [1 + ord(ch) % 60 for ch in text]}

    out = bench.token_blocks(Tok(), ["abcdefgh" * 3, "xyz" * 9], length=10, limit=4)
    assert out.shape == (4, 10) and out[2, 4].item() == 0  # EOS after the first text (25th id)
    train, held_out = bench.stdlib_docstrings()
    assert len(train) > 1000 and len(held_out) > 100 and not set(train) & set(held_out)


def test_cross_size_smollm2_render_reports_the_gain_ratio_and_recovery():
    from benchmarks import cross_size_smollm2 as bench

    row = lambda s, k: {"skill": s, "own_kl": k}  # noqa: E731
    snap = {"child": row(0.1, 0.2), "child + tau, matched": row(0.5, 0.3),
            "child fine-tuned on the skill": row(0.9, 0.25),
            "facts": {"index_recovery": {"residual": 1.0, "neurons": 0.5}, "match_s": 3.0,
                      "weakest_cosine": 0.97, "explained": {"a.weight": 0.9, "b.weight": 0.8,
                                                            "x.norm.weight": 0.1}}}
    result = {"args": {"distill_lr": 2e-4, "eval_problems": 100, "own_blocks": 32,
                       "child": "576,3,3,1344,", "importance": "activations", "distill_steps": "40"},
              "child": "c", "rows": {"parent": row(0.0, 0.0)}, "snapshots": {"40": snap},
              "distill_kl": {"40": 0.12}, "wall_s": 600, "date": "2026-12-07"}
    text = bench.render(result)
    assert "0.40 / 0.80 (50%)" in text and "neurons 0.50" in text
    assert "min 0.8000, median 0.8500" in text and "standard error at most 0.050" in text
    assert "| child + tau, matched | 0.50 | 0.300 |" in text and "10 min" in text
    assert "--region" not in text and "--distill-steps 40 --region other`" in bench.render(result, "other")
