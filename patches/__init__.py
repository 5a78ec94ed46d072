"""Version-pinned changes to vLLM internals, in one registry.

Each patch names the vLLM class it changes, keeps the original, checks the vLLM version, and applies once.
`describe()` lists exactly what the plugin changes; `vllm-flash patches` prints it.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

SUPPORTED_VLLM_VERSIONS = ("0.32.0",)


class UnsupportedVllmVersion(RuntimeError):
    pass


def vllm_base_version() -> str:
    import vllm

    return vllm.__version__.split("+")[0]


def check_vllm_version() -> str:
    version = vllm_base_version()
    if version not in SUPPORTED_VLLM_VERSIONS:
        raise UnsupportedVllmVersion(
            f"vllm-flash supports vLLM {', '.join(SUPPORTED_VLLM_VERSIONS)}, but vLLM {version} is installed. "
            f"Install a supported vLLM (pip install vllm=={SUPPORTED_VLLM_VERSIONS[-1]}) or a vllm-flash "
            "release made for your vLLM.")
    return version


@dataclass
class Patch:
    target: str  # "module:Class", or "module" for a module-level function
    attribute: str  # the attribute of that class (or module) that is replaced
    why: str
    make: Callable[[Any], Any]  # original -> replacement
    after: Callable[[type], None] | None = None  # e.g. rebuild a pydantic dataclass after the change
    when: Callable[[], bool] | None = None  # applies only where this holds (e.g. on the CPU platform)
    original: Any = field(default=None, repr=False)
    applied: bool = False

    def resolve(self) -> Any:
        module, _, cls = self.target.partition(":")
        owner = importlib.import_module(module)
        return getattr(owner, cls) if cls else owner

    def apply(self) -> None:
        if self.applied or (self.when is not None and not self.when()):
            return
        cls = self.resolve()
        if getattr(cls, f"__vllm_flash_patched_{self.attribute}", False):
            # Another copy of this registry (e.g. a reloaded module) already patched the class.
            self.applied = True
            return
        self.original = cls.__dict__.get(self.attribute)
        setattr(cls, self.attribute, self.make(self.original))
        setattr(cls, f"__vllm_flash_patched_{self.attribute}", True)
        if self.after:
            self.after(cls)
        self.applied = True

    def revert(self) -> None:
        if not self.applied:
            return
        cls = self.resolve()
        if self.original is None:
            delattr(cls, self.attribute)
        else:
            setattr(cls, self.attribute, self.original)
        delattr(cls, f"__vllm_flash_patched_{self.attribute}")
        if self.after:
            self.after(cls)
        self.applied = False


REGISTRY: list[Patch] = []


def register(patch: Patch) -> Patch:
    REGISTRY.append(patch)
    return patch


def apply_all() -> list[Patch]:
    check_vllm_version()
    from . import cpu_sampling, proposer, speculative_config, vllm_config  # noqa: F401  (they register)

    for patch in REGISTRY:
        patch.apply()
    return REGISTRY


def describe() -> str:
    return "\n".join(f"{p.target}.{p.attribute}{'' if p.applied else ' (not applied here)'}: {p.why}"
                     for p in REGISTRY)
