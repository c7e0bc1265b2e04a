"""`trl-diffusion-opd env`: platform, accelerator and library versions, to paste into bug reports."""

from __future__ import annotations

import platform
import sys

from . import PROG, fail


def environment() -> dict[str, str]:
    """Platform, Python, torch and accelerator, and the versions of the libraries a run depends on."""
    from ..hub import package_versions  # here, so that `env --help` imports no torch

    info = {"platform": platform.platform(), "python": platform.python_version()}
    versions = package_versions()
    versions.pop("python")
    info["torch"] = versions.pop("torch")
    info["accelerator"] = _accelerator()
    info.update(versions)
    return info


def _accelerator() -> str:
    import torch

    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        backend = f"CUDA {torch.version.cuda}" if torch.version.cuda else f"ROCm {torch.version.hip}"
        return f"{backend}: {len(names)} x {', '.join(sorted(set(names)))}"
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return f"XPU: {torch.xpu.device_count()} device(s)"
    if torch.backends.mps.is_available():
        return "MPS (Apple silicon)"
    return "none (CPU only)"


def main(argv: list[str] | None = None) -> int:
    """`trl-diffusion-opd env`: print the environment for bug reports."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv in (["-h"], ["--help"]):
        print(f"usage: {PROG} env\n\n{__doc__.splitlines()[0]}")
        return 0
    if argv:
        return fail(f"{PROG} env", f"unrecognized arguments: {' '.join(argv)}")
    lines = [f"- {name}: {value}" for name, value in environment().items()]
    print("Copy-paste the following information when reporting an issue:\n\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
