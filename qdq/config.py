"""QuantizerConfig / ModuleQuantizerConfig: which tensors of which ops get which spec.

Semantics follow coreai_opt: precedence op name -> op type -> global; ``None`` leaves an
op (or a port) float; omitted spec dicts take the defaults (int8 per-channel weights,
int8 per-tensor activations). Port keys are ``"*"``, an ONNX input/output name of the op
(``X``, ``A``, ``Y`` ...), an index, or for state ``"weight"``/``"bias"`` (see qdq/ops.py).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import yaml

from qdq.errors import ConfigError
from qdq.spec import QuantizationSpec, default_activation_spec, default_weight_spec, show

__all__ = ["ModuleQuantizerConfig", "QuantizerConfig", "SpecDict"]

SpecDict = dict[Any, "QuantizationSpec | None"]

_UNSET: Any = object()


def _parse_spec(value: Any, where: str) -> QuantizationSpec | None:
    if value is None or isinstance(value, QuantizationSpec):
        return value
    if isinstance(value, Mapping):
        try:
            return QuantizationSpec.from_dict(value)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    # coreai_opt / pydantic QuantizationSpec objects: read the shared fields.
    if type(value).__name__ == "QuantizationSpec" and hasattr(value, "dtype"):
        fields = {"dtype": value.dtype, "qscheme": getattr(value, "qscheme", "symmetric"),
                  "granularity": getattr(value, "granularity", None) or {"type": "per_tensor"},
                  "qparam_calculator_cls": _coreai_calc_name(getattr(value, "qparam_calculator_cls", "default")),
                  "float_range": _coreai_range(getattr(value, "float_range", None))}
        return QuantizationSpec(**fields)
    raise ConfigError(f"{where}: expected a QuantizationSpec, a mapping or null, got {show(value)}")


def _coreai_calc_name(value: Any) -> str:
    if isinstance(value, str):
        return value
    name = getattr(value, "__name__", str(value))
    table = {"StaticQParamsCalculator": "static", "MovingAverageQParamsCalculator": "moving_average",
             "GlobalMinMaxQParamsCalculator": "global_minmax", "_DefaultQParamsCalculator": "default"}
    return table.get(name, name)


def _coreai_range(value: Any) -> Any:
    if value is None or all(v is None for v in value):
        return None
    return list(value)


def _parse_spec_dict(value: Any, where: str) -> dict[Any, QuantizationSpec | None] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"{where} must be a mapping of port -> spec (e.g. {{'*': {{dtype: int8}}}}), got {show(value)}"
        )
    out: dict[Any, QuantizationSpec | None] = {}
    for key, spec in value.items():
        if not isinstance(key, (str, int)) or isinstance(key, bool):
            raise ConfigError(f"{where}: port key {show(key)} must be '*', a port name or an index")
        out[key] = _parse_spec(spec, f"{where}[{key!r}]")
    return out


@dataclasses.dataclass(frozen=True)
class ModuleQuantizerConfig:
    """Specs for an op's state (weights), inputs and outputs.

    Omitted dicts take the defaults; ``None`` disables that kind of tensor entirely.
    ``op_type_config`` / ``op_name_config`` are accepted for coreai_opt compatibility and act
    like :class:`QuantizerConfig`'s ``op_type_configs`` / ``op_name_configs``.
    """

    op_state_spec: Any = _UNSET
    op_input_spec: Any = _UNSET
    op_output_spec: Any = _UNSET
    op_type_config: Any = None
    op_name_config: Any = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        defaults = {
            "op_state_spec": {"weight": default_weight_spec()},
            "op_input_spec": {"*": default_activation_spec()},
            "op_output_spec": {"*": default_activation_spec()},
        }
        for name, default in defaults.items():
            value = getattr(self, name)
            set_(self, name, default if value is _UNSET else _parse_spec_dict(value, name))
        for name in ("op_type_config", "op_name_config"):
            set_(self, name, _parse_op_configs(getattr(self, name), name))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in ("op_state_spec", "op_input_spec", "op_output_spec"):
            value = getattr(self, name)
            out[name] = None if value is None else {k: (None if s is None else s.to_dict()) for k, s in value.items()}
        for name in ("op_type_config", "op_name_config"):
            value = getattr(self, name)
            if value:
                out[name] = {k: (None if c is None else c.to_dict()) for k, c in value.items()}
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, where: str = "global_config") -> ModuleQuantizerConfig:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where} must be a mapping, got {show(data)}")
        valid = [f.name for f in dataclasses.fields(cls)]
        extra = [k for k in data if not isinstance(k, str) or k not in valid]
        if extra:
            hint = next((f" ({k} is called {_MODULE_ALIASES[k]} here)" for k in extra if k in _MODULE_ALIASES),
                        _did_you_mean(extra, valid))
            raise ConfigError(f"unknown key(s) {show(extra)} in {where}{hint}; valid keys: {valid}")
        try:
            return cls(**dict(data))
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None

    def spec_for(self, kind: str, port_name: str | None, index: int) -> QuantizationSpec | None:
        """Spec for one port: an explicit name or index wins over ``"*"``; missing = float."""
        table = {"state": self.op_state_spec, "input": self.op_input_spec, "output": self.op_output_spec}[kind]
        if not table:
            return None
        for key in (port_name, index):
            if key is not None and key in table:
                return table[key]
        return table.get("*")


#: Names users write for ModuleQuantizerConfig keys (other toolkits' spellings) -> ours.
_MODULE_ALIASES = {"op_weight_spec": "op_state_spec", "weight_spec": "op_state_spec", "op_param_spec": "op_state_spec",
                   "op_activation_spec": "op_output_spec", "activation_spec": "op_output_spec",
                   "input_spec": "op_input_spec", "output_spec": "op_output_spec"}


def _did_you_mean(keys: list[Any], valid: Any) -> str:
    close = [m for k in keys if isinstance(k, str) for m in difflib.get_close_matches(k, valid, n=1)]
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _parse_op_configs(value: Any, where: str) -> dict[str, ModuleQuantizerConfig | None]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} must be a mapping of name -> config (or null), got {show(value)}")
    out: dict[str, ModuleQuantizerConfig | None] = {}
    for key, cfg in value.items():
        if not isinstance(key, str):
            raise ConfigError(f"{where}: key {show(key)} must be a string")
        if cfg is None or isinstance(cfg, ModuleQuantizerConfig):
            out[key] = cfg
        elif isinstance(cfg, Mapping):
            out[key] = ModuleQuantizerConfig.from_dict(cfg, f"{where}[{key!r}]")
        elif type(cfg).__name__ in ("ModuleQuantizerConfig", "OpQuantizerConfig"):
            out[key] = _from_coreai_module_config(cfg)
        else:
            raise ConfigError(f"{where}[{key!r}] must be a ModuleQuantizerConfig, a mapping or null, got {show(cfg)}")
    return out


def _from_coreai_module_config(cfg: Any) -> ModuleQuantizerConfig:
    kwargs = {}
    for name in ("op_state_spec", "op_input_spec", "op_output_spec"):
        kwargs[name] = getattr(cfg, name, None)
    return ModuleQuantizerConfig(**kwargs)


@dataclasses.dataclass(frozen=True)
class QuantizerConfig:
    """The whole model's quantization config.

    Args:
        global_config: applies to every supported op not configured more specifically
            (``None`` = quantize nothing unless named below).
        op_type_configs: ONNX op type (``"Conv"``; coreai_opt/torch names such as ``"conv2d"``,
            ``"linear"`` are accepted as aliases) -> config or ``None`` (leave float).
        op_name_configs: node name (exact, or a regular expression matched in full) -> config or ``None``.
        qat_schedule: optional QAT schedule mapping, read by :mod:`qdq.qat`.
        bias_correction: after calibration, shift the float bias of each Conv/Gemm with a
            quantized weight by ``(W - Wq) · E[x]`` (empirical bias correction, Nagel et al. 2019),
            so weight rounding does not bias the layer's mean output. Needs calibration data.
        algorithms: algorithm passes run on the float model before QDQ insertion, in order, each
            ``{"name": ..., **options}`` (or ``"name"``), e.g. ``[{"name": "smoothquant", "alpha": 0.7}]``
            (see :mod:`qdq.algorithms`). Need calibration data.
        float_graph_outputs: the model's outputs are read as float by whoever runs it, so a graph output
            gets no QDQ pair where its producer does not need one: MatMul/Gemm (onnxruntime's integer kernels
            return float: QGemm, MatMulIntegerToFloat) and element-wise, activation or pooling ops (cheap in
            float). A Conv / ConvTranspose output keeps its pair (QLinearConv needs it). A quantized output
            only adds error (EfficientNet-Lite0 int8 mse: logits SQNR 23.6 -> 24.3 dB, still every Conv/Gemm
            an integer kernel). Off by default (coreai_opt's semantics); every preset turns it on.
    """

    global_config: Any = _UNSET
    op_type_configs: Any = None
    op_name_configs: Any = None
    qat_schedule: Any = None
    bias_correction: bool = False
    algorithms: Any = None
    float_graph_outputs: bool = False

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        g = self.global_config
        if g is _UNSET:
            g = ModuleQuantizerConfig()
        elif isinstance(g, Mapping):
            g = ModuleQuantizerConfig.from_dict(g)
        elif g is not None and not isinstance(g, ModuleQuantizerConfig):
            if type(g).__name__ == "ModuleQuantizerConfig":
                g = _from_coreai_module_config(g)
            else:
                raise ConfigError(
                    f"global_config must be a ModuleQuantizerConfig, a mapping or null, got {show(g)}"
                )
        type_cfgs = dict(g.op_type_config) if g is not None else {}
        type_cfgs.update(_parse_op_configs(self.op_type_configs, "op_type_configs"))
        name_cfgs = dict(g.op_name_config) if g is not None else {}
        name_cfgs.update(_parse_op_configs(self.op_name_configs, "op_name_configs"))
        if g is not None and (g.op_type_config or g.op_name_config):
            # coreai_opt nests these in the global config; they live (merged) in op_*_configs only
            g = dataclasses.replace(g, op_type_config=None, op_name_config=None)
        set_(self, "global_config", g)
        set_(self, "op_type_configs", type_cfgs)
        set_(self, "op_name_configs", name_cfgs)
        set_(self, "qat_schedule", _parse_qat_schedule(self.qat_schedule))
        if not isinstance(self.bias_correction, bool):
            raise ConfigError(f"bias_correction must be true or false, got {show(self.bias_correction)}")
        if not isinstance(self.float_graph_outputs, bool):
            raise ConfigError(f"float_graph_outputs must be true or false, got {show(self.float_graph_outputs)}")
        set_(self, "algorithms", _parse_algorithms(self.algorithms))

    # ------------------------------------------------------------------ (de)serialisation
    _KEYS: ClassVar[tuple[str, ...]] = (
        "global_config", "op_type_configs", "op_name_configs", "qat_schedule", "bias_correction", "algorithms",
        "float_graph_outputs")
    _TORCH_ONLY: ClassVar[dict[str, str]] = {"module_type_configs": "op_type_configs", "module_name_configs": "op_name_configs"}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> QuantizerConfig:
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise ConfigError(f"a quantizer config must be a mapping, got {type(data).__name__}")
        for key in data:
            if key in cls._TORCH_ONLY:
                raise ConfigError(
                    f"'{key}' selects torch modules; qdq configures ONNX ops: use '{cls._TORCH_ONLY[key]}'"
                )
        extra = [k for k in data if not isinstance(k, str) or k not in cls._KEYS]
        if extra:
            raise ConfigError(f"unknown config key(s) {show(extra)}{_did_you_mean(extra, cls._KEYS)}; "
                              f"valid keys: {list(cls._KEYS)}")
        kwargs = dict(data)
        if "global_config" in kwargs:
            kwargs["global_config"] = (
                None if kwargs["global_config"] is None else ModuleQuantizerConfig.from_dict(kwargs["global_config"])
            )
        return cls(**kwargs)

    @classmethod
    def from_yaml(cls, source: str | os.PathLike[str]) -> QuantizerConfig:
        """Load from a YAML file path (or a YAML string containing a newline).

        Only plain YAML is read (``yaml.safe_load``): python tags such as ``!!python/object`` are refused,
        never executed. An empty file is an error (it is more likely the wrong file than "all defaults").
        """
        text = str(source)
        label = "config"
        if "\n" not in text:
            path = Path(text)
            label = f"config file {path}"
            if path.is_dir():
                raise ConfigError(f"{label} is a folder; pass the YAML file itself")
            if not path.is_file():
                hint = ""
                if path.suffix.lower() not in (".yaml", ".yml") and len(path.parts) == 1:
                    from qdq.presets import PRESETS  # presets import this module: import late

                    close = difflib.get_close_matches(text, PRESETS, n=1)
                    hint = (f" and '{text}' is no preset{f' (did you mean {close[0]}?)' if close else ''}; "
                            f"presets: {', '.join(PRESETS)}")
                raise ConfigError(f"{label} not found{hint}; pass an existing YAML file")
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as exc:
                raise ConfigError(f"{label} is not UTF-8 text (byte {exc.start}); save the YAML as UTF-8") from None
            except OSError as exc:
                raise ConfigError(f"cannot read {label}: {exc.strerror or exc}") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
            raise ConfigError(f"{label} is not valid YAML{where}: {problem[:200]}") from None
        except (ValueError, TypeError, OverflowError, RecursionError) as exc:  # e.g. `!!float abc`
            raise ConfigError(f"{label} is not valid YAML: {' '.join(str(exc).split())[:200]}") from None
        if data is None:
            raise ConfigError(f"{label} is empty; write a mapping such as 'global_config: {{}}' "
                              "(or use --preset for a named config)")
        if not isinstance(data, Mapping):
            hint = "; for a named config use --preset" if isinstance(data, str) else ""
            raise ConfigError(f"{label} must be a YAML mapping of config keys, got a {type(data).__name__}{hint}")
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "global_config": None if self.global_config is None else self.global_config.to_dict(),
        }
        if out["global_config"]:
            out["global_config"].pop("op_type_config", None)
            out["global_config"].pop("op_name_config", None)
        for name in ("op_type_configs", "op_name_configs"):
            value = getattr(self, name)
            if value:
                out[name] = {k: (None if c is None else c.to_dict()) for k, c in value.items()}
        if self.qat_schedule is not None:
            out["qat_schedule"] = dict(self.qat_schedule)
        if self.bias_correction:
            out["bias_correction"] = True
        if self.algorithms:
            out["algorithms"] = [dict(a) for a in self.algorithms]
        if self.float_graph_outputs:
            out["float_graph_outputs"] = True
        return out

    def to_yaml(self) -> str:
        """YAML text that :meth:`from_yaml` reads back to an equal config."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _parse_algorithms(value: Any) -> tuple[dict[str, Any], ...]:
    """Each entry checked now (known name, valid options) and normalized to ``{"name", **all options}``."""
    from qdq.algorithms import build_algorithm

    if value is None:
        return ()
    if isinstance(value, (str, Mapping)):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"algorithms must be a list of {{name: ..., options}} mappings, got {show(value)}")
    return tuple(build_algorithm(v).to_dict() for v in value)


def _parse_qat_schedule(value: Any) -> dict[str, Any] | None:
    """Check ``qat_schedule``'s keys and value types now, keep it as a plain mapping.

    :class:`qdq.qat.QATSchedule` checks the steps' meaning when QAT starts; it is not imported here
    because ``qdq.qat`` needs torch, which plain PTQ does not.
    """
    if value is None:
        return None
    if not isinstance(value, Mapping) and hasattr(value, "to_dict"):  # QATSchedule or a coremltools schedule
        value = value.to_dict()
    if not isinstance(value, Mapping):
        raise ConfigError(f"qat_schedule must be a mapping, e.g. {{enable_fake_quant: 100}}, got {show(value)}")
    extra = [k for k in value if not isinstance(k, str) or k not in _QAT_KEYS]
    if extra:
        raise ConfigError(f"unknown qat_schedule key(s) {show(extra)}{_did_you_mean(extra, _QAT_KEYS)}; "
                          f"valid keys: {list(_QAT_KEYS)}")
    out: dict[str, Any] = {}
    for key, item in value.items():
        if key == "milestones":
            ok = isinstance(item, (list, tuple)) and len(item) == 4 and all(v is None or _is_step(v) for v in item)
            item = list(item) if ok else item
        elif key == "learnable_scale":
            ok = item is None or isinstance(item, bool) or item in ("all", "weights", "activations")
        else:
            ok = _is_step(item) or (item is None and key in ("disable_observer", "freeze_bn"))
        if not ok:
            raise ConfigError(f"qat_schedule.{key}: invalid value {show(item)} (steps are integers >= 0; "
                              "milestones lists 4 of them; learnable_scale is true/false/all/weights/activations)")
        out[key] = item
    return out


_QAT_KEYS = ("enable_observer", "enable_fake_quant", "disable_observer", "freeze_bn", "milestones", "learnable_scale")


def _is_step(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
