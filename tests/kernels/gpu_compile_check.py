"""Compile every Triton kernel, in every GPU autotune config, for an H100 (sm_90), without a GPU.

The interpreter accepts programs the GPU compiler rejects (small dot tiles, some dtype mixes),
so the CPU tests alone cannot show that the kernels build for CUDA. Triton ships its own ptxas,
so this script lowers each kernel to a cubin on any machine. It must run without
TRITON_INTERPRET (under it, ``@triton.jit`` yields interpreter objects), hence a script that the
tests start in a subprocess. Prints one line per kernel variant: configs built, shared memory.

    python tests/kernels/gpu_compile_check.py [--arch 90]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("run without TRITON_INTERPRET=1: the GPU compiler needs real @triton.jit kernels")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget

from kernels import blur_triton, cosine_maps_triton, knn_triton, vq_triton

H100_SHARED_BYTES = 232_448  # opt-in shared memory per block on sm_90


def _signature(fn: triton.JITFunction, types: dict[str, str], constexprs: dict) -> dict:
    """Full signature: every argument not in ``types`` is an i32 scalar (sizes, strides)."""
    return {
        name: "constexpr" if name in constexprs else types.get(name, "i32") for name in fn.arg_names
    }


def _compile(
    kernel: object, types: dict[str, str], constexprs: dict, config: triton.Config, arch: int
) -> triton.compiler.CompiledKernel:
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    signature = _signature(fn, types, constexprs)
    # Pointers from torch allocations are 16-byte aligned; launches specialise them so.
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(fn.arg_names)
        if signature[name].startswith("*")
    }
    source = triton.compiler.ASTSource(
        fn=fn, signature=signature, constexprs=constexprs, attrs=attrs
    )
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def _variants() -> list[tuple[str, object, dict[str, str], dict]]:
    """(label, kernel, argument types, constexprs) for every build the engine can ask for."""
    out = []
    for dt in ("fp32", "fp16", "bf16"):
        out.append(
            (
                f"vq {dt}",
                vq_triton._vq_nearest_kernel,
                {"x_ptr": f"*{dt}", "code_ptr": f"*{dt}", "idx_ptr": "*i64", "out_ptr": f"*{dt}"},
                {"BLOCK_K": 16, "stride_xd": 1, "stride_cd": 1},
            )
        )
        out.append(
            (
                f"cosine level {dt}",
                cosine_maps_triton._cosine_level_kernel,
                {"enc_ptr": f"*{dt}", "dec_ptr": f"*{dt}", "out_ptr": "*fp32", "eps": "fp32"},
                {"se_w": 1, "sd_w": 1},
            )
        )
        for num_maps in (1, 2, 3):
            out.append(
                (
                    f"blur {dt} maps={num_maps}",
                    blur_triton._blur_axis_kernel,
                    {
                        **{f"m{i}_ptr": f"*{dt}" for i in range(3)},
                        "taps_ptr": "*fp32",
                        "out_ptr": "*fp32",
                        **{f"{q}{i}": "fp32" for i in range(3) for q in ("scale", "mean")},
                    },
                    {
                        "NUM_MAPS": num_maps,
                        **{f"s{i}_across": 1 for i in ("0", "1", "2", "o")},
                    },
                )
            )
    for align in (False, True):
        out.append(
            (
                f"upsample+sum align_corners={align}",
                cosine_maps_triton._upsample_sum_kernel,
                {
                    "maps_ptr": "*fp32",
                    "layout_ptr": "*i64",
                    "scales_ptr": "*fp32",
                    "out_ptr": "*fp32",
                },
                {"ALIGN_CORNERS": align},
            )
        )
    for q_dt, b_dt, dot_dt in [
        ("fp16", "fp16", tl.float16),
        ("bf16", "bf16", tl.bfloat16),
        ("fp32", "fp32", tl.float32),
        ("fp32", "fp16", tl.float32),
    ]:
        out.append(
            (
                f"knn partial q={q_dt} bank={b_dt}",
                knn_triton._knn_partial_kernel,
                {
                    "q_ptr": f"*{q_dt}",
                    "bank_ptr": f"*{b_dt}",
                    "bank_sq_ptr": "*fp32",
                    "part_score_ptr": "*fp32",
                    "part_idx_ptr": "*i32",
                },
                {
                    "DOT_DTYPE": dot_dt,
                    "PRECISION": "tf32x3" if dot_dt == tl.float32 else "tf32",
                    "stride_qd": 1,
                    "stride_bd": 1,
                },
            )
        )
        out.append(
            (
                f"knn finish q={q_dt}",
                knn_triton._knn_finish_kernel,
                {
                    "part_score_ptr": "*fp32",
                    "part_idx_ptr": "*i32",
                    "q_ptr": f"*{q_dt}",
                    "dist_ptr": "*fp32",
                    "idx_ptr": "*i64",
                },
                {
                    "BLOCK_Q": knn_triton.REDUCE_BLOCK_Q,
                    "BLOCK_D": knn_triton.REDUCE_BLOCK_D,
                    "stride_qd": 1,
                },
            )
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90")
    args = parser.parse_args(argv)
    failures = 0
    for label, kernel, types, constexprs in _variants():
        configs = (
            kernel.configs if isinstance(kernel, triton.runtime.Autotuner) else [triton.Config({})]
        )
        shared = []
        for config in configs:
            options = {**constexprs, **config.kwargs}
            try:
                compiled = _compile(kernel, types, options, config, args.arch)
            except Exception as exc:  # report every failing build, not just the first
                failures += 1
                print(f"FAIL {label} {config}: {type(exc).__name__}: {exc}")
                continue
            shared.append(compiled.metadata.shared)
        fitting = sum(s <= H100_SHARED_BYTES for s in shared)
        if shared and not fitting:
            failures += 1
            print(f"FAIL {label}: no config fits in {H100_SHARED_BYTES} bytes of shared memory")
        print(f"ok   {label}: {len(shared)}/{len(configs)} configs built, shared bytes {shared}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
