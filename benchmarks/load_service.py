"""Bounded load test of the larimar HTTP service, on loopback only.

    python benchmarks/load_service.py --seconds 10                        # own server, fake engine, temp store
    python benchmarks/load_service.py --engine my_pkg.engines:load        # own server over a real engine
    python benchmarks/load_service.py --url http://127.0.0.1:8000 --token lmk_... --namespace demo
    python benchmarks/load_service.py --namespace-cost 200                # RAM / disk per namespace, no server

`--clients` threads (default 16), each with its own HTTP connection, send requests back to back for `--seconds`
(at most 300): a one-fact write with probability `--write-fraction`, else a completion conditioned on the
namespace. The namespace is seeded with `--seed-facts` facts first. Prints requests/s, p50 / p99 latency per
kind and the error rate (non-2xx or transport errors); `--json` also writes the numbers to a file.
Without --url it starts `uvicorn larimar.serving.service:create_app_from_env` on 127.0.0.1 with keys off (loopback).

`--namespace-cost N` measures instead, in this process and without a model, what N one-fact namespaces cost a
store whose memories have the shipped checkpoint's shape (`--slots` 512 x `--code-size` 384): RSS growth while
they are written (with `--max-loaded` of them held in RAM; 0: no bound), and the store folder's bytes after close
(every namespace snapshotted).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx

REPO = Path(__file__).resolve().parents[1]
FAKE_ENGINE = f"{REPO / 'tests' / 'fixtures' / 'store_fake_engine.py'}:FakeEngine"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def _percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def _start_server(engine: str, store: str) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "LARIMAR_ENGINE": engine, "LARIMAR_STORE": store, "LARIMAR_REQUIRE_KEYS": "0",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "uvicorn", "larimar.serving.service:create_app_from_env", "--factory",
           "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not come up in 300 s")


def run(url: str, token: str | None, namespace: str, clients: int, seconds: float, write_fraction: float,
        seed_facts: int) -> dict[str, float]:
    """Runs the load and returns the summary numbers."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with httpx.Client(base_url=url, headers=headers, timeout=60) as c:
        facts = [f"Entity{i} is associated with value{i}" for i in range(seed_facts)]
        for start in range(0, len(facts), 64):
            r = c.post(f"/v1/memories/{namespace}/facts", json={"facts": facts[start:start + 64]})
            r.raise_for_status()
    lat: dict[str, list[float]] = {"complete": [], "write": []}
    errors = [0]
    statuses: dict[str, int] = {}  # "200", "503", "conn" (connection errors) ... -> count
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client(k: int) -> None:
        rng = random.Random(k)
        with httpx.Client(base_url=url, headers=headers, timeout=60) as c:
            n = 0
            while time.monotonic() < stop_at:
                n += 1
                kind = "write" if rng.random() < write_fraction else "complete"
                t0 = time.perf_counter()
                try:
                    if kind == "write":
                        r = c.post(f"/v1/memories/{namespace}/facts",
                                   json={"facts": [f"Client{k} request{n} is tagged t{k}x{n}"]})
                    else:
                        i = rng.randrange(max(seed_facts, 1))
                        r = c.post("/v1/completions", json={"prompt": f"Entity{i} is associated with",
                                                            "memory": namespace, "max_tokens": 8})
                    ok, status = r.is_success, str(r.status_code)
                except httpx.HTTPError:
                    ok, status = False, "conn"
                dt = time.perf_counter() - t0
                with lock:
                    statuses[status] = statuses.get(status, 0) + 1
                    lat[kind].append(dt)
                    errors[0] += not ok

    t0 = time.monotonic()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    total = sum(len(v) for v in lat.values())
    out = {"clients": clients, "seconds": wall, "requests": total, "throughput_rps": total / wall,
           "error_rate": errors[0] / max(total, 1),
           "status_5xx": sum(v for k, v in statuses.items() if k.startswith("5")),
           "status_503_busy": statuses.get("503", 0), "connection_errors": statuses.get("conn", 0),
           "statuses": dict(sorted(statuses.items()))}
    for kind, xs in lat.items():
        out[f"{kind}_requests"] = len(xs)
        out[f"{kind}_p50_ms"] = 1000 * _percentile(xs, 0.50)
        out[f"{kind}_p99_ms"] = 1000 * _percentile(xs, 0.99)
    all_lat = lat["complete"] + lat["write"]
    out["p50_ms"], out["p99_ms"] = 1000 * _percentile(all_lat, 0.5), 1000 * _percentile(all_lat, 0.99)
    return out


def _rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def namespace_cost(n: int, slots: int, code_size: int, max_loaded: int | None) -> dict[str, float]:
    """RAM and disk of ``n`` one-fact namespaces in a store (random latents; no model needed)."""
    import gc

    import torch

    from larimar.memory import EpisodicMemory, MemoryConfig
    from larimar.serving.store import MemoryStore

    torch.manual_seed(0)
    module = EpisodicMemory(MemoryConfig(num_slots=slots, code_size=code_size)).eval()
    with tempfile.TemporaryDirectory(prefix="larimar-cost-") as d:
        folder = Path(d)
        store = MemoryStore(folder, fingerprint="cost", memory=module, max_loaded=max_loaded)
        store.write("warm", ["a warm-up fact"], torch.randn(1, code_size))  # allocator, key operator, schema
        gc.collect()
        rss0, disk0 = _rss_bytes(), _folder_bytes(folder)
        t0 = time.perf_counter()
        for i in range(n):
            store.write(f"ns{i}", [f"Entity{i} is associated with value{i}"], torch.randn(1, code_size))
        wall = time.perf_counter() - t0
        gc.collect()
        rss1, loaded = _rss_bytes(), len(store.loaded())
        store.close()
        disk1, snaps = _folder_bytes(folder), _folder_bytes(folder / "snapshots")
        t0 = time.perf_counter()
        with MemoryStore(folder, fingerprint="cost", memory=module, max_loaded=max_loaded) as again:
            for i in range(n):
                with again.reading(f"ns{i}"):
                    pass
        reload_s = time.perf_counter() - t0
    return {"namespaces": n, "slots": slots, "code_size": code_size, "max_loaded": max_loaded or 0,
            "loaded_after": loaded, "rss_growth_bytes": rss1 - rss0, "rss_per_namespace_bytes": (rss1 - rss0) / n,
            "disk_bytes": disk1, "disk_growth_bytes": disk1 - disk0, "disk_per_namespace_bytes": (disk1 - disk0) / n,
            "snapshot_bytes_per_namespace": snaps / (n + 1), "write_s_per_namespace": wall / n,
            "reload_s_per_namespace": reload_s / n}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running service on loopback (default: start one)")
    p.add_argument("--token", help="API key with write right on the namespace (for --url)")
    p.add_argument("--engine", default=FAKE_ENGINE, help="engine factory for the server this script starts")
    p.add_argument("--store", help="store folder for the server this script starts (default: a temp folder)")
    p.add_argument("--namespace", default="load")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--write-fraction", type=float, default=0.1)
    p.add_argument("--seed-facts", type=int, default=64)
    p.add_argument("--json", type=Path, help="also write the summary here")
    p.add_argument("--namespace-cost", type=int, metavar="N", help="measure RAM / disk of N one-fact namespaces")
    p.add_argument("--slots", type=int, default=512, help="K of the memories (--namespace-cost)")
    p.add_argument("--code-size", type=int, default=384, help="C of the memories (--namespace-cost)")
    p.add_argument("--max-loaded", type=int, default=64, help="namespaces held in RAM (--namespace-cost; 0: all)")
    a = p.parse_args()
    if a.namespace_cost is not None:
        if not 1 <= a.namespace_cost <= 10_000:
            raise SystemExit("--namespace-cost must be in [1, 10000]")
        out = namespace_cost(a.namespace_cost, a.slots, a.code_size, a.max_loaded or None)
        mb = 1 / 2**20
        print(f"{out['namespaces']} one-fact namespaces of {a.slots} x {a.code_size} (max_loaded "
              f"{a.max_loaded or 'unbounded'}, {out['loaded_after']} loaded after): RSS +{out['rss_growth_bytes'] * mb:.1f} "
              f"MiB ({out['rss_per_namespace_bytes'] * mb:.3f} MiB per namespace); store folder "
              f"+{out['disk_growth_bytes'] * mb:.2f} MiB ({out['disk_per_namespace_bytes'] / 1024:.1f} KiB per namespace, "
              f"snapshot {out['snapshot_bytes_per_namespace'] / 1024:.1f} KiB); write {1000 * out['write_s_per_namespace']:.1f}"
              f" ms, reload {1000 * out['reload_s_per_namespace']:.1f} ms per namespace")
        if a.json:
            a.json.write_text(json.dumps(out, indent=2))
        return
    if not 0 < a.seconds <= 300:
        raise SystemExit("--seconds must be in (0, 300]")
    if not 1 <= a.clients <= 256:
        raise SystemExit("--clients must be in [1, 256]")
    proc, tmp = None, None
    if a.url:
        if urlparse(a.url).hostname not in LOOPBACK:
            raise SystemExit(f"refusing to load-test {a.url}: loopback addresses only ({sorted(LOOPBACK)})")
        url = a.url.rstrip("/")
    else:
        store = a.store
        if store is None:
            tmp = tempfile.TemporaryDirectory(prefix="larimar-load-")
            store = tmp.name
        proc, url = _start_server(a.engine, store)
    try:
        out = run(url, a.token, a.namespace, a.clients, a.seconds, a.write_fraction, a.seed_facts)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)
        if tmp is not None:
            tmp.cleanup()
    print(f"{out['requests']} requests in {out['seconds']:.1f} s from {out['clients']} clients: "
          f"{out['throughput_rps']:.1f} req/s, p50 {out['p50_ms']:.1f} ms, p99 {out['p99_ms']:.1f} ms, "
          f"error rate {100 * out['error_rate']:.2f} %, 5xx {out['status_5xx']} (503 busy: {out['status_503_busy']}), "
          f"connection errors {out['connection_errors']}")
    for kind in ("complete", "write"):
        print(f"  {kind:8s} n={out[f'{kind}_requests']:6d}  p50 {out[f'{kind}_p50_ms']:.1f} ms  "
              f"p99 {out[f'{kind}_p99_ms']:.1f} ms")
    if a.json:
        a.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
