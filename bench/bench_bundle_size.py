"""Benchmark: a bundle's size on disk with shared weights, against one weight copy per graph.

Reads a lowered bundle (`RUN/bundles/<target>`, e.g. from `ndopt run default`) and prints, per
component, the bytes on disk (graphs plus the component's shared `<component>.weights.bin`) and the
bytes the same graphs would take if each carried its own copy of every weight it reads (what lowering
wrote before weight sharing), then the totals and their ratio.

    .venv/bin/python bench/bench_bundle_size.py runs/default/bundles/snapdragon-8-elite
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import onnx
from onnx.external_data_helper import uses_external_data


def initializer_bytes(path: Path) -> int:
    """Bytes of every initializer a graph reads, inline or from its external data file."""
    model = onnx.load(str(path), load_external_data=False)
    total = 0
    for t in model.graph.initializer:
        if uses_external_data(t):
            total += int({e.key: e.value for e in t.external_data}.get("length", 0))
        else:
            total += len(t.raw_data) or len(t.SerializeToString())
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    args = ap.parse_args()
    man = json.loads((args.bundle / "manifest.json").read_text())
    on_disk: dict[str, int] = defaultdict(int)
    per_copy: dict[str, int] = defaultdict(int)
    shared_files: dict[str, set[str]] = defaultdict(set)
    for name, g in man["graphs"].items():
        comp = g["component"]
        for key in ("file", "qdq", "encodings_graph"):
            f = g.get(key)
            if not f:
                continue
            path = args.bundle / f
            graph_only = path.stat().st_size
            on_disk[comp] += graph_only
            per_copy[comp] += graph_only + initializer_bytes(path)
        if g.get("encodings"):
            enc = (args.bundle / g["encodings"]).stat().st_size
            on_disk[comp] += enc
            per_copy[comp] += enc
        if g.get("external_data"):
            shared_files[comp].add(g["external_data"])
        print(f"graph {name}: {g.get('precision', '-')}")
    for comp, files in shared_files.items():
        on_disk[comp] += sum((args.bundle / f).stat().st_size for f in files)
    print(f"\n{'component':16s} {'shared (MB)':>12s} {'one copy per graph (MB)':>24s} {'ratio':>7s}")
    for comp in on_disk:
        a, b = on_disk[comp] / 1e6, per_copy[comp] / 1e6
        print(f"{comp:16s} {a:12.2f} {b:24.2f} {b / a if a else 0:7.2f}x")
    total = sum(p.stat().st_size for p in args.bundle.rglob("*") if p.is_file())
    other = total - sum(on_disk.values())
    before = sum(per_copy.values()) + other
    print(f"\nbundle on disk: {total / 1e6:.2f} MB; with one weight copy per graph: {before / 1e6:.2f} MB "
          f"({before / total:.2f}x); manifest, tokenizers and tables: {other / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
