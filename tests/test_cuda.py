"""On a CUDA GPU the alignment gives the CPU's results: the pure mathematics on CUDA tensors,
and whole merges through mergekit with ``--cuda`` (math on the GPU) and ``--read-to-gpu``.

Skipped without a GPU (CI has none). On a GPU machine: ``python -m pytest tests/test_cuda.py``.
"""

import json

import pytest
import torch

from mergekit_symalign.cli import main
from mergekit_symalign.methods import PREFIX
from mergekit_symalign.spec import align_layer, random_transform
from mergekit_symalign.statedict import align_state_dict, scramble_state_dict, spec_for_config

from .support import aligned_recipe, run_recipe, write_recipe
from .conftest import ARCH_CONFIGS, assert_tensors_close, load, make_model
from .test_residual import rotated_family  # noqa: F401  (a fixture)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _on(state, device):
    return {k: v.to(device) for k, v in state.items()}


def _elements_equal(cpu_transform, gpu_transform):
    """The same group elements, step by step (permutations equal, matrices within rounding)."""
    cpu, gpu = list(cpu_transform.steps), list(gpu_transform.steps)
    assert [s.name for s, _ in cpu] == [s.name for s, _ in gpu]
    for (symmetry, a), (_, b) in zip(cpu, gpu):
        b = b.cpu()
        if a.dtype == torch.long:
            assert torch.equal(a, b), symmetry.name
        else:
            assert float((a.double() - b.double()).abs().max()) <= 1e-4 * float(a.abs().max()), symmetry.name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_align_layer_on_cuda_undoes_a_random_transform_as_on_cpu(dtype):
    """A random element of a layer's full group, applied on the GPU, is found and undone, and
    the solved elements are the CPU's."""
    model = make_model("llama", seed=8)
    spec = spec_for_config(model.config)
    layer = {k.split("layers.0.", 1)[1]: v.to(dtype) for k, v in model.state_dict().items()
             if "layers.0." in k}
    moved = random_transform(spec, torch.Generator().manual_seed(1)).apply(layer)
    on_cpu = align_layer(spec, layer, moved)
    on_gpu = align_layer(spec, _on(layer, "cuda"), _on(moved, "cuda"))
    _elements_equal(on_cpu, on_gpu)
    back = on_gpu.apply(_on(moved, "cuda"))
    assert all(v.device.type == "cuda" for v in back.values())
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the scrambled copy's own rounding
    assert_tensors_close(_on(back, "cpu"), layer, rtol=tolerance)


@pytest.mark.parametrize("arch", sorted(ARCH_CONFIGS))
def test_align_state_dict_on_cuda_equals_cpu(arch):
    model = make_model(arch, seed=5)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    scrambled, _ = scramble_state_dict(sd, model.config, seed=21)
    cpu, _ = align_state_dict(sd, scrambled, model.config)
    gpu, _ = align_state_dict(_on(sd, "cuda"), _on(scrambled, "cuda"), model.config)
    assert_tensors_close(_on(gpu, "cpu"), cpu, rtol=1e-5)
    assert_tensors_close(_on(gpu, "cpu"), sd, rtol=1e-5)  # and undone


@pytest.mark.parametrize("mode", ["permutation", "orthogonal"])
def test_residual_alignment_on_cuda_equals_cpu(mode):
    model = make_model("llama", seed=5)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    moved, _ = scramble_state_dict(sd, model.config, seed=22, residual=mode)
    cpu, _ = align_state_dict(sd, moved, model.config, residual=mode)
    gpu, _ = align_state_dict(_on(sd, "cuda"), _on(moved, "cuda"), model.config, residual=mode)
    assert_tensors_close(_on(gpu, "cpu"), cpu, rtol=1e-4)


def _cpu_and_gpu(recipe, tmp_path):
    """The merge on CPU, with --cuda, and with --cuda --read-to-gpu."""
    cpu = load(run_recipe(recipe, tmp_path / "cpu"))
    gpu = load(run_recipe(recipe, tmp_path / "gpu", device="cuda"))
    gpu_read = load(run_recipe(recipe, tmp_path / "gpu_read", device="cuda", read_to_gpu=True))
    return cpu, gpu, gpu_read


def test_cuda_merge_equals_cpu_merge(family, tmp_path):
    """--cuda (math on the GPU) and --read-to-gpu give the CPU's merge within float32 noise."""
    rec = aligned_recipe(PREFIX + "ties", family["sibling_scrambled"], family["reference"],
                         [(family["skill"], {}), (family["skill_scrambled"], {"weight": 0.5})])
    cpu, gpu, gpu_read = _cpu_and_gpu(rec, tmp_path)
    assert_tensors_close(gpu, cpu, rtol=1e-4)
    assert_tensors_close(gpu_read, cpu, rtol=1e-4)


@pytest.mark.parametrize("mode", ["permutation", "orthogonal"])
def test_cuda_residual_merge_equals_cpu_merge(rotated_family, tmp_path, mode):  # noqa: F811
    fam = rotated_family
    rec = aligned_recipe(PREFIX + "task_arithmetic", fam[mode], fam["reference"],
                         [(fam["skill"], {"align": False})], residual=mode)
    cpu, gpu, gpu_read = _cpu_and_gpu(rec, tmp_path)
    assert_tensors_close(gpu, cpu, rtol=1e-4)
    assert_tensors_close(gpu_read, cpu, rtol=1e-4)


def test_cuda_activation_alignment_equals_cpu(family_with_tokenizers, tmp_path):
    """alignment: activations runs the models layer by layer on the GPU with --cuda."""
    from .conftest import word_calibration

    fam = family_with_tokenizers
    rec = aligned_recipe(PREFIX + "task_arithmetic", fam["sibling_scrambled"], fam["reference"],
                         [(fam["skill"], {"align": False})], alignment="activations",
                         calibration=word_calibration(tmp_path / "calib.txt"),
                         calibration_samples=64, calibration_max_tokens=32)
    cpu, gpu, _ = _cpu_and_gpu(rec, tmp_path)
    assert_tensors_close(gpu, cpu, rtol=1e-4)


def test_alignment_cache_written_on_cpu_is_reused_on_cuda(family, tmp_path, monkeypatch):
    from .test_cache import Counting

    folder = str(tmp_path / "cache")
    rec = aligned_recipe(PREFIX + "task_arithmetic", family["sibling_scrambled"], family["reference"],
                         [(family["skill"], {"align": False})], residual="permutation",
                         alignment_cache=folder)
    cpu = load(run_recipe(rec, tmp_path / "cpu"))
    Counting(monkeypatch, forbid=True)
    gpu = load(run_recipe(rec, tmp_path / "gpu", device="cuda"))
    assert_tensors_close(gpu, cpu, rtol=1e-4)


def test_report_with_cuda_equals_report_on_cpu(family, tmp_path):
    rec = write_recipe(aligned_recipe(PREFIX + "task_arithmetic", family["sibling_scrambled"],
                                      family["reference"], [(family["skill"], {"align": False})]),
                       tmp_path / "recipe.yml")
    for where, extra in (("cpu", []), ("gpu", ["--cuda"])):
        assert main(["report", rec, str(tmp_path / where), "--quiet", *extra]) == 0
    cpu, gpu = (json.loads((tmp_path / w / "report.json").read_text()) for w in ("cpu", "gpu"))
    (a,), (b,) = cpu["pairs"], gpu["pairs"]
    assert a["identity"] is False and b["identity"] is False
    assert [r["layer"] for r in a["layers"]] == [r["layer"] for r in b["layers"]]
    for x, y in zip(a["layers"], b["layers"]):
        for key in ("distance_before", "distance_after"):
            assert abs(x[key] - y[key]) <= 1e-4 * max(abs(x[key]), 1e-6), (x["layer"], key)


def test_cross_size_solve_on_cuda_equals_cpu(tmp_path):
    """A pruned child's solve with its similarities on the GPU (the pure function on CPU
    tensors, and a whole merge with --cuda / --read-to-gpu) finds the CPU's maps and merge."""
    from mergekit_symalign import crosssize as cs

    from .test_crosssize_merge import TA, _pair

    paths, fam = _pair(tmp_path / "models")
    gen = torch.Generator().manual_seed(3)
    drifted = {k: v + 0.3 * v.std() * torch.randn(v.shape, generator=gen) for k, v in fam["child"].items()}
    child_cfg = cs.child_config(fam["config"], fam["truth"])
    on_cpu = cs.match_child(fam["parent"], fam["config"], drifted, child_cfg)
    on_gpu = cs.match_child(fam["parent"], fam["config"], drifted, child_cfg, device="cuda")
    assert on_gpu.map == on_cpu.map == fam["truth"]
    assert abs(on_gpu.worst() - on_cpu.worst()) <= 1e-4
    table = {where: cs.explained_by_layer(drifted, fam["parent"], fam["config"], on_cpu.map, device=where)
             for where in ("cpu", "cuda")}
    for a, b in zip(table["cpu"], table["cuda"]):
        assert a["parent_layer"] == b["parent_layer"] and abs(a["explained"] - b["explained"]) <= 1e-5
    rec = aligned_recipe(TA, paths["child"], paths["parent"], [paths["skill"]])
    cpu, gpu, gpu_read = _cpu_and_gpu(rec, tmp_path)
    want = cs.restrict_state_dict(fam["skills"][0], fam["config"], fam["truth"])
    for merged in (cpu, gpu, gpu_read):
        assert_tensors_close(merged, want, rtol=1e-5)
