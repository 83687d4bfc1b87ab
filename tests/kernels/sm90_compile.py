"""Compile every cage_kernels Triton kernel for an H100 (sm_90a) on a machine without a GPU.

The interpreter runs kernels as numpy and accepts code the compiler rejects (e.g. a
reassigned tl.constexpr); this compiles the real kernels, with the launchers' tile and warp
settings, through Triton's bundled ptxas, and prints each kernel's register and stack use
(STACK > 0 = register spills to local memory), its static SASS instruction count, and the
floating-point operations that Triton's layout pass duplicated: when two stores want
different register layouts, the compiler may recompute a whole chain in each layout
instead of converting once (that doubled the activation kernel's grid arithmetic). Run
without TRITON_INTERPRET (test_sm90_compile.py does):

    .venv/bin/python tests/kernels/sm90_compile.py
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import tempfile

import cage_kernels.cage_adamw_triton as adamw
import cage_kernels.dequant_triton as dequant
import cage_kernels.hadamard_triton as hadamard
import cage_kernels.pack_triton as pack
import cage_kernels.quest_triton as quest
import torch
import triton
from cage_kernels.cage_adamw_chunked_triton import _cage_adamw_chunked_kernel as chunked_kernel
from cage_kernels.triton_lib import launch_opts, reduction_rows, tree_opts
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGET = GPUTarget("cuda", 90, 32)
F32 = "fp32"


FLOAT_OP = re.compile(r"= (arith\.\w+f|math\.\w+|tt\.clampf|tt\.precise_\w+) ")


def float_ops(ir: str) -> collections.Counter:
    """Floating-point operations of a Triton IR text, by name."""
    return collections.Counter(m.group(1) for m in FLOAT_OP.finditer(ir))


def duplicated_float_ops(kernel) -> int:
    """Float ops in the layout-assigned IR (ttgir) beyond those of the source IR (ttir)."""
    before, after = float_ops(kernel.asm["ttir"]), float_ops(kernel.asm["ttgir"])
    return sum((after - before).values())


def compile_one(
    name: str, fn, types: dict[str, str], consts: dict, tile: int, max_registers: int | None = None
) -> dict:
    """Compile fn with pointer/scalar types and constexprs (and ptxas's register cap, where
    the launcher sets one); print and return its resource line, static SASS instruction
    count, duplicated float ops and global memory instructions (LDG / STG with their width)."""
    names = fn.arg_names
    signature = {n: ("constexpr" if n in consts else types[n]) for n in names}
    constexprs = {(names.index(k),): v for k, v in consts.items()}
    opts = launch_opts(tile)
    if max_registers is not None:
        opts["maxnreg"] = max_registers
    # As on the device, where torch's pointers are 16-byte aligned and Triton specialises
    # integer arguments divisible by 16 (the common shapes): that fixes the access widths.
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if n not in consts and (types[n].startswith("*") or types[n] == "i32")}  # fmt: skip
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(source, target=TARGET, options=opts)
    tools = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin")
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    res = subprocess.run([f"{tools}/cuobjdump", "-res-usage", f.name], capture_output=True,
                         text=True)  # fmt: skip
    sass = subprocess.run([f"{tools}/nvdisasm", "-c", f.name], capture_output=True, text=True)
    os.unlink(f.name)
    usage = next((line.strip() for line in res.stdout.splitlines() if "REG:" in line), "?")
    instructions = len(re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+\S", sass.stdout, re.M))
    dup = duplicated_float_ops(kernel)
    globals_ = collections.Counter(re.findall(r"\b((?:LDG|STG)\.[.\w]+)", sass.stdout))
    mem = ",".join(f"{op}x{n}" for op, n in sorted(globals_.items()))
    line = f"{name:40} warps={opts['num_warps']:2} sass={instructions:5} dup={dup:2} {usage}"
    print(f"{line} global={mem}", flush=True)
    return {"name": name, "usage": usage, "dup": dup, "global": globals_}


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: this compiles the kernels")
    compiled = []
    qt = dict(x_ptr="*bf16", sumsq_ptr="*fp32", values_ptr="*bf16", codes_ptr="*u8",
              step_ptr="*fp32", mask_ptr="*u8", rows="i32", n="i32", alpha=F32, hscale=F32,
              levels_m1=F32)  # fmt: skip
    for width in (512, 4096, 8192):
        r = reduction_rows(quest.rows_per_program(width, 1 << 20))
        log_n = width.bit_length() - 1
        for pack_mode in (False, True):
            c = dict(R=r, N=width, LOG_N=log_n, **tree_opts(width, 2), LOG_B=7, VEC=8,
                     BITS=3 if pack_mode else 0, ROTATE=True, STATS=1, MASK_RULE=0,
                     PACK=pack_mode, WRITE_CODES=True)  # fmt: skip
            compiled.append(compile_one(f"quest N={width} pack={pack_mode}",
                                      quest._quest_rows_kernel, qt, c, r * width))  # fmt: skip
    # The device specialises an integer argument equal to 1 into a constant (no .to() then).
    r = reduction_rows(quest.rows_per_program(1, 1 << 20))
    c = dict(n=1, R=r, N=1, LOG_N=0, **tree_opts(1, 2), LOG_B=0, VEC=1, BITS=0, ROTATE=True,
             STATS=1, MASK_RULE=0, PACK=False, WRITE_CODES=True)  # fmt: skip
    compiled.append(compile_one("quest n=1", quest._quest_rows_kernel, qt, c, r))
    ht = dict(x_ptr="*bf16", mask_ptr="*u8", y_ptr="*bf16", rows="i32", n="i32", hscale=F32)
    compiled.append(compile_one("fwht masked W=2048", hadamard._fwht_kernel, ht,
                              dict(R=2, W=2048, LOG_B=7, HAS_MASK=True), 4096))  # fmt: skip
    for bits in (3, 4):
        compiled.append(compile_one(f"pack {bits}-bit", pack._pack_kernel,
                                  dict(codes_ptr="*u8", out_ptr="*u8", n_codes="i32"),
                                  dict(G=128, BITS=bits), 1024))  # fmt: skip
        compiled.append(compile_one(f"unpack {bits}-bit", pack._unpack_kernel,
                                  dict(packed_ptr="*u8", out_ptr="*u8", n_codes="i32",
                                       n_bytes="i32"), dict(G=128, BITS=bits), 1024))  # fmt: skip
    compiled.append(compile_one("dequantize", dequant._dequant_kernel,
                              dict(codes_ptr="*u8", step_ptr="*fp32", out_ptr="*bf16", rows="i32",
                                   n="i32", half=F32), dict(R=2, W=2048), 4096))  # fmt: skip
    at = dict(p_ptr="*fp32", g_ptr="*fp32", m_ptr="*fp32", v_ptr="*fp32", q_ptr="*bf16",
              mask_ptr="*u8", mask_in_ptr="*u8", table_ptr="*i64", tiles_ptr="*i64",
              alpha_ptr="*fp32", n_tiles="i32")  # fmt: skip
    for scalar in ("decay", "w1", "c2", "beta2", "bias2_sqrt", "inv_bias2_sqrt", "eps",
                   "step_size", "lam", "neg_lr_lam", "hscale"):  # fmt: skip
        at[scalar] = F32
    for width in (2048, 8192):
        r = adamw.rows_per_tile(width)
        # The default schedule at each width; at 2048 also the STE mask given (mask_in), and
        # programs that loop over tiles with the next tile's loads pipelined
        # (Schedule(stages=2): cp.async into shared memory).
        cases = [(False, True, False, 1), (True, True, False, 1), (False, False, False, 1)]
        extra = [(False, True, True, 1), (False, True, False, 2)] * (width == 2048)
        for coupled, update, mask_in, stages in cases + extra:
            c = dict(R=r, N=width, LOG_N=width.bit_length() - 1, **tree_opts(width, 4), LOG_B=7,
                     NCOL=7, STE_FLAG=1, MASK_RULE=0, COUPLED=coupled,
                     DECOUPLED=update and not coupled, HAS_Q=True, HAS_MASK=update,
                     HAS_MASK_IN=mask_in, UPDATE=update, ALIGNED=True, LOOP=stages > 1,
                     STAGES=stages)  # fmt: skip
            name = f"cage_adamw N={width} coupled={coupled} update={update}"
            name += " mask_in" * mask_in + f" stages={stages}" * (stages > 1)
            regs = adamw.default_schedule(torch.device("cuda"), 1, width).max_registers
            name += f" regs<={regs}" * (regs is not None)
            compiled.append(compile_one(name, adamw._cage_adamw_kernel, at, c, r * width, regs))
    # Rows in chunks (Schedule.chunks; kernel_tuning.md, section 9): 8 elements a thread and
    # chunk at 8192 (2 chunks) and 16384 (4, the padded width of 14336), with the 80-register
    # cap that the whole-row step takes where a thread holds 8 elements, and at 8192 without.
    chunked = [(8192, 2, False, True, 80), (8192, 2, True, True, 80), (8192, 2, False, False, 80),
               (8192, 2, False, True, None), (16384, 4, False, True, 80)]  # fmt: skip
    for width, chunks, coupled, update, regs in chunked:
        r = adamw.rows_per_tile(width)
        c = dict(R=r, N=width, LOG_N=width.bit_length() - 1, **tree_opts(width, 4),
                 LOG_K=chunks.bit_length() - 1, LOG_B=7, NCOL=7, STE_FLAG=1, MASK_RULE=0,
                 COUPLED=coupled, DECOUPLED=update and not coupled, HAS_Q=True,
                 HAS_MASK=update, HAS_MASK_IN=False, UPDATE=update, ALIGNED=True)  # fmt: skip
        name = f"cage_adamw chunks={chunks} N={width} coupled={coupled} update={update}"
        name += f" regs<={regs}" * (regs is not None)
        compiled.append(compile_one(name, chunked_kernel, at, c, r * width, regs))
    spilled = [k for k in compiled if "STACK:0 " not in k["usage"]]
    print(f"{len(compiled)} kernels compiled for sm_90a, {len(spilled)} with a stack frame")
    byte_wise = [k["name"] for k in compiled if "4-bit" in k["name"]
                 and {"LDG.E.U8", "STG.E.U8"} & set(k["global"])]  # fmt: skip
    print("4-bit pack / unpack with byte-wise global accesses:", ", ".join(byte_wise) or "none")
    print("duplicated float ops in:", ", ".join(k["name"] for k in compiled if k["dup"]) or "none")
    return 0


if __name__ == "__main__":
    sys.exit(main())
