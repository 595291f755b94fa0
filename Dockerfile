# syntax=docker/dockerfile:1.7
# megatron_rpt on an NVIDIA PyTorch (NGC) image: CUDA torch, Transformer Engine and apex come
# with the image; this adds megatron-core, SGLang and megatron_rpt.
#
#   docker build -t megatron-rpt --build-arg NGC_TAG=<tag> --build-arg SGLANG_VERSION=<version> .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 --rm -it \
#       -v $PWD/runs:/workspace/megatron_rpt/runs megatron-rpt bash examples/pretrain_rpt.sh
#   # multi-node: run the container on every node with --network=host and torchrun's variables
#   #   -e NNODES=4 -e NODE_RANK=$i -e MASTER_ADDR=node0 -e MASTER_PORT=29500
#
# Version matching (the one thing that breaks images like this): every sglang release pins an
# exact torch (0.5.12-0.5.17: torch 2.11.0; 0.5.18-0.5.21: 2.13.0; 0.5.22-0.5.23: 2.14.1) and
# its CUDA kernels (sglang-kernel) are built against that torch's ABI, while NGC images ship
# their own torch build (versions like 2.11.0a0+<hash>), which pip never considers equal to
# the pin. So SGLang is installed without its torch requirement, its other requirements are
# installed constrained to the image's torch/TE/apex, and the build FAILS unless the image's
# torch has the same major.minor as the release's pin: pick an NGC_TAG whose torch matches
# SGLANG_VERSION (NGC release notes list each tag's torch; sglang's pin is in its metadata).
# Not built in this repository's CI (no Docker engine there).
ARG NGC_TAG=26.04-py3
FROM nvcr.io/nvidia/pytorch:${NGC_TAG}

ARG SGLANG_VERSION=0.5.17
ARG MEGATRON_CORE_VERSION=0.16.1

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    WANDB_MODE=offline \
    TOKENIZERS_PARALLELISM=false \
    PYTHONUNBUFFERED=1

WORKDIR /workspace/megatron_rpt

# Freeze what the image ships (torch, its CUDA companions, TE, apex) so no later resolve can
# swap them out; NGC's own /etc/pip/constraint.txt (when present) is kept as well.
RUN python - > /tmp/pins.txt <<'EOF'
import importlib.metadata as m
for name in ("torch", "torchvision", "torchaudio", "triton", "transformer-engine", "apex",
             "flash-attn"):
    try:
        print(f"{name}=={m.version(name)}")
    except m.PackageNotFoundError:
        pass
EOF
RUN cat /tmp/pins.txt && if [ -f /etc/pip/constraint.txt ]; then cat /etc/pip/constraint.txt >> /tmp/pins.txt; fi

# SGLang without its torch pin, then the rest of its requirements against the image's stack.
RUN pip install --no-deps "sglang==${SGLANG_VERSION}" && python - > /tmp/sglang-reqs.txt <<'EOF'
import importlib.metadata as m
import sys

from packaging.requirements import Requirement
from packaging.version import Version

image_torch = Version(m.version("torch"))
skip = {"torch", "torchvision", "torchaudio", "triton"}
for line in m.requires("sglang") or []:
    req = Requirement(line)
    if req.marker is not None and not any(
        req.marker.evaluate({"extra": e}) for e in ("", "srt", "runtime_common")
    ):
        continue
    if req.name == "torch":
        pinned = [Version(s.version) for s in req.specifier if s.operator == "=="]
        if pinned and pinned[0].release[:2] != image_torch.release[:2]:
            sys.exit(f"sglang {m.version('sglang')} needs torch {pinned[0]}, this image has "
                     f"{image_torch}: choose another NGC_TAG or SGLANG_VERSION")
    if req.name not in skip:
        print(str(req).split(";")[0])
EOF
RUN pip install -c /tmp/pins.txt -r /tmp/sglang-reqs.txt

COPY setup.py README.md ./
COPY requirements ./requirements
COPY megatron_rpt ./megatron_rpt
RUN pip install -c /tmp/pins.txt "megatron-core==${MEGATRON_CORE_VERSION}" -e ".[test,assets]" \
 && pip install --no-deps -r requirements/assets-nodeps.txt

COPY . .
# The GPU stack must import (no GPU is needed for the import) and torch must still be the image's.
RUN python -c "import torch, megatron.core, sglang, transformer_engine; \
print('torch', torch.__version__, 'megatron-core', megatron.core.__version__, 'sglang', sglang.__version__)" \
 && grep -q "^torch==$(python -c 'import torch; print(torch.__version__)')$" /tmp/pins.txt

CMD ["bash", "examples/pretrain_rpt.sh"]
