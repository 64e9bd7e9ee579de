"""``python -m seft_ext``: diagnostics (versions, CUDA, CPU kernels, threads)."""
import platform
import sys

import torch


def main() -> int:
    import seft_ext
    from seft_ext import _lib

    bi = _lib.build_info
    rows = [
        ("seft_ext", seft_ext.__version__),
        ("python", sys.version.split()[0]),
        ("platform", platform.platform()),
        ("torch (running)", torch.__version__),
        ("torch (built against)", bi.TORCH_VERSION if bi else "unknown (not built)"),
        ("built with CUDA", (f"yes (nvcc {bi.NVCC_VERSION}, archs {bi.CUDA_ARCHS})" if bi and bi.WITH_CUDA else "no")),
        ("torch CUDA", torch.version.cuda or "none (CPU build)"),
        ("CUDA available", str(torch.cuda.is_available())),
        ("library", _lib.library_path or f"NOT LOADED: {_lib.load_error}"),
        ("CPU kernel sets built", bi.CPU_ISAS if bi else "unknown"),
        ("CPU kernel set in use", seft_ext.ops.cpu_isa() if _lib.load_error is None else "n/a"),
        ("threads (torch)", str(torch.get_num_threads())),
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            rows.append((f"cuda:{i}", f"{p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0 if _lib.load_error is None else 1


if __name__ == "__main__":
    sys.exit(main())
