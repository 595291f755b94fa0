# megatron_rpt on an NVIDIA PyTorch (NGC) image: CUDA torch, Transformer Engine and apex come
# with the image; this adds megatron-core, SGLang and megatron_rpt.
#
#   docker build -t megatron-rpt .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 --rm -it -v $PWD/runs:/workspace/megatron_rpt/runs megatron-rpt \
#       bash examples/pretrain_rpt.sh
#
# Version matching (the one thing that breaks images like this): sglang pins an exact torch,
# and its CUDA kernels are built against that torch's ABI, while NGC images ship their own torch
# build. Pick the NGC tag whose torch matches the sglang release (see the README's Docker section);
# the build below refuses to continue if pip would replace the image's torch, instead of
# silently installing a second torch with different CUDA libraries.
ARG NGC_TAG=26.04-py3
FROM nvcr.io/nvidia/pytorch:${NGC_TAG}

ARG SGLANG_VERSION=0.5.17
ARG MEGATRON_CORE_VERSION=0.16.1

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    WANDB_MODE=offline \
    TOKENIZERS_PARALLELISM=false \
    PYTHONUNBUFFERED=1

WORKDIR /workspace/megatron_rpt

# Freeze the image's torch (and TE) so no later pip resolve can swap them out.
RUN python -c "import torch, importlib.metadata as m; print(f'torch=={m.version(\"torch\")}')" > /tmp/pins.txt \
 && (python -c "import importlib.metadata as m; print(f'transformer-engine=={m.version(\"transformer-engine\")}')" >> /tmp/pins.txt || true) \
 && cat /tmp/pins.txt

# SGLang with its own dependency list, constrained to the image's torch; fails loudly when the
# chosen SGLANG_VERSION needs a different torch than this NGC image has.
RUN pip install -c /tmp/pins.txt "sglang[srt]==${SGLANG_VERSION}"

COPY setup.py README.md ./
COPY requirements ./requirements
COPY megatron_rpt ./megatron_rpt
RUN pip install -c /tmp/pins.txt "megatron-core==${MEGATRON_CORE_VERSION}" -e ".[test,assets]" \
 && pip install --no-deps -r requirements/assets-nodeps.txt

COPY . .
# Check at build time that the GPU stack imports (no GPU needed for the import).
RUN python -c "import megatron.core, sglang, transformer_engine; print('megatron-core', megatron.core.__version__, 'sglang', sglang.__version__)"

CMD ["bash", "examples/pretrain_rpt.sh"]
