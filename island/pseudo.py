"""Pure functions of local-update training: the pseudo-gradient, applying a global version, and
moving parameters between a torch model and float32 numpy arrays.

DiLoCo (Douillard et al., "DiLoCo: Distributed Low-Communication Training of Language Models",
2023, Algorithm 1, line 12): after ``H`` inner steps from the anchor ``theta^(t-1)`` an island
sends the pseudo-gradient ``Delta_i = theta^(t-1) - theta_i^(t)`` (:func:`pseudo_gradient`).
The root publishes each new global version as an update ``u_v = theta_v - theta_{v-1}`` and
every replica applies it as ``anchor_v = anchor_{v-1} + u_v`` (:func:`apply_version`).

Replicas are bit-identical only if every one of them adds the same ``u_v`` to the same bits
in the same way: float32, elementwise, tensor by tensor in sorted-name order, which is the
rule ``comms.update.apply_update`` implements once for the root, the aggregators' replicas
and the islands (``apply_version`` here is that function).

No I/O, no threads, no state. ``pseudo_gradient`` and ``apply_version`` take numpy arrays (or
torch tensors, for ``params``); the model helpers take an ``nn.Module``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from comms.codecs import as_float_array

# The replica rule is one function for the root and every island (bit-identical anchors).
from comms.update import apply_update as apply_version  # noqa: F401
from comms.update import check_same_layout

Arrays = dict[str, np.ndarray]


def pseudo_gradient(anchor: Mapping[str, np.ndarray], params: Mapping[str, Any]) -> Arrays:
    """``anchor - params`` per tensor, as new float32 arrays (DiLoCo's outer gradient).

    ``params`` may hold numpy arrays or torch tensors (any float dtype, any device); they are
    converted to float32 before the subtraction, so the result is the exact float32 difference.
    """
    check_same_layout(anchor, params, "pseudo-gradient")
    out = {}
    for name, a in anchor.items():
        p = np.asarray(as_float_array(params[name], "pseudo_gradient"), dtype=np.float32)
        out[name] = np.subtract(a, p, dtype=np.float32)
    return out


def copy_arrays(arrays: Mapping[str, Any]) -> Arrays:
    """Fresh, writable, C-contiguous float32 copies of ``arrays``."""
    return {
        name: np.array(as_float_array(value, "copy_arrays"), dtype=np.float32, order="C")
        for name, value in arrays.items()
    }


def params_to_numpy(model: torch.nn.Module) -> Arrays:
    """float32 numpy copies of the model's parameters, by ``named_parameters`` name.

    Only parameters (not buffers) take part in local-update training; a parameter shared by
    two modules appears once, under its first name.
    """
    with torch.no_grad():
        return {
            name: p.detach().to("cpu", torch.float32).numpy().copy()
            for name, p in model.named_parameters()
        }


def load_numpy_into(model: torch.nn.Module, arrays: Mapping[str, Any]) -> None:
    """Copy ``arrays`` into the model's parameters in place (``Parameter.copy_``).

    The Parameter objects stay the same, so an optimizer built on them keeps working (and
    keeps its state). ``arrays`` must name exactly the model's parameters with their shapes;
    values are cast to each parameter's dtype and device.
    """
    _into(model, arrays, torch.Tensor.copy_, "load into model")


def add_numpy_into(model: torch.nn.Module, arrays: Mapping[str, Any]) -> None:
    """Add ``arrays`` to the model's parameters in place (``Parameter.add_``); same rules as
    :func:`load_numpy_into`."""
    _into(model, arrays, torch.Tensor.add_, "add into model")


def _into(model: torch.nn.Module, arrays: Mapping[str, Any], op, what: str) -> None:
    """``op(parameter, array)`` for every parameter, in its dtype and on its device."""
    params = dict(model.named_parameters())
    check_same_layout(params, arrays, what)
    with torch.no_grad():
        for name, p in params.items():
            value = as_float_array(arrays[name], what)
            if not (value.flags.c_contiguous and value.flags.writeable):
                value = np.array(value, order="C")  # torch.from_numpy wants writable memory
            op(p, torch.from_numpy(value).to(device=p.device, dtype=p.dtype))
