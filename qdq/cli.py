"""``qdq`` command line: quantize, compare, report, export, inspect, demo.

Errors print one line ``qdq: error: <problem and fix>`` on stderr; exit code 2 for usage and
config errors, 1 for the rest, 130 for Ctrl-C and 143 for SIGTERM (no partial output either way).
Global options (``--quiet``, ``--debug``) go before or after the subcommand; ``--debug`` adds
the traceback, ``--quiet`` prints nothing but errors.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import signal
import sys
import traceback
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = ["Terminated", "build_parser", "main"]

logger = logging.getLogger("qdq")


class Terminated(KeyboardInterrupt):
    """Raised by the CLI's SIGTERM handler, so SIGTERM unwinds (and cleans up) exactly like Ctrl-C."""


class _Parser(argparse.ArgumentParser):
    """argparse with our one-line error format (exit 2)."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        self.exit(2, f"qdq: error: {message} (see {self.prog} --help)\n")


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got '{text}'") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got '{text}'")
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _global_options(defaults: bool) -> argparse.ArgumentParser:
    """--quiet/--debug: on the main parser with defaults, on each subcommand without (so either place works)."""
    parent = argparse.ArgumentParser(add_help=False)
    default: Any = False if defaults else argparse.SUPPRESS
    group = parent.add_argument_group("global options (before or after the command)")
    group.add_argument("--quiet", action="store_true", default=default,
                       help="print nothing but errors (no progress bars, summaries or warnings)")
    group.add_argument("--debug", action="store_true", default=default, help="show tracebacks and debug logs")
    return parent


def _add_data_args(p: argparse.ArgumentParser, flag: str, *, required: bool = True) -> None:
    p.add_argument(flag, required=required, default=None, metavar="PATH",
                   help=".npy (first axis = samples), .npz (one array per input), a folder of .npy/.npz, a "
                        "folder of images, or a .txt of sentences (one per line, with --tokenizer)"
                        + ("" if required else "; optional for weight-only presets (w8, w4), "
                                               "which use it for bias correction"))
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help=".txt data: a local Hugging Face tokenizer (or model) folder to tokenize the lines with")
    p.add_argument("--seq-len", type=_positive_int, default=None,
                   help=".txt data: pad/truncate every line to this many tokens (default 128)")
    p.add_argument("--image-size", type=_positive_int, default=None,
                   help="image folders: resize/crop to this size (default: the model's, else 224)")
    p.add_argument("--mean", type=_floats, default=None, help="image folders: per-channel mean of x/255 (R,G,B)")
    p.add_argument("--std", type=_floats, default=None, help="image folders: per-channel std of x/255 (R,G,B)")
    p.add_argument("--num-samples", type=_positive_int, default=None, help="use the first N samples only")
    p.add_argument("--batch-size", type=_positive_int, default=16, help="samples per batch (default 16)")


def _version() -> str:
    from qdq import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qdq", description="ONNX quantization: QDQ rewrite, calibration, finalize, validate.",
                     parents=[_global_options(True)])
    parser.add_argument("--version", action="version", version=f"qdq {_version()}")
    sub: Any = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    common: list[argparse.ArgumentParser] = [_global_options(False)]

    q = sub.add_parser("quantize", help="quantize an ONNX model", parents=common)
    q.add_argument("model", help="FP32 ONNX model")
    q.add_argument("-o", "--output", required=True,
                   help="output path, written atomically: .onnx (onnxruntime), .mlpackage (coreml), .aimodel (coreai)")
    _add_data_args(q, "--calib-data", required=False)
    group = q.add_mutually_exclusive_group()
    group.add_argument("--preset", default=None, help="int8 (default), int8-global-minmax, int8-asymmetric, int8-smoothquant, int8-gptq, fp8, w8, "
                            "w4, w4-gptq")
    group.add_argument("--config", default=None, help="YAML QuantizerConfig (coreai_opt semantics)")
    q.add_argument("--calibrator", default=None,
                   help="override every activation calculator (e.g. percentile, entropy, mse); keeps all else")
    q.add_argument("--algorithm", action="append", default=None, metavar="NAME[:key=value,...]",
                   help="run an algorithm pass on the calibration data (repeatable): smoothquant, gptq, adaround, "
                        "cle before calibration, sequential_bias_correction after it; e.g. smoothquant:alpha=0.7; "
                        "added after the config's own")
    q.add_argument("--backend", default="onnxruntime", help="onnxruntime (default), coreml or coreai")
    q.add_argument("--kernel-format", default="auto", choices=["auto", "u8s8", "u8u8"],
                   help="onnxruntime: int8 weights (u8s8) or uint8 weights (u8u8, same values); auto (default) "
                        "picks u8u8 on an x86 CPU without VNNI/AMX, where onnxruntime's U8S8 kernels saturate")
    tgt = q.add_argument_group("accuracy target: leave the fewest ops float until it holds (writes OUT.fallback.yaml)")
    tgts = tgt.add_mutually_exclusive_group()
    tgts.add_argument("--target-agreement", type=float, default=None, metavar="PCT",
                      help="top-1 agreement with FP32 in %% (class scores; per token for [N, S, vocab] logits), e.g. 99.5")
    tgts.add_argument("--target-sqnr", type=float, default=None, metavar="DB", help="output SQNR vs FP32 in dB")
    tgts.add_argument("--target-cosine", type=float, default=None, metavar="C", help="mean output cosine vs FP32")
    tgt.add_argument("--holdout", type=int, default=256, metavar="N",
                     help="measure the target on the first N calibration samples (default 256)")
    apple = q.add_argument_group("Core ML / Core AI conversion")
    apple.add_argument("--deployment-target", default=None,
                       help="Core ML minimum deployment target: iOS17 (default) or iOS18 (needed for int4 weights)")
    apple.add_argument("--compute-precision", default=None, help="Core ML compute precision: float32 (default) or float16")
    apple.add_argument("--input-names", default=None, help="comma-separated input names in the converted model "
                                                           "(default: the ONNX graph's)")
    apple.add_argument("--output-names", default=None, help="comma-separated output names (default: the ONNX graph's)")

    c = sub.add_parser("compare", help="FP32 vs quantized: SQNR, top-1 agreement, accuracy, per-layer error",
                       parents=common)
    c.add_argument("fp32_model")
    c.add_argument("quant_model")
    _add_data_args(c, "--data")
    c.add_argument("--labels", default=None, help=".npy or .txt of integer labels, one per sample")
    c.add_argument("--per-layer", action="store_true", help="SQNR of every quantized activation, worst first")

    r = sub.add_parser("report", help="HTML/Markdown report: model metrics, isolated vs accumulated per-layer error, "
                                      "qparams, per-layer time", parents=common)
    r.add_argument("fp32_model")
    r.add_argument("quant_model")
    _add_data_args(r, "--data")
    r.add_argument("--labels", default=None, help=".npy or .txt of integer labels, one per sample")
    r.add_argument("-o", "--output", required=True, help="report path: .html (self-contained) or .md")

    e = sub.add_parser("export", help="export a PyTorch model to ONNX (dynamo exporter)", parents=common)
    source = e.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", metavar="PKG.MODULE:FACTORY",
                        help="factory returning (torch model, example inputs), e.g. models.digits:factory")
    source.add_argument("--hf", metavar="DIR|PACKAGE",
                        help="a Hugging Face transformer: a local model folder or an installed package holding one "
                             "(named int64 inputs, dynamic batch and sequence)")
    e.add_argument("--pooling", default=None, choices=["mean", "none"],
                   help="--hf: output the attention-masked mean of the last hidden state, L2-normalised "
                        "(sentence_embedding), instead of last_hidden_state")
    e.add_argument("-o", "--output", required=True)
    e.add_argument("--opset", type=_positive_int, default=None)

    i = sub.add_parser("inspect", help="list a model's nodes and what the config would quantize", parents=common)
    i.add_argument("model")
    group = i.add_mutually_exclusive_group()
    group.add_argument("--preset", default=None)
    group.add_argument("--config", default=None)

    d = sub.add_parser("demo", help="train the digits CNN and print the PTQ table (and EfficientNet-Lite0 if "
                                    "images exist)", parents=common)
    d.add_argument("--images", default=None, help="ImageNet sample folder (default ../shared/data/imagenet-sample)")
    d.add_argument("--skip-efficientnet", action="store_true", help="digits only")
    return parser


def _config(args: argparse.Namespace) -> Any:
    """The QuantizerConfig of --config FILE or --preset NAME (default int8)."""
    from qdq.config import QuantizerConfig
    from qdq.presets import preset

    if getattr(args, "config", None):
        return QuantizerConfig.from_yaml(args.config)
    return preset(getattr(args, "preset", None) or "int8")


def _cmd_quantize(args: argparse.Namespace) -> int:
    from qdq.oneshot import quantize

    out = Path(args.output)
    final = quantize(args.model, _config(args), args.calib_data, backend=args.backend, batch_size=args.batch_size,
             num_samples=args.num_samples, calibrator=args.calibrator, output=out, progress=not args.quiet,
             image_size=args.image_size, mean=args.mean, std=args.std, deployment_target=args.deployment_target,
             compute_precision=args.compute_precision, input_names=args.input_names, output_names=args.output_names,
             algorithms=args.algorithm, tokenizer=args.tokenizer, seq_len=args.seq_len,
             target_agreement=args.target_agreement, target_sqnr=args.target_sqnr, target_cosine=args.target_cosine,
             holdout=args.holdout, on_fallback=None if args.quiet else _print_fallback(out),
             kernel_format=args.kernel_format)
    if not args.quiet:
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) if out.is_dir() else out.stat().st_size
        from qdq.backends import ExportBackend
        from qdq.backends.host_cpu import kernel_format_for

        fmt = kernel_format_for(ExportBackend.parse(args.backend), args.kernel_format)
        why = " (this CPU's U8S8 kernels saturate)" if fmt == "u8u8" and args.kernel_format == "auto" else ""
        note = f", {fmt} kernels{why}" if fmt else ""
        ops = _quantized_ops(final)
        if ops == 0:
            note = ", nothing quantized: the same model"
        elif ops is not None:
            note = f", {ops} ops read quantized tensors{note}"
        print(f"wrote {out} ({size / 1e6:.2f} MB, backend {args.backend}{note})")
    return 0


def _quantized_ops(final: Any) -> int | None:
    """How many ops of an onnxruntime model read a DequantizeLinear output (None for other artifacts)."""
    import onnx_ir as ir

    if not isinstance(final, ir.Model):
        return None
    def from_dq(v: Any) -> bool:
        producer = v.producer() if v is not None else None
        return producer is not None and producer.op_type == "DequantizeLinear"

    integer_ops = ("MatMulIntegerToFloat", "MatMulInteger", "ConvInteger")  # fused: they read integers directly
    return len([n for n in final.graph if n.op_type not in ("QuantizeLinear", "DequantizeLinear")
                and (n.op_type in integer_ops or n.op_type.startswith("QLinear") or any(from_dq(v) for v in n.inputs))])


def _print_fallback(out: Path) -> Any:
    def show(result: Any) -> None:
        print(f"{_fresh_line()}{result.summary()}; config: {out.with_suffix('.fallback.yaml')}")
    return show


def _evaluation_data(args: argparse.Namespace) -> tuple[Any, Any]:
    """The --data of compare / report opened with the FP32 model's inputs, and the labels (--labels or folder)."""
    import numpy as np

    from qdq.data import image_labels, labels_from_file, open_data
    from qdq.model_inputs import model_inputs
    from qdq.model_io import load_model
    from qdq.oneshot import check_options
    from qdq.validate import input_shapes

    check_options(batch_size=args.batch_size, num_samples=args.num_samples, image_size=args.image_size,
                  mean=args.mean, std=args.std)
    fp32 = load_model(args.fp32_model)
    names = model_inputs(fp32)  # required inputs, dtypes and shapes: files are checked when opened
    data = open_data(args.data, names, image_size=args.image_size, mean=args.mean, std=args.std,
                     num_samples=args.num_samples, input_shapes=input_shapes(fp32), role="evaluation",
                     tokenizer=args.tokenizer, seq_len=args.seq_len)
    labels: np.ndarray | None
    if args.labels:
        labels = np.asarray(labels_from_file(args.labels))[: len(data) * data.rows_per_sample]  # one per model row
    else:  # image folders named "<label>_..." carry their labels
        labels = image_labels(args.data, args.num_samples) if Path(args.data).is_dir() else None
    return data, labels


def _cmd_report(args: argparse.Namespace) -> int:
    from qdq.report import build_report, write_report

    out = Path(args.output)
    if out.suffix.lower() not in (".html", ".htm", ".md"):
        from qdq.errors import ConfigError

        raise ConfigError(f"-o {out.name}: a report is .html or .md")
    data, labels = _evaluation_data(args)
    report = build_report(args.fp32_model, args.quant_model, data, labels=labels, batch_size=args.batch_size,
                          progress=not args.quiet)
    path = write_report(report, out)
    worst = ", ".join(f"{r.name} ({r.op_type}) {r.isolated_db:.1f} dB" for r in report.worst_layers(3))
    print(f"{_fresh_line()}wrote {path}: {len(report.layers)} layers, worst isolated: {worst}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from qdq.validate import compare

    data, labels = _evaluation_data(args)
    report = compare(args.fp32_model, args.quant_model, data, labels=labels, per_layer=args.per_layer,
                     batch_size=args.batch_size, progress=not args.quiet)
    print(report.format())
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from qdq.errors import ConfigError
    from qdq.model_io import check_output_path
    from qdq.torch_export import export

    if args.hf:
        from qdq.hf_export import export_hf

        check_output_path(args.output)
        path = export_hf(args.hf, args.output, pooling=args.pooling)
        if not args.quiet:
            print(f"wrote {path}")
        return 0
    mod_name, _, attr = args.model.partition(":")
    if not mod_name or not attr:
        raise ConfigError(f"--model must look like package.module:factory, got '{args.model}'")
    check_output_path(args.output)
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
    from qdq.quantizer import Quantizer

    quantizer = Quantizer(args.model, _config(args))  # the same load, checks, opset upgrade and plan as quantize
    model, plan = quantizer.float_model, quantizer.plan
    by_node: dict[str, list[str]] = {}
    for t in plan.targets.values():
        for op in t.ops:
            by_node.setdefault(op, []).append(f"{t.tensor}:{t.kind[0]}:{t.spec.dtype}")
    print(f"{'node':40s} {'op type':18s} quantized tensors (w=weight a=activation c=constant)")
    for node in model.graph:
        name = node.name or ""
        print(f"{name[:40]:40s} {node.op_type:18s} {' '.join(by_node.get(name, []))}")
    print(f"\n{plan.summary()}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from qdq.demo import run_demo

    run_demo(images=args.images, efficientnet=not args.skip_efficientnet, progress=not args.quiet)
    return 0


_COMMANDS = {"quantize": _cmd_quantize, "compare": _cmd_compare, "report": _cmd_report, "export": _cmd_export,
             "inspect": _cmd_inspect, "demo": _cmd_demo}


def _fresh_line() -> str:
    from qdq.progress import bar_was_drawn

    return "\n" if bar_was_drawn() else ""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(f"signal {signum}")


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` inside the block (main thread only), so cleanup code runs."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _configure_output(quiet: bool, debug: bool) -> None:
    """Logging levels; ``--quiet`` also silences Python warnings and onnxruntime's own log."""
    level = logging.DEBUG if debug else (logging.ERROR if quiet else logging.WARNING)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("onnxscript", "onnx_ir", "torch"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if debug else logging.ERROR)
    if quiet and not debug:
        warnings.simplefilter("ignore")
    if not debug:  # qdq reports onnxruntime's errors itself, as one line; its own log would repeat them
        with contextlib.suppress(Exception):
            import onnxruntime as ort

            ort.set_default_logger_severity(3 if not quiet else 4)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    _configure_output(args.quiet, args.debug)
    from qdq.errors import QdqError, first_line

    try:
        with _sigterm_raises():
            return _COMMANDS[args.command](args)
    except QdqError as exc:
        if args.debug:
            traceback.print_exc()
        print("qdq: error: " + " ".join(str(exc).split()), file=sys.stderr)
        return exc.exit_code
    except Terminated:  # a signal may land mid-way through a progress bar's line: start a fresh one
        print(_fresh_line() + "qdq: error: interrupted by SIGTERM; nothing was written", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(_fresh_line() + "qdq: error: interrupted (Ctrl-C); nothing was written", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `qdq compare ... | head`: the reader left; nothing to report, like other tools
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        except OSError:
            pass
        return 141
    except Exception as exc:  # noqa: BLE001 - an unexpected failure still gets one line unless --debug
        if args.debug:
            traceback.print_exc()
        print(f"qdq: error: internal error {first_line(exc, with_type=True)} (rerun with --debug and report it)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
