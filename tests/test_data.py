"""qdq.data: formats, streaming (memory-mapped, batch by batch), image preprocessing, labels, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qdq import data
from qdq.data import arrays as disk
from qdq.data import image_labels, labels_from_file, open_data
from qdq.errors import ConfigError, DataError


def _collect(source: data.DataSource, batch_size: int) -> list[dict[str, np.ndarray]]:
    out = list(source.batches(batch_size))
    for b in out:
        for v in b.values():
            assert v.dtype in (np.float32, np.int64) and v.flags.c_contiguous and not isinstance(v, np.memmap)
    return out


def _cat(batches: list[dict[str, np.ndarray]], name: str) -> np.ndarray:
    return np.concatenate([b[name] for b in batches])


# ----------------------------------------------------------------------------- .npy / .npz


def test_npy_is_memory_mapped_and_batched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    x = np.random.default_rng(0).normal(size=(10, 3, 4, 4))  # float64 on disk: cast to float32
    np.save(tmp_path / "x.npy", x)
    modes = []
    real_load = np.load

    def spy(*args, **kwargs):
        modes.append(kwargs.get("mmap_mode"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(np, "load", spy)
    src = open_data(tmp_path / "x.npy", ["x"])
    assert len(src) == 10 and src.total_samples == 10
    batches = _collect(src, 4)
    assert [b["x"].shape[0] for b in batches] == [4, 4, 2]
    np.testing.assert_array_equal(_cat(batches, "x"), x.astype(np.float32))
    assert modes and set(modes) == {"r"}


def test_num_samples_keeps_first_n(tmp_path: Path) -> None:
    x = np.arange(10 * 2, dtype=np.float32).reshape(10, 2)
    np.save(tmp_path / "x.npy", x)
    src = open_data(tmp_path / "x.npy", ["x"], num_samples=5)
    assert len(src) == 5 and src.total_samples == 10
    np.testing.assert_array_equal(_cat(_collect(src, 3), "x"), x[:5])
    assert len(open_data(tmp_path / "x.npy", ["x"], num_samples=50)) == 10


def test_npz_uncompressed_members_are_memory_mapped(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(7, 3)).astype(np.float32), rng.integers(0, 9, size=(7, 2, 2))
    np.savez(tmp_path / "d.npz", a=a, b=b, extra=np.zeros(3))
    with disk.open_arrays(tmp_path / "d.npz") as arrays:
        assert isinstance(arrays["a"], disk.MappedArray) and isinstance(arrays["a"].array, np.memmap)
    src = open_data(tmp_path / "d.npz", ["a", "b"])
    batches = _collect(src, 3)
    assert [x["a"].shape[0] for x in batches] == [3, 3, 1]
    np.testing.assert_array_equal(_cat(batches, "a"), a)
    got = _cat(batches, "b")  # without the model's signature integers are served as stored
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, b)


@pytest.mark.parametrize("fortran", [False, True])
def test_npz_compressed_is_streamed(tmp_path: Path, fortran: bool) -> None:
    a = np.random.default_rng(2).normal(size=(9, 4, 3)).astype(np.float32)
    np.savez_compressed(tmp_path / "d.npz", a=np.asfortranarray(a) if fortran else a)
    with disk.open_arrays(tmp_path / "d.npz") as arrays:
        assert isinstance(arrays["a"], disk.ZipStreamArray)
    src = open_data(tmp_path / "d.npz", ["a"])
    for _ in range(2):  # re-iterable
        np.testing.assert_array_equal(_cat(_collect(src, 4), "a"), a)


def test_npz_single_unnamed_array_feeds_single_input(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", np.ones((2, 3)))
    assert len(open_data(tmp_path / "d.npz", ["input"])) == 2


# ----------------------------------------------------------------------------- folders


def test_array_folder_mixes_single_samples_and_batches_in_name_order(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    s0, b1, s2 = rng.normal(size=(2, 3)), rng.normal(size=(3, 2, 3)), rng.normal(size=(2, 3))
    np.save(tmp_path / "a.npy", s0)  # one sample (rank of the model input minus one)
    np.savez(tmp_path / "b.npz", x=b1)  # three samples
    np.save(tmp_path / "c.npy", s2)
    (tmp_path / "notes.txt").write_text("ignored")
    src = open_data(tmp_path, ["x"], input_shapes={"x": ("N", 2, 3)})
    assert len(src) == 5 and src.kind == "array folder"
    assert [p.name for p in src.files] == ["a.npy", "b.npz", "c.npy"]
    batches = _collect(src, 2)
    assert [b["x"].shape for b in batches] == [(2, 2, 3), (2, 2, 3), (1, 2, 3)]
    np.testing.assert_allclose(_cat(batches, "x"), np.concatenate([s0[None], b1, s2[None]]), rtol=1e-6)
    assert len(open_data(tmp_path, ["x"], input_shapes={"x": ("N", 2, 3)}, num_samples=2)) == 2


def _png(path: Path, w: int, h: int, seed: int) -> np.ndarray:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


def test_image_folder_normalises_and_center_crops(tmp_path: Path) -> None:
    p0 = _png(tmp_path / "0001_cat.png", 8, 8, 0)
    _png(tmp_path / "0003_dog.PNG", 12, 8, 1)  # wider: resized to 12x8 already short side 8, crop center
    _png(tmp_path / "0002_cow.jpg", 16, 20, 2)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    src = open_data(tmp_path, ["img"], image_size=8, mean=mean, std=std)
    assert len(src) == 3 and [p.name for p in src.files] == ["0001_cat.png", "0002_cow.jpg", "0003_dog.PNG"]
    (batch,) = _collect(src, 8)
    assert batch["img"].shape == (3, 3, 8, 8)
    want = (p0 / 255.0 - np.array(mean)) / np.array(std)
    np.testing.assert_allclose(batch["img"][0], want.transpose(2, 0, 1), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(image_labels(tmp_path), [1, 2, 3])
    np.testing.assert_array_equal(image_labels(tmp_path, num_samples=2), [1, 2])


def test_image_folder_matches_efficientnet_preprocess(tmp_path: Path) -> None:
    from models.efficientnet import MEAN, STD, preprocess

    _png(tmp_path / "a.png", 30, 20, 4)
    (batch,) = _collect(open_data(tmp_path, ["x"], mean=MEAN, std=STD, input_shapes={"x": (1, 3, 16, 16)}), 4)
    with Image.open(tmp_path / "a.png") as img:
        np.testing.assert_allclose(batch["x"][0], preprocess(img, 16), rtol=1e-6, atol=1e-6)


def test_image_labels_none_without_pattern(tmp_path: Path) -> None:
    _png(tmp_path / "0001_a.png", 4, 4, 0)
    _png(tmp_path / "b.png", 4, 4, 0)
    assert image_labels(tmp_path) is None
    assert image_labels(tmp_path / "missing") is None


# ----------------------------------------------------------------------------- labels


def test_labels_from_npy_and_text(tmp_path: Path) -> None:
    np.save(tmp_path / "l.npy", np.array([3, 1, 2], dtype=np.int32))
    (tmp_path / "l.txt").write_text("# labels\n3\n\n1\n2\n")
    np.testing.assert_array_equal(labels_from_file(tmp_path / "l.npy"), [3, 1, 2])
    np.testing.assert_array_equal(labels_from_file(tmp_path / "l.txt"), [3, 1, 2])
    (tmp_path / "bad.txt").write_text("1\ncat\n")
    with pytest.raises(DataError, match=r"line 2: 'cat' is not an integer"):
        labels_from_file(tmp_path / "bad.txt")
    np.save(tmp_path / "f.npy", np.zeros(3, dtype=np.float32))
    with pytest.raises(DataError, match="must be a 1-D integer array"):
        labels_from_file(tmp_path / "f.npy")
    with pytest.raises(DataError, match="labels file not found"):
        labels_from_file(tmp_path / "nope.txt")


# ----------------------------------------------------------------------------- errors


def _one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="calibration data not found: .*nope; pass an existing") as e:
        open_data(tmp_path / "nope", ["x"])
    _one_line(e)


def test_empty_folder_and_zero_samples(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    with pytest.raises(DataError, match=r"calibration data is empty: .* has no \.npy.*subfolders are not searched: sub"):
        open_data(tmp_path, ["x"])
    np.save(tmp_path / "sub" / "x.npy", np.zeros((0, 3), np.float32))
    with pytest.raises(DataError, match="evaluation data is empty: .*x.npy has 0 samples"):
        open_data(tmp_path / "sub" / "x.npy", ["x"], role="evaluation")


def test_npz_missing_input_lists_keys_and_inputs(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", a=np.zeros((2, 3)), b=np.zeros((2, 3)))
    with pytest.raises(DataError, match=r"no array for model input\(s\) c \(arrays: a, b; model inputs: a, c\)") as e:
        open_data(tmp_path / "d.npz", ["a", "c"])
    _one_line(e)


def test_npy_for_two_inputs(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((2, 3)))
    with pytest.raises(DataError, match="holds one array but the model has 2 inputs .*use an .npz"):
        open_data(tmp_path / "x.npy", ["a", "b"])


def test_wrong_rank_and_shape(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((2, 3, 5)))
    with pytest.raises(DataError, match=r"has 3 dims \(2, 3, 5\) but the model input has 5 \(N, 3, 5, \?, \?\)"):
        open_data(tmp_path / "x.npy", ["x"], input_shapes={"x": ("N", 3, 5, None, None)})
    with pytest.raises(DataError, match=r"samples have shape \(3, 5\) but the model expects \(N, 4, 5\)"):
        open_data(tmp_path / "x.npy", ["x"], input_shapes={"x": ("N", 4, 5)})
    assert len(open_data(tmp_path / "x.npy", ["x"], input_shapes={"x": ("N", 3, None)})) == 2


def test_folder_files_with_different_sample_shapes(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.zeros((2, 3)))
    np.save(tmp_path / "b.npy", np.zeros((2, 4)))
    with pytest.raises(DataError, match=r"input 'x' samples are \(3\) in a.npy but \(4\) in b.npy"):
        open_data(tmp_path, ["x"])


def test_nan_reports_file_and_sample_range(tmp_path: Path) -> None:
    x = np.zeros((10, 2), np.float32)
    x[6, 1] = np.nan
    x[8, 0] = np.inf
    np.save(tmp_path / "x.npy", x)
    src = open_data(tmp_path / "x.npy", ["x"])  # opening is cheap: values are checked as batches are read
    with pytest.raises(DataError, match=r"NaN/Inf in calibration data file .*x.npy, sample range 6..8 "
                                        r"\(2 bad sample\(s\), input 'x'\)") as e:
        _collect(src, 16)
    _one_line(e)
    assert len(_collect(open_data(tmp_path / "x.npy", ["x"], num_samples=6), 4)) == 2


def test_non_numeric_dtype_and_unsupported_file(tmp_path: Path) -> None:
    np.save(tmp_path / "s.npy", np.array(["a", "b"]))
    with pytest.raises(DataError, match="has dtype <U1, not numbers"):
        open_data(tmp_path / "s.npy", ["x"])
    (tmp_path / "d.csv").write_text("1,2")
    with pytest.raises(DataError, match="unsupported calibration data file"):
        open_data(tmp_path / "d.csv", ["x"])
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    with pytest.raises(DataError, match="cannot read .*bad.npy"):
        open_data(tmp_path / "bad.npy", ["x"])


def test_mixed_folder_and_image_errors(tmp_path: Path) -> None:
    _png(tmp_path / "a.png", 4, 4, 0)
    with pytest.raises(DataError, match="pass image_size"):
        open_data(tmp_path, ["x"], input_shapes={"x": ("N", 3, "H", "W")})
    with pytest.raises(DataError, match="folder of images but the model has 2 inputs"):
        open_data(tmp_path, ["x", "y"], image_size=4)
    with pytest.raises(DataError, match=r"samples have shape \(3, 4, 4\) but the model expects \(1, 3, 8, 8\)"):
        open_data(tmp_path, ["x"], image_size=4, input_shapes={"x": (1, 3, 8, 8)})
    with pytest.raises(ConfigError, match="std must not contain 0"):
        open_data(tmp_path, ["x"], image_size=4, std=0.0)
    np.save(tmp_path / "b.npy", np.zeros((1, 3, 4, 4)))
    with pytest.raises(DataError, match="mixes .npy/.npz and image files"):
        open_data(tmp_path, ["x"])
    (tmp_path / "b.npy").unlink()
    (tmp_path / "z.png").write_bytes(b"broken")
    with pytest.raises(DataError, match="cannot read image .*z.png"):
        _collect(open_data(tmp_path, ["x"], image_size=4), 2)


def test_bad_arguments(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((2, 3)))
    with pytest.raises(ConfigError, match="num_samples must be a positive int"):
        open_data(tmp_path / "x.npy", ["x"], num_samples=0)
    with pytest.raises(ConfigError, match="batch_size must be a positive int"):
        next(open_data(tmp_path / "x.npy", ["x"]).batches(0))


# ----------------------------------------------------------------------------- the model's signature


def _signature(**inputs: tuple[int, tuple]):
    from onnx import helper

    from qdq.model_inputs import model_inputs

    vis = [helper.make_tensor_value_info(n, elem, list(shape)) for n, (elem, shape) in inputs.items()]
    graph = helper.make_graph([], "g", vis, vis[:1])
    return model_inputs(helper.make_model(graph))


def test_signature_serves_the_model_dtypes(tmp_path: Path) -> None:
    from onnx import TensorProto

    sig = _signature(img=(TensorProto.FLOAT16, ("N", 3, 8, 8)))
    (tmp_path / "images").mkdir()
    for i in range(3):
        _png(tmp_path / "images" / f"{i}.png", 10, 12, seed=i)
    (batch,) = list(open_data(tmp_path / "images", sig).batches(4))  # the image size comes from the model's static H, W
    assert batch["img"].dtype == np.float16 and batch["img"].shape == (3, 3, 8, 8)
    ids = _signature(ids=(TensorProto.INT64, ("N", "S")))
    np.save(tmp_path / "ids.npy", np.arange(12, dtype=np.int16).reshape(3, 4))
    (b,) = list(open_data(tmp_path / "ids.npy", ids).batches(8))
    assert b["ids"].dtype == np.int64 and b["ids"].tolist() == np.arange(12).reshape(3, 4).tolist()
    np.save(tmp_path / "frac.npy", np.full((2, 4), 0.5, np.float32))
    src = open_data(tmp_path / "frac.npy", ids)  # headers are fine; the values are not
    with pytest.raises(DataError, match=r"frac.npy: input 'ids' expects integers \(int64 \(N, S\)\)"):
        list(src.batches(2))
    with pytest.raises(DataError, match=r"holds images but model input 'ids' is int64"):
        open_data(tmp_path / "images", _signature(ids=(TensorProto.INT64, ("N", 3, 8, 8))))
