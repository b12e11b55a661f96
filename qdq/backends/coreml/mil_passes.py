"""coremltools MIL passes qdq adds in front of the default pipeline (registered on import; needs coremltools).

* ``qdq::pin_weight_bits`` — at iOS18 coremltools stores any weight whose codes fit in [-8, 7] as INT4
  (``_construct_constexpr_dequant_op`` checks the value range): an int8 weight with small codes would
  silently change format. The pass widens every INT4/UINT4 ``constexpr_blockwise_shift_scale`` back to
  8 bits unless its op name is in ``int4_ops`` (the dequantize nodes qdq emitted with a 4-bit range).
* ``qdq::fold_weight_view`` — a blocked weight of rank != 2 (Conv) reaches coremltools as a 2-D
  ``dequantize_affine`` followed by ``reshape`` / ``transpose``; the pass folds that chain into one
  rank-N constexpr (data, scale and offset reshaped/transposed alike), so the weight is one INT4 op.
"""

from __future__ import annotations

import logging

import numpy as np
from coremltools.converters.mil.mil import Builder as mb
from coremltools.converters.mil.mil import types
from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass
from coremltools.converters.mil.mil.passes.helper import block_context_manager
from coremltools.converters.mil.mil.passes.pass_registry import register_pass

__all__ = ["FOLD_PASS", "PIN_PASS", "FoldWeightView", "PinWeightBits"]

logger = logging.getLogger(__name__)

PIN_PASS = "qdq::pin_weight_bits"
FOLD_PASS = "qdq::fold_weight_view"
_SUB_BYTE = {"int4": np.int8, "uint4": np.uint8}


def _walk(block):  # type: ignore[no-untyped-def]
    for op in list(block.operations):
        for inner in op.blocks:
            yield from _walk(inner)
        yield op


def _rebuild(op, data: np.ndarray, scale: np.ndarray, offset: np.ndarray | None, suffix: str):  # type: ignore[no-untyped-def]
    kwargs = {"data": data, "scale": scale, "before_op": op, "name": op.name + suffix}
    if offset is not None:
        kwargs["offset"] = offset
    return mb.constexpr_blockwise_shift_scale(**kwargs)


def _replace(op, new_var, anchor=None) -> None:  # type: ignore[no-untyped-def]
    # constexpr outputs are "non-replaceable" for coremltools; the whole chain is removed right after
    anchor = anchor or op
    anchor.enclosing_block.replace_uses_of_var_after_op(anchor_op=anchor, old_var=anchor.outputs[0],
                                                        new_var=new_var, force_replace=True)


@register_pass(namespace="qdq")
class pin_weight_bits(AbstractGraphPass):  # coremltools names the pass after the class
    """Widen INT4 constexpr weights that qdq quantized at 8 bits back to INT8/UINT8."""

    def __init__(self) -> None:
        self.int4_ops = ""  # comma-separated op names allowed to stay 4-bit

    def apply(self, prog) -> None:  # type: ignore[no-untyped-def]
        keep = {n for n in str(self.int4_ops).split(",") if n}
        for func in prog.functions.values():
            self._block(func, keep)

    @block_context_manager
    def _block(self, block, keep: set[str]) -> None:  # type: ignore[no-untyped-def]
        for op in _walk(block):
            if op.op_type != "constexpr_blockwise_shift_scale" or op.name in keep:
                continue
            dtype = types.builtin_to_string(op.data.dtype)
            if dtype not in _SUB_BYTE:
                continue
            wide = _SUB_BYTE[dtype]
            offset = None if op.offset is None else op.offset.val.astype(np.int64).astype(wide)
            new = _rebuild(op, op.data.val.astype(np.int64).astype(wide), op.scale.val, offset, "_int8")
            _replace(op, new)
            op.enclosing_block.remove_ops([op])
            logger.debug("kept %s at 8 bits", op.name)


@register_pass(namespace="qdq")
class fold_weight_view(AbstractGraphPass):
    """Fold ``constexpr_blockwise_shift_scale -> reshape/transpose`` chains into one constexpr."""

    def apply(self, prog) -> None:  # type: ignore[no-untyped-def]
        for func in prog.functions.values():
            self._block(func)

    @block_context_manager
    def _block(self, block) -> None:  # type: ignore[no-untyped-def]
        for op in _walk(block):
            if op.op_type == "constexpr_blockwise_shift_scale" and op.enclosing_block is not None:
                self._fold(op)

    @staticmethod
    def _fold(op) -> None:  # type: ignore[no-untyped-def]
        data, scale = op.data.val, op.scale.val
        offset = None if op.offset is None else op.offset.val
        if data is None or scale is None or data.ndim != 2:
            return
        chain = []
        var = op.outputs[0]
        while len(var.child_ops) == 1 and var not in var.op.enclosing_block.outputs:
            child = var.child_ops[0]
            if child.op_type == "reshape" and child.shape.val is not None:
                new_shape = tuple(int(d) for d in child.shape.val)
                if new_shape[-1] != data.shape[-1] or any(d < 0 for d in new_shape):
                    break  # only views that keep the block axis last
                params_shape = new_shape[:-1] + (scale.shape[-1],)
                data, scale = data.reshape(new_shape), scale.reshape(params_shape)
                offset = None if offset is None else offset.reshape(params_shape)
            elif child.op_type == "transpose" and child.perm.val is not None:
                perm = [int(p) for p in child.perm.val]
                data, scale = data.transpose(perm), scale.transpose(perm)
                offset = None if offset is None else offset.transpose(perm)
            else:
                break
            chain.append(child)
            var = child.outputs[0]
        if not chain:
            return
        last = chain[-1]
        new = _rebuild(op, np.ascontiguousarray(data), np.ascontiguousarray(scale),
                       None if offset is None else np.ascontiguousarray(offset), "_nd")
        _replace(op, new, anchor=last)
        last.enclosing_block.remove_ops([*reversed(chain), op])


PinWeightBits = pin_weight_bits
FoldWeightView = fold_weight_view
