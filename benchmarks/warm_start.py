"""Can a cheap map of the encoder's latent predict where refinement takes it (issue 22, "fewer steps from a better start")?

Refines edit requests from the train splits (ZsRE train-1k and EasyEdit CounterFact train, the first ``--n`` of
each) with the default refinement, keeps the encoder's latent z0 (n, C) and the refined one z* (n, C), then fits a
ridge regression z0 -> z* - z0 on 80 % of them and reports, on the other 20 %, the R^2 of the predicted move and how
much closer the predicted start z0 + move is to z* than z0 is (1.0: no closer).

    OMP_NUM_THREADS=2 python benchmarks/warm_start.py --n 800 --latents runs/warm/t800.safetensors

The latents are written to (and, if present, read back from) ``--latents`` (safetensors); collecting 800 + 800
requests took ~12 min on the 2-core CPU VM.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def collect(n: int, path: Path, batch: int = 64) -> dict[str, torch.Tensor]:
    """Encoder and refined latents of the first n ZsRE and n CounterFact train requests; saved to ``path``."""
    from larimar.data import load_counterfact, load_zsre
    from larimar.editor import Larimar

    sets = {"zsre": load_zsre(DATA / "zsre" / "zsre_mend_train-1k.json", limit=n).records,
            "cf": load_counterfact(DATA / "counterfact_easyedit" / "counterfact-train.json", limit=n).records}
    lm = Larimar.from_pretrained()
    z0s, zs, is_cf = [], [], []
    for name, recs in sets.items():
        for i in range(0, len(recs), batch):
            t = time.perf_counter()
            sentences, z = lm.fact_latents(recs[i : i + batch])  # (b, C) refined
            z0s.append(lm.encode_facts(sentences))  # (b, C) the encoder's
            zs.append(z)
            is_cf += [name == "cf"] * len(sentences)
            print(f"{name} {i + len(sentences)}/{len(recs)} {time.perf_counter() - t:.1f} s", flush=True)
    out = {"z0": torch.cat(z0s), "z": torch.cat(zs), "cf": torch.tensor(is_cf)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path))
    return out


def fit(z0: torch.Tensor, z: torch.Tensor, ridges: tuple[float, ...] = (1e-2, 1.0, 10.0, 100.0, 1000.0),
        seed: int = 0) -> list[dict[str, float]]:
    """Held-out quality of ridge maps z0 (n, C) -> z - z0 (n, C), one row per ridge."""
    z0, z = z0.double(), z.double()
    dz = z - z0  # (n, C)
    perm = torch.randperm(len(z0), generator=torch.Generator().manual_seed(seed))
    te, tr = perm[: len(z0) // 5], perm[len(z0) // 5 :]
    X = torch.cat([z0, torch.ones(len(z0), 1, dtype=z0.dtype)], 1)  # (n, C + 1)
    rows = []
    for lam in ridges:
        A = X[tr]
        W = torch.linalg.solve(A.T @ A + lam * torch.eye(A.shape[1], dtype=A.dtype), A.T @ dz[tr])  # (C + 1, C)
        pred = X[te] @ W  # (n_te, C)
        r2 = 1 - ((pred - dz[te]) ** 2).sum() / ((dz[te] - dz[tr].mean(0)) ** 2).sum()
        closer = ((z0[te] + pred - z[te]).norm(dim=1) / dz[te].norm(dim=1)).mean()
        rows.append({"ridge": lam, "heldout_r2": float(r2), "start_distance_ratio": float(closer)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=800, help="requests per train split")
    ap.add_argument("--latents", default="runs/warm/latents.safetensors", help="where the latents are kept")
    args = ap.parse_args()
    path = Path(args.latents)
    d = load_file(str(path)) if path.exists() else collect(args.n, path)
    z0, z = d["z0"], d["z"]
    dz = z - z0
    print(f"{len(z0)} requests; |z0| {z0.norm(dim=1).mean():.2f}, |z* - z0| {dz.norm(dim=1).mean():.2f}, "
          f"cos(z* - z0, z0) {torch.nn.functional.cosine_similarity(dz, z0).mean():.3f}, "
          f"share of the move's energy in its mean {dz.mean(0).pow(2).sum() * len(dz) / dz.pow(2).sum():.3f}")
    print("| ridge | held-out R^2 of the move | |start - z*| / |z0 - z*| |\n|---|---|---|")
    for r in fit(z0, z):
        print(f"| {r['ridge']:g} | {r['heldout_r2']:.3f} | {r['start_distance_ratio']:.3f} |")


if __name__ == "__main__":
    main()
