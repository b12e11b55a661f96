"""Derived configs: the same QuantizerConfig with one aspect changed (e.g. the CLI's ``--calibrator``).

Every other setting (weight specs, op type/name overrides, bias_correction, qat_schedule, any
field added later) is carried over: the configs are copied with ``dataclasses.replace``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from qdq.calibration.base import QParamsCalculatorBase
from qdq.config import ModuleQuantizerConfig, QuantizerConfig

__all__ = ["with_activation_calculator"]


def _swap(specs: dict[Any, Any] | None, name: str) -> dict[Any, Any] | None:
    if specs is None:
        return None
    # kwargs belong to the calculator they were written for: kept only if it stays the same
    return {k: (None if s is None else s.replace(
        qparam_calculator_cls=name, calculator_kwargs=s.calculator_kwargs if s.qparam_calculator_cls == name else {}))
        for k, s in specs.items()}


def _configs(table: dict[str, ModuleQuantizerConfig | None], name: str) -> dict[str, ModuleQuantizerConfig | None]:
    return {k: _module(v, name) for k, v in table.items()}


def _module(cfg: ModuleQuantizerConfig | None, name: str) -> ModuleQuantizerConfig | None:
    if cfg is None:
        return None
    return dataclasses.replace(cfg, op_input_spec=_swap(cfg.op_input_spec, name),
                               op_output_spec=_swap(cfg.op_output_spec, name),
                               op_type_config=_configs(cfg.op_type_config, name),
                               op_name_config=_configs(cfg.op_name_config, name))


def with_activation_calculator(config: QuantizerConfig, name: str) -> QuantizerConfig:
    """``config`` with every activation (input/output) spec using calculator ``name``; all else kept."""
    QParamsCalculatorBase.check_name(name)
    return dataclasses.replace(config, global_config=_module(config.global_config, name),
                               op_type_configs=_configs(config.op_type_configs, name),
                               op_name_configs=_configs(config.op_name_configs, name))
