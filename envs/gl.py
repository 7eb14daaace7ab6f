"""Headless OpenGL backend selection for MuJoCo.

MuJoCo reads ``MUJOCO_GL`` once, when it is first imported, so this module must run before
``mujoco`` or ``dm_control`` are imported (``envs/__init__.py`` imports it first).
"""

from __future__ import annotations

import ctypes.util
import importlib
import os
import sys

# What each backend needs on a bare Debian machine.
SYSTEM_PACKAGES = {
    "egl": "libegl1 libopengl0 libgl1-mesa-dri",
    "osmesa": "libosmesa6",
}
_LIBRARIES = {"egl": "EGL", "osmesa": "OSMesa"}


def _available(backend: str) -> bool:
    return ctypes.util.find_library(_LIBRARIES[backend]) is not None


def select_gl_backend() -> str:
    """Set ``MUJOCO_GL`` if unset: ``egl`` when libEGL is present, else ``osmesa``.

    A value the user set is kept as it is.
    """
    chosen = os.environ.get("MUJOCO_GL")
    if chosen:
        return chosen
    chosen = "egl" if _available("egl") or not _available("osmesa") else "osmesa"
    os.environ["MUJOCO_GL"] = chosen
    if chosen == "osmesa":
        os.environ.setdefault("PYOPENGL_PLATFORM", "osmesa")
    _reselect_if_mujoco_imported()
    return chosen


def import_mujoco() -> None:
    """Import MuJoCo with the backend chosen. One whose library is missing (``MUJOCO_GL=osmesa`` without
    libOSMesa) fails inside PyOpenGL at import, before any renderer: the same error naming the packages to
    install as a renderer that fails to start; any other failure is left as it is."""
    try:
        importlib.import_module("mujoco")
    except Exception as exc:
        backend = os.environ.get("MUJOCO_GL", "")
        if backend in _LIBRARIES and not _available(backend):
            raise rendering_error(exc) from exc
        raise


def _reselect_if_mujoco_imported() -> None:
    """MuJoCo imported before us picked its GL backend with MUJOCO_GL unset (GLFW, which needs a
    display). Its renderer looks the context class up at each use, so importing that module anew
    after setting MUJOCO_GL is enough, as long as PyOpenGL has not bound a platform yet."""
    name = "mujoco.rendering.classic.gl_context"
    if name in sys.modules and "OpenGL.GL" not in sys.modules:
        importlib.reload(sys.modules[name])


def rendering_error(exc: BaseException) -> RuntimeError:
    """A clear error for a renderer that failed to start, naming the packages to install."""
    backend = os.environ.get("MUJOCO_GL", "egl")
    hints = "; ".join(f"MUJOCO_GL={b} needs `apt-get install {p}`" for b, p in SYSTEM_PACKAGES.items())
    return RuntimeError(
        f"MuJoCo could not start a headless renderer with MUJOCO_GL={backend} ({type(exc).__name__}: {exc}). "
        f"{hints}. Set MUJOCO_GL before running to choose the backend."
    )
