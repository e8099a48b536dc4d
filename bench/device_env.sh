# Sourced by the bench scripts, from the repository root. On the device machine, whose image lacks DeepSpeed,
# install what .whl/ carries (deepspeed, hjson, pydantic, torchao: docs/benchmarks.md says how to build it) into
# a venv over the image's packages (/tmp/dsvenv, first on PATH), so that the `deepspeed` program lies beside the
# interpreter as in any install (the launcher tests start it there); where no venv can be made, into /tmp/site. A
# Python that has DeepSpeed already (a dev venv) keeps its own packages. Then the environment every GPU run here
# needs: FusedAdam's JIT build for sm_90 (not "9.0a"), and NVLink multicast off (the device notes).
if [ -d .whl ] && ! python3 -c "import deepspeed" > /dev/null 2>&1; then
  pip_install=(-m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade)
  if python3 -m venv --system-site-packages --without-pip /tmp/dsvenv 2> /dev/null; then
    /tmp/dsvenv/bin/python3 "${pip_install[@]}" .whl/*.whl || exit 1
    export PATH=/tmp/dsvenv/bin:$PATH VIRTUAL_ENV=/tmp/dsvenv
  else
    python3 "${pip_install[@]}" --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
fi
export TORCH_CUDA_ARCH_LIST=9.0 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1
