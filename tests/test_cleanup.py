"""A failed aligned merge leaves no output folder behind, whatever failed while the graph ran
(a task raising, Ctrl-C, a missing shard, --cuda without CUDA), and never removes a folder
that existed before the merge; a plain mergekit merge is left as mergekit leaves it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .support import aligned_recipe, perturbed, plain_transfer_recipe, run_recipe
from mergekit_symalign.methods import PREFIX

from .conftest import make_config, make_model


def recipe(family, skill=None):
    return aligned_recipe(PREFIX + "task_arithmetic", family["sibling"], family["reference"],
                          [skill or family["skill"]])


def fail_on_third_save(monkeypatch, error):
    """mergekit's own SaveTensor raises on its third call: the writer has created the folder
    and written tensors by then."""
    from mergekit.io.tasks import SaveTensor

    real, calls = SaveTensor.execute, []

    def execute(self, **kwargs):
        calls.append(self.tensor_name)
        if len(calls) == 3:
            raise error
        return real(self, **kwargs)

    monkeypatch.setattr(SaveTensor, "execute", execute)
    return calls


def existing(folder: Path) -> Path:
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    return folder


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()], ids=["raises", "interrupt"])
@pytest.mark.parametrize("before", ["new", "existing"])
def test_a_task_failing_during_execution(family, tmp_path, monkeypatch, error, before):
    out = tmp_path / "out"
    if before == "existing":
        existing(out)
    calls = fail_on_third_save(monkeypatch, error)
    with pytest.raises(type(error)):
        run_recipe(recipe(family), out)
    assert len(calls) == 3
    if before == "new":
        assert not out.exists()
    else:
        assert (out / "keep.txt").read_text() == "mine"


def test_sigint_in_a_mergekit_yaml_like_process(family, tmp_path):
    """A real SIGINT (Python's default handler: KeyboardInterrupt where it lands), sent by the
    process to itself from inside a task, as Ctrl-C during a long merge would."""
    out = tmp_path / "out"
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
from mergekit.io.tasks import SaveTensor
from tests.support import aligned_recipe, run_recipe
real, calls = SaveTensor.execute, []
def execute(self, **kwargs):
    calls.append(1)
    if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGINT)
    return real(self, **kwargs)
SaveTensor.execute = execute
rec = aligned_recipe("{PREFIX}task_arithmetic", {family['sibling']!r}, {family['reference']!r},
                     [{family['skill']!r}])
try:
    run_recipe(rec, {str(out)!r})
except KeyboardInterrupt:
    sys.exit(130 if not os.path.exists({str(out)!r}) else 3)
sys.exit(4)
"""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert not out.exists()


@pytest.fixture(scope="module")
def sharded_skill_missing_a_shard(tmp_path_factory):
    import transformers

    root = tmp_path_factory.mktemp("sharded")
    config = make_config("llama")
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.load_state_dict(perturbed(make_model("llama", seed=0), seed=3))
    model.save_pretrained(str(root), max_shard_size="20KB")
    shards = sorted(root.glob("*.safetensors"))
    assert len(shards) > 2
    os.remove(shards[-1])  # listed in the index, gone from the disk: found as it loads
    return str(root)


@pytest.mark.parametrize("before", ["new", "existing"])
def test_a_missing_shard(family, sharded_skill_missing_a_shard, tmp_path, before):
    out = tmp_path / "out"
    if before == "existing":
        existing(out)
    with pytest.raises(FileNotFoundError):
        run_recipe(recipe(family, sharded_skill_missing_a_shard), out)
    assert not out.exists() if before == "new" else (out / "keep.txt").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("before", ["new", "existing"])
def test_cuda_without_cuda(family, tmp_path, before):
    out = tmp_path / "out"
    if before == "existing":
        existing(out)
    with pytest.raises((AssertionError, RuntimeError), match="CUDA"):
        run_recipe(recipe(family), out, cuda=True)
    assert not out.exists() if before == "new" else (out / "keep.txt").exists()


def test_a_plain_merge_is_left_as_mergekit_leaves_it(family, tmp_path, monkeypatch):
    """The hook is inert for mergekit's own methods: the partial folder stays, as without the
    plugin."""
    out = tmp_path / "out"
    fail_on_third_save(monkeypatch, RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        run_recipe(plain_transfer_recipe(family["sibling"], family["reference"], family["skill"]), out)
    assert out.exists()


def test_a_merge_that_succeeds_keeps_its_folder_and_a_later_failure_is_its_own(family, tmp_path, monkeypatch):
    """The folder noted when a merge was planned is used by that merge's run only: a merge
    into a folder an earlier merge made counts that folder as existing."""
    out = run_recipe(recipe(family), tmp_path / "out")
    assert (Path(out) / "model.safetensors").exists()
    fail_on_third_save(monkeypatch, RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        run_recipe(recipe(family), out)
    assert Path(out).exists()


def test_a_missing_shard_through_mergekit_yaml(family, sharded_skill_missing_a_shard, tmp_path):
    """The same through an unmodified mergekit-yaml (the plugin loaded by its .pth hook)."""
    from .support import run_mergekit_yaml

    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="FileNotFoundError|No such file"):
        run_mergekit_yaml(recipe(family, sharded_skill_missing_a_shard), tmp_path / "r.yml", out)
    assert not out.exists()
