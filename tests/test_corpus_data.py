"""Corpus: calibration/evaluation data a user might really pass, through ``qdq quantize`` and ``qdq compare``.

Bad data is exit code 1 with one line naming the file and the input at fault; nothing is written, no
input file changes, and pickled arrays are never unpickled.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from corpus_helpers import (
    Words,
    assert_cli_error,
    conv_model,
    mlp_model,
    run_cli,
    save_model,
    snapshot,
    token_model,
    two_input_model,
)

Argv = list[str]


def _rng(seed: int = 1) -> np.random.Generator:
    return np.random.default_rng(seed)


def _images(folder: Path, n: int = 3, size: int = 12) -> Path:
    from PIL import Image

    folder.mkdir(exist_ok=True)
    for i in range(n):
        Image.fromarray(_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"img_{i}.png")
    return folder


def _conv(d: Path) -> Path:
    return save_model(conv_model(), d / "conv.onnx")


def _q(d: Path, model: Path, data: Path, *extra: str) -> Argv:
    return ["quantize", str(model), "-o", str(d / "q.onnx"), "--calib-data", str(data), *extra]


def _npy(d: Path, name: str, array: np.ndarray, **kw: bool) -> Path:
    path = d / name
    np.save(path, array, **kw)
    return path


def _pixels(n: int = 8) -> np.ndarray:
    return _rng().standard_normal((n, 3, 8, 8)).astype(np.float32)


class _OpensFile:
    """Unpickling this object creates ``path``: proof that a loader called pickle."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.path, "w"))


# ----------------------------------------------------------------------------- quantize --calib-data cases


def _wrong_shape(d: Path) -> Argv:
    return _q(d, _conv(d), _npy(d, "calib.npy", _rng().standard_normal((8, 3, 9, 9)).astype(np.float32)))


def _wrong_rank(d: Path) -> Argv:
    return _q(d, _conv(d), _npy(d, "calib.npy", _rng().standard_normal((8, 3, 8)).astype(np.float32)))


def _strings(d: Path) -> Argv:
    return _q(d, _conv(d), _npy(d, "strings.npy", np.full((8, 3, 8, 8), "a")))


def _pickled_objects(d: Path) -> Argv:
    arr = np.empty((2, 3, 8, 8), dtype=object)
    arr[...] = 0.0
    arr[0, 0, 0, 0] = _OpensFile(d / "pwned")
    return _q(d, _conv(d), _npy(d, "pickled.npy", arr, allow_pickle=True))


def _complex(d: Path) -> Argv:
    return _q(d, _conv(d), _npy(d, "complex.npy", _pixels().astype(np.complex64)))


def _nan(d: Path) -> Argv:
    arr = _pixels()
    arr[5, 1, 2, 3] = np.nan
    return _q(d, _conv(d), _npy(d, "calib.npy", arr))


def _inf_folder(value: float) -> Callable[[Path], Argv]:
    def build(d: Path) -> Argv:
        folder = d / "calib"
        folder.mkdir()
        for i in range(5):
            arr = _rng(i).standard_normal((2, 3, 8, 8)).astype(np.float32)
            if i == 2:
                arr[1, 0, 4, 4] = value
            np.save(folder / f"{i:03d}.npy", arr)
        return _q(d, _conv(d), folder)

    return build


def _zero_samples(d: Path) -> Argv:
    return _q(d, _conv(d), _npy(d, "calib.npy", np.zeros((0, 3, 8, 8), np.float32)))


def _empty_folder(d: Path) -> Argv:
    (d / "calib").mkdir()
    return _q(d, _conv(d), d / "calib")


def _corrupt_npz(d: Path) -> Argv:
    path = d / "bad.npz"
    path.write_bytes(_rng().integers(0, 256, 2048, dtype=np.uint8).tobytes())
    return _q(d, _conv(d), path)


def _truncated_npz(d: Path) -> Argv:
    path = d / "cut.npz"
    np.savez(path, pixels=_pixels(64))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return _q(d, _conv(d), path)


def _npz_bad_member(d: Path) -> Argv:  # a valid zip whose member is not an .npy
    path = d / "member.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("pixels.npy", b"not an array")
    return _q(d, _conv(d), path)


def _npz_missing_input(d: Path) -> Argv:
    model = save_model(two_input_model(), d / "two.onnx")
    path = d / "calib.npz"
    np.savez(path, left=_rng().standard_normal((8, 4)).astype(np.float32))
    return _q(d, model, path)


def _npz_no_matching_name(d: Path) -> Argv:
    path = d / "calib.npz"
    np.savez(path, image=_pixels(), mask=np.ones((8, 8, 8), np.float32))
    return _q(d, _conv(d), path)


def _npz_sample_counts_differ(d: Path) -> Argv:
    model = save_model(two_input_model(), d / "two.onnx")
    path = d / "calib.npz"
    np.savez(path, left=np.ones((8, 4), np.float32), right=np.ones((5, 4), np.float32))
    return _q(d, model, path)


def _npy_for_two_inputs(d: Path) -> Argv:
    model = save_model(two_input_model(), d / "two.onnx")
    return _q(d, model, _npy(d, "calib.npy", np.ones((8, 4), np.float32)))


def _folder_shapes_differ(d: Path) -> Argv:
    folder = d / "calib"
    folder.mkdir()
    np.save(folder / "000.npy", _pixels(2))
    np.save(folder / "001.npy", _rng().standard_normal((2, 3, 9, 9)).astype(np.float32))
    return _q(d, _conv(d), folder)


def _mixed_folder(d: Path) -> Argv:
    folder = _images(d / "calib")
    np.save(folder / "extra.npy", _pixels(2))
    return _q(d, _conv(d), folder)


def _corrupt_image(d: Path) -> Argv:
    folder = _images(d / "calib")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    return _q(d, _conv(d), folder)


def _images_for_vector_model(d: Path) -> Argv:
    model = save_model(mlp_model(), d / "mlp.onnx")
    return _q(d, model, _images(d / "calib"))


def _fractional_token_ids(d: Path) -> Argv:
    model = save_model(token_model(), d / "tokens.onnx")
    ids = _rng().integers(0, 10, (8, 5)).astype(np.float32) + 0.5
    return _q(d, model, _npy(d, "ids.npy", ids))


def _token_ids_out_of_vocab(d: Path) -> Argv:  # ids beyond the 10-row embedding: Gather would read garbage
    model = save_model(token_model(), d / "tokens.onnx")
    return _q(d, model, _npy(d, "ids.npy", np.full((8, 5), 1000, np.int64)))


def _npz_pickled_member(d: Path) -> Argv:
    arr = np.empty((2, 3, 8, 8), dtype=object)
    arr[...] = 0.0
    arr[0, 0, 0, 0] = _OpensFile(d / "pwned")
    path = d / "pickled.npz"
    np.savez(path, pixels=arr)  # savez pickles object arrays
    return _q(d, _conv(d), path)


def _missing_data(d: Path) -> Argv:
    return _q(d, _conv(d), d / "nothere.npy")


def _csv_file(d: Path) -> Argv:
    path = d / "calib.csv"
    path.write_text("1,2,3\n")
    return _q(d, _conv(d), path)


def _zero_length_npy(d: Path) -> Argv:
    path = d / "zero.npy"
    path.write_bytes(b"")
    return _q(d, _conv(d), path)


def _truncated_npy(d: Path) -> Argv:
    path = _npy(d, "short.npy", _pixels(16))
    path.write_bytes(path.read_bytes()[:-1000])
    return _q(d, _conv(d), path)


def _text_as_npy(d: Path) -> Argv:
    path = d / "fake.npy"
    path.write_text("0.1 0.2 0.3\n")
    return _q(d, _conv(d), path)


#: id -> (builder, key words of the one-line error); every case exits 1 (a data error).
DATA_CASES: dict[str, tuple[Callable[[Path], Argv], Words]] = {
    "wrong-shape": (_wrong_shape, ["pixels", ("shape", "dims", "expect")]),
    "wrong-rank": (_wrong_rank, ["pixels", ("rank", "dims", "dimensions", "shape")]),
    "strings": (_strings, ["strings.npy", "dtype"]),
    "pickled-object-array": (_pickled_objects, ["pickled.npy", ("pickle", "object")]),
    "complex": (_complex, ["complex.npy", "complex"]),
    "nan": (_nan, ["calib.npy", "nan"]),
    "plus-inf-mid-folder": (_inf_folder(np.inf), ["002.npy", "inf"]),
    "minus-inf-mid-folder": (_inf_folder(-np.inf), ["002.npy", "inf"]),
    "zero-samples": (_zero_samples, ["calib.npy", ("0 samples", "empty", "no samples")]),
    "empty-folder": (_empty_folder, ["calib", "empty"]),
    "corrupt-npz": (_corrupt_npz, ["bad.npz"]),
    "truncated-npz": (_truncated_npz, ["cut.npz"]),
    "npz-member-not-npy": (_npz_bad_member, ["member.npz"]),
    "npz-pickled-object-member": (_npz_pickled_member, ["pickled.npz", ("pickle", "object")]),
    "npz-missing-input": (_npz_missing_input, ["calib.npz", "right"]),
    "npz-no-array-named-like-input": (_npz_no_matching_name, ["calib.npz", "pixels"]),
    "npz-sample-counts-differ": (_npz_sample_counts_differ, ["left", "right"]),
    "npy-for-two-input-model": (_npy_for_two_inputs, ["calib.npy", "npz"]),
    "folder-shapes-differ": (_folder_shapes_differ, ["001.npy", "pixels"]),
    "mixed-images-and-npy": (_mixed_folder, ["calib", ("mixes", "mixed", "one kind")]),
    "corrupt-image": (_corrupt_image, ["broken.png"]),
    "images-for-non-image-model": (_images_for_vector_model, ["features", "image"]),
    "fractional-floats-for-int64-ids": (_fractional_token_ids, ["input_ids", "int64"]),
    "token-ids-out-of-vocab": (_token_ids_out_of_vocab, [("input_ids", "embed")]),
    "nonexistent-data": (_missing_data, ["nothere.npy", "not found"]),
    "unsupported-extension": (_csv_file, ["calib.csv"]),
    "zero-length-npy": (_zero_length_npy, ["zero.npy"]),
    "truncated-npy": (_truncated_npy, ["short.npy"]),
    "text-named-npy": (_text_as_npy, ["fake.npy"]),
}


@pytest.mark.parametrize("build, words", DATA_CASES.values(), ids=DATA_CASES.keys())
def test_bad_calibration_data(capfd, tmp_path: Path, build: Callable[[Path], Argv], words: Words) -> None:
    argv = build(tmp_path)
    assert_cli_error(capfd, tmp_path, argv, code=1, words=words, output=tmp_path / "q.onnx")
    assert not (tmp_path / "pwned").exists(), "a pickled object in the data was unpickled"


# ----------------------------------------------------------------------------- compare --labels cases


def _compare(d: Path, labels: Path | None) -> Argv:
    model = save_model(mlp_model(), d / "mlp.onnx")
    data = _npy(d, "eval.npy", _rng().standard_normal((6, 16)).astype(np.float32))
    argv = ["compare", str(model), str(model), "--data", str(data)]
    return argv + (["--labels", str(labels)] if labels is not None else [])


def _labels_missing(d: Path) -> Argv:
    return _compare(d, d / "labels.npy")


def _labels_not_integers(d: Path) -> Argv:
    path = d / "labels.txt"
    path.write_text("1\n2\ncat\n4\n5\n6\n")
    return _compare(d, path)


def _labels_2d(d: Path) -> Argv:
    return _compare(d, _npy(d, "labels.npy", np.zeros((6, 2), np.int64)))


def _labels_fractional(d: Path) -> Argv:
    return _compare(d, _npy(d, "labels.npy", np.full(6, 0.5)))


def _labels_too_few(d: Path) -> Argv:
    return _compare(d, _npy(d, "labels.npy", np.arange(4)))


def _labels_out_of_range(d: Path) -> Argv:  # the model has 10 classes
    return _compare(d, _npy(d, "labels.npy", np.array([0, 1, 2, 3, 4, 12])))


def _labels_empty_text(d: Path) -> Argv:
    path = d / "labels.txt"
    path.write_text("")
    return _compare(d, path)


def _compare_quant_model_missing(d: Path) -> Argv:
    argv = _compare(d, None)
    argv[2] = str(d / "q_missing.onnx")
    return argv


def _compare_models_differ(d: Path) -> Argv:  # the "quantized" model is of another network
    argv = _compare(d, None)
    argv[2] = str(save_model(conv_model(), d / "other.onnx"))
    return argv


def _compare_data_wrong_shape(d: Path) -> Argv:
    argv = _compare(d, None)
    np.save(d / "eval.npy", np.ones((6, 12), np.float32))
    return argv


LABEL_CASES: dict[str, tuple[Callable[[Path], Argv], Words]] = {
    "labels-missing": (_labels_missing, ["labels.npy", "not found"]),
    "labels-not-integers": (_labels_not_integers, ["labels.txt", "cat"]),
    "labels-2d": (_labels_2d, ["labels.npy", ("1-d", "one label per sample")]),
    "labels-fractional": (_labels_fractional, ["labels.npy", ("integer", "int")]),
    "labels-too-few": (_labels_too_few, ["4 labels", "6 samples"]),
    "labels-out-of-range": (_labels_out_of_range, ["12", ("10 classes", "range")]),
    "labels-empty-file": (_labels_empty_text, ["labels.txt", "empty"]),
    "compare-quant-model-missing": (_compare_quant_model_missing, ["q_missing.onnx", "not found"]),
    "compare-data-wrong-shape": (_compare_data_wrong_shape, ["features"]),
    "compare-models-have-different-inputs": (_compare_models_differ, ["pixels", "features"]),
}


@pytest.mark.parametrize("build, words", LABEL_CASES.values(), ids=LABEL_CASES.keys())
def test_bad_evaluation_input(capfd, tmp_path: Path, build: Callable[[Path], Argv], words: Words) -> None:
    assert_cli_error(capfd, tmp_path, build(tmp_path), code=1, words=words)


# ----------------------------------------------------------------------------- unusual data that must work


def _npz_extra_arrays(d: Path) -> Argv:
    """Extra arrays (labels, metadata) beside the inputs are ignored: the inputs are found by name."""
    model = save_model(two_input_model(), d / "two.onnx")
    path = d / "calib.npz"
    rng = _rng()
    np.savez(path, left=rng.standard_normal((8, 4)).astype(np.float32),
             right=rng.standard_normal((8, 4)).astype(np.float32), labels=np.arange(8))
    return _q(d, model, path)


def _float64_for_float32(d: Path) -> Argv:
    return _q(d, _conv(d), _npy(d, "calib.npy", _pixels().astype(np.float64)))


def _int64_token_ids(d: Path) -> Argv:
    model = save_model(token_model(), d / "tokens.onnx")
    return _q(d, model, _npy(d, "ids.npy", _rng().integers(0, 10, (8, 5)).astype(np.int64)))


def _ragged_folder(d: Path) -> Argv:  # files of different sample counts, last batch short
    folder = d / "calib"
    folder.mkdir()
    for i, n in enumerate((1, 5, 3)):
        np.save(folder / f"{i:03d}.npy", _rng(i).standard_normal((n, 3, 8, 8)).astype(np.float32))
    return _q(d, _conv(d), folder, "--batch-size", "4")


def _big_endian(d: Path) -> Argv:
    return _q(d, _conv(d), _npy(d, "calib.npy", _pixels().astype(">f4")))


def _float16_data(d: Path) -> Argv:
    return _q(d, _conv(d), _npy(d, "calib.npy", _pixels().astype(np.float16)))


def _more_samples_asked_than_present(d: Path) -> Argv:
    return _q(d, _conv(d), _npy(d, "calib.npy", _pixels(4)), "--num-samples", "100")


def _grayscale_images(d: Path) -> Argv:
    from PIL import Image

    folder = d / "calib"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(_rng(i).integers(0, 256, (10, 14), dtype=np.uint8), mode="L").save(folder / f"g_{i}.png")
    return _q(d, _conv(d), folder)


def _image_folder(d: Path) -> Argv:
    return _q(d, _conv(d), _images(d / "calib", size=20))


VALID_CASES: dict[str, Callable[[Path], Argv]] = {
    "npz-extra-arrays-ignored": _npz_extra_arrays,
    "float64-data-for-float32-model": _float64_for_float32,
    "int64-token-ids": _int64_token_ids,
    "ragged-folder": _ragged_folder,
    "image-folder-resized": _image_folder,
    "grayscale-images-for-rgb-model": _grayscale_images,
    "big-endian-float32": _big_endian,
    "float16-data-for-float32-model": _float16_data,
    "num-samples-beyond-data": _more_samples_asked_than_present,
}


@pytest.mark.parametrize("build", VALID_CASES.values(), ids=VALID_CASES.keys())
def test_unusual_data_quantizes(capfd, tmp_path: Path, build: Callable[[Path], Argv]) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    argv = build(inputs)
    out = tmp_path / "q.onnx"
    argv[argv.index("-o") + 1] = str(out)
    before = snapshot(inputs)
    code, _, err = run_cli(capfd, ["--quiet", *argv])
    assert code == 0, err
    assert err == ""
    assert snapshot(inputs) == before
    onnx.checker.check_model(onnx.load(out), full_check=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "q.onnx"]
