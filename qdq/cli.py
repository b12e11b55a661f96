"""``qdq`` command line: quantize, compare, export, inspect, demo.

Errors print one line ``qdq: error: <problem and fix>`` on stderr; exit code 2 for usage and
config errors, 1 for the rest. ``--debug`` adds the traceback; ``--quiet`` hides progress bars.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import tempfile
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser"]

logger = logging.getLogger("qdq")


class _Parser(argparse.ArgumentParser):
    """argparse with our one-line error format (exit 2)."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        self.exit(2, f"qdq: error: {message} (see {self.prog} --help)\n")


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got '{text}'") from None


def _add_data_args(p: argparse.ArgumentParser, flag: str) -> None:
    p.add_argument(flag, required=True, metavar="PATH",
                   help=".npy (first axis = samples), .npz (one array per input), a folder of .npy/.npz, or a folder of images")
    p.add_argument("--image-size", type=int, default=None, help="image folders: resize/crop to this size (default 224)")
    p.add_argument("--mean", type=_floats, default=None, help="image folders: per-channel mean of x/255 (R,G,B)")
    p.add_argument("--std", type=_floats, default=None, help="image folders: per-channel std of x/255 (R,G,B)")
    p.add_argument("--num-samples", type=int, default=None, help="use the first N samples only")
    p.add_argument("--batch-size", type=int, default=16, help="samples per onnxruntime run (default 16)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qdq", description="ONNX quantization: QDQ rewrite, calibration, finalize, validate.")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or info output")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    q = sub.add_parser("quantize", help="quantize an ONNX model")
    q.add_argument("model", help="FP32 ONNX model")
    q.add_argument("-o", "--output", required=True, help="output ONNX path")
    _add_data_args(q, "--calib-data")
    q.set_defaults(calib_required=True)
    group = q.add_mutually_exclusive_group()
    group.add_argument("--preset", default=None, help="int8 (default), int8-global-minmax, fp8, w8, w4")
    group.add_argument("--config", default=None, help="YAML QuantizerConfig (coreai_opt semantics)")
    q.add_argument("--calibrator", default=None, help="override every activation calculator (e.g. percentile, entropy, mse)")
    q.add_argument("--backend", default="onnxruntime", help="onnxruntime (default), coreml or coreai")

    c = sub.add_parser("compare", help="FP32 vs quantized: SQNR, top-1 agreement, accuracy, per-layer error")
    c.add_argument("fp32_model")
    c.add_argument("quant_model")
    _add_data_args(c, "--data")
    c.add_argument("--labels", default=None, help=".npy or .txt of integer labels, one per sample")
    c.add_argument("--per-layer", action="store_true", help="SQNR of every quantized activation, worst first")

    e = sub.add_parser("export", help="export a PyTorch model to ONNX (dynamo exporter)")
    e.add_argument("--model", required=True, metavar="PKG.MODULE:FACTORY",
                   help="factory returning (torch model, example inputs), e.g. models.digits:factory")
    e.add_argument("-o", "--output", required=True)
    e.add_argument("--opset", type=int, default=None)

    i = sub.add_parser("inspect", help="list a model's nodes and what the config would quantize")
    i.add_argument("model")
    i.add_argument("--preset", default=None)
    i.add_argument("--config", default=None)

    d = sub.add_parser("demo", help="train the digits CNN and print the PTQ table (and EfficientNet-Lite0 if images exist)")
    d.add_argument("--images", default=None, help="ImageNet sample folder (default ../shared/data/imagenet-sample)")
    d.add_argument("--skip-efficientnet", action="store_true", help="digits only")
    return parser


def _config(args: argparse.Namespace) -> Any:
    from qdq.config import QuantizerConfig
    from qdq.presets import preset

    if getattr(args, "config", None):
        cfg = QuantizerConfig.from_yaml(args.config)
    else:
        cfg = preset(getattr(args, "preset", None) or "int8")
    if getattr(args, "calibrator", None):
        from qdq.config_edit import with_activation_calculator

        cfg = with_activation_calculator(cfg, args.calibrator)
    return cfg


def _open(args: argparse.Namespace, path: str, model: Any, role: str = "calibration") -> Any:
    from qdq.data import open_data
    from qdq.validate import input_shapes

    names = [v.name or "" for v in model.graph.inputs]
    return open_data(path, names, image_size=args.image_size, mean=args.mean, std=args.std,
                     num_samples=args.num_samples, input_shapes=input_shapes(model), role=role)


def _cmd_quantize(args: argparse.Namespace) -> int:
    from qdq.model_io import save
    from qdq.quantizer import Quantizer

    out = Path(args.output)
    if out.resolve() == Path(args.model).resolve():
        from qdq.errors import ConfigError

        raise ConfigError("-o must differ from the input model; qdq never overwrites its input")
    quantizer = Quantizer(args.model, _config(args))
    quantizer.prepare()
    if any(t.observed for t in quantizer.targets.values()):
        data = _open(args, args.calib_data, quantizer.float_model)
        total = -(-len(data) // args.batch_size)
        quantizer.calibrate(data.batches(args.batch_size), total=total, progress=not args.quiet)
    final = quantizer.finalize(args.backend)
    save(final, out)
    summary = quantizer.plan.summary()
    if not args.quiet:
        size = out.stat().st_size
        print(f"wrote {out} ({size / 1e6:.2f} MB; {summary.get('weight', 0)} weights, "
              f"{summary.get('activation', 0)} activations quantized; backend {args.backend})")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    import numpy as np

    from qdq.data import image_labels, labels_from_file
    from qdq.model_io import load_model
    from qdq.validate import compare

    fp32 = load_model(args.fp32_model)
    data = _open(args, args.data, fp32, role="evaluation")
    if args.labels:
        labels = np.asarray(labels_from_file(args.labels))[: len(data)]
    else:  # image folders named "<label>_..." carry their labels
        labels = image_labels(args.data, args.num_samples) if Path(args.data).is_dir() else None
    report = compare(args.fp32_model, args.quant_model, data, labels=labels, per_layer=args.per_layer,
                     batch_size=args.batch_size, progress=not args.quiet)
    print(report.format())
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from qdq.errors import ConfigError
    from qdq.torch_export import export

    mod_name, _, attr = args.model.partition(":")
    if not mod_name or not attr:
        raise ConfigError(f"--model must look like package.module:factory, got '{args.model}'")
    sys.path.insert(0, os.getcwd())
    try:
        factory = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot load factory '{args.model}': {exc}") from None
    model, example = factory()
    path = export(model, tuple(example) if isinstance(example, (tuple, list)) else (example,), args.output,
                  opset=args.opset)
    if not args.quiet:
        print(f"wrote {path}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from qdq.model_io import load_model
    from qdq.passes.annotate import annotate

    model = load_model(args.model)
    plan = annotate(model, _config(args))
    by_node: dict[str, list[str]] = {}
    for t in plan.targets.values():
        for op in t.ops:
            by_node.setdefault(op, []).append(f"{t.tensor}:{t.kind[0]}:{t.spec.dtype}")
    print(f"{'node':40s} {'op type':18s} quantized tensors (w=weight a=activation c=constant)")
    for node in model.graph:
        print(f"{node.name[:40]:40s} {node.op_type:18s} {' '.join(by_node.get(node.name, []))}")
    print(f"\n{plan.summary()}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from qdq.demo import run_demo

    run_demo(images=args.images, efficientnet=not args.skip_efficientnet, progress=not args.quiet)
    return 0


_COMMANDS = {"quantize": _cmd_quantize, "compare": _cmd_compare, "export": _cmd_export,
             "inspect": _cmd_inspect, "demo": _cmd_demo}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.DEBUG if args.debug else (logging.WARNING),
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("onnxscript", "onnx_ir", "torch"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if args.debug else logging.ERROR)
    from qdq.errors import QdqError, first_line

    try:
        return _COMMANDS[args.command](args)
    except QdqError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"qdq: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("qdq: error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # an unexpected failure still gets one line unless --debug
        if args.debug:
            traceback.print_exc()
        print(f"qdq: error: internal error {first_line(exc, with_type=True)} (rerun with --debug and report it)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
