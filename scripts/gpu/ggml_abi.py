#!/usr/bin/env python3
"""Write the ggml ABI stamp of a ggml source tree next to the backend modules built from it.

stllm's build.rs fingerprints the same headers of the ggml it links (FNV-1a 64 over each file's
path then bytes, in this order); `stllm` refuses a backend module whose folder has no
`ggml-abi.txt` or one with another fingerprint. Keep ABI_FILES equal to build.rs's.

Usage: ggml_abi.py GGML_SRC_DIR [OUT_FILE]   (prints the fingerprint; writes it to OUT_FILE)
"""
import pathlib
import sys

ABI_FILES = [
    "include/ggml.h",
    "include/ggml-alloc.h",
    "include/ggml-backend.h",
    "include/ggml-cpu.h",
    "src/ggml-backend-impl.h",
    "src/ggml-impl.h",
    "src/ggml-common.h",
]


def fingerprint(root: pathlib.Path) -> str:
    h = 0xCBF29CE484222325
    for f in ABI_FILES:
        for b in f.encode() + (root / f).read_bytes():
            h ^= b
            h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


if __name__ == "__main__":
    fp = fingerprint(pathlib.Path(sys.argv[1]))
    print(fp)
    if len(sys.argv) > 2:
        pathlib.Path(sys.argv[2]).write_text(fp + "\n")
