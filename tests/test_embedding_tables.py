"""Embedding tables are weights: 8-bit per row in the plan, gathered before dequantizing in onnxruntime (bit-exact)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper

import qdq
from qdq.dtypes import QDType
from qdq.quantizer import Quantizer
from qdq.session import make_session

V, D = 50, 16


def _embedder(path: Path) -> Path:
    """ids (int64) -> token table Gather -> + position rows -> MatMul; the Gather output is also a graph output."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((V, D)).astype(np.float32), "table"),
             numpy_helper.from_array(rng.standard_normal((8, D)).astype(np.float32), "pos"),
             numpy_helper.from_array(np.arange(8, dtype=np.int64), "pos_ids"),
             numpy_helper.from_array(rng.standard_normal((D, 4)).astype(np.float32), "w")]
    nodes = [helper.make_node("Gather", ["table", "ids"], ["emb"]),
             helper.make_node("Gather", ["pos", "pos_ids"], ["p"]),
             helper.make_node("Add", ["emb", "p"], ["h"]), helper.make_node("MatMul", ["h", "w"], ["y"])]
    graph = helper.make_graph(nodes, "emb", [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["n", 8])],
                              [helper.make_tensor_value_info("emb", onnx.TensorProto.FLOAT, ["n", 8, D]),
                               helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 8, 4])],
                              inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), path)
    return path


@pytest.mark.parametrize("preset", ["int8", "w4"])
def test_tables_are_8bit_per_row_and_gathered_before_dequantizing(tmp_path: Path, preset: str) -> None:
    path = _embedder(tmp_path / "emb.onnx")
    ids = np.random.default_rng(1).integers(0, V, (6, 8)).astype(np.int64)
    q = Quantizer(path, preset)
    tables = {t.tensor: t for t in q.plan.targets.values() if t.tensor in ("table", "pos")}
    assert set(tables) == {"table", "pos"}
    for t in tables.values():  # a 4-bit blocked weight spec still stores tables int8 per row
        assert t.spec.dtype is QDType.INT8 and t.layout.axis == 0 and t.layout.block_size is None
    q.prepare(ids)
    if q.observes_activations:
        q.calibrate([ids], progress=False)
    final = q.finalize()
    dq_into_gather = [n for n in final.graph if n.op_type == "Gather"
                      and n.inputs[0].producer() is not None and n.inputs[0].producer().op_type == "DequantizeLinear"]
    assert not dq_into_gather
    stored = [n.inputs[0].const_value for n in final.graph if n.op_type == "Gather"
              and n.inputs[0].const_value is not None and len(n.inputs[0].const_value.shape) == 2]
    assert sorted(t.shape[0] for t in stored) == [8, V] and {t.dtype for t in stored} == {ir.DataType.INT8}
    prepared = make_session(q.qdq_model(), level="none").run(None, {"ids": ids})
    out = make_session(qdq.save(final, tmp_path / "f.onnx")).run(None, {"ids": ids})
    assert np.array_equal(out[0], prepared[0])  # the looked-up rows: bit-identical to DequantizeLinear's
    table = onnx.numpy_helper.to_array(onnx.load(path).graph.initializer[0])
    step = np.abs(table).max(axis=1, keepdims=True) / 127
    assert np.all(np.abs(out[0] - table[ids]) <= step[ids] * 0.5 + 1e-6)  # per-row int8 error
