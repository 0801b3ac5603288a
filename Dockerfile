# STOIC2021 algorithm container: Balaitous and the 3D ConvNeXt, offline, as a non-root user.
#
# Build it with ./build.sh, which first resolves the Python packages into wheelhouse/ on the
# host (scripts/wheelhouse.sh): this build reaches no network.
#
# The base: PyTorch's own image of torch 2.13.0, pinned by digest, so that every build gets
# the same bytes. torch 2.13.0 is published for CUDA 12.6, 13.0 and 13.2; 12.6 is the build
# grand-challenge's own template uses and the one that asks least of the platform's GPU
# drivers: CUDA 12.x runs on NVIDIA driver 525.60.13 or newer (minor-version
# compatibility), CUDA 13 needs 580 or newer, and the platform does not publish the driver
# of its T4 and A10G machines. A driver too old for the image's CUDA is named in a warning
# at start-up, and the job then runs on the CPU. Python is 3.11 or newer (lungmask 0.2.22
# needs it).
#
# Targets: `invoke` (the default: grand-challenge's invoke API, a web server on port 4743
# that loads the model once and runs one job per POST /invoke) and `exec` (the entry point
# runs one job to completion: ./build.sh --api exec); each also as `*-model-baked` with
# model/ in the image (./build.sh --bake-model). Without it the model files are mounted at
# /opt/ml/model, as grand-challenge does with the model tarball.
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime@sha256:6acf597eeb8e376a96580dde4952f37cc017fef732bb40bfc73f28f25e3f64b4
FROM ${BASE_IMAGE} AS code

# Nothing is downloaded at run time. The root file system is read-only on the platform:
# a library that still looks for a cache finds a writable one under /tmp. The code is
# found from any working directory (the platform's shim starts the entry point from its own).
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONPATH=/opt/app \
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

# The exec API: one job per start; for the final-phase training run, --entrypoint python
# IMAGE train.py.
FROM code AS exec
LABEL org.grand-challenge.api-method="exec"
ENTRYPOINT ["python", "-m", "process"]

# The invoke API: started once; /health, then one job per POST /invoke.
FROM code AS invoke
LABEL org.grand-challenge.api-method="invoke"
EXPOSE 4743
ENTRYPOINT ["python", "-m", "stoic_ct", "serve"]

FROM exec AS exec-model-baked
COPY --chown=user:user model/ /opt/app/model/

FROM invoke AS invoke-model-baked
COPY --chown=user:user model/ /opt/app/model/

# The default image: the invoke API, code and dependencies, no model files.
FROM invoke
