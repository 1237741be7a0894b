"""The alignment report (`mergekit-symalign report`), the model card section, and the per-merge
collector that feeds both."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mergekit_symalign.cli import main
from mergekit_symalign.methods import PREFIX
from mergekit_symalign.report import (
    IDENTITY_TOLERANCE,
    markdown,
    step_summary,
    summarize_transform,
)

from .support import aligned_recipe, load_tensors, run_recipe, write_recipe

TA = PREFIX + "task_arithmetic"
SAME_MERGE = "alignment is the identity for every layer: plain task_arithmetic gives the same merge."


def transfer_onto(family, base, **parameters):
    """The transfer of the skill vector onto ``family[base]``; only the base is aligned."""
    return aligned_recipe(TA, family[base], family["reference"],
                          [(family["skill"], {"align": False})], **parameters)


def report(recipe, tmp_path, *args, capsys=None):
    """``mergekit-symalign report`` in this process: (exit status, report.json or None, stdout)."""
    path = write_recipe(recipe, tmp_path / "recipe.yml")
    out = tmp_path / "report"
    status = main(["report", path, str(out), "--quiet", *args])
    printed = capsys.readouterr().out if capsys else ""
    document = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else None
    return status, document, printed


def test_report_on_a_scrambled_target(family, tmp_path, capsys):
    status, doc, printed = report(transfer_onto(family, "reference_scrambled"), tmp_path,
                                  capsys=capsys)
    assert status == 0
    (pair,) = doc["pairs"]
    assert (pair["model"], pair["reference"]) == (family["reference_scrambled"], family["reference"])
    assert pair["identity"] is False and pair["residual"] is None
    layers = family["config"].num_hidden_layers
    assert [r["layer"] for r in pair["layers"]] == list(range(layers))
    for r in pair["layers"]:
        assert r["distance_before"] > 0.5
        assert r["distance_after"] < 1e-5 * r["distance_before"]
        assert not r["identity"] and r["seconds"] > 0
        moved = {s["name"]: s for s in r["symmetries"]}
        assert moved["mlp.neurons"]["moved_fraction"] > 0.5  # a random permutation
        assert moved["attn.vo_rotation"]["max_angle_deg"] > 1
    assert doc["identity"] is False and doc["tolerance"] == IDENTITY_TOLERANCE
    assert doc["not_aligned"] == [family["skill"]]
    assert "the aligned merge differs from plain task_arithmetic" in doc["verdict"][-1]
    assert doc["verdict"][-1] in printed
    md = (tmp_path / "report" / "report.md").read_text()
    assert "# Alignment report" in md and doc["verdict"][0] in md
    assert md.count("| yes |") == 0 and "mlp.neurons" in md
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "Plots skipped" in md
    else:
        for png in ("distance.png", "moved.png"):
            assert (tmp_path / "report" / png).read_bytes()[:4] == b"\x89PNG"
            assert f"]({png})" in md


def test_report_on_an_identical_copy_is_the_identity(family, tmp_path, capsys):
    copy = shutil.copytree(family["reference"], tmp_path / "copy")
    status, doc, printed = report(transfer_onto({**family, "copy": str(copy)}, "copy"),
                                  tmp_path, capsys=capsys)
    assert status == 0
    (pair,) = doc["pairs"]
    assert pair["identity"] is True and pair["layers_moved"] == 0
    assert all(r["distance_before"] == r["distance_after"] == 0 for r in pair["layers"])
    assert doc["verdict"][-1] == SAME_MERGE
    assert SAME_MERGE in printed


def test_report_on_a_fine_tuned_sibling_shows_what_was_fitted_and_kept_as_noise(family, tmp_path):
    """On a sibling in the reference's coordinates the continuous elements were fitted, but
    explained no more than noise would: reported with their share, and kept at the identity
    (nothing moved, the distance unchanged)."""
    status, doc, _ = report(transfer_onto(family, "sibling"), tmp_path)
    assert status == 0
    (pair,) = doc["pairs"]
    for r in pair["layers"]:
        assert r["distance_after"] == r["distance_before"] and not r["symmetries"]
        assert r["fits"] and all(f["snapped"] and 0 <= f["explained"] < 0.2 for f in r["fits"])
    assert pair["residual"] is None


def test_report_on_a_fine_tuned_sibling_says_identity(family, tmp_path):
    status, doc, _ = report(transfer_onto(family, "sibling"), tmp_path)
    assert status == 0
    assert doc["pairs"][0]["identity"] is True
    assert doc["verdict"][-1] == SAME_MERGE


def test_bad_recipe_is_refused_before_anything_is_written(family, tmp_path, capsys):
    from mergekit.config import MergeConfiguration

    from mergekit_symalign.errors import SymAlignConfigError
    from mergekit_symalign.report import run_report

    bad = transfer_onto(family, "sibling", permutaton=False)  # a typo the merge refuses
    with pytest.raises(SymAlignConfigError) as merge_error:
        run_recipe(bad, tmp_path / "merged")
    with pytest.raises(SymAlignConfigError) as report_error:
        run_report(MergeConfiguration.model_validate(bad))
    assert str(report_error.value) == str(merge_error.value)  # refused exactly as the merge
    status, doc, _ = report(bad, tmp_path)
    assert status == 2 and doc is None
    assert not (tmp_path / "report").exists()
    assert "permutaton" in capsys.readouterr().err
    # a plain method is not ours to report on: said so, nothing written
    plain = {**transfer_onto(family, "sibling"), "merge_method": "task_arithmetic"}
    status, doc, _ = report(plain, tmp_path)
    assert status == 2 and not (tmp_path / "report").exists()
    assert "symmetry_aligned_task_arithmetic" in capsys.readouterr().err


def test_cli_module_and_console_script(family, tmp_path):
    """`python -m mergekit_symalign.cli` runs the same command (a refused recipe: fast), and
    pyproject declares the console script."""
    path = write_recipe(transfer_onto(family, "sibling", rotaton=False), tmp_path / "bad.yml")
    proc = subprocess.run([sys.executable, "-m", "mergekit_symalign.cli", "report", path,
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "rotaton" in proc.stderr and not (tmp_path / "out").exists()
    pyproject = (Path(__file__).parent.parent / "pyproject.toml").read_text()
    assert 'mergekit-symalign = "mergekit_symalign.cli:main"' in pyproject


def test_report_reuses_and_fills_the_merge_cache(family, tmp_path, monkeypatch):
    """--cache DIR: the report solves once and saves; the merge with alignment_cache: DIR
    then solves nothing (and the other way round)."""
    import mergekit_symalign.solve as solve

    folder = tmp_path / "cache"
    recipe = transfer_onto(family, "reference_scrambled")
    status, first, _ = report(recipe, tmp_path / "a", "--cache", str(folder))
    assert status == 0 and any(folder.glob("*.safetensors"))

    def forbidden(*a, **k):
        raise AssertionError("solved although a saved alignment exists")

    monkeypatch.setattr(solve, "align_layer", forbidden)
    run_recipe({**recipe, "parameters": {**(recipe.get("parameters") or {}),
                                         "alignment_cache": str(folder)}}, tmp_path / "merged")
    status, again, _ = report(recipe, tmp_path / "b", "--cache", str(folder))
    assert status == 0
    assert [r["distance_after"] for r in again["pairs"][0]["layers"]] == \
        [r["distance_after"] for r in first["pairs"][0]["layers"]]


def test_report_with_activation_alignment(family, tmp_path):
    from .conftest import save_word_tokenizer, word_calibration

    paths = {}
    for name in ("reference", "skill", "reference_scrambled"):
        paths[name] = str(shutil.copytree(family[name], tmp_path / name))
        save_word_tokenizer(tmp_path / name)
    recipe = transfer_onto(paths, "reference_scrambled", alignment="activations",
                           calibration=word_calibration(tmp_path / "calib.txt"),
                           calibration_samples=64, calibration_max_tokens=32)
    status, doc, _ = report(recipe, tmp_path)
    assert status == 0
    (pair,) = doc["pairs"]
    assert doc["alignment"] == "activations" and not pair["identity"]
    for r in pair["layers"]:
        assert r["distance_after"] < 1e-3 * r["distance_before"]
        assert r["seconds"] is None  # solved for every layer at once
    # the merge's card records the same alignment; recording changes no merged weight
    carded = run_recipe(recipe, tmp_path / "carded", write_model_card=True)
    assert f"| {paths['reference_scrambled']} | {paths['reference']} | no |" in \
        (Path(carded) / "README.md").read_text()
    plain, with_card = load_tensors(run_recipe(recipe, tmp_path / "plain")), load_tensors(carded)
    assert all(torch.equal(plain[k], with_card[k]) for k in plain)


# --------------------------------------------------------------------------- the model card


def test_model_card_names_the_plugin_and_what_alignment_did(family, tmp_path):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    from mergekit_symalign import __version__, collect

    recipe = transfer_onto(family, "reference_scrambled")
    source = yaml.safe_dump(recipe, sort_keys=False) + "# the exact recipe, comments included\n"
    out = tmp_path / "merged"
    before = len(collect._COLLECTORS)
    run_merge(MergeConfiguration.model_validate(recipe), str(out),
              options=MergeOptions(copy_tokenizer=False, quiet=True), config_source=source)
    card = (out / "README.md").read_text()
    assert "mergekit-symalign" in card.split("---")[1]  # the tag in the front matter
    assert "## Symmetry alignment (mergekit-symalign)" in card
    # the install that works today (a checkout or its wheel, at this commit), and PyPI's later
    assert f'pip install "mergekit==0.1.5" ./mergekit-symalign' in card
    assert f"mergekit_symalign-{__version__}-py3-none-any.whl" in card
    assert f'# pip install "mergekit==0.1.5" "mergekit-symalign=={__version__}"' in card
    assert "not on PyPI yet" in card
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                          capture_output=True, text=True).stdout.strip()
    assert head and f"mergekit-symalign {__version__} (commit `{head}" in card
    assert "mergekit-yaml mergekit_config.yml" in card
    assert "arxiv.org/abs/2511.10850" in card
    row = next(line for line in card.splitlines() if line.startswith(f"| {family['reference_scrambled']} |"))
    assert "| no |" in row and f"{family['config'].num_hidden_layers} / " in row
    assert "aligned merge differs from plain task_arithmetic" in card
    assert card.count(f"| {family['reference_scrambled']} | ") == 1 + family["config"].num_hidden_layers
    assert (out / "mergekit_config.yml").read_text() == source  # the recipe, untouched
    assert len(collect._COLLECTORS) == before  # the merge's collector was handed back
    # recording changes nothing in the merge
    plain = load_tensors(run_recipe(recipe, tmp_path / "no_card"))
    carded = load_tensors(out)
    assert all(torch.equal(plain[k], carded[k]) for k in plain)


def test_card_of_a_plain_method_is_mergekits(family, tmp_path):
    recipe = {"merge_method": "task_arithmetic", "base_model": family["reference"],
              "models": [{"model": family["skill"], "parameters": {"weight": 1.0}}],
              "dtype": "float32"}
    out = run_recipe(recipe, tmp_path / "out", write_model_card=True)
    assert "symalign" not in (Path(out) / "README.md").read_text()


def test_card_hook_is_installed_where_run_merge_looks():
    import mergekit.card
    import mergekit.merge

    from mergekit_symalign.card import hook_card

    hook_card()  # idempotent
    assert mergekit.merge.generate_card is mergekit.card.generate_card
    assert mergekit.card.generate_card._symalign
    assert not getattr(mergekit.card.generate_card.__wrapped__, "_symalign", False)


def test_canary_names_a_moved_card_function(monkeypatch):
    import mergekit.card

    from mergekit_symalign.compat import internals_problems

    monkeypatch.setattr(mergekit.card, "generate_card", lambda config, name=None: "")
    problems = internals_problems()
    assert problems and all("generate_card" in p for p in problems)


# --------------------------------------------------------------------------- summaries


def test_transform_summary_is_generic_over_steps():
    from mergekit_symalign.groups import Kind, identity_element, rotation_2d
    from mergekit_symalign.spec import LayerTransform, random_transform
    from mergekit_symalign.statedict import spec_for_config

    from .conftest import make_config

    spec = spec_for_config(make_config("llama"))
    # (seed 1: a draw in which even the 2-slot KV-head permutation is not the identity)
    moved = summarize_transform(random_transform(spec, torch.Generator().manual_seed(1)))
    assert moved["identity"] is False
    assert {s["name"] for s in moved["symmetries"]} == {s.name for s in spec.symmetries()}
    assert all(s["moved"] > 0 for s in moved["symmetries"])

    still = LayerTransform(tuple((s, identity_element(s)) for s in spec.symmetries()))
    assert summarize_transform(still)["identity"] is True
    # just above and below the tolerance
    scale = next(s for s in spec.symmetries() if s.kind == Kind.scale)
    nudged = identity_element(scale)
    nudged[0] += 10 * IDENTITY_TOLERANCE
    assert step_summary(scale, nudged)["moved"] == 1
    nudged[0] = 1 + IDENTITY_TOLERANCE / 10
    assert step_summary(scale, nudged)["moved"] == 0
    # a rotation by angle a: ||R - I||_F / sqrt(2) = 2 sin(a / 2); reported in degrees
    plane = next(s for s in spec.symmetries() if s.kind == Kind.plane_rotation)
    angles = torch.zeros(plane.slots, dtype=torch.float64)
    angles[1] = 0.5
    summary = step_summary(plane, rotation_2d(angles))
    assert summary["moved"] == 1 and summary["max_angle_deg"] == pytest.approx(28.6478, abs=1e-3)
    # a kind whose element layout is unknown counts as moved ("?"), never as the identity
    strange = LayerTransform(((scale, torch.zeros(2, 3)),))
    assert summarize_transform(strange)["identity"] is False


def test_markdown_of_an_empty_report():
    from mergekit_symalign.report import build_report

    doc = build_report([], method=TA, wrapped="task_arithmetic", not_aligned=["a", "b"])
    assert "no model is aligned" in doc["verdict"][-1]
    assert "# Alignment report" in markdown(doc)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_record_distances_equal_moving_the_whole_tensors(dtype, monkeypatch):
    """The card's distances, computed in blocks of rows (one pass for the reference's norm and
    the distance before, fused gathers after), equal moving whole float64 copies."""
    from mergekit_symalign import groups
    from mergekit_symalign.report import distances_before_after
    from mergekit_symalign.spec import random_transform
    from mergekit_symalign.statedict import spec_for_config

    from .conftest import make_model

    model = make_model("llama", seed=13)
    spec = spec_for_config(model.config)
    reference = {k.split("layers.0.", 1)[1]: v.to(dtype) for k, v in model.state_dict().items()
                 if "layers.0." in k}
    gen = torch.Generator().manual_seed(6)
    moved = {k: (v.float() + 0.05 * torch.randn(v.shape, generator=gen)).to(dtype)
             for k, v in random_transform(spec, gen).apply(reference).items()}
    transform = random_transform(spec, gen)
    monkeypatch.setattr(groups, "CHUNK_ELEMENTS", 64)  # many blocks per tensor
    before, after = distances_before_after(reference, moved, transform)
    wide = {k: v.double() for k, v in moved.items()}
    after_wide = transform.apply(wide)
    ref2 = sum(float(v.double().square().sum()) for v in reference.values())
    expect_before = (sum(float((wide[k] - v.double()).square().sum()) for k, v in reference.items()) / ref2) ** 0.5
    expect_after = (sum(float((after_wide[k] - v.double()).square().sum()) for k, v in reference.items()) / ref2) ** 0.5
    assert before == pytest.approx(expect_before, rel=1e-5)
    assert after == pytest.approx(expect_after, rel=1e-4)
    assert abs(after - before) > 1e-2 * before  # the transform really moved the layer


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_record_on_the_solves_working_copy(arch, dtype):
    """The merge's record measures the aligned layer on what the solve leaves of its working
    copy (``spec.WorkingCopy``: moved by every step but the unapplied last scales); that is the
    model moved by the whole solved transform, and gives the same distances."""
    from mergekit_symalign.measure import _exact_in_working_copy, distances_before_after
    from mergekit_symalign.spec import WorkingCopy, align_layer, random_transform
    from mergekit_symalign.statedict import spec_for_config

    from .conftest import make_model

    model = make_model(arch, seed=21)
    spec = spec_for_config(model.config)
    prefix = "model.layers.0."
    reference = {k[len(prefix):]: v.to(dtype) for k, v in model.state_dict().items()
                 if k.startswith(prefix) and "norm" not in k}
    gen = torch.Generator().manual_seed(8)
    scrambled = {k: (v.float() + 0.01 * torch.randn(v.shape, generator=gen)).to(dtype)
                 for k, v in random_transform(spec, gen).apply(reference).items()}
    working = WorkingCopy()
    transform = align_layer(spec, reference, scrambled, working=working)
    assert working.pending.steps, "no step was left unapplied: the pending path is not exercised"
    assert set(working.tensors) == set(scrambled)
    whole = transform.apply(scrambled)
    aligned = working.pending.apply(working.tensors)
    for name in scrambled:
        torch.testing.assert_close(aligned[name].float(), whole[name].float(), rtol=1e-5, atol=1e-6)
    before, after = distances_before_after(reference, scrambled, transform)
    before_w, after_w = distances_before_after(reference, scrambled, transform, working)
    assert before_w == before
    assert after_w == pytest.approx(after, rel=1e-5)
    assert after < 0.5 * before  # the solve undid the scramble
    # which tensors the record read from the working copy: all in float32; in bf16 those only
    # permuted there (the MLP's: its scale is pending), not those rotated and rounded to bf16
    exact = {name for name in scrambled if _exact_in_working_copy(name, transform, working)}
    mlp = {name for name in scrambled if name.startswith("mlp.")}
    assert exact == (set(scrambled) if dtype == torch.float32 else mlp)


# --------------------------------------------------------------------------- the plots


def _plot_doc(models_moving, models_still, layers=4):
    def pair(model, moves):
        rows = [{"layer": i, "distance_before": 1.2 if moves else 0.02,
                 "distance_after": 1e-7 if moves else 0.02,
                 "symmetries": ([{"name": "mlp.neurons", "moved_fraction": 1.0},
                                 {"name": "attn.vo_rotation", "moved_fraction": 1.0},
                                 {"name": "attn.kv_heads", "moved_fraction": 0.5 * (i % 2)}]
                                if moves else [])} for i in range(layers)]
        return {"model": model, "reference": "/data/models/reference", "identity": not moves,
                "layers_moved": layers if moves else 0, "layers_total": layers, "layers": rows}

    return {"pairs": [pair(m, True) for m in models_moving] + [pair(m, False) for m in models_still]}


def test_plots_of_identity_and_moved_pairs_draw_without_warnings(tmp_path):
    import warnings

    pytest.importorskip("matplotlib")
    from mergekit_symalign.report import write_plots

    for name, doc in (("identity", _plot_doc([], ["/data/models/sibling"])),
                      ("mixed", _plot_doc(["/data/models/scrambled"], ["org/skill"]))):
        out = tmp_path / name
        out.mkdir()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # e.g. matplotlib's "No artists with labels found"
            images = write_plots(doc, out)
        assert [png for _, png in images] == ["distance.png", "moved.png"]
        for _, png in images:
            assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_moved_grid_keeps_every_symmetry_apart():
    from mergekit_symalign.report import _moved_grid

    names, layers, grid = _moved_grid(_plot_doc(["/m/s"], [])["pairs"][0])
    assert names == ["mlp.neurons", "attn.vo_rotation", "attn.kv_heads"]
    assert layers == [0, 1, 2, 3]
    assert grid == [[1.0] * 4, [1.0] * 4, [0.0, 0.5, 0.0, 0.5]]  # a row each, not one line at 1.0


def test_legend_names_are_short_and_distinct():
    from mergekit_symalign.report import short_names

    labels = short_names(["/home/me/models/run-1/merged", "/home/me/models/run-2/merged",
                          "meta-llama/Llama-3.1-8B-Instruct"])
    assert labels["/home/me/models/run-1/merged"] == "run-1/merged"
    assert labels["/home/me/models/run-2/merged"] == "run-2/merged"
    assert labels["meta-llama/Llama-3.1-8B-Instruct"] == "Llama-3.1-8B-Instruct"
    long = short_names(["/x/" + "a" * 30 + "-middle-" + "b" * 30])
    (label,) = long.values()
    assert len(label) == 40 and label.startswith("aaaa") and label.endswith("bbbb") and "…" in label


def test_missing_matplotlib_is_said_on_the_terminal(tmp_path, monkeypatch, capsys):
    from mergekit_symalign import report as report_module

    monkeypatch.setattr(report_module, "pyplot", lambda: None)
    assert report_module.write_plots(_plot_doc(["/m/s"], []), tmp_path) == []
    err = capsys.readouterr().err
    assert "matplotlib is not installed" in err and "pip install 'matplotlib>=3.8'" in err


def _child_doc(shares=(1.0, 0.98, 0.3)):
    rows = [{"child_layer": k, "parent_layer": k + (k >= 2), "explained": v}  # parent 2 dropped
            for k, v in enumerate(shares)]
    rows.append({"child_layer": "module", "parent_layer": "module", "explained": 0.99})
    return {"method": TA, "wrapped": "task_arithmetic", "alignment": "weights", "pairs": [],
            "identity_definition": "", "verdict": ["a pruned child"],
            "pruned_child": {"model": "/data/models/child", "reference": "/data/models/parent",
                             "layers": rows}}


def test_plot_of_a_pruned_child_draws_without_warnings_and_report_md_links_it(tmp_path):
    import warnings

    pytest.importorskip("matplotlib")
    from mergekit_symalign.report import write_report

    for name, shares in (("near", (1.0, 0.98, 0.3)), ("negative", (1.0, -0.4, 0.7)),
                         ("deep", [0.9, 0.7, 0.2] + [0.8] * 29)):  # a real model's 32 layers
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            paths = write_report(_child_doc(shares), tmp_path / name)
        assert (tmp_path / name / "child.png").read_bytes()[:4] == b"\x89PNG"
        assert paths["child"] == str(tmp_path / name / "child.png")
        assert not (tmp_path / name / "distance.png").exists()  # no pairs: nothing to draw there
        md = (tmp_path / name / "report.md").read_text()
        assert "](child.png)" in md
        # the figure sits in the child's section, after its table
        assert md.index("| 2 | 3 |") < md.index("](child.png)")


def test_missing_matplotlib_for_a_pruned_child_is_said_on_the_terminal_and_in_report_md(
        tmp_path, monkeypatch, capsys):
    from mergekit_symalign import report as report_module

    monkeypatch.setattr(report_module, "pyplot", lambda: None)
    report_module.write_report(_child_doc(), tmp_path)
    assert "pip install 'matplotlib>=3.8'" in capsys.readouterr().err
    assert "Plots skipped: matplotlib is not installed" in (tmp_path / "report.md").read_text()
    assert not (tmp_path / "child.png").exists()
