# Sourced by the scripts: set up the host (scripts/setup.sh) and set $host and $python.
# setup.sh's progress goes to stderr; its last two lines name the host and the python.
_cmlora_out="$(bash "$(dirname "${BASH_SOURCE[0]}")/setup.sh")"
host="$(printf '%s\n' "$_cmlora_out" | tail -n 2 | head -n 1)"
python="$(printf '%s\n' "$_cmlora_out" | tail -n 1)"
unset _cmlora_out
