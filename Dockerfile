# GPU image for users: pi-build on CUDA 13 with PyTorch's CUDA wheels. (Not built in CI: the
# development machines have no Docker engine and no GPU.) For TensorRT, start from NVIDIA's
# TensorRT image instead, or add `pip install tensorrt` where NVIDIA's index is reachable.
#
#   docker build -t pi-build .
#   docker run --gpus all -v $PWD/checkpoints:/work/checkpoints -v $PWD/engines:/work/engines \
#       pi-build pi-build all --recipe recipes/pi05_libero.toml
FROM nvidia/cuda:13.0.1-cudnn-devel-ubuntu24.04

# gcc and the Python headers: Inductor compiles its kernels' host code at build time.
RUN apt-get update && apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev build-essential libegl1 libgl1 git \
    && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1
RUN python3 -m venv $VIRTUAL_ENV && pip install --upgrade pip \
    && pip install "torch>=2.11,<2.14"   # the default Linux x86-64 wheels are CUDA builds

WORKDIR /work
COPY pyproject.toml README.md ./
COPY src ./src
COPY recipes ./recipes
COPY scripts ./scripts
RUN pip install -e '.[onnx,quant,serve,bench,eval]'

CMD ["pi-build", "--help"]
