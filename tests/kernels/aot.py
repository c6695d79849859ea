"""Ahead-of-time compilation of Triton kernels for sm_90 on a machine without a GPU: whether each launch config
compiles, its shared memory, and (when the triton wheel ships cuobjdump) its registers and spill bytes.

`compile_for_sm90` runs `report` in a subprocess without TRITON_INTERPRET (the interpreter replaces the compiler)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def report(cases) -> None:
    """Child side: compile each case (name, kernel, arg types, constexprs, num_warps[, num_stages]) and print one
    JSON line per case."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    for name, fn, types, consts, warps, *stages in cases:
        sig = {a: "constexpr" if a in consts else types.get(a, "i32") for a in fn.arg_names}
        try:
            src = ASTSource(fn=fn, signature=sig, constexprs=consts)
        except TypeError as e:  # another triton version's API: nothing to check here
            print(json.dumps({"name": name, "skip": str(e)}))
            continue
        opts = {"num_warps": warps, **({"num_stages": stages[0]} if stages else {})}
        try:
            k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
        except Exception as e:  # noqa: BLE001 - report any compiler failure as the test's failure
            print(json.dumps({"name": name, "error": f"{type(e).__name__}: {e}"[:2000]}))
            continue
        row = {"name": name, "warps": warps, "shared": k.metadata.shared}
        if cuobjdump.exists() and "cubin" in k.asm:
            path = Path(os.environ["AOT_TMP"]) / "k.cubin"
            path.write_bytes(k.asm["cubin"])
            out = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(path)], capture_output=True, text=True)
            m = re.search(r"REG:(\d+).*?STACK:(\d+).*?LOCAL:(\d+)", out.stdout)
            if m:
                row.update(regs=int(m.group(1)), stack=int(m.group(2)), local=int(m.group(3)))
        print(json.dumps(row))


def compile_for_sm90(cases: str, n_cases: int, tmp_path: Path, timeout: int = 600) -> list[dict]:
    """Compiles the cases returned by `cases` ("module:function") in a subprocess and returns one row per case.

    Skips the calling test where triton lacks its CUDA backend or has another ahead-of-time API; fails it on any
    compile error."""
    pytest.importorskip("triton.backends.nvidia.compiler", reason="triton without its CUDA backend")
    module, function = cases.split(":")
    # The compiles are independent and single-threaded (ptxas): one subprocess per core, each every n-th case.
    workers = max(1, min(os.cpu_count() or 1, n_cases, 4))
    procs = []
    for i in range(workers):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        (tmp_path / f"w{i}").mkdir(exist_ok=True)
        env.update(AOT_TMP=str(tmp_path / f"w{i}"), TRITON_CACHE_DIR=str(tmp_path / f"w{i}" / "cache"),
                   PYTHONPATH=str(REPO))  # fmt: skip
        code = (f"from tests.kernels.aot import report; from {module} import {function}; "
                f"report({function}()[{i}::{workers}])")  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))  # fmt: skip
    rows, stdout = [], ""
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, err[-3000:]
        stdout += out
        rows += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(rows) == n_cases, stdout[-3000:]
    if all("skip" in r for r in rows):
        pytest.skip(f"this triton's ahead-of-time API differs: {rows[0]['skip']}")
    errors = [r for r in rows if "error" in r]
    assert not errors, errors
    return rows
