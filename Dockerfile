# STOIC2021 algorithm container: the Balaitous model, offline, as a non-root user.
#
# The base image brings Python >= 3.11 (lungmask 0.2.22 needs it) and a CUDA build of
# torch 2.13.0. CUDA 12.8 runs on Turing (T4) and Ampere (A10G) GPUs with a driver >= 570.
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

# Nothing is downloaded at run time; a library that still looks for a cache finds a writable one.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TORCH_HOME=/tmp/torch

# A fixed numeric user, so that the host and the platform resolve it the same way.
RUN groupadd --system --gid 1001 user \
    && useradd --create-home --no-log-init --system --uid 1001 --gid user user \
    && mkdir -p /opt/app /input /output \
    && chown user:user /opt/app /input /output

WORKDIR /opt/app

COPY requirements.txt /opt/app/
RUN python -c "import sys, torch; \
assert sys.version_info >= (3, 11), f'Python {sys.version} < 3.11'; \
assert torch.__version__.split('+')[0] == '2.13.0', f'torch {torch.__version__} is not 2.13.0'" \
    && python -m pip install --requirement requirements.txt

# Model files baked into the image when model/ holds them (see model/README.md); a model
# tarball uploaded to grand-challenge and extracted at /opt/ml/model takes precedence.
COPY --chown=user:user model/ /opt/app/model/
COPY --chown=user:user stoic_ct/ /opt/app/stoic_ct/
COPY --chown=user:user process.py train.py /opt/app/

USER 1001:1001
# The inference container. For the final-phase training run: --entrypoint python IMAGE train.py
ENTRYPOINT ["python", "-m", "process"]
