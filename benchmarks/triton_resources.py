"""Triton resources of our Pallas kernels, compiled offline for an H100 (sm_90a): no GPU needed.

    python benchmarks/triton_resources.py                      # every kernel, head dims 64,128, bf16 and float32
    python benchmarks/triton_resources.py --kernels flash --head-dims 64 --dtypes bfloat16 --num-warps 4
    python benchmarks/triton_resources.py --num-warps 4,8 --segments --keep-ir /tmp/ttir

For each kernel family (``flash``: `softmax.flash.flash_attention`; ``linear``:
`recurrent.linear_pallas.pallas_causal_sums`; ``delta``: `recurrent.delta_pallas.pallas_delta`), head dim and dtype, the
forward and backward are traced and lowered for CUDA under an abstract H100 (as `tests/cases.py`'s ``lower_for_gpu``).
Each ``xla.gpu.triton`` custom call of the lowered module is a kernel, found by its ``name`` (no fixed count): its
Triton IR (MLIR bytecode from jaxlib's Triton) is printed as text with jaxlib's MLIR bindings, which pip Triton parses,
and compiled by pip Triton's NVIDIA backend (TTIR -> TTGIR -> LLVM IR -> PTX -> ptxas cubin) once per ``--num-warps``,
each in a subprocess under ``--timeout`` seconds. Reported per row: registers per thread, spill stores/loads and stack
frame (local memory) from ``ptxas -v``, shared memory from Triton's metadata, compile seconds, an estimate of programs
per SM, and in ``note`` a failure, a timeout, ptxas's warning that wgmma is serialized for lack of registers, or that
the TTIR is the same as another row's. Block sizes are the kernels' defaults unless ``--block``/``--block-v`` say
otherwise; the launch's own num_warps is marked ``*``.

Needs ``pip install triton`` (3.9 tested; not a project dependency): without it the script prints one line and
exits 2. Tables go to benchmarks/results/triton-resources-sm90.{md,json} (``--name`` to change). The numbers are
pip Triton's and its ptxas's, not XLA's bundled Triton's: close, not identical, to what a GPU run compiles.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CALL_TARGET = "__gpu$xla.gpu.triton"
H100 = dict(device_kind="NVIDIA H100 80GB HBM3", platform="gpu", num_cores=132)
SM90_REGISTERS = 65536  # 32-bit registers per SM
SM90_SHARED = 228 * 1024  # shared memory per SM (227 KiB usable per block, 1 KiB reserved per block)
SM90_WARPS = 64  # resident warps per SM
FAMILIES = ("flash", "linear", "delta")
PTXAS_WARNINGS = {  # ptxas's "Potential Performance Loss" codes, shortened
    "C7511": "wgmma serialized: too few registers",
    "C7512": "wgmma serialized: too few registers for the function",
    "C7515": "wgmma serialized: accumulator written between wgmmas",
}
COLUMNS = ["kernel", "head_dim", "dtype", "num_warps", "regs", "spill_st_B", "spill_ld_B", "stack_B", "smem_KiB",
           "CTAs_per_SM", "compile_s", "grid", "note"]


# -- arguments --------------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernels", default=",".join(FAMILIES), help="families: flash,linear,delta")
    p.add_argument("--head-dims", default="64,128", help="head dims (query/key and value alike)")
    p.add_argument("--dtypes", default="bfloat16,float32", help="input dtypes")
    p.add_argument("--num-warps", default="4,8", help="num_warps values to compile each kernel with")
    p.add_argument("--num-stages", type=int, default=None, help="override the launch's num_stages (default: its own)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=None, help="kv heads (default: --heads, MHA)")
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--segments", action="store_true", help="packed segment ids (flash: causal + segments)")
    p.add_argument("--block", type=int, default=None,
                   help="block size (flash: block_q = block_kv; linear, delta: block); default: the kernels'")
    p.add_argument("--block-v", type=int, default=None, help="value tile of linear and delta; default: the kernels'")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per compile")
    p.add_argument("--keep-ir", default=None, help="folder to keep each kernel's <name>.ttir (text) in")
    p.add_argument("--name", default="triton-resources-sm90", help="result file stem under benchmarks/results")
    p.add_argument("--compile-one", default=None, help=argparse.SUPPRESS)  # worker mode: a .ttir path
    args = p.parse_args(argv)
    args.kernels = _split(args.kernels, str)
    args.head_dims = _split(args.head_dims, int)
    args.dtypes = _split(args.dtypes, str)
    args.num_warps = _split(args.num_warps, int)
    bad = [k for k in args.kernels if k not in FAMILIES]
    if bad:
        p.error(f"--kernels: unknown {bad}; choose from {','.join(FAMILIES)}")
    if any(w < 1 or w & (w - 1) for w in args.num_warps):
        p.error(f"--num-warps must be powers of two, got {args.num_warps}")
    return args


def _split(text: str, kind):
    return [kind(x) for x in text.split(",") if x.strip()]


# -- worker: compile one TTIR file with pip Triton (runs in a subprocess) ---------------------------------------------
def compile_ttir(path: str, num_warps: int, num_stages: int) -> dict:
    """Compile the TTIR text at ``path`` for sm_90a through every stage of pip Triton's NVIDIA backend; return
    registers, spills, stack, shared memory, seconds and ptxas's performance warnings."""
    from triton import knobs
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget, Language
    from triton.compiler.compiler import make_backend

    target = GPUTarget("cuda", 90, 32)
    start = time.perf_counter()
    backend = make_backend(target)
    options = backend.parse_options({"num_warps": num_warps, "num_stages": num_stages})
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    module = ir.parse_mlir_module(path, context)
    module.context = context
    stages: dict = {}
    backend.add_stages(stages, options, Language.TRITON)
    metadata = {"target": target, **options.__dict__}
    knobs.nvidia.dump_ptxas_log = True  # make_cubin prints ptxas -v's log: caught below
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        for stage in stages.values():  # ttir (its passes too: XLA runs them), ttgir, llir, ptx, cubin
            module = stage(module, metadata)
    seconds = time.perf_counter() - start
    return {**parse_ptxas_log(log.getvalue()), "smem": metadata.get("shared"), "seconds": seconds}


def parse_ptxas_log(log: str) -> dict:
    """Registers, spill stores/loads, stack frame bytes and performance warnings from ``ptxas -v``'s log."""
    regs = re.search(r"Used (\d+) registers", log)
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None:
        raise RuntimeError(f"no 'Used N registers' line in ptxas's log: {log.strip()[:300]!r}")
    codes = sorted(set(re.findall(r"\((C\d+)\) Potential Performance Loss", log)))
    return {"regs": int(regs.group(1)), "stack": int(frame.group(1)) if frame else 0,
            "spill_st": int(frame.group(2)) if frame else 0, "spill_ld": int(frame.group(3)) if frame else 0,
            "warnings": [f"{PTXAS_WARNINGS.get(code, 'performance loss')} ({code})" for code in codes]}


def worker_main(path: str, num_warps: int, num_stages: int) -> int:
    """``--compile-one``: print one JSON line (the result, or ``{"error": ...}``)."""
    try:
        out = compile_ttir(path, num_warps, num_stages)
    except Exception as e:  # noqa: BLE001 - one line back to the parent, whatever failed
        out = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]}
    print("RESULT " + json.dumps(out), flush=True)
    return 0


def compile_in_subprocess(path: Path, num_warps: int, num_stages: int, timeout: float) -> dict:
    """Run the worker on ``path`` under ``timeout`` seconds (its process group killed when it runs over)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--compile-one", str(path), "--num-warps", str(num_warps),
           "--num-stages", str(num_stages)]
    env = {**os.environ, "TRITON_DEFAULT_FP_FUSION": os.environ.get("TRITON_DEFAULT_FP_FUSION", "1")}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"worker exited {proc.returncode}: {tail[:200]}"}


# -- lowering: the kernels' TTIR from a CUDA lowering on this host ----------------------------------------------------
@dataclasses.dataclass
class Kernel:
    """One ``xla.gpu.triton`` custom call: its name, TTIR text and launch parameters."""

    name: str
    ttir: str
    num_warps: int
    num_stages: int
    grid: tuple[int, int, int]

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.ttir.encode()).hexdigest()[:16]


def family_call(family: str, head_dim: int, dtype: str, args: argparse.Namespace):
    """``(fn, operands)``: a function running ``family``'s kernels forward and backward (interpret=False), and
    abstract operands for it."""
    import jax
    import jax.numpy as jnp

    b, l, h = args.batch, args.length, args.heads
    n = args.kv_heads or h
    g, dt = h // n, jnp.dtype(dtype)
    spec = lambda *shape, d=dt: jax.ShapeDtypeStruct(shape, d)  # noqa: E731
    seg = (jnp.arange(l, dtype=jnp.int32)[None, :] * 3 // l).repeat(b, 0) if args.segments else None
    blocks = {} if args.block is None else {"block": args.block}
    blocks.update({} if args.block_v is None else {"block_v": args.block_v})
    if family == "flash":
        from flaxformer_lite.attention import Mask
        from flaxformer_lite.attention.checks import check_mask, check_qkv
        from flaxformer_lite.attention.softmax import flash

        mask = Mask(causal=True, q_segment_ids=seg, kv_segment_ids=seg) if seg is not None else Mask(causal=True)
        sizes = {} if args.block is None else {"block_q": args.block, "block_kv": args.block}

        def attend(q, k, v):
            dims = check_qkv(q, k, v)
            return flash.flash_attention(q, k, v, dims=dims, mask=check_mask(mask, dims), scale=head_dim ** -0.5,
                                         interpret=False, **sizes)
        return _with_grads(attend, 3), (spec(b, l, h, head_dim), spec(b, l, n, head_dim), spec(b, l, n, head_dim))
    if family == "linear":
        from flaxformer_lite.attention.recurrent.linear_pallas import pallas_causal_sums

        def sums(qf, kf, v, log_decay):
            num, den = pallas_causal_sums(qf, kf, v, seg, log_decay, interpret=False, **blocks)
            return num.sum() + den.sum()
        return _with_grads(sums, 4, reduce=False), (spec(b, l, n, g, head_dim), spec(b, l, n, head_dim),
                                                    spec(b, l, n, head_dim), spec(b, l, n, d=jnp.float32))
    if family == "delta":
        from flaxformer_lite.attention.recurrent.delta_pallas import pallas_delta

        def rule(q, k, v, beta, log_decay):
            out, state = pallas_delta(q, k, v, beta, seg, log_decay, interpret=False, **blocks)
            return out.sum() + state.sum()
        f32 = jnp.float32
        return _with_grads(rule, 5, reduce=False), (spec(b, l, n, g, head_dim), spec(b, l, n, head_dim),
                                                    spec(b, l, n, head_dim), spec(b, l, n, d=f32),
                                                    spec(b, l, n, d=f32))
    raise ValueError(f"unknown kernel family {family!r}")


def _with_grads(fn, arity: int, reduce: bool = True):
    """A jitted function of ``arity`` arrays returning ``fn``'s value and its gradients (``reduce``: ``fn`` returns
    an array, summed first)."""
    import jax

    loss = (lambda *xs: fn(*xs).astype("float32").sum()) if reduce else fn
    return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(arity))))


def lower_for_cuda(jitted, *operands):
    """``jitted.trace(*operands).lower(...)`` for CUDA under an abstract H100 (tests/cases.py's ``lower_for_gpu``,
    keeping the `Lowered` instead of its text)."""
    import jax

    device = jax.sharding.AbstractDevice(**H100)
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=device)):
        return jitted.trace(*operands).lower(lowering_platforms=("cuda",))


def triton_kernels(lowered) -> list[Kernel]:
    """Every ``xla.gpu.triton`` custom call of a lowered module, in module order, TTIR printed as text (one entry per
    distinct (name, TTIR); a name seen with another TTIR gets ``#2``, ``#3``...)."""
    from jax._src.lib.mlir import ir

    module = lowered.compiler_ir("stablehlo")
    found: list[Kernel] = []
    for op in _walk(module.operation):
        if op.name != "stablehlo.custom_call":
            continue
        if ir.StringAttr(op.attributes["call_target_name"]).value != CALL_TARGET:
            continue
        config = op.attributes["mhlo.backend_config"]  # a dict: name, ir (bytecode), num_warps, grid_x...
        number = lambda key: ir.IntegerAttr(config[key]).value  # noqa: E731
        kernel = Kernel(name=ir.StringAttr(config["name"]).value,
                        ttir=bytecode_to_text(ir.StringAttr(config["ir"]).value_bytes),
                        num_warps=number("num_warps"), num_stages=number("num_stages"),
                        grid=tuple(number(f"grid_{axis}") for axis in "xyz"))
        same = [k for k in found if k.name.split("#")[0] == kernel.name]
        if any(k.digest == kernel.digest for k in same):
            continue
        if same:
            kernel.name = f"{kernel.name}#{len(same) + 1}"
        found.append(kernel)
    return found


def _walk(op):
    yield op
    for region in op.regions:
        for block in region.blocks:
            for child in block.operations:
                yield from _walk(child.operation)


def bytecode_to_text(bytecode: bytes) -> str:
    """jaxlib's Triton MLIR bytecode as text (pip Triton misreads the bytecode of another MLIR version; the text
    parses)."""
    from jax._src.interpreters import mlir as jax_mlir
    from jax._src.lib.mlir import ir
    from jaxlib.triton import dialect as tt_dialect

    context = jax_mlir.make_ir_context()
    tt_dialect.register_dialect(context)
    with context:
        return ir.Module.parse(bytecode).operation.get_asm(enable_debug_info=False)


# -- rows -------------------------------------------------------------------------------------------------------------
def ctas_per_sm(regs: int, smem: int, num_warps: int) -> int:
    """Programs resident per SM on sm_90 by registers (allocated per warp in units of 256), shared memory (1 KiB
    reserved per program) and warps: an estimate of occupancy."""
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = SM90_REGISTERS // (per_warp * num_warps)
    by_smem = SM90_SHARED // (smem + 1024)
    return min(by_regs, by_smem, SM90_WARPS // num_warps, 32)


def result_row(kernel: Kernel, head_dim: int, dtype: str, num_warps: int, res: dict, note: str) -> dict:
    row = {"kernel": kernel.name, "head_dim": head_dim, "dtype": dtype,
           "num_warps": f"{num_warps}*" if num_warps == kernel.num_warps else str(num_warps),
           "grid": "x".join(map(str, kernel.grid))}
    notes = [note] if note else []
    if "error" in res:
        return {**row, "note": "; ".join([f"FAILED: {res['error']}", *notes])}
    row.update(regs=res["regs"], spill_st_B=res["spill_st"], spill_ld_B=res["spill_ld"], stack_B=res["stack"],
               smem_KiB=round(res["smem"] / 1024, 1), compile_s=round(res["seconds"], 1),
               CTAs_per_SM=ctas_per_sm(res["regs"], res["smem"], num_warps))
    if res["regs"] <= 32 and res["spill_st"]:
        notes.append("ptxas fell back to 32 registers: nearly everything spilled")
    notes += res["warnings"]
    return {**row, "note": "; ".join(notes)}


def run(args: argparse.Namespace, ir_dir: Path) -> list[dict]:
    """Lower each (family, head dim, dtype), compile each kernel at each num_warps; rows as they come."""
    from harness import console, write_tables

    rows: list[dict] = []
    seen: dict[tuple, tuple[dict, str]] = {}  # (TTIR digest, warps, stages) -> (result, where it was compiled)
    for family in args.kernels:
        for head_dim in args.head_dims:
            for dtype in args.dtypes:
                case = f"{family} d={head_dim} {dtype}"
                try:
                    start = time.perf_counter()
                    fn, operands = family_call(family, head_dim, dtype, args)
                    kernels = triton_kernels(lower_for_cuda(fn, *operands))
                    console.print(f"[bold]{case}[/]: lowered in {time.perf_counter() - start:.1f} s: "
                                  f"{', '.join(k.name for k in kernels) or 'no Triton kernel'}")
                except Exception as e:  # noqa: BLE001 - one row says what failed, the rest go on
                    msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:200]
                    console.print(f"[red]{case}: lowering failed: {msg}[/]")
                    rows.append({"kernel": family, "head_dim": head_dim, "dtype": dtype,
                                 "note": f"LOWERING FAILED: {msg}"})
                    continue
                for kernel in kernels:
                    path = ir_dir / f"{family}-d{head_dim}-{dtype}" / f"{kernel.name.replace('#', '_')}.ttir"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(kernel.ttir)
                    stages = args.num_stages or kernel.num_stages
                    for warps in args.num_warps:
                        key = (kernel.digest, warps, stages)
                        if key in seen:
                            res, where = seen[key]
                            note = f"same TTIR as {where}"
                        else:
                            res, note = compile_in_subprocess(path, warps, stages, args.timeout), ""
                            seen[key] = (res, f"{dtype} d={head_dim}")
                        row = result_row(kernel, head_dim, dtype, warps, res, note)
                        console.print(_one_line(row))
                        rows.append(row)
                        write_tables(args.name, TITLE, COLUMNS, rows, notes(args))
    return rows


def _one_line(row: dict) -> str:
    return "  " + ", ".join(f"{k}={row[k]}" for k in COLUMNS if row.get(k) not in (None, ""))


TITLE = "Triton resources of the Pallas kernels, compiled offline for sm_90a (H100)"


def notes(args: argparse.Namespace) -> list[str]:
    import triton

    kv = args.kv_heads or args.heads
    return [
        f"Command: python benchmarks/triton_resources.py {' '.join(sys.argv[1:])}".rstrip(),
        f"Shapes: batch {args.batch}, length {args.length}, {args.heads} query heads, {kv} kv heads; flash causal"
        f"{' with packed segments' if args.segments else ''}; linear and delta with a per-token log decay"
        f"{' and packed segments' if args.segments else ''}; {_blocks_note(args)}.",
        f"Compiled by pip triton {triton.__version__} ({_ptxas_version()}, `-v`) for sm_90a, num_stages as launched; "
        f"`*` marks the launch's own num_warps. TTIR from jaxlib's Triton (jax lowering for CUDA, no GPU).",
        "regs: registers per thread (255 is the ceiling); spill_st_B/spill_ld_B: bytes of spill stores/loads per "
        "thread (local memory); stack_B: stack frame; smem_KiB: Triton's shared memory; CTAs_per_SM: programs "
        "resident per SM by registers, shared memory and warps (estimate); compile_s: TTIR to cubin.",
        "note: C7511/C7515 are ptxas's 'Potential Performance Loss' warnings: it serialized the wgmma (Hopper "
        "tensor core) pipeline, for lack of registers (C7511, C7512) or because other instructions write a wgmma's "
        "accumulator inside the pipeline stage (C7515).",
    ]


def _ptxas_version() -> str:
    """The release of the ptxas pip Triton runs for sm_90, e.g. 'ptxas 13.4'."""
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        text = subprocess.run([get_ptxas(90).path, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return f"ptxas version unknown: {e}"
    found = re.search(r"release (\d+\.\d+)", text)
    return f"ptxas {found.group(1)}" if found else "ptxas version unknown"


def _blocks_note(args: argparse.Namespace) -> str:
    if args.block is None and args.block_v is None:
        return "block sizes the kernels' defaults"
    parts = [] if args.block is None else [f"block {args.block} (flash: block_q = block_kv, clipped as the kernels "
                                           "clip them; the backward uses at most 64)"]
    parts += [] if args.block_v is None else [f"value tile {args.block_v} (linear, delta)"]
    return ", ".join(parts)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.compile_one:
        return worker_main(args.compile_one, args.num_warps[0], args.num_stages or 2)
    try:
        import triton  # noqa: F401
    except ImportError:
        print("triton_resources: pip triton is not installed (pip install triton==3.9.0); nothing compiled",
              file=sys.stderr)
        return 2
    from harness import RESULTS_DIR, show_and_write

    with contextlib.ExitStack() as stack:
        ir_dir = Path(args.keep_ir) if args.keep_ir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        rows = run(args, ir_dir)
    show_and_write(args.name, TITLE, COLUMNS, rows, notes(args))
    print(f"wrote {RESULTS_DIR / args.name}.md and .json")
    return 0 if rows and all("FAILED" not in str(r.get("note", "")) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
