# STOIC2021 algorithm container: Balaitous and the 3D ConvNeXt, offline, as a non-root user.
#
# Build it with ./build.sh, which first resolves the Python packages into wheelhouse/ on the
# host (scripts/wheelhouse.sh): this build reaches no network. The base image brings Python
# >= 3.11 (lungmask 0.2.22 needs it) and a CUDA build of torch 2.13.0; CUDA 12.8 runs on
# Turing (T4) and Ampere (A10G) GPUs with a driver >= 570. Stages: `code` (the default
# image: code and dependencies; the model files are mounted at /opt/ml/model, as
# grand-challenge does with the model tarball) and `model-baked` (the same with model/ in
# the image: ./build.sh --bake-model).
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE} AS code

# Nothing is downloaded at run time. The root file system is read-only on the platform:
# a library that still looks for a cache finds a writable one under /tmp.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TORCH_HOME=/tmp/torch \
    XDG_CACHE_HOME=/tmp/cache \
    MPLCONFIGDIR=/tmp/matplotlib

# A fixed numeric user, so that the host and the platform resolve it the same way.
RUN groupadd --system --gid 1001 user \
    && useradd --create-home --no-log-init --system --uid 1001 --gid user user \
    && mkdir -p /opt/app /opt/ml/model /input /output \
    && chown user:user /opt/app /output

WORKDIR /opt/app

# The image's part of requirements.txt, exactly: wheelhouse/requirements.txt lists it.
RUN --mount=type=bind,source=wheelhouse,target=/tmp/wheelhouse \
    python -c "import sys, torch; \
assert sys.version_info >= (3, 11), f'Python {sys.version} < 3.11'; \
assert torch.__version__.split('+')[0] == '2.13.0', f'torch {torch.__version__} is not 2.13.0'" \
    && python -m pip install --no-index --no-deps --find-links /tmp/wheelhouse \
        --requirement /tmp/wheelhouse/requirements.txt

COPY --chown=user:user stoic_ct/ /opt/app/stoic_ct/
COPY --chown=user:user process.py train.py /opt/app/
# Every module of the package imports (a missing wheel fails the build, not a job).
RUN python -c "import importlib, pkgutil, process, train, stoic_ct; \
[importlib.import_module(m.name) for m in pkgutil.walk_packages(stoic_ct.__path__, 'stoic_ct.') \
 if m.name != 'stoic_ct.__main__']"

USER 1001:1001
# The inference container. For the final-phase training run: --entrypoint python IMAGE train.py
ENTRYPOINT ["python", "-m", "process"]

FROM code AS model-baked
COPY --chown=user:user model/ /opt/app/model/

# The default image: code and dependencies, no model files.
FROM code
