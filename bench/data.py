"""Training images per second: the shard reader against torchvision's ImageFolder + DataLoader on the same JPEGs,
and kdpipe's decoder (torchvision's, libjpeg-turbo) against PIL's on the same bytes.

Both readers read the same images with the same worker count, batch size and training transforms
(RandomResizedCrop + flip), in one process, one after the other, warm page cache for both, and every batch is made
the model's input on `--device` (normalized float32, as the engine receives it; on a GPU from page-locked memory);
each is timed over full epochs (a new loader each epoch, as in a stage), alternating, and its best epoch counts.
Prints the ratio shard / ImageFolder, and the shard reader's with images decoded and augmented where the model
runs (`data.decode: gpu`, the workers reading bytes) against its own in the loader workers. `--copies` stores each
JPEG that many times under other names: epochs long enough for many loader workers without minutes of making
images. The decoders decode and crop the same JPEG bytes in this process, one thread, alternating, best of 3.

    .venv/bin/python bench/data.py [--images 2000] [--size 160] [--crop 128] [--workers 2] [--batch 64]
    python bench/data.py --device cuda --images 4000 --copies 8 --size 320 --crop 224 --workers 16 --batch 256
"""

from __future__ import annotations

import argparse
import io
import shutil
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms import v2

from kdpipe.data import prepare_data
from kdpipe.data.convert import convert
from kdpipe.data.loaders import open_data
from kdpipe.data.shard_reader import geometry
from kdpipe.data.shards import decode_image
from kdpipe.data.synthetic import write_image_folder
from kdpipe.job.spec import DataSpec


def images_per_second(spec: DataSpec, epoch: int, device: torch.device) -> float:
    reader = open_data(prepare_data(spec), spec, seed=0, rank=0, world=1, pin_memory=device.type == "cuda")
    started, count = time.perf_counter(), 0
    for images, _ in reader.train_batches(epoch):
        reader.inputs(images, device)
        count += len(images)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return count / (time.perf_counter() - started)


def decode_rates(jpegs: list[bytes], crop: int) -> dict[str, float]:
    """Images/s of decoding and cropping the same bytes: PIL (decode, crop as PIL, then to a tensor) against
    kdpipe's `decode_image` (torchvision's decoder, crop on the tensor)."""
    crop_pil = v2.Compose([geometry(crop, True), v2.PILToTensor()])
    crop_tensor = geometry(crop, True)
    decoders = {
        "PIL": lambda data: crop_pil(Image.open(io.BytesIO(data)).convert("RGB")),
        "torchvision (kdpipe)": lambda data: crop_tensor(decode_image(data)),
    }
    best = dict.fromkeys(decoders, 0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for _ in range(3):
        for name, decode in decoders.items():
            started = time.perf_counter()
            for data in jpegs:
                decode(data)
            best[name] = max(best[name], len(jpegs) / (time.perf_counter() - started))
    torch.set_num_threads(threads)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000, help="distinct training JPEGs (default 2000)")
    parser.add_argument("--copies", type=int, default=1, help="times each is stored (default 1)")
    parser.add_argument("--size", type=int, default=160, help="side of the stored JPEGs (default 160)")
    parser.add_argument("--crop", type=int, default=128, help="side of the training crops (default 128)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for both readers (default 2)")
    parser.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per reader (default 3)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where batches become inputs")
    args = parser.parse_args()
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_image_folder(root / "jpegs", 8, args.size, args.images, args.images // 10, seed=0)
        for path in sorted((root / "jpegs" / "train").rglob("*.jpg")):
            for copy in range(1, args.copies):
                shutil.copyfile(path, path.with_name(f"{path.stem}-{copy}.jpg"))
        convert(root / "jpegs", root / "shards", shard_size=250, workers=args.workers)
        common = {"image_size": args.crop, "batch_size": args.batch, "loader_workers": args.workers}
        shards = {"source": "shards", "path": str(root / "shards"), **common}
        specs = {
            "shards": DataSpec(**shards, decode="cpu"),
            "shards, decoded where the model runs": DataSpec(**shards, decode="gpu"),
            "imagefolder": DataSpec(source="imagefolder", path=str(root / "jpegs"), **common),
        }
        for spec in specs.values():
            images_per_second(spec, 0, device)  # warm-up: page cache, imports, worker start-up paths
        best = dict.fromkeys(specs, 0.0)
        for epoch in range(1, args.epochs + 1):
            for name, spec in specs.items():
                best[name] = max(best[name], images_per_second(spec, epoch, device))
        jpegs = [path.read_bytes() for path in sorted((root / "jpegs" / "train").rglob("*.jpg"))[:500]]
        decoders = decode_rates(jpegs, args.crop)
    total = args.images * args.copies
    print(
        f"{total} JPEGs {args.size} px -> {args.crop} px crops, {args.workers} workers, batch {args.batch}, "
        f"inputs on {args.device}"
    )
    for name, rate in best.items():
        print(f"  {name:38s} {rate:8.0f} images/s")
    print(f"ratio shards / imagefolder: {best['shards'] / best['imagefolder']:.2f}")
    on_device = best["shards, decoded where the model runs"] / best["shards"]
    print(f"ratio decoded on {args.device} / in the workers: {on_device:.2f}")
    print(f"decode + crop of {len(jpegs)} of the JPEGs, one thread:")
    for name, rate in decoders.items():
        print(f"  {name:22s} {rate:8.0f} images/s")
    print(f"ratio torchvision / PIL: {decoders['torchvision (kdpipe)'] / decoders['PIL']:.2f}")


if __name__ == "__main__":
    main()
