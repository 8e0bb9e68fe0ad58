"""Which jax platforms a soft_jax process uses, decided before jax starts its backends.

With `libtpu` installed (requirements.txt installs it, for the ahead-of-time TPU compile),
jax tries the TPU backend first on every host. Where the host has no TPU chip that attempt
prints libtpu's "Failed to find host bounds" / TPU_* warnings and may query the GCE
metadata server before jax falls back. `choose_platforms` runs when soft_jax is imported:
on a host without TPU chips it leaves the TPU out of jax's platform list (keeping a GPU
whose plugin is installed), so nothing loads libtpu; a TPU host, an explicit JAX_PLATFORMS,
or a host without libtpu is left exactly as jax would have it. Only `soft-jax compile`
loads libtpu on purpose, as a compiler (`prepare_tpu_compiler`).
"""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import os
from pathlib import Path

GOOGLE_PCI_VENDOR = "0x1ae0"
# PCI device ids of TPU chips (v3 .. v7), as the TPU runtime lists them; the Google vendor id
# alone would also match a gVNIC network card
TPU_PCI_DEVICES = frozenset({"0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f",
                             "0x0076"})
NVIDIA_DEVICE_FILES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg")


def tpu_chips_on_host(pci_root: str = "/sys/bus/pci/devices") -> int:
    """Number of TPU chips attached to this host over PCI."""
    count = 0
    for vendor in glob.glob(f"{pci_root}/*/vendor"):
        folder = Path(vendor).parent
        try:
            if (Path(vendor).read_text().strip() == GOOGLE_PCI_VENDOR
                    and (folder / "device").read_text().strip() in TPU_PCI_DEVICES):
                count += 1
        except OSError:
            continue
    return count


def libtpu_installed() -> bool:
    """Whether jax could load a TPU runtime (the libtpu package or TPU_LIBRARY_PATH)."""
    return bool(os.environ.get("TPU_LIBRARY_PATH")) or importlib.util.find_spec("libtpu") is not None


def _gpu_plugins() -> list[str]:
    """The jax GPU platforms ("cuda", "rocm") whose plugin package is installed."""
    names = {ep.name for ep in importlib.metadata.entry_points(group="jax_plugins")}
    spec = importlib.util.find_spec("jax_plugins")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        names.update(p.name for p in Path(folder).iterdir())
    return [p for p in ("cuda", "rocm") if any(p in n for n in names)]


def platforms_without_tpu() -> str:
    """jax's platform list for a host without TPU chips: a visible GPU with its plugin, then
    the CPU."""
    gpus = _gpu_plugins()
    if not any(os.path.exists(f) for f in NVIDIA_DEVICE_FILES):
        gpus = [g for g in gpus if g != "cuda"]
    if not os.path.exists("/dev/kfd"):
        gpus = [g for g in gpus if g != "rocm"]
    return ",".join([*gpus, "cpu"])


def choose_platforms(environ=None) -> str | None:
    """Leave the TPU out of jax's platforms where it cannot be used (see the module
    docstring); returns the platform list it set, or None when it changed nothing."""
    env = os.environ if environ is None else environ
    if "JAX_PLATFORMS" in env or not libtpu_installed() or tpu_chips_on_host():
        return None
    import jax
    from jax._src import xla_bridge

    if jax.config.jax_platforms or xla_bridge.backends_are_initialized():
        return None  # the caller chose, or jax already started (too late to change)
    platforms = platforms_without_tpu()
    jax.config.update("jax_platforms", platforms)
    return platforms


def prepare_tpu_compiler(accelerator_type: str) -> None:
    """Before libtpu loads in a compile-only process on a host without TPU chips: skip the
    metadata server, name the target (which silences libtpu's host discovery) and let
    several compile processes share the host (libtpu otherwise holds a lock file)."""
    if tpu_chips_on_host():
        return
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", accelerator_type)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
