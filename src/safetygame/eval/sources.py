"""Where each benchmark's official release comes from: pinned URLs, sizes and sha256.

``SOURCES`` maps a benchmark name (the folder name in a data folder) to its files. Each file
has the path it takes inside the data folder, the upstream URL it is downloaded from, its
size and its sha256. The checksums and sizes were computed from the project's offline copies
of the releases (byte for byte the upstream files); the URLs follow the upstream READMEs and
were not fetched when they were written (the build machine has no network), so a URL that
moved shows up as an error naming it, never as a silently different file.

``safetygame data pull`` (:mod:`safetygame.eval.download`) stores the files under
:func:`pulled_root`, in the same layout as ``../shared/data``; a *mirror* (any HTTP server
holding a copy of a data folder, e.g. ``python -m http.server`` run in one) replaces every
upstream URL with ``<mirror>/<benchmark>/<path>``.

Nothing here does I/O beyond ``stat``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from safetygame.cache import cache_dir

__all__ = [
    "MIRROR_ENV",
    "SOURCES",
    "Benchmark",
    "SourceFile",
    "is_complete",
    "pulled_root",
]

MIRROR_ENV = "SAFETYGAME_DATA_MIRROR"


@dataclass(frozen=True)
class SourceFile:
    """One file of a release: ``path`` inside the benchmark's folder, where it comes from."""

    path: str
    url: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Benchmark:
    name: str
    upstream: str  # the project that publishes it
    license: str
    files: tuple[SourceFile, ...]

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


def _gh(repo: str, ref: str, path: str) -> str:
    # github.com/<repo>/raw/<ref>/<path> redirects to raw.githubusercontent.com (or to the
    # LFS media host), and accepts a branch, a tag or a (short) commit.
    return f"https://github.com/{repo}/raw/{ref}/{path}"


def _hf(repo: str, ref: str, path: str) -> str:
    return f"https://huggingface.co/datasets/{repo}/resolve/{ref}/{path}"


_BB = "bigbench/benchmark_tasks/hhh_alignment"
_HB = "data/behavior_datasets"

SOURCES: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark(
            "hhh",
            "google/BIG-bench (hhh_alignment; as in the bigbench 1.0.0 release)",
            "Apache-2.0",
            (
                SourceFile(
                    "task.json",
                    _gh("google/BIG-bench", "main", f"{_BB}/task.json"),
                    783,
                    "a49a91d541cc917e6d70e9ba7d2462b0609532b550279fccf51f2a0f77a61da5",
                ),
                SourceFile(
                    "harmless/task.json",
                    _gh("google/BIG-bench", "main", f"{_BB}/harmless/task.json"),
                    45591,
                    "4720acbc916cc18413e48c6bb55c19af73400436a6304c7e110b8bb40f8952a1",
                ),
                SourceFile(
                    "helpful/task.json",
                    _gh("google/BIG-bench", "main", f"{_BB}/helpful/task.json"),
                    78127,
                    "1bd2a58d9bb17b26af4806e8302374cea60671dc387fbfc2c5aa5c23e0901628",
                ),
                SourceFile(
                    "honest/task.json",
                    _gh("google/BIG-bench", "main", f"{_BB}/honest/task.json"),
                    86819,
                    "69ba96e5bff121327ad1366e3772b7b45c50e96e7f995b2cef62c350380f1b14",
                ),
                SourceFile(
                    "other/task.json",
                    _gh("google/BIG-bench", "main", f"{_BB}/other/task.json"),
                    28261,
                    "4d6b041d79e5bf2705a9f81994efb95274179faaba9270f6dc83bd0cd17c227e",
                ),
            ),
        ),
        Benchmark(
            "truthfulqa",
            "sylinrl/TruthfulQA (v0 = data/v0/, the 2021 release; v1 = the 2025 update)",
            "Apache-2.0",
            (
                SourceFile(
                    "mc_task_v0.json",
                    _gh("sylinrl/TruthfulQA", "main", "data/v0/mc_task.json"),
                    726323,
                    "131e6f4156297bee09b38279e2fa847e4359c200504eca99ea3fab4b2d3a6144",
                ),
                SourceFile(
                    "TruthfulQA_v0.csv",
                    _gh("sylinrl/TruthfulQA", "main", "data/v0/TruthfulQA.csv"),
                    444541,
                    "f4fcc4a841d4474c46a4719c295c6df5f12eef14c187fbb9637a29e70d9ece00",
                ),
                SourceFile(
                    "mc_task.json",
                    _gh("sylinrl/TruthfulQA", "main", "data/mc_task.json"),
                    771566,
                    "75b84d5cc8f0e287c055db1857808e734ea53ade8ee68aad2d007f38896330a8",
                ),
                SourceFile(
                    "TruthfulQA.csv",
                    _gh("sylinrl/TruthfulQA", "main", "TruthfulQA.csv"),
                    477048,
                    "967b82fb1fb6274e4971c6c80caa9d04f844c512b1033c146f26c78270cd384b",
                ),
            ),
        ),
        Benchmark(
            "safetybench",
            "thu-coai/SafetyBench (Hugging Face dataset files)",
            "MIT",
            (
                SourceFile(
                    "test_zh_subset.json",
                    _hf("thu-coai/SafetyBench", "main", "test_zh_subset.json"),
                    766013,
                    "8760b0621df0fa81b99f7e49961853f1ff8b5ac0e4f1f96dad20a587c33aea4f",
                ),
                SourceFile(
                    "test_answers_zh_subset.json",
                    _hf("thu-coai/SafetyBench", "main", "test_answers_zh_subset.json"),
                    133967,
                    "41c3e40330a7a96375de54b46df4839f6a46e8c9f6be974a2d31b35b8012af6c",
                ),
                SourceFile(
                    "test_answers_en.json",
                    _hf("thu-coai/SafetyBench", "main", "test_answers_en.json"),
                    729736,
                    "a26ec13deeb551d68f71d61dd269d05dd43c24e6b22d8be3b93788ee10cf8615",
                ),
                SourceFile(
                    "dev_en.json",
                    _hf("thu-coai/SafetyBench", "main", "dev_en.json"),
                    13127,
                    "bc0cdaa3ffec43057eb2badaa25255d6f81ac290f2a9fa528a6a85488d82678f",
                ),
                SourceFile(
                    "dev_zh.json",
                    _hf("thu-coai/SafetyBench", "main", "dev_zh.json"),
                    11273,
                    "d2aebaf2311644703271ff3b83eb9522ad69e09aab13e762f07b3844761c034f",
                ),
            ),
        ),
        Benchmark(
            "xstest",
            "paul-rottger/exaggerated-safety",
            "CC-BY-4.0",
            (
                SourceFile(
                    "xstest_prompts.csv",
                    _gh("paul-rottger/exaggerated-safety", "main", "xstest_prompts.csv"),
                    38719,
                    "11783fb294ed017473ee53c207d71f2161c7672c8d0b037501e78387f801cb5a",
                ),
            ),
        ),
        Benchmark(
            "advbench",
            "llm-attacks/llm-attacks",
            "MIT",
            (
                SourceFile(
                    "harmful_behaviors.csv",
                    _gh("llm-attacks/llm-attacks", "main", "data/advbench/harmful_behaviors.csv"),
                    82125,
                    "6cd1a5c63c07610d7eb67307772ee5606017ee950b5770ab288a2c487489d3e1",
                ),
                SourceFile(
                    "harmful_strings.csv",
                    _gh("llm-attacks/llm-attacks", "main", "data/advbench/harmful_strings.csv"),
                    34654,
                    "2c4751403195634f88eb849d923670cb2d9a883bcc3d74456bf2f08141424a15",
                ),
            ),
        ),
        Benchmark(
            "harmbench",
            "centerforaisafety/HarmBench",
            "MIT",
            tuple(
                SourceFile(
                    f"harmbench_behaviors_text_{split}.csv",
                    _gh(
                        "centerforaisafety/HarmBench",
                        "main",
                        f"{_HB}/harmbench_behaviors_text_{split}.csv",
                    ),
                    size,
                    digest,
                )
                for split, size, digest in (
                    (
                        "all",
                        198850,
                        "8d81accedd38eaaf8b760618622bb888417d1fd0c86eba65c427a16f1cbb4afc",
                    ),
                    (
                        "val",
                        38024,
                        "7bfaaa5e2b9b95002c89e2d33c019f58e9e8496e2fc65d368f1eeb8179e69534",
                    ),
                    (
                        "test",
                        160828,
                        "75d257b3e7428c52eb7b0154318f455af3e01b09a3794b5e2f3d36054f3c0e29",
                    ),
                )
            ),
        ),
        Benchmark(
            "hh-rlhf",
            "anthropics/hh-rlhf @ 354e5c3 (harmless-base test split)",
            "MIT",
            (
                SourceFile(
                    "harmless-base-test.jsonl.gz",
                    _gh("anthropics/hh-rlhf", "354e5c3", "harmless-base/test.jsonl.gz"),
                    742801,
                    "ebfaaed21162a4de120ae85366075b34425e2a6303fac59b99555002f7016f03",
                ),
            ),
        ),
        Benchmark(
            "openai-moderation",
            "openai/moderation-api-release @ f4ab51b",
            "MIT",
            (
                SourceFile(
                    "samples-1680.jsonl.gz",
                    _gh("openai/moderation-api-release", "f4ab51b", "data/samples-1680.jsonl.gz"),
                    477573,
                    "ef3f7de86ee394fe337b0a566ba4b9c7db058f3caa8d6a4a0006138b663ab9a8",
                ),
            ),
        ),
    )
}


def pulled_root() -> Path:
    """The data folder ``safetygame data pull`` fills: ``<cache dir>/data``."""
    return cache_dir() / "data"


def is_complete(root: Path, name: str) -> bool:
    """Whether ``root/<name>`` holds every file of benchmark ``name`` at its pinned size
    (a cheap check: ``data pull`` verified each checksum before the file took its name)."""
    bench = SOURCES[name]
    for f in bench.files:
        try:
            if (root / name / f.path).stat().st_size != f.size:
                return False
        except OSError:
            return False
    return True
