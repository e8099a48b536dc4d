# Sourced by the bench scripts, from the repository root. On the device machine, whose image lacks DeepSpeed,
# install what .whl/ carries (deepspeed, hjson, pydantic, torchao: docs/benchmarks.md says how to build it; pytest
# and its dependencies only where the image has no pytest) into the interpreter's venv where it may write (the
# image's python3 is one), so that the `deepspeed` program lies beside the interpreter as in any install (the
# launcher tests start it there); else (a system Python) into /tmp/site. A Python that has DeepSpeed already (a dev
# venv) keeps its own packages. Then the environment every GPU run here needs: FusedAdam's JIT build for sm_90
# (not "9.0a"), and NVLink multicast off (the device notes).
if [ -d .whl ] && ! python3 -c "import deepspeed" > /dev/null 2>&1; then
  wheels=(.whl/*.whl)
  if python3 -c "import pytest" > /dev/null 2>&1; then
    wheels=()
    for w in .whl/*.whl; do
      case ${w##*/} in pytest-*|iniconfig-*|pluggy-*|packaging-*) ;; *) wheels+=("$w") ;; esac
    done
  fi
  pip_install=(-m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade)
  if python3 -c 'import os, sys, sysconfig
sys.exit(sys.prefix == sys.base_prefix or not os.access(sysconfig.get_paths()["purelib"], os.W_OK))'; then
    python3 "${pip_install[@]}" "${wheels[@]}" || exit 1
  else
    python3 "${pip_install[@]}" --target /tmp/site "${wheels[@]}" || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
fi
export TORCH_CUDA_ARCH_LIST=9.0 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1
