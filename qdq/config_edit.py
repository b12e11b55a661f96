"""Derived configs: the same QuantizerConfig with one aspect changed (e.g. the CLI's ``--calibrator``)."""

from __future__ import annotations

from qdq.calibration.base import QParamsCalculatorBase
from qdq.config import ModuleQuantizerConfig, QuantizerConfig

__all__ = ["with_activation_calculator"]


def _module(cfg: ModuleQuantizerConfig | None, name: str) -> ModuleQuantizerConfig | None:
    if cfg is None:
        return None

    def swap(specs: dict | None) -> dict | None:
        if specs is None:
            return None
        return {k: (None if s is None else s.replace(qparam_calculator_cls=name)) for k, s in specs.items()}

    return ModuleQuantizerConfig(op_state_spec=cfg.op_state_spec, op_input_spec=swap(cfg.op_input_spec),
                                 op_output_spec=swap(cfg.op_output_spec))


def with_activation_calculator(config: QuantizerConfig, name: str) -> QuantizerConfig:
    """``config`` with every activation (input/output) spec using calculator ``name``."""
    QParamsCalculatorBase.check_name(name)
    return QuantizerConfig(
        global_config=_module(config.global_config, name),
        op_type_configs={k: _module(v, name) for k, v in config.op_type_configs.items()},
        op_name_configs={k: _module(v, name) for k, v in config.op_name_configs.items()},
        qat_schedule=config.qat_schedule,
    )
