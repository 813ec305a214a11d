from setuptools import find_packages, setup

setup(
    name="megatron-matpo",
    version="0.1.0",
    description="Multi-agent tool-integrated RL post-training (MATPO, MAPoRL) on Megatron-core",
    python_requires=">=3.12,<3.13",
    packages=find_packages(include=["megatron_matpo", "megatron_matpo.*"]),
    package_data={"megatron_matpo": ["assets/*"]},
    install_requires=[],  # the pinned set lives in requirements/cpu.txt (installed by tools/setup_venv.sh)
    extras_require={"gpu": ["transformer-engine[pytorch]==2.10.0", "flash-attn==2.8.3"]},
    entry_points={"console_scripts": ["matpo=megatron_matpo.cli:main"],
                  # SGLang loads it in each of its processes (megatron_matpo/rollout/sglang_plugin.py)
                  "sglang.srt.plugins": ["matpo_batched_decode=megatron_matpo.rollout.sglang_plugin:register"]},
)
