"""One offscreen renderer per environment, on MuJoCo's own ``mujoco.Renderer``.

We render through ``mujoco.Renderer`` rather than ``dm_control``'s ``physics.render`` so that the scene
flags are ours to set: in a software renderer (llvmpipe, the usual case on a CPU machine) shadows and
reflections cost about 5x the rest of the frame and carry no information from a top-down camera.
"""

from __future__ import annotations

import atexit
import weakref

import mujoco
import numpy as np

from envs.gl import rendering_error

# quality -> (shadows, reflections). Both keep 4x multisampling: the arm is 1-2 px wide at 64 px.
RENDER_QUALITIES = {"fast": (False, False), "standard": (True, True)}

_live: "weakref.WeakSet[PixelRenderer]" = weakref.WeakSet()
_hook_registered = False


def _close_all() -> None:
    # A GL context freed by the garbage collector during interpreter teardown prints EGL errors.
    for renderer in list(_live):
        renderer.close()


def _register_exit_hook() -> None:
    # MuJoCo registers its own exit hook (terminating the EGL display) when it makes its first
    # context; hooks run last-registered-first, so ours goes in after that and runs before it.
    global _hook_registered
    if not _hook_registered:
        atexit.register(_close_all)
        _hook_registered = True


class PixelRenderer:
    """Renders square uint8 RGB frames of an ``MjData`` from a named camera or a free camera."""

    def __init__(self, model: mujoco.MjModel, size: int, camera: str | mujoco.MjvCamera, quality: str = "fast"):
        if quality not in RENDER_QUALITIES:
            raise ValueError(f"render quality must be one of {sorted(RENDER_QUALITIES)}, got {quality!r}")
        model.vis.global_.offwidth = max(model.vis.global_.offwidth, size)
        model.vis.global_.offheight = max(model.vis.global_.offheight, size)
        try:
            self._renderer = mujoco.Renderer(model, size, size)
        except Exception as exc:  # the GL backend failed to start: say which packages it needs
            raise rendering_error(exc) from exc
        shadows, reflections = RENDER_QUALITIES[quality]
        self._renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = shadows
        self._renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = reflections
        self.camera = camera
        _live.add(self)
        _register_exit_hook()

    def render(self, data: mujoco.MjData) -> np.ndarray:
        """(size, size, 3) uint8 frame of ``data`` (positions must be current: call mj_forward first)."""
        self._renderer.update_scene(data, camera=self.camera)
        return self._renderer.render()  # a fresh array each call

    def close(self) -> None:
        renderer, self._renderer = getattr(self, "_renderer", None), None
        if renderer is not None:
            # mujoco's close frees its render context in whichever GL context is current: made current first,
            # it is its own, not another live renderer's (whose frames it would spoil)
            gl = getattr(renderer, "_gl_context", None)
            if gl is not None:
                gl.make_current()
            renderer.close()
        _live.discard(self)

    def __del__(self) -> None:  # a renderer dropped without close(): freed in its own context too
        try:
            self.close()
        except Exception:  # noqa: BLE001 - at interpreter teardown GL may already be gone
            pass
