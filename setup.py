"""distributed-training: a Bittensor subnet where miners train one GPT-2 together over hivemind."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "distributed_training" / "__init__.py").read_text()).group(1)

setup(
    name="distributed-training",
    version=VERSION,
    description="Bittensor subnet: miners train one GPT-2 together with hivemind; validators verify and score them",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.11,<3.13",
    packages=find_packages(include=["distributed_training", "distributed_training.*", "neurons"]),
    install_requires=[
        # torch is installed first, on its own (scripts/install.sh): a range here must not pull a CUDA build
        # over the CPU one, nor a CPU one over an operator's CUDA one.
        "torch>=2.6",
        "hivemind==1.1.12",
        "bittensor==11.3.0",
        "transformers==5.23.0",
        "datasets==5.2.0",
        "tokenizers>=0.22,<0.24",
        "python-dotenv==1.2.4",
        "fastapi>=0.115,<1",
        "uvicorn>=0.30,<1",
        "httpx>=0.27,<0.29",
        "pydantic>=2.7,<3",
        "numpy>=1.26",
        "matplotlib>=3.8",
        "PyYAML>=6",
        "wandb==0.31.0",
    ],
    extras_require={"test": ["pytest>=8"]},
    entry_points={
        "console_scripts": [
            "dt-miner=neurons.miner:main",
            "dt-validator=neurons.validator:main",
            "dt-chain=distributed_training.chain.cli:main",
            "dt-assets=distributed_training.data.assets:main",
            "dt-local-swarm=distributed_training.localnet.cli:main",
            "dt-dht=distributed_training.ops.dht_node:main",
            "dt-monitor=distributed_training.ops.monitor:run",
            "dt-check-compute=distributed_training.ops.compute:main",
        ]
    },
)
