import subprocess
import sys


def test_import_is_cheap():
    code = "import sys, fp8train; heavy = [m for m in ('torch', 'transformers', 'triton') if m in sys.modules]; print(heavy)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_lazy_attributes():
    import fp8train

    assert fp8train.formats.E4M3.max == 448
    assert fp8train.quant.quantize is fp8train.quantize


def test_smoke_command_runs():
    out = subprocess.run([sys.executable, "-m", "fp8train", "smoke"], capture_output=True, text=True, check=True).stdout
    assert "E4M3" in out and "128x128" in out
