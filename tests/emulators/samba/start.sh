#!/usr/bin/env bash
# Runs a private Samba smbd for tests: no systemd, no global smb.conf, passdb or state.
#   start.sh DIR SHARE_ROOT [PORT]   writes DIR/smb.conf, starts smbd on 127.0.0.1:PORT (a free
#                                    port when omitted), prints "READY PORT PID" once it accepts
#   start.sh stop DIR                stops the smbd started for DIR (its pid is in DIR/smbd.pid)
# Share `C$` serves SHARE_ROOT read-write to user hvadmin (password Hv-Passw0rd!); user nosmb
# (NoSmb-Passw0rd!) authenticates but is refused the share. Only the two Unix users are
# global state (created when missing, no home, no shell). Must run as root.
set -euo pipefail

SMBD=/usr/sbin/smbd
SMBPASSWD=$(command -v smbpasswd || echo /usr/bin/smbpasswd)

# kill -0 is true for a zombie too (in a container whose pid 1 does not reap, smbd stays one).
alive() { [[ -r /proc/$1/stat ]] && [[ $(cut -d' ' -f3 "/proc/$1/stat") != Z ]]; }

if [[ ${1:-} == stop ]]; then
  dir=${2:?usage: start.sh stop DIR}
  dir=$(cd "$dir" && pwd)
  [[ -f $dir/smbd.pid ]] || exit 0
  pid=$(cat "$dir/smbd.pid")
  # smbd leads its own process group (setsid below): the group holds its connection children.
  if kill -- "-$pid" 2>/dev/null || kill "$pid" 2>/dev/null; then
    for _ in $(seq 50); do alive "$pid" || break; sleep 0.1; done
    kill -9 -- "-$pid" 2>/dev/null || true
  fi
  rm -f "$dir/smbd.pid"
  # An RPC request (e.g. `smbclient -L`) makes smbd spawn samba-dcerpcd, which outlives smbd:
  # it leads its own process group (with its rpcd_* workers) and records its pid under DIR.
  dpid=$(cat "$dir/pid/samba-dcerpcd.pid" 2>/dev/null || true)
  if [[ -n $dpid ]] && grep -qF -- "$dir/smb.conf" "/proc/$dpid/cmdline" 2>/dev/null; then
    kill -- "-$dpid" 2>/dev/null || true
  fi
  exit 0
fi

dir=${1:?usage: start.sh DIR SHARE_ROOT [PORT]}
share=${2:?usage: start.sh DIR SHARE_ROOT [PORT]}
port=${3:-}
[[ $(id -u) -eq 0 ]] || { echo "start.sh: must run as root (Unix users, force user)" >&2; exit 1; }
[[ -x $SMBD ]] || { echo "start.sh: $SMBD missing (run install.sh)" >&2; exit 1; }
mkdir -p "$dir" "$share"
dir=$(cd "$dir" && pwd)
share=$(cd "$share" && pwd)
if [[ -z $port ]]; then
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
for d in private lock state cache pid ncalrpc log bind-dns usershares; do
  mkdir -p "$dir/$d"
done
chmod 700 "$dir/private"

conf=$dir/smb.conf
cat >"$conf" <<CONF
[global]
  server role = standalone server
  workgroup = WORKGROUP
  netbios name = REHOSTTEST
  disable netbios = yes
  smb ports = $port
  interfaces = 127.0.0.1
  bind interfaces only = yes
  server min protocol = SMB2_10
  ntlm auth = ntlmv2-only
  lanman auth = no
  map to guest = never
  restrict anonymous = 2
  passdb backend = tdbsam:$dir/private/passdb.tdb
  private dir = $dir/private
  lock directory = $dir/lock
  state directory = $dir/state
  cache directory = $dir/cache
  pid directory = $dir/pid
  ncalrpc dir = $dir/ncalrpc
  binddns dir = $dir/bind-dns
  usershare path = $dir/usershares
  log file = $dir/log/log.%m
  max log size = 1000
  log level = 1
  load printers = no
  printing = bsd
  printcap name = /dev/null
  disable spoolss = yes
  kernel oplocks = no
  kernel share modes = no

[C\$]
  path = $share
  read only = no
  browseable = yes
  valid users = hvadmin
  force user = root
  force group = root
  # Plain 0644 files, no DOS attribute bits mapped onto the x bits.
  map archive = no
  create mask = 0644
  directory mask = 0755
CONF

add_user() { # name password
  id "$1" >/dev/null 2>&1 || useradd -M -s /usr/sbin/nologin "$1"
  if ! printf '%s\n%s\n' "$2" "$2" | "$SMBPASSWD" -c "$conf" -s -a "$1" >"$dir/log/smbpasswd.out" 2>&1; then
    cat "$dir/log/smbpasswd.out" >&2
    exit 1
  fi
}
add_user hvadmin 'Hv-Passw0rd!'
add_user nosmb 'NoSmb-Passw0rd!'

# stdout/stderr to a file: whoever reads our READY line must not inherit smbd's pipe.
# setsid: smbd SIGTERMs its whole process group when it exits, and --no-process-group would
# leave it in the caller's (a test runner, a shell): stopping it would kill them too. In a
# session of its own it also takes its per-connection children with it.
setsid "$SMBD" --foreground --no-process-group --debug-stdout -s "$conf" >"$dir/log/smbd.out" 2>&1 </dev/null &
pid=$!
echo "$pid" >"$dir/smbd.pid"

for _ in $(seq 200); do
  if ! alive "$pid"; then
    echo "start.sh: smbd exited; see $dir/log/smbd.out" >&2
    tail -n 20 "$dir/log/smbd.out" >&2
    exit 1
  fi
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "READY $port $pid"
    exit 0
  fi
  sleep 0.05
done
echo "start.sh: smbd did not accept on port $port within 10 s; see $dir/log/smbd.out" >&2
kill "$pid" 2>/dev/null || true
exit 1
