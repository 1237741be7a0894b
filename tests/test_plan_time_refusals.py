"""Refusals at plan time that name their cause (issue 28): the alignment cache's folder,
``--cuda`` without CUDA, norms ``residual: orthogonal`` cannot fold, truncated or missing
checkpoint files, a wrong type for the wrapped method's parameter, a model given twice, and
``mergekit-symalign report``'s OUT. Each refusal names the parameter, option, model or file;
leaves nothing at the output path; and changes no input model nor cache entry.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from .support import aligned_recipe, run_recipe, write_recipe
from mergekit_symalign.cli import main
from mergekit_symalign.errors import SymAlignConfigError
from mergekit_symalign.methods import PREFIX

from .conftest import make_config, make_model, perturbed, save


def digest(folder) -> str:
    """Every file under ``folder`` (names and bytes; '' when it does not exist)."""
    folder = Path(folder)
    if not folder.exists():
        return ""
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        h.update(str(f.relative_to(folder)).encode())
        if f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()


def recipe(family, skills=None, reference=None, **params):
    return aligned_recipe(PREFIX + "task_arithmetic", family["sibling_scrambled"],
                          reference or family["reference"], skills or [family["skill_scrambled"]],
                          **params)


def refused(rec, out: Path, names, watch=(), **options) -> str:
    """Run ``rec``; it must be refused (SymAlignConfigError) naming every string of
    ``names``, leave nothing at ``out`` and change nothing under ``watch`` nor any model."""
    folders = [rec["base_model"], *(m["model"] for m in rec["models"]), *watch]
    before = {str(f): digest(f) for f in folders}
    with pytest.raises(SymAlignConfigError) as info:
        run_recipe(rec, out, **options)
    message = str(info.value)
    for name in names:
        assert str(name) in message, (name, message)
    assert not out.exists(), "a refused merge must leave nothing at its output path"
    assert {str(f): digest(f) for f in folders} == before, "a refusal changed an input or the cache"
    return message


@pytest.fixture()
def cached(family, tmp_path):
    """A cache folder holding the entries of one merge (to check refusals leave it alone)."""
    folder = tmp_path / "cache"
    run_recipe(recipe(family, alignment_cache=str(folder)), tmp_path / "first")
    assert any(folder.iterdir())
    return folder


# --------------------------------------------------------------------------- alignment_cache


def test_alignment_cache_pointing_at_a_file(family, tmp_path):
    target = tmp_path / "not-a-folder"
    target.write_text("something else\n")
    refused(recipe(family, residual="permutation", alignment_cache=str(target)), tmp_path / "out",
            ["alignment_cache", str(target), "is a file"], watch=[tmp_path / "not-a-folder"])
    assert target.read_text() == "something else\n"


def test_alignment_cache_inside_a_file(family, tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    refused(recipe(family, residual="permutation", alignment_cache=str(target / "cache")),
            tmp_path / "out", ["alignment_cache", str(target), "is a file"])


def test_alignment_cache_where_nothing_can_be_created(family, tmp_path):
    place = "/proc/symalign-test-cache/entries"  # /proc takes no new folders, even as root
    refused(recipe(family, residual="permutation", alignment_cache=place), tmp_path / "out",
            ["alignment_cache", place, "cannot write"])


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_alignment_cache_read_only_folder(family, tmp_path, cached):
    os.chmod(cached, 0o555)
    try:
        refused(recipe(family, residual="permutation", alignment_cache=str(cached)),
                tmp_path / "out", ["alignment_cache", str(cached)], watch=[cached])
    finally:
        os.chmod(cached, 0o755)


def test_usable_cache_folder_is_only_probed(family, tmp_path, cached):
    """The check writes and removes a probe: the entries are untouched, and a refusal
    after the check leaves no folder it created."""
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA for the refusal after the cache check")
    refused(recipe(family, alignment_cache=str(cached)), tmp_path / "out", ["--cuda"],
            watch=[cached], cuda=True)
    new = tmp_path / "new" / "cache"
    refused(recipe(family, alignment_cache=str(new)), tmp_path / "out", ["--cuda"], cuda=True)
    assert not (tmp_path / "new").exists(), "the check left a folder it created"


# --------------------------------------------------------------------------- --cuda


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_cuda_device(family, tmp_path, cached):
    message = refused(recipe(family, residual="permutation", alignment_cache=str(cached)),
                      tmp_path / "out", ["--cuda", "without --cuda"], watch=[cached], cuda=True)
    assert torch.__version__ in message


# --------------------------------------------------------------------------- norms under orthogonal


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    """Reference, skill and base of an untied llama (residual: orthogonal is exact there)."""
    root = tmp_path_factory.mktemp("untied")
    config = make_config("llama")
    ref = make_model("llama", seed=0)
    return {"config": config, "root": root,
            "reference": save(ref, config, root / "reference"),
            "skill": save(perturbed(ref, seed=1, scale=0.05), config, root / "skill"),
            "base": save(perturbed(ref, seed=2, scale=0.02), config, root / "base")}


def zeroed(src: str, dst: Path, name: str) -> str:
    shutil.copytree(src, dst)
    tensors = load_file(f"{dst}/model.safetensors")
    tensors[name][3] = 0.0
    save_file(tensors, f"{dst}/model.safetensors", metadata={"format": "pt"})
    return str(dst)


@pytest.mark.parametrize("who,name", [("skill", "model.norm.weight"),
                                      ("reference", "model.layers.1.input_layernorm.weight"),
                                      ("base", "model.layers.0.post_attention_layernorm.weight")])
def test_norm_with_a_zero_weight_under_orthogonal(untied, tmp_path, who, name):
    models = {k: untied[k] for k in ("reference", "skill", "base")}
    models[who] = zeroed(models[who], tmp_path / f"zero-{who}", name)
    rec = aligned_recipe(PREFIX + "task_arithmetic", models["base"], models["reference"],
                         [models["skill"]], residual="orthogonal",
                         alignment_cache=str(tmp_path / "cache"))
    refused(rec, tmp_path / "out", [models[who], name, "residual: orthogonal", "residual: permutation"])
    assert not (tmp_path / "cache").exists()
    # the same models are merged with residual: permutation
    rec["parameters"]["residual"] = "permutation"
    run_recipe(rec, tmp_path / "permuted")


# --------------------------------------------------------------------------- checkpoint files


@pytest.mark.parametrize("keep", [0.5, 100, 4])  # half the data, inside the header, 4 bytes
def test_truncated_safetensors_names_file_and_model(family, tmp_path, keep):
    copy = shutil.copytree(family["skill_scrambled"], tmp_path / "truncated")
    shard = copy / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:int(len(data) * keep) if keep < 1 else keep])
    refused(recipe(family, [str(copy)]), tmp_path / "out", [str(copy), str(shard), "truncated"])


def test_missing_shard_names_file_and_model(family, tmp_path):
    config = family["config"]
    model = transformers_model(family["skill_scrambled"], config)
    folder = tmp_path / "sharded"
    model.save_pretrained(str(folder), max_shard_size="100KB", safe_serialization=True)
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) >= 2
    shards[-1].unlink()
    refused(recipe(family, [str(folder)]), tmp_path / "out", [str(folder), shards[-1].name, "missing"])


def transformers_model(path, config):
    import transformers

    model = transformers.AutoModelForCausalLM.from_config(config)
    model.load_state_dict(load_file(f"{path}/model.safetensors"))
    return model


# --------------------------------------------------------------------------- the wrapped method's parameters


@pytest.mark.parametrize("method,params,name", [
    ("task_arithmetic", {"weight": "one"}, "weight"),
    ("ties", {"weight": 1.0, "density": "half"}, "density"),
])
def test_wrong_type_for_the_wrapped_methods_parameter(family, tmp_path, method, params, name):
    rec = aligned_recipe(PREFIX + method, family["sibling_scrambled"], family["reference"],
                         [(family["skill_scrambled"], params)])
    message = refused(rec, tmp_path / "out", [f"parameter {name}", family["skill_scrambled"],
                                             repr(params[name])])
    assert "ValidationError" not in message


# --------------------------------------------------------------------------- a model given twice


def test_skill_given_twice(family, tmp_path):
    skill = family["skill_scrambled"]
    refused(recipe(family, [skill, skill]), tmp_path / "out", [skill, "twice"])


def test_skill_equal_to_the_reference(family, tmp_path):
    refused(recipe(family, [family["reference"]]), tmp_path / "out",
            [family["reference"], "reference", "also a skill"])


# --------------------------------------------------------------------------- report's OUT


def report_refused(family, tmp_path, out, capsys, monkeypatch, names):
    import mergekit_symalign.report as report

    def never(*a, **k):
        raise AssertionError("aligned although OUT is refused")

    monkeypatch.setattr(report, "run_report", never)
    rec = aligned_recipe(PREFIX + "task_arithmetic", family["sibling"], family["reference"],
                         [(family["skill"], {"align": False})])
    path = write_recipe(rec, tmp_path / "recipe.yml")
    models = [family["sibling"], family["reference"], family["skill"]]
    before = {m: digest(m) for m in models}
    capsys.readouterr()
    status = main(["report", path, str(out), "--quiet"])
    err = capsys.readouterr().err
    assert status == 2
    for name in names:
        assert str(name) in err, (name, err)
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 2
    assert {m: digest(m) for m in models} == before


@pytest.mark.parametrize("inside", ["", "reports"])
def test_report_out_inside_an_input_models_folder(family, tmp_path, capsys, monkeypatch, inside):
    out = Path(family["sibling"]) / inside if inside else Path(family["sibling"])
    report_refused(family, tmp_path, out, capsys, monkeypatch, [str(out), family["sibling"], "input model"])
    assert not (Path(family["sibling"]) / "report.json").exists()
    assert not (Path(family["sibling"]) / "reports").exists()


def test_report_out_an_existing_file(family, tmp_path, capsys, monkeypatch):
    out = tmp_path / "report.txt"
    out.write_text("keep me\n")
    report_refused(family, tmp_path, out, capsys, monkeypatch, [str(out), "existing file"])
    assert out.read_text() == "keep me\n"
