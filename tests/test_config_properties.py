"""Property tests: any config dict, spec dict or YAML text either loads or raises ConfigError.

The generators mix the real key names and values with wrong types, unknown keys, odd strings,
numbers (NaN, inf, huge), None and lists, so that both the happy paths and every validator are
reached. Whatever loads must round-trip through ``to_dict`` / ``to_yaml`` unchanged.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from corpus_helpers import conv_model, mlp_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qdq import quantize
from qdq.config import ModuleQuantizerConfig, QuantizerConfig
from qdq.dtypes import parse_dtype
from qdq.errors import ConfigError, QdqError
from qdq.spec import QuantizationSpec, parse_granularity

SETTINGS = settings(max_examples=200, derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

TOP_KEYS = ["global_config", "op_type_configs", "op_name_configs", "qat_schedule", "bias_correction"]
MODULE_KEYS = ["op_state_spec", "op_input_spec", "op_output_spec", "op_type_config", "op_name_config"]
SPEC_KEYS = ["dtype", "qscheme", "granularity", "qparam_calculator_cls", "float_range", "calculator_kwargs",
             "learnable_scale"]
OTHER_KEYS = ["type", "axis", "block_size", "weight", "bias", "*", "X", "W", "Y", "Conv", "Gemm", "conv2d",
              "node_.*", "module_type_configs", "averaging_constant", "enable_fake_quant", ""]
NAMES = ["int8", "uint8", "int16", "uint16", "int4", "uint4", "float8_e4m3fn", "float8_e5m2", "fp8", "qint8",
         "torch.int8", "INT8", " int8 ", "int9", "float32", "bool", "S5", "U3", "V8", "object", "c16", "i8", "f8",
         "per_tensor", "per_channel", "per_block", "per_row", "symmetric", "asymmetric", "symmetric_with_clipping",
         "static", "moving_average", "global_minmax", "default", "percentile", "entropy", "mse", "nonexistent",
         "[1, 2]", "{a: 1}", "\n", "null", "~", "é", "\x00"]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 70), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(NAMES), st.text(max_size=8),
)
keys = st.one_of(st.sampled_from(TOP_KEYS + MODULE_KEYS + SPEC_KEYS + OTHER_KEYS), st.text(max_size=6),
                 st.integers(-2, 3), st.booleans(), st.none(), st.floats(allow_nan=False))
anything = st.recursive(
    scalars, lambda children: st.one_of(st.lists(children, max_size=3), st.tuples(children, children),
                                        st.dictionaries(keys, children, max_size=4)),
    max_leaves=12)


def _maybe_wrong(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly a valid value, sometimes anything at all."""
    return st.one_of(valid, valid, valid, anything)


def _maybe_wrong_key(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly a valid mapping key, sometimes any hashable scalar."""
    return st.one_of(valid, valid, valid, keys)


def _with_junk(base: st.SearchStrategy[dict[Any, Any]], junk_keys: list[str]) -> st.SearchStrategy[Any]:
    """``base`` dicts, sometimes with one unknown (or torch-only) key added."""
    junk = st.tuples(st.one_of(st.sampled_from(junk_keys), keys), anything)
    return st.one_of(base, base, base, st.tuples(base, junk).map(lambda p: {**p[0], p[1][0]: p[1][1]}))


def _strategies(wrong: bool) -> dict[str, st.SearchStrategy[Any]]:
    """Spec, module-config and config dicts; ``wrong`` lets any field be any value and adds unknown keys."""
    w = _maybe_wrong if wrong else (lambda s: s)
    wk = _maybe_wrong_key if wrong else (lambda s: s)
    junk = _with_junk if wrong else (lambda s, _keys: s)
    granularity = w(st.one_of(
        st.sampled_from(["per_tensor", "per_channel", "per_block"]),
        st.fixed_dictionaries({"type": st.just("per_tensor")}),
        st.fixed_dictionaries({"type": st.just("per_channel")}, optional={"axis": st.none() | st.integers(-4, 4)}),
        st.fixed_dictionaries({"type": st.just("per_block")}, optional={
            "axis": st.none() | st.integers(-4, 4),
            "block_size": w(st.integers(2, 64) | st.sampled_from([[1, 32], [-1, 16], [8]]))}),
    ))
    spec = junk(st.fixed_dictionaries({}, optional={
        "dtype": w(st.sampled_from(NAMES[:10])),
        "qscheme": w(st.sampled_from(["symmetric", "asymmetric", "symmetric_with_clipping"])),
        "granularity": granularity,
        "qparam_calculator_cls": w(st.sampled_from(["default", "static", "moving_average", "global_minmax"])),
        "float_range": w(st.one_of(st.none(), st.tuples(st.none() | st.floats(-10, -0.1), st.none() | st.floats(
            0.1, 10)).map(list))),
        "calculator_kwargs": w(st.just({})),
        "learnable_scale": w(st.booleans()),
    }), ["dtyp", "granularity_type", "scale"])
    # moving_average's one argument, only with calculators that can take it
    spec = st.one_of(spec, st.fixed_dictionaries({
        "qparam_calculator_cls": st.sampled_from(["moving_average", "default"]),
        "calculator_kwargs": st.fixed_dictionaries({"averaging_constant": w(st.floats(0.001, 1.0))})}))
    spec_dict = st.dictionaries(wk(st.sampled_from(["*", "weight", "bias", "X", 0, 1])), st.none() | spec,
                                max_size=3)
    module = junk(st.fixed_dictionaries({}, optional={
        "op_state_spec": w(st.none() | spec_dict),
        "op_input_spec": w(st.none() | spec_dict),
        "op_output_spec": w(st.none() | spec_dict),
        "op_type_config": w(st.dictionaries(st.sampled_from(["Conv", "Gemm", "MatMul"]), st.none(), max_size=2)),
    }), ["op_weight_spec", "module_type_config"])
    op_configs = st.dictionaries(wk(st.sampled_from(["Conv", "Gemm", "conv2d", "linear", "node_.*", "fc1"])),
                                 st.none() | module, max_size=3)
    schedule = st.fixed_dictionaries({}, optional={
        "enable_observer": w(st.integers(0, 9)), "enable_fake_quant": w(st.integers(0, 9)),
        "disable_observer": w(st.none() | st.integers(0, 9)),
        "learnable_scale": w(st.sampled_from([True, False, "weights"]))})
    config = junk(st.fixed_dictionaries({}, optional={
        "global_config": w(st.none() | module),
        "op_type_configs": w(st.none() | op_configs),
        "op_name_configs": w(st.none() | op_configs),
        "qat_schedule": w(st.none() | schedule),
        "bias_correction": w(st.booleans()),
    }), ["global_cfg", "module_name_configs", "module_type_configs"])
    return {"spec": spec, "module": module, "config": config}


VALID, WRONG = _strategies(False), _strategies(True)
specs = st.one_of(VALID["spec"], WRONG["spec"], WRONG["spec"])
module_configs = st.one_of(VALID["module"], WRONG["module"], WRONG["module"])
config_dicts = st.one_of(VALID["config"], WRONG["config"], WRONG["config"], st.dictionaries(keys, anything, max_size=4),
                         anything)


def _load(fn: Any, arg: Any) -> Any:
    """``fn(arg)``, or None when it raises a one-line ConfigError; any other exception fails the test."""
    try:
        return fn(arg)
    except ConfigError as exc:
        message = str(exc)
        assert message and "\n" not in message, repr(message)
        return None


def _round_trips(cfg: QuantizerConfig) -> None:
    data = cfg.to_dict()
    again = QuantizerConfig.from_dict(data)
    assert again == cfg
    assert again.to_dict() == data
    assert QuantizerConfig.from_yaml(cfg.to_yaml()) == cfg


@SETTINGS
@given(config_dicts)
def test_any_config_dict_loads_or_raises_config_error(data: Any) -> None:
    before = repr(data)
    snapshot = copy.deepcopy(data)
    cfg = _load(QuantizerConfig.from_dict, data)
    assert repr(data) == before and repr(snapshot) == before, "from_dict modified its input"
    if cfg is not None:
        _round_trips(cfg)


@SETTINGS
@given(st.one_of(module_configs, anything))
def test_any_module_config_dict_loads_or_raises_config_error(data: Any) -> None:
    cfg = _load(ModuleQuantizerConfig.from_dict, data)
    if cfg is not None:
        assert ModuleQuantizerConfig.from_dict(cfg.to_dict()) == cfg


@SETTINGS
@given(st.one_of(specs, anything))
def test_any_spec_dict_loads_or_raises_config_error(data: Any) -> None:
    spec = _load(QuantizationSpec.from_dict, data)
    if spec is not None:
        assert QuantizationSpec.from_dict(spec.to_dict()) == spec
        hash(spec)  # specs are frozen and hashable (they key caches)


@SETTINGS
@given(anything)
def test_spec_parts_load_or_raise_config_error(value: Any) -> None:
    _load(parse_dtype, value)
    _load(parse_granularity, value)
    _load(lambda v: QuantizationSpec(dtype=v), value)
    _load(lambda v: QuantizationSpec(qscheme=v), value)
    _load(lambda v: QuantizationSpec(float_range=v), value)
    _load(lambda v: QuantizationSpec(qparam_calculator_cls=v), value)
    _load(lambda v: QuantizationSpec(calculator_kwargs=v), value)
    _load(lambda v: QuantizationSpec(learnable_scale=v), value)


def _mutations(text: str) -> st.SearchStrategy[str]:
    """The text itself, cut short, or with a few YAML-significant characters spliced in."""
    cut = st.integers(0, len(text)).map(lambda i: text[:i])
    splice = st.tuples(st.integers(0, len(text)), st.text(alphabet=":-[]{}!&*#|>'\"\t\n %@`,?", max_size=4)).map(
        lambda p: text[: p[0]] + p[1] + text[p[0]:])
    return st.one_of(st.just(text), cut, splice)


yaml_texts = st.one_of(
    config_dicts.map(lambda d: yaml.safe_dump(d, allow_unicode=True)).flatmap(_mutations),
    st.text(max_size=40),
    st.sampled_from(["", "\n", "# only a comment\n", "- a\n- b\n", "int8\n", "null\n", "[1\n", "{a: 1\n",
                     "global_config: !!python/object/apply:os.system ['true']\n",
                     "bias_correction: !!binary aGVsbG8=\n", "a: &x 1\nb: *x\n", "? [1, 2]\n: 3\n",
                     "global_config:\n\top_input_spec: {}\n", "%YAML 9.9\n---\n{}\n", "--- {}\n--- {}\n"]),
)


@SETTINGS
@given(yaml_texts)
def test_any_yaml_file_loads_or_raises_config_error(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cfg.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        cfg = _load(QuantizerConfig.from_yaml, str(path))
        if cfg is not None:
            _round_trips(cfg)


@SETTINGS
@given(st.binary(max_size=64))
def test_any_yaml_bytes_load_or_raise_config_error(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cfg.yaml"
        path.write_bytes(data)
        _load(QuantizerConfig.from_yaml, path)


@settings(max_examples=20, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(VALID["config"])
def test_configs_that_load_quantize_or_raise_qdq_errors(data: dict[str, Any]) -> None:
    """End to end on a Conv and a Gemm model: a config that loads either quantizes or is a one-line QdqError.

    (Op type/name configs that match nothing in the model are ConfigErrors; nothing may fail inside qdq.)
    """
    if _load(QuantizerConfig.from_dict, data) is None:
        return
    rng = np.random.default_rng(0)
    for model, shape in ((conv_model(), (8, 3, 8, 8)), (mlp_model(), (8, 16))):
        x = rng.standard_normal(shape).astype(np.float32)
        try:
            quantize(model, data, [x[:4], x[4:]], progress=False)
        except QdqError as exc:
            assert "\n" not in str(exc) and "internal error" not in str(exc), str(exc)
