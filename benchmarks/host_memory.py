"""Host anonymous memory (RssAnon) that each first use of a library adds to one process.

    python3 -m benchmarks.host_memory [--device cuda]

Written to attribute the +550 to +680 MiB of host anonymous memory that every aligned
``--cuda`` merge showed over plain ``task_arithmetic`` on the H200 (docs/performance.md,
whatever the model's size: a per-process cost, not held layers). Plain's merge uses CUDA for
element-wise sums; the alignment's solves add matrix products, ``torch.linalg``
factorizations and scipy's assignment solver. Each step below runs once and prints how much
RssAnon grew, then the SmolLM2-shaped ``align_layer`` runs again (what stays is per process,
what grows again is per layer). Nothing is asserted; on CPU (the default without a GPU) it
runs the same steps.
"""

from __future__ import annotations

import argparse

import torch



def rss_anon_mib() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def smollm2_layer(device: str):
    """SmolLM2-135M's layer spec, a random layer and a randomly moved copy of it."""
    from mergekit_symalign.architectures import Geometry, layer_spec
    from mergekit_symalign.spec import random_transform

    spec = layer_spec("llama", Geometry("llama", 576, 9, 3, 64, 1536, 64, 100000.0))
    shapes = {"self_attn.q_proj.weight": (576, 576), "self_attn.k_proj.weight": (192, 576),
              "self_attn.v_proj.weight": (192, 576), "self_attn.o_proj.weight": (576, 576),
              "mlp.gate_proj.weight": (1536, 576), "mlp.up_proj.weight": (1536, 576),
              "mlp.down_proj.weight": (576, 1536)}
    gen = torch.Generator().manual_seed(0)
    anchor = {k: (0.02 * torch.randn(s, generator=gen)).to(device) for k, s in shapes.items()}
    return spec, anchor, random_transform(spec, gen).apply(anchor)


def steps(device: str):
    """(name, callable) in the order a merge first meets them."""
    x = torch.randn(512, 512)

    def on_device():
        return x.to(device)

    def matmul():
        y = on_device()
        return y @ y

    def linalg(fn):
        return lambda: fn(on_device() @ on_device().T + torch.eye(512, device=device))

    def assignment():
        from scipy.optimize import linear_sum_assignment

        return linear_sum_assignment(-(on_device() @ on_device().T).cpu().numpy())

    def align():
        from mergekit_symalign.spec import align_layer

        spec, anchor, target = smollm2_layer(device)
        return align_layer(spec, anchor, target)

    def imports():  # what plain mergekit-yaml imports too (the plugin loads with mergekit.merge)
        import mergekit.merge  # noqa: F401
        import mergekit_symalign.spec  # noqa: F401

    return [("import mergekit.merge, plugin", imports),
            (f"first tensor on {device}", on_device), ("matrix product", matmul),
            ("torch.linalg.svd", linalg(torch.linalg.svd)),
            ("torch.linalg.eigh", linalg(torch.linalg.eigh)),
            ("torch.linalg.eigvals", linalg(torch.linalg.eigvals)),
            ("scipy linear_sum_assignment", assignment),
            ("align_layer (SmolLM2 shapes)", align), ("align_layer again", align)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA GPU on this machine")
    print(f"host RssAnon by step, {args.device}, torch {torch.__version__}")
    before = start = rss_anon_mib()
    print(f"  {'after import torch':32s} {start:8.0f} MiB")
    for name, step in steps(args.device):
        step()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        now = rss_anon_mib()
        print(f"  {name:32s} {now:8.0f} MiB  ({now - before:+.0f})")
        before = now
    print(f"  {'total over import torch':32s} {before - start:+8.0f} MiB")


if __name__ == "__main__":
    main()
