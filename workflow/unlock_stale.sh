#!/usr/bin/env bash
# Usage: unlock_stale.sh WORKDIR SNAKEMAKE_COMMAND...
# A Snakemake killed by SIGKILL leaves its lock in WORKDIR/.snakemake/locks, and the next
# run refuses to start. Release it (SNAKEMAKE_COMMAND --unlock) unless a Snakemake process
# is still running in WORKDIR: Snakemake chdirs into its --directory, so its cwd tells.
set -u
workdir=$(cd "$1" 2>/dev/null && pwd -P) || exit 0
shift
locks="$workdir/.snakemake/locks"
[ -d "$locks" ] && [ -n "$(ls -A "$locks")" ] || exit 0
ancestors=" $$ "
p=$$
while [ "$p" -gt 1 ]; do
  p=$(awk '{print $4}' "/proc/$p/stat" 2>/dev/null) || break
  ancestors+="$p "
done
for pid in $(pgrep -f snakemake); do
  case "$ancestors" in *" $pid "*) continue ;; esac
  if [ "$(readlink "/proc/$pid/cwd" 2>/dev/null)" = "$workdir" ]; then
    echo "a Snakemake (pid $pid) is running in $workdir; its lock is kept" >&2
    exit 0
  fi
done
echo "releasing the stale Snakemake lock in $workdir (left by a killed run)" >&2
"$@" --unlock >/dev/null
