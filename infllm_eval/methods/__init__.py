"""Context methods. Each method is one module + one config (`conf/method/<name>.yaml`, key `impl`)."""

from __future__ import annotations

import importlib
from typing import Any

from infllm_eval.errors import UserError
from infllm_eval.methods.base import ContextMethod, ModelSpec

__all__ = ["ContextMethod", "ModelSpec", "make_method"]


def _import(impl: str):
    module, _, attr = impl.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise UserError(f"method.impl '{impl}' cannot be imported ({e}); use 'package.module:ClassName'.") from e


def make_method(method_cfg: Any) -> ContextMethod:
    """Instantiate and validate the method described by a `method` config node (no model needed)."""
    cls = _import(str(method_cfg["impl"]))
    params = dict(method_cfg.get("params") or {})
    valid = (*cls.param_names, *cls.shared_params)
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise UserError(f"method.params.{unknown[0]} is not a parameter of method '{method_cfg['name']}'; "
                        f"valid: {', '.join(valid)}.")
    method = cls(**params)
    method.validate()
    return method
