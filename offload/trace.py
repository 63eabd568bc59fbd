"""Routing traces: which experts each token chose at each layer, read back for cache studies.

Two formats, both JSON lines:

* moestream's own (written by `RoutingRecorder`, i.e. `--record-routing FILE`): an optional
  first line `{"type": "meta", "n_experts": 64, "n_layers": 16, "top_k": 8}`, then one line
  per token per layer in forward order:
  `{"seq": 3, "pos": 17, "layer": 5, "experts": [12, 40, ...], "weights": [0.31, ...]}`
  (`seq` is the request, `pos` the token's position in it).
* vLLM routing logs as shipped in shared/data/routing: a meta line, then rows
  `{"type": "route", "req_id", "token_idx", "layer", "topk_ids", "topk_weights"}` in
  forward-pass order of a batched stream. They start with a warm-up block of identical dummy
  rows (dropped here), token_idx restarts at every forward pass and req_id is not per request.
"""

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from moestream.kernels.errors import MoestreamError


@dataclass(frozen=True)
class TraceRow:
    layer: int
    experts: tuple[int, ...]
    prev: int  # index of the row with the same request's previous token at this layer, or -1


@dataclass(frozen=True)
class RoutingTrace:
    name: str
    n_experts: int  # routed experts per layer
    top_k: int
    layers: tuple[int, ...]
    rows: tuple[TraceRow, ...]  # forward order

    @property
    def n_keys(self) -> int:
        """Distinct cache keys: experts per layer times layers."""
        return self.n_experts * len(self.layers)

    def accesses(self) -> list[int]:
        """Cache keys in access order: the expert id for one layer, else (layer, expert) packed
        as layer_index * n_experts + expert."""
        index = {layer: i for i, layer in enumerate(self.layers)}
        return [index[r.layer] * self.n_experts + e for r in self.rows for e in r.experts]


def read_trace(path: str | Path) -> RoutingTrace:
    """Read either format (told apart by the first routing row)."""
    path = Path(path)
    try:
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as err:
        raise MoestreamError(f"cannot read routing trace {path}: {err}") from err
    expected = ('expected moestream trace lines {"seq", "pos", "layer", "experts", "weights"} '
                'or vLLM rows {"type": "route", "token_idx", "layer", "topk_ids", ...} '
                "(see offload/trace.py)")
    try:
        meta = next((x for x in lines if x.get("type") == "meta"), {})
        rows = [x for x in lines if x.get("type") != "meta"]
        if rows and "topk_ids" in rows[0]:
            return _from_vllm(path.name, meta, rows)
        if rows and "experts" in rows[0]:
            return _from_moestream(path.name, meta, rows)
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        raise MoestreamError(f"{path}: malformed routing row ({err!r}): {expected}") from err
    raise MoestreamError(f"{path} holds no routing rows: {expected}")


def _from_moestream(name: str, meta: dict, raw: list[dict]) -> RoutingTrace:
    last: dict[tuple[int, int, int], int] = {}  # (seq, pos, layer) -> row index
    rows = []
    for i, x in enumerate(raw):
        seq, pos, layer = int(x["seq"]), int(x["pos"]), int(x["layer"])
        rows.append(TraceRow(layer, tuple(x["experts"]), last.get((seq, pos - 1, layer), -1)))
        last[(seq, pos, layer)] = i
    return _trace(name, meta.get("n_experts"), meta.get("top_k"), rows)


def _from_vllm(name: str, meta: dict, raw: list[dict]) -> RoutingTrace:
    first = raw[0]["topk_ids"]
    start = next((i for i, x in enumerate(raw) if x["topk_ids"] != first), len(raw))
    raw = raw[start:]
    prev: dict[int, int] = {}
    for layer in {int(x["layer"]) for x in raw}:
        prev |= _same_slot_prev(_vllm_passes(layer, raw))
    rows = [TraceRow(int(x["layer"]), tuple(x["topk_ids"]), prev.get(i, -1))
            for i, x in enumerate(raw)]
    return _trace(name, meta.get("num_experts"), meta.get("top_k"), rows)


def _vllm_passes(layer: int, raw: list[dict]) -> list[list[int]]:
    """Row indices of one layer split into forward passes: token_idx restarts at each pass."""
    passes: list[list[int]] = []
    last_idx = None
    for i, x in enumerate(raw):
        if int(x["layer"]) != layer:
            continue
        if last_idx is None or int(x["token_idx"]) <= last_idx:
            passes.append([])
        passes[-1].append(i)
        last_idx = int(x["token_idx"])
    return passes


def _same_slot_prev(passes: list[list[int]]) -> dict[int, int]:
    """Pair row j of a pass with row j of the pass before when both passes have the same size.

    vLLM logs carry no request id. Two consecutive forward passes of equal size are decode
    steps of an unchanged batch, whose rows keep the order of the requests, so row j of both
    is the same request's consecutive tokens. A size change (a request finished or joined, a
    prefill) breaks the pairing for that step.
    """
    prev: dict[int, int] = {}
    for before, now in zip(passes, passes[1:]):
        if len(before) == len(now):
            prev.update(zip(now, before))
    return prev


def _trace(name: str, n_experts: int | None, top_k: int | None,
           rows: list[TraceRow]) -> RoutingTrace:
    if not rows:
        raise MoestreamError(f"routing trace {name} has no rows after the warm-up block")
    n_experts = n_experts or 1 + max(e for r in rows for e in r.experts)
    top_k = top_k or max(len(r.experts) for r in rows)
    layers = tuple(sorted({r.layer for r in rows}))
    return RoutingTrace(name, n_experts, top_k, layers, tuple(rows))


class RoutingRecorder:
    """Writes moestream's trace format; the engine calls `record` per token per layer."""

    def __init__(self, path: str | Path, n_experts: int, n_layers: int, top_k: int):
        # Line-buffered: a server killed mid-run still leaves every finished line on disk.
        self._file: IO[str] = open(path, "w", buffering=1)
        self._write({"type": "meta", "n_experts": n_experts, "n_layers": n_layers, "top_k": top_k})

    def record(self, seq_id: int, pos: int, layer: int, expert_ids: Iterable[int],
               weights: Iterable[float]) -> None:
        self._write({"seq": int(seq_id), "pos": int(pos), "layer": int(layer),
                     "experts": [int(e) for e in expert_ids],
                     "weights": [round(float(w), 5) for w in weights]})

    def record_batch(self, seq_ids: Sequence[int], positions: Sequence[int], layer: int,
                     expert_ids: Sequence[Sequence[int]],
                     weights: Sequence[Sequence[float]]) -> None:
        """One layer of a batch: row t of expert_ids/weights belongs to seq_ids[t] at positions[t]
        (pass `.tolist()` of the router's top-k tensors: one device sync per layer)."""
        for seq_id, pos, ids, row_weights in zip(seq_ids, positions, expert_ids, weights):
            self.record(seq_id, pos, layer, ids, row_weights)

    def _write(self, obj: dict) -> None:
        self._file.write(json.dumps(obj, separators=(",", ":")) + "\n")

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "RoutingRecorder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
