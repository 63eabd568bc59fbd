"""The phases of the GPU check (bench/gpu_check.sh sets up the environment and runs this).

Each phase runs its own processes under a time limit, records its status (ok, failed,
timeout), its seconds and its key figures, and never stops the next one. Cheapest first:

  smoke    tiny synthetic model: `generate` at temperature 1.0 and 0, then one streamed chat
           completion through a live `moestream serve` on loopback;
  tests    the device-aware tests (the same tests as on the CPU, on CUDA with Triton compiled);
  kernels  GEMV / GEMM / grouped GB/s per type against the device copy rate (bench/kernels.py);
  offload  synthetic OLMoE-1B-7B Q4_K_M at --vram-budget 1GiB with the real routing log
           replayed, miss policies copy / cpu / auto (bench/offload_sweep.py).

`--cpu` rehearses every phase on a machine without a GPU: the CPU device, the Triton
interpreter, a simulated host->device link, tiny models and sizes. The results go to
gpu_check.json and gpu_check.md in --out, each phase's output to <phase>.log beside them.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CARRIED = REPO / ".gpu-check"  # made by bench/gpu_check_prepare.sh; travels with `carry`
ROUTING_LOG = "olmoe-1b-7b-0924_layer0.jsonl"
PY = sys.executable
CLI = [PY, "-m", "moestream.server.cli"]

# The tests whose code takes the device fixture or needs CUDA (tests/conftest.py `device`).
DEVICE_TESTS = [
    "tests/kernels/test_triton_gemv.py", "tests/kernels/test_triton_gemm.py", "tests/kernels/test_triton_moe.py",
    "tests/kernels/test_triton_moe_align.py", "tests/kernels/test_triton_dispatch.py", "tests/kernels/test_dequant.py",
    "tests/offload/test_pinned.py", "tests/offload/test_store.py", "tests/offload/test_cache.py",
    "tests/offload/test_planner.py",
    "tests/engine/test_sampler.py", "tests/engine/test_hybrid_engine.py::test_cuda_policies_match_the_cpu_reference",
]
# On the CPU the Triton tests under the interpreter take many minutes: a cheap subset.
REHEARSAL_TESTS = ["tests/engine/test_sampler.py", "tests/offload/test_pinned.py",
                   "tests/kernels/test_triton_moe_align.py"]


@dataclass(frozen=True)
class Mode:
    cpu: bool
    total_s: float  # the whole check, phases and set-up
    caps_s: dict[str, float]  # each phase's own limit
    floor_s: float  # kept back for each later phase when an earlier one may run long

    @property
    def device(self) -> str:
        return "cpu" if self.cpu else "cuda"

    @property
    def cpu_kernels(self) -> list[str]:
        """On the CPU the torch reference path: the rehearsal checks this script, the CLI and the
        server, not the C++ CPU kernels (a build of theirs can take minutes on a busy machine)."""
        return ["--kernels", "torch"] if self.cpu else []


GPU_MODE = Mode(False, 450, {"smoke": 100, "tests": 150, "kernels": 90, "offload": 140}, 45)
CPU_MODE = Mode(True, 480, {"smoke": 180, "tests": 90, "kernels": 90, "offload": 150}, 30)


class PhaseFailed(Exception):
    """The phase ran and found something wrong: args (message, figures measured so far)."""


class PhaseTimeout(Exception):
    """The phase ran out of time: args (message, figures measured so far)."""


@dataclass
class Phase:
    name: str
    status: str = "not run"
    seconds: float = 0.0
    limit_s: float = 0.0
    figures: dict = field(default_factory=dict)
    error: str | None = None


@dataclass
class Context:
    mode: Mode
    out: Path
    work: Path
    deadline: float  # time.monotonic() by which this phase must end
    log_path: Path

    @property
    def remaining_s(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, cmd: list[str], what: str, env: dict[str, str] | None = None) -> str:
        """Run `cmd` to completion within the phase's time, its output appended to the phase log;
        returns stdout. A non-zero exit raises PhaseFailed with the output's tail."""
        stdout_path = self.work / "stdout.txt"
        with open(self.log_path, "a") as log, open(stdout_path, "w") as stdout:
            log.write(f"\n$ {' '.join(map(str, cmd))}\n")
            log.flush()
            proc = subprocess.Popen(list(map(str, cmd)), cwd=REPO, env={**os.environ, **(env or {})},
                                    stdout=stdout, stderr=log, start_new_session=True)
            timed_out = False
            try:
                proc.wait(timeout=max(self.remaining_s, 1))
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill(proc)
            text = stdout_path.read_text(errors="replace")
            log.write(text)
        if timed_out:
            raise PhaseTimeout(f"{what} did not finish in the phase's time")
        if proc.returncode != 0:
            raise PhaseFailed(f"{what} exited with {proc.returncode}: {_tail(self.log_path)}")
        return text


def _kill(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """End the process and everything it started (its own session): SIGINT first, so that Python
    runs its `finally` blocks (torch's extension build removes its lock file there; a lock left
    behind would hang every later build), then SIGKILL."""
    for sig, wait_s in ((signal.SIGINT, grace_s), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait_s)
            break
        except subprocess.TimeoutExpired:
            continue
    proc.wait()


def _tail(path: Path, n_chars: int = 1500) -> str:
    return path.read_text(errors="replace")[-n_chars:]


# -- phase 1: smoke ------------------------------------------------------------------------
def smoke(ctx: Context) -> dict:
    model = ctx.work / "tiny-olmoe-Q4_K_M.gguf"
    ctx.run(CLI + ["synth", "--arch", "olmoe", "--preset", "tiny", "--quant", "Q4_K_M", "--output", model], "synth")
    figures: dict = {"model": "synthetic tiny OLMoE Q4_K_M"}
    for temperature in (1.0, 0.0):
        start = time.monotonic()
        text = ctx.run(CLI + ["generate", "--model", model, "--device", ctx.mode.device,
                              "--prompt", "The quick brown fox",
                              "--max-tokens", "8", "--temperature", str(temperature), "--seed", "7",
                              *ctx.mode.cpu_kernels],
                       f"generate at temperature {temperature}")
        figures[f"generate_t{temperature:g}"] = {"seconds": round(time.monotonic() - start, 2),
                                                 "text": text.strip()[-200:]}
    figures["serve"] = _serve_and_stream(ctx, model)
    return figures


def _serve_and_stream(ctx: Context, model: Path) -> dict:
    import httpx

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with open(ctx.log_path, "a") as log:
        log.write(f"\n$ moestream serve on {url}\n")
        log.flush()
        proc = subprocess.Popen(list(map(str, CLI + ["serve", "--model", model, "--device", ctx.mode.device,
                                                     "--host", "127.0.0.1", "--port", str(port), "--ctx-size", "512",
                                                     "--max-batch", "2", *ctx.mode.cpu_kernels])),
                                cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        start = time.monotonic()
        while not _healthy(httpx, url):
            if proc.poll() is not None:
                raise PhaseFailed(f"serve exited with {proc.returncode}: {_tail(ctx.log_path)}")
            if ctx.remaining_s < 5:
                raise PhaseTimeout("serve did not become healthy in the phase's time")
            time.sleep(0.3)
        ready_s = time.monotonic() - start
        model_id = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
        body = {"model": model_id, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8,
                "stream": True, "temperature": 1.0, "seed": 3}
        chunks, text, first_s, done = 0, "", None, False
        sent = time.monotonic()
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body,
                          timeout=max(ctx.remaining_s - 2, 1)) as response:
            if response.status_code != 200:
                raise PhaseFailed(f"chat completion answered {response.status_code}: {response.read()[:500]!r}")
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunks += 1
                first_s = first_s if first_s is not None else time.monotonic() - sent
                for choice in json.loads(line[6:]).get("choices", []):
                    text += choice.get("delta", {}).get("content") or ""
        if not done or not text:
            raise PhaseFailed(f"the stream ended without [DONE] or content ({chunks} chunks, text {text!r})")
        return {"ready_s": round(ready_s, 2), "chunks": chunks, "first_chunk_s": round(first_s, 3),
                "text": text[-200:]}
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            _kill(proc)


def _healthy(httpx, url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- phase 2: the device-aware tests -------------------------------------------------------
def tests(ctx: Context) -> dict:
    report = ctx.work / "tests.xml"
    cmd = [PY, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={report}"]
    if not ctx.mode.cpu and importlib.util.find_spec("xdist"):
        cmd += ["-n", "8"]  # Triton compiles each kernel variant once: spread them over the cores
    env = {}
    if (CARRIED / "fixtures").is_dir():
        env["MOESTREAM_FIXTURE_PREBUILT"] = str(CARRIED / "fixtures")
    error = None
    try:
        ctx.run(cmd + (REHEARSAL_TESTS if ctx.mode.cpu else DEVICE_TESTS), "pytest", env)
    except PhaseFailed as failed:
        error = failed
    if not report.exists():
        raise error or PhaseFailed("pytest wrote no report")
    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    figures = {**counts, "failed": failed[:20], "device": ctx.mode.device}
    if error is not None:
        raise PhaseFailed(f"{counts['failures']} failed, {counts['errors']} errors: {', '.join(failed[:5])}",
                          figures)
    return figures


# -- phase 3: kernel table -----------------------------------------------------------------
def kernels(ctx: Context) -> dict:
    table = ctx.work / "kernels.json"
    error = None
    try:
        # the interpreter takes seconds per kernel launch: one type rehearses the script on the CPU
        variant = ["--cpu-smoke", "--types", "Q4_K"] if ctx.mode.cpu else ["--quick"]
        ctx.run([PY, "-m", "bench.kernels", *variant, "--json", table], "bench.kernels")
    except (PhaseFailed, PhaseTimeout) as stopped:
        error = stopped
    if not table.exists():
        raise error or PhaseFailed("bench.kernels wrote no table")
    result = json.loads(table.read_text())
    rows = [{k: r[k] for k in ("kernel", "qtype", "dtype", "m", "n", "k", "gb_s", "pct_copy", "rel_err")}
            for r in result["rows"]]
    figures = {"device": result["device"], "copy_gb_s": round(result["copy_gb_s"], 1),
               "finished": result["finished"], "checks_failed": result["checks_failed"], "rows": rows}
    if error is not None:
        raise type(error)(error.args[0], figures)
    return figures


# -- phase 4: offload ----------------------------------------------------------------------
def offload(ctx: Context) -> dict:
    model = ctx.work / "olmoe-1b-7b-Q4_K_M.gguf"
    # On the GPU the full-size file with its data section a sparse hole (zeros): the speed of a
    # step does not depend on the weights' values, routing comes from the real log, and the file
    # costs no disk and no time. On the CPU a 2-layer OLMoE of the real expert count and top-k
    # (so that the log replays), with random weights.
    preset = ("dataclasses.replace(p, n_layers=2, n_embd=256, n_head=4, n_head_kv=4, head_dim=64, "
              "n_vocab=320, n_ctx=512, n_ff=256)" if ctx.mode.cpu else "p")
    ctx.run([PY, "-c", "import dataclasses; from moestream.tools.synth import get_preset, write_synthetic; "
                       f"p = get_preset('olmoe', 'olmoe-1b-7b'); write_synthetic({str(model)!r}, {preset}, 'Q4_K_M', "
                       f"random_weights={ctx.mode.cpu}, progress=False)"], "synthetic OLMoE")
    log = _routing_log()
    table = ctx.work / "offload.json"
    cmd = [PY, "-m", "bench.offload_sweep", "--model", model, "--budgets", "1GiB", "--json", table,
           "--device", ctx.mode.device, *ctx.mode.cpu_kernels]
    if ctx.mode.cpu:  # auto alone (it both copies and computes misses on the CPU): each policy is a process
        cmd += ["--policies", "auto", "--prompt-tokens", "16", "--gen-tokens", "8", "--repeat", "1",
                "--max-cached-experts", "32", "--simulate-link-gbps", "2"]  # 32 of 128 slots, a 2 GB/s link
    else:
        cmd += ["--policies", "copy,cpu,auto", "--prompt-tokens", "64", "--gen-tokens", "32", "--repeat", "2"]
    if log is not None:
        cmd += ["--replay-routing", log]
    error = None
    try:
        ctx.run(cmd, "bench.offload_sweep")
    except (PhaseFailed, PhaseTimeout) as stopped:
        error = stopped
    if not table.exists():
        raise error or PhaseFailed("bench.offload_sweep wrote no table")
    result = json.loads(table.read_text())
    keep = ("policy", "budget_bytes", "decode_tok_s", "prefill_tok_s", "expert_hit_rate", "cpu_miss_share",
            "h2d_gb_s", "peak_vram_bytes", "peak_reserved_vram_bytes")
    rows = [{k: r.get(k) for k in keep} for r in result["rows"]]
    over = [r["policy"] for r in rows if max(r["peak_vram_bytes"] or 0, r["peak_reserved_vram_bytes"] or 0)
            > r["budget_bytes"]]
    figures = {"model": "synthetic OLMoE-1B-7B Q4_K_M" + (" (2 layers, 64 experts, top-8)" if ctx.mode.cpu else
                                                          " (weights: zeros)"),
               "routing": f"replayed from {Path(log).name}" if log else "the model's router (no log found)",
               "pinned_h2d_gb_s": result["pinned_h2d_gb_s"], "simulated_link_gbps": result["simulated_link_gbps"],
               "rows": rows, "over_budget": over}
    if error is not None:
        raise type(error)(error.args[0], figures)
    if over:
        raise PhaseFailed(f"peak VRAM over the 1 GiB budget under {', '.join(over)}", figures)
    return figures


def _routing_log() -> Path | None:
    shared = Path(os.environ.get("MOESTREAM_SHARED_DATA", REPO.parent / "shared" / "data"))
    for path in (CARRIED / ROUTING_LOG, shared / "routing" / ROUTING_LOG):
        if path.is_file():
            return path
    return None


PHASES: list[tuple[str, Callable[[Context], dict]]] = [
    ("smoke", smoke), ("tests", tests), ("kernels", kernels), ("offload", offload)]


# -- the driver ----------------------------------------------------------------------------
def device_facts(mode: Mode) -> dict:
    code = ("import json, platform, torch, triton; c = torch.cuda.is_available(); "
            "print(json.dumps({'python': platform.python_version(), 'torch': torch.__version__, "
            "'triton': triton.__version__, 'cuda': torch.version.cuda, "
            "'gpu': torch.cuda.get_device_name() if c else None, "
            "'capability': '.'.join(map(str, torch.cuda.get_device_capability())) if c else None, "
            "'memory_bytes': torch.cuda.get_device_properties(0).total_memory if c else None, "
            "'cpu_count': __import__('os').cpu_count()}))")
    try:
        facts = json.loads(subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=60,
                                          check=True).stdout)
    except (subprocess.SubprocessError, ValueError) as error:
        facts = {"error": str(error)[-500:]}
    if not mode.cpu and facts.get("gpu") is None:
        facts["warning"] = "torch sees no CUDA device: every phase below will fail"
    return facts


def run_phases(mode: Mode, out: Path, work: Path, only: list[str]) -> dict:
    start = time.monotonic()
    result = {"started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "mode": "cpu rehearsal" if mode.cpu else "cuda", "total_limit_s": mode.total_s,
              "triton_interpret": os.environ.get("TRITON_INTERPRET"), "device": device_facts(mode), "phases": {}}
    if not mode.cpu:  # the C++ CPU kernels compile once per machine: build them beside the smoke phase
        warm_log = open(work / "cpu-kernels-build.log", "w")
        subprocess.Popen([PY, "-c", "from moestream.kernels.cpu.build import load_extension; load_extension()"],
                         cwd=REPO, stdout=warm_log, stderr=subprocess.STDOUT, start_new_session=True)
    names = [name for name, _ in PHASES if name in only]
    for i, (name, run) in enumerate((n, r) for n, r in PHASES if n in only):
        later = len(names) - i - 1
        limit = min(mode.caps_s[name], mode.total_s - (time.monotonic() - start) - later * mode.floor_s)
        phase = Phase(name, limit_s=round(limit, 1))
        log_path = out / f"{name}.log"
        log_path.write_text("")
        ctx = Context(mode, out, work, time.monotonic() + limit, log_path)
        began = time.monotonic()
        try:
            if limit < 10:
                raise PhaseTimeout("no time left for this phase")
            phase.figures = run(ctx)
            phase.status = "ok"
        except (PhaseTimeout, PhaseFailed) as stopped:
            phase.status = "timeout" if isinstance(stopped, PhaseTimeout) else "failed"
            phase.error = str(stopped.args[0])
            phase.figures = stopped.args[1] if len(stopped.args) > 1 else {}
        except Exception as error:  # a bug of this script must not cost the phases after it
            phase.status, phase.error = "failed", f"{type(error).__name__}: {error}"
        phase.seconds = round(time.monotonic() - began, 1)
        print(f"[gpu_check] {name}: {phase.status} in {phase.seconds} s" + (f": {phase.error}" if phase.error else ""),
              flush=True)
        result["phases"][name] = dataclasses.asdict(phase)
        result["seconds"] = round(time.monotonic() - start, 1)
        write_results(result, out)
    return result


def write_results(result: dict, out: Path) -> None:
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1))
    (out / "gpu_check.md").write_text(markdown(result))


def markdown(result: dict) -> str:
    d = result["device"]
    lines = [f"# GPU check, {result['mode']}: {result['started_utc']}", "",
             f"Device: {d.get('gpu') or 'CPU'} (capability {d.get('capability')}), torch {d.get('torch')}, "
             f"CUDA {d.get('cuda')}, Triton {d.get('triton')}, {d.get('cpu_count')} CPUs; "
             f"TRITON_INTERPRET={result['triton_interpret']}. Command: `bash bench/gpu_check.sh"
             f"{' --cpu' if result['mode'] != 'cuda' else ''}`.", "",
             "| phase | status | seconds | limit s | note |", "| --- | --- | --- | --- | --- |"]
    for name, p in result["phases"].items():
        note = (p["error"] or "").replace("|", "/").replace("\n", " ")[:200]
        lines.append(f"| {name} | {p['status']} | {p['seconds']} | {p['limit_s']} | {note} |")
    phases = result["phases"]
    smoke_figures = phases.get("smoke", {}).get("figures") or {}
    if "serve" in smoke_figures:
        s = smoke_figures["serve"]
        lines += ["", f"Smoke: streamed chat completion, {s['chunks']} chunks, first after {s['first_chunk_s']} s "
                      f"(server ready in {s['ready_s']} s)."]
    test_figures = phases.get("tests", {}).get("figures") or {}
    if "tests" in test_figures:
        lines += ["", f"Tests on {test_figures['device']}: {test_figures['tests']} run, {test_figures['failures']} "
                      f"failed, {test_figures['errors']} errors, {test_figures['skipped']} skipped."]
    kernel_figures = phases.get("kernels", {}).get("figures") or {}
    if "rows" in kernel_figures:
        lines += ["", f"Kernels on {kernel_figures['device']}: device copy {kernel_figures['copy_gb_s']} GB/s "
                      "(read + write).", "",
                  "| kernel | type | dtype | M | N | K | GB/s | % of copy | max rel err |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['kernel'].replace('|', '/')} | {r['qtype']} | {r['dtype']} | {r['m']} | {r['n']} | {r['k']} "
                  f"| {r['gb_s']:.0f} "
                  f"| {r['pct_copy']:.0f}% | {r['rel_err']:.1e} |" for r in kernel_figures["rows"]]
    off = phases.get("offload", {}).get("figures") or {}
    if "rows" in off:
        link = (f"simulated link {off['simulated_link_gbps']} GB/s" if off["simulated_link_gbps"]
                else f"pinned H2D {_num(off['pinned_h2d_gb_s'], 1)} GB/s")
        lines += ["", f"Offload: {off['model']}, routing {off['routing']}, {link}.", "",
                  "| policy | budget | decode tok/s | prefill tok/s | hit rate | misses on CPU | H2D GB/s "
                  "| peak allocated | peak reserved |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['policy']} | {_mib(r['budget_bytes'])} | {_num(r['decode_tok_s'], 2)} "
                  f"| {_num(r['prefill_tok_s'], 1)} | {_num(r['expert_hit_rate'], 3)} | {_num(r['cpu_miss_share'], 3)} "
                  f"| {_num(r['h2d_gb_s'], 2)} | {_mib(r['peak_vram_bytes'])} | {_mib(r['peak_reserved_vram_bytes'])} |"
                  for r in off["rows"]]
    return "\n".join(lines) + "\n"


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.0f} MiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="rehearse every phase without a GPU")
    parser.add_argument("--out", default=os.environ.get("OUT") or "/tmp/gpu-check",
                        help="folder for gpu_check.json, gpu_check.md and the logs "
                             "(default: $OUT, else /tmp/gpu-check)")
    parser.add_argument("--work", required=True, help="scratch folder (models, reports)")
    parser.add_argument("--phases", default=",".join(name for name, _ in PHASES),
                        help="comma-separated subset of the phases, in their order")
    parser.add_argument("--total-s", type=float, default=None, help="time for the whole check (default: the mode's)")
    args = parser.parse_args(argv)
    only = args.phases.split(",")
    unknown = set(only) - {name for name, _ in PHASES}
    if unknown:
        print(f"gpu_check: unknown phase(s) {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    mode = CPU_MODE if args.cpu else GPU_MODE
    if args.total_s is not None:
        mode = dataclasses.replace(mode, total_s=args.total_s)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = run_phases(mode, out, Path(args.work), only)
    statuses = {name: p["status"] for name, p in result["phases"].items()}
    print(f"[gpu_check] {json.dumps(statuses)} in {result['seconds']} s; results in {out}", flush=True)
    return 0 if all(s == "ok" for s in statuses.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
