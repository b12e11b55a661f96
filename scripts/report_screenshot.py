"""The README's `qdq report` screenshot: digits CNN, int8, report page rendered by headless Chromium.

    python scripts/report_screenshot.py [--out scripts/report_screenshot.png]

Trains the digits CNN (scikit-learn's load_digits, seconds), quantizes it with ``--preset int8``, builds its
report page and screenshots it (Debian package ``chromium``).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).with_name("report_screenshot.png")))
    args = parser.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        print("needs a headless browser: apt-get install chromium", file=sys.stderr)
        return 1
    import torch

    import qdq
    from models.digits import load_digits_data, trained_digits_cnn
    from qdq.report import build_report, write_report

    x_tr, _, x_te, y_te = load_digits_data()
    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="qdq-shot-") as tmp:
        model, _ = trained_digits_cnn()
        fp32 = qdq.export(model, (torch.from_numpy(x_tr[:2]),), Path(tmp) / "digits.onnx")
        quant = qdq.quantize(fp32, "int8", [x_tr[:256]], output=Path(tmp) / "digits.int8.onnx", progress=False)
        del quant
        report = build_report(fp32, Path(tmp) / "digits.int8.onnx", x_te, labels=y_te, progress=False)
        report.fp32_model, report.quant_model = "digits.onnx", "digits.int8.onnx"
        page = write_report(report, Path(tmp) / "report.html")
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        "--window-size=1280,1500", f"--screenshot={out}", page.as_uri()],
                       check=True, capture_output=True, timeout=120)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
