"""Config objects: coreai_opt semantics, YAML round trip, and one-line errors for bad input."""

from __future__ import annotations

import dataclasses

import pytest

from qdq import (
    ConfigError,
    ModuleQuantizerConfig,
    PerBlockGranularity,
    PerChannelGranularity,
    QParamsCalculatorBase,
    QuantizationSpec,
    QuantizerConfig,
)
from qdq.calibration.base import RangeCalculatorBase
from qdq.dtypes import QDType
from qdq.presets import PRESETS, preset
from qdq.spec import QScheme

YAML = """
global_config:
  op_state_spec:
    weight: {dtype: int8, granularity: {type: per_channel, axis: 0}}
  op_input_spec:
    "*": {dtype: int8, qparam_calculator_cls: global_minmax}
  op_output_spec:
    "*": {dtype: int8, qparam_calculator_cls: moving_average, calculator_kwargs: {averaging_constant: 0.05}}
op_type_configs:
  Gemm: null
  Conv:
    op_state_spec:
      weight: {dtype: int4, granularity: {type: per_block, axis: 1, block_size: 16}}
op_name_configs:
  node_conv2d_2: null
"""


def test_yaml_round_trip() -> None:
    cfg = QuantizerConfig.from_yaml(YAML)
    assert cfg.op_type_configs["Gemm"] is None
    conv = cfg.op_type_configs["Conv"]
    assert conv.op_state_spec["weight"].dtype is QDType.INT4
    assert conv.op_state_spec["weight"].granularity == PerBlockGranularity(axis=1, block_size=16)
    assert cfg.global_config.op_output_spec["*"].calculator_kwargs == {"averaging_constant": 0.05}
    again = QuantizerConfig.from_yaml(cfg.to_yaml())
    assert again.to_dict() == cfg.to_dict()


def test_specs_are_frozen_and_validated() -> None:
    spec = QuantizationSpec(dtype="uint8", qscheme="asymmetric", granularity={"type": "per_channel", "axis": 1})
    assert spec.granularity == PerChannelGranularity(axis=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.dtype = QDType.INT8  # type: ignore[misc]
    with pytest.raises(ConfigError, match="symmetric"):
        QuantizationSpec(dtype="float8_e4m3fn", qscheme="asymmetric")
    with pytest.raises(ConfigError, match="granularity"):
        QuantizationSpec(granularity={"type": "per_row"})


@pytest.mark.parametrize("data, needle", [
    ({"global_cfg": {}}, "valid keys"),
    ({"module_type_configs": {}}, "op_type_configs"),
    ({"global_config": {"op_weight_spec": {}}}, "valid keys"),
    ({"global_config": {"op_state_spec": {"weight": {"dtype": "int3"}}}}, "int3"),
])
def test_unknown_keys_are_one_line_errors(data: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle) as info:
        QuantizerConfig.from_dict(data)
    assert "\n" not in str(info.value)


def test_unknown_calculator_names_close_matches() -> None:
    with pytest.raises(ConfigError, match="global_minmax"):
        QParamsCalculatorBase.check_name("global_minmx")


def test_user_calculator_is_usable_by_name() -> None:
    @QParamsCalculatorBase.register("test_fixed_range")
    class Fixed(RangeCalculatorBase):
        def observe(self, x):  # type: ignore[no-untyped-def]
            import numpy as np

            self.min_val, self.max_val = np.float32(-1), np.float32(1)
            self.num_batches += 1

    cfg = QuantizerConfig.from_dict({"global_config": {"op_input_spec": {"*": {"qparam_calculator_cls": "test_fixed_range"}}}})
    assert cfg.global_config.op_input_spec["*"].qparam_calculator_cls == "test_fixed_range"
    with pytest.raises(ConfigError, match="already registered"):
        @QParamsCalculatorBase.register("test_fixed_range")
        class Other(RangeCalculatorBase):
            def observe(self, x):  # type: ignore[no-untyped-def]
                pass


def test_none_disables_ports() -> None:
    cfg = ModuleQuantizerConfig(op_input_spec=None, op_output_spec={"*": None})
    assert cfg.spec_for("input", "X", 0) is None
    assert cfg.spec_for("output", "Y", 0) is None
    assert cfg.spec_for("state", "weight", 1) is not None


def test_presets() -> None:
    assert set(PRESETS) == {"int8", "int8-global-minmax", "int8-asymmetric", "int8-smoothquant", "int8-gptq", "fp8",
                            "w8", "w4", "w4-gptq"}
    assert preset("int8").algorithms == ({"name": "smoothquant", "alpha": 0.7, "targets": "norm"},)
    assert preset("int8-smoothquant").algorithms == ({"name": "smoothquant", "alpha": 0.8, "targets": "all"},)
    gptq = {"name": "gptq", "damp": 0.01, "block": 128, "act_order": True, "sequential": False,
            "bias_correction": True, "fetch_mb": 128}
    assert preset("int8-gptq").algorithms[1] == gptq and preset("w4-gptq").algorithms == (gptq,)
    assert preset("w4-gptq").global_config.op_state_spec["weight"].qscheme.value == "asymmetric"
    assert preset("fp8").global_config.op_input_spec["*"].dtype is QDType.FLOAT8_E4M3FN
    assert preset("w4").global_config.op_input_spec is None
    assert preset("int8").global_config.op_input_spec["*"].qscheme is QScheme.SYMMETRIC
    with pytest.raises(ConfigError, match="int8-global-minmax"):
        preset("int9")


def test_coreai_opt_objects_mean_the_same() -> None:
    cao = pytest.importorskip("coreai_opt.quantization")
    from coreai_opt.quantization.spec import QuantizationSpec as CaoSpec

    spec = CaoSpec(dtype="int8", qscheme="asymmetric")
    theirs = cao.QuantizerConfig(global_config=cao.ModuleQuantizerConfig(op_input_spec={"*": spec}))
    ours = QuantizerConfig(global_config=theirs.global_config)
    assert ours.global_config.op_input_spec["*"].qscheme is QScheme.ASYMMETRIC


@pytest.mark.parametrize("spec, needle", [
    ({"float_range": ["low", 1.0]}, "float_range"),
    ({"float_range": [True, 1.0]}, "float_range"),
    ({"learnable_scale": "no"}, "learnable_scale"),
    ({"granularity": {"type": "per_channel", "axis": "0"}}, "axis"),
    ({"granularity": {"type": "per_block", "block_size": ["a", 32]}}, "block_size"),
    ({"granularity": {"type": ["per_tensor"]}}, "granularity type"),
    ({"granularity": {"type": "per_chanel"}}, "did you mean per_channel"),
    ({"dtype": {"name": "int8"}}, "dtype"),
    ({"dtype": [1, 2]}, "dtype"),
    ({"qscheme": ["symmetric"]}, "qscheme"),
    ({"calculator_kwargs": {"averaging": 0.1}}, "did you mean averaging_constant"),
    ({"qparam_calculator_cls": "static", "calculator_kwargs": {"averaging_constant": 0.1}}, "accepts: none"),
    ({"qparam_calculator_cls": "moving_average", "calculator_kwargs": {"averaging_constant": [0.1]}},
     "invalid calculator_kwargs"),
    ({"calculator_kwargs": {1: 0.1}}, "calculator_kwargs"),
    ({"qparam_calculator_cls": "global_minmax\nstatic"}, "qparam_calculator_cls"),
    ({0: "int8"}, "unknown QuantizationSpec key"),
])
def test_wrong_value_types_are_one_line_config_errors(spec: dict, needle: str) -> None:
    """Every wrong type in a spec is a ConfigError naming the key, never a TypeError/ValueError from deep inside."""
    with pytest.raises(ConfigError, match=needle) as info:
        QuantizationSpec.from_dict(spec)
    assert "\n" not in str(info.value)


def test_calculator_kwargs_are_kept_when_valid() -> None:
    spec = QuantizationSpec(qparam_calculator_cls="percentile", calculator_kwargs={"percentile": 99.9})
    assert spec.calculator_kwargs == {"percentile": 99.9}
    assert QuantizationSpec(calculator_kwargs={"averaging_constant": 0.5}).calculator_kwargs["averaging_constant"] == 0.5
    with pytest.raises(ConfigError, match="percentile"):
        QuantizationSpec(qparam_calculator_cls="percentile", calculator_kwargs={"percentile": 10})


@pytest.mark.parametrize("text, needle", [
    ("", "is empty"),
    ("# just a comment\n", "is empty"),
    ("null\n", "is empty"),
    ("- global_config\n", "got a list"),
    ("int8\n", "use --preset"),
    ("bias_correction: !!float abc\n", "not valid YAML"),
    ("global_config: !!python/object/apply:os.getcwd []\n", "not valid YAML"),
    ("a: 1\n\x07\n", "not valid YAML"),
    ("qat_schedule: {enable_fake_quant: -1}\n", "qat_schedule.enable_fake_quant"),
    ("qat_schedule: {warmup: 3}\n", "unknown qat_schedule key"),
])
def test_yaml_files_that_are_not_configs(tmp_path, text: str, needle: str) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=needle) as info:
        QuantizerConfig.from_yaml(path)
    assert "\n" not in str(info.value)


def test_yaml_paths_that_are_not_files(tmp_path) -> None:
    with pytest.raises(ConfigError, match="is a folder"):
        QuantizerConfig.from_yaml(tmp_path)
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="not UTF-8"):
        QuantizerConfig.from_yaml(tmp_path / "bin.yaml")
    with pytest.raises(ConfigError, match="did you mean int8"):
        QuantizerConfig.from_yaml("int9")


def test_nested_op_configs_round_trip() -> None:
    """coreai_opt-style op_type_config inside global_config lands in op_type_configs, and to_dict/from_dict agree."""
    cfg = QuantizerConfig.from_dict({"global_config": {"op_type_config": {"Gemm": None}},
                                     "qat_schedule": {"milestones": (0, 1, None, None)}})
    assert cfg.op_type_configs == {"Gemm": None}
    assert cfg.global_config.op_type_config == {}
    assert cfg.qat_schedule == {"milestones": [0, 1, None, None]}
    assert QuantizerConfig.from_dict(cfg.to_dict()) == cfg
    assert QuantizerConfig.from_yaml(cfg.to_yaml()) == cfg
