"""Devices by name: one parser for every `device=` / `.to(device)` argument in jaxlens."""

from __future__ import annotations

from typing import Any

import jax

__all__ = ["PLATFORMS", "resolve_device"]

PLATFORMS = {"cpu": "cpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu", "tpu": "tpu"}


def resolve_device(device: Any) -> jax.Device:
    """A `jax.Device` from a device, a platform string ("cpu", "gpu"/"cuda", "tpu", optionally
    ":N") or a torch.device; ValueError naming what is available otherwise."""
    if isinstance(device, jax.Device):
        return device
    if not isinstance(device, str) and hasattr(device, "type"):  # a torch.device, without importing torch
        device = str(device)
    if not isinstance(device, str):
        raise ValueError(f"device must be a jax.Device or a string such as 'cpu', 'gpu', 'cuda:0' or 'tpu', "
                         f"got {type(device).__name__}")
    kind, _, index = device.strip().lower().partition(":")
    if kind not in PLATFORMS or (index and not index.isdigit()):
        raise ValueError(f"device {device!r} is not a device name: use 'cpu', 'gpu' (or 'cuda'), 'tpu', "
                         "optionally with ':N', or pass a jax.Device")
    try:
        devices = jax.devices(PLATFORMS[kind])
    except RuntimeError:
        have = sorted({d.platform for d in jax.devices()})
        raise ValueError(f"device {device!r}: JAX has no {PLATFORMS[kind]} devices here (it has {have}); "
                         "install the matching jaxlib or pick one of those") from None
    i = int(index or 0)
    if i >= len(devices):
        raise ValueError(f"device {device!r}: there are only {len(devices)} {PLATFORMS[kind]} device(s) "
                         f"(0..{len(devices) - 1})")
    return devices[i]
