"""Cost of the reference-cache key's image digest (`pivot_hf.data.images.dataset_images_digest`) at the 20K-row size.

    python benchmarks/image_digest.py [--rows 20000] [--kb 120] [--folder /tmp/image-digest]

Writes `rows` distinct files of `kb` kB (random bytes: the digest reads bytes and never decodes, so the format does not
matter), then digests a dataset of one image per row twice and prints wall and CPU seconds.
"""

import argparse
import os
import shutil
import time

import datasets

from pivot_hf.data.images import dataset_images_digest


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--kb", type=int, default=120)
    parser.add_argument("--folder", default="/tmp/image-digest")
    args = parser.parse_args()
    os.makedirs(args.folder, exist_ok=True)
    paths = []
    try:
        for i in range(args.rows):
            path = os.path.join(args.folder, f"{i}.jpg")
            with open(path, "wb") as f:
                f.write(os.urandom(args.kb * 1000))
            paths.append(path)
        dataset = datasets.Dataset.from_list([{"id": str(i), "images": [p]} for i, p in enumerate(paths)])
        gigabytes = args.rows * args.kb / 1e6
        for _ in range(2):
            wall, cpu = time.perf_counter(), time.process_time()
            dataset_images_digest(dataset)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            print(f"{args.rows} rows x {args.kb} kB ({gigabytes:.2f} GB): {wall:.1f} s wall, {cpu:.1f} s CPU")
    finally:
        shutil.rmtree(args.folder, ignore_errors=True)


if __name__ == "__main__":
    main()
