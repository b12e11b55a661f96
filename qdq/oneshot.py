"""``qdq.quantize``: config + calibration data in, finalized model out, in one call.

This is the one quantization path: the CLI's ``qdq quantize``, the demo and the scripts call it.
Everything that can be checked without calibrating is checked first, in this order: option
ranges, the config, the backend name, the output path, the model (loads, valid, upgraded to the
opset the plan needs), the plan against the backend's capabilities, and the calibration data
against the model's inputs. Only then does calibration start.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import onnx_ir as ir

from qdq.backends import ExportBackend
from qdq.backends.artifact import backend_options, check_backend_plan, check_suffix, is_torch_backend, require_converter
from qdq.backends.host_cpu import kernel_format_for
from qdq.errors import ConfigError, ModelError, first_line
from qdq.model_check import external_locations
from qdq.model_io import check_output_path, save, write_text
from qdq.quantizer import Quantizer, as_config

__all__ = ["check_options", "quantize"]

logger = logging.getLogger(__name__)


def _positive(name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")


def _per_channel(name: str, values: Sequence[float] | float | None, *, nonzero: bool = False) -> None:
    if values is None:
        return
    seq = [values] if isinstance(values, (int, float)) else list(values)
    if len(seq) not in (1, 3):
        raise ConfigError(f"{name} takes 1 value or 3 (R,G,B), got {len(seq)}: {seq}")
    if nonzero and any(float(v) == 0.0 for v in seq):
        raise ConfigError(f"{name} must not contain 0 (images are divided by it), got {seq}")


def check_options(*, batch_size: Any = 16, num_samples: Any = None, image_size: Any = None, mean: Any = None,
                  std: Any = None) -> None:
    """ConfigError for a numeric option out of range (batch_size/num_samples/image_size >= 1, std != 0, counts)."""
    _positive("batch_size (--batch-size)", batch_size)
    _positive("num_samples (--num-samples)", num_samples)
    sizes = image_size if isinstance(image_size, (list, tuple)) else [image_size]
    for size in sizes:
        _positive("image_size (--image-size)", size)
    _per_channel("mean (--mean)", mean)
    _per_channel("std (--std)", std, nonzero=True)


def quantize(model: Any, config: Any = None, calibration_data: Any = None, *,
             backend: Any = ExportBackend.ONNXRuntime, batch_size: int = 16, num_samples: int | None = None,
             calibrator: str | None = None, output: str | os.PathLike[str] | None = None, progress: bool = True,
             image_size: int | Sequence[int] | None = None, mean: Sequence[float] | float | None = None,
             std: Sequence[float] | float | None = None, deployment_target: str | None = None,
             compute_precision: str | None = None, input_names: Sequence[str] | str | None = None,
             output_names: Sequence[str] | str | None = None, algorithms: Sequence[Any] | None = None,
             tokenizer: str | os.PathLike[str] | None = None, seq_len: int | None = None,
             target_agreement: float | None = None, target_sqnr: float | None = None,
             target_cosine: float | None = None, holdout: int = 256,
             on_fallback: Callable[[Any], None] | None = None, kernel_format: str | None = None) -> Any:
    """Quantize ``model`` (path / ModelProto / onnx_ir.Model) and finalize it for ``backend``.

    ``config``: QuantizerConfig, mapping, YAML path or preset name (default ``int8``).
    ``calibration_data``: a path understood by :func:`qdq.data.open_data`, a DataSource, or an
    iterable of batches (arrays, tuples or dicts by input name). Configs that quantize
    activations need it; weight-only presets use it for bias correction (skipped with a warning
    without it). ``calibrator`` replaces every activation calculator, keeping all other settings.
    ``output``: also save the result there (atomically; checked writable before any work): ``.onnx`` for
    onnxruntime, ``.mlpackage`` for Core ML, ``.aimodel`` for Core AI. ``deployment_target``,
    ``compute_precision``, ``input_names``, ``output_names``: Core ML / Core AI conversion options (see
    :func:`qdq.backends.artifact.backend_options`). ``algorithms``: appended to the config's (e.g.
    ``["smoothquant:alpha=0.7"]``; run on the calibration data before QDQ insertion). ``tokenizer`` /
    ``seq_len``: a ``.txt`` of sentences as calibration data (:mod:`qdq.data.text`). ``target_agreement`` (top-1
    agreement with FP32, %), ``target_sqnr`` (dB) or ``target_cosine``: leave the fewest ops float until the
    model meets it on the first ``holdout`` calibration samples (:func:`qdq.fallback.search_fallback`; with
    ``output``, the chosen config is written beside it as ``OUT.fallback.yaml``; ``on_fallback`` receives the
    :class:`~qdq.fallback.FallbackResult`). ``kernel_format`` (onnxruntime): ``"u8s8"`` (int8 weights),
    ``"u8u8"`` (uint8 weights) or ``"auto"`` (default: u8u8 on an x86 CPU without VNNI/AMX, whose U8S8 kernels
    saturate; :mod:`qdq.backends.host_cpu`). Returns an ``onnx_ir.Model`` for onnxruntime and a
    :class:`~qdq.backends.artifact.BackendArtifact` for Core ML / Core AI.
    """
    targets = {k: v for k, v in (("agreement", target_agreement), ("sqnr", target_sqnr),
                                 ("cosine", target_cosine)) if v is not None}
    if len(targets) > 1:
        raise ConfigError(f"give one accuracy target, got {', '.join('--target-' + k for k in targets)}")
    if targets and calibration_data is None:
        raise ConfigError("an accuracy target is measured on calibration samples: pass --calib-data PATH")
    _positive("holdout (--holdout)", holdout)
    check_options(batch_size=batch_size, num_samples=num_samples, image_size=image_size, mean=mean, std=std)
    _positive("seq_len (--seq-len)", seq_len)
    text = {"tokenizer": tokenizer, "seq_len": seq_len}
    cfg = as_config("int8" if config is None else config)
    if algorithms:
        import dataclasses

        cfg = dataclasses.replace(cfg, algorithms=[*cfg.algorithms, *algorithms])
    if calibrator:
        from qdq.config_edit import with_activation_calculator

        cfg = with_activation_calculator(cfg, calibrator)
    backend = ExportBackend.parse(backend)
    torch_backend = is_torch_backend(backend)
    given = (("deployment_target", deployment_target), ("compute_precision", compute_precision),
             ("input_names", input_names), ("output_names", output_names))
    extra: dict[str, Any] = {k: v for k, v in given if v is not None}
    if extra and not torch_backend:
        raise ConfigError(f"{', '.join(extra)} are Core ML / Core AI options; add --backend coreml or coreai")
    options = backend_options(**extra) if torch_backend else None
    kernel_format_for(backend, kernel_format)  # a bad name, or one asked of Core ML / Core AI, before any work
    reads = [Path(p) for p in (model, calibration_data) if isinstance(p, (str, os.PathLike))]
    if output is not None:
        check_output_path(output, inputs=reads)  # never the model or the data file qdq reads
    quantizer = Quantizer(model, cfg)
    if output is not None:
        check_output_path(output, inputs=external_locations(quantizer.float_model))
    check_backend_plan(quantizer.plan, backend, options, model=quantizer.float_model)
    if not quantizer.plan.targets:
        logger.warning("nothing to quantize: no tensor of this model matches the config (weights fed as graph inputs, "
                       "or no op the config names); the output equals the input model. `qdq inspect MODEL` lists "
                       "what the config matches")
    if output is not None and (torch_backend or Path(output).suffix in (".mlpackage", ".aimodel")):
        check_suffix(output, backend)
    elif output is not None and Path(output).suffix.lower() != ".onnx":
        logger.warning("output %s does not end in .onnx; it is written as an ONNX model", output)
    if torch_backend:
        require_converter(backend)  # the converter's extra is installed (one line naming it if not)
    relevant = quantizer.relevant_algorithms()  # the others change nothing here (SmoothQuant on a CNN)
    if relevant and calibration_data is None:
        raise ConfigError(f"algorithm(s) {relevant} need calibration data: pass --calib-data PATH (or "
                          "calibration_data=...), or drop them from the config")
    if (relevant or targets) and not isinstance(calibration_data, (str, bytes)) \
            and not hasattr(calibration_data, "__fspath__") and iter(calibration_data) is calibration_data:
        calibration_data = list(calibration_data)  # a one-shot iterator: it is read more than once

    def calibrated(quantizer: Quantizer) -> Quantizer:
        """Algorithms, then calibration: what ``--config`` does with the quantizer's config."""
        relevant = quantizer.relevant_algorithms()

        def stream() -> Any:
            return _batches(calibration_data, quantizer, batch_size, num_samples, image_size, mean, std, text)[0]

        quantizer.progress = progress
        if relevant:
            for note in quantizer.apply_algorithms(stream):
                logger.info("%s", note)
        batches: Any = None
        total: int | None = None
        if quantizer.needs_data:
            if calibration_data is not None:
                batches, total = _batches(calibration_data, quantizer, batch_size, num_samples, image_size, mean,
                                          std, text)
            elif quantizer.observes_activations:
                raise ConfigError("this config quantizes activations: pass calibration data (--calib-data PATH, or "
                                  "calibration_data=...), or use a weight-only preset (w8, w4)")
            else:
                quantizer.skip_bias_correction("no calibration data was given (pass --calib-data / "
                                               "calibration_data to correct the biases weight rounding shifts)")
        elif calibration_data is not None:
            logger.info("the config quantizes no activation and corrects no bias: calibration data is not needed")
            if quantizer.plan.targets:  # checked, as compare will (with nothing to quantize it is not read)
                _batches(calibration_data, quantizer, batch_size, num_samples, image_size, mean, std, text)
        quantizer.prepare()
        if batches is not None:
            quantizer.calibrate(batches, total=total, progress=progress)
        if relevant and quantizer.pending_calibrated_algorithms and calibration_data is not None:
            for note in quantizer.apply_calibrated_algorithms(stream):
                logger.info("%s", note)
        return quantizer

    quantizer = calibrated(quantizer)
    fallback = None
    if targets:
        from qdq.fallback import search_fallback

        (metric, value), = targets.items()
        fresh = _batches(calibration_data, quantizer, batch_size, num_samples, image_size, mean, std, text)[0]
        measure = _first_samples(fresh, quantizer, holdout)
        fallback = search_fallback(quantizer, measure, metric=metric, target=float(value), progress=progress)
        quantizer = fallback.quantizer
        if fallback.ops:
            # the written model is what `--config OUT.fallback.yaml` makes: the chosen config run from the start
            # (a search candidate reuses statistics of a differently observed graph, and algorithms would round
            # layers now left float), measured again
            quantizer = calibrated(Quantizer(model, fallback.config))
            fallback.remeasure(quantizer, measure)
        check_backend_plan(quantizer.plan, backend, options)
        if on_fallback is not None:
            on_fallback(fallback)
    final = (quantizer.finalize(backend, options=options) if torch_backend
             else quantizer.finalize(backend, kernel_format=kernel_format))
    for note in getattr(final, "notes", []):
        logger.warning("%s legalization: %s", backend.value, note)
    if output is not None:
        if not torch_backend:
            _check_loads(final, quantizer.float_model)
        save(final, output)
        if fallback is not None:
            write_text(Path(output).with_suffix(".fallback.yaml"), _fallback_yaml(fallback))
    return final


def _check_loads(final: Any, original: Any) -> None:
    """Refuse to write an onnxruntime model onnxruntime cannot load: the input model's fault when that does not load
    either, else a qdq bug (never a file to ship)."""
    from qdq.model_io import initializer_bytes
    from qdq.session import make_session

    if initializer_bytes(final) > 1 << 30:  # a second in-memory copy of a big model is not worth the check
        logger.debug("model over 1 GiB: onnxruntime load check skipped")
        return
    try:
        make_session(final, level="none", arena=False, label="quantized model")
    except ModelError as exc:
        try:
            make_session(original, level="none", arena=False, label="FP32 model")
        except ModelError as first:
            raise ModelError(f"the FP32 model does not load in onnxruntime either ({first_line(first)}); qdq "
                             "quantizes models onnxruntime runs: fix or re-export it; nothing was written") from first
        raise ModelError(f"internal error: the quantized model does not load in onnxruntime ({first_line(exc)}); "
                         "nothing was written; please report it with the model and --debug output") from exc


def _first_samples(batches: Any, quantizer: Quantizer, count: int) -> list[dict[str, Any]]:
    """Feeds of the first ``count`` samples of ``batches`` (the fallback search's measurement set)."""
    from qdq.model_inputs import first_samples, model_inputs

    return list(first_samples(batches, model_inputs(quantizer.float_model), count))


def _fallback_yaml(result: Any) -> str:
    head = (f"# qdq fallback: {result.summary()}\n"
            "# ops left float are op_name_configs entries set to null (raised ones carry their int8 weight spec);\n"
            "# pass this file back with --config\n")
    return head + result.config.to_yaml()


def _input_shapes(model: ir.Model) -> dict[str, tuple[int | str | None, ...] | None]:
    shapes: dict[str, tuple[int | str | None, ...] | None] = {}
    for value in model.graph.inputs:
        if value.shape is None:
            shapes[value.name or ""] = None
            continue
        shapes[value.name or ""] = tuple(d if isinstance(d, int) else (d.value if d.value else None)
                                         for d in value.shape)
    return shapes


def _batches(data: Any, quantizer: Quantizer, batch_size: int, num_samples: int | None,
             image_size: Any, mean: Any, std: Any, text: dict[str, Any] | None = None) -> tuple[Any, int | None]:
    from qdq.data import DataSource, open_data
    from qdq.model_inputs import model_inputs

    if isinstance(data, (str, bytes)) or hasattr(data, "__fspath__"):  # the signature checks headers now
        data = open_data(data, model_inputs(quantizer.float_model), image_size=image_size, mean=mean, std=std,
                         num_samples=num_samples, input_shapes=_input_shapes(quantizer.float_model), **(text or {}))
    if isinstance(data, DataSource):
        return data.batches(batch_size), -(-len(data) // data.effective_batch_size(batch_size))
    return data, (len(data) if hasattr(data, "__len__") else None)
