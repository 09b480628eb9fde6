"""Read the CSVs bench/profile.sh keeps (`ncu --import X.ncu-rep --csv --page raw --print-units base`) and write
summary.txt: per kernel its time, achieved FLOP/s, achieved vs theoretical occupancy, DRAM throughput as a
fraction of peak, tensor-pipe use and the top 3 stall reasons; per case our own flop count over the summed time.

    python -m bench.profile_summary --dir RUN [--status RUN/status.tsv] [--note "..."] [--out RUN/summary.txt]

Where the numbers come from (a missing metric is named as missing, never guessed):
  FLOP/s   from ncu's instruction counts over gpu__time_duration.sum: SIMT float32 = 2·FFMA + FADD + FMUL
           (smsp__sass_thread_inst_executed_op_{ffma,fadd,fmul}_pred_on.sum, thread instructions, as ncu's
           roofline counts them); tensor = smsp__inst_executed_pipe_tensor_op_hmma.sum × 4096, the flops of one
           warp's mma.sync.m16n8k16 (2·16·8·16; kernels/tensor_core.cuh: every bf16/fp16 MMA of ours has that
           shape, each one HMMA.16816 instruction). Per case, beside them: our own flop count of the step
           (bench/profile_step.py MODEL_FLOPS) over the summed duration of the kernels profiled.
  occupancy  sm__warps_active.avg.pct_of_peak_sustained_active (achieved) vs sm__maximum_warps_per_active_cycle_pct
           (theoretical), both % of the SM's warp slots.
  DRAM     dram__throughput.avg.pct_of_peak_sustained_elapsed (% of peak), dram__bytes.sum.
  stalls   smsp__average_warps_issue_stalled_<reason>_per_issue_active.ratio (WarpStateStats: warps stalled for
           the reason per issued instruction), largest three; else the sampled smsp__pcsamp_warps_issue_stalled_*.

The CSV is checked before it is read: the ID and Kernel Name columns, a units row, the unit each known metric
must have (% for a percentage, a time unit for the duration, ...), numbers where numbers belong and percentages
inside [0, 101]. A CSV that fails the check is reported as unreadable, with the column and why, and the exit
status is 1: a wrong column must not become a plausible number.
"""
import argparse
import csv
import re
import sys
from pathlib import Path

TIME_UNITS = {"nsecond": 1e-9, "ns": 1e-9, "usecond": 1e-6, "us": 1e-6, "msecond": 1e-3, "ms": 1e-3,
              "second": 1.0, "s": 1.0}
BYTE_UNITS = {"byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "Tbyte": 1e12}
COUNT_UNITS = {"", "inst", "warp", "thread"}
TENSOR_FLOPS_PER_HMMA = 2 * 16 * 8 * 16

DURATION = "gpu__time_duration.sum"
FFMA, FADD, FMUL = (f"smsp__sass_thread_inst_executed_op_{op}_pred_on.sum" for op in ("ffma", "fadd", "fmul"))
HMMA = "smsp__inst_executed_pipe_tensor_op_hmma.sum"
TENSOR_PCT = "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active"
OCC_ACHIEVED = "sm__warps_active.avg.pct_of_peak_sustained_active"
OCC_THEORETICAL = "sm__maximum_warps_per_active_cycle_pct"
DRAM_PCT = "dram__throughput.avg.pct_of_peak_sustained_elapsed"
DRAM_BYTES = "dram__bytes.sum"
SM_PCT = "sm__throughput.avg.pct_of_peak_sustained_elapsed"
NAME_COLUMNS = ("Kernel Name", "Function Name", "Name")
STALL_RATIO = re.compile(r"^smsp__average_warps_issue_stalled_(\w+?)_per_issue_active\.ratio$")
STALL_SAMPLED = re.compile(r"^smsp__pcsamp_warps_issue_stalled_(\w+)$")


class ProfileCSVError(ValueError):
    """The CSV is not what `ncu --csv --page raw --print-units base` writes, or a column is not what it claims."""


def _number(text, column):
    t = text.strip().replace(",", "")
    if t in ("", "n/a", "N/A", "-"):
        return None
    try:
        return float(t)
    except ValueError:
        raise ProfileCSVError(f"column {column!r}: {text!r} is not a number") from None


def _expected_units(name):
    if name == DURATION:
        return set(TIME_UNITS)
    if name == DRAM_BYTES:
        return set(BYTE_UNITS)
    if ".pct" in name or name.endswith("_pct"):
        return {"%"}
    if name in (FFMA, FADD, FMUL, HMMA):
        return COUNT_UNITS
    return None


def read_csv(path):
    """[{"id", "name", "grid", "block", metric: float or None, ...}] from one raw-page CSV; ProfileCSVError if
    the file fails the check."""
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r and not r[0].startswith("==")]   # ncu's own ==PROF== lines
    if not rows:
        raise ProfileCSVError(f"{path}: empty (no kernel was profiled?)")
    header = rows[0]
    if "ID" not in header:
        raise ProfileCSVError(f"{path}: no 'ID' column: not ncu's --csv --page raw output")
    name_col = next((c for c in NAME_COLUMNS if c in header), None)
    if name_col is None:
        raise ProfileCSVError(f"{path}: no 'Kernel Name' column (nor {NAME_COLUMNS[1:]}): not ncu's --csv --page raw "
                              "output")
    if len(set(header)) != len(header):
        dup = sorted({h for h in header if header.count(h) > 1})
        raise ProfileCSVError(f"{path}: columns repeated: {dup}")
    if len(rows) < 2 or rows[1][header.index("ID")].strip() != "":
        raise ProfileCSVError(f"{path}: no units row under the header (profile.sh asks for --print-units base)")
    units = dict(zip(header, rows[1]))
    for name, unit in units.items():
        allowed = _expected_units(name)
        if allowed is not None and unit.strip() not in allowed:
            raise ProfileCSVError(f"{path}: column {name!r} has unit {unit!r}, expected one of {sorted(allowed)}")
    kernels = []
    for r in rows[2:]:
        if len(r) != len(header):
            raise ProfileCSVError(f"{path}: a row of {len(r)} fields under a header of {len(header)}")
        rec = dict(zip(header, r))
        k = {"id": rec["ID"], "name": rec[name_col], "grid": rec.get("Grid Size", "?"),
             "block": rec.get("Block Size", "?"), "metrics": {}}
        for name in header:
            if "__" not in name:      # identification columns: ID, Kernel Name, Grid Size, ...
                continue
            unit = units[name].strip()
            if _expected_units(name) is None and not STALL_RATIO.match(name):
                try:                  # a metric we do not read: a number if it is one, else kept as text
                    k["metrics"][name] = _number(rec[name], name)
                except ProfileCSVError:
                    k["metrics"][name] = rec[name]
                continue
            v = _number(rec[name], name)     # a metric we read must be a number (or n/a)
            if v is not None and name == DURATION:
                v *= TIME_UNITS[unit]                      # seconds
            elif v is not None and name == DRAM_BYTES:
                v *= BYTE_UNITS[unit]                      # bytes
            if v is not None and unit == "%" and not (0 <= v <= 101):
                raise ProfileCSVError(f"{path}: column {name!r}: {v} is not a percentage (kernel {k['id']})")
            if v is not None and name == DURATION and v <= 0:
                raise ProfileCSVError(f"{path}: column {name!r}: duration {v} s (kernel {k['id']})")
            k["metrics"][name] = v
        kernels.append(k)
    if not kernels:
        raise ProfileCSVError(f"{path}: a header and units but no kernel rows (no kernel was profiled?)")
    return kernels


def _si(x, unit):
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def _short(name, width=72):
    name = re.sub(r"\(.*$", "", name)          # parameters
    return name if len(name) <= width else name[:width - 3] + "..."


def _missing(*names):
    return "missing (" + ", ".join(n for n in names) + " not in the CSV)"


def flops(m):
    """(flop/s text, flops or None): SIMT from the SASS counts, tensor from the HMMA count."""
    t = m.get(DURATION)
    parts, total, known = [], 0.0, False
    if all(m.get(x) is not None for x in (FFMA, FADD, FMUL)):
        simt = 2 * m[FFMA] + m[FADD] + m[FMUL]
        total += simt
        known = True
        parts.append(f"fp32 SIMT {_si(simt / t, 'FLOP/s') if t else 'n/a (no duration)'}")
    else:
        parts.append("fp32 SIMT " + _missing(*(x for x in (FFMA, FADD, FMUL) if m.get(x) is None)))
    if m.get(HMMA) is not None:
        tc = m[HMMA] * TENSOR_FLOPS_PER_HMMA
        total += tc
        known = True
        parts.append(f"tensor {_si(tc / t, 'FLOP/s') if t else 'n/a (no duration)'}")
    else:
        parts.append("tensor " + _missing(HMMA))
    return "; ".join(parts), (total if known else None)


def stalls(m):
    found = {STALL_RATIO.match(k).group(1): v for k, v in m.items() if STALL_RATIO.match(k) and v is not None}
    how = "warps stalled per issued instruction"
    if not found:
        found = {STALL_SAMPLED.match(k).group(1): v for k, v in m.items()
                 if STALL_SAMPLED.match(k) and isinstance(v, float) and not k.endswith("_not_issued")}
        how = "samples"
    if not found:
        return "missing (no smsp__average_warps_issue_stalled_* or smsp__pcsamp_warps_issue_stalled_* columns)"
    top = sorted(found.items(), key=lambda kv: -kv[1])[:3]
    return ", ".join(f"{k} {v:.3g}" for k, v in top) + f" ({how})"


def _pct(m, name):
    return f"{m[name]:.1f}%" if m.get(name) is not None else _missing(name)


def describe_kernel(k):
    m = k["metrics"]
    t = m.get(DURATION)
    flop_text, _ = flops(m)
    dram = _pct(m, DRAM_PCT) + " of peak"
    if m.get(DRAM_PCT) is None:
        dram = _missing(DRAM_PCT)
    if m.get(DRAM_BYTES) is not None:
        dram += f", {_si(m[DRAM_BYTES], 'B')}"
    lines = [f"  [{k['id']}] {_short(k['name'])}  grid {k['grid']} block {k['block']}  "
             f"{(f'{t * 1e6:.1f} us') if t is not None else 'time ' + _missing(DURATION)}",
             f"      FLOP/s     {flop_text}",
             f"      occupancy  achieved {_pct(m, OCC_ACHIEVED)} vs theoretical {_pct(m, OCC_THEORETICAL)}",
             f"      DRAM       {dram};  SM throughput {_pct(m, SM_PCT)}"]
    if m.get(HMMA):
        lines.append(f"      tensor pipe {_pct(m, TENSOR_PCT)} of peak (active cycles)")
    lines.append(f"      stalls     {stalls(m)}")
    return lines


def describe_case(case, kernels, what, model_flops):
    lines = [f"{case}: {what}: {len(kernels)} kernel(s) profiled"]
    for k in kernels:
        lines += describe_kernel(k)
    times = [k["metrics"].get(DURATION) for k in kernels]
    if model_flops and all(t is not None for t in times):
        total = sum(times)
        lines.append(f"  step: our count {model_flops:.4g} FLOP over the {len(kernels)} kernels' {total * 1e6:.1f} us"
                     f" = {_si(model_flops / total, 'FLOP/s')} (only as complete as the kernel filter: kernels "
                     "it leaves out are not in the time)")
    return lines


def summarize(run_dir, status=None, note=None):
    """(text, ok): the summary of every case CSV in run_dir; ok False when a CSV failed the check."""
    from bench.profile_step import CASES, MODEL_FLOPS
    run_dir = Path(run_dir)
    out, ok = [], True
    if note:
        out.append(note)
    if status and Path(status).exists():
        out.append("case        status   exit  seconds  note")
        for line in Path(status).read_text().splitlines():
            f = line.split("\t") + [""] * 5
            out.append(f"{f[0]:<11} {f[1]:<8} {f[2]:>4}  {f[3]:>7}  {f[4]}")
    found = 0
    for case, (what, _, _) in CASES.items():
        path = run_dir / f"{case}.csv"
        out.append("")
        if not path.exists():
            out.append(f"{case}: {what}: no CSV (nothing was profiled for this case)")
            continue
        found += 1
        try:
            kernels = read_csv(path)
        except ProfileCSVError as exc:
            ok = False
            out.append(f"{case}: {what}: UNREADABLE: {exc}")
            continue
        if "==SYNTHETIC==" in path.read_text()[:4096]:
            what += " [SYNTHETIC FIXTURE: not a measurement]"
        out += describe_case(case, kernels, what, MODEL_FLOPS(case))
    if not found:
        out.append("")
        out.append("no profile: no case CSV in this folder")
    return "\n".join(out) + "\n", ok


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True)
    parser.add_argument("--status")
    parser.add_argument("--note")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    text, ok = summarize(args.dir, args.status, args.note)
    out = Path(args.out or Path(args.dir) / "summary.txt")
    out.write_text(text)
    print(text, end="")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
