"""Context methods. Each method is one class that registers itself in `METHODS` (`@METHODS.register("name")`) and
one or more configs (`conf/method/<name>.yaml`) whose `impl` names it; shared keys sit in `conf/method/_base.yaml`."""

from __future__ import annotations

from typing import Any

from infllm_eval.errors import UserError, unknown_name
from infllm_eval.methods.base import ContextMethod, ModelSpec
from infllm_eval.registry import Registry

__all__ = ["METHODS", "ContextMethod", "ModelSpec", "make_method"]

METHODS: Registry[type[ContextMethod]] = Registry(
    "method implementation",
    modules=("infllm_eval.methods.full", "infllm_eval.methods.streamingllm", "infllm_eval.methods.lminfinite",
             "infllm_eval.methods.infllm", "infllm_eval.methods.infllmv2", "infllm_eval.methods.hip",
             "infllm_eval.methods.longheads", "infllm_eval.methods.snapkv", "infllm_eval.methods.h2o",
             "infllm_eval.methods.quest", "infllm_eval.methods.sirllm"),
)


def method_class(impl: Any) -> type[ContextMethod]:
    """The class registered as `impl` (a `method.impl` value); configs never import modules by path."""
    if str(impl) not in METHODS:
        raise unknown_name("method.impl", str(impl), METHODS.names())
    return METHODS.get(str(impl))


def make_method(method_cfg: Any) -> ContextMethod:
    """Instantiate and validate the method described by a `method` config node (no model needed)."""
    cls = method_class(method_cfg["impl"])
    params = dict(method_cfg.get("params") or {})
    valid = (*cls.param_names, *cls.shared_params)
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise UserError(f"method.params.{unknown[0]} is not a parameter of method '{method_cfg['name']}'; "
                        f"valid: {', '.join(valid)}.")
    method = cls(**params)
    method.validate()
    method.check_name(str(method_cfg["name"]))
    return method
