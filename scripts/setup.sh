# Sourced by scripts/test and scripts/bench: makes sure the Debian packages kvattn builds with are
# installed. As root it installs what is missing; otherwise it prints the apt-get line and stops.
KVATTN_PACKAGES=(g++ make cmake libeigen3-dev libgtest-dev libbenchmark-dev)

kvattn_missing_packages() {
  local p missing=()
  for p in "${KVATTN_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  echo "${missing[@]}"
}

kvattn_setup() {
  local missing
  missing=$(kvattn_missing_packages)
  [ -z "$missing" ] && return 0
  if [ "$(id -u)" -eq 0 ]; then
    echo "kvattn: installing $missing" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
  else
    echo "kvattn: missing Debian packages: $missing" >&2
    echo "        install them with: sudo apt-get install $missing" >&2
    exit 1
  fi
}

kvattn_jobs() { nproc 2>/dev/null || echo 2; }
