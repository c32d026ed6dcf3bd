"""Train a small 2D and a small 3D hippocampus segmenter (MSD Task04) on the CPU, in minutes.

The networks see exactly what the runtime will feed them: every training image goes through
edgeseg's own Preprocessor with the spec that ships in the bundle (spec2d.json / spec3d.json).
The train/validation split is by case and fixed by ``--seed``; the validation cases are written
to ``OUT/val_images`` / ``OUT/val_labels`` as symlinks so ``edgeseg validate`` can read them.

    python examples/hippocampus/train.py ../shared/data/seg/msd_task04_hippocampus --out runs/hippo

Writes ``model2d.pt`` / ``model3d.pt`` (TorchScript, what ``edgeseg build-engine`` takes) and
``model2d.state.pt`` / ``model3d.state.pt`` (state dicts).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def load_spec(dims: int):
    from edgeseg.spec import load_spec as _load

    return _load(str(HERE / f"spec{dims}d.json"))


# LeakyReLU (as nnU-Net): quantizes in ONNX Runtime and fuses in TensorRT. MONAI's default PReLU
# stays a float op between Q/DQ pairs; plain ReLU trained poorly here (dead units at this lr).
ACT = ("leakyrelu", {"negative_slope": 0.1})


def make_model(dims: int, arch: str = "unet"):
    """The example's small networks: Conv + BatchNorm (folded into the conv at export) + LeakyReLU."""
    from monai.networks.nets import UNet

    if dims == 2:
        return UNet(
            2, 1, 3, channels=(8, 16, 32, 64), strides=(2, 2, 2), num_res_units=1, norm="batch", act=ACT
        )
    return UNet(3, 1, 3, channels=(8, 16, 32, 64), strides=(2, 2, 2), num_res_units=1, norm="batch", act=ACT)


def list_cases(data: Path) -> list[tuple[Path, Path]]:
    """(image, label) pairs of the MSD task folder, sorted by name."""
    images = sorted((data / "imagesTr").glob("*.nii.gz"))
    return [(p, data / "labelsTr" / p.name) for p in images if (data / "labelsTr" / p.name).is_file()]


def split(cases: list, seed: int = 0, val_fraction: float = 0.2) -> tuple[list, list]:
    """Case-level split, fixed by ``seed``."""
    order = np.random.default_rng(seed).permutation(len(cases))
    n_val = max(1, int(round(val_fraction * len(cases))))
    val = sorted(int(i) for i in order[:n_val])
    train = sorted(int(i) for i in order[n_val:])
    return [cases[i] for i in train], [cases[i] for i in val]


def prepare(case: tuple[Path, Path], spec) -> tuple[np.ndarray, np.ndarray]:
    """(input, labels) on the model grid: input as the runtime makes it, labels nearest-resampled
    onto the same grid and padded with background."""
    from edgeseg.geometry import resample
    from edgeseg.nifti_input import nifti_labels, read_nifti
    from edgeseg.preprocess import Preprocessor

    pre = Preprocessor(spec)
    prepared = pre(read_nifti(case[0]))
    x = prepared.array.copy()
    lab = prepared.orientation.to_model(nifti_labels(case[1]))
    grid = prepared.grid
    lab = resample(np.ascontiguousarray(lab), grid, "nearest", (0, 1, 2))
    if spec.dims == 2:
        y = np.zeros((x.shape[0], *x.shape[2:]), np.int64)
    else:
        y = np.zeros(x.shape[1:], np.int64)
    y[: grid[0], : grid[1], : grid[2]] = lab
    return x, y


def _batches_2d(data, rng, batch):
    xs = np.concatenate([x for x, _ in data])
    ys = np.concatenate([y for _, y in data])
    while True:
        idx = rng.integers(0, len(xs), batch)
        yield xs[idx], ys[idx]


def _batches_3d(data, spec, rng, batch):
    patch = [int(p) for p in spec.patch_size]
    while True:
        xb, yb = [], []
        for _ in range(batch):
            x, y = data[int(rng.integers(0, len(data)))]
            s = [int(rng.integers(0, y.shape[i] - patch[i] + 1)) for i in range(3)]
            sl = tuple(slice(s[i], s[i] + patch[i]) for i in range(3))
            xb.append(x[(slice(None), *sl)])
            yb.append(y[sl])
        yield np.stack(xb), np.stack(yb)


def train(
    dims: int,
    cases: list[tuple[Path, Path]],
    *,
    steps: int = 400,
    batch: int | None = None,
    lr: float = 3e-3,
    seed: int = 0,
    model=None,
    log_every: int = 100,
):
    """Train ``model`` (default :func:`make_model`) on ``cases``; returns the model in eval mode."""
    import torch

    torch.manual_seed(seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    spec = load_spec(dims)
    model = model if model is not None else make_model(dims)
    data = [prepare(c, spec) for c in cases]
    rng = np.random.default_rng(seed)
    batch = batch or (32 if dims == 2 else 4)
    gen = _batches_2d(data, rng, batch) if dims == 2 else _batches_3d(data, spec, rng, batch)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    # Foreground is ~5% of voxels: weight it so the net does not settle for background.
    weight = torch.tensor([0.2, 1.0, 1.0])
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        xb, yb = next(gen)
        out = model(torch.from_numpy(xb))
        if isinstance(out, (list, tuple)):
            out = out[0]
        loss = torch.nn.functional.cross_entropy(out, torch.from_numpy(yb), weight=weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step + 1) % log_every == 0:
            print(
                f"  {dims}D step {step + 1}/{steps} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)"
            )
    return model.eval()


def save(model, dims: int, out: Path) -> Path:
    """TorchScript (traced) and state dict; returns the TorchScript path."""
    import torch

    from edgeseg.export.onnx_export import example_shape

    spec = load_spec(dims)
    example = torch.zeros(example_shape(spec, batch=1))
    torch.save(model.state_dict(), out / f"model{dims}d.state.pt")
    traced = torch.jit.trace(model, example)
    path = out / f"model{dims}d.pt"
    torch.jit.save(traced, str(path))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path, help="the MSD Task04 folder (imagesTr/, labelsTr/)")
    ap.add_argument("--out", type=Path, default=Path("runs/hippocampus"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps2d", type=int, default=600)
    ap.add_argument("--steps3d", type=int, default=400)
    ap.add_argument("--dims", default="2,3", help="which models to train: 2, 3 or 2,3")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cases = list_cases(args.data)
    train_cases, val_cases = split(cases, args.seed)
    for sub, idx in (("val_images", 0), ("val_labels", 1)):
        d = args.out / sub
        d.mkdir(exist_ok=True)
        for c in val_cases:
            link = d / c[idx].name
            if not link.exists():
                link.symlink_to(c[idx].resolve())
    (args.out / "split.json").write_text(
        json.dumps(
            {
                "seed": args.seed,
                "train": [c[0].name for c in train_cases],
                "val": [c[0].name for c in val_cases],
            }
        )
    )
    print(f"{len(train_cases)} training cases, {len(val_cases)} validation cases (seed {args.seed})")
    for dims in [int(d) for d in args.dims.split(",")]:
        t = time.perf_counter()
        steps = args.steps2d if dims == 2 else args.steps3d
        model = train(dims, train_cases, steps=steps, seed=args.seed)
        path = save(model, dims, args.out)
        print(f"{dims}D model: {path} ({time.perf_counter() - t:.0f} s)")


if __name__ == "__main__":
    main()
