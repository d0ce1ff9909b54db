# Triton Inference Server (NGC) serving a model repository written by `allspark serve`:
#
#   allspark serve build/demo --repo repo --target gpu --k8s k8s/
#   docker build -t allspark-triton:0.1.0 .                  # --build-arg REPO=DIR for another repository
#   docker run --gpus all --shm-size=1g -p 8000:8000 -p 8001:8001 -p 8002:8002 allspark-triton:0.1.0
#
# The repository's directory must lie inside the build context (and not be named in .dockerignore).
ARG TRITON_TAG=25.01
FROM nvcr.io/nvidia/tritonserver:${TRITON_TAG}-py3

# The python-backend models import `allspark` (every model.py is a shim importing its class from
# allspark.serving.models), so the package goes into the system Python that the backend's stub runs.
ARG EXTRAS=serving
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# the image's Python is the distribution's (PEP 668): installing into it is the point here
ENV PIP_BREAK_SYSTEM_PACKAGES=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/allspark
# torch is a dependency of the package but no served model runs it: its CPU wheel first, so that
# installing the package does not fetch gigabytes of CUDA wheels from PyPI (2.13.0+cpu satisfies ==2.13.0)
RUN python3 -m pip install --index-url ${TORCH_INDEX} "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md ./
COPY allspark ./allspark
# serving: what the models and the client need; add gpu (EXTRAS=serving,gpu) for onnxruntime-gpu
RUN python3 -m pip install ".[${EXTRAS}]" \
 && python3 -c "import allspark.serving.models.entry, allspark.serving.models.stream, allspark.serving.models.component"

ARG REPO=repo
COPY ${REPO} /models

# http, grpc, metrics: the ports of allspark.serving.k8s.K8sOptions and the manifests it writes
EXPOSE 8000 8001 8002
# CMD, not ENTRYPOINT: the image's entrypoint (nvidia_entrypoint.sh) runs it. The same arguments as
# allspark.serving.k8s.triton_args (tests/test_k8s.py keeps them equal).
CMD ["tritonserver", "--model-repository=/models", "--strict-readiness=true", "--http-port=8000", "--grpc-port=8001", "--metrics-port=8002", "--disable-auto-complete-config", "--backend-config=python,shm-default-byte-size=4194304", "--backend-config=python,shm-growth-byte-size=1048576"]
