# Bring megatron-core 0.19.2 and vLLM 0.26.0 to the lent GPU machine (Python 3.12, torch 2.11 cu130,
# no network). Three modes; see README.md beside this file for the exact `run` calls.
#
#   bash   benchmarks/gpu/setup.sh prepare   # here, in the repo root (needs PyPI): wheels + vLLM parts
#   source benchmarks/gpu/setup.sh device1   # on the device, call 1 (carries .vparts/c1 and .whl)
#   source benchmarks/gpu/setup.sh device2   # on the device, call 2 (carries .vparts/c2 and .whl)
#
# What travels (requirements.txt lists it with versions):
#   .whl/   megatron-core 0.19.2 wheel (2.4 MB; Requires-Dist torch, numpy, packaging: all on the image),
#           omegaconf 2.4.0 + antlr4-python3-runtime 4.13.2 (0.4 MB; the trainer's config; PyYAML is on the image)
#   .vparts/c1/p1 (60 MiB) + .vparts/c2/{p2,SHA256,install.sh} (16 MiB): a stripped, preinstalled
#           vLLM 0.26.0 + 29 small wheels, built by `prepare` ($SHARED/gpu/prepare_vllm_parts.sh). A call may
#           carry 64 MiB, so the two parts go in two calls made back to back (the machine stays
#           warm 30 s after a call; /tmp there survives only while it is warm).
# After device2: PYTHONPATH = repo root : /tmp/mcsite (megatron) : /tmp/site (vLLM + deps).
#
# PARTS=.gpuparts (default .vparts): use a private snapshot of the parts. The shared script always
# writes .vparts/ and starts by deleting it; when several sessions share one checkout, one of them
# may rebuild .vparts between your call 1 and call 2 (then p1 and p2 no longer match). `prepare`
# copies .vparts to $PARTS (and adds it to .git/info/exclude); the device modes read $PARTS.

_mr_mode=${1:-}
PARTS=${PARTS:-.vparts}
case "$_mr_mode" in
prepare)
  set -euo pipefail
  git rev-parse --git-dir >/dev/null
  EXCL=$(git rev-parse --git-path info/exclude)
  for p in /.whl/ /.site/ /.vparts/ "/$PARTS/"; do grep -qx "$p" "$EXCL" 2>/dev/null || echo "$p" >> "$EXCL"; done
  PY=${PYTHON:-python3}
  if ! ls .whl/megatron_core-0.19.2-*.whl .whl/omegaconf-2.4.0-*.whl .whl/antlr4_python3_runtime-4.13.2-*.whl >/dev/null 2>&1; then
    # omegaconf (the trainer's config) and its antlr runtime: pure Python, not on the device image
    PIP_CONSTRAINT= "$PY" -m pip download --isolated --no-deps --only-binary=:all: \
      --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
      --platform manylinux_2_24_x86_64 --platform any -d .whl megatron-core==0.19.2 omegaconf==2.4.0 \
      antlr4-python3-runtime==4.13.2
  fi
  SHARED=${SHARED:-$(cd "$(git rev-parse --show-toplevel)/.." && pwd)/shared}
  if [ -f .vparts/c2/SHA256 ] && [ -f .vparts/c1/p1 ] && [ -f .vparts/c2/install.sh ]; then
    echo "vLLM parts already built: .vparts/c1/p1, .vparts/c2/p2 (sha256 $(cat .vparts/c2/SHA256)); rm -rf .vparts/c* to rebuild"
  else
    bash "$SHARED/gpu/prepare_vllm_parts.sh"
  fi
  [ -z "$(ls .vparts | grep -E '^c[3-9]')" ] || { echo "more than 2 parts: README's two calls need a third" >&2; exit 1; }
  if [ "$PARTS" != .vparts ]; then
    rm -rf "$PARTS" && mkdir -p "$PARTS" && cp -r .vparts/c1 .vparts/c2 "$PARTS"/
    [ "$(cat "$PARTS"/c1/p1 "$PARTS"/c2/p2 | sha256sum | cut -d' ' -f1)" = "$(cat "$PARTS"/c2/SHA256)" ] \
      || { echo "$PARTS: p1+p2 do not match SHA256 (.vparts changed while copying?)" >&2; exit 1; }
  fi
  ls -l .whl "$PARTS"/c1 "$PARTS"/c2
  ;;
device1|device2)
  _mr_t=$(date +%s)
  if [ ! -f /tmp/mcsite/.ok ] || [ ! -d /tmp/mcsite/omegaconf ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/mcsite .whl/*.whl \
      && touch /tmp/mcsite/.ok || { echo "megatron-core / omegaconf install failed" >&2; return 1 2>/dev/null || exit 1; }
  fi
  export PYTHONPATH=$PWD:/tmp/mcsite${PYTHONPATH:+:$PYTHONPATH}
  if [ "$_mr_mode" = device1 ]; then
    mkdir -p /tmp/vparts && cp "$PARTS"/c1/p1 /tmp/vparts/ && echo "p1 copied to /tmp/vparts"
  else
    [ -f /tmp/vparts/p1 ] || [ -f /tmp/site/.vparts_sha ] || {
      echo "no /tmp/vparts/p1: the machine went cold after call 1; make call 1 again, then call 2 at once" >&2
      return 1 2>/dev/null || exit 1; }
    # install.sh reads .vparts/c2/p2 relative to the current directory: give it $PARTS under that name
    mkdir -p /tmp/mr_parts_root && ln -sfn "$PWD/$PARTS" /tmp/mr_parts_root/.vparts
    pushd /tmp/mr_parts_root >/dev/null && source .vparts/c2/install.sh; _mr_rc=$?; popd >/dev/null
    [ $_mr_rc = 0 ] || { echo "vLLM parts install failed" >&2; return 1 2>/dev/null || exit 1; }
    export PYTHONPATH=$PWD:/tmp/mcsite:/tmp/site
  fi
  export VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
  export TMPDIR=/tmp/mcore_rl_tmp; mkdir -p "$TMPDIR"   # vLLM's ZMQ sockets go to the temp dir
  echo "setup $_mr_mode done in $(( $(date +%s) - _mr_t )) s; PYTHONPATH=$PYTHONPATH"
  ;;
*)
  echo "usage: bash benchmarks/gpu/setup.sh prepare | source benchmarks/gpu/setup.sh device1|device2" >&2
  return 2 2>/dev/null || exit 2
  ;;
esac
