"""Compiles zerokit's CUDA kernel source with NVRTC, as lib/kernels/mod.rs does at run time, for
the virtual architectures zerokit targets, on a machine without a GPU: NVRTC only needs its
own libraries, which the Python reference environment has (the nvidia wheels torch depends on).

    python tools/nvrtc_check.py SOURCE.cu [--arch compute_90 ...]

Prints each architecture's kernel entry points, one line each; exits 1 with NVRTC's log when a
compile fails, 2 when NVRTC cannot be loaded.
"""
import argparse
import ctypes
import glob
import os
import re
import sys


def load_nvrtc():
    # The wheel's lib directory: libnvrtc.so.* and its libnvrtc-builtins, which NVRTC dlopens by
    # name, so the directory also goes on the loader path of this process's later dlopens.
    import nvidia  # noqa: F401 (the namespace package of the CUDA wheels)

    for root in nvidia.__path__:
        for lib in sorted(glob.glob(os.path.join(root, "*", "lib", "libnvrtc.so.*"))):
            if "builtins" in lib or "alt" in lib:
                continue
            d = os.path.dirname(lib)
            for b in glob.glob(os.path.join(d, "libnvrtc-builtins.so.*")):
                if "alt" not in b:
                    ctypes.CDLL(b, mode=ctypes.RTLD_GLOBAL)
            return ctypes.CDLL(lib)
    raise OSError("no libnvrtc.so in the nvidia wheels of " + sys.executable)


def compile_ptx(nvrtc, src, arch):
    prog = ctypes.c_void_p()
    if nvrtc.nvrtcCreateProgram(ctypes.byref(prog), src, b"zerokit_kernels.cu", 0, None, None) != 0:
        raise RuntimeError("nvrtcCreateProgram failed")
    opts = [f"--gpu-architecture={arch}".encode(), b"--std=c++17"]
    rc = nvrtc.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(prog, log)
    if rc != 0:
        return None, log.value.decode(errors="replace")
    nvrtc.nvrtcGetPTXSize(prog, ctypes.byref(size))
    ptx = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetPTX(prog, ptx)
    return ptx.value.decode(), log.value.decode(errors="replace")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source")
    ap.add_argument("--arch", action="append", help="default: compute_80, compute_90, compute_100")
    a = ap.parse_args()
    try:
        nvrtc = load_nvrtc()
    except (ImportError, OSError) as e:
        print(f"nvrtc_check: cannot load NVRTC: {e}", file=sys.stderr)
        return 2
    src = open(a.source, "rb").read()
    for arch in a.arch or ["compute_80", "compute_90", "compute_100"]:
        ptx, log = compile_ptx(nvrtc, src, arch)
        if ptx is None:
            print(f"nvrtc_check: {a.source} does not compile for {arch}:\n{log}", file=sys.stderr)
            return 1
        entries = re.findall(r"^\.visible \.entry (\w+)\(", ptx, re.M)
        print(arch, " ".join(entries))
    return 0


if __name__ == "__main__":
    sys.exit(main())
