"""Helper of bench/gpu_checks.sh: the environment report before the stages, the summary after.

    python bench/gpu_report.py env --commit HASH [--json OUT/env.json]
    python bench/gpu_report.py summary OUT_DIR [--stages STAGES_TSV]
    python bench/gpu_report.py digest

`env` prints the card (nvidia-smi's name via torch), the commit, a digest of the tree's Python
files, and for every requirement of setup.py (install_requires + the test/torchao/triton extras)
the installed version and whether it satisfies the pin, then imports the modules the benchmarks
and tests need (one line each: ok, or the error). It needs no GPU and no torch: what is missing is
reported, not raised. Exit status 0 always; the caller reads the lines.

`summary` reads the stage table (name, status, seconds, limit per line) and what the stages wrote
in OUT_DIR (tests.xml, bench_gpu.json, bench_moe*.json) and prints a short table of the figures
docs/gpu.md records. `digest` prints the tree digest alone.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib
import importlib.metadata as md
import json
import platform
import warnings
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = ("test", "torchao", "triton")
MODULES = ("torch", "triton", "numpy", "hydra", "omegaconf", "megatron.core.datasets.indexed_dataset",
           "torchao.float8", "torchao.prototype.moe_training", "mohge.model.transformer",
           "mohge.model.moe.ragged_triton", "mohge.train.fp8", "mohge.data.synthetic")


def requirements() -> list[str]:
    """setup.py's install_requires and the EXTRAS, read from the file (not executed)."""
    reqs = []
    for node in ast.walk(ast.parse((ROOT / "setup.py").read_text())):
        if isinstance(node, ast.keyword) and node.arg == "install_requires":
            reqs += ast.literal_eval(node.value)
        elif isinstance(node, ast.keyword) and node.arg == "extras_require":
            extras = ast.literal_eval(node.value)
            reqs += [r for e in EXTRAS for r in extras.get(e, [])]
    return reqs


def tree_digest() -> str:
    """sha1 over the tracked-looking Python/YAML files: the same digest here and on the device
    means the same code ran, also where the copy there has no .git."""
    h = hashlib.sha1()
    for folder in ("model", "parallel", "data", "train", "launch", "configs", "bench", "tests"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix in (".py", ".yaml", ".sh") and "__pycache__" not in path.parts:
                h.update(path.relative_to(ROOT).as_posix().encode())
                h.update(path.read_bytes())
    return h.hexdigest()[:12]


def check_requirement(req: str) -> tuple[str, str]:
    """(installed version or '-', 'ok' / 'MISSING' / 'WRONG VERSION (wants ...)')."""
    name = re.split(r"[<>=!~\[; ]", req)[0]
    try:
        version = md.version(name)
    except md.PackageNotFoundError:
        return "-", "MISSING"
    try:
        from packaging.requirements import Requirement
        spec = Requirement(req).specifier
        if spec and not spec.contains(version, prereleases=True):
            return version, f"WRONG VERSION (wants {spec})"
    except ImportError:  # packaging absent: report the version only
        pass
    return version, "ok"


def env(args) -> int:
    report = {"python": platform.python_version(), "executable": sys.executable, "commit": args.commit,
              "tree_digest": tree_digest(), "requirements": {}, "imports": {}}
    print(f"python {report['python']} ({sys.executable}), commit {args.commit}, tree digest {report['tree_digest']}")
    try:
        import torch
        report["torch"] = torch.__version__
        report["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            report["device"] = torch.cuda.get_device_name(0)
            report["capability"] = f"{props.major}.{props.minor}"
            report["gpu_mem_gib"] = round(props.total_memory / 2**30, 1)
            report["sms"] = props.multi_processor_count
        else:
            report["device"] = "no CUDA device visible to torch"
        print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), device: {report['device']}"
              + (f", sm_{report['capability'].replace('.', '')}, {report['gpu_mem_gib']} GiB, "
                 f"{report['sms']} SMs" if "capability" in report else ""))
    except ImportError as err:
        report["device"] = f"torch not importable: {err}"
        print(report["device"])
    for req in dict.fromkeys(requirements()):
        version, state = check_requirement(req)
        report["requirements"][req] = {"version": version, "state": state}
        print(f"  requirement {req:<28} {version:<14} {state}")
    for module in MODULES:
        try:
            with warnings.catch_warnings():  # megatron-core warns about absent TE/apex at import
                warnings.simplefilter("ignore")
                mod = importlib.import_module(module)
            where = getattr(mod, "__file__", None) or "namespace"
            state = "ok" + (f" ({where})" if module.startswith("mohge.") else "")
        except Exception as err:  # noqa: BLE001 - report every import, not only the first failure
            state = f"FAILED: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        report["imports"][module] = state
        print(f"  import {module:<42} {state}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def summary(args) -> int:
    out = Path(args.out_dir)
    if args.stages and Path(args.stages).exists():
        print(f"== {'stage':<20}{'status':<14}{'seconds':>8}{'limit':>7}")
        for line in Path(args.stages).read_text().splitlines():
            name, status, seconds, limit = line.split("\t")
            print(f"  {name:<22}{status:<14}{seconds:>8}{limit:>7}")
    envj = _load(out / "env.json") or {}
    tests = out / "tests.xml"
    if tests.exists():
        try:
            import xml.etree.ElementTree as ET
            suite = ET.parse(tests).getroot()
            suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
            n, skipped = int(suite.get("tests", 0)), int(suite.get("skipped", 0))
            failed = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
            print(f"== GPU tests: {n - skipped - failed} passed, {failed} failed, {skipped} skipped"
                  + ("  !! skipped: torch saw no CUDA device" if skipped and "capability" not in envj else ""))
            for case in suite.iter("testcase"):
                if case.find("failure") is not None or case.find("error") is not None:
                    print(f"  !! failed: {case.get('classname')}::{case.get('name')}")
        except (ET.ParseError, AttributeError, ValueError) as err:
            print(f"== GPU tests: {tests} unreadable ({err})")
    if envj:
        print(f"== {envj.get('device')}, torch {envj.get('torch')}, commit {envj.get('commit')}, "
              f"tree {envj.get('tree_digest')}")
        bad = {k: v["state"] for k, v in envj.get("requirements", {}).items() if v["state"] != "ok"}
        bad.update({k: v for k, v in envj.get("imports", {}).items() if not v.startswith("ok")})
        for k, v in bad.items():
            print(f"  !! {k}: {v}")
    gpu = _load(out / "bench_gpu.json")
    if gpu:
        print("== bench_gpu.py: grouped GEMM vs loop (fwd+bwd, bf16)")
        for r in gpu.get("grouped_gemm", []):
            print(f"  width {r['width']:>5}  loop {r['loop_ms']:.3f} ms  grouped {r['grouped_ms']:.3f} ms  "
                  f"x{r['speedup']:.2f}  {r['grouped_tflops']:.1f} TFLOP/s  rel err {r['rel_err']:.1e}")
        print("== bench_gpu.py: training throughput")
        for name, r in gpu.get("throughput", {}).items():
            mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
            share = f"  experts fwd {r['expert_fwd_share']:.1%}" if r.get("expert_fwd_share") is not None else ""
            print(f"  {name:<28} {r['tokens_per_s']:>9.0f} tok/s  {r['tflops']:6.1f} TFLOP/s  MFU {mfu:>6}  "
                  f"{r['peak_mem_gb']:.1f} GB{share}")
        for name, s in gpu.get("stability", {}).get("summary", {}).items():
            print(f"  stability {name:<28} {s['first']:.3f} -> {s['last']:.3f}  max rel dev vs loop "
                  f"{s['max_rel_dev_vs_loop']:.2e}")
    for fname in ("bench_moe.json", "bench_moe_compiled.json"):
        moe = _load(out / fname)
        if not moe:
            continue
        print(f"== {fname}: d_model {moe['d_model']}, tokens {moe['tokens']}, {moe['repeats']} repeats")
        for r in moe.get("rows", []):
            print(f"  {r['module']:<6}{r['model']:<6}{r['experts']:<8}{'compiled' if r['compiled'] else 'eager':<9}"
                  f"{r['tokens_per_s']:>10.0f} tok/s  {r['ms']:8.2f} ms  vs moe {r['vs_moe']:.2f}  "
                  f"syncs {r['host_syncs'] if r['host_syncs'] is not None else '-'}")
        for r in moe.get("loss_rows", []):
            print(f"  loss {r['path']:<16}{r['ms']:8.2f} ms  peak {r['peak_mb']:.0f} MB")
    files = sorted(p.name for p in out.iterdir() if p.is_file())
    print(f"== {len(files)} files in {out}: {' '.join(files)}")
    if len(files) > 8:
        print("  !! more than 8 files: the device tool brings back at most 8")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("env", help="environment and requirement report")
    e.add_argument("--commit", default="unknown")
    e.add_argument("--json", default="")
    s = sub.add_parser("summary", help="short table of the stages and figures in OUT_DIR")
    s.add_argument("out_dir")
    s.add_argument("--stages", default="", help="the stage table gpu_checks.sh wrote (tab-separated)")
    sub.add_parser("digest", help="the tree digest alone")
    args = p.parse_args(argv)
    if args.cmd == "digest":
        print(tree_digest())
        return 0
    return env(args) if args.cmd == "env" else summary(args)


if __name__ == "__main__":
    raise SystemExit(main())
