"""bench/bench_gpu.py --smoke: the GPU benchmark script runs end to end on tiny CPU shapes
(so it keeps working where no GPU is present) and its SEFT rows really run an evolution step."""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_bench_gpu_smoke(tmp_path):
    out = tmp_path / "smoke.md"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_gpu.py"), "--smoke", "--budget-s", "120",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    for row in ("seft_ext.SparseLinear (CSR)", "masked dense", "SEFT: SEFTLinear", "SEFT masked dense"):
        assert row in text, row
    assert "(scan / evolve)" in text and "NO EVOLUTION STEP RAN" not in text
    assert "INCOMPLETE" not in text and "skip (" not in text
