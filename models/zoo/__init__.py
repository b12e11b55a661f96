"""A zoo of small architectures that stress QDQ placement and the runtime (see ``ZOO`` for the list).

Every entry (``models.zoo.registry.ZooModel``) builds a fixed-seed torch module, exports it to ONNX
as such models are shipped (static batch 1, dynamic sequence, float16, opset 11, ...) and draws
calibration / evaluation data in the dtypes the file declares::

    from models.zoo import ZOO
    path = ZOO["bert"].export(Path("bert.onnx"))
    np.savez("calib.npz", **ZOO["bert"].data(64, 0))
"""

from models.zoo import cnn, multi, sequence
from models.zoo.registry import ZOO, ZooModel, get

__all__ = ["ZOO", "ZooModel", "cnn", "get", "multi", "sequence"]
