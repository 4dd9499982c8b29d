"""Distribution ``virtex-d2``: VirTex pretraining (``pretrain``) and its detectron2 extension
(``detectron2_ext``).

detectron2 itself is not on PyPI, so it is not listed here: ``scripts/setup_env.sh`` (what
``make setup`` runs) installs it from its git repository or, offline, from the pure-Python
route described in the README.
"""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    # 2.10: the first torch whose torch.load(weights_only=True) has no published bypass
    # (CVE-2025-32434 < 2.6, CVE-2026-24747 < 2.10); pretrain/checkpoint_io.py refuses older ones.
    "torch>=2.10,<2.15",
    "torchvision>=0.25,<0.30",  # the torchvision of torch 2.10
    "numpy>=1.24,<3",
    "Pillow>=10,<14",
    "PyYAML>=6,<7",
    "fvcore>=0.1.5,<0.2",
    "iopath>=0.1.9,<0.2",
    "yacs>=0.1.8,<0.2",
    "pycocotools>=2.0.7,<2.1",
    "lvis==0.5.3",
    "sentencepiece>=0.2,<0.3",
    "pycocoevalcap>=1.2,<1.3",
    "tensorboard>=2.14,<3",
    "tqdm>=4.66,<5",
    "matplotlib>=3.7,<4",
    "scikit-learn>=1.3,<2",
    "scipy>=1.10,<2",
    "opencv-python>=4.8,<6",
    "webdataset>=1.0.2,<2",  # tar shards (DATA.FORMAT webdataset)
    "pyarrow>=14,<27",  # parquet caption tables (tools/make_shards.py)
    "submitit>=1.5,<2",  # Slurm submission with requeue (tools/submit_pretrain.py)
    # ViT backbones (MODEL.VISUAL.NAME timm::<vit>); detectron2's ViT imports it too. <2: its
    # timm.models.layers shim, which detectron2's ViT imports, may go in a major release.
    "timm>=1.0,<2",
    # ViTDet's large-scale jitter crops polygon masks (detectron2's FixedSizeCrop -> fvcore's
    # CropTransform.apply_polygons), which needs shapely.
    "shapely>=2,<3",
]

EXTRAS_REQUIRE = {
    "dev": [
        "pytest>=8,<10",
        "pytest-timeout>=2.3,<3",
        "ruff>=0.6,<1",
    ],
}

setup(
    name="virtex-d2",
    version="0.1.0",
    description="VirTex (learning visual representations from captions) as a detectron2 extension",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10,<3.14",  # the whole test suite passed on 3.11.7 and 3.13.0
    packages=find_packages(include=["pretrain", "pretrain.*", "detectron2_ext", "detectron2_ext.*", "virtex_d2", "virtex_d2.*"]),
    package_data={"pretrain.data.synthetic": ["*.json"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    license="MIT",
)
